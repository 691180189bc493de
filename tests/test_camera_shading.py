"""Camera (rotation, transform, projection) and shading (normals, SH basis, shade)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation
from scipy.special import sph_harm_y

from models.camera import CameraConfig, euler_rotation, project, to_camera
from models.shading import sh_basis, shade, vertex_normals
from tests.helpers import assert_close, requires_cuda, sphere_grid

SH_LM = [(0, 0), (1, -1), (1, 0), (1, 1), (2, -2), (2, -1), (2, 0), (2, 1), (2, 2)]


# ----- camera ---------------------------------------------------------------------------------------------------

def test_presets_and_principal_point():
    g2, g1 = CameraConfig.preset("g2"), CameraConfig.preset("g1")
    assert g2 == CameraConfig() and g2.focal == pytest.approx(1014.72) and g2.trans0 == (0.0, 0.0, 1000.0)
    assert g1.focal == 250.0 and g1.trans0 == (0.0, 30.0, 300.0)
    assert g2.principal_point == (111.5, 111.5)
    with pytest.raises(ValueError, match="g3"):
        CameraConfig.preset("g3")


def test_resized_renders_the_same_scene():
    cfg = CameraConfig()
    small = cfg.resized(64)
    assert small.image_size == 64 and small.focal == pytest.approx(1014.72 * 64 / 224)
    points = torch.tensor([[[30.0, -20.0, 900.0], [-5.0, 40.0, 1100.0]]])
    big_uv, small_uv = project(points, cfg)[..., :2], project(points, small)[..., :2]
    # pixel centres at integers: continuous image coordinate = u + 0.5 scales with the image
    assert_close(small_uv + 0.5, (big_uv + 0.5) * 64 / 224, atol=1e-4, msg="resized projection")


def test_rotations_are_proper_and_match_intrinsic_xyz():
    angles = torch.rand(16, 3, dtype=torch.float64) * 4 - 2
    rot = euler_rotation(angles)
    assert rot.shape == (16, 3, 3)
    assert_close(rot @ rot.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(16, 3, 3), atol=1e-12,
                 msg="R R^T")
    assert_close(torch.linalg.det(rot), torch.ones(16, dtype=torch.float64), atol=1e-12, msg="det R")
    expected = np.diag([1.0, -1.0, -1.0]) @ Rotation.from_euler("XYZ", angles.numpy()).as_matrix()
    assert_close(rot, expected, atol=1e-12, msg="diag(1,-1,-1) Rx Ry Rz")


def test_zero_angles_flip_y_and_z():
    rot = euler_rotation(torch.zeros(1, 3))[0]
    assert_close(rot @ torch.tensor([0.0, 1.0, 0.0]), [0.0, -1.0, 0.0], msg="model up -> camera up (y down)")
    assert_close(rot @ torch.tensor([0.0, 0.0, 1.0]), [0.0, 0.0, -1.0], msg="toward viewer -> toward camera")
    assert_close(rot @ torch.tensor([1.0, 0.0, 0.0]), [1.0, 0.0, 0.0], msg="x unchanged")


def _screen_of(point: list[float], angles: list[float], cfg: CameraConfig = CameraConfig()) -> torch.Tensor:
    rot = euler_rotation(torch.tensor([angles]))
    v_cam = to_camera(torch.tensor([[point]]), rot, torch.tensor([cfg.trans0]))
    return project(v_cam, cfg)[0, 0]


def test_small_positive_yaw_moves_the_nose_to_image_right():
    cfg, theta, nose = CameraConfig(), 0.1, [0.0, 0.0, 100.0]
    u, v, z = _screen_of(nose, [0.0, theta, 0.0]).tolist()
    # Ry(theta) (0, 0, 100) = (100 sin, 0, 100 cos); the camera flips y and z; depth 1000 - 100 cos
    expected_u = cfg.focal * 100 * math.sin(theta) / (1000 - 100 * math.cos(theta)) + 111.5
    assert u > 111.5 and u == pytest.approx(expected_u, rel=1e-5)
    assert v == pytest.approx(111.5) and z == pytest.approx(1000 - 100 * math.cos(theta), rel=1e-6)


def test_positive_pitch_moves_the_nose_down_and_roll_moves_x_axis_up():
    _, v_pitch, _ = _screen_of([0.0, 0.0, 100.0], [0.1, 0.0, 0.0]).tolist()
    assert v_pitch > 111.5, "Rx(+) turns the nose toward -y (model), i.e. down in the image"
    u_roll, v_roll, _ = _screen_of([100.0, 0.0, 0.0], [0.0, 0.0, 0.1]).tolist()
    assert v_roll < 111.5 and u_roll > 111.5, "Rz(+) turns +x toward +y (model), i.e. up in the image"


def test_projection_formula_and_optical_axis():
    cfg = CameraConfig(focal=500.0, image_size=100)
    pts = torch.tensor([[[0.0, 0.0, 700.0], [10.0, -20.0, 400.0]]])
    screen = project(pts, cfg)
    assert_close(screen[0, 0], [49.5, 49.5, 700.0], msg="optical axis -> principal point")
    assert_close(screen[0, 1], [500 * 10 / 400 + 49.5, 500 * -20 / 400 + 49.5, 400.0], msg="off-axis point")


def test_projection_guards_tiny_depth_keeping_sign():
    screen = project(torch.tensor([[[1.0, 1.0, 0.0], [1.0, 1.0, -1e-12], [1.0, 1.0, 1e-12]]]), CameraConfig())
    assert torch.isfinite(screen).all()
    assert screen[0, 0, 0] > 111.5 and screen[0, 2, 0] > 111.5 and screen[0, 1, 0] < 111.5
    assert screen[0, 1, 2] == -1e-12, "the returned depth is not altered"


def test_to_camera_applies_rotation_then_translation():
    verts = torch.tensor([[[1.0, 2.0, 3.0]]])
    rot = euler_rotation(torch.tensor([[0.0, 0.0, math.pi / 2]]))  # Rz(90): (1,2,3) -> (-2,1,3), then flip
    out = to_camera(verts, rot, torch.tensor([[10.0, 20.0, 30.0]]))
    assert_close(out[0, 0], [-2.0 + 10.0, -1.0 + 20.0, -3.0 + 30.0], atol=1e-5, msg="R X + T")


# ----- normals --------------------------------------------------------------------------------------------------

def test_plane_normals_point_up_and_are_unit():
    _, faces = sphere_grid(np.zeros(4), np.zeros(5), 1.0)  # only the 4 x 5 grid connectivity is used
    xs, ys = np.meshgrid(np.linspace(0, 3, 5), np.linspace(0, 2, 4))
    verts = np.stack([xs.ravel(), ys.ravel(), np.zeros(xs.size)], -1)
    normals = vertex_normals(torch.tensor(verts[None], dtype=torch.float32), torch.from_numpy(faces))
    assert_close(normals[0], torch.tensor([0.0, 0.0, 1.0]).expand(20, 3), atol=1e-6, msg="plane normals")


def test_normals_are_area_weighted():
    verts = torch.tensor([[[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]])
    faces = torch.tensor([[0, 1, 2], [0, 3, 4]])  # area 2 with normal +z, area 0.5 with normal +y
    normal = vertex_normals(verts, faces)[0, 0]
    expected = torch.tensor([0.0, 0.5, 2.0]) / math.hypot(0.5, 2.0)
    assert_close(normal, expected, atol=1e-6, msg="area-weighted normal of the shared vertex")


def test_isolated_vertex_gets_a_finite_zero_normal():
    verts = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]]], requires_grad=True)
    normals = vertex_normals(verts, torch.tensor([[0, 1, 2]]))
    assert torch.isfinite(normals).all()
    assert_close(normals[0, 3], [0.0, 0.0, 0.0], msg="isolated vertex")
    normals.sum().backward()
    assert torch.isfinite(verts.grad).all()


def test_sphere_normals_are_radial_repeatable_and_batched():
    verts, faces = sphere_grid(np.linspace(-60, 60, 9), np.linspace(-80, 80, 11), 50.0)
    v = torch.tensor(verts[None], dtype=torch.float32)
    f = torch.from_numpy(faces)
    first = vertex_normals(v, f)
    assert_close(first.norm(dim=-1), torch.ones(1, len(verts)), atol=1e-5, msg="unit length")
    interior = [i * 11 + j for i in range(1, 8) for j in range(1, 10)]
    cos = (first[0, interior] * (v[0, interior] / 50.0)).sum(-1)
    assert float(cos.min()) > 0.99, f"interior normals deviate from the radius: min cos {float(cos.min()):.4f}"
    assert torch.equal(vertex_normals(v, f), first), "repeated calls must give identical normals"
    other = v * torch.tensor([1.0, 2.0, 0.5])
    batched = vertex_normals(torch.cat([v, other]), f)
    assert_close(batched[0], first[0], msg="batch element 0")
    assert_close(batched[1], vertex_normals(other, f)[0], msg="batch element 1")


def _reference_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """The straightforward formula, differentiated by autograd: cross products, index_add, renormalise."""
    v0, v1, v2 = (verts[:, faces[:, k]] for k in range(3))
    face_normals = torch.cross(v1 - v0, v2 - v0, dim=-1)
    summed = torch.zeros_like(verts)
    for k in range(3):
        summed = summed.index_add(1, faces[:, k], face_normals)
    return summed * torch.rsqrt((summed * summed).sum(-1, keepdim=True) + 1e-12)


def _bumpy_sphere() -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 batch of 2 perturbed 4 x 5 sphere patches plus one isolated vertex (index 20)."""
    verts, faces = sphere_grid(np.linspace(-40, 40, 4), np.linspace(-50, 50, 5), 10.0)
    gen = torch.Generator().manual_seed(1)
    base = torch.tensor(np.vstack([verts, [[30.0, 0.0, 0.0]]]))
    batch = torch.stack([base, base * torch.tensor([1.0, 1.5, 0.7], dtype=torch.float64)])
    return batch + 0.5 * torch.randn(batch.shape, generator=gen, dtype=torch.float64), torch.from_numpy(faces)


