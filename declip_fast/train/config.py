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

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from declip_fast.atomic import atomic_write
from declip_fast.data.loader import DataConfig
from declip_fast.losses.declip import PRESETS as LOSS_PRESETS
from declip_fast.losses.declip import DeCLIPLossConfig
from declip_fast.models.model_config import ModelConfig  # defined with the models (eval reads it)
from declip_fast.train.errors import ConfigError
from declip_fast.train.optim import OptimConfig
from declip_fast.train.validate import check_values

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"  # the repository's presets


@dataclass
class EvalConfig:
    zeroshot: bool = True  # at the end of training, when ``data`` is set
    data: str | None = None  # labelled .beton (with <stem>_labels.npy) or ImageFolder; "demo": the demo test split
    classes: str | None = None  # classes.json with class names and prompts (demo: the demo's)
    batch_size: int = 256


@dataclass
class TrainConfig:
    run_dir: str = "runs/demo"
    steps: int = 1000
    checkpoint_every: int = 500
    resume: str = "auto"  # auto | never | path to a checkpoint folder
    seed: int = 0
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 (FSDP2 mixed precision: bf16 compute, fp32 reduce)
    demo_data: str | None = None  # build the demo data set here when missing (the demo preset)
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
            raise ValueError(f"steps, checkpoint_every and log_every must be >= 1, got "
                             f"{self.steps}, {self.checkpoint_every}, {self.log_every}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if not isinstance(self.resume, str) or not self.resume:
            raise ValueError(f"resume must be auto, never or a checkpoint path, got {self.resume!r}")
        if isinstance(self.allow_config_change, str):
            self.allow_config_change = (self.allow_config_change,)
        self.allow_config_change = tuple(str(k) for k in self.allow_config_change or ())


# --------------------------------------------------------------------------- dict <-> dataclass

def from_dict(cls, values: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a (nested) dict; unknown keys fail with their dotted names."""
    if not isinstance(values, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)} "
                         f"(known at this level: {', '.join(sorted(fields))})")
    hints, kwargs = typing.get_type_hints(cls), {}
    for name, value in values.items():
        kind = _dataclass_in(hints[name])
        if kind is DeCLIPLossConfig and isinstance(value, str):
            value = _loss_preset(value, prefix + name)
        elif kind is not None and isinstance(value, dict):
            value = from_dict(kind, value, f"{prefix}{name}.")
        elif isinstance(value, list):
            value = tuple(value)
        else:
            value = _coerce(hints[name], value, prefix + name)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:  # a section's own check: say which section
        section = prefix.rstrip(".")
        named = not section or str(err).startswith(section + ".")
        raise ConfigError(str(err) if named else f"{section}: {err}") from None


def _coerce(hint, value, key: str):
    """Numbers as the field's type wants them: YAML reads ``3e-4`` (no dot) as a string and
    ``1`` as an int where a float is meant."""
    args = set(typing.get_args(hint)) or {hint}
    kind = float if float in args else int if int in args else None
    if kind is None or value is None or isinstance(value, (bool, kind)):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: expected a number, got {value!r}") from None
    if kind is int and not number.is_integer():  # nan and inf included
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    return kind(number)


def _dataclass_in(hint):
    """The dataclass a field holds (also through ``X | None``), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _loss_preset(name: str, key: str) -> DeCLIPLossConfig:
    if name not in LOSS_PRESETS:
        raise ValueError(f"{key}: unknown loss preset {name!r}; choose from {sorted(LOSS_PRESETS)}")
    return DeCLIPLossConfig(**LOSS_PRESETS[name])


def to_dict(config) -> dict:
    """Plain nested dict (tuples as lists), loadable again by :func:`from_dict`."""
    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(dataclasses.asdict(config))


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
    """``a.b.c=value`` into the nested dict (creating levels; key checks happen in from_dict)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {text!r} must look like key.sub=value")
    node = values
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif part == "loss" and isinstance(child, str):  # a preset name, refined key by key
            child = node[part] = dataclasses.asdict(_loss_preset(child, "loss"))
        if not isinstance(child, dict):
            raise ValueError(f"override {text!r}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def load_config(name_or_path: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    path = preset_path(name_or_path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from err
    for text in overrides:
        apply_override(values, text)
    config = from_dict(TrainConfig, values)
    check_values(config)
    return config


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    text = yaml.safe_dump(to_dict(config), sort_keys=False)
    atomic_write(path, lambda tmp: tmp.write_text(text))


__all__ = ["EvalConfig", "ModelConfig", "TrainConfig", "apply_override", "from_dict",
           "load_config", "preset_path", "save_config", "to_dict"]
