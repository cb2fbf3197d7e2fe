"""Audit and clean the raw Palmer penguins table, recording every decision (chapter 01).

This is a module, not notebook cells, so that the same functions run in the chapter, in
``prepare_data.py`` (the hand-off as a script) and in ``tests/test_01_analyze_data.py``.

Every cleaning step is a small named function ``step(df, log) -> df``. A step never drops a row
silently: it moves the row to the log's quarantine with its reason, and it records what it did
(action, reason, rows affected, rows left) in the :class:`DecisionLog`. ``account`` then proves
that every input row is either in the clean table or in the quarantine, exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

SOURCE = {
    "package": "palmerpenguins==0.1.6 (PyPI), file palmerpenguins/data/penguins-raw.csv",
    "origin": "Palmer Station Antarctica LTER, data collected by Dr. Kristen Gorman; EDI data packages "
    "knb-lter-pal.219.3 (Adelie), knb-lter-pal.220.3 (Gentoo), knb-lter-pal.221.2 (Chinstrap)",
    "citation": "Gorman KB, Williams TD, Fraser WR (2014) PLoS ONE 9(3): e90081, "
    "https://doi.org/10.1371/journal.pone.0090081",
    "licence": "CC0 (public domain dedication), per the Palmer Station LTER data policy; "
    "the palmerpenguins Python code is MIT",
}

#: Raw column -> clean column. Units move from the header into a suffix; "culmen" is the bill.
RENAME = {
    "studyName": "study_name",
    "Sample Number": "sample_number",
    "Species": "species",
    "Region": "region",
    "Island": "island",
    "Stage": "stage",
    "Individual ID": "individual_id",
    "Clutch Completion": "clutch_completion",
    "Date Egg": "date_egg",
    "Culmen Length (mm)": "bill_length_mm",
    "Culmen Depth (mm)": "bill_depth_mm",
    "Flipper Length (mm)": "flipper_length_mm",
    "Body Mass (g)": "body_mass_g",
    "Sex": "sex",
    "Delta 15 N (o/oo)": "delta_15n_permil",
    "Delta 13 C (o/oo)": "delta_13c_permil",
    "Comments": "comments",
}
SPECIES = {
    "Adelie Penguin (Pygoscelis adeliae)": "Adelie",
    "Chinstrap penguin (Pygoscelis antarctica)": "Chinstrap",
    "Gentoo penguin (Pygoscelis papua)": "Gentoo",
}
SEX = {"MALE": "male", "FEMALE": "female"}
CLUTCH = {"Yes": True, "No": False}
BODY = ["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g"]
ISOTOPES = ["delta_15n_permil", "delta_13c_permil"]
MEASURED = BODY + ISOTOPES
KEY = ["study_name", "species", "sample_number"]
OUTLIER_Z = 3.5  # robust z-score beyond which a value is flagged (Iglewicz and Hoaglin's rule)


def load_raw() -> pd.DataFrame:
    """The raw LTER table exactly as the package ships it (read from inside the wheel: offline)."""
    from palmerpenguins import load_penguins_raw

    return load_penguins_raw()


# ---------------------------------------------------------------- the decision log


@dataclass
class DecisionLog:
    """What each cleaning step did, and the rows it set aside (never deleted)."""

    rows_in: int
    decisions: list[dict] = field(default_factory=list)
    quarantine: list[pd.DataFrame] = field(default_factory=list)

    def record(self, step: str, action: str, columns: str, reason: str, rows: int, rows_left: int) -> None:
        self.decisions.append(dict(step=step, action=action, columns=columns, reason=reason,
                                   rows=int(rows), rows_left=int(rows_left)))

    def set_aside(self, df: pd.DataFrame, mask: pd.Series, step: str, reason: str):
        """Move the rows where ``mask`` is true to the quarantine; return the rest."""
        mask = mask.fillna(False).astype(bool)
        aside = df[mask].assign(quarantine_step=step, quarantine_reason=reason)
        self.quarantine.append(aside)
        kept = df[~mask]
        self.record(step, "set rows aside", "all", reason, int(mask.sum()), len(kept))
        return kept

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.decisions, columns=["step", "action", "columns", "reason", "rows", "rows_left"])

    def quarantined(self) -> pd.DataFrame:
        frames = [q for q in self.quarantine if len(q)]
        if not frames:
            return pd.DataFrame(columns=["raw_line", "quarantine_step", "quarantine_reason"])
        return pd.concat(frames, ignore_index=True)

    def account(self, clean: pd.DataFrame) -> dict:
        """Prove that every input row is in the clean table or the quarantine, exactly once."""
        out = clean["raw_line"].tolist()
        aside = self.quarantined()["raw_line"].tolist()
        every = sorted(out + aside)
        expected = list(range(2, self.rows_in + 2))
        if every != expected:
            lost = sorted(set(expected) - set(every))
            twice = sorted({r for r in every if every.count(r) > 1})
            raise AssertionError(f"row accounting failed: lost raw lines {lost[:10]}, counted twice {twice[:10]}")
        return {"rows_in": self.rows_in, "rows_out": len(out), "rows_set_aside": len(aside)}


# ---------------------------------------------------------------- cleaning steps


def add_raw_line(df: pd.DataFrame, log: DecisionLog) -> pd.DataFrame:
    """Give every row its line number in the raw CSV (header is line 1), so any row can be traced back."""
    out = df.assign(raw_line=np.arange(2, len(df) + 2))
    log.record("add_raw_line", "add key", "raw_line", "trace every row to its line in the raw CSV",
               len(out), len(out))
    return out


def rename_columns(df: pd.DataFrame, log: DecisionLog) -> pd.DataFrame:
    """snake_case names with the unit as a suffix; 'culmen' becomes 'bill'."""
    out = df.rename(columns=RENAME)
    log.record("rename_columns", "rename", f"{len(RENAME)} columns",
               "units in the name (_mm, _g, _permil), no spaces or brackets", len(out), len(out))
    return out


def drop_constant_columns(df: pd.DataFrame, log: DecisionLog) -> pd.DataFrame:
    """Drop columns that hold one value in every row: they carry no information, only width."""
    constant = [c for c in df.columns if c != "raw_line" and df[c].nunique(dropna=False) == 1]
    values = ", ".join(f"{c}={df[c].iloc[0]!r}" for c in constant)
    log.record("drop_constant_columns", "drop column", ", ".join(constant),
               f"one value in every row ({values}); kept in the data card instead", 0, len(df))
    return df.drop(columns=constant)


def recode_species(df: pd.DataFrame, log: DecisionLog) -> pd.DataFrame:
    """Map the long, inconsistently capitalised names to one short name per species."""
    unknown = sorted(set(df["species"].dropna()) - set(SPECIES))
    if unknown:
        raise ValueError(f"unknown species spellings {unknown}; add them to SPECIES on purpose")
    out = df.assign(species=df["species"].map(SPECIES))
    log.record("recode_species", "recode", "species",
               "'Adelie Penguin (...)' vs 'Gentoo penguin (...)': one short name each", len(out), len(out))
    return out


def recode_sex(df: pd.DataFrame, log: DecisionLog) -> pd.DataFrame:
    """MALE/FEMALE -> male/female. Missing stays missing: the comments say sexing failed."""
    unknown = sorted(set(df["sex"].dropna()) - set(SEX))
    if unknown:
        raise ValueError(f"unknown sex codes {unknown}")
    out = df.assign(sex=df["sex"].map(SEX))
    missing = int(out["sex"].isna().sum())
    log.record("recode_sex", "recode", "sex", "upper-case codes to lower case", len(out) - missing, len(out))
    log.record("recode_sex", "keep missing", "sex",
               "no blood sample or sexing primers failed (comments); not imputed", missing, len(out))
    return out


def recode_clutch(df: pd.DataFrame, log: DecisionLog) -> pd.DataFrame:
    """Yes/No text -> bool."""
    out = df.assign(clutch_completion=df["clutch_completion"].map(CLUTCH))
    if out["clutch_completion"].isna().any():
        raise ValueError("clutch_completion holds a value other than Yes/No")
    out["clutch_completion"] = out["clutch_completion"].astype(bool)
    log.record("recode_clutch", "recode", "clutch_completion", "Yes/No text to bool", len(out), len(out))
    return out


def season_start_year(study_name: pd.Series) -> pd.Series:
    """PAL0708 -> 2007: the austral summer season a study name stands for."""
    return 2000 + study_name.str.slice(3, 5).astype(int)


def parse_dates(df: pd.DataFrame, log: DecisionLog) -> pd.DataFrame:
    """Parse the egg date strictly (ISO format), derive the year, set aside dates outside their season."""
    out = df.assign(date_egg=pd.to_datetime(df["date_egg"], format="%Y-%m-%d"))
    out["year"] = out["date_egg"].dt.year.astype("int64")
    log.record("parse_dates", "parse", "date_egg, year", "ISO date text to datetime; year derived from it",
               len(out), len(out))
    wrong = out["year"] != season_start_year(out["study_name"])
    return log.set_aside(out, wrong, "parse_dates", "egg date outside the season its study name stands for")


def set_aside_unmeasured(df: pd.DataFrame, log: DecisionLog) -> pd.DataFrame:
    """A row with no body measurement at all is a bird that was not sampled: set it aside."""
    unmeasured = df[BODY].isna().all(axis=1)
    reason = "no body measurement at all ('Adult not sampled.' in comments)"
    return log.set_aside(df, unmeasured, "set_aside_unmeasured", reason)


def keep_missing_isotopes(df: pd.DataFrame, log: DecisionLog) -> pd.DataFrame:
    """Record, not fill, the missing isotope values: imputing is a modelling step fitted on train."""
    missing = int(df[ISOTOPES].isna().any(axis=1).sum())
    log.record("keep_missing_isotopes", "keep missing", ", ".join(ISOTOPES),
               "blood sample missing or too small (comments); impute inside the model, on train only",
               missing, len(df))
    return df


def set_aside_duplicates(df: pd.DataFrame, log: DecisionLog) -> pd.DataFrame:
    """A bird sampled twice in one study (same key) would be counted twice: keep the first row."""
    dup = df.duplicated(KEY, keep="first")
    return log.set_aside(df, dup, "set_aside_duplicates", f"repeats the key ({', '.join(KEY)}) of an earlier row")


def robust_z(values: pd.Series, groups: pd.Series) -> pd.Series:
    """(x - median) / (1.4826 * MAD) within each group: a z-score that outliers cannot drag along."""
    grouped = values.groupby(groups)
    median = grouped.transform("median")
    mad = (values - median).abs().groupby(groups).transform("median")
    return (values - median) / (1.4826 * mad)


def flag_outliers(df: pd.DataFrame, log: DecisionLog) -> pd.DataFrame:
    """Flag, do not drop, values far from their species' median: they are plausible birds."""
    z = pd.concat({c: robust_z(df[c], df["species"]) for c in MEASURED}, axis=1)
    flagged = z.abs().gt(OUTLIER_Z).any(axis=1)
    out = df.assign(outlier_flag=flagged)
    log.record("flag_outliers", "flag", "outlier_flag",
               f"robust z > {OUTLIER_Z} within species; plausible biology, so kept", int(flagged.sum()), len(out))
    return out


