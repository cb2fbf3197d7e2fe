"""Write the Colab notebooks: every chapter as the executed ``.ipynb`` the book build made.

Colab cannot open MyST Markdown, and a chapter alone is not enough there: it imports its companion
scripts and the book's shared code, which sit next to it in the repository. So each notebook is the
one the build executed (outputs included, so a reader sees the results before running anything),
with one cell put in front. That cell does nothing outside Colab. Inside Colab it

1. clones the repository at the commit the notebook was built from, once per runtime, and moves
   into the chapter's folder (where the chapter expects to run);
2. installs, at the book's pins, only the packages of this chapter that Colab does not have: the
   packages its code imports and what they depend on, from ``requirements.txt``. Packages Colab
   already has are left alone (replacing Colab's CUDA torch with the lock's would lose the GPU);
3. hands over to the chapter's own first cell, the environment handshake, which says in one line
   which installed versions differ from the book's.

The publish workflow runs, after the book build::

    python tests/colab.py --build _build --out _build/colab --commit "$GITHUB_SHA"

and pushes ``_build/colab`` to the branch named by ``colab_branch`` in ``_config.yml``; the "Open in
Colab" entry of each chapter's launch menu (``book/_ext/colab_button.py``) points there.
``tests/test_colab.py`` writes them from the test session's build and checks them offline.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "book" / "_ext"))
sys.path.insert(0, str(ROOT / "notebooks"))

SETUP_TAG = "colab-setup"

SETUP_CELL = '''\
# Colab only: fetch the chapter's companion files, install what Colab lacks. Elsewhere: nothing.
import sys
if "google.colab" in sys.modules:
    import os, subprocess
    from importlib import metadata
    REPOSITORY, COMMIT, CHAPTER = {repository!r}, {commit!r}, {chapter!r}
    PINS = {pins}
    clone = os.environ.setdefault("GRADIENT_RAGE_CLONE", os.path.abspath("gradient-rage"))
    if not os.path.isdir(os.path.join(clone, ".git")):
        subprocess.run(["git", "clone", "--quiet", REPOSITORY, clone], check=True)
        subprocess.run(["git", "-C", clone, "checkout", "--quiet", COMMIT], check=True)
    os.chdir(os.path.join(clone, CHAPTER))
    def _missing(name):
        try:
            return metadata.version(name) is None
        except metadata.PackageNotFoundError:
            return True
    lacking = [f"{{name}}=={{version}}" for name, version in PINS.items() if _missing(name)]
    if lacking:
        print("Installing what Colab lacks:", " ".join(lacking))
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *lacking], check=True)
# The next cell is the chapter's own first cell: the environment handshake.
'''


def config() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "_config.yml").read_text())


def repository_url() -> str:
    return config()["repository"]["url"]


def colab_branch() -> str:
    return config()["sphinx"]["config"]["colab_branch"]


def chapters() -> list[str]:
    """The chapter pages, in reading order, as TOC paths: each chapter (``notebooks/NN-slug/NN-slug``)
    and its further pages (``notebooks/NN-slug/other-page``)."""
    from colab_button import is_chapter
    from conftest import notebook_docs

    return [doc for doc in notebook_docs() if is_chapter(doc)]


def url(doc: str) -> str:
    from colab_button import colab_url

    return colab_url(repository_url(), colab_branch(), doc)


# What a chapter needs --------------------------------------------------------------------------


def parse_code(source: str) -> ast.Module:
    """A code cell or file as Python (IPython magics and shell lines dropped); empty if it is not Python."""
    lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
    try:
        return ast.parse("\n".join(lines))
    except SyntaxError:
        return ast.Module(body=[], type_ignores=[])


def imported_modules(source: str) -> set[str]:
    """Top-level names of the modules ``source`` imports."""
    found = set()
    for node in ast.walk(parse_code(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


#: A companion file of another chapter, loaded by path (``Path("..") / "06-compile-and-optimize" / "export_model.py"``).
OTHER_CHAPTER_FILE = re.compile(r"""["'](\d\d-[a-z0-9-]+)["']\s*/\s*["']([A-Za-z0-9_]+\.py)["']""")


def chapter_sources(doc: str) -> list[str]:
    """The page's code cells, the companion files it uses (named in its code or in a file it uses:
    ``import server_process``, ``"app:app"``, ``HERE / "guard.py"``), the companion files of other
    chapters it loads by path (chapter 07 exports its model with chapter 06's ``export_model.py``),
    and the book's shared code. A file of the folder that only another page uses is left out, so
    chapter 07 in Colab does not install Ray for its Ray Serve page."""
    import jupytext

    page = ROOT / f"{doc}.md"
    todo = [c.source for c in jupytext.read(page).cells if c.cell_type == "code"]
    sources, taken, folder = list(todo), set(), sorted(page.parent.glob("*.py"))
    while todo:
        source = todo.pop()
        used = [path for path in folder if re.search(rf"\b{re.escape(path.stem)}\b", source)]
        used += [ROOT / "notebooks" / other / name for other, name in OTHER_CHAPTER_FILE.findall(source)]
        for path in used:
            if path.is_file() and path not in taken:
                taken.add(path)
                todo.append(path.read_text())
                sources.append(todo[-1])
    shared = [p.read_text() for p in sorted((ROOT / "notebooks" / "_shared").glob("*.py"))]
    return sources + shared


