"""Fused contrastive (InfoNCE / CLIP) loss in Triton: the N x N logits never leave the chip.

Rows ``a`` [M, D] (images), columns ``b`` [N, D] (texts), scale ``s``, logits ``X = s * a @ b.T``;
row i's positive is column ``offset + i``. The loss needs each row's log-sum-exp, each column's
(symmetric loss) and the positives. ARCHITECTURE.md ("The kernels") draws the whole design.

This module is the host side, three of the op's four levels: the launchers (checks, grid planning,
host folds: :func:`forward_stats`, :func:`backward_grads`), the autograd Function and the plain
functions. The ``@triton.jit`` kernels, their tiling and numerics are in ``contrastive_jit``
(every name there is re-exported here, where tests and benchmarks read them).

Forward: the tiles are cut into P_r x P_c rectangles of balanced sizes, one program each, planned
for whole waves (:func:`~declip_fast.kernels.tuning.plan_rectangles`); each program leaves
per-rectangle (max, sum) partials, and the host folds them with one log-sum-exp each.

Backward: two owner passes (dA, then dB), 10 N^2 D FLOPs per loss step when a chunk covers D
(forward 2, each pass 4). When the owners alone cannot fill the GPU (the gathered mode at B = 128
rows a rank) the other axis is cut into S ranges whose fp32 partials ``[S, M, D]`` are summed on
the host in a fixed order; ``d s = sum(dX * X) / s`` is folded the same way. Memory beyond inputs
and gradients: the forward's (P_r + P_c) x N pairs, O(N) statistics, and the split partials (at
most SPLIT_WORKSPACE_BYTES).

Distributed (``local_loss=True, gather_with_grad=True``): each rank passes its B rows and the N
gathered columns; the column statistics of its rows are all-gathered (N pairs) and folded, so
every logit of the global matrix is computed once in the job. The column pass covers every column
and its gradient reaches the owners through the gather's reduce-scatter; averaged over ranks, the
gradients of the features and of ``s`` equal the single-process global-batch loss's.
"""

from __future__ import annotations

import torch
import triton
from torch.autograd.function import once_differentiable

from declip_fast.kernels.configs import (
    ANY_D_BWD,  # noqa: F401
    CONTRASTIVE_BWD as HOPPER_BWD,  # noqa: F401
    CONTRASTIVE_FWD as HOPPER_FWD,  # noqa: F401
    INTERPRETER_BWD,  # noqa: F401
    INTERPRETER_FWD,  # noqa: F401
)
from declip_fast.kernels.contrastive_jit import (
    BWD_CONFIGS,  # noqa: F401
    BWD_KEY,  # noqa: F401
    BWD_PRUNE,  # noqa: F401
    DX_SCALE,  # noqa: F401
    FWD_CONFIGS,  # noqa: F401
    FWD_KEY,  # noqa: F401
    FWD_PRUNE,  # noqa: F401
    _block,  # noqa: F401
    _bwd_kernel,
    _fwd_kernel,
    _logits_tile,  # noqa: F401
    _merge,  # noqa: F401
    _narrow_chunk,  # noqa: F401
    _span,  # noqa: F401
)
from declip_fast.kernels.tuning import (
    bucket,
    concurrent_programs,
    dot_precision,
    interpreting,  # noqa: F401
    launch_device,
    plan_rectangles,
    plan_splits,
    tuning,  # noqa: F401
)

LN2 = 0.6931471805599453

