"""The metric of the pipeline under test: mean absolute error, in the target's unit (grams).

Part of the small pipeline that chapter 04 (Test ML code) tests. It refuses arrays of different
shapes instead of broadcasting them: ``(n,)`` minus ``(n, 1)`` is an ``(n, n)`` matrix in NumPy,
and its mean is a number that looks like an error and means nothing.
"""

from __future__ import annotations

import numpy as np


def mean_absolute_error(y_true, y_pred) -> float:
    """Mean of |y_true - y_pred| over equally shaped, non-empty, finite arrays."""
    y_true, y_pred = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has shape {y_true.shape} and y_pred {y_pred.shape}; they must match")
    if y_true.size == 0:
        raise ValueError("mean absolute error of zero values is undefined")
    if not (np.isfinite(y_true).all() and np.isfinite(y_pred).all()):
        raise ValueError("y_true and y_pred must be finite (a NaN prediction is a bug upstream)")
    return float(np.mean(np.abs(y_true - y_pred)))


def regression_tolerance(sd: float, n_run: int, n_reference: int, z: float) -> float:
    """How far a metric averaged over ``n_run`` seeds may sit from a reference averaged over ``n_reference``.

    ``z`` standard errors of the difference of the two means: both are noisy, the reference too, so
    the variances add (``sd**2 / n_run + sd**2 / n_reference``). Conservative when the seed sets overlap.
    """
    return z * sd * (1 / n_run + 1 / n_reference) ** 0.5
