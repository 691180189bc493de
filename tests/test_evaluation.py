"""Evaluation: mask scores on hand-made masks, stage loading, and tests/evaluate_segmentation.py end to end.

The end-to-end data: a resnet18 MoFA at 64 px on the tiny face model, whose zero-initialised head predicts the mean
face, and images that ARE that render with coloured squares pasted on as occluders. So the Step-2 inlier mask of
every image equals its GT mask (render minus squares) and the true landmarks and shape are known exactly.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.face_model import FaceModel
from models.layout import CoeffLayout
from tests.evaluate_segmentation import main
from tests.helpers import assert_close
from utils import cli
from utils.data.benchmark_files import GroundTruthTable, read_ground_truth
from utils.data.datasets import FaceDataset
from utils.data.image_io import write_image_rgb, write_mask
from utils.errors import DataError
from utils.evaluation.command import run_evaluation
from utils.evaluation.evaluate import EvalOptions, evaluate_split
from utils.evaluation.metrics import mask_metrics
from utils.evaluation.reconstruction import true_landmarks
from utils.evaluation.report import format_markdown
from utils.evaluation.scoring import COUNT_NAMES, image_scores, summarise_rows, with_occluder
from utils.evaluation.stages import load_stage, predict_masks
from utils.landmarks_csv import write_landmarks_csv
from utils.training.builders import FINAL_NAME, build_mofa, build_unet, load_networks, step_dir
from utils.training.checkpoint import CheckpointError, save_training_state

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
UNET_WIDTH = 4
# name -> (occluder square (row0, row1, col0, col1) or None, RGB of the square, category, has GT mask, shape_0,
#          landmark x offset in the CSV)
IMAGES = {
    "a.png": ((20, 34, 22, 40), (0.0, 0.0, 1.0), "square", True, 0.0, 0.0),
    "b.png": ((36, 48, 18, 30), (0.0, 1.0, 0.0), "square", True, 1.5, 2.0),
    "c.png": (None, None, "none", True, 0.0, 0.0),
    "d.png": ((10, 20, 10, 20), (1.0, 0.0, 1.0), "none", False, 0.0, 0.0),
}


# ----- fixtures: checkpoints and an image root, shared with tests/test_mesh_io.py ---------------------------------

def tiny_spec(face_model: FaceModel) -> dict:
    """The model spec of a small Step-4-style run on ``face_model``: resnet18, 64 px, UNet width 4."""
    layout = CoeffLayout()
    return {"encoder": "resnet18", "image_size": SIZE, "camera": "g2",
            "layout": {"n_shape": layout.n_shape, "n_exp": layout.n_exp, "n_tex": layout.n_tex},
            "unet_width": UNET_WIDTH, "face_model": face_model.config()}


UNET_BIAS = {3: 10.0, 4: -10.0}
"""The head bias of each step's UNet: Step 3's calls every pixel visible face, Step 4's every pixel occluder (the
logits are 5 (w x + b): a bias of 10 outweighs the random weights), so a stage that loads the wrong UNet, or
ignores it, shows."""


def make_checkpoints(save_root: Path, bfm: Path) -> tuple[FaceModel, dict]:
    """Write Step-1, Step-3 and Step-4 ``final.pt`` files under ``save_root`` with the steps' payloads; the two
    UNets differ (`UNET_BIAS`)."""
    face_model = FaceModel.from_h5(bfm, CoeffLayout())
    spec = tiny_spec(face_model)
    mofa, unets = build_mofa(spec, face_model), {}
    for step, bias in UNET_BIAS.items():
        unets[step] = build_unet(spec)
        with torch.no_grad():
            unets[step].head.bias.fill_(bias)
    for step, models, model_spec in ((1, {"encoder": mofa.encoder}, spec),
                                     (3, {"unet": unets[3]}, {"unet_width": UNET_WIDTH}),
                                     (4, {"encoder": mofa.encoder, "unet": unets[4]}, spec)):
        written = save_training_state(step_dir(save_root, step), 1, models, config={}, extra={"model": model_spec},
                                      keep_latest=False)
        written.replace(written.with_name(FINAL_NAME))  # what mark_final leaves, without copying 45 MB twice
    return face_model, spec


def mean_face_render(face_model: FaceModel, spec: dict):
    """The render of all-zero coefficients (what the untrained encoder predicts)."""
    mofa = build_mofa(spec, face_model).eval()
    with torch.no_grad():
        return mofa.renderer(mofa.layout.zeros(1))


def make_image_root(root: Path, face_model: FaceModel, spec: dict) -> dict:
    """Write IMAGES (render + occluders), GT masks, the test CSV and ground_truth.csv; returns expectations."""
    out = mean_face_render(face_model, spec)
    render, region, landmarks = out.image[0], out.mask[0], out.landmarks[0].numpy()
    rows, truth, gts = [], [], {}
    for name, (square, colour, category, has_gt, shape0, dx) in IMAGES.items():
        image, gt = render.clone(), region.clone()
        visible = np.ones(68, dtype=bool)
        if square is not None:
            r0, r1, c0, c1 = square
            image[:, r0:r1, c0:c1] = torch.tensor(colour)[:, None, None]
            gt[:, r0:r1, c0:c1] = 0
            x, y = np.round(landmarks[:, 0]), np.round(landmarks[:, 1])
            visible = ~((y >= r0) & (y < r1) & (x >= c0) & (x < c1))
        write_image_rgb(root / "Dataset" / name, image.clamp(0, 1))
        if has_gt:
            write_mask(root / "Dataset" / name.replace(".png", "_visible_skin_mask.png"), gt)
            gts[name] = gt
        rows.append((name, landmarks + np.array([dx, 0.0])))
        truth.append([name, "test", category, "".join("1" if v else "0" for v in visible),
                      *[shape0 if k == 0 else 0.0 for k in range(CoeffLayout().n_shape)]])
    write_landmarks_csv(root / "test_landmarks_3D.csv", rows)
    with (root / "ground_truth.csv").open("w", newline="") as fh:
        header = ["filename", "split", "category", "visible_landmarks"]
        csv.writer(fh).writerows([header + [f"shape_{k}" for k in range(CoeffLayout().n_shape)], *truth])
    return {"region_area": float(region.sum()), "gts": gts}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bfm_h5) -> dict:
    base = tmp_path_factory.mktemp("evaluation")
    face_model, spec = make_checkpoints(base / "save", tiny_bfm_h5)
    expected = make_image_root(base / "root", face_model, spec)
    return {"base": base, "save_root": base / "save", "img_path": base / "root", "bfm": tiny_bfm_h5,
            "face_model": face_model, "spec": spec, **expected}


def run_eval(setup: dict, out: Path, *extra: str) -> dict:
    return run_evaluation(["--img_path", str(setup["img_path"]), "--save_root", str(setup["save_root"]),
                     "--bfm", str(setup["bfm"]), "--device", "cpu", "--out", str(out), *extra])


def read_rows(out: Path) -> dict[str, dict]:
    with (out / "per_image.csv").open() as fh:
        return {r["filename"]: r for r in csv.DictReader(fh)}


# ----- hand-made masks --------------------------------------------------------------------------------------------

def test_image_scores_count_inside_the_region_only():
    gt = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.float32)
    est = torch.tensor([[1, 0, 1, 0], [1, 0.6, 0, 0], [0.4, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.float32)
    region = torch.ones(4, 4)
    region[3] = 0  # the last row is outside the rendered face: its errors must not count
    s = image_scores(gt[None, None], est[None, None], region[None, None])
    assert [s[k].item() for k in ("tp", "fp", "tn", "fn")] == [6, 1, 3, 2]
    assert_close(s["iou"], [6 / 9])
    assert_close(s["accuracy"], [9 / 12])
    assert_close(s["precision"], [6 / 7])
    assert_close(s["recall"], [6 / 8])
    strict = image_scores(gt[None, None], est[None, None], region[None, None], threshold=0.7)
    assert [strict[k].item() for k in ("tp", "fn")] == [5, 3]  # the 0.6 pixel turns into a miss
    soft = image_scores(gt[None, None], est[None, None], region[None, None], soft=True)
    assert_close(soft["tp"], [1 + 1.6 + 3.4])  # sum of gt * est over the first three rows
    assert_close(soft["fn"], [1 + 0.4 + 0.6])  # sum of gt * (1 - est)


def scored(row: dict) -> dict:
    """A hand-made row with its metrics, and the all-face mask's counts and metrics (every pixel of the region called
    visible: the GT's visible pixels are tp, its occluder pixels fp) as `image_scores` writes them."""
    if not row["has_gt_mask"]:
        return row
    tp, fp, tn, fn = (row[c] for c in COUNT_NAMES)
    for prefix, counts in (("", (tp, fp, tn, fn)), ("all_face_", (tp + fn, fp + tn, 0.0, 0.0))):
        row.update({prefix + c: v for c, v in zip(COUNT_NAMES, counts)})
        row.update({prefix + k: v.item() for k, v in mask_metrics(*(torch.tensor([c]) for c in counts)).items()})
    return row


