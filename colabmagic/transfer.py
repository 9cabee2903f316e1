"""Variables in and out of the remote kernel: requests on the ``colabmagic`` comm, streamed bulk.

:class:`Channel` is what a :class:`~colabmagic.session.Session` uses for ``push``, ``pull`` and
the small requests to the kernel-side helper (``info``, ``debugpy``). Messages go to the proxy
in-process (:meth:`Proxy.send_direct`: no loopback ZeroMQ hop on this side) and the kernel's
answers on the comm come back through the proxy's *tap* into a queue, so nothing of a transfer
crosses the local IOPub socket.

Large values are streamed. The frames of the pickle (protocol 5: an array's memory is its own
frame, never copied into the pickle) are cut into :data:`CHUNK`-byte chunks; each is one message
that the kernel copies into place and acknowledges, and at most :data:`WINDOW` chunks are in
flight. So the hops (proxy → wire → bridge → agent → kernel, and back for ``pull``) work on
different chunks at the same time instead of storing and forwarding a whole message one after
the other, and every process holds at most a window of chunks beside the value itself. Chunks of
a push are views of the array (no copy); the kernel unpickles into the memory it received, so
arrays arrive writable and zero-copy; ``pull`` mirrors it. Each chunk is compressed with zstd
when :mod:`colabmagic.compress` says it pays at the link's measured rate.
"""

from __future__ import annotations

import contextlib
import queue
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from colabmagic import compress, serialize, wire
from colabmagic.errors import TransferError

if TYPE_CHECKING:
    from colabmagic.session import Session

COMM_TARGET = "colabmagic"
CHUNK = 4 << 20
WINDOW = 6
INLINE = 256 << 10  # values smaller than this travel as one message
_POLL_S = 0.05


@dataclass
class TransferStats:
    """What one push or pull moved: payload bytes, bytes on the wire, time, chunks."""

    direction: str
    raw_bytes: int = 0
    wire_bytes: int = 0
    seconds: float = 0.0
    chunks: int = 0
    compressed_chunks: int = 0
    via: str = "comm"  # what carried it: "comm" (chunk messages) or "openssh" (its own stream)
    note: str = ""  # why it took the comm path after trying the stream, if it did
    pipes_passed: bool = False  # openssh: the kernel moved the bytes on sshd's pipes itself

    @property
    def rate(self) -> float:
        """Payload bytes per second."""
        return self.raw_bytes / self.seconds if self.seconds else 0.0


