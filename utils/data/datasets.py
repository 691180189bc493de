"""Face images + 68 landmarks from an image root (see utils/data/image_root.py for the layout).

Images are expected to be pre-aligned square face crops (``python -m utils.prepare.detect_landmarks`` produces
them from raw photos). Any size is accepted: each image is resized to ``S x S`` (`image_io.resize_image`: area
averaging when shrinking, bilinear when enlarging) and its landmarks are scaled with it. A non-square image
is stretched, each axis scaled separately (x by S/W, y by S/H), exactly as the original code did.

Everything returned stays on the CPU, so ``DataLoader(num_workers > 0)`` works; move batches to the device
in the training loop.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from utils.data.augment import Augmenter, augment_arrays, split_key
from utils.data.image_io import read_image_rgb, read_mask, resize_image
from utils.data.image_root import ImageRoot, gt_mask_path
from utils.errors import DataError
from utils.landmarks_csv import read_landmarks_csv

log = logging.getLogger(__name__)

LANDMARK_MARGIN = 0.5  # landmarks may lie this fraction of the image side outside it (faces at the border)
SMALL_IMAGE_FRACTION = 0.25  # warn when an image is smaller than this fraction of --image_size


def scale_landmarks(landmarks: np.ndarray, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> np.ndarray:
    """Map ``(..., 2)`` pixel coordinates of an ``src_hw`` image to the same image resized to ``dst_hw``.

    Pixel centres sit at integer coordinates, so the map is ``x' = (x + 0.5) * W'/W - 0.5`` (same for y
    with H), which is the sampling OpenCV's resize uses.
    """
    scale = np.array([dst_hw[1] / src_hw[1], dst_hw[0] / src_hw[0]], dtype=np.float64)
    return ((np.asarray(landmarks, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)


class FaceDataset(Dataset):
    """Images and landmarks of one split of an image root.

    Args:
        root: ``IMAGE_ROOT`` (or ``IMAGE_ROOT/Dataset``, or an `ImageRoot`).
        split: "train", "val", "test" or "all".
        image_size: side S of the returned images.
        test_mode: also return the filename and the GT mask.
        augment: G2's training augmentation (``utils.data.augment``), or None. It applies to items fetched with an
            ``(epoch, index)`` key, which the training loader's sampler sends (``epoch_keyed``); the image, the
            landmarks (mirror-renumbered when flipped) and the GT mask get one affine per (seed, epoch, index).
            Items fetched with a plain index are never augmented.
    Items (dicts):
        "image": ``(3, S, S)`` float32 RGB in [0, 1];
        "landmarks": ``(68, 2)`` float32 pixels of the resized image (x right, y down);
        "index": int, the row of the CSV;
        test mode only: "filename" (str, relative to ``IMAGE_ROOT/Dataset``) and "gt_mask":
        ``(1, S, S)`` float32 in {0, 1} (1 = visible face skin) or None when ``X_visible_skin_mask.png``
        does not exist beside the image.
    The CSV is validated (format and image existence) at construction, so errors appear before training.
    """

    def __init__(self, root: str | Path | ImageRoot, split: str, image_size: int = 224, test_mode: bool = False,
                 augment: Augmenter | None = None):
        if int(image_size) != image_size or image_size < 1:
            raise DataError(f"image_size must be a positive integer, got {image_size!r}")
        self.root = root if isinstance(root, ImageRoot) else ImageRoot(root)
        self.split = split
        self.image_size = int(image_size)
        self.test_mode = test_mode
        self.augment = augment
        csv_path = self.root.csv(split)
        if not csv_path.is_file():
            raise DataError(
                f"{split} landmark CSV not found: {csv_path} (image root {self.root.root}); "
                f"create it with `python -m utils.prepare.detect_landmarks --images RAW_DIR --out {self.root.root}` "
                "or write it yourself (rows: filename, x0, y0, ..., x67, y67)"
            )
        self.csv_path = csv_path
        self.rows = read_landmarks_csv(csv_path, image_dir=self.root.dataset_dir, allow_empty=True)
        self._warned: set[str] = set()
        if not self.rows:
            raise DataError(
                f"{csv_path} has no rows: the {split} split is empty; add images to it "
                "(or re-run utils.prepare.detect_landmarks with a --split that gives it a share)"
            )

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def epoch_keyed(self) -> bool:
        """True when items depend on the epoch (augmentation on): the training sampler then sends (epoch, index)."""
        return self.augment is not None

    @property
    def filenames(self) -> list[str]:
        """Filenames of the split, relative to ``IMAGE_ROOT/Dataset``, in CSV (= index) order."""
        return [filename for filename, _ in self.rows]

    def _load_gt_mask(self, image_path: Path) -> torch.Tensor | None:
        path = gt_mask_path(image_path)
        if not path.is_file():
            return None
        mask = cv2.resize(read_mask(path), (self.image_size,) * 2, interpolation=cv2.INTER_NEAREST)
        return torch.from_numpy(mask).unsqueeze(0)

    def _check_sample(self, filename: str, hw: tuple[int, int], landmarks: np.ndarray) -> None:
        """DataError when the landmarks lie far outside their image (the CSV is for other images or another frame);
        a warning, once per file, when the image is much smaller than ``image_size`` (it is upscaled a lot)."""
        height, width = hw
        lo = -LANDMARK_MARGIN * np.array([width, height])
        hi = (1.0 + LANDMARK_MARGIN) * np.array([width, height])
        if ((landmarks < lo) | (landmarks > hi)).any():
            raise DataError(f"{self.csv_path}: the landmarks of {filename!r} lie far outside its {width}x{height} "
                            f"image (x {landmarks[:, 0].min():.0f}..{landmarks[:, 0].max():.0f}, y "
                            f"{landmarks[:, 1].min():.0f}..{landmarks[:, 1].max():.0f}): they must be pixel "
                            "coordinates of this image file")
        if min(height, width) < SMALL_IMAGE_FRACTION * self.image_size and filename not in self._warned:
            self._warned.add(filename)
            log.warning("%s is %dx%d px, less than a quarter of --image_size %d: it is enlarged %.0fx", filename,
                        width, height, self.image_size, self.image_size / min(height, width))

    def __getitem__(self, key) -> dict[str, Any]:
        """Item ``key``: an index, or an ``(epoch, index)`` pair (augmented when ``augment`` is set)."""
        epoch, index = split_key(key)
        filename, landmarks = self.rows[index]
        image_path = self.root.dataset_dir / filename
        image = read_image_rgb(image_path)
        size = self.image_size
        self._check_sample(filename, image.shape[:2], landmarks)
        landmarks = scale_landmarks(landmarks, image.shape[:2], (size, size))
        image = resize_image(image, size, size)
        gt_mask = self._load_gt_mask(image_path) if self.test_mode else None
        if self.augment is not None and epoch is not None:
            masks = [] if gt_mask is None else [gt_mask[0].numpy()]
            [image], masks, landmarks = augment_arrays(self.augment.params(epoch, index, (size, size)), [image],
                                                       masks, landmarks)
            gt_mask = torch.from_numpy(masks[0])[None] if masks else None
        item: dict[str, Any] = {
            "image": torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0),
            "landmarks": torch.from_numpy(landmarks),
            "index": index,
        }
        if self.test_mode:
            item["filename"] = filename
            item["gt_mask"] = gt_mask
        return item


def collate_faces(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate `FaceDataset` items into a batch.

    Returns "image" ``(B, 3, S, S)``, "landmarks" ``(B, 68, 2)``, "index" ``(B,)`` long; with test-mode
    items also "filename" (list of B str), "gt_mask" ``(B, 1, S, S)`` (zeros where an image has no GT mask)
    and "has_gt_mask" ``(B,)`` bool. Batches mixing images with and without GT masks are fine.
    """
    if not batch:
        raise DataError("collate_faces: empty batch")
    out: dict[str, Any] = {
        "image": torch.stack([item["image"] for item in batch]),
        "landmarks": torch.stack([item["landmarks"] for item in batch]),
        "index": torch.as_tensor([item["index"] for item in batch], dtype=torch.long),
    }
    if "filename" in batch[0]:
        out["filename"] = [item["filename"] for item in batch]
    if "gt_mask" in batch[0]:
        _, height, width = batch[0]["image"].shape
        empty = torch.zeros(1, height, width)
        out["gt_mask"] = torch.stack([empty if item["gt_mask"] is None else item["gt_mask"] for item in batch])
        out["has_gt_mask"] = torch.tensor([item["gt_mask"] is not None for item in batch], dtype=torch.bool)
    return out
