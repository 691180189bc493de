"""`make demo SEEDS=K` / `make ablation SEEDS=K`: seeds, mean ± std, collapsed rows, the extra ablation rows and the
old-output check of utils/demo_pipeline.py, with the steps and the evaluation replaced by fakes (a real run is the
quick demo of tests/test_demo_pipeline.py)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from utils import demo_pipeline
from utils.cli import cli_main

METRICS = ("iou", "accuracy", "precision", "recall", "f1")


def fake_summary(iou: float) -> dict:
    """An evaluation summary (the fields the demo reads) whose figures all derive from ``iou``."""
    def protocol(value: float) -> dict:
        return {m: {"mean": value} for m in METRICS}

    occluders = {"n_images": 2, "occluder_iou": iou / 2, "occluder_recall": 0.5, "occluder_precision": iou - 0.1}
    all_face = {"paper_protocol": protocol(0.75),
                "occluders": {"n_images": 2, "occluder_iou": 0.0, "occluder_recall": 0.0, "occluder_precision": 0.0}}
    hand = {"n_with_gt": 3, "paper_protocol": protocol(iou - 0.2), "all_face": all_face, "occluders": occluders}
    return {"paper_protocol": protocol(iou), "all_face": all_face, "occluders": occluders,
            "per_appearance": {}, "per_category": {"hand": hand}, "reconstruction": {"landmark_px": {"mean": 10 * iou}}}


def seed_of(path: Path) -> int:
    found = re.search(r"seed_(\d+)", str(path))
    return int(found.group(1)) if found else 0


STAGE_IOU = {"fit_oracle": 0.85, "step2": 0.6, "step3": 0.65, "step4": 0.8}


class FakePipeline:
    """Records every command; the evaluation returns ``STAGE_IOU`` + 0.01 * seed (+ 0.1 for an ablation row);
    ``collapse`` names the ablation rows whose Step 4 the collapse guard stops."""

    def __init__(self, monkeypatch, collapse=()):
        self.commands: list[list[str]] = []
        self.evaluations: list[tuple[Path, str, Path]] = []
        self.fit_steps: dict[str, int] = {}  # evaluation folder name -> its --fit_steps
        self.collapse = set(collapse)
        monkeypatch.setattr(demo_pipeline, "run", self.run)
        monkeypatch.setattr(demo_pipeline, "evaluate_stage", self.evaluate)
        monkeypatch.setattr(demo_pipeline, "prepare_data", lambda args, cfg, data: {"path": str(data), "seed": 0})
        monkeypatch.setattr(demo_pipeline, "write_figure", lambda *a, **k: None)

    def run(self, cmd: list[str]) -> None:
        self.commands.append(cmd)
        root = Path(cmd[cmd.index("--save_root") + 1]) if "--save_root" in cmd else None
        if cmd[0] == demo_pipeline.STEP_SCRIPTS[4] and root is not None and root.parent.name in self.collapse:
            raise demo_pipeline.CollapseStop(cmd[0], "mask collapse: the mean UNet mask inside the face was below 0.05")

    def evaluate(self, args, data, save_root, stage, out, fit_steps=0):
        self.evaluations.append((Path(save_root), stage, Path(out)))
        self.fit_steps[Path(out).name] = fit_steps
        row = 0.1 if "ablation" in Path(save_root).parts else 0.0
        return fake_summary(STAGE_IOU[stage] + 0.01 * seed_of(save_root) + row)

    def steps(self, script_number: int) -> list[list[str]]:
        return [c for c in self.commands if c[0] == demo_pipeline.STEP_SCRIPTS[script_number]]


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def run_main(tmp_path, *extra: str) -> dict:
    bfm = tmp_path / "model.h5"
    bfm.write_bytes(b"")
    out = tmp_path / "out"
    assert demo_pipeline.main(["--profile", "quick", "--out", str(out), "--data", str(tmp_path / "data"),
                               "--bfm", str(bfm), "--device", "cpu", *extra]) == 0
    return json.loads((out / "results.json").read_text())


def test_stats_and_the_spread_rule_on_hand_made_numbers():
    a = demo_pipeline.stats([0.8, 0.9, 1.0])
    assert a == {"mean": pytest.approx(0.9), "std": pytest.approx(0.1), "n": 3, "values": [0.8, 0.9, 1.0]}
    assert demo_pipeline.stats([0.8, None, float("nan"), 1.0])["n"] == 2, "None and NaN are left out"
    assert demo_pipeline.stats([0.8, None, 1.0])["std"] == pytest.approx(0.1414214)  # ddof 1, not 0.1
    one = demo_pipeline.stats([0.7])
    assert (one["mean"], one["std"], one["n"]) == (0.7, None, 1)
    assert demo_pipeline.stats([None])["mean"] is None
    close = demo_pipeline.stats([0.95, 1.0, 1.05])  # mean 1.0, std 0.05: |0.1| is not above max(0.1, 0.05)
    far = demo_pipeline.stats([1.05, 1.1, 1.15])  # mean 1.1: |0.2| > 0.1
    assert demo_pipeline.exceeds_spread(close, a) is False and demo_pipeline.exceeds_spread(a, close) is False
    assert demo_pipeline.exceeds_spread(far, a) is True and demo_pipeline.exceeds_spread(a, far) is True
    assert demo_pipeline.exceeds_spread(one, a) is None, "one seed has no spread"


def test_combine_reports_mean_std_and_keeps_each_seed():
    per_seed = {}
    for seed, iou in ((3, 0.7), (4, 0.8), (5, 0.9)):
        record = {"seed": seed, "step_seconds": {"step1": 10.0 + seed}, "wall_seconds": 20.0 + seed}
        for key, stage in demo_pipeline.STAGES.items():
            demo_pipeline.record_stage(record, key, fake_summary(iou if stage == "step4" else 0.5))
        per_seed[seed] = record
    results = demo_pipeline.combine(per_seed, {"seeds": [3, 4, 5]}, 70.0)
    final = results["spread"]["step4_final"]
    assert final["iou"] == {"mean": pytest.approx(0.8), "std": pytest.approx(0.1), "n": 3, "values": [0.7, 0.8, 0.9]}
    assert final["occluder_iou"]["mean"] == pytest.approx(0.4) and final["occluder_iou"]["std"] == pytest.approx(0.05)
    assert final["landmark_px"]["std"] == pytest.approx(1.0) and final["all_face_iou"]["std"] == 0.0
    assert results["step2_prelim"]["iou"] == 0.5 and results["spread"]["step2_prelim"]["iou"]["std"] == 0.0
    assert results["step4_final"]["iou"] == pytest.approx(0.8), "the stage entries hold the means"
    assert results["per_category"]["step4_final"]["hand"]["n"] == 3, "counts stay counts"
    assert results["per_category"]["step4_final"]["hand"]["iou"] == pytest.approx(0.6)
    assert results["per_seed"]["4"]["step4_final"]["iou"] == 0.8, "each seed keeps its own figures"
    assert results["timing"]["per_seed"]["5"]["steps"] == {"step1": 15.0} and results["wall_seconds"] == 70.0
    json.dumps(results)


def test_seeds_train_into_their_own_folders_with_their_seed(tmp_path, monkeypatch, capsys):
    """--seeds 3 --seed 5: three save roots and evaluation folders, --seed 5, 6, 7; one data set for all."""
    fake = FakePipeline(monkeypatch)
    results = run_main(tmp_path, "--seeds", "3", "--seed", "5")
    out = tmp_path / "out"
    for number in (1, 2, 3, 4):
        runs = fake.steps(number)
        assert [_flag(c, "--seed") for c in runs] == ["5", "6", "7"]
        assert [_flag(c, "--save_root") for c in runs] == [str(out / f"seed_{s}" / "MoFA_UNet_Save") for s in (5, 6, 7)]
        assert {_flag(c, "--img_path") for c in runs} == {str(tmp_path / "data")}, "the data stay one set"
    assert len({out for _, _, out in fake.evaluations}) == 3 * len(demo_pipeline.STAGES)
    assert results["seeds"] == results["seeds_done"] == [5, 6, 7] and set(results["per_seed"]) == {"5", "6", "7"}
    spread = results["spread"]["step4_final"]["iou"]
    assert spread["n"] == 3 and spread["mean"] == pytest.approx(0.86) and spread["std"] == pytest.approx(0.01)
    assert results["per_seed"]["7"]["step4_final"]["iou"] == pytest.approx(0.87)
    assert set(results["timing"]["per_seed"]["6"]["steps"]) == {"step1", "step2", "step3", "step4"}
    text = capsys.readouterr().out
    assert "over 3 seeds (5, 6, 7)" in text and "| step4_final | 0.860 ± 0.010 |" in text


def test_one_seed_keeps_the_single_run_layout(tmp_path, monkeypatch):
    """--seeds 1 (the default): <out>/MoFA_UNet_Save, <out>/<stage>/, the stage entries at the top of results.json."""
    fake = FakePipeline(monkeypatch)
    results = run_main(tmp_path)
    out = tmp_path / "out"
    assert {_flag(c, "--save_root") for c in fake.commands if "--save_root" in c} == {str(out / "MoFA_UNet_Save")}
    assert {out for _, _, out in fake.evaluations} == {out / key for key in demo_pipeline.STAGES}
    assert "per_seed" not in results and results["seeds"] == [0]
    assert results["step4_final"]["iou"] == pytest.approx(0.8) and results["step4_final"]["landmark_px"] == 8.0
    assert set(results["step_seconds"]) == {"step1", "step2", "step3", "step4"}
    assert results["spread"]["step4_final"]["iou"]["std"] is None and results["spread"]["step4_final"]["iou"]["n"] == 1


def test_ablation_rows_over_seeds_and_a_collapsed_row_is_recorded(tmp_path, monkeypatch, capsys):
    """The collapse guard's stop of one row is recorded with its step, the other rows go on; the rows are mean ± std
    over the seeds and compared with the run's Step 4 by the spread rule; augment reruns Steps 1-4 with G2's
    augmentation; a row whose flags are the run's (fit_on: the demo's Step 2 fits FIT_STEPS) is not trained; fit_off
    trains Steps 2-4 from the run's Step 1 with a feed-forward Step 2."""
    fake = FakePipeline(monkeypatch, collapse={"all_terms"})
    rows = "all_terms,all_terms_gt_landmarks,augment,fit_on,fit_off"
    results = run_main(tmp_path, "--seeds", "2", "--ablation", "--ablation_rows", rows)
    table = results["ablation"]
    variants = [f"step4_{row}" for row in rows.split(",")]
    assert list(table["rows"]) == ["step2_prelim", "step3_unet", "step4_final", *variants]
    collapsed = table["collapsed"]["step4_all_terms"]
    assert set(collapsed) == {"0", "1"} and collapsed["0"]["step"] == "Step4_UNet_MoFA_EM.py"
    assert "mask collapse" in collapsed["1"]["message"]
    assert table["rows"]["step4_all_terms"]["n_seeds"] == 0 and "overall" not in table["rows"]["step4_all_terms"]
    gt = table["spread"]["step4_all_terms_gt_landmarks"]["iou"]
    assert gt["n"] == 2 and gt["mean"] == pytest.approx(0.905) and gt["std"] == pytest.approx(0.00707107)
    assert table["vs_baseline"]["step4_all_terms_gt_landmarks"]["iou"] is True  # +0.1 against a spread of 0.007
    assert table["vs_baseline"]["step4_fit_on"]["iou"] is False and table["same_as"] == {"fit_on": "step4_final"}
    assert table["rows"]["step4_fit_on"]["overall"]["iou"] == pytest.approx(results["step4_final"]["iou"])
    assert set(table["seconds"]["augment"]) == {"0", "1"}
    out = tmp_path / "out"
    for seed in (0, 1):
        folder = out / f"seed_{seed}"
        own = [c for c in fake.commands if "--save_root" in c and "/ablation/augment/" in _flag(c, "--save_root")
               and _flag(c, "--seed") == str(seed)]
        assert [c[0] for c in own] == [demo_pipeline.STEP_SCRIPTS[n] for n in (1, 2, 3, 4)]
        assert ["--augment" in c for c in own] == [True, False, False, True]  # the demo's Step 3 augments already
        assert ["--no_augment" in c for c in own] == [False, False, False, False]
        row_root = folder / "ablation" / "augment" / "MoFA_UNet_Save"
        assert _flag(own[1], "--pretrained_MoFA") == str(row_root / "pretrain_mofa" / "final.pt")
        assert _flag(own[3], "--pretrained_unet") == str(row_root / "Pretrain_UNet" / "final.pt")
        fit = [c for c in fake.commands if "--save_root" in c and "/ablation/fit_off/" in _flag(c, "--save_root")
               and _flag(c, "--seed") == str(seed)]
        assert [c[0] for c in fit] == [demo_pipeline.STEP_SCRIPTS[n] for n in (2, 3, 4)]
        assert _flag(fit[0], "--fit_steps") == "0"
        base = folder / "MoFA_UNet_Save"
        assert _flag(fit[0], "--pretrained_MoFA") == str(base / "pretrain_mofa" / "final.pt"), "the run's Step 1"
        assert _flag(fit[2], "--pretrained_MoFA") == str(base / "pretrain_mofa" / "final.pt")
        assert "--fit_steps" not in fit[1] and "--fit_steps" not in fit[2]
    assert not [c for c in fake.commands if "/ablation/fit_on/" in " ".join(c)], "fit_on is the run itself"
    assert results["timing"]["ablation_seconds"] >= 0 and "augment" in results["timing"]["per_seed"]["1"][
        "ablation_rows"]
    text = capsys.readouterr().out
    assert "collapsed in Step4_UNet_MoFA_EM.py (2 of 2 seeds)" in text
    assert re.search(r"\| step4_all_terms_gt_landmarks \| 0\.905 ± 0\.007 \|.*\| \+0\.100 beyond the spread \|", text)
    assert "| step4_fit_on | 0.805 ± 0.007 |" in text and "same flags as the baseline" in text


