"""De-duplication of re-encoded, trimmed, padded and excerpted copies."""

from __future__ import annotations

import importlib
import itertools
import shutil

import numpy as np
import pytest

from colabmagic.errors import ParameterError
from colabmagic.fingerprint import dedup

from .conftest import SR, ffmpeg, synth_music, write_wav


def test_dedup_groups_copies_with_offsets(tmp_path, tracks):
    lib = tmp_path / "lib"
    lib.mkdir()
    a, b = tracks["t0"], tracks["t1"]
    write_wav(lib / "a.wav", a)
    ffmpeg("-i", str(lib / "a.wav"), "-b:a", "64k", str(lib / "a_64k.mp3"))
    ffmpeg("-i", str(lib / "a.wav"), "-ar", "22050", "-c:a", "libvorbis", str(lib / "a.ogg"))
    write_wav(lib / "a_trim.wav", a[3 * SR :])  # starts 3 s into a
    write_wav(lib / "a_pad.wav", np.r_[np.zeros(2 * SR, np.float32), a])  # a starts at 2 s
    write_wav(lib / "b.wav", b)
    write_wav(lib / "b_excerpt.wav", b[5 * SR : 13 * SR])
    shutil.copy(lib / "b.wav", lib / "b_same_bytes.wav")
    for i in range(3):
        write_wav(lib / f"other{i}.wav", synth_music(700 + i, 12.0))
    res = dedup([lib], workers=1, backend="numpy")
    groups = sorted(sorted(p.split("/")[-1] for p in g) for g in res.groups)
    assert groups == [
        ["a.ogg", "a.wav", "a_64k.mp3", "a_pad.wav", "a_trim.wav"],
        ["b.wav", "b_excerpt.wav", "b_same_bytes.wav"],
    ]
    ev = {(e.a.split("/")[-1], e.b.split("/")[-1]): e for g in res.evidence for e in g}
    offset = {pair[1]: e.offset_s for pair, e in ev.items()}

    def rel(name, other):  # offset of `name` within `other`, whichever way the pair was stored
        if (other, name) in ev:
            return ev[(other, name)].offset_s
        return -ev[(name, other)].offset_s

    assert rel("a_trim.wav", "a.wav") == pytest.approx(3.0, abs=0.07)
    assert rel("a.wav", "a_pad.wav") == pytest.approx(2.0, abs=0.07)
    assert rel("b_excerpt.wav", "b.wav") == pytest.approx(5.0, abs=0.07)
    assert offset["b_same_bytes.wav"] == 0.0
    assert all(e.aligned >= 20 for g in res.evidence for e in g)
    d = res.to_dict()
    assert d["files"] == 11
    assert d["skipped"] == 0
    assert len(d["groups"]) == 2
    assert set(d["groups"][0]["evidence"][0]) == {"a", "b", "score", "fraction", "offset_s"}


def test_only_files_of_a_shared_size_are_content_hashed(tmp_path, tracks, monkeypatch):
    dedup_module = importlib.import_module("colabmagic.fingerprint.dedup")  # not the function

    a = write_wav(tmp_path / "a.wav", tracks["t0"][:SR])
    shutil.copy(a, tmp_path / "a_copy.wav")
    write_wav(tmp_path / "same_size.wav", tracks["t1"][:SR])  # same length, other content
    write_wav(tmp_path / "other.wav", tracks["t1"][: 2 * SR])
    hashed = []
    real = dedup_module.content_hash
    monkeypatch.setattr(dedup_module, "content_hash", lambda f: hashed.append(f) or real(f))
    skipped: list[str] = []
    files = [str(p) for p in sorted(tmp_path.glob("*.wav"))] + [str(tmp_path / "gone.wav")]
    with pytest.warns(UserWarning, match="gone.wav"):
        groups = dedup_module._group_identical(files, skipped)
    assert sorted(map(sorted, groups.values())) == [
        [str(a), str(tmp_path / "a_copy.wav")],
        [str(tmp_path / "other.wav")],
        [str(tmp_path / "same_size.wav")],
    ]
    assert sorted(hashed) == sorted(
        [str(a), str(tmp_path / "a_copy.wav"), str(tmp_path / "same_size.wav")]
    )
    assert skipped == [str(tmp_path / "gone.wav")]


