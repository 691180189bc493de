# ruff: noqa: E402  (the imports follow the start-up Ctrl-C handler)
"""`make demo`: the whole method on the synthetic default, end to end, on a CPU.

    python -m utils.demo_pipeline [--out demo_output] [--data DIR] [--profile demo|quick|full] [--scale F]
                                  [--from_step N] [--seeds K] [--seed S] [--ablation] [--ablation_rows a,b,c]

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

5. with ``--ablation``, also trains the variants of ``ABLATIONS`` (each into <out>/ablation/<name>/; a variant of
   Step 4 alone starts from the run's own Step-1 and Step-3 models, a variant of an earlier step reruns the steps
   from it on) and prints the ablation table: the headline figures, and IoU per appearance item and per occluder
   category (``make ablation``). ``--ablation_rows a,b`` trains only those variants (``augment`` retrains Steps
   1-4: it costs a whole demo). A variant stopped by the collapse guard (exit 2, "mask collapse") is recorded as
   collapsed, with the step, and the ablation goes on.

``--seeds K`` repeats steps 3-5 K times on the same data (one synthetic set, written once with its own seed 0), with
the steps' ``--seed`` = S, S+1, ..., S+K-1 (``--seed S``, default 0). With K = 1 the layout is the single run's
(<out>/MoFA_UNet_Save, <out>/<stage>/, results.json as always); with K > 1 each seed has its own folder
<out>/seed_<s>/ (its save root, its evaluations, its ablation), results.json reports each headline figure and each
ablation row as mean, std (ddof 1) and n over the seeds, keeps every seed's own figures under ``per_seed``, and the
ablation table marks the rows whose difference from the demo's Step 4 is within the spread (``exceeds_spread``).

``--from_step N`` reuses the outputs of Steps 1 to N-1 already under <out> (the step scripts check that they
exist and match) and runs Step N onwards; ``--from_step 5 --ablation`` (``make ablation``) adds the ablation to a
finished demo (with the same --seeds and --seed).

The demo settings trade the paper's scale for a run of minutes on a CPU: ResNet-18 from random initialisation, 96 px
images, a UNet of width 16, Adam instead of Adadelta (which needs hundreds of thousands of steps), a few hundred
steps per step and a shortened EM cycle. They are listed in DEMO below and written to results.json.
"""
from __future__ import annotations

if __name__ == "__main__":  # Ctrl-C while torch is imported: one line, no traceback (utils/startup.py)
    from utils.startup import quiet_interrupts
    quiet_interrupts()

import argparse
import codecs
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from utils.atomic_write import atomic_write
from utils.cli import cli_main, repo_root
from utils.data.benchmark_files import appearance_items, read_ground_truth_rows
from utils.errors import DataError, MofaError
from utils.evaluation.command import run_evaluation
from utils.training.builders import FINAL_NAME, STEP_DIRS, STEP_SCRIPTS

REPO = repo_root()

# Test-time fitting steps of the demo's Step 2 and its "step4_fitted" row: on the demo's test split 50 steps took the
# Step-2 rule from 0.666 to 0.841 IoU (all-face 0.811) and the landmark error from 2.93 to 1.06 px, at 2.4-4 ms per
# image per step on a busy 2-core CPU (docs/results.md §9); Step 2 then costs about 1-2 minutes more.
FIT_STEPS = 50

# Step 1 runs without identity features: with dlib's network they cost +0.28 s per step (0.64 against 0.36 s), 8 of
# the demo's 20 minutes. Step 4's EM cycle: UNet phases of unet_iters + 1 steps, then MoFA steps; the run ends inside
# a MoFA phase, as the original's 130 epochs end with ~25k MoFA steps. Step 4's identity and preserve terms use dlib's
# network; its dist term is dropped (docs/results.md §4: `make ablation` trains Step 4 with it too). G2's augmentation
# is off in Steps 1 and 4 and on in Step 3: at these short schedules Step 4 with it scored 0.774 against 0.828 IoU
# on the validation split (0.772 / 0.823 on test; landmark error 3.11 / 2.86 px), one run each from the same Step-1
# and Step-3 models; Step 1 was measured only without it (`make ablation`'s ``augment`` row trains both with it).
DEMO = {
    "num_images": 1200,
    "image_size": 96,
    "encoder": "resnet18",
    "unet_width": 16,
    "step1": ["--max_iters", "1800", "--batch_size", "16", "--optimizer", "adam", "--learning_rate", "1e-3",
              "--lr_step", "700", "--lr_gamma", "0.5", "--identity", "none", "--no_augment"],
    "step2": ["--fit_steps", str(FIT_STEPS)],
    "step3": ["--max_iters", "300", "--batch_size", "16", "--optimizer", "adam", "--learning_rate", "1e-3"],
    "step4": ["--max_iters", "300", "--batch_size", "16", "--em_cycle", "150", "--unet_iters", "50",
              "--optimizer", "adam", "--lr_mofa", "2e-4", "--lr_unet", "1e-4", "--drop_terms", "dist", "--no_augment"],
}
QUICK = {**DEMO, "num_images": 60, "image_size": 32,
         "step1": ["--max_iters", "4", "--batch_size", "8", "--optimizer", "adam", "--learning_rate", "1e-3",
                   "--identity", "none", "--no_augment"],
         "step3": ["--max_iters", "2", "--batch_size", "8", "--optimizer", "adam", "--learning_rate", "1e-3"],
         "step4": ["--max_iters", "3", "--batch_size", "8", "--em_cycle", "3", "--unet_iters", "1",
                   "--optimizer", "adam", "--drop_terms", "dist", "--no_augment"]}
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


