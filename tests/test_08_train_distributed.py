"""Chapter 08's companion code: what a reader relies on when training with several processes.

In-process first: checkpoints are atomic and refuse another run's state, the sampler's shards add up
to the one-process batch, and a resumed run sees the same batches. Then real processes: two torchrun
workers end with one process's parameters, and a worker killed with SIGKILL is restarted by torchrun
and resumes to bit-identical parameters. Every script answers --help without importing torch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import NOTEBOOKS, load_module

CHAPTER = NOTEBOOKS / "08-train-distributed"
core = load_module(CHAPTER / "ddp_core.py")
launch = load_module(CHAPTER / "launch.py")
SCRIPTS = ["train_ddp.py", "pitfalls.py", "bench_ddp.py", "slow_save.py"]
FLAGS = ["--steps", 40, "--global-batch", 64, "--ckpt-every", 10, "--device", "cpu"]


class Killed(Exception):
    """Stands in for the process dying at that point."""


def max_gap(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_atomic_save_keeps_the_last_good_checkpoint_when_the_write_dies(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    core.save_checkpoint({"step": 20, "w": torch.ones(3)}, path)

    def crash(*args):
        raise Killed("between writing and renaming")

    monkeypatch.setattr(core.os, "replace", crash)
    with pytest.raises(Killed):
        core.save_checkpoint({"step": 30, "w": torch.zeros(1 << 20)}, path)
    assert torch.load(path, weights_only=True)["step"] == 20
    assert (tmp_path / ".checkpoint.pt.tmp").stat().st_size > 1 << 20  # the partial write went elsewhere


def test_in_place_save_interrupted_leaves_a_corrupt_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    core.save_checkpoint({"step": 20, "w": torch.ones(3)}, path)
    def crash(seconds):
        raise Killed("after the first MiB")

    monkeypatch.setattr(core.time, "sleep", crash)
    with pytest.raises(Killed):  # dies after the first MiB, as slow_save.py does when killed
        core.save_checkpoint({"step": 30, "w": torch.zeros(1 << 20)}, path, atomic=False, chunk_delay_s=1)
    with pytest.raises(RuntimeError, match="zip archive"):
        torch.load(path, weights_only=True)


def test_resume_refuses_a_checkpoint_from_another_run(tmp_path):
    path = tmp_path / "checkpoint.pt"
    core.save_checkpoint({"step": 10, "config": core.asdict(core.Config()), "shard": False}, path)
    assert core.load_checkpoint(path, core.Config())["step"] == 10
    assert core.load_checkpoint(tmp_path / "absent.pt", core.Config()) is None
    with pytest.raises(ValueError, match=r"global_batch: checkpoint 64 vs run 32.*lr: checkpoint 0.05 vs run 0.1"):
        core.load_checkpoint(path, core.Config(global_batch=32, lr=0.1))
    with pytest.raises(ValueError, match="shard: checkpoint False vs run True"):  # DDP state into FSDP2
        core.load_checkpoint(path, core.Config(), shard=True)


def test_global_batch_must_split_evenly():
    with pytest.raises(ValueError, match="does not split evenly over 3 workers"):
        core.make_loader(core.make_data(core.Config()), core.Config(global_batch=64), core.Env(world=3))


def rank_batches(cfg, env, start=0):
    loader, sampler = core.make_loader(core.make_data(cfg), cfg, env)
    return {step: x for step, x, _ in core.batches(loader, sampler, start, cfg.steps)}


@pytest.mark.parametrize("samples", [1024, 1000])
def test_worker_shards_add_up_to_the_one_process_batch(samples):
    cfg = core.Config(samples=samples, steps=40)  # 40 steps cross epoch boundaries (reshuffle)
    one = rank_batches(cfg, core.Env())
    ranks = [rank_batches(cfg, core.Env(rank=r, world=2)) for r in range(2)]
    for step, x in one.items():
        both = torch.cat([ranks[0][step], ranks[1][step]])
        assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, x.tolist())), f"step {step}"


def test_resumed_run_sees_the_same_batches():
    cfg = core.Config(steps=40)
    full, resumed = rank_batches(cfg, core.Env(rank=1, world=2)), rank_batches(cfg, core.Env(rank=1, world=2), start=23)
    assert sorted(resumed) == list(range(23, 40))
    assert all(torch.equal(resumed[s], full[s]) for s in resumed)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_answers_without_importing_torch(script):
    path = CHAPTER / script
    probe = (f"import runpy, sys; sys.argv = [{str(path)!r}, '--help']\n"
             f"try:\n    runpy.run_path({str(path)!r}, run_name='__main__')\n"
             "except SystemExit as e:\n    assert e.code == 0\n"
             "assert 'torch' not in sys.modules, 'torch imported before the flags were parsed'")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage" in done.stdout.lower()


@pytest.mark.parametrize("script", ["train_ddp.py", "pitfalls.py", "bench_ddp.py"])
def test_every_script_that_draws_random_numbers_takes_the_seed_as_a_flag(script):
    module = load_module(CHAPTER / script)  # the chapter passes the book's seed this way
    assert module.parse_args([]).seed == 0 and module.parse_args(["--seed", "7"]).seed == 7


def test_benchmark_measurements_take_turns_round_by_round():
    bench = load_module(CHAPTER / "bench_ddp.py")
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("ddp", "no_sync")}
    medians = bench.time_rounds(fns, bench.parse_args(["--rounds", "3", "--steps", "2"]))
    assert calls[:4] == ["ddp", "ddp", "no_sync", "no_sync"]  # the warm-up calls
    assert calls[4:] == (["ddp"] * 2 + ["no_sync"] * 2) * 3, "load drift must hit both alike"
    assert set(medians) == {"ddp", "no_sync"} and all(m >= 0 for m in medians.values())


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """The uninterrupted two-worker run, shared by the equivalence and the resume test."""
    out = tmp_path_factory.mktemp("ddp")
    result = launch.run(launch.torchrun("train_ddp.py", "--run-dir", out, *FLAGS), timeout=180)
    return result, torch.load(out / "final.pt", weights_only=True)


@pytest.mark.slow
def test_two_workers_end_with_the_parameters_of_one_process(tmp_path, ddp_run):
    ddp, ddp_params = ddp_run
    one = launch.run(launch.single("train_ddp.py", "--run-dir", tmp_path, *FLAGS), timeout=180)
    assert (ddp["world"], ddp["backend"], ddp["threads"], one["world"]) == (2, "gloo", [1, 1], 1)
    one_params = torch.load(tmp_path / "final.pt", weights_only=True)
    initial = core.make_model(core.Config()).state_dict()
    assert max_gap(one_params, ddp_params) < 1e-5
    assert max_gap(one_params, initial) > 1e-2, "the runs must have trained for the comparison to mean anything"
    assert launch.alive(ddp["pids"] + one["pids"]) == [] and launch.stray_processes() == []


@pytest.mark.slow
def test_killed_worker_is_restarted_and_resumes_to_the_same_parameters(tmp_path, ddp_run):
    port = launch.free_port()
    elastic = ("--max-restarts=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
               "--rdzv-id=test", "--local-addr=127.0.0.1")
    cmd = launch.torchrun("train_ddp.py", "--run-dir", tmp_path, "--pause-at-step", 25, *FLAGS, launcher=elastic)
    with launch.running(cmd, {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}) as proc:
        deadline = time.monotonic() + 120
        while not (tmp_path / "fault.pid").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.02)
        victim = int((tmp_path / "fault.pid").read_text())
        os.kill(victim, signal.SIGKILL)
        result, _, err = launch.finish(proc, timeout=180)
    assert f"exitcode: -9) local_rank: 1 (pid: {victim})" in err
    assert (result["attempt"], result["start_step"]) == (1, 20)
    assert max_gap(torch.load(tmp_path / "final.pt", weights_only=True), ddp_run[1]) == 0.0
    assert launch.alive([victim, *result["pids"]]) == [] and launch.stray_processes() == []
