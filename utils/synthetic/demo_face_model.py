# ruff: noqa: E402  (the imports follow the start-up Ctrl-C handler)
"""Procedural demo face model written in exactly the Basel Face Model 2017 h5 layout.

THIS IS A STAND-IN FOR DEMOS AND TESTS, NOT A RESEARCH FACE MODEL. The mean is a hand-built analytic head
(no scan data), the identity and albedo "PCA" bases are orthonormalised random smooth fields and the expression
basis is a few hand-made localised deformations (mouth open, smile, pucker, brows, eye closing, ...) followed by
random localised fields. It lets the pipeline run end to end without the licensed BFM2017 file; numbers obtained
with it say nothing about face reconstruction quality.

Layout (docs/method.md §4.1; N vertices, F triangles, K components):

| key | shape | dtype |
|---|---|---|
| `shape/representer/points` | (3, N) | float32, the shape mean |
| `shape/representer/cells` | (3, F) | int32, counter-clockwise seen from outside |
| `shape/model/{mean, pcaBasis, pcaVariance}` | (3N,), (3N, K_shape), (K_shape,) | float32 |
| `expression/model/{mean, pcaBasis, pcaVariance}` | (3N,), (3N, K_exp), (K_exp,) | float32 |
| `color/model/{mean, pcaBasis, pcaVariance}` | (3N,), (3N, K_col), (K_col,) | float32, RGB in [0, 1] |
| `metadata/landmarks/ibug68_vertex_indices` | (68,) | int64, full-mesh ids in iBUG order |

Flattened vectors are vertex-interleaved (x0, y0, z0, x1, ...). Bases have orthonormal columns; variances are
positive and strictly decreasing (mm^2 for shape and expression, so one standard deviation of an early
component moves the face by a few mm; colour variances give a few percent up to ~0.1 of colour change).

Geometry: millimetres, BFM2017 frame (x to the subject's left = image right, y up, z toward the viewer, origin
near the head centre; face surface at z ~ 80-128). The mesh is a regular (rows = height, columns = azimuth)
grid wrapped around the head, symmetric in x, with forehead, neck and head sides that the G1 analytic crop
(docs/method.md §4.3) removes while it keeps the whole face and all 68 landmarks. `shape mean + expression mean` is the
designed head; the landmark vertices are chosen on it.

CLI: `python -m utils.synthetic.demo_face_model --out basel_3DMM/demo_face_model.h5 [--target_vertices N] [--seed S]`.
"""
from __future__ import annotations

if __name__ == "__main__":  # Ctrl-C while torch is imported: one line, no traceback (utils/startup.py)
    from utils.startup import quiet_interrupts
    quiet_interrupts()

import argparse
import os
from pathlib import Path

import numpy as np
import torch
from scipy.interpolate import CubicSpline

from models import shading
from models.face_model import analytic_crop_mask
from utils.atomic_write import temp_name
from utils.cli import check_seed, cli_main, repo_path
from utils.errors import MofaError

DEFAULT_OUT = repo_path("basel_3DMM/demo_face_model.h5")
DEFAULT_TARGET_VERTICES = 5000
BFM_SIZE_VERTICES = 53000
VERTEX_RANGE = (500, 250_000)
BFM_COMPONENTS = {"shape": 199, "expression": 100, "color": 199}
LOADER_COMPONENTS = {"shape": 80, "expression": 64, "color": 80}
LANDMARK_KEY = "metadata/landmarks/ibug68_vertex_indices"

AXIS_Z = 15.0  # z of the vertical axis the grid azimuth is measured around (mm)
THETA_MAX = np.deg2rad(112.0)  # azimuth range of the mesh: [-THETA_MAX, THETA_MAX]
Y_RANGE = (-118.0, 118.0)  # height range of the mesh (mm)
EYE_X, EYE_Y, EYE_HALF_WIDTH, LID_UP, LID_LOW = 31.0, 32.0, 14.0, 4.8, 3.6
MOUTH_Y, MOUTH_HALF_WIDTH, LIP_UP, LIP_LOW, LIP_SEAM = -37.0, 25.0, 7.0, 8.5, 0.5
BROW_Y, BROW_X = 46.0, (13.0, 54.0)

# Head body: per height y, a horizontal ellipse of half-width a, front z = F and centre z = ze (depth c = F - ze).
_HEAD = np.array([  # y, a, F, ze
    [-92, 0.5, 46, 44], [-88, 5, 62, 52], [-84, 11, 76, 58], [-80, 17, 88, 62], [-76, 23, 96, 62],
    [-72, 29, 101, 58], [-66, 38, 103, 52],
    [-58, 49, 103, 42], [-45, 60, 102, 26], [-30, 67, 101, 16], [-10, 72, 100, 15], [15, 73, 100, 15],
    [40, 72, 101, 15], [60, 71, 99, 15], [80, 69, 92, 15], [100, 64, 80, 15], [122, 54, 60, 15]], dtype=float)
_NECK = (56.0, 50.0, -5.0)  # half-width, depth, centre z of the neck ellipse (below the head)
# Nose ridge: height above the face (mm) and Gaussian half-width in x, per y.
_NOSE = np.array([  # y, amplitude, sigma_x
    [-30, 0, 8], [-22, 0, 8], [-16, 3, 9], [-13, 9, 9], [-8, 20, 9], [-3, 24, 8], [0, 24, 7], [5, 19, 6],
    [15, 11, 6], [25, 5, 6.5], [30, 3, 7], [36, 0, 8], [44, 0, 8]], dtype=float)


