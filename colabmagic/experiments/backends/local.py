"""Run experiments as process groups on this host, one supervising thread each."""

from __future__ import annotations

import json
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from colabmagic.experiments.backends import Done
from colabmagic.experiments.runner import RunRequest, RunResult, proc_stat, run_process
from colabmagic.experiments.spec import atomic_write_text
from colabmagic.experiments.state import HOST


class LocalHandle:
    """A run on this host; :meth:`cancel` makes its supervisor stop the group."""

    def __init__(self, cancel_file: Path | None) -> None:
        self._reason: str | None = None
        self._cancel_file = cancel_file
        self.thread: threading.Thread | None = None

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop the process group (SIGTERM, then SIGKILL after the grace period)."""
        self._reason = self._reason or reason

    def should_cancel(self) -> str | None:
        """Polled by the runner."""
        if self._reason is None and self._cancel_file is not None and self._cancel_file.exists():
            self._reason = "cancelled"
        return self._reason


class LocalBackend:
    """Threads that each supervise one process group on this host.

    Parameters
    ----------
    record_dir : path-like, optional
        Where to keep ``<name>.json`` run records (pid, pgid, start time) for crash recovery.
    cancel_dir : path-like, optional
        A file ``<cancel_dir>/<name>`` asks the run to stop (``exp cancel`` from another
        process).
    """

    local = True

    def __init__(self, record_dir: Path | None = None, cancel_dir: Path | None = None) -> None:
        self.record_dir = record_dir
        self.cancel_dir = cancel_dir

    def submit(self, req: RunRequest, done: Done, *, gpus: int = 0, **kw: Any) -> LocalHandle:
        """Start a supervising thread for *req*."""
        cancel_file = self.cancel_dir / req.name if self.cancel_dir is not None else None
        handle = LocalHandle(cancel_file)
        thread = threading.Thread(
            target=self._run, args=(req, handle, done), name=f"exp-{req.name}", daemon=True
        )
        handle.thread = thread
        thread.start()
        return handle

    def _record(self, req: RunRequest) -> Callable[[int], None] | None:
        if self.record_dir is None:
            return None
        path = self.record_dir / f"{req.name}.json"

        def on_start(pid: int) -> None:
            st = proc_stat(pid)
            record = {
                "name": req.name, "pid": pid, "pgid": pid, "host": HOST,
                "starttime": st[3] if st else 0, "attempt": req.attempt, "started": time.time(),
            }  # fmt: skip
            atomic_write_text(path, json.dumps(record))

        return on_start

    def _run(self, req: RunRequest, handle: LocalHandle, done: Done) -> None:
        try:
            result = run_process(
                req,
                should_cancel=handle.should_cancel,
                on_start=self._record(req),
            )
        except Exception as exc:  # noqa: BLE001 - reported as the run's failure, with traceback
            now = time.time()
            with Path(req.output_dir, "stderr.log").open("a") as fh:
                fh.write(traceback.format_exc())
            result = RunResult("failed", None, None, now, now, 0, None, reason=f"runner: {exc}")
        finally:
            if self.record_dir is not None:
                (self.record_dir / f"{req.name}.json").unlink(missing_ok=True)
        done(req.name, result, None)

    def close(self) -> None:
        """Nothing to release; running threads finish on their own."""
