"""`make demo`'s driver end to end in its --quick mode (tiny sizes; the numbers are meaningless, the plumbing is not)."""
from __future__ import annotations

import json

from utils import demo_pipeline


def test_quick_demo_writes_results_for_every_stage(tmp_path, demo_bfm_h5):
    out, data = tmp_path / "out", tmp_path / "data"
    assert demo_pipeline.main(["--quick", "--out", str(out), "--data", str(data), "--bfm", str(demo_bfm_h5),
                               "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    for stage in ("step2_prelim", "step3_unet", "step4_final"):
        assert set(results[stage]) >= {"iou", "accuracy", "precision", "recall", "f1"}
        assert all(0.0 <= results[stage][m] <= 1.0 for m in ("iou", "f1"))
    assert results["wall_seconds"] > 0 and (out / "figure.png").is_file()
