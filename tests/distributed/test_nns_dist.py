"""NNSLoss with 2 gloo ranks: identical queues on every rank, and per-step losses and gradients,
averaged across ranks, equal to the single-process NNS loss over the global batch."""

import os

import pytest
import torch
import torch.distributed as dist

from tests.distributed.launch import run_ranks
from tests.losses.test_nns import DenseNNS, ListQueue, _loss_and_grads, _max_err, _views

pytestmark = pytest.mark.distributed

WORLD = 2
B, D, SIZE, STEPS = 5, 9, 23, 6  # 6 steps of 10 rows wrap the 23-row queue twice
ATOL = 1e-5  # the acceptance bound for fp32


def _global_steps():
    """Per step: two image views, two text views (each [WORLD * B, D]) and a scale."""
    gen = torch.Generator().manual_seed(1234)
    steps = []
    for _ in range(STEPS):
        images, texts = _views(2, WORLD * B, D, gen)
        steps.append((images, texts, torch.tensor(1.0 + 19.0 * torch.rand((), generator=gen).item())))
    return steps


def _worker(rank, port, out_dir):
    from declip_fast.losses import NNSLoss

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        loss_fn = NNSLoss(queue_size=SIZE, rank=rank, world_size=WORLD, impl="torch")
        mine = slice(rank * B, (rank + 1) * B)
        results = []
        for images, texts, scale in _global_steps():
            out = _loss_and_grads(loss_fn, [x[mine] for x in images], [t[mine] for t in texts], scale)
            results.append((out, loss_fn.queue.features()))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    return run_ranks(_worker, WORLD, tmp_path_factory.mktemp("nns_dist"))


def test_queues_are_identical_and_hold_the_global_batches(rank_results):
    model = ListQueue(SIZE)
    for step, (_, texts, _) in enumerate(_global_steps()):
        model.push(texts[0])  # the global batch, rank order
        for rank, results in enumerate(rank_results):
            queue = results[step][1]
            assert torch.equal(queue, rank_results[0][step][1]), f"step {step}: rank {rank} differs"
            assert _max_err(queue, model.tensor()) <= 1e-6, f"step {step} rank {rank}"


def test_averaged_over_ranks_equals_the_global_batch_loss(rank_results):
    """Gradients averaged across ranks, as DDP/FSDP do, equal those of the single-process loss
    over the global batch, for the image views AND logit_scale."""
    dense = DenseNNS(SIZE)
    for step, (images, texts, scale) in enumerate(_global_steps()):
        want = _loss_and_grads(
            lambda i, t, s, first=texts[0]: dense.step(i, t, s, first),
            [x.double() for x in images],
            [t.double() for t in texts],
            scale.double(),
        )
        per_rank = [results[step][0] for results in rank_results]
        if want is None:
            assert all(r is None for r in per_rank), f"step {step}: a loss before the queue is ready"
            continue
        assert all(r is not None for r in per_rank), f"step {step}: no loss although ready"
        avg = [sum(r[0] for r in per_rank) / WORLD]
        # Each rank holds the gradient of its own rows; averaging divides by WORLD.
        avg += [torch.cat([r[v] for r in per_rank]) / WORLD for v in (1, 2)]
        avg += [sum(r[3] for r in per_rank) / WORLD]
        for name, x, y in zip(("loss", "d image[0]", "d image[1]", "d logit_scale"), avg, want):
            assert _max_err(x, y) <= ATOL, f"step {step} {name}: {_max_err(x, y):.3g}"
