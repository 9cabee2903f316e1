"""Memory of the index writer at 10,000+ files, without decoding hours of audio (issue 18).

    nice python benchmarks/index_memory.py --files 1000 10000

``fp index`` is two kinds of process: workers that decode and fingerprint one group of files
at a time (their memory follows the longest file, never the collection; measured on real
files by ``fingerprint_stream.py``), and the parent that streams every fingerprint into the
index: buffer, shard commits, LSM merges, the final compaction, the manifest. This measures the
parent at any collection size by feeding :meth:`Index.add_jobs` synthetic fingerprints at the
real rates instead of decoding (per second of audio: 176 hashes, uniformly random 21-bit
values, and 24 peaks, as the 1,000-file MP3 corpus gives; files of 30-89 s). Everything after
extraction is the real code path, in this process.

Reported per size: peak anonymous memory (RssAnon, sampled every 20 ms) in each phase (the
buffer while results arrive, a commit, a merge step), the file-backed pages resident at the
end and the parent's VmHWM (both include the mapped index: page cache), the memory held per
file after the add (tracemalloc over a reload of the manifest), disk and bytes per hash.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

HASHES_PER_S, PEAKS_PER_S = 176, 24


def status() -> dict[str, int]:
    """``RssAnon``, ``RssFile`` and ``VmHWM`` of this process, in MiB."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            k, _, v = line.partition(":")
            if k in ("RssAnon", "RssFile", "VmHWM"):
                out[k] = int(v.split()[0]) // 1024
    return out


class Phases:
    """Peak RssAnon per phase; :meth:`wrap` tags the time inside a method as one phase."""

    def __init__(self) -> None:
        self.phase, self.peaks = "start", {}
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.is_set():
            anon = status()["RssAnon"]
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), anon)
            self._stop.wait(0.02)

    def wrap(self, cls: Any, name: str, label: str) -> None:
        inner = getattr(cls, name)

        def tagged(*a: Any, **k: Any) -> Any:
            before, self.phase = self.phase, label
            try:
                return inner(*a, **k)
            finally:
                self.phase = before

        setattr(cls, name, tagged)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        return dict(self.peaks)


def synthetic_extract(jobs: list[Any], fingerprinter: Any, **_kw: Any) -> Any:
    """Stands in for decode + extract: fingerprints of the real shape and rates, no audio."""
    pipeline = importlib.import_module("colabmagic.fingerprint.pipeline")
    frames_per_s = fingerprinter.sample_rate / fingerprinter.hop
    rng = np.random.default_rng(0)
    for i, job in enumerate(jobs):
        seconds = 30 + (i * 37) % 60
        n, n_peaks = seconds * HASHES_PER_S, seconds * PEAKS_PER_S
        hashes = rng.integers(0, 1 << 21, n).astype(np.uint32)
        times = np.sort(rng.integers(0, int(seconds * frames_per_s), n)).astype(np.int32)
        peaks = np.stack(
            [
                np.sort(rng.uniform(0, seconds * frames_per_s, n_peaks)),
                rng.uniform(0, 256, n_peaks),
            ],
            axis=1,
        ).astype(np.float32)
        yield pipeline.Extracted(
            job.track_id, job.path, job.content_hash, float(seconds), hashes, times, peaks
        )


def run(n: int, work: Path) -> dict[str, Any]:
    index_mod = importlib.import_module("colabmagic.fingerprint.index")
    pipeline = importlib.import_module("colabmagic.fingerprint.pipeline")
    index_mod.extract_files = synthetic_extract  # the one stand-in: no decoding
    phases = Phases()
    phases.wrap(index_mod.Index, "_commit", "commit")
    phases.wrap(index_mod.Index, "_merge", "merge")
    db = work / f"db-{n}"
    t0 = time.perf_counter()
    idx = index_mod.Index(db)
    jobs = [
        pipeline.Job(
            f"/music/{i // 100:03d}/track-{i:06d}.mp3", f"/music/track-{i:06d}.mp3", f"{i:064x}"
        )
        for i in range(n)
    ]
    phases.phase = "buffer"
    summary = idx.add_jobs(jobs)
    phases.phase = "end"
    seconds = time.perf_counter() - t0
    end = status()
    peaks = phases.stop()
    del idx
    tracemalloc.start()
    reopened = index_mod.Index(db, readonly=True)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    info = reopened.info()
    disk = sum(p.stat().st_size for p in db.rglob("*") if p.is_file())
    shutil.rmtree(db)
    return {
        "files": n,
        "audio_hours": summary.audio_seconds / 3600,
        "n_hashes": info["n_hashes"],
        "shards": info["shards"],
        "seconds": seconds,
        "peak_anon_mib": max(peaks.values()),
        "phase_peak_anon_mib": peaks,
        "end_anon_mib": end["RssAnon"],
        "end_file_mib": end["RssFile"],
        "vm_hwm_mib": end["VmHWM"],
        "held_bytes_per_file": held / n,
        "disk_bytes": disk,
        "bytes_per_hash": disk / max(info["n_hashes"], 1),
        "load": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--work-dir", default=None, help="where the index is written (and removed)")
    ap.add_argument("--json", dest="json_out", help="append one JSON line per size here")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one size
    args = ap.parse_args(argv)
    if args.one:
        with tempfile.TemporaryDirectory(prefix="fpmem-", dir=args.work_dir) as tmp:
            print(json.dumps(run(args.files[0], Path(tmp))))
        return 0
    for n in args.files:  # each size in a fresh process: no heap carried over
        cmd = [sys.executable, __file__, "--one", "--files", str(n)]
        if args.work_dir:
            cmd += ["--work-dir", args.work_dir]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        res = json.loads(out.strip().splitlines()[-1])
        ph = res["phase_peak_anon_mib"]
        print(
            f"{n} files, {res['audio_hours']:.0f} h, {res['n_hashes'] / 1e6:.1f} M hashes: peak "
            f"anon {res['peak_anon_mib']} MiB (buffer {ph.get('buffer')}, commit "
            f"{ph.get('commit')}, merge {ph.get('merge')}), after {res['end_anon_mib']} MiB; "
            f"held {res['held_bytes_per_file']:.0f} B/file; VmHWM {res['vm_hwm_mib']} MiB "
            f"incl. mapped pages; disk {res['disk_bytes'] / 1e9:.2f} GB = "
            f"{res['bytes_per_hash']:.2f} B/hash; {res['seconds']:.0f} s | load {res['load']}",
            flush=True,
        )
        if args.json_out:
            with open(args.json_out, "a") as fh:
                fh.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
