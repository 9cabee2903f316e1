"""Fingerprinting at scale, measured as users run it: the CLI from process start (issue 14).

    python benchmarks/corpus.py --out ~/fpcorpus                      # once: 1,000+ MP3 files
    python benchmarks/fingerprint_scale.py --corpus ~/fpcorpus [--json scale.json]
    python benchmarks/fingerprint_scale.py --wesnoth [--json cli.json]   # the 35-track targets

``--corpus`` (the corpus built by ``benchmarks/corpus.py``):

* decode-only throughput of the library files (the tool's decoder, ``--workers`` processes, no
  fingerprinting): the physical limit, measured next to each step it bounds;
* ``colabmagic fp index --list`` as a subprocess: x realtime from process start to exit, peak
  RSS (largest process, and the whole process tree sampled every 20 ms), index bytes per hash;
* ``--queries`` seeded excerpts of indexed tracks and ``--heldout-queries`` of held-out ones
  (never indexed), clean / MP3 64k / white noise 0 and -5 dB / speed 0.95 and 1.05, 5 s and
  10 s, written as files (WAV at 8 kHz; the MP3 ones by ffmpeg) and identified by one
  ``colabmagic fp query --list`` process: recall at the tool's threshold, false positives,
  latency median / p90 (the CLI's own per-query figure, decode included) and wall time per query
  including start-up;
* ``colabmagic fp dedup`` over the library: pairwise precision / recall against the manifest's
  groups, offsets within 50 ms, x realtime.

``--wesnoth``: the 35 indexed tracks of the Wesnoth benchmark: ``fp index --list`` from process
start against ``Index.add`` in this process (the library), and 760 WAV excerpts through
``fp query --list`` (5 s / 10 s; clean, 0 / -5 dB, speed 0.95 / 1.05; 2 per indexed track and 1
per held-out track per condition).

``--backend cupy`` indexes on the GPU and also times the queries batched through ``match_many``
(what ``benchmarks/gpu_check.sh`` runs). Every figure comes with the load average (``uptime``):
the machine may be shared, so compare the ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

CONDITIONS = ("clean", "mp3_64k", "snr0", "snr-5", "speed0.95", "speed1.05")
LENGTHS = (5.0, 10.0)
SR = 8000
#: Recall on the 35-track Wesnoth library (docs/fingerprint.md, 2026-11-28): the reference.
WESNOTH_RECALL = {
    "clean": (1.0, 1.0),
    "mp3_64k": (1.0, 1.0),
    "snr0": (0.882, 0.984),
    "snr-5": (0.618, 0.859),
    "speed0.95": (0.985, 0.984),
    "speed1.05": (1.0, 1.0),
}


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def load() -> str:
    """The load averages (1, 5, 15 min) and CPUs: the context of every timing."""
    a, b, c = os.getloadavg()
    return f"load {a:.2f} {b:.2f} {c:.2f} on {os.cpu_count()} CPUs"


def cli(*args: str) -> list[str]:
    """The ``colabmagic`` command of this interpreter's environment."""
    exe = Path(sys.executable).with_name("colabmagic")
    if exe.exists():
        return [str(exe), *args]
    return [sys.executable, "-c", "from colabmagic.cli import main; main()", *args]


def run_timed(cmd: list[str], stdout: Any = subprocess.PIPE) -> dict[str, Any]:
    """Run *cmd*: wall seconds from start to exit, CPU seconds of it and its children, and the
    peak RSS of its biggest process and of the whole tree (sampled every 20 ms)."""
    import psutil

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True)
    peak = {"tree": 0, "max": 0}
    done = threading.Event()

    def sample() -> None:
        try:
            root = psutil.Process(proc.pid)
        except psutil.Error:
            return
        while not done.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    rss = p.memory_info().rss
                    total += rss
                    peak["max"] = max(peak["max"], rss)
            except psutil.Error:
                pass
            peak["tree"] = max(peak["tree"], total)
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        msg = f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {err.strip()[-500:]}"
        raise RuntimeError(msg)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "stdout": out,
        "stderr": err,
        "peak_rss_tree": peak["tree"],
        "peak_rss_max": peak["max"],
    }


def _decode_group(paths: list[str]) -> float:
    from colabmagic.fingerprint.audio import load_audio_many

    ys = load_audio_many(paths, sample_rate=SR)
    return sum(len(y) for y in ys if isinstance(y, np.ndarray)) / SR


