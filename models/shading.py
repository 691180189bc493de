"""Vertex normals and spherical-harmonics (SH) Lambertian-style shading, as in the original renderer.

All functions are pure (no cached state) and batched. The SH basis is the real orthonormal basis for bands
0-2 built from associated Legendre functions *with* the Condon-Shortley phase, i.e.
`Y_lm = K_lm P_l^|m|(cos t) * sqrt(2) cos(m p)` (m > 0), `* sqrt(2) sin(|m| p)` (m < 0), `K_l0 P_l^0` (m = 0),
with t = acos(n_z), p = atan2(n_y, n_x). In Cartesian form (n unit) the m = +-1 terms carry a minus sign.

Speed: per-vertex tensors are processed as coordinate planes `(3, B, N)` (one contiguous `(B*N,)` plane per
coordinate / colour channel), where gathers, scatter-adds and element-wise products are fastest. The functions
take and return the documented `(B, N, 3)` shapes; their outputs are `(B, N, 3)` views of plane-major memory
(`out.permute(2, 0, 1)` is contiguous), and inputs given in that form are used without a copy. The normals work
inside on vertex-major `(3, N, B)` planes (batch innermost), where one index or one row of a precomputed sparse
sum (`MeshTopology`) serves the whole batch.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from models.layout import N_LIGHT, N_SH_BASIS
from models.rasterizer import gather_rows

NORMAL_EPS = 1e-12
"""Added to the squared norm before renormalising, so isolated vertices get a zero normal instead of NaN."""

SH_C00 = 1.0 / math.sqrt(4.0 * math.pi)  # Y_00
SH_C1 = math.sqrt(3.0 / (4.0 * math.pi))  # |Y_1m| / n-component
"""The band-0 and band-1 constants of `sh_basis`, the only spelling of them."""
_C2 = math.sqrt(15.0 / (4.0 * math.pi))  # Y_2,-2 / (xy), -Y_2,+-1 / (yz | xz)
_C20 = math.sqrt(5.0 / (16.0 * math.pi))  # Y_20 / (3 z^2 - 1)
_MONOMIAL_SCALE = (-SH_C1, SH_C1, -SH_C1, _C2, -_C2, 3.0 * _C20, -_C2, 0.5 * _C2)
"""`Y_k = scale[k - 1] * monomial_k` for k = 1..8 with monomials (y, z, x, xy, yz, z^2, xz, x^2 - y^2); the
constant part of Y_20 (`-_C20`) is folded into the DC term."""


def planes(values: torch.Tensor) -> torch.Tensor:
    """`(B, N, C)` -> contiguous `(C, B, N)` coordinate planes (no copy when `values` is a view of such planes)."""
    return values.permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class SparseParts:
    """A sparse matrix as plain CSR tensors (so it can be deep-copied like any tensor): `(R, C)` with `crow (R+1,)`,
    `col (nnz,)`, `values (nnz,)`."""

    crow: torch.Tensor
    col: torch.Tensor
    values: torch.Tensor
    size: tuple[int, int]

    @classmethod
    def from_entries(cls, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
                     size: tuple[int, int]) -> SparseParts:
        """The matrix with `values[i]` added at `(rows[i], cols[i])` (duplicates summed)."""
        with warnings.catch_warnings():  # torch warns once that sparse support is in beta
            warnings.simplefilter("ignore", UserWarning)
            coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, size, check_invariants=False)
            csr = coo.coalesce().to_sparse_csr()
        return cls(csr.crow_indices(), csr.col_indices(), csr.values(), size)

    def matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """The sparse CSR tensor with values of `dtype` (no copy for float32)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(self.crow, self.col, self.values.to(dtype), self.size,
                                           check_invariants=False)


@dataclass(frozen=True, eq=False)
class MeshTopology:
    """What the vertex normals need from a triangle list, built once per mesh and device by `mesh_topology`.

    corners: `(3, F)` int32, `corners[k] = faces[:, k]` (row indices for `index_select`).
    face_sum: `(N, F)`, a 1 at `(faces[f, k], f)`: `face_sum @ x` adds every face's row of `x` to its three vertices;
    face_gather: `(F, N)`, its transpose: sums the rows of a face's three vertices;
    edge_sum: `(N, 2F)`, +1 at `(faces[f, 1], f)` and `(faces[f, 2], F + f)`, -1 at `(faces[f, 0], f)` and
        `(faces[f, 0], F + f)`: the adjoint of the edge vectors `v1 - v0`, `v2 - v0`.
    faces, faces_version: the `(F, 3)` long list it was built from and its autograd version counter then;
    n_verts: N.
    """

    corners: torch.Tensor
    face_sum: SparseParts
    face_gather: SparseParts
    edge_sum: SparseParts
    faces: torch.Tensor
    faces_version: int
    n_verts: int

    def matches(self, faces: torch.Tensor, n_verts: int) -> bool:
        """True when built from this very `faces` tensor (not modified since) for `n_verts` vertices."""
        return self.faces is faces and self.faces_version == faces._version and self.n_verts == n_verts


