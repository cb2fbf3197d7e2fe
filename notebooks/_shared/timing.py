"""Wall-clock timing the way the book reports it: warm-up, repeats, median and spread.

A single ``time.time()`` around one call measures the first call's one-off costs (imports, caches,
allocator growth, lazy initialisation) plus whatever else the machine was doing. ``measure`` runs
the function ``warmup`` times untimed, then ``repeats`` timed rounds of ``number`` calls each, and
reports per-call seconds. Compare two variants as a ratio of medians measured in the same run.

Used from a chapter::

    import sys; sys.path.insert(0, "..")
    from _shared.timing import measure
"""

from __future__ import annotations

import statistics
import timeit
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Timing:
    """Per-call seconds of each timed round, with the thread count they ran under."""

    times: tuple[float, ...]
    threads: int

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def iqr(self) -> tuple[float, float]:
        """25th and 75th percentiles (equal to the single value when there is one round)."""
        if len(self.times) < 2:
            return (self.times[0], self.times[0])
        q = statistics.quantiles(self.times, n=4, method="inclusive")
        return (q[0], q[2])

    def __str__(self) -> str:
        lo, hi = self.iqr
        return (
            f"median {self.median * 1e3:.3f} ms per call (IQR {lo * 1e3:.3f}-{hi * 1e3:.3f} ms, "
            f"{len(self.times)} rounds, {self.threads} torch threads)"
        )


def measure(fn: Callable[[], object], *, repeats: int = 7, number: int = 1, warmup: int = 1) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` rounds of ``number`` calls each."""
    if repeats < 1 or number < 1 or warmup < 0:
        raise ValueError("repeats and number must be >= 1 and warmup >= 0")
    for _ in range(warmup):
        fn()
    rounds = timeit.Timer(fn).repeat(repeat=repeats, number=number)
    return Timing(times=tuple(t / number for t in rounds), threads=torch.get_num_threads())
