"""Test-time fitting: refine the encoder's coefficients of each image by gradient steps on that image's loss.

The paper's method is feed-forward: the encoder predicts the coefficients and that is the reconstruction. Its
occlusion masks are only as good as that fit (issue 18: landmark error 3.0 px at 96 px on the demo). Here the
encoder's prediction is the starting point of ``steps`` Adam steps on the coefficients of every image, with the
training loss of the step the models come from; no network weight changes (the gradients are taken with
``torch.autograd.grad`` with respect to the coefficients only, so nothing accumulates in any ``.grad``).

- without a UNet: Step 1's terms (``objectives.step1_terms``): the robust photometric loss with its inlier mask,
  the landmark loss and the regulariser, with the preset's Step-1 weights; the identity term only when an identity
  network is passed (off by default: it needs one);
- with a UNet: Step 4's MoFA-phase terms (``objectives.step4_mofa_terms``: masked reconstruction, landmark,
  regulariser, area, identity if a network is passed) with the preset's Step-4 MoFA weights, the mask M = F * U
  re-predicted by the UNet from the current render at every step (and, as in Step 4's MoFA phase, differentiated
  through: the render is the UNet's input).

Per-image independence: the objective is the SUM over images of each image's own loss (the batch-mean terms times
the batch size; the pooled masked reconstruction is computed image by image), and Adam works element-wise, so an
image's fit does not depend on the other images of its batch: fitting a batch equals fitting each image alone (to
float rounding). Batch for speed, never for a different answer.

The optimised variable is the coefficient vector divided by the encoder's output scale (``models.encoder.
output_scale``: texture x3, angles x0.3, t_z x0.005), the space the encoder's last layer predicts in. Measured on
the demo's validation split (Step 1 of the demo, Step-2 rule): optimising the post-scaled coefficients instead gives
the same landmark error and IoU to within 0.07 px and 0.006; of Adam learning rates 0.01, 0.03, 0.05 and 0.1,
0.05 is the best at 10 and 20 steps (0.1 overshoots there: IoU below the feed-forward start at 10 steps).

API (for Step 2, the evaluation and ``reconstruct.py``)::

    result = fit_images(mofa, images, landmarks, steps=20)               # Step 1's terms
    result = fit_images(mofa, images, landmarks, steps=20, unet=unet)    # Step 4's MoFA-phase terms
    result.coeffs (B, total), result.out (RenderOutput, no grad), result.unet_mask (B,1,H,W) or None

``steps=0`` returns the encoder's prediction unchanged (the feed-forward network). ``checkpoint_preset(payload)``
is the loss preset a checkpoint was trained with (pass it as ``preset``); ``add_fit_args`` adds ``--fit_steps`` /
``--fit_lr`` to a command.
"""
from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from models.encoder import output_scale
from models.renderer import RenderOutput
from utils import losses
from utils.training.checkpoint import CheckpointError
from utils.training.objectives import LossSetup, step1_terms, step4_mofa_terms, unet_mask

DEFAULT_FIT_LR = 0.05  # chosen on the demo's validation split with benchmarks/test_time_fit.py (0.01 gains about half)


@dataclass
class FitResult:
    """The outcome of ``fit_coefficients`` / ``fit_images``.

    coeffs: (B, total) the fitted post-scaled coefficients (detached). out: the render of ``coeffs`` (no grad).
    unet_mask: the UNet's mask U (B, 1, H, W) of that render, or None without a UNet. steps: the steps taken.
    """

    coeffs: torch.Tensor
    out: RenderOutput
    unet_mask: torch.Tensor | None
    steps: int


def add_fit_args(parser: argparse.ArgumentParser, what: str = "the masks") -> None:
    """``--fit_steps N`` (default 0: the paper's feed-forward network) and ``--fit_lr`` (Adam, default 0.05); their
    ranges are checked by ``utils.training.flags.check_flags`` (every command with them runs it first)."""
    parser.add_argument("--fit_steps", type=int, default=0,
                        help=f"test-time fitting: refine each image's coefficients by N Adam steps on its own loss "
                             f"before {what} are computed (utils/fitting.py; default 0 = the feed-forward network)")
    parser.add_argument("--fit_lr", type=float, default=DEFAULT_FIT_LR,
                        help="Adam learning rate of the test-time fitting (default %(default)s)")


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module | None):
    """Put the modules in eval mode (BatchNorm running statistics, no dropout: per-image results), then restore."""
    present = [m for m in modules if m is not None]
    modes = [m.training for m in present]
    try:
        for m in present:
            m.eval()
        yield
    finally:
        for m, mode in zip(present, modes):
            m.train(mode)


