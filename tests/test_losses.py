"""Loss terms against hand-computed values on tiny images, empty-mask behaviour, and weight application."""
import dataclasses
import math

import pytest
import torch

from utils import losses as L

SIGMA = L.SIGMA  # the one constant; the hand-computed values below use it


def test_sigma_is_the_papers_value():
    assert L.SIGMA == pytest.approx(0.043, abs=0)  # inliers within 3 sigma = 0.129 of RGB distance


def _img(values, B=1):
    """(H, W, 3) nested list -> (B, 3, H, W) float tensor."""
    t = torch.tensor(values, dtype=torch.float32).permute(2, 0, 1)
    return t.unsqueeze(0).repeat(B, 1, 1, 1)


def _mask(values):
    return torch.tensor(values, dtype=torch.float32)[None, None]


# ---------------------------------------------------------------------------------------------- robust photometric

def test_robust_photometric_hand_computed():
    C = -1.5 * math.log(2 * math.pi) - 3 * math.log(SIGMA)
    assert C == pytest.approx(6.6828, abs=1e-3)
    I = _img([[[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]], [[0.5, 0.5, 0.5], [0.2, 0.2, 0.2]]])
    R = _img([[[0.5, 0.5, 0.5], [0.6, 0.5, 0.5]], [[0.7, 0.5, 0.5], [0.2, 0.2, 0.2]]]).requires_grad_(True)
    F = _mask([[1.0, 1.0], [1.0, 0.0]])  # last pixel matches exactly but lies outside the face
    loss, O = L.robust_photometric(I, R, F, SIGMA)
    ll_01 = C - 0.01 / (2 * SIGMA ** 2)  # distance 0.1 < 0.129: inlier; 0.2 is an outlier
    assert loss.item() == pytest.approx(-(C + ll_01) / 4, rel=1e-5)
    assert torch.equal(O, _mask([[1.0, 1.0], [0.0, 0.0]]))
    assert not O.requires_grad
    loss.backward()
    # d loss / d R at the inlier pixel (0, 1), red channel: -(1/4) * (I - R) / sigma^2
    assert R.grad[0, 0, 0, 1].item() == pytest.approx(-0.25 * (0.5 - 0.6) / SIGMA ** 2, rel=1e-4)
    assert R.grad[0, :, 1, 0].abs().sum() == 0 and R.grad[0, :, 1, 1].abs().sum() == 0


def test_inlier_mask_threshold_is_three_sigma():
    I = torch.zeros(1, 3, 1, 3)
    R = torch.zeros(1, 3, 1, 3)
    R[0, 0, 0, 0] = 0.128
    R[0, 0, 0, 1] = 0.130
    F = torch.ones(1, 1, 1, 3)
    assert L.inlier_mask(I, R, F, SIGMA).flatten().tolist() == [1.0, 0.0, 1.0]
    _, O = L.robust_photometric(I, R, F, SIGMA)
    assert torch.equal(O, L.inlier_mask(I, R, F, SIGMA))


# ---------------------------------------------------------------------------------------------- landmarks, reg, id

def test_landmark_loss_hand_computed_and_scale():
    pred = torch.zeros(1, 68, 2)
    gt = torch.zeros(1, 68, 2)
    gt[0, 0] = torch.tensor([1.0, 2.0])
    w = torch.ones(68)
    w[0] = 4.0
    assert L.landmark_loss(pred, gt, w).item() == pytest.approx(4 * 5 / 136)
    assert L.landmark_loss(pred, gt, w, scale=2.0).item() == pytest.approx(4 * 4 * 5 / 136)


def test_landmark_loss_matches_original_weights_inside_square():
    torch.manual_seed(0)
    pred, gt = torch.randn(3, 68, 2) * 10, torch.randn(3, 68, 2) * 10
    for squared, original in ((L.LANDMARK_WEIGHTS_G1, [0.2] * 17 + [0.1] * 10 + [1.0] * 41),
                              (L.LANDMARK_WEIGHTS_G2, [20.0 if j in (28, 29, 30) or j >= 60 else 1.0
                                                       for j in range(68)])):
        w = torch.tensor(original)
        expected = ((w[None, :, None] * (gt - pred)) ** 2).mean()
        assert L.landmark_loss(pred, gt, squared).item() == pytest.approx(expected.item(), rel=1e-5)


def test_landmark_loss_smaller_image_same_scene():
    torch.manual_seed(1)
    pred, gt = torch.rand(2, 68, 2) * 223, torch.rand(2, 68, 2) * 223
    full = L.landmark_loss(pred, gt, L.LANDMARK_WEIGHTS_G2)
    half = L.landmark_loss(pred / 2, gt / 2, L.LANDMARK_WEIGHTS_G2, scale=224 / 112)
    assert half.item() == pytest.approx(full.item(), rel=1e-5)


