"""Checkpoint round trip, strict loading, atomic writes and RNG restore."""
import json
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from utils.errors import MofaError
from utils.training import checkpoint as ck


def _net(seed=0, width=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, width), nn.BatchNorm1d(width), nn.Linear(width, 2))


def _train_state(seed=0):
    net = _net(seed)
    opt = torch.optim.Adadelta(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        net(torch.randn(5, 3)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return net, opt, sched


@dataclass
class _Cfg:
    lr: float = 0.1
    save_root: object = None


def test_round_trip_restores_everything(tmp_path):
    net, opt, sched = _train_state(0)
    cfg = _Cfg(save_root=tmp_path / "runs")
    path = ck.save_training_state(tmp_path, 7, {"enc": net}, {"enc": opt}, {"enc": sched}, cfg, extra={"k": 1})
    assert path.name == "ckpt_000007.pt" and (tmp_path / "latest.pt").is_file()
    assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 0.1, "save_root": str(tmp_path / "runs")}

    net2, opt2, sched2 = _train_state(1)
    payload = ck.load_checkpoint(tmp_path / "latest.pt")
    assert payload["extra"] == {"k": 1} and payload["config"]["lr"] == 0.1
    step = ck.restore_training_state(payload, {"enc": net2}, {"enc": opt2}, {"enc": sched2})
    assert step == 7
    for a, b in zip(net.state_dict().values(), net2.state_dict().values()):
        assert torch.equal(a, b)
    assert sched2.last_epoch == sched.last_epoch and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["square_avg"], s2[k]["square_avg"]) for k in s1)


def test_ddp_wrapper_is_unwrapped(tmp_path):
    net = _net()
    wrapped = nn.DataParallel(net)  # same `.module` convention as DistributedDataParallel
    ck.save_training_state(tmp_path, 1, {"enc": wrapped})
    keys = set(ck.load_checkpoint(tmp_path / "latest.pt")["models"]["enc"])
    assert keys == set(net.state_dict()) and not any(k.startswith("module.") for k in keys)


def test_strict_loading_names_model_and_keys(tmp_path):
    ck.save_training_state(tmp_path, 1, {"unet": _net()})
    payload = ck.load_checkpoint(tmp_path / "ckpt_000001.pt")
    other = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(ck.CheckpointError) as info:
        ck.restore_training_state(payload, {"unet": other})
    msg = str(info.value)
    assert "'unet'" in msg and "unexpected keys [2.bias, 2.weight]" in msg and "\n" not in msg
    with pytest.raises(ck.CheckpointError, match="size mismatch"):
        ck.restore_training_state(payload, {"unet": _net(width=5)})
    with pytest.raises(ck.CheckpointError, match="no model 'enc'"):
        ck.restore_training_state(payload, {"enc": _net()})


def test_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(ck.CheckpointError, match="not found: run Step1"):
        ck.load_checkpoint(tmp_path / "nope.pt", hint="run Step1_Pretrain_MoFA.py first")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ck.CheckpointError, match="bad.pt is corrupt"):
        ck.load_checkpoint(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save(_net().state_dict(), foreign)
    with pytest.raises(ck.CheckpointError, match="not a mofa-ckpt-v1"):
        ck.load_checkpoint(foreign)
    assert issubclass(ck.CheckpointError, MofaError)


def test_refuses_to_pickle_modules(tmp_path):
    with pytest.raises(TypeError, match="state_dict"):
        ck.save_checkpoint(tmp_path / "x.pt", {"models": {"enc": _net()}})
    assert not (tmp_path / "x.pt").exists()


def test_failed_write_leaves_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "a.pt"
    ck.save_checkpoint(path, {"format": ck.FORMAT, "step": 1})
    before = path.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half-written garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(path, {"format": ck.FORMAT, "step": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert ck.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # temp file cleaned up


def test_rng_restore_reproduces_random_numbers(tmp_path):
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(9)
    ck.save_training_state(tmp_path, 3, {"m": _net()})
    draws = (torch.rand(4), np.random.rand(3), np.random.randn(2), random.random())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    ck.restore_training_state(ck.load_checkpoint(tmp_path / "latest.pt"), {"m": _net()})
    again = (torch.rand(4), np.random.rand(3), np.random.randn(2), random.random())
    assert torch.equal(draws[0], again[0])
    assert np.array_equal(draws[1], again[1]) and np.array_equal(draws[2], again[2])
    assert draws[3] == again[3]


def test_find_latest(tmp_path):
    assert ck.find_latest(tmp_path / "missing") is None
    assert ck.find_latest(tmp_path) is None
    for step in (5, 20, 10):
        ck.save_training_state(tmp_path, step, {"m": _net()})
    assert ck.find_latest(tmp_path).name == "latest.pt"  # the last one written, not the highest-numbered
    assert ck.load_checkpoint(tmp_path / "latest.pt")["step"] == 10
    (tmp_path / "latest.pt").unlink()  # killed between the step checkpoint and latest.pt
    assert ck.find_latest(tmp_path).name == "ckpt_000020.pt"
