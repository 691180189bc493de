"""Inputs for running Steps 3 and 4 directly in tests, without running the steps before them.

`step4_inputs` writes a tiny synthetic image root (32 px) and the Step-1 and Step-3 ``final.pt``
files a real run leaves (model spec, config with Step 1's StepLR settings); `unet_trainset` writes Step 2's files.
"""
from __future__ import annotations

from pathlib import Path

import torch

from models.face_model import FaceModel
from models.layout import CoeffLayout
from utils.data.unet_trainset import write_list, write_sample
from utils.training.builders import FINAL_NAME, build_mofa, build_unet, step_dir
from utils.training.checkpoint import load_checkpoint, save_training_state

SIZE = 32
UNET_WIDTH = 4
HEALTHY_HEAD_BIAS = 0.6  # the UNet head's bias: mask inside the face about 0.6-0.9, so no collapse stop fires
STEP1_STEPS, STEP1_LR_STEP, STEP1_LR_GAMMA = 20, 7, 0.5  # Step 1 ended after 2 decays: factor 0.25


def common_args(image_root: Path, bfm: Path, save_root: Path) -> list[str]:
    """The flags every step takes, for a small CPU run."""
    return ["--img_path", str(image_root), "--bfm", str(bfm), "--save_root", str(save_root), "--device", "cpu",
            "--workers", "0", "--image_size", str(SIZE), "--encoder", "resnet18", "--unet_width", str(UNET_WIDTH)]


# Quiet, short training flags (Steps 3 and 4): log every step, no visuals or evaluation, one validation batch.
FAST = ["--batch_size", "4", "--log_every", "1", "--vis_every", "1000", "--eval_every", "1000", "--val_batches", "1",
        "--optimizer", "adam"]


def step4_argv(inputs: dict, save_root: Path, *extra: str) -> list[str]:
    """A Step-4 command line on ``step4_inputs`` (its Step-1 and Step-3 checkpoints), FAST flags, then ``extra``."""
    return [*common_args(inputs["root"], inputs["bfm"], save_root), "--pretrained_MoFA",
            str(inputs["save"] / "pretrain_mofa"), "--pretrained_unet", str(inputs["save"] / "Pretrain_UNet"),
            *FAST, *extra]


def step4_inputs(base: Path, bfm: Path, num_images: int = 14) -> dict:
    """An image root (14 images: 12 train, 1 val, 1 test) and Step-1 / Step-3 ``final.pt`` under ``base/save``."""
    from utils.synthetic.faces import generate_dataset

    root, save = base / "root", base / "save"
    generate_dataset(bfm, root, num=num_images, seed=0, size=SIZE)
    face_model = FaceModel.from_h5(bfm, CoeffLayout())
    layout = CoeffLayout()
    spec = {"encoder": "resnet18", "image_size": SIZE, "camera": "g2",
            "layout": {"n_shape": layout.n_shape, "n_exp": layout.n_exp, "n_tex": layout.n_tex},
            "unet_width": UNET_WIDTH, "face_model": face_model.config()}
    torch.manual_seed(0)
    mofa, unet = build_mofa(spec, face_model), build_unet(spec)
    with torch.no_grad():  # a Step-3 UNet keeps most of the face (HEALTHY_HEAD_BIAS), not the random one's ~4 %
        unet.head.bias.fill_(HEALTHY_HEAD_BIAS)
    step1_config = {"lr_step": STEP1_LR_STEP, "lr_gamma": STEP1_LR_GAMMA, "learning_rate": 0.1}
    for step, models, model_spec, config, at in ((1, {"encoder": mofa.encoder}, spec, step1_config, STEP1_STEPS),
                                                 (3, {"unet": unet}, {"unet_width": UNET_WIDTH}, {}, 5)):
        written = save_training_state(step_dir(save, step), at, models, config=config, extra={"model": model_spec},
                                      keep_latest=False)
        written.replace(written.with_name(FINAL_NAME))
    return {"root": root, "save": save, "bfm": bfm, "encoder": state_of(save, 1, "encoder"),
            "unet": state_of(save, 3, "unet")}


def state_of(save_root: Path, step: int, name: str, file: str = FINAL_NAME) -> dict[str, torch.Tensor]:
    """The state dict ``name`` of a step's checkpoint file."""
    return load_checkpoint(step_dir(save_root, step) / file)["models"][name]


def unet_trainset(save_root: Path, n_train: int = 8, n_val: int = 2, seed: int = 0) -> Path:
    """Step 2's output (random images, renders and masks; the list CSVs) under ``save_root``."""
    out = step_dir(save_root, 2)
    gen = torch.Generator().manual_seed(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        rows = []
        for i in range(n):
            stem = f"{split}_{i}"
            image, raster = torch.rand(3, SIZE, SIZE, generator=gen), torch.rand(3, SIZE, SIZE, generator=gen)
            mask = (torch.rand(1, SIZE, SIZE, generator=gen) > 0.3).float()
            write_sample(out, stem, image, raster, mask)
            rows.append((stem, f"{stem}.png"))
        write_list(out / f"{split}_list.csv", rows)
    return out
