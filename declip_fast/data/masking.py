"""MLM masking of token ids for DeCLIP's text self-supervision (BERT's recipe, as DeCLIP uses it).

Of the maskable positions of each caption (strictly between the start token and the first
end-of-text token, so never start, end, padding or an existing mask token), 15% are chosen
independently; a caption with at least one maskable position but none chosen gets one chosen
uniformly, so every such caption contributes to the loss. Of the chosen positions 80% become
``MASK_ID``, 10% a random regular token id (not start, end or mask) and 10% stay unchanged; the
targets are the original ids there and ``IGNORE_INDEX`` everywhere else. Padding is positional:
OpenCLIP pads with id 0, which is also the id of "!", so ids alone cannot tell padding apart.

Vectorised over the batch (no Python loop over captions) and reproducible with a
``torch.Generator``.
"""

from __future__ import annotations

import torch

from declip_fast.data import tokenizer

IGNORE_INDEX = -100
MASK_PROB = 0.15
REPLACE_WITH_MASK = 0.8
REPLACE_WITH_RANDOM = 0.1


def maskable_positions(ids: torch.Tensor) -> torch.Tensor:
    """Bool [B, L]: positions after the start token and before the first end-of-text token."""
    if ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"token ids must be an integer [B, L] tensor, got {ids.dtype} {tuple(ids.shape)}")
    pos = torch.arange(ids.shape[1], device=ids.device)
    is_eot = ids == tokenizer.EOT_ID
    first_eot = torch.where(is_eot.any(dim=1), is_eot.int().argmax(dim=1), ids.shape[1])
    inside = (pos[None, :] > 0) & (pos[None, :] < first_eot[:, None])
    special = (ids == tokenizer.SOT_ID) | is_eot | (ids == tokenizer.MASK_ID)
    return inside & ~special


def mask_tokens(
    ids: torch.Tensor, generator: torch.Generator | None = None, prob: float = MASK_PROB
) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked ids, targets) for token ids [B, L]; see the module docstring for the recipe."""
    if not 0.0 < prob <= 1.0:
        raise ValueError(f"the masking probability must be in (0, 1], got {prob}")
    maskable = maskable_positions(ids)
    draw = lambda: torch.rand(ids.shape, generator=generator, device=ids.device)
    chosen = maskable & (draw() < prob)
    # Captions with a maskable token but nothing chosen: choose one of theirs uniformly.
    empty = maskable.any(dim=1) & ~chosen.any(dim=1)
    pick = torch.where(maskable, draw(), -1.0).argmax(dim=1)
    chosen[empty, pick[empty]] = True
    action = draw()
    to_mask = chosen & (action < REPLACE_WITH_MASK)
    to_random = chosen & (action >= REPLACE_WITH_MASK) & (action < REPLACE_WITH_MASK + REPLACE_WITH_RANDOM)
    # Regular token ids are [0, SOT_ID): the specials (start, end, mask) come after them.
    random_ids = torch.randint(0, tokenizer.SOT_ID, ids.shape, generator=generator, device=ids.device)
    masked = torch.where(to_mask, torch.full_like(ids, tokenizer.MASK_ID), ids)
    masked = torch.where(to_random, random_ids.to(ids.dtype), masked)
    targets = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    return masked, targets
