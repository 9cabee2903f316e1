"""Bulk transfers through an emulated WAN link: 50 Mbit/s, 50 ms round trip, in one run.

Run: ``python benchmarks/wan_transfer.py [--mib 32] [--rate 6250000] [--delay 0.025]``

Starts a private OpenSSH sshd on 127.0.0.1 (``colabmagic.testing_sshd``) and reaches it through
``python -m colabmagic.testing_wan --delay D --rate R`` as the SSH ProxyCommand (a separate
process, so the link's pacing does not share this process's GIL). Each row is a function of the
table :data:`ROWS`, returning ``(label, MB/s, reference label, reference MB/s, target)``:

- incompressible data (random bytes) pushed, pulled, uploaded and downloaded, against the
  link's rate (the issue's target: >= 0.9x);
- compressible data (a float32 array that is 90 % zeros; int8 class labels) pushed with
  ``compress="auto"`` against the same push with ``compress="none"`` (target: >= 3x), and
  pulled the same way;
- the bytes that crossed the link for each, from the transfer's own statistics.

``benchmarks/wan.py`` prints this table after its own (``--no-transfer`` leaves it out).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from colabmagic.session import Session
from colabmagic.testing_sshd import SSHServer
from colabmagic.transport.ssh import SSHTransport


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def sparse_f32(nbytes: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    a = rng.random(nbytes // 4, dtype=np.float32)
    a[rng.random(a.size) < 0.9] = 0
    return a


def labels_i8(nbytes: int) -> np.ndarray:
    return np.random.default_rng(4).integers(0, 10, nbytes, dtype=np.int8)


def noise(nbytes: int) -> np.ndarray:
    return np.random.default_rng(5).integers(0, 256, nbytes, dtype=np.uint8)


class Bench:
    """The session through the link and what the rows share."""

    def __init__(self, s: Session, root: str, size: int, link_rate: float, file_size: int):
        self.s, self.root, self.size, self.link = s, root, size, link_rate / 1e6
        self.file_size = file_size
        self.cache: dict = {}

    def mbs(self, secs: float) -> float:
        return self.size / secs / 1e6

    def push_pull(self, name: str, value: np.ndarray, mode: str) -> tuple:
        key = (name, mode)
        if key not in self.cache:
            up = _timed(lambda: self.s.push(**{name: value}, compress=mode))
            wire, up_via = self.s.bulk.last.wire_bytes / self.size, self.s.bulk.last.via
            down = _timed(lambda: self.s.pull(name, compress=mode))
            self.cache[key] = (self.mbs(up), self.mbs(down), wire, up_via, self.s.bulk.last.via)
        return self.cache[key]


def row_push_noise(b: Bench):
    up, _, _, via, _ = b.push_pull("noise", noise(b.size), "auto")
    return (f"push random (auto, via {via})", up, "link rate", b.link, ">= 0.9x")


def row_pull_noise(b: Bench):
    _, down, _, _, via = b.push_pull("noise", noise(b.size), "auto")
    return (f"pull random (auto, via {via})", down, "link rate", b.link, ">= 0.9x")


def _files(b: Bench, via: str) -> tuple[float, float]:
    """Upload then download one random file through route *via* (``paramiko`` or ``openssh``)."""
    if ("files", via) not in b.cache:
        path = os.path.join(b.root, "noise.bin")
        if not os.path.exists(path):
            noise(b.file_size).tofile(path)
        remote = os.path.join(b.root, f"remote-noise-{via}.bin")
        up = _timed(lambda: b.s.transport.upload(path, remote, progress=False, via=via))
        back = os.path.join(b.root, f"back-{via}.bin")
        down = _timed(lambda: b.s.transport.download(remote, back, progress=False, via=via))
        b.cache["files", via] = (b.file_size / up / 1e6, b.file_size / down / 1e6)
    return b.cache["files", via]


def _file_row(direction: int, via: str):
    verb = ("upload", "download")[direction]

    def row(b: Bench):
        return (f"{verb} random file ({via})", _files(b, via)[direction], "link rate", b.link,
                ">= 0.9x")  # fmt: skip

    row.__name__ = f"row_{verb}_noise_{via}"
    return row


def _compressible(b: Bench, name: str, make, direction: int):
    value = make(b.size)
    auto = b.push_pull(name, value, "auto")
    none = b.push_pull(name, value, "none")
    verb = "push" if direction == 0 else "pull"
    label = f"{verb} {name} (auto, {auto[2]:.2f} of the bytes)"
    ref = f"{verb} {name} (none, via {none[3 + direction]})"
    return (label, auto[direction], ref, none[direction], ">= 3x")


def row_push_sparse(b: Bench):
    return _compressible(b, "sparse_f32", sparse_f32, 0)


def row_pull_sparse(b: Bench):
    return _compressible(b, "sparse_f32", sparse_f32, 1)


def row_push_labels(b: Bench):
    return _compressible(b, "labels_i8", labels_i8, 0)


def row_pull_labels(b: Bench):
    return _compressible(b, "labels_i8", labels_i8, 1)


ROWS = [
    row_push_noise,
    row_pull_noise,
    # Files take OpenSSH's client from 128 MiB (hosthelper.OPENSSH_MIN) or once its spare is up;
    # both routes are timed explicitly here, as a user on this link would meet them.
    _file_row(0, "paramiko"),
    _file_row(1, "paramiko"),
    _file_row(0, "openssh"),
    _file_row(1, "openssh"),
    row_push_sparse,
    row_pull_sparse,
    row_push_labels,
    row_pull_labels,
]


def report(mib: int = 32, file_mib: int = 64, rate: float = 6.25e6, delay: float = 0.025) -> None:
    """Measure every row of :data:`ROWS` through one link and print them."""
    root = tempfile.mkdtemp(prefix="colabmagic-wan-")
    link = f"{sys.executable} -m colabmagic.testing_wan --delay {delay} --rate {rate:.0f}"
    with SSHServer("box") as srv:
        t = SSHTransport(
            srv.name,
            ssh_config=srv.ssh_config,
            python=sys.executable,
            root=root,
            proxy_command=f"{link} %h %p",
        )
        s = Session.start(t, name="wan-bench")
        try:
            b = Bench(s, root, mib << 20, rate, file_mib << 20)
            rows = [row(b) for row in ROWS]
        finally:
            s.close()
    rtt = 2 * delay * 1000
    print(
        f"WAN link {rate * 8 / 1e6:.0f} Mbit/s, {rtt:.0f} ms RTT; {mib} MiB arrays, "
        f"{file_mib} MiB files; the first row is the session's first transfer"
    )
    print(f"(load {os.getloadavg()[0]:.1f})")
    for label, value, ref_label, ref, target in rows:
        print(
            f"  {label:<40}: {value:6.2f} MB/s   {ref_label}: {ref:6.2f} MB/s   "
            f"ratio {value / ref:5.2f}x  ({target})"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=32, help="payload of each transfer")
    ap.add_argument("--file-mib", type=int, default=64, help="file size for upload/download")
    ap.add_argument("--rate", type=float, default=6.25e6, help="link cap, bytes/s (50 Mbit/s)")
    ap.add_argument("--delay", type=float, default=0.025, help="one-way delay, s (50 ms RTT)")
    args = ap.parse_args()
    report(args.mib, args.file_mib, args.rate, args.delay)


if __name__ == "__main__":
    main()
