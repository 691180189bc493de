"""Evaluation of occlusion masks and reconstructions on a split of an image root (docs/method.md §11).

Stages (what produces the estimated mask E; the region F is always the rendered face of the stage's encoder):
    step2  the robust loss's inlier mask of the Step-1 encoder (Step 2's preliminary masks, no UNet);
    step3  the Step-1 encoder with the Step-3 UNet:  E = F * U, U = objectives.unet_mask (G2's sigmoid(5 x) head);
    step4  the Step-4 encoder and UNet (final model), same formula.
    fit_oracle  (synthetic benchmark only, no checkpoint) Step 2's rule on the render of the TRUE coefficients of
           ``ground_truth.csv`` with the generator's face model (--bfm) and camera: what a perfect fit leaves for
           the UNet to fix (the out-of-model appearance items, blur and noise, occluder edges).
Mask metrics (utils.evaluation.metrics) follow the paper protocol: pixels inside F only, E and GT binarised at ``threshold``
(or the original's soft counts with ``soft``), computed per image and averaged; pixel-pooled counts over the split
are reported as well. Images without a GT mask are processed but left out of the mask metrics.

On the synthetic benchmark (``IMAGE_ROOT/ground_truth.csv`` with columns filename, split, category,
visible_landmarks, shape_0 .. light_26), reconstruction is scored too: the 2-D landmark error in pixels of the
network image against the render of the true coefficients (noise-free; the split CSV's landmarks when those are
missing), for all / visible / occluded points (``visible_landmarks``), and the per-vertex error in mm of the NEUTRAL
shape (shape coefficients only, expression 0) against the true one, after a rigid alignment. Its ``appearance``
column (out-of-model items joined by '+', or 'none') gives a breakdown per item beside the one per category; an
image counts in every item it has.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.camera import CameraConfig
from models.face_model import FaceModel
from models.landmarks68 import N_LANDMARKS
from models.layout import CoeffLayout
from models.mofa import MoFA
from models.renderer import FaceRenderer, RenderOutput
from models.unet import UNet
from utils import cli, losses
from utils.data.datasets import FaceDataset, collate_faces
from utils.data.image_io import write_image_rgb, write_mask
from utils.data.image_root import ImageRoot
from utils.data.unet_trainset import stem_for
from utils.errors import DataError
from utils.evaluation.metrics import (
    METRIC_NAMES,
    confusion_counts,
    landmark_error,
    mask_metrics,
    pooled_metrics,
    summarise,
    vertex_error_mm,
)
from utils.evaluation.visuals import composite
from utils.prepare.ar_gt import ar_category
from utils.synthetic.appearance import APPEARANCE_ITEMS
from utils.synthetic.faces import RENDER_DTYPE
from utils.training.builders import load_mofa, load_unet, previous_checkpoint
from utils.training.checkpoint import CheckpointError, load_checkpoint
from utils.training.flags import check_flags
from utils.training.objectives import unet_mask

log = logging.getLogger(__name__)

STAGES = ("step2", "step3", "step4")
FIT_ORACLE = "fit_oracle"
"""The diagnostic stage without a network: Step 2's rule on the render of the true coefficients."""
SIGMA = 0.043
COUNT_NAMES = ("tp", "fp", "tn", "fn")
RECON_NAMES = ("landmark_px", "landmark_px_visible", "landmark_px_occluded", "vertex_mm")
GROUND_TRUTH_NAME = "ground_truth.csv"
SYNTHETIC_CONFIG_NAME = "synthetic_config.json"


# ----- models ---------------------------------------------------------------------------------------------------

