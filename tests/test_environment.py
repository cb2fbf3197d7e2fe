"""The environment around the chapters: the lock, Binder, the workflows, CI and the README commands.

Readers run the book three ways (online, local JupyterLab, Binder); each of these tests protects
one of them from silently drifting away from the others.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from _shared.env_check import installed_version, normalize, parse_pins, same_release
from conftest import ROOT, repo_files
from packaging.version import Version

REQUIREMENTS = ROOT / "requirements.txt"
BIN = Path(sys.executable).parent


def pins() -> dict[str, str]:
    return parse_pins(REQUIREMENTS.read_text())


def readme_commands() -> tuple[str, str]:
    """The two commands at the top of the README: build the book, run the tests."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|console)\n(.*?)```", readme, re.S)
    commands = [line for block in blocks[:2] for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2, f"the README's first two code blocks hold one command each, found {commands}"
    return commands[0], commands[1]


# The lock -----------------------------------------------------------------------------------------


def test_every_requirement_is_pinned_exactly():
    for line in REQUIREMENTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[^\s=]+", line.strip()), f"not an exact pin: {line!r}"


def test_key_pins():
    p = pins()
    assert p["torch"] == "2.13.0", "torch is pinned to the CPU build that lies on disk; a newer one pulls CUDA"
    assert Version(p["jupyter-book"]).major == 1, "jupyter-book 2.x is a different tool; the book is JB1"
    for name in ("myst-nb", "jupytext", "scikit-learn", "pandas", "matplotlib", "pytest", "jupyterlab"):
        assert name in p, f"{name} is not pinned"


def test_the_tests_run_in_the_locked_environment():
    drift = [
        f"{name} {have or 'missing'} (pinned {want})"
        for name, want in pins().items()
        if not ((have := installed_version(name)) and same_release(have, want))
    ]
    assert drift == [], f"the environment differs from requirements.txt: {drift}"


# Binder -------------------------------------------------------------------------------------------


def test_binder_installs_the_lock_with_cpu_torch_and_nothing_else():
    lines = [l.strip() for l in (ROOT / "binder" / "requirements.txt").read_text().splitlines()]
    lines = [l for l in lines if l and not l.startswith("#")]
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines
    assert "-r ../requirements.txt" in lines
    extra = [l for l in lines if not l.startswith("-")]
    assert extra == [], f"binder/requirements.txt pins packages of its own, a second list to drift: {extra}"
    assert "jupytext" in pins()


def test_binder_python_matches_the_lock():
    assert (ROOT / "binder" / "runtime.txt").read_text().strip() == "python-3.11"


def test_binder_opens_markdown_chapters_as_notebooks():
    overrides = json.loads((ROOT / "binder" / "overrides.json").read_text())
    viewers = overrides["@jupyterlab/docmanager-extension:plugin"]["defaultViewers"]
    assert viewers == {"markdown": "Jupytext Notebook", "myst": "Jupytext Notebook"}
    post = ROOT / "binder" / "postBuild"
    assert os.access(post, os.X_OK), "binder/postBuild must be executable"
    assert "overrides.json" in post.read_text() and "share/jupyter/lab/settings" in post.read_text()
    # The viewer name must be one the installed jupytext extension registers.
    ext = Path(sys.prefix) / "share" / "jupyter" / "labextensions" / "jupyterlab-jupytext"
    assert any("Jupytext Notebook" in f.read_text(errors="ignore") for f in ext.rglob("*.js")), ext


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_jupyterlab_serves_a_chapter_as_a_notebook_with_the_binder_settings(tmp_path):
    """Start the real JupyterLab with Binder's settings and open the template the way Binder would."""
    settings = tmp_path / "settings"
    settings.mkdir()
    (settings / "overrides.json").write_text((ROOT / "binder" / "overrides.json").read_text())
    port, token = free_port(), "gradient-rage-test"
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT}",
           f"--LabApp.app_settings_dir={settings}", "--ServerApp.open_browser=False"]
    if os.geteuid() == 0:  # CI runs as root; JupyterLab refuses root unless told
        cmd.append("--allow-root")
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg")}
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)

    def get(path: str):
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"token {token}"})
        with urllib.request.urlopen(req, timeout=10) as response:
            return json.load(response)

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                get("/api/status")
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "JupyterLab did not answer within 60 s"
                time.sleep(0.5)
        plugin = get("/lab/api/settings/@jupyterlab/docmanager-extension:plugin")
        # overrides.json becomes the schema default every user starts from
        viewers = plugin["schema"]["properties"]["defaultViewers"]["default"]
        assert viewers == {"markdown": "Jupytext Notebook", "myst": "Jupytext Notebook"}
        model = get("/api/contents/notebooks/_template/_template.md?type=notebook&content=1")
        assert model["type"] == "notebook"
        assert any(c["cell_type"] == "code" for c in model["content"]["cells"])
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# Workflows ----------------------------------------------------------------------------------------

WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


def test_workflows_validate_against_the_github_schema():
    assert WORKFLOWS, "no workflows"
    done = subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.github-workflows",
                           *map(str, WORKFLOWS)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_zizmor_finds_nothing_high():
    done = subprocess.run([str(BIN / "zizmor"), "--offline", "--format", "json", *map(str, WORKFLOWS)],
                          capture_output=True, text=True, timeout=120)
    findings = json.loads(done.stdout or "[]")
    high = [f"{f['ident']}: {f['desc']}" for f in findings if f["determinations"]["severity"] == "High"]
    assert high == [], high


def test_publishing_workflow_builds_clean_strict_and_deploys_main_only():
    book = (ROOT / ".github" / "workflows" / "book.yml").read_text()
    assert "set -eo pipefail" in book
    assert "jupyter-book build . -W -n --keep-going" in book
    assert "_build/html/reports/" in book and "if: failure()" in book
    assert "schedule:" in book and "cron:" in book
    assert "actions/deploy-pages@" in book and "github.ref == 'refs/heads/main'" in book
    assert ".jupyter_cache" not in book and "actions/cache" not in book, "the published build must execute from clean"


# README and CI ------------------------------------------------------------------------------------


def test_readme_commands_set_up_then_build_and_test():
    build, tests = readme_commands()
    for command in (build, tests):
        assert command.startswith("python3 -m venv .venv && .venv/bin/python -m pip install -r requirements.txt")
    assert build.endswith("jupyter-book build . -W -n --keep-going")
    assert " -m pytest" in tests


def test_ci_runs_exactly_the_readme_test_command():
    _, tests = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"TEST_COMMAND='{tests}'" in ci
    assert "unshare --net" in ci and "ip link set lo up" in ci


def test_config_holds_the_repository_in_one_place():
    import yaml

    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["repository"]["branch"] == "main"
    assert config["repository"]["url"].startswith("https://github.com/")
    assert config["sphinx"]["config"]["nb_execution_raise_on_error"] is True
    assert config["execute"]["execute_notebooks"] == "cache"
    for pattern in (".*", "**/.*", "_build"):
        assert pattern in config["exclude_patterns"]
    url = config["repository"]["url"]
    others = [p for p in repo_files() if p.name != "_config.yml" and url in p.read_text(errors="ignore")]
    assert others == [], f"the repository URL is repeated outside _config.yml in {others}"
