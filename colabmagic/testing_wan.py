"""An emulated WAN link for tests and benchmarks: delay, a bandwidth cap and scheduled cuts.

Real users reach their GPU over tens to hundreds of milliseconds of round trip, through links that
cap the rate and drop. Loopback has none of that, so figures taken on it flatter every design that
talks too much. :class:`WanRelay` sits between a client and a server on 127.0.0.1 and gives the
bytes crossing it the properties of such a link:

- ``delay``: a fixed one-way delay in seconds, applied in each direction (RTT = 2 x delay);
- ``rate``: a bandwidth cap in bytes per second per direction, with a bounded queue (about one
  bandwidth-delay product plus 256 KiB), so a sender feels back-pressure as on a real link
  instead of filling the relay's memory;
- cuts: :meth:`WanRelay.cut` resets every live connection now; ``cut_after(n)`` resets them once *n*
  more payload bytes have crossed; :meth:`WanRelay.freeze` stops forwarding without closing anything
  (a half-open link), :meth:`WanRelay.thaw` resumes; ``refuse = True`` makes new connections fail
  (the tunnel is gone).

It also counts what it carried (:attr:`WanRelay.bytes_up`, :attr:`WanRelay.bytes_down`) and keeps a
timeline of *flights* (runs of data in one direction), so ``relay.round_trips()`` counts
request/response turns independently of the timing noise of the machine.

The same link is available as an SSH ``ProxyCommand`` (stdio to a TCP target)::

    ProxyCommand python -m colabmagic.testing_wan --delay 0.025 --rate 6250000 %h %p

Only loopback targets are accepted: this is a test instrument, not a network tool.
"""

from __future__ import annotations

import argparse
import itertools
import os
import selectors
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable

_CHUNK = 64 * 1024
_LOOPBACK = ("127.", "localhost", "::1")


def _check_loopback(host: str) -> None:
    if not host.startswith(_LOOPBACK):
        msg = f"the WAN relay only connects to loopback addresses, not {host!r}"
        raise ValueError(msg)


class _Direction:
    """One direction of one connection: a reader fills a bounded, time-stamped queue; a writer
    releases each chunk at ``arrival + delay``, no faster than ``rate``."""

    def __init__(self, relay: _Link, name: str, read: Callable, write: Callable, done: Callable):
        self.relay, self.name = relay, name
        self._read, self._write, self._done = read, write, done
        self._queue: deque[tuple[float, bytes]] = deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._eof = False
        self.closed = False
        limit = relay.rate * relay.delay * 2 if relay.rate else 0
        self._limit = int(limit) + 256 * 1024
        self._threads = [
            threading.Thread(target=self._reader, name=f"wan-{name}-r", daemon=True),
            threading.Thread(target=self._writer, name=f"wan-{name}-w", daemon=True),
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def _reader(self) -> None:
        while not self.closed:
            try:
                data = self._read(_CHUNK)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self._eof = True
                    self._cond.notify_all()
                    return
                while self._queued >= self._limit and not self.closed:
                    self._cond.wait(0.1)
                self._queue.append((time.monotonic(), data))
                self._queued += len(data)
                self._cond.notify_all()

    def _writer(self) -> None:
        relay = self.relay
        next_free = 0.0
        while True:
            with self._cond:
                while not self.closed and (not self._queue or relay.frozen):
                    if self._eof and not self._queue:
                        break
                    self._cond.wait(0.05)
                if self.closed or not self._queue:
                    break
                stamp, data = self._queue[0]
            now = time.monotonic()
            due = stamp + relay.delay
            if relay.rate:
                next_free = max(next_free, due, now) + len(data) / relay.rate
                due = next_free
            if due > now:
                time.sleep(due - now)  # the link's own latency: this *is* the emulated wire
            if self.closed or relay.frozen:
                continue
            with self._cond:
                self._queue.popleft()
                self._queued -= len(data)
                self._cond.notify_all()
            relay._carried(self.name, len(data))  # counted before the far end can react to it
            try:
                self._write(data)
            except OSError:
                break
        self._done(self)


class _Conn:
    """A client connection and its upstream, joined by two :class:`_Direction` s."""

    def __init__(self, relay: WanRelay, client: socket.socket, upstream: socket.socket):
        self.client, self.upstream = client, upstream
        self._lock = threading.Lock()
        self._finished = 0
        self.up = _Direction(relay, "up", client.recv, upstream.sendall, self._half_done)
        self.down = _Direction(relay, "down", upstream.recv, client.sendall, self._half_done)

    def start(self) -> None:
        self.up.start()
        self.down.start()

    def _half_done(self, direction: _Direction) -> None:
        # Propagate an orderly close one way (shutdown), and close both when both ends are done.
        dest = self.upstream if direction is self.up else self.client
        try:
            dest.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        with self._lock:
            self._finished += 1
            both = self._finished == 2
        if both or direction.closed:
            self.close(reset=False)

    def close(self, *, reset: bool) -> None:
        self.up.stop()
        self.down.stop()
        for s in (self.client, self.upstream):
            try:
                if reset:  # RST, not FIN: what a dropped NAT entry or a killed tunnel looks like
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RD)  # wakes this relay's own reader blocked in recv()
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass


class _Link:
    """What a link is, whatever its ends: delay, cap, freeze, and what it carried."""

    def __init__(self, delay: float, rate: float | None):
        self.delay = float(delay)
        self.rate = float(rate) if rate else None
        self.frozen = False
        self.bytes_up = 0
        self.bytes_down = 0
        self._flights: list[str] = []
        self._cut_at: int | None = None
        self._lock = threading.Lock()

    def reset_counters(self) -> None:
        """Zero the byte counters and the flight timeline."""
        with self._lock:
            self.bytes_up = self.bytes_down = 0
            self._flights.clear()

    def wait_quiet(self, timeout: float = 30.0) -> None:
        """Wait until nothing has crossed for four one-way delays (at least 50 ms): the traffic
        of earlier connections is off the wire, so counting can start clean."""
        settle = max(4 * self.delay, 0.05)
        deadline = time.monotonic() + timeout
        last = -1
        while time.monotonic() < deadline:
            now = self.bytes_up + self.bytes_down
            if now == last:
                return
            last = now
            time.sleep(settle)  # the quiet period itself is what is being measured
        msg = f"the link did not go quiet within {timeout:g}s"
        raise TimeoutError(msg)

    def round_trips(self) -> int:
        """Request/response turns seen since the last :meth:`reset_counters`.

        A flight is a run of data in one direction; a turn is an upward flight followed by a
        downward one. This counts turns independently of the machine's timing noise; where both
        ends talk at once (acknowledgements during output), compare wall times instead.
        """
        with self._lock:
            flights = list(self._flights)
        return sum(1 for a, b in itertools.pairwise(flights) if a == "up" and b == "down")

    def cut(self) -> int:
        """Reset the link's connections now; returns how many were cut (none at this level)."""
        return 0

    def cut_after(self, nbytes: int) -> None:
        """Reset every live connection once *nbytes* more payload bytes have crossed (any way)."""
        with self._lock:
            self._cut_at = self.bytes_up + self.bytes_down + int(nbytes)

    def freeze(self) -> None:
        """Stop forwarding both ways without closing: a half-open link (queues fill, then block)."""
        self.frozen = True

    def thaw(self) -> None:
        """Resume forwarding after :meth:`freeze`."""
        self.frozen = False

    def _carried(self, direction: str, n: int) -> None:
        cut = False
        with self._lock:
            if direction == "up":
                self.bytes_up += n
            else:
                self.bytes_down += n
            if not self._flights or self._flights[-1] != direction:
                self._flights.append(direction)
            if self._cut_at is not None and self.bytes_up + self.bytes_down >= self._cut_at:
                self._cut_at = None
                cut = True
        if cut:
            threading.Thread(target=self.cut, daemon=True).start()


