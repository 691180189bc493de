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
2. Barycentrics, with autograd: the winning triangle of every pixel is gathered and its screen-space
   barycentrics are recomputed from ``screen_verts``, so gradients reach the vertex positions.

Host synchronisation: exactly one per call (``bincount(...).tolist()`` of the bucket sizes); buckets are
then selected with ``torch.nonzero_static``, which needs no further synchronisation. A bucket whose
candidate tensor would exceed ``_MAX_CANDIDATES`` elements is processed in chunks (sizes known on the host).
Edge functions are evaluated from the lower-indexed vertex of each edge, so a pixel on an edge shared by
two triangles is classified consistently (exactly one of them, or both when it lies exactly on the edge):
no cracks between adjacent triangles.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

_NO_HIT = torch.iinfo(torch.int64).max
_MAX_CANDIDATES = 1 << 23
_BACKENDS = ("torch", "nvdiffrast")


@dataclass(frozen=True)
class Fragments:
    """Per-pixel rasterization result.

    pix_to_face: ``(B, H, W)`` long, ``pix_to_face[b, i, j] = f`` means face ``faces[f]`` is visible at
        pixel (row i, col j) of batch element b; -1 on background.
    bary: ``(B, H, W, 3)`` screen-space (affine) barycentrics of the visible face w.r.t. its vertices
        ``faces[f, 0..2]``; zero on background; differentiable w.r.t. ``screen_verts``.
    zbuf: ``(B, H, W)`` interpolated camera depth of the visible face (float32 precision); inf on background.
    mask: ``(B, 1, H, W)`` float, 1 where a face is visible, detached.
    """

    pix_to_face: torch.Tensor
    bary: torch.Tensor
    zbuf: torch.Tensor
    mask: torch.Tensor

    def detach(self) -> "Fragments":
        """Return a copy whose tensors carry no autograd history."""
        return Fragments(self.pix_to_face, self.bary.detach(), self.zbuf.detach(), self.mask.detach())


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
        back faces (positive signed area) when ``cull_backfaces`` is True.
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
    corner_idx = _pixel_corner_index(faces, pix_to_face, screen_verts.shape[1])
    bary = _barycentrics(screen_verts, corner_idx, pix_to_face)
    if zbuf is None:
        with torch.no_grad():
            depth = _interpolate_planes(screen_verts[..., 2:], corner_idx, bary).view(pix_to_face.shape)
            zbuf = torch.where(pix_to_face >= 0, depth, float("inf"))
    mask = (pix_to_face >= 0).unsqueeze(1).to(screen_verts.dtype)
    return Fragments(pix_to_face=pix_to_face, bary=bary, zbuf=zbuf, mask=mask)


def interpolate(attrs: torch.Tensor, fragments: Fragments, faces: torch.Tensor) -> torch.Tensor:
    """Interpolate per-vertex attributes with the fragments' barycentrics.

    attrs: ``(B, N, C)`` float per-vertex values (any range). faces: the ``(F, 3)`` list given to ``rasterize``.
    Returns ``(B, C, H, W)``, zero on background. Gradients flow to ``attrs`` and, through
    ``fragments.bary``, to the screen vertices.
    """
    if attrs.ndim != 3:
        raise ValueError(f"interpolate: attrs must be (B, N, C), got shape {tuple(attrs.shape)}")
    batch, height, width = fragments.pix_to_face.shape
    if attrs.shape[0] != batch:
        raise ValueError(f"interpolate: attrs batch {attrs.shape[0]} != fragments batch {batch}")
    corner_idx = _pixel_corner_index(faces, fragments.pix_to_face, attrs.shape[1])
    out = _interpolate_planes(attrs, corner_idx, fragments.bary)  # (B*H*W, C)
    return out.view(batch, height, width, -1).permute(0, 3, 1, 2)


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


