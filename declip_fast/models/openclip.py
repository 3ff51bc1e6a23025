"""Conversion to and from OpenCLIP's ``CLIP`` models (RN50, ViT-B-32, ViT-B-16 and their kin).

The towers use OpenCLIP's parameter names, so conversion is a key prefix and one row:

- OpenCLIP keeps the text tower's parts on the model itself (``transformer.*``,
  ``token_embedding.weight``, ``positional_embedding``, ``ln_final.*``, ``text_projection``); ours
  live under ``text.``. ``visual.*`` is the same on both sides.
- ``logit_scale`` is a scalar in OpenCLIP (by default) and ``[1]`` here, for FSDP2.
- Our token embedding has one more row, ``<mask>`` (id 49408, after CLIP's 49,408 ids). From
  OpenCLIP it is added, initialised like the other rows at build time (N(0, 0.02)); back to
  OpenCLIP it is dropped, as are the DeCLIP heads (``projector``, ``predictor``, ``mlm_head``).

Nothing here imports open_clip: models are read by duck typing, and anything this codebase does
not implement (layer scale, attentional pooling, patch dropout, custom blocks, logit bias, ...)
raises ``ValueError`` instead of converting to a model that silently computes something else.
"""

from __future__ import annotations

import torch
from torch import nn

from declip_fast.models.declip import DeCLIP, DeCLIPConfig, reset_all_parameters
from declip_fast.models.heads import SimSiamConfig
from declip_fast.models.resnet import ResNetConfig
from declip_fast.models.text import TextConfig
from declip_fast.models.vision import ViTConfig

_TEXT_KEYS = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection")
_HEAD_PREFIXES = ("projector.", "predictor.", "mlm_head.")


def _activation(block: nn.Module) -> str:
    act = block.mlp.gelu
    if type(act).__name__ == "QuickGELU":
        return "quick_gelu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    raise ValueError(f"unsupported activation {act!r}")


def _check_transformer(transformer: nn.Module, where: str) -> None:
    for block in transformer.resblocks:
        if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
            raise ValueError(f"{where}: only OpenCLIP's default ResidualAttentionBlock is supported")
        for name in ("ls_1", "ls_2"):
            if not isinstance(getattr(block, name, nn.Identity()), nn.Identity):
                raise ValueError(f"{where}: layer scale is not supported")
        for ln in (block.ln_1, block.ln_2):
            if ln.eps != 1e-5:
                raise ValueError(f"{where}: layer-norm eps {ln.eps} (only 1e-5 is supported)")


def _vit_config(visual: nn.Module) -> ViTConfig:
    unsupported = {
        "attentional pooling": getattr(visual, "attn_pool", None) is not None,
        f"pool_type={getattr(visual, 'pool_type', 'tok')!r}": getattr(visual, "pool_type", "tok") != "tok",
        "final_ln_after_pool": getattr(visual, "final_ln_after_pool", False),
        "patch dropout": not isinstance(getattr(visual, "patch_dropout", nn.Identity()), nn.Identity),
        "no ln_pre": isinstance(visual.ln_pre, nn.Identity),
        "no projection": visual.proj is None,
        "non-square images or patches": len(set(visual.image_size)) != 1 or len(set(visual.patch_size)) != 1,
    }
    bad = [name for name, flag in unsupported.items() if flag]
    if bad:
        raise ValueError(f"unsupported OpenCLIP vision tower features: {bad}")
    _check_transformer(visual.transformer, "vision tower")
    block = visual.transformer.resblocks[0]
    width = visual.conv1.out_channels
    return ViTConfig(
        image_size=visual.image_size[0],
        patch_size=visual.patch_size[0],
        width=width,
        layers=len(visual.transformer.resblocks),
        heads=block.attn.num_heads,
        mlp_ratio=block.mlp.c_fc.out_features / width,
        act=_activation(block),
    )


def _resnet_config(visual: nn.Module) -> ResNetConfig:
    layers = tuple(len(getattr(visual, f"layer{i}")) for i in range(1, 5))
    image_size = visual.image_size
    if isinstance(image_size, (tuple, list)):
        if len(set(image_size)) != 1:
            raise ValueError(f"non-square image size {image_size} is not supported")
        image_size = image_size[0]
    return ResNetConfig(
        layers=layers, width=visual.conv3.out_channels, image_size=image_size, heads=visual.attnpool.num_heads
    )


def _text_config(model: nn.Module) -> TextConfig:
    if getattr(model, "attn_mask", None) is None:
        raise ValueError("text tower without a causal mask is not supported")
    if not isinstance(model.text_projection, nn.Parameter):
        raise ValueError("text_projection must be a plain matrix (no Linear / bias)")
    if model.ln_final.eps != 1e-5:
        raise ValueError(f"ln_final eps {model.ln_final.eps} (only 1e-5 is supported)")
    vocab = model.token_embedding.num_embeddings
    pool = getattr(model, "text_pool_type", "argmax")
    if pool == "argmax":
        eot_id = vocab - 1  # argmax pooling finds EOT because it is the largest id
    elif pool == "eos":
        eot_id = model.text_eos_id
    else:
        raise ValueError(f"text pool type {pool!r} is not supported")
    _check_transformer(model.transformer, "text tower")
    block = model.transformer.resblocks[0]
    width = model.transformer.width
    return TextConfig(
        context_length=model.positional_embedding.shape[0],
        vocab_size=vocab + 1,  # + <mask>
        width=width,
        heads=block.attn.num_heads,
        layers=len(model.transformer.resblocks),
        mlp_ratio=block.mlp.c_fc.out_features / width,
        act=_activation(block),
        eot_id=eot_id,
    )


