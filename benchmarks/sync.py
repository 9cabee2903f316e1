"""Project sync of a 2,000-file project: no change, one file changed, against a one-cell round trip.

Run: ``python benchmarks/sync.py [--files 2000] [--rtt-ms 50] [--repeat 7]``

Makes a project of N small Python files (a real git repository, so ``git ls-files`` lists it), and
on three links -- a local kernel, SSH on loopback (a private OpenSSH sshd), and the same sshd
through :class:`colabmagic.testing_wan.WanRelay` at the given round-trip time -- measures, in one
run:

- **cell**: ``Session.run("pass")``, one request/response: the floor any sync pays;
- **no change**: ``Syncer.up()`` when nothing changed (the issue's target: <= 2 round trips, no
  file data, hashing of changed candidates only);
- **1 changed**: one file edited (same size, so it is also hashed on both sides), then synced;
- **first**: the initial sync of all N files (once);
- **upload**: ``Session.upload`` of the whole directory (what a user did by hand before), once;
- **list**: the local part alone (``git ls-files`` and a stat of every file), once per run.

Prints medians, the ratio to **cell**, the request count, and (through the relay) the turns and
bytes the link carried. Record ``uptime`` with the figures: the machine is shared.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from colabmagic import sync
from colabmagic.ignore import IgnoreRules
from colabmagic.relay import QuietRelay
from colabmagic.session import Session
from colabmagic.testing_sshd import SSHServer
from colabmagic.testing_wan import WanRelay
from colabmagic.transport.local import LocalTransport
from colabmagic.transport.ssh import SSHTransport


def make_project(root: str, n: int) -> None:
    for i in range(n):
        d = os.path.join(root, f"pkg{i // 100}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"mod{i}.py"), "w") as f:
            f.write(f"def f{i}(x):\n    return x + {i % 10}\n")
    subprocess.run(["git", "init", "-q", root], check=True)


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def measure(label: str, session: Session, project: str, remote: str, args, wan=None) -> None:
    s = sync.Syncer(session, project, remote)
    cell = median_ms(lambda: session.run("pass", relay=QuietRelay()), args.repeat)
    t = time.perf_counter()
    first = s.up()
    first_ms = (time.perf_counter() - t) * 1000
    assert len(first.sent) == args.files, first.summary()
    cell_turns = None
    if wan is not None:
        wan.reset_counters()
        session.run("pass", relay=QuietRelay())
        cell_turns = wan.round_trips()
        wan.reset_counters()
    res = s.up()
    turns = (wan.round_trips(), wan.bytes_up, wan.bytes_down) if wan is not None else None
    assert res.requests == 1, res
    assert res.bytes == 0, res
    none_ms = median_ms(s.up, args.repeat)

    list_ms = median_ms(lambda: IgnoreRules(project).files(), args.repeat)
    i = args.files // 2
    rel = f"pkg{i // 100}/mod{i}.py"
    target = os.path.join(project, rel)
    flip = [0]

    def one_changed() -> None:
        flip[0] += 1
        with open(target, "w") as f:  # same size each time: hashed on both sides, then sent
            f.write(f"def f{i}(x):\n    return x + {flip[0] % 10}\n")
        r = s.up()
        assert r.sent == [rel], r.summary()

    one_ms = median_ms(one_changed, args.repeat)
    t = time.perf_counter()
    session.upload(project, remote + "-upload")
    upload_ms = (time.perf_counter() - t) * 1000
    print(
        f"{label:<22} {cell:8.1f} {none_ms:10.1f} ({none_ms / cell:4.1f}x) "
        f"{one_ms:10.1f} ({one_ms / cell:4.1f}x) {first_ms:9.0f} {upload_ms:9.0f} {list_ms:7.1f}",
        end="",
    )
    if turns is not None:
        print(
            f"   no-change sync: {turns[0]} link turns (a cell: {cell_turns}), "
            f"{turns[1]} B up, {turns[2]} B down",
            end="",
        )
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--rtt-ms", type=float, default=50.0)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    print(f"project: {args.files} files; times are medians of {args.repeat} (ms)")
    print(
        f"{'link':<22} {'cell':>8} {'no change':>17} {'1 changed':>17} {'first':>9} {'upload':>9}"
        f" {'list':>7}"
    )
    work = tempfile.mkdtemp(prefix="colabmagic-bench-sync-")
    root = os.path.join(work, "kernels")
    project = os.path.join(work, "proj")
    make_project(project, args.files)
    srv = SSHServer("box", directory=os.path.join(work, "sshd")).start()
    try:
        s = Session.start(LocalTransport(root=root), name="bench-local")
        try:
            measure("local kernel", s, project, os.path.join(work, "r-local"), args)
        finally:
            s.close()
        ssh = SSHTransport(srv.name, ssh_config=srv.ssh_config, python=sys.executable, root=root)
        s = Session.start(ssh, name="bench-ssh")
        try:
            measure("ssh loopback", s, project, os.path.join(work, "r-ssh"), args)
        finally:
            s.close()
        with WanRelay(("127.0.0.1", srv.port), delay=args.rtt_ms / 2000) as wan:
            cfg = os.path.join(work, "wan_config")
            hop = f"{sys.executable} -m colabmagic.testing_wan --delay 0 127.0.0.1 {wan.port}"
            with open(cfg, "w") as f:
                f.write(srv.config_block(ProxyCommand=hop))
            ssh = SSHTransport(srv.name, ssh_config=cfg, python=sys.executable, root=root)
            s = Session.start(ssh, name="bench-wan")
            try:
                label = f"ssh, {args.rtt_ms:g} ms RTT relay"
                measure(label, s, project, os.path.join(work, "r-wan"), args, wan=wan)
            finally:
                s.close()
    finally:
        srv.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
