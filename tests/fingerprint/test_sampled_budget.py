"""The speed stage chooses its hypotheses before it spends: a sampled probe of each ranks them,
the budget goes to the best two. A sped-up query finds its track with a budget too small for six
equal shares; the probe spends no more than its own budget per (query, hypothesis)."""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np
import pytest

from colabmagic.fingerprint import Fingerprint, Fingerprinter, Index, match
from colabmagic.fingerprint._xp import resolve_backend
from colabmagic.fingerprint.budget import SLICES, best_bin_counts, slice_of, spend_sampled
from colabmagic.fingerprint.match import _hash_arrays, _probe, match_many

from .conftest import SR, numpy_as_device

mm = sys.modules["colabmagic.fingerprint.match"]
COMMON = 30  # postings of every hash the speed stage looks up in the common_hashes index (the
# index's stop list is 32)


def test_spend_sampled_takes_whole_slices_of_one_order_within_the_budget():
    rng = np.random.default_rng(11)
    group = np.repeat(np.arange(5), 2_000)
    hashes = rng.integers(0, 1 << 21, group.shape[0]).astype(np.uint32)
    postings = rng.integers(0, 80, group.shape[0])
    stop = 60
    part = slice_of(np, hashes)
    assert part.min() >= 0
    assert part.max() < SLICES
    for budget in (0, 500, 3_000, 20_000, 10**9):
        take = spend_sampled(np, group, hashes, postings, budget, stop)
        for g in range(5):
            m = group == g
            p, t, s = postings[m], take[m], part[m]
            usable = (p > 0) & (p <= stop)
            assert p[t].sum() <= budget
            assert not (t & ~usable).any()
            # the first slices of the order, whole: every usable hash below the last slice
            # taken is taken, none above it; and the next slice would not have fit
            last = s[t].max(initial=-1)
            assert (t == (usable & (s <= last))).all()
            assert p[t].sum() + p[usable & (s == last + 1)].sum() > budget or last == SLICES - 1
            if budget == 10**9:
                assert (t == usable).all()
    # not rarest first: common hashes are taken beside rare ones that are left out
    take = spend_sampled(np, group, hashes, postings, 3_000, stop)
    assert postings[take].max() > postings[~take & (postings > 0)].min()
    # each group's choice is its own: the batch selects what each group alone selects
    alone = np.concatenate(
        [
            spend_sampled(np, group[m], hashes[m], postings[m], 3_000, stop)
            for m in (group == g for g in range(5))
        ]
    )
    assert (take == alone).all()
    assert spend_sampled(np, group[:0], hashes[:0], postings[:0], 10, stop).shape == (0,)


def test_best_bin_counts_is_the_largest_bin_of_each_group():
    rng = np.random.default_rng(5)
    span = 1_000
    group = rng.integers(0, 6, 3_000)
    bins = rng.integers(0, 40, 3_000)  # few bins: counts well above one
    bins[:5] = 900 + np.arange(5)  # and a few single hits
    got = best_bin_counts(np, group * span + bins, span, 8)
    want = np.zeros(8, np.int64)
    for (g, _), n in Counter(zip(group.tolist(), bins.tolist(), strict=True)).items():
        want[g] = max(want[g], n)
    assert (got == want).all()
    assert (want[6:] == 0).all()
    assert (best_bin_counts(np, np.zeros(0, np.int64), span, 3) == 0).all()


def _stretched(loop: np.ndarray, speed: float, start_s: float = 1.1, seconds: float = 8.0):
    import soxr

    src = loop[int(start_s * SR) : int((start_s + seconds * speed) * SR)]
    return soxr.resample(src, round(SR * speed), SR).astype(np.float32)


