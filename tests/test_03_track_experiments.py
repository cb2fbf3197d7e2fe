"""Chapter 03's companion code: what the tracking helper promises, checked against a real store.

The helper must write parameters, per-epoch metrics, the data hash, the code version and package
versions; the run must be findable by query and its model reloadable with identical predictions;
``rerun.py`` must reproduce a run in a fresh process and refuse when the data changed; a model
served by alias from its own process (``serve_registry.py``) must answer what the kernel computes and
pick up an alias move only when restarted. Every store is a temporary SQLite file; nothing goes to
``~`` or the repository.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before anything imports mlflow

import numpy as np
import pandas as pd
import pytest
from conftest import NOTEBOOKS, load_module

CHAPTER = NOTEBOOKS / "03-track-experiments"
digits = load_module(CHAPTER / "digits.py")
tracking = load_module(CHAPTER / "tracking.py")
install_size = load_module(CHAPTER / "install_size.py")
serve_registry = load_module(CHAPTER / "serve_registry.py")
mlflow = tracking.mlflow

# MLflow's own SQLAlchemy store uses a deprecated loader option; nothing this chapter can fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")

FAST = dict(lr=0.1, hidden=16, weight_decay=0.0, epochs=3)


@pytest.fixture(scope="module")
def data():
    return digits.load_splits(split_seed=0)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real SQLite tracking store in a temporary folder, active for this module only."""
    folder = tmp_path_factory.mktemp("mlflow")
    previous = os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri mirrors the URI there
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    yield uri, folder
    mlflow.set_tracking_uri(previous)  # None: back to unset


@pytest.fixture
def experiment(store, request):
    uri, folder = store
    return mlflow.create_experiment(request.node.name, artifact_location=str(folder / request.node.name))


# --- data, code and config identity: no store needed -------------------------------------------


def test_data_hash_sees_every_byte_and_the_layout(data):
    base = tracking.data_sha256(data)
    assert tracking.data_sha256({k: v.copy() for k, v in data.items()}) == base
    last_pixel = {**data, "X_train": data["X_train"].copy()}
    last_pixel["X_train"][-1, -1] += 1 / 16
    assert tracking.data_sha256(last_pixel) != base
    assert tracking.data_sha256({**data, "y_train": data["y_train"].astype(np.int32)}) != base
    assert tracking.data_sha256({**data, "X_train": data["X_train"].reshape(-1, 32)}) != base
    renamed = {("X_fit" if k == "X_train" else k): v for k, v in data.items()}
    assert tracking.data_sha256(renamed) != base


def test_code_version_without_git_still_identifies_the_code(tmp_path):
    source = tmp_path / "train.py"
    source.write_text("x = 1\n")
    assert tracking.git_state(tmp_path) == {"git_commit": "unknown", "git_dirty": "unknown"}
    before = tracking.files_sha256([source])
    source.write_text("x = 2\n")
    assert tracking.files_sha256([source]) != before


def test_config_round_trips_through_recorded_string_params():
    for seed in (7, None):
        config = digits.Config(lr=0.001, hidden=32, weight_decay=3e-4, seed=seed)
        params = {k: str(v) for k, v in vars(config).items()}
        assert tracking.config_from_params(params, digits.Config) == config
    with pytest.raises(ValueError, match="seed"):
        tracking.config_from_params({"lr": "0.1", "hidden": "8", "weight_decay": "0"}, digits.Config)


@pytest.mark.slow
def test_training_is_repeatable_by_seed_and_leaves_the_global_rng_alone(data):
    import torch

    state = torch.get_rng_state()
    _, a = digits.train(digits.Config(**FAST, seed=3), data)
    assert torch.equal(torch.get_rng_state(), state), "a seeded run moved the global RNG"
    _, b = digits.train(digits.Config(**FAST, seed=3), data)
    _, c = digits.train(digits.Config(**FAST, seed=4), data)
    assert a == b and a != c
    _, d = digits.train(digits.Config(**FAST, seed=None), data)
    _, e = digits.train(digits.Config(**FAST, seed=None), data)
    assert d != e, "unseeded runs should differ (the global RNG moves on)"


def test_summarize_configs_refuses_runs_on_different_data():
    runs = pd.DataFrame({
        "run_id": ["a", "b", "c", "d"], "tags.data_sha256": ["h1"] * 4,
        "params.lr": ["0.1", "0.1", "0.3", "0.3"], "params.hidden": ["8"] * 4, "params.weight_decay": ["0"] * 4,
        "metrics.val_acc": [0.90, 0.92, 0.95, 0.93], "metrics.val_loss": [0.3, 0.3, 0.2, 0.2]})
    table = tracking.summarize_configs(runs)
    assert table.index[0] == ("0.3", "8", "0") and table["mean"].iloc[0] == pytest.approx(0.94)
    assert list(table["count"]) == [2, 2]
    mixed = runs.assign(**{"tags.data_sha256": ["h1", "h1", "h1", "h2"]})
    with pytest.raises(ValueError, match="2 different data sets"):
        tracking.summarize_configs(mixed)


