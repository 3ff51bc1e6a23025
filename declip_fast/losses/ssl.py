"""DeCLIP's self-supervised terms: SimSiam on the images (ISS), masked language modelling on the
texts (TSS). See ARCHITECTURE.md, "The DeCLIP objective"."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from declip_fast.kernels.linear_ce import IGNORE_INDEX


def _check_pair(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"{name}: expected two [B, D] tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")


class SimSiamLoss(nn.Module):
    """-1/2 (cos(p1, sg(z2)) + cos(p2, sg(z1))), averaged over the batch.

    ``p`` are the predictor outputs, ``z`` the projector outputs of the two image views; the
    stop-gradient is on the ``z`` side (SimSiam), so no gradient reaches a projector through the
    target branch. Range [-1, 1]; -1 when the predictions match the targets' directions.
    """

    def forward(self, p1, p2, z1, z2):
        _check_pair("SimSiam predictions", p1, p2)
        _check_pair("SimSiam projections", z1, z2)
        if p1.shape != z1.shape:
            raise ValueError(f"SimSiam: predictions {tuple(p1.shape)} vs projections {tuple(z1.shape)}")
        cos = lambda p, z: F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()
        return -0.5 * (cos(p1, z2) + cos(p2, z1))


class MLMLoss(nn.Module):
    """Cross-entropy over the masked positions only.

    Takes either the head's logits at the masked positions [K, V] with their targets [K], or
    logits over every position [B, L, V] with targets [B, L] that hold ``ignore_index`` where
    nothing was masked. With no masked position at all the loss is 0 and still connected to the
    graph (every rank runs the same backward).
    Logits are upcast to fp32 for the log-softmax.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.shape[:-1] != targets.shape or logits.dim() not in (2, 3):
            raise ValueError(f"MLM logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
        logits = logits.reshape(-1, logits.shape[-1])
        targets = targets.reshape(-1)
        # Sum over the kept positions / their count (at least 1): no host sync to ask whether
        # anything was masked, and 0 (not NaN) when nothing was.
        total = F.cross_entropy(logits.float(), targets, ignore_index=self.ignore_index, reduction="sum")
        return total / (targets != self.ignore_index).sum().clamp(min=1)