def tidy_comments(df: pd.DataFrame, log: DecisionLog) -> pd.DataFrame:
    """Strip the free text; it stays in the table because it explains missing values."""
    out = df.assign(comments=df["comments"].str.strip())
    log.record("tidy_comments", "keep free text", "comments",
               "explains every missing value; restates clutch_completion, so never a feature for it",
               int(out["comments"].notna().sum()), len(out))
    return out


STEPS = [
    add_raw_line, rename_columns, drop_constant_columns, set_aside_unmeasured, recode_species,
    recode_sex, recode_clutch, parse_dates, keep_missing_isotopes, set_aside_duplicates, flag_outliers,
    tidy_comments,
]
COLUMNS = [
    "raw_line", "study_name", "sample_number", "species", "island", "individual_id", "clutch_completion",
    "date_egg", "year", *BODY, "sex", *ISOTOPES, "outlier_flag", "comments",
]


def clean(raw: pd.DataFrame) -> tuple[pd.DataFrame, DecisionLog]:
    """Run every step in order; return the clean table (fixed column order) and the log."""
    log = DecisionLog(rows_in=len(raw))
    df = raw
    for step in STEPS:
        df = step(df, log)
    return df[COLUMNS].reset_index(drop=True), log


# ---------------------------------------------------------------- audit helpers


