"""Open-loop load generator for app.py: constant arrival rate, latency from the intended send time.

Why a file and not a cell: the load must come from its own process. A generator inside the notebook
kernel, or inside the server, shares an event loop and a CPU budget with what it measures. Run as
its own process it competes with the server only for cores, and it reports its own CPU time so the
chapter can account for that.

Two ways to measure, chosen by ``--mode``:

* ``open``: request i is due at ``t0 + i / rate`` whatever happened before, and its latency runs from
  that intended time. When the server stalls, requests keep coming due and their wait is counted.
  This is how users behave, and how the chapter measures.
* ``closed``: ``--connections`` workers each send their next request only after the previous answer
  (and not before it is due), timing from the actual send. This is what many benchmark tools do, and
  it hides stalls: the requests that should have been sent during a stall are sent late, with their
  clocks started late (coordinated omission). It is here to show that failure.

The client speaks just enough HTTP/1.1 over asyncio streams for this server (keep-alive,
Content-Length bodies): a general client such as httpx costs more CPU per request than the server
it is measuring, and on a 2-core machine that CPU is taken from the server. Everything is bounded:
each level runs ``--duration`` seconds and at most ``--max-requests`` requests, each request times
out after ``--timeout`` seconds, and only 127.0.0.1 is accepted.

Launch (server running on port 8000)::

    python load_test.py --port 8000 --rates 200,400,800 --duration 2
    python load_test.py --port 8000 --rates 300 --duration 3 --mode closed --connections 2 --timeline

The last line printed is one JSON object: per offered rate, the requests sent, answered and failed,
achieved throughput, latency percentiles, the server's batching and CPU counters, and the
generator's own CPU time.
"""

import argparse
import asyncio
import gc
import json
import math
import resource
import time

HOST = "127.0.0.1"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Connection:
    """One keep-alive HTTP/1.1 connection to the server."""

    def __init__(self, port: int):
        self.port = port
        self.reader = self.writer = None

    async def open(self) -> "Connection":
        self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        return self

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send one prepared request; return (status, body). The server closing the connection raises."""
        if self.writer is None:
            await self.open()
        self.writer.write(raw)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("server closed the connection without answering")
        status, length, close = int(status_line.split()[1]), 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        body = await self.reader.readexactly(length)
        if close:
            self.close()
        return status, body


def build_requests(port: int, n_features: int, payload: str, rows: int, count: int, seed: int) -> list[bytes]:
    """``count`` distinct, valid /predict requests, ready to write: seeded random pixel counts 0..16,
    the digits model's input range (whole numbers, as load_digits has them)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        x = rng.integers(0, 17, size=(rows, n_features))
        if payload == "json":
            body, kind = json.dumps({"instances": x.tolist()}).encode(), b"application/json"
        else:
            body, kind = x.astype("<f4").tobytes(), b"application/octet-stream"
        head = (f"POST /predict HTTP/1.1\r\nhost: {HOST}:{port}\r\ncontent-type: {kind.decode()}\r\n"
                f"content-length: {len(body)}\r\n\r\n").encode()
        out.append(head + body)
    return out


async def get_json(port: int, path: str) -> dict:
    conn = await Connection(port).open()
    try:
        status, body = await conn.request(f"GET {path} HTTP/1.1\r\nhost: {HOST}:{port}\r\n\r\n".encode())
    finally:
        conn.close()
    if status != 200:
        raise RuntimeError(f"GET {path} answered {status}: {body[:200]!r}")
    return json.loads(body)


class Recorder:
    """Per request: when it was due, when the generator got to it, when it went out on a connection,
    when the answer was complete, and the outcome (HTTP status, "timeout" or "failed")."""

    def __init__(self):
        self.intended, self.issued, self.sent, self.done, self.status = [], [], [], [], []

    def add(self, intended: float, issued: float, sent: float, done: float, status: int | str) -> None:
        for name, value in zip(("intended", "issued", "sent", "done", "status"), (intended, issued, sent, done, status)):
            getattr(self, name).append(value)


