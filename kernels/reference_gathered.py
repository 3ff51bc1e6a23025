"""Plain-torch reference of the contrastive loss's gathered mode: this rank's B rows against all
N gathered texts, the column statistics folded across ranks (one all-gather of per-column (max,
sum, sum of exp * logit) triples). The tile walk and the backward are the symmetric loss's, from
``reference_contrastive``; what is added is the fold and OpenCLIP's per-rank scale gradient.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from declip_fast.kernels.reference_common import no_autocast
from declip_fast.kernels.reference_contrastive import _backward, _check, _log_sum, _merge, _stats


class _GatheredContrastive(torch.autograd.Function):
    """This rank's share of the global-batch CLIP loss (see :func:`clip_loss_gathered`)."""

    @staticmethod
    def forward(ctx, q, k, scale, offset, group, block, out_dtype):
        with no_autocast(q.device.type):
            st = _stats(q, k, scale, offset, True, block, expect=True)
            col_m, col_s, col_u = _fold_across_ranks(st["col_m"], st["col_s"], st["col_u"], group)
            row_m, row_s, pos = st["row_m"], st["row_s"], st["pos"]
            b = row_m.shape[0]
            own = slice(offset, offset + b)
            loss = ((row_m - pos) + torch.log(row_s)).sum()
            loss = (loss + ((col_m[own] - pos) + torch.log(col_s[own])).sum()) / (2 * b)
            # d loss / d s of this rank's own terms (OpenCLIP's per-rank split): the softmax-
            # weighted mean logit of each own row and own column, minus the positives, over s.
            mean_logits = (st["row_u"] / row_s).sum() + (col_u[own] / col_s[own]).sum()
            ctx.dscale = (mean_logits / (2 * b) - pos.sum() / b) / scale.detach().to(pos.dtype)
        ctx.save_for_backward(q, k, scale, _log_sum(row_m, row_s), _log_sum(col_m, col_s))
        ctx.offset, ctx.symmetric, ctx.blocks = offset, True, st["blocks"]
        return loss.to(q.dtype if out_dtype is None else out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        # The feature gradients are those of the symmetric loss whose column log-sum-exps are
        # the global ones: d(sum of every rank's loss) / d(this rank's block of logits).
        with no_autocast(grad_loss.device.type):
            dq, dk, _, *rest = _backward(ctx, grad_loss)
        scale = ctx.saved_tensors[2]
        dscale = None
        if ctx.needs_input_grad[2]:
            dscale = (grad_loss.to(ctx.dscale.dtype) * ctx.dscale).to(scale.dtype).reshape(scale.shape)
        return dq, dk, dscale, *rest


def _fold_across_ranks(col_m, col_s, col_u, group):
    """Column (max, sum, sum of exp * logit) over every rank's rows: one all-gather of the N
    triples, folded in rank order (the same bits on every rank). Without an initialized process
    group (or with one rank) this process holds every row: nothing to fold."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return col_m, col_s, col_u
    mine = torch.stack([col_m, col_s, col_u])
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    m, sums = parts[0][0], tuple(parts[0][1:])
    for other in parts[1:]:
        m, sums = _merge(m, sums, other[0], tuple(other[1:]))
    return (m, *sums)


def clip_loss_gathered(local_image, all_text, logit_scale, offset: int, group=None, block=None, *, out_dtype=None):
    """This rank's share of the global-batch CLIP loss: its B rows against all N gathered texts.

    The semantics of ``declip_fast.kernels.contrastive.clip_loss_gathered``: ``all_text`` is
    gathered with gradient (its backward sums the column gradients into their owners) and
    ``offset`` is rank * B. Column log-sum-exps are folded across the ranks of ``group`` with one
    all-gather of per-column (max, sum, sum of exp * logit) triples. The value is OpenCLIP's
    local loss of this rank, ``(CE(s I_r T^T, offset + i) + CE(s T_r I^T, offset + i)) / 2``;
    the feature gradients (after the gather's backward) are OpenCLIP's, and so is each rank's
    logit_scale gradient (the third statistic gives this rank's column terms' share; the Triton
    kernel splits it across ranks differently, with the same average). Averaged over ranks, the
    gradients are those of the single-process loss over the global batch. No image gather.
    """
    _check(local_image, all_text, offset, out_dtype)
    if local_image.shape[1] != all_text.shape[1]:
        raise ValueError(f"local_image has dim {local_image.shape[1]}, all_text {all_text.shape[1]}")
    return _GatheredContrastive.apply(local_image, all_text, logit_scale, offset, group, block, out_dtype)