def decode_only(files: list[str], workers: int) -> dict[str, Any]:
    """Decode every file with the tool's decoder (4 to an ffmpeg) on *workers* processes."""
    from colabmagic.fingerprint.audio import FILES_PER_FFMPEG

    order = sorted(files, key=lambda f: -os.path.getsize(f))
    groups = [order[a : a + FILES_PER_FFMPEG] for a in range(0, len(order), FILES_PER_FFMPEG)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        audio = sum(pool.imap_unordered(_decode_group, groups))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers and their ffmpegs
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "audio_s": audio,
        "seconds": wall,
        "x_realtime": audio / wall,
        "cpu_s": cpu,
        "x_realtime_per_cpu_s": audio / cpu if cpu else None,
        "load": load(),
    }


# -- queries --------------------------------------------------------------------------------------


def _decode_all(paths: list[str], workers: int) -> dict[str, np.ndarray]:
    from colabmagic.fingerprint.audio import load_audio

    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return dict(zip(paths, pool.map(load_audio, paths, chunksize=4), strict=True))


def make_query(
    cond: str, y: np.ndarray, src: str, start: float, seconds: float, rng: Any, dest: Path
) -> Path:
    """Write one degraded excerpt of *y* (decoded *src*) starting at *start* s; returns its path."""
    import soundfile

    a = int(start * SR)
    if cond == "mp3_64k":  # the excerpt of the file itself, re-encoded
        out = dest.with_suffix(".mp3")
        cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-ss", f"{start:.3f}", "-t"]
        cmd += [f"{seconds:.3f}", "-i", src, "-ac", "2", "-b:a", "64k", str(out)]
        subprocess.run(cmd, check=True)
        return out
    if cond.startswith("speed"):
        import soxr

        s = float(cond[5:])
        q = soxr.resample(y[a : a + int(seconds * s * SR) + 1], round(SR * s), SR)
    else:
        q = y[a : a + int(seconds * SR)]
        if cond.startswith("snr"):
            snr = float(cond[3:])
            noise = rng.standard_normal(len(q)).astype(np.float32)
            q = q + noise * np.float32(np.sqrt(np.mean(q**2) / 10 ** (snr / 10)))
    out = dest.with_suffix(".wav")
    soundfile.write(out, np.clip(q, -1, 1), SR, subtype="PCM_16")
    return out


def plan_queries(
    pool: list[tuple[str, str | None]],
    n: int,
    rng: np.random.Generator,
    conditions: tuple[str, ...],
) -> list[dict[str, Any]]:
    """*n* queries spread evenly over conditions x lengths, each from a random file of *pool*
    (``(path, truth)``: truth None for held-out audio)."""
    cells = [(c, s) for s in LENGTHS for c in conditions]
    out = []
    for k in range(n):
        cond, seconds = cells[k % len(cells)]
        path, truth = pool[int(rng.integers(len(pool)))]
        out.append({"cond": cond, "seconds": seconds, "src": path, "truth": truth})
    return out


def write_queries(
    plan: list[dict[str, Any]], audio: dict[str, np.ndarray], rng: Any, qdir: Path
) -> None:
    for i, q in enumerate(plan):
        y = audio[q["src"]]
        need = q["seconds"] * 1.06 + 0.5
        q["start"] = float(rng.uniform(0, max(0.0, len(y) / SR - need)))
        q["file"] = str(
            make_query(q["cond"], y, q["src"], q["start"], q["seconds"], rng, qdir / f"q{i:05d}")
        )


