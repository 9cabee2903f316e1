"""The emulated WAN link (colabmagic.testing_wan) that the Colab, Jupyter-server and transfer tests
measure through: its delay, cap, cuts and freeze must be what the figures claim."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest

from colabmagic.testing import wait_until
from colabmagic.testing_wan import WanRelay


class EchoServer:
    """A loopback TCP echo server (each connection echoes until EOF)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn):
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def close(self):
        self._stop = True
        self.sock.close()


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


def _exchange(sock: socket.socket, payload: bytes) -> float:
    t0 = time.perf_counter()
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        assert chunk, "connection closed early"
        got += chunk
    assert got == payload
    return time.perf_counter() - t0


def _peer_gone(sock: socket.socket, payload: bytes = b"?") -> bool:
    """Send *payload* and read its echo: True when the link reset or closed instead."""
    try:
        sock.sendall(payload)
        return not _recv_n(sock, len(payload))
    except OSError:
        return True


def test_delay_is_one_way_each_direction(echo):
    with WanRelay(("127.0.0.1", echo.port), delay=0.05) as wan:
        with socket.create_connection(("127.0.0.1", wan.port)) as s:
            rtt = min(_exchange(s, b"ping") for _ in range(3))
            assert 0.1 <= rtt < 0.2
            assert wan.round_trips() == 3
            assert wan.bytes_up == wan.bytes_down == 12


def test_rate_cap_and_back_pressure(echo):
    rate = 2_000_000  # bytes/s each way
    payload = b"x" * 1_000_000
    with WanRelay(("127.0.0.1", echo.port), rate=rate) as wan:
        with socket.create_connection(("127.0.0.1", wan.port)) as s:
            got = []
            reader = threading.Thread(target=lambda: got.append(_recv_n(s, len(payload))))
            reader.start()
            t0 = time.perf_counter()
            s.sendall(payload)
            reader.join(10)
            elapsed = time.perf_counter() - t0
    assert got == [payload]
    # Pipelined both ways: about payload/rate, never much faster than the cap.
    assert elapsed >= 0.9 * len(payload) / rate


def _recv_n(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def test_cut_resets_and_new_connections_work(echo):
    with WanRelay(("127.0.0.1", echo.port)) as wan:
        s = socket.create_connection(("127.0.0.1", wan.port))
        _exchange(s, b"a")
        assert wan.cut() == 1
        assert _peer_gone(s)
        s.close()
        with socket.create_connection(("127.0.0.1", wan.port)) as s2:
            _exchange(s2, b"c")
        assert wan.connections == 2


def test_cut_after_bytes(echo):
    with WanRelay(("127.0.0.1", echo.port)) as wan:
        with socket.create_connection(("127.0.0.1", wan.port)) as s:
            wan.cut_after(100_000)
            s.settimeout(10)
            received = 0
            while not _peer_gone(s, b"y" * 10_000):
                received += 10_000
                assert received < 200_000, "the scheduled cut never came"
        wait_until(lambda: wan.live == 0, timeout=5, what="the cut connection to go")


def test_freeze_holds_bytes_then_thaw_delivers(echo):
    with WanRelay(("127.0.0.1", echo.port)) as wan:
        with socket.create_connection(("127.0.0.1", wan.port)) as s:
            wan.freeze()
            s.sendall(b"held")
            s.settimeout(0.3)
            with pytest.raises(TimeoutError):
                s.recv(10)
            wan.thaw()
            s.settimeout(5)
            assert _recv_n(s, 4) == b"held"


def test_refuse_and_loopback_only(echo):
    with WanRelay(("127.0.0.1", echo.port)) as wan:
        wan.refuse = True
        s = socket.create_connection(("127.0.0.1", wan.port))
        s.settimeout(5)
        assert _peer_gone(s)
        s.close()
    with pytest.raises(ValueError, match="loopback"):
        WanRelay(("192.0.2.1", 22))


def test_proxy_command_mode(echo):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "colabmagic.testing_wan",
            "--delay",
            "0.05",
            "127.0.0.1",
            str(echo.port),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        t0 = time.perf_counter()
        proc.stdin.write(b"hello")
        proc.stdin.flush()
        assert proc.stdout.read(5) == b"hello"
        assert time.perf_counter() - t0 >= 0.1
        proc.stdin.close()
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()
