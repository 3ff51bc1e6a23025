"""``ModelConfig``: which model preset a run builds (the ``model`` section of a run's config).

It lives with the models, not in ``declip_fast.train.config`` (which re-exports it), so that
``declip_fast.eval`` can read a run's model from its ``config.yaml`` without importing ``train``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    preset: str = "declip_tiny"  # declip_fast.models.presets name
    overrides: dict = field(default_factory=dict)  # DeCLIPConfig fields, e.g. {vision: {image_size: 32}}
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile each block (before FSDP wraps it)
