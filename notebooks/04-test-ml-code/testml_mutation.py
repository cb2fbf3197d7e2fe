"""Run mutation testing (mutmut) once on two pipeline modules and store every mutant's fate.

Why a file: mutmut rewrites the code under test hundreds of ways, runs the tests against each
version in its own forked process and needs a scratch copy of the folder to do it in. That takes
about a minute, too long for every build of the chapter, so this script runs it once and stores the
outcome in ``testml_mutation.json`` with how it was made (command, mutmut, torch and Python versions,
CPU capability, date, and the SHA-256 of every file mutated or tested). The chapter reads the stored
file, refuses it when a hashed file changed since, and re-runs two of the stored mutants in-process
as a spot check. ``tests/test_04_test_ml_code.py`` runs the same staleness check.

mutmut is a development tool, not part of the book's lock. Launch from this folder (CPU only):

    pip install mutmut==3.8.1
    python testml_mutation.py            # run mutmut on a scratch copy, write testml_mutation.json
    python testml_mutation.py --check    # only compare the stored hashes with the files as they are
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STORED = HERE / "testml_mutation.json"
MUTATED = ["testml_metrics.py", "testml_features.py"]  # small modules whose tests need no training
TESTS = ["test_testml_code.py"]  # the unit and property tests written for them
COPIED = ["testml_data.py", "testml_model.py", "pytest.ini"]  # imported by the tests, never mutated
MUTMUT = "3.8.1"


def source_hashes() -> dict[str, str]:
    """SHA-256 of every file the stored outcome depends on: change one and the outcome is stale."""
    return {name: hashlib.sha256((HERE / name).read_bytes()).hexdigest() for name in [*MUTATED, *TESTS, *COPIED]}


def stale_files(digests: dict[str, str]) -> list[str]:
    """The files of this folder whose SHA-256 is no longer the stored one (any stored hash table)."""
    return [name for name, digest in digests.items()
            if not (HERE / name).exists() or hashlib.sha256((HERE / name).read_bytes()).hexdigest() != digest]


def mutmut(args: list[str], cwd: Path) -> str:
    """One mutmut command in ``cwd``; its standard output (the progress spinner goes to the log only)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"mutmut {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def changed_lines(diff: str) -> tuple[list[str], list[str]]:
    """The removed and added lines of a unified diff, without the file headers, stripped."""
    lines = diff.splitlines()
    removed = [line[1:].strip() for line in lines if line.startswith("-") and not line.startswith("---")]
    added = [line[1:].strip() for line in lines if line.startswith("+") and not line.startswith("+++")]
    return removed, added


