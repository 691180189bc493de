"""Fault guards of a training run: non-finite losses, UNet mask collapse, and a clean stop on Ctrl-C / SIGTERM."""
from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field

import torch

from utils.errors import MofaError

log = logging.getLogger(__name__)


class TrainingError(MofaError):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says what to do."""


class NonFiniteLossError(TrainingError):
    """The loss stayed non-finite. ``first_bad``: the step index whose loss was the first non-finite one of the
    run of them, i.e. the weights after ``first_bad`` completed steps give a non-finite loss (the skipped updates
    left them unchanged since), so they are not worth a checkpoint."""

    def __init__(self, message: str, first_bad: int) -> None:
        super().__init__(message)
        self.first_bad = first_bad

@dataclass
class NonFiniteGuard:
    """Skip a step whose loss is NaN/inf; stop with `NonFiniteLossError` after ``patience`` in a row."""

    patience: int = 5
    in_a_row: int = 0
    skipped: int = 0

    def ok(self, loss: torch.Tensor, step: int) -> bool:
        """True when every process's loss is finite. Under torch.distributed the processes agree (one all-reduce of
        a flag): a process that skipped its backward while another ran one would leave DDP waiting forever."""
        finite = own = bool(torch.isfinite(loss).all())
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            flag = torch.tensor(int(own), dtype=torch.int32, device=loss.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            finite = bool(flag)
        if finite:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        where = "" if not own else " on another process"
        log.warning("step %d: non-finite loss%s (%s), update skipped (%d in a row)", step, where, loss.detach().cpu(),
                    self.in_a_row)
        if self.in_a_row >= self.patience:
            raise NonFiniteLossError(f"the loss was non-finite for {self.in_a_row} steps in a row (last at step "
                                     f"{step}): check the data, or lower --learning_rate",
                                     first_bad=step - self.in_a_row + 1)
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
    """Turns Ctrl-C (SIGINT) or SIGTERM into a flag so the loop can checkpoint and exit cleanly.

    The first signal sets the flag; a second one only repeats the notice (``timeout``, ``torchrun`` and ``docker
    stop`` send SIGTERM right after SIGINT, and an impatient user presses Ctrl-C twice); a third gives up at once
    (KeyboardInterrupt)."""

    ABORT_AT = 3

    def __init__(self) -> None:
        self.requested = False
        self.count = 0
        self._previous = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.count >= self.ABORT_AT:
            raise KeyboardInterrupt
        self.requested = True
        again = "" if self.count == 1 else " (already stopping; one more signal aborts without a checkpoint)"
        log.warning("interrupt received: finishing this step, writing a checkpoint and exiting%s", again)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
