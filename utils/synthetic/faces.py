# ruff: noqa: E402  (the imports follow the start-up Ctrl-C handler)
"""Synthetic occluded-face benchmark: the project's embedded default dataset (demo, tests, evaluation).

Faces are rendered with the project's `FaceRenderer` from random coefficients (identity, expression, albedo,
pose, spherical-harmonics light), composited over textured backgrounds and covered by procedural occluders
(`utils/synthetic/occluders.py`): AR-like sunglasses and scarves, CelebA-like hands, microphones, cups, hats, hair
strands and textured polygons / ellipses. Because every pixel's origin is known, the ground truth is exact:

* visible-face mask = rendered face coverage minus occluder pixels (occluder alpha > 0.5). "Face" means everything
  the face model renders (eyes and mouth included), consistent with evaluation inside the rendered region;
* 68 landmarks = the renderer's projected landmark vertices plus detector-like Gaussian noise (sigma 1.25 px at
  224 px, scaled with the image size); landmarks under an occluder are still written;
* the true coefficients, the occlusion category and the occluded fraction of the face.

With ``--appearance mixed`` (the default) every face also gets a head around it (skin beyond the crop, neck, ears,
hair, clothes: `utils/synthetic/head.py`) and zero or more out-of-model appearance items (facial hair, make-up,
moles, freckles, wrinkles, specular highlights, cast shadows: `utils/synthetic/appearance.py`). They change no
ground truth: the items are visible face, the head lies outside the face region. Their randomness comes from a
stream of their own, ``numpy.random.default_rng([seed, 3, i])``, so ``--appearance none`` renders the same scenes
(coefficients, backgrounds, occluders) without them, byte for byte the images of the generator before it had them.

Output (the original README's image-root layout, see `utils/data/image_root.py`)::

    IMAGE_ROOT/Dataset/{id:05d}.png                       the image (RGB, size x size)
    IMAGE_ROOT/Dataset/{id:05d}_visible_skin_mask.png     white = visible face
    IMAGE_ROOT/{train,val,test,all}_landmarks_3D.csv      no header: filename, x0, y0, ..., x67, y67
    IMAGE_ROOT/ground_truth.csv                           header: filename, split, category, appearance,
                                                          occluded_fraction, shape_0 .. light_26 (from the
                                                          CoeffLayout), visible_landmarks (68 chars of 0/1);
                                                          appearance: items joined by '+', or 'none'
    IMAGE_ROOT/synthetic_config.json                      the settings and counts of the run

The split is a seeded permutation (80/10/10, val and test get at least one image each from 3 images on).
Output is deterministic for a seed: image i draws all its randomness from ``numpy.random.default_rng([seed, 1, i])``
and is rendered in float64, so it does not depend on --batch or --num either (the first n images of a larger run are
the same files).

Background and texture sources: procedural noise and gradients, and crops of the scikit-image sample images
that ship with the wheel (loaded offline; any that are unavailable are skipped): astronaut (NASA, public domain),
coffee (Rachel Michetti, CC0), chelsea (Stefan van der Walt, CC0), rocket (SpaceX, public domain), coins
(Brooklyn Museum, no known copyright restrictions), brick (CC0Textures, CC0), grass (CC0), gravel (CC0Textures,
CC0), camera (Lav Varshney, CC0), hubble_deep_field (NASA, public domain), text (public domain).

CLI: ``python -m utils.synthetic.faces --out IMAGE_ROOT --num N [--bfm H5] [--seed S]
[--occlusion mixed|none|ar|celeba] [--appearance mixed|none] [--size 224] [--batch 16]``. Without --bfm the demo
face model ``basel_3DMM/demo_face_model.h5`` is used (and written first if it does not exist).
"""
from __future__ import annotations

if __name__ == "__main__":  # Ctrl-C while torch is imported: one line, no traceback (utils/startup.py)
    from utils.startup import quiet_interrupts
    quiet_interrupts()

import argparse
import csv
import json
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from collections.abc import Callable

