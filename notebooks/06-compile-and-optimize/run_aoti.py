"""Load an AOTInductor package (``.pt2``) and an ONNX file in a fresh process and time both.

Why this is a file and not a cell: the point is a process that has never seen the model's Python
source. It imports torch, ONNX Runtime, NumPy and the chapter's timing helper (``bench.py``), never
``encoder.py``; what it runs comes from the two files alone::

    python run_aoti.py --package artifacts/encoder.pt2 --onnx artifacts/encoder_int8.onnx \\
        --tokens artifacts/tokens.npy --out artifacts/aoti_logits.npy

It reports each artefact's load time, first-call time (load to first answer is what a restarted
server pays) and median latency at batch 1 and at ``--batch``, timed interleaved by
``bench.compare`` at ``--threads`` threads; it saves the package's logits on ``--tokens`` so the
caller can check them. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Time an AOTInductor package against an ONNX file, fresh process.")
    parser.add_argument("--package", type=Path, required=True, help="the .pt2 file")
    parser.add_argument("--onnx", type=Path, required=True, help="an ONNX file with the same input and output")
    parser.add_argument("--tokens", type=Path, required=True, help=".npy of int64 tokens [n, seq]")
    parser.add_argument("--out", type=Path, required=True, help=".npy to write the package's logits to")
    parser.add_argument("--batch", type=int, default=64, help="the throughput batch size")
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    args = parser.parse_args(argv)
    for path in (args.package, args.onnx, args.tokens):
        if not path.is_file():
            parser.error(f"{path} does not exist")

    import numpy as np
    import onnxruntime as ort
    import torch

    sys.path.insert(0, str(HERE))
    import bench  # the timing helper; it knows nothing about the model

    torch.set_num_threads(args.threads)
    tokens = np.load(args.tokens)
    seconds = {}
    start = time.perf_counter()
    package = torch._inductor.aoti_load_package(str(args.package))
    seconds["pt2 load"] = time.perf_counter() - start
    with torch.inference_mode():
        package(torch.from_numpy(tokens[:1]))
    seconds["pt2 first call"] = time.perf_counter() - start
    start = time.perf_counter()
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    session = ort.InferenceSession(str(args.onnx), options, providers=["CPUExecutionProvider"])
    seconds["onnx load"] = time.perf_counter() - start
    feed_name, out_name = session.get_inputs()[0].name, session.get_outputs()[0].name
    session.run([out_name], {feed_name: tokens[:1]})
    seconds["onnx first call"] = time.perf_counter() - start

    def pt2(x):
        with torch.inference_mode():
            return package(torch.from_numpy(x)).numpy()

    def onnx(x):
        return session.run([out_name], {feed_name: x})[0]

    np.save(args.out, pt2(tokens))
    ms = {}
    for n in (1, args.batch):
        batch = np.ascontiguousarray(np.resize(tokens, (n, tokens.shape[1])))
        timed = bench.compare({"pt2": lambda: pt2(batch), "onnx": lambda: onnx(batch)},
                              threads=args.threads, rounds=5)
        ms[n] = {name: t.median * 1e3 for name, t in timed.items()}
    print(json.dumps({"seconds": seconds, "ms": {str(n): v for n, v in ms.items()},
                      "threads": args.threads, "batch": args.batch,
                      "imported_encoder": "encoder" in sys.modules}))


if __name__ == "__main__":
    main()
