"""Train the chapter's digits MLP, export it to ONNX, and build the optimized model that gets served.

Why this is a file and not a cell: the serving chapter (07) imports ``ensure_serving_model()`` to
rebuild the hand-off model when ``artifacts/`` is empty, and the tests import it too; a notebook
cell cannot be imported. Chapter 06 calls the same function, so the file the server loads is the
file the chapter measured.

Launch lines (CPU; there is no GPU path, the served model runs in ONNX Runtime on CPU)::

    python export_model.py                 # build artifacts/ if missing; print model.json's contents
    python export_model.py --force         # rebuild even if the files are there
    python export_model.py --out /tmp/m    # build into another folder

The model reads 64 raw pixel counts (0..16, as ``sklearn.datasets.load_digits`` gives them) as
float32 ``[batch, 64]`` and returns logits ``[batch, 10]``; the scaling lives inside the graph, so a
server feeds raw features. Everything is seeded with the book's seed (``GRADIENT_RAGE_SEED``, 0 when
unset, read from ``notebooks/_shared/seed.py`` like every chapter): two builds with the same seed on
the same machine give byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_ARTIFACTS = HERE / "artifacts"


def _book_seed() -> int:
    """The book's seed from ``notebooks/_shared/seed.py``, loaded by path: a server that imports this
    file (chapter 07) does not have ``notebooks/`` on its ``sys.path``."""
    spec = importlib.util.spec_from_file_location("_gr_book_seed", HERE.parent / "_shared" / "seed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SEED


SEED = _book_seed()  # 0 unless GRADIENT_RAGE_SEED says otherwise
HIDDEN = 1024
EPOCHS = 8
BATCH_SIZE = 64
MODEL_NAME = "digits-mlp-int8"
MODEL_FILE = "digits_mlp_int8.onnx"
INPUT_NAME = "features"
OUTPUT_NAME = "logits"
PIXEL_MAX = 16.0  # load_digits counts pixels 0..16 in each 4x4 block


def load_digits_split(seed: int = SEED):
    """scikit-learn's bundled digits (1,797 8x8 images, offline), split 80/20, stratified and seeded.

    Returns ``(X_train, X_test, y_train, y_test)``: float32 raw pixel counts and int64 labels.
    """
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    return train_test_split(X.astype(np.float32), y.astype(np.int64), test_size=0.2,
                            random_state=seed, stratify=y)


def make_model(n_features: int = 64, n_classes: int = 10, hidden: int = HIDDEN):
    """A 64 -> hidden -> hidden -> 10 ReLU MLP that scales raw pixel counts itself."""
    import torch
    from torch import nn

    class DigitsMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(n_features, hidden)
            self.fc2 = nn.Linear(hidden, hidden)
            self.fc3 = nn.Linear(hidden, n_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x * (1.0 / PIXEL_MAX)  # preprocessing inside the graph: the server sends raw pixels
            x = torch.relu(self.fc1(x))
            x = torch.relu(self.fc2(x))
            return self.fc3(x)

    return DigitsMLP()


def flops_per_sample(model) -> int:
    """Multiply-adds of every Linear layer, counted as 2 FLOPs each (bias adds and ReLU ignored)."""
    from torch import nn

    return sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def train_model(X_train, y_train, *, hidden: int = HIDDEN, epochs: int = EPOCHS,
                batch_size: int = BATCH_SIZE, seed: int = SEED):
    """Seeded AdamW training on CPU; returns the model in eval mode. About two seconds.

    Training runs on one thread whatever the caller set: a matrix library may sum in a different
    order at another thread count, so the weights (and the served file's hash) would depend on
    the caller. At batch 64 a second thread buys little, and one thread is robust to a busy machine.
    """
    import torch

    torch.manual_seed(seed)
    model = make_model(X_train.shape[1], int(y_train.max()) + 1, hidden)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    return fit_one_thread(model, optimizer, X_train, y_train, epochs=epochs, batch_size=batch_size, seed=seed)


def fit_one_thread(model, optimizer, X_train, y_train, *, epochs: int, batch_size: int, seed: int,
                   schedule=None):
    """Cross-entropy mini-batches in an order drawn from ``seed``, on one thread; the model in eval mode.

    The caller's thread count is restored afterwards. ``schedule``, if given, is a learning-rate
    scheduler stepped after every optimizer step. Chapter 06's MLP and its encoder block both train here.
    """
    import torch
    import torch.nn.functional as F

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        X, y = torch.from_numpy(X_train), torch.from_numpy(y_train)
        order = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(X), generator=order)
            for start in range(0, len(X), batch_size):
                idx = perm[start:start + batch_size]
                loss = F.cross_entropy(model(X[idx]), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if schedule is not None:
                    schedule.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def export_onnx(model, path: Path, example=None, input_name: str = INPUT_NAME,
                output_name: str = OUTPUT_NAME) -> Path:
    """``torch.export`` the model to one self-contained ONNX file with a dynamic batch dimension.

    ``example`` is one input the model takes, its first dimension the batch (default: two rows of
    zeros as wide as the MLP's first layer; the encoder passes its int64 tokens). The dynamo exporter
    writes weights to ``<name>.onnx.data`` beside the model unless told not to;
    ``external_data=False`` keeps one file (fine below 2 GB), which is what a server wants to load.
    """
    import logging
    import warnings

    import onnxscript  # noqa: F401  the dynamo exporter needs it; imported here, a missing one is named
    import torch
    from torch.export import Dim

    path = Path(path)
    example = torch.zeros(2, model.fc1.in_features) if example is None else example
    # torch's exporter logs that torchvision ops are unavailable and trips a FutureWarning inside
    # torch's own pytree code; neither concerns this model, so both are silenced here, narrowly.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            program = torch.onnx.export(
                model, (example,), dynamo=True, input_names=[input_name], output_names=[output_name],
                dynamic_shapes=({0: Dim("batch")},), verbose=False)
    finally:
        registration.setLevel(level)
    program.save(str(path), external_data=False)
    return path


def optimize_onnx(src: Path, dst: Path, level: str = "extended") -> Path:
    """Run ONNX Runtime's graph optimizer once, offline, and save the optimized graph.

    ``extended`` fusions (MatMul+Add -> Gemm, fused activations) are portable across machines;
    ``all`` adds layout changes tied to this CPU, which is why ORT advises against saving them.
    """
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[level]
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return Path(dst)


def quantize_int8(src: Path, dst: Path, *, per_channel: bool = False) -> Path:
    """Dynamic int8 quantization with ONNX Runtime: int8 weights, activations quantized per batch.

    Quantize the exported graph, not an ORT-optimized one: ORT fuses Gemm+Relu into its own
    ``FusedGemm``, which the quantizer does not know and silently leaves in float32. No calibration
    data is needed; inputs and outputs stay float32, so callers do not change. ``per_channel``
    gives each output unit of a layer its own scale instead of one per weight tensor.
    """
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    dst = Path(dst)
    prepared = dst.with_name(dst.stem + "_pre.onnx")
    quant_pre_process(str(src), str(prepared))  # shape inference + safe fusions, as ORT recommends
    quantize_dynamic(str(prepared), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel)
    prepared.unlink()
    return dst


def make_session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session with an explicit intra-op thread count (default: torch's)."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_weight_bytes(path: Path) -> int:
    """Bytes of every stored tensor (weights, biases, scales) in an ONNX file: what a call must read."""
    import onnx
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer)


def onnx_accuracy(session, X, y) -> float:
    logits = session.run([OUTPUT_NAME], {INPUT_NAME: X})[0]
    return float((logits.argmax(axis=1) == y).mean())


def file_hash(path: Path, n: int = 12) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:n]


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private; these are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_complete(model_path: Path, meta_path: Path) -> bool:
    """Both files exist, the metadata describes this very model file (its hash is the version), and
    it was built with this run's book seed (a pair left by a run with another seed is rebuilt)."""
    if not (model_path.is_file() and meta_path.is_file()):
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("version") == file_hash(model_path) and meta.get("seed") == SEED


def ensure_serving_model(artifacts_dir: Path | None = None, *, force: bool = False) -> Path:
    """Return the path of the optimized ONNX model to serve, building it first if it is missing.

    Builds into ``artifacts_dir`` (default: this chapter's ``artifacts/``): trains the seeded MLP on
    the digits training split, exports it with ``torch.export`` to ONNX, quantizes it dynamically to
    int8, applies ONNX Runtime's portable graph optimizations offline, checks it on the test split,
    and writes ``digits_mlp_int8.onnx`` and ``model.json`` atomically (model first, metadata last).
    An existing pair is reused when the metadata's version matches the model file's hash and its
    seed is the book's seed (``GRADIENT_RAGE_SEED``, default 0).
    """
    out = Path(artifacts_dir) if artifacts_dir is not None else DEFAULT_ARTIFACTS
    out.mkdir(parents=True, exist_ok=True)
    model_path, meta_path = out / MODEL_FILE, out / "model.json"
    if not force and _is_complete(model_path, meta_path):
        return model_path  # a caller that only serves the model never imports torch

    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    X_train, X_test, y_train, y_test = load_digits_split()
    model = train_model(X_train, y_train)
    with torch.inference_mode():
        eager_logits = model(torch.from_numpy(X_test)).numpy()
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        tmp = Path(tmp)
        int8 = quantize_int8(export_onnx(model, tmp / "fp32.onnx"), tmp / "int8.onnx")
        served = optimize_onnx(int8, tmp / "int8_opt.onnx")  # fuses into DynamicQuantizeMatMul
        logits = make_session(served).run([OUTPUT_NAME], {INPUT_NAME: X_test})[0]
        _atomic_write_bytes(model_path, served.read_bytes())
    proto = onnx.load(str(model_path))
    meta = {
        "name": MODEL_NAME,
        "version": file_hash(model_path),
        "file": MODEL_FILE,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "n_features": int(X_train.shape[1]),
        "classes": [int(c) for c in np.unique(y_train)],
        "input_dtype": "float32",
        "input_range": [0.0, PIXEL_MAX],
        "output": "logits; argmax is the predicted digit",
        "test_accuracy": float((logits.argmax(axis=1) == y_test).mean()),
        "eager_test_accuracy": float((eager_logits.argmax(axis=1) == y_test).mean()),
        "max_abs_logit_diff_vs_eager": float(np.abs(logits - eager_logits).max()),
        "n_test": int(len(y_test)),
        "opset": int(next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))),
        "quantization": "onnxruntime dynamic int8 (QInt8 weights, uint8 activations)",
        "seed": SEED,
        "built_with": {"torch": torch.__version__.split("+")[0], "onnxruntime": ort.__version__,
                       "onnx": onnx.__version__},
        "built_by": "notebooks/06-compile-and-optimize/export_model.py:ensure_serving_model",
    }
    _atomic_write_bytes(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    return model_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_ARTIFACTS, help="folder for the model and model.json")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete model is there")
    args = parser.parse_args(argv)
    path = ensure_serving_model(args.out, force=args.force)
    print(json.dumps({"model": str(path), **json.loads((path.parent / "model.json").read_text())}))


if __name__ == "__main__":
    main()
