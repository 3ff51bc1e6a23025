"""Fused top-1 nearest-neighbour lookup in Triton: the B x M similarity matrix never exists.

Problem. Queries ``q`` [B, D] against a bank ``k`` [M, D] (DeCLIP's text-feature queue, rows
L2-normalized, so inner products are cosines): for each query the best score over the first
``valid`` bank rows and the lowest index that reaches it.

Tiling. The grid is (query blocks) x (bank splits). A program owns BM queries and a contiguous
range of bank blocks; for each BM x BN tile it runs a K-loop over D (``tl.dot``, fp32
accumulation), masks columns past ``valid`` to -inf, takes the tile's row maximum and its first
arg-maximum, and keeps a running (score, index) per query in registers. A tile replaces the
running best only when strictly better, and tiles are visited in increasing index order, so
ties keep the lowest index. Each split writes one (score, index) pair per query into a
[S, B] partial buffer; the host takes the best over splits, the first split on ties (splits are
ordered by index too). Extra memory: S x B pairs, never B x M.

Splits exist to fill the GPU when B is small: with B = 1024 and BM = 128 there are only 8 query
blocks, so the bank is cut into S ranges such that there are about four programs per SM.

Numerics. 16-bit inputs go to the tensor cores as they are (exact products, fp32 sums); fp32
inputs use ``tf32x3`` (three TF32 products, about fp32 accuracy). Scores are returned in fp32.
Offsets into the bank are int64, so M * D may pass 2^31.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from declip_fast.kernels.configs import LOOKUP as HOPPER  # noqa: F401 (tests and benchmarks read it here)
from declip_fast.kernels.configs import LOOKUP_INTERPRETER as INTERPRETER
from declip_fast.kernels.reference_lookup import check_lookup
from declip_fast.kernels.tuning import bucket, concurrent_programs, dot_precision, interpreting, launch_device, tuning

# Programs per SM the split count aims for, and the most splits (partials cost S * B * 12 bytes).
PROGRAMS_PER_SM = 4
MAX_SPLITS = 64


SMALLEST_BM = 64


CONFIGS, PRUNE = tuning(INTERPRETER if interpreting() else HOPPER, "q_ptr")
TUNE_KEY = ["B_BUCKET", "M_BUCKET", "D"]


@triton.autotune(configs=CONFIGS, key=TUNE_KEY, prune_configs_by=PRUNE)
@triton.jit
def _lookup_kernel(
    # pointers
    q_ptr,
    k_ptr,
    score_ptr,
    index_ptr,
    # shapes
    B,
    M,
    D,
    B_BUCKET,
    M_BUCKET,
    # strides
    stride_qb,
    stride_qd,
    stride_km,
    stride_kd,
    # constexprs
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_blocks = tl.cdiv(M, BN)
    per_split = tl.cdiv(n_blocks, tl.num_programs(1))
    rows = pid_q * BM + tl.arange(0, BM)
    rmask = rows < B
    q_base = q_ptr + tl.cast(pid_q * BM, tl.int64) * stride_qb
    best = tl.full((BM,), float("-inf"), tl.float32)
    best_i = tl.zeros((BM,), tl.int64)
    for cb in range(pid_s * per_split, tl.minimum((pid_s + 1) * per_split, n_blocks)):
        col0 = tl.cast(cb, tl.int64) * BN
        q_blk = tl.make_block_ptr(q_base, (B - pid_q * BM, D), (stride_qb, stride_qd), (0, 0), (BM, BK), (1, 0))
        k_blk = tl.make_block_ptr(
            k_ptr + col0 * stride_km, (M - col0, D), (stride_km, stride_kd), (0, 0), (BN, BK), (1, 0)
        )
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for _ in range(0, tl.cdiv(D, BK)):
            q = tl.load(q_blk, boundary_check=(0, 1), padding_option="zero")
            k = tl.load(k_blk, boundary_check=(0, 1), padding_option="zero")
            acc = tl.dot(q, tl.trans(k), acc, input_precision=PRECISION)
            q_blk = tl.advance(q_blk, (0, BK))
            k_blk = tl.advance(k_blk, (0, BK))
        cols = tl.arange(0, BN)
        acc = tl.where((col0 + cols < M)[None, :], acc, float("-inf"))
        # The maximum and the first column reaching it: the lowest index on ties.
        t_best, t_arg = tl.max(acc, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = t_best > best
        best = tl.where(better, t_best, best)
        best_i = tl.where(better, col0 + t_arg.to(tl.int64), best_i)
    out = tl.cast(pid_s, tl.int64) * B + rows
    tl.store(score_ptr + out, best, mask=rmask)
    tl.store(index_ptr + out, best_i, mask=rmask)


def _splits(b: int, m: int, device: torch.device) -> int:
    """Bank ranges per query block: about PROGRAMS_PER_SM programs per SM of the queries' GPU in
    all, never more ranges than the bank has blocks of the smallest BN."""
    if interpreting():
        return min(2, triton.cdiv(m, 64))  # two ranges: the cross-split merge is exercised
    q_blocks = triton.cdiv(b, SMALLEST_BM)
    want = triton.cdiv(concurrent_programs(device, PROGRAMS_PER_SM), q_blocks)
    return max(1, min(MAX_SPLITS, want, triton.cdiv(m, 128)))


def nn_lookup(queries: torch.Tensor, bank: torch.Tensor, valid: int | None = None):
    """Top-1 inner-product search of ``queries`` [B, D] over ``bank[:valid]`` [M, D].

    Returns (scores float32 [B], indices int64 [B]); ties resolve to the lowest index. Inputs
    are fp16, bf16 or fp32 on one CUDA device (or CPU tensors under the Triton interpreter);
    no gradient flows (a lookup is not differentiable).
    """
    m = check_lookup(queries, bank, valid)
    if queries.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton lookup takes fp16, bf16 or fp32, got {queries.dtype}")
    b, d = queries.shape
    splits = _splits(b, m, queries.device)
    scores = torch.empty((splits, b), dtype=torch.float32, device=queries.device)
    index = torch.empty((splits, b), dtype=torch.int64, device=queries.device)
    # Unit stride along D is compiled in (the builds the compile tests check); copy otherwise.
    q, k = (t.detach() if t.stride(-1) == 1 else t.detach().contiguous() for t in (queries, bank))
    grid = lambda meta: (triton.cdiv(b, meta["BM"]), splits)
    with launch_device(q.device):
        _lookup_kernel[grid](
            q,
            k,
            scores,
            index,
            b,
            m,
            d,
            bucket(b),
            bucket(m),
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            PRECISION=dot_precision(q.dtype),
        )
    if splits == 1:
        return scores[0], index[0]
    best, split = scores.max(dim=0)  # the first split on ties: the lowest index
    return best, index.gather(0, split[None]).squeeze(0)
