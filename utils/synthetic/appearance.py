"""Out-of-model appearance for the synthetic benchmark: what the face model and its SH light cannot explain.

Real faces carry appearance that 80 smooth albedo components and a Lambertian SH light cannot express. The robust
fit marks such pixels as outliers (Step 2's rule ||I - R|| >= 3 sigma), yet they are face: the UNet and the EM step
must learn to keep them. The ground truth therefore keeps them visible face, as CelebAMask-HQ and AR label beards
and lipstick. Items (the names of ground_truth.csv's ``appearance`` column, joined by ``+``; ``none`` for none):

* ``stubble`` (fine dark dots over the beard area), ``beard`` (full, goatee or chin strap; strands, several
  densities and colours, onto the neck), ``moustache`` (pencil to horseshoe);
* ``eyeshadow``, ``lipstick``, ``blush``;
* ``moles`` (1-8 dark spots), ``freckles`` (dozens to hundreds of small spots on the nose and cheeks);
* ``wrinkles``: forehead lines, crow's feet, nasolabial folds, under-eye lines, with pore-scale albedo noise;
* ``specular``: a Blinn-Phong term of a key light on an oily T-zone and cheeks (non-Lambertian);
* ``cast_shadow``: the head's own shadow of the key light (the nose, the jaw on the neck: shadow mapping in
  `utils.synthetic.head.cast_shadows`), and half of the time a hard shadow edge of something outside the image.

The key light is the direction of the image's band-1 SH light when that is strong enough, else a random direction
on the camera side, so highlights and shadows agree with the shading where the light has a direction. Every item
is drawn in the face frame of `utils.synthetic.occluders.FaceFrame` (x in inter-ocular distances, y in
eye-to-mouth distances) from the true landmarks, lit with the image's SH light, and changes only the subject's
pixels: the face region and the head skin (`cast_shadow`'s hard edge also the hair, ears and clothes).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from models.camera import CameraConfig
from models.layout import N_LIGHT, N_SH_BASIS, light_with_offset
from models.shading import sh_basis
from utils.data.benchmark_files import APPEARANCE_ITEMS
from utils.synthetic.head import HeadSample, draw_head, sh_irradiance
from utils.synthetic.occluders import (
    BROWS,
    JAW,
    MOUTH,
    FaceFrame,
    TextureBank,
    bezier,
    fill_polygon,
    stroke,
    value_noise,
)

APPEARANCE_MODES = ("mixed", "none")
FACIAL_HAIR = {"stubble": 0.35, "beard": 0.25, "moustache": 0.15, "beard+moustache": 0.25}
MIN_KEY_STRENGTH = 0.15
"""Below this band-1 / ambient ratio the SH light has no usable direction and the key light is drawn at random."""


@dataclass(frozen=True)
class AppearanceConfig:
    """How often the items occur in 'mixed' mode.

    plain_share: share of images without any item. Otherwise facial_hair is the share with facial hair (one of
    `FACIAL_HAIR`, with its probabilities) and every other item is drawn independently with its probability.
    """

    plain_share: float = 0.25
    facial_hair: float = 0.3
    eyeshadow: float = 0.15
    lipstick: float = 0.15
    blush: float = 0.15
    moles: float = 0.15
    freckles: float = 0.12
    wrinkles: float = 0.2
    specular: float = 0.3
    cast_shadow: float = 0.25


def choose_items(rng: np.random.Generator, config: AppearanceConfig = AppearanceConfig()) -> tuple[str, ...]:
    """The appearance items of one image, in `APPEARANCE_ITEMS` order (empty: none)."""
    if rng.random() < config.plain_share:
        return ()
    items = set()
    if rng.random() < config.facial_hair:
        items.update(str(rng.choice(list(FACIAL_HAIR), p=list(FACIAL_HAIR.values()))).split("+"))
    for name in APPEARANCE_ITEMS[3:]:
        if rng.random() < getattr(config, name):
            items.add(name)
    return tuple(name for name in APPEARANCE_ITEMS if name in items)


def appearance_label(items: tuple[str, ...]) -> str:
    """The ground_truth.csv value: items joined by '+', or 'none'."""
    return "+".join(items) if items else "none"


def _band1_at_axes() -> np.ndarray:
    """``(3, 3)``: row i holds the band-1 basis functions (`models.shading.sh_basis` entries 1-3) at the unit axis
    e_i of the camera frame. Band 1 is linear in the normal, so band-1 coefficients ``c (3,)`` light a normal n with
    ``n . (_band1_at_axes() @ c)``, whatever the basis's sign convention; the matrix is the band-1 constant times a
    signed permutation."""
    return sh_basis(torch.eye(3, dtype=torch.float64)[None])[0, :, 1:4].numpy()


def key_light(light: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``(3,)`` unit camera-frame direction towards the key light of an offset-free SH light ``(27,)``.

    The direction in which the band-1 part of the channel-mean light (with the renderer's offset,
    `models.layout.light_with_offset`) is brightest (`_band1_at_axes`). When its strength relative to the ambient
    (band-0) term is below `MIN_KEY_STRENGTH`, a direction 25-70 deg off the view axis on the camera side is drawn
    instead.
    """
    offset = light_with_offset(torch.from_numpy(np.asarray(light, np.float64).reshape(1, N_LIGHT)))
    sh = offset.numpy().reshape(3, N_SH_BASIS).mean(0)
    band1 = _band1_at_axes()
    scale = float(np.linalg.norm(band1[0]))  # the band-1 constant: band1 / scale is a signed permutation
    y00 = float(sh_basis(torch.zeros(1, 1, 3, dtype=torch.float64))[0, 0, 0])
    direction = (band1 / scale) @ sh[1:4]
    strength = np.linalg.norm(direction) * scale / max(abs(sh[0]) * y00, 1e-9)
    if strength >= MIN_KEY_STRENGTH:
        return direction / np.linalg.norm(direction)
    theta, phi = np.radians(rng.uniform(25.0, 70.0)), rng.uniform(0.0, 2.0 * np.pi)
    return np.array([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), -np.cos(theta)])


