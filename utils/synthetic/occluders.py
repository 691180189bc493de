"""Procedural occluders for the synthetic occluded-face benchmark (see `utils/synthetic/faces.py`).

Each occluder is a function ``draw(landmarks, size, rng, textures) -> OccluderLayer``: given the face's 68
iBUG landmarks ``(68, 2)`` (pixels, origin top-left, x right, y down) in an ``size x size`` image, it draws an
RGB layer and an alpha mask on a blank canvas so that the occluder lands on the face. The caller composites
``image = alpha * rgb + (1 - alpha) * image``; a pixel counts as occluded where ``alpha > 0.5``.

Two families mimic the occlusions of the evaluation sets of the paper:

* AR-like (`AR_OCCLUDERS`): ``sunglasses`` (two dark lenses with a specular gradient, bridge and temples) and
  ``scarf`` (a textured band from below the nose past the chin and neck).
* CelebA-like (`CELEBA_OCCLUDERS`): ``hand`` (palm, finger capsules and arm in skin tones), ``microphone``,
  ``cup``, ``hat``, ``hair`` (thin curved strands), ``polygon`` and ``ellipse`` (textured shapes).

Shapes are laid out in a face frame built from the landmarks (`FaceFrame`): x along the eye line in units of the
inter-ocular distance, y perpendicular to it (down the face) in units of the eye-to-mouth distance, so the
occluders follow the face's position, size, roll and (through foreshortening) yaw. Everything is numpy/OpenCV
(no per-pixel Python loops); all randomness comes from the `numpy.random.Generator` passed in.
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import cv2
import numpy as np

from utils.errors import DataError

# iBUG-68 landmark groups (0-based).
JAW = slice(0, 17)
BROWS = slice(17, 27)
RIGHT_EYE = slice(36, 42)  # the subject's right eye: image left in a frontal view
LEFT_EYE = slice(42, 48)
NOSE_BOTTOM = slice(31, 36)
MOUTH = slice(48, 68)
NOSE_TIP, CHIN = 30, 8

SKIN_TONES = np.array([  # RGB in [0, 1], light to dark
    [0.96, 0.80, 0.69], [0.92, 0.72, 0.58], [0.85, 0.64, 0.50], [0.76, 0.55, 0.40],
    [0.62, 0.43, 0.30], [0.48, 0.32, 0.22], [0.36, 0.24, 0.17]], dtype=np.float32)
HAIR_COLOURS = np.array([
    [0.06, 0.05, 0.04], [0.16, 0.10, 0.06], [0.30, 0.19, 0.10], [0.45, 0.30, 0.16],
    [0.62, 0.48, 0.30], [0.40, 0.12, 0.06]], dtype=np.float32)


@dataclass(frozen=True)
class OccluderLayer:
    """An occluder drawn on a blank canvas.

    rgb: ``(H, W, 3)`` float32 RGB in [0, 1] (only meaningful where alpha > 0).
    alpha: ``(H, W)`` float32 in [0, 1], anti-aliased coverage; occluded pixels are ``alpha > 0.5``.
    """

    rgb: np.ndarray
    alpha: np.ndarray


class FaceFrame:
    """A 2-D face frame from 68 landmarks ``(68, 2)`` (pixels, x right, y down).

    ``to_image(points)`` maps face-frame points ``(..., 2)`` to pixels: the origin is the midpoint of the eye
    centres, x runs from the subject's right eye to the left eye with unit = inter-ocular distance, y runs
    perpendicular to it, down the face, with unit = eye-midpoint-to-mouth-centre distance.
    """

    def __init__(self, landmarks: np.ndarray) -> None:
        points = np.asarray(landmarks, dtype=np.float64)
        if points.shape != (68, 2) or not np.isfinite(points).all():
            raise DataError(f"occluders need finite (68, 2) landmarks, got shape {points.shape}")
        self.landmarks = points
        self.right_eye = points[RIGHT_EYE].mean(0)
        self.left_eye = points[LEFT_EYE].mean(0)
        self.origin = 0.5 * (self.right_eye + self.left_eye)
        eye_vec = self.left_eye - self.right_eye
        self.iod = max(float(np.hypot(*eye_vec)), 1.0)
        self.x_axis = eye_vec / self.iod
        self.down = np.array([-self.x_axis[1], self.x_axis[0]])
        mouth = points[MOUTH].mean(0)
        self.eye_mouth = max(float((mouth - self.origin) @ self.down), 0.5 * self.iod)
        self.roll_deg = float(np.degrees(np.arctan2(self.x_axis[1], self.x_axis[0])))

    def to_image(self, points: np.ndarray) -> np.ndarray:
        """Face-frame points ``(..., 2)`` -> image pixels ``(..., 2)``."""
        points = np.asarray(points, dtype=np.float64)
        return (self.origin + points[..., :1] * self.iod * self.x_axis
                + points[..., 1:2] * self.eye_mouth * self.down)

    def to_face(self, pixels: np.ndarray) -> np.ndarray:
        """Image pixels ``(..., 2)`` -> face-frame points ``(..., 2)`` (inverse of `to_image`)."""
        rel = np.asarray(pixels, dtype=np.float64) - self.origin
        return np.stack([rel @ self.x_axis / self.iod, rel @ self.down / self.eye_mouth], -1)


# ----- drawing primitives -------------------------------------------------------------------------------------

_SHIFT = 4  # cv2 fractional bits: sub-pixel accurate anti-aliased drawing
_ONE = 1 << _SHIFT


def _fixed(points: np.ndarray) -> np.ndarray:
    """Pixel coordinates ``(..., 2)`` -> int32 fixed point for cv2 drawing with `_SHIFT` fractional bits."""
    return np.round(np.asarray(points, dtype=np.float64) * _ONE).astype(np.int32)


def fill_polygon(size: int, polygon: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage ``(size, size)`` float32 in [0, 1] of a polygon ``(K, 2)`` in pixels."""
    canvas = np.zeros((size, size), np.uint8)
    cv2.fillPoly(canvas, [_fixed(polygon).reshape(-1, 1, 2)], 255, cv2.LINE_AA, _SHIFT)
    return canvas.astype(np.float32) / 255.0


