"""The chapter's ONNX model behind Ray Serve, with Serve's own ``@serve.batch``: a real serving engine
measured beside the hand-built server of app.py.

Why a file and not a cell: Ray starts a cluster of processes (gcs_server, raylet, its agents, the Serve
controller, an HTTP proxy and the replicas), and its driver must own them and shut them down. Run as
its own process, this driver keeps Ray's imports and threads out of the notebook's kernel, and one
``finally`` stops everything it started: on a normal exit, on SIGTERM and on an error. The Ray
processes it starts share its fate on Linux, so a killed driver takes them with it.

The replica reuses app.py's contract: the same strict JSON and binary parsing, the same 4xx messages,
the same range check from ``model.json``, the same ``/ready`` and ``/stats`` fields the load generator
reads. What Serve replaces is the rest: HTTP (its proxy), routing to replicas and batching.

Launch from this folder (offline, no dashboard, 2 CPUs, the proxy on 127.0.0.1)::

    python ray_serve_app.py --port 8000 --replicas 1
    # then, on stdin: "scale 2" re-deploys with two replicas; "stop" (or EOF, or SIGTERM) shuts Ray down

The driver prints one JSON line each time the deployment is ready (port, replicas, seconds to start
Ray and to deploy) and a last one when Ray is shut down. ``python ray_serve_app.py --write-config
serve_config.yaml`` writes the ``serve run`` / ``serve deploy`` config file of the same application
for a Ray cluster (see the chapter for the commands). No GPU path: the model runs on ONNX Runtime's
CPU provider, one thread per replica.
"""

import argparse
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
HOST = "127.0.0.1"
MAX_BATCH_ROWS = 32  # as the hand-built server: up to 32 rows per model call ...
MAX_WAIT_S = 0.002  # ... waiting at most 2 ms for the batch to fill
MAX_ONGOING = 64  # requests one replica holds at once (Serve's default, 5, would cap a batch at 5)


def free_port() -> int:
    """A port nobody listens on right now on 127.0.0.1 (as server_process.free_port)."""
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _die_with_parent():  # in the child between fork and exec: SIGTERM when the caller dies (Linux)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _rows(items) -> int:  # @serve.batch counts rows, not requests, like app.py's batcher
    return sum(len(x) for x in items)


