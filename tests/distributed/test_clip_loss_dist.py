"""ClipLoss with 2 gloo ranks: every (local_loss, gather_with_grad) mode against OpenCLIP under
the same setting, and the scalable mode against the single-process global-batch loss."""

import itertools
import os

import pytest
import torch
import torch.distributed as dist

from tests.distributed.launch import run_ranks

pytestmark = pytest.mark.distributed

WORLD = 2
MODES = list(itertools.product([False, True], repeat=2))  # (local_loss, gather_with_grad)
CASES = [(7, 64), (130, 3), (33, 640)]  # (per-rank batch B, dim D)
ATOL = 1e-5  # the acceptance bound for fp32


def _global_inputs(b, d, seed):
    gen = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(WORLD * b, d, generator=gen), dim=-1)
    txt = torch.nn.functional.normalize(img + torch.randn(WORLD * b, d, generator=gen), dim=-1)
    scale = torch.tensor(1.0 + 99.0 * torch.rand((), generator=gen).item())
    return img, txt, scale


def _loss_and_grads(loss_module, img, txt, scale, upstream=1.3):
    img = img.clone().requires_grad_(True)
    txt = txt.clone().requires_grad_(True)
    scale = scale.clone().requires_grad_(True)
    loss = loss_module(img, txt, scale)
    (loss * upstream).backward()
    return [loss.detach(), img.grad, txt.grad, scale.grad]


def _worker(rank, port, out_dir):
    from open_clip.loss import ClipLoss as OpenClipLoss

    from declip_fast.losses import ClipLoss

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for (b, d), (local, with_grad) in itertools.product(CASES, MODES):
            img, txt, scale = _global_inputs(b, d, seed=b * 1000 + d)
            mine = slice(rank * b, (rank + 1) * b)
            kw = dict(local_loss=local, gather_with_grad=with_grad, rank=rank, world_size=WORLD)
            results[(b, d, local, with_grad)] = (
                _loss_and_grads(ClipLoss(**kw), img[mine], txt[mine], scale),
                _loss_and_grads(OpenClipLoss(**kw), img[mine], txt[mine], scale),
            )
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    return run_ranks(_worker, WORLD, tmp_path_factory.mktemp("dist"))


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("local, with_grad", MODES)
@pytest.mark.parametrize("b, d", CASES)
def test_each_mode_matches_open_clip(rank_results, b, d, local, with_grad):
    for rank, results in enumerate(rank_results):
        ours, theirs = results[(b, d, local, with_grad)]
        for name, x, y in zip(("loss", "d image", "d text", "d scale"), ours, theirs):
            assert _max_err(x, y) <= ATOL, f"rank {rank} {name}: {_max_err(x, y):.3g}"


@pytest.mark.parametrize("b, d", CASES)
def test_scalable_mode_equals_global_batch_loss(rank_results, b, d):
    """local_loss + gather_with_grad, gradients averaged across ranks as DDP/FSDP do, equals the
    single-process loss over the global batch, for the features AND logit_scale."""
    from open_clip.loss import ClipLoss as OpenClipLoss

    img, txt, scale = _global_inputs(b, d, seed=b * 1000 + d)
    loss, d_img, d_txt, d_scale = _loss_and_grads(OpenClipLoss(), img, txt, scale)
    per_rank = [results[(b, d, True, True)][0] for results in rank_results]
    avg_loss = sum(r[0] for r in per_rank) / WORLD
    avg_scale = sum(r[3] for r in per_rank) / WORLD
    # Each rank holds the summed gradient of its own rows; averaging divides by WORLD.
    avg_img = torch.cat([r[1] for r in per_rank]) / WORLD
    avg_txt = torch.cat([r[2] for r in per_rank]) / WORLD
    for name, x, y in (
        ("loss", avg_loss, loss),
        ("d image", avg_img, d_img),
        ("d text", avg_txt, d_txt),
        ("d scale", avg_scale, d_scale),
    ):
        assert _max_err(x, y) <= ATOL, f"{name}: {_max_err(x, y):.3g}"
