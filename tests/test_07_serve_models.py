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
from pathlib import Path

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
    app = app_module.create_app(app_module.Settings(model_path=str(model_path), max_batch=8, max_wait_ms=1,
                                                    allowed_hosts="testserver", admin_hosts="testclient"))
    with TestClient(app) as c:  # the context runs the lifespan: the batching loop starts and drains
        yield c


def expected_labels(model_path, meta, x):
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(None, {meta["input_name"]: x})[0].argmax(axis=1).tolist()


# --- the request contract, in process -------------------------------------------------------------

def test_settings_come_from_serve_environment_variables(app_module):
    s = app_module.Settings.from_env({"SERVE_MAX_BATCH": "16", "SERVE_MAX_WAIT_MS": "0.5", "OTHER": "x",
                                      "SERVE_MAX_QUEUE_ROWS": "64", "SERVE_DEADLINE_MS": "50", "SERVE_DOCS": "1"})
    assert (s.max_batch, s.max_wait_ms, s.ort_threads, s.max_queue_rows, s.deadline_ms, s.docs) == (16, 0.5, 1, 64, 50.0, 1)
    every = {f"SERVE_{k.upper()}" for k in app_module.Settings().__dict__}
    assert {"SERVE_MAX_ROWS", "SERVE_MAX_BODY_BYTES", "SERVE_ALLOWED_HOSTS", "SERVE_ADMIN_HOSTS", "SERVE_DRAIN_S"} <= every


def test_a_bad_serve_variable_names_itself(app_module):
    with pytest.raises(ValueError, match="SERVE_MAX_BATCH='lots' is not a valid int"):
        app_module.Settings.from_env({"SERVE_MAX_BATCH": "lots"})


def make_client(app_module, model_path, **settings):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*starlette.testclient.*")
        from fastapi.testclient import TestClient
    defaults = dict(model_path=str(model_path), max_batch=8, max_wait_ms=1, allowed_hosts="testserver",
                    admin_hosts="testclient")
    return TestClient(app_module.create_app(app_module.Settings(**{**defaults, **settings})))


def test_docs_schema_and_stats_are_closed_by_default(app_module, model_path):
    with make_client(app_module, model_path, admin_hosts="127.0.0.1") as c:
        assert [c.get(p).status_code for p in ("/docs", "/openapi.json", "/redoc")] == [404, 404, 404]
        r = c.get("/stats")  # the test client's address is not an admin host
        assert r.status_code == 403 and "admin" in r.json()["error"]
        assert c.get("/ready").status_code == 200
    with make_client(app_module, model_path, docs=1) as c:
        assert c.get("/openapi.json").status_code == 200 and c.get("/stats").status_code == 200


def test_a_foreign_host_header_gets_400(client):
    r = client.get("/ready", headers={"host": "evil.example"})
    assert r.status_code == 400 and "evil.example" in r.json()["error"]
    assert client.get("/ready", headers={"host": "testserver:8000"}).status_code == 200


def test_validation_stops_at_the_first_bad_value(app_module):
    """65,536 bad values must cost one error, not 65,536 (before: 130 ms of event loop per request)."""
    from pydantic import ValidationError

    request_model = app_module.make_request_model(64, 1024)
    body = json.dumps({"instances": [["7"] * 64] * 1024}).encode()
    with pytest.raises(ValidationError) as info:
        request_model.model_validate_json(body)
    assert info.value.error_count() == 1
    with pytest.raises(app_module.RequestError) as err:
        app_module.parse_json(body, request_model, 64, 1024)
    assert err.value.status == 422 and err.value.details[0].startswith("row 0, feature 0")


def test_a_model_exception_is_a_clean_counted_500(app_module, model_path, digits):
    with make_client(app_module, model_path) as c:
        def explode(x):
            raise RuntimeError("weights on fire")
        c.app.app.app.state.batcher.predict = explode  # the FastAPI app under the two middlewares
        r = c.post("/predict", json={"instances": [digits[0].tolist()]})
        assert r.status_code == 500 and "RuntimeError: weights on fire" in r.json()["error"], r.text
        stats = c.get("/stats").json()
        assert stats["model_errors"] == 1 and stats["responses"]["5xx"] == 1
        assert c.get("/ready").status_code == 200  # one bad batch does not take the server out