def run_queries(
    db: str, plan: list[dict[str, Any]], tmp: Path, min_score: float, group_of: dict[str, str]
) -> dict[str, Any]:
    """One ``fp query --list`` process for every query; recall, false positives, latency.

    *group_of* maps a track id of the index to the group (recording) it belongs to: a query is
    found when the best match is any file of its recording, or of a recording that the manifest
    lists as holding the same music (``q["also"]``: groups related to its own).
    """
    qlist, out = tmp / "queries.txt", tmp / "results.jsonl"
    qlist.write_text("".join(f"{q['file']}\n" for q in plan))
    r = run_timed(cli("fp", "query", "--db", db, "--list", str(qlist), "--jsonl", str(out)))
    rows = {d["query"]: d for d in map(json.loads, out.read_text().splitlines())}
    for d in rows.values():
        d["track_group"] = group_of.get(d["track"]) if d["track"] is not None else None
    cells: dict[str, dict[str, Any]] = {}
    for q in plan:
        d = rows[q["file"]]
        c = cells.setdefault(f"{q['cond']}@{q['seconds']:g}s", {"pos": [], "neg": [], "lat": []})
        c["lat"].append(d["latency_s"])
        hit = d["track"] is not None and d["score"] >= min_score
        right = d["track_group"] in {q["truth"], *q.get("also", ())}
        if q["truth"] is None:  # a held-out track; a match to music it shares is no error
            c["neg"].append(hit and not right)
        else:
            c["pos"].append(hit and right)
            c.setdefault("wrong", 0)
            c["wrong"] += int(hit and not right)
    res: dict[str, Any] = {}
    for key, c in sorted(cells.items()):
        lat = np.array(c["lat"]) * 1000
        res[key] = {
            "positives": len(c["pos"]),
            "recall": float(np.mean(c["pos"])) if c["pos"] else None,
            "negatives": len(c["neg"]),
            "false_positives": int(sum(c["neg"])) + c.get("wrong", 0),
            "latency_median_ms": float(np.median(lat)),
            "latency_p90_ms": float(np.percentile(lat, 90)),
        }
    lat_all = np.array([rows[q["file"]]["latency_s"] for q in plan]) * 1000
    by_len = {}
    for s in LENGTHS:
        v = np.array([rows[q["file"]]["latency_s"] for q in plan if q["seconds"] == s]) * 1000
        c = np.array([rows[q["file"]].get("cpu_s", 0) for q in plan if q["seconds"] == s]) * 1000
        by_len[f"{s:g}s"] = {
            "median_ms": float(np.median(v)),
            "p90_ms": float(np.percentile(v, 90)),
            "max_ms": float(v.max()),
            "cpu_median_ms": float(np.median(c)),
            "cpu_p90_ms": float(np.percentile(c, 90)),
        }
    return {
        "cells": res,
        "queries": len(plan),
        "false_positives": sum(c["false_positives"] for c in res.values()),
        "latency_median_ms": float(np.median(lat_all)),
        "latency_p90_ms": float(np.percentile(lat_all, 90)),
        "latency_by_length": by_len,
        "wall_s": r["wall_s"],
        "wall_per_query_ms": 1000 * r["wall_s"] / len(plan),
        "cpu_per_query_ms": 1000 * r["cpu_s"] / len(plan),
        "peak_rss_tree": r["peak_rss_tree"],
        "load": load(),
        "scores": {q: (d["track_group"], d["score"]) for q, d in rows.items()},
    }


# -- the corpus benchmark ---------------------------------------------------------------------


def index_cli(db: Path, items: list[tuple[str, str]], backend: str, workers: int) -> dict[str, Any]:
    lst = db.parent / f"{db.name}.list"
    lst.write_text("".join(f"{tid}\t{p}\n" for tid, p in items))
    shutil.rmtree(db, ignore_errors=True)
    cmd = cli("fp", "index", "--db", str(db), "--list", str(lst), "--json")
    r = run_timed([*cmd, "--backend", backend, "--workers", str(workers)])
    summary = json.loads(r["stdout"].strip().splitlines()[-1])
    disk = sum(f.stat().st_size for f in db.rglob("*") if f.is_file())
    return {
        "files": summary["files"],
        "added": summary["added"],
        "skipped": summary["skipped"],
        "audio_s": summary["hours"] * 3600,
        "wall_s": r["wall_s"],
        "x_realtime": summary["hours"] * 3600 / r["wall_s"],
        "cpu_s": r["cpu_s"],
        "x_realtime_per_cpu_s": summary["hours"] * 3600 / r["cpu_s"] if r["cpu_s"] else None,
        "library_seconds": summary["seconds"],
        "n_hashes": summary["index_n_hashes"],
        "bytes_per_hash": summary["memory_bytes"] / max(summary["index_n_hashes"], 1),
        "disk_bytes_per_hash": disk / max(summary["index_n_hashes"], 1),
        "peak_rss_max": r["peak_rss_max"],
        "peak_rss_tree": r["peak_rss_tree"],
        "load": load(),
    }


def dedup_cli(
    library: Path, manifest: dict[str, Any], root: Path, workers: int, backend: str
) -> dict[str, Any]:
    cmd = cli(
        "fp", "dedup", str(library), "--json", "--workers", str(workers), "--backend", backend
    )
    r = run_timed(cmd)
    res = json.loads(r["stdout"].strip().splitlines()[-1])
    return {
        "files": res["files"],
        "audio_s": res["audio_seconds"],
        "wall_s": r["wall_s"],
        "x_realtime": res["audio_seconds"] / r["wall_s"],
        "cpu_s": r["cpu_s"],
        "x_realtime_per_cpu_s": res["audio_seconds"] / r["cpu_s"] if r["cpu_s"] else None,
        **score_dedup(res, manifest, root),
        "skipped": res["skipped"],
        "peak_rss_tree": r["peak_rss_tree"],
        "load": load(),
    }