def fill_ellipse(size: int, centre: np.ndarray, axes: tuple[float, float], angle_deg: float) -> np.ndarray:
    """Anti-aliased coverage ``(size, size)`` of an ellipse (centre pixels, semi-axes pixels, rotation degrees)."""
    t = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
    local = np.stack([axes[0] * np.cos(t), axes[1] * np.sin(t)], -1)
    a = np.radians(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return fill_polygon(size, np.asarray(centre) + local @ rot.T)


def stroke(size: int, points: np.ndarray, thickness: float) -> np.ndarray:
    """Anti-aliased coverage ``(size, size)`` of a polyline ``(K, 2)`` with round joints and caps."""
    canvas = np.zeros((size, size), np.uint8)
    width = max(1, int(round(thickness)))
    cv2.polylines(canvas, [_fixed(points).reshape(-1, 1, 2)], False, 255, width, cv2.LINE_AA, _SHIFT)
    for end in (points[0], points[-1]):
        cv2.circle(canvas, tuple(int(v) for v in _fixed(end)), int(round(0.5 * thickness * _ONE)), 255, -1,
                   cv2.LINE_AA, _SHIFT)
    return canvas.astype(np.float32) / 255.0


def bezier(control: np.ndarray, n: int = 24) -> np.ndarray:
    """Points ``(n, 2)`` of the quadratic/cubic Bezier curve with ``(3 or 4, 2)`` control points."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    c = np.asarray(control, dtype=np.float64)
    if len(c) == 3:
        return (1 - t) ** 2 * c[0] + 2 * (1 - t) * t * c[1] + t ** 2 * c[2]
    return (1 - t) ** 3 * c[0] + 3 * (1 - t) ** 2 * t * c[1] + 3 * (1 - t) * t ** 2 * c[2] + t ** 3 * c[3]


def relief_shading(alpha: np.ndarray, rng: np.random.Generator, radius: float, strength: float = 0.6
                   ) -> np.ndarray:
    """Smooth Lambertian-like shading ``(H, W, 1)`` (about 0.45-1.15) of a soft relief built from a mask.

    The relief is the mask blurred with a Gaussian of `radius` pixels; it is lit from a random direction, so
    rounded shapes (palms, fingers, spheres) get smooth highlights and shadows.
    """
    height = cv2.GaussianBlur(alpha.astype(np.float32), (0, 0), max(radius, 0.5))
    gy, gx = np.gradient(height * radius * 2.0)
    azimuth = rng.uniform(0.0, 2.0 * np.pi)
    light = np.array([np.cos(azimuth) * 0.6, np.sin(azimuth) * 0.6, 0.8])
    norm = np.sqrt(gx * gx + gy * gy + 1.0)
    lambert = (-gx * light[0] - gy * light[1] + light[2]) / norm
    return (1.0 - strength + strength * 1.25 * np.clip(lambert, 0.0, None))[..., None].astype(np.float32)


def _layer(rgb: np.ndarray, alpha: np.ndarray) -> OccluderLayer:
    return OccluderLayer(np.clip(rgb, 0.0, 1.0).astype(np.float32), np.clip(alpha, 0.0, 1.0).astype(np.float32))


# ----- textures ----------------------------------------------------------------------------------------------

SKIMAGE_SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "coins", "brick", "grass", "gravel", "camera",
                   "hubble_deep_field", "text")
"""scikit-image sample images used as texture sources (only those bundled with the wheel load offline)."""


def value_noise(rng: np.random.Generator, height: int, width: int, cells: float = 6.0, octaves: int = 3
                ) -> np.ndarray:
    """Smooth multi-octave value noise ``(height, width)`` float32 normalised to [0, 1].

    `cells` is the number of random lattice cells across the larger side at the coarsest octave.
    """
    total = np.zeros((height, width), np.float32)
    amplitude = 1.0
    for octave in range(octaves):
        n = max(2, int(round(cells * 2 ** octave)) + 1)
        lattice = rng.random((n, n)).astype(np.float32)
        total += amplitude * cv2.resize(lattice, (width, height), interpolation=cv2.INTER_CUBIC)
        amplitude *= 0.5
    low, high = float(total.min()), float(total.max())
    return (total - low) / max(high - low, 1e-6)


def _as_rgb_float(image: np.ndarray) -> np.ndarray:
    """A skimage sample image (grey, RGB or RGBA; uint8 or bool) -> ``(H, W, 3)`` float32 in [0, 1]."""
    image = np.asarray(image)
    image = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3])


class TextureBank:
    """Texture sources: crops of scikit-image sample images and procedural noise.

    Args:
        images: ``name -> (H, W, 3)`` float32 RGB in [0, 1] images to crop from (may be empty: noise only).
    """

    def __init__(self, images: dict[str, np.ndarray]) -> None:
        self.names = tuple(sorted(images))
        self.images = [images[name] for name in self.names]

    @classmethod
    def from_skimage(cls, names: tuple[str, ...] = SKIMAGE_SOURCES) -> TextureBank:
        """Load the named ``skimage.data`` images; names that are unavailable offline are skipped."""
        import skimage.data

        images = {}
        for name in names:
            try:
                images[name] = _as_rgb_float(getattr(skimage.data, name)())
            except (AttributeError, ImportError, OSError, ValueError):
                continue
        return cls(images)

    def crop(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        """A random crop of a random source image resized to ``(height, width, 3)`` float32 (noise if no images)."""
        if not self.images:
            return self.noise_colour(rng, height, width)
        source = self.images[int(rng.integers(len(self.images)))]
        src_h, src_w = source.shape[:2]
        side = rng.uniform(0.25, 1.0) * min(src_h, src_w)
        crop_h = int(max(8, min(src_h, side * np.sqrt(height / width))))
        crop_w = int(max(8, min(src_w, side * np.sqrt(width / height))))
        top = int(rng.integers(0, src_h - crop_h + 1))
        left = int(rng.integers(0, src_w - crop_w + 1))
        patch = source[top:top + crop_h, left:left + crop_w]
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        return cv2.resize(np.ascontiguousarray(patch), (width, height), interpolation=cv2.INTER_AREA)

    def noise_colour(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        """Coloured procedural noise ``(height, width, 3)``: a blend between two random colours."""
        mix = value_noise(rng, height, width, cells=rng.uniform(2.0, 12.0), octaves=int(rng.integers(2, 5)))
        colours = rng.random((2, 3)).astype(np.float32)
        return mix[..., None] * colours[0] + (1.0 - mix[..., None]) * colours[1]

    def texture(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        """A random texture ``(height, width, 3)`` in [0, 1]: a (sometimes tinted) image crop or coloured noise."""
        if self.images and rng.random() < 0.6:
            patch = self.crop(rng, height, width)
            if rng.random() < 0.4:
                patch = patch * rng.uniform(0.5, 1.3, 3).astype(np.float32)
            return np.clip(patch, 0.0, 1.0)
        return self.noise_colour(rng, height, width)


# ----- AR-like occluders -------------------------------------------------------------------------------------

def _pixel_grid(frame: FaceFrame, size: int) -> np.ndarray:
    """Face-frame coordinates ``(size, size, 2)`` of every pixel centre."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    return frame.to_face(np.stack([xs, ys], -1))


def _superellipse(centre: tuple[float, float], half: tuple[float, float], power: float, n: int = 40) -> np.ndarray:
    """Face-frame outline ``(n, 2)`` of a superellipse (power 2 = ellipse, larger = rounder rectangle)."""
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    x = half[0] * np.sign(c) * np.abs(c) ** (2.0 / power)
    y = half[1] * np.sign(s) * np.abs(s) ** (2.0 / power)
    return np.stack([centre[0] + x, centre[1] + y], -1)


def draw_sunglasses(frame: FaceFrame, size: int, rng: np.random.Generator, textures: TextureBank) -> OccluderLayer:
    """Two dark, slightly reflective lenses over the eyes (landmarks 36-47) with a rim, a bridge and temples."""
    half = (rng.uniform(0.3, 0.42), rng.uniform(0.22, 0.34))
    power, drop = rng.uniform(2.0, 4.5), rng.uniform(0.0, 0.08)
    lenses = [frame.to_image(_superellipse((side * 0.5, drop), half, power)) for side in (-1.0, 1.0)]
    lens_alpha = np.maximum(fill_polygon(size, lenses[0]), fill_polygon(size, lenses[1]))
    rim_width = rng.uniform(0.02, 0.06) * frame.iod + 1.0
    rim = np.maximum(stroke(size, np.vstack([lenses[0], lenses[0][:1]]), rim_width),
                     stroke(size, np.vstack([lenses[1], lenses[1][:1]]), rim_width))
    inner = 0.5 - half[0]
    bridge = frame.to_image(bezier(np.array([[-inner - 0.02, drop - 0.4 * half[1]], [0.0, drop - 0.7 * half[1]],
                                              [inner + 0.02, drop - 0.4 * half[1]]])))
    outer = 0.5 + half[0]
    temples = [frame.to_image(np.array([[s * outer, drop - 0.5 * half[1]], [s * (outer + 0.6), -0.05]]))
               for s in (-1.0, 1.0)]
    frame_alpha = np.maximum(rim, stroke(size, bridge, rim_width))
    for temple in temples:
        frame_alpha = np.maximum(frame_alpha, stroke(size, temple, 0.8 * rim_width))
    grid = _pixel_grid(frame, size)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ramp = grid[..., 0] * np.cos(angle) + grid[..., 1] * np.sin(angle) * 2.0
    streak_at = rng.uniform(-0.3, 0.3)
    streak = np.exp(-((ramp - streak_at) / rng.uniform(0.05, 0.12)) ** 2)
    tint = rng.uniform(0.02, 0.12) * rng.uniform(0.6, 1.4, 3)
    lens_rgb = tint + (0.12 * np.clip(0.5 - ramp, 0.0, 1.0) + rng.uniform(0.2, 0.5) * streak)[..., None]
    frame_rgb = rng.uniform(0.0, 0.25, 3) * (rng.random() < 0.5) + rng.uniform(0.02, 0.08)
    rgb = np.where((frame_alpha > lens_alpha)[..., None], frame_rgb, lens_rgb)
    return _layer(rgb, np.maximum(lens_alpha, frame_alpha))


def _fabric(frame: FaceFrame, size: int, rng: np.random.Generator, textures: TextureBank) -> np.ndarray:
    """A cloth texture ``(size, size, 3)``: stripes, checks, a tinted image crop or coloured noise, with folds."""
    grid = _pixel_grid(frame, size)
    base = rng.uniform(0.1, 0.9, 3)
    kind = rng.integers(4)
    if kind == 0:
        period = rng.uniform(0.15, 0.5)
        stripes = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * (grid[..., 0] + 0.6 * grid[..., 1]) / period))
        rgb = base + stripes[..., None] * (rng.uniform(0.1, 0.9, 3) - base)
    elif kind == 1:
        period = rng.uniform(0.15, 0.4)
        checks = np.sin(2 * np.pi * grid[..., 0] / period) * np.sin(2 * np.pi * grid[..., 1] / period)
        rgb = base * (1.0 + 0.35 * np.sign(checks))[..., None]
    elif kind == 2:
        rgb = textures.texture(rng, size, size) * 0.6 + base * 0.4
    else:
        rgb = base * (0.75 + 0.5 * value_noise(rng, size, size, cells=rng.uniform(8.0, 30.0)))[..., None]
    folds = np.sin(2 * np.pi * (grid[..., 1] * rng.uniform(1.5, 4.0) + 0.3 * grid[..., 0] ** 2))
    return np.clip(rgb * (0.85 + 0.15 * folds)[..., None], 0.0, 1.0)