def test_ready_fails_and_predict_answers_503_when_the_batching_loop_died(app_module, model_path, digits):
    with make_client(app_module, model_path) as c:
        batcher = c.app.app.app.state.batcher
        c.portal.call(lambda: batcher.task.cancel() and None)  # the loop dies (as on an unexpected error)
        deadline = __import__("time").monotonic() + 5
        while not batcher.task.done() and __import__("time").monotonic() < deadline:
            __import__("time").sleep(0.01)
        r = c.get("/ready")
        assert r.status_code == 503 and r.json()["batcher_running"] is False
        p = c.post("/predict", json={"instances": [digits[0].tolist()]})  # answered at once, not hung
        assert p.status_code == 503 and "batching loop" in p.json()["error"] and p.headers["retry-after"] == "1"


def test_a_client_hang_up_is_a_disconnect_not_a_5xx(app_module, model_path):
    """An ASGI call whose client disconnects mid-body: before, a ClientDisconnect traceback and a 5xx."""
    import anyio

    with make_client(app_module, model_path) as c:
        asgi = c.app
        sent = []

        async def call():
            messages = [{"type": "http.request", "body": b'{"instances": [[1', "more_body": True},
                        {"type": "http.disconnect"}]

            async def receive():
                return messages.pop(0) if messages else {"type": "http.disconnect"}

            async def send(message):
                sent.append(message)

            scope = {"type": "http", "method": "POST", "path": "/predict", "raw_path": b"/predict",
                     "query_string": b"", "root_path": "", "scheme": "http", "http_version": "1.1",
                     "headers": [(b"host", b"testserver"), (b"content-type", b"application/json")],
                     "client": ("testclient", 1), "server": ("testserver", 80)}
            await asgi(scope, receive, send)

        c.portal.call(call)
        stats = c.get("/stats").json()
        assert stats["disconnects"] == 1 and stats["responses"].get("5xx", 0) == 0, stats


def run_batcher_limits(app_module, *, max_queue_rows=1 << 30, deadline_s=math.inf, slow_s=0.0, sizes=(1,)):
    import time

    def predict(x):
        time.sleep(slow_s)
        return x[:, 0].astype(int)

    async def main():
        batcher = app_module.Batcher(predict, 4, 0.0, app_module.Stats(), max_queue_rows=max_queue_rows,
                                     deadline_s=deadline_s)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(np.zeros((n, 3), np.float32)) for n in sizes),
                                       return_exceptions=True)
        await batcher.drain()
        return results

    return asyncio.run(main())


def test_a_full_queue_answers_503_with_retry_after_at_once(app_module):
    results = run_batcher_limits(app_module, max_queue_rows=8, sizes=[4, 4, 4, 1])
    refused = [r for r in results if isinstance(r, app_module.RequestError)]
    assert len(refused) == 2 and all(r.status == 503 and r.retry_after == 1 for r in refused), results
    assert "rows already queued" in refused[0].message
    assert sum(isinstance(r, np.ndarray) for r in results) == 2  # nothing lost: answered or refused


def test_a_request_past_its_deadline_is_refused_not_run(app_module):
    """Batches of 4 rows, 50 ms per model call, 20 one-row requests, 120 ms deadline: the first
    batches run, the rest expire in the queue and get 503 instead of an answer nobody waits for."""
    results = run_batcher_limits(app_module, deadline_s=0.12, slow_s=0.05, sizes=[1] * 20)
    served = [r for r in results if isinstance(r, np.ndarray)]
    expired = [r for r in results if isinstance(r, app_module.RequestError)]
    assert len(served) + len(expired) == 20 and 4 <= len(served) < 20, (len(served), len(expired))
    assert all(r.status == 503 and "deadline" in r.message for r in expired)


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


def outcome(parse, body):
    try:
        return parse(body).tolist()
    except Exception as exc:  # RequestError: compare what the client would read
        return (exc.status, exc.message, exc.details)


