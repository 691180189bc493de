"""Evaluation metrics: occlusion-segmentation scores, landmark error, and 3D vertex error after rigid alignment.

Masks are (B, 1, H, W) with 1 = visible face (the positive class), 0 = occluder. Following the paper's protocol
(docs/method.md §11) only pixels inside the rendered face ``region`` are counted.

Empty denominators: a ratio whose denominator is 0 is 1.0 when nothing in the metric's scope is wrong and 0.0
otherwise. Concretely, with tp, fp, tn, fn the counts of one image:
    iou          = tp / (tp + fp + fn)          0/0 -> 1 (no visible face in gt nor in the estimate)
    occluder_iou = tn / (tn + fn + fp)          0/0 -> 1 (no occluder in gt nor in the estimate)
    accuracy     = (tp + tn) / (tp+fp+tn+fn)    0/0 -> 1 (empty region: nothing to get wrong)
    precision    = tp / (tp + fp)               0/0 -> 1 if fn == 0 (no gt positives either) else 0
    recall       = tp / (tp + fn)               0/0 -> 1 if fp == 0 (no predicted positives either) else 0
    f1           = 2 tp / (2 tp + fp + fn)      0/0 -> 1 (no positives anywhere)
No count or ratio is clamped (the original clamped every count to >= 1, which biased degenerate images).

Occluder metrics (`occluder_metrics`) take the occluder as the positive class (GT 0 inside the region; estimated
occluder = estimate 0): occluder_iou = tn / (tn + fp + fn), occluder_recall = tn / (tn + fp) (the share of the GT
occluder found), occluder_precision = tn / (tn + fn) (the share of the pixels called occluder that are occluder),
with the same empty-denominator rule. The evaluation pools them over the images whose GT has an occluder inside
the region (`has_occluder`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

METRIC_NAMES = ("iou", "occluder_iou", "accuracy", "precision", "recall", "f1")
OCCLUDER_METRIC_NAMES = ("occluder_iou", "occluder_recall", "occluder_precision")


def confusion_counts(gt: torch.Tensor, est: torch.Tensor, region: torch.Tensor | None = None,
                     threshold: float = 0.5, soft: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image confusion counts (tp, fp, tn, fn), each (B,) float64, positives = visible face.

    gt, est: (B, 1, H, W) in [0, 1]; region: (B, 1, H, W) 0/1 rendered-face mask (None = whole image).
    soft=False binarises both gt and est at ``threshold`` (est >= threshold is visible face).
    soft=True uses the raw values as the original did (TP = sum gt*est*region, ...), without its >= 1 clamp.
    """
    if gt.ndim != 4 or gt.shape[1] != 1 or gt.shape != est.shape:
        raise ValueError(f"confusion_counts: expected gt and est of the same (B, 1, H, W) shape, got "
                         f"{tuple(gt.shape)} and {tuple(est.shape)}")
    if region is None:
        region = torch.ones_like(gt)
    elif region.shape != gt.shape:
        raise ValueError(f"confusion_counts: region {tuple(region.shape)} does not match the masks {tuple(gt.shape)}")
    g, e, r = gt.double(), est.double(), region.double()
    if not soft:
        g, e = (g >= threshold).double(), (e >= threshold).double()

    def count(x: torch.Tensor) -> torch.Tensor:
        return (x * r).sum(dim=(1, 2, 3))

    return count(g * e), count((1 - g) * e), count((1 - g) * (1 - e)), count(g * (1 - e))


def _ratio(num: torch.Tensor, den: torch.Tensor, when_empty: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), when_empty)


def mask_metrics(tp: torch.Tensor, fp: torch.Tensor, tn: torch.Tensor, fn: torch.Tensor) -> dict[str, torch.Tensor]:
    """Segmentation metrics from confusion counts (any matching shapes, e.g. (B,)); empty-denominator rule in
    the module docstring. Returns {name: tensor of the counts' shape} for the names in METRIC_NAMES."""
    tp, fp, tn, fn = (torch.as_tensor(x, dtype=torch.float64) for x in (tp, fp, tn, fn))
    one, zero = torch.ones_like(tp), torch.zeros_like(tp)
    return {
        "iou": _ratio(tp, tp + fp + fn, one),
        "occluder_iou": _ratio(tn, tn + fn + fp, one),
        "accuracy": _ratio(tp + tn, tp + fp + tn + fn, one),
        "precision": _ratio(tp, tp + fp, torch.where(fn > 0, zero, one)),
        "recall": _ratio(tp, tp + fn, torch.where(fp > 0, zero, one)),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn, one),
    }


