"""FFCV loader: two image views, text views and index from a ``.beton``, in the batch contract.

The file holds ``schema.FIELDS``: ``image`` (RGBImageField), ``tokens`` (int32 [77]),
``eda_tokens`` (int32 [4, 77]: four tokenized EDA variants) and ``index`` (the row). Per batch:

- image views 1 and 2: by default (``ffcv_fused_views``) one decoder,
  :func:`~declip_fast.data.ffcv_decoder.two_view_decoder`, decodes each JPEG once and writes two
  independent random resized crops (``crop_scale``, FFCV's crop sampler; the resize is
  :mod:`declip_fast.data.resize`, torchvision's antialiased bilinear filter as the fallback
  applies it, ~2x faster than FFCV's OpenCV ``INTER_AREA`` call), each flipped with p = 0.5 (one
  crop with ``two_views=False``). With ``ffcv_fused_views=False`` they are two pipelines on the
  same ``image`` field (``RandomResizedCropRGBImageDecoder``, ``RandomHorizontalFlip``,
  ``ToTensor``, ``ToDevice``, ``ToTorchImage``), which decodes every JPEG twice: decoding is most
  of the work, so that path costs ~1.6x the CPU time. Either way the crops go to the device as
  uint8 and get the batched colour augmentations of :mod:`declip_fast.data.augment` there;
- text view 1 is ``tokens`` masked by :func:`~declip_fast.data.masking.mask_tokens`; text view 2
  one of the four ``eda_tokens`` rows per sample, drawn from a generator seeded per batch
  (``BatchViews.start_batch``);
- everything kept is copied out of FFCV's buffers before the batch is handed out: FFCV's thread
  rewrites a batch's buffers once the consumer has taken the batch after it.

Failures: the file is checked at open (:func:`declip_fast.data.beton.check_beton`: a header or
pointer that does not fit the file is a one-line ``ValueError``); an exception in FFCV's loader
thread is raised in the consumer (:class:`~declip_fast.data.beton.LoaderThreadError`) instead of
a hang; a JPEG the fused decoder cannot decode is dropped from its batch (which is then smaller)
and counted in ``loader.skipped``. FFCV's own decoders (``ffcv_fused_views=False``) do not report
decode errors, so that path serves whatever its buffer held.

Order: ``DistributedSampler``'s seeded shuffle and sharding (``loader.shard_order``), passed to
FFCV as its traversal order; the fallback uses the same, so both backends give each rank the same
samples. FFCV's own ``distributed=True`` order builds that sampler too, but without rank and
world size, so it only works inside an initialized process group; ours takes them from the config
or the group, and honours ``drop_last`` (no sample twice; FFCV pads). ``QUASI_RANDOM`` does not
support distributed loading at all. Resuming at batch k (``set_epoch(epoch, k)``) drops the first
k batches' samples from that order, so FFCV never reads them.

Reproducible crops: the fused decoder draws them from a counter-based stream keyed by the config
seed, the batch's sample ids and the sample's place in the batch (see
:mod:`declip_fast.data.ffcv_decoder`); the two-pipeline path (``ffcv_fused_views=False``) keeps
FFCV's unseeded crops and flips.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from declip_fast.data.beton import check_beton, start_epoch
from declip_fast.data.ffcv_decoder import (  # noqa: F401  (CROP_STREAM, crop_sampler, crop_seeders: re-exported)
    CROP_STREAM,
    STATUS_BUFFER,
    crop_sampler,
    crop_seeders,
    two_view_decoder,
)
from declip_fast.data.loader_config import BatchViews, DataConfig, ResumableEpochs, shard_order, subset_indices
from declip_fast.data.schema import FIELDS

LOGGED_SKIPS = 10  # undecodable samples logged one by one per loader; the rest are only counted
log = logging.getLogger(__name__)


def _sharded_order(config: DataConfig, rank: int, world: int):
    """A TraversalOrder for FFCV 1.0.2's Loader: it accepts an *instance* of TraversalOrder and
    calls it with the loader (``order(self)``), so this object builds the real one when called."""
    from ffcv.traversal_order.base import TraversalOrder

    class ShardedRandom(TraversalOrder):
        def __init__(self, loader):
            super().__init__(loader)
            self.skip = 0  # samples to drop from the front: set around one epoch's start

        def sample_order(self, epoch: int):
            picks = shard_order(len(self.indices), config.seed, epoch, rank, world, config.drop_last)
            return self.indices[np.asarray(picks[self.skip :], dtype=np.int64)]

    class Factory(TraversalOrder):
        def __init__(self):  # no loader yet; FFCV passes it to __call__
            pass

        def __call__(self, loader):
            return ShardedRandom(loader)

        def sample_order(self, epoch: int):
            raise RuntimeError("the factory is not an order")

    return Factory()


def _image_pipeline(config: DataConfig, device: torch.device) -> list:
    """FFCV's standard view: random resized crop in the decoder, flip, tensor, device, NCHW."""
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.transforms import RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage

    size = config.image_size
    ops = [RandomResizedCropRGBImageDecoder((size, size), scale=config.crop_scale), RandomHorizontalFlip(), ToTensor()]
    if device.type != "cpu":  # on the CPU it would only copy into another buffer
        ops.append(ToDevice(device, non_blocking=True))
    return ops + [ToTorchImage()]


