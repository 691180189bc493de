"""The Step 2 -> Step 3 contract: preliminary-mask files and the list CSVs that index them.

Step 2 writes, for every image ``X`` of a split (``X`` = its path relative to ``IMAGE_ROOT/Dataset`` as the CSV
gives it, e.g. ``sub/0001.jpg``), ``<dir>/X_org.png`` (network input), ``<dir>/X_raster.png`` (render on black) and
``<dir>/X_mask.png`` (preliminary mask, 0/255, PNG so it stays binary), mirroring the image folder tree, and a list
``<dir>/<split>_list.csv`` with a header ``stem,source`` (``stem`` = ``X`` normalised by ``stem_for``, ``source`` =
the CSV's filename). Keeping the whole relative path and the extension makes the names unique and reversible
(``x.png`` and ``x.jpg``, ``a b.png`` and ``a_b.png``, ``日本.png`` and ``中国.png`` stay apart); two images whose names
would still meet (they differ only in letter case, which a case-insensitive file system merges) are refused
(``check_unique``). Step 3 reads the lists back with ``UNetTrainset``. The original wrote no lists and derived
names by string replacement that broke for files not called ``*_org.jpg`` (docs/method.md, defects 5, 6, 17).
"""
from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.atomic_write import atomic_write
from utils.data.augment import Augmenter, augment_arrays, split_key
from utils.data.image_io import read_image_rgb, read_mask, write_image_rgb, write_mask
from utils.errors import DataError

SUFFIXES = ("_org.png", "_raster.png", "_mask.png")


def stem_for(filename: str) -> str:
    """The output stem of an image: its path relative to the dataset folder, extension kept, in ``/`` form without
    ``.`` parts (``./a\\b.jpg`` -> ``a/b.jpg``; the outputs are ``a/b.jpg_org.png``, ...).

    Raises DataError for a path that would leave the output folder (absolute, a drive, or ``..``).
    """
    posix = str(filename).replace("\\", "/")
    parts = [part for part in posix.split("/") if part not in ("", ".")]
    if posix.startswith("/") or not parts or ".." in parts or (len(parts[0]) == 2 and parts[0][1] == ":"):
        raise DataError(f"image name {filename!r}: Step 2 names its outputs after the image's path relative to "
                        "IMAGE_ROOT/Dataset, which must not be absolute or contain '..'")
    return "/".join(parts)


def check_unique(sources: Iterable[tuple[str, str]]) -> None:
    """DataError naming both images when two different images would get the same outputs (``sources``: ``(where,
    name)`` pairs, e.g. ``("train_landmarks_3D.csv", "a.png")``): names that differ only in letter case, or only in
    the separator (``sub\\x.png``, one file name on POSIX, and ``sub/x.png``). The same image named twice (in two
    splits, or as ``./a.png`` and ``a.png``) is fine."""
    seen: dict[str, tuple[str, str, str]] = {}
    for where, name in sources:
        stem = stem_for(name)
        first_where, first_name, first_stem = seen.setdefault(stem.casefold(), (where, name, stem))
        if first_stem != stem:
            raise DataError(f"{where}: {name!r} and {first_stem!r} ({first_where}) would get the same Step-2 output "
                            "files (their names differ only in letter case); rename one of the images")
        if os.path.normpath(first_name) != os.path.normpath(name):
            raise DataError(f"{where}: {name!r} and {first_name!r} ({first_where}) are different files that would get "
                            f"the same Step-2 output files ({stem}_*.png); rename one of the images")


def write_sample(out_dir: Path, stem: str, image: torch.Tensor, raster: torch.Tensor, mask: torch.Tensor) -> None:
    """Write one sample. ``image``/``raster``: (3,S,S) in [0,1]; ``mask``: (1,S,S) 0/1."""
    write_image_rgb(out_dir / f"{stem}_org.png", image.permute(1, 2, 0).clamp(0, 1).cpu().numpy())
    write_image_rgb(out_dir / f"{stem}_raster.png", raster.permute(1, 2, 0).clamp(0, 1).cpu().numpy())
    write_mask(out_dir / f"{stem}_mask.png", mask[0].cpu().numpy())


def write_list(path: Path, rows: list[tuple[str, str]]) -> None:
    """Write a list CSV of ``(stem, source filename)`` rows (UTF-8), atomically."""
    try:
        with atomic_write(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["stem", "source"])
            writer.writerows(rows)
    except OSError as exc:
        raise DataError(f"cannot write {path}: {exc.strerror or exc}") from None


def read_list(path: Path) -> list[str]:
    """Stems listed in a Step-2 list CSV; a clear error if it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found: run Step2_UNet_trainset_generation.py first (or pass --trainset_dir)")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows or rows[0][:1] != ["stem"]:
        raise DataError(f"{path} line 1: expected the header 'stem,source' written by Step 2")
    stems = []
    for lineno, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if not row[0]:
            raise DataError(f"{path} line {lineno}: empty stem")
        try:
            stem = stem_for(row[0])
        except DataError as exc:
            raise DataError(f"{path} line {lineno}: {exc}") from None
        stems.append(stem)
    if not stems:
        raise DataError(f"{path} lists no images: rerun Step 2 on a split with images")
    return stems


class UNetTrainset(Dataset):
    """Step-3 samples: ``{"input": (6,S,S) [render RGB, image RGB], "target": (1,S,S) 0/1}``, CPU tensors.

    ``augment``: G2's training augmentation (``utils.data.augment``) or None; items fetched with an ``(epoch, index)``
    key (the training sampler's, ``epoch_keyed``) get one affine for the render, the image and the target mask, so
    the render stays aligned with the image. Items fetched with a plain index are never augmented.
    """

    def __init__(self, directory: Path, split: str, augment: Augmenter | None = None) -> None:
        self.dir = Path(directory)
        self.augment = augment
        self.stems = read_list(self.dir / f"{split}_list.csv")
        for stem in self.stems:
            for suffix in SUFFIXES:
                if not (self.dir / f"{stem}{suffix}").is_file():
                    raise DataError(f"{self.dir / (stem + suffix)} is missing (listed in {split}_list.csv): "
                                    "rerun Step 2")

    def __len__(self) -> int:
        return len(self.stems)

    @property
    def epoch_keyed(self) -> bool:
        """True when items depend on the epoch (augmentation on): the training sampler then sends (epoch, index)."""
        return self.augment is not None

    @property
    def image_size(self) -> int:
        """Side of the images Step 2 wrote (read from the first sample)."""
        return int(read_image_rgb(self.dir / f"{self.stems[0]}{SUFFIXES[0]}").shape[0])

    def __getitem__(self, key) -> dict:
        """Item ``key``: an index, or an ``(epoch, index)`` pair (augmented when ``augment`` is set)."""
        epoch, i = split_key(key)
        stem = self.stems[i]
        image = read_image_rgb(self.dir / f"{stem}_org.png")
        raster = read_image_rgb(self.dir / f"{stem}_raster.png")
        target = read_mask(self.dir / f"{stem}_mask.png")
        if self.augment is not None and epoch is not None:
            params = self.augment.params(epoch, i, image.shape[:2])
            (raster, image), (target,), _ = augment_arrays(params, [raster, image], [target])
        return {"input": torch.cat([_to_chw(raster), _to_chw(image)], 0),
                "target": torch.from_numpy(np.ascontiguousarray(target))[None].float(), "index": i}


def _to_chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0
