"""`make demo`: the whole method on the synthetic default, end to end, on a CPU.

    python -m utils.demo_pipeline [--out demo_output] [--data demo_data] [--quick]

1. writes the procedural demo face model (basel_3DMM/demo_face_model.h5) if it is missing;
2. renders the synthetic occluded-face dataset into --data;
3. runs Step 1 to Step 4 as a user would (the same scripts, in subprocesses) with demo-sized settings;
4. evaluates the masks of every stage on the test split (Step 2's preliminary masks, Step 3's UNet, Step 4's final
   masks), prints a table, and writes <out>/results.json and <out>/figure.png.

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
STAGES = {"step2_prelim": "step2", "step3_unet": "step3", "step4_final": "step4"}


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
    results = {}
    for key, stage in STAGES.items():
        summary = run_evaluation(["--img_path", str(data), "--split", "test", "--save_root", str(save_root),
                            "--bfm", args.bfm, "--device", args.device, "--stage", stage,
                            "--out", str(out / key), *(["--save_images"] if stage == "step4" else [])])
        results[key] = {m: v["mean"] for m, v in summary["paper_protocol"].items()}
    results["wall_seconds"] = round(time.time() - t0, 1)
    results["step_seconds"] = timings
    results["settings"] = cfg
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results)
    write_figure(out / "figure.png", out / "step4_final")
    return 0


def print_table(results: dict) -> None:
    metrics = ["iou", "accuracy", "precision", "recall", "f1"]
    print("\n| stage | " + " | ".join(metrics) + " |\n|---|" + "---|" * len(metrics))
    for key in STAGES:
        print(f"| {key} | " + " | ".join(f"{results[key][m]:.3f}" for m in metrics) + " |")
    print(f"\nwall time: {results['wall_seconds']:.0f} s")


def write_figure(path: Path, images_dir: Path, rows: int = 8) -> None:
    """Inputs, reconstructions and final masks of the first test images side by side, as one PNG."""
    import cv2
    import numpy as np
    tiles = []
    for org in sorted(images_dir.rglob("*_org.png"))[:rows]:
        parts = [cv2.imread(str(org).replace("_org.png", s)) for s in ("_org.png", "_result.png", "_estmask.png")]
        if all(p is not None for p in parts):
            tiles.append(np.concatenate(parts, axis=1))
    if tiles:
        cv2.imwrite(str(path), np.concatenate(tiles, axis=0))


if __name__ == "__main__":
    cli_main(main)
