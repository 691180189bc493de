"""The Step 2 -> Step 3 contract: preliminary-mask files and the list CSVs that index them.

Step 2 writes, for every image ``X`` of a split, ``<dir>/<stem>_org.png`` (network input), ``<stem>_raster.png``
(render on black) and ``<stem>_mask.png`` (preliminary mask, 0/255, PNG so it stays binary), and a list
``<dir>/<split>_list.csv`` with a header ``stem,source`` (``source`` = the image's path relative to
``IMAGE_ROOT/Dataset``). Step 3 reads the lists back with ``UNetTrainset``. The original wrote no lists and derived
names by string replacement that broke for files not called ``*_org.jpg`` (defects 5, 6, 17).
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.atomic_write import atomic_write
from utils.data.image_io import read_image_rgb, read_mask, write_image_rgb, write_mask
from utils.errors import DataError

SUFFIXES = ("_org.png", "_raster.png", "_mask.png")


def stem_for(filename: str) -> str:
    """A flat, unique file stem for an image path relative to the dataset folder (``a/b.jpg`` -> ``a__b``)."""
    stem = str(Path(filename).with_suffix("")).replace("\\", "/")
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem.replace("/", "__"))


def write_sample(out_dir: Path, stem: str, image: torch.Tensor, raster: torch.Tensor, mask: torch.Tensor) -> None:
    """Write one sample. ``image``/``raster``: (3,S,S) in [0,1]; ``mask``: (1,S,S) 0/1."""
    write_image_rgb(out_dir / f"{stem}_org.png", image.permute(1, 2, 0).clamp(0, 1).cpu().numpy())
    write_image_rgb(out_dir / f"{stem}_raster.png", raster.permute(1, 2, 0).clamp(0, 1).cpu().numpy())
    write_mask(out_dir / f"{stem}_mask.png", mask[0].cpu().numpy())


def write_list(path: Path, rows: list[tuple[str, str]]) -> None:
    """Write a list CSV of ``(stem, source filename)`` rows, atomically."""
    with atomic_write(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["stem", "source"])
        writer.writerows(rows)


def read_list(path: Path) -> list[str]:
    """Stems listed in a Step-2 list CSV; a clear error if it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found: run Step2_UNet_trainset_generation.py first (or pass --trainset_dir)")
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or rows[0][:1] != ["stem"]:
        raise DataError(f"{path} line 1: expected the header 'stem,source' written by Step 2")
    stems = []
    for lineno, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if not row[0]:
            raise DataError(f"{path} line {lineno}: empty stem")
        stems.append(row[0])
    if not stems:
        raise DataError(f"{path} lists no images: rerun Step 2 on a split with images")
    return stems


class UNetTrainset(Dataset):
    """Step-3 samples: ``{"input": (6,S,S) [render RGB, image RGB], "target": (1,S,S) 0/1}``, CPU tensors."""

    def __init__(self, directory: Path, split: str) -> None:
        self.dir = Path(directory)
        self.stems = read_list(self.dir / f"{split}_list.csv")
        for stem in self.stems:
            for suffix in SUFFIXES:
                if not (self.dir / f"{stem}{suffix}").is_file():
                    raise DataError(f"{self.dir / (stem + suffix)} is missing (listed in {split}_list.csv): "
                                    "rerun Step 2")

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, i: int) -> dict:
        stem = self.stems[i]
        image = _to_chw(read_image_rgb(self.dir / f"{stem}_org.png"))
        raster = _to_chw(read_image_rgb(self.dir / f"{stem}_raster.png"))
        target = torch.from_numpy(read_mask(self.dir / f"{stem}_mask.png"))[None]
        return {"input": torch.cat([raster, image], 0), "target": target.float(), "index": i}


def _to_chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0
