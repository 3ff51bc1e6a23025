"""DistillClipLoss: a drop-in for ``open_clip.loss.DistillClipLoss`` that stores no logits.

OpenCLIP's distillation term is a soft cross-entropy between a teacher's and the student's
logits, both directions: with ``S = s * image @ text.T`` (student) and ``T = t * dimage @ dtext.T``
(teacher), ``dist(T, S) = -mean_i sum_j softmax(T_i)_j log_softmax(S_i)_j`` and the loss is
``(dist(T, S) + dist(T.T, S.T)) / 2``. OpenCLIP stores S and T, both directions, and their
softmaxes: several N x N matrices. Here they exist one tile at a time.

Per row i, with ``p = softmax(T_i)``, the term is ``lse(S_i) - E_p[S_i]``: it needs only row
statistics, the log-sum-exps of ``S_i`` and ``T_i`` and ``E_p[S_i]``. These fold tile by tile as
running records ``(max S, sum exp(S - max S), max T, sum exp(T - max T), sum exp(T - max T) *
(S - max S))``, rescaled when a maximum grows, so nothing overflows, and the loss is read as
``log(sum exp(S - max S)) - E_p[S - max S]``, small terms kept to full precision. The column
direction needs the same per column: one forward pass over the tiles computes both, each tile of
S and T computed once. Backward recomputes each tile and forms, without storing them,
``dS = w_r (softmax_r(S) - softmax_r(T)) + w_c (softmax_c(S) - softmax_c(T))`` and, when the
teacher's features want gradients (OpenCLIP does not detach them; the trainer passes them from
``no_grad``), ``dT = -w_r softmax_r(T) (S - E_r[S]) - w_c softmax_c(T) (S - E_c[S])``, then
``d image = s dS @ text``, ``d text = s dS.T @ image`` and ``d s = sum(dS * image @ text.T)``.
Extra memory: O(N * (D + D_teacher) + tile); the teacher's width may differ from the student's.

Distributed, as OpenCLIP: with ``local_loss`` each rank distils its own rows against every rank's
columns (rows only, each direction from its own queries); otherwise every rank distils the gathered
N x N problem. The contrastive term is our ClipLoss (the fused kernel on CUDA); the distillation
term runs these torch tiles on every device (no Triton kernel yet). Tiles compute in float32
(float64 for float64 inputs) with autocast off; under autocast the inputs follow ClipLoss's
``autocast_inputs`` rule and the loss comes back in float32.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from declip_fast.kernels import cpu_threads
from declip_fast.kernels.reference_common import compute_dtype, no_autocast
from declip_fast.losses.clip import ClipLoss, as_scalar, autocast_inputs, check_features

# Elements of one logits tile over all CPU workers (a step holds about six: S, T, softmaxes, dS, dT).
TILE_ELEMENTS = 1 << 20
MAX_COL_BLOCK = 1 << 14


def _spans(n: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(n, start + block)) for start in range(0, n, block)]


def _tile_stats(x, t, dim: int):
    """The record of tile ``x`` (student) and ``t`` (teacher) along ``dim`` (1: rows, 0: columns)."""
    m_s, m_t = x.amax(dim, keepdim=True), t.amax(dim, keepdim=True)
    e_t = (t - m_t).exp_()
    return (m_s.squeeze(dim), (x - m_s).exp_().sum(dim), m_t.squeeze(dim), e_t.sum(dim), (e_t * (x - m_s)).sum(dim))


def _merge(a, b):
    """Two records as one (``a`` None: ``b``). Sums are relative to their maxima; the weighted sum
    is also relative to max S, so it shifts by ``sum_t * (new max - old max)``."""
    if a is None:
        return b
    m_s1, s_s1, m_t1, s_t1, w1 = a
    m_s2, s_s2, m_t2, s_t2, w2 = b
    m_s, m_t = torch.maximum(m_s1, m_s2), torch.maximum(m_t1, m_t2)
    x1, x2 = torch.exp(m_t1 - m_t), torch.exp(m_t2 - m_t)
    s_s = s_s1 * torch.exp(m_s1 - m_s) + s_s2 * torch.exp(m_s2 - m_s)
    w = x1 * (w1 - s_t1 * (m_s - m_s1)) + x2 * (w2 - s_t2 * (m_s - m_s2))
    return m_s, s_s, m_t, s_t1 * x1 + s_t2 * x2, w


def _finish(record):
    """(per-row loss terms, lse(S), lse(T), E_p[S]) of a folded record."""
    m_s, s_s, m_t, s_t, w = record
    rel = w / s_t  # E_p[S - max S]
    return torch.log(s_s) - rel, m_s + torch.log(s_s), m_t + torch.log(s_t), m_s + rel


def _cat(records):
    return tuple(torch.cat(parts) for parts in zip(*records))


class _TiledDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, scale, ta, tb, tscale, symmetric, block, out_dtype):
        cdt = compute_dtype(torch.promote_types(a.dtype, ta.dtype))
        with no_autocast(a.device.type):
            args = [x.to(cdt) for x in (a, b, ta, tb)] + [scale.detach().to(cdt), tscale.detach().to(cdt)]
            loss, stats, blocks = _forward(*args, symmetric, block)
        ctx.save_for_backward(a, b, scale, ta, tb, tscale, *stats)
        ctx.symmetric, ctx.blocks = symmetric, blocks
        return loss.to(a.dtype if out_dtype is None else out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        with no_autocast(grad_loss.device.type):
            return _backward(ctx, grad_loss)


def _plan(rows: int, cols: int, block, device) -> tuple[tuple[int, int], int]:
    """((row block, column block), worker threads); ``block`` overrides the tile (tests)."""
    if block is not None:
        row_block, col_block = min(rows, block[0]), min(cols, block[1])
    else:
        col_block = min(cols, MAX_COL_BLOCK)
        workers = max(1, torch.get_num_threads())
        row_block = max(1, min(rows, TILE_ELEMENTS // workers // col_block))
        row_block = cpu_threads.balanced_block(rows, row_block, workers)
    return (row_block, col_block), cpu_threads.workers_for(device, -(-rows // row_block))


def _forward(a, b, ta, tb, s, ts, symmetric, block):
    """(loss, saved statistics, tile shape), all in the compute dtype."""
    rows, cols = a.shape[0], b.shape[0]
    (row_block, col_block), workers = _plan(rows, cols, block, a.device)
    row_spans, col_spans = _spans(rows, row_block), _spans(cols, col_block)
    row_records = {}

    def run(spans):
        col_records = [None] * len(col_spans)
        for r0, r1 in spans:
            record = None
            for ci, (c0, c1) in enumerate(col_spans):
                x = torch.mm(a[r0:r1], b[c0:c1].T).mul_(s)
                t = torch.mm(ta[r0:r1], tb[c0:c1].T).mul_(ts)
                record = _merge(record, _tile_stats(x, t, 1))
                if symmetric:
                    col_records[ci] = _merge(col_records[ci], _tile_stats(x, t, 0))
            row_records[r0] = record
        return col_records

    parts = cpu_threads.run_parts(run, cpu_threads.split(row_spans, workers))
    row_terms, *row_stats = _finish(_cat(row_records[r0] for r0, _ in row_spans))
    if not symmetric:
        return row_terms.sum() / rows, row_stats, (row_block, col_block)
    merged = parts[0]
    for other in parts[1:]:  # in worker order: the same bits every run
        merged = [_merge(m, o) for m, o in zip(merged, other)]
    col_terms, *col_stats = _finish(_cat(merged))
    return (row_terms.sum() + col_terms.sum()) / (2 * rows), row_stats + col_stats, (row_block, col_block)


def _tile_grads(x, t, directions, want_t, acc):
    """dS and dT (None unless ``want_t``) of one tile, summed over ``directions``: ((lse S, lse T,
    E_p[S]) broadcast along the tile, weight) for rows, and for columns when symmetric. ``acc``
    gathers ``sum(dS * log q)`` and ``sum(dT * log p)``: the scales' gradients times the scales,
    as ``sum(dS * S)`` is, since each direction's dS (dT) sums to zero along its softmax; with
    ``log q = S - lse`` in place of S nothing cancels at large logits (the log-sum-exps, not the
    errors of E_p[S], meet the rounding of those zero sums)."""
    dx = dt = None
    for (lse_s, lse_t, ep), weight in directions:
        log_q, log_p = x - lse_s, t - lse_t
        p = log_p.exp()
        d = log_q.exp().sub_(p).mul_(weight)
        acc[0] += (d * log_q).sum()
        dx = d if dx is None else dx.add_(d)
        if want_t:
            d = p.mul_(x - ep).mul_(-weight)
            acc[1] += (d * log_p).sum()
            dt = d if dt is None else dt.add_(d)
    return dx, dt


def _backward(ctx, grad_loss):
    a_in, b_in, scale, ta_in, tb_in, tscale, *stats = ctx.saved_tensors
    cdt = stats[0].dtype
    a, b, ta, tb = (x.to(cdt) for x in (a_in, b_in, ta_in, tb_in))
    s, ts, g = scale.detach().to(cdt), tscale.detach().to(cdt), grad_loss.to(cdt)
    rows, cols = a.shape[0], b.shape[0]
    (row_block, col_block), workers = _plan(rows, cols, ctx.blocks, a.device)
    need = ctx.needs_input_grad
    want_t = need[3] or need[4] or need[5]
    w_r = g / (2 * rows) if ctx.symmetric else g / rows
    da = torch.zeros_like(a) if need[0] else None
    dta = torch.zeros_like(ta) if need[3] else None

    def run(spans):
        db = torch.zeros_like(b) if need[1] else None
        dtb = torch.zeros_like(tb) if need[4] else None
        acc = torch.zeros(2, dtype=cdt, device=a.device)
        for r0, r1 in spans:
            for c0, c1 in _spans(cols, col_block):
                x = torch.mm(a[r0:r1], b[c0:c1].T).mul_(s)
                t = torch.mm(ta[r0:r1], tb[c0:c1].T).mul_(ts)
                directions = [([v[r0:r1, None] for v in stats[:3]], w_r)]
                if ctx.symmetric:
                    directions.append(([v[None, c0:c1] for v in stats[3:]], g / (2 * cols)))
                dx, dt = _tile_grads(x, t, directions, want_t, acc)
                for d, row_grads, col_grads, keys, queries in ((dx, da, db, b, a), (dt, dta, dtb, tb, ta)):
                    if row_grads is not None:
                        row_grads[r0:r1].addmm_(d, keys[c0:c1])
                    if col_grads is not None:
                        col_grads[c0:c1].addmm_(d.T, queries[r0:r1])
        return db, dtb, acc

    parts = cpu_threads.run_parts(run, cpu_threads.split(_spans(rows, row_block), workers))
    db, dtb, acc = parts[0]
    for other_db, other_dtb, other_acc in parts[1:]:  # in worker order: the same bits every run
        db = db.add_(other_db) if db is not None else None
        dtb = dtb.add_(other_dtb) if dtb is not None else None
        acc = acc + other_acc

    def grad(x, scale_by, like):
        return x.mul_(scale_by).to(like.dtype) if x is not None else None

    def scale_grad(total, scale_in, wanted):  # total is d loss / d log(scale)
        return (total / scale_in.detach().to(cdt)).to(scale_in.dtype).reshape(scale_in.shape) if wanted else None

    return (
        grad(da, s, a_in),
        grad(db, s, b_in),
        scale_grad(acc[0], scale, need[2]),
        grad(dta, ts, ta_in),
        grad(dtb, ts, tb_in),
        scale_grad(acc[1], tscale, need[5]),
        None,
        None,
        None,
    )


def distill_loss(
    image,
    text,
    logit_scale,
    teacher_image,
    teacher_text,
    teacher_logit_scale,
    *,
    symmetric=True,
    block=None,
    out_dtype=None,
):
    """OpenCLIP's distillation term without the logits. ``symmetric=True`` (the default; ``image``
    and ``text`` row-matched, [N, D]): ``(dist(T, S) + dist(T.T, S.T)) / 2``; ``symmetric=False``:
    ``dist(T, S)`` alone, over ``image``'s R rows against ``text``'s C rows. The teacher's [R, Dt]
    and [C, Dt] features may be wider or narrower than the student's. ``block`` (rows, columns)
    sets the tile (None: the default); ``out_dtype`` the loss's dtype (None: ``image``'s)."""
    rows, cols = image.shape[0], text.shape[0]
    if teacher_image.shape[0] != rows or teacher_text.shape[0] != cols:
        raise ValueError(
            f"teacher features {tuple(teacher_image.shape)}, {tuple(teacher_text.shape)} must have the "
            f"student's rows {rows}, {cols}"
        )
    if symmetric and rows != cols:
        raise ValueError(f"symmetric distillation needs as many images as texts, got {rows} and {cols}")
    s, ts = as_scalar("logit_scale", logit_scale, image), as_scalar("dist_logit_scale", teacher_logit_scale, image)
    return _TiledDistill.apply(image, text, s, teacher_image, teacher_text, ts, symmetric, block, out_dtype)


class DistillClipLoss(ClipLoss):
    """``(contrastive_loss, distill_loss)``, or a dict with output_dict; see the module docstring."""

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale,
        dist_image_features: torch.Tensor,
        dist_text_features: torch.Tensor,
        dist_logit_scale,
        output_dict: bool = False,
    ):
        contrastive = super().forward(image_features, text_features, logit_scale)
        check_features(dist_image_features, dist_text_features)
        if dist_image_features.shape[0] != image_features.shape[0]:
            raise ValueError(
                f"the teacher's batch {dist_image_features.shape[0]} is not the student's {image_features.shape[0]}"
            )
        if dist_image_features.device != image_features.device:
            raise ValueError(f"teacher features on {dist_image_features.device}, student's on {image_features.device}")
        features, out_dtype = autocast_inputs(image_features, text_features, dist_image_features, dist_text_features)

        def dist(img, txt, t_img, t_txt, symmetric=True):
            return distill_loss(
                img, txt, logit_scale, t_img, t_txt, dist_logit_scale, symmetric=symmetric, out_dtype=out_dtype
            )

        if self.world_size > 1:
            img, txt, t_img, t_txt = features
            every = [self._gather(x) for x in features]
            if self.local_loss:
                distill = (
                    dist(img, every[1], t_img, every[3], symmetric=False)
                    + dist(txt, every[0], t_txt, every[2], symmetric=False)
                ) / 2
            else:
                distill = dist(*every)
        else:
            distill = dist(*features)
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill
