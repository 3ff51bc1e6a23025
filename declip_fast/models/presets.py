"""Named model configurations and ``build``.

Paper models (the towers the DeCLIP paper trains): ``declip_r50`` (embed 1024), ``declip_vit_b32``
and ``declip_vit_b16`` (embed 512), each with SimSiam heads (1024 / 512) and the MLM head;
``clip_*`` are the same towers without heads. Both towers use QuickGELU, as CLIP's and DeCLIP's
released weights do (``act="gelu"`` is an override away). The vocabulary is CLIP's plus ``<mask>`` everywhere, so one
tokenizer serves all presets.

Tiny CPU variants for tests and the demo: ``declip_tiny`` / ``clip_tiny`` (ViT, patch 8 on 32x32
images, width 64, 2 layers; text width 64, 2 layers, context 32) and ``declip_tiny_rn`` (a
one-block-per-stage ResNet of width 8 on 32x32 images, to exercise the RN50 code path).

``build(name, device=None, **overrides)``: overrides replace fields of ``DeCLIPConfig``; a dict
value updates a nested config, e.g. ``build("declip_tiny", vision={"image_size": 28,
"patch_size": 7}, mlm=False)``. With ``device="meta"`` nothing is allocated or initialised for
real (the FSDP2 flow: build on meta, shard, ``to_empty``, ``init_weights``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import torch

from declip_fast.models.declip import DeCLIP, DeCLIPConfig
from declip_fast.models.heads import SimSiamConfig
from declip_fast.models.resnet import ResNetConfig
from declip_fast.models.text import TextConfig
from declip_fast.models.vision import ViTConfig


def _paper(vision, embed_dim: int, declip: bool) -> DeCLIPConfig:
    return DeCLIPConfig(
        embed_dim=embed_dim,
        vision=vision,
        text=TextConfig(),
        simsiam=SimSiamConfig(1024, 512) if declip else None,
        mlm=declip,
    )


def _tiny(vision) -> DeCLIPConfig:
    # Context 77 like the real towers: the .beton files and the loaders hold 77 tokens per caption.
    text = TextConfig(context_length=77, width=64, heads=4, layers=2)
    return DeCLIPConfig(embed_dim=64, vision=vision, text=text, simsiam=SimSiamConfig(64, 32), mlm=True)


def declip_r50() -> DeCLIPConfig:
    return _paper(ResNetConfig(), 1024, declip=True)


def declip_vit_b32() -> DeCLIPConfig:
    return _paper(ViTConfig(patch_size=32), 512, declip=True)


def declip_vit_b16() -> DeCLIPConfig:
    return _paper(ViTConfig(patch_size=16), 512, declip=True)


def clip_r50() -> DeCLIPConfig:
    return _paper(ResNetConfig(), 1024, declip=False)


def clip_vit_b32() -> DeCLIPConfig:
    return _paper(ViTConfig(patch_size=32), 512, declip=False)


def clip_vit_b16() -> DeCLIPConfig:
    return _paper(ViTConfig(patch_size=16), 512, declip=False)


def declip_tiny() -> DeCLIPConfig:
    vision = ViTConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4)
    return _tiny(vision)


def clip_tiny() -> DeCLIPConfig:
    return dataclasses.replace(declip_tiny(), simsiam=None, mlm=False)


def declip_tiny_rn() -> DeCLIPConfig:
    vision = ResNetConfig(layers=(1, 1, 1, 1), width=8, image_size=32, heads=4)
    return _tiny(vision)


PRESETS: dict[str, Callable[[], DeCLIPConfig]] = {
    f.__name__: f
    for f in (
        declip_r50,
        declip_vit_b32,
        declip_vit_b16,
        clip_r50,
        clip_vit_b32,
        clip_vit_b16,
        declip_tiny,
        clip_tiny,
        declip_tiny_rn,
    )
}


def list_presets() -> list[str]:
    return list(PRESETS)


def get_config(name: str, **overrides) -> DeCLIPConfig:
    """The preset's config with ``overrides`` applied (nested dicts update nested configs; values
    are checked and coerced to each field's type by ``declip_fast.config.merge``)."""
    return resolve(name, overrides)


def resolve(name: str, overrides: dict, prefix: str = "") -> DeCLIPConfig:
    """:func:`get_config` with a dotted ``prefix`` for the overrides' error messages."""
    from declip_fast.config import merge

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {list_presets()}")
    return merge(PRESETS[name](), overrides, prefix)


def build(name: str, device: torch.device | str | None = None, **overrides) -> DeCLIP:
    """Build preset ``name`` (see ``get_config``) with its parameters on ``device``."""
    cfg = get_config(name, **overrides)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return DeCLIP(cfg)
