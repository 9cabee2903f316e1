"""Runs that survive a recycled runtime: ``exp daemon --outputs-dir`` and ``COLABMAGIC_RESUME``.

The daemon is killed -9 mid-run (the runtime goes away); a new daemon marks the run
``interrupted`` and starts it again with ``COLABMAGIC_RESUME=1``; the example training script
(examples/resumable_training.py) carries on from the checkpoint it kept in the outputs dir.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from colabmagic.experiments.runner import RunRequest, build_env
from colabmagic.testing import wait_until

from .conftest import read_pids, wait_pids_gone

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "resumable_training.py"


def test_env_of_a_run_names_the_outputs_dir_and_resume(monkeypatch):
    monkeypatch.setenv("COLABMAGIC_RESUME", "1")  # never inherited: only the queue decides
    req = RunRequest(name="a", command="true", output_dir="/repo/outputs/a")
    env = build_env(req)
    assert env["COLABMAGIC_OUTPUT_DIR"] == "/repo/outputs/a"
    assert "COLABMAGIC_RESUME" not in env
    req = RunRequest(name="a", command="true", output_dir="/o/a", data_dir="/drive/a", resume=True)
    env = build_env(req)
    assert env["COLABMAGIC_OUTPUT_DIR"] == "/drive/a"
    assert env["COLABMAGIC_RESUME"] == "1"


def test_example_resumes_from_its_checkpoint(tmp_path):
    env = dict(os.environ, COLABMAGIC_OUTPUT_DIR=str(tmp_path))
    env.pop("COLABMAGIC_RESUME", None)
    run = [sys.executable, str(EXAMPLE), "--steps", "12", "--every", "5"]
    first = subprocess.run(run, env=env, capture_output=True, text=True, check=True, timeout=120)
    assert "starting from step 0" in first.stdout
    again = subprocess.run([*run[:3], "20", "--every", "5"], env={**env, "COLABMAGIC_RESUME": "1"},
                           capture_output=True, text=True, check=True, timeout=120)  # fmt: skip
    assert "resuming from step 12" in again.stdout  # the last checkpoint was step 11
    assert json.loads((tmp_path / "metrics.json").read_text())["resumed_from"] == 12


def test_daemon_outputs_dir_and_resume_after_kill9(repos, start_daemon, tmp_path, cleanup_pids):
    drive = tmp_path / "drive"  # stands for /content/drive/MyDrive/...: outlives the runtime
    pids = tmp_path / "pids"
    cmd = (f"echo $$ >> {pids}; exec {sys.executable} {EXAMPLE} --steps 400 --every 5 "
           "--step-seconds 0.05")  # fmt: skip
    repos.user_push([{"name": "train", "status": "pending", "retries": 1, "gpus": 0,
                      "command": cmd}])  # fmt: skip
    daemon = start_daemon(repos.host, "--outputs-dir", str(drive))
    log = repos.host / "outputs" / "train" / "stdout.log"
    wait_until(lambda: log.exists() and "step 10 " in log.read_text(), timeout=60, what="step 10")
    assert (drive / "train" / "checkpoint.pt").exists()
    assert not (repos.host / "outputs" / "train" / "checkpoint.pt").exists()
    assert "starting from step 0" in log.read_text()
    orphans = read_pids(pids)
    cleanup_pids.extend(orphans)
    daemon.kill()  # the runtime is recycled: the daemon dies without a word

    start_daemon(repos.host, "--outputs-dir", str(drive))
    wait_pids_gone(orphans, timeout=15)
    wait_until(lambda: repos.remote_status("train") == "completed", timeout=120, what="rerun")
    status = json.loads(repos.remote_file("outputs/train/status.json"))
    assert status["attempt"] == 2
    out = repos.remote_file("outputs/train/stdout.log")
    resumed = int(out.split("resuming from step ", 1)[1].split()[0])
    assert resumed >= 11
    metrics = json.loads(repos.remote_file("outputs/train/metrics.json"))
    assert metrics["resumed_from"] == resumed
    assert metrics["steps"] == 400
    assert repos.remote_file("outputs/train/checkpoint.pt") is None  # stays on the drive
