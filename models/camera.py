"""Pinhole camera: Euler-angle pose, model -> camera transform and perspective projection.

Frames: model frame is x right, y up, z toward the viewer (mm); camera frame is x right, y down, z forward
(depth > 0 in front of the camera). Screen coordinates are pixels, origin top-left, pixel centres at integers.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

PRESETS = {
    "g2": {"focal": 1014.72, "trans0": (0.0, 0.0, 1000.0)},
    "g1": {"focal": 250.0, "trans0": (0.0, 30.0, 300.0)},
}
MIN_DEPTH = 1e-6
"""Depths with smaller magnitude are replaced by +-MIN_DEPTH (sign kept, 0 counts as +) before dividing."""


@dataclass(frozen=True)
class CameraConfig:
    """Intrinsics and base translation. `focal` in pixels for an `image_size` x `image_size` image; `trans0` mm."""

    focal: float = 1014.72
    trans0: tuple[float, float, float] = (0.0, 0.0, 1000.0)
    image_size: int = 224

    def __post_init__(self) -> None:
        if self.focal <= 0 or self.image_size < 1 or len(self.trans0) != 3:
            raise ValueError(f"invalid CameraConfig {self}: focal > 0, image_size >= 1 and 3 translations needed")

    @classmethod
    def preset(cls, name: str = "g2", image_size: int = 224) -> CameraConfig:
        """`"g2"` (default: focal 1014.72, T0 (0, 0, 1000)) or `"g1"` (focal 250, T0 (0, 30, 300)) at 224 px,
        then resized to `image_size`."""
        if name not in PRESETS:
            raise ValueError(f"unknown camera preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**PRESETS[name]).resized(image_size)

    @property
    def principal_point(self) -> tuple[float, float]:
        """(cx, cy) = ((S - 1) / 2, (S - 1) / 2) pixels."""
        c = (self.image_size - 1) / 2.0
        return (c, c)

    def resized(self, image_size: int) -> CameraConfig:
        """The same scene rendered at `image_size` pixels (focal scaled by image_size / self.image_size)."""
        return replace(self, focal=self.focal * image_size / self.image_size, image_size=image_size)


def euler_rotation(angles: torch.Tensor) -> torch.Tensor:
    """Rotation matrices `R = diag(1, -1, -1) @ Rx(ax) @ Ry(ay) @ Rz(az)`.

    Args:
        angles: `(B, 3)` radians (ax pitch, ay yaw, az roll); standard right-handed rotations about model axes.
    Returns:
        `(B, 3, 3)` proper rotations (det +1) from the model frame to the camera frame.
    """
    if angles.ndim != 2 or angles.shape[-1] != 3:
        raise ValueError(f"angles must be (B, 3), got {tuple(angles.shape)}")
    cos, sin = torch.cos(angles), torch.sin(angles)  # (B, 3)
    one, zero = torch.ones_like(cos[:, 0]), torch.zeros_like(cos[:, 0])
    cx, cy, cz = cos.unbind(1)
    sx, sy, sz = sin.unbind(1)
    rx = _matrix([one, zero, zero, zero, cx, -sx, zero, sx, cx])
    ry = _matrix([cy, zero, sy, zero, one, zero, -sy, zero, cy])
    rz = _matrix([cz, -sz, zero, sz, cz, zero, zero, zero, one])
    flip = torch.tensor([1.0, -1.0, -1.0], dtype=angles.dtype, device=angles.device)
    return flip[None, :, None] * (rx @ ry @ rz)


def _matrix(entries: list[torch.Tensor]) -> torch.Tensor:
    """Nine `(B,)` tensors in row-major order -> `(B, 3, 3)`."""
    return torch.stack(entries, dim=1).view(-1, 3, 3)


def to_camera(vertices: torch.Tensor, rotation: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """`X_cam = R @ X + T` for model-frame vertices `(B, N, 3)`, `R (B, 3, 3)`, `T (B, 3)` mm -> `(B, N, 3)`.

    The result is a view of `(3, B, N)` coordinate planes (see `models.shading`), computed as one batched
    `(3, 3) @ (3, N)` product per element (a skinny `(N, 3) @ (3, 3)` product is many times slower on CPU).
    """
    if vertices.ndim != 3 or vertices.shape[-1] != 3:
        raise ValueError(f"vertices must be (B, N, 3), got {tuple(vertices.shape)}")
    if rotation.shape != (vertices.shape[0], 3, 3) or translation.shape != (vertices.shape[0], 3):
        raise ValueError(f"rotation (B, 3, 3) / translation (B, 3) expected for B={vertices.shape[0]}, "
                         f"got {tuple(rotation.shape)} / {tuple(translation.shape)}")
    rotated = torch.baddbmm(translation.unsqueeze(-1), rotation, vertices.transpose(1, 2))  # (B, 3, N)
    return rotated.transpose(0, 1).contiguous().permute(1, 2, 0)


def project(v_cam: torch.Tensor, cfg: CameraConfig) -> torch.Tensor:
    """Perspective projection of camera-frame vertices `(B, N, 3)` mm to screen vertices `(B, N, 3)`.

    Returns `(u, v, z)`: u = f X / Z + cx, v = f Y / Z + cy in pixels (origin top-left, y down, pixel centres at
    integers), z = Z the camera depth in mm (unchanged, not guarded); a view of `(3, B, N)` coordinate planes.
    """
    if v_cam.ndim != 3 or v_cam.shape[-1] != 3:
        raise ValueError(f"v_cam must be (B, N, 3), got {tuple(v_cam.shape)}")
    xy, z = v_cam.permute(2, 0, 1).split([2, 1])  # (2, B, N), (1, B, N)
    guard = torch.where(z < 0, -MIN_DEPTH, MIN_DEPTH).to(z.dtype)
    z_safe = torch.where(z.abs() < MIN_DEPTH, guard, z)
    centre = cfg.principal_point[0]  # (c, c): the image is square
    uv = torch.div(xy, z_safe).mul_(cfg.focal).add_(centre)
    return torch.cat([uv, z]).permute(1, 2, 0)
