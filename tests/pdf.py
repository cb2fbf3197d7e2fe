"""The whole book as one PDF, made from the executed build without executing anything again.

Readers of executable books ask for a PDF more than for anything else. The route here needs
nothing the book does not already have: Sphinx's ``singlehtml`` builder writes every page, in
reading order, into one HTML page from the doctrees the HTML build left (the notebooks' outputs come
from that build's execution cache), and headless Chromium, driven by Playwright, prints it with the
theme's print stylesheet. Requests leave ``file://`` never: the PDF is made offline, so what it
shows is what the book ships. The LaTeX route would install TeX Live (about 130 MB to download and
400 MB installed, on every CI run) and fight the theme's HTML outputs.

After a book build into ``OUT`` (``jupyter-book build . --path-output OUT``, default: the book's own
folder)::

    python tests/pdf.py                      # writes _build/html/gradient-rage.pdf
    python tests/pdf.py --path-output OUT    # the same for a build made elsewhere

It fails if the single-page build would execute a notebook (the HTML build must have run first),
if Chromium is missing, or if the single-page build warns. Chromium: ``$CHROMIUM`` if set, else
``chromium`` (or ``chromium-browser``) on PATH, else the browser Playwright installed itself. The
welcome page links the PDF; ``tests/test_pdf.py`` checks it holds every chapter, its figures and no raw markup.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PDF_NAME = "gradient-rage.pdf"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
EXECUTING = re.compile(r"^(\S+): Executing notebook", re.M)


class PdfError(RuntimeError):
    """The PDF cannot be made as it should be; the message says why and what to do."""

# Run in the page before printing: make section links local, open dropdowns, load every image now (the theme marks some lazy, and a page
# never scrolled into view would print blank), and wait for MathJax to typeset when it is there.
SETTLE = """async (self) => {
  // Links to a section of the book point at the root document's file: make them links within
  // the page, which the PDF turns into links to the page that holds the section.
  for (const a of document.querySelectorAll("a[href]")) {
    const url = new URL(a.getAttribute("href"), document.baseURI);
    if (url.protocol === "file:" && url.pathname.endsWith(self) && url.hash) a.setAttribute("href", url.hash);
  }
  // Paper cannot be clicked: open the dropdowns (the exercises' solutions).
  for (const d of document.querySelectorAll("details.sd-dropdown")) d.open = true;
  for (const img of document.images) img.loading = "eager";
  await Promise.all([...document.images].map(img => img.complete ? null
      : new Promise(done => { img.onload = img.onerror = done; })));
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  await document.fonts.ready;
  return [...document.images].filter(img => !img.naturalWidth).map(img => img.getAttribute("src"));
}"""


# The theme's print stylesheet is written for one page at a time; a book needs a little more.
PRINT_CSS = """@media print {
  h1 { break-before: page; }                       /* every page of the book starts a PDF page */
  h2, h3, h4 { break-after: avoid; }
  pre { white-space: pre-wrap !important; overflow-wrap: anywhere; }   /* no code cut at the margin */
  div.cell, figure, table, .admonition { break-inside: avoid; }
  details.above-input, details.below-input, .headerlink { display: none !important; } /* hidden code stays hidden */
}"""


CHROMIUM_NAMES = ("chromium", "chromium-browser")  # Debian's name, then Ubuntu's


def chromium() -> str | None:
    """The system Chromium (``$CHROMIUM`` if set, else the first of ``CHROMIUM_NAMES`` on PATH), or
    None: then Playwright launches the browser it installed itself (``playwright install``), if any.
    The browser test and the PDF both use this one lookup."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def jupyter_book() -> str:
    return shutil.which("jupyter-book", path=str(Path(sys.executable).parent)) or "jupyter-book"


