"""The book's shape: what a reader and a chapter author rely on without running a chapter.

TOC and chapter folders agree, folder numbers follow the TOC, every chapter has the template's
sections and label, cells stay small, nothing stores outputs, and every companion script answers
``--help``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CHAPTER_DIR, NOTEBOOKS, ROOT, chapter_dirs, notebook_docs, toc_files

TEMPLATE = NOTEBOOKS / "_template" / "_template.md"
REQUIRED_SECTIONS = [
    "What you will learn",
    "Run it",
    "Set up",
    "What to take away",
    "Exercises",
    "Going further",
]
MAX_CELL_LINES = 25
FENCE = re.compile(r"^(`{3,}|:{3,})")
CODE_CELL = re.compile(r"^```\{code-cell\}[^\n]*\n(.*?)^```", re.S | re.M)


def tokens(text: str):
    """The MyST parser's block tokens: headings, targets and roles as Sphinx will see them (code and
    comments are their own tokens, so a heading or a role named in a comment or a code block is not one)."""
    from markdown_it.renderer import RendererHTML
    from myst_parser.config.main import MdParserConfig
    from myst_parser.parsers.mdit import create_md_parser

    config = MdParserConfig(enable_extensions={"colon_fence", "dollarmath", "amsmath", "deflist"})
    return create_md_parser(config, RendererHTML).parse(text)


def inline_children(text: str):
    return [child for t in tokens(text) if t.type == "inline" for child in t.children or []]


def ref_targets(text: str) -> set[str]:
    """Targets of every {ref} role: `text <target>` or `target`."""
    found = set()
    for child in inline_children(text):
        if child.type == "myst_role" and child.meta.get("name") in ("ref", "numref"):
            m = re.search(r"<([^<>]+)>\s*$", child.content)
            found.add(m.group(1) if m else child.content.strip())
    return found


def chapter_sources() -> list[Path]:
    return [d / f"{d.name}.md" for d in chapter_dirs()]


def is_chapter_entry(entry: str) -> bool:
    parts = Path(entry).parts
    return len(parts) == 3 and parts[2] == parts[1]


def toc_chapters() -> list[str]:
    """The chapters' own pages (notebooks/NN-slug/NN-slug), in TOC order."""
    return [f for f in toc_files() if f.startswith("notebooks/") and is_chapter_entry(f)]


def toc_chapter_pages() -> list[str]:
    """Further pages of a chapter (notebooks/NN-slug/other-page): sections of the chapter in the TOC."""
    return [f for f in toc_files() if f.startswith("notebooks/") and not is_chapter_entry(f)]


def page_sources() -> list[Path]:
    """Every page that follows the chapter template: the chapters, their further pages, the template."""
    return [*chapter_sources(), *(ROOT / f"{f}.md" for f in toc_chapter_pages()), TEMPLATE]


def headings(text: str) -> list[tuple[int, str]]:
    """(level, title) of every Markdown heading, as the MyST parser reads the page."""
    found, toks = [], tokens(text)
    for i, t in enumerate(toks):
        if t.type == "heading_open":
            found.append((int(t.tag[1]), toks[i + 1].content.strip()))
    return found


def cell_line_count(body: str) -> int:
    """Non-blank lines of code, not counting the cell's ``:tags:``-style option lines."""
    return sum(1 for line in body.splitlines() if line.strip() and not re.match(r"^:\w[\w-]*:", line))


def notebook_pages() -> list[Path]:
    """Every source in the TOC that is a MyST notebook, plus the template."""
    return [ROOT / f"{f}.md" for f in notebook_docs()] + [TEMPLATE]


def test_every_toc_entry_exists():
    for f in toc_files():
        assert (ROOT / f"{f}.md").exists() or (ROOT / f"{f}.ipynb").exists(), f"_toc.yml lists {f}, which does not exist"


