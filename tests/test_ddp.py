"""Data-parallel training under torchrun with 2 CPU processes (gloo): equivalence with one process and rank agreement.

Equivalence (2 processes with batch b == 1 process with batch 2b) is checked on the steps' shared machinery
(`start_run`, `Run.ddp`, `make_train_loader`, `train_loop`) with a linear model, and on Step 3 and Step 4's UNet
phase with BatchNorm held on its running statistics and dropout off (`ddp_worker.per_image_modes`): in normal
training BatchNorm statistics are per process under DDP (SyncBatchNorm is CUDA-only) and dropout masks follow each
rank's seed, so the steps are not expected to match a single process there. Steps 3 and 4 are also run as they
train: both ranks must end bit-identical.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.step_inputs import common_args, step4_inputs, unet_trainset
from utils.cli import repo_root
from utils.training.checkpoint import load_checkpoint

REPO = repo_root()
STEPS = 4
FAST = ["--batch_size", "2", "--log_every", "1", "--vis_every", "1000", "--eval_every", "1000", "--val_batches", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _python(args: list[str], processes: int = 1) -> None:
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                str(_free_port()), "-m"] if processes > 1 else ["-m"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    res = subprocess.run([sys.executable, *launcher, "tests.ddp_worker", *args], cwd=REPO, capture_output=True,
                         text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]


def test_two_processes_with_batch_b_match_one_process_with_batch_2b(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    _python(["toy", str(one), "8", str(STEPS)])
    _python(["toy", str(two), "4", str(STEPS)], processes=2)
    single, rank0, rank1 = (torch.load(p) for p in (one / "rank0.pt", two / "rank0.pt", two / "rank1.pt"))
    for key, value in single.items():
        assert torch.equal(rank0[key], rank1[key]), f"ranks differ in {key}"
        torch.testing.assert_close(rank0[key], value, rtol=1e-5, atol=1e-6, msg=f"{key}: 2 x b != 1 x 2b")
    torch.manual_seed(0)
    start = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).state_dict()
    assert all(not torch.allclose(start[k], single[k]) for k in single), "the toy model did not train"
    written = load_checkpoint(two / "save" / "Pretrain_UNet" / "final.pt")["models"]["toy"]
    assert all(torch.equal(written[k], rank0[k]) for k in written), "final.pt is not rank 0's model"


def _ranks_agree(out: Path, step: int) -> dict:
    rank0, rank1 = (torch.load(out / f"rank{r}_step{step}.pt") for r in (0, 1))
    for net, state in rank0["models"].items():
        for key, value in state.items():
            if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
                continue  # BatchNorm statistics are per process (broadcast_buffers=False); rank 0's are saved
            assert torch.equal(value, rank1["models"][net][key]), f"{net}.{key} differs between the ranks"
    for name, opt in rank0["optimizers"].items():
        other = rank1["optimizers"][name]["state"]
        for index, entries in opt["state"].items():
            assert all(torch.equal(v, other[index][k]) for k, v in entries.items()), f"optimizer {name} differs"
    return rank0


def test_step3_two_processes_with_batch_b_match_one_with_2b_when_batchnorm_is_per_image(tmp_path):
    """Step 3's training path (UNet, BCE, Adadelta, sampler, DDP) under torchrun: with BatchNorm on its running
    statistics and dropout off, 2 processes x batch 2 train the UNet that 1 process x batch 4 trains."""
    trainset = unet_trainset(tmp_path / "data")
    args = [*common_args(tmp_path / "no_images", tmp_path / "no.h5", tmp_path / "unused"), *FAST,
            "--trainset_dir", str(trainset), "--max_iters", "3", "--ckpt_every", "1", "--bn_recalibration", "0"]
    runs = {}
    for name, batch, processes in (("one", 4, 1), ("two", 2, 2)):
        out = tmp_path / name
        _python(["step_per_image", "Step3_Pretrain_Unet", str(out / "dump"), *args, "--save_root", str(out / "save"),
                 "--batch_size", str(batch)], processes=processes)
        runs[name] = {k: torch.load(out / "dump" / f"rank0_step{k}.pt")["models"]["unet"] for k in (1, 3)}
    for key, value in runs["one"][3].items():
        torch.testing.assert_close(runs["two"][3][key], value, rtol=1e-4, atol=1e-6, msg=f"unet.{key}: 2 x b != 1 x 2b")
    assert sum(not torch.equal(runs["one"][1][k], runs["one"][3][k]) for k in runs["one"][3]) > 10, "not trained"


def test_step3_under_torchrun_keeps_both_ranks_identical(tmp_path):
    unet_trainset(tmp_path / "save")
    args = [*common_args(tmp_path / "no_images", tmp_path / "no.h5", tmp_path / "save"), *FAST,
            "--max_iters", "3", "--ckpt_every", "3"]
    _python(["step", "Step3_Pretrain_Unet", str(tmp_path / "dump"), *args], processes=2)
    dumped = _ranks_agree(tmp_path / "dump", 3)["models"]["unet"]
    final = load_checkpoint(tmp_path / "save" / "Pretrain_UNet" / "final.pt")
    assert final["step"] == 3 and all(torch.equal(final["models"]["unet"][k], v) for k, v in dumped.items())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, demo_bfm_h5) -> dict:
    return step4_inputs(tmp_path_factory.mktemp("ddp_step4"), demo_bfm_h5)


def test_step4_unet_phase_two_processes_with_batch_b_match_one_with_2b_when_batchnorm_is_per_image(tmp_path,
                                                                                                   inputs):
    """Step 4's UNet phase (MoFA render, identity features, binary / area / preserve / dist / neighbour terms)
    under torchrun, BatchNorm on running statistics and dropout off: 2 x batch 2 == 1 x batch 4 (3 UNet steps).

    The MoFA phase is checked for rank agreement only (below): its masked reconstruction term is pooled over the
    batch (sum of M ||I - R|| / sum of M, `losses.masked_reconstruction`, as the original), so averaging the two
    processes' gradients weights each half by 1/2 instead of by its share of the mask: 2 x b differs from 1 x 2b
    by design there, by an amount set by the data, which no tolerance could bound."""
    args = [*common_args(inputs["root"], inputs["bfm"], tmp_path / "unused"), "--pretrained_MoFA",
            str(inputs["save"] / "pretrain_mofa"), "--pretrained_unet", str(inputs["save"] / "Pretrain_UNet"), *FAST,
            "--optimizer", "adam", "--max_iters", "3", "--ckpt_every", "3", "--em_cycle", "3", "--unet_iters", "2",
            "--bn_recalibration", "0"]
    runs = {}
    for name, batch, processes in (("one", 4, 1), ("two", 2, 2)):
        out = tmp_path / name
        _python(["step_per_image", "Step4_UNet_MoFA_EM", str(out / "dump"), *args, "--save_root",
                 str(out / "save"), "--batch_size", str(batch)], processes=processes)
        runs[name] = torch.load(out / "dump" / "rank0_step3.pt")["models"]
    for key, value in runs["one"]["unet"].items():
        torch.testing.assert_close(runs["two"]["unet"][key], value, rtol=1e-4, atol=1e-6,
                                   msg=f"unet.{key}: 2 x b != 1 x 2b")
    assert sum(not torch.equal(v, inputs["unet"][k]) for k, v in runs["one"]["unet"].items()) > 10, "not trained"
    assert all(torch.equal(v, inputs["encoder"][k]) for k, v in runs["one"]["encoder"].items()), "MoFA step ran"


def test_step4_under_torchrun_keeps_both_ranks_identical_through_both_phases(tmp_path, inputs):
    args = [*common_args(inputs["root"], inputs["bfm"], tmp_path / "save"), "--pretrained_MoFA",
            str(inputs["save"] / "pretrain_mofa"), "--pretrained_unet", str(inputs["save"] / "Pretrain_UNet"), *FAST,
            "--optimizer", "adam", "--max_iters", "3", "--ckpt_every", "3", "--em_cycle", "3", "--unet_iters", "0"]
    _python(["step", "Step4_UNet_MoFA_EM", str(tmp_path / "dump"), *args], processes=2)
    models = _ranks_agree(tmp_path / "dump", 3)["models"]
    for net in ("encoder", "unet"):  # step 0 trains the UNet, steps 1 and 2 the encoder
        assert any(not torch.equal(models[net][k], v) for k, v in inputs[net].items() if v.is_floating_point())
