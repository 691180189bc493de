"""Shared test helpers: informative `assert_close`, a CUDA skip decorator and a tiny BFM2017-layout model writer."""
from __future__ import annotations

import math
from pathlib import Path
from collections.abc import Callable

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def requires_cuda(test: Callable) -> Callable:
    """Mark a test `cuda` and skip it when no CUDA device is present."""
    return pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")(pytest.mark.cuda(test))


def assert_close(actual, expected, atol: float = 1e-6, rtol: float = 1e-5, msg: str = "") -> None:
    """`torch.allclose`-style check that reports shapes, the largest difference, where it is and both values."""
    actual_t = torch.as_tensor(actual).detach().to("cpu", torch.float64)
    expected_t = torch.as_tensor(expected).detach().to("cpu", torch.float64)
    prefix = f"{msg}: " if msg else ""
    if actual_t.shape != expected_t.shape:
        raise AssertionError(f"{prefix}shape {tuple(actual_t.shape)} != expected {tuple(expected_t.shape)}")
    if actual_t.numel() == 0:
        return
    close = torch.isclose(actual_t, expected_t, rtol=rtol, atol=atol, equal_nan=False)
    if bool(close.all()):
        return
    diff = (actual_t - expected_t).abs().nan_to_num(nan=math.inf)
    where = np.unravel_index(int(diff.argmax()), tuple(actual_t.shape)) if actual_t.ndim else ()
    idx = tuple(int(i) for i in where)
    raise AssertionError(
        f"{prefix}{int((~close).sum())}/{close.numel()} elements differ (atol={atol}, rtol={rtol}); "
        f"max |diff| {float(diff.max()):.3g} at index {idx}: actual {float(actual_t[idx]):.6g}, "
        f"expected {float(expected_t[idx]):.6g}")


# ----- tiny synthetic face model in the exact BFM2017 h5 layout --------------------------------------------------

TINY_LAT_DEG = np.linspace(-70.0, 70.0, 15)  # rows, y up
TINY_LON_DEG = np.linspace(-120.0, 120.0, 25)  # columns, x right (seen from +z)
TINY_RADIUS = 100.0
TINY_COMPONENTS = {"shape": 100, "expression": 70, "color": 90}  # more than the default layout asks for


def sphere_grid(lat_deg: np.ndarray, lon_deg: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """A latitude/longitude patch of a sphere centred at the origin, facing +z.

    Returns vertices `(R * C, 3)` (index = row * C + col) and faces `(F, 3)` counter-clockwise seen from
    outside (x right, y up, viewer at +z), so the right-hand normals point away from the centre.
    """
    lat, lon = np.meshgrid(np.radians(lat_deg), np.radians(lon_deg), indexing="ij")
    verts = radius * np.stack([np.cos(lat) * np.sin(lon), np.sin(lat), np.cos(lat) * np.cos(lon)], -1)
    rows, cols = len(lat_deg), len(lon_deg)
    faces = []
    for i in range(rows - 1):
        for j in range(cols - 1):
            a, b, c, d = i * cols + j, i * cols + j + 1, (i + 1) * cols + j + 1, (i + 1) * cols + j
            faces += [(a, b, c), (a, c, d)]
    return verts.reshape(-1, 3), np.asarray(faces, dtype=np.int64)


def tiny_landmark_ids() -> np.ndarray:
    """68 distinct vertices of the tiny grid near its centre (|lat| <= 30 deg, |lon| <= 50 deg), row-major."""
    rows = np.flatnonzero(np.abs(TINY_LAT_DEG) <= 30.0)
    cols = np.flatnonzero(np.abs(TINY_LON_DEG) <= 50.0)
    ids = (rows[:, None] * len(TINY_LON_DEG) + cols[None, :]).ravel()
    return ids[:68].astype(np.int64)


def _pca(rng: np.random.Generator, n_rows: int, n_comp: int, std0: float) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal basis `(n_rows, n_comp)` and decreasing variances `(n_comp,)`."""
    basis, _ = np.linalg.qr(rng.standard_normal((n_rows, n_comp)))
    variance = (std0 * 0.97 ** np.arange(n_comp)) ** 2
    return basis.astype(np.float32), variance.astype(np.float32)


def tiny_bfm_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Key -> array of a tiny BFM2017-layout model: a sphere patch (radius 100 mm) whose sides fall outside the
    G1 crop, with 68 landmarks inside it under `metadata/landmarks/ibug68_vertex_indices`."""
    rng = np.random.default_rng(seed)
    verts, faces = sphere_grid(TINY_LAT_DEG, TINY_LON_DEG, TINY_RADIUS)
    n = len(verts)
    exp_mean = np.zeros_like(verts)
    exp_mean[:, 2] = 0.5 + 0.25 * verts[:, 1] / TINY_RADIUS  # small, smooth, non-zero
    shape_mean = verts - exp_mean  # so that shape mean + expression mean is the exact sphere
    albedo = np.clip(np.array([0.7, 0.5, 0.4]) + 0.05 * rng.standard_normal((n, 3)), 0.0, 1.0)
    arrays = {"shape/representer/points": shape_mean.T.astype(np.float32),
              "shape/representer/cells": faces.T.astype(np.int32),
              "metadata/landmarks/ibug68_vertex_indices": tiny_landmark_ids()}
    for group, mean, std0 in (("shape", shape_mean, 100.0), ("expression", exp_mean, 50.0),
                              ("color", albedo, 0.5)):
        basis, variance = _pca(rng, 3 * n, TINY_COMPONENTS[group], std0)
        arrays[f"{group}/model/mean"] = mean.reshape(-1).astype(np.float32)
        arrays[f"{group}/model/pcaBasis"] = basis
        arrays[f"{group}/model/pcaVariance"] = variance
    return arrays


def write_bfm_h5(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write `arrays` (h5 key -> array) to `path` and return it."""
    import h5py

    path = Path(path)
    with h5py.File(path, "w") as h5:
        for key, value in arrays.items():
            h5.create_dataset(key, data=value)
    return path
