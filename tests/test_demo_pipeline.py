"""`make demo`'s driver end to end in --quick mode (tiny sizes: the numbers are meaningless, the plumbing is not)."""
from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest

from utils import demo_pipeline
from utils.synthetic.appearance import APPEARANCE_ITEMS


def test_quick_demo_writes_results_for_every_stage(tmp_path, demo_bfm_h5):
    out, data = tmp_path / "out", tmp_path / "data"
    assert demo_pipeline.main(["--quick", "--out", str(out), "--data", str(data), "--bfm", str(demo_bfm_h5),
                               "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    size = demo_pipeline.QUICK["image_size"]
    for key, stage in demo_pipeline.STAGES.items():
        summary = json.loads((out / key / "summary.json").read_text())
        assert summary["stage"] == stage and summary["split"] == "test" and summary["n_with_gt"] >= 1
        with (out / key / "per_image.csv").open() as fh:
            rows = [r for r in csv.DictReader(fh) if r["has_gt_mask"] == "True"]
        assert len(rows) == summary["n_with_gt"]
        for metric in ("iou", "accuracy", "precision", "recall", "f1"):
            per_image = np.array([float(r[metric]) for r in rows])
            assert results[key][metric] == pytest.approx(summary["paper_protocol"][metric]["mean"])
            assert results[key][metric] == pytest.approx(per_image.mean(), abs=1e-6)  # the table is the image mean
            assert 0.0 <= per_image.min() and per_image.max() <= 1.0
    assert set(results["step_seconds"]) == {"step1", "step2", "step3", "step4"}
    assert results["wall_seconds"] >= sum(results["step_seconds"].values()) > 0
    assert results["settings"] == json.loads(json.dumps(demo_pipeline.QUICK))
    for stage in demo_pipeline.STAGES:
        assert results["per_appearance"][stage] and results["per_category"][stage]
    assert set(results["per_appearance"]["step4_final"]) <= {*APPEARANCE_ITEMS, "none"}
    figure = cv2.imread(str(out / "figure.png"))
    assert figure.shape[1] == 6 * size, "input, GT and the masks of the four stages side by side"
    assert figure.shape[0] > 2 * size
