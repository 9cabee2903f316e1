"""Query an :class:`~colabmagic.fingerprint.index.Index`: hash votes, then peak verification.

Two stages, both flat array work over every query of a batch at once (one code path for a single
query on the host and for a thousand on the GPU):

1. **Hash votes.** Each query looks a sample of its hashes up in every shard, within a budget
   of posting hits (:data:`QUERY_HIT_BUDGET`); each hit votes for ``(query, track, speed
   hypothesis, reference time - query time)``. Hits of the true track pile up at one offset,
   chance hits spread out; bins with fewer hits than the chance test could accept are dropped
   before the offset histograms. The best offset of each track is a candidate; its *hash score*
   is the weighted vote count there (see :func:`votes`).
2. **Peak verification.** The :data:`CANDIDATES` best candidates of each query are re-scored by
   how many of the query's single peaks land on the track's peaks at that offset, against the
   chance rate measured at other offsets (:mod:`colabmagic.fingerprint.verify`). Under noise a
   pair of peaks rarely survives but single peaks often do, so this recovers matches whose hash
   score alone is inconclusive, and a shared chord progression (many coincident peaks at one
   offset, few consistent pairs) does not pass for a copy.

The decision score is ``peak_z + HASH_WEIGHT * hash_score``; a match needs
:data:`DEFAULT_MIN_SCORE`, and a hash count at its offset that chance alone would not give in an
index of this size (:data:`CHANCE_BINS`): the more tracks, the more (track, offset) bins a
chance alignment can fall in, and a strong peak verdict resting on 3 aligned hashes proved to be
chance on 1,000 files.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from colabmagic.errors import ParameterError
from colabmagic.fingerprint._xp import Backend, resolve_backend
from colabmagic.fingerprint.audio import load_audio
from colabmagic.fingerprint.budget import best_bin_counts, spend_sampled
from colabmagic.fingerprint.fingerprinter import Fingerprint
from colabmagic.fingerprint.index import Index
from colabmagic.fingerprint.pipeline import now
from colabmagic.fingerprint.verify import peak_evidence

#: Default decision threshold on ``peak_z + HASH_WEIGHT * hash_score``: 10 % above every score
#: that audio outside the index reached on the Wesnoth benchmark (see docs/fingerprint.md).
DEFAULT_MIN_SCORE = 10.0
#: Weight of the hash score in the decision score.
HASH_WEIGHT = 0.5
#: Candidates per query that are verified by their peaks (the right track was always among the
#: best three by hash score on the benchmark, down to -5 dB).
CANDIDATES = 5
#: Posting hits a query may look up: at the unchanged speed (every query pays it), and in the
#: speed stage (queries with no match, or a weak one, at the unchanged speed), over the
#: :data:`SPEED_CHOICES` hypotheses its probe ranked best. Each stage looks its hashes up in a
#: fixed pseudo-random order of hash values, in whole slices of it, while the sum of their
#: postings stays within the budget (:func:`~colabmagic.fingerprint.budget.spend_sampled`): a
#: query of rare hashes looks them all up and stops early; one of common hashes (looping music,
#: several copies of one recording) gets a sample of them. Not rarest first, as before: on the
#: 1,000-file corpus the hashes a query shares with its recording are its common ones (median
#: 495 postings for the music-made hashes of 0 dB excerpts, 53 for the noise-made ones), so
#: rarest first spent a noisy query's budget on the noise, and a sped-up one's on hashes that
#: miss its recording; in the sampled order 10 s 0 dB calibration excerpts were found 85 -> 95 %
#: and 75 -> 82 % (two sets of 40), -5 dB 55 -> 62 % and 42 -> 57 %, 5 s ones as before, at the
#: same cost. The budgets come from costs, not recall: on the 2-core machine a hit costs ~0.05
#: us of CPU through the hash stage (20 hits per us, with :func:`_could_pass`), and the rest of
#: a 10 s query that pays both stages (decode, fingerprint, six speed variants, the probe,
#: lookups, two verifications) 14-25 ms at the 90th percentile, by load; the 30 ms target
#: leaves 5-16 ms, 100,000-300,000 hits, and the stages share the middle of that equally (a
#: noisy query is found by the first, a sped-up one only by the second). Measured on 160
#: calibration excerpts of the 1,000-file corpus (seed 999), not the benchmark's queries.
QUERY_HIT_BUDGET = 100_000
SPEED_HIT_BUDGET = 100_000
#: The speed stage's probe (:func:`_probe`): posting hits per (query, speed hypothesis), spent
#: on a sample of its hashes in the same order; and how many of the hypotheses whose probe
#: aligned the most hits in one (track, offset) bin then share :data:`SPEED_HIT_BUDGET`. Six
#: equal shares gave the right hypothesis a sixth of the budget: on 160 sped-up calibration
#: excerpts (x0.95 / x1.05, 5 s / 10 s, 40 each) 22-55 % were found (rarest first); in the
#: sampled order but still shared six ways 65-88 %; probing, then two hypotheses, 88-95 % with
#: 5,000 hits per probe and 80-98 % with 10,000 (the best hypothesis was next to the true speed
#: for 126 of 160 with 10,000, one of the best two for 148); three hypotheses bought nothing
#: more. The probe costs ~1.5-3 ms of CPU for a 10 s query (30,000 hits at most, no offset
#: histogram: one sort of its hits), which the 30 ms target can just carry beside the stage's
#: own 100,000; a 10,000-hit probe cost ~1.5 ms more for no more recall.
PROBE_HIT_BUDGET = 5_000
SPEED_CHOICES = 2
#: A match also needs an aligned hash count that chance reaches in at most this many bins of the
#: index (expected; :func:`_chance`), i.e. in one query of 100. On the 1,000-file corpus three
#: chance matches had 3 aligned hashes and a strong peak verdict (expected chance bins 0.5-1);
#: every true match had 5 or more (at most 0.001 there).
CHANCE_BINS = 1e-2
#: A match at the unchanged speed whose score is under this many times the threshold is
#: confirmed against the speed stage: the other hypotheses are tried too and the best score
#: wins. A sped-up excerpt of tonal music can align a few hashes of another recording at the
#: unchanged speed (same key, same tempo) for a score just over the threshold, and the speed
#: stage, which would have found its own recording at a much higher score, never ran: on the
#: 1,000-file corpus, frozen-bubble ``frozen-mainzik-2p`` x1.05 -> freedroidrpg ``underground``
#: (12.2) in the benchmark, and nexuiz ``subcities`` x0.95 -> planetblupi ``music005`` (16.0),
#: one of 3 false positives of 1,360 calibration excerpts (seeds 999 / 998); both are now their
#: own recordings at the right speed.
#: True matches at the unchanged speed that score under twice the threshold are noisy excerpts
#: (0 / -5 dB), which then pay for the speed stage too (see docs/fingerprint.md).
CONFIRM_FACTOR = 2.0
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
        The decision score, ``peak_z + HASH_WEIGHT * hash_score``.
    aligned : int
        Hashes aligned at the best offset.
    offset_s : float
        Where the query starts in the track, in seconds (negative: before the track starts).
    confidence : float
        ``score`` relative to the next-best other track, in [0, 1]: 1 - runner_up / score (1
        when no other track has as many aligned hashes as the chance test could accept).
    speed : float
        The playback-speed hypothesis that matched (1.0: unchanged).
    path : str
        The indexed file.
    hash_score : float
        Rarity-weighted hash hits at the offset, at most 0.3 per 1/8 s of query (see
        :func:`votes`).
    peak_z : float
        How far the query peaks that land on the track's peaks exceed chance, in standard
        deviations (:mod:`colabmagic.fingerprint.verify`).
    """

    track: str
    score: float
    aligned: int
    offset_s: float
    confidence: float
    speed: float
    path: str
    hash_score: float = 0.0
    peak_z: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "track": self.track,
            "score": self.score,
            "aligned": self.aligned,
            "offset_s": self.offset_s,
            "confidence": self.confidence,
            "speed": self.speed,
            "hash_score": self.hash_score,
            "peak_z": self.peak_z,
        }


