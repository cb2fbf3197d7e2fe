"""Retrain a logged run in a fresh process, from nothing but the store and its run id, and compare.

Why a file: "reproducible" means a new process, with none of the original session's state, can
read the recorded parameters, seed, data recipe and thread count, check that the data hashes the
same, retrain, and get the same numbers. This script is that process. It only reads the store.

    python rerun.py --tracking-uri sqlite:////abs/path/mlflow.db --run-id RUN_ID

The last line printed is one JSON object: the recorded and recomputed validation metrics, how many
epochs match exactly, and ``identical``. Exit status 0 when every epoch matches, 1 when not, 2 when
the data is not the data the run was trained on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True, help="MLflow tracking URI, e.g. sqlite:////abs/mlflow.db")
    parser.add_argument("--run-id", required=True, help="the run to repeat")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before MLflow is imported
    sys.path.insert(0, str(Path(__file__).parent))
    import mlflow
    import torch

    import digits
    import tracking

    mlflow.set_tracking_uri(args.tracking_uri)
    run = mlflow.get_run(args.run_id)
    torch.set_num_threads(int(run.data.tags["torch_threads"]))
    config = tracking.config_from_params(run.data.params, digits.Config)
    data = digits.load_splits(split_seed=int(run.data.params["data_split_seed"]))
    result = {"run_id": args.run_id, "config": asdict(config)}
    try:
        tracking.check_same_data(run, data)
    except ValueError as error:
        print(json.dumps({**result, "identical": False, "error": str(error)}))
        return 2
    _, history = digits.train(config, data)
    client = mlflow.MlflowClient()
    recorded = {m.step: m.value for m in client.get_metric_history(args.run_id, "val_loss")}
    matching = sum(recorded.get(epoch) == h["val_loss"] for epoch, h in enumerate(history))
    result.update({
        "recorded_val_loss": run.data.metrics["val_loss"], "rerun_val_loss": history[-1]["val_loss"],
        "recorded_val_acc": run.data.metrics["val_acc"], "rerun_val_acc": history[-1]["val_acc"],
        "epochs_matching": matching, "epochs": len(history),
        "identical": matching == len(history) == len(recorded),
        "seconds": round(time.perf_counter() - started, 2)})
    print(json.dumps(result))
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