def draw_scarf(frame: FaceFrame, size: int, rng: np.random.Generator, textures: TextureBank) -> OccluderLayer:
    """A textured band from just below (or over) the nose tip (landmarks 31-35) down past the chin and neck."""
    nose_y = float(frame.to_face(frame.landmarks[NOSE_BOTTOM]).mean(0)[1])
    top = nose_y + rng.uniform(-0.2, 0.25)
    xs = np.linspace(-2.2, 2.2, 25)
    sag = rng.uniform(-0.1, 0.35) * (xs / 1.5) ** 2
    wave = rng.uniform(0.0, 0.05) * np.sin(xs * rng.uniform(3.0, 8.0) + rng.uniform(0.0, 6.3))
    edge = np.stack([xs, top + sag + wave], -1)
    bottom = np.array([[2.2, 12.0], [-2.2, 12.0]])
    alpha = fill_polygon(size, frame.to_image(np.vstack([edge, bottom])))
    grid = _pixel_grid(frame, size)
    shade = np.clip(1.0 - 0.12 * np.abs(grid[..., 0]) - 0.05 * np.clip(grid[..., 1] - top, 0.0, None), 0.5, 1.0)
    return _layer(_fabric(frame, size, rng, textures) * shade[..., None], alpha)


AR_OCCLUDERS: dict[str, Callable[..., OccluderLayer]] = {"sunglasses": draw_sunglasses, "scarf": draw_scarf}


