"""Round trip and push/pull through a Jupyter server, against a direct kernel, in one run.

Run: ``python benchmarks/jupyter_server.py [--n 200] [--rounds 5] [--mib 64] [--cpu]``

Starts a real ``jupyter server`` on 127.0.0.1 (token auth) and measures:

- ``direct``: jupyter_client ``execute_interactive("pass")`` on a kernel started by
  ``KernelManager`` (no server, no colabmagic) -- the reference;
- ``colabmagic``: ``Session.run("pass")`` through the Jupyter-server transport (proxy -> link ->
  kernel websocket with TCP_NODELAY/TCP_QUICKACK -> server -> kernel), as ``%%gpu_run`` does;
- ``bare websocket``: a plain websocket-client (JSON frames, TCP_NODELAY and TCP_QUICKACK) on a
  plain kernel of the same server, sending the same request: the floor of any client through the
  server, i.e. what the server hop itself costs;
- ``naive websocket``: that client with TCP_NODELAY turned off, as a client that leaves Nagle on
  meets the server; and with TCP_NODELAY on (no QUICKACK);
- push/pull of an N MiB array through the server (binary websocket buffers), against the same
  through ``--local`` (proxy -> bridge -> agent), the reference for bulk bytes.

The reference, the server path, the ``--local`` link and the bare client are timed in
alternating blocks (``--rounds``), so that load drifting on a shared machine hits them alike.
Prints medians, ratios and the load average; with ``--cpu`` also the CPU per round trip of the
server, the kernels and agents, and this process thread by thread (from ``/proc``, Linux).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from jupyter_client import KernelManager
from roundtrip import median_ms, push_pull  # beside this file: the --local link benchmark

import colabmagic
from colabmagic.relay import QuietRelay
from colabmagic.testing_jupyter import jupyter_server


class Direct:
    """The reference: jupyter_client ``execute_interactive("pass")`` on a KernelManager kernel."""

    def __init__(self) -> None:
        self.km = KernelManager()
        self.km.start_kernel()
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)

    def once(self) -> None:
        self.kc.execute_interactive("pass", output_hook=lambda m: None)

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def interleaved(
    fns: dict, n: int, rounds: int, cpu: CpuSplit | None = None
) -> dict[str, list[float]]:
    """Round trips of each callable, *rounds* alternating blocks of n/rounds each.

    The machine is shared: load drifts over a run, and blocks that alternate see the same drift,
    so the ratio of their medians is fair where two back-to-back runs are not. With *cpu*, the
    CPU each block used is added to ``cpu.used[name]``, by component.
    """
    for fn in fns.values():
        for _ in range(10):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    per = max(n // rounds, 1)
    for _ in range(rounds):
        for name, fn in fns.items():
            before = cpu.snapshot() if cpu else None
            for _ in range(per):
                t = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t)
            if cpu:
                cpu.add(name, before, cpu.snapshot())
    return samples


def _cpu_seconds(stat_path: str) -> float:
    fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuSplit:
    """``--cpu``: CPU seconds by component while each kind of round trip runs: the server's
    process, every other process under this one or the server (the kernels, the ``--local``
    agent), and this process thread by thread (named as Python names them)."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.used: dict[str, dict[str, float]] = {}

    def _others(self) -> list[int]:
        parent = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    parent[int(name)] = int(
                        Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1]
                    )
                except (OSError, IndexError, ValueError):
                    continue
        roots, out = {os.getpid(), self.server_pid}, []
        for pid in parent:
            p = parent.get(pid)
            while p and p not in roots:
                p = parent.get(p)
            if p and pid != self.server_pid:
                out.append(pid)
        return out

    def snapshot(self) -> dict[str, float]:
        snap = {"server": _cpu_seconds(f"/proc/{self.server_pid}/stat"), "kernels etc.": 0.0}
        for pid in self._others():
            with contextlib.suppress(OSError):
                snap["kernels etc."] += _cpu_seconds(f"/proc/{pid}/stat")
        names = {t.native_id: t.name.split(" (")[0] for t in threading.enumerate()}
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):
                key = "here: " + names.get(int(tid), f"thread {tid}")
                snap[key] = snap.get(key, 0.0) + _cpu_seconds(f"/proc/self/task/{tid}/stat")
        return snap

    def add(self, name: str, before: dict, after: dict) -> None:
        used = self.used.setdefault(name, {})
        for key, value in after.items():
            used[key] = used.get(key, 0.0) + value - before.get(key, 0.0)

    def report(self, counts: dict[str, int]) -> None:
        print("CPU per round trip, ms (--cpu; this process by thread):")
        for name, used in self.used.items():
            n = counts[name]
            here = sum(v for k, v in used.items() if k.startswith("here: "))
            threads = sorted(
                ((v, k[6:]) for k, v in used.items() if k.startswith("here: ")), reverse=True
            )
            parts = ", ".join(f"{k} {v * 1e3 / n:.2f}" for v, k in threads if v * 1e3 / n >= 0.05)
            server, others = used["server"] * 1e3 / n, used["kernels etc."] * 1e3 / n
            print(f"  {name:7s} server {server:5.2f}  kernels etc. {others:5.2f}  "
                  f"here {here * 1e3 / n:5.2f} ({parts})")  # fmt: skip


