"""What the query path's posting caps cost and buy, on a scale run's index and queries (issue 14).

    python benchmarks/fingerprint_scale.py --corpus C --workdir W --json scale.json   # first
    python benchmarks/fingerprint_caps.py --corpus C --workdir W --json scale.json \\
        [--caps 256/1/256 128/4/256] [--conditions speed0.95,speed1.05,snr0,snr-5]

A query skips hashes with more postings than ``match.QUERY_MAX_POSTINGS`` (the speed stage:
that // ``match.SPEED_STOP``; and never above the index's stop list, ``index.MAX_POSTINGS``).
Each ``--caps`` entry ``Q/S/M`` sets those three in this process — an experiment, not a setting
the tool offers — and runs the scale run's own query files (``queries_plan`` of its ``--json``)
through :func:`colabmagic.fingerprint.match` on the kept index (``W/db``): recall and false
positives per cell, scored as ``fingerprint_scale.py`` scores them, and CPU time per query
(``time.process_time``; the load average is printed). It also prints the share of clean
queries' hashes over each cap. The shipped caps (``128/4/256``) should give the CLI's recall.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SHIPPED = "128/4/256"


def parse_caps(text: str) -> tuple[int, int, int]:
    """``"Q/S/M"`` -> (query cap, speed-stage divisor, index stop-list bound), all >= 1."""
    try:
        q, s, m = (int(v) for v in text.split("/"))
    except ValueError:
        q = s = m = 0
    if min(q, s, m) < 1:
        msg = f"--caps {text!r}: give QUERY_MAX/SPEED_STOP/MAX_POSTINGS, positive, e.g. {SHIPPED}"
        raise SystemExit(msg)
    return q, s, m


def hash_shares(index: Any, files: list[str], caps: tuple[int, ...]) -> dict[str, float]:
    """Share of the unchanged-speed hashes of *files* with more postings than each cap, and the
    median (over queries) of their median postings."""
    from colabmagic.fingerprint.audio import load_audio

    over = dict.fromkeys(caps, 0)
    n, medians = 0, []
    for f in files:
        fp = index.fingerprinter.fingerprint(load_audio(f, sample_rate=8000), query=True)
        h = fp.hashes if fp.variant is None else fp.hashes[fp.variant == 0]
        p = index.postings_per_hash(h)
        n += len(p)
        medians.append(float(np.median(p)) if len(p) else 0.0)
        for c in caps:
            over[c] += int((p > c).sum())
    out = {f"over_{c}": v / max(n, 1) for c, v in over.items()}
    out["median_postings"] = float(np.median(medians)) if medians else 0.0
    return out


def run_caps(
    db: str,
    plan: list[dict[str, Any]],
    group_of: dict[str, str],
    caps: tuple[int, int, int],
    min_score: float,
) -> dict[str, dict[str, Any]]:
    """Recall, false positives and CPU ms per query of *plan*, per cell, under *caps*."""
    from colabmagic.fingerprint import Index, match
    from colabmagic.fingerprint.audio import load_audio

    match_mod = sys.modules["colabmagic.fingerprint.match"]  # the package exports match()
    index_mod = sys.modules["colabmagic.fingerprint.index"]
    saved = match_mod.QUERY_MAX_POSTINGS, match_mod.SPEED_STOP, index_mod.MAX_POSTINGS
    match_mod.QUERY_MAX_POSTINGS, match_mod.SPEED_STOP, index_mod.MAX_POSTINGS = caps
    try:
        idx = Index(db, readonly=True)
        cells: dict[str, dict[str, Any]] = {}
        for q in plan:
            y = load_audio(q["file"], sample_rate=8000)
            t0 = time.process_time()
            found = match(idx, y, top_k=1)
            cpu = time.process_time() - t0
            hit = bool(found) and found[0].score >= min_score
            group = group_of.get(found[0].track) if found else None
            right = group in {q["truth"], *q.get("also", ())}
            c = cells.setdefault(f"{q['cond']}@{q['seconds']:g}s", {"pos": [], "fp": 0, "ms": []})
            c["ms"].append(1000 * cpu)
            c["fp"] += int(hit and not right)
            if q["truth"] is not None:
                c["pos"].append(hit and right)
    finally:
        match_mod.QUERY_MAX_POSTINGS, match_mod.SPEED_STOP, index_mod.MAX_POSTINGS = saved
    return {
        k: {
            "recall": float(np.mean(c["pos"])) if c["pos"] else None,
            "positives": len(c["pos"]),
            "false_positives": c["fp"],
            "cpu_median_ms": float(np.median(c["ms"])),
            "cpu_p90_ms": float(np.percentile(c["ms"], 90)),
        }
        for k, c in sorted(cells.items())
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", required=True, help="directory built by benchmarks/corpus.py")
    ap.add_argument("--workdir", required=True, help="fingerprint_scale.py's --workdir (its db)")
    ap.add_argument("--json", required=True, help="fingerprint_scale.py's --json of that run")
    ap.add_argument("--caps", nargs="+", default=["256/1/256", SHIPPED], help="Q/S/M each")
    ap.add_argument("--conditions", default="speed0.95,speed1.05,snr0,snr-5")
    ap.add_argument("--out", help="write the figures here (JSON)")
    args = ap.parse_args(argv)
    caps = [parse_caps(c) for c in args.caps]
    run = json.loads(Path(args.json).read_text())
    if "queries_plan" not in run:
        raise SystemExit(f"{args.json}: no queries_plan; run fingerprint_scale.py with queries")
    manifest = json.loads((Path(args.corpus) / "manifest.json").read_text())
    group_of = {f["path"]: str(g["group"]) for g in manifest["groups"] for f in g["files"]}
    conds = set(args.conditions.split(","))
    plan = [q for q in run["queries_plan"] if q["cond"] in conds]
    db = str(Path(args.workdir) / "db")
    from colabmagic.fingerprint import Index

    clean = [q["file"] for q in run["queries_plan"] if q["cond"] == "clean" and q["truth"]][:40]
    stops = sorted({c for q, s, m in caps for c in (q, max(q // s, 1), m)})
    res: dict[str, Any] = {"hash_shares": hash_shares(Index(db, readonly=True), clean, stops)}
    print(f"clean queries' hashes: {json.dumps(res['hash_shares'])}", flush=True)
    for c in caps:
        name = "/".join(map(str, c))
        res[name] = cells = run_caps(db, plan, group_of, c, run["min_score"])
        a, b, d = os.getloadavg()
        for k, v in cells.items():
            print(
                f"{name:12s} {k:15s} recall {v['recall']:6.1%} of {v['positives']}, "
                f"false positives {v['false_positives']}, CPU median / p90 "
                f"{v['cpu_median_ms']:.1f} / {v['cpu_p90_ms']:.1f} ms; "
                f"load {a:.2f} {b:.2f} {d:.2f}",
                flush=True,
            )
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
