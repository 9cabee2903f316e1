"""Query an :class:`~colabmagic.fingerprint.index.Index`: hashes to postings to offset histograms.

Every query hash is looked up by binary search in every shard; each hit votes for
``(track, speed hypothesis, reference time - query time)``. Hits of the true track pile up at one
offset, chance hits spread out. The score of a track is the largest vote count of one offset
(plus its two neighbours, which absorbs rounding of the anchor times).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from colabmagic.errors import ParameterError
from colabmagic.fingerprint._xp import Backend
from colabmagic.fingerprint.audio import load_audio
from colabmagic.fingerprint.fingerprinter import Fingerprint
from colabmagic.fingerprint.index import Index
from colabmagic.fingerprint.pipeline import now

#: Default decision threshold (aligned hashes). Chosen on the Wesnoth benchmark as the lowest
#: value that gave no false positive on any query of audio outside the index; see docs.
DEFAULT_MIN_SCORE = 10
_OFFSET_BIAS = 1 << 24


@dataclass(frozen=True)
class Match:
    """One candidate recording for a query.

    Attributes
    ----------
    track : str
        Track id in the index.
    score : int
        Hashes aligned at the best offset.
    offset_s : float
        Where the query starts in the track, in seconds (negative: before the track starts).
    confidence : float
        ``score`` relative to the next-best other track, in [0, 1]: 1 - runner_up / score.
    speed : float
        The playback-speed hypothesis that matched (1.0: unchanged).
    path : str
        The indexed file.
    """

    track: str
    score: int
    offset_s: float
    confidence: float
    speed: float
    path: str

    def to_dict(self) -> dict[str, Any]:
        return {"track": self.track, "score": float(self.score), "offset_s": self.offset_s,
                "confidence": self.confidence, "speed": self.speed}  # fmt: skip


def _votes(index: Index, fp: Fingerprint) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Best (score, offset, variant) per candidate track, tracks sorted by score (descending)."""
    which, track, ref_time = index.lookup(fp.hashes)
    if which.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, empty
    n_var = int(fp.variant.max()) + 1 if fp.variant.size else 1
    offset = ref_time - fp.times[which].astype(np.int64) + _OFFSET_BIAS
    key = (track * n_var + fp.variant[which].astype(np.int64)) * (2 * _OFFSET_BIAS) + offset
    keys, counts = np.unique(key, return_counts=True)
    # add the counts of the two neighbouring offsets of the same (track, variant)
    smooth = counts.copy()
    for d in (-1, 1):
        pos = np.searchsorted(keys, keys + d)
        pos = np.minimum(pos, len(keys) - 1)
        smooth += np.where(keys[pos] == keys + d, counts[pos], 0)
    group = keys // (2 * _OFFSET_BIAS)
    tr = group // n_var
    # best key per track: sort by (track, smooth, own count) and take the last of each track
    order = np.lexsort((counts, smooth, tr))
    last = np.r_[tr[order][1:] != tr[order][:-1], True]
    best = order[last]
    rank = np.argsort(-smooth[best], kind="stable")
    best = best[rank]
    offsets = keys[best] % (2 * _OFFSET_BIAS) - _OFFSET_BIAS
    return tr[best], smooth[best], offsets, group[best] % n_var


def match(
    index: Index,
    query: str | os.PathLike[str] | np.ndarray | Fingerprint,
    *,
    top_k: int = 1,
    min_score: int = DEFAULT_MIN_SCORE,
    backend: str | Backend = "numpy",
) -> list[Match]:
    """Identify a 3-30 s excerpt (file, samples at the index's rate, or query fingerprint).

    Parameters
    ----------
    index : Index
    query : path, numpy.ndarray or Fingerprint
        A file, mono samples at ``index.fingerprinter.sample_rate``, or
        ``index.fingerprinter.fingerprint(y, query=True)``.
    top_k : int
        Return up to this many tracks.
    min_score : int
        Tracks with fewer aligned hashes are not reported ("no match").
    backend : {"auto", "numpy", "cupy"} or Backend
        Where the query's hashes are computed (the lookup itself runs on the host).

    Returns
    -------
    list of Match
        Best first; empty when nothing reaches *min_score*.
    """
    if top_k < 1:
        msg = f"top_k={top_k} must be >= 1."
        raise ParameterError(msg)
    fpr = index.fingerprinter
    if isinstance(query, Fingerprint):
        fp = query
    else:
        y = query
        if not isinstance(query, np.ndarray):
            y = load_audio(query, sample_rate=fpr.sample_rate)
        fp = fpr.fingerprint(y, backend=backend, query=True)
    tracks, scores, offsets, variants = _votes(index, fp)
    out = []
    for i in range(min(top_k, len(tracks))):
        if scores[i] < min_score:
            break
        runner_up = scores[i + 1] if i + 1 < len(scores) else 0
        t = index.track(int(tracks[i]))
        out.append(
            Match(
                track=t.id, score=int(scores[i]),
                offset_s=round(float(offsets[i]) * fpr.frame_seconds, 3),
                confidence=round(1.0 - float(runner_up) / float(scores[i]), 4),
                speed=float(fpr.speeds[int(variants[i])]), path=t.path,
            )
        )  # fmt: skip
    return out


@dataclass(frozen=True)
class QueryResult:
    """The outcome of one query, as the CLI prints it."""

    query: str
    matches: list[Match]
    latency_s: float

    def to_dict(self) -> dict[str, Any]:
        best = self.matches[0] if self.matches else None
        d: dict[str, Any] = {
            "query": self.query,
            "track": best.track if best else None,
            "score": float(best.score) if best else 0.0,
            "offset_s": best.offset_s if best else None,
            "latency_s": round(self.latency_s, 6),
        }
        if best is not None:
            d["confidence"] = best.confidence
            d["speed"] = best.speed
        if len(self.matches) > 1:
            d["matches"] = [m.to_dict() for m in self.matches]
        return d


def query_file(
    index: Index, path: str | os.PathLike[str], *, top_k: int = 1,
    min_score: int = DEFAULT_MIN_SCORE, backend: str | Backend = "numpy",
) -> QueryResult:  # fmt: skip
    """Decode, fingerprint and match one file, timing the whole of it."""
    start = now()
    matches = match(index, path, top_k=top_k, min_score=min_score, backend=backend)
    return QueryResult(os.fspath(path), matches, now() - start)
