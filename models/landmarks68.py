"""The iBUG-68 (300-W) landmark scheme: its size, its mirror map and the five alignment points derived from it.

0-based indices: jaw 0-16, brows 17-26, nose 27-35, eyes 36-47 (36-41 the subject's right eye, on the image left),
outer mouth 48-59, inner mouth 60-67.

The five alignment points follow the G2 code (docs/method.md §3.2 step 2, §8.1 item 4): each eye centre is the mean of
its two corners (36 and 39, 42 and 45), then the nose tip 30 and the mouth corners 48 and 54. The ArcFace warp and
``utils.prepare.detect_landmarks`` both use this one definition.
"""
from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

from models.errors import ModelInputError

N_LANDMARKS = 68
FIVE_POINT_GROUPS: tuple[tuple[int, ...], ...] = ((36, 39), (42, 45), (30,), (48,), (54,))
"""Landmarks averaged into each of the five points, in order: eye centre (image left), eye centre (image right),
nose tip, mouth corner 48, mouth corner 54."""

Points = TypeVar("Points", np.ndarray, torch.Tensor)


def five_points(landmarks: Points) -> Points:
    """``(..., 68, 2)`` landmarks -> ``(..., 5, 2)`` alignment points (`FIVE_POINT_GROUPS`), same type and frame.

    Works on numpy arrays and on torch tensors (differentiable). Raises ModelInputError for another shape.
    """
    if tuple(landmarks.shape[-2:]) != (N_LANDMARKS, 2):
        raise ModelInputError(f"expected (..., {N_LANDMARKS}, 2) landmarks, got {tuple(landmarks.shape)}")
    parts = [landmarks[..., list(group), :].mean(-2) for group in FIVE_POINT_GROUPS]
    return torch.stack(parts, -2) if isinstance(landmarks, torch.Tensor) else np.stack(parts, -2)


def _mirror_map() -> tuple[int, ...]:
    pairs = [(j, 16 - j) for j in range(8)]  # jaw, 8 = chin
    pairs += [(17 + j, 26 - j) for j in range(5)]  # brows
    pairs += [(31, 35), (32, 34)]  # nostrils; 27-30 (bridge, tip) and 33 are on the midline
    pairs += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes
    pairs += [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58)]  # outer mouth; 51 and 57 on the midline
    pairs += [(60, 64), (61, 63), (65, 67)]  # inner mouth; 62 and 66 on the midline
    mirror = list(range(N_LANDMARKS))
    for a, b in pairs:
        mirror[a], mirror[b] = b, a
    return tuple(mirror)


MIRROR_68: tuple[int, ...] = _mirror_map()
"""The iBUG-68 mirror map: ``MIRROR_68[i]`` is the point that sits where point i would be on the face's mirror
image (jaw j <-> 16 - j, brows, nostrils, eyes 36 <-> 45 ..., mouth 48 <-> 54 ...; midline points map to
themselves). A horizontally flipped image's landmarks are ``flipped_positions[..., MIRROR_68, :]``."""
