"""Linear probe: logistic regression on frozen, L2-normalized image features.

CLIP's protocol (Radford et al. 2021, appendix A.3) in small: features of the train and test
images from the frozen image tower, scikit-learn's L-BFGS ``LogisticRegression``, the inverse
regularization strength C picked on a held-out part of the train features, then a refit on all
train features with that C and one evaluation on the test features. CLIP searched C with a
parametric binary search; a 7-point log grid over 1e-3..1e3 is enough for the demo-sized sets this
runs on, and each fit warm-starts from the previous C's solution (the grid runs from strong to
weak regularization).

Threads: below ``SINGLE_THREAD_SIZE`` feature values the fits run on one BLAS/OpenMP thread.
scikit-learn's multinomial loss synchronizes its thread pool every L-BFGS iteration, which
dominates small problems, and far more so when another process holds a core: they run several
times faster single-threaded. Larger problems keep the library's default.

scikit-learn is an optional dependency (``declip-fast[train]``), imported when a probe is fit.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from declip_fast.eval.zeroshot import eval_mode, model_dtype

DEFAULT_CS = tuple(np.logspace(-3, 3, 7).tolist())
SINGLE_THREAD_SIZE = 2**24  # train features (N x E) below this fit on one thread


def _logistic_regression():
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
    except ImportError as err:
        raise ImportError("the linear probe needs scikit-learn: pip install 'declip-fast[train]'") from err
    return LogisticRegression, ConvergenceWarning


@torch.no_grad()
def extract_features(model: torch.nn.Module, batches, device: torch.device | str) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 [N, E], L2-normalized; labels int64 [N]) of every batch, model frozen."""
    features, labels = [], []
    with eval_mode(model):
        dtype = model_dtype(model)
        for images, batch_labels in batches:
            out = model.encode_image(images.to(device, dtype), normalize=True)
            features.append(out.float().cpu().numpy())
            labels.append(np.asarray(batch_labels, dtype=np.int64).reshape(-1))
    if not features:
        raise ValueError("no images to extract features from")
    return np.concatenate(features), np.concatenate(labels)


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows): about ``fraction`` of every class with >= 2 samples held out."""
    rng = np.random.default_rng(seed)
    fit, val = [], []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        n_val = int(round(fraction * len(rows))) if len(rows) >= 2 else 0
        n_val = min(max(n_val, 1 if len(rows) >= 2 else 0), len(rows) - 1)
        val.append(rows[:n_val])
        fit.append(rows[n_val:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(val))


def _fit(classifier_cls, C: float, x: np.ndarray, y: np.ndarray, max_iter: int, previous=None):
    classifier = previous if previous is not None else classifier_cls(max_iter=max_iter, warm_start=True)
    classifier.set_params(C=C)
    with warnings.catch_warnings():  # a C at the grid's weak end may stop at max_iter: still a fit
        warnings.simplefilter("ignore", _logistic_regression()[1])
        return classifier.fit(x, y)


def fit_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    Cs=DEFAULT_CS,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 1000,
) -> dict:
    """Sweep C on a held-out split of the train features, refit on all of them, score the test.

    Returns ``top1`` (test accuracy), ``best_C``, ``Cs`` (ascending) with ``val_top1`` (the
    validation accuracy of each, None where no sweep ran), ``n_train``, ``n_test``."""
    classifier_cls, _ = _logistic_regression()
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    train_x, test_x = np.asarray(train_x), np.asarray(test_x)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if len(np.unique(train_y)) < 2:
        raise ValueError("the linear probe needs at least two classes in the train set")
    with threadpool_limits(1 if train_x.size < SINGLE_THREAD_SIZE else None):
        return _sweep_and_fit(classifier_cls, train_x, train_y, test_x, test_y, Cs, val_fraction, seed, max_iter)


def _sweep_and_fit(classifier_cls, train_x, train_y, test_x, test_y, Cs, val_fraction, seed, max_iter) -> dict:
    Cs = sorted(float(c) for c in Cs)
    fit_rows, val_rows = holdout_split(train_y, val_fraction, seed)
    val_top1 = {}
    if len(Cs) > 1 and len(val_rows) and len(np.unique(train_y[fit_rows])) >= 2:
        classifier = None
        for C in Cs:  # strong -> weak regularization, each fit warm-started from the last
            classifier = _fit(classifier_cls, C, train_x[fit_rows], train_y[fit_rows], max_iter, classifier)
            val_top1[C] = float(classifier.score(train_x[val_rows], train_y[val_rows]))
        best_C = max(Cs, key=lambda c: (val_top1[c], -abs(np.log10(c))))  # ties: the most central C
    else:
        best_C = Cs[len(Cs) // 2]
    final = _fit(classifier_cls, best_C, train_x, train_y, max_iter)
    return {
        "top1": float(final.score(test_x, test_y)),
        "best_C": best_C,
        "Cs": Cs,
        "val_top1": [val_top1.get(c) for c in Cs],
        "n_train": len(train_y),
        "n_test": len(test_y),
    }


def linear_probe(
    model: torch.nn.Module,
    train_batches,
    test_batches,
    device: torch.device | str,
    Cs=DEFAULT_CS,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 1000,
) -> dict:
    """Linear-probe accuracy of ``model``'s frozen image features (see :func:`fit_probe`)."""
    _logistic_regression()  # fail before spending time on features
    train_x, train_y = extract_features(model, train_batches, device)
    test_x, test_y = extract_features(model, test_batches, device)
    return fit_probe(train_x, train_y, test_x, test_y, Cs, val_fraction, seed, max_iter)
