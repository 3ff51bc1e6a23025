"""The Triton kernels of the fused contrastive loss (``@triton.jit``): the forward tile walk and
the two backward owner passes. ``contrastive`` launches them (checks, grid planning, host folds),
wraps them in the autograd Function and the plain functions, and re-exports every name here.

Forward: the tiles are cut into P_r x P_c rectangles of balanced sizes, one program each (planned
by the launcher). A program walks its rectangle row block by row block; per tile a K-loop of
``tl.dot`` (fp32 accumulation), then in base 2 (``exp2``) a running (max, sum) for the rows in
registers and, for the columns, a (max, sum) in slot ``pid_r`` of a ``[P_r, N]`` buffer this
program alone owns (initialised at its first row block; a barrier orders each write before the
next read, as the threads reading a column need not be those that wrote it); the positives come
off the tile holding the diagonal. No program reads what another wrote: the result does not depend
on program order.

Backward: two owner passes, no atomics. ``dX = w_r * P_row + w_c * P_col - w_pos * I`` is
recomputed tile by tile. The row pass gives a program BP rows and a BD-wide chunk of D; it walks
every column block (or, split, one range of them), recomputes the logits, forms dX and accumulates
``dA += s * dX @ b[:, chunk]`` in registers; the column pass does the same for dB. Each gradient
element (or split partial) is written once, by its owner: bit-identical across runs and program
orders.

Numerics: fp32 accumulation; 16-bit inputs go to ``tl.dot`` as they are (exact products), fp32
inputs through ``tf32x3`` (three TF32 products, about fp32 accuracy). dX is held relative to
``w_pos`` (``|dX| <= 1``) and multiplied by DX_SCALE = 2^14 before its 16-bit copy, so
probabilities down to 2^-28 stay normal in fp16 (unscaled they go subnormal below 2^-14, ~1/N at
N > 16K); the power of two is divided out in fp32. Masked logits are ``-inf``; offsets are int64,
so N * D may pass 2^31. Tiles, and why: ``kernels/configs.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from declip_fast.kernels.configs import (
    ANY_D_BWD,
    CONTRASTIVE_BWD as HOPPER_BWD,
    CONTRASTIVE_FWD as HOPPER_FWD,
    INTERPRETER_BWD,
    INTERPRETER_FWD,
)
from declip_fast.kernels.tuning import interpreting, tuning

DX_SCALE = 16384.0  # 2^14: |dX| <= 1, so the scaled 16-bit copy stays below fp16's 65504


def _narrow_chunk(meta: dict, args: dict) -> dict | None:
    """A D-chunk no wider than D (rounded up to 16): a chunk past D would multiply zeros. For D
    not a multiple of 16, only the ANY_D_BWD configs."""
    if args["D"] % 16 and meta not in ANY_D_BWD and not interpreting():
        return None
    meta["BD"] = min(meta["BD"], max(16, triton.next_power_of_2(args["D"])))
    return meta


FWD_CONFIGS, FWD_PRUNE = tuning(INTERPRETER_FWD if interpreting() else HOPPER_FWD, "a_ptr")
BWD_CONFIGS, BWD_PRUNE = tuning(INTERPRETER_BWD if interpreting() else HOPPER_BWD, "p_ptr", _narrow_chunk)

# The autotune key: the shapes that change the best tiling, and the dtype (via the pointer types).
FWD_KEY = ["M_BUCKET", "N_BUCKET", "D", "SYMMETRIC"]
BWD_KEY = ["P_BUCKET", "Q_BUCKET", "D", "OWN_STATS", "OTHER_STATS"]


@triton.jit
def _block(ptr, row0, rows, D, stride_r, stride_d, BR: tl.constexpr, BC: tl.constexpr):
    """Block pointer to rows [row0, row0 + BR) x columns [0, BC). The row offset is applied to
    the base pointer in int64, so row0 * stride may pass 2^31; offsets inside stay small."""
    base = ptr + tl.cast(row0, tl.int64) * stride_r
    return tl.make_block_ptr(base, (rows - row0, D), (stride_r, stride_d), (0, 0), (BR, BC), (1, 0))


@triton.jit
def _logits_tile(
    a_ptr,
    b_ptr,
    row0,
    col0,
    M,
    N,
    D,
    stride_am,
    stride_ad,
    stride_bn,
    stride_bd,
    scale2,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One BM x BN tile of s*log2(e) * a @ b.T in fp32; out-of-range entries are -inf."""
    a_blk = _block(a_ptr, row0, M, D, stride_am, stride_ad, BM, BK)
    b_blk = _block(b_ptr, col0, N, D, stride_bn, stride_bd, BN, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, tl.cdiv(D, BK)):
        a = tl.load(a_blk, boundary_check=(0, 1), padding_option="zero")
        b = tl.load(b_blk, boundary_check=(0, 1), padding_option="zero")
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        a_blk = tl.advance(a_blk, (0, BK))
        b_blk = tl.advance(b_blk, (0, BK))
    rows = row0 + tl.arange(0, BM)
    cols = col0 + tl.arange(0, BN)
    valid = (rows < M)[:, None] & (cols < N)[None, :]
    return tl.where(valid, acc * scale2, float("-inf"))


