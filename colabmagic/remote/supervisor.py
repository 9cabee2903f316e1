"""The agent's supervisor: it learns how the agent ended and makes sure the kernel ends with it.

**Why a supervisor.** Only a process's parent learns how it ended (its exit code, or the signal
that killed it). The agent runs detached, so its parent would be init, and a ``kill -9`` or the
OOM killer would leave no trace: the local side, finding the agent's socket dead, could tell
*that* the agent is gone but not *why*, and used to say "no running kernel", which is false. So
the detached process that ``start`` launches forks: the child becomes the agent; the parent stays
this small, standard-library-only process, which

- marks itself a *child subreaper* (Linux): the kernel, orphaned when the agent dies, becomes its
  child, so its pid cannot be reaped or reused by anyone else while it is being stopped;
- waits for the agent; when it ends, kills the kernel's process group (the kernel's own
  ``PR_SET_PDEATHSIG``, armed in :mod:`colabmagic.remote.kernel_launch`, has usually killed it
  already; the group also takes the kernel's children), reaps it, removes the connection file
  and the kernel's sockets, and writes ``ROOT/ID/agent.exit``::

      {"exit_code": -9, "signal": "SIGKILL", "kernel_pid": 4242, "kernel_stopped": true, ...}

- forwards SIGTERM and SIGINT to the agent, so ``stop`` works whichever pid it signals.

The agent gets ``PR_SET_PDEATHSIG`` towards the supervisor in turn, so killing the supervisor
takes the agent and then the kernel down too (with no record: the cause is then "unknown").

A bridge whose agent socket closes reads the record (:func:`fate`) and reports it in one line on
stderr (:data:`DIED_PREFIX` + JSON); the local transport turns that into "the agent on HOST died
(SIGKILL); its kernel was stopped; `%colab_connect --restart`" (``agent_died_message`` in
:mod:`colabmagic.transport`). Standard library only; Python >= 3.9.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from typing import Callable

EXIT_RECORD = "agent.exit"
DIED_PREFIX = "colabmagic: agent died "
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def prctl(option: int, value: int) -> bool:
    """``prctl(option, value)`` on Linux; False elsewhere or when it fails."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def alive(pid) -> bool:
    """True while *pid* runs (a zombie counts as dead)."""
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie still answers kill(0); look at /proc where there is one
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def remove_kernel_files(directory: str) -> None:
    """Remove the kernel's connection file and its Unix sockets (a killed kernel leaves them)."""
    info = _read_json(os.path.join(directory, "kernel.json")) or {}
    paths = [os.path.join(directory, "kernel.json")]
    if info.get("transport") == "ipc" and info.get("ip"):
        prefix = info["ip"]
        paths += [f"{prefix}-{info[k]}" for k in info if k.endswith("_port")]
        paths.append(f"{prefix}-pipe")
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass
    prefix = info.get("ip") or ""
    parent = os.path.dirname(prefix)
    if info.get("transport") == "ipc" and os.path.basename(parent).startswith("colabmagic-"):
        try:
            os.rmdir(parent)  # the short fallback directory under /tmp
        except OSError:
            pass


def _describe(status: int) -> dict:
    code = os.waitstatus_to_exitcode(status)
    sig = None
    if code < 0:
        try:
            sig = signal.Signals(-code).name
        except ValueError:
            sig = f"signal {-code}"
    return {"exit_code": code, "signal": sig}


def _stop_kernel(directory: str, deadline: float) -> tuple[int | None, bool]:
    """Kill the kernel's process group if it still runs; returns ``(kernel pid, stopped)``."""
    state = _read_json(os.path.join(directory, "state.json")) or {}
    kpid = state.get("kernel_pid")
    if not kpid:
        return None, True
    kpid = int(kpid)
    if _ours(kpid, state):
        for kill in (os.killpg, os.kill):
            try:
                kill(kpid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    while alive(kpid) and time.monotonic() < deadline:
        _reap()
        time.sleep(0.01)  # waiting on a SIGKILLed process to exit, bounded by the deadline
    _reap()
    return kpid, not alive(kpid)


def _ours(kpid: int, state: dict) -> bool:
    """True when *kpid* is still the agent's kernel, so that killing its group is safe.

    A kernel the agent already waited for has a free pid that another process may have taken.
    On Linux the orphaned kernel is this subreaper's child (alive or a zombie, its pid held);
    elsewhere the agent's last word on the kernel decides.
    """
    try:
        with open(f"/proc/{kpid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid()
    except FileNotFoundError:
        return False
    except (OSError, ValueError, IndexError):
        return state.get("state") not in ("dead", "stopped")


def _reap() -> None:
    """Reap every child that has exited (orphans reparented to this subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def supervise(directory: str, run_agent: Callable[[], int]) -> int:
    """Run ``run_agent()`` in a forked child; record how it ended; stop its kernel."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
            if os.getppid() != parent:
                os._exit(1)
            code = int(run_agent() or 0)
        except BaseException:  # noqa: BLE001 - the child must never return into the supervisor
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    while True:
        wpid, status = os.waitpid(-1, 0)
        if wpid == pid:
            break
    record = _describe(status)
    kpid, stopped = _stop_kernel(directory, time.monotonic() + 2.0)
    remove_kernel_files(directory)
    for name in ("agent.sock",):
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass
    record.update(kernel_pid=kpid, kernel_stopped=stopped, agent_pid=pid, time=time.time())
    _write_json(os.path.join(directory, EXIT_RECORD), record)
    return 0


def fate(directory: str, agent_pid, *, timeout: float = 3.0) -> dict | None:
    """How the agent *agent_pid* ended, once it has: its exit record, waited for up to *timeout*.

    ``None`` while the agent still runs (after a short grace: a bridge sees the socket close a
    moment before the process is gone). Without a record (the supervisor was killed too) the
    cause is unknown: ``{"exit_code": None, "signal": None, "kernel_stopped": ...}``.
    """
    path = os.path.join(directory, EXIT_RECORD)
    start = time.monotonic()
    while alive(agent_pid):
        if time.monotonic() - start > 0.3:
            return None
        time.sleep(0.01)  # the process is exiting; bounded above
    while time.monotonic() - start < timeout:
        record = _read_json(path)
        if record is not None:
            return record
        time.sleep(0.01)  # the supervisor writes the record right after reaping; bounded
    state = _read_json(os.path.join(directory, "state.json")) or {}
    kpid = state.get("kernel_pid")
    stopped = not alive(kpid)
    return {"exit_code": None, "signal": None, "kernel_pid": kpid, "kernel_stopped": stopped}
