"""The loop every training step shares: optimise, log, show, validate, checkpoint, stop cleanly on Ctrl-C.

The step scripts supply what differs (``LoopHooks``); nothing here knows about faces.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from utils.errors import MofaError, message_of
from utils.training.checkpoint import LATEST_NAME, CheckpointWriteError, checkpoint_steps, find_latest, publish
from utils.training.data_order import iterate_steps
from utils.training.guards import BadWeightsError, NonFiniteGuard, StopFlag, TrainingError
from utils.training.run import Run, conclude

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """What a step trains and checkpoints: name -> network, name -> its optimizer, name -> its scheduler.

    The optimizers and schedulers share their names (one of each per trained network, e.g. Step 4's ``encoder``
    and ``unet``); those names are the keys in the checkpoint and the ``lr_<name>`` columns of the loss log.
    """

    models: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler]

    def __post_init__(self) -> None:
        if set(self.optimizers) != set(self.schedulers):
            raise ValueError(f"TrainState: optimizers {sorted(self.optimizers)} and schedulers "
                             f"{sorted(self.schedulers)} must have the same names")

    def parts(self) -> tuple[dict, dict, dict]:
        """(models, optimizers, schedulers), the arguments of ``Run.save`` / ``Run.resume``."""
        return self.models, self.optimizers, self.schedulers

    def lr_columns(self) -> list[str]:
        """The loss-log columns of the learning rates the loop logs: ``lr_<name>`` per scheduler."""
        return [f"lr_{name}" for name in self.schedulers]


@dataclass
class LoopHooks:
    """What differs between the training steps; ``train_loop`` does the rest.

    forward(index, batch) -> (loss, terms, names): the step of 0-based ``index`` (= steps completed before it): sets
    train/eval modes, returns the loss, its named terms and the names (keys of ``TrainState.optimizers``) of the
    optimizers to step. visualise() -> name -> (B,C,H,W) images in [0,1]. validate() -> name -> float, the means
    over the validation split. Optional: after_step(step) runs after every optimizer step with the steps completed
    (e.g. BatchNorm re-estimation); probe() -> name -> float runs on the main process at every log step and its
    values are written with the training scalars; check(step, means) runs on every process at every log step with
    the row's means and may raise a `TrainingError` to stop (the collapse guard).
    """

    forward: Callable
    visualise: Callable
    validate: Callable
    after_step: Callable | None = None
    probe: Callable | None = None
    check: Callable | None = None


def train_loop(run: Run, loader, sampler, start: int, end: int, hooks: LoopHooks, state: TrainState, spec: dict,
               monitor) -> int:
    """The loop every training step shares: optimise, log, show, validate, checkpoint, stop cleanly on Ctrl-C.

    ``step`` is always the number of completed optimizer steps (``start`` after a resume); the step being taken has
    index ``step``. A data error or a failed write ends the run with one line, after the state of the last
    completed step is saved (``save_on_error``): a corrupt image at hour ten costs nothing but a ``--resume``. The
    non-finite-loss stop and the collapse stop save nothing and leave latest.pt on the last checkpoint before the
    weights went bad (``keep_checkpoint_before``). A log row is the mean over the steps since the previous log
    step; the first log step after a resume from the middle of a log period writes no row (it would average only
    the steps since the resume).
    """
    args = run.args
    if start >= end:
        log.warning("nothing to train: the run is at step %d and --max_iters / --epochs end at step %d; final.pt "
                    "gets the step-%d state", start, end, start)
    guard, running = NonFiniteGuard(), RunningMean()
    pending: list[dict] = []  # this log period's loss terms, still on the device: read (one sync) when logged
    step, logged_from = start, start  # logged_from: the steps since it are in ``running``
    with StopFlag() as stop, saving_on_error(run, lambda: step, state, spec, monitor):
        for index, batch in iterate_steps(loader, sampler, start, end):
            loss, terms, names = hooks.forward(index, batch)
            for opt in state.optimizers.values():
                opt.zero_grad(set_to_none=True)
            if guard.ok(loss, index):
                loss.backward()
                for name in names:
                    state.optimizers[name].step()
            for sched in state.schedulers.values():
                sched.step()
            step = index + 1
            if hooks.after_step is not None:
                hooks.after_step(step)
            pending.append({k: v.detach() if torch.is_tensor(v) else v for k, v in {"total": loss, **terms}.items()})
            shown = None
            if due(step, args.log_every, end):
                shown = log_row(run, step, period_start(step, args.log_every) >= logged_from, pending, running,
                                hooks, state, monitor)
                logged_from = step
            monitor.advance(shown)
            if run.is_main and due(step, args.vis_every, end):
                with torch.no_grad():
                    monitor.images(step, hooks.visualise())
            if run.is_main and due(step, args.eval_every, end):
                monitor.scalars(step, hooks.validate(), split="val")
            if step % args.ckpt_every == 0 or stop.requested:
                run.save(step, *state.parts(), spec)
            if stop.requested:
                break
    return conclude(run, step, end, stop.requested, state.parts(), spec, monitor)


def log_row(run: Run, step: int, whole: bool, pending: list[dict], running: RunningMean, hooks: LoopHooks,
            state: TrainState, monitor) -> float | None:
    """Write the training row of log step ``step``: the means of the period's terms, the learning rates and the
    probe; then ``hooks.check``. ``whole``: the period's steps were all run by this process (False for the first
    row after a resume mid-period: nothing is written). Returns the mean total loss for the progress bar."""
    for values in pending:
        running.add(values)
    pending.clear()
    means = running.mean()
    running.reset()
    if not whole:
        log.info("step %d: no loss row (the log period began before the resume)", step)
        return None
    lrs = {f"lr_{name}": sched.get_last_lr()[0] for name, sched in state.schedulers.items()}
    probed = {}
    if hooks.probe is not None and run.is_main:
        with torch.no_grad():
            probed = hooks.probe()
    monitor.scalars(step, {**means, **lrs, **probed})
    if hooks.check is not None:
        hooks.check(step, means)
    return means.get("total")


def period_start(step: int, every: int) -> int:
    """The log step before log step ``step``: the last multiple of ``every`` below it (0 when ``every`` <= 0, i.e.
    logging only at the end)."""
    return (step - 1) // every * every if every > 0 else 0


@contextlib.contextmanager
def saving_on_error(run: Run, current_step: Callable[[], int], state: TrainState, spec: dict, monitor):
    """Turn a data error, a guard's stop or a failed write inside the block into ``save_on_error``'s error."""
    try:
        yield
    except (MofaError, OSError) as exc:
        with contextlib.suppress(OSError):
            monitor.close()
        raise save_on_error(run, current_step(), state, spec, exc) from None


def save_on_error(run: Run, step: int, state: TrainState, spec: dict, exc: BaseException) -> MofaError:
    """The error to raise when training stops at ``step`` (steps completed) on ``exc``, after saving that state.

    The state is saved unless it is saved already, nothing was trained, the weights are no longer finite, a guard
    found them bad (the loss stayed non-finite, or the mask collapsed: `keep_checkpoint_before` decides what
    latest.pt holds), or the error is a failed checkpoint write (then the previous checkpoint stands). The message
    says where the state is.
    """
    if isinstance(exc, OSError):
        exc = TrainingError(f"cannot write {exc.filename or 'a file'} ({exc.strerror or exc})")
    latest = run.out_dir / LATEST_NAME
    resumable = True
    if isinstance(exc, BadWeightsError):
        note, resumable = keep_checkpoint_before(run, exc.first_bad, exc.what)
    elif run.saved_step == step:
        note = f"the step-{step} state is in {latest}"
    elif step == 0 or isinstance(exc, CheckpointWriteError):
        note = ("nothing was trained yet" if step == 0 else
                f"{latest} (step {run.saved_step}) is intact" if run.saved_step is not None else "no checkpoint yet")
    elif not all(bool(torch.isfinite(p).all()) for model in state.models.values() for p in model.parameters()):
        note = (f"the weights are no longer finite, so they were not saved; {latest} (step {run.saved_step}) is "
                "intact" if run.saved_step is not None else "the weights are no longer finite, so they were not saved")
    else:
        try:
            run.save(step, *state.parts(), spec)
            note = f"the state after step {step} is saved in {latest}"
        except CheckpointWriteError as write_error:
            note = f"saving the step-{step} state failed too: {write_error}"
    then = ("continue with --resume (or start again with --overwrite)" if resumable else
            "start again with --overwrite")
    text = f"stopped after step {step}: {message_of(exc)}; {note}. Fix the cause, then {then}"
    if isinstance(exc, MofaError):
        exc.args = (text,)
        return exc
    return TrainingError(text)


def keep_checkpoint_before(run: Run, first_bad: int, what: str = "give a non-finite loss") -> tuple[str, bool]:
    """After a guard's stop (`guards.BadWeightsError`: a non-finite loss, a mask collapse): leave ``latest.pt`` on a
    state from before the weights went bad; return what to say and whether ``--resume`` can continue.

    The weights after ``first_bad`` steps are bad (they ``what``), and so is every state saved since, so nothing is
    saved. ``latest.pt`` is kept when it is older; when it holds those weights it is moved back to the newest kept
    ``ckpt_*.pt`` before ``first_bad`` (so that ``--resume`` starts from there), and the checkpoints of those
    weights are deleted (pruning and ``find_latest`` would otherwise prefer them). Keeping a copy of the state
    before every update would cost a second copy of the weights and the optimizer state, so the last good state is
    the last checkpoint.
    """
    latest = run.out_dir / LATEST_NAME
    head = f"the weights after step {first_bad} {what}, so they were not saved; "
    if not run.is_main:
        return head + "rank 0 names the checkpoint that is kept", True
    if run.saved_step is not None and run.saved_step < first_bad:
        return head + f"{latest} (step {run.saved_step}) is kept", True
    saved = checkpoint_steps(run.out_dir)
    earlier = [(s, path) for s, path in saved if s < first_bad]
    if earlier:
        good, path = earlier[-1]
        try:
            publish(path, latest)
            for _, bad in (item for item in saved if item[0] >= first_bad):
                bad.unlink()
        except OSError as exc:
            return head + f"moving {latest} back to {path} failed ({exc.strerror or exc}): copy it there by hand", True
        run.saved_step = good
        return head + f"{latest} now holds step {good} ({path.name}), the last checkpoint before them", True
    newest = find_latest(run.out_dir)
    if newest is not None:
        return head + f"{newest} holds them too and no earlier checkpoint is kept", False
    return head + "no checkpoint exists yet", False


def due(step: int, every: int, end: int) -> bool:
    """True every ``every`` steps and at the last step (``every`` <= 0 means only at the end)."""
    return step == end or (every > 0 and step % every == 0)


class RunningMean:
    """Mean of each scalar loss term over the steps since the last ``reset`` that reported it.

    Every key has its own count: a term that only some steps compute (Step 4's UNet-phase and MoFA-phase terms)
    is averaged over those steps, not diluted by the others. None values are not counted.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, terms: dict[str, torch.Tensor | float | None]) -> None:
        for k, v in terms.items():
            if v is not None:
                self.sums[k] = self.sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
                self.counts[k] = self.counts.get(k, 0) + 1

    def mean(self) -> dict[str, float]:
        return {k: v / self.counts[k] for k, v in self.sums.items()}

    def reset(self) -> None:
        self.sums, self.counts = {}, {}


def batch_size_of(batch: dict) -> int:
    """Images in a batch: the length of its ``"index"`` entry, which every dataset of the steps returns."""
    if "index" not in batch:
        raise TypeError(f"validate: a batch must carry 'index' (B,) (it has {sorted(batch)})")
    return len(batch["index"])

@torch.no_grad()
def validate(objective, loader: DataLoader, max_batches: int = 0) -> dict[str, float]:
    """Mean of every loss term over the split (weighted by batch size); the original logged the last batch only.

    ``objective(batch) -> (total, terms)``; terms that are None are left out. Each term is averaged over the
    images of the batches that reported it (`batch_size_of`).
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        total, terms = objective(batch)
        n = batch_size_of(batch)
        for k, v in {"total": total, **terms}.items():
            if v is not None:
                sums[k] = sums.get(k, 0.0) + float(v) * n
                counts[k] = counts.get(k, 0) + n
    return {k: v / counts[k] for k, v in sums.items()}
