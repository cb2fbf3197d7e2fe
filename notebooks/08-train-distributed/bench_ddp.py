"""Time a training step: compute against all-reduce, bucket sizes, 1 against 2 and 4 processes.

Why a file and not a cell: communication costs only exist between real worker processes,
and a fair single-process baseline needs a fresh process that sets its own thread count.
This file does both: under torchrun it times DDP; launched alone it times one process at
the thread counts given. Timings are medians of rounds after a warm-up, on the CPU on
purpose (threads and cores are what it compares); measurements that the chapter compares
with each other take turns round by round, so that the load of a shared machine drifting
during the run hits them alike. The last line printed is one JSON object.

Launch lines, from this folder:

    python bench_ddp.py --threads 1 2          # one process, 1 then 2 torch threads
    python -m torch.distributed.run --nproc-per-node 2 --master-addr 127.0.0.1 \\
        --master-port 29500 bench_ddp.py       # 2 workers; torchrun sets OMP_NUM_THREADS=1
    python -m torch.distributed.run --nproc-per-node 4 --master-addr 127.0.0.1 \\
        --master-port 29500 bench_ddp.py --skip-buckets --cores 2   # 4 workers on 2 cores

``--cores N`` pins every process to N of the cores it may use (Linux), so that "4 workers on
2 cores" is the same experiment on a machine with more; the result reports the count in "cores".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[64, 512],
                   help="global batch sizes (samples per step over all workers)")
    p.add_argument("--features", type=int, default=256)
    p.add_argument("--hidden", type=int, default=1024, help="width of the wide model")
    p.add_argument("--depth", type=int, default=48, help="layers of the deep model")
    p.add_argument("--buckets", type=float, nargs="+", default=[0.01, 1.0, 25.0],
                   help="DDP bucket_cap_mb values for the deep model (25: the default)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="thread counts to time (single process only)")
    p.add_argument("--skip-buckets", action="store_true",
                   help="time only the wide model's steps and the two all-reduces (no deep model)")
    p.add_argument("--cores", type=int, default=0,
                   help="pin to this many of the allowed cores (Linux; 0: leave as started)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per measurement")
    p.add_argument("--steps", type=int, default=4, help="steps per round")
    p.add_argument("--seed", type=int, default=0, help="seeds the models' weights and the inputs")
    return p.parse_args(argv)


def make_model(args, deep: bool = False):
    """Wide: 3 hidden layers of ``hidden`` (few, large gradient tensors). Deep: ``depth``
    layers of 128 (many small ones, as in a transformer: then bucketing matters)."""
    import torch

    torch.manual_seed(args.seed)
    width, layers = (128, args.depth) if deep else (args.hidden, 3)
    stack = [torch.nn.Linear(args.features, width), torch.nn.ReLU()]
    for _ in range(layers - 1):
        stack += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*stack, torch.nn.Linear(width, 1))


def time_rounds(fns: dict, args, sync=lambda: None) -> dict:
    """Median seconds per call of each of ``fns``: 2 warm-up calls each, then ``rounds``
    rounds of ``steps`` calls in which the functions take turns, so that a change in the
    machine's load hits every measurement alike instead of the one that ran during it."""
    for fn in fns.values():
        fn(), fn()
    rounds = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            sync()
            rounds[name].append((time.perf_counter() - t0) / args.steps)
    return {name: statistics.median(r) for name, r in rounds.items()}


def step_fn(model, x, y, no_sync=False):
    """One SGD step on (x, y); under ``no_sync`` DDP skips the all-reduce (compute only)."""
    import contextlib

    import torch

    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        with model.no_sync() if no_sync else contextlib.nullcontext():
            torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    return step


def bench_single(args) -> dict:
    import torch

    def with_threads(threads, step):
        def fn():
            torch.set_num_threads(threads)
            step()
        return fn

    fns = {}
    for batch in args.batches:
        x, y = torch.randn(batch, args.features), torch.randn(batch, 1)
        step = step_fn(make_model(args), x, y)
        for threads in args.threads:
            fns[f"step_s_b{batch}_t{threads}"] = with_threads(threads, step)
    return time_rounds(fns, args)


