"""Online prediction server for the digits model: FastAPI + uvicorn + ONNX Runtime, dynamic batching.

Why a file and not a cell: a server is its own process. It owns a port, a thread pool and a model
session, it is stopped with a signal, and the chapter, the load generator and the tests all talk to it
over real HTTP. A server started inside the notebook's kernel would share the kernel's event loop and
its CPU accounting, and would measure nothing a client sees.

Launch from this folder (settings come from SERVE_* environment variables; flags of ``python app.py``
set the same variables)::

    SERVE_MAX_BATCH=32 SERVE_MAX_WAIT_MS=2 python -m uvicorn app:create_app --factory \
        --host 127.0.0.1 --port 8000 --workers 1 --timeout-graceful-shutdown 5 --no-access-log
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

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        types = {"model_path": str, "max_batch": int, "max_wait_ms": float, "ort_threads": int,
                 "max_rows": int, "max_body_bytes": int, "gc_freeze": int}
        given = {k: conv(env[f"SERVE_{k.upper()}"]) for k, conv in types.items() if f"SERVE_{k.upper()}" in env}
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
                "gc_pauses": self.gc_pauses, "gc_pause_s": self.gc_pause_s, "gc_max_pause_ms": 1e3 * self.gc_max_pause_s}


class Batcher:
    """Queue requests and run them as one model call: up to ``max_batch`` rows, waiting at most
    ``max_wait_s`` after the oldest queued request arrived. The model runs on one worker thread so
    the event loop keeps reading requests while it computes; ``max_batch=1`` is plain per-request
    inference through the same path, which makes it the fair baseline."""

    def __init__(self, predict, max_batch: int, max_wait_s: float, stats: Stats):
        from concurrent.futures import ThreadPoolExecutor

        self.predict, self.max_batch, self.max_wait_s, self.stats = predict, max_batch, max_wait_s, stats
        self.pending: collections.deque = collections.deque()  # (rows, future, arrival time)
        self.pending_rows = 0
        self.has_work, self.full = asyncio.Event(), asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.task: asyncio.Task | None = None
        self.computing = False  # a batch is on the model thread
        self.flushing = False  # shutting down: run what is queued without waiting for company

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run(), name="batcher")

    async def submit(self, x):
        future = asyncio.get_running_loop().create_future()
        self.pending.append((x, future, time.monotonic()))
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
            items = self.take()
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

    def __init__(self, status: int, message: str, details: list[str] | None = None):
        super().__init__(message)
        self.status, self.message, self.details = status, message, details or []


def make_request_model(n_features: int, max_rows: int):
    """The JSON body, strictly typed: {"instances": [[n_features numbers], ...]}."""
    from typing import Annotated

    from pydantic import BaseModel, ConfigDict, Field

    # strict: no "1.5" strings or true/false; allow_inf_nan=False: no NaN, no Infinity
    Feature = Annotated[float, Field(strict=True, allow_inf_nan=False)]
    Row = Annotated[list[Feature], Field(min_length=n_features, max_length=n_features)]

    class PredictRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")  # an unknown field is a client bug
        instances: list[Row] = Field(min_length=1, max_length=max_rows)

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
    return np.asarray(parsed.instances, dtype=np.float32)


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
    """Plain ASGI middleware: stamps ``x-model-version`` on every response and counts status classes.
    (BaseHTTPMiddleware would do the same at several times the cost per request.)"""

    def __init__(self, app, version: str, stats: Stats):
        self.app, self.version, self.stats = app, version.encode(), stats

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_stamped(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-model-version", self.version)]
                self.stats.status[message["status"] // 100] += 1
            await send(message)

        await self.app(scope, receive, send_stamped)


def create_app(settings: Settings | None = None):
    """The FastAPI application; uvicorn calls this with ``--factory``."""
    import contextlib

    import numpy as np
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    settings = settings or Settings.from_env()
    path = settings.model_path or load_export_module().ensure_serving_model()
    model = Model.load(path, settings.ort_threads)
    model.predict(np.zeros((settings.max_batch, model.n_features), np.float32))  # warm up before serving
    meta, stats = model.meta, Stats()
    request_model = make_request_model(model.n_features, settings.max_rows)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        app.state.batcher = Batcher(model.predict, settings.max_batch, settings.max_wait_ms / 1e3, stats)
        app.state.batcher.start()
        if settings.gc_freeze:  # the ~60k objects of the loaded libraries are never garbage: stop
            gc.collect()  # rescanning them, which makes every full collection a multi-ms stall
            gc.freeze()
        gc.callbacks.append(stats.on_gc)
        try:
            yield
        finally:
            gc.callbacks.remove(stats.on_gc)
            await app.state.batcher.drain()  # uvicorn already let in-flight requests finish

    app = FastAPI(title="digits model server", version=str(meta["version"]), lifespan=lifespan)
    describe = {"model": meta["name"], "model_version": str(meta["version"])}

    def error(exc: RequestError) -> JSONResponse:
        return JSONResponse({"error": exc.message, "details": exc.details, **describe}, status_code=exc.status)

    @app.get("/health")
    async def health():
        """Liveness: the process answers. Says nothing about the model."""
        return {"status": "ok", **describe}

    @app.get("/ready")
    async def ready(request: Request):
        """Readiness: the model is loaded and the batching loop is running, so predictions will work."""
        task = getattr(request.app.state, "batcher", None) and request.app.state.batcher.task
        ok = task is not None and not task.done()
        body = {"ready": ok, **describe, "max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms,
                "ort_threads": settings.ort_threads, "n_features": model.n_features}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/stats")
    async def get_stats():
        """Counters since start, and the CPU seconds this process used (the load test reads both)."""
        return {**stats.as_dict(), "cpu_s": time.process_time(), **describe}

    schema = {"requestBody": {"content": {"application/json": {"schema": request_model.model_json_schema()},
                                          "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}

    @app.post("/predict", openapi_extra=schema)
    async def predict(request: Request):
        """Class labels for a batch of rows, sent as JSON or as raw float32 bytes."""
        try:
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind not in JSON_TYPES + BINARY_TYPES:
                raise RequestError(415, f"content-type must be application/json or application/octet-stream, "
                                        f"got {kind or 'none'!r}")
            body = await read_body(request, settings.max_body_bytes)
            if kind in JSON_TYPES:
                x = parse_json(body, request_model, model.n_features, settings.max_rows)
            else:
                x = parse_binary(body, model.n_features, settings.max_rows)
            model.check_range(x)
        except RequestError as exc:
            return error(exc)
        labels = await request.app.state.batcher.submit(x)
        stats.requests += 1
        stats.rows += len(x)
        # A Response skips FastAPI's jsonable_encoder, which walks every label in Python (ms per request)
        return JSONResponse({"labels": labels.tolist(), **describe})

    return ModelVersionHeader(app, str(meta["version"]), stats)


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
        uvicorn.run("app:create_app", factory=True, app_dir=str(HERE), host="127.0.0.1",
                    port=args.port, workers=1, timeout_graceful_shutdown=5, access_log=False)
    except KeyboardInterrupt:  # Ctrl+C: uvicorn re-raises SIGINT after its graceful shutdown
        pass
    finally:
        print(json.dumps({"stopped": True, "port": args.port, "settings": Settings.from_env().__dict__}))


if __name__ == "__main__":
    main()
