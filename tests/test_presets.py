"""The G1 and G2 values behind --loss_preset (docs/method.md §8.1, §8.3, §10), and the one switch that picks them."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import Step1_Pretrain_MoFA as step1
import Step4_UNet_MoFA_EM as step4
from models.layout import CoeffLayout
from utils import cli, losses
from utils.training import flags
from utils.training.objectives import LossSetup


def _values(weights) -> dict:
    return dataclasses.asdict(weights)


def test_g1_weights_of_every_dataclass():
    g1 = losses.PRESETS["g1_weights"]
    assert _values(g1.step1) == {"photo": 0.5, "reg": 0.01, "landmark": 0.01, "identity": 0.25}
    assert _values(g1.step4_unet) == {"binary": 10.0, "area": 0.5, "preserve": 2.5, "dist": 3.0, "neighbour": 15.0}
    assert _values(g1.step4_mofa) == {"rec": 4.0, "identity": 0.5, "reg": pytest.approx(0.01 / 1.5),
                                      "landmark": 0.01, "area": 0.5}
    assert g1.step1 == losses.Step1Weights.g1() and g1.step4_unet == losses.Step4UNetWeights.g1()
    assert g1.step4_mofa == losses.Step4MoFAWeights.g1()
    assert g1.neighbour_radius == 1 and g1.step4_lr_scale == 1.0
    # jaw 0.2, brows 0.1, the rest 1, applied inside the square in the original: squared here
    assert g1.landmark_weights == pytest.approx([0.04] * 17 + [0.01] * 10 + [1.0] * 41)


def test_g2_weights_are_the_defaults():
    g2 = losses.PRESETS["g2"]
    assert _values(g2.step1) == {"photo": 0.5, "reg": 0.1, "landmark": 5e-4, "identity": 0.25}
    assert _values(g2.step4_unet) == {"binary": 10.0, "area": 0.5, "preserve": 0.25, "dist": 3.0, "neighbour": 15.0}
    assert _values(g2.step4_mofa) == {"rec": 0.5, "identity": 0.25, "reg": 0.1, "landmark": 5e-4, "area": 0.06}
    assert (g2.step1, g2.step4_unet, g2.step4_mofa) == (losses.Step1Weights(), losses.Step4UNetWeights(),
                                                        losses.Step4MoFAWeights())
    assert g2.neighbour_radius == 2 and g2.step4_lr_scale == 0.8
    heavy = [j for j, w in enumerate(g2.landmark_weights) if w == 400.0]
    assert heavy == [28, 29, 30, *range(60, 68)] and sum(w == 1.0 for w in g2.landmark_weights) == 68 - 11


def test_steps_1_and_4_take_the_same_preset_flag():
    for module in (step1, step4):
        assert module.parse_args(["--img_path", "x"]).loss_preset == "g2"
        args = module.parse_args(["--img_path", "x", "--loss_preset", "g1_weights"])
        assert args.loss_preset == "g1_weights" and flags.loss_preset(args) == losses.PRESETS["g1_weights"]
    assert set(losses.PRESETS) == {"g2", "g1_weights"}


@pytest.mark.parametrize("module", [step1, step4])
def test_the_old_g1_preset_name_gives_one_line_naming_the_new_one(tmp_path, module, capsys):
    """``g1`` claimed G1's Step 4, but only G1's weights are taken: the name is g1_weights, and the old name says
    so in one line (exit 2) before anything is written."""
    argv = ["--img_path", str(tmp_path), "--save_root", str(tmp_path / "save"), "--loss_preset", "g1"]
    with pytest.raises(SystemExit) as exc:
        cli.cli_main(module.main, argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1, err
    assert "g1_weights" in err and "only G1's loss weights" in err
    assert not (tmp_path / "save").exists()
    with pytest.raises(flags.FlagError, match="the presets are g2, g1_weights"):
        flags.check_flags(module.parse_args(["--img_path", "x", "--loss_preset", "g3"]))


def test_loss_setup_from_a_preset():
    setup = LossSetup.from_preset(losses.PRESETS["g1_weights"], CoeffLayout(), 112)
    assert setup.landmark_scale == 2.0 and setup.neighbour_radius == 1
    assert torch.equal(setup.landmark_weights, torch.tensor(losses.LANDMARK_WEIGHTS_G1))


def test_drop_terms_zeroes_exactly_the_named_weights():
    import dataclasses

    from utils.losses import PRESETS
    g2 = PRESETS["g2"]
    dropped = g2.without(("neighbour", "identity"))
    assert dropped.step4_unet.neighbour == 0.0 and dropped.step4_mofa.identity == 0.0
    assert dropped.step1.identity == 0.0
    for step in ("step1", "step4_unet", "step4_mofa"):
        for f in dataclasses.fields(getattr(g2, step)):
            if f.name not in ("neighbour", "identity"):
                assert getattr(getattr(dropped, step), f.name) == getattr(getattr(g2, step), f.name)
    with pytest.raises(ValueError, match="unknown loss terms \\['neighbor'\\]"):
        g2.without(("neighbor",))
    with pytest.raises(ValueError, match="every term of Step4UNetWeights"):
        g2.without(("binary", "area", "preserve", "dist", "neighbour"))


def test_drop_terms_flag_is_parsed_and_checked(capsys):
    import Step4_UNet_MoFA_EM as step4
    args = step4.parse_args(["--img_path", "x", "--drop_terms", "neighbour,dist"])
    assert args.drop_terms == ("neighbour", "dist")
    from utils.training import flags
    assert flags.loss_preset(args).step4_unet.dist == 0.0
    with pytest.raises(SystemExit) as exc:
        step4.parse_args(["--img_path", "x", "--drop_terms", "neighbor"])
    assert exc.value.code == 2 and "unknown loss terms" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        step4.parse_args(["--img_path", "x", "--drop_terms", "rec,identity,reg,landmark,area"])
    assert exc.value.code == 2 and "nothing would train" in capsys.readouterr().err
