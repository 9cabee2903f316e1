"""Streaming index and dedup at 1,000 / 3,000 / 10,000 files (issue 18): speed, memory, disk.

Runs on a corpus built by ``benchmarks/corpus.py`` (``--files 10000`` for the largest point;
smaller points take the manifest's first groups, whole, up to ``--files`` files):

    python benchmarks/corpus.py --out ~/fpcorpus --files 3000
    nice python benchmarks/fingerprint_stream.py --corpus ~/fpcorpus --files 1000 3000

For each size, three commands are timed from process start to exit, as users run them, each
with the same 2 worker processes:

- ``decode``: the decode-only floor: every file decoded to the fingerprinter's 8 kHz mono by
  the same pipeline (ffmpeg processes shared by a few files each), nothing else;
- ``colabmagic fp index --db DIR --list FILES --json``;
- ``colabmagic fp dedup FILES... --json``.

Each also reports its CPU seconds (the CLI and the workers it waited for) and the ratio to the
floor per CPU second, which neither other jobs' load nor a pause of the run changes.
Memory is sampled from ``/proc`` every 0.2 s over the whole process tree (the CLI and its
workers): peak anonymous memory (what the tool holds) and peak file-backed resident pages
(the mapped index, which the kernel can drop at will) are reported apart, with the peak of the
parent alone. Disk is the index directory. Dedup's groups are scored pairwise against the
manifest: pairs of groups that its ``related`` entries say share music count neither way.
``--steps dedup`` times only one of the two commands; ``--keep-dedup DIR`` keeps each size's
dedup output for a closer look and ``--rescore DIR`` scores it again; ``--old-code DIR`` also
runs another checkout's dedup (``git archive main colabmagic | tar -x -C DIR``) on the same
files for the "same groups as today" check. The load average is printed with every figure:
the machine is shared.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

DECODE = """
import multiprocessing, sys
from colabmagic.fingerprint import Fingerprinter
from colabmagic.fingerprint.audio import AudioDecodeError, load_audio_many
from colabmagic.fingerprint.pipeline import Job, _group_size, _longest_first
SR = Fingerprinter().sample_rate
def seconds(paths):  # decode like the index's workers do, send back only the length
    ys = load_audio_many(paths, sample_rate=SR)
    return sum(len(y) / SR for y in ys if not isinstance(y, AudioDecodeError))
if __name__ == "__main__":
    files = [f for f in open(sys.argv[1]).read().split("\\n") if f]
    workers = int(sys.argv[2])
    order = [files[i] for i in _longest_first([Job(f, f, "") for f in files])]
    size = _group_size(len(files), workers)
    tasks = [order[a : a + size] for a in range(0, len(order), size)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        print(sum(pool.imap_unordered(seconds, tasks)))
"""


class TreeMemory:
    """Peak memory (kB) of a process and its descendants, sampled every *interval* seconds.

    - ``anon``: RssAnon summed over the tree. Forked workers share their parent's pages
      copy-on-write, and each one's RssAnon counts them again, so this overstates;
    - ``pss_anon``: the same from ``smaps_rollup``'s Pss_Anon, where a shared page counts once
      (split between its sharers): what the tree really holds;
    - ``parent_anon``: the CLI process alone (the index writer / dedup's queries);
    - ``file``: file-backed resident pages (the mapped index; the kernel drops them at will);
    - ``hwm``: the process's own VmHWM (anon + file).
    """

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.anon = self.file = self.hwm = self.pss_anon = self.parent_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    @staticmethod
    def _status(pid: int) -> dict[str, int]:
        out = {}
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    k, _, v = line.partition(":")
                    if k in ("RssAnon", "RssFile", "RssShmem", "VmHWM", "PPid"):
                        out[k] = int(v.split()[0])
        except (OSError, ValueError):
            pass
        return out

    @staticmethod
    def _pss_anon(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss_Anon:"):
                        return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return 0

    def _tree(self) -> list[int]:
        parents: dict[int, int] = {}
        for e in os.listdir("/proc"):
            if e.isdigit():
                st = self._status(int(e))
                if "PPid" in st:
                    parents[int(e)] = st["PPid"]
        tree, frontier = [self.pid], [self.pid]
        while frontier:
            frontier = [p for p, pp in parents.items() if pp in frontier]
            tree += frontier
        return tree

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            anon = file_ = pss = 0
            for pid in self._tree():
                st = self._status(pid)
                anon += st.get("RssAnon", 0) + st.get("RssShmem", 0)
                file_ += st.get("RssFile", 0)
                pss += self._pss_anon(pid)
                if pid == self.pid:
                    self.hwm = max(self.hwm, st.get("VmHWM", 0))
                    self.parent_anon = max(self.parent_anon, st.get("RssAnon", 0))
            self.anon, self.file = max(self.anon, anon), max(self.file, file_)
            self.pss_anon = max(self.pss_anon, pss)
            self._stop.wait(interval)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        mib = 1024
        return {
            "peak_anon_mib": self.anon / mib,
            "peak_pss_anon_mib": self.pss_anon / mib,
            "parent_anon_mib": self.parent_anon / mib,
            "peak_file_mib": self.file / mib,
            "parent_hwm_mib": self.hwm / mib,
        }


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run *cmd* from process start to exit; wall seconds, CPU seconds of the process and the
    workers it waited for (unaffected by other jobs' load, or by the job being paused),
    memory, its stdout's last line."""
    t0, c0 = time.perf_counter(), _children_cpu()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    mem = TreeMemory(proc.pid)
    out, err = proc.communicate()
    wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
    figures = mem.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}): {err.strip()[-2000:]}")
    last = out.strip().splitlines()[-1]
    return {"seconds": wall, "cpu_s": cpu, **figures, "stdout": last, "load": load()}


