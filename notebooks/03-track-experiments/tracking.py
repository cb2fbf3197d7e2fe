"""Log a training run so that its number can be traced back to data, code, parameters and environment.

Why a file: the chapter, ``rerun.py`` and ``tests/test_03_track_experiments.py`` all use the same
helper, and the tests check it against a temporary store. It does not choose a store: the caller
sets the tracking URI (``mlflow.set_tracking_uri``), so the same call writes to the chapter's
temporary SQLite file, a test's store or a team's server. Importing it turns MLflow's telemetry
off (``MLFLOW_DISABLE_TELEMETRY=true``) unless the environment already says otherwise; that only
works if nothing imported ``mlflow`` before, because MLflow reads the variable at import.

Used from the chapter::

    import digits, tracking
    run = tracking.log_training_run(config, data, digits.train, experiment_id=exp_id,
                                    data_params={"split_seed": 0})
    mlflow.pytorch.load_model(run.model_uri)
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import platform
import subprocess
import typing
from dataclasses import asdict, dataclass, fields
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

# MLflow decides at import whether to send usage telemetry (and to write an installation id to
# ~/.config/mlflow). The book never does either; an explicit setting by the reader wins.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
import mlflow.pytorch  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

#: Packages whose versions every run records as tags (all installed ones go in environment.txt).
PACKAGES = ("torch", "numpy", "scikit-learn", "mlflow")


def data_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of every array, in name order, with its name, dtype and shape: any changed byte shows."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def files_sha256(paths: Iterable[str | Path]) -> str:
    """SHA-256 of the files' bytes, in the order given: the code that ran, in git or not."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def git_state(folder: str | Path) -> dict[str, str]:
    """Commit of the repository holding ``folder`` and whether tracked files have uncommitted edits.

    Outside a repository, or without git, both say ``unknown``: the file hash still identifies the code.
    """
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit or "unknown",
            "git_dirty": "unknown" if status is None else str(bool(status)).lower()}


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str]:
    """``{name: installed version}``; a package that is not installed reads ``missing``."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


@functools.cache
def installed_distributions() -> str:
    """Every installed distribution as ``name==version``, sorted: the environment, in one artifact.

    Read once per process (reading ~200 metadata files costs a tenth of a second, more than a run).
    """
    lines = {f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions()}
    return "\n".join(sorted(lines, key=str.lower)) + "\n"


def run_tags(data: Mapping[str, np.ndarray], source_files: Iterable[str | Path]) -> dict[str, str]:
    """What a run records besides its parameters: data hash, code version, environment."""
    source_files = [Path(p) for p in source_files]
    tags = {"data_sha256": data_sha256(data),
            "data_rows": ",".join(f"{k}={len(v)}" for k, v in sorted(data.items()) if k.startswith("X_")),
            "code_sha256": files_sha256(source_files),
            "code_files": ",".join(p.name for p in source_files),
            **git_state(source_files[0].parent),
            "python_version": platform.python_version(),
            "platform": platform.platform(),
            "torch_threads": str(torch.get_num_threads()),
            "device": "cpu"}
    tags.update({f"{name.replace('-', '_')}_version": v for name, v in package_versions().items()})
    return tags


@dataclass
class TrackedRun:
    run_id: str
    model_uri: str
    model: torch.nn.Module
    history: list[dict[str, float]]


def log_training_run(config: Any, data: Mapping[str, np.ndarray], train_fn: Callable, *,
                     experiment_id: str, data_params: Mapping[str, Any] | None = None,
                     run_name: str | None = None, source_files: Iterable[str | Path] | None = None) -> TrackedRun:
    """Train ``train_fn(config, data, on_epoch)`` inside an MLflow run that records everything needed
    to find, trust and repeat it: parameters (the config's fields and ``data_<key>`` for
    ``data_params``), per-epoch metrics, the tags of :func:`run_tags`, the installed packages
    (``environment.txt``) and the model (``torch.export`` format, loadable without unpickling code).

    Refuses a config without a seed: a run that cannot be repeated is not worth recording. If
    training raises, MLflow marks the run FAILED and the error propagates.
    """
    if getattr(config, "seed", None) is None:
        raise ValueError(f"refusing to log a run without a seed ({config!r}): it could never be repeated")
    source_files = list(source_files or [inspect.getsourcefile(train_fn), __file__])
    params = {**asdict(config), **{f"data_{k}": v for k, v in (data_params or {}).items()}}
    example = np.ascontiguousarray(data["X_val"][:5])
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run:
        mlflow.log_params(params)
        mlflow.set_tags(run_tags(data, source_files))
        model, history = train_fn(config, data, on_epoch=lambda epoch, m: mlflow.log_metrics(m, step=epoch))
        mlflow.log_text(installed_distributions(), "environment.txt")
        pins = [f"{name}=={version}" for name, version in package_versions(("torch", "numpy")).items()]
        info = mlflow.pytorch.log_model(model, name="model", input_example=example, pip_requirements=pins)
    return TrackedRun(run.info.run_id, info.model_uri, model, history)


def config_from_params(params: Mapping[str, str], cls: type) -> Any:
    """Rebuild a config dataclass from a run's recorded parameters (MLflow stores them as strings)."""
    hints = typing.get_type_hints(cls)
    missing = [f.name for f in fields(cls) if f.name not in params]
    if missing:
        raise ValueError(f"the run did not record {missing}; it cannot be repeated from its parameters")
    values = {}
    for f in fields(cls):
        raw, kinds = params[f.name], [t for t in typing.get_args(hints[f.name]) if t is not type(None)]
        values[f.name] = None if raw == "None" else (kinds[0] if kinds else hints[f.name])(raw)
    return cls(**values)


