"""The contract for the clean penguins table, written as a pandera schema (chapter 01).

A file, not a cell, so the chapter, ``prepare_data.py`` and ``tests/test_01_analyze_data.py`` check
the same rules. It does not import ``cleaning.py`` on purpose: the contract is written down apart
from the code it checks, so a bug in the cleaning code cannot quietly change the rules too.

Every check carries a human name (``error=``); ``failure_report`` turns pandera's failure cases into
one line per bad row and broken rule. ``plant_bad_rows`` makes the bad rows the chapter and the
tests feed it: one kind of defect per row, each with the rule that must catch it.
"""

from __future__ import annotations

import pandas as pd
import pandera.pandas as pa

SPECIES = ["Adelie", "Chinstrap", "Gentoo"]
ISLANDS = ["Biscoe", "Dream", "Torgersen"]
STUDIES = ["PAL0708", "PAL0809", "PAL0910"]


ID_RULE = "individual_id looks like N12A1"


def _in_range(low: float, high: float, what: str) -> pa.Check:
    return pa.Check.in_range(low, high, error=f"{what} in [{low:g}, {high:g}]")


def _one_of(values: list[str], rule: str) -> pa.Check:
    return pa.Check.isin(values, error=rule)


def _in_season(df: pd.DataFrame) -> pd.Series:
    """The egg date's year is the first year of its study's season (PAL0708 -> 2007)."""
    start = 2000 + pd.to_numeric(df["study_name"].str.slice(3, 5), errors="coerce")
    return df["date_egg"].dt.year == start


SEASON_RULE = "egg date lies in its study's season"


def build_schema(extra_rules: dict | None = None) -> pa.DataFrameSchema:
    """The contract for the clean table.

    ``extra_rules`` adds table-wide rules as ``{name: (frame -> bool Series, columns)}``;
    the failure report quotes those ``columns`` (a table-wide check names them all).
    """
    rules = {SEASON_RULE: (_in_season, ("study_name", "date_egg")), **(extra_rules or {})}
    col, check = pa.Column, pa.Check
    return pa.DataFrameSchema(
        {
            "raw_line": col(int, check.ge(2, error="raw_line is a CSV data line"), unique=True),
            "study_name": col(str, _one_of(STUDIES, "study_name is a known study")),
            "sample_number": col(int, check.ge(1, error="sample_number >= 1")),
            "species": col(str, _one_of(SPECIES, "species is one of the three short names")),
            "island": col(str, _one_of(ISLANDS, "island is a sampled island")),
            "individual_id": col(str, check.str_matches(r"^N\d+A[12]$", error=ID_RULE)),
            "clutch_completion": col(bool),
            "date_egg": col("datetime64[us]"),
            "year": col(int, _in_range(2007, 2009, "year")),
            "bill_length_mm": col(float, _in_range(25, 70, "bill length in mm")),
            "bill_depth_mm": col(float, _in_range(10, 25, "bill depth in mm")),
            "flipper_length_mm": col(float, _in_range(150, 250, "flipper length in mm")),
            "body_mass_g": col(float, _in_range(2000, 7000, "body mass in grams")),
            "sex": col(str, _one_of(["female", "male"], "sex is female or male"),
                       nullable=True),
            "delta_15n_permil": col(float, _in_range(5, 12, "delta 15N in per mil"),
                                    nullable=True),
            "delta_13c_permil": col(float, _in_range(-30, -20, "delta 13C in per mil"),
                                    nullable=True),
            "outlier_flag": col(bool),
            "comments": col(str, nullable=True),
        },
        checks=[check(fn, error=name) for name, (fn, _) in rules.items()],
        unique=["study_name", "species", "sample_number"],
        report_duplicates="exclude_first",  # the first copy is the good one
        strict=True,  # no extra columns
        ordered=True,  # in this order
        name="penguins_clean",
        metadata={"rule_columns": {name: cols for name, (_, cols) in rules.items()}},
    )


SCHEMA = build_schema()


