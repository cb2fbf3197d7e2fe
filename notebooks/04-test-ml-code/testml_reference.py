"""Measure, once, the reference the metric regression test compares with, and how good that test is.

Why a file: the reference (the test-split MAE of the default training, averaged over many seeds,
and the spread of those MAEs) and the test's power cost a few hundred trainings, too slow for every
test run or every build of the chapter. This script measures them once and stores them in
``testml_reference.json`` with how they were made (settings, date, torch version, CPU capability).
``tests/test_04_test_ml_code.py`` fails when the stored settings are not this script's current ones
or when the stored MAEs no longer reproduce, so a changed pipeline cannot keep a stale golden number.

For every book seed s in ``BOOK_SEEDS`` it also runs the regression test on the seed set
``seeds(len(TEST_SEEDS), seed=s)``, clean and with the planted ``short_training`` bug, and stores
whether the test passed and whether it caught the bug, with the margins and every per-seed MAE: the
test's false-alarm rate and its power, measured rather than assumed, and, by cutting those seed sets
into groups of k, what a test that averaged only k seeds (three, say) would have caught.

Launch from this folder (CPU only, one thread; about a minute):

    python testml_reference.py           # measure and write testml_reference.json
    python testml_reference.py --check   # only compare the stored settings with the current ones
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STORED = HERE / "testml_reference.json"
REFERENCE_SEEDS = list(range(100))  # the reference: mean and spread of 100 seeds
TEST_SEEDS = list(range(20))  # the seeds the regression test averages
Z = 4.5  # standard errors of the difference the test allows (a normal tail: 7 false alarms in a million)
BOOK_SEEDS = list(range(30))  # book seeds whose seed sets measure the test's pass rate and power
POWER_KS = [1, 2, 3, 5, 10, 20]  # seeds per test run: the stored seed sets, cut into groups of k


def settings() -> dict:
    """What the stored numbers depend on: this script's choices and the pipeline's training defaults."""
    sys.path.insert(0, str(HERE))
    from testml_bugs import BUG_BY_NAME
    from testml_data import split
    from testml_model import train_network

    def defaults(function) -> dict:
        return {name: p.default for name, p in inspect.signature(function).parameters.items()
                if p.default is not inspect.Parameter.empty}

    bug_epochs = int(re.search(r"epochs: int = (\d+)", BUG_BY_NAME["short_training"].buggy).group(1))
    return {"reference_seeds": REFERENCE_SEEDS, "test_seeds": TEST_SEEDS, "z": Z, "book_seeds": BOOK_SEEDS,
            "training_defaults": defaults(train_network), "split_defaults": defaults(split),
            "bug_epochs": bug_epochs, "torch_threads": 1, "power_ks": POWER_KS}


def measure() -> dict:
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))  # notebooks/: the book's seed sets
    import numpy as np
    import torch
    from _shared.seed import seeds
    from testml_data import TARGET, load_table, split
    from testml_metrics import mean_absolute_error, regression_tolerance
    from testml_model import fit

    torch.set_num_threads(1)
    config, started = settings(), time.perf_counter()
    train, test = split(load_table())

    def mae(seed: int, **training) -> float:
        return mean_absolute_error(test[TARGET], fit(train, seed=seed, **training).predict(test))

    maes = np.array([mae(s) for s in REFERENCE_SEEDS])
    mean, sd = float(maes.mean()), float(maes.std(ddof=1))
    k = len(TEST_SEEDS)
    tolerance = regression_tolerance(sd, k, len(maes), Z)
    runs = []
    for book_seed in BOOK_SEEDS:
        chosen = seeds(k, seed=book_seed)
        clean = [mae(s) for s in chosen]
        bug = [mae(s, epochs=config["bug_epochs"]) for s in chosen]
        runs.append({"book_seed": book_seed, "seeds": chosen, "clean_mean_g": float(np.mean(clean)),
                     "bug_mean_g": float(np.mean(bug)), "clean_mae_g": clean, "bug_mae_g": bug})
    clean_margin = [tolerance - abs(r["clean_mean_g"] - mean) for r in runs]  # > 0: the test passed
    bug_margin = [abs(r["bug_mean_g"] - mean) - tolerance for r in runs]  # > 0: the test caught the bug
    return {
        "made_by": Path(__file__).name, "settings": config,
        "made": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                 "seconds": round(time.perf_counter() - started, 1)},
        "reference": {"mae_g": maes.tolist(), "mean_g": mean, "sd_g": sd},
        "test_seeds": TEST_SEEDS, "z": Z, "tolerance_g": tolerance,
        "power": {"runs": runs, "passed_clean": int(sum(m > 0 for m in clean_margin)),
                  "caught_bug": int(sum(m > 0 for m in bug_margin)), "of": len(runs),
                  "smallest_clean_margin_g": float(min(clean_margin)),
                  "smallest_bug_margin_g": float(min(bug_margin))},
        "power_by_k": power_by_k(runs, mean, sd, len(maes), Z, POWER_KS),
    }


def power_by_k(runs: list[dict], mean: float, sd: float, n_reference: int, z: float, ks: list[int]) -> list[dict]:
    """The test with k seeds instead of all of them: cut each stored seed set into disjoint groups of k.

    For each k, how many groups the test (its tolerance for k seeds) passed clean and how many caught
    the planted bug. Pure arithmetic on stored MAEs, so the chapter recomputes it and compares.
    """
    sys.path.insert(0, str(HERE))
    from testml_metrics import regression_tolerance

    rows = []
    for k in ks:
        tolerance = regression_tolerance(sd, k, n_reference, z)
        groups = [(run["clean_mae_g"][i:i + k], run["bug_mae_g"][i:i + k])
                  for run in runs for i in range(0, len(run["clean_mae_g"]) - k + 1, k)]
        alarms = sum(abs(sum(clean) / k - mean) > tolerance for clean, _ in groups)
        caught = sum(sum(bug) / k - mean > tolerance for _, bug in groups)
        rows.append({"k": k, "tolerance_g": tolerance, "groups": len(groups), "false_alarms": int(alarms),
                     "caught_bug": int(caught)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="Measure the metric regression test's reference and power.")
    parser.add_argument("--check", action="store_true", help="compare the stored settings with the current ones")
    args = parser.parse_args()
    if args.check:
        same = json.loads(STORED.read_text())["settings"] == json.loads(json.dumps(settings()))
        print(json.dumps({"stored": STORED.name, "settings_match": same}))
        sys.exit(0 if same else 1)
    result = measure()
    STORED.write_text(json.dumps(result, indent=1) + "\n")
    summary = {k: result["power"][k] for k in ("passed_clean", "caught_bug", "of")}
    print(json.dumps({"written": STORED.name, "mean_g": result["reference"]["mean_g"],
                      "sd_g": result["reference"]["sd_g"], "tolerance_g": result["tolerance_g"], **summary}))


if __name__ == "__main__":
    main()
