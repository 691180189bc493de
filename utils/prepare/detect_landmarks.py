# ruff: noqa: E402  (the imports follow the start-up Ctrl-C handler)
"""Detect 68 landmarks in raw photos, align and crop the faces, and write an image root.

Usage::

    python -m utils.prepare.detect_landmarks --images RAW_DIR --out IMAGE_ROOT [--size 224] [--seed 0]
        [--split 0.8,0.1,0.1] [--overwrite]

For every image under RAW_DIR (recursively; ``*_visible_skin_mask.png`` files are not inputs) the largest
face is found with dlib's HOG detector, its 68 iBUG landmarks with dlib's shape predictor (the model file
ships with the ``face-recognition-models`` package). The face is then aligned with the similarity
transform that best maps 5 points (the two eye centres, i.e. the means of the eye corners as in the original's
G2 code, the nose tip, the mouth corners; `models.landmarks68.five_points`) onto
`TEMPLATE` and cropped to ``size x size``. A GT mask ``X_visible_skin_mask.png`` beside ``X.*`` is warped
the same way. Output::

    IMAGE_ROOT/Dataset/<relative path>.png (+ _visible_skin_mask.png)
    IMAGE_ROOT/{train,val,test,all}_landmarks_3D.csv   landmarks in crop pixels, seeded split
    IMAGE_ROOT/no_face_found.txt                        skipped images and why (one bad image never stops the run)

A non-empty --out is refused unless it holds only an earlier output of this tool and --overwrite is given; the new
image root is built beside it and swapped in when complete (`utils.output_dir`), so an interrupted run leaves the
old one as it was.

dlib is an optional extra: ``pip install -r requirements-landmarks.txt``. Its jaw points follow the 2D
face outline; the original authors recommend 3D-FAN contour points for the jaw (docs/method.md §3.1).
`align_face` and the helpers above it are pure numpy/OpenCV and need no dlib.
"""

from __future__ import annotations

if __name__ == "__main__":  # Ctrl-C while torch is imported: one line, no traceback (utils/startup.py)
    from utils.startup import quiet_interrupts
    quiet_interrupts()

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from skimage.transform import SimilarityTransform
from tqdm import tqdm

from models.dlib_face import dlib_model_path
from models.errors import ExtraMissing
from models.landmarks68 import five_points
from utils.cli import check_seed, cli_main
from utils.data.image_io import read_image_rgb, read_mask, write_image_rgb, write_mask
from utils.data.image_root import GT_MASK_SUFFIX, ImageRoot, gt_mask_path, split_indices
from utils.errors import DataError
from utils.landmarks_csv import write_landmarks_csv
from utils.output_dir import build_beside, check_target

