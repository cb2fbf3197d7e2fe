"""Activation memory on the CPU, measured: what a forward pass keeps for backward, with and
without activation checkpointing.

Not a script: the chapter imports it. torch has no allocator counter for the CPU
(``torch.cuda.max_memory_allocated`` exists only for GPUs), but CPU tensors are allocated
through the C library's malloc, and glibc's ``mallinfo2`` reports the bytes in use: the
difference across a forward pass is what the autograd graph holds on to. Linux (glibc 2.33+)
only; elsewhere ``bytes_in_use`` raises with that reason.
"""

from __future__ import annotations

import ctypes
import statistics
import time

import torch
from torch.utils.checkpoint import checkpoint_sequential


class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2: ten size_t fields
    _fields_ = [(f, ctypes.c_size_t) for f in "arena ordblks smblks hblks hblkhd usmblks "
                "fsmblks uordblks fordblks keepcost".split()]


def bytes_in_use() -> int:
    """Bytes malloc has handed out and not had back: heap blocks plus mmapped large ones."""
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        raise RuntimeError("this C library has no mallinfo2 (glibc 2.33 or later on Linux): "
                           "the activation measurement needs it")
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def make_mlp(layers: int, width: int, seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    blocks = [m for _ in range(layers) for m in (torch.nn.Linear(width, width), torch.nn.ReLU())]
    return torch.nn.Sequential(*blocks)


def activation_checkpointing(seed: int, layers=16, width=256, rows=128, segments=4,
                             rounds=7) -> dict:
    """Bytes kept for backward (median of 3) and step ms (median of ``rounds``, the two
    forwards taking turns), plain and checkpointed, plus what the arithmetic predicts."""
    mlp = make_mlp(layers, width, seed)
    x = torch.randn(rows, width)
    forwards = {"plain": lambda: mlp(x),
                "checkpointed": lambda: checkpoint_sequential(mlp, segments, x,
                                                              use_reentrant=False)}
    kept = {}
    for name, forward in forwards.items():
        forward().sum().backward()  # warm-up: first calls allocate caches and thread pools
        samples = []
        for _ in range(3):
            before = bytes_in_use()
            out = forward()
            samples.append(bytes_in_use() - before)
            out.sum().backward()
            del out
        kept[name] = statistics.median(samples)
    times = {name: [] for name in forwards}
    for _ in range(rounds):
        for name, forward in forwards.items():
            t0 = time.perf_counter()
            forward().sum().backward()
            times[name].append((time.perf_counter() - t0) * 1e3)
    layer_input = rows * width * 4  # one Linear keeps its input; ReLU shares its output
    expect = {"plain": layers * layer_input,  # the last segment runs without checkpointing
              "checkpointed": (segments - 1 + layers // segments) * layer_input}
    return {"kept": kept, "expect": expect, "threads": torch.get_num_threads(),
            "step_ms": {name: statistics.median(t) for name, t in times.items()}}
