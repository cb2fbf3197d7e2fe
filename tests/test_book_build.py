"""The gate: the book builds from clean with warnings as errors, and the site it makes works.

One build per test session, into an empty output folder (so every page is executed, nothing comes
from a cache), with ``-W -n --keep-going``. Sphinx reads pages one at a time, so chapters execute
one at a time: two chapters that benchmark at once would corrupt each other's numbers. The tests
after the build read the HTML a reader gets: pages, links, anchors, rendered numbers, downloads and
launch buttons.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from functools import cache
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml
from bs4 import BeautifulSoup
from conftest import ROOT, notebook_docs, toc_files

pytestmark = pytest.mark.book

BUILD_TIMEOUT_S = 60 * 60
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def jupyter_book() -> str:
    return shutil.which("jupyter-book", path=str(Path(sys.executable).parent)) or "jupyter-book"


def failed_pages(log: str, html: Path) -> list[str]:
    """Pages whose execution failed, named from the build log and the execution reports."""
    named = [str(Path(p).relative_to(ROOT)) if Path(p).is_absolute() and Path(p).is_relative_to(ROOT) else p
             for p in re.findall(r"(\S+\.(?:md|ipynb)): WARNING: Executing notebook failed", log)]
    reports = html / "reports"
    if reports.is_dir():
        named += [p.name.removesuffix(".err.log") for p in reports.rglob("*.err.log")]
    return sorted(set(named))


@pytest.fixture(scope="session")
def build(tmp_path_factory):
    """Build the book from clean into a temporary folder; return (returncode, log, html folder)."""
    out = tmp_path_factory.mktemp("book")
    cmd = [jupyter_book(), "build", str(ROOT), "--path-output", str(out), "-W", "-n", "--keep-going"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log = ANSI.sub("", done.stdout + done.stderr)
    (out / "build.log").write_text(log)
    return done.returncode, log, out / "_build" / "html", out / "_build" / ".jupyter_cache"


@pytest.fixture(scope="session")
def html(build) -> Path:
    returncode, log, html, _ = build
    if not (html / "index.html").exists():
        pytest.fail(f"the build produced no site; log tail:\n{log[-4000:]}")
    return html


@cache
def soup(path: Path) -> BeautifulSoup:
    return BeautifulSoup(path.read_text(), "html.parser")


def pages(html: Path) -> list[Path]:
    return [p for p in html.rglob("*.html") if "_static" not in p.parts and "reports" not in p.parts]


def test_book_builds_from_clean_with_warnings_as_errors(build):
    returncode, log, html, _ = build
    if returncode != 0:
        warnings = [line for line in log.splitlines() if ": WARNING:" in line or ": ERROR:" in line]
        pytest.fail(
            f"jupyter-book build -W -n --keep-going failed (exit {returncode}).\n"
            f"Pages that failed to execute: {failed_pages(log, html) or 'none'}\n"
            "Warnings and errors:\n" + "\n".join(warnings[:40]) + f"\nLog tail:\n{log[-3000:]}"
        )


def test_every_toc_entry_produced_a_page(html):
    missing = [f for f in toc_files() if not (html / f"{f}.html").exists()]
    assert missing == []


EXECUTING = re.compile(r"^(\S+?)(?:\.md|\.ipynb)?: Executing notebook using", re.M)


def executions_in_log(log: str) -> list[str]:
    """The page of every execution myst-nb started, as a TOC path, from the build log."""
    found = []
    for where in EXECUTING.findall(log):
        path = Path(where)
        found.append(path.relative_to(ROOT).as_posix() if path.is_absolute() and path.is_relative_to(ROOT)
                     else path.as_posix())
    return found


def test_executions_are_read_from_the_build_log():
    log = (f"{ROOT}/notebooks/02-train-models/02-train-models.md: Executing notebook using local CWD [mystnb]\n"
           "book/status: Executing notebook using local CWD [mystnb]\n")
    assert executions_in_log(log) == ["notebooks/02-train-models/02-train-models", "book/status"]


def test_every_notebook_page_was_executed_once_and_one_at_a_time(build):
    from jupyter_cache import get_cache

    *_, cache_dir = build
    records = get_cache(str(cache_dir)).list_cache_records()
    cached = sorted(Path(r.uri).relative_to(ROOT).with_suffix("").as_posix() for r in records)
    assert cached == sorted(notebook_docs()), "every notebook page has one execution record"
    # The cache keys on content, so it cannot see a page executed twice; the build log can.
    returncode, log, *_ = build
    started = Counter(executions_in_log(log))
    twice = {doc: n for doc, n in started.items() if n != 1}
    assert sorted(started) == sorted(notebook_docs()) and twice == {}, (
        f"executions per page in the build log: {dict(started)}; each page must execute exactly once")
    spans = sorted((r.created.timestamp() - r.data["execution_seconds"], r.created.timestamp()) for r in records)
    overlaps = [(a, b) for a, b in zip(spans, spans[1:]) if b[0] < a[1] - 1.0]  # 1 s of clock slack
    assert overlaps == [], "two pages executed at the same time"


def test_internal_links_and_anchors_resolve(html):
    broken = []
    for page in pages(html):
        for a in soup(page).find_all("a", href=True):
            href = a["href"]
            parts = urlsplit(href)
            if parts.scheme or href.startswith(("mailto:", "javascript:")) or href.startswith("//"):
                continue
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{page.relative_to(html)}: {href} (no such file)")
                continue
            if parts.fragment and target.suffix == ".html":
                if not soup(target).find(id=unquote(parts.fragment)):
                    broken.append(f"{page.relative_to(html)}: {href} (no such anchor)")
    assert broken == [], "\n".join(broken[:50])


ROLE_LEFTOVER = re.compile(r"\{(?:glue(?::\w+)?|ref|numref|doc|cite(?::\w+)?|eq|download|term)\}`")


def test_no_role_or_glue_left_unrendered(html):
    leftovers = []
    for page in pages(html):
        body = soup(page).find("article") or soup(page)
        text = body.get_text(" ")
        for match in ROLE_LEFTOVER.finditer(text):
            leftovers.append(f"{page.relative_to(html)}: {text[match.start():match.start() + 60]!r}")
    assert leftovers == [], "\n".join(leftovers[:50])


def test_notebook_pages_offer_the_executed_notebook_for_download(html):
    for doc in notebook_docs():
        page = html / f"{doc}.html"
        links = {a["href"] for a in soup(page).find_all("a", href=True)}
        ipynb = [h for h in links if h.endswith(".ipynb")]
        assert ipynb, f"{doc}: no .ipynb download button"
        target = (page.parent / ipynb[0]).resolve()
        nb = json.loads(target.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"
                and "skip-execution" not in c.get("metadata", {}).get("tags", [])]  # GPU-only cells
        unexecuted = [c["source"][:60] for c in code if not c.get("execution_count")]
        assert code and not unexecuted, f"{doc}: the download has unexecuted cells: {unexecuted}"


def test_launch_buttons_use_main_and_point_at_existing_files(html):
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    repo = urlsplit(config["repository"]["url"]).path.strip("/")
    for doc in notebook_docs():
        page = html / f"{doc}.html"
        binder = [a["href"] for a in soup(page).find_all("a", href=True) if "mybinder.org" in a["href"]]
        assert binder, f"{doc}: no Binder launch button"
        for href in binder:
            parts = urlsplit(href)
            assert parts.path == f"/v2/gh/{repo}/main", f"{doc}: {href} does not launch branch main of {repo}"
            urlpath = parse_qs(parts.query)["urlpath"][0]
            assert urlpath.startswith("lab/tree/"), f"{doc}: {href} does not open JupyterLab"
            assert (ROOT / urlpath.removeprefix("lab/tree/")).is_file(), f"{doc}: {href} points at a missing file"


def test_search_index_covers_every_page(html):
    index = (html / "searchindex.js").read_text()
    for doc in toc_files():
        assert f'"{doc}"' in index, f"{doc} is not in the search index"


def test_status_page_shows_the_execution_table(html):
    table = soup(html / "book" / "status.html").find("table")
    assert table is not None
    text = table.get_text(" ")
    for doc in notebook_docs():
        assert doc in text, f"the status page's execution table has no row for {doc}"
