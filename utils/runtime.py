"""Run-time helpers shared by the step scripts: device, seeding, repo-relative paths, distributed setup, CLI.

Path rule: a path the USER types is relative to the current directory (as every command-line tool does); a
DEFAULT path (``RepoDefault``) is relative to the repository root, so the defaults work from any directory.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from models.errors import ModelInputError
from utils.errors import MofaError

DEFAULT_BFM = "basel_3DMM/model2017-1_bfm_nomouth.h5"
DEFAULT_SAVE_ROOT = "MoFA_UNet_Save"
ENCODERS = ("resnet50", "resnet18", "resnet34")
# Exceptions that carry a user-facing message; cli_main prints them as one line.
USER_ERRORS = (MofaError, ModelInputError)


class SetupError(MofaError):
    """Bad run-time settings: an unavailable --device or an inconsistent torchrun environment."""


def resolve_device(spec: str = "auto") -> torch.device:
    """``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:k"`` -> torch.device.

    Raises SetupError when CUDA (or device k) is requested but not available.
    """
    spec = str(spec).strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        index = spec.partition(":")[2]
        if index and not index.isdigit():
            raise SetupError(f"--device {spec}: expected cuda:<index>, e.g. cuda:0")
        if not torch.cuda.is_available():
            raise SetupError(f"--device {spec}: CUDA is not available on this machine; use --device cpu or auto")
        if index and int(index) >= torch.cuda.device_count():
            raise SetupError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return torch.device(spec)
    raise SetupError(f"--device {spec}: expected auto, cpu, cuda or cuda:<index>")


def seed_everything(seed: int) -> None:
    """Seed Python ``random``, numpy and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def repo_root() -> Path:
    """Absolute path of the repository root (the directory holding ``utils/``)."""
    return Path(__file__).resolve().parent.parent


class RepoDefault(str):
    """A default path, relative to the repository root. argparse keeps a non-typed default object as is,
    so ``resolve_cli_path`` can tell a default from a value the user typed."""


def repo_path(p: str | Path) -> Path:
    """Resolve a relative path against the repository root (for defaults); absolute paths are unchanged."""
    p = Path(p).expanduser()
    return p if p.is_absolute() else repo_root() / p


def resolve_cli_path(value: str | Path | None) -> Path | None:
    """A path flag's value as a Path: a ``RepoDefault`` against the repo root, a user value against the cwd."""
    if value is None:
        return None
    if isinstance(value, RepoDefault):
        return repo_path(value)
    return Path(value).expanduser()


def resolve_paths(args: argparse.Namespace, names: Sequence[str] = ("img_path", "bfm", "save_root")
                  ) -> argparse.Namespace:
    """Replace the named path flags of ``args`` (if present) by resolved Paths (see ``resolve_cli_path``)."""
    for name in names:
        if hasattr(args, name):
            setattr(args, name, resolve_cli_path(getattr(args, name)))
    return args


def add_common_args(parser: argparse.ArgumentParser, img_path_required: bool = True) -> argparse.ArgumentParser:
    """Add the flags every step shares. Path flags have no ``type`` so defaults stay ``RepoDefault``;
    call ``resolve_paths(args)`` after parsing."""
    parser.add_argument("--img_path", required=img_path_required, default=None,
                        help="image root (the folder with the images, or its parent holding the CSVs)")
    parser.add_argument("--bfm", default=RepoDefault(DEFAULT_BFM),
                        help=f"Basel Face Model 2017 h5 file (default: <repo>/{DEFAULT_BFM})")
    parser.add_argument("--save_root", default=RepoDefault(DEFAULT_SAVE_ROOT),
                        help=f"output root of all steps (default: <repo>/{DEFAULT_SAVE_ROOT})")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:<index> (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default: 2)")
    parser.add_argument("--image_size", type=int, default=224, help="network input size in pixels (default: 224)")
    parser.add_argument("--encoder", choices=ENCODERS, default="resnet50", help="encoder backbone")
    parser.add_argument("--unet_width", type=int, default=64, help="UNet base channel count (default: 64)")
    return parser


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly single-process) run."""
    rank: int
    world_size: int
    local_rank: int
    is_main: bool
    device: torch.device


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    if not value.strip().isdigit():
        raise SetupError(f"environment variable {name}={value!r} is not a non-negative integer: launch with torchrun")
    return int(value)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (RANK and WORLD_SIZE set), else run single-process.

    Under torchrun: backend nccl on CUDA (device cuda:LOCAL_RANK), gloo on CPU. Without torchrun: a no-op,
    returning rank 0 of 1 on ``resolve_device(device)``.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0, True, resolve_device(device))
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
    if rank >= world:
        raise SetupError(f"RANK={rank} is not below WORLD_SIZE={world}: launch with torchrun")
    base = resolve_device(device)
    if base.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    return DistInfo(rank, world, local, rank == 0, dev)


def cleanup_distributed() -> None:
    """Leave the process group if one was initialised (safe to call in single-process runs)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def cli_main(fn: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run ``fn(argv)`` as a command-line entry point and exit with its status.

    Sets up INFO logging to stderr (message only) unless logging is already configured. A project error
    (MofaError, ModelInputError) prints ``error: <message>`` as ONE line to stderr and exits 2; Ctrl-C that
    ``fn`` did not handle prints ``error: interrupted`` and exits 130. Otherwise exits with fn's return
    value (None = 0).
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        code = fn(argv)
    except USER_ERRORS as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    raise SystemExit(code or 0)
