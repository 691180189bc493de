"""The command-line flags that the four steps share, with the paper's defaults."""
from __future__ import annotations

import argparse
import math

from utils.cli import DEFAULT_BFM, DEFAULT_SAVE_ROOT, RepoDefault, check_seed
from utils.losses import PRESETS
from utils.training.guards import COLLAPSE_MODES
from utils.errors import MofaError

ENCODERS = ("resnet50", "resnet18", "resnet34", "dlib")
MIN_IMAGE_SIZE = 16  # the UNet halves the image four times
# Numeric flags of the steps (and of the evaluation command and reconstruct.py) and the smallest value each accepts
# (``check_flags``); a flag a command lacks is skipped.
INT_MINIMA = {"batch_size": 1, "image_size": MIN_IMAGE_SIZE, "workers": 0, "epochs": 1, "max_iters": 1,
              "ckpt_every": 1, "keep_ckpts": 0, "val_batches": 0, "lr_step": 1, "em_cycle": 1, "unet_iters": 0,
              "unet_width": 1, "bn_recalibration": 0, "collapse_patience": 1, "fit_steps": 0}
POSITIVE_FLOATS = ("learning_rate", "lr_gamma", "lr_gamma_mofa", "lr_gamma_unet", "sigma", "lr_mofa", "lr_unet",
                   "fit_lr")


# Former --loss_preset names -> the one-line error that names the new one and says why.
RENAMED_PRESETS = {"g1": "--loss_preset g1 is now --loss_preset g1_weights: it sets only G1's loss weights, landmark "
                         "weights and neighbour window; its identity terms stay G2's (G1 compared FaceNet features of "
                         "the render and the image in one frame, without the warp), so it does not reproduce G1"}


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
    the evaluation command (`utils.evaluation.command.parse_args`) checks its flags with it too."""
    for name, low in INT_MINIMA.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            need = "a positive integer" if low == 1 else f"at least {low}"
            raise FlagError(f"--{name} {value}: must be {need}")
    for name in POSITIVE_FLOATS:
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise FlagError(f"--{name} {value}: must be a positive number")
    if hasattr(args, "seed"):
        check_seed(args.seed)
    em_cycle, unet_iters = getattr(args, "em_cycle", None), getattr(args, "unet_iters", None)
    if em_cycle is not None and unet_iters is not None and unet_iters >= em_cycle:
        raise FlagError(f"--unet_iters {unet_iters} --em_cycle {em_cycle}: the UNet steps of a cycle must fit in it, "
                        "so --unet_iters must be below --em_cycle (step ct is a MoFA step when ct % em_cycle > "
                        "unet_iters)")
    preset = getattr(args, "loss_preset", None)
    if preset is not None and preset not in PRESETS:
        raise FlagError(RENAMED_PRESETS.get(preset, f"--loss_preset {preset}: the presets are {', '.join(PRESETS)}"))
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
    """``--loss_preset g2|g1_weights`` (`losses.PRESETS`; checked by ``check_flags``, so an old name gets one line)
    and ``--drop_terms``."""
    parser.add_argument("--loss_preset", default="g2", metavar="{" + ",".join(PRESETS) + "}",
                        help="loss settings of the original code: g2 (default, G2's terms and weights), or "
                             "g1_weights (G1's weights, landmark weights and neighbour window on G2's terms; G1's "
                             "own identity terms are not reproduced)")
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


def add_collapse_args(parser: argparse.ArgumentParser) -> None:
    """``--collapse stop|warn`` and ``--collapse_patience N`` of Steps 3 and 4 (`guards.CollapseGuard`)."""
    parser.add_argument("--collapse", choices=COLLAPSE_MODES, default="stop",
                        help="when the mean UNet mask inside the face stays below 0.05 or above 0.995 for "
                             "--collapse_patience log steps in a row: stop (default; exit 2, latest.pt from before "
                             "the collapse) or warn and train on")
    parser.add_argument("--collapse_patience", type=int, default=3, metavar="N",
                        help="collapsed training log rows in a row that make a collapse (default %(default)s)")


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
