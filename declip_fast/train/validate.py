"""Checks of a training config that need more than one field, the machine or the files, and the
comparison of a config with the checkpoint it resumes from.

Each failure is a :class:`~declip_fast.train.errors.ConfigError` whose one-line message names the
key (or the file) and what would work, so that a mistake costs a second instead of a traceback
minutes into a job. :func:`check_values` runs where the config is parsed (``load_config``);
:func:`check_run` also looks at the machine and the data files and runs before training starts
(``declip-fast train`` after ``--print-config``, and ``Trainer.build``), so a recipe can still be
printed on a laptop without its GPU or data.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from declip_fast.losses.declip import TERMS
from declip_fast.train.errors import ConfigError

# What a checkpoint means: resuming with another value of one of these is refused unless the
# key is listed in ``allow_config_change`` (or that list holds "all").
RESUME_KEYS = (
    "model.preset",
    "model.overrides",
    *(f"loss.{t}" for t in TERMS),
    "loss.queue_size",
    "data.batch_size",
    "data.image_size",
    "data.beton",
    "data.source",
    "data.fraction",
    "data.fraction_seed",
    "world_size",
)


def check_number(key: str, value, *, low=None, low_open=False, high=None, high_open=False) -> None:
    """``value`` must be a finite real number in the given range; else a ConfigError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"{key} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value >= high if high_open else value > high):
        raise ConfigError(f"{key} must be {'<' if high_open else '<='} {high}, got {value!r}")


def check_values(config) -> None:
    """Ranges and exclusive keys across sections, and the model the config names."""
    check_number("max_bad_steps", config.max_bad_steps, low=1)
    check_number("max_rollbacks", config.max_rollbacks, low=0)
    for term in TERMS:
        check_number(f"loss.{term}", getattr(config.loss, term), low=0)
    if config.data.beton is not None and config.data.source is not None:
        raise ConfigError(
            f"data.beton ({config.data.beton}) and data.source ({config.data.source}) "
            "are both set: train from one of them (set the other to null)"
        )
    if not config.data.ffcv_fused_views:
        # FFCV's own two-pipeline decoders neither report undecodable images (they would be
        # trained on as garbage) nor seed their crops (no exact resume): a comparison path only.
        raise ConfigError(
            "data.ffcv_fused_views=false is for loader benchmarks only (FFCV's own "
            "decoders do not report undecodable images or seed their crops); "
            "train with the default fused decoder"
        )
    for key in config.allow_config_change:
        if key != "all" and key not in RESUME_KEYS:
            raise ConfigError(
                f"allow_config_change: {key!r} is not a key that resuming checks; "
                f"choose from {', '.join(RESUME_KEYS)} or all"
            )
    vision = model_config(config).vision
    patch = getattr(vision, "patch_size", None)
    if patch and vision.image_size % patch:
        raise ConfigError(
            f"model.overrides: the vision image_size {vision.image_size} of model.preset "
            f"{config.model.preset!r} is not a multiple of its patch size {patch}"
        )


def model_config(config):
    """The model's DeCLIPConfig (nothing built); an unknown preset or override is a ConfigError."""
    try:
        return config.model.architecture()
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None


def check_run(config) -> None:
    """What a run needs beyond valid values: matching image sizes, the device, the data files."""
    check_values(config)
    vision = model_config(config).vision
    if config.data.image_size != vision.image_size:
        patch = getattr(vision, "patch_size", None)
        raise ConfigError(
            f"data.image_size {config.data.image_size} does not match the vision image_size "
            f"{vision.image_size} of model.preset {config.model.preset!r}"
            + (f" (patch size {patch})" if patch else "")
            + f": set data.image_size={vision.image_size}"
        )
    if config.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device=cuda, but no CUDA device is available here: set device=cpu (or device=auto)")
    if config.data.source is not None and not Path(config.data.source).exists():
        raise ConfigError(f"data.source: {config.data.source} does not exist")
    if config.data.beton is not None:
        check_beton(config.data.beton)


def check_beton(path: str) -> None:
    """``data.beton`` must be an FFCV file: a header of the version this FFCV reads, with samples
    and an allocation table inside the file (checked without importing FFCV)."""
    file = Path(path)
    if not file.is_file():
        how = "declip-fast write-dataset writes one"
        if file.name == "train.beton" and file.parent.name == "demo":  # the demo preset's file
            how = f"make demo builds it, or declip-fast write-dataset --demo {file.parent}"
        raise ConfigError(
            f"data.beton: {path} " + ("is not a file" if file.exists() else "does not exist") + f" ({how})"
        )
    header = np.dtype(
        [
            ("version", "<u2"),
            ("num_fields", "<u2"),
            ("page_size", "<u4"),
            ("num_samples", "<u8"),
            ("alloc_table_ptr", "<u8"),
        ],
        align=True,
    )
    size = file.stat().st_size
    with open(file, "rb") as f:  # the header only: a .beton may be hundreds of GB
        raw = f.read(header.itemsize) if size >= header.itemsize else b""
    fields = np.frombuffer(raw, header)[0] if raw else None
    if (
        fields is None
        or int(fields["version"]) != 2
        or not 0 < int(fields["num_fields"]) < 64
        or int(fields["num_samples"]) == 0
        or not header.itemsize < int(fields["alloc_table_ptr"]) < size
    ):
        raise ConfigError(
            f"data.beton: {path} is not an FFCV .beton file (format version 2); "
            "write one with declip-fast write-dataset"
        )


def resume_values(config, world_size: int) -> dict:
    """The values of :data:`RESUME_KEYS` for this run, as plain Python values."""
    values = {
        "model.preset": config.model.preset,
        "model.overrides": dict(config.model.overrides),
        "world_size": world_size,
    }
    for term in (*TERMS, "queue_size"):
        values[f"loss.{term}"] = getattr(config.loss, term)
    for key in ("batch_size", "image_size", "beton", "source", "fraction", "fraction_seed"):
        values[f"data.{key}"] = getattr(config.data, key)
    return values


def check_resume(saved: dict | None, current: dict, allowed, checkpoint) -> list[str]:
    """Raise a ConfigError naming every key whose value differs from the checkpoint's unless it
    is allowed; returns the allowed differences (for a warning). ``saved`` None: an older
    checkpoint without the record, nothing to compare."""
    if saved is None:
        return []
    changed = [k for k in RESUME_KEYS if k in saved and saved[k] != current.get(k)]
    refused = [k for k in changed if k not in allowed and "all" not in allowed]
    if refused:
        diff = "; ".join(f"{k}: {saved[k]!r} -> {current.get(k)!r}" for k in refused)
        raise ConfigError(
            f"resume: checkpoint {checkpoint} was saved with another config ({diff}); "
            f"resuming would mix two runs. Use another run_dir or resume=never, or accept "
            f"with --allow-config-change {' '.join(refused)}"
        )
    return [f"{k}: {saved[k]!r} -> {current.get(k)!r}" for k in changed]


__all__ = [
    "RESUME_KEYS",
    "check_beton",
    "check_number",
    "check_resume",
    "check_run",
    "check_values",
    "model_config",
    "resume_values",
]
