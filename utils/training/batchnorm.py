"""The UNet's train/eval gap: measure it without side effects, and close it by re-estimating BatchNorm statistics.

The UNet (docs/method.md §7) ends its two deepest encoder blocks with Dropout(0.5), and the next layers start
with BatchNorm. During training BatchNorm normalises with the statistics of dropped-out activations, and its running
statistics are averages of those; at evaluation dropout is off, the activations have a smaller variance than the
running variance says, and the output shifts. In Step 4 this shift made the eval-mode UNet keep 0.05 of the face
visible where the train-mode one kept 0.74 (issue 13).

``recalibrate_batchnorm`` re-estimates the running statistics with dropout OFF (BatchNorm in batch-statistics mode,
every other layer in eval mode) as the plain average of the batch statistics over a fixed set of training inputs,
so that eval mode reproduces train mode without dropout. ``train_mode_probe`` runs a module in train mode for a
measurement and puts every buffer (BatchNorm running statistics) and the RNG state back afterwards, so measuring
does not change training.
"""
from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset, Subset

from utils.training.data_order import make_eval_loader
from utils.training.loop import validate

# Training images used to re-estimate the statistics by default (issue 13 measured 512 closes most of the gap).
RECALIBRATION_IMAGES = 512


def add_recalibration_arg(parser: argparse.ArgumentParser, when: str) -> None:
    """The ``--bn_recalibration N`` flag of Steps 3 and 4; ``when`` says at which steps it runs."""
    parser.add_argument("--bn_recalibration", type=int, default=RECALIBRATION_IMAGES, metavar="N",
                        help=f"re-estimate the UNet's BatchNorm statistics with dropout off on N training images "
                             f"{when}, so eval mode matches training (default %(default)s; 0 = off, the original's "
                             "behaviour)")


def recalibration_loader(dataset: Dataset, images: int, batch_size: int, workers: int, seed: int = 0,
                         collate_fn=None) -> DataLoader:
    """A fixed-order loader over the same seeded random ``images`` items of ``dataset`` at every use (so every
    recalibration, and a resumed run, sees the same inputs; batches of the training batch size)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:images].tolist()
    return make_eval_loader(Subset(dataset, order), batch_size, workers, collate_fn)


def batchnorm_layers(module: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer of ``module`` that tracks running statistics."""
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(module: nn.Module, inputs: Iterable[torch.Tensor], max_images: int) -> int:
    """Replace the running mean and variance of every BatchNorm in ``module`` by the average, over the batches of
    ``inputs`` (each ``(B, ...)``, fed to ``module`` as is), of the batch statistics computed with dropout off.

    Stops once ``max_images`` inputs were seen. The module's train/eval mode and the layers' momenta are restored.
    Returns the number of images used; raises ValueError (statistics untouched) when ``inputs`` is empty.
    """
    layers = batchnorm_layers(module)
    if not layers:
        return 0
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in layers]
    momenta, was_training = [m.momentum for m in layers], module.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average of the batch statistics
    module.eval()  # dropout off ...
    for m in layers:
        m.train()  # ... BatchNorm normalises with, and accumulates, batch statistics
    seen = 0
    try:
        for x in inputs:
            if seen >= max_images:
                break
            module(x)
            seen += x.shape[0]
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        module.train(was_training)
        if seen == 0:
            for m, (mean, var, count) in zip(layers, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
    if seen == 0:
        raise ValueError("recalibrate_batchnorm: no input batch (empty training split?)")
    return seen


@contextlib.contextmanager
def train_mode_probe(module: nn.Module) -> Iterator[nn.Module]:
    """``with train_mode_probe(unet): ...``: ``module`` in train mode (dropout on, batch statistics) for a
    measurement; afterwards its buffers (BatchNorm running statistics), its mode and the torch RNG states (CPU and the
    module's CUDA devices) are as before, so the training run is unchanged by the measurement."""
    saved = {name: buf.clone() for name, buf in module.named_buffers()}
    was_training = module.training
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            module.train()
            yield module
    finally:
        with torch.no_grad():
            for name, buf in module.named_buffers():
                buf.copy_(saved[name])
        module.train(was_training)


class GapProbe:
    """The UNet's train/eval gap as Steps 3 and 4 log it: the mean mask inside the face of the UNet in train mode
    (`train_mode_probe`: no side effects) and in eval mode.

    ``mask_in_face(batch) -> scalar tensor`` computes it for one batch with the UNet in whatever mode it is in (the
    step's other networks in eval mode). ``at_log_step(batch)`` gives the two values on one batch (the first
    validation batch, at every log step); ``over_split(loader, max_batches)`` the train-mode value over the
    validation split, next to the eval-mode ``mask_in_face`` of the validation row.
    """

    def __init__(self, unet: nn.Module, mask_in_face: Callable) -> None:
        self.unet, self.mask_in_face = unet, mask_in_face

    def measure(self, batch, train_mode: bool) -> torch.Tensor:
        self.unet.eval()
        with train_mode_probe(self.unet) if train_mode else contextlib.nullcontext():
            return self.mask_in_face(batch)

    def at_log_step(self, batch) -> dict[str, torch.Tensor]:
        return {"val_mask_in_face_train_mode": self.measure(batch, True),
                "val_mask_in_face_eval_mode": self.measure(batch, False)}

    def over_split(self, loader, max_batches: int) -> dict[str, float]:
        return {"mask_in_face_train_mode": validate(lambda b: (None, {"m": self.measure(b, True)}), loader,
                                                    max_batches)["m"]}


GAP_COLUMNS = ["mask_in_face", "mask_in_face_train_mode", "val_mask_in_face_train_mode", "val_mask_in_face_eval_mode"]
"""The loss-log columns of the gap (``mask_in_face`` itself is a term of the step's objective)."""
