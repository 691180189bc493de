"""The loss terms of each step, computed from model outputs (docs/method.md §8).

Each function returns a dict ``name -> scalar tensor or None`` whose keys are exactly the fields of the matching
weights dataclass in ``utils.losses``; the step script applies the weights with ``weighted_sum`` in one place.
A term is None when it cannot be computed (the identity terms with --identity none) or when it is in ``skip``: the
step passes ``zero_weight_terms(weights)`` in training, and the costly terms in it (the identity network's calls,
the neighbour search) are not computed at all; the cheap ones are computed and dropped.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from models.layout import CoeffLayout
from models.unet import mask_from_logits
from utils import losses


@dataclass(frozen=True)
class LossSetup:
    """What the terms need besides the tensors: the layout, landmark weights (68,) and the pixel scale to the
    224-pixel frame (224 / image_size), so a smaller image is the same scene for the landmark loss.
    ``dist_landmarks``: which landmarks align the masked render R*M for the dist term: "predicted" (G2) or "gt",
    the same alignment as the masked image I*M it is compared with (``--dist_landmarks``)."""

    layout: CoeffLayout
    landmark_weights: torch.Tensor
    landmark_scale: float = 1.0
    sigma: float = losses.SIGMA
    neighbour_radius: int = 2
    dist_landmarks: str = "predicted"

    @classmethod
    def from_preset(cls, preset: losses.LossPreset, layout: CoeffLayout, image_size: int,
                    **kwargs) -> LossSetup:
        """The setup of a ``--loss_preset`` (landmark weights, neighbour window) for ``image_size`` pixel images."""
        return cls(layout, torch.tensor(preset.landmark_weights), landmark_scale=224.0 / image_size,
                   neighbour_radius=preset.neighbour_radius, **kwargs)


def zero_weight_terms(weights) -> frozenset[str]:
    """The names of the fields of a weights dataclass whose weight is 0 (the terms --drop_terms removes)."""
    return frozenset(f.name for f in dataclasses.fields(weights) if getattr(weights, f.name) == 0)


def _without(terms: dict, skip: frozenset[str]) -> dict:
    """``terms`` with the values of the names in ``skip`` replaced by None."""
    return {name: None if name in skip else value for name, value in terms.items()}


def _prior_terms(out, landmarks_gt: torch.Tensor, setup: LossSetup) -> dict:
    parts = setup.layout.split(out.coeffs)
    return {
        "landmark": losses.landmark_loss(out.landmarks, landmarks_gt, setup.landmark_weights.to(out.coeffs),
                                         scale=setup.landmark_scale),
        "reg": losses.coeff_regulariser(parts.shape, parts.exp, parts.tex),
    }


def _identity(identity, out, images: torch.Tensor, landmarks_gt: torch.Tensor):
    """Identity (cosine) loss between the render, aligned with its predicted landmarks, and the input, aligned
    with the GT landmarks. The predicted landmarks only place the crop: they are detached, as G2 warps with
    detached landmarks (its util/preprocess.py), so the identity term trains the render through its pixels, not
    through where the crop is placed."""
    if identity is None:
        return None
    f_rec = identity(out.image, out.landmarks.detach())
    f_gt = identity(images, landmarks_gt)
    return losses.identity_loss(f_rec, f_gt.detach())


def step1_terms(out, images: torch.Tensor, landmarks_gt: torch.Tensor, setup: LossSetup, identity=None,
                skip: frozenset[str] = frozenset()):
    """Step 1 terms and the robust loss's inlier mask (B,1,H,W), for visualisation (computed even if skipped)."""
    photo, inliers = losses.robust_photometric(images, out.image, out.mask, sigma=setup.sigma)
    terms = {"photo": photo, **_prior_terms(out, landmarks_gt, setup),
             "identity": None if "identity" in skip else _identity(identity, out, images, landmarks_gt)}
    return _without(terms, skip), inliers


def unet_input(out, images: torch.Tensor) -> torch.Tensor:
    """The UNet's input ``cat([render, image])`` (B,6,H,W); the render is not detached (docs/method.md §7)."""
    return torch.cat([out.image, images], dim=1)


def unet_mask(unet, out, images: torch.Tensor) -> torch.Tensor:
    """UNet mask U (B,1,H,W) in (0,1): ``mask_from_logits`` (G2's sigmoid(5 x) head, models/unet.py) of the UNet
    applied to ``unet_input``. Steps 3 and 4, the evaluation and reconstruct.py all get their masks from here or
    from ``mask_from_logits``."""
    return mask_from_logits(unet(unet_input(out, images)))


def mask_in_face(U: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Mean UNet mask inside the rendered face, pooled over the batch: sum(U F) / max(sum F, 1), detached.
    U, region F: (B,1,H,W). Near 0 or 1 the mask has collapsed (``guards.CollapseGuard``)."""
    return ((U * region).sum() / region.sum().clamp(min=1)).detach()


def step4_unet_terms(U: torch.Tensor, out, images: torch.Tensor, landmarks_gt: torch.Tensor, setup: LossSetup,
                     identity=None, skip: frozenset[str] = frozenset()) -> dict:
    """Step 4 UNet-phase terms (docs/method.md §8.3): binary, area, preserve, dist, neighbour. The predicted landmarks
    that align R*M for dist are detached (as in ``_identity``)."""
    M = out.mask * U
    preserve = dist = None
    if identity is not None and not {"preserve", "dist"} <= skip:
        phi_i = None if "preserve" in skip else identity.shallow(images, landmarks_gt)
        phi_im = identity.shallow(images * M, landmarks_gt)
        if phi_i is not None:
            preserve = losses.feature_cosine_loss(phi_i, phi_im)
        if "dist" not in skip:
            render_landmarks = landmarks_gt if setup.dist_landmarks == "gt" else out.landmarks.detach()
            dist = losses.feature_cosine_loss(identity.shallow(out.image * M, render_landmarks), phi_im)
    return _without({
        "binary": losses.binary_loss(M),
        "area": losses.area_loss(out.mask, U),
        "preserve": preserve,
        "dist": dist,
        "neighbour": None if "neighbour" in skip else losses.neighbour_loss(M, out.image, images,
                                                                          radius=setup.neighbour_radius),
    }, skip)


def step4_mofa_terms(U: torch.Tensor, out, images: torch.Tensor, landmarks_gt: torch.Tensor, setup: LossSetup,
                     identity=None, skip: frozenset[str] = frozenset()) -> dict:
    """Step 4 MoFA-phase terms (docs/method.md §8.3): masked reconstruction, identity, regulariser, landmark, area."""
    M = out.mask * U
    return _without({
        "rec": None if "rec" in skip else losses.masked_reconstruction(images, out.image, M),
        "identity": None if "identity" in skip else _identity(identity, out, images, landmarks_gt),
        **_prior_terms(out, landmarks_gt, setup),
        "area": losses.area_loss(out.mask, U),
    }, skip)
