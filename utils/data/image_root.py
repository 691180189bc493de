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

from utils.errors import DataError

SPLITS = ("train", "val", "test", "all")
DATASET_DIRNAME = "Dataset"


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
