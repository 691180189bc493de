# ruff: noqa: E402  (the imports follow the start-up Ctrl-C handler)
"""Step 4: joint EM-style training of the UNet (segmentation) and MoFA (reconstruction).

    python Step4_UNet_MoFA_EM.py --img_path ./image_root

Starts from Step 1's encoder and Step 3's UNet. Step counter ct: if ct % em_cycle > unet_iters a MoFA step
(encoder trained, UNet frozen), else a UNet step; the first of every 30 000 steps are the 5 001 UNet steps
(docs/method.md §10). Both schedulers step every iteration (StepLR(--lr_step, --lr_gamma_mofa / --lr_gamma_unet)); the
learning rates continue Step 1's decay, read from its checkpoint. Losses and weights: docs/method.md §8.3
(utils/training/objectives.py; --loss_preset, utils/losses.PRESETS).
After every UNet phase the UNet's BatchNorm statistics are re-estimated with dropout off (--bn_recalibration;
0 = the original), so the MoFA phase and the final model see the masks the UNet was trained to give. A mask that
collapses to empty or full inside the face stops the run (--collapse, utils/training/guards.CollapseGuard).
`EMTrainer` is the whole EM step, top to bottom. Writes <save_root>/MoFA_UNet/ like Step 1; checkpoints hold both
networks, their optimisers and schedulers under the names encoder and unet.
"""
from __future__ import annotations

if __name__ == "__main__":  # Ctrl-C while torch is imported: one line, no traceback (utils/startup.py)
    from utils.startup import quiet_interrupts
    quiet_interrupts()

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
from utils.training.batchnorm import (GAP_COLUMNS, GapProbe, add_recalibration_arg, recalibrate_batchnorm,
                                      recalibration_loader)
from utils.training.builders import load_networks, previous_checkpoint
from utils.training.checkpoint import CheckpointError
from utils.training.data_order import make_eval_loader, make_train_loader, total_steps
from utils.training.guards import CollapseGuard
from utils.training.loop import LoopHooks, TrainState, train_loop, validate
from utils.training.monitor import RunMonitor
from utils.training.objectives import (LossSetup, mask_in_face, step4_mofa_terms, step4_unet_terms, unet_input,
                                       unet_mask, zero_weight_terms)
from utils.training.run import make_optimizer, start_run

log = logging.getLogger("step4")
# Loss-log columns of both CSVs (``train`` adds lr_encoder, lr_unet). ``total``: the loss of the step's phase (training
# rows only: validation trains no phase); ``total_unet`` / ``total_mofa``: each phase's loss, in both files.
COLUMNS = ["total", "total_unet", "total_mofa", "rec", "identity", "reg", "landmark", "area", "binary", "preserve",
           "dist", "neighbour", *GAP_COLUMNS]
# What the collapse stop (--collapse) suggests, per direction. To the empty mask: with a rough fit the masked render,
# aligned with the predicted landmarks, is offset from the masked image, so dist grows with the mask's area, and at
# M = 0 dist, neighbour and binary are 0: only area and preserve push back.
COLLAPSE_HINTS = {
    "low": "Likely cause: the dist term on a rough fit (the masked render is aligned with the predicted landmarks, "
           "the image with the GT ones, so an empty mask costs least); try --dist_landmarks gt, or --drop_terms dist",
    "high": "Likely cause: the area term outweighs the data terms on this fit, so the UNet calls every pixel face; "
            "check Step 3's masks (Pretrain_UNet/vis/) and the Step-1 fit",
}


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
                        "alignment of the masked image it is compared with (docs/faithfulness.md)")
    add_recalibration_arg(p, "after every UNet phase")
    flags.add_collapse_args(p)
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
    """'unet' for the first unet_iters + 1 steps of every cycle of em_cycle steps, else 'mofa' (docs/method.md §10)."""
    return "mofa" if step % em_cycle > unet_iters else "unet"


def unet_phase_ended(step: int, end: int, em_cycle: int, unet_iters: int) -> bool:
    """True when the optimizer step just taken (``step - 1``; ``step`` is the new count) was the last of a UNet
    phase: the next one is a MoFA step, or the run ends here."""
    return em_phase(step - 1, em_cycle, unet_iters) == "unet" and (
        step == end or em_phase(step, em_cycle, unet_iters) == "mofa")


def build(args, run):
    """Step 1's MoFA and Step 3's UNet, restored from their final checkpoints (`builders.load_networks`, the one
    loader of trained networks); also (Step 1's payload, its path)."""
    face_model = FaceModel.from_h5(args.bfm, CoeffLayout()).to(run.device)
    nets = load_networks(previous_checkpoint(args.mofa_checkpoint, args.save_root, step=1), face_model, run.device,
                         unet_path=previous_checkpoint(args.unet_checkpoint, args.save_root, step=3), unet=True)
    nets.announce(args, "the Step-1 checkpoint", "the Step-3 checkpoint")
    return nets.mofa, nets.unet, nets.spec, (nets.mofa_payload, nets.mofa_path)


