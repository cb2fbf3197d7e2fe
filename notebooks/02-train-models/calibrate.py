"""Calibration of a classifier's probabilities: expected calibration error and temperature scaling.

A file and not a chapter cell because tests/test_02_train_models.py checks both functions on
cases whose answers are known (a perfectly calibrated predictor, an overconfident one) without
running the chapter. A library, not a script: nothing runs at import. Used from the chapter::

    import calibrate as cal
    ece, bins = cal.expected_calibration_error(probs, labels)
    temperature, nll = cal.fit_temperature(val_logits, val_labels)
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10):
    """ECE of the top-class confidence, with ``n_bins`` equal-width bins on [0, 1].

    Each prediction falls into the bin of its highest probability (the last bin is closed at
    1). ECE is the mean over bins of |accuracy - mean confidence|, weighted by the share of
    predictions in the bin. Returns the ECE and a table with one row per non-empty bin.
    """
    probs, labels = np.asarray(probs), np.asarray(labels)
    if probs.ndim != 2 or len(probs) != len(labels) or len(labels) == 0:
        raise ValueError(f"need an (n, classes) array and n labels, got {probs.shape} and {labels.shape}")
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(float)
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    conf_sum = np.bincount(bins, weights=confidence, minlength=n_bins)
    correct_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    ece = float(np.abs(correct_sum - conf_sum).sum() / len(labels))
    full = count > 0
    table = pd.DataFrame({"lower": np.arange(n_bins)[full] / n_bins, "count": count[full],
                          "confidence": conf_sum[full] / count[full],
                          "accuracy": correct_sum[full] / count[full]})
    return ece, table


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, grid: np.ndarray | None = None):
    """The temperature T that minimises the cross-entropy of ``softmax(logits / T)``.

    A grid search over T from 1/16 to 16 (log-spaced, T = 1 included exactly), so the result
    is deterministic and can never be worse than leaving the probabilities alone on these
    logits. Returns T and the cross-entropy at T.
    """
    grid = 2.0 ** np.linspace(-4, 4, 161) if grid is None else np.asarray(grid)
    nll = [torch.nn.functional.cross_entropy(logits / float(t), labels).item() for t in grid]
    best = int(np.argmin(nll))
    return float(grid[best]), float(nll[best])
