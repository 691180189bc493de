"""ArcFace identity network (insightface iresnet-50) and a frozen, differentiable identity encoder.

``IResNet`` follows insightface's ``iresnet`` architecture with the same parameter names, so the
``backbone.pth`` of ``ms1mv3_arcface_r50_fp16`` loads with ``load_state_dict(strict=True)``:
stem conv1 (3x3, stride 1) - bn1 - prelu; stages layer1..4 of IBasicBlocks (64, 128, 256, 512 channels, the
first block of each stage has stride 2 and a 1x1-conv + BN ``downsample``); head bn2 - flatten - dropout -
fc(512*7*7 -> 512) - features (BatchNorm1d). A 112x112 input gives layer1 56x56, ..., layer4 7x7.

``IdentityEncoder`` (a `models.identity_encoder.FrozenIdentityEncoder`: frozen, always in eval mode, unit
embedding) warps a face image to the 112x112 ArcFace crop with a least-squares similarity from five points (eye
centres = means of the eye corners as in G2, nose tip, mouth corners) to the ArcFace template, in torch
(differentiable w.r.t. the image and the landmarks), maps it to [-1, 1] and returns the L2-normalised 512-d
embedding, or the layer1 feature map for the Step-4 preserve / dist losses.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.identity_encoder import FrozenIdentityEncoder
from models.landmarks68 import five_points
from models.state import load_weights_file

R50_LAYERS = (3, 4, 14, 3)
ARCFACE_SIZE = 112
# ArcFace 5-point template in 112x112 pixels (x, y): left eye, right eye, nose tip, left / right mouth corner.
ARCFACE_TEMPLATE = ((38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366), (41.5493, 92.3655),
                    (70.7299, 92.2041))


class IBasicBlock(nn.Module):
    """BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus the (downsampled) input."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


def _stage(inplanes: int, planes: int, blocks: int) -> nn.Sequential:
    downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=2, bias=False),
                               nn.BatchNorm2d(planes, eps=1e-5))
    layers = [IBasicBlock(inplanes, planes, stride=2, downsample=downsample)]
    layers += [IBasicBlock(planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class IResNet(nn.Module):
    """insightface iresnet; ``layers=(3, 4, 14, 3)`` is iresnet-50. Input (B, 3, 112, 112) in [-1, 1];
    output (B, 512) un-normalised features."""

    def __init__(self, layers: Sequence[int] = R50_LAYERS, num_features: int = 512, dropout: float = 0.0):
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"IResNet: expected 4 positive stage depths, got {tuple(layers)}")
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        self.layer1 = _stage(64, 64, layers[0])
        self.layer2 = _stage(64, 128, layers[1])
        self.layer3 = _stage(128, 256, layers[2])
        self.layer4 = _stage(256, 512, layers[3])
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)

    def shallow(self, x: torch.Tensor) -> torch.Tensor:
        """Stem + layer1: (B, 3, 112, 112) -> (B, 64, 56, 56)."""
        return self.layer1(self.prelu(self.bn1(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.shallow(x))))  # (B, 512, 7, 7)
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def alignment_points(landmarks: torch.Tensor) -> torch.Tensor:
    """(B, 68, 2) iBUG landmarks -> (B, 5, 2) alignment points (`models.landmarks68.five_points`: eye centres as
    the means of the eye corners, as in G2); (B, 5, 2) input is returned unchanged. Pixels, origin top-left."""
    if landmarks.ndim == 3 and landmarks.shape[1:] == (5, 2):
        return landmarks
    if landmarks.ndim != 3:
        raise ValueError(f"expected (B, 68, 2) or (B, 5, 2) landmarks, got {tuple(landmarks.shape)}")
    return five_points(landmarks)


def similarity_to_template(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping src to dst.

    src: (B, K, 2) points, dst: (K, 2) or (B, K, 2). Returns (B, 2, 3) A with dst ~ A[:, :, :2] @ p + A[:, :, 2].
    """
    dst = dst.expand_as(src)
    ms, md = src.mean(dim=1, keepdim=True), dst.mean(dim=1, keepdim=True)
    s, d = src - ms, dst - md  # (B, K, 2)
    denom = s.pow(2).sum(dim=(1, 2)).clamp_min(1e-8)
    a = (s * d).sum(dim=(1, 2)) / denom
    b = (s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(dim=1) / denom
    rot = torch.stack([torch.stack([a, -b], dim=-1), torch.stack([b, a], dim=-1)], dim=1)  # (B, 2, 2)
    t = md[:, 0] - (rot @ ms[:, 0, :, None])[..., 0]  # (B, 2)
    return torch.cat([rot, t[..., None]], dim=2)


def warp_to_template(images: torch.Tensor, landmarks: torch.Tensor, size: int = ARCFACE_SIZE) -> torch.Tensor:
    """Warp (B, 3, H, W) images so the 5 points derived from ``landmarks`` (pixels of these images) land on
    the ArcFace template (scaled to ``size``). Bilinear, zero outside the image; returns (B, 3, size, size)
    in the input's range."""
    B, _, H, W = images.shape
    template = torch.tensor(ARCFACE_TEMPLATE, dtype=images.dtype, device=images.device) * (size / ARCFACE_SIZE)
    A = similarity_to_template(alignment_points(landmarks).to(images.dtype), template)  # (B, 2, 3)
    a, b = A[:, 0, 0], A[:, 1, 0]
    inv = torch.stack([torch.stack([a, b], -1), torch.stack([-b, a], -1)], 1) / (a * a + b * b).clamp_min(1e-12)[
        :, None, None]  # (B, 2, 2)
    half = (size - 1) / 2.0  # output pixel q = half * n + half for normalised n in [-1, 1] (align_corners)
    to_norm = torch.tensor([2.0 / (W - 1), 2.0 / (H - 1)], dtype=images.dtype, device=images.device)
    lin = to_norm[None, :, None] * inv * half  # (B, 2, 2)
    off = to_norm[None, :] * (inv @ (half - A[:, :, 2])[..., None])[..., 0] - 1.0  # (B, 2)
    theta = torch.cat([lin, off[..., None]], dim=2)
    grid = F.affine_grid(theta, [B, 3, size, size], align_corners=True)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


class IdentityEncoder(FrozenIdentityEncoder):
    """Frozen ArcFace (iresnet) identity encoder (`models.identity_encoder.FrozenIdentityEncoder`): the 112x112
    ArcFace crop, then iresnet; D = 512, ``shallow`` = layer1 (B, 64, 56, 56).

    images: (B, 3, H, W) RGB in [0, 1]; landmarks: (B, 68, 2) or (B, 5, 2) pixels of those images.
    ``weights_path`` None builds random weights (tests); else insightface's ``backbone.pth``, loaded strictly.
    """

    def __init__(self, weights_path: str | Path | None = None, layers: Sequence[int] = R50_LAYERS):
        net = IResNet(layers)
        if weights_path is not None:
            load_arcface_weights(net, weights_path)
        super().__init__(net)

    def crop(self, images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, 112, 112) ArcFace crop in [-1, 1] (outside the image: -1)."""
        return warp_to_template(images, landmarks) * 2.0 - 1.0


def load_arcface_weights(net: IResNet, path: str | Path) -> None:
    """Load an insightface ``backbone.pth`` state dict into ``net`` strictly; WeightsError on any problem."""
    load_weights_file(net, path, "ArcFace weights file",
                      hint="pass the backbone.pth of insightface's ms1mv3_arcface_r50_fp16 with --arcface_weights")