def test_coeff_regulariser_uses_actual_batch():
    shape = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    exp = torch.tensor([[3.0], [1.0]])
    tex = torch.tensor([[0.0], [2.0]])
    assert L.coeff_regulariser(shape, exp, tex).item() == pytest.approx(19 / 2 / 224)
    assert L.coeff_regulariser(shape[:1], exp[:1], tex[:1], norm=1.0).item() == pytest.approx(14.0)


def test_identity_loss_hand_computed():
    f_rec = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    f_gt = torch.tensor([[3.0, 0.0], [1.0, 0.0]])
    assert L.identity_loss(f_rec, f_gt).item() == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------- Step 3 / 4 terms

def test_masked_reconstruction_hand_computed():
    I = torch.zeros(1, 3, 1, 3)
    R = torch.zeros(1, 3, 1, 3)
    R[0, :, 0, 0] = torch.tensor([0.3, 0.4, 0.0])  # norm 0.5, M = 1
    R[0, :, 0, 1] = torch.tensor([0.0, 0.0, 1.0])  # norm 1.0, M = 0.5
    R[0, :, 0, 2] = torch.tensor([9.0, 9.0, 9.0])  # M = 0: ignored
    M = torch.tensor([1.0, 0.5, 0.0]).view(1, 1, 1, 3)
    assert L.masked_reconstruction(I, R, M).item() == pytest.approx((0.5 + 0.5) / 1.5, rel=1e-5)
    # a mask sum below 1 is floored at 1
    assert L.masked_reconstruction(I, R, M * 0.2).item() == pytest.approx(0.2 * 1.0, rel=1e-5)


def test_area_loss_hand_computed():
    F = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]).view(2, 1, 2, 2)
    U = torch.tensor([[0.5, 1.0, 0.0, 0.0], [0.3, 0.3, 0.3, 0.3]]).view(2, 1, 2, 2)
    assert L.area_loss(F, U).item() == pytest.approx((0.5 / 2 + 0.0) / 2)


def test_binary_loss_hand_computed():
    M = torch.tensor([0.0, 1.0, 0.5, 0.25]).view(1, 1, 2, 2)
    assert L.binary_loss(M).item() == pytest.approx(0.5 - (0.5 + 0.5 + 0 + 0.25) / 4)


def test_neighbour_loss_hand_computed_3x3():
    I = torch.zeros(1, 3, 3, 3)
    I[0, 0, 0, 0] = 0.9
    R = torch.zeros(1, 3, 3, 3)
    R[0, 0, 1, 1] = 1.0
    M = torch.ones(1, 1, 3, 3)
    assert L.neighbour_loss(M, R, I, radius=1).item() == pytest.approx(0.1, abs=1e-5)
    M[0, 0, 1, 1] = 0.5  # src = 0.5; best match is the 0.9 corner: |0.5 - 0.9| = 0.4
    assert L.neighbour_loss(M, R, I, radius=1).item() == pytest.approx(0.4, abs=1e-5)


def _neighbour_reference(M, R, I, r):
    B, _, H, W = I.shape
    vals = []
    for b in range(B):
        for y in range(r, H - r):
            for x in range(r, W - r):
                src = M[b, 0, y, x] * R[b, :, y, x]
                vals.append(min(torch.linalg.vector_norm(src - M[b, 0, y + dy, x + dx] * I[b, :, y + dy, x + dx])
                                for dy in range(-r, r + 1) for dx in range(-r, r + 1)))
    return torch.stack(vals).mean()


@pytest.mark.parametrize("radius", [1, 2])
def test_neighbour_loss_matches_loop_reference(radius):
    torch.manual_seed(2)
    M, R, I = torch.rand(2, 1, 6, 7), torch.rand(2, 3, 6, 7), torch.rand(2, 3, 6, 7)
    got = L.neighbour_loss(M, R, I, radius=radius)
    assert got.item() == pytest.approx(_neighbour_reference(M, R, I, radius).item(), abs=1e-5)


def test_neighbour_loss_tolerates_one_pixel_shift():
    torch.manual_seed(3)
    I = torch.rand(1, 3, 8, 8)
    R = torch.roll(I, shifts=1, dims=3)  # render misaligned by one pixel
    M = torch.ones(1, 1, 8, 8)
    assert L.neighbour_loss(M, R, I, radius=1).item() < 1e-5
    assert L.masked_reconstruction(I, R, M).item() > 0.1