def failure_report(error: pa.errors.SchemaErrors, schema: pa.DataFrameSchema = SCHEMA) -> pd.DataFrame:
    """One row per (bad row, broken rule): the row's index, the rule, and the values that broke it."""
    cases = error.failure_cases.copy()
    cases["rule"] = cases["check"].astype(str).replace({
        "not_nullable": "value is required (not nullable)",
        "field_uniqueness": "value is unique",
        "multiple_fields_uniqueness": "key (study_name, species, sample_number) is unique",
    })
    table_level = cases["index"].isna()
    if table_level.any():  # a wrong dtype or a missing column: no single row to blame
        lines = cases[table_level][["column", "check"]].astype(str).agg(": ".join, axis=1)
        raise ValueError(f"table-level schema failures, fix these first: {sorted(set(lines))}")
    cases["row"] = cases["index"].astype(int)
    value = cases["failure_case"].map(lambda v: "missing" if pd.isna(v) else str(v).removesuffix(" 00:00:00"))
    cases["found"] = cases["column"].astype(str) + "=" + value
    quoted = schema.metadata["rule_columns"]
    keep = [col in quoted.get(rule, (col,)) for col, rule in zip(cases["column"], cases["check"])]
    report = cases[keep].sort_values(["row", "rule", "found"])
    return report.groupby(["row", "rule"], sort=True)["found"].agg(", ".join).reset_index()


def validate(df: pd.DataFrame, schema: pa.DataFrameSchema = SCHEMA) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split ``df`` into rows that pass every rule and the failure report for the rest."""
    try:
        schema.validate(df, lazy=True)
    except pa.errors.SchemaErrors as error:
        report = failure_report(error, schema)
        return df.drop(index=report["row"].unique()), report
    return df, pd.DataFrame(columns=["row", "rule", "found"])


def _mass_in_kg(row):
    return row.assign(body_mass_g=row["body_mass_g"] / 1000)


def _raw_species_name(row):
    return row.assign(species="Adelie Penguin (Pygoscelis adeliae)")


def _negative_bill(row):
    return row.assign(bill_length_mm=-row["bill_length_mm"])


def _date_out_of_season(row):
    return row.assign(date_egg=row["date_egg"] + pd.DateOffset(years=12))


def _missing_species(row):
    return row.assign(species=pd.Series([None], index=row.index, dtype="str"))


def _raw_sex_code(row):
    return row.assign(sex="MALE")


def _repeated_key(row):
    return row  # an exact copy of a row that is already in the table


#: kind of defect -> (how to make it from a good row, the rule that must reject it)
PLANTED = {
    "mass typed in kg": (_mass_in_kg, "body mass in grams in [2000, 7000]"),
    "raw species spelling": (_raw_species_name, "species is one of the three short names"),
    "negative bill length": (_negative_bill, "bill length in mm in [25, 70]"),
    "date 12 years off": (_date_out_of_season, SEASON_RULE),
    "species missing": (_missing_species, "value is required (not nullable)"),
    "raw sex code": (_raw_sex_code, "sex is female or male"),
    "row entered twice": (_repeated_key, "key (study_name, species, sample_number) is unique"),
}


def plant_bad_rows(clean: pd.DataFrame, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Append one corrupted copy of a random good row per kind in ``PLANTED``.

    Returns the table with the bad rows appended (fresh index) and a frame mapping each bad row's
    index to its kind and the rule expected to reject it. Every bad row gets a fresh ``raw_line``, and
    all but the duplicate a fresh key, so each bad row breaks exactly one rule.
    """
    donors = clean.sample(len(PLANTED), random_state=seed)
    start = len(clean)
    bad, planted = [], []
    for i, (kind, (corrupt, rule)) in enumerate(PLANTED.items()):
        row = corrupt(donors.iloc[[i]].copy())
        row = row.assign(raw_line=int(clean["raw_line"].max()) + 1 + i)  # a new line of a longer file
        if kind != "row entered twice":  # the duplicate keeps its key; the others get a fresh one
            row = row.assign(sample_number=int(clean["sample_number"].max()) + 1 + i)
        bad.append(row)
        planted.append({"row": start + i, "kind": kind, "expected rule": rule})
    table = pd.concat([clean, *bad], ignore_index=True)
    return table, pd.DataFrame(planted)