def test_summarise_rows_pools_counts_and_skips_images_without_gt():
    rows = [{"filename": "x-1.png", "category": "neutral", "has_gt_mask": True,
             "tp": 9.0, "fp": 1.0, "tn": 0.0, "fn": 0.0},
            {"filename": "x-8.png", "category": "sunglasses", "has_gt_mask": True,
             "tp": 1.0, "fp": 0.0, "tn": 0.0, "fn": 1.0},
            {"filename": "x-9.png", "category": "sunglasses", "has_gt_mask": False}]
    rows = [scored(r) for r in rows]
    s = summarise_rows(rows, "step4", "test")
    assert (s["n_images"], s["n_with_gt"]) == (3, 2)
    assert_close(s["paper_protocol"]["iou"]["mean"], (0.9 + 0.5) / 2)
    assert_close(s["pooled"]["iou"], 10 / 12)  # pooled: (9 + 1) / (10 + 1 + 1)
    assert set(s["per_category"]) == {"neutral", "sunglasses"}
    assert (s["per_category"]["sunglasses"]["n_images"], s["per_category"]["sunglasses"]["n_with_gt"]) == (2, 1)
    assert "reconstruction" not in s
    only_other = summarise_rows([{**rows[0], "category": "other"}], "step4", "test")
    assert only_other["per_category"] == {}


