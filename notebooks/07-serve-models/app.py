"""Online prediction server for the digits model: FastAPI + uvicorn + ONNX Runtime, dynamic batching.

Why a file and not a cell: a server is its own process. It owns a port, a thread pool and a model
session, it is stopped with a signal, and the chapter, the load generator and the tests all talk to it
over real HTTP. A server started inside the notebook's kernel would share the kernel's event loop and
its CPU accounting, and would measure nothing a client sees.

Launch from this folder (settings come from SERVE_* environment variables; flags of ``python app.py``
set the same variables)::

    SERVE_MAX_BATCH=32 SERVE_MAX_WAIT_MS=2 python -m uvicorn app:create_app --factory \
        --host 127.0.0.1 --port 8000 --workers 1 --http guard:H11 --timeout-graceful-shutdown 5 --no-access-log
    python app.py --port 8000 --max-batch 32 --max-wait-ms 2      # the same, through uvicorn.run
    python app.py --port 8000 --max-batch 1 --max-wait-ms 0       # no batching: one model call per request

Then ``curl -s 127.0.0.1:8000/ready`` and
``curl -s -H 'content-type: application/json' -d '{"instances": [[0, ...64 numbers...]]}' 127.0.0.1:8000/predict``.
There is no GPU path: the model is a small MLP and ONNX Runtime runs it on the CPU provider.
"""

import argparse
import asyncio
import collections
import gc
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).parent
EXPORT_MODEL = HERE.parent / "06-compile-and-optimize" / "export_model.py"
JSON_TYPES = ("application/json",)
BINARY_TYPES = ("application/octet-stream",)


@dataclass(frozen=True)
class Settings:
    """Everything that changes the server's behaviour, read from SERVE_* environment variables."""

    model_path: str = ""  # empty: ask chapter 06's ensure_serving_model() for it
    max_batch: int = 32  # rows per model call; 1 turns batching off
    max_wait_ms: float = 2.0  # longest a request waits for others to share its model call
    ort_threads: int = 1  # ONNX Runtime intra-op threads (inter-op is always 1)
    max_rows: int = 1024  # rows one request may carry
    max_body_bytes: int = 1 << 20  # 1 MiB: bigger bodies get 413 before they are read
    gc_freeze: int = 1  # 1: move startup objects out of the garbage collector's reach (gc.freeze)
    max_queue_rows: int = 2048  # rows waiting for the model; past this a request gets 503 + Retry-After
    deadline_ms: float = 1000.0  # a request still queued this long after it arrived gets 503, unrun
    max_inflight: int = 64  # requests past their upload and not yet answered; more get 503 + Retry-After
    drain_s: float = 1.0  # after SIGTERM: /ready fails and answers close their connection, then stop
    docs: int = 0  # 1: serve /docs and /openapi.json (off: the schema is a map for attackers)
    admin_hosts: str = "127.0.0.1,::1"  # client addresses allowed to read /stats and /metrics
    allowed_hosts: str = "127.0.0.1,localhost"  # Host headers accepted; anything else gets 400
    reject_penalty: float = 4.0  # a 400/422 waits this many times the parse time it cost (asyncio.sleep, at most 1 s)
    json_lib: str = "pydantic"  # "orjson": orjson parses clean bodies and encodes answers (see parse_json_fast)
    profile: str = ""  # a path: cProfile the event-loop thread, written there at shutdown

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        """Fields from SERVE_<NAME> variables, converted to the field's type; a bad value names itself."""
        env = os.environ if env is None else env
        given = {}
        for name, default in cls().__dict__.items():
            key = f"SERVE_{name.upper()}"
            if key in env:
                try:
                    given[name] = type(default)(env[key])
                except ValueError:
                    raise ValueError(f"{key}={env[key]!r} is not a valid {type(default).__name__}") from None
        return cls(**given)


