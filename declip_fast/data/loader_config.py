"""What the data loader and its two backends share: :class:`DataConfig`, the seeds and shard
orders, :class:`BatchViews` (the device-side views of a batch) and :class:`ResumableEpochs`.

``declip_fast.data.loader`` (the factory, :func:`~declip_fast.data.loader.build_loader`) and the
backends ``ffcv_loader`` and ``torch_loader`` import this module; it imports none of them, so the
three files no longer import each other in a circle. ``declip_fast.data.loader`` re-exports every
name here. The batch contract is in the docstring of ``declip_fast.data.loader``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from declip_fast.data.augment import AugmentConfig, augment
from declip_fast.data.masking import mask_tokens
from declip_fast.data.tokenizer import EOT_ID
from declip_fast.models.packing import lengths_from_tokens

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
    fraction: float = 1.0  # train on this share of the samples (a subset fixed by fraction_seed)
    fraction_seed: int = 0  # which subset: the same seed gives the same samples on every backend
    mlm: bool = True  # mask text view 1, add mlm_targets
    mlm_prob: float = 0.15
    eda: bool = True  # text view 2
    two_views: bool = True  # images_2
    drop_last: bool = True
    ffcv_fused_views: bool = True  # FFCV: decode once, crop twice (one decoder) instead of two
    # pipelines on the image field that decode every image twice (FFCV's own decoders: no decode
    # check, unseeded crops; the trainer refuses it, loader benchmarks compare against it)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.batch_size < 1 or self.image_size < 8:
            raise ValueError(f"need batch_size >= 1 and image_size >= 8, got {self.batch_size}, {self.image_size}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0: load in this process), got {self.num_workers}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
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
    """The package's one config parser (``declip_fast.config.from_dict``)."""
    from declip_fast.config import from_dict

    return from_dict(cls, values, prefix)


def rank_and_world(config: DataConfig) -> tuple[int, int]:
    """(rank, world size): from the config where set, else from torch.distributed, else (0, 1)."""
    from declip_fast.distributed import env

    rank = env.rank() if config.rank is None else config.rank
    world = env.world_size() if config.world_size is None else config.world_size
    if not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world}")
    return rank, world


def epoch_seed(seed: int, epoch: int, rank: int, stream: int) -> int:
    """A well-mixed 63-bit seed per (seed, epoch, rank, stream): streams never share draws."""
    return int(np.random.SeedSequence([seed, epoch, rank, stream]).generate_state(2, np.uint64)[0] >> 1)


def batch_seed(seed: int, epoch: int, rank: int, stream: int, batch: int) -> int:
    """A well-mixed 63-bit seed per (seed, epoch, rank, stream, batch index): batch k's draws do
    not depend on the batches before it, so a resumed epoch draws what the full one drew."""
    state = np.random.SeedSequence([seed, epoch, rank, stream, batch]).generate_state(2, np.uint64)
    return int(state[0] >> 1)


def subset_indices(num_samples: int, fraction: float, seed: int) -> np.ndarray:
    """The sorted rows a loader reads when it trains on ``fraction`` of ``num_samples``: the
    first ``round(fraction * num_samples)`` (at least 1) of a permutation seeded by ``seed``, so
    a smaller fraction is a subset of a larger one under the same seed. All rows for 1.0."""
    if fraction >= 1.0:
        return np.arange(num_samples, dtype=np.int64)
    keep = max(1, round(fraction * num_samples))
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x5EB5E7])).permutation(num_samples)
    return np.sort(order[:keep]).astype(np.int64)


def shard_order(num_samples: int, seed: int, epoch: int, rank: int, world: int, drop_last: bool) -> list[int]:
    """This rank's sample indices for an epoch, as ``DistributedSampler(shuffle=True)`` gives
    them (rank and world passed explicitly, so no process group is needed): one permutation
    seeded by ``seed + epoch`` shared by all ranks, dealt out in turn. ``drop_last`` drops the
    tail that does not divide evenly (no sample twice); otherwise the head is repeated to pad."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(
        range(num_samples), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=drop_last
    )
    sampler.set_epoch(epoch)
    return list(sampler)


class BatchViews:
    """Turns what a backend decoded into the contract batch: text views on the CPU, then the
    batched image augmentations on the device. Holds the generators, reseeded per batch."""

    TEXT_STREAM, IMAGE_STREAM = 1, 2

    def __init__(self, config: DataConfig, device: torch.device, rank: int):
        self.config, self.device, self.rank = config, device, rank
        self.text_gen = torch.Generator()
        self.image_gen = torch.Generator(device=device)
        self.start_batch(0, 0)

    def start_batch(self, epoch: int, batch: int) -> None:
        """Seed the generators for batch ``batch`` of ``epoch``; call it before each batch (the
        FFCV loader draws its EDA pick from ``text_gen`` before calling this object)."""
        seed, rank = self.config.seed, self.rank
        self.text_gen.manual_seed(batch_seed(seed, epoch, rank, self.TEXT_STREAM, batch))
        self.image_gen.manual_seed(batch_seed(seed, epoch, rank, self.IMAGE_STREAM, batch))

    def __call__(
        self,
        images_1: torch.Tensor,
        images_2: torch.Tensor | None,
        tokens: torch.Tensor,
        text_2: torch.Tensor | None,
        index: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
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
        batch["text_1_lengths"] = lengths_from_tokens(tokens, EOT_ID)  # stays on the host
        if cfg.eda:
            batch["text_2"] = text_2.to(device=dev, dtype=torch.int64, copy=True, non_blocking=True)
            batch["text_2_lengths"] = lengths_from_tokens(text_2, EOT_ID)
        batch["index"] = index.reshape(-1).to(device=dev, dtype=torch.int64, copy=True, non_blocking=True)
        return batch


class ResumableEpochs:
    """Epoch bookkeeping shared by both loaders: ``set_epoch`` and ``position`` (module
    docstring). A loader calls :meth:`_begin_epoch` when iteration starts and :meth:`_advance`
    as each batch is handed out; it needs ``__len__`` (batches per epoch)."""

    _epoch, _start_batch = 0, 0
    _position = {"epoch": 0, "batch": 0}

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration runs epoch ``epoch`` from batch ``start_batch`` (only that one
        iteration starts late; the one after is epoch + 1 from batch 0)."""
        if epoch < 0 or not 0 <= start_batch <= len(self):
            raise ValueError(
                f"need epoch >= 0 and 0 <= start_batch <= {len(self)} (batches per "
                f"epoch), got epoch {epoch}, start_batch {start_batch}"
            )
        self._epoch, self._start_batch = int(epoch), int(start_batch)
        self._advance(self._epoch, self._start_batch)

    @property
    def position(self) -> dict[str, int]:
        """``{"epoch": e, "batch": b}``: the batch the consumer gets next (the checkpoint key)."""
        return dict(self._position)

    def state_dict(self) -> dict[str, int]:
        return self.position

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.set_epoch(state["epoch"], state["batch"])

    def _begin_epoch(self) -> tuple[int, int]:
        """(epoch, first batch) for the iteration starting now; the next one is the next epoch."""
        epoch, start = self._epoch, self._start_batch
        self._epoch, self._start_batch = epoch + 1, 0
        self._advance(epoch, start)
        return epoch, start

    def _advance(self, epoch: int, next_batch: int) -> None:
        """Record that ``next_batch`` of ``epoch`` comes next; past the last, epoch + 1 does."""
        if next_batch >= len(self):
            epoch, next_batch = epoch + 1, 0
        self._position = {"epoch": epoch, "batch": next_batch}
