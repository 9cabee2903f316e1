"""The Dask backend on a small in-process LocalCluster with a GPU resource."""

from __future__ import annotations

import json

import pytest

from colabmagic import experiments as ex
from colabmagic.experiments.backends.dask import DaskBackend
from colabmagic.experiments.queue import Queue
from colabmagic.testing import require, wait_until

from .conftest import read_pids, wait_pids_gone, write_spec

try:
    import distributed
except ImportError:  # skipped by the fixture, or failed under COLABMAGIC_REQUIRE_ALL=1
    distributed = None


@pytest.fixture(scope="module")
def client():
    require(distributed is not None, "dask.distributed is not installed (colabmagic[dask])")
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, resources={"GPU": 2},
        dashboard_address=":0",
    ) as cluster, distributed.Client(cluster) as cl:  # fmt: skip
        yield cl


def test_dask_runs_timeouts_and_collects_outputs(tmp_path, client, cleanup_pids):
    pids = tmp_path / "pids"
    write_spec(tmp_path / "experiments.json", [
        {"name": "ok", "command": "echo on $COLABMAGIC_EXPERIMENT; echo '{\"m\": 1}' > $COLABMAGIC_OUTPUT_DIR/metrics.json"},  # noqa: E501
        {"name": "slow", "command": f"sleep 60 & echo $! > {pids}; wait", "timeout": 0.5},
        {"name": "after", "command": "exit 2", "depends_on": ["ok"]},
    ])  # fmt: skip
    project = ex.Project(tmp_path)
    queue = Queue(project, slots=2, backend=DaskBackend(client), grace=0.5)
    queue.load(ex.load_experiments(project.spec_path))
    queue.run_until_idle()
    cleanup_pids.extend(read_pids(pids))
    rows = {r.name: r for r in ex.status_rows(project)}
    assert rows["ok"].status == "completed"
    assert rows["ok"].last_line == "on ok"
    assert rows["ok"].metrics == {"m": 1}
    assert rows["slow"].status == "timeout"
    assert rows["after"].status == "failed"
    wait_pids_gone(read_pids(pids))
    result = json.loads((tmp_path / "outputs/ok/result.json").read_text())
    assert result["exit_code"] == 0


def test_dask_cancel_kills_the_group_on_the_worker(tmp_path, client, cleanup_pids):
    pids = tmp_path / "pids"
    write_spec(tmp_path / "experiments.json",
               [{"name": "long", "command": f"sleep 60 & echo $! > {pids}; wait", "timeout": 60}])  # fmt: skip  # noqa: E501
    project = ex.Project(tmp_path)
    queue = Queue(project, backend=DaskBackend(client), grace=0.5)
    queue.load(ex.load_experiments(project.spec_path))
    queue.schedule()
    wait_until(lambda: read_pids(pids), timeout=10)
    cleanup_pids.extend(read_pids(pids))
    queue.running["long"].handle.cancel()
    assert queue.wait(20) == ["long"]
    assert queue.statuses["long"]["status"] == "cancelled"
    wait_pids_gone(read_pids(pids))
