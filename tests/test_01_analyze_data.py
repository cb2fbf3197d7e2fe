"""Chapter 01 (analyze data): the cleaning steps, the row accounting, the schema and the hand-off.

What a reader relies on: no row is lost or counted twice, each cleaning step does what its log line
says, the schema passes the clean table and rejects each kind of bad row with the rule written for
it, the vectorized rule agrees with the row-wise one, and the hand-off script writes the same table
the chapter builds. In-process tests first, then one test that runs ``prepare_data.py`` as a process.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import NOTEBOOKS, load_module

CHAPTER = NOTEBOOKS / "01-analyze-data"
cleaning = load_module(CHAPTER / "cleaning.py")
clean_schema = load_module(CHAPTER / "clean_schema.py")
analysis = load_module(CHAPTER / "analysis.py")


@pytest.fixture(scope="module")
def raw() -> pd.DataFrame:
    return cleaning.load_raw()


@pytest.fixture(scope="module")
def cleaned(raw):
    return cleaning.clean(raw)


# ---------------------------------------------------------------- cleaning and accounting


def test_clean_accounts_for_every_raw_row(raw, cleaned):
    clean, log = cleaned
    accounts = log.account(clean)
    assert accounts == {"rows_in": 344, "rows_out": 342, "rows_set_aside": 2}
    # the two set-aside rows are the birds that were never measured, traced to their CSV lines
    aside = log.quarantined()
    assert aside["raw_line"].tolist() == [5, 273]
    assert aside["comments"].str.contains("Adult not sampled").all()
    assert set(aside["quarantine_step"]) == {"set_aside_unmeasured"}
    # rows_left in the log ends at the clean table's length, and set-aside counts add up
    table = log.table()
    assert table["rows_left"].iloc[-1] == len(clean)
    assert table.loc[table["action"] == "set rows aside", "rows"].sum() == len(aside)


def test_account_catches_a_silently_dropped_row(cleaned):
    clean, log = cleaned
    with pytest.raises(AssertionError, match="lost raw lines \\[2\\]"):
        log.account(clean.iloc[1:])


def test_account_catches_a_row_counted_twice(cleaned):
    clean, log = cleaned
    with pytest.raises(AssertionError, match="counted twice"):
        log.account(pd.concat([clean, clean.iloc[[0]]]))


def test_set_aside_moves_rows_with_their_reason():
    log = cleaning.DecisionLog(rows_in=3)
    df = pd.DataFrame({"raw_line": [2, 3, 4], "x": [1.0, np.nan, 3.0]})
    kept = log.set_aside(df, df["x"].isna(), "step", "x is missing")
    assert kept["raw_line"].tolist() == [2, 4]
    aside = log.quarantined()
    assert aside["raw_line"].tolist() == [3] and aside["quarantine_reason"].tolist() == ["x is missing"]
    assert log.decisions[-1] == {"step": "step", "action": "set rows aside", "columns": "all",
                                "reason": "x is missing", "rows": 1, "rows_left": 2}
    assert log.account(kept) == {"rows_in": 3, "rows_out": 2, "rows_set_aside": 1}


def test_clean_table_has_the_documented_recodes(cleaned):
    clean, _ = cleaned
    assert list(clean.columns) == cleaning.COLUMNS
    assert set(clean["species"]) == {"Adelie", "Chinstrap", "Gentoo"}
    assert set(clean["sex"].dropna()) == {"female", "male"} and clean["sex"].isna().sum() == 9
    assert clean["clutch_completion"].dtype == bool and (~clean["clutch_completion"]).sum() == 35
    assert str(clean["date_egg"].dtype).startswith("datetime64")
    assert (clean["year"] == clean["date_egg"].dt.year).all()
    assert "region" not in clean and "stage" not in clean  # constant columns dropped
    assert clean["outlier_flag"].sum() == 2  # flagged, not dropped


def test_recode_species_refuses_an_unknown_spelling():
    log = cleaning.DecisionLog(rows_in=1)
    with pytest.raises(ValueError, match="unknown species spellings \\['adelie'\\]"):
        cleaning.recode_species(pd.DataFrame({"species": ["adelie"]}), log)


def test_recode_sex_keeps_missing_and_logs_both_counts():
    log = cleaning.DecisionLog(rows_in=3)
    out = cleaning.recode_sex(pd.DataFrame({"sex": ["MALE", None, "FEMALE"]}, dtype="str"), log)
    assert out["sex"].tolist()[::2] == ["male", "female"] and pd.isna(out["sex"].iloc[1])
    assert [(d["action"], d["rows"]) for d in log.decisions] == [("recode", 2), ("keep missing", 1)]


def test_parse_dates_sets_aside_a_date_outside_its_season():
    log = cleaning.DecisionLog(rows_in=2)
    df = pd.DataFrame({"raw_line": [2, 3], "study_name": ["PAL0708", "PAL0708"],
                       "date_egg": ["2007-11-11", "2019-11-11"]})
    out = cleaning.parse_dates(df, log)
    assert out["raw_line"].tolist() == [2] and log.quarantined()["raw_line"].tolist() == [3]


def test_parse_dates_refuses_a_non_iso_date():
    df = pd.DataFrame({"raw_line": [2], "study_name": ["PAL0708"], "date_egg": ["11/11/2007"]})
    # the reader relies on the strict format: the error names the bad text and the format expected
    with pytest.raises(ValueError, match='"11/11/2007" doesn\'t match format "%Y-%m-%d"'):
        cleaning.parse_dates(df, cleaning.DecisionLog(rows_in=1))


def test_duplicates_keep_the_first_and_set_aside_the_rest():
    log = cleaning.DecisionLog(rows_in=3)
    df = pd.DataFrame({"raw_line": [2, 3, 4], "study_name": ["PAL0708"] * 3, "species": ["Adelie"] * 3,
                       "sample_number": [1, 1, 2]})
    out = cleaning.set_aside_duplicates(df, log)
    assert out["raw_line"].tolist() == [2, 4] and log.quarantined()["raw_line"].tolist() == [3]


def test_robust_z_is_not_dragged_by_the_outlier_it_finds():
    values = pd.Series([10.0, 11.0, 12.0, 13.0, 14.0, 100.0])
    groups = pd.Series(["a"] * 6)
    z = cleaning.robust_z(values, groups)
    assert z.iloc[-1] > 3.5 and z.iloc[:-1].abs().max() < 1.5
    classic = (values - values.mean()) / values.std()
    assert classic.iloc[-1] < 2.1  # the mean and SD move toward the outlier and nearly hide it


def test_robust_z_is_computed_within_each_group():
    values = pd.Series([1.0, 2.0, 3.0, 101.0, 102.0, 103.0])
    z = cleaning.robust_z(values, pd.Series(list("aaabbb")))
    assert np.allclose(z, [-0.6745, 0.0, 0.6745] * 2, atol=1e-3)


def test_missing_patterns_count_rows_per_combination():
    df = pd.DataFrame({"a": [1, None, None, 4], "b": [1, None, 3, 4], "c": [1, 2, 3, 4]})
    patterns = cleaning.missing_patterns(df)
    assert dict(zip(patterns["missing columns"], patterns["rows"])) == {"(none)": 2, "a, b": 1, "a": 1}


def test_every_missing_value_in_the_raw_table_has_a_comment(raw):
    columns = ["Culmen Length (mm)", "Body Mass (g)", "Sex", "Delta 15 N (o/oo)", "Delta 13 C (o/oo)"]
    assert cleaning.unexplained_missing(raw, columns).empty
    holed = raw.assign(Comments=raw["Comments"].where(raw["Sex"].notna()))  # erase the sexing comments
    assert len(cleaning.unexplained_missing(holed, columns)) == 11


def test_comment_flags_split_sentences():
    flags = cleaning.comment_flags(pd.Series(["A b. C d.", None, "C d."], dtype="str"))
    assert flags.sum().to_dict() == {"A b.": 1, "C d.": 2}


def test_data_card_is_generated_from_the_log(cleaned):
    clean, log = cleaned
    card = cleaning.data_card(clean, log, ["caveat one"])
    assert "344 in, 342 out, 2 set aside" in card and "CC0" in card and "- caveat one" in card
    assert card.count("\n| ") == len(log.decisions) + 2  # header, rule, one line per decision


def test_write_parquet_round_trips_types_and_metadata(cleaned, tmp_path):
    import pyarrow.parquet as pq

    clean, _ = cleaned
    path = tmp_path / "t.parquet"
    cleaning.write_parquet(clean, path, {"data_card": "hello"})
    pd.testing.assert_frame_equal(pd.read_parquet(path), clean)
    assert pq.read_schema(path).metadata[b"data_card"] == b"hello"
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]  # no temporary file left behind


# ---------------------------------------------------------------- the schema


def test_schema_passes_the_clean_table(cleaned):
    clean, _ = cleaned
    passed, report = clean_schema.validate(clean)
    assert report.empty and passed.equals(clean)


@pytest.mark.parametrize("kind", list(clean_schema.PLANTED))
def test_each_kind_of_bad_row_is_rejected_by_its_rule(cleaned, kind):
    clean, _ = cleaned
    table, planted = clean_schema.plant_bad_rows(clean, seed=1)
    bad = planted[planted["kind"] == kind].iloc[0]
    others = planted.loc[planted["kind"] != kind, "row"]
    one_bad = table.drop(index=others).reset_index(drop=True)  # the clean table plus this bad row only
    passed, report = clean_schema.validate(one_bad)
    assert report["row"].tolist() == [len(clean)], f"{kind}: expected only the planted row to fail"
    assert report["rule"].tolist() == [bad["expected rule"]]
    assert len(passed) == len(clean)


def test_report_quotes_the_values_that_broke_the_rule(cleaned):
    clean, _ = cleaned
    table, _ = clean_schema.plant_bad_rows(clean, seed=0)
    _, report = clean_schema.validate(table)
    found = dict(zip(report["rule"], report["found"]))
    assert found["sex is female or male"] == "sex=MALE"
    assert found["species is one of the three short names"] == "species=Adelie Penguin (Pygoscelis adeliae)"
    assert found["egg date lies in its study's season"].startswith("date_egg=2019")


def test_a_missing_column_is_reported_as_a_table_problem(cleaned):
    clean, _ = cleaned
    with pytest.raises(ValueError, match="table-level schema failures"):
        clean_schema.validate(clean.drop(columns="sex"))


def test_extra_rule_is_checked_and_quoted(cleaned):
    clean, _ = cleaned
    rule = "year is the egg date's year"
    schema = clean_schema.build_schema({rule: (lambda d: d["year"] == d["date_egg"].dt.year, ("year", "date_egg"))})
    off = clean.iloc[[0]].assign(year=2008, raw_line=9999, sample_number=9999)
    _, report = clean_schema.validate(pd.concat([clean, off], ignore_index=True), schema)
    assert report[["row", "rule"]].values.tolist() == [[len(clean), rule]]
    assert report["found"].iloc[0] == "date_egg=2007-11-11, year=2008"


# ---------------------------------------------------------------- exploration, leakage, speed


def test_bootstrap_mean_is_seeded_and_covers_the_mean():
    x = np.arange(100.0)
    a = analysis.bootstrap_mean(x, np.random.default_rng(0))
    b = analysis.bootstrap_mean(x, np.random.default_rng(0))
    assert a == b and a[1] < a[0] == 49.5 < a[2]


def test_bootstrap_corr_matches_pearson_and_resamples_pairs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = x + rng.normal(size=200)
    r, low, high = analysis.bootstrap_corr(x, y, np.random.default_rng(1))
    assert r == pytest.approx(np.corrcoef(x, y)[0, 1]) and low < r < high and low > 0.5


def test_naive_target_encoding_copies_the_label_of_a_unique_key():
    df = pd.DataFrame({"key": ["a", "b", "c", "c"]})
    y = pd.Series([1, 0, 1, 0])
    assert analysis.naive_target_encoding(df, "key", y).tolist() == [1.0, 0.0, 0.5, 0.5]


def test_sex_model_rejects_an_unknown_encoding():
    with pytest.raises(ValueError, match="encode must be"):
        analysis.sex_model("leaky", seed=0)


def test_single_feature_auc_flags_a_copy_of_the_target():
    y = pd.Series([0, 1] * 20)
    features = pd.DataFrame({"copy": y.astype(bool), "inverse": 1 - y,
                             "noise": np.random.default_rng(0).normal(size=40)})
    auc = analysis.single_feature_auc(features, y)
    assert auc["copy"] == 1.0 and auc["inverse"] == 1.0 and auc["noise"] < 0.8


def test_vectorized_rule_agrees_with_the_row_wise_rule(cleaned):
    clean, _ = cleaned
    limits = analysis.mass_limits(clean)
    sample = clean.sample(2000, replace=True, random_state=0, ignore_index=True)
    sample.loc[:10, "body_mass_g"] = 100.0  # make sure both outcomes occur
    rowwise = analysis.plausible_rowwise(sample, limits)
    assert rowwise.equals(analysis.plausible_vectorized(sample, limits))
    assert 0 < rowwise.sum() < len(sample)


def test_vectorized_rule_refuses_a_missing_species(cleaned):
    clean, _ = cleaned
    broken = clean.head(3).assign(species=pd.Series(["Adelie", None, "Gentoo"], dtype="str"))
    with pytest.raises(ValueError, match="species is missing"):
        analysis.plausible_vectorized(broken, analysis.mass_limits(clean))


@pytest.mark.slow
def test_target_encoding_before_the_split_inflates_accuracy(cleaned):
    clean, _ = cleaned
    sexed = clean.dropna(subset=["sex"]).reset_index(drop=True)
    sexed["bird_key"] = sexed["species"] + "/" + sexed["island"] + "/" + sexed["individual_id"]
    y = (sexed["sex"] == "male").astype(int)
    sexed["bird_key_encoded"] = analysis.naive_target_encoding(sexed, "bird_key", y)
    models = {name: analysis.sex_model(name, 0) for name in ["precomputed", "pipeline"]}
    scores = analysis.paired_scores(models, sexed, y, scoring="accuracy", seed=0)
    assert (scores["precomputed"] - scores["pipeline"]).mean() > 0.04


# ---------------------------------------------------------------- the hand-off script


def _load_prepare(monkeypatch):
    """prepare_data.main imports `cleaning` and `clean_schema` by name: give it this test's modules."""
    monkeypatch.setitem(sys.modules, "cleaning", cleaning)
    monkeypatch.setitem(sys.modules, "clean_schema", clean_schema)
    return load_module(CHAPTER / "prepare_data.py")


