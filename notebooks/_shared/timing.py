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
import sys
import timeit
from dataclasses import dataclass
from typing import Callable

from threadpoolctl import threadpool_info


@dataclass(frozen=True)
class Timing:
    """Per-call seconds of each timed round, with the thread counts they ran under.

    ``threads`` is torch's intra-op thread count (None when torch is not loaded: then it cannot
    matter); ``blas_threads`` is the largest thread count among the loaded BLAS/OpenMP libraries
    that numpy, scipy and scikit-learn use. Pure-Python code uses neither.
    """

    times: tuple[float, ...]
    threads: int | None
    blas_threads: int | None = None

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
        threads = f"torch threads {self.threads if self.threads is not None else 'n/a (not loaded)'}, "
        threads += f"BLAS threads {self.blas_threads if self.blas_threads is not None else 'n/a'}"
        return (
            f"median {self.median * 1e3:.3f} ms per call (IQR {lo * 1e3:.3f}-{hi * 1e3:.3f} ms, "
            f"{len(self.times)} rounds; {threads})"
        )


def current_threads() -> tuple[int | None, int | None]:
    """(torch intra-op threads or None if torch is not imported, max BLAS/OpenMP threads or None)."""
    torch = sys.modules.get("torch")
    pools = [pool["num_threads"] for pool in threadpool_info()]
    return (torch.get_num_threads() if torch is not None else None), (max(pools) if pools else None)


def measure(fn: Callable[[], object], *, repeats: int = 7, number: int = 1, warmup: int = 1) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` rounds of ``number`` calls each."""
    if repeats < 1 or number < 1 or warmup < 0:
        raise ValueError("repeats and number must be >= 1 and warmup >= 0")
    for _ in range(warmup):
        fn()
    rounds = timeit.Timer(fn).repeat(repeat=repeats, number=number)
    torch_threads, blas_threads = current_threads()
    return Timing(times=tuple(t / number for t in rounds), threads=torch_threads, blas_threads=blas_threads)
