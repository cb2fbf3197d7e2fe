"""Chapter 09's experiment and generated documents: the numbers a reader is told must be right,
and a report can never go out with a blank where a number should be."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import NOTEBOOKS, load_module

compare = load_module(NOTEBOOKS / "09-communicate-results" / "compare.py")


def test_labels_mark_malignant_as_positive():
    X, y = compare.load_data()
    assert X.shape == (569, 30)
    assert int(y.sum()) == 212  # the table's documented count of malignant cases


def test_out_of_fold_errors_are_deterministic_rates():
    X, y = compare.load_data()
    a = compare.out_of_fold_errors(compare.production_model(), X, y, seeds=[0, 1])
    b = compare.out_of_fold_errors(compare.production_model(), X, y, seeds=[0, 1])
    np.testing.assert_array_equal(a.miss, b.miss)
    assert a.accuracy.shape == (2,)
    assert np.all((a.miss >= 0) & (a.miss <= 1))
    assert np.all(a.miss[y == 0] == 0) and np.all(a.false_alarm[y == 1] == 0), "a miss needs a malignant case"


def test_paired_bootstrap_centres_on_the_mean_difference_and_covers_it():
    rng = np.random.default_rng(0)
    production = rng.random(500) < 0.10
    candidate = production.copy()
    candidate[:25] = True  # 25 extra errors in 500 cases: +50 per 1,000
    d = compare.paired_bootstrap(candidate.astype(float), production.astype(float), n_boot=2000)
    assert d.estimate == pytest.approx(50 * (25 - production[:25].sum()) / 25, rel=1e-9)
    assert d.low < d.estimate < d.high
    assert d.excludes_zero


def test_pairing_gives_a_narrower_interval_than_ignoring_it():
    rng = np.random.default_rng(1)
    shared = rng.random(400)
    production = (shared < 0.2).astype(float)
    candidate = (shared < 0.21).astype(float)  # the same hard cases, plus a few more
    paired = compare.paired_bootstrap(candidate, production, n_boot=2000)
    idx_a, idx_b = rng.integers(0, 400, (2, 2000, 400))
    unpaired = (candidate[idx_a].mean(1) - production[idx_b].mean(1)) * 1000
    assert paired.high - paired.low < np.ptp(np.percentile(unpaired, [2.5, 97.5]))


def test_paired_bootstrap_refuses_unpaired_inputs():
    with pytest.raises(ValueError, match="paired bootstrap needs the same cases for both models"):
        compare.paired_bootstrap(np.zeros(3), np.zeros(4))


def test_cases_needed_scales_with_the_square_of_the_width():
    d = compare.Difference(estimate=2.0, low=-2.0, high=6.0, draws=np.array([]))
    assert compare.cases_needed(d, 100) == 400  # half-width 4 is 2x the estimate: 2^2 = 4x the cases


def test_templates_render_every_value_and_refuse_missing_ones():
    d = compare.Difference(estimate=7.5, low=1.8, high=14.2, draws=np.array([]))
    m = compare.Difference(estimate=-2.3, low=-7.4, high=2.1, draws=np.array([]))
    values = dict(n_cases=569, n_malignant=212, prevalence=37.3, folds=5, n_seeds=10, seeds=list(range(10)),
                  n_boot=4000, miss=m, fa=d, cases_needed=2500, prod_acc=97.98, cand_acc=97.45,
                  prod_miss=13.9, cand_miss=11.6, prod_fa=6.3, cand_fa=13.9)
    text = compare.render("manager.md.j2", **values)
    assert "do not ship" in text.lower() and "2,500" in text and "between 2 and 14" in text
    with pytest.raises(ValueError, match="cases_needed"):
        compare.render("manager.md.j2", **{k: v for k, v in values.items() if k != "cases_needed"})