def test_the_orjson_path_accepts_and_refuses_exactly_what_pydantic_does(app_module, digits):
    request_model = app_module.make_request_model(64, 1024)
    strict = lambda b: app_module.parse_json(b, request_model, 64, 1024)  # noqa: E731
    fast = lambda b: app_module.parse_json_fast(b, request_model, 64, 1024)  # noqa: E731
    row = digits[0].tolist()
    bodies = [body for body, kind, *_ in bad_requests(row, 64).values() if kind == "application/json"]
    bodies += [json.dumps({"instances": digits[:7].tolist()}), json.dumps({"instances": [[int(v) for v in row]]}),
               json.dumps({"instances": [row, row[:5]]}), json.dumps({"instances": [row], "instances2": 1}),
               json.dumps({"instances": [[None] * 64]}), json.dumps({"instances": [[1e39] * 64]}),
               json.dumps({"instances": [[2 ** 70] * 64]}), json.dumps({"instances": [[[1]] * 64]})]
    for body in bodies:
        body = body.encode() if isinstance(body, str) else body
        assert outcome(fast, body) == outcome(strict, body), body[:80]
    assert outcome(fast, json.dumps({"instances": digits[:7].tolist()}).encode()) == digits[:7].tolist()


def test_an_orjson_server_gives_the_models_labels_and_a_bad_json_lib_names_itself(app_module, model_path, meta, digits):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*starlette.testclient.*")
        from fastapi.testclient import TestClient
    settings = app_module.Settings(model_path=str(model_path), max_batch=8, max_wait_ms=1, json_lib="orjson",
                                   allowed_hosts="testserver")
    with TestClient(app_module.create_app(settings)) as c:
        r = c.post("/predict", json={"instances": digits[:5].tolist()})
        bad = c.post("/predict", json={"instances": [digits[0].tolist()[:-1] + ["7"]]})
    assert r.status_code == 200 and r.json()["labels"] == expected_labels(model_path, meta, digits[:5]), r.text
    assert r.headers["content-type"] == "application/json" and r.headers["x-model-version"] == meta["version"]
    assert bad.status_code == 422 and "row 0, feature 63" in " ".join(bad.json()["details"]), bad.text
    with pytest.raises(ValueError, match="SERVE_JSON_LIB='simdjson'"):
        app_module.create_app(app_module.Settings(model_path=str(model_path), json_lib="simdjson"))


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


def test_stability_rule_needs_every_window_within_the_tolerance(load_test):
    assert load_test.stable([100, 105, 95], 0.1) and not load_test.stable([100, 100, 125], 0.1)
    assert not load_test.stable([0, 0, 0], 0.1)  # no goodput at all is not a stable measurement
    with pytest.raises(SystemExit):
        load_test.parse_args(["--port", "1", "--max-windows", "2", "--stable-windows", "3"])


def test_windows_repeat_until_stable_and_stop_at_the_cap(load_test, monkeypatch):
    """measure_level runs windows until the last three agree, reports the medians, and never runs more
    than --max-windows; each window draws its own arrivals (its own seed)."""
    def fake(goodputs):
        seeds = []

        async def run_level(port, requests, rate, args):
            seeds.append(args.seed)
            g = goodputs[len(seeds) - 1]
            return {"goodput_rps": g, "achieved_rps": g + 10, "p99_ms": 1000 / g}, None
        return run_level, seeds

    args = load_test.parse_args(["--port", "1", "--max-windows", "6", "--stable-pct", "10", "--seed", "2"])
    run_level, seeds = fake([50, 200, 100, 104, 98, 300])
    monkeypatch.setattr(load_test, "run_level", run_level)
    level, _ = asyncio.run(load_test.measure_level(1, [], 100, args))
    assert level["windows"] == 5 and level["stable"] and level["goodput_rps"] == 100 and level["achieved_rps"] == 110
    assert len(set(seeds)) == 5
    run_level, seeds = fake([50, 200, 100, 300, 40, 250])
    monkeypatch.setattr(load_test, "run_level", run_level)
    level, _ = asyncio.run(load_test.measure_level(1, [], 100, args))
    assert level["windows"] == 6 and not level["stable"] and level["goodput_rps"] == 250
    assert level["window_goodput_rps"] == [50, 200, 100, 300, 40, 250]


