"""The procedural demo face model: exact BFM2017 h5 layout, orthonormal bases, crop-safe iBUG landmarks, CLI."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy.spatial import Delaunay

from utils.cli import cli_main
from utils.synthetic.demo_face_model import (
    DEFAULT_TARGET_VERTICES,
    IBUG_MIRROR,
    DemoFaceModelError,
    main,
    write_demo_face_model,
)

SMALL = {"n_shape": 80, "n_exp": 64, "n_color": 80}  # the loader's minimum: keeps the small builds fast
GROUPS = {"shape": 199, "expression": 100, "color": 199}
# key -> (ndim, dtype kind); N vertices, F triangles, K components are checked for consistency separately.
EXPECTED_KEYS = {
    "shape/representer/points": (2, "f"), "shape/representer/cells": (2, "i"),
    "shape/model/mean": (1, "f"), "shape/model/pcaBasis": (2, "f"), "shape/model/pcaVariance": (1, "f"),
    "expression/model/mean": (1, "f"), "expression/model/pcaBasis": (2, "f"),
    "expression/model/pcaVariance": (1, "f"),
    "color/model/mean": (1, "f"), "color/model/pcaBasis": (2, "f"), "color/model/pcaVariance": (1, "f"),
    "metadata/landmarks/ibug68_vertex_indices": (1, "i"),
}


def _read(path: Path) -> dict[str, np.ndarray]:
    arrays = {}
    with h5py.File(path, "r") as h5:
        h5.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return arrays


def _mesh(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Original mean (shape + expression, BFM frame) `(N, 3)` float64, faces `(F, 3)`, landmarks `(68,)`."""
    mean = (arrays["shape/model/mean"].astype(np.float64) + arrays["expression/model/mean"]).reshape(-1, 3)
    return mean, arrays["shape/representer/cells"].T.astype(np.int64), arrays[
        "metadata/landmarks/ibug68_vertex_indices"]


