"""Where dedup's CPU goes: its query phase on an existing index, section by section (issue 14).

    nice -n 19 python benchmarks/dedup_profile.py --db ~/fpwork/db [--files 200] [--threads 2]
    nice -n 19 python benchmarks/dedup_profile.py --phases ~/fpcorpus/library --db ~/fpwork/db

``fp dedup`` is decode + fingerprint (the worker processes), the index build and spill (the
parent), then one query per file against the index of all files. This replays the query phase
on an index that ``fp index`` built from the same files (``fingerprint_scale.py --workdir`` keeps
one): every track's sampled hashes are read back from the index's own postings, exactly the
hashes dedup spills, and queried as dedup queries them. Printed: the whole phase's CPU and wall
and its edges (``--json`` keeps them, so two versions of the code can be compared edge for
edge), then a seeded sample of ``--files`` files timed section by section (process CPU): the
lookups (ranges and postings gathered), building the packed keys, and the counting/ranking of
:func:`~colabmagic.fingerprint.dedup._best_offsets`; with the hits' and offsets' counts.
``--phases LIBRARY`` instead runs the whole of ``dedup()`` in this process and splits its CPU by
phase (this process's own and its worker processes').
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import time
from typing import Any

import numpy as np

D = importlib.import_module("colabmagic.fingerprint.dedup")  # the module, not the function


def load() -> str:
    a, b, c = os.getloadavg()
    return f"load {a:.2f} {b:.2f} {c:.2f} on {os.cpu_count()} CPUs"


class Spill:
    """dedup's spill of sampled hashes, rebuilt from an index's postings."""

    def __init__(self, index: Any, sample: int = 4) -> None:
        hashes = np.concatenate([np.asarray(s.hashes) for s in index._shards])
        postings = np.concatenate([np.asarray(s.postings) for s in index._shards])
        keep = D._sample(hashes, sample)
        hashes, postings = hashes[keep], postings[keep]
        track = (postings >> np.uint64(32)).astype(np.int64)
        times = (postings & np.uint64(0xFFFFFFFF)).astype(np.int32)
        order = np.lexsort((times, track))
        self.hashes, self.times = hashes[order], times[order]
        numbers = [t.number for t in index.tracks]
        self.offsets = [int(x) for x in np.searchsorted(track[order], np.arange(max(numbers) + 2))]

    def fingerprint(self, number: int) -> Any:
        a, b = self.offsets[number], self.offsets[number + 1]
        return D.Fingerprint(self.hashes[a:b], self.times[a:b], np.zeros(b - a, np.int8))


def sections(index: Any, spill: Spill, numbers: list[int], min_count: int) -> dict[str, Any]:
    """_file_votes, section by section, for *numbers* (each counting the tracks after it)."""
    cpu: dict[str, float] = {}
    n_hits = n_keys = n_offsets = single = 0
    stop = index.stop_postings

    def tick(name: str, t0: float) -> float:
        t = time.process_time()
        cpu[name] = cpu.get(name, 0.0) + t - t0
        return t

    for i in numbers:
        fp = spill.fingerprint(i)
        t = time.process_time()
        order = np.argsort(fp.times, kind="stable")
        hits = index.postings_per_hash(fp.hashes[order])
        hits[hits > stop] = 0
        times = fp.times.astype(np.int64)
        keys = []
        t = tick("hits per hash, windows", t)
        for a, b in D._windows(hits, D.QUERY_CHUNK, D.QUERY_HITS):
            sel = order[a:b]
            which, track, ref = index.lookup(fp.hashes[sel], max_postings=stop)
            n_hits += len(which)
            t = tick("lookup (ranges, postings gathered)", t)
            keep = track > i
            which, track, ref = which[keep], track[keep], ref[keep]
            keys.append(track * (2 * D._BIAS) + (ref - times[sel][which] + D._BIAS))
            t = tick("later tracks' hits, packed keys", t)
        key = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        t = tick("later tracks' hits, packed keys", t)
        D._best_offsets(key, min_count)
        tick("counting and ranking (_best_offsets)", t)
        _, c = np.unique(key, return_counts=True)
        n_keys += len(key)
        n_offsets += len(c)
        single += int((c == 1).sum())
    total = sum(cpu.values())
    return {
        "files": len(numbers),
        "cpu_s": total,
        "sections": {k: {"cpu_s": v, "share": v / total if total else 0.0} for k, v in cpu.items()},
        "hits": n_hits,
        "later_hits": n_keys,
        "offsets": n_offsets,
        "offsets_hit_once": single / n_offsets if n_offsets else 0.0,
        "load": load(),
    }


def phases(library: str, work_dir: str | None, workers: int) -> dict[str, Any]:
    """dedup() in this process on *library*, CPU by phase: this process's own (index build,
    spill, queries, grouping) and its reaped children's (the workers and their ffmpegs:
    decode + fingerprint), read at each phase boundary."""
    import resource

    from colabmagic.fingerprint import index as ix
    from colabmagic.fingerprint import pipeline

    marks: list[tuple[str, float, float, float]] = []

    def mark(label: str) -> None:
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        marks.append(
            (label, time.perf_counter(), me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime)
        )

    def timed(obj: Any, name: str, label: str) -> None:
        real = getattr(obj, name)

        def run(*a: Any, **k: Any) -> Any:
            mark(f"{label} start")
            try:
                return real(*a, **k)
            finally:
                mark(f"{label} end")

        setattr(obj, name, run)

    timed(ix.Index, "_compact_locked", "final merge")
    timed(D, "_query_edges", "queries")
    timed(D, "_collect_groups", "grouping")
    real_pool = pipeline._pool_map

    def pool_map(*a: Any, **k: Any) -> Any:
        yield from real_pool(*a, **k)
        mark("workers done")

    pipeline._pool_map = pool_map
    mark("start")
    res = D.dedup([library], workers=workers, backend="numpy", work_dir=work_dir)
    mark("end")
    out = [
        {
            "phase": f"{a[0]} -> {b[0]}",
            "wall_s": b[1] - a[1],
            "self_cpu_s": b[2] - a[2],
            "children_cpu_s": b[3] - a[3],
        }
        for a, b in itertools.pairwise(marks)
    ]
    return {"phases": out, "audio_s": res.audio_seconds, "groups": len(res.groups), "load": load()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True, help="an index fp index built from the files")
    ap.add_argument("--files", type=int, default=200, help="sample timed by section")
    ap.add_argument("--threads", type=int, default=2, help="query threads (dedup's --workers)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-whole", action="store_true", help="only the sampled sections")
    ap.add_argument("--json", dest="json_out", help="figures and the whole phase's edges")
    ap.add_argument("--phases", metavar="LIBRARY", help="instead: dedup() on LIBRARY, by phase")
    ap.add_argument("--work-dir", help="--phases: dedup's temporary index goes here")
    args = ap.parse_args()
    if args.phases:
        r = phases(args.phases, args.work_dir, args.threads)
        for p in r["phases"]:
            print(f"  {p['phase']:36s} wall {p['wall_s']:7.1f} s, this process "
                  f"{p['self_cpu_s']:6.1f} CPU-s, workers {p['children_cpu_s']:6.1f}")  # fmt: skip
        print(f"{r['audio_s']:.0f} s of audio, {r['groups']} groups; {r['load']}")
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(r, f, indent=1)
        return
    from colabmagic.fingerprint.index import Index

    index = Index(args.db, readonly=True)
    t0 = time.perf_counter()
    spill = Spill(index)
    print(
        f"spill rebuilt: {len(spill.hashes):,} sampled hashes in {time.perf_counter() - t0:.1f} s"
    )
    tracks = index.tracks
    res: dict[str, Any] = {"db": args.db, "tracks": len(tracks), "stop": index.stop_postings}
    if not args.skip_whole:
        c0, w0 = time.process_time(), time.perf_counter()
        edges = D._query_edges(
            index, spill, tracks, index.fingerprinter, args.threads, 256, 10, 0.05
        )
        res["whole"] = {
            "cpu_s": time.process_time() - c0,
            "wall_s": time.perf_counter() - w0,
            "edges": len(edges),
            "load": load(),
        }
        print(f"query phase, {len(tracks)} files: {json.dumps(res['whole'])}")
        res["edges"] = {
            f"{tracks[i].id}|{tracks[j].id}": [e.aligned, e.fraction, e.offset_s]
            for (i, j), e in sorted(edges.items())
        }
    rng = np.random.default_rng(args.seed)
    pick = sorted(int(x) for x in rng.choice(len(tracks), min(args.files, len(tracks)), False))
    index.plan_lookups(len(spill.hashes))
    res["sample"] = s = sections(index, spill, [tracks[i].number for i in pick], 10)
    print(f"{s['files']} sampled files: {s['cpu_s']:.1f} CPU-s ({s['load']}); "
          f"{s['hits']:,} hits, {s['later_hits']:,} on later tracks, {s['offsets']:,} offsets "
          f"({s['offsets_hit_once']:.1%} hit once)")  # fmt: skip
    for name, v in s["sections"].items():
        print(f"  {name:40s} {v['cpu_s']:7.2f} CPU-s  {v['share']:6.1%}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
