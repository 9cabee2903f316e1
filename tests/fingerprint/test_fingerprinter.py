"""Extraction: determinism, batching, backends, density, validation."""

from __future__ import annotations

import numpy as np
import pytest

from colabmagic.errors import ParameterError
from colabmagic.fingerprint import Backend, Fingerprinter, resolve_backend

from .conftest import SR, numpy_as_device, synth_music


def test_hash_rate_follows_density(tracks):
    y = tracks["t0"]
    for pps in (12.0, 30.0):
        fp = Fingerprinter(peaks_per_second=pps, fanout=5).fingerprint(y, backend="numpy")
        rate = len(fp.hashes) / (len(y) / SR)
        assert 0.6 * pps * 5 < rate <= 1.05 * pps * 5  # nearly every anchor gets its 5 pairs
    assert fp.hashes.dtype == np.uint32
    assert fp.times.dtype == np.int32
    assert fp.times.min() >= 0
    assert fp.times.max() <= len(y) / SR / Fingerprinter().frame_seconds


def test_batch_gives_the_same_hashes_as_one_by_one(tracks, fingerprinter):
    sigs = [tracks["t0"][:30000], tracks["t1"], tracks["t2"][5000:70001]]
    small = Fingerprinter(batch_seconds=6.0)  # forces several batches too
    batched = fingerprinter.fingerprint_batch(sigs, backend="numpy")
    for s, b, c in zip(sigs, batched, small.fingerprint_batch(sigs, backend="numpy"), strict=True):
        one = fingerprinter.fingerprint(s, backend="numpy")
        np.testing.assert_array_equal(one.hashes, b.hashes)
        np.testing.assert_array_equal(one.times, b.times)
        np.testing.assert_array_equal(one.hashes, c.hashes)
        np.testing.assert_array_equal(one.peaks, b.peaks)


def test_a_track_late_in_a_long_batch_keeps_its_exact_hashes(tracks, fingerprinter):
    """Peak frames stay integers until they are made relative to their track: a track that
    starts an hour into a batch (float32 steps of 1/64 frame there) hashes as it does alone."""
    hour = np.tile(tracks["n0"], 180)  # one hour of audio ahead of it
    sigs = [hour, tracks["t3"]]
    batched = Fingerprinter(batch_seconds=7200.0).fingerprint_batch(sigs, backend="numpy")
    one = fingerprinter.fingerprint(tracks["t3"], backend="numpy")
    np.testing.assert_array_equal(one.hashes, batched[1].hashes)
    np.testing.assert_array_equal(one.times, batched[1].times)
    np.testing.assert_array_equal(one.peaks, batched[1].peaks)


def test_device_code_path_matches_numpy(tracks, fingerprinter):
    """The CuPy path (device namespace, asnumpy transfers) run with NumPy as the device."""
    host = fingerprinter.fingerprint_batch([tracks["t0"], tracks["t1"]], backend="numpy")
    dev = fingerprinter.fingerprint_batch([tracks["t0"], tracks["t1"]], backend=numpy_as_device())
    for a, b in zip(host, dev, strict=True):
        pairs_a = set(zip(a.hashes.tolist(), a.times.tolist(), strict=True))
        pairs_b = set(zip(b.hashes.tolist(), b.times.tolist(), strict=True))
        # different FFT libraries may flip a near-tie between two peaks; nothing more
        assert len(pairs_a & pairs_b) >= 0.99 * max(len(pairs_a), len(pairs_b))


def test_gpu_mock_runs_the_cupy_path(tracks, fingerprinter):
    """colabmagic's NumPy-backed ``cupy`` mock (what ``--mock-gpu`` kernels import) as device."""
    from colabmagic.fingerprint._xp import Backend
    from colabmagic.gpu import mock

    cupy = mock.build()["cupy"]
    host = fingerprinter.fingerprint_batch([tracks["t0"]], backend="numpy")
    dev = fingerprinter.fingerprint_batch([tracks["t0"]], backend=Backend.from_module(cupy))
    assert type(dev[0].hashes) is np.ndarray  # brought back to the host once
    pairs_a = set(zip(host[0].hashes.tolist(), host[0].times.tolist(), strict=True))
    pairs_b = set(zip(dev[0].hashes.tolist(), dev[0].times.tolist(), strict=True))
    assert len(pairs_a & pairs_b) >= 0.99 * max(len(pairs_a), len(pairs_b))


