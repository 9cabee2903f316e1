"""Per-cell round trip and push/pull throughput through the local link, against a direct kernel.

Run: ``python benchmarks/roundtrip.py [--n 200] [--mib 256]``

Measured in one run, on this machine:
- ``direct``: jupyter_client ``execute_interactive("pass")`` on a kernel started by
  ``KernelManager`` (no colabmagic in the path) -- the reference;
- ``link``: ``Session.run("pass")`` through proxy -> bridge -> agent -> kernel, as ``%%gpu_run``
  does;
- ``comm``: a comm message carrying N MiB to the direct kernel and its acknowledgement (the
  reference for bulk bytes), against ``Session.push``/``Session.pull`` of an N MiB array.

Prints medians and the ratios the targets are stated in.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid

import numpy as np
import zmq
from jupyter_client import KernelManager

import colabmagic
from colabmagic.relay import QuietRelay

ACK_TARGET = """
import numpy as _np
def _bench_open(comm, msg):
    def on_msg(m):
        size = m["content"]["data"].get("send_back")
        if size:  # kernel -> client: the reference for pull
            comm.send({"n": size}, buffers=[_np.ones(size, dtype=_np.uint8).data])
        else:     # client -> kernel: the reference for push
            comm.send({"n": sum(len(b) for b in m["buffers"])})
    comm.on_msg(on_msg)
get_ipython().kernel.comm_manager.register_target("bench", _bench_open)
"""


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def direct(n: int, payload: np.ndarray) -> tuple[float, float, float]:
    km = KernelManager()
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    try:
        for _ in range(10):
            kc.execute_interactive("pass", output_hook=lambda m: None)
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            kc.execute_interactive("pass", output_hook=lambda m: None)
            samples.append(time.perf_counter() - t)
        kc.execute_interactive(ACK_TARGET, output_hook=lambda m: None)
        comm_id = uuid.uuid4().hex
        kc.session.send(
            kc.shell_channel.socket,
            "comm_open",
            {"comm_id": comm_id, "target_name": "bench", "data": {}},
        )
        to_kernel, from_kernel = [], []
        for data, buffers, rates in (
            ({}, [payload.data], to_kernel),
            ({"send_back": payload.nbytes}, [], from_kernel),
        ):
            for _ in range(3):
                t = time.perf_counter()
                msg = kc.session.msg("comm_msg", {"comm_id": comm_id, "data": data})
                kc.session.send(kc.shell_channel.socket, msg, buffers=buffers)
                while True:
                    _, reply = kc.session.recv(kc.iopub_channel.socket, 0, copy=False)
                    if reply["header"]["msg_type"] == "comm_msg":
                        break
                rates.append(payload.nbytes / 2**20 / (time.perf_counter() - t))
                del reply
        return median_ms(samples), statistics.median(to_kernel), statistics.median(from_kernel)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def push_pull(s, payload: np.ndarray) -> tuple[float, float]:
    """Median MiB/s of three ``Session.push`` and three ``Session.pull`` of *payload*."""
    push, pull = [], []
    for _ in range(3):
        t = time.perf_counter()
        s.push(payload=payload)
        push.append(payload.nbytes / 2**20 / (time.perf_counter() - t))
        t = time.perf_counter()
        back = s.pull("payload")
        pull.append(payload.nbytes / 2**20 / (time.perf_counter() - t))
        assert back.nbytes == payload.nbytes
        del back
    return statistics.median(push), statistics.median(pull)


def link(n: int, payload: np.ndarray, root: str) -> tuple[float, float, float]:
    s = colabmagic.connect(local=True, root=root, register=False)
    try:
        quiet = QuietRelay()
        for _ in range(10):
            s.run("pass", relay=quiet)
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            s.run("pass", relay=quiet)
            samples.append(time.perf_counter() - t)
        return median_ms(samples), *push_pull(s, payload)
    finally:
        s.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="cells per measurement")
    p.add_argument("--mib", type=int, default=256, help="payload size for push/pull")
    args = p.parse_args()
    payload = np.random.default_rng(0).integers(0, 255, args.mib << 20, dtype=np.uint8)
    with tempfile.TemporaryDirectory() as root:
        d_rt, d_comm, d_back = direct(args.n, payload)
        l_rt, l_push, l_pull = link(args.n, payload, root)
    print(f"round trip of `pass`, median of {args.n}:")
    print(f"  direct jupyter_client     {d_rt:7.2f} ms")
    print(f"  %%gpu_run through link    {l_rt:7.2f} ms   ratio {l_rt / d_rt:.2f}x (target <= 1.3x)")
    print(f"bulk transfer of {args.mib} MiB, median of 3:")
    print(f"  direct comm to kernel     {d_comm:7.0f} MiB/s")
    print(f"  direct comm from kernel   {d_back:7.0f} MiB/s")
    print(
        f"  push through link         {l_push:7.0f} MiB/s   ratio {l_push / d_comm:.2f}x "
        "to-kernel (target >= 0.5x)"
    )
    print(
        f"  pull through link         {l_pull:7.0f} MiB/s   ratio {l_pull / d_back:.2f}x "
        f"from-kernel, {l_pull / d_comm:.2f}x to-kernel (target >= 0.5x)"
    )
    _ = zmq  # keep the import explicit: the reference path is plain pyzmq under jupyter_client


if __name__ == "__main__":
    main()
