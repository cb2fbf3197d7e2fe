"""Tests of the model: how it behaves, whether it trains, whether serving matches training, how good it is.

One small network is trained for the whole module (a fraction of a second). The metric regression
test trains twenty more and is marked ``slow``: in a real project that is the test that takes
minutes, so it runs nightly instead of on every commit (``pytest -m "not slow"``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from testml_data import NUMERIC, TARGET, load_table, split
from testml_features import Preprocessor
from testml_metrics import mean_absolute_error, regression_tolerance
from testml_model import MassModel, fit, predict_records, train_network


@pytest.fixture(scope="module")
def tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    return split(load_table())


@pytest.fixture(scope="module")
def model(tables) -> MassModel:
    return fit(tables[0], seed=0)


# Behaviour: invariance (a change that must not move the prediction).


def test_column_order_does_not_change_predictions(model, tables):
    rows = tables[1]
    np.testing.assert_allclose(model.predict(rows[rows.columns[::-1]]), model.predict(rows), rtol=1e-6)


def test_columns_the_model_does_not_use_do_not_change_predictions(model, tables):
    rows = tables[1]
    np.testing.assert_allclose(model.predict(rows.assign(year=2031, ring_id="X")), model.predict(rows), rtol=1e-6)


def test_a_row_gets_the_same_prediction_alone_or_in_a_batch(model, tables):
    rows = tables[1].head(10)
    alone = [model.predict(rows.iloc[[i]])[0] for i in range(len(rows))]
    np.testing.assert_allclose(alone, model.predict(rows), rtol=1e-6)


# Behaviour: directional expectations (a change that must move the prediction one way).


def test_males_are_predicted_heavier_than_otherwise_identical_females(model, tables):
    rows = tables[1]
    gap = model.predict(rows.assign(sex="male")) - model.predict(rows.assign(sex="female"))
    assert (gap > 0).all(), f"{(gap <= 0).sum()} of {len(gap)} females predicted at least as heavy as males"


def test_longer_flippers_predict_more_mass(model, tables):
    rows = tables[1]
    longer = rows.assign(flipper_length_mm=rows["flipper_length_mm"] + 10)
    assert (model.predict(longer) > model.predict(rows)).all()


# Behaviour: minimum functionality (easy cases the model must get right).


def test_typical_penguins_are_predicted_near_their_group(model, tables):
    train = tables[0]
    groups = train.groupby(["species", "sex"])
    typical = groups[[*NUMERIC, TARGET]].median().reset_index()
    typical["island"] = groups["island"].agg(lambda s: s.mode()[0]).to_numpy()
    sex_gap = typical.pivot(index="species", columns="sex", values=TARGET).eval("male - female")
    tolerance = sex_gap.min() / 2  # nearer to its own group than halfway to the other sex
    error = pd.Series(model.predict(typical) - typical[TARGET].to_numpy(), index=typical.index)
    assert (error.abs() < tolerance).all(), f"tolerance {tolerance:.0f} g:\n{typical.assign(error=error)}"


def test_every_species_is_predicted_better_than_its_own_mean(model, tables):
    train, test = tables  # an average over all penguins can hide a species the model does not serve
    for species, rows in test.groupby("species"):
        species_mean = train.loc[train["species"] == species, TARGET].mean()
        lookup = mean_absolute_error(rows[TARGET], np.full(len(rows), species_mean))
        slice_mae = mean_absolute_error(rows[TARGET], model.predict(rows))
        assert slice_mae < 0.9 * lookup, f"{species}: MAE {slice_mae:.0f} g, its training mean's {lookup:.0f} g"


# Training smoke tests: cheap signs that the training loop can learn at all.


def tiny_batch(train: pd.DataFrame, n: int) -> tuple[np.ndarray, np.ndarray]:
    y = train[TARGET].to_numpy(dtype=float)
    return Preprocessor().fit(train).transform(train.head(n)), ((y - y.mean()) / y.std())[:n]


def test_loss_decreases_on_a_tiny_batch(tables):
    _, losses = train_network(*tiny_batch(tables[0], 16), epochs=30, batch_size=16)
    assert losses[-1] < 0.5 * losses[0], f"loss went from {losses[0]:.3f} to {losses[-1]:.3f}"


def test_a_single_batch_can_be_overfit(tables):
    features, target = tiny_batch(tables[0], 8)
    _, losses = train_network(features, target, epochs=300, batch_size=8, lr=3e-2)
    # Predicting the batch mean scores the target's variance; 8 rows should be fit far better than that.
    assert losses[-1] < 0.1 * target.var(), f"loss {losses[-1]:.3f}, target variance {target.var():.3f}"


def test_training_is_deterministic_under_a_seed(tables):
    train, test = tables
    first, again, other = (fit(train, seed=seed, epochs=5).predict(test) for seed in (0, 0, 1))
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other), "seed 1 gave seed 0's model: the seed is not used"


# Train/serve skew: the serving path must preprocess with the object the model was trained with.


def test_saved_and_served_model_predicts_what_the_trained_one_does(model, tables, tmp_path):
    rows = tables[1].head(20)
    model.save(tmp_path / "model.pt")
    served = predict_records(MassModel.load(tmp_path / "model.pt"), rows.to_dict("records"))
    np.testing.assert_allclose(served, model.predict(rows), rtol=1e-6)


def test_one_request_alone_gets_the_batch_prediction(model, tables):
    rows = tables[1].head(5)
    alone = [predict_records(model, [record])[0] for record in rows.to_dict("records")]
    np.testing.assert_allclose(alone, model.predict(rows), rtol=1e-6)


def test_serving_names_the_missing_field(model, tables):
    record = tables[1].iloc[0].drop("flipper_length_mm").to_dict()
    with pytest.raises(ValueError, match="flipper_length_mm"):
        predict_records(model, [record])


# Metric regression: a tolerance from measured seed noise, not from a guess.
# testml_reference.py measured the reference once, over 100 seeds, and stored it with how it was made.
REFERENCE = json.loads(Path(__file__).with_name("testml_reference.json").read_text())


@pytest.mark.slow
def test_test_mae_stays_within_seed_noise(tables):
    train, test = tables
    seeds, ref = REFERENCE["test_seeds"], REFERENCE["reference"]
    mean_mae = np.mean([mean_absolute_error(test[TARGET], fit(train, seed=s).predict(test)) for s in seeds])
    # z standard errors of (this mean - the reference mean): both are averages of noisy seeds
    tolerance = regression_tolerance(ref["sd_g"], len(seeds), len(ref["mae_g"]), REFERENCE["z"])
    assert abs(mean_mae - ref["mean_g"]) <= tolerance, (
        f"test MAE {mean_mae:.1f} g (mean of {len(seeds)} seeds) is outside {ref['mean_g']:.1f} +- {tolerance:.1f} g. "
        "Worse: find the regression. Better: find the leak before you celebrate, then rerun testml_reference.py."
    )
