"""Port forwards (``Proxy.forward``): latency and throughput per transport, in one run.

Run: ``python benchmarks/forward.py [--n 300] [--mib 32]``

An echo server runs on 127.0.0.1 inside the remote kernel; a local client talks to it through
``session.proxy.forward(port)``, as VS Code talks to debugpy after ``%colab_debug --vscode``:

- ``direct``: the same echo server in this process, no forward -- the reference;
- ``local``: ``--local`` (proxy -> bridge -> agent -> TCP), the path SSH targets use;
- ``jupyter``: a real ``jupyter server`` on 127.0.0.1 (proxy -> link -> websocket -> server ->
  kernel control channel up, IOPub down -> the kernel's forwarder -> TCP).

Measures the median round trip of a 64-byte message (a DAP request is 100-500 bytes) and the
echo throughput of N MiB (sent and read back at once). Prints the load average with the figures:
the machine is shared, so read the same-run ratios.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import colabmagic
from colabmagic.testing_jupyter import jupyter_server

ECHO = """\
import socket as _s, threading as _t
def _echo_serve(srv):
    while True:
        c, _ = srv.accept()
        def run(c=c):
            c.setsockopt(_s.IPPROTO_TCP, _s.TCP_NODELAY, 1)
            while (d := c.recv(1 << 20)):
                c.sendall(d)
            c.close()
        _t.Thread(target=run, daemon=True).start()
_echo = _s.socket(); _echo.bind(("127.0.0.1", 0)); _echo.listen(8)
_t.Thread(target=_echo_serve, args=(_echo,), daemon=True).start()
print(_echo.getsockname()[1])
"""


def measure(port: int, n: int, mib: int) -> tuple[float, float]:
    """(median round trip in ms of a 64-byte message, echo MiB/s) against 127.0.0.1:*port*."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=120)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"x" * 64
    samples = []
    for i in range(n + 20):
        t = time.perf_counter()
        conn.sendall(msg)
        got = 0
        while got < len(msg):
            got += len(conn.recv(65536))
        if i >= 20:  # warm-up excluded
            samples.append(time.perf_counter() - t)
    payload = os.urandom(mib << 20)

    def send() -> None:
        view = memoryview(payload)
        for off in range(0, len(view), 1 << 20):
            conn.sendall(view[off : off + (1 << 20)])

    t = time.perf_counter()
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    got = 0
    while got < len(payload):
        got += len(conn.recv(1 << 20))
    seconds = time.perf_counter() - t
    sender.join()
    conn.close()
    return statistics.median(samples) * 1000, mib / seconds


def direct(n: int, mib: int) -> tuple[float, float]:
    ns: dict = {}
    exec(compile(ECHO.replace("print(", "ns_port = ("), "<echo>", "exec"), ns)
    return measure(ns["ns_port"], n, mib)


def through(session, n: int, mib: int) -> tuple[float, float]:
    remote_port = int(session.run(ECHO).stdout)
    return measure(session.proxy.forward(remote_port), n, mib)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=300, help="round trips per transport")
    parser.add_argument("--mib", type=int, default=32, help="MiB echoed per transport")
    args = parser.parse_args()
    rows = {"direct": direct(args.n, args.mib)}
    with tempfile.TemporaryDirectory() as tmp, jupyter_server(Path(tmp)) as srv:
        s = colabmagic.connect(local=True, root=str(Path(tmp) / "agents"), register=False)
        try:
            rows["local"] = through(s, args.n, args.mib)
        finally:
            s.close()
        os.environ["JUPYTER_TOKEN"] = srv.token
        s = colabmagic.connect(srv.url, register=False, connect_timeout=180)
        try:
            rows["jupyter"] = through(s, args.n, args.mib)
        finally:
            s.close()
    print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'path':<8} {'RTT 64 B (ms)':>14} {'echo (MiB/s)':>13} {'RTT vs local':>13}")
    for name, (rtt, rate) in rows.items():
        ratio = rtt / rows["local"][0]
        print(f"{name:<8} {rtt:>14.2f} {rate:>13.1f} {ratio:>12.2f}x")


if __name__ == "__main__":
    main()
