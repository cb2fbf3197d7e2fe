"""The experiment chapter 09 communicates: the production model against a candidate, with intervals.

A module, not cells, because the tests import the same functions the chapter runs, and because the
report and the model card are filled from what these functions return, never from typed numbers.

Data: the Wisconsin diagnostic breast cancer table that ships with scikit-learn (569 fine-needle
aspirates of breast masses, 30 numeric features, 212 malignant). The positive class is malignant.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jinja2 import Environment, FileSystemLoader, StrictUndefined, meta
from sklearn.base import clone
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

TEMPLATES = Path(__file__).parent / "templates"


def load_data() -> tuple[np.ndarray, np.ndarray]:
    """Features and labels with 1 = malignant (scikit-learn codes malignant as 0)."""
    X, y = load_breast_cancer(return_X_y=True)
    return X, (1 - y).astype(int)


def production_model() -> Pipeline:
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))


def candidate_model() -> Pipeline:
    """An RBF support vector machine that weights the rarer malignant class up."""
    return make_pipeline(StandardScaler(), SVC(class_weight="balanced"))


@dataclass(frozen=True)
class Errors:
    """Per-case error rates averaged over repeated cross-validation, and accuracy per repeat."""

    miss: np.ndarray  # per case: fraction of repeats where a malignant case was called benign
    false_alarm: np.ndarray  # per case: fraction of repeats where a benign case was called malignant
    accuracy: np.ndarray  # one value per repeat


def out_of_fold_errors(model, X: np.ndarray, y: np.ndarray, seeds=range(10), folds: int = 5) -> Errors:
    """Every case is predicted by a model that never saw it, once per seed (a different fold split)."""
    miss, false_alarm, accuracy = np.zeros(len(y)), np.zeros(len(y)), []
    for seed in seeds:
        cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
        pred = cross_val_predict(clone(model), X, y, cv=cv)
        miss += (pred == 0) & (y == 1)
        false_alarm += (pred == 1) & (y == 0)
        accuracy.append(float((pred == y).mean()))
    n = len(list(seeds))
    return Errors(miss / n, false_alarm / n, np.array(accuracy))


@dataclass(frozen=True)
class Difference:
    """Candidate minus production, per 1,000 cases, with a paired bootstrap interval."""

    estimate: float
    low: float
    high: float
    draws: np.ndarray

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_bootstrap(candidate: np.ndarray, production: np.ndarray, *, n_boot: int = 4000,
                     seed: int = 0, per: int = 1000, level: float = 0.95) -> Difference:
    """Resample cases with replacement, keeping each case's pair of outcomes together.

    Pairing matters: both models saw the same cases, so most of the case-to-case variation cancels
    in the difference. Resampling the two models independently would give a far wider interval.
    """
    if candidate.shape != production.shape:
        raise ValueError("paired bootstrap needs the same cases for both models")
    diff = (candidate - production) * per
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n_boot, len(diff)))
    draws = diff[idx].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Difference(float(diff.mean()), float(low), float(high), draws)


def cases_needed(difference: Difference, n_cases: int) -> int:
    """Cases needed before an interval of today's relative width would exclude zero for this estimate.

    The width of a mean's interval shrinks with the square root of the sample size. A planning
    estimate that assumes the true difference is what we measured, nothing more.
    """
    half_width = (difference.high - difference.low) / 2
    if difference.estimate == 0:
        raise ValueError("a difference of exactly zero never excludes zero")
    return int(np.ceil(n_cases * (half_width / abs(difference.estimate)) ** 2))


def render(template: str, **values) -> str:
    """Fill a Markdown template from computed values; a missing value is an error, not a blank."""
    env = Environment(loader=FileSystemLoader(TEMPLATES), undefined=StrictUndefined,
                      keep_trailing_newline=True, autoescape=False)
    source = env.loader.get_source(env, template)[0]
    missing = meta.find_undeclared_variables(env.parse(source)) - values.keys()
    if missing:
        raise ValueError(f"{template} needs values that were not given: {', '.join(sorted(missing))}")
    return env.get_template(template).render(**values)
