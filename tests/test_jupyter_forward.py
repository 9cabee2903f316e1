"""``Proxy.forward`` on a Jupyter-server target: TCP carried through the kernel itself.

A real ``jupyter server`` on 127.0.0.1; a real TCP server in the remote kernel; a local client on
the forwarded port. The bytes must arrive exactly once and in order both ways, across websocket
cuts (through the emulated WAN link), with the kernel journal and without it; a close on either
side closes the other; a kernel restart closes the local end; the kernel keeps a bounded number of
chunks in flight.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import socket
import threading

import pytest

from colabmagic.remote.tcp_forward import WINDOW
from colabmagic.session import Session
from colabmagic.testing import require, wait_until
from colabmagic.testing_jupyter import jupyter_server
from colabmagic.testing_wan import WanRelay
from colabmagic.transport.jupyter_forward import BACKLOG

pytestmark = pytest.mark.timeout(600)

# A TCP server in the remote kernel: "E" echoes until eof; "S<n>\n" sends n seeded bytes, closes.
SERVER = """\
import random as _r, socket as _s, threading as _t
_srv = _s.socket(); _srv.bind(("127.0.0.1", 0)); _srv.listen(8)
fwd_port = _srv.getsockname()[1]
fwd_events = []
def _handle(c):
    kind = c.recv(1)
    if kind == b"E":
        while True:
            d = c.recv(65536)
            if not d:
                fwd_events.append("peer closed")
                break
            c.sendall(d)
    elif kind == b"S":
        n = int(c.makefile("rb").readline())
        c.sendall(_r.Random(n).randbytes(n))
        fwd_events.append("sent")
    elif kind == b"H":
        fwd_events.append("holding")
        c.recv(1)
        fwd_events.append("peer closed")
    c.close()
def _serve():
    while True:
        try:
            c, _ = _srv.accept()
        except OSError:
            return
        _t.Thread(target=_handle, args=(c,), daemon=True).start()
