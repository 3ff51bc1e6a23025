"""The numba CPU kernels of the data path against PyTorch / torchvision.

- ``declip_fast.data.resize``: the FFCV decoder's antialiased resized crop against
  ``torch.nn.functional.interpolate(mode="bilinear", antialias=True)`` in float64 (the filter
  torchvision's ``RandomResizedCrop(antialias=True)``, i.e. the fallback loader, applies), and
  against the fallback's own uint8 transform.
- ``declip_fast.data.augment_cpu``: the colour step and the blur of ``augment`` on a CPU against
  ``augment``'s torch path (itself tested against torchvision in test_loaders.py) and
  torchvision's ``gaussian_blur``.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from declip_fast.data import augment as A
from declip_fast.data import augment_cpu
from declip_fast.data.resize import resized_crop_fn

numba = pytest.importorskip("numba")
jit = lambda f: numba.njit(fastmath=True, nogil=True, error_model="numpy")(f)  # as FFCV's Compiler


@pytest.fixture(scope="module")
def resized_crop():
    return resized_crop_fn(jit)


def _photo(h, w, seed):
    """Smooth colour fields plus noise: edges and texture for a resampler to get wrong."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = 128 + 100 * np.sin(x[..., None] / rng.uniform(3, 20, 3) + y[..., None] / rng.uniform(3, 20, 3))
    return np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)


def _reference(image, top, left, height, width, out_h, out_w, flip):
    crop = torch.from_numpy(image[top : top + height, left : left + width]).permute(2, 0, 1)[None].double()
    ref = F.interpolate(crop, size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False)
    ref = ref[0].permute(1, 2, 0).clamp(0, 255).numpy()
    return ref[:, ::-1] if flip else ref


# (image h, w, crop top, left, height, width, output h, w): downscales by non-integer factors,
# upscales, a crop at the far corner, a 1-px-wide crop, a 14x downscale, a non-square output.
CROPS = [
    (375, 500, 20, 31, 300, 410, 224, 224),
    (375, 500, 100, 200, 90, 120, 224, 224),
    (97, 61, 0, 0, 97, 61, 224, 224),
    (375, 500, 200, 380, 175, 120, 64, 64),
    (50, 40, 10, 39, 30, 1, 16, 16),
    (512, 480, 0, 0, 512, 480, 36, 36),
    (300, 300, 7, 5, 250, 260, 48, 80),
]


@pytest.mark.parametrize("case", CROPS)
@pytest.mark.parametrize("flip", [False, True])
def test_resized_crop_is_torch_antialiased_bilinear(resized_crop, case, flip):
    h, w, top, left, ch, cw, oh, ow = case
    image = _photo(h, w, seed=sum(case))
    out = np.full((oh, ow, 3), 7, np.uint8)
    resized_crop(image.reshape(-1), w, top, left, ch, cw, flip, out, np.empty(3 * cw, np.int32))
    ref = _reference(image, top, left, ch, cw, oh, ow, flip)
    # Rounding to uint8 costs 0.5; 16-bit weights (<= 2**-17 off each) and 6 fraction bits
    # between the passes add at most ~0.06 (<= 31 taps of 0..255).
    assert np.abs(out - ref).max() <= 0.6


def test_resized_crop_without_a_compiler_is_the_same(resized_crop):
    """FFCV's compiler off (as most loader tests run it): plain Python gives the same bits."""
    image, args = _photo(60, 50, 1), (50, 3, 4, 41, 37)
    compiled, plain = np.empty((20, 24, 3), np.uint8), np.empty((20, 24, 3), np.uint8)
    resized_crop(image.reshape(-1), *args, True, compiled, np.empty(150, np.int32))
    resized_crop_fn()(image.reshape(-1), *args, True, plain, np.empty(150, np.int32))
    assert np.array_equal(compiled, plain)  # integer arithmetic: fastmath cannot reorder it


