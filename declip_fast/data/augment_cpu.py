"""The colour step of :func:`declip_fast.data.augment.augment` on a CPU, as numba loops.

On a CPU the colour step is memory-bound: read the uint8 crops, write float32 [B, 3, S, S].
Done with torch ops it is several passes over the 38 MB of a 64 x 224 px batch (convert, channel
means, a small batched matrix product per strip, two clamps), which on a CPU costs as much as
decoding and cropping the batch. Here it is two passes over the uint8 pixels, in any
layout (FFCV hands over channels-last views, the fallback NCHW): one sums each image's channels
(the contrast factor needs the mean luma), one applies each image's 3x3 matrix and offset, clamps
and writes the normalized float32 result, several times faster.

Used when numba imports (FFCV depends on it); otherwise ``augment`` keeps its torch path, which
computes the same function (tested against each other).
"""

from __future__ import annotations

import functools

import numpy as np
import torch


def _channel_sums(src, starts, hw, planar, sums):
    """sums[b, c] = the sum of channel c of image b, which is ``src[starts[b]:][:3 * hw]``
    (HWC order, or CHW when ``planar``)."""
    for b in range(starts.shape[0]):
        px = src[starts[b] : starts[b] + 3 * hw]
        s0 = s1 = s2 = 0.0
        if planar:
            for i in range(hw):
                s0 += px[i]
                s1 += px[hw + i]
                s2 += px[2 * hw + i]
        else:
            for i in range(hw):
                s0 += px[3 * i]
                s1 += px[3 * i + 1]
                s2 += px[3 * i + 2]
        sums[b, 0], sums[b, 1], sums[b, 2] = s0, s1, s2


def _colour(src, starts, hw, planar, matrix, offset, low, high, out):
    """out[b, c, i] = clamp(matrix[b, c] . pixel_i + offset[b, c], low[c], high[c]) for image b at
    ``src[starts[b]:][:3 * hw]`` (HWC order, or CHW when ``planar``); ``out`` float32 [B, 3, hw].
    Contiguous 1-D slices, constant strides and float32 scalars, so LLVM vectorizes the pixel
    loops (a runtime stride or a float64 literal makes them 10x slower)."""
    lo0, lo1, lo2, hi0, hi1, hi2 = low[0], low[1], low[2], high[0], high[1], high[2]
    for b in range(starts.shape[0]):
        m00, m01, m02 = matrix[b, 0, 0], matrix[b, 0, 1], matrix[b, 0, 2]
        m10, m11, m12 = matrix[b, 1, 0], matrix[b, 1, 1], matrix[b, 1, 2]
        m20, m21, m22 = matrix[b, 2, 0], matrix[b, 2, 1], matrix[b, 2, 2]
        o0, o1, o2 = offset[b, 0], offset[b, 1], offset[b, 2]
        d0, d1, d2 = out[b, 0], out[b, 1], out[b, 2]
        if planar:
            s0 = src[starts[b] : starts[b] + hw]
            s1 = src[starts[b] + hw : starts[b] + 2 * hw]
            s2 = src[starts[b] + 2 * hw : starts[b] + 3 * hw]
            for i in range(hw):
                r, g, v = np.float32(s0[i]), np.float32(s1[i]), np.float32(s2[i])
                d0[i] = min(max(m00 * r + m01 * g + m02 * v + o0, lo0), hi0)
                d1[i] = min(max(m10 * r + m11 * g + m12 * v + o1, lo1), hi1)
                d2[i] = min(max(m20 * r + m21 * g + m22 * v + o2, lo2), hi2)
        else:
            px = src[starts[b] : starts[b] + 3 * hw]
            for i in range(hw):
                r, g, v = np.float32(px[3 * i]), np.float32(px[3 * i + 1]), np.float32(px[3 * i + 2])
                d0[i] = min(max(m00 * r + m01 * g + m02 * v + o0, lo0), hi0)
                d1[i] = min(max(m10 * r + m11 * g + m12 * v + o1, lo1), hi1)
                d2[i] = min(max(m20 * r + m21 * g + m22 * v + o2, lo2), hi2)


