"""The built book as a reader's browser shows it: Debian's Chromium, driven by Playwright.

The site the session's build wrote (the ``html`` fixture) is served by a real HTTP server on
127.0.0.1, and every page of the table of contents is loaded at desktop (1280 px) and phone
(390 px) width. A page fails on a console error or an uncaught exception, a request that fails or
answers 4xx/5xx, a request to any host but this one (CI cuts the network; here every such request
is refused, so the test means the same with or without a network), an image that did not load,
MyST or TeX left as text, math that MathJax did not typeset, a missing favicon, or a second
header bar at desktop width. Then the search box finds each chapter by a word of its own, and the
colour-mode button turns the page dark and back.

Browsers cannot be downloaded here: Playwright drives the system Chromium (``apt-get install -y
chromium`` on Debian; ``.ci/run`` installs it). Without it the test fails and says so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from bs4 import BeautifulSoup
from conftest import ROOT, free_port, notebook_docs, toc_files
from pdf import chromium  # one lookup for the browser test and the PDF

pytestmark = pytest.mark.book

HOST = "127.0.0.1"
WIDTHS = {"desktop": {"width": 1280, "height": 900}, "phone": {"width": 390, "height": 844}}
MISSING_CHROMIUM = (
    "Chromium is not installed, and the browser test needs it: Playwright drives the system's "
    "Chromium because browsers cannot be downloaded here. On Debian or Ubuntu, as root: "
    "apt-get update && apt-get install -y chromium   (then run the tests again)."
)
PAGE_TIMEOUT_MS = 30_000

# Text a reader must never see in prose: MyST that was not parsed, TeX that was not typeset.
RAW_MYST = {
    "role": re.compile(r"\{[a-z][\w:-]*\}`"),
    "directive": re.compile(r"(?:```|:::)\s*\{[\w:-]+\}"),
    "target": re.compile(r"^\s*\([\w-]+\)=\s*$", re.M),
    "substitution": re.compile(r"\{\{\s*[\w.]+\s*\}\}"),
    "math delimiter": re.compile(r"\$\$|\\\(|\\\)|\\\[|\\\]"),
    "TeX command": re.compile(r"\\(?:frac|text|mathrm|mathbf|sum|prod|int|sqrt|approx|cdot|times|alpha|beta|"
                              r"gamma|delta|epsilon|theta|lambda|mu|sigma|log|exp|left|right|hat|bar|le|ge)\b"),
}

# The article's prose as text: code, outputs and typeset math removed (they may show syntax on purpose).
PROSE_JS = """() => {
  const article = document.querySelector('article.bd-article') || document.querySelector('main') || document.body;
  const copy = article.cloneNode(true);
  copy.querySelectorAll('pre, code, kbd, script, style, mjx-container, .cell_output, .cell_input, .highlight')
      .forEach(e => e.remove());
  return copy.textContent;
}"""

PAGE_STATE_JS = """() => ({
  brokenImages: [...document.images].filter(i => !i.complete || i.naturalWidth === 0)
                                   .map(i => i.getAttribute('src')),
  math: document.querySelectorAll('article .math').length,
  typeset: [...document.querySelectorAll('article .math')].filter(e => e.querySelector('mjx-container')).length,
  headerHeights: [...document.querySelectorAll('header.bd-header')].map(h => h.getBoundingClientRect().height),
  overflow: document.documentElement.scrollWidth - document.documentElement.clientWidth,
  icon: document.querySelector('link[rel~="icon"]')?.href || null,
})"""


def require_chromium() -> str:
    """The system Chromium's path; without one, fail with the command that installs it (no skip)."""
    executable = chromium()
    if executable is None:
        pytest.fail(MISSING_CHROMIUM, pytrace=False)
    return executable


