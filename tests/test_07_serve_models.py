"""Chapter 07's server, batcher and load generator: what a reader relies on when they reuse them.

In-process first: the request contract (typed JSON, binary rows, range, size, content type) answers
4xx with a message and keeps serving; the batcher groups concurrent requests, routes every row back
to its own request, honours max_batch and max_wait, and drains on shutdown; the load generator's
statistics are right. Then one test starts the real server process with ``python -m uvicorn``, sends
good and bad requests and a short open-loop load over HTTP, and stops it.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import warnings

import numpy as np
import pytest
from conftest import NOTEBOOKS, load_module

CHAPTER = NOTEBOOKS / "07-serve-models"


@pytest.fixture(scope="module")
def app_module():
    return load_module(CHAPTER / "app.py", "gr_07_serve_models_app")


@pytest.fixture(scope="module")
def load_test():
    return load_module(CHAPTER / "load_test.py", "gr_07_serve_models_load_test")


@pytest.fixture(scope="module")
def server_process():
    return load_module(CHAPTER / "server_process.py", "gr_07_serve_models_server_process")


@pytest.fixture(scope="module")
def model_path(app_module):
    return app_module.load_export_module().ensure_serving_model()  # builds chapter 06's model if missing


@pytest.fixture(scope="module")
def meta(model_path):
    return json.loads((model_path.parent / "model.json").read_text())


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    return load_digits().data.astype(np.float32)


@pytest.fixture(scope="module")
def client(app_module, model_path):
    with warnings.catch_warnings():  # starlette announces a future switch of its test client's HTTP library
        warnings.filterwarnings("ignore", message=".*starlette.testclient.*")
        from fastapi.testclient import TestClient
    app = app_module.create_app(app_module.Settings(model_path=str(model_path), max_batch=8, max_wait_ms=1))
    with TestClient(app) as c:  # the context runs the lifespan: the batching loop starts and drains
        yield c


def expected_labels(model_path, meta, x):
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(None, {meta["input_name"]: x})[0].argmax(axis=1).tolist()


# --- the request contract, in process -------------------------------------------------------------

def test_settings_come_from_serve_environment_variables(app_module):
    s = app_module.Settings.from_env({"SERVE_MAX_BATCH": "16", "SERVE_MAX_WAIT_MS": "0.5", "OTHER": "x"})
    assert (s.max_batch, s.max_wait_ms, s.ort_threads) == (16, 0.5, 1)


def test_health_and_ready_carry_the_model_version(client, meta):
    for path in ("/health", "/ready"):
        r = client.get(path)
        assert r.status_code == 200 and r.json()["model_version"] == meta["version"]
        assert r.headers["x-model-version"] == meta["version"]
    assert client.get("/ready").json()["ready"] is True


def test_json_and_binary_requests_give_the_models_labels(client, model_path, meta, digits):
    x = digits[:5]
    want = expected_labels(model_path, meta, x)
    as_json = client.post("/predict", json={"instances": x.tolist()})
    as_binary = client.post("/predict", content=x.astype("<f4").tobytes(),
                            headers={"content-type": "application/octet-stream"})
    for r in (as_json, as_binary):
        assert r.status_code == 200, r.text
        assert r.json()["labels"] == want and r.json()["model_version"] == meta["version"]


def bad_requests(row: list[float], n_features: int):
    js = lambda payload: (json.dumps(payload), "application/json")  # noqa: E731
    return {
        "malformed JSON": ('{"instances": [[1, 2', "application/json", 400, "not valid JSON"),
        "wrong feature count": (*js({"instances": [row[:3]]}), 422, f"row 0 has 3 features; the model takes {n_features}"),
        "string feature": (*js({"instances": [row[:-1] + ["7"]]}), 422, f"row 0, feature {n_features - 1}"),
        "boolean feature": (*js({"instances": [[True] + row[1:]]}), 422, "row 0, feature 0"),
        "NaN": (json.dumps({"instances": [row]}).replace("[[0.0", "[[NaN", 1), "application/json", 422, "finite"),
        "Infinity": (json.dumps({"instances": [row]}).replace("[[0.0", "[[-Infinity", 1), "application/json", 422, "finite"),
        "out of range": (*js({"instances": [[255.0] * n_features]}), 422, "outside the model's input range"),
        "unknown field": (*js({"instances": [row], "debug": True}), 422, "body.debug"),
        "empty batch": (*js({"instances": []}), 422, "body.instances"),
        "not an object": (*js([row]), 422, "body"),
        "oversized batch": (np.zeros((1025, n_features), "<f4").tobytes(), "application/octet-stream", 422,
                            "batch of 1025 rows exceeds the limit of 1024"),
        "oversized body": (b"0" * (2 << 20), "application/json", 413, "exceeds the limit"),
        "binary odd length": (b"\0" * (4 * n_features + 1), "application/octet-stream", 422, "multiple of"),
        "binary NaN": (np.full((2, n_features), np.nan, "<f4").tobytes(), "application/octet-stream", 422, "NaN"),
        "wrong content type": ("instances=1", "text/plain", 415, "content-type must be"),
        "no content type": (b"", None, 415, "content-type must be"),
    }


@pytest.mark.parametrize("case", list(bad_requests([0.0] * 64, 64)))
def test_bad_input_gets_a_4xx_that_says_what_is_wrong(client, model_path, meta, digits, case):
    row = digits[0].tolist()
    body, kind, status, phrase = bad_requests(row, meta["n_features"])[case]
    headers = {"content-type": kind} if kind else {}
    r = client.post("/predict", content=body, headers=headers)
    assert r.status_code == status, r.text
    text = " ".join([r.json()["error"], *r.json()["details"]])
    assert phrase in text, text
    assert r.json()["model_version"] == meta["version"] and r.headers["x-model-version"] == meta["version"]
    assert len(r.content) < 2000, "an error must not echo the payload back"
    after = client.post("/predict", json={"instances": [row]})
    assert after.status_code == 200 and after.json()["labels"] == expected_labels(model_path, meta, digits[:1])


def test_errors_are_counted_and_no_5xx_after_bad_input(client):
    client.post("/predict", content="x", headers={"content-type": "text/plain"})
    stats = client.get("/stats").json()
    assert stats["responses"].get("4xx", 0) >= 1 and stats["responses"].get("5xx", 0) == 0


def test_describe_errors_speaks_in_rows_and_features(app_module):
    errors = [{"type": "too_short", "loc": ("instances", 2), "msg": "x", "ctx": {"actual_length": 5}},
              {"type": "too_long", "loc": ("instances",), "msg": "x", "ctx": {"actual_length": 9}},
              {"type": "float_type", "loc": ("instances", 0, 3), "msg": "Input should be a valid number", "input": "a"}]
    out = app_module.describe_errors(errors + errors[:1] * 5, n_features=64, max_rows=8)
    assert out[0] == "row 2 has 5 features; the model takes 64"
    assert out[1] == "batch of 9 rows exceeds the limit of 8 rows per request"
    assert out[2].startswith("row 0, feature 3: Input should be a valid number")
    assert out[-1] == "... and 3 more" and len(out) == 6


# --- the batcher, in process ----------------------------------------------------------------------

def run_batcher(app_module, sizes, *, max_batch, max_wait_s, fail=False):
    """Submit one request per entry of ``sizes`` (rows each) at once; return results and batch sizes."""
    calls = []

    def predict(x):  # row i of the batch answers with its own first feature: routing is checkable
        calls.append(len(x))
        if fail:
            raise RuntimeError("model exploded")
        return x[:, 0].astype(int)

    async def main():
        stats = app_module.Stats()
        batcher = app_module.Batcher(predict, max_batch, max_wait_s, stats)
        batcher.start()
        inputs = [np.full((n, 3), 100 * i + np.arange(n)[:, None], np.float32) for i, n in enumerate(sizes)]
        results = await asyncio.gather(*(batcher.submit(x) for x in inputs), return_exceptions=True)
        await batcher.drain()
        return inputs, results, stats

    inputs, results, stats = asyncio.run(main())
    return inputs, results, calls, stats


def test_batcher_groups_concurrent_requests_and_routes_rows_back(app_module):
    inputs, results, calls, stats = run_batcher(app_module, [1] * 10, max_batch=4, max_wait_s=0.05)
    assert calls == [4, 4, 2] and stats.batches == 3
    for x, got in zip(inputs, results):
        assert got.tolist() == x[:, 0].astype(int).tolist()


def test_batcher_with_max_batch_one_calls_the_model_per_request(app_module):
    _, results, calls, _ = run_batcher(app_module, [1] * 5, max_batch=1, max_wait_s=0.0)
    assert calls == [1] * 5 and [r.tolist() for r in results] == [[0], [100], [200], [300], [400]]


def test_batcher_never_splits_a_request_and_keeps_batches_under_max(app_module):
    inputs, results, calls, _ = run_batcher(app_module, [3, 3, 10, 2], max_batch=6, max_wait_s=0.02)
    assert calls == [6, 10, 2]  # 3+3 fill a batch; 10 rows run alone; nothing is cut in two
    for x, got in zip(inputs, results):
        assert got.tolist() == x[:, 0].astype(int).tolist()


def test_batcher_waits_for_company_but_not_longer_than_max_wait(app_module):
    async def main():
        batcher = app_module.Batcher(lambda x: x[:, 0], 32, 0.05, app_module.Stats())
        batcher.start()
        loop = asyncio.get_running_loop()
        start = loop.time()
        await batcher.submit(np.zeros((1, 3), np.float32))
        waited = loop.time() - start
        await batcher.drain()
        return waited

    waited = asyncio.run(main())
    assert 0.045 <= waited < 5.0  # a lone request waits its 50 ms for company, then runs


def test_batcher_hands_a_model_error_to_every_waiting_request(app_module):
    _, results, calls, stats = run_batcher(app_module, [1, 1, 1], max_batch=8, max_wait_s=0.01, fail=True)
    assert all(isinstance(r, RuntimeError) for r in results) and stats.batches == 0


def test_batcher_drain_answers_everything_queued(app_module):
    async def main():
        batcher = app_module.Batcher(lambda x: x[:, 0], 64, 60.0, app_module.Stats())  # would wait 60 s
        batcher.start()
        pending = [asyncio.ensure_future(batcher.submit(np.ones((1, 3), np.float32))) for _ in range(5)]
        await asyncio.sleep(0.01)  # the loop is now waiting for company
        await batcher.drain(timeout=5)  # must flush at once: 60 s of waiting would outlast the drain
        return [p.done() and not p.cancelled() and p.exception() is None for p in pending]

    assert all(asyncio.run(main()))


# --- the load generator, in process ---------------------------------------------------------------

def test_percentile_is_nearest_rank(load_test):
    values = list(range(1, 101))
    assert [load_test.percentile(values, q) for q in (50, 95, 99, 100)] == [50, 95, 99, 100]
    assert math.isnan(load_test.percentile([], 99))


def test_summary_counts_every_outcome_and_times_from_the_intended_send(load_test):
    rec = load_test.Recorder()
    rec.add(0.0, 0.0, 0.0, 0.010, 200)
    rec.add(0.1, 0.1, 0.6, 0.610, 200)  # waited 0.5 s for a connection: the open loop counts it
    rec.add(0.2, 0.2, 0.2, 0.21, 422)
    rec.add(0.3, 0.3, 0.3, 0.31, 503)
    rec.add(0.4, 0.4, 0.4, 5.4, "timeout")
    rec.add(0.5, 0.5, 0.5, 0.5, "failed")
    open_ = load_test.summarize(rec, rate=10, mode="open", elapsed=1.0)
    closed = load_test.summarize(rec, rate=10, mode="closed", elapsed=1.0)
    assert (open_["ok"], open_["http_4xx"], open_["http_5xx"], open_["timeouts"], open_["failed"]) == (2, 1, 1, 1, 1)
    assert open_["max_ms"] == pytest.approx(510) and closed["max_ms"] == pytest.approx(10)


def test_seed_flag_picks_the_requests(load_test):
    """The chapter passes the book's seed to load_test.py: the same seed, the same requests; another, others."""
    same = [load_test.build_requests(8000, 64, "json", rows=1, count=4, seed=s) for s in (7, 7, 8)]
    assert same[0] == same[1] and same[0] != same[2]
    assert load_test.parse_args(["--port", "1", "--seed", "3"]).seed == 3


