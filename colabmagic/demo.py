"""``colabmagic demo``: run the quick-start notebook headless and show what it printed.

The notebook (``notebooks/quickstart.ipynb``, shipped as package data) connects to the embedded
default -- a local agent and kernel through the full link, with the GPU mock -- so the demo needs
no remote host. It is executed by nbclient exactly as Jupyter would run it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from importlib import resources

QUICKSTART = "quickstart.ipynb"


def notebook_path() -> str:
    """Where the packaged quick-start notebook is."""
    return str(resources.files("colabmagic") / "resources" / QUICKSTART)


def run_notebook(path: str | None = None, *, timeout: float = 300.0, output: str | None = None):
    """Execute a notebook with nbclient; return the executed ``nbformat`` node.

    Raises ``nbclient.exceptions.CellExecutionError`` when a cell fails.
    """
    import nbformat
    from nbclient import NotebookClient

    path = path or notebook_path()
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": os.getcwd()}},
    )
    client.execute()
    if output:
        nbformat.write(nb, output)
    return nb


def render(nb) -> Iterator[str]:
    """Text lines showing each code cell and its outputs, as a terminal can."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        yield f"In [{cell.execution_count}]: " + cell.source.replace("\n", "\n    ...: ")
        for out in cell.outputs:
            if out.output_type == "stream":
                yield out.text.rstrip("\n")
            elif out.output_type in ("display_data", "execute_result"):
                data = out.get("data", {})
                for mime in data:
                    if mime.startswith("image/"):
                        yield f"[{mime} figure, {len(data[mime])} base64 characters]"
                if "text/plain" in data and not any(m.startswith("image/") for m in data):
                    yield data["text/plain"]
            elif out.output_type == "error":
                yield f"{out.ename}: {out.evalue}"
        yield ""
