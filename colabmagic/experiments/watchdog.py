"""Kill a run's process group when the process that supervises it dies (run as a script).

Used by the Dask backend: a run is a child of a Dask worker, in its own session. If the worker is
SIGKILLed (or its machine's OOM killer picks it), nothing would stop the run, and the scheduler
would start it again elsewhere: the same experiment twice, a GPU held by nobody. ``prctl``'s
``PR_SET_PDEATHSIG`` is no answer: it fires when the *thread* that forked exits (Dask's task
threads come and go) and reaches only the leader, not the rest of its group.

So the supervisor starts this watchdog with the read end of a pipe whose write end only it holds.
The supervisor writes the group id, then ``q`` when the run ended normally. End of file without
``q`` means the supervisor died (the kernel closes its descriptors however it dies): the watchdog
sends SIGTERM to the group, SIGKILL after the grace period, and exits. Stdlib only, no colabmagic
import, so it starts in milliseconds.

Usage: ``python watchdog.py FD GRACE_SECONDS``
"""

from __future__ import annotations

import os
import signal
import sys
import time


def _members(pgid: int, not_before: int) -> list[int]:
    """Live processes of group *pgid* started at or after *not_before* (clock ticks)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                raw = fh.read().decode(errors="replace")
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid and int(fields[19]) >= not_before:
            out.append(int(entry))
    return out


def _start_time(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode(errors="replace")
        return int(raw[raw.rfind(")") + 2 :].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def _kill(pgid: int, not_before: int, grace: float) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not _members(pgid, not_before):
            return
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _members(pgid, not_before):
            time.sleep(0.05)


def main(argv: list[str]) -> int:
    fd, grace = int(argv[1]), float(argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the worker is not for us
    data = b""
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while True:
            chunk = pipe.read(64)
            if not chunk:
                break
            data += chunk
            if data.endswith(b"q"):
                return 0  # the run ended and its supervisor cleaned up
    line = data.split(b"\n", 1)[0]
    if not line.isdigit():
        return 0  # the supervisor died before starting the run
    pgid = int(line)
    not_before = int(data.split(b"\n")[1]) if data.count(b"\n") >= 2 else 0
    _kill(pgid, not_before, grace)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
