"""Determinism and exact mid-epoch resume of both loaders (``set_epoch(epoch, start_batch)``,
``position``, ``state_dict``): same seed, same batches; a run restarted at batch k gets the
uninterrupted run's batches k, k+1, ... bit for bit, without loading the first k.

Uses test_loaders' data set (64 pairs, batches of 8 at 32 px) with FFCV's compiler off, except
for the one slow test that lets numba compile the fused decoder.
"""

import pytest
import torch

from declip_fast.data import augment as A
from declip_fast.data import loader as L
from tests.data.test_loaders import BATCH, N, _cat, _config

pytestmark = pytest.mark.usefixtures("ffcv_uncompiled")  # tiny epochs: tests/conftest.py

KEYS = {"images_1", "images_2", "text_1", "text_1_lengths", "mlm_targets", "text_2", "text_2_lengths", "index"}
BATCHES = N // BATCH
BACKENDS = ["ffcv", "torch"]
NO_COLOUR = A.AugmentConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)  # crops and flips only


def _loader(data, backend, **kw):
    return L.build_loader(_config(data, backend, **kw), "cpu")


def _assert_same(got, expected, keys=KEYS):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert set(a) == set(b) == keys
        for key in keys:
            assert torch.equal(a[key], b[key]), key


def _per_sample(batches, key):
    """``key`` of every sample, in index order (so two epochs' shuffles line up)."""
    return _cat(batches, key)[_cat(batches, "index").argsort()]


def _share_changed(a, b):
    return (a != b).flatten(1).any(1).float().mean().item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_gives_identical_batches_and_epochs_differ(data, backend):
    one, two = _loader(data, backend), _loader(data, backend)
    first = [list(one), list(one)]
    _assert_same(list(two), first[0])
    _assert_same(list(two), first[1])
    assert not torch.equal(_cat(first[0], "index"), _cat(first[1], "index"))
    for key in ("images_1", "images_2", "text_2"):  # the same sample draws anew each epoch
        assert _share_changed(_per_sample(first[0], key), _per_sample(first[1], key)) > 0.5, key
    masks = [_per_sample(epoch, "mlm_targets") != -100 for epoch in first]
    assert _share_changed(*masks) > 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_crops_and_flips_follow_the_seed_and_the_epoch(data, backend):
    """Without colour augmentations the images are crops and flips alone: those are seeded too
    (FFCV: by the fused decoder's per-sample seeds)."""
    kw = {"augment": NO_COLOUR, "mlm": False, "eda": False}
    loader = _loader(data, backend, **kw)
    epochs = [list(loader), list(loader)]
    again, other_seed = list(_loader(data, backend, **kw)), list(_loader(data, backend, seed=4, **kw))
    keys = {"images_1", "images_2", "text_1", "text_1_lengths", "index"}
    _assert_same(again, epochs[0], keys)
    for key in ("images_1", "images_2"):
        crops = _per_sample(epochs[0], key)
        assert _share_changed(crops, _per_sample(epochs[1], key)) > 0.9, "new crops each epoch"
        assert _share_changed(crops, _per_sample(other_seed, key)) > 0.9, "new crops for a new seed"


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch_gives_the_uninterrupted_batches(data, backend):
    whole = _loader(data, backend)
    whole.set_epoch(1)
    epoch_1, epoch_2 = list(whole), list(whole)
    resumed = _loader(data, backend)
    resumed.set_epoch(1, start_batch=3)
    assert resumed.position == {"epoch": 1, "batch": 3}
    got, positions = [], []
    for batch in resumed:
        got.append(batch)
        positions.append(resumed.position)
    _assert_same(got, epoch_1[3:])
    assert positions == [{"epoch": 1, "batch": b} for b in range(4, BATCHES)] + [{"epoch": 2, "batch": 0}]
    _assert_same(list(resumed), epoch_2)  # only the resumed epoch starts late
    assert resumed.position == {"epoch": 3, "batch": 0}


@pytest.mark.parametrize("backend", BACKENDS)
def test_restart_from_a_checkpointed_position(data, backend):
    """A run killed after 5 batches: a new loader restored from its state_dict carries on."""
    killed = _loader(data, backend)
    batches = iter(killed)
    for _ in range(5):
        next(batches)
    state = killed.state_dict()
    assert state == {"epoch": 0, "batch": 5}
    restarted = _loader(data, backend)
    restarted.load_state_dict(state)
    _assert_same(list(restarted), list(batches))
    assert restarted.position == killed.position == {"epoch": 1, "batch": 0}