import cv2
import numpy as np
import torch
from tqdm import tqdm

from models.camera import CameraConfig
from models.face_model import FaceModel
from models.layout import N_SH_BASIS, SH_INIT, CoeffLayout
from models.renderer import FaceRenderer
from models.shading import sh_basis
from utils.cli import RepoDefault, check_seed, cli_main, resolve_cli_path, resolve_device
from utils.data.benchmark_files import GROUND_TRUTH_NAME, RENDER_DTYPE, ground_truth_columns
from utils.data.image_io import write_image_rgb, write_mask
from utils.data.image_root import GT_MASK_SUFFIX, SPLITS, ImageRoot, gt_mask_path, split_indices
from utils.errors import DataError
from utils.landmarks_csv import write_landmarks_csv
from utils.output_dir import build_beside, check_target
from utils.synthetic.appearance import (
    APPEARANCE_ITEMS,
    APPEARANCE_MODES,
    AppearanceConfig,
    appearance_label,
    dress,
    plan_appearance,
)
from utils.synthetic.head import HeadRenderer
from utils.synthetic.occluders import AR_OCCLUDERS, CELEBA_OCCLUDERS, TextureBank, draw_occluder, value_noise

DEFAULT_DEMO_BFM = "basel_3DMM/demo_face_model.h5"
OCCLUSION_MODES = ("mixed", "none", "ar", "celeba")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train, val, test
REFERENCE_SIZE = 224
_OWN_FILE = re.compile(r"^\d{5,}(" + re.escape(GT_MASK_SUFFIX) + r"|\.png)$")


@dataclass(frozen=True)
class SceneRanges:
    """Sampling ranges of the synthetic scenes (angles in degrees, translations in mm, sizes at 224 px).

    shape_scale: identity ~ N(0, 1) per coefficient times U(shape_scale). exp_std: expression ~ N(0, U(exp_std)).
    tex_std: albedo coefficient std. pitch/yaw/roll_deg: U(-r, r). trans_xy_mm, trans_z_mm: U(-r, r) offsets.
    ambient: overall light gain U(ambient) (1 = the renderer's default light), per-channel tint U(-tint, tint).
    directional: band-1 strength relative to the ambient term, U(directional). band2: std of band-2 terms
    relative to the ambient term. unoccluded_share: share of faces without occluder in 'mixed' mode.
    landmark_noise_px: landmark noise sigma at 224 px. min_occluded: an occluder covering less than this share of
    the face is redrawn (up to 4 tries). blur_px, noise_std: maxima of the image blur sigma / Gaussian noise.
    """

    shape_scale: tuple[float, float] = (0.8, 1.0)
    exp_std: tuple[float, float] = (0.5, 1.0)
    tex_std: float = 0.7
    pitch_deg: float = 20.0
    yaw_deg: float = 40.0
    roll_deg: float = 15.0
    trans_xy_mm: float = 5.0
    trans_z_mm: float = 15.0
    ambient: tuple[float, float] = (0.8, 1.1)
    tint: float = 0.06
    directional: tuple[float, float] = (0.0, 0.5)
    band2: float = 0.06
    unoccluded_share: float = 0.2
    landmark_noise_px: float = 1.25
    min_occluded: float = 0.02
    blur_px: float = 0.8
    noise_std: float = 0.02

    def frontal(self) -> SceneRanges:
        """The same ranges with the pose fixed: no rotation, no translation jitter."""
        return replace(self, pitch_deg=0.0, yaw_deg=0.0, roll_deg=0.0, trans_xy_mm=0.0, trans_z_mm=0.0)


# ----- sampling -------------------------------------------------------------------------------------------------

def _sh_bands01() -> tuple[float, np.ndarray]:
    """The renderer's SH basis (`models.shading.sh_basis`) read off at the three axes: ``Y_00`` and the ``(3, 3)``
    map from a direction ``l`` to the band-1 coefficients whose irradiance is ``n . l`` (band 1 is linear in n)."""
    at_axes = sh_basis(torch.eye(3, dtype=torch.float64)[None])[0].numpy()  # (axis, 9)
    return float(at_axes[0, 0]), np.linalg.inv(at_axes[:, 1:4])