class DigitsModel:
    """One Serve replica: app.py's model and request parsing, Serve's batching. Plain ``__call__``
    with a Starlette request, no FastAPI: the proxy already did the HTTP."""

    def __init__(self, model_path: str, max_batch_rows: int = MAX_BATCH_ROWS, max_wait_s: float = MAX_WAIT_S):
        import numpy as np

        import app as handbuilt  # this folder, on the workers' PYTHONPATH

        _wrap_batch()  # in the replica's process too: the class arrives there by import, undecorated

        self.app, self.np = handbuilt, np
        self.model = handbuilt.Model.load(model_path, threads=1)
        self.settings = handbuilt.Settings()
        self.request_model = handbuilt.make_request_model(self.model.n_features, self.settings.max_rows)
        self.describe = {"model": self.model.meta["name"], "model_version": str(self.model.meta["version"])}
        self.stats = {"requests": 0, "rows": 0, "batches": 0, "gc_pause_s": 0.0}
        self.predict_batch.set_max_batch_size(max_batch_rows)
        self.predict_batch.set_batch_wait_timeout_s(max_wait_s)
        self.max_batch_rows, self.max_wait_s = max_batch_rows, max_wait_s
        self.model.predict(np.zeros((max_batch_rows, self.model.n_features), np.float32))  # warm up

    async def predict_batch(self, xs: list) -> list:
        """One model call for the rows of several requests; each request gets its own labels back.
        Serve's ``@serve.batch`` wraps this (see ``_wrap_batch``): callers pass one array each."""
        np = self.np
        labels = self.model.predict(np.concatenate(xs))  # on the replica's event loop: ~0.1 ms a batch
        self.stats["batches"] += 1
        self.stats["rows"] += len(labels)
        return np.split(labels, np.cumsum([len(x) for x in xs])[:-1])

    def _run_alone(self, x):
        labels = self.model.predict(x)
        self.stats["batches"] += 1
        self.stats["rows"] += len(labels)
        return labels

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        path = request.url.path.rstrip("/")
        if request.method == "GET" and path == "/ready":
            return JSONResponse({"ready": True, **self.describe, "max_batch": self.max_batch_rows,
                                 "max_wait_ms": 1e3 * self.max_wait_s, "n_features": self.model.n_features,
                                 "engine": "ray serve", "replica_pid": os.getpid()})
        if request.method == "GET" and path == "/stats":  # this replica's counters (one of N)
            return JSONResponse({**self.stats, "cpu_s": time.process_time(), "replica_pid": os.getpid(), **self.describe})
        if request.method != "POST" or path != "/predict":
            return JSONResponse({"error": f"no route {request.method} {path or '/'}", "details": []}, status_code=404)
        try:
            x = await self._parse(request)
            if len(x) > self.max_batch_rows:  # Serve's batcher fails (500) on one item larger than a batch:
                labels = self._run_alone(x)  # run it as its own model call, as app.py's batcher does
            else:
                labels = await self.predict_batch(x)
        except self.app.RequestError as exc:
            return JSONResponse({"error": exc.message, "details": exc.details, **self.describe}, status_code=exc.status)
        self.stats["requests"] += 1
        return JSONResponse({"labels": labels.tolist(), **self.describe})

    async def _parse(self, request):
        app, limit = self.app, self.settings.max_body_bytes
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in app.JSON_TYPES + app.BINARY_TYPES:
            raise app.RequestError(415, f"content-type must be application/json or application/octet-stream, "
                                        f"got {kind or 'none'!r}")
        body = await app.read_body(request, limit)
        n, max_rows = self.model.n_features, self.settings.max_rows
        x = (app.parse_json(body, self.request_model, n, max_rows) if kind in app.JSON_TYPES
             else app.parse_binary(body, n, max_rows))
        self.model.check_range(x)
        return x


def _wrap_batch():
    """Decorate ``DigitsModel.predict_batch`` with Serve's batcher (done here, so that importing this module
    for --help or for the tests' in-process checks needs no Ray)."""
    from ray import serve

    if not hasattr(DigitsModel.predict_batch, "__wrapped__"):  # once per process; the same name, so that
        DigitsModel.predict_batch = serve.batch(  # Serve recognises the method and passes self through
            max_batch_size=MAX_BATCH_ROWS, batch_wait_timeout_s=MAX_WAIT_S, batch_size_fn=_rows)(DigitsModel.predict_batch)
    return serve


def build(model_path: str, replicas: int = 1, cpus_per_replica: float = 1.0):
    """The Serve application: ``replicas`` copies of the model, each reserving ``cpus_per_replica``."""
    serve = _wrap_batch()
    deployment = serve.deployment(DigitsModel, name="digits", num_replicas=replicas,
                                  max_ongoing_requests=MAX_ONGOING,
                                  ray_actor_options={"num_cpus": cpus_per_replica})  # one ORT thread: Model.load
    return deployment.bind(str(model_path))


def app_builder(args: dict):
    """The entry point ``serve run`` / ``serve deploy`` import (``ray_serve_app:app_builder``), with the
    model path and replica count from the config file's ``args``."""
    return build(args["model_path"], int(args.get("replicas", 1)), float(args.get("cpus_per_replica", 1.0)))


def serve_config(model_path: str, replicas: int, port: int = 8000, host: str = "0.0.0.0") -> dict:
    """The config file of ``serve deploy`` for a cluster: the same application, ``replicas`` copies.
    ``serve deploy`` accepts only remote URIs or ``local://`` folders as code: this one says that every
    node has this folder (app.py and this file) and the model at the same paths, as a clone of the
    repository or a container image would give it."""
    return {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port},
            "applications": [{"name": "digits", "route_prefix": "/", "import_path": "ray_serve_app:app_builder",
                              "runtime_env": {"working_dir": f"local://{HERE.resolve()}"},
                              "args": {"model_path": str(model_path), "replicas": replicas},
                              "deployments": [{"name": "digits", "num_replicas": replicas,
                                               "max_ongoing_requests": MAX_ONGOING}]}]}