class Channel:
    """The comm between one session and its kernel's helper; see the module docstring."""

    def __init__(self, session: Session):
        self.session = session
        self.comm_id: str | None = None
        self.meter = compress.RateMeter()
        self.last: TransferStats | None = None
        self.via = "auto"  # large values over SSH: see colabmagic.transfer_direct

    def reset(self) -> None:
        """Forget the comm (a fresh kernel has none open)."""
        self.comm_id = None

    # -- plumbing ----------------------------------------------------------------------------
    def _send(self, msg_type: str, content: dict, buffers=None) -> str:
        client = self.session.client
        msg = client.session.msg(msg_type, content)
        parts = client.session.serialize(msg)
        parts.extend(buffers or [])
        self.session.proxy.send_direct(wire.SHELL, parts)
        return msg["header"]["msg_id"]

    def _msg(self, op: str, req: str, buffers=None, **data: Any) -> str:
        content = {"comm_id": self.comm_id, "data": {"op": op, "req": req, **data}}
        return self._send("comm_msg", content, buffers)

    @contextlib.contextmanager
    def _conversation(self) -> Iterator[queue.SimpleQueue]:
        """Hold the session; route this comm's messages from the proxy into a queue."""
        s = self.session
        with s._lock:
            s._check_alive()
            if self.comm_id is None:
                self.comm_id = uuid.uuid4().hex
                content = {"comm_id": self.comm_id, "target_name": COMM_TARGET, "data": {}}
                self._send("comm_open", content)
            inbox: queue.SimpleQueue = queue.SimpleQueue()
            marker = self.comm_id.encode()
            session = s.client.session

            def tap(parts: list) -> bool:
                i = wire.delim_index(parts, 4)
                if i is None or len(parts) < i + 6:
                    return False
                if b"comm_msg" not in bytes(parts[i + 2]) or marker not in bytes(parts[i + 5]):
                    return False
                try:
                    frames = [bytes(p) for p in parts[i + 1 : i + 6]] + list(parts[i + 6 :])
                    msg = session.deserialize(frames, content=True, copy=True)
                except Exception:  # noqa: BLE001 - not ours after all: let the proxy publish it
                    return False
                inbox.put((msg["content"].get("data", {}), list(msg["buffers"])))
                return True

            s.proxy.tap = tap
            try:
                yield inbox
            finally:
                s.proxy.tap = None

    def _next(self, inbox: queue.SimpleQueue, req: str, op: str, timeout: float) -> tuple:
        """The next message of request *req*; raises on an error answer or a silent kernel."""
        deadline = time.monotonic() + timeout
        while True:
            self.session._check_alive()
            try:
                data, buffers = inbox.get(timeout=_POLL_S)
            except queue.Empty:
                if time.monotonic() > deadline:
                    msg = f"the kernel did not answer {op!r} within {timeout:g}s (is it busy?)"
                    raise TransferError(msg) from None
                continue
            if data.get("req") != req:
                continue  # a late answer to an abandoned request
            if data.get("op") == "error":
                raise TransferError(data.get("message", "remote transfer failed"))
            return data, buffers

    def _await_idle(self, msg_id: str, timeout: float = 10.0) -> bool:
        """Wait for the kernel's ``idle`` after *msg_id*, so the next status is truthful."""
        client = self.session.client
        iopub = client.iopub_channel.socket
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.session._check_alive()
            if not iopub.poll(int(_POLL_S * 1000)):
                continue
            _, msg = client.session.recv(iopub, zmq.NOBLOCK)
            if msg is not None and _is_idle_after(msg, msg_id):
                return True
        return False

    def _abort(self, req: str) -> None:
        with contextlib.suppress(Exception):
            self._msg("abort", req)

    # -- requests ----------------------------------------------------------------------------
    def request(self, op: str, *, buffers=None, timeout: float = 600.0, **data: Any) -> tuple:
        """Send one request to the kernel-side helper; return its answer ``(data, buffers)``."""
        with self._conversation() as inbox:
            req = uuid.uuid4().hex
            sent = self._msg(op, req, buffers, **data)
            answer = self._next(inbox, req, op, timeout)
            self._await_idle(sent)
            return answer

    def push(
        self, values: dict[str, Any], *, compress_mode: str | None = None, timeout: float = 600.0
    ) -> TransferStats:
        """Bind *values* in the kernel's namespace; see the module docstring."""
        mode = compress.check_mode(compress_mode)
        frames = serialize.dumps(values)
        views = [memoryview(f).cast("B") for f in frames]
        total = sum(v.nbytes for v in views)
        stats = TransferStats("push", raw_bytes=total)
        t0 = time.perf_counter()
        if total <= INLINE:
            self.request("push", buffers=frames, names=sorted(values), timeout=timeout)
            stats.wire_bytes, stats.seconds = total, time.perf_counter() - t0
            self.last = stats
            return stats
        names = sorted(values)
        if _direct().push(self, names, views, mode, stats, timeout):
            stats.seconds = time.perf_counter() - t0
            self.last = stats
            return stats
        chooser = compress.Chooser(mode, self.meter, peer_zstd=self._peer_zstd())
        with self._conversation() as inbox:
            req = uuid.uuid4().hex
            self._msg("push_begin", req, names=names, sizes=[v.nbytes for v in views])
            inflight: deque = deque()
            self.meter.start()
            last = ""
            try:
                for i, off, piece in _chunks(views):
                    while len(inflight) >= WINDOW:
                        self._next(inbox, req, "push", timeout)
                        self.meter.delivered(inflight.popleft())
                    codec, payload = chooser.encode(piece)
                    stats.chunks += 1
                    stats.compressed_chunks += codec != compress.RAW
                    size = memoryview(payload).nbytes
                    last = self._msg("chunk", req, [payload], i=i, off=off, n=piece.nbytes, z=codec)
                    inflight.append(size)
                while True:
                    data, _ = self._next(inbox, req, "push", timeout)
                    if data.get("op") == "push_ok":
                        break
                    self.meter.delivered(inflight.popleft())
            except BaseException:
                self._abort(req)
                raise
            self._await_idle(last)
        stats.wire_bytes = chooser.wire_bytes
        stats.seconds = time.perf_counter() - t0
        self.last = stats
        return stats

    def pull(
        self, names: list[str], *, compress_mode: str | None = None, timeout: float = 600.0
    ) -> dict[str, Any]:
        """The values of *names* in the kernel, as a dict; see the module docstring."""
        mode = compress.check_mode(compress_mode)
        if not compress.available():
            mode = "none"
        stats = TransferStats("pull")
        t0 = time.perf_counter()
        direct = _direct().pull_offer(self, INLINE)  # {} when no stream can carry it
        offers = [direct, {}] if direct else [{}]  # the stream first; the comm path redoes it
        with self._conversation() as inbox:
            for offer in offers:
                req = uuid.uuid4().hex
                sent = self._msg(
                    "pull",
                    req,
                    names=list(names),
                    stream=True,
                    inline=INLINE,
                    chunk=CHUNK,
                    window=WINDOW,
                    compress=mode,
                    rate=self.meter.rate,
                    **offer,
                )
                data, buffers = self._next(inbox, req, "pull", timeout)
                if data.get("op") == "pull_ok":  # small: one message
                    self._await_idle(sent)
                    stats.raw_bytes = sum(memoryview(b).nbytes for b in buffers)
                    stats.wire_bytes = stats.raw_bytes
                    stats.seconds = time.perf_counter() - t0
                    self.last = stats
                    return serialize.loads(buffers)
                if data.get("op") == "direct_ready":  # on its own stream
                    got = _direct().pull(self, inbox, req, data, offer, stats, timeout)
                    if got is None:
                        continue  # not started, or broken midway: the comm path redoes it
                    frames, last = got
                    break
                try:
                    frames, last = self._receive(inbox, req, data["sizes"], stats, timeout)
                except BaseException:
                    self._abort(req)
                    raise
                _direct().warm(self, stats.raw_bytes)
                break
            self._await_idle(last or sent)
        stats.seconds = time.perf_counter() - t0
        self.last = stats
        return serialize.loads(frames)

    def _receive(self, inbox, req: str, sizes: list[int], stats: TransferStats, timeout) -> tuple:
        frames = [wire.alloc(int(n)) for n in sizes]
        left = stats.raw_bytes = sum(int(n) for n in sizes)
        self.meter.start()
        last = ""
        while left > 0:
            data, buffers = self._next(inbox, req, "pull", timeout)
            if data.get("op") != "chunk":
                continue
            n, off, payload = int(data["n"]), int(data["off"]), buffers[0]
            wire_n = memoryview(payload).nbytes
            raw = compress.decode(int(data.get("z", 0)), payload, n)
            memoryview(frames[int(data["i"])])[off : off + n] = raw
            left -= n
            stats.chunks += 1
            stats.compressed_chunks += int(data.get("z", 0)) != compress.RAW
            stats.wire_bytes += wire_n
            self.meter.delivered(wire_n)
            if left > 0:
                last = self._msg("ack", req, rate=self.meter.rate)
        return frames, last

    def _peer_zstd(self) -> bool:
        return bool(self.session.remote_info.get("zstd"))


def _chunks(views: list[memoryview]) -> Iterator[tuple[int, int, memoryview]]:
    for i, view in enumerate(views):
        for off in range(0, view.nbytes, CHUNK):
            yield i, off, view[off : off + CHUNK]


def _is_idle_after(msg: dict, msg_id: str) -> bool:
    """True when *msg* is the kernel's ``idle`` status after the request *msg_id*."""
    return (
        msg["header"]["msg_type"] == "status"
        and msg["parent_header"].get("msg_id") == msg_id
        and msg["content"].get("execution_state") == "idle"
    )


def _direct():
    """:mod:`colabmagic.transfer_direct`, imported at the first transfer: it brings the host
    helper and the ``ssh`` route (~9 ms), which a session that never pushes does not need."""
    from colabmagic import transfer_direct

    return transfer_direct
