"""Start, stop, freeze and load-test the server of app.py as real processes.

Why a file and not cells: the chapter, its exercises and tests/test_07_serve_models.py all need the
same guarantees, so they live in one tested place: the server is launched with
``sys.executable -m uvicorn`` on a free port of 127.0.0.1, readiness is polled with a time bound,
and every process started here is stopped, on error too. Three layers make sure of that: ``stop()``
(SIGTERM, then SIGKILL after a bound), an ``atexit`` hook for a kernel that exits normally, and on
Linux a parent-death signal so the server dies with a kernel that is killed.

Used from the chapter (its folder is the working directory)::

    from server_process import ServerProcess, run_load_test
    with ServerProcess(max_batch=32, max_wait_ms=2) as server:
        result = run_load_test(server.port, rates=[200, 400], duration=2)
"""

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
HOST = "127.0.0.1"
_RUNNING: set = set()  # servers started and not yet stopped, for the atexit hook


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it; a tiny race until the server binds)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_is_open(port: int) -> bool:
    """True when something accepts connections on 127.0.0.1:port."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def _die_with_parent():  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ServerProcess:
    """app.py under uvicorn in its own process: one worker, settings passed as SERVE_* variables."""

    def __init__(self, *, max_batch: int = 32, max_wait_ms: float = 2.0, ort_threads: int = 1,
                 model_path: str | Path = "", port: int | None = None, log_path: str | Path | None = None,
                 graceful_s: int = 5, http: str = "h11", loop: str = "asyncio", extra_env: dict | None = None):
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = Path(log_path) if log_path else HERE / "artifacts" / f"server-{self.port}.log"
        self.env = {**os.environ, "SERVE_MAX_BATCH": str(max_batch), "SERVE_MAX_WAIT_MS": str(max_wait_ms),
                    "SERVE_ORT_THREADS": str(ort_threads), "SERVE_MODEL_PATH": str(model_path),
                    "OMP_NUM_THREADS": "1", **(extra_env or {})}
        self.command = [sys.executable, "-m", "uvicorn", "app:create_app", "--factory", "--app-dir", str(HERE),
                        "--host", HOST, "--port", str(self.port), "--workers", "1", "--no-access-log",
                        "--http", {"h11": "guard:H11", "httptools": "guard:HttpTools"}[http], "--loop", loop,
                        "--timeout-graceful-shutdown", str(graceful_s)]
        self.proc: subprocess.Popen | None = None

    def start(self, ready_timeout: float = 60.0) -> "ServerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:  # a file, not a pipe: a full pipe would block the server
            self.proc = subprocess.Popen(self.command, cwd=HERE, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        _RUNNING.add(self)
        try:
            self.wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> dict:
        """Poll /ready until it answers 200, the process dies, or ``timeout`` seconds pass."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                reply = httpx.get(f"{self.url}/ready", timeout=1.0)
                if reply.status_code == 200:
                    return reply.json()
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:]) if self.log_path.exists() else ""

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (graceful: in-flight requests finish), SIGKILL if it takes longer than ``timeout``."""
        _RUNNING.discard(self)
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a frozen server cannot act on SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


@atexit.register
def stop_all() -> None:
    """Stop every server this module started and has not stopped yet."""
    for server in list(_RUNNING):
        server.stop(timeout=5)


def freeze(pid: int, seconds: float) -> None:
    """Stop a process dead for ``seconds`` (SIGSTOP), then let it run again (SIGCONT): a stand-in for a
    long garbage-collection pause, a noisy neighbour or a VM migration."""
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)


def load_test_command(port: int, **flags) -> list[str]:
    """The command line for load_test.py; keyword ``rates=[...]`` and flags as ``--name value``."""
    cmd = [sys.executable, str(HERE / "load_test.py"), "--port", str(port)]
    for name, value in flags.items():
        if isinstance(value, bool):
            cmd += [f"--{name.replace('_', '-')}"] if value else []
        else:
            value = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    return cmd


def parse_last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def run_load_test(port: int, timeout: float = 120.0, **flags) -> dict:
    """Run load_test.py in its own process, bounded by ``timeout``; return its final JSON line."""
    done = subprocess.run(load_test_command(port, **flags), cwd=HERE, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"load_test.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return parse_last_json(done.stdout)


def run_load_test_with_freeze(server: ServerProcess, at_s: float, freeze_s: float, timeout: float = 60.0,
                              **flags) -> dict:
    """Run load_test.py and freeze the server for ``freeze_s`` seconds, ``at_s`` seconds after the
    first request of the load test reached it."""
    import httpx

    before = httpx.get(f"{server.url}/stats", timeout=2).json()["requests"]
    proc = subprocess.Popen(load_test_command(server.port, **flags), cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_die_with_parent)
    try:
        deadline = time.monotonic() + 15
        while httpx.get(f"{server.url}/stats", timeout=2).json()["requests"] == before:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the load test never reached the server")
            time.sleep(0.01)
        time.sleep(at_s)
        freeze(server.proc.pid, freeze_s)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"load_test.py failed ({proc.returncode}):\n{err[-3000:]}")
    return parse_last_json(out)


def wait_until_refused(port: int, timeout: float = 5.0) -> float:
    """Seconds until 127.0.0.1:port stops accepting connections; raises if it never does."""
    start = time.monotonic()
    while port_is_open(port):
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"port {port} still accepts connections after {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - start


def request_across_shutdown(server: ServerProcess, body: bytes, content_type: str = "application/octet-stream",
                            pause_s: float = 0.5) -> dict:
    """Start a request, send the server SIGTERM while half its body is still on the way, finish
    sending, and report what the client got back and how the server ended."""
    head = (f"POST /predict HTTP/1.1\r\nhost: {HOST}:{server.port}\r\ncontent-type: {content_type}\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((HOST, server.port), timeout=10) as conn:
        conn.sendall(head + body[: len(body) // 2])
        time.sleep(0.2)  # the server has read the headers: the request is in flight
        sigterm_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        refused_after_s = wait_until_refused(server.port)
        time.sleep(pause_s)
        conn.sendall(body[len(body) // 2 :])
        raw = b""
        while chunk := conn.recv(65536):  # the server closes the connection after answering
            raw += chunk
    exit_code = server.proc.wait(10)
    _RUNNING.discard(server)
    head_bytes, _, payload = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return {"status": int(lines[0].split()[1]), "body": json.loads(payload), "connection": headers.get("connection"),
            "new_connections_refused_after_s": refused_after_s, "exit_code": exit_code,
            "sigterm_to_exit_s": time.monotonic() - sigterm_at}


_GC_PROBE = """
import gc, json, statistics, sys, time
import uvicorn.protocols.http.h11_impl, uvicorn.server  # what the server process imports besides app
import app
app.create_app(app.Settings(model_path=sys.argv[1]))  # the libraries and the model, as in the server
def full_collection_ms():
    start = time.perf_counter()
    gc.collect()
    return 1e3 * (time.perf_counter() - start)
tracked = len(gc.get_objects())
before = statistics.median(full_collection_ms() for _ in range(5))
gc.freeze()
after = statistics.median(full_collection_ms() for _ in range(5))
print(json.dumps({"tracked_objects": tracked, "full_collection_ms": before, "after_freeze_ms": after}))
"""


def gc_cost(model_path: str | Path, timeout: float = 120.0) -> dict:
    """Median time of a full garbage collection in a fresh process that holds what the server holds
    (app.py's libraries and the loaded model), before and after ``gc.freeze()``."""
    done = subprocess.run([sys.executable, "-c", _GC_PROBE, str(model_path)], cwd=HERE, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"gc probe failed:\n{done.stderr[-3000:]}")
    return parse_last_json(done.stdout)


# --- hostile clients, as real sockets: used by the chapter's attack section and the tests -----------

def open_hostile(port: int, n: int, kind: str) -> list[socket.socket]:
    """``n`` connections that tie the server up: ``idle`` (connect, send nothing) or ``stalled``
    (send headers promising a 1 KiB body, then 10 bytes of it, then nothing)."""
    head = (f"POST /predict HTTP/1.1\r\nhost: {HOST}:{port}\r\ncontent-type: application/json\r\n"
            "content-length: 1024\r\n\r\n{\"instances").encode()
    socks = []
    for _ in range(n):
        s = socket.create_connection((HOST, port), timeout=5)
        if kind == "stalled":
            s.sendall(head)
        socks.append(s)
    return socks


def closed_by_server(socks: list[socket.socket], wait_s: float = 0.0) -> dict:
    """How many of ``socks`` the server has closed (EOF or reset), and how many got a 408 first."""
    import select

    time.sleep(wait_s)
    closed = got_408 = 0
    for s in socks:
        data = b""
        try:
            while select.select([s], [], [], 0)[0]:
                chunk = s.recv(65536)
                if not chunk:
                    closed += 1
                    break
                data += chunk
        except OSError:
            closed += 1
        got_408 += data.startswith(b"HTTP/1.1 408")
    return {"held": len(socks), "closed": closed, "got_408": got_408}


def raw_exchange(port: int, raw: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send raw bytes on a fresh connection, read until the server closes or a full answer is in."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(raw)
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _content_length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data.partition(b"\r\n\r\n")[2]


def _content_length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def chunked_body(port: int, total_bytes: int, chunk: int = 64 * 1024) -> tuple[int, bytes]:
    """POST a body with no Content-Length (chunked transfer encoding), ``total_bytes`` long."""
    head = (f"POST /predict HTTP/1.1\r\nhost: {HOST}:{port}\r\ncontent-type: application/json\r\n"
            "transfer-encoding: chunked\r\nconnection: close\r\n\r\n").encode()
    parts, left = [head], total_bytes
    while left > 0:
        n = min(chunk, left)
        parts.append(f"{n:x}\r\n".encode() + b"1" * n + b"\r\n")
        left -= n
    parts.append(b"0\r\n\r\n")
    try:
        return raw_exchange(port, b"".join(parts))
    except (BrokenPipeError, ConnectionResetError):  # the server answered and closed before the end
        return 413, b""


def hang_ups(port: int, n: int) -> None:
    """``n`` clients that send half a request body and hang up."""
    head = (f"POST /predict HTTP/1.1\r\nhost: {HOST}:{port}\r\ncontent-type: application/json\r\n"
            "content-length: 400\r\n\r\n{\"instances\": [[0, 1, 2").encode()
    for _ in range(n):
        with socket.create_connection((HOST, port), timeout=5) as s:
            s.sendall(head)
            time.sleep(0.02)


def keepalive_across_sigterm(server: "ServerProcess", body: bytes, connections: int = 8,
                             interval_s: float = 0.01) -> dict:
    """Clients that behave like a load balancer's upstream pool: ``connections`` keep-alive connections
    send requests back to back; ``SIGTERM`` arrives; each client keeps sending until /ready says 503 or
    its connection is closed after an answer, then stops. Every request sent must get an answer."""
    import threading

    head = (f"POST /predict HTTP/1.1\r\nhost: {HOST}:{server.port}\r\ncontent-type: application/octet-stream\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode()
    stop, outcomes, lock = threading.Event(), collections_counter(), threading.Lock()

    def client():
        conn = None
        while not stop.is_set():
            try:
                if conn is None:
                    conn = socket.create_connection((HOST, server.port), timeout=5)
                conn.sendall(head + body)
                data = b""
                while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _content_length(data):
                    chunk = conn.recv(65536)
                    if not chunk:
                        raise ConnectionResetError("closed without an answer")
                    data += chunk
                status = int(data.split(b" ", 2)[1])
                with lock:
                    outcomes[status] += 1
                if b"connection: close" in data.partition(b"\r\n\r\n")[0].lower():
                    conn.close()
                    conn = None
            except ConnectionRefusedError:
                break  # the listener is gone: a real client would try another replica
            except OSError:
                with lock:
                    outcomes["no answer"] += 1
                if conn is not None:
                    conn.close()
                conn = None
            time.sleep(interval_s)
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(connections)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    before = sum(outcomes.values())
    sigterm_at = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    import httpx

    ready_failed_after = None
    while ready_failed_after is None and time.monotonic() - sigterm_at < 5:
        try:
            if httpx.get(f"{server.url}/ready", timeout=1).status_code == 503:
                ready_failed_after = time.monotonic() - sigterm_at
        except httpx.TransportError:
            break
    stop.set()  # the load balancer has seen readiness fail: no new requests
    for t in threads:
        t.join(10)
    exit_code = server.proc.wait(15)
    _RUNNING.discard(server)
    return {"answered_before_sigterm": before, "outcomes": dict(outcomes), "exit_code": exit_code,
            "ready_failed_after_s": ready_failed_after, "sigterm_to_exit_s": time.monotonic() - sigterm_at}


def collections_counter():
    import collections

    return collections.Counter()


def flood(port: int, body: bytes, seconds: float, content_type: str = "application/json") -> dict:
    """One client sending ``body`` back to back on one keep-alive connection for ``seconds``, in a
    thread; returns a handle whose ``result()`` is the count of answers by status."""
    import collections
    import threading

    head = (f"POST /predict HTTP/1.1\r\nhost: {HOST}:{port}\r\ncontent-type: {content_type}\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode()
    counts = collections.Counter()

    def run():
        end = time.monotonic() + seconds
        conn = socket.create_connection((HOST, port), timeout=10)
        try:
            while time.monotonic() < end:
                conn.sendall(head + body)
                data = b""
                while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _content_length(data):
                    chunk = conn.recv(65536)
                    if not chunk:
                        raise ConnectionResetError
                    data += chunk
                counts[int(data.split(b" ", 2)[1])] += 1
        except OSError:
            counts["no answer"] += 1
        finally:
            conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    class Handle:
        def result(self, timeout: float = 30.0) -> dict:
            thread.join(timeout)
            return dict(counts)

    return Handle()


#: uvicorn --http, --loop and SERVE_JSON_LIB of each HTTP stack the chapter measures
STACKS = {"h11 + asyncio, pydantic": ("h11", "asyncio", "pydantic"),
          "httptools + uvloop, pydantic": ("httptools", "uvloop", "pydantic"),
          "httptools + uvloop, orjson": ("httptools", "uvloop", "orjson")}


def measure_stacks(model_path, requests: dict, seed: int, duration: float = 0.75, connections: int = 64) -> list[dict]:
    """Each stack of ``STACKS`` as its own server process, driven flat out by the same closed-loop
    generator (on uvloop, so the client is as cheap as it gets) with each kind of request in
    ``requests`` ({"1-row json": ("json", 1), ...}); one row per stack and request kind."""
    out = []
    for name, (http, loop, json_lib) in STACKS.items():
        env = {"SERVE_JSON_LIB": json_lib, "SERVE_DRAIN_S": "0"}  # nobody to drain for: stop at once
        with ServerProcess(model_path=model_path, http=http, loop=loop, extra_env=env) as server:
            for kind, (payload, rows) in requests.items():
                if payload == "binary" and json_lib != "pydantic":
                    continue  # a binary body never reaches the JSON parser
                level = run_load_test(server.port, rates=[100_000], duration=duration, mode="closed",
                                      connections=connections, payload=payload, rows=rows, warmup=0.2,
                                      loop="uvloop", seed=seed)["levels"][0]
                out.append({"stack": name, "request": kind, "rows_per_request": rows, **level})
    return out


def profile_stack(model_path, stack: str, payload: str, rows: int, seed: int, duration: float = 0.75,
                  connections: int = 64) -> tuple[dict, "object"]:
    """Run one closed-loop level against a server of ``stack`` with cProfile on its event-loop thread
    (``SERVE_PROFILE``); return the level and the ``pstats.Stats`` written at shutdown."""
    import pstats

    http, loop, json_lib = STACKS[stack]
    path = HERE / "artifacts" / f"loop-{stack.split()[0]}-{payload}.prof"
    env = {"SERVE_JSON_LIB": json_lib, "SERVE_DRAIN_S": "0", "SERVE_PROFILE": str(path)}
    with ServerProcess(model_path=model_path, http=http, loop=loop, extra_env=env) as server:
        level = run_load_test(server.port, rates=[100_000], duration=duration, mode="closed", connections=connections,
                              payload=payload, rows=rows, warmup=0.2, loop="uvloop", seed=seed)["levels"][0]
    return level, pstats.Stats(str(path))


LAYERS = (("HTTP protocol (uvicorn, guard.py)", ("uvicorn/", "guard.py", "h11/", "httptools")),
          ("framework (FastAPI, Starlette)", ("fastapi/", "starlette/", "anyio/")),
          ("app.py: handler, validation, batcher", ("07-serve-models/app.py",)),
          ("JSON and NumPy", ("pydantic", "orjson", "numpy", "json/")),
          ("event loop (asyncio, uvloop)", ("asyncio/", "uvloop", "selectors", "concurrent/")))


def layer_of(filename: str, function: str) -> str:
    """Which layer of the stack a profiled function belongs to (C functions are named by their type)."""
    where = filename if filename != "~" else function
    for layer, marks in LAYERS:
        if any(mark in where for mark in marks):
            return layer
    return "other (Python built-ins, contextlib, typing)"


def time_by_layer(stats) -> dict:
    """Seconds of own time (cProfile's tottime) per layer, largest first."""
    import collections

    seconds = collections.Counter()
    for (filename, _, function), (_, _, own, _, _) in stats.stats.items():
        seconds[layer_of(filename, function)] += own
    return dict(seconds.most_common())


class MetricsScraper:
    """Scrape a server's ``/metrics`` every ``every_s`` seconds on a thread, as Prometheus would, while
    the caller runs something else; one last scrape on exit. ``samples`` holds one dict per scrape:
    ``t`` (seconds since the first) and every sample as ``name{label="value"}``: value."""

    def __init__(self, url: str, every_s: float = 0.25):
        import threading

        self.url, self.every_s, self.samples = url, every_s, []
        self._stop, self._thread = threading.Event(), threading.Thread(target=self._run, daemon=True)
        self._t0 = time.monotonic()

    def scrape(self) -> None:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        reply = httpx.get(f"{self.url}/metrics", timeout=2)
        reply.raise_for_status()
        sample = {"t": time.monotonic() - self._t0}
        for family in text_string_to_metric_families(reply.text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                sample[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        self.samples.append(sample)

    def _run(self) -> None:
        import httpx

        while not self._stop.wait(self.every_s):
            try:
                self.scrape()
            except httpx.HTTPError:  # a scrape that fails is a gap in the series, as in Prometheus
                pass

    def __enter__(self) -> "MetricsScraper":
        self._t0 = time.monotonic()
        self.scrape()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.scrape()


def interval_quantile(before: dict, after: dict, name: str, q: float) -> float:
    """Prometheus's ``histogram_quantile`` over one scrape interval: the q-quantile of the observations
    of histogram ``name`` made between two scrapes, interpolated linearly inside its bucket; NaN when
    there were none, the highest finite bound when it falls in the +Inf bucket."""
    import math

    prefix = f'{name}_bucket{{le="'
    buckets = sorted((float(k[len(prefix):-2]), after[k] - before.get(k, 0.0)) for k in after if k.startswith(prefix))
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank, lower, below = q * buckets[-1][1], 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


def metrics_timeline(samples: list[dict], q: float = 0.99) -> list[dict]:
    """Per scrape interval: answers/s, the q-quantile of the server-side latency (ms), mean rows per
    model call, rows queued at the scrape, and 503s/s: what a dashboard over /metrics would plot."""
    out = []
    for before, after in zip(samples, samples[1:]):
        dt = after["t"] - before["t"]
        delta = lambda key: after.get(key, 0.0) - before.get(key, 0.0)  # noqa: E731
        batches = delta("serve_batch_rows_count")
        out.append({"t_s": after["t"], "answers_per_s": delta("serve_request_seconds_count") / dt,
                    f"p{round(100 * q)}_ms": 1e3 * interval_quantile(before, after, "serve_request_seconds", q),
                    "mean_batch_rows": delta("serve_batch_rows_sum") / batches if batches else 0.0,
                    "queue_rows": after.get("serve_queue_rows", 0.0), "rejected_per_s": delta("serve_rejected_total") / dt})
    return out
