"""The user's view: statuses merged by name, written into ``experiments.json``, and ``exp sync``.

Why this cannot conflict (the full argument is in ``docs/experiments.md``):

1. The daemon writes only under ``outputs/``; the user writes ``experiments.json`` and code. Git
   merges of disjoint files never conflict, so the daemon's pushes and the user's pushes never
   touch the same lines.
2. Statuses reach ``experiments.json`` only here, on the user's machine, by name, as a
   *view*: :func:`apply_view` sets ``status`` values in place (formatting kept) and remembers what
   it changed. Before pulling, :func:`sync` puts those values back, so the file matches what the
   user wrote (byte for byte when they made no edit) and the pull only has to fast-forward.
3. ``exp sync`` pulls only when no file changed on both sides (it checks first); otherwise it
   stops with a message and changes nothing. It never leaves conflict markers.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from colabmagic.errors import ColabMagicError
from colabmagic.experiments.edit import spec_lock
from colabmagic.experiments.gitutil import Git, is_git_repo
from colabmagic.experiments.spec import (
    TERMINAL,
    Experiment,
    atomic_write_text,
    load_experiments,
    read_entries,
    set_fields_text,
)
from colabmagic.experiments.state import (
    Project,
    as_project,
    effective_status,
    read_json,
    write_json,
)


@dataclass
class Row:
    """One line of ``exp list``."""

    name: str
    status: str
    attempts: int = 0
    duration: float | None = None
    exit_code: int | None = None
    last_line: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    tags: list[str] = field(default_factory=list)
    not_committed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


def last_line(path: Path, *, limit: int = 4096) -> str:
    """The last non-empty line of a log file (reads only its tail)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(size - limit, 0))
            tail = fh.read().decode(errors="replace")
    except OSError:
        return ""
    lines = deque((ln.strip() for ln in tail.splitlines() if ln.strip()), maxlen=1)
    return lines[0][:200] if lines else ""


def read_metrics(path: Path) -> dict[str, Any]:
    """Scalar values of ``metrics.json`` (nested objects are flattened with dots)."""
    data = read_json(path)
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[prefix[:-1]] = value

    if isinstance(data, dict):
        walk("", data)
    return out


def status_rows(project: Project | str | os.PathLike[str]) -> list[Row]:
    """The merged view of every experiment: file entries plus statuses, logs and metrics.

    Parameters
    ----------
    project : Project

    Returns
    -------
    list of Row
        In file order.
    """
    project = as_project(project)
    statuses = project.read_statuses()
    rows = []
    for exp in load_experiments(project.spec_path):
        st = statuses.get(exp.name)
        current = st if st is not None and st.get("rerun", 0) >= exp.rerun else None
        out = project.output_dir(exp.name)
        row = Row(name=exp.name, status=effective_status(exp, st), tags=list(exp.tags))
        if current is not None:
            row.attempts = int(current.get("attempt", 0))
            row.duration = current.get("duration")
            row.exit_code = current.get("exit_code")
            row.message = current.get("message") or ""
            row.not_committed = list(current.get("not_committed") or [])
            row.last_line = last_line(out / "stdout.log") or last_line(out / "stderr.log")
            row.metrics = read_metrics(out / "metrics.json")
        rows.append(row)
    return rows


def daemon_health(project: Project) -> dict[str, Any] | None:
    """``outputs/.daemon/status.json`` (last error, last commit seen), if a daemon wrote one."""
    data = read_json(project.daemon_status_path)
    return data if isinstance(data, dict) else None


# -- the view in experiments.json --------------------------------------------------------------
def _state_path(project: Project) -> Path:
    return project.state_dir / "sync.json"


def _load_state(project: Project) -> dict[str, Any]:
    data = read_json(_state_path(project))
    return data if isinstance(data, dict) else {}


def _save_state(project: Project, state: dict[str, Any]) -> None:
    project.state_dir.mkdir(parents=True, exist_ok=True)
    write_json(_state_path(project), state)