@dataclass(frozen=True)
class AppearancePlan:
    """What one image gets: its items and the key light ``(3,)`` (camera frame, towards the light)."""

    items: tuple[str, ...]
    key_light: np.ndarray

    @property
    def needs_shadow(self) -> bool:
        return "cast_shadow" in self.items


def plan_appearance(rng: np.random.Generator, light: np.ndarray, config: AppearanceConfig = AppearanceConfig()
                    ) -> AppearancePlan:
    """Items and key light of one image (all randomness from `rng`, the image's appearance stream)."""
    items = choose_items(rng, config)
    return AppearancePlan(items, key_light(light, rng))


# ----- the canvas the items paint on ---------------------------------------------------------------------------

@dataclass
class SkinCanvas:
    """One image while the items are applied (S = image size).

    image ``(S, S, 3)`` float32 RGB, changed in place by the items; skin ``(S, S)`` float32 in [0, 1]: visible skin
    (face region and head skin); person ``(S, S)``: the whole subject (skin, ears, hair, clothes); face ``(S, S)``
    bool: the rendered face region F; landmarks ``(68, 2)`` true pixels; normals / points ``(S, S, 3)``: camera
    frame unit normals and mm positions of the skin (0 where unknown); light ``(27,)`` offset-free SH; key ``(3,)``
    key light; shadow ``(S, S)`` bool self-shadow of the key light or None; hair_colour ``(3,)`` head hair albedo.
    """

    image: np.ndarray
    skin: np.ndarray
    person: np.ndarray
    face: np.ndarray
    landmarks: np.ndarray
    normals: np.ndarray
    points: np.ndarray
    light: np.ndarray
    key: np.ndarray
    shadow: np.ndarray | None
    hair_colour: np.ndarray
    frame: FaceFrame = field(init=False)
    grid: np.ndarray = field(init=False)
    _irradiance: np.ndarray | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        size = self.image.shape[0]
        self.frame = FaceFrame(self.landmarks)
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
        self.grid = self.frame.to_face(np.stack([xs, ys], -1))

    @property
    def size(self) -> int:
        return self.image.shape[0]

    @property
    def iod(self) -> float:
        """Inter-ocular distance in pixels."""
        return self.frame.iod

    def irradiance(self) -> np.ndarray:
        """``(S, S, 3)`` SH irradiance at the skin normals (a camera-facing normal where none is known)."""
        if self._irradiance is None:
            known = np.linalg.norm(self.normals, axis=-1, keepdims=True) > 0.5
            normals = np.where(known, self.normals, np.array([0.0, 0.0, -1.0], np.float32))
            self._irradiance = sh_irradiance(self.light, normals)
        return self._irradiance

    def paint(self, albedo: np.ndarray, alpha: np.ndarray, lit: bool = True, where: np.ndarray | None = None
              ) -> None:
        """Blend ``albedo`` (``(3,)`` or ``(S, S, 3)``; lit with the SH light when ``lit``) over the skin with
        ``alpha (S, S)`` (``where`` replaces the skin as the allowed region)."""
        colour = albedo * self.irradiance() if lit else np.broadcast_to(albedo, self.image.shape)
        a = (np.clip(alpha, 0.0, 1.0) * (self.skin if where is None else where))[..., None]
        self.image = (self.image * (1.0 - a) + colour * a).astype(np.float32)

    def scale(self, factor: np.ndarray, where: np.ndarray | None = None) -> None:
        """Multiply the skin (or ``where``) by ``factor`` (``(S, S)`` or ``(S, S, 3)``), blended by coverage."""
        f = factor if factor.ndim == 3 else factor[..., None]
        w = (self.skin if where is None else where)[..., None]
        self.image = (self.image * (1.0 + (f - 1.0) * w)).astype(np.float32)

    def face_point(self, index: int | slice) -> np.ndarray:
        """Face-frame coordinates of landmark(s) ``index``."""
        return self.frame.to_face(self.landmarks[index])

    def polygon(self, face_points: np.ndarray) -> np.ndarray:
        """Anti-aliased coverage ``(S, S)`` of a face-frame polygon ``(K, 2)``."""
        return fill_polygon(self.size, self.frame.to_image(face_points))

    def blur(self, alpha: np.ndarray, sigma_iod: float) -> np.ndarray:
        """``alpha`` blurred with a Gaussian of ``sigma_iod`` inter-ocular distances (at least 0.3 px)."""
        return cv2.GaussianBlur(alpha.astype(np.float32), (0, 0), max(0.3, sigma_iod * self.iod))


