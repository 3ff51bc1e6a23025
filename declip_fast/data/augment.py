"""Batched MoCo-v2 colour augmentations on the device the batch lands on (DeCLIP's image views).

See ARCHITECTURE.md, "A training step".

The geometric part of a view (random resized crop, horizontal flip) happens where the image is
decoded (FFCV's decoder, or the fallback's workers); everything after it happens here, on the
whole batch at once, with per-sample random parameters drawn from one ``torch.Generator``:

1. colour jitter with p = 0.8: brightness, contrast and saturation factors uniform in
   [0.6, 1.4], a hue rotation uniform in [-0.1, 0.1] turns, applied in the fixed order
   brightness -> contrast -> saturation -> hue;
2. grayscale with p = 0.2 (ITU-R 601 luma 0.299 / 0.587 / 0.114 in all three channels);
3. Gaussian blur with p = 0.5: sigma uniform in [0.1, 2.0], an odd kernel of ~10% of the image
   side (23 taps at 224 px, as SimCLR / MoCo v2), reflect padding, two 1-D depthwise convolutions;
4. ImageNet normalization.

How this differs from torchvision's ``ColorJitter`` / ``RandomGrayscale`` chain, and why:

- Every step of 1, 2 and 4 is affine in RGB, so they compose into ONE 3x3 matrix and offset per
  sample, applied in one batched matrix product, then one clamp (to the normalized images of
  [0, 1]). torchvision clamps after each jitter op; we clamp once at the end. Intermediate
  clipping only matters where a brightness or contrast factor above 1 pushed a pixel out of range
  first. The fused form is ~20x faster on a CPU, where this runs when there is no GPU.
- Hue is a rotation of the chroma plane of YIQ (the luma stays), the linear hue rotation of
  image processing libraries, instead of a shift on HSV's hexcone (non-linear, and it changes
  luma). Same parameter, same direction (red turns towards yellow for a positive shift).
- The four jitter ops run in a fixed order. torchvision draws an order per image; per-sample
  orders would cost a matrix product per order, for a difference nobody has shown to matter.
- Normalization commutes with a blur whose taps sum to 1, so it is folded into the matrix and the
  blur runs last, on normalized values.

On a CPU with numba installed (FFCV brings it), the matrix step and the blur run as numba loops
(:mod:`declip_fast.data.augment_cpu`: one pass from any input layout, ~2-3x faster than these
torch ops, same results to float32 rounding); the torch code below is the reference they are
tested against, and what runs on a GPU or without numba.

Samples that skip an op get identity parameters. On CUDA every sample goes through the blur
(identity samples with a delta kernel): no data-dependent shapes, no host sync. On the CPU only
the blurred samples are gathered and convolved, which halves the dominant cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from declip_fast.data import augment_cpu

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMA = (0.299, 0.587, 0.114)
CPU_STRIP = 4096  # pixels per in-place step of the colour transform on a CPU
# RGB -> YIQ (FCC NTSC); its first row is LUMA.
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.5959, -0.2746, -0.3213), (0.2115, -0.5227, 0.3112))


@dataclass(frozen=True)
class AugmentConfig:
    """The colour part of a MoCo-v2 view; the defaults are MoCo-v2's."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_fraction: float = 0.1

    def __post_init__(self):
        for name in ("jitter_p", "grayscale_p", "blur_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        lo, hi = self.blur_sigma
        if not 0.0 < lo <= hi:
            raise ValueError(f"blur_sigma must satisfy 0 < low <= high, got {self.blur_sigma}")


def kernel_size(image_size: int, fraction: float = 0.1) -> int:
    """Odd blur kernel of about ``fraction`` of the image side, at least 3 taps."""
    k = int(fraction * image_size)
    return max(3, k + 1 - k % 2)


def _luma_matrix(device) -> torch.Tensor:
    return torch.tensor(LUMA, device=device).expand(3, 3)


def hue_matrices(turns: torch.Tensor) -> torch.Tensor:
    """[n, 3, 3] RGB matrices rotating the YIQ chroma plane by ``turns`` (luma unchanged)."""
    yiq = torch.tensor(_RGB_TO_YIQ, dtype=torch.float64)  # inverted on the CPU: no GPU solver call
    yiq, yiq_inv = yiq.to(turns.device, torch.float32), torch.linalg.inv(yiq).to(turns.device, torch.float32)
    # Negative angle in the (I, Q) plane = red towards yellow, as HSV hue grows.
    cos, sin = torch.cos(2 * math.pi * turns), torch.sin(-2 * math.pi * turns)
    rot = torch.zeros(turns.shape[0], 3, 3, device=turns.device)
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    return yiq_inv @ rot @ yiq


def colour_transform(
    channel_means: torch.Tensor, jitter: torch.Tensor, gray: torch.Tensor, generator, config: AugmentConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (matrix [B, 3, 3], offset [B, 3, 1]) mapping RGB in [0, 1] to jittered and
    possibly grayscale RGB (before normalization); identity where neither applies.
    ``channel_means`` [B, 3]: the mean of each channel of each image, in [0, 1]."""
    n, dev = channel_means.shape[0], channel_means.device
    factor = lambda spread: 1.0 + spread * (2.0 * torch.rand(n, generator=generator, device=dev) - 1.0)
    bright, contrast, sat = factor(config.brightness), factor(config.contrast), factor(config.saturation)
    turns = config.hue * (2.0 * torch.rand(n, generator=generator, device=dev) - 1.0)
    one = torch.ones(n, device=dev)
    bright, contrast, sat = (torch.where(jitter, v, one) for v in (bright, contrast, sat))
    turns = torch.where(jitter, turns, torch.zeros_like(turns))

    eye, luma = torch.eye(3, device=dev), _luma_matrix(dev)
    # Contrast blends with the mean luma of the brightened image: brightness times the mean luma.
    mean_luma = channel_means @ torch.tensor(LUMA, device=dev)
    scale = (bright * contrast).view(n, 1, 1)
    saturate = sat.view(n, 1, 1) * eye + (1.0 - sat).view(n, 1, 1) * luma
    matrix = hue_matrices(turns) @ saturate * scale
    # Saturation and hue keep gray gray (their rows sum to 1), so the contrast offset stays a gray
    # level, equal in the three channels.
    offset = ((1.0 - contrast) * bright * mean_luma).view(n, 1, 1).expand(n, 3, 1)
    matrix = torch.where(gray.view(n, 1, 1), luma @ matrix, matrix)
    return matrix, offset.contiguous()


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """[n, size] normalized 1-D Gaussian taps, one row per sigma."""
    pos = torch.arange(size, device=sigma.device, dtype=torch.float32) - (size - 1) / 2
    taps = torch.exp(-(pos[None, :] ** 2) / (2.0 * sigma[:, None] ** 2))
    return taps / taps.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Blur each sample of float [B, C, H, W] with its own separable kernel [B, k], reflect
    padding; a new tensor, channels-last strided. Depthwise convolution over B * C groups in
    channels-last layout (oneDNN's fast depthwise layout: ~2x over the default one on a CPU)."""
    b, c, h, w = x.shape
    k = kernels.shape[1]
    pad = k // 2
    if pad >= min(h, w):
        raise ValueError(f"a {k}-tap blur needs images larger than {pad} px, got {h}x{w}")
    weight = kernels.repeat_interleave(c, dim=0)
    flat = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    flat = flat.contiguous(memory_format=torch.channels_last)
    flat = F.conv2d(flat, weight.view(b * c, 1, k, 1), groups=b * c)
    flat = F.conv2d(flat, weight.view(b * c, 1, 1, k), groups=b * c)
    return flat.view(b, c, h, w)


def augment(
    images: torch.Tensor, generator: torch.Generator | None = None, config: AugmentConfig = AugmentConfig()
) -> torch.Tensor:
    """MoCo-v2 colour augmentations + ImageNet normalization of a batch, on its own device.

    ``images``: uint8 [B, 3, H, W] (0..255) or floating point in [0, 1]; never modified (loader
    buffers may be reused). Returns a new float32 [B, 3, H, W]. ``generator`` must live on the
    images' device; the same generator state gives the same output.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")
    n, _, h, w = images.shape
    dev = images.device
    draw = lambda: torch.rand(n, generator=generator, device=dev)
    jitter, gray, blur = draw() < config.jitter_p, draw() < config.grayscale_p, draw() < config.blur_p
    lo, hi = config.blur_sigma
    sigma = lo + (hi - lo) * draw()
    numba_cpu = augment_cpu.available(images)  # one fused pass on a CPU (numba), else torch ops
    if numba_cpu:  # the means only matter to jittered samples (contrast)
        means = augment_cpu.channel_means(images) if config.jitter_p > 0 else torch.zeros(n, 3)
    else:  # one pass from any layout (FFCV hands over channels-last uint8) into the only new buffer
        out = torch.empty(n, 3, h, w, device=dev)
        out.copy_(images)
        flat = out.view(n, 3, h * w)
        means = flat.mean(2)
    pixel_scale = 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0
    matrix, offset = colour_transform(means * pixel_scale, jitter, gray, generator, config)

    # Fold the uint8 scale and the normalization (x - mean) / std into the matrix and offset.
    mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1)
    std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1)
    matrix = matrix * (pixel_scale / std)
    offset = (offset - mean) / std
    # In place, a strip of pixels at a time on a CPU: the temporaries stay in cache and come
    # from the heap, where whole-batch temporaries (38 MB at B=64, 224 px) would be fresh mmaps.
    # The clamp to [0, 1] before normalization, as two binary ops: clamp_ with tensor bounds
    # is ~5x slower on a CPU.
    low, high = (0.0 - mean) / std, (1.0 - mean) / std
    if numba_cpu:
        out = augment_cpu.colour(images, matrix, offset, low, high)
    else:
        strip = h * w if dev.type == "cuda" else CPU_STRIP
        for start in range(0, h * w, strip):
            part = flat[:, :, start : start + strip]
            mixed = torch.baddbmm(offset, matrix, part)
            torch.maximum(mixed, low, out=mixed)
            part.copy_(torch.minimum(mixed, high, out=mixed))

    if config.blur_p == 0:
        return out
    size = kernel_size(min(h, w), config.blur_kernel_fraction)
    kernels = gaussian_kernels(sigma, size)
    if dev.type == "cuda":
        delta = torch.zeros(size, device=dev)
        delta[size // 2] = 1.0
        return gaussian_blur(out, torch.where(blur[:, None], kernels, delta)).contiguous()
    chosen = blur.nonzero().squeeze(1)
    if not chosen.numel():
        return out
    if numba_cpu:
        augment_cpu.blur_(out, chosen, kernels[chosen])
    else:  # advanced indexing, not index_select: the latter is ~10x slower on large CPU rows
        out[chosen] = gaussian_blur(out[chosen], kernels[chosen])
    return out
