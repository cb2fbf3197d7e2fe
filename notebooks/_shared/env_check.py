"""The environment handshake every chapter runs in its first (hidden) cell.

A chapter's numbers are only comparable to the book's when the key packages are the versions the
book was executed with. This module compares what is installed with the pins in the repository's
``requirements.txt`` and prints one actionable line when they differ: what differs and the command
that fixes it. When everything matches it prints nothing.

Used from a chapter (the chapter's working directory is its own folder, so ``..`` is ``notebooks/``)::

    import sys; sys.path.insert(0, "..")
    from _shared.env_check import check_environment; check_environment("onnxruntime")
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable

from packaging.version import InvalidVersion, Version

#: Checked in every chapter; a chapter adds the packages only it needs.
KEY_PACKAGES = ("torch", "numpy", "pandas", "scikit-learn", "matplotlib", "jupytext")

_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*==\s*([^\s;#]+)")


def normalize(name: str) -> str:
    """PEP 503 name normalisation: ``Scikit_Learn`` and ``scikit-learn`` are the same package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(text: str) -> dict[str, str]:
    """Map normalised package name -> pinned version for every ``name==version`` line."""
    pins = {}
    for line in text.splitlines():
        match = _PIN.match(line)
        if match:
            pins[normalize(match.group(1))] = match.group(2)
    return pins


def find_requirements(start: Path | None = None) -> Path | None:
    """The nearest ``requirements.txt`` in ``start`` or a folder above it."""
    start = Path.cwd() if start is None else Path(start)
    for folder in (start, *start.resolve().parents):
        candidate = folder / "requirements.txt"
        if candidate.is_file():
            return candidate
    return None


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def same_release(installed: str, pinned: str) -> bool:
    """True when ``installed`` is the pinned release.

    A local build label is ignored unless the pin names one: ``2.13.0+cpu`` and ``2.13.0+cu130``
    are both torch 2.13.0, so a reader with a GPU build is not told to reinstall.
    """
    try:
        have, want = Version(installed), Version(pinned)
    except InvalidVersion:
        return installed == pinned
    if want.local is None:
        return have.public == want.public
    return have == want


@dataclass(frozen=True)
class Mismatch:
    name: str
    pinned: str
    installed: str | None  # None: not installed

    def describe(self) -> str:
        if self.installed is None:
            return f"{self.name} is missing (pinned {self.pinned})"
        return f"{self.name} {self.installed} is installed, pinned {self.pinned}"


def compare(
    pins: dict[str, str],
    packages: Iterable[str],
    version_of: Callable[[str], str | None] = installed_version,
) -> list[Mismatch]:
    """The packages among ``packages`` whose installed version differs from its pin.

    A package that ``requirements.txt`` does not pin is not checked (there is nothing to compare).
    """
    found = []
    for name in dict.fromkeys(normalize(p) for p in packages):
        if name not in pins:
            continue
        have = version_of(name)
        if have is None or not same_release(have, pins[name]):
            found.append(Mismatch(name, pins[name], have))
    return found


def fix_command(requirements: Path, python: str | None = None) -> str:
    python = python or sys.executable
    return f"{shlex.quote(python)} -m pip install -r {shlex.quote(str(requirements))}"


def mismatch_message(mismatches: list[Mismatch], requirements: Path, python: str | None = None) -> str:
    """One line: what differs, why it matters, and the command that fixes it."""
    what = "; ".join(m.describe() for m in mismatches)
    return (
        f"Environment differs from {requirements.name}: {what}. "
        f"Results may differ from the book's. Fix: {fix_command(requirements, python)}"
    )


def describe_machine() -> dict:
    """The hardware a run happened on: CPU model, usable cores, memory, GPU (or "none"), Python."""
    import platform

    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)
        cpu = names[0] if names else cpu
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "python": platform.python_version()}


def check_environment(*extra: str, start: Path | None = None, echo: bool = True) -> str | None:
    """Compare the key packages (plus ``extra``) with the pins; print and return one line if they differ."""
    requirements = find_requirements(start)
    if requirements is None:
        line = (
            f"No requirements.txt found in {Path.cwd() if start is None else start} or above, so package "
            "versions cannot be checked. Run the chapter from a clone of the book's repository."
        )
    else:
        pins = parse_pins(requirements.read_text())
        mismatches = compare(pins, (*KEY_PACKAGES, *extra))
        line = mismatch_message(mismatches, requirements) if mismatches else None
    if line and echo:
        print(line)
    return line
