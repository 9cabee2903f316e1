"""The local proxy: a kernel's five ZeroMQ channels on 127.0.0.1, carried over one resumable pipe.

Any Jupyter client (our :class:`~colabmagic.session.Session`, jupyter_client, JupyterLab through
the provisioner) connects to the proxy's ports with an ordinary connection file. The proxy
forwards each message, unchanged and still signed with the kernel's key, to the remote agent over
a :class:`~colabmagic.wire.FramedStream`, and the agent's messages back to the right client:
replies by the requesting client's ZeroMQ identity (remembered per ``msg_id``), IOPub to every
subscriber. When the pipe breaks, the proxy keeps serving its local sockets, reconnects with
backoff through the transport's ``open_pipe`` and resumes from the last acknowledged sequence
number, so clients see a delay and never a lost message.

One thread runs the event loop; other threads talk to it through a queue and a wake-up pipe,
except :meth:`Proxy.publish`, which an in-process link calls from its own thread (jupyter_lane).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import zmq

from colabmagic import inproc, wire
from colabmagic.errors import ConnectError

log = logging.getLogger("colabmagic.proxy")

_ROUTE_LIMIT = 20000
_ACK_EVERY = 0.1  # seconds; the agent keeps what is unacknowledged, so a late ACK costs nothing
_ACK_BYTES = 16 << 20  # ...but its memory: a bulk stream is acknowledged every 16 MiB too
_HEADER, _PARENT = 2, 3  # positions of the header and parent header after the delimiter


class Pipe(Protocol):
    """A bidirectional byte stream to an agent (a bridge subprocess, an SSH channel...)."""

    read_fd: int
    write_fd: int
    description: str

    def close(self) -> None: ...

    def failure(self) -> tuple[bool, str]:
        """After the stream ended: ``(permanent, reason)``; permanent means "do not retry"."""
        ...


class PermanentLinkError(ConnectError):
    """Raised by ``open_pipe`` when reconnecting cannot help (the agent is gone)."""


class Proxy:
    """Serve a remote kernel's channels locally; see the module docstring.

    Parameters
    ----------
    open_pipe
        Callable returning a fresh :class:`Pipe` to the agent; called again after each drop.
        Raises :class:`PermanentLinkError` when the agent no longer exists.
    name
        Used in log messages and thread names.
    reconnect_timeout
        Seconds to keep trying after a drop before giving up (the kernel keeps running).
    ports
        Local ports to serve on (``shell_port``... as in a connection file), e.g. to keep a
        stored connection file valid when re-attaching; missing ones are chosen at random.
    """

    def __init__(
        self,
        open_pipe: Callable[[], Pipe],
        *,
        name: str = "kernel",
        reconnect_timeout: float = 300.0,
        on_event: Callable[[dict], None] | None = None,
        ports: dict[str, int] | None = None,
    ):
        self.open_pipe = open_pipe
        self.name = name
        self.reconnect_timeout = reconnect_timeout
        self.on_event = on_event
        self.state = "connecting"  # connecting | up | link-down | dead | closed
        self.reconnect_attempt = 0
        self.dead_reason: str | None = None
        self.kernel_exit: dict | None = None
        self.agent_info: dict = {}
        self.connection_info: dict = {}
        self.connection_file: str | None = None
        self.lost_messages = 0
        self.reconnects = 0
        self.context = zmq.Context()  # an in-process client shares it: colabmagic/inproc.py
        self._cmds: queue.Queue = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._welcomed = threading.Event()
        self._stopped = threading.Event()
        self._closing = False
        self._calls: dict[int, dict] = {}
        self._call_ids = itertools.count(1)
        self._route: collections.OrderedDict = collections.OrderedDict()
        self._uplog = wire.OutLog(max_bytes=1 << 40)
        self._last_down = 0
        self._acked_down, self._ack_due, self._unacked = 0, 0.0, 0
        self._agent_last_up = 0
        self.inproc_name = os.urandom(8).hex()  # new per proxy, so it numbers from 1 (HELLO)
        self._pipe: Pipe | None = None
        self._stream: wire.FramedStream | None = None
        self._hello_pending = False
        self._thread: threading.Thread | None = None
        self._tmpdir = tempfile.mkdtemp(prefix="colabmagic-")
        self._kernel_listeners: list[Callable[[dict], None]] = []
        self.tap: Callable[[list], bool] | None = None
        self._pub_lock = threading.Lock()  # the IOPub socket: one thread at a time (publish)
        self._tcp = wire.TcpStreams()
        self._listeners: dict = {}  # listening socket -> remote port
        self._sids = itertools.count(1)
        self._bind(ports or {})

    # -- setup -------------------------------------------------------------------------------
    def _bind(self, wanted: dict[str, int]) -> None:
        ctx = self.context
        self._shell = ctx.socket(zmq.ROUTER)
        self._control = ctx.socket(zmq.ROUTER)
        self._stdin = ctx.socket(zmq.ROUTER)
        self._iopub = ctx.socket(zmq.PUB)
        self._hb = ctx.socket(zmq.REP)
        self._iopub.setsockopt(zmq.SNDHWM, 0)
        self._sockets = (self._shell, self._control, self._stdin, self._iopub, self._hb)
        ports = {}
        for name, sock in zip(
            ("shell", "control", "stdin", "iopub", "hb"), self._sockets, strict=True
        ):
            sock.linger = 0
            if sock.type == zmq.ROUTER:
                sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
            key = f"{name}_port"
            try:
                if wanted.get(key):
                    sock.bind(f"tcp://127.0.0.1:{int(wanted[key])}")
                    ports[key] = int(wanted[key])
                else:
                    ports[key] = sock.bind_to_random_port("tcp://127.0.0.1")
                sock.bind(inproc.url(self.inproc_name, ports[key]))
            except zmq.ZMQError:
                ctx.destroy(linger=0)
                os.close(self._wake_r)
                os.close(self._wake_w)
                shutil.rmtree(self._tmpdir, ignore_errors=True)
                raise
        self._ports = ports

    def start(self, timeout: float = 60.0) -> dict:
        """Open the first pipe, handshake, and start serving; returns the connection info."""
        pipe = self.open_pipe()
        self._thread = threading.Thread(
            target=self._run, args=(pipe,), name=f"colabmagic-proxy-{self.name}", daemon=True
        )
        self._thread.start()
        if not self._welcomed.wait(timeout):
            self.close()
            msg = (
                f"the agent for {self.name} did not answer within {timeout:g}s; the host may be "
                "overloaded: retry, or give it longer with --connect-timeout"
            )
            raise ConnectError(msg)
        if self.state == "dead" and not self.connection_info:
            reason = self.dead_reason
            self.close()
            msg = f"could not connect to {self.name}: {reason}"
            raise ConnectError(msg)
        return self.connection_info

    def _write_connection_file(self, key: str, scheme: str) -> None:
        from jupyter_client.connect import write_connection_file

        info = dict(self._ports, ip="127.0.0.1", transport="tcp", signature_scheme=scheme)
        path = os.path.join(self._tmpdir, "kernel.json")
        write_connection_file(path, key=key.encode(), **info)
        os.chmod(path, 0o600)
        self.connection_file = path
        info["key"] = key
        self.connection_info = info

    # -- thread-safe API ---------------------------------------------------------------------
    def _post(self, *cmd: Any) -> None:
        self._cmds.put(cmd)
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def call(self, op: str, timeout: float = 30.0, **kwargs: Any) -> dict:
        """Send an operation to the agent (interrupt, restart, info...) and wait for its reply."""
        if self.state in ("dead", "closed") and op != "info" and self.dead_reason:
            if self.kernel_exit is None or op not in ("restart", "shutdown"):
                msg = f"{self.name}: {self.dead_reason}"
                raise ConnectError(msg)
        call_id = next(self._call_ids)
        slot: dict = {"event": threading.Event()}
        self._calls[call_id] = slot
        self._post("agent", {"op": op, "id": call_id, **kwargs})
        if not slot["event"].wait(timeout):
            self._calls.pop(call_id, None)
            msg = (
                f"{self.name}: the agent did not answer {op!r} within {timeout:g}s; "
                "check the link with %colab_status and retry"
            )
            raise ConnectError(msg)
        return slot["reply"]

    def publish(self, parts: list) -> None:
        """Publish a kernel's IOPub message (signed frames) to every subscriber; any thread.

        Unless :attr:`tap` takes it. An in-process link calls it from its own thread, so a
        message reaches the subscribers without waking this proxy's thread.
        """
        tap = self.tap
        if tap is None or not tap(parts):
            with self._pub_lock:
                if not self._stopped.is_set():
                    self._iopub.send_multipart(parts, copy=wire.small(parts))

    def send_direct(self, channel: int, parts: list) -> None:
        """Send a signed message's frames upstream from this process, without a local socket.

        The in-process :class:`~colabmagic.session.Session` uses it for bulk transfers: the
        frames go straight to the wire (no copy through a loopback ZeroMQ hop). Replies come
        back on IOPub as usual (or through :attr:`tap`).
        """
        self._post("up", channel, parts)

    def forward(self, remote_port: int, local_port: int = 0) -> int:
        """Serve 127.0.0.1:*local_port* here, tunnelled to 127.0.0.1:*remote_port* on the host.

        Connections ride the link (no extra SSH tunnel) and survive a drop like any message.
        Returns the local port (chosen when 0).
        """
        listener = wire.listen(local_port)
        done = threading.Event()
        self._post("listen", listener, int(remote_port), done)
        done.wait(5)
        return listener.getsockname()[1]

    def close_forward(self, local_port: int) -> bool:
        """Stop listening on *local_port*; True when there was such a forward."""
        done = threading.Event()
        box: dict = {}
        self._post("unlisten", int(local_port), done, box)
        done.wait(5)
        return bool(box.get("found"))

    @property
    def forwards(self) -> dict[int, int]:
        """``{local port: remote port}`` of the open forwards."""
        return {sock.getsockname()[1]: port for sock, port in list(self._listeners.items())}

    def add_kernel_listener(self, fn: Callable[[dict], None]) -> None:
        """Call *fn(event)* (from the proxy thread) on kernel_died / kernel_ready / shutdown."""
        self._kernel_listeners.append(fn)

    def drop_link(self) -> None:
        """Close the current pipe as if the network dropped (tests, and ``--reconnect``)."""
        self._post("drop")

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving and close the pipe; does not stop the remote kernel."""
        if self._closing:
            return
        self._closing = True
        self._post("close")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        for listener in list(self._listeners):
            listener.close()
        self._listeners.clear()
        self._tcp.close_all()
        with self._pub_lock:  # no publish() in flight, none after
            self._stopped.set()
            self.context.destroy(linger=0)  # ours and an in-process client's sockets (inproc.py)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self._tmpdir, ignore_errors=True)
        if self.state != "dead":
            self.state = "closed"

    # -- the loop ----------------------------------------------------------------------------
    def _attach(self, pipe: Pipe) -> None:
        self._pipe = pipe
        self._stream = wire.FramedStream(pipe.read_fd, pipe.write_fd)
        hello = {"resume_from": self._last_down, "version": wire.PROTOCOL_VERSION}
        self._stream.send_json(wire.HELLO, 0, dict(hello, proxy=self.inproc_name))
        self._hello_pending = True

    def _detach(self) -> Pipe | None:
        """Forget the current pipe and return it (the caller closes it)."""
        pipe, self._pipe, self._stream = self._pipe, None, None
        self._hello_pending = False
        return pipe

    def _link_lost(self, why: str) -> None:
        pipe = self._detach()
        permanent, reason = pipe.failure() if pipe is not None else (False, why)
        _close_pipe(pipe)
        if self._closing or self.state == "closed":
            return
        if self.state == "dead" and self.kernel_exit is None:
            return  # the agent itself is gone; nothing to reconnect to
        if permanent:
            self._die(reason or why)
            return
        log.info("%s: link lost (%s); reconnecting", self.name, reason or why)
        self.state = "link-down"
        threading.Thread(
            target=self._reconnect, name=f"colabmagic-reconnect-{self.name}", daemon=True
        ).start()

    def _die(self, reason: str) -> None:
        self.state = "dead"
        self.dead_reason = reason
        self._welcomed.set()
        for slot in list(self._calls.values()):
            slot["reply"] = {"ok": False, "error": reason}
            slot["event"].set()
        self._calls.clear()

    def _reconnect(self) -> None:
        start = time.monotonic()
        backoff = 0.05
        while not self._closing:
            self.reconnect_attempt += 1
            try:
                pipe = self.open_pipe()
            except PermanentLinkError as exc:
                self._post("dead", str(exc))
                return
            except (OSError, ConnectError) as exc:
                log.info(
                    "%s: reconnect attempt %d failed: %s", self.name, self.reconnect_attempt, exc
                )
            else:
                self._post("pipe", pipe)
                return
            if time.monotonic() - start > self.reconnect_timeout:
                self._post(
                    "dead",
                    f"the link has been down for {self.reconnect_timeout:g}s and reconnecting "
                    "failed; the remote kernel keeps running: reconnect with "
                    f"%colab_connect ... --attach {self.agent_info.get('id', 'ID')}",
                )
                return
            self._stopped.wait(backoff)
            backoff = min(backoff * 2, 5.0)

    def _run(self, pipe: Pipe) -> None:
        try:
            self._attach(pipe)
            self._loop()
        except Exception as exc:  # a bug must not leave clients hanging silently
            log.exception("%s: proxy loop crashed", self.name)
            self._die(f"internal error in the proxy: {exc!r}")
        finally:
            _close_pipe(self._detach())

    def _loop(self) -> None:
        local = {
            self._shell: wire.SHELL,
            self._control: wire.CONTROL,
            self._stdin: wire.STDIN,
        }
        while not self._closing:
            poller = zmq.Poller()
            for sock in local:
                poller.register(sock, zmq.POLLIN)
            poller.register(self._hb, zmq.POLLIN)
            poller.register(self._wake_r, zmq.POLLIN)
            for listener in self._listeners:
                poller.register(listener, zmq.POLLIN)
            self._tcp.register(poller, zmq.POLLIN, zmq.POLLOUT)
            stream = self._stream
            if stream is not None:
                poller.register(stream.read_fd, zmq.POLLIN)
                if stream.wants_write():
                    poller.register(stream.write_fd, zmq.POLLOUT)
            events = dict(poller.poll(1000 if self._last_down == self._acked_down else 20))
            if self._wake_r in events:
                self._drain_commands()
                if self._closing:
                    return
            for sock, channel in local.items():
                if sock in events:
                    for _ in range(256):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._up(sock, channel, frames)
            for listener, port in list(self._listeners.items()):
                if listener.fileno() in events:
                    self._accept(listener, port)
            for sid, data in self._tcp.handle(events, zmq.POLLIN, zmq.POLLOUT):
                self._send_up(wire.TCP, [wire.sid_bytes(sid), data])
            if self._hb in events:
                # Heartbeats are answered here: liveness of the remote kernel is reported by
                # the agent (kernel_died), which knows better than a ping through a slow link.
                self._hb.send_multipart(self._hb.recv_multipart())
            stream = self._stream
            if stream is not None and stream.read_fd in events:
                try:
                    self._down(stream.read_frames())
                except (wire.StreamClosed, wire.ProtocolError) as exc:
                    self._link_lost(str(exc))
                    continue
                if stream.closed:  # it ended right after the frames just handled
                    self._link_lost("end of stream")
                    continue
            stream = self._stream
            if stream is not None:
                try:  # a stream that closed under us is a lost link, whatever we were sending
                    now = time.monotonic()  # ACKs at most every _ACK_EVERY: fewer turns
                    due = now >= self._ack_due or self._unacked >= _ACK_BYTES
                    if self._last_down > self._acked_down and due and not self._hello_pending:
                        stream.send_frame(wire.ACK, self._last_down, [])
                        self._acked_down, self._ack_due = self._last_down, now + _ACK_EVERY
                        self._unacked = 0
                    stream.flush()
                except wire.StreamClosed as exc:
                    self._link_lost(str(exc))

    def _drain_commands(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            kind = cmd[0]
            if kind == "close":
                self._closing = True
                return
            if kind == "pipe":
                if self._closing:
                    cmd[1].close()
                    continue
                self.reconnects += 1
                self._attach(cmd[1])
            elif kind == "dead":
                self._die(cmd[1])
            elif kind == "drop":
                if self._stream is not None:
                    self._link_lost("link dropped on request")
            elif kind == "listen":
                self._listeners[cmd[1]] = cmd[2]
                cmd[3].set()
            elif kind == "unlisten":
                for listener in list(self._listeners):
                    if listener.getsockname()[1] == cmd[1]:
                        del self._listeners[listener]
                        listener.close()
                        cmd[3]["found"] = True
                cmd[2].set()
            elif kind == "up":
                self._send_up(cmd[1], cmd[2])
            elif kind == "agent":
                body = wire.json_body(cmd[1])
                self._send_up(wire.AGENT, [body])

    def _accept(self, listener, remote_port: int) -> None:
        import socket

        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sid = next(self._sids)
        self._tcp.add(sid, conn)
        # The open travels first on the same sequenced stream, so the agent connects before
        # any data for the stream arrives.
        self._send_up(
            wire.AGENT,
            [wire.json_body({"op": "tcp_open", "stream": sid, "port": remote_port, "id": 0})],
        )

    def _send_up(self, channel: int, parts) -> None:
        seq = self._uplog.append(channel, parts)
        if self._stream is not None and not self._hello_pending:
            self._stream.send_msg(seq, channel, parts)

    def _up(self, sock, channel: int, frames) -> None:
        ident = frames[0].bytes
        parts = [f.buffer for f in frames[1:]]
        msg_id = _msg_id(parts, _HEADER)
        if msg_id is None:
            log.warning("%s: dropping a malformed message from a client", self.name)
            return
        if channel != wire.STDIN:
            self._route[msg_id] = ident
            if len(self._route) > _ROUTE_LIMIT:
                self._route.popitem(last=False)
        self._send_up(channel, parts)

    def _route_back(self, parts, *, pop: bool) -> bytes | None:
        return (self._route.pop if pop else self._route.get)(_msg_id(parts, _PARENT), None)

    def _down(self, frames) -> None:
        for kind, seq, body in frames:
            if kind == wire.WELCOME:
                self._on_welcome(json.loads(bytes(body)))
            elif kind == wire.ACK:
                self._uplog.ack(seq)
                self._agent_last_up = max(self._agent_last_up, seq)
            elif kind == wire.MSG:
                if seq <= self._last_down:
                    continue
                self._last_down, self._unacked = seq, self._unacked + len(body)
                channel, parts = wire.decode_msg(body)
                self._deliver(channel, parts)

    def _on_welcome(self, welcome: dict) -> None:
        self._hello_pending = False
        known = self.agent_info.get("id")
        if known is not None and welcome.get("id") != known:
            self._die(f"a different kernel answers ({welcome.get('id')}, expected {known})")
            return
        self.agent_info = dict(welcome.get("info") or {}, id=welcome.get("id"))
        if welcome.get("gap"):
            self.lost_messages = int(welcome["gap"])
        conn = welcome["connection"]
        if not self.connection_info:
            self._write_connection_file(conn["key"], conn.get("signature_scheme", "hmac-sha256"))
        last_up = int(welcome.get("last_up", 0))
        self._uplog.ack(last_up)
        for seq, channel, parts in self._uplog.after(last_up):
            self._stream.send_msg(seq, channel, parts)
        info = self.agent_info
        if info.get("state") == "dead":
            self.state = "dead"
            self.kernel_exit = info.get("exit")
            self.dead_reason = _death_message(self.kernel_exit)
        else:
            self.state = "up"
        self.reconnect_attempt = 0
        self._welcomed.set()

    def _deliver(self, channel: int, parts) -> None:
        if channel == wire.IOPUB:
            self.publish(parts)  # or a transfer's tap takes it, for the in-process session
        elif channel in (wire.SHELL, wire.CONTROL):
            ident = self._route_back(parts, pop=True)
            if ident is not None:
                sock = self._shell if channel == wire.SHELL else self._control
                sock.send_multipart([ident, *parts], copy=wire.small(parts))
        elif channel == wire.STDIN:
            ident = self._route_back(parts, pop=False)
            if ident is not None:
                self._stdin.send_multipart([ident, *parts])
        elif channel == wire.TCP:
            self._tcp.deliver(wire.sid_int(parts[0]), parts[1])
        elif channel == wire.AGENT:
            self._on_agent_event(json.loads(bytes(parts[0])))

    def _on_agent_event(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "reply":
            slot = self._calls.pop(event.get("reply_to"), None)
            if slot is not None:
                slot["reply"] = event
                slot["event"].set()
            return
        if kind == "kernel_died":
            self.kernel_exit = {k: event.get(k) for k in ("exit_code", "signal", "pid")}
            self.state = "dead"
            self.dead_reason = _death_message(self.kernel_exit)
        elif kind == "kernel_ready":
            self.kernel_exit = None
            self.dead_reason = None
            self.state = "up"
            self.agent_info["kernel_pid"] = event.get("pid")
        elif kind == "shutdown":
            self.state = "closed"
            self.dead_reason = "the remote kernel was shut down"
        for fn in self._kernel_listeners:
            try:
                fn(event)
            except Exception:  # a listener bug must not kill the proxy
                log.exception("kernel listener failed")
        if self.on_event is not None:
            self.on_event(event)


def _close_pipe(pipe: Pipe | None) -> None:
    with contextlib.suppress(OSError):
        pipe is not None and pipe.close()


def _msg_id(parts, which: int) -> str | None:
    """The ``msg_id`` of a client message's header (``_HEADER``) or parent header (``_PARENT``)."""
    i = wire.delim_index(parts, 4)
    return None if i is None else wire.header_msg_id(parts, i + which)


def _death_message(exit_info: dict | None) -> str:
    if not exit_info:
        return "the remote kernel died"
    if exit_info.get("signal"):
        return f"the remote kernel died (killed by {exit_info['signal']})"
    return f"the remote kernel died (exit code {exit_info.get('exit_code')})"
