"""The daemon end to end with real git (bare remote, user clone, GPU-host clone) and processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from colabmagic import experiments as ex
from colabmagic.testing import wait_until

from .conftest import git, pid_gone, read_pids, wait_pids_gone


def no_conflict_markers(repo):
    out = subprocess.run(["git", "grep", "-n", "-e", "<<<<<<<", "-e", ">>>>>>>"], cwd=repo,
                         capture_output=True, text=True, check=False)  # fmt: skip
    return out.stdout == ""


def test_daemon_end_to_end_with_concurrent_user_push_and_sync(repos, start_daemon, tmp_path):
    # A pre-push hook on the GPU host makes the user push while the daemon's first push of a
    # result is in flight, so that push is rejected and must be rebased and retried.
    marker = tmp_path / "raced"
    hook = repos.host / ".git" / "hooks" / "pre-push"
    hook.write_text(f"""#!/bin/sh
if [ ! -e {marker} ] && git log -1 --format=%s | grep -q 'first completed'; then
  touch {marker}
  cd {repos.user} && {sys.executable} -c '
import json; p = "experiments.json"; d = json.load(open(p))
d.append({{"name": "second", "command": "echo two", "status": "pending", "timeout": 30}})
json.dump(d, open(p, "w"), indent=2)' && git commit -qam "user adds second" &&
    git pull -q --rebase && git push -q