def test_ground_truth_table_parses_flags_and_shape(tmp_path):
    assert read_ground_truth(tmp_path) is None
    flags = "1" * 60 + "0" * 8
    (tmp_path / "ground_truth.csv").write_text(
        "filename,split,category,visible_landmarks,shape_0,shape_1\n"
        f"sub/a.png,test,hand,{flags},0.5,-1\nb.png,test,scarf,1 0 1,0,0\n")
    table = read_ground_truth(tmp_path)
    layout = CoeffLayout(n_shape=2, n_exp=1, n_tex=1)
    assert table.category("sub/a.png") == "hand" and table.category("a.png") == "hand"
    assert int(table.visible("sub/a.png").sum()) == 60
    assert_close(table.shape("sub/a.png", layout), [0.5, -1.0])
    assert table.shape("a.png", CoeffLayout()) is None  # too few shape columns for 80 coefficients
    assert table.row("missing.png") is None and table.visible("missing.png") is None
    with pytest.raises(DataError, match="visible_landmarks of b.png has 3 flags"):
        table.visible("b.png")
    assert isinstance(table, GroundTruthTable)


# ----- yardsticks: the all-face mask and the pooled occluder metrics, on hand-made masks --------------------------

def _yardstick_rows() -> list[dict]:
    """Three 4x4 images, region = the top three rows (12 px), 1 = visible face:
    a (hand): GT occluder (0,0) (0,1) (1,0); the estimate calls (0,0) (0,1) and the visible (2,3) occluder:
       tp 8, fp 1 (missed occluder), tn 2, fn 1 (false occluder);
    b (none): no GT occluder; the estimate calls (1,1) occluder: tp 11, fn 1 (left out of the occluder pool);
    c (cup): GT occluder rows 0-1 cols 0-2 (6 px), all found: tp 6, tn 6.
    Row 3 (outside the region) holds errors that must not count."""
    gt, est = torch.ones(3, 1, 4, 4), torch.ones(3, 1, 4, 4)
    region = torch.ones(3, 1, 4, 4)
    region[:, :, 3] = 0
    gt[0, 0, 0, 0] = gt[0, 0, 0, 1] = gt[0, 0, 1, 0] = 0
    est[0, 0, 0, 0] = est[0, 0, 0, 1] = est[0, 0, 2, 3] = 0
    est[1, 0, 1, 1] = 0
    gt[2, 0, :2, :3] = 0
    est[2, 0, :2, :3] = 0
    gt[:, :, 3], est[:, :, 3] = 0, 1  # outside the region: ignored
    scores = image_scores(gt, est, region)
    return [{"filename": name, "category": category, "has_gt_mask": True, **{k: float(v[i]) for k, v in scores.items()}}
            for i, (name, category) in enumerate((("a.png", "hand"), ("b.png", "none"), ("c.png", "cup")))]


