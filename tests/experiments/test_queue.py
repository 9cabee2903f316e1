"""The queue through the Python API (``exp run``): retries, dependencies, GPUs, cancel, recovery."""

from __future__ import annotations

import json
import subprocess
import threading

import pytest

from colabmagic import experiments as ex
from colabmagic.errors import ColabMagicError
from colabmagic.experiments.runner import proc_stat
from colabmagic.testing import wait_until

from .conftest import pid_gone, read_pids, wait_pids_gone, write_spec


def rows_by_name(project):
    return {r.name: r for r in ex.status_rows(project)}


def test_run_statuses_results_metrics_and_view(tmp_path):
    write_spec(tmp_path / "experiments.json", [
        {"name": "ok", "command": "echo '{\"loss\": 0.25, \"acc\": 0.9}' > $COLABMAGIC_OUTPUT_DIR/metrics.json; echo last line",  # noqa: E501
         "status": "pending", "timeout": 30},
        {"name": "bad", "command": "echo oops >&2; exit 3", "status": "pending", "timeout": 30},
        {"name": "old", "command": "exit 1", "status": "completed", "timeout": 30},
    ])  # fmt: skip
    rows = {r.name: r for r in ex.run(tmp_path, retry_backoff=0)}
    assert rows["ok"].status == "completed"
    assert rows["ok"].metrics == {"loss": 0.25, "acc": 0.9}
    assert rows["ok"].last_line == "last line"
    assert rows["bad"].status == "failed"
    assert rows["bad"].exit_code == 3
    assert rows["bad"].last_line == "oops"
    assert rows["old"].status == "completed"  # the seed's finished entries are not rerun
    result = json.loads((tmp_path / "outputs" / "ok" / "result.json").read_text())
    for key in ("exit_code", "start", "end", "duration", "host", "git_commit", "attempt",
                "peak_memory_kb"):  # fmt: skip
        assert key in result
    # the view: experiments.json shows the statuses, like the seed's file
    shown = {
        e["name"]: e["status"] for e in json.loads((tmp_path / "experiments.json").read_text())
    }
    assert shown == {"ok": "completed", "bad": "failed", "old": "completed"}


def test_retries_then_success(tmp_path):
    write_spec(tmp_path / "experiments.json", [
        {"name": "flaky", "command": 'test "$COLABMAGIC_ATTEMPT" -ge 3', "retries": 3},
        {"name": "never", "command": "exit 2", "retries": 1},
    ])  # fmt: skip
    rows = {r.name: r for r in ex.run(tmp_path, retry_backoff=0.05)}
    assert rows["flaky"].status == "completed"
    assert rows["flaky"].attempts == 3
    assert rows["never"].status == "failed"
    assert rows["never"].attempts == 2


def test_dependencies_order_and_blocked(tmp_path):
    log = tmp_path / "order"
    write_spec(tmp_path / "experiments.json", [
        {"name": "c", "command": f"echo c >> {log}", "depends_on": ["a", "b"]},
        {"name": "b", "command": f"echo b >> {log}", "depends_on": ["a"]},
        {"name": "a", "command": f"echo a >> {log}"},
        {"name": "broken", "command": "exit 1"},
        {"name": "after_broken", "command": f"echo x >> {log}", "depends_on": ["broken"]},
    ])  # fmt: skip
    rows = {r.name: r for r in ex.run(tmp_path, slots=2)}
    assert log.read_text().split() == ["a", "b", "c"]
    assert rows["after_broken"].status == "cancelled"
    assert "dependency 'broken' ended failed" in rows["after_broken"].message


def test_gpu_slots_get_their_own_devices(tmp_path):
    # two experiments that each wait for the other: they must run at the same time
    write_spec(tmp_path / "experiments.json", [
        {"name": f"g{i}", "timeout": 20,
         "command": f"echo $CUDA_VISIBLE_DEVICES > {tmp_path}/dev{i}; touch {tmp_path}/up{i};"
                    f" while [ ! -e {tmp_path}/up{1 - i} ]; do sleep 0.02; done"}
        for i in (0, 1)
    ] + [{"name": "cpu", "command": f"echo \"[$CUDA_VISIBLE_DEVICES]\" > {tmp_path}/devcpu", "gpus": 0},  # noqa: E501
         {"name": "huge", "command": "true", "gpus": 3}])  # fmt: skip
    rows = {r.name: r for r in ex.run(tmp_path, slots=2, gpu_ids=["0", "1"])}
    assert rows["g0"].status == rows["g1"].status == "completed"
    devs = {(tmp_path / f"dev{i}").read_text().strip() for i in (0, 1)}
    assert devs == {"0", "1"}
    assert (tmp_path / "devcpu").read_text().strip() == "[]"
    assert rows["huge"].status == "failed"
    assert "needs 3 GPUs" in rows["huge"].message


