"""CoCaLoss, DistillClipLoss and ClipLoss.get_logits / get_ground_truth against OpenCLIP's: values
and gradients (features, logits, and the learned log logit scales), fp32 and fp64, odd shapes,
small tiles; the distributed modes on 2 gloo ranks."""

import itertools
import math
import os

import pytest
import torch

from declip_fast.losses import ClipLoss, CoCaLoss, DistillClipLoss
from declip_fast.losses.distill import distill_loss

open_clip_loss = pytest.importorskip("open_clip.loss")

# fp32: the acceptance bound; fp64: both sides exact to ~1e-13, 1e-10 leaves room for the tiled
# summation order. Relative to the largest entry of each compared tensor (at least 1).
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _features(n, d, dtype, gen, like=None):
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    if like is not None:  # correlated with the student's, as a teacher's are: a non-flat loss
        x[:, : min(d, like.shape[1])] += 2.0 * like[:, :d].double()
    return torch.nn.functional.normalize(x, dim=-1).to(dtype)


def _log_scale(gen, dtype, top=100.0):
    return torch.tensor(math.log(1.0 + (top - 1.0) * torch.rand((), generator=gen).item()), dtype=dtype)


def _close(name, ours, theirs, dtype):
    if theirs is None:
        assert ours is None, name
        return
    assert ours.dtype == theirs.dtype, f"{name}: {ours.dtype} vs {theirs.dtype}"
    assert ours.shape == theirs.shape, f"{name}: {tuple(ours.shape)} vs {tuple(theirs.shape)}"
    err = (ours.double() - theirs.double()).abs().max().item()
    bound = TOL[dtype] * max(1.0, theirs.double().abs().max().item())
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def _run(module, inputs, scale_slots, weights, **kw):
    """Outputs of ``module(*inputs)`` (the slots in ``scale_slots`` exponentiated: learned log
    scales) and the gradients of ``sum(weights * outputs)`` for every input."""
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    args = [x.exp() if i in scale_slots else x for i, x in enumerate(leaves)]
    outs = module(*args, **kw)
    outs = list(outs.values()) if isinstance(outs, dict) else list(outs)
    total = sum((w * o).sum() for w, o in zip(weights, outs) if w and o.requires_grad)
    total.backward()
    return [o.detach() for o in outs], [x.grad if x.is_floating_point() else None for x in leaves]


# The teacher's gradients, which OpenCLIP computes (the trainer's teacher features come from
# no_grad, so none is ever used), are ill-conditioned in fp32: dT = -p (S - E_p[S]) with logits up
# to 100. OpenCLIP's own fp32 error against fp64 reaches 2e-4 of the largest entry, so there ours is
# held to twice OpenCLIP's error against fp64 math (the tolerance rule of ARCHITECTURE.md).
EARNED = {"d t image", "d t text", "d log t"}


def _compare(ours, theirs, names, dtype, truth=None):
    """Each output and gradient of ``ours`` against ``theirs`` (``_run`` results); with ``truth``
    (``theirs`` in fp64), the EARNED ones against it instead, as the comment above says."""
    flat = zip(names, ours[0] + ours[1], theirs[0] + theirs[1], truth[0] + truth[1] if truth else names)
    for name, a, b, t in flat:
        if truth is None or name not in EARNED or dtype != torch.float32:
            _close(name, a, b, dtype)
            continue
        scale = max(1.0, t.abs().max().item())
        ours_err, theirs_err = ((x.double() - t).abs().max().item() / scale for x in (a, b))
        assert ours_err <= max(2 * theirs_err, TOL[dtype]), f"{name}: {ours_err:.3g} vs OpenCLIP's {theirs_err:.3g}"


def _in_fp64(inputs):
    return [x.double() if x.is_floating_point() else x for x in inputs]


DISTILL_NAMES = ("contrastive", "distill", "d image", "d text", "d log s", "d t image", "d t text", "d log t")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, d, dt", [(1, 8, 8), (7, 16, 24), (37, 5, 3), (130, 64, 32)])
@pytest.mark.parametrize("weights", [(0.0, 1.3), (0.7, 1.9)])
def test_distill_matches_open_clip(n, d, dt, dtype, weights, rng):
    img = _features(n, d, dtype, rng)
    txt = _features(n, d, dtype, rng, like=img)
    t_img, t_txt = _features(n, dt, dtype, rng, like=img), _features(n, dt, dtype, rng, like=txt)
    inputs = [img, txt, _log_scale(rng, dtype), t_img, t_txt, _log_scale(rng, dtype)]
    ours = _run(DistillClipLoss(), inputs, (2, 5), weights)
    theirs = _run(open_clip_loss.DistillClipLoss(), inputs, (2, 5), weights)
    truth = _run(open_clip_loss.DistillClipLoss(), _in_fp64(inputs), (2, 5), weights)
    _compare(ours, theirs, DISTILL_NAMES, dtype, truth)
    as_dict = DistillClipLoss()(img, txt, inputs[2].exp(), t_img, t_txt, inputs[5].exp(), output_dict=True)
    assert list(as_dict) == ["contrastive_loss", "distill_loss"]