def handshake_packages(sources: list[str]) -> set[str]:
    """The packages the environment handshake in ``sources`` names (``check_environment("onnxscript")``):
    some are never imported by the chapter's code (torch imports onnxscript, uvicorn httptools)."""
    named = set()
    for node in (node for source in sources for node in ast.walk(parse_code(source))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "check_environment":
            named.update(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return named


def declared_extras() -> dict[str, set[str]]:
    """The extras the book installs a package with (``ray[serve]``), as ``binder/ranges.txt`` names them."""
    from _shared.env_check import normalize
    from packaging.requirements import Requirement

    found = {}
    for line in (ROOT / "binder" / "ranges.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and (req := Requirement(line)).extras:
            found[normalize(req.name)] = set(req.extras)
    return found


def locked_closure(names: set[str], pins: dict[str, str], extras: dict[str, set[str]] | None = None) -> dict[str, str]:
    """``names`` (distributions) and everything they require, as far as the lock pins them; with a
    package's ``extras`` (``{"ray": {"serve"}}``) what those extras require too, or Colab would get
    ``ray`` without what ``ray.serve`` imports."""
    from _shared.env_check import normalize
    from packaging.requirements import Requirement

    wanted = {name: set(e) for name, e in (extras or {}).items()}
    todo, done = [normalize(n) for n in names], {}
    while todo:
        name = todo.pop()
        if name not in pins:
            continue
        new = ({""} | wanted.get(name, set())) - done.get(name, set())
        if not new:
            continue
        done.setdefault(name, set()).update(new)
        for line in metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": extra}) for extra in new):
                dependency = normalize(req.name)
                wanted.setdefault(dependency, set()).update(req.extras)
                todo.append(dependency)
    return {name: pins[name] for name in sorted(done)}


def chapter_pins(doc: str) -> dict[str, str]:
    """Every locked distribution the chapter's code imports, with what those require, at its pin."""
    from _shared.env_check import parse_pins

    pins = parse_pins((ROOT / "requirements.txt").read_text())
    sources = chapter_sources(doc)
    modules = set().union(*(imported_modules(s) for s in sources))
    providers = metadata.packages_distributions()
    dists = {d for m in modules for d in providers.get(m, [])} | handshake_packages(sources)
    return locked_closure(dists, pins, declared_extras())


# The notebooks ----------------------------------------------------------------------------------


def setup_source(doc: str, commit: str) -> str:
    pins = chapter_pins(doc)
    body = ",\n        ".join(f"{name!r}: {version!r}" for name, version in pins.items())
    return SETUP_CELL.format(repository=repository_url(), commit=commit, chapter=str(Path(doc).parent),
                             pins="{\n        " + body + ",\n    }")


def colab_notebook(executed: Path, doc: str, commit: str):
    """The executed notebook with the Colab setup cell in front."""
    import nbformat

    nb = nbformat.read(executed, as_version=4)
    cell = nbformat.v4.new_code_cell(setup_source(doc, commit), metadata={"tags": [SETUP_TAG]})
    nb.cells.insert(0, cell)
    nb.metadata.pop("source_map", None)  # myst-nb's line map of the .md, meaningless here
    nb.metadata["colab"] = {"name": Path(doc).name + ".ipynb", "provenance": []}
    nbformat.validate(nb)
    return nb


def write(build: Path, out: Path, commit: str) -> list[Path]:
    """Write every chapter's Colab notebook from the build folder ``build`` into ``out``."""
    import nbformat

    written = []
    for doc in chapters():
        executed = build / "jupyter_execute" / f"{doc}.ipynb"
        if not executed.is_file():
            raise SystemExit(f"{executed} is missing: build the book first (jupyter-book build .)")
        target = out / f"{doc}.ipynb"
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(colab_notebook(executed, doc, commit), target)
        written.append(target)
    (out / "README.md").write_text(
        f"# Gradient Rage: the chapters as executed notebooks, for Colab\n\n"
        f"Generated from commit {commit} of {repository_url()} by `tests/colab.py`; every push to\n"
        f"main replaces this branch. The book's sources are MyST Markdown on main.\n")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", type=Path, default=ROOT / "_build",
                        help="the book's build folder (holds jupyter_execute/); default: _build")
    parser.add_argument("--out", type=Path, default=ROOT / "_build" / "colab",
                        help="where to write the notebooks; default: _build/colab")
    parser.add_argument("--commit", help="the commit the notebooks clone; default: HEAD")
    parser.add_argument("--print-branch", action="store_true",
                        help="print the branch the notebooks go to (colab_branch in _config.yml) and exit")
    args = parser.parse_args(argv)
    if args.print_branch:
        print(colab_branch())
        return 0
    commit = args.commit or subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True, check=True).stdout.strip()
    for path in write(args.build, args.out, commit):
        print(f"{path.relative_to(args.out)}  ->  {url(str(path.relative_to(args.out).with_suffix('')))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