# --- metrics and drift ----------------------------------------------------------------------------

def test_metrics_are_for_admins_and_count_what_stats_counts(app_module, model_path, digits):
    from prometheus_client.parser import text_string_to_metric_families

    with make_client(app_module, model_path, admin_hosts="127.0.0.1") as c:
        assert c.get("/metrics").status_code == 403
    with make_client(app_module, model_path) as c:
        for n in (1, 3, 5):
            assert c.post("/predict", json={"instances": digits[:n].tolist()}).status_code == 200
        c.post("/predict", content="x", headers={"content-type": "application/json"})
        r = c.get("/metrics")
        stats = c.get("/stats").json()
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {s.name + str(sorted(s.labels.items())): s.value
               for f in text_string_to_metric_families(r.text) for s in f.samples}
    assert samples["serve_request_seconds_count[]"] == stats["requests"] == 3
    assert samples["serve_batch_rows_sum[]"] == stats["rows"] == 9
    assert samples["serve_responses_total[('code', '4xx')]"] == 1 and samples["serve_queue_rows[]"] == 0
    assert samples["serve_request_seconds_bucket[('le', '+Inf')]"] == 3


def test_interval_quantile_and_timeline_read_histograms_like_prometheus(server_process):
    bucket = lambda le: f'serve_request_seconds_bucket{{le="{le}"}}'  # noqa: E731
    before = {"t": 0.0, bucket("0.001"): 0, bucket("0.01"): 0, bucket("+Inf"): 0, "serve_request_seconds_count": 0}
    after = {"t": 0.5, bucket("0.001"): 50, bucket("0.01"): 90, bucket("+Inf"): 100, "serve_request_seconds_count": 100,
             "serve_batch_rows_sum": 400, "serve_batch_rows_count": 20, "serve_queue_rows": 7}
    q = lambda p: server_process.interval_quantile(before, after, "serve_request_seconds", p)  # noqa: E731
    assert q(0.5) == pytest.approx(0.001) and q(0.7) == pytest.approx(0.0055) and q(0.99) == 0.01
    assert math.isnan(server_process.interval_quantile(before, before, "serve_request_seconds", 0.5))
    (row,) = server_process.metrics_timeline([before, after])
    assert row["answers_per_s"] == 200 and row["mean_batch_rows"] == 20 and row["queue_rows"] == 7
    assert row["p99_ms"] == pytest.approx(10)


@pytest.fixture(scope="module")
def drift():
    return load_module(CHAPTER / "drift.py", "gr_07_serve_models_drift")


def test_psi_is_zero_for_the_same_rows_and_large_for_a_shift(drift, digits):
    psi = drift.psi_per_feature(digits, digits)
    assert psi.shape == (64,) and np.allclose(psi, 0) and drift.drift_alerts(psi) == []
    shifted = drift.psi_per_feature(digits, drift.shift_right(digits))
    assert len(drift.drift_alerts(shifted)) >= 10 and np.isfinite(shifted).all()
    constant = np.zeros((50, 2))  # a feature never seen nonzero, then seen: finite and alerting
    assert drift.drift_alerts(drift.psi_per_feature(constant, constant + [0, 16])) == [1]
    with pytest.raises(ValueError, match="same columns"):
        drift.psi_per_feature(digits, digits[:, :10])


def test_shift_right_moves_every_pixel_one_column(drift):
    image = np.arange(64).reshape(1, 64)
    moved = drift.shift_right(image).reshape(8, 8)
    assert (moved[:, 0] == 0).all() and (moved[:, 1:] == image.reshape(8, 8)[:, :7]).all()


@pytest.fixture(scope="module")
def canary():
    return load_module(CHAPTER / "canary.py", "gr_07_serve_models_canary")