def _dense_dist(img, txt, s, t_img, t_txt, ts, symmetric):
    dist = open_clip_loss.DistillClipLoss().dist_loss
    student, teacher = s * img @ txt.T, ts * t_img @ t_txt.T
    if not symmetric:
        return dist(teacher, student)
    return (dist(teacher, student) + dist(teacher.T, student.T)) / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", [(1, 1), (3, 5), (64, 17)])
@pytest.mark.parametrize("rows, cols", [(37, 37), (5, 41), (64, 19)])
def test_distill_tiles_and_rows_mode(rows, cols, block, dtype, rng):
    """Every tile shape folds to OpenCLIP's dist_loss; rows mode (the local_loss term) on
    rectangular logits; scales up to 100 (logits far apart, where cancellation would show)."""
    symmetric = rows == cols
    img, txt = _features(rows, 12, dtype, rng), _features(cols, 12, dtype, rng)
    t_img, t_txt = _features(rows, 7, dtype, rng, like=img), _features(cols, 7, dtype, rng, like=txt)
    inputs = [img, txt, _log_scale(rng, dtype), t_img, t_txt, _log_scale(rng, dtype)]

    def ours(*args):
        return (distill_loss(*args, symmetric=symmetric, block=block),)

    def theirs(*args):
        return (_dense_dist(*args, symmetric),)

    names = ("distill", "d image", "d text", "d log s", "d t image", "d t text", "d log t")
    truth = _run(theirs, _in_fp64(inputs), (2, 5), (1.7,))
    _compare(_run(ours, inputs, (2, 5), (1.7,)), _run(theirs, inputs, (2, 5), (1.7,)), names, dtype, truth)


def test_distill_teacher_without_grad_and_under_autocast(rng):
    """The trainer's case: teacher features from no_grad get none; under bf16 autocast the loss is
    fp32 and equals the fp32 loss of the bf16-rounded features (the autocast_inputs contract)."""
    img, txt = _features(33, 16, torch.float32, rng), _features(33, 16, torch.float32, rng)
    t_img, t_txt = _features(33, 8, torch.float32, rng, like=img), _features(33, 8, torch.float32, rng, like=txt)
    s, ts = torch.tensor(30.0), torch.tensor(50.0)
    student = [img.clone().requires_grad_(True), txt.clone().requires_grad_(True)]
    _, distill = DistillClipLoss()(*student, s, t_img, t_txt, ts)
    distill.backward()
    assert all(x.grad is not None for x in student)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = DistillClipLoss()(img, txt, s, t_img, t_txt, ts)
    rounded = [x.bfloat16().float() for x in (img, txt, t_img, t_txt)]
    reference = open_clip_loss.DistillClipLoss()(rounded[0], rounded[1], s, rounded[2], rounded[3], ts)
    for a, b in zip(ours, reference):
        assert a.dtype == torch.float32
        assert abs(a.item() - b.item()) <= 1e-5 * max(1.0, abs(b.item()))


