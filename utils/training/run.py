"""One step's run from start to end: process group, device, seed, output folder, checkpoints, resume, final.pt.

Every step runs unchanged as one process or under ``torchrun --nproc_per_node=N`` (NCCL on CUDA, gloo on CPU);
only rank 0 writes files.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from utils.training import distributed
from utils.training.builders import FINAL_NAME, mark_final, spec_mismatches, step_dir
from utils.training.checkpoint import (LATEST_NAME, CheckpointError, config_to_dict, find_latest, load_checkpoint,
                                       restore_training_state, save_training_state)
from utils.training.flags import check_flags
from utils.training.run_folder import RunFolderError, check_output, claim_output, hold_lock, release_lock

log = logging.getLogger(__name__)
# Flags a resumed run may change without a word (how long, how often, on what hardware).
RESUME_FREE = {"resume", "overwrite", "max_iters", "epochs", "device", "workers", "keep_ckpts", "log_every",
               "vis_every", "eval_every", "ckpt_every", "val_batches", "amp", "bfm", "save_root"}
# Flags whose values a resumed run does not use: the optimizer and scheduler states restored from the checkpoint
# carry the learning rates and the StepLR period and decay. A changed one is put back to the checkpoint's value, so
# run_config.json and the new checkpoints record what the run uses (Step 4 reads Step 1's schedule from there).
RESTORED_BY_STATE = ("learning_rate", "lr_step", "lr_gamma", "lr_mofa", "lr_unet", "lr_gamma_mofa", "lr_gamma_unet")


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """The paper's Adadelta (its other settings at their defaults), or Adam for short CPU runs (the fused
    implementation: one kernel for all parameters, ~3x faster than the per-parameter loop on CPU)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, fused=True)
    return torch.optim.Adadelta(params, lr=lr)

@dataclass
class Run:
    """One step's run: process info, device and output folder."""

    args: argparse.Namespace
    dist: distributed.DistInfo
    device: torch.device
    out_dir: Path
    pipeline_step: int = 0  # 1-4
    saved_step: int | None = None  # the step latest.pt holds, once this run wrote or resumed it

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
                                extra={"model": spec}, keep=getattr(self.args, "keep_ckpts", 0))
            self.saved_step = step

    def resume(self, models: dict, optimizers: dict, schedulers: dict, spec: dict | None = None) -> int:
        """The last set-up call, once the inputs are checked: with --resume restore everything from ``latest.pt``
        (refusing a run with other networks, ``spec``, or another optimizer) and return its step, else 0; then
        claim the output folder (``claim``)."""
        start = 0
        path = find_latest(self.out_dir) if self.args.resume else None
        if self.args.resume and path is None:
            if (self.out_dir / FINAL_NAME).is_file():
                raise RunFolderError(f"--resume: {self.out_dir} holds a finished run ({FINAL_NAME}) but no "
                                     f"{LATEST_NAME} to continue from; pass --overwrite to start again")
            log.warning("--resume: no checkpoint in %s yet, starting from scratch", self.out_dir)
        if path is not None:
            payload = load_checkpoint(path, map_location=self.device)
            self._check_resumable(payload, path, spec)
            try:
                start = restore_training_state(payload, models, optimizers, schedulers, restore_rng=True)
            except CheckpointError as exc:
                raise CheckpointError(f"--resume from {path}: {exc}") from None
            self.saved_step = start if path.name == LATEST_NAME else None
            log.info("resumed from %s at step %d", path, start)
        self.claim(replace=start == 0)
        return start

    def _check_resumable(self, payload: dict, path: Path, spec: dict | None) -> None:
        theirs = (payload.get("extra") or {}).get("model")
        if spec is not None and theirs is not None and theirs != spec:
            raise CheckpointError(f"--resume: {path} was trained with other networks: "
                                  f"{'; '.join(spec_mismatches(theirs, spec))}; resume with the run's flags, or "
                                  "start a new run with --overwrite or another --save_root")
        # the checkpoint holds the config as JSON (tuples became lists, paths strings): compare like with like
        before, now = payload.get("config") or {}, config_to_dict(self.args)
        changed = [k for k in sorted(set(before) & set(now) - RESUME_FREE) if before[k] != now[k]]
        ignored = [k for k in changed if k in RESTORED_BY_STATE]
        for key in ignored:
            setattr(self.args, key, before[key])
        if ignored:
            log.warning("--resume: %s ignored: the optimizer and scheduler states (learning rates, StepLR period and "
                        "decay) continue from the checkpoint, so the run keeps %s",
                        ", ".join(f"--{k} {now[k]}" for k in ignored),
                        ", ".join(f"--{k} {before[k]}" for k in ignored))
        used = [f"--{k} {now[k]} (was {before[k]})" for k in changed if k not in RESTORED_BY_STATE]
        if used:
            log.warning("--resume: %s; the weights, optimizer and scheduler states continue from the checkpoint",
                        ", ".join(used))

    def claim(self, replace: bool = True, planned: list[str] | None = None) -> None:
        """Make the output folder this run's (see ``run_folder.claim_output``; it takes the folder's lock first):
        ``replace`` removes an old run's files, which only happens with --overwrite or a --resume that found no
        checkpoint; ``planned`` (Step 2) lists the files the run will write."""
        if self.is_main:
            claim_output(self.out_dir, self.pipeline_step, self.args, replace=replace and (
                bool(getattr(self.args, "overwrite", False)) or bool(getattr(self.args, "resume", False))),
                planned=planned)
        self.barrier()

    def barrier(self) -> None:
        if self.dist.world_size > 1:
            torch.distributed.barrier()

def start_run(args: argparse.Namespace, step: int) -> Run:
    """Check the flags and the output folder (writing nothing: ``Run.resume`` / ``Run.claim`` write, once the inputs
    are checked), then process group, device and seed."""
    check_flags(args)
    out_dir = step_dir(args.save_root, step)
    check_output(out_dir, step, args)
    dist = distributed.init_distributed(args.device)
    if dist.is_main:  # a live run in the folder (its lock file exists) is refused now, before any work
        hold_lock(out_dir, create=False)
    distributed.seed_everything(args.seed + dist.rank)
    run = Run(args=args, dist=dist, device=dist.device, out_dir=out_dir, pipeline_step=step)
    run.barrier()  # every process has looked at the folder before the main one claims it
    return run

def finish_run(run: Run) -> None:
    """The end of a run: give up the run folder's lock and leave the process group."""
    if run.is_main:
        release_lock(run.out_dir)
    distributed.cleanup_distributed()

def conclude(run: Run, step: int, end: int, interrupted: bool, state: tuple, spec: dict, monitor) -> int:
    """End a training step: on interrupt the checkpoint is already written (exit 130); else write final.pt."""
    monitor.close()
    if interrupted and step < end:
        log.warning("interrupted at step %d: checkpoint written to %s; continue with --resume", step, run.out_dir)
        finish_run(run)
        return 130
    if run.is_main:
        if run.saved_step != step:
            run.save(step, *state, spec)
        log.info("done: %s", mark_final(run.out_dir))
    finish_run(run)
    return 0
