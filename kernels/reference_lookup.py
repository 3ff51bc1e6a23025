"""Plain-torch top-1 inner-product search (the CPU / no-Triton path of ``nn_lookup``, and the
tests' reference): the bank is scanned in chunks with a running maximum, so the B x M similarity
matrix never exists; ties keep the lowest index. ``check_lookup`` validates the inputs of either
implementation.
"""

from __future__ import annotations

import torch

from declip_fast.kernels import cpu_threads
from declip_fast.kernels.reference_common import compute_dtype, no_autocast

# Bank rows per chunk of the lookup: the B x chunk similarity block is the only O(B) x O(M)
# memory; 2**20 float32 scores = 4 MiB stays near the cache (faster than 16 MiB chunks at small
# D, no different at D = 512), and a chunk of at least 256
# rows keeps the products large enough for the BLAS.
LOOKUP_CHUNK_ELEMENTS = 1 << 20
MIN_LOOKUP_CHUNK = 256


def check_lookup(queries: torch.Tensor, bank: torch.Tensor, valid) -> int:
    """Validate a nearest-neighbour lookup's inputs; returns the number of bank rows to search."""
    if queries.dim() != 2 or bank.dim() != 2:
        raise ValueError(f"queries and bank must be 2-D, got {tuple(queries.shape)} and {tuple(bank.shape)}")
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries have dim {queries.shape[1]}, the bank {bank.shape[1]}")
    if queries.dtype != bank.dtype or not queries.is_floating_point():
        raise ValueError(f"queries ({queries.dtype}) and bank ({bank.dtype}) need one floating dtype")
    if queries.device != bank.device:
        raise ValueError(f"queries on {queries.device}, bank on {bank.device}")
    m = bank.shape[0] if valid is None else int(valid)
    if not 0 < m <= bank.shape[0]:
        raise ValueError(f"valid must be in [1, {bank.shape[0]}] (the bank's rows), got {valid}")
    return m


def nn_lookup(queries: torch.Tensor, bank: torch.Tensor, valid: int | None = None):
    """Top-1 inner-product search: for each query row, the best score over ``bank[:valid]`` and
    the lowest index that reaches it. With L2-normalized inputs the score is the cosine.

    Returns (scores float32 [B], indices int64 [B]). The B x M similarity matrix never exists:
    the bank is scanned in chunks (LOOKUP_CHUNK_ELEMENTS scores at a time) with a running
    maximum; a later chunk replaces the best only when strictly better, so ties keep the lowest
    index. Products in float32 (float64 for float64 inputs), autocast or not.
    """
    m = check_lookup(queries, bank, valid)
    with no_autocast(queries.device.type):
        return _nn_lookup(queries, bank, m)


def _nn_lookup(queries: torch.Tensor, bank: torch.Tensor, m: int):
    compute = compute_dtype(queries.dtype)
    q = queries.detach().to(compute)
    # Score chunks held at once across the CPU's worker threads stay within the budget.
    chunk = max(MIN_LOOKUP_CHUNK, LOOKUP_CHUNK_ELEMENTS // max(1, q.shape[0] * torch.get_num_threads()))

    def run(starts):
        best = torch.full((q.shape[0],), float("-inf"), dtype=compute, device=q.device)
        index = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)
        for start in starts:
            stop = min(m, start + chunk)
            scores = q @ bank[start:stop].detach().to(compute).T
            top, arg = scores.max(dim=1)  # the first maximum within the chunk
            del scores  # before the next chunk's product: one chunk of scores alive at a time
            better = top > best  # chunks in increasing order: ties keep the lowest index
            best = torch.where(better, top, best)
            index = torch.where(better, arg + start, index)
        return best, index

    workers = cpu_threads.workers_for(q.device, -(-m // chunk))
    chunk = cpu_threads.balanced_block(m, chunk, workers)
    starts = list(range(0, m, chunk))
    parts = cpu_threads.run_parts(run, cpu_threads.split(starts, workers))
    best, index = parts[0]
    for top, arg in parts[1:]:  # workers' chunks interleave: break ties by index explicitly
        better = (top > best) | ((top == best) & (arg < index))
        best = torch.where(better, top, best)
        index = torch.where(better, arg, index)
    return best.to(torch.float32), index
