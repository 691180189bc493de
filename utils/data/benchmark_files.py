"""The benchmark files the evaluation reads: the synthetic benchmark's tables and the AR database's file names.

This module owns the contract between the writers (`utils.synthetic.faces`, `utils.prepare.ar_gt`) and the readers
(`utils.evaluation`, `reconstruct.py`, `utils.demo_pipeline`), so that a reader imports no generator.

Synthetic benchmark (``python -m utils.synthetic.faces``), beside the image root's ``Dataset/`` and landmark CSVs::

    IMAGE_ROOT/ground_truth.csv        header `ground_truth_columns(layout)`: filename, split, category, appearance,
                                       occluded_fraction, shape_0 .. light_26 (`coefficient_columns`, the true
                                       post-scaled coefficients in layout order), visible_landmarks (68 chars 0/1);
                                       appearance: the image's `APPEARANCE_ITEMS` joined by '+', or 'none'
    IMAGE_ROOT/synthetic_config.json   the generator's settings; ``face_model`` (``FaceModel.config()``), ``camera``
                                       (a preset name) and ``size`` are what the readers use

AR face database: the category of an image follows from the number at the end of its name (`ar_category`).
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from models.landmarks68 import N_LANDMARKS
from models.layout import CoeffLayout
from utils.errors import DataError

GROUND_TRUTH_NAME = "ground_truth.csv"
SYNTHETIC_CONFIG_NAME = "synthetic_config.json"
LEADING_COLUMNS = ("filename", "split", "category", "appearance", "occluded_fraction")
"""The columns before the coefficients; ``visible_landmarks`` follows them."""
VISIBLE_LANDMARKS_COLUMN = "visible_landmarks"
APPEARANCE_ITEMS = ("stubble", "beard", "moustache", "eyeshadow", "lipstick", "blush", "moles", "freckles",
                    "wrinkles", "specular", "cast_shadow")
"""The out-of-model appearance items, in the order they are listed in the ``appearance`` column."""
RENDER_DTYPE = torch.float64
"""Faces are rendered in float64 so that an image does not depend on the batch it was rendered in: in float32 the
matrix products differ in the last bits with the batch composition (~1e-5 px), enough to flip a rounded digit. The
fit oracle renders the true coefficients the same way."""
NO_APPEARANCE = "none"
ITEM_SEPARATOR = "+"


def coefficient_columns(layout: CoeffLayout) -> list[str]:
    """Column names of the coefficients in ground_truth.csv, in layout order: ``shape_0, ..., light_26``."""
    return [f"{name}_{k}" for name, size in layout.sizes().items() for k in range(size)]


def ground_truth_columns(layout: CoeffLayout) -> list[str]:
    """The header of ground_truth.csv."""
    return [*LEADING_COLUMNS, *coefficient_columns(layout), VISIBLE_LANDMARKS_COLUMN]


def appearance_value(items: tuple[str, ...] | list[str]) -> str:
    """The ``appearance`` value of an image's items: joined by '+', or 'none'."""
    return ITEM_SEPARATOR.join(items) if items else NO_APPEARANCE


def appearance_items(value: str) -> list[str]:
    """The items of an ``appearance`` value (``'none'`` is kept as a name of its own: the images without any)."""
    return value.split(ITEM_SEPARATOR)