def bench_ddp(args, env, core) -> dict:
    import torch
    import torch.distributed as dist

    found, fns = {"threads": torch.get_num_threads()}, {}
    for batch in args.batches:  # with and without the all-reduce, taking turns
        local = batch // env.world
        x, y = torch.randn(local, args.features), torch.randn(local, 1)
        model = core.wrap(make_model(args), env)
        fns[f"step_s_b{batch}"] = step_fn(model, x, y)
        fns[f"step_s_b{batch}_no_sync"] = step_fn(model, x, y, no_sync=True)
    found.update(time_rounds(fns, args, dist.barrier))
    n_params = sum(p.numel() for p in model.parameters())
    if not args.skip_buckets:
        found.update(bench_buckets(args, env, core, x[: args.batches[0] // env.world],
                                   y[: args.batches[0] // env.world]))
    bufs = {name: torch.zeros(numel) for name, numel in (("grad", n_params), ("small", 1024))}
    fns = {f"allreduce_s_{name}": (lambda b=b: dist.all_reduce(b)) for name, b in bufs.items()}
    found.update(time_rounds(fns, args, dist.barrier))
    pids = [None] * env.world
    dist.all_gather_object(pids, os.getpid())
    found.update(params=n_params, grad_bytes=4 * n_params, pids=pids,
                 tensors=len(list(model.parameters())))
    return found


def bench_buckets(args, env, core, x, y) -> dict:
    """The deep model's DDP step at each bucket cap, and the buckets DDP makes by default."""
    import torch.distributed as dist

    found = {}
    deeps = {cap: core.wrap(make_model(args, deep=True), env, bucket_cap_mb=cap)
             for cap in args.buckets}
    fns = {f"deep_step_s_bucket{cap:g}": step_fn(deep, x, y) for cap, deep in deeps.items()}
    found.update(time_rounds(fns, args, dist.barrier))
    for cap, deep in deeps.items():  # after training: DDP rebuilds its buckets in step 1
        buckets = deep.reducer._get_zeros_like_grad_buckets()  # private API, display only
        found[f"deep_buckets_{cap:g}"] = len(buckets)
    found["deep_tensors"] = len(list(deep.parameters()))
    default = core.wrap(make_model(args, deep=True), env, bucket_cap_mb=None)  # DDP's own
    step = step_fn(default, x, y)
    step(), step()  # the buckets are rebuilt, in gradient order, at the second step
    buckets = default.reducer._get_zeros_like_grad_buckets()
    found["deep_bucket_bytes_default"] = [b.buffer().numel() * b.buffer().element_size() for b in buckets]
    return found


def pin_cores(n: int) -> int:
    """Keep this process (and the threads it starts later) on the first ``n`` cores it may
    use; return how many it may use now. Without ``os.sched_setaffinity`` (macOS), all."""
    if not hasattr(os, "sched_setaffinity"):
        return os.cpu_count() or 1
    allowed = sorted(os.sched_getaffinity(0))
    if n > 0:
        os.sched_setaffinity(0, allowed[:n])
    return len(os.sched_getaffinity(0))


def main(argv=None) -> dict:
    args = parse_args(argv)  # before the heavy imports, so --help answers at once
    cores = pin_cores(args.cores)  # before torch starts any thread
    sys.path.insert(0, str(HERE))
    import ddp_core as core
    import torch

    env = core.setup(cpu=True)
    torch.manual_seed(args.seed)  # the inputs; the same on every rank
    try:
        if env.world == 1:
            result = {"world": 1, "cores": cores, **bench_single(args), "pids": [os.getpid()]}
        else:
            result = {"world": env.world, "cores": cores, **bench_ddp(args, env, core)}
        if env.rank == 0:
            print(json.dumps(result), flush=True)
        return result
    finally:
        core.teardown()


if __name__ == "__main__":
    main()
