"""The portability matrix: execute the book's notebooks as another reader's machine would.

Why this exists: the book was once green here and broken on a reader's CPU, because an assert
rested on a close call that different floating-point rounding flipped. Another instruction set,
another BLAS kernel and another seed each change the bits; every assert in the book must survive
all of them. This script executes every notebook page of the book (or the ones named) without
rendering HTML, one page at a time, in the page's own folder, under one cell of the matrix:

    .venv/bin/python tests/portability.py --list                 # the cells and what each sets
    .venv/bin/python tests/portability.py default-seed1          # one cell, every page
    .venv/bin/python tests/portability.py avx2-seed2 --pages 02 06   # one cell, two chapters
    .venv/bin/python tests/portability.py native --load 2        # under load: 2 busy processes

A cell sets PyTorch's kernel level (``ATEN_CPU_CAPABILITY``), oneDNN's (``ONEDNN_MAX_CPU_ISA``),
MKL's (``MKL_ENABLE_INSTRUCTIONS``), the OpenBLAS core type NumPy, SciPy and scikit-learn use
(``OPENBLAS_CORETYPE``) and the book's seed (``GRADIENT_RAGE_SEED``). ``--load N`` starts N
CPU-bound processes for the whole run, the stand-in for a reader's laptop with a browser open or
a shared Binder node; they are stopped when the run ends, whatever happens.

It prints one line per page and ends with one JSON object (cell, pages, seconds, failures); the
exit status is 1 if any page failed. The failing cell's source and error are printed, so a reader
on an unusual machine can tell a regression from a close call. ``tests/test_portability.py`` runs
the cells in the test suite.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: name -> environment. "native" changes nothing but the seed (the full book build runs it).
CELLS: dict[str, dict[str, str]] = {
    "native": {},
    "native-seed1": {"GRADIENT_RAGE_SEED": "1"},
    "default-seed1": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                      "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "OPENBLAS_CORETYPE": "Nehalem",
                      "GRADIENT_RAGE_SEED": "1"},
    "avx2-seed2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                   "MKL_ENABLE_INSTRUCTIONS": "AVX2", "OPENBLAS_CORETYPE": "Haswell",
                   "GRADIENT_RAGE_SEED": "2"},
}

#: What CI runs after the full native build (see .ci/run and tests/test_portability.py).
CI_CELLS = ("default-seed1", "avx2-seed2")


def _burn() -> None:  # pragma: no cover - runs in a child process until terminated
    while True:
        pass


def select_pages(wanted: list[str]) -> list[str]:
    """Notebook pages of the TOC, in reading order; ``wanted`` filters by chapter number or path part."""
    from conftest import notebook_docs

    pages = notebook_docs()
    if not wanted:
        return pages
    chosen = [p for p in pages if any(Path(p).name.startswith(w) or w in p for w in wanted)]
    if not chosen:
        raise SystemExit(f"no notebook page matches {wanted}; pages are: {pages}")
    return chosen


def execute_page(page: str, timeout: int = 600) -> dict:
    """Execute one page in its folder; return its record (ok, seconds, and the failing cell if any)."""
    import jupytext
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    path = ROOT / f"{page}.md"
    notebook = jupytext.read(path)
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    started = time.perf_counter()
    record = {"page": page, "ok": True}
    try:
        client.execute()
    except CellExecutionError as error:
        record.update(ok=False, error=str(error)[-3000:])
    except Exception as error:  # a kernel death or a timeout is a failure of the page, reported
        record.update(ok=False, error=f"{type(error).__name__}: {error}"[-3000:])
    record["seconds"] = round(time.perf_counter() - started, 1)
    numpy_glue = numpy_glued(notebook)
    if record["ok"] and numpy_glue:  # the HTML build would warn, and -W makes a warning an error
        record.update(ok=False, error=f"glued NumPy scalars (glue a Python float or int instead): {numpy_glue}")
    return record


def numpy_glued(notebook) -> list[str]:
    """Names of glued values whose text is a NumPy scalar's repr (``np.float64(3.0)``): myst-nb
    cannot format those, and the book build fails on its warning. Caught here, where pages run
    without rendering, so that a matrix run finds it before the build does."""
    found = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            record = output.get("metadata", {}).get("scrapbook", {})
            name, prefix = record.get("name"), record.get("mime_prefix", "")
            text = output.get("data", {}).get(f"{prefix}text/plain", "")
            if name and text.startswith("np."):
                found.append(name)
    return found


PROBE = """
import json, numpy, scipy.linalg, torch
from threadpoolctl import threadpool_info
print(json.dumps({"torch_capability": torch.backends.cpu.get_cpu_capability(),
                  "openblas": sorted({p.get("architecture") for p in threadpool_info()
                                      if p["internal_api"] == "openblas"})}))