# Target positions of the 5 alignment points as fractions of the crop side (x right, y down, 0 = left/top
# edge, 1 = right/bottom edge), in the order of `models.landmarks68.five_points`: eye centre of corners 36, 39
# (image left), eye centre of corners 42, 45, nose tip (30), mouth corner 48, mouth corner 54. Chosen so the face
# fills the crop about as the default camera (focal 1014.72 px at 224, 1 m away) renders the BFM mean face: eyes
# ~0.32 S apart at y = 0.40 S, mouth corners at y = 0.71 S. An estimate; tune it against a render of the mean face.
TEMPLATE = np.array(
    [[0.340, 0.400], [0.660, 0.400], [0.500, 0.555], [0.375, 0.710], [0.625, 0.710]], dtype=np.float64
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
REQUIREMENTS_HINT = "pip install -r requirements-landmarks.txt"
DETECT_MAX_SIDE = 800


LandmarkExtraMissing = ExtraMissing  # dlib or its model files are not installed
TOOL = "utils.prepare.detect_landmarks"  # the owner recorded in the manifest of the image root it writes


def template_points(size: int) -> np.ndarray:
    """`TEMPLATE` in pixel coordinates of a ``size x size`` crop (pixel centres at integers): ``(5, 2)``."""
    return TEMPLATE * size - 0.5


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping src to dst.

    Args: ``(K, 2)`` point sets, K >= 2. Returns the ``(2, 3)`` matrix M with ``dst ~ M @ [x, y, 1]``
    (scikit-image's `SimilarityTransform`, Umeyama 1991). DataError when the source points coincide.
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        transform = SimilarityTransform.from_estimate(src, dst)
        ok = bool(transform)
    else:
        transform = SimilarityTransform()
        ok = transform.estimate(src, dst)
    if not ok or not np.isfinite(transform.params).all():
        raise DataError("similarity_transform: source points coincide")
    return transform.params[:2].copy()


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a ``(2, 3)`` affine matrix to ``(..., 2)`` points."""
    points = np.asarray(points, np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def alignment_matrix(landmarks68: np.ndarray, size: int) -> np.ndarray:
    """``(2, 3)`` similarity mapping image pixels to the ``size x size`` aligned crop."""
    return similarity_transform(five_points(landmarks68), template_points(size))


def warp_to_crop(image: np.ndarray, matrix: np.ndarray, size: int, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """Warp ``(H, W[, C])`` into a ``size x size`` crop with `matrix`; black outside the image.

    When the warp shrinks by more than 2x the image is first area-resized, to avoid aliasing.
    """
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    height, width = image.shape[:2]
    if scale < 0.5 and interpolation != cv2.INTER_NEAREST:
        small_w, small_h = max(1, round(width * scale)), max(1, round(height * scale))
        image = cv2.resize(image, (small_w, small_h), interpolation=cv2.INTER_AREA)
        fx, fy = small_w / width, small_h / height
        small_to_full = np.array([[1 / fx, 0, 0.5 / fx - 0.5], [0, 1 / fy, 0.5 / fy - 0.5]])
        linear = matrix[:, :2] @ small_to_full[:, :2]
        offset = matrix[:, :2] @ small_to_full[:, 2] + matrix[:, 2]
        matrix = np.hstack([linear, offset[:, None]])
    return cv2.warpAffine(image, matrix, (size, size), flags=interpolation, borderMode=cv2.BORDER_CONSTANT)


def align_face(image: np.ndarray, landmarks68: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Align and crop a face.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        landmarks68: ``(68, 2)`` pixels of `image` (x right, y down).
        size: side S of the crop.
    Returns:
        ``(S, S, 3)`` uint8 crop whose 5 alignment points sit (in the least-squares sense) on
        `template_points(S)`, and the ``(68, 2)`` float32 landmarks in crop pixels.
    """
    matrix = alignment_matrix(landmarks68, size)
    return warp_to_crop(image, matrix, size), transform_points(landmarks68, matrix).astype(np.float32)


def predictor_path() -> Path:
    """Location of ``shape_predictor_68_face_landmarks.dat`` in the ``face-recognition-models`` package, found
    without importing the package (`models.dlib_face.dlib_model_path`); `LandmarkExtraMissing` names the pip command.
    """
    return dlib_model_path("shape_predictor_68_face_landmarks.dat")


def load_dlib() -> tuple[Any, Any]:
    """(face detector, 68-point shape predictor) from dlib, or `LandmarkExtraMissing` with the install hint."""
    try:
        import dlib
    except ImportError:
        raise LandmarkExtraMissing(f"dlib is not installed: {REQUIREMENTS_HINT}") from None
    return dlib.get_frontal_face_detector(), dlib.shape_predictor(str(predictor_path()))


def detect_landmarks68(image: np.ndarray, detector: Any, predictor: Any) -> np.ndarray | None:
    """68 landmarks ``(68, 2)`` float32 (pixels of `image`) of the largest detected face, or None.

    `image` is ``(H, W, 3)`` uint8 RGB. Detection runs on a copy at most `DETECT_MAX_SIDE` px wide (upsampled
    once), the landmarks on the full image. Ties in size go to the higher detector score.
    """
    import dlib

    scale = min(1.0, DETECT_MAX_SIDE / max(image.shape[:2]))
    small = image if scale == 1.0 else cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    rects, scores, _ = detector.run(np.ascontiguousarray(small), 1, 0.0)
    if not rects:
        return None
    best = max(range(len(rects)), key=lambda k: (rects[k].width() * rects[k].height(), scores[k]))
    r = rects[best]
    box = dlib.rectangle(*(round(v / scale) for v in (r.left(), r.top(), r.right(), r.bottom())))
    shape = predictor(np.ascontiguousarray(image), box)
    return np.array([[shape.part(k).x, shape.part(k).y] for k in range(68)], dtype=np.float32)


def find_images(image_dir: Path) -> list[Path]:
    """Image files under `image_dir` (recursive, sorted), GT mask files excluded."""
    return sorted(
        p for p in image_dir.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.endswith(GT_MASK_SUFFIX)
    )


def parse_split(text: str) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` -> (train, val, test) fractions; they must be >= 0 and sum to 1."""
    try:
        parts = tuple(float(v) for v in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or not all(math.isfinite(v) and v >= 0 for v in parts) or abs(sum(parts) - 1.0) > 1e-6:
        raise DataError(f"--split {text!r}: expected three fractions >= 0 summing to 1, e.g. 0.8,0.1,0.1")
    return parts  # type: ignore[return-value]


def split_rows(rows: list, fractions: tuple[float, float, float], seed: int) -> dict[str, list]:
    """`rows` split by `utils.data.image_root.split_indices` (each split in input order) plus "all"."""
    return {name: [rows[i] for i in ids] for name, ids in split_indices(len(rows), fractions, seed).items()}


def process_image(
    path: Path, relative: Path, models: tuple[Any, Any], size: int, root: ImageRoot
) -> tuple[str, np.ndarray]:
    """Align one image (and its GT mask, if any) into the image root; DataError when no face is found."""
    image = read_image_rgb(path)
    mask_path = gt_mask_path(path)
    mask = read_mask(mask_path) if mask_path.is_file() else None
    if mask is not None and mask.shape != image.shape[:2]:
        raise DataError(f"GT mask {mask_path.name} is {mask.shape}, image is {image.shape[:2]}")
    landmarks = detect_landmarks68(image, *models)
    if landmarks is None:
        raise DataError("no face found")
    matrix = alignment_matrix(landmarks, size)
    filename = relative.with_suffix(".png").as_posix()
    write_image_rgb(root.dataset_dir / filename, warp_to_crop(image, matrix, size))
    if mask is not None:
        write_mask(gt_mask_path(root.dataset_dir / filename), warp_to_crop(mask, matrix, size) >= 0.5)
    return filename, transform_points(landmarks, matrix).astype(np.float32)


def _check_args(args: argparse.Namespace) -> tuple[Path, ImageRoot, tuple[float, float, float]]:
    image_dir, root = Path(args.images), ImageRoot(args.out)
    if not image_dir.is_dir():
        raise DataError(f"--images {image_dir}: not a folder")
    if args.size < 16:
        raise DataError(f"--size must be at least 16, got {args.size}")
    if root.dataset_dir.resolve() == image_dir.resolve():
        raise DataError(f"--out {args.out}: its Dataset/ folder is the --images folder; write to a new image root")
    if image_dir.resolve().is_relative_to(root.root.resolve()):
        raise DataError(f"--images {image_dir} lies inside --out {args.out}; write the image root elsewhere")
    check_seed(args.seed)
    fractions = parse_split(args.split)
    check_target(root.root, TOOL, args.overwrite)
    return image_dir, root, fractions


def align_folder(args: argparse.Namespace) -> tuple[int, list[str]]:
    """Align every image under ``args.images`` into ``args.out``; returns (faces written, skipped lines)."""
    image_dir, root, fractions = _check_args(args)
    paths = find_images(image_dir)
    if not paths:
        raise DataError(f"--images {image_dir}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    models = load_dlib()
    with build_beside(root.root, TOOL, args.overwrite) as building:
        return _align_into(ImageRoot(building), paths, image_dir, models, args, fractions)


def _align_into(root: ImageRoot, paths: list[Path], image_dir: Path, models, args, fractions
                ) -> tuple[int, list[str]]:
    """Align ``paths`` into the new image root ``root`` (built beside ``--out``, swapped in by the caller)."""
    rows, skipped, taken = [], [], set()
    for path in tqdm(paths, desc="detect_landmarks"):
        relative = path.relative_to(image_dir)
        if relative.with_suffix(".png") in taken:
            skipped.append(f"{relative.as_posix()}: another input already maps to {relative.with_suffix('.png')}")
            continue
        try:
            rows.append(process_image(path, relative, models, args.size, root))
            taken.add(relative.with_suffix(".png"))
        except (DataError, cv2.error, RuntimeError) as err:
            skipped.append(f"{relative.as_posix()}: {err}")
    if not rows:
        raise DataError(f"no face found in any of the {len(paths)} images under {image_dir} ({'; '.join(skipped[:3])}"
                        f"{' ...' if len(skipped) > 3 else ''}); --out was left as it was")
    root.root.mkdir(parents=True, exist_ok=True)
    (root.root / "no_face_found.txt").write_text("".join(line + "\n" for line in skipped))
    for split, split_rows_ in split_rows(rows, fractions, args.seed).items():
        write_landmarks_csv(root.root / f"{split}_landmarks_3D.csv", split_rows_)
    return len(rows), skipped


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", required=True, help="folder of raw photos (searched recursively)")
    parser.add_argument("--out", required=True, help="image root to write")
    parser.add_argument("--size", type=int, default=224, help="side of the aligned crops (default 224)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val/test split")
    parser.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test fractions (default 0.8,0.1,0.1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the image root an earlier run of this tool wrote in --out (only its own files; "
                             "the new one is built beside it and swapped in when complete)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    count, skipped = align_folder(args)
    root = ImageRoot(args.out)
    print(f"aligned {count} faces into {root.dataset_dir}; CSVs in {root.root}")
    if skipped:
        print(f"skipped {len(skipped)} images (see {root.root / 'no_face_found.txt'})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli_main(main)
