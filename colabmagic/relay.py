"""Turn the remote kernel's IOPub messages into local output.

A :class:`Relay` receives each message of a remote cell, in order, and reproduces it locally:
``stream`` -> ``sys.stdout``/``sys.stderr`` (so in a notebook it lands in the current cell),
``display_data``/``update_display_data`` -> IPython's display publisher with the same MIME
bundle, metadata and ``display_id``, ``clear_output`` -> ``IPython.display.clear_output``.
``execute_result`` and ``error`` are collected by the session, which returns the result as a
displayable object and raises :class:`~colabmagic.errors.RemoteError` for the error.
``comm_open``/``comm_msg``/``comm_close`` go to :meth:`Relay.comm`, which ignores them here;
:class:`colabmagic.comms.CommRelay` publishes them to a local kernel's frontend (widgets).
"""

from __future__ import annotations

import sys
from typing import Any

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
COMM_KINDS = ("comm_open", "comm_msg", "comm_close")


class RemoteDisplay:
    """A remote ``execute_result``/``display_data`` bundle that displays itself locally."""

    def __init__(self, data: dict[str, Any], metadata: dict[str, Any] | None = None):
        self.data = data
        self.metadata = metadata or {}

    def _repr_mimebundle_(self, include=None, exclude=None):
        return self.data, self.metadata

    def __repr__(self) -> str:
        return str(self.data.get("text/plain", "<remote output>"))


class Relay:
    """Reproduce remote output in this process; subclass to send it elsewhere."""

    #: True when the widget models' comms reach the frontend, so widget views can be shown.
    widgets = False
    #: Set when a widget view was replaced by its text form (no comm relay here).
    widget_fallback = False

    def stream(self, name: str, text: str) -> None:
        out = sys.stderr if name == "stderr" else sys.stdout
        out.write(text)
        out.flush()

    def display(
        self,
        data: dict[str, Any],
        metadata: dict[str, Any],
        transient: dict[str, Any],
        *,
        update: bool = False,
    ) -> None:
        if WIDGET_MIME in data and not self.widgets:
            # The widget's model lives in the remote kernel; its comm messages are not relayed,
            # so show the plain-text form instead of a "model not found" error.
            self.widget_fallback = True
            data = {k: v for k, v in data.items() if k != WIDGET_MIME}
            if not data:
                return
        shell = _shell()
        if shell is not None:
            shell.display_pub.publish(
                data=data, metadata=metadata, transient=transient, update=update
            )
        elif not update:
            text = data.get("text/plain")
            if text is not None:
                print(text)

    def execute_result(self, result: RemoteDisplay) -> None:
        """The cell's value: shown as a display here; the magics return it instead."""
        self.display(result.data, result.metadata, {})

    def clear_output(self, wait: bool) -> None:
        if _shell() is not None:
            from IPython.display import clear_output

            clear_output(wait=wait)

    def comm(self, msg: dict) -> None:
        """A comm message of the remote kernel (a widget's model...); nothing to do here."""
        return None

    def handle(self, msg: dict) -> None:
        """Dispatch one IOPub message (``error`` and ``execute_result`` are the caller's)."""
        kind = msg["header"]["msg_type"]
        content = msg["content"]
        if kind in COMM_KINDS:
            self.comm(msg)
        elif kind == "stream":
            self.stream(content.get("name", "stdout"), content.get("text", ""))
        elif kind in ("display_data", "update_display_data"):
            self.display(
                content.get("data", {}),
                content.get("metadata", {}),
                content.get("transient", {}),
                update=kind == "update_display_data",
            )
        elif kind == "clear_output":
            self.clear_output(bool(content.get("wait", False)))


class QuietRelay(Relay):
    """Relay nothing (outputs are still collected in the :class:`ExecutionResult`)."""

    def handle(self, msg: dict) -> None:
        return None

    def execute_result(self, result: RemoteDisplay) -> None:
        return None


class CellRelay(Relay):
    """For ``%%gpu_run``: the magic returns the cell's value, so IPython shows it as Out[n]."""

    def execute_result(self, result: RemoteDisplay) -> None:
        return None


def _shell():
    if "IPython" not in sys.modules:
        return None
    from IPython import get_ipython

    return get_ipython()
