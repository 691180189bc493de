"""Encoders: image -> post-scaled face coefficients (docs/method.md §5).

`ResNetEncoder` is the paper's torchvision ResNet (random or local ImageNet weights). `DlibTrunkEncoder` starts from
the convolutional trunk of dlib's pretrained face-recognition network (`models/dlib_face.py`), the one pretrained
face network that can be had here, with the same zero-initialised head. `build_encoder(arch, ...)` picks one.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from models.dlib_face import CHIP_SIZE, DlibFaceNet, load_dlib_face_net
from models.layout import CoeffLayout
from models.state import load_weights_file

logger = logging.getLogger(__name__)

RESNETS = ("resnet18", "resnet34", "resnet50")
DLIB_TRUNK = "dlib"
ARCHS = (*RESNETS, DLIB_TRUNK)
TEX_SCALE = 3.0
ANGLE_SCALE = 0.3
TZ_SCALE = 0.005


def output_scale(layout: CoeffLayout) -> torch.Tensor:
    """`(total,)` post-scaling of the raw head output: tex x3, angles x0.3, t_z x0.005, everything else x1."""
    scale = torch.ones(layout.total)
    scale[layout.slice("tex")] = TEX_SCALE
    scale[layout.slice("angles")] = ANGLE_SCALE
    scale[layout.slice("trans").stop - 1] = TZ_SCALE
    return scale


class ResNetEncoder(nn.Module):
    """torchvision ResNet whose `fc` is a zero-initialised `Linear(features, layout.total)`.

    Input `(B, 3, H, W)` RGB in [0, 1] (no ImageNet normalisation, as the original); output `(B, layout.total)`
    post-scaled coefficients (all zeros at initialisation: mean face, default pose and light).
    `weights_path`: a local torchvision ImageNet state dict for the backbone (its `fc.*` entries are ignored);
    nothing is ever downloaded. `announce_random_init=False` silences the random-init log line for callers that
    load trained weights right after construction (rebuilding from a checkpoint).
    """

    def __init__(self, layout: CoeffLayout = CoeffLayout(), arch: str = "resnet50",
                 weights_path: str | Path | None = None, announce_random_init: bool = True) -> None:
        super().__init__()
        if arch not in RESNETS:
            raise ValueError(f"unknown encoder arch {arch!r}; expected one of {RESNETS}")
        self.layout = layout
        self.arch = arch
        self.backbone = getattr(torchvision.models, arch)(weights=None)
        if weights_path is not None:
            _load_backbone(self.backbone, Path(weights_path), arch)
        elif announce_random_init:
            logger.info("ResNetEncoder(%s): no weights_path given, backbone randomly initialised "
                        "(the original started from ImageNet weights)", arch)
        head = nn.Linear(self.backbone.fc.in_features, layout.total)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        self.backbone.fc = head
        self.register_buffer("scale", output_scale(layout), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """`(B, 3, H, W)` in [0, 1] -> `(B, layout.total)` post-scaled coefficients."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        return self.backbone(images) * self.scale


def _load_backbone(backbone: nn.Module, path: Path, arch: str) -> None:
    """Load an ImageNet state dict into `backbone` strictly, except for its `fc.*` entries."""
    load_weights_file(backbone, path, f"torchvision {arch} weights file", skip=("fc.",),
                      hint=f"expected a local torchvision {arch} ImageNet state dict; give none to start from random "
                           "weights")


class DlibTrunkEncoder(nn.Module):
    """dlib's face-recognition trunk (stem + 14 residual blocks, pretrained, trainable) -> global average pool ->
    a zero-initialised `Linear(256, layout.total)`, post-scaled like `ResNetEncoder`.

    Input `(B, 3, H, W)` RGB in [0, 1], resized (bilinear) to dlib's 150 x 150 chip size, the scale the trunk's
    filters were trained at (an aligned crop frames the face much as dlib's chip does), then mapped to dlib's input
    range; output `(B, layout.total)` post-scaled coefficients (zeros at initialisation). The trunk has no
    normalisation layers (dlib's affine layers are folded into the convolutions), so there are no batch statistics.
    `weights_path`: dlib's `.dat` file (default: the installed face-recognition-models package);
    `pretrained=False` builds the architecture only, for loading trained weights from a checkpoint.
    """

    def __init__(self, layout: CoeffLayout = CoeffLayout(), weights_path: str | Path | None = None,
                 pretrained: bool = True) -> None:
        super().__init__()
        net = load_dlib_face_net(weights_path) if pretrained else DlibFaceNet()
        self.layout, self.arch, self.input_size = layout, DLIB_TRUNK, CHIP_SIZE
        self.register_buffer("mean", net.mean.detach().clone())
        self.stem, self.blocks = net.stem, net.blocks
        self.requires_grad_(True)
        head = nn.Linear(net.fc.in_features, layout.total)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        self.head = head
        self.register_buffer("scale", output_scale(layout), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """`(B, 3, H, W)` in [0, 1] -> `(B, layout.total)` post-scaled coefficients."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(images, size=(self.input_size,) * 2, mode="bilinear", align_corners=False,
                                   antialias=images.shape[-1] > self.input_size)
        x = (images * 255.0 - self.mean.view(1, 3, 1, 1)) / 256.0
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3))) * self.scale


def build_encoder(layout: CoeffLayout, arch: str, weights_path: str | Path | None = None,
                  restoring: bool = False) -> nn.Module:
    """The encoder named ``arch`` (`ARCHS`). ``weights_path``: a local ImageNet state dict for a ResNet, dlib's
    `.dat` file for ``"dlib"`` (default: the installed package). ``restoring=True`` when trained weights are loaded
    next: nothing pretrained is read and no random-init line is logged."""
    if arch == DLIB_TRUNK:
        return DlibTrunkEncoder(layout, weights_path, pretrained=not restoring)
    return ResNetEncoder(layout, arch=arch, weights_path=None if restoring else weights_path,
                         announce_random_init=not restoring)
