"""Planted bugs for chapter 04 (Test ML code), and the runner that shows which tests catch them.

Why a file: the chapter and the reader run the test suite as its own process, exactly as a developer
would (``python -m pytest``), against a copy of the pipeline into which one bug has been planted.
Each bug is a small, realistic edit to one pipeline file, kept here as text (the fixed line and the
buggy line), never as importable code: the files in this folder are never modified, so the
repository's own test run cannot see a planted bug. If the pipeline changes so that a fixed line is
no longer found, planting fails loudly instead of testing nothing.

Launch from this folder (CPU only; each run takes seconds):

    python testml_bugs.py --list
    python testml_bugs.py --bug unshuffled_split
    python testml_bugs.py --bug short_training -m "not slow"
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PIPELINE = ["testml_data.py", "testml_features.py", "testml_metrics.py", "testml_model.py"]
TESTS = ["test_testml_code.py", "test_testml_data.py", "test_testml_model.py"]
DATA = ["testml_reference.json", "pytest.ini"]  # the regression test's stored reference; the marker
BAD_TESTS = ("testml_bad_tests.py", "test_testml_bad.py")  # copied under a name pytest collects


@dataclass(frozen=True)
class Bug:
    name: str
    kind: str  # the kind of test written to catch it
    caught_by: str  # the test that must fail
    file: str
    fixed: str
    buggy: str
    story: str

    def plant(self, folder: Path) -> str:
        """Apply the bug to ``folder/file``; return the unified diff."""
        path = folder / self.file
        text = path.read_text()
        if text.count(self.fixed) != 1:
            raise ValueError(f"{self.name}: the fixed text is not in {self.file} exactly once; update the bug")
        path.write_text(text.replace(self.fixed, self.buggy))
        lines = difflib.unified_diff(text.splitlines(True), path.read_text().splitlines(True),
                                     f"a/{self.file}", f"b/{self.file}", n=1)
        return "".join(line for line in lines if not line.startswith("@@"))


BUGS = [
    Bug("batch_median", "unit", "test_a_missing_value_is_filled_with_the_training_median", "testml_features.py",
        "values = np.where(np.isnan(values), self.medians_, values)",
        "values = np.where(np.isnan(values), np.nanmedian(values, axis=0), values)",
        "missing values are filled with the median of the batch being transformed, not of the training rows"),
    Bug("zero_scale", "property", "test_unscale_inverts_scale", "testml_features.py",
        "self.scales_ = np.where(std > 0, std, 1.0)  # a constant column is centred, not divided by 0",
        "self.scales_ = std",
        "standardisation divides by the standard deviation, which is 0 for a constant column"),
    Bug("fill_zero", "data", "test_table_matches_the_schema", "testml_data.py",
        "table = raw.dropna(subset=[TARGET])",
        "table = raw.fillna({column: 0.0 for column in [*NUMERIC, TARGET]})  # the model cannot take NaN",
        "missing measurements are written as 0 so that nothing downstream sees a NaN"),
    Bug("unshuffled_split", "data", "test_test_split_looks_like_the_training_split", "testml_data.py",
        "shuffled = table.sample(frac=1.0, random_state=seed)",
        "shuffled = table  # the rows are in random order already",
        "the split takes the first rows as the test set, and the table is sorted by species"),
    Bug("positional_columns", "behaviour", "test_column_order_does_not_change_predictions", "testml_features.py",
        "return frame[self.numeric].to_numpy(dtype=float)",
        "return frame.iloc[:, 2:5].to_numpy(dtype=float)  # bill length, bill depth, flipper length",
        "the measurements are picked by position, which is right only while the columns keep their order"),
    Bug("broadcast_loss", "smoke", "test_a_single_batch_can_be_overfit", "testml_model.py",
        "loss = F.mse_loss(net(x[batch]).squeeze(-1), y[batch])",
        "loss = F.mse_loss(net(x[batch]), y[batch])",
        "the loss compares an (n, 1) output with an (n,) target, which broadcasts to (n, n)"),
    Bug("refit_on_request", "skew", "test_saved_and_served_model_predicts_what_the_trained_one_does",
        "testml_model.py",
        "return model.predict(frame).tolist()",
        "return model.predict_features(Preprocessor().fit(frame).transform(frame)).tolist()",
        "the serving path preprocesses each request with statistics fitted on the request itself"),
    Bug("short_training", "regression", "test_test_mae_stays_within_seed_noise", "testml_model.py",
        "epochs: int = 40,",
        "epochs: int = 10,  # 4x faster CI",
        "the default number of epochs is cut to make the test suite faster"),
]
BUG_BY_NAME = {bug.name: bug for bug in BUGS}

# The kind of every real test, for the chapter's summary of which kind caught which bug.
KINDS = {
    "unit": ["test_transform_has_one_float32_row_per_input_row",
             "test_transform_introduces_no_nan_for_missing_or_unknown_values",
             "test_a_missing_value_is_filled_with_the_training_median", "test_transform_never_refits",
             "test_mae_refuses_arrays_of_different_shapes"],
    "property": ["test_unscale_inverts_scale", "test_mae_is_bounded_symmetric_and_zero_on_a_perfect_fit",
                 "test_permuting_rows_permutes_predictions"],
    "data": ["test_table_matches_the_schema", "test_schema_names_the_rows_that_break_it",
             "test_split_is_disjoint_and_complete", "test_test_split_looks_like_the_training_split",
             "test_drift_check_flags_a_shifted_batch"],
    "behaviour": ["test_column_order_does_not_change_predictions",
                  "test_columns_the_model_does_not_use_do_not_change_predictions",
                  "test_a_row_gets_the_same_prediction_alone_or_in_a_batch",
                  "test_males_are_predicted_heavier_than_otherwise_identical_females",
                  "test_longer_flippers_predict_more_mass", "test_typical_penguins_are_predicted_near_their_group",
                  "test_every_species_is_predicted_better_than_its_own_mean"],
    "smoke": ["test_loss_decreases_on_a_tiny_batch", "test_a_single_batch_can_be_overfit",
              "test_training_is_deterministic_under_a_seed"],
    "skew": ["test_saved_and_served_model_predicts_what_the_trained_one_does",
             "test_one_request_alone_gets_the_batch_prediction", "test_serving_names_the_missing_field"],
    "regression": ["test_test_mae_stays_within_seed_noise"],
}


@dataclass
class SuiteResult:
    outcomes: dict[str, str]  # test function name -> "passed", "failed", "error" or "skipped"
    modules: dict[str, str]  # test function name -> the test file it is in, without ".py"
    output: str  # what pytest printed
    diff: str  # the planted bug, as a unified diff ("" for the clean pipeline)

    def tests(self, *, bad: bool | None = False) -> list[str]:
        """The real tests (default), the bad ones (``bad=True``) or all of them (``bad=None``)."""
        return [name for name, module in self.modules.items()
                if bad is None or bad == (module == Path(BAD_TESTS[1]).stem)]

    def names(self, outcome: str, *, bad: bool | None = False) -> list[str]:
        """The tests among ``self.tests(bad=bad)`` whose outcome is ``outcome``."""
        return [name for name in self.tests(bad=bad) if self.outcomes[name] == outcome]

    def count(self, outcome: str, *, bad: bool | None = False) -> int:
        return len(self.names(outcome, bad=bad))

    def failure(self, test: str, max_lines: int = 30) -> str:
        """The short traceback pytest printed for ``test``, without its "+ where" explanations, trimmed."""
        lines = self.output.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("_") and line.strip("_ ") == test)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(("___", "==="))), len(lines))
        block = [line for line in lines[start:end] if not line.startswith("E    +")]
        more = [f"... ({len(block) - max_lines} more lines)"] if len(block) > max_lines else []
        return "\n".join(block[:max_lines] + more)

    def summary(self) -> str:
        """pytest's last line, without the timing: "1 failed, 28 passed"."""
        last = self.output.strip().splitlines()[-1].strip("= ")
        return last.rsplit(" in ", 1)[0]