def load_stage(stage: str, save_root: str | Path, bfm: str | Path | FaceModel, device: torch.device,
               checkpoint: str | Path | None = None) -> tuple[MoFA, UNet | None, dict]:
    """The networks of a stage, in eval mode, from the steps' final checkpoints under ``save_root``.

    step2: Step-1 ``pretrain_mofa/final.pt`` (``checkpoint`` overrides it), no UNet.
    step3: Step-1 encoder + Step-3 UNet ``Pretrain_UNet/final.pt`` (``checkpoint`` overrides the UNet's file).
    step4: Step-4 ``MoFA_UNet/final.pt`` holding "encoder" and "unet" (``checkpoint`` overrides it).
    bfm: the face model file the steps were trained with, or a loaded FaceModel.
    Returns (mofa, unet or None, model spec). Raises CheckpointError (missing file, other face model, ...).
    """
    if stage not in STAGES:
        raise DataError(f"--stage {stage}: expected one of {', '.join(STAGES)}")
    face_model = bfm if isinstance(bfm, FaceModel) else FaceModel.from_h5(bfm, CoeffLayout())
    face_model = face_model.to(device)
    if stage == "step4":
        path = previous_checkpoint(None if checkpoint is None else str(checkpoint), save_root, step=4)
        mofa, payload, spec = load_mofa(path, face_model, device)
        return mofa, load_unet(payload, spec["unet_width"], path, device), spec
    explicit = None if checkpoint is None else str(checkpoint)
    path = previous_checkpoint(explicit if stage == "step2" else None, save_root, step=1)
    mofa, _, spec = load_mofa(path, face_model, device)
    if stage == "step2":
        return mofa, None, spec
    upath = previous_checkpoint(explicit, save_root, step=3)
    upayload = load_checkpoint(upath, map_location=device)
    width = ((upayload.get("extra") or {}).get("model") or {}).get("unet_width")
    if width is None:
        raise CheckpointError(f"{upath} records no UNet width: it was not written by Step3_Pretrain_Unet.py")
    return mofa, load_unet(upayload, width, upath, device), {**spec, "unet_width": int(width)}