def test_normals_and_their_gradients_match_the_straightforward_formula():
    verts, faces = _bumpy_sphere()
    ours_in, ref_in = verts.clone().requires_grad_(), verts.clone().requires_grad_()
    ours, ref = vertex_normals(ours_in, faces), _reference_normals(ref_in, faces)
    assert_close(ours, ref, atol=1e-12, msg="normals")
    upstream = torch.randn(verts.shape, dtype=torch.float64)
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert_close(ours_in.grad, ref_in.grad, atol=1e-10, msg="d loss / d vertices vs autograd")
    assert bool(ours_in.grad[:, :20].abs().sum(-1).gt(0).all()), "every mesh vertex receives a gradient"
    assert torch.count_nonzero(ours_in.grad[:, 20]) == 0, "the isolated vertex receives none"
    assert torch.autograd.gradcheck(lambda v: vertex_normals(v, faces), (verts.clone().requires_grad_(),))


@requires_cuda
def test_normals_and_gradients_on_cuda_match_cpu():
    verts, faces = _bumpy_sphere()
    upstream = torch.randn(verts.shape, dtype=torch.float64)
    results = []
    for device in ("cpu", "cuda"):
        v = verts.to(device).requires_grad_()
        normals = vertex_normals(v, faces.to(device))
        (normals * upstream.to(device)).sum().backward()
        results.append((normals.detach().cpu(), v.grad.cpu()))
    assert_close(results[1][0], results[0][0], atol=1e-12, msg="normals on CUDA")
    assert_close(results[1][1], results[0][1], atol=1e-10, msg="d loss / d vertices on CUDA")