class Votes(NamedTuple):
    """Candidates (best offset of a track for a query), best first within each query."""

    track: Any  # internal track number
    score: Any  # the decision statistic (the hash score until verified)
    count: Any  # aligned hashes
    offset: Any  # reference frame where the query starts
    variant: Any  # speed hypothesis
    query: Any = None  # query number (batches)
    hash_score: Any = None
    peak_z: Any = None
    chance: Any = None  # expected (track, offset, speed) bins with this many aligned hashes


def _lookup(
    index: Index, be: Backend, qh: Any, max_postings: int, select: Any = None
) -> tuple[Any, Any, Any]:
    """Every posting hit of the query hashes *qh*: (row in qh, track, reference time).

    Hashes with more than *max_postings* postings are skipped, or those that
    ``select(postings_per_hash)`` leaves out (a bool mask) when it is given.
    """
    xp = be.xp
    if not be.is_device:
        return index.lookup(qh, max_postings=max_postings, select=select)
    shards = index.device_arrays(be)
    found = [
        (xp.searchsorted(h, qh, side="left"), xp.searchsorted(h, qh, side="right"))
        for h, _ in shards
    ]
    per_hash = sum(hi - lo for lo, hi in found)
    stop = ~select(per_hash) if select is not None else per_hash > max_postings
    rows, posts = [], []
    for (lo, hi), (_, post) in zip(found, shards, strict=True):
        count = xp.where(stop, 0, hi - lo)
        total = int(count.sum())
        if total:
            rows.append(xp.repeat(xp.arange(qh.shape[0]), count))
            first = xp.repeat(lo - (xp.cumsum(count) - count), count)
            posts.append(post[first + xp.arange(total)])
    if not rows:
        empty = xp.zeros(0, dtype=xp.int64)
        return empty, empty, empty
    row, post = xp.concatenate(rows), xp.concatenate(posts)
    track = (post >> xp.uint64(32)).astype(xp.int64)
    keep = be.to_device(index._alive)[track]
    time = (post & xp.uint64(0xFFFFFFFF)).astype(xp.int64)
    return row[keep], track[keep], time[keep]


