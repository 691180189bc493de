"""Build GT visible-skin masks for the AR database from the colour-coded occlusion labels of Egger et al.

Usage::

    python -m utils.prepare.ar_gt --images AR_IMAGES --labels AR_LABELS --out IMAGE_ROOT [--size S] [--tolerance 40]

The exact colour coding of those labels could not be checked when this was written, so it is a table,
`LABEL_COLOURS` (RGB), matched per pixel with a tolerance (max absolute channel difference):

- occluders: hair green (0, 255, 0), glasses red (255, 0, 0), scarf blue (0, 0, 255),
  earring yellow (255, 255, 0);
- teeth white (255, 255, 255): counts as visible face;
- background black (0, 0, 0);
- ellipse magenta (255, 0, 255): the face ellipse, when it is drawn as an outline.

Visible skin (1 = visible) = face region minus occluders, where the face region is the inside of the drawn
ellipse (an ellipse fitted to the ellipse-coloured pixels, so occluders may hide parts of the outline;
black pixels inside it count as face) when ellipse-coloured pixels exist, otherwise every pixel
that is not background. Edit `LABEL_COLOURS` (or pass ``colours=``) if the labels use other colours.

Labels are matched to images by file stem: label ``X.png`` or ``X_anything.png`` belongs to image ``X.*``.
Output: ``IMAGE_ROOT/Dataset/X.png``, ``IMAGE_ROOT/Dataset/X_visible_skin_mask.png`` (native size unless
``--size``) and ``IMAGE_ROOT/ar_categories.csv`` (``filename,category``, see `ar_category`). No landmarks
are produced: run ``python -m utils.prepare.detect_landmarks`` on ``IMAGE_ROOT/Dataset`` afterwards (it carries
the masks through the alignment), or provide the CSVs.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from collections.abc import Mapping

import cv2
import numpy as np
from tqdm import tqdm

from utils.cli import cli_main
from utils.data.benchmark_files import AR_CATEGORIES, ar_category  # noqa: F401 (re-exported)
from utils.data.image_io import read_image_rgb
from utils.data.image_root import ImageRoot
from utils.errors import DataError
from utils.prepare.gt_writer import write_gt_pair

LABEL_COLOURS: dict[str, tuple[int, int, int]] = {
    "hair": (0, 255, 0),
    "glasses": (255, 0, 0),
    "scarf": (0, 0, 255),
    "earring": (255, 255, 0),
    "teeth": (255, 255, 255),
    "background": (0, 0, 0),
    "ellipse": (255, 0, 255),
}
OCCLUDERS = ("hair", "glasses", "scarf", "earring")
DEFAULT_TOLERANCE = 40
IMAGE_EXTENSIONS = (".bmp", ".png", ".jpg", ".jpeg", ".ppm", ".tif", ".tiff")

def colour_mask(label_rgb: np.ndarray, colour: tuple[int, int, int], tolerance: int) -> np.ndarray:
    """``(H, W)`` bool: pixels whose every channel is within `tolerance` of `colour`."""
    difference = np.abs(label_rgb.astype(np.int16) - np.asarray(colour, np.int16))
    return difference.max(axis=2) <= tolerance


def _fill_ellipse(outline: np.ndarray) -> np.ndarray:
    """Inside of the ellipse drawn as `outline` (``(H, W)`` bool), fitted so occluders may break the outline."""
    ys, xs = np.nonzero(outline)
    if len(xs) < 5:
        raise DataError(f"face ellipse has only {len(xs)} pixels; cannot fit an ellipse (need 5)")
    box = cv2.fitEllipse(np.stack([xs, ys], axis=1).astype(np.float32))
    filled = np.zeros(outline.shape, np.uint8)
    cv2.ellipse(filled, box, 1, thickness=cv2.FILLED)
    return filled.astype(bool) | outline


def ar_visible_skin(
    label_rgb: np.ndarray,
    colours: Mapping[str, tuple[int, int, int]] = LABEL_COLOURS,
    tolerance: int = DEFAULT_TOLERANCE,
) -> np.ndarray:
    """Visible face skin from an ``(H, W, 3)`` uint8 RGB label image (rules in the module docstring).

    Returns ``(H, W)`` float32 in {0, 1}, 1 = visible face skin.
    """
    if label_rgb.ndim != 3 or label_rgb.shape[2] != 3:
        raise DataError(f"ar_visible_skin: expected an (H, W, 3) RGB label image, got {label_rgb.shape}")
    missing = sorted({"background", "ellipse", *OCCLUDERS} - set(colours))
    if missing:
        raise DataError(f"ar_visible_skin: colour table lacks {missing}")
    occluded = np.zeros(label_rgb.shape[:2], bool)
    for name in OCCLUDERS:
        occluded |= colour_mask(label_rgb, colours[name], tolerance)
    ellipse = colour_mask(label_rgb, colours["ellipse"], tolerance)
    if ellipse.any():
        region = _fill_ellipse(ellipse)
    else:
        region = ~colour_mask(label_rgb, colours["background"], tolerance)
    return (region & ~occluded).astype(np.float32)


def match_labels(image_dir: Path, label_dir: Path) -> list[tuple[Path, Path]]:
    """Pair label files with images by stem (``X.png`` or ``X_*.png`` -> image ``X.*``); sorted by image."""
    images = {p.stem: p for p in sorted(image_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
    pairs = []
    for label in sorted(p for p in label_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
        candidates = [s for s in images if label.stem == s or label.stem.startswith(s + "_")]
        if candidates:
            pairs.append((images[max(candidates, key=len)], label))
    return sorted(pairs)


def convert_pair(image_path: Path, label_path: Path, image_root: ImageRoot, size: int | None, tolerance: int) -> str:
    """Write one image and its visible-skin mask into the image root; returns the written image filename."""
    image = read_image_rgb(image_path)
    label = read_image_rgb(label_path)
    if label.shape[:2] != image.shape[:2]:
        label = cv2.resize(label, image.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    return write_gt_pair(image_root, image_path.stem, image, ar_visible_skin(label, tolerance=tolerance), size)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", required=True, help="folder of AR images (e.g. m-001-21.bmp)")
    parser.add_argument("--labels", required=True, help="folder of colour-coded label images")
    parser.add_argument("--out", required=True, help="image root to write (images go to OUT/Dataset/)")
    parser.add_argument("--size", type=int, default=None, help="resize to SIZE x SIZE (default: keep native size)")
    parser.add_argument("--tolerance", type=int, default=DEFAULT_TOLERANCE, help="per-channel colour tolerance")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[str]:
    """Convert every matched (image, label) pair; returns the written filenames."""
    image_dir, label_dir = Path(args.images), Path(args.labels)
    for flag, folder in (("--images", image_dir), ("--labels", label_dir)):
        if not folder.is_dir():
            raise DataError(f"{flag} {folder}: not a folder")
    if image_dir.resolve() == label_dir.resolve():
        raise DataError("--images and --labels must be different folders")
    if args.size is not None and args.size < 1:
        raise DataError(f"--size must be positive, got {args.size}")
    pairs = match_labels(image_dir, label_dir)
    if not pairs:
        raise DataError(
            f"no label in {label_dir} matches an image in {image_dir} (label X.png or X_*.png for image X.*)"
        )
    image_root = ImageRoot(args.out)
    written = [convert_pair(i, lab, image_root, args.size, args.tolerance) for i, lab in tqdm(pairs, desc="ar_gt")]
    with (image_root.root / "ar_categories.csv").open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows([name, ar_category(name)] for name in written)
    return written


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    written = run(args)
    out = ImageRoot(args.out)
    print(f"wrote {len(written)} images + visible-skin masks to {out.dataset_dir}")
    print(f"categories: {out.root / 'ar_categories.csv'}")
    print("no landmarks were produced: run "
          f"`python -m utils.prepare.detect_landmarks --images {out.dataset_dir} --out ALIGNED_ROOT`")
    return 0


if __name__ == "__main__":
    cli_main(main)
