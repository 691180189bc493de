"""Reconstruction errors on the synthetic benchmark, against the true coefficients of ``ground_truth.csv``.

The 2-D landmark error in pixels of the network image against the render of the true coefficients (noise-free; the
split CSV's landmarks when those are missing), for all / visible / occluded points (``visible_landmarks``), and the
per-vertex error in mm of the NEUTRAL shape (shape coefficients only, expression 0) against the true one, after a
rigid alignment.
"""
from __future__ import annotations

import math

import torch

from models.camera import CameraConfig
from models.mofa import MoFA
from utils.data.benchmark_files import GroundTruthTable
from utils.evaluation.metrics import landmark_error, vertex_error_mm

RECON_NAMES = ("landmark_px", "landmark_px_visible", "landmark_px_occluded", "vertex_mm")


def _stack_or_none(items: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(stacked values with zeros for the missing, (B,) bool present) or None when nothing is present."""
    present = [x is not None for x in items]
    if not any(present):
        return None
    like = next(x for x in items if x is not None)
    return torch.stack([like.new_zeros(like.shape) if x is None else x for x in items]), torch.tensor(present)


def true_landmarks(mofa: MoFA, landmarks_csv: torch.Tensor, filenames: list[str], truth: GroundTruthTable
                   ) -> torch.Tensor:
    """(B,68,2) reference landmarks: the render of the true coefficients (noise-free) where the table has them
    and the model's camera is the generator's (g2 preset), else the split CSV's landmarks (may carry noise)."""
    renderer = mofa.renderer
    if renderer.camera_cfg != CameraConfig.preset("g2").resized(renderer.image_size):
        return landmarks_csv
    coeffs = _stack_or_none([truth.coefficients(n, mofa.layout) for n in filenames])
    if coeffs is None:
        return landmarks_csv
    rendered = renderer(coeffs[0].to(landmarks_csv)).landmarks
    return torch.where(coeffs[1].to(landmarks_csv.device)[:, None, None], rendered, landmarks_csv)


@torch.no_grad()
def reconstruction_errors(mofa: MoFA, out, landmarks_csv: torch.Tensor, filenames: list[str],
                          truth: GroundTruthTable) -> dict[str, torch.Tensor]:
    """Per-image reconstruction errors (B,) float64, NaN where the truth lacks the image or the value.

    landmark_px(_visible/_occluded): mean 2-D landmark distance in pixels of the network image, against
    `true_landmarks`; vertex_mm: mean per-vertex distance of the neutral shape (expression 0) after rigid alignment.
    """
    B, device = len(filenames), landmarks_csv.device
    nan = torch.full((B,), math.nan, dtype=torch.float64, device=device)
    found = torch.tensor([truth.row(n) is not None for n in filenames], device=device)
    vis = _stack_or_none([truth.visible(n) for n in filenames])
    lm = landmark_error(out.landmarks, true_landmarks(mofa, landmarks_csv, filenames, truth),
                        vis[0].to(device) if vis else None)
    has_vis = vis[1].to(device) & found if vis else torch.zeros_like(found)
    errors = {"landmark_px": torch.where(found, lm["all"], nan),
              "landmark_px_visible": torch.where(has_vis, lm["visible"], nan),
              "landmark_px_occluded": torch.where(has_vis, lm["occluded"], nan), "vertex_mm": nan}
    shapes = _stack_or_none([truth.shape(n, mofa.layout) for n in filenames])
    if shapes:
        model, pred = mofa.renderer.face_model, mofa.layout.split(out.coeffs).shape
        zeros = pred.new_zeros(B, mofa.layout.n_exp)
        err = vertex_error_mm(model.vertices(pred, zeros), model.vertices(shapes[0].to(pred), zeros))
        errors["vertex_mm"] = torch.where(shapes[1].to(device), err, nan)
    return errors
