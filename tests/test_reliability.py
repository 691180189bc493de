"""Issue 9, item by item: no run overwrites, mixes or silently loses another; every bad input gets one line.

Every failure test runs the command-line entry point in-process (``cli_main``) and asserts the exit code 2, one
``error:`` line without a traceback, and that nothing written before changed (``snapshot``). Tiny settings: 32 px,
ResNet-18, a UNet of width 4, batches of 4, at most 5 steps.
"""
from __future__ import annotations

import csv
import errno
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import reconstruct
import Step1_Pretrain_MoFA as step1
import Step2_UNet_trainset_generation as step2
import Step3_Pretrain_Unet as step3
import Step4_UNet_MoFA_EM as step4
from models.face_model import FaceModel
from models.unet import UNet
from tests import evaluate_segmentation
from tests.helpers import tiny_bfm_arrays, write_bfm_h5
from utils import losses
from utils.cli import cli_main
from utils.data.datasets import FaceDataset
from utils.data.unet_trainset import write_list, write_sample
from utils.synthetic import faces
from utils.training.checkpoint import load_checkpoint, save_training_state
from utils.training.data_order import ResumableSampler

SIZE = 32
FAST = ["--batch_size", "4", "--log_every", "1", "--vis_every", "1000", "--eval_every", "1000", "--val_batches", "1"]


def common(root: Path, bfm: Path, save: Path) -> list[str]:
    return ["--img_path", str(root), "--bfm", str(bfm), "--save_root", str(save), "--device", "cpu", "--workers", "0",
            "--image_size", str(SIZE), "--encoder", "resnet18", "--unet_width", "4"]


