"""The stages of the evaluation: which networks make the estimated mask E, and the face region F it is scored in.

    step2  the robust loss's inlier mask of the Step-1 encoder (Step 2's preliminary masks, no UNet);
    step3  the Step-1 encoder with the Step-3 UNet:  E = F * U, U = objectives.unet_mask (G2's sigmoid(5 x) head);
    step4  the Step-4 encoder and UNet (final model), same formula.
    fit_oracle  (synthetic benchmark only, no checkpoint) Step 2's rule on the render of the TRUE coefficients of
           ``ground_truth.csv`` with the generator's face model (--bfm) and camera: what a perfect fit leaves for
           the UNet to fix (the out-of-model appearance items, blur and noise, occluder edges).

F is always the rendered face of the stage's own render (the paper protocol's region). reconstruct.py takes its
masks from `predict_masks` too.

Test-time fitting (``FitSetting``, ``--fit_steps N``; utils/fitting.py): the encoder's coefficients of each image
are refined by N Adam steps on that image's own loss before the masks are made, no network weight changing. step2
fits with Step 1's terms (no UNet); step3 / step4 with Step 4's MoFA-phase terms and the stage's UNet mask,
re-predicted as the fit moves; the mask rule is then the stage's, on the fitted render. N = 0 is the paper's
feed-forward network, exactly. ``stage_label`` names a fitted stage's results (``step4_fit20``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from models.camera import CameraConfig
from models.face_model import FaceModel
from models.layout import CoeffLayout
from models.mofa import MoFA
from models.renderer import FaceRenderer, RenderOutput
from models.unet import UNet
from utils import losses
from utils.data.benchmark_files import (
    GROUND_TRUTH_NAME,
    RENDER_DTYPE,
    SYNTHETIC_CONFIG_NAME,
    GroundTruthTable,
    read_ground_truth,
    read_synthetic_config,
)
from utils.errors import DataError
from utils.fitting import DEFAULT_FIT_LR, fit_images
from utils.training.builders import Networks, load_networks, previous_checkpoint
from utils.training.objectives import unet_mask

STAGES = ("step2", "step3", "step4")
FIT_ORACLE = "fit_oracle"
"""The diagnostic stage without a network: Step 2's rule on the render of the true coefficients."""


@dataclass(frozen=True)
class FitSetting:
    """Test-time fitting before the masks are made: ``steps`` Adam steps at ``lr`` on the coefficients, with the
    loss ``preset`` the networks were trained with (``utils.fitting.checkpoint_preset``; None: G2). steps=0: none."""

    steps: int = 0
    lr: float = DEFAULT_FIT_LR
    preset: losses.LossPreset | None = None


def stage_label(stage: str, fit_steps: int = 0) -> str:
    """The name a stage's results carry: the stage itself (feed-forward, the paper protocol), or with test-time
    fitting ``<stage>_fit<N>`` (``step4_fit20``), so that fitted results are never read as the paper's."""
    return stage if fit_steps == 0 else f"{stage}_fit{fit_steps}"


def load_stage(stage: str, save_root: str | Path, bfm: str | Path | FaceModel, device: torch.device,
               checkpoint: str | Path | None = None) -> tuple[MoFA, UNet | None, dict]:
    """(mofa, unet or None, model spec) of `stage_networks`."""
    nets = stage_networks(stage, save_root, bfm, device, checkpoint)
    return nets.mofa, nets.unet, nets.spec


def stage_networks(stage: str, save_root: str | Path, bfm: str | Path | FaceModel, device: torch.device,
                   checkpoint: str | Path | None = None) -> Networks:
    """The networks of a stage, in eval mode, from the steps' final checkpoints under ``save_root``.

    step2: Step-1 ``pretrain_mofa/final.pt`` (``checkpoint`` overrides it), no UNet.
    step3: Step-1 encoder + Step-3 UNet ``Pretrain_UNet/final.pt`` (``checkpoint`` overrides the UNet's file).
    step4: Step-4 ``MoFA_UNet/final.pt`` holding "encoder" and "unet" (``checkpoint`` overrides it).
    bfm: the face model file the steps were trained with, or a loaded FaceModel.
    Returns the `builders.Networks` (mofa, unet or None, spec, the MoFA checkpoint's payload, ...). Raises
    CheckpointError (missing file, other face model, ...).
    """
    if stage not in STAGES:
        raise DataError(f"--stage {stage}: expected one of {', '.join(STAGES)}")
    face_model = bfm if isinstance(bfm, FaceModel) else FaceModel.from_h5(bfm, CoeffLayout())
    face_model = face_model.to(device)
    explicit = None if checkpoint is None else str(checkpoint)
    if stage == "step4":
        nets = load_networks(previous_checkpoint(explicit, save_root, step=4), face_model, device, unet=True)
    elif stage == "step3":
        nets = load_networks(previous_checkpoint(None, save_root, step=1), face_model, device,
                             unet_path=previous_checkpoint(explicit, save_root, step=3), unet=True)
    else:
        nets = load_networks(previous_checkpoint(explicit, save_root, step=1), face_model, device, unet=False)
    return nets