def test_toc_and_chapter_folders_agree():
    listed = toc_chapters()
    for entry in listed:
        parts = Path(entry).parts
        assert len(parts) == 3 and CHAPTER_DIR.match(parts[1]) and parts[2] == parts[1], (
            f"{entry}: a chapter lives at notebooks/NN-verb-slug/NN-verb-slug"
        )
    on_disk = {f"notebooks/{d.name}/{d.name}" for d in chapter_dirs()}
    assert on_disk - set(listed) == set(), f"chapter folders missing from _toc.yml: {sorted(on_disk - set(listed))}"
    assert set(listed) - on_disk == set()


def test_a_further_page_of_a_chapter_is_a_section_of_it():
    """A chapter that outgrows its time budget may split off a page (07 keeps Ray Serve on its own page):
    the page lives in the chapter's folder and is a section of the chapter's entry in _toc.yml."""
    import yaml

    sections: dict[str, list[str]] = {}

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                sections[entry["file"]] = [s.get("file") for s in entry.get("sections") or []]
            walk(entry.get("sections"))

    for part in yaml.safe_load((ROOT / "_toc.yml").read_text()).get("parts", []):
        walk(part.get("chapters"))
    for page in toc_chapter_pages():
        parts = Path(page).parts
        assert len(parts) == 3 and CHAPTER_DIR.match(parts[1]) and not CHAPTER_DIR.match(parts[2]), (
            f"{page}: a further page lives at notebooks/NN-verb-slug/verb-slug (no number of its own)")
        chapter = f"notebooks/{parts[1]}/{parts[1]}"
        assert page in sections.get(chapter, []), f"{page}: list it in _toc.yml as a section of {chapter}"


def test_folder_numbers_follow_toc_order():
    numbers = [int(Path(f).parts[1][:2]) for f in toc_chapters()]
    assert numbers == sorted(set(numbers)), f"chapter numbers in TOC order are {numbers}; NN is the place in the TOC"
    assert all(n >= 1 for n in numbers)


def test_template_is_not_in_toc():
    assert not any("_template" in f for f in toc_files())


@pytest.mark.parametrize("source", page_sources(), ids=lambda p: str(p.relative_to(NOTEBOOKS)))
def test_chapter_has_label_title_and_template_sections(source: Path):
    text = source.read_text()
    found = headings(text)
    titles = [t for level, t in found if level == 1]
    assert len(titles) == 1, f"{source.name}: exactly one '#' title, found {titles}"
    slug = source.parent.name[3:] if source != TEMPLATE else "template"
    toks = [t for t in tokens(text) if t.type != "front_matter"]
    first_h1 = next(i for i, t in enumerate(toks) if t.type == "heading_open" and t.tag == "h1")
    label = toks[first_h1 - 1] if first_h1 else None
    own = source.stem == source.parent.name or source == TEMPLATE  # a chapter's page, not a further page
    wanted = f"ch-{slug}" if own else f"{slug.split('-')[0]}-"  # a further page: a label of its chapter's family
    assert label is not None and label.type == "myst_target" and (
        label.content == wanted if own else label.content.startswith(wanted)), (
        f"{source.name}: the label ({wanted}{'' if own else '...'})= must sit right above the title")
    sections = [t for level, t in found if level == 2]
    positions = []
    for name in REQUIRED_SECTIONS:
        assert name in sections, f"{source.name}: missing the section '## {name}'"
        positions.append(sections.index(name))
    assert positions == sorted(positions), f"{source.name}: sections must come in the template's order"
    steps = sections[sections.index("Set up") + 1 : sections.index("What to take away")]
    assert steps, f"{source.name}: no step sections between 'Set up' and 'What to take away'"


