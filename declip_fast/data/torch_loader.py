"""The torch fallback loader, for machines without FFCV: raw pairs in, contract batches out.

It reads what ``declip_fast.data.write`` reads (a CSV/TSV of image path + caption rows, a folder
of images with same-named ``.txt`` captions, webdataset ``.tar`` shards; listed by
``sources.list_pairs``), or any list of ``(image path, caption)`` pairs. Per sample, in DataLoader
workers: caption and image go through the writer's decoder (:mod:`declip_fast.data.decode`: the
same caption rule, and the same pixels, with large JPEGs at a reduced DCT scale the crops allow);
the image is cropped twice with torchvision v2 ``RandomResizedCrop`` + ``RandomHorizontalFlip``;
the caption is tokenized and one EDA variant (``declip_fast.data.eda.eda``) is drawn and
tokenized. Crops and EDA draw from generators seeded by (seed, epoch, sample index), so they do
not depend on the worker count. In the main process the batch then goes through the same
``BatchViews`` as FFCV's: masking and the batched colour augmentations on the device.

Order and sharding: ``DistributedSampler(shuffle=True)`` with the config's (or the process
group's) rank and world size, also for one process; FFCV's loader uses the same order. Resuming
at batch k (``set_epoch(epoch, k)``) drops the first k batches' samples in the sampler, so they
are never loaded; batches are counted as the sampler deals them, a batch that lost all its
samples included.

Bad samples (a :class:`~declip_fast.data.decode.BadSample`: a missing, unreadable, corrupt or
empty image; a missing, empty, too long or non-UTF-8 caption; the writer skips the same ones) are
dropped by the collate function and counted in ``loader.skipped`` (and logged, the first few with
their source and reason), so such a batch is smaller; a batch with nothing valid is not yielded
at all.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from declip_fast.data.decode import BadSample, caption_text, decode_image, load_pixels
from declip_fast.data.loader_config import BatchViews, DataConfig, ResumableEpochs, epoch_seed, subset_indices

log = logging.getLogger(__name__)
CROP_STREAM, EDA_STREAM = 3, 4
LOGGED_SKIPS = 10  # skips logged one by one per loader; the rest are only counted


def load_rgb(image, min_crop_side: int = 0) -> torch.Tensor:
    """uint8 [3, H, W] (channels-last memory) from a path / ``Blob`` of an encoded image, or an
    HxW(x3) uint8 array (``decode.load_pixels``). See :func:`decode_rgb` for ``min_crop_side``."""
    return torch.from_numpy(load_pixels(image, min_mean_side=min_crop_side)).permute(2, 0, 1)


def decode_rgb(data: bytes, min_crop_side: int = 0) -> torch.Tensor:
    """uint8 [3, H, W] from encoded image bytes, decoded as the writer decodes them
    (``decode.decode_image``). A JPEG is decoded at 1/2, 1/4 or 1/8 scale while sqrt(H * W) stays
    >= ``min_crop_side`` (``PairsDataset`` sets it so that its smallest crop still covers the
    output size). The result is a channels-last view of the HWC pixels: torchvision's uint8 resize
    is fastest on that layout."""
    return torch.from_numpy(decode_image(data, min_mean_side=min_crop_side)).permute(2, 0, 1)


class PairsDataset(Dataset):
    """(image, caption) pairs -> per-sample views; the item key is ``(epoch, index)``.

    ``pairs``: ``(image path, caption)`` tuples, or ``write.Pair`` objects (image a path or a
    ``Blob``, caption a str, bytes or ``Blob``). Returns a dict of uint8 crops, int64 token ids
    and the index, or ``(source, reason)`` for a sample that cannot be loaded.
    """

    def __init__(
        self,
        pairs: Sequence,
        image_size: int,
        crop_scale=(0.2, 1.0),
        two_views: bool = True,
        eda: bool = True,
        seed: int = 0,
    ):
        from torchvision.transforms import v2

        self.items = [self._normalize(p) for p in pairs]
        self.two_views, self.eda, self.seed = two_views, eda, seed
        # The shorter side of the smallest crop is about sqrt(scale * area * 3/4) (the extreme
        # aspect ratio); a JPEG may be decoded smaller as long as that stays >= image_size.
        self.min_crop_side = math.ceil(image_size / math.sqrt(0.75 * crop_scale[0]))
        self.view = v2.Compose(
            [v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True), v2.RandomHorizontalFlip()]
        )

    @staticmethod
    def _normalize(pair) -> tuple:
        if hasattr(pair, "source") and hasattr(pair, "image"):  # write.Pair
            return pair.image, pair.caption, pair.source
        image, caption = pair
        return image, caption, str(image)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image, caption, source = self.items[index]
        try:
            text = caption_text(caption)
            pixels = load_rgb(image, self.min_crop_side)
        except BadSample as bad:
            return source, str(bad)
        sample = {"index": torch.tensor(index, dtype=torch.int64)}
        # Seeded per sample: the crops do not depend on which worker loads it. fork_rng puts the
        # global generator back, so the main process (num_workers=0) is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(epoch_seed(self.seed, epoch, index, CROP_STREAM))
            sample["images_1"] = self.view(pixels)
            if self.two_views:
                sample["images_2"] = self.view(pixels)
        texts = [text]
        if self.eda:
            from declip_fast.data.eda import eda

            texts.append(eda(text, random.Random(epoch_seed(self.seed, epoch, index, EDA_STREAM))))
        from declip_fast.data.tokenizer import tokenize

        ids = tokenize(texts)
        sample["tokens"] = ids[0]
        if self.eda:
            sample["text_2"] = ids[1]
        return sample


def collate_valid(items: list) -> dict:
    """Stack the loadable samples; the others become ``skips`` [(source, reason)]."""
    good = [s for s in items if isinstance(s, dict)]
    batch = {k: torch.stack([s[k] for s in good]) for k in (good[0] if good else {})}
    batch["skips"] = [s for s in items if not isinstance(s, dict)]
    return batch


class _EpochKeys(Sampler):
    """Wraps a sampler; yields ``(epoch, index)`` so workers (persistent or not) see the epoch,
    from the ``skip``-th index on (the DataLoader iterates it lazily, so it keeps both)."""

    def __init__(self, sampler: DistributedSampler, rows):
        self.sampler, self.rows, self.epoch, self.skip = sampler, rows, 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, int(self.rows[i])) for i in itertools.islice(self.sampler, self.skip, None))

    def __len__(self) -> int:
        return len(self.sampler)


def pairs_from_source(source: str) -> list:
    """The pairs of a CSV/TSV, a folder of image + .txt, or .tar shards (``sources.list_pairs``)."""
    from declip_fast.data.sources import list_pairs

    pairs, skips = list_pairs(source)
    for skip in skips[:LOGGED_SKIPS]:
        log.warning("skipping %s: %s", skip.source, skip.reason)
    if len(skips) > LOGGED_SKIPS:
        log.warning("skipped %d more entries of %s while listing it", len(skips) - LOGGED_SKIPS, source)
    return pairs


class TorchLoader(ResumableEpochs):
    """Iterate for contract batches (see :mod:`declip_fast.data.loader`)."""

    backend = "torch"

    def __init__(self, config: DataConfig, device: torch.device, rank: int, world: int, pairs: Sequence | None = None):
        self.config, self.device, self.rank, self.world = config, device, rank, world
        if pairs is None:
            if config.source is None:
                raise ValueError("the torch loader needs config.source (or a list of pairs)")
            pairs = pairs_from_source(config.source)
        self.dataset = PairsDataset(
            pairs, config.image_size, config.crop_scale, config.two_views, config.eda, config.seed
        )
        if len(self.dataset) == 0:
            raise ValueError(f"no pairs found in {config.source}")
        self._warm_up()
        self.rows = subset_indices(len(self.dataset), config.fraction, config.fraction_seed)
        sampler = DistributedSampler(
            range(len(self.rows)),
            num_replicas=world,
            rank=rank,
            shuffle=True,
            seed=config.seed,
            drop_last=config.drop_last,
        )
        self._sampler = _EpochKeys(sampler, self.rows)
        workers = config.workers()
        self._loader = DataLoader(
            self.dataset,
            batch_size=config.batch_size,
            sampler=self._sampler,
            num_workers=workers,
            collate_fn=collate_valid,
            drop_last=config.drop_last,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
        )
        self._views = BatchViews(config, device, rank)
        self.skipped = 0

    def _warm_up(self) -> None:
        """Build the tokenizer and WordNet table here, so forked workers share them."""
        from declip_fast.data.tokenizer import get_tokenizer

        get_tokenizer()
        if self.config.eda:
            from declip_fast.data.eda import synonym_table

            synonym_table()

    def __len__(self) -> int:
        return len(self._loader)

    @property
    def num_samples(self) -> int:
        return len(self.rows)

    def _note_skips(self, skips: list) -> None:
        for source, reason in skips:
            if self.skipped < LOGGED_SKIPS:
                log.warning("skipping sample %s: %s", source, reason)
            self.skipped += 1

    def __iter__(self):
        epoch, start = self._begin_epoch()  # now, not at the first next()
        return self._batches(epoch, start)

    def _batches(self, epoch: int, start: int):
        self._sampler.set_epoch(epoch, start * self.config.batch_size)
        dev, views = self.device, self._views
        for b, batch in enumerate(self._loader, start):
            self._note_skips(batch.pop("skips"))
            if "index" not in batch:  # every sample of this batch was bad
                self._advance(epoch, b + 1)
                continue
            views.start_batch(epoch, b)
            images = [batch[k].to(dev, non_blocking=True) if k in batch else None for k in ("images_1", "images_2")]
            out = views(*images, batch["tokens"], batch.get("text_2"), batch["index"])
            self._advance(epoch, b + 1)
            yield out