def pairs(groups: list[list[str]]) -> set[tuple[str, str]]:
    return {tuple(sorted(p)) for g in groups for p in itertools.combinations(g, 2)}


def score(
    found: list[list[str]], truth: list[list[str]], related: set[tuple[str, str]] | None = None
) -> dict[str, float]:
    """Pairwise precision / recall of *found* groups against *truth*; pairs in *related* (two
    recordings that share a passage: see :func:`related_pairs`) count neither way."""
    related = related or set()
    f, t = pairs(found), pairs(truth)
    return {
        "precision": len(f & t) / len(f - related) if f - related else 1.0,
        "recall": len(f & t) / len(t) if t else 1.0,
        "false_pairs": len(f - t - related),
        "missed_pairs": len(t - f),
        "related_pairs_found": len((f - t) & related),
    }


def related_pairs(manifest: dict[str, Any], root: Path, n: int) -> set[tuple[str, str]]:
    """File pairs of the first groups up to *n* files that the manifest's ``related`` entries
    (``corpus.py``'s relation step) say share music without being one recording."""
    members, total = {}, 0
    for g in manifest["groups"]:
        if total + len(g["files"]) > n:
            break
        members[g["group"]] = [str(root / f["path"]) for f in g["files"]]
        total += len(g["files"])
    out = set()
    for rel in manifest.get("related", []):
        a, b = rel["groups"]
        if a in members and b in members:
            out |= {tuple(sorted((x, y))) for x in members[a] for y in members[b]}
    return out


def subset(manifest: dict[str, Any], root: Path, n: int) -> list[list[str]]:
    """The manifest's first groups, whole, up to *n* files."""
    groups, total = [], 0
    for g in manifest["groups"]:
        if total + len(g["files"]) > n:
            break
        groups.append([str(root / f["path"]) for f in g["files"]])
        total += len(g["files"])
    return groups