def test_streamed_batches_give_the_same_groups_and_leave_no_files(tmp_path, tracks, monkeypatch):
    """Dedup streams into an on-disk index and queries a batch at a time, and a long file a
    window of hashes at a time: one file per batch and windows of 100 hashes give the groups,
    offsets and (within a few %) scores of one batch and whole files; its work dir is emptied;
    a file that cannot be read is one warning and listed, not a failure."""
    lib = tmp_path / "lib"
    lib.mkdir()
    for name in ("t0", "t1", "t2"):
        write_wav(lib / f"{name}.wav", tracks[name])
        write_wav(lib / f"{name}-cut.wav", tracks[name][4 * SR : 14 * SR])
    (lib / "broken.wav").write_bytes(b"RIFF\x00\x00")
    work = tmp_path / "work"
    with pytest.warns(UserWarning, match="broken.wav"):
        all_ = dedup([lib], workers=2, backend="numpy")
    dedup_module = importlib.import_module("colabmagic.fingerprint.dedup")
    monkeypatch.setattr(dedup_module, "QUERY_CHUNK", 100)  # ~10 windows per 20-s file
    with pytest.warns(UserWarning, match="broken.wav"):
        one = dedup([lib], workers=1, backend="numpy", batch=1, work_dir=work)
    assert one.groups == all_.groups
    for ev1, ev2 in zip(one.evidence, all_.evidence, strict=True):
        assert [(e.a, e.b, e.offset_s) for e in ev1] == [(e.a, e.b, e.offset_s) for e in ev2]
        for e1, e2 in zip(ev1, ev2, strict=True):
            assert e1.aligned == pytest.approx(e2.aligned, rel=0.1)
    monkeypatch.setattr(dedup_module, "QUERY_CHUNK", 4096)
    monkeypatch.setattr(dedup_module, "QUERY_HITS", 60)  # windows cut by postings hit instead
    with pytest.warns(UserWarning, match="broken.wav"):
        few_hits = dedup([lib], workers=2, backend="numpy")
    assert few_hits.groups == all_.groups
    for ev1, ev2 in zip(few_hits.evidence, all_.evidence, strict=True):
        assert [(e.a, e.b, e.offset_s) for e in ev1] == [(e.a, e.b, e.offset_s) for e in ev2]
        for e1, e2 in zip(ev1, ev2, strict=True):
            assert e1.aligned == pytest.approx(e2.aligned, rel=0.1)
    assert len(one.groups) == 3
    assert one.skipped_files == [str(lib / "broken.wav")]
    assert list(work.iterdir()) == []  # the temporary index and spill are gone
    with pytest.raises(ParameterError, match="batch=0"):
        dedup([lib], batch=0)


def test_query_windows_bound_hashes_and_hits():
    from colabmagic.fingerprint.dedup import _windows

    hits = np.array([5, 5, 5, 50, 0, 0, 1, 1, 1, 1])
    assert _windows(hits, 4, 1000) == [(0, 4), (4, 8), (8, 10)]  # by hashes
    assert _windows(hits, 100, 10) == [(0, 2), (2, 3), (3, 4), (4, 10)]  # by hits
    assert _windows(np.zeros(0, np.int64), 4, 10) == []
    spans = _windows(np.random.default_rng(0).integers(0, 40, 5000), 4096, 1000)
    assert spans[0][0] == 0
    assert spans[-1][1] == 5000
    assert all(a < b for a, b in spans)
    assert all(x[1] == y[0] for x, y in itertools.pairwise(spans))


def test_votes_at_neighbouring_offsets_are_summed_and_chance_tracks_dropped():
    """A copy that starts part of a frame later has its aligned hashes split between two
    neighbouring offsets (and a long file's windows may each see a different one): a track's
    count is the sum at its best offset +-1, and tracks under the bar never leave NumPy."""
    from colabmagic.fingerprint.dedup import _BIAS, _best_offsets

    track = np.array([5, 5, 5, 5, 7, 9, 9], np.int64)
    offset = np.array([10, 11, 11, 40, 3, -2, 2], np.int64)
    count = np.array([30, 15, 10, 20, 5, 12, 12], np.int64)
    # track 5: 30 at 10 and 25 at 11 (two windows), 20 at 40; track 9: a tie, 0's side first
    key = track * (2 * _BIAS) + offset + _BIAS
    assert _best_offsets(np.repeat(key, count), 10) == {5: (55, 10), 9: (12, -2)}


def test_a_copy_trimmed_by_part_of_a_frame_is_grouped_at_its_offset(tmp_path):
    """Copies cut a quarter and three quarters of a frame (64 and 192 samples) after 2 s are
    grouped with the original, at 2 s and that part of a frame."""
    y = synth_music(901, 40.0)
    write_wav(tmp_path / "a.wav", y)
    write_wav(tmp_path / "t64.wav", y[2 * SR + 64 :])
    write_wav(tmp_path / "t192.wav", y[2 * SR + 192 :])
    res = dedup([tmp_path], workers=1, backend="numpy")
    assert [[p.rsplit("/", 1)[-1] for p in g] for g in res.groups] == [
        ["a.wav", "t64.wav", "t192.wav"]
    ]
    ev = {frozenset(p.rsplit("/", 1)[-1] for p in (e.a, e.b)): e for e in res.evidence[0]}
    for name, shift in (("t64.wav", 64), ("t192.wav", 192)):
        assert abs(ev[frozenset(("a.wav", name))].offset_s - (2 + shift / SR)) < 0.033


