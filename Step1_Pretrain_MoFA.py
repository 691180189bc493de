# ruff: noqa: E402  (the imports follow the start-up Ctrl-C handler)
"""Step 1: pretrain MoFA (encoder + face model + renderer) with the occlusion-robust photometric loss.

    python Step1_Pretrain_MoFA.py --img_path ./image_root [--bfm basel_3DMM/model2017-1_bfm_nomouth.h5]

Loss (docs/method.md §8.1): photo * robust photometric + reg * coefficient prior + landmark * landmark loss
+ identity * identity loss (--identity arcface|dlib|none, see utils/identity.py). Adadelta, StepLR(5000, 0.99) per step.
Writes <save_root>/pretrain_mofa/: ckpt_NNNNNN.pt, latest.pt, final.pt, config.json, loss CSVs, TensorBoard, vis/.
"""
from __future__ import annotations

if __name__ == "__main__":  # Ctrl-C while torch is imported: one line, no traceback (utils/startup.py)
    from utils.startup import quiet_interrupts
    quiet_interrupts()

import argparse
import logging

import torch

from models.face_model import FaceModel
from models.layout import CoeffLayout
from utils import cli, losses
from utils.data.augment import augmenter_from_args
from utils.data.datasets import FaceDataset, collate_faces
from utils.evaluation.visuals import composite
from utils.identity import add_identity_args, load_identity, resolve_identity_flag
from utils.training import flags
from utils.training.builders import build_mofa, model_spec
from utils.training.data_order import make_eval_loader, make_train_loader, total_steps
from utils.training.loop import LoopHooks, TrainState, train_loop, validate
from utils.training.monitor import RunMonitor
from utils.training.objectives import LossSetup, step1_terms, zero_weight_terms
from utils.training.run import make_optimizer, start_run

log = logging.getLogger("step1")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_common_args(p)
    flags.add_training_args(p, lr=0.1, epochs=100, batch_size=12, ckpt_every=5000, vis_every=500, eval_every=5000)
    p.add_argument("--encoder_weights", default=None,
                   help="local torchvision ImageNet weights for a ResNet encoder; for --encoder dlib, dlib's .dat "
                        "file (default: the installed face-recognition-models package)")
    add_identity_args(p)
    p.add_argument("--camera", choices=("g2", "g1"), default="g2", help="camera defaults (G2: f=1014.72, G1: f=250)")
    flags.add_loss_preset_arg(p)
    flags.add_augment_arg(p)
    p.add_argument("--lr_step", type=int, default=5000, help="StepLR period in steps")
    p.add_argument("--lr_gamma", type=float, default=0.99, help="StepLR decay")
    return resolve_identity_flag(cli.resolve_paths(p.parse_args(argv)))


def train(args) -> int:
    run = start_run(args, step=1)
    device, layout = run.device, CoeffLayout()
    face_model = FaceModel.from_h5(args.bfm, layout).to(device)
    spec = model_spec(args, face_model, layout)
    mofa = build_mofa(spec, face_model, args.encoder_weights).to(device)
    encoder = run.ddp(mofa.encoder)
    identity = load_identity(args, device)
    preset = flags.loss_preset(args)
    weights, setup = preset.step1, LossSetup.from_preset(preset, layout, args.image_size)
    skip = zero_weight_terms(weights)  # --drop_terms: not computed in training

    train_set = FaceDataset(args.img_path, "train", args.image_size, augment=augmenter_from_args(args))
    val_set = FaceDataset(args.img_path, "val", args.image_size)
    loader, sampler = make_train_loader(train_set, args.batch_size, args.seed, args.workers, run.dist.rank,
                                        run.dist.world_size, collate_faces)
    val_loader = make_eval_loader(val_set, args.batch_size, args.workers, collate_faces)
    vis_batch = next(iter(val_loader))

    opt = make_optimizer(args.optimizer, mofa.encoder.parameters(), args.learning_rate)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=args.lr_step, gamma=args.lr_gamma)
    state = TrainState({"encoder": mofa.encoder}, {"encoder": opt}, {"encoder": sched})
    start = run.resume(*state.parts(), spec)
    end = total_steps(args.max_iters, args.epochs, sampler.batches_per_epoch)
    columns = ["total", "photo", "landmark", "reg", "identity", *state.lr_columns()]
    monitor = RunMonitor(run.out_dir, columns, start, end, run.is_main, desc="step1")

    def objective(batch, net, skip=skip):
        """Forward one batch; training skips the terms weighted 0, validation (``skip`` empty) logs them all."""
        images, lms = batch["image"].to(device), batch["landmarks"].to(device)
        with run.autocast():
            coeffs = net(images)
        out = mofa.renderer(coeffs.float())
        terms, inliers = step1_terms(out, images, lms, setup, identity, skip)
        return losses.weighted_sum(terms, weights), terms, (images, out, inliers)

    def forward(step, batch):
        mofa.encoder.train()
        loss, terms, _ = objective(batch, encoder)
        return loss, terms, ["encoder"]

    def visualise():
        mofa.encoder.eval()
        _, _, (images, out, inliers) = objective(vis_batch, mofa.encoder)
        return {"input": images, "composite": composite(images, out.image, out.mask), "inlier_mask": inliers}

    def evaluate():
        mofa.encoder.eval()
        return validate(lambda b: objective(b, mofa.encoder, frozenset())[:2], val_loader, args.val_batches)

    return train_loop(run, loader, sampler, start, end, LoopHooks(forward, visualise, evaluate), state, spec, monitor)


def main(argv=None) -> int:
    """Run the step; project errors propagate (the command line turns them into one-line messages)."""
    return train(parse_args(argv))


if __name__ == "__main__":
    cli.cli_main(main)