STAGES = {"fit_oracle": "fit_oracle", "step2_prelim": "step2", "step3_unet": "step3", "step4_final": "step4",
          "step4_fitted": "step4"}
# Rows evaluated with test-time fitting (the evaluation's --fit_steps; an extra row: the paper-protocol rows above
# stay feed-forward), and how many steps.
FITTED_STAGES = frozenset({"step4_fitted"})
STEP_NAMES = ("step1", "step2", "step3", "step4")
FIGURE_ROWS = 8
# The ablation (``--ablation``): variants of the run, one per row. Each maps a step ("step1" .. "step4") to flags
# that replace (or, if absent, are appended to) the profile's flags of that step (a value None: a switch, appended);
# a variant reruns the steps from its first one on, into its own save root, and reuses the run's earlier steps (the
# paper's way of showing that each term earns its keep). ``all_terms`` puts back the dist term the profiles drop
# (expected to collapse with the predicted landmarks: issue 19); ``all_terms_gt_landmarks`` warps the masked render
# with the GT landmarks instead; ``--identity none`` removes the identity, preserve and dist terms together;
# ``no_bn_recalibration`` keeps the BatchNorm statistics of training in Step 4 (the original's handling there; the
# Step-3 model it starts from keeps its re-estimation); ``augment`` trains Steps 1 and 4 with G2's augmentation
# too (Steps 1-4 again: a whole demo's cost); ``fit_on`` / ``fit_off`` make Step 2's masks from test-time fitted
# coefficients (``--fit_steps``) or from the encoder's (a variant whose flags equal the run's is not trained again:
# it is the run's own Step 4, ``same_as``).
ABLATIONS = {
    "all_terms": {"step4": {"--drop_terms": ""}},
    "all_terms_gt_landmarks": {"step4": {"--drop_terms": "", "--dist_landmarks": "gt"}},
    "no_identity": {"step4": {"--identity": "none"}},
    "no_neighbour": {"step4": {"--drop_terms": "+neighbour"}},
    "g1_preset": {"step4": {"--loss_preset": "g1_weights"}},
    "g1_all_terms": {"step4": {"--loss_preset": "g1_weights", "--drop_terms": ""}},
    "no_bn_recalibration": {"step4": {"--bn_recalibration": "0"}},
    "augment": {"step1": {"--augment": None}, "step4": {"--augment": None}},
    "fit_on": {"step2": {"--fit_steps": str(FIT_STEPS)}},
    "fit_off": {"step2": {"--fit_steps": "0"}},
}
# Flags at the step scripts' own defaults: dropped before a variant's flags are compared with the run's.
DEFAULT_FLAGS = {"--fit_steps": "0"}
BASELINE_ROW = "step4_final"  # the row every ablation row is compared with
HEADLINE = ("iou", "f1", "all_face_iou", "occluder_iou", "occluder_recall", "occluder_precision", "landmark_px")
SPREAD_RULE = ("a difference between two rows is a finding when |mean difference| > the larger of their two "
               "standard deviations (ddof 1, over the seeds); with one seed there is no spread to compare")


class DemoError(MofaError):
    """A command of the demo failed (its own messages are printed above) or its inputs do not fit together."""


class CollapseStop(DemoError):
    """A step was stopped by its collapse guard (exit 2 with "mask collapse" in its message); ``script`` names the
    step, ``reason`` is the guard's line."""

    def __init__(self, script: str, reason: str):
        super().__init__(f"{script} was stopped by its collapse guard: {reason}")
        self.script, self.reason = script, reason


COLLAPSE_MARK = "mask collapse"
TAIL_CHARS = 8192  # how much of a command's stderr run() keeps to find the collapse guard's line


def _script_name(cmd: list[str]) -> str:
    return cmd[1] if cmd[0] == "-m" else cmd[0]


def collapse_reason(stderr_tail: str) -> str | None:
    """The collapse guard's line in a failed step's stderr (its last line naming a mask collapse), or None."""
    lines = [line.strip() for line in stderr_tail.replace("\r", "\n").splitlines() if COLLAPSE_MARK in line]
    return lines[-1].removeprefix("error: ") if lines else None


