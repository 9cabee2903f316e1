"""Where a ``pass`` round trip through a Jupyter server spends its time, hop by hop.

Run: ``python benchmarks/jupyter_trace.py [--n 400]``

A diagnostic companion to ``benchmarks/jupyter_server.py`` (which gives the ratios the issue's
target is about). It starts a real ``jupyter server`` on 127.0.0.1, a colabmagic session through
it and, on a plain kernel of the same server, the bare websocket client of that benchmark; the two
run ``pass`` alternately. Timestamps (``time.time()``, the clock of the kernel's header dates) are
taken by wrapping, in this process only:

- ``Session.run`` entry and return;
- ``KernelLink.submit`` (the link took the request from the Session's lane,
  ``colabmagic/transport/jupyter_lane.py``) and the websocket write;
- ``Proxy.publish`` and ``Lane.deliver`` (the link hands a kernel message on: IOPub to every
  subscriber, the reply to the Session's lane);
- ``KernelLink._on_ws`` (a kernel message arrived from the server);

and the kernel's own header dates of its busy and idle status and execute_reply. Medians per
segment are printed for both clients and their difference. The wrappers cost a few microseconds
each, so the totals run a little above ``jupyter_server.py``'s.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import tornado.websocket

import colabmagic
from colabmagic import proxy as _proxy
from colabmagic.relay import QuietRelay
from colabmagic.testing_jupyter import jupyter_server
from colabmagic.transport import jupyter_lane as _lane
from colabmagic.transport import jupyter_link as _link

marks: list[tuple[float, str]] = []
writes: list[tuple[float, object]] = []


def _wrap(cls, name: str, tag: str) -> None:
    original = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        marks.append((time.time(), tag))
        return original(self, *args, **kwargs)

    setattr(cls, name, wrapper)


def _kernel_date(header: dict) -> float:
    return datetime.datetime.fromisoformat(header["date"].replace("Z", "+00:00")).timestamp()


def _bare_client_class():
    """The bare websocket client of ``benchmarks/jupyter_server.py`` (beside this file)."""
    path = Path(__file__).with_name("jupyter_server.py")
    spec = importlib.util.spec_from_file_location("_jupyter_server_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Naive


def _decode(data) -> tuple[dict, dict]:
    parts = (_link.decode_v1 if isinstance(data, bytes) else _link.decode_json)(data)[1]
    return json.loads(bytes(parts[0])), json.loads(bytes(parts[3]))


def _kernel_side(msgs: list[tuple[float, dict, dict]]) -> dict | None:
    """Arrival times and kernel dates of busy, execute_reply and idle, from (t, header, content)."""
    found = {}
    for t, header, content in msgs:
        kind = header["msg_type"]
        if kind == "status":
            kind = content.get("execution_state")
        if kind in ("busy", "execute_reply", "idle") and kind not in found:
            found[kind] = (t, _kernel_date(header))
    return found if len(found) == 3 else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=400, help="round trips per client")
    args = p.parse_args()
    _wrap(_link.KernelLink, "submit", "link_submit")
    _wrap(_proxy.Proxy, "publish", "handed_on")
    _wrap(_lane.Lane, "deliver", "handed_on")
    original_write = tornado.websocket.WebSocketClientConnection.write_message

    def write_message(self, message, binary=False):
        writes.append((time.time(), message))
        return original_write(self, message, binary)

    tornado.websocket.WebSocketClientConnection.write_message = write_message
    arrivals: list[tuple[float, object]] = []
    bare_arrivals: list[tuple[float, str]] = []
    ours: list[dict] = []
    bare_rows: list[dict] = []
    quiet = QuietRelay()
    with tempfile.TemporaryDirectory() as tmp, jupyter_server(Path(tmp) / "server") as server:
        os.environ["JUPYTER_TOKEN"] = server.token
        s = colabmagic.connect(server.url, register=False, connect_timeout=180)
        link = s.transport.links[s.kernel_id]
        on_ws = link._on_ws

        def traced_on_ws(att, data):
            arrivals.append((time.time(), data))
            return on_ws(att, data)

        link._on_ws = traced_on_ws
        _, model = server.request("POST", "api/kernels", {})
        bare = _bare_client_class()(server, model["id"], nodelay=True, quickack=True)
        recv = bare.ws.recv

        def traced_recv():
            data = recv()
            bare_arrivals.append((time.time(), data))
            return data

        bare.ws.recv = traced_recv
        try:
            for _ in range(30):
                s.run("pass", relay=quiet)
                bare.once()
            for _ in range(args.n):
                for log in (writes, arrivals, marks):
                    log.clear()
                t0 = time.time()
                s.run("pass", relay=quiet)
                t1 = time.time()
                sent = [t for t, m in writes if b"execute_request" in _as_bytes(m)]
                kernel = _kernel_side([(t, *_decode(d)) for t, d in arrivals])
                tags = {}
                for t, tag in marks:
                    tags.setdefault(tag, []).append(t)
                if sent and kernel and {"link_submit", "handed_on"} <= set(tags):
                    last = max(kernel["execute_reply"][0], kernel["idle"][0])
                    ours.append(
                        {
                            "Session.run -> link": tags["link_submit"][0] - t0,
                            "link -> websocket write": sent[0] - tags["link_submit"][0],
                            "websocket write -> kernel busy": kernel["busy"][1] - sent[0],
                            "kernel busy -> idle": kernel["idle"][1] - kernel["busy"][1],
                            "kernel idle -> here": kernel["idle"][0] - kernel["idle"][1],
                            "last message -> handed on": tags["handed_on"][-1] - last,
                            "handed on -> Session.run returns": t1 - tags["handed_on"][-1],
                            "total": t1 - t0,
                        }
                    )
                bare_arrivals.clear()
                t0 = time.time()
                bare.once()
                t1 = time.time()
                msgs = [(t, m["header"], m["content"]) for t, m in _json(bare_arrivals)]
                kernel = _kernel_side(msgs)
                if kernel:
                    last = max(kernel["execute_reply"][0], kernel["idle"][0])
                    bare_rows.append(
                        {
                            "websocket write -> kernel busy": kernel["busy"][1] - t0,
                            "kernel busy -> idle": kernel["idle"][1] - kernel["busy"][1],
                            "kernel idle -> here": kernel["idle"][0] - kernel["idle"][1],
                            "handed on -> Session.run returns": t1 - last,
                            "total": t1 - t0,
                        }
                    )
        finally:
            bare.close()
            s.close()
            server.request("DELETE", f"api/kernels/{model['id']}")
    print(f"medians of {len(ours)} / {len(bare_rows)} round trips, load {os.getloadavg()[0]:.2f}")
    print(f"  {'segment':32s} {'colabmagic':>11s} {'bare client':>12s} {'difference':>11s}")
    for key in ours[0]:
        c = statistics.median(r[key] for r in ours) * 1e3
        b = statistics.median(r.get(key, 0.0) for r in bare_rows) * 1e3
        print(f"  {key:32s} {c:8.3f} ms {b:9.3f} ms {c - b:+8.3f} ms")
    print("  (bare client: 'handed on -> Session.run returns' is from its last message to return)")


def _as_bytes(message) -> bytes:
    return message if isinstance(message, bytes) else message.encode()


def _json(arrivals: list[tuple[float, str]]) -> list[tuple[float, dict]]:
    return [(t, json.loads(d)) for t, d in arrivals]


if __name__ == "__main__":
    main()