def test_install_size_walks_requirements_and_subtracts_the_base():
    dists = install_size.installed()
    assert {"mlflow-skinny", "sqlalchemy", "alembic"} <= install_size.closure(["mlflow"], dists)
    added = install_size.added_by("mlflow", base=["numpy", "pandas"])
    assert "mlflow" in added and "sqlalchemy" in added
    assert "numpy" not in added and "pandas" not in added
    assert all(size > 0 for size in added.values())
    assert list(added.values()) == sorted(added.values(), reverse=True)
    assert install_size.added_by("numpy", base=["numpy"]) == {}


# --- the helper against a real store ------------------------------------------------------------


@pytest.mark.slow
def test_logged_run_holds_what_the_helper_promises_and_reloads(store, experiment, data):
    config = digits.Config(**FAST, seed=1)
    tracked = tracking.log_training_run(config, data, digits.train, experiment_id=experiment,
                                        data_params={"split_seed": 0})
    run = mlflow.get_run(tracked.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {**{k: str(v) for k, v in vars(config).items()}, "data_split_seed": "0"}
    tags = run.data.tags
    assert tags["data_sha256"] == tracking.data_sha256(data)
    assert tags["code_sha256"] == tracking.files_sha256([CHAPTER / "digits.py", CHAPTER / "tracking.py"])
    assert tags["git_commit"] != "" and tags["git_dirty"] in {"true", "false", "unknown"}
    for name, version in tracking.package_versions().items():
        assert tags[f"{name.replace('-', '_')}_version"] == version != "missing"
    client = mlflow.MlflowClient()
    for metric in ("train_loss", "val_loss", "val_acc"):
        history = sorted(client.get_metric_history(tracked.run_id, metric), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(config.epochs))
        assert [m.value for m in history] == [h[metric] for h in tracked.history]
    environment = mlflow.artifacts.load_text(f"runs:/{tracked.run_id}/environment.txt")
    assert f"mlflow=={mlflow.__version__}" in environment.splitlines()

    found = mlflow.search_runs([experiment], filter_string=f"tags.data_sha256 = '{tags['data_sha256']}'")
    assert list(found.run_id) == [tracked.run_id]
    reloaded = mlflow.pytorch.load_model(f"runs:/{tracked.run_id}/model")
    assert np.array_equal(digits.predict(reloaded, data["X_test"]), digits.predict(tracked.model, data["X_test"]))


@pytest.mark.slow
def test_helper_refuses_seedless_runs_and_marks_crashed_runs_failed(store, experiment, data):
    with pytest.raises(ValueError, match="without a seed"):
        tracking.log_training_run(digits.Config(**FAST, seed=None), data, digits.train, experiment_id=experiment)
    assert len(mlflow.search_runs([experiment])) == 0, "a refused run must not leave a run behind"

    def crashes(config, data, on_epoch):
        on_epoch(0, {"val_loss": 1.0})
        raise RuntimeError("diverged")

    with pytest.raises(RuntimeError, match="diverged"):
        tracking.log_training_run(digits.Config(**FAST, seed=0), data, crashes, experiment_id=experiment)
    runs = mlflow.search_runs([experiment])
    assert list(runs["status"]) == ["FAILED"] and runs["metrics.val_loss"].iloc[0] == 1.0


@pytest.mark.slow
def test_rerun_script_reproduces_in_a_fresh_process_and_refuses_changed_data(store, experiment, data, tmp_path):
    uri, _ = store
    tracked = tracking.log_training_run(digits.Config(**FAST, seed=2), data, digits.train,
                                        experiment_id=experiment, data_params={"split_seed": 0})
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DO_NOT_TRACK", "XDG_"))}
    env["HOME"] = str(home)  # the fresh process must not write to the user's home (telemetry id)

    def rerun():
        done = subprocess.run([sys.executable, str(CHAPTER / "rerun.py"), "--tracking-uri", uri,
                               "--run-id", tracked.run_id], capture_output=True, text=True, timeout=180, env=env)
        return done.returncode, json.loads(done.stdout.strip().splitlines()[-1]), done.stderr

    code, result, stderr = rerun()
    assert code == 0, stderr[-2000:]
    assert result["identical"] and result["epochs_matching"] == 3
    assert result["rerun_val_loss"] == result["recorded_val_loss"] == tracked.history[-1]["val_loss"]
    assert list(home.rglob("*")) == [], f"rerun.py wrote to HOME: {list(home.rglob('*'))}"

    mlflow.MlflowClient().set_tag(tracked.run_id, "data_sha256", "0" * 64)  # as if the data had changed
    code, result, _ = rerun()
    assert code == 2 and not result["identical"] and "trained on data" in result["error"]


def test_promotion_moves_the_alias_keeps_a_rollback_and_refuses_other_data(store, experiment, data):
    name = "test-registry-model"
    config = digits.Config(**FAST, seed=2)
    ours = tracking.log_training_run(config, data, digits.train, experiment_id=experiment)
    other_data = digits.load_splits(split_seed=1)
    theirs = tracking.log_training_run(config, other_data, digits.train, experiment_id=experiment)
    client = mlflow.MlflowClient()
    v1, v2 = tracking.register(ours, name), tracking.register(theirs, name)
    assert tracking.alias_version(client, name, "champion") is None
    data_hash = tracking.data_sha256(data)
    assert tracking.promote(client, name, v1, "first", data_sha256=data_hash)["replaced"] is None
    with pytest.raises(ValueError, match="trained on data .* not promoted"):
        tracking.promote(client, name, v2, "other split", data_sha256=data_hash)
    assert tracking.alias_version(client, name, "champion") == v1, "a refused promotion moved the alias"
    with pytest.raises(ValueError, match="already holds"):
        tracking.promote(client, name, v1, "again")
    moved = tracking.promote(client, name, v2, "override without a data check")
    assert moved == {"alias": "champion", "version": v2, "replaced": v1}
    assert tracking.alias_version(client, name, "previous") == v1
    served = mlflow.pytorch.load_model(f"models:/{name}@champion")
    assert np.array_equal(digits.predict(served, other_data["X_test"]),
                          digits.predict(theirs.model, other_data["X_test"]))
    assert client.get_model_version(name, v2).tags["promoted_to_champion"] == "override without a data check"


# --- the hand-off to serving: a model served by alias from its own process ----------------------


def running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_alias_server_runs_mlflow_serve_locally_on_loopback_against_the_given_store(tmp_path):
    server = serve_registry.AliasServer("sqlite:////tmp/x.db", "models:/m@champion", workdir=tmp_path)
    cmd = server.command
    assert cmd[:5] == [sys.executable, "-m", "mlflow", "models", "serve"]
    assert cmd[cmd.index("-m", 3) + 1] == "models:/m@champion"
    assert cmd[cmd.index("--env-manager") + 1] == "local", "another env manager would build and download"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and int(cmd[cmd.index("--port") + 1]) == server.port
    env = server.env
    assert env["MLFLOW_TRACKING_URI"] == "sqlite:////tmp/x.db" and env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable), "uvicorn must be this env's"
    assert env["TMPDIR"] == str(tmp_path) and server.log_path.parent == tmp_path
    assert server.stop() == {"exit_code": None, "left": []}, "stopping a server never started is a no-op"


