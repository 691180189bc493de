"""utils/training/objectives.py on hand-made tensors: which tensor feeds which loss term.

M = F * U (rendered region times UNet mask); the image I and the render R are compared under M; the identity network
sees the render with the PREDICTED landmarks and the image with the GT landmarks; landmark errors are scaled to the
224-pixel frame. Every input differs from the others, so feeding a term the wrong tensor changes its value.
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from models.layout import CoeffLayout
from utils import losses
from utils.training.objectives import LossSetup, step1_terms, step4_mofa_terms, step4_unet_terms, unet_mask

B, S = 2, 16


class RecordingIdentity:
    """Stands in for the ArcFace encoder: deterministic outputs that depend on both arguments; records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def __call__(self, images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        self.calls.append(("embed", images, landmarks))
        return torch.cat([images.mean(dim=(2, 3)), landmarks.mean(dim=1), images[:, :1, :4, :4].flatten(1)], 1)

    def shallow(self, images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        self.calls.append(("shallow", images, landmarks))
        return images[:, :, ::2, ::2] * (1.0 + landmarks[:, :1, :1, None]) + images[:, :, 1::2, 1::2]


@pytest.fixture
def case() -> dict:
    gen = torch.Generator().manual_seed(0)
    layout = CoeffLayout()
    F = torch.zeros(B, 1, S, S)
    F[:, :, 3:13, 2:14] = 1.0
    out = SimpleNamespace(image=torch.rand(B, 3, S, S, generator=gen) * F, mask=F,
                          landmarks=torch.rand(B, 68, 2, generator=gen) * S,
                          coeffs=torch.randn(B, layout.total, generator=gen))
    return {"out": out, "I": torch.rand(B, 3, S, S, generator=gen), "U": torch.rand(B, 1, S, S, generator=gen),
            "gt": torch.rand(B, 68, 2, generator=gen) * S,
            "setup": LossSetup.from_preset(losses.PRESETS["g2"], layout, S), "layout": layout}


def _calls(identity: RecordingIdentity) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    return identity.calls


def _same_calls(actual, expected) -> bool:
    return len(actual) == len(expected) and all(
        a[0] == e[0] and torch.equal(a[1], e[1]) and torch.equal(a[2], e[2]) for a, e in zip(actual, expected))


def test_step4_unet_phase_terms(case):
    out, I, U, gt, setup = case["out"], case["I"], case["U"], case["gt"], case["setup"]
    identity = RecordingIdentity()
    terms = step4_unet_terms(U, out, I, gt, setup, identity)
    M = out.mask * U
    assert set(terms) == {f.name for f in dataclasses.fields(losses.Step4UNetWeights)}
    torch.testing.assert_close(terms["binary"], losses.binary_loss(M))
    torch.testing.assert_close(terms["area"], losses.area_loss(out.mask, U))
    torch.testing.assert_close(terms["neighbour"], losses.neighbour_loss(M, out.image, I, radius=2))
    assert not torch.allclose(terms["neighbour"], losses.neighbour_loss(M, I, out.image, radius=2))
    inputs = ((I, gt), (I * M, gt), (out.image * M, out.landmarks))  # phi(I), phi(I M), phi(R M)
    assert _same_calls(_calls(identity), [("shallow", x, lm) for x, lm in inputs])
    phi_i, phi_im, phi_rm = (identity.shallow(x, lm) for x, lm in inputs)
    torch.testing.assert_close(terms["preserve"], losses.feature_cosine_loss(phi_i, phi_im))
    torch.testing.assert_close(terms["dist"], losses.feature_cosine_loss(phi_rm, phi_im))
    without = step4_unet_terms(U, out, I, gt, setup, None)
    assert without["preserve"] is None and without["dist"] is None


def test_neighbour_window_follows_the_preset(case):
    out, I, U, gt = case["out"], case["I"], case["U"], case["gt"]
    g1 = LossSetup.from_preset(losses.PRESETS["g1_weights"], case["layout"], S)
    torch.testing.assert_close(step4_unet_terms(U, out, I, gt, g1)["neighbour"],
                               losses.neighbour_loss(out.mask * U, out.image, I, radius=1))


def test_step4_mofa_phase_terms(case):
    out, I, U, gt, setup, layout = case["out"], case["I"], case["U"], case["gt"], case["setup"], case["layout"]
    I = I.clone().requires_grad_(True)
    out.image = out.image.clone().requires_grad_(True)
    identity = RecordingIdentity()
    terms = step4_mofa_terms(U, out, I, gt, setup, identity)
    assert set(terms) == {f.name for f in dataclasses.fields(losses.Step4MoFAWeights)}
    torch.testing.assert_close(terms["rec"], losses.masked_reconstruction(I, out.image, out.mask * U))
    assert not torch.allclose(terms["rec"], losses.masked_reconstruction(I, out.image, U))
    torch.testing.assert_close(terms["area"], losses.area_loss(out.mask, U))
    parts = layout.split(out.coeffs)
    torch.testing.assert_close(terms["reg"], losses.coeff_regulariser(parts.shape, parts.exp, parts.tex))
    assert _same_calls(_calls(identity), [("embed", out.image, out.landmarks), ("embed", I, gt)])
    expected = losses.identity_loss(identity(out.image, out.landmarks), identity(I, gt))
    torch.testing.assert_close(terms["identity"], expected)
    terms["identity"].backward()
    assert out.image.grad.abs().sum() > 0, "the identity loss must reach the render"
    assert I.grad is None or not I.grad.any(), "the identity target (the image) must not receive gradients"


def test_landmark_term_compares_predicted_with_gt_in_the_224_frame(case):
    out, I, U, setup = case["out"], case["I"], case["U"], case["setup"]
    assert setup.landmark_scale == 224.0 / S
    gt = out.landmarks.clone()
    gt[0, 30, 0] += 1.0  # one pixel off at the nose tip (G2 weight 20^2), one pixel off on the jaw (weight 1)
    gt[1, 3, 1] -= 1.0
    expected = (losses.LANDMARK_WEIGHTS_G2[30] + losses.LANDMARK_WEIGHTS_G2[3]) * (224.0 / S) ** 2 / (B * 68 * 2)
    for terms in (step4_mofa_terms(U, out, I, gt, setup), step1_terms(out, I, gt, setup)[0]):
        assert float(terms["landmark"]) == pytest.approx(expected, rel=1e-5)


def test_step1_terms(case):
    out, I, gt, setup = case["out"], case["I"], case["gt"], case["setup"]
    identity = RecordingIdentity()
    terms, inliers = step1_terms(out, I, gt, setup, identity)
    assert set(terms) == {f.name for f in dataclasses.fields(losses.Step1Weights)}
    photo, expected_inliers = losses.robust_photometric(I, out.image, out.mask, sigma=setup.sigma)
    torch.testing.assert_close(terms["photo"], photo)
    assert torch.equal(inliers, expected_inliers)
    assert _same_calls(_calls(identity), [("embed", out.image, out.landmarks), ("embed", I, gt)])
    assert step1_terms(out, I, gt, setup)[0]["identity"] is None


def test_unet_input_is_render_then_image(case):
    out, I = case["out"], case["I"]
    seen = []

    def unet(x: torch.Tensor) -> torch.Tensor:
        seen.append(x)
        return x[:, :1] - x[:, 3:4]

    U = unet_mask(unet, out, I)
    assert torch.equal(seen[0], torch.cat([out.image, I], dim=1))
    assert U.shape == (B, 1, S, S) and float(U.min()) > 0 and float(U.max()) < 1


def test_skipped_terms_are_not_computed(case):
    """A term weighted 0 (--drop_terms) is None and costs nothing: with preserve skipped and dist kept, the identity
    network sees only phi(I M) and phi(R M); with both skipped it is never called. The other terms are unchanged."""
    out, I, U, gt, setup = case["out"], case["I"], case["U"], case["gt"], case["setup"]
    full = step4_unet_terms(U, out, I, gt, setup, RecordingIdentity())
    identity = RecordingIdentity()
    terms = step4_unet_terms(U, out, I, gt, setup, identity, frozenset({"preserve"}))
    M = out.mask * U
    assert terms["preserve"] is None and [call[0] for call in identity.calls] == ["shallow", "shallow"]
    assert torch.equal(identity.calls[0][1], I * M) and torch.equal(identity.calls[1][1], out.image * M)
    for name in ("binary", "area", "dist", "neighbour"):
        torch.testing.assert_close(terms[name], full[name])
    identity = RecordingIdentity()
    terms = step4_unet_terms(U, out, I, gt, setup, identity, frozenset({"preserve", "dist", "neighbour"}))
    assert identity.calls == [] and terms["neighbour"] is None and terms["preserve"] is None
    mofa = step4_mofa_terms(U, out, I, gt, setup, RecordingIdentity(), frozenset({"identity", "reg"}))
    assert mofa["identity"] is None and mofa["reg"] is None and mofa["rec"] is not None
    assert step1_terms(out, I, gt, setup, RecordingIdentity(), frozenset({"identity"}))[0]["identity"] is None


def test_zero_weight_terms_names_the_dropped_terms():
    from utils.training.objectives import zero_weight_terms
    preset = losses.PRESETS["g2"].without(["dist", "identity"])
    assert zero_weight_terms(preset.step4_unet) == {"dist"}
    assert zero_weight_terms(preset.step4_mofa) == {"identity"}
    assert zero_weight_terms(losses.PRESETS["g2"].step1) == frozenset()


def test_identity_alignment_gives_the_predicted_landmarks_no_gradient(case):
    """As G2 (its util/preprocess.py warps with detached landmarks): the predicted landmarks only place the
    render's identity crop. The identity term (Steps 1 and 4) and the dist term train the render's pixels, never
    the landmarks; the landmark loss is the only term that moves them."""
    out = case["out"]
    image = out.image.clone().requires_grad_(True)
    landmarks = out.landmarks.clone().requires_grad_(True)
    out = SimpleNamespace(image=image, mask=out.mask, landmarks=landmarks, coeffs=out.coeffs)
    identity = RecordingIdentity()
    for name, term in (("step1 identity", step1_terms(out, case["I"], case["gt"], case["setup"], identity)[0]
                        ["identity"]),
                       ("step4 identity", step4_mofa_terms(case["U"], out, case["I"], case["gt"], case["setup"],
                                                           identity)["identity"]),
                       ("step4 dist", step4_unet_terms(case["U"], out, case["I"], case["gt"], case["setup"],
                                                       identity)["dist"])):
        image.grad = landmarks.grad = None
        term.backward()
        assert landmarks.grad is None, f"{name}: the predicted landmarks got a gradient through the alignment"
        assert image.grad is not None and image.grad.abs().sum() > 0, f"{name}: the render got no gradient"
