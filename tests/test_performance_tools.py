"""The performance tooling: keeping freed host memory, and the GPU check script's CPU fallback."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils import host_memory

REPO = Path(__file__).resolve().parents[1]


def test_retain_freed_memory_respects_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOFA_SYSTEM_MALLOC", "1")
    assert host_memory.retain_freed_memory() is False, "MOFA_SYSTEM_MALLOC=1 must leave malloc alone"
    monkeypatch.delenv("MOFA_SYSTEM_MALLOC")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert host_memory.retain_freed_memory() is False, "a user's MALLOC_* setting wins"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_retain_freed_memory_applies_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MOFA_SYSTEM_MALLOC", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt  # noqa: B018
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    assert host_memory.retain_freed_memory() is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the full GPU check (minutes)")
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_gpu_check_cpu_fallback_writes_one_results_file(tmp_path: Path) -> None:
    results = tmp_path / "results.txt"
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(results)], cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=600)
    text = results.read_text()
    assert done.returncode == 0, text[-3000:]
    assert "no CUDA device" in text
    assert "ratio_rasterizer_to_resnet50=" in text and "renderer_share=" in text
    assert "| encoder_bwd |" in text and "gpu_check: all steps passed" in text
