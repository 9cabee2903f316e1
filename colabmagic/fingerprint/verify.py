"""Second opinion on a candidate match: do the query's single peaks land on the track's peaks?

The hash vote (:mod:`colabmagic.fingerprint.match`) needs *both* peaks of a pair to survive in the
query, at exactly the quantised time and frequency difference; under heavy noise few pairs do, so
the right track is often among the top few candidates without a convincing score. Single peaks
survive far more often (a pair survives with probability ``p**2``, a peak with ``p``), so each
candidate ``(track, offset, speed)`` is re-scored by the query peaks that have a reference peak
within ±1 frame and ±1 bin of where they should be (positions kept to a quarter of a frame and a
bin; see :data:`UNITS`).

Chance hits are not rare in music: tracks in the same key and tempo share peak frequencies and
beat grids. The chance rate is therefore measured, not assumed: the same query peaks are tried at
:data:`NULL_SHIFTS` other offsets in the same track (1.2 to 5.5 s away; prime frame counts so no
shift is a whole number of beats at common tempos). The evidence of a candidate is the binomial
z-score of its hits against that rate::

    z = (H - Q p0 - 1/2) / sqrt(max(Q p0 (1 - p0), 1))
    p0 = (sum of null hits + 1) / (sum of null peaks + 2)

with ``Q`` the query peaks that fall inside the track at the candidate's offset and ``H`` those
that hit. The continuity correction and the variance floor keep the normal approximation honest
when fewer than one chance hit is expected (a near-silent passage, a sparse track): 5 hits where
0.3 are expected is a one-in-30,000 event, not the "8 standard deviations" the plain formula
gives, and such candidates were the highest-scoring strangers on music the threshold was not
tuned on. Everything is flat array work (binary searches and gathers over all candidates, shifts
and peaks at once), so one code path serves a single query on the host and a thousand queries on
the GPU, with identical results.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from colabmagic.fingerprint._xp import Backend

#: Stored peak positions are in 1/UNITS of a frame and of a frequency bin.
UNITS = 4
T_BITS, F_BITS = 26, 10
#: A query peak hits when a reference peak lies within this many units in time and frequency.
TOLERANCE = UNITS
#: Offsets (frames) at which the chance rate of hits is measured.
NULL_SHIFTS = (-173, -113, -71, -37, 37, 71, 113, 173)
#: Fewer query peaks than this inside the track: no verdict (z = 0).
MIN_PEAKS = 8


def pack_peaks(xp: Any, track: Any, times: Any, freqs: Any) -> Any:
    """Sortable ``uint64`` keys ``track << 36 | time << 10 | freq`` (times, freqs in units).

    Parameters
    ----------
    xp : module
        NumPy or CuPy.
    track, times, freqs : array (int64)
        Internal track number; peak time and frequency in 1/:data:`UNITS` frames and bins.
    """
    return (
        (track.astype(xp.uint64) << xp.uint64(T_BITS + F_BITS))
        | (times.astype(xp.uint64) << xp.uint64(F_BITS))
        | freqs.astype(xp.uint64)
    )


def reference_keys(track: int, peaks: np.ndarray) -> np.ndarray:
    """Sorted keys of one reference track's peaks (``peaks``: ``(n, 2)`` frame, bin)."""
    t = np.clip(np.rint(peaks[:, 0] * UNITS), 0, (1 << T_BITS) - 1).astype(np.int64)
    f = np.clip(np.rint(peaks[:, 1] * UNITS), 0, (1 << F_BITS) - 1).astype(np.int64)
    return np.unique(pack_peaks(np, np.full(t.shape, track, np.int64), t, f))


