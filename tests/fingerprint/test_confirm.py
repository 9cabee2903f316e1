"""A weak match at the unchanged speed is confirmed against the speed stage: a sped-up excerpt
whose few hashes align with another recording at the unchanged speed is reported at the right
speed and track, not as that other recording; a strong match does not pay for the speed stage."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from colabmagic.fingerprint import Fingerprint, Fingerprinter, Index, match

mm = sys.modules["colabmagic.fingerprint.match"]
N = 120  # hashes per speed hypothesis in the query
DECOY = 12  # of the unchanged speed's, aligned in "decoy"


@pytest.fixture(scope="module")
def decoy(tmp_path_factory) -> tuple[Index, Fingerprint]:
    """An index where a query's unchanged-speed hashes align a few (DECOY) in "decoy" and its
    x1.04 hashes align all N in "target"; each hash has one posting. Made from hashes and times
    directly (no audio, no peaks: the decision score is the hash score alone)."""
    rng = np.random.default_rng(31)
    fpr = Fingerprinter()
    frames = 3_000
    duration = frames * fpr.hop / fpr.sample_rate
    right = fpr.speeds.index(1.04)
    values = rng.choice(1 << 21, (len(fpr.speeds), N), replace=False).astype(np.uint32)
    times = np.sort(rng.choice(400, N, replace=False)).astype(np.int32)  # one query, ~12 s

    def track(name: str, hashes: np.ndarray, at: np.ndarray) -> tuple:
        info = {"id": name, "path": name, "duration": duration, "content_hash": name}
        return info, hashes, at.astype(np.int32)

    items = [
        track("decoy", values[0, :DECOY], 700 + times[:DECOY]),
        track("target", values[right], 1_500 + times),
        # filler tracks: the other hypotheses' hashes at random, so the index has bins to spare
        *(
            track(
                f"f{i}", values[1:].reshape(-1), rng.integers(0, frames, (len(fpr.speeds) - 1) * N)
            )
            for i in range(3)
        ),
    ]
    index = Index(tmp_path_factory.mktemp("confirm") / "db")
    index.add_fingerprints(items)
    query = Fingerprint(
        hashes=values.reshape(-1),
        times=np.tile(times, len(fpr.speeds)),
        variant=np.repeat(np.arange(len(fpr.speeds), dtype=np.int8), N),
    )
    return index, query


def _scores(index: Index, query: Fingerprint) -> dict[str, float]:
    ms = match(index, query, top_k=5, min_score=0.0, all_speeds=True)  # every hypothesis
    return {m.track: m.score for m in ms}


def test_a_weak_match_at_the_unchanged_speed_loses_to_the_right_speed(decoy, monkeypatch):
    index, query = decoy
    scores = _scores(index, query)
    weak, strong = scores["decoy"], scores["target"]
    assert 0 < weak < strong
    threshold = weak / 1.5  # the decoy passes the threshold, but under twice it
    monkeypatch.setattr(mm, "CONFIRM_FACTOR", 1.0)  # as before: the speed stage never runs
    (m,) = match(index, query, min_score=threshold)
    assert (m.track, m.speed) == ("decoy", 1.0)
    monkeypatch.setattr(mm, "CONFIRM_FACTOR", 2.0)
    (m,) = match(index, query, min_score=threshold)
    assert (m.track, m.speed) == ("target", 1.04)
    assert m.offset_s == pytest.approx(1_500 * index.fingerprinter.frame_seconds, abs=1e-3)
    assert m.aligned == N
    # both are listed with top_k, the right speed first
    assert [x.track for x in match(index, query, min_score=threshold, top_k=2)] == [
        "target",
        "decoy",
    ]


def test_a_strong_match_does_not_pay_for_the_speed_stage(decoy, monkeypatch):
    index, query = decoy
    weak = _scores(index, query)["decoy"]
    calls: list[int] = []
    votes = mm._hash_votes

    def counted(*a, **k):
        calls.append(1)
        return votes(*a, **k)

    monkeypatch.setattr(mm, "_hash_votes", counted)
    threshold = weak / 2.5  # the decoy scores over twice the threshold: confirmed as it is
    (m,) = match(index, query, min_score=threshold)
    assert m.track == "decoy"
    assert calls == [1]  # the unchanged speed only
    calls.clear()
    (m,) = match(index, query, min_score=weak / 1.5)
    assert m.track == "target"
    assert len(calls) == 2  # and the speed stage


def test_confirmation_keeps_a_weak_match_that_no_other_speed_beats(decoy):
    """Only the unchanged speed's hashes: the speed stage finds nothing, the weak match stands."""
    index, query = decoy
    weak = _scores(index, query)["decoy"]
    only = query.variant == 0
    q0 = Fingerprint(
        hashes=query.hashes[only], times=query.times[only], variant=query.variant[only]
    )
    (m,) = match(index, q0, min_score=weak / 1.5)
    assert (m.track, m.speed) == ("decoy", 1.0)
