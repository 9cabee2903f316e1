"""Audio loading: any file to mono float32 at a fixed rate.

soundfile (libsndfile) first for PCM and FLAC; ffmpeg first for lossy formats (OGG, MP3, AAC/M4A,
Opus), where its decoders are faster, and as the fallback for anything libsndfile cannot read;
audioread when ffmpeg is absent. Files that nothing can decode raise
:class:`AudioDecodeError`; the batch functions turn that into an :class:`AudioDecodeWarning`
naming the file, skip it and count it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np

from colabmagic.errors import ColabMagicError

AUDIO_EXTENSIONS = frozenset(
    ".wav .flac .ogg .oga .opus .mp3 .m4a .aac .mp4 .wma .aif .aiff .au .webm".split()
)


#: Compressed formats that ffmpeg decodes (and resamples) faster than libsndfile + soxr; measured
#: on OGG Vorbis: about 530x realtime per core against 400x.
LOSSY_EXTENSIONS = frozenset(".ogg .oga .opus .mp3 .m4a .aac .mp4 .wma .webm".split())


class AudioDecodeError(ColabMagicError):
    """An audio file is corrupt, empty or in a format no decoder here can read."""


class AudioDecodeWarning(UserWarning):
    """A file was skipped because it could not be decoded (the message names it)."""


def content_hash(path: str | os.PathLike[str]) -> str:
    """BLAKE2b digest (32 hex characters) of a file's bytes: the identity of its content."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _resample(y: np.ndarray, orig: int, target: int) -> np.ndarray:
    if orig == target:
        return y
    try:
        import soxr
    except ImportError:  # pragma: no cover - soxr comes with librosa
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(orig, target)
        return resample_poly(y, target // g, orig // g).astype(np.float32)
    return soxr.resample(y, orig, target, quality="MQ").astype(np.float32, copy=False)


def _load_soundfile(path: str, sample_rate: int) -> np.ndarray:
    import soundfile

    y, sr = soundfile.read(path, dtype="float32", always_2d=True)
    return _resample(y.mean(axis=1), int(sr), sample_rate)


def _load_ffmpeg(path: str, sample_rate: int) -> np.ndarray:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        msg = "ffmpeg is not on PATH"
        raise FileNotFoundError(msg)
    cmd = [ffmpeg, "-nostdin", "-v", "error", "-i", path, "-vn", "-ac", "1"]
    cmd += ["-ar", str(sample_rate), "-f", "f32le", "-"]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        msg = err[-1] if err else f"ffmpeg exited with {proc.returncode}"
        raise RuntimeError(msg)
    return np.frombuffer(proc.stdout, dtype=np.float32).copy()


def _load_audioread(path: str, sample_rate: int) -> np.ndarray:
    with warnings.catch_warnings():  # audioread's backends import the deprecated aifc/sunau
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", ResourceWarning)  # it leaks a file when it gives up
        import audioread

        with audioread.audio_open(path) as f:
            sr, ch = f.samplerate, f.channels
            raw = b"".join(f)
    y = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    return _resample(y.reshape(-1, ch).mean(axis=1), sr, sample_rate)


def load_audio(path: str | os.PathLike[str], *, sample_rate: int = 8000) -> np.ndarray:
    """Decode *path* to mono float32 samples at *sample_rate*.

    Parameters
    ----------
    path : str or PathLike
    sample_rate : int

    Returns
    -------
    numpy.ndarray
        1-D float32 signal.

    Raises
    ------
    AudioDecodeError
        Nothing could decode the file, or it holds no samples.
    """
    path = os.fspath(path)
    if not Path(path).is_file():
        msg = f"{path}: no such file; check the path."
        raise AudioDecodeError(msg)
    reasons = []
    loaders = [_load_soundfile, _load_ffmpeg, _load_audioread]
    if Path(path).suffix.lower() in LOSSY_EXTENSIONS and shutil.which("ffmpeg"):
        loaders[:2] = [_load_ffmpeg, _load_soundfile]  # ffmpeg's decoders are faster there
    for loader in loaders:
        try:
            y = loader(path, sample_rate)
        except Exception as exc:  # noqa: BLE001 - every decoder fails in its own way
            reasons.append(f"{loader.__name__[6:]}: {str(exc).strip()[:120] or type(exc).__name__}")
            continue
        if y.size == 0:
            reasons.append(f"{loader.__name__[6:]}: no samples")
            continue
        if not np.all(np.isfinite(y[:: max(1, y.size // 4096)])):
            y = np.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0)
        return np.ascontiguousarray(y, dtype=np.float32)
    msg = f"{path}: cannot decode audio ({'; '.join(reasons)}); the file is skipped."
    raise AudioDecodeError(msg)


def find_audio(paths: list[str | os.PathLike[str]]) -> list[str]:
    """Expand files and directories (recursively, audio extensions only) into sorted paths."""
    out: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(str(q) for q in p.rglob("*") if q.suffix.lower() in AUDIO_EXTENSIONS))
        else:
            out.append(str(p))
    return out
