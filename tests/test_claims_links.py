"""The welcome page, the teams essay and the rants say only what the book does, and point to where.

The phrasing is standardised: a sentence that says what a chapter or the book does ("chapter 04
plants bugs ...", "this book pins ...", "the build fails ...") carries a link to the section that
shows it, and every link resolves: a ``{ref}`` to a label defined in a page of the book, a
Markdown link to a file that exists and, after ``#``, to a heading in it (the book builds heading
anchors down to level 3, slugged the way MyST slugs them). A negated claim ("this book does not
yet show drift monitoring") needs no link. Pages are parsed with the MyST parser,
the same one the build uses, so a link inside code or a comment is not mistaken for a link.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import pytest
from conftest import ROOT, toc_files
from markdown_it.renderer import RendererHTML
from myst_parser.config.main import MdParserConfig
from myst_parser.mdit_to_docutils.base import default_slugify
from myst_parser.parsers.mdit import create_md_parser

ESSAYS = sorted({ROOT / "book" / "intro.md", ROOT / "book" / "teams.md", *(ROOT / "book" / "rants").glob("*.md")})
HEADING_ANCHOR_DEPTH = 3  # _config.yml: myst_heading_anchors

#: A claim about what the book does: "chapter NN" or "this/the book" or "the build", and a verb of doing.
SUBJECT = re.compile(r"\b(?:[Cc]hapters? \d\d|[Tt]his book|[Tt]he book|[Tt]he build)\b")
VERB = re.compile(r"\b(?:shows?|teach(?:es)?|measures?|asserts?|checks?|builds?|runs?|trains?|serves?|plants?"
                  r"|pins?|fails?|computes?|executes?|uses?|prints?|catches|starts?)\b")
LINK = re.compile(r"\{ref\}`|\]\(")
#: A negated claim ("this book does not yet show drift monitoring") has nothing to link to.
NEGATED = re.compile(r"\b(?:not|never|no longer)\b")


@lru_cache(maxsize=None)
def parser():
    config = MdParserConfig(enable_extensions={"colon_fence", "dollarmath", "amsmath", "deflist"})
    return create_md_parser(config, RendererHTML)


def tokens(text: str):
    def walk(items):
        for t in items:
            yield t
            if t.children:
                yield from walk(t.children)
    return list(walk(parser().parse(text)))


@lru_cache(maxsize=None)
def labels() -> frozenset[str]:
    """Every label a {ref} can reach: ``(label)=`` targets and ``:name:`` options in the book's pages."""
    found = set()
    for page in toc_files():
        path = ROOT / f"{page}.md"
        if not path.exists():
            continue
        text = path.read_text()
        found |= {t.content for t in tokens(text) if t.type == "myst_target"}
        found |= set(re.findall(r"^:name:\s*(\S+)", text, flags=re.M))
    return frozenset(found)


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    """Heading anchors of one page, at the depth the book builds them."""
    items, found = tokens(path.read_text()), set()
    for i, t in enumerate(items):
        if t.type == "heading_open" and int(t.tag[1]) <= HEADING_ANCHOR_DEPTH:
            found.add(default_slugify(items[i + 1].content))
    return frozenset(found)


def broken_links(path: Path, text: str | None = None) -> list[str]:
    """Every {ref} and local Markdown link in a page that does not resolve, with the reason."""
    text = path.read_text() if text is None else text
    broken = []
    for t in tokens(text):
        if t.type == "myst_role" and t.meta.get("name") == "ref":
            label = re.sub(r"^.*<(.+)>$", r"\1", t.content.strip(), flags=re.S)
            if label not in labels():
                broken.append(f"{{ref}} to {label!r}: no such label in the book")
        elif t.type == "link_open":
            href = t.attrs.get("href", "")
            if re.match(r"^[a-z]+:", href):
                continue  # an external address
            target, _, anchor = href.partition("#")
            file = (path.parent / target).resolve() if target else path
            if not file.exists():
                broken.append(f"link to {href!r}: {file} does not exist")
            elif anchor and anchor not in anchors(file):
                broken.append(f"link to {href!r}: no heading with anchor {anchor!r} in {file.name}")
    return broken


def unlinked_claims(text: str) -> list[str]:
    """Sentences that say what a chapter or the book does, without a link to where it does it."""
    found = []
    for t in tokens(text):
        if t.type != "inline":
            continue
        for sentence in re.split(r"(?<=[.!?:;])\s+(?=[A-Z(\[*{])", t.content.replace("\n", " ")):
            if SUBJECT.search(sentence) and VERB.search(sentence) and not LINK.search(sentence) \
                    and not NEGATED.search(sentence):
                found.append(sentence)
    return found


@pytest.mark.parametrize("path", ESSAYS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(path):
    assert broken_links(path) == []


@pytest.mark.parametrize("path", ESSAYS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_claim_about_the_book_links_to_where_it_is_shown(path):
    assert unlinked_claims(path.read_text()) == []


def test_the_checks_catch_an_unlinked_claim_and_a_dangling_anchor():
    page = ROOT / "book" / "teams.md"
    claim = "Chapter 07 shows drift monitoring. It is good."
    assert unlinked_claims(claim) == ["Chapter 07 shows drift monitoring."]
    linked = "[Chapter 07 shows a server](../notebooks/07-serve-models/07-serve-models.md#build-the-server)."
    assert unlinked_claims(linked) == [] and broken_links(page, linked) == []
    dangling = "[Chapter 07 shows drift](../notebooks/07-serve-models/07-serve-models.md#monitor-drift)."
    assert broken_links(page, dangling) == [
        "link to '../notebooks/07-serve-models/07-serve-models.md#monitor-drift': "
        "no heading with anchor 'monitor-drift' in 07-serve-models.md"]
    assert broken_links(page, "See {ref}`the drift section <serve-drift-missing>`.") == [
        "{ref} to 'serve-drift-missing': no such label in the book"]
    assert unlinked_claims("```python\n# the book runs this\n```\n") == []  # code is not prose
    assert unlinked_claims("This book does not yet show drift monitoring.") == []  # nothing to link to
