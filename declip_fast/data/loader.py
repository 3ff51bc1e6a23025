"""The data config, the batch contract, and the one place that picks FFCV or the torch fallback.

Batch contract (both backends, identical keys, dtypes, shapes and value ranges). Every batch is a
``dict`` of tensors on the target device, B = ``batch_size`` (fewer only in the fallback's batches
that lost corrupt images, or in a last batch kept with ``drop_last=False``):

=============  =====================  =========================================================
key            dtype / shape          content
=============  =====================  =========================================================
images_1       float32 [B, 3, S, S]   view 1: random resized crop (scale ``crop_scale``) + flip,
                                      then :func:`declip_fast.data.augment.augment` (colour
                                      jitter, grayscale, blur), ImageNet-normalized. S =
                                      ``image_size``. Values in [(0 - mean) / std, (1 - mean) / std]
                                      per channel, i.e. about [-2.12, 2.64].
images_2       float32 [B, 3, S, S]   view 2: an independent draw of the same; only with
                                      ``two_views``.
text_1         int64 [B, 77]          the caption's CLIP token ids; with ``mlm`` the MLM-masked
                                      ids of :func:`declip_fast.data.masking.mask_tokens`.
mlm_targets    int64 [B, 77]          only with ``mlm``: the original id where a token was chosen
                                      for MLM, ``IGNORE_INDEX`` (-100) everywhere else.
text_2         int64 [B, 77]          only with ``eda``: the token ids of one EDA variant of the
                                      caption (FFCV: one of the 4 written per sample, drawn per
                                      sample and epoch; fallback: EDA run at load time).
index          int64 [B]              the sample's row in the dataset (``.beton`` row / source row).
=============  =====================  =========================================================

Randomness: sample order, masking and EDA choices and the colour augmentations are seeded from
(``seed``, epoch, rank); call ``loader.set_epoch(epoch)`` before each epoch (or just iterate: the
epoch counts up by itself). Crops and flips are seeded in the fallback; FFCV 1.0.2's crop and flip
draw from numba's unseeded generator. Text randomness is drawn on the CPU, so it does not depend
on the device.

Backends: ``"ffcv"`` reads a ``.beton`` written by ``declip_fast.data.write`` (fields ``image``,
``tokens``, ``eda_tokens``, ``index``); ``"torch"`` reads the raw pairs (a CSV of
``image,caption`` rows, or a folder of images each with a same-named ``.txt`` caption) with a
torch DataLoader; ``"auto"`` takes FFCV when it imports and ``beton`` is set, the fallback
otherwise. Distributed: rank and world size come from the config or, when those are unset, from
an initialized ``torch.distributed`` process group; each rank reads a disjoint shard each epoch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from declip_fast.data.augment import AugmentConfig, augment
from declip_fast.data.masking import mask_tokens

log = logging.getLogger(__name__)

BACKENDS = ("auto", "ffcv", "torch")


@dataclass
class DataConfig:
    """Everything the loaders need; build from YAML via :meth:`from_dict` (unknown keys fail)."""

    beton: str | None = None  # FFCV dataset file
    source: str | None = None  # fallback: CSV of image,caption rows, or a folder of image + .txt
    backend: str = "auto"  # "auto" | "ffcv" | "torch"
    batch_size: int = 128  # per rank
    image_size: int = 224
    crop_scale: tuple[float, float] = (0.2, 1.0)
    num_workers: int | None = None  # None: the CPU cores this process may use; FFCV: threads
    # (at least 1), fallback: DataLoader processes (0: in this process)
    os_cache: bool = True  # FFCV: True reads through the OS page cache (shared by the ranks of a
    # node); False loads the whole file into this process's memory. Ignored by the fallback.
    rank: int | None = None  # None: from torch.distributed when initialized, else 0
    world_size: int | None = None  # None: from torch.distributed when initialized, else 1
    seed: int = 0
    mlm: bool = True  # mask text view 1, add mlm_targets
    mlm_prob: float = 0.15
    eda: bool = True  # text view 2
    two_views: bool = True  # images_2
    drop_last: bool = True
    ffcv_fused_views: bool = True  # FFCV: decode once, crop twice (one decoder) instead of two
    # pipelines on the image field that decode every image twice
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.batch_size < 1 or self.image_size < 8:
            raise ValueError(f"need batch_size >= 1 and image_size >= 8, got {self.batch_size}, "
                             f"{self.image_size}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0: load in this process), got {self.num_workers}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        self.crop_scale = (float(lo), float(hi))
        if isinstance(self.augment, dict):
            self.augment = _from_dict(AugmentConfig, self.augment, "augment.")

    @classmethod
    def from_dict(cls, values: dict) -> DataConfig:
        return _from_dict(cls, values, "")

    def workers(self) -> int:
        if self.num_workers is not None:
            return self.num_workers
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _from_dict(cls, values: dict, prefix: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown data config key(s): {', '.join(prefix + k for k in unknown)} "
                         f"(known: {', '.join(sorted(names))})")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**values)


def rank_and_world(config: DataConfig) -> tuple[int, int]:
    """(rank, world size): from the config where set, else from torch.distributed, else (0, 1)."""
    rank, world = config.rank, config.world_size
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank is None:
        rank = torch.distributed.get_rank() if initialized else 0
    if world is None:
        world = torch.distributed.get_world_size() if initialized else 1
    if not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world}")
    return rank, world


def epoch_seed(seed: int, epoch: int, rank: int, stream: int) -> int:
    """A well-mixed 63-bit seed per (seed, epoch, rank, stream): streams never share draws."""
    return int(np.random.SeedSequence([seed, epoch, rank, stream]).generate_state(2, np.uint64)[0] >> 1)


def shard_order(num_samples: int, seed: int, epoch: int, rank: int, world: int, drop_last: bool) -> list[int]:
    """This rank's sample indices for an epoch, as ``DistributedSampler(shuffle=True)`` gives
    them (rank and world passed explicitly, so no process group is needed): one permutation
    seeded by ``seed + epoch`` shared by all ranks, dealt out in turn. ``drop_last`` drops the
    tail that does not divide evenly (no sample twice); otherwise the head is repeated to pad."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(num_samples), num_replicas=world, rank=rank, shuffle=True,
                                 seed=seed, drop_last=drop_last)
    sampler.set_epoch(epoch)
    return list(sampler)