def _segment_scores(
    xp: Any, key: Any, segment: Any, code: Any, weight_of: Any
) -> tuple[Any, Any, Any]:
    """Per distinct *key*: sum over query segments of min(cap, weights in it), and the hits.

    A hit weighs ``weight_of[code]``. Where ``(key, segment, code)`` fit in one int64, the hits
    are grouped by one plain sort of that packed value (on the CPU several times faster than
    the argsort behind ``unique(return_inverse=True)``); otherwise by ``unique``.
    """
    n_seg = int(segment.max()) + 1
    code_bits = max(int(code.max()), 1).bit_length()
    if (int(key.max()) + 1) * n_seg < 1 << (63 - code_bits):
        packed = xp.sort(((key * n_seg + segment) << code_bits) | code)
        ks = packed >> code_bits
        first = xp.concatenate([xp.ones(1, dtype=bool), ks[1:] != ks[:-1]])
        inverse = xp.cumsum(first) - 1
        keys2 = ks[first]
        weight = weight_of[packed & ((1 << code_bits) - 1)]
    else:
        keys2, inverse = xp.unique(key * n_seg + segment, return_inverse=True)
        inverse = inverse.reshape(-1)
        weight = weight_of[code]
    per_seg = xp.bincount(inverse, weights=weight, minlength=keys2.shape[0])
    per_seg = xp.minimum(per_seg, SEGMENT_CAP)
    hits = xp.bincount(inverse, minlength=keys2.shape[0])
    k = keys2 // n_seg
    new = xp.concatenate([xp.ones(1, dtype=bool), k[1:] != k[:-1]])
    group = xp.cumsum(new) - 1
    n = int(group[-1]) + 1
    # per-group sums by bincount, not differences of one running sum: the same additions in the
    # same order whatever else is in the batch, so a query scores identically alone or batched
    score = xp.bincount(group, weights=per_seg, minlength=n)
    count = xp.bincount(group, weights=hits.astype(xp.float64), minlength=n).astype(xp.int64)
    return k[new], score, count


def _empty_votes(xp: Any) -> Votes:
    e = xp.zeros(0, dtype=xp.int64)
    z = xp.zeros(0, dtype=xp.float64)
    return Votes(e, z, e, e, e, e, z, z, z)


def _bins(index: Index, n_var: int) -> float:
    """The ``(track, offset, speed)`` bins a stage tries: every frame of every live track,
    *n_var* speed hypotheses."""
    frames = np.asarray(index._track_frames)  # not peak_keys(): dedup's index loads no peaks
    return float(np.sum(frames[index._alive])) * max(n_var, 1)


def _expected(
    bins: float, hits: np.ndarray, count: np.ndarray, searched: float | None = None
) -> np.ndarray:
    """Expected bins that *hits* random hits over *bins* fill with *count* or more, among the
    *searched* bins (default *bins*) the best is taken from: Poisson tails times the number of
    bins (``P(X >= k)`` of Poisson(lam) is ``gammainc(k, lam)``)."""
    from scipy.special import gammainc

    return (bins if searched is None else searched) * gammainc(count, hits / max(bins, 1.0))