def test_a_collapse_in_the_run_itself_stops_the_demo(tmp_path, monkeypatch, capsys):
    """Only the ablation's rows are recorded as collapsed: the demo's own Step 4 collapsing is one line, exit 2."""
    fake = FakePipeline(monkeypatch, collapse={"out"})
    bfm = tmp_path / "model.h5"
    bfm.write_bytes(b"")
    with pytest.raises(SystemExit) as exc:
        cli_main(demo_pipeline.main, ["--profile", "quick", "--out", str(tmp_path / "out"), "--data",
                                      str(tmp_path / "data"), "--bfm", str(bfm)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err[-1].startswith("error: Step4_UNet_MoFA_EM.py was stopped by its collapse guard")
    assert fake.evaluations == []


def test_run_recognises_the_collapse_guard(capfd):
    """run() passes a step's stderr through and turns exit 2 with "mask collapse" into CollapseStop; other failures
    stay DemoError."""
    line = "error: mask collapse: the mean UNet mask inside the face was below 0.05 at 3 log steps in a row"
    script = f"import sys; sys.stderr.write('training\\r' + {line!r} + '\\n'); sys.exit(%d)"
    with pytest.raises(demo_pipeline.CollapseStop) as stop:
        demo_pipeline.run(["-c", script % 2])
    assert stop.value.reason == line.removeprefix("error: ") and stop.value.script == "-c"
    assert line in capfd.readouterr().err, "the step's own message is shown"
    for status, body in ((1, script % 1), (2, "import sys; sys.stderr.write('error: bad flag\\n'); sys.exit(2)")):
        with pytest.raises(demo_pipeline.DemoError) as failed:
            demo_pipeline.run(["-c", body])
        assert not isinstance(failed.value, demo_pipeline.CollapseStop), status
        assert f"exit status {status}" in str(failed.value)


def test_old_demo_output_is_refused_with_one_line(tmp_path, monkeypatch, capsys):
    """A demo_output written before the evaluation's --out manifests is refused before any work, with one line
    naming make clean-demo; one the evaluation wrote passes."""
    from utils.evaluation.command import TOOL
    from utils.output_dir import MANIFEST_NAME

    fake = FakePipeline(monkeypatch)
    out = tmp_path / "out"
    (out / "step3_unet").mkdir(parents=True)
    (out / "step3_unet" / "summary.json").write_text("{}")
    with pytest.raises(SystemExit) as exc:
        cli_main(demo_pipeline.main, ["--profile", "quick", "--out", str(out), "--data", str(tmp_path / "data")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "make clean-demo" in err, err
    assert str(out / "step3_unet") in err and fake.commands == []
    (out / "step3_unet" / MANIFEST_NAME).write_text(json.dumps({"tool": TOOL, "files": ["summary.json"]}))
    demo_pipeline.check_own_output(out, [out], ablation_kept=True)  # the evaluation's own: replaced as usual
    old_row = out / "ablation" / "all_terms" / "eval"
    old_row.mkdir(parents=True)
    (old_row / "summary.json").write_text("{}")
    demo_pipeline.check_own_output(out, [out], ablation_kept=False)  # deleted with the stale ablation anyway
    with pytest.raises(demo_pipeline.DemoError, match="make clean-demo"):
        demo_pipeline.check_own_output(out, [out], ablation_kept=True)


def test_from_step_refuses_steps_made_with_other_seeds(tmp_path, monkeypatch, capsys):
    FakePipeline(monkeypatch)
    run_main(tmp_path, "--seeds", "2")
    before = (tmp_path / "out" / "results.json").read_bytes()
    with pytest.raises(SystemExit) as exc:
        cli_main(demo_pipeline.main, ["--profile", "quick", "--out", str(tmp_path / "out"), "--data",
                                      str(tmp_path / "data"), "--bfm", str(tmp_path / "model.h5"), "--from_step", "5"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "made with seeds 0, 1, not 0; pass --seeds 2 --seed 0" in err, err
    assert (tmp_path / "out" / "results.json").read_bytes() == before
    results = run_main(tmp_path, "--seeds", "2", "--from_step", "5")  # the same seeds: the steps' timings kept
    assert results["per_seed"]["1"]["step_seconds"] == json.loads(before)["per_seed"]["1"]["step_seconds"]


@pytest.mark.parametrize("argv, says", [(["--ablation_rows", "all_terms,nope"], "unknown nope"),
                                        (["--seeds", "0"], "--seeds 0"), (["--seed", "-1"], "--seed -1")])
def test_bad_seed_and_row_flags_are_one_line(argv, says, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(demo_pipeline.main, argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and says in err, err


def test_with_flags_appends_a_switch_once():
    switched = demo_pipeline.with_flags(["--max_iters", "3"], {"--no_augment": None})
    assert switched == ["--max_iters", "3", "--no_augment"]
    assert demo_pipeline.with_flags(["--no_augment"], {"--no_augment": None}) == ["--no_augment"]
    assert demo_pipeline.with_flags(["--no_augment", "--max_iters", "3"], {"--augment": None}) == [
        "--augment", "--max_iters", "3"]  # a switch replaces its opposite
    assert demo_pipeline.without_defaults(["--fit_steps", "0", "--x", "1"]) == ["--x", "1"]
    assert demo_pipeline.without_defaults(["--fit_steps", "20"]) == ["--fit_steps", "20"]


def test_the_step2_row_scores_the_masks_step2_wrote(tmp_path, monkeypatch):
    """The demo's Step 2 fits (--fit_steps FIT_STEPS): its row is evaluated with the same fitting, and the
    step4_fitted row fits the final model; the other rows are the feed-forward networks."""
    fake = FakePipeline(monkeypatch)
    run_main(tmp_path)
    assert _flag(fake.steps(2)[0], "--fit_steps") == str(demo_pipeline.FIT_STEPS)
    n = demo_pipeline.FIT_STEPS
    assert fake.fit_steps == {"fit_oracle": 0, "step2_prelim": n, "step3_unet": 0, "step4_final": 0, "step4_fitted": n}
