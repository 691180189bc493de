"""Vertex normals and spherical-harmonics (SH) Lambertian-style shading, as in the original renderer.

All functions are pure (no cached state) and batched. The SH basis is the real orthonormal basis for bands
0-2 built from associated Legendre functions *with* the Condon-Shortley phase, i.e.
`Y_lm = K_lm P_l^|m|(cos t) * sqrt(2) cos(m p)` (m > 0), `* sqrt(2) sin(|m| p)` (m < 0), `K_l0 P_l^0` (m = 0),
with t = acos(n_z), p = atan2(n_y, n_x). In Cartesian form (n unit) the m = +-1 terms carry a minus sign.

Speed: per-vertex tensors are processed as coordinate planes `(3, B, N)` (one contiguous `(B*N,)` plane per
coordinate / colour channel), where gathers, scatter-adds and element-wise products are fastest. The functions
take and return the documented `(B, N, 3)` shapes; their outputs are `(B, N, 3)` views of plane-major memory
(`out.permute(2, 0, 1)` is contiguous), and inputs given in that form are used without a copy.
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
_MONOMIAL_SCALE = (-_C1, _C1, -_C1, _C2, -_C2, 3.0 * _C20, -_C2, 0.5 * _C2)
"""`Y_k = scale[k - 1] * monomial_k` for k = 1..8 with monomials (y, z, x, xy, yz, z^2, xz, x^2 - y^2); the
constant part of Y_20 (`-_C20`) is folded into the DC term."""


def planes(values: torch.Tensor) -> torch.Tensor:
    """`(B, N, C)` -> contiguous `(C, B, N)` coordinate planes (no copy when `values` is a view of such planes)."""
    return values.permute(2, 0, 1).contiguous()


def corner_rows(faces: torch.Tensor, batch: int, n_verts: int) -> torch.Tensor:
    """`(3, B*F)` rows `b * N + faces[f, k]` (at column `b * F + f`) into flattened `(B*N,)` vertex planes."""
    dtype = torch.int32 if batch * n_verts < 2 ** 31 else torch.int64
    offset = torch.arange(batch, device=faces.device, dtype=dtype).mul_(n_verts).view(1, batch, 1)
    return (faces.to(dtype).t().contiguous().unsqueeze(1) + offset).view(3, -1)


def _gather(plane_rows: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`(C, M)`: every `(C, R)` plane gathered at the 1-D `rows (M,)` (1-D gathers are the fastest).

    Callers gather one corner at a time: a single `(3, 3, B*F)` buffer would exceed the allocator's mmap
    threshold at BFM size and be page-faulted in anew on every call.
    """
    out = plane_rows.new_empty(plane_rows.shape[0], rows.shape[0])
    for c in range(plane_rows.shape[0]):
        torch.index_select(plane_rows[c], 0, rows, out=out[c])
    return out


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cross product of `(3, M)` plane stacks along dim 0 (row by row: no strided or fancy-indexed copies)."""
    out = torch.empty_like(a)
    for i in range(3):
        j, k = (i + 1) % 3, (i + 2) % 3
        torch.mul(a[j], b[k], out=out[i]).addcmul_(a[k], b[j], value=-1.0)
    return out


class _VertexNormals(torch.autograd.Function):
    """Unit area-weighted normals of `(3, B, N)` vertex planes with an analytic backward.

    Face normal `m = (v1 - v0) x (v2 - v0)`; vertex sum `S = sum of m over incident faces`; `n = S r` with
    `r = (|S|^2 + eps)^(-1/2)`. Backward: `dL/dS = r (G - n (n . G))`; summed over a face's corners as `g`, it
    gives `dL/dv0 = g x (v2 - v1)`, `dL/dv1 = g x (v0 - v2)`, `dL/dv2 = g x (v1 - v0)`, scatter-added per corner.
    """

    @staticmethod
    def forward(ctx, vert_planes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        flat = vert_planes.view(3, -1)  # (3, B*N)
        v0 = _gather(flat, rows[0])  # (3, B*F) coordinates of corner 0
        e1, e2 = _gather(flat, rows[1]).sub_(v0), _gather(flat, rows[2]).sub_(v0)
        face_normal = _cross(e1, e2)  # (3, B*F), length = 2 * area
        summed = torch.zeros_like(flat)
        for k in range(3):
            for c in range(3):
                summed[c].index_add_(0, rows[k], face_normal[c])
        inv_norm = torch.rsqrt((summed * summed).sum(0) + NORMAL_EPS)
        normals = summed.mul_(inv_norm)
        ctx.save_for_backward(rows, e1, e2, normals, inv_norm)
        ctx.planes_shape = vert_planes.shape
        return normals.view(vert_planes.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        rows, e1, e2, normals, inv_norm = ctx.saved_tensors
        grad = grad.reshape(normals.shape)
        grad_sum = (grad - normals * (normals * grad).sum(0)).mul_(inv_norm)
        grad_face = _gather(grad_sum, rows[0])  # (3, B*F): summed over the face's corners
        grad_face.add_(_gather(grad_sum, rows[1])).add_(_gather(grad_sum, rows[2]))
        grad_v1, grad_v2 = _cross(e2, grad_face), _cross(grad_face, e1)
        grad_v0 = (grad_v1 + grad_v2).neg_()
        out = torch.zeros_like(normals)
        for k, grad_k in enumerate((grad_v0, grad_v1, grad_v2)):
            for c in range(3):
                out[c].index_add_(0, rows[k], grad_k[c])
        return out.view(ctx.planes_shape), None


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals.

    Args:
        vertices: `(B, N, 3)` in any right-handed frame (the normals are in the same frame).
        faces: `(F, 3)` long, counter-clockwise seen from outside, so normals point outward.
    Returns:
        `(B, N, 3)` unit normals (a view of `(3, B, N)` planes); vertices used by no face get (0, 0, 0).
    """
    if vertices.ndim != 3 or vertices.shape[-1] != 3:
        raise ValueError(f"vertices must be (B, N, 3), got {tuple(vertices.shape)}")
    if faces.ndim != 2 or faces.shape[-1] != 3:
        raise ValueError(f"faces must be (F, 3), got {tuple(faces.shape)}")
    rows = corner_rows(faces, vertices.shape[0], vertices.shape[1])
    return _VertexNormals.apply(planes(vertices), rows).permute(1, 2, 0)


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
        `(B, N, 3)` RGB colours (may leave [0, 1]); a view of `(3, B, N)` planes.
    """
    if albedo.shape != normals.shape or albedo.ndim != 3:
        raise ValueError(f"albedo and normals must both be (B, N, 3), got {tuple(albedo.shape)} and "
                         f"{tuple(normals.shape)}")
    if sh.shape != (albedo.shape[0], N_LIGHT):
        raise ValueError(f"sh must be (B, {N_LIGHT}) with B={albedo.shape[0]}, got {tuple(sh.shape)}")
    x, y, z = normals.permute(2, 0, 1)  # (B, N) each
    monomials = torch.stack([y, z, x, x * y, y * z, z * z, x * z, (x - y) * (x + y)], dim=1)  # (B, 8, N)
    light = sh.view(-1, 3, N_SH_BASIS)
    scale = torch.tensor(_MONOMIAL_SCALE, dtype=sh.dtype, device=sh.device)
    constant = light[..., :1] * _C00 - light[..., 6:7] * _C20  # (B, 3, 1)
    irradiance = torch.baddbmm(constant, light[..., 1:] * scale, monomials)  # (B, 3, N)
    return (albedo.permute(2, 0, 1) * irradiance.transpose(0, 1)).permute(1, 2, 0)
