"""Build the networks of a step from flags, and rebuild them from a previous step's checkpoint.

A checkpoint's ``extra["model"]`` (written by ``model_spec``) records everything needed to rebuild the networks
from the file alone: encoder architecture, image size, camera preset, coefficient layout, UNet width and the face
model's identity, which is checked against the ``--bfm`` file given now.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from models.camera import CameraConfig
from models.encoder import build_encoder
from models.face_model import FaceModel
from models.layout import CoeffLayout
from models.mofa import MoFA
from models.renderer import FaceRenderer
from models.unet import UNet
from utils.training.checkpoint import (
    LATEST_NAME,
    CheckpointError,
    CheckpointWriteError,
    load_checkpoint,
    load_model_state,
    publish,
)

log = logging.getLogger(__name__)

STEP_DIRS = {1: "pretrain_mofa", 2: "UNet_trainset", 3: "Pretrain_UNet", 4: "MoFA_UNet"}
STEP_SCRIPTS = {1: "Step1_Pretrain_MoFA.py", 2: "Step2_UNet_trainset_generation.py", 3: "Step3_Pretrain_Unet.py",
                4: "Step4_UNet_MoFA_EM.py"}
FINAL_NAME = "final.pt"
# The flag that sets each entry of a model spec (what a user changes to get a different network).
SPEC_FLAGS = {"encoder": "--encoder", "image_size": "--image_size", "camera": "--camera",
              "layout": "the coefficient layout", "unet_width": "--unet_width", "face_model": "--bfm"}
MOFA_SPEC_KEYS = ("encoder", "image_size", "camera", "layout", "face_model")


def step_dir(save_root: str | Path, step: int) -> Path:
    return Path(save_root) / STEP_DIRS[step]


def model_spec(args, face_model: FaceModel, layout: CoeffLayout) -> dict:
    """The constructor arguments of the networks, stored in every checkpoint."""
    return {"encoder": args.encoder, "image_size": int(args.image_size), "camera": args.camera,
            "layout": {"n_shape": layout.n_shape, "n_exp": layout.n_exp, "n_tex": layout.n_tex},
            "unet_width": int(getattr(args, "unet_width", 64)), "face_model": face_model.config()}


def build_renderer(spec: dict, face_model: FaceModel) -> FaceRenderer:
    camera = CameraConfig.preset(spec["camera"]).resized(spec["image_size"])
    return FaceRenderer(face_model, camera, CoeffLayout(**spec["layout"]))


def build_mofa(spec: dict, face_model: FaceModel, encoder_weights: str | None = None,
               restoring: bool = False) -> MoFA:
    """A fresh MoFA; ``restoring=True`` when trained weights are loaded next (no random-init log line)."""
    encoder = build_encoder(CoeffLayout(**spec["layout"]), spec["encoder"], encoder_weights, restoring=restoring)
    return MoFA(encoder, build_renderer(spec, face_model))


def build_unet(spec: dict) -> UNet:
    return UNet(in_ch=6, out_ch=1, base=spec["unet_width"])


def previous_checkpoint(explicit: str | None, save_root: str | Path, step: int) -> Path:
    """The checkpoint a step starts from: the explicit flag, else Step ``step``'s ``final.pt`` under --save_root."""
    if explicit:
        path = Path(explicit)
        if path.is_dir():
            path = path / FINAL_NAME
    else:
        path = step_dir(save_root, step) / FINAL_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} not found: run {STEP_SCRIPTS[step]} first (with the same --save_root), "
                              "or pass the checkpoint path explicitly")
    return path


def load_spec_checkpoint(path: Path, face_model: FaceModel, device: torch.device) -> tuple[dict, dict]:
    """Load a checkpoint and check it was made with ``face_model``; returns (payload, model spec)."""
    payload = load_checkpoint(path, map_location=device)
    spec = (payload.get("extra") or {}).get("model")
    if spec is None:
        raise CheckpointError(f"{path} has no model description: it was not written by this project's steps")
    if any(key not in spec for key in MOFA_SPEC_KEYS) or "encoder" not in payload.get("models", {}):
        raise CheckpointError(f"{path} holds no MoFA encoder (it holds: {', '.join(sorted(payload.get('models', {})))})"
                              f": pass a Step-1 ({STEP_DIRS[1]}/) or Step-4 ({STEP_DIRS[4]}/) checkpoint")
    theirs, ours = spec["face_model"], face_model.config()
    if theirs != ours:
        raise CheckpointError(f"{path} was trained with another face model ({_describe(theirs)}) than --bfm "
                              f"({_describe(ours)}): pass the --bfm file the previous step used")
    return payload, spec


def load_weights(module: torch.nn.Module, payload: dict, name: str, path: Path) -> None:
    """Load ``payload['models'][name]`` strictly into ``module``; one clear error naming the file on mismatch."""
    state = payload.get("models", {}).get(name)
    if state is None:
        raise CheckpointError(f"{path} holds no '{name}' weights (it has: {sorted(payload.get('models', {}))})")
    try:
        load_model_state(module, state, name)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def load_mofa(path: Path, face_model: FaceModel, device: torch.device) -> tuple[MoFA, dict, dict]:
    """MoFA (eval) with the checkpoint's "encoder" weights; returns (mofa, payload, spec). Checks the face model."""
    payload, spec = load_spec_checkpoint(path, face_model, device)
    mofa = build_mofa(spec, face_model, restoring=True).to(device).eval()
    load_weights(mofa.encoder, payload, "encoder", path)
    return mofa, payload, spec


