"""Chapter 04's companion code: the planted bugs and the runner that shows the tests catching them.

The pipeline's own tests (``notebooks/04-test-ml-code/test_testml_*.py``) run in this same pytest
session. This file protects what the chapter relies on to demonstrate them: every bug still applies
to the current pipeline, the runner reads pytest's report correctly, the bad tests stay out of the
repository's run, and, in one real process, a planted bug makes its test fail while the pipeline's
files stay untouched.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import NOTEBOOKS, load_module

CHAPTER = NOTEBOOKS / "04-test-ml-code"
bugs = load_module(CHAPTER / "testml_bugs.py")
reference = load_module(CHAPTER / "testml_reference.py")
mutation = load_module(CHAPTER / "testml_mutation.py")
coverage_script = load_module(CHAPTER / "testml_coverage.py")


@pytest.mark.parametrize("bug", bugs.BUGS, ids=lambda bug: bug.name)
def test_every_bug_still_applies_as_a_one_line_change(bug, tmp_path):
    shutil.copy(CHAPTER / bug.file, tmp_path / bug.file)
    diff = bug.plant(tmp_path).splitlines()
    removed = [line for line in diff if line.startswith("-") and not line.startswith("---")]
    added = [line for line in diff if line.startswith("+") and not line.startswith("+++")]
    assert len(removed) == len(added) == 1 and bug.fixed in removed[0] and bug.buggy in added[0]
    assert bug.caught_by in bugs.KINDS[bug.kind], f"{bug.name} is meant for a {bug.kind} test"


def test_planting_refuses_a_bug_whose_line_is_gone(tmp_path):
    (tmp_path / "testml_data.py").write_text("def load_table():\n    return None\n")
    with pytest.raises(ValueError, match="exactly once"):
        bugs.BUG_BY_NAME["fill_zero"].plant(tmp_path)


def test_every_real_test_has_a_kind_and_the_bad_tests_are_not_collected():
    found = {node.name for name in bugs.TESTS for node in ast.walk(ast.parse((CHAPTER / name).read_text()))
             if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}
    kinds = [name for names in bugs.KINDS.values() for name in names]
    assert sorted(found) == sorted(kinds)
    assert not bugs.BAD_TESTS[0].startswith("test_") and bugs.BAD_TESTS[1].startswith("test_")


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
<testcase classname="test_testml_code" name="test_a" time="0.1"/>
<testcase classname="test_testml_code" name="test_b" time="0.1"><failure message="boom">x</failure></testcase>
<testcase classname="test_testml_model" name="test_c" time="0.1"><error message="fixture">y</error></testcase>
<testcase classname="test_testml_bad" name="test_d" time="0.1"><skipped message="why"/></testcase>
</testsuite></testsuites>"""

OUTPUT = """.F
=================================== FAILURES ===================================
____________________________________ test_b ____________________________________
test_testml_code.py:3: in test_b
    assert x == 1
E   assert 2 == 1
E    +  where 2 = f()
___________________________________ test_c ____________________________________
other
=========================== short test summary info ============================
1 failed, 1 passed, 1 error, 1 skipped in 3.21s
"""


def test_runner_reads_outcomes_failures_and_summary(tmp_path):
    (tmp_path / "report.xml").write_text(JUNIT)
    outcomes, modules = bugs.read_junit(tmp_path / "report.xml")
    assert outcomes == {"test_a": "passed", "test_b": "failed", "test_c": "error", "test_d": "skipped"}
    result = bugs.SuiteResult(outcomes, modules, OUTPUT, "")
    assert result.tests() == ["test_a", "test_b", "test_c"] and result.tests(bad=True) == ["test_d"]
    assert result.names("failed") == ["test_b"] and result.count("skipped", bad=None) == 1
    assert result.failure("test_b").splitlines()[-1] == "E   assert 2 == 1"  # "+ where" dropped
    assert result.summary() == "1 failed, 1 passed, 1 error, 1 skipped"


