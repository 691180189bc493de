"""The image-root folder layout (compatible with the original README).

::

    IMAGE_ROOT/
        Dataset/                      images (and X_visible_skin_mask.png GT masks beside X.png / X.jpg)
        train_landmarks_3D.csv        one row per image: filename, x0, y0, ..., x67, y67
        val_landmarks_3D.csv          (see utils/landmarks_csv.py)
        test_landmarks_3D.csv
        all_landmarks_3D.csv

Filenames in the CSVs are relative to ``IMAGE_ROOT/Dataset/``. The G2 names without ``_3D``
(``train_landmarks.csv``, ...) are accepted when the ``_3D`` file is absent. ``--img_path`` may be given
with or without a trailing slash, and may also point at ``IMAGE_ROOT/Dataset`` itself (the original's
habit of ``--img_path ./image_root/Dataset/`` with the CSVs one level up): that case is detected.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.errors import DataError

SPLITS = ("train", "val", "test", "all")
DATASET_DIRNAME = "Dataset"
GT_MASK_SUFFIX = "_visible_skin_mask.png"


def gt_mask_path(image_path: str | Path) -> Path:
    """Path of the GT visible-skin mask beside an image: ``dir/X.jpg`` -> ``dir/X_visible_skin_mask.png``."""
    image_path = Path(image_path)
    return image_path.with_name(image_path.stem + GT_MASK_SUFFIX)


def unsafe_image_name(name: str) -> str | None:
    """Why the CSV filename ``name`` may not be used (it must stay inside ``IMAGE_ROOT/Dataset``): "is absolute"
    or "contains '..'" (with either separator, or a drive letter); None when it is fine. Step 1 and Step 2 read the
    same names, so both refuse the same ones."""
    posix = str(name).replace("\\", "/")
    parts = posix.split("/")
    if posix.startswith("/") or (len(parts[0]) == 2 and parts[0][1] == ":"):
        return "is absolute"
    if ".." in parts:
        return "contains '..'"
    return None


def split_indices(n: int, fractions: tuple[float, float, float], seed: int) -> dict[str, list[int]]:
    """The project's one train/val/test split rule (synthetic benchmark and ``detect_landmarks``).

    A seeded permutation of ``range(n)`` (``numpy.random.default_rng([seed, 2])``) is cut into val, test and train,
    in that order. val and test get ``round(fraction * n)`` images each, at least one when their fraction is
    positive and ``n >= 3``; train gets the rest (when the train fraction is 0 the rest goes to test, or to val).
    Returns ``{"train", "val", "test"} -> sorted indices`` and ``"all" -> range(n)``.
    """
    f_train, f_val, f_test = fractions
    counts = {}
    for name, fraction in (("val", f_val), ("test", f_test)):
        count = round(fraction * n)
        counts[name] = max(count, 1) if fraction > 0 and n >= 3 else count
    counts["val"] = min(counts["val"], n)
    counts["test"] = min(counts["test"], n - counts["val"])
    rest = n - counts["val"] - counts["test"]
    if f_train <= 0 and rest:
        counts["test" if f_test > 0 else "val"] += rest
    order = np.random.default_rng([seed, 2]).permutation(n)
    cut_val, cut_test = counts["val"], counts["val"] + counts["test"]
    parts = {"val": order[:cut_val], "test": order[cut_val:cut_test], "train": order[cut_test:]}
    splits = {name: sorted(int(i) for i in parts[name]) for name in ("train", "val", "test")}
    return {**splits, "all": list(range(n))}


def _csv_names(split: str) -> tuple[str, str]:
    """(preferred name, G2 fallback name) of a split's CSV."""
    return f"{split}_landmarks_3D.csv", f"{split}_landmarks.csv"


def _has_csv(folder: Path) -> bool:
    return any((folder / name).is_file() for split in SPLITS for name in _csv_names(split))


def _points_at_dataset_dir(path: Path) -> bool:
    """True when `path` looks like IMAGE_ROOT/Dataset rather than IMAGE_ROOT."""
    if (path / DATASET_DIRNAME).is_dir() or _has_csv(path):
        return False
    return path.name == DATASET_DIRNAME or (path.is_dir() and _has_csv(path.parent))


class ImageRoot:
    """Resolve the folders and CSV files of an image root.

    Args:
        path: ``IMAGE_ROOT`` (or ``IMAGE_ROOT/Dataset``); trailing slashes are ignored. The folder need
            not exist yet (tools that create an image root use this class too).
    Attributes:
        root: the ``IMAGE_ROOT`` folder (holds the CSVs).
        dataset_dir: the ``IMAGE_ROOT/Dataset`` folder (holds the images).
    """

    def __init__(self, path: str | Path) -> None:
        given = Path(path).expanduser()
        if _points_at_dataset_dir(given):
            self.root = given.parent
            self.dataset_dir = given
        else:
            self.root = given
            self.dataset_dir = given / DATASET_DIRNAME

    def __repr__(self) -> str:
        return f"ImageRoot(root={str(self.root)!r}, dataset_dir={str(self.dataset_dir)!r})"

    def csv(self, split: str) -> Path:
        """Path of the split's CSV: ``{split}_landmarks_3D.csv``, or the G2 name if only that exists."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
        preferred, fallback = (self.root / name for name in _csv_names(split))
        if not preferred.is_file() and fallback.is_file():
            return fallback
        return preferred

    def exists(self, split: str) -> bool:
        """True when the split's CSV file exists (under either name)."""
        return self.csv(split).is_file()
