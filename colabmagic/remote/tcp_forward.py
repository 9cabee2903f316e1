"""The kernel-side end of TCP forwards through a Jupyter server (no agent, no SSH there).

A Jupyter server forwards no TCP port, so ``Proxy.forward`` (``%colab_debug --vscode``'s debugpy,
TensorBoard, a dashboard) is carried through the kernel itself. This module runs inside the
ipykernel (executed from source by the link's bootstrap, like the journal; standard library and
ipykernel only) and opens 127.0.0.1:PORT *there*. Each stream is keyed by ``"OWNER:SID"`` (one
owner per client link, so two clients' stream ids never collide).

**Client -> kernel** bytes arrive as requests on the **control** channel (its own thread in
ipykernel: it answers while the main thread is stopped at a breakpoint)::

    colabmagic_tcp_request {"op": "open", "stream": k, "port": p}           -> {"ok": ...}
    colabmagic_tcp_request {"op": "send", "stream": k, "n": i, "ack": a} + [bytes]  (b"" = close)
    colabmagic_tcp_request {"op": "ack", "stream": k, "ack": a}
    colabmagic_tcp_request {"op": "resume", "acks": {k: a}} -> reply: the unacknowledged chunks
    colabmagic_tcp_request {"op": "close", "port": p, "owner": o}   (every stream to that port)

``send`` chunks are numbered per stream from 1; a duplicate (a request resent after a websocket
drop) is answered and dropped, one ahead of a gap is held until the gap fills. A writer thread per
stream writes them to the socket: the control thread never blocks on a slow peer (it must keep
answering acks, or a peer that echoes would deadlock), and replies report the bytes still queued
(``backlog``) so that the client stops sending above a bound. ``open`` is idempotent, and a stream
once closed is never reopened by a resent ``open``.

**Kernel -> client** bytes are read by one thread per stream and published on IOPub as
``colabmagic_tcp_data {"stream": k, "n": i, "eof": bool}`` + [bytes] (journaled like every IOPub
message). Each chunk is kept until the client acknowledges it (``ack``, also carried by every
``send``): at most :data:`WINDOW` chunks are unacknowledged, which is the flow control, and after a
websocket drop ``resume`` hands back every chunk the client lacks, so no byte is lost whether or not
the journal is installed. A chunk IOPub loses with no drop (the server's IOPub rate limit, a full
ZeroMQ queue) is published again when nothing was acknowledged for :data:`RTO` seconds (then after
twice as long, up to 30 s); the client drops what it has and acknowledges again. The stream
threads are marked as debugger threads (``pydev_do_not_trace``), so a debugger that suspends every
thread at a breakpoint does not suspend the relay it talks through.
"""

import contextlib
import select
import socket
import threading
import time
from collections import deque

REQUEST = "colabmagic_tcp_request"
REPLY = "colabmagic_tcp_reply"
DATA = "colabmagic_tcp_data"
CHUNK = 64 * 1024
WINDOW = 16
RTO = 1.0  # seconds without an acknowledgement before the unacknowledged chunks are resent
_CLOSED_LIMIT = 4096


