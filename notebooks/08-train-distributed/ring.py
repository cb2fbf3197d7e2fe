"""A ring all-reduce, simulated in one process on real tensors, and its cost model.

Not a script: the chapter imports it. ``ring_all_reduce`` does what gloo and NCCL do between
processes, with the messages as list assignments, so that every step can be drawn and the
result checked against a plain sum. ``step_ms`` is the chapter's cost model of a whole
data-parallel step, which the chapter fits to its measurements and the tests pin.
"""

from __future__ import annotations

import torch


def ring_all_reduce(grads: list[torch.Tensor]) -> tuple[list, list, int]:
    """Sum ``grads`` (one tensor per worker) the ring way; return every worker's result,
    after each step how many workers' values each chunk of each worker sums, and the
    elements sent in all (by all workers together)."""
    p = len(grads)
    chunks = [list(g.chunk(p)) for g in grads]
    counts = [[1] * p for _ in range(p)]
    history, sent = [[row[:] for row in counts]], 0
    for step in range(2 * (p - 1)):  # p - 1 steps reduce-scatter, then p - 1 all-gather
        reduce = step < p - 1
        msgs = [(w, (w - step) % p) for w in range(p)]  # worker w sends chunk c to w + 1
        payload = [(chunks[w][c].clone(), counts[w][c]) for w, c in msgs]  # all at once
        for (w, c), (data, n) in zip(msgs, payload):
            nxt, sent = (w + 1) % p, sent + data.numel()
            chunks[nxt][c] = chunks[nxt][c] + data if reduce else data
            counts[nxt][c] = counts[nxt][c] + n if reduce else n
        history.append([row[:] for row in counts])
    return [torch.cat(c) for c in chunks], history, sent


def step_ms(p: int, batch: int, *, cores: int, a: float, c: float, alpha: float,
            beta: float, grad_bytes: int) -> tuple[float, float]:
    """The two terms of one data-parallel step of ``p`` one-thread workers on ``cores``
    cores, in ms: each worker's compute for its ``batch / p`` samples (``a`` ms per step,
    ``c`` per sample), stretched by ``p / cores`` when workers outnumber cores, and a ring
    all-reduce of ``grad_bytes`` (``alpha`` ms per message, ``beta`` GB/s), not overlapped."""
    compute = max(1.0, p / cores) * (a + c * batch / p)
    all_reduce = 2 * (p - 1) * alpha + 2 * (p - 1) / p * grad_bytes / (beta * 1e6)
    return compute, all_reduce