def shadowed(n, agree=True, live_ms=2.0, candidate_ms=2.0, candidate_status=200):
    return [{"live_status": 200, "live_labels": [1, 2], "live_ms": live_ms,
             "candidate_status": candidate_status, "candidate_ms": candidate_ms,
             "candidate_labels": ([1, 2] if agree else [3, 2]) if candidate_status == 200 else None}
            for _ in range(n)]


def test_the_rule_promotes_only_a_candidate_that_passes_every_part(canary):
    assert canary.decide(shadowed(100))["decision"] == "promote"
    cases = {"requests compared": shadowed(99), "labels agree": shadowed(100, agree=False),
             "p99": shadowed(100, candidate_ms=2.6), "were not 200": shadowed(100, candidate_status=503)}
    for reason, records in cases.items():
        verdict = canary.decide(records)
        assert verdict["decision"] == "roll back" and any(reason in r for r in verdict["reasons"]), (reason, verdict)
    assert canary.decide(shadowed(100, agree=False))["agreement"] == 0.5


def test_a_candidate_is_a_new_version_that_rescales_its_input(canary, model_path, meta, digits, tmp_path):
    import onnxruntime as ort

    same = canary.make_candidate(model_path, tmp_path / "same", input_scale=1.0)
    skewed = canary.make_candidate(model_path, tmp_path / "skewed", input_scale=1 / 16)
    metas = [json.loads((p.parent / "model.json").read_text()) for p in (same, skewed)]
    assert len({meta["version"], *(m["version"] for m in metas)}) == 3 and not list(tmp_path.rglob("*.partial"))
    assert expected_labels(same, meta, digits[:200]) == expected_labels(model_path, meta, digits[:200])
    labels = ort.InferenceSession(str(skewed)).run(None, {meta["input_name"]: digits[:200]})[0].argmax(axis=1)
    assert labels.tolist() == expected_labels(model_path, meta, digits[:200] / 16)  # the old graph sees x / 16
    assert labels.tolist() != expected_labels(model_path, meta, digits[:200])


# --- the real process -----------------------------------------------------------------------------

@pytest.mark.slow
def test_shadowing_a_skewed_candidate_over_http_rolls_it_back(server_process, canary, model_path, digits, tmp_path):
    skewed = canary.make_candidate(model_path, tmp_path / "skewed", input_scale=1 / 16)
    bodies = [digits[i : i + 4].astype("<f4").tobytes() for i in range(0, 80, 4)]
    with server_process.ServerProcess(model_path=model_path) as live, \
            server_process.ServerProcess(model_path=skewed) as candidate:
        records = canary.shadow(live.url, candidate.url, bodies)
    assert [r["live_status"] for r in records] == [200] * 20 == [r["candidate_status"] for r in records]
    verdict = canary.decide(records, min_requests=20)
    assert verdict["decision"] == "roll back" and verdict["rows"] == 80 and verdict["agreement"] < 0.9, verdict

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
        with server_process.MetricsScraper(url, every_s=0.1) as scraper:  # /metrics over real HTTP
            result = server_process.run_load_test(server.port, rates=[100], duration=0.5, warmup=0, timeout=60)
        level = result["levels"][0]
        assert level["sent"] == 50 and level["ok"] == 50 and level["http_5xx"] == 0
        assert result["server"]["model_version"] == meta["version"]
        stats = httpx.get(f"{url}/stats").json()
        assert stats["responses"].get("5xx", 0) == 0
        assert len(scraper.samples) >= 3 and scraper.samples[-1]["serve_request_seconds_count"] == stats["requests"]
        samples = scraper.samples
        answered = sum(r["answers_per_s"] * (b["t"] - a["t"])
                       for r, a, b in zip(server_process.metrics_timeline(samples), samples, samples[1:]))
        counted = samples[-1]["serve_request_seconds_count"] - samples[0]["serve_request_seconds_count"]
        assert counted >= 50 and answered == pytest.approx(counted)  # the load's 50, and nothing lost between scrapes
    finally:
        code = server.stop()
    assert code == -signal.SIGTERM  # uvicorn shut down gracefully, then re-raised the signal
    assert "Finished server process" in server.log_tail(3)
    assert not server_process.port_is_open(server.port)
    assert server.proc.pid not in [p.pid for p in psutil.Process().children(recursive=True)]


