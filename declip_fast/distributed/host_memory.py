"""Host (CPU) memory: keep freed tensor memory in the process instead of handing it back to the OS.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc gives memory above a size
threshold back to the kernel when it is freed (``munmap``, or trimming the top of the heap), so
the next step's tensors of the same sizes start on fresh pages, and every 4 KiB page costs a
page fault (kernel entry plus zeroing) the first time an op writes it. A training step frees
and re-allocates its whole working set (activations, gradients) every step: at the paper's
ViT-B/32 + 12-layer text size, batch 16, the CLIP step took ~63,000 minor faults per step and
the DeCLIP step (two image views, two text views, the MLM head) ~195,000, which made the
DeCLIP step's element-wise ops (``mul``, ``sigmoid_backward``, ``fill_``) 4-8x slower per call
than the CLIP step's, although both run the same shapes.

:func:`retain_freed_memory` sets two of glibc's parameters once, process-wide (``mallopt``):

- ``M_MMAP_MAX`` = 0: no block is served by its own ``mmap``, so even the large ones (a
  49,408 x 512 embedding gradient is 101 MB) come from the heap and go back to it;
- ``M_TRIM_THRESHOLD`` = 2 GiB - 1: free memory at the top of the heap is kept up to that.

The process's resident memory then stays near its peak between steps instead of dropping and
refilling, as PyTorch's CUDA caching allocator does for GPU memory; a repeating step reuses the
same blocks, so it grows little (measured: the paper-size steps' peak resident set 1-7% above
glibc's defaults, the 7% where differently shaped passes also ran in the process). Keeping
blocks of up to 32 MiB only (``M_MMAP_THRESHOLD`` at its maximum) was measured too: 2-4% slower
than this, its steps still faulting ~15,000-34,000 times on the large blocks. Setting these
turns off glibc's adaptive thresholds;
``MALLOC_MMAP_MAX_`` / ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` or a
``glibc.malloc`` tunable in the environment, or a preloaded jemalloc / tcmalloc / mimalloc, are
the user's choice and left alone. On anything other than glibc this does nothing.

``benchmarks/bench_host_memory.py`` measures the steps with and without it, each in a fresh
process. Nothing happens at import time; ``declip_fast.distributed.env.setup`` calls it for a
CPU run (the trainer's ``host_memory: retain``, the default).
"""

from __future__ import annotations

import ctypes
import os

# glibc's mallopt parameter numbers (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int
_ENV_KEYS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
_PRELOADED = ("jemalloc", "tcmalloc", "mimalloc")

SETTINGS = ("retain", "system")  # the trainer's host_memory: this module's setting, or glibc's own

_applied: bool | None = None  # None: not tried yet in this process


def _glibc() -> ctypes.CDLL | None:
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
    except (AttributeError, ValueError, OSError):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def user_choice() -> str | None:
    """What in the environment already chooses the allocator's behaviour, or None."""
    for key in _ENV_KEYS:
        if key in os.environ and (key != "GLIBC_TUNABLES" or "glibc.malloc" in os.environ[key]):
            return key
    preload = os.environ.get("LD_PRELOAD", "")
    for name in _PRELOADED:
        if name in preload:
            return f"LD_PRELOAD={preload}"
    return None


def retain_freed_memory() -> bool:
    """Set glibc's mmap count and trim threshold (module docstring) once per process. True when they
    are set (now or by an earlier call); False on a C library other than glibc or when the
    environment already chose (:func:`user_choice`)."""
    global _applied
    if _applied is not None:
        return _applied
    libc = _glibc()
    if libc is None or user_choice() is not None:
        _applied = False
        return False
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1
    ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    _applied = ok
    return ok


__all__ = ["SETTINGS", "TRIM_THRESHOLD", "retain_freed_memory", "user_choice"]
