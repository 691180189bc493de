"""Scores of estimated masks: per image (with the all-face yardstick) and summarised over a split.

Mask metrics (`utils.evaluation.metrics`) follow the paper protocol: pixels inside the region F only (the stage's
rendered face), E and GT binarised at ``threshold`` (or the original's soft counts with ``soft``), computed per
image and averaged; pixel-pooled counts over the split are reported as well. Images without a GT mask are left out.

Yardsticks beside every stage's scores:
    all_face   the same region F with every pixel called visible (E = F), scored with the same metrics: what a
               mask that finds no occluder at all scores (columns ``all_face_*`` of a row, block ``all_face`` of a
               summary);
    occluders  occluder IoU / recall / precision (occluder = GT 0 inside F, estimated occluder = E 0), from the
               counts pooled over the images with an occluder (`with_occluder`; block ``occluders``; the all-face
               mask's are in ``all_face.occluders``), overall, per category and per appearance item.
"""
from __future__ import annotations

import math

import torch

from utils.data.benchmark_files import (APPEARANCE_ITEMS, NO_APPEARANCE, NO_OCCLUDER_CATEGORIES, UNKNOWN_CATEGORY,
                                        appearance_items)
from utils.evaluation.metrics import (
    METRIC_NAMES,
    OCCLUDER_METRIC_NAMES,
    confusion_counts,
    has_occluder,
    mask_metrics,
    occluder_metrics,
    pooled_metrics,
    summarise,
)
from utils.evaluation.reconstruction import RECON_NAMES

COUNT_NAMES = ("tp", "fp", "tn", "fn")
ALL_FACE = "all_face"
"""The yardstick: the region with every pixel called visible."""
ALL_FACE_PREFIX = f"{ALL_FACE}_"


def image_scores(gt: torch.Tensor, est: torch.Tensor, region: torch.Tensor, threshold: float = 0.5,
                 soft: bool = False) -> dict[str, torch.Tensor]:
    """Confusion counts and mask metrics per image inside ``region``: {tp, fp, tn, fn, iou, ...} each (B,), and
    the same for the all-face mask (E = region) under ``all_face_`` names.

    gt, est, region: (B,1,H,W); gt/est in [0,1] with 1 = visible face, region 0/1.
    """
    scores = {}
    for prefix, estimate in (("", est), (ALL_FACE_PREFIX, region.to(est.dtype))):
        counts = confusion_counts(gt, estimate, region, threshold=threshold, soft=soft)
        named = {**dict(zip(COUNT_NAMES, counts)), **mask_metrics(*counts)}
        scores.update({prefix + k: v for k, v in named.items()})
    return scores


def _counts(rows: list[dict], prefix: str = "") -> list[torch.Tensor]:
    return [torch.tensor([r[prefix + c] for r in rows], dtype=torch.float64) for c in COUNT_NAMES]


def with_occluder(scored: list[dict]) -> list[bool]:
    """Whether each row's image has an occluder. Its category decides where it is known (the synthetic benchmark's,
    AR's sunglasses / scarf / neutral): an unoccluded face's region still holds GT-0 pixels wherever the fit is off
    (background, hair), which are not an occluder. Otherwise (``UNKNOWN_CATEGORY``): the GT has occluder pixels
    inside the region."""
    in_gt = has_occluder(*_counts(scored)).tolist() if scored else []
    return [r.get("category", UNKNOWN_CATEGORY) not in NO_OCCLUDER_CATEGORIES if
            r.get("category", UNKNOWN_CATEGORY) != UNKNOWN_CATEGORY else gt for r, gt in zip(scored, in_gt)]


def occluder_summary(scored: list[dict], prefix: str = "") -> dict:
    """Occluder IoU / recall / precision of the counts summed over the rows with an occluder (`with_occluder`);
    ``n_images`` of them (metrics NaN when there is none). ``prefix``: ``all_face_`` for the yardstick."""
    occluded = [r for r, has in zip(scored, with_occluder(scored)) if has]
    if not occluded:
        return {"n_images": 0, **{m: math.nan for m in OCCLUDER_METRIC_NAMES}}
    sums = [c.sum() for c in _counts(occluded, prefix)]
    return {"n_images": len(occluded), **{m: v.item() for m, v in occluder_metrics(*sums).items()}}


def _mask_summary(scored: list[dict], prefix: str = "") -> dict:
    """paper_protocol (mean/std/n of per-image metrics) and pooled (metrics of summed counts) of scored rows."""
    if not scored:
        return {"paper_protocol": {m: {"mean": math.nan, "std": math.nan, "n": 0} for m in METRIC_NAMES},
                "pooled": {m: math.nan for m in METRIC_NAMES}}
    return {"paper_protocol": summarise([{m: r[prefix + m] for m in METRIC_NAMES} for r in scored]),
            "pooled": pooled_metrics(*_counts(scored, prefix))}


def _recon_summary(rows: list[dict]) -> dict | None:
    present = [r for r in rows if any(not math.isnan(r.get(k, math.nan)) for k in RECON_NAMES)]
    if not present:
        return None
    stats = summarise([{k: r.get(k, math.nan) for k in RECON_NAMES} for r in present])
    return {"n_images": len(present), **stats}


def group_summary(rows: list[dict]) -> dict:
    """{n_images, n_with_gt, paper_protocol, pooled, occluders, all_face {paper_protocol, pooled, occluders},
    reconstruction (when available)} of rows."""
    scored = [r for r in rows if r["has_gt_mask"]]
    all_face = {**_mask_summary(scored, ALL_FACE_PREFIX), "occluders": occluder_summary(scored, ALL_FACE_PREFIX)}
    summary = {"n_images": len(rows), "n_with_gt": len(scored), **_mask_summary(scored),
               "occluders": occluder_summary(scored), ALL_FACE: all_face}
    recon = _recon_summary(rows)
    if recon is not None:
        summary["reconstruction"] = recon
    return summary


def appearance_items_of(rows: list[dict]) -> list[str]:
    """The appearance items of the rows (`APPEARANCE_ITEMS` order, then unknown ones, then 'none')."""
    found = {item for r in rows if "appearance" in r for item in appearance_items(r["appearance"])}
    known = [item for item in APPEARANCE_ITEMS if item in found]
    return known + sorted(found - set(known) - {NO_APPEARANCE}) + ([NO_APPEARANCE] if NO_APPEARANCE in found else [])


def summarise_rows(rows: list[dict], stage: str, split: str, settings: dict | None = None) -> dict:
    """The summary of a split: {stage, split, `group_summary` fields, per_category, per_appearance, settings}.
    per_category is empty when every image is "other"; per_appearance (an image counts in every item it has) is
    empty without an appearance column. Each group holds the `group_summary` fields too."""
    categories = sorted({r["category"] for r in rows})
    per_category = {} if categories in ([], ["other"]) else {
        c: group_summary([r for r in rows if r["category"] == c]) for c in categories}
    per_appearance = {item: group_summary([r for r in rows if item in appearance_items(r.get("appearance", ""))])
                      for item in appearance_items_of(rows)}
    return {"stage": stage, "split": split, **group_summary(rows), "per_category": per_category,
            "per_appearance": per_appearance, "settings": dict(settings or {})}
