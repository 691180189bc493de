"""ArcFace iresnet: insightface-compatible parameter names, strict weight loading, template warp, frozen encoder."""
import math

import pytest
import torch

from models import arcface as af
from models.errors import WeightsError

SMALL = (1, 1, 1, 1)  # same layer names and shapes per block, fewer blocks: keeps the CPU tests fast


@pytest.fixture(scope="module")
def small_encoder():
    torch.manual_seed(0)
    enc = af.IdentityEncoder(None, layers=SMALL)
    with torch.no_grad():  # non-trivial BatchNorm statistics so eval mode matters
        for m in enc.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return enc


def _landmarks_for(A_inv):
    """68 landmarks whose 5 derived points are A_inv applied to the ArcFace template (B = 1)."""
    tpl = torch.tensor(af.ARCFACE_TEMPLATE)
    pts = tpl @ A_inv[:, :2].T + A_inv[:, 2]  # (5, 2) image pixels
    lm = torch.zeros(1, 68, 2)
    lm[0, 36:42], lm[0, 42:48], lm[0, 30], lm[0, 48], lm[0, 54] = pts[0], pts[1], pts[2], pts[3], pts[4]
    return lm, pts


def test_r50_matches_insightface_layout():
    net = af.IResNet()
    sd = net.state_dict()
    shapes = {
        "conv1.weight": (64, 3, 3, 3), "prelu.weight": (64,), "bn1.num_batches_tracked": (),
        "layer1.0.bn1.weight": (64,), "layer1.0.conv1.weight": (64, 64, 3, 3), "layer1.0.prelu.weight": (64,),
        "layer1.0.downsample.0.weight": (64, 64, 1, 1), "layer1.0.downsample.1.running_var": (64,),
        "layer2.0.conv1.weight": (128, 64, 3, 3), "layer2.0.bn3.weight": (128,),
        "layer3.13.conv2.weight": (256, 256, 3, 3), "layer4.2.bn3.bias": (512,),
        "bn2.weight": (512,), "fc.weight": (512, 512 * 7 * 7), "fc.bias": (512,), "features.running_mean": (512,),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert "layer3.14.bn1.weight" not in sd and "layer1.1.downsample.0.weight" not in sd
    blocks = {k.split(".")[0] + "." + k.split(".")[1] for k in sd if k.startswith("layer")}
    assert sum(1 for b in blocks if b.startswith("layer3")) == 14 and len(blocks) == 24
    n_params = sum(p.numel() for p in net.parameters())
    assert 43.5e6 < n_params < 43.7e6  # iresnet-50: 43.6 M parameters


def test_shapes_and_unit_embedding(small_encoder):
    torch.manual_seed(1)
    images = torch.rand(2, 3, 96, 80)
    lm, _ = _landmarks_for(torch.tensor([[0.7, 0.1, 5.0], [-0.1, 0.7, 3.0]]))
    lm = lm.repeat(2, 1, 1)
    emb = small_encoder(images, lm)
    assert emb.shape == (2, 512)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    assert small_encoder.shallow(images, lm).shape == (2, 64, 56, 56)
    assert small_encoder.align(images, lm).shape == (2, 3, 112, 112)
    assert small_encoder(images, af.five_points(lm)).allclose(emb, atol=1e-6)


def test_similarity_recovers_known_transform():
    angle, scale = math.radians(12.0), 1.7
    c, s = math.cos(angle), math.sin(angle)
    A = torch.tensor([[scale * c, -scale * s, -30.0], [scale * s, scale * c, 12.0]])
    src = torch.rand(1, 5, 2) * 100
    dst = src[0] @ A[:, :2].T + A[:, 2]
    assert torch.allclose(af.similarity_to_template(src, dst), A[None], atol=1e-4)


def test_warp_places_template_points():
    # image pixel p -> template pixel q is q = S p + t; the landmarks are S^-1 (template - t)
    angle, scale = math.radians(-8.0), 0.6
    c, s = math.cos(angle), math.sin(angle)
    S = torch.tensor([[scale * c, -scale * s], [scale * s, scale * c]])
    t = torch.tensor([-20.0, -5.0])
    S_inv = torch.linalg.inv(S)
    lm, pts = _landmarks_for(torch.cat([S_inv, (-S_inv @ t)[:, None]], dim=1))
    H, W = 200, 180
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                            indexing="ij")
    ramp = torch.stack([xs, ys, torch.zeros_like(xs)])[None] / 1000.0  # encodes each pixel's coordinates
    warped = af.warp_to_template(ramp, lm) * 1000.0  # (1, 3, 112, 112): source coordinates per output pixel
    qy, qx = torch.meshgrid(torch.arange(112.0), torch.arange(112.0), indexing="ij")
    p = torch.stack([warped[0, 0], warped[0, 1]], dim=-1)  # (112, 112, 2)
    p_true = (torch.stack([qx, qy], -1) - t) @ S_inv.T  # where each output pixel must sample the image
    inside = (p_true[..., 0] >= 0) & (p_true[..., 0] <= W - 1) & (p_true[..., 1] >= 0) & (p_true[..., 1] <= H - 1)
    assert inside.float().mean() > 0.5
    assert torch.allclose(p[inside], p_true[inside], atol=2e-2)
    # and the 5 derived points themselves land on the template
    tpl = torch.tensor(af.ARCFACE_TEMPLATE)
    assert torch.allclose(pts @ S.T + t, tpl, atol=1e-3)


