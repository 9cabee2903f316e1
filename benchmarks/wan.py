"""colabmagic through an emulated WAN link: connect, re-attach, a cell, push and pull.

Run: ``python benchmarks/wan.py [--rtt 20,50,150] [--mib 32] [--mbit 50] [--cells 20] [--repeat 2]``

A private OpenSSH sshd on 127.0.0.1 (``colabmagic.testing_sshd``) and, in front of it, one
:class:`~colabmagic.testing_wan.WanRelay` per link: each RTT with no cap, and with a bandwidth cap
(``--mbit``). Every figure is taken through the relay, as a user on that link would see it:

- **connect**: ``Session.start`` of a new agent + kernel, from nothing (no SSH connection) to the
  first reply: wall time, and the round trips beyond SSH's own, counted by the relay (its turns
  minus those of a bare paramiko handshake + authentication through the same relay).
  Round trips are counted, not derived from ``(t(RTT) - t(0)) / RTT``: on a shared machine the
  kernel's and the remote Pythons' start times vary by more than the RTTs that formula resolves
  (it came out negative in trials).
- **re-attach**: ``Session.start(attach=ID)`` to that kernel from a fresh transport, the same way.
- **cell**: median ``Session.run("pass")`` (what ``%%gpu_run pass`` costs), in ms and in RTTs.
- **push / pull**: ``Session.push``/``pull`` of an N MiB float64 array: with the cap, as a
  fraction of the link rate; without it, in MB/s (there the relay's bounded queue, 256 KiB in
  flight per direction, is the link: at most about 256 KiB per one-way delay).

Connect times are the fastest of ``--repeat`` (the kernel's start time varies with the machine's
load; the turn counts do not).

After it comes ``benchmarks/wan_transfer.py``'s table (incompressible push/pull/upload/download
against the link rate, ``compress="auto"`` against ``"none"`` on compressible arrays) on the capped
link at 50 ms RTT; ``--no-transfer`` leaves it out.

The table is built from :data:`ROWS`, one function per row (``fn(bench, link) -> str``), so
further rows (e.g. streamed transfers) are one function and one ``Row(...)`` line each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from colabmagic.relay import QuietRelay
from colabmagic.session import Session
from colabmagic.testing_sshd import SSHServer
from colabmagic.testing_wan import WanRelay, ssh_handshake_round_trips
from colabmagic.transport.ssh import SSHTransport


@dataclass
class Link:
    """One emulated link: a relay with its ssh alias, and SSH's own handshake turns on it."""

    rtt: float  # seconds
    rate: float | None  # bytes/s, None: no cap
    relay: WanRelay
    config: str
    handshake: int
    cache: dict = field(default_factory=dict)


class Bench:
    """The sshd, the links, and helpers that row functions share."""

    def __init__(self, server: SSHServer, root: str, args: argparse.Namespace):
        self.server, self.root, self.args = server, root, args
        self.links: dict[tuple, Link] = {}

    def link(self, rtt: float, rate: float | None) -> Link:
        key = (rtt, rate)
        if key not in self.links:
            relay = WanRelay(("127.0.0.1", self.server.port), delay=rtt / 2, rate=rate).start()
            config = self.server.config_via(relay.port, f"wan{len(self.links)}")
            turns = ssh_handshake_round_trips(
                relay, user=self.server.user, key_file=self.server.client_key
            )
            self.links[key] = Link(rtt, rate, relay, config, turns)
        return self.links[key]

    def transport(self, link: Link) -> SSHTransport:
        alias = os.path.basename(link.config).removeprefix("ssh_config_")
        return SSHTransport(
            alias, ssh_config=link.config, python=sys.executable, root=self.root, connect_timeout=60
        )

    def connects(self, link: Link) -> dict:
        """Fastest connect and re-attach times (and most turns) on *link*, measured once."""
        if "connects" in link.cache:
            return link.cache["connects"]
        new, again, new_turns, again_turns = [], [], [], []
        for _ in range(self.args.repeat):
            link.relay.wait_quiet()
            link.relay.reset_counters()
            t0 = time.perf_counter()
            s = Session.start(self.transport(link), name="wan")
            new.append(time.perf_counter() - t0)
            new_turns.append(link.relay.round_trips() - link.handshake)
            kid = s.kernel_id
            s.close(keep=True)
            link.relay.wait_quiet()  # the close's traffic is off the emulated wire
            link.relay.reset_counters()
            t0 = time.perf_counter()
            s = Session.start(self.transport(link), name="wan", attach=kid)
            again.append(time.perf_counter() - t0)
            again_turns.append(link.relay.round_trips() - link.handshake)
            if "session" not in link.cache:
                link.cache["session"] = s  # kept for the cell and transfer rows
            else:
                s.close()
        link.cache["connects"] = {  # the fastest: the kernel's start time varies with load
            "connect": min(new),
            "attach": min(again),
            "connect_turns": max(new_turns),
            "attach_turns": max(again_turns),
        }
        return link.cache["connects"]

    def session(self, link: Link) -> Session:
        if "session" not in link.cache:
            link.cache["session"] = Session.start(self.transport(link), name="wan")
        return link.cache["session"]

    def close(self) -> None:
        for link in self.links.values():
            if "session" in link.cache:
                link.cache["session"].close()
            link.relay.stop()


