"""keep_freed_memory: freed blocks stay in the process, so touching them again faults nothing."""

import os
import subprocess
import sys

import pytest

# Eight 8 MiB blocks written, freed, and again, as a training step's activations are: glibc's
# default trims them off the heap, so every pass faults about 16,000 pages in again.
PASSES = """
import ctypes, resource, sys
from cxrfl_ray.fl.memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(8 << 20) for _ in range(8)]
    for block in blocks:
        ctypes.memset(block, 1, 8 << 20)
    for block in blocks:
        libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, *faults)
"""


def _passes(mode: str, **env: str) -> tuple[str, list[int]]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "CXRFL_KEEP_FREED_MEMORY")}
    out = subprocess.run([sys.executable, "-c", PASSES, mode], env={**clean, **env}, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0], [int(n) for n in out[1:]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_faults_and_a_users_settings_stand():
    applied, kept = _passes("keep")
    _, default = _passes("default")
    assert applied == "True"
    # glibc's default hands the 64 MiB back and faults it in on every pass (16,384 pages)
    assert min(default[2:]) > 12_000, default
    # kept: the first passes grow the heap, later ones reuse it
    assert max(kept[2:]) < 500, kept
    # a user's own glibc setting, or the opt-out, is left alone
    assert _passes("keep", MALLOC_TRIM_THRESHOLD_="131072")[0] == "False"
    assert _passes("keep", CXRFL_KEEP_FREED_MEMORY="0")[0] == "False"
    assert _passes("keep", GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")[0] == "False"
