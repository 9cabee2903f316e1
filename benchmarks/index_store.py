"""Which store for the on-disk fingerprint index: NumPy memmap, SQLite or LMDB (issue 18).

The index's one hot operation: all postings of a query's ~1,000 hashes (21-bit values) among
N stored ``(hash, posting)`` rows. Each store holds the same synthetic rows (hash uniform in
21 bits, as the fingerprinter's are close to), is queried with the same random hash sets
from a warm page cache, and is measured for bytes on disk per row:

- memmap: sorted ``uint32`` hashes + ``uint64`` postings in ``.npy`` files (the index's format),
  ``np.searchsorted`` for all query hashes at once, then one gather;
- SQLite (stdlib): ``CREATE TABLE t(h INTEGER, p INTEGER)`` with an index on ``h``, one
  ``SELECT ... WHERE h IN (...)`` per query;
- LMDB (``pip install lmdb``, skipped if absent): one dup-sorted key per hash,
  ``Cursor.getmulti`` per query.

    python benchmarks/index_store.py [--rows 2000000] [--queries 50]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench(name: str, lookup, queries: list[np.ndarray]) -> float:
    lookup(queries[0])  # warm
    times = []
    for q in queries:
        t0 = time.perf_counter()
        lookup(q)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--query-hashes", type=int, default=1000)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    h = rng.integers(0, 1 << 21, args.rows, dtype=np.uint32)
    p = rng.integers(0, 1 << 40, args.rows, dtype=np.uint64)
    order = np.argsort(h, kind="stable")
    h, p = h[order], p[order]
    queries = [
        rng.integers(0, 1 << 21, args.query_hashes, dtype=np.uint32) for _ in range(args.queries)
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fpstore-") as tmp:
        root = Path(tmp)
        # memmap
        np.save(root / "h.npy", h)
        np.save(root / "p.npy", p)
        mh = np.load(root / "h.npy", mmap_mode="r")
        mp = np.load(root / "p.npy", mmap_mode="r")

        def mm(q: np.ndarray) -> np.ndarray:
            lo = np.searchsorted(mh, q, "left")
            hi = np.searchsorted(mh, q, "right")
            n = hi - lo
            first = np.repeat(lo - (np.cumsum(n) - n), n)
            return mp[first + np.arange(int(n.sum()))]

        size = du(root / "h.npy") + du(root / "p.npy")
        rows.append(("memmap (.npy)", bench("memmap", mm, queries), size))
        # SQLite
        db = sqlite3.connect(root / "s.db")
        db.execute("CREATE TABLE t(h INTEGER, p INTEGER)")
        db.executemany("INSERT INTO t VALUES (?, ?)", zip(h.tolist(), p.tolist(), strict=True))
        db.execute("CREATE INDEX ih ON t(h)")
        db.commit()

        def sq(q: np.ndarray) -> list:
            marks = ",".join("?" * len(q))
            return db.execute(f"SELECT h, p FROM t WHERE h IN ({marks})", q.tolist()).fetchall()

        rows.append(("SQLite (index on h)", bench("sqlite", sq, queries), du(root / "s.db")))
        db.close()
        # LMDB
        try:
            import lmdb
        except ImportError:
            print("lmdb not installed: pip install lmdb to include it", file=sys.stderr)
        else:
            env = lmdb.open(str(root / "l.lmdb"), map_size=1 << 34, max_dbs=1, sync=False)
            ldb = env.open_db(b"t", dupsort=True)
            with env.begin(write=True, db=ldb) as txn:
                cur = txn.cursor()
                keys = h.astype(">u4")
                vals = p.astype(">u8")
                cur.putmulti(
                    ((keys[i].tobytes(), vals[i].tobytes()) for i in range(len(keys))),
                    dupdata=True,
                    append=False,
                )
            env.sync()
            txn = env.begin(db=ldb)
            cur = txn.cursor()

            def lm(q: np.ndarray) -> list:
                return cur.getmulti([k.tobytes() for k in q.astype(">u4")], dupdata=True)

            rows.append(("LMDB (dupsort)", bench("lmdb", lm, queries), du(root / "l.lmdb")))
            env.close()
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"{args.rows} rows, {args.query_hashes} hashes per query, load {load}, pid {os.getpid()}")
    for name, ms, size in rows:
        print(f"  {name:22s} {ms:8.2f} ms per query   {size / args.rows:6.1f} bytes per row")
    return 0


if __name__ == "__main__":
    sys.exit(main())
