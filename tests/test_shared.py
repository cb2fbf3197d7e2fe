"""The shared code chapters import from notebooks/_shared/: the environment handshake and timing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _shared import env_check
from _shared.env_check import Mismatch, compare, mismatch_message, parse_pins, same_release
from _shared.timing import measure
from conftest import ROOT


def test_parse_pins_reads_pinned_lines_and_normalises_names():
    text = "# comment\nScikit_Learn==1.9.1\ntorch==2.13.0  # cpu\nuvicorn[standard]==0.54.0\nrequests>=2\n-r other.txt\n"
    assert parse_pins(text) == {"scikit-learn": "1.9.1", "torch": "2.13.0", "uvicorn": "0.54.0"}


@pytest.mark.parametrize(
    ("installed", "pinned", "same"),
    [
        ("2.13.0", "2.13.0", True),
        ("2.13.0+cpu", "2.13.0", True),  # a CPU or CUDA build of the pinned release is that release
        ("2.13.0+cu130", "2.13.0", True),
        ("2.12.1", "2.13.0", False),
        ("2.13.0rc1", "2.13.0", False),
        ("2.13.0+cu130", "2.13.0+cpu", False),  # a pin that names a build means that build
    ],
)
def test_same_release(installed, pinned, same):
    assert same_release(installed, pinned) is same


def test_compare_reports_missing_and_different_but_ignores_unpinned():
    pins = {"torch": "2.13.0", "pandas": "3.1.1", "numpy": "2.4.6"}
    have = {"torch": "2.13.0+cpu", "pandas": "2.2.3"}
    found = compare(pins, ["torch", "pandas", "numpy", "not-pinned-anywhere"], version_of=have.get)
    assert found == [Mismatch("pandas", "3.1.1", "2.2.3"), Mismatch("numpy", "2.4.6", None)]


def test_mismatch_message_is_one_actionable_line():
    req = Path("/books/gr/requirements.txt")
    line = mismatch_message([Mismatch("pandas", "3.1.1", "2.2.3"), Mismatch("numpy", "2.4.6", None)], req, "/usr/bin/python3")
    assert "\n" not in line
    assert "pandas 2.2.3 is installed, pinned 3.1.1" in line
    assert "numpy is missing (pinned 2.4.6)" in line
    assert line.endswith("Fix: /usr/bin/python3 -m pip install -r /books/gr/requirements.txt")


def test_fix_command_quotes_paths_with_spaces():
    cmd = env_check.fix_command(Path("/my books/requirements.txt"), "/opt/py 3/python")
    assert cmd == "'/opt/py 3/python' -m pip install -r '/my books/requirements.txt'"


def test_check_environment_is_silent_when_everything_matches(tmp_path, capsys):
    versions = {n: env_check.installed_version(n) for n in env_check.KEY_PACKAGES}
    (tmp_path / "requirements.txt").write_text("".join(f"{n}=={v}\n" for n, v in versions.items() if v))
    chapter = tmp_path / "notebooks" / "01-some-chapter"
    chapter.mkdir(parents=True)
    assert env_check.check_environment(start=chapter) is None
    assert capsys.readouterr().out == ""


def test_check_environment_prints_the_difference_and_the_fix(tmp_path, capsys):
    (tmp_path / "requirements.txt").write_text("numpy==0.0.1\n")
    line = env_check.check_environment(start=tmp_path)
    out = capsys.readouterr().out
    assert out == line + "\n"
    assert f"numpy {env_check.installed_version('numpy')} is installed, pinned 0.0.1" in line
    assert str(tmp_path / "requirements.txt") in line


def test_check_environment_without_requirements_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(env_check, "find_requirements", lambda start=None: None)
    line = env_check.check_environment(start=tmp_path, echo=False)
    assert "No requirements.txt found" in line


def test_describe_machine_reports_what_the_status_page_and_benchmark_print():
    m = env_check.describe_machine()
    assert set(m) == {"cpu", "cores", "memory_gb", "gpu", "python"}
    assert m["cores"] >= 1 and m["memory_gb"] > 0 and m["cpu"]
    assert m["gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")


def test_find_requirements_walks_up_to_the_repository(tmp_path):
    assert env_check.find_requirements(ROOT / "notebooks" / "_template") == ROOT / "requirements.txt"


def test_measure_warms_up_then_times_every_round():
    calls = []
    timing = measure(lambda: calls.append(1), repeats=5, number=3, warmup=2)
    assert len(calls) == 2 + 5 * 3
    assert len(timing.times) == 5
    lo, hi = timing.iqr
    assert min(timing.times) <= lo <= timing.median <= hi <= max(timing.times)
    assert timing.threads == torch.get_num_threads()
    assert "torch threads" in str(timing)


def test_measure_reports_the_blas_thread_limit_it_ran_under():
    import numpy as np
    from threadpoolctl import threadpool_limits

    a = np.ones((64, 64))
    with threadpool_limits(limits=1):
        timing = measure(lambda: a @ a, repeats=2)
    assert timing.blas_threads == 1
    assert "BLAS threads 1" in str(timing)


def test_measure_reports_per_call_seconds():
    import time

    timing = measure(lambda: time.sleep(0.01), repeats=3, number=2, warmup=0)
    assert 0.009 < timing.median < 0.5


def test_measure_rejects_nonsense_arguments():
    with pytest.raises(ValueError):
        measure(lambda: None, repeats=0)


# The book's seed ----------------------------------------------------------------------------------


def test_book_seed_is_zero_by_default_and_follows_the_environment():
    from _shared.seed import ENV_VAR, book_seed

    assert book_seed({}) == 0
    assert book_seed({ENV_VAR: ""}) == 0
    assert book_seed({ENV_VAR: " 7 "}) == 7


@pytest.mark.parametrize("raw", ["one", "1.5", "-3"])
def test_book_seed_rejects_what_no_generator_accepts(raw):
    from _shared.seed import ENV_VAR, book_seed

    with pytest.raises(ValueError, match=rf"GRADIENT_RAGE_SEED={raw!r}|GRADIENT_RAGE_SEED={raw}"):
        book_seed({ENV_VAR: raw})


def test_seed_sets_keep_the_published_numbers_and_never_overlap_between_book_seeds():
    from _shared.seed import seeds

    assert seeds(10, seed=0) == list(range(10)), "with the default seed a chapter's seed set is unchanged"
    sets = [set(seeds(30, seed=s)) for s in range(4)]
    assert all(len(s) == 30 for s in sets)
    assert all(a.isdisjoint(b) for i, a in enumerate(sets) for b in sets[i + 1:])


def test_every_chapter_takes_its_seed_from_the_shared_module():
    """A chapter that sets its own seed literal would ignore GRADIENT_RAGE_SEED, and the matrix would
    test nothing for it. Checked on the code cells (jupytext), not on the prose."""
    import ast

    import jupytext
    from conftest import notebook_docs

    offenders = []
    for doc in [*notebook_docs(), "notebooks/_template/_template"]:
        notebook = jupytext.read(ROOT / f"{doc}.md")
        code = "\n".join(c.source for c in notebook.cells if c.cell_type == "code"
                         and not c.source.lstrip().startswith(("%", "!")))
        tree = ast.parse(code)
        imports = any(isinstance(n, ast.ImportFrom) and n.module == "_shared.seed" for n in ast.walk(tree))
        literal = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Assign)
                   and any(isinstance(t, ast.Name) and t.id == "SEED" for t in n.targets)]
        uses_seed = "SEED" in code or "seed" in code.lower()
        if literal or (uses_seed and not imports):
            offenders.append(f"{doc}: {'assigns SEED itself' if literal else 'does not import _shared.seed'}")
    assert offenders == [], "\n".join(offenders)


def test_diagram_draws_every_box_and_arrow_and_names_a_missing_box():
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
    from _shared.diagram import draw

    boxes = {"a": (0, 0, "data"), "b": (3, 0, "model\ntrained"), "c": (3, -1.5, "store")}
    fig = draw(boxes, [("a", "b", "trains"), ("b", "c", "")])
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert {"data", "model\ntrained", "store", "trains"} <= set(texts), texts
    assert sum(isinstance(p, FancyBboxPatch) for p in ax.patches) == 3
    arrows = [p for p in ax.patches if isinstance(p, FancyArrowPatch)]
    assert len(arrows) == 2
    plt.close(fig)
    with pytest.raises(KeyError, match="no box named 'z'"):
        draw(boxes, [("a", "z", "typo")])
