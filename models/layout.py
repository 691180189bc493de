"""Coefficient layout: the single place that knows the order and sizes of the coefficient vector.

The coefficient tensor is `(B, layout.total)` float, laid out as
`[shape | exp | tex | angles(3) | trans(3) | light(27)]`. It is the post-scaled tensor emitted by the encoder
(see `models/encoder.py`); all zeros means mean face, default pose and default light. Offsets (the base
translation and `SH_INIT`) are added only by the renderer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

N_ANGLES = 3
N_TRANS = 3
N_SH_BASIS = 9
N_LIGHT = 3 * N_SH_BASIS

SH_DC_OFFSET = 0.7 * 2.0 * math.pi
"""Added to the DC coefficient (index 9c + 0) of every colour channel c: ambient light of about 1.24."""

SH_INIT: tuple[float, ...] = tuple(
    SH_DC_OFFSET if k % N_SH_BASIS == 0 else 0.0 for k in range(N_LIGHT)
)
"""The constant SH offset `(27,)`, index 9c + k for colour channel c and SH basis k."""

FIELDS: tuple[str, ...] = ("shape", "exp", "tex", "angles", "trans", "light")


def light_with_offset(light: torch.Tensor) -> torch.Tensor:
    """Return `light + SH_INIT` as a new tensor.

    Args:
        light: `(B, 27)` SH coefficients as predicted (offset-free), index 9c + k.
    Returns:
        `(B, 27)` SH coefficients used for shading.
    """
    if light.ndim != 2 or light.shape[-1] != N_LIGHT:
        raise ValueError(f"light must be (B, {N_LIGHT}), got {tuple(light.shape)}")
    offset = torch.zeros(N_LIGHT, dtype=light.dtype, device=light.device)  # built on the device: no host copy
    offset[::N_SH_BASIS] = SH_DC_OFFSET
    return light + offset


@dataclass(frozen=True)
class Coeffs:
    """Named parts of a `(B, total)` coefficient tensor; each field is a `(B, size)` view (or a tensor to join)."""

    shape: torch.Tensor
    exp: torch.Tensor
    tex: torch.Tensor
    angles: torch.Tensor
    trans: torch.Tensor
    light: torch.Tensor


@dataclass(frozen=True)
class CoeffLayout:
    """Sizes of the coefficient blocks. `angles` (3, radians), `trans` (3, mm) and `light` (27) are fixed."""

    n_shape: int = 80
    n_exp: int = 64
    n_tex: int = 80

    def __post_init__(self) -> None:
        for name in ("n_shape", "n_exp", "n_tex"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"CoeffLayout.{name} must be a positive int, got {value!r}")

    def sizes(self) -> dict[str, int]:
        """Block sizes in layout order."""
        return {"shape": self.n_shape, "exp": self.n_exp, "tex": self.n_tex,
                "angles": N_ANGLES, "trans": N_TRANS, "light": N_LIGHT}

    @property
    def total(self) -> int:
        """Length of the coefficient vector (257 by default)."""
        return sum(self.sizes().values())

    def slice(self, name: str) -> slice:
        """Slice of block `name` (one of `FIELDS`) along the last axis."""
        start = 0
        for field_name, size in self.sizes().items():
            if field_name == name:
                return slice(start, start + size)
            start += size
        raise KeyError(f"unknown coefficient block {name!r}; expected one of {FIELDS}")

    def split(self, coeffs: torch.Tensor) -> Coeffs:
        """Split `(B, total)` coefficients into named `(B, size)` views (no copy)."""
        if coeffs.ndim != 2 or coeffs.shape[-1] != self.total:
            raise ValueError(f"coefficients must be (B, {self.total}) for {self}, got {tuple(coeffs.shape)}")
        return Coeffs(**{name: coeffs[:, self.slice(name)] for name in FIELDS})

    def join(self, parts: Coeffs) -> torch.Tensor:
        """Concatenate named parts back into a `(B, total)` tensor (inverse of `split`)."""
        blocks = []
        for name, size in self.sizes().items():
            block = getattr(parts, name)
            if block.ndim != 2 or block.shape[-1] != size:
                raise ValueError(f"coefficient block {name!r} must be (B, {size}), got {tuple(block.shape)}")
            blocks.append(block)
        return torch.cat(blocks, dim=1)

    def zeros(self, batch: int, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All-zero coefficients `(batch, total)`: mean face, default pose, default light."""
        return torch.zeros(batch, self.total, device=device, dtype=dtype)
