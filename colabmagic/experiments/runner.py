"""One run of one experiment: its own process group, streamed size-capped logs, timeout, cancel.

The command runs in a new session (``start_new_session``), so the whole group can be signalled:
on timeout or cancel it gets SIGTERM, then SIGKILL after a grace period. When the main process
exits, whatever it left behind in its group is killed too, and the main process is reaped — no
orphans, no zombies. Peak memory is sampled from ``/proc`` (see :class:`_PeakMemory`).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_LOG_LIMIT = 20 * 1024 * 1024
DEFAULT_GRACE = 5.0


@dataclass
class RunRequest:
    """Everything needed to run one attempt.

    Parameters
    ----------
    name : str
        Experiment name (``COLABMAGIC_EXPERIMENT``).
    command : str or tuple of str
        Shell command or argument list.
    output_dir : str
        Directory for ``stdout.log``/``stderr.log`` (``COLABMAGIC_OUTPUT_DIR``).
    env : dict
        Extra environment on top of the runner's own.
    cwd : str or None
        Working directory.
    timeout : float or None
        Seconds before the group is terminated.
    attempt : int
        1 for the first run (``COLABMAGIC_ATTEMPT``).
    cuda_visible_devices : str or None
        ``CUDA_VISIBLE_DEVICES`` for the run; ``None`` leaves the inherited value.
    data_dir : str or None
        ``COLABMAGIC_OUTPUT_DIR`` when it is not *output_dir* (the daemon's ``--outputs-dir``: a
        persistent place such as a mounted Google Drive for checkpoints).
    resume : bool
        Set ``COLABMAGIC_RESUME=1``: this run restarts an ``interrupted`` one, so the command
        can carry on from its own checkpoint.
    """

    name: str
    command: str | tuple[str, ...]
    output_dir: str
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    timeout: float | None = None
    attempt: int = 1
    cuda_visible_devices: str | None = None
    grace: float = DEFAULT_GRACE
    log_limit: int = DEFAULT_LOG_LIMIT
    data_dir: str | None = None
    resume: bool = False


@dataclass
class RunResult:
    """What came out of one attempt."""

    status: str
    exit_code: int | None
    signal: str | None
    start: float
    end: float
    pid: int
    peak_memory_kb: int | None
    reason: str = ""
    host: str = field(default_factory=socket.gethostname)

    @property
    def duration(self) -> float:
        """Wall-clock seconds."""
        return self.end - self.start

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "status": self.status,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "start": self.start,
            "end": self.end,
            "duration": round(self.duration, 6),
            "pid": self.pid,
            "peak_memory_kb": self.peak_memory_kb,
            "reason": self.reason,
            "host": self.host,
        }


class CappedLog:
    """An append-only log file that keeps at most *limit* bytes: the tail.

    When the file grows past the limit, its last three quarters are moved to the front behind a
    ``[... N bytes dropped ...]`` marker, so the cost stays amortised O(1) per byte.
    """

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self.limit = max(int(limit), 1024)
        self.size = 0
        self.dropped = 0
        self._fh = open(path, "wb", buffering=0)

    def write(self, data: bytes) -> None:
        """Append *data*, trimming the head when over the limit."""
        self._fh.write(data)
        self.size += len(data)
        if self.size > self.limit:
            self._trim()

    def _trim(self) -> None:
        keep = self.limit * 3 // 4
        with open(self.path, "rb") as fh:
            fh.seek(self.size - keep)
            tail = fh.read()
        self.dropped += self.size - len(tail)
        marker = f"[... {self.dropped} bytes dropped by colabmagic ...]\n".encode()
        self._fh.seek(0)
        self._fh.write(marker + tail)
        self._fh.truncate()
        self.size = len(marker) + len(tail)

    def close(self) -> None:
        """Close the file."""
        self._fh.close()


def build_env(req: RunRequest, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment the experiment sees."""
    env = dict(os.environ if base is None else base)
    env.update(req.env)
    env["COLABMAGIC_EXPERIMENT"] = req.name
    env["COLABMAGIC_OUTPUT_DIR"] = str(req.data_dir or req.output_dir)
    env["COLABMAGIC_ATTEMPT"] = str(req.attempt)
    env.pop("COLABMAGIC_RESUME", None)
    if req.resume:
        env["COLABMAGIC_RESUME"] = "1"
    if req.cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = req.cuda_visible_devices
    return env


