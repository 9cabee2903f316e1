"""The on-disk index: add, known content, remove, compact, readers, crash safety."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from colabmagic.errors import ParameterError
from colabmagic.fingerprint import Fingerprinter, FingerprintIndexError, Index, match
from colabmagic.testing import wait_until

from .conftest import SR, write_wav


def test_add_reports_and_stores(built_index, library):
    idx = Index(built_index, readonly=True)
    assert sorted(t.id for t in idx.tracks) == [f"t{i}" for i in range(6)]
    info = idx.info()
    assert info["tracks"] == 6
    assert info["hours"] == pytest.approx(6 * 20 / 3600, rel=0.01)
    assert info["memory_bytes"] == 12 * info["n_hashes"] + 8 * info["n_peaks"]
    assert info["bytes_per_hash"] <= 16.0
    assert info["n_hashes"] == sum(t.n_hashes for t in idx.tracks)
    h = np.load(built_index / "shards" / idx._manifest["shards"][0] / "hashes.npy")
    assert np.all(np.diff(h.astype(np.int64)) >= 0)


def test_readd_known_content_is_a_noop(index_copy, library, tmp_path):
    before = index_copy.n_hashes
    shutil.copy(library / "t1.wav", tmp_path / "renamed.wav")
    s = index_copy.add([library / "t0.wav", tmp_path / "renamed.wav"])
    assert (s.added, s.known, s.n_hashes) == (0, 2, 0)
    assert index_copy.n_hashes == before
    assert len(index_copy) == 6


def test_incremental_add_remove_compact(index_copy, tracks, tmp_path):
    write_wav(tmp_path / "n0.wav", tracks["n0"])
    s = index_copy.add([("extra", tmp_path / "n0.wav")])
    assert s.added == 1
    assert len(index_copy._manifest["shards"]) == 2
    q = tracks["n0"][2 * SR : 8 * SR]
    assert match(index_copy, q)[0].track == "extra"
    assert index_copy.remove("extra")
    assert not index_copy.remove("extra")
    assert match(index_copy, q) == []
    assert "extra" not in index_copy
    n_before, peaks_before = index_copy.n_hashes, index_copy.info()["n_peaks"]
    extra_peaks = len(index_copy._shards[1].peaks)
    index_copy.compact()
    assert len(index_copy._manifest["shards"]) == 1
    assert index_copy.n_hashes == n_before - s.n_hashes
    assert index_copy.info()["n_peaks"] == peaks_before - extra_peaks  # its peaks went too
    keys, _ = index_copy.peak_keys()
    assert np.all(np.diff(keys.astype(np.int64)) > 0)
    assert len(list((index_copy.path / "shards").iterdir())) == 1  # old shards collected
    assert match(index_copy, tracks["t2"][: 5 * SR])[0].track == "t2"


def test_same_id_new_content_replaces_track(index_copy, tracks, tmp_path):
    write_wav(tmp_path / "x.wav", tracks["n1"])
    index_copy.add([("t0", tmp_path / "x.wav")])
    assert [t.id for t in index_copy.tracks].count("t0") == 1
    assert match(index_copy, tracks["n1"][: 5 * SR])[0].track == "t0"
    assert match(index_copy, tracks["t0"][: 5 * SR]) == []


def test_readonly_and_errors(built_index, tmp_path):
    idx = Index(built_index, readonly=True)
    with pytest.raises(ParameterError, match="readonly"):
        idx.remove("t0")
    with pytest.raises(FingerprintIndexError, match="not a fingerprint index"):
        Index(tmp_path / "nothing", readonly=True)
    with pytest.raises(ParameterError, match="other fingerprint parameters"):
        Index(built_index, fingerprinter=Fingerprinter(fanout=3))
    (tmp_path / "music").mkdir()
    (tmp_path / "music" / "song.wav").write_bytes(b"")
    with pytest.raises(FingerprintIndexError, match="exists and is not a fingerprint index"):
        Index(tmp_path / "music")
    old = tmp_path / "old"  # an index of the format before the streaming shards
    shutil.copytree(built_index, old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))
    with pytest.raises(FingerprintIndexError, match="format 2, this colabmagic reads format 3"):
        Index(old, readonly=True)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(FingerprintIndexError, match=r"cannot read manifest\.json"):
        Index(tmp_path / "bad", readonly=True)


READER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from colabmagic.fingerprint import Index, load_audio, match
    idx = Index(sys.argv[1], readonly=True)
    y = load_audio(sys.argv[2])
    out = [m.track for m in match(idx, y[8000 * 3: 8000 * 9])]
    print(json.dumps({"tracks": len(idx), "match": out}))
    """
)


