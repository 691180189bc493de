"""Keep freed host memory in the process for reuse instead of handing it back to the kernel after every step.

PyTorch takes every CPU tensor from ``malloc``. glibc serves blocks above its mmap threshold (128 kB, adapting up
to 32 MB) with a fresh ``mmap`` and trims the top of its heap on ``free``, so a training step that allocates and
frees the same few hundred MB every iteration page-faults all of it in again. On the 2-core development CPU that
was ~25 % of the shaded render's CPU time and ~20 % of a ResNet-50 forward (system time; see benchmarks/README.md).
``retain_freed_memory`` raises both thresholds once per process, so freed blocks are reused without faults; the
resident memory then stays at the run's peak (which every training step reaches anyway).
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt() parameters
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MOFA_SYSTEM_MALLOC")


def retain_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 2 ** 31 - 1) -> bool:
    """Ask glibc's allocator to serve blocks below ``mmap_threshold`` bytes from its heap and to return heap memory
    to the kernel only when more than ``trim_threshold`` bytes are free at its top.

    Returns True when applied. A no-op (False) off Linux/glibc and when the environment already says how to
    allocate (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, or ``MOFA_SYSTEM_MALLOC=1`` to opt out).
    """
    if not sys.platform.startswith("linux") or any(os.environ.get(name) for name in _USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    if not applied:
        log.debug("mallopt refused the thresholds; freed memory is returned to the kernel as usual")
    return applied
