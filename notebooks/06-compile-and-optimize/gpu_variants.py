"""GPU variants of the chapter's model: fp32, half precision, and half precision replayed as a CUDA graph.

Why this is a file and not a cell: the chapter runs it only when CUDA is present, so it is code a
CPU build never executes; as a file it can be read whole, run alone on a GPU machine, and it keeps
the chapter's cells small::

    python gpu_variants.py               # on a machine with CUDA: one JSON line of timings
    python gpu_variants.py --batch 1024  # another batch size

On a machine without CUDA it says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def graphed(module, example):
    """Capture one forward pass as a CUDA graph; returns (replay function, static input, static output).

    A CUDA graph records the kernel launches once and replays them with one call, which removes the
    per-kernel launch overhead that dominates a small model at small batch sizes. The input and
    output live in fixed buffers: copy new data into ``static_in`` before each replay.
    """
    import torch

    static_in = example.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(3):  # warm up on a side stream, as the capture API requires
            module(static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        static_out = module(static_in)
    return graph.replay, static_in, static_out


def measure_gpu(model, X, *, batch: int = 256, threads: int = 1) -> dict:
    """Median per-call milliseconds of fp32, fp16 and fp16 + CUDA graph, and fp16's agreement with fp32."""
    import copy

    import numpy as np
    import torch
    from bench import compare

    fp32 = copy.deepcopy(model).to("cuda").eval()
    fp16 = copy.deepcopy(fp32).half()
    x = torch.from_numpy(np.resize(X, (batch, X.shape[1]))).to("cuda")
    replay, static_in, static_out = graphed(fp16, x.half())
    with torch.inference_mode():
        ref, half = fp32(x).float(), fp16(x.half()).float()

    def timed(fn):
        def call():
            with torch.inference_mode():
                fn()
            torch.cuda.synchronize()  # GPU calls are asynchronous: time the work, not the launch
        return call

    timings = compare({"fp32": timed(lambda: fp32(x)), "fp16": timed(lambda: fp16(x.half())),
                       "fp16 + CUDA graph": timed(replay)}, threads=threads)
    return {
        "device": torch.cuda.get_device_name(),
        "batch": batch,
        "ms": {name: t.median * 1e3 for name, t in timings.items()},
        "fp16_max_abs_logit_diff": float((ref - half).abs().max()),
        "fp16_prediction_agreement": float((ref.argmax(1) == half.argmax(1)).float().mean()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Time the chapter's model in fp32, fp16 and fp16 + CUDA graph.")
    parser.add_argument("--batch", type=int, default=256, help="batch size")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import export_model as em

    X_train, X_test, y_train, _ = em.load_digits_split()
    model = em.train_model(X_train, y_train)
    print(json.dumps(measure_gpu(model, X_test, batch=args.batch)))


if __name__ == "__main__":
    main()