COCA_NAMES = ("clip", "caption", "d image", "d text", "d logits", "labels", "d log s")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "b, length, vocab, pad_id, weights",
    [(5, 7, 11, 0, (2.0, 1.0)), (1, 3, 50, 3, (1.0, 0.5)), (9, 4, 33, 0, (0.0, 1.0)), (64, 6, 97, 1, (0.3, 1.7))],
)
def test_coca_matches_open_clip(b, length, vocab, pad_id, weights, dtype, rng):
    clip_weight, caption_weight = weights
    img, txt = _features(b, 16, dtype, rng), _features(b, 16, dtype, rng)
    logits = 3.0 * torch.randn(b, length, vocab, generator=rng, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, vocab, (b, length), generator=rng)
    labels[:, -1] = pad_id  # padding: ignored
    inputs = [img, txt, logits, labels, _log_scale(rng, dtype)]
    kw = dict(caption_loss_weight=caption_weight, clip_loss_weight=clip_weight, pad_id=pad_id)
    ours = _run(CoCaLoss(**kw), inputs, (4,), (1.3, 0.8))
    theirs = _run(open_clip_loss.CoCaLoss(**kw), inputs, (4,), (1.3, 0.8))
    _compare(ours, theirs, COCA_NAMES, dtype)
    out = CoCaLoss(**kw)(img, txt, logits, labels, inputs[4].exp(), output_dict=True)
    assert list(out) == ["contrastive_loss", "caption_loss"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, d", [(1, 3), (7, 16), (130, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_get_logits_matches_open_clip(n, d, with_bias, dtype, rng):
    img, txt = _features(n, d, dtype, rng), _features(n, d, dtype, rng)
    inputs = [img, txt, _log_scale(rng, dtype)] + ([torch.tensor(-2.5, dtype=dtype)] if with_bias else [])
    names = ("per image", "per text", "d image", "d text", "d log s", "d bias")
    ours = _run(ClipLoss().get_logits, inputs, (2,), (1.1, 0.6))
    theirs = _run(open_clip_loss.ClipLoss().get_logits, inputs, (2,), (1.1, 0.6))
    _compare(ours, theirs, names, dtype)


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("local, rank, world", [(False, 0, 1), (True, 1, 2), (False, 1, 2), (True, 3, 4)])
def test_get_ground_truth_matches_open_clip(cache, local, rank, world):
    kw = dict(local_loss=local, cache_labels=cache, rank=rank, world_size=world)
    ours, theirs = ClipLoss(**kw), open_clip_loss.ClipLoss(**kw)
    for num in (5, 5, 8, 5):
        a, b = ours.get_ground_truth(torch.device("cpu"), num), theirs.get_ground_truth(torch.device("cpu"), num)
        assert torch.equal(a, b) and a.dtype == b.dtype
        assert ours.prev_num_logits == theirs.prev_num_logits
        assert ours.labels.keys() == theirs.labels.keys()
    assert ours.use_horovod is False


# -- 2 gloo ranks: every (local_loss, gather_with_grad) mode against OpenCLIP's on the same ranks.

WORLD = 2
MODES = list(itertools.product([False, True], repeat=2))
DIST_CASES = [(5, 8, 6), (33, 16, 16)]  # (per-rank batch, student dim, teacher dim)


def _worker(rank, port, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for (b, d, dt), (local, with_grad) in itertools.product(DIST_CASES, MODES):
            gen = torch.Generator().manual_seed(b * 100 + d)
            img = _features(WORLD * b, d, torch.float32, gen)
            txt = _features(WORLD * b, d, torch.float32, gen, like=img)
            t_img, t_txt = (
                _features(WORLD * b, dt, torch.float32, gen, like=img),
                _features(WORLD * b, dt, torch.float32, gen, like=txt),
            )
            mine = slice(rank * b, (rank + 1) * b)
            log_s, log_ts = _log_scale(gen, torch.float32), _log_scale(gen, torch.float32)
            kw = dict(local_loss=local, gather_with_grad=with_grad, rank=rank, world_size=WORLD)
            distill = [img[mine], txt[mine], log_s, t_img[mine], t_txt[mine], log_ts]
            logits = [img[mine], txt[mine], log_s, torch.tensor(-1.5)]
            for name, ours, theirs, inputs, slots in (
                ("distill", DistillClipLoss(**kw), open_clip_loss.DistillClipLoss(**kw), distill, (2, 5)),
                ("logits", ClipLoss(**kw).get_logits, open_clip_loss.ClipLoss(**kw).get_logits, logits, (2,)),
            ):
                weights = (0.7, 1.9)
                results[(b, d, local, with_grad, name)] = (
                    _run(ours, inputs, slots, weights),
                    _run(theirs, inputs, slots, weights),
                    _run(theirs, _in_fp64(inputs), slots, weights),
                )
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    from tests.distributed.launch import run_ranks

    return run_ranks(_worker, WORLD, tmp_path_factory.mktemp("dist"))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("local, with_grad", MODES)
@pytest.mark.parametrize("b, d", [case[:2] for case in DIST_CASES])
@pytest.mark.parametrize("name", ["distill", "logits"])
def test_distributed_modes_match_open_clip(rank_results, b, d, local, with_grad, name):
    names = DISTILL_NAMES if name == "distill" else ("per image", "per text", "d image", "d text", "d log s", "d bias")
    for rank, results in enumerate(rank_results):
        ours, theirs, truth = results[(b, d, local, with_grad, name)]
        try:
            _compare(ours, theirs, names, torch.float32, truth)
        except AssertionError as e:
            raise AssertionError(f"rank {rank}: {e}") from None
