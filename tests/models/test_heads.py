"""DeCLIP's heads: the MLM head reads only the positions it is given; SimSiam's shapes and layers."""

import pytest
import torch
from torch import nn

from declip_fast.models import MLMHead, SimSiamPredictor, SimSiamProjector, flat_positions
from declip_fast.models.heads import gather_positions


def _mask(rng, b, n):
    mask = torch.rand(b, n, generator=rng) < 0.3
    mask[0, 1] = True  # at least one
    return mask


def test_mlm_head_runs_only_on_masked_positions(rng):
    torch.manual_seed(0)
    b, n, w, vocab = 3, 10, 16, 50
    head = MLMHead(w, vocab)
    states = torch.randn(b, n, w, generator=rng, requires_grad=True)
    mask = _mask(rng, b, n)
    seen = []
    head.dense.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape))
    logits = head(states, mask)
    assert logits.shape == (int(mask.sum()), vocab)
    assert seen == [(int(mask.sum()), w)], "the transform ran on more than the masked positions"
    (logits * torch.randn(logits.shape, generator=rng)).sum().backward()
    grad_rows = states.grad.abs().sum(-1)
    assert (grad_rows[~mask] == 0).all(), "an unmasked position influenced the logits"
    assert (grad_rows[mask] > 0).all()


def test_mlm_positions_mask_and_indices_agree_in_row_major_order(rng):
    torch.manual_seed(0)
    b, n, w, vocab = 3, 10, 16, 50
    head = MLMHead(w, vocab)
    states = torch.randn(b, n, w, generator=rng)
    mask = _mask(rng, b, n)
    index = flat_positions(mask)
    torch.testing.assert_close(head(states, index), head(states, mask))
    # Row i of the logits is the head on the i-th masked position, scanning row by row.
    rows, cols = mask.nonzero(as_tuple=True)
    for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
        single = head(states[r : r + 1, c : c + 1], torch.tensor([0]))
        torch.testing.assert_close(single, head(states, mask)[i : i + 1])


def test_gather_positions_rejects_bad_positions():
    states = torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match="mask shape"):
        gather_positions(states, torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="flat indices"):
        gather_positions(states, torch.zeros(2, 4, dtype=torch.long))


def test_simsiam_heads_follow_the_spec():
    projector, predictor = SimSiamProjector(512, 1024), SimSiamPredictor(1024, 512)
    linears = [m for m in projector.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 1024), (1024, 1024), (1024, 1024)]
    assert [m.num_features for m in projector.modules() if isinstance(m, nn.BatchNorm1d)] == [1024] * 3
    linears = [m for m in predictor.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1024, 512), (512, 1024)]
    assert [m.num_features for m in predictor.modules() if isinstance(m, nn.BatchNorm1d)] == [512]
    x = torch.randn(4, 512)
    z = projector(x)
    assert z.shape == (4, 1024) and predictor(z).shape == (4, 1024)
    # The projector ends in batch norm (no ReLU): in training its outputs are centred per feature.
    torch.testing.assert_close(z.mean(0), projector.bn3.bias.expand(1024), atol=1e-5, rtol=0)
    assert (z < 0).any()
