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


class BadWeightsError(TrainingError):
    """Training stopped because the weights went bad. ``first_bad``: the number of completed steps after which the
    weights are no longer worth a checkpoint (every state saved from there on is bad too), so nothing is saved and
    ``latest.pt`` is left on, or moved back to, the last checkpoint before it (``loop.keep_checkpoint_before``).
    ``what``: how the weights are bad, for the message ("give a non-finite loss")."""

    what = "are bad"

    def __init__(self, message: str, first_bad: int) -> None:
        super().__init__(message)
        self.first_bad = first_bad


class NonFiniteLossError(BadWeightsError):
    """The loss stayed non-finite: the weights after ``first_bad`` completed steps (the step index of the first
    non-finite loss of the run of them) give a non-finite loss; the skipped updates left them unchanged since."""

    what = "give a non-finite loss"


class MaskCollapseError(BadWeightsError):
    """The UNet mask inside the face collapsed (``CollapseGuard``): the weights after ``first_bad`` completed steps
    (the log step before the first collapsed log row) are the first that trained into the collapse."""

    what = "trained into the mask collapse"

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

COLLAPSE_MODES = ("stop", "warn")


@dataclass
class CollapseGuard:
    """Stop (or warn) when the UNet mask inside the rendered face collapses to all-occluded or all-visible.

    Fed the training log rows' ``mask_in_face`` (the mean over the steps of the log period, `loop.train_loop`
    calls ``update`` at every log step), so a collapse is caught within ``patience`` log periods. It fires when
    the value is below ``low`` or above ``high`` at ``patience`` log steps in a row: ``mode`` "stop" raises
    `MaskCollapseError` (whose ``first_bad`` is the log step before the first collapsed row: the rows average over
    the period after it), "warn" logs a warning (once per collapse) and training goes on. ``hints``: what to try,
    for a mask that went to 0 ("low") and to 1 ("high"), one sentence each. Under torch.distributed the processes
    average their values first (one all-reduce), so they all decide alike.
    """

    hints: dict = field(default_factory=dict)
    mode: str = "stop"
    patience: int = 3
    low: float = 0.05
    high: float = 0.995
    device: torch.device | str = "cpu"
    in_a_row: int = 0
    last_step: int = 0  # the log step before the current one (the start step after a resume)
    began: int = 0  # the log step before the first collapsed row of the current run of them

    def __post_init__(self) -> None:
        if self.mode not in COLLAPSE_MODES or self.patience < 1:
            raise ValueError(f"CollapseGuard: mode {self.mode!r} (one of {COLLAPSE_MODES}), patience {self.patience}"
                             " (at least 1)")

    def update(self, mean_mask_in_face: float | None, step: int) -> bool:
        """Record the log row of ``step`` (completed steps); True when the collapse alarm fires (mode "warn")."""
        value = _mean_over_processes(mean_mask_in_face, self.device)
        previous, self.last_step = self.last_step, step
        if value is None:
            return False
        if self.low <= value <= self.high:
            self.in_a_row = 0
            return False
        if self.in_a_row == 0:
            self.began = previous
        self.in_a_row += 1
        if self.in_a_row != self.patience:  # fires once per collapse, at the patience-th collapsed row
            return False
        side = "low" if value < self.low else "high"
        text = (f"mask collapse: the mean UNet mask inside the face was {'below' if side == 'low' else 'above'} "
                f"{self.low if side == 'low' else self.high} at {self.patience} log steps in a row (now {value:.4f}, "
                f"steps {self.began + 1}-{step}). {self.hints.get(side, '')}".rstrip())
        if self.mode == "stop":
            raise MaskCollapseError(f"{text} (--collapse warn trains on)", first_bad=self.began)
        log.warning("!!! %s", text)
        return True


def _mean_over_processes(value: float | None, device) -> float | None:
    """``value`` averaged over the processes of torch.distributed (None when any process has none)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return value
    pair = torch.tensor([0.0 if value is None else float(value), float(value is None)], dtype=torch.float64,
                        device=device)
    torch.distributed.all_reduce(pair)
    return None if pair[1] > 0 else float(pair[0]) / torch.distributed.get_world_size()

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

    def __enter__(self) -> StopFlag:
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
