"""The experiment chapter 09 communicates: the production model against a candidate, with intervals.

A module, not cells, because the tests import the same functions the chapter runs, and because the
messages, the report, the model card and the decision memo are filled from what these functions
return, never from typed numbers (``untraced_numbers`` checks that).

Data: the Wisconsin diagnostic breast cancer table that ships with scikit-learn (569 fine-needle
aspirates of breast masses, 30 numeric features, 212 malignant). The positive class is malignant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from numbers import Number
from pathlib import Path
from statistics import NormalDist

import numpy as np
from jinja2 import Environment, FileSystemLoader, StrictUndefined, meta
from sklearn.base import clone
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_curve
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

TEMPLATES = Path(__file__).parent / "templates"
PER = 1000  # every rate in the chapter is per 1,000 cases


def load_data() -> tuple[np.ndarray, np.ndarray]:
    """Features and labels with 1 = malignant (scikit-learn codes malignant as 0)."""
    X, y = load_breast_cancer(return_X_y=True)
    return X, (1 - y).astype(int)


def production_model() -> Pipeline:
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))


def candidate_model() -> Pipeline:
    """An RBF support vector machine that weights the rarer malignant class up."""
    return make_pipeline(StandardScaler(), SVC(class_weight="balanced"))


def out_of_fold_scores(model, X: np.ndarray, y: np.ndarray, seeds, folds: int = 5,
                       resample_train: bool = False) -> np.ndarray:
    """Decision scores, one row per seed: every case is scored by a model that never saw it.

    Each seed is a different fold split. A score above 0 is the model's default call "malignant"
    (``predict`` does exactly that for both models). With ``resample_train`` each training fold is
    replaced by a bootstrap sample of itself, so the rows also differ by which training set the
    model happened to get: the spread between rows is then training variance.
    """
    scores = np.zeros((len(seeds), len(y)))
    for row, seed in enumerate(seeds):
        rng = np.random.default_rng(seed)
        for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y):
            if resample_train:
                train = rng.choice(train, size=len(train), replace=True)
            scores[row, test] = clone(model).fit(X[train], y[train]).decision_function(X[test])
    return scores


@dataclass(frozen=True)
class Errors:
    """Per-case error rates averaged over repeats, and accuracy per repeat."""

    miss: np.ndarray  # per case: fraction of repeats where a malignant case was called benign
    false_alarm: np.ndarray  # per case: fraction of repeats where a benign case was called malignant
    accuracy: np.ndarray  # one value per repeat


def errors_at(scores: np.ndarray, y: np.ndarray, thresholds=0.0) -> Errors:
    """Errors when a case is called malignant above ``thresholds`` (one per repeat, or one for all)."""
    called = scores > np.reshape(thresholds, (-1, 1))
    miss, false_alarm = ~called & (y == 1), called & (y == 0)
    return Errors(miss.mean(0), false_alarm.mean(0), (called == (y == 1)).mean(1))


def matched_thresholds(scores: np.ndarray, y: np.ndarray, false_alarms: np.ndarray) -> np.ndarray:
    """Per repeat, the threshold at which this model raises ``false_alarms[r]`` false alarms."""
    out = np.empty(len(scores))
    for r, (row, allowed) in enumerate(zip(scores, false_alarms)):
        benign = np.sort(row[y == 0])[::-1]
        out[r] = benign[min(int(allowed), len(benign) - 1)]  # called malignant only above it
    return out


def min_cost_threshold(scores: np.ndarray, y: np.ndarray, cost_miss: float) -> float:
    """The threshold that minimises false alarms + ``cost_miss`` x misses, over all repeats pooled."""
    pooled_y = np.tile(y, len(scores))
    fpr, tpr, thr = roc_curve(pooled_y, scores.ravel(), drop_intermediate=False)
    cost = fpr * (pooled_y == 0).sum() + cost_miss * (1 - tpr) * (pooled_y == 1).sum()
    best = int(np.argmin(cost[1:])) + 1  # thr[0] is +inf: "call nothing malignant"
    return float(np.nextafter(thr[best], -np.inf))  # roc_curve counts >= thr; errors_at counts >


def per_case(scores: np.ndarray, y: np.ndarray, thresholds) -> dict[str, np.ndarray]:
    """Per repeat and case (repeats x cases): 1.0 where the case is a miss, or a false alarm."""
    called = scores > np.reshape(thresholds, (-1, 1))
    return {"miss": (~called & (y == 1)).astype(float), "false_alarm": (called & (y == 0)).astype(float)}


def cost_per_case(scores: np.ndarray, y: np.ndarray, cost_miss: float) -> tuple[float, np.ndarray]:
    """The minimum-cost threshold and, per repeat and case, the cost at it (a false alarm costs 1)."""
    threshold = min_cost_threshold(scores, y, cost_miss)
    e = per_case(scores, y, threshold)
    return threshold, e["false_alarm"] + cost_miss * e["miss"]


def comparison(prod: np.ndarray, cand: np.ndarray, y: np.ndarray, cost_miss: float) -> dict[str, np.ndarray]:
    """Candidate minus production, per repeat and case, for every difference the chapter reports.

    ``miss`` and ``false_alarm`` at each model's default threshold; ``matched_miss`` with
    production's threshold moved, repeat by repeat, to raise as many false alarms as the candidate;
    ``cost`` with each model at its own minimum-cost threshold (a miss costs ``cost_miss`` false alarms).
    """
    p, c = per_case(prod, y, 0.0), per_case(cand, y, 0.0)
    matched = per_case(prod, y, matched_thresholds(prod, y, c["false_alarm"].sum(1)))
    cost = cost_per_case(cand, y, cost_miss)[1] - cost_per_case(prod, y, cost_miss)[1]
    return {"miss": c["miss"] - p["miss"], "false_alarm": c["false_alarm"] - p["false_alarm"],
            "matched_miss": c["miss"] - matched["miss"], "cost": cost}


@dataclass(frozen=True)
class Difference:
    """Candidate minus production, per 1,000 cases, with a bootstrap interval."""

    estimate: float
    low: float
    high: float
    draws: np.ndarray

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    @property
    def se(self) -> float:
        """Standard error: the spread of the bootstrap draws."""
        return float(np.std(self.draws, ddof=1))


def _interval(estimate: float, draws: np.ndarray, level: float) -> Difference:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Difference(float(estimate), float(low), float(high), draws)


def paired_bootstrap(candidate: np.ndarray, production: np.ndarray, *, n_boot: int = 4000,
                     seed: int = 0, per: int = PER, level: float = 0.95) -> Difference:
    """Resample cases with replacement, keeping each case's pair of outcomes together.

    Pairing matters: both models saw the same cases, so most of the case-to-case variation cancels
    in the difference. Resampling the two models independently would give a far wider interval.
    """
    if candidate.shape != production.shape:
        raise ValueError("paired bootstrap needs the same cases for both models")
    diff = (candidate - production) * per
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n_boot, len(diff)))
    return _interval(diff.mean(), diff[idx].mean(axis=1), level)


def with_training_variance(cases: Difference, retrained: np.ndarray, *, seed: int = 0,
                           level: float = 0.95) -> Difference:
    """Widen a case-bootstrap interval by the spread between models trained on other training sets.

    ``retrained`` holds one difference per retraining (per 1,000 cases, the same cases each time),
    so its spread is training variance alone. Each bootstrap draw gets one retraining's deviation
    from their mean: the interval is for one trained pair of models, the pair you would deploy.
    """
    if len(retrained) < 2:
        raise ValueError("training variance needs at least two retrained differences")
    rng = np.random.default_rng(seed)
    deviation = rng.choice(retrained - retrained.mean(), size=len(cases.draws))
    return _interval(cases.estimate, cases.draws + deviation, level)


def power(difference: Difference, n_cases: int, n: int, alpha: float = 0.05) -> float:
    """Chance that an interval from ``n`` cases excludes zero, if the true difference is today's estimate.

    The standard error shrinks with the square root of the number of cases (training variance
    included: more labelled cases are also more training data). A planning estimate, not a promise.
    """
    z, se = NormalDist().inv_cdf(1 - alpha / 2), difference.se * np.sqrt(n_cases / n)
    shift = abs(difference.estimate) / se
    return float(NormalDist().cdf(shift - z) + NormalDist().cdf(-shift - z))


def cases_for_power(difference: Difference, n_cases: int, target: float = 0.8, alpha: float = 0.05) -> int:
    """Cases needed for ``target`` power at level ``alpha``: n = n0 ((z_(1-alpha/2) + z_target) se / |d|)^2.

    Setting the interval's half-width equal to the estimate, a common rule of thumb, is this formula
    with z_target = 0: 50% power, a coin toss.
    """
    if difference.estimate == 0:
        raise ValueError("a difference of exactly zero has no sample size: no n makes it detectable")
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(target)
    return int(np.ceil(n_cases * (z * difference.se / abs(difference.estimate)) ** 2))


def subgroups(feature: np.ndarray, y: np.ndarray, miss: np.ndarray, false_alarm: np.ndarray,
              names=("small", "medium", "large")) -> list[dict]:
    """Error rates within equal-sized groups of one feature (terciles for three names)."""
    edges = np.quantile(feature, np.linspace(0, 1, len(names) + 1))
    group = np.clip(np.searchsorted(edges, feature, side="right") - 1, 0, len(names) - 1)
    rows = []
    for g, name in enumerate(names):
        inside = group == g
        malignant = int(y[inside].sum())
        rows.append(dict(name=name, low=float(edges[g]), high=float(edges[g + 1]), cases=int(inside.sum()),
                         malignant=malignant, miss=float(miss[inside].mean() * PER),
                         false_alarm=float(false_alarm[inside].mean() * PER),
                         missed_of_malignant=float(miss[inside].sum() / malignant * 100) if malignant else 0.0))
    return rows


def render(template: str, **values) -> str:
    """Fill a Markdown template from computed values; a missing value is an error, not a blank."""
    env = Environment(loader=FileSystemLoader(TEMPLATES), undefined=StrictUndefined,
                      keep_trailing_newline=True, autoescape=False)
    source = env.loader.get_source(env, template)[0]
    missing = meta.find_undeclared_variables(env.parse(source)) - values.keys()
    if missing:
        raise ValueError(f"{template} needs values that were not given: {', '.join(sorted(missing))}")
    return env.get_template(template).render(**values)


#: Numbers a rendered document may contain that no computation produced: the unit every rate is
#: quoted in ("per 1,000 cases"). Everything else must come from a value passed to ``render``.
STRUCTURAL_NUMBERS = frozenset({"1,000"})
NUMBER = re.compile(r"(?<![\w.,])\d+(?:,\d{3})*(?:\.\d+)?(?![\w])")


def _leaves(value):
    """Every number and string inside a value: dicts, lists, tuples and dataclass fields included."""
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)
    elif isinstance(value, (str, Number)) and not isinstance(value, bool):
        yield value
    elif hasattr(value, "__dataclass_fields__"):
        for name in value.__dataclass_fields__:
            if name != "draws":
                yield from _leaves(getattr(value, name))
        for name in ("se",):
            if hasattr(value, name):
                yield getattr(value, name)


def untraced_numbers(text: str, values: dict, structural=STRUCTURAL_NUMBERS) -> list[str]:
    """Number tokens in ``text`` that are neither a rounding of a passed value nor structural.

    A token with d decimals is traced if some passed number rounds to it at d decimals (signs and
    thousands separators ignored). Passed strings (a data hash, version numbers, names) are taken
    out of the text first when they contain no whitespace, so the digits inside them are not mistaken
    for typed numbers; a passed sentence is not exempt, its numbers must trace like any others.
    """
    numbers, strings = [], []
    for leaf in _leaves(values):
        (strings if isinstance(leaf, str) else numbers).append(leaf)
    for s in sorted(strings, key=len, reverse=True):
        if s and not any(ch.isspace() for ch in s):  # identifiers only: a sentence's numbers must trace
            text = text.replace(s, " ")
    untraced = []
    for token in NUMBER.findall(text):
        if token in structural:
            continue
        plain = token.replace(",", "")
        decimals = len(plain.split(".")[1]) if "." in plain else 0
        if not any(abs(round(abs(float(v)), decimals) - float(plain)) < 10 ** -(decimals + 3) for v in numbers):
            untraced.append(token)
    return untraced
