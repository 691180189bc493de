"""`make demo`'s driver end to end in --quick mode (tiny sizes: the trained stages' numbers are meaningless, the
plumbing is not; the fit oracle's scores are recounted from the masks it wrote)."""
from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest

from tests.test_evaluation import _yardstick_rows
from utils import demo_pipeline
from utils.data.benchmark_files import APPEARANCE_ITEMS
from utils.data.image_io import read_mask
from utils.data.image_root import gt_mask_path
from utils.data.unet_trainset import stem_for
from utils.evaluation.scoring import summarise_rows
from utils.evaluation.stages import stage_label

FIT_ORACLE_IOU_FLOOR = 0.6  # the quick run measured 0.78 (6 test images at 32 px; per image 0.30-0.99)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory, demo_bfm_h5):
    """One --quick demo run: (out, data) folders."""
    root = tmp_path_factory.mktemp("quick_demo")
    out, data = root / "out", root / "data"
    assert demo_pipeline.main(["--profile", "quick", "--out", str(out), "--data", str(data), "--bfm", str(demo_bfm_h5),
                               "--device", "cpu"]) == 0
    return out, data


def test_quick_demo_writes_results_for_every_stage(quick_demo):
    out, data = quick_demo
    results = json.loads((out / "results.json").read_text())
    size = demo_pipeline.QUICK["image_size"]
    step2_fit = demo_pipeline.step2_fit_steps(demo_pipeline.QUICK)
    for key, stage in demo_pipeline.STAGES.items():
        summary = json.loads((out / key / "summary.json").read_text())
        fit = demo_pipeline.FIT_STEPS if key in demo_pipeline.FITTED_STAGES else step2_fit if stage == "step2" else 0
        assert summary["stage"] == stage_label(stage, fit), (key, fit)  # a fitted row is labelled <stage>_fit<N>
        assert summary["split"] == "test" and summary["n_with_gt"] >= 1
        with (out / key / "per_image.csv").open() as fh:
            rows = [r for r in csv.DictReader(fh) if r["has_gt_mask"] == "True"]
        assert len(rows) == summary["n_with_gt"]
        for metric in ("iou", "accuracy", "precision", "recall", "f1"):
            per_image = np.array([float(r[metric]) for r in rows])
            assert results[key][metric] == pytest.approx(summary["paper_protocol"][metric]["mean"])
            assert results[key][metric] == pytest.approx(per_image.mean(), abs=1e-6)  # the table is the image mean
            assert 0.0 <= per_image.min() and per_image.max() <= 1.0
        assert results[key]["all_face"]["iou"] == pytest.approx(summary["all_face"]["paper_protocol"]["iou"]["mean"])
        assert results[key]["occluders"] == summary["occluders"] and summary["occluders"]["n_images"] >= 1
    check_fit_oracle_scores(out / "fit_oracle", data)
    assert set(results["step_seconds"]) == {"step1", "step2", "step3", "step4"}
    assert results["wall_seconds"] >= sum(results["step_seconds"].values()) > 0
    assert results["settings"] == json.loads(json.dumps(demo_pipeline.QUICK))
    for stage in demo_pipeline.STAGES:
        assert results["per_appearance"][stage] and results["per_category"][stage]
    assert set(results["per_appearance"]["step4_final"]) <= {*APPEARANCE_ITEMS, "none"}
    figure = cv2.imread(str(out / "figure.png"))
    assert figure.shape[1] == (2 + len(demo_pipeline.STAGES)) * size, "input, GT and every stage's mask side by side"
    assert figure.shape[0] > 2 * size


