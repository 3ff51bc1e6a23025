"""FeatureQueue against a python-list FIFO, and NNSLoss against an independent float64 model
(normalize, full similarity matrix, argmax, cross_entropy) over several steps."""

import io

import pytest
import torch
import torch.nn.functional as F

from declip_fast.losses import FeatureQueue, NNSLoss
from declip_fast.losses.nns import nearest


class ListQueue:
    """The FIFO spelled out: unit float64 rows in a list, oldest first, the last ``size`` kept."""

    def __init__(self, size):
        self.size, self.rows = size, []

    def push(self, x):
        self.rows = (self.rows + list(F.normalize(x.double(), dim=-1).unbind(0)))[-self.size :]

    def tensor(self):
        return torch.stack(self.rows)


class DenseNNS:
    """Independent float64 NNS over a global batch: look up, then enqueue."""

    # fp32 and fp64 must pick the same neighbour: keep test inputs clear of near-ties.
    MIN_GAP = 1e-5

    def __init__(self, size):
        self.queue = ListQueue(size)

    def _neighbours(self, text):
        bank = self.queue.tensor()
        sims = F.normalize(text.double(), dim=-1) @ bank.T
        if bank.shape[0] > 1:
            top2 = sims.topk(2, dim=1).values
            assert (top2[:, 0] - top2[:, 1]).min() > self.MIN_GAP, "test inputs have a near-tie"
        return bank[sims.argmax(dim=1)]

    def step(self, images, texts, scale, enqueue):
        loss = None
        if len(self.queue.rows) >= min(texts[0].shape[0], self.queue.size):
            labels = torch.arange(texts[0].shape[0])
            terms = [F.cross_entropy(scale * img @ self._neighbours(t).T, labels) for t in texts for img in images]
            loss = sum(terms) / len(terms)
        if enqueue is not None:
            self.queue.push(enqueue)
        return loss


def _views(n, b, d, gen, dtype=torch.float32):
    """Normalized image views (as the model hands them over) and raw text views."""
    base = torch.randn(b, d, generator=gen, dtype=torch.float64)
    images = [F.normalize(base + 0.5 * torch.randn(b, d, generator=gen, dtype=torch.float64), dim=-1) for _ in range(n)]
    texts = [3.0 * (base + torch.randn(b, d, generator=gen, dtype=torch.float64)) for _ in range(n)]
    return [x.to(dtype) for x in images], [x.to(dtype) for x in texts]


def _loss_and_grads(fn, images, texts, scale, upstream=1.7, **kw):
    """Loss, image gradients and scale gradient of ``fn`` on fresh leaves; None before ready."""
    images = [x.clone().requires_grad_(True) for x in images]
    scale = scale.clone().requires_grad_(True)
    loss = fn(images, texts, scale, **kw)
    if loss is None:
        return None
    # A non-unit upstream gradient catches kernels that assume d(out) = 1.
    (loss * upstream).backward()
    return [loss.detach()] + [x.grad for x in images] + [scale.grad]


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


# ----------------------------------------------------------------------------- FeatureQueue


@pytest.mark.parametrize("size, pushes", [(7, [3, 5, 2, 7, 1, 4, 6]), (5, [2, 12, 1, 3, 5, 9])])
def test_queue_is_a_fifo_of_the_last_rows(size, pushes, rng):
    queue, model = FeatureQueue(size, 4, dtype=torch.float64), ListQueue(size)
    for n in pushes:
        x = torch.randn(n, 4, generator=rng, dtype=torch.float64)
        queue.enqueue(x)
        model.push(x)
        assert len(queue) == len(model.rows)
        assert torch.equal(queue.features(), model.tensor())
        bank, valid = queue.bank()
        assert valid == len(model.rows)
        # The lookup's view: rows [0, valid) are the queue's rows, in ring order.
        by_first = lambda t: t[t[:, 0].argsort()]  # noqa: E731
        assert torch.equal(by_first(bank[:valid]), by_first(model.tensor()))


def test_queue_stores_unit_rows_in_its_dtype(rng):
    queue = FeatureQueue(9, 6, dtype=torch.float16)
    queue.enqueue(100 * torch.randn(4, 6, generator=rng))
    rows = queue.features()
    assert rows.dtype == torch.float16 and not rows.requires_grad
    assert torch.allclose(rows.float().norm(dim=1), torch.ones(4), atol=2e-3)  # fp16 rounding


def test_features_is_a_copy(rng):
    queue = FeatureQueue(3, 2)
    queue.enqueue(torch.randn(3, 2, generator=rng))
    before = queue.features()
    queue.enqueue(torch.randn(2, 2, generator=rng))
    assert not torch.equal(before, queue.features())


def test_state_dict_round_trip_continues_identically(rng):
    a = FeatureQueue(11, 5)
    for n in (4, 9, 3):
        a.enqueue(torch.randn(n, 5, generator=rng))
    b = FeatureQueue(11, 5)
    saved = io.BytesIO()
    torch.save(a.state_dict(), saved)  # through a file, as a checkpoint does (weights_only load)
    b.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    assert len(b) == len(a) and torch.equal(b.features(), a.features())
    for n in (2, 7, 13):
        x = torch.randn(n, 5, generator=rng)
        a.enqueue(x)
        b.enqueue(x)
        assert torch.equal(b.features(), a.features()) and torch.equal(b.bank()[0], a.bank()[0])


