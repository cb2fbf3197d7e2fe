"""Chapter 08's companion code: what a reader relies on when training with several processes.

In-process first: checkpoints are atomic and carry a SHA-256 digest that catches a flipped bit, a
cut or an empty file; the last K are kept and a resume falls back to the newest that verifies; a
checkpoint of another run is refused; a NaN loss stops training; the sampler's shards add up to the
one-process batch at any world size, and a resumed run sees the same batches. Then real processes:
two torchrun workers end with one process's parameters, a worker killed with SIGKILL is restarted
by torchrun and resumes to bit-identical parameters, a damaged run folder resumes to the
uninterrupted weights, a NaN run fails without final.pt, and workers exit when their agent is
killed. Every script answers --help without importing torch.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from conftest import NOTEBOOKS, load_module

CHAPTER = NOTEBOOKS / "08-train-distributed"
core = load_module(CHAPTER / "ddp_core.py")
launch = load_module(CHAPTER / "launch.py")
SCRIPTS = ["train_ddp.py", "pitfalls.py", "bench_ddp.py", "slow_save.py", "hang.py"]
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
    assert core.read_checkpoint(path)["step"] == 20
    assert core.tmp_path(path).stat().st_size > 1 << 20  # the partial write went elsewhere


def test_in_place_save_interrupted_leaves_a_corrupt_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    core.save_checkpoint({"step": 20, "w": torch.ones(3)}, path)
    def crash(seconds):
        raise Killed("after the first MiB")

    monkeypatch.setattr(core.time, "sleep", crash)
    with pytest.raises(Killed):  # dies after the first MiB, as slow_save.py does when killed
        core.save_checkpoint({"step": 30, "w": torch.zeros(1 << 20)}, path, atomic=False, chunk_delay_s=1)
    with pytest.raises(core.CheckpointError, match=r"checkpoint\.pt cannot be read .*zip archive"):
        core.read_checkpoint(path)


def test_resume_refuses_a_checkpoint_from_another_run(tmp_path):
    path = tmp_path / "checkpoint.pt"
    core.save_checkpoint({"step": 10, "config": core.asdict(core.Config()), "shard": False}, path)
    assert core.load_checkpoint(path, core.Config())["step"] == 10
    assert core.load_checkpoint(tmp_path / "absent.pt", core.Config()) is None
    with pytest.raises(ValueError, match=r"global_batch: checkpoint 64 vs run 32.*lr: checkpoint 0.05 vs run 0.1"):
        core.load_checkpoint(path, core.Config(global_batch=32, lr=0.1))
    with pytest.raises(ValueError, match="shard: checkpoint False vs run True"):  # DDP state into FSDP2
        core.load_checkpoint(path, core.Config(), shard=True)


def small_state(step: int, cfg=core.Config()) -> dict:
    model = core.make_model(cfg)
    return {"step": step, "model": model.state_dict(), "optim": {}, "config": core.asdict(cfg), "shard": False}


def flip_one_bit(path, tensor: torch.Tensor) -> None:
    data = bytearray(path.read_bytes())
    at = data.index(tensor.numpy().tobytes()) + 4 * (tensor.numel() // 2)
    data[at] ^= 0x01  # the lowest mantissa bit of one float32 in the middle of the tensor
    path.write_bytes(bytes(data))


def test_a_flipped_bit_is_caught_by_the_digest_though_torch_load_takes_it(tmp_path):
    path = tmp_path / "checkpoint-000010.pt"
    state = small_state(10)
    core.save_checkpoint(state, path)
    flip_one_bit(path, state["model"]["3.weight"])
    silently = torch.load(path, weights_only=True)["model"]  # what resumed before: a different model
    assert 0 < max_gap(silently, state["model"]) < 1e-3
    with pytest.raises(core.CheckpointError, match=r"checkpoint-000010\.pt is corrupt: SHA-256 digest mismatch"):
        core.load_checkpoint(path, core.Config())


def test_edited_metadata_is_caught_by_the_digest(tmp_path):
    path = tmp_path / "checkpoint.pt"
    state = small_state(10)
    core.save_checkpoint(state, path)
    digest = core.read_checkpoint(path)
    fake = {**torch.load(path, weights_only=True), "step": 30}  # a hand-edited step, old digest kept
    torch.save(fake, path)
    assert digest["step"] == 10
    with pytest.raises(core.CheckpointError, match="digest mismatch"):
        core.read_checkpoint(path)


@pytest.mark.parametrize("damage,message", [
    (lambda data: data[: len(data) // 2], r"cannot be read \(\d+ bytes; cut short"),
    (lambda data: data[:100], r"cannot be read \(100 bytes; cut short"),
    (lambda data: b"", r"is empty \(0 bytes\)"),
])
def test_a_torn_checkpoint_gets_an_error_naming_the_file(tmp_path, damage, message):
    path = tmp_path / "checkpoint-000010.pt"
    core.save_checkpoint(small_state(10), path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(core.CheckpointError, match=r"checkpoint-000010\.pt " + message):
        core.load_checkpoint(path, core.Config())


def test_a_checkpoint_without_a_digest_is_refused(tmp_path):
    torch.save(small_state(10), tmp_path / "bare.pt")
    with pytest.raises(core.CheckpointError, match="carries no SHA-256 digest"):
        core.load_checkpoint(tmp_path / "bare.pt", core.Config())


def test_only_the_last_k_checkpoints_are_kept(tmp_path):
    for step in (10, 20, 30, 40):
        core.save_and_prune(small_state(step), tmp_path, keep=3)
    assert [p.name for p in core.checkpoints(tmp_path)] == [f"checkpoint-0000{s}.pt" for s in (40, 30, 20)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"checkpoint-0000{s}.pt" for s in (20, 30, 40)]


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path):
    for step in (20, 30, 40):
        core.save_and_prune(small_state(step), tmp_path)
    flip_one_bit(tmp_path / "checkpoint-000040.pt", small_state(40)["model"]["3.weight"])
    cut = tmp_path / "checkpoint-000030.pt"
    cut.write_bytes(cut.read_bytes()[:-200])
    (tmp_path / "checkpoint-000045.pt").write_bytes(b"")
    stale = core.tmp_path(core.checkpoint_path(tmp_path, 50))
    stale.write_bytes(b"half a write")
    state, path, skipped = core.find_resume(tmp_path, core.Config())
    assert (state["step"], path.name) == (20, "checkpoint-000020.pt")
    why = dict(skipped)
    assert list(why) == [stale.name, "checkpoint-000045.pt", "checkpoint-000040.pt", "checkpoint-000030.pt"]
    assert "interrupted write, removed" in why[stale.name] and "empty" in why["checkpoint-000045.pt"]
    assert "digest mismatch" in why["checkpoint-000040.pt"] and "cannot be read" in why["checkpoint-000030.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-000020.pt", "checkpoint-000030.pt.corrupt", "checkpoint-000040.pt.corrupt",
        "checkpoint-000045.pt.corrupt"], "damaged files moved aside, the stale temporary file gone"
    assert core.find_resume(tmp_path, core.Config())[1].name == "checkpoint-000020.pt"


def test_a_folder_where_nothing_verifies_is_an_error_not_a_fresh_start(tmp_path):
    core.save_checkpoint(small_state(10), core.checkpoint_path(tmp_path, 10))
    core.checkpoint_path(tmp_path, 10).write_bytes(b"")
    with pytest.raises(core.CheckpointError, match=r"no checkpoint in .* verifies: checkpoint-000010\.pt"):
        core.find_resume(tmp_path, core.Config())
    assert core.find_resume(tmp_path / "fresh", core.Config()) == (None, None, [])  # nothing yet: start


def test_another_runs_checkpoint_is_refused_not_skipped(tmp_path):
    core.save_and_prune(small_state(10), tmp_path)
    core.save_and_prune(small_state(20, core.Config(lr=0.1)), tmp_path)
    with pytest.raises(ValueError, match="lr: checkpoint 0.1 vs run 0.05"):
        core.find_resume(tmp_path, core.Config())


def test_a_non_finite_loss_stops_training_before_it_is_saved(tmp_path):
    with pytest.raises(core.NonFiniteError, match=r"step \d+: the loss averaged over 1 rank\(s\) is (inf|nan)"):
        core.train(core.Config(lr=50.0), core.Env(), ckpt_dir=tmp_path, ckpt_every=1)
    assert all(torch.isfinite(t).all() for c in core.checkpoints(tmp_path)
               for t in core.read_checkpoint(c)["model"].values()), "a checkpoint holds NaN or inf"


def test_a_damaged_run_folder_resumes_to_the_uninterrupted_weights(tmp_path):
    """The attack, through the training script itself, as one process."""
    flags = FLAGS
    straight = tmp_path / "straight"
    launch.run(launch.single("train_ddp.py", "--run-dir", straight, *flags))
    attacked = tmp_path / "attacked"
    attacked.mkdir()
    for c in core.checkpoints(straight):
        (attacked / c.name).write_bytes(c.read_bytes())
    newest = core.checkpoints(attacked)[0]
    flip_one_bit(newest, core.read_checkpoint(newest)["model"]["5.weight"])
    result = launch.run(launch.single("train_ddp.py", "--run-dir", attacked, *flags))
    assert (result["start_step"], result["resumed_from"]) == (30, "checkpoint-000030.pt")
    assert [name for name, _ in result["skipped"]] == [newest.name]
    assert max_gap(core.read_checkpoint(attacked / "final.pt"), core.read_checkpoint(straight / "final.pt")) == 0.0


def test_global_batch_must_split_evenly():
    with pytest.raises(ValueError, match="does not split evenly over 3 workers"):
        core.make_loader(core.make_data(core.Config()), core.Config(global_batch=64), core.Env(world=3))


def rank_batches(cfg, env, start=0):
    loader, sampler = core.make_loader(core.make_data(cfg), cfg, env)
    return {step: x for step, x, _ in core.batches(loader, sampler, start, cfg.steps)}


@pytest.mark.parametrize("samples,world", [(1024, 2), (1000, 2), (1024, 4)])
def test_worker_shards_add_up_to_the_one_process_batch(samples, world):
    """What makes a resume at another world size continue the same computation."""
    cfg = core.Config(samples=samples, steps=40)  # 40 steps cross epoch boundaries (reshuffle)
    one = rank_batches(cfg, core.Env())
    ranks = [rank_batches(cfg, core.Env(rank=r, world=world)) for r in range(world)]
    for step, x in one.items():
        every = torch.cat([ranks[r][step] for r in range(world)])
        assert sorted(map(tuple, every.tolist())) == sorted(map(tuple, x.tolist())), f"step {step}"


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


@pytest.mark.parametrize("script", ["train_ddp.py", "pitfalls.py", "bench_ddp.py", "hang.py"])
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
    return result, core.read_checkpoint(out / "final.pt"), out


@pytest.mark.slow
def test_two_workers_end_with_the_parameters_of_one_process(tmp_path, ddp_run):
    ddp, ddp_params, _ = ddp_run
    one = launch.run(launch.single("train_ddp.py", "--run-dir", tmp_path, *FLAGS), timeout=180)
    assert (ddp["world"], ddp["backend"], ddp["threads"], one["world"]) == (2, "gloo", [1, 1], 1)
    one_params = core.read_checkpoint(tmp_path / "final.pt")
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
    assert max_gap(core.read_checkpoint(tmp_path / "final.pt"), ddp_run[1]) == 0.0
    assert launch.alive([victim, *result["pids"]]) == [] and launch.stray_processes() == []


@pytest.mark.slow
def test_a_checkpoint_of_two_workers_resumes_in_one_process(tmp_path, ddp_run):
    """An elastic job that shrinks: the same computation, to rounding, from the same checkpoint."""
    _, ddp_params, out = ddp_run
    (tmp_path / "checkpoint-000020.pt").write_bytes((out / "checkpoint-000020.pt").read_bytes())
    model, _, start, _ = core.train(core.Config(), core.Env(), ckpt_dir=tmp_path)
    assert start == 20 and max_gap(model.state_dict(), ddp_params) < 1e-5


@pytest.mark.slow
def test_a_non_finite_loss_fails_the_torchrun_job_without_final_pt(tmp_path):
    with launch.running(launch.torchrun("train_ddp.py", "--run-dir", tmp_path, *FLAGS, "--lr", 50)) as proc:
        _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0
    assert "NonFiniteError: step" in err and ("rank(s) is inf" in err or "rank(s) is nan" in err), err[-2000:]
    assert not (tmp_path / "final.pt").exists()


@pytest.mark.slow
def test_workers_exit_when_their_torchrun_agent_is_killed(tmp_path):
    cmd = launch.torchrun("train_ddp.py", "--run-dir", tmp_path, "--pause-at-step", 25, *FLAGS)
    with launch.running(cmd) as proc:
        deadline = time.monotonic() + 120
        while not (tmp_path / "fault.pid").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.02)
        workers = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 30
        while launch.alive(workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        err = proc.stderr.read()
    assert len(workers) == 2 and launch.alive(workers) == [], f"orphans still running: {launch.alive(workers)}"
    assert "is gone; exiting" in err  # the first to notice exits; its peer may fail at the next collective
    assert not (tmp_path / "final.pt").exists(), "an orphan finished the job"
    assert launch.stray_processes() == []


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """FSDP2 with sharded (DCP) checkpoints: each of two ranks writes its own shards."""
    out = tmp_path_factory.mktemp("fsdp")
    result = launch.run(launch.torchrun("train_ddp.py", "--run-dir", out, "--shard", "--dcp", *FLAGS), timeout=180)
    return result, core.read_checkpoint(out / "final.pt"), out


@pytest.mark.slow
def test_dcp_saved_by_two_ranks_resumes_with_one_and_with_two_again(tmp_path, fsdp_run, ddp_run):
    """Resharding 2 -> 1 -> 2 through the training script, checked against the unsharded path."""
    fsdp, fsdp_params, out = fsdp_run
    assert fsdp["strategy"] == "fsdp2" and [p.name for p in core.dcp_checkpoints(out)] == [
        "dcp-000040", "dcp-000030", "dcp-000020"], "the newest --keep sharded checkpoints"
    shards = sorted(p.name for p in (out / "dcp-000020").glob("*.distcp"))
    assert len(shards) == 2, f"each rank writes its own shard file: {shards}"
    shutil.copytree(out / "dcp-000020", tmp_path / "dcp-000020")
    alone = launch.run(launch.single("train_ddp.py", "--run-dir", tmp_path, "--shard", "--dcp",
                                     "--stop-at", 30, *FLAGS), timeout=180)
    assert (alone["world"], alone["saved_by_world"], alone["start_step"], alone["end_step"]) == (1, 2, 20, 30)
    assert not (tmp_path / "final.pt").exists(), "a run stopped at 30 of 40 writes no final.pt"
    again = launch.run(launch.torchrun("train_ddp.py", "--run-dir", tmp_path, "--shard", "--dcp", *FLAGS), timeout=180)
    assert (again["world"], again["saved_by_world"], again["start_step"], again["end_step"]) == (2, 1, 30, 40)
    resharded = core.read_checkpoint(tmp_path / "final.pt")
    assert max_gap(resharded, fsdp_params) < 1e-5 and max_gap(resharded, ddp_run[1]) < 1e-5
    initial = core.make_model(core.Config()).state_dict()
    assert max_gap(resharded, initial) > 1e-2, "the run must have trained for the gaps to mean anything"


def damage_shard(folder) -> None:  # one flipped byte in the middle of rank 0's shard file
    shard = folder / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_damaged_dcp_folder_is_skipped_and_a_folder_where_none_verifies_refused(tmp_path, fsdp_run):
    """Through the chapter's own loader (train -> load_dcp), as one process resuming two ranks' shards."""
    _, fsdp_params, out = fsdp_run
    for step in (20, 30, 40):
        shutil.copytree(out / f"dcp-{step:06d}", tmp_path / f"dcp-{step:06d}")
    damage_shard(tmp_path / "dcp-000040")
    (tmp_path / "dcp-000030" / "meta.json").unlink()  # a save that died before rank 0 finished it
    (tmp_path / ".dcp-000050.tmp").mkdir()  # and a temporary folder of one that died earlier
    resumed = {}
    model, _, start, _ = core.train(core.Config(), core.Env(), shard=True, ckpt_dir=tmp_path,
                                    sharded_ckpt=True, resumed=resumed)
    assert (start, resumed["path"], resumed["saved_by"]) == (20, "dcp-000020", 2)
    why = dict(resumed["skipped"])
    assert list(why) == [".dcp-000050.tmp", "dcp-000040", "dcp-000030"], why
    assert "digest mismatch" in why["dcp-000040"] and "is incomplete" in why["dcp-000030"]
    assert not (tmp_path / ".dcp-000050.tmp").exists()
    assert max_gap(model.state_dict(), fsdp_params) < 1e-5, "resumed from the verified step-20 shards"
    damage_shard(tmp_path / "dcp-000020")
    with pytest.raises(core.CheckpointError, match=r"no sharded checkpoint in .* verifies: dcp-000040: .*digest mismatch"):
        core.train(core.Config(), core.Env(), shard=True, ckpt_dir=tmp_path, sharded_ckpt=True)
    shutil.copytree(out / "dcp-000040", tmp_path / "dcp-000040", dirs_exist_ok=True)
    with pytest.raises(ValueError, match=r"dcp-000040 was written by a different run .*'lr': \(0.05, 0.1\)"):
        core.train(core.Config(lr=0.1), core.Env(), shard=True, ckpt_dir=tmp_path, sharded_ckpt=True)


@pytest.mark.parametrize("p", [2, 3, 4, 5])
def test_the_ring_all_reduce_sums_and_sends_2_p_minus_1_over_p_of_the_gradients(p):
    ring = load_module(CHAPTER / "ring.py")
    grads = [torch.randn(p * 3, generator=torch.Generator().manual_seed(w)) for w in range(p)]
    summed, history, sent = ring.ring_all_reduce(grads)
    assert all(torch.allclose(s, sum(grads)) for s in summed)
    assert len(history) == 2 * (p - 1) + 1 and history[p - 1] != history[-1] == [[p] * p] * p
    assert sent == 2 * (p - 1) * grads[0].numel(), "per worker: 2(p-1)/p of M"


def test_the_cost_model_charges_the_ring_and_workers_beyond_the_cores():
    ring = load_module(CHAPTER / "ring.py")
    k = dict(a=2.0, c=0.1, alpha=0.5, beta=2.0, grad_bytes=8_000_000)  # M / beta = 4 ms

    def step(p, cores):
        return ring.step_ms(p, 512, cores=cores, **k)

    assert step(1, 2) == pytest.approx((2.0 + 51.2, 0.0)), "one process pays no all-reduce"
    assert step(2, 2) == pytest.approx((2.0 + 25.6, 2 * 0.5 + 4.0))
    assert step(4, 4) == pytest.approx((2.0 + 12.8, 6 * 0.5 + 1.5 * 4.0))
    assert step(4, 2) == pytest.approx((2 * (2.0 + 12.8), 6 * 0.5 + 1.5 * 4.0)), "2 workers per core"
    assert sum(step(4, 2)) > sum(step(2, 2)), "on 2 cores, 4 workers lose to 2"


@pytest.mark.slow
def test_bench_ddp_at_four_workers_reports_what_the_chapter_reads():
    small = ["--batches", 8, 16, "--hidden", 32, "--rounds", 1, "--steps", 1]
    cmd = launch.torchrun("bench_ddp.py", *small, "--skip-buckets", "--cores", 2, nproc=4,
                          launcher=launch.FORKED)  # as the chapter launches it
    found = launch.run(cmd, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert (found["world"], found["threads"], found["cores"]) == (4, 1, min(2, allowed))
    timed = [f"step_s_b{b}{s}" for b in (8, 16) for s in ("", "_no_sync")]
    timed += ["allreduce_s_grad", "allreduce_s_small"]
    assert all(found[key] > 0 for key in timed), {key: found.get(key) for key in timed}
    assert not [key for key in found if key.startswith("deep_")], "--skip-buckets times no deep model"
    assert len(set(found["pids"])) == 4 and launch.alive(found["pids"]) == []


def test_activation_checkpointing_keeps_what_the_arithmetic_says():
    memory = load_module(CHAPTER / "memory.py")
    ac = memory.activation_checkpointing(0, rounds=1)
    for name in ("plain", "checkpointed"):
        assert 0.9 < ac["kept"][name] / ac["expect"][name] < 1.3, (name, ac)
    assert ac["kept"]["checkpointed"] < 0.6 * ac["kept"]["plain"]


@pytest.mark.slow
def test_each_rank_holds_the_bytes_the_arithmetic_predicts(ddp_run, fsdp_run):
    """Weights, gradients and momentum, 4 bytes per parameter each: all of them under DDP, a
    dim-0 shard under FSDP2, counted from the live tensors of each rank."""
    n = sum(t.numel() for t in core.make_model(core.Config()).state_dict().values())
    ddp, fsdp = ddp_run[0], fsdp_run[0]
    for key in ("param_bytes", "grad_bytes", "optim_bytes"):
        assert ddp[key] == [4 * n, 4 * n], (key, ddp[key])
        assert sum(fsdp[key]) == 4 * n and max(fsdp[key]) < 0.55 * 4 * n, (key, fsdp[key])
    assert all(mb > 0 for mb in ddp["peak_rss_mb"] + fsdp["peak_rss_mb"])


@pytest.mark.slow
def test_a_stalled_worker_times_out_and_the_flight_recorder_names_it():
    recorder = {**os.environ, "TORCH_FR_BUFFER_SIZE": "256"}
    hang = launch.run(launch.torchrun("hang.py", "--timeout-s", 1, "--rounds", 1), timeout=120, env=recorder)
    assert "Timed out waiting 1000ms" in hang["plain"]["error"]
    assert "Ranks 1 failed to pass monitoredBarrier in 1000 ms" in hang["detail"]["error"]
    assert all(hang[n]["waited_s"] >= 1.0 for n in ("plain", "detail")), "no timeout fires early"
    rank0, rank1 = hang["flight_record"]
    assert [e["seq"] for e in rank0] == [1, 2] and [e["seq"] for e in rank1] == [1]
    assert rank0[-1]["op"] == "gloo:all_reduce" and rank0[-1]["sizes"] == [[1000]]
    assert launch.alive(hang["pids"]) == [] and launch.stray_processes() == []


def test_hang_refuses_to_run_without_two_workers():
    done = subprocess.run([sys.executable, str(CHAPTER / "hang.py")], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "needs exactly two workers" in done.stderr