# ----- CelebA-like occluders ---------------------------------------------------------------------------------

def _anchor(frame: FaceFrame, rng: np.random.Generator, anchors: list[tuple[float, float]], jitter: float = 0.15
            ) -> np.ndarray:
    """A random anchor (face-frame points) plus Gaussian jitter, as image pixels ``(2,)``."""
    point = np.asarray(anchors[int(rng.integers(len(anchors)))], dtype=np.float64)
    return frame.to_image(point + rng.normal(0.0, jitter, 2))


def _direction(angle_rad: float) -> tuple[np.ndarray, np.ndarray]:
    """Unit vector at an image angle (x right, y down) and its normal."""
    d = np.array([np.cos(angle_rad), np.sin(angle_rad)])
    return d, np.array([-d[1], d[0]])


def _capsule(size: int, start: np.ndarray, end: np.ndarray, width: float) -> np.ndarray:
    return stroke(size, np.stack([start, end]), width)


def draw_hand(frame: FaceFrame, size: int, rng: np.random.Generator, textures: TextureBank) -> OccluderLayer:
    """A hand in a skin tone (palm ellipse, four finger capsules, a thumb and an arm to the image border)."""
    centre = _anchor(frame, rng, [(0.0, 1.0), (0.0, 1.4), (-0.7, 0.7), (0.7, 0.7), (-0.5, 0.1), (0.5, 0.1),
                                  (0.0, 0.55)])
    s = frame.iod * rng.uniform(0.85, 1.25)
    up = np.radians(rng.uniform(-160.0, -20.0))
    d, n = _direction(up)
    alpha = fill_ellipse(size, centre, (0.5 * s, 0.42 * s), np.degrees(up))
    for k, offset in enumerate(np.linspace(-0.26, 0.26, 4)):
        base = centre + d * 0.35 * s + n * offset * s
        f_dir, _ = _direction(up + np.radians(offset * 60.0 + rng.normal(0.0, 6.0)))
        length = s * rng.uniform(0.45, 0.75) * (1.0 - 0.2 * abs(k - 1.5) / 1.5)
        alpha = np.maximum(alpha, _capsule(size, base, base + f_dir * length, 0.17 * s))
    side = 1.0 if rng.random() < 0.5 else -1.0
    t_dir, _ = _direction(up + side * np.radians(rng.uniform(40.0, 80.0)))
    thumb_base = centre + n * side * 0.3 * s
    alpha = np.maximum(alpha, _capsule(size, thumb_base, thumb_base + t_dir * 0.5 * s, 0.2 * s))
    arm = np.array([centre - d * 0.35 * s + n * 0.32 * s, centre - d * 6.0 * s + n * 0.45 * s,
                    centre - d * 6.0 * s - n * 0.45 * s, centre - d * 0.35 * s - n * 0.32 * s])
    alpha = np.maximum(alpha, fill_polygon(size, arm))
    colour = SKIN_TONES[int(rng.integers(len(SKIN_TONES)))] * rng.uniform(0.9, 1.1, 3)
    grain = 0.94 + 0.06 * value_noise(rng, size, size, cells=20.0)[..., None]
    return _layer(colour * relief_shading(alpha, rng, 0.12 * s) * grain, alpha)


