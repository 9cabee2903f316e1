"""colabmagic: run notebook cells on a remote GPU kernel as if they ran locally.

``%load_ext colabmagic`` registers the magics (``%colab_connect``, ``%%gpu_run``...);
:func:`connect` is the same thing from plain Python. Imports are lazy so that the small
processes colabmagic starts (bridges, agents) stay fast to launch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = [
    "ColabMagicError",
    "RemoteError",
    "Session",
    "connect",
    "load_ipython_extension",
    "unload_ipython_extension",
]

if TYPE_CHECKING:
    from colabmagic.errors import ColabMagicError, RemoteError
    from colabmagic.session import Session


def connect(target: str | None = None, *, local: bool = False, **kwargs: Any) -> Session:
    """Start (or attach to) a kernel and return its :class:`~colabmagic.session.Session`.

    Parameters
    ----------
    target
        ``"local"`` or ``None`` with ``local=True`` for a kernel on this machine; the
        ``colab://...`` line that :func:`colabmagic.colab.serve` printed on a runtime (its host
        keys pinned); otherwise an SSH target (``[user@]host[:port]`` or an alias from
        ``~/.ssh/config``).
    **kwargs
        Passed to :func:`colabmagic.connection.connect` (``name``, ``mock_gpu``, ``attach``,
        ``cwd``, ``python``, ``save="ALIAS"`` for a ``colab://`` line...).

    Examples
    --------
    >>> import colabmagic
    >>> s = colabmagic.connect(local=True)  # doctest: +SKIP
    >>> s.run("print(1)")                   # doctest: +SKIP
    """
    from colabmagic.connection import connect as _connect

    return _connect(target, local=local, **kwargs)


def load_ipython_extension(ipython) -> None:
    """Register the magics (``%load_ext colabmagic``)."""
    from colabmagic.magics import ColabMagics

    magics = ColabMagics(shell=ipython)
    ipython.register_magics(magics)
    ipython._colabmagic_magics = magics


def unload_ipython_extension(ipython) -> None:
    """Shut down the sessions this extension started (``%unload_ext colabmagic``)."""
    magics = getattr(ipython, "_colabmagic_magics", None)
    if magics is not None:
        magics.shutdown_all()
        del ipython._colabmagic_magics


def __getattr__(name: str) -> Any:
    if name in ("ColabMagicError", "RemoteError"):
        from colabmagic import errors

        return getattr(errors, name)
    if name == "Session":
        from colabmagic.session import Session

        return Session
    raise AttributeError(name)
