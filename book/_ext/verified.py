"""Sphinx extension: every executed page ends with the run that verified it.

A reader who gets a different number needs to know what the book's number came from: when the page
was executed, with which versions of the packages that decide the numbers, on which CPU, and which
kernels PyTorch picked there (``torch.backends.cpu.get_cpu_capability()``: the portability matrix
forces other ones through ``ATEN_CPU_CAPABILITY``). Everything is computed when the book is built:
the execution time comes from myst-nb's execution record of the page (from the execution cache when
the page was not executed again), the rest from the environment the build runs in, which is the one
the notebooks' kernels run in. PyTorch is asked in a child process of the same interpreter, with the
same environment variables, so the Sphinx process does not import it.

The box is plain docutils nodes (a container with paragraphs), so every builder renders it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from docutils import nodes
from sphinx.util import logging

logger = logging.getLogger(__name__)

PACKAGES = ("torch", "numpy", "scikit-learn", "onnxruntime", "jupyter-book")
CSS_CLASS = "gr-verified"

PROBE = """
import json, torch
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(),
                  "threads": torch.get_num_threads(),
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}))
"""


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)
        if names:
            return names[0].strip()
    return platform.processor() or platform.machine()


def torch_probe() -> dict:
    """What PyTorch sees in a process like the kernels': CPU capability, threads, GPU."""
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"verified: asking PyTorch for its CPU capability failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict:
    probe = torch_probe()
    return {
        "built": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": {"python": platform.python_version(), **{name: version(name) for name in PACKAGES}},
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        **probe,
    }


def collect(app) -> None:
    app.env.gr_verified = environment()  # once per build, before any page is read


def exec_data(env, docname: str) -> dict | None:
    try:
        from myst_nb.sphinx_ import NbMetadataCollector
    except ImportError:  # pragma: no cover - myst-nb is how the book executes at all
        return None
    return NbMetadataCollector.get_exec_data(env, docname)


def paragraph(label: str, text: str) -> nodes.paragraph:
    para = nodes.paragraph()
    para += nodes.strong(text=f"{label}: ")
    para += nodes.Text(text)
    return para


def box(info: dict, data: dict) -> nodes.container:
    executed = dt.datetime.fromtimestamp(data["mtime"], dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    runtime = f" in {data['runtime']:.0f} s" if data.get("runtime") is not None else ""
    versions = ", ".join(f"{name} {v}" for name, v in info["versions"].items())
    container = nodes.container(classes=[CSS_CLASS])
    container += nodes.rubric(text="Last verified")
    container += paragraph("Executed", f"{executed}{runtime}; build started {info['built']}")
    container += paragraph("Versions", versions)
    container += paragraph("Machine", f"{info['cpu']}, {info['cores']} cores usable, PyTorch CPU kernels "
                                      f"{info['capability']}, {info['threads']} torch threads, GPU: {info['gpu']}")
    return container


def add_box(app, doctree, docname) -> None:
    data = exec_data(app.env, docname)
    info = getattr(app.env, "gr_verified", None)
    if not data or info is None:
        return  # not an executed page
    if not data.get("succeeded", False):
        # Raise-on-error already fails the build; should a failed page be written anyway, it says so
        # at the top instead of claiming it was verified.
        logger.warning(f"{docname} did not execute successfully ({data.get('error')})", type="verified")
        warning = nodes.warning()
        warning += nodes.paragraph(text=f"This page failed to execute ({data.get('error')}): its numbers "
                                        "and figures are missing or stale. Do not trust them.")
        doctree.insert(0, warning)
        return
    doctree += box(info, data)


def setup(app):
    app.connect("builder-inited", collect)
    app.connect("doctree-resolved", add_box)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
