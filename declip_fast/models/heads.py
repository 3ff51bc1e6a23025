"""DeCLIP's extra heads: SimSiam projector and predictor (image self-supervision) and the MLM
head (text self-supervision).

SimSiam: projector Linear(d, h)+BN+ReLU, Linear(h, h)+BN+ReLU, Linear(h, h)+BN;
predictor Linear(h, p)+BN+ReLU, Linear(p, h), with h = 1024, p = 512 for the paper models. A
Linear followed by batch norm has no bias: BN subtracts the batch mean, so the bias could never
matter (the official SimSiam code drops it too). Under data parallelism the trainer converts these
BNs to global-batch ones (``declip_fast.distributed.batchnorm.convert``, which also runs on gloo);
models never import torch.distributed.

MLM: a BERT-style transform (Linear(W, W), GELU, LayerNorm) then Linear(W, vocab). It runs only
on the positions it is given, gathered *before* the transform: at B = 128, 77 tokens, vocab 49,409,
fp32 logits for every position would cost ~2 GB; the chosen positions (15% of the caption's own
tokens, a few per caption) cost a few percent of that. Its loss is the kernel-level fused linear
cross-entropy (``declip_fast.kernels.linear_cross_entropy``), which never stores even those logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from declip_fast import kernels
from declip_fast.kernels.linear_ce import IGNORE_INDEX


@dataclass
class SimSiamConfig:
    dim: int = 1024  # projector hidden and output width
    pred_dim: int = 512  # predictor bottleneck


class SimSiamProjector(nn.Module):
    def __init__(self, in_dim: int, dim: int = 1024):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(in_dim, dim, bias=False), nn.BatchNorm1d(dim)
        self.fc2, self.bn2 = nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim)
        self.fc3, self.bn3 = nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.fc1(x)))
        x = self.act(self.bn2(self.fc2(x)))
        return self.bn3(self.fc3(x))


class SimSiamPredictor(nn.Module):
    def __init__(self, dim: int = 1024, pred_dim: int = 512):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(pred_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.bn1(self.fc1(x))))


def gather_positions(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows of ``states [B, L, W]`` at ``positions``: ``[K, W]``, in row-major (b, l) order.

    ``positions`` is either a bool mask ``[B, L]`` or int64 flat indices ``b * L + l`` of shape
    ``[K]``. The index form has no data-dependent shape, so it does not break a torch.compile graph
    and needs no device sync; the mask form costs one ``nonzero``. ``flat_positions`` converts.
    MLM targets line up with ``targets[mask]`` or ``targets.view(-1)[indices]``.
    """
    b, n, w = states.shape
    flat = states.reshape(b * n, w)
    if positions.dtype == torch.bool:
        if positions.shape != (b, n):
            raise ValueError(f"mask shape {tuple(positions.shape)} does not match states {(b, n)}")
        return flat[positions.reshape(-1)]
    if positions.dim() != 1 or positions.is_floating_point():
        raise ValueError(
            f"positions must be a bool [B, L] mask or int flat indices [K], got {positions.dtype} "
            f"{tuple(positions.shape)}"
        )
    return flat.index_select(0, positions)


def flat_positions(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, L]`` mask -> int64 flat indices ``[K]`` (row-major), for ``gather_positions``."""
    return mask.reshape(-1).nonzero().squeeze(1)


class MLMHead(nn.Module):
    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.act = nn.GELU()
        self.ln = nn.LayerNorm(width)
        self.decoder = nn.Linear(width, vocab_size)

    def forward(self, states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits ``[K, vocab]`` for the K chosen positions of ``states [B, L, W]`` only."""
        return self.decoder(self._transform(states, positions))

    def loss(self, states: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor, return_count: bool = False):
        """Mean cross-entropy at the chosen positions, without storing their ``[K, vocab]`` logits
        (``kernels.linear_cross_entropy``): equal to ``F.cross_entropy(self(states, positions),
        targets)`` with ``ignore_index=-100``, in ~half the time on the CPU and a fraction of the
        memory.

        ``targets``: ``[K]`` in the order of the gathered positions, or ``[B, L]`` aligned with
        ``states`` (then read at ``positions``). Runs inside this module so FSDP2 has the
        decoder's weight unsharded. ``return_count``: also the number of positions that count
        (targets not -100), for a mean over several ranks.
        """
        if targets.dim() == 2:
            targets = gather_positions(targets.unsqueeze(-1), positions).squeeze(-1)
        x = self._transform(states, positions)
        loss = kernels.linear_cross_entropy(x, self.decoder.weight, self.decoder.bias, targets, IGNORE_INDEX)
        return (loss, (targets != IGNORE_INDEX).sum()) if return_count else loss

    def _transform(self, states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.ln(self.act(self.dense(gather_positions(states, positions))))
