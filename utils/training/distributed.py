"""The process group: one process or many under torchrun, the device each uses, and per-rank seeding.

Also a torchrun that ends in one line: ``python -m utils.training.distributed --nproc_per_node=N StepX.py ...`` takes
torchrun's arguments and runs it; a Ctrl-C (or SIGTERM) reaches the workers, which checkpoint and exit, and the
launcher then says ``error: interrupted`` and exits 130 (plain torchrun prints its own traceback and exits 1); a
worker that failed gives one line naming its rank and exit status (its own message is above it).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from utils.cli import SetupError, resolve_device


def seed_everything(seed: int) -> None:
    """Seed Python ``random``, numpy and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)

@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly single-process) run."""
    rank: int
    world_size: int
    local_rank: int
    is_main: bool
    device: torch.device

def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    if not value.strip().isdigit():
        raise SetupError(f"environment variable {name}={value!r} is not a non-negative integer: launch with torchrun")
    return int(value)

def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (RANK and WORLD_SIZE set), else run single-process.

    Under torchrun: backend nccl on CUDA (device cuda:LOCAL_RANK), gloo on CPU. Without torchrun: a no-op,
    returning rank 0 of 1 on ``resolve_device(device)``.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0, True, resolve_device(device))
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
    if rank >= world:
        raise SetupError(f"RANK={rank} is not below WORLD_SIZE={world}: launch with torchrun")
    base = resolve_device(device)
    if base.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    return DistInfo(rank, world, local, rank == 0, dev)

def cleanup_distributed() -> None:
    """Leave the process group if one was initialised (safe to call in single-process runs)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch(argv: list[str] | None = None) -> int:
    """Run ``torchrun`` with ``argv`` (its own flags, the script and the script's flags); see the module doc.

    Returns 0, or exits 130 (interrupted: every failed worker stopped on the signal, exit 130) or 1 (a worker failed)
    with one line on stderr. torchrun's agent forwards the signal it got to the workers, a second one for a worker
    that the terminal signalled too: the steps' ``StopFlag`` only repeats its notice then."""
    import logging
    import signal
    import sys

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    # the agent's WARNING lines about forwarding a signal: the workers say what they do, and this says how it ended
    for name in ("torch.distributed.elastic.agent.server.api", "torch.distributed.elastic.multiprocessing.api"):
        logging.getLogger(name).setLevel(logging.ERROR)

    try:
        torchrun_main(argv)
    except (SignalException, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except ChildFailedError as exc:
        codes = {rank: failure.exitcode for rank, failure in exc.failures.items()}
        if all(code in (130, -signal.SIGINT, -signal.SIGTERM) for code in codes.values()):
            print("error: interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        failed = ", ".join(f"rank {rank} exit status {code}" for rank, code in sorted(codes.items()))
        print(f"error: {exc.name} failed ({failed}); its messages are above", file=sys.stderr)
        raise SystemExit(1) from None
    return 0


if __name__ == "__main__":
    raise SystemExit(launch())
