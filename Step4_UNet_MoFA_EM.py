"""Step 4: joint EM-style training of the UNet (segmentation) and MoFA (reconstruction).

    python Step4_UNet_MoFA_EM.py --img_path ./image_root

Starts from Step 1's encoder and Step 3's UNet. Step counter ct: if ct % em_cycle > unet_iters a MoFA step
(encoder trained, UNet frozen), else a UNet step; the first of every 30 000 steps are the 5 001 UNet steps
(reference 10). Both schedulers step every iteration (StepLR(--lr_step, --lr_gamma_mofa / --lr_gamma_unet)); the
learning rates continue Step 1's decay, read from its checkpoint. Losses and weights: reference 8.3
(utils/training/objectives.py; --loss_preset, utils/losses.PRESETS).
After every UNet phase the UNet's BatchNorm statistics are re-estimated with dropout off (--bn_recalibration;
0 = the original), so the MoFA phase and the final model see the masks the UNet was trained to give.
Writes <save_root>/MoFA_UNet/ like Step 1; checkpoints hold both networks.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import warnings

import torch

from models.face_model import FaceModel
from models.layout import CoeffLayout
from utils import cli, losses
from utils.data.augment import augmenter_from_args
from utils.data.datasets import FaceDataset, collate_faces
from utils.evaluation.visuals import composite, residual
from utils.identity import add_identity_args, load_identity, resolve_identity_flag
from utils.training import flags
from utils.training.batchnorm import (add_recalibration_arg, recalibrate_batchnorm, recalibration_loader,
                                      train_mode_probe)
from utils.training.builders import STEP_DIRS, announce_spec, load_mofa, load_unet, previous_checkpoint
from utils.training.checkpoint import CheckpointError, load_checkpoint
from utils.training.data_order import make_eval_loader, make_train_loader, total_steps
from utils.training.guards import CollapseAlarm
from utils.training.loop import LoopHooks, train_loop, validate
from utils.training.monitor import RunMonitor
from utils.training.objectives import (LossSetup, mask_in_face, step4_mofa_terms, step4_unet_terms, unet_input,
                                       unet_mask, zero_weight_terms)
from utils.training.run import make_optimizer, start_run

log = logging.getLogger("step4")
COLUMNS = ["total", "rec", "identity", "reg", "landmark", "area", "binary", "preserve", "dist", "neighbour",
           "mask_in_face", "mask_in_face_train_mode", "val_mask_in_face_train_mode", "val_mask_in_face_eval_mode"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_common_args(p)
    flags.add_training_args(p, lr=0.1, epochs=130, batch_size=12, ckpt_every=10000, vis_every=1000, eval_every=5000)
    p.add_argument("--pretrained_MoFA", "--mofa_checkpoint", dest="mofa_checkpoint", default=None,
                   help="Step-1 checkpoint (default: <save_root>/pretrain_mofa/final.pt)")
    p.add_argument("--pretrained_unet", "--unet_checkpoint", dest="unet_checkpoint", default=None,
                   help="Step-3 checkpoint (default: <save_root>/Pretrain_UNet/final.pt)")
    add_identity_args(p)
    flags.add_loss_preset_arg(p)
    p.add_argument("--em_cycle", type=int, default=30000, help="length of one EM cycle in steps")
    p.add_argument("--unet_iters", type=int, default=5000, help="UNet steps at the start of every cycle")
    p.add_argument("--lr_mofa", type=float, default=None,
                   help="default: learning_rate x Step 1's final StepLR decay (lr_gamma^(steps // lr_step), read "
                        "from its checkpoint) x 0.8 (G2)")
    p.add_argument("--lr_unet", type=float, default=None, help="default: 0.06 x the MoFA learning rate")
    p.add_argument("--lr_step", type=int, default=5000, help="StepLR period of both learning rates in steps")
    p.add_argument("--lr_gamma_mofa", type=float, default=0.99, help="StepLR decay of the MoFA learning rate")
    p.add_argument("--lr_gamma_unet", type=float, default=0.95, help="StepLR decay of the UNet learning rate")
    p.add_argument("--dist_landmarks", choices=("predicted", "gt"), default="predicted",
                   help="landmarks that align the masked render for the dist term: predicted (G2) or gt, the "
                        "alignment of the masked image it is compared with (README, Faithfulness)")
    add_recalibration_arg(p, "after every UNet phase")
    flags.add_augment_arg(p)
    return resolve_identity_flag(cli.resolve_paths(p.parse_args(argv)))


def step1_decay(payload: dict, path) -> float:
    """Step 1's StepLR decay at its end, ``lr_gamma ** (step // lr_step)``, from its checkpoint (step and config)."""
    config = payload.get("config") or {}
    try:
        return float(config["lr_gamma"]) ** (int(payload["step"]) // int(config["lr_step"]))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        raise CheckpointError(f"{path} records no usable Step-1 learning-rate schedule (lr_step, lr_gamma in its "
                              "config): pass --lr_mofa and --lr_unet") from None