def draw_microphone(frame: FaceFrame, size: int, rng: np.random.Generator, textures: TextureBank
                    ) -> OccluderLayer:
    """A microphone near the mouth: a grey meshed sphere on a dark handle running to the image border."""
    centre = frame.to_image(np.array([rng.uniform(-0.5, 0.5), rng.uniform(0.8, 1.3)]))
    r = frame.iod * rng.uniform(0.38, 0.62)
    d, n = _direction(np.radians(90.0 + rng.uniform(-45.0, 45.0)))
    head = fill_ellipse(size, centre, (r, r), 0.0)
    handle = fill_polygon(size, np.array([centre + n * 0.35 * r, centre + d * 12.0 * r + n * 0.25 * r,
                                          centre + d * 12.0 * r - n * 0.25 * r, centre - n * 0.35 * r]))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    period = max(r / 4.0, 1.5)
    mesh = 0.75 + 0.25 * np.abs(np.sin(np.pi * xs / period) * np.sin(np.pi * ys / period))
    grey = rng.uniform(0.15, 0.45) * mesh[..., None] * np.ones(3)
    dark = np.full(3, rng.uniform(0.02, 0.1)) + rng.uniform(0.0, 0.08, 3) * (rng.random() < 0.4)
    rgb = np.where((head >= handle)[..., None], grey, dark)
    alpha = np.maximum(head, handle)
    return _layer(rgb * relief_shading(alpha, rng, 0.35 * r, strength=0.7), alpha)


