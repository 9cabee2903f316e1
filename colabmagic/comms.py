"""Widgets across the link: the remote kernel's comms, relayed to this kernel's frontend.

When ``%%gpu_run`` runs inside a local ipykernel (a notebook), a :class:`CommBridge` joins the
session's remote kernel to that kernel's frontend:

- **Remote -> frontend.** ``comm_open``/``comm_msg``/``comm_close`` of the remote kernel are
  published on the local kernel's IOPub, content, metadata and binary buffers unchanged. During a
  cell the session's own loop hands them over (through :class:`CommRelay`, in order with the
  cell's text and displays) with the local cell as parent, so the frontend draws the widget in
  that cell. Later traffic (a slider's callback, a bar updated from a thread) is read by a
  background listener with its own IOPub subscription to the proxy and goes out with the parent of
  the comm's last message.
- **Frontend -> remote.** Each remote comm gets a stand-in in the local kernel's comm manager
  (``comm.base_comm.BaseComm``, no widget object is created here), so ipykernel routes the
  frontend's ``comm_msg``/``comm_close`` for it to :meth:`CommBridge.forward`. The message goes
  to the remote shell with its header, buffers and ``msg_id`` unchanged, through the proxy's
  sequenced link (so it survives a drop), and the local handler returns when the remote kernel is
  idle again, exactly as a local kernel would run the callback. Because the ``msg_id`` is kept, an
  ``Output`` widget that captures the callback's output (``interact``) names the frontend's own
  message, and the relayed output lands under that widget.
- **Frontend-opened comms** (``jupyter.widget.control`` when a page reloads, an extension's
  target) are forwarded when the remote kernel has the target: the kernel-side helper reports its
  targets, and announces changes after each cell. A target it lacks gets what a kernel without it
  answers: ipykernel's ``comm_close``.
- colabmagic's own comm target (``colabmagic``, push/pull/debug) never crosses to the frontend.

Outside a kernel (terminal IPython, plain Python) widgets show their text form, as before.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
import weakref
from typing import Any

import zmq

from colabmagic import wire
from colabmagic.errors import ColabMagicError, ConnectError, TransferError
from colabmagic.relay import COMM_KINDS, CellRelay, _shell
from colabmagic.session import COMM_TARGET, Session

log = logging.getLogger("colabmagic.comms")

_OUTPUT_KINDS = ("stream", "display_data", "update_display_data", "clear_output", "error")
_NOT_RELAYED = ("status", "execute_input", "execute_result", "error")  # Session.run's own
_REMEMBER = 4096  # remote request ids whose local parent is remembered
_HANDOVER_S = 2.0  # how long the listener lets the cell loop finish before taking over
_bridges: weakref.WeakKeyDictionary[Session, CommBridge] = weakref.WeakKeyDictionary()
_fallback_noted: weakref.WeakSet[Session] = weakref.WeakSet()


def local_kernel() -> Any | None:
    """The ipykernel this code runs in (with a comm manager and IOPub), or None."""
    kernel = getattr(_shell(), "kernel", None)
    if kernel is None or getattr(kernel, "iopub_socket", None) is None:
        return None
    return kernel if getattr(kernel, "comm_manager", None) is not None else None


def cell_relay(session: Session) -> CellRelay:
    """The relay for a ``%%gpu_run`` cell: widgets live in a kernel, their text form elsewhere."""
    kernel = local_kernel()
    if kernel is None:
        return CellRelay()
    bridge = _bridges.get(session)
    if bridge is None or bridge.closed:
        bridge = _bridges[session] = CommBridge(session, kernel)
    if not bridge.setup():
        return CellRelay()  # a kernel whose helper predates widgets: text, as before
    return CommRelay(bridge)


def notes(session: Session, relay: CellRelay) -> list[str]:
    """One-time lines for the user after a cell: ipywidgets version skew, text-only widgets."""
    out = []
    bridge = _bridges.get(session)
    if bridge is not None and bridge.skew and not bridge.skew_noted:
        bridge.skew_noted = True
        out.append(bridge.skew)
    if bridge is not None and bridge.unsupported and relay.widget_fallback:
        if session not in _fallback_noted:
            _fallback_noted.add(session)
            out.append(
                f"widgets show as text: the remote kernel's colabmagic helper is older than this "
                f"one ({bridge.unsupported}); restart it with %colab_connect --name "
                f"{session.name} --restart for live widgets"
            )
    if relay.widget_fallback and session not in _fallback_noted:
        _fallback_noted.add(session)
        out.append(
            "widgets show as text here: their live view needs a Jupyter frontend "
            "(run this notebook in JupyterLab, Notebook or VS Code)"
        )
    return out


def skew_message(remote: str | None, local: str | None) -> str | None:
    """The line naming both ipywidgets versions and the fix, when their majors differ."""
    if not remote or not local or remote.split(".")[0] == local.split(".")[0]:
        return None
    major = local.split(".")[0]
    return (
        f"the remote kernel has ipywidgets {remote} but this notebook's kernel has {local}; "
        f'widgets may not render: run %pip install "ipywidgets=={major}.*" in a %%gpu_run cell '
        "(remotely), then restart it with %colab_connect --restart"
    )


def _local_ipywidgets() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("ipywidgets")
    except metadata.PackageNotFoundError:
        return None


class CommRelay(CellRelay):
    """A cell's relay that publishes the remote kernel's comms to this kernel's frontend."""

    widgets = True

    def __init__(self, bridge: CommBridge):
        self.bridge = bridge

    def handle(self, msg: dict) -> None:
        self.bridge.from_cell(msg)
        super().handle(msg)

    def comm(self, msg: dict) -> None:
        self.bridge.relay_comm(msg, self.bridge.kernel.get_parent())