def argv_of(command: str | tuple[str, ...] | list[str]) -> list[str]:
    """``/bin/sh -c COMMAND`` for a string, the list itself otherwise."""
    if isinstance(command, str):
        return ["/bin/sh", "-c", command]
    return list(command)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def run_process(
    req: RunRequest,
    *,
    should_cancel: Callable[[], str | None] | None = None,
    on_start: Callable[[int], None] | None = None,
    tick: float = 0.1,
    watchdog: bool = False,
) -> RunResult:
    """Run one attempt of an experiment to its end.

    Parameters
    ----------
    req : RunRequest
        What to run.
    should_cancel : callable, optional
        Polled every *tick* seconds; return a reason (``"cancelled"``, ``"interrupted"``) to stop
        the group, ``None`` to go on.
    on_start : callable, optional
        Called with the pid (= pgid) right after the process started.
    tick : float, optional
        Poll interval for *should_cancel*.
    watchdog : bool, optional
        Kill the group if this process dies before the run ends (see
        :mod:`colabmagic.experiments.watchdog`); for supervisors that can vanish, like a Dask
        worker.

    Returns
    -------
    RunResult
        ``status`` is ``completed``, ``failed``, ``timeout``, or the reason returned by
        *should_cancel*.
    """
    out_dir = Path(req.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logs = {1: CappedLog(out_dir / "stdout.log", req.log_limit)}
    logs[2] = CappedLog(out_dir / "stderr.log", req.log_limit)
    start = time.time()
    t0 = time.monotonic()
    guard = _Watchdog(req.grace) if watchdog else None
    try:
        proc = subprocess.Popen(
            argv_of(req.command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env=build_env(req),
            cwd=req.cwd,
        )
    except OSError as exc:
        if guard is not None:
            guard.disarm()
        for log in logs.values():
            log.close()
        (out_dir / "stderr.log").write_text(f"colabmagic: could not start the command: {exc}\n")
        end = time.time()
        why = f"could not start: {exc}"
        return RunResult("failed", None, None, start, end, 0, None, reason=why)
    pid = proc.pid
    if guard is not None:
        guard.arm(pid)
    if on_start is not None:
        on_start(pid)
    peak = _PeakMemory(pid)
    try:
        reason = _supervise(proc, logs, req, t0, should_cancel, tick, peak)
    finally:
        for log in logs.values():
            log.close()
    _killpg(pid, signal.SIGKILL)  # leftovers of a finished run: the zombie leader holds the pgid
    _, wait_status = os.waitpid(pid, 0)
    if guard is not None:
        guard.disarm()
    code = os.waitstatus_to_exitcode(wait_status)
    proc.returncode = code
    end = time.time()
    sig = signal.Signals(-code).name if code < 0 else None
    if reason in (None, "leftover"):
        status = "completed" if code == 0 else "failed"
        reason = "" if code == 0 else (f"killed by {sig}" if sig else f"exit code {code}")
    else:
        status = reason
        if reason == "timeout":
            reason = f"timed out after {req.timeout:g}s" if req.timeout else "timed out"
    return RunResult(status, code, sig, start, end, pid, peak.value, reason=reason)


def _supervise(
    proc: subprocess.Popen[bytes],
    logs: dict[int, CappedLog],
    req: RunRequest,
    t0: float,
    should_cancel: Callable[[], str | None] | None,
    tick: float,
    peak: _PeakMemory,
) -> str | None:
    """Stream output until the leader has exited and the pipes are closed; kill on demand."""
    pid = proc.pid
    sel = selectors.DefaultSelector()
    assert proc.stdout is not None
    assert proc.stderr is not None
    sel.register(proc.stdout.fileno(), selectors.EVENT_READ, logs[1])
    sel.register(proc.stderr.fileno(), selectors.EVENT_READ, logs[2])
    pipes = 2
    pidfd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
    if pidfd is not None:
        sel.register(pidfd, selectors.EVENT_READ, None)
    leader_done = False
    deadline = t0 + req.timeout if req.timeout else None
    reason: str | None = None
    term_at: float | None = None
    killed = False
    try:
        while pipes or not leader_done:
            now = time.monotonic()
            if not leader_done and now >= peak.next_at:
                peak.sample(now)
            if pidfd is None and not leader_done:
                leader_done = _exited(pid)
            if reason is None:
                if deadline is not None and now >= deadline:
                    reason = "timeout"
                elif should_cancel is not None and (r := should_cancel()):
                    reason = r
                elif leader_done and pipes:
                    reason = "leftover"  # children still hold the pipes after the leader exited
                if reason is not None:
                    _killpg(pid, signal.SIGTERM)
                    term_at = now
            elif not killed and term_at is not None and now >= term_at + req.grace:
                _killpg(pid, signal.SIGKILL)
                killed = True
            elif killed and leader_done and term_at is not None and now >= term_at + req.grace + 2:
                break  # something unkillable (D state) holds a pipe; give up on it
            wait = tick if (should_cancel is not None or pidfd is None) else 3600.0
            if deadline is not None and reason is None:
                wait = min(wait, deadline - now)
            if term_at is not None and not killed:
                wait = min(wait, term_at + req.grace - now)
            if term_at is not None and killed:
                wait = min(wait, 0.1)
            if not leader_done:
                wait = min(wait, peak.next_at - now)
            for key, _ in sel.select(max(wait, 0.0)):
                if key.data is None:
                    leader_done = True
                    sel.unregister(key.fd)
                    continue
                data = os.read(key.fd, 65536)
                if data:
                    key.data.write(data)
                else:
                    sel.unregister(key.fd)
                    pipes -= 1
    finally:
        sel.close()
        if pidfd is not None:
            os.close(pidfd)
        proc.stdout.close()
        proc.stderr.close()
    return reason


class _Watchdog:
    """A watchdog process that kills the run's group if this process dies first.

    It holds the read end of a pipe; we hold the only write end. We send the group id and its
    leader's start time, then ``q`` once the run is over; if we die, the kernel closes our end
    and the watchdog sees end of file without ``q``.
    """

    def __init__(self, grace: float) -> None:
        import sys

        read, self._write = os.pipe()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", str(Path(__file__).with_name("watchdog.py")), str(read),
                 str(grace)],
                pass_fds=(read,), stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        finally:
            os.close(read)

    def arm(self, pgid: int) -> None:
        st = proc_stat(pgid)
        os.write(self._write, f"{pgid}\n{st[3] if st else 0}\n".encode())

    def disarm(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._write, b"q")
        os.close(self._write)
        self._proc.wait()


class _PeakMemory:
    """Peak resident memory of a process group, sampled from ``/proc``.

    ``wait4``'s ``ru_maxrss`` cannot be used: on Linux it includes the memory of the (forked)
    runner before ``exec``. The group's members report their own high-water mark (``VmHWM``),
    so sampling every :attr:`interval` seconds sees every process that lives that long; the
    value is the largest sum over members. Runs shorter than the first sample report ``None``.
    """

    first = 0.2
    interval = 0.5

    def __init__(self, pgid: int) -> None:
        self.pgid = pgid
        self.value: int | None = None
        self.next_at = time.monotonic() + self.first

    def sample(self, now: float) -> None:
        total = 0
        for pid in group_members(self.pgid):
            total += _vm_hwm_kb(pid)
        if total:
            self.value = max(self.value or 0, total)
        self.next_at = now + self.interval


def _vm_hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _exited(pid: int) -> bool:
    """True when *pid* (our child) has exited, without reaping it."""
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return info is not None


# -- finding and killing a process group that is not our child (crash recovery) --------------
def proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """``(state, pgid, sid, starttime)`` of *pid* from ``/proc``, or ``None`` if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    return fields[0], int(fields[2]), int(fields[3]), int(fields[19])


def group_members(pgid: int, *, not_before: int = 0) -> list[int]:
    """Live (non-zombie) processes of process group *pgid* in session *pgid*.

    Parameters
    ----------
    pgid : int
        The group (and session) id: the pid of the experiment's main process.
    not_before : int
        Ignore processes started before this ``/proc`` start time (clock ticks); guards
        against a reused id.
    """
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = proc_stat(int(entry))
        if st and st[1] == pgid and st[2] == pgid and st[0] != "Z" and st[3] >= not_before:
            members.append(int(entry))
    return members


def kill_group(pgid: int, *, grace: float = DEFAULT_GRACE, not_before: int = 0) -> list[int]:
    """SIGTERM process group *pgid*, SIGKILL what is left after *grace*; return the pids found.

    Used for orphaned groups after a crash of the daemon (they are not our children).
    """
    found = group_members(pgid, not_before=not_before)
    if not found:
        return []
    _killpg(pgid, signal.SIGTERM)
    if not _group_gone(pgid, not_before, grace):
        _killpg(pgid, signal.SIGKILL)
        _group_gone(pgid, not_before, 5.0)
    return found


def _group_gone(pgid: int, not_before: int, timeout: float) -> bool:
    """Wait up to *timeout* seconds for group *pgid* to have no live member; True if it has none."""
    deadline = time.monotonic() + timeout
    while group_members(pgid, not_before=not_before):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True
