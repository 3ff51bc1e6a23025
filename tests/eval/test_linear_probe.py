"""Linear probe: separable features are learnt, C comes from the sweep, features are the frozen
normalized image features, and a missing scikit-learn says how to install it."""

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from declip_fast.eval.linear_probe import DEFAULT_CS, extract_features, fit_probe, holdout_split, linear_probe

pytest.importorskip("sklearn")


def separable(n: int, num_classes: int, dim: int, seed: int, margin: float = 3.0):
    """Gaussian clusters around well separated centres: linearly separable with high probability."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim))
    centres *= margin / np.linalg.norm(centres, axis=1, keepdims=True)
    y = rng.integers(0, num_classes, n)
    return (centres[y] + rng.normal(scale=0.3, size=(n, dim))).astype(np.float32), y.astype(np.int64)


def test_separable_features_are_learnt_with_a_c_from_the_sweep():
    rng = np.random.default_rng(1)
    all_x, all_y = separable(450, 4, 12, seed=0)  # one draw: train and test share the centres
    train_x, train_y, test_x, test_y = all_x[:150], all_y[:150], all_x[150:], all_y[150:]
    result = fit_probe(train_x, train_y, test_x, test_y)
    assert result["top1"] > 0.9
    assert result["best_C"] in DEFAULT_CS
    assert result["n_train"] == 150 and result["n_test"] == 300
    val = result["val_top1"]
    assert len(val) == len(DEFAULT_CS) and all(v is not None for v in val)
    assert val[result["Cs"].index(result["best_C"])] == max(val)  # the best C is the sweep's best
    # a chance-level control: shuffled train labels cannot be learnt
    shuffled = fit_probe(train_x, rng.permutation(train_y), test_x, test_y)
    assert shuffled["top1"] < 0.5


def test_sweep_prefers_weak_regularization_when_it_is_needed():
    # two classes that differ only by a small shift along one of 20 axes: the strong-regularization
    # end of the grid (C = 1e-3) predicts one class for everything
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    x = rng.normal(scale=0.05, size=(400, 20)).astype(np.float32)
    x[:, 0] += np.where(y == 1, 0.1, -0.1)
    result = fit_probe(x[:200], y[:200], x[200:], y[200:])
    assert result["best_C"] >= 1.0 and result["top1"] > 0.9
    assert result["val_top1"][0] < 0.75  # C = 1e-3 alone would fail


def test_holdout_split_partitions_every_class():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 1 + [3] * 2)
    fit, val = holdout_split(labels, 0.2, seed=0)
    assert sorted(np.concatenate([fit, val]).tolist()) == list(range(len(labels)))
    assert set(labels[val]) == {0, 1, 3} and set(labels[fit]) == {0, 1, 2, 3}  # singletons stay in fit
    assert (labels[val] == 0).sum() == 2


class FixedFeatures(nn.Module):
    """encode_image looks its features up by the integer "image" it is given."""

    def __init__(self, features: np.ndarray):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.features = torch.from_numpy(features)

    def encode_image(self, images, normalize=False):
        assert not self.training
        out = self.features[images.long()] * self.scale
        return F.normalize(out, dim=-1) if normalize else out


def test_linear_probe_uses_normalized_frozen_features():
    x, y = separable(240, 3, 8, seed=2)
    x *= np.random.default_rng(0).uniform(0.5, 4, size=(len(x), 1)).astype(np.float32)  # norms vary
    model = FixedFeatures(x).train()
    batches = lambda rows: [
        (torch.tensor(rows[i : i + 32]), torch.from_numpy(y[rows[i : i + 32]])) for i in range(0, len(rows), 32)
    ]
    train_rows, test_rows = np.arange(160), np.arange(160, 240)
    features, labels = extract_features(model, batches(train_rows), "cpu")
    np.testing.assert_allclose(features, x[:160] / np.linalg.norm(x[:160], axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_array_equal(labels, y[:160])
    result = linear_probe(model, batches(train_rows), batches(test_rows), "cpu")
    normalized = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert result == fit_probe(normalized[:160], y[:160], normalized[160:], y[160:])
    assert result["top1"] > 0.9
    assert model.training and model.scale.grad is None  # mode restored, nothing trained


def test_missing_scikit_learn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.linear_model", None)  # makes the import fail
    x, y = separable(20, 2, 3, seed=0)
    with pytest.raises(ImportError, match=r"pip install 'declip-fast\[train\]'"):
        fit_probe(x, y, x, y)


def test_single_class_train_set_is_rejected():
    x = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(ValueError, match="at least two classes"):
        fit_probe(x, np.zeros(10, np.int64), x, np.zeros(10, np.int64))


@pytest.mark.slow
def test_linear_probe_on_demo_beats_chance_with_random_features(demo_data):
    from declip_fast.eval.zeroshot import labelled_images
    from declip_fast.models.presets import build

    torch.manual_seed(0)
    model = build("declip_tiny")
    train = labelled_images(demo_data.train, 32, num_workers=1)
    test = labelled_images(demo_data.test, 32, num_workers=1)
    result = linear_probe(model, train, test, "cpu")
    assert result["n_train"] == 64 and result["n_test"] == 200
    # random ViT features of Fashion-MNIST are still informative (measured 0.43; chance 0.1)
    assert result["top1"] > 0.2
