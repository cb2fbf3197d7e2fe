"""The gate: the book builds from clean with warnings as errors, and the site it makes works.

One build per test session, into an empty output folder (so every page is executed, nothing comes
from a cache), with ``-W -n --keep-going``. Sphinx reads pages one at a time, so chapters execute
one at a time: two chapters that benchmark at once would corrupt each other's numbers. The tests
after the build read the HTML a reader gets: pages, links, anchors, rendered numbers, downloads and
launch buttons.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import cache
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml
from bs4 import BeautifulSoup
from conftest import ROOT, notebook_docs, toc_files  # the build and html fixtures live in conftest.py

pytestmark = pytest.mark.book

def failed_pages(log: str, html: Path) -> list[str]:
    """Pages whose execution failed, named from the build log and the execution reports."""
    named = [str(Path(p).relative_to(ROOT)) if Path(p).is_absolute() and Path(p).is_relative_to(ROOT) else p
             for p in re.findall(r"(\S+\.(?:md|ipynb)): WARNING: Executing notebook failed", log)]
    reports = html / "reports"
    if reports.is_dir():
        named += [p.name.removesuffix(".err.log") for p in reports.rglob("*.err.log")]
    return sorted(set(named))


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
        ipynb = [h for h in links if h.endswith(".ipynb") and "://" not in h]  # not the Colab link
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


# A page whose chapter failed, or whose glue call was lost in an edit, still renders: the glued
# number is silently empty ("stopped after epoch , eight epochs ...") and a missing figure leaves
# its label as text. These checks read each notebook page's MyST source for every glue reference,
# the glue values the execution recorded (jupyter_execute/<page>.glue.json), and the page's HTML.

GLUE_ROLE = re.compile(r"^glue(?::(?:text|any|md|math))?$")
GLUE_DIRECTIVE = re.compile(r"^\{(glue(?::(?:figure|any|md|math))?)\}\s*(\S*)")
DIRECTIVE = re.compile(r"^\{([\w:-]+)\}")
NOT_MARKDOWN = {"code-cell", "code", "code-block", "sourcecode", "literalinclude", "raw", "math", "bibliography"}
LABEL_TEXT = re.compile(r"\bfig-[a-z0-9]+(?:-[a-z0-9]+)+\b")


def directive_body(content: str) -> str:
    """A directive's content without its option lines (``:name: x`` or a ``---`` YAML block)."""
    lines = content.splitlines()
    if lines and lines[0].strip() == "---":
        end = next((i for i, line in enumerate(lines[1:], 1) if line.strip() == "---"), 0)
        return "\n".join(lines[end + 1:])
    start = 0
    while start < len(lines) and re.match(r"^:[\w-]+:", lines[start]):
        start += 1
    return "\n".join(lines[start:])


def glue_references(text: str) -> list[tuple[str, str]]:
    """Every glue reference of a MyST page, in order, as (role or directive, key): the prose and
    the bodies of directives (admonitions, exercises, figures), never code cells or code blocks."""
    from markdown_it.renderer import RendererHTML
    from myst_parser.config.main import MdParserConfig
    from myst_parser.parsers.mdit import create_md_parser

    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    extensions = set(config.get("parse", {}).get("myst_enable_extensions", []))
    parser = create_md_parser(MdParserConfig(enable_extensions=extensions), RendererHTML)

    def walk(markdown: str) -> list[tuple[str, str]]:
        found = []
        for token in parser.parse(markdown):
            if token.type in ("fence", "colon_fence"):
                glue = GLUE_DIRECTIVE.match(token.info.strip())
                if glue:
                    found.append((glue[1], glue[2]))
                name = DIRECTIVE.match(token.info.strip())
                if name and name[1] not in NOT_MARKDOWN:  # a figure's caption, an admonition's text
                    found += walk(directive_body(token.content))
            for child in token.children or []:
                if child.type == "myst_role" and GLUE_ROLE.match(child.meta.get("name", "")):
                    found.append((child.meta["name"], child.content.split(":", 1)[0].strip()))
        return found

    _, _, body = text.partition("\n---\n") if text.startswith("---\n") else ("", "", text)
    return walk(body)


def glue_value_present(output: dict | None) -> bool:
    data = (output or {}).get("data", {})
    values = [v if isinstance(v, str) else "".join(v) for k, v in data.items()
              if k.startswith(("text/", "image/")) and not (k == "text/plain" and "image/png" in data)]
    return any(v.strip() not in ("", "''", '""') for v in values)