def per_image_sum(images: torch.Tensor, out: RenderOutput, landmarks: torch.Tensor, setup: LossSetup,
                  preset: losses.LossPreset, unet: nn.Module | None = None, identity=None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fitting objective: the sum over images of each image's loss (module doc), and the UNet mask or None."""
    batch = images.shape[0]
    skip = frozenset(name for name in ("identity",) if identity is None)
    if unet is None:
        weights = preset.step1
        terms, _ = step1_terms(out, images, landmarks, setup, identity, skip)
        return batch * losses.weighted_sum(terms, weights), None
    weights = preset.step4_mofa
    U = unet_mask(unet, out, images).float()
    terms = step4_mofa_terms(U, out, images, landmarks, setup, identity, skip | {"rec"})
    if weights.rec:  # pooled over the batch in training: here image by image
        terms["rec"] = losses.masked_reconstruction(images, out.image, out.mask * U, per_image=True).mean()
    return batch * losses.weighted_sum(terms, weights), U


def checkpoint_preset(payload: dict) -> losses.LossPreset:
    """The loss preset a checkpoint's run trained with (its ``--loss_preset`` and ``--drop_terms``, from the
    checkpoint's config; G2 when it records none): fit with the loss the networks were trained on."""
    config = payload.get("config") or {}
    name = config.get("loss_preset") or "g2"
    if name not in losses.PRESETS:
        raise CheckpointError(f"the checkpoint's loss preset {name!r} is unknown (known: {sorted(losses.PRESETS)})")
    return losses.PRESETS[name].without(tuple(config.get("drop_terms") or ()))


def fit_coefficients(renderer: nn.Module, coeffs: torch.Tensor, images: torch.Tensor, landmarks: torch.Tensor,
                     steps: int, lr: float = DEFAULT_FIT_LR, preset: losses.LossPreset | None = None,
                     unet: nn.Module | None = None, identity=None, sigma: float = losses.SIGMA) -> FitResult:
    """Refine ``coeffs`` (B, total), e.g. the encoder's prediction, by ``steps`` Adam steps per image.

    renderer: the ``FaceRenderer`` (``mofa.renderer``); images (B, 3, S, S) in [0, 1]; landmarks (B, 68, 2) pixels of
    the images (the CSV's, as in training); preset: a ``losses.LossPreset`` (default G2; Step-1 weights without a
    UNet, Step-4 MoFA weights with one); unet: Step 3's or Step 4's UNet, or None; identity: an identity network for
    the identity term, or None (off); sigma: the robust loss's sigma (Step 1's terms).
    Works under ``torch.no_grad()`` too (it enables gradients for the coefficients itself).
    """
    if steps < 0:
        raise ValueError(f"fit_coefficients: steps must be >= 0, got {steps}")
    preset = preset or losses.PRESETS["g2"]
    setup = LossSetup.from_preset(preset, renderer.layout, images.shape[-1], sigma=sigma)
    scale = output_scale(renderer.layout).to(coeffs)
    x = (coeffs.detach().float() / scale).clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    stopped = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)  # images whose fit left the finite numbers
    with _eval_mode(unet), torch.enable_grad():
        for _ in range(steps):
            loss, _ = per_image_sum(images, renderer(x * scale), landmarks, setup, preset, unet, identity)
            # autograd.grad, not backward(): backward would fill the UNet's and the renderer's .grad too
            (grad,) = torch.autograd.grad(loss, [x])
            kept = x.detach().clone()
            stopped = stopped | ~torch.isfinite(grad).all(dim=1)
            x.grad = torch.where(stopped[:, None], torch.zeros_like(grad), grad)
            opt.step()
            x.grad = None
            with torch.no_grad():  # an image that diverges keeps its last finite coefficients; the others go on
                stopped = stopped | ~torch.isfinite(x).all(dim=1)
                x.copy_(torch.where(stopped[:, None], kept, x))
    with torch.no_grad(), _eval_mode(unet):
        fitted = (x * scale).detach()
        out = renderer(fitted)
        U = unet_mask(unet, out, images).float() if unet is not None else None
    return FitResult(coeffs=fitted, out=out, unet_mask=U, steps=steps)


def fit_images(mofa: nn.Module, images: torch.Tensor, landmarks: torch.Tensor, steps: int,
               lr: float = DEFAULT_FIT_LR, preset: losses.LossPreset | None = None, unet: nn.Module | None = None,
               identity=None, sigma: float = losses.SIGMA) -> FitResult:
    """``fit_coefficients`` from the encoder's prediction: ``mofa`` is a ``models.mofa.MoFA`` (encoder run in eval
    mode, without gradients). ``steps=0`` gives the feed-forward reconstruction."""
    with torch.no_grad(), _eval_mode(mofa.encoder):
        coeffs = mofa.encoder(images).float()
    return fit_coefficients(mofa.renderer, coeffs, images, landmarks, steps, lr, preset, unet, identity, sigma)
