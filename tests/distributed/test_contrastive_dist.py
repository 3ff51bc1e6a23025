"""The fused kernel's scalable mode with 2 gloo ranks (kernels under the Triton interpreter on CPU,
or on the GPU when both ranks can share it): each rank scores its rows against every rank's
columns, column statistics are all-gathered, and gradients averaged across ranks equal the
single-process global-batch loss in float64."""

import os

import pytest
import torch
import torch.distributed as dist

from tests.distributed.launch import run_ranks

pytestmark = pytest.mark.distributed

WORLD, B, D = 2, 37, 24


def _inputs():
    gen = torch.Generator().manual_seed(7)
    img = torch.nn.functional.normalize(torch.randn(WORLD * B, D, generator=gen), dim=-1)
    txt = torch.nn.functional.normalize(img + torch.randn(WORLD * B, D, generator=gen), dim=-1)
    return img, txt, torch.tensor(23.0)


def _worker(rank, port, out_dir, device):
    from declip_fast.distributed.collectives import all_gather_with_grad
    from declip_fast.kernels import contrastive

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        img, txt, scale = (t.to(device) for t in _inputs())
        mine = slice(rank * B, (rank + 1) * B)
        img = img[mine].clone().requires_grad_(True)
        txt = txt[mine].clone().requires_grad_(True)
        scale.requires_grad_(True)
        loss = contrastive.clip_loss_gathered(img, all_gather_with_grad(txt), scale, rank * B)
        (loss * 1.3).backward()
        torch.save(
            [t.detach().cpu() for t in (loss, img.grad, txt.grad, scale.grad)], os.path.join(out_dir, f"rank{rank}.pt")
        )
    finally:
        dist.destroy_process_group()


def test_gathered_mode_equals_global_batch_loss(tmp_path):
    from open_clip.loss import ClipLoss as OpenClipLoss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ranks = run_ranks(_worker, WORLD, tmp_path, device)

    img, txt, scale = (t.double().requires_grad_(True) for t in _inputs())
    (OpenClipLoss()(img, txt, scale) * 1.3).backward()
    averaged = {
        "d image": torch.cat([r[1] for r in ranks]) / WORLD,
        "d text": torch.cat([r[2] for r in ranks]) / WORLD,
        "d scale": sum(r[3] for r in ranks) / WORLD,
    }
    exact = {"d image": img.grad, "d text": txt.grad, "d scale": scale.grad}
    for name in averaged:
        err = (averaged[name].double() - exact[name]).abs().max().item()
        assert err <= 1e-5, f"{name}: {err:.3g}"

    # Each rank's loss value is OpenCLIP's local loss of that rank (float64 here).
    for rank, r in enumerate(ranks):
        mine = slice(rank * B, (rank + 1) * B)
        logits_i = scale.detach() * img.detach()[mine] @ txt.detach().T
        logits_t = scale.detach() * txt.detach()[mine] @ img.detach().T
        labels = torch.arange(B) + rank * B
        ce = torch.nn.functional.cross_entropy
        local = (ce(logits_i, labels) + ce(logits_t, labels)) / 2
        assert abs(r[0].item() - local.item()) <= 1e-5
