"""Rules written once and used everywhere: the five alignment points, the split, the resize rule, the GT-mask pair,
atomic writes, the SH basis of the synthetic light, running means of loss terms, and the dependency direction."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from models import arcface
from models.landmarks68 import FIVE_POINT_GROUPS, N_LANDMARKS, five_points
from models.shading import sh_basis
from utils.atomic_write import atomic_copy, atomic_write
from utils.cli import repo_root
from utils.data.image_io import read_image_rgb, read_mask, resize_image, resize_mask
from utils.data.image_root import ImageRoot, gt_mask_path, split_indices
from utils.prepare import detect_landmarks
from utils.prepare.gt_writer import write_gt_pair
from utils.synthetic import faces
from utils.training.loop import RunningMean, validate

# ----- the five alignment points (G2: eye centres are the means of the eye corners) -------------------------------


def _landmarks(seed: int = 0) -> np.ndarray:
    """68 points whose eyelid points (37, 38, 40, 41) pull the six-point eye means away from the corner means."""
    points = np.random.default_rng(seed).uniform(20, 80, size=(68, 2))
    points[[37, 38, 43, 44], 1] -= 15.0  # upper lids far up, lower lids only a little down
    points[[40, 41, 46, 47], 1] += 2.0
    return points


def test_five_points_are_g2s_and_shared_by_numpy_and_torch():
    points = _landmarks()
    five = five_points(points)
    expected = np.stack([(points[36] + points[39]) / 2, (points[42] + points[45]) / 2, points[30], points[48],
                         points[54]])
    np.testing.assert_allclose(five, expected)
    assert not np.allclose(five[0], points[36:42].mean(0))  # not the six-point mean (the code before G2's)
    batch = torch.tensor(np.stack([points, _landmarks(1)]), requires_grad=True)
    torch.testing.assert_close(five_points(batch)[0], torch.from_numpy(expected))
    five_points(batch).sum().backward()
    assert batch.grad[0, 37].abs().sum() == 0 and batch.grad[0, 36].abs().sum() > 0
    assert detect_landmarks.five_points is five_points and N_LANDMARKS == 68 and len(FIVE_POINT_GROUPS) == 5
    with pytest.raises(ValueError, match="68, 2"):
        five_points(points[:60])


def test_arcface_warp_puts_the_eye_corner_means_on_the_template():
    """Landmarks made from a known similarity of the ArcFace template, with the eye CORNERS centred on the eye
    points and the eyelids pulled up: the warp must recover that similarity exactly."""
    template = torch.tensor(arcface.ARCFACE_TEMPLATE, dtype=torch.float64)
    angle, scale, shift = 0.3, 1.7, torch.tensor([20.0, 35.0], dtype=torch.float64)
    rot = scale * torch.tensor([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = template @ rot.T + shift  # the five points in the image
    lm = torch.from_numpy(_landmarks()) + 100.0
    for eye, (outer, inner) in enumerate(((36, 39), (42, 45))):
        lm[outer], lm[inner] = points[eye] - torch.tensor([6.0, 1.0]), points[eye] + torch.tensor([6.0, 1.0])
    lm[30], lm[48], lm[54] = points[2], points[3], points[4]
    A = arcface.similarity_to_template(arcface.alignment_points(lm[None]), template)[0]
    torch.testing.assert_close(points @ A[:, :2].T + A[:, 2], template)
    five = template[None]
    assert torch.equal(arcface.alignment_points(five), five)  # (B, 5, 2) passes through


# ----- the train / val / test split -------------------------------------------------------------------------------

@pytest.mark.parametrize("n, fractions, counts", [
    (20, (0.6, 0.25, 0.15), (12, 5, 3)), (10, (0.8, 0.1, 0.1), (8, 1, 1)), (3, (0.8, 0.1, 0.1), (1, 1, 1)),
    (2, (0.8, 0.1, 0.1), (2, 0, 0)), (7, (0.0, 0.0, 1.0), (0, 0, 7)), (5, (0.0, 0.5, 0.5), (0, 2, 3)),
])
def test_split_rule(n, fractions, counts):
    splits = split_indices(n, fractions, seed=3)
    assert tuple(len(splits[s]) for s in ("train", "val", "test")) == counts
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == list(range(n)) == splits["all"]
    assert all(splits[s] == sorted(splits[s]) for s in ("train", "val", "test"))
    assert splits == split_indices(n, fractions, seed=3)


def test_synthetic_benchmark_and_detect_landmarks_split_alike():
    rows = [f"img{i}.png" for i in range(37)]
    by_rows = detect_landmarks.split_rows(rows, faces.SPLIT_FRACTIONS, seed=5)
    by_ids = faces.split_ids(37, seed=5)
    assert {s: [rows[i] for i in ids] for s, ids in by_ids.items()} == by_rows
    assert by_ids != faces.split_ids(37, seed=6)


# ----- resizing and the GT-mask pair ------------------------------------------------------------------------------

def test_resize_rule_area_when_shrinking_else_bilinear():
    image = np.random.default_rng(0).integers(0, 256, size=(40, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_image(image, 20, 15), cv2.resize(image, (15, 20),
                                                                          interpolation=cv2.INTER_AREA))
    for height, width in ((80, 60), (20, 60)):  # enlarging, or enlarging one axis: bilinear
        np.testing.assert_array_equal(resize_image(image, height, width),
                                      cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR))
    assert resize_image(image, 40, 30) is image
    mask = np.zeros((40, 30), np.float32)
    mask[10:30, 5:20] = 1.0
    small = resize_mask(mask, 20, 15)
    assert set(np.unique(small)) <= {0.0, 1.0} and small[5:15, 3:10].min() == 1.0 and small[:4].max() == 0.0


@pytest.mark.parametrize("size", [None, 16])
def test_gt_pair_resizes_image_and_mask_together(tmp_path, size):
    image = np.zeros((48, 48, 3), np.uint8)
    image[8:40, 12:36] = 200
    mask = np.zeros((24, 24), np.float32)  # a mask at half the image size (CelebAMask-HQ labels are 512 for 1024)
    mask[4:20, 6:18] = 1.0
    root = ImageRoot(tmp_path / "root")
    assert write_gt_pair(root, "face", image, mask, size) == "face.png"
    side = size or 48
    written, written_mask = read_image_rgb(root.dataset_dir / "face.png"), read_mask(gt_mask_path(
        root.dataset_dir / "face.png"))
    assert written.shape == (side, side, 3) and written_mask.shape == (side, side)
    np.testing.assert_array_equal(written_mask, (written[:, :, 0] > 100).astype(np.float32))


# ----- atomic writes ----------------------------------------------------------------------------------------------

def test_atomic_write_replaces_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "sub" / "list.csv"
    with atomic_write(path, "w", newline="") as fh:
        fh.write("old\n")
    with pytest.raises(RuntimeError), atomic_write(path, "w") as fh:
        fh.write("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old\n" and [p.name for p in path.parent.iterdir()] == ["list.csv"]
    with atomic_write(path) as fh:
        fh.write(b"new\n")
    assert atomic_copy(path, tmp_path / "copy.csv").read_bytes() == b"new\n"
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(path, "a"):
            pass


# ----- the synthetic light uses the renderer's SH basis -----------------------------------------------------------

def test_synthetic_band1_light_gives_n_dot_l_irradiance():
    y00, band1 = faces._sh_bands01()
    assert y00 == pytest.approx(1.0 / np.sqrt(4.0 * np.pi))
    rng = np.random.default_rng(0)
    light, normals = rng.normal(size=3), rng.normal(size=(10, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    basis = sh_basis(torch.from_numpy(normals)[None])[0].numpy()  # (10, 9)
    np.testing.assert_allclose(basis[:, 1:4] @ (band1 @ light), normals @ light, atol=1e-12)


# ----- loss terms averaged per term -------------------------------------------------------------------------------

def test_running_mean_counts_each_term_over_the_steps_that_report_it():
    running = RunningMean()
    running.add({"total": 1.0, "binary": torch.tensor(4.0), "rec": None})  # a UNet step
    running.add({"total": 3.0, "rec": torch.tensor(2.0)})  # a MoFA step
    running.add({"total": 5.0, "rec": 4.0})
    assert running.mean() == {"total": 3.0, "binary": 4.0, "rec": 3.0}
    running.reset()
    assert running.mean() == {}


def test_validate_weights_batches_by_their_image_count():
    batches = [{"filename": ["a", "b", "c", "d", "e"], "index": torch.arange(3)},
               {"filename": ["f"], "index": torch.arange(1)}]
    means = validate(lambda b: (torch.tensor(float(len(b["index"]))), {"x": torch.tensor(float(b["index"][0]))}),
                     batches)
    assert means == {"total": pytest.approx((3 * 3 + 1 * 1) / 4), "x": 0.0}


# ----- dependency direction ---------------------------------------------------------------------------------------

def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_models_never_import_utils_and_utils_never_import_tests():
    root = repo_root()
    for path in (root / "models").glob("*.py"):
        assert not {n for n in _imports(path) if n.split(".")[0] in ("utils", "tests")}, path
    for path in (root / "utils").rglob("*.py"):
        assert not {n for n in _imports(path) if n.split(".")[0] == "tests"}, path
        assert "sys.path" not in path.read_text(), f"{path} edits sys.path"


@pytest.mark.parametrize("modules", [
    "reconstruct",
    "tests.evaluate_segmentation, utils.evaluation.command, utils.evaluation.evaluate, utils.evaluation.scoring, "
    "utils.evaluation.stages, utils.evaluation.report, utils.evaluation.reconstruction",
])
def test_readers_of_the_benchmark_import_no_generator(modules):
    """reconstruct.py and the evaluation read the synthetic benchmark's files through `utils.data.benchmark_files`:
    they import no module of utils/synthetic (the scene generator) nor the AR ground-truth builder, transitively."""
    code = f"import sys, {modules}; print('\\n'.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=repo_root(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = done.stdout.split()
    assert "utils.data.benchmark_files" in loaded or modules == "reconstruct"
    forbidden = [m for m in loaded if m.startswith("utils.synthetic") or m == "utils.prepare.ar_gt"]
    assert not forbidden, f"{modules} imports {forbidden}"


def test_the_writers_use_the_benchmark_contract():
    from utils.data import benchmark_files
    from utils.prepare import ar_gt
    from utils.synthetic import appearance

    assert appearance.APPEARANCE_ITEMS is benchmark_files.APPEARANCE_ITEMS
    assert ar_gt.ar_category is benchmark_files.ar_category
    assert faces.RENDER_DTYPE is benchmark_files.RENDER_DTYPE