class WanRelay(_Link):
    """A TCP relay on 127.0.0.1 that emulates a WAN link to ``target``.

    Parameters
    ----------
    target : tuple of (str, int)
        The loopback host and port to relay to.
    delay : float
        One-way delay in seconds, each direction.
    rate : float, optional
        Bandwidth cap in bytes per second, each direction; ``None`` for no cap.
    port : int
        Port to listen on; 0 picks a free one (see :attr:`port`).

    Examples
    --------
    >>> with WanRelay(("127.0.0.1", sshd.port), delay=0.025) as wan:   # doctest: +SKIP
    ...     connect(f"127.0.0.1:{wan.port}")
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        delay: float = 0.0,
        rate: float | None = None,
        port: int = 0,
    ):
        _check_loopback(target[0])
        super().__init__(delay, rate)
        self.target = target
        self.refuse = False
        self.connections = 0
        self._conns: list[_Conn] = []
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port = self._listener.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> WanRelay:
        """Start accepting connections; returns self."""
        self._thread = threading.Thread(target=self._accept_loop, name="wan-accept", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and reset every live connection."""
        self._wake_w.send(b"x")
        if self._thread:
            self._thread.join(5)
        self.cut()
        for s in (self._listener, self._wake_r, self._wake_w):
            s.close()

    def __enter__(self) -> WanRelay:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` of the relay's listening side."""
        return f"127.0.0.1:{self.port}"

    # -- faults -------------------------------------------------------------------------------
    def cut(self) -> int:
        """Reset every live connection now (RST both ways); returns how many were cut."""
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            c.close(reset=True)
        return len(conns)

    @property
    def live(self) -> int:
        """Number of live relayed connections."""
        with self._lock:
            return len(self._conns)

    def _accept_loop(self) -> None:
        self._sel.register(self._listener, selectors.EVENT_READ)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        while True:
            for key, _ in self._sel.select():
                if key.fileobj is self._wake_r:
                    self._sel.close()
                    return
                client, _ = self._listener.accept()
                if self.refuse:
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    client.close()
                    continue
                try:
                    upstream = socket.create_connection(self.target, timeout=10)
                except OSError:
                    client.close()
                    continue
                upstream.settimeout(None)
                for s in (client, upstream):
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn = _Conn(self, client, upstream)
                with self._lock:
                    self._conns.append(conn)
                    self.connections += 1
                conn.start()


def ssh_handshake_round_trips(relay: WanRelay, *, user: str, key_file: str) -> int:
    """Round trips of a bare SSH handshake + public-key authentication through *relay*.

    paramiko alone, nothing of colabmagic: what any SSH client pays before its first channel,
    to subtract from a connect measured through the same relay.
    """
    import paramiko

    relay.reset_counters()
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t = paramiko.Transport(sock)
    try:
        t.start_client(timeout=30)
        t.auth_publickey(user, paramiko.Ed25519Key.from_private_key_file(key_file))
        turns = relay.round_trips()
    finally:
        t.close()
    return turns


def _proxy_command(host: str, port: int, delay: float, rate: float | None) -> int:
    """stdio <-> TCP with the link's delay and cap: the body of the ``ProxyCommand`` mode."""
    _check_loopback(host)
    sock = socket.create_connection((host, port), timeout=10)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    relay = _Link(delay, rate)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()

    def write_out(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(stdout, view) :]

    finished = threading.Event()

    def done(direction: _Direction) -> None:
        if direction.name == "up":  # the ssh client closed its side: pass the EOF on
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                finished.set()
        else:  # the server closed: nothing more can arrive
            finished.set()

    up = _Direction(relay, "up", lambda n: os.read(stdin, n), sock.sendall, done)
    down = _Direction(relay, "down", sock.recv, write_out, done)
    up.start()
    down.start()
    finished.wait()
    sock.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m colabmagic.testing_wan [--delay S] [--rate B/s] HOST PORT`` (a ProxyCommand)."""
    parser = argparse.ArgumentParser(prog="python -m colabmagic.testing_wan", description=__doc__)
    parser.add_argument("--delay", type=float, default=0.0, help="one-way delay in seconds")
    parser.add_argument("--rate", type=float, default=None, help="cap in bytes/second")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    args = parser.parse_args(argv)
    return _proxy_command(args.host, args.port, args.delay, args.rate)


if __name__ == "__main__":
    sys.exit(main())
