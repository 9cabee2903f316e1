"""The framed, sequenced, resumable byte stream between the local proxy and the remote agent.

Runs on both sides (the remote side has Python >= 3.9 and no colabmagic install, so this module
uses the standard library only).

Frames
------
Every frame is a 17-byte header ``!BQQ`` -- *kind*, *seq*, *length* -- and *length* body bytes.

``HELLO``   proxy -> agent, JSON body ``{"resume_from": n, "version": 1}``: the last downstream
            sequence number the proxy has processed. The agent answers ``WELCOME``.
``WELCOME`` agent -> proxy, JSON body: the kernel's connection info (key included -- this stream
            is a private pipe, never a log), the last upstream sequence number the agent has
            received, the agent's identity and state.
``MSG``     either way, *seq* > 0: one ZeroMQ multipart message on one channel. Body:
            ``!BI`` (channel, number of parts), ``!Q`` per part length, then the parts.
``ACK``     either way: "I have processed everything up to and including *seq*"; the sender may
            forget those messages.

Both sides keep what they sent and has not been acknowledged; after a reconnect the proxy sends
``HELLO`` with the last sequence number it processed and the agent resends everything after it,
while the proxy resends every upstream message after the agent's last received one. Receivers
drop sequence numbers they have already seen, so each message is delivered exactly once, in order.

:class:`FramedStream` does non-blocking framing over a pair of file descriptors: an event loop
registers :meth:`FramedStream.read_fd` for reading and, while :meth:`FramedStream.wants_write`,
:meth:`FramedStream.write_fd` for writing. Writes never block, so two peers that both send large
messages at once cannot deadlock.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections import deque

HEADER = struct.Struct("!BQQ")
MSG_HEAD = struct.Struct("!BI")
PART_LEN = struct.Struct("!Q")

HELLO = 1
WELCOME = 2
MSG = 3
ACK = 4

# Channels carried in MSG frames. TCP carries forwarded TCP streams: parts = [stream id
# (8 bytes), data]; b"" = closed.
SHELL, CONTROL, STDIN, IOPUB, AGENT, TCP = 0, 1, 2, 3, 4, 5
CHANNEL_NAMES = {
    SHELL: "shell",
    CONTROL: "control",
    STDIN: "stdin",
    IOPUB: "iopub",
    AGENT: "agent",
    TCP: "tcp",
}

PROTOCOL_VERSION = 1
DELIM = b"<IDS|MSG>"  # separates ZeroMQ routing identities from a Jupyter message's frames
_READ_CHUNK = 1 << 20
_MAX_FRAME = 1 << 40  # 1 TiB: anything larger is a corrupt header, not a message


class ProtocolError(Exception):
    """The byte stream does not follow the protocol (corrupt or foreign data)."""


class StreamClosed(Exception):
    """The other end closed the stream or it broke."""


def encode_msg(channel: int, parts) -> list:
    """The body pieces of a MSG frame for *parts* (bytes-like), without copying the parts."""
    views = [memoryview(p).cast("B") if not isinstance(p, bytes) else p for p in parts]
    head = bytearray(MSG_HEAD.pack(channel, len(views)))
    for v in views:
        head += PART_LEN.pack(len(v))
    return [bytes(head), *views]


def decode_msg(body) -> tuple:
    """``(channel, parts)`` of a MSG body; the parts are memoryviews into *body* (no copy)."""
    view = memoryview(body)
    try:
        channel, nparts = MSG_HEAD.unpack_from(view, 0)
    except struct.error as exc:
        msg = "truncated message header"
        raise ProtocolError(msg) from exc
    offset = MSG_HEAD.size
    lengths = []
    for _ in range(nparts):
        (n,) = PART_LEN.unpack_from(view, offset)
        lengths.append(n)
        offset += PART_LEN.size
    parts = []
    for n in lengths:
        parts.append(view[offset : offset + n])
        offset += n
    if offset != len(view):
        msg = "message body length does not match its parts"
        raise ProtocolError(msg)
    return channel, parts


def delim_index(parts, limit: int):
    """Index of the ``<IDS|MSG>`` delimiter among the first *limit* parts of a Jupyter message.

    None when it is not there (a malformed message).
    """
    return next((n for n, p in enumerate(parts[:limit]) if p == DELIM), None)


def header_msg_id(parts, index: int):
    """The ``msg_id`` of the JSON header (or parent header) at ``parts[index]``.

    None when that part is missing, is not a JSON object, or has no ``msg_id``.
    """
    try:
        header = json.loads(bytes(parts[index]))
    except (IndexError, ValueError):
        return None
    return header.get("msg_id") if isinstance(header, dict) else None


_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_BIG = 8 << 20


def alloc(length: int):
    """A writable buffer for a frame body; large ones come pre-faulted (MAP_POPULATE).

    Touching fresh memory page by page costs about as much as the copy itself on small VMs
    (``bytearray(n)`` zero-fills, then faults every page in one by one); pre-faulting in one
    system call halves that for a whole pushed or pulled value. Chunk-sized frames (4 MiB) stay
    bytearrays: they are freed as fast as they come, and malloc hands the same, already faulted,
    heap memory back (6x cheaper than a fresh mapping each time). Arrays unpickled into such a
    buffer keep it alive, writable, as their base.
    """
    if length < _BIG or not _POPULATE:
        return bytearray(length)
    try:
        return mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE)
    except OSError:
        return bytearray(length)


def small(parts) -> bool:
    """True when ZeroMQ should copy *parts* (small); large parts are sent zero-copy."""
    return all(memoryview(p).nbytes < 65536 for p in parts)


def json_body(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class FramedStream:
    """Non-blocking frame reader/writer over a readable and a writable file descriptor.

    Parameters
    ----------
    read_fd, write_fd
        Descriptors of the byte stream (the same socket twice, or a pipe pair). They are set
        non-blocking; the stream does not close them (its owner does).
    """

    def __init__(self, read_fd: int, write_fd: int):
        self.read_fd = read_fd
        self.write_fd = write_fd
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self._out: deque = deque()
        self._hbuf = bytearray()
        self._header = None
        self._body = None
        self._body_view = None
        self._body_got = 0
        self.closed = False

    # -- writing -----------------------------------------------------------------------------
    def send_frame(self, kind: int, seq: int, pieces) -> None:
        """Queue one frame whose body is the concatenation of *pieces* (bytes-like)."""
        if self.closed:
            msg = "stream is closed"
            raise StreamClosed(msg)
        views = [memoryview(p).cast("B") for p in pieces]
        self._out.append(HEADER.pack(kind, seq, sum(v.nbytes for v in views)))
        self._out.extend(v for v in views if v.nbytes)

    def send_json(self, kind: int, seq: int, obj) -> None:
        self.send_frame(kind, seq, [json_body(obj)])

    def send_msg(self, seq: int, channel: int, parts) -> None:
        self.send_frame(MSG, seq, encode_msg(channel, parts))

    def wants_write(self) -> bool:
        return bool(self._out)

    def flush(self) -> bool:
        """Write as much as the descriptor takes now; True when everything queued is written."""
        while self._out:
            batch = []
            total = 0
            for buf in self._out:
                batch.append(buf)
                total += len(buf)
                if len(batch) >= 64 or total >= (8 << 20):
                    break
            try:
                n = os.writev(self.write_fd, batch)
            except BlockingIOError:
                return False
            except InterruptedError:
                continue
            except OSError as exc:
                self.closed = True
                msg = f"write failed: {exc}"
                raise StreamClosed(msg) from exc
            while n:
                head = self._out[0]
                size = len(head)
                if n >= size:
                    self._out.popleft()
                    n -= size
                else:
                    self._out[0] = memoryview(head)[n:]
                    n = 0
        return True

    # -- reading -----------------------------------------------------------------------------
    def _split(self, frames: list) -> None:
        """Cut the complete frames out of the read buffer (one pass, one trim at the end)."""
        buf, pos, end = self._hbuf, 0, len(self._hbuf)
        while end - pos >= HEADER.size:
            kind, seq, length = HEADER.unpack_from(buf, pos)
            if kind not in (HELLO, WELCOME, MSG, ACK) or length > _MAX_FRAME:
                msg = f"bad frame header (kind={kind}, length={length})"
                raise ProtocolError(msg)
            start = pos + HEADER.size
            if end - start >= length:
                frames.append((kind, seq, bytes(buf[start : start + length])))
                pos = start + length
                continue
            # A frame larger than what has arrived: read the rest straight into its own buffer.
            self._header = (kind, seq, length)
            self._body = alloc(length)
            self._body[: end - start] = buf[start:end]
            self._body_view = memoryview(self._body)
            self._body_got = end - start
            self._hbuf = bytearray()
            return
        del buf[:pos]

    def read_frames(self) -> list:
        """Read what is available; return the complete frames as ``(kind, seq, body)``.

        Raises :class:`StreamClosed` on end of stream or a read error (after returning the
        frames completed before it).
        """
        frames = []
        while True:
            in_frame = self._header is not None
            try:
                if in_frame:
                    n = os.readv(self.read_fd, [self._body_view[self._body_got :]])
                else:
                    chunk = os.read(self.read_fd, _READ_CHUNK)
                    n = len(chunk)
            except BlockingIOError:
                return frames
            except InterruptedError:
                continue
            except OSError as exc:
                return self._ended(frames, str(exc), exc)
            if n == 0:
                return self._ended(
                    frames, "end of stream inside a frame" if in_frame else "end of stream"
                )
            if not in_frame:
                self._hbuf += chunk
                self._split(frames)
                continue
            self._body_got += n
            if self._body_got == self._header[2]:
                kind, seq, _ = self._header
                frames.append((kind, seq, self._body))
                self._header = self._body = self._body_view = None

    def _ended(self, frames: list, why: str, cause: OSError | None = None) -> list:
        """Mark the stream closed; hand back *frames* first, or raise when there are none."""
        self.closed = True
        if frames:
            return frames
        raise StreamClosed(why) from cause


class OutLog:
    """Messages sent and not yet acknowledged, for resending after a reconnect.

    Bounded by *max_bytes*: past it the oldest messages are dropped and :attr:`dropped` counts
    them (the peer is then told there is a gap instead of silently missing output).
    """

    def __init__(self, max_bytes: int = 2 << 30):
        self.max_bytes = max_bytes
        self._items: deque = deque()
        self._bytes = 0
        self.next_seq = 1
        self.dropped = 0

    def append(self, channel: int, parts) -> int:
        seq = self.next_seq
        self.next_seq += 1
        size = sum(memoryview(p).nbytes for p in parts)
        self._items.append((seq, channel, parts, size))
        self._bytes += size
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, _, _, s = self._items.popleft()
            self._bytes -= s
            self.dropped += 1
        return seq

    def ack(self, seq: int) -> None:
        while self._items and self._items[0][0] <= seq:
            _, _, _, s = self._items.popleft()
            self._bytes -= s

    def after(self, seq: int):
        """The kept messages with a sequence number above *seq*, oldest first."""
        return [(s, c, p) for (s, c, p, _) in self._items if s > seq]

    def __len__(self) -> int:
        return len(self._items)


class TcpStreams:
    """Byte streams of forwarded TCP connections, multiplexed over the wire on channel ``TCP``.

    Used by both ends: the proxy accepts local connections and the agent connects to ports on
    the GPU host's loopback. Each side owns non-blocking sockets keyed by a stream id; data read
    from a socket becomes a ``(sid, bytes)`` message to send, and a message received for a
    stream is written to its socket (buffered while the socket is full). An empty message closes
    the stream. Because these messages ride the sequenced log like every other one, a debugger
    session survives a dropped link.
    """

    CHUNK = 256 * 1024

    def __init__(self) -> None:
        self.socks: dict = {}
        self.out: dict = {}

    def add(self, sid: int, sock) -> None:
        sock.setblocking(False)
        self.socks[sid] = sock
        self.out[sid] = bytearray()

    def deliver(self, sid: int, data) -> bool:
        """Write data for *sid*; False when the stream is unknown (already closed)."""
        sock = self.socks.get(sid)
        if sock is None:
            return False
        if not len(data):
            self.close(sid)
            return True
        self.out[sid] += data
        self._flush(sid)
        return True

    def _flush(self, sid: int) -> None:
        buf = self.out.get(sid)
        sock = self.socks.get(sid)
        if not buf or sock is None:
            return
        try:
            n = sock.send(buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(sid)
            return
        del buf[:n]

    def register(self, poller, pollin: int, pollout: int) -> None:
        for sid, sock in self.socks.items():
            poller.register(sock, pollin | (pollout if self.out[sid] else 0))

    def handle(self, events: dict, pollin: int, pollout: int) -> list:
        """Service ready sockets; return ``[(sid, data)]`` to send (``b""`` for a close)."""
        msgs = []
        for sid, sock in list(self.socks.items()):
            ev = events.get(sock) or events.get(sock.fileno()) or 0
            if ev & pollout:
                self._flush(sid)
            if ev & pollin:
                try:
                    data = sock.recv(self.CHUNK)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                msgs.append((sid, data))
                if not data:
                    self.close(sid)
        return msgs

    def close(self, sid: int) -> None:
        sock = self.socks.pop(sid, None)
        self.out.pop(sid, None)
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def close_all(self) -> None:
        for sid in list(self.socks):
            self.close(sid)


def listen(port: int):
    """A non-blocking socket listening on 127.0.0.1:*port* (0: a free one), for a forward."""
    import socket

    from colabmagic.errors import ConnectError

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("127.0.0.1", port))
    except OSError as exc:
        listener.close()
        msg = f"cannot listen on 127.0.0.1:{port} ({exc}); choose another --port"
        raise ConnectError(msg) from exc
    listener.listen(8)
    listener.setblocking(False)
    return listener


def sid_bytes(sid: int) -> bytes:
    return struct.pack("!Q", sid)


def sid_int(part) -> int:
    return struct.unpack("!Q", bytes(part))[0]
