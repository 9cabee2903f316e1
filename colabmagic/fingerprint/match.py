"""Query an :class:`~colabmagic.fingerprint.index.Index`: hashes to postings to offset histograms.

Every query hash is looked up by binary search in every shard; each hit votes for
``(track, speed hypothesis, reference time - query time)``. Hits of the true track pile up at one
offset, chance hits spread out. The score of a track is the weighted vote count of its best
offset (see :func:`votes`).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from colabmagic.errors import ParameterError
from colabmagic.fingerprint._xp import Backend, resolve_backend
from colabmagic.fingerprint.audio import load_audio
from colabmagic.fingerprint.fingerprinter import Fingerprint
from colabmagic.fingerprint.index import Index
from colabmagic.fingerprint.pipeline import now

#: Default decision threshold (see :func:`votes`): 10 % above every score that audio outside the
#: index reached on the Wesnoth set (504 benchmark queries of held-out tracks: 2.69; every 10 s
#: window of the held-out tracks, 476: 2.91, a passage that one held-out track quotes from an
#: indexed one). See docs/fingerprint.md.
DEFAULT_MIN_SCORE = 3.2
_OFFSET_BIAS = 1 << 24
#: Query frames per segment (1/8 s at the default rate) and the most one segment's votes count,
#: in :func:`votes`. Tuned on the Wesnoth set (16 frames / 1.0 before: 0 dB 5 s 57 % -> 71 %).
SEGMENT_FRAMES = 4
SEGMENT_CAP = 0.3


@dataclass(frozen=True)
class Match:
    """One candidate recording for a query.

    Attributes
    ----------
    track : str
        Track id in the index.
    score : float
        How much of the query aligns: rarity-weighted hits at the best offset, at most 0.3
        per 1/8 s of query (so at most 2.4 per second; see :func:`votes`).
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
        return {
            "track": self.track,
            "score": self.score,
            "aligned": self.aligned,
            "offset_s": self.offset_s,
            "confidence": self.confidence,
            "speed": self.speed,
        }


class Votes(NamedTuple):
    """Best offset of every candidate track, best first."""

    track: np.ndarray  # internal track number
    score: np.ndarray  # rarity-weighted aligned hashes (the decision statistic)
    count: np.ndarray  # aligned hashes
    offset: np.ndarray  # reference frame where the query starts
    variant: np.ndarray  # speed hypothesis


