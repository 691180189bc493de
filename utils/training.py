"""Pieces shared by the four training steps: resumable data order, the iteration loop, logging and fault guards.

Nothing here knows about faces; the step scripts combine these with the models and losses.
"""
from __future__ import annotations

import csv
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from utils.errors import MofaError

log = logging.getLogger(__name__)


class TrainingError(MofaError):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says what to do."""


class ResumableSampler(Sampler[int]):
    """Deterministic, resumable, rank-aware epoch order.

    The permutation of epoch ``e`` depends only on ``(seed, e)``, so a run stopped after ``k`` batches and resumed with
    ``set_position(e, k)`` sees exactly the batches that an uninterrupted run would. Each epoch uses the first
    ``floor(n / (batch_size * world_size)) * batch_size * world_size`` indices of the permutation, split across
    ranks by striding, so every rank gets the same number of full batches (the original skipped partial batches too).
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world_size)

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _indices(self) -> torch.Tensor:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(self.n, generator=gen)
        else:
            perm = torch.arange(self.n)
        usable = self.batches_per_epoch * self.batch_size * self.world_size
        return perm[:usable][self.rank::self.world_size][self.start_batch * self.batch_size:]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices().tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


def make_train_loader(dataset: Dataset, batch_size: int, seed: int, workers: int, rank: int = 0,
                      world_size: int = 1, collate_fn=None, shuffle: bool = True) -> tuple[DataLoader, ResumableSampler]:
    """A drop-last loader over ``dataset`` whose order is reproducible and resumable (see ``ResumableSampler``)."""
    sampler = ResumableSampler(len(dataset), batch_size, seed, rank, world_size, shuffle)
    if sampler.batches_per_epoch == 0:
        raise TrainingError(f"the training split has {len(dataset)} images, fewer than one batch of "
                            f"{batch_size} x {world_size} process(es): lower --batch_size or add images")
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        collate_fn=collate_fn, drop_last=True, worker_init_fn=ignore_sigint,
                        generator=_private_generator(seed))
    return loader, sampler


def iterate_steps(loader: DataLoader, sampler: ResumableSampler, start_step: int, total_steps: int):
    """Yield ``(step, batch)`` for ``step`` in ``[start_step, total_steps)``, continuing across epochs."""
    per_epoch = sampler.batches_per_epoch
    step = start_step
    while step < total_steps:
        epoch, position = divmod(step, per_epoch)
        sampler.set_position(epoch, position)
        for batch in loader:
            yield step, batch
            step += 1
            if step >= total_steps:
                return


def total_steps(max_iters: int | None, epochs: int, batches_per_epoch: int) -> int:
    """``--max_iters`` overrides ``--epochs``: the number of optimizer steps to reach."""
    return int(max_iters) if max_iters else int(epochs) * batches_per_epoch


class LossLog:
    """A CSV loss log with a header and one row per logged step (the original wrote one character per field)."""

    def __init__(self, path: Path, columns: Sequence[str], enabled: bool = True) -> None:
        self.path, self.columns, self.enabled = Path(path), ["step", *columns], enabled
        if enabled:
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


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{float(v):.6g}"


class RunningMean:
    """Mean of scalar loss terms over the steps since the last ``reset``."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, terms: dict[str, torch.Tensor | float | None]) -> None:
        for k, v in terms.items():
            if v is not None:
                self.sums[k] = self.sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
        self.count += 1

    def mean(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}

    def reset(self) -> None:
        self.sums, self.count = {}, 0


@dataclass
class NonFiniteGuard:
    """Skip a step whose loss is NaN/inf; stop with a clear message after ``patience`` in a row."""

    patience: int = 5
    in_a_row: int = 0
    skipped: int = 0

    def ok(self, loss: torch.Tensor, step: int) -> bool:
        if torch.isfinite(loss).all():
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        log.warning("step %d: non-finite loss (%s), update skipped (%d in a row)", step, loss.detach().cpu(),
                    self.in_a_row)
        if self.in_a_row >= self.patience:
            raise TrainingError(f"the loss was non-finite for {self.in_a_row} steps in a row (last at step {step}); "
                                "the last good checkpoint is kept. Lower --learning_rate or check the data.")
        return False


@dataclass
class CollapseAlarm:
    """Warn loudly when the UNet mask inside the rendered face collapses to all-occluded or all-visible."""

    low: float = 0.05
    high: float = 0.995
    patience: int = 3
    history: list = field(default_factory=list)

    def update(self, mean_mask_in_face: float, step: int) -> bool:
        bad = not (self.low <= mean_mask_in_face <= self.high)
        self.history = (self.history + [bad])[-self.patience:]
        if len(self.history) == self.patience and all(self.history):
            log.warning("!!! MASK COLLAPSE at step %d: mean UNet mask inside the face = %.4f for %d evaluations in a "
                        "row (healthy range %.2f-%.3f). Check the Step-2 masks and the learning rates.",
                        step, mean_mask_in_face, self.patience, self.low, self.high)
            return True
        return False


class StopFlag:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM into a flag so the loop can checkpoint and exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt received: finishing this step, writing a checkpoint and exiting")

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def make_eval_loader(dataset: Dataset, batch_size: int, workers: int, collate_fn=None) -> DataLoader:
    """A fixed-order loader over a whole split (keeps the last partial batch)."""
    if len(dataset) == 0:
        raise TrainingError("the validation split is empty: add rows to val_landmarks_3D.csv")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_fn,
                      worker_init_fn=ignore_sigint, generator=_private_generator(0))


def _private_generator(seed: int) -> torch.Generator:
    """Loaders draw their worker seeds from this, not from the global RNG, so creating an iterator (at every epoch,
    at a resume, for validation) never shifts the random stream that dropout uses: resume stays exact."""
    return torch.Generator().manual_seed(seed)


def ignore_sigint(_worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which checkpoints and exits cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@torch.no_grad()
def validate(objective, loader: DataLoader, max_batches: int = 0) -> dict[str, float]:
    """Mean of every loss term over the split (weighted by batch size); the original logged the last batch only.

    ``objective(batch) -> (total, terms)``; terms that are None are left out.
    """
    sums: dict[str, float] = {}
    count = 0
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        total, terms = objective(batch)
        n = len(next(iter(batch.values())))
        for k, v in {"total": total, **terms}.items():
            if v is not None:
                sums[k] = sums.get(k, 0.0) + float(v) * n
        count += n
    return {k: v / max(count, 1) for k, v in sums.items()}
