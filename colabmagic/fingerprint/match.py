"""Query an :class:`~colabmagic.fingerprint.index.Index`: hashes to postings to offset histograms.

Every query hash is looked up by binary search in every shard; each hit votes for
``(track, speed hypothesis, reference time - query time)``. Hits of the true track pile up at one
offset, chance hits spread out. The score of a track is the weighted vote count of its best
offset (see :func:`votes`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from colabmagic.errors import ParameterError
from colabmagic.fingerprint._xp import Backend
from colabmagic.fingerprint.audio import load_audio
from colabmagic.fingerprint.fingerprinter import Fingerprint
from colabmagic.fingerprint.index import Index
from colabmagic.fingerprint.pipeline import now

#: Default decision threshold (rarity-weighted aligned hashes). Chosen on the Wesnoth benchmark
#: above the highest score any query of audio outside the index reached; see docs/fingerprint.md.
DEFAULT_MIN_SCORE = 4.5
_OFFSET_BIAS = 1 << 24


@dataclass(frozen=True)
class Match:
    """One candidate recording for a query.

    Attributes
    ----------
    track : str
        Track id in the index.
    score : float
        Aligned hashes at the best offset, each weighted by its rarity in the index.
    aligned : int
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
    score: float
    aligned: int
    offset_s: float
    confidence: float
    speed: float
    path: str

    def to_dict(self) -> dict[str, Any]:
        return {"track": self.track, "score": self.score, "aligned": self.aligned,
                "offset_s": self.offset_s,
                "confidence": self.confidence, "speed": self.speed}  # fmt: skip


class Votes(NamedTuple):
    """Best offset of every candidate track, best first."""

    track: np.ndarray  # internal track number
    score: np.ndarray  # rarity-weighted aligned hashes (the decision statistic)
    count: np.ndarray  # aligned hashes
    offset: np.ndarray  # reference frame where the query starts
    variant: np.ndarray  # speed hypothesis


def votes(index: Index, fp: Fingerprint) -> Votes:
    """Offset histograms of a query fingerprint against *index*.

    A hit of query hash ``h`` weighs ``1 / log2(2 + postings(h))``: common hashes (a bass note
    held at the typical interval) say little, rare ones a lot. This keeps the chance score of
    audio that is not indexed flat across query lengths and library sizes, so one threshold
    serves every query.
    """
    which, track, ref_time = index.lookup(fp.hashes)
    if which.size == 0:
        e = np.zeros(0, np.int64)
        return Votes(e, np.zeros(0), e, e, e)
    n_var = int(fp.variant.max()) + 1
    offset = ref_time - fp.times[which].astype(np.int64) + _OFFSET_BIAS
    key = (track * n_var + fp.variant[which].astype(np.int64)) * (2 * _OFFSET_BIAS) + offset
    keys, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    weight = 1.0 / np.log2(2.0 + np.bincount(which, minlength=len(fp.hashes))[which])
    score = np.bincount(inverse.reshape(-1), weights=weight, minlength=len(keys))
    group = keys // (2 * _OFFSET_BIAS)
    tr = group // n_var
    order = np.lexsort((counts, score, tr))  # best key of each track last
    best = order[np.r_[tr[order][1:] != tr[order][:-1], True]]
    best = best[np.argsort(-score[best], kind="stable")]
    offsets = keys[best] % (2 * _OFFSET_BIAS) - _OFFSET_BIAS
    return Votes(tr[best], score[best], counts[best], offsets, group[best] % n_var)


def match(
    index: Index,
    query: str | os.PathLike[str] | np.ndarray | Fingerprint,
    *,
    top_k: int = 1,
    min_score: float = DEFAULT_MIN_SCORE,
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
    v = votes(index, fp)
    out = []
    for i in range(min(top_k, len(v.track))):
        if v.score[i] < min_score:
            break
        runner_up = v.score[i + 1] if i + 1 < len(v.score) else 0.0
        t = index.track(int(v.track[i]))
        out.append(
            Match(
                track=t.id, score=round(float(v.score[i]), 3), aligned=int(v.count[i]),
                offset_s=round(float(v.offset[i]) * fpr.frame_seconds, 3),
                confidence=round(1.0 - float(runner_up) / float(v.score[i]), 4),
                speed=float(fpr.speeds[int(v.variant[i])]), path=t.path,
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
            "score": best.score if best else 0.0,
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
    min_score: float = DEFAULT_MIN_SCORE, backend: str | Backend = "numpy",
) -> QueryResult:  # fmt: skip
    """Decode, fingerprint and match one file, timing the whole of it."""
    start = now()
    matches = match(index, path, top_k=top_k, min_score=min_score, backend=backend)
    return QueryResult(os.fspath(path), matches, now() - start)
