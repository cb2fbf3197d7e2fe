"""A small transformer encoder classifier for chapter 06: the model where a compiler has work to do.

Why this is a file and not a cell: the chapter, the tests and the AOTInductor loader all need the
same model definition, data generator and export code; the fresh-process run of the ``.pt2``
package (``run_aoti.py``) must *not* import this file, which is the point of that run::

    python encoder.py                      # train, report accuracy and size; one JSON line
    python encoder.py --epochs 6 --seed 1  # fewer epochs (too few to learn it), another seed

The task is generated, seeded and offline: a sequence of ``SEQ`` tokens from a vocabulary of
``VOCAB``; the label is the token that appears at the position named by the first token (a
pointer), so the model must look from one position to another: a job for attention, not for
pooling alone. Everything the chapter measures runs on this one encoder block: token and position
embeddings, multi-head self-attention written out (so every op is visible to a compiler),
residuals, layer norms, a GELU feed-forward layer and a linear head read at the pointer's position.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

VOCAB = 16
SEQ = 32
D_MODEL = 64
HEADS = 4
D_FF = 256
N_CLASSES = VOCAB
N_TRAIN = 2048  # with EPOCHS: about 4 s on one thread; 8 epochs learned it on seeds 0-3, 6 did not
EPOCHS = 10
INPUT_NAME = "tokens"
OUTPUT_NAME = "logits"


def _book_seed() -> int:
    spec = importlib.util.spec_from_file_location("_gr_book_seed", HERE.parent / "_shared" / "seed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SEED


SEED = _book_seed()


def _export_model():
    """This folder's ``export_model.py``, imported by path (the chapter and the tests import this file by path too)."""
    spec = importlib.util.spec_from_file_location("_gr_06_export_model", HERE / "export_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_data(n: int, seed: int = SEED):
    """``n`` seeded sequences of int64 tokens ``[n, SEQ]`` and their labels ``[n]``.

    Token 0 of each sequence is a pointer ``p`` in ``1..VOCAB-1``; the label is the token found at
    position ``p``. Every other token is uniform noise, so a model that ignores the pointer scores
    1/VOCAB.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (n, SEQ), dtype=np.int64)
    pointer = rng.integers(1, VOCAB, n)
    tokens[:, 0] = pointer
    labels = tokens[np.arange(n), pointer]
    return tokens, labels.astype(np.int64)


def make_model(d_model: int = D_MODEL, heads: int = HEADS, d_ff: int = D_FF):
    """One pre-norm transformer encoder block with embeddings and a linear head on position 0."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class EncoderClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = heads
            self.tok = nn.Embedding(VOCAB, d_model)
            self.pos = nn.Parameter(torch.randn(SEQ, d_model) * 0.02)
            self.ln1 = nn.LayerNorm(d_model)
            self.qkv = nn.Linear(d_model, 3 * d_model)
            self.proj = nn.Linear(d_model, d_model)
            self.ln2 = nn.LayerNorm(d_model)
            self.ff1 = nn.Linear(d_model, d_ff)
            self.ff2 = nn.Linear(d_ff, d_model)
            self.ln_out = nn.LayerNorm(d_model)
            self.head = nn.Linear(d_model, N_CLASSES)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            b, s = tokens.shape
            x = self.tok(tokens) + self.pos[:s]
            q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
            d_head = q.shape[-1] // self.heads
            q, k, v = (t.reshape(b, s, self.heads, d_head).transpose(1, 2) for t in (q, k, v))
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d_head))
            attended = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, s, -1)
            x = x + self.proj(attended)
            x = x + self.ff2(F.gelu(self.ff1(self.ln2(x))))
            return self.head(self.ln_out(x)[:, 0])  # read the answer at the pointer's position

    return EncoderClassifier()


def flops_per_sample(model, seq: int = SEQ) -> int:
    """Multiply-adds of the linear layers and the two attention products, 2 FLOPs each."""
    from torch import nn

    per_token = sum(2 * m.in_features * m.out_features for m in model.modules()
                    if isinstance(m, nn.Linear) and m is not model.head)
    d_model = model.proj.in_features
    head = 2 * model.head.in_features * model.head.out_features  # read at one position only
    return seq * per_token + head + 2 * 2 * seq * seq * d_model  # + scores and weighted sum