def _blur(out, chosen, taps, first, last, padded, row):
    """Blur planes of ``out`` float32 [B, 3, H, W] in place: image ``chosen[j]`` with the
    separable kernel ``taps[j]`` (odd length 2r + 1), reflect padding; only taps ``first[j] ..
    last[j]`` (the rest are too small to change a float32 sum). Scratch: ``padded`` [H + 2r, W],
    ``row`` [W + 2r]. Both passes are row AXPYs, which vectorize."""
    h, w = out.shape[2], out.shape[3]
    r = (taps.shape[1] - 1) // 2
    for j in range(chosen.shape[0]):
        kernel, k0, k1 = taps[j], first[j], last[j]
        for c in range(3):
            plane = out[chosen[j], c]
            for y in range(h):  # horizontal: reflect-pad the row, blur it into padded[r + y]
                src = plane[y]
                row[r : r + w] = src
                for x in range(r):
                    row[r - 1 - x] = src[x + 1]
                    row[r + w + x] = src[w - 2 - x]
                dst = padded[r + y]
                dst[:] = np.float32(0.0)
                for k in range(k0, k1):
                    wk, src = kernel[k], row[k : k + w]  # a slice, not row[x + k]: 6x faster
                    for x in range(w):
                        dst[x] += wk * src[x]
            for y in range(r):  # reflect the blurred rows
                padded[r - 1 - y] = padded[r + y + 1]
                padded[r + h + y] = padded[r + h - 2 - y]
            for y in range(h):  # vertical, back into the plane
                dst = plane[y]
                dst[:] = np.float32(0.0)
                for k in range(k0, k1):
                    wk, src = kernel[k], padded[y + k]
                    for x in range(w):
                        dst[x] += wk * src[x]


@functools.cache
def _kernels():
    """(channel_sums, colour, blur) compiled by numba (on first use), or None without numba."""
    try:
        import numba
    except ImportError:
        return None
    # cache: compiling the three costs ~5 s, once per machine instead of once per process.
    jit = numba.njit(nogil=True, fastmath=True, error_model="numpy", cache=True)
    return jit(_channel_sums), jit(_colour), jit(_blur)


def available(images) -> bool:
    """Whether this module handles ``images`` (a CPU tensor of uint8 or float32, numba present)."""
    return (
        images.device.type == "cpu"
        and images.dtype in (torch.uint8, torch.float32)
        and images.numel() > 0
        and _kernels() is not None
    )


def _flat(images):
    """(1-D numpy view of the storage the images span, start of each image in it, planar):
    images stored HWC (channels-last) or CHW each are read in place, others copied to CHW."""
    n, _, h, w = images.shape
    sb, sc, sy, sx = images.stride()
    planar = (sc, sy, sx) == (h * w, w, 1)
    if not planar and (sc, sy, sx) != (1, 3 * w, 3):
        images, sb, planar = images.contiguous(), 3 * h * w, True
    span = (n - 1) * sb + 3 * h * w
    base = torch.as_strided(images, (span,), (1,), images.storage_offset()).numpy()
    return base, np.arange(n, dtype=np.int64) * sb, planar


def channel_means(images):
    """float32 [B, 3] per-image channel means (in the images' own units) of [B, 3, H, W]."""
    n, _, h, w = images.shape
    sums = np.empty((n, 3), np.float64)
    base, starts, planar = _flat(images)
    _kernels()[0](base, starts, h * w, planar, sums)
    return torch.from_numpy(sums / (h * w)).float()


def colour(images, matrix, offset, low, high):
    """New float32 [B, 3, H, W]: ``clamp(matrix @ pixel + offset, low, high)`` per pixel.
    ``matrix`` [B, 3, 3] and ``offset`` [B, 3] act on the raw pixel values; ``low`` / ``high`` [3]."""
    n, _, h, w = images.shape
    # numpy, not torch.empty: numpy asks for transparent huge pages on large buffers, and the
    # first touch of a fresh 38 MB output then faults in far fewer pages, a few times faster.
    out = torch.from_numpy(np.empty((n, 3, h, w), np.float32))
    as_np = lambda t: np.ascontiguousarray(t.detach().to(torch.float32).numpy())
    base, starts, planar = _flat(images)
    _kernels()[1](
        base,
        starts,
        h * w,
        planar,
        as_np(matrix),
        as_np(offset.reshape(n, 3)),
        as_np(low.reshape(3)),
        as_np(high.reshape(3)),
        out.view(n, 3, h * w).numpy(),
    )
    return out


BLUR_TAP_FLOOR = 1e-8  # outer taps below this weight are skipped: < 1e-7 change on ~2.6-sized values


def blur_(images, chosen, kernels):
    """Blur ``images[chosen[j]]`` (float32 [B, 3, H, W], C order) in place with the normalized
    1-D kernel ``kernels[j]`` along both axes, reflect padding (as ``augment.gaussian_blur``)."""
    _, _, h, w = images.shape
    size = kernels.shape[1]
    taps = np.ascontiguousarray(kernels.to(torch.float32).numpy())
    big = taps >= BLUR_TAP_FLOOR  # symmetric, centre always kept
    first = big.argmax(1).astype(np.int64)
    last = size - first
    r = (size - 1) // 2
    if r >= min(h, w):
        raise ValueError(f"a {size}-tap blur needs images larger than {r} px, got {h}x{w}")
    padded, row = np.empty((h + 2 * r, w), np.float32), np.empty(w + 2 * r, np.float32)
    _kernels()[2](images.numpy(), chosen.numpy().astype(np.int64), taps, first, last, padded, row)
