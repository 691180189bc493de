"""Evaluate occlusion masks (and, on the synthetic benchmark, reconstructions) on one split of an image root.

    python tests/evaluate_segmentation.py --img_path IMAGE_ROOT --split test --save_root DIR --out RESULTS_DIR
        [--stage step2|step3|step4|fit_oracle] [--checkpoint PATH] [--threshold 0.5] [--soft] [--save_images]
        [--overwrite]

The user-facing script of the original project, kept thin: flags and logic are in `utils.evaluation.command`
(`parse_args`, `run_evaluation`); ``--help`` lists everything.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: find utils/

if __name__ == "__main__":  # Ctrl-C while torch is imported: one line, no traceback (utils/startup.py)
    from utils.startup import quiet_interrupts
    quiet_interrupts()

from utils.cli import cli_main  # noqa: E402
from utils.evaluation.command import run_evaluation  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    run_evaluation(argv)
    return 0


if __name__ == "__main__":
    cli_main(main)