def sample_light(rng: np.random.Generator, ranges: SceneRanges) -> np.ndarray:
    """SH light offsets ``(27,)`` (index 9c + k; the renderer adds `SH_INIT`) for a plausible, mostly positive light.

    Irradiance per channel c is about ``a_c (1 + beta_c n.l) + small band-2 terms`` with a light direction ``l``
    (camera frame) on the camera side within 70 deg of the view axis and a strength ``beta_c`` in
    `ranges.directional`. ``a_c`` is chosen so that a surface facing the camera gets about the default ambient
    irradiance x gain x tint: directional light redistributes brightness instead of only adding to it.
    """
    gain = rng.uniform(*ranges.ambient) * (1.0 + rng.uniform(-ranges.tint, ranges.tint, 3))
    theta, phi = np.radians(rng.uniform(0.0, 70.0)), rng.uniform(0.0, 2.0 * np.pi)
    lx, ly, lz = np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), -np.cos(theta)
    beta = rng.uniform(*ranges.directional) * (1.0 + rng.uniform(-0.15, 0.15, 3))
    default_dc = np.asarray(SH_INIT, dtype=np.float64).reshape(3, N_SH_BASIS)[:, 0]  # (3,)
    dc = default_dc * gain / (1.0 + 0.5 * beta * np.cos(theta))
    y00, band1 = _sh_bands01()
    ambient = dc * y00
    sh = np.zeros((3, N_SH_BASIS))
    sh[:, 0] = dc
    sh[:, 1:4] = (beta * ambient)[:, None] * (band1 @ np.array([lx, ly, lz]))[None, :]
    sh[:, 4:] = rng.normal(0.0, ranges.band2, (3, 5)) * ambient[:, None]
    return (sh.reshape(-1) - np.asarray(SH_INIT)).astype(np.float32)


def sample_coefficients(layout: CoeffLayout, rng: np.random.Generator, ranges: SceneRanges) -> np.ndarray:
    """Random post-scaled coefficients ``(layout.total,)`` float32: identity, expression, albedo, pose and light.

    Angles are radians (pitch, yaw, roll as in `models.camera.euler_rotation`); translations are mm offsets.
    """
    coeffs = np.zeros(layout.total, np.float32)
    coeffs[layout.slice("shape")] = rng.standard_normal(layout.n_shape) * rng.uniform(*ranges.shape_scale)
    coeffs[layout.slice("exp")] = rng.standard_normal(layout.n_exp) * rng.uniform(*ranges.exp_std)
    coeffs[layout.slice("tex")] = rng.standard_normal(layout.n_tex) * ranges.tex_std
    limits = np.array([ranges.pitch_deg, ranges.yaw_deg, ranges.roll_deg])
    coeffs[layout.slice("angles")] = np.radians(rng.uniform(-1.0, 1.0, 3) * limits)
    limits = np.array([ranges.trans_xy_mm, ranges.trans_xy_mm, ranges.trans_z_mm])
    coeffs[layout.slice("trans")] = rng.uniform(-1.0, 1.0, 3) * limits
    coeffs[layout.slice("light")] = sample_light(rng, ranges)
    return coeffs


def choose_category(rng: np.random.Generator, occlusion: str, ranges: SceneRanges) -> str:
    """Occlusion category of one image: 'none' or a key of the AR / CelebA occluder tables (see module doc)."""
    if occlusion == "none":
        return "none"
    if occlusion == "ar":
        pool = list(AR_OCCLUDERS)
    elif occlusion == "celeba":
        pool = list(CELEBA_OCCLUDERS)
    else:
        if rng.random() < ranges.unoccluded_share:
            return "none"
        pool = list(AR_OCCLUDERS) + list(CELEBA_OCCLUDERS)
    return pool[int(rng.integers(len(pool)))]