def glue_problems(source: str, glued: dict, page: BeautifulSoup) -> list[str]:
    """What a reader would meet as a hole: a reference whose key the execution never glued or glued
    empty, a rendered value that is empty, fewer rendered values than references, a glued figure
    with no image, a figure label left as text, a reference Sphinx could not resolve."""
    problems = []
    refs = glue_references(source)
    for kind, key in refs:
        if "::" in key:
            continue  # a value glued on another page: that page's own check covers it
        if not glue_value_present(glued.get(key)):
            problems.append(f"{{{kind}}} {key}: no value was glued" if key not in glued
                            else f"{{{kind}}} {key}: the glued value is empty")
    body = page.find("article") or page
    spans = body.select("span.pasted-text")
    problems += [f"an empty glued value after: {span.find_previous(string=True)!r}"
                 for span in spans if not span.get_text(strip=True)]
    roles = sum(kind == "glue:text" for kind, _ in refs)
    if len(spans) != roles:
        problems.append(f"{roles} {{glue:text}} references in the source, {len(spans)} values on the page")
    for kind, key in refs:
        if kind == "glue:figure":
            figure = body.find(id=key) if key else None
            if figure is None or not figure.find(["img", "svg"]):
                problems.append(f"{{glue:figure}} {key}: no figure with an image on the page")
    prose = BeautifulSoup(str(body), "html.parser")
    for element in prose.find_all(["pre", "code", "script", "style"]):
        element.decompose()
    text = prose.get_text(" ")
    problems += [f"figure label left as text: {m[0]!r}" for m in LABEL_TEXT.finditer(text)]
    problems += [f"unresolved reference: {x.get_text()!r}" for x in prose.select("span.xref, span.std-numref")
                 if x.find_parent("a") is None]
    return problems


def test_every_glue_reference_resolved_to_a_non_empty_value(html):
    executed = html.parent / "jupyter_execute"
    problems, refs = [], 0
    for doc in notebook_docs():
        source = (ROOT / f"{doc}.md").read_text()
        glue_file = executed / f"{doc}.glue.json"
        glued = json.loads(glue_file.read_text()) if glue_file.exists() else {}
        refs += len(glue_references(source))
        problems += [f"{doc}: {p}" for p in glue_problems(source, glued, soup(html / f"{doc}.html"))]
    assert refs > 0, "no glue reference found in any notebook page: the reader of the sources is broken"
    assert problems == [], "\n".join(problems[:60])


CRAFTED_SOURCE = """---
jupytext: {}
---
# A page

```{code-cell} ipython3
glue("epoch", 12)  # {glue:text}`not_a_reference` inside code is not a reference
```

The run stopped after epoch {glue:text}`epoch`, {glue:text}`gap:.0f` epochs after its best one.

:::{note}
Inside a directive: {glue:text}`epoch`.
:::

```{glue:figure} fig-train-confusion
:name: fig-train-confusion

The confusion matrix after {glue:text}`epoch` epochs.
```

See {numref}`fig-train-confusion`.
"""

GOOD_HTML = """<article>
<p>The run stopped after epoch <span class="pasted-text">12</span>, <span class="pasted-text">8</span>
epochs after its best one.</p><div class="note"><p>Inside a directive: <span class="pasted-text">12</span>.</p></div>
<figure id="fig-train-confusion"><img src="a.png"/><figcaption>The confusion matrix after <span class="pasted-text">12</span> epochs.</figcaption></figure>
<p>See <a href="#fig-train-confusion"><span class="std std-numref">Fig. 1</span></a>.</p>
<pre>glue("epoch", 12)  # fig-not-a-label in code</pre></article>"""

GOOD_GLUE = {"epoch": {"data": {"text/plain": "12"}}, "gap": {"data": {"text/plain": "8.0"}},
             "fig-train-confusion": {"data": {"image/png": "iVBORw0KGgo", "text/plain": "<Figure>"}}}


def test_glue_references_are_read_from_prose_and_directives_not_code():
    assert glue_references(CRAFTED_SOURCE) == [
        ("glue:text", "epoch"), ("glue:text", "gap"), ("glue:text", "epoch"), ("glue:figure", "fig-train-confusion"),
        ("glue:text", "epoch")]


