"""Matching excerpts: right track, right offset, robust to degradations, silent on strangers."""

from __future__ import annotations

import numpy as np
import pytest

from colabmagic.errors import ParameterError
from colabmagic.fingerprint import DEFAULT_MIN_SCORE, Index, load_audio, match

from .conftest import SR, ffmpeg, synth_music, write_wav


@pytest.fixture(scope="module")
def index(built_index) -> Index:
    return Index(built_index, readonly=True)


def _noisy(y: np.ndarray, snr_db: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(len(y)).astype(np.float32)
    return y + noise * np.float32(np.sqrt(np.mean(y**2) / 10 ** (snr_db / 10)))


@pytest.mark.parametrize(("track", "start"), [("t0", 3.0), ("t3", 11.5), ("t5", 0.0)])
def test_clean_excerpt_found_at_its_offset(index, tracks, track, start):
    q = tracks[track][int(start * SR) : int((start + 5) * SR)]
    (m,) = match(index, q)
    assert m.track == track
    assert m.offset_s == pytest.approx(start, abs=0.05)
    assert m.score >= DEFAULT_MIN_SCORE + 1.5
    assert 0 < m.confidence <= 1
    assert m.speed == 1.0
    assert m.aligned > 50


@pytest.mark.parametrize("snr_db", [10.0, 5.0])
def test_noisy_excerpt(index, tracks, snr_db):
    found = 0
    for i, name in enumerate(("t1", "t2", "t4")):
        q = _noisy(tracks[name][4 * SR : 14 * SR], snr_db, seed=i)
        ms = match(index, q)
        found += bool(ms) and ms[0].track == name and abs(ms[0].offset_s - 4.0) < 0.1
    assert found == 3


@pytest.mark.parametrize("speed", [0.96, 1.04])
def test_speed_change(index, tracks, speed):
    import soxr

    src = tracks["t2"][2 * SR : int((2 + 10 * speed) * SR)]
    q = soxr.resample(src, round(SR * speed), SR).astype(np.float32)  # played `speed` x faster
    (m,) = match(index, q)
    assert m.track == "t2"
    assert m.speed == pytest.approx(speed, abs=0.021)
    assert m.offset_s == pytest.approx(2.0, abs=0.15)


def test_audio_not_in_the_index_gives_no_match(index, tracks):
    for name in ("n0", "n1"):
        for start in (0, 7, 13):
            assert match(index, tracks[name][start * SR : (start + 6) * SR]) == []
    for seed in range(3):  # noise alone, and other music of the same kind
        assert match(index, np.random.default_rng(seed).standard_normal(5 * SR)) == []
        assert match(index, synth_music(500 + seed, 10.0)) == []


def test_top_k_and_threshold(index, tracks):
    q = tracks["t4"][5 * SR : 15 * SR]
    ms = match(index, q, top_k=3, min_score=0.0)
    assert ms[0].track == "t4"
    assert len(ms) >= 2
    assert ms[0].score > 5 * ms[1].score
    assert match(index, q, min_score=1e9) == []
    with pytest.raises(ParameterError, match="top_k=0"):
        match(index, q, top_k=0)


def test_gain_and_file_queries_at_other_rates_and_mp3(index, tracks, tmp_path):
    import soxr

    y = tracks["t3"][6 * SR : 16 * SR]
    hi = soxr.resample(y, SR, 44100).astype(np.float32)
    write_wav(tmp_path / "q44k.wav", np.clip(hi * 3.0, -1, 1), 44100)
    ffmpeg("-i", str(tmp_path / "q44k.wav"), "-b:a", "64k", str(tmp_path / "q.mp3"))
    for name in ("q44k.wav", "q.mp3"):
        (m,) = match(index, tmp_path / name)
        assert m.track == "t3", name
        assert m.offset_s == pytest.approx(6.0, abs=0.1), name
    assert len(load_audio(tmp_path / "q.mp3")) == pytest.approx(10 * SR, abs=0.1 * SR)


def test_match_many_equals_match(index, tracks, backend):
    from colabmagic.fingerprint.match import match_many

    qs = [
        _noisy(tracks[n][s * SR : (s + 6) * SR], 5.0, seed=s)
        for n, s in (("t0", 1), ("t5", 9), ("n1", 3), ("t2", 12))
    ]
    qs.append(np.zeros(SR, np.float32))
    many = match_many(index, qs, top_k=2, min_score=2.0, backend=backend)
    assert many == [match(index, q, top_k=2, min_score=2.0) for q in qs]
    assert [ms[0].track if ms else None for ms in many][:2] == ["t0", "t5"]
    assert many[-1] == []


def test_device_benchmark_runs_on_the_device_code_path():
    from colabmagic.fingerprint.bench import device_benchmark

    from .conftest import numpy_as_device

    r = device_benchmark(backend=numpy_as_device(), hours=0.1, n_queries=4, seconds=5.0)
    assert r["query_recall"] == 1.0
    assert r["extract_x_realtime"] > 0


@pytest.mark.gpu
def test_match_many_on_cupy_agrees_with_numpy(tracks, tmp_path):
    """The real GPU path: same tracks and offsets, scores equal up to float summation order."""
    pytest.importorskip("cupy")
    from colabmagic.fingerprint import Fingerprinter
    from colabmagic.fingerprint._xp import cupy_available
    from colabmagic.fingerprint.match import match_many

    if not cupy_available():
        pytest.skip("CuPy is installed but sees no CUDA device")
    names = [n for n in sorted(tracks) if n.startswith("t")]  # no audio files: no soundfile needed
    fps = Fingerprinter().fingerprint_batch([tracks[n] for n in names], backend="numpy")
    index = Index(tmp_path / "db")
    index.add_fingerprints(
        [
            ({"id": n, "path": n, "duration": 20.0, "content_hash": n}, f.hashes, f.times, f.peaks)
            for n, f in zip(names, fps, strict=True)
        ]
    )
    qs = [
        _noisy(tracks[n][s * SR : (s + 8) * SR], snr, seed=s)
        for n, s, snr in (("t0", 1, 10.0), ("t5", 9, 0.0), ("n1", 3, 10.0), ("t2", 6, -3.0))
    ]
    host = match_many(index, qs, top_k=2, backend="numpy")
    dev = match_many(index, qs, top_k=2, backend="cupy")
    assert [[m.track for m in ms] for ms in dev] == [[m.track for m in ms] for ms in host]
    for a, b in zip(host, dev, strict=True):
        for ma, mb in zip(a, b, strict=True):
            assert mb.offset_s == pytest.approx(ma.offset_s, abs=0.07)
            assert mb.score == pytest.approx(ma.score, rel=0.05)
    assert host[0][0].track == "t0"
    assert host[2] == []


def test_chance_alignments_are_no_match_however_low_the_threshold(index, tracks):
    """Candidates whose aligned hash count chance explains (a few hashes at one offset of one of
    many tracks) are listed at min_score 0 but never reported as a match; the real one is."""
    from colabmagic.fingerprint._xp import resolve_backend
    from colabmagic.fingerprint.match import CHANCE_BINS, _chance, candidates

    stranger = synth_music(4242, 10.0)
    listed = match(index, stranger, top_k=3, min_score=0.0)
    assert listed  # chance candidates exist ...
    assert all(m.aligned <= 4 for m in listed)
    assert match(index, stranger, min_score=1e-6) == []  # ... and none is a match
    v = candidates(index, stranger, top_k=3)
    assert (np.asarray(v.chance) > CHANCE_BINS).all()
    (m,) = match(index, tracks["t2"][4 * SR : 9 * SR], min_score=1e-6)
    assert m.track == "t2"
    be = resolve_backend("numpy")
    # 7x the bins (speed hypotheses here; tracks in a bigger index) hit by 7x the postings:
    # the same count at the best of them is about 7x likelier by chance
    one = _chance(np, index, be, np.array([2000]), np.array([3]), 1)[0]
    seven = _chance(np, index, be, np.array([7 * 2000]), np.array([3]), 7)[0]
    assert seven == pytest.approx(7 * one, rel=0.05)
    assert _chance(np, index, be, np.array([2000]), np.array([8]), 1)[0] < CHANCE_BINS