def make_background(rng: np.random.Generator, size: int, textures: TextureBank) -> np.ndarray:
    """A textured background ``(size, size, 3)`` float32 in [0, 1]: image crop, gradient, noise or a blend."""
    kind = int(rng.integers(4))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ramp = np.clip(0.5 + (xs - 0.5) * np.cos(angle) + (ys - 0.5) * np.sin(angle), 0.0, 1.0)[..., None]
    gradient = ramp * rng.random(3) + (1.0 - ramp) * rng.random(3)
    if kind == 0:
        background = textures.crop(rng, size, size)
        if rng.random() < 0.5:
            background = cv2.GaussianBlur(background, (0, 0), rng.uniform(0.5, 3.0) * size / REFERENCE_SIZE)
    elif kind == 1:
        background = gradient * (0.9 + 0.2 * value_noise(rng, size, size, cells=rng.uniform(4.0, 30.0)))[..., None]
    elif kind == 2:
        background = textures.noise_colour(rng, size, size)
    else:
        background = 0.5 * textures.crop(rng, size, size) + 0.5 * gradient
    return np.clip(background, 0.0, 1.0).astype(np.float32)


# ----- one image ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SampleRecord:
    """Ground truth of one written image (see the module doc for the files)."""

    filename: str
    coeffs: np.ndarray  # (layout.total,) float32
    landmarks: np.ndarray  # (68, 2) float32 pixels, noisy
    category: str
    occluded_fraction: float
    visible_landmarks: str  # 68 chars of 0/1
    appearance: str = "none"  # items joined by '+'


def degrade(image: np.ndarray, rng: np.random.Generator, ranges: SceneRanges) -> np.ndarray:
    """Mild blur and Gaussian noise on an ``(S, S, 3)`` float image -> ``(S, S, 3)`` uint8 RGB."""
    scale = image.shape[0] / REFERENCE_SIZE
    sigma = rng.uniform(0.0, ranges.blur_px) * scale
    if sigma > 0.2:
        image = cv2.GaussianBlur(image, (0, 0), sigma)
    noise = rng.normal(0.0, rng.uniform(0.0, ranges.noise_std), image.shape).astype(np.float32)
    return np.round(np.clip(image + noise, 0.0, 1.0) * 255.0).astype(np.uint8)


