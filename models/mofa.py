"""MoFA: encoder + renderer, image -> coefficients -> render."""
from __future__ import annotations

import torch
from torch import nn

from models.encoder import ResNetEncoder
from models.layout import CoeffLayout
from models.renderer import FaceRenderer, RenderOutput


class MoFA(nn.Module):
    """`forward(images (B, 3, S, S) in [0, 1]) -> RenderOutput` of the predicted coefficients."""

    def __init__(self, encoder: ResNetEncoder, renderer: FaceRenderer) -> None:
        super().__init__()
        if encoder.layout != renderer.layout:
            raise ValueError(f"encoder layout {encoder.layout} != renderer layout {renderer.layout}")
        self.encoder = encoder
        self.renderer = renderer

    @property
    def layout(self) -> CoeffLayout:
        return self.renderer.layout

    def forward(self, images: torch.Tensor) -> RenderOutput:
        return self.renderer(self.encoder(images))
