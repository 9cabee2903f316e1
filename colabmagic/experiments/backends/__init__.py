"""Where experiment processes run: :mod:`.local` (threads on this host) or :mod:`.dask`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from colabmagic.experiments.runner import RunRequest, RunResult

#: Called (from any thread) when a run ends: ``(name, result, files)``. *files* maps relative
#: paths to bytes for backends whose processes ran elsewhere, ``None`` for the local one.
Done = Callable[[str, RunResult, "dict[str, bytes] | None"], None]


class Handle(Protocol):
    """A submitted run."""

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the run to stop its process group; *reason* becomes its status."""


class Backend(Protocol):
    """Runs :class:`RunRequest` objects and reports back through a callback."""

    #: False when processes do not run on this host (no run records, no GPU pinning here).
    local: bool

    def submit(self, req: RunRequest, done: Done, *, gpus: int = 0, **kw: Any) -> Handle:
        """Start *req*; call *done* when it has ended."""

    def close(self) -> None:
        """Release resources."""
