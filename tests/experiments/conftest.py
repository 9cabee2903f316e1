"""Fixtures for the batch-experiment tests: real git repositories and real daemon processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from colabmagic.testing import wait_until

BRANCH = "gpu-experiments"


def git(cwd: Path, *args: str, check: bool = True) -> str:
    """Run git in *cwd* and return its stdout."""
    proc = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=60
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {proc.stderr}")
    return proc.stdout


def write_spec(path: Path, entries: list[dict]) -> None:
    path.write_text(json.dumps(entries, indent=2) + "\n")


@pytest.fixture(autouse=True)
def _git_env(monkeypatch, tmp_path):
    """Isolate git from the user's configuration."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


class Repos:
    """A bare "GitHub" remote, the user's clone and the GPU host's clone."""

    def __init__(self, root: Path) -> None:
        self.remote = root / "remote.git"
        self.user = root / "user"
        self.host = root / "host"
        git(root, "init", "-q", "--bare", "-b", BRANCH, str(self.remote))
        git(root, "clone", "-q", str(self.remote), str(self.user))
        self._identity(self.user, "User")
        git(self.user, "checkout", "-q", "-b", BRANCH)
        write_spec(self.user / "experiments.json", [])
        git(self.user, "add", "experiments.json")
        git(self.user, "commit", "-q", "-m", "init")
        git(self.user, "push", "-q", "-u", "origin", BRANCH)
        git(root, "clone", "-q", "-b", BRANCH, str(self.remote), str(self.host))
        self._identity(self.host, "GPU host")

    @staticmethod
    def _identity(repo: Path, name: str) -> None:
        git(repo, "config", "user.name", name)
        git(repo, "config", "user.email", f"{name.replace(' ', '')}@example.com")

    def user_push(self, entries: list[dict], message: str = "experiments") -> None:
        """Write experiments.json in the user clone, commit and push."""
        write_spec(self.user / "experiments.json", entries)
        git(self.user, "commit", "-q", "-am", message)
        git(self.user, "pull", "-q", "--rebase")
        git(self.user, "push", "-q")

    def remote_file(self, path: str) -> str | None:
        """A file on the remote branch, or None."""
        proc = subprocess.run(
            ["git", "--git-dir", str(self.remote), "show", f"{BRANCH}:{path}"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        return proc.stdout if proc.returncode == 0 else None

    def remote_status(self, name: str) -> str | None:
        text = self.remote_file(f"outputs/{name}/status.json")
        return json.loads(text)["status"] if text else None


@pytest.fixture
def repos(tmp_path) -> Repos:
    return Repos(tmp_path)


class DaemonProc:
    """``colabmagic exp daemon`` as a real subprocess, logging to a file."""

    def __init__(self, repo: Path, log: Path, *extra: str) -> None:
        self.log = log
        cmd = [sys.executable, "-c", "from colabmagic.cli import main; main()", "exp", "daemon",
               "--repo", str(repo), "--branch", BRANCH, "--poll", "0.2", "--grace", "1",
               "--retry-backoff", "0", *extra]  # fmt: skip
        self._fh = open(log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._fh.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._fh.close()


@pytest.fixture
def start_daemon(tmp_path):
    started: list[DaemonProc] = []

    def start(repo: Path, *extra: str) -> DaemonProc:
        d = DaemonProc(repo, tmp_path / f"daemon{len(started)}.log", *extra)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


def pid_gone(pid: int) -> bool:
    """True when *pid* no longer runs (absent, or a zombie left for its new parent to reap)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def wait_pids_gone(pids: list[int], timeout: float = 10) -> None:
    wait_until(lambda: all(pid_gone(p) for p in pids), timeout=timeout, what=f"pids {pids} gone")


def read_pids(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


@pytest.fixture
def cleanup_pids():
    """Pids a test records here are SIGKILLed at teardown if they still run."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if not pid_gone(pid):
            os.kill(pid, signal.SIGKILL)