def config_from_openclip(model: nn.Module) -> DeCLIPConfig:
    """The ``DeCLIPConfig`` (no heads) matching an OpenCLIP ``CLIP`` model's architecture."""
    if not hasattr(model, "visual") or not hasattr(model, "token_embedding"):
        kind = type(model).__name__
        raise ValueError(f"expected an OpenCLIP CLIP model, got {kind} (CustomTextCLIP, CoCa: not supported)")
    if getattr(model, "logit_bias", None) is not None:
        raise ValueError("models with a logit bias (SigLIP) are not supported")
    visual = model.visual
    if hasattr(visual, "attnpool"):
        vision, embed = _resnet_config(visual), visual.attnpool.c_proj.out_features
    elif hasattr(visual, "class_embedding"):
        vision, embed = _vit_config(visual), visual.proj.shape[1]
    else:
        raise ValueError(f"unsupported image tower {type(visual).__name__} (timm towers: no)")
    return DeCLIPConfig(embed_dim=embed, vision=vision, text=_text_config(model))


def openclip_to_declip_state_dict(
    state_dict: dict[str, torch.Tensor], vocab_size: int, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """OpenCLIP ``CLIP`` state dict -> ours (no heads): ``text.`` prefix, padded token embedding."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(_TEXT_KEYS):
            key = "text." + key
        elif key == "logit_scale":
            value = value.reshape(1)  # ours is [1] (FSDP2 shards no 0-dim parameter)
        elif not key.startswith("visual."):
            raise ValueError(f"unexpected OpenCLIP key {key!r}")
        out[key] = value
    emb = out["text.token_embedding.weight"]
    extra = vocab_size - emb.shape[0]
    if extra < 0:
        raise ValueError(f"OpenCLIP vocabulary {emb.shape[0]} is larger than ours ({vocab_size})")
    if extra:
        rows = torch.empty(extra, emb.shape[1], dtype=emb.dtype, device=emb.device)
        rows.normal_(0.0, 0.02, generator=generator)  # TextTransformer's token-embedding init
        out["text.token_embedding.weight"] = torch.cat([emb, rows])
    return out


def to_openclip_state_dict(model: DeCLIP, openclip_vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """Our model's state dict in OpenCLIP ``CLIP`` form: heads and the ``<mask>`` row dropped.

    ``openclip_vocab_size`` defaults to ours minus the one ``<mask>`` row (49,408 for CLIP).
    ``logit_scale`` comes back 0-dim (models built with ``nonscalar_logit_scale=True`` want it
    reshaped to ``[1]``).
    """
    vocab = openclip_vocab_size if openclip_vocab_size is not None else model.config.text.vocab_size - 1
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith(_HEAD_PREFIXES):
            continue
        if key.startswith("text."):
            key = key[len("text.") :]
        out[key] = value
    out["token_embedding.weight"] = out["token_embedding.weight"][:vocab]
    out["logit_scale"] = out["logit_scale"].reshape(())  # OpenCLIP's default scalar
    return out


def from_openclip(
    openclip_model: nn.Module,
    *,
    simsiam: SimSiamConfig | None = None,
    mlm: bool = False,
    attn_backend: str = "auto",
    generator: torch.Generator | None = None,
) -> DeCLIP:
    """Our model with ``openclip_model``'s architecture and weights (heads, if asked, freshly
    initialised), on its device, in training mode. Tensors keep their dtypes: convert an fp32
    model (OpenCLIP's fp16/bf16 casts leave some tensors in fp32; call ``.float()`` first)."""
    cfg = config_from_openclip(openclip_model)
    cfg.simsiam, cfg.mlm, cfg.attn_backend = simsiam, mlm, attn_backend
    param = next(openclip_model.parameters())
    # Build on meta and adopt the converted tensors (assign=True): no initialisation work for
    # weights that are overwritten anyway. Copies, so the two models never share storage.
    with torch.device("meta"):
        model = DeCLIP(cfg)
    state = openclip_to_declip_state_dict(openclip_model.state_dict(), cfg.text.vocab_size, generator)
    state = {k: v.detach().clone() for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    not_heads = [k for k in missing if not k.startswith(_HEAD_PREFIXES)]
    if not_heads or unexpected:
        raise ValueError(f"state-dict mismatch: missing {not_heads}, unexpected {unexpected}")
    for head in (model.projector, model.predictor, model.mlm_head):
        if head is not None:
            head.to_empty(device=param.device)
            reset_all_parameters(head)
            head.to(dtype=param.dtype)
    return model
