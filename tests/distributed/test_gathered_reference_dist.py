"""The torch reference's gathered mode with 2 gloo ranks, in float64: each rank's loss and
gradients (features after the gather's backward, and logit_scale) equal those of the rows-based
torch path that gathers both sides (OpenCLIP's local loss), within fp64 rounding."""

import os

import pytest
import torch
import torch.distributed as dist

from tests.distributed.launch import run_ranks

pytestmark = pytest.mark.distributed

WORLD = 2
CASES = [(9, 16, None), (13, 5, (4, 7))]  # (per-rank B, D, tile): one tile, and several


def _inputs(b, d):
    gen = torch.Generator().manual_seed(b * 100 + d)
    img = torch.nn.functional.normalize(torch.randn(WORLD * b, d, generator=gen, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(img + torch.randn(WORLD * b, d, generator=gen, dtype=torch.float64), dim=-1)
    return img, txt, torch.tensor(31.0, dtype=torch.float64)


def _worker(rank, port, out_dir):
    from declip_fast import kernels
    from declip_fast.distributed.collectives import all_gather_with_grad
    from declip_fast.kernels import reference

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for b, d, block in CASES:
            img, txt, scale = _inputs(b, d)
            mine = slice(rank * b, (rank + 1) * b)
            out = []
            for path in ("gathered", "rows"):
                i, t, s = (x.clone().requires_grad_(True) for x in (img[mine], txt[mine], scale))
                if path == "gathered":
                    if block is None:  # through the functional API, as ClipLoss calls it
                        loss = kernels.clip_loss(
                            i, all_gather_with_grad(t), s, mode="gathered", offset=rank * b, impl="torch"
                        )
                    else:
                        loss = reference.clip_loss_gathered(i, all_gather_with_grad(t), s, rank * b, block=block)
                else:
                    all_i, all_t = all_gather_with_grad(i), all_gather_with_grad(t)
                    loss = (
                        reference.clip_loss_rows(i, all_t, s, rank * b, block=block)
                        + reference.clip_loss_rows(t, all_i, s, rank * b, block=block)
                    ) / 2
                (loss * 1.3).backward()
                out.append([x.detach() for x in (loss, i.grad, t.grad, s.grad)])
            results[(b, d)] = out
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gathered_reference_equals_rows_path_per_rank(tmp_path):
    ranks = run_ranks(_worker, WORLD, tmp_path)
    for rank, results in enumerate(ranks):
        for (b, d), (gathered, rows) in results.items():
            for name, x, y in zip(("loss", "d image", "d text", "d scale"), gathered, rows):
                assert x.dtype == torch.float64
                err = (x - y).abs().max().item() / max(1.0, y.abs().max().item())
                assert err <= 1e-13, f"rank {rank} B={b} D={d} {name}: {err:.3g}"
