"""Fixtures for the fingerprinting tests: synthetic "music", files written with ffmpeg/soundfile."""

from __future__ import annotations

import shutil
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest

from colabmagic.fingerprint import Backend, Fingerprinter, Index
from colabmagic.testing import require

SR = 8000


def synth_music(seed: int, seconds: float, sr: int = SR) -> np.ndarray:
    """Seeded note sequences: harmonic tones with decaying envelopes, some overlapping."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    y = np.zeros(n, np.float32)
    t_all = np.arange(n) / sr
    n_notes = int(seconds * 7)
    for onset, dur, f0, amp in zip(
        rng.uniform(0, seconds, n_notes),
        rng.uniform(0.12, 0.6, n_notes),
        np.exp(rng.uniform(np.log(110), np.log(1500), n_notes)),
        rng.uniform(0.2, 1.0, n_notes),
        strict=True,
    ):
        a, b = int(onset * sr), min(n, int((onset + dur) * sr))
        t = t_all[: b - a]
        env = np.exp(-t * rng.uniform(2, 8)) * amp
        tone = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in (1, 2, 3))
        y[a:b] += (env * tone).astype(np.float32)
    y += 0.003 * rng.standard_normal(n).astype(np.float32)
    return (0.3 * y / np.abs(y).max()).astype(np.float32)


def ffmpeg(*args: str) -> None:
    """Run ffmpeg quietly; the test is skipped (or fails under REQUIRE_ALL) without it."""
    require(shutil.which("ffmpeg") is not None, "ffmpeg is not installed")
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


def write_wav(path: Path, y: np.ndarray, sr: int = SR) -> Path:
    import soundfile

    soundfile.write(path, y, sr, subtype="PCM_16")
    return path


@pytest.fixture(scope="session")
def fingerprinter() -> Fingerprinter:
    return Fingerprinter()


@pytest.fixture(scope="session")
def tracks() -> dict[str, np.ndarray]:
    """Six 20-s synthetic tracks (ids t0..t5) and two held-out ones (n0, n1)."""
    out = {f"t{i}": synth_music(100 + i, 20.0) for i in range(6)}
    out.update({f"n{i}": synth_music(900 + i, 20.0) for i in range(2)})
    return out


@pytest.fixture(scope="session")
def library(tmp_path_factory: pytest.TempPathFactory, tracks: dict[str, np.ndarray]) -> Path:
    """The indexed tracks as 16-bit WAV files."""
    d = tmp_path_factory.mktemp("library")
    for name, y in tracks.items():
        if name.startswith("t"):
            write_wav(d / f"{name}.wav", y)
    return d


@pytest.fixture(scope="session")
def built_index(tmp_path_factory: pytest.TempPathFactory, library: Path) -> Path:
    """An index of :func:`library` (read-only use only: tests that write copy it)."""
    db = tmp_path_factory.mktemp("db") / "db"
    Index(db).add([(p.stem, p) for p in sorted(library.glob("*.wav"))], backend="numpy")
    return db


@pytest.fixture
def index_copy(built_index: Path, tmp_path: Path) -> Index:
    dst = tmp_path / "db"
    shutil.copytree(built_index, dst)
    return Index(dst)


def numpy_as_device() -> Backend:
    """NumPy dressed as a device namespace (``asnumpy`` and all), to run the CuPy code path."""
    shim = types.ModuleType("numpy_device")
    shim.__dict__.update({k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    shim.asnumpy = np.asarray
    return Backend.from_module(shim)


@pytest.fixture(params=["numpy", "device-shim"])
def backend(request: pytest.FixtureRequest) -> Backend | str:
    return "numpy" if request.param == "numpy" else numpy_as_device()


HOP = 256
PHRASE_S = 78 * HOP / SR  # the looping track repeats one phrase this long (whole frames: the
# repeats give the same peaks, as a loop in a tracker module does)
REPEATS = 6
COPIES = 3


@pytest.fixture(scope="module")
def looping(
    tmp_path_factory: pytest.TempPathFactory, tracks: dict[str, np.ndarray]
) -> tuple[Index, np.ndarray]:
    """An index where one recording loops a phrase and has COPIES copies (as game music in the
    scale corpus does), beside the six ordinary tracks."""
    phrase = synth_music(777, PHRASE_S)[: 78 * HOP]
    loop = np.tile(phrase, REPEATS)
    fpr = Fingerprinter()
    signals = {f"t{i}": tracks[f"t{i}"] for i in range(6)}
    signals["loop"] = loop
    signals["loop-quiet"] = 0.5 * loop
    signals["loop-trim"] = loop[29 * HOP :]
    names = sorted(signals)
    fps = fpr.fingerprint_batch([signals[n] for n in names], backend="numpy")
    index = Index(tmp_path_factory.mktemp("loop") / "db")
    index.add_fingerprints(
        [
            (
                {"id": n, "path": n, "duration": len(signals[n]) / SR, "content_hash": n},
                f.hashes,
                f.times,
                f.peaks,
            )
            for n, f in zip(names, fps, strict=True)
        ]
    )
    return index, loop