@pytest.fixture(scope="module")
def common_hashes(tmp_path_factory) -> tuple[Index, Fingerprint]:
    """An index where every hash a query looks up at a speed hypothesis is common (COMMON
    postings), as on the 1,000-file corpus: the query's hashes at the right hypothesis align in
    one track (and recur at random in 40 others), those at the five wrong ones only recur at
    random, and those at the unchanged speed are not in the index. Hashes and times are made
    directly (no audio), so how many aligned hits a budget buys is known."""
    rng = np.random.default_rng(21)
    fpr = Fingerprinter()
    n, frames, fillers = 240, 2_000, 40
    right = fpr.speeds.index(1.04)
    values = rng.choice(1 << 21, (len(fpr.speeds), n), replace=False).astype(np.uint32)
    common = values[1:].reshape(-1)  # every hypothesis but the unchanged speed
    spread = [[] for _ in range(fillers)]
    for h, f in zip(
        np.repeat(common, COMMON - 1),
        rng.integers(0, fillers, common.size * (COMMON - 1)),
        strict=True,
    ):
        spread[f].append(h)
    duration = frames * fpr.hop / fpr.sample_rate
    items = [
        (
            {"id": f"f{i}", "path": f"f{i}", "duration": duration, "content_hash": f"f{i}"},
            np.asarray(hs, np.uint32),
            rng.integers(0, frames, len(hs)).astype(np.int32),
        )
        for i, hs in enumerate(spread)
    ]
    # the right hypothesis's hashes once more, aligned in "target" (100 frames in); the wrong
    # ones once more at random, so every looked-up hash has COMMON postings
    wrong = np.delete(values[1:], right - 1, axis=0).reshape(-1)
    items.append(
        (
            {"id": "target", "path": "target", "duration": duration, "content_hash": "target"},
            values[right],
            (100 + np.arange(n)).astype(np.int32),
        )
    )
    items.append(
        (
            {"id": "other", "path": "other", "duration": duration, "content_hash": "other"},
            wrong,
            rng.integers(0, frames, wrong.size).astype(np.int32),
        )
    )
    index = Index(tmp_path_factory.mktemp("common") / "db")
    index.add_fingerprints(items)
    query = Fingerprint(
        hashes=values.reshape(-1),
        times=np.tile(np.arange(n, dtype=np.int32), len(fpr.speeds)),
        variant=np.repeat(np.arange(len(fpr.speeds), dtype=np.int8), n),
    )
    return index, query


def test_a_sped_up_query_is_found_with_a_budget_too_small_for_six_shares(
    common_hashes, monkeypatch
):
    """Six shares of the budget buy the right hypothesis too few aligned hits to pass the chance
    test: no match. The probe ranks the right hypothesis first, the best two share the budget,
    and the track is found at the right speed and offset."""
    index, query = common_hashes
    p = index.postings_per_hash(query.hashes)
    assert COMMON <= index.stop_postings
    assert (p[query.variant > 0] == COMMON).all()
    assert (p[query.variant == 0] == 0).all()
    budget = 14 * COMMON  # 14 hashes: ~2 per hypothesis in six shares, ~7 in two
    monkeypatch.setattr(mm, "SPEED_HIT_BUDGET", budget)
    monkeypatch.setattr(mm, "PROBE_HIT_BUDGET", 4 * COMMON)
    monkeypatch.setattr(mm, "SPEED_CHOICES", 6)  # six shares, no probe: chance explains it
    assert match(index, query, min_score=0.01) == []
    listed = match(index, query, min_score=0.0)
    assert all(m.aligned <= 2 for m in listed if m.track == "target")
    monkeypatch.setattr(mm, "SPEED_CHOICES", 2)
    (m,) = match(index, query, min_score=0.01)
    assert (m.track, m.speed) == ("target", 1.04)
    assert m.offset_s == pytest.approx(100 * index.fingerprinter.frame_seconds, abs=1e-3)
    assert 4 <= m.aligned <= budget // COMMON


