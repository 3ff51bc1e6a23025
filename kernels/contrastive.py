"""Fused contrastive (InfoNCE / CLIP) loss in Triton: the N x N logits never leave the chip.

Rows ``a`` [M, D] (images), columns ``b`` [N, D] (texts), scale ``s``, logits ``X = s * a @ b.T``;
row i's positive is column ``offset + i``. The loss needs each row's log-sum-exp, each column's
(symmetric loss) and the positives. ARCHITECTURE.md ("The kernels") draws the whole design.

Forward: the tiles are cut into P_r x P_c rectangles of balanced sizes, one program each, planned
for whole waves (:func:`~declip_fast.kernels.tuning.plan_rectangles`). A program walks its
rectangle row block by row block; per tile a K-loop of ``tl.dot`` (fp32 accumulation), then in
base 2 (``exp2``) a running (max, sum) for the rows in registers and, for the columns, a (max,
sum) in slot ``pid_r`` of a ``[P_r, N]`` buffer this program alone owns (initialised at its first
row block; a barrier orders each write before the next read, as the threads reading a column need
not be those that wrote it); the positives come off the tile holding the diagonal. The host folds
the partials with one log-sum-exp each. No program reads what another wrote: the result does not
depend on program order.

Backward: two owner passes, no atomics. ``dX = w_r * P_row + w_c * P_col - w_pos * I`` is
recomputed tile by tile. The row pass gives a program BP rows and a BD-wide chunk of D; it walks
every column block, recomputes the logits, forms dX and accumulates ``dA += s * dX @ b[:, chunk]``
in registers; the column pass does the same for dB. Each gradient element is written once, by its
owner: bit-identical across runs and program orders. 10 N^2 D FLOPs per loss step when a chunk
covers D (forward 2, each pass 4). When the owners alone cannot fill the GPU (the gathered mode at
B = 128 rows a rank) the other axis is cut into S ranges whose fp32 partials ``[S, M, D]`` are
summed on the host in a fixed order; ``d s = sum(dX * X) / s`` is folded the same way. Memory
beyond inputs and gradients: the forward's (P_r + P_c) x N pairs, O(N) statistics, and the split
partials (at most SPLIT_WORKSPACE_BYTES).

Numerics: fp32 accumulation; 16-bit inputs go to ``tl.dot`` as they are (exact products), fp32
inputs through ``tf32x3`` (three TF32 products, about fp32 accuracy). dX is held relative to
``w_pos`` (``|dX| <= 1``) and multiplied by DX_SCALE = 2^14 before its 16-bit copy, so
probabilities down to 2^-28 stay normal in fp16 (unscaled they go subnormal below 2^-14, ~1/N at
N > 16K); the power of two is divided out in fp32. Masked logits are ``-inf``; offsets are int64,
so N * D may pass 2^31. Tiles, and why: ``kernels/configs.py``.

Distributed (``local_loss=True, gather_with_grad=True``): each rank passes its B rows and the N
gathered columns; the column statistics of its rows are all-gathered (N pairs) and folded, so
every logit of the global matrix is computed once in the job. The column pass covers every column
and its gradient reaches the owners through the gather's reduce-scatter; averaged over ranks, the
gradients of the features and of ``s`` equal the single-process global-batch loss's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from declip_fast.kernels.configs import (ANY_D_BWD, CONTRASTIVE_BWD as HOPPER_BWD,  # noqa: F401
                                         CONTRASTIVE_FWD as HOPPER_FWD, INTERPRETER_BWD,
                                         INTERPRETER_FWD)
from declip_fast.kernels.tuning import (bucket, concurrent_programs, dot_precision, interpreting,
                                        launch_device, plan_rectangles, plan_splits, tuning)

LN2 = 0.6931471805599453
DX_SCALE = 16384.0  # 2^14: |dX| <= 1, so the scaled 16-bit copy stays below fp16's 65504

# Forward rectangles are planned in tiles of PLAN_TILE rows/columns (the largest BM/BN of any
# config, so no rectangle is ever empty), at most MAX_PROGRAMS_PER_AXIS per axis: the partial
# statistics cost (P_r + P_c) * N * 8 bytes.
PLAN_TILE = 128
MAX_PROGRAMS_PER_AXIS = 32
# Backward: at most this many ranges of the reduction axis, and this much fp32 for their partials.
MAX_SPLITS = 32
SPLIT_WORKSPACE_BYTES = 64 << 20

def _narrow_chunk(meta: dict, args: dict) -> dict | None:
    """A D-chunk no wider than D (rounded up to 16): a chunk past D would multiply zeros. For D
    not a multiple of 16, only the ANY_D_BWD configs."""
    if args["D"] % 16 and meta not in ANY_D_BWD and not interpreting():
        return None
    meta["BD"] = min(meta["BD"], max(16, triton.next_power_of_2(args["D"])))
    return meta


FWD_CONFIGS, FWD_PRUNE = tuning(INTERPRETER_FWD if interpreting() else HOPPER_FWD, "a_ptr")
BWD_CONFIGS, BWD_PRUNE = tuning(INTERPRETER_BWD if interpreting() else HOPPER_BWD, "p_ptr",
                                _narrow_chunk)

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
def _logits_tile(a_ptr, b_ptr, row0, col0, M, N, D, stride_am, stride_ad, stride_bn, stride_bd,
                 scale2, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 PRECISION: tl.constexpr):
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
    a_ptr, b_ptr, scale_ptr, row_m_ptr, row_l_ptr, col_m_ptr, col_l_ptr, pos_ptr,
    # shapes
    M, N, D, offset, M_BUCKET, N_BUCKET,
    # strides
    stride_am, stride_ad, stride_bn, stride_bd,
    # constexprs
    SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
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
            x = _logits_tile(a_ptr, b_ptr, rb * BM, cb * BN, M, N, D, stride_am, stride_ad,
                             stride_bn, stride_bd, scale2, BM, BN, BK, PRECISION)
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


@triton.autotune(configs=BWD_CONFIGS, key=BWD_KEY, prune_configs_by=BWD_PRUNE)
@triton.jit
def _bwd_kernel(
    # pointers: the owned side p [P, D], the other side q [Q, D], their base-2 statistics
    p_ptr, q_ptr, scale_ptr, mult_ptr, own_m_ptr, own_l_ptr, oth_m_ptr, oth_l_ptr, out_ptr,
    ds_ptr,
    # shapes and weights (relative to the positives' weight)
    P, Q, D, shift, P_BUCKET, Q_BUCKET, w_own, w_other,
    # strides (out is [S, P, D] partials, or the [P, D] gradient itself when S == 1)
    stride_pp, stride_pd, stride_qq, stride_qd, stride_out_split,
    # constexprs
    OWN_STATS: tl.constexpr, OTHER_STATS: tl.constexpr, WANT_DS: tl.constexpr,
    PRECISION: tl.constexpr,
    BP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
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
        x = _logits_tile(p_ptr, q_ptr, pid_p * BP, qb * BQ, P, Q, D, stride_pp, stride_pd,
                         stride_qq, stride_qd, scale2, BP, BQ, BK, PRECISION)
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


# ----------------------------------------------------------------------------- host launchers


def _check_inputs(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, offset: int) -> None:
    if a.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton contrastive kernel takes fp16, bf16 or fp32, got {a.dtype}")
    if b.dtype != a.dtype or a.shape[1] != b.shape[1] or a.device != b.device:
        raise ValueError(f"rows {tuple(a.shape)} {a.dtype} and columns {tuple(b.shape)} {b.dtype} do not match")
    if scale.numel() != 1:
        raise ValueError(f"scale must be a scalar, got shape {tuple(scale.shape)}")
    if not 0 <= offset <= b.shape[0] - a.shape[0]:
        raise ValueError(
            f"offset {offset} puts the positives of {a.shape[0]} rows outside the {b.shape[0]} "
            f"columns: need 0 <= offset <= {b.shape[0] - a.shape[0]}"
        )


def _fold(m: torch.Tensor, l: torch.Tensor, dim: int = 0):
    """Fold (max, sum of exp2) partials along ``dim`` into (M, L): log2-sum-exp2 = M + L.

    M and L stay apart so that a loss much smaller than the logits (a confident model) keeps its
    precision: (M - positive) is exact when the positive is the max, and L is small.
    """
    big = m.amax(dim=dim, keepdim=True)
    big = torch.where(torch.isfinite(big), big, torch.zeros_like(big))
    total = (l * torch.exp2(m - big)).sum(dim=dim, keepdim=True)
    return big.squeeze(dim), torch.log2(total).squeeze(dim)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` with contiguous rows: a launch with unit stride along D compiles that stride in (the
    only builds the compile tests hold to no spills); other layouts are copied once."""
    return t if t.stride(-1) == 1 else t.contiguous()