def test_warp_moves_a_dot_to_the_nose_template_point():
    lm, pts = _landmarks_for(torch.tensor([[1.5, 0.0, 10.0], [0.0, 1.5, 20.0]]))
    img = torch.zeros(1, 3, 220, 200)
    nx, ny = pts[2].round().long().tolist()
    img[0, :, ny - 1:ny + 2, nx - 1:nx + 2] = 1.0
    warped = af.warp_to_template(img, lm)[0, 0]
    peak = torch.nonzero(warped == warped.max())[0].float()  # (row, col)
    assert torch.allclose(peak, torch.tensor([71.7366, 56.0252]), atol=1.5)


def test_gradient_flows_to_image_not_to_weights(small_encoder):
    images = torch.rand(1, 3, 112, 112, requires_grad=True)
    lm, _ = _landmarks_for(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    target = torch.nn.functional.normalize(torch.randn(1, 512), dim=1)
    (1 - (small_encoder(images, lm) * target).sum()).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()
    assert all(p.grad is None and not p.requires_grad for p in small_encoder.parameters())


def test_frozen_under_parent_train_and_optimizer(small_encoder):
    parent = torch.nn.ModuleDict({"head": torch.nn.Linear(512, 1), "identity": small_encoder})
    parent.train()
    assert not small_encoder.training and not any(m.training for m in small_encoder.modules())
    before = {k: v.clone() for k, v in small_encoder.state_dict().items()}
    opt = torch.optim.SGD(parent.parameters(), lr=1.0)
    images = torch.rand(2, 3, 112, 112)
    lm, _ = _landmarks_for(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    parent["head"](small_encoder(images, lm.repeat(2, 1, 1))).sum().backward()
    opt.step()
    for k, v in small_encoder.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_weights_round_trip_strict(tmp_path, small_encoder):
    path = tmp_path / "backbone.pth"
    torch.save(small_encoder.net.state_dict(), path)
    loaded = af.IdentityEncoder(path, layers=SMALL)
    images = torch.rand(1, 3, 112, 112)
    lm, _ = _landmarks_for(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    assert torch.equal(loaded(images, lm), small_encoder(images, lm))

    state = small_encoder.net.state_dict()
    del state["fc.bias"]
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"backbone.pth does not match IResNet: missing keys \[fc.bias\], "
                                           r"unexpected keys \[\]: pass the backbone.pth"):
        af.IdentityEncoder(path, layers=SMALL)
    with pytest.raises(WeightsError, match="does not match IResNet: missing keys .*layer1.1"):  # r50 vs small file
        af.IdentityEncoder(path)
    state = small_encoder.net.state_dict()
    state["fc.bias"] = torch.zeros(3)
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"size mismatch for 'fc.bias': \(3,\) given, \(512,\) expected"):
        af.IdentityEncoder(path, layers=SMALL)
    torch.save(torch.zeros(3), path)
    with pytest.raises(WeightsError, match="holds a Tensor, not a state dict"):
        af.IdentityEncoder(path, layers=SMALL)
    path.write_text("junk")
    with pytest.raises(WeightsError, match="backbone.pth is unreadable"):
        af.IdentityEncoder(path, layers=SMALL)
    with pytest.raises(WeightsError, match="none.pth not found: pass the backbone.pth"):
        af.IdentityEncoder(tmp_path / "none.pth")
