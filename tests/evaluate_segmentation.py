"""Evaluate occlusion masks (and, on the synthetic benchmark, reconstructions) on one split of an image root.

    python tests/evaluate_segmentation.py --img_path IMAGE_ROOT --split test --save_root DIR --out RESULTS_DIR
        [--stage step2|step3|step4|fit_oracle] [--checkpoint PATH] [--threshold 0.5] [--soft] [--save_images]

Metrics follow the paper protocol (pixels inside the rendered face only, per image, then mean and std) with the
estimate binarised at --threshold (--soft: the original's soft counts); pixel-pooled metrics are reported too.
GT masks are ``X_visible_skin_mask.png`` beside ``X``; images without one are processed but not scored.
Writes RESULTS_DIR/per_image.csv, summary.json, summary.md (and with --save_images RESULTS_DIR/images/
X_org.png, X_result.png, X_estmask.png). --stage picks the model: step2 = Step-1 encoder with the inlier mask,
step3 = Step-1 encoder + Step-3 UNet, step4 = the final Step-4 model (default). --checkpoint overrides the
stage's checkpoint (step2: Step 1's, step3: Step 3's UNet, step4: Step 4's). fit_oracle (synthetic benchmark only,
no checkpoint) applies Step 2's rule to the render of the true coefficients with the generator's --bfm.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import cli  # noqa: E402
from utils.data.datasets import FaceDataset  # noqa: E402
from utils.data.image_root import ImageRoot  # noqa: E402
from utils.errors import DataError  # noqa: E402
from utils.evaluation.evaluate import (  # noqa: E402
    FIT_ORACLE,
    STAGES,
    EvalOptions,
    evaluate_fit_oracle,
    evaluate_split,
    format_markdown,
    load_fit_oracle,
    load_stage,
    read_ground_truth,
    summarise_rows,
    write_results,
)

log = logging.getLogger("evaluate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--sigma", type=float, default=0.043, help="robust-loss sigma of the step2 inlier mask")
    p.add_argument("--oracle", action="store_true", help="score the GT masks themselves (pipeline check: IoU 1)")
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--save_images", action="store_true", help="write X_org/X_result/X_estmask.png per image")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    args = cli.resolve_paths(p.parse_args(argv), ("img_path", "bfm", "save_root", "out"))
    if not 0.0 < args.threshold < 1.0:
        raise DataError(f"--threshold {args.threshold}: expected a value strictly between 0 and 1")
    if args.batch_size < 1:
        raise DataError(f"--batch_size {args.batch_size}: expected a positive integer")
    return args


def evaluate(argv: list[str] | None = None) -> dict:
    """Run the evaluation for command-line ``argv``; write the result files and return the summary dict."""
    args = parse_args(argv)
    device = cli.resolve_device(args.device)
    if args.stage == FIT_ORACLE:
        renderer, _, spec = load_fit_oracle(ImageRoot(args.img_path).root, args.bfm, device)
    else:
        mofa, unet, spec = load_stage(args.stage, args.save_root, args.bfm, device, args.checkpoint)
    dataset = FaceDataset(args.img_path, args.split, spec["image_size"], test_mode=True)
    truth = read_ground_truth(ImageRoot(args.img_path).root)
    options = EvalOptions(threshold=args.threshold, soft=args.soft, sigma=args.sigma, batch_size=args.batch_size,
                          workers=args.workers, oracle=args.oracle,
                          image_dir=args.out / "images" if args.save_images else None)
    rows = (evaluate_fit_oracle(renderer, dataset, truth, device, options) if args.stage == FIT_ORACLE
            else evaluate_split(args.stage, mofa, unet, dataset, device, options, truth))
    settings = {"threshold": None if args.soft else args.threshold, "soft": args.soft, "oracle": args.oracle,
                "image_size": spec["image_size"], "encoder": spec["encoder"], "checkpoint": args.checkpoint,
                "save_root": str(args.save_root), "img_path": str(args.img_path)}
    summary = summarise_rows(rows, args.stage, args.split, settings)
    write_results(args.out, rows, summary)
    missing = summary["n_images"] - summary["n_with_gt"]
    if missing:
        log.info("%d of %d images have no GT mask: processed but left out of the mask metrics",
                 missing, summary["n_images"])
    print(format_markdown(summary))
    log.info("results written to %s", args.out)
    return summary


def main(argv: list[str] | None = None) -> int:
    evaluate(argv)
    return 0


if __name__ == "__main__":
    cli.cli_main(main)
