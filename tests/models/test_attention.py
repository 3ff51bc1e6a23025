"""Attention: the backend switch, the SDPA path against a float64 reference, the module against
nn.MultiheadAttention, and (GPU only) xformers against SDPA."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import declip_fast.models.attention as attention_module
from declip_fast.models.attention import Attention, attention, resolve_backend


def reference_attention(q, k, v, causal=False):
    """softmax(q k^T / sqrt(D)) v on BSHD tensors, computed in the inputs' dtype, plainly."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    if causal:
        lq, lk = q.shape[1], k.shape[1]
        future = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


@pytest.mark.parametrize(
    "causal, lq, lk",
    [(False, 7, 7), (True, 7, 7), (True, 13, 13), (False, 1, 9)],  # (1, 9): the attention pool's shape
)
def test_sdpa_matches_float64_reference(rng, causal, lq, lk):
    b, h, d = 2, 3, 8
    q64 = torch.randn(b, lq, h, d, generator=rng, dtype=torch.float64)
    k64 = torch.randn(b, lk, h, d, generator=rng, dtype=torch.float64)
    v64 = torch.randn(b, lk, h, d, generator=rng, dtype=torch.float64)
    expected = reference_attention(q64, k64, v64, causal)
    q, k, v = (t.float() for t in (q64, k64, v64))
    out = attention(q, k, v, causal=causal, backend="sdpa")
    assert out.shape == (b, lq, h, d)
    # Tolerance: twice the error of the plain fp32 computation, plus a little slack.
    plain_err = (reference_attention(q, k, v, causal).double() - expected).abs().max().item()
    err = (out.double() - expected).abs().max().item()
    assert err <= 2 * plain_err + 1e-6, (err, plain_err)
    # float64 inputs stay float64 end to end.
    out64 = attention(q64, k64, v64, causal=causal, backend="sdpa")
    torch.testing.assert_close(out64, expected, rtol=0, atol=1e-12)


def test_causal_uses_is_causal_not_a_mask(monkeypatch, rng):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", spy)
    attn = Attention(16, 2, causal=True, backend="sdpa")
    attn(torch.randn(2, 5, 16, generator=rng))
    assert len(calls) == 1
    assert calls[0]["is_causal"] is True and calls[0].get("attn_mask") is None


def test_backend_resolution_on_cpu():
    x = torch.zeros(1, 2, 1, 4)
    assert resolve_backend("auto", x) == "sdpa"
    assert resolve_backend("sdpa", x) == "sdpa"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_backend("xformers", x)
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("flash", x)
    with pytest.raises(ValueError, match="backend"):
        Attention(8, 2, backend="flash")


@pytest.mark.parametrize("causal", [False, True])
def test_module_matches_multihead_attention(rng, causal):
    """Same parameter names and layout as nn.MultiheadAttention: its state dict loads 1:1 and the
    outputs agree (float64, so the comparison is tight)."""
    width, heads, n = 24, 3, 6
    mha = nn.MultiheadAttention(width, heads, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        for p in mha.parameters():
            p.copy_(torch.randn(p.shape, generator=rng, dtype=torch.float64) * 0.3)
    ours = Attention(width, heads, causal=causal, backend="sdpa").double()
    ours.load_state_dict(mha.state_dict(), strict=True)
    x = torch.randn(2, n, width, generator=rng, dtype=torch.float64)
    mask = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1) if causal else None
    expected = mha(x, x, x, attn_mask=mask, need_weights=False)[0]
    torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-12)


def test_import_is_light():
    """Importing the models package pulls in neither xformers, open_clip nor torch._dynamo, and
    building any preset on the meta device allocates and initialises nothing for real: every
    parameter and buffer is a meta tensor, the process's peak memory grows by far less than the
    smallest paper preset's weights (400 MB in float32), and no initialisation goes through
    torch._refs (whose first use imports torch._dynamo and sympy, ~5 s)."""
    code = (
        "import resource, sys\n"
        "import declip_fast.models as M\n"
        "heavy = [m for m in ('xformers', 'open_clip', 'torch._dynamo') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for name in M.list_presets():\n"
        "    model = M.build(name, device='meta')\n"
        "    real = [k for k, t in [*model.named_parameters(), *model.named_buffers()] if not t.is_meta]\n"
        "    assert not real, (name, real[:5])\n"
        "assert 'torch._dynamo' not in sys.modules, 'building on meta imported torch._dynamo'\n"
        "unit = 1 if sys.platform == 'darwin' else 1024\n"  # ru_maxrss: bytes on macOS, KiB elsewhere
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * unit)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) < 64 * 2**20, "building on meta allocated real memory"


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_xformers_matches_sdpa(causal, dtype):
    pytest.importorskip("xformers.ops")
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, n, h, d = 4, 77, 8, 64
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
    assert resolve_backend("auto", q) == "xformers"
    expected = reference_attention(q.double(), k.double(), v.double(), causal)
    sdpa_err = (attention(q, k, v, causal=causal, backend="sdpa").double() - expected).abs().max().item()
    xf_err = (attention(q, k, v, causal=causal, backend="xformers").double() - expected).abs().max().item()
    assert xf_err <= 2 * sdpa_err + 1e-3, (xf_err, sdpa_err)
