"""The evaluation's files and its Markdown table: ``per_image.csv``, ``summary.json``, ``summary.md``."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from utils.evaluation.metrics import METRIC_NAMES, OCCLUDER_METRIC_NAMES
from utils.evaluation.reconstruction import RECON_NAMES
from utils.evaluation.scoring import ALL_FACE, ALL_FACE_PREFIX, COUNT_NAMES

PER_IMAGE_NAME = "per_image.csv"
SUMMARY_JSON_NAME = "summary.json"
SUMMARY_MD_NAME = "summary.md"
IMAGES_DIR = "images"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _occluder_cells(block: dict) -> str:
    return " | ".join(_fmt(block[m]) for m in OCCLUDER_METRIC_NAMES)


def format_markdown(summary: dict) -> str:
    """A short Markdown report: overall metrics (paper protocol and pooled) beside the all-face yardstick, the
    pooled occluder metrics, categories and appearance items, reconstruction."""
    ref = summary[ALL_FACE]
    lines = [f"## {summary['stage']} on {summary['split']}: {summary['n_images']} images, "
             f"{summary['n_with_gt']} with a GT mask", "",
             "| metric | mean | std | pooled | all-face mean | all-face pooled |", "|---|---|---|---|---|---|"]
    for m in METRIC_NAMES:
        s, r = summary["paper_protocol"][m], ref["paper_protocol"][m]
        lines.append(f"| {m} | {_fmt(s['mean'])} | {_fmt(s['std'])} | {_fmt(summary['pooled'][m])} | "
                     f"{_fmt(r['mean'])} | {_fmt(ref['pooled'][m])} |")
    occ = summary["occluders"]
    lines += ["", f"Occluders, pooled over the {occ['n_images']} images with an occluder (scoring.with_occluder):", "",
              "| mask | " + " | ".join(OCCLUDER_METRIC_NAMES) + " |", "|---|---|---|---|",
              f"| {summary['stage']} | {_occluder_cells(occ)} |", f"| all-face | {_occluder_cells(ref['occluders'])} |"]
    for key, title in (("per_category", "category"), ("per_appearance", "appearance")):
        if not summary.get(key):
            continue
        pooled = " | ".join(f"{m} (pooled)" for m in OCCLUDER_METRIC_NAMES)
        lines += ["", f"| {title} | images | with GT | " + " | ".join(METRIC_NAMES) + " | all-face iou | "
                  f"with occluder | {pooled} |",
                  "|---|---|---|" + "---|" * (len(METRIC_NAMES) + 2 + len(OCCLUDER_METRIC_NAMES))]
        for name, s in summary[key].items():
            values = " | ".join(_fmt(s["paper_protocol"][m]["mean"]) for m in METRIC_NAMES)
            lines.append(f"| {name} | {s['n_images']} | {s['n_with_gt']} | {values} | "
                         f"{_fmt(s[ALL_FACE]['paper_protocol']['iou']['mean'])} | {s['occluders']['n_images']} | "
                         f"{_occluder_cells(s['occluders'])} |")
    if "reconstruction" in summary:
        rec = summary["reconstruction"]
        lines += ["", f"| reconstruction ({rec['n_images']} images) | mean | std |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(rec[k]['mean'])} | {_fmt(rec[k]['std'])} |" for k in RECON_NAMES]
    return "\n".join(lines) + "\n"


def _json_safe(x):
    """NaN -> None, recursively, so the file is strict JSON."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def per_image_columns(rows: list[dict]) -> list[str]:
    """The columns of per_image.csv: filename, category, (appearance,) has_gt_mask, counts, metrics, the all-face
    counts and metrics, and the reconstruction errors present."""
    columns = ["filename", "category", *(["appearance"] if any("appearance" in r for r in rows) else []),
               "has_gt_mask", *COUNT_NAMES, *METRIC_NAMES]
    columns += [ALL_FACE_PREFIX + k for k in (*COUNT_NAMES, *METRIC_NAMES)]
    return columns + [k for k in RECON_NAMES if any(k in r for r in rows)]


def write_results(out_dir: str | Path, rows: list[dict], summary: dict) -> Path:
    """Write ``per_image.csv``, ``summary.json`` and ``summary.md`` into ``out_dir``; returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / PER_IMAGE_NAME).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=per_image_columns(rows), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    (out_dir / SUMMARY_JSON_NAME).write_text(json.dumps(_json_safe(summary), indent=2) + "\n")
    (out_dir / SUMMARY_MD_NAME).write_text(format_markdown(summary))
    return out_dir
