"""The synthetic occluded-face benchmark: determinism, exact ground truth, file layout and the occluder families."""
from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from models.camera import CameraConfig
from models.face_model import FaceModel
from models.layout import FIELDS, CoeffLayout
from models.renderer import FaceRenderer
from utils.cli import cli_main
from utils.data.datasets import FaceDataset
from utils.data.image_io import read_image_rgb, read_mask
from utils.landmarks_csv import read_landmarks_csv
from utils.synthetic.faces import RENDER_DTYPE, SceneRanges, generate_dataset, main
from utils.synthetic.occluders import AR_OCCLUDERS, CELEBA_OCCLUDERS, OCCLUDERS, TextureBank, draw_occluder

SIZE = 64
NUM = 16


@pytest.fixture(scope="module")
def textures() -> TextureBank:
    return TextureBank.from_skimage(("coffee", "brick"))


@pytest.fixture(scope="module")
def renderer(demo_bfm_h5: Path) -> FaceRenderer:
    layout = CoeffLayout()
    model = FaceModel.from_h5(demo_bfm_h5, layout)
    return FaceRenderer(model, CameraConfig.preset("g2").resized(SIZE), layout).to(dtype=RENDER_DTYPE)


@pytest.fixture(scope="module")
def mixed_root(demo_bfm_h5: Path, textures: TextureBank, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "mixed"
    generate_dataset(demo_bfm_h5, out, NUM, seed=7, size=SIZE, batch=6, textures=textures)
    return out


def read_ground_truth(root: Path) -> tuple[list[str], list[dict[str, str]]]:
    with (root / "ground_truth.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames), list(reader)


def coefficients(rows: list[dict[str, str]], layout: CoeffLayout) -> torch.Tensor:
    """(B, total) coefficients read back from ground_truth.csv, block by block through the layout."""
    blocks = []
    for name in FIELDS:
        size = len(range(layout.total)[layout.slice(name)])
        blocks.append(torch.tensor([[float(row[f"{name}_{k}"]) for k in range(size)] for row in rows]))
    return torch.cat(blocks, dim=1)


def masks(root: Path, rows: list[dict[str, str]]) -> np.ndarray:
    return np.stack([read_mask(root / "Dataset" / row["filename"].replace(".png", "_visible_skin_mask.png"))
                     for row in rows])


def test_same_seed_gives_identical_files(mixed_root: Path, demo_bfm_h5: Path, textures: TextureBank,
                                         tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_dataset(demo_bfm_h5, again, NUM, seed=7, size=SIZE, batch=5, textures=textures)
    first = sorted(p.relative_to(mixed_root) for p in mixed_root.rglob("*") if p.is_file())
    second = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert first == second and len(first) == 2 * NUM + 7  # + the manifest (utils.output_dir)
    different = [str(p) for p in first if (mixed_root / p).read_bytes() != (again / p).read_bytes()]
    assert not different, f"files differ between two runs with the same seed: {different}"
    prefix = tmp_path / "prefix"
    generate_dataset(demo_bfm_h5, prefix, 3, seed=7, size=SIZE, batch=16, textures=textures)
    for name in ("00000.png", "00002.png", "00002_visible_skin_mask.png"):
        assert (prefix / "Dataset" / name).read_bytes() == (mixed_root / "Dataset" / name).read_bytes(), name
    short, full = read_ground_truth(prefix)[1][2], read_ground_truth(mixed_root)[1][2]
    assert {**short, "split": ""} == {**full, "split": ""}, "the first images of a larger run differ"
    other = tmp_path / "other_seed"
    generate_dataset(demo_bfm_h5, other, 1, seed=8, size=SIZE, textures=textures)
    assert (other / "Dataset/00000.png").read_bytes() != (mixed_root / "Dataset/00000.png").read_bytes()


def test_ground_truth_columns_follow_the_layout(mixed_root: Path) -> None:
    layout = CoeffLayout()
    header, rows = read_ground_truth(mixed_root)
    assert header[:5] == ["filename", "split", "category", "appearance", "occluded_fraction"]
    assert header[-1] == "visible_landmarks"
    coeff_columns = header[5:-1]
    assert len(coeff_columns) == layout.total
    for name in FIELDS:
        block = coeff_columns[layout.slice(name)]
        assert block == [f"{name}_{k}" for k in range(len(block))], name
    assert len(rows) == NUM
    assert all(len(row["visible_landmarks"]) == 68 and set(row["visible_landmarks"]) <= {"0", "1"} for row in rows)
    assert {row["category"] for row in rows} <= set(OCCLUDERS) | {"none"}


def test_masks_are_the_rendered_face_minus_occluders(mixed_root: Path, renderer: FaceRenderer) -> None:
    _, rows = read_ground_truth(mixed_root)
    with torch.no_grad():
        coverage = renderer(coefficients(rows, renderer.layout).to(RENDER_DTYPE)).mask[:, 0].float().numpy()
    visible = masks(mixed_root, rows)
    assert (visible <= coverage).all(), "a visible-face pixel lies outside the rendered face"
    for k, row in enumerate(rows):
        fraction = 1.0 - visible[k].sum() / coverage[k].sum()
        assert fraction == pytest.approx(float(row["occluded_fraction"]), abs=1e-5)
        if row["category"] == "none":
            assert (visible[k] == coverage[k]).all()
        else:
            assert fraction > 0.0, f"{row['filename']}: a {row['category']} occluder hides none of the face"


def test_unoccluded_faces_have_the_rendered_region_as_mask(demo_bfm_h5: Path, textures: TextureBank,
                                                           renderer: FaceRenderer, tmp_path: Path) -> None:
    summary = generate_dataset(demo_bfm_h5, tmp_path, 6, seed=3, occlusion="none", size=SIZE, textures=textures)
    assert summary["categories"] == {"none": 6}
    _, rows = read_ground_truth(tmp_path)
    # appearance items (beards, specular, cast shadows ...) are visible face: images with them are checked too
    assert sum(row["appearance"] != "none" for row in rows) >= 2
    with torch.no_grad():
        coverage = renderer(coefficients(rows, renderer.layout).to(RENDER_DTYPE)).mask[:, 0].float().numpy()
    np.testing.assert_array_equal(masks(tmp_path, rows), coverage)
    assert all(float(row["occluded_fraction"]) == 0.0 for row in rows)


def test_frontal_landmarks_land_on_the_face(demo_bfm_h5: Path, textures: TextureBank, tmp_path: Path) -> None:
    generate_dataset(demo_bfm_h5, tmp_path, 4, seed=1, occlusion="none", size=SIZE,
                     ranges=SceneRanges().frontal(), textures=textures)
    _, rows = read_ground_truth(tmp_path)
    layout = CoeffLayout()
    angles = coefficients(rows, layout)[:, layout.slice("angles")]
    assert torch.equal(angles, torch.zeros_like(angles))
    for (filename, landmarks), mask in zip(read_landmarks_csv(tmp_path / "all_landmarks_3D.csv"),
                                           masks(tmp_path, rows)):
        cols, rows_ = np.round(landmarks).astype(int).T
        assert mask[rows_[17:], cols[17:]].all(), f"{filename}: an inner landmark falls outside the face"
        outside = cv2.distanceTransform((mask < 0.5).astype(np.uint8), cv2.DIST_L2, 5)  # px to the face
        assert outside[rows_, cols].max() <= 2.0, f"{filename}: a contour landmark lies off the face"
        eyes_x = landmarks[36:42, 0].mean(), landmarks[42:48, 0].mean()
        assert eyes_x[0] < eyes_x[1] and landmarks[8, 1] > landmarks[30, 1] > landmarks[27, 1]


def test_face_dataset_loads_the_splits_with_gt_masks(mixed_root: Path) -> None:
    names = {split: [name for name, _ in read_landmarks_csv(mixed_root / f"{split}_landmarks_3D.csv")]
             for split in ("train", "val", "test", "all")}
    assert sorted(names["train"] + names["val"] + names["test"]) == sorted(names["all"])
    assert len(set(names["all"])) == NUM and len(names["val"]) >= 1 and len(names["test"]) >= 1
    dataset = FaceDataset(mixed_root, "test", image_size=SIZE, test_mode=True)
    item = dataset[0]
    assert item["gt_mask"] is not None and item["gt_mask"].shape == (1, SIZE, SIZE)
    expected = read_mask(mixed_root / "Dataset" / item["filename"].replace(".png", "_visible_skin_mask.png"))
    np.testing.assert_array_equal(item["gt_mask"][0].numpy(), expected)
    image = read_image_rgb(mixed_root / "Dataset" / item["filename"])
    np.testing.assert_allclose(item["image"].permute(1, 2, 0).numpy() * 255.0, image, atol=1e-3)


def test_ar_mode_uses_only_sunglasses_and_scarves(demo_bfm_h5: Path, textures: TextureBank, tmp_path: Path) -> None:
    summary = generate_dataset(demo_bfm_h5, tmp_path, 8, seed=2, occlusion="ar", size=SIZE, textures=textures)
    assert set(summary["categories"]) <= set(AR_OCCLUDERS)
    _, rows = read_ground_truth(tmp_path)
    assert all(float(row["occluded_fraction"]) > 0.0 for row in rows)


@pytest.mark.parametrize("category", sorted(OCCLUDERS))
def test_occluders_land_on_the_face(category: str, renderer: FaceRenderer, textures: TextureBank) -> None:
    with torch.no_grad():
        out = renderer(renderer.layout.zeros(1, dtype=RENDER_DTYPE))
    face = out.mask[0, 0].numpy() > 0.5
    landmarks = out.landmarks[0].float().numpy()
    hits = 0
    for seed in range(4):
        layer = draw_occluder(category, landmarks, SIZE, np.random.default_rng(seed), textures)
        assert layer.rgb.shape == (SIZE, SIZE, 3) and layer.alpha.shape == (SIZE, SIZE)
        assert 0.0 <= layer.alpha.min() and layer.alpha.max() <= 1.0 and 0.0 <= layer.rgb.min()
        assert layer.rgb.max() <= 1.0
        hits += ((layer.alpha > 0.5) & face).sum() > 0.01 * face.sum()
    assert hits >= 3, f"{category}: most occluders miss the face"
    if category in ("sunglasses", "scarf"):
        eye = np.round(landmarks[36:42].mean(0)).astype(int)
        chin = np.round(landmarks[8] - [0, 2]).astype(int)
        covered = {"sunglasses": eye, "scarf": chin}[category]
        free = {"sunglasses": chin, "scarf": eye}[category]
        assert layer.alpha[covered[1], covered[0]] > 0.5 and layer.alpha[free[1], free[0]] < 0.5


def test_families_are_disjoint_and_complete() -> None:
    assert set(AR_OCCLUDERS) == {"sunglasses", "scarf"}
    assert not set(AR_OCCLUDERS) & set(CELEBA_OCCLUDERS)
    assert {"hand", "microphone", "cup", "hat", "hair", "polygon"} <= set(CELEBA_OCCLUDERS)


def test_cli_rejects_bad_input_in_one_line(demo_bfm_h5: Path, tmp_path: Path, capsys: pytest.CaptureFixture
                                           ) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(main, ["--bfm", str(demo_bfm_h5), "--out", str(tmp_path), "--num", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--num" in err and "\n" not in err
    (tmp_path / "Dataset").mkdir()
    (tmp_path / "Dataset" / "00000.png").write_bytes(b"old")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(main, ["--bfm", str(demo_bfm_h5), "--out", str(tmp_path), "--num", "1", "--size", "32"])
    assert exit_info.value.code == 2 and "did not write" in capsys.readouterr().err  # not its own: never replaced