@pytest.fixture()
def hardened(server_process, model_path):
    """A real server with short timeouts, a small connection limit, a small body limit and env settings."""
    env = {"SERVE_IDLE_TIMEOUT_S": "1", "SERVE_READ_TIMEOUT_S": "1", "SERVE_MAX_CONNECTIONS": "40",
           "SERVE_MAX_BODY_BYTES": "100000", "SERVE_MAX_ROWS": "4"}
    server = server_process.ServerProcess(max_batch=8, max_wait_ms=1, model_path=model_path, extra_env=env)
    server.start(ready_timeout=60)
    yield server
    server.stop()


@pytest.mark.slow
def test_idle_and_stalled_connections_are_reclaimed_and_honest_clients_served(server_process, hardened, digits):
    import httpx

    idle = server_process.open_hostile(hardened.port, 30, "idle")
    stalled = server_process.open_hostile(hardened.port, 30, "stalled")  # 60 > the limit of 40
    answers = [httpx.post(f"{hardened.url}/predict", json={"instances": [digits[0].tolist()]}, timeout=5)
               for _ in range(10)]
    assert [r.status_code for r in answers] == [200] * 10
    seen_idle, seen_stalled = (server_process.closed_by_server(idle, 2.5), server_process.closed_by_server(stalled))
    assert seen_idle["closed"] == 30 and seen_stalled["closed"] == 30, (seen_idle, seen_stalled)
    stats = httpx.get(f"{hardened.url}/stats").json()
    closed = stats["closed_connections"]
    assert closed.get("evicted", 0) >= 20 and closed.get("idle", 0) + closed.get("slow", 0) >= 1, closed
    assert stats["responses"].get("5xx", 0) == 0, stats
    for s in idle + stalled:
        s.close()


@pytest.mark.slow
def test_serve_settings_reach_the_process_and_a_chunked_body_is_capped(server_process, hardened, digits):
    import httpx

    five = httpx.post(f"{hardened.url}/predict", json={"instances": digits[:5].tolist()})
    assert five.status_code == 422 and "limit of 4 rows" in " ".join(five.json()["details"]), five.text
    assert httpx.post(f"{hardened.url}/predict", json={"instances": digits[:4].tolist()}).status_code == 200
    status, body = server_process.chunked_body(hardened.port, 300_000)  # no Content-Length header at all
    assert status == 413, body
    assert httpx.get(f"{hardened.url}/ready").json()["max_batch"] == 8


@pytest.mark.slow
def test_a_client_flooding_bad_bodies_is_slowed_by_the_reject_penalty_and_still_answered(server_process, model_path):
    """One connection sending rejected bodies back to back: with the penalty (the default, 4x the
    request's time) it gets about a fifth of the answers per second it gets without, each one a 422."""
    import json

    strings = json.dumps({"instances": [["7"] * 64] * 1024}).encode()
    rates = {}
    for penalty in ("0", "4"):
        server = server_process.ServerProcess(model_path=model_path, extra_env={"SERVE_REJECT_PENALTY": penalty})
        server.start(ready_timeout=60)
        try:
            counts = server_process.flood(server.port, strings, seconds=1.5).result()
        finally:
            server.stop()
        assert set(counts) == {422}, (penalty, counts)  # every bad body answered, with the reason
        rates[penalty] = counts[422] / 1.5
    assert rates["4"] < 0.5 * rates["0"], f"answers/s with the penalty and without: {rates}; needs < 0.5x"


@pytest.mark.slow
def test_hang_ups_are_disconnects_with_no_traceback(server_process, hardened):
    import httpx

    server_process.hang_ups(hardened.port, 10)
    import time

    time.sleep(1.5)  # the read timeout has reclaimed any half-open request
    stats = httpx.get(f"{hardened.url}/stats").json()
    assert stats["responses"].get("5xx", 0) == 0 and stats["disconnects"] == 10, stats
    assert "Traceback" not in hardened.log_path.read_text(), hardened.log_tail()


