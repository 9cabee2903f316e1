"""A pipe between two threads of one process that passes :mod:`colabmagic.wire` frames as objects.

The Jupyter-server transport's kernel link (an asyncio loop) and the proxy it feeds live in one
process. A socket pair between them cost every message a framing, a copy into the kernel, a read
back and a cut into parts again, both ways; a push's 4 MiB chunks were copied twice more than
needed. :func:`pair` makes two :class:`MemoryStream` ends with the interface of
:class:`wire.FramedStream` (``send_msg``, ``send_frame``, ``send_json``, ``flush``,
``read_frames``, ``closed``) whose frames go straight into the other end's inbox. Each end has an
``eventfd`` (a pipe where there is none) as its descriptor, raised by every frame put in, so the
reader's poll -- the proxy's ZeroMQ poll or the asyncio loop -- wakes as it would for a socket.

Ordering and loss are as for a socket: frames arrive in order, and frames sent after the other end
closed are dropped (the sender's resend log covers them, as after any drop). The two ends are used
from two threads: appends and pops of an inbox are atomic, a reader drains its descriptor before
its inbox (a frame is never left unannounced), a reader looks at whether the writer closed
*before* it empties the inbox (a writer puts nothing after closing, so no last frame is missed),
and one lock per pair orders closing against putting. An end's descriptor stays open until both
ends are closed, so a late signal never lands on a number the system has handed out again.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading

from colabmagic import wire


class MemoryStream:
    """One end of a :func:`pair`; see the module docstring."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        if hasattr(os, "eventfd"):  # Linux
            self.read_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._signal_fd = self.read_fd
        else:  # macOS and the other BSDs: a pipe does the same
            self.read_fd, self._signal_fd = os.pipe()
            os.set_blocking(self.read_fd, False)
            os.set_blocking(self._signal_fd, False)
        self.write_fd = self.read_fd  # polled for reading only (wants_write is never true)
        self.closed = False
        self.peer: MemoryStream | None = None
        self._inbox: collections.deque = collections.deque()
        self._peer_gone = False
        self._shut = False  # close() was called

    def fileno(self) -> int:
        return self.read_fd

    # -- writing -------------------------------------------------------------------------
    def _put(self, frame: tuple) -> None:
        if self.closed:
            msg = "stream is closed"
            raise wire.StreamClosed(msg)
        with self._lock:
            peer = self.peer
            if peer is None or peer.closed:
                self._peer_gone = True  # reported by flush(), as a socket reports it on write
                return
            peer._inbox.append(frame)
            peer._signal()

    def send_frame(self, kind: int, seq: int, pieces) -> None:
        self._put((kind, seq, b"".join(bytes(p) for p in pieces)))

    def send_json(self, kind: int, seq: int, obj) -> None:
        self._put((kind, seq, wire.json_body(obj)))

    def send_msg(self, seq: int, channel: int, parts) -> None:
        """Queue a message; the reader's :func:`wire.decode_msg` hands back *parts* as they are."""
        self._put((wire.MSG, seq, (channel, list(parts))))

    def wants_write(self) -> bool:
        return False

    def flush(self) -> bool:
        if self._peer_gone or self.closed:
            self.closed = True
            msg = "the other end closed the pipe"
            raise wire.StreamClosed(msg)
        return True

    # -- reading -------------------------------------------------------------------------
    def _signal(self) -> None:
        with contextlib.suppress(OSError):  # full (it is raised already), or closed: no reader
            os.write(self._signal_fd, b"\x01\0\0\0\0\0\0\0")

    def read_frames(self) -> list:
        """The frames put in so far; raises :class:`wire.StreamClosed` once the other end
        closed and nothing is left (as :meth:`wire.FramedStream.read_frames`)."""
        with contextlib.suppress(BlockingIOError):
            os.read(self.read_fd, 4096)
        peer = self.peer
        gone = peer is None or peer.closed  # before the inbox: nothing comes after a close
        frames = []
        inbox = self._inbox
        while inbox:
            frames.append(inbox.popleft())
        if gone:
            self.closed = True
            if not frames:
                msg = "end of stream"
                raise wire.StreamClosed(msg)
        return frames

    def close(self) -> None:
        """Close this end: the other end reads what is left, then the end of the stream."""
        with self._lock:
            if self._shut:
                return
            self._shut = self.closed = True
            peer = self.peer
            if peer is not None and not peer._shut:
                peer._signal()
                return  # the descriptors go when the other end closes too
            for end in (self, peer):
                if end is not None:
                    for fd in {end.read_fd, end._signal_fd}:
                        os.close(fd)
                    end.read_fd = end.write_fd = end._signal_fd = -1


def pair() -> tuple[MemoryStream, MemoryStream]:
    """Two connected ends."""
    lock = threading.Lock()
    a, b = MemoryStream(lock), MemoryStream(lock)
    a.peer, b.peer = b, a
    return a, b