def measure() -> dict:
    import mutmut as mutmut_package
    import torch

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="testml-mutation-") as scratch:
        work = Path(scratch)
        for name in [*MUTATED, *TESTS, *COPIED]:
            shutil.copy(HERE / name, work / name)
        (work / "setup.cfg").write_text(
            "[mutmut]\nsource_paths =\n" + "".join(f"    {name}\n" for name in MUTATED)
            + "pytest_add_cli_args_test_selection =\n" + "".join(f"    {name}\n" for name in TESTS)
            + "also_copy =\n" + "".join(f"    {name}\n" for name in COPIED))
        mutmut(["run", "--max-children", "2"], work)
        statuses = re.findall(r"^\s+(\S+): (.+)$", mutmut(["results", "--all", "true"], work), re.M)
        mutants = []
        for name, status in statuses:
            removed, added = changed_lines(mutmut(["show", name], work))
            function = re.match(r"^[^.]+\.x[_ǁ](.+?)__mutmut_\d+$", name).group(1).replace("ǁ", ".")
            mutants.append({"name": name, "function": function, "status": status.strip(),
                            "removed": removed, "added": added})
    counts: dict[str, int] = {}
    for mutant in mutants:
        counts[mutant["status"]] = counts.get(mutant["status"], 0) + 1
    return {
        "made_by": Path(__file__).name,
        "made": {"command": f"python {Path(__file__).name}", "mutmut": mutmut_package.__version__
                 if hasattr(mutmut_package, "__version__") else MUTMUT, "torch": torch.__version__,
                 "python": sys.version.split()[0], "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "seconds": round(time.perf_counter() - started, 1)},
        "settings": {"mutated": MUTATED, "tests": TESTS, "copied": COPIED, "sha256": source_hashes()},
        "counts": counts, "mutants": mutants,
    }


def line_of(mutant: dict, text: str) -> int:
    """The 1-based line of the module's source where the mutant's change starts."""
    return _locate(mutant, text)[0] + 1


def apply(mutant: dict, text: str) -> str:
    """The module's source with the mutant's lines in place of the original ones, inside its function only."""
    start, lines = _locate(mutant, text)
    indent = lines[start][: len(lines[start]) - len(lines[start].lstrip())]
    lines[start:start + len(mutant["removed"])] = [indent + line + "\n" for line in mutant["added"]]
    return "".join(lines)


def _locate(mutant: dict, text: str) -> tuple[int, list[str]]:
    import ast

    *owner, name = mutant["function"].split(".")
    scope = ast.parse(text)
    for part in owner:  # a method: look inside its class
        scope = next(node for node in scope.body if isinstance(node, ast.ClassDef) and node.name == part)
    function = next(node for node in scope.body if isinstance(node, ast.FunctionDef) and node.name == name)
    lines = text.splitlines(keepends=True)
    removed, n = mutant["removed"], len(mutant["removed"])
    starts = [i for i in range(function.lineno - 1, function.end_lineno - n + 1)
              if [line.strip() for line in lines[i:i + n]] == removed]
    if len(starts) != 1:
        raise ValueError(f"{mutant['name']}: its lines are not in {mutant['function']} exactly once; rerun the script")
    return starts[0], lines


def rerun_in_process(mutant: dict, tables) -> tuple[str, list[str]]:
    """Re-run one stored mutant without mutmut: patch its line into the module, call the tests directly.

    The mutated module replaces the real one inside ``test_testml_code``'s namespace only; each test
    function is called with the fixtures it names, built here. Returns the mutant's status as mutmut
    spells it ("killed" or "survived") and the tests that failed.
    """
    import importlib
    import inspect
    import types

    import pytest
    import torch

    module_name = mutant["name"].split(".")[0]
    mutated = types.ModuleType(f"{module_name}_mutant")
    exec(compile(apply(mutant, (HERE / f"{module_name}.py").read_text()), f"{module_name}.py (mutant)", "exec"),
         mutated.__dict__)
    tests = importlib.import_module(TESTS[0].removesuffix(".py"))
    patched = {name: getattr(mutated, name) for name in ("Preprocessor", "mean_absolute_error")
               if hasattr(mutated, name)}
    saved = {name: getattr(tests, name) for name in patched}
    failed = []
    try:
        vars(tests).update(patched)
        def untrained():  # the module's fixture: a seeded, untrained model around a fitted preprocessor
            pre = tests.Preprocessor().fit(tables[0])
            torch.manual_seed(0)
            return tests.MassModel(pre, tests.make_net(pre.n_features), 4000.0, 800.0)

        fixtures = {"tables": lambda: tables, "untrained": untrained}
        for name, test in list(vars(tests).items()):
            if name.startswith("test_") and callable(test):
                wanted = [p for p in inspect.signature(test).parameters if p in fixtures]
                try:  # a fixture that crashes under the mutant is an error, which catches it too
                    test(**{p: fixtures[p]() for p in wanted})
                except (Exception, pytest.fail.Exception):  # a failed assert, pytest.raises or a crash
                    failed.append(name)
    finally:
        vars(tests).update(saved)
    return ("killed" if failed else "survived"), failed


def main() -> None:
    parser = argparse.ArgumentParser(description="Run mutmut once on the pipeline and store the outcome.")
    parser.add_argument("--check", action="store_true", help="compare the stored hashes with the current files")
    args = parser.parse_args()
    if args.check:
        stale = stale_files(json.loads(STORED.read_text())["settings"]["sha256"])
        print(json.dumps({"stored": STORED.name, "stale": stale}))
        sys.exit(1 if stale else 0)
    result = measure()
    STORED.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps({"written": STORED.name, "counts": result["counts"], "seconds": result["made"]["seconds"]}))


if __name__ == "__main__":
    main()
