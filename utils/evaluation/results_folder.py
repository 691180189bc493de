"""The output folder of the evaluation and reconstruct.py: never mixed with the user's files, replaced whole.

Rules (issue 21, the steps' rule for every tool that writes):
* ``--out`` that is a file, or a non-empty folder without ``--overwrite``, is refused with one line, before any work;
* what a tool wrote is recognised by the manifest it writes last (``MANIFEST_NAME``: the tool and its files), not
  by file names; ``--overwrite`` replaces a folder that holds only what the same tool wrote (any other file, or
  no manifest, is refused: the user's files are never deleted);
* the new output is built in a sibling folder ``.<name>.partial-<random>`` and swapped in only when complete (the
  old folder moves aside, the new one takes its name, the old one is deleted), so a failure half-way leaves the old
  results as they were and no partial file under ``--out``;
* a write failure is one line (`ResultsWriteError` from `writing`), whatever the library raises (a full disk gives
  ``OSError`` from Python and numpy, ``RuntimeError`` from torch; the image writers' ``DataError`` is one line too).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from utils.errors import DataError, MofaError

MANIFEST_NAME = ".mofa_results.json"


class ResultsWriteError(MofaError):
    """The results could not be written (full disk, no permission, ...); --out was left as it was."""


def _files(folder: Path) -> list[str]:
    """Every file and link under ``folder``, as sorted posix paths relative to it (empty folders are not listed)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir() or p.is_symlink())


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def writing(what: str | Path) -> Iterator[None]:
    """Turn a write failure inside the block into one `ResultsWriteError` line naming ``what``, whatever the library
    raised: Python's OSError, torch's or numpy's RuntimeError on a full disk."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        raise ResultsWriteError(f"cannot write {what}: {_reason(exc)}") from None


class ResultsFolder:
    """``--out`` of ``tool``, checked at construction (before any work): `building` yields the folder to write."""

    def __init__(self, out: str | Path, tool: str, overwrite: bool = False) -> None:
        self.out, self.tool, self.overwrite = Path(out), tool, overwrite
        if self.out.is_symlink() and self.out.is_dir():
            self.out = self.out.resolve()  # results go where the link points, the link stays
        if self.out.exists() and not self.out.is_dir():
            raise DataError(f"--out {self.out} is a file: pass a folder (new or empty) for the results")
        try:
            used = self.out.is_dir() and any(self.out.iterdir())
        except OSError as exc:
            raise DataError(f"--out {self.out}: cannot read it ({_reason(exc)})") from None
        if used:
            if not overwrite:
                raise DataError(f"--out {self.out} is not empty: choose a new or empty folder, or pass --overwrite "
                                f"to replace the results {tool} wrote there")
            self._check_own()

    def _check_own(self) -> None:
        manifest = self.out / MANIFEST_NAME
        try:
            recorded = json.loads(manifest.read_text(encoding="utf-8"))
            own = set(recorded["files"]) if recorded.get("tool") == self.tool else None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            own = None
        if own is None:
            raise DataError(f"--out {self.out} holds files that {self.tool} did not write (no {MANIFEST_NAME} of "
                            f"{self.tool}): --overwrite replaces only its own results; choose another folder")
        foreign = [name for name in _files(self.out) if name != MANIFEST_NAME and name not in own]
        if foreign:
            shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
            raise DataError(f"--out {self.out} holds files that {self.tool} did not write ({shown}): --overwrite "
                            "replaces only its own results; move them or choose another folder")

    @contextmanager
    def building(self) -> Iterator[Path]:
        """``with folder.building() as tmp:`` write everything into ``tmp`` (through `writing`); on success the
        manifest is written and ``tmp`` replaces ``--out``. On any error ``tmp`` is deleted, ``--out`` is left as it
        was, and the error goes on (a `ResultsWriteError` says so)."""
        parent = self.out.parent
        tmp = parent / f".{self.out.name}.partial-{secrets.token_hex(4)}"
        with writing(f"the results folder beside {self.out}"):
            parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        try:
            yield tmp
            with writing(self.out):
                manifest = {"tool": self.tool, "files": _files(tmp)}
                (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
                self._swap(tmp)
        except ResultsWriteError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ResultsWriteError(f"{exc}; --out {self.out} was left as it was") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _swap(self, tmp: Path) -> None:
        if not self.out.exists():
            os.rename(tmp, self.out)
            return
        old = self.out.parent / f".{self.out.name}.old-{secrets.token_hex(4)}"
        try:
            os.rename(self.out, old)
        except OSError:  # a mount point (EBUSY) or a folder that may not be renamed: replace its entries instead
            self._replace_entries(tmp)
            return
        try:
            os.rename(tmp, self.out)
        except OSError:
            os.rename(old, self.out)
            raise
        shutil.rmtree(old, ignore_errors=True)

    def _replace_entries(self, tmp: Path) -> None:
        """Fill ``--out`` in place: delete the old results (checked again: still only this tool's), then move the new
        entries in, the manifest last (an interrupted move leaves no manifest, so nothing is taken for complete)."""
        if any(self.out.iterdir()):
            self._check_own()
            (self.out / MANIFEST_NAME).unlink()
            for entry in list(self.out.iterdir()):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        for entry in sorted(tmp.iterdir(), key=lambda p: p.name == MANIFEST_NAME):
            shutil.move(str(entry), str(self.out / entry.name))
        tmp.rmdir()