def read_junit(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(test name -> outcome, test name -> module) from pytest's ``--junitxml`` report."""
    outcomes, modules = {}, {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name")
        if name in outcomes:
            raise ValueError(f"two tests are named {name}; the chapter keys results by name")
        tags = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[name] = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(tags[0] if tags else "", "passed")
        modules[name] = case.get("classname").rsplit(".", 1)[-1]
    return outcomes, modules


def run_suite(workdir: Path, bug: str | None = None, *, bad_tests: bool = True, marks: str | None = None,
              timeout: float = 300) -> SuiteResult:
    """Copy the pipeline and its tests into ``workdir``, plant ``bug``, run pytest there in a new process.

    ``workdir`` may be reused: every pipeline and test file is copied afresh (so the previous bug is
    gone), while files the tests write themselves, like the recorded snapshot, stay, as they would
    in a working copy.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for name in [*PIPELINE, *TESTS, *DATA]:
        shutil.copy(HERE / name, workdir / name)
    (workdir / BAD_TESTS[1]).unlink(missing_ok=True)
    if bad_tests:
        shutil.copy(HERE / BAD_TESTS[0], workdir / BAD_TESTS[1])
    diff = BUG_BY_NAME[bug].plant(workdir) if bug else ""
    report = workdir / "report.xml"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "--tb=short", "--color=no", "-p", "no:cacheprovider", f"--junitxml={report}"]
    cmd += ["-m", marks] if marks else []
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    if not report.exists():
        raise RuntimeError(f"pytest did not run (exit {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return SuiteResult(*read_junit(report), done.stdout + done.stderr, diff)


def run_suites(workdir: Path, bugs: list[str], *, start_from: Path, workers: int = 2) -> dict[str, SuiteResult]:
    """``run_suite`` once per bug, each in ``workdir/<bug>``, a copy of ``start_from``, ``workers`` at a time.

    Copying the folder of an earlier run keeps what its tests wrote (the recorded snapshot), so each
    bug meets the suite as it would in a working copy; each run is its own pytest process.
    """
    from concurrent.futures import ThreadPoolExecutor

    def one(bug: str) -> SuiteResult:
        shutil.copytree(start_from, Path(workdir) / bug)
        return run_suite(Path(workdir) / bug, bug)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(bugs, pool.map(one, bugs)))


def main() -> None:
    parser = argparse.ArgumentParser(description="Run chapter 04's tests against a planted bug.")
    parser.add_argument("--list", action="store_true", help="list the planted bugs and exit")
    parser.add_argument("--bug", choices=sorted(BUG_BY_NAME), help="the bug to plant (default: none)")
    parser.add_argument("-m", dest="marks", help='pytest marker expression, e.g. "not slow"')
    parser.add_argument("--no-bad-tests", action="store_true", help="leave out the three bad tests")
    args = parser.parse_args()
    if args.list:
        for bug in BUGS:
            print(f"{bug.name:20} {bug.kind:11} {bug.story}")
        print(json.dumps({"bugs": [bug.name for bug in BUGS]}))
        return
    with tempfile.TemporaryDirectory(prefix="testml-") as scratch:
        result = run_suite(Path(scratch), args.bug, bad_tests=not args.no_bad_tests, marks=args.marks)
    print(result.diff + result.output)
    print(json.dumps({"bug": args.bug, "failed": result.names("failed", bad=None) + result.names("error", bad=None),
                      "passed": result.count("passed", bad=None), "summary": result.summary()}))


if __name__ == "__main__":
    main()
