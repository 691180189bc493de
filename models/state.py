"""`load_strict`: the one strict state-dict load, with the one-line message every caller gives on a mismatch.

Pretrained weights (ArcFace's ``backbone.pth``, dlib's ``.dat``, torchvision's ResNets) and the networks of a
checkpoint all load through it, so a file that does not fit its network is reported the same way everywhere: which
file (``source``), which network, and the first missing / unexpected keys or the first shape that differs.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from models.errors import MofaError, WeightsError

SHOWN_KEYS = 5
"""How many missing / unexpected keys a message lists before it only counts the rest."""


def short_keys(keys: list[str], limit: int = SHOWN_KEYS) -> str:
    """``"a, b, c (+4 more)"``: the first ``limit`` keys and how many more there are."""
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_strict(module: nn.Module, state: object, source: str, *, error: type[MofaError] = WeightsError,
                hint: str = "", skip: tuple[str, ...] = (), assign: bool = False) -> None:
    """Load ``state`` into ``module`` so that every key and shape matches, or raise ``error`` (one line).

    Args:
        module: the network (unwrap DDP first); its name in messages is its class name.
        state: what the file held (anything: a non-mapping is reported as such).
        source: what ``state`` is, for the message: ``"ArcFace weights /path/backbone.pth"``, ``"checkpoint model
            'unet'"``.
        error: the `MofaError` subclass raised (`WeightsError` by default).
        hint: appended as ``": <hint>"`` (what the user should do).
        skip: key prefixes left out on both sides (a head the caller replaces, e.g. ``("fc.",)``); those entries of
            ``module`` keep their values.
        assign: passed to ``load_state_dict`` (keep the given tensors instead of copying them: meta-device modules).
    Message: ``"<source> does not match <Network>: missing keys [..], unexpected keys [..]"``, or ``"... size
    mismatch for '<key>': (..) given, (..) expected"``, each followed by the hint.
    """
    tail = f": {hint}" if hint else ""
    if not isinstance(state, Mapping):
        raise error(f"{source} holds a {type(state).__name__}, not a state dict{tail}")
    name = type(module).__name__

    def kept(keys) -> set[str]:
        return {k for k in keys if not k.startswith(skip)} if skip else set(keys)

    reference = module.state_dict()
    expected, given = kept(reference), kept(state)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise error(f"{source} does not match {name}: missing keys [{short_keys(missing)}], unexpected keys "
                    f"[{short_keys(unexpected)}]{tail}")
    for key in sorted(expected):
        found, wanted = tuple(getattr(state[key], "shape", ())), tuple(reference[key].shape)
        if found != wanted:
            raise error(f"{source} does not match {name}: size mismatch for '{key}': {found} given, {wanted} "
                        f"expected{tail}")
    subset = {k: state[k] for k in expected} if skip else state
    try:
        module.load_state_dict(subset, strict=not skip, assign=assign)
    except RuntimeError as exc:  # e.g. a value that is not a tensor
        raise error(f"{source} does not match {name}: {' '.join(str(exc).split())}{tail}") from None


def load_weights_file(module: nn.Module, path: str | Path, source: str, *, error: type[MofaError] = WeightsError,
                      hint: str = "", skip: tuple[str, ...] = ()) -> None:
    """`torch.load` a state-dict file (``weights_only``, on the CPU) and `load_strict` it into ``module``.

    ``source`` (e.g. ``"ArcFace weights file"``), followed by the path, starts every message; ``error`` is raised
    when the file is missing, unreadable, not a state dict or does not match."""
    path = Path(path)
    tail = f": {hint}" if hint else ""
    if not path.is_file():
        raise error(f"{source} {path} not found{tail}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign files raise several types
        raise error(f"{source} {path} is unreadable as a torch state dict ({type(exc).__name__}){tail}") from None
    load_strict(module, state, f"{source} {path}", error=error, hint=hint, skip=skip)
