"""Write an image and its GT visible-skin mask into an image root, the one rule the GT builders share.

``IMAGE_ROOT/Dataset/<stem>.png`` and ``IMAGE_ROOT/Dataset/<stem>_visible_skin_mask.png`` (0/255). With ``size``
both are resized to ``size x size`` (`utils.data.image_io.resize_image`: area when shrinking, else bilinear; the
mask re-binarised at 0.5), otherwise both take the image's native size (a mask of another size is resized to it).
"""
from __future__ import annotations

import numpy as np

from utils.data.image_io import resize_image, resize_mask, write_image_rgb, write_mask
from utils.data.image_root import ImageRoot, gt_mask_path


def write_gt_pair(image_root: ImageRoot, stem: str, image: np.ndarray, mask: np.ndarray, size: int | None) -> str:
    """Write ``image`` (``(H, W, 3)`` uint8 RGB) and ``mask`` (``(h, w)`` in {0, 1}, 1 = visible face skin).

    Returns the image's file name relative to ``IMAGE_ROOT/Dataset`` (``<stem>.png``).
    """
    height, width = (size, size) if size else image.shape[:2]
    filename = f"{stem}.png"
    write_image_rgb(image_root.dataset_dir / filename, resize_image(image, height, width))
    write_mask(gt_mask_path(image_root.dataset_dir / filename), resize_mask(mask, height, width))
    return filename
