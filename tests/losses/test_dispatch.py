"""The one dispatch (issue 19): the functional API of declip_fast.kernels picks torch or Triton
in one place, resolve_impl, and the losses call only it."""

import inspect
import subprocess
import sys

import pytest
import torch

from declip_fast import cli, kernels
from declip_fast.kernels import reference
from declip_fast.losses import clip as clip_module


def _features(n=10, d=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(img + torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)
    return img, txt, torch.tensor(9.0, dtype=torch.float64)


def test_importing_the_kernels_package_imports_no_triton():
    code = (
        "import sys, declip_fast.kernels, declip_fast.losses, declip_fast.models; "
        "sys.exit(1 if 'triton' in sys.modules or 'declip_fast.kernels.contrastive' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_resolve_impl_has_one_home():
    assert clip_module.resolve_impl is kernels.resolve_impl
    assert kernels.resolve_impl("auto", torch.zeros(1)) == "torch"
    assert kernels.resolve_impl("torch", torch.zeros(1), "nn_lookup") == "torch"
    with pytest.raises(ValueError, match="impl"):
        kernels.resolve_impl("cuda", torch.zeros(1))
    with pytest.raises(ValueError, match="CUDA"):
        kernels.resolve_impl("triton", torch.zeros(1))
    with pytest.raises(ValueError, match="kernel"):
        kernels.resolve_impl("auto", torch.zeros(1), "softmax")


def test_linear_ce_has_only_torch():
    x, w, t = torch.randn(4, 3), torch.randn(7, 3), torch.tensor([0, 1, 2, 6])
    assert kernels.resolve_impl("auto", x, "linear_ce") == "torch"
    expected = torch.nn.functional.cross_entropy(x @ w.T, t)
    torch.testing.assert_close(kernels.linear_cross_entropy(x, w, None, t, impl="torch"), expected)
    with pytest.raises(NotImplementedError, match="linear_ce has no Triton kernel"):
        kernels.linear_cross_entropy(x, w, None, t, impl="triton")
    with pytest.raises(ValueError, match="impl"):
        kernels.linear_cross_entropy(x, w, None, t, impl="cuda")


def test_linear_ce_moved_to_the_kernels_with_an_alias():
    """The fused linear cross-entropy is a kernel-level op; losses.linear_ce is its deprecated alias."""
    from declip_fast.kernels import linear_ce
    from declip_fast.losses import linear_ce as alias

    assert alias.linear_cross_entropy is kernels.linear_cross_entropy
    assert alias.IGNORE_INDEX == linear_ce.IGNORE_INDEX == -100
    assert alias.default_tile is linear_ce.default_tile
    default = inspect.signature(kernels.linear_cross_entropy).parameters["ignore_index"].default
    assert default == linear_ce.IGNORE_INDEX


def test_clip_loss_modes_are_the_reference_functions():
    img, txt, s = _features()
    assert kernels.clip_loss(img, txt, s).item() == reference.clip_loss(img, txt, s).item()
    rows = kernels.clip_loss(img[:4], txt, s, mode="rows", offset=3, impl="torch")
    assert rows.item() == reference.clip_loss_rows(img[:4], txt, s, 3).item()
    with pytest.raises(ValueError, match="mode"):
        kernels.clip_loss(img, txt, s, mode="dense")
    with pytest.raises(ValueError, match="offset"):
        kernels.clip_loss(img, txt, s, offset=1)


@pytest.mark.parametrize("block", [None, (3, 4)])
def test_gathered_on_one_process_is_the_symmetric_loss(block):
    """Without a process group this process holds every row: the gathered mode is the
    symmetric loss, value and gradients, and its float32 loss under out_dtype."""
    img, txt, s = _features()
    a = [t.clone().requires_grad_(True) for t in (img, txt, s)]
    b = [t.clone().requires_grad_(True) for t in (img, txt, s)]
    reference.clip_loss(*a, block=block).backward()
    loss = reference.clip_loss_gathered(*b, 0, block=block)
    loss.backward()
    torch.testing.assert_close(loss, reference.clip_loss(img, txt, s), rtol=1e-14, atol=1e-14)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-13, atol=1e-14)
    out = kernels.clip_loss(img.float(), txt.float(), s.float(), mode="gathered", out_dtype=torch.float64)
    assert out.dtype == torch.float64
    with pytest.raises(ValueError, match="offset"):
        reference.clip_loss_gathered(img[:4], txt, s, 7)


def test_nearest_dispatches_to_the_reference():
    img, txt, _ = _features()
    assert torch.equal(kernels.nearest(img, txt, 5)[1], reference.nn_lookup(img, txt, 5)[1])
    with pytest.raises(ValueError, match="impl"):
        kernels.nearest(img, txt, impl="gpu")


def test_bench_without_a_checkout_is_one_line_and_status_2(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_checkout", lambda: None)
    assert cli.main(["bench", "-k", "masking"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "source checkout" in err
