"""Who may write into a step's output folder (``<save_root>/<step folder>``), and when.

* A fresh run refuses a folder that holds a run, naming ``--resume`` (continue it), ``--overwrite`` (replace it) and
  ``--save_root``: no run overwrites, mixes with or appends to another.
* ``check_output`` runs first and writes nothing (it also refuses a ``--save_root`` under a file or in a place where
  nothing can be created); ``claim_output`` runs once the step's inputs have been checked (data, checkpoints,
  networks): only then are the old run's files removed (``--overwrite``), orphaned temporary files deleted and
  ``run_config.json`` written. A step that fails at start-up therefore leaves the folder exactly as it was.
* One run per folder: the main process holds an exclusive ``flock`` on ``<folder>/.run.lock`` for the whole run
  (``RunLock``; taken in ``start_run`` when the file exists, else created by ``claim_output`` before it removes or
  writes anything). Another run into the folder, a ``--resume`` or ``--overwrite`` included, is refused with one
  line naming the holder (pid, host, start time). The lock file is never deleted (a new file would be a second
  lock); the kernel drops the lock when the process ends, however it ends.
* Step 2 owns its files by its manifest (``utils.output_dir``): ``claim_output`` lists every file the run will
  write before it writes one, and ``--overwrite`` removes only the files the previous run's manifest lists; a file
  of the user's in the way is refused, whatever its name.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import socket
from pathlib import Path

from utils.errors import MofaError
from utils.atomic_write import atomic_write
from utils.output_dir import MANIFEST_NAME, flock_or_close, owned_files, write_manifest
from utils.training.checkpoint import remove_orphans

RUN_CONFIG_NAME = "run_config.json"
LOCK_NAME = ".run.lock"
STEP2_TOOL = "Step2_UNet_trainset_generation"  # the owner named in Step 2's manifest
# The files a training step writes (top level of its folder); folders are removed whole.
_TRAINING = re.compile(r"^(ckpt_\d+\.pt|latest\.pt|final\.pt|config\.json|run_config\.json|loss_(train|val)\.csv"
                       r"|tensorboard|vis)$")
# What Step 2 writes: list CSVs and run_config.json at the top level, the sample PNGs anywhere below.
_STEP2_TOP = re.compile(r"^(run_config\.json|\w+_list\.csv)$")
_STEP2_SAMPLE = re.compile(r"_(org|raster|mask)\.png$")


class RunFolderError(MofaError):
    """A step's output folder holds another run, or cannot be written."""


class RunLockedError(RunFolderError):
    """Another live process runs in this step folder."""


_HELD: dict[Path, int] = {}  # folder -> descriptor of its lock file, for the locks this process holds


def _holder(path: Path) -> str:
    try:
        text = " ".join(path.read_text(encoding="utf-8").split())
    except (OSError, UnicodeDecodeError):
        text = ""
    return text or "a process that has not written its name yet"


def _flock(fd: int, lock_path: Path, out_dir: Path) -> None:
    try:
        flock_or_close(fd)  # not POSIX: runs are not locked
    except OSError:
        raise RunLockedError(f"{out_dir} is in use by another run ({_holder(lock_path)}): wait for it to end or stop "
                             "it (a --resume or --overwrite of a live run is refused), or pass another --save_root"
                             ) from None


def hold_lock(out_dir: Path, create: bool) -> bool:
    """Take this process's exclusive lock on the run folder ``out_dir`` (re-entrant within a process).

    create=False (start-up, writes nothing): lock the existing ``.run.lock`` if there is one; returns whether the
    lock is now held. create=True (``claim_output``): create the folder and the lock file if needed and lock it
    (``write_holder`` then records who holds it). RunLockedError (one line, naming the holder) when another
    process holds it."""
    out_dir = Path(out_dir)
    key = out_dir.absolute()
    lock_path = out_dir / LOCK_NAME
    if key not in _HELD:
        if not create:
            if not lock_path.is_file():
                return False
            try:
                fd = os.open(lock_path, os.O_RDONLY)
            except OSError:
                return False
        else:
            out_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        _flock(fd, lock_path, out_dir)
        _HELD[key] = fd
    return True


def write_holder(out_dir: Path) -> None:
    """Write this process's pid, host and start time into the lock file it holds (what a refused run names)."""
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    fd = os.open(Path(out_dir) / LOCK_NAME, os.O_WRONLY | os.O_CREAT, 0o666)  # the same inode: the lock stays
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}, started {started}\n".encode())
    finally:
        os.close(fd)


def release_lock(out_dir: Path) -> None:
    """Give up this process's lock on ``out_dir`` (the end of a run; a no-op when it holds none)."""
    fd = _HELD.pop(Path(out_dir).absolute(), None)
    if fd is not None:
        os.close(fd)


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


def _step2_plan(out_dir: Path, planned: list[str], replace: bool) -> list[str]:
    """The files of the previous Step-2 run to remove (its manifest; only with ``replace``); RunFolderError when a
    file this run will write exists and is not one of them (a user's file with a Step-2-like name)."""
    old = owned_files(out_dir, STEP2_TOOL) if replace else set()
    in_the_way = [name for name in planned if (out_dir / name).exists() and name not in old
                  and name not in (RUN_CONFIG_NAME, MANIFEST_NAME)]
    if in_the_way:
        shown = ", ".join(in_the_way[:3]) + (f" and {len(in_the_way) - 3} more" if len(in_the_way) > 3 else "")
        raise RunFolderError(f"{out_dir} holds files that Step 2 did not record writing ({shown}); it will not "
                             "replace them: move them away, or pass another --save_root")
    return sorted(name for name in old if name != MANIFEST_NAME)


def claim_output(out_dir: Path, step: int, args: argparse.Namespace, replace: bool,
                 planned: list[str] | None = None) -> None:
    """Make ``out_dir`` this run's: take its lock (``hold_lock``), check again that a fresh run finds no run there,
    with ``replace`` remove the old run's files (Step 2: those its manifest lists), then delete orphaned ``*.tmp``
    files and write ``run_config.json`` (atomically). Step 2 passes ``planned``, the files it will write (relative
    paths), which become its manifest first. Call it on the main process, after the inputs were checked."""
    out_dir = Path(out_dir)
    try:
        hold_lock(out_dir, create=True)
        check_output(out_dir, step, args)  # a run may have finished here since start-up
        planned = sorted({*(planned or []), RUN_CONFIG_NAME})
        old = _step2_plan(out_dir, planned, replace) if step == 2 else []
        write_holder(out_dir)
        if step == 2:
            for name in old:
                (out_dir / name).unlink(missing_ok=True)
            for folder in sorted({(out_dir / name).parent for name in old}, reverse=True):  # now empty mirrors
                while folder != out_dir and folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
                    folder = folder.parent
            write_manifest(out_dir, STEP2_TOOL, planned)
        elif replace:
            for path in run_files(out_dir, step):
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        remove_orphans(out_dir)
        with atomic_write(out_dir / RUN_CONFIG_NAME, "w", encoding="utf-8") as f:
            f.write(json.dumps(vars(args), indent=2, default=str) + "\n")
    except OSError as exc:
        raise RunFolderError(f"cannot write in {out_dir} ({exc.strerror or exc}); pass a writable --save_root") \
            from None
