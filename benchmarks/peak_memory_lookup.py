"""Peak extra host memory of one top-1 nearest-neighbour lookup, measured in a fresh process.

Run as ``python -m benchmarks.peak_memory_lookup --impl ours --b 4096 --m 65536 --d 512``;
prints JSON. The implementations (also used by benchmarks/bench_nn_lookup.py):

- ``ours``: declip_fast's lookup; on CPU the chunked reference (kernels/reference.py), on CUDA
  the Triton kernel (kernels/nn_lookup.py).
- ``torch``: ``(queries @ bank.T).max(dim=1)``, which materializes the B x M score matrix.
- ``faiss``: faiss-cpu's flat inner-product index searched with k = 1 (CPU, float32 only).

Allocations of 1 MiB or more are served by mmap and returned on free (see _mmap_blocks_from), so
the resident set follows what is live rather than what glibc chose to keep. A warm-up lookup runs
first with the real queries against a 4096-row bank (the same matrix-product shapes: lazily
loaded math libraries, thread pools and BLAS buffers are not charged). Then the inputs are
allocated and, for faiss, the index is built (a copy of the bank, not charged to the lookup);
the resident-set high-water mark is reset (``/proc/self/clear_refs``, Linux >= 4.0) and one
lookup runs. "Extra" is the peak resident set during it minus the resident set before it.
"""

from __future__ import annotations

import argparse
import ctypes
import json

from benchmarks.peak_memory import _status_kib

IMPLS = ("torch", "faiss", "ours")
WARM_BANK_ROWS = 4096  # the warm-up's bank: the real call's matrix-product shapes, a fraction of its memory


def make_lookup_inputs(b: int, m: int, d: int, dtype, device="cpu", seed: int = 0):
    """(queries [b, d], bank [m, d]): random rows, L2-normalized in float32, then cast to dtype."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    bank = torch.nn.functional.normalize(torch.randn(m, d, device=device, generator=gen), dim=-1).to(dtype)
    queries = torch.nn.functional.normalize(torch.randn(b, d, device=device, generator=gen), dim=-1).to(dtype)
    return queries, bank


def lookup_fn(impl: str, bank):
    """A function queries -> (scores [B], indices [B]) searching ``bank``. Whatever can be
    prepared from the bank alone (faiss's index) is done here, outside any timed region."""
    if impl == "ours":
        if bank.is_cuda:
            from declip_fast.kernels.nn_lookup import nn_lookup
        else:
            from declip_fast.kernels.reference import nn_lookup
        return lambda queries: nn_lookup(queries, bank)
    if impl == "torch":
        return lambda queries: (queries @ bank.T).max(dim=1)
    if impl == "faiss":
        import faiss
        import torch

        if bank.is_cuda or bank.dtype != torch.float32:
            raise ValueError("the faiss baseline is faiss-cpu: float32 CPU tensors only")
        index = faiss.IndexFlatIP(bank.shape[1])
        index.add(bank.contiguous().numpy())

        def search(queries):
            scores, indices = index.search(queries.contiguous().numpy(), 1)
            return torch.from_numpy(scores[:, 0]), torch.from_numpy(indices[:, 0])

        return search
    raise ValueError(f"unknown impl {impl!r}")


def _mmap_blocks_from(size: int) -> None:
    """Make glibc serve every allocation of ``size`` bytes or more by mmap and unmap it on free.
    By default glibc raises that threshold (up to 32 MiB) each time such a block is freed, and
    later blocks of that size stay resident after free: the B x chunk score buffers of a chunked
    lookup would then count several times over, depending on what ran before. No-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, size)  # M_MMAP_THRESHOLD; fixing it also stops glibc's dynamic raising


def measure(impl: str, b: int, m: int, d: int, dtype: str = "float32") -> dict:
    import torch

    _mmap_blocks_from(1 << 20)
    queries, warm_bank = make_lookup_inputs(b, min(m, WARM_BANK_ROWS), d, getattr(torch, dtype), seed=1)
    lookup_fn(impl, warm_bank)(queries)
    del queries, warm_bank
    queries, bank = make_lookup_inputs(b, m, d, getattr(torch, dtype))
    search = lookup_fn(impl, bank)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    search(queries)
    peak = _status_kib("VmHWM")
    return {"impl": impl, "b": b, "m": m, "d": d, "dtype": dtype, "extra_bytes": (peak - before) * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", required=True, choices=IMPLS)
    parser.add_argument("--b", type=int, required=True, help="queries")
    parser.add_argument("--m", type=int, required=True, help="bank rows")
    parser.add_argument("--d", type=int, required=True, help="feature dimension")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    print(json.dumps(measure(args.impl, args.b, args.m, args.d, args.dtype)))


if __name__ == "__main__":
    main()
