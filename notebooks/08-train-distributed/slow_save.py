"""Write one checkpoint over an existing one, slowly, so it can be killed mid-write.

Why a file and not a cell: the point is a writer process that dies with SIGKILL halfway
through, which a cell cannot do to itself and survive. The disk is slow on purpose
(--chunk-delay seconds after every MiB), so that "halfway" is a moment the chapter hits
every time; the writing code is ddp_core.save_checkpoint, the one training uses. Prints one
JSON line if it finishes.

Launch lines, from this folder:

    python slow_save.py --path artifacts/ckpt/checkpoint.pt --mode atomic   # temp, rename
    python slow_save.py --path artifacts/ckpt/checkpoint.pt --mode naive    # in place
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--path", type=Path, required=True, help="checkpoint file to (over)write")
    p.add_argument("--mode", choices=["atomic", "naive"], default="atomic")
    p.add_argument("--step", type=int, default=30, help="step stored in the new checkpoint")
    p.add_argument("--megabytes", type=int, default=8, help="size of the new checkpoint")
    p.add_argument("--chunk-delay", type=float, default=0.05,
                   help="seconds of simulated disk time per MiB")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)  # before the heavy imports, so --help answers at once
    import torch

    sys.path.insert(0, str(HERE))
    import ddp_core as core

    weights = torch.full((args.megabytes << 18,), float(args.step))  # 4 bytes each
    core.save_checkpoint({"step": args.step, "weights": weights}, args.path,
                         atomic=args.mode == "atomic", chunk_delay_s=args.chunk_delay)
    result = {"path": str(args.path), "mode": args.mode, "step": args.step,
              "bytes": args.path.stat().st_size}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
