"""Step 3: pretrain the UNet on the Step-2 preliminary masks.

    python Step3_Pretrain_Unet.py [--save_root MoFA_UNet_Save]

Input: cat([render, image]) (6 channels) from <save_root>/UNet_trainset/{train,val}_list.csv. Loss: binary
cross-entropy on the UNet logits, which are G2's 5 * head output (models/unet.py; the sigmoid applied once, the
original applied it twice). Adadelta, StepLR(5000, 0.99) per step. At the end the BatchNorm statistics are
re-estimated with dropout off (--bn_recalibration; 0 = the original). Writes <save_root>/Pretrain_UNet/ like Step 1.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path

import torch

from models.unet import mask_from_logits
from utils import cli, losses
from utils.data.augment import augmenter_from_args
from utils.data.unet_trainset import UNetTrainset
from utils.training import flags
from utils.training.batchnorm import (add_recalibration_arg, recalibrate_batchnorm, recalibration_loader,
                                      train_mode_probe)
from utils.training.builders import announce_spec, build_unet, step_dir
from utils.training.data_order import make_eval_loader, make_train_loader, total_steps
from utils.training.guards import CollapseAlarm
from utils.training.loop import LoopHooks, train_loop, validate
from utils.training.monitor import RunMonitor
from utils.training.objectives import mask_in_face
from utils.training.run import make_optimizer, start_run

log = logging.getLogger("step3")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_common_args(p)
    flags.add_training_args(p, lr=0.03, epochs=51, batch_size=12, ckpt_every=5000, vis_every=1000, eval_every=2000)
    p.add_argument("--trainset_dir", default=None, help="Step-2 output (default: <save_root>/UNet_trainset)")
    p.add_argument("--lr_step", type=int, default=5000)
    p.add_argument("--lr_gamma", type=float, default=0.99)
    add_recalibration_arg(p, "after the last step")
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
    state = ({"unet": unet}, {"unet": opt}, {"unet": sched})
    start = run.resume(*state, spec)
    end = total_steps(args.max_iters, args.epochs, sampler.batches_per_epoch)
    columns = ["bce", "mask_in_face", "mask_in_face_train_mode", "val_mask_in_face_train_mode",
               "val_mask_in_face_eval_mode"]
    monitor = RunMonitor(run.out_dir, columns, start, end, run.is_main, desc="step3")
    alarm = CollapseAlarm()

    def objective(batch, model):
        inputs, target = batch["input"].to(device), batch["target"].to(device)
        with run.autocast():
            logits = model(inputs).float()
        face = (inputs[:, :3].sum(1, keepdim=True) > 0).float()  # the render is black off the face
        loss = losses.unet_bce_loss(logits, target)
        return loss, {"bce": loss.detach(), "mask_in_face": mask_in_face(mask_from_logits(logits), face)}, logits

    def forward(step, batch):
        unet.train()
        loss, terms, _ = objective(batch, net)
        return loss, terms, ["unet"]

    def visualise():
        unet.eval()
        logits = objective(vis_batch, unet)[2]
        return {"unet_input_render": vis_batch["input"][:, :3], "unet_input_image": vis_batch["input"][:, 3:],
                "target": vis_batch["target"], "unet_mask": mask_from_logits(logits)}

    def in_face(batch, train_mode: bool) -> torch.Tensor:
        """mask_in_face of the UNet in train mode (dropout, batch statistics; no side effects) or eval mode."""
        unet.eval()
        with train_mode_probe(unet) if train_mode else contextlib.nullcontext():
            return objective(batch, unet)[1]["mask_in_face"]

    def evaluate():
        unet.eval()
        val = validate(lambda b: objective(b, unet)[:2], val_loader, args.val_batches)
        train_mode = validate(lambda b: (in_face(b, True), {}), val_loader, args.val_batches)
        val["mask_in_face_train_mode"] = train_mode["total"]
        alarm.update(val["mask_in_face"], sched.last_epoch)
        return val

    def probe():  # the train/eval gap on the first validation batch, at every log step
        return {"val_mask_in_face_train_mode": in_face(vis_batch, True),
                "val_mask_in_face_eval_mode": in_face(vis_batch, False)}

    def after_step(step):
        if step == end and args.bn_recalibration > 0:
            batches = recalibration_loader(train_set, args.bn_recalibration, args.batch_size, args.workers, args.seed)
            n = recalibrate_batchnorm(unet, (b["input"].to(device) for b in batches), args.bn_recalibration)
            log.info("UNet BatchNorm statistics re-estimated with dropout off on %d training images", n)

    hooks = LoopHooks(forward, visualise, evaluate, after_step=after_step, probe=probe)
    return train_loop(run, loader, sampler, start, end, hooks, state, spec, monitor)


def main(argv=None) -> int:
    """Run the step; project errors propagate (the command line turns them into one-line messages)."""
    return train(parse_args(argv))


if __name__ == "__main__":
    cli.cli_main(main)
