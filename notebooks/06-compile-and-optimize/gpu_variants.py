"""GPU variants of the chapter's model: fp32, half precision, and half precision replayed as a CUDA graph.

Why this is a file and not a cell: the chapter runs it only when CUDA is present, so it is code a
CPU build of the chapter never executes (the tests run its timing loop on a CPU, without graphs);
as a file it can be read whole, run alone on a GPU machine, and it keeps the chapter's cells small::

    python gpu_variants.py               # on a machine with CUDA: one JSON line, batch 1 and 256
    python gpu_variants.py --batch 1024  # another throughput batch size

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


def variants(model, example, *, device: str = "cuda", graphs: bool = True) -> dict:
    """name -> call(x) for fp32, fp16 and (with ``graphs``) fp16 replayed as a CUDA graph.

    Every call takes the same float32 batch already on ``device`` and pays the same costs: the
    cast to its own dtype (the fp16 call casts with ``.half()``, the graph's copy into its fixed
    input buffer casts as it copies), the forward pass, and the result. ``example`` fixes the batch
    size a graph is captured at, so a graph serves only that size.
    """
    import copy

    fp32 = copy.deepcopy(model).to(device).eval()
    fp16 = copy.deepcopy(fp32).half()
    calls = {"fp32": lambda x: fp32(x), "fp16": lambda x: fp16(x.half())}
    if graphs:
        replay, static_in, static_out = graphed(fp16, example.half())

        def graph_call(x):
            static_in.copy_(x)  # float32 -> fp16, in the copy
            replay()
            return static_out
        calls["fp16 + CUDA graph"] = graph_call
    return calls


def measure_gpu(model, X, *, batches=(1, 256), threads: int = 1, device: str = "cuda") -> dict:
    """Median per-call ms of every variant at each batch size, timed alike; fp16's agreement with fp32.

    For each batch size the variants are built afresh (a CUDA graph is captured per size) and timed
    interleaved by ``bench.compare``; every timed call enters inference mode, runs the variant on
    the same float32 input and waits for the device (GPU calls are asynchronous: time the work, not
    the launch). On a device other than CUDA there is no graph and nothing to wait for: that is how
    the tests run this function on a CPU.
    """
    import numpy as np
    import torch
    from bench import compare

    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    result = {"device": torch.cuda.get_device_name() if cuda else device, "batches": list(batches), "ms": {}}
    for batch in batches:
        x = torch.from_numpy(np.resize(X, (batch, X.shape[1]))).to(device)
        calls = variants(model, x, device=device, graphs=cuda)

        def timed(fn):
            def call():
                with torch.inference_mode():
                    fn(x)
                sync()
            return call

        timings = compare({name: timed(fn) for name, fn in calls.items()}, threads=threads)
        result["ms"][str(batch)] = {name: t.median * 1e3 for name, t in timings.items()}
        with torch.inference_mode():
            outputs = {name: fn(x).float().clone() for name, fn in calls.items()}
    ref = outputs.pop("fp32")  # at the last batch size: agreement of every half-precision variant with fp32
    result["fp16_max_abs_logit_diff"] = max(float((ref - out).abs().max()) for out in outputs.values())
    result["fp16_prediction_agreement"] = min(float((ref.argmax(1) == out.argmax(1)).float().mean())
                                              for out in outputs.values())
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Time the chapter's model in fp32, fp16 and fp16 + CUDA graph.")
    parser.add_argument("--batch", type=int, default=256, help="the throughput batch size (batch 1 is timed too)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import export_model as em

    X_train, X_test, y_train, _ = em.load_digits_split()
    model = em.train_model(X_train, y_train)
    print(json.dumps(measure_gpu(model, X_test, batches=(1, args.batch))))


if __name__ == "__main__":
    main()
