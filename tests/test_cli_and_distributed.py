"""Device resolution, seeding, repo-relative defaults, distributed setup and the CLI wrapper."""
import argparse
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist

from models.errors import WeightsError
from utils import cli
from utils.errors import DataError
from utils.training import distributed, flags


def test_resolve_device(monkeypatch):
    assert cli.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(cli.SetupError, match="--device cuda:0: CUDA is not available"):
        cli.resolve_device("cuda:0")
    with pytest.raises(cli.SetupError, match="expected auto, cpu"):
        cli.resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli.resolve_device("auto") == torch.device("cuda")
    assert cli.resolve_device("CUDA:0") == torch.device("cuda:0")
    with pytest.raises(cli.SetupError, match="only 1 CUDA device"):
        cli.resolve_device("cuda:3")
    with pytest.raises(cli.SetupError, match="cuda:<index>"):
        cli.resolve_device("cuda:x")


def test_seed_everything_is_reproducible():
    distributed.seed_everything(42)
    a = (torch.rand(3), np.random.rand(2))
    distributed.seed_everything(42)
    b = (torch.rand(3), np.random.rand(2))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_defaults_resolve_against_repo_root_user_paths_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = cli.repo_root()
    assert (root / "utils" / "cli.py").is_file()
    assert cli.repo_path("basel_3DMM/x.h5") == root / "basel_3DMM" / "x.h5"
    assert cli.repo_path(tmp_path / "y") == tmp_path / "y"

    parser = flags.add_common_args(argparse.ArgumentParser())
    args = cli.resolve_paths(parser.parse_args(["--img_path", "data"]))
    assert args.bfm == root / cli.DEFAULT_BFM and args.save_root == root / "MoFA_UNet_Save"
    assert args.img_path.resolve() == tmp_path / "data"
    args = cli.resolve_paths(parser.parse_args(["--img_path", "d", "--bfm", "my.h5", "--save_root", "out"]))
    assert args.bfm.resolve() == tmp_path / "my.h5" and args.save_root.resolve() == tmp_path / "out"
    assert (args.device, args.seed, args.workers, args.image_size, args.encoder, args.unet_width) == \
        ("auto", 0, 2, 224, "resnet50", 64)


def test_common_args_validation(capsys):
    parser = flags.add_common_args(argparse.ArgumentParser())
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --img_path is required by default
    with pytest.raises(SystemExit):
        parser.parse_args(["--img_path", "x", "--encoder", "vgg19"])
    optional = flags.add_common_args(argparse.ArgumentParser(), img_path_required=False)
    assert optional.parse_args([]).img_path is None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_init_distributed_single_process_and_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = distributed.init_distributed("cpu")
    assert info == distributed.DistInfo(0, 1, 0, True, torch.device("cpu")) and not dist.is_initialized()

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        info = distributed.init_distributed("cpu")
        assert dist.is_initialized() and dist.get_backend() == "gloo"
        assert (info.rank, info.world_size, info.is_main, info.device) == (0, 1, True, torch.device("cpu"))
    finally:
        distributed.cleanup_distributed()
    assert not dist.is_initialized()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(cli.SetupError, match="RANK='x'"):
        distributed.init_distributed("cpu")


@pytest.mark.parametrize("exc, code, line", [
    (DataError("bad csv\n  line 3"), 2, "error: bad csv line 3"),
    (WeightsError("weights.pth missing"), 2, "error: weights.pth missing"),
    (KeyboardInterrupt(), 130, "error: interrupted"),
])
def test_cli_main_prints_one_line(exc, code, line, capsys):
    def fn(argv):
        raise exc

    with pytest.raises(SystemExit) as info:
        cli.cli_main(fn, ["x"])
    assert info.value.code == code
    assert capsys.readouterr().err == line + "\n"


def test_cli_main_passes_argv_and_status():
    seen = []
    with pytest.raises(SystemExit) as info:
        cli.cli_main(lambda argv: seen.append(argv), ["--a"])
    assert info.value.code == 0 and seen == [["--a"]]
    with pytest.raises(SystemExit) as info:
        cli.cli_main(lambda argv: 3)
    assert info.value.code == 3
    with pytest.raises(ZeroDivisionError):  # programming errors keep their traceback
        cli.cli_main(lambda argv: 1 / 0)


def test_nan_guard_skips_on_every_process_when_one_has_a_nan(monkeypatch):
    """Under torch.distributed the skip decision is shared: a finite loss here, a NaN on another process (the
    all-reduce returns 0) skips here too, so no process runs a backward the others never join."""
    from utils.training.guards import NonFiniteGuard
    reduced = []

    def all_reduce(flag, op):
        reduced.append((int(flag), op))
        flag.zero_()  # the other process's loss was not finite

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    guard = NonFiniteGuard(patience=2)
    assert guard.ok(torch.tensor(1.0), step=0) is False and reduced == [(1, dist.ReduceOp.MIN)]
    monkeypatch.setattr(dist, "all_reduce", lambda flag, op: None)  # every process finite
    assert guard.ok(torch.tensor(1.0), step=1) is True and guard.in_a_row == 0
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    assert guard.ok(torch.tensor(float("nan")), step=2) is False and guard.skipped == 2
