"""Face alignment (pure, no dlib) and the dlib landmark tool (skipped when the extra is not installed)."""

from __future__ import annotations

import importlib.util
import sys

import cv2
import numpy as np
import pytest

from utils.cli import cli_main
from utils.data.image_io import read_image_rgb, read_mask, write_image_rgb, write_mask
from utils.errors import DataError, MofaError
from utils.landmarks_csv import read_landmarks_csv
from utils.prepare import detect_landmarks as dl


def _has_dlib_extra() -> bool:
    if importlib.util.find_spec("dlib") is None:
        return False
    try:
        dl.predictor_path()
    except dl.LandmarkExtraMissing:
        return False
    return True


needs_dlib = pytest.mark.skipif(
    not _has_dlib_extra(), reason="optional extra not installed: pip install -r requirements-landmarks.txt"
)
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


def _landmarks_with_five(five: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """68 random points whose `five_points` are exactly `five` (eye corners centred on the eye points)."""
    points = rng.uniform(-20, 20, size=(68, 2)) + five.mean(0)
    for eye, lo in ((0, 36), (1, 42)):
        ring = rng.normal(size=(6, 2)) * 3
        points[lo : lo + 6] = five[eye] + ring
        half = rng.normal(size=2) * 3
        points[lo], points[lo + 3] = five[eye] - half, five[eye] + half  # the corners: their mean is the centre
    points[30], points[48], points[54] = five[2], five[3], five[4]
    return points


def _similarity(angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    rot = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.hstack([rot, np.array(shift)[:, None]])


def test_five_points_definition():
    points = np.random.default_rng(0).uniform(0, 100, size=(68, 2))
    five = dl.five_points(points)
    np.testing.assert_allclose(five[0], (points[36] + points[39]) / 2)  # G2: the mean of the eye corners
    np.testing.assert_allclose(five[1], (points[42] + points[45]) / 2)
    np.testing.assert_allclose(five[2:], points[[30, 48, 54]])
    with pytest.raises(MofaError, match=r"68, 2\)"):
        dl.five_points(points[:5])


def test_similarity_transform_recovers_a_known_one():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, size=(5, 2))
    truth = _similarity(-33.0, 0.37, (12.0, -4.5))
    estimated = dl.similarity_transform(src, dl.transform_points(src, truth))
    np.testing.assert_allclose(estimated, truth, atol=1e-9)
    mirrored = src * [-1, 1]
    assert np.linalg.det(dl.similarity_transform(src, mirrored)[:, :2]) > 0  # never a reflection


@pytest.mark.parametrize("scale", [0.8, 2.3])
def test_align_face_maps_five_points_onto_the_template(scale):
    """Coloured dots drawn at the 5 points of a rotated, scaled face land on the template in the crop."""
    size = 112
    rng = np.random.default_rng(1)
    crop_to_image = _similarity(25.0, scale * size / 112, (90.0, 60.0))
    five_image = dl.transform_points(dl.template_points(size), crop_to_image)
    landmarks = _landmarks_with_five(five_image, rng)
    image = np.full((400, 380, 3), 90, np.uint8)
    for (x, y), colour in zip(five_image, COLOURS):
        cv2.circle(image, (int(round(x)), int(round(y))), int(4 * scale), colour, -1)

    crop, crop_landmarks = dl.align_face(image, landmarks, size)

    assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
    assert crop_landmarks.shape == (68, 2) and crop_landmarks.dtype == np.float32
    np.testing.assert_allclose(dl.five_points(crop_landmarks), dl.template_points(size), atol=1e-3)
    for (x, y), colour in zip(dl.template_points(size), COLOURS):
        pixel = crop[int(round(y)), int(round(x))].astype(int)
        assert np.abs(pixel - colour).max() < 40, (x, y, pixel, colour)


def test_template_is_upright_and_centred():
    points = dl.template_points(224)
    assert points[0, 0] < points[2, 0] < points[1, 0]  # eye 36-41 left of the nose, left of eye 42-47
    assert points[0, 1] < points[2, 1] < points[3, 1]  # eyes above nose above mouth
    assert abs(points[:, 0].mean() - 111.5) < 1.0


def test_warp_carries_a_mask_like_the_image():
    image = np.zeros((300, 300), np.float32)
    image[100:200, 50:150] = 1.0
    matrix = _similarity(0.0, 0.25, (10.0, 5.0))  # shrink 4x: takes the anti-aliasing path
    crop = dl.warp_to_crop(image, matrix, 100)
    corners = dl.transform_points(np.array([[49.5, 99.5], [149.5, 199.5]]), matrix)  # box edges
    (x0, y0), (x1, y1) = corners
    inside = crop[int(y0) + 2 : int(y1) - 1, int(x0) + 2 : int(x1) - 1]  # area + bilinear blur ~1.5 px
    assert inside.min() > 0.99 and crop.sum() == pytest.approx((x1 - x0) * (y1 - y0), rel=0.02)


def test_split_parsing_and_seeded_split():
    assert dl.parse_split("0.7, 0.2,0.1") == (0.7, 0.2, 0.1)
    for bad in ("0.8,0.1", "0.8,0.3,0.1", "a,b,c", "1.2,-0.2,0"):
        with pytest.raises(DataError, match="--split"):
            dl.parse_split(bad)
    rows = list(range(20))
    first = dl.split_rows(rows, (0.6, 0.25, 0.15), seed=3)
    assert [len(first[s]) for s in ("train", "val", "test")] == [12, 5, 3]
    assert sorted(first["train"] + first["val"] + first["test"]) == rows and first["all"] == rows
    assert first == dl.split_rows(rows, (0.6, 0.25, 0.15), seed=3)
    assert first["train"] != dl.split_rows(rows, (0.6, 0.25, 0.15), seed=4)["train"]


def test_missing_extra_gives_the_install_hint(tmp_path, monkeypatch, capsys):
    write_image_rgb(tmp_path / "raw" / "a.png", np.zeros((8, 8, 3), np.uint8))
    monkeypatch.setitem(sys.modules, "dlib", None)  # makes `import dlib` raise ImportError
    with pytest.raises(SystemExit) as exit_info:
        cli_main(dl.main, ["--images", str(tmp_path / "raw"), "--out", str(tmp_path / "root")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install -r requirements-landmarks.txt" in err


def test_cli_rejects_writing_over_its_input(tmp_path, capsys):
    (tmp_path / "root" / "Dataset").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(dl.main, ["--images", str(tmp_path / "root" / "Dataset"), "--out", str(tmp_path / "root")])
    assert exit_info.value.code == 2 and "write to a new image root" in capsys.readouterr().err


@needs_dlib
def test_dlib_finds_68_points_on_the_astronaut_face():
    from skimage.data import astronaut

    detector, predictor = dl.load_dlib()
    landmarks = dl.detect_landmarks68(astronaut(), detector, predictor)
    assert landmarks.shape == (68, 2)
    face_box = (160, 60, 290, 200)  # x0, y0, x1, y1 of the astronaut's face (the image is 512 x 512)
    assert (landmarks[:, 0] > face_box[0]).all() and (landmarks[:, 0] < face_box[2]).all()
    assert (landmarks[:, 1] > face_box[1]).all() and (landmarks[:, 1] < face_box[3]).all()
    five = dl.five_points(landmarks)
    assert five[0, 0] < five[1, 0] and five[0, 1] < five[3, 1]  # eyes left-to-right, above the mouth
    assert dl.detect_landmarks68(np.full((200, 200, 3), 128, np.uint8), detector, predictor) is None


@needs_dlib
def test_cli_end_to_end(tmp_path):
    from skimage.data import astronaut

    raw = tmp_path / "raw"
    write_image_rgb(raw / "people" / "astro.jpg", astronaut())
    mask = np.zeros((512, 512), np.float32)
    mask[:, :220] = 1.0  # the image-left half of the face (x 175-265)
    write_mask(raw / "people" / "astro_visible_skin_mask.png", mask)
    write_image_rgb(raw / "blank.png", np.full((64, 64, 3), 200, np.uint8))
    (raw / "broken.jpg").write_bytes(b"garbage")
    root = tmp_path / "root"

    assert dl.main(["--images", str(raw), "--out", str(root) + "/", "--size", "96", "--split", "1,0,0"]) == 0

    rows = read_landmarks_csv(root / "train_landmarks_3D.csv", image_dir=root / "Dataset")
    assert [name for name, _ in rows] == ["people/astro.png"]
    assert read_landmarks_csv(root / "all_landmarks_3D.csv")[0][0] == "people/astro.png"
    assert (root / "val_landmarks_3D.csv").read_text() == ""
    assert read_image_rgb(root / "Dataset" / "people" / "astro.png").shape == (96, 96, 3)
    np.testing.assert_allclose(dl.five_points(rows[0][1]), dl.template_points(96), atol=4.0)
    crop_mask = read_mask(root / "Dataset" / "people" / "astro_visible_skin_mask.png")
    assert crop_mask.shape == (96, 96) and set(np.unique(crop_mask)) == {0.0, 1.0}
    assert crop_mask[:, :30].mean() > 0.95 and crop_mask[:, 66:].mean() < 0.05
    skipped = (root / "no_face_found.txt").read_text().splitlines()
    assert sorted(line.split(":")[0] for line in skipped) == ["blank.png", "broken.jpg"]
    assert "no face found" in " ".join(skipped) and "cannot decode" in " ".join(skipped)
