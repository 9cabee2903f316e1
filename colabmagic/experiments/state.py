"""Where things live in a project, and who writes what.

A project is a directory holding ``experiments.json``:

- ``experiments.json``: written by the user (and ``exp add/grid/cancel/rerun``); ``exp sync`` and
  ``exp run`` only rewrite ``status`` values in it, by name. The daemon never writes it.
- ``outputs/<name>/``: written by whoever runs the experiment (daemon or ``exp run``):
  ``status.json`` (the status of record), ``result.json``, ``stdout.log``, ``stderr.log`` and
  whatever the experiment writes to ``$COLABMAGIC_OUTPUT_DIR`` (``metrics.json``).
- ``outputs/.daemon/status.json``: the daemon's own health (last error, last commit seen).
- the state directory (``.git/colabmagic/`` in a git checkout, else ``.colabmagic/``): never
  committed; run records (pid/pgid of running groups), cancel requests, locks, sync bookkeeping.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from colabmagic.experiments.spec import TERMINAL, Experiment, atomic_write_text

SPEC_FILE = "experiments.json"
OUTPUTS = "outputs"
DAEMON_DIR = ".daemon"
HOST = socket.gethostname()
#: Output files larger than this are not committed (git hosts reject them) nor sent back by Dask.
MAX_COMMIT_BYTES = 50 * 1024 * 1024


def now_iso(ts: float | None = None) -> str:
    """UTC ISO-8601 timestamp with seconds precision."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if ts is None else ts))


def read_json(path: Path) -> Any:
    """Parse a JSON file; ``None`` when it is missing or unreadable (half-written by a crash)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: Any) -> None:
    """Atomically write *data* as indented JSON."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


class Project:
    """Paths of one experiments project.

    Parameters
    ----------
    root : path-like
        The directory that holds ``experiments.json``.
    """

    def __init__(self, root: str | os.PathLike[str] = ".") -> None:
        self.root = Path(root).resolve()
        self.spec_path = self.root / SPEC_FILE
        self.outputs = self.root / OUTPUTS
        git = self.root / ".git"
        self.state_dir = git / "colabmagic" if git.is_dir() else self.root / ".colabmagic"

    def __repr__(self) -> str:
        return f"Project({str(self.root)!r})"

    # -- outputs/<name>/ ----------------------------------------------------------------------
    def output_dir(self, name: str) -> Path:
        """``outputs/<name>/``."""
        return self.outputs / name

    def status_path(self, name: str) -> Path:
        """``outputs/<name>/status.json``."""
        return self.outputs / name / "status.json"

    def read_status(self, name: str) -> dict[str, Any] | None:
        """The status of record of *name*, or ``None`` if it never ran."""
        data = read_json(self.status_path(name))
        return data if isinstance(data, dict) else None

    def write_status(self, name: str, status: dict[str, Any]) -> None:
        """Atomically write ``outputs/<name>/status.json``."""
        self.output_dir(name).mkdir(parents=True, exist_ok=True)
        write_json(self.status_path(name), status)

    def read_statuses(self) -> dict[str, dict[str, Any]]:
        """Every ``outputs/*/status.json``, by name."""
        out: dict[str, dict[str, Any]] = {}
        try:
            dirs = os.scandir(self.outputs)
        except FileNotFoundError:
            return out
        with dirs:
            for entry in dirs:
                if entry.is_dir() and not entry.name.startswith("."):
                    status = self.read_status(entry.name)
                    if status is not None:
                        out[entry.name] = status
        return out

    def clear_output_dir(self, name: str) -> None:
        """Remove the files of a previous run from ``outputs/<name>/``."""
        path = self.output_dir(name)
        if path.is_dir():
            for child in path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        path.mkdir(parents=True, exist_ok=True)

    @property
    def daemon_status_path(self) -> Path:
        """``outputs/.daemon/status.json``: the daemon's health, committed with the outputs."""
        return self.outputs / DAEMON_DIR / "status.json"

    # -- state directory (never committed) ----------------------------------------------------
    @property
    def run_record_dir(self) -> Path:
        """Run records (pid/pgid of running groups, for crash recovery)."""
        return self.state_dir / "running"

    @property
    def cancel_dir(self) -> Path:
        """Cancel requests for experiments running on this machine."""
        return self.state_dir / "cancel"

    def run_record_path(self, name: str) -> Path:
        """Where the pid/pgid of a running experiment is kept (for crash recovery)."""
        return self.run_record_dir / f"{name}.json"

    def cancel_path(self, name: str) -> Path:
        """A cancel request for an experiment running on this machine."""
        return self.cancel_dir / name

    def lock_path(self, what: str) -> Path:
        """A lock file in the state directory."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        return self.state_dir / f"{what}.lock"


def as_project(project: Project | str | os.PathLike[str]) -> Project:
    """*project* itself, or a :class:`Project` for a directory."""
    return project if isinstance(project, Project) else Project(project)


def effective_status(exp: Experiment, status: dict[str, Any] | None) -> str:
    """Merge what ``experiments.json`` asks with the status of record, by name.

    The status file wins for the run it describes (same ``rerun`` counter); a higher ``rerun``
    in the file asks for a new run; ``cancelled`` in the file cancels a pending or running one.

    Parameters
    ----------
    exp : Experiment
        The entry from ``experiments.json``.
    status : dict or None
        ``outputs/<name>/status.json``.

    Returns
    -------
    str
        One of :data:`~colabmagic.experiments.spec.STATUSES`.
    """
    cancel = exp.status == "cancelled"
    if status is not None and status.get("rerun", 0) >= exp.rerun:
        current = status.get("status", "pending")
        if cancel and current in ("pending", "running"):
            return "cancelled"
        return current
    if cancel:
        return "cancelled"
    if status is not None or exp.rerun > 0 or exp.status == "running":
        return "pending"
    return exp.status


def is_final(exp: Experiment, status: dict[str, Any] | None) -> bool:
    """True when *exp* has ended and will not be retried."""
    eff = effective_status(exp, status)
    if eff not in TERMINAL:
        return False
    if eff in ("interrupted",) and status is not None:
        return status.get("attempt", 0) > exp.retries
    return True