@pytest.mark.slow
def test_sigterm_fails_readiness_first_and_answers_every_request_sent(server_process, model_path, digits):
    server = server_process.ServerProcess(max_batch=8, max_wait_ms=1, model_path=model_path,
                                          extra_env={"SERVE_DRAIN_S": "1"}, graceful_s=2)
    server.start(ready_timeout=60)
    try:
        slow = server_process.open_hostile(server.port, 1, "stalled")  # a slow client may not hold the exit up
        result = server_process.keepalive_across_sigterm(server, digits[:1].astype("<f4").tobytes())
    finally:
        server.stop()
    assert result["ready_failed_after_s"] is not None and result["ready_failed_after_s"] < 0.5, result
    assert set(result["outcomes"]) == {200} and result["outcomes"][200] > result["answered_before_sigterm"], result
    assert result["exit_code"] == -signal.SIGTERM and result["sigterm_to_exit_s"] < 1 + 2 + 2, result
    slow[0].close()


@pytest.mark.slow
def test_the_guard_holds_on_httptools_and_uvloop_and_the_profile_is_written(server_process, model_path, digits, tmp_path):
    """The faster stack of the chapter's table keeps every defence of the h11 one: idle and stalled
    sockets reclaimed, a chunked body capped with 413, hang-ups counted as disconnects, no 5xx; and
    SERVE_PROFILE leaves a cProfile file of the event-loop thread at shutdown."""
    import pstats

    import httpx

    env = {"SERVE_IDLE_TIMEOUT_S": "1", "SERVE_READ_TIMEOUT_S": "1", "SERVE_MAX_CONNECTIONS": "40",
           "SERVE_MAX_BODY_BYTES": "100000", "SERVE_JSON_LIB": "orjson", "SERVE_PROFILE": str(tmp_path / "loop.prof")}
    server = server_process.ServerProcess(max_batch=8, max_wait_ms=1, model_path=model_path, http="httptools",
                                          loop="uvloop", extra_env=env, graceful_s=2)
    server.start(ready_timeout=60)
    try:
        idle = server_process.open_hostile(server.port, 30, "idle")
        stalled = server_process.open_hostile(server.port, 30, "stalled")  # 60 > the limit of 40
        answers = [httpx.post(f"{server.url}/predict", json={"instances": [digits[0].tolist()]}, timeout=5)
                   for _ in range(10)]
        assert [r.status_code for r in answers] == [200] * 10
        seen = server_process.closed_by_server(idle, 2.5), server_process.closed_by_server(stalled)
        assert [s["closed"] for s in seen] == [30, 30], seen
        status, body = server_process.chunked_body(server.port, 300_000)
        assert status == 413, body
        server_process.hang_ups(server.port, 5)
        import time

        time.sleep(1.5)
        stats = httpx.get(f"{server.url}/stats").json()
        assert stats["responses"].get("5xx", 0) == 0 and stats["disconnects"] >= 5, stats
        assert stats["closed_connections"].get("evicted", 0) >= 20, stats
        for s in idle + stalled:
            s.close()
    finally:
        code = server.stop()
    assert code == -signal.SIGTERM and "Traceback" not in server.log_path.read_text(), server.log_tail()
    functions = {f[2] for f in pstats.Stats(str(tmp_path / "loop.prof")).stats}
    assert {"predict", "parse_json_fast", "data_received"} <= functions, sorted(functions)[:20]


# --- Ray Serve beside the hand-built server (ray_serve_app.py) -----------------------------------------

@pytest.fixture(scope="module")
def ray_serve_app():
    return load_module(CHAPTER / "ray_serve_app.py", "gr_07_serve_models_ray_serve_app")


