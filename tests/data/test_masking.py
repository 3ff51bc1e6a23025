"""MLM masking: only maskable positions, BERT's 15% / 80-10-10 within binomial bounds, seeded."""

import math

import pytest
import torch

from declip_fast.data import masking, tokenizer

SOT, EOT, MASK = tokenizer.SOT_ID, tokenizer.EOT_ID, tokenizer.MASK_ID


def _batch(rng, b=4000, length=32):
    """Captions of random lengths 0..29 of regular ids, padded with 0 (which is also '!')."""
    ids = torch.zeros(b, length, dtype=torch.long)
    lengths = torch.randint(0, length - 2, (b,), generator=rng)
    for i, n in enumerate(lengths.tolist()):
        ids[i, 0] = SOT
        ids[i, 1 : n + 1] = torch.randint(0, SOT, (n,), generator=rng)
        ids[i, n + 1] = EOT
    return ids, lengths


def _within(count, n, p, sigmas=5):
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def test_statistics_and_positions(rng):
    ids, lengths = _batch(rng)
    masked, targets = masking.mask_tokens(ids, generator=rng)
    chosen = targets != masking.IGNORE_INDEX
    maskable = masking.maskable_positions(ids)
    n = int(maskable.sum())
    assert n > 50_000
    assert not (chosen & ~maskable).any(), "a start, end or padding position was chosen"
    assert torch.equal(targets[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    # 15% chosen, plus one forced pick in captions that drew none (expected count added).
    per_caption = lengths.clamp(min=0)
    forced = sum(float((1 - 0.15) ** int(k)) for k in per_caption.tolist() if k > 0)
    assert _within(int(chosen.sum()) - forced, n, 0.15, sigmas=6)
    c = int(chosen.sum())
    to_mask = int((masked[chosen] == MASK).sum())
    kept = int((masked[chosen] == ids[chosen]).sum())
    assert _within(to_mask, c, 0.8) and _within(kept, c, 0.1, sigmas=6)
    replaced = masked[chosen][(masked[chosen] != MASK) & (masked[chosen] != ids[chosen])]
    assert ((replaced >= 0) & (replaced < SOT)).all(), "a random replacement used a special id"


def test_every_caption_with_a_word_is_masked_and_empty_ones_are_not(rng):
    ids, lengths = _batch(rng, b=2000)
    _, targets = masking.mask_tokens(ids, generator=rng, prob=0.01)
    per_caption = (targets != masking.IGNORE_INDEX).sum(dim=1)
    assert (per_caption[lengths > 0] >= 1).all()
    assert (per_caption[lengths == 0] == 0).all()


def test_real_tokens_and_existing_masks(rng):
    ids = tokenizer.tokenize(["a photo of a dog !", "", "!!!"], context_length=16)
    ids[0, 2] = MASK
    for _ in range(50):
        _, targets = masking.mask_tokens(ids, generator=rng, prob=1.0)
        chosen = targets != masking.IGNORE_INDEX
        eot = (ids == EOT).int().argmax(dim=1)
        for row in range(3):
            expect = [p for p in range(1, int(eot[row])) if ids[row, p] != MASK]
            assert chosen[row].nonzero().flatten().tolist() == expect


def test_seeded_and_validated(rng):
    ids, _ = _batch(rng, b=50)
    a = masking.mask_tokens(ids, generator=torch.Generator().manual_seed(3))
    b = masking.mask_tokens(ids, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="integer"):
        masking.mask_tokens(ids.float())
    with pytest.raises(ValueError, match="probability"):
        masking.mask_tokens(ids, prob=0.0)
