"""FaceRenderer and MoFA end to end on the tiny BFM-layout model."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from models.camera import CameraConfig
from models.encoder import ResNetEncoder
from models.face_model import FaceModel
from models.layout import CoeffLayout
from models.mofa import MoFA
from models.renderer import FaceRenderer
from tests.helpers import assert_close, requires_cuda

SIZE = 128


@pytest.fixture(scope="module")
def renderer(tiny_bfm_h5):
    return FaceRenderer(FaceModel.from_h5(tiny_bfm_h5), CameraConfig().resized(SIZE))


@pytest.fixture(scope="module")
def mean_render(renderer):
    return renderer(renderer.layout.zeros(1))


def test_output_shapes(renderer, mean_render):
    n = renderer.face_model.n_vertices
    out = mean_render
    assert out.vertices.shape == out.screen.shape == out.colors.shape == out.albedo.shape == (1, n, 3)
    assert out.image.shape == (1, 3, SIZE, SIZE) and out.mask.shape == (1, 1, SIZE, SIZE)
    assert out.landmarks.shape == (1, 68, 2) and out.coeffs.shape == (1, 257)


def test_zero_coefficients_render_the_mean_face_in_front_of_the_camera(renderer, mean_render):
    mean = renderer.face_model.mean_shape
    expected = torch.stack([mean[:, 0], -mean[:, 1], 1000.0 - mean[:, 2]], -1)
    assert_close(mean_render.vertices[0], expected, atol=1e-3, msg="camera-frame vertices at zero pose")
    ambient = 0.7 * 2 * math.pi / math.sqrt(4 * math.pi)  # SH_INIT DC times Y_00, independent of the normal
    assert_close(mean_render.colors[0], renderer.face_model.mean_albedo * ambient, atol=1e-5,
                 msg="default light is ambient")


def test_landmarks_are_the_projected_landmark_vertices(renderer, mean_render):
    cfg = renderer.camera_cfg
    lm = renderer.face_model.mean_shape[renderer.face_model.landmark_idx]  # (68, 3) model frame
    depth = 1000.0 - lm[:, 2]
    c = (SIZE - 1) / 2
    expected = torch.stack([cfg.focal * lm[:, 0] / depth + c, cfg.focal * -lm[:, 1] / depth + c], -1)
    assert_close(mean_render.landmarks[0], expected, atol=1e-3, msg="landmarks (pixels)")


def test_image_is_interpolated_colour_on_the_mask_and_zero_elsewhere(mean_render):
    image, mask, colors = mean_render.image[0], mean_render.mask[0, 0], mean_render.colors[0]
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.count_nonzero(image[:, mask == 0]) == 0, "background must be zero"
    inside = image[:, mask == 1]  # (3, P)
    assert inside.numel() > 0
    low, high = colors.min(0).values[:, None], colors.max(0).values[:, None]
    assert bool((inside >= low - 1e-5).all() and (inside <= high + 1e-5).all()), "colours are convex combinations"
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.5


def _pixel_barycentrics(tri: torch.Tensor, size: int) -> torch.Tensor:
    """Screen-space barycentrics `(P, F, 3)` of every pixel centre (row-major) w.r.t. triangles `(F, 3, 2)`."""
    rows, cols = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                                indexing="ij")
    pix = torch.stack([cols.reshape(-1), rows.reshape(-1)], -1)[:, None, :]  # (P, 1, 2)
    a, b, c = (tri[None, :, k].double() for k in range(3))  # (1, F, 2)

    def cross(p, q, r):  # z of (q - p) x (r - p)
        return (q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1]) - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0])

    area = cross(a, b, c)
    return torch.stack([cross(pix, b, c) / area, cross(a, pix, c) / area, cross(a, b, pix) / area], -1)


def test_mask_covers_the_projected_face(renderer, mean_render):
    tri = mean_render.screen[0, :, :2][renderer.face_model.faces]  # (F, 3, 2)
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    area = 0.5 * (e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]).abs().sum()
    mask = mean_render.mask[0, 0].reshape(-1)
    assert abs(float(mask.sum()) / float(area) - 1) < 0.05, f"mask {float(mask.sum())} px vs area {float(area)}"
    bary = _pixel_barycentrics(tri, SIZE)
    strictly_inside = (bary > 1e-6).all(-1).any(-1)  # (P,)
    clearly_outside = (bary < -1e-6).any(-1).all(-1)
    assert int(strictly_inside.sum()) > 0
    assert bool((mask[strictly_inside] == 1).all()), "a pixel inside a projected triangle is not covered"
    assert bool((mask[clearly_outside] == 0).all()), "a pixel outside every projected triangle is covered"


def test_translation_moves_landmarks_and_mask_consistently(renderer, mean_render):
    layout = renderer.layout
    coeffs = layout.zeros(1)
    coeffs[0, layout.slice("trans").start] = 10.0  # +10 mm along x
    moved = renderer(coeffs)
    depth = mean_render.vertices[0, renderer.face_model.landmark_idx, 2]
    shift = moved.landmarks[0] - mean_render.landmarks[0]
    assert_close(shift[:, 0], renderer.camera_cfg.focal * 10.0 / depth, atol=1e-3, msg="u shift")
    assert_close(shift[:, 1], torch.zeros(68), atol=1e-3, msg="v shift")
    cols = torch.arange(SIZE, dtype=torch.float32)
    centroid = [(r.mask[0, 0].sum(0) * cols).sum() / r.mask.sum() for r in (mean_render, moved)]
    expected = renderer.camera_cfg.focal * 10.0 / float(mean_render.vertices[0, :, 2].mean())
    assert abs(float(centroid[1] - centroid[0]) - expected) < 0.5


def test_batch_elements_are_independent(renderer, mean_render):
    coeffs = torch.cat([renderer.layout.zeros(1), 0.3 * torch.randn(1, renderer.layout.total)])
    out = renderer(coeffs)
    assert_close(out.image[0], mean_render.image[0], atol=1e-5, msg="element 0 of a mixed batch")
    assert not torch.equal(out.image[1], out.image[0])


def test_gradients_flow_from_image_to_every_coefficient_block(renderer):
    layout = renderer.layout
    coeffs = (0.1 * torch.randn(2, layout.total)).requires_grad_()
    renderer(coeffs).image.sum().backward()
    grad = coeffs.grad
    assert torch.isfinite(grad).all()
    for name in ("shape", "exp", "tex", "angles", "trans", "light"):
        assert float(grad[:, layout.slice(name)].abs().sum()) > 0, f"no gradient reaches the {name} block"


def test_layout_mismatch_raises(renderer):
    with pytest.raises(ValueError, match="does not match"):
        FaceRenderer(renderer.face_model, layout=CoeffLayout(n_shape=10))
    with pytest.raises(ValueError, match="257"):
        renderer(torch.zeros(1, 256))


def test_zero_initialised_mofa_renders_the_mean_face(renderer, mean_render):
    mofa = MoFA(ResNetEncoder(renderer.layout, arch="resnet18"), renderer)
    out = mofa(torch.rand(2, 3, 64, 64))
    assert torch.count_nonzero(out.coeffs) == 0
    assert_close(out.image, mean_render.image.expand(2, -1, -1, -1), atol=1e-6, msg="MoFA at initialisation")
    with pytest.raises(ValueError, match="layout"):
        MoFA(ResNetEncoder(CoeffLayout(n_exp=10), arch="resnet18"), renderer)


def test_demo_face_model_renders(demo_bfm_h5):
    renderer = FaceRenderer(FaceModel.from_h5(demo_bfm_h5), CameraConfig())
    out = renderer(renderer.layout.zeros(1))
    assert 0.05 < float(out.mask.mean()) < 0.95, "the demo face should fill part of the 224 px image"
    assert bool(((out.landmarks >= 0) & (out.landmarks <= 223)).all()), "landmarks leave the image"


@requires_cuda
def test_cuda_render_matches_cpu(renderer):
    coeffs = 0.2 * torch.randn(2, renderer.layout.total)
    cpu = renderer(coeffs)
    gpu = copy.deepcopy(renderer).to("cuda")(coeffs.to("cuda"))
    assert_close(gpu.screen, cpu.screen, atol=1e-3, msg="screen vertices on CUDA")
    mismatch = (gpu.mask.cpu() != cpu.mask).float().mean()
    assert float(mismatch) < 1e-3, f"{float(mismatch):.2%} of mask pixels differ between CUDA and CPU"
    same = (gpu.mask.cpu() == cpu.mask).expand_as(cpu.image)
    assert_close(gpu.image.cpu()[same], cpu.image[same], atol=1e-3, msg="image on CUDA")


@requires_cuda
def test_cuda_render_gradients_match_cpu(renderer):
    """Forward and backward to the coefficients (normals' sparse sums, barycentrics, interpolation) on CUDA."""
    coeffs = 0.2 * torch.randn(2, renderer.layout.total, generator=torch.Generator().manual_seed(3))
    grads = []
    for device, model in (("cpu", renderer), ("cuda", copy.deepcopy(renderer).to("cuda"))):
        c = coeffs.to(device).requires_grad_(True)
        out = model(c)
        (out.image.square().mean() + out.landmarks.mean()).backward()
        grads.append(c.grad.cpu())
    assert_close(grads[1], grads[0], atol=1e-3, rtol=1e-2, msg="d loss / d coefficients on CUDA")