"""


def effective_machine() -> dict:
    """What a kernel started now would compute with: PyTorch's kernel level and OpenBLAS's core type."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"the probe of the machine's kernels failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_effective(env: dict[str, str], seen: dict) -> list[str]:
    """Why the cell would not test what it says (an environment variable that took no effect)."""
    problems = []
    wanted = env.get("ATEN_CPU_CAPABILITY")
    if wanted and seen["torch_capability"].lower() != wanted.lower():
        problems.append(f"ATEN_CPU_CAPABILITY={wanted} but PyTorch runs {seen['torch_capability']}")
    wanted = env.get("OPENBLAS_CORETYPE")
    if wanted and seen["openblas"] and seen["openblas"] != [wanted]:
        problems.append(f"OPENBLAS_CORETYPE={wanted} but OpenBLAS runs {seen['openblas']}")
    return problems


def run(cell: str, pages: list[str], load: int = 0, timeout: int = 600) -> dict:
    env = CELLS[cell]
    os.environ.update(env)  # the kernels inherit it
    seen = effective_machine()
    problems = check_effective(env, seen)
    if problems:
        raise SystemExit(f"matrix cell {cell} would not test what it names: {'; '.join(problems)}")
    print(f"[{cell}] PyTorch kernels {seen['torch_capability']}, OpenBLAS {seen['openblas']}", flush=True)
    burners = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(load)]
    for burner in burners:
        burner.start()
    records = []
    started = time.perf_counter()
    try:
        for page in pages:
            record = execute_page(page, timeout)
            records.append(record)
            print(f"[{cell}{f' load {load}' if load else ''}] {'ok  ' if record['ok'] else 'FAIL'} "
                  f"{record['seconds']:7.1f} s  {page}", flush=True)
            if not record["ok"]:
                print(record["error"], flush=True)
    finally:
        for burner in burners:
            burner.terminate()
            burner.join(5)
    failed = [r["page"] for r in records if not r["ok"]]
    summary = {"cell": cell, "env": env, "effective": seen, "load": load, "pages": len(records), "failed": failed,
               "seconds": round(time.perf_counter() - started, 1),
               "per_page_s": {r["page"]: r["seconds"] for r in records}}
    return summary


def summary_line(summary: dict) -> str:
    """One line for a cell's JSON summary, as .ci/run prints it at the end."""
    return (f"matrix cell {summary['cell']}: {summary['pages']} pages in {summary['seconds']} s, "
            f"failed {summary['failed'] or 'none'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cell", nargs="?", choices=sorted(CELLS), help="the matrix cell to run")
    parser.add_argument("--pages", nargs="*", default=[], help="chapter numbers or path parts (default: all)")
    parser.add_argument("--load", type=int, default=0, help="CPU-bound processes to run alongside")
    parser.add_argument("--timeout", type=int, default=600, help="per-cell limit in seconds")
    parser.add_argument("--list", action="store_true", help="print the cells and exit")
    parser.add_argument("--summarize", nargs="*", metavar="JSON", help="print one line per summary file and exit")
    args = parser.parse_args(argv)
    if args.summarize is not None:
        for path in args.summarize:
            print(summary_line(json.loads(Path(path).read_text())))
        return 0
    if args.list or not args.cell:
        for name, env in CELLS.items():
            print(f"{name:15s} {' '.join(f'{k}={v}' for k, v in env.items()) or '(nothing changed)'}"
                  f"{'   [CI]' if name in CI_CELLS else ''}")
        return 0
    summary = run(args.cell, select_pages(args.pages), args.load, args.timeout)
    print(json.dumps(summary))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