def build_singlehtml(path_output: Path) -> tuple[Path, str]:
    """Write the single-page book from the build in ``path_output``; return the page and the log."""
    cmd = [jupyter_book(), "build", str(ROOT), "--path-output", str(path_output), "--builder", "singlehtml",
           "-W", "-n", "--keep-going"]
    # The single-page build rewrites _build/jupyter_execute/ without the outputs; the HTML build's
    # executed notebooks there (the site's downloads, the Colab notebooks) are kept as they were.
    execute_dir = path_output / "_build" / "jupyter_execute"
    kept = path_output / "_build" / ".jupyter_execute.kept"
    shutil.rmtree(kept, ignore_errors=True)
    if execute_dir.is_dir():
        shutil.copytree(execute_dir, kept)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        if kept.is_dir():
            shutil.rmtree(execute_dir, ignore_errors=True)
            kept.rename(execute_dir)
    log = ANSI.sub("", done.stdout + done.stderr)
    executed = EXECUTING.findall(log)
    if executed:
        raise PdfError(f"the single-page build executed {executed}: build the HTML first, into the same "
                         f"--path-output, so every page comes from the execution cache")
    if done.returncode != 0:
        warnings = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
        raise PdfError(f"the single-page build failed (exit {done.returncode}):\n" + "\n".join(warnings[:30])
                         + f"\n{log[-2000:]}")
    import yaml

    # The single page is written as the root document (book/intro.html), but every link in it is
    # relative to the output folder (_images/..., _static/...), so it is read from there.
    folder = path_output / "_build" / "singlehtml"
    written = folder / (yaml.safe_load((ROOT / "_toc.yml").read_text())["root"] + ".html")
    if not written.is_file():
        raise PdfError(f"no {written}; log tail:\n{log[-2000:]}")
    page = folder / "gradient-rage.html"
    shutil.copyfile(written, page)
    return page, log


def print_pdf(index: Path, pdf: Path) -> dict:
    """Print ``index`` to ``pdf`` with headless Chromium, nothing fetched from outside ``file://``."""
    from playwright.sync_api import sync_playwright

    blocked, errors = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium())
        try:
            page = browser.new_page()

            def only_local(route):
                if route.request.url.startswith(("file:", "data:")):
                    route.continue_()
                else:
                    blocked.append(route.request.url)
                    route.abort()

            page.route("**/*", only_local)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(index.as_uri(), wait_until="load", timeout=120_000)
            import yaml

            broken = page.evaluate(SETTLE, "/" + yaml.safe_load((ROOT / "_toc.yml").read_text())["root"] + ".html")
            if broken:
                raise PdfError(f"images that did not load: {broken[:10]}")
            page.add_style_tag(content=PRINT_CSS)
            page.emulate_media(media="print")
            pdf.parent.mkdir(parents=True, exist_ok=True)
            page.pdf(path=str(pdf), format="A4", print_background=True, outline=True, tagged=True,
                     margin={"top": "18mm", "bottom": "18mm", "left": "16mm", "right": "16mm"})
        finally:
            browser.close()
    return {"blocked_requests": blocked, "page_errors": errors}


def make_pdf(path_output: Path = ROOT, pdf: Path | None = None) -> Path:
    """Build the single page from the executed build in ``path_output`` and print it; return the PDF."""
    pdf = pdf or path_output / "_build" / "html" / PDF_NAME
    started = time.monotonic()
    page, _ = build_singlehtml(path_output)
    built = time.monotonic()
    seen = print_pdf(page, pdf)
    printed = time.monotonic()
    print(f"pdf.py: single page built in {built - started:.1f} s, printed in {printed - built:.1f} s: "
          f"{pdf} ({pdf.stat().st_size / 2**20:.1f} MB)")
    if seen["blocked_requests"]:
        print(f"pdf.py: blocked {len(seen['blocked_requests'])} requests outside the book: "
              f"{sorted(set(seen['blocked_requests']))[:5]}")
    return pdf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--path-output", type=Path, default=ROOT,
                        help="the --path-output of the HTML build (holds _build/); default: the book's folder")
    parser.add_argument("--pdf", type=Path, help=f"where to write the PDF; default: _build/html/{PDF_NAME}")
    args = parser.parse_args(argv)
    try:
        make_pdf(args.path_output.resolve(), args.pdf)
    except PdfError as error:
        print(f"pdf.py: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
