"""The scheduler: which experiment runs next, on which GPUs, and what its status says.

One thread (the caller's) owns every status write; backends only run processes and report
back. ``exp run`` calls :meth:`Queue.run_until_idle`; the daemon drives :meth:`Queue.schedule`
and :meth:`Queue.wait` from its git loop.
"""

from __future__ import annotations

import contextlib
import os
import queue as _queue
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from colabmagic.errors import ExperimentSpecError, ParameterError
from colabmagic.experiments.backends import Backend, Handle
from colabmagic.experiments.backends.local import LocalBackend
from colabmagic.experiments.gitutil import Git
from colabmagic.experiments.runner import (
    DEFAULT_GRACE,
    DEFAULT_LOG_LIMIT,
    RunRequest,
    RunResult,
    kill_group,
)
from colabmagic.experiments.spec import Experiment, load_experiments
from colabmagic.experiments.state import (
    HOST,
    MAX_COMMIT_BYTES,
    Project,
    effective_status,
    is_final,
    now_iso,
    read_json,
    write_json,
)


def detect_gpu_ids() -> list[str] | None:
    """GPU ids this host may use: ``$CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``, else ``None``.

    ``None`` means "no GPU accounting": experiments inherit the environment unchanged.
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None and env.strip():
        return [x.strip() for x in env.split(",") if x.strip()]
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return None
        ids = [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]
        return ids or None
    return None


def git_head(root: Path) -> str | None:
    """The commit checked out in *root*, or ``None`` outside git (or without git installed)."""
    try:
        return Git(root, timeout=30).rev("HEAD")
    except OSError:
        return None


def _mtime(path: Path | None) -> int | None:
    """``st_mtime_ns`` of *path*, ``None`` when it is missing (or no path)."""
    try:
        return path.stat().st_mtime_ns if path is not None else None
    except FileNotFoundError:
        return None


@dataclass
class _Running:
    exp: Experiment
    handle: Handle
    attempt: int
    gpu_ids: list[str] = field(default_factory=list)


class Queue:
    """Schedules the experiments of one project.

    Parameters
    ----------
    project : Project
        Where statuses and outputs go.
    slots : int
        How many experiments run at once.
    gpu_ids : list of str, optional
        GPU ids to hand out (``CUDA_VISIBLE_DEVICES``); default :func:`detect_gpu_ids`. An
        experiment takes ``gpus`` of them; ``gpus: 0`` gets an empty ``CUDA_VISIBLE_DEVICES``.
    backend : Backend, optional
        Where processes run; default :class:`LocalBackend`.
    retry_backoff : float
        Seconds before the first retry; doubled for each further attempt (at most 10 minutes).
    grace : float
        Seconds between SIGTERM and SIGKILL of a group.
    log_limit : int
        Bytes kept (the tail) of each of ``stdout.log`` and ``stderr.log``.
    max_file_bytes : int
        Output files larger than this are listed as ``not_committed``.
    outputs_dir : path-like, optional
        Each run's ``COLABMAGIC_OUTPUT_DIR`` becomes ``outputs_dir/<name>/``, kept across
        restarts (checkpoints on a mounted Google Drive survive a recycled runtime); logs and
        statuses stay in ``outputs/<name>/``, and a ``metrics.json`` written there is copied in.
    """

    def __init__(
        self,
        project: Project,
        *,
        slots: int = 1,
        gpu_ids: list[str] | None = None,
        backend: Backend | None = None,
        retry_backoff: float = 5.0,
        grace: float = DEFAULT_GRACE,
        log_limit: int = DEFAULT_LOG_LIMIT,
        max_file_bytes: int = MAX_COMMIT_BYTES,
        outputs_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if slots < 1:
            msg = f"slots={slots} must be at least 1"
            raise ParameterError(msg)
        self.project = project
        self.slots = slots
        self.backend: Backend = backend or LocalBackend(project.run_record_dir, project.cancel_dir)
        if self.backend.local:
            project.run_record_dir.mkdir(parents=True, exist_ok=True)
            project.cancel_dir.mkdir(parents=True, exist_ok=True)
            self.gpu_pool = list(gpu_ids) if gpu_ids is not None else detect_gpu_ids()
        else:
            self.gpu_pool = None  # the cluster's GPU resources decide
        self.free_gpus = list(self.gpu_pool or [])
        self.retry_backoff = retry_backoff
        self.grace = grace
        self.log_limit = log_limit
        self.max_file_bytes = max_file_bytes
        self.outputs_dir = Path(outputs_dir).expanduser() if outputs_dir else None
        self.git_commit: str | None = None
        self.accepting = True
        self.experiments: list[Experiment] = []
        self.statuses: dict[str, dict[str, Any]] = {}
        self.running: dict[str, _Running] = {}
        self._done: _queue.SimpleQueue[tuple[str, RunResult, dict[str, bytes] | None] | None]
        self._done = _queue.SimpleQueue()
        self._next_retry: float | None = None

    # -- inputs --------------------------------------------------------------------------------
    def load(self, experiments: list[Experiment]) -> None:
        """Replace the list of experiments (a new ``experiments.json``)."""
        self.experiments = list(experiments)
        self.statuses = self.project.read_statuses()

    def recover(self) -> list[str]:
        """After a runner died: kill orphaned groups, mark ``running`` as ``interrupted``.

        Call it once at start, while holding the project's runner lock.

        Returns
        -------
        list of str
            Names whose status changed.
        """
        killed: dict[str, list[int]] = {}
        record_dir = self.project.run_record_dir
        if record_dir.is_dir():
            for path in record_dir.glob("*.json"):
                record = read_json(path)
                if isinstance(record, dict) and record.get("host", HOST) == HOST:
                    pgid = int(record.get("pgid", 0))
                    if pgid > 1:
                        killed[path.stem] = kill_group(
                            pgid, grace=self.grace, not_before=int(record.get("starttime", 0))
                        )
                path.unlink(missing_ok=True)
        changed = []
        for name, status in self.project.read_statuses().items():
            if status.get("status") != "running":
                continue
            pids = killed.get(name)
            extra = f"; killed its leftover processes {pids}" if pids else ""
            status.update(
                status="interrupted",
                updated=now_iso(),
                message=f"the runner stopped while this attempt ran{extra}",
            )
            self.project.write_status(name, status)
            changed.append(name)
        self.statuses = self.project.read_statuses()
        return changed

    # -- scheduling ----------------------------------------------------------------------------
    def _attempt_for(self, exp: Experiment, st: dict[str, Any] | None) -> int:
        if st is not None and st.get("rerun", 0) == exp.rerun:
            if st.get("status") in ("pending", "interrupted"):
                return int(st.get("attempt", 0)) + 1
        return 1

    def _runnable(self, exp: Experiment, st: dict[str, Any] | None, eff: str) -> bool:
        if eff == "pending":
            return True
        if eff == "interrupted" and st is not None and st.get("rerun", 0) == exp.rerun:
            return int(st.get("attempt", 0)) <= exp.retries
        return False

    def _set_status(self, name: str, exp: Experiment, status: str, **fields: Any) -> None:
        doc = {"name": name, "status": status, "attempt": 0, "rerun": exp.rerun,
               "retries": exp.retries, "host": HOST, "updated": now_iso()}  # fmt: skip
        doc.update(fields)
        self.project.write_status(name, doc)
        self.statuses[name] = doc

    def schedule(self) -> list[str]:
        """Start what can run now; record cancels and blocked dependencies.

        Returns
        -------
        list of str
            Names whose status changed.
        """
        changed: list[str] = []
        by_name = {e.name: e for e in self.experiments}
        now = time.time()
        self._next_retry = None
        for exp in self.experiments:
            name = exp.name
            st = self.statuses.get(name)
            eff = effective_status(exp, st)
            if name in self.running:
                if eff == "cancelled":
                    self.running[name].handle.cancel("cancelled")
                continue
            if eff == "cancelled":
                if st is None or st.get("status") != "cancelled" or st.get("rerun", 0) < exp.rerun:
                    self._set_status(name, exp, "cancelled", message="cancelled before it started")
                    changed.append(name)
                continue
            if not self._runnable(exp, st, eff):
                continue
            retry_at = (st or {}).get("retry_at")
            if retry_at and st is not None and st.get("rerun", 0) == exp.rerun and retry_at > now:
                self._next_retry = min(self._next_retry or retry_at, retry_at)
                continue
            blocked = self._blocked_by(exp, by_name)
            if blocked is False:
                continue
            if isinstance(blocked, str):
                self._set_status(name, exp, "cancelled", message=blocked)
                changed.append(name)
                continue
            if not self.accepting or len(self.running) >= self.slots:
                continue
            if self.gpu_pool is not None and exp.gpus > len(self.gpu_pool):
                msg = (f"needs {exp.gpus} GPUs but this host has {len(self.gpu_pool)} "
                       f"({','.join(self.gpu_pool) or 'none'}); lower 'gpus'")  # fmt: skip
                self._set_status(name, exp, "failed", message=msg)
                changed.append(name)
                continue
            if self.gpu_pool is not None and exp.gpus > len(self.free_gpus):
                continue
            resume = st is not None and st.get("status") == "interrupted"
            self._start(exp, self._attempt_for(exp, st), resume=resume and eff == "interrupted")
            changed.append(name)
        return changed

    def _blocked_by(self, exp: Experiment, by_name: dict[str, Experiment]) -> bool | str:
        """True: dependencies done; False: wait; a string: they can never complete (why)."""
        for dep in exp.depends_on:
            dexp = by_name.get(dep)
            if dexp is None:
                return f"dependency {dep!r} is not in experiments.json"
            dst = self.statuses.get(dep)
            deff = effective_status(dexp, dst)
            if deff == "completed":
                continue
            if dep not in self.running and is_final(dexp, dst):
                return f"dependency {dep!r} ended {deff}"
            return False
        return True

    def _start(self, exp: Experiment, attempt: int, *, resume: bool = False) -> None:
        gpu_ids: list[str] = []
        cvd = None
        if self.gpu_pool is not None:
            gpu_ids, self.free_gpus = self.free_gpus[: exp.gpus], self.free_gpus[exp.gpus :]
            cvd = ",".join(gpu_ids)
        self.project.clear_output_dir(exp.name)
        cwd = str(self.project.root / exp.cwd) if exp.cwd else str(self.project.root)
        req = RunRequest(
            name=exp.name,
            command=exp.command,
            output_dir=str(self.project.output_dir(exp.name)),
            env=exp.env,
            cwd=cwd,
            timeout=exp.timeout,
            attempt=attempt,
            cuda_visible_devices=cvd,
            grace=self.grace,
            log_limit=self.log_limit,
            data_dir=self._data_dir(exp.name),
            resume=resume,
        )
        self._set_status(exp.name, exp, "running", attempt=attempt, started=now_iso(), gpus=cvd)
        self.project.cancel_path(exp.name).unlink(missing_ok=True)
        handle = self.backend.submit(req, self._on_done, gpus=exp.gpus)
        self.running[exp.name] = _Running(exp, handle, attempt, gpu_ids)

    def _data_dir(self, name: str) -> str | None:
        if self.outputs_dir is None:
            return None
        path = self.outputs_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def _on_done(self, name: str, result: RunResult, files: dict[str, bytes] | None) -> None:
        self._done.put((name, result, files))

    def wake(self) -> None:
        """Make a blocked :meth:`wait` return (from another thread or a signal handler)."""
        self._done.put(None)

    # -- completion ----------------------------------------------------------------------------
    def wait(self, timeout: float | None) -> list[str]:
        """Block until a run ends (or *timeout*, or :meth:`wake`); record what ended.

        Returns
        -------
        list of str
            Names whose run ended (their status and result files are written).
        """
        items = []
        try:
            items.append(self._done.get(timeout=timeout))
        except _queue.Empty:
            return []
        while True:
            try:
                items.append(self._done.get_nowait())
            except _queue.Empty:
                break
        finished = []
        for item in items:
            if item is not None:
                self._finish(*item)
                finished.append(item[0])
        return finished

    def _finish(self, name: str, result: RunResult, files: dict[str, bytes] | None) -> None:
        run = self.running.pop(name)
        self.free_gpus.extend(run.gpu_ids)
        out = self.project.output_dir(name)
        if self.outputs_dir is not None:  # metrics to the commit; checkpoints stay outside
            metrics = self.outputs_dir / name / "metrics.json"
            if metrics.is_file() and metrics.stat().st_size <= self.max_file_bytes:
                out.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(metrics, out / "metrics.json")
        if files:
            for rel, data in files.items():
                target = out / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        current = next((e for e in self.experiments if e.name == name), run.exp)
        exp = current if current.rerun == run.exp.rerun else run.exp
        large = self._large_files(out)
        doc = {
            "name": name,
            "command": exp.command if isinstance(exp.command, str) else list(exp.command),
            "status": result.status,
            "exit_code": result.exit_code,
            "signal": result.signal,
            "start": now_iso(result.start),
            "end": now_iso(result.end),
            "duration": round(result.duration, 3),
            "host": result.host,
            "git_commit": self.git_commit,
            "attempt": run.attempt,
            "peak_memory_kb": result.peak_memory_kb,
            "timeout": exp.timeout,
            "message": result.reason,
            "not_committed": large,
        }
        write_json(out / "result.json", doc)
        retry = (
            result.status in ("failed", "timeout") and run.attempt <= exp.retries and self.accepting
        )
        fields: dict[str, Any] = {
            "attempt": run.attempt, "started": doc["start"], "ended": doc["end"],
            "duration": doc["duration"], "exit_code": result.exit_code, "message": result.reason,
        }  # fmt: skip
        if large:
            fields["not_committed"] = large
        if retry:
            delay = min(self.retry_backoff * 2 ** (run.attempt - 1), 600.0)
            fields["retry_at"] = time.time() + delay
            fields["message"] = (
                f"attempt {run.attempt} {result.status} ({result.reason}); retry in {delay:g}s"
            )
            self._set_status(name, exp, "pending", **fields)
        else:
            self._set_status(name, exp, result.status, **fields)
        self.project.cancel_path(name).unlink(missing_ok=True)

    def _large_files(self, out: Path) -> list[str]:
        large = []
        for dirpath, _, files in os.walk(out):
            for fname in files:
                path = Path(dirpath, fname)
                with contextlib.suppress(OSError):
                    if path.stat().st_size > self.max_file_bytes:
                        large.append(str(path.relative_to(out)))
        return sorted(large)

    # -- whole runs ----------------------------------------------------------------------------
    def stop(self, *, kill: bool) -> None:
        """Start no new experiment; with *kill*, stop the running ones as ``interrupted``."""
        self.accepting = False
        if kill:
            for run in self.running.values():
                run.handle.cancel("interrupted")

    def next_retry(self) -> float | None:
        """Epoch time of the earliest pending retry seen by the last :meth:`schedule`."""
        return self._next_retry

    def run_until_idle(self, *, reload: Path | None = None) -> None:
        """Run everything runnable, retries included, and return when nothing is left.

        Parameters
        ----------
        reload : path, optional
            ``experiments.json`` to re-read when it changes (cancels made meanwhile).
        """
        mtime = _mtime(reload)
        while True:
            now = _mtime(reload)
            if now is not None and now != mtime:  # a missing file keeps the list
                mtime = now
                with contextlib.suppress(ExperimentSpecError):
                    self.experiments = load_experiments(reload)
            self.schedule()
            nxt = self.next_retry()
            if not self.running and nxt is None:
                return
            timeout = None if nxt is None else max(nxt - time.time(), 0.0)
            if self.running and reload is not None:
                timeout = 0.5 if timeout is None else min(timeout, 0.5)
            self.wait(timeout)

    def close(self) -> None:
        """Release the backend."""
        self.backend.close()
