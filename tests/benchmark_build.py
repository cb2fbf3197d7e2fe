"""Build and chapter benchmark: reported, never a pass/fail test.

Why a script and not a test: timings on a shared machine are noisy, so they are measured and
published (README, status page), never asserted. It measures

1. the clean build: ``jupyter-book build`` into an empty output folder (every page executes);
2. the unchanged rebuild: the same command again (Sphinx finds nothing out of date), and the
   same with ``--all``, which re-reads every page and takes every execution from the cache;
3. each chapter alone: executed with nbclient in its own folder while a sampler thread sums the
   memory of the kernel and every process the kernel starts, every 50 ms. The headline is the
   summed PSS (proportional set size: a page shared by k processes counts 1/k in each), which is
   what the processes take from the machine together and what a container's memory limit (Binder's
   2 GB) charges. The summed RSS is reported beside it: it counts a page shared by torchrun's
   workers, or by a forked server, once per process, so it overstates the total.

Run it from the repository root with nothing else running (chapters benchmark themselves, and two
benchmarks at once corrupt each other's numbers)::

    .venv/bin/python tests/benchmark_build.py                 # everything, writes the results
    .venv/bin/python tests/benchmark_build.py --chapters-only  # skip the two builds
    .venv/bin/python tests/benchmark_build.py --help

Results go to ``book/benchmark.json`` (read by the status page) and into the README between the
``benchmark`` markers and the chapter table's CPU-time column. The last line printed is the JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # conftest: the TOC helpers the tests use
from conftest import notebook_docs  # noqa: E402  (also puts notebooks/ on sys.path)
from _shared.env_check import describe_machine  # noqa: E402

TARGETS = {"clean_build_s": 600, "rebuild_s": 30, "chapter_s": 120, "chapter_mb": 1536}


def timed_build(out: Path, *extra: str) -> float:
    book = shutil.which("jupyter-book", path=str(Path(sys.executable).parent)) or "jupyter-book"
    start = time.perf_counter()
    subprocess.run([book, "build", str(ROOT), "--path-output", str(out), "-W", "-n", "--keep-going", "-q", *extra],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


class TreeMemory:
    """Peak summed PSS, and peak summed RSS, of every descendant of this process (the kernel and what it starts)."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self._me = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak = 0      # summed PSS, bytes
        self.peak_rss = 0  # summed RSS, bytes
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        while not self._stop.is_set():
            pss = rss = 0
            for child in self._me.children(recursive=True):
                try:
                    info = child.memory_full_info()  # reads /proc/PID/smaps_rollup
                except psutil.Error:  # a process that ended between listing and reading
                    continue
                pss, rss = pss + info.pss, rss + info.rss
            self.peak, self.peak_rss = max(self.peak, pss), max(self.peak_rss, rss)
            self._stop.wait(self._interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_chapter(doc: str) -> dict:
    import jupytext
    import nbclient

    path = ROOT / f"{doc}.md"
    nb = jupytext.read(path)
    timeout = nb.metadata.get("mystnb", {}).get("execution_timeout", 600)
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    with TreeMemory() as memory:
        start = time.perf_counter()
        client.execute()
        seconds = time.perf_counter() - start
    return {"chapter": doc, "seconds": round(seconds, 1), "peak_mb": round(memory.peak / 2**20),
            "peak_rss_mb": round(memory.peak_rss / 2**20)}


def readme_table(result: dict) -> str:
    lines = [f"Measured {result['date']} on {result['machine']['cpu']}, {result['machine']['cores']} cores, "
             f"GPU: {result['machine']['gpu']}."]
    if result.get("clean_build_s") is not None:
        lines.append(f"Clean build: {result['clean_build_s']:.0f} s (target {TARGETS['clean_build_s']} s); "
                     f"unchanged rebuild: {result['rebuild_s']:.1f} s (target {TARGETS['rebuild_s']} s); "
                     f"every page re-read with executions from the cache: {result['rebuild_all_s']:.1f} s.")
    lines += ["", "| Page | Execution (s) | Peak memory, PSS (MB) | Peak summed RSS (MB) |", "| --- | --- | --- | --- |"]
    lines += [f"| `{c['chapter']}` | {c['seconds']:.0f} | {c['peak_mb']} | {c.get('peak_rss_mb', '')} |"
              for c in result["chapters"]]
    return "\n".join(lines)


def update_readme(result: dict) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    text = re.sub(r"(<!-- benchmark:start -->\n).*?(\n<!-- benchmark:end -->)",
                  lambda m: m.group(1) + readme_table(result) + m.group(2), text, flags=re.S)
    seconds = {Path(c["chapter"]).parts[1]: c["seconds"] for c in result["chapters"]  # a chapter's own page, not
               if re.fullmatch(r"notebooks/([^/]+)/\1", c["chapter"])}  # a further page such as 07's Ray Serve
    rows = []
    for line in text.splitlines():
        cells = line.split("|")
        folder = re.search(r"notebooks/(\d\d-[a-z0-9-]+)", line)
        if line.startswith("|") and len(cells) == 7 and folder and folder.group(1) in seconds:
            cells[4] = f" {seconds[folder.group(1)]:.0f} s "
            line = "|".join(cells)
        rows.append(line)
    readme.write_text("\n".join(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chapters-only", action="store_true", help="skip the clean build and the rebuild")
    parser.add_argument("--only", nargs="*", help="pages to execute (default: every notebook page in the TOC)")
    parser.add_argument("--no-write", action="store_true", help="print the results; write no file")
    args = parser.parse_args()

    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "machine": describe_machine(),
              "clean_build_s": None, "rebuild_s": None, "rebuild_all_s": None, "targets": TARGETS}
    if not args.chapters_only:
        with tempfile.TemporaryDirectory(prefix="gr-bench-") as out:
            result["clean_build_s"] = round(timed_build(Path(out)), 1)
            print(f"clean build: {result['clean_build_s']} s", flush=True)
            result["rebuild_s"] = round(timed_build(Path(out)), 1)
            print(f"unchanged rebuild: {result['rebuild_s']} s", flush=True)
            result["rebuild_all_s"] = round(timed_build(Path(out), "--all"), 1)
            print(f"every page re-read, executions from the cache: {result['rebuild_all_s']} s", flush=True)
    result["chapters"] = []
    for doc in args.only or notebook_docs():
        result["chapters"].append(run_chapter(doc))
        print(f"{doc}: {result['chapters'][-1]}", flush=True)
    if not args.no_write:
        (ROOT / "book" / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
        update_readme(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
