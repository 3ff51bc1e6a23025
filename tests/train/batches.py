"""A deterministic batch of the loader's contract, for trainer tests that run without a loader."""

import torch

from declip_fast.data import masking
from declip_fast.models.packing import lengths_from_tokens

GLOBAL_BATCH = 8


def synthetic_batch(step: int) -> dict:
    """A deterministic global batch: real-looking token rows (SOT, words, EOT), MLM masking."""
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.zeros(GLOBAL_BATCH, 77, dtype=torch.long)
    for i in range(GLOBAL_BATCH):
        n = 4 + i % 5
        tokens[i, 0], tokens[i, n + 1] = 49406, 49407
        tokens[i, 1 : n + 1] = torch.randint(300, 40000, (n,), generator=gen)
    masked, targets = masking.mask_tokens(tokens, gen)
    return {
        "images_1": torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=gen),
        "images_2": torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=gen),
        "text_1": masked,
        "mlm_targets": targets,
        "text_2": tokens.roll(1, dims=1),
        "index": torch.arange(GLOBAL_BATCH),
        # The caption lengths the loaders hand out with every batch, on the host.
        "text_1_lengths": lengths_from_tokens(masked, 49407),
        "text_2_lengths": lengths_from_tokens(tokens.roll(1, dims=1), 49407),
    }
