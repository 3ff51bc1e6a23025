"""Plain-torch reference of the contrastive loss, symmetric and rows modes (the CPU / no-Triton
path, and the tests' reference); the gathered mode builds on it in ``reference_gathered``.

Contrastive loss without the N x N logits
-----------------------------------------
For query rows ``q`` [R, D], key rows ``k`` [C, D] and a scale ``s`` the logits are
``X = s * q @ k.T``. The InfoNCE loss needs, per row, ``lse_r(i) = logsumexp_j X[i, j]`` and the
positive ``X[i, offset + i]``; the symmetric CLIP loss also needs, per column,
``lse_c(j) = logsumexp_i X[i, j]``.

Forward walks X tile by tile (``row_block`` x ``col_block``). Each tile is computed once and feeds
both the row and the column statistics, kept as a running (max, sum-of-exp) pair and merged with
the usual rescaling ``sum_new = sum_old * exp(max_old - max_new) + sum_tile * exp(max_tile -
max_new)``. Only the log-sum-exps (O(R + C)) are saved for backward.

Backward recomputes each tile and forms the gradient of the logits without storing it:
``dX = w_r * exp(X - lse_r) + w_c * exp(X - lse_c)`` (minus the positives, which are handled in
O(N * D) outside the tiles). Then ``dq += s * dX @ k``, ``dk += s * dX.T @ q`` and
``ds = sum(dX * X / s) = sum_i <q_i, (dX @ k)_i>``, which needs no extra pass over the tile.

Numerics: every tile is computed in float32 (float64 for float64 inputs); inputs of lower precision
are upcast once, which costs O(N * D) memory, and autocast is switched off inside (the inputs are
already in the dtype the caller chose; a 16-bit ``torch.mm`` would round every logit). The loss is
summed as per-row terms ``(max_r(i) - X[i, offset + i]) + log(sum_r(i))``, the positive read from
the same tile as the row statistics, as cross_entropy's log-softmax does: summing the row and
column log-sum-exps and the positives separately cancels catastrophically once logits are large
(norm-5 features at scale 100 lose ~4 digits in fp32). It is cast once, at the end, to
``out_dtype`` (the inputs' dtype when None). The peak memory is O(N * D + tile), independent of
the number of logits. A scalar ``logit_bias`` added to every logit cancels in a softmax, so it
changes neither the loss nor any other gradient; its own gradient is exactly zero.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from declip_fast.kernels import cpu_threads
from declip_fast.kernels.reference_common import compute_dtype, no_autocast

# Elements of one logits tile; 2**21 float32 = 8 MiB. Columns per tile are capped so that very
# large N still gets bounded tiles; rows per tile follow from the width.
TILE_ELEMENTS = 1 << 21
MAX_COL_BLOCK = 1 << 14


def _blocks(rows: int, cols: int, block) -> tuple[int, int]:
    """(rows, cols) of one logits tile; ``block`` overrides the default (tests use small ones)."""
    if block is not None:
        row_block, col_block = block
        if row_block < 1 or col_block < 1:
            raise ValueError(f"block sizes must be positive, got {block}")
        return min(rows, row_block), min(cols, col_block)
    col_block = min(cols, MAX_COL_BLOCK)
    # Tiles held at once across the CPU's worker threads stay within TILE_ELEMENTS (cache), and
    # the row blocks divide evenly among the workers.
    workers = max(1, torch.get_num_threads())
    row_block = max(1, min(rows, TILE_ELEMENTS // workers // col_block))
    return cpu_threads.balanced_block(rows, row_block, workers), col_block


def _workers(device, rows: int, row_block: int) -> int:
    return cpu_threads.workers_for(device, -(-rows // row_block))


def _spans(n: int, block: int):
    for start in range(0, n, block):
        yield start, min(n, start + block)


def _merge(m_old, sums_old, m_tile, sums_tile):
    """Merge two running (max, sums) records, each sum taken relative to its max: the sum of
    exp, and where tracked the sum of exp * logit (``u / s``, the softmax-weighted mean logit,
    is the derivative of the log-sum-exp along the scale, times s). -inf maxima are safe."""
    m = torch.maximum(m_old, m_tile)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    a, b = torch.exp(m_old - m_safe), torch.exp(m_tile - m_safe)
    return m, tuple(old * a + new * b for old, new in zip(sums_old, sums_tile))


def _log_sum(m, s):
    return m + torch.log(s)


class _TiledContrastive(torch.autograd.Function):
    """InfoNCE over s * q @ k.T without storing the logits.

    ``symmetric=False``: mean over the R rows of ``lse_r(i) - X[i, offset + i]``.
    ``symmetric=True`` (R == C, offset 0): the CLIP loss
    ``(mean_i (lse_r(i) - X[i, i]) + mean_j (lse_c(j) - X[j, j])) / 2``.
    """

    @staticmethod
    def forward(ctx, q, k, scale, offset, symmetric, block, out_dtype):
        with no_autocast(q.device.type):
            loss, row_lse, col_lse, blocks = _forward(q, k, scale, offset, symmetric, block)
        ctx.save_for_backward(q, k, scale, row_lse, col_lse)
        ctx.offset, ctx.symmetric, ctx.blocks = offset, symmetric, blocks
        return loss.to(q.dtype if out_dtype is None else out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        with no_autocast(grad_loss.device.type):
            return _backward(ctx, grad_loss)


def _forward(q, k, scale, offset, symmetric, block):
    """(loss, row log-sum-exps, column log-sum-exps, tile shape) in the compute dtype."""
    st = _stats(q, k, scale, offset, symmetric, block)
    row_m, row_s, pos = st["row_m"], st["row_s"], st["pos"]
    rows = row_m.shape[0]
    # Per row (max - positive) first: exact when the positive is the max, as a confident
    # model's is; the log of the sum is then a small number kept to full precision.
    loss = ((row_m - pos) + torch.log(row_s)).sum()
    if symmetric:
        col_m, col_s = st["col_m"], st["col_s"]
        loss = (loss + ((col_m - pos) + torch.log(col_s)).sum()) / (2 * rows)
        col_lse = _log_sum(col_m, col_s)
    else:
        loss = loss / rows
        col_lse = row_m.new_empty(0)
    return loss, _log_sum(row_m, row_s), col_lse, st["blocks"]


def _stats(q, k, scale, offset, cols_too, block, expect=False):
    """The tile walk: row (max, sum) pairs and positives, with ``cols_too`` the column pairs
    over all C columns, and with ``expect`` also the sums of exp * logit (``row_u``, ``col_u``),
    all in the compute dtype; ``blocks`` is the tile shape."""
    cdt = compute_dtype(q.dtype)
    qc, kc = q.to(cdt), k.to(cdt)
    s = scale.detach().to(cdt)
    rows, cols = qc.shape[0], kc.shape[0]
    row_block, col_block = _blocks(rows, cols, block)

    n_sums = 2 if expect else 1  # sum of exp, and sum of exp * logit
    row_m = torch.empty(rows, dtype=cdt, device=q.device)
    row_sums = tuple(torch.empty(rows, dtype=cdt, device=q.device) for _ in range(n_sums))
    pos = torch.empty(rows, dtype=cdt, device=q.device)

    def tile_sums(x, t_m, dim):
        e = (x - t_m.unsqueeze(dim)).exp_()
        return (e.sum(dim=dim), (e * x).sum(dim=dim)) if expect else (e.sum(dim=dim),)

    def run(spans):
        """Row statistics and positives of ``spans`` (disjoint rows), and this worker's column
        statistics over them."""
        c_m = torch.full((cols,), float("-inf"), dtype=cdt, device=q.device)
        c_sums = tuple(torch.zeros(cols, dtype=cdt, device=q.device) for _ in range(n_sums))
        for r0, r1 in spans:
            r_m = torch.full((r1 - r0,), float("-inf"), dtype=cdt, device=q.device)
            r_sums = tuple(torch.zeros(r1 - r0, dtype=cdt, device=q.device) for _ in range(n_sums))
            for c0, c1 in _spans(cols, col_block):
                x = torch.mm(qc[r0:r1], kc[c0:c1].T).mul_(s)
                # Positives in this tile: rows i with offset + i in [c0, c1), on one diagonal.
                lo, hi = max(r0, c0 - offset), min(r1, c1 - offset)
                if lo < hi:
                    pos[lo:hi] = x[lo - r0 : hi - r0, lo + offset - c0 : hi + offset - c0].diagonal()
                t_m = x.amax(dim=1)
                r_m, r_sums = _merge(r_m, r_sums, t_m, tile_sums(x, t_m, 1))
                if cols_too:
                    t_m = x.amax(dim=0)
                    merged_m, merged = _merge(c_m[c0:c1], [c[c0:c1] for c in c_sums], t_m, tile_sums(x, t_m, 0))
                    c_m[c0:c1] = merged_m
                    for c, v in zip(c_sums, merged):
                        c[c0:c1] = v
            row_m[r0:r1] = r_m
            for r, v in zip(row_sums, r_sums):
                r[r0:r1] = v
        return c_m, c_sums

    spans = list(_spans(rows, row_block))
    parts = cpu_threads.run_parts(run, cpu_threads.split(spans, _workers(q.device, rows, row_block)))
    col_m, col_sums = parts[0]
    for other in parts[1:]:  # in worker order: the same bits every run
        col_m, col_sums = _merge(col_m, col_sums, *other)
    empty = row_m.new_empty(0)
    return dict(
        row_m=row_m,
        row_s=row_sums[0],
        row_u=row_sums[1] if expect else empty,
        pos=pos,
        col_m=col_m,
        col_s=col_sums[0],
        col_u=col_sums[1] if expect else None,
        blocks=(row_block, col_block),
    )


def _backward(ctx, grad_loss):
    """(d q, d k or None, d scale, None x 4) in the inputs' dtypes."""
    q, k, scale, row_lse, col_lse = ctx.saved_tensors
    offset, symmetric = ctx.offset, ctx.symmetric
    row_block, col_block = ctx.blocks
    cdt = row_lse.dtype
    qc, kc = q.to(cdt), k.to(cdt)
    s = scale.detach().to(cdt)
    g = grad_loss.to(cdt)
    rows, cols = qc.shape[0], kc.shape[0]
    # Weight of each softmax term in dL/dX, upstream gradient folded in.
    w = g / (2 * rows) if symmetric else g / rows

    # dq is always needed: d loss / d scale is read off it. dk is skipped when k takes no
    # gradient (gathered features without gather_with_grad), a quarter of the backward FLOPs.
    want_dk = ctx.needs_input_grad[1]
    dq = torch.zeros_like(qc)

    def run(spans):
        """dq of ``spans`` (disjoint rows) in place; this worker's share of dk."""
        dk = torch.zeros_like(kc) if want_dk else None
        for r0, r1 in spans:
            for c0, c1 in _spans(cols, col_block):
                x = torch.mm(qc[r0:r1], kc[c0:c1].T).mul_(s)
                dx = (x - row_lse[r0:r1, None]).exp_()
                if symmetric:
                    dx.add_((x.sub_(col_lse[None, c0:c1])).exp_())
                dx.mul_(w)
                dq[r0:r1].addmm_(dx, kc[c0:c1])
                if want_dk:
                    dk[c0:c1].addmm_(dx.T, qc[r0:r1])
        return dk

    spans = list(_spans(rows, row_block))
    parts = cpu_threads.run_parts(run, cpu_threads.split(spans, _workers(q.device, rows, row_block)))
    dk = parts[0]
    for other in parts[1:] if want_dk else ():  # in worker order: the same bits every run
        dk.add_(other)
    # dq holds dX @ k (unscaled), so <q, dq> summed is sum(dX * q @ k.T) = d loss / d s.
    ds = (qc * dq).sum()
    # Positives: every row (and, symmetric, every column) subtracts X[i, offset + i]
    # once, with total weight g / rows per pair.
    k_pos = kc[offset : offset + rows]
    g_pos = g / rows
    ds = ds - g_pos * (qc * k_pos).sum()
    dq.mul_(s).sub_(g_pos * s * k_pos)
    if want_dk:
        dk.mul_(s)
        dk[offset : offset + rows].sub_(g_pos * s * qc)
        dk = dk.to(k.dtype)

    dscale = ds.to(scale.dtype).reshape(scale.shape) if ctx.needs_input_grad[2] else None
    return dq.to(q.dtype), dk, dscale, None, None, None, None