def _strand_texture(canvas: SkinCanvas, rng: np.random.Generator, length_iod: float) -> np.ndarray:
    """``(S, S)`` in [0, 1]: noise smeared along the face's down direction (hairs growing down the face)."""
    size = canvas.size
    length = max(2, int(round(length_iod * canvas.iod)))
    kernel = np.zeros((2 * length + 1, 2 * length + 1), np.float32)
    end = canvas.frame.down * length
    cv2.line(kernel, (int(round(length - end[0])), int(round(length - end[1]))),
             (int(round(length + end[0])), int(round(length + end[1]))), 1.0, 1)
    kernel /= max(kernel.sum(), 1.0)
    noise = cv2.filter2D(rng.random((size, size)).astype(np.float32), -1, kernel)
    noise = (noise - noise.mean()) / max(float(noise.std()), 1e-6)
    return np.clip(0.5 + 0.3 * noise, 0.0, 1.0)


def _facial_hair_colour(canvas: SkinCanvas, rng: np.random.Generator) -> np.ndarray:
    from utils.synthetic.head import HEAD_HAIR_COLOURS

    if rng.random() < 0.7:
        colour = canvas.hair_colour * rng.uniform(0.8, 1.1)
    else:
        colour = HEAD_HAIR_COLOURS[int(rng.integers(len(HEAD_HAIR_COLOURS)))] * rng.uniform(0.8, 1.1)
    return colour * min(1.0, 0.5 / max(float(colour.max()), 1e-6))  # facial hair is darker than the scalp's


