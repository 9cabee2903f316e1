"""TCP forwards through a Jupyter server: the client end, carried through the kernel itself.

Over SSH the agent opens the remote end of a :meth:`colabmagic.proxy.Proxy.forward` connection; a
Jupyter server offers no TCP forward, so the :class:`~.jupyter_link.KernelLink` (which plays the
agent's part locally) hands the proxy's ``tcp_open`` operations and ``TCP`` channel bytes to
:class:`KernelForwards`, which relays them through the kernel-side forwarder
(:mod:`colabmagic.remote.tcp_forward`, installed by the link's bootstrap): bytes to the kernel as
``colabmagic_tcp_request`` messages on the control channel, bytes back as ``colabmagic_tcp_data``
messages on IOPub. The proxy, the Session and ``%colab_debug --vscode`` do not know the
difference, and any port works the same way (TensorBoard, a dashboard).

Guarantees: the bytes of each direction arrive once and in order across websocket drops. Chunks
are numbered per stream; the kernel drops resent duplicates and holds early ones, this side drops
duplicates (a journal replay and a resume can both carry a chunk) and delivers in order. Flow
control: at most :data:`WINDOW` requests per stream are in flight, and we stop sending while the
kernel reports more than :data:`BACKLOG` bytes queued for its socket; the kernel keeps at most
``WINDOW`` unacknowledged chunks per stream (its reader waits). (Towards the local client the
proxy buffers what its socket does not take yet, as over SSH.) After a drop,
:meth:`KernelForwards.resume` resends the unanswered requests and asks the kernel for the chunks
this side lacks; a chunk lost with no drop is published again by the kernel after a second without
an acknowledgement. A close on either side closes the other. A kernel restart ends every stream.

Why not ipykernel's own debugger protocol (``debug_request``/``debug_reply`` on control,
``debug_event`` on IOPub, what JupyterLab's debugger uses) bridged to a local DAP server? It was
weighed and set aside: ipykernel's ``Debugger`` is an adapter of its own (it rewrites ``attach``
and ``initialize``, maps cells to temporary files, starts debugpy itself), so VS Code's debugpy
client (``pathMappings``, ``justMyCode``, its own attach flow) would talk to a different adapter
than the one it expects; ipykernel's debugger and ``debugpy.listen`` cannot both own the kernel's
debugpy; and it would help debugging only, while a byte forward also serves ``Proxy.forward`` for
any port. JupyterLab's debugger panel keeps working unchanged: its ``debug_request`` messages pass
through the link like any control message.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from typing import Any

from colabmagic import wire

log = logging.getLogger("colabmagic.jupyter")

REQUEST = "colabmagic_tcp_request"
DATA = "colabmagic_tcp_data"
WINDOW = 16
BACKLOG = 4 << 20  # bytes queued in the kernel for its socket above which we stop sending
POLL = 0.02  # seconds between backlog checks while stopped


class _Stream:
    """One forwarded connection as this side sees it."""

    def __init__(self, sid: int, port: int, key: str):
        self.sid = sid
        self.port = port
        self.key = key
        self.pending: collections.deque = collections.deque()  # [content, buffers], in order
        self.inflight = 0  # how many of ``pending`` were sent on the current websocket
        self.sent_n = 0  # the last client chunk numbered
        self.next_in = 1  # the next kernel chunk to deliver
        self.held: dict[int, bytes | None] = {}  # kernel chunks ahead of a gap (None = eof)
        self.acked = 0  # the last acknowledgement sent
        self.closing = False  # our close is queued: nothing more goes to the kernel
        self.backlog = 0  # bytes the kernel has queued for its socket (from its last reply)
        self.polling = False
        self.reacked = 0.0  # when a resent chunk last made us acknowledge again


class KernelForwards:
    """The forwards of one :class:`~.jupyter_link.KernelLink`; runs on the link's event loop.

    Parameters
    ----------
    link
        The link: ``current`` (its attachment), ``ready``, ``_post_own`` (send a control request,
        get a future for its reply), ``waiters`` and ``_to_proxy`` (deliver to the proxy).
    """

    def __init__(self, link: Any):
        self.link = link
        self.owner = uuid.uuid4().hex[:12]
        self.streams: dict[int, _Stream] = {}
        self.by_key: dict[str, _Stream] = {}
        self.generation = 0
        self.waiting: set[str] = set()
        # The attachment whose resume (or reset) ran: nothing is posted on a newer websocket
        # before its resume, or a ``send`` could overtake the resent ``open`` of its stream (the
        # kernel answers "closed" for a stream it does not know) while the journal is fetched.
        self.attached: Any = None

    # -- from the proxy ----------------------------------------------------------------------
    def open(self, sid: int, port: int) -> dict:
        """The proxy accepted a connection for remote *port*: open it in the kernel."""
        if not 0 < port < 65536:
            self._close_local(sid)
            return {"ok": False, "error": f"invalid port {port}"}
        stream = _Stream(sid, port, f"{self.owner}:{sid}")
        self.streams[sid] = stream
        self.by_key[stream.key] = stream
        stream.pending.append([{"op": "open", "stream": stream.key, "port": port}, []])
        self._pump(stream)
        return {"ok": True}

    def data(self, sid: int, data: bytes) -> None:
        """Bytes from the local client (``b""``: it closed the connection)."""
        stream = self.streams.get(sid)
        if stream is None or stream.closing:
            return
        stream.sent_n += 1
        content = {"op": "send", "stream": stream.key, "n": stream.sent_n}
        stream.pending.append([content, [bytes(data)]])
        if not data:
            stream.closing = True
        self._pump(stream)

    def close_port(self, port: int) -> int:
        """Close every stream to remote *port*, here and in the kernel; returns how many."""
        doomed = [s for s in self.streams.values() if s.port == port]
        for stream in doomed:
            self._forget(stream)
            self._close_local(stream.sid)
        self._post({"op": "close", "port": port, "owner": self.owner}, [], None)
        return len(doomed)

    # -- from the kernel ---------------------------------------------------------------------
    def on_data(self, content: dict, buffers: list) -> None:
        """A ``colabmagic_tcp_data`` message (live, from the journal, or in a resume reply)."""
        stream = self.by_key.get(str(content.get("stream")))
        if stream is None:
            return  # another client's stream, or one already closed
        n = int(content.get("n", 0))
        if n < stream.next_in or n in stream.held:
            if n < stream.next_in and time.monotonic() - stream.reacked > 0.2:
                stream.reacked = time.monotonic()  # a resend: our acknowledgement was lost
                self._ack(stream)
            return  # a duplicate
        eof = bool(content.get("eof"))
        stream.held[n] = None if eof else bytes(buffers[0]) if buffers else b""
        while stream.next_in in stream.held:
            chunk = stream.held.pop(stream.next_in)
            stream.next_in += 1
            if chunk is None:
                self._ack(stream)
                self._forget(stream)
                self._close_local(stream.sid)
                return
            self.link._to_proxy(wire.TCP, [wire.sid_bytes(stream.sid), chunk])
        if stream.next_in - 1 - stream.acked >= WINDOW // 2:
            self._ack(stream)

    # -- the link's life ---------------------------------------------------------------------
    def resume(self, att: Any) -> None:
        """A new websocket (attachment *att*) is up: resend what is unanswered, fetch what we
        lack. Until this runs, nothing is posted on *att*."""
        self.generation += 1
        self.attached = att
        for msg_id in self.waiting:
            self.link.waiters.pop(msg_id, None)
        self.waiting.clear()
        if not self.streams:
            return
        acks = {s.key: s.next_in - 1 for s in self.streams.values()}
        self._post({"op": "resume", "acks": acks}, [], self._on_resume)
        for stream in list(self.streams.values()):
            stream.inflight = 0
            self._pump(stream)

    def reset(self, att: Any) -> None:
        """The kernel behind attachment *att* is new (restarted): its streams are gone, so close
        ours."""
        self.attached = att
        for stream in list(self.streams.values()):
            self._forget(stream)
            self._close_local(stream.sid)

    # -- internals ---------------------------------------------------------------------------
    def _pump(self, stream: _Stream) -> None:
        if stream.backlog > BACKLOG:  # the kernel's peer reads slower than we send: wait
            if not stream.polling:
                stream.polling = True
                asyncio.get_running_loop().call_later(POLL, self._poll, stream)
            return
        while stream.inflight < min(WINDOW, len(stream.pending)):
            item = stream.pending[stream.inflight]
            if item[0]["op"] == "send":
                item[0]["ack"] = stream.next_in - 1
                stream.acked = max(stream.acked, stream.next_in - 1)
            if not self._post(item[0], item[1], self._replied(stream, item)):
                return
            stream.inflight += 1

    def _replied(self, stream: _Stream, item: list):
        generation = self.generation

        def done(reply: dict, _buffers: list) -> None:
            if generation != self.generation or self.streams.get(stream.sid) is not stream:
                return
            if stream.pending and stream.pending[0] is item:
                stream.pending.popleft()
                stream.inflight -= 1
            if not reply.get("ok"):
                log.info("tcp forward to port %d: %s", stream.port, reply.get("error"))
                self._forget(stream)
                self._close_local(stream.sid)
                return
            stream.backlog = int(reply.get("backlog", 0))
            if reply.get("closed") or (stream.closing and not stream.pending):
                self._forget(stream)
                if not stream.closing:
                    self._close_local(stream.sid)
                return
            self._pump(stream)

        return done

    def _poll(self, stream: _Stream) -> None:
        stream.polling = False
        if self.streams.get(stream.sid) is not stream:
            return
        content = {"op": "ack", "stream": stream.key, "ack": stream.next_in - 1}

        def answered(reply: dict, _buffers: list) -> None:
            stream.backlog = int(reply.get("backlog", 0))
            self._pump(stream)

        if not self._post(content, [], answered):
            stream.backlog = 0  # no websocket now: resume() pumps again after the reconnect

    def _on_resume(self, reply: dict, buffers: list) -> None:
        offset = 0
        for entry in reply.get("entries", []):
            if entry.get("gone"):
                stream = self.by_key.get(str(entry.get("stream")))
                if stream is not None and not stream.pending:
                    self._forget(stream)
                    self._close_local(stream.sid)
                continue
            self.on_data(entry, buffers[offset : offset + 1])
            offset += 1

    def _ack(self, stream: _Stream) -> None:
        stream.acked = stream.next_in - 1
        self._post({"op": "ack", "stream": stream.key, "ack": stream.acked}, [], None)

    def _post(self, content: dict, buffers: list, on_reply) -> bool:
        """Send one control request on the current websocket; False when none is usable."""
        link = self.link
        att = link.current
        if att is None or att is not self.attached or att.done is None or att.done.done():
            return False
        if not link.ready:
            return False
        try:
            msg_id, fut = link._post_own(att, "control", REQUEST, content, buffers)
        except Exception:  # noqa: BLE001 - a closed websocket: resume() resends
            return False
        self.waiting.add(msg_id)

        def finished(f) -> None:
            self.waiting.discard(msg_id)
            if on_reply is not None and not f.cancelled() and f.exception() is None:
                _header, reply, bufs = f.result()
                on_reply(reply, bufs)

        fut.add_done_callback(finished)
        return True

    def _forget(self, stream: _Stream) -> None:
        self.streams.pop(stream.sid, None)
        self.by_key.pop(stream.key, None)

    def _close_local(self, sid: int) -> None:
        self.link._to_proxy(wire.TCP, [wire.sid_bytes(sid), b""])
