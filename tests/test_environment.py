"""The environment around the chapters: the lock, Binder, the workflows, CI and the README commands.

Readers run the book three ways (online, local JupyterLab, Binder); each of these tests protects
one of them from silently drifting away from the others.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from _shared.env_check import installed_version, normalize, parse_pins, same_release
from conftest import ROOT, free_port, repo_files
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


def test_the_lock_pins_every_package_the_handshake_checks():
    """check_environment() skips a package the lock does not pin, so an unpinned key package would
    never be reported to a reader whose version differs."""
    from _shared.env_check import KEY_PACKAGES

    unpinned = [name for name in KEY_PACKAGES if normalize(name) not in pins()]
    assert unpinned == [], f"the handshake checks {unpinned}, which requirements.txt does not pin"


def test_the_lock_installs_jupyter_book_1_and_no_cuda_wheels():
    p = pins()
    assert Version(p["jupyter-book"]).major == 1, f"jupyter-book {p['jupyter-book']}: 2.x is a different tool"
    cuda = [name for name in p if name.startswith(("nvidia-", "triton", "cuda-"))]
    assert cuda == [], f"the lock pulls CUDA wheels {cuda}: torch must stay the CPU build"


def test_the_tests_run_in_the_locked_environment():
    drift = [
        f"{name} {have or 'missing'} (pinned {want})"
        for name, want in pins().items()
        if not ((have := installed_version(name)) and same_release(have, want))
    ]
    assert drift == [], f"the environment differs from requirements.txt: {drift}"


# Binder -------------------------------------------------------------------------------------------


def binder_requirements() -> tuple[list[str], list[Path], list[str]]:
    """(extra index URLs, requirement files it includes resolved from binder/, its own requirement lines)."""
    index_urls, included, own = [], [], []
    for line in (ROOT / "binder" / "requirements.txt").read_text().splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        option, _, value = line.partition(" ")
        if option == "--extra-index-url":
            index_urls.append(value.strip())
        elif option in ("-r", "--requirement"):
            included.append((ROOT / "binder" / value.strip()).resolve())
        else:
            own.append(line)
    return index_urls, included, own


def test_binder_installs_the_lock_with_cpu_torch_and_nothing_else():
    index_urls, included, own = binder_requirements()
    assert included == [REQUIREMENTS.resolve()], f"binder must install the root lock, includes {included}"
    assert own == [], f"binder/requirements.txt pins packages of its own, a second list to drift: {own}"
    assert any(urlsplit(u).path.rstrip("/").endswith("/whl/cpu") for u in index_urls), (
        f"no CPU wheel index among {index_urls}: Binder would install the multi-GB CUDA torch")


def test_binder_python_is_the_python_the_lock_is_tested_with():
    """The lock is resolved and tested on this interpreter; Binder must build the same minor version."""
    runtime = (ROOT / "binder" / "runtime.txt").read_text().strip()
    here = f"python-{sys.version_info.major}.{sys.version_info.minor}"
    assert runtime == here, f"binder/runtime.txt asks for {runtime}; the lock is tested on {here}"


def test_binder_opens_markdown_chapters_as_notebooks():
    overrides = json.loads((ROOT / "binder" / "overrides.json").read_text())
    viewers = overrides["@jupyterlab/docmanager-extension:plugin"]["defaultViewers"]
    assert viewers == {"markdown": "Jupytext Notebook", "myst": "Jupytext Notebook"}
    post = ROOT / "binder" / "postBuild"
    assert os.access(post, os.X_OK), "binder/postBuild must be executable"
    # The viewer name must be one the installed jupytext extension registers.
    ext = Path(sys.prefix) / "share" / "jupyter" / "labextensions" / "jupyterlab-jupytext"
    assert any("Jupytext Notebook" in f.read_text(errors="ignore") for f in ext.rglob("*.js")), ext


def test_binder_postbuild_installs_the_overrides_where_jupyterlab_reads_them(tmp_path):
    """Run postBuild as repo2docker does, against a throwaway environment, and look at what it wrote."""
    import venv

    env_dir = tmp_path / "image-env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    done = subprocess.run([str(ROOT / "binder" / "postBuild")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{env_dir / 'bin'}{os.pathsep}{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    written = env_dir / "share" / "jupyter" / "lab" / "settings" / "overrides.json"
    assert written.is_file(), f"postBuild did not write {written}"
    assert json.loads(written.read_text()) == json.loads((ROOT / "binder" / "overrides.json").read_text())



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


ZIZMOR_FINDINGS_EXIT = {0, 10, 11, 12, 13, 14}  # 0: none; 10-14: findings, by highest severity


def zizmor(paths: list[Path]) -> list[dict]:
    done = subprocess.run([str(BIN / "zizmor"), "--offline", "--format", "json", *map(str, paths)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode in ZIZMOR_FINDINGS_EXIT, f"zizmor failed (exit {done.returncode}):\n{done.stderr[-2000:]}"
    findings = json.loads(done.stdout)
    assert isinstance(findings, list), done.stdout[:500]
    return findings


def test_zizmor_finds_what_it_should_in_a_known_bad_workflow(tmp_path):
    """Without this, a zizmor that audits nothing would pass the test below."""
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text("name: bad\non: pull_request_target\npermissions: write-all\njobs:\n  bad:\n"
                   "    runs-on: ubuntu-latest\n    steps:\n      - uses: actions/checkout@v4\n"
                   "      - run: echo \"${{ github.event.pull_request.title }}\"\n")
    high = {f["ident"] for f in zizmor([bad]) if f["determinations"]["severity"] == "High"}
    assert {"dangerous-triggers", "template-injection"} <= high, high


def test_zizmor_finds_nothing_high():
    high = [f"{f['ident']}: {f['desc']}" for f in zizmor(WORKFLOWS) if f["determinations"]["severity"] == "High"]
    assert high == [], high


def run_lines(step: dict) -> list[str]:
    """The shell lines a step runs, comments dropped (a comment that names a command runs nothing)."""
    return [line.split(" #")[0].strip() for line in step.get("run", "").splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_publishing_workflow_builds_clean_strict_and_deploys_main_only():
    import yaml

    book = yaml.safe_load((ROOT / ".github" / "workflows" / "book.yml").read_text())
    triggers = book[True] if True in book else book["on"]  # YAML 1.1 reads the key `on` as True
    assert triggers["schedule"][0]["cron"], "a scheduled build catches rot from outside the repository"
    build = book["jobs"]["build"]
    steps = build["steps"]
    builds = [s for s in steps if any(l.startswith("jupyter-book build . -W -n --keep-going") for l in run_lines(s))]
    assert len(builds) == 1, "one step builds the book with -W -n --keep-going"
    assert "set -eo pipefail" in run_lines(builds[0]), "the build's exit status must survive `| tee`"
    reports = [s for s in steps if s.get("if") == "failure()" and "upload-artifact" in s.get("uses", "")]
    assert reports and "_build/html/reports/" in reports[0]["with"]["path"], "failed builds upload their reports"
    assert not any("actions/cache" in s.get("uses", "") or ".jupyter_cache" in str(s) for s in steps), (
        "the published build must execute from clean")
    deploy = book["jobs"]["deploy"]
    assert "refs/heads/main" in deploy["if"] and deploy["needs"] == "build"
    assert any("actions/deploy-pages@" in s.get("uses", "") for s in deploy["steps"])


# README and CI ------------------------------------------------------------------------------------


def test_readme_commands_set_up_then_build_and_test():
    build, tests = readme_commands()
    for command in (build, tests):
        assert command.startswith("python3 -m venv .venv && .venv/bin/python -m pip install -r requirements.txt")
    assert build.endswith("jupyter-book build . -W -n --keep-going")
    assert " -m pytest" in tests


def test_ci_runs_exactly_the_readme_test_command():
    """Ask .ci/run what it would run (CI_DRY_RUN=1): the README's test command, verbatim, offline."""
    _, tests = readme_commands()
    done = subprocess.run(["bash", str(ROOT / ".ci" / "run")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "CI_DRY_RUN": "1"})
    assert done.returncode == 0, done.stderr
    would = [line.removeprefix("would run: ") for line in done.stdout.splitlines() if line.startswith("would run: ")]
    assert len(would) == 2, would
    assert would[1] == tests or (would[1].startswith("unshare --net bash -c 'ip link set lo up && ")
                                 and would[1].endswith(f"&& {tests}'")), (
        f"CI would run {would[1]!r}, the README says {tests!r}")


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