def check_same_data(run: mlflow.entities.Run, data: Mapping[str, np.ndarray]) -> None:
    """Raise ValueError when ``data`` is not the data ``run`` was trained on (by SHA-256)."""
    recorded, current = run.data.tags.get("data_sha256"), data_sha256(data)
    if recorded != current:
        raise ValueError(f"run {run.info.run_id} was trained on data {str(recorded)[:12]}..., this data is "
                         f"{current[:12]}...; a rerun would not reproduce it")


def summarize_configs(runs, metric: str = "val_acc", tiebreak: str = "val_loss",
                      params: Iterable[str] = ("lr", "hidden", "weight_decay")):
    """Mean, spread and count of ``metric`` over seeds, one row per configuration, best first.

    ``runs`` is a ``mlflow.search_runs`` DataFrame; ties on the mean of ``metric`` go to the lower
    mean of ``tiebreak``. Raises ValueError when the runs were trained on different data (different
    ``data_sha256`` tags): their metrics are not comparable.
    """
    hashes = runs.groupby("tags.data_sha256")["run_id"].apply(list)
    if len(hashes) != 1:
        detail = "; ".join(f"{h[:12]}...: {len(ids)} run(s), e.g. {ids[0]}" for h, ids in hashes.items())
        raise ValueError(f"these runs were trained on {len(hashes)} different data sets ({detail}). "
                         "Compare runs on the same data: filter on tags.data_sha256 first.")
    grouped = runs.groupby([f"params.{p}" for p in params])
    table = grouped[f"metrics.{metric}"].agg(["mean", "std", "min", "max", "count"])
    table[f"mean_{tiebreak}"] = grouped[f"metrics.{tiebreak}"].mean()
    return table.sort_values(["mean", f"mean_{tiebreak}"], ascending=[False, True])


def register(tracked: TrackedRun, name: str) -> str:
    """Register a tracked run's model as a new version of ``name``; the version carries the run's
    data hash as a tag, so a promotion can refuse a model trained on other data. Returns the version."""
    run = mlflow.get_run(tracked.run_id)
    version = mlflow.register_model(tracked.model_uri, name,
                                    tags={"data_sha256": run.data.tags["data_sha256"],
                                          "run_id": tracked.run_id})
    return str(version.version)


def alias_version(client: mlflow.MlflowClient, name: str, alias: str) -> str | None:
    """The version an alias points at, or None if the alias is not set."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


def promote(client: mlflow.MlflowClient, name: str, version: str, reason: str, *,
            alias: str = "champion", data_sha256: str | None = None) -> dict[str, str | None]:
    """Point ``alias`` at ``version`` and keep the version it replaces as ``previous`` (rollback is
    one call). Refuses a version trained on other data than ``data_sha256`` and records the reason
    for the promotion as a tag on the version. Returns what moved."""
    model_version = client.get_model_version(name, version)
    if data_sha256 is not None and model_version.tags.get("data_sha256") != data_sha256:
        raise ValueError(f"{name} version {version} was trained on data "
                         f"{model_version.tags.get('data_sha256', '?')[:12]}, not {data_sha256[:12]}: "
                         "not promoted")
    replaced = alias_version(client, name, alias)
    if replaced == str(version):
        raise ValueError(f"{name} version {version} already holds alias {alias!r}")
    if replaced is not None:
        client.set_registered_model_alias(name, "previous", replaced)
    client.set_registered_model_alias(name, alias, str(version))
    client.set_model_version_tag(name, str(version), f"promoted_to_{alias}", reason)
    return {"alias": alias, "version": str(version), "replaced": replaced}
