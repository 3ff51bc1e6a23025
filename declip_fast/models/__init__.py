"""Model towers for DeCLIP / CLIP: attention backends, ViT, modified ResNet, text tower, heads.

Importing this package imports only torch: xformers is imported inside the attention call that
uses it, open_clip never (conversion reads OpenCLIP models by duck typing).

The attention function itself is ``declip_fast.models.attention.attention``; it is not
re-exported here, where its name would shadow its module.
"""

from declip_fast.models.attention import Attention, resolve_backend
from declip_fast.models.declip import DeCLIP, DeCLIPConfig
from declip_fast.models.heads import (
    MLMHead,
    SimSiamConfig,
    SimSiamPredictor,
    SimSiamProjector,
    flat_positions,
)
from declip_fast.models.openclip import (
    config_from_openclip,
    from_openclip,
    openclip_to_declip_state_dict,
    to_openclip_state_dict,
)
from declip_fast.models.presets import build, get_config, list_presets
from declip_fast.models.resnet import ModifiedResNet, ResNetConfig
from declip_fast.models.text import EOT_ID, MASK_ID, SOT_ID, VOCAB_SIZE, TextConfig, TextTransformer
from declip_fast.models.transformer import QuickGELU, ResidualAttentionBlock, Transformer
from declip_fast.models.vision import VisionTransformer, ViTConfig

__all__ = [
    "EOT_ID",
    "MASK_ID",
    "SOT_ID",
    "VOCAB_SIZE",
    "Attention",
    "DeCLIP",
    "DeCLIPConfig",
    "MLMHead",
    "ModifiedResNet",
    "QuickGELU",
    "ResNetConfig",
    "ResidualAttentionBlock",
    "SimSiamConfig",
    "SimSiamPredictor",
    "SimSiamProjector",
    "TextConfig",
    "TextTransformer",
    "Transformer",
    "ViTConfig",
    "VisionTransformer",
    "build",
    "config_from_openclip",
    "flat_positions",
    "from_openclip",
    "get_config",
    "list_presets",
    "openclip_to_declip_state_dict",
    "resolve_backend",
    "to_openclip_state_dict",
]