@pytest.mark.parametrize("source", page_sources(), ids=lambda p: str(p.relative_to(NOTEBOOKS)))
def test_chapter_starts_with_the_environment_handshake(source: Path):
    import ast

    import jupytext

    code = [c for c in jupytext.read(source).cells if c.cell_type == "code"]
    assert code, f"{source.name} has no code cells"
    calls = [n.func.id for n in ast.walk(ast.parse(code[0].source))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    assert "check_environment" in calls, f"{source.name}: the first cell must call check_environment()"
    assert "hide-input" in code[0].metadata.get("tags", []), f"{source.name}: the handshake cell is tagged hide-input"


@pytest.mark.parametrize("source", notebook_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_cell_over_the_ceiling(source: Path):
    for body in CODE_CELL.findall(source.read_text()):
        n = cell_line_count(body)
        assert n <= MAX_CELL_LINES, (
            f"{source.relative_to(ROOT)}: a code cell of {n} lines (ceiling {MAX_CELL_LINES}); move code to a "
            f"companion file and literalinclude it. Cell starts: {body.strip().splitlines()[0]!r}"
        )


def test_no_stored_outputs():
    tracked = subprocess.run(["git", "ls-files", "*.ipynb"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode == 0:
        assert tracked.stdout.strip() == "", f"notebooks with stored outputs are tracked: {tracked.stdout.split()}"
    else:  # not a git checkout: look at the files themselves
        stray = [p for p in ROOT.glob("notebooks/**/*.ipynb") if ".ipynb_checkpoints" not in p.parts]
        assert stray == [], f"chapters are MyST Markdown; found {stray}"


@pytest.mark.parametrize("source", notebook_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_writefile(source: Path):
    assert "%%writefile" not in source.read_text(), "companion files are real files, never %%writefile"


def companion_files(chapter: Path) -> list[Path]:
    return sorted(
        p for p in chapter.iterdir()
        if p.is_file() and p.name not in {f"{chapter.name}.md", "README.md"} and not p.name.startswith(".")
    )


def scripts() -> list[Path]:
    return [
        p for d in chapter_dirs() for p in companion_files(d)
        if p.suffix == ".py" and re.search(r"^if __name__ == .__main__.:", p.read_text(), re.M)
    ]


@pytest.mark.parametrize("script", scripts(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_script_answers_help(script: Path):
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{script.name} --help failed:\n{done.stderr[-2000:]}"
    assert "usage" in done.stdout.lower(), f"{script.name} --help printed no usage line"


@pytest.mark.parametrize("chapter", chapter_dirs(), ids=lambda p: p.name)
def test_chapter_folder_readme_lists_every_file(chapter: Path):
    files = companion_files(chapter)
    if not files:
        return
    readme = chapter / "README.md"
    assert readme.exists(), f"{chapter.name} has companion files but no README.md listing them"
    toks = tokens(readme.read_text())
    listed = set()  # file names in code spans inside list items or table cells, the README's two forms
    opens = {"list_item_open": 1, "td_open": 1, "list_item_close": -1, "td_close": -1}
    depth = 0
    for t in toks:
        depth += opens.get(t.type, 0)
        if t.type == "inline" and depth > 0:
            listed |= {c.content.strip() for c in t.children or [] if c.type == "code_inline"}
    missing = [f.name for f in [chapter / f"{chapter.name}.md", *files] if f.name not in listed]
    assert missing == [], f"{chapter.name}/README.md lists no line for {missing}"


@pytest.mark.parametrize("chapter", chapter_dirs(), ids=lambda p: p.name)
def test_chapter_with_companion_code_has_its_test_file(chapter: Path):
    if not any(p.suffix == ".py" for p in companion_files(chapter)):
        return
    test_file = ROOT / "tests" / f"test_{chapter.name.replace('-', '_')}.py"
    assert test_file.exists(), f"{chapter.name} has companion code; its tests belong in tests/{test_file.name}"


def test_welcome_page_links_every_chapter():
    targets = ref_targets((ROOT / "book" / "intro.md").read_text())
    missing = [f"ch-{Path(e).parts[1][3:]}" for e in toc_chapters() if f"ch-{Path(e).parts[1][3:]}" not in targets]
    assert missing == [], f"book/intro.md has no {{ref}} link to {missing}"


def test_readme_chapter_table_has_every_chapter():
    rows, row = [], []
    for t in tokens((ROOT / "README.md").read_text()):
        if t.type == "tr_open":
            row = []
        elif t.type == "inline" and t.children is not None:
            row.append(t.content)
        elif t.type == "tr_close":
            rows.append(row)
    for entry in toc_chapters():
        folder = Path(entry).parts[1]
        assert any(any(cell.strip("` /") == f"notebooks/{folder}" for cell in r) for r in rows), (
            f"README.md's chapter table has no row whose folder cell is notebooks/{folder}/")
