"""A real Dask cluster on 127.0.0.1 for tests: one ``dask scheduler`` and ``dask worker`` processes.

Workers run without a nanny, so SIGKILL of a worker's process is the death of that worker (as
when a machine of a cluster goes away); the scheduler then reschedules its tasks. Every process
started here is stopped on exit.

Examples
--------
>>> with DaskProcesses(tmp_path, n_workers=2) as cluster:       # doctest: +SKIP
...     Index(db).add(files, scheduler=cluster.address)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from colabmagic.testing import wait_until


class DaskProcesses:
    """``dask scheduler`` + *n_workers* ``dask worker`` processes, all on 127.0.0.1.

    Parameters
    ----------
    root : path
        Directory for the scheduler file, the workers' scratch space and the logs.
    n_workers : int
        Workers started on entry (more with :meth:`add_worker`).
    nthreads : int
        Threads per worker.
    resources : str, optional
        ``--resources`` of every worker, e.g. ``"GPU=1"``.
    """

    def __init__(
        self, root: str | os.PathLike[str], *, n_workers: int = 2, nthreads: int = 1,
        resources: str | None = None,
    ) -> None:  # fmt: skip
        self.root = Path(root)
        self.n_workers = n_workers
        self.nthreads = nthreads
        self.resources = resources
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.killed: dict[str, subprocess.Popen[bytes]] = {}
        self.address = ""

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None) -> Any:
        log = open(self.root / f"{name}.log", "wb")  # the child keeps its own copy
        try:
            return subprocess.Popen(
                [sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env, cwd=self.root,
            )  # fmt: skip
        finally:
            log.close()

    def __enter__(self) -> DaskProcesses:
        self.root.mkdir(parents=True, exist_ok=True)
        sfile = self.root / "scheduler.json"
        self.scheduler = self._spawn(
            "scheduler",
            ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
             "--no-dashboard", "--scheduler-file", str(sfile)],
            None,
        )  # fmt: skip
        try:
            # the workers find the scheduler through its file: they start (import distributed,
            # seconds of CPU) while it does, rather than after it
            for i in range(self.n_workers):
                self.add_worker(f"w{i}")

            def address() -> str | None:
                with contextlib.suppress(OSError, ValueError, KeyError):
                    return json.loads(sfile.read_text())["address"]
                self._died("scheduler")
                return None

            self.address = wait_until(
                address, timeout=60, interval=0.05, what="dask scheduler to start"
            )
            self.wait_workers(self.n_workers)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _died(self, name: str) -> bool:
        proc = self.scheduler if name == "scheduler" else self.workers[name]
        if proc is not None and proc.poll() is not None:
            log = (self.root / f"{name}.log").read_text(errors="replace")[-2000:]
            msg = f"dask {name} exited with {proc.returncode}:\n{log}"
            raise RuntimeError(msg)
        return False

    def add_worker(self, name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start one more worker named *name* (with environment *env*, default inherited)."""
        where = [self.address] if self.address else [
            "--scheduler-file", str(self.root / "scheduler.json")]  # fmt: skip
        args = ["distributed.cli.dask_worker", *where, "--host", "127.0.0.1",
                "--nthreads", str(self.nthreads), "--no-nanny", "--no-dashboard",
                "--name", name, "--local-directory", str(self.root / name)]  # fmt: skip
        if self.resources:
            args += ["--resources", self.resources]
        self.workers[name] = self._spawn(name, args, env)
        return self.workers[name]

    def wait_named(self, name: str, *, present: bool = True, timeout: float = 90) -> None:
        """Wait until the worker started as *name* is connected to the scheduler (or, with
        ``present=False``, until the scheduler has dropped it)."""

        def listed() -> bool:
            workers = client.scheduler_info(n_workers=-1)["workers"].values()
            return any(w.get("name") == name for w in workers)

        with self.client() as client:
            wait_until(
                lambda: listed() == present or (present and self._died(name)),
                timeout=timeout, interval=0.05,
                what=f"dask worker {name} to {'join' if present else 'leave'}",
            )  # fmt: skip

    def client(self) -> Any:
        """A new ``distributed.Client`` of this cluster (close it)."""
        from distributed import Client

        return Client(self.address, set_as_default=False, timeout=30)

    def wait_workers(self, n: int, timeout: float = 90) -> None:
        """Wait until *n* workers are connected to the scheduler."""
        with self.client() as client:
            wait_until(
                lambda: len(client.scheduler_info(n_workers=-1)["workers"]) >= n
                or any(self._died(w) for w in self.workers),
                timeout=timeout, interval=0.1, what=f"{n} dask workers",
            )  # fmt: skip

    def kill(self, name: str) -> None:
        """SIGKILL worker *name* and reap it (it moves from :attr:`workers` to :attr:`killed`)."""
        proc = self.killed[name] = self.workers.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def __exit__(self, *exc: object) -> None:
        # workers first: one stopped after the scheduler keeps retrying it until killed
        for group in (list(self.workers.values()), [self.scheduler] if self.scheduler else []):
            for proc in group:
                if proc.poll() is None:
                    proc.terminate()
            for proc in group:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)
