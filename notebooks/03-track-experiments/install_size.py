"""What a package adds to an environment: the distributions only it pulls in, and their bytes on disk.

Why a file: the chapter measures what MLflow costs to install, and the tests check the
dependency walk on the real environment. It reads installed metadata only (``importlib.metadata``):
no network, no pip.

Used from the chapter::

    import install_size
    added = install_size.added_by("mlflow", base=["torch", "numpy", "pandas"])
"""

from __future__ import annotations

import re
from importlib import metadata
from typing import Iterable

from packaging.requirements import Requirement


def normalize(name: str) -> str:
    """PEP 503: ``Scikit_Learn`` and ``scikit-learn`` name the same distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, metadata.Distribution]:
    """Every installed distribution by normalised name (the first found wins, as for imports)."""
    found: dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions():
        found.setdefault(normalize(dist.metadata["Name"]), dist)
    return found


def requirements(dist: metadata.Distribution, dists: dict[str, metadata.Distribution]) -> set[str]:
    """The installed distributions ``dist`` requires here, without optional extras."""
    needed = set()
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra, or a marker for another platform or Python
        if normalize(req.name) in dists:
            needed.add(normalize(req.name))
    return needed


def closure(roots: Iterable[str], dists: dict[str, metadata.Distribution]) -> set[str]:
    """``roots`` and everything they require, transitively (roots not installed are skipped)."""
    seen: set[str] = set()
    stack = [normalize(r) for r in roots]
    while stack:
        name = stack.pop()
        if name in seen or name not in dists:
            continue
        seen.add(name)
        stack.extend(requirements(dists[name], dists))
    return seen


def installed_bytes(dist: metadata.Distribution) -> int:
    """Bytes on disk of the files the distribution's RECORD lists (bytecode caches included)."""
    total = 0
    for file in dist.files or []:
        try:
            total += dist.locate_file(file).stat().st_size
        except OSError:
            pass
    return total


def added_by(package: str, base: Iterable[str]) -> dict[str, int]:
    """``{distribution: bytes}`` for what ``package`` needs that ``base`` does not already pull in."""
    dists = installed()
    extra = closure([package], dists) - closure(base, dists)
    return dict(sorted(((n, installed_bytes(dists[n])) for n in extra), key=lambda kv: -kv[1]))
