"""Loss terms of the four training steps (docs/method.md §8), as pure functions of tensors.

Notation used in every docstring:
    I  image,            (B, 3, H, W) RGB in [0, 1]
    R  render,           (B, 3, H, W) RGB, 0 on the background
    F  coverage mask,    (B, 1, H, W) 0/1, detached (the rasterizer's ``mask``)
    U  UNet mask,        (B, 1, H, W) in (0, 1) (sigmoid of the UNet logits, i.e. G2's sigmoid(5 x) head)
    M  = F * U,          (B, 1, H, W) in [0, 1], the "valid loss mask"
``||.||_RGB`` is the Euclidean norm over the three colour channels of one pixel.

No function holds weights. The weights of each step live in a frozen dataclass (``Step1Weights``,
``Step4UNetWeights``, ``Step4MoFAWeights``) whose defaults are the G2 (FOCUS-era) values and whose ``g1()``
classmethod gives the G1 ("To fit or not to fit" release) values; ``PRESETS`` bundles them with the landmark weights
and the other G1/G2 settings (``--loss_preset g2|g1_weights``); ``weighted_sum`` is the one place where they are
applied.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

# Squared norms get this added inside the square root so the gradient is finite where the norm is 0.
SIGMA = 0.043
"""The robust photometric model's sigma (docs/method.md §8.1): inliers lie within 3 sigma = 0.129 (RGB in [0, 1]).
The one spelling of the value: the steps, the objectives and the evaluation take it from here."""
NORM_EPS = 1e-12

# Landmark weights per iBUG-68 point, already SQUARED. The original multiplied the residual by w_j inside the
# square (docs/method.md, defect 13: w_j^2); ``landmark_loss`` applies its weights outside the square, so these
# constants are the squares of the original weights and the loss value equals the original's.
# G1: jaw 0-16 -> 0.2^2, brows 17-26 -> 0.1^2, everything else 1.
LANDMARK_WEIGHTS_G1: tuple[float, ...] = (0.2 ** 2,) * 17 + (0.1 ** 2,) * 10 + (1.0,) * 41
# G2 (Deep3D convention): 20^2 at the nose points 28, 29, 30 and the inner mouth 60-67, 1 elsewhere.
LANDMARK_WEIGHTS_G2: tuple[float, ...] = tuple(
    20.0 ** 2 if j in (28, 29, 30) or 60 <= j <= 67 else 1.0 for j in range(68)
)


def _check_image_pair(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    if a.ndim != 4 or a.shape != b.shape:
        raise ValueError(f"{name}: expected two tensors of the same (B, C, H, W) shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")


def _check_mask(mask: torch.Tensor, image: torch.Tensor, name: str) -> None:
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] != image.shape[0] or mask.shape[2:] != image.shape[2:]:
        raise ValueError(f"{name}: expected a (B, 1, H, W) mask matching the image {tuple(image.shape)}, "
                         f"got {tuple(mask.shape)}")


def _rgb_norm(x: torch.Tensor) -> torch.Tensor:
    """``||x||`` over dim 1 with NORM_EPS inside the square root: (B, C, H, W) -> (B, 1, H, W)."""
    return torch.sqrt(x.pow(2).sum(dim=1, keepdim=True) + NORM_EPS)


# --------------------------------------------------------------------------------------------------------------
# Step 1 / Step 2
# --------------------------------------------------------------------------------------------------------------

def inlier_mask(I: torch.Tensor, R: torch.Tensor, F_mask: torch.Tensor, sigma: float = SIGMA) -> torch.Tensor:
    """Hard inlier mask of the robust photometric model (also Step 2's preliminary mask, docs/method.md §9).

    O = F * [||I - R||^2_RGB < (3 sigma)^2]; with sigma = 0.043 the threshold is an RGB distance of 0.129.
    I, R: (B, 3, H, W); F_mask: (B, 1, H, W) 0/1. Returns (B, 1, H, W) float 0/1, detached (no gradient).
    """
    _check_image_pair(I, R, "inlier_mask")
    _check_mask(F_mask, I, "inlier_mask")
    with torch.no_grad():
        sq = (I - R).pow(2).sum(dim=1, keepdim=True)
        return F_mask * (sq < (3.0 * sigma) ** 2).to(I.dtype)


def robust_photometric(I: torch.Tensor, R: torch.Tensor, F_mask: torch.Tensor,
                       sigma: float = SIGMA) -> tuple[torch.Tensor, torch.Tensor]:
    """Occlusion-robust photometric loss of Step 1 (docs/method.md §8.1 item 1).

    Per pixel, LL_fg = -||I - R||^2 / (2 sigma^2) + C with C = -1.5 ln(2 pi) - 3 ln(sigma) (about 6.683 for
    sigma = 0.043); the background likelihood is the constant LL_bg = C - 4.5. The inlier mask
    O = F * [LL_fg > LL_bg] is hard and carries no gradient. loss = -mean over all B*H*W pixels of O * LL_fg.
    Every inlier contributes at least C - 4.5 > 0 to -loss, so the loss also rewards having more inliers.

    Returns (loss: scalar, inlier mask O: (B, 1, H, W) 0/1 detached).
    """
    O = inlier_mask(I, R, F_mask, sigma)
    C = -1.5 * math.log(2.0 * math.pi) - 3.0 * math.log(sigma)
    ll_fg = -(I - R).pow(2).sum(dim=1, keepdim=True) / (2.0 * sigma ** 2) + C
    return -(O * ll_fg).mean(), O


def landmark_loss(pred: torch.Tensor, gt: torch.Tensor, weights: torch.Tensor | Sequence[float],
                  scale: float = 1.0) -> torch.Tensor:
    """Weighted squared landmark error: mean over (b, xy, j) of w_j * ((gt - pred) * scale)^2.

    pred, gt: (B, 68, 2) pixels of the same image. weights: (68,), applied OUTSIDE the square; use
    LANDMARK_WEIGHTS_G1 / LANDMARK_WEIGHTS_G2 (already squared) to reproduce the original's values.
    scale: pixel-to-224-frame factor 224 / S for an S-pixel image, so that a smaller image of the same scene
    gives the same loss.
    """
    if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[-1] != 2:
        raise ValueError(f"landmark_loss: expected pred and gt of the same (B, K, 2) shape, got "
                         f"{tuple(pred.shape)} and {tuple(gt.shape)}")
    w = torch.as_tensor(weights, dtype=pred.dtype, device=pred.device)
    if w.shape != (pred.shape[1],):
        raise ValueError(f"landmark_loss: expected ({pred.shape[1]},) weights, got {tuple(w.shape)}")
    sq = ((gt - pred) * scale).pow(2)  # (B, K, 2)
    return (sq * w[None, :, None]).mean()


def coeff_regulariser(shape: torch.Tensor, exp: torch.Tensor, tex: torch.Tensor,
                      norm: float = 224.0) -> torch.Tensor:
    """Statistical regulariser (sum alpha^2 + sum delta^2 + sum beta^2) / B / norm (docs/method.md §8.1 item 3).

    shape (B, n_shape), exp (B, n_exp), tex (B, n_tex): post-scaled coefficients. B is the actual batch size
    (the original divided by the CLI batch size); ``norm`` = 224 reproduces the original's extra division.
    """
    B = shape.shape[0]
    if exp.shape[0] != B or tex.shape[0] != B or B == 0:
        raise ValueError(f"coeff_regulariser: inconsistent or empty batch: {shape.shape[0]}, {exp.shape[0]}, "
                         f"{tex.shape[0]}")
    total = shape.pow(2).sum() + exp.pow(2).sum() + tex.pow(2).sum()
    return total / B / norm


def identity_loss(f_rec: torch.Tensor, f_gt: torch.Tensor) -> torch.Tensor:
    """Identity (perceptual) loss mean_b(1 - cos(f_rec_b, f_gt_b)) on (B, D) embeddings (D = 512 for ArcFace)."""
    if f_rec.ndim != 2 or f_rec.shape != f_gt.shape:
        raise ValueError(f"identity_loss: expected two (B, D) embeddings, got {tuple(f_rec.shape)} "
                         f"and {tuple(f_gt.shape)}")
    return (1.0 - F.cosine_similarity(f_rec, f_gt, dim=1)).mean()


# --------------------------------------------------------------------------------------------------------------
# Step 3 / Step 4
# --------------------------------------------------------------------------------------------------------------

def masked_reconstruction(I: torch.Tensor, R: torch.Tensor, M: torch.Tensor, per_image: bool = False
                          ) -> torch.Tensor:
    """Pooled masked L2,1 reconstruction loss (docs/method.md §8.3).

    sum over (b, pixels) of ||M * (I - R)||_RGB / max(sum M, 1): one scalar for the whole batch (training pools
    it as G2 does); ``per_image``: the same for each image alone, (B,) (test-time fitting).
    M: (B, 1, H, W) in [0, 1], so ||M (I - R)|| = M ||I - R||; the norm has NORM_EPS inside its square root,
    so the gradient is finite (zero) where I = R, and an all-zero M gives exactly 0.
    """
    _check_image_pair(I, R, "masked_reconstruction")
    _check_mask(M, I, "masked_reconstruction")
    dims = (1, 2, 3) if per_image else None
    return (M * _rgb_norm(I - R)).sum(dims) / M.sum(dims).clamp_min(1.0)


def area_loss(F_mask: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """Area loss mean_b[ sum F (1 - U) / max(sum F, 1) ]: fraction of the rendered face labelled outlier.

    F_mask: (B, 1, H, W) 0/1; U: (B, 1, H, W) in (0, 1). Pushes U toward 1 inside the face.
    """
    if F_mask.shape != U.shape or F_mask.ndim != 4:
        raise ValueError(f"area_loss: expected F and U of the same (B, 1, H, W) shape, got {tuple(F_mask.shape)} "
                         f"and {tuple(U.shape)}")
    outside = (F_mask * (1.0 - U)).sum(dim=(1, 2, 3))
    return (outside / F_mask.sum(dim=(1, 2, 3)).clamp_min(1.0)).mean()


def binary_loss(M: torch.Tensor) -> torch.Tensor:
    """Binary loss 0.5 - mean |M - 0.5| over all B*1*H*W pixels; 0 when M is 0/1, 0.5 when M = 0.5."""
    return 0.5 - (M - 0.5).abs().mean()


def neighbour_loss(M: torch.Tensor, R: torch.Tensor, I: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Neighbour loss (docs/method.md §8.3): a misalignment-tolerant data term for the UNet.

    For each pixel p at least ``radius`` pixels from the border,
    L(p) = min over offsets d in [-r, r]^2 of ||M(p) R(p) - M(p + d) I(p + d)||_RGB; returns the mean of L over
    those pixels and the batch. radius 1 is G1's 3x3 window, radius 2 is G2's 5x5.
    M: (B, 1, H, W); R, I: (B, 3, H, W); H and W must exceed 2 * radius.
    """
    _check_image_pair(R, I, "neighbour_loss")
    _check_mask(M, I, "neighbour_loss")
    H, W = I.shape[2:]
    r = radius
    if r < 0 or H <= 2 * r or W <= 2 * r:
        raise ValueError(f"neighbour_loss: radius {r} leaves no interior pixel in a {H}x{W} image")
    src = (M * R)[:, :, r:H - r, r:W - r]  # (B, 3, H-2r, W-2r)
    tgt = M * I
    best = None
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            shifted = tgt[:, :, r + dy:H - r + dy, r + dx:W - r + dx]
            dist = _rgb_norm(src - shifted)  # (B, 1, H-2r, W-2r)
            best = dist if best is None else torch.minimum(best, dist)
    return best.mean()


def feature_cosine_loss(fa: torch.Tensor, fb: torch.Tensor, width_normalise: bool = True) -> torch.Tensor:
    """mean over (b, h, w) of 1 - cos over channels between two (B, C, h, w) feature maps.

    Preserve loss: fa = phi(I), fb = phi(I * M). Dist loss: fa = phi(R * M), fb = phi(I * M); phi = the identity
    network's shallow map (``IdentityEncoder.shallow``, ArcFace layer 1). ``width_normalise`` (default, G2,
    docs/method.md §8.3): each map is first L2-normalised along its LAST axis (the width: every (b, c, row) is
    divided by its norm over w, ``F.normalize(dim=-1)``), as G2 does. This is not a no-op: the cosine over channels
    is invariant to one scale per pixel, but this rescales every channel by a different, per-row factor, so it
    changes which channels dominate the cosine (measured: preserve x1.05-1.1, dist x1.2-1.6, see
    docs/faithfulness.md). False gives the plain channel cosine.
    """
    if fa.ndim != 4 or fa.shape != fb.shape:
        raise ValueError(f"feature_cosine_loss: expected two (B, C, h, w) maps of the same shape, got "
                         f"{tuple(fa.shape)} and {tuple(fb.shape)}")
    if width_normalise:
        fa, fb = F.normalize(fa, dim=-1), F.normalize(fb, dim=-1)
    return (1.0 - F.cosine_similarity(fa, fb, dim=1)).mean()


def unet_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Step 3 loss: binary cross-entropy of the UNet LOGITS (B, 1, H, W) against a soft target in [0, 1].

    The logits are what ``UNet.forward`` returns, i.e. G2's 5 * head output, so this is G2's BCE on 5 * logits.
    The sigmoid is applied exactly once, inside the loss (the original applied it twice, docs/method.md, defect 7).
    """
    if logits.shape != target.shape:
        raise ValueError(f"unet_bce_loss: logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    return F.binary_cross_entropy_with_logits(logits, target)


# --------------------------------------------------------------------------------------------------------------
# Weights: defaults are G2's, ``g1()`` gives G1's (docs/method.md §8.1 item 5 and §8.3)
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Step1Weights:
    """Step 1 total: photo * robust_photometric + reg * coeff_regulariser + landmark * landmark_loss
    + identity * identity_loss. G2: 0.5 / 0.1 / 5e-4 / 0.25 (with LANDMARK_WEIGHTS_G2);
    G1: 0.5 / 0.01 / 0.01 / 0.25 (with LANDMARK_WEIGHTS_G1). The landmark weight keeps its original value
    because the per-point landmark weights are squared in their constants."""
    photo: float = 0.5
    reg: float = 0.1
    landmark: float = 5e-4
    identity: float = 0.25

    @classmethod
    def g1(cls) -> Step1Weights:
        return cls(photo=0.5, reg=0.01, landmark=0.01, identity=0.25)


@dataclass(frozen=True)
class Step4UNetWeights:
    """Step 4 UNet phase: binary_loss, area_loss, preserve and dist (feature_cosine_loss), neighbour_loss.
    G2: 10 / 0.5 / 0.25 / 3 / 15; G1: 10 / 0.5 / 2.5 / 3 / 15 (only the preserve weight differs)."""
    binary: float = 10.0
    area: float = 0.5
    preserve: float = 0.25
    dist: float = 3.0
    neighbour: float = 15.0

    @classmethod
    def g1(cls) -> Step4UNetWeights:
        return cls(binary=10.0, area=0.5, preserve=2.5, dist=3.0, neighbour=15.0)


@dataclass(frozen=True)
class Step4MoFAWeights:
    """Step 4 MoFA phase: masked_reconstruction, identity_loss, coeff_regulariser, landmark_loss, area_loss.
    G2: 0.5 / 0.25 / 0.1 / 5e-4 / 0.06; G1: 4 / 0.5 / 0.01/1.5 / 0.01 / 0.5."""
    rec: float = 0.5
    identity: float = 0.25
    reg: float = 0.1
    landmark: float = 5e-4
    area: float = 0.06

    @classmethod
    def g1(cls) -> Step4MoFAWeights:
        return cls(rec=4.0, identity=0.5, reg=0.01 / 1.5, landmark=0.01, area=0.5)


@dataclass(frozen=True)
class LossPreset:
    """Everything ``--loss_preset`` selects, in one place (Steps 1 and 4 read it; docs/method.md §8.1, §8.3 and §10).

    step1 / step4_unet / step4_mofa: the weights of each step's terms; landmark_weights: the (68,) per-point
    weights (squared constants, see LANDMARK_WEIGHTS_G1); neighbour_radius: 1 = G1's 3x3 window, 2 = G2's 5x5;
    step4_lr_scale: the factor on Step 4's learning-rate base (G2 multiplies it by 0.8).
    """
    step1: Step1Weights
    step4_unet: Step4UNetWeights
    step4_mofa: Step4MoFAWeights
    landmark_weights: tuple[float, ...]
    neighbour_radius: int
    step4_lr_scale: float

    def without(self, names: tuple[str, ...] | list[str]) -> LossPreset:
        """This preset with the weights of the named terms set to 0 in every step that has them (an ablation;
        ``--drop_terms``). ``identity`` names the identity loss; preserve and dist are named on their own.
        ValueError for a name no step has, or when every term of a step (or of a Step-4 phase) would be dropped."""
        steps = ("step1", "step4_unet", "step4_mofa")
        known = {f.name for step in steps for f in dataclasses.fields(getattr(self, step))}
        unknown = sorted(set(names) - known)
        if unknown:
            raise ValueError(f"unknown loss terms {unknown}; the terms are {sorted(known)}")
        changed = {}
        for step in steps:
            weights = getattr(self, step)
            zero = {f.name: 0.0 for f in dataclasses.fields(weights) if f.name in names}
            changed[step] = dataclasses.replace(weights, **zero)
            if all(getattr(changed[step], f.name) == 0 for f in dataclasses.fields(weights)):
                raise ValueError(f"that drops every term of {type(weights).__name__} "
                                 f"({', '.join(f.name for f in dataclasses.fields(weights))}): nothing would train")
        return dataclasses.replace(self, **changed)


PRESETS: dict[str, LossPreset] = {
    "g2": LossPreset(Step1Weights(), Step4UNetWeights(), Step4MoFAWeights(), LANDMARK_WEIGHTS_G2,
                     neighbour_radius=2, step4_lr_scale=0.8),
    "g1_weights": LossPreset(Step1Weights.g1(), Step4UNetWeights.g1(), Step4MoFAWeights.g1(), LANDMARK_WEIGHTS_G1,
                             neighbour_radius=1, step4_lr_scale=1.0),
}
"""``--loss_preset`` name -> preset; "g2" (the FOCUS-era code) is the default. "g1_weights" takes G1's weights,
landmark weights, neighbour window and learning-rate factor only: the terms stay G2's (G1's dist compared FaceNet
features of the render and the image in the same frame, without a warp or width normalisation), so it does not
reproduce G1's Step 4."""


def weighted_sum(terms: Mapping[str, torch.Tensor | None], weights: object) -> torch.Tensor:
    """The one place where loss weights are applied: sum over names of getattr(weights, name) * terms[name].

    terms: every field of the ``weights`` dataclass must be a key (pass None to skip a term, e.g. the identity
    terms when no ArcFace weights were given); unknown keys are an error, so a term is never silently dropped.
    Returns a scalar tensor; raises ValueError when every term is None.
    """
    names = [f.name for f in dataclasses.fields(weights)]
    unknown = sorted(set(terms) - set(names))
    missing = sorted(set(names) - set(terms))
    if unknown or missing:
        raise ValueError(f"weighted_sum({type(weights).__name__}): unknown terms {unknown}, missing terms "
                         f"{missing} (pass None to skip a term)")
    present = [(name, terms[name]) for name in names if terms[name] is not None]
    if not present:
        raise ValueError(f"weighted_sum({type(weights).__name__}): every term is None")
    total = None
    for name, value in present:
        part = getattr(weights, name) * value
        total = part if total is None else total + part
    return total