def _hits(xp: Any, keys: Any, track: Any, t: Any, f: Any) -> Any:
    """Whether a reference peak of *track* lies within :data:`TOLERANCE` of each ``(t, f)``.

    The keys of the peaks within ±TOLERANCE in time form one contiguous run (sorted by track,
    then time); the run is a handful of peaks long, so its frequencies are checked one rank at a
    time for every query point at once.
    """
    t = xp.clip(t, 0, (1 << T_BITS) - 1 - TOLERANCE)  # outside the track: masked by the caller
    lo = xp.searchsorted(keys, pack_peaks(xp, track, xp.maximum(t - TOLERANCE, 0), t * 0))
    top = pack_peaks(xp, track, t + TOLERANCE, t * 0 + ((1 << F_BITS) - 1))
    hi = xp.searchsorted(keys, top, side="right")
    run = hi - lo
    hit = xp.zeros(t.shape, dtype=bool)
    longest = int(run.max()) if run.size else 0
    mask = xp.uint64((1 << F_BITS) - 1)
    last = max(int(keys.shape[0]) - 1, 0)
    for k in range(longest):  # a few ranks, each over all query points
        ref_f = (keys[xp.minimum(lo + k, last)] & mask).astype(xp.int64)
        hit |= (run > k) & (xp.abs(ref_f - f) <= TOLERANCE)
    return hit


def peak_evidence(
    backend: Backend,
    keys: Any,
    track_frames: Any,
    cand_track: Any,
    cand_offset: Any,
    cand_speed: Any,
    peak_cand: Any,
    peak_t: Any,
    peak_f: Any,
) -> tuple[Any, Any, Any]:
    """z-score of the peak hits of every candidate (see the module docstring).

    Parameters
    ----------
    backend : Backend
    keys : array (uint64)
        Sorted reference peak keys of the index (:func:`pack_peaks`).
    track_frames : array (int64)
        Length in frames of every track, by internal number.
    cand_track, cand_offset : array (int64)
        Track and offset (reference frame where the query starts, in the speed hypothesis's
        time) of every candidate.
    cand_speed : array (float32)
        Speed hypothesis of every candidate.
    peak_cand : array (int64)
        For every (candidate, query peak) pair to test: the candidate.
    peak_t, peak_f : array (float32)
        The query peak's frame and bin (unscaled).

    Returns
    -------
    z : array (float64)
        Evidence per candidate (0 where fewer than :data:`MIN_PEAKS` peaks fall inside).
    hits, inside : array (int64)
        Query peaks that hit at the candidate's offset, and those inside the track there.
    """
    xp = backend.xp
    n = cand_track.shape[0]
    speed = cand_speed[peak_cand]
    tr = cand_track[peak_cand]
    t = xp.rint((peak_t * speed + cand_offset[peak_cand].astype(xp.float32)) * UNITS)
    t = t.astype(xp.int64)
    f = xp.rint(peak_f / speed * UNITS).astype(xp.int64)
    length = track_frames[tr] * UNITS
    shifts = xp.asarray(np.array((0, *NULL_SHIFTS), dtype=np.int64) * UNITS)
    ts = t[None, :] + shifts[:, None]  # (1 + shifts, pairs)
    inside = (ts >= 0) & (ts < length[None, :])
    hit = _hits(
        xp, keys, xp.broadcast_to(tr, ts.shape).reshape(-1), ts.reshape(-1),
        xp.broadcast_to(f, ts.shape).reshape(-1),
    ).reshape(ts.shape) & inside  # fmt: skip
    slot = (xp.arange(ts.shape[0])[:, None] * n + peak_cand[None, :]).reshape(-1)
    size = ts.shape[0] * n
    per_shift_hits = xp.bincount(slot, weights=hit.reshape(-1).astype(xp.float64), minlength=size)
    per_shift_in = xp.bincount(slot, weights=inside.reshape(-1).astype(xp.float64), minlength=size)
    per_shift_hits = per_shift_hits.reshape(ts.shape[0], n)
    per_shift_in = per_shift_in.reshape(ts.shape[0], n)
    h0, q0 = per_shift_hits[0], per_shift_in[0]
    p0 = (per_shift_hits[1:].sum(axis=0) + 1.0) / (per_shift_in[1:].sum(axis=0) + 2.0)
    z = (h0 - q0 * p0 - 0.5) / xp.sqrt(xp.maximum(q0 * p0 * (1.0 - p0), 1.0))
    z = xp.where(q0 >= MIN_PEAKS, z, 0.0)
    return z, h0.astype(xp.int64), q0.astype(xp.int64)