def _mirror_class():
    from comm.base_comm import BaseComm

    class Mirror(BaseComm):
        """Stands in the local comm manager for a comm whose other end is the remote kernel.

        It publishes nothing itself: the remote kernel speaks for the widget.
        """

        def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
            return None

    return Mirror


class CommBridge:
    """One session's remote comms, joined to the frontend of the local kernel *kernel*."""

    def __init__(self, session: Session, kernel: Any, *, timeout: float = 30.0):
        self.session = session
        self.kernel = kernel
        self.manager = kernel.comm_manager
        self.closed = False
        self.needs_setup = True
        self.unsupported: str | None = None
        self.remote_ipywidgets: str | None = None
        self.skew: str | None = None
        self.skew_noted = False
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._comms: dict[str, Any] = {}  # comm id -> its local stand-in
        self._comm_parent: dict[str, dict] = {}  # comm id -> local parent of its last message
        self._parents: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self._forwarded: dict[str, threading.Event] = {}  # frontend requests until remote idle
        self._busy: set[str] = set()  # cells between busy and idle, as the listener sees them
        self._last_seen: dict[str, str] = {}  # cell -> its last message the cell loop relays
        self._handled: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._targets: set[str] = set()  # local targets registered here
        self._mirror = _mirror_class()
        self._probe: str | None = None
        self._probe_seen = threading.Event()
        self._thread = threading.Thread(
            target=self._listen, name=f"colabmagic-comms-{session.name}", daemon=True
        )
        info = session.proxy.connection_info
        from jupyter_client.session import Session as JupyterSession

        self._codec = JupyterSession(
            key=info["key"].encode(), signature_scheme=info.get("signature_scheme", "hmac-sha256")
        )
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.linger = 0
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(f"tcp://127.0.0.1:{info['iopub_port']}")
        self._thread.start()
        session.proxy.add_kernel_listener(self._on_kernel_event)
        try:
            self._handshake(timeout)
        except BaseException:
            self.close()
            raise

    # -- lifetime ----------------------------------------------------------------------------
    def _handshake(self, timeout: float) -> None:
        """Wait until the listener's subscription delivers (ZeroMQ's slow joiner)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.session._check_alive()
            self._probe = self._send({"header": None, "content": {}}, "comm_info_request")
            if self._probe_seen.wait(1.0):
                return
        msg = (
            f"the widget relay of session {self.session.name!r} got no kernel messages in "
            f"{timeout:g}s; check the link with %colab_status and rerun the cell"
        )
        raise ConnectError(msg)

    def setup(self) -> bool:
        """Tell the remote kernel that widgets reach a frontend (its tqdm bars become widgets).

        False when its helper does not know widgets (a kernel started by an older colabmagic
        and re-attached): then widgets show as text.
        """
        if not self.needs_setup:
            return self.unsupported is None
        try:
            data, _ = self.session.bulk.request("widgets", on=True, timeout=30.0)
        except TransferError as exc:
            if "unknown operation" not in str(exc):
                raise
            self.unsupported = str(exc)
            self.needs_setup = False
            return False
        self.needs_setup = False
        self.unsupported = None
        self.remote_ipywidgets = data.get("ipywidgets")
        self.skew = skew_message(self.remote_ipywidgets, _local_ipywidgets())
        self._set_targets(data.get("targets", []))
        return True

    def close(self) -> None:
        """Stop relaying: the frontend's widgets of this session are closed."""
        if self.closed:
            return
        self.closed = True
        self._close_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(2.0)

    def _on_kernel_event(self, event: dict) -> None:
        """A restarted or dead kernel has no comms: close them in the frontend too."""
        if event.get("event") in ("kernel_ready", "kernel_died", "shutdown"):
            self.needs_setup = True
            self._close_all()

    def _close_all(self) -> None:
        with self._lock:
            for comm_id in list(self._comms):
                parent = self._comm_parent.get(comm_id)
                if parent is not None:
                    self._publish("comm_close", {"comm_id": comm_id, "data": {}}, parent)
                self._forget(comm_id)
            for done in self._forwarded.values():
                done.set()
            self._forwarded.clear()
            self._busy.clear()
            self._cond.notify_all()

    # -- remote -> frontend ------------------------------------------------------------------
    def _publish(self, kind: str, content: dict, parent: dict, metadata=None, buffers=None) -> None:
        if kind in COMM_KINDS:
            ident = f"comm-{content.get('comm_id')}".encode()
        elif kind == "stream":
            ident = f"stream.{content.get('name', 'stdout')}".encode()
        else:
            ident = kind.encode()
        self.kernel.session.send(
            self.kernel.iopub_socket,
            kind,
            content,
            parent=parent,
            ident=ident,
            metadata=metadata or {},
            buffers=list(buffers) if buffers else None,
        )

    def relay_comm(self, msg: dict, parent: dict | None) -> None:
        """Publish one remote comm message with *parent* (None: the comm's last parent)."""
        content = msg["content"]
        kind = msg["header"]["msg_type"]
        comm_id = content.get("comm_id")
        with self._lock:
            if kind == "comm_open":
                if content.get("target_name") == COMM_TARGET:
                    return
                if comm_id not in self._comms:
                    target = content.get("target_name", "")
                    self._adopt(self._mirror(comm_id=comm_id, primary=False, target_name=target))
                    self.manager.register_comm(self._comms[comm_id])
            elif comm_id not in self._comms:
                data = content.get("data") or {}
                if comm_id == self.session.bulk.comm_id and data.get("op") == "targets":
                    self._set_targets(data.get("targets", []))
                return
            parent = parent if parent is not None else self._comm_parent.get(comm_id)
            if parent is None:
                return
            self._comm_parent[comm_id] = parent
            if kind == "comm_msg":
                self._translate(content)
            elif kind == "comm_close":
                self._forget(comm_id)
            self._publish(kind, content, parent, msg.get("metadata"), msg.get("buffers"))

    def _translate(self, content: dict) -> None:
        """An ``Output`` widget capturing a remote request's output names the local one instead."""
        state = (content.get("data") or {}).get("state")
        if isinstance(state, dict) and state.get("msg_id") in self._parents:
            state["msg_id"] = self._parents[state["msg_id"]]["header"]["msg_id"]

    def from_cell(self, msg: dict) -> None:
        """Called by the cell loop for each message it relays (main thread, in order)."""
        remote = msg["parent_header"].get("msg_id")
        with self._cond:
            if remote is not None and remote not in self._parents:
                self._remember(remote, self.kernel.get_parent())
            self._handled[msg["header"]["msg_id"]] = None
            while len(self._handled) > _REMEMBER:
                self._handled.popitem(last=False)
            self._cond.notify_all()

    def _remember(self, remote_id: str, parent: dict) -> None:
        self._parents[remote_id] = parent
        while len(self._parents) > _REMEMBER:
            self._parents.popitem(last=False)

    # -- the listener (remote IOPub outside the cells) ---------------------------------------
    def _listen(self) -> None:
        try:
            while not self.closed and not self.session.closed:
                if not self._sub.poll(100):
                    continue
                _, msg = self._codec.recv(self._sub, zmq.NOBLOCK, copy=False)
                if msg is None:
                    continue
                try:
                    self._on_iopub(msg)
                except Exception:  # a bad message must not stop the widgets of the session
                    log.exception("comm relay: could not relay a %s", msg["header"]["msg_type"])
        except zmq.ZMQError as exc:
            log.info("comm relay of %s stopped: %s", self.session.name, exc)
        finally:
            self._sub.close(linger=0)
            self._ctx.term()
            if self.session.closed:  # %colab_disconnect: its widgets are gone too
                self.close()

    def _on_iopub(self, msg: dict) -> None:
        kind = msg["header"]["msg_type"]
        parent = msg["parent_header"]
        pid = parent.get("msg_id")
        if pid is not None and pid == self._probe:
            self._probe_seen.set()
        if kind == "status":
            state = msg["content"].get("execution_state")
            if pid in self._forwarded:
                if state == "idle":
                    self._forwarded.pop(pid).set()
            elif parent.get("msg_type") == "execute_request":
                if state == "busy":
                    self._busy.add(pid)
                elif state == "idle" and pid in self._busy:
                    self._busy.discard(pid)
                    self._await_cell_loop(pid)
            return
        if pid in self._forwarded:
            local = self._parents.get(pid)
            if kind in COMM_KINDS:
                self.relay_comm(msg, local)
            elif kind in _OUTPUT_KINDS and local is not None:
                with self._lock:
                    meta, buffers = msg.get("metadata"), msg.get("buffers")
                    self._publish(kind, msg["content"], local, meta, buffers)
            return
        if pid in self._busy:  # the cell loop relays it, in order with the cell's output
            if kind not in _NOT_RELAYED:
                self._last_seen[pid] = msg["header"]["msg_id"]
            return
        if kind in COMM_KINDS:
            self.relay_comm(msg, None)

    def _await_cell_loop(self, cell: str) -> None:
        """Before relaying what a cell's threads send after it ended, let its loop finish."""
        last = self._last_seen.pop(cell, None)
        if last is None:
            return
        deadline = time.monotonic() + _HANDOVER_S
        with self._cond:
            while last not in self._handled and time.monotonic() < deadline:
                self._cond.wait(0.02)
                if self.session._lock.acquire(blocking=False):  # Session.run has returned
                    self.session._lock.release()
                    break

    # -- frontend -> remote ------------------------------------------------------------------
    def _send(self, msg: dict, msg_type: str | None = None, buffers=()) -> str:
        """Sign *msg* (a frontend message, or new content) and queue it for the remote shell."""
        codec = self.session.client.session
        if msg["header"] is None:
            out = codec.msg(msg_type, msg["content"])
        else:
            header = dict(msg["header"])
            out = {
                "header": header,
                "msg_id": header["msg_id"],
                "msg_type": header["msg_type"],
                "parent_header": {},
                "metadata": msg.get("metadata") or {},
                "content": msg["content"],
            }
        frames = codec.serialize(out)
        self.session.proxy.send_direct(wire.SHELL, [*frames, *buffers])
        return out["header"]["msg_id"]

    def forward(self, msg: dict) -> None:
        """Send a frontend comm message on to the remote kernel; return when it is idle again.

        Runs in the local kernel's shell thread, like any comm handler: the local kernel stays
        busy while the remote callback runs, so its output arrives before the local ``idle``.
        """
        kind = msg["header"]["msg_type"]
        if kind == "comm_close":
            with self._lock:
                self._forget(msg["content"].get("comm_id"))
        if self.closed or self.session.closed or self.session.proxy.state == "dead":
            return
        done = threading.Event()
        msg_id = msg["header"]["msg_id"]
        with self._lock:
            self._forwarded[msg_id] = done
            self._remember(msg_id, msg)
            comm_id = msg["content"].get("comm_id")
            if comm_id in self._comms:
                self._comm_parent[comm_id] = msg
        self._send(msg, buffers=msg.get("buffers") or ())
        try:
            while not done.wait(0.1):
                if self.closed or self.session.closed or self.session.proxy.state == "dead":
                    break
        except KeyboardInterrupt:
            with contextlib.suppress(ColabMagicError):
                self.session.interrupt()
            raise
        finally:
            with self._lock:
                self._forwarded.pop(msg_id, None)

    def _adopt(self, comm: Any) -> None:
        self._comms[comm.comm_id] = comm
        comm.on_msg(self.forward)
        comm.on_close(self.forward)

    def _forget(self, comm_id: str | None) -> None:
        comm = self._comms.pop(comm_id, None)
        self._comm_parent.pop(comm_id, None)
        if comm is not None:
            comm._closed = True  # nothing to tell anyone when it is collected
            self.manager.comms.pop(comm_id, None)

    def _open_from_frontend(self, comm: Any, msg: dict) -> None:
        """A local target handler: the frontend opened a comm to a target the remote has."""
        with self._lock:
            self._adopt(comm)
            self._comm_parent[comm.comm_id] = msg
        self.forward(msg)

    def _set_targets(self, names: list[str]) -> None:
        """Forward frontend-opened comms for the remote's targets (local ones keep theirs)."""
        wanted = set(names) - {COMM_TARGET}
        with self._lock:
            for name in sorted(self._targets - wanted):
                if self.manager.targets.get(name) == self._open_from_frontend:
                    self.manager.unregister_target(name, self._open_from_frontend)
                self._targets.discard(name)
            for name in sorted(wanted - self._targets):
                if name not in self.manager.targets:
                    self.manager.register_target(name, self._open_from_frontend)
                    self._targets.add(name)