def train_model(tokens, labels, *, epochs: int = EPOCHS, batch_size: int = 64, lr: float = 5e-3,
                seed: int = SEED):
    """Seeded AdamW with a one-cycle schedule, trained by chapter 06's ``fit_one_thread`` (one thread:
    weights independent of the caller's thread count)."""
    import torch

    torch.manual_seed(seed)
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(len(tokens) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    return _export_model().fit_one_thread(model, optimizer, tokens, labels, epochs=epochs,
                                          batch_size=batch_size, seed=seed, schedule=schedule)


def export_onnx(model, path: Path) -> Path:
    """The encoder as one self-contained ONNX file, int64 tokens ``[batch, SEQ]`` in, logits out,
    written by chapter 06's exporter (``export_model.export_onnx``)."""
    import torch

    example = torch.zeros(2, SEQ, dtype=torch.int64)
    return _export_model().export_onnx(model, path, example=example, input_name=INPUT_NAME,
                                       output_name=OUTPUT_NAME)


class CalibrationReader:
    """Feeds ONNX Runtime's static quantizer a few batches of real inputs, once each.

    Static quantization fixes every activation's scale *before* serving, from the ranges these
    batches produce; dynamic quantization measures them again on every call's batch.
    """

    def __init__(self, tokens, batch: int = 64):
        self._batches = [tokens[i:i + batch] for i in range(0, len(tokens), batch)]
        self._next = 0

    def get_next(self):
        if self._next >= len(self._batches):
            return None
        self._next += 1
        return {INPUT_NAME: self._batches[self._next - 1]}

    def rewind(self):
        self._next = 0


def quantize_static_int8(src: Path, dst: Path, calibration_tokens) -> Path:
    """Static int8 (QDQ format): int8 weights and activation scales fixed from a calibration set.

    Only the matrix products are quantized (``MatMul``, which covers the linear layers and the two
    attention products); layer norm, softmax and GELU stay in float32, where a fixed 8-bit range
    would cost the most accuracy. The scales are the min/max seen on ``calibration_tokens``.
    """
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quant_pre_process, quantize_static)

    dst = Path(dst)
    prepared = dst.with_name(dst.stem + "_pre.onnx")
    quant_pre_process(str(src), str(prepared))
    quantize_static(str(prepared), str(dst), CalibrationReader(calibration_tokens),
                    quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    prepared.unlink()
    return dst


def batch_dependence(run, tokens, batch: int = 64) -> float:
    """Largest |logit difference| between each row run alone and the same row inside a batch.

    ``run`` maps int64 tokens ``[n, SEQ]`` to logits. The first ``min(16, len)`` rows are run one
    at a time and compared with their rows of one call on the first ``batch`` rows. An answer that
    depends only on its own row gives float32 rounding at most; dynamic quantization, whose scale
    is the batch's range, gives more.
    """
    import numpy as np

    together = run(tokens[:batch])
    alone = np.concatenate([run(tokens[i:i + 1]) for i in range(min(16, len(tokens)))])
    return float(np.abs(alone - together[:len(alone)]).max())


KINDS = (("fused Inductor kernels", ("cpp_fused",)),
         ("matrix products", ("addmm", "aten::mm", "bmm", "linear", "MatMul", "Gemm")),
         ("attention kernel", ("attention",)),
         ("norm, softmax, GELU, adds", ("layer_norm", "LayerNorm", "softmax", "Softmax", "gelu", "Gelu",
                                        "aten::add", "aten::mul", "Add", "Mul", "index_select", "Gather")),
         ("copies and layout", ("copy_", "clone", "Transpose", "Reshape", "Split", "Cast")),
         ("quantize / dequantize", ("Quantize", "Dequantize")))


def kind_of(name: str) -> str:
    """The group a profiled kernel or ONNX node type belongs to (first match in ``KINDS``)."""
    for kind, needles in KINDS:
        if any(needle in name for needle in needles):
            return kind
    return "other ops and framework"


def torch_profile(fn, calls: int = 20) -> tuple[dict[str, float], float]:
    """Self CPU seconds per call of every op ``fn`` runs, from ``torch.profiler``, and wall seconds per call.

    Self time counts each op's own time, not its children's, so the values add up to the profiled
    total without double counting. The wall time is of the same profiled calls, so what no op
    accounts for is measured in one run (the profiler's own cost included). Inductor's generated
    kernels appear by name only when ``torch._inductor.config.cpp.enable_kernel_profile`` was set
    before compiling.
    """
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        wall = (time.perf_counter() - start) / calls
    return {e.key: e.self_cpu_time_total / 1e6 / calls for e in prof.key_averages()}, wall


def ops_per_call(fn, calls: int = 10) -> float:
    """Operator and kernel calls per call of ``fn``, counted by ``torch.profiler``.

    Every ``aten::`` op the dispatcher enters (nested ones too: ``linear`` and the ``addmm`` it
    calls count twice) and every Inductor kernel (named only when
    ``torch._inductor.config.cpp.enable_kernel_profile`` was set before compiling). A count, not a
    timing: the same on a quiet machine and a busy one.
    """
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") or "cpp_fused" in e.name) / calls


def ort_profile(path, feed: dict, *, threads: int, calls: int = 20) -> tuple[dict[str, float], float]:
    """Seconds per call spent in each ONNX node type, and per whole run, from ONNX Runtime's profiler.

    A separate session with profiling on (it writes a JSON trace, read here and deleted); the
    durations are the kernels' wall times, summed over nodes of each type.
    """
    import collections
    import os

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(path).with_suffix("")) + "_profile"
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(3):
        session.run(None, feed)
    for _ in range(calls):
        session.run(None, feed)
    trace = session.end_profiling()
    events = json.loads(Path(trace).read_text())
    os.unlink(trace)
    per_type: dict[str, float] = collections.defaultdict(float)
    warmup_runs = [e for e in events if e.get("name") == "model_run"][:3]
    skip_until = max((e["ts"] + e["dur"] for e in warmup_runs), default=0)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= skip_until:
            per_type[e["args"]["op_name"]] += e["dur"] / 1e6 / calls
    runs = [e["dur"] / 1e6 for e in events if e.get("name") == "model_run" and e["ts"] >= skip_until]
    return dict(per_type), (sum(runs) / len(runs) if runs else float("nan"))