def forward_stats(a, b, scale, offset: int, symmetric: bool):
    """Row and (if symmetric) column log-sum-exps as (M, L) pairs (see :func:`_fold`) and the
    positive logits; fp32, all in base 2 (multiply by ln 2 for natural-log values)."""
    _check_inputs(a, b, scale, offset)
    a, b = _unit_stride(a), _unit_stride(b)
    m, n, d = a.shape[0], b.shape[0], a.shape[1]
    slots = concurrent_programs(a.device)
    p_r, p_c = plan_rectangles(triton.cdiv(m, PLAN_TILE), triton.cdiv(n, PLAN_TILE), slots,
                               MAX_PROGRAMS_PER_AXIS)
    f32 = dict(dtype=torch.float32, device=a.device)
    # Every slot is written by its program (no rectangle is empty): no initialisation needed.
    row_m, row_l = torch.empty((2, p_c, m), **f32)
    col_m, col_l = torch.empty((2, p_r, n if symmetric else 1), **f32)
    pos = torch.empty(m, **f32)
    scale32 = scale.detach().reshape(1).to(torch.float32)
    with launch_device(a.device):
        _fwd_kernel[(p_r, p_c)](
            a, b, scale32, row_m, row_l, col_m, col_l, pos,
            m, n, d, offset, bucket(m), bucket(n),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            SYMMETRIC=symmetric, PRECISION=dot_precision(a.dtype),
        )
    row = _fold(row_m, row_l)
    col = _fold(col_m, col_l) if symmetric else None
    return row, col, pos


