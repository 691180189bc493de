# ruff: noqa: E402  (the imports follow the start-up Ctrl-C handler)
"""Reconstruct one face image: occlusion mask, render, and the 3D mesh.

    python reconstruct.py --image PATH --checkpoint MoFA_UNet_Save/MoFA_UNet/final.pt --out DIR
        [--landmarks auto|CSV] [--bfm PATH] [--device auto|cpu|cuda] [--now] [--identity arcface|dlib|none]
        [--overwrite] [--fit_steps N [--fit_lr LR]]

The checkpoint is a Step-4 one (encoder + UNet); a Step-1 one works too, the mask is then the robust loss's inlier
mask (Step 2's preliminary mask). The network takes an aligned S x S face crop (S = the checkpoint's image size):
    --landmarks CSV   the image's row (by file name) of a landmark CSV; the image is aligned with it unless it is S x S;
    --landmarks auto  68 landmarks from dlib (optional extra: pip install -r requirements-landmarks.txt), then aligned;
    (none)            the image is taken as an aligned crop (resized to S x S if needed).
Writes into DIR, for an image NAME.*: NAME_input.png (the network input), NAME_composite.png (render over the
input), NAME_mask.png (1 = visible face), NAME_overlay.png (visible face tinted green, occluders inside the face red),
NAME.obj and NAME.ply (cropped mesh with expression, per-vertex albedo colours, model frame, mm).
--now also writes DIR/now/NAME.obj (the uncropped mesh, shape only, expression 0) and DIR/now/NAME.txt (the 7 NoW
landmarks; only for the real BFM2017 mesh).
With an identity network (--identity, default as in the training steps: see utils/identity.py) it also writes
NAME_identity.json: the cosine similarity of the input's and the render's identity embeddings (both aligned with the
fitted landmarks), a measure of how well the reconstruction keeps the person recognisable.
DIR must be new or empty: --overwrite replaces what reconstruct.py wrote there before, all of it (so no file of
another image, such as its NAME_identity.json, stays beside the new results), and nothing else. The results are
built beside DIR and moved in only when complete (`utils/output_dir.py`).
--fit_steps N (default 0: the feed-forward network, as the paper): test-time fitting (utils/fitting.py), N Adam
steps on the image's coefficients, starting from the encoder's prediction, with the loss the checkpoint was trained
with (a Step-1 checkpoint: Step 1's terms; a Step-4 one: Step 4's MoFA-phase terms with the UNet's mask); every
output is then that of the fitted coefficients. It needs the image's landmarks (--landmarks auto or CSV).
"""
from __future__ import annotations

if __name__ == "__main__":  # Ctrl-C while torch is imported: one line, no traceback (utils/startup.py)
    from utils.startup import quiet_interrupts
    quiet_interrupts()

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from models.face_model import FaceModel
from models.layout import CoeffLayout
from models.mofa import MoFA
from utils import cli
from utils.data.image_io import read_image_rgb, resize_image, write_image_rgb, write_mask
from utils.errors import DataError
from utils.evaluation.mesh_io import write_now_landmarks, write_obj, write_ply
from utils.evaluation.stages import FitSetting, predict_masks
from utils.evaluation.visuals import composite
from utils.fitting import add_fit_args, checkpoint_preset
from utils.identity import add_identity_args, load_identity, resolve_identity_flag
from utils.landmarks_csv import read_landmarks_csv
from utils.output_dir import build_beside, check_target, writing
from utils.prepare.detect_landmarks import align_face, detect_landmarks68, load_dlib
from utils.training.builders import FINAL_NAME, Networks, load_networks
from utils.training.flags import check_flags
from utils.training.checkpoint import CheckpointError

log = logging.getLogger("reconstruct")

TOOL = "reconstruct.py"
"""The name the --out manifest records (`utils.output_dir`)."""