def score_dedup(res: dict[str, Any], manifest: dict[str, Any], root: Path) -> dict[str, Any]:
    """``fp dedup --json`` output *res* against the manifest: pairwise precision / recall and
    the evidence offsets. Files of one recording in two groups (a "same recording" relation)
    are true pairs; pairs across a "shared passage" count neither way."""
    truth: dict[str, tuple[int, float]] = {}
    for g in manifest["groups"]:
        for f in g["files"]:
            truth[str((root / f["path"]).resolve())] = (g["group"], f["offset_s"])
    key = lambda p: str(Path(p).resolve())  # noqa: E731
    members = {g["group"]: [key(root / f["path"]) for f in g["files"]] for g in manifest["groups"]}
    true_pairs = {frozenset(p) for fs in members.values() for p in combinations(fs, 2)}
    same: dict[frozenset[int], dict[int, float]] = {}  # one recording in two groups
    for rel in manifest.get("related", []):
        a, b = rel["groups"]
        if rel["kind"] == "same recording":
            true_pairs |= {frozenset((x, y)) for x in members[a] for y in members[b]}
            same[frozenset((a, b))] = {a: 0.0, b: rel["offset_s"]}
    also, _ = relations(manifest)
    related_pairs = {  # groups sharing music but not the same recording: neither way
        frozenset((x, y)) for a, bs in also.items() for b in bs
        for x in members[a] for y in members[b] if a != b
    } - true_pairs  # fmt: skip
    found_all = {frozenset(map(key, p)) for g in res["groups"] for p in combinations(g["files"], 2)}
    found_pairs = found_all - related_pairs
    tp = len(true_pairs & found_pairs)
    offsets_ok, offsets_n, worst = 0, 0, 0.0
    for g in res["groups"]:
        for e in g["evidence"]:
            (ga, oa), (gb, ob) = truth[key(e["a"])], truth[key(e["b"])]
            if ga != gb:  # one recording in two groups: both offsets in the first one's time
                if frozenset((ga, gb)) not in same:
                    continue
                oa += same[frozenset((ga, gb))][ga]
                ob += same[frozenset((ga, gb))][gb]
            offsets_n += 1
            err = abs(e["offset_s"] - (ob - oa))
            worst = max(worst, err)
            offsets_ok += int(err <= 0.05)
    return {
        "groups_found": len(res["groups"]),
        "groups_true": sum(len(g["files"]) > 1 for g in manifest["groups"]),
        "pairs_true": len(true_pairs),
        "pairs_found": len(found_pairs),
        "pairs_related": len(related_pairs),
        "pairs_related_found": len(related_pairs & found_all),
        "precision": tp / len(found_pairs) if found_pairs else 1.0,
        "recall": tp / len(true_pairs) if true_pairs else 1.0,
        "evidence_offsets_right": offsets_ok,
        "evidence_offsets": offsets_n,
        "worst_offset_error_s": worst,
        "false_pairs": sorted(sorted(p) for p in found_pairs - true_pairs)[:200],
        "missed_pairs": sorted(sorted(p) for p in true_pairs - found_pairs)[:200],
    }


def batched_queries(
    db: str, plan: list[dict[str, Any]], backend: str, min_score: float, group_of: dict[str, str]
) -> dict[str, Any]:
    """The queries through ``match_many`` in one batch per length (the GPU path)."""
    from colabmagic.fingerprint import Index, load_audio
    from colabmagic.fingerprint.match import match_many

    idx = Index(db, readonly=True)
    out = {}
    for s in LENGTHS:
        qs = [q for q in plan if q["seconds"] == s]
        ys = [load_audio(q["file"]) for q in qs]
        match_many(idx, ys[:8], backend=backend, min_score=min_score)  # warm-up: index to device
        t0 = time.perf_counter()
        res = match_many(idx, ys, backend=backend, min_score=min_score)
        wall = time.perf_counter() - t0
        pairs = list(zip(qs, res, strict=True))
        ok = [bool(m) and q["truth"] == group_of.get(m[0].track) for q, m in pairs if q["truth"]]
        wrong = sum(bool(m) and q["truth"] != group_of.get(m[0].track) for q, m in pairs)
        recall = {}
        for cond in sorted({q["cond"] for q in qs}):
            hits = [
                bool(m) and q["truth"] == group_of.get(m[0].track)
                for q, m in pairs
                if q["truth"] and q["cond"] == cond
            ]
            recall[cond] = float(np.mean(hits)) if hits else None
        out[f"{s:g}s"] = {
            "queries": len(qs),
            "seconds": wall,
            "ms_per_query": 1000 * wall / len(qs),
            "recall_all_conditions": float(np.mean(ok)),
            "recall": recall,
            "false_positives": int(wrong),
        }
    return out