def _chance(
    xp: Any, index: Index, be: Backend, hits: Any, count: Any, n_var: int, searched: int = 0
) -> Any:
    """Expected number of ``(track, offset, speed)`` bins of the index that chance alone fills
    with *count* or more aligned hashes, when a query's *hits* postings fall at random over the
    bins of the *n_var* speed hypotheses it looked up (:func:`_bins`), and the best is taken
    among *searched* hypotheses (default *n_var*; the speed stage chooses its hypotheses among
    six). A bigger index has more bins, so the same count means less.
    """
    hits = be.to_host(hits).astype(np.float64)
    k = np.maximum(be.to_host(count), 1).astype(np.float64)
    e = _expected(_bins(index, n_var), hits, k, _bins(index, max(searched, n_var)))
    return xp.asarray(e) if be.is_device else e


def _least_count(index: Index, hits: np.ndarray, n_var: int, searched: int = 0) -> np.ndarray:
    """Per query, the fewest aligned hashes that could pass the chance test (:func:`_chance`,
    :data:`CHANCE_BINS`) given its *hits* posting hits over *n_var* speed hypotheses (the best
    of *searched*)."""
    k = np.arange(1, 257, dtype=np.float64)[None, :]
    hits = np.asarray(hits, dtype=np.float64)[:, None]
    searched_bins = _bins(index, max(searched, n_var))
    passes = _expected(_bins(index, n_var), hits, k, searched_bins) <= CHANCE_BINS
    return np.where(passes.any(axis=1), 257 - passes.sum(axis=1), 257).astype(np.int64)


def _could_pass(xp: Any, key: Any, q: Any, least: Any) -> Any:
    """Which hits lie in a (query, track, speed, offset) bin holding at least ``least[q]`` hits
    (bool mask; a superset: bins are counted in a hashed table, and a collision only adds).

    Every bin that the chance test could pass keeps all its hits, so the matches reported are
    the same; the offset histograms (a sort and a dozen passes per hit) then see the few hits
    of such bins instead of every chance hit, which is what makes a larger budget affordable.
    """
    size = 1 << max(10, key.shape[0].bit_length())  # about one hit per bucket
    bucket = (key ^ (key >> 17) ^ (key >> 34)) & (size - 1)  # tracks differ above bit 24
    counts = xp.bincount(bucket, minlength=size)
    return counts[bucket] >= least[q]