def draw_cup(frame: FaceFrame, size: int, rng: np.random.Generator, textures: TextureBank) -> OccluderLayer:
    """A cup or mug in front of the mouth/chin: a tapered rounded body, a dark rim and a ring handle."""
    centre = frame.to_image(np.array([rng.uniform(-0.6, 0.6), rng.uniform(0.9, 1.5)]))
    w, h = frame.iod * rng.uniform(0.9, 1.3), frame.iod * rng.uniform(1.1, 1.6)
    tilt = np.radians(frame.roll_deg + rng.uniform(-15.0, 15.0))
    ax, ay = _direction(tilt)
    body = _superellipse((0.0, 0.0), (0.5, 0.5), rng.uniform(4.0, 8.0))
    body[:, 0] *= np.where(body[:, 1] > 0, 1.0 - 0.3 * body[:, 1], 1.0)  # narrower towards the bottom

    def to_px(points: np.ndarray) -> np.ndarray:  # cup frame (x across, y down, units w and h) -> pixels
        return centre + points[..., :1] * w * ax + points[..., 1:2] * h * ay

    alpha = fill_polygon(size, to_px(body))
    side = 1.0 if rng.random() < 0.5 else -1.0
    ring_c = to_px(np.array([side * 0.48, -0.05]))
    ring = np.clip(fill_ellipse(size, ring_c, (0.28 * w, 0.3 * h), np.degrees(tilt))
                   - fill_ellipse(size, ring_c, (0.16 * w, 0.2 * h), np.degrees(tilt)), 0.0, 1.0)
    alpha = np.maximum(alpha, ring)
    rim = fill_ellipse(size, to_px(np.array([0.0, -0.45])), (0.45 * w, 0.08 * w), np.degrees(tilt))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    u = ((xs - centre[0]) * ax[0] + (ys - centre[1]) * ax[1]) / (0.5 * w)
    cylinder = (0.6 + 0.45 * np.cos(np.clip(u, -1.0, 1.0) * np.pi / 2 - rng.uniform(-0.5, 0.5)))[..., None]
    colour = rng.uniform(0.15, 0.95, 3) if rng.random() < 0.7 else np.full(3, rng.uniform(0.8, 0.95))
    rgb = colour * np.ones((size, size, 3))
    if rng.random() < 0.4:
        rgb = 0.5 * rgb + 0.5 * textures.texture(rng, size, size)
    rgb = rgb * cylinder
    rgb = np.where((rim > 0.5)[..., None], rng.uniform(0.05, 0.3) * np.array([1.0, 0.7, 0.45]), rgb)
    return _layer(rgb, alpha)


