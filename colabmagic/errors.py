"""The one exception family of colabmagic.

Every error a user can cause or meet derives from :class:`ColabMagicError`; the magics turn these
into one-line :class:`IPython.core.error.UsageError` messages, the CLI into ``click`` errors.
Genuine bugs are anything else and keep their traceback.
"""

from __future__ import annotations


class _OneLine:
    """Mixin: IPython shows ``Name: message`` instead of a traceback through our own code."""

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


class ColabMagicError(Exception):
    """Base class of every error colabmagic raises on purpose."""


class ParameterError(ColabMagicError, ValueError):
    """A user-supplied value is invalid; the message names it and the valid choices."""


class ConnectError(ColabMagicError, ConnectionError):
    """The link to a kernel could not be made or was lost for good."""


class HostKeyError(ConnectError):
    """The SSH host key is unknown or has changed."""


class NotConnectedError(ColabMagicError):
    """A command needs a session and there is none with that name."""


class RemoteKernelDied(_OneLine, ColabMagicError):
    """The remote kernel process exited (crash, ``os._exit``, SIGKILL, OOM killer)."""

    def __init__(self, message: str, *, exit_code: int | None = None, signal: str | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.signal = signal


class TransferError(ColabMagicError):
    """A variable or file could not be moved between the local and remote side."""


class ExperimentSpecError(ColabMagicError, ValueError):
    """``experiments.json`` (or a command-line experiment) is invalid."""


class RemoteError(ColabMagicError):
    """An exception raised by code that ran in the remote kernel.

    Carries the remote ``ename``, ``evalue`` and ``traceback`` (list of ANSI-coloured lines).
    IPython shows the remote traceback instead of ours through ``_render_traceback_``.
    """

    def __init__(self, ename: str, evalue: str, traceback: list[str] | None = None):
        super().__init__(f"{ename}: {evalue}")
        self.ename = ename
        self.evalue = evalue
        self.traceback = list(traceback or [])

    def _render_traceback_(self) -> list[str]:
        if self.traceback:
            return [*self.traceback]
        return [f"{self.ename}: {self.evalue}"]


class CellTimeoutError(_OneLine, ColabMagicError, TimeoutError):
    """A remote cell ran past its ``--timeout``; it was interrupted and the kernel is usable."""
