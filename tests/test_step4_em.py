"""Step 4's EM schedule, its learning rates and schedulers, and its exact resume (real Step-4 runs on a tiny set).

Phase rule (docs/method.md §10): step ct is a MoFA step when ct % em_cycle > unet_iters, else a UNet step. With
``--em_cycle 3 --unet_iters 1`` steps 0 and 1 are UNet steps, 2 is a MoFA step, 3 starts the next cycle (UNet).
"""
from __future__ import annotations

import csv
import logging
from argparse import Namespace

import pytest
import torch

import Step4_UNet_MoFA_EM as step4
from tests.step_inputs import STEP1_LR_GAMMA, STEP1_LR_STEP, STEP1_STEPS, step4_argv, step4_inputs
from utils import losses
from utils.training.checkpoint import CheckpointError, load_checkpoint


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, demo_bfm_h5) -> dict:
    return step4_inputs(tmp_path_factory.mktemp("step4_inputs"), demo_bfm_h5)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _changed_parameters(a: dict, b: dict) -> int:
    return sum(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


@pytest.fixture(scope="module")
def em_run(tmp_path_factory, inputs) -> dict:
    """Four Step-4 steps with a checkpoint after each; StepLR halves the MoFA rate and quarters the UNet's per step."""
    save = tmp_path_factory.mktemp("em_run")
    assert step4.main(step4_argv(inputs, save, "--max_iters", "4", "--ckpt_every", "1", "--em_cycle", "3",
                            "--unet_iters", "1", "--lr_step", "1", "--lr_gamma_mofa", "0.5",
                            "--lr_gamma_unet", "0.25")) == 0
    payloads = {k: load_checkpoint(save / "MoFA_UNet" / f"ckpt_{k:06d}.pt") for k in range(1, 5)}
    payloads[0] = {"models": {"encoder": inputs["encoder"], "unet": inputs["unet"]}}
    return payloads


def test_unet_steps_change_only_the_unet_and_mofa_steps_only_the_encoder(em_run):
    for step, phase in ((0, "unet"), (1, "unet"), (2, "mofa"), (3, "unet")):
        before, after = em_run[step]["models"], em_run[step + 1]["models"]
        frozen, trained = ("encoder", "unet") if phase == "unet" else ("unet", "encoder")
        assert _same(before[frozen], after[frozen]), f"step {step} ({phase} step) changed the {frozen}"
        assert _changed_parameters(before[trained], after[trained]) > 0, f"step {step} did not train the {trained}"


def test_both_schedulers_step_every_iteration_from_step_1s_decayed_rate(em_run):
    base = 0.1 * STEP1_LR_GAMMA ** (STEP1_STEPS // STEP1_LR_STEP) * 0.8  # learning_rate x Step 1's decay x G2's 0.8
    for step in range(1, 5):
        payload = em_run[step]
        assert payload["schedulers"]["encoder"]["last_epoch"] == step
        assert payload["schedulers"]["unet"]["last_epoch"] == step
        lr_mofa = payload["optimizers"]["encoder"]["param_groups"][0]["lr"]
        lr_unet = payload["optimizers"]["unet"]["param_groups"][0]["lr"]
        assert lr_mofa == pytest.approx(base * 0.5 ** step, rel=1e-9)
        assert lr_unet == pytest.approx(0.06 * base * 0.25 ** step, rel=1e-9)


def test_learning_rates_follow_step_1s_recorded_schedule_and_the_preset():
    """docs/method.md §10: after 300k Step-1 steps of StepLR(5000, 0.99), G2 (learning rate 0.1) starts Step 4 at
    0.043773 / 0.0026264 and G1 (its learning rate 0.06) at 0.032829 / 0.0019698."""
    step1 = {"step": 300000, "config": {"lr_step": 5000, "lr_gamma": 0.99}}
    g2, g1 = losses.PRESETS["g2"], losses.PRESETS["g1_weights"]
    lr_mofa, lr_unet = step4.learning_rates(Namespace(learning_rate=0.1, lr_mofa=None, lr_unet=None), g2, step1, "p")
    assert (lr_mofa, lr_unet) == (pytest.approx(0.043773, abs=1e-6), pytest.approx(0.0026264, abs=1e-7))
    args = Namespace(learning_rate=0.06, lr_mofa=None, lr_unet=None)
    lr_mofa, lr_unet = step4.learning_rates(args, g1, step1, "p")
    assert (lr_mofa, lr_unet) == (pytest.approx(0.032829, abs=1e-6), pytest.approx(0.0019698, abs=1e-7))
    other = {"step": 3000, "config": {"lr_step": 1000, "lr_gamma": 0.5}}  # read, not the hard-coded 5000 / 0.99
    assert step4.learning_rates(args, g1, other, "p")[0] == pytest.approx(0.06 * 0.5 ** 3)
    with pytest.raises(CheckpointError, match="pass --lr_mofa and --lr_unet"):
        step4.learning_rates(args, g2, {"step": 5, "config": {}}, "step1.pt")
    explicit = Namespace(learning_rate=0.1, lr_mofa=1e-3, lr_unet=2e-4)
    assert step4.learning_rates(explicit, g2, {"step": 5, "config": {}}, "step1.pt") == (1e-3, 2e-4)


def _loss_rows(save_root) -> list[list[str]]:
    with open(save_root / "MoFA_UNet" / "loss_train.csv", newline="") as fh:
        return list(csv.reader(fh))


def test_resume_across_an_epoch_boundary_with_two_workers_is_exact(tmp_path, inputs, caplog):
    """12 training images, batch 4: 3 batches per epoch. 2 steps + resume to 5 (crossing into epoch 1, and from a
    MoFA step into a UNet step) == 5 straight: both networks, both optimizers, both schedulers. The second call
    really resumes (a no-op resume, training 5 steps from scratch, would also match the straight run): it starts
    from latest.pt at step 2 and logs steps 3-5 only after the first call's 1-2."""
    extra = ["--em_cycle", "3", "--unet_iters", "0", "--lr_step", "2", "--ckpt_every", "1000", "--workers", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert step4.main(step4_argv(inputs, straight, *extra, "--max_iters", "5")) == 0
    assert step4.main(step4_argv(inputs, split, *extra, "--max_iters", "2")) == 0
    latest = split / "MoFA_UNet" / "latest.pt"
    assert load_checkpoint(latest)["step"] == 2
    first_rows = _loss_rows(split)
    with caplog.at_level(logging.INFO):
        assert step4.main(step4_argv(inputs, split, *extra, "--max_iters", "5", "--resume")) == 0
    assert f"resumed from {latest} at step 2" in caplog.text
    rows = _loss_rows(split)
    assert [r[0] for r in rows] == ["step", "1", "2", "3", "4", "5"]
    assert rows[:3] == first_rows and rows == _loss_rows(straight), "the logged losses differ from the straight run"
    a, b = (load_checkpoint(root / "MoFA_UNet" / "final.pt") for root in (straight, split))
    assert a["step"] == b["step"] == 5
    for net in ("encoder", "unet"):
        assert _same(a["models"][net], b["models"][net]), f"{net} differs after resume"
        assert _changed_parameters(a["models"][net], inputs[net]) > 0, f"{net} was not trained"
    for name in ("encoder", "unet"):
        sa, sb = a["optimizers"][name]["state"], b["optimizers"][name]["state"]
        assert sa.keys() == sb.keys() and all(_same(sa[k], sb[k]) for k in sa), f"optimizer {name} differs"
    assert a["schedulers"] == b["schedulers"]


def test_dropped_terms_are_skipped_in_training_and_logged_in_validation(tmp_path, inputs):
    """--drop_terms dist: the UNet-phase training rows log no dist (it is not computed), validation logs it; the
    other UNet-phase terms are logged in both."""
    save = tmp_path / "drop"
    assert step4.main(step4_argv(inputs, save, "--max_iters", "2", "--em_cycle", "3", "--unet_iters", "1",
                            "--identity", "dlib", "--drop_terms", "dist", "--eval_every", "2")) == 0

    def rows(name):
        with (save / "MoFA_UNet" / name).open(newline="") as fh:
            return list(csv.DictReader(fh))

    train, val = rows("loss_train.csv"), rows("loss_val.csv")
    assert len(train) == 2 and all(r["dist"] == "" and r["preserve"] != "" and r["neighbour"] != "" for r in train)
    assert val and all(r["dist"] != "" for r in val)
