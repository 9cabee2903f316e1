"""Run experiments on Dask workers (one worker per GPU, started with ``--resources GPU=1``).

Each run is a task that supervises the process group *on the worker* with the same runner
(timeouts, SIGTERM/SIGKILL, no orphans), in a scratch directory; its outputs come back with the
result and are written to ``outputs/<name>/`` here. Cancel sets a ``distributed.Event`` that
the task polls, so it kills the group on the worker. ``CUDA_VISIBLE_DEVICES`` is the worker's
own (pin it when starting the worker).

A worker that dies mid-run takes its run with it: a watchdog process
(:mod:`colabmagic.experiments.watchdog`) sees the worker's end of a pipe close and kills the
run's group, so when the scheduler reruns the task elsewhere the experiment runs once, not twice.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from colabmagic.experiments.backends import Done
from colabmagic.experiments.runner import RunRequest, RunResult, run_process
from colabmagic.experiments.state import MAX_COMMIT_BYTES

MAX_RETURN_BYTES = MAX_COMMIT_BYTES
CANCEL_POLL = 0.5


def _run_on_worker(req: RunRequest, event_name: str, max_bytes: int) -> dict[str, Any]:
    """Task body: run *req* in a scratch dir on the worker; return the result and the files."""
    from distributed import Event

    scratch = Path(tempfile.mkdtemp(prefix=f"colabmagic-{req.name}-"))
    event = Event(event_name)
    last = [0.0, None]

    def should_cancel() -> str | None:
        now = time.monotonic()
        if now - last[0] >= CANCEL_POLL:
            last[0] = now
            if event.is_set():
                last[1] = "cancelled"
        return last[1]

    cwd = req.cwd if req.cwd is not None and Path(req.cwd).is_dir() else str(scratch)
    req = dataclasses.replace(req, output_dir=str(scratch), cwd=cwd)
    left: list[str] = []
    try:
        result = run_process(req, should_cancel=should_cancel, watchdog=True)
        files: dict[str, bytes] = {}
        for dirpath, _, names in os.walk(scratch):
            for fname in names:
                path = Path(dirpath, fname)
                rel = str(path.relative_to(scratch))
                if path.stat().st_size > max_bytes:
                    left.append(rel)
                else:
                    files[rel] = path.read_bytes()
        return {"result": result, "files": files, "left": left, "scratch": str(scratch)}
    finally:
        if not left:  # large files stay behind on the worker, listed in result.json
            shutil.rmtree(scratch, ignore_errors=True)


class DaskHandle:
    """A run submitted to the cluster."""

    def __init__(self, backend: DaskBackend, event_name: str, future: Any) -> None:
        self._backend = backend
        self._event_name = event_name
        self.future = future

    def cancel(self, reason: str = "cancelled") -> None:
        """Tell the task to stop its process group (or drop it if it has not started)."""
        from distributed import Event

        Event(self._event_name, client=self._backend.client).set()


class DaskBackend:
    """Submit runs to a Dask cluster.

    Parameters
    ----------
    scheduler : str or distributed.Client
        ``tcp://HOST:8786``, or a client to reuse.
    max_return_bytes : int
        Output files larger than this stay on the worker (listed in ``result.json``).
    """

    local = False

    def __init__(self, scheduler: Any, *, max_return_bytes: int = MAX_RETURN_BYTES) -> None:
        from distributed import Client

        if isinstance(scheduler, Client):
            self.client = scheduler
            self._own = False
        else:
            self.client = Client(scheduler, set_as_default=False)
            self._own = True
        self.max_return_bytes = max_return_bytes

    def submit(self, req: RunRequest, done: Done, *, gpus: int = 0, **kw: Any) -> DaskHandle:
        """Submit *req* as a task needing ``GPU=gpus`` resources."""
        event_name = f"colabmagic-cancel-{req.name}-{uuid.uuid4().hex[:8]}"
        resources = {"GPU": gpus} if gpus else None
        future = self.client.submit(
            _run_on_worker, req, event_name, self.max_return_bytes,
            key=f"colabmagic-{req.name}-{uuid.uuid4().hex[:8]}", pure=False,
            resources=resources, retries=0,
        )  # fmt: skip
        handle = DaskHandle(self, event_name, future)

        def on_done(fut: Any) -> None:
            try:
                payload = fut.result()
            except BaseException as exc:  # noqa: BLE001 - a lost worker or a cancelled future
                now = time.time()
                result = RunResult("failed", None, None, now, now, 0, None, reason=f"dask: {exc!r}")
                done(req.name, result, {"stderr.log": f"dask task failed: {exc!r}\n".encode()})
                return
            result = payload["result"]
            if payload["left"]:
                left = ", ".join(payload["left"])
                note = f"left on worker {result.host}:{payload['scratch']}: {left}"
                result.reason = f"{result.reason}; {note}" if result.reason else note
            done(req.name, result, payload["files"])

        future.add_done_callback(on_done)
        return handle

    def close(self) -> None:
        """Close the client if this backend opened it."""
        if self._own:
            self.client.close()