def check_config(config: dict) -> dict:
    """Validate a config with Ray Serve's own schema (the one ``serve deploy`` applies)."""
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(config).model_dump(exclude_unset=True)


def ray_start_command(gcs_port: int, temp_dir: str, num_cpus: int = 2) -> list[str]:
    """``ray start --head`` for one machine, offline: no dashboard, no autoscaler monitor, no log monitor,
    no usage stats, every port on 127.0.0.1 picked free (52365 and 10001 are Ray's fixed defaults). It
    returns once the node is up; its processes run on without it (``--block`` would keep a 150 MiB
    Python process alive only to watch them)."""
    # Beside this Python in a virtual environment (whose bin/ may not be on PATH); on PATH where pip
    # puts scripts elsewhere (Colab: /usr/bin/python3, /usr/local/bin/ray).
    beside = Path(sys.executable).parent / "ray"
    ray_cli = str(beside) if beside.is_file() else shutil.which("ray")
    if ray_cli is None:
        raise RuntimeError(f"no `ray` command beside {sys.executable} or on PATH: pip install ray[serve]")
    return [ray_cli, "start", "--head", "--node-ip-address", HOST, "--port", str(gcs_port),
            "--num-cpus", str(num_cpus), "--include-dashboard=false", "--no-monitor", "--include-log-monitor=false",
            "--disable-usage-stats", "--temp-dir", temp_dir, "--ray-client-server-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port())]


def connect(address: str):
    """Attach this driver to the running Ray at ``address`` (the head started by ``ray start``)."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray

    ray.init(address=address, log_to_driver=False, configure_logging=False)
    return ray


def start_local_ray(temp_dir: str, num_cpus: int = 2):
    """No --address: a Ray owned by this driver (ray.init), which also starts Ray's monitor and log monitor."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=temp_dir, _node_ip_address=HOST,
             log_to_driver=False, configure_logging=False)
    return ray


def wait_ready(port: int, replicas: int, timeout: float = 60.0) -> None:
    """Until /ready answers 200 through the proxy and ``replicas`` different replicas have answered it."""
    import httpx

    deadline, seen = time.monotonic() + timeout, set()
    while time.monotonic() < deadline:
        try:
            reply = httpx.get(f"http://{HOST}:{port}/ready", timeout=2)
            if reply.status_code == 200:
                seen.add(reply.json()["replica_pid"])
                if len(seen) >= replicas:
                    return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"Ray Serve not ready on port {port} after {timeout} s (replicas seen: {len(seen)})")


