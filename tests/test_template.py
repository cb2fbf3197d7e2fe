"""The chapter template is executed, never listed in the TOC: a skeleton that does not run would
teach every new chapter a broken pattern."""

from __future__ import annotations

import jupytext
import nbclient
from conftest import NOTEBOOKS


def test_template_executes_and_prints_no_environment_warning():
    path = NOTEBOOKS / "_template" / "_template.md"
    nb = jupytext.read(path)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    handshake = nb.cells[[c.cell_type for c in nb.cells].index("code")]
    printed = "".join(o.get("text", "") for o in handshake.outputs if o.output_type == "stream")
    assert printed == "", f"the environment handshake complained in the test environment: {printed}"