def missing_patterns(df: pd.DataFrame) -> pd.DataFrame:
    """Each distinct combination of missing columns, with how many rows share it (most common first)."""
    holes = df.isna()
    cols = [c for c in df.columns if holes[c].any()]
    counts = holes[cols].value_counts()  # one row per pattern, not per table row
    names = [", ".join(c for c, hole in zip(cols, key) if hole) or "(none)" for key in counts.index]
    return pd.DataFrame({"missing columns": names, "rows": counts.to_numpy()})


def unexplained_missing(raw: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Rows with a missing value in ``columns`` and no comment to explain it."""
    holes = raw[columns].isna().any(axis=1)
    return raw[holes & raw["Comments"].isna()]


def comment_flags(comments: pd.Series) -> pd.DataFrame:
    """One boolean column per distinct sentence of the free-text comments."""
    sentences = comments.fillna("").str.split(r"(?<=\.)\s*", regex=True)
    names = sorted({s for parts in sentences for s in parts if s})
    return pd.DataFrame({n: sentences.map(lambda parts, n=n: n in parts) for n in names}, index=comments.index)


# ---------------------------------------------------------------- hand-off


def data_card(clean_df: pd.DataFrame, log: DecisionLog, caveats: list[str]) -> str:
    """A short Markdown data card, generated from the computed values (nothing typed by hand)."""
    acc = log.account(clean_df)
    decisions = log.table()
    lines = [
        "# Data card: Palmer penguins, cleaned (Gradient Rage chapter 01)", "",
        *(f"- **{k.capitalize()}**: {v}" for k, v in SOURCE.items()),
        f"- **Rows**: {acc['rows_in']} in, {acc['rows_out']} out, {acc['rows_set_aside']} set aside "
        "(in penguins_set_aside.parquet, each with its reason)",
        f"- **Columns**: {', '.join(f'{c} ({t})' for c, t in clean_df.dtypes.astype(str).items())}",
        "", "## Decisions", "", "| step | action | columns | reason | rows | rows left |",
        "| --- | --- | --- | --- | --- | --- |",
        *(f"| {r.step} | {r.action} | {r.columns} | {r.reason} | {r.rows} | {r.rows_left} |"
          for r in decisions.itertuples()),
        "", "## Known caveats", "", *(f"- {c}" for c in caveats),
    ]
    return "\n".join(lines) + "\n"


def write_parquet(df: pd.DataFrame, path, metadata: dict[str, str] | None = None) -> None:
    """Write ``df`` to Parquet atomically (temp file, then rename), with extra key-value metadata."""
    import os
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    table = pa.Table.from_pandas(df, preserve_index=False)
    extra = {k.encode(): v.encode() for k, v in (metadata or {}).items()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **extra})
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)

