# ruff: noqa: E402  (the imports follow the start-up Ctrl-C handler)
"""`make demo`: the whole method on the synthetic default, end to end, on a CPU.

    python -m utils.demo_pipeline [--out demo_output] [--data DIR] [--profile demo|quick|full] [--scale F]
                                  [--from_step N] [--ablation]

1. writes the procedural demo face model (basel_3DMM/demo_face_model.h5) if it is missing;
2. renders the synthetic occluded-face dataset into --data (default demo_data, or demo_data_<profile>) when it is
   missing or empty; a --data holding another set than the profile's (size, count, seed, face model: read from its
   synthetic_config.json) is refused;
3. runs Step 1 to Step 4 as a user would (the same scripts, in subprocesses, each in its own process group: a
   Ctrl-C is forwarded once and the step writes its checkpoint) with demo-sized settings;
4. evaluates the masks of every stage on the test split (the fit oracle, i.e. Step 2's rule on the render of the
   true coefficients; Step 2's preliminary masks, Step 3's UNet, Step 4's final masks), prints the tables overall,
   per appearance item and per occluder category, and writes <out>/results.json and <out>/figure.png (test faces
   with their GT and each stage's mask).

5. with ``--ablation``, also trains the Step-4 variants of ``ABLATIONS`` from the same Step-1 and Step-3 models
   (each into <out>/ablation/<name>/) and prints the ablation table: IoU and F1 overall, per appearance item and
   per occluder category (``make ablation``).

``--from_step N`` reuses the outputs of Steps 1 to N-1 already under <out> (the step scripts check that they
exist and match) and runs Step N onwards; ``--from_step 5 --ablation`` (``make ablation``) adds the ablation to a
finished demo.

The demo settings trade the paper's scale for a run of minutes on a CPU: ResNet-18 from random initialisation, 96 px
images, a UNet of width 16, Adam instead of Adadelta (which needs hundreds of thousands of steps), a few hundred
steps per step and a shortened EM cycle. They are listed in DEMO below and written to results.json.
"""
from __future__ import annotations

if __name__ == "__main__":  # Ctrl-C while torch is imported: one line, no traceback (utils/startup.py)
    from utils.startup import quiet_interrupts
    quiet_interrupts()

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from utils.atomic_write import atomic_write
from utils.cli import cli_main, repo_root
from utils.data.benchmark_files import appearance_items, read_ground_truth_rows
from utils.errors import DataError, MofaError
from utils.evaluation.command import run_evaluation
from utils.training.builders import FINAL_NAME, STEP_DIRS, STEP_SCRIPTS

REPO = repo_root()

# Step 1 runs without identity features: with dlib's network they cost +0.28 s per step (0.64 against 0.36 s), 8 of
# the demo's 20 minutes. Step 4's EM cycle: UNet phases of unet_iters + 1 steps, then MoFA steps; the run ends inside
# a MoFA phase, as the original's 130 epochs end with ~25k MoFA steps. Step 4's identity and preserve terms use dlib's
# network; its dist term is dropped (docs/results.md §4: `make ablation` trains Step 4 with it too).
DEMO = {
    "num_images": 1200,
    "image_size": 96,
    "encoder": "resnet18",
    "unet_width": 16,
    "step1": ["--max_iters", "1800", "--batch_size", "16", "--optimizer", "adam", "--learning_rate", "1e-3",
              "--lr_step", "700", "--lr_gamma", "0.5", "--identity", "none"],
    "step3": ["--max_iters", "300", "--batch_size", "16", "--optimizer", "adam", "--learning_rate", "1e-3"],
    "step4": ["--max_iters", "300", "--batch_size", "16", "--em_cycle", "150", "--unet_iters", "50",
              "--optimizer", "adam", "--lr_mofa", "2e-4", "--lr_unet", "1e-4", "--drop_terms", "dist"],
}
QUICK = {**DEMO, "num_images": 60, "image_size": 32,
         "step1": ["--max_iters", "4", "--batch_size", "8", "--optimizer", "adam", "--learning_rate", "1e-3",
                   "--identity", "none"],
         "step3": ["--max_iters", "2", "--batch_size", "8", "--optimizer", "adam", "--learning_rate", "1e-3"],
         "step4": ["--max_iters", "3", "--batch_size", "8", "--em_cycle", "3", "--unet_iters", "1",
                   "--optimizer", "adam", "--drop_terms", "dist"]}