def test_query_fingerprints_carry_speed_variants(tracks, fingerprinter):
    q = fingerprinter.fingerprint(tracks["t0"][: 5 * SR], backend="numpy", query=True)
    assert set(np.unique(q.variant)) == set(range(len(fingerprinter.speeds)))
    ref = fingerprinter.fingerprint(tracks["t0"][: 5 * SR], backend="numpy")
    assert len(q.hashes[q.variant == 0]) > len(ref.hashes)  # denser, wider fan-out


def test_silence_and_tiny_signals_give_no_hashes(fingerprinter):
    for y in (np.zeros(SR * 3, np.float32), np.zeros(0, np.float32), np.ones(10, np.float32)):
        fp = fingerprinter.fingerprint(y, backend="numpy")
        assert fp.hashes.size == 0
        assert fp.times.size == 0


def test_gain_does_not_change_hashes(fingerprinter):
    y = synth_music(5, 8.0)
    a = fingerprinter.fingerprint(y, backend="numpy")
    b = fingerprinter.fingerprint(y * np.float32(0.125), backend="numpy")
    common = set(a.hashes.tolist()) & set(b.hashes.tolist())
    assert len(common) >= 0.97 * len(set(a.hashes.tolist()))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_fft": 500}, "n_fft"),
        ({"f_max": 5000.0}, "f_max"),
        ({"dt_max": 99}, "dt_max"),
        ({"speeds": (0.9, 1.0)}, "speeds"),
        ({"peaks_per_second": 0}, "peaks_per_second"),
    ],
)
def test_invalid_parameters_are_named(kwargs, name):
    with pytest.raises(ParameterError, match=name):
        Fingerprinter(**kwargs)


def test_signals_must_be_mono(fingerprinter):
    with pytest.raises(ParameterError, match=r"signals\[0\].*mono"):
        fingerprinter.fingerprint(np.zeros((2, 800), np.float32), backend="numpy")


def test_backend_resolution():
    assert resolve_backend("numpy").name == "numpy"
    shim = numpy_as_device()
    assert resolve_backend(shim) is shim
    assert shim.is_device
    with pytest.raises(ParameterError, match="backend='tpu'"):
        resolve_backend("tpu")
    assert isinstance(resolve_backend("auto"), Backend)


@pytest.mark.gpu
def test_cupy_gives_the_numpy_hashes(tracks, fingerprinter):
    pytest.importorskip("cupy")
    from colabmagic.fingerprint._xp import cupy_available

    if not cupy_available():
        pytest.skip("CuPy is installed but sees no CUDA device")
    sigs = [tracks[k] for k in sorted(tracks)]
    host = fingerprinter.fingerprint_batch(sigs, backend="numpy")
    dev = fingerprinter.fingerprint_batch(sigs, backend="cupy")
    for a, b in zip(host, dev, strict=True):
        pairs_a = set(zip(a.hashes.tolist(), a.times.tolist(), strict=True))
        pairs_b = set(zip(b.hashes.tolist(), b.times.tolist(), strict=True))
        assert len(pairs_a & pairs_b) >= 0.99 * max(len(pairs_a), len(pairs_b))
        peaks_a = {tuple(p) for p in np.round(a.peaks, 2).tolist()}
        peaks_b = {tuple(p) for p in np.round(b.peaks, 2).tolist()}
        assert len(peaks_a & peaks_b) >= 0.99 * max(len(peaks_a), len(peaks_b))
    queries = fingerprinter.fingerprint_batch(sigs[:3], backend="cupy", query=True)
    for a, b in zip(
        fingerprinter.fingerprint_batch(sigs[:3], backend="numpy", query=True), queries, strict=True
    ):
        assert set(a.variant.tolist()) == set(b.variant.tolist()) == set(range(7))
        common = set(zip(a.hashes.tolist(), a.variant.tolist(), strict=True)) & set(
            zip(b.hashes.tolist(), b.variant.tolist(), strict=True)
        )
        assert len(common) >= 0.98 * len(set(a.hashes.tolist()))
