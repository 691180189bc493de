"""Tests of models/rasterizer.py against a slow brute-force reference written here (CPU, small scenes)."""

import importlib.util

import numpy as np
import pytest
import torch

import models.rasterizer as rasterizer_module
from models.rasterizer import Fragments, interpolate, rasterize

requires_cuda = pytest.mark.cuda  # skipped without a CUDA device (tests/conftest.py)
requires_nvdiffrast = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("nvdiffrast") is None,
    reason="needs CUDA and the optional nvdiffrast package")


# ---------------------------------------------------------------------------------------------- assert helpers

def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0, name: str = "") -> None:
    """Assert |actual - expected| <= atol + rtol * |expected| elementwise; report the worst element and where."""
    __tracebackhide__ = True
    actual = torch.as_tensor(actual).detach().double().cpu()
    expected = torch.as_tensor(expected).detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    both_inf = torch.isinf(actual) & torch.isinf(expected) & (torch.sign(actual) == torch.sign(expected))
    diff = torch.where(both_inf, 0.0, (actual - expected).abs()).nan_to_num(nan=float("inf"))
    excess = diff - (atol + rtol * expected.abs().nan_to_num(posinf=0.0))
    if excess.numel() and excess.max() > 0:
        loc = np.unravel_index(int(excess.argmax()), tuple(excess.shape))
        raise AssertionError(f"{name}: max |diff| {diff.max().item():.3g} (tolerance atol={atol}, rtol={rtol}); "
                             f"worst at {tuple(int(i) for i in loc)}: actual {actual[loc].item():.9g}, "
                             f"expected {expected[loc].item():.9g}; {(excess > 0).sum().item()} elements off")


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """Assert integer tensors are identical; report how many elements differ and the first one."""
    __tracebackhide__ = True
    actual, expected = torch.as_tensor(actual).cpu(), torch.as_tensor(expected).cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    wrong = (actual != expected).nonzero()
    if len(wrong):
        loc = tuple(wrong[0].tolist())
        raise AssertionError(f"{name}: {len(wrong)} of {actual.numel()} elements differ; first at {loc}: "
                             f"actual {actual[loc].item()}, expected {expected[loc].item()}")


# ------------------------------------------------------------------------------------------ brute-force reference

def _cross(ax: float, ay: float, bx: float, by: float) -> float:
    return ax * by - ay * bx


def reference_pixel(tri: np.ndarray, col: int, row: int, near: float, cull: bool) -> tuple[float, np.ndarray] | None:
    """Depth and barycentrics of pixel (row, col) in one triangle ``(3, 3)`` = (u, v, z) rows, or None if not drawn."""
    if not np.all(tri[:, 2] > near):
        return None
    (u0, v0, _), (u1, v1, _), (u2, v2, _) = tri
    area = _cross(u1 - u0, v1 - v0, u2 - u0, v2 - v0)
    if area == 0 or (cull and area > 0) or not np.isfinite(area):
        return None
    edges = []
    for k in range(3):
        ua, va = tri[(k + 1) % 3, :2]
        ub, vb = tri[(k + 2) % 3, :2]
        edges.append(_cross(ub - ua, vb - va, col - ua, row - va))
    bary = np.array(edges) / area
    if np.any(bary < 0):
        return None
    return float(bary @ tri[:, 2]), bary