def run_size(args: argparse.Namespace, manifest: dict[str, Any], n: int) -> dict[str, Any]:
    root = Path(args.corpus)
    truth = subset(manifest, root, n)
    files = [f for g in truth for f in g]
    work = Path(tempfile.mkdtemp(prefix=f"fpstream-{n}-", dir=args.work_dir))
    listing = work / "files.txt"
    listing.write_text("\n".join(files))
    cli = [str(Path(sys.executable).with_name("colabmagic")), "fp"]
    res: dict[str, Any] = {"files": len(files), "groups": len(truth)}
    try:
        sample = files
        if args.decode_sample < 1.0:  # a seeded sample: the floor's rate, not its whole run
            k = max(1, round(args.decode_sample * len(files)))
            sample = random.Random(f"decode-{n}").sample(files, k)
        (work / "sample.txt").write_text("\n".join(sample))
        dec = timed([sys.executable, "-c", DECODE, str(work / "sample.txt"), str(args.workers)])
        decoded = float(dec.pop("stdout"))
        floor = decoded / dec["seconds"]  # x realtime
        floor_cpu = decoded / dec["cpu_s"]  # audio seconds per CPU second
        res["decode"] = {**dec, "files": len(sample), "audio_hours": decoded / 3600,
                         "x_realtime": floor, "per_cpu_s": floor_cpu}  # fmt: skip
        print(f"[{n}] decode-only: {res['decode']}", file=sys.stderr, flush=True)
        audio = None
        if "index" in args.steps:
            db = work / "db"
            idx = timed([*cli, "index", "--db", str(db), "--list", str(listing), "--workers",
                         str(args.workers), "--json"])  # fmt: skip
            summary = json.loads(idx.pop("stdout"))
            audio = summary["audio_seconds"]
            res["audio_hours"] = audio / 3600
            disk = sum(p.stat().st_size for p in db.rglob("*") if p.is_file())
            res["index"] = {
                **idx, "x_realtime": audio / idx["seconds"],
                "vs_decode": audio / idx["seconds"] / floor,
                "vs_decode_cpu": audio / idx["cpu_s"] / floor_cpu,
                "n_hashes": summary["index_n_hashes"], "disk_bytes": disk,
                "bytes_per_hash": disk / max(summary["index_n_hashes"], 1),
                "added": summary["added"], "skipped": summary["skipped"],
            }  # fmt: skip
            print(f"[{n}] index: {res['index']}", file=sys.stderr, flush=True)
            shutil.rmtree(db)
        if "dedup" in args.steps:
            dd = timed([*cli, "dedup", "--list", str(listing), "--workers", str(args.workers),
                        "--json", "--work-dir", str(work)])  # fmt: skip
            found = json.loads(dd.pop("stdout"))
            if args.keep_dedup:
                Path(args.keep_dedup).mkdir(parents=True, exist_ok=True)
                (Path(args.keep_dedup) / f"dedup-{n}.json").write_text(json.dumps(found))
            groups = [g["files"] for g in found["groups"]]
            if audio is None:  # no index run: dedup's own count
                audio = found["audio_seconds"]
                res["audio_hours"] = audio / 3600
            res["dedup"] = {
                **dd, "x_realtime": audio / dd["seconds"],
                "vs_decode": audio / dd["seconds"] / floor,
                "vs_decode_cpu": audio / dd["cpu_s"] / floor_cpu,
                **score(groups, truth, related_pairs(manifest, root, n)),
            }  # fmt: skip
            print(f"[{n}] dedup: {res['dedup']}", file=sys.stderr, flush=True)
        if args.window_check and "dedup" in args.steps:
            env = {**os.environ, "FPSTREAM_WORK": str(work)}
            win = timed([sys.executable, "-c", WINDOWS, str(listing), str(args.workers)], env)
            res["dedup_windows"] = json.loads(win.pop("stdout"))
            print(f"[{n}] windowed vs whole-file queries: {res['dedup_windows']}",
                  file=sys.stderr, flush=True)  # fmt: skip
        if args.old_code and "dedup" in args.steps:
            env = {**os.environ, "PYTHONPATH": args.old_code}
            old = timed([sys.executable, "-c", OLD_DEDUP, str(listing), str(args.workers)], env)
            old_groups = json.loads(old.pop("stdout"))
            res["dedup_old_code"] = {
                **old, "x_realtime": audio / old["seconds"],
                **score(old_groups, truth, related_pairs(manifest, root, n)),
                "same_groups": sorted(map(sorted, old_groups)) == sorted(map(sorted, groups)),
            }  # fmt: skip
            print(f"[{n}] old dedup: {res['dedup_old_code']}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return res


OLD_DEDUP = """
import json, sys
import colabmagic.fingerprint as fp
print("old code:", fp.__file__, file=sys.stderr)
files = [f for f in open(sys.argv[1]).read().split("\\n") if f]
res = fp.dedup(files, workers=int(sys.argv[2]), backend="numpy")
print(json.dumps(res.groups))
"""


WINDOWS = """
import json, os, sys, threading, time
from colabmagic.fingerprint import dedup as _api
import importlib
D = importlib.import_module("colabmagic.fingerprint.dedup")
files = [f for f in open(sys.argv[1]).read().split("\\n") if f]
peak = [0]
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) // 1024
def sample(stop):
    while not stop.is_set():
        peak[0] = max(peak[0], rss()); stop.wait(0.05)
out = {}
real = D._query_edges
def both(*a):
    # the same index and spilled queries, queried per window (as shipped) and per whole file
    runs = {}
    for name, chunk in (("windowed", D.QUERY_CHUNK), ("whole_file", 1 << 30)):
        D.QUERY_CHUNK = chunk
        peak[0] = rss(); stop = threading.Event()
        t = threading.Thread(target=sample, args=(stop,)); t.start()
        t0, c0 = time.perf_counter(), time.process_time()
        runs[name] = real(*a)
        out[name] = {"seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                     "peak_anon_mib": peak[0]}
        stop.set(); t.join()
    out["same_edges"] = sorted(runs["windowed"]) == sorted(runs["whole_file"])
    out["cpu_ratio"] = out["windowed"]["cpu_s"] / max(out["whole_file"]["cpu_s"], 1e-9)
    return runs["windowed"]
D._query_edges = both
_api(files, workers=int(sys.argv[2]), backend="numpy", work_dir=os.environ["FPSTREAM_WORK"])
print(json.dumps(out))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", required=True, help="a corpus.py output directory")
    ap.add_argument("--files", type=int, nargs="+", default=[1000, 3000, 10000])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work-dir", default=None, help="for the index and dedup's temp index")
    ap.add_argument(
        "--decode-sample", type=float, default=1.0,
        help="decode-only floor on this seeded share of the files (its rate is the floor) [1]",
    )  # fmt: skip
    ap.add_argument(
        "--window-check", action="store_true",
        help="also time dedup's queries per window vs per whole file (same index, one process)",
    )  # fmt: skip
    ap.add_argument("--old-code", default=None, help="PYTHONPATH of the dedup to compare with")
    ap.add_argument("--json", dest="json_out", help="append one JSON line per size here")
    ap.add_argument(
        "--steps", nargs="+", choices=("index", "dedup"), default=["index", "dedup"],
        help="which commands to time after the floor [index dedup]",
    )  # fmt: skip
    ap.add_argument("--keep-dedup", help="save each size's `fp dedup --json` output in this dir")
    ap.add_argument(
        "--rescore", metavar="DIR",
        help="only score the dedup-N.json that --keep-dedup saved in DIR against the manifest "
        "as it is now (after the corpus's relations were rebuilt, say)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    manifest = json.loads((Path(args.corpus) / "manifest.json").read_text())
    if args.rescore:
        root = Path(args.corpus)
        for n in args.files:
            found = json.loads((Path(args.rescore) / f"dedup-{n}.json").read_text())
            groups = [g["files"] for g in found["groups"]]
            figures = score(groups, subset(manifest, root, n), related_pairs(manifest, root, n))
            print(json.dumps({"files": n, **figures}), flush=True)
        return 0
    for n in args.files:
        if n > manifest["library_files"]:
            print(f"skip {n}: the corpus has {manifest['library_files']} files", file=sys.stderr)
            continue
        res = run_size(args, manifest, n)
        d = res["decode"]
        parts = [f"{res['files']} files, {res['audio_hours']:.1f} h: decode-only "
                 f"{d['x_realtime']:.0f}x"]  # fmt: skip
        if "index" in res:
            i = res["index"]
            parts.append(
                f"index {i['x_realtime']:.0f}x ({i['vs_decode']:.2f} of decode, "
                f"{i['vs_decode_cpu']:.2f} per CPU second), anon {i['peak_anon_mib']:.0f} MiB "
                f"(PSS {i['peak_pss_anon_mib']:.0f}, parent {i['parent_anon_mib']:.0f}), mapped "
                f"{i['peak_file_mib']:.0f} MiB, {i['disk_bytes'] / 1e6:.0f} MB = "
                f"{i['bytes_per_hash']:.1f} B/hash, load {i['load']}"
            )
        if "dedup" in res:
            u = res["dedup"]
            parts.append(
                f"dedup {u['x_realtime']:.0f}x ({u['vs_decode']:.2f}; {u['vs_decode_cpu']:.2f} "
                f"per CPU s), anon {u['peak_anon_mib']:.0f} MiB (PSS {u['peak_pss_anon_mib']:.0f}, "
                f"parent {u['parent_anon_mib']:.0f}), mapped {u['peak_file_mib']:.0f} MiB, "
                f"precision {u['precision']:.4f} recall {u['recall']:.4f}, load {u['load']}"
            )
        print(" | ".join(parts), flush=True)
        if args.json_out:
            with open(args.json_out, "a") as fh:
                fh.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
