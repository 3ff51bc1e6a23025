"""CPU paths that keep their speed on a shared machine: coarse worker threads, not per-op threads.

PyTorch parallelises each CPU op over its intra-op (OpenMP) threads and waits at a barrier at the
end of the op. The tiled CPU paths (the MLM head's linear cross-entropy, the tiled contrastive
loss, the lookup) issue thousands of small ops per call, so when another process holds a core,
every op waits for a descheduled thread, and a call can take an order of magnitude longer than
with one thread (benchmarks/bench_shared_cpu.py; see benchmarks/results).

Here the blocks of one call are split statically over ``torch.get_num_threads()`` Python threads,
and each runs its ops single-threaded (intra-op threads set to 1 for the call, restored after;
torch releases the GIL inside ops). No thread ever waits for another until the join, so a busy
machine slows the call down by its share of the cores, never by a barrier per op; on an idle
machine the blocks still run in parallel. The split is static (block i to worker i mod W) and
partial results are combined in worker order, so a given thread count gives the same bits on
every run.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

# Set while a call holds the intra-op threads at 1: nested calls run serially.
_active = threading.local()


def workers_for(device: torch.device, blocks: int) -> int:
    """Worker threads for ``blocks`` independent blocks on ``device``: the intra-op thread count
    on the CPU (capped by the blocks), 1 elsewhere or inside another worker."""
    if device.type != "cpu" or getattr(_active, "inside", False):
        return 1
    return max(1, min(torch.get_num_threads(), blocks))


def balanced_block(n: int, block: int, workers: int) -> int:
    """A block size <= ``block`` that cuts ``n`` into a multiple of ``workers`` near-equal blocks,
    so that no worker waits for another at the join (720 rows in blocks of 256 give one worker
    two blocks and the other one; in blocks of 180, two each)."""
    if workers <= 1 or n <= workers:
        return min(block, n) if n else block
    blocks = workers * -(-n // (workers * block))
    return -(-n // blocks)


def split(items: list, workers: int) -> list[list]:
    """Item i goes to worker i mod ``workers``: a static, balanced split."""
    return [items[w::workers] for w in range(workers)]


def run_parts(fn, parts: list) -> list:
    """``[fn(part) for part in parts]``, one thread per part, each with single-threaded ops;
    results in part order. One part runs on the caller's thread, unchanged. Grad mode is
    thread-local in PyTorch: the workers take the caller's (autocast stays off in them, as in
    the callers, which compute in fp32 on purpose)."""
    if len(parts) == 1:
        return [fn(parts[0])]
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()

    def work(part):
        _active.inside = True
        try:
            with torch.set_grad_enabled(grad):
                return fn(part)
        finally:
            _active.inside = False

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=len(parts)) as pool:
            return list(pool.map(work, parts))
    finally:
        torch.set_num_threads(threads)
