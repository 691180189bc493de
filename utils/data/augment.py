"""G2's training augmentation: one random affine per sample, applied to the image, its masks and its landmarks.

G2 (``util/load_dataset.py``, ``UNet/unet_load_data.py``; docs/method.md §3.2 step 4) draws, for every training
sample, a shift of up to +-10 px at 224 px, a scale of 1 +- 0.1, a rotation of up to +-10 degrees and a horizontal
flip with probability 0.5. The reference gives the ranges, not their distributions: here each is uniform on its
range. The shift is scaled with the image (+-10 * S / 224 px at S px), so a 96-px demo image gets the same relative
motion.

All of it is one 2x3 affine ``M`` (source pixel -> augmented pixel, pixel centres at integer coordinates, the
convention of ``cv2.warpAffine`` and ``datasets.scale_landmarks``), built about the image centre::

    p' = c + shift + s * R(angle) @ Flip @ (p - c),    c = ((W - 1) / 2, (H - 1) / 2)

Images are resampled bicubically (G2) and masks with the nearest neighbour, so a 0/1 mask stays 0/1; whatever the
warp brings in from outside the image is black (0), and 0 in a mask (not visible face). Landmarks go through ``M``
and, when flipped, are permuted with the iBUG-68 mirror map (``models.landmarks68.MIRROR_68``): the subject's right
eye corner, now on the image right, takes the index of the left one.

Exact resume: the parameters of a sample are a function of ``(seed, epoch, index)`` only (``draw_params``), never of
a global random stream or of a DataLoader worker, so two loaders with one seed give the same batches and a resumed
run sees the batches of an uninterrupted one. The training loader's sampler hands the epoch to the dataset with the
index (``ResumableSampler(keyed=True)`` yields ``(epoch, index)`` pairs, see ``utils.training.data_order``); a plain
integer index (validation, evaluation, direct access) gets no augmentation.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from models.landmarks68 import MIRROR_68, N_LANDMARKS

REFERENCE_SIZE = 224  # G2's image size, at which its shift range is given
_STREAM = 0x6A7567  # separates these draws from any other use of the same seed


@dataclass(frozen=True)
class AugmentRanges:
    """The ranges of the random affine (G2's by default). ``shift_px`` is at ``REFERENCE_SIZE`` px."""

    shift_px: float = 10.0
    scale: float = 0.1
    rotate_deg: float = 10.0
    flip_p: float = 0.5


G2_RANGES = AugmentRanges()


@dataclass(frozen=True)
class AugmentParams:
    """One sample's draw: shift (px of this image), scale factor, rotation (degrees), horizontal flip."""

    dx: float
    dy: float
    scale: float
    angle_deg: float
    flip: bool


def draw_params(seed: int, epoch: int, index: int, hw: tuple[int, int],
                ranges: AugmentRanges = G2_RANGES) -> AugmentParams:
    """The parameters of sample ``index`` in ``epoch`` for a run seeded ``seed`` and an image of ``hw`` = (H, W)
    pixels: uniform shift, scale and angle on their ranges, flip with probability ``ranges.flip_p``. A pure
    function of its arguments (numpy's SeedSequence of (seed, epoch, index))."""
    rng = np.random.default_rng([_STREAM, int(seed) % 2 ** 63, int(epoch), int(index)])
    shift, scale, angle = rng.uniform(-1.0, 1.0, size=2), rng.uniform(-1.0, 1.0), rng.uniform(-1.0, 1.0)
    flip = rng.uniform(0.0, 1.0)
    height, width = hw
    return AugmentParams(dx=float(shift[0] * ranges.shift_px * width / REFERENCE_SIZE),
                         dy=float(shift[1] * ranges.shift_px * height / REFERENCE_SIZE),
                         scale=float(1.0 + scale * ranges.scale), angle_deg=float(angle * ranges.rotate_deg),
                         flip=bool(flip < ranges.flip_p))


def affine_matrix(params: AugmentParams, hw: tuple[int, int]) -> np.ndarray:
    """The (2, 3) float64 map source pixel -> augmented pixel of ``params`` for an image of ``hw`` = (H, W)."""
    height, width = hw
    centre = np.array([(width - 1) / 2.0, (height - 1) / 2.0])
    theta = math.radians(params.angle_deg)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    flip = np.diag([-1.0 if params.flip else 1.0, 1.0])
    linear = params.scale * rotation @ flip
    offset = centre + np.array([params.dx, params.dy]) - linear @ centre
    return np.concatenate([linear, offset[:, None]], axis=1)


def warp_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``(..., 2)`` pixel coordinates through the (2, 3) affine, float32."""
    pts = np.asarray(points, dtype=np.float64)
    return (pts @ matrix[:, :2].T + matrix[:, 2]).astype(np.float32)


def warp_image(image: np.ndarray, matrix: np.ndarray, nearest: bool = False) -> np.ndarray:
    """An (H, W) or (H, W, C) array through the affine, same shape and dtype: bicubic (uint8 saturates, float
    images are clipped to [0, 1]) or, with ``nearest``, nearest-neighbour (masks); black outside the source."""
    height, width = image.shape[:2]
    flags = cv2.INTER_NEAREST if nearest else cv2.INTER_CUBIC
    out = cv2.warpAffine(image, matrix, (width, height), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if out.ndim < image.ndim:  # OpenCV drops a trailing channel axis of 1
        out = out[..., None]
    if not nearest and np.issubdtype(out.dtype, np.floating):
        out = np.clip(out, 0.0, 1.0)
    return out


def mirror_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """Renumber ``(..., 68, 2)`` landmarks of a horizontally flipped image: point i takes the position of its mirror
    partner ``MIRROR_68[i]`` (the positions must already be flipped)."""
    return np.asarray(landmarks)[..., list(MIRROR_68), :]


def augment_arrays(params: AugmentParams, images: Sequence[np.ndarray] = (), masks: Sequence[np.ndarray] = (),
                   landmarks: np.ndarray | None = None):
    """Apply one draw to aligned arrays of one sample (all (H, W[, C]) of one size): ``images`` bicubically,
    ``masks`` nearest-neighbour, ``landmarks`` ``(68, 2)`` pixels (mapped, and mirrored when flipped).
    Returns ``(images list, masks list, landmarks or None)``."""
    shapes = {a.shape[:2] for a in (*images, *masks)}
    if len(shapes) != 1:
        raise ValueError(f"augment_arrays: expected arrays of one (H, W), got {sorted(shapes)}")
    hw = shapes.pop()
    matrix = affine_matrix(params, hw)
    out_images = [warp_image(a, matrix) for a in images]
    out_masks = [warp_image(a, matrix, nearest=True) for a in masks]
    out_lms = None
    if landmarks is not None:
        if landmarks.shape != (N_LANDMARKS, 2):
            raise ValueError(f"augment_arrays: expected ({N_LANDMARKS}, 2) landmarks, got {landmarks.shape}")
        out_lms = warp_points(landmarks, matrix)
        if params.flip:
            out_lms = mirror_landmarks(out_lms)
    return out_images, out_masks, out_lms


class Augmenter:
    """G2's augmentation for one run: ``augmenter.params(epoch, index, hw)`` is the draw of a training sample."""

    def __init__(self, seed: int, ranges: AugmentRanges = G2_RANGES) -> None:
        self.seed, self.ranges = int(seed), ranges

    def params(self, epoch: int, index: int, hw: tuple[int, int]) -> AugmentParams:
        return draw_params(self.seed, epoch, index, hw, self.ranges)

    def __repr__(self) -> str:
        return f"Augmenter(seed={self.seed}, ranges={self.ranges})"


def split_key(key) -> tuple[int | None, int]:
    """A dataset key -> ``(epoch, index)``: ``(epoch, index)`` pairs come from a keyed ``ResumableSampler``; a plain
    integer (validation, evaluation, direct access) has no epoch (None: not augmented)."""
    if isinstance(key, (tuple, list)):
        epoch, index = key
        return int(epoch), int(index)
    return None, int(key)


def augmenter_from_args(args) -> Augmenter | None:
    """The augmentation a training step's flags ask for (``--augment``, the default, / ``--no_augment``; see
    ``utils.training.flags.add_augment_arg``), seeded with ``--seed``; None when it is off."""
    return Augmenter(args.seed) if getattr(args, "augment", False) else None
