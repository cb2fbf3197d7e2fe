"""The Colab notebooks and the buttons that open them, checked offline from the session's build.

``tests/colab.py`` writes, for every chapter, the notebook the build executed with a setup cell in
front. Colab itself cannot be reached from here; what can be checked is checked: the notebooks exist
for every chapter, hold exactly the chapter's code, carry the outputs the build made, their setup
cell does nothing outside Colab and, in a stand-in Colab, clones the commit, moves into the chapter
and installs only what is missing; and every chapter page's Colab button points at its notebook.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
from bs4 import BeautifulSoup
from conftest import ROOT, notebook_docs

import colab

pytestmark = pytest.mark.book


@pytest.fixture(scope="session")
def commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture(scope="session")
def notebooks(build, html, commit, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("colab")
    colab.write(html.parent, out, commit)
    return out


def code_cells(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def test_every_chapter_has_a_notebook_with_its_code_and_outputs(notebooks):
    assert colab.chapters(), "no chapters found"
    for doc in colab.chapters():
        nb = nbformat.read(notebooks / f"{doc}.ipynb", as_version=4)
        nbformat.validate(nb)
        setup, *rest = [c for c in nb.cells if c.cell_type == "code"]
        assert colab.SETUP_TAG in setup.metadata.get("tags", []), f"{doc}: the first code cell is not the setup"
        chapter = jupytext.read(ROOT / f"{doc}.md")
        assert [c.source for c in rest] == code_cells(chapter), f"{doc}: the notebook's code differs from the chapter's"
        assert "check_environment(" in rest[0].source, f"{doc}: the handshake does not follow the setup cell"
        assert any(c.outputs for c in rest), f"{doc}: the notebook carries no outputs"


def run_setup(cell: str, cwd: Path, colab_kernel: bool, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a setup cell as a kernel would, in ``cwd``; ``colab_kernel`` stands in google.colab."""
    prelude = "import sys, types; sys.modules['google.colab'] = types.ModuleType('google.colab')\n" if colab_kernel else ""
    script = prelude + cell + "\nimport os; print('CWD=' + os.getcwd())\n"
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def setup_cell(notebooks: Path, doc: str) -> str:
    return nbformat.read(notebooks / f"{doc}.ipynb", as_version=4).cells[0].source