def relations(manifest: dict[str, Any]) -> tuple[dict[int, set[int]], dict[str, set[int]]]:
    """Groups that share music, from the manifest's ``related`` entries (``corpus.py``).

    Returns ``{group: related groups}`` and ``{held-out path: indexed groups it shares music
    with}``. A group that is the same recording as another shares whatever that one shares.
    """
    same = _same_recording(manifest)
    also: dict[int, set[int]] = {}
    for r in manifest.get("related", []):
        a, b = r["groups"]
        for x in same.get(a, {a}):
            for y in same.get(b, {b}) - {x}:
                also.setdefault(x, set()).add(y)
                also.setdefault(y, set()).add(x)
    held = {
        h["path"]: {g for r in h.get("related", []) for g in same.get(r["group"], {r["group"]})}
        for h in manifest["heldout"]
    }
    return also, held


def _same_recording(manifest: dict[str, Any]) -> dict[int, set[int]]:
    """``{group: every group holding the same recording}`` (itself included; only groups with
    a "same recording" relation are listed)."""
    comp: dict[int, set[int]] = {}
    for r in manifest.get("related", []):
        if r["kind"] == "same recording":
            a, b = r["groups"]
            merged = comp.get(a, {a}) | comp.get(b, {b})
            for g in merged:
                comp[g] = merged
    return comp


