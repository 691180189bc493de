"""Image and mask files <-> arrays, with OpenCV.

Arrays returned here are numpy, channel-last, RGB (OpenCV's BGR is converted at this boundary and
nowhere else). Tensors handed to the writers follow the project layout ``(3, H, W)`` / ``(B, 3, H, W)``
float RGB in [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from utils.errors import DataError


def _read_raw(path: str | Path, flags: int) -> np.ndarray:
    """Decode an image file with OpenCV or raise `DataError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise DataError(f"cannot read image file {path}: {err.strerror or err}") from None
    image = cv2.imdecode(data, flags) if data.size else None
    if image is None:
        raise DataError(f"cannot decode image file {path} (corrupt, empty or unsupported format)")
    return image


def read_image_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` uint8 RGB (grey images are expanded, alpha is dropped)."""
    image = _read_raw(path, cv2.IMREAD_COLOR)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask file as ``(H, W)`` float32 in {0, 1}: channel 0 (R, or the grey level) >= half range."""
    mask = _read_raw(path, cv2.IMREAD_UNCHANGED)
    if mask.ndim == 3:
        mask = mask[:, :, 2] if mask.shape[2] >= 3 else mask[:, :, 0]
    full_scale = float(np.iinfo(mask.dtype).max) if np.issubdtype(mask.dtype, np.integer) else 1.0
    return (mask.astype(np.float32) >= 0.5 * full_scale).astype(np.float32)


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize ``(H, W[, C])`` to ``(height, width[, C])``: area averaging when shrinking both axes, else bilinear.

    The project's one resize rule for images and masks (an image of the right size is returned as is).
    """
    if image.shape[:2] == (height, width):
        return image
    shrinking = height <= image.shape[0] and width <= image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a ``(H, W)`` {0, 1} mask with `resize_image` and re-binarise at 0.5: ``(height, width)`` float32."""
    resized = resize_image(mask.astype(np.float32), height, width)
    return (resized >= 0.5).astype(np.float32)


def _to_numpy_hwc(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """Tensor ``(3, H, W)`` / ``(1, H, W)`` -> numpy ``(H, W, C)``; numpy is returned unchanged."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = image.permute(1, 2, 0).numpy() if image.ndim == 3 else image.numpy()
    return np.asarray(image)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """uint8 passes through; floats are taken as [0, 1], clipped and rounded."""
    if image.dtype == np.uint8:
        return image
    return np.round(np.clip(image.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def _write(path: str | Path, image: np.ndarray) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(path.suffix or ".png", image)
    if not ok:
        raise DataError(f"cannot encode image for {path} (unsupported extension {path.suffix!r}?)")
    try:
        encoded.tofile(path)
    except OSError as err:
        raise DataError(f"cannot write {path}: {err.strerror or err}") from None


def write_image_rgb(path: str | Path, image: np.ndarray | torch.Tensor) -> None:
    """Write an RGB image: numpy ``(H, W, 3)`` / tensor ``(3, H, W)``, uint8 or float in [0, 1]."""
    array = _to_uint8(_to_numpy_hwc(image))
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise DataError(f"write_image_rgb({path}): expected (H, W, 3) or (3, H, W), got {array.shape}")
    _write(path, cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array)


def write_mask(path: str | Path, mask: np.ndarray | torch.Tensor) -> None:
    """Write a mask (``(H, W)`` or ``(1, H, W)``, values in [0, 1]) as an 8-bit PNG: 255 where >= 0.5, else 0."""
    if Path(path).suffix.lower() != ".png":
        raise DataError(f"write_mask({path}): masks are written as PNG; use a .png file name")
    array = _to_numpy_hwc(mask)
    array = array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array
    if array.ndim != 2:
        raise DataError(f"write_mask({path}): expected (H, W) or (1, H, W), got {array.shape}")
    binary = (array.astype(np.float32) >= (127.5 if array.dtype == np.uint8 else 0.5)).astype(np.uint8) * 255
    _write(path, binary)