def load_unet(payload: dict, width: int, path: Path, device: torch.device) -> UNet:
    """UNet (eval) of base width ``width`` with the checkpoint's "unet" weights."""
    unet = build_unet({"unet_width": int(width)}).to(device).eval()
    load_weights(unet, payload, "unet", path)
    return unet


@dataclass(frozen=True)
class Networks:
    """The networks of a stage, in eval mode, with where they came from (`load_networks`).

    spec: the MoFA checkpoint's model spec, with ``unet_width`` of the UNet loaded (when one is).
    mofa_payload: the MoFA checkpoint's payload (Step 4 reads Step 1's learning-rate schedule from it).
    """

    mofa: MoFA
    unet: UNet | None
    spec: dict
    mofa_path: Path
    mofa_payload: dict
    unet_path: Path | None

    def announce(self, args, mofa_source: str = "the checkpoint", unet_source: str = "the checkpoint") -> None:
        """`announce_spec` for both files: one warning per flag of ``args`` that the checkpoints override."""
        mofa_spec = {k: v for k, v in self.spec.items() if k != "unet_width"}
        announce_spec(args, mofa_spec, f"{mofa_source} {self.mofa_path}")
        if self.unet is not None:
            announce_spec(args, {"unet_width": self.spec["unet_width"]}, f"{unet_source} {self.unet_path}")


def load_networks(mofa_path: Path, face_model: FaceModel, device: torch.device, unet_path: Path | None = None,
                  unet: bool | None = None) -> Networks:
    """The one loader of trained networks: MoFA from ``mofa_path`` and a UNet, in eval mode on ``device``.

    unet_path None: the UNet is the MoFA checkpoint's own (a Step-4 file holds "encoder" and "unet"); a path: the
    UNet of that checkpoint, whose width its ``extra["model"]["unet_width"]`` records (a Step-3 file).
    unet: True requires a UNet, False loads none, None loads one when the file holds one (a Step-1 file holds none).
    Step 4 (Step-1 MoFA + Step-3 UNet): ``load_networks(step1_path, fm, dev, unet_path=step3_path, unet=True)``;
    the evaluation's stages and reconstruct.py call it too. Raises CheckpointError (missing weights, another face
    model, a file that is no step's).
    """
    mofa, payload, spec = load_mofa(Path(mofa_path), face_model, device)
    if unet is False:
        return Networks(mofa, None, spec, Path(mofa_path), payload, None)
    source, upayload = (Path(mofa_path), payload) if unet_path is None else (
        Path(unet_path), load_checkpoint(unet_path, map_location=device))
    width = spec.get("unet_width") if unet_path is None else ((upayload.get("extra") or {}).get("model") or {}).get(
        "unet_width")
    if "unet" not in upayload.get("models", {}) or width is None:
        if unet is None and unet_path is None:
            return Networks(mofa, None, spec, Path(mofa_path), payload, None)
        expected = f"a Step-3 ({STEP_DIRS[3]}/)" if unet_path is not None else f"a Step-4 ({STEP_DIRS[4]}/)"
        raise CheckpointError(f"{source} holds no UNet: pass {expected} checkpoint")
    return Networks(mofa, load_unet(upayload, int(width), source, device), {**spec, "unet_width": int(width)},
                    Path(mofa_path), payload, source)


def spec_mismatches(theirs: dict, ours: dict) -> list[str]:
    """One phrase per network setting that differs between a checkpoint's spec and this run's, naming the flag."""
    out = []
    for key in sorted(set(theirs) | set(ours)):
        if theirs.get(key) == ours.get(key):
            continue
        flag = SPEC_FLAGS.get(key, key)
        if key == "face_model":
            out.append(f"{flag} gives another face model ({_describe(ours.get(key) or {})}; the checkpoint's: "
                       f"{_describe(theirs.get(key) or {})})")
        else:
            out.append(f"{flag} {ours.get(key)} (the checkpoint's: {theirs.get(key)})")
    return out


def announce_spec(args, spec: dict, source: str) -> None:
    """Warn, one line per flag, where a flag of this run differs from what ``source`` (e.g. "the Step-1 checkpoint
    X") fixes: ``--image_size 224 is ignored: using 64 from the Step-1 checkpoint X``."""
    for key in ("encoder", "image_size", "camera", "unet_width"):
        given = getattr(args, key, None)
        if given is not None and key in spec and given != spec[key]:
            log.warning("%s %s is ignored: using %s from %s", SPEC_FLAGS[key], given, spec[key], source)


def mark_final(out_dir: Path) -> Path:
    """Publish ``latest.pt`` as ``final.pt`` (a hard link, atomically): the file the next step reads by default."""
    src, dst = Path(out_dir) / LATEST_NAME, Path(out_dir) / FINAL_NAME
    try:
        return publish(src, dst)
    except OSError as exc:
        raise CheckpointWriteError(f"cannot write {dst} ({exc.strerror or exc}): {src} holds the same state; "
                                   f"copy it to {dst.name}") from None


def _describe(cfg: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(cfg.items()))