def _lips(canvas: SkinCanvas) -> np.ndarray:
    """``(S, S)`` coverage of the lips and the mouth opening (outer lip contour, landmarks 48-59)."""
    return fill_polygon(canvas.size, canvas.landmarks[48:60])


def _beard_zone(canvas: SkinCanvas, rng: np.random.Generator, style: str) -> np.ndarray:
    """Soft ``(S, S)`` zone of a beard style ('full', 'goatee', 'chin_strap', 'stubble')."""
    gx, gy = canvas.grid[..., 0], canvas.grid[..., 1]
    jaw = canvas.face_point(JAW)
    centre = np.array([0.0, 0.5])
    ext = rng.uniform(0.03, 0.25)
    outer = centre + (jaw - centre) * (1.0 + ext)
    closed = np.vstack([outer, [[outer[-1, 0], -0.3], [outer[0, 0], -0.3]]])
    inside = canvas.polygon(closed)
    mouth = canvas.face_point(MOUTH)
    half_mouth = 0.5 * (mouth[6, 0] - mouth[0, 0]) + 0.05
    lip_low = float(mouth[9, 1]) + 0.03  # landmark 57, bottom of the lower lip
    cheek_y, side_y = rng.uniform(0.55, 0.85), rng.uniform(0.0, 0.45)
    cheek = cheek_y + (side_y - cheek_y) * np.clip((np.abs(gx) - half_mouth) / 0.6, 0.0, 1.0)
    if style in ("full", "stubble"):
        upper = np.where(np.abs(gx) > half_mouth, cheek, lip_low)
        zone = inside * (gy > upper)
    elif style == "goatee":
        width = rng.uniform(0.2, 0.45)
        zone = inside * (np.abs(gx) < width) * (gy > lip_low)
    else:  # chin strap: a band along the jaw contour
        band = stroke(canvas.size, canvas.frame.to_image(outer), max(1.0, rng.uniform(0.1, 0.22) * canvas.iod))
        zone = band * (gy > side_y)
    zone = zone * (1.0 - np.clip(_lips(canvas) * 1.5, 0.0, 1.0))
    return canvas.blur(zone, rng.uniform(0.01, 0.04))


def _moustache_zone(canvas: SkinCanvas, rng: np.random.Generator) -> np.ndarray:
    """Soft ``(S, S)`` zone between the nose base and the upper lip, from pencil-thin to a horseshoe."""
    gx, gy = canvas.grid[..., 0], canvas.grid[..., 1]
    lip = canvas.face_point(slice(48, 55))  # upper lip outer contour, corner to corner
    order = np.argsort(lip[:, 0])
    lip_y = np.interp(gx, lip[order, 0], lip[order, 1])
    nose_y = float(canvas.face_point(33)[1]) + 0.04
    half = 0.5 * (lip[-1, 0] - lip[0, 0]) + rng.uniform(0.0, 0.1)
    top = nose_y + rng.uniform(0.0, 0.6) * np.maximum(lip_y - nose_y, 0.0)
    droop = rng.uniform(0.0, 0.4) if rng.random() < 0.4 else 0.0
    corner = np.clip((np.abs(gx) - (half - 0.1)) / 0.1, 0.0, 1.0)
    bottom = lip_y + 0.02 + droop * corner
    zone = ((np.abs(gx) < half) & (gy > top) & (gy < bottom)).astype(np.float32)
    return canvas.blur(zone, rng.uniform(0.01, 0.03))