def _hash_votes(
    index: Index,
    be: Backend,
    qid: Any,
    qh: Any,
    qt: Any,
    qv: Any,
    n_var: int,
    per_query: int,
    max_postings: int | None = None,
    chance: bool = True,
    budget: int | None = None,
    significant_only: bool = False,
    bins_vars: tuple[int, int] | None = None,
) -> Votes:
    """Hash stage for a batch: the best offset of every (query, track), best first per query.

    Each hit of query hash ``h`` weighs ``1 / log2(2 + hits(h))``; the votes of one 1/8 s
    segment of the query count at most :data:`SEGMENT_CAP` (see :func:`votes`). Keeps the
    *per_query* best tracks of each query (0: all). Hashes with more than *max_postings* postings
    (default :attr:`Index.stop_postings`) are not looked up; with a *budget*, each query looks
    up a sample of its hashes (a fixed order of hash values) within that many posting hits
    (:func:`~colabmagic.fingerprint.budget.spend_sampled`). With
    *significant_only*, only (track, offset) bins with as many hits as the chance test could
    accept are histogrammed (:func:`_could_pass`): the same matches, fewer candidates. The
    chance test takes *bins_vars* = (hypotheses each query looked up, hypotheses it chose them
    from) (default: those in the batch, both).
    """
    xp = be.xp
    stop = index.stop_postings if max_postings is None else max_postings
    select = None
    if budget is not None:

        def select(postings: Any) -> Any:
            return spend_sampled(xp, qid, qh, postings, budget, stop)

    row, track, ref_time = _lookup(index, be, qh, stop, select)
    if row.shape[0] == 0:
        return _empty_votes(xp)
    per_row = xp.bincount(row, minlength=qh.shape[0])  # hits of each query hash
    weight_of = 1.0 / xp.log2(2.0 + xp.arange(int(per_row.max()) + 1, dtype=xp.float64))
    n_tracks = int(index._alive.shape[0])
    hits = xp.bincount(qid[row])  # every posting hit of each query: the chance hits
    if bins_vars is None:  # every query looked up the hypotheses of the batch
        stage_vars = searched_vars = int(xp.unique(qv).shape[0])
    else:
        stage_vars, searched_vars = bins_vars
    q_time = qt[row]
    group = (qid[row] * n_tracks + track) * n_var + qv[row]
    key = group * (2 * _OFFSET_BIAS) + (ref_time - q_time + _OFFSET_BIAS)
    if significant_only:  # bins chance could explain cannot become matches: not histogrammed
        least = be.to_device(_least_count(index, be.to_host(hits), stage_vars, searched_vars))
        keep = _could_pass(xp, key, qid[row], least)
        if not bool(keep.any()):
            return _empty_votes(xp)
        row, key, q_time = row[keep], key[keep], q_time[keep]
    keys, score, count = _segment_scores(xp, key, q_time // SEGMENT_FRAMES, per_row[row], weight_of)
    if significant_only:  # exactly those bins (a hashed count also kept some others)
        enough = count >= least[keys // (2 * _OFFSET_BIAS) // (n_var * n_tracks)]
        keys, score, count = keys[enough], score[enough], count[enough]
        if keys.shape[0] == 0:
            return _empty_votes(xp)
    g = keys // (2 * _OFFSET_BIAS)
    pair = g // n_var  # (query, track): sorted, as keys are
    best = be.best_of_runs(pair, score, count)  # best offset of every (query, track)
    q_of = pair[best] // n_tracks
    best = best[xp.lexsort(xp.stack([-score[best], q_of.astype(xp.float64)]))]
    q_of = pair[best] // n_tracks
    if per_query:
        rank = xp.arange(best.shape[0]) - xp.searchsorted(q_of, q_of, side="left")
        best, q_of = best[rank < per_query], q_of[rank < per_query]
    zero = xp.zeros(best.shape[0], dtype=xp.float64)
    return Votes(
        track=pair[best] % n_tracks,
        score=score[best],
        count=count[best],
        offset=keys[best] % (2 * _OFFSET_BIAS) - _OFFSET_BIAS,
        variant=g[best] % n_var,
        query=q_of,
        hash_score=score[best],
        peak_z=zero,
        chance=(
            _chance(xp, index, be, hits[q_of], count[best], stage_vars, searched_vars)
            if chance
            else zero
        ),
    )


def _probe(
    index: Index, be: Backend, qid: Any, qh: Any, qt: Any, qv: Any, n_q: int, n_var: int
) -> np.ndarray:
    """The speed probe: per query and hypothesis, the most hits aligned in one (track, offset)
    bin when each (query, hypothesis) looks up a sample of its hashes within
    :data:`PROBE_HIT_BUDGET` posting hits, and the six probes together within
    :data:`SPEED_HIT_BUDGET` (:mod:`~colabmagic.fingerprint.budget`). A host array of shape
    ``(n_q, n_var)``; 0 where nothing was probed or hit.
    """
    xp = be.xp
    sub = qid * n_var + qv  # each (query, hypothesis) spends its own probe budget
    stop = index.stop_postings
    budget = min(PROBE_HIT_BUDGET, SPEED_HIT_BUDGET // max(n_var - 1, 1))

    def select(postings: Any) -> Any:
        return spend_sampled(xp, sub, qh, postings, budget, stop)

    row, track, ref_time = _lookup(index, be, qh, stop, select)
    span = int(index._alive.shape[0]) * 2 * _OFFSET_BIAS
    key = sub[row] * span + track * (2 * _OFFSET_BIAS) + (ref_time - qt[row] + _OFFSET_BIAS)
    best = best_bin_counts(xp, key, span, n_q * n_var)
    return be.to_host(best).reshape(n_q, n_var)


def _needs_probe(index: Index, qid: np.ndarray, qh: np.ndarray, mask: np.ndarray, n_q: int) -> Any:
    """Which queries' speed-stage hashes (*mask* of host arrays *qid*, *qh*) hold more postings
    under the stop list than :data:`SPEED_HIT_BUDGET` (bool per query): only those need the
    probe to choose; the others look up every hypothesis within the budget, as the probe would
    (a small index, a short query), without paying for it. Never with fewer hypotheses than
    :data:`SPEED_CHOICES` + 1 to choose from."""
    n_var = len(index.fingerprinter.speeds)
    if SPEED_CHOICES >= n_var - 1 or not mask.any():
        return np.zeros(n_q, bool)
    posts = index.postings_per_hash(qh[mask])
    cost = np.where(posts <= index.stop_postings, posts, 0).astype(np.float64)
    return np.bincount(qid[mask], weights=cost, minlength=n_q) > SPEED_HIT_BUDGET


def _choose_speeds(best: np.ndarray, retry: np.ndarray) -> np.ndarray:
    """Which (query, hypothesis) the speed stage spends on (bool, like *best*): per query in
    *retry*, the :data:`SPEED_CHOICES` hypotheses other than the unchanged speed whose probe
    aligned the most hits (ties: the order of ``Fingerprinter.speeds``)."""
    n_q, n_var = best.shape
    score = np.where(np.arange(n_var) > 0, best, -1)
    top = np.argsort(-score, axis=1, kind="stable")[:, :SPEED_CHOICES]
    chosen = np.zeros((n_q, n_var), bool)
    np.put_along_axis(chosen, top, values=True, axis=1)
    return chosen & retry[:, None]


def _verify(
    index: Index, be: Backend, v: Votes, peak_t: Any, peak_f: Any, peak_start: Any
) -> Votes:
    """Peak stage: re-score candidates by their peak evidence and re-rank them per query."""
    xp = be.xp
    if v.track.shape[0] == 0:
        return v
    keys, frames = index.peak_keys(be)
    speeds = be.to_device(np.asarray(index.fingerprinter.speeds, dtype=np.float32))
    first = peak_start[v.query]
    n_peaks = peak_start[v.query + 1] - first
    total = int(n_peaks.sum())
    cand = xp.repeat(xp.arange(v.track.shape[0]), n_peaks)
    which = xp.repeat(first - (xp.cumsum(n_peaks) - n_peaks), n_peaks) + xp.arange(total)
    z, _, _ = peak_evidence(
        be, keys, frames, v.track, v.offset, speeds[v.variant], cand, peak_t[which], peak_f[which]
    )
    final = z + HASH_WEIGHT * v.hash_score
    order = xp.lexsort(xp.stack([-final, v.query.astype(xp.float64)]))
    return Votes(
        track=v.track[order],
        score=final[order],
        count=v.count[order],
        offset=v.offset[order],
        variant=v.variant[order],
        query=v.query[order],
        hash_score=v.hash_score[order],
        peak_z=z[order],
        chance=v.chance[order],
    )


def _to_host(be: Backend, v: Votes) -> Votes:
    return Votes(*(be.to_host(a) for a in v))


def _hash_arrays(fps: list[Fingerprint], numbers: np.ndarray) -> tuple[np.ndarray, ...]:
    """Concatenated (query number, hash, time, variant) of fingerprints of queries *numbers*."""
    sizes = np.array([len(f.hashes) for f in fps], dtype=np.int64)
    if not fps:
        e = np.zeros(0, np.int64)
        return e, np.zeros(0, np.uint32), e, e
    return (
        np.repeat(numbers, sizes),
        np.concatenate([f.hashes for f in fps]),
        np.concatenate([f.times for f in fps]).astype(np.int64),
        np.concatenate([f.variant for f in fps]).astype(np.int64),
    )


def _identify(
    index: Index,
    fps: list[Fingerprint],
    *,
    be: Backend,
    per_query: int,
    min_score: float,
    all_speeds: bool,
    signals: list[np.ndarray] | None = None,
) -> Votes:
    """Both stages for a batch of query fingerprints; host arrays, best first per query.

    Unless *all_speeds*, only the unchanged-speed hashes are tried first, and all speed hypotheses
    only for the queries that found nothing at *min_score* times :data:`CONFIRM_FACTOR` (nothing, or
    a weak match that a sped-up hypothesis may beat): most queries are not sped up, so most pay for
    one hash set instead of ``len(speeds)``. Fingerprints that hold only the unchanged speed get
    every other hypothesis for those queries, hashed from the peaks they hold (or recomputed from
    *signals*). Those whose other hypotheses hold more postings than :data:`SPEED_HIT_BUDGET` probe
    each first and spend it on the best :data:`SPEED_CHOICES` (:func:`_probe`); the others look all
    of them up.
    """
    fpr = index.fingerprinter
    n_var = len(fpr.speeds)
    peaks = [f.peaks if f.peaks is not None else np.zeros((0, 2), np.float32) for f in fps]
    peak_start = be.to_device(np.concatenate([[0], np.cumsum([len(p) for p in peaks])]))
    all_peaks = np.concatenate(peaks) if peaks else np.zeros((0, 2), np.float32)
    peak_t = be.to_device(np.ascontiguousarray(all_peaks[:, 0]))
    peak_f = be.to_device(np.ascontiguousarray(all_peaks[:, 1]))
    qid, qh, qt, qv = _hash_arrays(fps, np.arange(len(fps)))

    def stage(
        arrays: tuple[np.ndarray, ...],
        mask: np.ndarray,
        budget: int,
        bins: tuple[int, int] | None = None,
    ) -> Votes:  # *bins*: the chance test's hypotheses (the speed stage's, see _hash_votes)
        d = [be.to_device(np.ascontiguousarray(a[mask])) for a in arrays]
        v = _hash_votes(
            index, be, *d, n_var=n_var, per_query=per_query, budget=budget,
            significant_only=min_score > 0, bins_vars=bins,
        )  # fmt: skip
        return _to_host(be, _verify(index, be, v, peak_t, peak_f, peak_start))

    arrays = (qid, qh, qt, qv)
    if all_speeds:  # every hypothesis at once, each with the unchanged speed's share (slower)
        return stage(arrays, np.ones(len(qv), bool), QUERY_HIT_BUDGET * n_var)
    first = stage(arrays, qv == 0, QUERY_HIT_BUDGET)
    if n_var == 1:
        return first
    best = np.full(len(fps), -np.inf)
    decided = _significant(first.chance) | (min_score <= 0)
    np.maximum.at(best, first.query, np.where(decided, first.score, -np.inf))
    retry = best < min_score * CONFIRM_FACTOR  # nothing, or a weak match: try the other speeds
    if not retry.any():
        return first
    numbers = np.flatnonzero(retry)
    fresh = signals is not None and not (qv > 0).any()
    if fresh and all(fps[i].peaks is not None for i in numbers):
        # the other hypotheses from the peaks already found: no second spectrogram
        others = fpr.speed_variants([fps[i] for i in numbers], range(1, n_var), backend=be)
        arrays = _hash_arrays(others, numbers)
    elif fresh:
        others = range(1, n_var)
        full = fpr.fingerprint_batch(
            [signals[i] for i in numbers], backend=be, query=True, variants=others
        )
        arrays = _hash_arrays(full, numbers)
    # the other speeds: where the budget covers all six, all six; elsewhere a probe of each
    # ranks them and the budget goes to the best (the chance test still counts all six)
    mask = retry[arrays[0]] & (arrays[3] > 0)
    probed = _needs_probe(index, arrays[0], arrays[1], mask, len(fps)) & retry
    every = mask & ~probed[arrays[0]]
    parts = [first]
    if every.any():
        parts.append(stage(arrays, every, SPEED_HIT_BUDGET, (n_var - 1, n_var - 1)))
    if probed.any():
        mask &= probed[arrays[0]]
        d = [be.to_device(np.ascontiguousarray(a[mask])) for a in arrays]
        chosen = _choose_speeds(_probe(index, be, *d, len(fps), n_var), probed)
        mask &= chosen[arrays[0], arrays[3]]
        parts.append(stage(arrays, mask, SPEED_HIT_BUDGET, (SPEED_CHOICES, n_var - 1)))
    merged = Votes(*(np.concatenate(a) for a in zip(*parts, strict=True)))
    order = np.lexsort((-merged.score, merged.query))
    merged = Votes(*(a[order] for a in merged))
    pair = merged.query * (int(merged.track.max(initial=0)) + 1) + merged.track
    _, first_of_pair = np.unique(pair, return_index=True)  # a track once, at its best speed
    keep = np.zeros(len(pair), bool)
    keep[first_of_pair] = True
    return Votes(*(a[keep] for a in merged))


def votes(index: Index, fp: Fingerprint) -> Votes:
    """Hash-stage offset histograms of one query fingerprint against *index* (no verification).

    Each hit votes for ``(track, speed hypothesis, offset)``. A hit of query hash ``h`` weighs
    ``1 / log2(2 + postings(h))``: common hashes (a bass note held at the typical interval) say
    little, rare ones a lot. The votes of one 1/8 s segment of the query count at most 0.3, so
    the score grows with how much of the query aligns, not with how many hashes a burst of
    notes produces: a short phrase shared by two different tracks (or a burst of chance hits)
    cannot pass for a match. Returns the best offset of every track, best first.
    """
    be = resolve_backend("numpy")
    n_var = int(fp.variant.max()) + 1 if len(fp.variant) else 1
    qt = fp.times.astype(np.int64)
    qid = np.zeros(len(qt), np.int64)
    variant = fp.variant.astype(np.int64)  # dedup's path: no chance test (5 % of its time)
    return _hash_votes(index, be, qid, fp.hashes, qt, variant, n_var, 0, chance=False)


def _significant(chance: Any) -> np.ndarray:
    """Which candidates' aligned hash counts are significant (:data:`CHANCE_BINS`; host arrays),
    given their ``Votes.chance``."""
    return np.asarray(chance) <= CHANCE_BINS


def _matches(index: Index, v: Votes, a: int, b: int, top_k: int, min_score: float) -> list[Match]:
    """Match objects for rows ``a:b`` of *v* (one query, best first)."""
    fpr = index.fingerprinter
    out = []
    significant = _significant(v.chance[a:b])
    for i in range(a, b):
        score = float(v.score[i])
        if score < min_score or len(out) == top_k:
            break
        if min_score > 0 and not significant[i - a]:
            continue  # chance alignment (min_score 0 lists every candidate)
        runner_up = max(float(v.score[i + 1]), 0.0) if i + 1 < b else 0.0
        t = index.track(int(v.track[i]))
        out.append(
            Match(
                track=t.id,
                score=round(score, 3),
                aligned=int(v.count[i]),
                offset_s=round(float(v.offset[i]) * fpr.frame_seconds, 3),
                confidence=round(min(max(1.0 - runner_up / score, 0.0), 1.0), 4),
                speed=float(fpr.speeds[int(v.variant[i])]),
                path=t.path,
                hash_score=round(float(v.hash_score[i]), 3),
                peak_z=round(float(v.peak_z[i]), 3),
            )
        )
    return out


def candidates(
    index: Index,
    query: np.ndarray | Fingerprint,
    *,
    top_k: int = CANDIDATES,
    min_score: float = DEFAULT_MIN_SCORE,
    all_speeds: bool = False,
    backend: str | Backend = "numpy",
) -> Votes:
    """Verified candidates of one query (samples or fingerprint), best first (host arrays).

    Samples are fingerprinted at the unchanged speed first, and with every speed hypothesis
    only when that finds nothing at *min_score* times :data:`CONFIRM_FACTOR` (unless
    *all_speeds*).
    """
    signals = None
    if isinstance(query, Fingerprint):
        fp = query
    else:
        signals = [query]
        variants = None if all_speeds else [0]
        fpr = index.fingerprinter
        fp = fpr.fingerprint(query, backend=backend, query=True, variants=variants)
    return _identify(
        index,
        [fp],
        be=resolve_backend("numpy"),
        per_query=max(top_k, CANDIDATES),
        min_score=min_score,
        all_speeds=all_speeds,
        signals=signals,
    )


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
    min_score : float
        Tracks whose decision score is lower, or whose aligned hashes chance explains (see
        :data:`CHANCE_BINS`), are not reported ("no match"); 0 lists every candidate.
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
    q = query
    if not isinstance(query, (np.ndarray, Fingerprint)):
        q = load_audio(query, sample_rate=index.fingerprinter.sample_rate)
    v = candidates(
        index, q, top_k=top_k, min_score=min_score, all_speeds=all_speeds, backend=backend
    )
    return _matches(index, v, 0, len(v.track), top_k, min_score)


@dataclass(frozen=True)
class QueryResult:
    """The outcome of one query, as the CLI prints it."""

    query: str
    matches: list[Match]
    latency_s: float
    cpu_s: float = 0.0  # CPU time of this process for the query (latency minus waiting)

    def to_dict(self) -> dict[str, Any]:
        best = self.matches[0] if self.matches else None
        d: dict[str, Any] = {
            "query": self.query,
            "track": best.track if best else None,
            "score": best.score if best else 0.0,
            "offset_s": best.offset_s if best else None,
            "latency_s": round(self.latency_s, 6),
            "cpu_s": round(self.cpu_s, 6),
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
    """Decode, fingerprint and match one file, timing the whole of it (wall and CPU time)."""
    start, cpu = now(), time.process_time()
    matches = match(index, path, top_k=top_k, min_score=min_score, backend=backend)
    return QueryResult(os.fspath(path), matches, now() - start, time.process_time() - cpu)


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
    once (and cached); lookups, offset histograms, peak verification and the per-query ranking
    are array operations over all queries together. Results equal :func:`match` run on each
    query.

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
    fps = index.fingerprinter.fingerprint_batch(queries, backend=be, query=True, variants=[0])
    v = _identify(
        index,
        fps,
        be=be,
        per_query=max(top_k, CANDIDATES),
        min_score=min_score,
        all_speeds=False,
        signals=queries,
    )
    bounds = np.searchsorted(v.query, np.arange(len(queries) + 1))
    return [
        _matches(index, v, int(a), int(b), top_k, min_score) for a, b in itertools.pairwise(bounds)
    ]
