"""The ViT image tower (ViT-B/32, ViT-B/16), with OpenCLIP's ``VisionTransformer`` names.

conv1 (patch embedding, no bias) -> [class_embedding; patches] + positional_embedding -> ln_pre
-> transformer -> ln_post on the class token -> @ proj. ``ln_post`` runs on the class token only:
layer norm is per token, so this equals OpenCLIP's normalise-all-then-pick at 1/(grid^2 + 1) of
the cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from declip_fast.models.attention import Backend
from declip_fast.models.init import normal_
from declip_fast.models.transformer import Transformer


@dataclass
class ViTConfig:
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"


class VisionTransformer(nn.Module):
    # Images in a batch do not interact (layer norm, not batch norm): views may share one forward.
    batch_independent = True

    def __init__(self, cfg: ViTConfig, output_dim: int, *, attn_backend: Backend = "auto"):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg, self.output_dim = cfg, output_dim
        self.grid_size = cfg.image_size // cfg.patch_size
        width = cfg.width
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(self.grid_size**2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(
            width, cfg.layers, cfg.heads, mlp_ratio=cfg.mlp_ratio, act=cfg.act, attn_backend=attn_backend
        )
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, output_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        scale = self.cfg.width**-0.5  # CLIP's: class/positional embeddings and proj ~ N(0, W^-1/2)
        normal_(self.class_embedding, std=scale)
        normal_(self.positional_embedding, std=scale)
        normal_(self.proj, std=scale)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.set_grad_checkpointing(enable)

    def blocks(self) -> list[nn.Module]:
        return list(self.transformer.resblocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images).flatten(2).transpose(1, 2)  # [B, grid^2, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj
