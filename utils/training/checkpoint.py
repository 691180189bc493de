"""Self-describing, atomically written training checkpoints (state dicts only, never pickled modules).

A checkpoint is one ``torch.save``d dict:
    {"format": "mofa-ckpt-v1", "step": int, "models": {name: state_dict}, "optimizers": {name: state_dict},
     "optimizer_classes": {name: class name, e.g. "Adadelta"} (checked on restore; absent in older files),
     "schedulers": {name: state_dict}, "config": dict (JSON-able, the resolved run config),
     "rng": {"torch", "cuda", "numpy", "python"}, "extra": dict or None}
It contains only tensors and plain Python values, so it is loaded with ``torch.load(weights_only=True)``.
Every file is written to a temporary file in the same directory, fsynced, then moved into place with
``os.replace``: a crash mid-write leaves the previous file intact. ``latest.pt`` and ``final.pt`` are hard links to
the step checkpoint they name (a copy only where the file system has no hard links), published the same way, so they
cost no space and no write; a pruned ``ckpt_*.pt`` leaves them intact. Every file gets the mode ``open()`` gives
(0666 less the umask), like the logs and images beside them.
"""
from __future__ import annotations

import dataclasses
import json
import random
import os
import re
import shutil
from argparse import Namespace
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from models.state import load_strict
from utils.atomic_write import atomic_copy, atomic_write, temp_name
from utils.errors import MofaError

FORMAT = "mofa-ckpt-v1"
LATEST_NAME = "latest.pt"
CONFIG_NAME = "config.json"
_CKPT_RE = re.compile(r"^ckpt_(\d+)\.pt$")


class CheckpointError(MofaError):
    """A checkpoint is missing, unreadable, of another format, or does not fit the networks."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, folder unwritable); the files written before are intact."""


def _reject_modules(obj: Any, where: str = "payload") -> None:
    if isinstance(obj, nn.Module):
        raise TypeError(f"save_checkpoint: {where} is an nn.Module; save its state_dict() instead")
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            _reject_modules(value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _reject_modules(value, f"{where}[{i}]")


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically (temp file in the same directory, fsync, os.replace)."""
    _reject_modules(payload)
    with atomic_write(path) as f:
        torch.save(payload, f)


def config_to_dict(config: Any) -> dict:
    """A JSON-able dict from a dict, dataclass or argparse Namespace (paths and other objects become str)."""
    if config is None:
        return {}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    elif isinstance(config, Namespace):
        config = vars(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict, dataclass or Namespace, got {type(config).__name__}")
    return json.loads(json.dumps(dict(config), default=str))


def _unwrap(model: nn.Module) -> nn.Module:
    """The wrapped module of DistributedDataParallel / DataParallel, else the model itself."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def rng_state() -> dict:
    """Current states of torch (CPU and every CUDA device), numpy and Python ``random``, as plain values."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }


def set_rng_state(state: Mapping) -> None:
    """Restore states saved by ``rng_state``; CUDA states are restored for the devices present."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda[:n]])
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].cpu().numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_training_state(directory: str | Path, step: int, models: Mapping[str, nn.Module],
                        optimizers: Mapping[str, Any] | None = None, schedulers: Mapping[str, Any] | None = None,
                        config: Any = None, extra: dict | None = None, keep_latest: bool = True,
                        keep: int = 0) -> Path:
    """Write ``ckpt_{step:06d}.pt`` (and ``latest.pt`` if keep_latest) plus ``config.json`` into ``directory``.

    models: name -> module (DDP wrappers are unwrapped); optimizers / schedulers: name -> object with
    ``state_dict()``. keep: keep the ``keep`` newest ``ckpt_*.pt`` and delete older ones (0 keeps all; latest.pt
    and final.pt are never deleted). Call it on the main process only. Returns the path of the step checkpoint.
    Raises CheckpointWriteError (one line) when the disk is full or the folder unwritable: a file that could not be
    written is left as it was, so the previous checkpoint and latest.pt stay loadable.
    """
    directory = Path(directory)
    cfg = config_to_dict(config)
    payload = {
        "format": FORMAT,
        "step": int(step),
        "models": {name: _unwrap(m).state_dict() for name, m in models.items()},
        "optimizers": {name: o.state_dict() for name, o in (optimizers or {}).items()},
        "optimizer_classes": {name: type(o).__name__ for name, o in (optimizers or {}).items()},
        "schedulers": {name: s.state_dict() for name, s in (schedulers or {}).items()},
        "config": cfg,
        "rng": rng_state(),
        "extra": extra,
    }
    path = directory / f"ckpt_{int(step):06d}.pt"
    _reject_modules(payload)
    stage = "checkpoint"
    try:
        save_checkpoint(path, payload)
        stage = "latest"
        if keep_latest:
            publish(path, directory / LATEST_NAME)
        stage = "config"
        with atomic_write(directory / CONFIG_NAME, "w") as f:
            f.write(json.dumps(cfg, indent=2) + "\n")
    except Exception as exc:  # a full disk is OSError from Python, RuntimeError from torch.save's zip writer
        reason = write_failure(exc, directory)
        if stage == "checkpoint":
            raise CheckpointWriteError(f"cannot write checkpoint {path} ({reason}): the checkpoint written before it "
                                       f"and {LATEST_NAME} are unchanged") from None
        if stage == "latest":
            raise CheckpointWriteError(f"wrote {path} but cannot update {LATEST_NAME} ({reason}): it still names the "
                                       "checkpoint written before") from None
        raise CheckpointWriteError(f"wrote {path} and {LATEST_NAME} but cannot write {CONFIG_NAME} ({reason})") \
            from None
    if keep > 0:
        prune_checkpoints(directory, keep)
    return path