@triton.jit
def _merge(m1, l1, m2, l2):
    """Merge two (max, sum of exp2) pairs; the max of -inf and -inf stays -inf with sum 0."""
    m = tl.maximum(m1, m2)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return m, l1 * tl.exp2(m1 - m_safe) + l2 * tl.exp2(m2 - m_safe)


@triton.jit
def _span(pid, programs, blocks):
    """Blocks [start, end) of program ``pid`` when ``blocks`` are shared by ``programs`` in
    contiguous ranges whose sizes differ by at most one (none empty when programs <= blocks)."""
    return pid * blocks // programs, (pid + 1) * blocks // programs


@triton.autotune(configs=FWD_CONFIGS, key=FWD_KEY, prune_configs_by=FWD_PRUNE)
@triton.jit
def _fwd_kernel(
    # pointers
    a_ptr,
    b_ptr,
    scale_ptr,
    row_m_ptr,
    row_l_ptr,
    col_m_ptr,
    col_l_ptr,
    pos_ptr,
    # shapes
    M,
    N,
    D,
    offset,
    M_BUCKET,
    N_BUCKET,
    # strides
    stride_am,
    stride_ad,
    stride_bn,
    stride_bd,
    # constexprs
    SYMMETRIC: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rb_start, rb_end = _span(pid_r, tl.num_programs(0), tl.cdiv(M, BM))
    cb_start, cb_end = _span(pid_c, tl.num_programs(1), tl.cdiv(N, BN))
    scale2 = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
    for rb in range(rb_start, rb_end):
        rows = rb * BM + tl.arange(0, BM)
        rmask = rows < M
        rows64 = rows.to(tl.int64)
        m_i = tl.full((BM,), float("-inf"), tl.float32)
        l_i = tl.zeros((BM,), tl.float32)
        for cb in range(cb_start, cb_end):
            cols = cb * BN + tl.arange(0, BN)
            cmask = cols < N
            x = _logits_tile(
                a_ptr,
                b_ptr,
                rb * BM,
                cb * BN,
                M,
                N,
                D,
                stride_am,
                stride_ad,
                stride_bn,
                stride_bd,
                scale2,
                BM,
                BN,
                BK,
                PRECISION,
            )
            t_m = tl.max(x, axis=1)
            t_m_safe = tl.where(t_m == float("-inf"), 0.0, t_m)
            m_i, l_i = _merge(m_i, l_i, t_m, tl.sum(tl.exp2(x - t_m_safe[:, None]), axis=1))
            if SYMMETRIC:
                c_m = tl.max(x, axis=0)
                c_m_safe = tl.where(c_m == float("-inf"), 0.0, c_m)
                c_l = tl.sum(tl.exp2(x - c_m_safe[None, :]), axis=0)
                slot = pid_r.to(tl.int64) * N + cols
                # The first row block starts the slot: no host initialisation to rely on.
                seen = cmask & (rb > rb_start)
                old_m = tl.load(col_m_ptr + slot, mask=seen, other=float("-inf"))
                old_l = tl.load(col_l_ptr + slot, mask=seen, other=0.0)
                new_m, new_l = _merge(old_m, old_l, c_m, c_l)
                tl.store(col_m_ptr + slot, new_m, mask=cmask)
                tl.store(col_l_ptr + slot, new_l, mask=cmask)
                # Threads of this program read these columns back at the next row block, not
                # necessarily the threads that wrote them.
                tl.debug_barrier()
            # The positives of this row block sit in this tile for rows whose label column is here.
            lo = rb * BM + offset
            if (lo < cb * BN + BN) & (lo + BM > cb * BN):
                is_pos = cols[None, :] == rows[:, None] + offset
                pos = tl.sum(tl.where(is_pos, x, 0.0), axis=1)
                has_pos = rmask & (rows + offset >= cb * BN) & (rows + offset < cb * BN + BN)
                tl.store(pos_ptr + rows64, pos, mask=has_pos)
        slot = pid_c.to(tl.int64) * M + rows64
        tl.store(row_m_ptr + slot, m_i, mask=rmask)
        tl.store(row_l_ptr + slot, l_i, mask=rmask)


# reset_to_zero: the d-scale slots a program writes depend on BP (one per owner block), so a
# config tried while autotuning can leave values in slots the chosen config does not write;
# the autotuner zeroes them after the trials, before the real launch.
@triton.autotune(configs=BWD_CONFIGS, key=BWD_KEY, prune_configs_by=BWD_PRUNE, reset_to_zero=["ds_ptr"])
@triton.jit
def _bwd_kernel(
    # pointers: the owned side p [P, D], the other side q [Q, D], their base-2 statistics
    p_ptr,
    q_ptr,
    scale_ptr,
    mult_ptr,
    own_m_ptr,
    own_l_ptr,
    oth_m_ptr,
    oth_l_ptr,
    out_ptr,
    ds_ptr,
    # shapes and weights (relative to the positives' weight)
    P,
    Q,
    D,
    shift,
    P_BUCKET,
    Q_BUCKET,
    w_own,
    w_other,
    # strides (out is [S, P, D] partials, or the [P, D] gradient itself when S == 1)
    stride_pp,
    stride_pd,
    stride_qq,
    stride_qd,
    stride_out_split,
    # constexprs
    OWN_STATS: tl.constexpr,
    OTHER_STATS: tl.constexpr,
    WANT_DS: tl.constexpr,
    PRECISION: tl.constexpr,
    BP: tl.constexpr,
    BQ: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
):
    """Gradient of the owned side. Tile entries are logits X[i, j] seen from the owner: own
    index ``o`` and other index ``t``; the positive pairs are those with ``t - o == shift``
    (offset for the row pass, -offset for the column pass)."""
    pid_p = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    qb_start, qb_end = _span(pid_s, tl.num_programs(2), tl.cdiv(Q, BQ))
    scale = tl.load(scale_ptr).to(tl.float32)
    scale2 = scale * 1.4426950408889634
    mult = tl.load(mult_ptr).to(tl.float32)
    own = pid_p * BP + tl.arange(0, BP)
    omask = own < P
    own64 = own.to(tl.int64)
    if OWN_STATS:
        # Base-2 log-sum-exp as max + log2(sum): subtracted one after the other.
        o_m = tl.load(own_m_ptr + own64, mask=omask, other=0.0)
        o_l = tl.load(own_l_ptr + own64, mask=omask, other=0.0)
    dd = pid_d * BD + tl.arange(0, BD)
    acc = tl.zeros((BP, BD), tl.float32)
    ds = tl.zeros((BP,), tl.float32)
    for qb in range(qb_start, qb_end):
        oth = qb * BQ + tl.arange(0, BQ)
        tmask = oth < Q
        x = _logits_tile(
            p_ptr,
            q_ptr,
            pid_p * BP,
            qb * BQ,
            P,
            Q,
            D,
            stride_pp,
            stride_pd,
            stride_qq,
            stride_qd,
            scale2,
            BP,
            BQ,
            BK,
            PRECISION,
        )
        dx = tl.zeros((BP, BQ), tl.float32)
        if OWN_STATS:
            dx += w_own * tl.exp2((x - o_m[:, None]) - o_l[:, None])
        if OTHER_STATS:
            oth64 = oth.to(tl.int64)
            t_m = tl.load(oth_m_ptr + oth64, mask=tmask, other=0.0)
            t_l = tl.load(oth_l_ptr + oth64, mask=tmask, other=0.0)
            dx += w_other * tl.exp2((x - t_m[None, :]) - t_l[None, :])
        dx = tl.where(oth[None, :] - own[:, None] == shift, dx - 1.0, dx)
        valid = omask[:, None] & tmask[None, :]
        dx = tl.where(valid, dx, 0.0)
        if WANT_DS:
            ds += tl.sum(tl.where(valid, dx * x, 0.0), axis=1)
        q_blk = tl.advance(_block(q_ptr, qb * BQ, Q, D, stride_qq, stride_qd, BQ, BD), (0, pid_d * BD))
        q = tl.load(q_blk, boundary_check=(0, 1), padding_option="zero")
        # DX_SCALE (2^14), literal here: a jit function reads no module globals.
        acc = tl.dot((dx * 16384.0).to(p_ptr.dtype.element_ty), q, acc, input_precision=PRECISION)
    out = out_ptr + pid_s.to(tl.int64) * stride_out_split + own64[:, None] * D + dd[None, :]
    acc = acc * (scale * mult / 16384.0)
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=omask[:, None] & (dd < D)[None, :])
    if WANT_DS:
        # d loss / d s = sum(dX * x) / (s * log2 e); one partial per (owner block, range).
        slot = pid_s * tl.num_programs(0) + pid_p
        tl.store(ds_ptr + slot, tl.sum(ds, axis=0) * (mult / scale2), mask=pid_d == 0)