# NoW-challenge landmarks (docs/method.md §2.5): full BFM2017 mesh vertex ids, valid only for that mesh.
NOW_LANDMARK_IDS = (2735, 6088, 10263, 13746, 8165, 5394, 11116)
BFM2017_N_VERTICES = 53149
VISIBLE_TINT = (0.0, 1.0, 0.0)
OCCLUDED_TINT = (1.0, 0.0, 0.0)
TINT_ALPHA = 0.4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", required=True, help="face image")
    p.add_argument("--landmarks", default=None, help="'auto' (dlib) or a landmark CSV holding the image's row")
    p.add_argument("--checkpoint", required=True, help="Step-4 (or Step-1) checkpoint, or its folder")
    p.add_argument("--out", required=True, help="output folder (new or empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what reconstruct.py wrote into --out before (other files are never deleted)")
    p.add_argument("--bfm", default=cli.RepoDefault(cli.DEFAULT_BFM),
                   help=f"face model the checkpoint was trained with (default: <repo>/{cli.DEFAULT_BFM})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:<index> (default: auto)")
    p.add_argument("--now", action="store_true", help="also export the NoW-challenge mesh and 7 landmarks")
    add_identity_args(p)
    add_fit_args(p, "the outputs")
    args = resolve_identity_flag(cli.resolve_paths(p.parse_args(argv), ("image", "bfm", "out", "checkpoint")))
    check_flags(args)  # --fit_steps, --fit_lr: one line, no work done
    if args.fit_steps and args.landmarks is None:
        raise DataError(f"--fit_steps {args.fit_steps} fits the image's landmarks too: pass --landmarks auto or CSV")
    check_target(args.out, TOOL, args.overwrite)  # a file or a used folder: one line, no work done
    return args


def _csv_landmarks(csv_path: Path, image_path: Path) -> np.ndarray:
    """The (68, 2) row of ``image_path`` in a landmark CSV, matched by relative path ending or base name."""
    rows = read_landmarks_csv(csv_path)
    target = image_path.as_posix()
    for filename, points in rows:
        if target.endswith("/" + filename.removeprefix("./")) or target == filename:
            return points
    for filename, points in rows:
        if Path(filename).name == image_path.name:
            return points
    raise DataError(f"--landmarks {csv_path}: no row for {image_path.name} (rows are matched by file name)")


