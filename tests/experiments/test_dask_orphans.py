"""exp run --backend dask on a real cluster (`dask scheduler` + two `dask worker` processes):
a worker SIGKILLed mid-run takes its run with it; the rescheduled run completes, once."""

from __future__ import annotations

import time

import pytest

from colabmagic import experiments as ex
from colabmagic.experiments.backends.dask import DaskBackend
from colabmagic.experiments.queue import Queue
from colabmagic.testing import require, wait_until

from .conftest import pid_gone, read_pids, write_spec

try:
    import distributed
except ImportError:  # the fixture skips, or fails under COLABMAGIC_REQUIRE_ALL=1
    distributed = None


@pytest.fixture
def cluster(tmp_path):
    require(distributed is not None, "dask.distributed is not installed (colabmagic[dask])")
    from colabmagic.testing_dask import DaskProcesses

    with DaskProcesses(tmp_path / "dask", n_workers=2, nthreads=1, resources="GPU=1") as c:
        yield c


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


def test_worker_sigkill_kills_its_run_and_the_rescheduled_run_completes_once(
    tmp_path, cluster, cleanup_pids
):
    log, pids, marker = tmp_path / "log", tmp_path / "pids", tmp_path / "marker"
    # the first attempt runs long (a shell and a sleep child); the rerun ends at once
    command = (
        f"echo start $$ >> {log}; "
        f"if [ -e {marker} ]; then sleep 0.2; else touch {marker}; "
        f"sleep 120 & echo $$ $! >> {pids}; wait; fi; echo done $$ >> {log}"
    )
    write_spec(tmp_path / "experiments.json", [{"name": "train", "command": command,
                                                "timeout": 300, "gpus": 1}])  # fmt: skip
    project = ex.Project(tmp_path)
    backend = DaskBackend(cluster.address)
    try:
        queue = Queue(project, backend=backend, grace=2.0)
        queue.load(ex.load_experiments(project.spec_path))
        queue.schedule()
        first = wait_until(lambda: read_pids(pids), timeout=60, what="the first attempt")
        cleanup_pids.extend(first)
        worker_pid = _ppid(first[0])  # the shell is the worker's child
        victim = next(n for n, p in cluster.workers.items() if p.pid == worker_pid)
        cluster.kill(victim)
        killed_at = time.monotonic()
        wait_until(lambda: all(pid_gone(p) for p in first), timeout=5,
                   what="the old run's shell and sleep to die with their worker")  # fmt: skip
        assert time.monotonic() - killed_at <= 5
        assert queue.wait(120) == ["train"]
    finally:
        backend.close()
    assert queue.statuses["train"]["status"] == "completed"
    lines = log.read_text().split()
    starts = [lines[i + 1] for i in range(0, len(lines), 2) if lines[i] == "start"]
    dones = [lines[i + 1] for i in range(0, len(lines), 2) if lines[i] == "done"]
    assert len(starts) == 2  # the killed attempt and the rerun
    assert len(dones) == 1  # completed once: the killed attempt never reached its end
    assert dones[0] == starts[1] != starts[0]