def test_all_face_yardstick_scores_every_region_pixel_as_visible():
    rows = _yardstick_rows()
    a = rows[0]
    assert [a[k] for k in COUNT_NAMES] == [8, 1, 2, 1]
    assert [a["all_face_" + k] for k in COUNT_NAMES] == [9, 3, 0, 0]  # GT visible 9, GT occluder 3, all "visible"
    assert_close([a["all_face_iou"], a["all_face_accuracy"], a["all_face_precision"]], [0.75, 0.75, 0.75])
    assert (a["all_face_recall"], a["all_face_occluder_iou"]) == (1.0, 0.0)
    assert_close(a["all_face_f1"], 18 / 21)
    s = summarise_rows(rows, "step4", "test")
    ref = s["all_face"]
    assert_close(ref["paper_protocol"]["iou"]["mean"], (9 / 12 + 1.0 + 6 / 12) / 3)
    assert_close(ref["pooled"]["iou"], (9 + 12 + 6) / 36)
    assert ref["occluders"] == {"n_images": 2, "occluder_iou": 0.0, "occluder_recall": 0.0, "occluder_precision": 0.0}
    assert_close(s["per_category"]["hand"]["all_face"]["paper_protocol"]["iou"]["mean"], 0.75)


def test_occluder_metrics_pool_counts_over_the_images_with_a_gt_occluder():
    s = summarise_rows(_yardstick_rows(), "step4", "test")
    occ = s["occluders"]
    assert occ["n_images"] == 2  # b has no GT occluder: its false occluder pixel is left out
    assert_close([occ["occluder_iou"], occ["occluder_recall"], occ["occluder_precision"]],
                 [8 / 10, 8 / 9, 8 / 9])  # tn 2 + 6, fp 1, fn 1: pooled counts, not the mean of a's 0.5 and c's 1
    hand, cup, none = (s["per_category"][c]["occluders"] for c in ("hand", "cup", "none"))
    assert_close([hand["occluder_iou"], hand["occluder_recall"], hand["occluder_precision"]], [0.5, 2 / 3, 2 / 3])
    assert (cup["occluder_iou"], cup["occluder_recall"], cup["occluder_precision"]) == (1.0, 1.0, 1.0)
    assert none["n_images"] == 0 and np.isnan(none["occluder_iou"])
    assert_close(s["paper_protocol"]["occluder_iou"]["mean"], (0.5 + 0.0 + 1.0) / 3)  # the per-image metric stays
    text = format_markdown(s)
    assert "pooled over the 2 images with an occluder" in text and "| all-face | 0.0000 | 0.0000 | 0.0000 |" in text
    iou_line = next(line for line in text.splitlines() if line.startswith("| iou |"))
    assert iou_line.startswith("| iou | 0.9056 |") and iou_line.endswith("| 0.8929 | 0.7500 | 0.7500 |"), iou_line