def _gather_planes(planes: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``planes[:, idx]`` for ``(C, R)`` planes and a 1-D index, as ``(C, len(idx))`` (1-D gathers are fastest)."""
    out = planes.new_empty(planes.shape[0], idx.shape[0])
    for c in range(planes.shape[0]):
        torch.index_select(planes[c], 0, idx, out=out[c])
    return out


def _corner_planes(screen_verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """``(3 coords, 3 corners, B*F)``: coordinate c of corner k of face f in batch element b at ``b * F + f``."""
    batch, n_verts, _ = screen_verts.shape
    offset = torch.arange(batch, device=faces.device).mul_(n_verts).view(1, batch, 1)
    idx = (faces.t().unsqueeze(1) + offset).reshape(-1)  # (3 * B * F,) corner-major
    planes = screen_verts.permute(2, 0, 1).reshape(3, batch * n_verts)
    return _gather_planes(planes, idx).view(3, 3, batch * faces.shape[0])


def _bucket_index(
    tri: torch.Tensor, height: int, width: int, near: float, cull_backfaces: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket id ``(T,)`` (0 = culled or no pixel) and int32 boxes ``(4, T)`` = (column, row, width, pixels).

    ``tri``: ``(3, 3, T)`` corner planes. A box holds the integer sample points of the triangle's bounding box,
    clipped to the image. Bucket k >= 1 holds boxes of ``2**(k-2) < pixels <= 2**(k-1)`` pixels.
    Non-finite corners are culled: they make the area non-finite or fail the depth test.
    """
    u, v, z = tri.unbind(0)  # each (3, T)
    area = _signed_area(u, v)
    keep = (z.amin(dim=0) > near) & torch.isfinite(z.sum(dim=0)) & torch.isfinite(area)
    keep &= area < 0 if cull_backfaces else area != 0
    box = []
    for coord, size in ((u, width), (v, height)):
        lo = coord.amin(dim=0).ceil_().clamp_(0, size).to(torch.int32)
        hi = coord.amax(dim=0).floor_().clamp_(-1, size - 1).to(torch.int32)
        box += [lo, (hi - lo + 1).clamp_(min=0)]
    n_pix = box[1] * box[3] * keep
    exponent = ((n_pix - 1).to(torch.float32).view(torch.int32) >> 23) - 125  # ceil(log2(n)) + 1 for n >= 2
    bucket = torch.where(n_pix > 1, exponent, n_pix)
    return bucket, torch.stack([box[0], box[2], box[1], n_pix])


def _edge_setup(corners: torch.Tensor, vid: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Per edge e (opposite corner e): ``(origin_u, origin_v, dir_u, dir_v)``, each ``(M, 1)``.

    ``corners``: ``(3, 3, M)`` planes; ``vid``: ``(3, M)`` vertex ids. The edge function
    ``dir_u * (y - origin_v) - dir_v * (x - origin_u)`` is >= 0 inside the triangle for either winding
    (direction = corner b - corner a, negated for front faces). The origin is the lower-indexed vertex of the
    edge, so two triangles sharing an edge get exactly opposite values at every pixel: no cracks.
    """
    u, v = corners[0], corners[1]
    sign = torch.where(_signed_area(u, v) < 0, -1.0, 1.0).to(u.dtype)
    edges = []
    for e in range(3):
        a, b = (e + 1) % 3, (e + 2) % 3  # the edge runs a -> b
        swap = vid[a] > vid[b]
        du, dv = (u[b] - u[a]) * sign, (v[b] - v[a]) * sign
        edges.append((torch.where(swap, u[b], u[a]).unsqueeze(1), torch.where(swap, v[b], v[a]).unsqueeze(1),
                      du.unsqueeze(1), dv.unsqueeze(1)))
    return edges


def _bucket_keys(
    tri: torch.Tensor, faces: torch.Tensor, ids: torch.Tensor, boxes: torch.Tensor, cap: int,
    hw: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate pixel ids and packed depth/face keys, both ``(M*cap,)``, of the triangles ``ids (M,)``.

    ``boxes``: ``(4, M)`` int32 rows of ``_bucket_index``. Candidates beyond a box or outside the triangle
    get the key ``_NO_HIT`` (their pixel id is then any valid id).
    """
    height, width = hw
    n_faces = faces.shape[0]
    image = ids // n_faces
    face_id = ids - image * n_faces
    corners = _gather_planes(tri.view(9, -1), ids).view(3, 3, -1)  # (3, 3, M)
    edges = _edge_setup(corners, _gather_planes(faces.t(), face_id))
    x0, y0, box_w, n_pix = boxes.unsqueeze(-1).unbind(0)  # each (M, 1)
    slot = torch.arange(cap, device=tri.device, dtype=torch.int32)
    if cap > 1:
        dy = slot // box_w
        x0, y0 = x0 + (slot - dy * box_w), y0 + dy  # (M, cap)
    px, py = x0.to(tri.dtype), y0.to(tri.dtype)
    inside = slot < n_pix
    value = []
    for ox, oy, du, dv in edges:
        value.append(du * (py - oy) - dv * (px - ox))
        inside &= value[-1] >= 0
    z_scaled = corners[2] / _signed_area(corners[0], corners[1]).abs()  # (3, M)
    depth = value[0] * z_scaled[0, :, None] + value[1] * z_scaled[1, :, None] + value[2] * z_scaled[2, :, None]
    bits = depth.abs().to(torch.float32).view(torch.int32).to(torch.int64)
    key = torch.where(inside, (bits << 32) | face_id.unsqueeze(1), _NO_HIT)
    pix = image.unsqueeze(1) * (height * width) + (y0 * width + x0)
    if cap > 1:  # slots beyond a box may point past the last pixel
        pix = pix.clamp_(max=tri.shape[2] // n_faces * height * width - 1)
    return pix.view(-1), key.view(-1)


def _visible_faces(
    screen_verts: torch.Tensor, faces: torch.Tensor, height: int, width: int, near: float, cull_backfaces: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Z-buffer pass: ``pix_to_face (B, H, W)`` long (-1 background) and ``zbuf (B, H, W)`` (inf background)."""
    batch = screen_verts.shape[0]
    best = torch.full((batch * height * width,), _NO_HIT, dtype=torch.int64, device=screen_verts.device)
    if faces.shape[0] > 0 and batch > 0:
        tri = _corner_planes(screen_verts, faces)
        bucket, boxes = _bucket_index(tri, height, width, near, cull_backfaces)
        n_buckets = (height * width - 1).bit_length() + 2
        counts = torch.bincount(bucket, minlength=n_buckets).tolist()  # the one host synchronisation
        for k in range(1, n_buckets):
            if counts[k] == 0:
                continue
            cap = 1 << (k - 1)
            members = torch.nonzero_static(bucket == k, size=counts[k]).view(-1)
            for ids in members.split(max(1, _MAX_CANDIDATES // cap)):
                pix, key = _bucket_keys(tri, faces, ids, boxes.index_select(1, ids), cap, (height, width))
                best.scatter_reduce_(0, pix, key, reduce="amin")
    hit = best != _NO_HIT
    pix_to_face = torch.where(hit, best & 0xFFFFFFFF, -1).view(batch, height, width)
    depth = (best >> 32).to(torch.int32).view(torch.float32).to(screen_verts.dtype)
    zbuf = torch.where(hit, depth, float("inf")).view(batch, height, width)
    return pix_to_face, zbuf


def _pixel_corner_index(faces: torch.Tensor, pix_to_face: torch.Tensor, n_verts: int) -> torch.Tensor:
    """``(3, B*H*W)`` flat rows ``b * N + vertex`` of each pixel's face corners; face 0 (or row 0) on background."""
    batch = pix_to_face.shape[0]
    if faces.shape[0] == 0:
        return torch.zeros(3, pix_to_face.numel(), dtype=torch.long, device=faces.device)
    vid = _gather_planes(faces.t(), pix_to_face.clamp(min=0).view(-1)).view(3, batch, -1)
    offset = torch.arange(batch, device=faces.device).mul_(n_verts).view(1, batch, 1)
    return (vid + offset).view(3, -1)


def _barycentrics(screen_verts: torch.Tensor, corner_idx: torch.Tensor, pix_to_face: torch.Tensor) -> torch.Tensor:
    """Differentiable screen-space barycentrics ``(B, H, W, 3)`` of each pixel's face, zero on background."""
    if screen_verts.shape[1] == 0:
        return screen_verts.new_zeros(*pix_to_face.shape, 3)
    return _Barycentric.apply(screen_verts, corner_idx, pix_to_face >= 0)


class _Barycentric(torch.autograd.Function):
    """Screen-space barycentrics with an analytic backward.

    ``b_k = e_k / S`` with ``e_k`` the edge function of the edge opposite corner k and ``S`` the signed area.
    Moving corner j changes them as ``d b_k / d P_j = -b_j * grad_p(b_k)``, and ``grad_p(b_k)`` is the constant
    ``(-(v_b - v_a), u_b - u_a) / S`` of edge k = a -> b: the backward is a few products and one scatter-add.
    """

    @staticmethod
    def forward(ctx, screen_verts: torch.Tensor, corner_idx: torch.Tensor, hit: torch.Tensor) -> torch.Tensor:
        batch, height, width = hit.shape
        planes = screen_verts[..., :2].permute(2, 0, 1).reshape(2, -1)  # (2, B*N)
        uv = _gather_planes(planes, corner_idx.view(-1)).view(2, 3, batch, height, width)
        u, v = uv[0], uv[1]
        cols = torch.arange(width, device=u.device, dtype=u.dtype)
        rows = torch.arange(height, device=u.device, dtype=u.dtype).view(height, 1)
        du = torch.stack([u[2] - u[1], u[0] - u[2], u[1] - u[0]])  # edge k runs corner k+1 -> k+2
        dv = torch.stack([v[2] - v[1], v[0] - v[2], v[1] - v[0]])
        start_u, start_v = u.roll(-1, dims=0), v.roll(-1, dims=0)
        edge = du * (rows - start_v) - dv * (cols - start_u)  # (3, B, H, W)
        area = _signed_area(u, v)
        area = torch.where(hit & (area != 0), area, torch.ones_like(area))
        bary = torch.where(hit, edge / area, torch.zeros_like(edge))
        ctx.save_for_backward(corner_idx, hit, du, dv, area, bary)
        ctx.vert_shape = screen_verts.shape
        return bary.permute(1, 2, 3, 0).contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_bary: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        corner_idx, hit, du, dv, area, bary = ctx.saved_tensors
        grad = grad_bary.permute(3, 0, 1, 2)  # (3, B, H, W)
        scale = torch.where(hit, area.reciprocal(), torch.zeros_like(area))
        grad_x = (grad * dv).sum(dim=0) * scale  # minus d loss / d pixel x
        grad_y = (grad * du).sum(dim=0) * scale
        flat = corner_idx.view(-1)
        n_rows = ctx.vert_shape[0] * ctx.vert_shape[1]
        grad_u = bary.new_zeros(n_rows).index_add_(0, flat, (bary * grad_x).view(-1))
        grad_v = bary.new_zeros(n_rows).index_add_(0, flat, (bary * -grad_y).view(-1))
        grad_verts = torch.stack([grad_u, grad_v, torch.zeros_like(grad_u)], dim=-1)
        return grad_verts.view(ctx.vert_shape), None, None


def _interpolate_planes(attrs: torch.Tensor, corner_idx: torch.Tensor, bary: torch.Tensor) -> torch.Tensor:
    """``(B*H*W, C)`` barycentric blend of ``attrs (B, N, C)`` at ``corner_idx (3, B*H*W)``."""
    channels = attrs.shape[2]
    if attrs.shape[1] == 0:
        return attrs.new_zeros(corner_idx.shape[1], channels)
    corner = attrs.reshape(-1, channels).index_select(0, corner_idx.view(-1)).view(3, -1, channels)
    weight = bary.to(attrs.dtype).view(-1, 3, 1)
    return corner[0] * weight[:, 0] + corner[1] * weight[:, 1] + corner[2] * weight[:, 2]


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
    batch, n_faces = screen_verts.shape[0], faces.shape[0]
    if n_faces == 0 or batch == 0:
        return torch.full((batch, height, width), -1, dtype=torch.long, device=screen_verts.device)
    tri = _corner_planes(screen_verts.float(), faces).view(3, 3, batch, n_faces).permute(2, 3, 1, 0)  # (B,F,3,3)
    area = _signed_area(tri[..., 0].unbind(-1), tri[..., 1].unbind(-1))
    keep = (tri[..., 2] > near).all(dim=-1) & (area < 0 if cull_backfaces else area != 0) & torch.isfinite(area)
    z = screen_verts[..., 2].float()
    z_lo, z_hi = z.amin(dim=1).view(batch, 1, 1), z.amax(dim=1).view(batch, 1, 1)
    clip = torch.stack([(2 * tri[..., 0] + 1) / width - 1, (2 * tri[..., 1] + 1) / height - 1,
                        (tri[..., 2] - z_lo) / (z_hi - z_lo).clamp(min=1e-12) * 2 - 1,
                        torch.ones_like(area).unsqueeze(-1).expand(-1, -1, 3)], dim=-1)
    outside = torch.tensor([2.0, 2.0, 0.0, 1.0], device=clip.device)  # culled: beyond the right clip plane
    clip = torch.where(keep.view(batch, n_faces, 1, 1), clip, outside).view(-1, 4).contiguous()
    tri_idx = torch.arange(batch * n_faces * 3, device=clip.device, dtype=torch.int32).view(-1, 3)
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
