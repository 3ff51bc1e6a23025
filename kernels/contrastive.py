"""Fused contrastive (InfoNCE / CLIP) loss in Triton: the N x N logits never leave the chip.

Problem. Rows ``a`` [M, D] (images), columns ``b`` [N, D] (texts), scale ``s``; logits
``X = s * a @ b.T``. Row i's positive is column ``offset + i``. We need per row
``lse_r(i) = logsumexp_j X[i, j]``, per column (symmetric loss) ``lse_c(j) = logsumexp_i X[i, j]``,
and the positives ``X[i, offset + i]``.

Tiling (forward). The (row block x column block) tiles are split into a P_r x P_c grid of
rectangles, one program each. A program walks its rectangle row block by row block; for each tile
it runs a K-loop over D (``tl.dot``, fp32 accumulation), scales by ``s * log2(e)`` (everything on
chip is in base 2, so exponentials are ``exp2``) and updates:

- the row statistics of the current row block, a running (max, sum of exp2) pair in registers;
- the column statistics of the tile's columns, a (max, sum) pair that this program alone owns in
  a partial buffer ``[P_r, N]`` (read, merged, written back: no atomics, no locks);
- the positive logits, read off the one tile that holds each row's diagonal entry.

Merging two pairs uses ``sum = s1 * exp2(m1 - m) + s2 * exp2(m2 - m)`` with ``m = max(m1, m2)``,
so no exponential ever overflows. At the end each row has P_c partial pairs and each column P_r;
the host folds them with one ``logsumexp`` over a [P, N] tensor: O(P * N) extra memory, never
O(N^2), and one logits product in total for both directions.

Backward. The same rectangles; each tile is recomputed once (2MND FLOPs), turned into
``dX = w_r * exp2(x - lse_r) + w_c * exp2(x - lse_c)`` minus ``w_pos`` on the positives (held
relative to ``w_pos``, so the 16-bit copy never underflows at large N), cast to the input dtype
for the tensor cores, and multiplied out in D-chunks: ``dA += s * dX @ b`` and
``dB += s * dX.T @ a`` (4MND FLOPs), accumulated with fp32 atomics. ``d s = sum(dX * X / s)`` is a
per-program register sum. Total 8MND for forward + backward, the budget of SPEC section 5.
fp32 inputs accumulate straight into their gradients. 16-bit inputs accumulate into fp32 windows
of at most WORKSPACE_BYTES (rows x columns of the problem, one launch per window pair; see
:func:`backward_grads`), so the memory beyond inputs and gradients stays a few tens of MiB at any N.

Numerics. fp32 accumulation everywhere; bf16/fp16 inputs are loaded as they are for ``tl.dot``
(exact products, fp32 sums); fp32 inputs use ``tf32x3`` dots (three TF32 tensor-core products, about
fp32 accuracy, unlike plain TF32).
Masked (out-of-range) logits are ``-inf`` and contribute exp2(-inf) = 0. At ``s = 100`` logits
lie in [-100, 100] for unit vectors; the running-max form keeps every exp2 argument <= 0. Offsets
into ``a``, ``b`` and the gradients are computed in int64, so N * D may exceed 2^31.

Distributed (``local_loss=True, gather_with_grad=True``): each rank passes its B local rows and the
N gathered columns. Row statistics are local; the column statistics of local rows are all-gathered
(one collective of N pairs) and folded, so every logit of the global N x N matrix is computed once
in the whole job. The column-side gradient then covers every column and travels back to the
owners through the gather's reduce-scatter; after DDP/FSDP averaging the gradients of the
features and of ``s`` equal the single-process global-batch loss.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from declip_fast.kernels.tuning import bucket, dot_precision, interpreting, tuning

LN2 = 0.6931471805599453

# Rectangles per axis: P_r * P_c programs; partial statistics cost (P_r + P_c) * N * 8 bytes.
MAX_PROGRAMS_PER_AXIS = 16

# Backward fp32 accumulators for 16-bit inputs (plan_windows): at most this many bytes, so that
# with the forward's saved statistics the loss needs < 64 MiB beyond inputs and gradients.
WORKSPACE_BYTES = 48 << 20
MIN_WINDOW = 64
MAX_ROUNDINGS = 16




# Hopper (sm_90) tilings, per input class; every one compiles for sm_90 without spills
# (tests/kernels/test_contrastive.py checks). 16-bit inputs run on wgmma; fp32 inputs use three
# TF32 products per dot and need small tiles to stay in registers. The interpreter gets one config
# with big tiles: it costs ~3 ms per program per loop iteration, whatever the tile.
HOPPER_FWD = {
    "16-bit": [
        (dict(BM=128, BN=64, BK=64), dict(num_warps=8, num_stages=3)),
        (dict(BM=64, BN=128, BK=32), dict(num_warps=4, num_stages=3)),
        (dict(BM=64, BN=64, BK=32), dict(num_warps=4, num_stages=3)),
    ],
    "fp32": [(dict(BM=64, BN=64, BK=16), dict(num_warps=4, num_stages=3))],
}
HOPPER_BWD = {
    "16-bit": [
        (dict(BM=128, BN=64, BK=64, BD=32), dict(num_warps=8, num_stages=2)),
        (dict(BM=64, BN=128, BK=32, BD=32), dict(num_warps=8, num_stages=2)),
        (dict(BM=64, BN=64, BK=32, BD=32), dict(num_warps=4, num_stages=2)),
    ],
    "fp32": [(dict(BM=32, BN=32, BK=32, BD=32), dict(num_warps=4, num_stages=2))],
}
INTERPRETER_FWD = {"any": [(dict(BM=64, BN=64, BK=128), dict(num_warps=4, num_stages=1))]}
INTERPRETER_BWD = {"any": [(dict(BM=64, BN=64, BK=128, BD=128), dict(num_warps=4, num_stages=1))]}






FWD_CONFIGS, FWD_PRUNE = tuning(INTERPRETER_FWD if interpreting() else HOPPER_FWD, "a_ptr")
BWD_CONFIGS, BWD_PRUNE = tuning(INTERPRETER_BWD if interpreting() else HOPPER_BWD, "a_ptr")

# The autotune key: the shapes that change the best tiling, and the dtype (via the pointer types).
TUNE_KEY = ["M_BUCKET", "N_BUCKET", "D", "SYMMETRIC"]


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


@triton.autotune(configs=FWD_CONFIGS, key=TUNE_KEY, prune_configs_by=FWD_PRUNE,
                 restore_value=["row_m_ptr", "row_l_ptr", "col_m_ptr", "col_l_ptr"])
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
    rb_per = tl.cdiv(tl.cdiv(M, BM), tl.num_programs(0))
    cb_per = tl.cdiv(tl.cdiv(N, BN), tl.num_programs(1))
    scale2 = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
    rb_end = tl.minimum((pid_r + 1) * rb_per, tl.cdiv(M, BM))
    cb_end = tl.minimum((pid_c + 1) * cb_per, tl.cdiv(N, BN))
    for rb in range(pid_r * rb_per, rb_end):
        rows = rb * BM + tl.arange(0, BM)
        rmask = rows < M
        rows64 = rows.to(tl.int64)
        m_i = tl.full((BM,), float("-inf"), tl.float32)
        l_i = tl.zeros((BM,), tl.float32)
        for cb in range(pid_c * cb_per, cb_end):
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
                old_m = tl.load(col_m_ptr + slot, mask=cmask, other=float("-inf"))
                old_l = tl.load(col_l_ptr + slot, mask=cmask, other=0.0)
                new_m, new_l = _merge(old_m, old_l, c_m, c_l)
                tl.store(col_m_ptr + slot, new_m, mask=cmask)
                tl.store(col_l_ptr + slot, new_l, mask=cmask)
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


@triton.autotune(configs=BWD_CONFIGS, key=TUNE_KEY, prune_configs_by=BWD_PRUNE,
                 restore_value=["da_ptr", "db_ptr"])
@triton.jit
def _bwd_kernel(
    # pointers
    a_ptr, b_ptr, scale_ptr, mult_ptr, row_m_ptr, row_l_ptr, col_m_ptr, col_l_ptr, da_ptr, db_ptr,
    ds_ptr,
    # shapes and weights
    M, N, D, offset, M_BUCKET, N_BUCKET, w_row, w_col,
    # strides (the fp32 gradient accumulators are contiguous [M, D] and [N, D])
    stride_am, stride_ad, stride_bn, stride_bd,
    # constexprs
    SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr, WANT_DB: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rb_per = tl.cdiv(tl.cdiv(M, BM), tl.num_programs(0))
    cb_per = tl.cdiv(tl.cdiv(N, BN), tl.num_programs(1))
    scale = tl.load(scale_ptr).to(tl.float32)
    scale2 = scale * 1.4426950408889634
    # dX is built relative to the positives' weight (a positive contributes -1, probabilities at
    # most w_row + w_col), so its 16-bit copy for the tensor cores stays in the normal range
    # whatever the batch size; ``mult`` (w_pos times the upstream gradient) is applied in fp32.
    mult = tl.load(mult_ptr).to(tl.float32)
    out_scale = scale * mult
    rb_end = tl.minimum((pid_r + 1) * rb_per, tl.cdiv(M, BM))
    cb_end = tl.minimum((pid_c + 1) * cb_per, tl.cdiv(N, BN))
    rd = tl.arange(0, BD)
    ds = tl.zeros((BM,), tl.float32)
    for rb in range(pid_r * rb_per, rb_end):
        rows = rb * BM + tl.arange(0, BM)
        rmask = rows < M
        rows64 = rows.to(tl.int64)
        # Base-2 log-sum-exp as max + log2(sum): subtract them one after the other.
        r_m = tl.load(row_m_ptr + rows64, mask=rmask, other=0.0)
        r_l = tl.load(row_l_ptr + rows64, mask=rmask, other=0.0)
        for cb in range(pid_c * cb_per, cb_end):
            cols = cb * BN + tl.arange(0, BN)
            cmask = cols < N
            cols64 = cols.to(tl.int64)
            x = _logits_tile(a_ptr, b_ptr, rb * BM, cb * BN, M, N, D, stride_am, stride_ad,
                             stride_bn, stride_bd, scale2, BM, BN, BK, PRECISION)
            dx = w_row * tl.exp2((x - r_m[:, None]) - r_l[:, None])
            if SYMMETRIC:
                c_m = tl.load(col_m_ptr + cols64, mask=cmask, other=0.0)
                c_l = tl.load(col_l_ptr + cols64, mask=cmask, other=0.0)
                dx += w_col * tl.exp2((x - c_m[None, :]) - c_l[None, :])
            dx = tl.where(cols[None, :] == rows[:, None] + offset, dx - 1.0, dx)
            valid = rmask[:, None] & cmask[None, :]
            dx = tl.where(valid, dx, 0.0)
            # d loss / d s = sum(dX * x) / (s * log2 e); the division happens once, at the end.
            ds += tl.sum(tl.where(valid, dx * x, 0.0), axis=1)
            dx_in = dx.to(a_ptr.dtype.element_ty)
            b_blk = _block(b_ptr, cb * BN, N, D, stride_bn, stride_bd, BN, BD)
            a_blk = _block(a_ptr, rb * BM, M, D, stride_am, stride_ad, BM, BD)
            for d0 in range(0, D, BD):
                dd = d0 + rd
                dmask = dd < D
                b = tl.load(b_blk, boundary_check=(0, 1), padding_option="zero")
                da = tl.dot(dx_in, b, input_precision=PRECISION) * out_scale
                tl.atomic_add(da_ptr + rows64[:, None] * D + dd[None, :], da,
                              mask=rmask[:, None] & dmask[None, :], sem="relaxed")
                if WANT_DB:
                    a = tl.load(a_blk, boundary_check=(0, 1), padding_option="zero")
                    db = tl.dot(tl.trans(dx_in), a, input_precision=PRECISION) * out_scale
                    tl.atomic_add(db_ptr + cols64[:, None] * D + dd[None, :], db,
                                  mask=cmask[:, None] & dmask[None, :], sem="relaxed")
                b_blk = tl.advance(b_blk, (0, BD))
                a_blk = tl.advance(a_blk, (0, BD))
    tl.store(ds_ptr + pid_r * tl.num_programs(1) + pid_c, tl.sum(ds, axis=0) * (mult / scale2))


# ----------------------------------------------------------------------------- host launchers


def _grid_dims(m: int, n: int) -> tuple[int, int]:
    # Rectangles per axis, from the smallest block any config uses (64), so every config fills
    # the grid; programs whose rectangle is empty simply exit.
    return min(MAX_PROGRAMS_PER_AXIS, triton.cdiv(m, 64)), min(MAX_PROGRAMS_PER_AXIS, triton.cdiv(n, 64))




def _check_inputs(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> None:
    if a.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton contrastive kernel takes fp16, bf16 or fp32, got {a.dtype}")
    if b.dtype != a.dtype or a.shape[1] != b.shape[1] or a.device != b.device:
        raise ValueError(f"rows {tuple(a.shape)} {a.dtype} and columns {tuple(b.shape)} {b.dtype} do not match")
    if scale.numel() != 1:
        raise ValueError(f"scale must be a scalar, got shape {tuple(scale.shape)}")


def _fold(m: torch.Tensor, l: torch.Tensor, dim: int = 0):
    """Fold (max, sum of exp2) partials along ``dim`` into (M, L): log2-sum-exp2 = M + L.

    M and L stay apart so that a loss much smaller than the logits (a confident model) keeps its
    precision: (M - positive) is exact when the positive is the max, and L is small.
    """
    big = m.amax(dim=dim, keepdim=True)
    big = torch.where(torch.isfinite(big), big, torch.zeros_like(big))
    total = (l * torch.exp2(m - big)).sum(dim=dim, keepdim=True)
    return big.squeeze(dim), torch.log2(total).squeeze(dim)


def forward_stats(a, b, scale, offset: int, symmetric: bool):
    """Row and (if symmetric) column log-sum-exps as (M, L) pairs (see :func:`_fold`) and the
    positive logits; fp32, all in base 2 (multiply by ln 2 for natural-log values)."""
    _check_inputs(a, b, scale)
    m, n, d = a.shape[0], b.shape[0], a.shape[1]
    p_r, p_c = _grid_dims(m, n)
    f32 = dict(dtype=torch.float32, device=a.device)
    row_m = torch.full((p_c, m), float("-inf"), **f32)
    row_l = torch.zeros((p_c, m), **f32)
    col_m = torch.full((p_r, n if symmetric else 1), float("-inf"), **f32)
    col_l = torch.zeros((p_r, n if symmetric else 1), **f32)
    pos = torch.empty(m, **f32)
    scale32 = scale.detach().reshape(1).to(torch.float32)
    _fwd_kernel[(p_r, p_c)](
        a, b, scale32, row_m, row_l, col_m, col_l, pos,
        m, n, d, offset, bucket(m), bucket(n),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        SYMMETRIC=symmetric, PRECISION=dot_precision(a.dtype),
    )
    row = _fold(row_m, row_l)
    col = _fold(col_m, col_l) if symmetric else None
    return row, col, pos


def plan_windows(m: int, n: int, d: int, dtype: torch.dtype, want_db: bool,
                 workspace_bytes: int | None = None) -> tuple[int, int]:
    """(rows, columns) per backward window so that the fp32 accumulators fit ``workspace_bytes``.

    fp32 inputs accumulate straight into their gradients: one window, no workspace. 16-bit inputs
    need fp32 accumulators of (rows + columns) x D; when the whole problem fits the budget it is
    one window (every gradient rounded once), otherwise row windows are as tall as the budget
    allows after a narrow column window (see :func:`backward_grads` for what that costs), and at
    most MAX_ROUNDINGS of them (for huge N * D that outgrows the budget).
    """
    if dtype == torch.float32:
        return m, n
    budget = WORKSPACE_BYTES if workspace_bytes is None else workspace_bytes
    fits = max(budget // (4 * d), 2 * MIN_WINDOW)  # accumulator rows the budget holds
    if m + (n if want_db else 0) <= fits:
        return m, n
    if not want_db:
        return min(m, fits), n
    cols = min(n, max(MIN_WINDOW, fits // 8 // MIN_WINDOW * MIN_WINDOW))
    rows = min(m, max(MIN_WINDOW, (fits - cols) // MIN_WINDOW * MIN_WINDOW))
    # Past MAX_ROUNDINGS row windows the budget yields to precision.
    rows = max(rows, min(m, triton.cdiv(m, MAX_ROUNDINGS)))
    return rows, cols


def backward_grads(a, b, scale, row, col, offset: int, weights, want_db: bool, grad_loss,
                   workspace_bytes: int | None = None):
    """(dA, dB or None, d scale) of ``grad_loss`` times the loss whose logit gradient is
    dX = w_row * P_row + w_col * P_col - w_pos * I, from the base-2 log-sum-exps of
    :func:`forward_stats`. dA and dB come back in the input dtype, d scale in fp32.

    Memory: the kernel accumulates in fp32 with atomics. For 16-bit inputs the accumulators are
    windows (:func:`plan_windows`): rows [r0, r1) x columns [c0, c1), one launch per pair, row
    windows outside. A row window's dA is complete after its column sweep and is cast once; dB of
    a column window is complete only after every row window, so with several row windows it is
    added into the 16-bit gradient once per row window (a few roundings instead of one, which
    is what keeps the extra memory bounded: exact fp32 accumulators for both sides would need
    (M + N) * D * 4 bytes, 512 MiB at N = 131072, D = 512). Every logit is still recomputed once.
    """
    m, n, d = a.shape[0], b.shape[0], a.shape[1]
    w_row, w_col, w_pos = weights
    symmetric = col is not None
    col = col if symmetric else row  # unused when not symmetric
    f32 = dict(dtype=torch.float32, device=a.device)
    mult = (grad_loss.detach().to(torch.float32) * w_pos).reshape(1)
    scale32 = scale.detach().reshape(1).to(torch.float32)
    rows, cols = plan_windows(m, n, d, a.dtype, want_db, workspace_bytes)
    # fp32 inputs accumulate straight into their (zeroed) gradients, 16-bit ones into fp32 windows.
    direct = a.dtype == torch.float32
    new = torch.zeros if direct else torch.empty
    da = new((m, d), dtype=a.dtype, device=a.device)
    db = new((n, d), dtype=b.dtype, device=b.device) if want_db else None
    da_win = da if direct else torch.empty((rows, d), **f32)
    if not want_db:
        db_win = torch.empty((1, d), **f32)  # never touched: the kernel runs with WANT_DB=False
    else:
        db_win = db if direct else torch.empty((cols, d), **f32)
    ds_parts = []
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        acc_a = da_win if direct else da_win[: r1 - r0].zero_()
        for c0 in range(0, n, cols):
            c1 = min(n, c0 + cols)
            acc_b = db_win if direct or not want_db else db_win[: c1 - c0].zero_()
            p_r, p_c = _grid_dims(r1 - r0, c1 - c0)
            ds = torch.empty((p_r, p_c), **f32)
            _bwd_kernel[(p_r, p_c)](
                a[r0:r1], b[c0:c1], scale32, mult, row[0][r0:r1], row[1][r0:r1],
                col[0][c0:c1], col[1][c0:c1], acc_a, acc_b, ds,
                r1 - r0, c1 - c0, d, offset + r0 - c0, bucket(r1 - r0), bucket(c1 - c0),
                w_row / w_pos, w_col / w_pos,
                a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                SYMMETRIC=symmetric, PRECISION=dot_precision(a.dtype), WANT_DB=want_db,
            )
            ds_parts.append(ds.sum())
            if want_db and not direct:
                if r0 > 0:
                    acc_b.add_(db[c0:c1])
                db[c0:c1].copy_(acc_b)
        if not direct:
            da[r0:r1].copy_(acc_a)
    return da, db, torch.stack(ds_parts).sum()


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
    functions below for what each computes)."""

    @staticmethod
    def forward(ctx, a, b, scale, offset, mode, group):
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
        return loss.to(a.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        a, b, scale, row_m, row_l, col_m, col_l = ctx.saved_tensors
        want_db = ctx.needs_input_grad[1]
        col = (col_m, col_l) if col_m is not None else None
        da, db, ds = backward_grads(a, b, scale, (row_m, row_l), col, ctx.offset, ctx.weights,
                                    want_db, grad_loss)
        dscale = ds.to(scale.dtype).reshape(scale.shape) if ctx.needs_input_grad[2] else None
        return da, db, dscale, None, None, None


# ----------------------------------------------------------------------------- functions


def clip_loss(image_features, text_features, logit_scale):
    """Symmetric CLIP loss, labels on the diagonal: both directions from one pass of tiles."""
    return _FusedContrastive.apply(image_features, text_features, logit_scale, 0, "symmetric", None)


def clip_loss_rows(queries, keys, logit_scale, offset: int):
    """One-direction InfoNCE: row i of ``queries`` matches row ``offset + i`` of ``keys``."""
    return _FusedContrastive.apply(queries, keys, logit_scale, offset, "rows", None)


def clip_loss_gathered(local_image, all_text, logit_scale, offset: int, group=None):
    """This rank's share of the global-batch CLIP loss: its rows, every rank's columns.

    ``all_text`` must be gathered with gradient (its backward sums the column gradients into
    their owners); ``offset`` is rank * B. The value is OpenCLIP's local loss of this rank; the
    gradients, averaged over ranks, are those of the single-process loss over the global batch.
    Each logit of the global matrix is computed once in the whole job.
    """
    return _FusedContrastive.apply(local_image, all_text, logit_scale, offset, "gathered", group)
