"""Find files that hold the same recording, through an index instead of all pairs of files.

Every file is fingerprinted once and put in a temporary index; then every file's own hashes are
looked up in it. A pair is a duplicate when enough hashes align at one time offset: re-encodes,
other bitrates, formats and sample rates, trimmed or padded copies, and excerpts all qualify.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from colabmagic.errors import ParameterError
from colabmagic.fingerprint._xp import Backend
from colabmagic.fingerprint.audio import AudioDecodeWarning, content_hash, find_audio
from colabmagic.fingerprint.fingerprinter import Fingerprint, Fingerprinter
from colabmagic.fingerprint.index import Index
from colabmagic.fingerprint.match import votes
from colabmagic.fingerprint.pipeline import Job, extract_files, now


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


def dedup(
    paths: list[str | os.PathLike[str]],
    *,
    fingerprinter: Fingerprinter | None = None,
    workers: int = 1,
    backend: str | Backend = "auto",
    min_aligned: int = 10,
    min_fraction: float = 0.05,
    sample: int = 4,
) -> DedupResult:
    """Group the files under *paths* that hold the same recording.

    Parameters
    ----------
    paths : list of path
        Files or directories (searched recursively).
    fingerprinter : Fingerprinter, optional
    workers : int
        Decode + extract processes.
    backend : {"auto", "numpy", "cupy"} or Backend
    min_aligned : int
        A pair needs at least this many (sampled) hashes aligned at one offset ...
    min_fraction : float
        ... and at least this fraction of the shorter file's (sampled) hashes.
    sample : int
        Query with one in *sample* of each file's hashes, chosen by hash value (1: all).

    Returns
    -------
    DedupResult
        Groups (largest file first) with the evidence linking them; undecodable files are
        warned about (AudioDecodeWarning) and listed in ``skipped_files``.
    """
    if not 0 < min_fraction <= 1 or min_aligned < 1 or sample < 1:
        msg = (
            f"min_fraction={min_fraction}, min_aligned={min_aligned}, sample={sample}: "
            "need (0, 1], >= 1 and >= 1."
        )
        raise ParameterError(msg)
    start = now()
    fpr = fingerprinter or Fingerprinter()
    files = find_audio(list(paths))
    result = DedupResult(files=len(files))
    by_hash = _group_identical(files, result.skipped_files)
    jobs = [Job(fs[0], fs[0], h) for h, fs in by_hash.items()]
    done = []
    for r in extract_files(jobs, fingerprinter=fpr, workers=workers, backend=backend):
        if r.error is not None:
            warnings.warn(r.error, AudioDecodeWarning, stacklevel=2)
            result.skipped_files.extend(by_hash[r.content_hash])
            continue
        done.append(r)
        result.audio_seconds += r.duration * len(by_hash[r.content_hash])
    parent = list(range(len(done)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    edges: dict[tuple[int, int], Evidence] = {}
    with tempfile.TemporaryDirectory(prefix="fpdedup-") as tmp:
        index = Index(tmp, fingerprinter=fpr)
        index.add_fingerprints(
            [
                (
                    {
                        "id": str(i),
                        "path": r.path,
                        "duration": r.duration,
                        "content_hash": r.content_hash,
                    },
                    r.hashes,
                    r.times,
                )
                for i, r in enumerate(done)
            ]
        )
        # query with a content-chosen quarter of each file's hashes: the same quarter on every
        # copy, so alignments keep a quarter of their votes and queries cost a quarter
        picks = [_sample(r.hashes, sample) for r in done]
        n_hashes = np.array([int(p.sum()) for p in picks])
        queries = (
            Fingerprint(r.hashes[p], r.times[p], np.zeros(int(p.sum()), np.int8))
            for r, p in zip(done, picks, strict=True)
        )
        # NumPy's sorts and searches release the GIL: threads share the index and overlap
        with ThreadPoolExecutor(max(1, workers)) as pool:
            all_votes = pool.map(lambda fp: votes(index, fp), queries)
            for i, (r, v) in enumerate(zip(done, all_votes, strict=True)):
                for tr, count, off in zip(v.track, v.count, v.offset, strict=True):  # few tracks
                    j = int(index.track(int(tr)).id)
                    if j == i:
                        continue
                    shorter = min(n_hashes[i], n_hashes[j])
                    if count < min_aligned or count < min_fraction * shorter:
                        continue
                    a, b = (j, i) if r.duration <= done[j].duration else (i, j)
                    offset = float(off) * fpr.frame_seconds * (1 if a == j else -1)
                    ev = Evidence(
                        done[a].path,
                        done[b].path,
                        int(count),
                        round(float(count) / max(shorter, 1), 4),
                        round(offset, 3),
                    )
                    key = (min(i, j), max(i, j))
                    if key not in edges or edges[key].aligned < ev.aligned:
                        edges[key] = ev
                    parent[root(i)] = root(j)
    members: dict[int, list[int]] = {}
    for i in range(len(done)):
        members.setdefault(root(i), []).append(i)
    for group in members.values():
        names = []
        for i in sorted(group, key=lambda k: -done[k].duration):
            names.extend(by_hash[done[i].content_hash])
        if len(names) < 2:
            continue
        ev = [e for (i, _), e in sorted(edges.items()) if root(i) == root(group[0])]
        for i in group:  # byte-identical copies
            same = by_hash[done[i].content_hash]
            n = len(done[i].hashes)
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
    result.elapsed_s = now() - start
    return result
