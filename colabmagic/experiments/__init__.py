"""Batch experiments: an ``experiments.json`` queue, a crash-safe runner, a git-watching daemon.

Python API (the CLI ``colabmagic exp ...`` is a thin layer over it)::

    from colabmagic import experiments as ex

    project = ex.Project("path/to/repo")
    ex.add(project, "baseline", "python train.py --lr 0.01", timeout=3600)
    ex.grid(project, "python train.py --lr {lr} --bs {bs}",
            {"lr": ["0.001", "0.01"], "bs": ["16", "32"]}, name="hparam_{lr}_{bs}")
    ex.run(project, slots=2)            # run what is pending here, then return
    for row in ex.status_rows(project):  # merged view: status, attempts, metrics, last log line
        print(row.name, row.status, row.metrics)
    ex.sync(project)                     # pull the daemon's results (git), refresh the view
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from colabmagic.experiments.backends import make_backend
from colabmagic.experiments.daemon import Daemon, hold_runner_lock
from colabmagic.experiments.edit import add_experiments, cancel_experiment, rerun_experiment
from colabmagic.experiments.grid import expand_grid, parse_param
from colabmagic.experiments.queue import Queue, detect_gpu_ids, git_head
from colabmagic.experiments.runner import RunRequest, RunResult, run_process
from colabmagic.experiments.spec import (
    STATUSES,
    Experiment,
    load_experiments,
    parse_experiments,
)
from colabmagic.experiments.state import Project, as_project, effective_status
from colabmagic.experiments.sync import Row, SyncReport, apply_view, status_rows, sync

__all__ = [
    "STATUSES", "Daemon", "Experiment", "Project", "Queue", "Row", "RunRequest", "RunResult",
    "SyncReport", "add", "apply_view", "cancel", "detect_gpu_ids", "effective_status",
    "expand_grid", "grid", "load_experiments", "parse_experiments", "parse_param", "rerun",
    "run", "run_process", "status_rows", "sync",
]  # fmt: skip


def add(
    project: Project | str | os.PathLike[str],
    name: str,
    command: str | Sequence[str],
    *,
    timeout: float | None = None,
    retries: int = 0,
    gpus: int = 1,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    depends_on: Sequence[str] = (),
    tags: Sequence[str] = (),
) -> Experiment:
    """Append one experiment to ``experiments.json``.

    Parameters
    ----------
    project : Project or path-like
        Directory holding ``experiments.json``.
    name : str
        Unique name (also ``outputs/<name>/``).
    command : str or sequence of str
        Shell command, or an argument list run without a shell.
    timeout, retries, gpus, env, cwd, depends_on, tags
        See ``docs/experiments.md``.

    Returns
    -------
    Experiment
        The entry written.

    Examples
    --------
    >>> add(".", "baseline", "python train.py", timeout=600)  # doctest: +SKIP
    """
    exp = Experiment(
        name=name,
        command=command if isinstance(command, str) else tuple(command),
        timeout=timeout,
        retries=retries,
        gpus=gpus,
        env=dict(env or {}),
        cwd=cwd,
        depends_on=tuple(depends_on),
        tags=tuple(tags),
    )
    add_experiments(as_project(project), [exp])
    return exp


def grid(
    project: Project | str | os.PathLike[str],
    template: str,
    params: Mapping[str, Sequence[str]],
    **kw: Any,
) -> list[Experiment]:
    """Append a parameter sweep (see :func:`~colabmagic.experiments.grid.expand_grid`)."""
    exps = expand_grid(template, params, **kw)
    add_experiments(as_project(project), exps)
    return exps


def cancel(project: Project | str | os.PathLike[str], name: str) -> None:
    """Cancel *name*: mark it in ``experiments.json``; stop it if it runs on this machine."""
    cancel_experiment(as_project(project), name)


def rerun(project: Project | str | os.PathLike[str], name: str) -> int:
    """Ask for a new run of *name* (bumps its ``rerun`` counter); returns the new counter."""
    return rerun_experiment(as_project(project), name)


def run(
    project: Project | str | os.PathLike[str],
    *,
    slots: int = 1,
    backend: str = "local",
    scheduler: str | None = None,
    gpu_ids: list[str] | None = None,
    grace: float = 5.0,
    retry_backoff: float = 5.0,
    update_view: bool = True,
) -> list[Row]:
    """Run every pending experiment of *project* here and now; return when none is left.

    Parameters
    ----------
    project : Project or path-like
    slots : int
        Experiments at once.
    backend : {"local", "dask"}
        ``dask`` sends each run to a Dask worker (``scheduler`` address required).
    scheduler : str, optional
        ``tcp://HOST:8786`` for the Dask backend.
    gpu_ids : list of str, optional
        GPU ids to hand out (local backend).
    grace, retry_backoff
        See :class:`~colabmagic.experiments.queue.Queue`.
    update_view : bool
        Write the resulting statuses into ``experiments.json`` at the end.

    Returns
    -------
    list of Row
        The merged view after the run.

    Raises
    ------
    ColabMagicError
        Another runner (daemon or ``exp run``) is active in this project, or *backend* is
        unknown (or ``dask`` without *scheduler*).
    """
    proj = as_project(project)
    with hold_runner_lock(proj):
        queue = Queue(proj, slots=slots, gpu_ids=gpu_ids, backend=make_backend(backend, scheduler),
                      grace=grace, retry_backoff=retry_backoff)  # fmt: skip
        try:
            queue.recover()
            queue.git_commit = git_head(proj.root)
            queue.load(load_experiments(proj.spec_path))
            queue.run_until_idle(reload=proj.spec_path)
        finally:
            queue.stop(kill=True)
            while queue.running:
                queue.wait(None)
            queue.close()
    if update_view:
        apply_view(proj)
    return status_rows(proj)
