"""The query path's posting budget, never past it, and a query whose hashes are all common
(looping music, several copies of it) still finds its track; the chance test's bar. How the budget
is spent (a sample by hash value) and the speed probe: test_sampled_budget.py."""

from __future__ import annotations

import numpy as np
import pytest

from colabmagic.fingerprint import match

from .conftest import SR


@pytest.mark.parametrize("speed", [1.0, 1.04])
def test_a_query_of_only_common_hashes_still_finds_its_track(looping, speed):
    import soxr

    index, loop = looping
    src = loop[int(1.1 * SR) : int((1.1 + 8 * speed) * SR)]
    q = src if speed == 1.0 else soxr.resample(src, round(SR * speed), SR).astype(np.float32)
    fp = index.fingerprinter.fingerprint(q, query=True)
    variant = index.fingerprinter.speeds.index(speed)
    p = index.postings_per_hash(fp.hashes[fp.variant == variant])
    # common in this index: its hashes recur in every repeat of every copy (the old speed
    # stage's fixed cap, a quarter of the stop list, looked up none of the middle ones)
    assert np.median(p[p > 0]) > index.stop_postings // 4
    (m,) = match(index, q)
    assert m.track.startswith("loop")
    assert m.speed == pytest.approx(speed, abs=0.021)


def test_lookups_stay_within_the_budget_and_rare_hashes_suffice(looping, tracks, monkeypatch):
    """A clean excerpt of an ordinary track has rare hashes: a small budget looks them up, stays
    within it, and finds the track; a query of the looping track spends exactly up to it."""
    mm = __import__("sys").modules["colabmagic.fingerprint.match"]
    index, loop = looping
    hits: list[int] = []
    lookup = index.lookup

    def counted(*a, **k):
        found = lookup(*a, **k)
        hits.append(len(found[0]))
        return found

    monkeypatch.setattr(index, "lookup", counted)
    monkeypatch.setattr(mm, "QUERY_HIT_BUDGET", 600)
    (m,) = match(index, tracks["t3"][5 * SR : 12 * SR])
    assert m.track == "t3"
    assert m.offset_s == pytest.approx(5.0, abs=0.05)
    assert hits == [hits[0]]  # one stage: the unchanged speed matched
    assert 0 < hits[0] <= 600
    hits.clear()
    match(index, loop[SR : 9 * SR])
    assert 0 < hits[0] <= 600
    monkeypatch.setattr(mm, "QUERY_HIT_BUDGET", 10**9)
    hits.clear()
    match(index, loop[SR : 9 * SR])
    assert hits[0] > 600  # the budget, not the query, bounded it above


def test_least_count_is_where_the_chance_test_starts_to_pass(looping):
    """_least_count(hits) is the fewest aligned hashes _chance accepts: one fewer is rejected."""
    from colabmagic.fingerprint._xp import resolve_backend
    from colabmagic.fingerprint.match import CHANCE_BINS, _chance, _least_count

    index, _ = looping
    be = resolve_backend("numpy")
    hits = np.array([10, 1_000, 30_000, 300_000])
    for n_var in (1, 6):
        least = _least_count(index, hits, n_var)
        assert (np.diff(least) >= 0).all()  # more chance hits, a higher bar
        assert (_chance(np, index, be, hits, least, n_var) <= CHANCE_BINS).all()
        below = np.maximum(least - 1, 1)
        assert (_chance(np, index, be, hits, below, n_var)[least > 1] > CHANCE_BINS).all()


def test_could_pass_keeps_every_bin_with_enough_hits():
    from colabmagic.fingerprint.match import _could_pass

    rng = np.random.default_rng(5)
    key = rng.integers(0, 1 << 40, 20_000)  # chance: one hit per bin
    key[:60] = 123_456_789  # one bin of query 0 with 60 hits
    key[60:64] = 987_654_321  # one of query 1 with 4
    q = np.where(np.arange(key.shape[0]) % 2 == 0, 0, 1)
    q[:64] = [0] * 60 + [1] * 4
    keep = _could_pass(np, key, q, np.array([5, 5]))
    assert keep[:60].all()  # the full bin, every hit
    assert keep.mean() < 0.05  # chance hits mostly gone (collisions may keep a few)
    assert _could_pass(np, key, q, np.array([5, 4]))[60:64].all()


def test_the_significance_filter_changes_no_match(looping, tracks, monkeypatch):
    """Dropping the bins that chance explains before the offset histograms reports the same
    matches (track, offset, speed, scores) as histogramming every hit; only the confidence may
    rise, as a chance candidate is no longer the runner-up."""
    mm = __import__("sys").modules["colabmagic.fingerprint.match"]
    index, loop = looping
    rng = np.random.default_rng(11)
    qs = [tracks["t1"][2 * SR : 9 * SR], loop[3 * SR : 8 * SR], tracks["n0"][: 6 * SR]]
    qs += [q + 0.05 * rng.standard_normal(q.shape[0]).astype(np.float32) for q in qs]

    def fields(ms):
        return [(m.track, m.offset_s, m.speed, m.score, m.aligned, m.peak_z) for m in ms]

    filtered = [match(index, q, top_k=3) for q in qs]
    monkeypatch.setattr(mm, "_could_pass", lambda xp, key, q, least: np.ones(len(key), bool))
    every = [match(index, q, top_k=3) for q in qs]
    assert [fields(f) for f in filtered] == [fields(e) for e in every]
    for f, e in zip(filtered, every, strict=True):
        assert all(a.confidence >= b.confidence for a, b in zip(f, e, strict=True))
    assert [bool(f) for f in filtered] == [True, True, False] * 2