_t.Thread(target=_serve, daemon=True).start()
print(fwd_port)
"""
STATE = "import json; print(json.dumps(get_ipython().kernel._colabmagic_tcp_forward.state()))"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require(importlib.util.find_spec("jupyter_server") is not None, "jupyter_server is missing")
    with jupyter_server(tmp_path_factory.mktemp("jfwd")) as srv:
        yield srv


def start(url: str, token: str, **options) -> Session:
    from colabmagic.transport.jupyter import JupyterTransport, Token

    transport = JupyterTransport(url, token=Token(token), ping_interval=0.5, **options)
    return Session.start(transport, name="fwd", connect_timeout=120)


def remote_state(s: Session) -> dict:
    return json.loads(s.run(STATE).stdout)


def recv_all(sock: socket.socket, n: int | None = None) -> bytes:
    out = bytearray()
    while n is None or len(out) < n:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        out += chunk
    return bytes(out)


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "no-journal"])
def test_bytes_exactly_once_across_cuts(server, journal):
    """32 MiB echoed (the peer blocks on its writes while we still send) and 24 MiB downloaded,
    the websocket cut three times."""
    with WanRelay(("127.0.0.1", server.port)) as wan:
        s = start(f"http://127.0.0.1:{wan.port}/", server.token, journal=journal)
        try:
            remote_port = int(s.run(SERVER).stdout)
            local_port = s.proxy.forward(remote_port)
            # Echo: send and read at once (a thread sends), cut the websocket twice meanwhile.
            payload = random.Random(1).randbytes(32 << 20)
            conn = socket.create_connection(("127.0.0.1", local_port), timeout=120)
            conn.sendall(b"E")
            reconnects = s.proxy.reconnects

            def send() -> None:
                view = memoryview(payload)
                for i in range(0, len(view), 1 << 20):
                    conn.sendall(view[i : i + (1 << 20)])
                    if i in (4 << 20, 20 << 20):
                        wan.cut()

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            echoed = recv_all(conn, len(payload))
            sender.join(60)
            assert s.proxy.reconnects >= reconnects + 1, "the websocket was never cut"
            assert len(echoed) == len(payload)
            assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
            # Our close reaches the kernel's end: its server sees eof, the forwarder forgets it.
            conn.close()
            wait_until(
                lambda: "peer closed" in s.run("print(fwd_events)").stdout,
                timeout=30,
                what="the remote end to see our close",
            )
            # Download: the kernel's server sends and closes; a cut in the middle. (By bytes, not
            # by a timer: a timer could fire after the download, during a later cell, whose
            # output a drop may lose without the journal.)
            n = 24 << 20
            reconnects = s.proxy.reconnects
            conn = socket.create_connection(("127.0.0.1", local_port), timeout=120)
            wan.cut_after(8 << 20)
            conn.sendall(b"S%d\n" % n)
            got = recv_all(conn)  # ends when the remote close arrives here
            conn.close()
            assert s.proxy.reconnects > reconnects, "the download was never cut"
            assert len(got) == n
            assert (
                hashlib.sha256(got).digest()
                == hashlib.sha256(random.Random(n).randbytes(n)).digest()
            )
            wait_until(
                lambda: remote_state(s)["streams"] == [] and remote_state(s)["threads"] == [],
                timeout=30,
                what="the kernel's forwarder to forget closed streams",
            )
            # Flow control: the kernel never had more than the window unacknowledged.
            state = remote_state(s)
            assert 0 < state["peak"] <= WINDOW
            # ... and never queued much more than the client's bound for its socket.
            assert state["peak_backlog"] <= BACKLOG + WINDOW * (256 << 10), state
        finally:
            s.close()


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "no-journal"])
def test_a_stream_opened_as_the_websocket_drops(server, journal):
    """The ``open`` of a stream is lost in a cut and the client keeps sending while the link
    reconnects (and fetches the journal): no ``send`` may reach the kernel before the resent
    ``open``, or the kernel answers "closed" for a stream it never saw and the connection ends
    empty (seen in CI as 0 of 32 MiB echoed)."""
    with WanRelay(("127.0.0.1", server.port)) as wan:
        s = start(f"http://127.0.0.1:{wan.port}/", server.token, journal=journal)
        try:
            link = s.transport.links[s.kernel_id]
            local_port = s.proxy.forward(int(s.run(SERVER).stdout))
            reconnects = s.proxy.reconnects
            wan.freeze()  # the open and the first bytes go into a link that carries nothing
            conn = socket.create_connection(("127.0.0.1", local_port), timeout=120)
            conn.sendall(b"E")
            wait_until(lambda: link.forwards.streams, timeout=30, what="the open to be posted")
            payload = random.Random(2).randbytes(8 << 20)

            def send() -> None:  # from before the reconnect until after it
                view = memoryview(payload)
                for i in range(0, len(view), 16 << 10):
                    conn.sendall(view[i : i + (16 << 10)])

            wan.cut()
            wan.thaw()
            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            echoed = recv_all(conn, len(payload))
            sender.join(60)
            conn.close()
            assert s.proxy.reconnects > reconnects, "the websocket was never cut"
            assert len(echoed) == len(payload)
            assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
        finally:
            s.close()


def test_remote_close_restart_and_tcp_close(server):
    s = start(server.url, server.token)
    try:
        remote_port = int(s.run(SERVER).stdout)
        local_port = s.proxy.forward(remote_port)
        # Nothing listening on the far side: the local connection is closed, not left hanging.
        dead = s.proxy.forward(1)
        conn = socket.create_connection(("127.0.0.1", dead), timeout=30)
        assert conn.recv(10) == b""
        conn.close()
        # The remote end closes: the local end sees eof.
        conn = socket.create_connection(("127.0.0.1", local_port), timeout=30)
        conn.sendall(b"S5\n")
        assert recv_all(conn) == random.Random(5).randbytes(5)
        conn.close()
        # tcp_close (what %colab_debug --stop sends) closes both ends of live connections.
        held = socket.create_connection(("127.0.0.1", local_port), timeout=30)
        held.sendall(b"H")
        wait_until(lambda: "holding" in s.run("print(fwd_events)").stdout, timeout=30)
        assert len(remote_state(s)["streams"]) == 1
        assert s.proxy.call("tcp_close", port=remote_port)["closed"] == 1
        assert held.recv(10) == b""
        held.close()
        wait_until(lambda: remote_state(s)["streams"] == [], timeout=30, what="kernel-side close")
        assert s.run("print(fwd_events[-1])").stdout == "peer closed\n"
        # A restart ends the kernel's streams: the local connection is closed too.
        conn = socket.create_connection(("127.0.0.1", local_port), timeout=30)
        conn.sendall(b"H")
        wait_until(lambda: len(remote_state(s)["streams"]) == 1, timeout=30)
        s.restart(timeout=120)
        conn.settimeout(60)
        assert conn.recv(10) == b""
        conn.close()
        assert remote_state(s)["streams"] == []
    finally:
        s.close()


def test_forward_over_json_frames(tmp_path_factory):
    """A server that refuses the binary subprotocol: chunks travel as JSON frames with buffers."""
    require(importlib.util.find_spec("jupyter_server") is not None, "jupyter_server is missing")
    no_v1 = "--ZMQChannelsWebsocketConnection.kernel_ws_protocol="
    with jupyter_server(tmp_path_factory.mktemp("jfwd-json"), no_v1) as srv:
        s = start(srv.url, srv.token)
        try:
            assert not s.transport.links[s.kernel_id].current.v1
            local_port = s.proxy.forward(int(s.run(SERVER).stdout))
            n = 3 << 20
            conn = socket.create_connection(("127.0.0.1", local_port), timeout=60)
            conn.sendall(b"S%d\n" % n)
            assert recv_all(conn) == random.Random(n).randbytes(n)
            conn.close()
        finally:
            s.close()


def test_chunks_lost_without_a_drop_are_resent(tmp_path_factory):
    """The server's own IOPub rate limit drops messages with no websocket drop: the kernel resends
    what nobody acknowledged, and the bytes still arrive exactly once, in order."""
    require(importlib.util.find_spec("jupyter_server") is not None, "jupyter_server is missing")
    limit = "--ZMQChannelsWebsocketConnection.iopub_msg_rate_limit=2"  # > 6 msgs in 3 s: dropped
    with jupyter_server(tmp_path_factory.mktemp("jfwd-limit"), limit) as srv:
        s = start(srv.url, srv.token)
        try:
            local_port = s.proxy.forward(int(s.run(SERVER).stdout))
            n = 10 * 65536  # ten chunks: some are over the limit
            conn = socket.create_connection(("127.0.0.1", local_port), timeout=120)
            conn.sendall(b"S%d\n" % n)
            assert recv_all(conn) == random.Random(n).randbytes(n)
            conn.close()
            assert s.proxy.reconnects == 0, "no websocket drop: the server dropped messages"
            # The limit drops cell output too (the state cell's stdout, while the window still
            # counts the transfer): read it again, slower than the limit, until it comes.
            state = wait_until(
                lambda: s.run(STATE).stdout,
                timeout=60,
                interval=3,
                what="the state cell's output past the server's IOPub rate limit",
            )
            assert json.loads(state)["retransmits"] > 0
        finally:
            s.close()