def occluder_metrics(tp: torch.Tensor, fp: torch.Tensor, tn: torch.Tensor, fn: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
    """{occluder_iou, occluder_recall, occluder_precision} from the visible-face counts (occluder = positive)."""
    swapped = mask_metrics(tn, fn, tp, fp)
    return {"occluder_iou": swapped["iou"], "occluder_recall": swapped["recall"],
            "occluder_precision": swapped["precision"]}


def has_occluder(tp: torch.Tensor, fp: torch.Tensor, tn: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the GT has occluder pixels inside the region (tn + fp > 0, whatever the estimate says)."""
    return (torch.as_tensor(tn, dtype=torch.float64) + torch.as_tensor(fp, dtype=torch.float64)) > 0


def pooled_metrics(tp: torch.Tensor, fp: torch.Tensor, tn: torch.Tensor, fn: torch.Tensor) -> dict[str, float]:
    """Metrics of the counts summed over all images (pixel-pooled), as floats."""
    sums = [torch.as_tensor(x, dtype=torch.float64).sum() for x in (tp, fp, tn, fn)]
    return {name: value.item() for name, value in mask_metrics(*sums).items()}


def summarise(per_image: Sequence[Mapping[str, float | torch.Tensor]]) -> dict[str, dict[str, float]]:
    """Mean, population std (ddof 0, as numpy's default) and count of each metric over images.

    per_image: one dict per image (values: floats or tensors, tensors are flattened, so a dict of (B,) tensors
    per batch also works). NaN values (e.g. a landmark subset with no point) are left out of mean, std and n;
    a metric with no value gets mean and std NaN and n 0.
    """
    values: dict[str, list[float]] = {}
    for row in per_image:
        for name, v in row.items():
            flat = torch.as_tensor(v, dtype=torch.float64).flatten().tolist()
            values.setdefault(name, []).extend(x for x in flat if not math.isnan(x))
    out = {}
    for name, xs in values.items():
        if not xs:
            out[name] = {"mean": math.nan, "std": math.nan, "n": 0}
            continue
        t = torch.tensor(xs, dtype=torch.float64)
        out[name] = {"mean": t.mean().item(), "std": t.std(unbiased=False).item(), "n": len(xs)}
    return out


def landmark_error(pred: torch.Tensor, gt: torch.Tensor, visible: torch.Tensor | None = None
                   ) -> dict[str, torch.Tensor]:
    """Mean Euclidean landmark distance in pixels per image, overall and split by visibility.

    pred, gt: (B, K, 2) pixels; visible: (B, K) bool (None = all visible).
    Returns {"all", "visible", "occluded"}: (B,) float64 each; NaN where an image has no point in that subset.
    """
    if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[-1] != 2:
        raise ValueError(f"landmark_error: expected pred and gt of the same (B, K, 2) shape, got "
                         f"{tuple(pred.shape)} and {tuple(gt.shape)}")
    if visible is None:
        visible = torch.ones(pred.shape[:2], dtype=torch.bool, device=pred.device)
    if visible.shape != pred.shape[:2]:
        raise ValueError(f"landmark_error: visible {tuple(visible.shape)} must be {tuple(pred.shape[:2])}")
    dist = torch.linalg.vector_norm((pred - gt).double(), dim=-1)  # (B, K)

    def subset_mean(sel: torch.Tensor) -> torch.Tensor:
        n = sel.sum(dim=1).double()
        return torch.where(n > 0, (dist * sel).sum(dim=1) / n.clamp_min(1), torch.full_like(n, math.nan))

    visible = visible.bool()
    return {"all": dist.mean(dim=1), "visible": subset_mean(visible), "occluded": subset_mean(~visible)}


def rigid_align(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Kabsch: rotate and translate ``src`` (no scale, no reflection) to best match ``dst`` in least squares.

    src, dst: (N, 3) or (B, N, 3) corresponding points. Returns the aligned src, same shape and dtype as src.
    """
    if src.shape != dst.shape or src.shape[-1] != 3 or src.ndim not in (2, 3):
        raise ValueError(f"rigid_align: expected (N, 3) or (B, N, 3) point sets of the same shape, got "
                         f"{tuple(src.shape)} and {tuple(dst.shape)}")
    s, d = src.double(), dst.double()
    if s.ndim == 2:
        s, d = s[None], d[None]
    cs, cd = s.mean(dim=1, keepdim=True), d.mean(dim=1, keepdim=True)
    H = (s - cs).transpose(1, 2) @ (d - cd)  # (B, 3, 3)
    U, _, Vh = torch.linalg.svd(H)
    V = Vh.transpose(1, 2)
    sign = torch.sign(torch.linalg.det(V @ U.transpose(1, 2)))
    D = torch.diag_embed(torch.stack([torch.ones_like(sign), torch.ones_like(sign), sign], dim=-1))
    Rm = V @ D @ U.transpose(1, 2)  # (B, 3, 3): x_dst ~ Rm x_src
    out = (s - cs) @ Rm.transpose(1, 2) + cd
    return out.reshape(src.shape).to(src.dtype)


def vertex_error_mm(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Mean per-vertex Euclidean distance (mm, the model frame's unit) after rigidly aligning pred to gt.

    pred, gt: (N, 3) -> scalar, or (B, N, 3) -> (B,); float64.
    """
    aligned = rigid_align(pred, gt).double()
    return torch.linalg.vector_norm(aligned - gt.double(), dim=-1).mean(dim=-1)