def reference_rasterize(screen_verts: torch.Tensor, faces: torch.Tensor, height: int, width: int,
                        near: float = 1e-3, cull: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Loop over batch, pixels and triangles in float64: pix_to_face, zbuf, bary (nearest wins, ties -> lower id)."""
    verts, tris = screen_verts.detach().double().numpy(), faces.numpy()
    batch = verts.shape[0]
    pix_to_face = np.full((batch, height, width), -1)
    zbuf = np.full((batch, height, width), np.inf)
    bary = np.zeros((batch, height, width, 3))
    for b in range(batch):
        for row in range(height):
            for col in range(width):
                for f, tri in enumerate(tris):
                    hit = reference_pixel(verts[b, tri], col, row, near, cull)
                    if hit is not None and hit[0] < zbuf[b, row, col]:
                        zbuf[b, row, col], bary[b, row, col] = hit
                        pix_to_face[b, row, col] = f
    return pix_to_face, zbuf, bary


def reference_image(screen_verts: torch.Tensor, attrs: torch.Tensor, faces: torch.Tensor,
                    pix_to_face: np.ndarray) -> torch.Tensor:
    """Per-pixel autograd interpolation ``(B, C, H, W)`` with barycentrics recomputed from the same formula."""
    batch, height, width = pix_to_face.shape
    rows = []
    for b in range(batch):
        for row in range(height):
            for col in range(width):
                f = int(pix_to_face[b, row, col])
                if f < 0:
                    rows.append(attrs.new_zeros(attrs.shape[-1]))
                    continue
                p = screen_verts[b, faces[f]]
                area = (p[1, 0] - p[0, 0]) * (p[2, 1] - p[0, 1]) - (p[1, 1] - p[0, 1]) * (p[2, 0] - p[0, 0])
                weights = []
                for k in range(3):
                    a, c = p[(k + 1) % 3], p[(k + 2) % 3]
                    weights.append(((c[0] - a[0]) * (row - a[1]) - (c[1] - a[1]) * (col - a[0])) / area)
                rows.append(sum(w * attrs[b, faces[f, k]] for k, w in enumerate(weights)))
    return torch.stack(rows).view(batch, height, width, -1).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------------------ scenes

def random_scene(seed: int, batch: int = 3, n_verts: int = 24, n_faces: int = 14, height: int = 11,
                 width: int = 15) -> tuple[torch.Tensor, torch.Tensor]:
    """Random triangle soup with shared vertices: some big, some sub-pixel, some behind the camera."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(batch, n_verts, 2, generator=g) * torch.tensor([width + 4.0, height + 4.0]) - 2
    spread = torch.rand(batch, n_verts, 1, generator=g) * 6
    uv = centre + torch.randn(batch, n_verts, 2, generator=g) * spread
    z = torch.rand(batch, n_verts, 1, generator=g) * 4 + 0.5
    z[:, :2] = -1.0  # vertices 0 and 1 are behind the camera
    faces = torch.stack([torch.randperm(n_verts, generator=g)[:3] for _ in range(n_faces)])
    return torch.cat([uv, z], dim=-1), faces


def one_triangle(corners: list[tuple[float, float, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([corners], dtype=torch.float32), torch.tensor([[0, 1, 2]])


# Front-facing (signed area -24 < 0) right triangle: legs 4 px along u (columns) and 6 px along v (rows).
ASYMMETRIC = [(1.0, 1.0, 2.0), (1.0, 7.0, 2.0), (5.0, 1.0, 2.0)]
ASYMMETRIC_GRID = """
..........
.#####....
.####.....
.###......
.###......
.##.......
.#........
.#........
..........
..........
"""


def grid_mask(text: str) -> torch.Tensor:
    return torch.tensor([[c == "#" for c in line] for line in text.strip().splitlines()])


# ------------------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("cull", [True, False])
def test_matches_reference_on_random_scenes(seed: int, cull: bool) -> None:
    verts, faces = random_scene(seed)
    frags = rasterize(verts, faces, (11, 15), cull_backfaces=cull)
    ref_face, ref_z, ref_bary = reference_rasterize(verts, faces, 11, 15, cull=cull)
    assert (ref_face >= 0).sum() > 20, "scene too empty to test anything"
    assert_equal(frags.pix_to_face, torch.from_numpy(ref_face), "pix_to_face")
    assert_equal(frags.mask[:, 0].bool(), torch.from_numpy(ref_face >= 0), "mask")
    assert_close(frags.zbuf, torch.from_numpy(ref_z), atol=1e-5, rtol=1e-5, name="zbuf")
    assert_close(frags.bary, torch.from_numpy(ref_bary), atol=2e-4, name="bary")


def test_exact_edges_and_vertices_on_pixel_centres() -> None:
    """Vertices on a quarter-pixel lattice put many pixel centres exactly on edges (inclusive rule, exact math)."""
    g = torch.Generator().manual_seed(7)
    n_faces = 30
    uv = torch.randint(-8, 4 * 13, (2, n_faces * 3, 2), generator=g).float() / 4
    depth = torch.randperm(n_faces, generator=g).float().add(1).repeat_interleave(3).expand(2, -1)
    verts = torch.cat([uv, depth.unsqueeze(-1)], dim=-1)
    faces = torch.arange(n_faces * 3).view(n_faces, 3)
    frags = rasterize(verts, faces, (12, 13), cull_backfaces=False)
    ref_face, ref_z, _ = reference_rasterize(verts, faces, 12, 13, cull=False)
    assert_equal(frags.pix_to_face, torch.from_numpy(ref_face), "pix_to_face")
    assert_close(frags.zbuf, torch.from_numpy(ref_z), atol=0, rtol=1e-6, name="zbuf")


def test_asymmetric_triangle_coverage_grid() -> None:
    verts, faces = one_triangle(ASYMMETRIC)
    frags = rasterize(verts, faces, (10, 10))
    assert_equal(frags.mask[0, 0].bool(), grid_mask(ASYMMETRIC_GRID), "coverage")
    assert_equal(frags.pix_to_face[0], torch.where(grid_mask(ASYMMETRIC_GRID), 0, -1), "pix_to_face")
    for (u, v, _), expected in zip(ASYMMETRIC, torch.eye(3)):
        assert_close(frags.bary[0, int(v), int(u)], expected, atol=1e-6, name=f"bary at vertex ({u}, {v})")
    assert_close(frags.zbuf[0][grid_mask(ASYMMETRIC_GRID)], torch.full((19,), 2.0), atol=1e-6, name="zbuf")


def test_non_square_image_keeps_rows_and_columns() -> None:
    verts, faces = one_triangle([(u + 3, v, z) for u, v, z in ASYMMETRIC])
    frags = rasterize(verts, faces, (9, 14))
    expected = torch.zeros(9, 14, dtype=torch.bool)
    expected[:, 3:13] = grid_mask(ASYMMETRIC_GRID)[:9]
    assert_equal(frags.mask[0, 0].bool(), expected, "coverage")


def test_back_faces_are_culled_unless_disabled() -> None:
    verts, _ = one_triangle(ASYMMETRIC)
    reversed_faces = torch.tensor([[0, 2, 1]])
    assert (rasterize(verts, reversed_faces, (10, 10)).pix_to_face == -1).all()
    frags = rasterize(verts, reversed_faces, (10, 10), cull_backfaces=False)
    assert_equal(frags.mask[0, 0].bool(), grid_mask(ASYMMETRIC_GRID), "coverage without culling")
    assert_close(frags.bary[0, 7, 1], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6, name="bary of reversed face")


def test_ccw_model_triangle_is_front_facing_after_y_flip() -> None:
    """A triangle counter-clockwise in a y-up frame seen from +z has negative signed area in (u, v)."""
    model = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])  # CCW with y up
    uv = torch.stack([model[:, 0] + 2, 8 - model[:, 1]], dim=-1)  # camera y flip: v = -y
    verts = torch.cat([uv, torch.full((3, 1), 3.0)], dim=-1).unsqueeze(0)
    assert rasterize(verts, torch.tensor([[0, 1, 2]]), (10, 10)).mask.sum() == 15


@pytest.mark.parametrize("depths", [(2.0, 2.0, 0.0), (2.0, 2.0, -1.0), (0.5, 0.5, 0.5)])
def test_triangles_at_or_behind_near_are_culled(depths: tuple[float, float, float]) -> None:
    corners = [(u, v, z) for (u, v, _), z in zip(ASYMMETRIC, depths)]
    verts, faces = one_triangle(corners)
    assert (rasterize(verts, faces, (10, 10), near=0.5).pix_to_face == -1).all()
    if min(depths) > 1e-3:
        assert rasterize(verts, faces, (10, 10)).mask.sum() == 19


def _assert_empty(frags: Fragments, shape: tuple[int, int, int]) -> None:
    assert frags.pix_to_face.shape == shape and (frags.pix_to_face == -1).all()
    assert frags.bary.shape == (*shape, 3) and (frags.bary == 0).all()
    assert torch.isinf(frags.zbuf).all() and (frags.mask == 0).all()


def test_empty_scenes() -> None:
    verts = torch.rand(2, 5, 3).requires_grad_(True)
    _assert_empty(rasterize(verts, torch.zeros(0, 3, dtype=torch.long), (4, 6)), (2, 4, 6))
    behind = verts.detach().clone()
    behind[..., 2] = -1
    behind.requires_grad_(True)
    faces = torch.tensor([[0, 1, 2], [2, 3, 4]])
    frags = rasterize(behind, faces, (4, 6))
    _assert_empty(frags, (2, 4, 6))
    attrs = torch.rand(2, 5, 3, requires_grad=True)
    image = interpolate(attrs, frags, faces)
    assert image.shape == (2, 3, 4, 6) and (image == 0).all()
    image.sum().backward()
    assert (behind.grad == 0).all() and (attrs.grad == 0).all()


def test_degenerate_and_non_finite_triangles_give_no_nan() -> None:
    verts = torch.tensor([[[1.0, 1.0, 2.0], [6.0, 6.0, 2.0], [3.5, 3.5, 2.0],  # collinear
                           [2.0, 2.0, 2.0],  # repeated below
                           [float("nan"), 1.0, 2.0], [float("inf"), 1.0, 2.0], [3.0, float("-inf"), 2.0],
                           [1.0, 1.0, float("nan")], [1.0, 1.0, float("inf")],
                           [0.5, 0.5, 3.0], [0.5, 6.5, 3.0], [6.5, 0.5, 3.0]]], requires_grad=True)
    faces = torch.tensor([[0, 1, 2], [3, 3, 1], [4, 1, 2], [5, 1, 6], [0, 5, 1], [7, 1, 10], [8, 10, 1],
                          [9, 10, 11]])
    frags = rasterize(verts, faces, (8, 8), cull_backfaces=False)
    assert set(frags.pix_to_face.unique().tolist()) == {-1, 7}
    attrs = torch.rand(1, verts.shape[1], 2, requires_grad=True)
    image = interpolate(attrs, frags, faces)
    image.square().sum().backward()
    for name, t in [("bary", frags.bary), ("image", image), ("grad verts", verts.grad), ("grad attrs", attrs.grad)]:
        assert not torch.isnan(t).any(), f"NaN in {name}"


@pytest.mark.parametrize("near_depth, far_depth, winner", [(1.0, 2.0, 1), (2.0, 1.0, 0), (1.5, 1.5, 0)])
def test_depth_order_nearer_wins_ties_go_to_lower_index(near_depth: float, far_depth: float, winner: int) -> None:
    square = [(1.5, 1.5), (1.5, 5.5), (5.5, 1.5)]
    shifted = [(u + 1, v + 1) for u, v in square]
    verts = torch.tensor([[(u, v, far_depth) for u, v in square] + [(u, v, near_depth) for u, v in shifted]])
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    frags = rasterize(verts, faces, (8, 8))
    assert frags.pix_to_face[0, 3, 3] == winner  # inside both
    assert frags.pix_to_face[0, 2, 2] == 0 and frags.pix_to_face[0, 6, 3] == 1  # inside one only


def test_adjacent_triangles_leave_no_cracks() -> None:
    """A grid mesh whose edges pass exactly through pixel centres covers every pixel of its square."""
    n = 5
    coords = torch.arange(n, dtype=torch.float32) * 2 + 1  # 1, 3, ..., 9
    v, u = torch.meshgrid(coords, coords, indexing="ij")
    verts = torch.stack([u, v, 2 + 0.1 * u], dim=-1).view(1, -1, 3)
    idx = torch.arange(n * n).view(n, n)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    faces = torch.cat([torch.stack([a, c, d], -1).view(-1, 3), torch.stack([a, d, b], -1).view(-1, 3)])
    frags = rasterize(verts, faces, (11, 11))
    expected = torch.zeros(11, 11, dtype=torch.bool)
    expected[1:10, 1:10] = True
    assert_equal(frags.mask[0, 0].bool(), expected, "coverage")
    ref_face, _, _ = reference_rasterize(verts, faces, 11, 11)
    assert_equal(frags.mask[0, 0].bool(), torch.from_numpy(ref_face[0] >= 0), "coverage vs reference")


def test_large_triangles_and_chunked_buckets(monkeypatch: pytest.MonkeyPatch) -> None:
    verts, faces = random_scene(11, n_faces=10, height=20, width=24)
    verts[0, 2:5] = torch.tensor([[-50.0, -50.0, 9.0], [-50.0, 200.0, 9.0], [200.0, -50.0, 9.0]])
    faces[0] = torch.tensor([2, 3, 4])  # covers the whole first image, behind everything else
    expected = rasterize(verts, faces, (20, 24), cull_backfaces=False)
    assert (expected.pix_to_face[0] >= 0).all()
    monkeypatch.setattr(rasterizer_module, "_MAX_CANDIDATES", 7)
    chunked = rasterize(verts, faces, (20, 24), cull_backfaces=False)
    assert_equal(chunked.pix_to_face, expected.pix_to_face, "pix_to_face with chunked buckets")
    ref_face, _, _ = reference_rasterize(verts, faces, 20, 24, cull=False)
    assert_equal(expected.pix_to_face, torch.from_numpy(ref_face), "pix_to_face vs reference")


def test_merged_sparse_buckets_give_the_same_fragments(monkeypatch: pytest.MonkeyPatch) -> None:
    """Processing neighbouring buckets together (at the larger capacity) must not change any pixel."""
    verts, faces = random_scene(12, batch=2, n_verts=60, n_faces=120, height=24, width=30)
    expected = rasterize(verts, faces, (24, 30), cull_backfaces=False)
    assert len(rasterizer_module._bucket_groups([0, 5, 0, 3, 2, 1])) < 4, "sparse buckets are merged"
    monkeypatch.setattr(rasterizer_module, "_MERGE_SLACK", 0)
    separate = rasterize(verts, faces, (24, 30), cull_backfaces=False)
    monkeypatch.setattr(rasterizer_module, "_MERGE_SLACK", 10 ** 9)  # one pass at the largest capacity
    merged = rasterize(verts, faces, (24, 30), cull_backfaces=False)
    for frags in (separate, merged):
        assert_equal(frags.pix_to_face, expected.pix_to_face, "pix_to_face")
        assert_equal(frags.zbuf, expected.zbuf, "zbuf")
    assert len(rasterizer_module._bucket_groups([0, 5, 0, 3, 2, 1])) == 1


@pytest.mark.parametrize("seed", [0, 1])
def test_gradients_match_reference(seed: int) -> None:
    verts, faces = random_scene(seed, batch=2, height=9, width=10)
    verts = verts.double().requires_grad_(True)
    attrs = torch.rand(2, verts.shape[1], 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    attrs.requires_grad_(True)
    upstream = torch.randn(2, 3, 9, 10, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    frags = rasterize(verts, faces, (9, 10))
    image = interpolate(attrs, frags, faces)
    grads = torch.autograd.grad((image * upstream).sum(), [verts, attrs])
    ref_face, _, _ = reference_rasterize(verts, faces, 9, 10)
    ref = reference_image(verts, attrs, faces, ref_face)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), [verts, attrs])
    assert_close(image, ref, atol=1e-9, name="image")
    assert_close(grads[0], ref_grads[0], atol=1e-9, rtol=1e-9, name="d loss / d screen_verts")
    assert_close(grads[1], ref_grads[1], atol=1e-9, rtol=1e-9, name="d loss / d attrs")
    assert grads[0][..., 2].abs().sum() == 0 and grads[0].abs().sum() > 0


def test_gradcheck_interpolate_tiny_scene() -> None:
    verts = torch.tensor([[[1.3, 1.2, 2.0], [1.4, 6.6, 2.5], [6.6, 1.3, 3.0], [6.3, 6.7, 1.0]]],
                         dtype=torch.float64, requires_grad=True)
    attrs = torch.rand(1, 4, 2, dtype=torch.float64, requires_grad=True)
    faces = torch.tensor([[0, 1, 2], [2, 1, 3]])
    assert rasterize(verts, faces, (8, 8)).pix_to_face.unique().tolist() == [-1, 0, 1]

    def render(v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return interpolate(a, rasterize(v, faces, (8, 8)), faces)

    assert torch.autograd.gradcheck(render, (verts, attrs), eps=1e-6, atol=1e-6)


def test_fragments_detach_and_output_layout() -> None:
    verts, faces = one_triangle(ASYMMETRIC)
    verts.requires_grad_(True)
    frags = rasterize(verts, faces, (10, 10))
    assert frags.bary.requires_grad and not frags.mask.requires_grad
    assert frags.pix_to_face.dtype == torch.long and frags.mask.shape == (1, 1, 10, 10)
    detached = frags.detach()
    assert not detached.bary.requires_grad and torch.equal(detached.bary, frags.bary)
    with pytest.raises(AttributeError):
        frags.mask = frags.mask  # frozen
    attrs = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    image = interpolate(attrs, frags, faces)
    assert image.shape == (1, 2, 10, 10)
    assert_close(image[0, :, 7, 1], torch.tensor([0.0, 1.0]), atol=1e-6, name="colour at vertex 1")


def test_bad_inputs_raise_clear_errors() -> None:
    verts, faces = one_triangle(ASYMMETRIC)
    with pytest.raises(ValueError, match="screen_verts"):
        rasterize(verts[0], faces, (10, 10))
    with pytest.raises(ValueError, match="faces"):
        rasterize(verts, faces.int(), (10, 10))
    with pytest.raises(ValueError, match="image_size"):
        rasterize(verts, faces, (0, 10))
    with pytest.raises(ValueError, match="backend"):
        rasterize(verts, faces, (10, 10), backend="opengl")
    with pytest.raises(ValueError, match="batch"):
        interpolate(torch.rand(2, 3, 1), rasterize(verts, faces, (10, 10)), faces)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            rasterize(verts, faces, (10, 10), backend="nvdiffrast")


@requires_cuda
def test_cuda_matches_cpu() -> None:
    verts, faces = random_scene(5, batch=4, n_verts=60, n_faces=80, height=40, width=48)
    attrs = torch.rand(4, 60, 3)
    upstream = torch.randn(4, 3, 40, 48)
    results = []
    for device in ("cpu", "cuda"):
        v = verts.to(device).requires_grad_(True)
        a = attrs.to(device).requires_grad_(True)
        frags = rasterize(v, faces.to(device), (40, 48), cull_backfaces=False)
        image = interpolate(a, frags, faces.to(device))
        grads = torch.autograd.grad((image * upstream.to(device)).sum(), [v, a])
        results.append([frags.pix_to_face, frags.zbuf, frags.bary, image, *grads])
    names = ["pix_to_face", "zbuf", "bary", "image", "grad verts", "grad attrs"]
    assert_equal(results[1][0], results[0][0], "pix_to_face")
    for name, cpu, cuda in list(zip(names, results[0], results[1]))[1:]:
        assert_close(cuda, cpu, atol=1e-5, rtol=1e-5, name=name)


@pytest.mark.cuda
@requires_nvdiffrast
def test_nvdiffrast_backend_agrees() -> None:
    verts, faces = random_scene(6, batch=2, n_verts=200, n_faces=150, height=64, width=80)
    verts, faces = verts.cuda(), faces.cuda()
    attrs = torch.rand(2, 200, 3, device="cuda")
    ours = rasterize(verts, faces, (64, 80))
    theirs = rasterize(verts, faces, (64, 80), backend="nvdiffrast")
    agree = ours.pix_to_face == theirs.pix_to_face
    assert agree.float().mean() > 0.99, f"only {agree.float().mean().item():.4f} of pixels agree"
    both = agree & (ours.pix_to_face >= 0)
    image_ours, image_theirs = interpolate(attrs, ours, faces), interpolate(attrs, theirs, faces)
    assert_close(image_theirs.permute(0, 2, 3, 1)[both], image_ours.permute(0, 2, 3, 1)[both], atol=1e-4,
                 name="interpolated colours")