# Forward rectangles are planned in tiles of PLAN_TILE rows/columns (the largest BM/BN of any
# config, so no rectangle is ever empty), at most MAX_PROGRAMS_PER_AXIS per axis: the partial
# statistics cost (P_r + P_c) * N * 8 bytes.
PLAN_TILE = 128
MAX_PROGRAMS_PER_AXIS = 32
# Backward: at most this many ranges of the reduction axis, and this much fp32 for their partials.
MAX_SPLITS = 32
SPLIT_WORKSPACE_BYTES = 64 << 20


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
    p_r, p_c = plan_rectangles(triton.cdiv(m, PLAN_TILE), triton.cdiv(n, PLAN_TILE), slots, MAX_PROGRAMS_PER_AXIS)
    f32 = dict(dtype=torch.float32, device=a.device)
    # Every slot is written by its program (no rectangle is empty): no initialisation needed.
    row_m, row_l = torch.empty((2, p_c, m), **f32)
    col_m, col_l = torch.empty((2, p_r, n if symmetric else 1), **f32)
    pos = torch.empty(m, **f32)
    scale32 = scale.detach().reshape(1).to(torch.float32)
    with launch_device(a.device):
        _fwd_kernel[(p_r, p_c)](
            a,
            b,
            scale32,
            row_m,
            row_l,
            col_m,
            col_l,
            pos,
            m,
            n,
            d,
            offset,
            bucket(m),
            bucket(n),
            a.stride(0),
            a.stride(1),
            b.stride(0),
            b.stride(1),
            SYMMETRIC=symmetric,
            PRECISION=dot_precision(a.dtype),
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
    out = torch.empty((n_p, d), dtype=p.dtype, device=p.device) if splits == 1 else torch.empty((splits, n_p, d), **f32)
    # One d-scale slot per (range, owner block of the smallest BP); unused slots stay zero (the
    # autotuner re-zeroes them after its trials). Its own buffer even when not wanted: never
    # alias another argument with a buffer the autotuner zeroes.
    ds = torch.zeros((splits * triton.cdiv(n_p, 16),), **f32)
    unused = (own or other)[0]  # a valid pointer for the statistics a pass does not read
    own_m, own_l = own if own is not None else (unused, unused)
    oth_m, oth_l = other if other is not None else (unused, unused)
    grid = lambda meta: (triton.cdiv(n_p, meta["BP"]), triton.cdiv(d, meta["BD"]), splits)
    with launch_device(p.device):
        _bwd_kernel[grid](
            p,
            q,
            scale32,
            mult,
            own_m,
            own_l,
            oth_m,
            oth_l,
            out,
            ds,
            n_p,
            n_q,
            d,
            shift,
            bucket(n_p),
            bucket(n_q),
            w_own,
            w_other,
            p.stride(0),
            p.stride(1),
            q.stride(0),
            q.stride(1),
            n_p * d if splits > 1 else 0,
            OWN_STATS=own is not None,
            OTHER_STATS=other is not None,
            WANT_DS=want_ds,
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
        db, _ = _owner_pass(b, a, scale32, mult, col, row, -offset, w_col / w_pos, w_row / w_pos, False)
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
            da, db, ds = backward_grads(a, b, scale, (row_m, row_l), col, ctx.offset, ctx.weights, want_db, grad_loss)
        dscale = ds.to(scale.dtype).reshape(scale.shape) if ctx.needs_input_grad[2] else None
        return da, db, dscale, None, None, None, None


# ----------------------------------------------------------------------------- functions


def clip_loss(image_features, text_features, logit_scale, *, out_dtype=None):
    """Symmetric CLIP loss, labels on the diagonal: both directions from one pass of tiles."""
    return _FusedContrastive.apply(image_features, text_features, logit_scale, 0, "symmetric", None, out_dtype)


def clip_loss_rows(queries, keys, logit_scale, offset: int, *, out_dtype=None):
    """One-direction InfoNCE: row i of ``queries`` matches row ``offset + i`` of ``keys``
    (``0 <= offset <= len(keys) - len(queries)``)."""
    return _FusedContrastive.apply(queries, keys, logit_scale, offset, "rows", None, out_dtype)


def clip_loss_gathered(local_image, all_text, logit_scale, offset: int, group=None, *, out_dtype=None):
    """This rank's share of the global-batch CLIP loss: its rows, every rank's columns.

    ``all_text`` must be gathered with gradient (its backward sums the column gradients into
    their owners); ``offset`` is rank * B. The value is OpenCLIP's local loss of this rank; the
    gradients, averaged over ranks, are those of the single-process loss over the global batch.
    Each logit of the global matrix is computed once in the whole job.
    """
    return _FusedContrastive.apply(local_image, all_text, logit_scale, offset, "gathered", group, out_dtype)
