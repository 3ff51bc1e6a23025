"""No non-finite row ever enters the NNS queue: NNSLoss refuses such a batch (and makes the
step's loss NaN, so the trainer skips it), and a skipped training step leaves the queue as it was."""

import math

import torch

from declip_fast.losses.nns import FeatureQueue, NNSLoss
from declip_fast.train.trainer import Trainer
from tests.reliability.conftest import synthetic_batch, trainer_config


def _views(b, d, gen, nan_text=False):
    image = torch.nn.functional.normalize(torch.randn(b, d, generator=gen), dim=-1)
    text = torch.randn(b, d, generator=gen)
    if nan_text:
        text[1, 0] = math.nan
    return [image], [text]


def test_nns_loss_refuses_a_non_finite_text_view(rng):
    loss_fn = NNSLoss(queue_size=32, dim=8)
    scale = torch.tensor(10.0)
    assert loss_fn(*_views(4, 8, rng, nan_text=True), scale).isnan()  # filling: NaN, not None
    assert len(loss_fn.queue) == 0
    loss_fn(*_views(4, 8, rng), scale)
    rows_before = loss_fn.queue.rows.clone()
    loss = loss_fn(*_views(4, 8, rng, nan_text=True), scale)
    assert loss.isnan() and len(loss_fn.queue) == 4
    assert torch.equal(loss_fn.queue.rows, rows_before) and torch.isfinite(loss_fn.queue.rows).all()


def test_feature_queue_enqueue_reports_a_refused_batch(rng):
    queue = FeatureQueue(8, 4)
    assert queue.enqueue(torch.randn(2, 4, generator=rng)) is True
    assert queue.enqueue(torch.full((2, 4), math.inf)) is False and len(queue) == 2


def test_a_skipped_step_leaves_the_queue_unchanged(tmp_path):
    trainer = Trainer(trainer_config(tmp_path / "run")).build()
    queue = trainer.loss_fn.nns.queue
    trainer.step(synthetic_batch(0))
    rows, filled = queue.rows.clone(), len(queue)
    forward = trainer.model.forward

    def nan_text(**kwargs):  # one caption's embedding goes NaN, as after a bad update
        out = forward(**kwargs)
        out["text_features"][0] = out["text_features"][0].clone().index_fill(0, torch.tensor([3]), math.nan)
        return out

    trainer.model.forward = nan_text
    values = trainer.step(synthetic_batch(1))
    trainer.model.forward = forward
    assert values["skipped_steps"] == 1
    assert len(queue) == filled and torch.equal(queue.rows, rows) and torch.isfinite(queue.rows).all()
    values = trainer.step(synthetic_batch(2))
    assert math.isfinite(values["total"]) and values["skipped_steps"] == 1
    trainer.close()