def add_stubble(canvas: SkinCanvas, rng: np.random.Generator) -> None:
    zone = np.maximum(_beard_zone(canvas, rng, "stubble"), _moustache_zone(canvas, rng))
    density = rng.uniform(0.25, 0.7)
    dots = cv2.GaussianBlur((rng.random(zone.shape) < density).astype(np.float32), (0, 0), 0.4)
    colour = _facial_hair_colour(canvas, rng) * 0.6 + np.array([0.03, 0.04, 0.06])
    canvas.paint(colour, zone * (rng.uniform(0.1, 0.3) + rng.uniform(0.25, 0.55) * dots))


def _paint_hair(canvas: SkinCanvas, rng: np.random.Generator, zone: np.ndarray, density: float) -> None:
    strands = _strand_texture(canvas, rng, rng.uniform(0.04, 0.12))
    colour = _facial_hair_colour(canvas, rng)
    albedo = colour * (0.55 + 0.9 * strands)[..., None]
    canvas.paint(albedo, zone * density * np.clip(0.35 + strands, 0.0, 1.0))


def add_beard(canvas: SkinCanvas, rng: np.random.Generator) -> None:
    style = str(rng.choice(["full", "goatee", "chin_strap"], p=[0.5, 0.3, 0.2]))
    _paint_hair(canvas, rng, _beard_zone(canvas, rng, style), rng.uniform(0.55, 1.0))


def add_moustache(canvas: SkinCanvas, rng: np.random.Generator) -> None:
    _paint_hair(canvas, rng, _moustache_zone(canvas, rng), rng.uniform(0.6, 1.0))


EYESHADOW_COLOURS = np.array([[0.35, 0.22, 0.15], [0.45, 0.25, 0.45], [0.2, 0.3, 0.55], [0.25, 0.4, 0.25],
                              [0.7, 0.55, 0.3], [0.1, 0.1, 0.12], [0.55, 0.35, 0.4]], dtype=np.float32)
LIPSTICK_COLOURS = np.array([[0.7, 0.05, 0.1], [0.85, 0.25, 0.35], [0.45, 0.08, 0.2], [0.6, 0.3, 0.25],
                             [0.9, 0.4, 0.5], [0.3, 0.05, 0.08]], dtype=np.float32)
BLUSH_COLOURS = np.array([[0.9, 0.4, 0.45], [0.95, 0.5, 0.4], [0.8, 0.3, 0.35]], dtype=np.float32)


def add_eyeshadow(canvas: SkinCanvas, rng: np.random.Generator) -> None:
    gx, gy = canvas.grid[..., 0], canvas.grid[..., 1]
    colour = EYESHADOW_COLOURS[int(rng.integers(len(EYESHADOW_COLOURS)))] * rng.uniform(0.85, 1.15, 3)
    height = rng.uniform(0.35, 0.85)
    zone = np.zeros(gx.shape, np.float32)
    for lid_ids, brow_ids, eye_ids in ((slice(36, 40), slice(17, 22), slice(36, 42)),
                                       (slice(42, 46), slice(22, 27), slice(42, 48))):
        lid, brow = canvas.face_point(lid_ids), canvas.face_point(brow_ids)
        lid, brow = lid[np.argsort(lid[:, 0])], brow[np.argsort(brow[:, 0])]
        lid_y = np.interp(gx, lid[:, 0], lid[:, 1])
        top = lid_y + height * (np.interp(gx, brow[:, 0], brow[:, 1]) - lid_y)
        span = (gx > lid[0, 0] - 0.04) & (gx < lid[-1, 0] + 0.04)
        zone = np.maximum(zone, (span & (gy > top) & (gy < lid_y + 0.02)).astype(np.float32))
        zone = zone * (1.0 - fill_polygon(canvas.size, canvas.landmarks[eye_ids]))
    canvas.paint(colour, canvas.blur(zone, 0.04) * rng.uniform(0.4, 0.85))