def _apply_view(project: Project, state: dict[str, Any]) -> dict[str, str]:
    text, entries = read_entries(project.spec_path)
    statuses = project.read_statuses()
    updates: dict[str, dict[str, Any]] = {}
    written: dict[str, list[Any]] = {}
    for entry in entries:
        exp = Experiment.from_dict(entry)
        eff = effective_status(exp, statuses.get(exp.name))
        if entry.get("status") != eff:
            updates[exp.name] = {"status": eff}
            written[exp.name] = [entry.get("status"), eff, exp.rerun]
    if updates:
        atomic_write_text(project.spec_path, set_fields_text(text, updates))
    state["written"] = written
    return {name: value[1] for name, value in written.items()}


def _revert_view(project: Project, state: dict[str, Any], git: Git | None) -> list[str]:
    """Put back the status values the last view changed; turn user-typed ``pending`` into reruns.

    Returns the names whose ``rerun`` was bumped.
    """
    text, entries = read_entries(project.spec_path)
    written: dict[str, list[Any]] = state.get("written", {})
    updates: dict[str, dict[str, Any]] = {}
    bumped = []
    for entry in entries:
        name = entry["name"]
        if name not in written:
            continue
        before, after, rerun = (written[name] + [0])[:3]
        now = entry.get("status")
        if now == after:
            updates[name] = {"status": before if before is not None else "pending"}
        elif now == "pending" and after in TERMINAL and entry.get("rerun", 0) == rerun:
            updates[name] = {"rerun": entry.get("rerun", 0) + 1}
            bumped.append(name)
    if updates:
        text = set_fields_text(text, updates)
        if git is not None:
            head = git.show("HEAD", project.spec_path.name)
            with contextlib.suppress(ColabMagicError, ValueError):
                if head is not None and json.loads(head) == json.loads(text):
                    text = head
        atomic_write_text(project.spec_path, text)
    state["written"] = {}
    return bumped


def apply_view(project: Project | str | os.PathLike[str]) -> dict[str, str]:
    """Write the merged statuses into ``experiments.json`` (status values only, by name).

    Returns
    -------
    dict
        ``{name: status}`` for every value that differs from what the user wrote.
    """
    project = as_project(project)
    with spec_lock(project):
        state = _load_state(project)
        _revert_view(project, state, Git(project.root) if is_git_repo(project.root) else None)
        changed = _apply_view(project, state)
        _save_state(project, state)
    return changed


# -- exp sync -----------------------------------------------------------------------------------
@dataclass
class SyncReport:
    """What ``exp sync`` did."""

    changes: list[dict[str, Any]] = field(default_factory=list)
    pulled: int = 0
    pushed: bool = False
    reruns: list[str] = field(default_factory=list)
    daemon: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


def _upstream(git: Git) -> tuple[str, str] | None:
    branch = git.run("symbolic-ref", "--short", "-q", "HEAD").stdout.strip()
    if not branch:
        msg = "HEAD is detached; check out the experiments branch before `exp sync`"
        raise ColabMagicError(msg)
    remote = git.run("config", f"branch.{branch}.remote").stdout.strip()
    merge = git.run("config", f"branch.{branch}.merge").stdout.strip()
    if not remote or not merge:
        if not git.run("remote").stdout.strip():
            return None
        msg = f"branch {branch!r} has no upstream; run `git push -u origin {branch}` once"
        raise ColabMagicError(msg)
    return remote, merge.removeprefix("refs/heads/")