def _connect_row(key: str) -> Callable[[Bench, Link], str]:
    def row(bench: Bench, link: Link) -> str:
        got = bench.connects(link)
        return f"{got[key]:.2f} s, {got[key + '_turns']} round trips"

    return row


def cell(bench: Bench, link: Link) -> str:
    s = bench.session(link)
    for _ in range(3):
        s.run("pass", relay=QuietRelay())
    times = []
    for _ in range(bench.args.cells):
        t0 = time.perf_counter()
        s.run("pass", relay=QuietRelay())
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return f"{med * 1000:.0f} ms = {med / link.rtt:.2f} RTT"


def _transfer_row(direction: str) -> Callable[[Bench, Link], str]:
    def row(bench: Bench, link: Link) -> str:
        s = bench.session(link)
        nbytes = bench.args.mib << 20
        arr = np.random.default_rng(0).random(nbytes // 8)
        if direction == "push":
            t0 = time.perf_counter()
            s.push(x=arr)
            dt = time.perf_counter() - t0
        else:
            if "pulled" not in link.cache:
                s.push(y=arr)
                link.cache["pulled"] = True
            t0 = time.perf_counter()
            back = s.pull("y")
            dt = time.perf_counter() - t0
            assert back.nbytes == nbytes
        rate = nbytes / dt
        if link.rate:
            return f"{rate / link.rate:.2f}x link ({rate / 1e6:.1f} MB/s)"
        return f"{rate / 1e6:.0f} MB/s"

    return row


@dataclass
class Row:
    """One table row: a label, its function, and whether it runs on the capped link."""

    label: str
    fn: Callable[[Bench, Link], str]
    capped: bool = False


ROWS: list[Row] = [
    Row("connect (new agent + kernel)", _connect_row("connect")),
    Row("re-attach", _connect_row("attach")),
    Row("cell `pass`", cell),
    Row("push N MiB, capped", _transfer_row("push"), capped=True),
    Row("pull N MiB, capped", _transfer_row("pull"), capped=True),
    Row("push N MiB, no cap", _transfer_row("push")),
    Row("pull N MiB, no cap", _transfer_row("pull")),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rtt", default="20,50,150", help="round-trip times in ms, comma-separated")
    ap.add_argument("--mib", type=int, default=32, help="array size for push/pull")
    ap.add_argument("--mbit", type=float, default=50.0, help="bandwidth cap of the capped link")
    ap.add_argument("--cells", type=int, default=20, help="cells per round-trip figure")
    ap.add_argument("--repeat", type=int, default=3, help="connects (and re-attaches) per link")
    ap.add_argument(
        "--no-transfer",
        action="store_true",
        help="leave out the streamed-transfer table (compression, files) at 50 ms RTT",
    )
    args = ap.parse_args()
    rtts = [float(x) / 1000 for x in args.rtt.split(",")]
    cap = args.mbit * 1e6 / 8
    load = os.getloadavg()
    with (
        tempfile.TemporaryDirectory(prefix="colabmagic-wan-") as tmp,
        SSHServer("box", directory=os.path.join(tmp, "sshd")) as server,
    ):
        bench = Bench(server, os.path.join(tmp, "kernels"), args)
        try:
            header = ["", *(f"RTT {r * 1000:g} ms" for r in rtts)]
            table = [header]
            for row in ROWS:
                label = row.label.replace("N MiB", f"{args.mib} MiB")
                if row.capped:
                    label = label.replace("capped", f"{args.mbit:g} Mbit/s")
                cells = [row.fn(bench, bench.link(r, cap if row.capped else None)) for r in rtts]
                table.append([label, *cells])
                print(f"  {label}: {' | '.join(cells)}", file=sys.stderr, flush=True)
            handshake = ", ".join(f"{bench.link(r, None).handshake}" for r in rtts)
        finally:
            bench.close()
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    print(
        f"\nload average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; after: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"SSH's own handshake + auth through each relay: {handshake} round trips (subtracted)\n")
    for i, r in enumerate(table):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    if not args.no_transfer:
        import wan_transfer  # beside this file: compression and resumable files on the capped link

        print()
        wan_transfer.report(mib=args.mib, rate=cap, delay=0.025)


if __name__ == "__main__":
    main()
