"""The next release of every package, before readers hit it: what the scheduled build reports.

The lock (``requirements.txt``) hides new releases until someone bumps a pin; readers who install
the book's packages without the lock get the newest ones, and a new release that breaks a chapter
reaches them first. ``.github/workflows/next-release.yml`` installs, every week, the newest releases
that ``binder/ranges.txt`` allows (jupyter-book kept below 2, torch from PyTorch's CPU index), builds
the book from clean, and when the build fails runs this script to write the issue it opens::

    python tests/next_release.py --log build.log --reports _build/html/reports --freeze freeze.txt \\
        --title title.txt --body issue.md

The issue names each failing chapter and the cell that failed (its number, first line and error, from
myst-nb's execution report and the chapter's source), and lists every installed version that
differs from the lock: the suspects.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "notebooks"))

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# nbclient's CellExecutionError: the failing cell's source between two rules, then the traceback.
CELL = re.compile(r"An error occurred while executing the following cell:\n-{18}\n(.*?)\n-{18}\n(.*)", re.S)
TIMEOUT = re.compile(r"A cell timed out while it was being executed, after (\d+) seconds\.")


@dataclass
class Failure:
    doc: str
    cell: int | None  # 1-based among the chapter's code cells; None: not found in the source
    cells: int
    first_line: str
    error: str

    def describe(self) -> str:
        where = f"code cell {self.cell} of {self.cells}" if self.cell else "a code cell not found in the source"
        return f"`{self.doc}`, {where} (`{self.first_line}`): {self.error}"


def code_cells(doc: str) -> list[str]:
    import jupytext

    page = ROOT / f"{doc}.md"
    if not page.is_file():
        return []
    return [c.source.strip() for c in jupytext.read(page).cells if c.cell_type == "code"]


def last_error_line(traceback: str) -> str:
    lines = [line.strip() for line in traceback.splitlines() if line.strip()]
    named = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b", line)]
    return (named or lines or ["(no traceback)"])[-1][:300]


def failure(doc: str, report: str) -> Failure:
    report = ANSI.sub("", report)
    cells = code_cells(doc)
    match = CELL.search(report)
    if match is None:
        timeout = TIMEOUT.search(report)
        error = f"timed out after {timeout.group(1)} s" if timeout else last_error_line(report)
        return Failure(doc, None, len(cells), "?", error)
    source, rest = match.group(1).strip(), match.group(2)
    number = cells.index(source) + 1 if source in cells else None
    first = next((line for line in source.splitlines() if line.strip() and not line.startswith("#")), source[:80])
    return Failure(doc, number, len(cells), first.strip()[:100], last_error_line(rest))


def failures(reports: Path) -> list[Failure]:
    """One per execution report myst-nb wrote (``reports/<docname>.err.log``), in path order."""
    if not reports.is_dir():
        return []
    return [failure(p.relative_to(reports).as_posix().removesuffix(".err.log"), p.read_text(errors="replace"))
            for p in sorted(reports.rglob("*.err.log"))]


def differences(lock: str, freeze: str) -> list[str]:
    """Installed versions that differ from the lock, as 'name pinned -> installed'."""
    from _shared.env_check import parse_pins, same_release

    pinned, installed = parse_pins(lock), parse_pins(freeze)
    changed = [f"{name} {pinned[name]} -> {installed[name]}" for name in sorted(pinned)
               if name in installed and not same_release(installed[name], pinned[name])]
    added = [f"{name} (not in the lock) {installed[name]}" for name in sorted(set(installed) - set(pinned))]
    return changed + added


def issue(log: str, found: list[Failure], diffs: list[str]) -> tuple[str, str]:
    """The issue's title and Markdown body."""
    log = ANSI.sub("", log)
    if found:
        title = "Next release breaks " + ", ".join(f.doc.rsplit("/", 1)[-1] + (f" (cell {f.cell})" if f.cell else "")
                                                    for f in found)
        what = "\n".join(f"- {f.describe()}" for f in found)
    else:
        title = "Next release breaks the book build"
        warnings = [line for line in log.splitlines() if ": WARNING:" in line or ": ERROR:" in line]
        what = "No chapter failed to execute; the build failed on:\n\n```text\n" + "\n".join(
            (warnings or log.splitlines()[-20:])[:30]) + "\n```"
    body = (
        "The scheduled build with the newest releases that `binder/ranges.txt` allows failed "
        "(`.github/workflows/next-release.yml`).\n\n"
        f"## What failed\n\n{what}\n\n"
        f"## Installed versions that differ from requirements.txt\n\n"
        + ("\n".join(f"- {d}" for d in diffs) or "- none") + "\n\n"
        "Reproduce: install those versions into a venv, then "
        "`jupyter-book build . -W -n --keep-going`; the execution reports are in the run's artifacts.\n"
    )
    return title, body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log", type=Path, required=True, help="the build's log")
    parser.add_argument("--reports", type=Path, required=True, help="myst-nb's reports folder (_build/html/reports)")
    parser.add_argument("--freeze", type=Path, required=True, help="`pip freeze` of the environment that built")
    parser.add_argument("--title", type=Path, required=True, help="write the issue's title here")
    parser.add_argument("--body", type=Path, required=True, help="write the issue's body here")
    args = parser.parse_args(argv)
    log = args.log.read_text(errors="replace") if args.log.is_file() else ""
    title, body = issue(log, failures(args.reports),
                        differences((ROOT / "requirements.txt").read_text(), args.freeze.read_text()))
    args.title.write_text(title + "\n")
    args.body.write_text(body)
    print(title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