def test_nns_loss_resumes_from_a_state_dict(rng):
    """A lazily built queue is restored by load_state_dict before the first step."""
    first = NNSLoss(queue_size=13, impl="torch")
    steps = [_views(2, 5, 8, rng) for _ in range(5)]
    scale = torch.tensor(12.0)
    for images, texts in steps[:3]:
        first(images, texts, scale)
    resumed = NNSLoss(queue_size=13, impl="torch")
    resumed.load_state_dict(first.state_dict())
    for images, texts in steps[3:]:
        assert torch.equal(first(images, texts, scale), resumed(images, texts, scale))


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: FeatureQueue(0, 4), "size"),
        (lambda: FeatureQueue(4, 0), "dim"),
        (lambda: FeatureQueue(4, 3, dtype=torch.int64), "floating"),
        (lambda: FeatureQueue(4, 3).enqueue(torch.randn(3)), "2-D"),
        (lambda: FeatureQueue(4, 3).enqueue(torch.randn(2, 5)), "dim 5"),
        (lambda: FeatureQueue(4, 3).enqueue(torch.randn(0, 3)), "empty"),
        (lambda: FeatureQueue(4, 3).enqueue(torch.ones(2, 3, dtype=torch.int32)), "floating"),
        (lambda: FeatureQueue(4, 3).enqueue(torch.randn(2, 3, device="meta")), "meta"),
        (lambda: FeatureQueue(4, 3).load_state_dict(FeatureQueue(5, 3).state_dict()), "shape"),
        (lambda: FeatureQueue(4, 3).load_state_dict(FeatureQueue(4, 2).state_dict()), "shape"),
        (lambda: FeatureQueue(4, 3).set_extra_state({"ptr": 9, "count": 1}), "range"),
        (lambda: NNSLoss(queue_size=4).load_state_dict(NNSLoss(5, dim=3).state_dict()), "queue_size"),
    ],
)
def test_bad_queue_input_is_a_clear_value_error(build, match):
    with pytest.raises(ValueError, match=match):
        build()


# ----------------------------------------------------------------------------- NNSLoss


def test_nearest_dispatch():
    q, bank = torch.randn(5, 4), torch.randn(9, 4)
    queue = FeatureQueue(9, 4)
    queue.enqueue(bank)
    scores, index = nearest(q, queue, impl="torch")
    expected = (q @ queue.features().T).max(dim=1)
    assert torch.equal(index, expected.indices) and torch.allclose(scores, expected.values)
    with pytest.raises(ValueError, match="triton"):
        nearest(q, queue, impl="triton")
    with pytest.raises(ValueError, match="impl"):
        nearest(q, queue, impl="cuda")


def test_none_until_the_queue_holds_a_batch(rng):
    loss_fn = NNSLoss(queue_size=50)
    images, texts = _views(2, 6, 4, rng)
    assert loss_fn(images, texts, 10.0) is None
    assert len(loss_fn.queue) == 6
    # Skipping the enqueue keeps it absent; a smaller queue is ready once full.
    assert NNSLoss(queue_size=50)(images, texts, 10.0, enqueue=False) is None
    small = NNSLoss(queue_size=4)
    small(images, texts, 10.0)
    assert small(images, texts, 10.0) is not None
    # Fewer rows than one batch (a short enqueue) is not enough yet.
    partial = NNSLoss(queue_size=50)
    partial(images, texts, 10.0, enqueue=texts[0][:5])
    assert partial(images, texts, 10.0) is None
    assert partial(images, texts, 10.0) is not None


ENQUEUE = {"default": lambda t: None, "second view": lambda t: t[1], "skip": lambda t: False}
# fp64: the same math in another order. fp32: unit inputs rounded to fp32 move logits of size
# s <= 20 by ~s * 1e-7; 1e-5 is the acceptance bound used for the fp32 CLIP loss.
ATOL = {torch.float32: 1e-5, torch.float64: 1e-11}


