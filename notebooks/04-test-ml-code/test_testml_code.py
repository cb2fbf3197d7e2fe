"""Tests of the code: unit tests of the preprocessing, property tests of it, the metric and predict.

No network is trained here, so the whole file runs in a few seconds. Hypothesis runs derandomized
and without its example database (the same examples on every run and every machine), and keeps
its cache in the system's temporary folder, so no ``.hypothesis/`` folder appears in the repository.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.extra.numpy import arrays
from testml_data import CATEGORIES, NUMERIC, load_table, split
from testml_features import Preprocessor
from testml_metrics import mean_absolute_error
from testml_model import MassModel, make_net

# Hypothesis caches constants it reads in local source files under ./.hypothesis/ while pytest collects,
# even with database=None. Keep that cache out of the repository, for the whole session.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "gradient-rage-hypothesis")
# Same examples on every run and machine, no database folder, no "explain" phase noise in reports.
PROPERTY = settings(derandomize=True, database=None, max_examples=50, deadline=None,
                    phases=[Phase.explicit, Phase.generate, Phase.shrink])


@pytest.fixture(scope="module")
def tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    return split(load_table())


# Unit tests of the transform (shape, dtype, no NaN, statistics from training rows) and the metric.


def test_transform_has_one_float32_row_per_input_row(tables):
    train, test = tables
    pre = Preprocessor().fit(train)
    features = pre.transform(test)
    assert features.shape == (len(test), pre.n_features)
    assert features.dtype == np.float32


def test_transform_introduces_no_nan_for_missing_or_unknown_values(tables):
    train, test = tables
    request = test.head(4).copy()
    request.loc[request.index[0], NUMERIC] = np.nan
    request.loc[request.index[1], ["sex", "island"]] = [np.nan, "Anvers"]  # missing, and never seen
    features = Preprocessor().fit(train).transform(request)
    assert np.isfinite(features).all()
    assert features[1, len(NUMERIC) + len(CATEGORIES["species"]):].sum() == 0  # no island, no sex


def test_a_missing_value_is_filled_with_the_training_median(tables):
    train, test = tables
    pre = Preprocessor().fit(train)
    request = test[test["species"] == "Gentoo"].head(5).copy()  # serving batches are rarely mixed
    request.loc[request.index[0], "flipper_length_mm"] = np.nan
    filled = pre.unscale(pre.scale(request))["flipper_length_mm"].iloc[0]
    assert filled == pytest.approx(train["flipper_length_mm"].median())


def test_transform_never_refits(tables):
    train, test = tables
    pre = Preprocessor().fit(train)
    before = pre.state()
    pre.transform(test)
    assert pre.state() == before
    np.testing.assert_allclose(pre.means_, train[NUMERIC].mean())


def test_mae_refuses_arrays_of_different_shapes():
    y = np.arange(5.0)
    with pytest.raises(ValueError, match="shape"):
        mean_absolute_error(y, y[:, None])  # broadcasting would return a 5x5 mean and no error


# Property tests: what must hold for every input, not just for the rows we thought of.

def finite(shape, bound: float = 1e6):
    return arrays(float, shape, elements=st.floats(-bound, bound))


measurements = st.integers(1, 30).flatmap(lambda n: finite((n, len(NUMERIC)), 1e4)).map(
    lambda values: pd.DataFrame(values, columns=NUMERIC))


@PROPERTY
@given(measurements)
def test_unscale_inverts_scale(frame):
    pre = Preprocessor().fit(frame)
    np.testing.assert_allclose(pre.unscale(pre.scale(frame)), frame, rtol=1e-9, atol=1e-6)


@PROPERTY
@given(st.integers(1, 40).flatmap(lambda n: st.tuples(finite(n), finite(n))))
def test_mae_is_bounded_symmetric_and_zero_on_a_perfect_fit(pair):
    y_true, y_pred = pair
    error = mean_absolute_error(y_true, y_pred)
    assert 0 <= error <= np.abs(y_true - y_pred).max() * (1 + 1e-12)
    assert error == mean_absolute_error(y_pred, y_true)
    assert mean_absolute_error(y_true, y_true) == 0


@pytest.fixture(scope="module")
def untrained(tables) -> MassModel:
    """A model with random (seeded) weights: enough to test the code path of predict."""
    pre = Preprocessor().fit(tables[0])
    torch.manual_seed(0)
    return MassModel(pre, make_net(pre.n_features), y_mean=4000.0, y_scale=800.0)


@PROPERTY
@given(st.permutations(range(20)))
def test_permuting_rows_permutes_predictions(untrained, tables, order):
    rows = tables[1].head(20)
    np.testing.assert_allclose(untrained.predict(rows.iloc[order]), untrained.predict(rows)[order], rtol=1e-6)