@pytest.mark.slow
def test_served_alias_answers_like_the_kernel_and_follows_the_alias_only_after_a_restart(store, experiment, data):
    uri, folder = store
    name, client = "test-served-model", mlflow.MlflowClient()
    runs = [tracking.log_training_run(digits.Config(**FAST, seed=s), data, digits.train, experiment_id=experiment)
            for s in (5, 6)]
    v1, v2 = (tracking.register(r, name) for r in runs)
    tracking.promote(client, name, v1, "first")
    X = data["X_test"][:40]
    expected = [digits.predict(r.model, X) for r in runs]
    alias = f"models:/{name}@champion"
    with serve_registry.AliasServer(uri, alias, workdir=folder) as server:
        assert np.array_equal(server.predict(X), expected[0])
        for bad in ({"inputs": X[:2, :63].tolist()}, b"{not json"):
            assert 400 <= server.post(bad).status_code < 500
        tracking.promote(client, name, v2, "second")
        assert np.array_equal(server.predict(X), expected[0]), "a running server re-resolved the alias"
        pids = server.processes()
    assert len(pids) >= 1 and server.stop()["left"] == []
    assert not any(running(pid) for pid in pids), f"server processes survived: {pids}"
    with serve_registry.AliasServer(uri, alias, workdir=folder) as server:
        assert np.array_equal(server.predict(X), expected[1]), "a restart did not pick up the moved alias"
    assert server.stop()["left"] == []


@pytest.mark.slow
def test_serving_an_alias_that_does_not_exist_fails_the_start_and_leaves_nothing(store, tmp_path):
    uri, _ = store
    server = serve_registry.AliasServer(uri, "models:/no-such-model@champion", workdir=tmp_path)
    with pytest.raises(RuntimeError, match="exited with"):
        server.start(ready_timeout=60)
    assert server.stop()["left"] == [] and server.proc.returncode not in (None, 0)
