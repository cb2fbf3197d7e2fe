"""The book's seed, in one place, so that the whole book can be executed with another one.

Every chapter takes its seed from here. By default it is 0, the seed the book is published with.
Setting the environment variable ``GRADIENT_RAGE_SEED`` to another integer re-runs every chapter
with other random draws: the numbers change, and every sentence and every assert must still hold.
The portability matrix (``tests/portability.py``) does exactly that, because another seed is the
cheapest stand-in for another reader's machine, where different floating-point rounding makes the
same seed take a different path.

Used from a chapter (the chapter's working directory is its own folder, so ``..`` is ``notebooks/``)::

    import sys; sys.path.insert(0, "..")
    from _shared.seed import SEED, seeds
"""

from __future__ import annotations

import os

ENV_VAR = "GRADIENT_RAGE_SEED"
DEFAULT = 0


def book_seed(environ: dict | None = None) -> int:
    """The seed for this execution: ``GRADIENT_RAGE_SEED`` if set, else 0; a clear error if it is not an integer."""
    environ = os.environ if environ is None else environ
    raw = environ.get(ENV_VAR, "").strip()
    if not raw:
        return DEFAULT
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{ENV_VAR}={raw!r} is not an integer; unset it or give a whole number") from None
    if value < 0:
        raise ValueError(f"{ENV_VAR}={value} is negative; NumPy and PyTorch seeds must be >= 0")
    return value


SEED = book_seed()


def seeds(n: int, seed: int | None = None) -> list[int]:
    """``n`` distinct seeds for repeated runs (seed 0: 0, 1, ..., n-1; seed s: s*1000, ..., s*1000+n-1).

    Sets for different book seeds do not overlap as long as ``n`` <= 1000, so a chapter that runs
    ten seeds sees ten new ones when the book seed changes, not nine of the same.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    base = SEED if seed is None else seed
    return [base * 1000 + i for i in range(n)]