def draw_hat(frame: FaceFrame, size: int, rng: np.random.Generator, textures: TextureBank) -> OccluderLayer:
    """A hat: a crown over the top of the head down to a brim line on the forehead (sometimes over the brows)."""
    brow_y = float(frame.to_face(frame.landmarks[BROWS])[:, 1].mean())
    brim = brow_y - rng.uniform(-0.08, 0.5)
    half_width = rng.uniform(1.3, 1.8)
    xs = np.linspace(-half_width, half_width, 25)
    edge = np.stack([xs, brim + rng.uniform(-0.15, 0.25) * (xs / half_width) ** 2], -1)
    dome = _superellipse((0.0, brim), (half_width, rng.uniform(1.4, 2.2)), rng.uniform(2.0, 5.0), n=48)
    crown = np.vstack([edge, dome[dome[:, 1] < brim][::-1]])
    alpha = fill_polygon(size, frame.to_image(crown))
    rgb = _fabric(frame, size, rng, textures)
    if rng.random() < 0.5:
        visor = _superellipse((0.0, brim), (rng.uniform(1.1, 1.6), rng.uniform(0.1, 0.25)), 2.0)
        visor_alpha = fill_polygon(size, frame.to_image(visor))
        rgb = np.where((visor_alpha > alpha)[..., None], rgb * 0.7, rgb)
        alpha = np.maximum(alpha, visor_alpha)
    grid = _pixel_grid(frame, size)
    band = (grid[..., 1] > brim - rng.uniform(0.1, 0.3)) & (rng.random() < 0.5)
    rgb = np.where(band[..., None], rng.uniform(0.05, 0.9, 3), rgb)
    return _layer(rgb * (1.0 - 0.08 * np.abs(grid[..., 0]))[..., None], alpha)


