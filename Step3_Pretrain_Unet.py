# ruff: noqa: E402  (the imports follow the start-up Ctrl-C handler)
"""Step 3: pretrain the UNet on the Step-2 preliminary masks.

    python Step3_Pretrain_Unet.py [--save_root MoFA_UNet_Save]

Input: cat([render, image]) (6 channels) from <save_root>/UNet_trainset/{train,val}_list.csv. Loss: binary
cross-entropy on the UNet logits, which are G2's 5 * head output (models/unet.py; the sigmoid applied once, the
original applied it twice). Adadelta, StepLR(5000, 0.99) per step. At the end the BatchNorm statistics are
re-estimated with dropout off (--bn_recalibration; 0 = the original). A mask that collapses to empty or full inside
the face stops the run (--collapse). Writes <save_root>/Pretrain_UNet/ like Step 1.
"""
from __future__ import annotations

if __name__ == "__main__":  # Ctrl-C while torch is imported: one line, no traceback (utils/startup.py)
    from utils.startup import quiet_interrupts
    quiet_interrupts()

import argparse
import logging
from pathlib import Path

import torch

from models.unet import mask_from_logits
from utils import cli, losses
from utils.data.augment import augmenter_from_args
from utils.data.unet_trainset import UNetTrainset
from utils.training import flags
from utils.training.batchnorm import (GAP_COLUMNS, GapProbe, add_recalibration_arg, recalibrate_batchnorm,
                                      recalibration_loader)
from utils.training.builders import announce_spec, build_unet, step_dir
from utils.training.data_order import make_eval_loader, make_train_loader, total_steps
from utils.training.guards import CollapseGuard
from utils.training.loop import LoopHooks, TrainState, train_loop, validate
from utils.training.monitor import RunMonitor
from utils.training.objectives import mask_in_face
from utils.training.run import make_optimizer, start_run

log = logging.getLogger("step3")
# What the collapse stop (--collapse) suggests: Step 3 learns Step 2's masks, so a collapse points at them or the rate.
COLLAPSE_HINTS = {
    "low": "Likely cause: Step 2's masks are (nearly) empty, or the learning rate is too high; check "
           "UNet_trainset/*_mask.png, lower --learning_rate",
    "high": "Likely cause: Step 2's masks keep (nearly) the whole face, or the learning rate is too high; check "
            "UNet_trainset/*_mask.png, lower --learning_rate",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_common_args(p)
    flags.add_training_args(p, lr=0.03, epochs=51, batch_size=12, ckpt_every=5000, vis_every=1000, eval_every=2000)
    p.add_argument("--trainset_dir", default=None, help="Step-2 output (default: <save_root>/UNet_trainset)")
    p.add_argument("--lr_step", type=int, default=5000)
    p.add_argument("--lr_gamma", type=float, default=0.99)
    add_recalibration_arg(p, "after the last step")
    flags.add_collapse_args(p)
    flags.add_augment_arg(p)
    return cli.resolve_paths(p.parse_args(argv))


def train(args) -> int:
    run = start_run(args, step=3)
    device = run.device
    data_dir = Path(args.trainset_dir) if args.trainset_dir else step_dir(args.save_root, 2)
    train_set, val_set = UNetTrainset(data_dir, "train", augmenter_from_args(args)), UNetTrainset(data_dir, "val")
    spec = {"unet_width": args.unet_width, "image_size": train_set.image_size}
    announce_spec(args, spec, f"Step 2's images in {data_dir}")
    unet = build_unet(spec).to(device)
    net = run.ddp(unet)
    loader, sampler = make_train_loader(train_set, args.batch_size, args.seed, args.workers, run.dist.rank,
                                        run.dist.world_size)
    val_loader = make_eval_loader(val_set, args.batch_size, args.workers)
    vis_batch = next(iter(val_loader))

    opt = make_optimizer(args.optimizer, unet.parameters(), args.learning_rate)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=args.lr_step, gamma=args.lr_gamma)
    state = TrainState({"unet": unet}, {"unet": opt}, {"unet": sched})
    start = run.resume(*state.parts(), spec)
    end = total_steps(args.max_iters, args.epochs, sampler.batches_per_epoch)
    monitor = RunMonitor(run.out_dir, ["total", "bce", *GAP_COLUMNS, *state.lr_columns()], start, end, run.is_main,
                         desc="step3")
    collapse = CollapseGuard(COLLAPSE_HINTS, args.collapse, args.collapse_patience, device=device, last_step=start)

    def objective(batch, model):
        inputs, target = batch["input"].to(device), batch["target"].to(device)
        with run.autocast():
            logits = model(inputs).float()
        face = (inputs[:, :3].sum(1, keepdim=True) > 0).float()  # the render is black off the face
        loss = losses.unet_bce_loss(logits, target)
        return loss, {"bce": loss.detach(), "mask_in_face": mask_in_face(mask_from_logits(logits), face)}, logits

    gap = GapProbe(unet, lambda batch: objective(batch, unet)[1]["mask_in_face"])

    def forward(index, batch):
        unet.train()
        loss, terms, _ = objective(batch, net)
        return loss, terms, ["unet"]

    def visualise():
        unet.eval()
        logits = objective(vis_batch, unet)[2]
        return {"unet_input_render": vis_batch["input"][:, :3], "unet_input_image": vis_batch["input"][:, 3:],
                "target": vis_batch["target"], "unet_mask": mask_from_logits(logits)}

    def evaluate():
        unet.eval()
        val = validate(lambda b: objective(b, unet)[:2], val_loader, args.val_batches)
        return {**val, **gap.over_split(val_loader, args.val_batches)}

    def after_step(step):
        if step == end and args.bn_recalibration > 0:
            batches = recalibration_loader(train_set, args.bn_recalibration, args.batch_size, args.workers, args.seed)
            n = recalibrate_batchnorm(unet, (b["input"].to(device) for b in batches), args.bn_recalibration)
            log.info("UNet BatchNorm statistics re-estimated with dropout off on %d training images", n)

    hooks = LoopHooks(forward, visualise, evaluate, after_step=after_step, probe=lambda: gap.at_log_step(vis_batch),
                      check=lambda step, means: collapse.update(means.get("mask_in_face"), step))
    return train_loop(run, loader, sampler, start, end, hooks, state, spec, monitor)


def main(argv=None) -> int:
    """Run the step; project errors propagate (the command line turns them into one-line messages)."""
    return train(parse_args(argv))


if __name__ == "__main__":
    cli.cli_main(main)
