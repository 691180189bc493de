"""Set-up and bookkeeping shared by the training steps: flags, process group, output folder, checkpoints, resume.

Every step runs unchanged as one process or under ``torchrun --nproc_per_node=N`` (NCCL on CUDA, gloo on CPU);
only rank 0 writes files.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from utils import runtime
from utils.builders import mark_final, step_dir
from utils.checkpoint import find_latest, load_checkpoint, restore_training_state, save_training_state
from utils.training import NonFiniteGuard, RunningMean, StopFlag, iterate_steps

log = logging.getLogger(__name__)


def add_training_args(parser: argparse.ArgumentParser, *, lr: float, epochs: int, batch_size: int,
                      ckpt_every: int, vis_every: int, eval_every: int) -> None:
    """Flags of every training step (1, 3, 4); defaults are the paper's for that step."""
    g = parser.add_argument_group("training")
    g.add_argument("--learning_rate", type=float, default=lr, help="Adadelta learning rate (default %(default)s)")
    g.add_argument("--epochs", type=int, default=epochs, help="epochs (default %(default)s)")
    g.add_argument("--batch_size", type=int, default=batch_size, help="batch size per process (default %(default)s)")
    g.add_argument("--max_iters", type=int, default=None, help="total optimizer steps; overrides --epochs")
    g.add_argument("--resume", action="store_true", help="continue from this step's latest.pt under --save_root")
    g.add_argument("--ckpt_every", type=int, default=ckpt_every, help="checkpoint period in steps")
    g.add_argument("--vis_every", type=int, default=vis_every, help="image-tile period in steps")
    g.add_argument("--eval_every", type=int, default=eval_every, help="validation period in steps")
    g.add_argument("--log_every", type=int, default=50, help="CSV/TensorBoard loss period in steps")
    g.add_argument("--val_batches", type=int, default=0,
                   help="validate on at most this many batches (0 = the whole validation split)")
    g.add_argument("--amp", action="store_true",
                   help="bfloat16 autocast for the encoder and the UNet on CUDA (the renderer stays float32)")
    g.add_argument("--optimizer", choices=("adadelta", "adam"), default="adadelta",
                   help="Adadelta as in the paper (default), or Adam for short runs such as the demo")


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """The paper's Adadelta (its other settings at their defaults), or Adam for short CPU runs."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.Adadelta(params, lr=lr)


@dataclass
class Run:
    """One step's run: process info, device and output folder."""

    args: argparse.Namespace
    dist: "runtime.DistInfo"
    device: torch.device
    out_dir: Path

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def ddp(self, module: torch.nn.Module) -> torch.nn.Module:
        """Wrap a trainable module for data-parallel training when running under torchrun."""
        if self.dist.world_size <= 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)

    def autocast(self):
        """Mixed precision for network forwards when --amp is given on CUDA; a no-op otherwise."""
        enabled = bool(getattr(self.args, "amp", False)) and self.device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled)

    def save(self, step: int, models: dict, optimizers: dict, schedulers: dict, spec: dict) -> None:
        if self.is_main:
            save_training_state(self.out_dir, step, models, optimizers, schedulers, config=vars(self.args),
                                extra={"model": spec})

    def resume(self, models: dict, optimizers: dict, schedulers: dict) -> int:
        """With --resume, restore everything from ``latest.pt`` and return its step; else 0."""
        if not self.args.resume:
            return 0
        path = find_latest(self.out_dir)
        if path is None:
            log.warning("--resume: no checkpoint in %s yet, starting from scratch", self.out_dir)
            return 0
        payload = load_checkpoint(path, map_location=self.device)
        restore_training_state(payload, models, optimizers, schedulers, restore_rng=True)
        log.info("resumed from %s at step %d", path, payload["step"])
        return int(payload["step"])

    def barrier(self) -> None:
        if self.dist.world_size > 1:
            torch.distributed.barrier()


def start_run(args: argparse.Namespace, step: int) -> Run:
    """Logging, process group, device, seed and the output folder (with the resolved config as JSON)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    dist = runtime.init_distributed(args.device)
    runtime.seed_everything(args.seed + dist.rank)
    out_dir = step_dir(args.save_root, step)
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "run_config.json").write_text(json.dumps(vars(args), indent=2, default=str))
    return Run(args=args, dist=dist, device=dist.device, out_dir=out_dir)


def finish_run(run: Run) -> None:
    runtime.cleanup_distributed()


def conclude(run: Run, step: int, end: int, interrupted: bool, state: tuple, spec: dict, monitor) -> int:
    """End a training step: on interrupt the checkpoint is already written (exit 130); else write final.pt."""
    monitor.close()
    if interrupted and step < end:
        log.warning("interrupted at step %d: checkpoint written to %s; continue with --resume", step, run.out_dir)
        finish_run(run)
        return 130
    if run.is_main:
        run.save(step, *state, spec)
        log.info("done: %s", mark_final(run.out_dir))
    finish_run(run)
    return 0


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
            running.add({"total": loss, **terms})
            monitor.advance(float(loss.detach()))
            if due(step, args.log_every, end):
                lrs = {f"lr_{name}": sched.get_last_lr()[0] for name, sched in schedulers.items()}
                monitor.scalars(step, {**running.mean(), **lrs})
                running.reset()
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
