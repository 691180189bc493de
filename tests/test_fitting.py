"""Test-time fitting (utils/fitting.py): per-image, coefficients only, better fits, the --fit_steps flags."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from models.face_model import FaceModel
from models.layout import CoeffLayout
from utils.fitting import add_fit_args, fit_coefficients, fit_images
from utils.training.builders import build_mofa, build_unet
from utils.training.flags import FlagError, check_flags

SIZE = 32


@pytest.fixture(scope="module")
def scene(demo_bfm_h5):
    """A MoFA (random encoder), a UNet, and 4 noisy images rendered from known coefficients with an occluding
    block, their true landmarks, and a perturbed start."""
    face_model = FaceModel.from_h5(demo_bfm_h5, CoeffLayout())
    layout = CoeffLayout()
    spec = {"encoder": "resnet18", "image_size": SIZE, "camera": "g2", "unet_width": 4,
            "layout": {"n_shape": layout.n_shape, "n_exp": layout.n_exp, "n_tex": layout.n_tex}}
    torch.manual_seed(0)
    mofa, unet = build_mofa(spec, face_model).eval(), build_unet(spec).eval()
    gen = torch.Generator().manual_seed(1)
    true = torch.zeros(4, layout.total)
    true[:, layout.slice("shape")] = torch.randn(4, layout.n_shape, generator=gen) * 0.5
    true[:, layout.slice("angles")] = torch.randn(4, 3, generator=gen) * 0.1
    with torch.no_grad():
        truth = mofa.renderer(true)
    background = torch.rand(4, 3, SIZE, SIZE, generator=gen)
    images = truth.image * truth.mask + background * (1 - truth.mask)
    # noise: where the render matched the image to float precision, the L2,1 norm's gradient direction (I - R) / |I - R|
    # would be rounding noise, which Adam's normalised steps amplify
    images = images + 0.05 * torch.randn(images.shape, generator=gen)
    images[:, :, 6:12, 10:20] = 0.2  # an occluder
    start = true.clone()
    start[:, layout.slice("angles")] += torch.randn(4, 3, generator=gen) * 0.1
    start[:, layout.slice("trans")] += torch.randn(4, 3, generator=gen) * torch.tensor([2.0, 2.0, 0.0])
    return {"mofa": mofa, "unet": unet, "images": images.clamp(0, 1), "landmarks": truth.landmarks, "start": start}


def _landmark_error(out, landmarks):
    return (out.landmarks - landmarks).norm(dim=-1).mean().item()


@pytest.mark.parametrize("with_unet", [False, True])
def test_a_batch_fits_each_image_as_if_it_were_alone(scene, with_unet):
    unet = scene["unet"] if with_unet else None
    args = (scene["images"], scene["landmarks"])
    batch = fit_coefficients(scene["mofa"].renderer, scene["start"], *args, steps=6, unet=unet)
    for b in range(4):
        alone = fit_coefficients(scene["mofa"].renderer, scene["start"][b:b + 1], args[0][b:b + 1],
                                 args[1][b:b + 1], steps=6, unet=unet)
        torch.testing.assert_close(batch.coeffs[b:b + 1], alone.coeffs, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(batch.coeffs, scene["start"])
    assert (batch.unet_mask is not None) == with_unet


def test_the_unet_mask_is_re_predicted_at_every_step(scene):
    calls = []
    hook = scene["unet"].register_forward_hook(lambda *_: calls.append(1))
    try:
        result = fit_coefficients(scene["mofa"].renderer, scene["start"], scene["images"], scene["landmarks"],
                                  steps=3, unet=scene["unet"])
    finally:
        hook.remove()
    assert len(calls) == 4  # one per step, one for the final mask
    with torch.no_grad():
        expected = torch.sigmoid(scene["unet"](torch.cat([result.out.image, scene["images"]], 1)))
    torch.testing.assert_close(result.unet_mask, expected)


@pytest.mark.parametrize("with_unet", [False, True])
def test_fitting_moves_the_coefficients_only_and_improves_the_fit(scene, with_unet):
    mofa, unet = scene["mofa"], scene["unet"] if with_unet else None
    before = {name: p.detach().clone() for name, p in [*mofa.named_parameters(), *scene["unet"].named_parameters()]}
    mofa.train()  # the fit does not change the training mode of what it is given (see the test below)
    start = fit_coefficients(mofa.renderer, scene["start"], scene["images"], scene["landmarks"], steps=0)
    with torch.no_grad():  # callers inside no_grad (Step 2, the evaluation) get a fit too
        fitted = fit_coefficients(mofa.renderer, scene["start"], scene["images"], scene["landmarks"], steps=40,
                                  lr=0.02, unet=unet)
    assert mofa.training and not scene["unet"].training
    mofa.eval()
    for name, p in [*mofa.named_parameters(), *scene["unet"].named_parameters()]:
        assert p.grad is None, name
        assert torch.equal(p, before[name]), name
    torch.testing.assert_close(start.coeffs, scene["start"])
    assert _landmark_error(fitted.out, scene["landmarks"]) < 0.6 * _landmark_error(start.out, scene["landmarks"])
    assert not fitted.coeffs.requires_grad and fitted.steps == 40


def test_fit_images_starts_from_the_encoder_and_zero_steps_is_the_feed_forward_network(scene):
    mofa = scene["mofa"]
    result = fit_images(mofa, scene["images"], scene["landmarks"], steps=0)
    with torch.no_grad():
        torch.testing.assert_close(result.coeffs, mofa.encoder(scene["images"]))
        torch.testing.assert_close(result.out.image, mofa(scene["images"]).image)
    assert result.unet_mask is None
    with_unet = fit_images(mofa, scene["images"], scene["landmarks"], steps=0, unet=scene["unet"])
    assert with_unet.unet_mask.shape == (4, 1, SIZE, SIZE)


def test_fit_images_restores_the_training_modes(scene):
    """The fit runs the encoder and the UNet in eval mode (per-image BatchNorm statistics) and gives each network
    back in the mode it was in."""
    mofa, unet = scene["mofa"], scene["unet"]
    mofa.train()
    unet.train()
    try:
        fit_images(mofa, scene["images"][:1], scene["landmarks"][:1], steps=1, unet=unet)
        assert mofa.encoder.training and unet.training
    finally:
        mofa.eval()
        unet.eval()


def test_an_image_whose_fit_diverges_keeps_its_last_finite_coefficients(scene):
    """One image's objective turns non-finite (its landmarks are NaN): it keeps the coefficients it started from,
    and the other images are fitted exactly as they would be without it."""
    landmarks = scene["landmarks"].clone()
    landmarks[1] = float("nan")
    args = (scene["mofa"].renderer, scene["start"], scene["images"])
    fitted = fit_coefficients(*args, landmarks, steps=5)
    assert torch.isfinite(fitted.coeffs).all()
    torch.testing.assert_close(fitted.coeffs[1], scene["start"][1])
    clean = fit_coefficients(*args, scene["landmarks"], steps=5)
    torch.testing.assert_close(fitted.coeffs[[0, 2, 3]], clean.coeffs[[0, 2, 3]], atol=2e-5, rtol=1e-4)


def test_fit_flags():
    parser = argparse.ArgumentParser()
    add_fit_args(parser)
    args = parser.parse_args([])
    assert args.fit_steps == 0 and args.fit_lr == 0.05
    assert parser.parse_args(["--fit_steps", "20", "--fit_lr", "0.02"]).fit_steps == 20
    check_flags(parser.parse_args(["--fit_steps", "0", "--fit_lr", "1e-3"]))
    for bad in (["--fit_steps", "-1"], ["--fit_lr", "0"], ["--fit_lr", "nan"], ["--fit_lr", "inf"]):
        with pytest.raises(FlagError, match=bad[0]):  # the one range check of numeric flags
            check_flags(parser.parse_args(bad))
    with pytest.raises(SystemExit):
        parser.parse_args(["--fit_steps", "x"])


def test_step2_writes_the_masks_of_the_fitted_coefficients(tmp_path, demo_bfm_h5):
    import Step2_UNet_trainset_generation as step2
    from tests.step_inputs import common_args, step4_inputs
    from utils import losses
    from utils.data.datasets import FaceDataset
    from utils.data.image_io import read_mask
    from utils.data.unet_trainset import stem_for
    from utils.fitting import checkpoint_preset
    from utils.training.builders import load_mofa, step_dir

    inputs = step4_inputs(tmp_path, demo_bfm_h5)
    args = common_args(inputs["root"], demo_bfm_h5, inputs["save"]) + ["--splits", "train", "--batch_size", "5"]
    masks = {}
    for steps in (0, 3):
        assert step2.main(args + ["--fit_steps", str(steps), "--fit_lr", "0.05", "--overwrite"]) == 0
        masks[steps] = {p.name: read_mask(p) for p in step_dir(inputs["save"], 2).rglob("*_mask.png")}
    assert masks[0].keys() == masks[3].keys() and len(masks[0]) == 12
    assert any(not np.array_equal(masks[0][k], masks[3][k]) for k in masks[0])
    face_model = FaceModel.from_h5(demo_bfm_h5, CoeffLayout())
    mofa, payload, _ = load_mofa(step_dir(inputs["save"], 1) / "final.pt", face_model, torch.device("cpu"))
    dataset = FaceDataset(inputs["root"], "train", SIZE, test_mode=True)
    items = [dataset[i] for i in range(5)]  # the first batch
    images, landmarks = torch.stack([it["image"] for it in items]), torch.stack([it["landmarks"] for it in items])
    out = fit_images(mofa, images, landmarks, 3, 0.05, checkpoint_preset(payload)).out
    expected = losses.inlier_mask(images, out.image, out.mask)
    for item, mask in zip(items, expected):
        written = masks[3][stem_for(item["filename"]).rsplit("/", 1)[-1] + "_mask.png"]
        assert np.mean(written == mask[0].numpy()) > 0.999