def by_kind(per_op: dict[str, float]) -> dict[str, float]:
    """Sum per-op seconds into the groups of ``KINDS`` (plus "other ops and framework")."""
    out: dict[str, float] = {}
    for name, seconds in per_op.items():
        out[kind_of(name)] = out.get(kind_of(name), 0.0) + seconds
    return out


def attribute(per_kind: dict[str, float], *, flops: float, seconds: float, profiled_seconds: float,
              peak_gflops: float, bound_gflops: float) -> dict[str, float]:
    """Split one call's distance to its roofline bound into measured parts.

    ``per_kind`` is a profile summed by ``by_kind`` (seconds per call), ``profiled_seconds`` the
    wall time per call of those same profiled calls, ``flops`` the call's counted operations (all
    of them in matrix products and attention), ``seconds`` its timed median, unprofiled. The
    products' own time is measured, so is every other kernel's; what no kernel accounts for
    (dispatch, Python, threads waking, the profiler's own bookkeeping) is the profiled call's
    remainder, and it is reported as one. The profiled calls and the timed ones differ by the
    profiler's cost and by the machine's noise (they run at different moments); ``profiled / timed``
    shows by how much, so a reader knows how far to trust the split.
    """
    products = per_kind.get("matrix products", 0.0) + per_kind.get("attention kernel", 0.0)
    others = sum(per_kind.values()) - products
    return {"of bound": flops / seconds / 1e9 / bound_gflops,
            "products ms": products * 1e3,
            "products at peak ms": flops / peak_gflops / 1e9 * 1e3,
            "products % of peak": flops / max(products, 1e-12) / 1e9 / peak_gflops * 100,
            "other kernels ms": others * 1e3,
            "outside kernels ms": (profiled_seconds - products - others) * 1e3,
            "profiled / timed": profiled_seconds / seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the chapter's encoder block on generated data.")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--n-train", type=int, default=N_TRAIN)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    import torch

    X, y = make_data(args.n_train, args.seed)
    Xt, yt = make_data(2048, args.seed + 1000)
    start = time.perf_counter()
    model = train_model(X, y, epochs=args.epochs, seed=args.seed)
    train_s = time.perf_counter() - start
    with torch.inference_mode():
        acc = float((model(torch.from_numpy(Xt)).argmax(1).numpy() == yt).mean())
    print(json.dumps({"train_s": train_s, "test_accuracy": acc,
                      "params": sum(p.numel() for p in model.parameters()),
                      "mflop_per_sample": flops_per_sample(model) / 1e6}))


if __name__ == "__main__":
    main()