def add_lipstick(canvas: SkinCanvas, rng: np.random.Generator) -> None:
    lips = np.clip(_lips(canvas) - fill_polygon(canvas.size, canvas.landmarks[60:68]), 0.0, 1.0)
    colour = LIPSTICK_COLOURS[int(rng.integers(len(LIPSTICK_COLOURS)))] * rng.uniform(0.85, 1.15, 3)
    canvas.paint(colour, canvas.blur(lips, 0.008) * rng.uniform(0.5, 0.9))


def add_blush(canvas: SkinCanvas, rng: np.random.Generator) -> None:
    gx, gy = canvas.grid[..., 0], canvas.grid[..., 1]
    x0, y0 = rng.uniform(0.45, 0.65), rng.uniform(0.45, 0.7)
    sx, sy = rng.uniform(0.15, 0.3), rng.uniform(0.12, 0.22)
    blob = np.exp(-0.5 * (((np.abs(gx) - x0) / sx) ** 2 + ((gy - y0) / sy) ** 2))
    colour = BLUSH_COLOURS[int(rng.integers(len(BLUSH_COLOURS)))]
    canvas.paint(colour, blob * rng.uniform(0.35, 0.7))


def _spots(canvas: SkinCanvas, centres: np.ndarray, radii: np.ndarray, strengths: np.ndarray) -> np.ndarray:
    """``(S, S)`` max-coverage of soft discs (pixel centres ``(K, 2)``, radii ``(K,)`` px, strengths ``(K,)``)."""
    size = canvas.size
    alpha = np.zeros((size, size), np.float32)
    for (x, y), radius, strength in zip(centres, radii, strengths):
        reach = int(np.ceil(radius + 1.0))
        c0, c1 = max(0, int(x) - reach), min(size, int(x) + reach + 2)
        r0, r1 = max(0, int(y) - reach), min(size, int(y) + reach + 2)
        if c0 >= c1 or r0 >= r1:
            continue
        ys, xs = np.mgrid[r0:r1, c0:c1]
        disc = np.clip(radius + 0.5 - np.hypot(xs - x, ys - y), 0.0, 1.0) * strength  # ~ area coverage
        alpha[r0:r1, c0:c1] = np.maximum(alpha[r0:r1, c0:c1], disc)
    return cv2.GaussianBlur(alpha, (0, 0), 0.45)  # the optics' blur: round spots also at 1-2 px


def add_moles(canvas: SkinCanvas, rng: np.random.Generator) -> None:
    count = int(rng.integers(1, 9))
    candidates = np.argwhere(canvas.face)
    if not len(candidates):
        return
    picks = candidates[rng.integers(len(candidates), size=count)][:, ::-1].astype(np.float64)
    radii = np.maximum(0.9, rng.uniform(0.015, 0.045, count) * canvas.iod)
    alpha = _spots(canvas, picks, radii, rng.uniform(0.8, 1.0, count))
    colour = np.array([rng.uniform(0.18, 0.32), rng.uniform(0.1, 0.18), rng.uniform(0.06, 0.12)])
    canvas.paint(colour, alpha)


def add_freckles(canvas: SkinCanvas, rng: np.random.Generator) -> None:
    count = int(rng.integers(30, 151))
    centres = np.stack([rng.normal(0.0, 0.45, count), rng.normal(0.3, 0.18, count)], -1)
    pixels = canvas.frame.to_image(centres)
    radii = np.maximum(0.5, rng.uniform(0.004, 0.013, count) * canvas.iod)
    alpha = _spots(canvas, pixels, radii, rng.uniform(0.25, 0.7, count))
    tint = rng.uniform(0.5, 0.75) * np.array([1.0, 0.82, 0.68])
    canvas.scale(1.0 - alpha[..., None] * (1.0 - tint))