def _owner_pass(p, q, scale32, mult, own, other, shift, w_own, w_other, want_ds):
    """Gradient of ``p`` (in p's dtype) and, if ``want_ds``, the d scale partial sum."""
    p, q = _unit_stride(p), _unit_stride(q)
    n_p, n_q, d = p.shape[0], q.shape[0], p.shape[1]
    slots = concurrent_programs(p.device)
    # Owner blocks and splits are planned with the largest BP (every config's BP divides it).
    splits = plan_splits(triton.cdiv(n_p, PLAN_TILE), triton.cdiv(n_q, PLAN_TILE), slots, MAX_SPLITS)
    splits = max(1, min(splits, SPLIT_WORKSPACE_BYTES // (4 * n_p * d)))
    f32 = dict(dtype=torch.float32, device=p.device)
    out = torch.empty((n_p, d), dtype=p.dtype, device=p.device) if splits == 1 else \
        torch.empty((splits, n_p, d), **f32)
    # One d-scale slot per (range, owner block of the smallest BP); unused slots stay zero.
    ds = torch.zeros((splits * triton.cdiv(n_p, 16),), **f32) if want_ds else mult
    unused = (own or other)[0]  # a valid pointer for the statistics a pass does not read
    own_m, own_l = own if own is not None else (unused, unused)
    oth_m, oth_l = other if other is not None else (unused, unused)
    grid = lambda meta: (triton.cdiv(n_p, meta["BP"]), triton.cdiv(d, meta["BD"]), splits)
    with launch_device(p.device):
        _bwd_kernel[grid](
            p, q, scale32, mult, own_m, own_l, oth_m, oth_l, out, ds,
            n_p, n_q, d, shift, bucket(n_p), bucket(n_q), w_own, w_other,
            p.stride(0), p.stride(1), q.stride(0), q.stride(1), n_p * d if splits > 1 else 0,
            OWN_STATS=own is not None, OTHER_STATS=other is not None, WANT_DS=want_ds,
            PRECISION=dot_precision(p.dtype),
        )
    grad = out if splits == 1 else out.sum(dim=0).to(p.dtype)
    return grad, (ds.sum() if want_ds else None)


def backward_grads(a, b, scale, row, col, offset: int, weights, want_db: bool, grad_loss):
    """(dA, dB or None, d scale) of ``grad_loss`` times the loss whose logit gradient is
    dX = w_row * P_row + w_col * P_col - w_pos * I, from the base-2 (M, L) statistics of
    :func:`forward_stats` (``col`` None for the one-direction loss). dA and dB come back in the
    input dtype, d scale in fp32. Deterministic: no atomics, fixed-order host sums."""
    w_row, w_col, w_pos = weights
    mult = (grad_loss.detach().to(torch.float32) * w_pos).reshape(1)
    scale32 = scale.detach().reshape(1).to(torch.float32)
    da, ds = _owner_pass(a, b, scale32, mult, row, col, offset, w_row / w_pos, w_col / w_pos, True)
    db = None
    if want_db:
        db, _ = _owner_pass(b, a, scale32, mult, col, row, -offset, w_col / w_pos,
                            w_row / w_pos, False)
    return da, db, ds


# ----------------------------------------------------------------------------- autograd


def _fold_across_ranks(col, group):
    """Column (M, L) over every rank's rows: one all-gather of the N pairs, then a fold."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    mine = torch.stack(col)  # [2, N]
    out = mine.new_empty((world * 2, mine.shape[1]))
    dist.all_gather_into_tensor(out, mine, group=group)
    out = out.view(world, 2, -1)
    return _fold(out[:, 0], torch.exp2(out[:, 1]), dim=0)


def _loss_terms(stats, pos):
    """sum over entries of (log-sum-exp - positive), base 2, with (M - pos) taken first."""
    m, l = stats
    return (m - pos).sum() + l.sum()


class _FusedContrastive(torch.autograd.Function):
    """Loss over s * a @ b.T; ``mode`` is "symmetric", "rows" or "gathered" (see the plain
    functions below for what each computes). The loss is computed in fp32 and returned in
    ``out_dtype`` (None: the inputs' dtype)."""

    @staticmethod
    def forward(ctx, a, b, scale, offset, mode, group, out_dtype):
        with torch.autocast(a.device.type, enabled=False):  # the host folds stay fp32
            return _FusedContrastive._forward(ctx, a, b, scale, offset, mode, group, out_dtype)

    @staticmethod
    def _forward(ctx, a, b, scale, offset, mode, group, out_dtype):
        symmetric = mode != "rows"
        row, col, pos = forward_stats(a, b, scale, offset, symmetric)
        m = a.shape[0]
        if mode == "rows":
            loss = _loss_terms(row, pos) * (LN2 / m)
        else:
            if mode == "gathered":
                col = _fold_across_ranks(col, group)
            own_cols = tuple(t[offset : offset + m] for t in col)
            loss = (_loss_terms(row, pos) + _loss_terms(own_cols, pos)) * (LN2 / (2 * m))
        ctx.save_for_backward(a, b, scale, *row, *(col if symmetric else (None, None)))
        ctx.offset = offset
        ctx.weights = (0.5 / m, 0.5 / m, 1.0 / m) if symmetric else (1.0 / m, 0.0, 1.0 / m)
        return loss.to(a.dtype if out_dtype is None else out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        a, b, scale, row_m, row_l, col_m, col_l = ctx.saved_tensors
        want_db = ctx.needs_input_grad[1]
        col = (col_m, col_l) if col_m is not None else None
        with torch.autocast(a.device.type, enabled=False):
            da, db, ds = backward_grads(a, b, scale, (row_m, row_l), col, ctx.offset, ctx.weights,
                                        want_db, grad_loss)
        dscale = ds.to(scale.dtype).reshape(scale.shape) if ctx.needs_input_grad[2] else None
        return da, db, dscale, None, None, None, None


# ----------------------------------------------------------------------------- functions


def clip_loss(image_features, text_features, logit_scale, *, out_dtype=None):
    """Symmetric CLIP loss, labels on the diagonal: both directions from one pass of tiles."""
    return _FusedContrastive.apply(image_features, text_features, logit_scale, 0, "symmetric",
                                   None, out_dtype)


def clip_loss_rows(queries, keys, logit_scale, offset: int, *, out_dtype=None):
    """One-direction InfoNCE: row i of ``queries`` matches row ``offset + i`` of ``keys``
    (``0 <= offset <= len(keys) - len(queries)``)."""
    return _FusedContrastive.apply(queries, keys, logit_scale, offset, "rows", None, out_dtype)


def clip_loss_gathered(local_image, all_text, logit_scale, offset: int, group=None, *,
                       out_dtype=None):
    """This rank's share of the global-batch CLIP loss: its rows, every rank's columns.

    ``all_text`` must be gathered with gradient (its backward sums the column gradients into
    their owners); ``offset`` is rank * B. The value is OpenCLIP's local loss of this rank; the
    gradients, averaged over ranks, are those of the single-process loss over the global batch.
    Each logit of the global matrix is computed once in the whole job.
    """
    return _FusedContrastive.apply(local_image, all_text, logit_scale, offset, "gathered", group,
                                   out_dtype)
