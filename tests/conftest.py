"""Shared fixtures for the book's tests.

Fast structural tests run first; tests marked ``book`` build and execute the whole book (many
minutes) and are moved to the end of the run, so a broken link or a missing section fails fast;
tests marked ``matrix`` execute the book again under other CPU kernels and seeds, after the build.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))  # the book's shared code, as chapters import it


def pytest_configure(config):
    config.addinivalue_line("markers", "book: builds and executes the whole book (slow, runs last)")
    config.addinivalue_line("markers", "slow: starts real processes or trains; seconds to minutes")
    config.addinivalue_line("markers", "matrix: executes the whole book under a portability cell (minutes, runs last)")


def pytest_collection_modifyitems(config, items):
    def lane(item) -> int:  # fast tests, then the book build, then the portability matrix
        return 2 if item.get_closest_marker("matrix") else 1 if item.get_closest_marker("book") else 0

    items.sort(key=lane)


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toc_files() -> list[str]:
    """Every page in _toc.yml, in reading order, as a path without suffix."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return files


def notebook_docs() -> list[str]:
    """TOC pages that are MyST notebooks (they carry a jupytext header), in reading order."""
    return [f for f in toc_files()
            if (ROOT / f"{f}.md").exists() and "\njupytext:" in "\n" + (ROOT / f"{f}.md").read_text()]


CHAPTER_DIR = re.compile(r"^(\d\d)-([a-z]+(?:-[a-z0-9]+)*)$")


def repo_files() -> list[Path]:
    """The repository's own files: tracked and untracked-but-not-ignored (never .venv or _build)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True)
    if listed.returncode == 0:
        return [ROOT / line for line in listed.stdout.splitlines() if (ROOT / line).is_file()]
    skip = {".git", ".venv", "venv", "_build", "__pycache__", ".pytest_cache", ".hypothesis"}
    return [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]


def chapter_dirs() -> list[Path]:
    return sorted(p for p in NOTEBOOKS.iterdir() if p.is_dir() and CHAPTER_DIR.match(p.name))


def load_module(path: Path, name: str | None = None):
    """Import a companion file by path under a unique module name (several chapters have app.py)."""
    path = Path(path)
    name = name or f"gr_{path.parent.name.replace('-', '_')}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


BUILD_TIMEOUT_S = 60 * 60
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def jupyter_book() -> str:
    return shutil.which("jupyter-book", path=str(Path(sys.executable).parent)) or "jupyter-book"


@pytest.fixture(scope="session")
def build(tmp_path_factory):
    """Build the book from clean into a temporary folder, once per session for every test file that
    reads it; return (returncode, log, html folder, execution cache folder)."""
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
    if returncode == 0:
        from pdf import make_pdf  # the site ships the PDF, as the publish workflow makes it
        make_pdf(html.parent.parent)
    return html
