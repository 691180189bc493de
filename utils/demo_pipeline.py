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
from utils.errors import DataError
from utils.evaluation.evaluate import run_evaluation

REPO = repo_root()

# Step 4's EM cycle: UNet phases of unet_iters + 1 steps, then MoFA steps; the run ends inside a MoFA phase, as the
# original's 130 epochs end with ~25k MoFA steps. The dist term is dropped with the dlib identity network (README,
# "Demo results": with dlib's features dist alone outweighs the area term, and the empty mask becomes the UNet
# phase's optimum); the identity and preserve terms stay on.
DEMO = {
    "num_images": 1200,
    "image_size": 96,
    "encoder": "resnet18",
    "unet_width": 16,
    "step1": ["--max_iters", "1800", "--batch_size", "16", "--optimizer", "adam", "--learning_rate", "1e-3",
              "--lr_step", "700", "--lr_gamma", "0.5"],
    "step3": ["--max_iters", "300", "--batch_size", "16", "--optimizer", "adam", "--learning_rate", "1e-3"],
    "step4": ["--max_iters", "300", "--batch_size", "16", "--em_cycle", "150", "--unet_iters", "50",
              "--optimizer", "adam", "--lr_mofa", "2e-4", "--lr_unet", "1e-4", "--drop_terms", "dist"],
}
QUICK = {**DEMO, "num_images": 60, "image_size": 32,
         "step1": ["--max_iters", "4", "--batch_size", "8", "--optimizer", "adam", "--learning_rate", "1e-3"],
         "step3": ["--max_iters", "2", "--batch_size", "8", "--optimizer", "adam", "--learning_rate", "1e-3"],
         "step4": ["--max_iters", "3", "--batch_size", "8", "--em_cycle", "3", "--unet_iters", "1",
                   "--optimizer", "adam", "--drop_terms", "dist"]}
# The paper's scale as far as it is known to work without ImageNet weights: 224 px, ResNet-50, the paper's UNet
# width, Adam (Adadelta needs the original's ~300k steps), 20x the demo's images and ~17x its steps. For a GPU or a
# long CPU run; `--scale F` shrinks every step count and the image count by F (for a trial run of the profile).
FULL = {
    "num_images": 24000,
    "image_size": 224,
    "encoder": "resnet50",
    "unet_width": 64,
    "step1": ["--max_iters", "30000", "--batch_size", "12", "--optimizer", "adam", "--learning_rate", "5e-4",
              "--lr_step", "10000", "--lr_gamma", "0.5"],
    "step3": ["--max_iters", "5000", "--batch_size", "12", "--optimizer", "adam", "--learning_rate", "5e-4"],
    "step4": ["--max_iters", "5000", "--batch_size", "12", "--em_cycle", "2500", "--unet_iters", "500",
              "--optimizer", "adam", "--lr_mofa", "1e-4", "--lr_unet", "5e-5", "--drop_terms", "dist"],
}
PROFILES = {"demo": DEMO, "quick": QUICK, "full": FULL}
SCALED_FLAGS = ("--max_iters", "--em_cycle", "--unet_iters", "--lr_step")


def scaled(cfg: dict, factor: float) -> dict:
    """``cfg`` with the image count and every step count (iterations, EM cycle, UNet phase, StepLR period) times
    ``factor``, each at least 1 (images at least 60). Step 4 still ends in a MoFA phase: if rounding would end it
    in a UNet phase (step ct is a UNet step when ct % em_cycle <= unet_iters), it runs to the end of that cycle."""
    if factor == 1.0:
        return cfg
    out = {**cfg, "num_images": max(60, round(cfg["num_images"] * factor))}
    for step in ("step1", "step3", "step4"):
        flags = list(cfg[step])
        for i, flag in enumerate(flags[:-1]):
            if flag in SCALED_FLAGS:
                flags[i + 1] = str(max(1, round(int(flags[i + 1]) * factor)))
        out[step] = flags
    step4 = out["step4"]
    at = {flag: step4.index(flag) + 1 for flag in ("--max_iters", "--em_cycle", "--unet_iters")}
    end, cycle, unet = (int(step4[at[flag]]) for flag in ("--max_iters", "--em_cycle", "--unet_iters"))
    if (end - 1) % cycle <= unet:
        step4[at["--em_cycle"]] = str(max(cycle, unet + 2))
        cycle = int(step4[at["--em_cycle"]])
        step4[at["--max_iters"]] = str(-(-end // cycle) * cycle)
    return out


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
    p.add_argument("--profile", choices=tuple(PROFILES), default="demo",
                   help="demo (default: make demo, ~20 min on 2 CPU cores), quick (a smoke run, numbers "
                        "meaningless) or full (224 px, ResNet-50: a GPU or a long CPU run, see README)")
    p.add_argument("--quick", action="store_true", help="the same as --profile quick")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply the profile's image count and step counts by this (e.g. 0.01 for a trial run)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if not 0.0 < args.scale <= 1.0:
        raise DataError(f"--scale {args.scale}: expected a number in (0, 1]")
    cfg = scaled(PROFILES["quick" if args.quick else args.profile], args.scale)
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
            results[group][key] = {name: {"n": s["n_with_gt"],
                                          **{m: s["paper_protocol"][m]["mean"] for m in ("iou", "f1", "recall")}}
                                   for name, s in summary.get(group, {}).items()}
    results["wall_seconds"] = round(time.time() - t0, 1)
    results["step_seconds"] = timings
    results["settings"] = cfg
    results["profile"], results["scale"] = "quick" if args.quick else args.profile, args.scale
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
    print_recovered(results)
    print(f"\nwall time: {results['wall_seconds']:.0f} s")


def recovered_share(step2_recall: float, step4_recall: float) -> float | None:
    """Of the visible-face pixels that Step 2 marks as occluded (1 - its recall), the share Step 4 keeps visible,
    estimated from the two recalls: (r4 - r2) / (1 - r2); None when Step 2 misses nothing."""
    return None if step2_recall >= 1.0 else (step4_recall - step2_recall) / (1.0 - step2_recall)


def print_recovered(results: dict) -> None:
    """Visible-face recall per appearance item (Step 2, Step 4) and the share of Step 2's lost face pixels that
    Step 4 keeps (the target is at least half on every out-of-model item)."""
    step2, step4 = (results.get("per_appearance", {}).get(k, {}) for k in ("step2_prelim", "step4_final"))
    if not step2 or not step4:
        return
    print("\nVisible-face recall per appearance item, and the share of Step 2's lost face pixels that Step 4 keeps:\n")
    print("| appearance item | step2 recall | step4 recall | kept by step4 |\n|---|---|---|---|")
    for name, s2 in step2.items():
        s4 = step4.get(name)
        if s4 is None:
            continue
        share = recovered_share(s2["recall"], s4["recall"])
        print(f"| {name} | {s2['recall']:.3f} | {s4['recall']:.3f} | " + ("n/a" if share is None else f"{share:.2f}")
              + " |")


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
