"""G2's UNet head and feature normalisation, and the UNet's train/eval gap (issue 13): the sigmoid(5 x) head and
Step 3's BCE on 5 x, the width normalisation of the preserve/dist features, BatchNorm re-estimation with dropout off,
side-effect-free train-mode probing, and when Step 4 re-estimates."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from models.unet import HEAD_SCALE, UNet, mask_from_logits
from Step4_UNet_MoFA_EM import em_phase, unet_phase_ended
from utils import losses
from utils.training.batchnorm import batchnorm_layers, recalibrate_batchnorm, train_mode_probe
from utils.training.objectives import mask_in_face, unet_mask


def _head_output(unet: UNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, output of the 1x1 head conv) of one forward."""
    seen = {}

    def keep_output(_module, _inputs, output) -> None:  # returns None: the output is not replaced
        seen["head"] = output

    handle = unet.head.register_forward_hook(keep_output)
    try:
        logits = unet(x)
    finally:
        handle.remove()
    return logits, seen["head"]


def test_head_is_sigmoid_of_five_times_the_conv():
    unet = UNet(base=4).eval()
    x = torch.rand(2, 6, 32, 32)
    with torch.no_grad():
        logits, head = _head_output(unet, x)
        assert HEAD_SCALE == 5.0
        torch.testing.assert_close(logits, 5.0 * head)
        out = SimpleNamespace(image=x[:, :3])
        torch.testing.assert_close(unet_mask(unet, out, x[:, 3:]), torch.sigmoid(5.0 * head))
        torch.testing.assert_close(mask_from_logits(logits), torch.sigmoid(5.0 * head))