@torch.no_grad()
def predict_masks(stage: str, mofa: MoFA, unet: UNet | None, images: torch.Tensor, sigma: float = SIGMA
                  ) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Estimated mask E, face region F and the render of ``images (B,3,S,S)`` in [0, 1].

    Returns (E (B,1,S,S) in [0,1], 1 = visible face and 0 outside F; F (B,1,S,S) 0/1; RenderOutput).
    step2 (or any stage with ``unet`` None): E = inlier mask of the robust loss (||I - R|| < 3 sigma inside F).
    step3 / step4: E = F * unet_mask(UNet, render, image) (the one mask function of training, G2's head).
    """
    if stage not in STAGES:
        raise ValueError(f"predict_masks: unknown stage {stage!r}, expected one of {STAGES}")
    if stage != "step2" and unet is None:
        raise ValueError(f"predict_masks: stage {stage} needs a UNet")
    out = mofa(images)
    if stage == "step2":
        est = losses.inlier_mask(images, out.image, out.mask, sigma=sigma)
    else:
        est = unet_mask(unet, out, images) * out.mask
    return est, out.mask, out


# ----- per-image scores -----------------------------------------------------------------------------------------

def image_scores(gt: torch.Tensor, est: torch.Tensor, region: torch.Tensor, threshold: float = 0.5,
                 soft: bool = False) -> dict[str, torch.Tensor]:
    """Confusion counts and mask metrics per image inside ``region``: {tp, fp, tn, fn, iou, ...} each (B,).

    gt, est, region: (B,1,H,W); gt/est in [0,1] with 1 = visible face, region 0/1.
    """
    counts = confusion_counts(gt, est, region, threshold=threshold, soft=soft)
    return {**dict(zip(COUNT_NAMES, counts)), **mask_metrics(*counts)}


@dataclass(frozen=True)
class GroundTruthTable:
    """Rows of the synthetic benchmark's ``ground_truth.csv``, looked up by file name (path or base name).

    face_model: the generator's ``FaceModel.config()`` from ``synthetic_config.json`` beside it (None if absent).
    """

    path: Path
    rows: dict[str, dict[str, str]]
    face_model: dict | None = None

    def row(self, filename: str) -> dict[str, str] | None:
        name = filename.replace("\\", "/").removeprefix("./")
        return self.rows.get(name) or self.rows.get(Path(name).name)

    def category(self, filename: str) -> str | None:
        row = self.row(filename)
        return row.get("category") or None if row else None

    def appearance(self, filename: str) -> str | None:
        """The ``appearance`` value (items joined by '+', or 'none'), None when the table or row lacks it."""
        row = self.row(filename)
        return row.get("appearance") or None if row else None

    def visible(self, filename: str) -> torch.Tensor | None:
        """(68,) bool from the ``visible_landmarks`` 0/1 string (separators ignored), or None."""
        row = self.row(filename)
        text = "".join(ch for ch in (row or {}).get("visible_landmarks", "") if ch in "01")
        if not text:
            return None
        if len(text) != N_LANDMARKS:
            raise DataError(f"{self.path}: visible_landmarks of {filename} has {len(text)} flags, expected "
                            f"{N_LANDMARKS} (one 0/1 per landmark)")
        return torch.tensor([ch == "1" for ch in text])

    def _values(self, filename: str, columns: list[str]) -> torch.Tensor | None:
        values = [(self.row(filename) or {}).get(c) for c in columns]
        if any(v is None or not v.strip() for v in values):
            return None
        try:
            return torch.tensor([float(v) for v in values], dtype=torch.float64)
        except ValueError:
            raise DataError(f"{self.path}: a coefficient of {filename} is not a number") from None

    def shape(self, filename: str, layout: CoeffLayout) -> torch.Tensor | None:
        """True shape coefficients (n_shape,) from columns shape_0 .. shape_{n_shape-1}, or None."""
        return self._values(filename, [f"shape_{k}" for k in range(layout.n_shape)])

    def coefficients(self, filename: str, layout: CoeffLayout) -> torch.Tensor | None:
        """All true (post-scaled) coefficients (layout.total,) from columns shape_0 .. light_26, or None."""
        return self._values(filename, [f"{n}_{k}" for n, size in layout.sizes().items() for k in range(size)])


def read_ground_truth(image_root: str | Path) -> GroundTruthTable | None:
    """``IMAGE_ROOT/ground_truth.csv`` as a table, or None when the file does not exist."""
    path = Path(image_root) / GROUND_TRUTH_NAME
    if not path.is_file():
        return None
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if "filename" not in (reader.fieldnames or []):
            raise DataError(f"{path}: no 'filename' column (columns: {reader.fieldnames})")
        table = list(reader)
    rows = {}
    for row in table:
        name = row["filename"].replace("\\", "/").removeprefix("./")
        rows[name] = row
        rows.setdefault(Path(name).name, row)
    config = path.with_name(SYNTHETIC_CONFIG_NAME)
    face_model = json.loads(config.read_text()).get("face_model") if config.is_file() else None
    return GroundTruthTable(path, rows, face_model)


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


# ----- a split ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalOptions:
    """How a split is evaluated. oracle: use the GT mask as the estimate (checks the pipeline: IoU 1)."""

    threshold: float = 0.5
    soft: bool = False
    sigma: float = SIGMA
    batch_size: int = 16
    workers: int = 0
    oracle: bool = False
    image_dir: Path | None = None


def category_of(filename: str, truth: GroundTruthTable | None) -> str:
    """The synthetic benchmark's category when known, else the AR category from the name ("other" if none)."""
    found = truth.category(filename) if truth is not None else None
    return found or ar_category(filename)


def save_visuals(image_dir: Path, filenames: list[str], images: torch.Tensor, out, est: torch.Tensor,
                 binarise_at: float | None) -> None:
    """Write ``<stem>_org.png``, ``<stem>_result.png`` (render over the input) and ``<stem>_estmask.png``."""
    result = composite(images, out.image, out.mask)
    mask = est if binarise_at is None else (est >= binarise_at).to(est.dtype)
    for name, image, res, m in zip(filenames, images, result, mask):
        stem = stem_for(name)
        write_image_rgb(image_dir / f"{stem}_org.png", image.clamp(0, 1))
        write_image_rgb(image_dir / f"{stem}_result.png", res)
        write_mask(image_dir / f"{stem}_estmask.png", m)


def _evaluate_batch(stage: str, mofa: MoFA, unet: UNet | None, batch: dict, device: torch.device,
                    options: EvalOptions, truth: GroundTruthTable | None, recon: bool) -> list[dict]:
    images = batch["image"].to(device)
    est, region, out = predict_masks(stage, mofa, unet, images, options.sigma)
    gt, has_gt = batch["gt_mask"].to(device), batch["has_gt_mask"].to(device)
    if options.oracle:
        est = torch.where(has_gt[:, None, None, None], gt, est)
    scores = image_scores(gt, est, region, options.threshold, options.soft)
    names = list(batch["filename"])
    errors = reconstruction_errors(mofa, out, batch["landmarks"].to(device), names, truth) if recon else {}
    if options.image_dir is not None:
        save_visuals(options.image_dir, names, images, out, est, None if options.soft else options.threshold)
    return _batch_rows(names, has_gt, scores, errors, truth)


def _batch_rows(names: list[str], has_gt: torch.Tensor, scores: dict[str, torch.Tensor],
                errors: dict[str, torch.Tensor], truth: GroundTruthTable | None) -> list[dict]:
    """One row per image: filename, category, (appearance,) has_gt_mask, its scores and errors."""
    rows = []
    for i, name in enumerate(names):
        row = {"filename": name, "category": category_of(name, truth), "has_gt_mask": bool(has_gt[i])}
        appearance = truth.appearance(name) if truth is not None else None
        if appearance is not None:
            row["appearance"] = appearance
        if row["has_gt_mask"]:
            row.update({k: float(v[i]) for k, v in scores.items()})
        row.update({k: float(v[i]) for k, v in errors.items()})
        rows.append(row)
    return rows


def evaluate_split(stage: str, mofa: MoFA, unet: UNet | None, dataset: FaceDataset, device: torch.device,
                   options: EvalOptions = EvalOptions(), truth: GroundTruthTable | None = None) -> list[dict]:
    """Evaluate every image of a test-mode ``dataset``; returns one row (dict) per image, in order.

    Each row: filename, category, has_gt_mask, and (when it has a GT mask) tp/fp/tn/fn and the metrics of
    utils.evaluation.metrics.METRIC_NAMES; with ``truth`` also the RECON_NAMES errors (NaN when unavailable).
    """
    if not dataset.test_mode:
        raise ValueError("evaluate_split: the dataset must be built with test_mode=True")
    recon = truth is not None
    if recon and truth.face_model is not None and truth.face_model != mofa.renderer.face_model.config():
        log.warning("%s was generated with another face model than the one evaluated (--bfm): reconstruction "
                    "errors are skipped", truth.path)
        recon = False
    loader = DataLoader(dataset, batch_size=options.batch_size, shuffle=False, num_workers=options.workers,
                        collate_fn=collate_faces)
    rows: list[dict] = []
    for batch in tqdm(loader, desc=f"evaluate {stage}", mininterval=2.0, leave=False):
        rows += _evaluate_batch(stage, mofa, unet, batch, device, options, truth, recon)
    return rows


# ----- the fit oracle ---------------------------------------------------------------------------------------------

def load_fit_oracle(image_root: str | Path, bfm: str | Path | FaceModel, device: torch.device
                    ) -> tuple[FaceRenderer, GroundTruthTable, dict]:
    """The renderer of the synthetic benchmark at ``image_root`` (its face model, camera and image size) and its
    ground truth, for the fit_oracle stage. Returns (renderer in the generator's float64, table, spec with
    image_size and encoder). Raises DataError when the folder is not a synthetic benchmark or ``bfm`` is not the
    face model it was generated with.
    """
    truth = read_ground_truth(image_root)
    config_path = Path(image_root) / SYNTHETIC_CONFIG_NAME
    if truth is None or not config_path.is_file():
        raise DataError(f"--stage {FIT_ORACLE} needs the synthetic benchmark's {GROUND_TRUTH_NAME} and "
                        f"{SYNTHETIC_CONFIG_NAME} in {image_root}: write them with python -m utils.synthetic.faces")
    config = json.loads(config_path.read_text())
    face_model = bfm if isinstance(bfm, FaceModel) else FaceModel.from_h5(bfm, CoeffLayout())
    if truth.face_model is not None and truth.face_model != face_model.config():
        raise DataError(f"--bfm {getattr(face_model, 'source', '') or bfm} is not the face model {image_root} was "
                        f"generated with ({SYNTHETIC_CONFIG_NAME}: {truth.face_model}); pass the generator's --bfm")
    size = int(config["size"])
    camera = CameraConfig.preset(config.get("camera", "g2")).resized(size)
    renderer = FaceRenderer(face_model, camera, face_model.layout).to(device, RENDER_DTYPE)
    return renderer, truth, {"image_size": size, "encoder": "none (true coefficients)"}


@torch.no_grad()
def fit_oracle_masks(renderer: FaceRenderer, coeffs: torch.Tensor, images: torch.Tensor, sigma: float = SIGMA
                     ) -> tuple[torch.Tensor, torch.Tensor, RenderOutput]:
    """Step 2's rule on the render R of the true ``coeffs (B, total)``: E = F * [||I - R|| < 3 sigma].

    images: ``(B, 3, S, S)`` in [0, 1] at the renderer's size. Returns (E, F, RenderOutput) as `predict_masks`,
    E and F float32. R is clamped to [0, 1] as the generator clamped it: a saturated light is part of what the
    image shows, not something the fit leaves unexplained.
    """
    out = renderer(coeffs.to(images.device, renderer.face_model.mean_shape.dtype))
    render = out.image.clamp(0.0, 1.0)
    est = losses.inlier_mask(images.to(render.dtype), render, out.mask, sigma=sigma)
    return est.float(), out.mask.float(), out


def evaluate_fit_oracle(renderer: FaceRenderer, dataset: FaceDataset, truth: GroundTruthTable,
                        device: torch.device, options: EvalOptions = EvalOptions()) -> list[dict]:
    """The fit_oracle stage on every image of a test-mode ``dataset`` (rows as `evaluate_split`, without the
    reconstruction errors, which are zero by construction). Every image needs its coefficients in ``truth``."""
    if not dataset.test_mode:
        raise ValueError("evaluate_fit_oracle: the dataset must be built with test_mode=True")
    if dataset.image_size != renderer.image_size:
        raise DataError(f"fit_oracle renders at the benchmark's {renderer.image_size} px, the dataset is at "
                        f"{dataset.image_size} px")
    loader = DataLoader(dataset, batch_size=options.batch_size, shuffle=False, num_workers=options.workers,
                        collate_fn=collate_faces)
    rows: list[dict] = []
    for batch in tqdm(loader, desc=f"evaluate {FIT_ORACLE}", mininterval=2.0, leave=False):
        names = list(batch["filename"])
        coeffs = [truth.coefficients(name, renderer.layout) for name in names]
        missing = [name for name, c in zip(names, coeffs) if c is None]
        if missing:
            raise DataError(f"{truth.path} has no coefficients for {missing[0]} ({len(missing)} image(s) of the "
                            f"split): --stage {FIT_ORACLE} needs every image's true coefficients")
        images = batch["image"].to(device)
        est, region, out = fit_oracle_masks(renderer, torch.stack(coeffs), images, options.sigma)
        gt, has_gt = batch["gt_mask"].to(device), batch["has_gt_mask"].to(device)
        if options.oracle:
            est = torch.where(has_gt[:, None, None, None], gt, est)
        scores = image_scores(gt, est, region, options.threshold, options.soft)
        if options.image_dir is not None:
            save_visuals(options.image_dir, names, images, out, est, None if options.soft else options.threshold)
        rows += _batch_rows(names, has_gt, scores, {}, truth)
    return rows


# ----- summaries and files ------------------------------------------------------------------------------------

def _mask_summary(scored: list[dict]) -> dict:
    """paper_protocol (mean/std/n of per-image metrics) and pooled (metrics of summed counts) of scored rows."""
    if not scored:
        return {"paper_protocol": {m: {"mean": math.nan, "std": math.nan, "n": 0} for m in METRIC_NAMES},
                "pooled": {m: math.nan for m in METRIC_NAMES}}
    counts = [torch.tensor([r[c] for r in scored], dtype=torch.float64) for c in COUNT_NAMES]
    return {"paper_protocol": summarise([{m: r[m] for m in METRIC_NAMES} for r in scored]),
            "pooled": pooled_metrics(*counts)}


def _recon_summary(rows: list[dict]) -> dict | None:
    present = [r for r in rows if any(not math.isnan(r.get(k, math.nan)) for k in RECON_NAMES)]
    if not present:
        return None
    stats = summarise([{k: r.get(k, math.nan) for k in RECON_NAMES} for r in present])
    return {"n_images": len(present), **stats}


def _group_summary(rows: list[dict]) -> dict:
    scored = [r for r in rows if r["has_gt_mask"]]
    summary = {"n_images": len(rows), "n_with_gt": len(scored), **_mask_summary(scored)}
    recon = _recon_summary(rows)
    if recon is not None:
        summary["reconstruction"] = recon
    return summary


def appearance_items(rows: list[dict]) -> list[str]:
    """The appearance items of the rows (`APPEARANCE_ITEMS` order, then unknown ones, then 'none')."""
    found = {item for r in rows if "appearance" in r for item in r["appearance"].split("+")}
    known = [item for item in APPEARANCE_ITEMS if item in found]
    return known + sorted(found - set(known) - {"none"}) + (["none"] if "none" in found else [])


def summarise_rows(rows: list[dict], stage: str, split: str, settings: dict | None = None) -> dict:
    """The summary of a split: {stage, split, n_images, n_with_gt, paper_protocol, pooled, per_category,
    per_appearance, reconstruction (when available), settings}. per_category is empty when every image is
    "other"; per_appearance (an image counts in every item it has) is empty without an appearance column."""
    categories = sorted({r["category"] for r in rows})
    per_category = {} if categories in ([], ["other"]) else {
        c: _group_summary([r for r in rows if r["category"] == c]) for c in categories}
    per_appearance = {item: _group_summary([r for r in rows if item in r.get("appearance", "").split("+")])
                      for item in appearance_items(rows)}
    return {"stage": stage, "split": split, **_group_summary(rows), "per_category": per_category,
            "per_appearance": per_appearance, "settings": dict(settings or {})}


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def format_markdown(summary: dict) -> str:
    """A short Markdown report: overall metrics (paper protocol and pooled), categories, reconstruction."""
    lines = [f"## {summary['stage']} on {summary['split']}: {summary['n_images']} images, "
             f"{summary['n_with_gt']} with a GT mask", "", "| metric | mean | std | pooled |", "|---|---|---|---|"]
    for m in METRIC_NAMES:
        s = summary["paper_protocol"][m]
        lines.append(f"| {m} | {_fmt(s['mean'])} | {_fmt(s['std'])} | {_fmt(summary['pooled'][m])} |")
    for key, title in (("per_category", "category"), ("per_appearance", "appearance")):
        if not summary.get(key):
            continue
        lines += ["", f"| {title} | images | with GT | " + " | ".join(METRIC_NAMES) + " |",
                  "|---|---|---|" + "---|" * len(METRIC_NAMES)]
        for name, s in summary[key].items():
            values = " | ".join(_fmt(s["paper_protocol"][m]["mean"]) for m in METRIC_NAMES)
            lines.append(f"| {name} | {s['n_images']} | {s['n_with_gt']} | {values} |")
    if "reconstruction" in summary:
        rec = summary["reconstruction"]
        lines += ["", f"| reconstruction ({rec['n_images']} images) | mean | std |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(rec[k]['mean'])} | {_fmt(rec[k]['std'])} |" for k in RECON_NAMES]
    return "\n".join(lines) + "\n"


def _json_safe(x):
    """NaN -> None, recursively, so the file is strict JSON."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def write_results(out_dir: str | Path, rows: list[dict], summary: dict) -> Path:
    """Write ``per_image.csv``, ``summary.json`` and ``summary.md`` into ``out_dir``; returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = ["filename", "category", *(["appearance"] if any("appearance" in r for r in rows) else []),
               "has_gt_mask", *COUNT_NAMES, *METRIC_NAMES]
    columns += [k for k in RECON_NAMES if any(k in r for r in rows)]
    with (out_dir / "per_image.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    (out_dir / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2) + "\n")
    (out_dir / "summary.md").write_text(format_markdown(summary))
    return out_dir


# ----- the command (tests/evaluate_segmentation.py) -------------------------------------------------------------

COMMAND_HELP = """Evaluate occlusion masks (and, on the synthetic benchmark, reconstructions) on a split of IMAGE_ROOT.

    python tests/evaluate_segmentation.py --img_path IMAGE_ROOT --split test --save_root DIR --out RESULTS_DIR
        [--stage step2|step3|step4|fit_oracle] [--checkpoint PATH] [--threshold 0.5] [--soft] [--save_images]

Metrics follow the paper protocol (pixels inside the rendered face only, per image, then mean and std) with the
estimate binarised at --threshold (--soft: the original's soft counts); pixel-pooled metrics are reported too.
GT masks are ``X_visible_skin_mask.png`` beside ``X``; images without one are processed but not scored.
Writes RESULTS_DIR/per_image.csv, summary.json, summary.md (and with --save_images RESULTS_DIR/images/
X_org.png, X_result.png, X_estmask.png, X = the image's path under Dataset/ with its extension). --stage picks the
model: step2 = Step-1 encoder with the inlier mask, step3 = Step-1 encoder + Step-3 UNet, step4 = the final Step-4
model (default). --checkpoint overrides the stage's checkpoint (step2: Step 1's, step3: Step 3's UNet, step4: Step
4's). fit_oracle (synthetic benchmark only, no checkpoint) applies Step 2's rule to the render of the true
coefficients with the generator's --bfm.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags of the evaluation command (`COMMAND_HELP`), paths resolved; DataError / FlagError for a bad value."""
    p = argparse.ArgumentParser(prog="evaluate_segmentation.py", description=COMMAND_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--img_path", required=True, help="image root (with the split's landmark CSV)")
    p.add_argument("--split", default="test", help="train, val, test or all (default: %(default)s)")
    p.add_argument("--save_root", default=cli.RepoDefault(cli.DEFAULT_SAVE_ROOT),
                   help=f"output root of the steps (default: <repo>/{cli.DEFAULT_SAVE_ROOT})")
    p.add_argument("--bfm", default=cli.RepoDefault(cli.DEFAULT_BFM),
                   help=f"face model the steps used (default: <repo>/{cli.DEFAULT_BFM})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:<index> (default: auto)")
    p.add_argument("--stage", choices=(*STAGES, FIT_ORACLE), default="step4", help="which model makes the masks")
    p.add_argument("--checkpoint", default=None, help="checkpoint overriding the stage's default final.pt")
    p.add_argument("--threshold", type=float, default=0.5, help="binarisation threshold of masks (default 0.5)")
    p.add_argument("--soft", action="store_true", help="soft counts as the original (no binarisation)")
    p.add_argument("--sigma", type=float, default=SIGMA, help="robust-loss sigma of the step2 inlier mask")
    p.add_argument("--oracle", action="store_true", help="score the GT masks themselves (pipeline check: IoU 1)")
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--save_images", action="store_true", help="write X_org/X_result/X_estmask.png per image")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    args = cli.resolve_paths(p.parse_args(argv), ("img_path", "bfm", "save_root", "out"))
    if not 0.0 < args.threshold < 1.0:
        raise DataError(f"--threshold {args.threshold}: expected a value strictly between 0 and 1")
    check_flags(args)  # the steps' check: --batch_size, --workers, --sigma
    return args


def run_evaluation(argv: list[str] | None = None) -> dict:
    """Run the evaluation command for ``argv``; write the result files, print the Markdown table and return the
    summary dict (`summarise_rows`)."""
    args = parse_args(argv)
    device = cli.resolve_device(args.device)
    if args.stage == FIT_ORACLE:
        renderer, _, spec = load_fit_oracle(ImageRoot(args.img_path).root, args.bfm, device)
    else:
        mofa, unet, spec = load_stage(args.stage, args.save_root, args.bfm, device, args.checkpoint)
    dataset = FaceDataset(args.img_path, args.split, spec["image_size"], test_mode=True)
    truth = read_ground_truth(ImageRoot(args.img_path).root)
    options = EvalOptions(threshold=args.threshold, soft=args.soft, sigma=args.sigma, batch_size=args.batch_size,
                          workers=args.workers, oracle=args.oracle,
                          image_dir=args.out / "images" if args.save_images else None)
    rows = (evaluate_fit_oracle(renderer, dataset, truth, device, options) if args.stage == FIT_ORACLE
            else evaluate_split(args.stage, mofa, unet, dataset, device, options, truth))
    settings = {"threshold": None if args.soft else args.threshold, "soft": args.soft, "oracle": args.oracle,
                "image_size": spec["image_size"], "encoder": spec["encoder"], "checkpoint": args.checkpoint,
                "save_root": str(args.save_root), "img_path": str(args.img_path)}
    summary = summarise_rows(rows, args.stage, args.split, settings)
    write_results(args.out, rows, summary)
    missing = summary["n_images"] - summary["n_with_gt"]
    if missing:
        log.info("%d of %d images have no GT mask: processed but left out of the mask metrics",
                 missing, summary["n_images"])
    print(format_markdown(summary))
    log.info("results written to %s", args.out)
    return summary
