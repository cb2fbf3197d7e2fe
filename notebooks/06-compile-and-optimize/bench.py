"""Benchmarking helpers for chapter 06: interleaved timing, and the machine's own limits.

Why this is a file and not a cell: the chapter's numbers stand on these few functions, so they are
tested (``tests/test_06_compile_and_optimize.py``) and shown in the chapter with
``literalinclude``; a reader can also run them alone to measure a machine::

    python bench.py                  # fp32 and int8 peaks and bandwidth at 2 threads, one JSON line
    python bench.py --threads 1      # the same at one thread

Everything runs under ``torch.utils.benchmark``, whose ``num_threads`` defaults to ONE thread: the
helpers take the thread count as a required argument so that no number is measured at a thread
count nobody chose.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Timing:
    """Per-call seconds of each timed round of one variant, and the torch thread count used."""

    name: str
    times: tuple[float, ...]
    threads: int
    calls_per_round: int

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        """The fastest round: the right summary for a machine's peak, which noise can only lower."""
        return min(self.times)

    @property
    def iqr(self) -> tuple[float, float]:
        q = statistics.quantiles(self.times, n=4, method="inclusive")
        return (q[0], q[2])

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median: 0.05 means the middle half is within 5%."""
        lo, hi = self.iqr
        return (hi - lo) / self.median


def compare(fns: dict[str, Callable[[], Any]], *, threads: int, rounds: int = 9,
            round_s: float = 0.03, warmup: int = 3, gap_s: float = 0.02) -> dict[str, Timing]:
    """Time several callables against each other, interleaved, at ``threads`` torch threads.

    Each callable is warmed up, then calibrated so that one round of ``number`` calls lasts about
    ``round_s``. The rounds are interleaved (A B C, B C A, C A B, ...) so that whatever else the
    machine does lands on every variant alike, and each variant's median per-call time is taken
    over its rounds. ``Timer.timeit`` itself runs two untimed calls before each timed round, so
    every round starts warm even right after another variant ran.

    Before each round the helper sleeps ``gap_s``. Two runtimes timed back to back in one process
    disturb each other on a small machine: their thread pools spin or sleep after a call, and they
    share caches and clocks. While writing chapter 06 we measured a PyTorch variant timed right
    after an ONNX Runtime one at up to 1.7 times its time, with spinning on or off; a 20 ms pause
    removed it. Compare variants as ratios of these medians, never against another run.
    """
    import torch.utils.benchmark as benchmark

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if rounds < 2:
        raise ValueError(f"rounds must be >= 2 (a median and a spread need two), got {rounds}")
    if gap_s < 0:
        raise ValueError(f"gap_s must be >= 0, got {gap_s}")
    timers, numbers = {}, {}
    for name, fn in fns.items():
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, label=name)
        for _ in range(warmup):
            timer.timeit(1)
        once = timer.timeit(1).median
        timers[name], numbers[name] = timer, max(1, int(round_s / max(once, 1e-7)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(gap_s)  # let the previous variant's threads settle before this round
            times[name].append(timers[name].timeit(numbers[name]).median)
    return {name: Timing(name, tuple(t), threads, numbers[name]) for name, t in times.items()}


def matmul_gflops(*, threads: int, m: int = 2048, k: int = 2048, n: int = 2048,
                  rounds: int = 15) -> tuple[float, Timing]:
    """Measured fp32 matrix-multiply throughput of an ``m x k`` by ``k x n`` product (2 m k n FLOPs).

    The default square 2048 product is large enough to run at the machine's practical peak; pass a
    model layer's shape to see what that shape can reach. A peak is a best case, so this uses the
    fastest round: background load can only slow a round down, never speed it up.
    """
    import torch

    a, b, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
    timing = compare({"matmul": lambda: torch.mm(a, b, out=out)}, threads=threads, rounds=rounds,
                     round_s=0.05)["matmul"]
    return 2 * m * k * n / timing.best / 1e9, timing


def copy_bandwidth_gbs(*, threads: int, megabytes: float = 128, rounds: int = 15) -> tuple[float, Timing]:
    """Measured memory bandwidth: copy a ``megabytes`` float32 buffer, which reads and writes it once.

    Like the peaks, a bandwidth is a best case: the fastest round is used.
    """
    import torch

    n = int(megabytes * 2**20 / 4)
    src, dst = torch.ones(n), torch.empty(n)
    timing = compare({"copy": lambda: dst.copy_(src)}, threads=threads, rounds=rounds,
                     round_s=0.05)["copy"]
    return 2 * n * 4 / timing.best / 1e9, timing


def int8_matmul(*, threads: int, m: int, k: int, n: int, quantize_input: bool = False) -> Callable[[], Any]:
    """A zero-argument function that runs one ``m x k`` by ``k x n`` int8 product in ONNX Runtime.

    By default the input is already uint8 (``MatMulInteger``, int32 out): the bare integer product.
    With ``quantize_input`` the input is float32 and the node is ``DynamicQuantizeMatMul``, exactly
    what a dynamically quantized layer runs: find the input's range, quantize it, multiply, convert
    the result back to float32. The one-node graph is built in memory; ``threads`` intra-op threads.
    """
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), "W")
    if quantize_input:
        scale = numpy_helper.from_array(np.array(0.01, dtype=np.float32), "W_scale")
        node = helper.make_node("DynamicQuantizeMatMul", ["A", "W", "W_scale"], ["Y"], domain="com.microsoft")
        types, initializers = (TensorProto.FLOAT, TensorProto.FLOAT), [weight, scale]
        feed = {"A": rng.standard_normal((m, k), dtype=np.float32)}
    else:
        node = helper.make_node("MatMulInteger", ["A", "W"], ["Y"])
        types, initializers = (TensorProto.UINT8, TensorProto.INT32), [weight]
        feed = {"A": rng.integers(0, 256, (m, k), dtype=np.uint8)}
    graph = helper.make_graph([node], "int8_matmul", [helper.make_tensor_value_info("A", types[0], [m, k])],
                              [helper.make_tensor_value_info("Y", types[1], [m, n])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, feed)


def int8_matmul_gops(*, threads: int, m: int = 2048, k: int = 2048, n: int = 2048,
                     rounds: int = 15) -> tuple[float, Timing]:
    """Measured int8 matrix-multiply throughput in ONNX Runtime, 2 m k n integer ops per product.

    The square product is the compute roof for the int8 variant. Fastest round, as for fp32.
    """
    timing = compare({"int8": int8_matmul(threads=threads, m=m, k=k, n=n)}, threads=threads,
                     rounds=rounds, round_s=0.05)["int8"]
    return 2 * m * k * n / timing.best / 1e9, timing


def roofline_bound(intensity: float, peak_gflops: float, bandwidth_gbs: float) -> float:
    """The roofline: attainable GFLOP/s at ``intensity`` FLOPs per byte moved."""
    return min(peak_gflops, intensity * bandwidth_gbs)


def cpu_description() -> dict[str, Any]:
    """What Linux says about the CPU: model, nominal clock, vector extensions. Empty where unknown.

    The clock in ``/proc/cpuinfo`` is nominal (in a VM, the host's base clock); the turbo clock the
    cores actually run at is not reported, so a peak computed from it is an estimate, not a bound.
    """
    import os

    info: dict[str, Any] = {"logical_cpus": os.cpu_count()}
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return info
    first = text.split("\n\n")[0]
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    info["model"] = fields.get("model name")
    info["mhz"] = float(fields["cpu MHz"]) if "cpu MHz" in fields else None
    info["fp32_lanes"] = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    info["fma"] = "fma" in flags
    info["int8_dot"] = "avx512_vnni" in flags or "avx_vnni" in flags
    info["amx_int8"] = "amx_int8" in flags
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Measure this machine's fp32 and int8 matmul peaks and copy bandwidth.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for both measurements")
    parser.add_argument("--n", type=int, default=2048, help="matrix size for the matmul peaks")
    parser.add_argument("--megabytes", type=float, default=128, help="buffer size for the copy")
    args = parser.parse_args(argv)
    n = args.n
    fp32, _ = matmul_gflops(threads=args.threads, m=n, k=n, n=n)
    int8, _ = int8_matmul_gops(threads=args.threads, m=n, k=n, n=n)
    gbs, _ = copy_bandwidth_gbs(threads=args.threads, megabytes=args.megabytes)
    print(json.dumps({"threads": args.threads, "fp32_gflops": fp32, "int8_gops": int8, "copy_gbs": gbs,
                      **cpu_description()}))


if __name__ == "__main__":
    main()