@pytest.mark.parametrize("doc", colab.chapters())
def test_the_setup_cell_does_nothing_outside_colab(notebooks, doc, tmp_path):
    done = run_setup(setup_cell(notebooks, doc), tmp_path, colab_kernel=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"CWD={tmp_path}", f"it printed or moved: {done.stdout!r}"
    assert list(tmp_path.iterdir()) == [], "it wrote files outside Colab"


def test_in_colab_the_setup_cell_clones_the_commit_and_installs_only_what_is_missing(notebooks, commit, tmp_path):
    doc = colab.chapters()[0]
    cell = setup_cell(notebooks, doc)
    # The repository URL is redirected to this clone; everything else runs as in Colab.
    redirect = {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": f"url.{ROOT}.insteadOf",
                "GIT_CONFIG_VALUE_0": colab.repository_url()}
    done = run_setup(cell, tmp_path, colab_kernel=True, env=redirect)
    assert done.returncode == 0, done.stderr[-2000:]
    clone = tmp_path / "gradient-rage"
    head = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert head == commit, f"the clone is at {head}, the notebook was built from {commit}"
    assert f"CWD={clone / Path(doc).parent}" in done.stdout, done.stdout
    assert "Installing" not in done.stdout, f"everything is installed here, yet it installed: {done.stdout}"
    # A package the runtime lacks is installed at its pin, and nothing else is: pip is told no index,
    # so it fails naming exactly what it was asked for.
    lacking = cell.replace("PINS = {", "PINS = {\n        'gradient-rage-absent': '1.0',", 1)
    done = run_setup(lacking, tmp_path, colab_kernel=True, env={**redirect, "PIP_NO_INDEX": "1"})
    assert "Installing what Colab lacks: gradient-rage-absent==1.0\n" in done.stdout, done.stdout
    assert done.returncode != 0 and "gradient-rage-absent" in done.stderr, done.stderr[-1000:]


def test_every_notebook_page_of_a_chapter_gets_a_notebook():
    # A chapter's further page (07's Ray Serve page) is read and run like the chapter itself.
    pages = [doc for doc in notebook_docs() if doc.startswith("notebooks/")]
    assert colab.chapters() == pages, f"pages without a Colab notebook: {sorted(set(pages) - set(colab.chapters()))}"
    assert any(Path(doc).name != Path(doc).parent.name for doc in pages), "no further page left to check"


@pytest.mark.parametrize("doc", colab.chapters())
def test_the_setup_cell_pins_every_package_the_handshake_names(doc):
    """What the chapter's first cell checks is what Colab installs: some of it is never imported by
    the chapter's code (torch's exporter imports onnxscript, uvicorn imports httptools)."""
    from _shared.env_check import normalize

    named = {normalize(name) for name in colab.handshake_packages(colab.chapter_sources(doc))}
    pins = colab.chapter_pins(doc)
    assert named <= pins.keys(), f"{doc}: the handshake names {sorted(named - pins.keys())}, the setup cell would not install them"


def test_a_page_gets_what_the_files_of_another_chapter_it_loads_import():
    """Chapter 07 exports its model with chapter 06's export_model.py, loaded by path; in Colab that
    file needs onnx and onnxscript, which no file of chapter 07 imports."""
    for doc in ("notebooks/07-serve-models/07-serve-models", "notebooks/07-serve-models/serve-with-ray"):
        sources = colab.chapter_sources(doc)
        assert (ROOT / "notebooks/06-compile-and-optimize/export_model.py").read_text() in sources, doc
        assert {"onnx", "onnxscript"} <= colab.chapter_pins(doc).keys(), doc


def test_a_page_does_not_install_what_only_another_page_of_its_folder_uses():
    """ray_serve_app.py sits in chapter 07's folder, but only the Ray Serve page runs it: chapter 07
    in Colab installs no Ray."""
    chapter, ray_page = "notebooks/07-serve-models/07-serve-models", "notebooks/07-serve-models/serve-with-ray"
    ray_app = (ROOT / "notebooks/07-serve-models/ray_serve_app.py").read_text()
    assert ray_app not in colab.chapter_sources(chapter) and "ray" not in colab.chapter_pins(chapter)
    assert ray_app in colab.chapter_sources(ray_page) and "ray" in colab.chapter_pins(ray_page)


def test_every_companion_file_is_found_by_a_page_of_its_chapter():
    """A file is installed for when a page names it; every companion file is named by some page of
    its chapter (one that none names is dead, or run in a way this rule cannot see)."""
    for folder in sorted({Path(doc).parent for doc in colab.chapters()}):
        used = set().union(*(colab.chapter_sources(doc) for doc in colab.chapters() if Path(doc).parent == folder))
        unused = [p.name for p in sorted((ROOT / folder).glob("*.py")) if p.read_text() not in used]
        assert unused == [], f"{folder}: no page names {unused}, so Colab would not install what they import"


def test_a_page_gets_the_extras_the_book_installs_its_packages_with():
    """Ray Serve's page on Colab needs ``ray[serve]``, not bare ``ray``: every locked package that the
    ``serve`` extra requires is in its setup cell's pins (aiohttp, starlette's server stack...)."""
    from importlib import metadata

    from _shared.env_check import normalize, parse_pins
    from packaging.requirements import Requirement

    assert colab.declared_extras().get("ray") == {"serve"}, colab.declared_extras()
    locked = parse_pins((ROOT / "requirements.txt").read_text())
    serve_only = {normalize(r.name) for r in map(Requirement, metadata.requires("ray"))
                  if r.marker and r.marker.evaluate({"extra": "serve"}) and not r.marker.evaluate({"extra": ""})}
    needed = serve_only & locked.keys()
    assert {"aiohttp", "starlette"} <= needed, sorted(needed)
    pins = colab.chapter_pins("notebooks/07-serve-models/serve-with-ray")
    assert needed <= pins.keys(), f"ray[serve] needs these, the setup cell would not install them: {sorted(needed - pins.keys())}"
    assert all(pins[name] == locked[name] for name in pins), "a pin differs from the lock"


def test_every_chapter_page_has_a_colab_button_pointing_at_its_notebook(html):
    for doc in colab.chapters():
        page = BeautifulSoup((html / f"{doc}.html").read_text(), "html.parser")
        buttons = [a["href"] for a in page.find_all("a", href=True) if "colab.research.google.com" in a["href"]]
        assert buttons == [colab.url(doc)], f"{doc}: Colab buttons {buttons}, expected {colab.url(doc)}"
        assert colab.url(doc).endswith(f"/blob/{colab.colab_branch()}/{doc}.ipynb")
    assert "colab.research" not in (html / "book" / "intro.html").read_text(), (
        "a page without a notebook has a Colab button")
