"""The loop every training step shares: optimise, log, show, validate, checkpoint, stop cleanly on Ctrl-C.

The step scripts supply what differs (``LoopHooks``); nothing here knows about faces.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import DataLoader

from utils.training.data_order import iterate_steps
from utils.training.guards import NonFiniteGuard, StopFlag
from utils.training.run import Run, conclude

log = logging.getLogger(__name__)


@dataclass
class LoopHooks:
    """What differs between the training steps; ``train_loop`` does the rest.

    forward(step, batch) -> (loss, terms, names): sets train/eval modes, returns the loss, its named terms and the
    names (keys of the optimizer dict) of the optimizers to step. visualise() -> name -> (B,C,H,W) images in [0,1].
    validate() -> name -> float, the means over the validation split.
    """

    forward: Callable
    visualise: Callable
    validate: Callable

def train_loop(run: Run, loader, sampler, start: int, end: int, hooks: LoopHooks, state: tuple, spec: dict,
               monitor) -> int:
    """The loop every training step shares: optimise, log, show, validate, checkpoint, stop cleanly on Ctrl-C."""
    args, (_, optimizers, schedulers) = run.args, state
    guard, running = NonFiniteGuard(), RunningMean()
    pending: list[dict] = []  # this log period's loss terms, still on the device: read (one sync) when logged
    step = start
    with StopFlag() as stop:
        for step, batch in iterate_steps(loader, sampler, start, end):
            loss, terms, names = hooks.forward(step, batch)
            for opt in optimizers.values():
                opt.zero_grad(set_to_none=True)
            if guard.ok(loss, step):
                loss.backward()
                for name in names:
                    optimizers[name].step()
            for sched in schedulers.values():
                sched.step()
            step += 1
            pending.append({k: v.detach() if torch.is_tensor(v) else v for k, v in {"total": loss, **terms}.items()})
            shown = None
            if due(step, args.log_every, end):
                for values in pending:
                    running.add(values)
                pending.clear()
                lrs = {f"lr_{name}": sched.get_last_lr()[0] for name, sched in schedulers.items()}
                means = running.mean()
                monitor.scalars(step, {**means, **lrs})
                shown = means.get("total")
                running.reset()
            monitor.advance(shown)
            if run.is_main and due(step, args.vis_every, end):
                with torch.no_grad():
                    monitor.images(step, hooks.visualise())
            if run.is_main and due(step, args.eval_every, end):
                monitor.scalars(step, hooks.validate(), split="val")
            if step % args.ckpt_every == 0 or stop.requested:
                run.save(step, *state, spec)
            if stop.requested:
                break
    return conclude(run, step, end, stop.requested, state, spec, monitor)

def due(step: int, every: int, end: int) -> bool:
    """True every ``every`` steps and at the last step (``every`` <= 0 means only at the end)."""
    return step == end or (every > 0 and step % every == 0)


class RunningMean:
    """Mean of scalar loss terms over the steps since the last ``reset``."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, terms: dict[str, torch.Tensor | float | None]) -> None:
        for k, v in terms.items():
            if v is not None:
                self.sums[k] = self.sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
        self.count += 1

    def mean(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}

    def reset(self) -> None:
        self.sums, self.count = {}, 0

@torch.no_grad()
def validate(objective, loader: DataLoader, max_batches: int = 0) -> dict[str, float]:
    """Mean of every loss term over the split (weighted by batch size); the original logged the last batch only.

    ``objective(batch) -> (total, terms)``; terms that are None are left out.
    """
    sums: dict[str, float] = {}
    count = 0
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        total, terms = objective(batch)
        n = len(next(iter(batch.values())))
        for k, v in {"total": total, **terms}.items():
            if v is not None:
                sums[k] = sums.get(k, 0.0) + float(v) * n
        count += n
    return {k: v / max(count, 1) for k, v in sums.items()}