def test_the_probe_spends_at_most_its_budget_per_hypothesis(looping, monkeypatch):
    index, loop = looping
    fpr = index.fingerprinter
    qs = [_stretched(loop, 1.04), _stretched(loop, 0.96, start_s=3.0, seconds=6.0)]
    fps = fpr.fingerprint_batch(qs, query=True)
    qid, qh, qt, qv = _hash_arrays(fps, np.arange(2))
    others = qv > 0
    qid, qh, qt, qv = qid[others], qh[others], qt[others], qv[others]
    probe = 300
    monkeypatch.setattr(mm, "PROBE_HIT_BUDGET", probe)
    seen: list[np.ndarray] = []
    lookup = index.lookup

    def counted(*a, **k):
        found = lookup(*a, **k)
        seen.append(found[0])
        return found

    monkeypatch.setattr(index, "lookup", counted)
    best = _probe(index, resolve_backend("numpy"), qid, qh, qt, qv, 2, len(fpr.speeds))
    (rows,) = seen
    per = np.bincount(qid[rows] * len(fpr.speeds) + qv[rows], minlength=2 * len(fpr.speeds))
    assert 0 < per.max() <= probe  # every (query, hypothesis) within its own budget
    assert (per.reshape(2, -1)[:, 1:] > 0).all()  # and each one probed
    assert best.shape == (2, len(fpr.speeds))
    assert (best[:, 0] == 0).all()  # the unchanged speed is not the probe's to rank
    for i, speed in enumerate((1.04, 0.96)):  # the right hypothesis aligns the most hits
        assert fpr.speeds[int(np.argmax(best[i]))] == pytest.approx(speed, abs=0.021)
    # and never more than the stage's whole budget over the six together
    monkeypatch.setattr(mm, "SPEED_HIT_BUDGET", 6 * 100)
    seen.clear()
    _probe(index, resolve_backend("numpy"), qid, qh, qt, qv, 2, len(fpr.speeds))
    per = np.bincount(qid[seen[0]] * len(fpr.speeds) + qv[seen[0]])
    assert 0 < per.max() <= 100


@pytest.mark.parametrize("backend", ["numpy", "device"])
def test_match_many_equals_match_with_the_probe(looping, tracks, monkeypatch, backend):
    """A batch of sped-up, unchanged and unknown queries: each query's probe and budget are its
    own, so the batch gives what each query alone gives (also on the device code path)."""
    index, loop = looping
    monkeypatch.setattr(mm, "SPEED_HIT_BUDGET", 3_000)
    monkeypatch.setattr(mm, "PROBE_HIT_BUDGET", 400)
    qs = [
        _stretched(loop, 1.04),
        tracks["t2"][3 * SR : 9 * SR],
        _stretched(loop, 0.96, start_s=2.0),
        tracks["n0"][2 * SR : 8 * SR],
    ]
    be = numpy_as_device() if backend == "device" else "numpy"
    many = match_many(index, qs, top_k=2, backend=be)
    assert many == [match(index, q, top_k=2) for q in qs]
    assert [ms[0].track[:4] if ms else None for ms in many] == ["loop", "t2", "loop", None]


def test_no_probe_where_the_budget_covers_every_hypothesis(
    built_index, tracks, looping, monkeypatch
):
    """On a small index a sped-up query's six hypotheses fit in the budget: all six are looked
    up, as before the probe, and the probe is not paid for; past the budget it is."""
    import soxr

    calls: list[int] = []
    probe = mm._probe

    def counted(*a, **k):
        calls.append(1)
        return probe(*a, **k)

    monkeypatch.setattr(mm, "_probe", counted)
    src = tracks["t2"][2 * SR : int((2 + 10 * 1.04) * SR)]
    index = Index(built_index, readonly=True)
    (m,) = match(index, soxr.resample(src, round(SR * 1.04), SR).astype(np.float32))
    assert (m.track, m.speed) == ("t2", 1.04)
    assert calls == []
    loop_index, loop = looping
    monkeypatch.setattr(mm, "SPEED_HIT_BUDGET", 3_000)
    (m,) = match(loop_index, _stretched(loop, 1.04))
    assert m.speed == 1.04
    assert calls == [1]