def _integrate(git: Git, remote: str, branch: str) -> int:
    """Fetch and bring in the remote's commits when no file changed on both sides."""
    fetched = git.fetch_branch(remote, branch)
    if not fetched.ok:
        msg = (
            f"could not fetch {remote}/{branch}: {fetched.error_line}; check the network and "
            "your git access to the remote, then rerun `exp sync`"
        )
        raise ColabMagicError(msg)
    up = git.rev(f"refs/remotes/{remote}/{branch}")
    head = git.rev("HEAD")
    if up is None or (head is not None and git.is_ancestor(up, head)):
        return 0
    count = int(git.out("rev-list", "--count", f"HEAD..{up}") or 0) if head else 0
    if head is None:
        git.run("reset", "-q", up, check=True)
        git.run("checkout", "-q", "--", ".", check=True)
        return count
    base = git.out("merge-base", head, up)
    theirs = git.changed_files(base, up)
    ours = git.changed_files(base, head) | git.dirty_files()
    both = sorted(theirs & ours)
    if both:
        msg = (
            f"{', '.join(both[:5])} changed both here and on {remote}/{branch}; nothing was "
            f"pulled. Commit your edits and `git pull` to merge them, then rerun `exp sync`"
        )
        raise ColabMagicError(msg)
    if git.is_ancestor(head, up):
        res = git.run("merge", "-q", "--ff-only", up)
    else:
        res = git.run("rebase", "-q", "--autostash", up)
        if not res.ok:
            git.run("rebase", "--abort")
    if not res.ok:
        msg = (
            f"could not bring in {remote}/{branch}: {res.error_line}; "
            "run `git pull` to merge by hand, then rerun `exp sync`"
        )
        raise ColabMagicError(msg)
    return count


def sync(project: Project | str | os.PathLike[str], *, push: bool = False) -> SyncReport:
    """Pull the daemon's results and show them in ``experiments.json``.

    Parameters
    ----------
    project : Project
        A git checkout of the experiments branch (or a plain directory: the view is refreshed).
    push : bool
        Also commit the user's own edits of ``experiments.json`` (never the status view) and
        push the branch, so the daemon sees new experiments, cancels and reruns.

    Returns
    -------
    SyncReport
        Status changes since the previous sync, commits pulled, reruns requested.

    Raises
    ------
    ColabMagicError
        Fetch/push failed, or the remote changed a file that has local edits too (nothing is
        changed then; the status view is restored).
    """
    project = as_project(project)
    report = SyncReport()
    git = Git(project.root) if is_git_repo(project.root) else None
    with spec_lock(project):
        state = _load_state(project)
        report.reruns = _revert_view(project, state, git)
        try:
            target = _upstream(git) if git is not None else None
            if git is not None and target is not None:
                report.pulled = _integrate(git, *target)
                if push:
                    report.pushed = _push(project, git, *target)
        finally:
            _apply_view(project, state)
            _save_state(project, state)
        report.changes = _changes(project, state)
        _save_state(project, state)
    report.daemon = daemon_health(project)
    return report


def _push(project: Project, git: Git, remote: str, branch: str) -> bool:
    name = project.spec_path.name
    if git.run("status", "--porcelain", "--", name).stdout.strip():
        git.run("add", "--", name, check=True)
        git.run("commit", "-q", "-m", "exp: update experiments.json", "--", name, check=True)
    for _ in range(3):
        up = git.rev(f"refs/remotes/{remote}/{branch}")
        head = git.rev("HEAD")
        if up is not None and head is not None and git.is_ancestor(head, up):
            return False
        res = git.run("push", "-q", remote, f"HEAD:refs/heads/{branch}")
        if res.ok:
            git.fetch_branch(remote, branch)
            return True
        _integrate(git, remote, branch)
    msg = (
        f"could not push to {remote}/{branch}: {res.error_line}; check your push access to "
        "the remote, then rerun `exp sync --push`"
    )
    raise ColabMagicError(msg)


def _changes(project: Project, state: dict[str, Any]) -> list[dict[str, Any]]:
    seen: dict[str, Any] = state.get("seen", {})
    now: dict[str, Any] = {}
    changes = []
    try:
        rows = status_rows(project)
    except ColabMagicError:
        rows = []
    for row in rows:
        key = [row.status, row.attempts]
        now[row.name] = key
        if seen.get(row.name) != key:
            old = seen.get(row.name, [None, 0])[0]
            changes.append({"name": row.name, "old": old, "new": row.status,
                            "attempts": row.attempts, "exit_code": row.exit_code,
                            "duration": row.duration, "message": row.message})  # fmt: skip
    state["seen"] = now
    return changes
