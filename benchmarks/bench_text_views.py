"""The text views' cost on the CPU, where the loader workers make them: EDA captions/s and MLM
masking tokens/s (one worker, one core)."""

from __future__ import annotations

import random

import pytest
import torch

from declip_fast.data import eda, masking

WORDS = (
    "a photo of the small red dog running across green grass near an old wooden house "
    "two people ride bikes on sunny road while children play with kite beside lake"
).split()


def _captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 25))) for _ in range(n)]


def test_eda_captions_per_second(benchmark, report):
    captions = _captions(20_000)
    eda.synonym_table()  # built once per process, outside the timing
    benchmark.pedantic(eda.eda_batch, args=(captions, 0), rounds=3, iterations=1)
    rate = len(captions) / benchmark.stats.stats.median
    benchmark.extra_info["captions_per_s"] = rate
    report("text views on the CPU (one core)", what="EDA", rate=f"{rate:,.0f} captions/s")


@pytest.mark.parametrize("batch", [4096])
def test_masking_tokens_per_second(benchmark, report, batch):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49406, (batch, 77), generator=gen)
    ids[:, 0], ids[:, 40] = 49406, 49407
    benchmark.pedantic(masking.mask_tokens, args=(ids, gen), rounds=5, iterations=1)
    rate = ids.numel() / benchmark.stats.stats.median
    benchmark.extra_info["tokens_per_s"] = rate
    report("text views on the CPU (one core)", what=f"MLM masking, batch {batch} x 77", rate=f"{rate:,.0f} tokens/s")
