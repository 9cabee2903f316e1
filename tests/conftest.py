"""Shared fixtures and the COLABMAGIC_REQUIRE_ALL policy.

Tests that need a component which is absent (sshd, ffmpeg, chromium) call
``colabmagic.testing.require`` and skip with a reason; with ``COLABMAGIC_REQUIRE_ALL=1`` (set by CI)
that becomes a failure, so nothing silently stops being tested. Tests marked ``gpu`` are the one
exception: CI has no GPU, so they stay skipped there and run on a CUDA machine.

Every agent a test starts lives under a private ``COLABMAGIC_ROOT``; at the end of the run any
agent still alive there is a leak: it is killed and the run fails.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from colabmagic.testing import require_all, wait_until


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (require_all() and report.skipped) or "gpu" in item.keywords:
        return
    if hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = f"skipped under COLABMAGIC_REQUIRE_ALL=1: {reason}"


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True


@pytest.fixture(scope="session", autouse=True)
def colabmagic_root(tmp_path_factory):
    """A private agent root for the whole run, checked for leaked agents at the end."""
    root = tmp_path_factory.mktemp("kernels")
    old = os.environ.get("COLABMAGIC_ROOT")
    os.environ["COLABMAGIC_ROOT"] = str(root)
    yield root
    if old is None:
        os.environ.pop("COLABMAGIC_ROOT", None)
    else:
        os.environ["COLABMAGIC_ROOT"] = old

    def running() -> list[tuple[str, int]]:
        found = []
        for name in os.listdir(root):
            try:
                state = json.loads((root / name / "state.json").read_text())
            except (OSError, ValueError):
                continue
            for key in ("agent_pid", "kernel_pid", "supervisor_pid"):
                pid = state.get(key)
                if pid and _alive(pid):
                    found.append((f"{name}:{key}", int(pid)))
        return found

    # Agents asked to stop may still be finishing; give them a bounded moment.
    try:
        wait_until(lambda: not running(), timeout=15, what="agents to exit")
    except TimeoutError:
        pass
    leaked = running()
    for _, pid in leaked:
        os.kill(pid, signal.SIGKILL)
    assert not leaked, f"tests leaked running agents/kernels: {leaked}"


@pytest.fixture(scope="session")
def sshd_server(tmp_path_factory):
    """A real OpenSSH sshd on 127.0.0.1 (alias ``box`` in ``sshd_server.ssh_config``)."""
    from colabmagic.testing import require
    from colabmagic.testing_sshd import SSHServer, sshd_path

    require(sshd_path() is not None, "OpenSSH sshd is not installed (apt install openssh-server)")
    server = SSHServer("box", directory=str(tmp_path_factory.mktemp("sshd"))).start()
    yield server
    server.stop()


@pytest.fixture
def ip():
    """A real IPython shell with colabmagic loaded (modules that keep one per module define their
    own, module-scoped, ``ip``)."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "colabmagic")
    yield shell
    shell.run_line_magic("unload_ext", "colabmagic")