class Stream:
    """One forwarded connection to 127.0.0.1:port in this process."""

    def __init__(self, forwarder, key, port, sock):
        self.forwarder = forwarder
        self.key = key
        self.port = port
        self.sock = sock
        self.cond = threading.Condition()
        self.published = 0  # chunks read from the socket and published
        self.unacked = deque()  # (n, data) not yet acknowledged by the client
        self.expect = 1  # the next client chunk to write
        self.held = {}  # client chunks that arrived ahead of a gap
        self.outq = deque()  # client chunks in order, for the writer thread (None = close)
        self.backlog = 0  # bytes in outq
        self.closed = False
        self.eof = False  # our eof is published (kept until acknowledged)
        self.progress = time.monotonic()  # the last publish or acknowledgement
        self.rto = RTO
        self.threads = [
            threading.Thread(target=self._read, name=f"colabmagic-tcp-{key}", daemon=True),
            threading.Thread(target=self._write, name=f"colabmagic-tcp-{key}-w", daemon=True),
        ]
        for thread in self.threads:
            thread.pydev_do_not_trace = True
            thread.is_pydev_daemon_thread = True

    def _read(self):
        while True:
            with self.cond:
                while (len(self.unacked) >= WINDOW or self.eof) and not self.closed:
                    if not self.cond.wait(RTO):
                        break  # nothing acknowledged for a while: maybe retransmit
                if self.closed:
                    return
                blocked = len(self.unacked) >= WINDOW or self.eof
            try:
                readable = not blocked and select.select([self.sock], [], [], RTO)[0]
            except (OSError, ValueError):
                readable = True  # recv reports what happened to the socket
            if not readable:
                self._retransmit()
                continue
            try:
                data = self.sock.recv(CHUNK)
            except OSError:
                data = b""
            with self.cond:
                if self.closed:
                    return
                self.published += 1
                n = self.published
                self.unacked.append((n, data))
                self.eof = not data
                self.progress = time.monotonic()
                self.forwarder.peak = max(self.forwarder.peak, len(self.unacked))
            self.forwarder.publish(self.key, n, data)

    def _retransmit(self):
        """Publish the unacknowledged chunks again when none was acknowledged for RTO seconds.

        IOPub can lose a message with no websocket drop (the server's IOPub rate limit, a full
        ZeroMQ queue); without this the client would wait for it forever.
        """
        with self.cond:
            stale = bool(self.unacked) and time.monotonic() - self.progress >= self.rto
            kept = list(self.unacked) if stale else []
            if stale:  # again after twice as long (up to 30 s) while nobody acknowledges
                self.progress = time.monotonic()
                self.rto = min(2 * self.rto, 30.0)
                self.forwarder.retransmits += len(kept)
        for n, data in kept:
            self.forwarder.publish(self.key, n, data)

    def ack(self, upto):
        with self.cond:
            if self.unacked and self.unacked[0][0] <= upto:
                self.progress = time.monotonic()
                self.rto = RTO
            while self.unacked and self.unacked[0][0] <= upto:
                self.unacked.popleft()
            self.cond.notify_all()

    def write(self, n, data):
        """Queue client chunk *n* in order (never blocks: the control thread must keep serving
        acks, or an echoing peer would deadlock); False once the client's close is queued."""
        with self.cond:
            if n >= self.expect:
                self.held[n] = data
            while self.expect in self.held:
                chunk = self.held.pop(self.expect)
                self.expect += 1
                self.outq.append(chunk or None)
                self.backlog += len(chunk)
                self.forwarder.peak_backlog = max(self.forwarder.peak_backlog, self.backlog)
                self.cond.notify_all()
            return not (self.outq and self.outq[-1] is None)

    def _write(self):
        while True:
            with self.cond:
                while not self.outq and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                chunk = self.outq.popleft()
            if chunk is None:  # the client closed: after its last bytes, so do we
                self.forwarder._drop(self.key)
                return
            try:
                self.sock.sendall(chunk)
            except OSError:  # the peer is gone: the reader sees it and publishes our eof
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)
                return
            with self.cond:
                self.backlog -= len(chunk)

    def close(self):
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class Forwarder:
    """Every forwarded stream of one kernel; answers the control requests."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.streams = {}
        self.closed = deque(maxlen=_CLOSED_LIMIT)
        self.lock = threading.Lock()
        self.peak = 0  # the most unacknowledged chunks any stream had (flow control, for tests)
        self.peak_backlog = 0  # the most bytes any stream had queued for its socket
        self.retransmits = 0  # chunks published again because no acknowledgement came

    def publish(self, key, n, data):
        content = {"stream": key, "n": n, "eof": not data}
        self.kernel.session.send(self.kernel.iopub_socket, DATA, content, buffers=[data])

    def _open(self, key, port):
        with self.lock:
            if key in self.streams:
                return {"ok": True}
            if key in self.closed:
                return {"ok": False, "error": "the stream is closed"}
        if not 0 < port < 65536:
            return {"ok": False, "error": f"invalid port {port}"}
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(5)
        try:
            sock.connect(("127.0.0.1", port))
        except OSError as exc:
            sock.close()
            with self.lock:
                self.closed.append(key)
            error = f"nothing listens on 127.0.0.1:{port} in the kernel ({exc})"
            return {"ok": False, "error": error}
        sock.settimeout(None)  # an idle connection (a debugger waiting) stays open
        stream = Stream(self, key, port, sock)
        with self.lock:
            self.streams[key] = stream
        for thread in stream.threads:
            thread.start()
        return {"ok": True}

    def _drop(self, key):
        with self.lock:
            stream = self.streams.pop(key, None)
            if stream is not None:
                self.closed.append(key)
        if stream is not None:
            stream.close()

    def _send(self, key, req, buffers):
        stream = self.streams.get(key)
        if stream is None:
            return {"ok": True, "closed": True}
        if "ack" in req:
            self._ack(stream, int(req["ack"]))
        data = bytes(buffers[0]) if buffers else b""
        if not stream.write(int(req["n"]), data):  # the writer closes after the last bytes
            return {"ok": True, "closed": True}
        return {"ok": True, "backlog": stream.backlog}

    def _ack(self, stream, upto):
        stream.ack(upto)
        with stream.cond:
            eof = stream.eof and not stream.unacked
        if eof:  # the client has our eof: the stream is over on both sides
            self._drop(stream.key)

    def _resume(self, acks):
        entries, buffers = [], []
        for key, upto in acks.items():
            stream = self.streams.get(key)
            if stream is None:
                entries.append({"stream": key, "gone": True})
                continue
            stream.ack(int(upto))
            with stream.cond:
                kept = list(stream.unacked)
            for n, data in kept:
                entries.append({"stream": key, "n": n, "eof": not data})
                buffers.append(data)
        return {"ok": True, "entries": entries}, buffers

    def _close_port(self, port, owner):
        keys = [
            k for k, s in list(self.streams.items()) if s.port == port and k.startswith(owner + ":")
        ]
        for key in keys:
            self._drop(key)
        return {"ok": True, "closed": keys}

    def answer(self, stream, ident, parent):
        """The control handler: one request, one reply (errors are replies too)."""
        req = parent.get("content") or {}
        buffers = parent.get("buffers") or []
        reply_buffers = []
        op = req.get("op")
        try:
            if op == "open":
                content = self._open(str(req["stream"]), int(req["port"]))
            elif op == "send":
                content = self._send(str(req["stream"]), req, buffers)
            elif op == "ack":
                target = self.streams.get(str(req["stream"]))
                if target is not None:
                    self._ack(target, int(req["ack"]))
                content = {"ok": True, "backlog": target.backlog if target is not None else 0}
            elif op == "resume":
                content, reply_buffers = self._resume(req.get("acks") or {})
            elif op == "close":
                content = self._close_port(int(req["port"]), str(req.get("owner", "")))
            else:
                content = {"ok": False, "error": f"unknown operation {op!r}"}
        except Exception as exc:  # noqa: BLE001 - the client gets the reason in the reply
            content = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        self.kernel.session.send(
            stream, REPLY, content, parent, ident=ident, buffers=reply_buffers or None
        )

    def state(self):
        """Open streams, live reader threads and the in-flight peak (for tests and diagnosis)."""
        threads = [t.name for t in threading.enumerate() if t.name.startswith("colabmagic-tcp-")]
        return {
            "streams": sorted(self.streams),
            "threads": sorted(threads),
            "peak": self.peak,
            "peak_backlog": self.peak_backlog,
            "retransmits": self.retransmits,
        }


def install(kernel=None):
    """Answer TCP-forward requests on *kernel*'s control channel; idempotent."""
    if kernel is None:
        from IPython import get_ipython

        kernel = get_ipython().kernel
    forwarder = getattr(kernel, "_colabmagic_tcp_forward", None)
    if forwarder is not None:
        return forwarder
    forwarder = Forwarder(kernel)
    kernel.control_handlers[REQUEST] = forwarder.answer
    kernel._colabmagic_tcp_forward = forwarder
    return forwarder
