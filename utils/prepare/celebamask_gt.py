"""Build GT visible-skin masks for CelebA-HQ from the CelebAMask-HQ part labels.

Usage::

    python -m utils.prepare.celebamask_gt --celeba_root CelebAMask-HQ --out IMAGE_ROOT [--size S] \
        [--ids 0 1 2 | --limit N]

Input layout (as distributed): ``CelebA-HQ-img/{id}.jpg`` (1024 x 1024) and
``CelebAMask-HQ-mask-anno/{k}/{id:05d}_{class}.png`` (512 x 512, one binary image per class present,
``k = id // 2000``).

Visible face skin (1 = visible) is defined as::

    (skin | nose | l_brow | r_brow | l_eye | r_eye | u_lip | l_lip | mouth)
    minus (eye_g | hat | hair | ear_r | neck_l | neck | cloth | l_ear | r_ear)

i.e. the face parts the 3D face model covers, minus every occluder (glasses, hat, hair, earrings, necklace,
clothes) and minus the neck and ears, which the cropped BFM face does not cover (the part labels overlap
at boundaries; subtracting them keeps the GT on the face proper).

Output: ``IMAGE_ROOT/Dataset/{id}.png`` and ``IMAGE_ROOT/Dataset/{id}_visible_skin_mask.png`` (0/255),
both ``S x S`` when ``--size`` is given, else at the image's native 1024 x 1024 (the masks are upsampled).
No landmarks are produced: run ``python -m utils.prepare.detect_landmarks --images IMAGE_ROOT/Dataset
--out ALIGNED_ROOT`` afterwards (it aligns the masks with the images), or provide the CSVs yourself.
Keeping the native size (the default) gives the aligner the full resolution.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from collections.abc import Mapping

import numpy as np
from tqdm import tqdm

from utils.cli import cli_main
from utils.data.image_io import read_image_rgb, read_mask
from utils.data.image_root import ImageRoot
from utils.errors import DataError
from utils.prepare.gt_writer import write_gt_pair

POSITIVE_CLASSES = ("skin", "nose", "l_brow", "r_brow", "l_eye", "r_eye", "u_lip", "l_lip", "mouth")
OCCLUDER_CLASSES = ("eye_g", "hat", "hair", "ear_r", "neck_l", "neck", "cloth", "l_ear", "r_ear")
IMAGE_DIR = "CelebA-HQ-img"
ANNO_DIR = "CelebAMask-HQ-mask-anno"


def label_paths(anno_dir: str | Path, image_id: int) -> dict[str, Path]:
    """Existing part-label files of one image: ``{class: path}`` (classes absent from the image are missing)."""
    folder = Path(anno_dir) / str(image_id // 2000)
    paths = {name: folder / f"{image_id:05d}_{name}.png" for name in POSITIVE_CLASSES + OCCLUDER_CLASSES}
    return {name: path for name, path in paths.items() if path.is_file()}


def load_labels(anno_dir: str | Path, image_id: int) -> dict[str, np.ndarray]:
    """Read the part labels of one image as ``{class: (H, W) float32 in {0, 1}}``."""
    return {name: read_mask(path) for name, path in label_paths(anno_dir, image_id).items()}


def compose_visible_skin(labels: Mapping[str, np.ndarray] | str | Path, image_id: int | None = None) -> np.ndarray:
    """Visible face skin from CelebAMask-HQ part labels (the union/difference in the module docstring).

    Args:
        labels: ``{class: (H, W) array}`` (bool, 0/1 or 0/255), or the ``CelebAMask-HQ-mask-anno`` folder
            together with `image_id`.
    Returns:
        ``(H, W)`` float32 in {0, 1}, 1 = visible face skin.
    """
    if not isinstance(labels, Mapping):
        if image_id is None:
            raise DataError("compose_visible_skin: pass image_id together with the annotation folder")
        anno_dir, labels = labels, load_labels(labels, image_id)
        if not labels:
            raise DataError(f"no CelebAMask-HQ label files for image {image_id} under {anno_dir}")
    unknown = sorted(set(labels) - set(POSITIVE_CLASSES + OCCLUDER_CLASSES))
    if unknown:
        raise DataError(f"compose_visible_skin: unknown CelebAMask-HQ classes {unknown}")
    if not labels:
        raise DataError("compose_visible_skin: no labels given")
    shapes = {np.shape(label) for label in labels.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise DataError(f"compose_visible_skin: labels must be (H, W) arrays of one size, got {sorted(shapes)}")
    shape = shapes.pop()
    positive = np.zeros(shape, bool)
    occluded = np.zeros(shape, bool)
    for name, label in labels.items():
        target = positive if name in POSITIVE_CLASSES else occluded
        target |= np.asarray(label) > (127 if np.asarray(label).dtype == np.uint8 else 0.5)
    return (positive & ~occluded).astype(np.float32)


def list_image_ids(celeba_root: str | Path) -> list[int]:
    """Sorted numeric ids of the images in ``CELEBA_ROOT/CelebA-HQ-img``."""
    image_dir = Path(celeba_root) / IMAGE_DIR
    if not image_dir.is_dir():
        raise DataError(f"--celeba_root {celeba_root}: no {IMAGE_DIR}/ folder (expected the CelebAMask-HQ layout)")
    return sorted(int(path.stem) for path in image_dir.glob("*.jpg") if path.stem.isdigit())


def convert_image(celeba_root: str | Path, image_id: int, image_root: ImageRoot, size: int | None) -> bool:
    """Write one image and its visible-skin mask into the image root; False when it has no labels."""
    celeba_root = Path(celeba_root)
    labels = load_labels(celeba_root / ANNO_DIR, image_id)
    if not labels:
        return False
    image = read_image_rgb(celeba_root / IMAGE_DIR / f"{image_id}.jpg")
    write_gt_pair(image_root, str(image_id), image, compose_visible_skin(labels), size)
    return True


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--celeba_root", required=True, help="CelebAMask-HQ folder (holds CelebA-HQ-img/)")
    parser.add_argument("--out", required=True, help="image root to write (images go to OUT/Dataset/)")
    parser.add_argument("--size", type=int, default=None, help="resize to SIZE x SIZE (default: keep 1024)")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--ids", type=int, nargs="+", help="convert only these image ids")
    choice.add_argument("--limit", type=int, help="convert only the first N ids")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> tuple[int, list[int]]:
    """Convert the selected images; returns (number written, ids skipped for lack of labels)."""
    if args.size is not None and args.size < 1:
        raise DataError(f"--size must be positive, got {args.size}")
    if args.limit is not None and args.limit < 1:
        raise DataError(f"--limit must be positive, got {args.limit}")
    ids = args.ids if args.ids else list_image_ids(args.celeba_root)[: args.limit]
    if not ids:
        raise DataError(f"--celeba_root {args.celeba_root}: no images selected")
    image_root = ImageRoot(args.out)
    skipped = [
        i for i in tqdm(ids, desc="celebamask_gt") if not convert_image(args.celeba_root, i, image_root, args.size)
    ]
    return len(ids) - len(skipped), skipped


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    written, skipped = run(args)
    print(f"wrote {written} images + visible-skin masks to {ImageRoot(args.out).dataset_dir}")
    if skipped:
        print(f"skipped {len(skipped)} ids without label files: {skipped[:20]}", file=sys.stderr)
    print("no landmarks were produced: run `python -m utils.prepare.detect_landmarks --images "
          f"{ImageRoot(args.out).dataset_dir} --out ALIGNED_ROOT` or provide the CSVs")
    return 0


if __name__ == "__main__":
    cli_main(main)
