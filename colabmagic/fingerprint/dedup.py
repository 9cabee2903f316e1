"""Find files that hold the same recording, through an index instead of all pairs of files.

Every file is fingerprinted once and streamed into a temporary on-disk index; then every file's
own (sampled) hashes, spilled to disk meanwhile, are looked up in it, a batch of files at a time,
so memory stays bounded however many hours of audio there are. A pair is a duplicate when
enough hashes align at one time offset: re-encodes,
other bitrates, formats and sample rates, trimmed or padded copies, and excerpts all qualify.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from colabmagic.errors import ParameterError
from colabmagic.fingerprint._xp import Backend
from colabmagic.fingerprint.audio import AudioDecodeWarning, content_hash, find_audio
from colabmagic.fingerprint.fingerprinter import Fingerprint, Fingerprinter
from colabmagic.fingerprint.index import Index
from colabmagic.fingerprint.pipeline import Extracted, Job, now


@dataclass(frozen=True)
class Evidence:
    """Why two files are grouped: *b* starts ``offset_s`` seconds into *a*."""

    a: str
    b: str
    aligned: int
    fraction: float
    offset_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "score": float(self.aligned),
            "fraction": self.fraction,
            "offset_s": self.offset_s,
        }


@dataclass
class DedupResult:
    """Groups of files holding the same recording (singletons are not listed)."""

    groups: list[list[str]] = field(default_factory=list)
    evidence: list[list[Evidence]] = field(default_factory=list)
    files: int = 0
    skipped_files: list[str] = field(default_factory=list)
    audio_seconds: float = 0.0
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": [
                {"files": g, "evidence": [e.to_dict() for e in ev]}
                for g, ev in zip(self.groups, self.evidence, strict=True)
            ],
            "files": self.files,
            "skipped": len(self.skipped_files),
            "skipped_files": self.skipped_files,
            "audio_seconds": self.audio_seconds,
            "seconds": self.elapsed_s,
            "x_realtime": self.audio_seconds / self.elapsed_s if self.elapsed_s else 0.0,
        }


def _sample(hashes: np.ndarray, sample: int) -> np.ndarray:
    """Mask of the hashes whose mixed value falls in one of *sample* buckets (content-defined)."""
    mixed = (hashes.astype(np.uint64) * np.uint64(2654435761)) >> np.uint64(16)
    return (mixed % np.uint64(sample)) == 0


def _group_identical(files: list[str], skipped: list[str]) -> dict[str, list[str]]:
    """Group byte-identical files under one key (unreadable ones are warned about and skipped).

    Only files whose size another file shares are hashed (BLAKE2b reads every byte: ~1 s of
    one core per 4 h of audio); a file of a size of its own is its own group.
    """

    def unreadable(f: str, exc: OSError) -> None:
        msg = f"{f}: cannot read ({exc.strerror}); skipped."
        warnings.warn(msg, AudioDecodeWarning, stacklevel=4)
        skipped.append(f)

    sizes: dict[str, int] = {}
    for f in files:
        try:
            sizes[f] = os.path.getsize(f)
        except OSError as exc:
            unreadable(f, exc)
    shared = Counter(sizes.values())
    groups: dict[str, list[str]] = {}
    for f, size in sizes.items():
        try:
            key = content_hash(f) if shared[size] > 1 else f"size-{size}:{f}"
        except OSError as exc:
            unreadable(f, exc)
            continue
        groups.setdefault(key, []).append(f)
    return groups


class _QuerySpill:
    """Each file's sampled query hashes and times, appended to disk as files finish.

    Dedup queries every file against the index of all files; the queries (a quarter of every
    file's hashes, 2 bytes per indexed hash) wait on disk, not in RAM, and are read back
    memory-mapped one batch at a time.
    """

    def __init__(self, root: Path, sample: int) -> None:
        root.mkdir()
        self.root, self.sample = root, sample
        self._h = open(root / "hashes.u32", "wb")  # closed in finish()
        self._t = open(root / "times.i32", "wb")
        self.offsets = [0]

    def add(self, number: int, r: Extracted) -> None:
        if number != len(self.offsets) - 1:  # pragma: no cover - a bug, never a user error
            msg = f"query spill: track {number} after {len(self.offsets) - 1}"
            raise RuntimeError(msg)
        keep = _sample(r.hashes, self.sample)
        self._h.write(np.ascontiguousarray(r.hashes[keep], np.uint32).tobytes())
        self._t.write(np.ascontiguousarray(r.times[keep], np.int32).tobytes())
        self.offsets.append(self.offsets[-1] + int(keep.sum()))

    def finish(self) -> None:
        self._h.close()
        self._t.close()
        n = self.offsets[-1]
        self.hashes = (
            np.memmap(self.root / "hashes.u32", np.uint32, "r") if n else np.zeros(0, np.uint32)
        )
        self.times = (
            np.memmap(self.root / "times.i32", np.int32, "r") if n else np.zeros(0, np.int32)
        )

    def count(self, number: int) -> int:
        return self.offsets[number + 1] - self.offsets[number]

    def fingerprint(self, number: int) -> Fingerprint:
        a, b = self.offsets[number], self.offsets[number + 1]
        return Fingerprint(
            np.asarray(self.hashes[a:b]), np.asarray(self.times[a:b]), np.zeros(b - a, np.int8)
        )


def dedup(
    paths: list[str | os.PathLike[str]],
    *,
    fingerprinter: Fingerprinter | None = None,
    workers: int = 1,
    backend: str | Backend = "auto",
    min_aligned: int = 10,
    min_fraction: float = 0.05,
    sample: int = 4,
    scheduler: Any = None,
    work_dir: str | os.PathLike[str] | None = None,
    batch: int = 256,
    progress: bool = False,
) -> DedupResult:
    """Group the files under *paths* that hold the same recording, in bounded memory.

    Every file is fingerprinted into an on-disk index (streamed: see
    :class:`~colabmagic.fingerprint.index.Index`), its sampled hashes spilled to disk; then the
    files are queried against that index in batches of *batch*. Memory does not grow with the
    hours of audio, only the mapped index pages do (page cache, given back under pressure).

    Parameters
    ----------
    paths : list of path
        Files or directories (searched recursively).
    fingerprinter : Fingerprinter, optional
    workers : int
        Decode + extract processes, and query threads.
    backend : {"auto", "numpy", "cupy"} or Backend
    min_aligned : int
        A pair needs at least this many (sampled) hashes aligned at one offset ...
    min_fraction : float
        ... and at least this fraction of the shorter file's sampled hashes that were looked
        up (those with more postings than :attr:`Index.stop_postings` are not).
    sample : int
        Query with one in *sample* of each file's hashes, chosen by hash value (1: all).
    scheduler : str or distributed.Client, optional
        Decode + extract on this Dask cluster; the index and the queries stay here.
    work_dir : path, optional
        Where the temporary index goes (default: the system's temporary directory); about
        15 bytes per hash, 1.5 GB per 100 hours of audio.
    batch : int
        Files queried per batch.
    progress : bool
        A tqdm progress bar for the fingerprinting (stderr).

    Returns
    -------
    DedupResult
        Groups (largest file first) with the evidence linking them; undecodable files are
        warned about (AudioDecodeWarning) and listed in ``skipped_files``.
    """
    if not 0 < min_fraction <= 1 or min_aligned < 1 or sample < 1 or batch < 1:
        msg = (
            f"min_fraction={min_fraction}, min_aligned={min_aligned}, sample={sample}, "
            f"batch={batch}: need (0, 1], >= 1, >= 1 and >= 1."
        )
        raise ParameterError(msg)
    start = now()
    fpr = fingerprinter or Fingerprinter()
    files = find_audio(list(paths))
    result = DedupResult(files=len(files))
    by_hash = _group_identical(files, result.skipped_files)
    key_of = {fs[0]: h for h, fs in by_hash.items()}
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    jobs = [Job(fs[0], fs[0], h) for h, fs in by_hash.items()]
    with tempfile.TemporaryDirectory(prefix="fpdedup-", dir=work_dir) as tmp:
        index = Index(Path(tmp) / "index", fingerprinter=fpr)
        spill = _QuerySpill(Path(tmp) / "queries", sample)
        added = index.add_jobs(
            jobs, workers=workers, backend=backend, scheduler=scheduler, progress=progress,
            commit_seconds=float("inf"), on_added=spill.add, merge_all=True,
        )  # fmt: skip
        spill.finish()
        for f in added.skipped_files:
            result.skipped_files.extend(by_hash[key_of[f]])
        tracks = [index.track(n) for n in range(len(spill.offsets) - 1)]
        result.audio_seconds = sum(t.duration * len(by_hash[t.content_hash]) for t in tracks)
        edges = _query_edges(index, spill, tracks, fpr, workers, batch, min_aligned, min_fraction)
        index = None  # unmap before the directory goes
    _collect_groups(result, tracks, edges, by_hash)
    result.elapsed_s = now() - start
    return result


def _query_edges(
    index: Index,
    spill: _QuerySpill,
    tracks: list[Any],
    fpr: Fingerprinter,
    workers: int,
    batch: int,
    min_aligned: int,
    min_fraction: float,
) -> dict[tuple[int, int], Evidence]:
    """Query every file's sampled hashes against the index, *batch* files at a time.

    A pair's fraction is of the shorter file's sampled hashes that were looked up: the hashes
    with more postings than :attr:`Index.stop_postings` are skipped, and they are more of every
    file's as the index grows, so a fraction of all of them would fall with the collection's
    size (at 10,000 files the median duplicate pair's was half its 3,000-file value). Both
    files' counts are known once every file has been queried, so the pairs wait until then
    (only those with *min_aligned* hashes at one offset: a few per file).

    Each pair is counted once, by the query of its lower-numbered file (``after``): the votes
    are symmetric. Sampling is by hash value, so the hits of *i*'s sampled hashes on *j* are
    exactly the pairs of equal hashes in both files' samples, and a hash is skipped (too many
    postings) for both or neither; *j*'s query would find the same counts at the negated
    offsets. Counting both halves was half of the vote work, and a file's hits on itself
    (every hash at offset 0, and again at every repeat of a looping piece) more.
    """
    looked = np.zeros(len(tracks), np.int64)
    candidates: list[tuple[int, int, int, int]] = []
    index.plan_lookups(int(spill.offsets[-1]))
    # NumPy's sorts and searches release the GIL: threads share the index and overlap
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for a in range(0, len(tracks), batch):
            numbers = range(a, min(a + batch, len(tracks)))
            found = pool.map(
                lambda i: _file_votes(
                    index, spill.fingerprint(i), min_count=min_aligned, after=tracks[i].number
                ),
                numbers,
            )
            for i, (v, n_looked) in zip(numbers, found, strict=True):
                looked[i] = n_looked
                candidates += [(i, j, count, off) for j, (count, off) in v.items()]
    edges: dict[tuple[int, int], Evidence] = {}
    for i, j, count, off in candidates:
        shorter = int(min(looked[i], looked[j]))
        if count < min_fraction * shorter:  # _file_votes kept only count >= min_aligned
            continue
        di, dj = tracks[i].duration, tracks[j].duration
        a_, b_ = (j, i) if di <= dj else (i, j)
        offset = float(off) * fpr.frame_seconds * (1 if a_ == j else -1)
        ev = Evidence(
            tracks[a_].id,
            tracks[b_].id,
            int(count),
            round(float(count) / max(shorter, 1), 4),
            round(offset, 3),
        )
        key = (min(i, j), max(i, j))
        if key not in edges or edges[key].aligned < ev.aligned:
            edges[key] = ev
    return edges


#: Most (sampled) hashes one lookup takes: a longer file is queried a time window at a time, so
#: the hits in memory (~200 bytes each, up to MAX_POSTINGS per hash) do not grow with its length.
QUERY_CHUNK = 4096
#: Most postings one window may hit: a window ends early when its hashes have this many. The
#: hits per hash grow with the index (its mean postings per hash, up to MAX_POSTINGS per hash),
#: so a window bounded by hashes alone could hold up to 4096 * 256 hits (~200 MB) per query
#: thread in a large index; bounded by hits it is ~50 MB at any size. What a file's windows
#: keep is one packed key per hit on a later track (8 bytes: ~2.5 MB per 10 minutes of a
#: file on the full-length corpus's index), counted once the file is done.
QUERY_HITS = 1 << 18


def _windows(hits: np.ndarray, chunk: int, max_hits: int) -> list[tuple[int, int]]:
    """``[a, b)`` runs of query hashes with at most *chunk* hashes and ~*max_hits* hits each
    (a single hash with more hits is a window of its own)."""
    out, a, n = [], 0, len(hits)
    while a < n:
        b = min(a + chunk, n)
        k = int(np.searchsorted(np.cumsum(hits[a:b]), max_hits, side="right"))
        b = a + max(k, 1) if k < b - a else b
        out.append((a, b))
        a = b
    return out


def _file_votes(
    index: Index,
    fp: Fingerprint,
    chunk: int | None = None,
    min_count: int = 1,
    after: int = -1,
) -> tuple[dict[int, tuple[int, int]], int]:
    """``{track: (aligned, offset)}`` of one file's query, in windows of query time: only the
    tracks numbered above *after* with at least *min_count* aligned hashes; and how many of
    its hashes were looked up.

    A window holds at most *chunk* hashes (default :data:`QUERY_CHUNK`) and about
    :data:`QUERY_HITS` postings (both read at call time), so neither a long file nor a large
    index makes one lookup's hits grow. Every hit counts for its ``(track, offset)``; the counts
    add up over the windows, and a track's is the sum at its best offset +-1 frame: a copy that
    starts part of a frame later (a trimmed copy) has its hashes split between two neighbouring
    offsets. The sums are NumPy arrays: a query's chance hits reach most tracks of a large
    index, and only the few that pass *min_count* become Python objects (per file, work and
    memory follow the tracks it matches, not the size of the index).
    """
    chunk = chunk or QUERY_CHUNK
    order = np.argsort(fp.times, kind="stable")
    hits = index.postings_per_hash(fp.hashes[order])
    stop = index.stop_postings
    n_looked = int((hits <= stop).sum())
    hits[hits > stop] = 0  # not looked up (see Index.stop_postings)
    times = fp.times.astype(np.int64)
    keys = []
    for a, b in _windows(hits, chunk, QUERY_HITS):
        sel = order[a:b]
        which, track, ref_time = index.lookup(fp.hashes[sel], max_postings=stop)
        if after >= 0:
            keep = track > after
            which, track, ref_time = which[keep], track[keep], ref_time[keep]
        keys.append(track * (2 * _BIAS) + (ref_time - times[sel][which] + _BIAS))
    if not keys:
        return {}, n_looked
    return _best_offsets(np.concatenate(keys), min_count), n_looked


#: Offsets (frames) packed with their track as ``track * 2 * _BIAS + offset + _BIAS``: offsets
#: are far inside +-2**40.
_BIAS = np.int64(1 << 40)


def _best_offsets(key: np.ndarray, min_count: int) -> dict[int, tuple[int, int]]:
    """Per track (*key*: one packed ``(track, offset)`` per hit, see :data:`_BIAS`): the hits
    per offset, the offset with the most (the one nearest 0, then the lowest, on a tie), and
    the sum at it +-1 frame; tracks whose sum reaches *min_count*.

    One sort of the hits, then only the offsets with at least a third of *min_count* hits are
    looked at: a track's sum is its best offset's count plus two neighbours', at most 3x its
    largest, so a track with none cannot pass, and a track with one has its best among them
    (ties included). A query's hits are nearly all single chance hits (on the full-length
    corpus ~300k per file, 88 % of the offsets hit once); counting and ranking every one of
    them was half of dedup's query time.
    """
    key = np.sort(key)
    n, least = len(key), max(1, -(-min_count // 3))
    if n < least:
        return {}
    # the first hit of every offset with >= `least` hits (runs of equal keys in sorted order)
    first = np.ones(n - least + 1, bool)
    first[1:] = key[: n - least] != key[1 : n - least + 1]
    cand = key[: n - least + 1][first & (key[: n - least + 1] == key[least - 1 :])]
    if not len(cand):
        return {}

    def hits(k: np.ndarray) -> np.ndarray:
        return np.searchsorted(key, k, side="right") - np.searchsorted(key, k, side="left")

    total = hits(cand)
    k_track, k_off = cand // (2 * _BIAS), cand % (2 * _BIAS) - _BIAS
    # per track, best first: most hits, then nearest 0, then lowest offset
    rank = np.lexsort((k_off, np.abs(k_off), -total, k_track))
    top = np.ones(len(rank), bool)
    top[1:] = k_track[rank][1:] != k_track[rank][:-1]
    best = rank[top]
    summed = total[best] + hits(cand[best] - 1) + hits(cand[best] + 1)
    ok = summed >= min_count
    return {
        int(t): (int(c), int(o))
        for t, c, o in zip(k_track[best][ok], summed[ok], k_off[best][ok], strict=True)
    }


def _collect_groups(
    result: DedupResult,
    tracks: list[Any],
    edges: dict[tuple[int, int], Evidence],
    by_hash: dict[str, list[str]],
) -> None:
    """Union the linked files into groups (largest first), with their evidence."""
    parent = list(range(len(tracks)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in edges:
        parent[root(i)] = root(j)
    members: dict[int, list[int]] = {}
    for i in range(len(tracks)):
        members.setdefault(root(i), []).append(i)
    for group in members.values():
        names = []
        for i in sorted(group, key=lambda k: -tracks[k].duration):
            names.extend(by_hash[tracks[i].content_hash])
        if len(names) < 2:
            continue
        ev = [e for (i, _), e in sorted(edges.items()) if root(i) == root(group[0])]
        for i in group:  # byte-identical copies
            same = by_hash[tracks[i].content_hash]
            n = tracks[i].n_hashes
            ev.extend(Evidence(same[0], f, n, 1.0, 0.0) for f in same[1:])
        result.groups.append(names)
        result.evidence.append(ev)
    result.groups, result.evidence = (
        (
            list(x)
            for x in zip(*sorted(zip(result.groups, result.evidence, strict=True)), strict=True)
        )
        if result.groups
        else ([], [])
    )