def learning_rates(args, preset: losses.LossPreset, step1: dict, step1_path) -> tuple[float, float]:
    """Continue Step 1's StepLR decay (the original hard-coded 300k steps of StepLR(5000, 0.99): 0.99^60), times
    the preset's factor (G2: 0.8); the UNet's is 0.06 x that. ``--lr_mofa`` / ``--lr_unet`` override them."""
    if args.lr_mofa is not None and args.lr_unet is not None:
        return args.lr_mofa, args.lr_unet
    base = args.learning_rate * step1_decay(step1, step1_path) * preset.step4_lr_scale
    lr_mofa = args.lr_mofa if args.lr_mofa is not None else base
    return lr_mofa, args.lr_unet if args.lr_unet is not None else 0.06 * base


def em_phase(step: int, em_cycle: int, unet_iters: int) -> str:
    """'unet' for the first unet_iters + 1 steps of every cycle of em_cycle steps, else 'mofa' (reference 10)."""
    return "mofa" if step % em_cycle > unet_iters else "unet"


def unet_phase_ended(step: int, end: int, em_cycle: int, unet_iters: int) -> bool:
    """True when the optimizer step just taken (``step - 1``; ``step`` is the new count) was the last of a UNet
    phase: the next one is a MoFA step, or the run ends here."""
    return em_phase(step - 1, em_cycle, unet_iters) == "unet" and (
        step == end or em_phase(step, em_cycle, unet_iters) == "mofa")


def build(args, run):
    """Step 1's MoFA and Step 3's UNet, restored from their final checkpoints; also (Step 1's payload, its path)."""
    face_model = FaceModel.from_h5(args.bfm, CoeffLayout()).to(run.device)
    mofa_ckpt = previous_checkpoint(args.mofa_checkpoint, args.save_root, step=1)
    mofa, payload, spec = load_mofa(mofa_ckpt, face_model, run.device)
    announce_spec(args, spec, f"the Step-1 checkpoint {mofa_ckpt}")
    unet_ckpt = previous_checkpoint(args.unet_checkpoint, args.save_root, step=3)
    unet_payload = load_checkpoint(unet_ckpt, map_location=run.device)
    width = ((unet_payload.get("extra") or {}).get("model") or {}).get("unet_width")
    if width is None or "unet" not in unet_payload.get("models", {}):
        raise CheckpointError(f"{unet_ckpt} holds no UNet: pass a Step-3 ({STEP_DIRS[3]}/) checkpoint")
    announce_spec(args, {"unet_width": width}, f"the Step-3 checkpoint {unet_ckpt}")
    spec = {**spec, "unet_width": width}
    unet = load_unet(unet_payload, spec["unet_width"], unet_ckpt, run.device)
    return mofa, unet, spec, (payload, mofa_ckpt)


