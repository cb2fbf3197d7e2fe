"""The whole-book PDF, made from the session's build and read back the way a reader's viewer reads it.

``tests/pdf.py`` writes one page of the whole book from the build's doctrees and execution cache
(Sphinx's singlehtml builder) and prints it with Chromium. These tests open the PDF with pypdf and
check what a reader of the PDF relies on: every page of the book is in it, in order, findable from
the bookmarks; every figure the HTML shows is printed; no MyST markup or TeX is left raw; nothing
was executed again to make it; and the welcome page links it where the site ships it.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from bs4 import BeautifulSoup
from conftest import toc_files

pytestmark = pytest.mark.book

RAW = {
    "role": re.compile(r"\{[a-z][a-z0-9:-]*\}`"),
    "directive": re.compile(r"(?:```|:::)\{[a-z]"),
    "inline math": re.compile(r"\\\(|\\\)"),
    "display math": re.compile(r"\\\[|\\\]|\$\$"),
}


def squash(text: str) -> str:
    """Text without whitespace: a PDF breaks a title over lines and drops the space at the break."""
    return re.sub(r"\s+", "", text)


@cache
def soup(path: Path) -> BeautifulSoup:
    return BeautifulSoup(path.read_text(), "html.parser")


def title(html: Path, doc: str) -> str:
    h1 = soup(html / f"{doc}.html").find("article").find("h1")
    return h1.get_text(" ", strip=True).rstrip("#").strip()


def figures(html: Path, doc: str) -> set[str]:
    """The images a reader sees on the HTML page without clicking: figures and plotted outputs, not
    icons, and not the outputs of cells tagged hide-cell (folded in the HTML, left out of the PDF)."""
    article = soup(html / f"{doc}.html").find("article")
    return {img["src"] for img in article.find_all("img", src=True)
            if "_images/" in img["src"] and not img.find_parent("details", class_="hide")}


@pytest.fixture(scope="session")
def pdf(build, html) -> Path:
    from pdf import PDF_NAME, make_pdf

    returncode, log, *_ = build
    if returncode != 0:
        pytest.fail("the book build failed, so there is no PDF to check (see the build test)")
    made = html / PDF_NAME  # the session's build folder is new, so a PDF there was made from it
    return made if made.is_file() else make_pdf(html.parent.parent)


@pytest.fixture(scope="session")
def reader(pdf):
    from pypdf import PdfReader

    return PdfReader(pdf)


@pytest.fixture(scope="session")
def page_texts(reader) -> list[str]:
    return [page.extract_text() or "" for page in reader.pages]


@pytest.fixture(scope="session")
def bookmarks(reader) -> list[tuple[str, int]]:
    """Every bookmark, in document order, as (title, 0-based page number)."""
    found = []

    def walk(entries):
        for entry in entries:
            if isinstance(entry, list):
                walk(entry)
            else:
                found.append((entry.title, reader.get_destination_page_number(entry)))

    walk(reader.outline)
    return found


@pytest.fixture(scope="session")
def page_ranges(html, bookmarks, reader) -> dict[str, range]:
    """Each TOC page's pages in the PDF: from its title's bookmark to the next page's title."""
    starts, at = {}, 0
    for doc in toc_files():
        want = squash(title(html, doc))
        for i in range(at, len(bookmarks)):
            if want in squash(bookmarks[i][0]):
                starts[doc], at = bookmarks[i][1], i + 1
                break
    missing = [f"{doc} ({title(html, doc)!r})" for doc in toc_files() if doc not in starts]
    assert missing == [], f"no bookmark, in reading order, for {missing}; bookmarks: {[b[0] for b in bookmarks][:60]}"
    docs = list(starts)
    ends = [starts[d] for d in docs[1:]] + [len(reader.pages) - 1]
    return {doc: range(starts[doc], end + 1) for doc, end in zip(docs, ends)}


def test_every_page_of_the_book_is_in_the_pdf_in_reading_order(html, page_ranges, page_texts):
    order = [page_ranges[doc].start for doc in toc_files()]
    assert order == sorted(order), f"the PDF's order differs from _toc.yml: {dict(zip(toc_files(), order))}"
    absent = [doc for doc in toc_files()
              if squash(title(html, doc)) not in squash("".join(page_texts[i] for i in page_ranges[doc]))]
    assert absent == [], f"these titles have a bookmark but are not printed on their pages: {absent}"


def test_every_figure_of_every_chapter_is_printed(html, page_ranges, reader):
    short = []
    for doc in toc_files():
        want = len(figures(html, doc))
        printed = sum(len(reader.pages[i].images) for i in page_ranges[doc])
        if printed < want:
            short.append(f"{doc}: {want} images on the HTML page, {printed} on its PDF pages "
                         f"{page_ranges[doc].start + 1}-{page_ranges[doc].stop}")
    assert short == [], "\n".join(short)
    assert sum(len(figures(html, doc)) for doc in toc_files()) > 0, "no figures found at all: the check is blind"


def test_no_markup_or_tex_is_left_raw(page_texts):
    found = []
    for number, text in enumerate(page_texts, start=1):
        for kind, pattern in RAW.items():
            found += [f"page {number}: raw {kind}: {text[max(0, m.start() - 40):m.end() + 40]!r}"
                      for m in pattern.finditer(text)]
    assert found == [], "\n".join(found[:30])


def test_the_raw_markup_check_sees_what_it_looks_for():
    """Without this, patterns that match nothing would pass the test above on any PDF."""
    samples = {"role": "see {ref}`ch-serve`", "directive": "```{code-cell} ipython3", "inline math": r"a \(x\) b",
               "display math": r"\[ J = 1 \]"}
    assert {kind: bool(RAW[kind].search(text)) for kind, text in samples.items()} == dict.fromkeys(RAW, True)


def test_the_welcome_page_links_the_pdf_the_site_ships(html, pdf):
    page = html / "book" / "intro.html"
    links = [a["href"] for a in soup(page).find("article").find_all("a", href=True)
             if urlsplit(a["href"]).path.endswith(".pdf")]
    assert links, "the welcome page does not link the PDF"
    targets = {(page.parent / unquote(urlsplit(href).path)).resolve() for href in links}
    assert targets == {pdf.resolve()}, f"the welcome page links {links}; the PDF is at {pdf.relative_to(html)}"
    assert pdf.stat().st_size > 1_000_000, f"{pdf} is {pdf.stat().st_size} bytes: too small for this book"