def test_occluder_pool_takes_the_category_where_it_is_known():
    """A misfit puts GT-0 pixels (background, hair) inside the region of an unoccluded face: a 'none' (or AR
    'neutral') image is not an image with an occluder, whatever its GT says inside the region; an image of unknown
    category ('other') counts when its GT has occluder pixels there."""
    rows = _yardstick_rows()
    a, b, c = rows
    misfit = {**a, "filename": "d.png", "category": "none"}  # GT occluder pixels inside the region, category none
    unknown = {**a, "filename": "e.png", "category": "other"}
    unknown_clean = {**b, "filename": "f.png", "category": "other"}
    assert with_occluder([a, b, c, misfit, unknown, unknown_clean]) == [True, False, True, False, True, False]
    neutral = {**a, "filename": "m-001-1.bmp", "category": "neutral"}
    s = summarise_rows([a, b, c, misfit, neutral], "step4", "test")
    assert s["occluders"]["n_images"] == 2
    assert_close(s["occluders"]["occluder_iou"], 8 / 10)  # the misfit and neutral rows' counts are not pooled


# ----- models -----------------------------------------------------------------------------------------------------

def test_load_stage_rebuilds_each_stage(setup):
    device = torch.device("cpu")
    for stage, has_unet in (("step2", False), ("step3", True), ("step4", True)):
        mofa, unet, spec = load_stage(stage, setup["save_root"], setup["bfm"], device)
        assert (unet is not None) == has_unet and spec["image_size"] == SIZE
        assert not mofa.training and (unet is None or not unet.training)
    with pytest.raises(CheckpointError, match="Step4_UNet_MoFA_EM.py"):
        load_stage("step4", setup["base"] / "nowhere", setup["bfm"], device)
    with pytest.raises(DataError, match="--stage"):
        load_stage("step5", setup["save_root"], setup["bfm"], device)


def test_each_stage_masks_with_its_own_unet(setup):
    """Step 3's UNet calls everything visible, Step 4's everything occluder (`UNET_BIAS`): a stage that loads the other
    step's UNet, or returns the rendered face instead of the UNet's mask, fails here."""
    images = mean_face_render(setup["face_model"], setup["spec"]).image.clamp(0, 1)
    masks = {}
    for stage in ("step3", "step4"):
        mofa, unet, _ = load_stage(stage, setup["save_root"], setup["face_model"], torch.device("cpu"))
        est, region, _ = predict_masks(stage, mofa, unet, images)
        masks[stage] = est
        assert region.sum() == setup["region_area"] > 0
    assert torch.equal((masks["step3"] >= 0.5).float(), region)
    assert masks["step4"].max() < 0.5


def test_load_networks_is_step4s_loader(setup, caplog):
    """Step 4 starts from the Step-1 MoFA and the Step-3 UNet (two files); a Step-4 file holds both."""
    device, model = torch.device("cpu"), setup["face_model"]
    step1, step3, step4 = (step_dir(setup["save_root"], k) / FINAL_NAME for k in (1, 3, 4))
    nets = load_networks(step1, model, device, unet_path=step3, unet=True)
    assert nets.spec["unet_width"] == UNET_WIDTH and nets.unet.head.bias.item() == UNET_BIAS[3]
    assert (nets.mofa_path, nets.unet_path) == (step1, step3) and "encoder" in nets.mofa_payload["models"]
    assert not nets.mofa.training and not nets.unet.training
    assert load_networks(step4, model, device).unet.head.bias.item() == UNET_BIAS[4]
    assert load_networks(step1, model, device).unet is None  # a Step-1 file: no UNet, none asked for
    assert load_networks(step4, model, device, unet=False).unet is None
    with pytest.raises(CheckpointError, match="holds no UNet: pass a Step-4"):
        load_networks(step1, model, device, unet=True)
    with pytest.raises(CheckpointError, match="holds no UNet: pass a Step-3"):
        load_networks(step1, model, device, unet_path=step1, unet=True)
    with pytest.raises(CheckpointError, match="holds no MoFA encoder"):
        load_networks(step3, model, device)
    flags = argparse.Namespace(encoder="resnet50", image_size=SIZE, camera="g2", unet_width=64)
    with caplog.at_level("WARNING"):
        nets.announce(flags, "the Step-1 checkpoint", "the Step-3 checkpoint")
    assert f"--encoder resnet50 is ignored: using resnet18 from the Step-1 checkpoint {step1}" in caplog.text
    assert f"--unet_width 64 is ignored: using {UNET_WIDTH} from the Step-3 checkpoint {step3}" in caplog.text
    assert "--image_size" not in caplog.text


