"""Three ways data-parallel training silently stops computing what one process computes.

Why a file and not a cell: the effects only exist between real worker processes, so
torchrun starts this script twice. Both ranks train with DDP; rank 0 then also trains the
one-process reference with the whole batch itself and compares. Rank 0 prints one JSON
object as the last line.

Launch line (exactly two workers), from this folder:

    python -m torch.distributed.run --nproc-per-node 2 --master-addr 127.0.0.1 \\
        --master-port 29500 pitfalls.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="steps per comparison (default 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hang", action="store_true",
                   help="then run hang.py's straggler and stall experiments in the same "
                        "launch (set TORCH_FR_BUFFER_SIZE for its flight recorder)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)  # before the heavy imports, so --help answers at once
    sys.path.insert(0, str(HERE))
    import ddp_core as core

    env = core.setup(cpu=True)  # the reference runs on rank 0's CPU: keep both there
    try:
        if env.world != 2:
            raise SystemExit("pitfalls.py compares 2 workers with 1 process: launch it "
                             "with torchrun --nproc-per-node 2")
        result = run(args, env, core)
        if args.hang:  # one launch fewer for the chapter: the same two workers stall next
            import hang

            result["hang"] = hang.measure(hang.parse_args(["--seed", str(args.seed)]), env, core)
        if env.rank == 0:
            print(json.dumps(result), flush=True)
        return result
    finally:
        core.teardown()


def gap(cfg, env, core) -> float | None:
    """Largest parameter difference, 2-worker DDP against one process (on rank 0)."""
    import torch

    model, *_ = core.train(cfg, env)
    if env.rank != 0:
        return None
    reference, *_ = core.train(cfg, core.Env())  # rank 0 alone, whole global batch
    ddp = dict(model.module.named_parameters())
    with torch.no_grad():
        return max(float((p - ddp[n]).abs().max()) for n, p in reference.named_parameters())


def syncbn_on_cpu(cfg, env, core) -> str:
    """What nn.SyncBatchNorm, the GPU fix for batch norm under DDP, says on CPU."""
    import torch

    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(core.make_model(cfg))
    try:
        core.wrap(model, env)
    except ValueError as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def across_ranks(tensor, env):
    """Every rank's copy of ``tensor``, gathered (a list, one entry per rank)."""
    import torch

    out = [torch.empty_like(tensor) for _ in range(env.world)]
    torch.distributed.all_gather(out, tensor.contiguous())
    return out


def randomness(cfg, env, core) -> dict:
    """Randomness that must be shared (init, data order) and that must differ (dropout)."""
    import torch
    from torch.utils.data import DistributedSampler

    found = {}
    torch.manual_seed(cfg.seed + env.rank)  # the tempting "seed per rank" of many scripts
    model = torch.nn.Linear(cfg.features, cfg.hidden)
    copies = across_ranks(model.weight.detach(), env)
    found["init_gap_before_ddp"] = float((copies[0] - copies[1]).abs().max())
    model = core.wrap(model, env)  # DDP broadcasts rank 0's parameters to every rank
    copies = across_ranks(model.module.weight.detach(), env)
    found["init_gap_after_ddp"] = float((copies[0] - copies[1]).abs().max())
    data = core.make_data(cfg)
    for name, seed in (("same", cfg.seed), ("per_rank", cfg.seed + env.rank)):
        mine = DistributedSampler(data, env.world, env.rank, shuffle=True, seed=seed)
        seen = torch.cat(across_ranks(torch.tensor(list(mine)), env)).unique().numel()
        found[f"coverage_{name}_sampler_seed"] = seen / cfg.samples
    for name, seed in (("same", cfg.seed), ("per_rank", cfg.seed + env.rank)):
        torch.manual_seed(seed)
        kept = torch.nn.functional.dropout(torch.ones(32, cfg.hidden), p=0.5) != 0
        masks = across_ranks(kept.float(), env)
        found[f"dropout_agreement_{name}_seed"] = float((masks[0] == masks[1]).float().mean())
    return found


def run(args, env, core) -> dict:
    import torch

    def cfg(**kw):
        return core.Config(seed=args.seed, **{"steps": args.steps, **kw})

    # 1001 samples: every epoch has 15 full batches of 64 and a short one of 41
    gaps = {
        "plain": gap(cfg(), env, core),
        "batchnorm": gap(cfg(norm="batch"), env, core),
        "global_batchnorm": gap(cfg(norm="global"), env, core),
        "uneven_keep_last": gap(cfg(samples=1001, drop_last=False, steps=32), env, core),
        "uneven_drop_last": gap(cfg(samples=1001, drop_last=True, steps=30), env, core),
    }
    pids = [None] * env.world
    torch.distributed.all_gather_object(pids, os.getpid())
    return {"gaps": gaps, "syncbn_cpu": syncbn_on_cpu(cfg(norm="batch"), env, core),
            **randomness(cfg(), env, core), "pids": pids}


if __name__ == "__main__":
    main()