def pick_eda_variant(eda_tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One row of [B, V, 77] per sample, drawn uniformly: a new int64 [B, 77] tensor."""
    b, v, _ = eda_tokens.shape
    pick = torch.randint(0, v, (b,), generator=generator)
    return eda_tokens[torch.arange(b), pick].to(torch.int64)


class FFCVLoader(ResumableEpochs):
    """Iterate for contract batches (see :mod:`declip_fast.data.loader`).

    ``skipped``: samples dropped so far because their image did not decode (counted by the fused
    decoder, :func:`two_view_decoder`; the first ``LOGGED_SKIPS`` are logged with their row), the
    same attribute as the fallback's; ``stats()`` returns it as a dict for a trainer's log. The
    file is checked at open (:func:`declip_fast.data.beton.check_beton`), and an exception in
    FFCV's loader thread is raised by the consumer (``LoaderThreadError``) instead of a hang."""

    backend = "ffcv"

    def __init__(self, config: DataConfig, device: torch.device, rank: int, world: int):
        from ffcv.loader import Loader
        from ffcv.reader import Reader

        self.config, self.device, self.rank, self.world = config, device, rank, world
        check_beton(config.beton)
        reader = Reader(config.beton)
        missing = [f for f in FIELDS if f not in reader.handlers]
        if missing:
            raise ValueError(f"{config.beton} lacks the field(s) {missing}; write it with declip_fast.data.write")
        pipelines = _pipelines(config, device)
        self._loader = Loader(
            config.beton,
            batch_size=config.batch_size,
            num_workers=max(1, config.workers()),
            indices=subset_indices(reader.num_samples, config.fraction, config.fraction_seed),
            os_cache=config.os_cache,
            order=_sharded_order(config, rank, world),
            distributed=world > 1,
            seed=config.seed,
            pipelines=pipelines,
            drop_last=config.drop_last,
        )
        # FFCV yields a tuple in the order of its pipeline specs (file fields, then added outputs).
        self._slot = {name: i for i, name in enumerate(self._loader.pipeline_specs)}
        decoder = self._loader.pipeline_specs["image"].decoder if config.ffcv_fused_views else None
        self._status_node = next(
            (
                n.id
                for n in self._loader.graph.nodes  # the fused decoder's
                if decoder is not None and getattr(n, "decoder", None) is decoder
            ),
            None,
        )
        self._views = BatchViews(config, device, rank)
        self.skipped = 0

    def __len__(self) -> int:
        return len(self._loader)

    @property
    def num_samples(self) -> int:
        return len(self._loader.indices)

    def stats(self) -> dict[str, int]:
        """Counters for a training log: ``{"skipped": samples dropped as undecodable}``."""
        return {"skipped": self.skipped}

    def __iter__(self):
        epoch, start = self._begin_epoch()  # now, not at the first next()
        return self._batches(epoch, start)

    def _batches(self, epoch: int, start: int):
        order, slot, views = self._loader.traversal_order, self._slot, self._views
        self._loader.next_epoch = epoch  # FFCV asks its order for loader.next_epoch
        order.skip = start * self.config.batch_size
        try:
            batches = start_epoch(self._loader)  # takes the order and starts FFCV's thread
        finally:
            order.skip = 0
        try:
            for b, (buffer_slot, out) in enumerate(batches, start):
                views.start_batch(epoch, b)
                text_2 = None
                if self.config.eda:
                    text_2 = pick_eda_variant(out[slot["eda_tokens"]], views.text_gen)
                keep = self._decoded(batches, buffer_slot, out[slot["index"]])
                if keep is not None and keep.numel() == 0:  # not one image of this batch decoded
                    self._advance(epoch, b + 1)
                    continue
                images_1, images_2 = self._images(out)
                parts = [images_1, images_2, out[slot["tokens"]], text_2, out[slot["index"]]]
                if keep is not None:
                    parts = [None if t is None else t[keep.to(t.device)] for t in parts]
                batch = views(*parts)
                self._advance(epoch, b + 1)
                yield batch
        finally:
            batches.close()  # an abandoned or failed epoch stops FFCV's thread

    def _decoded(self, batches, buffer_slot: int, index: torch.Tensor) -> torch.Tensor | None:
        """Rows of this batch whose image decoded (None: all of them, or no status to read): read
        from the fused decoder's CPU status buffer of this batch's slot, so no device sync. The
        thread rewrites that slot only after the consumer has taken the next batch."""
        if self._status_node is None:
            return None
        status = batches.memory_allocations["operation"][self._status_node][STATUS_BUFFER][buffer_slot]
        failed = np.flatnonzero(status[: len(index), 0])
        if failed.size == 0:
            return None
        for row in index.reshape(-1)[torch.from_numpy(failed)].tolist():
            if self.skipped < LOGGED_SKIPS:
                log.warning("skipping sample %d of %s: undecodable image", row, self.config.beton)
            self.skipped += 1
        return torch.from_numpy(np.setdiff1d(np.arange(len(index)), failed))

    def _images(self, out) -> tuple:
        """(view 1, view 2 or None) as [B, 3, S, S] (channels-last memory) views of FFCV's buffers."""
        images = out[self._slot["image"]]
        if self.config.ffcv_fused_views:  # [B, views, S, S, 3]
            second = images[:, 1].permute(0, 3, 1, 2) if self.config.two_views else None
            return images[:, 0].permute(0, 3, 1, 2), second
        return images, out[self._slot["image_2"]] if self.config.two_views else None


def _pipelines(config: DataConfig, device: torch.device) -> dict:
    """FFCV pipelines per output: the fused (checked, seeded) decoder unless
    ``ffcv_fused_views=False``, which takes FFCV's own decoders (unchecked, unseeded)."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.ndarray import NDArrayDecoder
    from ffcv.pipeline import PipelineSpec
    from ffcv.transforms import ToDevice, ToTensor

    if config.ffcv_fused_views:
        views = 2 if config.two_views else 1
        image = [two_view_decoder(config.image_size, config.crop_scale, seed=config.seed, views=views), ToTensor()]
        image += [ToDevice(device, non_blocking=True)] if device.type != "cpu" else []
    else:
        image = _image_pipeline(config, device)
    pipelines = {
        "image": image,
        "tokens": [NDArrayDecoder(), ToTensor()],
        "eda_tokens": [NDArrayDecoder(), ToTensor()] if config.eda else None,
        "index": [IntDecoder(), ToTensor()],
    }
    if config.two_views and not config.ffcv_fused_views:
        pipelines["image_2"] = PipelineSpec("image", transforms=_image_pipeline(config, device))
    return pipelines
