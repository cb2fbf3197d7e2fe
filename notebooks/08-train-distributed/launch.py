"""Start this chapter's scripts as real processes, read their results, leave none behind.

Not a script: the chapter and the tests import it. It imports no torch, so importing it is
instant. torchrun starts every worker in a session of its own, so killing the launcher's
process group does not reach them: ``stop`` asks the launcher to stop its workers (it does
on SIGTERM), then kills whatever is left of everything the launcher had started.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
STARTED: list[int] = []  # pid of every process start() launched, to check they are gone
#: torchrun flags that fork the workers from the launcher, which imported torch once, instead of
#: starting a fresh interpreter per worker: the workers share those pages until they write them.
#: A forked worker keeps the launcher's torch thread count, so start the launcher itself with
#: OMP_NUM_THREADS set (torchrun sets it only for the workers it starts fresh).
FORKED = ("--run-path", "--start-method=fork")


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, *args, nproc=2, launcher: tuple = (), port=None) -> list[str]:
    """The command line that starts ``script`` as ``nproc`` workers on 127.0.0.1."""
    rdzv = ["--master-addr=127.0.0.1", f"--master-port={port or free_port()}"]
    if any(a.startswith("--rdzv-endpoint") for a in launcher):
        rdzv = []
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            *rdzv, *launcher, str(HERE / script), *map(str, args)]


def single(script: str, *args) -> list[str]:
    """The command line that starts ``script`` as one plain process, without torchrun."""
    return [sys.executable, str(HERE / script), *map(str, args)]


def start(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=env)
    STARTED.append(proc.pid)
    return proc


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop ``proc`` and everything it started: SIGTERM first, then SIGKILL."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=grace)


@contextmanager
def running(cmd: list[str], env: dict | None = None):
    """``with running(cmd) as proc:`` starts cmd; on leaving, nothing it started runs."""
    proc = start(cmd, env)
    try:
        yield proc
    finally:
        stop(proc)


def finish(proc: subprocess.Popen, timeout=120.0, result=True) -> tuple[dict, str, str]:
    """Wait for ``proc``; return (its last JSON line, stdout, stderr); raise on failure.

    ``result=False`` for a launcher without rank 0 (a second node): it prints no JSON.
    """
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        what = " ".join(proc.args[1:6])
        raise RuntimeError(f"{what} ... exited with {proc.returncode}:\n{err[-4000:]}")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not result:
        return {}, out, err
    if not lines:
        raise RuntimeError(f"no JSON result line in:\n{out[-2000:]}\n{err[-2000:]}")
    return json.loads(lines[-1]), out, err


def run(cmd: list[str], timeout: float = 120.0, env: dict | None = None) -> dict:
    """Run ``cmd`` to the end and return its JSON result; nothing it started survives."""
    with running(cmd, env) as proc:
        return finish(proc, timeout)[0]


def alive(pids) -> list[int]:
    """The pids among ``pids`` that still run (a zombie, dead but not reaped, does not)."""
    found = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                found.append(pid)
        except psutil.NoSuchProcess:
            pass
    return found


def stray_processes() -> list[str]:
    """Command lines of live processes running a script from this folder (want: none)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if str(HERE) in cmdline and p.info["pid"] != psutil.Process().pid:
            found.append(f"{p.info['pid']}: {cmdline}")
    return found
