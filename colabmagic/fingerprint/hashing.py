"""Peak pairs ("landmarks") packed into integer hashes.

Every anchor peak is paired with the first ``fanout`` later peaks of the same track that lie in its
target zone (``1 <= dt <= dt_max`` frames, ``|df| <= df_max`` bins). A pair becomes one 21-bit
hash ``f1 (8 bits) | df (7 bits) | dt (6 bits)`` and the anchor's frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from colabmagic.fingerprint._xp import Backend

F_BITS, DF_BITS, DT_BITS = 8, 7, 6
HASH_BITS = F_BITS + DF_BITS + DT_BITS
DT_MAX = (1 << DT_BITS) - 1
DF_MAX = (1 << (DF_BITS - 1)) - 1
F_MAX = (1 << F_BITS) - 1


def landmark_hashes(
    backend: Backend,
    times: Any,
    freqs: Any,
    track: Any,
    *,
    fanout: int,
    dt_max: int,
    df_max: int,
    lookahead: int,
    time_scale: float = 1.0,
    freq_scale: float = 1.0,
) -> tuple[Any, Any, Any]:
    """Hashes of peak pairs.

    Parameters
    ----------
    backend : Backend
    times, freqs : array (float32)
        Peak frames and bins (sub-bin precision), sorted by time within each track.
    track : array (int64)
        Track number of every peak, non-decreasing (each track's peaks together); pairs never
        cross tracks.
    fanout : int
        Pairs per anchor.
    dt_max, df_max : int
        Target zone, in frames and bins.
    lookahead : int
        How many following peaks are examined per anchor (``>= fanout``).
    time_scale, freq_scale : float
        Peaks are mapped to ``(t * time_scale, f * freq_scale)`` before quantisation; a query
        played ``s`` times too fast is matched with ``time_scale = s``, ``freq_scale = 1 / s``.

    Returns
    -------
    hashes : array (uint32)
    anchor_times : array (int64)
        Anchor frame, rounded, in the (scaled) time of the input.
    pair_track : array (int64)
        Track of every hash.
    """
    h, t, tr, _ = landmark_hashes_speeds(
        backend,
        times,
        freqs,
        track,
        [(time_scale, freq_scale)],
        fanout=fanout,
        dt_max=dt_max,
        df_max=df_max,
        lookahead=lookahead,
    )
    return h, t, tr


def landmark_hashes_speeds(
    backend: Backend,
    times: Any,
    freqs: Any,
    track: Any,
    scales: Sequence[tuple[float, float]],
    *,
    fanout: int,
    dt_max: int,
    df_max: int,
    lookahead: int,
) -> tuple[Any, Any, Any, Any]:
    """:func:`landmark_hashes` under several ``(time_scale, freq_scale)`` at once.

    One pass over a ``(len(scales), peaks, lookahead)`` array instead of one call per speed
    hypothesis; the results are those of the calls concatenated in the order of *scales*, plus
    the position in *scales* of every hash.
    """
    xp = backend.xp
    n = times.shape[0]
    ts = xp.asarray(np.array([a for a, _ in scales], dtype=np.float32))[:, None]
    fs = xp.asarray(np.array([b for _, b in scales], dtype=np.float32))[:, None]
    t = times[None, :] * ts  # (v, n)
    f = freqs[None, :] * fs
    # peak i's partners are peaks i+1..i+lookahead of its own track (tracks are sorted): a
    # comparison with where the track ends, and strided windows of the following peaks instead
    # of gathers through an (n, lookahead) index matrix (half the CPU, the same values)
    end = xp.searchsorted(track, track, side="right")
    same = xp.arange(1, lookahead + 1)[None, :] < (end - xp.arange(n))[:, None]
    pad = xp.zeros((t.shape[0], lookahead), dtype=t.dtype)  # beyond the last peak: masked
    later_t = backend.windows(xp.concatenate([t, pad], axis=1), lookahead)[:, 1 : n + 1]
    later_f = backend.windows(xp.concatenate([f, pad], axis=1), lookahead)[:, 1 : n + 1]
    # (v, n, lookahead), rounded but kept in float32 (exact small integers): the tests run on
    # 4-byte values, and only the kept pairs are converted
    dt = xp.rint(later_t - t[:, :, None])
    df = xp.rint(later_f - f[:, :, None])
    valid = same[None] & (dt >= 1) & (dt <= dt_max)
    valid &= xp.abs(df) <= df_max
    valid &= xp.cumsum(valid, axis=2, dtype=xp.int16) <= fanout
    kept = xp.nonzero(valid.reshape(-1))[0]  # 1-D nonzero: several times faster than 3-D
    which = kept // (n * lookahead)
    rows = (kept - which * (n * lookahead)) // lookahead
    f1 = xp.clip(xp.rint(f[which, rows]).astype(xp.int64), 0, F_MAX)
    dtv = dt.reshape(-1)[kept].astype(xp.int64)
    dfv = df.reshape(-1)[kept].astype(xp.int64) + DF_MAX + 1
    hashes = (f1 << (DF_BITS + DT_BITS)) | (dfv << DT_BITS) | dtv
    anchor = xp.rint(t[which, rows]).astype(xp.int64)
    return hashes.astype(xp.uint32), anchor, track[rows], which