def network_input(image_path: Path, landmarks: str | None, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The (S, S, 3) uint8 aligned crop the network takes (see the module docstring for --landmarks) and its (68, 2)
    landmarks in crop pixels (None without --landmarks)."""
    image = read_image_rgb(image_path)
    square = image.shape[:2] == (size, size)
    if landmarks == "auto":
        points = detect_landmarks68(image, *load_dlib())
        if points is None:
            raise DataError(f"--landmarks auto: no face found in {image_path}")
        return align_face(image, points, size)
    if landmarks is not None:
        points = _csv_landmarks(Path(landmarks), image_path)
        return (image, points.astype(np.float32)) if square else align_face(image, points, size)
    if not square:
        log.info("%s is %dx%d and no --landmarks were given: taken as an aligned face crop and resized to %dx%d "
                 "(pass --landmarks auto or CSV to align it)", image_path, image.shape[1], image.shape[0], size, size)
    return resize_image(image, size, size), None


def overlay(images: torch.Tensor, mask: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Input (B,3,H,W) with the visible face (mask) tinted green and occluded face pixels (region - mask) red."""
    def tint(colour: tuple[float, float, float]) -> torch.Tensor:
        return torch.tensor(colour, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)

    occluded = region * (1 - mask)
    out = images * (1 - TINT_ALPHA * mask) + TINT_ALPHA * mask * tint(VISIBLE_TINT)
    return (out * (1 - TINT_ALPHA * occluded) + TINT_ALPHA * occluded * tint(OCCLUDED_TINT)).clamp(0, 1)


def export_now(bfm: Path, shape: torch.Tensor, out_dir: Path, name: str) -> None:
    """The uncropped mesh (shape only, expression 0) and, for the real BFM2017, the 7 NoW landmarks."""
    full = FaceModel.from_h5(bfm, CoeffLayout(n_shape=shape.shape[1]), crop=False)
    zeros = torch.zeros(1, full.layout.n_exp)
    vertices = full.vertices(shape.detach().cpu().float(), zeros)[0]
    write_obj(out_dir / "now" / f"{name}.obj", vertices, full.faces)
    if full.n_vertices != BFM2017_N_VERTICES:
        log.warning("NoW landmarks skipped: vertex ids %s are only valid for the BFM2017 mesh (%d vertices), "
                    "%s has %d", NOW_LANDMARK_IDS, BFM2017_N_VERTICES, bfm, full.n_vertices)
        return
    write_now_landmarks(out_dir / "now" / f"{name}.txt", vertices[list(NOW_LANDMARK_IDS)])


def find_checkpoint(path: Path) -> Path:
    """``path`` itself, or ``path/final.pt`` for a folder; a clear error when it does not exist."""
    path = path / FINAL_NAME if path.is_dir() else path
    if not path.is_file():
        raise CheckpointError(f"--checkpoint {path}: not found; pass a Step-4 (or Step-1) checkpoint, "
                              f"e.g. MoFA_UNet_Save/MoFA_UNet/{FINAL_NAME}")
    return path


def load_stage_networks(args: argparse.Namespace, device: torch.device) -> Networks:
    """The checkpoint's MoFA and, when it holds one, its UNet (else None: a Step-1 checkpoint)."""
    checkpoint = find_checkpoint(args.checkpoint)
    face_model = FaceModel.from_h5(args.bfm, CoeffLayout()).to(device)
    nets = load_networks(checkpoint, face_model, device)
    if nets.unet is None:
        log.info("%s holds no UNet (a Step-1 checkpoint): the mask is the robust loss's inlier mask", checkpoint)
    return nets


def write_outputs(out_dir: Path, name: str, images: torch.Tensor, est: torch.Tensor, region: torch.Tensor,
                  out, mofa: MoFA) -> None:
    """The four images and the cropped mesh (expression included, albedo colours, model frame)."""
    mask = (est >= 0.5).to(est.dtype)
    write_image_rgb(out_dir / f"{name}_input.png", images[0])
    write_image_rgb(out_dir / f"{name}_composite.png", composite(images, out.image, out.mask)[0])
    write_mask(out_dir / f"{name}_mask.png", mask[0])
    write_image_rgb(out_dir / f"{name}_overlay.png", overlay(images, mask, region)[0])
    parts = mofa.layout.split(out.coeffs)
    model = mofa.renderer.face_model
    vertices = model.vertices(parts.shape, parts.exp)[0]
    colours = model.albedo(parts.tex)[0].clamp(0, 1)
    write_obj(out_dir / f"{name}.obj", vertices, model.faces, colours)
    write_ply(out_dir / f"{name}.ply", vertices, model.faces, colours)


def identity_score(identity, images: torch.Tensor, out) -> float:
    """Cosine similarity (1 = same embedding) between the identity embeddings of the input and of the render, both
    aligned with the fitted landmarks (the term Steps 1 and 4 minimise is 1 minus this)."""
    return float(torch.nn.functional.cosine_similarity(identity(images, out.landmarks),
                                                       identity(out.image, out.landmarks), dim=1)[0])


def reconstruct(args: argparse.Namespace) -> int:
    device = cli.resolve_device(args.device)
    nets = load_stage_networks(args, device)
    mofa, unet, size = nets.mofa, nets.unet, nets.spec["image_size"]
    crop, points = network_input(args.image, args.landmarks, size)
    images = torch.from_numpy(crop).permute(2, 0, 1).float().div(255.0)[None].to(device)
    fit = FitSetting(args.fit_steps, args.fit_lr, checkpoint_preset(nets.mofa_payload)) if args.fit_steps else None
    landmarks = None if points is None else torch.from_numpy(points)[None].float().to(device)
    est, region, out = predict_masks("step2" if unet is None else "step4", mofa, unet, images, fit=fit,
                                     landmarks=landmarks)
    if fit is not None:
        log.info("test-time fitting: %d steps (lr %g)", args.fit_steps, args.fit_lr)
    name = args.image.stem
    identity = load_identity(args, device)
    score = None if identity is None else identity_score(identity, images, out)
    with build_beside(args.out, TOOL, args.overwrite) as folder, writing(f"the results in {args.out}"):
        write_outputs(folder, name, images, est, region, out, mofa)
        if args.now:
            export_now(args.bfm, mofa.layout.split(out.coeffs).shape, folder, name)
        if score is not None:
            (folder / f"{name}_identity.json").write_text(json.dumps(
                {"identity": args.identity, "cosine_input_vs_render": round(score, 6)}, indent=2) + "\n")
    if score is not None:
        log.info("identity (%s): cosine similarity of input and render %.3f", args.identity, score)
    log.info("wrote %s_{input,composite,mask,overlay}.png, %s.obj and %s.ply to %s", name, name, name, args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    with torch.no_grad():
        return reconstruct(parse_args(argv))


if __name__ == "__main__":
    cli.cli_main(main)