@pytest.fixture(scope="session")
def site(html, tmp_path_factory):
    """The built site over HTTP from a separate server process on 127.0.0.1; yields its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("site") / "http.log"  # a file: a pipe nobody reads fills and stalls the server
    with log.open("wb") as sink:
        server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", HOST,
                                   "--directory", str(html)], stdout=sink, stderr=subprocess.STDOUT)
    base = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{base}/index.html", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the HTTP server for {html} did not answer on {base}: {log.read_text()[-1000:]}")
                time.sleep(0.1)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="session")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: .venv/bin/python -m pip install -r requirements.txt")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=require_chromium(), headless=True)
        yield browser
        browser.close()


class Watch:
    """Everything that went wrong on one page while it loaded and was used."""

    def __init__(self, page, base: str):
        self.problems: list[str] = []
        self.base_host = urlsplit(base).netloc
        page.on("console", lambda m: m.type == "error" and self.problems.append(f"console error: {m.text}"))
        page.on("pageerror", lambda e: self.problems.append(f"uncaught exception: {e}"))
        page.on("requestfailed", self.failed)
        page.on("response", lambda r: r.status >= 400 and self.problems.append(f"HTTP {r.status}: {r.url}"))
        page.route("**/*", self.route)

    def route(self, route):
        url = urlsplit(route.request.url)
        if url.scheme in ("http", "https", "ws", "wss") and url.netloc != self.base_host:
            self.problems.append(f"request to another host (the book must be self-contained): {route.request.url}")
            route.abort()
        else:
            route.continue_()

    def failed(self, request):
        if urlsplit(request.url).netloc == self.base_host:  # other hosts are reported by route()
            self.problems.append(f"request failed: {request.url} ({request.failure})")


def open_page(browser, base: str, path: str, viewport: dict, **context_options):
    context = browser.new_context(viewport=viewport, **context_options)
    page = context.new_page()
    watch = Watch(page, base)
    page.goto(f"{base}/{path}", wait_until="load", timeout=PAGE_TIMEOUT_MS)
    return context, page, watch


def wait_for_math(page) -> None:
    """MathJax loads deferred and typesets after load: wait until every math element has output."""
    page.wait_for_function(
        "() => [...document.querySelectorAll('article .math')].every(e => e.querySelector('mjx-container'))",
        timeout=PAGE_TIMEOUT_MS)


def raw_text_problems(text: str) -> list[str]:
    found = []
    for kind, pattern in RAW_MYST.items():
        for m in pattern.finditer(text):
            found.append(f"raw {kind} in the text: {text[max(0, m.start() - 30):m.end() + 30]!r}")
    return found


def check_page(browser, base: str, doc: str, width: str) -> tuple[list[str], dict]:
    phone = width == "phone"
    context, page, watch = open_page(browser, base, f"{doc}.html", WIDTHS[width],
                                     is_mobile=phone, has_touch=phone)
    try:
        try:
            wait_for_math(page)
        except Exception:  # noqa: BLE001 - reported below as untypeset math, with the rest
            pass
        page.wait_for_load_state("networkidle", timeout=PAGE_TIMEOUT_MS)
        state = page.evaluate(PAGE_STATE_JS)
        problems = list(watch.problems)
        problems += [f"image did not load: {src}" for src in state["brokenImages"]]
        if state["typeset"] < state["math"]:
            problems.append(f"math not typeset: {state['math'] - state['typeset']} of {state['math']} elements")
        problems += raw_text_problems(page.evaluate(PROSE_JS))
        if width == "desktop" and any(h > 0 for h in state["headerHeights"]):
            problems.append(f"a second header bar is shown at desktop width (heights {state['headerHeights']})")
        # Headless Chromium never asks for the favicon, so ask for it: a 404 there is in every tab.
        if state["icon"] is None:
            problems.append("no favicon link: browsers ask for /favicon.ico and get a 404")
        elif (status := page.request.get(state["icon"]).status) != 200:
            problems.append(f"favicon {state['icon']} answers HTTP {status}")
        if state["overflow"] > 1:
            problems.append(f"the page scrolls sideways by {state['overflow']} px")
        return problems, state
    finally:
        context.close()


@pytest.mark.parametrize("width", list(WIDTHS))
def test_every_page_loads_clean(browser, site, width):
    problems, math_pages = [], []
    for doc in toc_files():
        found, state = check_page(browser, site, doc, width)
        problems += [f"{doc} ({width}): {p}" for p in found]
        if state["math"]:
            math_pages.append(doc)
    # The math check must have had math to check: a book whose pages lost their math would pass it.
    assert math_pages, "no page has math, so the offline MathJax check checked nothing"
    assert problems == [], f"{len(problems)} problems:\n" + "\n".join(problems[:80])


def test_the_check_sees_raw_myst_and_tex():
    assert raw_text_problems("The run stopped after epoch {glue:text}`best_epoch`.")
    assert raw_text_problems("```{code-cell} ipython3")
    assert raw_text_problems("(fig-train-confusion)=\n")
    assert raw_text_problems(r"the loss is \(L = -\sum_i y_i \log p_i\)")
    assert raw_text_problems(r"with $\frac{a}{b}$ shown as source")
    assert raw_text_problems("Costs $3 and 4 dollars; a dict {'a': 1}; a path C: drive.") == []


def prose_words(html: Path, doc: str) -> Counter:
    page = BeautifulSoup((html / f"{doc}.html").read_text(), "html.parser")
    article = page.find("article") or page
    for element in article.find_all(["pre", "code", "script", "style"]):
        element.decompose()
    for element in article.select(".cell_output, .cell_input, .gr-verified"):
        element.decompose()
    return Counter(re.findall(r"\b[a-z]{7,}\b", article.get_text(" ").lower()))


def search_terms(html: Path) -> dict[str, str]:
    """For each chapter, the word its prose uses most that no other page's prose uses at all."""
    words = {doc: prose_words(html, doc) for doc in toc_files()}
    terms = {}
    for doc in notebook_docs():
        if not doc.startswith("notebooks/"):
            continue
        elsewhere = set().union(*(set(w) for other, w in words.items() if other != doc))
        own = sorted(((n, w) for w, n in words[doc].items() if w not in elsewhere), key=lambda t: (-t[0], t[1]))
        assert own, f"{doc}: no word of its own to search for"
        terms[doc] = own[0][1]
    return terms