def test_tables_and_results_carry_the_yardsticks(capsys):
    """results.json and the printed table hold, beside each stage's metrics, the all-face mask's and the occluder
    metrics pooled over the images with an occluder (hand-made masks of tests/test_evaluation.py: a hand found
    by half, no occluder, a cup found whole)."""
    summary = summarise_rows(_yardstick_rows(), "step4", "test")
    results = {"wall_seconds": 1.0}
    for key in demo_pipeline.STAGES:
        demo_pipeline.record_stage(results, key, summary)
    entry = results["step4_final"]
    assert entry["iou"] == pytest.approx((0.8 + 11 / 12 + 1.0) / 3) and entry["all_face"]["iou"] == pytest.approx(0.75)
    assert entry["occluders"]["n_images"] == 2 and entry["occluders"]["occluder_iou"] == pytest.approx(0.8)
    assert entry["all_face"]["occluder_recall"] == 0.0
    hand = results["per_category"]["step4_final"]["hand"]
    assert (hand["n_occluded"], hand["all_face_iou"]) == (1, 0.75)
    assert (hand["occluder_iou"], hand["occluder_recall"]) == (pytest.approx(0.5), pytest.approx(2 / 3))
    json.dumps(results)  # results.json stays JSON
    demo_pipeline.print_table(results)
    text = capsys.readouterr().out
    head = "| stage | iou | accuracy | precision | recall | f1 | all-face iou | occluder iou | occluder recall |"
    assert head in text
    assert "| step4_final | 0.906 | " in text and "| 0.750 | 0.800 | 0.889 | 0.889 |" in text
    assert "Occluder recall per occluder category" in text and "| hand | 1 | 0.667 |" in text
    assert "pooled over the 2 images with an occluder" in text


