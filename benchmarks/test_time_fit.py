"""What test-time fitting (utils/fitting.py) buys and costs: landmark error, the stage's masks, and time, for a
number of fitting steps, on one split of a synthetic image root (ground_truth.csv beside it).

    python benchmarks/test_time_fit.py --img_path demo_data --save_root demo_output/MoFA_UNet_Save
                                       [--split test] [--steps 0,10,20,50] [--lr 0.05] [--batch_size 40]
                                       [--stage step2|step3|step4] [--checkpoint PATH]

Every N in --steps is one run of the evaluation's own pieces (`utils.evaluation`): the stage's networks
(`stages.stage_networks`, --checkpoint overriding the stage's final.pt as in the evaluation command), the split
evaluated with `evaluate.evaluate_split` and test-time fitting `stages.FitSetting(N, --lr, the checkpoint's preset)`
(so the masks come from `stages.predict_masks`), summarised by `scoring.summarise_rows`; the benchmark and the
evaluation (``tests/evaluate_segmentation.py --fit_steps N``) cannot disagree. step2 (default): the Step-1 encoder
fitted on Step 1's terms, the Step-2 rule on the fitted render; step3 / step4: Step 4's MoFA-phase terms with the
stage's UNet, whose mask is scored. Printed per N (a Markdown table):

- landmark_px: mean 2-D landmark distance in pixels of the network image against the render of the true
  coefficients (the evaluation's ``reconstruction.landmark_px``);
- iou: visible-face IoU inside the rendered face, mean over the images with a GT mask (the paper protocol);
  all_face: the same for the mask that calls the whole rendered face visible (the all-face yardstick);
- occ_iou / occ_recall / occ_precision: the evaluation's occluder IoU, recall and precision (pooled over the
  images with an occluder);
- seconds: wall time of the split's evaluation (encoder, fitting, scoring); ms/img/step: the time over that of
  N = 0 (always run, after an untimed warm-up pass) per image and fitting step.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: find utils/

from utils.cli import resolve_device  # noqa: E402
from utils.data.benchmark_files import read_ground_truth  # noqa: E402
from utils.data.datasets import FaceDataset  # noqa: E402
from utils.data.image_root import ImageRoot  # noqa: E402
from utils.evaluation.evaluate import EvalOptions, evaluate_split  # noqa: E402
from utils.evaluation.scoring import summarise_rows  # noqa: E402
from utils.evaluation.stages import STAGES, FitSetting, stage_label, stage_networks  # noqa: E402
from utils.fitting import DEFAULT_FIT_LR, checkpoint_preset  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--img_path", required=True, help="synthetic image root (with ground_truth.csv)")
    p.add_argument("--save_root", required=True, help="the run's save root (the steps' final.pt under it)")
    p.add_argument("--bfm", default=None, help="face model h5 (default: <img_path>/../demo_face_model.h5, else the "
                                               "repository's basel_3DMM/demo_face_model.h5)")
    p.add_argument("--split", default="test")
    p.add_argument("--steps", default="0,10,20,50", help="comma-separated numbers of fitting steps")
    p.add_argument("--lr", type=float, default=DEFAULT_FIT_LR)
    p.add_argument("--batch_size", type=int, default=40)
    p.add_argument("--stage", choices=STAGES, default="step2", help="which networks make the masks (as the "
                                                                     "evaluation's --stage)")
    p.add_argument("--checkpoint", default=None, help="checkpoint overriding the stage's final.pt (as the "
                                                      "evaluation's --checkpoint)")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def run_one(steps: int, args, nets, dataset, truth, device) -> dict:
    """The evaluation of the split with ``steps`` fitting steps, timed; the table's numbers."""
    fit = FitSetting(steps, args.lr, checkpoint_preset(nets.mofa_payload)) if steps else None
    options = EvalOptions(batch_size=args.batch_size, fit=fit)
    t = time.perf_counter()
    rows = evaluate_split(args.stage, nets.mofa, nets.unet, dataset, device, options, truth)
    seconds = time.perf_counter() - t
    summary = summarise_rows(rows, stage_label(args.stage, steps), args.split)
    recon = summary.get("reconstruction")
    occluders = summary["occluders"]
    return {"steps": steps, "landmark_px": recon["landmark_px"]["mean"] if recon else float("nan"),
            "iou": summary["paper_protocol"]["iou"]["mean"],
            "all_face": summary["all_face"]["paper_protocol"]["iou"]["mean"],
            "occ_iou": occluders["occluder_iou"], "occ_recall": occluders["occluder_recall"],
            "occ_precision": occluders["occluder_precision"], "n_occluded": occluders["n_images"],
            "seconds": seconds, "n": summary["n_images"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    bfm = args.bfm or next((p for p in (Path(args.img_path).parent / "demo_face_model.h5",
                                        Path(__file__).resolve().parents[1] / "basel_3DMM" / "demo_face_model.h5")
                            if p.is_file()), None)
    nets = stage_networks(args.stage, args.save_root, bfm, device, args.checkpoint)
    dataset = FaceDataset(args.img_path, args.split, nets.spec["image_size"], test_mode=True)
    truth = read_ground_truth(ImageRoot(args.img_path).root)
    steps = [int(n) for n in args.steps.split(",")]
    if any(n < 0 for n in steps):
        raise SystemExit(f"--steps {args.steps}: every number of fitting steps must be at least 0")
    run_one(0, args, nets, dataset, truth, device)  # warm-up (first-call costs), not timed into the baseline
    results = [run_one(n, args, nets, dataset, truth, device) for n in [0, *(n for n in steps if n)]]
    base = results[0]["seconds"]
    for r in results:
        r["ms_per_image_step"] = 1000 * (r["seconds"] - base) / r["n"] / r["steps"] if r["steps"] else float("nan")
    results = [r for r in results if r["steps"] or 0 in steps]
    n = results[0]["n"]
    print(f"\n{args.split} split, {n} images, {results[0]['n_occluded']} with an occluder; "
          f"Adam lr {args.lr}, batch {args.batch_size}, stage {args.stage} "
          f"({'the Step-2 rule' if args.stage == 'step2' else 'its UNet mask'}), "
          f"torch threads {torch.get_num_threads()}\n")
    print("| fit steps | landmark px | visible-face IoU | all-face IoU | occluder IoU | occ. recall | occ. precision "
          "| seconds | ms / image / step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['steps']} | {r['landmark_px']:.2f} | {r['iou']:.3f} | {r['all_face']:.3f} | {r['occ_iou']:.3f} "
              f"| {r['occ_recall']:.2f} | {r['occ_precision']:.2f} | {r['seconds']:.1f} "
              f"| {r['ms_per_image_step']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