def _g1_crop_survivors(points: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Section 4.3, written independently: candidate vertices, then only those used by a fully kept triangle."""
    x, y, z = points.T
    c1 = (x / z) ** 2 / 100**2 + (y / z) ** 2 / 0.75**2 <= 1
    c2 = (x / z) ** 2 / 100**2 + ((y + 18) / z) ** 2 / 0.62**2 <= 1
    c3 = (x / z) ** 2 / 3.2**2 + ((y - 25) / z) ** 2 / 0.92**2 <= 1
    candidate = (c1 | c2 | c3) & (z + 0.05 * y > 20)
    used = np.zeros(len(points), dtype=bool)
    used[faces[candidate[faces].all(axis=1)].ravel()] = True
    return used


def _face_normals(points: np.ndarray, faces: np.ndarray) -> np.ndarray:
    normals = np.cross(points[faces[:, 1]] - points[faces[:, 0]], points[faces[:, 2]] - points[faces[:, 0]])
    return normals / np.linalg.norm(normals, axis=1, keepdims=True)


def _vertex_normal_z(points: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """z component of the area-weighted unit vertex normals `(N,)`."""
    normals = np.cross(points[faces[:, 1]] - points[faces[:, 0]], points[faces[:, 2]] - points[faces[:, 0]])
    corners, weights = faces.ravel(), np.repeat(normals, 3, axis=0)  # (3F,), (3F, 3)
    summed = np.stack([np.bincount(corners, weights[:, c], minlength=len(points)) for c in range(3)], axis=1)
    return summed[:, 2] / np.linalg.norm(summed, axis=1)


@pytest.fixture(scope="module")
def default_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    return _read(write_demo_face_model(tmp_path_factory.mktemp("demo") / "default.h5", seed=0))


@pytest.fixture(scope="module")
def small_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_face_model(tmp_path_factory.mktemp("demo") / "small.h5", 800, seed=3, **SMALL)


def test_exact_bfm2017_keys_shapes_and_dtypes(default_model: dict[str, np.ndarray]) -> None:
    assert set(default_model) == set(EXPECTED_KEYS)
    for key, (ndim, kind) in EXPECTED_KEYS.items():
        assert default_model[key].ndim == ndim, key
        assert default_model[key].dtype.kind == kind, (key, default_model[key].dtype)
    n = default_model["shape/representer/points"].shape[1]
    assert default_model["shape/representer/points"].shape == (3, n)
    assert default_model["shape/representer/points"].dtype == np.float32
    assert default_model["shape/representer/cells"].shape[0] == 3
    assert default_model["shape/representer/cells"].dtype == np.int32
    assert default_model["metadata/landmarks/ibug68_vertex_indices"].shape == (68,)
    assert default_model["metadata/landmarks/ibug68_vertex_indices"].dtype == np.int64
    for group, k in GROUPS.items():  # BFM2017 component counts by default
        assert default_model[f"{group}/model/mean"].shape == (3 * n,), group
        assert default_model[f"{group}/model/pcaBasis"].shape == (3 * n, k), group
        assert default_model[f"{group}/model/pcaVariance"].shape == (k,), group
        assert default_model[f"{group}/model/pcaBasis"].dtype == np.float32, group
    cells = default_model["shape/representer/cells"]
    assert cells.min() == 0 and cells.max() == n - 1
    points = default_model["shape/representer/points"]
    np.testing.assert_array_equal(points.T.reshape(-1), default_model["shape/model/mean"])  # interleaved layout


def test_custom_component_counts(small_path: Path) -> None:
    arrays = _read(small_path)
    for group, key in (("shape", "n_shape"), ("expression", "n_exp"), ("color", "n_color")):
        assert arrays[f"{group}/model/pcaBasis"].shape[1] == SMALL[key]
        assert arrays[f"{group}/model/pcaVariance"].shape == (SMALL[key],)


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_bases_orthonormal_variances_positive_decreasing(default_model: dict[str, np.ndarray], group: str) -> None:
    basis = default_model[f"{group}/model/pcaBasis"].astype(np.float64)
    gram = basis.T @ basis
    assert np.abs(gram - np.eye(basis.shape[1])).max() < 1e-4
    variance = default_model[f"{group}/model/pcaVariance"]
    assert (variance > 0).all()
    assert (np.diff(variance) < 0).all()


def test_variance_scales(default_model: dict[str, np.ndarray]) -> None:
    """One standard deviation of the first components moves the face by a few mm / changes colour by < ~0.1."""
    mean, faces, _ = _mesh(default_model)
    face = _g1_crop_survivors(mean, faces)

    def displacement(group: str, k: int) -> float:
        column = default_model[f"{group}/model/pcaBasis"][:, k].astype(np.float64).reshape(-1, 3)  # (N, 3)
        scale = np.sqrt(default_model[f"{group}/model/pcaVariance"][k])
        return float(scale * np.linalg.norm(column[face], axis=1).max())

    assert 2.0 < displacement("shape", 0) < 15.0
    assert 2.0 < displacement("expression", 0) < 15.0
    assert 0.1 < displacement("shape", 79) < displacement("shape", 0)
    assert 0.02 < displacement("color", 0) < 0.2
    assert displacement("color", 79) < 0.05


def test_deterministic_for_a_seed_and_different_across_seeds(small_path: Path, tmp_path: Path) -> None:
    first = _read(small_path)
    again = _read(write_demo_face_model(tmp_path / "again.h5", 800, seed=3, **SMALL))
    other = _read(write_demo_face_model(tmp_path / "other.h5", 800, seed=4, **SMALL))
    for key in EXPECTED_KEYS:
        assert first[key].dtype == again[key].dtype and first[key].tobytes() == again[key].tobytes(), key
    for group in GROUPS:
        assert not np.allclose(first[f"{group}/model/pcaBasis"], other[f"{group}/model/pcaBasis"]), group
    np.testing.assert_array_equal(first["shape/representer/cells"], other["shape/representer/cells"])


def test_triangles_wind_outward(default_model: dict[str, np.ndarray]) -> None:
    mean, faces, _ = _mesh(default_model)
    normals = _face_normals(mean, faces)
    centroid = mean[faces].mean(axis=1)
    front = (np.abs(centroid[:, 0]) < 40) & (centroid[:, 1] > -60) & (centroid[:, 1] < 50) & (centroid[:, 2] > 60)
    assert front.sum() > 100
    mean_normal = normals[front].mean(axis=0)
    assert mean_normal[2] / np.linalg.norm(mean_normal) > 0.9
    sides = (np.abs(centroid[:, 1]) < 20) & (np.abs(centroid[:, 0]) > 60)  # cheeks/temples face sideways, outward
    assert (np.sign(normals[sides, 0]) == np.sign(centroid[sides, 0])).mean() > 0.95


@pytest.mark.parametrize("target", [600, DEFAULT_TARGET_VERTICES])
def test_all_landmarks_survive_the_g1_crop(target: int, default_model: dict[str, np.ndarray],
                                          tmp_path: Path) -> None:
    arrays = default_model if target == DEFAULT_TARGET_VERTICES else _read(
        write_demo_face_model(tmp_path / "m.h5", target, **SMALL))
    mean, faces, landmarks = _mesh(arrays)
    survivors = _g1_crop_survivors(mean, faces)
    assert survivors[landmarks].all(), np.flatnonzero(~survivors[landmarks])
    assert len(set(landmarks.tolist())) == 68


def test_crop_removes_the_outside_and_keeps_the_face(default_model: dict[str, np.ndarray]) -> None:
    mean, faces, landmarks = _mesh(default_model)
    survivors = _g1_crop_survivors(mean, faces)
    assert 0.15 * len(mean) < (~survivors).sum() < 0.6 * len(mean)
    assert (~survivors[mean[:, 1] < -95]).all()  # neck
    assert (~survivors[mean[:, 2] < 0]).all()  # sides / back of the head
    lm = mean[landmarks, :2]
    forehead = lm[17:27] + np.array([0.0, 20.0])
    region = np.concatenate([lm, forehead])
    centre = region.mean(axis=0)
    hull = Delaunay(centre + 0.95 * (region - centre))
    visible = _vertex_normal_z(mean, faces) > 0.3
    in_face = (hull.find_simplex(mean[:, :2]) >= 0) & visible
    assert in_face.sum() > 0.3 * survivors.sum()
    assert survivors[in_face].all(), mean[in_face & ~survivors][:5]


def test_landmarks_are_anatomically_placed(default_model: dict[str, np.ndarray]) -> None:
    mean, _, landmarks = _mesh(default_model)
    p = mean[landmarks]  # (68, 3) x: subject's left (image right), y up, z toward the viewer
    x, y, z = p.T
    np.testing.assert_allclose(p[IBUG_MIRROR] * [-1, 1, 1], p, atol=1e-3)  # left/right mirror pairs
    eyes, mouth, brows = y[36:48].mean(), y[48:68].mean(), y[17:27]
    assert eyes > y[30] > mouth > y[8]  # eyes above the nose tip above the mouth above the chin
    assert 28 < eyes < 36 and -40 < mouth < -34 and -80 < y[8] < -68 and (brows > y[36:48].max()).all()
    assert x[36] < x[39] < 0 < x[42] < x[45]  # subject's right eye at negative x: left in the image
    assert x[36] < x[37] < x[38] < x[39] and x[42] < x[43] < x[44] < x[45]
    assert min(y[37], y[38]) > max(y[40], y[41]) and min(y[43], y[44]) > max(y[46], y[47])
    assert (x[:8] < 0).all() and (x[9:17] > 0).all() and (np.diff(x[1:16]) > 0).all()  # jaw: image left to right
    assert (np.diff(x[17:22]) > 0).all() and (np.diff(x[31:36]) > 0).all()
    assert (np.diff(y[:9]) < 0).all() and abs(x[8]) < 1e-3
    assert (np.diff(y[27:31]) < 0).all() and np.argmax(z) == 30 and 118 < z[30] < 132
    assert x[48] < x[51] < x[54] and y[51] > y[62] > y[66] > y[57]
    assert 130 < x[16] - x[0] < 155 and 110 < brows.mean() - y[8] < 135
    assert (z[27:68] > 70).all() and (z[27:68] < 132).all()  # nose, eyes and mouth on the face surface
    outline = mean[(np.abs(mean[:, 1] - y[0]) < 4) & (mean[:, 2] > 0)]
    assert x[0] - outline[:, 0].min() < 8  # jaw starts on the face outline


def test_default_camera_frames_the_face(default_model: dict[str, np.ndarray]) -> None:
    """Default G2 camera (f 1014.72 px, T (0, 0, 1000) mm, R diag(1,-1,-1), 224 px) after the -100 mm recentring."""
    mean, faces, landmarks = _mesh(default_model)
    kept = mean[_g1_crop_survivors(mean, faces)]
    depth = 1000.0 - (kept[:, 2] - 100.0)
    u = 1014.72 * kept[:, 0] / depth + 111.5
    v = -1014.72 * kept[:, 1] / depth + 111.5
    width, height = (u.max() - u.min()) / 224, (v.max() - v.min()) / 224
    assert 0.55 < width < 0.75 and 0.6 < height < 0.85
    assert u.min() > 0 and v.min() > 0 and u.max() < 223 and v.max() < 223


def test_albedo_mean_is_skin_with_features(default_model: dict[str, np.ndarray]) -> None:
    mean, _, landmarks = _mesh(default_model)
    color = default_model["color/model/mean"].reshape(-1, 3)
    assert color.min() >= 0 and color.max() <= 1
    cheek = color[np.argmin(np.linalg.norm(mean[:, :2] - [-45, -10], axis=1) + 1000 * (mean[:, 2] < 50))]
    assert np.allclose(cheek, [0.75, 0.55, 0.45], atol=0.08)
    lip_centres = [(mean[landmarks[51]] + mean[landmarks[62]]) / 2, (mean[landmarks[66]] + mean[landmarks[57]]) / 2]
    lips = color[[np.argmin(np.linalg.norm(mean - c, axis=1)) for c in lip_centres]]
    assert ((lips[:, 0] - lips[:, 1]) > cheek[0] - cheek[1] + 0.05).all()  # lips redder than skin
    brows = color[landmarks[[19, 24]]]
    assert (brows.sum(axis=1) < 0.7 * cheek.sum()).all()  # darker brows


@pytest.mark.parametrize("target", [700, 7000])
def test_target_vertices_is_honoured(target: int, tmp_path: Path) -> None:
    arrays = _read(write_demo_face_model(tmp_path / "m.h5", target, **SMALL))
    n = arrays["shape/representer/points"].shape[1]
    assert abs(n / target - 1) < 0.15, n
    assert 1.8 * n < arrays["shape/representer/cells"].shape[1] < 2.0 * n


def test_bad_arguments_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DemoFaceModelError, match="--target_vertices"):
        write_demo_face_model(tmp_path / "m.h5", target_vertices=10)
    with pytest.raises(DemoFaceModelError, match="expression component count 10"):
        write_demo_face_model(tmp_path / "m.h5", target_vertices=600, n_exp=10)


def test_default_output_is_in_the_repository() -> None:
    from utils.cli import repo_root
    from utils.synthetic.demo_face_model import DEFAULT_OUT

    assert DEFAULT_OUT == repo_root() / "basel_3DMM" / "demo_face_model.h5"


def test_cli_writes_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sub" / "demo.h5"
    assert main(["--out", str(out), "--target_vertices", "800", "--seed", "2"]) == 0
    arrays = _read(out)
    assert set(arrays) == set(EXPECTED_KEYS)
    assert abs(arrays["shape/representer/points"].shape[1] / 800 - 1) < 0.15
    with pytest.raises(SystemExit) as exit_info:
        cli_main(main, ["--out", str(tmp_path / "x.h5"), "--target_vertices", "5"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--target_vertices 5" in err
    assert not (tmp_path / "x.h5").exists()


def test_loads_with_the_face_model_loader(tmp_path: Path) -> None:
    face_model = pytest.importorskip("models.face_model")
    path = write_demo_face_model(tmp_path / "demo.h5", 800, seed=1, **SMALL)
    model = face_model.FaceModel.from_h5(path)
    arrays = _read(path)
    mean, faces, landmarks = _mesh(arrays)
    survivors = _g1_crop_survivors(mean, faces)
    assert model.n_vertices == survivors.sum()
    kept = model.kept_vertices.numpy()
    np.testing.assert_array_equal(kept[model.landmark_idx.numpy()], landmarks)
    np.testing.assert_allclose(model.mean_shape.numpy(), mean[kept] - [0, 0, 100], atol=1e-4)
