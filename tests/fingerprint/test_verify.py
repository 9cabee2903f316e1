"""Peak verification: hits within a frame and a bin, chance measured at other offsets."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from colabmagic.fingerprint import match
from colabmagic.fingerprint._xp import NUMPY, resolve_backend
from colabmagic.fingerprint.verify import (
    MIN_PEAKS,
    UNITS,
    pack_peaks,
    peak_evidence,
    reference_keys,
)

from .conftest import SR, numpy_as_device

match_module = importlib.import_module("colabmagic.fingerprint.match")


def _reference(seed: int, n: int = 2000, frames: int = 3000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(0, frames, n), rng.uniform(3, 110, n)], axis=1).astype(np.float32)


def _evidence(backend, keys, frames, cands, peaks):
    """z, hits, inside for candidates ``(track, offset, speed)`` all tested with *peaks*."""
    backend = resolve_backend(backend)
    xp = backend.xp
    tr = xp.asarray(np.array([c[0] for c in cands], np.int64))
    off = xp.asarray(np.array([c[1] for c in cands], np.int64))
    sp = xp.asarray(np.array([c[2] for c in cands], np.float32))
    pc = xp.asarray(np.repeat(np.arange(len(cands)), len(peaks)))
    pt = xp.asarray(np.tile(peaks[:, 0], len(cands)))
    pf = xp.asarray(np.tile(peaks[:, 1], len(cands)))
    z, h, q = peak_evidence(backend, xp.asarray(keys), xp.asarray(frames), tr, off, sp, pc, pt, pf)
    return backend.to_host(z), backend.to_host(h), backend.to_host(q)


@pytest.fixture(scope="module")
def two_tracks():
    refs = [_reference(1), _reference(2)]
    keys = np.sort(np.concatenate([reference_keys(i, r) for i, r in enumerate(refs)]))
    frames = np.array([3000, 3000], np.int64)
    return refs, keys, frames


def test_keys_sort_by_track_then_time_then_frequency():
    k = pack_peaks(np, np.array([1, 0, 0]), np.array([0, 9, 8]), np.array([5, 0, 1000]))
    assert list(np.argsort(k)) == [2, 1, 0]
    keys = reference_keys(3, np.array([[2.26, 7.4], [0.0, 1.0]], np.float32))
    assert list(keys) == sorted(keys)
    assert int(keys[1]) >> 36 == 3
    assert (int(keys[1]) >> 10) & ((1 << 26) - 1) == round(2.26 * UNITS)


def test_true_offset_scores_far_above_wrong_ones(two_tracks, backend):
    refs, keys, frames = two_tracks
    rng = np.random.default_rng(5)
    part = refs[0][(refs[0][:, 0] >= 1000) & (refs[0][:, 0] < 1300)].copy()
    part[:, 0] -= 1000
    part += rng.uniform(-0.4, 0.4, part.shape).astype(np.float32)  # jitter inside the tolerance
    z, hits, inside = _evidence(
        backend, keys, frames, [(0, 1000, 1.0), (0, 1500, 1.0), (1, 1000, 1.0)], part
    )
    assert hits[0] == inside[0] == len(part)
    assert z[0] > 15
    assert abs(z[1]) < 4  # another offset...
    assert abs(z[2]) < 4  # ...or another track: chance level


def test_tolerance_is_one_frame_and_one_bin(two_tracks):
    refs, keys, frames = two_tracks
    base = refs[0][refs[0][:, 0] > 100][:40]
    ref_q = np.rint(refs[0] * UNITS)
    for d, expect in ((0.9, True), (1.3, False)):
        for axis in (0, 1):
            q = base.copy()
            q[:, axis] += d
            _, hits, _ = _evidence(NUMPY, keys, frames, [(0, 0, 1.0)], q)
            if expect:
                assert hits[0] == len(q)
            else:  # only the peaks that happen to have another reference peak that close
                near = np.abs(np.rint(q * UNITS)[:, None, :] - ref_q[None, :, :]) <= UNITS
                assert hits[0] == int(near.all(axis=2).any(axis=1).sum()) < len(q) // 2


def test_speed_hypothesis_rescales_the_query(two_tracks):
    refs, keys, frames = two_tracks
    s = 1.04
    part = refs[1][(refs[1][:, 0] >= 500) & (refs[1][:, 0] < 800)].copy()
    part[:, 0] = (part[:, 0] - 500) / s  # played s times faster: times shrink...
    part[:, 1] *= s  # ...and frequencies rise
    z, hits, inside = _evidence(NUMPY, keys, frames, [(1, 500, s), (1, 500, 1.0)], part)
    assert hits[0] > 0.9 * inside[0]
    assert z[0] > 15 > z[1]


def test_peaks_outside_the_track_do_not_count(two_tracks):
    refs, keys, frames = two_tracks
    part = refs[0][refs[0][:, 0] < 60].copy()
    part[:, 0] += 2990  # the candidate offset puts most of them past the end
    _, hits, inside = _evidence(NUMPY, keys, frames, [(0, -2990 + 0, 1.0)], part)
    assert inside[0] == hits[0] == len(part)
    _, _, inside = _evidence(NUMPY, keys, frames, [(0, 0, 1.0)], part)
    assert inside[0] == int((part[:, 0] < 3000).sum()) < len(part)
    z, _, _ = _evidence(NUMPY, keys, frames, [(0, 2995, 1.0)], part[:MIN_PEAKS])
    assert z[0] == 0  # too few peaks inside for a verdict


def test_device_code_path_gives_the_same_evidence(two_tracks):
    _, keys, frames = two_tracks
    q = _reference(9, n=300, frames=400)
    cands = [(0, 0, 1.0), (1, 700, 0.96), (0, 2500, 1.06)]
    host = _evidence(NUMPY, keys, frames, cands, q)
    for a, b in zip(host, _evidence(numpy_as_device(), keys, frames, cands, q), strict=True):
        np.testing.assert_array_equal(a, b)
    _, hits, inside = host
    assert inside.min() > 0  # every candidate had peaks to test...
    assert hits.sum() > 0  # ...and some hit: the arrays compared are not all zeros


def test_verification_finds_what_the_hash_votes_alone_miss(built_index, tracks):
    """At -3 dB white noise the hash score is inconclusive; the peaks decide."""
    from colabmagic.fingerprint import Index

    index = Index(built_index, readonly=True)
    found = 0
    for i, name in enumerate(("t0", "t1", "t3", "t5")):
        y = tracks[name][6 * SR : 16 * SR]
        noise = np.random.default_rng(i).standard_normal(len(y)).astype(np.float32)
        q = y + noise * np.float32(np.sqrt(np.mean(y**2) / 10 ** (-3 / 10)))
        ms = match(index, q, min_score=0.0)
        if ms and ms[0].track == name:
            found += 1
            assert ms[0].peak_z > match_module.HASH_WEIGHT * ms[0].hash_score
            assert ms[0].offset_s == pytest.approx(6.0, abs=0.1)
    assert found >= 3