# The next release ---------------------------------------------------------------------------------

RANGES = ROOT / "binder" / "ranges.txt"


def ranges():
    from packaging.requirements import Requirement

    return [Requirement(line) for line in RANGES.read_text().splitlines() if line.strip() and not line.startswith("#")]


def test_the_ranges_keep_jupyter_book_1_and_hold_every_pin_of_the_lock():
    found = {normalize(r.name): r for r in ranges()}
    assert not found["jupyter-book"].specifier.contains("2.0.0"), "jupyter-book 2 is a different tool"
    p = pins()
    unpinned = sorted(name for name in found if name not in p)
    assert unpinned == [], f"binder/ranges.txt names packages the lock does not pin: {unpinned}"
    outside = [f"{name}=={p[name]} is outside {r.specifier}" for name, r in found.items()
               if not r.specifier.contains(Version(p[name]).public, prereleases=True)]
    assert outside == [], outside


def test_next_release_workflow_builds_the_newest_releases_and_reports_with_least_permissions():
    import yaml

    flow = yaml.safe_load((ROOT / ".github" / "workflows" / "next-release.yml").read_text())
    triggers = flow[True] if True in flow else flow["on"]
    assert triggers["schedule"][0]["cron"] and flow["permissions"] == {}
    build, report = flow["jobs"]["build"], flow["jobs"]["issue"]
    assert build["permissions"] == {"contents": "read"}
    lines = [line for step in build["steps"] for line in run_lines(step)]
    assert any("--index-url https://download.pytorch.org/whl/cpu" in l and "torch" in l for l in lines), (
        "torch must come from PyTorch's CPU index")
    assert any(l.startswith("python -m pip install") and "-r binder/ranges.txt" in l for l in lines)
    assert not any("requirements.txt" in l for l in lines), "the next-release build must not install the lock"
    assert any(l.startswith("jupyter-book build . -W -n --keep-going") for l in lines)
    assert not any("actions/cache" in s.get("uses", "") for s in build["steps"]), "it builds from clean"
    writes = [s for s in build["steps"] if "tests/next_release.py" in s.get("run", "")]
    assert writes and writes[0]["if"] == "failure()"
    assert report["if"] == "failure()" and report["needs"] == "build"
    assert report["permissions"] == {"issues": "write"}
    assert any("gh issue create" in l for s in report["steps"] for l in run_lines(s))


def test_next_release_report_names_the_chapter_and_the_cell(tmp_path):
    """An execution report as nbclient writes it, for a real cell of a real chapter."""
    import jupytext
    import next_release
    from conftest import notebook_docs

    doc = notebook_docs()[1]
    cells = [c.source for c in jupytext.read(ROOT / f"{doc}.md").cells if c.cell_type == "code"]
    reports = tmp_path / "reports" / f"{doc}.err.log"
    reports.parent.mkdir(parents=True)
    reports.write_text("Traceback (most recent call last):\nnbclient.exceptions.CellExecutionError: "
                       "An error occurred while executing the following cell:\n------------------\n"
                       f"{cells[2]}\n------------------\n\n\nAssertionError: margin 0.01 < 0.02\n")
    found = next_release.failures(tmp_path / "reports")
    assert [(f.doc, f.cell, f.error) for f in found] == [(doc, 3, "AssertionError: margin 0.01 < 0.02")]
    title, body = next_release.issue("", found, next_release.differences("numpy==2.4.6\n", "numpy==2.5.0\n"))
    assert doc.rsplit("/", 1)[-1] in title and "(cell 3)" in title
    assert "numpy 2.4.6 -> 2.5.0" in body
