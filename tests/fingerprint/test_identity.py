"""Landmarks are bit-identical to a plain reference implementation kept here (issue 14).

The extraction is tuned for speed (chunks, only the bins peaks can use, fused passes, strided
views instead of gathers); the matcher's thresholds and budgets are calibrated on the hashes as
they were. This reference is the algorithm written the slow and obvious way -- one track at a
time, whole, ``scipy.ndimage.maximum_filter`` for the neighbourhood maxima, ``lexsort`` for the
strongest peaks per block, one row per anchor for the pairs -- and the tool's hashes, anchor
times and peaks must equal it bit for bit, on real decoded audio (synthetic music encoded to
MP3 by ffmpeg and decoded by the tool, long enough to span several chunks), alone, in batches,
through the worker pipeline and for queries under every speed hypothesis.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

from colabmagic.fingerprint import Fingerprinter, load_audio
from colabmagic.fingerprint.pipeline import Job, extract_group

from .conftest import ffmpeg, synth_music, write_wav


def reference_peaks(fpr: Fingerprinter, y: np.ndarray, density: float) -> np.ndarray:
    """``(n, 2)`` float32 peaks (frame + sub-frame offset, bin + sub-bin offset) of one track."""
    hop, n_fft, block = fpr.hop, fpr.n_fft, fpr.block
    lead = n_fft // hop - 1
    n_frames = -(-len(y) // hop) + lead
    total = (-(-n_frames // block) + 1) * block  # the track's slot: whole blocks + an empty one
    buf = np.zeros(total * hop + n_fft, np.float32)
    buf[n_fft - hop : n_fft - hop + len(y)] = y
    frames = sliding_window_view(buf, n_fft)[::hop][:total]
    window = np.hanning(n_fft + 2)[1:-1].astype(np.float32)
    spec = scipy.fft.rfft(frames * window, axis=-1)
    power = (spec.real * spec.real + spec.imag * spec.imag).astype(np.float32)
    f_lo = max(1, round(fpr.f_min * n_fft / fpr.sample_rate))
    f_hi = round(fpr.f_max * n_fft / fpr.sample_rate)
    band = power[:, f_lo:f_hi]
    size = (2 * fpr.time_radius + 1, 2 * fpr.freq_radius + 1)
    local = ndimage.maximum_filter(band, size=size, mode="constant", cval=0.0)
    rows, cols = np.nonzero((band == local) & (band > 0))
    values = band[rows, cols]
    blk = rows // block
    order = np.lexsort((-values, blk))  # by block, strongest first, ties in time-major order
    first_of_block = np.searchsorted(blk[order], blk[order], side="left")
    per_block = max(1, round(density * block * fpr.frame_seconds))
    keep = np.sort(order[np.arange(len(order)) - first_of_block < per_block])
    t, f = rows[keep], cols[keep] + f_lo
    eps = np.float32(1e-12)
    logp = np.log(np.pad(power, ((1, 1), (0, 0))) + eps)  # silence beyond the slot

    def offset(lo: np.ndarray, c: np.ndarray, hi: np.ndarray) -> np.ndarray:
        den = lo - 2 * c + hi
        step = np.float32(0.5) * (lo - hi) / np.where(den < 0, den, np.float32(-1))
        return np.where(den < 0, np.clip(step, -0.5, 0.5), 0).astype(np.float32)

    c = logp[t + 1, f]
    dt = offset(logp[t, f], c, logp[t + 2, f])
    df = offset(logp[t + 1, f - 1], c, logp[t + 1, f + 1])
    return np.stack([t.astype(np.float32) + dt, f.astype(np.float32) + df], axis=1)


def reference_hashes(
    fpr: Fingerprinter, peaks: np.ndarray, fanout: int, speed: float
) -> tuple[np.ndarray, np.ndarray]:
    """Hashes and anchor frames: each anchor with its first *fanout* partners in the zone."""
    t = peaks[:, 0] * np.float32(speed)
    f = peaks[:, 1] * np.float32(1.0 / speed)
    hashes, anchors = [], []
    for i in range(len(t)):  # one anchor at a time
        j = np.arange(i + 1, min(i + 1 + 4 * fanout, len(t)))
        dt, df = np.rint(t[j] - t[i]), np.rint(f[j] - f[i])
        ok = np.flatnonzero((dt >= 1) & (dt <= fpr.dt_max) & (np.abs(df) <= fpr.df_max))[:fanout]
        f1 = int(np.clip(np.rint(f[i]), 0, 255))
        for k in ok:
            hashes.append((f1 << 13) | ((int(df[k]) + 64) << 6) | int(dt[k]))
            anchors.append(max(int(np.rint(t[i])), 0))
    return np.array(hashes, np.uint32), np.array(anchors, np.int32)


def assert_same(fp, peaks: np.ndarray, hashes: np.ndarray, anchors: np.ndarray) -> None:
    np.testing.assert_array_equal(fp.peaks, peaks, strict=True)
    np.testing.assert_array_equal(fp.hashes, hashes, strict=True)
    np.testing.assert_array_equal(fp.times, anchors, strict=True)


@pytest.fixture(scope="module")
def decoded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """Synthetic music through a real MP3 encode and the tool's decoder: 150 s (three chunks of
    2,048 frames), 33 s, and 7 s at 44.1 kHz in, so decoding resamples."""
    d = tmp_path_factory.mktemp("identity")
    out = {}
    for name, seconds, seed in (("long", 150.0, 11), ("mid", 33.0, 12), ("short", 7.0, 13)):
        wav = write_wav(d / f"{name}.wav", synth_music(seed, seconds))
        mp3 = d / f"{name}.mp3"
        ffmpeg("-i", str(wav), "-ar", "44100", "-b:a", "128k", str(mp3))
        out[name] = str(mp3)
    return out


def test_reference_fingerprints_equal_the_tools_bit_for_bit(decoded: dict[str, str]) -> None:
    fpr = Fingerprinter()
    signals = [load_audio(p) for p in decoded.values()]
    batch = fpr.fingerprint_batch(signals, backend="numpy")
    for y, in_batch in zip(signals, batch, strict=True):
        peaks = reference_peaks(fpr, y, fpr.peaks_per_second)
        hashes, anchors = reference_hashes(fpr, peaks, fpr.fanout, 1.0)
        assert len(hashes) > 20 * len(y) / fpr.sample_rate  # a real fingerprint, not an empty one
        assert_same(fpr.fingerprint(y, backend="numpy"), peaks, hashes, anchors)
        assert_same(in_batch, peaks, hashes, anchors)


def test_worker_pipeline_gives_the_reference_fingerprints(decoded: dict[str, str]) -> None:
    fpr = Fingerprinter()
    jobs = [Job(name, path, name) for name, path in decoded.items()]
    for job, got in zip(jobs, extract_group(jobs, fpr), strict=True):
        y = load_audio(job.path)
        peaks = reference_peaks(fpr, y, fpr.peaks_per_second)
        assert got.error is None
        assert_same(got, peaks, *reference_hashes(fpr, peaks, fpr.fanout, 1.0))


def test_query_hashes_under_every_speed_equal_the_reference(decoded: dict[str, str]) -> None:
    fpr = Fingerprinter()
    y = load_audio(decoded["mid"])
    fp = fpr.fingerprint(y, backend="numpy", query=True)
    peaks = reference_peaks(fpr, y, fpr.peaks_per_second * fpr.query_density)
    np.testing.assert_array_equal(fp.peaks, peaks, strict=True)
    for v, speed in enumerate(fpr.speeds):
        hashes, anchors = reference_hashes(fpr, peaks, fpr.query_fanout, speed)
        mine = fp.variant == v  # in anchor order, as the reference makes them
        np.testing.assert_array_equal(fp.hashes[mine], hashes, strict=True)
        np.testing.assert_array_equal(fp.times[mine], anchors, strict=True)


def test_reference_is_not_vacuous(decoded: dict[str, str]) -> None:
    """The reference tells nearly equal audio apart (the signal one sample later moves peaks),
    so the equalities above are a real check."""
    fpr = Fingerprinter()
    y = load_audio(decoded["short"])
    base = reference_peaks(fpr, y, fpr.peaks_per_second)
    later = reference_peaks(fpr, np.concatenate([[0.0], y[:-1]]).astype(np.float32), 24.0)
    assert base.shape != later.shape or not np.array_equal(base, later)


def test_windows_without_strided_views_are_the_same() -> None:
    """A namespace without ``sliding_window_view`` (a device module may lack it) gets the same
    windows through a gather, so the device code path hashes the same pairs."""
    import types

    from colabmagic.fingerprint import Backend

    bare = types.ModuleType("bare")
    bare.__dict__.update({k: getattr(np, k) for k in ("arange", "asarray")})
    x = np.arange(24, dtype=np.float32).reshape(2, 12)
    strided = Backend.from_module(np).windows(x, 5)
    gathered = Backend.from_module(bare).windows(x, 5)
    np.testing.assert_array_equal(gathered, strided, strict=True)
    assert strided.shape == (2, 8, 5)