def write_failure(exc: BaseException, where: str | Path) -> str:
    """Why a write into the folder ``where`` failed, in a few words, whatever the exception type: ``strerror`` of an
    OSError, else the first line of the message (torch.save reports a full disk as ``RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos``), plus the free space when the disk is (nearly) full."""
    text = getattr(exc, "strerror", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = re.sub(r"^\[enforce fail at [^\]]*\]\s*", "", text)
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return text
    return f"{text}; {free / 2 ** 20:.1f} MiB free there" if free < 2 ** 30 else text


def publish(src: Path, dst: Path) -> Path:
    """Make ``dst`` name the same file as ``src`` atomically: a hard link moved over ``dst`` with ``os.replace``
    (no second copy; files are never modified in place, so sharing them is safe), or an atomic copy where the file
    system cannot link. Returns ``dst``."""
    src, dst = Path(src), Path(dst)
    tmp = temp_name(dst)
    try:
        os.link(src, tmp)
    except (OSError, NotImplementedError, AttributeError):  # FAT, some network file systems, no link support
        atomic_copy(src, dst)
        return dst
    try:
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst


def checkpoint_steps(directory: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``ckpt_*.pt`` in ``directory``, ascending."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _CKPT_RE.match(p.name)) and p.is_file())


def prune_checkpoints(directory: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest ``ckpt_*.pt``; latest.pt and final.pt are other names, never deleted."""
    old = [p for _, p in checkpoint_steps(directory)][:-keep] if keep > 0 else []
    for path in old:
        path.unlink(missing_ok=True)
    return old


def remove_orphans(directory: str | Path) -> list[Path]:
    """Delete the temporary files (``*.tmp``) that a killed process left in ``directory``; returns them."""
    directory = Path(directory)
    found = [p for p in directory.iterdir() if p.name.endswith(".tmp") and p.is_file()] if directory.is_dir() else []
    for path in found:
        path.unlink(missing_ok=True)
    return found


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", hint: str | None = None) -> dict:
    """Load and validate a checkpoint written by ``save_checkpoint`` / ``save_training_state``.

    hint: what the user should do if the file is missing (e.g. "run Step1_Pretrain_MoFA.py first").
    Raises CheckpointError naming the file when it is missing, unreadable or not a mofa-ckpt-v1 checkpoint.
    """
    path = Path(path)
    todo = hint or "check the path, or run the step that writes it"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: {todo}")
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read ({exc.strerror or exc}): {todo}") from None
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip archive, or its legacy pickle format
        raise CheckpointError(f"{path} is corrupt or not a PyTorch checkpoint at all (it starts with {head!r}): pass "
                              f"a checkpoint written by this project's steps{_intact_beside(path)}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated / foreign files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc):  # never follow torch's advice to load with weights_only=False
            reason = "it holds Python objects other than tensors and plain values, which this project never writes"
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({reason}){_intact_beside(path)}: "
                              f"{todo}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint (format: {found!r}): pass a checkpoint "
                              "written by this project's steps")
    return payload


def _intact_beside(path: Path) -> str:
    """``"; <file> beside it loads ..."`` naming the newest checkpoint in ``path``'s folder that is another file and
    loads, with what to do to resume from it; "" when there is none."""
    try:
        inode = path.stat().st_ino
        candidates = [p for _, p in reversed(checkpoint_steps(path.parent)) if p.stat().st_ino != inode]
    except OSError:
        return ""
    for other in candidates:
        try:
            payload = torch.load(other, map_location="cpu", weights_only=True)
        except Exception:
            continue
        if isinstance(payload, dict) and payload.get("format") == FORMAT:
            todo = f": copy it to {LATEST_NAME} to resume from there" if path.name == LATEST_NAME else ""
            return f"; {other.name} beside it (step {payload.get('step')}) is intact{todo}"
    return ""


def load_model_state(model: nn.Module, state: Mapping[str, torch.Tensor], name: str) -> None:
    """Load ``state`` into ``model`` (DDP unwrapped) strictly (`models.state.load_strict`); CheckpointError on any
    mismatch."""
    load_strict(_unwrap(model), state, f"checkpoint model '{name}'", error=CheckpointError)


def _section(payload: dict, key: str, name: str) -> Any:
    section = payload.get(key) or {}
    if name not in section:
        raise CheckpointError(f"checkpoint has no {key[:-1]} '{name}' (it has: {sorted(section)})")
    return section[name]


def restore_training_state(payload: dict, models: Mapping[str, nn.Module],
                           optimizers: Mapping[str, Any] | None = None, schedulers: Mapping[str, Any] | None = None,
                           restore_rng: bool = True) -> int:
    """Load the named models (strictly), optimizers and schedulers from ``payload``; optionally the RNG states.

    Returns the checkpoint's step. Raises CheckpointError naming the model/optimizer on any mismatch.
    """
    for name, model in models.items():
        load_model_state(model, _section(payload, "models", name), name)
    for name, opt in (optimizers or {}).items():
        saved = _section(payload, "optimizers", name)
        theirs = (payload.get("optimizer_classes") or {}).get(name)
        if theirs is not None and theirs != type(opt).__name__:
            raise CheckpointError(f"optimizer '{name}' differs: the checkpoint was trained with {theirs}, this run "
                                  f"builds {type(opt).__name__}; pass the --optimizer the run was started with")
        try:
            opt.load_state_dict(saved)
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"optimizer '{name}' does not match the checkpoint: {exc}") from None
    for name, sched in (schedulers or {}).items():
        sched.load_state_dict(_section(payload, "schedulers", name))
    if restore_rng and payload.get("rng"):
        set_rng_state(payload["rng"])
    return int(payload["step"])


def find_latest(directory: str | Path) -> Path | None:
    """``latest.pt`` in ``directory`` (the last checkpoint written); else the highest-step ``ckpt_*.pt`` (a run
    killed between the two writes); else None."""
    directory = Path(directory)
    latest = directory / LATEST_NAME
    if latest.is_file():
        return latest
    steps = checkpoint_steps(directory)
    return steps[-1][1] if steps else None
