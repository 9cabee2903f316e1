"""Fingerprinting benchmark on real music (issue 6): recall at zero false positives, speed, size.

Needs Debian's ``wesnoth-1.16-music`` (``apt-get install wesnoth-1.16-music``) or ``--music-dir``.

    python benchmarks/fingerprint.py                       # ~5 min on 2 cores
    python benchmarks/fingerprint.py --backend cupy --json out.json

Prints the figures quoted in docs/fingerprint.md; ``--json`` also writes them (with every score).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from colabmagic.fingerprint.bench import (
    CONDITIONS,
    WESNOTH_MUSIC,
    dedup_benchmark,
    run_benchmark,
    summary_lines,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--music-dir", default=WESNOTH_MUSIC)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--backend", default="numpy", choices=["numpy", "cupy", "auto"])
    ap.add_argument("--queries-per-track", type=int, default=2)
    ap.add_argument("--conditions", default=",".join(CONDITIONS))
    ap.add_argument("--dedup-tracks", type=int, default=8, help="dedup check (0: skip)")
    ap.add_argument("--json", dest="json_out", help="write all figures (and scores) here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    res = run_benchmark(
        music_dir=args.music_dir,
        workers=args.workers,
        backend=args.backend,
        queries_per_track=args.queries_per_track,
        conditions=tuple(args.conditions.split(",")),
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print("\n".join(summary_lines(res)))
    if args.dedup_tracks:
        d = dedup_benchmark(
            music_dir=args.music_dir,
            n_tracks=args.dedup_tracks,
            workers=args.workers,
            backend=args.backend,
        )
        res["dedup"] = d
        print(
            f"dedup: {d['files']} files ({d['audio_s']:.0f} s) in {d['seconds']:.1f} s = "
            f"{d['x_realtime']:.0f}x realtime; copies grouped {d['copies_found']}/{d['copies']}, "
            f"offsets right {d['offsets_right']}/{d['copies']}, unrelated files grouped "
            f"{d['unrelated_grouped']}"
        )
    print(f"benchmark wall time: {time.perf_counter() - t0:.0f} s")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
