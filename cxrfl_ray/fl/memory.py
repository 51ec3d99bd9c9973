"""Keep the memory a process frees, so the next training step does not fault it in again.

PyTorch's CPU allocator mallocs and frees every activation of every step. glibc hands big freed
blocks back to the kernel (``munmap`` above its mmap threshold, ``trim`` at the heap's top), so
the next step faults the same amount in again: about 215 MB of page faults per 5-step resnet18 fit
at 128 px here. On a VM that returns free guest pages to its host (free page reporting,
ballooning), a fault on a page the host took back costs some microseconds: 256 MB took 1.4-2.5 s to
touch 2 s after it was freed, against 20 ms right away. A 1-thread resnet18 fit of 5 steps
started 3 s after the last took 1.18-1.29 s with glibc's defaults and 0.97-1.06 s (no faults)
with the thresholds below.

``keep_freed_memory`` raises glibc's mmap threshold to its maximum (32 MiB) and its trim threshold
to 2 GiB, so blocks up to 32 MiB are reused from the heap and the heap stays at its peak. It is
called in the client actors only: a long-lived actor reaches its peak every round anyway, while
the driver is the user's process (a notebook, a Tune trial), whose memory it should not hold.
Nothing is changed where the user set glibc's own ``MALLOC_*`` variables or malloc tunables, where
``CXRFL_KEEP_FREED_MEMORY=0``, or where the C library has no ``mallopt`` (not glibc).
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_")
OPT_OUT = "CXRFL_KEEP_FREED_MEMORY"

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's thresholds once per process; True where they are set (now or before)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    users = [name for name in USER_SETTINGS if name in os.environ]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        users.append("GLIBC_TUNABLES")
    if os.environ.get(OPT_OUT) == "0" or users:
        log.debug("malloc thresholds left as they are (%s)", ", ".join(users) or f"{OPT_OUT}=0")
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library; none outside glibc
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
