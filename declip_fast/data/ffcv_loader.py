"""FFCV loader: two image views, text views and index from a ``.beton``, in the batch contract.

The file holds ``image`` (RGBImageField), ``tokens`` (int32 [77]), ``eda_tokens`` (int32 [4, 77]:
four tokenized EDA variants) and ``index`` (the row). Per batch:

- image views 1 and 2: by default (``ffcv_fused_views``) one decoder, :func:`two_view_decoder`,
  decodes each JPEG once and writes two independent random resized crops (``crop_scale``,
  FFCV's crop sampler; the resize is :mod:`declip_fast.data.resize`, torchvision's antialiased
  bilinear filter as the fallback applies it, ~2x faster than FFCV's OpenCV ``INTER_AREA``
  call), each flipped with p = 0.5 (one crop with ``two_views=False``). With ``ffcv_fused_views=False``
  they are two pipelines on the same ``image`` field (``RandomResizedCropRGBImageDecoder``,
  ``RandomHorizontalFlip``, ``ToTensor``, ``ToDevice``, ``ToTorchImage``), which decodes every
  JPEG twice: decoding is most of the work, so that path costs ~1.6x the CPU time. Either way
  the crops go to the device as uint8 and get the batched colour augmentations of
  :mod:`declip_fast.data.augment` there;
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

Reproducible crops: FFCV's compiled pipeline cannot see the epoch or our generators, and FFCV
1.0.2's own crop and flip ops draw from numba's unseeded generator. The fused decoder therefore
draws each sample's crops and flips from a counter-based stream keyed by a hash of the config
seed, the batch's sample ids (which follow the seeded, per-epoch shuffle) and the sample's place
in the batch (:func:`crop_sampler`): the same batch gets the same crops whatever the number of
threads, where an epoch was resumed, or what other threads do (no generator state is shared:
seeding numpy's global generator, as this decoder once did, let concurrent loaders change each
other's crops). The two-pipeline path (``ffcv_fused_views=False``) keeps FFCV's unseeded crops
and flips.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from declip_fast.data.beton import check_beton, start_epoch
from declip_fast.data.loader_config import BatchViews, DataConfig, ResumableEpochs, shard_order, subset_indices

FIELDS = ("image", "tokens", "eda_tokens", "index")  # declip_fast.data.write.FIELDS
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
            return self.indices[np.asarray(picks[self.skip:], dtype=np.int64)]

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
    ops = [RandomResizedCropRGBImageDecoder((size, size), scale=config.crop_scale),
           RandomHorizontalFlip(), ToTensor()]
    if device.type != "cpu":  # on the CPU it would only copy into another buffer
        ops.append(ToDevice(device, non_blocking=True))
    return ops + [ToTorchImage()]


CROP_STREAM = 5  # the fused decoder's seed stream (BatchViews uses 1, 2; the fallback 3, 4)


def _mix32(h):
    """murmur3's 32-bit finalizer on a value < 2**32 held in a uint64: no product reaches 2**64,
    so numba and plain numpy (FFCV's compiler off) agree, and numpy never warns of overflow."""
    h = h ^ (h >> np.uint64(16))
    h = (h * np.uint64(0x85EBCA6B)) & np.uint64(0xFFFFFFFF)
    h = h ^ (h >> np.uint64(13))
    h = (h * np.uint64(0xC2B2AE35)) & np.uint64(0xFFFFFFFF)
    return h ^ (h >> np.uint64(16))


def crop_seeders(compile=lambda f: f):
    """(batch_key, sample_seed), built with ``compile`` (FFCV's ``Compiler.compile`` or none):
    ``batch_key(ids, key)`` folds a batch's sample ids, in order, into ``key`` (32 bits);
    ``sample_seed(batch_key, i)`` is the uint32 seed of the batch's i-th sample."""
    mix = compile(_mix32)

    def batch_key(ids, key):
        h = np.uint64(key)
        for k in range(len(ids)):
            x = np.uint64(ids[k])
            h = mix(h ^ (x & np.uint64(0xFFFFFFFF)))
            h = mix(h ^ (x >> np.uint64(32)))
        return h

    def sample_seed(key, i):
        slot = (np.uint64(i) + np.uint64(0x9E3779B9)) & np.uint64(0xFFFFFFFF)
        return np.uint32(mix(key ^ mix(slot)))

    return compile(batch_key), compile(sample_seed)


def crop_sampler(compile=lambda f: f):
    """``random_view(height, width, scale, ratio, log_ratio, key, base)`` -> (i, j, h, w, flip):
    FFCV's ``get_random_crop`` (10 tries, then a centre crop) plus a flip with p = 0.5, its
    uniforms the draws ``base, base + 1, ...`` of a counter-based stream ``key`` (< 2**32).

    Why not seed ``np.random`` and call FFCV's sampler: without FFCV's compiler that is numpy's
    process-wide generator, shared with every other thread, so another loader's thread (or the
    trainer) reseeding or drawing between a seed and its draws changes the crops. That made exact
    resume flaky under CPU load. A counter-based stream has no state to share."""
    mix = compile(_mix32)

    def uniform(key, k):
        slot = (np.uint64(k) + np.uint64(0x7F4A7C15)) & np.uint64(0xFFFFFFFF)
        return np.float64(mix(key ^ mix(slot))) / 4294967296.0

    uniform_c = compile(uniform)

    def random_view(height, width, scale, ratio, log_ratio, key, base):
        height, width = int(height), int(width)
        flip = uniform_c(key, base + 40) < 0.5
        area = float(height * width)
        for t in range(10):
            k = base + 4 * t
            target_area = area * (scale[0] + (scale[1] - scale[0]) * uniform_c(key, k))
            aspect = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * uniform_c(key, k + 1))
            w = int(round(np.sqrt(target_area * aspect)))
            h = int(round(np.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                i = int((height - h + 1) * uniform_c(key, k + 2))
                j = int((width - w + 1) * uniform_c(key, k + 3))
                return i, j, h, w, flip
        w, h = width, height
        if width / height < ratio[0]:
            h = int(round(w / ratio[0]))
        elif width / height > ratio[1]:
            w = int(round(h * ratio[1]))
        return (height - h) // 2, (width - w) // 2, h, w, flip

    return compile(random_view)


STATUS_BUFFER = 3  # the fused decoder's buffers: pixels, decode scratch, resize scratch, status


def two_view_decoder(size: int, scale: tuple[float, float], ratio=(3 / 4, 4 / 3), seed: int = 0,
                     views: int = 2):
    """An FFCV decoder that decodes each JPEG once and writes ``views`` independent random
    resized crops, each flipped with p = 0.5: uint8 [B, views, size, size, 3]. Two pipelines on
    one field decode every image twice, and decoding is most of the loader's work (two views cost
    nearly twice one view that way). Crops follow FFCV's ``get_random_crop``
    (:func:`crop_sampler`), then :func:`declip_fast.data.resize.resized_crop_fn` (flip
    included), compiled by FFCV's compiler.

    Seeded: each sample's crops draw from a stream keyed by ``seed``, the batch's sample ids and
    its place in the batch (:func:`crop_seeders`), so they depend on the batch, not on thread
    scheduling. Checked: a JPEG libjpeg-turbo refuses (random bytes, a scrambled or cut stream)
    gets a zeroed image and a 1 in its row of the status buffer [B, 1] (:data:`STATUS_BUFFER`);
    FFCV's own decoders ignore the error and serve whatever the buffer held."""
    from dataclasses import replace

    from ffcv.fields.rgb_image import ResizedCropRGBImageDecoder
    from ffcv.pipeline.allocation_query import AllocationQuery

    seed_key = int(np.random.SeedSequence([seed, CROP_STREAM]).generate_state(1)[0])  # < 2**32
    crop_scale, crop_ratio = np.array(scale, dtype=np.float64), np.sort(np.array(ratio, dtype=np.float64))

    class TwoViewRandomResizedCrop(ResizedCropRGBImageDecoder):  # an RGB decoder, so FFCV takes it as one
        def __init__(self):
            super().__init__((size, size))
            self.scale, self.ratio = crop_scale, crop_ratio

        @property
        def get_crop_generator(self):  # abstract in FFCV; this decoder draws with crop_sampler
            return None

        def declare_state_and_memory(self, previous_state):
            state, (_, scratch) = super().declare_state_and_memory(previous_state)
            shape = (views, size, size, 3)
            row = AllocationQuery((3 * int(self.max_width),), np.dtype("<i4"))  # resize scratch
            status = AllocationQuery((1,), np.dtype("<u1"))
            return replace(state, shape=shape), (AllocationQuery(shape, np.dtype("<u1")), scratch, row, status)

        def generate_code(self):
            return _decode_fn(self.memory_read, views, seed_key, crop_scale, crop_ratio)

    return TwoViewRandomResizedCrop()


def _decode_fn(mem_read, views: int, seed_key: int, crop_scale, crop_ratio):
    """The fused decoder's batch function (see :func:`two_view_decoder`), FFCV-compiled."""
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.libffcv import imdecode
    from ffcv.pipeline.compiler import Compiler

    from declip_fast.data.resize import resized_crop_fn

    my_range, jpg = Compiler.get_iterator(), IMAGE_MODES["jpg"]
    imdecode_c, resized_crop_c = Compiler.compile(imdecode), resized_crop_fn(Compiler.compile)
    random_view_c, log_ratio = crop_sampler(Compiler.compile), np.log(crop_ratio)
    batch_key_c, sample_seed_c = crop_seeders(Compiler.compile)

    def decode(batch_indices, my_storage, metadata, storage_state):
        destination, temp_storage, rows, status = my_storage
        batch_key = batch_key_c(batch_indices, seed_key)
        for dst_ix in my_range(len(batch_indices)):
            key = np.uint64(sample_seed_c(batch_key, dst_ix))
            field = metadata[batch_indices[dst_ix]]
            image_data = mem_read(field["data_ptr"], storage_state)
            height, width = np.uint32(field["height"]), np.uint32(field["width"])
            pixels = image_data.reshape(-1)
            failed = 0
            if field["mode"] == jpg:
                pixels = temp_storage[dst_ix]
                if imdecode_c(image_data, pixels, height, width, height, width, 0, 0, 1, 1, False, False) != 0:
                    failed = 1
                pixels = pixels.reshape(-1)[: 3 * height * width]
            status[dst_ix, 0] = failed
            if failed:
                destination[dst_ix] = 0
            else:
                for view in range(views):
                    i, j, h, w, flip = random_view_c(height, width, crop_scale, crop_ratio, log_ratio,
                                                     key, 64 * view)
                    resized_crop_c(pixels, width, i, j, h, w, flip, destination[dst_ix, view], rows[dst_ix])
        return destination[: len(batch_indices)]

    decode.is_parallel = True
    return decode


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
            raise ValueError(f"{config.beton} lacks the field(s) {missing}; write it with "
                             "declip_fast.data.write")
        pipelines = _pipelines(config, device)
        self._loader = Loader(
            config.beton, batch_size=config.batch_size, num_workers=max(1, config.workers()),
            indices=subset_indices(reader.num_samples, config.fraction, config.fraction_seed),
            os_cache=config.os_cache, order=_sharded_order(config, rank, world),
            distributed=world > 1, seed=config.seed, pipelines=pipelines,
            drop_last=config.drop_last)
        # FFCV yields a tuple in the order of its pipeline specs (file fields, then added outputs).
        self._slot = {name: i for i, name in enumerate(self._loader.pipeline_specs)}
        decoder = self._loader.pipeline_specs["image"].decoder if config.ffcv_fused_views else None
        self._status_node = next((n.id for n in self._loader.graph.nodes  # the fused decoder's
                                  if decoder is not None and getattr(n, "decoder", None) is decoder), None)
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
        image = [two_view_decoder(config.image_size, config.crop_scale, seed=config.seed, views=views),
                 ToTensor()]
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
