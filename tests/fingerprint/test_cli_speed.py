"""The CLI as fast as the library (issue 14): lazy imports, no ffmpeg for WAV/FLAC queries, and
the faster query internals giving the same answers as before."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from colabmagic.fingerprint import Index, match
from colabmagic.fingerprint import index as index_module
from colabmagic.fingerprint._xp import NUMPY
from colabmagic.fingerprint.match import candidates

from .conftest import SR, numpy_as_device, write_wav

CLI = [sys.executable, "-c", "from colabmagic.cli import main; main()"]


def test_fp_does_not_import_the_experiment_machinery():
    code = (
        "import sys\n"
        "from colabmagic.cli import main\n"
        "try:\n    main(['fp', 'query', '--help'])\n"
        "except SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith(('colabmagic.exp', 'jsonschema'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    listing = subprocess.run([*CLI, "--help"], capture_output=True, text=True, check=True)
    assert "exp " in listing.stdout
    assert "fp " in listing.stdout  # still listed


def test_wav_and_flac_queries_need_no_ffmpeg(tmp_path, built_index, tracks):
    import soundfile

    wav = write_wav(tmp_path / "q.wav", tracks["t2"][3 * SR : 8 * SR])
    flac = tmp_path / "q.flac"
    soundfile.write(flac, tracks["t4"][5 * SR : 10 * SR], 44100 // 2, format="FLAC")
    bare = tmp_path / "bin"  # a PATH with python but no ffmpeg
    bare.mkdir()
    os.symlink(sys.executable, bare / "python")
    env = {**os.environ, "PATH": str(bare)}
    assert shutil.which("ffmpeg", path=env["PATH"]) is None
    cmd = [*CLI, "fp", "query", "--db", str(built_index), str(wav), str(flac), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["track"] for r in rows][:1] == ["t2"]
    assert all("error" not in r for r in rows)
    assert all(r["cpu_s"] > 0 for r in rows)


def test_index_progress_shows_files_per_second_and_eta(tmp_path, library):
    cmd = [*CLI, "fp", "index", "--db", str(tmp_path / "db"), str(library), "--workers", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    bar = out.stderr.replace("\r", "\n").splitlines()
    last = [line for line in bar if line.startswith("fingerprinting")][-1]
    assert "6/6" in last
    assert "file/s" in last or "s/file" in last
    assert "<" in last  # elapsed<remaining


def test_speed_variants_from_peaks_equal_fingerprinting_again(fingerprinter, tracks):
    ys = [tracks["t1"][: 7 * SR], tracks["t3"][2 * SR : 12 * SR]]
    again = fingerprinter.fingerprint_batch(ys, backend="numpy", query=True, variants=[2, 5, 6])
    first = fingerprinter.fingerprint_batch(ys, backend="numpy", query=True, variants=[0])
    from_peaks = fingerprinter.speed_variants(first, [2, 5, 6])
    for a, b in zip(again, from_peaks, strict=True):
        np.testing.assert_array_equal(a.hashes, b.hashes)
        np.testing.assert_array_equal(a.times, b.times)
        np.testing.assert_array_equal(a.variant, b.variant)
    with pytest.raises(Exception, match="needs fingerprints with peaks"):
        fingerprinter.speed_variants([first[0]._replace(peaks=None)], [1])


@pytest.mark.parametrize("device", [False, True])
def test_best_of_runs_picks_max_score_then_count_then_last(device):
    rng = np.random.default_rng(3)
    run = np.sort(rng.integers(0, 40, 3000))
    score = rng.integers(0, 4, 3000).astype(np.float64)  # many ties
    count = rng.integers(0, 3, 3000)
    got = (numpy_as_device() if device else NUMPY).best_of_runs(run, score, count)
    want = []
    for r in np.unique(run):
        idx = np.flatnonzero(run == r)
        want.append(max(idx, key=lambda i: (score[i], count[i], i)))
    np.testing.assert_array_equal(got, want)


def test_lookup_table_gives_the_binary_search_answers(
    built_index, tracks, fingerprinter, monkeypatch
):
    idx = Index(built_index, readonly=True)
    fresh = Index(built_index, readonly=True)
    qs = [fingerprinter.fingerprint(tracks[f"t{i}"], query=True).hashes for i in range(6)]
    qs += [np.arange(0, 1 << 21, 7, dtype=np.uint32)]  # every kind of hash value
    monkeypatch.setattr(index_module, "TABLE_MIN_HASHES", 1 << 40)  # binary searches only
    answers = [fresh.lookup(h) for h in qs]
    assert all(s.table is None for s in fresh._shards)
    monkeypatch.setattr(index_module, "TABLE_MIN_HASHES", 1)  # this small shard gets one too
    for _ in range(3):  # until the table is built
        got = [idx.lookup(h) for h in qs]
    assert all(s.table is not None for s in idx._shards)
    for a, b in zip(answers, got, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    q = tracks["t5"][4 * SR : 9 * SR]
    monkeypatch.setattr(index_module, "TABLE_MIN_HASHES", 1 << 40)
    va = candidates(fresh, q)
    vb = candidates(idx, q)
    np.testing.assert_array_equal(va.track, vb.track)
    np.testing.assert_allclose(va.score, vb.score)
    assert match(idx, q)[0].track == "t5"


def test_index_progress_bar_leaves_the_pool_forking(tmp_path, library):
    # in a fresh process: the test process itself may hold other tests' threads
    code = (
        "import sys\n"
        "from colabmagic.cli import main\n"
        "from colabmagic.fingerprint import pipeline\n"
        "pipeline.BYTES_PER_WORKER = 1\n"  # a pool for this small library
        "real, seen = pipeline._start_method, []\n"
        "pipeline._start_method = lambda: seen.append(real()) or seen[-1]\n"
        "try:\n"
        f"    main(['fp', 'index', '--db', {str(tmp_path / 'db')!r}, {str(library)!r},"
        " '--workers', '2'])\n"
        "except SystemExit:\n    pass\n"
        "print(seen, file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # tqdm's monitor thread would have forced "spawn"
    assert out.stderr.strip().splitlines()[-1] == "['fork']"
