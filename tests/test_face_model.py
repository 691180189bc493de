"""FaceModel: loading the BFM2017 layout, linear model, G1 crop with landmark remap, and error messages."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.errors import FaceModelError
from models.face_model import RECENTRE_MM, FaceModel, analytic_crop_mask, crop_mesh
from models.layout import CoeffLayout
from tests.helpers import TINY_COMPONENTS, assert_close, tiny_bfm_arrays, tiny_landmark_ids, write_bfm_h5

LANDMARK_KEY = "metadata/landmarks/ibug68_vertex_indices"


@pytest.fixture(scope="module")
def tiny(tiny_bfm_h5):
    return FaceModel.from_h5(tiny_bfm_h5)


@pytest.fixture(scope="module")
def tiny_full(tiny_bfm_h5):
    return FaceModel.from_h5(tiny_bfm_h5, crop=False)


def _write_variant(tmp_path, **changes):
    arrays = tiny_bfm_arrays(seed=0)
    for key, value in changes.items():
        key = key.replace("__", "/")
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    return write_bfm_h5(tmp_path / "variant.h5", arrays)


def test_zero_coefficients_give_the_mean(tiny):
    layout = tiny.layout
    verts = tiny.vertices(torch.zeros(2, layout.n_shape), torch.zeros(2, layout.n_exp))
    albedo = tiny.albedo(torch.zeros(2, layout.n_tex))
    assert verts.shape == (2, tiny.n_vertices, 3) and albedo.shape == (2, tiny.n_vertices, 3)
    assert_close(verts, tiny.mean_shape.expand(2, -1, -1), msg="vertices at zero coeffs")
    assert_close(albedo, tiny.mean_albedo.expand(2, -1, -1), msg="albedo at zero coeffs")


def test_mean_is_shape_plus_expression_mean_recentred(tiny):
    arrays = tiny_bfm_arrays(seed=0)
    n_full = arrays["shape/representer/points"].shape[1]
    full_mean = (arrays["shape/model/mean"] + arrays["expression/model/mean"]).reshape(n_full, 3)
    expected = full_mean[tiny.kept_vertices.numpy()] - np.asarray(RECENTRE_MM)
    assert_close(tiny.mean_shape, expected, atol=1e-4, msg="cropped, recentred mean shape")
    albedo = arrays["color/model/mean"].reshape(n_full, 3)[tiny.kept_vertices.numpy()]
    assert_close(tiny.mean_albedo, albedo, msg="cropped mean albedo")


def test_bases_are_truncated_and_scaled_by_sqrt_variance(tiny):
    arrays = tiny_bfm_arrays(seed=0)
    assert tiny.shape_basis.shape == (3 * tiny.n_vertices, 80) and tiny.exp_basis.shape[1] == 64
    assert tiny.tex_basis.shape[1] == 80 and tiny.shape_basis.dtype == torch.float32
    rows = (tiny.kept_vertices.numpy()[:, None] * 3 + np.arange(3)).ravel()
    k = 7
    column = arrays["expression/model/pcaBasis"][rows, k] * np.sqrt(arrays["expression/model/pcaVariance"][k])
    exp = torch.zeros(1, 64)
    exp[0, k] = 1.0
    moved = tiny.vertices(torch.zeros(1, 80), exp) - tiny.mean_shape
    assert_close(moved.reshape(-1), column, atol=1e-5, msg="unit expression coefficient displacement")


def test_linearity(tiny):
    a_shape, b_shape = torch.randn(2, 80), torch.randn(2, 80)
    a_exp, b_exp = torch.randn(2, 64), torch.randn(2, 64)
    mean = tiny.mean_shape
    sum_offset = tiny.vertices(a_shape + b_shape, a_exp + b_exp) - mean
    parts = (tiny.vertices(a_shape, a_exp) - mean) + (tiny.vertices(b_shape, b_exp) - mean)
    assert_close(sum_offset, parts, atol=1e-3, msg="v(a+b) - mean")
    tex_a, tex_b = torch.randn(2, 80), torch.randn(2, 80)
    mean_alb = tiny.mean_albedo
    separate = (tiny.albedo(tex_a) - mean_alb) + (tiny.albedo(tex_b) - mean_alb)
    assert_close(tiny.albedo(tex_a + tex_b) - mean_alb, separate, atol=1e-5, msg="albedo linearity")


def test_wrong_coefficient_sizes_raise(tiny):
    with pytest.raises(ValueError, match="shape coefficients"):
        tiny.vertices(torch.zeros(1, 79), torch.zeros(1, 64))
    with pytest.raises(ValueError, match="batch"):
        tiny.vertices(torch.zeros(2, 80), torch.zeros(1, 64))


def test_crop_keeps_exactly_the_vertices_of_kept_triangles(tiny, tiny_full):
    assert tiny_full.n_vertices == 375 and tiny_full.n_faces == 672
    assert 0 < tiny.n_vertices < tiny_full.n_vertices and 0 < tiny.n_faces < tiny_full.n_faces
    original = (tiny_full.mean_shape + torch.tensor(RECENTRE_MM)).numpy()
    inside = analytic_crop_mask(original)
    kept = tiny.kept_vertices.numpy()
    assert inside[kept].all(), "a kept vertex fails the analytic crop"
    full_faces = {tuple(f) for f in tiny_full.faces.tolist()}
    mapped = [tuple(f) for f in kept[tiny.faces.numpy()].tolist()]
    assert set(mapped) <= full_faces, "cropped faces do not map back to original faces"
    expected_faces = {f for f in full_faces if inside[list(f)].all()}
    assert set(mapped) == expected_faces, "crop must keep exactly the triangles with 3 kept vertices"
    assert np.array_equal(np.unique(tiny.faces.numpy()), np.arange(tiny.n_vertices)), "unused vertex kept"
    assert_close(tiny.mean_shape, tiny_full.mean_shape[tiny.kept_vertices], msg="kept vertex positions")


def test_crop_mesh_remaps_indices_and_drops_orphans():
    faces = np.array([[0, 1, 2], [2, 3, 4], [4, 5, 6]])
    keep = np.array([True, True, True, True, False, True, True])  # vertices 5, 6 pass but lose their triangle
    kept, new_faces, old_to_new = crop_mesh(keep, faces)
    assert kept.tolist() == [0, 1, 2]
    assert new_faces.tolist() == [[0, 1, 2]]
    assert old_to_new.tolist() == [0, 1, 2, -1, -1, -1, -1]
    keep = np.array([False, True, True, True, True, False, False])
    kept, new_faces, old_to_new = crop_mesh(keep, faces)
    assert kept.tolist() == [2, 3, 4] and new_faces.tolist() == [[0, 1, 2]]


def test_landmarks_are_remapped_to_the_same_vertices(tiny, tiny_full):
    original_ids = torch.from_numpy(tiny_landmark_ids())
    assert torch.equal(tiny_full.landmark_idx, original_ids)
    assert torch.equal(tiny.kept_vertices[tiny.landmark_idx], original_ids)
    assert_close(tiny.mean_shape[tiny.landmark_idx], tiny_full.mean_shape[original_ids],
                 msg="landmark coordinates after the crop")


def test_landmark_outside_the_crop_raises(tmp_path):
    landmarks = tiny_landmark_ids()
    landmarks[5] = 7 * 25  # equator, longitude -120 deg: behind the crop's z > 20 mm plane
    path = _write_variant(tmp_path, **{LANDMARK_KEY.replace("/", "__"): landmarks})
    with pytest.raises(FaceModelError, match=r"landmark 5 .*vertex 175.*outside the face crop"):
        FaceModel.from_h5(path)
    assert FaceModel.from_h5(path, crop=False).landmark_idx[5] == 175


def test_landmark_file_fallback_and_errors(tmp_path):
    path = _write_variant(tmp_path, **{LANDMARK_KEY.replace("/", "__"): None})
    ids = tiny_landmark_ids()[::-1]
    good = tmp_path / "lm.txt"
    good.write_text("# reversed order\n\n" + "\n".join(str(i) for i in ids) + "\n")
    model = FaceModel.from_h5(path, crop=False, landmarks_path=good)
    assert model.landmark_idx.tolist() == ids.tolist()
    short = tmp_path / "short.txt"
    short.write_text("\n".join(str(i) for i in ids[:67]))
    with pytest.raises(FaceModelError, match=r"short\.txt.*exactly 68.*found 67"):
        FaceModel.from_h5(path, landmarks_path=short)
    with pytest.raises(FaceModelError, match=r"ibug68_landmarks\.txt: landmark 0 has vertex index 22212"):
        FaceModel.from_h5(path)  # default list (full BFM indices) does not fit a 375-vertex mesh


def test_missing_file_message_says_what_to_do(tmp_path):
    missing = tmp_path / "model2017-1_bfm_nomouth.h5"
    with pytest.raises(FaceModelError) as info:
        FaceModel.from_h5(missing)
    message = str(info.value)
    assert str(missing) in message
    assert "https://faces.dmi.unibas.ch/bfm/bfm2017.html" in message
    assert "python -m utils.synthetic.demo_face_model --out basel_3DMM/demo_face_model.h5" in message
    assert "--bfm basel_3DMM/demo_face_model.h5" in message


def test_not_an_h5_file(tmp_path):
    path = tmp_path / "fake.h5"
    path.write_text("not hdf5")
    with pytest.raises(FaceModelError, match="fake.h5"):
        FaceModel.from_h5(path)


def test_missing_key_names_the_key(tmp_path):
    path = _write_variant(tmp_path, expression__model__pcaBasis=None)
    with pytest.raises(FaceModelError, match="'expression/model/pcaBasis' is missing"):
        FaceModel.from_h5(path)


def test_wrong_shape_names_key_found_and_expected(tmp_path):
    path = _write_variant(tmp_path, color__model__mean=np.zeros(100, np.float32))
    with pytest.raises(FaceModelError, match=r"'color/model/mean' has shape \(100,\), expected \(1125,\)"):
        FaceModel.from_h5(path)


def test_too_few_components_for_the_layout(tiny_bfm_h5):
    too_big = CoeffLayout(n_shape=TINY_COMPONENTS["shape"] + 1)
    with pytest.raises(FaceModelError, match=r"'shape/model' has 100 components .*asks for 101 .*n_shape"):
        FaceModel.from_h5(tiny_bfm_h5, layout=too_big)
    small = FaceModel.from_h5(tiny_bfm_h5, layout=CoeffLayout(10, 5, 3))
    assert small.layout == CoeffLayout(10, 5, 3) and small.tex_basis.shape[1] == 3


def test_buffers_are_not_in_state_dict_and_config_identifies_model(tiny, tiny_bfm_h5, tmp_path):
    assert len(tiny.state_dict()) == 0, "the face model must not be saved into checkpoints"
    assert tiny.to(torch.float64).mean_shape.dtype == torch.float64
    tiny.to(torch.float32)
    again = FaceModel.from_h5(tiny_bfm_h5)
    assert again.config() == tiny.config()
    arrays = tiny_bfm_arrays(seed=0)
    arrays["shape/model/mean"] = arrays["shape/model/mean"] * np.float32(1.001)
    other = FaceModel.from_h5(write_bfm_h5(tmp_path / "other.h5", arrays))
    assert other.config()["n_vertices"] == tiny.config()["n_vertices"]
    assert other.config() != tiny.config(), "a different mean shape must change the config"


def test_demo_face_model_loads_with_the_crop(demo_bfm_h5):
    model = FaceModel.from_h5(demo_bfm_h5)
    assert model.landmark_idx.shape == (68,)
    assert model.n_faces > 0 and int(model.faces.max()) == model.n_vertices - 1
