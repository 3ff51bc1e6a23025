"""``ModelConfig``: which model preset a run builds (the ``model`` section of a run's config).

It lives with the models, not in ``declip_fast.train.config`` (which re-exports it), so that
``declip_fast.eval`` can read a run's model from its ``config.yaml`` without importing ``train``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """A model preset, then overrides of its ``DeCLIPConfig`` fields, checked when the config is
    made (an unknown field, a value of the wrong type or an unknown preset is a ValueError naming
    the dotted key), so a typo in ``model.*`` fails at parse time, not after minutes of set-up.
    :meth:`architecture` is the resolved model config (what ``--print-config`` shows)."""

    preset: str = "declip_tiny"  # declip_fast.models.presets name
    overrides: dict = field(default_factory=dict)  # DeCLIPConfig fields, e.g. {vision: {image_size: 32}}
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile each block (before FSDP wraps it)

    def __post_init__(self):
        if not isinstance(self.overrides, dict):
            raise ValueError(f"model.overrides must be a mapping of DeCLIPConfig fields, got {self.overrides!r}")
        self.architecture()

    def architecture(self):
        """The ``DeCLIPConfig`` this section builds: the preset's, then ``overrides``."""
        from declip_fast.models import presets

        if self.preset not in presets.PRESETS:
            raise ValueError(f"model.preset: unknown preset {self.preset!r}; choose one of {presets.list_presets()}")
        return presets.resolve(self.preset, self.overrides, "model.overrides.")
