"""The command-line flags that the four steps share, with the paper's defaults."""
from __future__ import annotations

import argparse
import math

from utils.cli import DEFAULT_BFM, DEFAULT_SAVE_ROOT, RepoDefault
from utils.losses import PRESETS
from utils.errors import MofaError

ENCODERS = ("resnet50", "resnet18", "resnet34", "dlib")
MIN_IMAGE_SIZE = 16  # the UNet halves the image four times
# Numeric flags of the steps (and of the evaluation command) and the smallest value each accepts (``check_flags``);
# a flag a command lacks is skipped.
INT_MINIMA = {"batch_size": 1, "image_size": MIN_IMAGE_SIZE, "workers": 0, "epochs": 1, "max_iters": 1,
              "ckpt_every": 1, "keep_ckpts": 0, "val_batches": 0, "lr_step": 1, "em_cycle": 1, "unet_iters": 0,
              "unet_width": 1}
POSITIVE_FLOATS = ("learning_rate", "lr_gamma", "lr_gamma_mofa", "lr_gamma_unet", "sigma", "lr_mofa", "lr_unet")


class FlagError(MofaError):
    """A command-line flag has a value the step cannot run with."""


def add_common_args(parser: argparse.ArgumentParser, img_path_required: bool = True) -> argparse.ArgumentParser:
    """Add the flags every step shares. Path flags have no ``type`` so defaults stay ``RepoDefault``;
    call ``resolve_paths(args)`` after parsing."""
    parser.add_argument("--img_path", required=img_path_required, default=None,
                        help="image root (the folder with the images, or its parent holding the CSVs)")
    parser.add_argument("--bfm", default=RepoDefault(DEFAULT_BFM),
                        help=f"Basel Face Model 2017 h5 file (default: <repo>/{DEFAULT_BFM})")
    parser.add_argument("--save_root", default=RepoDefault(DEFAULT_SAVE_ROOT),
                        help=f"output root of all steps (default: <repo>/{DEFAULT_SAVE_ROOT})")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:<index> (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default: 2)")
    parser.add_argument("--image_size", type=int, default=224, help="network input size in pixels (default: 224)")
    parser.add_argument("--encoder", choices=ENCODERS, default="resnet50",
                        help="encoder backbone: a torchvision ResNet, or dlib = the pretrained trunk of dlib's "
                             "face-recognition network (models/encoder.py)")
    parser.add_argument("--unet_width", type=int, default=64, help="UNet base channel count (default: 64)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in this step's folder under --save_root (its files are "
                             "removed once the inputs have been checked)")
    return parser


def check_flags(args: argparse.Namespace) -> None:
    """One FlagError naming the flag for a value no step can run with (``--batch_size 0``, ``--max_iters -3``...);
    the evaluation command (`utils.evaluation.evaluate.parse_args`) checks its flags with it too."""
    for name, low in INT_MINIMA.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            need = "a positive integer" if low == 1 else f"at least {low}"
            raise FlagError(f"--{name} {value}: must be {need}")
    for name in POSITIVE_FLOATS:
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise FlagError(f"--{name} {value}: must be a positive number")
    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        raise FlagError("--resume continues the run in the folder, --overwrite replaces it: pass one of them")


def add_training_args(parser: argparse.ArgumentParser, *, lr: float, epochs: int, batch_size: int,
                      ckpt_every: int, vis_every: int, eval_every: int) -> None:
    """Flags of every training step (1, 3, 4); defaults are the paper's for that step."""
    g = parser.add_argument_group("training")
    g.add_argument("--learning_rate", type=float, default=lr, help="Adadelta learning rate (default %(default)s)")
    g.add_argument("--epochs", type=int, default=epochs, help="epochs (default %(default)s)")
    g.add_argument("--batch_size", type=int, default=batch_size, help="batch size per process (default %(default)s)")
    g.add_argument("--max_iters", type=int, default=None, help="total optimizer steps; overrides --epochs")
    g.add_argument("--resume", action="store_true", help="continue from this step's latest.pt under --save_root")
    g.add_argument("--ckpt_every", type=int, default=ckpt_every, help="checkpoint period in steps")
    g.add_argument("--keep_ckpts", type=int, default=5,
                   help="keep the N newest ckpt_*.pt, delete older ones (0 keeps all; latest.pt and final.pt are "
                        "always kept) (default %(default)s)")
    g.add_argument("--vis_every", type=int, default=vis_every, help="image-tile period in steps")
    g.add_argument("--eval_every", type=int, default=eval_every, help="validation period in steps")
    g.add_argument("--log_every", type=int, default=50, help="CSV/TensorBoard loss period in steps")
    g.add_argument("--val_batches", type=int, default=0,
                   help="validate on at most this many batches (0 = the whole validation split)")
    g.add_argument("--amp", action="store_true",
                   help="bfloat16 autocast for the encoder and the UNet on CUDA (the renderer stays float32)")
    g.add_argument("--optimizer", choices=("adadelta", "adam"), default="adadelta",
                   help="Adadelta as in the paper (default), or Adam for short runs such as the demo")


def add_loss_preset_arg(parser: argparse.ArgumentParser) -> None:
    """``--loss_preset g2|g1``: the original code generation whose loss settings a step uses (`losses.PRESETS`)."""
    parser.add_argument("--loss_preset", choices=tuple(PRESETS), default="g2",
                        help="loss weights, landmark weights and neighbour window of the G2 (default) or G1 code")
    parser.add_argument("--drop_terms", type=_term_list, default=(),
                        help="ablation: comma-separated loss terms whose weight is set to 0, e.g. neighbour or "
                             "identity,preserve,dist (default: none)")


def _term_list(value: str) -> tuple[str, ...]:
    """``--drop_terms`` value -> names, checked against the presets' terms (argparse prints the error)."""
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    try:
        PRESETS["g2"].without(names)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return names


def loss_preset(args: argparse.Namespace):
    """The `losses.LossPreset` that ``--loss_preset`` and ``--drop_terms`` select."""
    return PRESETS[args.loss_preset].without(getattr(args, "drop_terms", ()))


def add_augment_arg(parser: argparse.ArgumentParser) -> None:
    """``--augment`` (default) / ``--no_augment``: G2's training augmentation (``utils.data.augment``) in Steps 1, 3
    and 4; the validation split is never augmented."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--augment", dest="augment", action="store_true", default=True,
                       help="augment the training split as G2 does: one random affine per sample (shift +-10 px at "
                            "224 px, scale 1 +- 0.1, rotation +-10 degrees, horizontal flip p=0.5) applied to the "
                            "image, its landmarks and masks (default: on)")
    group.add_argument("--no_augment", dest="augment", action="store_false",
                       help="train on the images as they are, without augmentation")
