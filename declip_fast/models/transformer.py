"""The pre-LN residual block both towers share, and the stack of them.

Names follow OpenCLIP's ``ResidualAttentionBlock`` / ``Transformer`` (``resblocks.N.ln_1``,
``attn.in_proj_weight``, ``attn.out_proj``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``) so state
dicts map 1:1. Always batch-first ``[B, L, W]``.

Activation checkpointing is per block (``torch.utils.checkpoint``, ``use_reentrant=False``, which
composes with torch.compile and FSDP2): switch it with ``set_grad_checkpointing``. It only acts
while autograd records, so eval and ``no_grad`` runs pay nothing.

Initialisation (``reset_parameters``) is CLIP's text-tower scheme, applied to both towers:
qkv ~ N(0, W^-1/2), fc ~ N(0, (2W)^-1/2), both output projections ~ N(0, W^-1/2 (2 layers)^-1/2).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from declip_fast.models.attention import Attention, Backend
from declip_fast.models.init import normal_
from declip_fast.models.packing import PackPlan

ACTIVATIONS = ("quick_gelu", "gelu")


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.act = make_activation(act)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(
        self,
        width: int,
        heads: int,
        *,
        mlp_ratio: float = 4.0,
        act: str = "quick_gelu",
        causal: bool = False,
        attn_backend: Backend = "auto",
    ):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, causal=causal, backend=attn_backend)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), act)

    def forward(self, x: torch.Tensor, plan: PackPlan | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), plan)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        *,
        mlp_ratio: float = 4.0,
        act: str = "quick_gelu",
        causal: bool = False,
        attn_backend: Backend = "auto",
    ):
        super().__init__()
        self.width, self.layers = width, layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio=mlp_ratio, act=act, causal=causal, attn_backend=attn_backend)
            for _ in range(layers)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        attn_std = self.width**-0.5
        proj_std = attn_std * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            normal_(block.attn.in_proj_weight, std=attn_std)
            normal_(block.attn.out_proj.weight, std=proj_std)
            normal_(block.mlp.c_fc.weight, std=fc_std)
            normal_(block.mlp.c_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.in_proj_bias)
            for linear in (block.attn.out_proj, block.mlp.c_fc, block.mlp.c_proj):
                nn.init.zeros_(linear.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, x: torch.Tensor, plan: PackPlan | None = None) -> torch.Tensor:
        """``x [B, L, W]``, or packed captions ``[1, T, W]`` laid out by ``plan``."""
        use_checkpoint = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.resblocks:
            x = checkpoint(block, x, plan, use_reentrant=False) if use_checkpoint else block(x, plan)
        return x