def draw_hair(frame: FaceFrame, size: int, rng: np.random.Generator, textures: TextureBank,
              colour: np.ndarray | None = None) -> OccluderLayer:
    """Locks of thin curved dark/brown strands falling from above the forehead over the forehead and an eye.

    ``colour`` (RGB ``(3,)``, e.g. the hair of a drawn head) replaces the random colour; the random stream is the
    same either way, so the strands are too.
    """
    drawn = HAIR_COLOURS[int(rng.integers(len(HAIR_COLOURS)))] * rng.uniform(0.8, 1.2)
    colour = drawn if colour is None else np.asarray(colour, dtype=np.float32)
    alpha = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        x0, drift, width = rng.uniform(-0.9, 0.9), rng.uniform(-0.7, 0.7), rng.uniform(0.15, 0.5)
        end_y, bend = rng.uniform(-0.3, 0.7), rng.uniform(-0.4, 0.4)
        for _ in range(int(rng.integers(8, 26))):
            start = x0 + rng.uniform(-width, width)
            end = start + drift + rng.normal(0.0, 0.12)
            control = np.array([[start, -1.9], [start + bend, -1.0], [end - bend, end_y - 0.4],
                                [end, end_y + rng.normal(0.0, 0.15)]])
            thickness = frame.iod * rng.uniform(0.015, 0.04) + 0.5
            alpha = np.maximum(alpha, stroke(size, frame.to_image(bezier(control)), thickness))
    sheen = 0.7 + 0.6 * value_noise(rng, size, size, cells=rng.uniform(10.0, 25.0))
    return _layer(colour * sheen[..., None], alpha)


def draw_polygon(frame: FaceFrame, size: int, rng: np.random.Generator, textures: TextureBank) -> OccluderLayer:
    """A random star-shaped polygon (3-9 corners) textured with an image crop or noise, somewhere on the face."""
    centre = frame.to_image(np.array([rng.uniform(-1.0, 1.0), rng.uniform(-0.6, 1.4)]))
    corners = int(rng.integers(3, 10))
    angles = np.sort(rng.uniform(0.0, 2.0 * np.pi, corners))
    radii = frame.iod * rng.uniform(0.5, 1.2) * rng.uniform(0.5, 1.0, corners)
    polygon = centre + np.stack([np.cos(angles), np.sin(angles)], -1) * radii[:, None]
    return _layer(textures.texture(rng, size, size), fill_polygon(size, polygon))


def draw_ellipse(frame: FaceFrame, size: int, rng: np.random.Generator, textures: TextureBank) -> OccluderLayer:
    """A random textured ellipse somewhere on the face."""
    centre = frame.to_image(np.array([rng.uniform(-1.0, 1.0), rng.uniform(-0.6, 1.4)]))
    axes = (frame.iod * rng.uniform(0.3, 0.9), frame.iod * rng.uniform(0.2, 0.6))
    alpha = fill_ellipse(size, centre, axes, rng.uniform(0.0, 180.0))
    return _layer(textures.texture(rng, size, size), alpha)


CELEBA_OCCLUDERS: dict[str, Callable[..., OccluderLayer]] = {
    "hand": draw_hand, "microphone": draw_microphone, "cup": draw_cup, "hat": draw_hat, "hair": draw_hair,
    "polygon": draw_polygon, "ellipse": draw_ellipse}
OCCLUDERS: dict[str, Callable[..., OccluderLayer]] = {**AR_OCCLUDERS, **CELEBA_OCCLUDERS}


def draw_occluder(category: str, landmarks: np.ndarray, size: int, rng: np.random.Generator,
                  textures: TextureBank, hair_colour: np.ndarray | None = None) -> OccluderLayer:
    """Draw occluder `category` (a key of `OCCLUDERS`) for a face with landmarks ``(68, 2)`` in a ``size`` image.

    ``hair_colour`` (RGB ``(3,)``) gives the 'hair' occluder the colour of the head's hair.
    Returns an `OccluderLayer` with ``(size, size, 3)`` RGB and ``(size, size)`` alpha, both float32 in [0, 1].
    """
    if category not in OCCLUDERS:
        raise DataError(f"unknown occluder {category!r}; expected one of {', '.join(OCCLUDERS)}")
    if category == "hair" and hair_colour is not None:
        return draw_hair(FaceFrame(landmarks), int(size), rng, textures, colour=hair_colour)
    return OCCLUDERS[category](FaceFrame(landmarks), int(size), rng, textures)
