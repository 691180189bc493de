"""What a training run shows: a tqdm bar, TensorBoard scalars and image grids, a CSV loss log and PNG tiles.

Only the main process (rank 0) writes; on the others every method is a no-op.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from collections.abc import Sequence

import torch
from tqdm import tqdm

from utils.atomic_write import atomic_write

log = logging.getLogger(__name__)


class LossLog:
    """A CSV loss log with a header and one row per logged step (the original wrote one character per field).

    A log that exists already (a resumed run) is first cut back to the rows up to ``start``, so steps redone after a
    resume are not listed twice.
    """

    def __init__(self, path: Path, columns: Sequence[str], enabled: bool = True, start: int = 0) -> None:
        self.path, self.columns, self.enabled = Path(path), ["step", *columns], enabled
        if enabled:
            if self.path.exists():
                _truncate(self.path, start)
            new = not self.path.exists() or self.path.stat().st_size == 0
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", newline="")
            self._writer = csv.writer(self._fh)
            if new:
                self._writer.writerow(self.columns)
                self._fh.flush()

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = [step] + [_fmt(values.get(c)) for c in self.columns[1:]]
        self._writer.writerow(row)
        self._fh.flush()

    def close(self) -> None:
        if self.enabled:
            self._fh.close()

def _truncate(path: Path, start: int) -> None:
    """Keep the header and the rows of steps <= ``start`` (rewritten atomically; unchanged if nothing is cut)."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    keep = rows[:1] + [row for row in rows[1:] if row and row[0].isdigit() and int(row[0]) <= start]
    if len(keep) == len(rows):
        return
    with atomic_write(path, "w", newline="") as fh:
        csv.writer(fh).writerows(keep)


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{float(v):.6g}"


class RunMonitor:
    """One object per step run. ``columns`` are the loss terms written to ``<out>/loss_{split}.csv``; both files
    have them all, and a value one split does not log is an empty cell."""

    def __init__(self, out_dir: Path, columns: Sequence[str], start: int, total: int, enabled: bool = True,
                 desc: str = "train") -> None:
        self.out_dir, self.enabled = Path(out_dir), enabled
        self.train_log = LossLog(self.out_dir / "loss_train.csv", columns, enabled, start)
        self.val_log = LossLog(self.out_dir / "loss_val.csv", columns, enabled, start)
        self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, disable=not enabled,
                        mininterval=2.0)
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                purge = start + 1 if start else None  # events of steps redone after a resume replace the old ones
                self.tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"), purge_step=purge)
            except ImportError:  # tensorboard is in requirements.txt; keep training if a user removed it
                log.warning("tensorboard is not installed: no TensorBoard logs")

    def advance(self, loss: float | None) -> None:
        if self.enabled:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def scalars(self, step: int, values: dict[str, float], split: str = "train") -> None:
        """Write one row of ``<out>/loss_{split}.csv`` (and the TensorBoard scalars). Every key must be a column: a
        value with no column would vanish from the CSV (ValueError, on every process, so a test catches it)."""
        unknown = sorted(set(values) - set(self.train_log.columns[1:]))
        if unknown:
            raise ValueError(f"RunMonitor.scalars: {unknown} are not loss-log columns ({self.train_log.columns[1:]})")
        if not self.enabled:
            return
        (self.train_log if split == "train" else self.val_log).write(step, values)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{split}/{k}", v, step)

    def images(self, step: int, grids: dict[str, torch.Tensor], write_png: bool = True) -> None:
        """``grids``: name -> (B,C,H,W) in [0,1] (C = 1 or 3); written as TensorBoard grids and PNG tiles."""
        if not self.enabled:
            return
        from torchvision.utils import make_grid, save_image
        for name, imgs in grids.items():
            imgs = imgs.detach().float().clamp(0, 1).cpu()
            if imgs.shape[1] == 1:
                imgs = imgs.expand(-1, 3, -1, -1)
            grid = make_grid(imgs, nrow=min(10, imgs.shape[0]), padding=1)
            if self.tb is not None:
                self.tb.add_image(name, grid, step)
            if write_png:
                (self.out_dir / "vis").mkdir(parents=True, exist_ok=True)
                save_image(grid, str(self.out_dir / "vis" / f"{name}_{step:06d}.png"))

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.train_log.close()
            self.val_log.close()
            if self.tb is not None:
                self.tb.close()