def test_many_reader_processes(built_index, library):
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", READER, str(built_index), str(library / f"t{i}.wav")],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in (1, 4)
    ]
    outs = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert outs == [{"tracks": 6, "match": ["t1"]}, {"tracks": 6, "match": ["t4"]}]


WRITER = textwrap.dedent(
    """
    import os, sys, threading
    import colabmagic.fingerprint.index as ix
    stage, marker = sys.argv[3], sys.argv[4]

    def block(name, real):
        def wrapper(*args, **kwargs):
            if name == stage:
                open(marker, "w").close()
                threading.Event().wait()   # hang here until SIGKILL
            return real(*args, **kwargs)
        return wrapper

    ix._save_npy = block("shard", ix._save_npy)
    ix.os.replace = block("manifest", os.replace)
    ix.Index(sys.argv[1]).add([("new", sys.argv[2])])
    """
)


@pytest.mark.parametrize("stage", ["shard", "manifest"])
def test_kill_9_during_add_leaves_previous_index(index_copy, tracks, tmp_path, stage):
    """A writer SIGKILLed while writing a shard, or just before publishing the manifest."""
    db = index_copy.path
    manifest_before = (db / "manifest.json").read_bytes()
    write_wav(tmp_path / "new.wav", tracks["n0"])
    marker = tmp_path / "marker"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db), str(tmp_path / "new.wav"), stage, str(marker)]
    )
    try:
        wait_until(marker.exists, timeout=60, what=f"writer to reach the {stage} stage")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
    assert (db / "manifest.json").read_bytes() == manifest_before
    leftovers = {p.name for p in (db / "shards").iterdir()} - set(index_copy._manifest["shards"])
    assert leftovers  # the half-written shard is there ...
    idx = Index(db, readonly=True)  # ... but invisible
    assert len(idx) == 6
    assert match(idx, tracks["t3"][: 6 * SR])[0].track == "t3"
    assert match(idx, tracks["n0"][: 6 * SR]) == []
    s = Index(db).add([("new", tmp_path / "new.wav")])  # the lock died with the writer
    assert s.added == 1
    assert {p.name for p in (db / "shards").iterdir()} == set(Index(db)._manifest["shards"])
    assert match(Index(db, readonly=True), tracks["n0"][: 6 * SR])[0].track == "new"


def test_auto_compaction_bounds_shards(tmp_path, tracks):
    idx = Index(tmp_path / "db", max_shards=2)
    for name in ("t0", "t1", "t2"):
        write_wav(tmp_path / f"{name}.wav", tracks[name][: 6 * SR])
        idx.add([(name, tmp_path / f"{name}.wav")])
    assert len(idx._manifest["shards"]) <= 2
    assert len(idx) == 3


def test_common_hashes_are_skipped_and_query_work_is_bounded(tmp_path, monkeypatch):
    from colabmagic.fingerprint.index import MAX_POSTINGS

    idx = Index(tmp_path / "db")
    common = np.full(MAX_POSTINGS + 1, 7, np.uint32)  # one hash in every frame
    rare = np.full(10, 9, np.uint32)
    hashes = np.concatenate([common, rare])
    times = np.arange(len(hashes), dtype=np.int32)
    idx.add_fingerprints([({"id": "a", "path": "a", "duration": 9.0, "content_hash": "a"},
                           hashes, times)])  # fmt: skip
    which, track, time = idx.lookup(np.array([7, 9], np.uint32))
    assert idx.stop_postings == 32  # a small index: the floor
    assert set(which.tolist()) == {1}  # the common hash is skipped, the rare one found
    np.testing.assert_array_equal(np.sort(time), times[-10:])
    assert set(track.tolist()) == {0}
    monkeypatch.setattr(Index, "n_hashes", property(lambda self: 10**10))
    assert idx.stop_postings == MAX_POSTINGS  # however large the library


def _arrays(idx: Index) -> tuple[np.ndarray, ...]:
    assert len(idx._shards) == 1
    s = idx._shards[0]
    return np.asarray(s.hashes), np.asarray(s.postings), np.asarray(s.peaks)


def _tracks(idx: Index) -> list[tuple]:
    return [(t.number, t.id, t.content_hash, t.n_hashes) for t in idx.tracks]


