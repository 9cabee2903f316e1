"""Where experiment processes run: :mod:`.local` (threads on this host) or :mod:`.dask`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from colabmagic.errors import ParameterError
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


def make_backend(name: str, scheduler: str | None = None) -> Backend | None:
    """The backend chosen by ``--backend NAME`` (``exp run``, ``exp daemon``).

    Parameters
    ----------
    name : {"local", "dask"}
        ``local`` returns ``None`` (the queue's own :class:`~.local.LocalBackend`).
    scheduler : str, optional
        ``tcp://HOST:8786``; required for ``dask``.

    Raises
    ------
    ParameterError
        An unknown name, or ``dask`` without a scheduler address.
    """
    if name == "local":
        return None
    if name != "dask":
        msg = f"backend={name!r} is unknown; use 'local' or 'dask'"
        raise ParameterError(msg)
    if not scheduler:
        msg = "--backend dask needs --scheduler tcp://HOST:8786 (the Dask scheduler's address)"
        raise ParameterError(msg)
    from colabmagic.experiments.backends.dask import DaskBackend

    return DaskBackend(scheduler)