def test_search_finds_each_chapter_by_a_word_of_its_own(browser, site, html):
    terms = search_terms(html)
    assert len(terms) == len([d for d in notebook_docs() if d.startswith("notebooks/")]) > 0
    missed, problems = [], []
    for doc, term in terms.items():
        context, page, watch = open_page(browser, site, f"{toc_files()[0]}.html", WIDTHS["desktop"])
        try:
            page.keyboard.press("Control+k")  # the theme's shortcut opens the search dialog
            box = page.locator("#pst-search-dialog input[name='q']")
            box.wait_for(state="visible", timeout=PAGE_TIMEOUT_MS)
            box.fill(term)
            box.press("Enter")
            page.wait_for_url(re.compile(r"/search\.html\?q="), timeout=PAGE_TIMEOUT_MS)
            page.wait_for_function(
                "() => /found \\d+ page|did not match/.test(document.querySelector('#search-results')?.innerText || '')",
                timeout=PAGE_TIMEOUT_MS)
            hits = page.eval_on_selector_all("#search-results ul.search li a",
                                             "links => links.map(a => new URL(a.href).pathname)")
            if not any(h.endswith(f"/{doc}.html") for h in hits):
                missed.append(f"{doc}: searching {term!r} found {hits}")
            problems += [f"{doc} search {term!r}: {p}" for p in watch.problems]
        finally:
            context.close()
    assert missed == [] and problems == [], "\n".join(missed + problems)


def test_colour_mode_button_turns_the_page_dark_and_back(browser, site):
    doc = notebook_docs()[1] if len(notebook_docs()) > 1 else notebook_docs()[0]
    context, page, watch = open_page(browser, site, f"{doc}.html", WIDTHS["desktop"], color_scheme="light")
    try:
        background = "() => getComputedStyle(document.body).backgroundColor"
        theme = "() => document.documentElement.dataset.theme"
        assert page.evaluate(theme) == "light"
        light = page.evaluate(background)
        button = page.locator(".theme-switch-button:visible").first
        seen = []
        for _ in range(3):  # the button cycles auto -> dark -> light (order depends on the system's)
            button.click()
            seen.append(page.evaluate(theme))
            if seen[-1] == "dark":
                break
        assert seen[-1] == "dark", f"the colour-mode button went through {seen}, never dark"
        dark = page.evaluate(background)

        def luminance(css: str) -> float:
            r, g, b = (int(x) for x in re.findall(r"\d+", css)[:3])
            return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255

        assert luminance(dark) < 0.3 < luminance(light), f"body background light {light}, dark {dark}"
        page.reload(wait_until="load")
        assert page.evaluate(theme) == "dark", "the chosen mode did not survive a reload"
        assert watch.problems == [], "\n".join(watch.problems)
    finally:
        context.close()


def test_missing_chromium_fails_with_the_install_command(monkeypatch):
    monkeypatch.delenv("CHROMIUM", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None)
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install -y chromium"):
        require_chromium()