def test_streaming_merges_equal_a_one_shot_build(built_index, library, tmp_path, monkeypatch):
    """A shard per file, LSM merges while adding and a final merge, each merge in many small
    key-range steps: the same index, byte for byte, as one shard written at once."""
    from colabmagic.fingerprint import index as ix

    monkeypatch.setattr(ix, "MERGE_STEP", 3000)  # ~10 steps per merge
    monkeypatch.setattr(ix, "MERGE_FANOUT", 2)
    merges = []
    real_merge = ix.Index._merge
    monkeypatch.setattr(ix.Index, "_merge", lambda self, names, **kw: (
        merges.append(len(names)), real_merge(self, names, **kw))[1])  # fmt: skip
    idx = Index(tmp_path / "db")
    s = idx.add([(p.stem, p) for p in sorted(library.glob("*.wav"))], shard_hashes=1)
    assert s.added == 6
    assert len(merges) >= 3  # tail merges while adding, then the final one
    ref = Index(built_index, readonly=True)
    assert _tracks(idx) == _tracks(ref)
    for a, b in zip(_arrays(idx), _arrays(ref), strict=True):
        np.testing.assert_array_equal(a, b)
    assert idx._manifest["shard_info"][idx._manifest["shards"][0]]["hashes"] == ref.n_hashes

    idx.remove("t1")  # a compaction that drops a track, also in many steps
    idx.compact()
    keep = ref._alive.copy()
    keep[ref._by_number[1].number] = False
    h, p, k = _arrays(ref)
    alive = keep[(p >> np.uint64(32)).astype(np.int64)]
    got = _arrays(idx)
    np.testing.assert_array_equal(got[0], h[alive])
    np.testing.assert_array_equal(got[1], p[alive])
    np.testing.assert_array_equal(got[2], k[keep[(k >> np.uint64(36)).astype(np.int64)]])


SIGINT_ADD = textwrap.dedent(
    """
    import signal, sys
    # as from a terminal: a test runner started in the background inherits SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from colabmagic.cli import main
    sys.argv = ["colabmagic", "fp", "index", "--db", sys.argv[1], "--workers", "1",
                "--commit-every", "0", *sys.argv[2:]]
    main()
    """
)


