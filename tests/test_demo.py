"""The demo notebook runs headless through nbclient, so `make demo` cannot rot."""

from __future__ import annotations

import base64
import filecmp
import os

from click.testing import CliRunner

from colabmagic.cli import main
from colabmagic.demo import notebook_path, run_notebook
from colabmagic.testing import require

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_executes_with_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nb = run_notebook(output=str(tmp_path / "out.ipynb"))
    code = [c for c in nb.cells if c.cell_type == "code"]
    plot_cell = next(c.outputs for c in code if "plt.plot" in c.source)
    assert plot_cell[0]["text"].strip() == "45"
    png = next(o for o in plot_cell if o["output_type"] == "display_data")
    assert base64.b64decode(png["data"]["image/png"])[:4] == b"\x89PNG"
    result = next(c.outputs for c in code if c.source.endswith("6 * 7"))
    assert result[0]["output_type"] == "execute_result"
    assert result[0]["data"]["text/plain"] == "42"
    assert (tmp_path / "out.ipynb").exists()


def test_repository_notebook_is_the_packaged_one():
    repo_nb = os.path.join(REPO, "notebooks", "quickstart.ipynb")
    require(os.path.exists(repo_nb), "notebooks/ is absent (tests run from an sdist)")
    assert filecmp.cmp(repo_nb, notebook_path(), shallow=False)


def test_failing_notebook_cell_fails_nbclient(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("%load_ext colabmagic"),
        nbformat.v4.new_code_cell("%colab_connect --local"),
        nbformat.v4.new_code_cell("%%gpu_run\nraise RuntimeError('stop here')"),
        nbformat.v4.new_code_cell("print('never runs')"),
    ]
    path = tmp_path / "fail.ipynb"
    nbformat.write(nb, path)
    runner = CliRunner()
    res = runner.invoke(main, ["demo", "--notebook", str(path), "--timeout", "60"])
    assert res.exit_code == 1
    assert "RuntimeError: stop here" in res.output  # the remote traceback, not ours
    assert "colabmagic/session.py" not in res.output