def test_predict_masks_step2_flags_occluders_inside_the_face(setup):
    mofa, _, _ = load_stage("step2", setup["save_root"], setup["face_model"], torch.device("cpu"))
    images = mean_face_render(setup["face_model"], setup["spec"]).image.clamp(0, 1)
    images[:, :, 20:34, 22:40] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]
    est, region, out = predict_masks("step2", mofa, None, images)
    expected = region.clone()
    expected[:, :, 20:34, 22:40] = 0
    assert torch.equal(est, expected)
    assert region.sum() == setup["region_area"] and out.image.shape == images.shape
    with pytest.raises(ValueError, match="needs a UNet"):
        predict_masks("step4", mofa, None, images)


def test_true_landmarks_render_the_true_coefficients(setup, tmp_path):
    mofa, _, _ = load_stage("step2", setup["save_root"], setup["face_model"], torch.device("cpu"))
    layout = mofa.layout
    columns = [f"{n}_{k}" for n, size in layout.sizes().items() for k in range(size)]
    coeffs = layout.zeros(1)
    coeffs[0, layout.slice("trans")] = torch.tensor([10.0, -5.0, 0.0])  # the face moves right and up
    with (tmp_path / "ground_truth.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([["filename", "category", *columns], ["x.png", "none", *coeffs[0].tolist()],
                                  ["y.png", "none"]])
    table = read_ground_truth(tmp_path)
    csv_landmarks = torch.zeros(2, 68, 2)
    ref = true_landmarks(mofa, csv_landmarks, ["x.png", "y.png"], table)
    with torch.no_grad():
        expected = mofa.renderer(coeffs).landmarks[0]
    assert_close(ref[0], expected, atol=1e-4)
    assert torch.equal(ref[1], csv_landmarks[1])  # no coefficients for y.png: the CSV's landmarks
    mean = mean_face_render(setup["face_model"], setup["spec"]).landmarks[0]
    assert (expected[:, 0] - mean[:, 0]).mean() > 0.1 and (expected[:, 1] - mean[:, 1]).mean() < -0.1


def test_reconstruction_is_skipped_for_another_face_model(setup, caplog):
    mofa, _, _ = load_stage("step2", setup["save_root"], setup["face_model"], torch.device("cpu"))
    table = read_ground_truth(setup["img_path"])
    other = GroundTruthTable(table.path, table.rows, {**setup["face_model"].config(), "n_vertices": 1})
    dataset = FaceDataset(setup["img_path"], "test", SIZE, test_mode=True)
    with caplog.at_level("WARNING"):
        rows = evaluate_split("step2", mofa, None, dataset, torch.device("cpu"), EvalOptions(), other)
    assert "another face model" in caplog.text and not any("vertex_mm" in r for r in rows)
    rows = evaluate_split("step2", mofa, None, dataset, torch.device("cpu"), EvalOptions(), table)
    assert all("vertex_mm" in r for r in rows) and rows[0]["category"] == "square"


# ----- the script -------------------------------------------------------------------------------------------------