def run(cmd: list[str]) -> None:
    """Run one command of the pipeline with this Python, in the repository; DemoError when it fails, CollapseStop
    when it exits 2 with "mask collapse" in its stderr (the collapse guard of Steps 3 and 4).

    The command runs in its own process group (a new session), so a Ctrl-C at the terminal reaches only the demo,
    which forwards each SIGINT / SIGTERM once to the command's group and waits for it to end: a training step
    finishes its step and writes a checkpoint (a second signal repeats its notice, a third aborts it). The demo then
    stops with KeyboardInterrupt (one line, exit 130). The command's stderr is passed through as it comes (its
    progress bars included) and its tail kept to recognise a collapse."""
    print("+", " ".join(cmd), flush=True)
    received: list[int] = []
    child = subprocess.Popen([sys.executable, *cmd], cwd=REPO, start_new_session=True, stderr=subprocess.PIPE)
    tail: list[str] = [""]

    def copy_stderr() -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while chunk := os.read(child.stderr.fileno(), 4096):
            text = decoder.decode(chunk)
            sys.stderr.write(text)
            sys.stderr.flush()
            tail[0] = (tail[0] + text)[-TAIL_CHARS:]

    reader = threading.Thread(target=copy_stderr, daemon=True)
    reader.start()

    def forward(signum, frame) -> None:
        received.append(signum)
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:  # it has just ended
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = child.wait()
        reader.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        child.stderr.close()
    if received:
        raise KeyboardInterrupt
    if status != 0:
        reason = collapse_reason(tail[0]) if status == 2 else None
        if reason is not None:
            raise CollapseStop(_script_name(cmd), reason)
        raise DemoError(f"{_script_name(cmd)} failed (exit status {status}); its messages are above")


OPPOSITE_SWITCHES = {"--augment": "--no_augment", "--no_augment": "--augment"}


def with_flags(flags: list[str], overrides: dict[str, str | None]) -> list[str]:
    """``flags`` (``[--name, value, ...]``) with each ``overrides`` value replacing that flag's, or appended. A value
    ``+x`` adds ``x`` to the flag's comma-separated list instead (``--drop_terms +neighbour``); a value None is a
    switch (``--augment``), appended once, or replacing its opposite (``--no_augment``, `OPPOSITE_SWITCHES`)."""
    out = list(flags)
    for name, value in overrides.items():
        if value is None:
            opposite = OPPOSITE_SWITCHES.get(name)
            out = [name if flag == opposite else flag for flag in out]
            out += [] if name in out else [name]
            continue
        if value.startswith("+"):
            value = ",".join(filter(None, [out[out.index(name) + 1] if name in out else "", value[1:]]))
        if name in out:
            out[out.index(name) + 1] = value
        else:
            out += [name, value]
    return out


