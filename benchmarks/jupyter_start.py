"""Kernel start through a Jupyter server: healthy, and dead on arrival, in one run.

Run: ``python benchmarks/jupyter_start.py [--n 8] [--budget 20] [--skip-doa]``

Starts a real ``jupyter server`` on 127.0.0.1 (token auth) and measures, as users meet it:

- ``bare``: ``POST /api/kernels`` then a plain tornado websocket asking ``kernel_info`` until the
  reply: the floor of any client, and the figure the start budget is chosen against;
- ``check``: ``JupyterTransport.start_kernel`` (POST + the start check, which waits for the same
  reply on the websocket the link then goes on with);
- ``connect``: ``colabmagic.connect(url)`` until the session is ready (the check, the link's
  bootstrap of the kernel helpers, the first round trip);

alternating per round, so load drift hits them alike; then, with stand-in kernelspecs
(``colabmagic.testing_standin_kernel``), the time ``connect`` takes when the first kernel hangs
(one automatic restart), when every kernel hangs, and when it exits as it starts, against the 60 s
connect timeout such a kernel used to cost (120 s measured before this check: the proxy's own
60 s wait, then the session's). Prints medians, maxima, CPU seconds and the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import colabmagic
from colabmagic.errors import ConnectError
from colabmagic.testing_jupyter import jupyter_server
from colabmagic.testing_standin_kernel import install_kernelspec
from colabmagic.transport.jupyter import JupyterTransport


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu() -> float:
    """CPU seconds of this process and its finished children (the server's are not counted)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime


async def _bare_kernel_info(url: str, token: str, kernel_id: str) -> None:
    from tornado import httpclient, websocket

    ws_url = url.replace("http", "ws", 1) + f"api/kernels/{kernel_id}/channels"
    request = httpclient.HTTPRequest(
        f"{ws_url}?session_id={uuid.uuid4().hex}",
        headers={"Authorization": f"token {token}"},
        request_timeout=120,
    )
    ws = await websocket.websocket_connect(request)
    msg_id = uuid.uuid4().hex
    header = {"msg_id": msg_id, "msg_type": "kernel_info_request", "session": "b"}
    header.update(username="b", version="5.3", date="")
    msg = {"header": header, "parent_header": {}, "metadata": {}, "content": {}}
    await ws.write_message(json.dumps({**msg, "channel": "shell"}))
    while True:
        data = await ws.read_message()
        if isinstance(data, str):
            reply = json.loads(data)
            if reply.get("parent_header", {}).get("msg_id") == msg_id:
                if reply["header"]["msg_type"] == "kernel_info_reply":
                    break
    ws.close()


def bare(srv) -> float:
    t0 = time.perf_counter()
    _, model = srv.request("POST", "api/kernels", {"name": "python3"})
    asyncio.run(_bare_kernel_info(srv.url, srv.token, model["id"]))
    took = time.perf_counter() - t0
    srv.request("DELETE", f"api/kernels/{model['id']}")
    return took


def check(srv, budget: float) -> float:
    t = JupyterTransport(srv.url, start_timeout=budget)
    try:
        t0 = time.perf_counter()
        kernel_id = t.start_kernel()
        took = time.perf_counter() - t0
    finally:
        t.close()
    t.rest.delete(kernel_id)
    return took


def connect(srv, budget: float, **options) -> tuple[float, str]:
    t0 = time.perf_counter()
    try:
        s = colabmagic.connect(srv.url, register=False, start_timeout=budget, **options)
    except ConnectError as exc:
        return time.perf_counter() - t0, f"error: {exc}"
    took = time.perf_counter() - t0
    note = s.transport.start_note(s.kernel_id) or "first kernel answered"
    s.close()
    return took, note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="healthy starts per method")
    ap.add_argument("--budget", type=float, default=20.0, help="start_timeout for the check")
    ap.add_argument("--skip-doa", action="store_true", help="only the healthy starts")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        data = base / "data"
        os.environ["JUPYTER_PATH"] = str(data)
        with jupyter_server(base / "server") as srv:
            os.environ["JUPYTER_TOKEN"] = srv.token
            print(f"load average at start: {load()}")
            times: dict[str, list[float]] = {"bare": [], "check": [], "connect": []}
            c0 = cpu()
            for _ in range(args.n):
                times["bare"].append(bare(srv))
                times["check"].append(check(srv, args.budget))
                times["connect"].append(connect(srv, args.budget)[0])
            c1 = cpu()
            ref = statistics.median(times["bare"])
            print(f"healthy starts of 'python3', n={args.n} each (seconds):")
            for name, ts in times.items():
                med = statistics.median(ts)
                print(f"  {name:8s} median {med:5.2f}  max {max(ts):5.2f}  ({med / ref:.2f}x bare)")
            print(f"  this process's CPU for all of them: {c1 - c0:.1f}s; load {load()}")
            print(
                f"  budget {args.budget:g}s = {args.budget / max(times['bare']):.0f}x the slowest "
                "bare start"
            )
            if args.skip_doa:
                return
            print("dead on arrival (stand-in kernels), colabmagic.connect until ready or error:")
            for mode in ("hang-once", "hang", "exit"):
                name = f"standin-{mode}"
                install_kernelspec(data, name, mode, base / f"state-{mode}")
                c0 = cpu()
                took, what = connect(srv, args.budget, kernel_name=name)
                print(
                    f"  {mode:9s} {took:5.1f}s (CPU {cpu() - c0:.1f}s, load {load()}): {what[:110]}"
                )
            left = srv.kernel_ids()
            print(f"kernels left on the server: {len(left)}")


if __name__ == "__main__":
    main()
