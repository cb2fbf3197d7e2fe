"""Data-parallel training of a small regressor: DDP or FSDP2 under torchrun, or alone.

Why a file and not a notebook cell: torchrun starts this script as several separate
processes (one per CPU worker or GPU) and restarts them when one dies; a cell cannot be
a worker. The chapter launches it and parses the last line it prints, one JSON object
with the results. Only rank 0 prints and writes (the marker of --pause-at-step, written
by the rank about to be killed, is the one exception). Checkpoints go to
RUN_DIR/checkpoint-STEP.pt, the newest --keep of them kept, each with a SHA-256 digest; a
restart resumes from the newest that verifies. A NaN or infinite loss stops the run with
an error and no final.pt; a worker whose torchrun agent dies exits instead of training on.

Launch lines, from this folder (the chapter adds --run-dir artifacts/NAME):

    python train_ddp.py                                  # one process, no torchrun
    python -m torch.distributed.run --nproc-per-node 2 --master-addr 127.0.0.1 \\
        --master-port 29500 train_ddp.py                 # 2 CPU workers over gloo
    python -m torch.distributed.run --nproc-per-node gpu --master-addr 127.0.0.1 \\
        --master-port 29500 train_ddp.py                 # one worker per GPU, NCCL
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 python -m torch.distributed.run \\
        --nproc-per-node 2 --max-restarts 1 --rdzv-backend c10d \\
        --rdzv-endpoint 127.0.0.1:29500 --rdzv-id job --local-addr 127.0.0.1 \\
        train_ddp.py --run-dir artifacts/ft              # restart, resume after a crash
    python -m torch.distributed.run ... train_ddp.py --shard   # FSDP2 instead of DDP
    python -m torch.distributed.run --nnodes 2 --node-rank R --nproc-per-node 1 \\
        --rdzv-endpoint HOST:29500 train_ddp.py          # on each machine, R = 0 and 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps (default 40)")
    p.add_argument("--global-batch", type=int, default=64,
                   help="samples per step over all workers (default 64)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=1024, help="size of the data set")
    p.add_argument("--hidden", type=int, default=64, help="width of the hidden layers")
    p.add_argument("--shard", action="store_true", help="FSDP2 (fully_shard), not DDP")
    p.add_argument("--dcp", action="store_true",
                   help="sharded checkpoints with torch.distributed.checkpoint: every rank "
                        "writes its own shards to RUN_DIR/dcp-STEP/ (resumable at any world size)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="end after this many steps, as a preempted job (no final.pt)")
    p.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP bucket size")
    p.add_argument("--device", choices=["auto", "cpu"], default="auto",
                   help="auto: CUDA and NCCL when every local worker has a GPU of its own, "
                        "else CPU and gloo; cpu: always CPU and gloo")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="where rank 0 writes checkpoint-STEP.pt, losses.jsonl and final.pt")
    p.add_argument("--ckpt-every", type=int, default=10,
                   help="checkpoint every N steps (0: never; needs --run-dir)")
    p.add_argument("--keep", type=int, default=3,
                   help="checkpoints kept, newest first (default 3): the fall-backs")
    p.add_argument("--pause-at-step", type=int, default=None,
                   help="fault injection: on the first attempt the last rank writes "
                        "its pid to RUN_DIR/fault.pid at this step and waits to be killed")
    p.add_argument("--pause-timeout", type=float, default=60.0,
                   help="seconds to wait there before giving up and going on")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)  # before the heavy imports, so --help answers at once
    sys.path.insert(0, str(HERE))
    import ddp_core as core

    cfg = core.Config(steps=args.steps, global_batch=args.global_batch, lr=args.lr,
                      seed=args.seed, samples=args.samples, hidden=args.hidden)
    env = core.setup(cpu=args.device == "cpu")
    try:
        return run(args, cfg, env, core)
    finally:
        core.teardown()


def pause_for_the_killer(args, env) -> None:
    """Fault injection: the last rank stops at --pause-at-step, on the first attempt."""
    marker = args.run_dir / "fault.pid"
    marker.with_suffix(".tmp").write_text(str(os.getpid()))
    marker.with_suffix(".tmp").replace(marker)  # the reader never sees half a pid
    deadline = time.monotonic() + args.pause_timeout
    while time.monotonic() < deadline:
        time.sleep(0.01)
    print(f"rank {env.rank}: not killed in {args.pause_timeout} s; going on", flush=True)


def run(args, cfg, env, core) -> dict:
    import torch

    t0 = time.perf_counter()
    if args.run_dir is not None and env.rank == 0:
        args.run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = args.run_dir if args.run_dir and args.ckpt_every else None
    resumed = {"path": None, "skipped": []}

    def before_step(step: int) -> None:
        if (step == args.pause_at_step and env.rank == env.world - 1
                and env.attempt == 0 and args.run_dir is not None):
            pause_for_the_killer(args, env)

    def log(step: int, loss: float) -> None:  # appends: a killed attempt's lines stay
        if env.rank == 0 and args.run_dir is not None:
            line = {"attempt": env.attempt, "step": step, "loss": loss}
            with open(args.run_dir / "losses.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
        if env.rank == 0 and args.ckpt_every and (step + 1) % args.ckpt_every == 0:
            print(f"step {step + 1:4d}  loss {loss:.4f}", flush=True)

    model, opt, start, losses = core.train(
        cfg, env, shard=args.shard, bucket_cap_mb=args.bucket_cap_mb, ckpt_dir=ckpt_dir,
        ckpt_every=args.ckpt_every, keep=args.keep, before_step=before_step, log=log,
        resumed=resumed, sharded_ckpt=args.dcp, stop_at=args.stop_at)
    if env.rank == 0:
        for name, why in resumed["skipped"]:
            print(f"resume: skipped {name}: {why}", file=sys.stderr, flush=True)
        if resumed["path"]:
            print(f"resume: from {resumed['path']} (step {start})", file=sys.stderr, flush=True)
    msd, _ = core.get_full_state(model, opt, args.shard)
    optim_state = [t for s in opt.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor) and t.dim() > 0]
    import resource  # the process's peak resident set: what the OS gave it, all of torch included

    mine = {"params": core.local_bytes(model.parameters()),
            "grads": core.local_bytes(p.grad for p in model.parameters() if p.grad is not None),
            "optim": core.local_bytes(optim_state),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "pid": os.getpid(), "threads": torch.get_num_threads()}
    sharded_on_cpu = args.shard and env.world > 1 and env.device.type == "cpu"
    probes = core.fsdp_cpu_probes() if sharded_on_cpu else None  # every rank takes part
    ranks = [mine]
    if env.world > 1:
        ranks = [None] * env.world
        torch.distributed.all_gather_object(ranks, mine)
    if env.rank != 0:
        return {}
    finished = start + len(losses) == cfg.steps
    if args.run_dir is not None and finished:
        core.save_checkpoint(dict(msd), args.run_dir / "final.pt")
    result = {
        "world": env.world,
        "backend": torch.distributed.get_backend() if env.world > 1 else "none",
        "strategy": ("fsdp2" if args.shard else "ddp") if env.world > 1 else "single",
        "attempt": env.attempt, "start_step": start, "steps": cfg.steps,
        "resumed_from": resumed["path"], "skipped": resumed["skipped"],
        "saved_by_world": resumed.get("saved_by"), "end_step": start + len(losses),
        "global_batch": cfg.global_batch,
        "last_loss": losses[-1][1] if losses else None,
        "full_loss": core.full_dataset_loss(msd, cfg),
        "param_bytes": [r["params"] for r in ranks],
        "optim_bytes": [r["optim"] for r in ranks],
        "grad_bytes": [r["grads"] for r in ranks],
        "peak_rss_mb": [r["peak_rss_mb"] for r in ranks],
        "full_param_bytes": sum(v.numel() * v.element_size() for v in msd.values()),
        "pids": [r["pid"] for r in ranks], "threads": [r["threads"] for r in ranks],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "fsdp_cpu_probes": probes, "wall_s": time.perf_counter() - t0,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
