"""Image root, landmark CSV, image I/O and FaceDataset."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from utils.data.datasets import FaceDataset, collate_faces, gt_mask_path, scale_landmarks
from utils.data.image_io import read_image_rgb, read_mask, write_image_rgb, write_mask
from utils.data.image_root import ImageRoot
from utils.errors import DataError
from utils.landmarks_csv import LandmarkCSVError, read_landmarks_csv, write_landmarks_csv


def _landmarks(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.uniform(10, size - 10, size=(68, 2)).astype(np.float32)


def _csv_line(name: str, points: np.ndarray, fmt: str = "{:.2f}") -> str:
    return ",".join([name] + [fmt.format(v) for v in points.reshape(-1)])


def _make_root(tmp_path: Path, n: int = 4, size: int = 32, split: str = "train", masks: tuple[int, ...] = ()) -> Path:
    """IMAGE_ROOT with n random PNG images, a CSV for `split`, and GT masks for the listed indices."""
    rng = np.random.default_rng(0)
    root = tmp_path / "image_root"
    rows = []
    for i in range(n):
        image = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        write_image_rgb(root / "Dataset" / f"face_{i}.png", image)
        if i in masks:
            mask = np.zeros((size, size), np.float32)
            mask[: size // 2] = 1.0
            write_mask(root / "Dataset" / f"face_{i}_visible_skin_mask.png", mask)
        rows.append((f"face_{i}.png", _landmarks(rng, size)))
    write_landmarks_csv(root / f"{split}_landmarks_3D.csv", rows)
    return root


# ---------------------------------------------------------------- CSV parsing


def test_csv_reads_ints_and_floats_and_skips_blank_lines(tmp_path):
    pts = np.arange(136, dtype=np.float32).reshape(68, 2)
    path = tmp_path / "train_landmarks_3D.csv"
    path.write_text(_csv_line("a.png", pts, "{:.0f}") + "\n\n" + _csv_line("sub/b.jpg", pts + 0.25) + "\n")
    rows = read_landmarks_csv(path)
    assert [name for name, _ in rows] == ["a.png", "sub/b.jpg"]
    assert rows[0][1].dtype == np.float32 and rows[0][1].shape == (68, 2)
    np.testing.assert_array_equal(rows[0][1], pts)
    np.testing.assert_allclose(rows[1][1], pts + 0.25)
    assert rows[0][1][3, 1] == 7.0  # interleaved x then y: point 3 -> fields x3=6, y3=7


def test_csv_write_read_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    rows = [("x.png", _landmarks(rng, 224)), ("y.png", _landmarks(rng, 224))]
    write_landmarks_csv(tmp_path / "out" / "all_landmarks_3D.csv", rows)
    back = read_landmarks_csv(tmp_path / "out" / "all_landmarks_3D.csv")
    assert [n for n, _ in back] == ["x.png", "y.png"]
    for (_, a), (_, b) in zip(rows, back):
        np.testing.assert_allclose(a, b, atol=5e-4)


GOOD = _csv_line("ok.png", np.ones((68, 2)))


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        (",".join(GOOD.split(",")[:-2]), "expected 137 fields (filename + 136 numbers), found 135"),
        (GOOD.replace("ok.png,1.00", "ok.png,abc", 1), "field 2 (x0) is not a number: 'abc'"),
        (GOOD.rsplit(",", 1)[0] + ",nan", "field 137 (y67) is not finite"),
        (GOOD.rsplit(",", 1)[0] + ",inf", "is not finite"),
        (GOOD.replace("ok.png", " ", 1), "empty filename"),
    ],
)
def test_csv_bad_row_names_file_line_and_reason(tmp_path, bad_line, reason):
    path = tmp_path / "train_landmarks_3D.csv"
    path.write_text("\n".join([GOOD, GOOD, "", bad_line, GOOD]) + "\n")
    with pytest.raises(LandmarkCSVError) as info:
        read_landmarks_csv(path)
    message = str(info.value)
    assert "train_landmarks_3D.csv line 4:" in message
    assert reason in message


def test_csv_header_row_gets_a_hint(tmp_path):
    path = tmp_path / "val_landmarks_3D.csv"
    header = ",".join(["filename"] + [f"{a}{i}" for i in range(68) for a in "xy"])
    path.write_text(header + "\n" + GOOD + "\n")
    with pytest.raises(LandmarkCSVError, match=r"val_landmarks_3D.csv line 1: .*not a number.*header"):
        read_landmarks_csv(path)


def test_csv_empty_and_missing(tmp_path):
    empty = tmp_path / "test_landmarks_3D.csv"
    empty.write_text("\n  \n")
    with pytest.raises(LandmarkCSVError, match="test_landmarks_3D.csv: no rows"):
        read_landmarks_csv(empty)
    assert read_landmarks_csv(empty, allow_empty=True) == []
    with pytest.raises(LandmarkCSVError, match="not found.*nope.csv"):
        read_landmarks_csv(tmp_path / "nope.csv")


def test_csv_missing_image_reports_line(tmp_path):
    (tmp_path / "Dataset").mkdir()
    write_image_rgb(tmp_path / "Dataset" / "ok.png", np.zeros((4, 4, 3), np.uint8))
    path = tmp_path / "train_landmarks_3D.csv"
    path.write_text("\n".join([GOOD, GOOD.replace("ok.png", "gone.png")]) + "\n")
    assert len(read_landmarks_csv(path)) == 2
    expected = r"train_landmarks_3D.csv: 1 image file\(s\) not found .*line 2: 'gone.png'"
    with pytest.raises(LandmarkCSVError, match=expected):
        read_landmarks_csv(path, image_dir=tmp_path / "Dataset")


# ---------------------------------------------------------------- image root


@pytest.mark.parametrize("suffix", ["", "/", "/Dataset", "/Dataset/"])
def test_image_root_accepts_root_and_dataset_dir(tmp_path, suffix):
    root = _make_root(tmp_path)
    image_root = ImageRoot(str(root) + suffix)
    assert image_root.root == root
    assert image_root.dataset_dir == root / "Dataset"
    assert image_root.csv("train") == root / "train_landmarks_3D.csv"
    assert image_root.exists("train") and not image_root.exists("val")
    assert len(FaceDataset(str(root) + suffix, "train", image_size=16)) == 4


def test_image_root_g2_names_and_bad_split(tmp_path):
    (tmp_path / "Dataset").mkdir()
    (tmp_path / "val_landmarks.csv").write_text(GOOD + "\n")
    image_root = ImageRoot(tmp_path)
    assert image_root.csv("val") == tmp_path / "val_landmarks.csv"
    assert image_root.csv("test") == tmp_path / "test_landmarks_3D.csv"
    (tmp_path / "val_landmarks_3D.csv").write_text(GOOD + "\n")
    assert image_root.csv("val") == tmp_path / "val_landmarks_3D.csv"
    with pytest.raises(DataError, match="unknown split 'training'"):
        image_root.csv("training")


def test_image_root_new_folder_defaults(tmp_path):
    image_root = ImageRoot(tmp_path / "fresh")
    assert image_root.dataset_dir == tmp_path / "fresh" / "Dataset"
    assert not image_root.exists("all")


# ---------------------------------------------------------------- image I/O


def test_image_io_round_trip_and_rgb_order(tmp_path):
    image = np.zeros((5, 7, 3), np.uint8)
    image[..., 0] = 200  # red
    write_image_rgb(tmp_path / "red.png", image)
    back = read_image_rgb(tmp_path / "red.png")
    assert back.shape == (5, 7, 3) and back.dtype == np.uint8
    assert back[0, 0].tolist() == [200, 0, 0]
    assert cv2.imread(str(tmp_path / "red.png"))[0, 0].tolist() == [0, 0, 200]  # BGR on disk
    write_image_rgb(tmp_path / "t.png", torch.tensor([0.0, 0.5, 1.0]).view(3, 1, 1).expand(3, 2, 2))
    assert read_image_rgb(tmp_path / "t.png")[1, 1].tolist() == [0, 128, 255]


def test_read_image_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="not found: .*missing.png"):
        read_image_rgb(tmp_path / "missing.png")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(DataError, match="cannot decode .*corrupt.jpg"):
        read_image_rgb(tmp_path / "corrupt.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match="empty.png"):
        read_mask(tmp_path / "empty.png")


def test_mask_write_read_binary(tmp_path):
    soft = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    write_mask(tmp_path / "m.png", soft)
    on_disk = cv2.imread(str(tmp_path / "m.png"), cv2.IMREAD_UNCHANGED)
    assert on_disk.dtype == np.uint8 and set(np.unique(on_disk)) == {0, 255}
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), (soft >= 0.5).astype(np.float32))
    colour = np.zeros((2, 2, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)  # red channel (channel 0 in RGB) set
    colour[1, 1] = (0, 0, 255)  # only blue: not part of the mask
    write_image_rgb(tmp_path / "c.png", colour)
    np.testing.assert_array_equal(read_mask(tmp_path / "c.png"), [[1, 0], [0, 0]])
    with pytest.raises(DataError, match="png"):
        write_mask(tmp_path / "m.jpg", soft)


# ---------------------------------------------------------------- FaceDataset


def test_dataset_item_shapes_and_ranges(tmp_path):
    dataset = FaceDataset(_make_root(tmp_path, size=40), "train", image_size=32)
    item = dataset[2]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["landmarks"].shape == (68, 2) and item["index"] == 2
    assert dataset.filenames == [f"face_{i}.png" for i in range(4)] and dataset.split == "train"
    assert "filename" not in item and "gt_mask" not in item


def test_landmarks_follow_a_448_to_224_resize(tmp_path):
    """Bright 4x4 blocks drawn at the landmark positions of a 448 image land on the scaled landmarks."""
    image = np.zeros((448, 448, 3), np.uint8)
    points = np.array([[100.5, 60.5], [300.5, 200.5], [51.5, 401.5]], dtype=np.float32)
    for x, y in points:
        image[int(y) - 1 : int(y) + 3, int(x) - 1 : int(x) + 3] = 255  # block centred at (x, y)
    landmarks = np.zeros((68, 2), np.float32)
    landmarks[:3] = points
    root = tmp_path / "r"
    write_image_rgb(root / "Dataset" / "big.png", image)
    write_landmarks_csv(root / "test_landmarks_3D.csv", [("big.png", landmarks)])
    item = FaceDataset(root, "test", image_size=224)[0]
    grey = item["image"][0].numpy()
    for k, (x, y) in enumerate(item["landmarks"][:3].numpy()):
        window = grey[int(y) - 3 : int(y) + 5, int(x) - 3 : int(x) + 5]
        rows, cols = np.mgrid[int(y) - 3 : int(y) + 5, int(x) - 3 : int(x) + 5]
        centroid = np.array([(cols * window).sum(), (rows * window).sum()]) / window.sum()
        np.testing.assert_allclose(centroid, [x, y], atol=0.05, err_msg=f"point {k}")
        np.testing.assert_allclose([x, y], (points[k] + 0.5) / 2 - 0.5)


def test_scale_landmarks_non_square():
    out = scale_landmarks(np.array([[-0.5, -0.5], [399.5, 99.5]]), (100, 400), (50, 50))
    np.testing.assert_allclose(out, [[-0.5, -0.5], [49.5, 49.5]])


def test_dataset_enlarges_small_images(tmp_path):
    item = FaceDataset(_make_root(tmp_path, size=20), "train", image_size=64)[0]
    assert item["image"].shape == (3, 64, 64)


def test_dataset_errors_before_training(tmp_path):
    root = _make_root(tmp_path, n=3)
    with pytest.raises(DataError, match=r"val landmark CSV not found: .*val_landmarks_3D.csv.*detect_landmarks"):
        FaceDataset(root, "val")
    (root / "test_landmarks_3D.csv").write_text("\n")
    with pytest.raises(DataError, match=r"test_landmarks_3D.csv has no rows: the test split is empty"):
        FaceDataset(root, "test")
    (root / "Dataset" / "face_1.png").unlink()
    with pytest.raises(LandmarkCSVError, match=r"train_landmarks_3D.csv: .*line 2: 'face_1.png'"):
        FaceDataset(root, "train")


def test_dataset_corrupt_image_raises_with_file_name(tmp_path):
    root = _make_root(tmp_path, n=2)
    (root / "Dataset" / "face_1.png").write_bytes(b"not a png")
    dataset = FaceDataset(root, "train", image_size=16)
    dataset[0]
    with pytest.raises(DataError, match="face_1.png"):
        dataset[1]


def test_test_mode_gt_masks_and_mixed_collate(tmp_path):
    root = _make_root(tmp_path, n=3, split="test", masks=(0, 2))
    dataset = FaceDataset(root, "test", image_size=16, test_mode=True)
    items = [dataset[i] for i in range(3)]
    assert items[0]["filename"] == "face_0.png" and items[1]["gt_mask"] is None
    mask = items[0]["gt_mask"]
    assert mask.shape == (1, 16, 16) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask[0, :8].min() == 1.0 and mask[0, 8:].max() == 0.0
    batch = collate_faces(items)
    assert batch["image"].shape == (3, 3, 16, 16) and batch["landmarks"].shape == (3, 68, 2)
    assert batch["index"].tolist() == [0, 1, 2] and batch["filename"] == ["face_0.png", "face_1.png", "face_2.png"]
    assert batch["has_gt_mask"].tolist() == [True, False, True]
    assert batch["gt_mask"].shape == (3, 1, 16, 16) and batch["gt_mask"][1].abs().sum() == 0
    torch.testing.assert_close(batch["gt_mask"][2], items[2]["gt_mask"])
    assert gt_mask_path(Path("a/b/X.jpg")) == Path("a/b/X_visible_skin_mask.png")


def test_dataloader_with_two_workers(tmp_path):
    dataset = FaceDataset(_make_root(tmp_path, n=6, split="test", masks=(1,)), "test", image_size=16, test_mode=True)
    loader = DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collate_faces)
    batches = list(loader)
    assert [b["index"].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5]]
    assert batches[0]["has_gt_mask"].tolist() == [False, True, False]
    torch.testing.assert_close(batches[1]["image"][0], dataset[3]["image"])
