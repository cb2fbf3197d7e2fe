"""Chapter 06's companion code: what the chapter and the serving chapter rely on.

- The exported, optimized and quantized models agree with eager on fixed inputs, within the
  tolerances the chapter states (fp32: 1e-4 on logits; int8: 0.25 on logits, 99% of predictions,
  half a point of accuracy), and ``torch.compile`` (default and freezing) agrees to 1e-4.
- ``bench.compare`` returns medians of its rounds, runs every round at the thread count it is
  given, interleaves the variants, and restores the caller's thread count.
- ``ensure_serving_model`` builds the hand-off pair into a fresh folder, its metadata describes the
  model file exactly, a complete pair is reused, and a damaged one is rebuilt byte for byte.

No test here passes or fails on a timing.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import NOTEBOOKS, load_module

# torch.compile imports inductor, which imports torch.utils.mkldnn, which still decorates with
# torch.jit.script_method and warns about it: torch's own deprecation, nothing this code can change.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

CHAPTER = NOTEBOOKS / "06-compile-and-optimize"
em = load_module(CHAPTER / "export_model.py")
bench = load_module(CHAPTER / "bench.py")

FP32_TOL = 1e-4  # largest |logit difference| allowed for float32 variants
INT8_TOL = 0.25  # largest |logit difference| allowed for the int8 model (logits span ~35 units)


def fixed_inputs(X_test: np.ndarray) -> np.ndarray:
    """The test split plus edge cases: blank images, saturated images, seeded random pixel counts."""
    rng = np.random.default_rng(123)
    edges = [np.zeros((2, 64)), np.full((2, 64), em.PIXEL_MAX), rng.integers(0, 17, (12, 64))]
    return np.concatenate([X_test, *[e.astype(np.float32) for e in edges]])


def ops(path) -> list[str]:
    return [node.op_type for node in onnx.load(str(path)).graph.node]


def ort_logits(path, X) -> np.ndarray:
    return em.make_session(path, threads=1).run([em.OUTPUT_NAME], {em.INPUT_NAME: X})[0]


@pytest.fixture(scope="module")
def data():
    return em.load_digits_split()


@pytest.fixture(scope="module")
def trained(data):
    X_train, _, y_train, _ = data
    return em.train_model(X_train, y_train)


@pytest.fixture(scope="module")
def eager(trained, data):
    X = fixed_inputs(data[1])
    with torch.inference_mode():
        return X, trained(torch.from_numpy(X)).numpy()


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    return em.export_onnx(trained, tmp_path_factory.mktemp("onnx") / "fp32.onnx")


# --- the model and its variants -------------------------------------------------------------------

def test_split_is_seeded_stratified_and_raw(data):
    again = em.load_digits_split()
    for a, b in zip(data, again):
        np.testing.assert_array_equal(a, b)
    X_train, X_test, y_train, y_test = data
    assert X_train.dtype == np.float32 and X_train.shape[1] == 64 and len(X_test) == 360
    assert X_train.min() == 0 and X_train.max() == em.PIXEL_MAX  # raw counts: the model scales itself
    assert np.abs(np.bincount(y_train) / len(y_train) - np.bincount(y_test) / len(y_test)).max() < 0.01


def test_training_is_deterministic_whatever_the_callers_threads(trained, data):
    X_train, X_test, y_train, y_test = data
    before = torch.get_num_threads()
    models = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            models.append(em.train_model(X_train, y_train, epochs=1))
            assert torch.get_num_threads() == threads, "the caller's thread count is restored"
    finally:
        torch.set_num_threads(before)
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)
    with torch.inference_mode():
        accuracy = (trained(torch.from_numpy(X_test)).argmax(1).numpy() == y_test).mean()
    assert accuracy > 0.95


def test_flops_per_sample_counts_every_linear_layer(trained):
    assert em.flops_per_sample(trained) == 2 * (64 * 1024 + 1024 * 1024 + 1024 * 10)


def test_onnx_export_matches_eager_with_a_dynamic_batch(exported, eager):
    X, reference = eager
    assert not exported.with_suffix(".onnx.data").exists(), "weights must be inside the one file"
    np.testing.assert_allclose(ort_logits(exported, X), reference, rtol=0, atol=FP32_TOL)
    for n in (1, 7):  # the batch dimension is dynamic: any size runs
        np.testing.assert_allclose(ort_logits(exported, X[:n]), reference[:n], rtol=0, atol=FP32_TOL)


def test_ort_optimized_graph_is_fused_and_matches_eager(exported, eager, tmp_path):
    X, reference = eager
    optimized = em.optimize_onnx(exported, tmp_path / "opt.onnx")
    assert "FusedGemm" in ops(optimized) and "Relu" not in ops(optimized)
    np.testing.assert_allclose(ort_logits(optimized, X), reference, rtol=0, atol=FP32_TOL)


@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_model_is_quantized_small_and_agrees_with_eager(exported, eager, data, tmp_path, per_channel):
    X, reference = eager
    int8 = em.quantize_int8(exported, tmp_path / "int8.onnx", per_channel=per_channel)
    assert "MatMulInteger" in ops(int8) or "DynamicQuantizeMatMul" in ops(int8)
    assert int8.stat().st_size < 0.3 * exported.stat().st_size
    assert not (tmp_path / "int8_pre.onnx").exists(), "the intermediate file is cleaned up"
    logits = ort_logits(int8, X)
    assert np.abs(logits - reference).max() < INT8_TOL
    assert (logits.argmax(1) == reference.argmax(1)).mean() >= 0.99
    y_test, n = data[3], len(data[3])
    assert abs((logits[:n].argmax(1) == y_test).mean() - (reference[:n].argmax(1) == y_test).mean()) <= 0.005


@pytest.mark.slow
def test_torch_compile_default_and_freezing_match_eager(trained, eager, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    X, reference = eager
    torch._dynamo.reset()
    try:
        for options in ({}, {"freezing": True}):
            compiled = torch.compile(trained, options=options)
            for n in (1, 256):
                with torch.inference_mode():
                    out = compiled(torch.from_numpy(np.resize(X, (n, 64)))).numpy()
                np.testing.assert_allclose(out, np.resize(reference, (n, 10)), rtol=0, atol=FP32_TOL)
    finally:
        torch._dynamo.reset()


# --- the benchmark helper -------------------------------------------------------------------------

def test_timing_summaries():
    t = bench.Timing("x", (3.0, 1.0, 2.0, 10.0, 4.0), threads=2, calls_per_round=1)
    assert t.median == 3.0 and t.best == 1.0
    assert t.iqr == (2.0, 4.0) and t.spread == pytest.approx(2 / 3)


@pytest.mark.parametrize("threads", [1, 2])
def test_compare_returns_medians_at_the_thread_count_it_is_given(threads):
    before = torch.get_num_threads()
    seen = {"a": [], "b": []}
    result = bench.compare({name: (lambda name=name: seen[name].append(torch.get_num_threads()))
                            for name in seen}, threads=threads, rounds=5, round_s=0.001, warmup=1)
    assert set(seen["a"]) == set(seen["b"]) == {threads}, "every call runs at the requested thread count"
    assert torch.get_num_threads() == before, "the caller's thread count is restored"
    for name, timing in result.items():
        assert timing.name == name and timing.threads == threads and len(timing.times) == 5
        assert timing.median == statistics.median(timing.times)
        assert timing.calls_per_round >= 1


def test_compare_interleaves_rounds_in_rotating_order():
    log = []
    names = ["a", "b", "c"]
    fns = {name: (lambda name=name: log.append(name)) for name in names}
    result = bench.compare(fns, threads=1, rounds=4, round_s=1e-9, warmup=0)
    assert all(t.calls_per_round == 1 for t in result.values())
    runs = [name for i, name in enumerate(log) if i == 0 or log[i - 1] != name]  # Timer adds warm-up calls
    assert runs[-12:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]  # 4 rotated rounds


def test_compare_rejects_settings_that_measure_nothing():
    with pytest.raises(ValueError):
        bench.compare({"f": lambda: None}, threads=0)
    with pytest.raises(ValueError):
        bench.compare({"f": lambda: None}, threads=1, rounds=1)
    with pytest.raises(ValueError):
        bench.compare({"f": lambda: None}, threads=1, gap_s=-0.1)


def test_roofline_bound_has_a_slope_and_a_roof():
    assert bench.roofline_bound(0.5, peak_gflops=300, bandwidth_gbs=20) == 10  # memory-bound
    assert bench.roofline_bound(100, peak_gflops=300, bandwidth_gbs=20) == 300  # compute-bound
    assert bench.roofline_bound(15, peak_gflops=300, bandwidth_gbs=20) == 300  # the ridge point


def test_int8_matmul_runs_the_bare_product_or_the_quantized_layer():
    (product,) = bench.int8_matmul(threads=1, m=4, k=8, n=3)()
    assert product.shape == (4, 3) and product.dtype == np.int32
    (layer,) = bench.int8_matmul(threads=1, m=4, k=8, n=3, quantize_input=True)()
    assert layer.shape == (4, 3) and layer.dtype == np.float32 and np.isfinite(layer).all()


# --- the hand-off to the serving chapter ----------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    return em.ensure_serving_model(folder)


@pytest.mark.slow
def test_served_model_metadata_describes_the_file(served, data):
    meta = json.loads((served.parent / "model.json").read_text())
    for key in ("name", "version", "input_name", "output_name", "n_features", "classes", "input_dtype",
                "test_accuracy", "opset"):
        assert key in meta, f"model.json lacks {key}, which the serving chapter reads"
    assert meta["version"] == em.file_hash(served) and served.name == meta["file"]
    model = onnx.load(str(served))
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == meta["input_name"] and out.name == meta["output_name"]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and meta["input_dtype"] == "float32"
    batch_in, features = inp.type.tensor_type.shape.dim
    batch_out, classes = out.type.tensor_type.shape.dim
    assert batch_in.dim_param and batch_out.dim_param, "the batch dimension is dynamic"
    assert features.dim_value == meta["n_features"] == 64 and classes.dim_value == len(meta["classes"]) == 10
    opsets = {o.domain: o.version for o in model.opset_import}
    assert meta["opset"] == opsets.get("", opsets.get("ai.onnx"))
    assert "DynamicQuantizeMatMul" in ops(served), "the served model is the int8 one"
    _, X_test, _, y_test = data
    session = em.make_session(served, threads=1)
    assert em.onnx_accuracy(session, X_test, y_test) == meta["test_accuracy"]
    assert abs(meta["test_accuracy"] - meta["eager_test_accuracy"]) <= 0.005
    assert session.run(None, {meta["input_name"]: X_test[:1]})[0].shape == (1, 10)


@pytest.mark.slow
def test_a_complete_pair_is_reused_and_a_damaged_one_rebuilt(served):
    meta_path = served.parent / "model.json"
    stamps = served.stat().st_mtime_ns, meta_path.stat().st_mtime_ns
    original = served.read_bytes()
    assert em.ensure_serving_model(served.parent) == served
    assert (served.stat().st_mtime_ns, meta_path.stat().st_mtime_ns) == stamps, "nothing was rebuilt"
    served.write_bytes(original[: len(original) // 2])  # a half-written file: the hash no longer matches
    assert em.ensure_serving_model(served.parent) == served
    assert served.read_bytes() == original, "the seeded rebuild is byte-identical"
    assert [p.name for p in served.parent.iterdir() if p.name.startswith(".")] == [], "no temp files left"


# --- the real processes ---------------------------------------------------------------------------

@pytest.mark.slow
def test_export_model_script_prints_the_metadata_as_its_last_line(served):
    done = subprocess.run([sys.executable, str(CHAPTER / "export_model.py"), "--out", str(served.parent)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["model"] == str(served)
    assert result["version"] == json.loads((served.parent / "model.json").read_text())["version"]


@pytest.mark.slow
def test_bench_script_measures_the_machine(tmp_path):
    done = subprocess.run([sys.executable, str(CHAPTER / "bench.py"), "--threads", "1", "--n", "256",
                           "--megabytes", "8"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["threads"] == 1
    assert result["fp32_gflops"] > 0 and result["int8_gops"] > 0 and result["copy_gbs"] > 0
