"""Evaluation of occlusion masks and reconstructions on a split of an image root (docs/method.md §11): one row
per image.

The modules of the evaluation, one job each:
    stages.py          which networks make the estimated mask E in the face region F (`load_stage`, `predict_masks`,
                       the fit oracle);
    evaluate.py        (this) the loop over a split: one row per image (`evaluate_split`, `evaluate_fit_oracle`);
    scoring.py         per-image scores with the all-face yardstick, summaries with the occluder metrics;
    reconstruction.py  landmark and vertex errors against the synthetic benchmark's true coefficients;
    report.py          per_image.csv, summary.json, summary.md;
    command.py         the command (tests/evaluate_segmentation.py); its --out folder is utils/output_dir.py's.

Images without a GT mask are processed but left out of the mask metrics. On the synthetic benchmark
(`utils.data.benchmark_files`) reconstruction is scored too, and the ``appearance`` column (out-of-model items
joined by '+', or 'none') gives a breakdown per item beside the one per category; an image counts in every item.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.mofa import MoFA
from models.renderer import FaceRenderer
from models.unet import UNet
from utils import losses
from utils.data.benchmark_files import GroundTruthTable, ar_category
from utils.data.datasets import FaceDataset, collate_faces
from utils.data.image_io import write_image_rgb, write_mask
from utils.data.unet_trainset import stem_for
from utils.errors import DataError
from utils.evaluation.reconstruction import reconstruction_errors
from utils.evaluation.scoring import image_scores
from utils.evaluation.stages import FIT_ORACLE, FitSetting, fit_oracle_masks, predict_masks, stage_label
from utils.evaluation.visuals import composite
from utils.output_dir import writing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalOptions:
    """How a split is evaluated: masks binarised at ``threshold`` (``soft``: the original's soft counts), the step2
    rule's ``sigma``, the loader's ``batch_size`` / ``workers``, ``oracle`` (use the GT mask as the estimate: checks
    the pipeline, IoU 1), ``image_dir`` (write each image's visuals there when given) and ``fit`` (test-time
    fitting before the masks, `stages.FitSetting`; None or 0 steps: the feed-forward network)."""

    threshold: float = 0.5
    soft: bool = False
    sigma: float = losses.SIGMA
    batch_size: int = 16
    workers: int = 0
    oracle: bool = False
    image_dir: Path | None = None
    fit: FitSetting | None = None


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
        with writing(image_dir / f"{stem}_*.png"):
            write_image_rgb(image_dir / f"{stem}_org.png", image.clamp(0, 1))
            write_image_rgb(image_dir / f"{stem}_result.png", res)
            write_mask(image_dir / f"{stem}_estmask.png", m)


def _score_batch(batch: dict, est: torch.Tensor, region: torch.Tensor, out, options: EvalOptions,
                 truth: GroundTruthTable | None, errors: dict[str, torch.Tensor]) -> list[dict]:
    """Rows of one batch from its estimate (replaced by the GT where ``options.oracle``), with visuals."""
    device = est.device
    gt, has_gt = batch["gt_mask"].to(device), batch["has_gt_mask"].to(device)
    if options.oracle:
        est = torch.where(has_gt[:, None, None, None], gt.to(est.dtype), est)
    scores = image_scores(gt, est, region, options.threshold, options.soft)
    names = list(batch["filename"])
    if options.image_dir is not None:
        images = batch["image"].to(device)
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


def _loader(dataset: FaceDataset, options: EvalOptions, caller: str) -> DataLoader:
    if not dataset.test_mode:
        raise ValueError(f"{caller}: the dataset must be built with test_mode=True")
    return DataLoader(dataset, batch_size=options.batch_size, shuffle=False, num_workers=options.workers,
                      collate_fn=collate_faces)


def evaluate_split(stage: str, mofa: MoFA, unet: UNet | None, dataset: FaceDataset, device: torch.device,
                   options: EvalOptions = EvalOptions(), truth: GroundTruthTable | None = None) -> list[dict]:
    """Evaluate every image of a test-mode ``dataset``; returns one row (dict) per image, in order.

    Each row: filename, category, has_gt_mask, and (when it has a GT mask) the `scoring.image_scores` (counts,
    metrics, their all-face twins); with ``truth`` also the reconstruction errors (NaN when unavailable), of the
    fitted coefficients when ``options.fit`` fits.
    """
    loader = _loader(dataset, options, "evaluate_split")
    recon = truth is not None
    if recon and truth.face_model is not None and truth.face_model != mofa.renderer.face_model.config():
        log.warning("%s was generated with another face model than the one evaluated (--bfm): reconstruction "
                    "errors are skipped", truth.path)
        recon = False
    rows: list[dict] = []
    fit_steps = options.fit.steps if options.fit is not None else 0
    for batch in tqdm(loader, desc=f"evaluate {stage_label(stage, fit_steps)}", mininterval=2.0, leave=False):
        images, landmarks = batch["image"].to(device), batch["landmarks"].to(device)
        est, region, out = predict_masks(stage, mofa, unet, images, options.sigma, options.fit, landmarks)
        names = list(batch["filename"])
        errors = reconstruction_errors(mofa, out, landmarks, names, truth) if recon else {}
        rows += _score_batch(batch, est, region, out, options, truth, errors)
    return rows


def evaluate_fit_oracle(renderer: FaceRenderer, dataset: FaceDataset, truth: GroundTruthTable,
                        device: torch.device, options: EvalOptions = EvalOptions()) -> list[dict]:
    """The fit_oracle stage on every image of a test-mode ``dataset`` (rows as `evaluate_split`, without the
    reconstruction errors, which are zero by construction). Every image needs its coefficients in ``truth``."""
    loader = _loader(dataset, options, "evaluate_fit_oracle")
    if dataset.image_size != renderer.image_size:
        raise DataError(f"fit_oracle renders at the benchmark's {renderer.image_size} px, the dataset is at "
                        f"{dataset.image_size} px")
    rows: list[dict] = []
    for batch in tqdm(loader, desc=f"evaluate {FIT_ORACLE}", mininterval=2.0, leave=False):
        names = list(batch["filename"])
        coeffs = [truth.coefficients(name, renderer.layout) for name in names]
        missing = [name for name, c in zip(names, coeffs) if c is None]
        if missing:
            raise DataError(f"{truth.path} has no coefficients for {missing[0]} ({len(missing)} image(s) of the "
                            f"split): --stage {FIT_ORACLE} needs every image's true coefficients")
        est, region, out = fit_oracle_masks(renderer, torch.stack(coeffs), batch["image"].to(device), options.sigma)
        rows += _score_batch(batch, est, region, out, options, truth, {})
    return rows
