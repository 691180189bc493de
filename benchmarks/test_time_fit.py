"""What test-time fitting (utils/fitting.py) buys and costs: landmark error, the Step-2 rule's masks, and time, for a
number of fitting steps, on one split of a synthetic image root (ground_truth.csv beside it).

    python benchmarks/test_time_fit.py --img_path demo_data --save_root demo_output/MoFA_UNet_Save
                                       [--split test] [--steps 0,10,20,50] [--lr 0.05] [--batch_size 40]

For every N in --steps, every image's coefficients start from the Step-1 encoder's prediction and take N Adam steps
on Step 1's loss (the preset of the Step-1 checkpoint); the Step-2 rule (the robust loss's inlier mask) is applied
to the fitted render. Printed per N (a Markdown table):

- landmark_px: mean 2-D landmark distance in pixels of the network image against the render of the true
  coefficients (the evaluation's ``landmark_px``);
- iou: visible-face IoU inside the rendered face, mean over the images with a GT mask (the paper protocol);
  all_face: the same for the mask that calls the whole rendered face visible (the yardstick of issue 18);
- occ_iou / occ_recall / occ_precision: occluder (= not visible face) IoU, recall and precision inside the rendered
  face, pixels pooled over the images with an occluder (ground_truth.csv category other than 'none');
- seconds: wall time of the fitting (and the encoder) for the split; ms/img/step: per image and step.

With --unet (a Step-3 or Step-4 checkpoint) the fit uses Step 4's MoFA-phase terms with that UNet's mask, and the
mask scored is the UNet's (F * U >= 0.5) instead of the Step-2 rule.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: find utils/

from models.face_model import FaceModel  # noqa: E402
from models.layout import CoeffLayout  # noqa: E402
from utils import losses  # noqa: E402
from utils.cli import resolve_device  # noqa: E402
from utils.data.datasets import FaceDataset, collate_faces  # noqa: E402
from utils.evaluation.evaluate import read_ground_truth, reconstruction_errors  # noqa: E402
from utils.evaluation.metrics import confusion_counts, mask_metrics  # noqa: E402
from utils.fitting import DEFAULT_FIT_LR, checkpoint_preset, fit_images  # noqa: E402
from utils.training.builders import load_mofa, load_unet, previous_checkpoint  # noqa: E402
from utils.training.checkpoint import load_checkpoint  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--img_path", required=True, help="synthetic image root (with ground_truth.csv)")
    p.add_argument("--save_root", required=True, help="the run's save root (Step 1's final.pt under it)")
    p.add_argument("--bfm", default=None, help="face model h5 (default: <img_path>/../demo_face_model.h5, else the "
                                               "repository's basel_3DMM/demo_face_model.h5)")
    p.add_argument("--split", default="test")
    p.add_argument("--steps", default="0,10,20,50", help="comma-separated numbers of fitting steps")
    p.add_argument("--lr", type=float, default=DEFAULT_FIT_LR)
    p.add_argument("--batch_size", type=int, default=40)
    p.add_argument("--unet", default=None, help="a Step-3/Step-4 checkpoint: fit with Step 4's MoFA-phase terms")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def scores(gt: torch.Tensor, est: torch.Tensor, region: torch.Tensor) -> dict[str, torch.Tensor]:
    tp, fp, tn, fn = confusion_counts(gt, est, region)
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "iou": mask_metrics(tp, fp, tn, fn)["iou"]}


def summary(rows: list[dict], prefix: str) -> dict[str, float]:
    """Mean IoU over the images, and the occluder metrics pooled over the images with an occluder (ground_truth.csv
    category other than 'none') and GT pixels that are not visible face inside the region."""
    iou = torch.cat([r[f"{prefix}iou"] for r in rows]).mean().item()
    fp, tn, fn = (torch.cat([r[f"{prefix}{k}"] for r in rows]) for k in ("fp", "tn", "fn"))
    occluded = ((tn + fp) > 0) & torch.cat([r["has_occluder"] for r in rows])
    otp, ofp, ofn = tn[occluded].sum(), fn[occluded].sum(), fp[occluded].sum()  # occluder = the negative class
    return {"iou": iou, "occ_iou": (otp / (otp + ofp + ofn)).item(), "occ_recall": (otp / (otp + ofn)).item(),
            "occ_precision": (otp / (otp + ofp)).item() if otp + ofp > 0 else float("nan"),
            "n_occluded": int(occluded.sum())}


def run_one(steps: int, args, mofa, unet, preset, dataset, truth, device) -> dict:
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate_faces)
    rows, landmark, seconds, n = [], [], 0.0, 0
    for batch in loader:
        images, lms = batch["image"].to(device), batch["landmarks"].to(device)
        t = time.perf_counter()
        result = fit_images(mofa, images, lms, steps, args.lr, preset, unet=unet)
        seconds += time.perf_counter() - t
        out = result.out
        if unet is None:
            est = losses.inlier_mask(images, out.image, out.mask)
        else:
            est = result.unet_mask * out.mask
        has = batch["has_gt_mask"]
        gt, region = batch["gt_mask"].to(device)[has], out.mask[has]
        categories = [truth.category(name) if truth else None for name in batch["filename"]]
        occluder = torch.tensor([c not in (None, "none") for c in categories])[has]
        rows.append({**scores(gt, est[has], region), **{f"all_{k}": v for k, v in scores(gt, region, region).items()},
                     "has_occluder": occluder})
        landmark.append(reconstruction_errors(mofa, out, lms, list(batch["filename"]), truth)["landmark_px"])
        n += len(images)
    lm = torch.cat(landmark)
    return {"steps": steps, "landmark_px": lm[~lm.isnan()].mean().item(), **summary(rows, ""),
            "all_face": summary(rows, "all_")["iou"], "seconds": seconds,
            "ms_per_image_step": 1000 * seconds / n / steps if steps else float("nan"), "n": n}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    bfm = args.bfm or next((p for p in (Path(args.img_path).parent / "demo_face_model.h5",
                                        Path(__file__).resolve().parents[1] / "basel_3DMM" / "demo_face_model.h5")
                            if p.is_file()), None)
    face_model = FaceModel.from_h5(bfm, CoeffLayout()).to(device)
    mofa, payload, spec = load_mofa(previous_checkpoint(None, args.save_root, step=1), face_model, device)
    preset, unet = checkpoint_preset(payload), None
    if args.unet:
        upayload = load_checkpoint(Path(args.unet), map_location=device)
        unet = load_unet(upayload, upayload["extra"]["model"]["unet_width"], Path(args.unet), device)
        if "encoder" in upayload["models"]:  # a Step-4 checkpoint: its encoder and its preset
            mofa.encoder.load_state_dict(upayload["models"]["encoder"])
            preset = checkpoint_preset(upayload)
    dataset = FaceDataset(args.img_path, args.split, spec["image_size"], test_mode=True)
    truth = read_ground_truth(args.img_path)
    results = [run_one(int(s), args, mofa, unet, preset, dataset, truth, device) for s in args.steps.split(",")]
    n = results[0]["n"]
    print(f"\n{args.split} split, {n} images, {results[0]['n_occluded']} with an occluder; "
          f"Adam lr {args.lr}, batch {args.batch_size}, {'UNet mask' if unet else 'Step-2 rule'}, "
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