def test_glue_check_passes_a_good_page_and_catches_every_kind_of_hole():
    page = lambda markup: BeautifulSoup(markup, "html.parser")  # noqa: E731
    assert glue_problems(CRAFTED_SOURCE, GOOD_GLUE, page(GOOD_HTML)) == []
    # The failure the issue saw: the chapter failed, so the value rendered empty.
    empty = GOOD_HTML.replace('<span class="pasted-text">12</span>,', '<span class="pasted-text"></span>,')
    assert any("empty glued value" in p for p in glue_problems(CRAFTED_SOURCE, GOOD_GLUE, page(empty)))
    # A key the execution never glued: myst-nb renders nothing at all in its place.
    lost = {k: v for k, v in GOOD_GLUE.items() if k != "gap"}
    dropped = GOOD_HTML.replace('<span class="pasted-text">8</span>', "")
    problems = glue_problems(CRAFTED_SOURCE, lost, page(dropped))
    assert "{glue:text} gap: no value was glued" in problems
    assert "4 {glue:text} references in the source, 3 values on the page" in problems
    # A value glued as an empty string.
    blank = {**GOOD_GLUE, "gap": {"data": {"text/plain": "''"}}}
    assert "{glue:text} gap: the glued value is empty" in glue_problems(CRAFTED_SOURCE, blank, page(GOOD_HTML))
    # The figure is missing, and the reference to it is left as its label.
    no_figure = re.sub(r"<figure.*?</figure>", "", GOOD_HTML, flags=re.S).replace(
        '<a href="#fig-train-confusion"><span class="std std-numref">Fig. 1</span></a>',
        '<span class="xref std std-numref">fig-train-confusion</span>')
    problems = glue_problems(CRAFTED_SOURCE, GOOD_GLUE, page(no_figure))
    assert "{glue:figure} fig-train-confusion: no figure with an image on the page" in problems
    assert "figure label left as text: 'fig-train-confusion'" in problems
    assert "unresolved reference: 'fig-train-confusion'" in problems


def test_every_chapter_page_says_when_and_on_what_it_was_verified(html):
    """The box book/_ext/verified.py adds at the bottom of each executed page: execution and build
    date, the versions that decide the numbers, the CPU and the kernels PyTorch picked on it."""
    import platform
    from datetime import datetime, timedelta, timezone
    from importlib import metadata

    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = (re.findall(r"^model name\s*:\s*(.+)$", cpuinfo, re.M) or [platform.processor() or platform.machine()])[0]
    expected = [f"python {platform.python_version()}",
                *(f"{name} {metadata.version(name)}" for name in
                  ("torch", "numpy", "scikit-learn", "onnxruntime", "jupyter-book")),
                cpu.strip(), f"PyTorch CPU kernels {torch.backends.cpu.get_cpu_capability()}"]
    chapters = [doc for doc in notebook_docs() if doc.startswith("notebooks/")]
    assert chapters
    problems = []
    for doc in chapters:
        article = soup(html / f"{doc}.html").find("article")
        boxes = article.select(".gr-verified")
        if len(boxes) != 1:
            problems.append(f"{doc}: {len(boxes)} 'Last verified' boxes")
            continue
        following = [e for e in boxes[0].find_all_next(["p", "section", "h2"])
                     if article in e.parents and boxes[0] not in e.parents]
        if following:
            problems.append(f"{doc}: the 'Last verified' box is not at the bottom of the page")
        text = " ".join(boxes[0].get_text(" ").split())
        problems += [f"{doc}: the box does not say {want!r}: {text!r}" for want in expected if want not in text]
        stamps = re.findall(r"(\d{4}-\d\d-\d\d \d\d:\d\d) UTC", text)
        if len(stamps) != 2:
            problems.append(f"{doc}: no execution and build time in {text!r}")
            continue
        executed, built = (datetime.strptime(s, "%Y-%m-%d %H:%M").replace(tzinfo=timezone.utc) for s in stamps)
        now = datetime.now(timezone.utc)
        # The build is clean, so every page executed after the build started (a cached local
        # build would show an older execution time, which is why the box gives both).
        if not (built - timedelta(minutes=1) <= executed <= now + timedelta(minutes=1)
                and now - timedelta(days=1) < built <= now + timedelta(minutes=1)):
            problems.append(f"{doc}: executed {executed}, build started {built}, now {now}: not this build's times")
    assert problems == [], "\n".join(problems)