def fails(capsys, main, argv: list[str]) -> str:
    """Run ``main`` as the command line does; assert exit 2 and one ``error:`` line (no traceback); return it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli_main(main, argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err[-2000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and sum(x.startswith("error:") for x in err.splitlines()) == 1, err[-2000:]
    return line


def snapshot(folder: Path) -> dict:
    """Every file and folder under ``folder`` with its size, mtime and inode: equal snapshots = nothing changed."""
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino)
            for p in [folder, *folder.rglob("*")]}


def clone(src: Path, dst: Path) -> Path:
    """Copy a save root: checkpoints as hard links (never modified in place, so sharing is safe), the rest copied."""
    def link_or_copy(a, b):
        return os.link(a, b) if a.endswith(".pt") else shutil.copy2(a, b)
    shutil.copytree(src, dst, copy_function=link_or_copy)
    return dst


def csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


@pytest.fixture(scope="module")
def image_root(tmp_path_factory, demo_bfm_h5) -> Path:
    root = tmp_path_factory.mktemp("syn") / "root"
    faces.generate_dataset(demo_bfm_h5, root, num=16, seed=0, size=SIZE)
    return root


@pytest.fixture(scope="module")
def finished(tmp_path_factory, image_root, demo_bfm_h5) -> Path:
    """A save root holding a finished 4-step Step-1 run with checkpoints at steps 2 and 4 (read only)."""
    save = tmp_path_factory.mktemp("finished")
    assert step1.main(common(image_root, demo_bfm_h5, save) + FAST + ["--max_iters", "4", "--ckpt_every", "2"]) == 0
    return save


# ----- losing or mixing data ------------------------------------------------------------------------------------

def test_a_fresh_run_refuses_a_folder_with_a_run_and_resume_reads_latest(tmp_path, capsys, caplog, finished,
                                                                        image_root, demo_bfm_h5):
    save = clone(finished, tmp_path / "save")
    args = common(image_root, demo_bfm_h5, save) + FAST
    before = snapshot(save)
    line = fails(capsys, step1.main, args + ["--max_iters", "2", "--learning_rate", "0.05"])
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line and "--save_root" in line
    assert snapshot(save) == before
    # --overwrite removes the old run's files first: no stale ckpt_000004.pt, no appended loss rows
    assert step1.main(args + ["--max_iters", "2", "--ckpt_every", "1000", "--overwrite"]) == 0
    run = save / "pretrain_mofa"
    assert sorted(p.name for p in run.glob("ckpt_*.pt")) == ["ckpt_000002.pt"]
    assert [r[0] for r in csv_rows(run / "loss_train.csv")] == ["step", "1", "2"]
    # --resume continues the run in latest.pt, not an older run's higher-numbered checkpoint
    shutil.copy2(finished / "pretrain_mofa" / "ckpt_000004.pt", run / "ckpt_000004.pt")
    with caplog.at_level(logging.INFO):
        assert step1.main(args + ["--max_iters", "3", "--ckpt_every", "1000", "--resume"]) == 0
    assert "latest.pt at step 2" in caplog.text
    assert load_checkpoint(run / "final.pt")["step"] == 3


def _unicode_root(image_root: Path, dst: Path, names: list[str]) -> Path:
    """An image root whose train and val splits hold copies of the first images under ``names``."""
    rows = csv_rows(image_root / "train_landmarks_3D.csv")
    out = []
    for name, row in zip(names, rows):
        target = dst / "Dataset" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(image_root / "Dataset" / row[0], target)
        out.append([name, *row[1:]])
    for split in ("train", "val"):
        with open(dst / f"{split}_landmarks_3D.csv", "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows(out)
    return dst


def test_step2_output_names_are_unique_and_a_collision_is_an_error(tmp_path, capsys, finished, image_root,
                                                                  demo_bfm_h5):
    save = clone(finished, tmp_path / "save")
    names = ["日本.png", "中国.png", "x.png", "x.jpg", "a b.png", "a_b.png", "sub/y.png", "sub__y.png"]
    root = _unicode_root(image_root, tmp_path / "uni", names)
    assert step2.main(common(root, demo_bfm_h5, save) + ["--batch_size", "8"]) == 0
    out = save / "UNet_trainset"
    listed = csv_rows(out / "train_list.csv")[1:]
    assert [source for _, source in listed] == names and len({stem for stem, _ in listed}) == len(names)
    for stem, _ in listed:
        assert all((out / f"{stem}{suffix}").is_file() for suffix in ("_org.png", "_raster.png", "_mask.png"))
    assert len(list(out.rglob("*_mask.png"))) == len(names)
    # names that only differ in case would overwrite each other on a case-insensitive file system: refused
    clash = _unicode_root(image_root, tmp_path / "clash", ["Face.png", "face.png"])
    before = snapshot(save)
    line = fails(capsys, step2.main, common(clash, demo_bfm_h5, save) + ["--overwrite"])
    assert "Face.png" in line and "face.png" in line and "same Step-2 output" in line
    assert snapshot(save) == before


def test_resume_refuses_another_image_size_camera_or_face_model(tmp_path, capsys, finished, image_root, demo_bfm_h5):
    save = clone(finished, tmp_path / "save")
    other = write_bfm_h5(tmp_path / "other.h5", tiny_bfm_arrays(seed=0))
    before = snapshot(save)
    for extra, flag in ((["--image_size", "64"], "--image_size 64"), (["--camera", "g1"], "--camera g1")):
        line = fails(capsys, step1.main, common(image_root, demo_bfm_h5, save) + FAST + ["--resume", *extra])
        assert flag in line and "other networks" in line
    line = fails(capsys, step1.main, common(image_root, other, save) + FAST + ["--resume"])
    assert "another face model" in line
    assert snapshot(save) == before


def test_the_face_model_fingerprint_covers_every_array(tmp_path, capsys, finished, image_root):
    arrays = tiny_bfm_arrays(seed=0)
    base = FaceModel.from_h5(write_bfm_h5(tmp_path / "a.h5", arrays)).config()
    for key in ("expression/model/pcaBasis", "color/model/mean", "shape/model/pcaVariance"):
        changed = dict(arrays, **{key: arrays[key] * 1.01})
        other = FaceModel.from_h5(write_bfm_h5(tmp_path / "b.h5", changed)).config()
        assert other != base, f"a model with another {key} has the same fingerprint"
    # the demo model of another seed (same sizes) is refused by the next step
    from utils.synthetic.demo_face_model import write_demo_face_model
    seed1 = write_demo_face_model(tmp_path / "demo1.h5", seed=1)
    save = clone(finished, tmp_path / "save")
    before = snapshot(save)
    line = fails(capsys, step2.main, common(image_root, Path(seed1), save))
    assert "another face model" in line
    assert snapshot(save) == before


def test_a_corrupt_image_mid_run_saves_the_last_good_state(tmp_path, capsys, image_root, demo_bfm_h5):
    root = tmp_path / "root"
    shutil.copytree(image_root, root)
    rows = csv_rows(root / "train_landmarks_3D.csv")
    order = list(ResumableSampler(len(rows), 4, seed=0))
    (root / "Dataset" / rows[order[9]][0]).write_bytes(b"not an image")  # in the third batch
    save = tmp_path / "save"
    line = fails(capsys, step1.main, common(root, demo_bfm_h5, save) + FAST + ["--max_iters", "5"])
    assert "cannot decode" in line and "after step 2" in line and "--resume" in line
    assert load_checkpoint(save / "pretrain_mofa" / "latest.pt")["step"] == 2


def test_the_nan_stop_saves_no_weights_that_give_nan(tmp_path, capsys, image_root, demo_bfm_h5):
    """The weights in place at the non-finite stop give NaN again on --resume: they are never saved."""
    line = fails(capsys, step1.main, common(image_root, demo_bfm_h5, tmp_path / "nan") + FAST +
                 ["--max_iters", "20", "--learning_rate", "1e30"])
    assert "non-finite for 5 steps in a row" in line and "were not saved" in line
    assert "no checkpoint exists yet" in line and not list((tmp_path / "nan" / "pretrain_mofa").glob("*.pt"))
    assert line.endswith("start again with --overwrite") and "--resume" not in line, "nothing to resume from"


def test_the_nan_stop_moves_latest_back_to_the_last_finite_checkpoint(tmp_path, capsys, caplog, monkeypatch,
                                                                       image_root, demo_bfm_h5):
    """Losses of steps 5, 6, ... are NaN; checkpoints every 2 steps. Steps 6 and 8 were checkpointed with the
    weights that gave NaN at step 5 (updates are skipped); latest.pt goes back to step 4 and --resume works."""
    real_sum, calls = losses.weighted_sum, []

    def nan_from_step_5(terms, weights):
        calls.append(1)
        total = real_sum(terms, weights)
        return total * float("nan") if len(calls) > 5 else total

    monkeypatch.setattr(losses, "weighted_sum", nan_from_step_5)
    save, run = tmp_path / "save", tmp_path / "save" / "pretrain_mofa"
    args = common(image_root, demo_bfm_h5, save) + FAST + ["--max_iters", "12", "--ckpt_every", "2",
                                                           "--keep_ckpts", "0"]
    line = fails(capsys, step1.main, args)
    assert "the weights after step 5 give a non-finite loss" in line and "now holds step 4" in line, line
    assert [p.name for p in sorted(run.glob("ckpt_*.pt"))] == [f"ckpt_00000{k}.pt" for k in (2, 4)], \
        "the checkpoints of the weights that give NaN (steps 6 and 8) are deleted"
    assert "continue with --resume" in line
    assert load_checkpoint(run / "latest.pt")["step"] == 4
    monkeypatch.setattr(losses, "weighted_sum", real_sum)
    with caplog.at_level(logging.INFO):
        assert step1.main(args + ["--resume"]) == 0
    assert f"resumed from {run / 'latest.pt'} at step 4" in caplog.text
    assert load_checkpoint(run / "final.pt")["step"] == 12
    assert [r[0] for r in csv_rows(run / "loss_train.csv")] == ["step", *map(str, range(1, 13))]


def test_synthetic_faces_refuses_a_folder_it_did_not_write(tmp_path, capsys, demo_bfm_h5):
    root = tmp_path / "mine"
    (root / "Dataset").mkdir(parents=True)
    (root / "Dataset" / "me.jpg").write_bytes(b"my photo")
    (root / "train_landmarks_3D.csv").write_text("me.jpg," + ",".join(["1"] * 136) + "\n")
    before = snapshot(root)
    argv = ["--out", str(root), "--num", "2", "--size", "32", "--bfm", str(demo_bfm_h5)]
    for extra in ([], ["--overwrite"]):
        line = fails(capsys, faces.main, argv + extra)
        assert "did not write" in line and "me.jpg" in line
    assert snapshot(root) == before
    assert faces.main(["--out", str(tmp_path / "new"), "--num", "2", "--size", "32", "--bfm", str(demo_bfm_h5)]) == 0
    assert faces.main(["--out", str(tmp_path / "new"), "--num", "2", "--size", "32", "--bfm", str(demo_bfm_h5),
                       "--overwrite"]) == 0  # its own earlier output may be replaced


def test_a_failed_start_writes_nothing(tmp_path, capsys, finished, image_root, demo_bfm_h5):
    empty = tmp_path / "empty"
    empty.mkdir()
    for main in (step3.main, step4.main):
        fails(capsys, main, common(image_root, demo_bfm_h5, empty) + FAST)
    assert snapshot(empty) == {".": snapshot(empty)["."]} and not any(empty.iterdir())
    save = clone(finished, tmp_path / "save")
    before = snapshot(save)
    fails(capsys, step1.main, common(tmp_path / "missing", demo_bfm_h5, save) + FAST + ["--overwrite"])
    fails(capsys, step1.main, common(image_root, tmp_path / "missing.h5", save) + FAST + ["--resume"])
    assert snapshot(save) == before  # run_config.json and the finished run untouched


# ----- tracebacks that became one line --------------------------------------------------------------------------

def test_save_root_under_a_file_or_in_proc(tmp_path, capsys, image_root, demo_bfm_h5):
    (tmp_path / "file").write_text("x")
    before = snapshot(tmp_path)
    line = fails(capsys, step1.main, common(image_root, demo_bfm_h5, tmp_path / "file" / "save") + FAST)
    assert "is a file" in line
    line = fails(capsys, step1.main, common(image_root, demo_bfm_h5, Path("/proc/mofa_save")) + FAST)
    assert "/proc" in line
    assert snapshot(tmp_path) == before


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch, image_root,
                                                                   demo_bfm_h5):
    real_save, calls = torch.save, []

    def save_until_full(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) >= 2:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    save = tmp_path / "save"
    line = fails(capsys, step1.main, common(image_root, demo_bfm_h5, save) + FAST + ["--max_iters", "4",
                                                                                    "--ckpt_every", "2"])
    monkeypatch.setattr(torch, "save", real_save)
    run = save / "pretrain_mofa"
    assert "No space left on device" in line and "ckpt_000004.pt" in line and "step 2" in line
    assert load_checkpoint(run / "latest.pt")["step"] == 2 and load_checkpoint(run / "ckpt_000002.pt")["step"] == 2
    assert not (run / "ckpt_000004.pt").exists() and not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))


def test_resume_with_another_optimizer(tmp_path, capsys, finished, image_root, demo_bfm_h5):
    save = clone(finished, tmp_path / "save")
    before = snapshot(save)
    line = fails(capsys, step1.main, common(image_root, demo_bfm_h5, save) + FAST + ["--resume", "--optimizer", "adam"])
    assert "Adadelta" in line and "--optimizer" in line
    assert snapshot(save) == before


def test_a_unet_checkpoint_where_a_mofa_one_is_expected(tmp_path, capsys, finished, image_root, demo_bfm_h5):
    unet_dir = tmp_path / "unet"
    path = save_training_state(unet_dir, 1, {"unet": UNet(base=1)}, extra={"model": {"unet_width": 1}},
                               keep_latest=False)
    save = clone(finished, tmp_path / "save")
    before = snapshot(tmp_path)
    commands = [
        (step2.main, common(image_root, demo_bfm_h5, save) + ["--pretrained_MoFA", str(path)]),
        (evaluate_segmentation.main, ["--img_path", str(image_root), "--bfm", str(demo_bfm_h5), "--device", "cpu",
                                      "--stage", "step2", "--checkpoint", str(path), "--out", str(tmp_path / "ev")]),
        (reconstruct.main, ["--image", str(next((image_root / "Dataset").glob("00000.png"))), "--checkpoint",
                            str(path), "--out", str(tmp_path / "rec"), "--bfm", str(demo_bfm_h5), "--device", "cpu"]),
    ]
    for main, argv in commands:
        line = fails(capsys, main, argv)
        assert "holds no MoFA encoder" in line and str(path) in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("flag,value", [("--ckpt_every", "0"), ("--batch_size", "0"), ("--image_size", "0"),
                                        ("--workers", "-1"), ("--learning_rate", "-1"), ("--max_iters", "-3"),
                                        ("--keep_ckpts", "-1")])
def test_impossible_numbers_are_refused_up_front(tmp_path, capsys, image_root, demo_bfm_h5, flag, value):
    line = fails(capsys, step1.main, common(image_root, demo_bfm_h5, tmp_path / "save") + [flag, value])
    assert line.startswith(f"error: {flag} {value}")
    assert not (tmp_path / "save").exists()


@pytest.mark.parametrize("flag,value", [("--workers", "-1"), ("--batch_size", "0"), ("--sigma", "0.0")])
def test_impossible_evaluation_numbers_are_refused_up_front(tmp_path, capsys, image_root, demo_bfm_h5, flag, value):
    """The evaluation command checks its numbers as the steps do (--workers -1 was a ValueError traceback)."""
    line = fails(capsys, evaluate_segmentation.main, ["--img_path", str(image_root), "--bfm", str(demo_bfm_h5),
                                                      "--device", "cpu", "--stage", "fit_oracle",
                                                      "--out", str(tmp_path / "ev"), flag, value])
    assert line.startswith(f"error: {flag} {value}: must be ")
    assert not (tmp_path / "ev").exists()


# ----- accepted silently before ---------------------------------------------------------------------------------

def _edited_root(image_root: Path, dst: Path, edit) -> Path:
    """A copy of the image root whose first val row is ``edit(row)``."""
    shutil.copytree(image_root, dst)
    rows = csv_rows(dst / "val_landmarks_3D.csv")
    rows[0] = edit(rows[0])
    with open(dst / "val_landmarks_3D.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return dst


def test_landmarks_far_outside_the_image_are_an_error(tmp_path, capsys, image_root, demo_bfm_h5):
    root = _edited_root(image_root, tmp_path / "root", lambda r: [r[0], *(f"{float(v) * 100:.1f}" for v in r[1:])])
    line = fails(capsys, step1.main, common(root, demo_bfm_h5, tmp_path / "save") + FAST + ["--max_iters", "2"])
    assert "far outside" in line and "val_landmarks_3D.csv" in line
    assert not (tmp_path / "save").exists()


def test_a_coordinate_beyond_float32_is_an_error(tmp_path, capsys, image_root, demo_bfm_h5):
    root = _edited_root(image_root, tmp_path / "root", lambda r: [r[0], "1e39", *r[2:]])
    line = fails(capsys, step1.main, common(root, demo_bfm_h5, tmp_path / "save") + FAST + ["--max_iters", "2"])
    assert "1e39" in line and "line 1" in line
    assert not (tmp_path / "save").exists()


def test_a_tiny_image_is_announced_once(tmp_path, caplog, image_root):
    root = tmp_path / "root"
    shutil.copytree(image_root, root)
    name = csv_rows(root / "val_landmarks_3D.csv")[0][0]
    import cv2
    cv2.imwrite(str(root / "Dataset" / name), np.zeros((1, 1, 3), np.uint8))
    rows = csv_rows(root / "val_landmarks_3D.csv")
    rows[0] = [name, *["0"] * 136]
    with open(root / "val_landmarks_3D.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    dataset = FaceDataset(root, "val", image_size=64)
    with caplog.at_level(logging.WARNING):
        dataset[0], dataset[0], dataset[1]
    assert caplog.text.count("quarter of --image_size") == 1 and name in caplog.text


def _fake_step2(save: Path, image_root: Path, size: int = SIZE) -> None:
    out = save / "UNet_trainset"
    rows = []
    for i in range(8):
        image = torch.rand(3, size, size)
        write_sample(out, f"{i}.png", image, image, (image[:1] > 0.5).float())
        rows.append((f"{i}.png", f"{i}.png"))
    for split in ("train", "val"):
        write_list(out / f"{split}_list.csv", rows)


def test_steps_3_and_4_say_which_network_settings_they_use(tmp_path, caplog, finished, image_root, demo_bfm_h5):
    save = clone(finished, tmp_path / "save")
    _fake_step2(save, image_root)
    wrong = common(image_root, demo_bfm_h5, save) + FAST + ["--max_iters", "1"]
    wrong[wrong.index("--image_size") + 1] = "64"
    with caplog.at_level(logging.WARNING):
        assert step3.main(wrong) == 0
    assert f"--image_size 64 is ignored: using {SIZE}" in caplog.text
    caplog.clear()
    wrong[wrong.index("--encoder") + 1] = "resnet34"
    wrong[wrong.index("--unet_width") + 1] = "8"
    with caplog.at_level(logging.WARNING):
        assert step4.main(wrong + ["--em_cycle", "2", "--unet_iters", "0"]) == 0
    for text in (f"--image_size 64 is ignored: using {SIZE}", "--encoder resnet34 is ignored: using resnet18",
                 "--unet_width 8 is ignored: using 4"):
        assert text in caplog.text


def test_an_unchanged_resume_names_no_flag_and_a_changed_one_is_named(tmp_path, caplog, finished, image_root,
                                                                     demo_bfm_h5):
    """The checkpoint stores the flags as JSON: an unchanged tuple flag (--drop_terms ()) is not a change."""
    save = clone(finished, tmp_path / "save")
    args = common(image_root, demo_bfm_h5, save) + FAST + ["--resume", "--ckpt_every", "1000"]

    def resume_warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("--resume:")]

    with caplog.at_level(logging.WARNING):
        assert step1.main(args + ["--max_iters", "5"]) == 0
    assert resume_warnings() == []
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert step1.main(args + ["--max_iters", "6", "--drop_terms", "landmark", "--learning_rate", "0.05"]) == 0
    warned = resume_warnings()
    assert len(warned) == 2 and "--drop_terms ['landmark'] (was [])" in warned[1] and "(was " not in warned[0], warned
    # the learning rate lives in the restored optimizer state: the new value is not used, so it is not recorded
    assert "--learning_rate 0.05 ignored" in warned[0] and "keeps --learning_rate 0.1" in warned[0], warned
    run = save / "pretrain_mofa"
    recorded = json.loads((run / "run_config.json").read_text())
    assert recorded["learning_rate"] == 0.1 and recorded["drop_terms"] == ["landmark"]
    assert load_checkpoint(run / "final.pt")["config"]["learning_rate"] == 0.1


def test_resume_below_the_checkpoint_says_nothing_was_trained(tmp_path, caplog, finished, image_root, demo_bfm_h5):
    save = clone(finished, tmp_path / "save")
    with caplog.at_level(logging.WARNING):
        assert step1.main(common(image_root, demo_bfm_h5, save) + FAST + ["--resume", "--max_iters", "2"]) == 0
    assert "nothing to train" in caplog.text and "step 4" in caplog.text
    assert load_checkpoint(save / "pretrain_mofa" / "final.pt")["step"] == 4


# ----- low ------------------------------------------------------------------------------------------------------

def test_resume_cleans_orphans_and_cuts_the_loss_log_back(tmp_path, finished, image_root, demo_bfm_h5):
    save = clone(finished, tmp_path / "save")
    run = save / "pretrain_mofa"
    orphans = [run / ".ckpt_000006.pt.1a2b3c4d.tmp", run / "final.pt.tmp"]
    for path in orphans:
        path.write_bytes(b"left by SIGKILL")
    with open(run / "loss_train.csv", "a") as fh:  # rows of steps done after the last checkpoint, then killed
        fh.write("5,1,1,1,1,\n6,1,1,1,1,\n")
    assert step1.main(common(image_root, demo_bfm_h5, save) + FAST + ["--resume", "--max_iters", "5",
                                                                     "--ckpt_every", "1000"]) == 0
    assert not any(path.exists() for path in orphans)
    assert [r[0] for r in csv_rows(run / "loss_train.csv")] == ["step", "1", "2", "3", "4", "5"]


def test_keep_ckpts_links_latest_and_one_file_mode(tmp_path, image_root, demo_bfm_h5):
    save = tmp_path / "save"
    assert step1.main(common(image_root, demo_bfm_h5, save) + FAST + ["--max_iters", "3", "--ckpt_every", "1",
                                                                     "--keep_ckpts", "2"]) == 0
    run = save / "pretrain_mofa"
    assert sorted(p.name for p in run.glob("ckpt_*.pt")) == ["ckpt_000002.pt", "ckpt_000003.pt"]
    newest = (run / "ckpt_000003.pt").stat()
    for name in ("latest.pt", "final.pt"):  # the same file, not a second 135 MB copy
        assert (run / name).stat().st_ino == newest.st_ino
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in run.iterdir() if p.is_file()}
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_a_face_model_with_nan_is_called_damaged(tmp_path, capsys, image_root):
    arrays = tiny_bfm_arrays(seed=0)
    arrays["shape/model/mean"] = arrays["shape/model/mean"].copy()
    arrays["shape/model/mean"][5] = np.nan
    bfm = write_bfm_h5(tmp_path / "nan.h5", arrays)
    line = fails(capsys, step1.main, common(image_root, bfm, tmp_path / "save") + FAST)
    assert "shape/model/mean" in line and "NaN" in line and "landmark" not in line
    assert not (tmp_path / "save").exists()
