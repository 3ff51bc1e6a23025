"""The trainer's configuration: dataclasses that compose the consumers' own configs, YAML presets
from ``configs/`` and dotted ``key=value`` overrides.

``load_config("demo", ["optim.lr=3e-4", "steps=200"])`` reads ``configs/demo.yaml`` (or any YAML
path), applies the overrides (values parsed as YAML: ``3e-4``, ``[0.9, 0.98]``, ``null``) and
returns a :class:`TrainConfig`. Every key must exist: an unknown one fails at once with its full
dotted name and the keys that do exist at that level. Sections:

- top level: ``run_dir``, ``steps``, ``checkpoint_every``, ``resume`` (``auto`` | ``never`` | a
  checkpoint path), ``allow_config_change`` (keys a resume may change, see
  ``declip_fast.train.validate.RESUME_KEYS``), ``seed`` and the run's switches (device,
  precision, logging, stability);
- ``model``: :class:`ModelConfig` (a preset of ``declip_fast.models.presets`` plus overrides);
- ``loss``: ``declip_fast.losses.DeCLIPLossConfig`` (term weights, queue size), or a preset name;
- ``data``: ``declip_fast.data.loader.DataConfig``;
- ``optim``: ``declip_fast.train.optim.OptimConfig``;
- ``eval``: :class:`EvalConfig` (zero-shot at the end of training).

Values are checked here, with the dotted key in every message (``declip_fast.train.validate``):
finite numbers in range, exclusive keys, a known model preset; the checks that need the machine
or the data files come later, before training.

The resolved config is written to ``run_dir/config.yaml``; it loads back to the same config.
"""

from __future__ import annotations

import os
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from declip_fast import config
from declip_fast.atomic import atomic_write
from declip_fast.config import to_dict
from declip_fast.data.loader_config import DataConfig
from declip_fast.distributed.host_memory import SETTINGS as HOST_MEMORY_SETTINGS
from declip_fast.losses.declip import DeCLIPLossConfig
from declip_fast.models.model_config import ModelConfig  # defined with the models (eval reads it)
from declip_fast.train.errors import ConfigError
from declip_fast.train.optim import OptimConfig
from declip_fast.train.validate import check_values

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"  # the repository's presets


@dataclass
class EvalConfig:
    zeroshot: bool = True  # at the end of training, when ``data`` is set
    data: str | None = None  # labelled .beton (with <stem>_labels.npy) or an ImageFolder-layout folder
    classes: str | None = None  # classes.json with class names (and prompts, as the demo's has)
    batch_size: int = 256


@dataclass
class TrainConfig:
    run_dir: str = "runs/demo"
    steps: int = 1000
    checkpoint_every: int = 500
    resume: str = "auto"  # auto | never | path to a checkpoint folder
    seed: int = 0
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    host_memory: str = "retain"  # retain | system: CPU runs keep freed memory (distributed.host_memory)
    precision: str = "fp32"  # fp32 | bf16 (FSDP2 mixed precision: bf16 compute, fp32 reduce)
    log_every: int = 1  # metrics rows are written every step; the console/TensorBoard every N
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True  # PNG of the loss curves (and zero-shot accuracy) at the end
    max_bad_steps: int = 5  # non-finite steps in a row before rolling back to the last checkpoint
    max_rollbacks: int = 3  # then give up with an error
    allow_config_change: tuple[str, ...] = ()  # keys a resume may change ("all": any); else refused
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: DeCLIPLossConfig = field(default_factory=DeCLIPLossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        if self.steps < 1 or self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError(
                f"steps, checkpoint_every and log_every must be >= 1, got "
                f"{self.steps}, {self.checkpoint_every}, {self.log_every}"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.host_memory not in HOST_MEMORY_SETTINGS:
            raise ValueError(f"host_memory must be retain or system, got {self.host_memory!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if not isinstance(self.resume, str) or not self.resume:
            raise ValueError(f"resume must be auto, never or a checkpoint path, got {self.resume!r}")
        if isinstance(self.allow_config_change, str):
            self.allow_config_change = (self.allow_config_change,)
        self.allow_config_change = tuple(str(k) for k in self.allow_config_change or ())


# --------------------------------------------------------------------------- presets and overrides


def preset_path(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
        raise FileNotFoundError(f"no config preset {name_or_path!r} (presets in {CONFIG_DIR}: {known})")
    return candidate


def apply_override(values: dict, text: str) -> None:
    """``a.b.c=value`` into the nested dict of a :class:`TrainConfig` (``declip_fast.config``)."""
    config.apply_override(values, text, TrainConfig)


def from_dict(cls, values: dict, prefix: str = ""):
    """``declip_fast.config.from_dict``, its errors as :class:`ConfigError` (exit status 2)."""
    try:
        return config.from_dict(cls, values, prefix)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None


def load_config(name_or_path: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """The preset (or YAML file), then the dotted overrides, checked (module docstring)."""
    path = preset_path(name_or_path)
    values = config.load_yaml(path)
    upgrade_keys(values)
    for text in overrides:
        apply_override(values, text)
    upgrade_keys(values)
    result = from_dict(TrainConfig, values)
    check_values(result)
    return result


def upgrade_keys(values: dict) -> None:
    """Keys of earlier releases, rewritten with a warning (removed in the next release):
    ``demo_data: DIR`` was the demo's data folder; the demo preset now names its files."""
    if "demo_data" in values:
        folder = values.pop("demo_data")
        warnings.warn(
            "the config key demo_data is deprecated: set data.beton, eval.data and eval.classes "
            "(configs/demo.yaml shows how)",
            FutureWarning,
            stacklevel=3,
        )
        if folder is not None:
            data, ev = values.setdefault("data", {}), values.setdefault("eval", {})
            data["beton"] = f"{folder}/train.beton"
            ev["data"], ev["classes"] = f"{folder}/test.beton", f"{folder}/classes.json"


def save_config(train_config: TrainConfig, path: str | os.PathLike) -> None:
    text = config.dump_yaml(train_config)
    atomic_write(path, lambda tmp: tmp.write_text(text))


__all__ = [
    "EvalConfig",
    "ModelConfig",
    "TrainConfig",
    "apply_override",
    "from_dict",
    "load_config",
    "preset_path",
    "save_config",
    "to_dict",
]
