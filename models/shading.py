"""Vertex normals and spherical-harmonics (SH) Lambertian-style shading, as in the original renderer.

All functions are pure (no cached state) and batched. The SH basis is the real orthonormal basis for bands
0-2 built from associated Legendre functions *with* the Condon-Shortley phase, i.e.
`Y_lm = K_lm P_l^|m|(cos t) * sqrt(2) cos(m p)` (m > 0), `* sqrt(2) sin(|m| p)` (m < 0), `K_l0 P_l^0` (m = 0),
with t = acos(n_z), p = atan2(n_y, n_x). In Cartesian form (n unit) the m = +-1 terms carry a minus sign.
"""
from __future__ import annotations

import math

import torch

from models.layout import N_LIGHT, N_SH_BASIS

NORMAL_EPS = 1e-12
"""Added to the squared norm before renormalising, so isolated vertices get a zero normal instead of NaN."""

_C00 = 1.0 / math.sqrt(4.0 * math.pi)  # Y_00
_C1 = math.sqrt(3.0 / (4.0 * math.pi))  # |Y_1m| / n-component
_C2 = math.sqrt(15.0 / (4.0 * math.pi))  # Y_2,-2 / (xy), -Y_2,+-1 / (yz | xz)
_C20 = math.sqrt(5.0 / (16.0 * math.pi))  # Y_20 / (3 z^2 - 1)


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals.

    Args:
        vertices: `(B, N, 3)` in any right-handed frame (the normals are in the same frame).
        faces: `(F, 3)` long, counter-clockwise seen from outside, so normals point outward.
    Returns:
        `(B, N, 3)` unit normals; vertices used by no face get (0, 0, 0).
    """
    if vertices.ndim != 3 or vertices.shape[-1] != 3:
        raise ValueError(f"vertices must be (B, N, 3), got {tuple(vertices.shape)}")
    if faces.ndim != 2 or faces.shape[-1] != 3:
        raise ValueError(f"faces must be (F, 3), got {tuple(faces.shape)}")
    v0, v1, v2 = (vertices[:, faces[:, k]] for k in range(3))  # each (B, F, 3)
    face_normals = torch.cross(v1 - v0, v2 - v0, dim=-1)  # (B, F, 3), length = 2 * area
    per_corner = face_normals[:, :, None, :].expand(-1, -1, 3, -1).reshape(vertices.shape[0], -1, 3)  # (B, 3F, 3)
    summed = torch.zeros_like(vertices).index_add(1, faces.reshape(-1), per_corner)  # (B, N, 3)
    return summed * torch.rsqrt((summed * summed).sum(-1, keepdim=True) + NORMAL_EPS)


def sh_basis(normals: torch.Tensor) -> torch.Tensor:
    """Real orthonormal SH bands 0-2 evaluated at unit normals.

    Args:
        normals: `(B, N, 3)` unit vectors (x, y, z) in the frame the light is expressed in (camera frame).
    Returns:
        `(B, N, 9)` in the order (0,0), (1,-1), (1,0), (1,1), (2,-2), (2,-1), (2,0), (2,1), (2,2).
    """
    if normals.shape[-1] != 3:
        raise ValueError(f"normals must be (..., 3), got {tuple(normals.shape)}")
    x, y, z = normals.unbind(-1)
    return torch.stack([
        torch.full_like(x, _C00),
        -_C1 * y,
        _C1 * z,
        -_C1 * x,
        _C2 * x * y,
        -_C2 * y * z,
        _C20 * (3.0 * z * z - 1.0),
        -_C2 * x * z,
        0.5 * _C2 * (x * x - y * y),
    ], dim=-1)


def shade(albedo: torch.Tensor, normals: torch.Tensor, sh: torch.Tensor) -> torch.Tensor:
    """Shaded colour `albedo_c * sum_k sh[9c + k] * Y_k(n)`, nothing clamped.

    Args:
        albedo: `(B, N, 3)` RGB.
        normals: `(B, N, 3)` unit normals in the camera frame.
        sh: `(B, 27)` SH coefficients with the offset already added (see `models.layout.light_with_offset`).
    Returns:
        `(B, N, 3)` RGB colours (may leave [0, 1]).
    """
    if albedo.shape != normals.shape or albedo.ndim != 3:
        raise ValueError(f"albedo and normals must both be (B, N, 3), got {tuple(albedo.shape)} and "
                         f"{tuple(normals.shape)}")
    if sh.shape != (albedo.shape[0], N_LIGHT):
        raise ValueError(f"sh must be (B, {N_LIGHT}) with B={albedo.shape[0]}, got {tuple(sh.shape)}")
    basis = sh_basis(normals)  # (B, N, 9)
    irradiance = torch.einsum("bnk,bck->bnc", basis, sh.view(-1, 3, N_SH_BASIS))  # (B, N, 3)
    return albedo * irradiance
