"""The evaluation command (``tests/evaluate_segmentation.py``; the demo calls `run_evaluation` directly)."""
from __future__ import annotations

import argparse
import logging

from utils import cli, losses
from utils.data.benchmark_files import read_ground_truth
from utils.data.datasets import FaceDataset
from utils.data.image_root import ImageRoot
from utils.errors import DataError
from utils.evaluation.evaluate import EvalOptions, evaluate_fit_oracle, evaluate_split
from utils.evaluation.report import IMAGES_DIR, format_markdown, write_results
from utils.evaluation.scoring import summarise_rows
from utils.evaluation.stages import FIT_ORACLE, STAGES, FitSetting, load_fit_oracle, stage_label, stage_networks
from utils.fitting import add_fit_args, checkpoint_preset
from utils.output_dir import build_beside, check_target, writing
from utils.training.flags import check_flags

log = logging.getLogger(__name__)

TOOL = "tests/evaluate_segmentation.py"
"""The name the evaluation's --out manifest records (`utils.output_dir`)."""

COMMAND_HELP = """Evaluate occlusion masks (and, on the synthetic benchmark, reconstructions) on a split of IMAGE_ROOT.

    python tests/evaluate_segmentation.py --img_path IMAGE_ROOT --split test --save_root DIR --out RESULTS_DIR
        [--stage step2|step3|step4|fit_oracle] [--checkpoint PATH] [--threshold 0.5] [--soft] [--save_images]
        [--overwrite] [--fit_steps N [--fit_lr LR]]

Metrics follow the paper protocol (pixels inside the rendered face only, per image, then mean and std) with the
estimate binarised at --threshold (--soft: the original's soft counts); pixel-pooled metrics are reported too.
Beside them: the all-face mask (the same region, every pixel called visible: the score of finding no occluder) and
occluder IoU / recall / precision pooled over the images whose GT has an occluder inside the face.
GT masks are ``X_visible_skin_mask.png`` beside ``X``; images without one are processed but not scored.
Writes RESULTS_DIR/per_image.csv, summary.json, summary.md (and with --save_images RESULTS_DIR/images/
X_org.png, X_result.png, X_estmask.png, X = the image's path under Dataset/ with its extension). RESULTS_DIR must be
new or empty; --overwrite replaces the results this command wrote there before (nothing else). --stage picks the
model: step2 = Step-1 encoder with the inlier mask, step3 = Step-1 encoder + Step-3 UNet, step4 = the final Step-4
model (default). --checkpoint overrides the stage's checkpoint (step2: Step 1's, step3: Step 3's UNet, step4: Step
4's). fit_oracle (synthetic benchmark only, no checkpoint) applies Step 2's rule to the render of the true
coefficients with the generator's --bfm.
--fit_steps N (default 0): test-time fitting (utils/fitting.py). Each image's coefficients start from the encoder's
prediction and take N Adam steps on that image's own loss (step2: Step 1's terms; step3 / step4: Step 4's MoFA-phase
terms with the stage's UNet mask), no network weight changing; the stage's mask rule is then applied to the fitted
render. The results are labelled <stage>_fit<N> (summary.json "stage", e.g. step4_fit20): run the command once
without it for the paper-protocol (feed-forward) rows and once with it for the fitted rows, into two --out folders.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags of the evaluation command (`COMMAND_HELP`), paths resolved; DataError / FlagError for a bad value,
    --out included (a file, or a folder holding other files), before any work."""
    p = argparse.ArgumentParser(prog="evaluate_segmentation.py", description=COMMAND_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--img_path", required=True, help="image root (with the split's landmark CSV)")
    p.add_argument("--split", default="test", help="train, val, test or all (default: %(default)s)")
    p.add_argument("--save_root", default=cli.RepoDefault(cli.DEFAULT_SAVE_ROOT),
                   help=f"output root of the steps (default: <repo>/{cli.DEFAULT_SAVE_ROOT})")
    p.add_argument("--bfm", default=cli.RepoDefault(cli.DEFAULT_BFM),
                   help=f"face model the steps used (default: <repo>/{cli.DEFAULT_BFM})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:<index> (default: auto)")
    p.add_argument("--stage", choices=(*STAGES, FIT_ORACLE), default="step4", help="which model makes the masks")
    p.add_argument("--checkpoint", default=None, help="checkpoint overriding the stage's default final.pt")
    p.add_argument("--threshold", type=float, default=0.5, help="binarisation threshold of masks (default 0.5)")
    p.add_argument("--soft", action="store_true", help="soft counts as the original (no binarisation)")
    p.add_argument("--sigma", type=float, default=losses.SIGMA, help="robust-loss sigma of the step2 inlier mask")
    p.add_argument("--oracle", action="store_true", help="score the GT masks themselves (pipeline check: IoU 1)")
    p.add_argument("--out", required=True, help="results folder (new or empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results this command wrote into --out before (other files are never deleted)")
    p.add_argument("--save_images", action="store_true", help="write X_org/X_result/X_estmask.png per image")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    add_fit_args(p, "the masks and reconstruction errors")
    args = cli.resolve_paths(p.parse_args(argv), ("img_path", "bfm", "save_root", "out"))
    if not 0.0 < args.threshold < 1.0:
        raise DataError(f"--threshold {args.threshold}: expected a value strictly between 0 and 1")
    check_flags(args)  # the steps' check: --batch_size, --workers, --sigma
    if args.stage == FIT_ORACLE and args.fit_steps:
        raise DataError(f"--fit_steps {args.fit_steps}: --stage {FIT_ORACLE} has no network to fit (it renders the "
                        "true coefficients)")
    check_target(args.out, TOOL, args.overwrite)  # a file or a used folder: one line, before any work
    return args


def run_evaluation(argv: list[str] | None = None) -> dict:
    """Run the evaluation command for ``argv``; write the result files, print the Markdown table and return the
    summary dict (`scoring.summarise_rows`)."""
    args = parse_args(argv)
    device = cli.resolve_device(args.device)
    fit = None
    if args.stage == FIT_ORACLE:
        renderer, _, spec = load_fit_oracle(ImageRoot(args.img_path).root, args.bfm, device)
    else:
        nets = stage_networks(args.stage, args.save_root, args.bfm, device, args.checkpoint)
        mofa, unet, spec = nets.mofa, nets.unet, nets.spec
        if args.fit_steps:
            fit = FitSetting(args.fit_steps, args.fit_lr, checkpoint_preset(nets.mofa_payload))
    dataset = FaceDataset(args.img_path, args.split, spec["image_size"], test_mode=True)
    truth = read_ground_truth(ImageRoot(args.img_path).root)
    settings = {"threshold": None if args.soft else args.threshold, "soft": args.soft, "oracle": args.oracle,
                "image_size": spec["image_size"], "encoder": spec["encoder"], "checkpoint": args.checkpoint,
                "save_root": str(args.save_root), "img_path": str(args.img_path), "fit_steps": args.fit_steps,
                "fit_lr": args.fit_lr if args.fit_steps else None}
    with build_beside(args.out, TOOL, args.overwrite) as folder:
        options = EvalOptions(threshold=args.threshold, soft=args.soft, sigma=args.sigma, batch_size=args.batch_size,
                              workers=args.workers, oracle=args.oracle,
                              image_dir=folder / IMAGES_DIR if args.save_images else None, fit=fit)
        rows = (evaluate_fit_oracle(renderer, dataset, truth, device, options) if args.stage == FIT_ORACLE
                else evaluate_split(args.stage, mofa, unet, dataset, device, options, truth))
        summary = summarise_rows(rows, stage_label(args.stage, args.fit_steps), args.split, settings)
        with writing(f"the results in {args.out}"):
            write_results(folder, rows, summary)
    missing = summary["n_images"] - summary["n_with_gt"]
    if missing:
        log.info("%d of %d images have no GT mask: processed but left out of the mask metrics",
                 missing, summary["n_images"])
    print(format_markdown(summary))
    log.info("results written to %s", args.out)
    return summary
