"""Worker processes of tests/test_ddp.py, started as ``python -m tests.ddp_worker`` or under torchrun.

    toy OUT BATCH STEPS        the steps' shared training loop on a linear model (no BatchNorm, no dropout): every
                               rank writes OUT/rank<r>.pt (its parameters) when training ends
    step MODULE OUT ARGS...    run a step script's main(ARGS); every rank writes OUT/rank<r>_step<s>.pt (its models'
                               and optimizers' state dicts) wherever the loop checkpoints
    step_per_image MODULE OUT ARGS...
                               the same with BatchNorm on its running statistics and dropout off while training
                               (`per_image_modes`), so no image's loss depends on the others in its batch or on the
                               rank's RNG: the setting in which N processes x batch b must equal 1 x batch N b
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from utils.training.data_order import make_train_loader
from utils.training.loop import LoopHooks, TrainState, train_loop
from utils.training.run import Run, start_run

N_SAMPLES = 24


class ToyData(Dataset):
    """A fixed regression set: x (4,), y (3,) with y = A x + noise."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(123)
        self.x = torch.randn(N_SAMPLES, 4, generator=gen)
        self.y = self.x @ torch.randn(4, 3, generator=gen) + 0.1 * torch.randn(N_SAMPLES, 3, generator=gen)

    def __len__(self) -> int:
        return N_SAMPLES

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i], "index": i}


def toy(out: Path, batch_size: int, steps: int) -> None:
    args = argparse.Namespace(device="cpu", seed=0, save_root=out / "save", resume=False, log_every=1, vis_every=0,
                              eval_every=0, ckpt_every=steps, amp=False)
    run = start_run(args, step=3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    net = run.ddp(model)
    loader, sampler = make_train_loader(ToyData(), batch_size, seed=0, workers=0, rank=run.dist.rank,
                                        world_size=run.dist.world_size)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    state = TrainState({"toy": model}, {"toy": opt}, {"toy": sched})

    def forward(step, batch):
        loss = (net(batch["x"]) - batch["y"]).pow(2).mean()
        return loss, {"mse": loss.detach()}, ["toy"]

    rank = run.dist.rank
    train_loop(run, loader, sampler, 0, steps, LoopHooks(forward, lambda: {}, lambda: {}), state, {}, _Quiet())
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / f"rank{rank}.pt")


class _Quiet:
    """A RunMonitor that records nothing."""

    def advance(self, loss) -> None: ...

    def scalars(self, step, values, split="train") -> None: ...

    def images(self, step, grids) -> None: ...

    def close(self) -> None: ...


def per_image_modes() -> None:
    """Keep every BatchNorm and dropout layer in eval mode whatever ``.train()`` asks (patches ``nn.Module.train``
    for this process). Batch statistics are computed per process under DDP and dropout masks come from each rank's
    own seed, so these two would make 2 x b differ from 1 x 2b by design, not by a bug."""
    original = nn.Module.train

    def train(self: nn.Module, mode: bool = True) -> nn.Module:
        original(self, mode)
        for module in self.modules():
            if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)):
                original(module, False)
        return self

    nn.Module.train = train


def step(module: str, out: Path, argv: list[str]) -> int:
    original = Run.save

    def save_every_rank(self: Run, step: int, models: dict, optimizers: dict, schedulers: dict, spec: dict) -> None:
        dump = {"models": {k: {n: t.detach().clone() for n, t in getattr(m, "module", m).state_dict().items()}
                           for k, m in models.items()},
                "optimizers": {k: o.state_dict() for k, o in optimizers.items()}}
        torch.save(dump, out / f"rank{self.dist.rank}_step{step}.pt")
        original(self, step, models, optimizers, schedulers, spec)

    Run.save = save_every_rank
    return importlib.import_module(module).main(argv)


if __name__ == "__main__":
    mode, target = sys.argv[1], sys.argv[2]
    if mode == "toy":
        toy(Path(target), int(sys.argv[3]), int(sys.argv[4]))
    else:
        out_dir = Path(sys.argv[3])
        out_dir.mkdir(parents=True, exist_ok=True)
        if mode == "step_per_image":
            per_image_modes()
        sys.exit(step(target, out_dir, sys.argv[4:]))
