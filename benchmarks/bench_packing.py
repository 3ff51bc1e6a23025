"""Block-diagonal causal attention over packed captions on the CPU: the three exact layouts the
packed text tower could use where xformers cannot run, forward + backward of one attention call at
the paper's text width (8 heads of 64, fp32), captions of web-like lengths:

- ``buckets``: what ``declip_fast.models.packing.packed_attention`` runs: captions grouped by
  length (rounded up to 16 tokens), one causal SDPA call per bucket, two gathers;
- ``longest``: one padded ``[B, longest caption]`` batch, causal SDPA (the "trim to the longest"
  simple version);
- ``block_mask``: one SDPA call over the whole packed sequence with a dense ``[T, T]`` boolean
  block-diagonal causal mask.

Caption lengths (start and end tokens included): benchmarks/bench_step.py's ``captions``,
2 + round(lognormal(median 12, sigma 0.55)), at most 77. The table prints each layout's time against ``buckets``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from declip_fast.models.packing import PackPlan, packed_attention

HEADS, HEAD_DIM, CONTEXT = 8, 64, 77
BATCHES = (16, 128)
LAYOUTS = ("buckets", "longest", "block_mask")
_times: dict[tuple[str, int], float] = {}


def caption_lengths(batch: int, seed: int = 0) -> list[int]:
    """Web-like caption lengths: benchmarks/bench_step.py's distribution."""
    from benchmarks.bench_step import captions

    return captions(batch, CONTEXT, torch.Generator().manual_seed(seed))[1]


def _layout(name: str, lengths: list[int]):
    tokens = torch.zeros(len(lengths), CONTEXT, dtype=torch.int64)
    plan = PackPlan.build(tokens, 0, lengths)
    plan.buckets()
    total = plan.total
    if name == "buckets":
        return total, lambda q, k, v: packed_attention(q, k, v, plan, "sdpa")
    if name == "longest":
        longest = max(lengths)
        index = torch.tensor([b * longest + p for b, n in enumerate(lengths) for p in range(n)])
        to_padded = torch.zeros(len(lengths) * longest, dtype=torch.int64)
        to_padded[index] = torch.arange(total)

        def run(q, k, v):
            def pad(t):
                return t[0].index_select(0, to_padded).view(len(lengths), longest, HEADS, HEAD_DIM).transpose(1, 2)

            out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), is_causal=True)
            return out.transpose(1, 2).reshape(-1, HEADS, HEAD_DIM).index_select(0, index).unsqueeze(0)

        return total, run
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(total)
    mask = (seq[:, None] == seq[None, :]) & (pos[:, None] >= pos[None, :])

    def dense(q, k, v):
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask)
        return out.transpose(1, 2)

    return total, dense


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_attention_layouts(benchmark, report, layout, batch):
    lengths = caption_lengths(batch)
    total, fn = _layout(layout, lengths)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, total, HEADS, HEAD_DIM, generator=gen).requires_grad_(True) for _ in range(3))

    def step():
        fn(q, k, v).sum().backward()

    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(median_s=median, batch=batch, tokens=total, longest=max(lengths))
    _times[(layout, batch)] = median
    if layout == LAYOUTS[-1] and ("buckets", batch) in _times:
        for other in LAYOUTS:
            report(
                "Packed causal attention on CPU, fwd+bwd, 8x64 heads: layouts vs buckets",
                batch=batch,
                tokens=total,
                longest=max(lengths),
                layout=other,
                ms=f"{_times[(other, batch)] * 1e3:.2f}",
                vs_buckets=f"{_times[(other, batch)] / _times[('buckets', batch)]:.2f}x",
            )