def mesh_topology(faces: torch.Tensor, n_verts: int) -> MeshTopology:
    """Precompute the index and summation matrices of `faces (F, 3)` long for meshes of `n_verts` vertices."""
    if faces.ndim != 2 or faces.shape[-1] != 3:
        raise ValueError(f"faces must be (F, 3), got {tuple(faces.shape)}")
    n_faces, device = faces.shape[0], faces.device
    vertex = faces.t().reshape(-1).long()  # corner k of face f at k F + f
    face = torch.arange(n_faces, device=device).repeat(3)
    ones = torch.ones(3 * n_faces, device=device)
    c0, c1, c2 = faces.long().unbind(1)
    edge_col = torch.arange(2 * n_faces, device=device)
    edge_sum = SparseParts.from_entries(torch.cat([c1, c2, c0, c0]), edge_col.repeat(2),
                                        torch.cat([ones[:2 * n_faces], -ones[:2 * n_faces]]),
                                        (n_verts, 2 * n_faces))
    return MeshTopology(corners=faces.t().to(torch.int32).contiguous(),
                        face_sum=SparseParts.from_entries(vertex, face, ones, (n_verts, n_faces)),
                        face_gather=SparseParts.from_entries(face, vertex, ones, (n_faces, n_verts)),
                        edge_sum=edge_sum, faces=faces, faces_version=faces._version, n_verts=n_verts)


def _sum_rows(parts: SparseParts, planes: torch.Tensor) -> torch.Tensor:
    """`(C, M, B)`: the sparse `(M, R)` matrix times every `(R, B)` plane of `planes (C, R, B)`."""
    if planes.device.type == "cpu":  # sparse CSR x dense into the output planes (MKL), no copies
        matrix = parts.matrix(planes.dtype)
        out = planes.new_empty(planes.shape[0], matrix.shape[0], planes.shape[2])
        for c in range(planes.shape[0]):
            torch.mm(matrix, planes[c], out=out[c])
        return out
    if planes.device.type == "cuda":
        matrix = parts.matrix(planes.dtype)
        return torch.stack([torch.mm(matrix, plane) for plane in planes])
    rows = torch.repeat_interleave(torch.arange(parts.size[0], device=planes.device), parts.crow.diff())
    terms = planes.index_select(1, parts.col) * parts.values.to(planes.dtype)[:, None]
    return planes.new_zeros(planes.shape[0], parts.size[0], planes.shape[2]).index_add_(1, rows, terms)


