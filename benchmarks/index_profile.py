"""Where ``fp index`` / ``fp dedup`` spend their CPU above decoding, stage by stage (issue 14).

    nice -n 19 python benchmarks/index_profile.py --corpus ~/fpcorpus --files 60 [--step dedup]

On a seeded subset of a ``corpus.py`` library: decode-only of the same files (the tool's decoder,
``--workers`` processes, as ``fingerprint_scale.py`` measures it), then the command from process
start, run with its worker functions timed inside the workers: ffmpeg (the workers' children),
the workers' own share of decoding (reading the decoded samples), fingerprinting, the rest of the
workers (results pickled back, pool), and the parent (start-up and imports, content hashes, index
writes and merges; for dedup also its queries). Every figure is CPU seconds and microseconds of
CPU per second of audio, with the load average. A sampler counts, every 20 ms, the command's
runnable threads (state R): below ``--workers`` a core the command could use sat idle, whatever
else the machine was running.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fingerprint_scale  # the same decode-only and load() as the scale benchmark

#: Runs the CLI with its worker functions timed; each process writes its totals to LOGDIR/<pid>.
INSTRUMENTED = """
import json, os, resource, sys
from colabmagic.fingerprint import fingerprinter, pipeline
LOGDIR = sys.argv.pop(1)
acc = {}
def cpu():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime
def timed(name, fn):
    def run(*a, **k):
        before = cpu()
        try:
            return fn(*a, **k)
        finally:
            after = cpu()
            d = acc.setdefault(name, [0.0, 0.0])
            d[0] += after[0] - before[0]
            d[1] += after[1] - before[1]
            self_cpu, children = cpu()
            with open(os.path.join(LOGDIR, str(os.getpid())), "w") as f:
                json.dump({"stages": acc, "self": self_cpu, "children": children}, f)
    return run
pipeline.load_audio_many = timed("decode", pipeline.load_audio_many)
fingerprinter.Fingerprinter.fingerprint = timed(
    "fingerprint", fingerprinter.Fingerprinter.fingerprint)
from colabmagic.cli import main
sys.argv = ["colabmagic", *sys.argv[1:]]
try:
    main()
finally:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(os.path.join(LOGDIR, "parent"), "w") as f:
        json.dump({"self": s.ru_utime + s.ru_stime, "children": c.ru_utime + c.ru_stime}, f)
"""


def runnable_threads(pid: int) -> int:
    """Threads of *pid* and its descendants in state R (running or waiting for a core)."""
    import psutil

    n = 0
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        try:
            for tid in os.listdir(f"/proc/{p.pid}/task"):
                with open(f"/proc/{p.pid}/task/{tid}/stat") as f:
                    n += f.read().rsplit(")", 1)[1].split()[0] == "R"
        except OSError:
            continue
    return n


def profile_command(cmd: list[str], logdir: str) -> dict[str, Any]:
    """Run the instrumented CLI; wall time and the runnable-thread samples."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", INSTRUMENTED, logdir, *cmd],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    samples = []
    while proc.poll() is None:
        samples.append(runnable_threads(proc.pid))
        time.sleep(0.02)
    out = proc.stdout.read() if proc.stdout else ""
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        msg = f"{' '.join(cmd[:3])} failed ({proc.returncode})"
        raise RuntimeError(msg)
    return {"wall_s": wall, "samples": samples, "summary": json.loads(out.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", required=True, help="a corpus.py output directory")
    ap.add_argument("--files", type=int, default=60, help="seeded subset of the library")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--step", choices=["index", "dedup"], default="index")
    ap.add_argument("--json", dest="json_out", help="write the figures here")
    args = ap.parse_args(argv)

    root = Path(args.corpus).resolve()
    manifest = json.loads((root / "manifest.json").read_text())
    files = sorted(str(root / f["path"]) for g in manifest["groups"] for f in g["files"])
    rng = np.random.default_rng(args.seed)
    files = [files[i] for i in sorted(rng.choice(len(files), args.files, replace=False))]
    d = fingerprint_scale.decode_only(files, args.workers)
    audio = d["audio_s"]
    say = fingerprint_scale.say
    say(
        f"{len(files)} files, {audio:.0f} s of audio; decode-only {d['cpu_s']:.1f} CPU-s "
        f"({d['x_realtime_per_cpu_s']:.0f}x per CPU-second), {d['x_realtime']:.0f}x wall; "
        f"{d['load']}"
    )
    with tempfile.TemporaryDirectory(prefix="fpprof-") as tmp:
        logdir = os.path.join(tmp, "logs")
        os.mkdir(logdir)
        if args.step == "index":
            lst = Path(tmp, "list")
            lst.write_text("".join(f"{i}\t{f}\n" for i, f in enumerate(files)))
            cmd = ["fp", "index", "--db", os.path.join(tmp, "db"), "--list", str(lst)]
        else:
            lst = Path(tmp, "list")
            lst.write_text("".join(f + "\n" for f in files))
            cmd = ["fp", "dedup", "--list", str(lst), "--work-dir", tmp]
        r = profile_command([*cmd, "--json", "--workers", str(args.workers)], logdir)
        logs = {n: json.loads(Path(logdir, n).read_text()) for n in os.listdir(logdir)}
    parent = logs.pop("parent")
    stages: dict[str, float] = collections.defaultdict(float)
    for w in logs.values():  # the workers (or the parent itself, for a job run in-process)
        dec, fpr = w["stages"].get("decode", [0, 0]), w["stages"].get("fingerprint", [0, 0])
        stages["ffmpeg (workers' children)"] += dec[1]
        stages["decode, worker's own share"] += dec[0]
        stages["fingerprint"] += fpr[0]
        stages["rest of the workers"] += w["self"] - dec[0] - fpr[0]
    in_workers = sum(stages.values())
    stages["parent (start-up, hashes, index, queries)"] = (
        parent["self"] + parent["children"] - in_workers
    )
    total = parent["self"] + parent["children"]
    decode = stages["ffmpeg (workers' children)"] + stages["decode, worker's own share"]
    res: dict[str, Any] = {
        "files": len(files),
        "audio_s": audio,
        "decode_only": d,
        "step": args.step,
        "wall_s": r["wall_s"],
        "cpu_s": total,
        "stages_cpu_s": dict(stages),
        "load": fingerprint_scale.load(),
    }
    say(
        f"fp {args.step}: {total:.1f} CPU-s ({audio / total:.0f}x per CPU-second = "
        f"{audio / total / d['x_realtime_per_cpu_s']:.2f}x decode-only), "
        f"{audio / r['wall_s']:.0f}x wall = {audio / r['wall_s'] / d['x_realtime']:.2f}x; "
        f"{res['load']}"
    )
    for name, cpu in stages.items():
        per = 1e6 * cpu / audio
        say(f"  {name:44s} {cpu:7.2f} CPU-s  {per:6.0f} us/audio-s  {cpu / total:5.1%}")
    say(f"  decoding inside the command: {decode:.1f} CPU-s, decode-only {d['cpu_s']:.1f}")
    counts = collections.Counter(min(n, args.workers + 1) for n in r["samples"])
    n = max(len(r["samples"]), 1)
    hist = ", ".join(f"{k}: {v / n:.0%}" for k, v in sorted(counts.items()))
    say(f"  runnable threads of the command (20 ms samples): {hist}")
    res["runnable_share"] = {str(k): v / n for k, v in sorted(counts.items())}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