def add_wrinkles(canvas: SkinCanvas, rng: np.random.Generator) -> None:
    size, iod = canvas.size, canvas.iod
    lines: list[np.ndarray] = []
    groups = [g for g in ("forehead", "crows_feet", "nasolabial", "under_eye") if rng.random() < 0.6]
    groups = groups or [str(rng.choice(["forehead", "nasolabial"]))]
    brow_y = float(canvas.face_point(BROWS)[:, 1].mean())
    if "forehead" in groups:
        width = rng.uniform(0.3, 0.6)
        for k in range(int(rng.integers(2, 5))):
            xs = np.linspace(-width, width, 12)
            ys = brow_y - 0.15 - 0.1 * k + rng.uniform(-0.1, 0.1) * xs ** 2 + rng.normal(0.0, 0.008, 12)
            lines.append(np.stack([xs, ys], -1))
    if "crows_feet" in groups:
        for corner, side in ((36, -1.0), (45, 1.0)):
            start = canvas.face_point(corner) + np.array([side * 0.05, 0.0])
            for angle in np.radians(rng.uniform(-35.0, 35.0, int(rng.integers(2, 5)))):
                length = rng.uniform(0.1, 0.22)
                lines.append(np.stack([start, start + length * np.array([side * np.cos(angle), np.sin(angle)])]))
    if "nasolabial" in groups:
        for wing, corner, side in ((31, 48, -1.0), (35, 54, 1.0)):
            a = canvas.face_point(wing) + np.array([side * 0.08, -0.03])
            b = canvas.face_point(corner) + np.array([side * 0.1, rng.uniform(0.05, 0.25)])
            bulge = np.array([side * rng.uniform(0.05, 0.15), 0.0])
            lines.append(bezier(np.stack([a, 0.5 * (a + b) + bulge, b])))
    if "under_eye" in groups:
        for ids in (slice(39, 42), slice(45, 48)):
            lid = canvas.face_point(ids)
            lines.append(lid[np.argsort(lid[:, 0])] + np.array([0.0, rng.uniform(0.1, 0.18)]))
    depth = np.zeros((size, size), np.float32)
    for line in lines:
        width = max(0.8, rng.uniform(0.008, 0.02) * iod)
        depth = np.maximum(depth, stroke(size, canvas.frame.to_image(line), width) * rng.uniform(0.15, 0.4))
    pores = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 0.6)
    pores /= max(float(pores.std()), 1e-6)
    factor = (1.0 - canvas.blur(depth, 0.004)) * (1.0 + rng.uniform(0.015, 0.04) * pores)
    canvas.scale(factor)


def _oil_map(canvas: SkinCanvas, rng: np.random.Generator) -> np.ndarray:
    gx, gy = canvas.grid[..., 0], canvas.grid[..., 1]
    blobs = [((0.0, -0.55), (0.45, 0.25)), ((0.0, 0.3), (0.1, 0.3)), ((0.5, 0.45), (0.18, 0.14)),
             ((-0.5, 0.45), (0.18, 0.14)), ((0.0, 1.4), (0.2, 0.1))]
    oil = np.full(gx.shape, 0.15)
    for (cx, cy), (sx, sy) in blobs:
        oil += rng.uniform(0.3, 1.0) * np.exp(-0.5 * (((gx - cx) / sx) ** 2 + ((gy - cy) / sy) ** 2))
    return np.clip(oil, 0.0, 1.0) * (0.6 + 0.4 * value_noise(rng, canvas.size, canvas.size, cells=8.0))


def add_specular(canvas: SkinCanvas, rng: np.random.Generator) -> None:
    view = -canvas.points / np.maximum(np.linalg.norm(canvas.points, axis=-1, keepdims=True), 1e-6)
    half = canvas.key + view
    half /= np.maximum(np.linalg.norm(half, axis=-1, keepdims=True), 1e-6)
    n_dot_h = np.clip((canvas.normals * half).sum(-1), 0.0, 1.0)
    lit = (canvas.normals @ canvas.key) > 0.0
    tint = canvas.irradiance().reshape(-1, 3).mean(0)
    tint = tint / max(float(tint.mean()), 1e-6)
    strength = rng.uniform(0.25, 0.7) * _oil_map(canvas, rng) * n_dot_h ** rng.uniform(8.0, 40.0) * lit
    highlight = np.clip(strength * canvas.skin, 0.0, None)[..., None] * tint
    canvas.image = (canvas.image + highlight).astype(np.float32)