class EMTrainer:
    """One Step-4 run, read top to bottom: the networks, the loss settings, the optimisers and schedulers (one of
    each per trained network, under its name: ``encoder`` and ``unet``), the data, then one EM step
    (``forward``: the phase rule picks ``unet_step`` or ``mofa_step``), the BatchNorm re-estimation after every UNet
    phase (``after_step``), and what is logged (``validate``, ``visualise``, ``gap``, ``collapse``). ``train_loop``
    runs it through ``hooks()``.
    """

    def __init__(self, args, run, mofa, unet, spec: dict, step1: tuple) -> None:
        self.args, self.run, self.device = args, run, run.device
        # networks: the raw modules, and their data-parallel wrappers for the phase that trains them
        self.mofa, self.unet = mofa, unet
        self.encoder_ddp, self.unet_ddp = run.ddp(mofa.encoder), run.ddp(unet)
        self.identity = load_identity(args, self.device)
        # losses: each phase's weights; the terms weighted 0 (--drop_terms) are not computed in training
        preset = flags.loss_preset(args)
        self.weights = {"unet": preset.step4_unet, "mofa": preset.step4_mofa}
        self.skip = {phase: zero_weight_terms(w) for phase, w in self.weights.items()}
        self.setup = LossSetup.from_preset(preset, CoeffLayout(**spec["layout"]), spec["image_size"],
                                           dist_landmarks=args.dist_landmarks)
        # data
        size = spec["image_size"]
        self.train_set = FaceDataset(args.img_path, "train", size, augment=augmenter_from_args(args))
        self.loader, self.sampler = make_train_loader(self.train_set, args.batch_size, args.seed, args.workers,
                                                      run.dist.rank, run.dist.world_size, collate_faces)
        self.val_loader = make_eval_loader(FaceDataset(args.img_path, "val", size), args.batch_size, args.workers,
                                           collate_faces)
        self.vis_batch = next(iter(self.val_loader))
        self.end = total_steps(args.max_iters, args.epochs, self.sampler.batches_per_epoch)  # the run's last step
        # optimisers and schedulers; both schedulers step every iteration (docs/method.md §10)
        lr_mofa, lr_unet = learning_rates(args, preset, *step1)
        optimizers = {"encoder": make_optimizer(args.optimizer, mofa.encoder.parameters(), lr_mofa),
                      "unet": make_optimizer(args.optimizer, unet.parameters(), lr_unet)}
        gammas = {"encoder": args.lr_gamma_mofa, "unet": args.lr_gamma_unet}
        schedulers = {name: torch.optim.lr_scheduler.StepLR(opt, step_size=args.lr_step, gamma=gammas[name])
                      for name, opt in optimizers.items()}
        self.state = TrainState({"encoder": mofa.encoder, "unet": unet}, optimizers, schedulers)
        self.gap = GapProbe(unet, self.eval_mask_in_face)

    def start(self, spec: dict) -> int:
        """Resume (with --resume: networks, optimisers, schedulers, RNG) and return the first step; the collapse
        guard is built here, where the start step is known (as in Step 3)."""
        start = self.run.resume(*self.state.parts(), spec)
        args = self.args
        self.collapse = CollapseGuard(COLLAPSE_HINTS, args.collapse, args.collapse_patience, device=self.device,
                                      last_step=start)
        return start

    # ---- one EM step --------------------------------------------------------------------------------------------

    def forward(self, index: int, batch: dict):
        """The step of index ``index``: a UNet step for the first unet_iters + 1 steps of every EM cycle, else a
        MoFA step. Returns (loss, terms, the names of the optimisers to step)."""
        if em_phase(index, self.args.em_cycle, self.args.unet_iters) == "unet":
            return self.unet_step(batch)
        return self.mofa_step(batch)

    def unet_step(self, batch: dict):
        """Train the UNet on the masks of the current fit: the encoder (eval mode) renders without gradients."""
        self.mofa.encoder.eval()
        self.unet.train()
        images, landmarks = self.inputs(batch)
        with torch.no_grad():
            out = self.render(self.mofa.encoder, images)
        U = self.mask(self.unet_ddp, out, images)
        terms = step4_unet_terms(U, out, images, landmarks, self.setup, self.identity, self.skip["unet"])
        return (*self.weighted("unet", terms, U, out), ["unet"])

    def mofa_step(self, batch: dict):
        """Train the encoder with the UNet's mask. The UNet (eval mode) keeps the gradient with respect to its input
        (the render), through which the masked reconstruction and area terms reach the encoder too, but its
        parameters get none (``frozen``)."""
        self.mofa.encoder.train()
        self.unet.eval()
        images, landmarks = self.inputs(batch)
        out = self.render(self.encoder_ddp, images)
        with frozen(self.unet):
            U = self.mask(self.unet, out, images)
        terms = step4_mofa_terms(U, out, images, landmarks, self.setup, self.identity, self.skip["mofa"])
        return (*self.weighted("mofa", terms, U, out), ["encoder"])

    def weighted(self, phase: str, terms: dict, U: torch.Tensor, out):
        """(the phase's loss, its terms with ``total_<phase>`` and ``mask_in_face``)."""
        total = losses.weighted_sum(terms, self.weights[phase])
        return total, {**terms, f"total_{phase}": total, "mask_in_face": mask_in_face(U, out.mask)}

    def inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["image"].to(self.device), batch["landmarks"].to(self.device)

    def render(self, encoder, images: torch.Tensor):
        with self.run.autocast():
            coeffs = encoder(images).float()
        return self.mofa.renderer(coeffs)

    def mask(self, unet, out, images: torch.Tensor) -> torch.Tensor:
        with self.run.autocast():
            return unet_mask(unet, out, images).float()

    def after_step(self, step: int) -> None:
        """At the end of every UNet phase (and of the run, if it ends in one): re-estimate the UNet's BatchNorm
        statistics with dropout off on the current encoder's renders (--bn_recalibration)."""
        args = self.args
        if args.bn_recalibration > 0 and unet_phase_ended(step, self.end, args.em_cycle, args.unet_iters):
            n = recalibrate_batchnorm(self.unet, self.recalibration_inputs(), args.bn_recalibration)
            log.info("step %d: UNet BatchNorm statistics re-estimated with dropout off on %d training images", step, n)

    def recalibration_inputs(self):
        self.mofa.encoder.eval()
        args = self.args
        for batch in recalibration_loader(self.train_set, args.bn_recalibration, args.batch_size, args.workers,
                                          args.seed, collate_faces):
            images = batch["image"].to(self.device)
            yield unet_input(self.render(self.mofa.encoder, images), images)

    # ---- what is logged ------------------------------------------------------------------------------------------

    def validation_terms(self, batch: dict):
        """Both phases' terms, every one of them (nothing skipped), with both networks in eval mode; no single
        ``total`` (no phase is trained here): ``total_unet`` and ``total_mofa``."""
        self.mofa.encoder.eval()
        self.unet.eval()
        images, landmarks = self.inputs(batch)
        out = self.render(self.mofa.encoder, images)
        U = self.mask(self.unet, out, images)
        _, unet_terms = self.weighted("unet", step4_unet_terms(U, out, images, landmarks, self.setup, self.identity),
                                      U, out)
        _, mofa_terms = self.weighted("mofa", step4_mofa_terms(U, out, images, landmarks, self.setup, self.identity),
                                      U, out)
        return None, {**unet_terms, **mofa_terms}

    def validate(self) -> dict[str, float]:
        val = validate(self.validation_terms, self.val_loader, self.args.val_batches)
        return {**val, **self.gap.over_split(self.val_loader, self.args.val_batches)}

    def eval_mask_in_face(self, batch: dict) -> torch.Tensor:
        """mask_in_face of the UNet in the mode it is in, on the eval-mode encoder's render (``GapProbe``)."""
        self.mofa.encoder.eval()
        images = batch["image"].to(self.device)
        out = self.render(self.mofa.encoder, images)
        return mask_in_face(self.mask(self.unet, out, images), out.mask)

    def visualise(self) -> dict[str, torch.Tensor]:
        self.mofa.encoder.eval()
        self.unet.eval()
        images = self.vis_batch["image"].to(self.device)
        out = self.render(self.mofa.encoder, images)
        U = self.mask(self.unet, out, images)
        return {"input": images, "composite": composite(images, out.image, out.mask), "unet_mask": U * out.mask,
                "residual": residual(images, out.image, out.mask)}

    def hooks(self) -> LoopHooks:
        return LoopHooks(self.forward, self.visualise, self.validate, after_step=self.after_step,
                         probe=lambda: self.gap.at_log_step(self.vis_batch),
                         check=lambda step, means: self.collapse.update(means.get("mask_in_face"), step))


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """``module``'s parameters without gradients inside the block: what it computes there keeps its gradient with
    respect to its input, but backward computes none for its weights (their ``.grad`` stays as it was)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in params:
            p.requires_grad_(True)


def train(args) -> int:
    # Both schedulers step every iteration (docs/method.md §10) although only one optimizer steps: expected here.
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
    run = start_run(args, step=4)
    mofa, unet, spec, step1 = build(args, run)
    em = EMTrainer(args, run, mofa, unet, spec, step1)
    start = em.start(spec)
    monitor = RunMonitor(run.out_dir, COLUMNS + em.state.lr_columns(), start, em.end, run.is_main, desc="step4")
    return train_loop(run, em.loader, em.sampler, start, em.end, em.hooks(), em.state, spec, monitor)


def main(argv=None) -> int:
    """Run the step; project errors propagate (the command line turns them into one-line messages)."""
    return train(parse_args(argv))


if __name__ == "__main__":
    cli.cli_main(main)
