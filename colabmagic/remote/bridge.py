"""The per-connection bridge: copies bytes between its stdin/stdout and an agent's Unix socket.

One bridge process runs for each link (an SSH exec channel, or a local subprocess pipe). It is
deliberately dumb: framing, acknowledgements and resume live in the agent and the proxy, so
killing a bridge loses nothing.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

CHUNK = 1 << 20
AGENT_CLOSED = 5


def _pump_in(sock: socket.socket, fd: int, ended: threading.Event) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    try:
        while True:
            n = os.readv(fd, [buf])
            if not n:
                break
            sock.sendall(view[:n])
    except OSError:
        pass
    finally:
        ended.set()  # before the agent can see the shutdown and close its side
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def run_bridge(sock_path: str) -> int:
    """Connect to the agent socket at *sock_path* and relay stdio until either side closes.

    Returns 0 when our side (stdin) ended first, :data:`AGENT_CLOSED` when the agent closed the
    socket first (it replaced this bridge, shut down, or died), 3 when it cannot be reached.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(sock_path)
    except OSError as exc:
        sys.stderr.write(f"colabmagic bridge: cannot reach the agent at {sock_path}: {exc}\n")
        return 3
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sys.stdout.flush()
    in_fd, out_fd = sys.stdin.fileno(), sys.stdout.fileno()
    stdin_ended = threading.Event()
    t = threading.Thread(target=_pump_in, args=(sock, in_fd, stdin_ended), daemon=True)
    t.start()
    buf = bytearray(CHUNK)
    try:
        while True:
            got = sock.recv_into(buf)
            if not got:
                break
            view = memoryview(buf)[:got]
            while view:
                n = os.write(out_fd, view)
                view = view[n:]
    except OSError:
        pass
    finally:
        sock.close()
    return 0 if stdin_ended.is_set() else AGENT_CLOSED
