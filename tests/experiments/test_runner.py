"""The runner with real processes: env, exit codes, timeouts with grandchildren, logs, cancel."""

from __future__ import annotations

import json
import threading

from colabmagic.experiments.runner import RunRequest, group_members, kill_group, run_process
from colabmagic.testing import wait_until

from .conftest import pid_gone, read_pids, wait_pids_gone


def req(tmp_path, command, **kw):
    return RunRequest(name="exp1", command=command, output_dir=str(tmp_path / "out"), **kw)


def test_success_env_and_logs(tmp_path):
    cmd = ('echo "$COLABMAGIC_EXPERIMENT $COLABMAGIC_ATTEMPT $CUDA_VISIBLE_DEVICES $MINE";'
           ' echo "$COLABMAGIC_OUTPUT_DIR" >&2')  # fmt: skip
    r = run_process(req(tmp_path, cmd, env={"MINE": "x"}, attempt=2, cuda_visible_devices="3"))
    assert r.status == "completed"
    assert r.exit_code == 0
    assert (tmp_path / "out" / "stdout.log").read_text() == "exp1 2 3 x\n"
    assert (tmp_path / "out" / "stderr.log").read_text().strip() == str(tmp_path / "out")


def test_argv_command_and_failure(tmp_path):
    r = run_process(req(tmp_path, ("python3", "-c", "import sys; print('bye'); sys.exit(7)")))
    assert r.status == "failed"
    assert r.exit_code == 7
    assert r.reason == "exit code 7"


def test_missing_program_is_a_failure_not_a_traceback(tmp_path):
    r = run_process(req(tmp_path, ("/nonexistent/prog",)))
    assert r.status == "failed"
    assert "could not start" in r.reason


def test_timeout_kills_the_whole_group(tmp_path, cleanup_pids):
    pids = tmp_path / "pids"
    # a grandchild that ignores SIGTERM and one that does not, both holding the pipes
    cmd = (f"sh -c 'trap \"\" TERM; while :; do sleep 0.05; done' & echo $! >> {pids};"
           f" sleep 60 & echo $! >> {pids}; echo $$ >> {pids}; wait")  # fmt: skip
    r = run_process(req(tmp_path, cmd, timeout=0.5, grace=0.5))
    found = read_pids(pids)
    cleanup_pids.extend(found)
    assert r.status == "timeout"
    assert r.signal in ("SIGTERM", "SIGKILL")
    assert len(found) == 3
    wait_pids_gone(found, timeout=5)
    wait_until(lambda: group_members(r.pid) == [], timeout=5, what="group empty")


def test_leftover_background_process_is_killed_when_leader_exits(tmp_path, cleanup_pids):
    pids = tmp_path / "pids"
    r = run_process(req(tmp_path, f"sleep 60 >/dev/null 2>&1 & echo $! > {pids}; echo done"))
    found = read_pids(pids)
    cleanup_pids.extend(found)
    assert r.status == "completed"
    wait_pids_gone(found, timeout=5)


def test_log_is_capped_keeping_the_tail(tmp_path):
    cmd = ("python3", "-c", "import sys\nfor i in range(20000): print(f'line {i:05d}')")
    r = run_process(req(tmp_path, cmd, log_limit=16 * 1024))
    assert r.status == "completed"
    text = (tmp_path / "out" / "stdout.log").read_text()
    assert len(text) <= 16 * 1024 + 100
    assert text.endswith("line 19999\n")
    assert "bytes dropped by colabmagic" in text.splitlines()[0]


def test_cancel_stops_the_group(tmp_path, cleanup_pids):
    pids = tmp_path / "pids"
    flag = threading.Event()
    box = {}

    def target():
        box["r"] = run_process(
            req(tmp_path, f"sleep 60 & echo $! > {pids}; wait", grace=1),
            should_cancel=lambda: "cancelled" if flag.is_set() else None,
        )

    t = threading.Thread(target=target)
    t.start()
    wait_until(lambda: read_pids(pids), timeout=10)
    cleanup_pids.extend(read_pids(pids))
    flag.set()
    t.join(10)
    assert box["r"].status == "cancelled"
    wait_pids_gone(read_pids(pids))


def test_peak_memory_is_measured(tmp_path):
    cmd = ("python3", "-c", "import time; x = bytearray(150_000_000); time.sleep(1.2)")
    r = run_process(req(tmp_path, cmd))
    assert r.peak_memory_kb is not None
    assert r.peak_memory_kb > 140_000
    assert json.dumps(r.to_dict())


def test_kill_group_of_an_orphaned_group(tmp_path, cleanup_pids):
    import subprocess

    proc = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 60 & wait"], start_new_session=True)
    cleanup_pids.append(proc.pid)
    wait_until(lambda: len(group_members(proc.pid)) == 2, timeout=5)
    members = group_members(proc.pid)
    killed = []
    t = threading.Thread(target=lambda: killed.extend(kill_group(proc.pid, grace=0.3)))
    t.start()
    proc.wait(10)  # we are its parent here; reap it so it does not stay a zombie
    t.join(10)
    assert sorted(killed) == sorted(members)
    wait_pids_gone(members)
    assert all(pid_gone(p) for p in members)
