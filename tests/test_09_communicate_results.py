"""Chapter 09's experiment and generated documents: the numbers a reader is told must be right,
a report can never go out with a blank where a number should be, and no rendered document may
contain a number that no computation produced."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import NOTEBOOKS, load_module
from sklearn.model_selection import StratifiedKFold, cross_val_predict

compare = load_module(NOTEBOOKS / "09-communicate-results" / "compare.py")
TEMPLATES = sorted(p.name for p in compare.TEMPLATES.glob("*.md.j2"))
D = compare.Difference


def test_labels_mark_malignant_as_positive():
    X, y = compare.load_data()
    assert X.shape == (569, 30)
    assert int(y.sum()) == 212  # the table's documented count of malignant cases


def test_scores_above_zero_are_the_models_own_calls():
    X, y = compare.load_data()
    for model in (compare.production_model(), compare.candidate_model()):
        scores = compare.out_of_fold_scores(model, X, y, seeds=[3])
        called = cross_val_predict(model, X, y, cv=StratifiedKFold(5, shuffle=True, random_state=3))
        np.testing.assert_array_equal(scores[0] > 0, called == 1)


def test_out_of_fold_errors_are_deterministic_rates():
    X, y = compare.load_data()
    a = compare.errors_at(compare.out_of_fold_scores(compare.production_model(), X, y, seeds=[0, 1]), y)
    b = compare.errors_at(compare.out_of_fold_scores(compare.production_model(), X, y, seeds=[0, 1]), y)
    np.testing.assert_array_equal(a.miss, b.miss)
    assert a.accuracy.shape == (2,)
    assert np.all((a.miss >= 0) & (a.miss <= 1))
    assert np.all(a.miss[y == 0] == 0) and np.all(a.false_alarm[y == 1] == 0), "a miss needs a malignant case"


def test_resampled_training_sets_give_other_models_on_the_same_cases():
    X, y = compare.load_data()
    plain = compare.out_of_fold_scores(compare.production_model(), X, y, seeds=[0, 0])
    resampled = compare.out_of_fold_scores(compare.production_model(), X, y, seeds=[0, 1], resample_train=True)
    np.testing.assert_array_equal(plain[0], plain[1])  # same split, same training set: same scores
    assert not np.allclose(resampled[0], resampled[1]), "bootstrapped training sets gave identical models"


def test_matched_threshold_raises_exactly_the_requested_false_alarms():
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.4).astype(int)
    scores = rng.normal(size=(3, 300)) + 2 * y
    wanted = np.array([0, 7, 40])
    thresholds = compare.matched_thresholds(scores, y, wanted)
    raised = compare.per_case(scores, y, thresholds)["false_alarm"].sum(1)
    np.testing.assert_array_equal(raised, wanted)


def test_min_cost_threshold_matches_brute_force():
    rng = np.random.default_rng(1)
    y = (rng.random(200) < 0.3).astype(int)
    scores = rng.normal(size=(2, 200)) + 1.5 * y
    for cost_miss in (1, 5, 30):
        t = compare.min_cost_threshold(scores, y, cost_miss)
        def cost(threshold):
            e = compare.per_case(scores, y, threshold)
            return (e["false_alarm"] + cost_miss * e["miss"]).sum()
        brute = min(cost(c) for c in np.concatenate([scores.ravel() - 1e-9, [scores.max()]]))
        assert cost(t) == pytest.approx(brute), f"cost_miss={cost_miss}: {cost(t)} vs brute force {brute}"


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


def test_training_variance_adds_to_the_case_variance():
    rng = np.random.default_rng(2)
    cases = D(estimate=-3.0, low=-8.0, high=2.0, draws=rng.normal(-3.0, 2.5, 20000))
    retrained = rng.normal(-4.0, 3.5, 30)
    wide = compare.with_training_variance(cases, retrained, seed=0)
    assert wide.estimate == cases.estimate  # the estimate is today's; only the spread grows
    expected = np.sqrt(cases.se ** 2 + np.var(retrained, ddof=0))
    assert wide.se == pytest.approx(expected, rel=0.05), (wide.se, expected)
    with pytest.raises(ValueError, match="at least two"):
        compare.with_training_variance(cases, np.array([1.0]))


def test_power_analysis_hits_its_target_and_the_half_width_rule_is_a_coin_toss():
    d = D(estimate=-2.0, low=-7.0, high=3.0, draws=np.random.default_rng(3).normal(-2.0, 2.5, 5000))
    n80 = compare.cases_for_power(d, 569)
    assert 0.8 <= compare.power(d, 569, n80) < 0.801
    half_width_rule = int(np.ceil(569 * (1.959964 * d.se / 2.0) ** 2))
    assert compare.cases_for_power(d, 569, target=0.5) == half_width_rule
    assert compare.power(d, 569, half_width_rule) == pytest.approx(0.5, abs=0.002)
    assert n80 / half_width_rule == pytest.approx(((1.959964 + 0.841621) / 1.959964) ** 2, rel=1e-3)
    with pytest.raises(ValueError, match="exactly zero"):
        compare.cases_for_power(D(0.0, -1.0, 1.0, d.draws), 569)


def test_subgroups_partition_the_cases():
    X, y = compare.load_data()
    miss = (y == 1) * 0.1
    groups = compare.subgroups(X[:, 0], y, miss, np.zeros(len(y)))
    assert sum(g["cases"] for g in groups) == len(y)
    assert sum(g["malignant"] for g in groups) == int(y.sum())
    assert all(g["missed_of_malignant"] == pytest.approx(10.0) for g in groups if g["malignant"])


def _values(miss_shown: bool, fa_shown: bool, matched: float, cost_shown: bool) -> dict:
    """Distinctive made-up values: every number a template prints must be a rounding of one of them."""
    draws = np.array([1.0, 2.0, 3.5])
    groups = [dict(name=n, low=6.98 + i, high=11.71 + i, cases=190 - i, malignant=m, miss=10.47 + i,
                   false_alarm=3.17 + i, missed_of_malignant=12.61 + i)
              for i, (n, m) in enumerate([("small", 8), ("medium", 61), ("large", 143)])]
    return dict(
        prod_acc=97.98, cand_acc=97.45, prod_miss=13.89, cand_miss=11.61, prod_fa=6.33, cand_fa=13.87,
        prod_matched_miss=11.78, prod_matched_fa=13.87, prod_cost=180.3, cand_cost=175.9,
        n_cases=569, n_malignant=212, prevalence=37.26, folds=5, n_seeds=10, seeds=list(range(10)),
        n_boot=4000, n_retrain=30, level=95, cost_miss=20, power_now=8.2, power_target=80,
        miss=D(-2.28, -4.41 if miss_shown else -9.93, -0.62 if miss_shown else 6.14, draws),
        fa=D(7.56, 1.93 if fa_shown else -3.41, 18.04, draws),
        matched=D(matched, -10.55, 8.44, draws),
        cost=D(-4.39, -20.2 if cost_shown else -73.8, -1.3 if cost_shown else 69.1, draws),
        cases_80=16029, more_cases=15460, cases_ratio=28.17, title="SVM against LR", data_hash="3fa9c0d1e2b34455", chapter="09-communicate-results",
        data_source="Wisconsin data", prod_name="logistic regression", cand_name="RBF SVM",
        prod_description="Standardised features", prod_C=1.0, prod_acc_min=97.54, prod_acc_max=98.24,
        versions={"scikit-learn": "1.7.2", "numpy": "2.3.4"}, groups=groups, worst=groups[0],
        recommendation="Keep production.",
    )


VERDICTS = [(False, True, -0.42, False), (False, False, 0.18, False), (True, True, -3.1, True), (True, False, -0.42, False)]


@pytest.mark.parametrize("verdict", VERDICTS, ids=lambda v: "miss{}-fa{}-matched{}-cost{}".format(*v))
@pytest.mark.parametrize("template", TEMPLATES)
def test_every_number_in_a_rendered_document_comes_from_a_passed_value(template, verdict):
    values = _values(*verdict)
    text = compare.render(template, **values)
    assert compare.untraced_numbers(text, values) == [], text


def test_template_sources_type_no_numbers_but_the_structural_ones():
    """The literal text of a template, outside {{ }} and {% %}, may contain only STRUCTURAL_NUMBERS."""
    for name in TEMPLATES:
        literal = re.sub(r"\{\{.*?\}\}|\{%.*?%\}", " ", (compare.TEMPLATES / name).read_text(), flags=re.S)
        typed = set(compare.NUMBER.findall(literal)) - compare.STRUCTURAL_NUMBERS
        assert not typed, f"{name} types {sorted(typed)}"


def test_untraced_numbers_catches_typed_numbers_and_accepts_roundings():
    values = {"more_cases": 1886, "miss": D(-2.28, -7.38, 2.11, np.array([0.0, 1.0])), "label": "v1.7.2"}
    assert compare.untraced_numbers("Label 1,500 more cases.", values) == ["1,500"]
    assert compare.untraced_numbers("Label 1,886 more cases, per 1,000: -2.3 [-7.4, +2.1], v1.7.2.", values) == []
    assert compare.untraced_numbers("about 2 fewer", values) == []  # 2.28 rounds to 2
    assert compare.untraced_numbers("about 3 fewer", values) == ["3"]
    # a sentence passed as a value is not a licence: its numbers must trace too
    assert compare.untraced_numbers("Keep production for 6 weeks.", {"note": "Keep production for 6 weeks."}) == ["6"]


def test_templates_render_every_value_and_refuse_missing_ones():
    values = _values(False, True, -0.42, False)
    text = compare.render("manager.md.j2", **values)
    assert "do not ship" in text.lower() and "16,029" in text and "between 2 and 18" in text
    assert "priority read" in text  # the same cost the model card names
    with pytest.raises(ValueError, match="cases_80"):
        compare.render("manager.md.j2", **{k: v for k, v in values.items() if k != "cases_80"})


def test_model_card_and_manager_agree_on_what_a_false_alarm_costs():
    values = _values(False, True, -0.42, False)
    card = compare.render("model_card.md.j2", **values)
    manager = compare.render("manager.md.j2", **values)
    assert "A pathologist still reads every sample" in card and "unnecessary priority read" in card
    assert "unnecessary\n  priority read" in manager or "unnecessary priority read" in manager
    assert "| small (7.0–11.7) | 190 | 8 | 10.5 | 3.2 | 12.6 |" in card  # the subgroup table is filled


def test_the_memo_fits_on_one_page_in_every_verdict():
    for verdict in VERDICTS:
        memo = compare.render("memo.md.j2", **_values(*verdict))
        assert len(memo.split()) <= 450, f"{len(memo.split())} words for {verdict}"
