"""One rule for every tool that writes a folder of results: refuse, build beside, swap in, own by manifest.

Used by ``detect_landmarks``, ``faces``, the evaluation command and ``reconstruct.py``; Step 2 (which writes into its
run folder in place) uses the same manifest through ``write_manifest`` / ``owned_files``.

* ``check_target(folder, tool, overwrite)`` (writes nothing): a missing or empty folder is fine; a folder holding
  any file that ``tool`` did not write there (its manifest, ``MANIFEST_NAME``, a JSON file ``{"tool", "files"}``
  written last, does not list it) is refused, with or without ``overwrite``; one holding only ``tool``'s earlier
  output is replaced with ``overwrite`` and refused without. File names never prove ownership: a user's
  ``00000.png`` beside a generated set is refused, not deleted. A symlink to a folder is followed (the output goes
  where it points; the link stays).
* ``build_beside(folder, tool, overwrite)`` is a context manager around the writing: it runs ``check_target``, then
  yields a new temporary sibling folder (``.<name>.partial-<random>``, locked with ``flock`` while it is built) to
  write into. When the block ends normally it writes the manifest (every file under the new folder) and swaps the
  new folder in (``swap_in``: ``os.rename`` of the old folder aside, of the new one into place, then the old one is
  deleted; a folder that cannot be renamed, such as a mount point, is emptied, after checking again that it holds
  only ``tool``'s files, and filled in place, the manifest last). On any exception, Ctrl-C included, the new folder is
  deleted and the old one is untouched: a reader sees the old output or the complete new one, never a mix.
  Temporary siblings left by a killed process (unlocked) are deleted by the next build.
* ``writing(what)`` turns a write failure inside its block into one ``OutputWriteError`` line, whatever the library
  raised (a full disk is ``OSError`` from Python and numpy, ``RuntimeError`` from ``torch.save``); ``build_beside``
  adds that the old folder was left as it was. An ``OSError`` of the block outside ``writing`` is one line too.
* ``read_manifest(folder)`` -> the manifest dict or None; ``owned_files(folder, tool)`` -> the listed files;
  ``write_manifest(folder, tool, files)``.

Errors are ``OutputDirError`` (a ``MofaError``: one line on the command line) naming the flag (``flag``, default
``--out``); write failures are its subclass ``OutputWriteError``.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from utils.errors import MofaError

try:
    import fcntl
except ImportError:  # not POSIX: builds are not locked (a stale sibling is then left for the user to delete)
    fcntl = None

MANIFEST_NAME = ".mofa_manifest.json"


class OutputDirError(MofaError):
    """An output folder holds something the tool may not replace, or cannot be written."""


class OutputWriteError(OutputDirError):
    """The output could not be written (full disk, no permission, ...); the old folder was left as it was."""


def _reason(exc: BaseException) -> str:
    """The first line of what went wrong (``strerror`` of an OSError, else the message, else the type)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def writing(what: str | Path) -> Iterator[None]:
    """Turn a write failure inside the block into one `OutputWriteError` line naming ``what``, whatever the library
    raised: Python's OSError, torch's or numpy's RuntimeError on a full disk."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        raise OutputWriteError(f"cannot write {what}: {_reason(exc)}") from None


def _raise(exc: OSError) -> None:
    raise exc


def _entries(folder: Path) -> list[str]:
    """Every file (and symlink) under ``folder``, as sorted posix paths relative to it; empty folders are skipped.
    OSError when a folder cannot be read."""
    found = []
    for top, dirs, files in os.walk(folder, onerror=_raise):
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


def _target(folder: str | Path) -> Path:
    """``folder`` as an absolute path; a symlink to a folder is followed (the output goes where it points)."""
    folder = Path(folder)
    if folder.is_symlink() and folder.is_dir():
        folder = folder.resolve()
    return folder.absolute()


def check_target(folder: str | Path, tool: str, overwrite: bool, flag: str = "--out",
                 legacy_owned: Callable[[Path, list[str]], bool] | None = None) -> None:
    """OutputDirError (writing nothing) unless ``folder`` may receive ``tool``'s new output (see the module doc).

    legacy_owned(folder, files): True when a folder without a manifest is an older version's output of the same
    tool (the caller decides from its own records, e.g. a config file naming the generator), so ``overwrite`` may
    replace it."""
    folder = _target(folder)
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
    try:
        files = [name for name in _entries(folder) if name != MANIFEST_NAME]
    except OSError as exc:
        raise OutputDirError(f"{flag} {folder}: cannot read it ({_reason(exc)})") from None
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
        raise OutputDirError(f"{flag} {folder} is not empty: it holds an earlier output of {tool} ({_shown(files)}); "
                             f"pass --overwrite to replace it, or another {flag}")


def flock_or_close(fd: int) -> None:
    """Take an exclusive, non-blocking flock on the open descriptor ``fd``; when another process holds it, close
    ``fd`` and raise OSError. Without fcntl (not POSIX) nothing is locked. The one flock helper: output folders
    here and training run folders (utils/training/run_folder.py) both lock through it."""
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise


def _lock_dir(path: Path) -> int:
    """Open ``path`` and lock it (flock_or_close); returns the descriptor (OSError if held)."""
    fd = os.open(path, os.O_RDONLY)
    flock_or_close(fd)
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


def _fill_in_place(new: Path, folder: Path, recheck: Callable[[], None] | None) -> None:
    """Empty ``folder`` (after ``recheck()``, which raises if it now holds a file that is not the tool's) and move
    ``new``'s entries into it, the manifest last: an interrupted move leaves no manifest, so nothing half-written is
    taken for complete output."""
    if recheck is not None:
        recheck()
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    for entry in list(folder.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    for entry in sorted(new.iterdir(), key=lambda path: path.name == MANIFEST_NAME):
        shutil.move(str(entry), str(folder / entry.name))
    new.rmdir()


def swap_in(new: Path, folder: Path, recheck: Callable[[], None] | None = None) -> None:
    """Move the complete folder ``new`` to ``folder``, replacing it (the old one is moved aside, then deleted). A
    ``folder`` that cannot be renamed (a mount point: EBUSY) is emptied and filled in place (`_fill_in_place`).
    ``recheck`` runs first: what arrived in ``folder`` while ``new`` was built (another run's output, a user's
    file) is refused then, not replaced."""
    if recheck is not None:
        recheck()
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{secrets.token_hex(4)}")
        try:
            os.rename(folder, old)
        except OSError:
            _fill_in_place(new, folder, recheck)
            return
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
    folder = _target(folder)
    check_target(folder, tool, overwrite, flag, legacy_owned)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(folder)
        new = folder.with_name(f".{folder.name}.partial-{secrets.token_hex(4)}")
        new.mkdir()
        fd = _lock_dir(new)
    except OSError as exc:
        raise OutputWriteError(f"{flag} {folder}: cannot create a folder beside it ({_reason(exc)})") from None
    try:
        yield new
        with writing(f"{flag} {folder}"):
            write_manifest(new, tool)
            swap_in(new, folder, lambda: check_target(folder, tool, overwrite, flag, legacy_owned))
    except OutputWriteError as exc:
        raise OutputWriteError(f"{exc}; {flag} {folder} was left as it was") from None
    except OSError as exc:
        raise OutputWriteError(f"cannot write {flag} {folder}: {_reason(exc)}; it was left as it was") from None
    finally:
        os.close(fd)
        if new.exists():
            shutil.rmtree(new, ignore_errors=True)
