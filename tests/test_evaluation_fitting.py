"""Test-time fitting in the evaluation and reconstruct.py (issue 18 item 4): --fit_steps 0 is the feed-forward network
exactly; N > 0 moves the coefficients towards the image's landmarks and never a network weight; fitted results are
labelled <stage>_fit<N>, so the paper-protocol rows stay feed-forward."""
from __future__ import annotations

import json

import pytest
import torch

import reconstruct
from tests.evaluate_segmentation import main
from tests.test_evaluation import (
    make_checkpoints,
    make_image_root,
    mean_face_render,
    read_rows,
    run_eval,
    tiny_spec,
)
from tests.test_mesh_io import ckpt, run  # noqa: F401  (the reconstruct.py fixture)
from utils import cli
from utils.data.image_io import read_mask
from utils.evaluation.stages import FitSetting, load_stage, predict_masks, stage_label
from utils.landmarks_csv import write_landmarks_csv


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bfm_h5) -> dict:
    base = tmp_path_factory.mktemp("evaluation_fitting")
    face_model, spec = make_checkpoints(base / "save", tiny_bfm_h5)
    make_image_root(base / "root", face_model, spec)
    return {"save_root": base / "save", "img_path": base / "root", "bfm": tiny_bfm_h5, "face_model": face_model,
            "spec": spec}


def weights(*nets) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v.clone() for i, net in enumerate(nets) if net is not None
            for k, v in net.state_dict().items()}


@pytest.mark.parametrize("stage", ["step2", "step4"])
def test_fitting_moves_the_coefficients_to_the_landmarks_and_no_weight(setup, stage):
    """The untrained encoder predicts the mean face; the landmarks say the face sits 2 px to the right. Zero steps
    give the feed-forward result bit for bit; ten steps bring the fitted landmarks closer, weights untouched."""
    mofa, unet, _ = load_stage(stage, setup["save_root"], setup["face_model"], torch.device("cpu"))
    images = mean_face_render(setup["face_model"], setup["spec"]).image.clamp(0, 1)
    with torch.no_grad():
        target = mofa(images).landmarks + torch.tensor([2.0, 0.0])
    before = weights(mofa, unet)
    plain = predict_masks(stage, mofa, unet, images)
    zero = predict_masks(stage, mofa, unet, images, fit=FitSetting(0), landmarks=target)
    assert torch.equal(plain[0], zero[0]) and torch.equal(plain[2].coeffs, zero[2].coeffs)
    est, region, out = predict_masks(stage, mofa, unet, images, fit=FitSetting(10), landmarks=target)

    def error(render) -> float:
        return float((render.landmarks - target).norm(dim=-1).mean())

    assert error(out) < error(plain[2]) - 0.2, (error(out), error(plain[2]))  # the image pulls back: 2.0 -> 1.6
    assert not torch.equal(out.coeffs, plain[2].coeffs) and est.shape == region.shape == plain[0].shape
    after = weights(mofa, unet)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for net in (mofa, unet) if net is not None for p in net.parameters())
    with pytest.raises(ValueError, match="landmarks"):
        predict_masks(stage, mofa, unet, images, fit=FitSetting(3))


def test_the_command_labels_fitted_results_and_keeps_fit_steps_0_feed_forward(setup, tmp_path):
    plain = run_eval(setup, tmp_path / "plain", "--stage", "step2")
    zero = run_eval(setup, tmp_path / "zero", "--stage", "step2", "--fit_steps", "0")
    fitted = run_eval(setup, tmp_path / "fit", "--stage", "step2", "--fit_steps", "3", "--fit_lr", "0.02")
    assert plain["stage"] == zero["stage"] == "step2" and fitted["stage"] == stage_label("step2", 3) == "step2_fit3"
    assert read_rows(tmp_path / "plain") == read_rows(tmp_path / "zero")
    assert read_rows(tmp_path / "fit") != read_rows(tmp_path / "plain")
    assert (fitted["settings"]["fit_steps"], fitted["settings"]["fit_lr"]) == (3, 0.02)
    assert json.loads((tmp_path / "fit" / "summary.json").read_text())["stage"] == "step2_fit3"
    assert "step2_fit3" in (tmp_path / "fit" / "summary.md").read_text()