class DemoFaceModelError(MofaError, ValueError):
    """Bad arguments for the demo face model (vertex count, component counts) or an unwritable output path."""


def _gauss(x: np.ndarray, y: np.ndarray, cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
    """Anisotropic Gaussian bump, 1 at (cx, cy). Bilateral features pass |x| and cx > 0."""
    return np.exp(-0.5 * ((x - cx) / sx) ** 2 - 0.5 * ((y - cy) / sy) ** 2)


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * t))


def _ellipse_ray(theta: np.ndarray, a: np.ndarray, c: np.ndarray, ze: np.ndarray) -> np.ndarray:
    """Distance from the axis (0, AXIS_Z) along azimuth theta to the far side of the ellipse (-inf if missed)."""
    s, k, d = np.sin(theta), np.cos(theta), AXIS_Z - ze
    qa = (s / a) ** 2 + (k / c) ** 2
    qb = 2.0 * k * d / c**2
    qc = (d / c) ** 2 - 1.0
    disc = qb**2 - 4.0 * qa * qc
    with np.errstate(invalid="ignore"):
        t = (-qb + np.sqrt(disc)) / (2.0 * qa)
    return np.where((disc >= 0) & (t > 0), t, -np.inf)


def _natural_spline(table: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Natural cubic spline (C2: no shading creases) through the rows of `table (M, 1 + C)` = (knot, values...),
    evaluated at `t` clipped to the knot range (`scipy.interpolate.CubicSpline`). Returns `t.shape + (C,)`."""
    knots = table[:, 0]
    spline = CubicSpline(knots, table[:, 1:], axis=0, bc_type="natural")
    return spline(np.clip(t, knots[0], knots[-1]))


def _body_radius(theta: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Radius (mm) of the smooth union of the head and the neck around the axis, at azimuth theta and height y."""
    a, front, ze = np.moveaxis(_natural_spline(_HEAD, y), -1, 0)
    head = np.where(y >= _HEAD[0, 0], _ellipse_ray(theta, a, front - ze, ze), -np.inf)
    neck_a, neck_c, neck_z = _NECK
    neck = _ellipse_ray(theta, np.full_like(y, neck_a), np.full_like(y, neck_c), np.full_like(y, neck_z))
    neck = neck - 80.0 * _sigmoid((y + 5.0) / 3.0)  # the neck only exists below the head
    return 3.0 * np.logaddexp(head / 3.0, neck / 3.0)


def upper_lip_top(x: np.ndarray) -> np.ndarray:
    """y (mm) of the upper vermilion border (with the cupid's bow dip) at x, for |x| <= MOUTH_HALF_WIDTH."""
    u = np.clip(np.abs(x) / MOUTH_HALF_WIDTH, 0.0, 1.0)
    return MOUTH_Y + LIP_UP * (1.0 - u**2) - 1.5 * np.exp(-0.5 * (x / 3.5) ** 2)


def lower_lip_bottom(x: np.ndarray) -> np.ndarray:
    """y (mm) of the lower vermilion border at x."""
    u = np.clip(np.abs(x) / MOUTH_HALF_WIDTH, 0.0, 1.0)
    return MOUTH_Y - LIP_LOW * (1.0 - u**2)


def eye_lids(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """y (mm) of the upper and lower lid margins at x (either eye; almond shape, corners at EYE_Y)."""
    u = np.clip((np.abs(x) - EYE_X) / EYE_HALF_WIDTH, -1.0, 1.0)
    bulge = 1.0 - u**2
    return EYE_Y + LID_UP * bulge * (1.0 - 0.15 * u), EYE_Y - LID_LOW * bulge


def brow_line(x: np.ndarray) -> np.ndarray:
    """y (mm) of the eyebrow centre line at x (arched, highest at |x| ~ 30)."""
    u = (np.abs(x) - 31.0) / 24.0
    return BROW_Y + 4.0 * (1.0 - u**2) - 2.0 * u


def _eye_opening(x: np.ndarray, y: np.ndarray, soft: float = 0.6) -> np.ndarray:
    """Soft indicator (0..1) of the visible eyeball between the lids."""
    top, bottom = eye_lids(x)
    inside_x = _sigmoid((EYE_HALF_WIDTH - np.abs(np.abs(x) - EYE_X)) / soft)
    return inside_x * _sigmoid((top - y) / soft) * _sigmoid((y - bottom) / soft)


def _feature_relief(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Forward (z) relief in mm added to the head body: brows, eyes, nose, cheeks, lips, chin."""
    ax = np.abs(x)
    mouth_window = _sigmoid((MOUTH_HALF_WIDTH - 1.0 - ax) / 1.5)
    nose_amp, nose_sx = np.moveaxis(_natural_spline(_NOSE, y), -1, 0)
    return (5.0 * _gauss(ax, y, 28, 45, 18, 6) + 2.0 * _gauss(ax, y, 0, 42, 10, 6)  # brow ridge, glabella
            - 10.0 * _gauss(ax, y, EYE_X, 33, 13, 10) + 7.5 * _gauss(ax, y, EYE_X, EYE_Y, 10, 7)  # socket, eyeball
            - 1.2 * _eye_opening(x, y)
            + 5.0 * _gauss(ax, y, 44, 8, 14, 12) + 3.0 * _gauss(ax, y, 35, -15, 14, 14)  # cheekbones, cheeks
            - 3.0 * _gauss(ax, y, 62, 45, 9, 12)  # temples
            + nose_amp * np.exp(-0.5 * (x / nose_sx) ** 2) + 3.0 * _gauss(ax, y, 0, -2, 5, 4)  # ridge, tip
            + 7.0 * _gauss(ax, y, 13, -9, 5, 5) - 2.0 * _gauss(ax, y, 6, -12, 3, 2)  # alae, nostrils
            + 7.0 * _gauss(ax, y, 0, -35, 26, 16) - 1.0 * _gauss(ax, y, 0, -23, 3, 4)  # muzzle, philtrum
            + 4.0 * _gauss(ax, y, 0, -33.5, 15, 3.5) + 4.5 * _gauss(ax, y, 0, -41.5, 13, 4.5)  # lips
            - 4.0 * np.exp(-0.5 * ((y - MOUTH_Y) / 1.0) ** 2) * mouth_window  # mouth line
            - 3.0 * _gauss(ax, y, 0, -53, 14, 4) + 5.0 * _gauss(ax, y, 0, -65, 13, 7))  # labiomental fold, chin


def _front_weight(theta: np.ndarray) -> np.ndarray:
    """1 on the face side (|theta| < 75 deg), smoothly 0 beyond 100 deg: the relief stays off the head's back."""
    t = np.clip((np.abs(theta) - np.deg2rad(75.0)) / np.deg2rad(25.0), 0.0, 1.0)
    return 1.0 - t * t * (3.0 - 2.0 * t)


def surface_points(theta: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Designed head surface (shape mean + expression mean) at azimuth `theta` (rad) and height `y` (mm).

    Args:
        theta, y: broadcastable arrays; theta = 0 faces +z, theta > 0 toward +x (the subject's left).
    Returns:
        `(..., 3)` points, millimetres, BFM2017 model frame.
    """
    theta, y = np.broadcast_arrays(np.asarray(theta, float), np.asarray(y, float))
    r = _body_radius(theta, y)
    x = r * np.sin(theta)
    z = AXIS_Z + r * np.cos(theta) + _front_weight(theta) * _feature_relief(x, y)
    return np.stack([x, y, z], axis=-1)


def _inverse_cdf(samples: np.ndarray, increments: np.ndarray, n: int) -> np.ndarray:
    """`n` positions in [samples[0], samples[-1]] equally spaced in `cumsum(increments)` (weighted arc length)."""
    cdf = np.cumsum(increments)
    return np.interp(np.linspace(0.0, cdf[-1], n), cdf, samples)


def _face_density(t: np.ndarray, low: float, high: float, soft: float) -> np.ndarray:
    """Sampling density: 2.5 inside [low, high] (the face), 1 outside, smooth steps of width `soft`."""
    return 1.0 + 1.5 * _sigmoid((t - low) / soft) * _sigmoid((high - t) / soft)


def _axis_lengths() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fine samples of the row (height) and half-column (azimuth) axes, with the weighted arc length between
    consecutive samples (0 for the first)."""
    ys = np.linspace(*Y_RANGE, 2401)
    profile = surface_points(np.zeros_like(ys), ys)  # (2401, 3) midline profile
    step_y = np.linalg.norm(np.diff(profile[:, 1:], axis=0), axis=1)
    features = 1.0 + 0.6 * (_sigmoid((ys - 24.0) / 1.5) * _sigmoid((40.0 - ys) / 1.5)  # eyes
                            + _sigmoid((ys + 49.0) / 1.5) * _sigmoid((-27.0 - ys) / 1.5))  # lips
    density_y = np.concatenate([[0.0], step_y]) * _face_density(ys, -82.0, 62.0, 4.0) * features
    thetas = np.linspace(0.0, THETA_MAX, 1201)
    ring = surface_points(thetas, np.full_like(thetas, 10.0))  # (1201, 3) horizontal section at eye/nose level
    step_t = np.linalg.norm(np.diff(ring[:, [0, 2]], axis=0), axis=1)
    density_t = np.concatenate([[0.0], step_t]) * _face_density(thetas, -1.0, np.deg2rad(68.0), 0.08)
    return ys, density_y, thetas, density_t


def grid_axes(target_vertices: int) -> tuple[np.ndarray, np.ndarray]:
    """Row heights `(R,)` (ascending mm) and column azimuths `(C,)` (ascending rad, symmetric, C odd).

    Rows and columns are spaced evenly in weighted arc length: 2.5 times as densely over the face as on the
    neck, scalp and sides, and denser again across the eyes and lips; R * C is close to `target_vertices`.
    Two rows sit LIP_SEAM mm above and below the mouth line, so the lips can part.
    """
    ys, density_y, thetas, density_t = _axis_lengths()
    length_y, half_length_t = density_y.sum(), density_t.sum()
    spacing = np.sqrt(length_y * 2.0 * half_length_t / target_vertices)
    n_half = max(int(round(half_length_t / spacing)), 3)
    n_rows = max(int(round(target_vertices / (2 * n_half + 1))), 8)
    half = _inverse_cdf(thetas, density_t, n_half + 1)
    columns = np.concatenate([-half[:0:-1], half])
    rows = _inverse_cdf(ys, density_y, n_rows)
    local = np.interp(MOUTH_Y, rows, np.gradient(rows))
    rows = np.sort(np.concatenate([rows[np.abs(rows - MOUTH_Y) > LIP_SEAM + 0.5 * local],
                                   [MOUTH_Y - LIP_SEAM, MOUTH_Y + LIP_SEAM]]))
    return rows, columns


def grid_faces(n_rows: int, n_cols: int) -> np.ndarray:
    """Triangles `(F, 3)` int64 of a row-major `n_rows x n_cols` grid (vertex id = row * n_cols + col).

    Rows go up (+y) and columns toward +x on the face, so these triangles are counter-clockwise seen from
    outside. Quads are split along mirrored diagonals on the two halves, keeping the mesh symmetric in x.
    """
    r, c = np.meshgrid(np.arange(n_rows - 1), np.arange(n_cols - 1), indexing="ij")
    v00 = (r * n_cols + c).ravel()
    v01, v10 = v00 + 1, v00 + n_cols
    v11 = v10 + 1
    left = (c < (n_cols - 1) // 2).ravel()[:, None]
    first = np.where(left, np.stack([v00, v01, v11], 1), np.stack([v00, v01, v10], 1))
    second = np.where(left, np.stack([v00, v11, v10], 1), np.stack([v01, v11, v10], 1))
    return np.concatenate([first, second]).astype(np.int64)


def vertex_normals(points: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit normals `(N, 3)` float64 of a mesh `points (N, 3)`, `faces (F, 3)` (outward for CCW
    faces): the renderer's `models.shading.vertex_normals`, in float64."""
    normals = shading.vertex_normals(torch.from_numpy(np.asarray(points, dtype=np.float64))[None],
                                     torch.from_numpy(np.asarray(faces, dtype=np.int64)))
    return normals[0].numpy()


# iBUG-68 mirror partner of every landmark (subject's right <-> left; midline points map to themselves).
IBUG_MIRROR = np.array(
    [16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0,  # jaw
     26, 25, 24, 23, 22, 21, 20, 19, 18, 17,  # brows
     27, 28, 29, 30, 35, 34, 33, 32, 31,  # nose bridge, nostrils
     45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40,  # eyes
     54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55,  # outer mouth
     64, 63, 62, 61, 60, 67, 66, 65], dtype=np.int64)  # inner mouth


def _landmark_targets() -> dict[int, tuple[float, float]]:
    """Model-frame (x, y) mm of the iBUG landmarks on the subject's right side (x < 0) and on the midline.

    The subject's right is at negative model x, i.e. on the LEFT of the image: landmark 36 (outer corner of
    the right eye) has x < 0 and landmark 45 (its mirror) x > 0.
    """
    jaw = [(-71, 22), (-70.5, 5), (-68, -12), (-64, -29), (-57, -45), (-47, -57), (-33, -66), (-17, -72), (0, -75)]
    targets = {i: xy for i, xy in enumerate(jaw)}
    for i, x in zip(range(17, 22), (-52.0, -43.0, -33.0, -23.0, -14.0)):
        targets[i] = (x, float(brow_line(np.array(x))))
    targets.update({27: (0, 31), 28: (0, 20), 29: (0, 9), 30: (0, -1), 31: (-12, -11), 32: (-6, -13), 33: (0, -14)})
    corner_out, corner_in = -(EYE_X + EYE_HALF_WIDTH), -(EYE_X - EYE_HALF_WIDTH)
    lid_out, lid_in = -(EYE_X + 0.35 * EYE_HALF_WIDTH), -(EYE_X - 0.35 * EYE_HALF_WIDTH)
    top, bottom = eye_lids(np.array([lid_out, lid_in]))
    targets.update({36: (corner_out, EYE_Y), 37: (lid_out, top[0]), 38: (lid_in, top[1]), 39: (corner_in, EYE_Y),
                    40: (lid_in, bottom[1]), 41: (lid_out, bottom[0])})
    lip_x = np.array([-15.0, -6.5, 0.0])
    upper, lower = upper_lip_top(lip_x), lower_lip_bottom(lip_x)
    targets.update({48: (-MOUTH_HALF_WIDTH, MOUTH_Y), 49: (lip_x[0], upper[0]), 50: (lip_x[1], upper[1]),
                    51: (0, upper[2]), 57: (0, lower[2]), 58: (lip_x[1], lower[1]), 59: (lip_x[0], lower[0])})
    seam_up, seam_low = MOUTH_Y + LIP_SEAM, MOUTH_Y - LIP_SEAM
    targets.update({60: (-MOUTH_HALF_WIDTH + 4, seam_up), 61: (-9, seam_up), 62: (0, seam_up),
                    66: (0, seam_low), 67: (-9, seam_low)})
    return {i: (float(x), float(y)) for i, (x, y) in targets.items()}


def select_landmarks(points: np.ndarray, faces: np.ndarray, n_rows: int, n_cols: int) -> np.ndarray:
    """Vertex ids `(68,)` int64 of the iBUG landmarks on the grid mesh `points (n_rows * n_cols, 3)`.

    Each right-side / midline landmark is the front-facing vertex nearest in (x, y) to its target among those
    well inside the G1 crop (midline ones on the middle column); left-side ones are the mirrored vertices.
    """
    mid = (n_cols - 1) // 2
    cols = np.arange(points.shape[0]) % n_cols
    usable = analytic_crop_mask(points, scale=0.92, c4_min=26.0) & (vertex_normals(points, faces)[:, 2] > 0.2)
    landmarks = np.full(68, -1, dtype=np.int64)
    for i, (x, y) in _landmark_targets().items():
        allowed = usable & ((cols == mid) if x == 0 else (cols <= mid))
        candidates = np.flatnonzero(allowed)
        dist = (points[candidates, 0] - x) ** 2 + (points[candidates, 1] - y) ** 2
        landmarks[i] = candidates[np.argmin(dist)]
    for i in np.flatnonzero(landmarks < 0):
        partner = landmarks[IBUG_MIRROR[i]]
        landmarks[i] = partner - cols[partner] + (n_cols - 1 - cols[partner])
    return landmarks


def _lip_region(x: np.ndarray, y: np.ndarray, soft: float = 0.7) -> np.ndarray:
    """Soft indicator (0..1) of the lips (vermilion) between the upper and lower borders."""
    inside_x = _sigmoid((MOUTH_HALF_WIDTH - np.abs(x)) / soft)
    return inside_x * _sigmoid((upper_lip_top(x) - y) / soft) * _sigmoid((y - lower_lip_bottom(x)) / soft)


def _brow_region(x: np.ndarray, y: np.ndarray, soft: float = 0.8) -> np.ndarray:
    """Soft indicator (0..1) of the eyebrows: a band about 5 mm thick along `brow_line`, thinner at the tail."""
    ax = np.abs(x)
    half = 2.8 - 1.2 * np.clip((ax - 20.0) / 34.0, 0.0, 1.0)
    inside_x = _sigmoid((ax - BROW_X[0]) / soft) * _sigmoid((BROW_X[1] - ax) / soft)
    return inside_x * _sigmoid((half - np.abs(y - brow_line(x))) / soft)


def _blend(color: np.ndarray, weight: np.ndarray, rgb: tuple[float, float, float]) -> np.ndarray:
    return color * (1.0 - weight[:, None]) + weight[:, None] * np.asarray(rgb)[None, :]


def albedo_mean(points: np.ndarray) -> np.ndarray:
    """Per-vertex RGB albedo `(N, 3)` in [0, 1] for `points (N, 3)`: skin with reddish cheeks and lips, dark
    brows and nostrils, eyes with white sclera, brown iris, black pupil and dark lash lines."""
    x, y = points[:, 0], points[:, 1]
    ax = np.abs(x)
    color = np.tile(np.array([[0.75, 0.55, 0.45]]), (len(points), 1))
    color += (_gauss(ax, y, 40, -8, 14, 12) * 0.04)[:, None] * np.array([1.0, -0.5, -0.3])
    color = _blend(color, _lip_region(x, y), (0.70, 0.36, 0.36))
    color = _blend(color, 0.85 * _brow_region(x, y), (0.28, 0.19, 0.14))
    color = _blend(color, 0.8 * _gauss(ax, y, 6, -12.5, 2.5, 1.5), (0.30, 0.18, 0.16))
    top, bottom = eye_lids(x)
    lash = _sigmoid((EYE_HALF_WIDTH + 1.0 - np.abs(ax - EYE_X)) / 0.5) * np.exp(-0.5 * ((y - top - 0.6) / 0.8) ** 2)
    color = _blend(color, 0.9 * lash, (0.10, 0.08, 0.07))
    opening = _eye_opening(x, y)
    color = _blend(color, opening, (0.88, 0.85, 0.82))
    iris_r = np.hypot(ax - EYE_X, y - EYE_Y - 0.3)
    color = _blend(color, opening * _sigmoid((5.6 - iris_r) / 0.4), (0.33, 0.22, 0.14))
    color = _blend(color, opening * _sigmoid((2.2 - iris_r) / 0.3), (0.04, 0.03, 0.03))
    return np.clip(color, 0.0, 1.0)


def _stack(*fields: np.ndarray) -> np.ndarray:
    """Per-vertex vector fields, each `(N, 3)`, as columns of a `(3N, K)` vertex-interleaved matrix."""
    return np.stack([f.reshape(-1) for f in fields], axis=1)


def _vec(weight: np.ndarray, *components: np.ndarray | float) -> np.ndarray:
    """`(N, 3)` field weight * (cx, cy, cz) where each component is a scalar or an `(N,)` array."""
    return weight[:, None] * np.stack([np.broadcast_to(c, weight.shape) for c in components], axis=1)


def _shape_semantic(points: np.ndarray) -> np.ndarray:
    """Hand-made identity directions `(3N, 12)`: face width, length, depth, nose, jaw, chin, eye spacing, ..."""
    x, y, z = points.T
    ax, sx, one = np.abs(x), np.sign(x), np.ones(len(points))
    return _stack(_vec(one, x / 70.0, 0.0, 0.0), _vec(one, 0.0, y / 70.0, 0.0),
                  _vec(one, 0.0, 0.0, (z - AXIS_Z) / 85.0), _vec(_gauss(ax, y, 0, 5, 10, 16), 0.0, 0.0, 1.0),
                  _vec(_gauss(ax, y, 50, -50, 22, 20), sx, 0.0, 0.0),
                  _vec(_gauss(ax, y, 0, -68, 18, 10), 0.0, -0.6, 0.8),
                  _vec(_gauss(ax, y, EYE_X, EYE_Y, 12, 9), sx, 0.0, 0.0),
                  _vec(_gauss(ax, y, 25, 45, 25, 8), 0.0, 0.0, 1.0),
                  _vec(_gauss(ax, y, 45, 10, 15, 12), 0.5 * sx, 0.0, 1.0),
                  _vec(_gauss(ax, y, 0, 80, 60, 20), 0.0, 0.0, 1.0),
                  _vec(_gauss(ax, y, 0, -37, 18, 8), 0.0, 0.0, 1.0),
                  _vec(_gauss(ax, y, 12, -8, 8, 8), sx, 0.0, 0.0))


def _expression_semantic(points: np.ndarray) -> np.ndarray:
    """Hand-made localised expressions `(3N, 12)`: mouth open, smile, pucker, brows raise, jaw sideways,
    eyes close, frown, cheek puff, mouth stretch, one-sided smile, right-eye wink, nose wrinkle."""
    x, y, z = points.T
    ax, sx = np.abs(x), np.sign(x)
    front = _sigmoid((z - 40.0) / 8.0)
    seam_softness = 0.2 + 8.0 * np.clip((ax - MOUTH_HALF_WIDTH + 3.0) / 12.0, 0.0, 1.0)  # sharp between the lips
    below = _sigmoid((MOUTH_Y - y) / seam_softness)
    jaw = below * _gauss(ax, y, 0, -58, 45, 28) * front
    upper_lip = (1.0 - below) * _gauss(ax, y, 0, -34, 18, 5)
    corners = _gauss(ax, y, MOUTH_HALF_WIDTH, MOUTH_Y + 1, 9, 8)
    upper_lids = _gauss(ax, y, EYE_X, EYE_Y + 2, 12, 4) * _sigmoid((y - EYE_Y + 0.5) / 0.8)
    return _stack(_vec(jaw, 0.0, -1.0, -0.35) + _vec(upper_lip, 0.0, 0.25, 0.0),
                  _vec(corners, 0.5 * sx, 0.8, -0.3) + _vec(_gauss(ax, y, 35, -10, 12, 12), 0.0, 0.3, 0.2),
                  _vec(_gauss(ax, y, 0, MOUTH_Y, 17, 8), -x / 17.0, 0.0, 1.0),
                  _vec(_gauss(ax, y, 30, 47, 20, 7), 0.0, 1.0, 0.1) + _vec(_gauss(ax, y, 0, 65, 40, 15), 0, 0.3, 0),
                  _vec(jaw, 1.0, 0.0, 0.0),
                  _vec(upper_lids, 0.0, -1.0, 0.1),
                  _vec(_gauss(ax, y, 18, 45, 10, 6), -0.5 * sx, -0.6, 0.1),
                  _vec(_gauss(ax, y, 40, -25, 14, 14), 0.3 * sx, 0.0, 1.0),
                  _vec(corners, sx, 0.0, 0.0),
                  _vec(corners * (x > 0), 0.5, 0.8, -0.3),
                  _vec(upper_lids * (x < 0), 0.0, -1.0, 0.1),
                  _vec(_gauss(ax, y, 8, 5, 8, 8), 0.0, 0.7, 0.2))


def _color_semantic(points: np.ndarray) -> np.ndarray:
    """Hand-made albedo directions `(3N, 7)`: brightness, redness, tan, lip colour, brow darkness, blush, iris."""
    x, y = points[:, 0], points[:, 1]
    one = np.ones(len(points))
    iris = _eye_opening(x, y) * _sigmoid((5.6 - np.hypot(np.abs(x) - EYE_X, y - EYE_Y)) / 0.4)
    return _stack(_vec(one, 1.0, 1.0, 1.0), _vec(one, 1.0, -0.4, -0.4), _vec(one, 0.6, 0.3, -0.5),
                  _vec(_lip_region(x, y), 1.0, -0.5, -0.3), _vec(_brow_region(x, y), 1.0, 1.0, 1.0),
                  _vec(_gauss(np.abs(x), y, 40, -8, 14, 12), 1.0, -0.3, -0.2), _vec(iris, 0.4, 0.7, 1.0))


def _random_fields(points: np.ndarray, centres: np.ndarray, sigmas: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Smooth random fields `(3N, K)`: field k = sum_j exp(-|p - centres[k, j]|^2 / (2 sigma_k^2)) vectors[k, j].

    Args:
        points: `(N, 3)` mm. centres: `(K, J, 3)` mm. sigmas: `(K,)` mm. vectors: `(K, J, 3)`.
    """
    columns = np.empty((points.size, len(sigmas)))
    squared = (points**2).sum(axis=1)[:, None]  # (N, 1)
    for k, (sigma, cs, vs) in enumerate(zip(sigmas, centres, vectors)):
        d2 = squared - 2.0 * points @ cs.T + (cs**2).sum(axis=1)[None, :]  # (N, J)
        columns[:, k] = (np.exp(-0.5 * np.maximum(d2, 0.0) / sigma**2) @ vs).reshape(-1)
    return columns


# Expression hot spots (x, y) mm where the random localised expression fields are centred (mirrored at random).
_EXPRESSION_SPOTS = np.array([[0, MOUTH_Y], [MOUTH_HALF_WIDTH, MOUTH_Y], [12, -30], [12, -44], [0, -60],
                              [EYE_X, EYE_Y + 3], [EYE_X, EYE_Y - 4], [30, BROW_Y], [15, BROW_Y], [38, -18],
                              [12, -5], [0, 65]], dtype=float)


def _nearest_surface(points: np.ndarray, xy: np.ndarray, face: np.ndarray) -> np.ndarray:
    """`(M, 3)` face vertices (of the `face` mask) nearest in (x, y) to each row of `xy (M, 2)`."""
    ids = np.flatnonzero(face)
    d2 = ((points[ids, None, :2] - xy[None, :, :]) ** 2).sum(-1)  # (n_face, M)
    return points[ids[np.argmin(d2, axis=0)]]


def _identity_random(points: np.ndarray, face: np.ndarray, n: int, rng: np.random.Generator,
                     depth_weight: float) -> np.ndarray:
    """`(3N, n)` smooth random fields, 3 Gaussian blobs each, centred on face vertices; low frequencies first."""
    k = np.arange(n)
    sigmas = np.maximum(8.0, 50.0 * (k + 1.0) ** -0.3)
    centres = points[rng.choice(np.flatnonzero(face), size=(n, 3))]
    vectors = rng.normal(size=(n, 3, 3)) * np.array([1.0, 1.0, depth_weight])
    return _random_fields(points, centres, sigmas, vectors)


def _expression_random(points: np.ndarray, face: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`(3N, n)` random localised deformations (one blob each, sigma 5-12 mm) around mouth, eyes, brows, cheeks."""
    spots = _EXPRESSION_SPOTS[rng.integers(0, len(_EXPRESSION_SPOTS), size=n)]
    spots = spots * np.stack([rng.choice([-1.0, 1.0], size=n), np.ones(n)], 1) + rng.normal(scale=2.0, size=(n, 2))
    centres = _nearest_surface(points, spots, face)[:, None, :]
    return _random_fields(points, centres, rng.uniform(5.0, 12.0, size=n), rng.normal(size=(n, 1, 3)))


def _color_random(points: np.ndarray, face: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`(3N, n)` smooth random albedo fields with colour directions biased toward luminance."""
    vectors = rng.normal(scale=0.5, size=(n, 3, 3)) + rng.normal(size=(n, 3, 1))
    k = np.arange(n)
    centres = points[rng.choice(np.flatnonzero(face), size=(n, 3))]
    return _random_fields(points, centres, np.maximum(8.0, 60.0 * (k + 1.0) ** -0.35), vectors)


def orthonormal_columns(fields: np.ndarray) -> np.ndarray:
    """Orthonormalise the columns of `fields (3N, K)` in order (Gram-Schmidt semantics: column k spans the same
    space as columns 0..k), keeping each column's direction sign.

    Cholesky-QR (a float64 Gram matrix, then one float32 product: much faster than Householder QR on these
    tall matrices) is orthonormal to ~1e-6, the float32 storage precision, while cond(fields) stays small
    (~1e2 for the smooth fields here); Householder QR is used above cond 1e4. Returns float32 `(3N, K)`.
    """
    try:
        r = np.linalg.cholesky(fields.T @ fields).T  # (K, K) upper triangular, positive diagonal
        well_conditioned = np.linalg.cond(r) < 1e4
    except np.linalg.LinAlgError:
        well_conditioned = False
    if well_conditioned:
        return fields.astype(np.float32) @ np.linalg.inv(r).astype(np.float32)
    q, r = np.linalg.qr(fields)
    return (q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]).astype(np.float32)


def pca_variances(basis: np.ndarray, face: np.ndarray, first: float, decay: float) -> tuple[np.ndarray, np.ndarray]:
    """Variances for the orthonormal `basis (3N, K)` and the column order that makes them decreasing.

    Column k is given the variance at which one standard deviation moves its most affected face vertex
    (`face (N,)` bool) by `first * (k + 1) ** -decay` (mm, or colour units). Columns are then sorted by
    variance, as in a PCA, and exact ties are broken so the variances are strictly decreasing.
    Returns `(order (K,) int, variance (K,) float64)`: use `basis[:, order]` with `variance`.
    """
    squared = (basis.reshape(-1, 3, basis.shape[1]) ** 2).sum(axis=1)  # (N, K) squared per-vertex norms
    target = first * (np.arange(basis.shape[1]) + 1.0) ** -decay
    variance = target**2 / squared[face].max(axis=0).astype(np.float64)
    order = np.argsort(-variance, kind="stable")
    variance = variance[order]
    for k in range(1, len(variance)):
        variance[k] = min(variance[k], 0.9999 * variance[k - 1])
    return order, variance


def _check_arguments(target_vertices: int, components: dict[str, int]) -> None:
    low, high = VERTEX_RANGE
    if not low <= target_vertices <= high:
        raise DemoFaceModelError(f"--target_vertices {target_vertices} is out of range: use {low}..{high} "
                                 f"(default {DEFAULT_TARGET_VERTICES}, about {BFM_SIZE_VERTICES} for a BFM-sized mesh)")
    for name, count in components.items():
        if count < LOADER_COMPONENTS[name]:
            raise DemoFaceModelError(f"{name} component count {count} is below the {LOADER_COMPONENTS[name]} the "
                                     f"face model loader keeps; use at least that many (BFM2017 has "
                                     f"{BFM_COMPONENTS[name]})")


def _pca_model(mean: np.ndarray, fields: np.ndarray, face: np.ndarray, first: float,
               decay: float) -> dict[str, np.ndarray]:
    """`{mean, pcaBasis, pcaVariance}` float32 from a mean `(N, 3)` and the fields `(3N, K)` spanning the basis."""
    basis = orthonormal_columns(fields)
    order, variance = pca_variances(basis, face, first, decay)
    return {"mean": mean.reshape(-1).astype(np.float32), "pcaBasis": basis[:, order],
            "pcaVariance": variance.astype(np.float32)}


def build_demo_face_model(target_vertices: int = DEFAULT_TARGET_VERTICES, seed: int = 0, n_shape: int = 199,
                          n_exp: int = 100, n_color: int = 199) -> dict[str, np.ndarray]:
    """All arrays of the demo model, keyed by their h5 path (see the module docstring for shapes and dtypes).

    The mean geometry, mesh and landmarks depend only on `target_vertices`; the bases also on `seed`.
    Identical arguments give byte-identical arrays.
    """
    _check_arguments(target_vertices, {"shape": n_shape, "expression": n_exp, "color": n_color})
    rows, cols = grid_axes(target_vertices)
    designed = surface_points(cols[None, :], rows[:, None]).reshape(-1, 3)  # (N, 3) shape mean + exp mean
    faces = grid_faces(len(rows), len(cols))
    landmarks = select_landmarks(designed, faces, len(rows), len(cols))
    face = analytic_crop_mask(designed)
    rng = np.random.default_rng(seed)
    expression = _expression_semantic(designed)
    smile = expression[:, 1].reshape(-1, 3)
    exp_mean = 0.8 * smile / np.linalg.norm(smile, axis=1).max()  # a faint smile, < 1 mm
    shape_semantic, color_semantic = _shape_semantic(designed), _color_semantic(designed)
    shape_fields = np.concatenate([shape_semantic, _identity_random(
        designed, face, n_shape - shape_semantic.shape[1], rng, depth_weight=1.5)], axis=1)
    exp_fields = np.concatenate([expression, _expression_random(designed, face, n_exp - expression.shape[1], rng)],
                                axis=1)
    color_fields = np.concatenate([color_semantic, _color_random(
        designed, face, n_color - color_semantic.shape[1], rng)], axis=1)
    models = {"shape": _pca_model(designed - exp_mean, shape_fields, face, 6.0, 0.7),
              "expression": _pca_model(exp_mean, exp_fields, face, 6.0, 0.5),
              "color": _pca_model(albedo_mean(designed), color_fields, face, 0.1, 0.6)}
    arrays = {f"{group}/model/{key}": value for group, model in models.items() for key, value in model.items()}
    arrays["shape/representer/points"] = models["shape"]["mean"].reshape(-1, 3).T.copy()
    arrays["shape/representer/cells"] = faces.T.astype(np.int32)
    arrays[LANDMARK_KEY] = landmarks
    return arrays


def write_demo_face_model(path: str | Path = DEFAULT_OUT, target_vertices: int = DEFAULT_TARGET_VERTICES,
                          seed: int = 0, n_shape: int = 199, n_exp: int = 100, n_color: int = 199,
                          overwrite: bool = False) -> Path:
    """Write the demo face model (BFM2017 h5 layout) to `path`, creating parent folders; returns the path.

    An existing file is refused unless `overwrite` (it may be the licensed BFM2017, which the README puts under
    basel_3DMM/). The file is written to a temporary name beside `path` and moved over it when complete
    (`utils.atomic_write.temp_name`), so a failed or interrupted write leaves the old file as it was.
    Raises `DemoFaceModelError` for out-of-range arguments, an existing file or when `path` cannot be written.
    """
    import h5py

    path = Path(path)
    check_seed(seed)
    if path.is_dir():
        raise DemoFaceModelError(f"--out {path} is a folder; pass a file name such as {path / DEFAULT_OUT.name}")
    if path.exists() and not overwrite:
        raise DemoFaceModelError(f"--out {path} exists; pass --overwrite to replace it, or another --out")
    arrays = build_demo_face_model(target_vertices, seed, n_shape, n_exp, n_color)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(path)
        with h5py.File(tmp, "x") as h5:
            for key, value in arrays.items():
                h5.create_dataset(key, data=value)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # h5py raises OSError, some HDF5 write failures RuntimeError
        raise DemoFaceModelError(f"cannot write the demo face model to {path} ({err}); "
                                 f"pass a writable file with --out") from None
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()
    return path


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 success, 2 bad arguments or unwritable output)."""
    parser = argparse.ArgumentParser(description="Write the procedural demo face model (BFM2017 h5 layout; "
                                                 "a stand-in for demos and tests, not a research face model).")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output h5 file (default {DEFAULT_OUT})")
    parser.add_argument("--target_vertices", "--target-vertices", type=int, default=DEFAULT_TARGET_VERTICES,
                        help=f"approximate vertex count of the full mesh (default {DEFAULT_TARGET_VERTICES}; "
                             f"{BFM_SIZE_VERTICES} gives a BFM-sized mesh)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random bases (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    path = write_demo_face_model(args.out, args.target_vertices, args.seed, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    cli_main(main)
