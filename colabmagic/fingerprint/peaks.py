"""Vectorised 2-D spectral peak picking with a controllable density.

A peak is a time-frequency point that is the maximum of its ``(2 * time_radius + 1) x
(2 * freq_radius + 1)`` neighbourhood; of those, the ``per_block`` strongest of every block of
``block`` frames are kept, which fixes the density (peaks per second) whatever the loudness.
Positions are refined to sub-bin / sub-frame precision by a parabola through the log power, which
lets the hashing tolerate small speed changes.
"""

from __future__ import annotations

from typing import Any

from colabmagic.fingerprint._xp import Backend


def pick_peaks(
    backend: Backend,
    power: Any,
    *,
    freq_radius: int,
    time_radius: int,
    block: int,
    per_block: int,
    f_lo: int,
    f_hi: int,
    first: int = 0,
    last: int | None = None,
) -> tuple[Any, Any, Any]:
    """Peaks of a power spectrogram as sub-bin positions, sorted by time.

    Parameters
    ----------
    backend : Backend
    power : array, shape (n_frames, n_bins)
        Non-negative power; ``n_frames`` is a multiple of *block*.
    freq_radius, time_radius : int
        Half-size of the neighbourhood a peak must dominate.
    block, per_block : int
        Keep the ``per_block`` strongest peaks of every ``block`` frames.
    f_lo, f_hi : int
        Bins ``f_lo <= f < f_hi`` are searched (``1 <= f_lo``, ``f_hi < n_bins``).
    first, last : int
        Only frames ``first <= t < last`` may hold peaks (the others are context); ``first`` is
        a multiple of *block*.

    Returns
    -------
    frames : array (int64)
        Frame of every peak, sorted.
    offsets, freqs : array (float32)
        Sub-frame offset (in [-0.5, 0.5]) and bin of every peak, refined by parabolic
        interpolation. Frame and offset stay apart so that frames far into a long batch keep
        their precision (float32 has a 1/64 frame step at 2**18 frames).
    """
    xp = backend.xp
    band = power[:, f_lo:f_hi]
    local = backend.max_filter(band, freq_radius, 1)
    local = backend.max_filter(local, time_radius, 0)
    is_peak = (band == local) & (band > 0)
    is_peak = is_peak[first:last]
    band = band[first:last]
    n_bands = f_hi - f_lo
    flat = xp.nonzero(is_peak.reshape(-1))[0]  # time-major; 1-D nonzero is ~5x faster than 2-D
    rows = flat // n_bands
    cols = flat - rows * n_bands
    values = band[rows, cols]  # gathers from the view: no copy of the band
    blk = rows // block
    order = xp.argsort(_block_then_strongest(xp, blk, values), kind="stable")
    blk_sorted = blk[order]
    block_start = xp.searchsorted(blk_sorted, blk_sorted, side="left")
    rank = xp.arange(blk_sorted.shape[0]) - block_start
    keep = xp.sort(order[rank < per_block])  # back to time-major order
    t = rows[keep] + first
    f = cols[keep] + f_lo
    return _refine(backend, power, t, f)


def _block_then_strongest(xp: Any, blk: Any, values: Any) -> Any:
    """One ``uint64`` sort key: block ascending, then value descending (values are > 0).

    The bits of a positive float32 grow with its value, so ``0xFFFFFFFF - bits`` sorts the
    strongest first; a stable sort of this key orders exactly like ``lexsort((-values, blk))``
    at the cost of one sort instead of two.
    """
    weaker = xp.uint32(0xFFFFFFFF) - values.view(xp.uint32)
    return (blk.astype(xp.uint64) << xp.uint64(32)) | weaker.astype(xp.uint64)


def _refine(backend: Backend, power: Any, t: Any, f: Any) -> tuple[Any, Any, Any]:
    """Parabolic interpolation of each peak along frequency and time on the log power."""
    xp = backend.xp
    eps = xp.float32(1e-12)
    n_frames = power.shape[0]
    # neighbours outside the array count as silence, exactly like the empty blocks between slots
    before = xp.where(t >= 1, power[xp.maximum(t - 1, 0), f], 0)
    after = xp.where(t + 1 < n_frames, power[xp.minimum(t + 1, n_frames - 1), f], 0)
    c = xp.log(power[t, f] + eps)

    def offset(lo: Any, hi: Any) -> Any:
        den = lo - 2 * c + hi
        curved = den < 0
        step = xp.float32(0.5) * (lo - hi) / xp.where(curved, den, xp.float32(-1))
        return xp.where(curved, xp.clip(step, -0.5, 0.5), 0).astype(xp.float32)

    df = offset(xp.log(power[t, f - 1] + eps), xp.log(power[t, f + 1] + eps))
    dt = offset(xp.log(before + eps), xp.log(after + eps))
    return t, dt, f.astype(xp.float32) + df