def load_export_module():
    """Chapter 06's export_model.py, imported by path (it is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gr_06_export_model", EXPORT_MODEL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Model:
    """An ONNX Runtime session with explicit threads, and the metadata that travels with it."""

    session: object
    meta: dict
    input_name: str
    output_name: str
    n_features: int

    @classmethod
    def load(cls, path: str | Path, threads: int = 1) -> "Model":
        import onnxruntime as ort

        path = Path(path)
        meta = json.loads((path.parent / "model.json").read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return cls(session, meta, meta["input_name"], meta["output_name"], int(meta["n_features"]))

    def check_range(self, x) -> None:
        """Refuse values outside the range the model was trained on (model.json's input_range), the
        usual symptom of a client that scales features differently from training."""
        if "input_range" not in self.meta:
            return
        import numpy as np

        lo, hi = self.meta["input_range"]
        rows, cols = np.nonzero((x < lo) | (x > hi))
        if rows.size:
            where = ", ".join(f"row {r} feature {c} = {x[r, c]:g}" for r, c in zip(rows[:3], cols[:3]))
            raise RequestError(422, f"{rows.size} values outside the model's input range [{lo:g}, {hi:g}]",
                               [where])

    def predict(self, x):
        """Class labels for a float32 array of shape (rows, n_features)."""
        logits = self.session.run([self.output_name], {self.input_name: x})[0]
        return logits.argmax(axis=1)


@dataclass
class Stats:
    requests: int = 0
    rows: int = 0
    batches: int = 0
    status: collections.Counter = field(default_factory=collections.Counter)
    model_errors: int = 0  # model calls that raised (answered 500)
    shed: int = 0  # requests answered 503: queue full, deadline passed or batcher down
    disconnects: int = 0  # clients that hung up before their answer (not a server error)
    gc_pauses: int = 0
    gc_pause_s: float = 0.0
    gc_max_pause_s: float = 0.0
    _gc_started: float = 0.0

    def on_gc(self, phase: str, info: dict) -> None:
        """gc.callbacks hook: every garbage-collection pause stalls the event loop, so count them."""
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            pause = time.perf_counter() - self._gc_started
            self.gc_pauses += 1
            self.gc_pause_s += pause
            self.gc_max_pause_s = max(self.gc_max_pause_s, pause)

    def as_dict(self) -> dict:
        by_class = {f"{k}xx": v for k, v in sorted(self.status.items())}
        return {"requests": self.requests, "rows": self.rows, "batches": self.batches,
                "mean_batch_rows": self.rows / self.batches if self.batches else 0.0, "responses": by_class,
                "model_errors": self.model_errors, "shed": self.shed, "disconnects": self.disconnects,
                "gc_pauses": self.gc_pauses, "gc_pause_s": self.gc_pause_s, "gc_max_pause_ms": 1e3 * self.gc_max_pause_s}


class Batcher:
    """Queue requests and run them as one model call: up to ``max_batch`` rows, waiting at most
    ``max_wait_s`` after the oldest queued request arrived. The model runs on one worker thread so
    the event loop keeps reading requests while it computes; ``max_batch=1`` is plain per-request
    inference through the same path, which makes it the fair baseline."""

    def __init__(self, predict, max_batch: int, max_wait_s: float, stats: Stats, *,
                 max_queue_rows: int = 1 << 30, deadline_s: float = math.inf):
        from concurrent.futures import ThreadPoolExecutor

        self.predict, self.max_batch, self.max_wait_s, self.stats = predict, max_batch, max_wait_s, stats
        self.max_queue_rows, self.deadline_s = max_queue_rows, deadline_s
        self.pending: collections.deque = collections.deque()  # (rows, future, arrival time)
        self.pending_rows = 0
        self.has_work, self.full = asyncio.Event(), asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.task: asyncio.Task | None = None
        self.computing = False  # a batch is on the model thread
        self.flushing = False  # shutting down: run what is queued without waiting for company
        self.on_batch = None  # called with the rows of every model call (the metrics' batch histogram)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run(), name="batcher")

    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    async def submit(self, x, arrival: float | None = None):
        """Queue ``x`` and wait for its labels. Refused with 503 at once when the loop is not running
        or the queue already holds ``max_queue_rows`` rows; 503 later when ``deadline_s`` passes
        (counted from ``arrival``) before the model gets to it."""
        if not self.running():
            raise RequestError(503, "the batching loop is not running; try another replica", retry_after=1)
        if self.pending_rows + len(x) > self.max_queue_rows:
            raise RequestError(503, f"overloaded: {self.pending_rows} rows already queued "
                                    f"(limit {self.max_queue_rows})", retry_after=1)
        future = asyncio.get_running_loop().create_future()
        self.pending.append((x, future, time.monotonic() if arrival is None else arrival))
        self.pending_rows += len(x)
        self.has_work.set()
        if self.pending_rows >= self.max_batch:
            self.full.set()
        return await future

    def take(self) -> list:
        """Pop queued requests, oldest first, until the next one would overflow the batch."""
        items, rows = [], 0
        while self.pending and (not items or rows + len(self.pending[0][0]) <= self.max_batch):
            item = self.pending.popleft()
            items.append(item)
            rows += len(item[0])
        self.pending_rows -= rows
        if not self.pending:
            self.has_work.clear()
        if self.pending_rows < self.max_batch:
            self.full.clear()
        return items

    async def run(self) -> None:
        import numpy as np

        loop = asyncio.get_running_loop()
        while True:
            await self.has_work.wait()
            oldest_arrival = self.pending[0][2]
            remaining = oldest_arrival + self.max_wait_s - time.monotonic()
            if self.pending_rows < self.max_batch and remaining > 0 and not self.flushing:
                try:  # waiting on an Event can time out safely: nothing leaves the queue
                    await asyncio.wait_for(self.full.wait(), remaining)
                except TimeoutError:
                    pass
            items, now = self.take(), time.monotonic()
            expired = [item for item in items if now - item[2] > self.deadline_s]
            for _, future, arrived in expired:  # nobody waits this long: answer now, skip the model
                if not future.done():
                    future.set_exception(RequestError(
                        503, f"deadline of {1e3 * self.deadline_s:.0f} ms passed after "
                             f"{1e3 * (now - arrived):.0f} ms in the queue", retry_after=1))
            items = [item for item in items if now - item[2] <= self.deadline_s]
            if not items:
                continue
            x = np.concatenate([rows for rows, _, _ in items])
            self.computing = True
            try:  # on the model thread: the event loop keeps reading requests meanwhile
                labels = await loop.run_in_executor(self.executor, self.predict, x)
            except Exception as exc:  # the model failed: every waiting request gets it
                for _, future, _ in items:
                    if not future.done():
                        future.set_exception(exc)
                continue
            finally:
                self.computing = False
            self.stats.batches += 1
            if self.on_batch is not None:
                self.on_batch(len(x))
            start = 0
            for rows, future, _ in items:  # each request gets back exactly its own rows
                if not future.done():  # a client that hung up leaves a cancelled future
                    future.set_result(labels[start : start + len(rows)])
                start += len(rows)

    async def drain(self, timeout: float = 5.0) -> None:
        """Answer every queued request at once (no more waiting for company), then stop the loop and
        the model thread."""
        self.flushing = True
        self.full.set()  # wake a loop that is waiting for company
        deadline = time.monotonic() + timeout
        while (self.pending or self.computing) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.executor.shutdown(wait=True)


class RequestError(Exception):
    """A client mistake: an HTTP status and a message that says what was wrong."""

    def __init__(self, status: int, message: str, details: list[str] | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.details, self.retry_after = status, message, details or [], retry_after


def make_request_model(n_features: int, max_rows: int):
    """The JSON body, strictly typed: {"instances": [[n_features numbers], ...]}."""
    from typing import Annotated

    from pydantic import BaseModel, ConfigDict, Field

    # strict: no "1.5" strings or true/false; allow_inf_nan=False: no NaN, no Infinity. fail_fast:
    # stop at the first bad value, so 65,536 bad values cost one error, not 65,536 (130 ms of loop)
    Feature = Annotated[float, Field(strict=True, allow_inf_nan=False)]
    Row = Annotated[list[Feature], Field(min_length=n_features, max_length=n_features, fail_fast=True)]

    class PredictRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")  # an unknown field is a client bug
        instances: list[Row] = Field(min_length=1, max_length=max_rows, fail_fast=True)

    return PredictRequest


def describe_errors(errors: list[dict], n_features: int, max_rows: int) -> list[str]:
    """Pydantic's errors in the client's terms: which row, which feature, what was expected."""
    out = []
    for e in errors[:5]:
        loc, ctx = e.get("loc", ()), e.get("ctx", {})
        where = "body" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
        if loc == ("instances",) and e["type"] == "too_long":
            out.append(f"batch of {ctx['actual_length']} rows exceeds the limit of {max_rows} rows per request")
        elif len(loc) == 2 and loc[0] == "instances" and e["type"] in ("too_short", "too_long"):
            out.append(f"row {loc[1]} has {ctx['actual_length']} features; the model takes {n_features}")
        elif len(loc) == 3 and loc[0] == "instances":
            out.append(f"row {loc[1]}, feature {loc[2]}: {e['msg']} (got {e.get('input')!r:.40})")
        else:
            out.append(f"{where}: {e['msg']}")
    if len(errors) > 5:
        out.append(f"... and {len(errors) - 5} more")
    return out


def parse_json(body: bytes, request_model, n_features: int, max_rows: int):
    import numpy as np
    from pydantic import ValidationError

    try:
        parsed = request_model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if errors and errors[0]["type"] == "json_invalid":
            raise RequestError(400, "body is not valid JSON", [errors[0]["msg"]]) from None
        raise RequestError(422, "request does not match the schema", describe_errors(errors, n_features, max_rows)) from None
    with np.errstate(over="ignore"):  # 1e39 is a finite JSON number and inf in float32: check_range refuses it
        return np.asarray(parsed.instances, dtype=np.float32)


def parse_json_fast(body: bytes, request_model, n_features: int, max_rows: int):
    """The same contract as ``parse_json``, faster for the bodies that meet it: orjson parses, NumPy
    checks types and shape in one conversion, and anything that is not a clean, finite table of plain
    numbers (a string, ``true``, ``null``, NaN, an unknown field, a ragged row, invalid JSON) goes to the
    strict pydantic path, so every error message is exactly the one ``parse_json`` gives."""
    import numpy as np
    import orjson

    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    rows = doc.get("instances") if type(doc) is dict and len(doc) == 1 else None
    if type(rows) is list and 1 <= len(rows) <= max_rows and b"true" not in body and b"false" not in body:
        try:
            x = np.array(rows)  # ints and floats only give a numeric dtype; strings, None, dicts do not
        except ValueError:  # ragged rows
            x = None
        if x is not None and x.dtype.kind in "iuf" and x.shape == (len(rows), n_features):
            with np.errstate(over="ignore"):  # past float32's range: the strict path decides, below
                x = x.astype(np.float32)
            if np.isfinite(x).all():
                return x
    return parse_json(body, request_model, n_features, max_rows)


def parse_binary(body: bytes, n_features: int, max_rows: int):
    """Raw little-endian float32, row after row: 4 * n_features bytes per row, no header."""
    import numpy as np

    row_bytes = 4 * n_features
    if not body or len(body) % row_bytes:
        raise RequestError(422, f"binary body must be a non-empty multiple of {row_bytes} bytes "
                                f"({n_features} float32 per row), got {len(body)} bytes")
    x = np.frombuffer(body, dtype="<f4").reshape(-1, n_features)
    if len(x) > max_rows:
        raise RequestError(422, f"batch of {len(x)} rows exceeds the limit of {max_rows} rows per request")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise RequestError(422, f"rows {bad[:5].tolist()} contain NaN or infinity")
    return x


async def read_body(request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"body of {declared} bytes exceeds the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"body exceeds the limit of {limit} bytes")
    return bytes(body)


class ModelVersionHeader:
    """Plain ASGI middleware: stamps ``x-model-version`` on every response, counts status classes, and
    while the server drains adds ``connection: close`` so keep-alive clients reconnect elsewhere.
    (BaseHTTPMiddleware would do the same at several times the cost per request.) Status 499, the
    nginx convention for "client closed the request", is counted as a disconnect, not a response."""

    def __init__(self, app, version: str, stats: Stats, state: dict):
        self.app, self.version, self.stats, self.state = app, version.encode(), stats, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_stamped(message):
            if message["type"] == "http.response.start":
                extra = [(b"x-model-version", self.version)]
                if self.state["draining"]:
                    extra.append((b"connection", b"close"))
                message["headers"] = [*message.get("headers", []), *extra]
                if message["status"] == 499:
                    self.stats.disconnects += 1
                else:
                    self.stats.status[message["status"] // 100] += 1
            await send(message)

        await self.app(scope, receive, send_stamped)


class TrustedHosts:
    """Plain ASGI middleware: a request whose ``Host`` header is not one of ``hosts`` gets 400 with a
    message (DNS rebinding, and cache or log poisoning through a forged Host, start here)."""

    def __init__(self, app, hosts: list[str]):
        self.app, self.hosts = app, {h.lower() for h in hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and "*" not in self.hosts:
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
            name = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0] if host.count(":") == 1 else host
            if name.lower() not in self.hosts:
                body = json.dumps({"error": f"host {host[:60]!r} is not served here", "details": []}).encode()
                await send({"type": "http.response.start", "status": 400,
                            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                return await send({"type": "http.response.body", "body": body})
        return await self.app(scope, receive, send)


def drain_on_sigterm(state: dict, drain_s: float) -> None:
    """Make SIGTERM fail readiness first: for ``drain_s`` seconds the server keeps listening and
    answering (every answer closes its connection), so a load balancer that polls /ready stops sending
    before the listener closes; then uvicorn's own handler runs its graceful shutdown. A second
    SIGTERM goes straight to uvicorn. Only possible where uvicorn owns the signal (its main thread)."""
    import signal
    import threading

    previous = signal.getsignal(signal.SIGTERM)
    if drain_s <= 0 or not callable(previous) or threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()

    def on_sigterm(sig, frame):
        if state["draining"]:
            return previous(sig, frame)
        state["draining"] = True
        loop.call_soon_threadsafe(loop.call_later, drain_s, previous, sig, None)

    signal.signal(signal.SIGTERM, on_sigterm)


#: Upper bucket bounds: latency in seconds, batch size in rows
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def make_metrics(stats: Stats, state: dict, queued_rows):
    """Prometheus metrics in a registry of this app's own (several apps in one test process must not
    share series): two histograms fed per request and per batch, and the counters and gauges read
    from ``stats`` and ``state`` when scraped, which costs the request path nothing."""
    from prometheus_client import CollectorRegistry, Histogram
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    registry = CollectorRegistry()
    latency = Histogram("serve_request_seconds", "Time from a request's body being in to its 200 answer",
                        buckets=LATENCY_BUCKETS, registry=registry)
    batch = Histogram("serve_batch_rows", "Rows per model call", buckets=BATCH_BUCKETS, registry=registry)

    class FromStats:
        def collect(self):
            responses = CounterMetricFamily("serve_responses", "Answers by status class", labels=["code"])
            for code, n in sorted(stats.status.items()):
                responses.add_metric([f"{code}xx"], n)
            yield responses
            yield CounterMetricFamily("serve_rejected", "Requests answered 503 (queue full, deadline, in-flight limit)",
                                      value=stats.shed)
            yield CounterMetricFamily("serve_disconnects", "Clients that hung up before their answer",
                                      value=stats.disconnects)
            yield GaugeMetricFamily("serve_queue_rows", "Rows waiting for the model", value=queued_rows())
            yield GaugeMetricFamily("serve_inflight_requests", "Requests past their upload, not yet answered",
                                    value=state["inflight"])

    registry.register(FromStats())
    return registry, latency, batch


def connection_guard_counts() -> dict:
    """Connections guard.py closed, by reason; empty when the server runs without it."""
    import sys

    module = sys.modules.get("guard")
    return dict(module.GUARD.closed) if module is not None and module.GUARD is not None else {}


def create_app(settings: Settings | None = None):
    """The FastAPI application; uvicorn calls this with ``--factory``."""
    import contextlib

    import numpy as np
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.requests import ClientDisconnect

    settings = settings or Settings.from_env()
    path = settings.model_path or load_export_module().ensure_serving_model()
    model = Model.load(path, settings.ort_threads)
    model.predict(np.zeros((settings.max_batch, model.n_features), np.float32))  # warm up before serving
    meta, stats = model.meta, Stats()
    request_model = make_request_model(model.n_features, settings.max_rows)
    state = {"draining": False, "inflight": 0}  # inflight: requests whose body is in and not yet answered
    admin = {h.strip() for h in settings.admin_hosts.split(",") if h.strip()}
    if settings.json_lib not in ("pydantic", "orjson"):
        raise ValueError(f"SERVE_JSON_LIB={settings.json_lib!r}: expected 'pydantic' or 'orjson'")
    if settings.json_lib == "orjson":
        import orjson
        from starlette.responses import Response

        parse_body = parse_json_fast
        answer = lambda content: Response(orjson.dumps(content), media_type="application/json")
    else:
        parse_body, answer = parse_json, JSONResponse

    registry, latency, batch_rows = make_metrics(stats, state, lambda: getattr(getattr(app.state, "batcher", None), "pending_rows", 0))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        app.state.batcher = Batcher(model.predict, settings.max_batch, settings.max_wait_ms / 1e3, stats,
                                    max_queue_rows=settings.max_queue_rows, deadline_s=settings.deadline_ms / 1e3)
        app.state.batcher.on_batch = batch_rows.observe
        app.state.batcher.start()
        drain_on_sigterm(state, settings.drain_s)
        if settings.gc_freeze:  # the ~60k objects of the loaded libraries are never garbage: stop
            gc.collect()  # rescanning them, which makes every full collection a multi-ms stall
            gc.freeze()
        gc.callbacks.append(stats.on_gc)
        profiler = None
        if settings.profile:  # the event-loop thread only: HTTP, framework, parsing; not the model thread
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        try:
            yield
        finally:
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(settings.profile)
            gc.callbacks.remove(stats.on_gc)
            await app.state.batcher.drain()  # uvicorn already let in-flight requests finish

    docs = {} if settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="digits model server", version=str(meta["version"]), lifespan=lifespan, **docs)
    describe = {"model": meta["name"], "model_version": str(meta["version"])}

    def error(exc: RequestError) -> JSONResponse:
        headers = {"retry-after": str(exc.retry_after)} if exc.retry_after is not None else None
        return JSONResponse({"error": exc.message, "details": exc.details, **describe}, status_code=exc.status,
                            headers=headers)

    def from_admin(request: Request) -> bool:
        return request.client is not None and request.client.host in admin

    @app.get("/health")
    async def health():
        """Liveness: the process answers. Says nothing about the model."""
        return {"status": "ok", **describe}

    @app.get("/ready")
    async def ready(request: Request):
        """Readiness: the model is loaded, the batching loop is running and the server is not draining."""
        batcher = getattr(request.app.state, "batcher", None)
        running = batcher is not None and batcher.running()
        ok = running and not state["draining"]
        body = {"ready": ok, "batcher_running": running, "draining": state["draining"], **describe,
                "max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms,
                "ort_threads": settings.ort_threads, "n_features": model.n_features}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/stats")
    async def get_stats(request: Request):
        """Counters since start, and the CPU seconds this process used (the load test reads both).
        Only for the addresses in ``admin_hosts``: counters tell an attacker what hurts."""
        if not from_admin(request):
            return error(RequestError(403, "/stats is only served to the admin hosts"))
        batcher = request.app.state.batcher
        return {**stats.as_dict(), "cpu_s": time.process_time(), "queued_rows": batcher.pending_rows,
                "closed_connections": connection_guard_counts(), **describe}

    @app.get("/metrics")
    async def metrics(request: Request):
        """Prometheus text format, for the admin hosts only, like /stats."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from starlette.responses import Response

        if not from_admin(request):
            return error(RequestError(403, "/metrics is only served to the admin hosts"))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    schema = {"requestBody": {"content": {"application/json": {"schema": request_model.model_json_schema()},
                                          "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}

    @app.post("/predict", openapi_extra=schema)
    async def predict(request: Request):
        """Class labels for a batch of rows, sent as JSON or as raw float32 bytes."""
        started = time.perf_counter()
        try:
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind not in JSON_TYPES + BINARY_TYPES:
                raise RequestError(415, f"content-type must be application/json or application/octet-stream, "
                                        f"got {kind or 'none'!r}")
            body = await read_body(request, settings.max_body_bytes)
            arrival = time.monotonic()  # the deadline counts the server's time, not a slow upload
            if kind in JSON_TYPES:
                x = parse_body(body, request_model, model.n_features, settings.max_rows)
            else:
                x = parse_binary(body, model.n_features, settings.max_rows)
            model.check_range(x)
            if state["inflight"] >= settings.max_inflight:  # counted once the body is in: a slow
                raise RequestError(503, f"overloaded: {state['inflight']} requests already in progress",
                                   retry_after=1)  # upload holds a connection, not a slot
            state["inflight"] += 1
            try:
                labels = await request.app.state.batcher.submit(x, arrival)
            finally:
                state["inflight"] -= 1
        except RequestError as exc:
            stats.shed += exc.status == 503
            if exc.status in (400, 422) and settings.reject_penalty > 0:
                # Fairness for rejected work: a bad request that took t seconds from its first byte in the
                # handler to its rejection (upload, parse, validation) waits penalty x t more for its
                # answer, without holding the loop, so one connection sending bad bodies back to back
                # gets at most about 1 / (1 + penalty) of the server's time. Many connections doing it at
                # once are a rate-limit problem, for the proxy in front.
                await asyncio.sleep(min(1.0, settings.reject_penalty * (time.perf_counter() - started)))
            return error(exc)
        except ClientDisconnect:  # the client hung up mid-body: nobody to answer, nothing broken
            return JSONResponse({"error": "client disconnected"}, status_code=499)
        except Exception as exc:  # the model raised: a clean 500 that says so, counted, one log line
            stats.model_errors += 1
            print(f"model error: {type(exc).__name__}: {exc}", flush=True)
            return error(RequestError(500, f"the model failed on this batch: {type(exc).__name__}: {exc}"[:300]))
        stats.requests += 1
        stats.rows += len(x)
        latency.observe(time.monotonic() - arrival)
        # A Response skips FastAPI's jsonable_encoder, which walks every label in Python (ms per request)
        return answer({"labels": labels.tolist(), **describe})

    hosts = [h.strip() for h in settings.allowed_hosts.split(",") if h.strip()]
    return ModelVersionHeader(TrustedHosts(app, hosts), str(meta["version"]), stats, state)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the digits model over HTTP on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=Settings.max_batch, help="rows per model call (1: no batching)")
    parser.add_argument("--max-wait-ms", type=float, default=Settings.max_wait_ms)
    parser.add_argument("--ort-threads", type=int, default=Settings.ort_threads)
    parser.add_argument("--max-rows", type=int, default=Settings.max_rows)
    parser.add_argument("--model-path", default="", help="ONNX file; default: chapter 06's exported model")
    args = parser.parse_args(argv)
    for name in ("max_batch", "max_wait_ms", "ort_threads", "max_rows", "model_path"):
        if getattr(args, name) != "":
            os.environ[f"SERVE_{name.upper()}"] = str(getattr(args, name))
    import signal

    import uvicorn

    def stopped(signum, frame):  # uvicorn re-raises SIGTERM after its graceful shutdown
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stopped)
    try:
        uvicorn.run("app:create_app", factory=True, app_dir=str(HERE), host="127.0.0.1", http="guard:H11",
                    port=args.port, workers=1, timeout_graceful_shutdown=5, access_log=False)
    except KeyboardInterrupt:  # Ctrl+C: uvicorn re-raises SIGINT after its graceful shutdown
        pass
    finally:
        print(json.dumps({"stopped": True, "port": args.port, "settings": Settings.from_env().__dict__}))


if __name__ == "__main__":
    main()