def train(args) -> int:
    # Both schedulers step every iteration (reference 10) although only one optimizer steps: expected here.
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
    run = start_run(args, step=4)
    device = run.device
    mofa, unet, spec, step1 = build(args, run)
    encoder, unet_ddp = run.ddp(mofa.encoder), run.ddp(unet)
    identity = load_identity(args, device)
    preset = flags.loss_preset(args)
    w_unet, w_mofa = preset.step4_unet, preset.step4_mofa
    setup = LossSetup.from_preset(preset, CoeffLayout(**spec["layout"]), spec["image_size"],
                                  dist_landmarks=args.dist_landmarks)

    size = spec["image_size"]
    train_set = FaceDataset(args.img_path, "train", size, augment=augmenter_from_args(args))
    loader, sampler = make_train_loader(train_set, args.batch_size, args.seed, args.workers, run.dist.rank,
                                        run.dist.world_size, collate_faces)
    val_loader = make_eval_loader(FaceDataset(args.img_path, "val", size), args.batch_size, args.workers,
                                  collate_faces)
    vis_batch = next(iter(val_loader))

    lr_mofa, lr_unet = learning_rates(args, preset, *step1)
    opt_mofa = make_optimizer(args.optimizer, mofa.encoder.parameters(), lr_mofa)
    opt_unet = make_optimizer(args.optimizer, unet.parameters(), lr_unet)
    sched_mofa = torch.optim.lr_scheduler.StepLR(opt_mofa, step_size=args.lr_step, gamma=args.lr_gamma_mofa)
    sched_unet = torch.optim.lr_scheduler.StepLR(opt_unet, step_size=args.lr_step, gamma=args.lr_gamma_unet)
    state = ({"encoder": mofa.encoder, "unet": unet}, {"encoder": opt_mofa, "unet": opt_unet},
             {"mofa": sched_mofa, "unet": sched_unet})
    start = run.resume(*state, spec)
    end = total_steps(args.max_iters, args.epochs, sampler.batches_per_epoch)
    monitor = RunMonitor(run.out_dir, COLUMNS, start, end, run.is_main, desc="step4")
    alarm = CollapseAlarm()

    skipped = {"unet": zero_weight_terms(w_unet), "mofa": zero_weight_terms(w_mofa)}  # --drop_terms
    every = {"unet": frozenset(), "mofa": frozenset()}

    def objective(batch, phase, enc, seg, skip=skipped):
        """Forward one batch; ``phase`` picks the loss: 'unet' or 'mofa'. Terms weighted 0 are skipped in training;
        validation (``skip=every``) logs them all."""
        images, lms = batch["image"].to(device), batch["landmarks"].to(device)
        with torch.set_grad_enabled(phase == "mofa" and torch.is_grad_enabled()), run.autocast():
            coeffs = enc(images).float()
        out = mofa.renderer(coeffs)
        with run.autocast():
            U = unet_mask(seg, out, images).float()
        if phase == "unet":
            terms = step4_unet_terms(U, out, images, lms, setup, identity, skip[phase])
            total = losses.weighted_sum(terms, w_unet)
        else:
            terms = step4_mofa_terms(U, out, images, lms, setup, identity, skip[phase])
            total = losses.weighted_sum(terms, w_mofa)
        terms["mask_in_face"] = mask_in_face(U, out.mask)
        return total, terms, (images, out, U)

    def forward(step, batch):
        phase = em_phase(step, args.em_cycle, args.unet_iters)
        mofa.encoder.train(phase == "mofa")
        unet.train(phase == "unet")
        if phase == "unet":  # gradients of the encoder are not needed: it runs without them
            loss, terms, _ = objective(batch, phase, mofa.encoder, unet_ddp)
            return loss, terms, ["unet"]
        loss, terms, _ = objective(batch, phase, encoder, unet)  # reaches the encoder through the UNet too
        return loss, terms, ["encoder"]

    def visualise():
        mofa.encoder.eval()
        unet.eval()
        images, out, U = objective(vis_batch, "unet", mofa.encoder, unet)[2]
        return {"input": images, "composite": composite(images, out.image, out.mask), "unet_mask": U * out.mask,
                "residual": residual(images, out.image, out.mask)}

    def both_phases(batch):
        t_unet, terms_unet, _ = objective(batch, "unet", mofa.encoder, unet, every)
        t_mofa, terms_mofa, _ = objective(batch, "mofa", mofa.encoder, unet, every)
        return t_unet + t_mofa, {**terms_unet, **terms_mofa, "total_unet": t_unet, "total_mofa": t_mofa}

    def in_face(batch, train_mode: bool) -> torch.Tensor:
        """mask_in_face of the UNet in train mode (dropout, batch statistics; no side effects) or eval mode."""
        mofa.encoder.eval()
        unet.eval()
        images = batch["image"].to(device)
        with run.autocast():
            coeffs = mofa.encoder(images).float()
        out = mofa.renderer(coeffs)
        with train_mode_probe(unet) if train_mode else contextlib.nullcontext(), run.autocast():
            return mask_in_face(unet_mask(unet, out, images).float(), out.mask)

    def evaluate():
        mofa.encoder.eval()
        unet.eval()
        val = validate(both_phases, val_loader, args.val_batches)
        train_mode = validate(lambda b: (in_face(b, True), {}), val_loader, args.val_batches)
        val["mask_in_face_train_mode"] = train_mode["total"]
        alarm.update(val["mask_in_face"], sched_unet.last_epoch)
        return val

    def probe():  # the train/eval gap on the first validation batch, at every log step
        return {"val_mask_in_face_train_mode": in_face(vis_batch, True),
                "val_mask_in_face_eval_mode": in_face(vis_batch, False)}

    def recalibration_inputs():
        mofa.encoder.eval()
        for batch in recalibration_loader(train_set, args.bn_recalibration, args.batch_size, args.workers,
                                          args.seed, collate_faces):
            images = batch["image"].to(device)
            with run.autocast():
                coeffs = mofa.encoder(images).float()
            yield unet_input(mofa.renderer(coeffs), images)

    def after_step(step):
        """At the end of every UNet phase (and of the run, if it ends in one): re-estimate the BatchNorm statistics
        for the current encoder's renders."""
        if args.bn_recalibration > 0 and unet_phase_ended(step, end, args.em_cycle, args.unet_iters):
            n = recalibrate_batchnorm(unet, recalibration_inputs(), args.bn_recalibration)
            log.info("step %d: UNet BatchNorm statistics re-estimated with dropout off on %d training images", step, n)

    hooks = LoopHooks(forward, visualise, evaluate, after_step=after_step, probe=probe)
    return train_loop(run, loader, sampler, start, end, hooks, state, spec, monitor)


def main(argv=None) -> int:
    """Run the step; project errors propagate (the command line turns them into one-line messages)."""
    return train(parse_args(argv))


if __name__ == "__main__":
    cli.cli_main(main)
