"""Measure, once, how much of the pipeline its own tests execute (coverage.py, lines and branches).

Why a file: coverage.py is a development tool, not part of the book's lock, and the measurement
needs the whole suite run under it in a scratch copy of the folder (about 20 s). This script runs it
once and stores the result in ``testml_coverage.json`` with how it was made (command, coverage and
Python versions, date, and the SHA-256 of every file measured or run). The chapter reads the stored
file and refuses it when a hashed file changed since; so does ``tests/test_04_test_ml_code.py``.

Launch from this folder (CPU only):

    pip install coverage==7.18.0
    python testml_coverage.py            # run the suite under coverage, write testml_coverage.json
    python testml_coverage.py --check    # only compare the stored hashes with the files as they are
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
STORED = HERE / "testml_coverage.json"
PIPELINE = ["testml_data.py", "testml_features.py", "testml_metrics.py", "testml_model.py"]
TESTS = ["test_testml_code.py", "test_testml_data.py", "test_testml_model.py"]
DATA = ["testml_reference.json", "pytest.ini"]


def source_hashes() -> dict[str, str]:
    """SHA-256 of every file the stored coverage depends on."""
    return {name: hashlib.sha256((HERE / name).read_bytes()).hexdigest() for name in [*PIPELINE, *TESTS, *DATA]}


def measure() -> dict:
    import coverage

    with tempfile.TemporaryDirectory(prefix="testml-coverage-") as scratch:
        work = Path(scratch)
        for name in [*PIPELINE, *TESTS, *DATA]:
            shutil.copy(HERE / name, work / name)
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
        run = [sys.executable, "-m", "coverage", "run", "--branch", f"--include={','.join(PIPELINE)}",
               "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS]
        done = subprocess.run(run, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"the suite failed under coverage:\n{done.stdout[-3000:]}")
        subprocess.run([sys.executable, "-m", "coverage", "json", "-o", "coverage.json"], cwd=work, check=True,
                       capture_output=True, timeout=120)
        report = json.loads((work / "coverage.json").read_text())
    files = {}
    for name, data in sorted(report["files"].items()):
        summary = data["summary"]
        files[Path(name).name] = {"statements": summary["num_statements"], "missing_lines": data["missing_lines"],
                                  "branches": summary["num_branches"], "missing_branches": summary["missing_branches"],
                                  "percent": summary["percent_covered"]}
    return {
        "made_by": Path(__file__).name,
        "made": {"command": " ".join(["python -m coverage", *run[3:]]), "coverage": coverage.__version__,
                 "python": sys.version.split()[0],
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "settings": {"pipeline": PIPELINE, "tests": TESTS, "sha256": source_hashes()},
        "total_percent": report["totals"]["percent_covered"], "files": files,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the pipeline's tests under coverage.py once; store the result.")
    parser.add_argument("--check", action="store_true", help="compare the stored hashes with the current files")
    args = parser.parse_args()
    if args.check:
        stale = [name for name, digest in json.loads(STORED.read_text())["settings"]["sha256"].items()
                 if source_hashes().get(name) != digest]
        print(json.dumps({"stored": STORED.name, "stale": stale}))
        sys.exit(1 if stale else 0)
    result = measure()
    STORED.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"written": STORED.name, "total_percent": result["total_percent"]}))


if __name__ == "__main__":
    main()
