"""Tests of the data: the table keeps its schema, and the test split looks like the training split.

A data test protects the model from its inputs. The schema catches values that cannot be right
(a flipper of 0 mm); the drift check catches a batch whose values are each plausible but whose
distribution is not the one the model was trained on.
"""

from __future__ import annotations

import pandas as pd
import pytest
from testml_data import drift_report, load_table, schema_violations, split


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return load_table()


def test_table_matches_the_schema(table):
    bad = schema_violations(table)
    assert bad.empty, f"{bad['row'].nunique()} row(s) break the schema:\n{bad.to_string()}"


def test_schema_names_the_rows_that_break_it(table):
    broken = table.copy()
    broken.loc[broken.index[5], "flipper_length_mm"] = 0.0  # a missing value written as 0
    broken.loc[broken.index[7], "sex"] = "M"  # a new code from a new field team
    assert set(schema_violations(broken)["row"]) == {broken.index[5], broken.index[7]}


def test_split_is_disjoint_and_complete(table):
    train, test = split(table)
    assert train.index.intersection(test.index).empty
    assert len(train) + len(test) == len(table)


def test_test_split_looks_like_the_training_split(table):
    train, test = split(table)
    report = drift_report(train, test)
    assert not report["shifted"].any(), f"the test split is shifted:\n{report}"


def test_drift_check_flags_a_shifted_batch(table):
    train, test = split(table)
    recalibrated = test.assign(flipper_length_mm=test["flipper_length_mm"] + 10)  # every value plausible
    report = drift_report(train, recalibrated)
    assert report.index[report["shifted"]].tolist() == ["flipper_length_mm"], report
