"""The fingerprinting benchmark on real music (``fp bench``, ``benchmarks/fingerprint.py``).

Indexes most tracks of a music directory (Debian's ``wesnoth-1.16-music`` by default), holds every
seventh track out as negatives, and queries 5 s and 10 s excerpts of every track under several
degradations: clean, white noise at +10/0/-5 dB SNR, a 64 kbit/s MP3 re-encode, and playback
speed 0.95/1.05. Reports recall at the tool's threshold and the false positives it let through
(queries of held-out tracks, or a wrong track), the share of found excerpts whose offset is within
0.25 s (Wesnoth tracks repeat whole passages, so a found repeat counts as found), indexing speed,
query latency and index size.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from colabmagic.errors import ParameterError
from colabmagic.fingerprint.audio import find_audio, load_audio
from colabmagic.fingerprint.fingerprinter import Fingerprinter
from colabmagic.fingerprint.index import Index
from colabmagic.fingerprint.match import DEFAULT_MIN_SCORE, candidates

WESNOTH_MUSIC = "/usr/share/games/wesnoth/1.16/data/core/music"
CONDITIONS = ("clean", "snr+10", "snr0", "snr-5", "mp3_64k", "speed0.95", "speed1.05")


def _degrade(
    condition: str,
    y: np.ndarray,
    path: str,
    start: float,
    seconds: float,
    sr: int,
    rng: Any,
    tmp: Path,
) -> np.ndarray:
    a = int(start * sr)
    if condition.startswith("speed"):
        import soxr

        s = float(condition[5:])
        src = y[a : a + int(seconds * s * sr) + 1]
        return soxr.resample(src, round(sr * s), sr).astype(np.float32)
    q = y[a : a + int(seconds * sr)]
    if condition.startswith("snr"):
        snr = float(condition[3:])
        noise = rng.standard_normal(len(q)).astype(np.float32)
        return q + noise * np.float32(np.sqrt(np.mean(q**2) / 10 ** (snr / 10)))
    if condition == "mp3_64k":  # re-encode the excerpt of the original file, decode it again
        out = tmp / "q.mp3"
        cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-ss", f"{start:.3f}", "-t"]
        cmd += [f"{seconds:.3f}", "-i", path, "-ac", "2", "-b:a", "64k", str(out)]
        subprocess.run(cmd, check=True)
        return load_audio(out, sample_rate=sr)
    return q


def run_benchmark(
    *,
    music_dir: str = WESNOTH_MUSIC,
    db: str | None = None,
    workers: int = 2,
    backend: str = "numpy",
    queries_per_track: int = 2,
    lengths: tuple[float, ...] = (5.0, 10.0),
    conditions: tuple[str, ...] = CONDITIONS,
    min_score: float = DEFAULT_MIN_SCORE,
    seed: int = 0,
    fingerprinter: Fingerprinter | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark and return its figures as a dict (see the module docstring).

    Parameters
    ----------
    music_dir : str
        Directory of audio files (at least 8).
    db : str, optional
        Index directory to (re)build; a temporary one by default.
    workers : int
        Decode + extract processes for indexing.
    backend : {"numpy", "cupy", "auto"}
        Where hashes are computed.
    queries_per_track : int
        Excerpts per track, condition and length (held-out tracks get three times as many).
    lengths : tuple of float
        Query lengths in seconds.
    conditions : tuple of str
        Subset of :data:`CONDITIONS`.
    min_score : float
        The decision threshold under test.
    seed : int
        Excerpt positions and noise.
    fingerprinter : Fingerprinter, optional
        Parameters under test (the defaults otherwise).
    log : callable, optional
        Receives one progress line per finished block (the CLI prints them).
    """
    say = log or (lambda _line: None)
    files = find_audio([music_dir])
    if len(files) < 8:
        msg = (
            f"music_dir={music_dir!r} holds {len(files)} audio files, the benchmark needs >= 8: "
            "apt-get install wesnoth-1.16-music, or pass another directory (--music-dir)."
        )
        raise ParameterError(msg)
    unknown = set(conditions) - set(CONDITIONS)
    if unknown:
        msg = f"conditions {sorted(unknown)} unknown; use some of {', '.join(CONDITIONS)}."
        raise ParameterError(msg)
    held_out = [f for i, f in enumerate(files) if i % 7 == 3]
    indexed = [f for f in files if f not in held_out]
    tmp = Path(tempfile.mkdtemp(prefix="fpbench-"))
    db_path = Path(db) if db else tmp / "db"
    shutil.rmtree(db_path, ignore_errors=True)
    res: dict[str, Any] = {
        "music_dir": music_dir,
        "indexed_tracks": len(indexed),
        "held_out_tracks": len(held_out),
        "workers": workers,
        "backend": backend,
        "min_score": min_score,
    }
    try:
        index = Index(db_path, fingerprinter=fingerprinter)
        summary = index.add(indexed, workers=workers, backend=backend)
        info = index.info()
        res["index"] = {
            "audio_s": summary.audio_seconds,
            "seconds": summary.elapsed_s,
            "x_realtime": summary.x_realtime,
            "n_hashes": info["n_hashes"],
            "bytes": info["memory_bytes"],
            "bytes_per_hash": info["bytes_per_hash"],
        }
        say(
            f"indexed {len(indexed)} tracks, {summary.audio_seconds:.0f} s of audio in "
            f"{summary.elapsed_s:.1f} s: {summary.x_realtime:.0f}x realtime"
        )
        fpr = index.fingerprinter
        sr = fpr.sample_rate
        audio = {f: load_audio(f, sample_rate=sr) for f in files}
        total = sum(len(y) for y in audio.values()) / sr
        t0 = time.perf_counter()
        fpr.fingerprint_batch(list(audio.values()), backend=backend)
        ext = time.perf_counter() - t0
        res["extract_x_realtime_1core"] = total / ext
        say(f"extraction alone (decoded audio, one process): {total / ext:.0f}x realtime")
        rng = np.random.default_rng(seed)
        id_of = {t.path: t.id for t in index.tracks}
        res["conditions"] = {}
        all_neg: list[int] = []
        for seconds in lengths:
            for cond in conditions:
                pos, neg, lat, wrong, off_ok = [], [], [], 0, []
                for f in files:
                    y = audio[f]
                    n = queries_per_track * (3 if f in held_out else 1)
                    need = seconds * 1.06 + 0.5
                    if len(y) / sr < need + 1:
                        continue
                    for start in rng.uniform(0, len(y) / sr - need, size=n):
                        q = _degrade(cond, y, f, float(start), seconds, sr, rng, tmp)
                        t0 = time.perf_counter()
                        v = candidates(index, q, min_score=min_score, backend=backend)
                        tracks, scores, offsets = v.track, v.score, v.offset
                        lat.append(time.perf_counter() - t0)
                        best = float(scores[0]) if len(scores) else 0.0
                        if f in held_out:
                            neg.append(best)
                            continue
                        ok = (
                            len(tracks)
                            and index.track(int(tracks[0])).id == id_of[str(Path(f).resolve())]
                        )
                        pos.append(best if ok else 0.0)
                        wrong += int(not ok and best >= min_score)
                        if ok and best >= min_score:  # game music loops: a repeat is no error
                            err = abs(offsets[0] * fpr.frame_seconds - start)
                            off_ok.append(err < 0.25 or cond.startswith("speed"))
                pos_a, neg_a = np.array(pos), np.array(neg)
                all_neg.extend(neg)
                key = f"{cond}@{seconds:g}s"
                res["conditions"][key] = {
                    "queries": len(pos) + len(neg),
                    "recall": float(np.mean(pos_a >= min_score)),
                    "false_positives": int(np.sum(neg_a >= min_score)) + wrong,
                    "offset_within_0.25s": float(np.mean(off_ok)) if off_ok else None,
                    "negatives": len(neg),
                    "max_negative_score": float(neg_a.max()),
                    "latency_median_ms": 1000 * float(np.median(lat)),
                    "latency_p90_ms": 1000 * float(np.percentile(lat, 90)),
                    "pos_scores": [round(x, 3) for x in pos],
                    "neg_scores": [round(x, 3) for x in neg],
                }
                c = res["conditions"][key]
                say(
                    f"{key:18s} recall {c['recall']:6.1%}  FP {c['false_positives']}/"
                    f"{c['negatives']}  max neg {c['max_negative_score']:5.2f}  latency "
                    f"{c['latency_median_ms']:.1f}/{c['latency_p90_ms']:.1f} ms (median/p90)"
                )
        scan = []  # every window (2 s steps) of every held-out track, clean, at each length
        for seconds in lengths:
            n = int(seconds * sr)
            for f in held_out:
                y = audio[f]
                for a in range(0, max(len(y) - n, 0), 2 * sr):
                    v = candidates(index, y[a : a + n], min_score=min_score, backend=backend)
                    scan.append(float(v.score[0]) if len(v.score) else 0.0)
        res["held_out_scan"] = {
            "windows": len(scan),
            "lengths_s": list(lengths),
            "max_score": max(scan, default=0.0),
            "false_positives": int(np.sum(np.array(scan) >= min_score)),
            "scores": [round(x, 3) for x in scan],
        }
        say(
            f"held-out scan: {len(scan)} windows of {'/'.join(f'{x:g}' for x in lengths)} s, "
            f"max score {res['held_out_scan']['max_score']:.2f}, "
            f"{res['held_out_scan']['false_positives']} above the threshold"
        )
        n_fp = sum(c["false_positives"] for c in res["conditions"].values())
        n_neg = sum(c["negatives"] for c in res["conditions"].values())
        res["false_positive_rate"] = n_fp / max(n_neg, 1)
        res["max_negative_score"] = max(all_neg) if all_neg else 0
        res["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def summary_lines(res: dict[str, Any]) -> list[str]:
    """Human-readable lines of a :func:`run_benchmark` result."""
    ix = res["index"]
    lines = [
        f"library: {res['indexed_tracks']} indexed + {res['held_out_tracks']} held-out tracks, "
        f"{ix['audio_s']:.0f} s indexed",
        f"indexing: {ix['x_realtime']:.0f}x realtime with decoding ({res['workers']} workers); "
        f"extraction alone {res['extract_x_realtime_1core']:.0f}x realtime per process",
        f"index: {ix['n_hashes']} hashes, {ix['bytes'] / 1e6:.1f} MB, "
        f"{ix['bytes_per_hash']:.1f} bytes/hash; peak RSS {res['max_rss_bytes'] / 1e6:.0f} MB",
        f"threshold {res['min_score']}: false-positive rate {res['false_positive_rate']:.2%}, "
        f"highest score of a non-indexed query {res['max_negative_score']:.2f}; every "
        f"window of the held-out tracks ({res['held_out_scan']['windows']}): max "
        f"{res['held_out_scan']['max_score']:.2f}, {res['held_out_scan']['false_positives']} "
        "above the threshold",
        f"{'condition':18s} {'recall':>7s} {'FP':>4s} {'median':>8s} {'p90':>8s}",
    ]
    for key, c in res["conditions"].items():
        lines.append(
            f"{key:18s} {c['recall']:7.1%} {c['false_positives']:4d} "
            f"{c['latency_median_ms']:6.1f}ms {c['latency_p90_ms']:6.1f}ms"
        )
    return lines


if __name__ == "__main__":  # pragma: no cover
    os.sys.exit("use `colabmagic fp bench` or benchmarks/fingerprint.py")


def synthetic_library(
    n_tracks: int, seconds: float, *, sr: int = 8000, seed: int = 0
) -> list[np.ndarray]:
    """Distinct synthetic "music" tracks: each its own random melody of harmonic notes.

    Decaying tones with three harmonics, 8 notes per second between 110 and 1500 Hz, synthesised
    by phase accumulation (no per-note loop), plus a little noise. No two tracks share a melody,
    so every excerpt has exactly one right answer.
    """
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    note = sr // 8
    n_notes = -(-n // note)
    pos = (np.arange(n) % note).astype(np.float32) / sr
    out = []
    for _ in range(n_tracks):
        f0 = np.exp(rng.uniform(np.log(110), np.log(1500), n_notes)).astype(np.float32)
        phase = np.cumsum(np.repeat(f0, note)[:n] * np.float32(2 * np.pi / sr), dtype=np.float64)
        phase = np.mod(phase, 2 * np.pi).astype(np.float32)
        env = np.exp(-pos * np.repeat(rng.uniform(3, 12, n_notes).astype(np.float32), note)[:n])
        y = env * (np.sin(phase) + np.sin(2 * phase) / 2 + np.sin(3 * phase) / 3)
        y += np.float32(0.02) * rng.standard_normal(n, dtype=np.float32)
        out.append(y.astype(np.float32))
    return out


def device_benchmark(
    *,
    backend: str = "cupy",
    hours: float = 10.0,
    n_queries: int = 1000,
    seconds: float = 10.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Throughput on decoded audio (no files needed): extraction and batched queries.

    Synthesises *hours* of distinct tracks (:func:`synthetic_library`), fingerprints them in
    batches, indexes them in a temporary directory and identifies *n_queries* excerpts of
    *seconds* with :func:`~colabmagic.fingerprint.match.match_many`. Used by
    ``benchmarks/gpu_check.sh``.
    """
    from colabmagic.fingerprint.match import match_many

    fpr = Fingerprinter()
    sr = fpr.sample_rate
    rng = np.random.default_rng(seed)
    n_tracks = max(2, int(hours * 3600 / 300))
    tracks = synthetic_library(n_tracks, 300.0, sr=sr, seed=seed)
    fpr.fingerprint_batch(tracks[:1], backend=backend)  # warm-up: kernels, FFT plans
    t0 = time.perf_counter()
    fps = fpr.fingerprint_batch(tracks, backend=backend)
    ext = time.perf_counter() - t0
    res: dict[str, Any] = {
        "backend": getattr(backend, "name", backend),
        "audio_s": n_tracks * 300.0,
        "extract_x_realtime": n_tracks * 300.0 / ext,
    }
    with tempfile.TemporaryDirectory() as tmp:
        index = Index(tmp, fingerprinter=fpr)
        index.add_fingerprints(
            [
                (
                    {"id": str(i), "path": str(i), "duration": 300.0, "content_hash": str(i)},
                    f.hashes,
                    f.times,
                    f.peaks,
                )
                for i, f in enumerate(fps)
            ]
        )
        starts = rng.integers(0, (300 - seconds) * sr, size=n_queries)
        which = rng.integers(0, n_tracks, size=n_queries)
        qs = [tracks[k][a : a + int(seconds * sr)] for k, a in zip(which, starts, strict=True)]
        match_many(index, qs[:2], backend=backend)  # warm-up and device copy of the index
        t0 = time.perf_counter()
        out = match_many(index, qs, backend=backend)
        res["queries"] = n_queries
        res["queries_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()  # of which: fingerprinting the queries (unchanged speed)
        fpr.fingerprint_batch(qs, backend=backend, query=True, variants=[0])
        res["queries_fingerprint_seconds"] = time.perf_counter() - t0
        res["query_recall"] = float(
            np.mean([bool(m) and m[0].track == str(k) for m, k in zip(out, which, strict=True)])
        )
    return res


def dedup_benchmark(
    *, music_dir: str = WESNOTH_MUSIC, n_tracks: int = 8, workers: int = 2,
    backend: str = "numpy",
) -> dict[str, Any]:  # fmt: skip
    """:func:`~colabmagic.fingerprint.dedup.dedup` on real tracks plus copies made by ffmpeg.

    For each of *n_tracks* tracks: a 64 kbit/s MP3, a 22.05 kHz OGG, a copy trimmed by 20 s, a
    30 s excerpt from 60 s, and a WAV padded with 3 s of silence; the other tracks of the
    directory are added as unrelated files. Checks that every copy lands in its original's group
    at the right offset and that nothing else is grouped.
    """
    from colabmagic.fingerprint.dedup import dedup

    files = find_audio([music_dir])
    long = [f for f in files if load_audio(f).size > 100 * 8000]
    originals = long[:n_tracks]
    unrelated = [f for f in files if f not in originals]
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fpdedup-bench-") as tmp:
        expected: dict[str, tuple[str, float]] = {}  # copy -> (original, its offset in it)
        for i, f in enumerate(originals):

            def make(
                name: str, args: list[str], pre: list[str] | None = None, i: int = i, f: str = f
            ) -> str:
                out = f"{tmp}/{i:02d}-{name}"
                cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y", *(pre or []), "-i", f]
                subprocess.run([*cmd, *args, out], check=True)
                return out

            expected[make("64k.mp3", ["-b:a", "64k"])] = (f, 0.0)
            expected[make("22k.ogg", ["-ar", "22050", "-c:a", "libvorbis"])] = (f, 0.0)
            expected[make("trim.flac", [], ["-ss", "20"])] = (f, 20.0)
            expected[make("excerpt.ogg", ["-t", "30", "-c:a", "libvorbis"], ["-ss", "60"])] = (
                f,
                60.0,
            )
            expected[make("pad.wav", ["-af", "adelay=3000:all=1"])] = (f, -3.0)
        paths = originals + unrelated + list(expected)
        t0 = time.perf_counter()
        out = dedup(paths, workers=workers, backend=backend)
        res["seconds"] = time.perf_counter() - t0
    res["files"] = len(paths)
    res["audio_s"] = out.audio_seconds
    res["x_realtime"] = out.audio_seconds / res["seconds"]
    group_of = {p: gi for gi, g in enumerate(out.groups) for p in g}
    ok_group = [group_of.get(c) is not None and group_of.get(c) == group_of.get(o)
                for c, (o, _) in expected.items()]  # fmt: skip
    res["copies_found"] = sum(ok_group)
    res["copies"] = len(expected)
    ev = {(e.a, e.b): e.offset_s for g in out.evidence for e in g}
    off_ok = []
    for c, (o, off) in expected.items():
        got = ev.get((o, c), None if (c, o) not in ev else -ev[(c, o)])
        off_ok.append(got is not None and abs(got - off) < 0.1)
    res["offsets_right"] = sum(off_ok)
    res["unrelated_grouped"] = sum(1 for u in unrelated if u in group_of)
    res["groups"] = len(out.groups)
    return res
