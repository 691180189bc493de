"""`make demo`'s driver end to end in its --quick mode (tiny sizes; the numbers are meaningless, the plumbing is not)."""
from __future__ import annotations

import json

import cv2

from utils import demo_pipeline
from utils.synthetic.appearance import APPEARANCE_ITEMS


def test_quick_demo_writes_results_for_every_stage(tmp_path, demo_bfm_h5):
    out, data = tmp_path / "out", tmp_path / "data"
    assert demo_pipeline.main(["--quick", "--out", str(out), "--data", str(data), "--bfm", str(demo_bfm_h5),
                               "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    for stage in ("fit_oracle", "step2_prelim", "step3_unet", "step4_final"):
        assert set(results[stage]) >= {"iou", "accuracy", "precision", "recall", "f1"}
        assert all(0.0 <= results[stage][m] <= 1.0 for m in ("iou", "f1"))
        assert results["per_appearance"][stage] and results["per_category"][stage]
    assert set(results["per_appearance"]["step4_final"]) <= {*APPEARANCE_ITEMS, "none"}
    assert results["wall_seconds"] > 0
    figure = cv2.imread(str(out / "figure.png"))
    size = results["settings"]["image_size"]
    assert figure.shape[1] == 6 * size, "input, GT and the masks of the four stages side by side"
    assert figure.shape[0] > 2 * size
