"""The data end of the pipeline under test: load the penguin table, split it, check it.

Part of the small pipeline that chapter 04 (Test ML code) tests. The table ships inside the
``palmerpenguins`` package, so nothing is downloaded. ``SCHEMA`` says what a valid table looks like
(pandera names the rows that break it); ``drift_report`` compares a batch with reference data, one
two-sample Kolmogorov-Smirnov test per numeric column.
"""

from __future__ import annotations

import pandas as pd
import pandera.pandas as pa
from scipy.stats import ks_2samp

NUMERIC = ["bill_length_mm", "bill_depth_mm", "flipper_length_mm"]
# The known values of each categorical column: the schema checks them and the encoder uses them, so
# the two cannot disagree, and the encoded width never depends on which values a batch happens to hold.
CATEGORIES = {
    "species": ["Adelie", "Chinstrap", "Gentoo"],
    "island": ["Biscoe", "Dream", "Torgersen"],
    "sex": ["female", "male"],
}
TARGET = "body_mass_g"


def load_table() -> pd.DataFrame:
    """The penguin table, keeping the original row numbers, without the rows that lack the target."""
    from palmerpenguins import load_penguins

    raw = load_penguins()
    table = raw.dropna(subset=[TARGET])
    return table


def split(table: pd.DataFrame, test_fraction: float = 0.2, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Random train/test split; the table is sorted by species, so the shuffle is not optional."""
    shuffled = table.sample(frac=1.0, random_state=seed)
    n_test = round(len(table) * test_fraction)
    return shuffled.iloc[n_test:], shuffled.iloc[:n_test]


# Physical bounds with a margin around what the field study measured, not the observed min and max:
# a schema that only admits the training data rejects the first healthy new batch.
SCHEMA = pa.DataFrameSchema(
    {
        "species": pa.Column(str, pa.Check.isin(CATEGORIES["species"])),
        "island": pa.Column(str, pa.Check.isin(CATEGORIES["island"])),
        "bill_length_mm": pa.Column(float, pa.Check.in_range(25, 70), nullable=True),
        "bill_depth_mm": pa.Column(float, pa.Check.in_range(10, 25), nullable=True),
        "flipper_length_mm": pa.Column(float, pa.Check.in_range(150, 250), nullable=True),
        "sex": pa.Column(str, pa.Check.isin(CATEGORIES["sex"]), nullable=True),
        TARGET: pa.Column(float, pa.Check.in_range(2000, 7000)),
    },
    strict=False,  # extra columns such as `year` are allowed; the model ignores them
)


def schema_violations(table: pd.DataFrame) -> pd.DataFrame:
    """Every cell that breaks ``SCHEMA``: row label, column, check and value. Empty when the table is valid."""
    try:
        SCHEMA.validate(table, lazy=True)
    except pa.errors.SchemaErrors as errors:
        cases = errors.failure_cases.rename(columns={"index": "row", "failure_case": "value"})
        return cases[["row", "column", "check", "value"]].reset_index(drop=True)
    return pd.DataFrame(columns=["row", "column", "check", "value"])


def drift_report(reference: pd.DataFrame, batch: pd.DataFrame, alpha: float = 0.001) -> pd.DataFrame:
    """One row per numeric column: KS statistic, p-value, and whether the batch looks shifted."""
    rows = []
    for column in [*NUMERIC, TARGET]:
        result = ks_2samp(reference[column].dropna(), batch[column].dropna())
        rows.append({"column": column, "ks": float(result.statistic), "p_value": float(result.pvalue)})
    report = pd.DataFrame(rows).set_index("column")
    report["shifted"] = report["p_value"] < alpha
    return report
