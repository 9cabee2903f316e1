"""User-side edits of ``experiments.json``: add, cancel, rerun — atomic and format-preserving.

These are the user's writes; they are serialised with ``exp sync`` and ``exp run`` by a lock in
the project's state directory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from filelock import FileLock

from colabmagic.errors import ExperimentSpecError
from colabmagic.experiments.spec import (
    Experiment,
    append_entries_text,
    atomic_write_text,
    read_entries,
    set_fields_text,
    validate_entries,
)
from colabmagic.experiments.state import Project


def spec_lock(project: Project) -> FileLock:
    """The lock every writer of ``experiments.json`` on this machine takes."""
    return FileLock(str(project.lock_path("spec")), timeout=30)


def add_experiments(project: Project, experiments: Sequence[Experiment]) -> None:
    """Append *experiments* to ``experiments.json`` (created if missing).

    Raises
    ------
    ExperimentSpecError
        A name already exists, or an entry is invalid.
    """
    with spec_lock(project):
        text, entries = read_entries(project.spec_path)
        names = {e["name"] for e in entries}
        for exp in experiments:
            if exp.name in names:
                msg = (
                    f"experiment {exp.name!r} already exists in {project.spec_path.name}; "
                    f"choose another name or use `colabmagic exp rerun {exp.name}`"
                )
                raise ExperimentSpecError(msg)
            names.add(exp.name)
        new = [e.to_dict() for e in experiments]
        validate_entries(entries + new, source=project.spec_path.name)
        atomic_write_text(project.spec_path, append_entries_text(text, new))


def _update(project: Project, name: str, make: Any) -> dict[str, Any]:
    with spec_lock(project):
        text, entries = read_entries(project.spec_path)
        entry = next((e for e in entries if e["name"] == name), None)
        if entry is None:
            known = ", ".join(e["name"] for e in entries[:10]) or "none"
            msg = f"no experiment named {name!r} in {project.spec_path.name} (known: {known})"
            raise ExperimentSpecError(msg)
        fields = make(entry)
        atomic_write_text(project.spec_path, set_fields_text(text, {name: fields}))
        return fields


def cancel_experiment(project: Project, name: str) -> None:
    """Mark *name* ``cancelled`` in ``experiments.json`` and stop it if it runs on this machine.

    The daemon sees the cancel once the file is pushed (``exp sync --push``).
    """
    _update(project, name, lambda entry: {"status": "cancelled"})
    path = project.cancel_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def rerun_experiment(project: Project, name: str) -> int:
    """Ask for a new run of *name*: bump its ``rerun`` counter and set it ``pending``.

    Returns
    -------
    int
        The new ``rerun`` value.
    """
    fields = _update(
        project, name, lambda entry: {"status": "pending", "rerun": entry.get("rerun", 0) + 1}
    )
    project.cancel_path(name).unlink(missing_ok=True)
    return int(fields["rerun"])
