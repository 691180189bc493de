"""ResNetEncoder (zero head, post-scaling, local weights), UNet (logits, sizes) and MoFA wiring."""
from __future__ import annotations

import logging

import pytest
import torch
import torchvision

from models.encoder import ResNetEncoder
from models.errors import WeightsError
from models.layout import CoeffLayout
from models.unet import UNet
from tests.helpers import assert_close


@pytest.fixture(scope="module")
def encoder18():
    return ResNetEncoder(CoeffLayout(), arch="resnet18")


def test_zero_initialised_encoder_outputs_zero_coefficients(encoder18):
    out = encoder18(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 257)
    assert torch.count_nonzero(out) == 0, "zero-initialised head must give all-zero coefficients"


def test_post_scaling_follows_the_layout():
    layout = CoeffLayout(n_shape=5, n_exp=4, n_tex=3)
    encoder = ResNetEncoder(layout, arch="resnet18").eval()
    with torch.no_grad():
        encoder.backbone.fc.bias.fill_(1.0)
        out = encoder(torch.rand(1, 3, 32, 32))[0]
    expected = torch.ones(layout.total)
    expected[layout.slice("tex")] = 3.0
    expected[layout.slice("angles")] = 0.3
    expected[layout.slice("trans").stop - 1] = 0.005
    assert_close(out, expected, msg="head output with bias 1")
    assert out[layout.slice("trans").start] == 1.0, "t_x is not scaled"


def test_random_init_logs_one_line(caplog):
    with caplog.at_level(logging.INFO, logger="models.encoder"):
        ResNetEncoder(CoeffLayout(), arch="resnet18")
    records = [r for r in caplog.records if r.name == "models.encoder"]
    assert len(records) == 1 and "randomly initialised" in records[0].getMessage()


def test_local_weights_load_and_fc_stays_zero(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    encoder = ResNetEncoder(CoeffLayout(), arch="resnet18", weights_path=path)
    assert torch.equal(encoder.backbone.conv1.weight, reference.conv1.weight)
    assert torch.equal(encoder.backbone.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    assert torch.count_nonzero(encoder.backbone.fc.weight) == 0 and encoder.backbone.fc.out_features == 257


def test_bad_weights_files_raise_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match=r"missing.pth not found: expected a local torchvision resnet18"):
        ResNetEncoder(CoeffLayout(), arch="resnet18", weights_path=tmp_path / "missing.pth")
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save({k: v for k, v in state.items() if k != "layer1.0.conv1.weight"}, tmp_path / "partial.pth")
    partial = r"resnet18 weights file .*partial.pth does not match ResNet: missing keys \[layer1.0.conv1.weight\]"
    with pytest.raises(WeightsError, match=partial):
        ResNetEncoder(CoeffLayout(), arch="resnet18", weights_path=tmp_path / "partial.pth")
    torch.save({**state, "conv1.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "shape.pth")
    shape = r"size mismatch for 'conv1.weight': \(64, 3, 3, 3\) given, \(64, 3, 7, 7\) expected"
    with pytest.raises(WeightsError, match=shape):
        ResNetEncoder(CoeffLayout(), arch="resnet18", weights_path=tmp_path / "shape.pth")
    (tmp_path / "junk.pth").write_text("junk")
    with pytest.raises(WeightsError, match="junk.pth"):
        ResNetEncoder(CoeffLayout(), arch="resnet18", weights_path=tmp_path / "junk.pth")


def test_resnet50_builds_and_runs_once():
    encoder = ResNetEncoder(CoeffLayout(), arch="resnet50")
    assert encoder.backbone.fc.in_features == 2048
    out = encoder(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 257) and torch.count_nonzero(out) == 0


def test_unknown_arch_and_bad_input_raise(encoder18):
    with pytest.raises(ValueError, match="vgg19"):
        ResNetEncoder(CoeffLayout(), arch="vgg19")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        encoder18(torch.rand(2, 1, 32, 32))


def test_unet_logits_at_224_and_64():
    with torch.no_grad():
        assert UNet(base=4)(torch.rand(1, 6, 224, 224)).shape == (1, 1, 224, 224)
    unet = UNet()
    with torch.no_grad():
        out = unet(torch.rand(2, 6, 64, 64))
    assert out.shape == (2, 1, 64, 64)
    assert float(out.min()) < 0 or float(out.max()) > 1, "UNet must return logits, not probabilities"


def test_unet_structure_matches_the_original():
    unet = UNet(base=64)
    convs = [m for m in unet.down.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs[1::2]] == [64, 128, 256, 512, 1024]
    has_dropout = [any(isinstance(m, torch.nn.Dropout) for m in block.modules()) for block in unet.down]
    assert has_dropout == [False, False, False, True, True]
    assert unet.head.in_channels == 64 and unet.head.kernel_size == (1, 1)


def test_unet_handles_sizes_not_divisible_by_16_and_backpropagates():
    unet = UNet(base=4)
    x = torch.rand(1, 6, 50, 37, requires_grad=True)
    out = unet(x)
    assert out.shape == (1, 1, 50, 37)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="6"):
        unet(torch.rand(1, 3, 32, 32))