def test_ctrl_c_keeps_finished_files_and_a_rerun_finishes(tmp_path, tracks, built_index):
    """A real SIGINT to a real `colabmagic fp index`: a valid index with the files that finished;
    the same command again skips them by content hash and ends with the full index."""
    files = []  # 48 distinct contents (the 8 tracks at 6 gains): the add takes a few seconds
    for c in range(6):
        for name in sorted(tracks):
            files.append(write_wav(tmp_path / f"g{c}-{name}.wav", tracks[name] * 0.9**c))
    todo = [str(f) for f in files]
    n = len(todo)
    db = tmp_path / "db"
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGINT_ADD, str(db), *todo],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:

        def some_committed() -> bool:
            try:
                return len(json.loads((db / "manifest.json").read_text())["tracks"]) >= 2
            except (OSError, ValueError):
                return False

        wait_until(some_committed, timeout=60, what="the first files to be committed")
        os.kill(proc.pid, signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted:" in err
    assert "Rerun the same command" in err
    assert "Traceback" not in err
    first = Index(db, readonly=True)
    done = len(first)
    assert 2 <= done < n, "the add ended before the SIGINT; make the job longer"
    name = Path(first.tracks[0].id).stem.split("-")[1]
    assert match(first, tracks[name][: 6 * SR])[0].track == first.tracks[0].id
    rerun = subprocess.run(
        [sys.executable, "-c", SIGINT_ADD, str(db), "--json", *todo],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert (summary["added"], summary["known"]) == (n - done, done)
    final = Index(db, readonly=True)
    assert [t.id for t in final.tracks] == todo  # each file once, in order
    assert len({t.content_hash for t in final.tracks}) == n
    assert final.tracks[-1].number == n - 1  # no number spent on a file indexed twice


def test_threads_sharing_an_index_see_the_same_postings(built_index, monkeypatch):
    """dedup queries from threads; the start table a shard builds on first heavy use must be
    published whole (a thread that saw it half-filled found no postings: lost duplicates)."""
    from concurrent.futures import ThreadPoolExecutor

    from colabmagic.fingerprint import index as ix

    ref = Index(built_index, readonly=True)
    hashes = np.asarray(ref._shards[0].hashes)
    queries = [hashes[i::16].copy() for i in range(16)]
    expected = [[a.tolist() for a in ref.lookup(q, max_postings=1 << 20)] for q in queries]
    monkeypatch.setattr(ix, "TABLE_MIN_HASHES", 1)
    real_table = ix._start_table

    def slow_table(hashes):  # a slow build: other threads query meanwhile
        time.sleep(0.2)
        return real_table(hashes)

    monkeypatch.setattr(ix, "_start_table", slow_table)
    for _ in range(3):
        idx = Index(built_index, readonly=True)  # a fresh process's view: no table yet
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(functools.partial(idx.lookup, max_postings=1 << 20), queries * 2))
        assert [[a.tolist() for a in g] for g in got] == expected * 2
        assert all(s.table is not None for s in idx._shards)
    counts = np.bincount(hashes, minlength=(1 << 21) + 1)  # the table = cumulative counts
    np.testing.assert_array_equal(real_table(hashes), np.concatenate([[0], np.cumsum(counts)])[:-1])


def test_plan_lookups_builds_the_start_tables_up_front(tmp_path, monkeypatch):
    """A batch job that will look up many hashes (dedup) gets every shard's start table at
    once, not after an eighth of the shard was searched by bisection; the postings found are
    the same, and a small plan leaves the shard to bisect."""
    from colabmagic.fingerprint import index as ix

    monkeypatch.setattr(ix, "TABLE_MIN_HASHES", 1000)
    rng = np.random.default_rng(0)
    idx = Index(tmp_path / "db")
    for t in range(3):
        n = 4000
        record = {"id": f"t{t}", "path": f"t{t}", "duration": 30.0, "content_hash": f"h{t}"}
        hashes = rng.integers(0, 1 << 21, n).astype(np.uint32)
        idx.add_fingerprints([(record, hashes, np.sort(rng.integers(0, 900, n)).astype(np.int32))])
    assert len(idx._shards) == 3
    queries = rng.integers(0, 1 << 21, 300).astype(np.uint32)
    before = [a.tolist() for a in idx.lookup(queries, max_postings=1 << 20)]
    fresh = Index(tmp_path / "db", readonly=True)
    fresh.plan_lookups(10)
    assert all(s.table is None for s in fresh._shards)
    fresh.plan_lookups(4000 // 8)
    assert all(s.table is not None for s in fresh._shards)
    assert [a.tolist() for a in fresh.lookup(queries, max_postings=1 << 20)] == before


def test_files_are_hashed_in_threads_and_an_unreadable_one_is_skipped(tmp_path, tracks):
    """Content hashes come from a thread per worker, in the files' order: a second copy of
    one content is known and a file that cannot be read is one warning and skipped."""
    a = write_wav(tmp_path / "a.wav", tracks["t0"][: 8 * SR])
    shutil.copy(a, tmp_path / "a_copy.wav")
    write_wav(tmp_path / "b.wav", tracks["t1"][: 8 * SR])
    (tmp_path / "locked.wav").write_bytes(b"RIFF")
    (tmp_path / "locked.wav").chmod(0)
    items = [(n, tmp_path / n) for n in ("a.wav", "locked.wav", "a_copy.wav", "b.wav")]
    idx = Index(tmp_path / "db")
    if os.access(tmp_path / "locked.wav", os.R_OK):  # root reads anything: a missing file then
        items[1] = ("locked.wav", tmp_path / "gone" / "locked.wav")
    with pytest.warns(UserWarning, match=r"locked\.wav: cannot read"):
        s = idx.add(items, workers=2)
    assert (s.added, s.known, s.skipped) == (2, 1, 1)
    assert [t.id for t in idx.tracks] == ["a.wav", "b.wav"]
    assert s.skipped_files == [str(items[1][1])]


@pytest.mark.parametrize("n", [0, 1, 7, 100_000])
def test_stable_order_is_the_stable_argsort(n):
    """Shards are sorted by packing key and position into one uint64 (a plain sort): the order
    must be exactly NumPy's stable argsort, ties (many here: 16 distinct keys) in input order."""
    from colabmagic.fingerprint.index import _stable_order

    rng = np.random.default_rng(n)
    for keys in (
        rng.integers(0, 16, n).astype(np.uint32),
        rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32),
    ):
        got = _stable_order(keys)
        np.testing.assert_array_equal(got, np.argsort(keys, kind="stable"), strict=False)
        assert got.dtype == np.intp