class BatchViews:
    """Turns what a backend decoded into the contract batch: text views on the CPU, then the
    batched image augmentations on the device. Holds the per-epoch generators."""

    TEXT_STREAM, IMAGE_STREAM = 1, 2

    def __init__(self, config: DataConfig, device: torch.device, rank: int):
        self.config, self.device, self.rank = config, device, rank
        self.start_epoch(0)

    def start_epoch(self, epoch: int) -> None:
        seed = self.config.seed
        self.text_gen = torch.Generator().manual_seed(epoch_seed(seed, epoch, self.rank, self.TEXT_STREAM))
        self.image_gen = torch.Generator(device=self.device)
        self.image_gen.manual_seed(epoch_seed(seed, epoch, self.rank, self.IMAGE_STREAM))

    def __call__(self, images_1: torch.Tensor, images_2: torch.Tensor | None, tokens: torch.Tensor,
                 text_2: torch.Tensor | None, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 [B, 3, S, S] views (on the device), int tokens [B, 77], int index [B] (CPU)."""
        cfg, dev = self.config, self.device
        tokens = tokens.to(torch.int64)  # a copy: loader buffers get reused
        batch: dict[str, torch.Tensor] = {}
        batch["images_1"] = augment(images_1, self.image_gen, cfg.augment)
        if cfg.two_views:
            batch["images_2"] = augment(images_2, self.image_gen, cfg.augment)
        if cfg.mlm:
            masked, targets = mask_tokens(tokens, self.text_gen, cfg.mlm_prob)
            batch["text_1"] = masked.to(dev, non_blocking=True)
            batch["mlm_targets"] = targets.to(dev, non_blocking=True)
        else:
            batch["text_1"] = tokens.to(dev, non_blocking=True)
        if cfg.eda:
            batch["text_2"] = text_2.to(device=dev, dtype=torch.int64, copy=True, non_blocking=True)
        batch["index"] = index.reshape(-1).to(device=dev, dtype=torch.int64, copy=True, non_blocking=True)
        return batch


def ffcv_import_error() -> str | None:
    """Why FFCV cannot be used here (None when it imports)."""
    try:
        import ffcv  # noqa: F401
        import ffcv.loader  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native build (OSError, numba errors)
        return f"{type(exc).__name__}: {exc}"
    return None


def choose_backend(config: DataConfig) -> str:
    """The backend that will run: the one place that decides between FFCV and the fallback."""
    if config.backend == "torch":
        return "torch"
    reason = ffcv_import_error()
    if config.backend == "ffcv":
        if reason is not None:
            raise ImportError(
                f"backend='ffcv' was asked for, but FFCV cannot be imported ({reason}). Install it "
                "with pip install 'declip-fast[ffcv]' (needs libopencv-dev libturbojpeg0-dev "
                "pkg-config), or set backend='torch' (or 'auto') to use the torch fallback.")
        if config.beton is None:
            raise ValueError("backend='ffcv' needs config.beton, the .beton file to read")
        return "ffcv"
    if reason is None and config.beton is not None:
        return "ffcv"
    if config.source is None:
        why = f"FFCV cannot be imported ({reason})" if reason else "config.beton is not set"
        raise ValueError(f"no usable data: {why}, and config.source (the raw pairs for the torch "
                         "fallback) is not set either")
    if reason is not None and config.beton is not None:
        log.warning("FFCV cannot be imported (%s): reading %s with the torch fallback instead",
                    reason, config.source)
    return "torch"


def build_loader(config: DataConfig, device: torch.device | str = "cpu"):
    """The loader for ``config``: iterate it for contract batches (module docstring) on ``device``.

    It has ``len()`` (batches per epoch on this rank), ``set_epoch(epoch)`` and ``backend``.
    """
    device = torch.device(device)
    backend = choose_backend(config)
    rank, world = rank_and_world(config)
    if backend == "ffcv":
        from declip_fast.data.ffcv_loader import FFCVLoader

        loader = FFCVLoader(config, device, rank, world)
        what = config.beton
    else:
        from declip_fast.data.torch_loader import TorchLoader

        loader = TorchLoader(config, device, rank, world)
        what = config.source
    log.info("data loader: %s backend reading %s (rank %d of %d, %d workers, batch %d, device %s)",
             backend, what, rank, world, config.workers(), config.batch_size, device)
    return loader