def votes(index: Index, fp: Fingerprint) -> Votes:
    """Offset histograms of a query fingerprint against *index*.

    Each hit votes for ``(track, speed hypothesis, offset)``. A hit of query hash ``h`` weighs
    ``1 / log2(2 + postings(h))``: common hashes (a bass note held at the typical interval) say
    little, rare ones a lot. The votes of one 1/8 s segment of the query count at most 0.3, so
    the score grows with how much of the query aligns, not with how many hashes a burst of
    notes produces: a short phrase shared by two different tracks (or a burst of chance hits)
    cannot pass for a match. Together these keep
    the score of audio that is not indexed low and flat across query lengths and library sizes,
    so one threshold serves every query.
    """
    which, track, ref_time = index.lookup(fp.hashes)
    if which.size == 0:
        e = np.zeros(0, np.int64)
        return Votes(e, np.zeros(0), e, e, e)
    n_var = int(fp.variant.max()) + 1
    q_time = fp.times[which].astype(np.int64)
    offset = ref_time - q_time + _OFFSET_BIAS
    key = (track * n_var + fp.variant[which].astype(np.int64)) * (2 * _OFFSET_BIAS) + offset
    weight = 1.0 / np.log2(2.0 + np.bincount(which, minlength=len(fp.hashes))[which])
    keys, score, counts = _segment_scores(np, key, q_time // SEGMENT_FRAMES, weight)
    group = keys // (2 * _OFFSET_BIAS)
    tr = group // n_var
    order = np.lexsort((counts, score, tr))  # best key of each track last
    best = order[np.r_[tr[order][1:] != tr[order][:-1], True]]
    best = best[np.argsort(-score[best], kind="stable")]
    offsets = keys[best] % (2 * _OFFSET_BIAS) - _OFFSET_BIAS
    return Votes(tr[best], score[best], counts[best], offsets, group[best] % n_var)


def _segment_scores(xp: Any, key: Any, segment: Any, weight: Any) -> tuple[Any, Any, Any]:
    """Per distinct *key*: sum over query segments of min(cap, weights in it), and the hits."""
    n_seg = int(segment.max()) + 1
    keys2, inverse = xp.unique(key * n_seg + segment, return_inverse=True)
    inverse = inverse.reshape(-1)
    per_seg = xp.bincount(inverse, weights=weight, minlength=keys2.shape[0])
    per_seg = xp.minimum(per_seg, SEGMENT_CAP)
    hits = xp.bincount(inverse, minlength=keys2.shape[0])
    k = keys2 // n_seg
    last = xp.concatenate([k[1:] != k[:-1], xp.ones(1, dtype=bool)])
    ends = xp.nonzero(last)[0]
    score = xp.diff(xp.concatenate([xp.zeros(1), xp.cumsum(per_seg)[ends]]))
    count = xp.diff(xp.concatenate([xp.zeros(1, dtype=hits.dtype), xp.cumsum(hits)[ends]]))
    return k[ends], score, count


def _staged_votes(index: Index, fp: Fingerprint, min_score: float) -> Votes:
    """Votes of the unchanged-speed hashes first; all speed hypotheses only if that finds nothing.

    Most queries are not sped up, so most pay for one hash set instead of ``len(speeds)``.
    """
    plain = fp.variant == 0
    if plain.all():
        return votes(index, fp)
    v = votes(index, Fingerprint(fp.hashes[plain], fp.times[plain], fp.variant[plain]))
    if len(v.score) and v.score[0] >= min_score:
        return v
    return votes(index, fp)


def match(
    index: Index,
    query: str | os.PathLike[str] | np.ndarray | Fingerprint,
    *,
    top_k: int = 1,
    min_score: float = DEFAULT_MIN_SCORE,
    backend: str | Backend = "numpy",
    all_speeds: bool = False,
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
    all_speeds : bool
        Rank by every speed hypothesis even when the unchanged speed already gives a match
        (slower; by default the other hypotheses are only tried when it does not).

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
    v = votes(index, fp) if all_speeds else _staged_votes(index, fp, min_score)
    out = []
    for i in range(min(top_k, len(v.track))):
        if v.score[i] < min_score:
            break
        runner_up = v.score[i + 1] if i + 1 < len(v.score) else 0.0
        t = index.track(int(v.track[i]))
        out.append(
            Match(
                track=t.id,
                score=round(float(v.score[i]), 3),
                aligned=int(v.count[i]),
                offset_s=round(float(v.offset[i]) * fpr.frame_seconds, 3),
                confidence=round(1.0 - float(runner_up) / float(v.score[i]), 4),
                speed=float(fpr.speeds[int(v.variant[i])]),
                path=t.path,
            )
        )
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
    index: Index,
    path: str | os.PathLike[str],
    *,
    top_k: int = 1,
    min_score: float = DEFAULT_MIN_SCORE,
    backend: str | Backend = "numpy",
) -> QueryResult:
    """Decode, fingerprint and match one file, timing the whole of it."""
    start = now()
    matches = match(index, path, top_k=top_k, min_score=min_score, backend=backend)
    return QueryResult(os.fspath(path), matches, now() - start)


def match_many(
    index: Index,
    queries: list[np.ndarray],
    *,
    top_k: int = 1,
    min_score: float = DEFAULT_MIN_SCORE,
    backend: str | Backend = "auto",
) -> list[list[Match]]:
    """Identify many excerpts at once, every step batched on the backend (the GPU path).

    The query signals are fingerprinted as one batch; the index's arrays are copied to the device
    once (and cached); lookups, offset histograms and the per-query ranking are array operations
    over all queries together. Results equal :func:`match` run on each query.

    Parameters
    ----------
    index : Index
    queries : list of numpy.ndarray
        Mono signals at ``index.fingerprinter.sample_rate``.
    top_k, min_score, backend
        As for :func:`match`.

    Returns
    -------
    list of list of Match
        One list per query, best first.
    """
    if top_k < 1:
        msg = f"top_k={top_k} must be >= 1."
        raise ParameterError(msg)
    be = resolve_backend(backend)
    xp = be.xp
    fpr = index.fingerprinter
    fps = fpr.fingerprint_batch(queries, backend=be, query=True)
    sizes = np.array([len(f.hashes) for f in fps])
    if sizes.sum() == 0:
        return [[] for _ in queries]
    qh = be.to_device(np.concatenate([f.hashes for f in fps]))
    qt = be.to_device(np.concatenate([f.times for f in fps]).astype(np.int64))
    qv = be.to_device(np.concatenate([f.variant for f in fps]).astype(np.int64))
    qid = be.to_device(np.repeat(np.arange(len(fps)), sizes))
    shards = index.device_arrays(be)
    found = [
        (xp.searchsorted(h, qh, side="left"), xp.searchsorted(h, qh, side="right"))
        for h, _ in shards
    ]
    per_hash = sum(hi - lo for lo, hi in found)
    stop = per_hash > index.stop_postings
    rows, posts = [], []
    for (lo, hi), (_, post) in zip(found, shards, strict=True):
        count = xp.where(stop, 0, hi - lo)
        total = int(count.sum())
        if total:
            r = xp.repeat(xp.arange(qh.shape[0]), count)
            first = xp.repeat(lo - (xp.cumsum(count) - count), count)
            rows.append(r)
            posts.append(post[first + xp.arange(total)])
    if not rows:
        return [[] for _ in queries]
    row, post = xp.concatenate(rows), xp.concatenate(posts)
    track = (post >> 32).astype(xp.int64)
    alive = be.to_device(index._alive)
    keep = alive[track]
    row, track, post = row[keep], track[keep], post[keep]
    hits_of = xp.bincount(row, minlength=qh.shape[0]).astype(xp.float64)
    weight_of = 1.0 / xp.log2(2.0 + hits_of)
    n_var = len(fpr.speeds)
    n_tracks = int(index._alive.shape[0])
    offset = (post & 0xFFFFFFFF).astype(xp.int64) - qt[row] + _OFFSET_BIAS
    group = (qid[row] * n_tracks + track) * n_var + qv[row]
    key = group * (2 * _OFFSET_BIAS) + offset
    keys, score, count = _segment_scores(
        xp, key, qt[row] // SEGMENT_FRAMES, weight_of[row].astype(xp.float64)
    )
    g = keys // (2 * _OFFSET_BIAS)
    qt_key = g // n_var  # (query, track)
    order = xp.lexsort(xp.stack([count.astype(xp.float64), score, qt_key.astype(xp.float64)]))
    last = xp.concatenate([qt_key[order][1:] != qt_key[order][:-1], xp.ones(1, dtype=bool)])
    best = order[last]  # best offset of every (query, track)
    q_of = qt_key[best] // n_tracks
    best = best[xp.lexsort(xp.stack([-score[best], q_of.astype(xp.float64)]))]
    q_of, tr = be.to_host(qt_key[best] // n_tracks), be.to_host(qt_key[best] % n_tracks)
    sc, cn = be.to_host(score[best]), be.to_host(count[best])
    off = be.to_host(keys[best] % (2 * _OFFSET_BIAS) - _OFFSET_BIAS)
    var = be.to_host(g[best] % n_var)
    bounds = np.searchsorted(q_of, np.arange(len(queries) + 1))
    out: list[list[Match]] = []
    for a, b in itertools.pairwise(bounds):  # per query: top_k Python objects
        ms = []
        for i in range(a, min(b, a + top_k)):
            if sc[i] < min_score:
                break
            runner_up = sc[i + 1] if i + 1 < b else 0.0
            t = index.track(int(tr[i]))
            ms.append(
                Match(
                    track=t.id,
                    score=round(float(sc[i]), 3),
                    aligned=int(cn[i]),
                    offset_s=round(float(off[i]) * fpr.frame_seconds, 3),
                    confidence=round(1.0 - float(runner_up) / float(sc[i]), 4),
                    speed=float(fpr.speeds[int(var[i])]),
                    path=t.path,
                )
            )
        out.append(ms)
    return out
