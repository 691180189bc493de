"""GT visible-skin mask builders: CelebAMask-HQ part labels and AR colour-coded labels."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from utils.cli import cli_main
from utils.data.image_io import read_image_rgb, read_mask, write_image_rgb
from utils.errors import DataError
from utils.prepare import ar_gt, celebamask_gt
from utils.prepare.ar_gt import LABEL_COLOURS, ar_category, ar_visible_skin
from utils.prepare.celebamask_gt import compose_visible_skin


def _box(shape, y0, y1, x0, x1) -> np.ndarray:
    mask = np.zeros(shape, np.float32)
    mask[y0:y1, x0:x1] = 1.0
    return mask


def _celeba_labels(n: int = 32) -> dict[str, np.ndarray]:
    shape = (n, n)
    return {
        "skin": _box(shape, 4, 28, 6, 26),
        "nose": _box(shape, 12, 20, 14, 18),
        "l_eye": _box(shape, 10, 12, 8, 12),
        "mouth": _box(shape, 22, 24, 12, 20),
        "hair": _box(shape, 0, 8, 0, n),  # covers the top of the skin
        "eye_g": _box(shape, 9, 13, 7, 13),  # glasses over the left eye
        "l_ear": _box(shape, 14, 20, 4, 8),  # overlaps the skin edge
        "neck": _box(shape, 26, 32, 10, 22),  # overlaps the chin
    }


def _expected_celeba(labels: dict[str, np.ndarray]) -> np.ndarray:
    positive = labels["skin"] + labels["nose"] + labels["l_eye"] + labels["mouth"] > 0
    occluded = labels["hair"] + labels["eye_g"] + labels["l_ear"] + labels["neck"] > 0
    return (positive & ~occluded).astype(np.float32)


def test_compose_visible_skin_union_minus_occluders():
    labels = _celeba_labels()
    visible = compose_visible_skin(labels)
    assert visible.dtype == np.float32 and visible.shape == (32, 32)
    np.testing.assert_array_equal(visible, _expected_celeba(labels))
    assert visible[8:28, 8:26].sum() > 0 and visible[:8].sum() == 0 and visible[10, 10] == 0
    as_uint8 = {name: (label * 255).astype(np.uint8) for name, label in labels.items()}
    np.testing.assert_array_equal(compose_visible_skin(as_uint8), visible)


def test_compose_visible_skin_rejects_bad_labels():
    with pytest.raises(DataError, match="unknown CelebAMask-HQ classes \\['skinn'\\]"):
        compose_visible_skin({"skinn": np.ones((4, 4))})
    with pytest.raises(DataError, match="one size"):
        compose_visible_skin({"skin": np.ones((4, 4)), "hair": np.ones((5, 4))})
    with pytest.raises(DataError, match="image_id"):
        compose_visible_skin("some/folder")


def _write_celeba(root, ids, n_img=64, n_lab=32):
    rng = np.random.default_rng(0)
    for image_id in ids:
        image = rng.integers(0, 255, (n_img, n_img, 3), dtype=np.uint8)
        write_image_rgb(root / "CelebA-HQ-img" / f"{image_id}.jpg", image)
        folder = root / "CelebAMask-HQ-mask-anno" / str(image_id // 2000)
        for name, label in _celeba_labels(n_lab).items():
            grey3 = np.repeat((label * 255).astype(np.uint8)[..., None], 3, axis=2)
            write_image_rgb(folder / f"{image_id:05d}_{name}.png", grey3)


def test_compose_from_the_annotation_folder(tmp_path):
    _write_celeba(tmp_path, [2003])
    assert (tmp_path / "CelebAMask-HQ-mask-anno" / "1" / "02003_skin.png").is_file()
    visible = compose_visible_skin(tmp_path / "CelebAMask-HQ-mask-anno", 2003)
    np.testing.assert_array_equal(visible, _expected_celeba(_celeba_labels()))
    with pytest.raises(DataError, match="no CelebAMask-HQ label files for image 7"):
        compose_visible_skin(tmp_path / "CelebAMask-HQ-mask-anno", 7)


def test_celebamask_cli(tmp_path, capsys):
    _write_celeba(tmp_path / "celeba", [0, 1, 2])
    out = tmp_path / "root"
    args = ["--celeba_root", str(tmp_path / "celeba"), "--out", str(out)]
    assert celebamask_gt.main(args + ["--size", "16", "--limit", "2"]) == 0
    assert "detect_landmarks" in capsys.readouterr().out
    written = sorted(p.name for p in (out / "Dataset").iterdir())
    assert written == ["0.png", "0_visible_skin_mask.png", "1.png", "1_visible_skin_mask.png"]
    assert read_image_rgb(out / "Dataset" / "1.png").shape == (16, 16, 3)
    mask = read_mask(out / "Dataset" / "1_visible_skin_mask.png")
    expected = cv2.resize(_expected_celeba(_celeba_labels()), (16, 16), interpolation=cv2.INTER_AREA) >= 0.5
    np.testing.assert_array_equal(mask, expected.astype(np.float32))
    assert celebamask_gt.main(["--celeba_root", str(tmp_path / "celeba"), "--out", str(out), "--ids", "2"]) == 0
    assert read_mask(out / "Dataset" / "2_visible_skin_mask.png").shape == (64, 64)  # native image size
    with pytest.raises(SystemExit) as exit_info:
        cli_main(celebamask_gt.main, ["--celeba_root", str(tmp_path / "nowhere"), "--out", str(out)])
    assert exit_info.value.code == 2 and "CelebA-HQ-img" in capsys.readouterr().err


# ---------------------------------------------------------------- AR


def _ar_label(h=60, w=50, outline=False, noise=0) -> tuple[np.ndarray, np.ndarray]:
    """A label image and its expected visible-skin mask."""
    label = np.zeros((h, w, 3), np.uint8)
    ellipse = np.zeros((h, w), np.uint8)
    cv2.ellipse(ellipse, (25, 30), (18, 25), 0, 0, 360, 1, -1)
    if outline:
        cv2.ellipse(label, (25, 30), (18, 25), 0, 0, 360, LABEL_COLOURS["ellipse"], 1)
    else:
        label[ellipse > 0] = (180, 140, 120)  # face labelled with a skin tone
    label[0:12, :] = LABEL_COLOURS["hair"]
    label[20:26, 10:40] = LABEL_COLOURS["glasses"]
    label[44:48, 18:32] = LABEL_COLOURS["teeth"]
    label[50:60, 5:45] = LABEL_COLOURS["scarf"]
    label[28:33, 3:8] = LABEL_COLOURS["earring"]
    expected = ellipse.astype(bool)
    expected[0:12] = expected[20:26, 10:40] = expected[50:60, 5:45] = expected[28:33, 3:8] = False
    if noise:
        jitter = np.random.default_rng(0).integers(-noise, noise + 1, label.shape)
        label = np.clip(label.astype(int) + jitter, 0, 255).astype(np.uint8)
    return label, expected.astype(np.float32)


@pytest.mark.parametrize("outline", [False, True])
def test_ar_visible_skin(outline):
    label, expected = _ar_label(outline=outline)
    visible = ar_visible_skin(label)
    assert visible.dtype == np.float32
    if outline:  # the fitted ellipse may differ from the drawn one by a pixel along the rim
        assert np.abs(visible - expected).sum() < 0.03 * expected.sum()
        np.testing.assert_array_equal(visible[15:44, 14:37], expected[15:44, 14:37])
    else:
        np.testing.assert_array_equal(visible, expected)
    assert visible[46, 25] == 1.0  # teeth count as visible face


def test_ar_visible_skin_colour_tolerance():
    label, expected = _ar_label(noise=25)
    np.testing.assert_array_equal(ar_visible_skin(label, tolerance=40), expected)
    assert ar_visible_skin(label, tolerance=5)[5, 25] == 1.0  # noisy hair no longer recognised


@pytest.mark.parametrize(
    "name, category",
    [
        ("m-001-1.bmp", "neutral"), ("w-012-5.png", "neutral"), ("m-001-14", "neutral"),
        ("m-001-21.bmp", "sunglasses"), ("w-100-22.bmp", "sunglasses"), ("m-003-8.bmp", "sunglasses"),
        ("m-001-24.bmp", "scarf"), ("m-001-25.png", "scarf"), ("w-002-11.bmp", "scarf"),
        ("m-001-2.bmp", "other"), ("m-001-27.bmp", "other"), ("face.png", "other"),
    ],
)
def test_ar_category(name, category):
    assert ar_category(name) == category


def test_ar_cli(tmp_path, capsys):
    images, labels, out = tmp_path / "img", tmp_path / "lab", tmp_path / "root"
    label, expected = _ar_label()
    write_image_rgb(images / "m-001-21.bmp", np.full((60, 50, 3), 99, np.uint8))
    write_image_rgb(images / "m-001-2.bmp", np.full((60, 50, 3), 99, np.uint8))
    write_image_rgb(images / "m-001-24.bmp", np.full((60, 50, 3), 99, np.uint8))
    write_image_rgb(labels / "m-001-21_label.png", label)
    write_image_rgb(labels / "m-001-24.png", cv2.resize(label, (100, 120), interpolation=cv2.INTER_NEAREST))
    write_image_rgb(labels / "unrelated.png", label)
    assert ar_gt.main(["--images", str(images), "--labels", str(labels), "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "Dataset").iterdir()) == [
        "m-001-21.png", "m-001-21_visible_skin_mask.png", "m-001-24.png", "m-001-24_visible_skin_mask.png"
    ]
    np.testing.assert_array_equal(read_mask(out / "Dataset" / "m-001-21_visible_skin_mask.png"), expected)
    np.testing.assert_array_equal(read_mask(out / "Dataset" / "m-001-24_visible_skin_mask.png"), expected)
    assert (out / "ar_categories.csv").read_text() == "m-001-21.png,sunglasses\nm-001-24.png,scarf\n"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(ar_gt.main, ["--images", str(images), "--labels", str(images), "--out", str(out)])
    assert exit_info.value.code == 2 and "different folders" in capsys.readouterr().err