@pytest.mark.parametrize("enqueue", list(ENQUEUE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b, d, size, n_img, n_txt", [(7, 5, 17, 2, 2), (5, 33, 11, 1, 3), (3, 640, 4, 2, 1)])
def test_matches_dense_float64_model(b, d, size, n_img, n_txt, dtype, enqueue, rng):
    """Several steps, so lookups run against queues that have wrapped around."""
    ours, dense = NNSLoss(queue_size=size, impl="torch"), DenseNNS(size)
    if enqueue == "skip":  # a pre-filled queue that the steps leave as it is
        fill = torch.randn(size, d, generator=rng, dtype=torch.float64).to(dtype)
        assert ours(*_views(1, b, d, rng, dtype), 1.0, enqueue=fill) is None
        dense.queue.push(fill)
    for step in range(5):
        images, texts = _views(max(n_img, n_txt), b, d, rng, dtype)
        images, texts = images[:n_img], texts[:n_txt]
        scale = torch.tensor(1.0 + 19.0 * torch.rand((), generator=rng).item(), dtype=dtype)
        extra = ENQUEUE[enqueue](texts + texts)
        pushed = texts[0] if extra is None else (None if extra is False else extra)
        got = _loss_and_grads(ours, images, texts, scale, enqueue=extra)
        want = _loss_and_grads(
            lambda i, t, s, pushed=pushed: dense.step(i, t, s, pushed),
            [x.double() for x in images],
            [t.double() for t in texts],
            scale.double(),
        )
        if want is None:
            assert got is None, f"step {step}: a loss before the queue holds a batch"
            continue
        assert got is not None, f"step {step}: no loss although the queue holds a batch"
        names = ["loss"] + [f"d image[{i}]" for i in range(n_img)] + ["d logit_scale"]
        for name, x, y in zip(names, got, want):
            assert x.dtype == dtype, name
            assert _max_err(x, y) <= ATOL[dtype], f"step {step} {name}: {_max_err(x, y):.3g}"


def test_neighbours_are_constants(rng):
    loss_fn = NNSLoss(queue_size=8)
    images, texts = _views(2, 4, 6, rng)
    loss_fn(images, texts, 5.0)
    texts = [t.clone().requires_grad_(True) for t in texts]
    images = [x.clone().requires_grad_(True) for x in images]
    loss = loss_fn(images, texts, 5.0)
    assert not loss_fn.queue.rows.requires_grad
    grads = torch.autograd.grad(loss, images + texts, allow_unused=True)
    assert all(g is not None for g in grads[:2]) and all(g is None for g in grads[2:])


def _two_views(b=4, d=6):
    return [torch.randn(b, d), torch.randn(b, d)], [torch.randn(b, d), torch.randn(b, d)]


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.randn(4, 6), [torch.randn(4, 6)], 1.0), "image_views must be a non-empty list"),
        (([], [torch.randn(4, 6)], 1.0), "image_views must be a non-empty list"),
        (([torch.randn(4, 6)], [torch.randn(5, 6)], 1.0), r"text_views\[0\] has shape"),
        (([torch.randn(4, 6)], [torch.randn(4, 6), torch.randn(4, 7)], 1.0), r"text_views\[1\] has shape"),
        (([torch.randn(4, 6)], [torch.randn(4, 6).double()], 1.0), "dtype"),
        (([torch.randn(4, 6)], [torch.randn(4, 6, device="meta")], 1.0), "device"),
        (([torch.randn(6)], [torch.randn(6)], 1.0), "2-D"),
        (([torch.ones(4, 6, dtype=torch.int64)], [torch.ones(4, 6, dtype=torch.int64)], 1.0), "floating"),
        (([torch.randn(4, 6)], [torch.randn(4, 6)], torch.ones(2)), "scalar"),
        (([torch.randn(4, 6)], [torch.randn(4, 6)], 1.0, "yes"), "enqueue must be"),
        (([torch.randn(4, 6)], [torch.randn(4, 6)], 1.0, torch.randn(4, 5)), "enqueue have dim 5"),
    ],
)
def test_bad_loss_input_is_a_clear_value_error(args, match):
    with pytest.raises(ValueError, match=match):
        NNSLoss(queue_size=8)(*args)


def test_bad_loss_configuration():
    with pytest.raises(ValueError, match="impl"):
        NNSLoss(impl="cuda")
    with pytest.raises(ValueError, match="rank"):
        NNSLoss(rank=2, world_size=2)
    with pytest.raises(ValueError, match="queue_size"):
        NNSLoss(queue_size=0)
    with pytest.raises(ValueError, match="dim"):
        NNSLoss(queue_size=8, dim=5)(*_two_views(), 1.0)
    with pytest.raises(RuntimeError, match="process group"):
        NNSLoss(rank=0, world_size=2)(*_two_views(), 1.0)


def test_deferred_enqueue_takes_only_committed_rows(rng):
    """A trainer's one-sync step: with ``defer_enqueue`` the rows wait for ``commit(keep)``; kept
    rows land exactly as an immediate enqueue puts them, dropped rows never reach the queue."""
    img = [torch.randn(4, 8, generator=rng) for _ in range(2)]
    txt = [torch.randn(4, 8, generator=rng) for _ in range(2)]
    now, later = NNSLoss(queue_size=16, dim=8), NNSLoss(queue_size=16, dim=8)
    later.defer_enqueue()
    scale = torch.tensor(10.0)
    for step in range(3):
        assert later.pending_finite() is None
        a, b = now(img, txt, scale), later(img, txt, scale)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
        assert bool(later.pending_finite())
        if step == 1:  # this step was not applied: its rows are dropped
            later.commit(False)
            now.queue.rows.copy_(later.queue.rows)
            now.queue.load_state_dict(later.queue.state_dict())
        else:
            later.commit(True)
        assert len(later.queue) == len(now.queue) and torch.equal(later.queue.rows, now.queue.rows)
    assert len(later.queue) == 8  # steps 0 and 2
    bad = [torch.full((4, 8), float("nan"))] + txt[1:]
    later(img, bad, scale)
    assert not bool(later.pending_finite())
