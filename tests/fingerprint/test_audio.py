"""Decoding real files made with ffmpeg; bad files are warned about, skipped and counted."""

from __future__ import annotations

import os
import re
import shutil
import threading

import numpy as np
import pytest

from colabmagic.fingerprint import AudioDecodeError, AudioDecodeWarning, Index, load_audio, match
from colabmagic.fingerprint.audio import (
    _load_ffmpeg,
    _mix_to_mono,
    _read_all,
    content_hash,
    find_audio,
    load_audio_many,
)
from colabmagic.testing import require

from .conftest import SR, ffmpeg, write_wav


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, tracks):
    """t4 seconds 2-12 as 44.1 kHz stereo WAV, then FLAC, OGG, MP3 and AAC (m4a) by ffmpeg."""
    import soxr

    d = tmp_path_factory.mktemp("enc")
    y = soxr.resample(tracks["t4"][2 * SR : 12 * SR], SR, 44100).astype(np.float32)
    write_wav(d / "src.wav", np.stack([y, 0.5 * y], axis=1), 44100)
    for ext, args in {
        "flac": [],
        "ogg": ["-c:a", "libvorbis", "-q:a", "3"],
        "mp3": ["-b:a", "96k"],
        "m4a": ["-c:a", "aac", "-b:a", "96k"],
    }.items():
        ffmpeg("-i", str(d / "src.wav"), *args, str(d / f"q.{ext}"))
    return d


@pytest.mark.parametrize("name", ["src.wav", "q.flac", "q.ogg", "q.mp3", "q.m4a"])
def test_formats_decode_to_mono_8k_and_match(encoded, built_index, name):
    y = load_audio(encoded / name)
    assert y.dtype == np.float32
    assert y.ndim == 1
    assert len(y) == pytest.approx(10 * SR, abs=0.12 * SR)  # codecs pad a few ms
    (m,) = match(Index(built_index, readonly=True), encoded / name)
    assert m.track == "t4"
    assert m.offset_s == pytest.approx(2.0, abs=0.1)


def test_bad_files_raise_a_named_error(tmp_path):
    (tmp_path / "empty.mp3").write_bytes(b"")
    (tmp_path / "junk.ogg").write_bytes(np.random.default_rng(0).bytes(5000))
    write_wav(tmp_path / "zero.wav", np.zeros(0, np.float32))
    for name in ("empty.mp3", "junk.ogg", "zero.wav", "missing.wav"):
        with pytest.raises(AudioDecodeError, match=name):
            load_audio(tmp_path / name)


def test_index_skips_and_counts_bad_files(tmp_path, tracks):
    lib = tmp_path / "lib"
    (lib / "sub").mkdir(parents=True)
    write_wav(lib / "good.wav", tracks["t0"][: 6 * SR])
    write_wav(lib / "sub" / "good2.wav", tracks["t1"][: 6 * SR])
    (lib / "sub" / "broken.flac").write_bytes(b"fLaC" + bytes(300))
    (lib / "empty.wav").write_bytes(b"")
    (lib / "notes.txt").write_text("not audio, not listed")
    idx = Index(tmp_path / "db")
    with pytest.warns(AudioDecodeWarning) as rec:
        s = idx.add([lib])
    assert (s.files, s.added, s.skipped) == (4, 2, 2)
    assert sorted(s.skipped_files) == sorted(
        [str(lib / "empty.wav"), str(lib / "sub" / "broken.flac")]
    )
    named = {str(w.message).split(":")[0] for w in rec if w.category is AudioDecodeWarning}
    assert named == set(s.skipped_files)
    assert len(Index(tmp_path / "db", readonly=True)) == 2  # consistent after the skips


def test_find_audio_and_content_hash(tmp_path, tracks):
    write_wav(tmp_path / "a.wav", tracks["t0"][:SR])
    (tmp_path / "b.WAV").write_bytes((tmp_path / "a.wav").read_bytes())
    (tmp_path / "c.txt").write_text("x")
    assert find_audio([tmp_path]) == [str(tmp_path / "a.wav"), str(tmp_path / "b.WAV")]
    assert content_hash(tmp_path / "a.wav") == content_hash(tmp_path / "b.WAV")


