"""Loaders and batched augmentations: the batch contract, both backends, sharding, bad samples.

One small data set (64 JPEGs of 40-63 px, captions with several words) is written once per module
as a CSV for the torch fallback and as a ``.beton`` (this module's own DatasetWriter helper, with
four real EDA variants per caption) for FFCV; FFCV's JIT compiler is off (tiny epochs).
"""

import csv
import logging
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from declip_fast.data import augment as A
from declip_fast.data import loader as L
from declip_fast.data.masking import IGNORE_INDEX
from declip_fast.data.tokenizer import tokenize
from tests.data.pairs import N, write_beton
from tests.data.pairs import captions as _captions
from tests.distributed.launch import run_ranks

# FFCV's JIT compiler off for this module (tiny epochs): tests/conftest.py.
pytestmark = pytest.mark.usefixtures("ffcv_uncompiled")

SIZE, BATCH = 32, 8
BACKENDS = ["ffcv", "torch"]
# Loader variants: FFCV with its fused two-view decoder (default), FFCV with two pipelines on the
# image field, and the torch fallback.
VARIANTS = ["ffcv", "ffcv-2pipe", "torch"]
MEAN = torch.tensor(A.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(A.IMAGENET_STD).view(1, 3, 1, 1)


def _config(data, backend, **kw):
    if backend == "ffcv-2pipe":
        backend, kw = "ffcv", {"ffcv_fused_views": False, **kw}
    kw = {"batch_size": BATCH, "image_size": SIZE, "num_workers": 2, "seed": 3, **kw}
    return L.DataConfig(beton=data["beton"], source=data["csv"], backend=backend, **kw)


def _epoch(data, backend, **kw):
    return list(L.build_loader(_config(data, backend, **kw), "cpu"))


def _cat(batches, key):
    return torch.cat([b[key] for b in batches])


# -- config and backend choice -------------------------------------------------------------------


def test_config_from_dict_names_unknown_keys():
    cfg = L.DataConfig.from_dict({"batch_size": 4, "crop_scale": [0.3, 1.0], "augment": {"blur_p": 0.1}})
    assert cfg.crop_scale == (0.3, 1.0) and cfg.augment.blur_p == 0.1
    with pytest.raises(ValueError, match="batch_sise"):
        L.DataConfig.from_dict({"batch_sise": 4})
    with pytest.raises(ValueError, match="augment.blur"):
        L.DataConfig.from_dict({"augment": {"blur": 0.5}})
    with pytest.raises(ValueError, match="backend"):
        L.DataConfig(backend="dali")


def test_backend_choice_is_explicit(data, monkeypatch, caplog):
    assert L.choose_backend(_config(data, "auto")) == "ffcv"
    assert L.choose_backend(_config(data, "torch")) == "torch"
    monkeypatch.setattr(L, "ffcv_import_error", lambda: "ImportError: No module named 'ffcv'")
    with pytest.raises(ImportError, match="backend='ffcv'.*No module named 'ffcv'.*backend='torch'"):
        L.choose_backend(_config(data, "ffcv"))
    with caplog.at_level(logging.WARNING):
        assert L.choose_backend(_config(data, "auto")) == "torch"
    assert "FFCV cannot be imported" in caplog.text
    with pytest.raises(ValueError, match="config.source"):
        L.choose_backend(L.DataConfig(beton=data["beton"]))


# -- the batch contract --------------------------------------------------------------------------


def _check_contract(batches, two_views=True, mlm=True, eda=True):
    keys = {"images_1", "text_1", "text_1_lengths", "index"} | ({"images_2"} if two_views else set())
    keys |= ({"mlm_targets"} if mlm else set()) | ({"text_2", "text_2_lengths"} if eda else set())
    lo, hi = ((0 - MEAN) / STD).view(3), ((1 - MEAN) / STD).view(3)
    assert len(batches) == N // BATCH
    for b in batches:
        assert set(b) == keys
        for k in keys & {"images_1", "images_2"}:
            img = b[k]
            assert img.dtype == torch.float32 and img.shape == (BATCH, 3, SIZE, SIZE) and img.is_contiguous()
            per_channel = img.transpose(0, 1).reshape(3, -1)
            assert (per_channel.min(1).values >= lo - 1e-5).all()
            assert (per_channel.max(1).values <= hi + 1e-5).all()
        for k in keys & {"text_1", "mlm_targets", "text_2"}:
            assert b[k].dtype == torch.int64 and b[k].shape == (BATCH, 77)
        assert b["index"].dtype == torch.int64 and b["index"].shape == (BATCH,)
        assert ((b["index"] >= 0) & (b["index"] < N)).all()
        assert b["text_1"].min() >= 0 and b["text_1"].max() <= 49408
        for view in ("text_1", "text_2") if eda else ("text_1",):
            # Each caption's tokens up to and including its end token, on the host.
            lengths = b[f"{view}_lengths"]
            assert lengths.device.type == "cpu" and lengths.dtype == torch.int64 and lengths.shape == (BATCH,)
            tokens = b[view].cpu()
            rows = torch.arange(BATCH)
            assert torch.all(tokens[rows, lengths - 1] == 49407)
            assert not torch.any((tokens == 49407) & (torch.arange(77) < lengths[:, None] - 1))
    images = _cat(batches, "images_1")
    assert images.min() < -1.5 and images.max() > 1.5  # really normalized [0, 1] data, not [0, 255]


@pytest.mark.parametrize("backend", VARIANTS)
def test_batch_contract(data, backend):
    _check_contract(_epoch(data, backend))
    _check_contract(_epoch(data, backend, two_views=False, mlm=False, eda=False), False, False, False)


def test_backends_agree_on_structure_and_order(data):
    ffcv, fallback = _epoch(data, "ffcv"), _epoch(data, "torch")
    for a, b in zip(ffcv, fallback):
        assert {k: (v.dtype, v.shape) for k, v in a.items()} == {k: (v.dtype, v.shape) for k, v in b.items()}
        assert torch.equal(a["index"], b["index"])  # the same sampler order
    for key in ("images_1", "images_2"):  # the same value ranges and similar statistics
        x, y = _cat(ffcv, key), _cat(fallback, key)
        assert abs(x.mean() - y.mean()) < 0.15 and abs(x.std() - y.std()) < 0.15


# -- views ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", VARIANTS)
def test_views_differ_and_captions_match(data, backend):
    no_colour = A.AugmentConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)  # geometry only
    batches = _epoch(data, backend, mlm=False, augment=no_colour)
    index = _cat(batches, "index")
    one, two = _cat(batches, "images_1"), _cat(batches, "images_2")
    gap = lambda a, b: (a - b).abs().flatten(1).mean(1)
    # Different crops, not only a different flip of the same crop.
    assert (torch.minimum(gap(one, two), gap(one, two.flip(-1))) > 0.05).all(), "two crops per sample"
    assert torch.equal(_cat(batches, "text_1"), data["tokens"][index])
    assert sorted(index.tolist()) == list(range(N))


