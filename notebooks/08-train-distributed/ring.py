"""A ring all-reduce, simulated in one process on real tensors, for the chapter's figure.

Not a script: the chapter imports it. It does what gloo and NCCL do between processes, with
the messages as list assignments, so that every step can be drawn and the result checked
against a plain sum.
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
