"""Plain-torch SigLIP loss without the B x N logits (the CPU / no-Triton path, and the tests' reference).

The loss
--------
For image rows ``a`` [B, D], text rows ``b`` [N, D], a scale ``s`` and a bias (0-d tensors), the
logits are ``z_ij = s * a_i . b_j + bias`` and the labels ``y_ij = +1`` where ``j == offset + i``,
-1 elsewhere (``offset=None``: every pair is a negative). The loss is
``(1/B) * sum_ij softplus(-y_ij * z_ij)``, OpenCLIP's ``-logsigmoid(labels * logits).sum() / B``.

Why the gradients are taken in the forward
------------------------------------------
Unlike a softmax, each term depends on one logit only, so ``d loss / d z_ij = (sigmoid(z_ij) -
[y_ij = +1]) / B`` is known as soon as the tile holding ``z_ij`` is: no row or column statistic
has to be finished first. So when any input requires grad, one walk over the tiles computes the
loss AND every gradient (as the fused linear cross-entropy does): per tile of rows x columns,
``z``, the loss partial, ``dz`` in place, then ``dA[rows] += dz @ b[cols]`` and ``dB[cols] +=
dz^T @ a[rows]`` (scaled by ``s / B`` once at the end), ``d bias += sum(dz)`` and ``d s =
sum_i <a_i, (dz @ b)_i> / B`` (= ``sum dz * a.b``, read off the ``dA`` product at O(B D)).
Those are the three ``B * N * D`` products OpenCLIP's forward + backward runs, with no logits
recomputed. The backward only multiplies the stored gradients by the upstream gradient.

Memory: one logits tile (plus one temporary of its size) per worker thread, the gradients
(O((B + N) * D); the rows of the longer side are split over the workers, each keeping its own
copy of the shorter side's gradient), and no ``[B, N]`` tensor at any point, forward or
backward; OpenCLIP stores the logits, the labels, their product and its log-sigmoid (several
``B x N`` tensors) and allocates more in the backward.

Numerics: tiles are computed in float32 (float64 for float64 inputs), 16-bit inputs upcast once
(O((B + N) * D)) with autocast off inside. The positives are handled exactly: their logits are
negated in the tile (``w = -y * z``), so the loss is ``softplus(w)`` and the gradient
``sigmoid(w)`` (negated back on the positives) with no cancellation at large logits. Partial sums
are combined in a fixed order (tiles in order within a worker, workers in order), so a given
thread count gives the same bits on every run. The loss is cast once to ``out_dtype`` (the inputs'
dtype when None), each gradient to its input's dtype.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from declip_fast.kernels import cpu_threads
from declip_fast.kernels.reference_common import compute_dtype, no_autocast
from declip_fast.kernels.reference_contrastive import _spans

# Elements of the logits tiles held at once, over all worker threads: 2**20 float32 = 4 MiB
# (plus one temporary of the same size), cache-sized on the CPU.
TILE_ELEMENTS = 1 << 20


class _SigLip(torch.autograd.Function):
    """The SigLIP loss; gradients computed in the forward, scaled in the backward."""

    @staticmethod
    def forward(ctx, image, text, scale, bias, offset, grad_on, out_dtype, block):
        need = tuple(bool(n) and grad_on for n in ctx.needs_input_grad[:4])
        with no_autocast(image.device.type):
            loss, grads = _forward(image, text, scale, bias, offset, need, block)
        ctx.save_for_backward(*grads)  # None where that gradient is not needed
        ctx.dtypes = (image.dtype, text.dtype, scale.dtype, bias.dtype)
        return loss.to(image.dtype if out_dtype is None else out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        out = []
        for g, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            out.append(None if g is None else (g * grad_loss.to(g.dtype)).to(dtype))
        return (*out, None, None, None, None)


def _tile(rows: int, cols: int, block) -> tuple[int, int]:
    """(rows, cols) of one logits tile: ``block`` if given (tests), else about ``TILE_ELEMENTS``
    across the worker threads, near square (each tile adds into both gradients, so its rows and
    columns are both reused about ``D`` times), the row blocks balanced over the workers."""
    if block is not None:
        return min(rows, block[0]), min(cols, block[1])
    workers = max(1, torch.get_num_threads())
    per_worker = max(1, TILE_ELEMENTS // workers)
    col_block = min(cols, 1 << (per_worker.bit_length() - 1) // 2)
    row_block = max(1, min(rows, per_worker // col_block))
    return cpu_threads.balanced_block(rows, row_block, workers), col_block


def _forward(image, text, scale, bias, offset, need, block):
    """(loss, (dA, dB, d scale, d bias)) in the compute dtype, for a unit upstream gradient;
    each gradient None unless ``need`` says so."""
    cdt = compute_dtype(image.dtype)
    a, b = image.to(cdt), text.to(cdt)
    s, beta = scale.detach().to(cdt), bias.detach().to(cdt)
    # The walk splits the rows of its first operand over the workers and gives each worker its
    # own gradient of the second: the longer side goes first (the gathered mode's B local
    # images against N texts runs as N text rows), which gives every worker blocks and keeps
    # the per-worker copies small. The loss is symmetric; the positives move to -offset.
    flip = block is None and b.shape[0] > a.shape[0]
    if flip:
        offset = None if offset is None else -offset
        a, b, need = b, a, (need[1], need[0], need[2], need[3])
    loss, (da, db, dscale, dbias) = _walk(a, b, s, beta, offset, need, _tile(a.shape[0], b.shape[0], block))
    if flip:
        da, db = db, da
    inv_b = 1.0 / image.shape[0]
    grads = (da, db, dscale, dbias)
    scales = (s * inv_b, s * inv_b, inv_b, inv_b)
    return loss * inv_b, tuple(None if g is None else g.mul_(f) for g, f in zip(grads, scales))


def _walk(a, b, s, beta, offset, need, blocks):
    """The tile walk over ``z = s a b^T + beta``, positives at (i, offset + i): (sum of the loss
    terms, (sum_j dz_ij b_j, sum_i dz_ij a_i, sum dz * a.b, sum dz)), each None unless needed."""
    rows, cols = a.shape[0], b.shape[0]
    row_block, col_block = blocks
    want_a = need[0] or need[2]  # d scale is read off the dA product: sum_i <a_i, dA_i>
    any_grad = any(need)
    da = torch.zeros_like(a) if want_a else None
    zero = torch.zeros((), dtype=a.dtype, device=a.device)

    def run(spans):
        """Loss and d bias partials and this worker's dB over ``spans`` (disjoint rows); dA of
        those rows written in place."""
        loss = torch.zeros((), dtype=a.dtype, device=a.device)
        dbias = torch.zeros((), dtype=a.dtype, device=a.device)
        db = torch.zeros_like(b) if need[1] else None
        # Two tile buffers per worker, reused: no allocation per tile, which the allocator
        # would keep resident in each thread's arena.
        buffers = torch.empty(2, row_block * col_block, dtype=a.dtype, device=a.device)
        for r0, r1 in spans:
            for c0, c1 in _spans(cols, col_block):
                w, terms = (buf[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0) for buf in buffers)
                torch.mm(a[r0:r1], b[c0:c1].T, out=w).mul_(s).add_(beta)  # z
                # Positives in this tile: rows i with offset + i in [c0, c1), on one diagonal.
                diag = None
                if offset is not None:
                    lo, hi = max(r0, c0 - offset), min(r1, c1 - offset)
                    if lo < hi:
                        diag = w[lo - r0 : hi - r0, lo + offset - c0 : hi + offset - c0].diagonal()
                        diag.neg_()  # w = -y * z
                loss += torch.logaddexp(w, zero, out=terms).sum()  # softplus(w), to the ulp
                if not any_grad:
                    continue
                dz = w.sigmoid_()  # d softplus(w) / dw; dw / dz = -y
                if diag is not None:
                    diag.neg_()  # positives: -sigmoid(-z) = sigmoid(z) - 1
                if want_a:
                    da[r0:r1].addmm_(dz, b[c0:c1])
                if need[1]:
                    db[c0:c1].addmm_(dz.T, a[r0:r1])
                if need[3]:
                    dbias += dz.sum()
        return loss, dbias, db

    spans = list(_spans(rows, row_block))
    workers = cpu_threads.workers_for(a.device, len(spans))
    parts = cpu_threads.run_parts(run, cpu_threads.split(spans, workers))
    loss, dbias, db = parts[0]
    for other_loss, other_bias, other_db in parts[1:]:  # in worker order: the same bits every run
        loss, dbias = loss + other_loss, dbias + other_bias
        if db is not None:
            db.add_(other_db)
    dscale = torch.tensordot(a, da, dims=2) if need[2] else None  # no [rows, D] temporary
    return loss, (da if need[0] else None, db, dscale, dbias if need[3] else None)


def check_siglip(image, text, logit_scale, logit_bias, offset, out_dtype) -> None:
    """One ValueError line naming the problem, for the torch path and the Triton kernel alike."""
    for name, t in (("image", image), ("text", text)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or 0 in t.shape:
            raise ValueError(f"{name} must be a non-empty 2-D [rows, dim] tensor, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if image.shape[1] != text.shape[1]:
        raise ValueError(f"image has dim {image.shape[1]} but text has dim {text.shape[1]}")
    if image.dtype != text.dtype:
        raise ValueError(f"image is {image.dtype} but text is {text.dtype}")
    if image.device != text.device:
        raise ValueError(f"image is on {image.device} but text is on {text.device}")
    for name, t in (("logit_scale", logit_scale), ("logit_bias", logit_bias)):
        if not isinstance(t, torch.Tensor) or t.numel() != 1 or not t.is_floating_point():
            raise ValueError(f"{name} must be a one-element floating tensor, got {_describe(t)}")
        if t.device != image.device:
            raise ValueError(f"{name} is on {t.device} but the features are on {image.device}")
    last = text.shape[0] - image.shape[0]
    if offset is not None and (isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= last):
        raise ValueError(f"offset must be None or an int in [0, {last}] (text rows - image rows), got {offset!r}")
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise ValueError(f"out_dtype must be a floating torch.dtype or None, got {out_dtype!r}")


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def siglip_loss(image, text, logit_scale, logit_bias, offset=0, *, out_dtype=None, block=None):
    """``(1/B) * sum_ij softplus(-y_ij * (s * image_i . text_j + bias))`` without the logits.

    ``image`` [B, D], ``text`` [N, D] of one floating dtype; ``logit_scale`` (``s``, already
    exponentiated, as OpenCLIP passes it) and ``logit_bias``: one-element floating tensors;
    ``offset``: image row i's positive is text row ``offset + i`` (``0 <= offset <= N - B``),
    None for no positives at all. ``out_dtype``: the loss's dtype (None: the inputs').
    ``block``: (rows, columns) of one logits tile, for tests (None: sized for the cache and the
    worker threads). Gradients, when any input requires one and grad mode is on, are computed
    here in the forward; see the module docstring.
    """
    check_siglip(image, text, logit_scale, logit_bias, offset, out_dtype)
    if block is not None and (len(block) != 2 or min(block) < 1):
        raise ValueError(f"block must be (rows, columns) >= 1, got {block!r}")
    scale, bias = logit_scale.reshape(()), logit_bias.reshape(())
    return _SigLip.apply(image, text, scale, bias, offset, torch.is_grad_enabled(), out_dtype, block)


def siglip_loss_dense(image, text, logit_scale, logit_bias, offset=0):
    """The textbook dense form, for tests: stores the full ``[B, N]`` logits."""
    logits = logit_scale * image @ text.T + logit_bias
    labels = -torch.ones_like(logits)
    if offset is not None:
        idx = torch.arange(image.shape[0], device=image.device)
        labels[idx, idx + offset] = 1.0
    return -F.logsigmoid(labels * logits).sum() / image.shape[0]