async def exchange(pool: asyncio.Queue, raw: bytes, intended: float, timeout: float, rec: Recorder) -> None:
    """Take a free connection (waiting counts as latency), send, and record what happened."""
    issued = time.perf_counter()
    conn = await pool.get()
    sent = time.perf_counter()
    try:
        status, _ = await asyncio.wait_for(conn.request(raw), timeout)
    except (asyncio.TimeoutError, OSError, ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
        status = "timeout" if isinstance(exc, asyncio.TimeoutError) else "failed"
        conn.close()  # its state is unknown; the next user reconnects
    finally:
        pool.put_nowait(conn)
    rec.add(intended, issued, sent, time.perf_counter(), status)


def arrival_offsets(kind: str, rate: float, n: int, seed: int, burst_period_s: float = 0.5) -> list[float]:
    """Seconds after the start at which each of ``n`` requests is due, at a mean of ``rate`` per second.

    * ``uniform``: evenly spaced, i / rate (what most tools send, and the kindest load there is);
    * ``poisson``: independent users, exponential gaps with mean 1 / rate;
    * ``bursty``: Poisson whose rate switches every ``burst_period_s``: 3x the mean for the first
      20% of each period, half the mean for the rest (same mean, far worse queues)."""
    import numpy as np

    if kind == "uniform":
        return [i / rate for i in range(n)]
    rng = np.random.default_rng(seed)
    if kind == "poisson":
        return np.cumsum(rng.exponential(1 / rate, n)).tolist()
    out, t = [], 0.0
    while len(out) < n:  # thinning: draw at the peak rate, keep each with probability rate(t) / peak
        t += rng.exponential(1 / (3 * rate))
        phase = (t % burst_period_s) / burst_period_s
        if rng.random() < (1.0 if phase < 0.2 else 0.5 / 3):
            out.append(t)
    return out


async def open_loop(pool: asyncio.Queue, requests: list[bytes], rate: float, n: int,
                    timeout: float, rec: Recorder, offsets: list[float] | None = None) -> None:
    """Request i is due at t0 + offsets[i] (i / rate by default), whatever the server is doing. Each
    request is its own task, so a slow answer never delays the next send; latency runs from ``due``."""
    t0 = time.perf_counter() + 0.01
    tasks = []
    offsets = offsets or [i / rate for i in range(n)]
    for i in range(n):
        due = t0 + offsets[i]
        if (wait := due - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        raw = requests[i % len(requests)]
        tasks.append(asyncio.create_task(exchange(pool, raw, due, timeout, rec)))
    await asyncio.gather(*tasks)


async def closed_loop(pool: asyncio.Queue, requests: list[bytes], rate: float, n: int, timeout: float,
                      connections: int, duration: float, rec: Recorder) -> None:
    """Each worker waits for its previous answer before sending, and times from the actual send.
    Requests that fall due after ``duration`` seconds while a worker is still behind are never sent."""
    t0 = time.perf_counter() + 0.01

    async def worker(k: int) -> None:
        for i in range(k, n, connections):
            due = t0 + i / rate
            if time.perf_counter() > t0 + duration:
                break
            if (wait := due - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            late = Recorder()
            await exchange(pool, requests[i % len(requests)], due, timeout, late)
            rec.add(due, late.issued[0], late.sent[0], late.done[0], late.status[0])

    await asyncio.gather(*(worker(k) for k in range(connections)))


def summarize(rec: Recorder, rate: float, mode: str, elapsed: float, target_ms: float = math.inf) -> dict:
    start = rec.sent if mode == "closed" else rec.intended  # the closed loop's clock starts at the send
    ok = [d - s for d, s, st in zip(rec.done, start, rec.status) if st == 200]
    answered = [d - s for d, s, st in zip(rec.done, start, rec.status) if isinstance(st, int)]
    good = sum(latency <= target_ms / 1e3 for latency in ok)  # answered 200 within the target
    counts = {"ok": sum(st == 200 for st in rec.status),
              "http_4xx": sum(isinstance(st, int) and 400 <= st < 500 for st in rec.status),
              "http_5xx": sum(isinstance(st, int) and st >= 500 for st in rec.status),
              "timeouts": rec.status.count("timeout"), "failed": rec.status.count("failed")}
    behind = [s - i for s, i in zip(rec.issued, rec.intended)]  # the generator itself running late
    queued = [s - i for s, i in zip(rec.sent, rec.issued)]  # waiting for a free connection
    ms = {f"p{q}_ms": 1e3 * percentile(ok, q) for q in (50, 95, 99)}
    counts["http_503"] = sum(st == 503 for st in rec.status)
    return {"offered_rps": rate, "sent": len(rec.status), **counts, "achieved_rps": counts["ok"] / elapsed,
            "goodput_rps": good / elapsed, "good_share": good / max(1, len(rec.status)),
            "answered_max_ms": 1e3 * max(answered, default=math.nan),
            **ms, "max_ms": 1e3 * max(ok, default=math.nan), "generator_late_p99_ms": 1e3 * percentile(behind, 99),
            "connection_wait_p99_ms": 1e3 * percentile(queued, 99)}


async def run_level(port: int, requests: list[bytes], rate: float, args) -> tuple[dict, Recorder]:
    n = min(args.max_requests, max(1, round(rate * args.duration)))
    pool: asyncio.Queue = asyncio.Queue()
    for _ in range(args.connections):
        pool.put_nowait(await Connection(port).open())
    rec, before, cpu0 = Recorder(), await get_json(port, "/stats"), cpu_seconds()
    gc.collect()
    gc.disable()  # the generator's own collection pauses must not count against the server
    t0 = time.perf_counter()
    try:
        if args.mode == "open":
            offsets = arrival_offsets(args.arrivals, rate, n, args.seed)
            await open_loop(pool, requests, rate, n, args.timeout, rec, offsets)
        else:
            await closed_loop(pool, requests, rate, n, args.timeout, args.connections, args.duration, rec)
    finally:
        gc.enable()
    elapsed = max(max(rec.done) - t0, n / rate)
    cpu, after = cpu_seconds() - cpu0, await get_json(port, "/stats")
    while not pool.empty():
        pool.get_nowait().close()
    level = summarize(rec, rate, args.mode, elapsed, args.target_ms)
    batches, rows = after["batches"] - before["batches"], after["rows"] - before["rows"]
    level.update(elapsed_s=elapsed, rows_per_request=args.rows, server_batches=batches,
                 server_gc_pause_s=after["gc_pause_s"] - before["gc_pause_s"],
                 server_mean_batch_rows=rows / batches if batches else 0.0,
                 server_cpu_s=after["cpu_s"] - before["cpu_s"], client_cpu_s=cpu,
                 client_cpu_us_per_request=1e6 * cpu / max(1, len(rec.status)))
    return level, rec


def stable(values: list[float], tolerance: float) -> bool:
    """True when every value lies within ``tolerance`` (a fraction) of their mean."""
    mean = sum(values) / len(values)
    return mean > 0 and all(abs(v - mean) <= tolerance * mean for v in values)


async def measure_level(port: int, requests: list[bytes], rate: float, args) -> tuple[dict, Recorder]:
    """One level, as one window or (``--max-windows`` > 1) as windows of ``--duration`` seconds repeated
    until the last ``--stable-windows`` agree on goodput within ``--stable-pct`` percent of their mean,
    or ``--max-windows`` have run (the rule of Triton's perf_analyzer). Each window draws its own
    arrivals. The level reported is the last window, with goodput, achieved rate and p99 replaced by
    the medians of the last ``--stable-windows`` windows."""
    import statistics

    if args.max_windows <= 1:
        return await run_level(port, requests, rate, args)
    need, windows = args.stable_windows, []
    for w in range(args.max_windows):
        window_args = argparse.Namespace(**{**vars(args), "seed": args.seed * 1000 + w})
        level, rec = await run_level(port, requests, rate, window_args)
        windows.append(level)
        if len(windows) >= need and stable([x["goodput_rps"] for x in windows[-need:]], args.stable_pct / 100):
            break
    last = windows[-need:]
    level = {**level, **{k: statistics.median(x[k] for x in last) for k in ("goodput_rps", "achieved_rps", "p99_ms")}}
    level.update(windows=len(windows), stable=stable([x["goodput_rps"] for x in last], args.stable_pct / 100),
                 window_goodput_rps=[x["goodput_rps"] for x in windows], window_p99_ms=[x["p99_ms"] for x in windows])
    return level, rec


async def run(args) -> dict:
    ready = await get_json(args.port, "/ready")
    requests = build_requests(args.port, ready["n_features"], args.payload, args.rows, 64, args.seed)
    if args.warmup > 0:  # connections, server caches and this process's code paths, not recorded
        warm = argparse.Namespace(**{**vars(args), "duration": args.warmup, "mode": "open"})
        await run_level(args.port, requests, min(*args.rates, 200.0), warm)
    levels, timeline = [], None
    for rate in args.rates:
        level, rec = await measure_level(args.port, requests, rate, args)
        levels.append(level)
        if args.timeline:
            t0 = rec.intended[0] if rec.intended else 0.0
            start = rec.sent if args.mode == "closed" else rec.intended
            timeline = {"due_s": [t - t0 for t in rec.intended], "sent_s": [t - t0 for t in rec.sent],
                        "latency_ms": [1e3 * (d - s) for d, s in zip(rec.done, start)], "status": rec.status}
        if args.stop_p50_ms and not level["p50_ms"] <= args.stop_p50_ms:
            break  # past the knee for most requests, not just the tail: more load only adds queueing
        await asyncio.sleep(args.pause)
    return {"mode": args.mode, "payload": args.payload, "connections": args.connections, "levels": levels,
            "timeline": timeline, "server": {k: ready[k] for k in ("model_version", "max_batch", "max_wait_ms")}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Open-loop HTTP load generator for app.py (127.0.0.1 only).")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rates", default="100,200", help="offered loads in requests/s, comma separated")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per load level")
    parser.add_argument("--mode", choices=("open", "closed"), default="open")
    parser.add_argument("--arrivals", choices=("uniform", "poisson", "bursty"), default="uniform",
                        help="open loop: when requests fall due (poisson and bursty are seeded by --seed)")
    parser.add_argument("--target-ms", type=float, default=math.inf,
                        help="latency target: goodput counts the 200s answered within it")
    parser.add_argument("--connections", type=int, default=64, help="keep-alive connections (closed: workers)")
    parser.add_argument("--payload", choices=("json", "binary"), default="json")
    parser.add_argument("--rows", type=int, default=1, help="rows per request")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds before a request counts as lost")
    parser.add_argument("--max-requests", type=int, default=20_000, help="cap per level")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds of unrecorded load first")
    parser.add_argument("--pause", type=float, default=0.2, help="seconds between levels")
    parser.add_argument("--stop-p50-ms", type=float, default=0.0,
                        help="end the sweep after the first level whose median latency exceeds this (0: never)")
    parser.add_argument("--timeline", action="store_true", help="include per-request times of the last level")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                        help="the generator's own event loop (uvloop: less client CPU per request)")
    parser.add_argument("--max-windows", type=int, default=1,
                        help="repeat each level in windows of --duration s until stable, at most this many")
    parser.add_argument("--stable-windows", type=int, default=3, help="how many last windows must agree")
    parser.add_argument("--stable-pct", type=float, default=10.0,
                        help="they agree when each goodput is within this percent of their mean")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",")]
    if not all(r > 0 for r in args.rates) or args.duration <= 0 or args.connections < 1:
        parser.error("rates, duration and connections must be positive")
    if args.max_windows > 1 and not 1 <= args.stable_windows <= args.max_windows:
        parser.error("--stable-windows must be between 1 and --max-windows")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.loop == "uvloop":
        import uvloop

        result = uvloop.run(run(args))
    else:
        result = asyncio.run(run(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