# The paper's scale as far as it is known to work without ImageNet weights: 224 px, ResNet-50, the paper's UNet
# width, Adam (Adadelta needs the original's ~300k steps), 20x the demo's images and ~17x its steps. For a GPU or a
# long CPU run; `--scale F` shrinks every step count and the image count by F (for a trial run of the profile).
FULL = {
    "num_images": 24000,
    "workers": 4,  # DataLoader processes: decoding 224-px images in the training process would starve a GPU
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
STEP_NAMES = ("step1", "step2", "step3", "step4")
FIGURE_ROWS = 8
# The ablation (``--ablation``): Step-4 variants trained from the run's own Step-1 and Step-3 models. Each maps flags
# to the value that replaces (or, if absent, is appended to) the profile's Step-4 flags; the paper's way of showing
# that each term earns its keep. ``all_terms`` puts back the dist term the profiles drop; ``--identity none`` removes
# the identity, preserve and dist terms together; ``no_bn_recalibration`` keeps the BatchNorm statistics of training
# in Step 4 (the original's handling there; the Step-3 model it starts from keeps its re-estimation).
ABLATIONS = {
    "all_terms": {"--drop_terms": ""},
    "no_identity": {"--identity": "none"},
    "no_neighbour": {"--drop_terms": "+neighbour"},
    "g1_preset": {"--loss_preset": "g1_weights"},
    "g1_all_terms": {"--loss_preset": "g1_weights", "--drop_terms": ""},
    "no_bn_recalibration": {"--bn_recalibration": "0"},
}


class DemoError(MofaError):
    """A command of the demo failed (its own messages are printed above) or its inputs do not fit together."""


def run(cmd: list[str]) -> None:
    """Run one command of the pipeline with this Python, in the repository; DemoError when it fails.

    The command runs in its own process group (a new session), so a Ctrl-C at the terminal reaches only the demo,
    which forwards each SIGINT / SIGTERM once to the command's group and waits for it to end: a training step
    finishes its step and writes a checkpoint (a second signal repeats its notice, a third aborts it). The demo then
    stops with KeyboardInterrupt (one line, exit 130)."""
    print("+", " ".join(cmd), flush=True)
    received: list[int] = []
    child = subprocess.Popen([sys.executable, *cmd], cwd=REPO, start_new_session=True)

    def forward(signum, frame) -> None:
        received.append(signum)
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:  # it has just ended
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise KeyboardInterrupt
    if status != 0:
        raise DemoError(f"{cmd[1] if cmd[0] == '-m' else cmd[0]} failed (exit status {status}); its messages are "
                        "above")


def with_flags(flags: list[str], overrides: dict[str, str]) -> list[str]:
    """``flags`` (``[--name, value, ...]``) with each ``overrides`` value replacing that flag's, or appended. A value
    ``+x`` adds ``x`` to the flag's comma-separated list instead (``--drop_terms +neighbour``)."""
    out = list(flags)
    for name, value in overrides.items():
        if value.startswith("+"):
            value = ",".join(filter(None, [out[out.index(name) + 1] if name in out else "", value[1:]]))
        if name in out:
            out[out.index(name) + 1] = value
        else:
            out += [name, value]
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "demo_output"))
    p.add_argument("--data", default=None,
                   help="the synthetic image root (default: <repo>/demo_data for --profile demo, demo_data_<profile> "
                        "for the others, with _x<scale> for a --scale other than 1); written when missing or empty, "
                        "refused when it holds another set than the profile's")
    p.add_argument("--bfm", default=str(REPO / "basel_3DMM" / "demo_face_model.h5"))
    p.add_argument("--profile", choices=tuple(PROFILES), default="demo",
                   help="demo (default: make demo, ~20 min on 2 CPU cores), quick (a smoke run, numbers "
                        "meaningless) or full (224 px, ResNet-50: a GPU or a long CPU run, see README)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply the profile's image count and step counts by this (e.g. 0.01 for a trial run)")
    p.add_argument("--from_step", type=int, choices=(1, 2, 3, 4, 5), default=1,
                   help="run Steps N to 4, reusing the outputs of the earlier steps under --out (5: none, only the "
                        "evaluation and, with --ablation, the variants)")
    p.add_argument("--ablation", action="store_true",
                   help="also train and evaluate the Step-4 variants of the ablation table (make ablation)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if not 0.0 < args.scale <= 1.0:
        raise DataError(f"--scale {args.scale}: expected a number in (0, 1]")
    if args.data is None:
        name = "demo_data" if args.profile == "demo" else f"demo_data_{args.profile}"
        args.data = str(REPO / (name + ("" if args.scale == 1.0 else f"_x{args.scale:g}")))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = scaled(PROFILES[args.profile], args.scale)
    t0 = time.time()
    out, data, save_root = Path(args.out), Path(args.data), Path(args.out) / "MoFA_UNet_Save"
    previous = reused_results(out / "results.json", args)
    out.mkdir(parents=True, exist_ok=True)
    if not Path(args.bfm).is_file():
        run(["-m", "utils.synthetic.demo_face_model", "--out", args.bfm])
    data_info = prepare_data(args, cfg, data)
    periods = ["--vis_every", "200", "--eval_every", "500", "--log_every", "25", "--val_batches", "4"]
    step_flags = {"step1": cfg["step1"] + periods, "step2": [], "step3": cfg["step3"] + periods,
                  "step4": cfg["step4"] + periods}
    if args.from_step <= 3:  # new Step-1 or Step-3 models: the variants trained from the old ones are stale
        shutil.rmtree(out / "ablation", ignore_errors=True)
    timings = {name: previous["step_seconds"][name] for name in STEP_NAMES[:args.from_step - 1]
               if name in previous.get("step_seconds", {})}
    for number, name in enumerate(STEP_NAMES, start=1):
        if number >= args.from_step:
            t = time.time()
            run([STEP_SCRIPTS[number], *common_flags(args, cfg, data, save_root), *step_flags[name]])
            timings[name] = round(time.time() - t, 1)
    results = {"per_appearance": {}, "per_category": {}}
    for key, stage in STAGES.items():
        record_stage(results, key, evaluate_stage(args, data, save_root, stage, out / key))
    results["wall_seconds"] = round(time.time() - t0, 1)
    results["step_seconds"] = timings
    results["settings"] = cfg
    results["profile"], results["scale"], results["from_step"] = args.profile, args.scale, args.from_step
    results["data"] = data_info
    write_results(out, results)
    if args.ablation:  # results.json is rewritten after every variant, so a failed one loses nothing
        results["ablation"] = run_ablation(args, cfg, data, save_root, step_flags["step4"], out / "ablation",
                                           results, lambda: write_results(out, results))
        write_results(out, results)
    print_table(results)
    if args.ablation:
        print_ablation(results["ablation"])
    write_figure(out / "figure.png", data, out)
    return 0


DATA_SEED = 0  # the demo's data: utils.synthetic.faces with its defaults (mixed occlusion and appearance, seed 0)


def data_mismatch(config: dict, cfg: dict, face_model: dict | None) -> list[str]:
    """How the set described by ``config`` (its synthetic_config.json) differs from what profile ``cfg`` needs."""
    want = {"num": cfg["num_images"], "size": cfg["image_size"], "seed": DATA_SEED, "occlusion": "mixed",
            "appearance": "mixed"}
    found = [f"{key} {config.get(key)!r} (needs {value!r})" for key, value in want.items() if config.get(key) != value]
    if face_model is not None and config.get("face_model") != face_model:
        found.append("another face model than --bfm")
    return found


def prepare_data(args, cfg: dict, data: Path) -> dict:
    """Make sure ``data`` holds the profile's synthetic set: write it into a missing or empty folder; refuse (one
    line, nothing changed) a folder that holds anything else, a set of another size, count, seed or face model
    included, so the models are trained on, and results.json reports, the profile's data. Returns what
    results.json records about the data (path, images, size, seed)."""
    from models.face_model import FaceModel
    from models.layout import CoeffLayout

    config_path = data / "synthetic_config.json"
    if not data.exists() or (data.is_dir() and not any(data.iterdir())):
        run(["-m", "utils.synthetic.faces", "--bfm", args.bfm, "--out", str(data), "--num", str(cfg["num_images"]),
             "--size", str(cfg["image_size"]), "--seed", str(DATA_SEED)])
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise DemoError(f"--data {data} is not a set written by utils.synthetic.faces (no readable "
                        f"{config_path.name}); pass another --data, or an empty folder to have it written") from None
    face_model = FaceModel.from_h5(args.bfm, CoeffLayout()).config() if Path(args.bfm).is_file() else None
    differs = data_mismatch(config, cfg, face_model)
    if differs:
        raise DemoError(f"--data {data} holds another set than --profile {args.profile}"
                        f"{'' if args.scale == 1.0 else f' --scale {args.scale:g}'} needs: {', '.join(differs)}; pass "
                        "another --data (a missing or empty folder is written), or delete this one")
    return {"path": str(data), "num_images": config["num"], "image_size": config["size"], "seed": config["seed"]}


def reused_results(path: Path, args) -> dict:
    """The results.json of the run whose Steps 1 .. from_step-1 a ``--from_step`` run reuses ({} for a run from Step
    1, or when there is none: the step scripts still check that their inputs exist and fit). DemoError when that
    run used another profile or scale: its models were not trained with the settings this run would report."""
    if args.from_step == 1 or not path.is_file():
        return {}
    try:
        previous = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DemoError(f"{path}: cannot read it ({exc}); run from Step 1 (without --from_step)") from None
    earlier = (previous.get("profile"), previous.get("scale"))
    if earlier != (args.profile, args.scale):
        raise DemoError(f"--from_step {args.from_step}: the steps in {path.parent} were made with --profile "
                        f"{earlier[0]} --scale {earlier[1]}, not --profile {args.profile} --scale {args.scale}; pass "
                        "those, or run from Step 1")
    if not isinstance(previous.get("step_seconds"), dict):
        previous["step_seconds"] = {}
    return previous


def write_results(out: Path, results: dict) -> None:
    """``<out>/results.json``, written atomically. ``step_seconds`` holds every step's time, from the run that made
    it (a ``--from_step`` run keeps the earlier run's); ``wall_seconds`` is this invocation's, ablation excluded."""
    with atomic_write(out / "results.json", "w") as handle:
        handle.write(json.dumps(results, indent=2))


def common_flags(args, cfg: dict, data: Path, save_root: Path) -> list[str]:
    """The flags every step of one run shares; a demo run replaces the previous one (--overwrite)."""
    return ["--img_path", str(data), "--bfm", args.bfm, "--save_root", str(save_root), "--device", args.device,
            "--workers", str(cfg.get("workers", 0)), "--image_size", str(cfg["image_size"]),
            "--encoder", cfg["encoder"], "--unet_width", str(cfg["unet_width"]), "--overwrite"]


def evaluate_stage(args, data: Path, save_root: Path, stage: str, out: Path) -> dict:
    """The evaluation command's summary of ``stage`` on the test split (mask images saved for the figure)."""
    return run_evaluation(["--img_path", str(data), "--split", "test", "--save_root", str(save_root),
                           "--bfm", args.bfm, "--device", args.device, "--stage", stage, "--out", str(out),
                           "--save_images", "--overwrite"])


OCCLUDER_KEYS = ("occluder_iou", "occluder_recall", "occluder_precision")


def _group_record(s: dict) -> dict:
    """One group's entry (a category or an appearance item): its image count, IoU / F1 / recall means, the all-face
    mask's IoU, and the occluder metrics pooled over its images with a GT occluder (``n_occluded`` of them)."""
    return {"n": s["n_with_gt"], **{m: s["paper_protocol"][m]["mean"] for m in ("iou", "f1", "recall")},
            "all_face_iou": s["all_face"]["paper_protocol"]["iou"]["mean"],
            "n_occluded": s["occluders"]["n_images"], **{m: s["occluders"][m] for m in OCCLUDER_KEYS}}


def record_stage(results: dict, key: str, summary: dict) -> None:
    """Put one stage's paper-protocol means (overall, per appearance item, per occluder category) into results,
    with the yardsticks: ``all_face`` (the same region, every pixel called visible: its metric means and pooled
    occluder metrics) and ``occluders`` (occluder IoU / recall / precision pooled over the test images with a GT
    occluder, and their count ``n_images``)."""
    results[key] = {m: v["mean"] for m, v in summary["paper_protocol"].items()}
    results[key]["all_face"] = {**{m: v["mean"] for m, v in summary["all_face"]["paper_protocol"].items()},
                                **{m: summary["all_face"]["occluders"][m] for m in OCCLUDER_KEYS}}
    results[key]["occluders"] = dict(summary["occluders"])
    for group in ("per_appearance", "per_category"):
        results.setdefault(group, {})[key] = {name: _group_record(s) for name, s in summary.get(group, {}).items()}


def run_ablation(args, cfg: dict, data: Path, save_root: Path, step4_flags: list[str], out: Path,
                 results: dict, checkpoint=lambda: None) -> dict:
    """Train every ``ABLATIONS`` variant of Step 4 from the run's Step-1 and Step-3 models and evaluate it; returns
    the rows of the ablation table (Step 2, Step 3, the run's Step 4 and the variants), in results' format.
    ``checkpoint()`` is called after each variant (with its stage already in ``results``)."""
    rows = ["step2_prelim", "step3_unet", "step4_final"]
    table = {"rows": {}, "seconds": {}}
    previous = ["--pretrained_MoFA", str(save_root / STEP_DIRS[1] / FINAL_NAME),
                "--pretrained_unet", str(save_root / STEP_DIRS[3] / FINAL_NAME)]
    for name, overrides in ABLATIONS.items():
        variant_root = out / name / "MoFA_UNet_Save"
        t = time.time()
        run([STEP_SCRIPTS[4], *common_flags(args, cfg, data, variant_root), *with_flags(step4_flags, overrides),
             *previous])
        table["seconds"][name] = round(time.time() - t, 1)
        record_stage(results, f"step4_{name}", evaluate_stage(args, data, variant_root, "step4", out / name / "eval"))
        rows.append(f"step4_{name}")
        checkpoint()
    for key in rows:
        table["rows"][key] = {"overall": {m: results[key][m] for m in ("iou", "f1")},
                              "per_appearance": {n: v["iou"] for n, v in results["per_appearance"][key].items()},
                              "per_category": {n: v["iou"] for n, v in results["per_category"][key].items()}}
    table["flags"] = {name: overrides for name, overrides in ABLATIONS.items()}
    return table


def print_ablation(table: dict) -> None:
    """The ablation table (Markdown): IoU and F1 overall, then IoU per appearance item and per occluder category."""
    rows = table["rows"]
    print("\nAblation (test split, paper protocol; Step-4 variants trained from the same Step-1 and Step-3 models):\n")
    print("| row | IoU | F1 |\n|---|---|---|")
    for row, values in rows.items():
        print(f"| {row} | {values['overall']['iou']:.3f} | {values['overall']['f1']:.3f} |")
    for group, title in (("per_appearance", "appearance item"), ("per_category", "occluder category")):
        names = list(next(iter(rows.values()))[group])
        print(f"\nIoU per {title}:\n")
        print("| row | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
        for row, values in rows.items():
            print(f"| {row} | " + " | ".join(f"{values[group].get(n, float('nan')):.3f}" for n in names) + " |")


def _cell(value) -> str:
    return "n/a" if value is None or value != value else f"{value:.3f}"


def print_table(results: dict) -> None:
    """The overall table with the yardsticks (the all-face mask's IoU, the pooled occluder metrics), then IoU,
    all-face IoU and occluder recall per appearance item and per occluder category for every stage (Markdown)."""
    metrics = ["iou", "accuracy", "precision", "recall", "f1"]
    n_occluded = results[next(iter(STAGES))]["occluders"]["n_images"]
    print(f"\nTest split, paper protocol; all-face = the same region with every pixel called visible; occluder "
          f"metrics pooled over the {n_occluded} images with a GT occluder:\n")
    head = [*metrics, "all-face iou", "occluder iou", "occluder recall", "occluder precision"]
    print("| stage | " + " | ".join(head) + " |\n|---|" + "---|" * len(head))
    for key in STAGES:
        r = results[key]
        values = [r[m] for m in metrics] + [r["all_face"]["iou"]] + [r["occluders"][m] for m in OCCLUDER_KEYS]
        print(f"| {key} | " + " | ".join(_cell(v) for v in values) + " |")
    for group, title, note in (("per_appearance", "appearance item", " (an image counts in every item it has)"),
                               ("per_category", "occluder category", "")):
        names = list(results.get(group, {}).get("step2_prelim", {}))
        if not names:
            continue
        for value, what in (("iou", "IoU"), ("all_face_iou", "all-face IoU"), ("occluder_recall", "Occluder recall"),
                            ("occluder_iou", "Occluder IoU")):
            if group == "per_appearance" and value.startswith("occluder"):
                continue  # appearance items are visible face: their occluders are the categories'
            count, counted = ("n_occluded", "with occluder") if value.startswith("occluder") else ("n", "test images")
            print(f"\n{what} per {title}{note}:\n")
            print(f"| {title} | {counted} | " + " | ".join(STAGES) + " |\n|---|---|" + "---|" * len(STAGES))
            for name in names:
                n = results[group]["step2_prelim"][name][count]
                values = [results[group].get(key, {}).get(name, {}).get(value) for key in STAGES]
                print(f"| {name} | {n} | " + " | ".join(_cell(v) for v in values) + " |")
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
    test = read_ground_truth_rows(data, "test")
    shown: set[str] = set()
    picks: list[dict] = []
    for row in test:
        labels = {f"occ:{row['category']}", *(f"app:{a}" for a in appearance_items(row.get("appearance", "none")))}
        if labels - shown and len(picks) < rows:
            picks.append(row)
            shown |= labels
    return picks + [row for row in test if row not in picks][:rows - len(picks)]


def write_figure(path: Path, data: Path, out: Path, rows: int = FIGURE_ROWS) -> None:
    """A grid of test faces: input, GT mask, then each stage's estimated mask, one face per row, with captions."""
    import cv2
    import numpy as np

    from utils.data.image_root import gt_mask_path
    from utils.data.unet_trainset import stem_for

    columns = ["input", "GT", "oracle", "step2", "step3", "step4"]  # the masks of STAGES, in order
    lines = []
    for row in figure_picks(data, rows):
        name = row["filename"]
        image = cv2.imread(str(data / "Dataset" / name))
        gt = cv2.imread(str(gt_mask_path(data / "Dataset" / name)))
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
