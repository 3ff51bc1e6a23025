"""SigLipLoss with 2 gloo ranks: each of OpenCLIP's dist_impl against ours under the same setting
(per-rank loss, and the gradients of each rank's own features, logit_scale and logit_bias after
OpenCLIP's backward through its exchanges vs ours through all_gather_with_grad), and the
average over ranks against the single-process loss over the global batch."""

import itertools
import os

import pytest
import torch
import torch.distributed as dist

from tests.distributed.launch import run_ranks

pytestmark = pytest.mark.distributed

WORLD = 2
DIST_IMPLS = ["bidir", "shift", "reduce", "gather"]
CASES = [(7, 64), (33, 3), (1, 130)]  # (per-rank batch B, dim D)
ATOL = 1e-5  # the acceptance bound for fp32, times each quantity's size (at least 1)
NAMES = ("loss", "d image", "d text", "d logit_scale", "d logit_bias")


def _global_inputs(b, d, seed):
    gen = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(WORLD * b, d, generator=gen), dim=-1)
    txt = torch.nn.functional.normalize(img + torch.randn(WORLD * b, d, generator=gen), dim=-1)
    scale = torch.tensor(1.0 + 29.0 * torch.rand((), generator=gen).item())
    bias = torch.tensor(-10.0 * torch.rand((), generator=gen).item())
    return img, txt, scale, bias


def _loss_and_grads(loss_module, img, txt, scale, bias, upstream=1.3):
    leaves = [t.clone().requires_grad_(True) for t in (img, txt, scale, bias)]
    loss = loss_module(*leaves)
    (loss * upstream).backward()
    return [loss.detach(), *(t.grad for t in leaves)]


def _worker(rank, port, out_dir):
    from open_clip.loss import SigLipLoss as OpenSigLipLoss

    from declip_fast.losses import SigLipLoss

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for (b, d), impl in itertools.product(CASES, DIST_IMPLS):
            img, txt, scale, bias = _global_inputs(b, d, seed=b * 1000 + d)
            mine = slice(rank * b, (rank + 1) * b)
            kw = dict(rank=rank, world_size=WORLD, dist_impl=impl)
            results[(b, d, impl)] = (
                _loss_and_grads(SigLipLoss(**kw), img[mine], txt[mine], scale, bias),
                _loss_and_grads(OpenSigLipLoss(**kw), img[mine], txt[mine], scale, bias),
            )
        # The gathered mode checks its layout against the process group.
        from declip_fast import kernels

        one = torch.ones(())
        try:
            kernels.siglip_loss(torch.ones(3, 4), torch.ones(6, 4), one, one, offset=0 if rank else 3, mode="gathered")
        except ValueError as err:
            results["layout_error"] = str(err)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    return run_ranks(_worker, WORLD, tmp_path_factory.mktemp("dist"))


def _assert_close(ours, theirs, where):
    for name, x, y in zip(NAMES, ours, theirs):
        err = (x.double() - y.double()).abs().max().item()
        bound = ATOL * max(1.0, y.double().abs().max().item())
        assert err <= bound, f"{where} {name}: {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("impl", DIST_IMPLS)
@pytest.mark.parametrize("b, d", CASES)
def test_each_dist_impl_matches_open_clip(rank_results, b, d, impl):
    for rank, results in enumerate(rank_results):
        ours, theirs = results[(b, d, impl)]
        _assert_close(ours, theirs, f"rank {rank}")


@pytest.mark.parametrize("b, d", CASES)
def test_average_over_ranks_equals_global_batch_loss(rank_results, b, d):
    """The per-rank losses averaged, and the gradients averaged as DDP/FSDP do (each rank holds the
    summed gradient of its own rows), equal the single-process loss over the global batch."""
    from open_clip.loss import SigLipLoss as OpenSigLipLoss

    img, txt, scale, bias = _global_inputs(b, d, seed=b * 1000 + d)
    expected = _loss_and_grads(OpenSigLipLoss(), img, txt, scale, bias)
    per_rank = [results[(b, d, "bidir")][0] for results in rank_results]
    average = [
        sum(r[0] for r in per_rank) / WORLD,
        torch.cat([r[1] for r in per_rank]) / WORLD,
        torch.cat([r[2] for r in per_rank]) / WORLD,
        sum(r[3] for r in per_rank) / WORLD,
        sum(r[4] for r in per_rank) / WORLD,
    ]
    _assert_close(average, expected, "average")


def test_gathered_mode_checks_the_layout(rank_results):
    for rank, results in enumerate(rank_results):
        assert f"offset = rank * B = {3 * rank}" in results.get("layout_error", ""), f"rank {rank}"