def test_fit_oracle_and_bad_fit_flags_are_one_line_before_any_work(setup, tmp_path, capsys):
    base = ["--img_path", str(setup["img_path"]), "--save_root", str(setup["save_root"]), "--bfm",
            str(setup["bfm"]), "--device", "cpu", "--out", str(tmp_path / "o")]
    for extra, expected in ((["--stage", "fit_oracle", "--fit_steps", "2"], "no network to fit"),
                            (["--fit_steps", "-1"], "--fit_steps"), (["--fit_lr", "0"], "--fit_lr")):
        with pytest.raises(SystemExit) as exc:
            cli.cli_main(main, base + extra)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_reconstruct_fits_with_the_landmarks_and_needs_them(ckpt, tmp_path, capsys):  # noqa: F811
    with torch.no_grad():
        lms = mean_face_render(ckpt["face_model"], tiny_spec(ckpt["face_model"])).landmarks[0].numpy()
    write_landmarks_csv(tmp_path / "lm.csv", [("face.png", lms + [2.0, 0.0])])
    argv = ["--image", str(ckpt["base"] / "face.png"), "--checkpoint", str(tmp_path / "missing.pt"),
            "--out", str(tmp_path / "x"), "--bfm", str(ckpt["bfm"]), "--device", "cpu", "--fit_steps", "2"]
    with pytest.raises(SystemExit) as exc:
        cli.cli_main(reconstruct.main, argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "--landmarks" in err and len(err.splitlines()) == 1, err  # not the checkpoint
    for bad in (["--fit_steps", "-1"], ["--fit_steps", "2", "--fit_lr", "0"]):  # check_flags, before the checkpoint
        with pytest.raises(SystemExit) as exc:
            cli.cli_main(reconstruct.main, argv[:-2] + bad + ["--landmarks", str(tmp_path / "lm.csv")])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and bad[-2] in err and len(err.splitlines()) == 1, err
    run(ckpt, tmp_path / "plain", "--landmarks", str(tmp_path / "lm.csv"), step=1)
    run(ckpt, tmp_path / "fit", "--landmarks", str(tmp_path / "lm.csv"), "--fit_steps", "10", step=1)
    assert (tmp_path / "fit" / "face.obj").read_bytes() != (tmp_path / "plain" / "face.obj").read_bytes()
    assert not torch.equal(torch.from_numpy(read_mask(tmp_path / "fit" / "face_mask.png")),
                           torch.from_numpy(read_mask(tmp_path / "plain" / "face_mask.png")))



def test_a_stage_with_a_unet_fits_with_its_unet_and_step2_without(setup, monkeypatch):
    """The wiring to utils/fitting.py (whose tests check the terms): step2 fits with Step 1's terms (no UNet), step3
    and step4 with Step 4's MoFA-phase terms and the stage's own UNet; the learning rate and preset are passed on."""
    import utils.evaluation.stages as stages

    seen, real = [], stages.fit_images
    # record the call, then fit with G2 (the preset passed is a marker object)
    monkeypatch.setattr(stages, "fit_images", lambda *a, **k: seen.append((a, k)) or real(*a[:5], None, **k))
    images = mean_face_render(setup["face_model"], setup["spec"]).image.clamp(0, 1)
    preset = object()
    for stage in ("step2", "step3", "step4"):
        mofa, unet, _ = load_stage(stage, setup["save_root"], setup["face_model"], torch.device("cpu"))
        with torch.no_grad():
            target = mofa(images).landmarks
        predict_masks(stage, mofa, unet, images, fit=FitSetting(1, 0.03, preset), landmarks=target)
        args, kwargs = seen[-1]
        assert args[0] is mofa and args[3:6] == (1, 0.03, preset) and kwargs["unet"] is (None if stage == "step2"
                                                                                          else unet)
