"""The on-disk index: add, known content, remove, compact, readers, crash safety."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

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