def _check(q, k, offset: int, out_dtype) -> None:
    last = k.shape[0] - q.shape[0]
    if not isinstance(offset, int) or not 0 <= offset <= last:
        raise ValueError(f"offset must be an int in [0, {last}] (keys - queries), got {offset!r}")
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise ValueError(f"out_dtype must be a floating torch.dtype or None, got {out_dtype!r}")


def clip_loss(image_features, text_features, logit_scale, block=None, *, out_dtype=None):
    """Symmetric CLIP loss over matching rows of both feature sets (labels on the diagonal).

    Equals ``(CE(s I T^T, arange) + CE(s T I^T, arange)) / 2`` with O(N * D + tile) memory.
    ``out_dtype``: the loss's dtype (None: the features'); autocast callers ask for float32, as
    autocast's cross_entropy returns.
    """
    _check(image_features, text_features, 0, out_dtype)
    return _TiledContrastive.apply(image_features, text_features, logit_scale, 0, True, block, out_dtype)


def clip_loss_rows(queries, keys, logit_scale, offset: int, block=None, *, out_dtype=None):
    """One-direction InfoNCE: row i of ``queries`` matches row ``offset + i`` of ``keys``.

    Equals ``CE(s Q K^T, offset + arange(R))`` with O((R + C) * D + tile) memory; ``out_dtype``
    as in :func:`clip_loss`.
    """
    _check(queries, keys, offset, out_dtype)
    return _TiledContrastive.apply(queries, keys, logit_scale, offset, False, block, out_dtype)


def clip_loss_dense(image_features, text_features, logit_scale):
    """The textbook dense form, for tests: stores the full logits."""
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    ce = torch.nn.functional.cross_entropy
    return (ce(logits, labels) + ce(logits.T, labels)) / 2
