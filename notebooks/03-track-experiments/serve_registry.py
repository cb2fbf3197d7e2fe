"""Serve a registered model by alias in its own process with ``mlflow models serve``, and stop it.

Why a file: the hand-off from the registry to serving is only real when a process that shares
nothing with the chapter's kernel resolves ``models:/<name>@<alias>`` against the store, loads the
version the alias points at, and answers over HTTP. The chapter and
``tests/test_03_track_experiments.py`` both need that process started, polled and stopped with the
same guarantees, so they live here. ``mlflow models serve --env-manager local`` runs in the
current environment (no conda or virtualenv is built, nothing is downloaded); it resolves the alias
once, at start-up, then execs uvicorn with MLflow's scoring app. The two processes run in their own
session, so ``stop()`` signals both, waits for them, and reports any that survived.

Used from the chapter (its folder is the working directory)::

    from serve_registry import AliasServer
    with AliasServer(TRACKING_URI, "models:/digits-mlp@champion", workdir=store) as server:
        logits = server.predict(X_test)      # POST /invocations {"inputs": [...]}
        reply = server.post({"inputs": [[0.0]]})  # a bad body: a 4xx, the server stays up
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HOST = "127.0.0.1"
_RUNNING: set = set()  # servers started and not yet stopped, for the atexit hook


def free_port() -> int:
    """A port nobody listens on now (the OS picks it; a tiny race until the server binds)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _die_with_parent():  # in the child, between fork and exec: a killed kernel takes the server along
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class AliasServer:
    """``mlflow models serve -m <model_uri>`` against ``tracking_uri`` on a free port of 127.0.0.1.

    The server gets one torch thread (``OMP_NUM_THREADS=1``), like the chapter's kernel, so both
    compute the same logits, and MLflow's telemetry is off in it. Its log and the model files MLflow
    copies before loading go to ``workdir`` (a new temporary folder if not given).
    """

    def __init__(self, tracking_uri: str, model_uri: str, *, port: int | None = None,
                 workdir: str | Path | None = None):
        self.model_uri, self.port = model_uri, port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        # the log and the copy of the model's files MLflow downloads (TMPDIR) stay in one folder
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="gr-serve-"))
        self.log_path = self.workdir / f"serve-{self.port}.log"
        bin_dir = str(Path(sys.executable).parent)  # mlflow execs `uvicorn` by name: find this env's
        self.env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_DISABLE_TELEMETRY": "true",
                    "OMP_NUM_THREADS": "1", "TMPDIR": str(self.workdir),
                    "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
        self.command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
                        "--env-manager", "local", "--host", HOST, "--port", str(self.port), "--workers", "1"]
        self.proc: subprocess.Popen | None = None
        self.ready_s: float | None = None

    def start(self, ready_timeout: float = 90.0) -> "AliasServer":
        started = time.perf_counter()
        with open(self.log_path, "wb") as log:  # a file, not a pipe: a full pipe would block the server
            self.proc = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        _RUNNING.add(self)
        try:
            self.wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.perf_counter() - started
        return self

    def wait_ready(self, timeout: float) -> None:
        """Poll ``/ping`` until it answers 200 (the model is loaded before the port opens), the
        process dies, or ``timeout`` seconds pass."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/ping", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.model_uri} not served after {timeout} s:\n{self.log_tail()}")

    def post(self, body, timeout: float = 30.0):
        """POST ``body`` (a JSON-able object, or raw bytes sent as JSON) to ``/invocations``."""
        import httpx

        if isinstance(body, bytes):
            return httpx.post(f"{self.url}/invocations", content=body, timeout=timeout,
                              headers={"content-type": "application/json"})
        return httpx.post(f"{self.url}/invocations", json=body, timeout=timeout)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """The served model's outputs for the rows of ``X``, as float32 (JSON carries them exactly)."""
        reply = self.post({"inputs": np.asarray(X).tolist()})
        reply.raise_for_status()
        return np.asarray(reply.json()["predictions"], dtype=np.float32)

    def processes(self) -> list[int]:
        """Process ids of this server's session that are still running (zombies count as gone)."""
        if self.proc is None:
            return []
        import psutil

        alive = []
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getsid(p.pid) == self.proc.pid and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p.pid)
            except (OSError, psutil.Error):  # ended while we looked
                continue
        return alive

    def stop(self, timeout: float = 10.0) -> dict:
        """SIGTERM to the whole session (the CLI and uvicorn), wait; SIGKILL whatever outlives
        ``timeout``. Returns the CLI's exit code and the processes left (none, or it is a bug)."""
        _RUNNING.discard(self)
        if self.proc is None:
            return {"exit_code": None, "left": []}
        if self.proc.poll() is None or self.processes():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            while (self.proc.poll() is None or self.processes()) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.processes() or self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc.wait(timeout)
        return {"exit_code": self.proc.returncode, "left": self.processes()}

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> "AliasServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


@atexit.register
def stop_all() -> None:
    """Stop every server this module started and has not stopped yet."""
    for server in list(_RUNNING):
        server.stop(timeout=5)