def test_generated_requests_are_valid_for_the_server(app_module, load_test):
    request_model = app_module.make_request_model(64, 1024)
    for payload in ("json", "binary"):
        raw = load_test.build_requests(8000, 64, payload, rows=3, count=2, seed=0)[0]
        head, _, body = raw.partition(b"\r\n\r\n")
        assert f"content-length: {len(body)}".encode() in head
        x = (app_module.parse_json(body, request_model, 64, 1024) if payload == "json"
             else app_module.parse_binary(body, 64, 1024))
        assert x.shape == (3, 64) and x.min() >= 0 and x.max() <= 16


@pytest.mark.parametrize("flags", [["--rates", "0"], ["--rates", "100,-5"], ["--duration", "0"],
                                   ["--connections", "0"]])
def test_load_test_refuses_bad_flags(load_test, capsys, flags):
    with pytest.raises(SystemExit, match="^2$"):  # argparse's usage-error exit status
        load_test.parse_args(["--port", "1", *flags])
    assert "rates, duration and connections must be positive" in capsys.readouterr().err


# --- the real process -----------------------------------------------------------------------------

@pytest.mark.slow
def test_real_server_process_serves_rejects_survives_load_and_stops(server_process, model_path, meta, digits):
    import httpx
    import psutil

    server = server_process.ServerProcess(max_batch=16, max_wait_ms=2, model_path=model_path)
    try:
        server.start(ready_timeout=60)
        url = server.url
        assert url.startswith("http://127.0.0.1:")
        good = httpx.post(f"{url}/predict", json={"instances": digits[:4].tolist()})
        assert good.status_code == 200
        assert good.json()["labels"] == expected_labels(model_path, meta, digits[:4])
        assert good.headers["x-model-version"] == meta["version"]
        bad = [httpx.post(f"{url}/predict", content=b, headers={"content-type": t}) for b, t in
               [("{", "application/json"), ('{"instances": [[1]]}', "application/json"), ("x", "text/plain")]]
        assert [r.status_code for r in bad] == [400, 422, 415]
        result = server_process.run_load_test(server.port, rates=[100], duration=0.5, warmup=0, timeout=60)
        level = result["levels"][0]
        assert level["sent"] == 50 and level["ok"] == 50 and level["http_5xx"] == 0
        assert result["server"]["model_version"] == meta["version"]
        assert httpx.get(f"{url}/stats").json()["responses"].get("5xx", 0) == 0
    finally:
        code = server.stop()
    assert code == -signal.SIGTERM  # uvicorn shut down gracefully, then re-raised the signal
    assert "Finished server process" in server.log_tail(3)
    assert not server_process.port_is_open(server.port)
    assert server.proc.pid not in [p.pid for p in psutil.Process().children(recursive=True)]