@torch.no_grad()
def predict_masks(stage: str, mofa: MoFA, unet: UNet | None, images: torch.Tensor, sigma: float = losses.SIGMA,
                  fit: FitSetting | None = None, landmarks: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, RenderOutput]:
    """Estimated mask E, face region F and the render of ``images (B,3,S,S)`` in [0, 1].

    Returns (E (B,1,S,S) in [0,1], 1 = visible face and 0 outside F; F (B,1,S,S) 0/1; RenderOutput).
    step2: E = inlier mask of the robust loss (||I - R|| < 3 sigma inside F).
    step3 / step4: E = F * unet_mask(UNet, render, image) (the one mask function of training, G2's head).
    fit (with ``fit.steps`` > 0): the render is that of the test-time fitted coefficients (module doc); it needs the
    images' ``landmarks (B,68,2)`` in pixels.
    """
    if stage not in STAGES:
        raise ValueError(f"predict_masks: unknown stage {stage!r}, expected one of {STAGES}")
    if stage != "step2" and unet is None:
        raise ValueError(f"predict_masks: stage {stage} needs a UNet")
    if fit is not None and fit.steps > 0:
        if landmarks is None:
            raise ValueError("predict_masks: test-time fitting needs the images' landmarks")
        fitted = fit_images(mofa, images, landmarks, fit.steps, fit.lr, fit.preset,
                            unet=None if stage == "step2" else unet, sigma=sigma)
        out, U = fitted.out, fitted.unet_mask
    else:
        out = mofa(images)
        U = None if stage == "step2" else unet_mask(unet, out, images)
    if stage == "step2":
        est = losses.inlier_mask(images, out.image, out.mask, sigma=sigma)
    else:
        est = U * out.mask
    return est, out.mask, out


def load_fit_oracle(image_root: str | Path, bfm: str | Path | FaceModel, device: torch.device
                    ) -> tuple[FaceRenderer, GroundTruthTable, dict]:
    """The renderer of the synthetic benchmark at ``image_root`` (its face model, camera and image size) and its
    ground truth, for the fit_oracle stage. Returns (renderer in the generator's float64, table, spec with
    image_size and encoder). Raises DataError when the folder is not a synthetic benchmark or ``bfm`` is not the
    face model it was generated with.
    """
    truth, config = read_ground_truth(image_root), read_synthetic_config(image_root)
    if truth is None or config is None:
        raise DataError(f"--stage {FIT_ORACLE} needs the synthetic benchmark's {GROUND_TRUTH_NAME} and "
                        f"{SYNTHETIC_CONFIG_NAME} in {image_root}: write them with python -m utils.synthetic.faces")
    face_model = bfm if isinstance(bfm, FaceModel) else FaceModel.from_h5(bfm, CoeffLayout())
    if truth.face_model is not None and truth.face_model != face_model.config():
        raise DataError(f"--bfm {getattr(face_model, 'source', '') or bfm} is not the face model {image_root} was "
                        f"generated with ({SYNTHETIC_CONFIG_NAME}: {truth.face_model}); pass the generator's --bfm")
    size = int(config["size"])
    camera = CameraConfig.preset(config.get("camera", "g2")).resized(size)
    renderer = FaceRenderer(face_model, camera, face_model.layout).to(device, RENDER_DTYPE)
    return renderer, truth, {"image_size": size, "encoder": "none (true coefficients)"}


@torch.no_grad()
def fit_oracle_masks(renderer: FaceRenderer, coeffs: torch.Tensor, images: torch.Tensor, sigma: float = losses.SIGMA
                     ) -> tuple[torch.Tensor, torch.Tensor, RenderOutput]:
    """Step 2's rule on the render R of the true ``coeffs (B, total)``: E = F * [||I - R|| < 3 sigma].

    images: ``(B, 3, S, S)`` in [0, 1] at the renderer's size. Returns (E, F, RenderOutput) as `predict_masks`,
    E and F float32. R is clamped to [0, 1] as the generator clamped it: a saturated light is part of what the
    image shows, not something the fit leaves unexplained.
    """
    out = renderer(coeffs.to(images.device, renderer.face_model.mean_shape.dtype))
    render = out.image.clamp(0.0, 1.0)
    est = losses.inlier_mask(images.to(render.dtype), render, out.mask, sigma=sigma)
    return est.float(), out.mask.float(), out