@dataclass(frozen=True)
class GroundTruthTable:
    """Rows of the synthetic benchmark's ``ground_truth.csv``, looked up by file name (path or base name).

    face_model: the generator's ``FaceModel.config()`` from ``synthetic_config.json`` beside it (None if absent).
    """

    path: Path
    rows: dict[str, dict[str, str]]
    face_model: dict | None = None

    def row(self, filename: str) -> dict[str, str] | None:
        name = filename.replace("\\", "/").removeprefix("./")
        return self.rows.get(name) or self.rows.get(Path(name).name)

    def category(self, filename: str) -> str | None:
        row = self.row(filename)
        return row.get("category") or None if row else None

    def appearance(self, filename: str) -> str | None:
        """The ``appearance`` value (items joined by '+', or 'none'), None when the table or row lacks it."""
        row = self.row(filename)
        return row.get("appearance") or None if row else None

    def visible(self, filename: str) -> torch.Tensor | None:
        """(68,) bool from the ``visible_landmarks`` 0/1 string (separators ignored), or None."""
        row = self.row(filename)
        text = "".join(ch for ch in (row or {}).get(VISIBLE_LANDMARKS_COLUMN, "") if ch in "01")
        if not text:
            return None
        if len(text) != N_LANDMARKS:
            raise DataError(f"{self.path}: visible_landmarks of {filename} has {len(text)} flags, expected "
                            f"{N_LANDMARKS} (one 0/1 per landmark)")
        return torch.tensor([ch == "1" for ch in text])

    def _values(self, filename: str, columns: list[str]) -> torch.Tensor | None:
        values = [(self.row(filename) or {}).get(c) for c in columns]
        if any(v is None or not v.strip() for v in values):
            return None
        try:
            return torch.tensor([float(v) for v in values], dtype=torch.float64)
        except ValueError:
            raise DataError(f"{self.path}: a coefficient of {filename} is not a number") from None

    def shape(self, filename: str, layout: CoeffLayout) -> torch.Tensor | None:
        """True shape coefficients (n_shape,) from columns shape_0 .. shape_{n_shape-1}, or None."""
        return self._values(filename, [f"shape_{k}" for k in range(layout.n_shape)])

    def coefficients(self, filename: str, layout: CoeffLayout) -> torch.Tensor | None:
        """All true (post-scaled) coefficients (layout.total,) from columns shape_0 .. light_26, or None."""
        return self._values(filename, coefficient_columns(layout))


def read_synthetic_config(image_root: str | Path) -> dict | None:
    """``IMAGE_ROOT/synthetic_config.json`` as a dict, or None when the file does not exist."""
    path = Path(image_root) / SYNTHETIC_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a JSON file written by python -m utils.synthetic.faces ({exc})") from None
    if not isinstance(config, dict):
        raise DataError(f"{path}: expected a JSON object, as python -m utils.synthetic.faces writes")
    return config


def read_ground_truth(image_root: str | Path) -> GroundTruthTable | None:
    """``IMAGE_ROOT/ground_truth.csv`` as a table, or None when the file does not exist."""
    path = Path(image_root) / GROUND_TRUTH_NAME
    if not path.is_file():
        return None
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if "filename" not in (reader.fieldnames or []):
            raise DataError(f"{path}: no 'filename' column (columns: {reader.fieldnames})")
        table = list(reader)
    rows = {}
    for row in table:
        name = row["filename"].replace("\\", "/").removeprefix("./")
        rows[name] = row
        rows.setdefault(Path(name).name, row)
    config = read_synthetic_config(image_root)
    return GroundTruthTable(path, rows, None if config is None else config.get("face_model"))


def read_ground_truth_rows(image_root: str | Path, split: str | None = None) -> list[dict[str, str]]:
    """The rows of ``IMAGE_ROOT/ground_truth.csv`` in file order (those of ``split`` only, when given)."""
    path = Path(image_root) / GROUND_TRUTH_NAME
    with path.open(newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    return [row for row in rows if split is None or row.get("split") == split]


# ----- the AR face database -------------------------------------------------------------------------------------

# Categories whose images carry no occluder: the synthetic benchmark's "none" and AR's "neutral". "other" (AR's
# expressions, or a name without an AR number) says nothing either way.
NO_OCCLUDER_CATEGORIES = frozenset({"none", "neutral"})
UNKNOWN_CATEGORY = "other"

# AR face database image numbers (the suffix of e.g. m-001-21): 1-13 first session, 14-26 second.
AR_CATEGORIES = {
    "neutral": (1, 5, 6, 7, 14, 18, 19, 20),  # neutral expression, any lighting
    "sunglasses": (8, 9, 10, 21, 22, 23),
    "scarf": (11, 12, 13, 24, 25, 26),
}


def ar_category(filename: str | Path) -> str:
    """AR category from the file name: ``m-001-21.bmp`` -> "sunglasses".

    Returns "neutral" (AR numbers 1, 5-7, 14, 18-20), "sunglasses" (8-10, 21-23), "scarf" (11-13, 24-26)
    or "other" (expressions, or a name without an AR number).
    """
    match = re.search(r"-(\d+)$", Path(filename).stem)
    number = int(match.group(1)) if match else -1
    for category, numbers in AR_CATEGORIES.items():
        if number in numbers:
            return category
    return UNKNOWN_CATEGORY
