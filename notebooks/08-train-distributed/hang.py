"""When it hangs: a straggler's cost, a stalled worker, and how to find it.

Why a file and not a cell: a hang only exists between real worker processes. Under torchrun
with two workers, this script (1) times DDP steps while rank 1 sleeps ``--straggle-ms``
before each step, taking turns with steps where nobody sleeps; (2) lets rank 1 stall for
longer than a process group's timeout while rank 0 waits in an all-reduce, first on a plain
gloo group, then on one created under ``TORCH_DISTRIBUTED_DEBUG=DETAIL``, and records the
error each one raises; (3) gathers every rank's flight recorder (``TORCH_FR_BUFFER_SIZE``
must be set at launch) and names the rank that never entered a collective, and which one.
Rank 0 prints one JSON object as its last line.

Launch line, from this folder:

    TORCH_FR_BUFFER_SIZE=256 python -m torch.distributed.run --nproc-per-node 2 \\
        --master-addr 127.0.0.1 --master-port 29500 hang.py --timeout-s 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timeout-s", type=float, default=1.0,
                   help="timeout of the two process groups the stall is tried on")
    p.add_argument("--straggle-ms", type=float, default=20.0,
                   help="how long rank 1 sleeps before each step of the straggler test")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per condition")
    p.add_argument("--steps", type=int, default=5, help="steps per round")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def straggler(args, env, core) -> dict:
    """Median step time on every rank, with and without rank 1 sleeping first."""
    import torch
    import torch.nn.functional as F

    cfg = core.Config(seed=args.seed)
    model = core.wrap(core.make_model(cfg), env)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, cfg.features), torch.randn(32, 1)

    def step(sleep_s: float) -> None:
        if env.rank == 1 and sleep_s:
            time.sleep(sleep_s)  # rank 1 is slow: a busy node, a slow disk, a GC pause
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()  # the all-reduce waits for every rank
        opt.step()

    times = {"even": [], "straggler": []}
    for _ in range(2):
        step(0.0)
    for _ in range(args.rounds):  # the two conditions take turns, round by round
        for name, sleep_s in (("even", 0.0), ("straggler", args.straggle_ms / 1e3)):
            core.barrier(env)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(sleep_s)
            times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
    return {f"step_ms_{k}": statistics.median(v) for k, v in times.items()}


def stall(groups: dict, env, stall_s: float) -> dict:
    """Rank 1 sleeps past the groups' timeout; rank 0 waits in an all-reduce on each group."""
    import torch
    import torch.distributed as dist

    x = torch.ones(1000)
    for group in groups.values():
        dist.all_reduce(x, group=group)  # one that completes, for the flight recorder
    if env.rank == 1:
        time.sleep(stall_s)  # never enters the second all-reduce of either group
        return {}
    found = {}
    for name, group in groups.items():
        t0 = time.perf_counter()
        try:
            dist.all_reduce(x, group=group)
            error = None
        except RuntimeError as err:
            error = f"{type(err).__name__}: {err}"
        found[name] = {"error": error, "waited_s": time.perf_counter() - t0}
    return found


def flight_record(group_name: str) -> list[dict]:
    """This rank's flight-recorder entries for one process group, oldest first.

    The recorder keeps the last TORCH_FR_BUFFER_SIZE collectives of every group with their
    sequence number; a private call dumps them (``torch.distributed.flight_recorder``'s
    ``fr_trace`` tool analyses the same records dumped to files).
    """
    import torch._C._distributed_c10d as c10d

    entries = json.loads(c10d._dump_fr_trace_json()).get("entries", [])
    return [{"seq": e["collective_seq_id"], "op": e["profiling_name"], "sizes": e["input_sizes"]}
            for e in entries if e["process_group"][0] == group_name]


def measure(args, env, core) -> dict:
    """Everything above on a process group of two that is already up (every rank calls it).

    ``pitfalls.py --hang`` calls it too, so that the chapter pays for one launch, not two.
    """
    import torch.distributed as dist

    found = {"world": env.world, "timeout_s": args.timeout_s, "straggle_ms": args.straggle_ms,
             **straggler(args, env, core)}
    timeout = timedelta(seconds=args.timeout_s)
    plain = dist.new_group(timeout=timeout)
    dist.set_debug_level(dist.DebugLevel.DETAIL)  # as TORCH_DISTRIBUTED_DEBUG=DETAIL
    detail = dist.new_group(timeout=timeout)      # does for every group at start
    dist.set_debug_level(dist.DebugLevel.OFF)
    stall_s = 2 * args.timeout_s + 0.5  # past both timeouts, one after the other
    found.update(stall({"plain": plain, "detail": detail}, env, stall_s))
    records = [None, None]
    dist.all_gather_object(records, flight_record(plain.group_name))  # rank 1 is awake
    found["flight_record"] = records
    found["pids"] = [None, None]
    dist.all_gather_object(found["pids"], os.getpid())
    return found


def main(argv=None) -> dict:
    args = parse_args(argv)  # before the heavy imports, so --help answers at once
    sys.path.insert(0, str(HERE))
    import ddp_core as core
    import torch

    env = core.setup(cpu=True)
    if env.world != 2:
        raise SystemExit("hang.py needs exactly two workers: run it under torchrun --nproc-per-node 2")
    torch.manual_seed(args.seed)
    try:
        found = measure(args, env, core)
        if env.rank == 0:
            print(json.dumps(found), flush=True)
        return found
    finally:
        core.teardown()


if __name__ == "__main__":
    main()
