"""Antialiased resized crop of uint8 RGB pixels, written to be compiled by numba (FFCV's decoder).

The filter is torchvision's (and Pillow's) antialiased bilinear one, the resize the torch
fallback's ``RandomResizedCrop(antialias=True)`` applies: a triangle filter whose support
widens with the downscale factor, taps clipped to the crop (crop first, then resize), weights
normalized per output pixel. So both loaders resample a crop the same way.

Why not FFCV's ``resize_crop``: it calls OpenCV's ``INTER_AREA``, whose generic path for the
non-integer factors of random crops costs more per 224 px view than decoding the JPEG. This one
works a row at a time: the vertical pass blends the source rows an output row needs into one row
(contiguous, so it vectorizes; the row stays in L1), the horizontal pass reads that row and writes
the output pixels, flipped or not, at about half INTER_AREA's cost.
Fixed-point integer arithmetic (16-bit weights, 6 fraction bits between the passes) gives the same
bits whether numba compiles it (with FFCV's fastmath) or not, so a seeded crop is reproducible;
it stays within 0.6 of the float64 filter (0.5 of it the final rounding).

Functions here are plain Python over numpy arrays; :func:`resized_crop_fn` builds them with a
compiler (``numba.njit``, FFCV's ``Compiler.compile``, or none for plain Python). With FFCV's
compiler switched off (its debugging mode) they run as plain Python, ~1000x slower.
"""

from __future__ import annotations

import math

import numpy as np


WEIGHT_BITS = 16  # fixed-point weights: 1.0 is 2**16
ROW_SHIFT = 10  # the vertical pass keeps 6 fraction bits: (255 * 2**16) >> 10 < 2**14
OUT_SHIFT = 2 * WEIGHT_BITS - ROW_SHIFT  # so a horizontal sum stays < 2**31


def _axis_taps(length, size):
    """(first [size] int64, count [size] int64, weights [size, taps] int32) resizing ``length``
    px to ``size`` px: output ``o`` is ``sum_k weights[o, k] * in[first[o] + k] / 2**WEIGHT_BITS``,
    k < count[o]."""
    scale = length / size
    support = max(scale, 1.0)  # bilinear: 1 px of support, stretched by the downscale factor
    inverse = 1.0 / support
    taps = int(math.ceil(support)) * 2 + 1
    first = np.zeros(size, np.int64)
    count = np.zeros(size, np.int64)
    weights = np.zeros((size, taps), np.int32)
    exact = np.zeros(taps, np.float64)
    for o in range(size):
        center = (o + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)  # int() truncates, as in torchvision / Pillow
        hi = min(int(center + support + 0.5), length)
        total = 0.0
        for k in range(hi - lo):
            exact[k] = max(0.0, 1.0 - abs((k + lo - center + 0.5) * inverse))
            total += exact[k]
        for k in range(hi - lo):
            weights[o, k] = np.int32(math.floor(exact[k] / total * (1 << WEIGHT_BITS) + 0.5))
        first[o] = lo
        count[o] = hi - lo
    return first, count, weights


def resized_crop_fn(compile=lambda f: f):
    """``resized_crop(src, src_width, top, left, height, width, flip, out, row)``, built with
    ``compile``. ``src``: the source image's uint8 HxWx3 pixels flattened (C order, ``src_width``
    px per row); the crop is rows ``top_row .. top_row+height``, columns ``left .. left+width``; ``out``:
    uint8 [S_h, S_w, 3], written in place, mirrored left-right when ``flip``; ``row``: int32
    scratch of at least ``3 * width`` values. Integer arithmetic throughout, so the result is
    the same bits compiled or not (FFCV's compiler turns on fastmath)."""
    axis_taps = compile(_axis_taps)
    row_round, out_round = np.int32(1 << (ROW_SHIFT - 1)), np.int32(1 << (OUT_SHIFT - 1))
    zero, top, out_shift = np.int32(0), np.int32(255), np.int32(OUT_SHIFT)

    def resized_crop(src, src_width, top_row, left, height, width, flip, out, row):
        out_h, out_w = out.shape[0], out.shape[1]
        y_first, y_count, y_weights = axis_taps(height, out_h)
        x_first, x_count, x_weights = axis_taps(width, out_w)
        n = 3 * width
        for oy in range(out_h):
            for t in range(n):
                row[t] = row_round
            for k in range(y_count[oy]):
                w = y_weights[oy, k]
                base = ((top_row + y_first[oy] + k) * src_width + left) * 3
                line = src[base : base + n]  # a contiguous slice: this loop vectorizes
                for t in range(n):
                    row[t] += w * np.int32(line[t])
            for t in range(n):
                row[t] = row[t] >> ROW_SHIFT
            dst_row = out[oy]
            for ox in range(out_w):
                r = g = b = out_round
                p = 3 * x_first[ox]
                taps = x_weights[ox]
                for k in range(x_count[ox]):  # int32 casts: numba would widen to int64 (slower)
                    w = taps[k]
                    r = np.int32(r + w * row[p])
                    g = np.int32(g + w * row[p + 1])
                    b = np.int32(b + w * row[p + 2])
                    p += 3
                dst = out_w - 1 - ox if flip else ox
                dst_row[dst, 0] = np.uint8(min(max(r >> out_shift, zero), top))
                dst_row[dst, 1] = np.uint8(min(max(g >> out_shift, zero), top))
                dst_row[dst, 2] = np.uint8(min(max(b >> out_shift, zero), top))

    return compile(resized_crop)
