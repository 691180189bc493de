"""Differentiable triangle rasterizer: ``rasterize`` -> ``Fragments`` -> ``interpolate``.

Screen frame: ``screen_verts[..., 0]`` = u (pixels, right = column), ``[..., 1]`` = v (pixels, down = row),
``[..., 2]`` = camera depth z (> 0 in front). Pixel (row i, col j) is sampled at (u=j, v=i).

Algorithm of the default ``"torch"`` backend (one batched code path for CPU and CUDA):

1. Visibility, under ``torch.no_grad``: every (batch, triangle) pair is culled (depth <= near, zero area, back
   face, non-finite) or given the integer pixel bounding box of its integer sample points, clipped to the image.
   Triangles are bucketed by the number of pixels in that box rounded up to a power of two; each bucket
   enumerates its candidate pixels as one ``(triangles, capacity)`` tensor, evaluates the edge functions and
   the affinely interpolated depth, and folds a packed int64 key ``float32 bits of depth << 32 | face id``
   into a per-pixel buffer with ``scatter_reduce(amin)``. Smallest depth wins, ties go to the lower face id.
2. Barycentrics, differentiable: the covered pixels are listed once (``Fragments.coverage``) and the
   screen-space barycentrics of their winning triangles are recomputed from ``screen_verts`` with an analytic
   backward, as a compact ``(3, K)`` tensor (``Fragments.weights``); ``interpolate`` blends per-vertex attributes
   over the same list. Background pixels cost nothing; the dense ``(B, H, W, 3)`` barycentrics are only built
   when ``Fragments.bary`` is read.

Host synchronisation: two per ``rasterize`` call, none in ``interpolate``: the bucket sizes
(``bincount(...).tolist()``) and the number of covered pixels (``nonzero``). Buckets are contiguous slices
of one stable sort by bucket id, so no further synchronisation happens; sparse neighbouring buckets are
processed together at the larger capacity (``_bucket_groups``). A bucket whose candidate tensor would exceed
``_MAX_CANDIDATES`` elements is processed in chunks (sizes known on the host). Edge functions are exactly
antisymmetric in the edge's endpoints (``_bucket_keys``), so a pixel on an edge shared by two triangles is
classified consistently (exactly one of them, or both when it lies exactly on the edge): no cracks between
adjacent triangles.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

_NO_HIT = torch.iinfo(torch.int64).max
_MISS = 0x7F800000 << 32  # keys >= this (depth +inf, or no candidate at all) are background
_MAX_CANDIDATES = 1 << 21  # (M, cap) temporaries stay below glibc's largest reusable block (32 MB)
_MERGE_SLACK = 1 << 14  # padding candidates a bucket may add to save a pass (see _bucket_groups)
_BACKENDS = ("torch", "nvdiffrast")


@dataclass(frozen=True)
class Coverage:
    """The covered pixels of a rasterization, listed once so that interpolation skips the background.

    pixels: ``(K,)`` long flat pixel ids ``b * H * W + i * W + j``, increasing.
    corner_rows: ``(3, K)`` long rows ``b * N + faces[f, k]`` of the visible face's corners in ``(B*N, ...)``
        flattened per-vertex tensors.
    n_verts: N, the vertex count the rows refer to.
    """

    pixels: torch.Tensor
    corner_rows: torch.Tensor
    n_verts: int


@dataclass(frozen=True)
class Fragments:
    """Per-pixel rasterization result.

    pix_to_face: ``(B, H, W)`` long, ``pix_to_face[b, i, j] = f`` means face ``faces[f]`` is visible at
        pixel (row i, col j) of batch element b; -1 on background.
    zbuf: ``(B, H, W)`` interpolated camera depth of the visible face (float32 precision); inf on background.
    mask: ``(B, 1, H, W)`` float, 1 where a face is visible, detached.
    coverage: the covered pixels (``Coverage``), which ``interpolate`` reads.
    weights: ``(3, K)`` screen-space (affine) barycentrics of the covered pixels, in ``coverage.pixels`` order,
        w.r.t. the visible face's vertices ``faces[f, 0..2]``; differentiable w.r.t. ``screen_verts``.
    The dense ``bary (B, H, W, 3)`` (zero on background, differentiable) is built from ``weights`` on first use.
    """

    pix_to_face: torch.Tensor
    zbuf: torch.Tensor
    mask: torch.Tensor
    coverage: Coverage = field(repr=False, compare=False)
    weights: torch.Tensor = field(repr=False, compare=False)

    @functools.cached_property
    def bary(self) -> torch.Tensor:
        """``(B, H, W, 3)`` barycentrics of the visible face at every pixel, zero on background."""
        dense = self.weights.new_zeros(self.pix_to_face.numel() * 3)
        dense = dense.scatter(0, _bary_slots(self.coverage.pixels).view(-1), self.weights.reshape(-1))
        return dense.view(*self.pix_to_face.shape, 3)

    def detach(self) -> Fragments:
        """Return a copy whose tensors carry no autograd history."""
        return Fragments(self.pix_to_face, self.zbuf.detach(), self.mask.detach(), self.coverage,
                         self.weights.detach())


def rasterize(
    screen_verts: torch.Tensor,
    faces: torch.Tensor,
    image_size: tuple[int, int],
    near: float = 1e-3,
    cull_backfaces: bool = True,
    backend: str = "torch",
) -> Fragments:
    """Rasterize a batch of meshes sharing one triangle list.

    screen_verts: ``(B, N, 3)`` float, ``(u, v, z)`` in the screen frame (module docstring).
    faces: ``(F, 3)`` long vertex indices; front faces are counter-clockwise as the viewer sees them, i.e. their
        signed area ``(u1-u0)*(v2-v0) - (v1-v0)*(u2-u0)`` is negative in (u right, v down) coordinates.
    image_size: ``(H, W)`` in pixels.
    near: triangles with any vertex depth ``<= near`` are culled. Zero-area triangles are always culled,
        back faces (positive signed area) when ``cull_backfaces`` is True. Non-finite vertices cull their faces.
    backend: ``"torch"`` (default, any device) or ``"nvdiffrast"`` (CUDA tensors, package installed; its
        coverage at exact triangle edges follows nvdiffrast's own fill rule).
    A pixel is covered when all three edge functions are >= 0 (edges inclusive).
    """
    height, width = _check_inputs(screen_verts, faces, image_size, backend)
    with torch.no_grad():
        if backend == "nvdiffrast":
            pix_to_face = _visible_faces_nvdiffrast(screen_verts, faces, height, width, near, cull_backfaces)
            zbuf = None
        else:
            pix_to_face, zbuf = _visible_faces(screen_verts, faces, height, width, near, cull_backfaces)
        coverage = _coverage(pix_to_face, faces, screen_verts.shape[1])
    weights = _Barycentric.apply(screen_verts, coverage.corner_rows, coverage.pixels, (height, width))
    if zbuf is None:
        with torch.no_grad():
            depth = _Interpolate.apply(screen_verts[..., 2:], coverage.corner_rows, coverage.pixels, weights,
                                       (height, width))[:, 0]
            zbuf = torch.where(pix_to_face >= 0, depth, float("inf"))
    mask = (pix_to_face >= 0).unsqueeze(1).to(screen_verts.dtype)
    return Fragments(pix_to_face=pix_to_face, zbuf=zbuf, mask=mask, coverage=coverage, weights=weights)


def interpolate(attrs: torch.Tensor, fragments: Fragments, faces: torch.Tensor) -> torch.Tensor:
    """Interpolate per-vertex attributes with the fragments' barycentrics.

    attrs: ``(B, N, C)`` float per-vertex values (any range), N as in the rasterized mesh.
    faces: the ``(F, 3)`` list given to ``rasterize``.
    Returns ``(B, C, H, W)``, zero on background. Gradients flow to ``attrs`` and, through
    ``fragments.bary``, to the screen vertices.
    """
    if attrs.ndim != 3 or not attrs.is_floating_point():
        raise ValueError(f"interpolate: attrs must be float (B, N, C), got {tuple(attrs.shape)} {attrs.dtype}")
    batch = fragments.pix_to_face.shape[0]
    if attrs.shape[0] != batch:
        raise ValueError(f"interpolate: attrs batch {attrs.shape[0]} != fragments batch {batch}")
    coverage = fragments.coverage
    if coverage.n_verts != attrs.shape[1]:
        raise ValueError(f"interpolate: attrs has {attrs.shape[1]} vertices, the rasterized mesh {coverage.n_verts}")
    return _Interpolate.apply(attrs, coverage.corner_rows, coverage.pixels, fragments.weights,
                              tuple(fragments.pix_to_face.shape[1:]))


def _check_inputs(
    screen_verts: torch.Tensor, faces: torch.Tensor, image_size: tuple[int, int], backend: str
) -> tuple[int, int]:
    """Validate shapes and options; return ``(H, W)``."""
    if screen_verts.ndim != 3 or screen_verts.shape[-1] != 3 or not screen_verts.is_floating_point():
        raise ValueError(f"rasterize: screen_verts must be float (B, N, 3), got {tuple(screen_verts.shape)} "
                         f"{screen_verts.dtype}")
    if faces.ndim != 2 or faces.shape[-1] != 3 or faces.dtype != torch.long:
        raise ValueError(f"rasterize: faces must be long (F, 3), got {tuple(faces.shape)} {faces.dtype}")
    if faces.device != screen_verts.device:
        raise ValueError(f"rasterize: faces on {faces.device} but screen_verts on {screen_verts.device}")
    if len(image_size) != 2 or min(int(s) for s in image_size) < 1:
        raise ValueError(f"rasterize: image_size must be (H, W) with positive sizes, got {image_size}")
    if faces.shape[0] >= 2 ** 31:
        raise ValueError(f"rasterize: at most 2**31 - 1 faces are supported, got {faces.shape[0]}")
    if faces.shape[0] > 0 and screen_verts.shape[1] == 0:
        raise ValueError("rasterize: faces given but screen_verts has no vertices")
    if backend not in _BACKENDS:
        raise ValueError(f"rasterize: backend must be one of {_BACKENDS}, got {backend!r}")
    return int(image_size[0]), int(image_size[1])


def _signed_area(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Twice the signed screen area from corner coordinates ``u[k], v[k]``, k = 0..2; negative = front facing."""
    return (u[1] - u[0]) * (v[2] - v[0]) - (v[1] - v[0]) * (u[2] - u[0])


def gather_rows(planes: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``planes[:, idx]`` for ``(C, R, ...)`` planes and a 1-D index: ``(C, len(idx), ...)``, one ``index_select``
    per plane (gathers from contiguous planes are the fastest; a single fancy index is many times slower)."""
    out = planes.new_empty(planes.shape[0], idx.shape[0], *planes.shape[2:])
    for c in range(planes.shape[0]):
        torch.index_select(planes[c], 0, idx, out=out[c])
    return out


def _take(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``values[idx]`` for a 1-D ``values`` and an index of any shape."""
    return values.index_select(0, idx.reshape(-1)).view(idx.shape)


def _corner_rows(faces: torch.Tensor, batch: int, n_verts: int) -> torch.Tensor:
    """``(3, B*F)`` rows ``b * N + faces[f, k]`` into flattened ``(B*N,)`` vertex planes, at column ``b * F + f``."""
    dtype = torch.int32 if batch * n_verts < 2 ** 31 else torch.int64
    offset = torch.arange(batch, device=faces.device, dtype=dtype).mul_(n_verts).view(1, batch, 1)
    return (faces.to(dtype).t().contiguous().unsqueeze(1) + offset).view(3, -1)


def _vertex_planes(screen_verts: torch.Tensor, near: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flattened ``(B*N,)`` u, v, z; u is NaN at vertices with z <= near or non-finite z, which culls their faces."""
    u, v, z = (screen_verts[..., c].reshape(-1) for c in range(3))
    return torch.where((z > near) & torch.isfinite(z), u, float("nan")), v.contiguous(), z.contiguous()


def _keep(area: torch.Tensor, cull_backfaces: bool) -> torch.Tensor:
    """Faces that are drawn, from their signed area (NaN when a corner is unusable)."""
    return (area < 0) & (area > -float("inf")) if cull_backfaces else (area != 0) & torch.isfinite(area)


def _bucket_index(
    u: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, height: int, width: int, cull_backfaces: bool
) -> torch.Tensor:
    """Bucket id ``(B*F,)`` int32 of every (batch, face): 0 when culled or when its box holds no pixel.

    The box holds the integer sample points of the triangle's bounding box, clipped to the image; bucket k >= 1
    holds boxes of ``2**(k-2) < pixels <= 2**(k-1)`` pixels. Faces with a non-finite (NaN-marked) corner are
    culled through their non-finite area.
    """
    cu, cv = _take(u, rows), _take(v, rows)  # (3, B*F)
    keep = _keep(_signed_area(cu, cv), cull_backfaces)
    n_pix = None
    for coord, size in ((cu, width), (cv, height)):
        lo = torch.minimum(torch.minimum(coord[0], coord[1]), coord[2]).ceil_().clamp_(min=0)
        hi = torch.maximum(torch.maximum(coord[0], coord[1]), coord[2]).floor_().clamp_(max=size - 1)
        count = hi.sub_(lo).add_(1).clamp_(min=0)
        n_pix = count if n_pix is None else n_pix.mul_(count)
    n_pix = torch.where(keep, n_pix, 0.0).to(torch.int32)
    exponent = ((n_pix - 1).to(torch.float32).view(torch.int32) >> 23) - 125  # ceil(log2(n)) + 1 for n >= 2
    return torch.where(n_pix > 1, exponent, n_pix)


def _candidate_pixels(cu: torch.Tensor, cv: torch.Tensor, cap: int, hw: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Pixel coordinates ``px, py`` ``(M, cap)`` (float) of the boxes of ``(3, M)`` corners, and a validity mask
    (None when every slot is valid, ``cap == 1``)."""
    height, width = hw
    x0 = torch.minimum(torch.minimum(cu[0], cu[1]), cu[2]).ceil_().clamp_(min=0).unsqueeze(1)  # (M, 1)
    y0 = torch.minimum(torch.minimum(cv[0], cv[1]), cv[2]).ceil_().clamp_(min=0).unsqueeze(1)
    if cap == 1:
        return x0, y0, None
    x1 = torch.maximum(torch.maximum(cu[0], cu[1]), cu[2]).floor_().clamp_(max=width - 1).unsqueeze(1)
    y1 = torch.maximum(torch.maximum(cv[0], cv[1]), cv[2]).floor_().clamp_(max=height - 1).unsqueeze(1)
    box_w = x1 - x0 + 1
    slot = torch.arange(cap, device=cu.device, dtype=cu.dtype)
    dy = (slot / box_w).floor_()  # exact: slot / box_w is an integer or at least 1 / box_w away from one
    px, py = x0 + (slot - dy * box_w), y0 + dy
    return px, py, py <= y1


def _bucket_keys(
    planes: tuple[torch.Tensor, ...], rows: torch.Tensor, ids: torch.Tensor, n_faces: int, cap: int,
    hw: tuple[int, int], cull_backfaces: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate pixel ids and packed depth/face keys, both ``(M*cap,)``, of the (batch, face) columns ``ids``.

    ``planes``: vertex u, v, z; ``rows``: ``(3, B*F)`` corner rows. Candidates outside the triangle (or beyond
    its box) get the depth +inf, whose key is above every hit's (``_MISS``). The edge function of edge a -> b at pixel p
    is evaluated as
    ``cross(P_a - p, P_b - p)``, which is exactly antisymmetric in (a, b): two triangles sharing an edge never
    both miss a pixel next to it (no cracks), and a pixel exactly on it is covered by both.
    """
    height, width = hw
    corner_rows = gather_rows(rows, ids)  # (3, M)
    cu, cv, cz = (_take(plane, corner_rows) for plane in planes)
    area = _signed_area(cu, cv)
    px, py, inside = _candidate_pixels(cu, cv, cap, hw)
    du = [px - cu[k, :, None] for k in range(3)]  # (M, cap) each; u negated: front faces get e_k >= 0 inside
    dv = [cv[k, :, None] - py for k in range(3)]
    if not cull_backfaces:
        flip = torch.where(area < 0, 1.0, -1.0).to(cu.dtype).unsqueeze(1)
        du = [d * flip for d in du]
    edge = [torch.mul(du[(k + 1) % 3], dv[(k + 2) % 3]).sub_(dv[(k + 1) % 3] * du[(k + 2) % 3]) for k in range(3)]
    lowest = torch.minimum(torch.minimum(edge[0], edge[1]), edge[2])  # NaN (unusable corner) propagates: not inside
    inside = lowest >= 0 if inside is None else inside.logical_and_(lowest >= 0)
    z_scaled = (cz / area.abs_()).unsqueeze(-1)  # (3, M, 1)
    depth = (edge[0] * z_scaled[0]).add_(edge[1] * z_scaled[1]).add_(edge[2] * z_scaled[2]).abs_()  # no FMA
    depth = torch.where(inside, depth, float("inf")).to(torch.float32)  # a miss: above every hit's key
    image = ids // n_faces
    key = (depth.view(torch.int32).to(torch.int64) << 32).bitwise_or_((ids - image * n_faces).unsqueeze(1))
    pix = (py * width + px).clamp_(max=height * width - 1).to(torch.int64).add_(image.unsqueeze(1) * (height * width))
    return pix.view(-1), key.view(-1)


def _visible_faces(
    screen_verts: torch.Tensor, faces: torch.Tensor, height: int, width: int, near: float, cull_backfaces: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Z-buffer pass: ``pix_to_face (B, H, W)`` long (-1 background) and ``zbuf (B, H, W)`` (inf background)."""
    batch, n_verts, _ = screen_verts.shape
    best = torch.full((batch * height * width,), _NO_HIT, dtype=torch.int64, device=screen_verts.device)
    if faces.shape[0] > 0 and batch > 0:
        planes = _vertex_planes(screen_verts, near)
        rows = _corner_rows(faces, batch, n_verts)
        bucket = _bucket_index(planes[0], planes[1], rows, height, width, cull_backfaces)
        n_buckets = (height * width - 1).bit_length() + 2
        counts = torch.bincount(bucket, minlength=n_buckets).tolist()  # the first host synchronisation
        order = torch.sort(bucket.to(torch.int16), stable=True).indices  # bucket k is one contiguous slice
        for start, stop, cap in _bucket_groups(counts):
            for ids in order[start:stop].split(max(1, _MAX_CANDIDATES // cap)):
                pix, key = _bucket_keys(planes, rows, ids, faces.shape[0], cap, (height, width), cull_backfaces)
                best.scatter_reduce_(0, pix, key, reduce="amin")
    hit = best < _MISS
    pix_to_face = torch.where(hit, best & 0xFFFFFFFF, -1).view(batch, height, width)
    depth = (best >> 32).to(torch.int32).view(torch.float32).to(screen_verts.dtype)
    zbuf = torch.where(hit, depth, float("inf")).view(batch, height, width)
    return pix_to_face, zbuf


def _bucket_groups(counts: list[int]) -> list[tuple[int, int, int]]:
    """``(start, stop, cap)``: runs of consecutive buckets of the sorted order processed as one, at the largest
    capacity of the run. A run grows while the padding it adds (its smaller boxes' extra candidate slots, which are
    masked out) stays within ``_MERGE_SLACK`` candidates: sparse buckets cost no separate pass (fewer operations,
    fewer kernel launches on CUDA). Bucket 0 (culled) is skipped."""
    groups: list[tuple[int, int, int]] = []
    start = counts[0]
    run = None  # [start, members, candidates without padding, cap]
    for k in range(1, len(counts)):
        members, cap = counts[k], 1 << (k - 1)
        if members == 0:
            continue
        if run is not None and (run[1] + members) * cap - (run[2] + members * cap) <= _MERGE_SLACK:
            run[1], run[2], run[3] = run[1] + members, run[2] + members * cap, cap
        else:
            if run is not None:
                groups.append((run[0], run[0] + run[1], run[3]))
            run = [start, members, members * cap, cap]
        start += members
    if run is not None:
        groups.append((run[0], run[0] + run[1], run[3]))
    return groups


def _coverage(pix_to_face: torch.Tensor, faces: torch.Tensor, n_verts: int) -> Coverage:
    """List the covered pixels of ``pix_to_face (B, H, W)`` and their faces' corner rows (one host sync)."""
    batch, height, width = pix_to_face.shape
    flat = pix_to_face.view(-1)
    pixels = torch.nonzero(flat >= 0).view(-1)  # host synchronisation: the number of covered pixels
    face = flat.index_select(0, pixels)
    vertex = gather_rows(faces.t().contiguous(), face)  # (3, K) long
    return Coverage(pixels, vertex + (pixels // (height * width)) * n_verts, n_verts)


def _pixel_centres(pixels: torch.Tensor, hw: tuple[int, int], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Column and row ``(K,)`` of flat pixel ids, as ``dtype``."""
    height, width = hw
    in_image = pixels % (height * width)
    row = in_image // width
    return (in_image - row * width).to(dtype), row.to(dtype)


def _bary_slots(pixels: torch.Tensor) -> torch.Tensor:
    """``(3, K)`` positions of the three barycentrics of each listed pixel in a flat ``(B*H*W*3,)`` tensor."""
    return pixels * 3 + torch.arange(3, device=pixels.device).view(3, 1)


class _Barycentric(torch.autograd.Function):
    """Screen-space barycentrics ``(3, K)`` of the listed pixels' faces, with an analytic backward.

    ``b_k = e_k / S`` with ``e_k`` the edge function of the edge opposite corner k and ``S`` the signed area.
    Moving corner j changes them as ``d b_k / d P_j = -b_j * grad_p(b_k)``, and ``grad_p(b_k)`` is the constant
    ``(-(v_b - v_a), u_b - u_a) / S`` of edge k = a -> b: the backward is a few products and one scatter-add.
    """

    @staticmethod
    def forward(ctx, screen_verts: torch.Tensor, corner_rows: torch.Tensor, pixels: torch.Tensor,
                hw: tuple[int, int]) -> torch.Tensor:
        batch, n_verts, _ = screen_verts.shape
        planes = screen_verts[..., :2].permute(2, 0, 1).reshape(2, batch * n_verts)
        u, v = gather_rows(planes, corner_rows.view(-1)).view(2, 3, -1)  # each (3, K)
        x, y = _pixel_centres(pixels, hw, u.dtype)
        du = torch.stack([u[2] - u[1], u[0] - u[2], u[1] - u[0]])  # edge k runs corner k+1 -> k+2
        dv = torch.stack([v[2] - v[1], v[0] - v[2], v[1] - v[0]])
        edge = du * (y - v.roll(-1, dims=0)) - dv * (x - u.roll(-1, dims=0))
        area = _signed_area(u, v)
        area = torch.where(area != 0, area, torch.ones_like(area))  # listed faces are never degenerate
        bary = edge.div_(area)
        ctx.save_for_backward(corner_rows, du, dv, area, bary)
        ctx.vert_shape = screen_verts.shape
        return bary

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        corner_rows, du, dv, area, bary = ctx.saved_tensors
        grad_x = (grad * dv).sum(dim=0).div_(area)  # minus d loss / d pixel x
        grad_y = (grad * du).sum(dim=0).div_(area).neg_()
        n_rows = ctx.vert_shape[0] * ctx.vert_shape[1]
        grad_verts = bary.new_zeros(3, n_rows)
        rows = corner_rows.view(-1)
        grad_verts[0].scatter_add_(0, rows, (bary * grad_x).view(-1))  # 1-D: faster than index_add_, same sums
        grad_verts[1].scatter_add_(0, rows, (bary * grad_y).view(-1))
        return grad_verts.t().reshape(ctx.vert_shape), None, None, None


class _Interpolate(torch.autograd.Function):
    """``out[b, c] = sum_k weights[k] * attrs[b, vertex k, c]`` on the listed pixels, zero elsewhere."""

    @staticmethod
    def forward(ctx, attrs: torch.Tensor, corner_rows: torch.Tensor, pixels: torch.Tensor,
                weights: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        batch, n_verts, channels = attrs.shape
        height, width = hw
        planes = attrs.permute(2, 0, 1).reshape(channels, batch * n_verts)
        weights = weights.to(attrs.dtype)
        corners = gather_rows(planes, corner_rows.view(-1)).view(channels, 3, -1)  # (C, 3, K)
        values = (corners * weights).sum(dim=1)  # (C, K)
        image = pixels // (height * width)
        dest = (pixels + image * ((channels - 1) * height * width)).unsqueeze(0) \
            + torch.arange(channels, device=pixels.device).view(-1, 1) * (height * width)  # (C, K) in (B, C, H, W)
        out = attrs.new_zeros(batch, channels, height, width)
        out.view(-1).scatter_(0, dest.view(-1), values.view(-1))  # scatter_: 4x faster than index_copy_ on CPU
        ctx.save_for_backward(corner_rows, dest, weights, corners if ctx.needs_input_grad[3] else None)
        ctx.attrs_shape = attrs.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, torch.Tensor | None, None]:
        corner_rows, dest, weights, corners = ctx.saved_tensors
        batch, n_verts, channels = ctx.attrs_shape
        grad = _take(grad_out.reshape(-1), dest)  # (C, K)
        grad_attrs = grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_attrs = grad.new_zeros(channels, batch * n_verts)
            rows = corner_rows.view(-1)
            for c in range(channels):
                grad_attrs[c].scatter_add_(0, rows, (weights * grad[c]).view(-1))
            grad_attrs = grad_attrs.t().reshape(ctx.attrs_shape)
        if ctx.needs_input_grad[3]:
            grad_weights = (corners * grad.unsqueeze(1)).sum(dim=0)  # (3, K)
        return grad_attrs, None, None, grad_weights, None


def _visible_faces_nvdiffrast(
    screen_verts: torch.Tensor, faces: torch.Tensor, height: int, width: int, near: float, cull_backfaces: bool
) -> torch.Tensor:
    """``pix_to_face (B, H, W)`` from nvdiffrast (range mode, one unshared triangle per (batch, face))."""
    if screen_verts.device.type != "cuda":
        raise ValueError(f"rasterize: backend='nvdiffrast' needs CUDA tensors, got {screen_verts.device}; "
                         "use backend='torch'")
    try:
        import nvdiffrast.torch as dr
    except ImportError as err:
        raise RuntimeError("rasterize: backend='nvdiffrast' needs the optional nvdiffrast package "
                           "(https://github.com/NVlabs/nvdiffrast); use backend='torch'") from err
    batch, n_verts, _ = screen_verts.shape
    n_faces = faces.shape[0]
    if n_faces == 0 or batch == 0:
        return torch.full((batch, height, width), -1, dtype=torch.long, device=screen_verts.device)
    u, v, z = _vertex_planes(screen_verts.float(), near)
    rows = _corner_rows(faces, batch, n_verts).long()
    keep = _keep(_signed_area(_take(u, rows), _take(v, rows)), cull_backfaces)  # (B*F,)
    usable = torch.isfinite(u).view(batch, n_verts)
    z_lo = torch.where(usable, z.view(batch, n_verts), float("inf")).amin(dim=1, keepdim=True)
    z_hi = torch.where(usable, z.view(batch, n_verts), -float("inf")).amax(dim=1, keepdim=True)
    z_ndc = (z.view(batch, n_verts) - z_lo) / (z_hi - z_lo).clamp(min=1e-12) * 2 - 1
    clip = torch.stack([(2 * u + 1) / width - 1, (2 * v + 1) / height - 1, z_ndc.view(-1), torch.ones_like(u)], 1)
    clip = clip.index_select(0, rows.t().reshape(-1)).view(-1, 3, 4)  # (B*F, 3 corners, 4)
    outside = torch.tensor([2.0, 2.0, 0.0, 1.0], device=clip.device)  # culled: beyond the right clip plane
    clip = torch.where(keep.view(-1, 1, 1), clip, outside).view(-1, 4).contiguous()
    tri_idx = torch.arange(clip.shape[0], device=clip.device, dtype=torch.int32).view(-1, 3)
    starts = torch.arange(batch, dtype=torch.int32) * n_faces
    ranges = torch.stack([starts, torch.full_like(starts, n_faces)], dim=1)  # (B, 2) on the host, as required
    rast, _ = dr.rasterize(_nvdiffrast_context(screen_verts.device), clip, tri_idx, (height, width), ranges=ranges)
    tri_id = rast[..., 3].round().long() - 1  # 0 = empty in nvdiffrast
    return torch.where(tri_id >= 0, tri_id % n_faces, -1)


@functools.lru_cache(maxsize=4)
def _nvdiffrast_context(device: torch.device) -> object:
    """One nvdiffrast CUDA rasterization context per device, created on first use."""
    import nvdiffrast.torch as dr

    return dr.RasterizeCudaContext(device=device)