def without_defaults(flags: list[str]) -> list[str]:
    """``flags`` less the ``DEFAULT_FLAGS`` pairs set to the step's own default (``--fit_steps 0``)."""
    out, i = [], 0
    while i < len(flags):
        if flags[i] in DEFAULT_FLAGS and i + 1 < len(flags) and flags[i + 1] == DEFAULT_FLAGS[flags[i]]:
            i += 2
            continue
        out.append(flags[i])
        i += 1
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
                   help="also train and evaluate the variants of the ablation table (make ablation)")
    p.add_argument("--ablation_rows", default=",".join(ABLATIONS),
                   help="comma-separated variants to train (default: all of " + ", ".join(ABLATIONS) + "); "
                        "augment retrains Steps 1-4 (a whole demo), fit_on / fit_off Steps 2-4")
    p.add_argument("--seeds", type=int, default=1,
                   help="train Steps 1-4 (and the ablation) this many times, with --seed S, S+1, ...; the data stay "
                        "one synthetic set; K > 1 reports mean +- std over the seeds (default 1)")
    p.add_argument("--seed", type=int, default=0, help="the first seed (the steps' --seed; default 0)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if not 0.0 < args.scale <= 1.0:
        raise DataError(f"--scale {args.scale}: expected a number in (0, 1]")
    if args.seeds < 1:
        raise DataError(f"--seeds {args.seeds}: expected a positive number of seeds")
    if args.seed < 0:
        raise DataError(f"--seed {args.seed}: expected a seed of at least 0")
    args.ablation_rows = [name.strip() for name in args.ablation_rows.split(",") if name.strip()]
    unknown = [name for name in args.ablation_rows if name not in ABLATIONS]
    if unknown or not args.ablation_rows:
        raise DataError(f"--ablation_rows {','.join(args.ablation_rows)}: "
                        f"{'unknown ' + ', '.join(unknown) if unknown else 'name at least one'}; the rows are "
                        f"{', '.join(ABLATIONS)}")
    if args.data is None:
        name = "demo_data" if args.profile == "demo" else f"demo_data_{args.profile}"
        args.data = str(REPO / (name + ("" if args.scale == 1.0 else f"_x{args.scale:g}")))
    return args


def seed_folders(args) -> dict[int, Path]:
    """Each seed's folder: <out> itself for one seed (the single run's layout), else <out>/seed_<s>."""
    seeds = [args.seed + k for k in range(args.seeds)]
    return {seed: Path(args.out) if args.seeds == 1 else Path(args.out) / f"seed_{seed}" for seed in seeds}


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = scaled(PROFILES[args.profile], args.scale)
    t0 = time.time()
    out, data = Path(args.out), Path(args.data)
    folders = seed_folders(args)
    previous = reused_results(out / "results.json", args, list(folders))
    check_own_output(out, list(folders.values()), ablation_kept=args.ablation and args.from_step > 3)
    out.mkdir(parents=True, exist_ok=True)
    if not Path(args.bfm).is_file():
        run(["-m", "utils.synthetic.demo_face_model", "--out", args.bfm])
    data_info = prepare_data(args, cfg, data)
    periods = ["--vis_every", "200", "--eval_every", "500", "--log_every", "25", "--val_batches", "4"]
    step_flags = {"step1": cfg["step1"] + periods, "step2": list(cfg.get("step2", [])),
                  "step3": cfg["step3"] + periods, "step4": cfg["step4"] + periods}
    meta = {"settings": cfg, "profile": args.profile, "scale": args.scale, "from_step": args.from_step,
            "data": data_info, "seeds": list(folders), "spread_rule": SPREAD_RULE}
    per_seed: dict[int, dict] = {}
    clock = {"demo": 0.0}

    def save() -> None:  # results.json after every seed and every ablation row: a failure later loses nothing
        write_results(out, combine(per_seed, meta, clock["demo"]))

    for seed, folder in folders.items():
        per_seed[seed] = run_seed(args, cfg, data, seed, folder, previous_steps(previous, seed), step_flags)
        clock["demo"] = round(time.time() - t0, 1)
        save()
    if args.ablation:
        for seed, folder in folders.items():
            run_ablation(args, cfg, data, seed, folder, step_flags, per_seed[seed], save)
    results = combine(per_seed, meta, clock["demo"])
    write_results(out, results)
    print_table(results)
    if args.ablation:
        print_ablation(results["ablation"])
    write_figure(out / "figure.png", data, next(iter(folders.values())))
    return 0


def step2_fit_steps(step_flags: dict) -> int:
    """The ``--fit_steps`` of the run's Step 2 (0 without): the step2 stage is evaluated with them, so that its row
    scores the preliminary masks Step 2 wrote, not the feed-forward encoder's."""
    flags = step_flags.get("step2", [])
    return int(flags[flags.index("--fit_steps") + 1]) if "--fit_steps" in flags else 0


def run_seed(args, cfg: dict, data: Path, seed: int, folder: Path, reused: dict, step_flags: dict) -> dict:
    """Steps from_step..4 of one seed into <folder>/MoFA_UNet_Save, then every stage's evaluation into
    <folder>/<stage>/; returns the seed's results (the single run's results.json layout: the stages, per_appearance,
    per_category, step_seconds with the ``reused`` timings of the steps not rerun, wall_seconds of this seed)."""
    t0 = time.time()
    save_root = folder / "MoFA_UNet_Save"
    folder.mkdir(parents=True, exist_ok=True)
    if args.from_step <= 3:  # new Step-1 or Step-3 models: the variants trained from the old ones are stale
        shutil.rmtree(folder / "ablation", ignore_errors=True)
    timings = {name: reused[name] for name in STEP_NAMES[:args.from_step - 1] if name in reused}
    for number, name in enumerate(STEP_NAMES, start=1):
        if number >= args.from_step:
            t = time.time()
            run([STEP_SCRIPTS[number], *common_flags(args, cfg, data, save_root, seed), *step_flags[name]])
            timings[name] = round(time.time() - t, 1)
    results = {"seed": seed, "per_appearance": {}, "per_category": {}}
    for key, stage in STAGES.items():
        fit = FIT_STEPS if key in FITTED_STAGES else step2_fit_steps(step_flags) if stage == "step2" else 0
        record_stage(results, key, evaluate_stage(args, data, save_root, stage, folder / key, fit))
    results["step_seconds"] = timings
    results["wall_seconds"] = round(time.time() - t0, 1)
    return results


def check_own_output(out: Path, folders: list[Path], ablation_kept: bool) -> None:
    """Refuse, before any work, an output folder the evaluation would refuse at the end: an evaluation folder
    (<seed folder>/<stage>/, and with ``ablation_kept`` <seed folder>/ablation/*/eval/) that is not empty and holds
    no manifest of the evaluation, i.e. one written by a demo from before the evaluation's --out manifests."""
    from utils.evaluation.command import TOOL
    from utils.output_dir import MANIFEST_NAME

    candidates = [folder / key for folder in folders for key in STAGES]
    if ablation_kept:
        candidates += [e for folder in folders for e in sorted((folder / "ablation").glob("*/eval"))]
    for folder in candidates:
        if not folder.is_dir() or not any(folder.iterdir()):
            continue
        try:
            owner = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8")).get("tool")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            owner = None
        if owner != TOOL:
            raise DemoError(f"{out} was written by an older demo ({folder} has no {MANIFEST_NAME} of the evaluation, "
                            "which replaces only results it recorded): run `make clean-demo` (deletes demo_output and "
                            f"demo_data), or delete {out}, or pass another --out")


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


def reused_results(path: Path, args, seeds: list[int]) -> dict:
    """The results.json of the run whose Steps 1 .. from_step-1 a ``--from_step`` run reuses ({} for a run from Step
    1, or when there is none: the step scripts still check that their inputs exist and fit). DemoError when that
    run used another profile, scale or seeds: its models were not trained with the settings this run would report
    (a results.json without ``seeds`` is a single run with seed 0)."""
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
    made = previous.get("seeds", [0])
    if made != seeds:
        raise DemoError(f"--from_step {args.from_step}: the steps in {path.parent} were made with seeds "
                        f"{', '.join(map(str, made))}, not {', '.join(map(str, seeds))}; pass --seeds {len(made)} "
                        f"--seed {made[0] if made else 0}, or run from Step 1")
    return previous


def previous_steps(previous: dict, seed: int) -> dict:
    """The step timings of ``seed`` in a reused results.json (its ``per_seed`` entry, or the single run's)."""
    entry = previous.get("per_seed", {}).get(str(seed), previous) if "per_seed" in previous else previous
    timings = entry.get("step_seconds")
    return timings if isinstance(timings, dict) else {}


def write_results(out: Path, results: dict) -> None:
    """``<out>/results.json``, written atomically (the layout: `combine`)."""
    with atomic_write(out / "results.json", "w") as handle:
        handle.write(json.dumps(results, indent=2))


def common_flags(args, cfg: dict, data: Path, save_root: Path, seed: int) -> list[str]:
    """The flags every step of one run shares; a demo run replaces the previous one (--overwrite)."""
    return ["--img_path", str(data), "--bfm", args.bfm, "--save_root", str(save_root), "--device", args.device,
            "--seed", str(seed),
            "--workers", str(cfg.get("workers", 0)), "--image_size", str(cfg["image_size"]),
            "--encoder", cfg["encoder"], "--unet_width", str(cfg["unet_width"]), "--overwrite"]


def evaluate_stage(args, data: Path, save_root: Path, stage: str, out: Path, fit_steps: int = 0) -> dict:
    """The evaluation command's summary of ``stage`` on the test split (mask images saved for the figure), with
    ``fit_steps`` of test-time fitting (0: the feed-forward networks)."""
    fit = ["--fit_steps", str(fit_steps)] if fit_steps else []
    return run_evaluation(["--img_path", str(data), "--split", "test", "--save_root", str(save_root),
                           "--bfm", args.bfm, "--device", args.device, "--stage", stage, "--out", str(out),
                           "--save_images", "--overwrite", *fit])


OCCLUDER_KEYS = ("occluder_iou", "occluder_recall", "occluder_precision")


def _group_record(s: dict) -> dict:
    """One group's entry (a category or an appearance item): its image count, IoU / F1 / recall means, the all-face
    mask's IoU, and the occluder metrics pooled over its images with an occluder (``n_occluded`` of them)."""
    return {"n": s["n_with_gt"], **{m: s["paper_protocol"][m]["mean"] for m in ("iou", "f1", "recall")},
            "all_face_iou": s["all_face"]["paper_protocol"]["iou"]["mean"],
            "n_occluded": s["occluders"]["n_images"], **{m: s["occluders"][m] for m in OCCLUDER_KEYS}}


def record_stage(results: dict, key: str, summary: dict) -> None:
    """Put one stage's paper-protocol means (overall, per appearance item, per occluder category) into results,
    with the yardsticks: ``all_face`` (the same region, every pixel called visible: its metric means and pooled
    occluder metrics) and ``occluders`` (occluder IoU / recall / precision pooled over the test images with a GT
    occluder, and their count ``n_images``) and ``landmark_px`` (the mean landmark error in pixels against the
    true coefficients' render, None where the evaluation has no reconstruction figures)."""
    results[key] = {m: v["mean"] for m, v in summary["paper_protocol"].items()}
    results[key]["landmark_px"] = summary.get("reconstruction", {}).get("landmark_px", {}).get("mean")
    results[key]["all_face"] = {**{m: v["mean"] for m, v in summary["all_face"]["paper_protocol"].items()},
                                **{m: summary["all_face"]["occluders"][m] for m in OCCLUDER_KEYS}}
    results[key]["occluders"] = dict(summary["occluders"])
    for group in ("per_appearance", "per_category"):
        results.setdefault(group, {})[key] = {name: _group_record(s) for name, s in summary.get(group, {}).items()}


def headline(record: dict) -> dict:
    """One stage's headline figures (``HEADLINE``) from its results entry (`record_stage`)."""
    return {"iou": record["iou"], "f1": record["f1"], "all_face_iou": record["all_face"]["iou"],
            **{m: record["occluders"].get(m) for m in OCCLUDER_KEYS}, "landmark_px": record.get("landmark_px")}


def row_record(results: dict, key: str) -> dict:
    """One ablation row of a seed: the headline figures, and IoU per appearance item and per occluder category."""
    return {"overall": headline(results[key]),
            "per_appearance": {n: v["iou"] for n, v in results["per_appearance"][key].items()},
            "per_category": {n: v["iou"] for n, v in results["per_category"][key].items()}}


def row_inputs(number: int, first: int, base_root: Path, row_root: Path) -> list[str]:
    """The earlier steps' outputs Step ``number`` of a variant reads: its own from Step ``first`` on, the run's
    before it."""
    def source(step: int) -> Path:
        return (row_root if step >= first else base_root) / STEP_DIRS[step]
    return {1: [], 2: ["--pretrained_MoFA", str(source(1) / FINAL_NAME)], 3: ["--trainset_dir", str(source(2))],
            4: ["--pretrained_MoFA", str(source(1) / FINAL_NAME), "--pretrained_unet", str(source(3) / FINAL_NAME)]
            }[number]


def run_ablation(args, cfg: dict, data: Path, seed: int, folder: Path, step_flags: dict, results: dict,
                 checkpoint=lambda: None) -> dict:
    """Train the ``--ablation_rows`` variants of one seed (each into <folder>/ablation/<name>/, from its first
    overridden step on, the run's earlier steps reused) and evaluate their Step 4. Sets and returns
    ``results["ablation"]``: ``rows`` (Step 2, Step 3, the run's Step 4, then the variants; `row_record`),
    ``collapsed`` (variant -> the step whose collapse guard stopped it, and its line: the row holds only that),
    ``same_as`` (variants whose flags are the run's, not trained again), ``seconds`` and ``step_seconds`` (wall
    time per variant and per step) and ``flags``. ``checkpoint()`` is called after each variant."""
    base_root, out = folder / "MoFA_UNet_Save", folder / "ablation"
    table = {"rows": {key: row_record(results, key) for key in ("step2_prelim", "step3_unet", BASELINE_ROW)},
             "collapsed": {}, "same_as": {}, "seconds": {}, "step_seconds": {}, "flags": {}}
    results["ablation"] = table
    for name in args.ablation_rows:
        overrides, key = ABLATIONS[name], f"step4_{name}"
        table["flags"][name] = overrides
        flags = {step: with_flags(step_flags[step], overrides.get(step, {})) for step in STEP_NAMES}
        if all(without_defaults(flags[step]) == without_defaults(step_flags[step]) for step in STEP_NAMES):
            table["same_as"][name] = BASELINE_ROW
            table["rows"][key] = {**row_record(results, BASELINE_ROW), "same_as": BASELINE_ROW}
            checkpoint()
            continue
        first = min(STEP_NAMES.index(step) + 1 for step in overrides)
        row_root, t0, seconds = out / name / "MoFA_UNet_Save", time.time(), {}
        try:
            for number in range(first, 5):
                t = time.time()
                step = STEP_NAMES[number - 1]
                run([STEP_SCRIPTS[number], *common_flags(args, cfg, data, row_root, seed), *flags[step],
                     *row_inputs(number, first, base_root, row_root)])
                seconds[step] = round(time.time() - t, 1)
        except CollapseStop as stop:
            table["collapsed"][name] = {"step": stop.script, "message": stop.reason}
            table["rows"][key] = {"collapsed": table["collapsed"][name]}
            print(f"ablation row {name}, seed {seed}: {stop.script} stopped by its collapse guard; recorded as "
                  "collapsed, the ablation goes on", flush=True)
        else:
            record_stage(results, key, evaluate_stage(args, data, row_root, "step4", out / name / "eval"))
            table["rows"][key] = row_record(results, key)
        table["seconds"][name], table["step_seconds"][name] = round(time.time() - t0, 1), seconds
        checkpoint()
    return table


def _number(value) -> bool:
    """A real number: not None, not a bool, not NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def stats(values: list) -> dict:
    """Mean, standard deviation (ddof 1; None below two values) and n of the numbers among ``values`` (None and NaN
    left out), with the values themselves."""
    present = [float(v) for v in values if _number(v)]
    return {"mean": statistics.fmean(present) if present else None,
            "std": statistics.stdev(present) if len(present) > 1 else None, "n": len(present), "values": list(values)}


def exceeds_spread(a: dict, b: dict) -> bool | None:
    """Whether two rows' figures (`stats`) differ by more than their spread: |mean_a - mean_b| > max(std_a, std_b)
    (``SPREAD_RULE``); None when either has no spread (fewer than two seeds) or no mean."""
    if None in (a["mean"], b["mean"], a["std"], b["std"]):
        return None
    return abs(a["mean"] - b["mean"]) > max(a["std"], b["std"])


def mean_tree(values: list):
    """The mean over seeds of one results entry: dicts key by key, numbers averaged over those present (None when
    none is; equal numbers, counts included, stay as they are), anything else taken from the first."""
    first = values[0]
    if isinstance(first, dict):
        keys = dict.fromkeys(k for v in values if isinstance(v, dict) for k in v)
        return {k: mean_tree([v[k] for v in values if isinstance(v, dict) and k in v]) for k in keys}
    numbers = [v for v in values if _number(v)]
    if not numbers:
        return None if first is None or isinstance(first, float) else first
    return numbers[0] if all(v == numbers[0] for v in numbers) else statistics.fmean(numbers)


def combine(per_seed: dict[int, dict], meta: dict, demo_seconds: float) -> dict:
    """results.json from each seed's results (`run_seed`, `run_ablation`) and the run's ``meta``.

    One seed: that seed's results as they are (the single run's layout). Several (``meta["seeds"]``): every stage
    entry, per_appearance and per_category as the mean over the seeds done (`mean_tree`), each seed's own under
    ``per_seed``. Always: ``spread`` (stage -> headline figure -> `stats` over the seeds), ``seeds`` (those asked
    for), ``seeds_done`` (those finished: results.json is written after each), ``timing`` (per seed: the steps, the
    seed's demo, each ablation row and its steps; the totals), ``wall_seconds`` (Steps 1-4 and the evaluations of
    every seed, data included, ablation excluded) and, once a seed has one, ``ablation`` (`combine_ablation`)."""
    records = list(per_seed.values())
    if len(meta.get("seeds", per_seed)) == 1:
        results = {k: v for k, v in records[0].items() if k != "ablation"}
    else:
        results = {key: mean_tree([r[key] for r in records]) for key in (*STAGES, "per_appearance", "per_category")}
        results["per_seed"] = {str(seed): r for seed, r in per_seed.items()}
    results.update(meta)
    results["seeds_done"] = list(per_seed)
    results["spread"] = {key: {m: stats([headline(r[key])[m] for r in records]) for m in HEADLINE} for key in STAGES}
    timing = {str(seed): {"steps": r["step_seconds"], "demo": r["wall_seconds"],
                          "ablation_rows": r.get("ablation", {}).get("seconds", {}),
                          "ablation_row_steps": r.get("ablation", {}).get("step_seconds", {}),
                          "ablation": round(sum(r.get("ablation", {}).get("seconds", {}).values()), 1)}
              for seed, r in per_seed.items()}
    results["timing"] = {"per_seed": timing, "demo_seconds": demo_seconds,
                         "ablation_seconds": round(sum(t["ablation"] for t in timing.values()), 1)}
    results["wall_seconds"] = demo_seconds
    if any("ablation" in r for r in records):
        results["ablation"] = combine_ablation({seed: r["ablation"] for seed, r in per_seed.items() if "ablation" in r})
    return results


def combine_ablation(tables: dict[int, dict]) -> dict:
    """The ablation table over the seeds: ``rows`` (each row's mean over the seeds where it did not collapse, in the
    single seed's format; a row collapsed in every seed holds only ``collapsed``), ``spread`` (row -> headline figure
    -> `stats`), ``vs_baseline`` (row -> headline figure -> `exceeds_spread` against ``BASELINE_ROW``: True a finding,
    False within the spread, None without one), ``collapsed`` (row -> seed -> step and line), ``same_as``,
    ``seconds`` (row -> seed -> wall time), ``flags``, ``seeds``, ``rule``."""
    names = list(dict.fromkeys(key for t in tables.values() for key in t["rows"]))
    rows, spread, collapsed = {}, {}, {}
    for key in names:
        entries = {seed: t["rows"][key] for seed, t in tables.items() if key in t["rows"]}
        trained = [e for e in entries.values() if "collapsed" not in e]
        gone = {str(seed): e["collapsed"] for seed, e in entries.items() if "collapsed" in e}
        spread[key] = {m: stats([e["overall"].get(m) for e in trained]) for m in HEADLINE}
        rows[key] = mean_tree(trained) if trained else {"collapsed": next(iter(gone.values()))}
        rows[key]["n_seeds"] = len(trained)
        if gone:
            collapsed[key] = gone
    base = spread.get(BASELINE_ROW)
    vs = {key: {m: exceeds_spread(spread[key][m], base[m]) for m in HEADLINE}
          for key in names if base is not None and key != BASELINE_ROW}
    same_as = {name: row for t in tables.values() for name, row in t.get("same_as", {}).items()}
    flags = {name: f for t in tables.values() for name, f in t["flags"].items()}
    seconds = {name: {str(seed): t["seconds"][name] for seed, t in tables.items() if name in t["seconds"]}
               for name in flags}
    return {"rows": rows, "spread": spread, "vs_baseline": vs, "baseline": BASELINE_ROW, "collapsed": collapsed,
            "same_as": same_as, "seconds": seconds, "flags": flags, "seeds": list(tables), "rule": SPREAD_RULE}


ABLATION_COLUMNS = {"iou": "IoU", "f1": "F1", "all_face_iou": "all-face IoU", "occluder_iou": "occluder IoU",
                    "occluder_recall": "occluder recall", "occluder_precision": "occluder precision",
                    "landmark_px": "landmark px"}


def spread_cell(figure: dict) -> str:
    """``mean ± std`` of a `stats` entry (the mean alone for one value, n/a for none)."""
    if figure["mean"] is None:
        return "n/a"
    return f"{figure['mean']:.3f}" + ("" if figure["std"] is None else f" ± {figure['std']:.3f}")


def print_ablation(table: dict) -> None:
    """The ablation table (Markdown): every headline figure as mean ± std over the seeds, the IoU difference from
    the run's Step 4 marked as within or beyond the spread (`exceeds_spread`), collapsed rows as such; then IoU per
    appearance item and per occluder category (means over the seeds)."""
    rows, spread, n = table["rows"], table["spread"], len(table["seeds"])
    base = spread[table["baseline"]]["iou"]["mean"]
    print(f"\nAblation (test split, paper protocol; variants trained from the same earlier steps; mean ± std over "
          f"{n} seed{'s' if n > 1 else ''}; {table['rule']}):\n")
    print("| row | " + " | ".join(ABLATION_COLUMNS.values()) + f" | IoU vs {table['baseline']} |\n|---|"
          + "---|" * (len(ABLATION_COLUMNS) + 1))
    for key, values in rows.items():
        gone = table["collapsed"].get(key, {})
        note = f"collapsed in {next(iter(gone.values()))['step']} ({len(gone)} of {len(gone) + values['n_seeds']} " \
               f"seeds)" if gone else ""
        if "overall" not in values:
            print(f"| {key} | " + " | ".join("—" for _ in ABLATION_COLUMNS) + f" | {note} |")
            continue
        cells = [spread_cell(spread[key][m]) for m in ABLATION_COLUMNS]
        if key == table["baseline"]:
            versus = "baseline"
        else:
            found = table["vs_baseline"][key]["iou"]
            delta = spread[key]["iou"]["mean"]
            versus = "n/a" if delta is None or base is None else f"{delta - base:+.3f} " + (
                "(one seed: no spread)" if found is None else "beyond the spread" if found else "within the spread")
            if key.removeprefix("step4_") in table["same_as"]:
                versus = "same flags as the baseline"
        print(f"| {key} | " + " | ".join(cells) + f" | {versus}{'; ' + note if note else ''} |")
    trained = {key: values for key, values in rows.items() if "overall" in values}
    for group, title in (("per_appearance", "appearance item"), ("per_category", "occluder category")):
        names = list(dict.fromkeys(name for values in trained.values() for name in values[group]))
        if not names:
            continue
        print(f"\nIoU per {title}:\n")
        print("| row | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
        for key, values in trained.items():
            print(f"| {key} | " + " | ".join(_cell(values[group].get(name)) for name in names) + " |")


def _cell(value) -> str:
    return f"{value:.3f}" if _number(value) else "n/a"


def print_table(results: dict) -> None:
    """The overall table with the yardsticks (the all-face mask's IoU, the pooled occluder metrics), then IoU,
    all-face IoU and occluder recall per appearance item and per occluder category for every stage (Markdown)."""
    metrics = ["iou", "accuracy", "precision", "recall", "f1"]
    n_occluded = results[next(iter(STAGES))]["occluders"]["n_images"]
    seeds = results.get("seeds", [0])
    over = "" if len(seeds) < 2 else (f"; mean ± std (ddof 1) over {len(seeds)} seeds ({', '.join(map(str, seeds))}) "
                                      "of the headline figures, the means of the others")
    print(f"\nTest split, paper protocol; all-face = the same region with every pixel called visible; occluder "
          f"metrics pooled over the {n_occluded} images with an occluder{over}:\n")
    head = [*metrics, "all-face iou", "occluder iou", "occluder recall", "occluder precision", "landmark px"]
    print("| stage | " + " | ".join(head) + " |\n|---|" + "---|" * len(head))
    for key in STAGES:
        r = results[key]
        values = [r[m] for m in metrics] + [r["all_face"]["iou"]] + [r["occluders"][m] for m in OCCLUDER_KEYS]
        cells = [_cell(v) for v in values] + [_cell(r.get("landmark_px"))]
        if len(seeds) > 1:  # the headline figures with their spread
            for column, figure in {0: "iou", 4: "f1", 5: "all_face_iou", 6: "occluder_iou", 7: "occluder_recall",
                                   8: "occluder_precision", 9: "landmark_px"}.items():
                cells[column] = spread_cell(results["spread"][key][figure])
        print(f"| {key} | " + " | ".join(cells) + " |")
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
    timing = results.get("timing", {})
    print(f"\nwall time: {results['wall_seconds']:.0f} s" + (f" for {len(seeds)} seeds" if len(seeds) > 1 else "")
          + (f"; ablation {timing['ablation_seconds']:.0f} s" if timing.get("ablation_seconds") else ""))


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

    columns = ["input", "GT", "oracle", "step2", "step3", "step4", "step4+fit"]  # the masks of STAGES, in order
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