@pytest.mark.parametrize("channels", range(1, 11))
def test_mix_to_mono_is_bit_identical_to_mean(channels):
    rng = np.random.default_rng(channels)
    y = (rng.standard_normal((10_001, channels)) * rng.uniform(1e-3, 10, channels)).astype(
        np.float32
    )
    assert np.array_equal(_mix_to_mono(y), y.mean(axis=1))


def test_read_all_grows_its_buffer_and_keeps_every_byte():
    data = np.random.default_rng(0).bytes(300_000)
    r, w = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(w, data), os.close(w)))
    writer.start()
    with open(r, "rb", buffering=0) as pipe:
        got = _read_all(pipe, capacity=10)  # far too small: grows several times
    writer.join()
    assert got.tobytes() == data


def test_ffmpeg_decodes_into_a_writable_buffer_and_reports_corrupt_files(encoded, tmp_path):
    require(shutil.which("ffmpeg") is not None, "ffmpeg is not installed")
    y = _load_ffmpeg(str(encoded / "q.flac"), SR)
    assert y.dtype == np.float32
    assert y.flags.writeable
    assert len(y) == pytest.approx(10 * SR, abs=0.12 * SR)
    (tmp_path / "junk.mp3").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(RuntimeError):
        _load_ffmpeg(str(tmp_path / "junk.mp3"), SR)


def test_load_audio_many_gives_load_audio_results_in_order(encoded, tmp_path):
    require(shutil.which("ffmpeg") is not None, "ffmpeg is not installed")
    odd = tmp_path / "it's a [mix]; 1, 2: 3\\4 =5.ogg"  # every character the filtergraph escapes
    shutil.copy(encoded / "q.ogg", odd)
    (tmp_path / "junk.ogg").write_bytes(np.random.default_rng(0).bytes(5000))
    paths = [encoded / "q.mp3", odd, tmp_path / "junk.ogg", encoded / "src.wav", encoded / "q.m4a"]
    paths += [encoded / "q.ogg", tmp_path / "missing.mp3"]
    out = load_audio_many(paths)
    assert len(out) == len(paths)
    for p, y in zip(paths, out, strict=True):
        if isinstance(y, AudioDecodeError):
            with pytest.raises(AudioDecodeError, match=re.escape(str(y))):
                load_audio(p)
        else:  # one ffmpeg for several files: the samples of load_audio
            np.testing.assert_array_equal(y, load_audio(p))
    assert [isinstance(y, AudioDecodeError) for y in out] == [0, 0, 1, 0, 0, 0, 1]


def test_shared_ffmpeg_runs_are_what_decodes_lossy_files(encoded, monkeypatch):
    require(shutil.which("ffmpeg") is not None, "ffmpeg is not installed")
    import colabmagic.fingerprint.audio as audio

    calls = []
    real = audio._ffmpeg_many
    monkeypatch.setattr(audio, "_ffmpeg_many", lambda p, *a: calls.append(p) or real(p, *a))
    monkeypatch.setattr(audio, "FILES_PER_FFMPEG", 2)
    names = ["q.mp3", "q.ogg", "q.m4a", "q.flac"]
    out = load_audio_many([encoded / n for n in names])
    assert [len(c) for c in calls] == [2]  # the m4a left alone and the flac: load_audio
    assert all(isinstance(y, np.ndarray) for y in out)


def test_scratch_left_by_a_killed_decoder_is_removed(encoded, monkeypatch, tmp_path):
    """A decoder killed with -9 leaves its RAM-backed scratch; the next run removes it."""
    require(shutil.which("ffmpeg") is not None, "ffmpeg is not installed")
    import os
    import subprocess
    import sys

    import colabmagic.fingerprint.audio as audio

    monkeypatch.setattr(audio, "_scratch_dir", lambda: str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"fpdecode-{dead.pid}-abc"
    stale.mkdir()
    (stale / "0.f32").write_bytes(b"\0" * 4096)
    mine = tmp_path / f"fpdecode-{os.getpid()}-xyz"  # a live owner (this process)
    mine.mkdir()
    other = tmp_path / "fpdecode-notapid-x"  # not ours to judge
    other.mkdir()
    out = load_audio_many([encoded / "q.mp3", encoded / "q.ogg"])
    assert all(isinstance(y, np.ndarray) for y in out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other.name])
