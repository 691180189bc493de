"""`make demo`: the whole method on the synthetic default, end to end, on a CPU.

    python -m utils.demo_pipeline [--out demo_output] [--data demo_data] [--quick]

1. writes the procedural demo face model (basel_3DMM/demo_face_model.h5) if it is missing;
2. renders the synthetic occluded-face dataset into --data;
3. runs Step 1 to Step 4 as a user would (the same scripts, in subprocesses) with demo-sized settings;
4. evaluates the masks of every stage on the test split (the fit oracle, i.e. Step 2's rule on the render of the
   true coefficients; Step 2's preliminary masks, Step 3's UNet, Step 4's final masks), prints the tables overall,
   per appearance item and per occluder category, and writes <out>/results.json and <out>/figure.png (test faces
   with their GT and each stage's mask).

The demo settings trade the paper's scale for a run of minutes on a CPU: ResNet-18 from random initialisation, 96 px
images, a UNet of width 16, Adam instead of Adadelta (which needs hundreds of thousands of steps), a few hundred
steps per step and a shortened EM cycle. They are listed in DEMO below and written to results.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from utils.cli import cli_main, repo_root
from utils.evaluation.evaluate import run_evaluation

REPO = repo_root()

DEMO = {
    "num_images": 1200,
    "image_size": 96,
    "encoder": "resnet18",
    "unet_width": 16,
    "step1": ["--max_iters", "1800", "--batch_size", "16", "--optimizer", "adam", "--learning_rate", "1e-3",
              "--lr_step", "700", "--lr_gamma", "0.5"],
    "step3": ["--max_iters", "300", "--batch_size", "16", "--optimizer", "adam", "--learning_rate", "1e-3"],
    "step4": ["--max_iters", "300", "--batch_size", "16", "--em_cycle", "200", "--unet_iters", "100",
              "--optimizer", "adam", "--lr_mofa", "2e-4", "--lr_unet", "1e-4"],
}
QUICK = {**DEMO, "num_images": 60, "image_size": 32,
         "step1": ["--max_iters", "4", "--batch_size", "8", "--optimizer", "adam", "--learning_rate", "1e-3"],
         "step3": ["--max_iters", "2", "--batch_size", "8", "--optimizer", "adam", "--learning_rate", "1e-3"],
         "step4": ["--max_iters", "3", "--batch_size", "8", "--em_cycle", "3", "--unet_iters", "1",
                   "--optimizer", "adam"]}
STAGES = {"fit_oracle": "fit_oracle", "step2_prelim": "step2", "step3_unet": "step3", "step4_final": "step4"}
FIGURE_ROWS = 8


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, *cmd], cwd=REPO, check=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "demo_output"))
    p.add_argument("--data", default=str(REPO / "demo_data"))
    p.add_argument("--bfm", default=str(REPO / "basel_3DMM" / "demo_face_model.h5"))
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (seconds, numbers meaningless)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else DEMO
    t0 = time.time()
    out, data, save_root = Path(args.out), Path(args.data), Path(args.out) / "MoFA_UNet_Save"
    out.mkdir(parents=True, exist_ok=True)
    if not Path(args.bfm).is_file():
        run(["-m", "utils.synthetic.demo_face_model", "--out", args.bfm])
    if not (data / "ground_truth.csv").is_file():
        run(["-m", "utils.synthetic.faces", "--bfm", args.bfm, "--out", str(data), "--num", str(cfg["num_images"]),
             "--size", str(cfg["image_size"])])
    common = ["--img_path", str(data), "--bfm", args.bfm, "--save_root", str(save_root), "--device", args.device,
              "--workers", "0", "--image_size", str(cfg["image_size"]), "--encoder", cfg["encoder"],
              "--unet_width", str(cfg["unet_width"]), "--overwrite"]  # a demo run replaces the previous one
    periods = ["--vis_every", "200", "--eval_every", "500", "--log_every", "25", "--val_batches", "4"]
    timings = {}
    for name, script, extra in (("step1", "Step1_Pretrain_MoFA.py", cfg["step1"] + periods),
                                ("step2", "Step2_UNet_trainset_generation.py", []),
                                ("step3", "Step3_Pretrain_Unet.py", cfg["step3"] + periods),
                                ("step4", "Step4_UNet_MoFA_EM.py", cfg["step4"] + periods)):
        t = time.time()
        run([script, *common, *extra])
        timings[name] = round(time.time() - t, 1)
    results = {"per_appearance": {}, "per_category": {}}
    for key, stage in STAGES.items():
        summary = run_evaluation(["--img_path", str(data), "--split", "test", "--save_root", str(save_root),
                            "--bfm", args.bfm, "--device", args.device, "--stage", stage,
                            "--out", str(out / key), "--save_images"])
        results[key] = {m: v["mean"] for m, v in summary["paper_protocol"].items()}
        for group in ("per_appearance", "per_category"):
            results[group][key] = {name: {"n": s["n_with_gt"], "iou": s["paper_protocol"]["iou"]["mean"]}
                                   for name, s in summary.get(group, {}).items()}
    results["wall_seconds"] = round(time.time() - t0, 1)
    results["step_seconds"] = timings
    results["settings"] = cfg
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results)
    write_figure(out / "figure.png", data, out)
    return 0


def print_table(results: dict) -> None:
    """The overall table, then IoU per appearance item and per occluder category for every stage (Markdown)."""
    metrics = ["iou", "accuracy", "precision", "recall", "f1"]
    print("\n| stage | " + " | ".join(metrics) + " |\n|---|" + "---|" * len(metrics))
    for key in STAGES:
        print(f"| {key} | " + " | ".join(f"{results[key][m]:.3f}" for m in metrics) + " |")
    for group, title, note in (("per_appearance", "appearance item", " (an image counts in every item it has)"),
                               ("per_category", "occluder category", "")):
        names = list(results.get(group, {}).get("step2_prelim", {}))
        if not names:
            continue
        print(f"\nIoU per {title}{note}:\n")
        print(f"| {title} | test images | " + " | ".join(STAGES) + " |\n|---|---|" + "---|" * len(STAGES))
        for name in names:
            n = results[group]["step2_prelim"][name]["n"]
            values = [results[group].get(key, {}).get(name, {}).get("iou") for key in STAGES]
            print(f"| {name} | {n} | " + " | ".join("n/a" if v is None else f"{v:.3f}" for v in values) + " |")
    print(f"\nwall time: {results['wall_seconds']:.0f} s")


def figure_picks(data: Path, rows: int = FIGURE_ROWS) -> list[dict]:
    """Test images for the figure: each new one adds an appearance item or occluder category not shown yet
    (then the rest in order), so the figure shows the variety of the benchmark."""
    import csv

    with (data / "ground_truth.csv").open(newline="") as handle:
        test = [row for row in csv.DictReader(handle) if row["split"] == "test"]
    shown: set[str] = set()
    picks: list[dict] = []
    for row in test:
        labels = {f"occ:{row['category']}", *(f"app:{a}" for a in row.get("appearance", "none").split("+"))}
        if labels - shown and len(picks) < rows:
            picks.append(row)
            shown |= labels
    return picks + [row for row in test if row not in picks][:rows - len(picks)]


def write_figure(path: Path, data: Path, out: Path, rows: int = FIGURE_ROWS) -> None:
    """A grid of test faces: input, GT mask, then each stage's estimated mask, one face per row, with captions."""
    import cv2
    import numpy as np

    from utils.data.unet_trainset import stem_for

    columns = ["input", "GT", "oracle", "step2", "step3", "step4"]  # the masks of STAGES, in order
    lines = []
    for row in figure_picks(data, rows):
        name = row["filename"]
        image = cv2.imread(str(data / "Dataset" / name))
        gt = cv2.imread(str(data / "Dataset" / name.replace(".png", "_visible_skin_mask.png")))
        masks = [cv2.imread(str(out / key / "images" / f"{stem_for(name)}_estmask.png")) for key in STAGES]
        if image is None or gt is None or any(m is None for m in masks):
            continue
        tiles = [image, gt, *[cv2.resize(m, image.shape[1::-1], interpolation=cv2.INTER_NEAREST) for m in masks]]
        strip = np.concatenate(tiles, axis=1)
        caption = np.zeros((14, strip.shape[1], 3), np.uint8)
        text = f"{row['category']} | {row.get('appearance', 'none')}"
        cv2.putText(caption, text, (2, 10), cv2.FONT_HERSHEY_PLAIN, 0.8, (255, 255, 255), 1, cv2.LINE_AA)
        lines.append(np.concatenate([strip, caption], axis=0))
    if not lines:
        return
    width = lines[0].shape[1] // len(columns)
    header = np.zeros((14, lines[0].shape[1], 3), np.uint8)
    for k, title in enumerate(columns):
        cv2.putText(header, title, (k * width + 2, 10), cv2.FONT_HERSHEY_PLAIN, min(0.8, width / 60), (255, 255, 255),
                    1, cv2.LINE_AA)
    cv2.imwrite(str(path), np.concatenate([header, *lines], axis=0))


if __name__ == "__main__":
    cli_main(main)
