"""One rule for every tool that writes a folder of results: refuse, build beside, swap in, own by manifest.

* ``check_target(folder, tool, overwrite)`` (writes nothing): a missing or empty folder is fine; a folder holding
  any file that ``tool`` did not write there (its manifest, ``MANIFEST_NAME``, a JSON file ``{"tool", "files"}``
  written last, does not list it) is refused, with or without ``overwrite``; one holding only ``tool``'s earlier
  output is replaced with ``overwrite`` and refused without. File names never prove ownership: a user's
  ``00000.png`` beside a generated set is refused, not deleted.
* ``build_beside(folder, tool, overwrite)`` is a context manager around the writing: it runs ``check_target``, then
  yields a new temporary sibling folder (``.<name>.partial-<random>``, locked with ``flock`` while it is built) to
  write into. When the block ends normally it writes the manifest (every file under the new folder) and swaps the
  new folder in (``os.rename`` of the old folder aside, of the new one into place, then the old one is deleted).
  On any exception, Ctrl-C included, the new folder is deleted and the old one is untouched: a reader sees the old
  output or the complete new one, never a mix. Temporary siblings left by a killed process (unlocked) are deleted by
  the next build.
* ``read_manifest(folder)`` -> the manifest dict or None; ``owned_files(folder, tool)`` -> the listed files.

Errors are ``OutputDirError`` (a ``MofaError``: one line on the command line) naming the flag (``flag``, default
``--out``).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from utils.errors import MofaError

try:
    import fcntl
except ImportError:  # not POSIX: builds are not locked (a stale sibling is then left for the user to delete)
    fcntl = None

MANIFEST_NAME = ".mofa_manifest.json"


class OutputDirError(MofaError):
    """An output folder holds something the tool may not replace, or cannot be written."""


def _entries(folder: Path) -> list[str]:
    """Every file (and symlink) under ``folder``, as sorted posix paths relative to it; empty folders are skipped."""
    found = []
    for top, dirs, files in os.walk(folder):
        rel = Path(top).relative_to(folder)
        found += [(rel / name).as_posix() for name in files]
        found += [(rel / name).as_posix() for name in dirs if os.path.islink(os.path.join(top, name))]
    return sorted(found)


def read_manifest(folder: str | Path) -> dict | None:
    """The manifest of ``folder`` (``{"tool": str, "files": [relative posix paths]}``), or None (none, unreadable)."""
    try:
        data = json.loads((Path(folder) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        return None
    return data


def owned_files(folder: str | Path, tool: str) -> set[str]:
    """The files that ``tool``'s manifest in ``folder`` lists (empty when there is none, or it is another tool's)."""
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("tool") != tool:
        return set()
    return {str(name) for name in manifest["files"]}


def _shown(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_target(folder: str | Path, tool: str, overwrite: bool, flag: str = "--out",
                 legacy_owned: Callable[[Path, list[str]], bool] | None = None) -> None:
    """OutputDirError (writing nothing) unless ``folder`` may receive ``tool``'s new output (see the module doc).

    legacy_owned(folder, files): True when a folder without a manifest is an older version's output of the same
    tool (the caller decides from its own records, e.g. a config file naming the generator), so ``overwrite`` may
    replace it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputDirError(f"{flag} {folder} is a file, not a folder; pass a new or empty folder")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputDirError(f"{flag} {folder}: {existing} is a file, not a folder")
    parent = folder.parent if folder.exists() else existing
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputDirError(f"{flag} {folder}: {parent} is not writable; pass another {flag}")
    if not folder.is_dir():
        return
    files = [name for name in _entries(folder) if name != MANIFEST_NAME]
    if not files:
        return
    owned = owned_files(folder, tool)
    if not owned and legacy_owned is not None and legacy_owned(folder, files):
        owned = set(files)
    foreign = [name for name in files if name not in owned]
    if foreign:
        raise OutputDirError(f"{flag} {folder} holds files that {tool} did not write ({_shown(foreign)}); "
                             f"it replaces only its own output: move them away or pass another {flag}")
    if not overwrite:
        raise OutputDirError(f"{flag} {folder} holds an earlier output of {tool} ({_shown(files)}); pass "
                             f"--overwrite to replace it, or another {flag}")


def _lock_dir(path: Path) -> int:
    """Open ``path`` and take an exclusive, non-blocking flock on it; returns the descriptor (OSError if held)."""
    fd = os.open(path, os.O_RDONLY)
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def _remove_stale(folder: Path) -> None:
    """Delete the temporary siblings of ``folder`` that no live build holds (a killed build's leftovers)."""
    for path in folder.parent.glob(f".{folder.name}.partial-*"):
        if fcntl is None:
            continue
        try:
            fd = _lock_dir(path)
        except OSError:
            continue  # a build in progress
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
    for path in folder.parent.glob(f".{folder.name}.old-*"):
        shutil.rmtree(path, ignore_errors=True)


def swap_in(new: Path, folder: Path) -> None:
    """Move the complete folder ``new`` to ``folder``, replacing it (the old one is moved aside, then deleted)."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{secrets.token_hex(4)}")
        os.rename(folder, old)
    try:
        os.rename(new, folder)
    except BaseException:
        if old is not None:
            os.rename(old, folder)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_manifest(folder: Path, tool: str, files: list[str] | None = None) -> None:
    """Write ``folder``'s manifest (atomically): ``files`` (relative posix paths; default: every file under
    ``folder``) belong to ``tool``."""
    from utils.atomic_write import atomic_write

    if files is None:
        files = [name for name in _entries(folder) if name != MANIFEST_NAME]
    with atomic_write(Path(folder) / MANIFEST_NAME, "w", encoding="utf-8") as handle:
        handle.write(json.dumps({"tool": tool, "files": sorted(set(files))}, indent=1) + "\n")


@contextmanager
def build_beside(folder: str | Path, tool: str, overwrite: bool, flag: str = "--out",
                 legacy_owned: Callable[[Path, list[str]], bool] | None = None) -> Iterator[Path]:
    """``with build_beside(out, "utils.x", args.overwrite) as new: <write into new>``: see the module doc."""
    folder = Path(folder).absolute()
    check_target(folder, tool, overwrite, flag, legacy_owned)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(folder)
        new = folder.with_name(f".{folder.name}.partial-{secrets.token_hex(4)}")
        new.mkdir()
        fd = _lock_dir(new)
    except OSError as exc:
        raise OutputDirError(f"{flag} {folder}: cannot create a folder beside it ({exc.strerror or exc})") from None
    try:
        yield new
        write_manifest(new, tool)
        swap_in(new, folder)
    except OSError as exc:
        raise OutputDirError(f"{flag} {folder}: cannot write the output ({exc.strerror or exc}); the previous "
                             "content is unchanged") from None
    finally:
        os.close(fd)
        if new.exists():
            shutil.rmtree(new, ignore_errors=True)
