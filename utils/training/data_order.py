"""A reproducible, resumable order of training batches, and the loaders built on it.

The order of every epoch is a function of (seed, epoch), so a run stopped after k batches and resumed sees exactly
the batches an uninterrupted run would. Nothing here knows about faces.
"""
from __future__ import annotations

import signal
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from utils.training.guards import TrainingError


class ResumableSampler(Sampler[int]):
    """Deterministic, resumable, rank-aware epoch order.

    The permutation of epoch ``e`` depends only on ``(seed, e)``, so a run stopped after ``k`` batches and resumed with
    ``set_position(e, k)`` sees exactly the batches that an uninterrupted run would. Each epoch uses the first
    ``floor(n / (batch_size * world_size)) * batch_size * world_size`` indices of the permutation, split across
    ranks by striding, so every rank gets the same number of full batches (the original skipped partial batches too).
    ``keyed``: yield ``(epoch, index)`` pairs instead of indices, for a dataset whose items depend on the epoch (the
    training augmentation, ``utils.data.augment``), so that they too are a function of (seed, epoch, index).
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, keyed: bool = False) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.shuffle, self.keyed = rank, world_size, shuffle, keyed
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

    def __iter__(self) -> Iterator:
        indices = self._indices().tolist()
        return iter([(self.epoch, i) for i in indices] if self.keyed else indices)

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

def make_train_loader(dataset: Dataset, batch_size: int, seed: int, workers: int, rank: int = 0, world_size: int = 1,
                      collate_fn=None, shuffle: bool = True) -> tuple[DataLoader, ResumableSampler]:
    """A drop-last loader over ``dataset`` whose order is reproducible and resumable (see ``ResumableSampler``).
    A dataset with a true ``epoch_keyed`` attribute (an augmenting one) is indexed with ``(epoch, index)`` pairs."""
    sampler = ResumableSampler(len(dataset), batch_size, seed, rank, world_size, shuffle,
                               keyed=bool(getattr(dataset, "epoch_keyed", False)))
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
