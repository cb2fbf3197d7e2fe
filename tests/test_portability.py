"""The portability matrix: the whole book executes, and every assert holds, on other kernels and seeds.

The unit tests check that the matrix tests what it names (an environment variable that silently
took no effect would make a cell a copy of the native build). The ``matrix`` tests execute every
notebook page under each cell that CI runs (``tests/portability.CI_CELLS``), after the full native
book build; each cell takes minutes. One cell by hand: ``.venv/bin/python tests/portability.py CELL``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, notebook_docs

sys.path.insert(0, str(ROOT / "tests"))
import portability  # noqa: E402


def test_ci_cells_change_the_kernels_and_the_seed():
    for name in portability.CI_CELLS:
        env = portability.CELLS[name]
        assert env["ATEN_CPU_CAPABILITY"] in {"default", "avx2"}, name
        assert env["OPENBLAS_CORETYPE"] and env["ONEDNN_MAX_CPU_ISA"], name
        assert env["GRADIENT_RAGE_SEED"] != "0", f"{name} must run another seed than the published one"
    seeds = [portability.CELLS[n]["GRADIENT_RAGE_SEED"] for n in portability.CI_CELLS]
    capabilities = [portability.CELLS[n]["ATEN_CPU_CAPABILITY"] for n in portability.CI_CELLS]
    assert len(set(seeds)) == len(seeds) >= 2 and len(set(capabilities)) == len(capabilities) >= 2


def test_a_cell_whose_variables_took_no_effect_is_refused():
    env = {"ATEN_CPU_CAPABILITY": "avx2", "OPENBLAS_CORETYPE": "Haswell"}
    assert portability.check_effective(env, {"torch_capability": "AVX2", "openblas": ["Haswell"]}) == []
    problems = portability.check_effective(env, {"torch_capability": "AVX512", "openblas": ["SkylakeX"]})
    assert len(problems) == 2 and "AVX512" in problems[0] and "SkylakeX" in problems[1]


def test_the_probe_sees_a_forced_kernel_level():
    """The variables reach a fresh process: the same path the chapters' kernels take."""
    done = subprocess.run([sys.executable, "-c", portability.PROBE], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "ATEN_CPU_CAPABILITY": "default"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1])["torch_capability"] == "DEFAULT"


def test_a_glued_numpy_scalar_is_found_without_rendering():
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import numpy as np\nfrom myst_nb import glue\n"
        "glue('bad', np.float64(1.5), display=False)\nglue('good', float(np.float64(1.5)), display=False)")])
    NotebookClient(notebook, timeout=60, kernel_name="python3").execute()
    assert portability.numpy_glued(notebook) == ["bad"]


def test_page_selection_follows_the_toc():
    assert portability.select_pages([]) == notebook_docs()
    assert portability.select_pages(["02"]) == ["notebooks/02-train-models/02-train-models"]
    with pytest.raises(SystemExit, match="no notebook page matches"):
        portability.select_pages(["no-such-chapter"])


def test_summaries_print_as_ci_reports_them(tmp_path):
    summary = {"cell": "avx2-seed2", "pages": 12, "seconds": 508.2, "failed": []}
    (tmp_path / "a.json").write_text(json.dumps(summary))
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "portability.py"), "--summarize",
                           str(tmp_path / "a.json")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "matrix cell avx2-seed2: 12 pages in 508.2 s, failed none"


@pytest.mark.matrix
@pytest.mark.parametrize("cell", portability.CI_CELLS)
def test_book_executes_in_matrix_cell(cell, tmp_path):
    out = ROOT / "_build" / "portability"
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "portability.py"), cell],
                          capture_output=True, text=True, timeout=40 * 60, cwd=ROOT)
    (out / f"{cell}.log").write_text(done.stdout + done.stderr)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    summary = json.loads(lines[-1]) if lines else {}
    (out / f"{cell}.json").write_text(json.dumps(summary, indent=1))
    print(f"matrix cell {cell}: {summary.get('seconds')} s, per page {summary.get('per_page_s')}")
    assert done.returncode == 0 and summary.get("failed") == [], (
        f"matrix cell {cell} ({summary.get('env')}) failed pages {summary.get('failed')}:\n"
        + "\n".join(line for line in done.stdout.splitlines() if not line.startswith("{"))[-6000:]
        + f"\nstderr tail:\n{done.stderr[-2000:]}")