def test_cancel_while_running_kills_the_group(tmp_path, cleanup_pids):
    pids = tmp_path / "pids"
    write_spec(tmp_path / "experiments.json", [
        {"name": "long", "command": f"sleep 60 & echo $! > {pids}; wait", "timeout": 60},
        {"name": "queued", "command": "true", "depends_on": ["long"]},
    ])  # fmt: skip
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("rows", ex.run(tmp_path, grace=1)))
    t.start()
    try:
        wait_until(lambda: read_pids(pids), timeout=10)
        cleanup_pids.extend(read_pids(pids))
        ex.cancel(tmp_path, "long")
        t.join(20)
    finally:
        for pid in read_pids(pids):
            if not pid_gone(pid):
                subprocess.run(["kill", "-9", str(pid)], check=False)
    rows = {r.name: r for r in box["rows"]}
    assert rows["long"].status == "cancelled"
    assert rows["queued"].status == "cancelled"
    wait_pids_gone(read_pids(pids))


def test_recovery_kills_orphans_and_requeues(tmp_path, cleanup_pids):
    """A runner that died (kill -9) left a status 'running' and a live process group."""
    write_spec(tmp_path / "experiments.json", [
        {"name": "victim", "command": "echo second run", "retries": 1},
        {"name": "noretry", "command": "echo never", "retries": 0},
    ])  # fmt: skip
    project = ex.Project(tmp_path)
    orphan = subprocess.Popen(["sh", "-c", "sleep 60 & wait"], start_new_session=True)
    cleanup_pids.append(orphan.pid)
    wait_until(lambda: len(ex.runner.group_members(orphan.pid)) == 2, timeout=5)
    members = ex.runner.group_members(orphan.pid)
    for name in ("victim", "noretry"):
        project.write_status(name, {"name": name, "status": "running", "attempt": 1, "rerun": 0})
    record = project.run_record_path("victim")
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"pid": orphan.pid, "pgid": orphan.pid,
                                  "starttime": proc_stat(orphan.pid)[3]}))  # fmt: skip
    reaper = threading.Thread(target=orphan.wait)  # we are the parent here; reap the leader
    reaper.start()
    rows = {r.name: r for r in ex.run(tmp_path, grace=0.5)}
    reaper.join(10)
    wait_pids_gone(members)
    assert rows["victim"].status == "completed"
    assert rows["victim"].attempts == 2
    assert rows["noretry"].status == "interrupted"
    assert not record.exists()


def test_one_runner_per_project(tmp_path):
    write_spec(tmp_path / "experiments.json", [])
    from colabmagic.experiments.daemon import runner_lock

    lock = runner_lock(ex.Project(tmp_path))
    lock.acquire()
    try:
        with pytest.raises(ColabMagicError, match="another colabmagic runner"):
            ex.run(tmp_path)
    finally:
        lock.release()


def test_rerun_and_add_refuses_duplicates(tmp_path):
    write_spec(tmp_path / "experiments.json", [])
    ex.add(tmp_path, "a", "echo run $COLABMAGIC_ATTEMPT")
    with pytest.raises(ColabMagicError, match="already exists"):
        ex.add(tmp_path, "a", "true")
    ex.run(tmp_path)
    assert rows_by_name(tmp_path)["a"].status == "completed"
    assert ex.rerun(tmp_path, "a") == 1
    assert rows_by_name(tmp_path)["a"].status == "pending"
    ex.run(tmp_path)
    assert rows_by_name(tmp_path)["a"].status == "completed"
    assert json.loads((tmp_path / "outputs/a/status.json").read_text())["rerun"] == 1