def check_fit_oracle_scores(folder, data) -> None:
    """Recount per_image.csv of the fit oracle from the masks on disk. Its estimate and the GT mask both lie inside
    the render of the true coefficients (the paper protocol's region), so whole-image counts are the protocol's."""
    with (folder / "per_image.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["has_gt_mask"] == "True"]
    ious = []
    for row in rows:
        est = read_mask(folder / "images" / f"{stem_for(row['filename'])}_estmask.png") > 0.5
        gt = read_mask(gt_mask_path(data / "Dataset" / row["filename"])) > 0.5
        counts = {"tp": (est & gt).sum(), "fp": (est & ~gt).sum(), "fn": (~est & gt).sum()}
        assert {k: float(row[k]) for k in counts} == {k: float(v) for k, v in counts.items()}, row["filename"]
        ious.append(counts["tp"] / (counts["tp"] + counts["fp"] + counts["fn"]))
        assert float(row["iou"]) == pytest.approx(ious[-1], abs=1e-6), row["filename"]
    # Step 2's rule on the true render keeps most of the visible face (a wrong metric or mask would not)
    assert np.mean(ious) > FIT_ORACLE_IOU_FLOOR, np.mean(ious)


def _flag(args: list[str], name: str) -> int:
    return int(args[args.index(name) + 1])


@pytest.mark.parametrize("profile", ["demo", "full"])
def test_step4_schedules_end_in_a_mofa_phase(profile):
    """As the original (130 epochs end with ~25k MoFA steps), Step 4 ends while the encoder trains."""
    from Step4_UNet_MoFA_EM import em_phase
    for factor in (1.0, 0.01, 0.005, 0.001):
        args = demo_pipeline.scaled(demo_pipeline.PROFILES[profile], factor)["step4"]
        last = _flag(args, "--max_iters") - 1
        assert em_phase(last, _flag(args, "--em_cycle"), _flag(args, "--unet_iters")) == "mofa", (profile, factor)


def test_scaled_profile_shrinks_every_count_and_keeps_at_least_one():
    full = demo_pipeline.FULL
    small = demo_pipeline.scaled(full, 0.001)
    assert small["num_images"] == max(60, round(full["num_images"] * 0.001))
    assert _flag(small["step1"], "--max_iters") == 30 and _flag(small["step1"], "--lr_step") == 10
    assert _flag(small["step4"], "--unet_iters") == 1  # 0.5 -> at least 1
    # 5 steps of 2-step cycles would end in a UNet phase: the cycle grows to 3 and the run to 2 whole cycles
    assert _flag(small["step4"], "--em_cycle") == 3 and _flag(small["step4"], "--max_iters") == 6
    assert small["step1"][small["step1"].index("--learning_rate") + 1] == "5e-4"  # rates are not counts
    assert demo_pipeline.scaled(full, 1.0) is full


def test_bad_scale_is_one_line(capsys):
    from utils.cli import cli_main
    with pytest.raises(SystemExit) as exc:
        cli_main(demo_pipeline.main, ["--scale", "0"])
    assert exc.value.code == 2 and capsys.readouterr().err.startswith("error: --scale 0.0")


def test_recovered_share_of_step2_lost_pixels():
    assert demo_pipeline.recovered_share(0.6, 0.8) == pytest.approx(0.5)
    assert demo_pipeline.recovered_share(1.0, 1.0) is None


def test_with_flags_replaces_or_appends():
    base = ["--max_iters", "300", "--drop_terms", "dist"]
    assert demo_pipeline.with_flags(base, {"--drop_terms": "dist,neighbour", "--identity": "none"}) == [
        "--max_iters", "300", "--drop_terms", "dist,neighbour", "--identity", "none"]
    assert base == ["--max_iters", "300", "--drop_terms", "dist"], "the profile's flags are not modified"
    assert demo_pipeline.with_flags(base, {"--drop_terms": "+neighbour"})[-1] == "dist,neighbour"
    assert demo_pipeline.with_flags(["--max_iters", "3"], {"--drop_terms": "+neighbour"}) == [
        "--max_iters", "3", "--drop_terms", "neighbour"]


def _step_parser(step: str):
    """The argument parser of a step script (its parse_args' parser, captured)."""
    import argparse
    import importlib

    module = importlib.import_module(demo_pipeline.STEP_SCRIPTS[int(step[-1])].removesuffix(".py"))
    captured = {}
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        captured["parser"] = self
        return original(self, args, namespace)

    argparse.ArgumentParser.parse_args = capture
    try:
        module.parse_args(["--img_path", "."])
    finally:
        argparse.ArgumentParser.parse_args = original
    return module.parse_args, captured["parser"]


def known_rows() -> list[str]:
    """The ablation rows whose flags the step scripts of this tree know (--no_augment and --fit_steps land with the
    augmentation and test-time fitting branch)."""
    parsers = {step: _step_parser(step)[1] for step in demo_pipeline.STEP_NAMES}
    return [name for name, overrides in demo_pipeline.ABLATIONS.items()
            if all(flag in parsers[step]._option_string_actions for step, o in overrides.items() for flag in o)]


@pytest.mark.parametrize("name", list(demo_pipeline.ABLATIONS))
def test_ablation_variants_parse_as_step_flags(name):
    """Every ablation variant is a valid command line of each step it changes, on top of each profile's flags."""
    for step, overrides in demo_pipeline.ABLATIONS[name].items():
        parse_args, parser = _step_parser(step)
        missing = [flag for flag in overrides if flag not in parser._option_string_actions]
        if missing:
            pytest.skip(f"{step} has no {', '.join(missing)} on this tree yet")
        for profile in ("demo", "full"):
            flags = demo_pipeline.with_flags(demo_pipeline.PROFILES[profile].get(step, []), overrides)
            args = parse_args(["--img_path", ".", *flags])
            for flag, value in overrides.items():
                got = getattr(args, parser._option_string_actions[flag].dest)
                if value is None:  # a switch: it took effect over the profile's flags (its opposite included)
                    assert got == parser._option_string_actions[flag].const, (name, flag)
                    continue
                value = flags[flags.index(flag) + 1]
                assert (",".join(got) if isinstance(got, (tuple, list)) else str(got)) == value, (name, flag)
    if name == "no_neighbour":
        parse_args, _ = _step_parser("step4")
        assert parse_args(["--img_path", ".", *demo_pipeline.with_flags(
            demo_pipeline.DEMO["step4"], demo_pipeline.ABLATIONS["no_neighbour"]["step4"])]).drop_terms == (
            "dist", "neighbour")


def test_ablation_trains_each_variant_from_the_demo_models(quick_demo, demo_bfm_h5):
    """``--from_step 5 --ablation`` (make ablation) reruns no step, trains Step-4 variants from the demo's Step-1 and
    Step-3 models with their flags, and reports their rows next to Steps 2, 3 and 4. The two rows with every term
    stand for all: every row's flags are checked by test_ablation_variants_parse_as_step_flags, and each row costs
    a Step-4 run."""
    out, data = quick_demo
    save_root = out / "MoFA_UNet_Save"
    before = {p: p.stat().st_mtime_ns for p in save_root.rglob("*.pt")}
    demo_seconds = json.loads((out / "results.json").read_text())["step_seconds"]
    names = ["all_terms", "all_terms_gt_landmarks"]
    assert all(set(demo_pipeline.ABLATIONS[name]) == {"step4"} for name in names)
    assert demo_pipeline.main(["--profile", "quick", "--out", str(out), "--data", str(data), "--bfm", str(demo_bfm_h5),
                               "--device", "cpu", "--from_step", "5", "--ablation",
                               "--ablation_rows", ",".join(names)]) == 0
    assert {p: p.stat().st_mtime_ns for p in save_root.rglob("*.pt")} == before, "the demo's own steps did not rerun"
    results = json.loads((out / "results.json").read_text())
    assert results["from_step"] == 5
    assert results["step_seconds"] == demo_seconds, "the reused steps keep the demo's timings"
    table = results["ablation"]
    variants = [f"step4_{name}" for name in names]
    assert list(table["rows"]) == ["step2_prelim", "step3_unet", "step4_final", *variants]
    for name in names:
        overrides = demo_pipeline.ABLATIONS[name]["step4"]
        row = table["rows"][f"step4_{name}"]
        if "collapsed" in row:  # the guard stopped it: recorded with the step, no evaluation
            assert table["collapsed"][f"step4_{name}"]["0"]["step"] == "Step4_UNet_MoFA_EM.py"
            continue
        config = json.loads((out / "ablation" / name / "MoFA_UNet_Save" / "MoFA_UNet" / "run_config.json").read_text())
        assert config["mofa_checkpoint"] == str(save_root / "pretrain_mofa" / "final.pt")
        assert config["unet_checkpoint"] == str(save_root / "Pretrain_UNet" / "final.pt")
        flags = demo_pipeline.with_flags(demo_pipeline.QUICK["step4"], overrides)
        for flag in overrides:
            got = config[flag.lstrip("-")]
            assert (",".join(got) if isinstance(got, list) else str(got)) == flags[flags.index(flag) + 1], name
        summary = json.loads((out / "ablation" / name / "eval" / "summary.json").read_text())
        assert row["overall"]["iou"] == pytest.approx(summary["paper_protocol"]["iou"]["mean"])
        assert table["spread"][f"step4_{name}"]["iou"] == {"mean": pytest.approx(row["overall"]["iou"]), "std": None,
                                                           "n": 1, "values": [row["overall"]["iou"]]}
        assert table["vs_baseline"][f"step4_{name}"]["iou"] is None, "one seed: no spread to compare"
        assert set(row["per_category"]) == set(summary["per_category"])
        assert results["timing"]["per_seed"]["0"]["ablation_rows"][name] > 0
    assert table["rows"]["step2_prelim"]["overall"]["iou"] == pytest.approx(results["step2_prelim"]["iou"])


def test_from_step_refuses_steps_made_with_other_settings(quick_demo, demo_bfm_h5, capsys):
    """Reusing the quick run's Steps 1-3 under the demo profile would report settings that did not make them."""
    from utils.cli import cli_main
    out, data = quick_demo
    before = (out / "results.json").read_bytes()
    with pytest.raises(SystemExit) as exc:
        cli_main(demo_pipeline.main, ["--out", str(out), "--data", str(data), "--bfm", str(demo_bfm_h5),
                                      "--from_step", "4"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "--profile quick" in err, err
    assert (out / "results.json").read_bytes() == before


def test_a_failing_step_is_one_line(tmp_path, demo_bfm_h5, capfd):
    """A step that fails (here: Step 4 without the Step-1 and Step-3 models it needs) stops the demo with one line
    naming the step; the step's own message comes first."""
    from utils.cli import cli_main
    out, data = tmp_path / "out", tmp_path / "data"
    with pytest.raises(SystemExit) as exc:
        cli_main(demo_pipeline.main, ["--profile", "quick", "--out", str(out), "--data", str(data), "--bfm",
                                      str(demo_bfm_h5), "--device", "cpu", "--from_step", "4"])
    err = capfd.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err[-1].startswith("error: Step4_UNet_MoFA_EM.py failed (exit status 2)"), err
    assert "Traceback" not in "\n".join(err)