def test_ray_serve_config_passes_rays_own_schema_and_a_local_folder_does_not(ray_serve_app, model_path):
    """The cluster config the chapter writes is the one `serve deploy` accepts; the schema is not a
    rubber stamp (a plain local working_dir, which deploy cannot ship, is refused)."""
    from pydantic import ValidationError

    config = ray_serve_app.serve_config(str(model_path), replicas=4)
    checked = ray_serve_app.check_config(config)
    app_config = checked["applications"][0]
    assert app_config["import_path"] == "ray_serve_app:app_builder" and app_config["args"]["replicas"] == 4
    assert app_config["deployments"][0]["max_ongoing_requests"] >= ray_serve_app.MAX_BATCH_ROWS  # batches can fill
    broken = {**config, "applications": [{**config["applications"][0], "runtime_env": {"working_dir": "."}}]}
    with pytest.raises(ValidationError):
        ray_serve_app.check_config(broken)


def test_ray_start_finds_the_ray_command_in_a_venv_and_where_pip_put_it(ray_serve_app, monkeypatch, tmp_path):
    """In a virtual environment `ray` sits beside Python (its bin/ need not be on PATH); in Colab
    Python is /usr/bin/python3 and pip puts `ray` in /usr/local/bin, on PATH. Both are found, and a
    missing `ray` is named, not a FileNotFoundError from deep inside subprocess."""
    import sys

    venv_ray = Path(sys.executable).parent / "ray"
    assert ray_serve_app.ray_start_command(6379, str(tmp_path))[0] == str(venv_ray)
    system_bin, scripts = tmp_path / "usr-bin", tmp_path / "usr-local-bin"
    system_bin.mkdir(), scripts.mkdir()
    (scripts / "ray").write_text("#!/bin/sh\n"), (scripts / "ray").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(system_bin / "python3"))
    monkeypatch.setenv("PATH", str(scripts))
    command = ray_serve_app.ray_start_command(6379, str(tmp_path))
    assert command[0] == str(scripts / "ray") and command[1:3] == ["start", "--head"], command
    monkeypatch.setenv("PATH", str(system_bin))
    with pytest.raises(RuntimeError, match="no `ray` command"):
        ray_serve_app.ray_start_command(6379, str(tmp_path))


@pytest.mark.slow
def test_ray_serve_answers_like_the_hand_built_server_and_leaves_no_process(ray_serve_app, model_path, meta, digits):
    """Started as the chapter starts it: the same labels as ONNX Runtime in process (one request is one
    model call, so exactly), a request larger than a batch answered too, the same 4xx messages as
    app.py, and after stop() no process of that Ray node left and its session folder gone."""
    import os

    import httpx
    import onnxruntime as ort
    import psutil

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    expected = lambda x: session.run(None, {meta["input_name"]: x})[0].argmax(axis=1).tolist()  # noqa: E731
    engine = ray_serve_app.RayServeProcess(model_path, replicas=1)
    try:
        ready = engine.start()
        assert ready["replicas"] == 1 and httpx.get(f"{engine.url}/ready").json()["engine"] == "ray serve"
        post = lambda body, kind: httpx.post(f"{engine.url}/predict", content=body, headers={"content-type": kind}, timeout=30)  # noqa: E731
        for rows in (digits[:3], digits[:32], digits[:100]):  # 100 rows: more than one batch holds
            reply = post(rows.astype("<f4").tobytes(), "application/octet-stream")
            assert reply.status_code == 200 and reply.json()["labels"] == expected(rows), reply.text
        assert reply.json()["model_version"] == meta["version"]
        short = post(json.dumps({"instances": [digits[0].tolist()[:60]]}), "application/json")
        assert short.status_code == 422 and short.json()["details"] == ["row 0 has 60 features; the model takes 64"], short.text
        assert post("not json", "application/json").status_code == 400
        assert post("instances=1", "application/x-www-form-urlencoded").status_code == 415
        assert post((digits[:1] * 16).astype("<f4").tobytes(), "application/octet-stream").status_code == 422  # range
        pids = {p.pid for p in engine.processes()}
        assert len(pids) >= 5, pids  # gcs_server, raylet, controller, proxy, replica at least
    finally:
        stopped = engine.stop()
    assert stopped["left_alive"] == [], stopped
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
    assert not os.path.exists(engine.temp_dir), engine.temp_dir