def add_cast_shadow(canvas: SkinCanvas, rng: np.random.Generator) -> None:
    shadow = np.zeros(canvas.face.shape, np.float32)
    if canvas.shadow is not None:
        facing = (canvas.normals @ canvas.key) > 0.05
        shadow = cv2.GaussianBlur((canvas.shadow & facing).astype(np.float32), (0, 0), rng.uniform(0.3, 1.0))
        canvas.scale(1.0 - rng.uniform(0.3, 0.6) * shadow)
    face_pixels = max(float(canvas.face.sum()), 1.0)
    if rng.random() < 0.5 or float((shadow * canvas.face).sum()) < 0.02 * face_pixels:
        point = canvas.frame.to_image(np.array([rng.uniform(-0.5, 0.5), rng.uniform(-0.3, 1.2)]))
        angle = rng.uniform(0.0, np.pi)
        normal = np.array([np.cos(angle), np.sin(angle)])
        ys, xs = np.mgrid[0:canvas.size, 0:canvas.size].astype(np.float64)
        distance = (xs - point[0]) * normal[0] + (ys - point[1]) * normal[1]
        penumbra = max(0.3, rng.uniform(0.3, 1.5) * canvas.size / 224.0)
        edge = 1.0 / (1.0 + np.exp(-np.clip(distance / penumbra, -30.0, 30.0)))
        canvas.scale(1.0 - rng.uniform(0.25, 0.5) * edge, where=canvas.person)


ITEM_PAINTERS = {"moles": add_moles, "freckles": add_freckles, "wrinkles": add_wrinkles, "blush": add_blush,
                 "eyeshadow": add_eyeshadow, "lipstick": add_lipstick, "stubble": add_stubble, "beard": add_beard,
                 "moustache": add_moustache, "specular": add_specular, "cast_shadow": add_cast_shadow}
"""The painter of every item, in the order they are applied (lighting last)."""


def apply_items(canvas: SkinCanvas, items: tuple[str, ...], rng: np.random.Generator) -> None:
    """Paint ``items`` on ``canvas`` (in `ITEM_PAINTERS` order); the result is clipped to [0, 1]."""
    for name, painter in ITEM_PAINTERS.items():
        if name in items:
            painter(canvas, rng)
    canvas.image = np.clip(canvas.image, 0.0, 1.0)


def dress(background: np.ndarray, render_rgb: np.ndarray, face: np.ndarray, landmarks: np.ndarray,
          head: HeadSample, plan: AppearancePlan, light: np.ndarray, camera: CameraConfig,
          rng: np.random.Generator, textures: TextureBank) -> tuple[np.ndarray, np.ndarray]:
    """Head around the face, the face render on the face region, then the appearance items.

    Args:
        background: ``(S, S, 3)``; render_rgb: ``(S, S, 3)`` the face render; face: ``(S, S)`` bool region F;
        landmarks: ``(68, 2)`` true pixels; head: the image's uncropped render; light: ``(27,)`` offset-free SH.
    Returns:
        image ``(S, S, 3)`` float32 in [0, 1] and the head's hair colour ``(3,)`` (for the 'hair' occluder).
    """
    layers = draw_head(background, face, head, landmarks, light, camera, rng, textures)
    image = np.where(face[..., None], render_rgb, layers.image).astype(np.float32)
    face_f = face.astype(np.float32)
    canvas = SkinCanvas(image=image, skin=np.maximum(face_f, layers.skin), person=np.maximum(face_f, layers.person),
                        face=face, landmarks=landmarks, normals=head.normals, points=head.points, light=light,
                        key=plan.key_light, shadow=head.shadow, hair_colour=layers.hair_colour)
    apply_items(canvas, plan.items, rng)
    return canvas.image, layers.hair_colour
