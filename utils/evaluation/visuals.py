"""Images for people: composites and residuals, (B,C,H,W) tensors in [0,1]."""
from __future__ import annotations

import torch


def composite(images: torch.Tensor, render: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The render pasted over the input where ``mask`` (B,1,H,W) is 1: I*(1-M) + R*M, clamped to [0,1]."""
    return (images * (1 - mask) + render * mask).clamp(0, 1)


def residual(images: torch.Tensor, render: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-pixel RGB error inside ``mask``, scaled so an error of 0.25 is white: (B,1,H,W)."""
    return ((images - render).norm(dim=1, keepdim=True) * mask * 4).clamp(0, 1)