def test_prepare_data_writes_nothing_when_the_schema_fails(monkeypatch, tmp_path, cleaned):
    prepare = _load_prepare(monkeypatch)
    clean, log = cleaned
    monkeypatch.setattr(cleaning, "clean", lambda raw: (clean.assign(sex=clean["sex"].str.upper()), log))
    with pytest.raises(SystemExit, match="breaks the schema; nothing written"):
        prepare.main(["--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_caveats_carry_the_computed_numbers(monkeypatch, cleaned):
    prepare = _load_prepare(monkeypatch)
    clean, _ = cleaned
    text = " ".join(prepare.caveats(clean, 3.5))
    assert "missing for 9 birds" in text and "missing for 12" in text and "marks 2 rows" in text


@pytest.mark.slow
def test_prepare_data_script_hands_off_the_chapters_table(tmp_path, cleaned):
    clean, _ = cleaned
    done = subprocess.run([sys.executable, str(CHAPTER / "prepare_data.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["rows_in"], result["rows_out"], result["rows_set_aside"]) == (344, 342, 2)
    pd.testing.assert_frame_equal(pd.read_parquet(result["penguins_clean.parquet"]), clean)
    assert len(pd.read_parquet(result["penguins_set_aside.parquet"])) == 2
    card = (tmp_path / "DATACARD.md").read_text()
    import pyarrow.parquet as pq
    assert pq.read_schema(result["penguins_clean.parquet"]).metadata[b"data_card"].decode() == card


def test_group_split_never_shares_a_key_and_row_split_does():
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
    X = pd.DataFrame({"x": np.arange(40.0)})
    y = pd.Series([0, 1] * 20)
    groups = pd.Series(np.repeat(np.arange(10), 4))  # ten "birds", four rows each
    row = StratifiedKFold(5, shuffle=True, random_state=0)
    grp = StratifiedGroupKFold(5, shuffle=True, random_state=0)
    assert analysis.keys_on_both_sides(row, X, y, groups) > 0
    assert analysis.keys_on_both_sides(grp, X, y, groups) == 0


def test_season_scores_hold_out_each_season_once():
    from sklearn.dummy import DummyClassifier
    X = pd.DataFrame({"x": np.zeros(10)})
    y = pd.Series([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    season = pd.Series([2007] * 3 + [2008] * 3 + [2009] * 4)
    scores = analysis.season_scores(DummyClassifier(strategy="most_frequent"), X, y, season)
    # each season is scored by the majority class of the other two: 0, 0 and 1
    assert scores.index.tolist() == [2007, 2008, 2009]
    assert scores.round(3).tolist() == [0.0, round(1 / 3, 3), 0.0]


def test_season_drift_finds_a_planted_shift_and_its_interval():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"species": ["A"] * 200, "year": [2007] * 100 + [2009] * 100,
                       "v": np.r_[rng.normal(0, 1, 100), rng.normal(2, 1, 100)]})
    drift = analysis.season_drift(df, "v", 2007, 2009, np.random.default_rng(1))
    row = drift.iloc[0]
    assert row["n 2007"] == row["n 2009"] == 100
    assert row["low"] < row["shift"] < row["high"] and row["low"] > 1.4 and row["high"] < 2.6
