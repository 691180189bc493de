"""The process group: one process or many under torchrun, the device each uses, and per-rank seeding."""
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
