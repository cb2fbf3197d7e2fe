"""Turn the raw Palmer penguins table into the validated hand-off files, as one process.

Why a file and not a cell: the hand-off is what a scheduler, a CI job or a colleague runs without
opening the notebook. It runs exactly the chapter's code (``cleaning.py``, ``clean_schema.py``),
refuses to write anything if the clean table breaks the schema, and writes atomically.

Launch (CPU only; no GPU is involved):

    python prepare_data.py                       # writes into ./artifacts/
    python prepare_data.py --out /tmp/penguins   # anywhere else

It writes ``penguins_clean.parquet`` (with the data card in its metadata),
``penguins_set_aside.parquet`` (every row not in the clean table, with its reason) and
``DATACARD.md``. The last line printed is one JSON object with the row accounting and the paths.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent

CAVEATS = [
    "One region (Anvers), three islands, three breeding seasons (2007-2009), adults at the one-egg "
    "stage only: not a sample of penguins in general. Chinstrap come only from Dream and Gentoo only "
    "from Biscoe, so island stands in for species.",
    "sex is missing for {sex_missing} birds (sexing failed or no blood sample); isotopes are missing "
    "for {iso_missing}, {iso_missing_2007} of them in the 2007/08 season (missing at random given "
    "the season, not completely at random). Nothing is imputed: impute inside a model, fitted on "
    "training rows only.",
    "individual_id is not unique ({id_repeats} repeats within species and island): do not use it as a key; "
    "the key is (study_name, species, sample_number).",
    "comments restate clutch_completion word for word: never use the free text as a feature for it.",
    "outlier_flag marks {outliers} rows with a value beyond robust z {z} within its species; they are "
    "kept as plausible birds.",
]


def caveats(clean, z: float) -> list[str]:
    """The caveats with their numbers filled in from the clean table."""
    repeats = int(clean.duplicated(["species", "island", "individual_id"]).sum())
    iso = clean[["delta_15n_permil", "delta_13c_permil"]].isna().any(axis=1)
    values = dict(
        sex_missing=int(clean["sex"].isna().sum()),
        iso_missing=int(iso.sum()), iso_missing_2007=int(iso[clean["year"] == 2007].sum()),
        id_repeats=repeats, outliers=int(clean["outlier_flag"].sum()), z=z,
    )
    return [c.format(**values) for c in CAVEATS]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "artifacts",
                        help="output folder (default: ./artifacts)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(HERE))
    import cleaning
    import clean_schema

    raw = cleaning.load_raw()
    clean, log = cleaning.clean(raw)
    accounts = log.account(clean)
    _, report = clean_schema.validate(clean)
    if len(report):
        raise SystemExit("the clean table breaks the schema; nothing written:\n"
                         + report.to_string())
    card = cleaning.data_card(clean, log, caveats(clean, cleaning.OUTLIER_Z))

    args.out.mkdir(parents=True, exist_ok=True)
    names = ("penguins_clean.parquet", "penguins_set_aside.parquet", "DATACARD.md")
    paths = {name: args.out / name for name in names}
    cleaning.write_parquet(clean, paths["penguins_clean.parquet"], {"data_card": card})
    cleaning.write_parquet(log.quarantined(), paths["penguins_set_aside.parquet"])
    tmp = paths["DATACARD.md"].with_name(".DATACARD.md.tmp")
    tmp.write_text(card)
    tmp.replace(paths["DATACARD.md"])

    result = {**accounts, "schema_failures": 0, **{k: str(v) for k, v in paths.items()}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