fi
""")
    hook.chmod(0o755)
    repos.user_push([
        {"name": "first", "command": "echo one; echo '{\"acc\": 0.5}' > $COLABMAGIC_OUTPUT_DIR/metrics.json",  # noqa: E501
         "status": "pending", "timeout": 30},
        {"name": "fails", "command": "exit 5", "status": "pending", "timeout": 30},
    ])  # fmt: skip
    daemon = start_daemon(repos.host)
    wait_until(lambda: repos.remote_status("second") == "completed", timeout=30,
               what="the user's concurrently pushed experiment ran")  # fmt: skip
    wait_until(lambda: repos.remote_status("fails") == "failed", timeout=20)
    assert marker.exists()  # the race happened
    assert "push to origin" in daemon.text()  # and the daemon saw its push rejected
    assert repos.remote_status("first") == "completed"
    # the user's edit survived the daemon's pushes
    spec = json.loads(repos.remote_file("experiments.json"))
    assert [e["name"] for e in spec] == ["first", "fails", "second"]
    assert all(e["status"] == "pending" for e in spec)  # the daemon never writes it

    # the user syncs: statuses appear in experiments.json, merged by name
    report = ex.sync(repos.user)
    shown = {
        e["name"]: e["status"] for e in json.loads((repos.user / "experiments.json").read_text())
    }
    assert shown == {"first": "completed", "fails": "failed", "second": "completed"}
    assert {c["name"]: c["new"] for c in report.changes}["first"] == "completed"
    rows = {r.name: r for r in ex.status_rows(repos.user)}
    assert rows["first"].metrics == {"acc": 0.5}
    assert rows["first"].last_line == "one"

    # a plain `git pull` still works with the status view in the working tree
    subprocess.run(["git", "pull", "-q"], cwd=repos.user, check=True)
    # the user edits (adds one, cancels nothing, asks a rerun by typing pending) and pushes via sync
    ex.add(repos.user, "third", "echo three", timeout=30)
    text = (repos.user / "experiments.json").read_text()
    (repos.user / "experiments.json").write_text(text.replace('"failed"', '"pending"', 1))
    report = ex.sync(repos.user, push=True)
    assert report.pushed
    assert report.reruns == ["fails"]
    committed = json.loads(repos.remote_file("experiments.json"))
    assert {e["name"]: e["status"] for e in committed}["first"] == "pending"  # view not committed
    wait_until(lambda: repos.remote_status("third") == "completed", timeout=20)
    wait_until(lambda: json.loads(repos.remote_file("outputs/fails/status.json"))["rerun"] == 1,
               timeout=20)  # fmt: skip
    ex.sync(repos.user)
    assert no_conflict_markers(repos.user)
    assert no_conflict_markers(repos.host)
    assert daemon.stop() == 0
    health = json.loads(repos.remote_file("outputs/.daemon/status.json"))
    assert health["state"] == "stopped"


def test_kill9_recovery_bad_json_and_sigterm(repos, start_daemon, tmp_path, cleanup_pids):
    pids = tmp_path / "pids"
    repos.user_push([
        {"name": "victim", "status": "pending", "timeout": 60, "retries": 1,
         "command": f'if [ "$COLABMAGIC_ATTEMPT" = 1 ]; then sleep 60 & echo $! >> {pids}; echo $$ >> {pids}; wait; fi; echo attempt $COLABMAGIC_ATTEMPT'},  # noqa: E501
    ])  # fmt: skip
    daemon = start_daemon(repos.host)
    wait_until(lambda: len(read_pids(pids)) == 2, timeout=20, what="experiment started")
    orphans = read_pids(pids)
    cleanup_pids.extend(orphans)
    wait_until(lambda: repos.remote_status("victim") == "running", timeout=10)
    daemon.kill()  # kill -9: the experiment's group lives on, orphaned
    assert not any(pid_gone(p) for p in orphans)
    daemon = start_daemon(repos.host)
    wait_pids_gone(orphans, timeout=15)
    wait_until(lambda: repos.remote_status("victim") == "completed", timeout=20)
    status = json.loads(repos.remote_file("outputs/victim/status.json"))
    assert status["attempt"] == 2
    assert repos.remote_file("outputs/victim/stdout.log") == "attempt 2\n"
    # the restarted daemon recorded (and pushed) the interrupted attempt before rerunning it
    history = git(repos.host, "log", "-p", "--format=%s", "--", "outputs/victim/status.json")
    assert '"status": "interrupted"' in history
    assert "killed its leftover processes" in history

    # a bad experiments.json: logged, recorded, the daemon keeps running and resumes when fixed
    (repos.user / "experiments.json").write_text('[{"name": "x", "command": "true",}]')
    git(repos.user, "commit", "-qam", "broken")
    git(repos.user, "pull", "-q", "--rebase")
    git(repos.user, "push", "-q")

    def health_error():
        text = repos.remote_file("outputs/.daemon/status.json")
        return text and json.loads(text).get("error")

    error = wait_until(health_error, timeout=15)
    assert "experiments.json line 1" in error
    assert "invalid JSON" in error
    assert daemon.proc.poll() is None
    assert "invalid JSON" in daemon.text()
    go = tmp_path / "go"
    repos.user_push([{"name": "fixed", "status": "pending", "timeout": 60,
                      "command": f"while [ ! -e {go} ]; do sleep 0.02; done; echo finished"}])  # fmt: skip  # noqa: E501
    wait_until(lambda: repos.remote_status("fixed") == "running", timeout=15)
    assert not health_error()
    # SIGTERM with --on-stop=wait: the running experiment finishes, then a clean exit
    daemon.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "stopping" in daemon.text(), timeout=10)
    assert daemon.proc.poll() is None
    go.touch()
    assert daemon.stop(timeout=20) == 0
    assert repos.remote_status("fixed") == "completed"


def test_sigterm_on_stop_kill_and_large_outputs(repos, start_daemon, tmp_path, cleanup_pids):
    pids = tmp_path / "pids"
    repos.user_push([
        {"name": "big", "command": "head -c 53000000 /dev/zero > $COLABMAGIC_OUTPUT_DIR/weights.bin; echo small > $COLABMAGIC_OUTPUT_DIR/note.txt",  # noqa: E501
         "status": "pending", "timeout": 30},
        {"name": "long", "command": f"sleep 60 & echo $! > {pids}; wait", "status": "pending",
         "timeout": 60, "depends_on": ["big"]},
    ])  # fmt: skip
    daemon = start_daemon(repos.host, "--on-stop", "kill")
    wait_until(lambda: read_pids(pids), timeout=20)
    cleanup_pids.extend(read_pids(pids))
    assert daemon.stop(signal.SIGTERM, timeout=20) == 0
    wait_pids_gone(read_pids(pids))
    assert repos.remote_status("long") == "interrupted"
    assert repos.remote_file("outputs/big/note.txt") == "small\n"
    assert repos.remote_file("outputs/big/weights.bin") is None
    assert json.loads(repos.remote_file("outputs/big/status.json"))["not_committed"] == [
        "weights.bin"
    ]
    assert (repos.host / "outputs/big/weights.bin").stat().st_size == 53000000