def test_resume_does_not_load_the_skipped_batches(data, monkeypatch):
    from ffcv.loader.epoch_iterator import EpochIterator

    from declip_fast.data import torch_loader

    orders = []
    start = EpochIterator.__init__  # our guarded thread (declip_fast.data.beton) subclasses it

    def recording(self, loader, order):
        orders.append(list(order))
        start(self, loader, order)

    monkeypatch.setattr(EpochIterator, "__init__", recording)
    ffcv = _loader(data, "ffcv", mlm=False, eda=False)
    full = _cat(list(ffcv), "index").tolist()
    ffcv.set_epoch(0, 6)
    assert len(list(ffcv)) == BATCHES - 6
    assert orders == [full, full[6 * BATCH :]], "FFCV's order itself starts at batch 6"

    loaded = []
    load_rgb = torch_loader.load_rgb
    monkeypatch.setattr(torch_loader, "load_rgb", lambda *a: loaded.append(1) or load_rgb(*a))
    fallback = _loader(data, "torch", num_workers=0, mlm=False, eda=False)  # loads in this process
    fallback.set_epoch(0, 6)
    assert len(list(fallback)) == BATCHES - 6 and len(loaded) == (BATCHES - 6) * BATCH


@pytest.mark.parametrize("backend", BACKENDS)
def test_position_bounds_and_epoch_ends(data, backend):
    loader = _loader(data, backend, mlm=False, eda=False)
    assert len(loader) == BATCHES and loader.position == {"epoch": 0, "batch": 0}
    loader.set_epoch(2, 5)
    assert loader.position == {"epoch": 2, "batch": 5}
    loader.set_epoch(0, BATCHES)  # checkpointed after an epoch's last batch
    assert loader.position == {"epoch": 1, "batch": 0}
    assert list(loader) == [] and loader.position == {"epoch": 1, "batch": 0}
    next_epoch = _cat(list(loader), "index")
    assert next_epoch.tolist() == L.shard_order(N, 3, 1, 0, 1, True)
    for epoch, start in ((0, BATCHES + 1), (0, -1), (-1, 0)):
        with pytest.raises(ValueError, match="start_batch"):
            loader.set_epoch(epoch, start)


def test_batch_views_draw_per_batch_not_per_sequence():
    """Batch k's masking and colour draws depend on (seed, epoch, rank, k) only."""
    cfg = L.DataConfig(image_size=16, eda=False, seed=1)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=gen)
    tokens = torch.tensor([[49406] + [320 + i for i in range(20)] + [49407] + [0] * 55] * 4)

    def batch(views, epoch, k):
        views.start_batch(epoch, k)
        return views(images, images, tokens, None, torch.arange(4))

    views = L.BatchViews(cfg, torch.device("cpu"), rank=0)
    direct = batch(views, 0, 5)
    batch(views, 0, 2)
    keys = {"images_1", "images_2", "text_1", "text_1_lengths", "mlm_targets", "index"}
    _assert_same([batch(views, 0, 5)], [direct], keys)
    _assert_same([batch(L.BatchViews(cfg, torch.device("cpu"), rank=0), 0, 5)], [direct], keys)
    for other in (batch(views, 0, 6), batch(views, 1, 5), batch(L.BatchViews(cfg, torch.device("cpu"), rank=1), 0, 5)):
        assert not torch.equal(other["images_1"], direct["images_1"])
        assert not torch.equal(other["mlm_targets"], direct["mlm_targets"])


@pytest.mark.slow
def test_fused_decoder_seeding_when_compiled_by_numba(data):
    """numba's generator is per thread: seeding per sample makes the crops independent of the
    thread count, and compiled crops equal the uncompiled ones (numba's MT19937, seeded alike)."""
    from ffcv.pipeline.compiler import Compiler

    kw = {"augment": NO_COLOUR, "mlm": False, "eda": False}
    uncompiled = _loader(data, "ffcv", **kw)
    expected = [list(uncompiled), list(uncompiled)]
    Compiler.set_enabled(True)
    try:
        threads_2 = _loader(data, "ffcv", num_workers=2, **kw)
        threads_1 = _loader(data, "ffcv", num_workers=1, **kw)
        epochs = [list(threads_2), list(threads_2)]
        threads_2.set_epoch(1, 3)
        resumed, one_thread = list(threads_2), list(threads_1)
    finally:
        Compiler.set_enabled(False)
    keys = {"images_1", "images_2", "text_1", "text_1_lengths", "index"}
    _assert_same(one_thread, epochs[0], keys)
    _assert_same(resumed, epochs[1][3:], keys)
    _assert_same(epochs[0], expected[0], keys)
    _assert_same(epochs[1], expected[1], keys)
    assert _share_changed(_per_sample(epochs[0], "images_1"), _per_sample(epochs[1], "images_1")) > 0.9