class RayServeProcess:
    """Ray Serve on this machine, started by the caller, which never imports Ray.

    ``start()`` runs ``ray start --head`` (the head node of a one-machine cluster) and this
    file's driver with ``--address``, which deploys and reports; ``scale(n)`` has the driver re-deploy
    with n replicas; ``detach()`` lets the driver go (the application keeps serving, as on a cluster);
    ``stop()`` ends the driver with ``serve.shutdown()`` if it is still there, then stops the head the way
    ``ray stop`` does (SIGTERM, then SIGKILL after 1 s), limited to this node's processes, and reports any that
    survived. The node's daemons are not children of the caller: a caller killed with SIGKILL leaves
    them running (``ray stop`` ends them), which is why the chapter stops Ray in a ``finally``."""

    def __init__(self, model_path, replicas: int = 1, port: int | None = None, num_cpus: int = 2):
        self.replicas, self.model_path = replicas, str(model_path)
        self.port, self.gcs_port = port or free_port(), free_port()
        self.url, self.address = f"http://{HOST}:{self.port}", f"{HOST}:{self.gcs_port}"
        self.temp_dir = tempfile.mkdtemp(prefix="gr07-ray-", dir="/tmp")  # unix sockets need a short path
        self.head = self.driver = None
        self.events, self.seen_pids = [], set()
        self.token = secrets.token_hex(32)  # Ray 2.5x+ authenticates every RPC: one token for head and driver

    def _popen(self, command: list[str], log_name: str, **kwargs):
        import subprocess

        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
        with open(Path(self.temp_dir) / log_name, "ab") as log:
            return subprocess.Popen(command, cwd=HERE, env=env, stderr=log, preexec_fn=_die_with_parent,
                                    stdout=kwargs.pop("stdout", log), **kwargs)

    def log_tail(self, lines: int = 20) -> str:
        tails = []
        for name in ("head.log", "driver.log"):
            path = Path(self.temp_dir) / name
            if path.exists():
                tails += [f"--- {name}", *path.read_text(errors="replace").splitlines()[-lines:]]
        return "\n".join(tails)

    def _read_event(self, timeout: float) -> dict:
        import select

        if not select.select([self.driver.stdout], [], [], timeout)[0]:
            raise TimeoutError(f"no answer from the Ray driver in {timeout} s:\n{self.log_tail()}")
        line = self.driver.stdout.readline()
        if not line:
            raise RuntimeError(f"the Ray driver exited with {self.driver.wait()}:\n{self.log_tail()}")
        self.events.append(json.loads(line))
        self.seen_pids |= {p.pid for p in self.processes()}
        return self.events[-1]

    def start(self, timeout: float = 120.0) -> dict:
        import subprocess

        t0 = time.perf_counter()
        try:
            self.head = self._popen(ray_start_command(self.gcs_port, self.temp_dir), "head.log")
            # the driver at once: its ray.init waits for the head's GCS, and its imports overlap the start
            self.driver = self._popen([sys.executable, str(HERE / "ray_serve_app.py"), "--address", self.address,
                                       "--port", str(self.port), "--replicas", str(self.replicas),
                                       "--model-path", self.model_path], "driver.log",
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            event = self._read_event(timeout)
            if self.head.wait(timeout) != 0:
                raise RuntimeError(f"ray start failed:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise
        event["start_to_ready_s"] = time.perf_counter() - t0
        return event

    def _command(self, line: str) -> None:
        self.driver.stdin.write(line + "\n")
        self.driver.stdin.flush()

    def scale(self, replicas: int, timeout: float = 120.0) -> dict:
        self._command(f"scale {replicas}")
        return self._read_event(timeout)

    def detach(self, timeout: float = 30.0) -> dict:
        """The driver disconnects and exits; Serve keeps the application running without it."""
        self._command("detach")
        out, _ = self.driver.communicate(timeout=timeout)
        return json.loads(out.strip().splitlines()[-1])

    def processes(self) -> list:
        """The driver and every process of this Ray node: the ones whose command line names this node's
        session folder (gcs_server, raylet, the API server, the client server) and everything under them
        (agents, the Serve controller, the proxy, the replicas, idle workers)."""
        import psutil

        roots = [p for p in psutil.process_iter() if self._ours(p)]
        if self.driver is not None and self.driver.poll() is None:
            roots.append(psutil.Process(self.driver.pid))
        out = {}
        for root in roots:
            try:
                for p in (root, *root.children(recursive=True)):
                    out[p.pid] = p
            except psutil.Error:
                pass
        return list(out.values())

    def _ours(self, p) -> bool:
        import psutil

        try:
            return any(self.temp_dir in part for part in p.cmdline())
        except psutil.Error:
            return False

    def name_of(self, p) -> str:
        cmd = p.cmdline()
        if self.driver is not None and p.pid == self.driver.pid:
            return "driver (ray_serve_app.py)"
        if cmd and cmd[0].startswith("ray::"):
            title = cmd[0].split()[0]
            return "ray::ServeReplica" if title.startswith("ray::ServeReplica") else title
        if any("ray.util.client.server" in c for c in cmd):
            return "Ray Client server"
        return Path(next((c for c in cmd if c.endswith((".py", "gcs_server", "raylet"))), cmd[0] if cmd else "?")).name

    def pss_by_process(self) -> dict:
        """PSS in MiB, summed by process kind (two replicas are one row)."""
        import collections

        import psutil

        out = collections.Counter()
        for p in self.processes():
            try:
                out[self.name_of(p)] += p.memory_full_info().pss / 2**20
            except psutil.Error:
                continue
        return dict(out)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of every process under the head (not the driver)."""
        import psutil

        total = 0.0
        for p in self.processes():
            try:
                if self.driver is None or p.pid != self.driver.pid:
                    t = p.cpu_times()
                    total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def stop(self, timeout: float = 30.0) -> dict:
        import psutil
        import subprocess

        result, t0 = {}, time.perf_counter()
        self.seen_pids |= {p.pid for p in self.processes()}
        if self.driver is not None and self.driver.poll() is None:
            try:  # serve.shutdown() while the driver is there to run it
                self._command("stop")
                out, _ = self.driver.communicate(timeout=timeout)
                result = json.loads(out.strip().splitlines()[-1])
            except (subprocess.TimeoutExpired, BrokenPipeError, ValueError, IndexError):
                self.driver.kill()
                self.driver.wait(10)
        procs = [p for p in self.processes() if p.pid != getattr(self.driver, "pid", None)]
        for p in reversed(procs):  # what `ray stop` does, to these processes only
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, survivors = psutil.wait_procs(procs, timeout=1)  # Serve is already down
        for p in survivors:
            try:
                p.kill()
            except psutil.Error:
                pass
        if self.head is not None and self.head.poll() is None:
            self.head.kill()
            self.head.wait(10)
        deadline, alive = time.monotonic() + 10, []
        while time.monotonic() < deadline:
            alive = [pid for pid in self.seen_pids if psutil.pid_exists(pid)
                     and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
            if not alive:
                break
            time.sleep(0.2)
        if not alive:
            import shutil

            shutil.rmtree(self.temp_dir, ignore_errors=True)  # Ray's session logs, sockets and spill folder
        return {**result, "stop_s": time.perf_counter() - t0, "left_alive": alive, "killed": len(survivors)}

    def __enter__(self) -> "RayServeProcess":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the digits model with Ray Serve (127.0.0.1 only).")
    parser.add_argument("--port", type=int, default=8000, help="the Serve HTTP proxy's port")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--address", default="", help="a running Ray (ray start --head); default: start one here")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs a Ray started here may schedule on")
    parser.add_argument("--model-path", default="", help="ONNX file (default: chapter 06's ensure_serving_model())")
    parser.add_argument("--temp-dir", default="", help="session folder of a Ray started here (default: new, /tmp)")
    parser.add_argument("--write-config", default="", help="write the serve deploy config here and exit")
    args = parser.parse_args(argv)

    import app as handbuilt

    model_path = args.model_path or str(handbuilt.load_export_module().ensure_serving_model())
    if args.write_config:
        import yaml

        config = serve_config(model_path, args.replicas)
        check_config(config)
        Path(args.write_config).write_text(yaml.safe_dump(config, sort_keys=False))
        print(json.dumps({"config": args.write_config, "valid": True}))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # SIGTERM runs the finally below
    t0 = time.perf_counter()
    if args.address:
        ray = connect(args.address)
    else:
        ray = start_local_ray(args.temp_dir or tempfile.mkdtemp(prefix="gr07-ray-", dir="/tmp"), args.num_cpus)
    stop_serve = not args.address  # a Ray we own goes down with us; on a cluster the app outlives the driver
    from ray import serve

    try:
        connected = time.perf_counter()
        serve.start(http_options={"host": HOST, "port": args.port})
        replicas = args.replicas
        while True:
            t1 = time.perf_counter()
            serve.run(build(model_path, replicas), name="digits", route_prefix="/", blocking=False)
            wait_ready(args.port, replicas)
            print(json.dumps({"port": args.port, "replicas": replicas, "driver_pid": os.getpid(),
                              "connect_s": connected - t0, "deploy_s": time.perf_counter() - t1}), flush=True)
            command = sys.stdin.readline().split()  # "scale N", "detach", "stop" or EOF (= stop)
            if command[:1] != ["scale"]:
                stop_serve = stop_serve or command[:1] != ["detach"]
                break
            replicas = int(command[1])
    except BaseException:
        stop_serve = True  # a half-deployed application is not left behind
        raise
    finally:
        t2 = time.perf_counter()
        try:
            if stop_serve:
                serve.shutdown()
        finally:
            ray.shutdown()  # the Ray this driver started; only a disconnect with --address
        print(json.dumps({"shutdown_s": time.perf_counter() - t2, "serve_shut_down": stop_serve}), flush=True)


if __name__ == "__main__":
    main()