class Naive:
    """A plain websocket client: JSON frames, one request, wait for its reply and idle.

    It sends the request ``Session.run`` and the reference send (``store_history=True``: the
    kernel writes its history database, about 1.5 ms of a round trip here), so with TCP_NODELAY
    and TCP_QUICKACK it is the floor of any client through the server: what the server hop
    itself costs, with no proxy, no journal and no bootstrap in the kernel.
    """

    def __init__(self, server, kernel_id: str, *, nodelay: bool, quickack: bool = False) -> None:
        import websocket

        self.ws = websocket.create_connection(
            f"ws://127.0.0.1:{server.port}/api/kernels/{kernel_id}/channels"
            f"?session_id={uuid.uuid4().hex}",
            header=[f"Authorization: token {server.token}"],
            timeout=120,
        )
        # websocket-client turns TCP_NODELAY on by default; a naive client in most stacks has it
        # off.
        self.ws.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if nodelay else 0)
        self.quickack = quickack
        self.session = uuid.uuid4().hex

    def once(self) -> None:
        ws, msg_id = self.ws, uuid.uuid4().hex
        header = {
            "msg_id": msg_id,
            "msg_type": "execute_request",
            "username": "bench",
            "session": self.session,
            "date": "",
            "version": "5.3",
        }
        content = {"code": "pass", "silent": False, "store_history": True}
        content.update(user_expressions={}, allow_stdin=False, stop_on_error=True)
        msg = {
            "header": header,
            "parent_header": {},
            "metadata": {},
            "content": content,
            "channel": "shell",
        }
        ws.send(json.dumps(msg))
        reply = idle = False
        while not (reply and idle):
            got = json.loads(ws.recv())
            if self.quickack:  # Linux clears it after a while: re-arm after every read, as we do
                ws.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            if got.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = got["header"]["msg_type"]
            reply = reply or kind == "execute_reply"
            idle = idle or (kind == "status" and got["content"]["execution_state"] == "idle")

    def median(self, n: int) -> float:
        for _ in range(5):
            self.once()
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            self.once()
            samples.append(time.perf_counter() - t)
        return median_ms(samples)

    def close(self) -> None:
        self.ws.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="cells per measurement")
    p.add_argument("--rounds", type=int, default=5, help="alternating blocks (see interleaved)")
    p.add_argument("--mib", type=int, default=64, help="payload size for push/pull")
    p.add_argument("--cpu", action="store_true", help="also CPU per round trip, by component")
    args = p.parse_args()
    payload = np.random.default_rng(0).integers(0, 255, args.mib << 20, dtype=np.uint8)
    quiet = QuietRelay()
    load = [os.getloadavg()[0]]
    n_slow: list[float] = []
    n_fast: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        with jupyter_server(Path(tmp) / "server") as server:
            os.environ["JUPYTER_TOKEN"] = server.token
            ref = Direct()
            s = colabmagic.connect(server.url, register=False, connect_timeout=180)
            local = colabmagic.connect(local=True, root=str(Path(tmp) / "root"), register=False)
            _, model = server.request("POST", "api/kernels", {})  # a plain kernel, no bootstrap
            bare = Naive(server, model["id"], nodelay=True, quickack=True)
            cpu = CpuSplit(server.proc.pid) if args.cpu else None
            try:
                rt = interleaved(
                    {
                        "direct": ref.once,
                        "server": lambda: s.run("pass", relay=quiet),
                        "local": lambda: local.run("pass", relay=quiet),
                        "bare": bare.once,
                    },
                    args.n,
                    args.rounds,
                    cpu,
                )
                load.append(os.getloadavg()[0])
                c_push, c_pull = push_pull(s, payload)
                l_push, l_pull = push_pull(local, payload)
            finally:
                bare.close()
                s.close()
                local.close()
                ref.close()
            for nodelay, n in ((False, max(args.n // 4, 20)), (True, args.n)):
                client = Naive(server, model["id"], nodelay=nodelay)
                try:
                    (n_slow if not nodelay else n_fast).append(client.median(n))
                finally:
                    client.close()
            server.request("DELETE", f"api/kernels/{model['id']}")
            load.append(os.getloadavg()[0])
    d, c, lo, b = (median_ms(rt[k]) for k in ("direct", "server", "local", "bare"))
    slow, fast = n_slow[0], n_fast[0]
    print(f"load average (1 min) at start / after round trips / end: {load[0]:.2f} / "
          f"{load[1]:.2f} / {load[2]:.2f}")  # fmt: skip
    print(f"round trip of `pass`, median of {len(rt['direct'])} each, in {args.rounds} "
          "alternating blocks:")  # fmt: skip
    print(f"  direct jupyter_client                  {d:7.2f} ms")
    print(f"  colabmagic through the server          {c:7.2f} ms   ratio {c / d:.2f}x "
          "(target <= 1.3x)")  # fmt: skip
    print(f"  colabmagic --local link                {lo:7.2f} ms   ratio {lo / d:.2f}x")
    print(f"  bare websocket client, NODELAY+QUICKACK{b:7.2f} ms   ratio {b / d:.2f}x "
          "(the server hop's floor: a plain kernel, JSON frames, nothing else)")  # fmt: skip
    print("  the same plain client after the above, on the same kernel:")
    print(f"  naive websocket, no TCP_NODELAY        {slow:7.2f} ms   ratio {slow / d:.2f}x")
    print(f"  naive websocket, TCP_NODELAY           {fast:7.2f} ms   ratio {fast / d:.2f}x")
    if cpu:
        cpu.report({k: len(v) for k, v in rt.items()})
    print(f"push/pull of {args.mib} MiB, median of 3:")
    print(f"  push through the server   {c_push:7.0f} MiB/s   (--local link {l_push:.0f} MiB/s)")
    print(f"  pull through the server   {c_pull:7.0f} MiB/s   (--local link {l_pull:.0f} MiB/s)")


if __name__ == "__main__":
    main()
