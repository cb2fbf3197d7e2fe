"""Chapter 06's companion code: what the chapter and the serving chapter rely on.

- The exported, optimized and quantized models agree with eager on fixed inputs. fp32 variants
  (ONNX Runtime, ``torch.compile`` default and freezing) agree within float32 rounding, a bound
  that scales with the sums being rounded, so it holds whichever kernels ATen, oneDNN or MLAS
  pick; int8 agrees within a tenth of the logits' span (per-channel: a fifth), on 99% of
  predictions (98%) and within a point of accuracy: bounds that also hold for x86 CPUs without
  VNNI, whose int8 kernels saturate (emulated in NumPy). On a VNNI CPU the int8 model computes
  exact integer dynamic quantization.
- The model file follows the book's seed, and a pair built with another seed is rebuilt.
- ``bench.compare`` returns medians of its rounds, runs every round at the thread count it is
  given, interleaves the variants, and restores the caller's thread count.
- ``ensure_serving_model`` builds the hand-off pair into a fresh folder, its metadata describes the
  model file exactly, a complete pair is reused, and a damaged one is rebuilt byte for byte.
- The encoder block (``encoder.py``): its pointer task is what it says; static (QDQ) int8 makes
  a row's answer independent of its batch-mates where dynamic int8 does not; the profile helpers
  group kernels and split a call's time without losing any of it.
- The AOTInductor package runs in a fresh process (``run_aoti.py``) that never imports the model's
  source, and answers like eager; bad paths get a clear error.
- ``gpu_variants.measure_gpu`` times every variant at every batch size it is given, the same way
  (its loop runs on a CPU, without CUDA graphs).

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
from onnx import numpy_helper

# torch.compile imports inductor, which imports torch.utils.mkldnn, which still decorates with
# torch.jit.script_method and warns about it: torch's own deprecation, nothing this code can change.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

CHAPTER = NOTEBOOKS / "06-compile-and-optimize"
em = load_module(CHAPTER / "export_model.py")
bench = load_module(CHAPTER / "bench.py")
enc = load_module(CHAPTER / "encoder.py")

EPS32 = float(np.finfo(np.float32).eps)
FP32_ULPS = 1.0  # fp32 bound: this many eps times the sum of |terms| behind each logit (see below)
# int8 bounds, per-tensor and per-channel scales: largest |dlogit| as a fraction of the eager logits'
# span (max - min, about 35 units), agreement with eager's predictions, accuracy difference. Over
# 8 seeds and the three kernel levels: ONNX Runtime here (VNNI) <= 0.2% of the span, agreement
# >= 99.7%, accuracy within 1 image; the no-VNNI emulation <= 4.1% (per-channel 8.8%), agreement
# >= 99.7% (per-channel 98.7%), accuracy within 1 image (0.28 points).
INT8_BOUNDS = {False: (0.1, 0.99, 0.01), True: (0.2, 0.98, 0.01)}


def float32_bound(model, X: np.ndarray) -> np.ndarray:
    """Per logit: FP32_ULPS * eps32 * the model run with |inputs|, |weights| and |biases|.

    Rounding error in a float32 sum grows with the sum of the absolute values of its terms, not
    with the result (the forward error bound of a dot product is n * eps * sum |x_i w_i|), and two
    kernels that sum in different orders (ATen's default, AVX2 or AVX-512 kernels, MLAS) differ by
    that much at most. Run on the absolute values, the network adds up every such term through all
    layers (ReLU only shrinks them). Measured differences are far below one such eps on this
    model under ATEN_CPU_CAPABILITY=default, avx2 and avx512: 0.064 of one such eps for ONNX Runtime,
    0.016 for torch.compile, over 8 seeds; a model computing anything else (a missing bias, another
    scaling) misses by whole units.
    """
    a = np.abs(X.astype(np.float64)) / em.PIXEL_MAX
    for layer in (model.fc1, model.fc2, model.fc3):
        w, b = (t.detach().double().abs().numpy() for t in (layer.weight, layer.bias))
        a = a @ w.T + b
    return FP32_ULPS * EPS32 * a


def assert_within(actual: np.ndarray, expected: np.ndarray, bound: np.ndarray) -> None:
    diff = np.abs(actual.astype(np.float64) - expected)
    assert (diff <= bound).all(), (f"largest |difference| {diff.max():.3g}; worst difference/bound "
                                   f"{(diff / bound).max():.2f} (bound at that logit {bound.flat[np.argmax(diff / bound)]:.3g})")


def fixed_inputs(X_test: np.ndarray) -> np.ndarray:
    """The test split plus edge cases: blank images, saturated images, seeded random pixel counts."""
    rng = np.random.default_rng(123)
    edges = [np.zeros((2, 64)), np.full((2, 64), em.PIXEL_MAX), rng.integers(0, 17, (12, 64))]
    return np.concatenate([X_test, *[e.astype(np.float32) for e in edges]])


def int8_reference(path, X: np.ndarray, saturate: bool = False) -> np.ndarray:
    """What the optimized int8 graph computes, in NumPy, node by node.

    ``DynamicQuantizeMatMul`` as ONNX Runtime defines it: the input quantized to uint8 over its
    range (which includes 0), int8 weights, integer sums, the result scaled back to float32. By
    default the sums are exact, as VNNI's ``vpdpbusd`` (and ARM's dot products) compute them; with
    ``saturate``, every adjacent pair of u8 x s8 products is first added in int16 with saturation,
    as ``vpmaddubsw`` does in the int8 kernels of x86 CPUs without VNNI (AVX2, AVX-512 before VNNI).
    """
    model = onnx.load(str(path))
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    values = {model.graph.input[0].name: X.astype(np.float32)}
    for node in model.graph.node:
        args = [values.get(name, init.get(name)) for name in node.input]
        if node.op_type == "Mul":
            values[node.output[0]] = (args[0] * args[1]).astype(np.float32)
        elif node.op_type == "Relu":
            values[node.output[0]] = np.maximum(args[0], 0)
        elif node.op_type == "DynamicQuantizeMatMul":
            values[node.output[0]] = _quantized_matmul(*args, saturate=saturate)
        else:
            raise NotImplementedError(f"int8_reference does not know {node.op_type}")
    return values[model.graph.output[0].name]


def _quantized_matmul(x, w, w_scale, w_zero=None, bias=None, *, saturate: bool):
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = np.float32((hi - lo) / 255)
    zero = int(np.clip(np.rint(-lo / scale), 0, 255))
    q = np.clip(np.rint(x / scale) + zero, 0, 255).astype(np.int32)
    w = w.astype(np.int32) - (0 if w_zero is None else w_zero.astype(np.int32))
    if saturate:  # in row blocks: the pairwise products of a block are [16, k / 2, n]
        acc = np.concatenate([np.clip(q[i:i + 16, 0::2, None] * w[None, 0::2] + q[i:i + 16, 1::2, None]
                                      * w[None, 1::2], -32768, 32767).sum(1) for i in range(0, len(q), 16)])
        acc -= zero * w.sum(0)
    else:
        acc = (q - zero) @ w
    out = acc.astype(np.float32) * (scale * w_scale.astype(np.float32))
    return out if bias is None else out + bias


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
def fp32_bound(trained, eager):
    return float32_bound(trained, eager[0])


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
    assert accuracy > 0.93, f"test accuracy {accuracy:.2%}"  # 96.1% to 98.9% over 9 seeds


def test_flops_per_sample_counts_every_linear_layer(trained):
    assert em.flops_per_sample(trained) == 2 * (64 * 1024 + 1024 * 1024 + 1024 * 10)


def test_float32_bound_is_tight_enough_to_catch_a_wrong_model(trained, eager, fp32_bound):
    X, reference = eager
    assert fp32_bound.max() < 1e-3, f"bound {fp32_bound.max():.2e}: too loose to mean 'rounding'"
    with torch.inference_mode():
        no_last_bias = reference - trained.fc3.bias.detach().numpy()  # a model that forgot one bias
    assert (np.abs(no_last_bias - reference) > fp32_bound).any()


def test_onnx_export_matches_eager_with_a_dynamic_batch(exported, eager, fp32_bound):
    X, reference = eager
    assert not exported.with_suffix(".onnx.data").exists(), "weights must be inside the one file"
    assert_within(ort_logits(exported, X), reference, fp32_bound)
    for n in (1, 7):  # the batch dimension is dynamic: any size runs
        assert_within(ort_logits(exported, X[:n]), reference[:n], fp32_bound[:n])


def test_ort_optimized_graph_is_fused_and_matches_eager(exported, eager, fp32_bound, tmp_path):
    X, reference = eager
    optimized = em.optimize_onnx(exported, tmp_path / "opt.onnx")
    assert "FusedGemm" in ops(optimized) and "Relu" not in ops(optimized)
    assert_within(ort_logits(optimized, X), reference, fp32_bound)


@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_model_is_quantized_small_and_agrees_with_eager(exported, eager, data, tmp_path, per_channel):
    X, reference = eager
    int8 = em.quantize_int8(exported, tmp_path / "int8.onnx", per_channel=per_channel)
    assert "MatMulInteger" in ops(int8) or "DynamicQuantizeMatMul" in ops(int8)
    assert int8.stat().st_size < 0.3 * exported.stat().st_size
    assert not (tmp_path / "int8_pre.onnx").exists(), "the intermediate file is cleaned up"
    span_fraction, agreement, accuracy = INT8_BOUNDS[per_channel]
    bound = span_fraction * (reference.max() - reference.min())
    y_test, n = data[3], len(data[3])
    emulated = int8_reference(em.optimize_onnx(int8, tmp_path / "int8_opt.onnx"), X, saturate=True)
    # this CPU's kernels, and the saturating pair sums of x86 int8 kernels without VNNI
    for name, logits in [("onnxruntime", ort_logits(int8, X)), ("no-VNNI emulation", emulated)]:
        assert np.abs(logits - reference).max() < bound, (name, np.abs(logits - reference).max(), bound)
        agree = (logits.argmax(1) == reference.argmax(1)).mean()
        assert agree >= agreement, f"{name}: agrees with eager on {agree:.2%}, needed {agreement:.0%}"
        d_acc = (logits[:n].argmax(1) == y_test).mean() - (reference[:n].argmax(1) == y_test).mean()
        assert abs(d_acc) <= accuracy, f"{name}: accuracy {d_acc:+.2%} from eager's"


@pytest.mark.skipif(not bench.cpu_description().get("int8_dot"),
                    reason="exact only with VNNI: without it, x86 int8 kernels saturate pair sums")
@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_model_computes_exact_dynamic_quantization_on_a_vnni_cpu(exported, eager, tmp_path, per_channel):
    X, reference = eager
    raw = em.quantize_int8(exported, tmp_path / "int8_raw.onnx", per_channel=per_channel)
    int8 = em.optimize_onnx(raw, tmp_path / "int8.onnx")
    difference = np.abs(ort_logits(int8, X) - int8_reference(int8, X)).max()
    assert difference < 1e-5 * (reference.max() - reference.min()), f"|ORT - exact| up to {difference:.3g}"


@pytest.mark.slow
def test_torch_compile_default_and_freezing_match_eager(trained, eager, fp32_bound, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    X, reference = eager
    torch._dynamo.reset()
    try:
        for options in ({}, {"freezing": True}):
            compiled = torch.compile(trained, options=options)
            for n in (1, 256):
                with torch.inference_mode():
                    out = compiled(torch.from_numpy(np.resize(X, (n, 64)))).numpy()
                assert_within(out, np.resize(reference, (n, 10)), np.resize(fp32_bound, (n, 10)))
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
    with pytest.raises(ValueError, match=r"threads must be >= 1, got 0"):
        bench.compare({"f": lambda: None}, threads=0)
    with pytest.raises(ValueError, match=r"rounds must be >= 2 .*got 1"):
        bench.compare({"f": lambda: None}, threads=1, rounds=1)
    with pytest.raises(ValueError, match=r"gap_s must be >= 0, got -0.1"):
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
    # a point: the bound test_int8_model_is_quantized_small_and_agrees_with_eager checks, no-VNNI emulation included
    assert abs(meta["test_accuracy"] - meta["eager_test_accuracy"]) <= INT8_BOUNDS[False][2]
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


@pytest.mark.slow
def test_a_pair_built_with_another_book_seed_is_not_reused(served, tmp_path):
    meta = json.loads((served.parent / "model.json").read_text())
    assert meta["seed"] == em.SEED, "the served model follows GRADIENT_RAGE_SEED"
    (tmp_path / em.MODEL_FILE).write_bytes(served.read_bytes())
    (tmp_path / "model.json").write_text(json.dumps(meta | {"seed": em.SEED + 1}))
    assert em._is_complete(served, served.parent / "model.json")
    assert not em._is_complete(tmp_path / em.MODEL_FILE, tmp_path / "model.json")


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


# --- the encoder block, static quantization and the profile helpers ---------------------------------

def test_encoder_task_labels_are_the_pointed_at_tokens():
    tokens, labels = enc.make_data(500, seed=3)
    again, _ = enc.make_data(500, seed=3)
    np.testing.assert_array_equal(tokens, again)
    assert tokens.shape == (500, enc.SEQ) and tokens.dtype == np.int64
    pointer = tokens[:, 0]
    assert pointer.min() >= 1 and pointer.max() < enc.VOCAB, "the pointer names a position after itself"
    np.testing.assert_array_equal(labels, tokens[np.arange(500), pointer])
    assert len(np.unique(pointer)) == enc.VOCAB - 1


@pytest.fixture(scope="module")
def small_encoder():
    """A briefly trained encoder (not the chapter's: one epoch on 512 sequences) and its test tokens."""
    tokens, labels = enc.make_data(512, seed=5)
    model = enc.train_model(tokens, labels, epochs=1, seed=5)
    return model, enc.make_data(128, seed=6)[0]


def _eager(model):
    def run(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()
    return run


def test_flops_per_sample_counts_the_block():
    model = enc.make_model()
    d, ff, s = enc.D_MODEL, enc.D_FF, enc.SEQ
    per_token = 2 * (d * 3 * d + d * d + d * ff + ff * d)
    assert enc.flops_per_sample(model) == s * per_token + 2 * d * enc.N_CLASSES + 4 * s * s * d


def test_batch_dependence_is_zero_for_rowwise_and_large_for_batch_coupled_functions(small_encoder):
    model, tokens = small_encoder
    eager = _eager(model)
    assert enc.batch_dependence(eager, tokens) < 1e-4
    coupled = lambda x: eager(x) * (1 + 0.01 * len(x))  # an answer that depends on the batch size
    assert enc.batch_dependence(coupled, tokens) > 0.1


@pytest.mark.slow
def test_static_int8_is_batch_independent_and_dynamic_is_not(small_encoder, tmp_path):
    model, tokens = small_encoder
    fp32 = enc.export_onnx(model, tmp_path / "enc.onnx")
    static = enc.quantize_static_int8(fp32, tmp_path / "static.onnx", calibration_tokens=tokens[:64])
    dynamic = em.quantize_int8(fp32, tmp_path / "dynamic.onnx")
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(ops(static)) and "DynamicQuantizeLinear" not in ops(static)
    assert "DynamicQuantizeLinear" in ops(dynamic)
    assert not (tmp_path / "static_pre.onnx").exists(), "the pre-processed file is cleaned up"
    eager = _eager(model)(tokens)

    def runner(path):
        session = em.make_session(path, threads=1)
        return lambda x: session.run([enc.OUTPUT_NAME], {enc.INPUT_NAME: x})[0]

    assert np.abs(runner(fp32)(tokens) - eager).max() < 1e-4
    for path in (static, dynamic):  # int8: near eager (a tenth of the logits' span)
        assert np.abs(runner(path)(tokens) - eager).max() < 0.1 * np.ptp(eager)
    static_dep, dynamic_dep = enc.batch_dependence(runner(static), tokens), enc.batch_dependence(runner(dynamic), tokens)
    assert static_dep < 1e-4, f"static int8: a row's answer moved by {static_dep:.2e} with its batch-mates"
    assert dynamic_dep > 1e-3, f"dynamic int8 batch dependence only {dynamic_dep:.2e}"


def test_torch_profile_returns_every_op_and_the_profiled_wall_time():
    x = torch.randn(64, 64)
    per_op, wall = enc.torch_profile(lambda: torch.nn.functional.gelu(x @ x), calls=5)
    assert "aten::mm" in per_op and "aten::gelu" in per_op
    assert 0 < sum(per_op.values()) <= wall * 1.05, (sum(per_op.values()), wall)


def test_ops_per_call_counts_every_dispatcher_entry_per_call():
    x = torch.randn(8, 8)
    assert enc.ops_per_call(lambda: x * x + x, calls=4) == 2  # aten::mul, aten::add
    # a composite op counts with the ops it calls: linear enters t and addmm as well
    w, b = torch.randn(8, 8), torch.randn(8)
    assert enc.ops_per_call(lambda: torch.nn.functional.linear(x, w, b), calls=3) >= 3


def test_kernels_are_grouped_by_what_they_do():
    assert enc.kind_of("graph_0_cpp_fused_add_native_layer_norm_0") == "fused Inductor kernels"
    assert enc.kind_of("aten::addmm") == enc.kind_of("MatMulInteger") == "matrix products"
    assert enc.kind_of("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention kernel"
    assert enc.kind_of("LayerNormalization") == enc.kind_of("aten::gelu") == "norm, softmax, GELU, adds"
    assert enc.kind_of("DynamicQuantizeLinear") == "quantize / dequantize"
    assert enc.kind_of("something new") == "other ops and framework"
    grouped = enc.by_kind({"aten::addmm": 2.0, "aten::mm": 1.0, "aten::gelu": 0.5})
    assert grouped == {"matrix products": 3.0, "norm, softmax, GELU, adds": 0.5}


def test_attribution_splits_the_whole_call_into_measured_parts():
    per_kind = {"matrix products": 0.004, "attention kernel": 0.001, "fused Inductor kernels": 0.002}
    a = enc.attribute(per_kind, flops=1e9, seconds=0.010, profiled_seconds=0.012, peak_gflops=400,
                      bound_gflops=200)
    assert a["of bound"] == pytest.approx(1e9 / 0.010 / 1e9 / 200)  # from the unprofiled median
    assert a["products ms"] == pytest.approx(5.0) and a["other kernels ms"] == pytest.approx(2.0)
    # the profiled call is split whole: products + other kernels + the remainder outside any kernel
    assert a["products ms"] + a["other kernels ms"] + a["outside kernels ms"] == pytest.approx(12.0)
    assert a["products at peak ms"] == pytest.approx(2.5) and a["products % of peak"] == pytest.approx(50.0)
    assert a["profiled / timed"] == pytest.approx(1.2)


# --- AOTInductor: the package in a fresh process ------------------------------------------------------

@pytest.mark.slow
def test_aoti_package_runs_in_a_fresh_process_without_the_models_source(small_encoder, tmp_path, monkeypatch):
    from torch.export import Dim

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model, tokens = small_encoder
    program = torch.export.export(model, (torch.from_numpy(tokens[:4]),),
                                  dynamic_shapes=({0: Dim("batch", min=1, max=256)},))
    pt2 = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "enc.pt2"))
    onnx_path = enc.export_onnx(model, tmp_path / "enc.onnx")
    np.save(tmp_path / "tokens.npy", tokens)
    cmd = [sys.executable, str(CHAPTER / "run_aoti.py"), "--package", pt2, "--onnx", str(onnx_path),
           "--tokens", str(tmp_path / "tokens.npy"), "--out", str(tmp_path / "logits.npy"), "--batch", "8",
           "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["imported_encoder"] is False and result["batch"] == 8 and result["threads"] == 1
    seconds = result["seconds"]
    assert 0 < seconds["pt2 load"] <= seconds["pt2 first call"] and 0 < seconds["onnx load"] <= seconds["onnx first call"]
    assert set(result["ms"]) == {"1", "8"} and all(set(v) == {"pt2", "onnx"} for v in result["ms"].values())
    assert np.abs(np.load(tmp_path / "logits.npy") - _eager(model)(tokens)).max() < 1e-4


def test_run_aoti_names_a_missing_file(tmp_path):
    missing = tmp_path / "nothing.pt2"
    done = subprocess.run([sys.executable, str(CHAPTER / "run_aoti.py"), "--package", str(missing),
                           "--onnx", str(missing), "--tokens", str(missing), "--out", str(tmp_path / "o.npy")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and f"{missing} does not exist" in done.stderr


# --- the GPU variants' timing loop, on a CPU -----------------------------------------------------------

def test_gpu_variants_time_every_variant_at_every_batch_size_the_same_way(data, monkeypatch):
    monkeypatch.syspath_prepend(str(CHAPTER))  # gpu_variants imports bench as a sibling
    gpu = load_module(CHAPTER / "gpu_variants.py")
    torch.manual_seed(0)
    model = em.make_model().eval()
    X = data[1]
    x = torch.from_numpy(X[:4])
    calls = gpu.variants(model, x, device="cpu", graphs=False)
    assert set(calls) == {"fp32", "fp16"}
    with torch.inference_mode():
        assert calls["fp32"](x).dtype == torch.float32 and calls["fp16"](x).dtype == torch.float16
    result = gpu.measure_gpu(model, X, batches=(1, 8), device="cpu")
    assert result["batches"] == [1, 8] and set(result["ms"]) == {"1", "8"}
    assert all(set(ms) == {"fp32", "fp16"} and min(ms.values()) > 0 for ms in result["ms"].values())
    assert result["fp16_prediction_agreement"] >= 0.99 and result["fp16_max_abs_logit_diff"] < 0.1


def test_gpu_variants_script_measures_on_a_gpu_and_says_so_without_one():
    done = subprocess.run([sys.executable, str(CHAPTER / "gpu_variants.py")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if torch.cuda.is_available():
        assert set(result["ms"]) == {"1", "256"} and len(result["ms"]["1"]) == 3
    else:
        assert result == {"skipped": "no CUDA device"}