def test_oracle_scores_gt_as_estimate_and_reconstruction_errors(setup, tmp_path):
    summary = run_eval(setup, tmp_path, "--stage", "step4", "--oracle")
    assert (summary["n_images"], summary["n_with_gt"]) == (4, 3)
    for metric in ("iou", "accuracy", "precision", "recall", "f1"):
        assert summary["paper_protocol"][metric]["mean"] == 1.0 and summary["pooled"][metric] == 1.0
    cats = summary["per_category"]
    assert (cats["square"]["n_with_gt"], cats["none"]["n_images"], cats["none"]["n_with_gt"]) == (2, 2, 1)
    rows = read_rows(tmp_path)
    assert rows["d.png"]["has_gt_mask"] == "False" and rows["d.png"]["iou"] == ""
    rec = {name: {k: float(r[k]) for k in ("landmark_px", "vertex_mm")}
           for name, r in rows.items()}
    assert rec["a.png"]["landmark_px"] < 1e-3 and rec["a.png"]["vertex_mm"] < 1e-3
    assert abs(rec["b.png"]["landmark_px"] - 2.0) < 1e-3  # the CSV landmarks of b are shifted by 2 px
    model = setup["face_model"]
    unaligned = (model.shape_basis[:, 0].view(-1, 3) * 1.5).norm(dim=1).mean().item()
    assert 0.05 < rec["b.png"]["vertex_mm"] <= unaligned + 1e-4
    assert rows["c.png"]["landmark_px_occluded"] == "" and float(rows["a.png"]["landmark_px_occluded"]) < 1e-3
    assert summary["reconstruction"]["n_images"] == 4
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["paper_protocol"]["iou"]["mean"] == 1.0 and saved["stage"] == "step4"
    assert "| iou |" in (tmp_path / "summary.md").read_text()


def test_step2_masks_match_gt_and_images_are_saved(setup, tmp_path):
    summary = run_eval(setup, tmp_path, "--stage", "step2", "--save_images")
    assert summary["paper_protocol"]["iou"]["mean"] == pytest.approx(1.0)
    for stem in ("a", "b", "c", "d"):
        for suffix in ("_org.png", "_result.png", "_estmask.png"):
            assert (tmp_path / "images" / f"{stem}.png{suffix}").is_file()  # named after the whole file name


def test_step4_counts_cover_exactly_the_rendered_face(setup, tmp_path):
    summary = run_eval(setup, tmp_path, "--stage", "step4", "--threshold", "0.3")
    rows = [r for r in read_rows(tmp_path).values() if r["has_gt_mask"] == "True"]
    for r in rows:
        assert sum(float(r[k]) for k in ("tp", "fp", "tn", "fn")) == setup["region_area"]
    ious = [float(r["iou"]) for r in rows]
    assert_close(summary["paper_protocol"]["iou"]["mean"], sum(ious) / len(ious))
    assert summary["settings"]["threshold"] == 0.3


def test_script_runs_from_another_directory(setup, tmp_path):
    out = tmp_path / "res"
    cmd = [sys.executable, str(REPO / "tests" / "evaluate_segmentation.py"), "--img_path", str(setup["img_path"]),
           "--save_root", str(setup["save_root"]), "--bfm", str(setup["bfm"]), "--device", "cpu",
           "--stage", "step3", "--out", "res"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "summary.json").read_text())["stage"] == "step3"
    assert "| iou |" in done.stdout