def _plan(
    args: argparse.Namespace, root: Path, manifest: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """The seeded query plan (the same queries for the same corpus, seed and counts), and the
    decoded sources."""
    rng = np.random.default_rng(args.seed)
    heldout = [str(root / h["path"]) for h in manifest["heldout"]]
    originals = {str(root / g["files"][0]["path"]): str(g["group"]) for g in manifest["groups"]}
    plan = plan_queries(sorted(originals.items()), args.queries, rng, CONDITIONS)
    plan += plan_queries(
        [(h, None) for h in sorted(heldout)], args.heldout_queries, rng, CONDITIONS
    )
    srcs = sorted({q["src"] for q in plan})
    audio = _decode_all(srcs, args.workers)
    for i, q in enumerate(plan):  # the start times, drawn in plan order as before
        y = audio[q["src"]]
        need = q["seconds"] * 1.06 + 0.5
        q["start"] = float(rng.uniform(0, max(0.0, len(y) / SR - need)))
        q["file"] = f"q{i:05d}"
    return plan, audio


def _write_plan(
    plan: list[dict[str, Any]], qdir: Path, workers: int, seed: int, audio: dict[str, Any]
) -> None:
    """Write the query files of *plan* that are not in *qdir* yet (noise seeded per query)."""
    qdir.mkdir(parents=True, exist_ok=True)
    todo = [q for q in plan if not list(qdir.glob(f"{Path(q['file']).stem}.*"))]
    need = sorted({q["src"] for q in todo} - set(audio))
    audio = {**audio, **(_decode_all(need, workers) if need else {})}
    for q in todo:
        rng = np.random.default_rng([seed, int(Path(q["file"]).stem[1:])])
        make_query(q["cond"], audio[q["src"]], q["src"], q["start"], q["seconds"], rng,
                   qdir / Path(q["file"]).stem)  # fmt: skip
    for q in plan:
        q["file"] = str(next(iter(qdir.glob(f"{Path(q['file']).stem}.*"))))


def corpus_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from colabmagic.fingerprint import DEFAULT_MIN_SCORE, Index

    root = Path(args.corpus).resolve()
    manifest = json.loads((root / "manifest.json").read_text())
    library = [
        (f["path"], str(root / f["path"]), g["group"])
        for g in manifest["groups"]
        for f in g["files"]
    ]
    heldout = [str(root / h["path"]) for h in manifest["heldout"]]
    steps = set(args.steps.split(","))
    if args.skip_index:
        steps -= {"index", "queries"}
    if args.skip_dedup:
        steps.discard("dedup")
    res: dict[str, Any] = {
        "corpus": str(root),
        "distinct_tracks": manifest["distinct_tracks"],
        "hours": manifest["hours"],
        "library_files": len(library),
        "library_hours": manifest["library_hours"],
        "heldout_tracks": len(heldout),
        "workers": args.workers,
        "backend": args.backend,
        "min_score": DEFAULT_MIN_SCORE,
        "steps": sorted(steps),
        "uptime_start": load(),
    }
    say(
        f"corpus: {len(library)} files, {manifest['library_hours']:.1f} h; "
        f"{len(heldout)} held out; {load()}"
    )
    keep = Path(args.workdir).resolve() if args.workdir else None
    tmp = keep or Path(tempfile.mkdtemp(prefix="fpscale-"))
    tmp.mkdir(parents=True, exist_ok=True)
    db = tmp / "db"
    files = [p for _, p, _ in library]
    decode_files = files
    if args.decode_sample < 1.0:  # the rate of a seeded share of the same files
        pick = np.random.default_rng(args.seed + 1).random(len(files)) < args.decode_sample
        decode_files = [f for f, keep_it in zip(files, pick, strict=True) if keep_it]
    res["decode_files"] = len(decode_files)
    d: dict[str, Any] = {}
    try:
        if "index" in steps:
            res["decode_before_index"] = d = decode_only(decode_files, args.workers)
            say(
                f"decode only: {d['x_realtime']:.0f}x realtime ({d['audio_s']:.0f} s in "
                f"{d['seconds']:.1f} s; {d['x_realtime_per_cpu_s']:.0f}x per CPU-second; "
                f"{d['load']})"
            )
            res["index"] = i = index_cli(
                db, [(rel, p) for rel, p, _ in library], args.backend, args.workers
            )
            i["vs_decode_only"] = i["x_realtime"] / d["x_realtime"]
            i["vs_decode_only_per_cpu_s"] = i["x_realtime_per_cpu_s"] / d["x_realtime_per_cpu_s"]
            say(
                f"fp index: {i['x_realtime']:.0f}x realtime from process start "
                f"({i['wall_s']:.1f} s) = {i['vs_decode_only']:.2f}x decode-only; "
                f"{i['x_realtime_per_cpu_s']:.0f}x per CPU-second "
                f"= {i['vs_decode_only_per_cpu_s']:.2f}x; "
                f"peak RSS {i['peak_rss_max'] / 1e6:.0f} MB "
                f"(tree {i['peak_rss_tree'] / 1e6:.0f} MB); {i['bytes_per_hash']:.1f} B/hash "
                f"({i['disk_bytes_per_hash']:.1f} on disk); {i['load']}"
            )
        elif "queries" in steps:
            if not (db / "manifest.json").exists():
                sys.exit(f"--steps without index: no index in {db}; run the index step first")
            say(f"reusing the index in {db} ({Index(db, readonly=True).n_hashes:,} hashes)")
        group_of = {rel: str(g) for rel, _, g in library}
        also, held_also = relations(manifest)
        if "queries" in steps:
            t0 = time.perf_counter()
            plan_file = tmp / "plan.json"
            key = [args.seed, args.queries, args.heldout_queries, str(root)]
            plan, audio = None, {}
            if keep and plan_file.exists():
                saved = json.loads(plan_file.read_text())
                plan = saved["plan"] if saved["key"] == key else None
            if plan is None:
                plan, audio = _plan(args, root, manifest)
                shutil.rmtree(tmp / "q", ignore_errors=True)
            _write_plan(plan, tmp / "q", args.workers, args.seed, audio)
            del audio
            if keep:
                plan_file.write_text(json.dumps({"key": key, "plan": plan}))
            for q in plan:
                rel = str(Path(q["src"]).relative_to(root))
                groups = also.get(int(q["truth"]), set()) if q["truth"] else held_also[rel]
                q["also"] = sorted(str(g) for g in groups)
            say(f"{len(plan)} query files ready in {time.perf_counter() - t0:.0f} s")
            run = [
                q
                for q in plan
                if (not args.conditions or q["cond"] in args.conditions.split(","))
                and (not args.lengths or f"{q['seconds']:g}" in args.lengths.split(","))
            ]
            if not args.batched_only:
                qres = run_queries(str(db), run, tmp, DEFAULT_MIN_SCORE, group_of)
                res["queries"] = qres
                for key_, c in qres["cells"].items():
                    cond, length = key_.split("@")
                    ref = WESNOTH_RECALL[cond][LENGTHS.index(float(length[:-1]))]
                    c["wesnoth_recall"] = ref
                    say(
                        f"  {key_:16s} recall {c['recall']:.1%} (35-track {ref:.1%}) "
                        f"of {c['positives']}, false positives {c['false_positives']} "
                        f"(of {c['negatives']} negatives), "
                        f"latency {c['latency_median_ms']:.1f} / {c['latency_p90_ms']:.1f} ms"
                    )
                lb = qres["latency_by_length"]
                say(
                    f"fp query: {qres['queries']} queries, {qres['false_positives']} false "
                    f"positives; latency median / p90 "
                    + "; ".join(
                        f"{k} {v['median_ms']:.1f} / {v['p90_ms']:.1f} ms (CPU "
                        f"{v['cpu_median_ms']:.1f} / {v['cpu_p90_ms']:.1f})"
                        for k, v in lb.items()
                    )
                    + f"; {qres['wall_per_query_ms']:.1f} ms per query from process start; "
                    f"{qres['load']}"
                )
            if args.backend != "numpy" or args.batched_only:
                b = batched_queries(str(db), run, args.backend, DEFAULT_MIN_SCORE, group_of)
                res["batched_queries"] = b
                say(f"match_many on {args.backend}: {json.dumps(b)}")
            res["queries_plan"] = run
        if "dedup" in steps:
            if not d or not args.decode_once:
                res["decode_before_dedup"] = d = decode_only(decode_files, args.workers)
                say(
                    f"decode only: {d['x_realtime']:.0f}x realtime, "
                    f"{d['x_realtime_per_cpu_s']:.0f}x per CPU-second ({d['load']})"
                )
            res["dedup"] = dd = dedup_cli(
                root / "library", manifest, root, args.workers, args.backend
            )
            dd["vs_decode_only"] = dd["x_realtime"] / d["x_realtime"]
            dd["vs_decode_only_per_cpu_s"] = dd["x_realtime_per_cpu_s"] / d["x_realtime_per_cpu_s"]
            say(
                f"fp dedup: {dd['files']} files, {dd['x_realtime']:.0f}x realtime from "
                f"process start = {dd['vs_decode_only']:.2f}x decode-only; "
                f"{dd['x_realtime_per_cpu_s']:.0f}x per CPU-second "
                f"= {dd['vs_decode_only_per_cpu_s']:.2f}x; "
                f"pairs precision {dd['precision']:.4f} "
                f"recall {dd['recall']:.4f} ({dd['pairs_found']} found / {dd['pairs_true']} true; "
                f"{dd['pairs_related_found']} of {dd['pairs_related']} pairs sharing a passage "
                f"found, counted neither way); "
                f"offsets within 50 ms {dd['evidence_offsets_right']}/{dd['evidence_offsets']} "
                f"(worst {1000 * dd['worst_offset_error_s']:.0f} ms); {dd['load']}"
            )
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    res["uptime_end"] = load()
    return res


# -- the 35-track Wesnoth library: the CLI against the library ------------------------------------


def wesnoth_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """``fp index`` / ``fp query`` from process start on the Wesnoth benchmark's 35 tracks."""
    from colabmagic.fingerprint import DEFAULT_MIN_SCORE, Index, load_audio
    from colabmagic.fingerprint.audio import find_audio
    from colabmagic.fingerprint.bench import WESNOTH_MUSIC

    files = find_audio([args.music_dir or WESNOTH_MUSIC])
    if len(files) < 8:
        sys.exit("needs wesnoth-1.16-music (apt-get install wesnoth-1.16-music) or --music-dir")
    held = [f for i, f in enumerate(files) if i % 7 == 3]  # the benchmark's split
    indexed = [f for f in files if f not in held]
    tmp = Path(tempfile.mkdtemp(prefix="fpcli-"))
    res: dict[str, Any] = {"indexed_tracks": len(indexed), "held_out_tracks": len(held)}
    try:
        runs = []
        for k in range(args.repeat):
            db = tmp / f"lib{k}"
            r0, c0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.process_time()
            t0 = time.perf_counter()
            s = Index(db).add(indexed, workers=args.workers, backend=args.backend)
            lib = s.audio_seconds / (time.perf_counter() - t0)
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            lib_cpu = time.process_time() - c0 + (r1.ru_utime - r0.ru_utime)
            lib_cpu += r1.ru_stime - r0.ru_stime
            c = index_cli(tmp / f"cli{k}", [(f, f) for f in indexed], args.backend, args.workers)
            runs.append(
                {
                    "library_x_realtime": lib,
                    "cli_x_realtime": c["x_realtime"],
                    "library_x_realtime_per_cpu_s": s.audio_seconds / lib_cpu,
                    "cli_x_realtime_per_cpu_s": c["x_realtime_per_cpu_s"],
                    "load": load(),
                }
            )
            say(
                f"index {len(indexed)} tracks ({s.audio_seconds:.0f} s): Index.add in-process "
                f"{lib:.0f}x realtime, `fp index --list` from process start "
                f"{c['x_realtime']:.0f}x ({c['x_realtime'] / lib:.2f} of the library); per "
                f"CPU-second {s.audio_seconds / lib_cpu:.0f}x and "
                f"{c['x_realtime_per_cpu_s']:.0f}x; {load()}"
            )
        res["index_runs"] = runs
        db = str(tmp / "cli0")
        rng = np.random.default_rng(args.seed)
        conds = ("clean", "snr0", "snr-5", "speed0.95", "speed1.05")
        plan = []
        for seconds in LENGTHS:
            for cond in conds:
                for f in files:
                    for _ in range(1 if f in held else 2):
                        truth = None if f in held else f
                        plan.append({"cond": cond, "seconds": seconds, "src": f, "truth": truth})
        audio = {f: load_audio(f) for f in files}
        (tmp / "q").mkdir()
        write_queries(plan, audio, rng, tmp / "q")
        group_of = {f: f for f in indexed}
        qruns = []
        for _ in range(args.repeat):
            q = run_queries(db, plan, tmp, DEFAULT_MIN_SCORE, group_of)
            q.pop("scores")
            qruns.append(q)
            lb = q["latency_by_length"]
            say(
                f"`fp query --list` {q['queries']} WAV excerpts: 5 s {lb['5s']['median_ms']:.1f} / "
                f"{lb['5s']['p90_ms']:.1f} ms, 10 s {lb['10s']['median_ms']:.1f} / "
                f"{lb['10s']['p90_ms']:.1f} ms (median / p90); CPU "
                f"{lb['5s']['cpu_median_ms']:.1f} / {lb['5s']['cpu_p90_ms']:.1f} and "
                f"{lb['10s']['cpu_median_ms']:.1f} / {lb['10s']['cpu_p90_ms']:.1f} ms; "
                f"{q['wall_per_query_ms']:.1f} ms per "
                f"query from process start; false positives {q['false_positives']}; {q['load']}"
            )
            for key, c in q["cells"].items():
                say(
                    f"  {key:16s} recall {c['recall']:.1%}, latency {c['latency_median_ms']:.1f} / "
                    f"{c['latency_p90_ms']:.1f} ms"
                )
        res["query_runs"] = qruns
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--corpus", help="directory built by benchmarks/corpus.py")
    mode.add_argument("--wesnoth", action="store_true", help="the 35-track CLI targets")
    ap.add_argument("--music-dir", help="--wesnoth: another music directory")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--backend", default="numpy", choices=["numpy", "cupy", "auto"])
    ap.add_argument("--queries", type=int, default=1000, help="excerpts of indexed tracks")
    ap.add_argument("--heldout-queries", type=int, default=300, help="excerpts of held-out ones")
    ap.add_argument("--repeat", type=int, default=2, help="--wesnoth: runs of each step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-index", action="store_true", help="--corpus: dedup only")
    ap.add_argument("--skip-dedup", action="store_true", help="--corpus: no dedup")
    ap.add_argument(
        "--decode-sample",
        type=float,
        default=1.0,
        help="--corpus: measure decode-only on this seeded share of the files [all]",
    )
    ap.add_argument(
        "--batched-only",
        action="store_true",
        help="--corpus: queries through match_many only (no `fp query` process)",
    )
    ap.add_argument(
        "--decode-once", action="store_true", help="--corpus: one decode-only run, not two"
    )
    ap.add_argument(
        "--workdir",
        help="--corpus: keep the index (DIR/db) and the query files (DIR/q) here, and reuse "
        "them when a later run names the same DIR and skips the index step",
    )
    ap.add_argument(
        "--steps",
        default="index,queries,dedup",
        help="--corpus: comma list of index, queries, dedup [all]; queries without index "
        "need --workdir with an index in it",
    )
    ap.add_argument("--conditions", help="--corpus: run only these query conditions (comma list)")
    ap.add_argument("--lengths", help="--corpus: run only these query lengths, e.g. 10")
    ap.add_argument("--json", dest="json_out", help="write every figure here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    res = corpus_benchmark(args) if args.corpus else wesnoth_benchmark(args)
    res["wall_s"] = time.perf_counter() - t0
    say(f"benchmark wall time {res['wall_s']:.0f} s; {load()}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