def test_step3_bce_is_on_five_times_the_conv():
    unet = UNet(base=4).eval()
    x, target = torch.rand(2, 6, 32, 32), torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        logits, head = _head_output(unet, x)
        expected = F.binary_cross_entropy(torch.sigmoid(5.0 * head), target)
        torch.testing.assert_close(losses.unet_bce_loss(logits, target), expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(losses.unet_bce_loss(head, target), expected)


def test_width_normalisation_changes_the_cosine_by_hand():
    """One row, two pixels, two channels. Per pixel fa = (1, 1), fb = (1, 3): plain loss 1 - 4 / (sqrt 2 sqrt 10).
    Normalising every (channel, row) along the width makes both pixels (1, 1) / sqrt 2 in fa and fb: loss 0."""
    fa = torch.tensor([[[[1.0, 1.0]], [[1.0, 1.0]]]])  # (B=1, C=2, h=1, w=2)
    fb = torch.tensor([[[[1.0, 1.0]], [[3.0, 3.0]]]])
    plain = losses.feature_cosine_loss(fa, fb, width_normalise=False)
    assert plain.item() == pytest.approx(1.0 - 4.0 / math.sqrt(20.0), abs=1e-6)
    assert losses.feature_cosine_loss(fa, fb).item() == pytest.approx(0.0, abs=1e-6)


def test_width_normalisation_is_along_the_last_axis():
    """A map that is not square: normalising along the height instead would give another value."""
    torch.manual_seed(1)
    fa, fb = torch.rand(2, 3, 4, 5), torch.rand(2, 3, 4, 5)
    by_width = fa / fa.norm(dim=3, keepdim=True), fb / fb.norm(dim=3, keepdim=True)
    expected = (1 - F.cosine_similarity(*by_width, dim=1)).mean()
    torch.testing.assert_close(losses.feature_cosine_loss(fa, fb), expected)
    by_height = fa / fa.norm(dim=2, keepdim=True), fb / fb.norm(dim=2, keepdim=True)
    assert not torch.allclose(losses.feature_cosine_loss(fa, fb), (1 - F.cosine_similarity(*by_height, dim=1)).mean())


def _train_mode_without_dropout(unet: UNet, x: torch.Tensor) -> torch.Tensor:
    """Logits with BatchNorm on batch statistics and dropout off, leaving the running statistics untouched."""
    with train_mode_probe(unet):
        for m in unet.modules():
            if isinstance(m, torch.nn.Dropout):
                m.eval()
        return unet(x)


@torch.no_grad()
def test_recalibration_makes_eval_match_train_mode_without_dropout():
    """After re-estimation on a batch, every BatchNorm's running mean / variance are that batch's statistics with
    dropout off, so eval mode reproduces train mode without dropout (up to the unbiased-variance factor n / (n - 1)
    of the running variance); before it, the dropout-shifted statistics put eval mode far off."""
    torch.manual_seed(0)
    unet = UNet(base=4).train()
    for _ in range(10):  # running statistics of dropped-out activations, as training leaves them
        unet(torch.rand(16, 6, 32, 32))
    x = torch.rand(16, 6, 32, 32)
    layers = batchnorm_layers(unet)
    seen = {}

    def keep_input(module, inputs, _output) -> None:  # returns None: the output is not replaced
        seen[module] = inputs[0].clone()

    hooks = [m.register_forward_hook(keep_input) for m in layers]
    reference = _train_mode_without_dropout(unet, x)
    for h in hooks:
        h.remove()
    before = (unet.eval()(x) - reference).abs().max()
    assert recalibrate_batchnorm(unet, [x], max_images=16) == 16
    for m in layers:
        torch.testing.assert_close(m.running_mean, seen[m].mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m.running_var, seen[m].var(dim=(0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-5)
    after = (unet.eval()(x) - reference).abs().max()
    assert after < 0.25 * before, (before, after)


@torch.no_grad()
def test_recalibration_restores_modes_and_momenta_and_stops_at_max_images():
    unet = UNet(base=4).train()
    layers = batchnorm_layers(unet)
    assert len(layers) > 0
    used = recalibrate_batchnorm(unet, (torch.rand(4, 6, 32, 32) for _ in range(10)), max_images=8)
    assert used == 8 and unet.training and all(m.training for m in unet.modules())
    assert all(m.momentum == 0.1 for m in layers) and all(int(m.num_batches_tracked) == 2 for m in layers)


@torch.no_grad()
def test_recalibration_without_inputs_leaves_the_statistics_alone():
    unet = UNet(base=4).train()
    unet(torch.rand(4, 6, 32, 32))
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(ValueError, match="no input"):
        recalibrate_batchnorm(unet, [], max_images=8)
    for k, v in unet.state_dict().items():
        assert torch.equal(v, before[k]), k


@torch.no_grad()
def test_train_mode_probe_leaves_no_trace():
    unet = UNet(base=4).eval()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    x = torch.rand(4, 6, 32, 32)
    torch.manual_seed(3)
    with train_mode_probe(unet):
        assert unet.training
        a = unet(x)
    assert not unet.training
    draw = torch.rand(5)
    torch.manual_seed(3)
    assert torch.equal(draw, torch.rand(5))  # the probe's dropout draws were not taken from the stream
    for k, v in unet.state_dict().items():
        assert torch.equal(v, before[k]), k
    with train_mode_probe(unet):
        b = unet(x)
    assert not torch.allclose(a, unet(x))  # train mode (batch statistics, dropout) differs from eval mode
    assert a.shape == b.shape


def test_mask_in_face_is_the_mean_inside_the_region():
    U = torch.tensor([[[[0.2, 0.8], [1.0, 0.0]]]])
    region = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    assert mask_in_face(U, region).item() == pytest.approx(0.5)
    assert mask_in_face(U, torch.zeros_like(U)).item() == 0.0


def test_step4_reestimates_at_the_end_of_every_unet_phase():
    # em_cycle 10, unet_iters 3: steps 0-3 UNet, 4-9 MoFA, 10-13 UNet, ...; step = count after the optimizer step
    assert [em_phase(s, 10, 3) for s in (0, 3, 4, 9, 10)] == ["unet", "unet", "mofa", "mofa", "unet"]
    ends = [s for s in range(1, 26) if unet_phase_ended(s, 25, 10, 3)]
    assert ends == [4, 14, 24]
    assert [s for s in range(1, 13) if unet_phase_ended(s, 12, 10, 3)] == [4, 12]  # the run ends in a UNet phase