def test_resized_crop_matches_the_fallback_loaders_transform(resized_crop):
    """The fallback crops with torchvision's uint8 resize (fixed-point): within 1 of ours."""
    image = _photo(375, 500, 2)
    top, left, height, width = 40, 60, 280, 330
    out = np.empty((224, 224, 3), np.uint8)
    resized_crop(image.reshape(-1), 500, top, left, height, width, False, out, np.empty(3 * width, np.int32))
    tensor = torch.from_numpy(image).permute(2, 0, 1)
    theirs = TF.resized_crop(tensor, top, left, height, width, [224, 224], antialias=True)
    assert (torch.from_numpy(out).permute(2, 0, 1).int() - theirs.int()).abs().max() <= 1


# -- augment's CPU kernels -----------------------------------------------------------------------


def _layouts(n=6, h=30, w=26, seed=0):
    """The same uint8 images in the layouts loaders hand over: FFCV's channels-last view of a
    [B, 2, H, W, 3] buffer, contiguous NCHW, and a strided crop of a larger batch."""
    gen = torch.Generator().manual_seed(seed)
    pair = torch.randint(0, 256, (n, 2, h, w, 3), generator=gen, dtype=torch.uint8)
    ffcv_view = pair[:, 1].permute(0, 3, 1, 2)
    big = torch.zeros(n, 3, h + 5, w + 7, dtype=torch.uint8)
    big[:, :, 2 : 2 + h, 3 : 3 + w] = ffcv_view
    return {"ffcv": ffcv_view, "nchw": ffcv_view.contiguous(), "strided": big[:, :, 2 : 2 + h, 3 : 3 + w]}


def _torch_path(monkeypatch, images, gen, cfg):
    with monkeypatch.context() as m:
        m.setattr(augment_cpu, "available", lambda images: False)
        return A.augment(images, gen, cfg)


@pytest.mark.parametrize("layout", ["ffcv", "nchw", "strided", "float"])
@pytest.mark.parametrize(
    "cfg",
    [
        A.AugmentConfig(),
        A.AugmentConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0),
        A.AugmentConfig(jitter_p=1.0, grayscale_p=0.5, blur_p=1.0),
    ],
    ids=["moco", "none", "all"],
)
def test_numba_augment_equals_the_torch_path(monkeypatch, layout, cfg):
    images = _layouts()["ffcv" if layout == "float" else layout]
    if layout == "float":
        images = images.float() / 255
    assert augment_cpu.available(images)
    fast = A.augment(images, torch.Generator().manual_seed(5), cfg)
    slow = _torch_path(monkeypatch, images, torch.Generator().manual_seed(5), cfg)
    assert fast.shape == slow.shape and fast.dtype == slow.dtype == torch.float32
    # float32 sums in another order (matrix product, then blur taps over normalized values ~2.6).
    torch.testing.assert_close(fast, slow, atol=3e-6, rtol=0)


def test_numba_blur_matches_torchvision_per_sample():
    images = torch.rand(5, 3, 21, 25)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0])
    chosen = torch.tensor([4, 0, 2])
    kernels = A.gaussian_kernels(sigma[chosen], 9)
    out = images.clone()
    augment_cpu.blur_(out, chosen, kernels)
    for b in chosen.tolist():
        ref = TF.gaussian_blur(images[b], [9, 9], [sigma[b].item()] * 2)
        torch.testing.assert_close(out[b], ref, atol=1e-5, rtol=0)
    untouched = [1, 3]
    assert torch.equal(out[untouched], images[untouched])


def test_numba_blur_refuses_images_smaller_than_its_radius():
    with pytest.raises(ValueError, match="23-tap blur needs images larger than 11 px"):
        augment_cpu.blur_(torch.rand(2, 3, 11, 40), torch.tensor([0]), A.gaussian_kernels(torch.ones(1), 23))


def test_augment_outside_the_numba_kernels_falls_back_to_torch():
    """fp16 input is not a numba dtype: augment still works, through its torch path."""
    images = _layouts()["nchw"]
    assert not augment_cpu.available(images.half())
    cfg = A.AugmentConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    torch.testing.assert_close(
        A.augment(images.half() / 255, None, cfg), A.augment(images, None, cfg), atol=2e-3, rtol=0
    )  # fp16 input carries ~1e-3 relative error