def test_missing_checkpoint_is_one_line_error(setup, tmp_path, capsys):
    argv = ["--img_path", str(setup["img_path"]), "--save_root", str(tmp_path / "empty"), "--bfm", str(setup["bfm"]),
            "--device", "cpu", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exc:
        cli.cli_main(main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "MoFA_UNet" in err and len(err.splitlines()) == 1


# ----- appearance breakdown and the fit oracle ------------------------------------------------------------------

def test_summarise_rows_counts_an_image_in_every_appearance_item():
    base = {"category": "none", "has_gt_mask": True, "tp": 1.0, "fp": 0.0, "tn": 0.0, "fn": 0.0}
    rows = [{**base, "filename": "a.png", "appearance": "beard+specular", "tp": 3.0, "fn": 1.0},
            {**base, "filename": "b.png", "appearance": "specular"},
            {**base, "filename": "c.png", "appearance": "none"}]
    rows = [scored(r) for r in rows]
    s = summarise_rows(rows, "fit_oracle", "test")
    assert list(s["per_appearance"]) == ["beard", "specular", "none"]
    assert s["per_appearance"]["specular"]["n_images"] == 2 and s["per_appearance"]["beard"]["n_images"] == 1
    assert_close(s["per_appearance"]["specular"]["paper_protocol"]["iou"]["mean"], (0.75 + 1.0) / 2)
    assert summarise_rows([{k: v for k, v in rows[0].items() if k != "appearance"}], "x", "y")["per_appearance"] == {}


@pytest.fixture(scope="module")
def synthetic_roots(tmp_path_factory, demo_bfm_h5) -> dict:
    """Three bare faces (no occluder, no appearance) and three with stubble and a cast shadow, 64 px."""
    from utils.synthetic.appearance import AppearanceConfig
    from utils.synthetic.faces import generate_dataset
    from utils.synthetic.occluders import TextureBank

    base = tmp_path_factory.mktemp("fit_oracle")
    textures = TextureBank.from_skimage(("coffee",))
    generate_dataset(demo_bfm_h5, base / "bare", 3, seed=1, occlusion="none", size=SIZE, textures=textures,
                     appearance="none")
    config = AppearanceConfig(plain_share=0.0, facial_hair=1.0, cast_shadow=1.0)
    generate_dataset(demo_bfm_h5, base / "items", 3, seed=1, occlusion="none", size=SIZE, textures=textures,
                     appearance_config=config)
    return {"bare": base / "bare", "items": base / "items", "bfm": demo_bfm_h5}


def run_fit_oracle(root: Path, bfm: Path, out: Path) -> dict:
    return run_evaluation(["--img_path", str(root), "--split", "all", "--bfm", str(bfm), "--device", "cpu",
                     "--stage", "fit_oracle", "--out", str(out), "--save_root", str(out / "no_checkpoints")])


def test_fit_oracle_is_perfect_on_bare_faces_and_not_on_appearance(synthetic_roots, tmp_path):
    bare = run_fit_oracle(synthetic_roots["bare"], synthetic_roots["bfm"], tmp_path / "bare")
    rows = read_rows(tmp_path / "bare")
    assert len(rows) == 3 and all(float(r["iou"]) == 1.0 for r in rows.values())
    assert bare["per_appearance"]["none"]["n_images"] == 3 and bare["settings"]["encoder"].startswith("none")
    items = run_fit_oracle(synthetic_roots["items"], synthetic_roots["bfm"], tmp_path / "items")
    rows = read_rows(tmp_path / "items")
    assert all("cast_shadow" in r["appearance"] for r in rows.values())
    assert all(float(r["iou"]) < 0.99 for r in rows.values()), "stubble and shadows left no outlier"
    assert all(float(r["precision"]) > 0.95 for r in rows.values()), "outliers outside the face?"
    assert "cast_shadow" in items["per_appearance"]
    assert "| appearance |" in (tmp_path / "items" / "summary.md").read_text()


def test_fit_oracle_needs_the_generators_face_model_and_ground_truth(synthetic_roots, setup, tmp_path, capsys):
    for root, bfm, message in ((synthetic_roots["bare"], setup["bfm"], "--bfm"),
                               (setup["img_path"], synthetic_roots["bfm"], "synthetic_config.json")):
        argv = ["--img_path", str(root), "--bfm", str(bfm), "--device", "cpu", "--stage", "fit_oracle",
                "--split", "all" if root == synthetic_roots["bare"] else "test", "--out", str(tmp_path / "o")]
        with pytest.raises(SystemExit) as exc:
            cli.cli_main(main, argv)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and message in err and len(err.splitlines()) == 1, err
