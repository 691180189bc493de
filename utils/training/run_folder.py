"""Who may write into a step's output folder (``<save_root>/<step folder>``), and when.

* A fresh run refuses a folder that holds a run, naming ``--resume`` (continue it), ``--overwrite`` (replace it) and
  ``--save_root``: no run overwrites, mixes with or appends to another.
* ``check_output`` runs first and writes nothing (it also refuses a ``--save_root`` under a file or in a place where
  nothing can be created); ``claim_output`` runs once the step's inputs have been checked (data, checkpoints,
  networks): only then are the old run's files removed (``--overwrite``), orphaned temporary files deleted and
  ``run_config.json`` written. A step that fails at start-up therefore leaves the folder exactly as it was.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

from utils.errors import MofaError
from utils.atomic_write import atomic_write
from utils.training.checkpoint import remove_orphans

RUN_CONFIG_NAME = "run_config.json"
# The files a training step writes (top level of its folder); folders are removed whole.
_TRAINING = re.compile(r"^(ckpt_\d+\.pt|latest\.pt|final\.pt|config\.json|run_config\.json|loss_(train|val)\.csv"
                       r"|tensorboard|vis)$")
# What Step 2 writes: list CSVs and run_config.json at the top level, the sample PNGs anywhere below.
_STEP2_TOP = re.compile(r"^(run_config\.json|\w+_list\.csv)$")
_STEP2_SAMPLE = re.compile(r"_(org|raster|mask)\.png$")


class RunFolderError(MofaError):
    """A step's output folder holds another run, or cannot be written."""


def run_files(out_dir: Path, step: int) -> list[Path]:
    """The files and folders of a run of Step ``step`` in ``out_dir`` (sorted; [] when there is none)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    if step != 2:
        return sorted(p for p in out_dir.iterdir() if _TRAINING.match(p.name))
    top = [p for p in out_dir.iterdir() if _STEP2_TOP.match(p.name) and p.is_file()]
    samples = [p for p in out_dir.rglob("*.png") if _STEP2_SAMPLE.search(p.name) and p.is_file()]
    return sorted(top + samples)


def _describe(files: list[Path], out_dir: Path, limit: int = 4) -> str:
    names = [p.relative_to(out_dir).as_posix() for p in files]
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _probe(out_dir: Path, save_root: Path) -> None:
    """RunFolderError unless ``out_dir``, or the folder it would be created in, is a folder this process may write
    (``os.access``: touches nothing; a place that refuses anyway, such as /proc for root, fails in ``claim_output``)."""
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RunFolderError(f"--save_root {save_root}: {existing} is a file, not a folder; pass another --save_root")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunFolderError(f"--save_root {save_root}: {existing} is not writable; pass a writable --save_root")


def check_output(out_dir: Path, step: int, args: argparse.Namespace) -> None:
    """Refuse (one line, nothing written) a folder that cannot be written, or that holds a run the flags do not
    name: a fresh run needs ``--resume`` (training steps) or ``--overwrite`` there."""
    save_root = Path(args.save_root)
    _probe(Path(out_dir), save_root)
    if getattr(args, "resume", False) or getattr(args, "overwrite", False):
        return
    found = run_files(out_dir, step)
    if found:
        todo = "pass --resume to continue it, --overwrite to replace it" if step != 2 else \
            "pass --overwrite to replace it"
        raise RunFolderError(f"--save_root {save_root}: {out_dir} already holds a run ({_describe(found, out_dir)}); "
                             f"{todo}, or another --save_root")


def claim_output(out_dir: Path, step: int, args: argparse.Namespace, replace: bool) -> None:
    """Make ``out_dir`` this run's: with ``replace`` remove the old run's files first, then delete orphaned ``*.tmp``
    files and write ``run_config.json`` (atomically). Call it on the main process, after the inputs were checked."""
    out_dir = Path(out_dir)
    try:
        if replace:
            for path in run_files(out_dir, step):
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            if step == 2:  # the mirrored image folders, now empty
                for folder in sorted((p for p in out_dir.rglob("*") if p.is_dir()), reverse=True):
                    if not any(folder.iterdir()):
                        folder.rmdir()
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_orphans(out_dir)
        with atomic_write(out_dir / RUN_CONFIG_NAME, "w", encoding="utf-8") as f:
            f.write(json.dumps(vars(args), indent=2, default=str) + "\n")
    except OSError as exc:
        raise RunFolderError(f"cannot write in {out_dir} ({exc.strerror or exc}); pass a writable --save_root") \
            from None
