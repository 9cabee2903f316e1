"""What the query path's posting budgets cost and buy, on a scale run's index and queries (#14).

    python benchmarks/fingerprint_scale.py --corpus C --workdir W --json scale.json   # first
    python benchmarks/fingerprint_caps.py --corpus C --workdir W --json scale.json \\
        [--budgets 60000/120000/256 120000/240000/256] [--conditions speed0.95,speed1.05,snr0]

Each query looks up a sample of its hashes (a fixed order of hash values) within a budget of
posting hits per stage: ``match.QUERY_HIT_BUDGET`` at the unchanged speed,
``match.SPEED_HIT_BUDGET`` over the two speed hypotheses its probe ranked best (each of the six
probed with ``match.PROBE_HIT_BUDGET``), never a hash over the index's stop list
(``index.MAX_POSTINGS`` bounds it).
Each ``--budgets`` entry ``B1/B2/M`` sets those three in this process — an experiment, not a
setting the tool offers — and runs the scale run's own query files (``queries_plan`` of its
``--json``) through :func:`colabmagic.fingerprint.match` on the kept index (``W/db``): recall
and false positives per cell, scored as ``fingerprint_scale.py`` scores them, CPU time per
query (``time.process_time``; the load average is printed) and the posting hits it looked up.
It also prints the share of clean queries' hashes over a few posting counts. The shipped
budgets (the default entry) should give the CLI's recall.
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


def shipped() -> str:
    """The budgets this colabmagic ships, as ``B1/B2/M``."""
    from colabmagic.fingerprint import index, match  # noqa: F401 (the modules, below)

    m, i = sys.modules["colabmagic.fingerprint.match"], sys.modules["colabmagic.fingerprint.index"]
    return f"{m.QUERY_HIT_BUDGET}/{m.SPEED_HIT_BUDGET}/{i.MAX_POSTINGS}"


def parse_budgets(text: str) -> tuple[int, int, int]:
    """``"B1/B2/M"`` -> (unchanged-speed budget, speed-stage budget, stop-list bound), >= 1."""
    try:
        b1, b2, m = (int(v) for v in text.split("/"))
    except ValueError:
        b1 = b2 = m = 0
    if min(b1, b2, m) < 1:
        msg = (
            f"--budgets {text!r}: give QUERY_HIT_BUDGET/SPEED_HIT_BUDGET/MAX_POSTINGS, "
            f"positive, e.g. {shipped()}"
        )
        raise SystemExit(msg)
    return b1, b2, m


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


def run_budgets(
    db: str,
    plan: list[dict[str, Any]],
    group_of: dict[str, str],
    budgets: tuple[int, int, int],
    min_score: float,
) -> dict[str, dict[str, Any]]:
    """Recall, false positives, CPU ms and posting hits per query of *plan*, per cell, under
    *budgets*."""
    from colabmagic.fingerprint import Index, match
    from colabmagic.fingerprint.audio import load_audio

    match_mod = sys.modules["colabmagic.fingerprint.match"]  # the package exports match()
    index_mod = sys.modules["colabmagic.fingerprint.index"]
    saved = match_mod.QUERY_HIT_BUDGET, match_mod.SPEED_HIT_BUDGET, index_mod.MAX_POSTINGS
    match_mod.QUERY_HIT_BUDGET, match_mod.SPEED_HIT_BUDGET, index_mod.MAX_POSTINGS = budgets
    try:
        idx = Index(db, readonly=True)
        hits: list[int] = []
        lookup = idx.lookup

        def counted(*a: Any, **k: Any) -> Any:
            found = lookup(*a, **k)
            hits.append(len(found[0]))
            return found

        idx.lookup = counted  # type: ignore[method-assign]
        cells: dict[str, dict[str, Any]] = {}
        for q in plan:
            y = load_audio(q["file"], sample_rate=8000)
            hits.clear()
            t0 = time.process_time()
            found = match(idx, y, top_k=1)
            cpu = time.process_time() - t0
            hit = bool(found) and found[0].score >= min_score
            group = group_of.get(found[0].track) if found else None
            right = group in {q["truth"], *q.get("also", ())}
            key = f"{q['cond']}@{q['seconds']:g}s"
            c = cells.setdefault(key, {"pos": [], "fp": 0, "ms": [], "hits": []})
            c["ms"].append(1000 * cpu)
            c["hits"].append(sum(hits))
            c["fp"] += int(hit and not right)
            if q["truth"] is not None:
                c["pos"].append(hit and right)
    finally:
        match_mod.QUERY_HIT_BUDGET, match_mod.SPEED_HIT_BUDGET, index_mod.MAX_POSTINGS = saved
    return {
        k: {
            "recall": float(np.mean(c["pos"])) if c["pos"] else None,
            "positives": len(c["pos"]),
            "false_positives": c["fp"],
            "cpu_median_ms": float(np.median(c["ms"])),
            "cpu_p90_ms": float(np.percentile(c["ms"], 90)),
            "hits_median": float(np.median(c["hits"])),
        }
        for k, c in sorted(cells.items())
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", required=True, help="directory built by benchmarks/corpus.py")
    ap.add_argument("--workdir", required=True, help="fingerprint_scale.py's --workdir (its db)")
    ap.add_argument("--json", required=True, help="fingerprint_scale.py's --json of that run")
    ap.add_argument("--budgets", nargs="+", help="B1/B2/M each (default: the shipped ones)")
    ap.add_argument("--conditions", default="speed0.95,speed1.05,snr0,snr-5")
    ap.add_argument("--out", help="write the figures here (JSON)")
    args = ap.parse_args(argv)
    budgets = [parse_budgets(b) for b in args.budgets or [shipped()]]
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
    counts = sorted({32, 64, 128, *(m for *_, m in budgets)})
    res: dict[str, Any] = {"hash_shares": hash_shares(Index(db, readonly=True), clean, counts)}
    print(f"clean queries' hashes: {json.dumps(res['hash_shares'])}", flush=True)
    for b in budgets:
        name = "/".join(map(str, b))
        res[name] = cells = run_budgets(db, plan, group_of, b, run["min_score"])
        a, b, d = os.getloadavg()
        for k, v in cells.items():
            print(
                f"{name:20s} {k:15s} recall {v['recall']:6.1%} of {v['positives']}, "
                f"false positives {v['false_positives']}, CPU median / p90 "
                f"{v['cpu_median_ms']:.1f} / {v['cpu_p90_ms']:.1f} ms, "
                f"{v['hits_median']:.0f} posting hits (median); "
                f"load {a:.2f} {b:.2f} {d:.2f}",
                flush=True,
            )
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