def test_neighbour_loss_rejects_too_small_image():
    with pytest.raises(ValueError, match="interior"):
        L.neighbour_loss(torch.ones(1, 1, 4, 4), torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), radius=2)


def test_feature_cosine_loss_hand_computed():
    fa = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).view(1, 2, 1, 2)  # pixel 0: (1, 0), pixel 1: (1, 0)
    fb = torch.tensor([[2.0, 0.0], [0.0, 3.0]]).view(1, 2, 1, 2)  # pixel 0: (2, 0), pixel 1: (0, 3)
    assert L.feature_cosine_loss(fa, fb).item() == pytest.approx(0.5)


def test_unet_bce_applies_sigmoid_once():
    logits = torch.tensor([2.0, 0.0]).view(1, 1, 1, 2)
    target = torch.tensor([0.25, 0.3]).view(1, 1, 1, 2)
    s = torch.sigmoid(torch.tensor(2.0)).item()
    expected = (-(0.25 * math.log(s) + 0.75 * math.log(1 - s)) + math.log(2)) / 2
    assert L.unet_bce_loss(logits, target).item() == pytest.approx(expected, rel=1e-5)
    assert L.unet_bce_loss(torch.full((1, 1, 2, 2), 30.0), torch.ones(1, 1, 2, 2)).item() < 1e-6


# ---------------------------------------------------------------------------------------------- empty masks

def test_empty_masks_give_finite_values_and_gradients():
    torch.manual_seed(4)
    I = torch.rand(2, 3, 8, 8)
    R = I.clone().requires_grad_(True)  # I == R everywhere: the norms sit at 0
    zero = torch.zeros(2, 1, 8, 8)
    U = torch.zeros(2, 1, 8, 8, requires_grad=True)
    fa = torch.zeros(2, 4, 5, 5, requires_grad=True)
    fb = torch.zeros(2, 4, 5, 5, requires_grad=True)
    terms = {
        "photo": L.robust_photometric(I, R, zero)[0],
        "rec": L.masked_reconstruction(I, R, zero * U),
        "rec_full": L.masked_reconstruction(I, R, torch.ones_like(zero)),
        "area": L.area_loss(zero, U),
        "binary": L.binary_loss(zero * U),
        "neighbour": L.neighbour_loss(zero * U, R, I, radius=2),
        "cos": L.feature_cosine_loss(fa, fb),
    }
    for name, value in terms.items():
        assert torch.isfinite(value), name
    assert terms["photo"].item() == 0.0 and terms["rec"].item() == 0.0 and terms["area"].item() == 0.0
    sum(terms.values()).backward()
    for t in (R, U, fa, fb):
        assert torch.isfinite(t.grad).all()


# ---------------------------------------------------------------------------------------------- weights

def test_weighted_sum_applies_each_weight_once():
    terms = {name: torch.tensor(float(v), requires_grad=True)
             for name, v in (("photo", 1), ("reg", 2), ("landmark", 3), ("identity", 4))}
    w = L.Step1Weights()
    total = L.weighted_sum(terms, w)
    assert total.item() == pytest.approx(0.5 * 1 + 0.1 * 2 + 5e-4 * 3 + 0.25 * 4)
    total.backward()
    for name, t in terms.items():
        assert t.grad.item() == pytest.approx(getattr(w, name))


def test_weighted_sum_skips_none_and_rejects_wrong_names():
    w = L.Step4MoFAWeights.g1()
    terms = {"rec": torch.tensor(1.0), "identity": None, "reg": torch.tensor(1.5), "landmark": torch.tensor(2.0),
             "area": torch.tensor(1.0)}
    assert L.weighted_sum(terms, w).item() == pytest.approx(4.0 + 0.01 + 0.02 + 0.5)
    with pytest.raises(ValueError, match="missing terms \\['area'\\]"):
        L.weighted_sum({k: v for k, v in terms.items() if k != "area"}, w)
    with pytest.raises(ValueError, match="unknown terms \\['photo'\\]"):
        L.weighted_sum({**terms, "photo": torch.tensor(1.0)}, w)
    with pytest.raises(ValueError, match="every term is None"):
        L.weighted_sum({k: None for k in terms}, w)


def test_weight_dataclasses_are_frozen_and_g1_differs():
    w = L.Step4UNetWeights()
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.binary = 1.0  # type: ignore[misc]
    assert L.Step4UNetWeights.g1().preserve == 10 * w.preserve
    assert L.Step1Weights.g1().reg != L.Step1Weights().reg
