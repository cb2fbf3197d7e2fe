"""Exploration, leakage and speed helpers for chapter 01 (bootstrap intervals, models, row rules).

A module rather than cells because the functions are longer than a readable cell, the chapter
shows them with ``literalinclude``, and ``tests/test_01_analyze_data.py`` checks them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.compose import make_column_transformer
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import (KFold, LeaveOneGroupOut, RepeatedStratifiedKFold, StratifiedGroupKFold,
                                     StratifiedKFold, cross_val_score)
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler, TargetEncoder

BODY = ["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g"]

# ---------------------------------------------------------------- intervals


def bootstrap_mean(values, rng: np.random.Generator, n_boot: int = 2000, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and percentile bootstrap interval of a 1-D sample: (mean, low, high)."""
    x = np.asarray(values, dtype=float)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(x.mean()), float(low), float(high)


def bootstrap_corr(x, y, rng: np.random.Generator, n_boot: int = 2000, level: float = 0.95) -> tuple[float, float, float]:
    """Pearson r and a percentile bootstrap interval, resampling (x, y) pairs together."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    xs, ys = x[idx], y[idx]
    xs = xs - xs.mean(axis=1, keepdims=True)
    ys = ys - ys.mean(axis=1, keepdims=True)
    r = (xs * ys).sum(axis=1) / np.sqrt((xs**2).sum(axis=1) * (ys**2).sum(axis=1))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(r, [tail, 100 - tail])
    return float(np.corrcoef(x, y)[0, 1]), float(low), float(high)


def group_means(df: pd.DataFrame, value: str, by: list[str], rng: np.random.Generator) -> pd.DataFrame:
    """Mean of ``value`` per group with its bootstrap interval and the group size."""
    rows = []
    for key, group in df.dropna(subset=[value, *by]).groupby(by, sort=True):
        mean, low, high = bootstrap_mean(group[value], rng)
        rows.append((*key, len(group), mean, low, high))
    return pd.DataFrame(rows, columns=[*by, "n", "mean", "low", "high"])


# ---------------------------------------------------------------- leakage


def cv_splits(seed: int) -> RepeatedStratifiedKFold:
    """The same 5 x 5 folds for every model compared, so scores are paired split by split."""
    return RepeatedStratifiedKFold(n_splits=5, n_repeats=5, random_state=seed)


def clutch_model(use_comments: bool):
    """Logistic regression for 'nest did not complete its clutch'; optionally reads the free text."""
    parts = [(StandardScaler(), BODY), (OneHotEncoder(), ["species", "island"])]
    if use_comments:
        parts.append((CountVectorizer(), "comments_text"))  # bag of words, the usual first try
    return make_pipeline(make_column_transformer(*parts), LogisticRegression(max_iter=1000))


def naive_target_encoding(df: pd.DataFrame, key: str, target: pd.Series) -> pd.Series:
    """Mean target per value of ``key``, computed on the WHOLE table: the leak, kept for the demo."""
    return target.groupby(df[key]).transform("mean")


def sex_model(encode: str, seed: int):
    """Logistic regression for sex from body size and species.

    ``encode``: "none" (no bird key); "precomputed" (reads a column encoded before the
    split: the leak); "pipeline" (TargetEncoder, fitted on each training fold only).
    """
    parts = [(StandardScaler(), BODY), (OneHotEncoder(), ["species"])]
    if encode == "precomputed":
        parts.append((StandardScaler(), ["bird_key_encoded"]))
    elif encode == "pipeline":
        inner = KFold(n_splits=5, shuffle=True, random_state=seed)
        parts.append((TargetEncoder(cv=inner), ["bird_key"]))
    elif encode != "none":
        raise ValueError(f"encode must be none, precomputed or pipeline: {encode!r}")
    return make_pipeline(make_column_transformer(*parts),
                         LogisticRegression(max_iter=1000))


def paired_scores(models: dict, X: pd.DataFrame, y: pd.Series, scoring: str, seed: int) -> pd.DataFrame:
    """Score every model on the same folds: one column per model, one row per fold."""
    folds = cv_splits(seed)
    return pd.DataFrame({name: cross_val_score(m, X, y, cv=folds, scoring=scoring) for name, m in models.items()})


def single_feature_auc(features: pd.DataFrame, target: pd.Series) -> pd.Series:
    """ROC AUC of each feature used alone, folded so 0.5 is useless and 1.0 a perfect predictor."""
    from sklearn.metrics import roc_auc_score

    auc = {c: roc_auc_score(target, features[c].astype(float)) for c in features.columns}
    return pd.Series({c: max(a, 1 - a) for c, a in auc.items()}).sort_values(ascending=False)


# ---------------------------------------------------------------- splits


def row_and_group_scores(model, X: pd.DataFrame, y: pd.Series, groups: pd.Series, seed: int,
                         repeats: int = 5) -> pd.DataFrame:
    """Mean 5-fold score of one model under a row split and a group split, ``repeats`` times.

    Row folds (``StratifiedKFold``) may put rows sharing a group on both sides; group folds
    (``StratifiedGroupKFold``) never do. Repeat ``r`` uses ``random_state=seed + r`` for both,
    so each row of the result is one pair of splits.
    """
    rows = []
    for r in range(repeats):
        row = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed + r)
        grp = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed + r)
        rows.append({"row split": cross_val_score(model, X, y, cv=row).mean(),
                     "group split": cross_val_score(model, X, y, cv=grp, groups=groups).mean()})
    return pd.DataFrame(rows)


def keys_on_both_sides(splitter, X: pd.DataFrame, y: pd.Series, groups: pd.Series) -> int:
    """How many (fold, group) pairs have rows in both the training and the validation part."""
    import warnings

    shared = 0
    with warnings.catch_warnings():  # row splitters accept groups and say they ignore them
        warnings.filterwarnings("ignore", "The groups parameter is ignored")
        for train, val in splitter.split(X, y, groups):
            shared += len(set(groups.iloc[train]) & set(groups.iloc[val]))
    return shared


def season_scores(model, X: pd.DataFrame, y: pd.Series, season: pd.Series) -> pd.Series:
    """Accuracy on each season when the model is trained on the other seasons only."""
    folds = LeaveOneGroupOut()
    held = [season.iloc[val].iloc[0] for _, val in folds.split(X, y, season)]
    scores = cross_val_score(model, X, y, cv=folds, groups=season)
    return pd.Series(scores, index=pd.Index(held, name="held-out season"), name="accuracy")


def season_drift(df: pd.DataFrame, value: str, first, last, rng: np.random.Generator,
                 n_boot: int = 2000) -> pd.DataFrame:
    """Per species: mean of ``value`` in season ``last`` minus ``first``, with a bootstrap interval."""
    rows = []
    for species, group in df.dropna(subset=[value]).groupby("species"):
        a = group.loc[group["year"] == first, value].to_numpy()
        b = group.loc[group["year"] == last, value].to_numpy()
        diff = rng.choice(b, (n_boot, b.size)).mean(axis=1) - rng.choice(a, (n_boot, a.size)).mean(axis=1)
        low, high = np.percentile(diff, [2.5, 97.5])
        rows.append((species, a.size, b.size, float(b.mean() - a.mean()), float(low), float(high)))
    return pd.DataFrame(rows, columns=["species", f"n {first}", f"n {last}", "shift", "low", "high"])


# ---------------------------------------------------------------- speed


def mass_limits(clean: pd.DataFrame, low: float = 0.01, high: float = 0.99) -> dict[str, tuple[float, float]]:
    """Per-species plausible body mass: the 1st and 99th percentiles of the clean table."""
    q = clean.groupby("species")["body_mass_g"].quantile([low, high]).unstack()
    return {species: (float(r[low]), float(r[high])) for species, r in q.iterrows()}


def plausible_rowwise(df: pd.DataFrame, limits: dict) -> pd.Series:
    """The rule written one row at a time, the way it is usually first written."""
    def rule(row):
        lo, hi = limits[row["species"]]
        return lo <= row["body_mass_g"] <= hi

    return df.apply(rule, axis=1)


def plausible_vectorized(df: pd.DataFrame, limits: dict) -> pd.Series:
    """The same rule on whole columns: a code per row, a bound per species, one compare."""
    codes, species = pd.factorize(df["species"])
    if (codes < 0).any():
        raise ValueError("species is missing in some rows; the rule needs it")
    low = np.array([limits[s][0] for s in species])[codes]
    high = np.array([limits[s][1] for s in species])[codes]
    mass = df["body_mass_g"].to_numpy()
    return pd.Series((low <= mass) & (mass <= high), index=df.index)
