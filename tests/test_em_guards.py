"""The training machinery Steps 3 and 4 share, on real tiny runs: the collapse guard (unit and a forced collapse),
every logged key a CSV column, BatchNorm re-estimation after every UNet phase, no UNet weight gradient in a MoFA
step, the first loss row after a resume, and the range checks of Step 4's flags."""
from __future__ import annotations

import csv
import logging

import pytest
import torch

import Step3_Pretrain_Unet as step3
import Step4_UNet_MoFA_EM as step4
from models.unet import UNet
from tests.step_inputs import FAST, common_args, step4_argv, step4_inputs, unet_trainset
from tests.test_reliability import fails
from utils.training import flags
from utils.training.batchnorm import batchnorm_layers
from utils.training.checkpoint import load_checkpoint
from utils.training.guards import CollapseGuard, MaskCollapseError
from utils.training.monitor import RunMonitor

HINTS = {"low": "low hint", "high": "high hint"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, demo_bfm_h5) -> dict:
    return step4_inputs(tmp_path_factory.mktemp("em_guard_inputs"), demo_bfm_h5)


def _rows(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---- the collapse guard's logic -------------------------------------------------------------------------------

def test_collapse_guard_stops_after_patience_collapsed_rows_in_a_row():
    guard = CollapseGuard(HINTS, "stop", patience=3, last_step=10)
    assert not guard.update(0.6, 20)
    assert not guard.update(0.01, 30)  # the collapse begins in the period after step 20
    assert not guard.update(0.6, 40)  # a healthy row resets the count
    assert not guard.update(0.04, 50)
    assert not guard.update(0.049, 60)
    with pytest.raises(MaskCollapseError) as info:
        guard.update(0.0, 70)
    assert info.value.first_bad == 40, "the weights after the log step before the first collapsed row"
    text = str(info.value)
    assert "below 0.05 at 3 log steps in a row" in text and "steps 41-70" in text and "low hint" in text
    assert "--collapse warn" in text and "\n" not in text
    assert not CollapseGuard(HINTS, patience=1).update(0.05, 1), "the bounds themselves are healthy"
    assert not CollapseGuard(HINTS, patience=1).update(None, 1), "a row without the value is no evidence"


def test_collapse_guard_watches_both_ends_and_warn_mode_warns_once(caplog):
    with pytest.raises(MaskCollapseError, match="above 0.995 .*high hint"):
        CollapseGuard(HINTS, "stop", patience=2).update(0.999, 1) or CollapseGuard(HINTS, "stop", patience=1).update(
            0.999, 1)
    guard = CollapseGuard(HINTS, "warn", patience=2)
    with caplog.at_level(logging.WARNING):
        fired = [guard.update(v, s) for s, v in enumerate([0.5, 0.999, 1.0, 1.0, 1.0], start=1)]
    assert fired == [False, False, True, False, False], "warns once per collapse, at the patience-th row"
    assert caplog.text.count("mask collapse") == 1 and "high hint" in caplog.text
    with pytest.raises(ValueError):
        CollapseGuard(HINTS, "ignore")


# ---- a forced collapse in a real Step-4 run ----------------------------------------------------------------------

def test_a_collapse_in_step4_stops_with_one_line_and_latest_from_before_it(tmp_path, capsys, monkeypatch, inputs):
    """After step 4 the UNet's head is pushed to 'occluded everywhere' (its bias to -10): the mask inside the face
    drops to ~0 from the row of step 5 on. With --collapse_patience 3 the run stops at step 7 (exit 2, one line
    naming the likely cause and what to try); checkpoints every 2 steps: steps 4 and 6 hold collapsed weights and
    are deleted, latest.pt is step 2's."""
    original = step4.EMTrainer.after_step

    def collapse_after_step_4(self, step):
        original(self, step)
        if step == 4:
            with torch.no_grad():
                self.unet.head.bias.fill_(-10.0)

    monkeypatch.setattr(step4.EMTrainer, "after_step", collapse_after_step_4)
    save = tmp_path / "save"
    run = save / "MoFA_UNet"
    line = fails(capsys, step4.main, step4_argv(inputs, save, "--max_iters", "12", "--ckpt_every", "2",
                                                 "--keep_ckpts", "0", "--em_cycle", "3", "--unet_iters", "1"))
    assert line.startswith("error: stopped after step 7: mask collapse: the mean UNet mask inside the face was "
                           "below 0.05 at 3 log steps in a row"), line
    assert "--dist_landmarks gt" in line and "--drop_terms dist" in line and "--collapse warn" in line
    assert "the weights after step 4 trained into the mask collapse" in line and "now holds step 2" in line
    assert load_checkpoint(run / "latest.pt")["step"] == 2
    assert [p.name for p in sorted(run.glob("ckpt_*.pt"))] == ["ckpt_000002.pt"]
    assert not (run / "final.pt").exists()
    rows = _rows(run / "loss_train.csv")
    assert [r["step"] for r in rows] == [str(s) for s in range(1, 8)]
    assert all(float(r["mask_in_face"]) > 0.3 for r in rows[:4])
    assert all(float(r["mask_in_face"]) < 0.05 for r in rows[4:])


def test_a_collapse_right_after_a_resume_names_the_steps_since_the_resume(tmp_path, capsys, monkeypatch, inputs):
    """The guard starts at the run's start step (built in EMTrainer.start, as in Step 3): a run resumed at step 4
    whose UNet collapses at once reports steps 5-6, and the weights after step 4 (not step 0) as the first bad ones."""
    save = tmp_path / "save"
    assert step4.main(step4_argv(inputs, save, "--max_iters", "4", "--em_cycle", "3", "--unet_iters", "1")) == 0
    original = step4.EMTrainer.start

    def start_collapsed(self, spec):
        start = original(self, spec)
        with torch.no_grad():
            self.unet.head.bias.fill_(-10.0)
        return start

    monkeypatch.setattr(step4.EMTrainer, "start", start_collapsed)
    line = fails(capsys, step4.main, step4_argv(inputs, save, "--max_iters", "8", "--em_cycle", "3", "--unet_iters",
                                                 "1", "--collapse_patience", "2", "--resume"))
    assert "steps 5-6)" in line and "the weights after step 4 trained into the mask collapse" in line, line


def test_collapse_warn_trains_on(tmp_path, caplog, monkeypatch, inputs):
    def collapsed(self, step):
        with torch.no_grad():
            self.unet.head.bias.fill_(-10.0)

    monkeypatch.setattr(step4.EMTrainer, "after_step", collapsed)
    with caplog.at_level(logging.WARNING):
        assert step4.main(step4_argv(inputs, tmp_path / "save", "--max_iters", "4", "--em_cycle", "3",
                                      "--unet_iters", "1", "--collapse", "warn", "--collapse_patience", "2")) == 0
    assert "MASK COLLAPSE".lower() in caplog.text.lower() and "--dist_landmarks gt" in caplog.text
    assert load_checkpoint(tmp_path / "save" / "MoFA_UNet" / "final.pt")["step"] == 4


# ---- the loss logs -------------------------------------------------------------------------------------------

def _logged_keys(monkeypatch) -> dict:
    """Spy on RunMonitor.scalars: split -> the set of keys logged."""
    seen = {"train": set(), "val": set()}
    original = RunMonitor.scalars

    def spy(self, step, values, split="train"):
        seen[split] |= set(values)
        return original(self, step, values, split)

    monkeypatch.setattr(RunMonitor, "scalars", spy)
    return seen


def _check_columns(folder, seen: dict) -> dict:
    """Both CSVs have one header; every logged key is a column of it and every column is logged somewhere."""
    train, val = _rows(folder / "loss_train.csv"), _rows(folder / "loss_val.csv")
    columns = list(train[0])
    assert list(val[0]) == columns and columns[0] == "step"
    assert seen["train"] | seen["val"] == set(columns[1:]), (sorted(seen["train"] | seen["val"]), columns)
    for split, rows in (("train", train), ("val", val)):
        filled = {k for r in rows for k, v in r.items() if v != ""} - {"step"}
        assert filled == seen[split], f"{split}: the logged keys are not the filled columns"
    return {"train": train, "val": val}


def test_every_logged_key_is_a_step4_csv_column_and_total_has_one_meaning(tmp_path, monkeypatch, inputs):
    """Step 4 logs lr_encoder / lr_unet (the scheduler names = the optimizer names) in training, total_unet and
    total_mofa in both files; ``total`` is the loss the optimizer minimised: in training the phase's loss, and
    absent from validation (no phase is trained there)."""
    seen = _logged_keys(monkeypatch)
    save = tmp_path / "save"
    assert step4.main(step4_argv(inputs, save, "--max_iters", "3", "--em_cycle", "3", "--unet_iters", "1",
                                  "--eval_every", "3", "--identity", "dlib")) == 0
    rows = _check_columns(save / "MoFA_UNet", seen)
    train, val = rows["train"], rows["val"]
    assert {"total_unet", "total_mofa"} <= seen["train"] & seen["val"]
    assert {"lr_encoder", "lr_unet"} <= seen["train"]
    for r, phase in zip(train, ("unet", "unet", "mofa")):  # one step per row: total is that phase's loss
        other = "mofa" if phase == "unet" else "unet"
        assert r["total"] == r[f"total_{phase}"] != "" and r[f"total_{other}"] == ""
    assert "total" not in seen["val"] and val[0]["total"] == ""
    payload = load_checkpoint(save / "MoFA_UNet" / "final.pt")
    assert set(payload["optimizers"]) == set(payload["schedulers"]) == {"encoder", "unet"}


def test_every_logged_key_is_a_step3_csv_column(tmp_path, monkeypatch):
    seen = _logged_keys(monkeypatch)
    trainset = unet_trainset(tmp_path / "data")
    save = tmp_path / "save"
    assert step3.main([*common_args(tmp_path / "none", tmp_path / "no.h5", save), *FAST, "--trainset_dir",
                       str(trainset), "--max_iters", "2", "--eval_every", "2", "--bn_recalibration", "0"]) == 0
    rows = _check_columns(save / "Pretrain_UNet", seen)
    assert all(r["total"] == r["bce"] for r in rows["train"]) and {"total", "lr_unet"} <= seen["train"]


def test_the_monitor_refuses_a_key_that_is_not_a_column(tmp_path):
    for enabled in (True, False):  # every process checks, not only the one that writes
        monitor = RunMonitor(tmp_path / str(enabled), ["a"], 0, 1, enabled=enabled)
        monitor.scalars(1, {"a": 1.0})
        with pytest.raises(ValueError, match=r"\['lr_x'\] are not loss-log columns"):
            monitor.scalars(1, {"a": 1.0, "lr_x": 0.1})
        monitor.close()


def test_the_first_row_after_a_resume_mid_period_is_not_written(tmp_path):
    """--log_every 2: 3 steps (rows 2, 3: the run's end) then a resume to 6. The row of step 4 would average only
    step 4 (step 3 was before the resume), so it is not written; row 6 is the straight run's."""
    trainset = unet_trainset(tmp_path / "data")

    def run(save, steps, *extra):
        argv = [*common_args(tmp_path / "none", tmp_path / "no.h5", save), *FAST, "--trainset_dir", str(trainset),
                "--bn_recalibration", "0", "--log_every", "2", "--max_iters", str(steps), *extra]
        assert step3.main(argv) == 0
        return _rows(save / "Pretrain_UNet" / "loss_train.csv")

    straight = run(tmp_path / "straight", 6)
    run(tmp_path / "split", 3)
    resumed = run(tmp_path / "split", 6, "--resume")
    assert [r["step"] for r in straight] == ["2", "4", "6"]
    assert [r["step"] for r in resumed] == ["2", "3", "6"]
    assert resumed[0] == straight[0] and resumed[2] == straight[2]


# ---- the EM step -----------------------------------------------------------------------------------------------

def test_step4_reestimates_batchnorm_at_the_end_of_every_unet_phase(tmp_path, inputs):
    """--em_cycle 3 --unet_iters 1: steps 0, 1 UNet, 2 MoFA, 3 UNet; the phases end after steps 2 and 4.
    Re-estimation on 4 images (one batch of 4) restarts every BatchNorm's count at 1 batch; training adds one per
    UNet step. With --bn_recalibration 0 the counts are those of training alone and the statistics differ."""
    runs = {}
    for images in ("4", "0"):
        save = tmp_path / images
        assert step4.main(step4_argv(inputs, save, "--max_iters", "4", "--ckpt_every", "1", "--keep_ckpts", "0",
                                      "--em_cycle", "3", "--unet_iters", "1", "--bn_recalibration", images)) == 0
        runs[images] = {k: load_checkpoint(save / "MoFA_UNet" / f"ckpt_{k:06d}.pt")["models"]["unet"]
                        for k in range(1, 5)}
    counts = {images: [{int(v) for k, v in unet.items() if k.endswith("num_batches_tracked")}
                       for unet in states.values()] for images, states in runs.items()}
    assert counts["0"] == [{1}, {2}, {2}, {3}], counts
    assert counts["4"] == [{1}, {1}, {1}, {1}], counts
    for step in (2, 4):
        assert any(not torch.equal(v, runs["0"][step][k]) for k, v in runs["4"][step].items()
                   if k.endswith("running_var"))


def test_a_mofa_step_computes_no_unet_weight_gradient(tmp_path, monkeypatch, inputs):
    """Hooks on every UNet parameter record in which phase a gradient was computed for it: only in UNet steps.
    The encoder is still trained through the UNet's input (the MoFA step changes it)."""
    computed = []
    original_init, original_forward = step4.EMTrainer.__init__, step4.EMTrainer.forward

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        for p in self.unet.parameters():
            p.register_hook(lambda grad: computed.append(self.phase))

    def forward(self, index, batch):
        self.phase = step4.em_phase(index, self.args.em_cycle, self.args.unet_iters)
        return original_forward(self, index, batch)

    monkeypatch.setattr(step4.EMTrainer, "__init__", init)
    monkeypatch.setattr(step4.EMTrainer, "forward", forward)
    assert step4.main(step4_argv(inputs, tmp_path / "save", "--max_iters", "3", "--em_cycle", "3",
                                  "--unet_iters", "0")) == 0
    assert "unet" in computed and "mofa" not in computed, sorted(set(computed))


def test_frozen_keeps_the_input_gradient_and_gives_the_weights_none():
    unet = UNet(base=4).eval()
    x = torch.rand(2, 6, 32, 32, requires_grad=True)
    with step4.frozen(unet):
        out = unet(x)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in unet.parameters())
    assert all(p.requires_grad for p in unet.parameters()), "requires_grad is restored"
    assert len(batchnorm_layers(unet)) > 0


# ---- flags -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,message", [
    (["--bn_recalibration", "-7"], "--bn_recalibration -7: must be at least 0"),
    (["--em_cycle", "1", "--unet_iters", "5"], "--unet_iters 5 --em_cycle 1: "),
    (["--em_cycle", "4", "--unet_iters", "4"], "--unet_iters must be below --em_cycle"),
    (["--collapse_patience", "0"], "--collapse_patience 0: must be a positive integer"),
])
def test_impossible_step4_numbers_are_one_line(tmp_path, capsys, extra, message):
    line = fails(capsys, step4.main, ["--img_path", str(tmp_path), "--save_root", str(tmp_path / "save"), *extra])
    assert message in line, line
    assert not (tmp_path / "save").exists()
    flags.check_flags(step4.parse_args(["--img_path", "x", "--em_cycle", "4", "--unet_iters", "3"]))  # UNet-only
