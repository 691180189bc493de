"""Atomic file writes: a reader sees the old file or the new one, never a half-written one.

The data goes to a temporary file in the target's folder, is flushed and fsynced, then moved over the target with
``os.replace`` (atomic on POSIX and Windows when both are on one file system). On any error, Ctrl-C included, the
temporary file is removed and the target is left as it was. Temporary files are named ``.<name>.<random>.tmp``
(`temp_name`; a run that takes over its folder deletes the ones a killed process left) and get the mode ``open()``
gives (0666 less the umask), like every other file the project writes.
"""
from __future__ import annotations

import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO
from collections.abc import Iterator


def temp_name(path: str | Path) -> Path:
    """A fresh temporary name beside ``path``: ``.<name>.<random>.tmp``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """``with atomic_write(path) as f: ...`` writes ``path`` atomically; parent folders are created.

    mode: "wb" (default) or "w" (text; ``open_kwargs`` such as ``newline=""`` or ``encoding`` go to ``open``).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_copy(src: str | Path, dst: str | Path) -> Path:
    """Copy the file ``src`` to ``dst`` atomically (see `atomic_write`); returns ``dst``."""
    with open(src, "rb") as source, atomic_write(dst) as target:
        shutil.copyfileobj(source, target)
    return Path(dst)
