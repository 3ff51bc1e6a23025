"""CLIP's modified ResNet (RN50) image tower, with OpenCLIP's ``ModifiedResNet`` names.

Differences from torchvision's ResNet, as in CLIP:
- a 3-conv stem (stride-2 conv, two 3x3 convs) followed by a 2x2 average pool, no max pool;
- anti-aliased downsampling: every strided step is an average pool followed by a stride-1 conv
  (after conv2 in the main path, before the 1x1 conv in the shortcut);
- attention pooling: the mean token plus the 7x7 grid, with a learned positional embedding,
  attended by the mean token (``attnpool``: ``q_proj``/``k_proj``/``v_proj``/``c_proj``).

Speed: OpenCLIP runs the attention pool for all HW+1 queries and keeps the first output. We
project and attend with that one query only (q and c_proj on 1 token instead of 50); the result is
the same up to float rounding.

Batch norm makes the tower batch-dependent in training mode: DeCLIP runs the two image views
through it separately then (each view gets its own batch statistics, as in SimSiam), and may fuse
them into one forward in eval mode. Activation checkpointing is not offered here: recomputing a
block would update the batch-norm running statistics twice.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from declip_fast.models.attention import Backend, attention
from declip_fast.models.init import normal_


@dataclass
class ResNetConfig:
    layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    width: int = 64
    image_size: int = 224
    heads: int = 32  # attention-pool heads: CLIP uses width * 32 / 64 (head width 64)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != out:
            # "-1", "0", "1": OpenCLIP's keys (pool, conv, norm), so its state dict loads unchanged.
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, out, 1, bias=False)),
                        ("1", nn.BatchNorm2d(out)),
                    ]
                )
            )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.bn3.weight)  # each residual branch starts as zero: the block is identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.act3(out + identity)


class AttentionPool2d(nn.Module):
    def __init__(self, spatial: int, embed_dim: int, heads: int, output_dim: int, attn_backend: Backend):
        super().__init__()
        if embed_dim % heads:
            raise ValueError(f"attention-pool width {embed_dim} is not divisible by {heads} heads")
        self.heads, self.attn_backend = heads, attn_backend
        self.positional_embedding = nn.Parameter(torch.empty(spatial**2 + 1, embed_dim))
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.c_proj.in_features**-0.5  # CLIP's initialisation
        normal_(self.positional_embedding, std=std)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.c_proj):
            normal_(proj.weight, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        head_dim = c // self.heads
        q = self.q_proj(x[:, :1]).view(b, 1, self.heads, head_dim)  # only the mean token's query
        k = self.k_proj(x).view(b, -1, self.heads, head_dim)
        v = self.v_proj(x).view(b, -1, self.heads, head_dim)
        out = attention(q, k, v, backend=self.attn_backend)  # [B, 1, H, D]
        return self.c_proj(out.reshape(b, c))


class ModifiedResNet(nn.Module):
    def __init__(self, cfg: ResNetConfig, output_dim: int, *, attn_backend: Backend = "auto"):
        super().__init__()
        if cfg.image_size % 32:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of 32")
        if len(cfg.layers) != 4:
            raise ValueError(f"layers must give 4 stage depths, got {cfg.layers}")
        self.cfg, self.output_dim = cfg, output_dim
        width = cfg.width
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.act3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        inplanes = width
        for i, blocks in enumerate(cfg.layers):
            planes, stride = width * 2**i, 1 if i == 0 else 2
            stage = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))

        self.attnpool = AttentionPool2d(cfg.image_size // 32, width * 32, cfg.heads, output_dim, attn_backend)

    @property
    def batch_independent(self) -> bool:
        return not self.training  # batch norm uses batch statistics while training

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        pass  # see the module docstring: recomputation would double-count batch-norm statistics

    def blocks(self) -> list[nn.Module]:
        return [block for stage in (self.layer1, self.layer2, self.layer3, self.layer4) for block in stage]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)