def test_normals_accept_any_memory_layout():
    verts, faces = _bumpy_sphere()
    planar = verts.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # (B, N, 3) view of coordinate planes
    assert_close(vertex_normals(planar, faces), vertex_normals(verts, faces), atol=0, rtol=0, msg="layout")


# ----- spherical harmonics --------------------------------------------------------------------------------------

def _fibonacci_sphere(n: int) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (3 - math.sqrt(5)) * i
    r = torch.sqrt(1 - z * z)
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], -1)


def test_sh_basis_is_orthonormal_on_the_sphere():
    n = 20000
    basis = sh_basis(_fibonacci_sphere(n)[None])[0]  # (n, 9)
    gram = basis.T @ basis * (4 * math.pi / n)
    assert_close(gram, torch.eye(9, dtype=torch.float64), atol=1e-3, msg="SH Gram matrix")


def test_sh_basis_matches_condon_shortley_definition():
    dirs = _fibonacci_sphere(50)
    theta = torch.arccos(dirs[:, 2].clamp(-1, 1)).numpy()
    phi = torch.atan2(dirs[:, 1], dirs[:, 0]).numpy()
    ours = sh_basis(dirs[None])[0].numpy()
    for k, (l, m) in enumerate(SH_LM):
        complex_y = sph_harm_y(l, abs(m), theta, phi)  # K P_l^|m| e^{i|m|phi}, Condon-Shortley phase included
        if m == 0:
            expected = complex_y.real
        elif m > 0:
            expected = math.sqrt(2) * complex_y.real
        else:
            expected = math.sqrt(2) * complex_y.imag
        assert_close(ours[:, k], expected, atol=1e-10, msg=f"Y_{l},{m}")


def test_dc_only_light_scales_albedo():
    normals = torch.nn.functional.normalize(torch.randn(2, 50, 3), dim=-1)
    albedo = torch.rand(2, 50, 3)
    sh = torch.zeros(2, 27)
    const = torch.tensor([1.5, 0.5, 2.0])
    sh[:, [0, 9, 18]] = const * math.sqrt(4 * math.pi)  # Y_00 = 1 / sqrt(4 pi)
    assert_close(shade(albedo, normals, sh), albedo * const, atol=1e-5, msg="DC-only shading")


def _shade_inputs(batch: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 `(albedo (B, N, 3), unit normals (B, N, 3), sh (B, 27))`."""
    gen = torch.Generator().manual_seed(seed)
    normals = torch.nn.functional.normalize(torch.randn(batch, n, 3, generator=gen, dtype=torch.float64), dim=-1)
    albedo = torch.rand(batch, n, 3, generator=gen, dtype=torch.float64)
    return albedo, normals, torch.randn(batch, 27, generator=gen, dtype=torch.float64)


def _reference_shade(albedo: torch.Tensor, normals: torch.Tensor, sh: torch.Tensor) -> torch.Tensor:
    """`albedo_c * sum_k sh[9c + k] Y_k(n)` straight from `sh_basis`, differentiated by autograd."""
    return albedo * torch.einsum("bnk,bck->bnc", sh_basis(normals), sh.view(sh.shape[0], 3, 9))


@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, False),
                                   (False, False, True), (False, True, True), (True, True, False)])
def test_shade_matches_the_sh_basis_formula_with_gradients(needs):
    """Colours and d loss / d (albedo, normals, sh) against autograd through `sh_basis`, for every input and for
    subsets of them (the backward skips the gradients nobody asked for)."""
    inputs = _shade_inputs(3, 40, seed=2)
    ours_in = [t.clone().requires_grad_(need) for t, need in zip(inputs, needs)]
    ref_in = [t.clone().requires_grad_(need) for t, need in zip(inputs, needs)]
    ours, ref = shade(*ours_in), _reference_shade(*ref_in)
    assert_close(ours, ref, atol=1e-12, rtol=0, msg="colours")
    assert ours.permute(2, 0, 1).is_contiguous(), "the colours are a view of (3, B, N) planes"
    upstream = torch.randn(ours.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    for name, a, b, need in zip(("albedo", "normals", "sh"), ours_in, ref_in, needs):
        if need:
            assert_close(a.grad, b.grad, atol=1e-10, rtol=0, msg=f"d loss / d {name}")
            assert bool(a.grad.abs().gt(0).any()), f"d loss / d {name} is all zero"
        else:
            assert a.grad is None


def test_shade_gradcheck():
    """Finite differences of the analytic backward in float64, for all three inputs, in both input layouts."""
    albedo, normals, sh = _shade_inputs(2, 5, seed=4)
    normals = normals * 1.3  # any vector, not only unit ones: the shading is a polynomial in n
    assert torch.autograd.gradcheck(shade, tuple(t.clone().requires_grad_() for t in (albedo, normals, sh)))
    plane_in = [t.permute(2, 0, 1).contiguous().requires_grad_() for t in (albedo, normals)]  # (3, B, N) leaves
    assert torch.autograd.gradcheck(lambda a, n, s: shade(a.permute(1, 2, 0), n.permute(1, 2, 0), s),
                                    (*plane_in, sh.clone().requires_grad_()))


def test_shade_accepts_any_memory_layout_and_float32():
    albedo, normals, sh = _shade_inputs(2, 30, seed=5)
    planar = [t.permute(2, 0, 1).contiguous().permute(1, 2, 0) for t in (albedo, normals)]  # views of planes
    assert_close(shade(*planar, sh), shade(albedo, normals, sh), atol=0, rtol=0, msg="layout")
    single = shade(albedo.float(), normals.float(), sh.float())
    assert single.dtype == torch.float32
    assert_close(single, _reference_shade(albedo, normals, sh), atol=1e-5, msg="float32")


def test_shade_refuses_mixed_dtypes():
    albedo, normals, sh = _shade_inputs(1, 4, seed=7)
    with pytest.raises(ValueError, match="one dtype"):
        shade(albedo.float(), normals, sh)


@requires_cuda
def test_shade_and_gradients_on_cuda_match_cpu():
    """Same values on CUDA, and no host synchronisation inside the forward and backward."""
    inputs = _shade_inputs(3, 40, seed=6)
    upstream = torch.randn(3, 40, 3, dtype=torch.float64)
    results = []
    for device in ("cpu", "cuda"):
        leaves = [t.to(device).requires_grad_() for t in inputs]
        weight = upstream.to(device)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            colours = shade(*leaves)
            (colours * weight).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        results.append([colours.detach().cpu()] + [t.grad.cpu() for t in leaves])
    for name, a, b in zip(("colours", "d albedo", "d normals", "d sh"), results[1], results[0]):
        assert_close(a, b, atol=1e-10, rtol=0, msg=f"{name} on CUDA")


def test_shade_uses_index_9c_plus_k():
    normals = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]]])
    albedo = torch.ones(1, 2, 3)
    sh = torch.zeros(1, 27)
    sh[0, 9 + 2] = 1.0  # green channel, Y_10 = sqrt(3 / 4 pi) z
    out = shade(albedo, normals, sh)
    c = math.sqrt(3 / (4 * math.pi))
    assert_close(out[0], [[0.0, c, 0.0], [0.0, -c, 0.0]], atol=1e-6, msg="green channel, Y_10, no clamping")
    with pytest.raises(ValueError, match="27"):
        shade(albedo, normals, torch.zeros(1, 26))