def _cross(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Cross product of `(3, ...)` plane stacks along dim 0 (plane by plane: no strided or fancy-indexed copies)."""
    out = torch.empty_like(a) if out is None else out
    for i in range(3):
        j, k = (i + 1) % 3, (i + 2) % 3
        torch.mul(a[j], b[k], out=out[i]).addcmul_(a[k], b[j], value=-1.0)
    return out


def _squared_norm(planes: torch.Tensor) -> torch.Tensor:
    """`sum_c planes[c]^2` of `(3, ...)` planes, without a `(3, ...)` temporary."""
    out = planes[0] * planes[0]
    return out.addcmul_(planes[1], planes[1]).addcmul_(planes[2], planes[2])


class _VertexNormals(torch.autograd.Function):
    """Unit area-weighted normals of `(3, B, N)` vertex planes with an analytic backward.

    Face normal `m = e1 x e2` with `e1 = v1 - v0`, `e2 = v2 - v0`; vertex sum `S = sum of m over incident faces`;
    `n = S r` with `r = (|S|^2 + eps)^(-1/2)`. Backward: `dL/dS = r (G - n (n . G))`; summed over a face's corners
    as `g`, it gives `dL/de1 = e2 x g`, `dL/de2 = g x e1`, which `edge_sum` carries back to the three corners.
    Inside, every coordinate is a `(N, B)` plane (vertex-major, batch inner), so one row gather or one row of the
    sparse sums serves the whole batch.
    """

    @staticmethod
    def forward(ctx, vert_planes: torch.Tensor, topology: MeshTopology) -> torch.Tensor:
        verts = vert_planes.transpose(1, 2).contiguous()  # (3, N, B)
        c0, c1, c2 = topology.corners
        v0 = gather_rows(verts, c0)  # (3, F, B) coordinates of corner 0
        edges = verts.new_empty(3, 2, c0.shape[0], verts.shape[2])  # (coordinate, e1 | e2, F, B)
        e1, e2 = edges[:, 0], edges[:, 1]
        for c in range(3):
            torch.index_select(verts[c], 0, c1, out=e1[c]).sub_(v0[c])
            torch.index_select(verts[c], 0, c2, out=e2[c]).sub_(v0[c])
        summed = _sum_rows(topology.face_sum, _cross(e1, e2, out=v0))  # face normals (length 2 area) per vertex
        inv_norm = _squared_norm(summed).add_(NORMAL_EPS).rsqrt_()
        normals = summed.mul_(inv_norm)
        ctx.save_for_backward(edges, normals, inv_norm)
        ctx.topology = topology
        return normals.transpose(1, 2).contiguous()  # (3, B, N)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        edges, normals, inv_norm = ctx.saved_tensors
        grad = grad.transpose(1, 2).clone(memory_format=torch.contiguous_format)  # (3, N, B), ours to modify
        radial = (normals[0] * grad[0]).addcmul_(normals[1], grad[1]).addcmul_(normals[2], grad[2]).neg_()
        grad_sum = grad.addcmul_(normals, radial).mul_(inv_norm)  # r (G - n (n . G))
        grad_face = _sum_rows(ctx.topology.face_gather, grad_sum)  # (3, F, B): summed over the face's corners
        grad_edges = torch.empty_like(edges)
        _cross(edges[:, 1], grad_face, out=grad_edges[:, 0])  # d loss / d e1
        _cross(grad_face, edges[:, 0], out=grad_edges[:, 1])  # d loss / d e2
        out = _sum_rows(ctx.topology.edge_sum, grad_edges.view(3, -1, grad_edges.shape[-1]))  # (3, N, B)
        return out.transpose(1, 2).contiguous(), None


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor, topology: MeshTopology | None = None) -> torch.Tensor:
    """Area-weighted unit vertex normals.

    Args:
        vertices: `(B, N, 3)` in any right-handed frame (the normals are in the same frame).
        faces: `(F, 3)` long, counter-clockwise seen from outside, so normals point outward.
        topology: `mesh_topology(faces, N)`, to reuse across calls (built here when None or built for another
            mesh).
    Returns:
        `(B, N, 3)` unit normals (a view of `(3, B, N)` planes); vertices used by no face get (0, 0, 0).
    """
    if vertices.ndim != 3 or vertices.shape[-1] != 3:
        raise ValueError(f"vertices must be (B, N, 3), got {tuple(vertices.shape)}")
    if faces.ndim != 2 or faces.shape[-1] != 3:
        raise ValueError(f"faces must be (F, 3), got {tuple(faces.shape)}")
    if topology is None or not topology.matches(faces, vertices.shape[1]):
        topology = mesh_topology(faces, vertices.shape[1])
    return _VertexNormals.apply(planes(vertices), topology).permute(1, 2, 0)


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
        torch.full_like(x, SH_C00),
        -SH_C1 * y,
        SH_C1 * z,
        -SH_C1 * x,
        _C2 * x * y,
        -_C2 * y * z,
        _C20 * (3.0 * z * z - 1.0),
        -_C2 * x * z,
        0.5 * _C2 * (x * x - y * y),
    ], dim=-1)


def _basis_scale(like: torch.Tensor) -> torch.Tensor:
    """`(9,)` with `Y_k = scale[k] * q_k`, `q = (1, y, z, x, xy, yz, z^2, xz, x^2 - y^2)` (the `sh_basis` order; the
    constant part of Y_20 is left out); dtype and device of `like`, filled there (`fill_` runs on the device:
    assigning a Python number to a CUDA element would copy it from the host and synchronise)."""
    scale = like.new_empty(N_SH_BASIS)
    for k, value in enumerate((SH_C00, *_MONOMIAL_SCALE)):
        scale[k].fill_(value)
    return scale


def _to_plane_order(values: torch.Tensor) -> torch.Tensor:
    """`(..., 9)` in the `sh_basis` order (1, y, z, x, ...) -> the order of `_Shade`'s planes (1, x, y, z, ...)."""
    return torch.cat([values[..., :1], values[..., 3:4], values[..., 1:3], values[..., 4:]], dim=-1)


def _to_basis_order(values: torch.Tensor) -> torch.Tensor:
    """`(..., 9)` in the order of `_Shade`'s planes -> the `sh_basis` order (the inverse of `_to_plane_order`)."""
    return torch.cat([values[..., :1], values[..., 2:4], values[..., 1:2], values[..., 4:]], dim=-1)


class _Shade(torch.autograd.Function):
    """`colour_c = albedo_c * E_c` on `(3, B, N)` planes, irradiance `E_c = sum_k W_ck q_k`, analytic backward.

    `q (9, B, N)`: the planes `(1, x, y, z, xy, yz, z^2, xz, x^2 - y^2)`; `W (B, 3, 9)`: the light times
    `_basis_scale` in that order, with the constant part of Y_20 (`-_C20 sh[9c + 6]`) added to the DC weight. One
    `bmm` does the sums over k; the rest is element-wise on `(B, N)` planes, with no stack of monomials and no
    autograd graph. Backward, with `G` the upstream gradient and `G_E = G * albedo`: d/d albedo = `G * E`;
    d/d sh = `scale * sum_n G_E q` (one `bmm`; Y_20's constant is taken back from the DC sum); d/d normals =
    `sum_k (W^T G_E)_k dq_k/dn` (one `bmm` for `W^T G_E`, then the monomials' derivatives, accumulated in place
    into its x, y, z planes). Only the gradients asked for are computed; `q` and `E` are kept for the backward.
    """

    @staticmethod
    def forward(ctx, albedo: torch.Tensor, normals: torch.Tensor, sh: torch.Tensor) -> torch.Tensor:
        """`albedo`, `normals`: `(3, B, N)` planes; `sh`: `(B, 27)`. Returns the `(3, B, N)` colour planes."""
        x, y, z = normals
        q = normals.new_empty(N_SH_BASIS, *x.shape)
        q[0].fill_(1.0)
        q[1:4].copy_(normals)
        torch.mul(normals[:2], normals[1:], out=q[4:6])  # xy, yz
        torch.mul(z, z, out=q[6])
        torch.mul(x, z, out=q[7])
        torch.mul(x, x, out=q[8]).addcmul_(y, y, value=-1.0)
        light = sh.reshape(-1, 3, N_SH_BASIS)
        scale = _basis_scale(sh)
        weight = light * scale
        weight[..., 0] -= light[..., 6] * _C20
        weight = _to_plane_order(weight)  # (B, 3, 9)
        irradiance = q.new_empty(3, *x.shape)
        torch.bmm(weight, q.transpose(0, 1), out=irradiance.transpose(0, 1))
        needs_albedo, needs_normals, needs_sh = ctx.needs_input_grad
        ctx.save_for_backward(albedo if needs_normals or needs_sh else None, irradiance if needs_albedo else None,
                              q if needs_normals or needs_sh else None, weight if needs_normals else None,
                              scale if needs_sh else None)
        return albedo * irradiance

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """`grad (3, B, N)` -> d loss / d (albedo `(3, B, N)`, normals `(3, B, N)`, sh `(B, 27)`); None where not
        needed."""
        albedo, irradiance, q, weight, scale = ctx.saved_tensors
        needs_albedo, needs_normals, needs_sh = ctx.needs_input_grad
        grad_albedo = grad_normals = grad_sh = None
        if needs_albedo:
            grad_albedo = torch.mul(grad, irradiance, out=torch.empty_like(irradiance))
        if not (needs_normals or needs_sh):
            return grad_albedo, None, None
        grad_e = torch.mul(grad, albedo, out=torch.empty_like(albedo))  # (3, B, N) d loss / d E
        if needs_sh:
            sums = _to_basis_order(torch.bmm(grad_e.transpose(0, 1), q.permute(1, 2, 0)))  # (B, 3, 9) sum_n G_E q
            grad_light = sums * scale
            grad_light[..., 6] -= sums[..., 0] * _C20
            grad_sh = grad_light.view(-1, N_LIGHT)
        if needs_normals:
            # d loss / d q_k = (W^T G_E)_k for k = x, y, z, xy, yz, z^2, xz, x^2 - y^2
            grad_q = q.new_empty(N_SH_BASIS - 1, *q.shape[1:])
            torch.bmm(weight[..., 1:].transpose(1, 2), grad_e.transpose(0, 1), out=grad_q.transpose(0, 1))
            g_x, g_y, g_z, g_xy, g_yz, g_zz, g_xz, g_d = grad_q
            x, y, z = q[1:4]
            g_x.addcmul_(y, g_xy).addcmul_(z, g_xz).addcmul_(x, g_d, value=2.0)
            g_y.addcmul_(x, g_xy).addcmul_(z, g_yz).addcmul_(y, g_d, value=-2.0)
            g_z.addcmul_(y, g_yz).addcmul_(x, g_xz).addcmul_(z, g_zz, value=2.0)
            grad_normals = grad_q[:3]  # a view of the 8-plane buffer (the renderer's normals consume it at once)
        return grad_albedo, grad_normals, grad_sh


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
    if not albedo.dtype == normals.dtype == sh.dtype:
        raise ValueError(f"albedo, normals and sh must share one dtype, got {albedo.dtype}, {normals.dtype}, "
                         f"{sh.dtype}")
    return _Shade.apply(planes(albedo), planes(normals), sh).permute(1, 2, 0)