def test_list_names_every_bug():
    done = subprocess.run([sys.executable, str(CHAPTER / "testml_bugs.py"), "--list"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    *table, last = done.stdout.splitlines()
    assert [line.split()[0] for line in table] == [bug.name for bug in bugs.BUGS]
    assert json.loads(last) == {"bugs": [bug.name for bug in bugs.BUGS]}


@pytest.mark.slow
def test_a_planted_bug_fails_its_test_in_a_real_pytest_process():
    bug = bugs.BUG_BY_NAME["batch_median"]
    done = subprocess.run([sys.executable, str(CHAPTER / "testml_bugs.py"), "--bug", bug.name, "-m", "not slow",
                           "--no-bad-tests"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["failed"] == [bug.caught_by] and report["passed"] > 20
    assert (CHAPTER / bug.file).read_text().count(bug.fixed) == 1, "the planted bug leaked into the real file"


def stored_reference() -> dict:
    return json.loads(reference.STORED.read_text())


def test_stored_reference_was_made_by_the_current_script_settings():
    stored = stored_reference()
    assert stored["made_by"] == "testml_reference.py" and {"date", "torch", "cpu_capability"} <= set(stored["made"])
    assert stored["settings"] == json.loads(json.dumps(reference.settings())), "rerun testml_reference.py"
    maes = stored["reference"]["mae_g"]
    assert len(maes) == len(stored["settings"]["reference_seeds"]) >= 30
    assert stored["reference"]["mean_g"] == pytest.approx(np.mean(maes), rel=1e-12)
    assert stored["reference"]["sd_g"] == pytest.approx(np.std(maes, ddof=1), rel=1e-12)
    assert (stored["test_seeds"], stored["z"]) == (stored["settings"]["test_seeds"], stored["settings"]["z"])


def test_the_stored_test_catches_the_planted_regression_for_every_seed_set():
    power = stored_reference()["power"]
    assert power["of"] == len(stored_reference()["settings"]["book_seeds"]) >= 20
    assert power["caught_bug"] == power["passed_clean"] == power["of"], power
    assert power["smallest_bug_margin_g"] > 0 and power["smallest_clean_margin_g"] > 0


def test_power_by_k_counts_groups_that_pass_and_groups_that_catch():
    runs = [{"clean_mae_g": [0.0, 0.0, 0.0, 3.0], "bug_mae_g": [5.0, 5.0, 0.0, 0.0]}]
    rows = reference.power_by_k(runs, mean=0.0, sd=1.0, n_reference=10**12, z=2.0, ks=[1, 2, 4])
    got = {row["k"]: (row["groups"], row["false_alarms"], row["caught_bug"]) for row in rows}
    assert got == {1: (4, 1, 2), 2: (2, 1, 1), 4: (1, 0, 1)}  # tolerances 2, 1.41 and 1 (the reference exact)


def test_stored_power_by_k_follows_from_the_stored_maes():
    stored = stored_reference()
    ref = stored["reference"]
    again = reference.power_by_k(stored["power"]["runs"], ref["mean_g"], ref["sd_g"], len(ref["mae_g"]),
                                 stored["z"], stored["settings"]["power_ks"])
    assert again == stored["power_by_k"]


def test_stored_mutation_outcome_is_of_the_current_files():
    stored = json.loads(mutation.STORED.read_text())
    assert stored["made_by"] == "testml_mutation.py"
    assert {"command", "mutmut", "torch", "python", "cpu_capability", "date"} <= set(stored["made"])
    stale = [name for name, digest in stored["settings"]["sha256"].items() if mutation.source_hashes()[name] != digest]
    assert not stale, f"{stale} changed since testml_mutation.py ran: rerun it"
    assert sum(stored["counts"].values()) == len(stored["mutants"]) > 20
    assert all(m["removed"] and m["added"] and m["status"] in stored["counts"] for m in stored["mutants"])


def test_stored_coverage_is_of_the_current_files():
    stored = json.loads(coverage_script.STORED.read_text())
    assert stored["made_by"] == "testml_coverage.py" and {"command", "coverage", "python", "date"} <= set(stored["made"])
    stale = [name for name, digest in stored["settings"]["sha256"].items()
             if coverage_script.source_hashes()[name] != digest]
    assert not stale, f"{stale} changed since testml_coverage.py ran: rerun it"
    assert sorted(stored["files"]) == sorted(coverage_script.PIPELINE) and 0 < stored["total_percent"] <= 100


def test_a_stored_mutant_applies_inside_its_function_only():
    source = (CHAPTER / "testml_features.py").read_text()
    mutant = {"name": "testml_features.xǁPreprocessorǁscale__mutmut_1", "function": "Preprocessor.scale",
              "removed": ["values = self.measurements(frame)"], "added": ["values = None"]}
    mutated = mutation.apply(mutant, source)  # the same line is in fit too: only scale's may change
    assert mutated.count("values = self.measurements(frame)") == 1 and mutated.count("values = None") == 1
    assert mutation.line_of(mutant, source) > mutation.line_of({**mutant, "function": "Preprocessor.fit"}, source)
    with pytest.raises(ValueError, match="exactly once"):
        mutation.apply({**mutant, "removed": ["no such line"]}, source)


def test_mutation_check_names_a_changed_file(tmp_path, monkeypatch, capsys):
    for name in mutation.source_hashes():
        shutil.copy(CHAPTER / name, tmp_path / name)
    (tmp_path / "testml_metrics.py").write_text((tmp_path / "testml_metrics.py").read_text() + "\n# edited\n")
    monkeypatch.setattr(mutation, "HERE", tmp_path)
    monkeypatch.setattr(sys, "argv", ["testml_mutation.py", "--check"])
    with pytest.raises(SystemExit) as exit_info:
        mutation.main()
    assert exit_info.value.code == 1 and json.loads(capsys.readouterr().out)["stale"] == ["testml_metrics.py"]


def test_check_fails_when_a_setting_changed(monkeypatch, capsys):
    monkeypatch.setattr(reference, "Z", reference.Z + 1)
    monkeypatch.setattr(sys, "argv", ["testml_reference.py", "--check"])
    with pytest.raises(SystemExit) as exit_info:
        reference.main()
    assert exit_info.value.code == 1 and json.loads(capsys.readouterr().out)["settings_match"] is False


@pytest.mark.slow
def test_stored_maes_reproduce_on_this_machine():
    """A pipeline change that moves the MAE makes the golden number stale; CPUs differ by ~1e-5 g."""
    sys.path.insert(0, str(CHAPTER))  # the pipeline's modules, as its own tests import them
    from testml_data import TARGET, load_table, split
    from testml_metrics import mean_absolute_error
    from testml_model import fit

    train, test = split(load_table())
    stored = stored_reference()["reference"]["mae_g"]
    for seed in stored_reference()["settings"]["reference_seeds"][:3]:
        mae = mean_absolute_error(test[TARGET], fit(train, seed=seed).predict(test))
        assert abs(mae - stored[seed]) < 0.5, f"seed {seed}: {mae:.3f} g, stored {stored[seed]:.3f} g: rerun the script"
