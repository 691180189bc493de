"""`FrozenIdentityEncoder`: what the two identity networks share (the interface of the identity, preserve and dist
terms).

An identity encoder = a crop, then a pretrained face-recognition network. ``forward(images, landmarks)`` cuts the
network's face crop from ``(B, 3, H, W)`` images in [0, 1] with ``(B, 68, 2)`` landmarks (pixels of those images)
and returns the network's output L2-normalised, ``(B, D)``; ``shallow(images, landmarks)`` returns the network's
early feature map of the same crop. The network is frozen (no parameter requires grad) and the encoder stays in
eval mode even under a parent's ``.train()``; gradients flow to the images and the landmarks through the crop and
the network. Subclasses give only the network (to ``__init__``) and the crop (`crop`):
`models.arcface.IdentityEncoder` (ArcFace iresnet-50, D = 512) and `models.dlib_face.DlibIdentityEncoder` (dlib's
face-recognition ResNet, D = 128).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FrozenIdentityEncoder(nn.Module):
    """A frozen face-recognition network behind its face crop (module docstring).

    ``net`` must map a crop to ``(B, D)`` features and have ``shallow(crop) -> (B, C, h, w)``.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.net.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenIdentityEncoder:
        """Ignore ``mode``: BatchNorm statistics and dropout stay frozen even under a parent's .train()."""
        return super().train(False)

    def crop(self, images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """The network's input: the face crop of ``images`` (B, 3, H, W) in [0, 1] at ``landmarks``."""
        raise NotImplementedError

    def align(self, images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """`crop` after checking the shapes (ValueError naming the class and both shapes)."""
        if images.ndim != 4 or images.shape[1] != 3 or landmarks.shape[0] != images.shape[0]:
            raise ValueError(f"{type(self).__name__}: expected (B, 3, H, W) images and (B, 68|5, 2) landmarks, got "
                             f"{tuple(images.shape)} and {tuple(landmarks.shape)}")
        return self.crop(images, landmarks)

    def forward(self, images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """L2-normalised identity embedding (B, D)."""
        return F.normalize(self.net(self.align(images, landmarks)), dim=1)

    def shallow(self, images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """The network's early feature map of the crop (preserve / dist losses)."""
        return self.net.shallow(self.align(images, landmarks))
