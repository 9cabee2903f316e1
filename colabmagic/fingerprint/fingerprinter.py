"""The :class:`Fingerprinter`: audio in, landmark hashes out, on NumPy or CuPy."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np

from colabmagic.errors import ParameterError
from colabmagic.fingerprint import hashing, peaks, spectrogram
from colabmagic.fingerprint._xp import Backend, resolve_backend


class Fingerprint(NamedTuple):
    """Hashes of one signal.

    Attributes
    ----------
    hashes : numpy.ndarray (uint32)
    times : numpy.ndarray (int32)
        Anchor frame of every hash (``Fingerprinter.frame_seconds`` seconds per frame).
    variant : numpy.ndarray (int8)
        Which speed variant produced the hash (always 0 for reference fingerprints).
    peaks : numpy.ndarray (float32), shape (n, 2), optional
        The spectral peaks the hashes were made of: frame and bin, refined below one unit,
        sorted by frame (used to verify candidate matches, see
        :mod:`colabmagic.fingerprint.verify`).
    """

    hashes: np.ndarray
    times: np.ndarray
    variant: np.ndarray
    peaks: np.ndarray | None = None


DEFAULT_SPEEDS = (1.0, 0.96, 1.04, 0.98, 1.02, 0.94, 1.06)


@dataclass(frozen=True)
class Fingerprinter:
    """Landmark ("constellation") fingerprints: log-spectrogram peaks paired into hashes.

    Parameters
    ----------
    sample_rate : int
        Audio is mixed to mono and resampled to this rate first.
    n_fft, hop : int
        STFT size and hop in samples (``n_fft`` a multiple of ``hop``).
    f_min, f_max : float
        Frequency band searched for peaks, in Hz.
    peaks_per_second : float
        Density of reference peaks.
    fanout : int
        Pairs per anchor peak in the reference.
    freq_radius, time_radius : int
        A peak dominates ``±freq_radius`` bins and ``±time_radius`` frames.
    dt_max, df_max : int
        Target zone of a pair, in frames and bins.
    query_density, query_fanout : float, int
        Queries use ``query_density`` times more peaks and ``query_fanout`` pairs per anchor,
        which makes them find the reference's pairs despite noise.
    speeds : tuple of float
        Playback-speed hypotheses tried for queries (1.0 first); each adds one hash set.
    batch_seconds, device_batch_seconds : float
        Tracks are processed in batches of about this much audio, on the host and on a device
        (larger there: fixed costs per batch, ~1 GB of device memory per hour of audio).

    Examples
    --------
    >>> fp = Fingerprinter()
    >>> y = np.random.default_rng(0).standard_normal(8000 * 5).astype(np.float32)
    >>> len(fp.fingerprint(y, backend="numpy").hashes) > 0
    True
    """

    sample_rate: int = 8000
    n_fft: int = 512
    hop: int = 256
    f_min: float = 90.0
    f_max: float = 3500.0
    peaks_per_second: float = 24.0
    fanout: int = 8
    freq_radius: int = 6
    time_radius: int = 4
    dt_max: int = 48
    df_max: int = 40
    block: int = 32
    query_density: float = 1.5
    query_fanout: int = 10
    speeds: tuple[float, ...] = DEFAULT_SPEEDS
    batch_seconds: float = 900.0
    device_batch_seconds: float = 7200.0

    def __post_init__(self) -> None:
        checks = [
            (self.sample_rate >= 2000, "sample_rate", ">= 2000"),
            (self.hop > 0 and self.n_fft % self.hop == 0, "n_fft", "a multiple of hop"),
            (0 < self.f_min < self.f_max < self.sample_rate / 2, "f_max", "in (f_min, sr/2)"),
            (self._f_hi <= hashing.F_MAX, "f_max", f"below bin {hashing.F_MAX}"),
            (self.peaks_per_second > 0, "peaks_per_second", "> 0"),
            (self.fanout >= 1 and self.query_fanout >= 1, "fanout", ">= 1"),
            (1 <= self.dt_max <= hashing.DT_MAX, "dt_max", f"in [1, {hashing.DT_MAX}]"),
            (1 <= self.df_max <= hashing.DF_MAX, "df_max", f"in [1, {hashing.DF_MAX}]"),
            (self.block > 2 * self.time_radius, "block", "> 2 * time_radius"),
            (len(self.speeds) >= 1 and self.speeds[0] == 1.0, "speeds", "starting with 1.0"),
        ]
        for ok, name, want in checks:
            if not ok:
                msg = f"{name}={getattr(self, name)!r} must be {want}; fix the Fingerprinter."
                raise ParameterError(msg)

    # -- derived constants -------------------------------------------------------------------
    @property
    def frame_seconds(self) -> float:
        """Seconds per STFT frame (the unit of hash times)."""
        return self.hop / self.sample_rate

    @property
    def _f_lo(self) -> int:
        return max(1, round(self.f_min * self.n_fft / self.sample_rate))

    @property
    def _f_hi(self) -> int:
        return round(self.f_max * self.n_fft / self.sample_rate)

    def params(self) -> dict[str, Any]:
        """The parameters as a JSON-able dict (stored in an index's manifest)."""
        d = asdict(self)
        d["speeds"] = list(self.speeds)
        return d

    # -- public API --------------------------------------------------------------------------
    def fingerprint(
        self,
        signal: np.ndarray,
        *,
        backend: str | Backend = "auto",
        query: bool = False,
        variants: Sequence[int] | None = None,
    ) -> Fingerprint:
        """Hashes of one mono signal at :attr:`sample_rate`.

        Parameters
        ----------
        signal : numpy.ndarray
            1-D float audio.
        backend : {"auto", "numpy", "cupy"} or Backend
        query : bool
            Use the query settings (denser peaks, larger fan-out, speed variants).
        variants : sequence of int, optional
            With *query*: hash only these speed hypotheses (indices into :attr:`speeds`).

        Returns
        -------
        Fingerprint
        """
        return self.fingerprint_batch([signal], backend=backend, query=query, variants=variants)[0]

    def fingerprint_batch(
        self,
        signals: Sequence[np.ndarray],
        *,
        backend: str | Backend = "auto",
        query: bool = False,
        variants: Sequence[int] | None = None,
    ) -> list[Fingerprint]:
        """Hashes of many signals, computed in large batches (one device transfer each way).

        Parameters
        ----------
        signals : sequence of numpy.ndarray
            1-D float audio at :attr:`sample_rate`.
        backend : {"auto", "numpy", "cupy"} or Backend
        query : bool
            Use the query settings.
        variants : sequence of int, optional
            With *query*: hash only these speed hypotheses (indices into :attr:`speeds`; all by
            default). Matching hashes the unchanged speed first and the others only if needed.

        Returns
        -------
        list of Fingerprint
            One per signal, same order; batching does not change the hashes.
        """
        be = resolve_backend(backend)
        chosen = tuple(range(len(self.speeds))) if variants is None else tuple(variants)
        if not query:
            chosen = (0,)
        if not chosen or not all(0 <= v < len(self.speeds) for v in chosen):
            msg = f"variants={variants!r}: pick indices into speeds (0..{len(self.speeds) - 1})."
            raise ParameterError(msg)
        for i, s in enumerate(signals):
            if np.ndim(s) != 1:
                msg = f"signals[{i}] has shape {np.shape(s)}; pass 1-D mono audio (mix first)."
                raise ParameterError(msg)
        out: list[Fingerprint] = []
        seconds = self.device_batch_seconds if be.is_device else self.batch_seconds
        limit = seconds * self.sample_rate
        batch: list[np.ndarray] = []
        for s in signals:
            if batch and sum(map(len, batch)) + len(s) > limit:
                out.extend(self._run_batch(be, batch, query, chosen))
                batch = []
            batch.append(np.asarray(s, dtype=np.float32))
        if batch:
            out.extend(self._run_batch(be, batch, query, chosen))
        return out

    def _peaks(
        self, be: Backend, signals: list[np.ndarray], lay: spectrogram.Layout, per_block: int
    ) -> tuple[Any, Any, Any]:
        """Peaks of the whole batch (frame, sub-frame offset, bin), in chunks of frames.

        Chunks are cache-sized on the CPU and hours long on a device.

        Each chunk's samples are packed (and copied to the device) on their own: a few MiB
        reused chunk after chunk rather than one buffer of the whole batch, whose fresh pages
        cost more to fault in than the chunk's FFT.
        """
        xp = be.xp
        n_frames = lay.total
        window = be.to_device(np.hanning(self.n_fft + 2)[1:-1].astype(np.float32))
        chunk = self.block * (1 << 14 if be.is_device else 64)
        halo = max(self.time_radius, 1)
        frames, offsets, freqs = [], [], []
        for start in range(0, n_frames, chunk):  # chunks of thousands of frames, not frames
            a, b = max(start - halo, 0), min(start + chunk + halo, n_frames)
            lo, hi = a * self.hop, (b - 1) * self.hop + self.n_fft
            seg = spectrogram.pack_signals(
                signals, lay, hop=self.hop, n_fft=self.n_fft, lo=lo, hi=hi, backend=be
            )
            power = spectrogram.power_spectrogram(
                be, seg, n_frames=b - a, n_fft=self.n_fft, hop=self.hop, window=window
            )
            t, dt, f = peaks.pick_peaks(
                be,
                power,
                freq_radius=self.freq_radius,
                time_radius=self.time_radius,
                block=self.block,
                per_block=per_block,
                f_lo=self._f_lo,
                f_hi=self._f_hi,
                first=start - a,
                last=min(start + chunk, n_frames) - a,
            )
            frames.append(t + a)
            offsets.append(dt)
            freqs.append(f)
        return xp.concatenate(frames), xp.concatenate(offsets), xp.concatenate(freqs)

    # -- the pipeline --------------------------------------------------------------------------
    def _run_batch(
        self, be: Backend, signals: list[np.ndarray], query: bool, variants: tuple[int, ...]
    ) -> list[Fingerprint]:
        xp = be.xp
        lay = spectrogram.layout(
            [len(s) for s in signals], hop=self.hop, block=self.block, n_fft=self.n_fft
        )
        density = self.peaks_per_second * (self.query_density if query else 1.0)
        per_block = max(1, round(density * self.block * self.frame_seconds))
        frames, offsets, freqs = self._peaks(be, signals, lay, per_block)
        starts = be.to_device(lay.starts)
        track = xp.searchsorted(starts, frames, side="right") - 1
        times = (frames - starts[track]).astype(xp.float32) + offsets  # exact up to the track
        fanout = self.query_fanout if query else self.fanout
        hashed = self._hash_variants(be, times, freqs, track, len(signals), fanout, variants)
        peak_bounds = be.to_host(xp.searchsorted(track, xp.arange(len(signals) + 1)))
        peak_xy = be.to_host(xp.stack([times, freqs], axis=1))
        return [
            Fingerprint(h, t, var, peak_xy[pa:pb])
            for (h, t, var), (pa, pb) in zip(hashed, itertools.pairwise(peak_bounds), strict=True)
        ]

    def _hash_variants(
        self,
        be: Backend,
        times: Any,
        freqs: Any,
        track: Any,
        n_signals: int,
        fanout: int,
        variants: Sequence[int],
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(hashes, times, variant)`` host arrays per signal, for peaks sorted by track."""
        xp = be.xp
        h, t, tr, pos = hashing.landmark_hashes_speeds(  # every speed hypothesis in one pass
            be,
            times,
            freqs,
            track,
            [(self.speeds[v], 1.0 / self.speeds[v]) for v in variants],
            fanout=fanout,
            dt_max=self.dt_max,
            df_max=self.df_max,
            lookahead=4 * fanout,
        )
        var = be.to_device(np.asarray(variants, dtype=np.int8))[pos]
        if len(variants) > 1:
            order = xp.argsort(tr, kind="stable")
            h, t, tr, var = h[order], t[order], tr[order], var[order]
        # bounds are found where the arrays live; only what the caller keeps crosses back
        bounds = be.to_host(xp.searchsorted(tr, xp.arange(n_signals + 1)))
        h = be.to_host(h)
        t = be.to_host(xp.maximum(t, 0).astype(xp.int32))
        var = be.to_host(var)
        return [(h[a:b], t[a:b], var[a:b]) for a, b in itertools.pairwise(bounds)]

    def speed_variants(
        self,
        fps: Sequence[Fingerprint],
        variants: Sequence[int],
        *,
        backend: str | Backend = "numpy",
    ) -> list[Fingerprint]:
        """Query hashes of the speed hypotheses *variants*, made from query fingerprints' peaks.

        The hashes of ``fingerprint_batch(signals, query=True, variants=variants)`` without
        computing the spectrograms and peaks again: a query that finds nothing at the unchanged
        speed is hashed under the other hypotheses from the peaks it already has.

        Parameters
        ----------
        fps : sequence of Fingerprint
            Query fingerprints (``query=True``) with their peaks.
        variants : sequence of int
            Indices into :attr:`speeds`.
        backend : {"auto", "numpy", "cupy"} or Backend

        Returns
        -------
        list of Fingerprint
            One per fingerprint, holding only the hashes of *variants* (and the same peaks).
        """
        if any(f.peaks is None for f in fps):
            msg = "speed_variants needs fingerprints with peaks; fingerprint the signals again."
            raise ParameterError(msg)
        if not variants or not all(0 <= v < len(self.speeds) for v in variants):
            msg = f"variants={variants!r}: pick indices into speeds (0..{len(self.speeds) - 1})."
            raise ParameterError(msg)
        be = resolve_backend(backend)
        peaks = [np.asarray(f.peaks, dtype=np.float32) for f in fps]
        xy = np.concatenate(peaks) if peaks else np.zeros((0, 2), np.float32)
        track = np.repeat(np.arange(len(fps)), [len(p) for p in peaks])
        hashed = self._hash_variants(
            be,
            be.to_device(np.ascontiguousarray(xy[:, 0])),
            be.to_device(np.ascontiguousarray(xy[:, 1])),
            be.to_device(track),
            len(fps),
            self.query_fanout,
            tuple(variants),
        )
        return [Fingerprint(h, t, var, p) for (h, t, var), p in zip(hashed, peaks, strict=True)]
