"""The FFCV loader's fused two-view decoder (:func:`two_view_decoder`): each JPEG of a ``.beton``
decoded once, ``views`` seeded random resized crops cut from it, undecodable JPEGs flagged.

Reproducible crops: FFCV's compiled pipeline cannot see the epoch or our generators, and FFCV
1.0.2's own crop and flip ops draw from numba's unseeded generator. The fused decoder therefore
draws each sample's crops and flips from a counter-based stream keyed by a hash of the config
seed, the batch's sample ids (which follow the seeded, per-epoch shuffle) and the sample's place
in the batch (:func:`crop_seeders`, :func:`crop_sampler`): the same batch gets the same crops
whatever the number of threads, where an epoch was resumed, or what other threads do (no
generator state is shared: seeding numpy's global generator, as this decoder once did, let
concurrent loaders change each other's crops).

The loader (:mod:`declip_fast.data.ffcv_loader`) reads the decoder's status buffer
(:data:`STATUS_BUFFER`) to drop and count the samples whose JPEG did not decode. FFCV is imported
inside the functions (an optional dependency).
"""

from __future__ import annotations

import numpy as np

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


def two_view_decoder(size: int, scale: tuple[float, float], ratio=(3 / 4, 4 / 3), seed: int = 0, views: int = 2):
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
                    i, j, h, w, flip = random_view_c(height, width, crop_scale, crop_ratio, log_ratio, key, 64 * view)
                    resized_crop_c(pixels, width, i, j, h, w, flip, destination[dst_ix, view], rows[dst_ix])
        return destination[: len(batch_indices)]

    decode.is_parallel = True
    return decode