@pytest.mark.parametrize("backend", BACKENDS)
def test_masking_is_applied_as_specified(data, backend):
    batches = _epoch(data, backend)
    index, masked, targets = _cat(batches, "index"), _cat(batches, "text_1"), _cat(batches, "mlm_targets")
    original = data["tokens"][index]
    chosen = targets != IGNORE_INDEX
    assert torch.equal(targets[chosen], original[chosen]), "targets are the original ids"
    assert torch.equal(masked[~chosen], original[~chosen]), "unchosen tokens are untouched"
    from declip_fast.data.masking import maskable_positions

    maskable = maskable_positions(original)
    assert not (chosen & ~maskable).any(), "only words are chosen, never start/end/padding"
    assert chosen.any(1).all(), "every caption has a target"
    assert 0.08 < chosen.sum() / maskable.sum() < 0.3  # ~15% (+1 forced per short caption)
    assert (masked[chosen] == 49408).float().mean() > 0.5  # mostly <mask>


@pytest.fixture(scope="module")
def gradients(tmp_path_factory):
    """64 square images, dark on the left, bright on the right: a flip shows in the output."""
    from PIL import Image

    root = tmp_path_factory.mktemp("gradients")
    ramp = np.linspace(0, 255, 48)[None, :, None]
    image = np.broadcast_to(ramp, (48, 48, 3)).astype(np.uint8)
    captions = _captions()
    rows = []
    for i in range(N):
        Image.fromarray(image).save(root / f"{i}.png")
        rows.append((f"{i}.png", captions[i]))
    with open(root / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    write_beton(root / "data.beton", [image] * N, captions)
    return {"beton": str(root / "data.beton"), "csv": str(root / "pairs.csv")}


@pytest.mark.slow
def test_fused_decoder_compiled_by_numba(gradients, data):
    """The tests above run FFCV's pipeline as plain Python; this one lets numba compile it."""
    from ffcv.pipeline.compiler import Compiler

    Compiler.set_enabled(True)
    try:
        _check_contract(_epoch(data, "ffcv"))
        batches = _epoch(gradients, "ffcv", crop_scale=(1.0, 1.0), mlm=False, eda=False)
    finally:
        Compiler.set_enabled(False)
    images = torch.cat([_cat(batches, "images_1"), _cat(batches, "images_2")]).mean(1)
    flipped = images[:, :, : SIZE // 2].mean((1, 2)) > images[:, :, SIZE // 2 :].mean((1, 2))
    assert abs(flipped.float().mean().item() - 0.5) < 0.15


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_decoder_views_are_torchvisions_resize_of_the_image(gradients, compiled):
    """crop_scale (1, 1) on a square image: each view is the whole 48 px ramp resized to 32 px
    with torch's antialiased bilinear filter (the fallback's), flipped or not."""
    from ffcv.pipeline.compiler import Compiler

    Compiler.set_enabled(compiled)
    try:
        batches = _epoch(
            gradients,
            "ffcv",
            crop_scale=(1.0, 1.0),
            mlm=False,
            eda=False,
            augment=A.AugmentConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0),
        )
    finally:
        Compiler.set_enabled(False)
    views = 255 * _unnormalize(torch.cat([_cat(batches, "images_1"), _cat(batches, "images_2")]))
    ramp = torch.linspace(0, 255, 48).to(torch.uint8).double().view(1, 1, 1, 48).expand(1, 3, 48, 48)
    ref = F.interpolate(ramp, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    ref = ref.float()
    error = torch.minimum((views - ref).abs().amax((1, 2, 3)), (views - ref.flip(-1)).abs().amax((1, 2, 3)))
    assert error.max() < 3.0  # the ramp went through JPEG (quality 90) in the .beton


@pytest.mark.parametrize("backend", VARIANTS)
def test_each_view_is_flipped_independently_with_p_half(gradients, backend):
    batches = _epoch(gradients, backend, crop_scale=(1.0, 1.0), mlm=False, eda=False)
    flipped = []
    for key in ("images_1", "images_2"):
        images = _cat(batches, key).mean(1)  # colour ops keep a gray ramp monotonic
        flipped.append(images[:, :, : SIZE // 2].mean((1, 2)) > images[:, :, SIZE // 2 :].mean((1, 2)))
    assert abs(torch.cat(flipped).float().mean().item() - 0.5) < 0.15  # 128 views: +-3.4 sigma
    disagree = (flipped[0] != flipped[1]).float().mean().item()
    assert 0.25 < disagree < 0.75, "the two views draw their flips independently"


def test_ffcv_text_2_is_one_of_the_written_eda_variants(data):
    picked = []
    for _ in range(2):
        batches = _epoch(data, "ffcv")
        index, text_2 = _cat(batches, "index"), _cat(batches, "text_2")
        variants = data["eda_tokens"][index]  # [N, 4, 77]
        hits = (variants == text_2[:, None]).all(-1)
        assert hits.any(1).all(), "text_2 must be one of its sample's EDA rows"
        picked.append(hits.float().argmax(1))
    assert len(set(picked[0].tolist())) > 1, "the row is drawn per sample"


def test_fallback_text_2_is_an_eda_view_of_the_caption(data):
    from declip_fast.data.eda import eda
    from declip_fast.data.torch_loader import EDA_STREAM

    seed = 3
    batches = _epoch(data, "torch", seed=seed)
    index, text_2 = _cat(batches, "index"), _cat(batches, "text_2")
    expected = tokenize(
        [eda(data["captions"][i], random.Random(L.epoch_seed(seed, 0, i, EDA_STREAM))) for i in index.tolist()]
    )
    assert torch.equal(text_2, expected)
    assert not torch.equal(text_2, data["tokens"][index]), "EDA must change some captions"


def test_epochs_reshuffle_and_are_reproducible(data):
    loader = L.build_loader(_config(data, "ffcv"), "cpu")
    first, second = [_cat(list(loader), "index") for _ in range(2)]
    assert not torch.equal(first, second)
    loader.set_epoch(1)
    again = list(loader)
    assert torch.equal(_cat(again, "index"), second)


def test_fallback_is_seeded_per_sample_whatever_the_worker_count(data):
    """Crops, EDA, masking and colour draws depend on (seed, epoch, sample), not on workers."""
    in_process, two_workers = _epoch(data, "torch", num_workers=0), _epoch(data, "torch", num_workers=2)
    for a, b in zip(in_process, two_workers):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other_seed = _epoch(data, "torch", num_workers=0, seed=4)
    assert not torch.equal(in_process[0]["images_1"], other_seed[0]["images_1"])


# -- distributed ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_cover_every_sample_once(data, backend):
    for epoch in range(2):
        shards = []
        for rank in range(2):
            loader = L.build_loader(_config(data, backend, rank=rank, world_size=2), "cpu")
            loader.set_epoch(epoch)
            shards.append(_cat(list(loader), "index").tolist())
        assert len(shards[0]) == len(shards[1]) == N // 2
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == list(range(N))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fraction_reads_one_fixed_subset(data, backend):
    # 0.5 of the rows: the subset subset_indices names, every epoch (in another order), shared by
    # the two ranks without overlap, and the same on both backends (same fraction_seed).
    want = L.subset_indices(N, 0.5, 7)
    assert len(want) == N // 2 and len(set(want.tolist())) == N // 2
    assert set(L.subset_indices(N, 0.25, 7)) < set(want)  # nested under one seed
    assert set(L.subset_indices(N, 0.5, 8)) != set(want)
    orders = []
    for epoch in range(2):
        shards = []
        for rank in range(2):
            cfg = _config(data, backend, rank=rank, world_size=2, fraction=0.5, fraction_seed=7, drop_last=False)
            loader = L.build_loader(cfg, "cpu")
            assert loader.num_samples == N // 2
            loader.set_epoch(epoch)
            shards.append(_cat(list(loader), "index").tolist())
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == want.tolist()
        orders.append(shards[0])
    assert orders[0] != orders[1]
    with pytest.raises(ValueError, match="fraction"):
        L.DataConfig(source=data["csv"], fraction=0.0)
    with pytest.raises(ValueError, match="make no batch of 8"):  # 3 samples, drop_last
        L.build_loader(_config(data, backend, fraction=3 / N), "cpu")


def _rank_worker(rank, port, out_dir, beton):
    import torch.distributed as dist
    from ffcv.pipeline.compiler import Compiler

    Compiler.set_enabled(False)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        out = {}
        # Rank and world size from the process group, not the config. FFCV only: the fallback
        # reads them through the same rank_and_world(), and its workers would slow this down.
        cfg = L.DataConfig(
            beton=beton, backend="ffcv", batch_size=BATCH, image_size=SIZE, num_workers=1, seed=5, eda=False
        )
        loader = L.build_loader(cfg, "cpu")
        out = [_cat(list(loader), "index") for _ in range(2)]
        order = [L.shard_order(N, 5, epoch, rank, 2, True) for epoch in range(2)]
        torch.save((out, order), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_process_group_ranks_cover_every_sample_once(data, tmp_path):
    ranks = run_ranks(_rank_worker, 2, tmp_path, data["beton"])
    for epoch in range(2):
        a, b = ranks[0][0][epoch].tolist(), ranks[1][0][epoch].tolist()
        assert not set(a) & set(b) and sorted(a + b) == list(range(N))
        for rank in range(2):  # the fallback's sampler order, with this rank's place
            assert ranks[rank][0][epoch].tolist() == ranks[rank][1][epoch]
    assert ranks[0][0][0].tolist() != ranks[0][0][1].tolist()


# -- bad samples ---------------------------------------------------------------------------------


def test_fallback_skips_and_counts_corrupt_images(data, tmp_path, caplog):
    rows = [(os.path.join(data["root"], f"{i}.jpg"), c) for i, c in enumerate(data["captions"])]
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg at all")
    good = tmp_path / "cut.jpg"
    good.write_bytes((data["root"] / "5.jpg").read_bytes()[:40])  # truncated
    rows[7] = (str(tmp_path / "broken.jpg"), rows[7][1])
    rows[9] = (str(good), rows[9][1])
    rows[11] = (str(tmp_path / "missing.jpg"), rows[11][1])
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    cfg = L.DataConfig(
        source=str(tmp_path / "pairs.csv"), backend="torch", batch_size=BATCH, image_size=SIZE, num_workers=2
    )
    loader = L.build_loader(cfg, "cpu")
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    index = _cat(batches, "index").tolist()
    assert loader.skipped == 3 and "skipping sample" in caplog.text
    assert sorted(index) == sorted(set(range(N)) - {7, 9, 11})
    assert sum(len(b["index"]) for b in batches) == N - 3
    assert all(len(b["images_1"]) == len(b["index"]) == len(b["text_1"]) for b in batches)


@pytest.mark.parametrize("source", ["table", "folder"])
def test_fallback_skips_and_counts_captions_that_are_not_utf8(data, tmp_path, caplog, source):
    """The writer's caption rule (declip_fast.data.decode.caption_text): bytes that are not UTF-8
    are a bad sample, skipped and counted, never a caption with replacement characters. A table's
    bad bytes arrive as lone surrogates (it is read with surrogateescape), a .txt's as bytes."""
    bad = {3: "caf\xe9 au lait".encode("latin-1"), 20: b"\xff\xfe\x00 not text"}
    if source == "table":
        lines = [
            f"{os.path.join(data['root'], f'{i}.jpg')},".encode() + (bad.get(i) or c.encode()) + b"\n"
            for i, c in enumerate(data["captions"])
        ]
        (tmp_path / "pairs.csv").write_bytes(b"".join(lines))
        path = str(tmp_path / "pairs.csv")
    else:  # names sort in row order
        for i, c in enumerate(data["captions"]):
            (tmp_path / f"{i:02d}.jpg").write_bytes((data["root"] / f"{i}.jpg").read_bytes())
            (tmp_path / f"{i:02d}.txt").write_bytes(bad.get(i) or c.encode())
        path = str(tmp_path)
    cfg = L.DataConfig(source=path, backend="torch", batch_size=BATCH, image_size=SIZE, num_workers=2, mlm=False)
    loader = L.build_loader(cfg, "cpu")
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    assert loader.skipped == 2 and caplog.text.count("caption not utf-8") == 2
    index = _cat(batches, "index")
    assert sorted(index.tolist()) == sorted(set(range(N)) - set(bad))
    tokens = tokenize([data["captions"][i] for i in index.tolist()])
    assert torch.equal(_cat(batches, "text_1"), tokens), "the good captions are read as written"


def test_fallback_decodes_large_jpegs_at_a_reduced_scale_only_when_crops_allow(tmp_path):
    import io

    from PIL import Image

    from declip_fast.data.torch_loader import decode_rgb

    buf = io.BytesIO()
    Image.fromarray(np.full((1500, 2000, 3), 90, np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    assert decode_rgb(data).shape == (3, 1500, 2000)
    # 224 px from crops of >= 20% area: the smallest crop is ~580 px, so 1/2 scale still fits.
    smallest = int(np.ceil(224 / np.sqrt(0.75 * 0.2)))
    assert decode_rgb(data, smallest).shape == (3, 750, 1000)
    assert decode_rgb(data, 1000).shape == (3, 1500, 2000)


# -- batched augmentations -----------------------------------------------------------------------


def _colourful(n, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=gen)
    return (255 * (0.7 * base + 0.3 * torch.rand(n, 3, size, size, generator=gen))).to(torch.uint8)


def _unnormalize(x):
    return x * STD + MEAN


def test_augment_probabilities_over_many_samples():
    n = 4000
    images = _colourful(n)
    gen = torch.Generator().manual_seed(0)
    out = _unnormalize(A.augment(images, gen))
    gray = (out.amax(1) - out.amin(1)).amax((1, 2)) < 1e-4
    assert abs(gray.float().mean().item() - 0.2) < 0.03  # 0.2 +- ~5 sigma
    plain = (images.float() / 255 - MEAN) / STD
    only_jitter = A.AugmentConfig(grayscale_p=0.0, blur_p=0.0)
    changed = (A.augment(images, gen, only_jitter) - plain).abs().amax((1, 2, 3)) > 1e-4
    assert abs(changed.float().mean().item() - 0.8) < 0.03
    # sigma >= 1: a blur with sigma near 0.1 is the identity in fp32 (outer taps ~1e-22)
    only_blur = A.AugmentConfig(jitter_p=0.0, grayscale_p=0.0, blur_sigma=(1.0, 2.0))
    changed = (A.augment(images, gen, only_blur) - plain).abs().amax((1, 2, 3)) > 1e-4
    assert abs(changed.float().mean().item() - 0.5) < 0.03


def test_augment_identity_config_is_exact_normalization():
    images = _colourful(6)
    none = A.AugmentConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    expected = TF.normalize(images.float() / 255, A.IMAGENET_MEAN, A.IMAGENET_STD)
    torch.testing.assert_close(A.augment(images, None, none), expected, atol=2e-6, rtol=0)
    floats = images.float() / 255  # float input in [0, 1] is the same image
    torch.testing.assert_close(A.augment(floats, None, none), expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation"])
def test_single_jitter_ops_match_torchvision(op):
    images = _colourful(32).float() / 255
    kw = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0, op: 0.4}
    cfg = A.AugmentConfig(jitter_p=1.0, grayscale_p=0.0, blur_p=0.0, **kw)
    gen = torch.Generator().manual_seed(1)
    out = _unnormalize(A.augment(images, gen, cfg))
    # Re-draw the same factors: the draw order is p's (3 + sigma), then brightness, contrast, saturation.
    gen = torch.Generator().manual_seed(1)
    [torch.rand(32, generator=gen) for _ in range(4)]
    factors = {
        name: 1 + 0.4 * (2 * torch.rand(32, generator=gen) - 1) for name in ("brightness", "contrast", "saturation")
    }
    ref_op = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast, "saturation": TF.adjust_saturation}[
        op
    ]
    ref = torch.stack([ref_op(img, f.item()) for img, f in zip(images, factors[op])])
    # One op alone clamps once in both. torchvision's luma weights are 0.2989 / 0.587 / 0.114,
    # ours ITU-R 601's 0.299 (rows summing to 1): that 1e-4 is the whole difference.
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def _hsv_hue(rgb):
    """HSV hue in turns of [n, 3] RGB."""
    top, arg = rgb.max(-1)
    chroma = (top - rgb.min(-1).values).clamp_min(1e-8)
    r, g, b = rgb.unbind(-1)
    sextant = torch.where(
        arg == 0, ((g - b) / chroma) % 6, torch.where(arg == 1, (b - r) / chroma + 2, (r - g) / chroma + 4)
    )
    return sextant / 6


def test_hue_rotation_keeps_luma_is_invertible_and_follows_torchvision():
    images = _colourful(8).float() / 255
    turns = torch.linspace(-0.5, 0.5, 8)
    rotated = torch.einsum("bij,bjp->bip", A.hue_matrices(turns), images.flatten(2))
    back = torch.einsum("bij,bjp->bip", A.hue_matrices(-turns), rotated)
    torch.testing.assert_close(back, images.flatten(2), atol=1e-5, rtol=0)
    luma = torch.tensor(A.LUMA)
    torch.testing.assert_close(luma @ rotated, luma @ images.flatten(2), atol=1e-5, rtol=0)
    # Against torchvision's HSV shift on saturated colours: the same direction always, and on
    # average within 0.03 turns (measured: mean 0.014, max 0.044 for shifts up to 0.1).
    gen = torch.Generator().manual_seed(0)
    colours = torch.rand(3000, 3, generator=gen)
    colours = colours[(colours.amax(1) - colours.amin(1)) > 0.3][:500]
    shift = 0.2 * torch.rand(len(colours), generator=gen) - 0.1
    mine = (A.hue_matrices(shift) @ colours[:, :, None]).squeeze(-1).clamp(0, 1)
    ref = torch.stack([TF.adjust_hue(c.view(3, 1, 1), s.item()).view(3) for c, s in zip(colours, shift)])
    moved = lambda out: (_hsv_hue(out) - _hsv_hue(colours) + 0.5) % 1 - 0.5
    assert (torch.sign(moved(mine)) == torch.sign(moved(ref))).all()
    assert (moved(mine) - moved(ref)).abs().mean() < 0.03


def test_blur_matches_torchvision_per_sample():
    images = torch.rand(4, 3, 20, 24)
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    mine = A.gaussian_blur(images, A.gaussian_kernels(sigma, 5))
    ref = torch.stack([TF.gaussian_blur(img, [5, 5], [s.item(), s.item()]) for img, s in zip(images, sigma)])
    torch.testing.assert_close(mine, ref, atol=1e-5, rtol=0)
    assert A.kernel_size(224) == 23 and A.kernel_size(32) == 3


def test_augment_is_seeded_per_sample_and_leaves_input_alone():
    images = _colourful(1).expand(16, -1, -1, -1).contiguous()  # one image, 16 times
    before = images.clone()
    a = A.augment(images, torch.Generator().manual_seed(7))
    b = A.augment(images, torch.Generator().manual_seed(7))
    c = A.augment(images, torch.Generator().manual_seed(8))
    assert torch.equal(images, before)
    assert torch.equal(a, b) and not torch.equal(a, c)
    distinct = {tuple(x.flatten()[:50].tolist()) for x in a}
    assert len(distinct) > 10, "each sample draws its own parameters"