def _best_offsets_by_the_book(key, min_count):
    """The documented rule in plain Python: per track the hits per offset, the offset with the
    most (nearest 0, then lowest, on a tie), and its sum +-1 frame."""
    from colabmagic.fingerprint.dedup import _BIAS

    votes: dict[int, dict[int, int]] = {}
    for k in key.tolist():
        t, o = divmod(k, 2 * int(_BIAS))
        per = votes.setdefault(t, {})
        per[o - int(_BIAS)] = per.get(o - int(_BIAS), 0) + 1
    out = {}
    for t, per in votes.items():
        best = min(per, key=lambda o: (-per[o], abs(o), o))
        total = per[best] + per.get(best - 1, 0) + per.get(best + 1, 0)
        if total >= min_count:
            out[t] = (total, best)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_only_tracks_that_can_reach_the_bar_are_ranked_with_the_same_result(seed):
    """Only offsets with a third of the bar are ranked; the result is the documented rule's,
    including a track that passes only on its neighbours (4 + 3 + 3 = 10), one just under
    (3 + 3 + 3), and ties between offsets at the same distance from 0."""
    from colabmagic.fingerprint.dedup import _BIAS, _best_offsets

    rng = np.random.default_rng(seed)
    n = 5000  # chance hits: single counts spread over many tracks and offsets
    track = rng.integers(0, 300, n)
    offset = rng.integers(-500, 500, n)
    count = np.ones(n, np.int64)
    track = np.r_[track, 1000, 1000, 1000, 1001, 1001, 1001, 1002, 1002, 1003, 1003]
    offset = np.r_[offset, 7, 6, 8, 7, 6, 8, -3, -3, 5, -5]
    count = np.r_[count, 4, 3, 3, 3, 3, 3, 9, 2, 6, 6]  # 1000 passes, 1001 not; 1002, 1003 do
    key = np.repeat(track.astype(np.int64) * (2 * _BIAS) + offset + _BIAS, count)
    key = key[rng.permutation(len(key))]
    for bar in (1, 2, 3, 6, 10, 12):
        assert _best_offsets(key, bar) == _best_offsets_by_the_book(key, bar)
    got = _best_offsets(key, 10)
    assert got[1000] == (10, 7)
    assert got[1002] == (11, -3)
    assert 1001 not in got
    assert 1003 not in got
    assert _best_offsets(key, 6)[1003] == (6, -5)  # a tie at +-5: the lower offset
    assert _best_offsets(np.zeros(0, np.int64), 10) == {}
    assert _best_offsets(key[:2], 10) == {}


def test_each_pair_is_counted_once_by_its_lower_numbered_file(tmp_path):
    """Votes are symmetric (sampling by hash value, the same skip list both ways): file j's
    query finds file i's count at the negated offset, so each file counts only the files after
    it; a looping piece, a copy of one pass of it and a trimmed copy give the same groups and
    evidence as counting both ways."""
    dedup_module = importlib.import_module("colabmagic.fingerprint.dedup")
    from colabmagic.fingerprint import Fingerprinter, Index
    from colabmagic.fingerprint.audio import load_audio

    a = synth_music(911, 20.0)
    files = {
        "loop.wav": np.r_[a, a, synth_music(912, 6.0)],
        "a.wav": a,
        "a_trim.wav": a[3 * SR :],
        "other.wav": synth_music(913, 20.0),
    }
    for name, y in files.items():
        write_wav(tmp_path / name, y)
    fpr = Fingerprinter()
    idx = Index(tmp_path / "db", fingerprinter=fpr)
    idx.add([(n, tmp_path / n) for n in files])
    sampled = {}
    for t in idx.tracks:
        fp = fpr.fingerprint(load_audio(tmp_path / t.id, sample_rate=fpr.sample_rate))
        keep = dedup_module._sample(fp.hashes, 4)
        sampled[t.number] = dedup_module.Fingerprint(fp.hashes[keep], fp.times[keep], fp.peaks[:0])
    both = {n: dedup_module._file_votes(idx, q, min_count=1)[0] for n, q in sampled.items()}
    pairs = 0
    for i, q in sampled.items():
        once, _ = dedup_module._file_votes(idx, q, min_count=1, after=i)
        assert once == {j: v for j, v in both[i].items() if j > i}
        for j, (count, off) in once.items():
            assert both[j][i] == (count, -off)
            pairs += count >= 10
    assert pairs >= 3  # loop~a, loop~a_trim, a~a_trim at least
    groups = dedup([tmp_path / n for n in files], workers=2, backend="numpy").groups
    assert [sorted(p.rsplit("/", 1)[-1] for p in g) for g in groups] == [
        ["a.wav", "a_trim.wav", "loop.wav"]
    ]