def place_occluder(category: str, landmarks: np.ndarray, face: np.ndarray, rng: np.random.Generator,
                   textures: TextureBank, ranges: SceneRanges, hair_colour: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Draw occluder `category` on the face; redraw (at most 4 tries) while it hides < `ranges.min_occluded`.

    Args:
        landmarks: ``(68, 2)`` true landmark pixels; face: ``(S, S)`` bool rendered coverage;
        hair_colour: the head's hair colour ``(3,)`` for the 'hair' occluder (None: its own random colour).
    Returns:
        rgb ``(S, S, 3)`` and alpha ``(S, S)`` float32 in [0, 1].
    """
    face_pixels = max(int(face.sum()), 1)
    for _ in range(4):
        layer = draw_occluder(category, landmarks, face.shape[0], rng, textures, hair_colour)
        if ((layer.alpha > 0.5) & face).sum() >= ranges.min_occluded * face_pixels:
            break
    return layer.rgb, layer.alpha


def visible_landmark_string(landmarks: np.ndarray, occluded: np.ndarray) -> str:
    """68 chars: '1' where the (true) landmark lies inside the image and not under an occluder, else '0'."""
    size = occluded.shape[0]
    cols, rows = np.round(landmarks).astype(np.int64).T
    inside = (cols >= 0) & (cols < size) & (rows >= 0) & (rows < size)
    hidden = occluded[np.clip(rows, 0, size - 1), np.clip(cols, 0, size - 1)]
    return "".join("1" if ok else "0" for ok in inside & ~hidden)


Dresser = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
"""``(background, render_rgb, face, landmarks) -> (image, hair colour)``: puts the face in its head and paints the
appearance items (`utils.synthetic.appearance.dress` with the image's head render and plan bound)."""


def compose_sample(render_rgb: np.ndarray, coverage: np.ndarray, landmarks: np.ndarray, category: str,
                   rng: np.random.Generator, textures: TextureBank, ranges: SceneRanges,
                   dresser: Dresser | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, str]:
    """Background + rendered face (+ head and appearance) + occluder + degradation for one image.

    Args:
        render_rgb: ``(S, S, 3)`` float32 render in [0, 1]; coverage: ``(S, S)`` rendered-face mask;
        landmarks: ``(68, 2)`` projected landmark pixels; dresser: head and appearance (None: the bare face).
    Returns:
        image ``(S, S, 3)`` uint8 RGB, visible-face mask ``(S, S)`` float32 in {0, 1}, noisy landmarks
        ``(68, 2)`` float32, occluded fraction of the rendered face, visible-landmark string.
    """
    size = coverage.shape[0]
    face = coverage > 0.5
    background = make_background(rng, size, textures)
    hair_colour = None
    if dresser is None:
        image = np.where(face[..., None], render_rgb, background)
    else:
        image, hair_colour = dresser(background, render_rgb, face, landmarks)
    occluded = np.zeros_like(face)
    if category != "none":
        rgb, alpha = place_occluder(category, landmarks, face, rng, textures, ranges, hair_colour)
        image = alpha[..., None] * rgb + (1.0 - alpha[..., None]) * image
        occluded = alpha > 0.5
    visible = face & ~occluded
    fraction = 1.0 - float(visible.sum()) / max(float(face.sum()), 1.0)
    noise_px = ranges.landmark_noise_px * size / REFERENCE_SIZE
    noisy = (landmarks + rng.normal(0.0, noise_px, landmarks.shape)).astype(np.float32)
    return (degrade(image.astype(np.float32), rng, ranges), visible.astype(np.float32), noisy, fraction,
            visible_landmark_string(landmarks, occluded))


# ----- batches and files ----------------------------------------------------------------------------------------

def image_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of image `index` (all of its randomness but the head's and appearance's comes from here)."""
    return np.random.default_rng([seed, 1, index])


def appearance_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of image `index`'s head and appearance items."""
    return np.random.default_rng([seed, 3, index])


@torch.no_grad()
def render_batch(renderer: FaceRenderer, coeffs: np.ndarray, device: torch.device
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render ``(B, total)`` coefficients (in `RENDER_DTYPE`) -> RGB ``(B, S, S, 3)`` in [0, 1], coverage
    ``(B, S, S)``, landmarks ``(B, 68, 2)`` pixels, all float32 numpy."""
    out = renderer(torch.from_numpy(coeffs).to(device, RENDER_DTYPE))
    rgb = out.image.clamp(0.0, 1.0).permute(0, 2, 3, 1).float().cpu().numpy()
    return rgb, out.mask[:, 0].float().cpu().numpy(), out.landmarks.float().cpu().numpy()


def generate_batch(ids: range, seed: int, occlusion: str, renderer: FaceRenderer, textures: TextureBank,
                   ranges: SceneRanges, dataset_dir: Path, device: torch.device,
                   head_renderer: HeadRenderer | None = None,
                   appearance_config: AppearanceConfig | None = None) -> list[SampleRecord]:
    """Sample, render, composite and write the images `ids`; return their ground-truth records.

    With a `head_renderer` ('mixed' appearance) every face gets a head and its appearance items.
    """
    rngs = [image_rng(seed, i) for i in ids]
    coeffs = np.stack([sample_coefficients(renderer.layout, rng, ranges) for rng in rngs])
    categories = [choose_category(rng, occlusion, ranges) for rng in rngs]
    rgb, coverage, landmarks = render_batch(renderer, coeffs, device)
    dressers: list[Dresser | None] = [None] * len(ids)
    labels = ["none"] * len(ids)
    if head_renderer is not None:
        light = coeffs[:, renderer.layout.slice("light")]
        arngs = [appearance_rng(seed, i) for i in ids]
        config = AppearanceConfig() if appearance_config is None else appearance_config
        plans = [plan_appearance(arng, light[k], config) for k, arng in enumerate(arngs)]
        keys = np.stack([plan.key_light if plan.needs_shadow else np.full(3, np.nan) for plan in plans])
        heads = head_renderer.render(coeffs, keys)
        camera = renderer.camera_cfg
        for k in range(len(ids)):
            dressers[k] = (lambda bg, face_rgb, face, lms, k=k: dress(
                bg, face_rgb, face, lms, heads[k], plans[k], light[k], camera, arngs[k], textures))
            labels[k] = appearance_label(plans[k].items)
    records = []
    for k, index in enumerate(ids):
        image, visible, noisy, fraction, visible_lms = compose_sample(
            rgb[k], coverage[k], landmarks[k], categories[k], rngs[k], textures, ranges, dressers[k])
        filename = f"{index:05d}.png"
        write_image_rgb(dataset_dir / filename, image)
        write_mask(gt_mask_path(dataset_dir / filename), visible)
        records.append(SampleRecord(filename, coeffs[k], noisy, categories[k], fraction, visible_lms, labels[k]))
    return records


def split_ids(num: int, seed: int) -> dict[str, list[int]]:
    """The split of ``range(num)``: `utils.data.image_root.split_indices` with `SPLIT_FRACTIONS` (10 % val, 10 %
    test, at least 1 each from 3 images on, the rest train). Returns ``{"train", "val", "test", "all"} -> ids``."""
    return split_indices(num, SPLIT_FRACTIONS, seed)


def _number(value: float) -> str:
    """Shortest text that reads back to the same float32."""
    return np.format_float_positional(np.float32(value), unique=True, trim="-")


def write_tables(root: Path, records: list[SampleRecord], splits: dict[str, list[int]], layout: CoeffLayout
                 ) -> None:
    """Write the four landmark CSVs and ground_truth.csv of an image root (columns: `ground_truth_columns`)."""
    for split, ids in splits.items():
        write_landmarks_csv(root / f"{split}_landmarks_3D.csv",
                            [(records[i].filename, records[i].landmarks) for i in ids])
    split_of = {i: split for split in ("train", "val", "test") for i in splits[split]}
    header = ground_truth_columns(layout)
    with (root / GROUND_TRUTH_NAME).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        for index, record in enumerate(records):
            writer.writerow([record.filename, split_of.get(index, "train"), record.category, record.appearance,
                             f"{record.occluded_fraction:.6f}", *map(_number, record.coeffs),
                             record.visible_landmarks])


def _check_arguments(num: int, occlusion: str, size: int, batch: int, appearance: str = "none") -> None:
    if int(num) != num or num < 1:
        raise DataError(f"--num must be a positive integer, got {num!r}")
    if occlusion not in OCCLUSION_MODES:
        raise DataError(f"--occlusion {occlusion!r}: expected one of {', '.join(OCCLUSION_MODES)}")
    if appearance not in APPEARANCE_MODES:
        raise DataError(f"--appearance {appearance!r}: expected one of {', '.join(APPEARANCE_MODES)}")
    if int(size) != size or size < 32:
        raise DataError(f"--size must be an integer >= 32 pixels, got {size!r}")
    if int(batch) != batch or batch < 1:
        raise DataError(f"--batch must be a positive integer, got {batch!r}")


TOOL = "utils.synthetic.faces"  # the owner recorded in the manifest of a set (utils.output_dir)


def _legacy_set(folder: Path, files: list[str]) -> bool:
    """True for a set written before sets carried a manifest: its synthetic_config.json names this generator and
    every file has a name the generator gives (images and masks 00000.png.., the CSVs, the config)."""
    try:
        config = json.loads((folder / "synthetic_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    own_top = {"ground_truth.csv", "synthetic_config.json", *(f"{s}_landmarks_3D.csv" for s in SPLITS)}
    return isinstance(config, dict) and config.get("generator") == TOOL and all(
        name in own_top or (name.startswith("Dataset/") and _OWN_FILE.match(name[len("Dataset/"):]))
        for name in files)


def prepare_output(out: str | Path, overwrite: bool) -> ImageRoot:
    """The image root ``out`` once it is known that a new set may go there (nothing is written): a new or empty
    folder, or with ``overwrite`` a folder holding only a set this generator wrote (its manifest lists every file;
    a user's own images or CSVs are refused, never deleted). The set is then built beside and swapped in
    (`utils.output_dir.build_beside`)."""
    root = ImageRoot(out)
    check_target(root.root, TOOL, overwrite, legacy_owned=_legacy_set)
    return root


def _count(values: list[str]) -> dict[str, int]:
    return {name: values.count(name) for name in sorted(set(values))}


def _count_items(labels: list[str]) -> dict[str, int]:
    """Images per appearance item (an image counts in every item it has) and 'none', in `APPEARANCE_ITEMS` order."""
    items = [label.split("+") for label in labels]
    counts = {name: sum(name in found for found in items) for name in (*APPEARANCE_ITEMS, "none")}
    return {name: count for name, count in counts.items() if count}


def generate_dataset(bfm_path: str | Path, out: str | Path, num: int, seed: int = 0, occlusion: str = "mixed",
                     size: int = 224, batch: int = 16, ranges: SceneRanges | None = None,
                     device: torch.device | str = "cpu", overwrite: bool = False, progress: bool = False,
                     textures: TextureBank | None = None, appearance: str = "mixed",
                     appearance_config: AppearanceConfig | None = None) -> dict:
    """Render `num` synthetic occluded faces into the image root `out` (layout in the module doc).

    Args:
        bfm_path: face model h5 (BFM2017 layout; the demo model works). out: the image root to create.
        seed: makes the output deterministic (same arguments -> same files, byte for byte, on one machine).
        occlusion: 'mixed' (AR + CelebA-like, `ranges.unoccluded_share` without), 'ar', 'celeba' or 'none'.
        size: image side in pixels (camera `CameraConfig.preset("g2").resized(size)`). batch: render batch size.
        ranges: sampling ranges (`SceneRanges().frontal()` fixes the pose). textures: texture sources
        (default: `TextureBank.from_skimage()`). progress: show a tqdm bar.
        appearance: 'mixed' (a head and zero or more appearance items per face, as `appearance_config` says) or
        'none' (the bare face on its background).
    Returns:
        summary dict: root, num, size, occlusion, appearance, seed, splits (counts), categories (counts),
        appearance_items (images per item, and 'none'), mean_occluded_fraction, texture_sources, seconds.
    """
    _check_arguments(num, occlusion, size, batch, appearance)
    check_seed(seed)
    root = prepare_output(out, overwrite)
    appearance_config = AppearanceConfig() if appearance_config is None else appearance_config
    start = time.perf_counter()
    ranges = SceneRanges() if ranges is None else ranges
    device = torch.device(device)
    layout = CoeffLayout()
    camera = CameraConfig.preset("g2").resized(size)
    renderer = FaceRenderer(FaceModel.from_h5(bfm_path, layout), camera, layout).to(device, RENDER_DTYPE)
    head_renderer = None if appearance == "none" else HeadRenderer(bfm_path, layout, camera, device, RENDER_DTYPE)
    textures = TextureBank.from_skimage() if textures is None else textures
    with build_beside(root.root, TOOL, overwrite, legacy_owned=_legacy_set) as building:
        new = ImageRoot(building)
        new.dataset_dir.mkdir()
        summary = _render_set(new, bfm_path, renderer, num, seed, occlusion, size, batch, ranges, device,
                                      progress, textures, appearance, head_renderer, appearance_config, layout)
    return {**summary, "root": str(root.root), "seconds": time.perf_counter() - start}


def _render_set(root: ImageRoot, bfm_path, renderer, num, seed, occlusion, size, batch, ranges, device, progress,
                textures, appearance, head_renderer, appearance_config, layout) -> dict:
    """Render the set into ``root`` (a new folder) and write its tables and config; returns the summary."""
    records: list[SampleRecord] = []
    with tqdm(total=num, desc="synthetic faces", unit="img", disable=not progress) as bar:
        for first in range(0, num, batch):
            ids = range(first, min(num, first + batch))
            records += generate_batch(ids, seed, occlusion, renderer, textures, ranges, root.dataset_dir, device,
                                      head_renderer, appearance_config)
            bar.update(len(ids))
    splits = split_ids(num, seed)
    write_tables(root.root, records, splits, layout)
    summary = {"root": str(root.root), "num": num, "size": size, "occlusion": occlusion, "appearance": appearance,
               "seed": seed, "splits": {name: len(ids) for name, ids in splits.items()},
               "categories": _count([record.category for record in records]),
               "appearance_items": _count_items([record.appearance for record in records]),
               "mean_occluded_fraction": float(np.mean([record.occluded_fraction for record in records])),
               "texture_sources": list(textures.names)}
    config = {**{key: value for key, value in summary.items() if key != "root"}, "bfm": Path(bfm_path).name,
              "face_model": renderer.face_model.config(), "camera": "g2", "ranges": asdict(ranges),
              "appearance_config": asdict(appearance_config),
              "generator": TOOL}
    (root.root / "synthetic_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m utils.synthetic.faces",
                                     description="Render the synthetic occluded-face benchmark into an image root.")
    parser.add_argument("--bfm", default=RepoDefault(DEFAULT_DEMO_BFM),
                        help=f"face model h5 (default: <repo>/{DEFAULT_DEMO_BFM}, written first if missing)")
    parser.add_argument("--out", required=True, help="image root to create (IMAGE_ROOT/Dataset + CSVs)")
    parser.add_argument("--num", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--occlusion", choices=OCCLUSION_MODES, default="mixed",
                        help="occluder families: mixed (default), none, ar (sunglasses/scarf) or celeba")
    parser.add_argument("--appearance", choices=APPEARANCE_MODES, default="mixed",
                        help="mixed (default): a head and out-of-model appearance (beards, make-up, moles, "
                             "wrinkles, highlights, cast shadows) on the faces; none: the bare rendered faces")
    parser.add_argument("--size", type=int, default=REFERENCE_SIZE, help="image size in pixels (default: 224)")
    parser.add_argument("--batch", type=int, default=16, help="render batch size (default: 16)")
    parser.add_argument("--device", default="cpu", help="cpu (default), auto, cuda or cuda:<index>")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the set a previous run wrote in --out (only its own files; the new "
                        "set is built beside it and swapped in when complete)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bfm = resolve_cli_path(args.bfm)
    if isinstance(args.bfm, RepoDefault) and not bfm.is_file():
        from utils.synthetic.demo_face_model import write_demo_face_model

        write_demo_face_model(bfm, seed=0)
        print(f"{bfm} did not exist: wrote the procedural demo face model there (a stand-in, not BFM2017)")
    summary = generate_dataset(bfm, args.out, args.num, seed=args.seed, occlusion=args.occlusion, size=args.size,
                               batch=args.batch, device=resolve_device(args.device), overwrite=args.overwrite,
                               progress=True, appearance=args.appearance)
    splits = "/".join(str(summary["splits"][name]) for name in ("train", "val", "test"))
    categories = ", ".join(f"{name} {count}" for name, count in summary["categories"].items())
    items = ", ".join(f"{name} {count}" for name, count in summary["appearance_items"].items())
    print(f"wrote {summary['num']} images ({args.size}x{args.size}, occlusion {args.occlusion}, appearance "
          f"{args.appearance}, seed {args.seed}) to {summary['root']}: train/val/test {splits}; {categories}; "
          f"appearance: {items}; mean occluded fraction "
          f"{summary['mean_occluded_fraction']:.3f}; {summary['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    cli_main(main)
