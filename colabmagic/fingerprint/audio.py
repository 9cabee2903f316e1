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
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from colabmagic.errors import ColabMagicError

AUDIO_EXTENSIONS = frozenset(
    ".wav .flac .ogg .oga .opus .mp3 .m4a .aac .mp4 .wma .aif .aiff .au .webm".split()
)


#: Compressed formats that ffmpeg decodes (and resamples) faster than libsndfile + soxr; measured
#: on OGG Vorbis: about 530x realtime per core against 400x.
LOSSY_EXTENSIONS = frozenset(".ogg .oga .opus .mp3 .m4a .aac .mp4 .wma .webm".split())

#: Name prefix of the scratch directories of :func:`load_audio_many` (then the owner's pid).
SCRATCH_PREFIX = "fpdecode-"


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


def _mix_to_mono(y: np.ndarray) -> np.ndarray:
    """Mean of the channels of a ``(frames, channels)`` float32 array.

    Adds the channels column by column (a handful of passes over contiguous memory instead of a
    reduction along the short axis, which NumPy does ~8x slower); for up to 7 channels that is the
    order in which ``y.mean(axis=1)`` adds them, so the result is bit-identical to it.
    """
    n_channels = y.shape[1]
    if n_channels > 7:  # NumPy sums 8 or more by pairs: let it do so
        return y.mean(axis=1)
    out = np.ascontiguousarray(y[:, 0])
    if n_channels == 1:
        return out
    out = out + y[:, 1]
    for c in range(2, n_channels):  # channels, not frames
        out += y[:, c]
    out /= np.float32(n_channels)
    return out


def _load_soundfile(path: str, sample_rate: int) -> np.ndarray:
    import soundfile

    y, sr = soundfile.read(path, dtype="float32", always_2d=True)
    return _resample(_mix_to_mono(y), int(sr), sample_rate)


#: Bytes of compressed audio per second at 48 kbit/s: decoded output is sized from the file size
#: assuming at least this bitrate (the buffer grows if the guess is short).
_MIN_BYTES_PER_SECOND = 6000


def _read_all(pipe: Any, capacity: int) -> np.ndarray:
    """Read an unbuffered pipe to its end into one preallocated byte buffer, grown when full.

    ``readinto`` fills the buffer in place: no list of chunks, no join, no copy at the end.
    """
    buf = np.empty(max(capacity, 1 << 16), dtype=np.uint8)
    n = 0
    while True:
        if n == buf.size:
            bigger = np.empty(2 * buf.size, dtype=np.uint8)
            bigger[:n] = buf
            buf = bigger
        got = pipe.readinto(memoryview(buf)[n:])
        if not got:
            return buf[:n]
        n += got


def _ffmpeg_command(ffmpeg: str, path: str, sample_rate: int) -> list[str]:
    """Decode, mix to mono, resample; ``-flush_packets 0`` writes the pipe in 32 KiB blocks
    (instead of one small write per packet, which costs a wake-up of the reader each)."""
    cmd = [ffmpeg, "-nostdin", "-v", "error", "-threads", "1", "-i", path, "-vn", "-ac", "1"]
    return [*cmd, "-ar", str(sample_rate), "-flush_packets", "0", "-f", "f32le", "-"]


def _load_ffmpeg(path: str, sample_rate: int) -> np.ndarray:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        msg = "ffmpeg is not on PATH"
        raise FileNotFoundError(msg)
    capacity = os.path.getsize(path) * 4 * sample_rate // _MIN_BYTES_PER_SECOND
    # stderr goes to a file: a pipe could fill up (a corrupt stream logs an error per packet)
    # while we block on stdout
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            _ffmpeg_command(ffmpeg, path, sample_rate),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            bufsize=0,
        )
        with proc:
            raw = _read_all(proc.stdout, capacity)
        if proc.returncode != 0:
            err.seek(0)
            lines = err.read().decode(errors="replace").strip().splitlines()
            msg = lines[-1] if lines else f"ffmpeg exited with {proc.returncode}"
            raise RuntimeError(msg)
    return raw[: raw.size - raw.size % 4].view(np.float32)


def _load_audioread(path: str, sample_rate: int) -> np.ndarray:
    with warnings.catch_warnings():  # audioread's backends import the deprecated aifc/sunau
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", ResourceWarning)  # it leaks a file when it gives up
        import audioread

        with audioread.audio_open(path) as f:
            sr, ch = f.samplerate, f.channels
            raw = b"".join(f)
    y = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    return _resample(_mix_to_mono(y.reshape(-1, ch)), sr, sample_rate)


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
        return _finish(y)
    msg = f"{path}: cannot decode audio ({'; '.join(reasons)}); the file is skipped."
    raise AudioDecodeError(msg)


def _finish(y: np.ndarray) -> np.ndarray:
    """Non-finite samples (a broken decoder's) become silence; contiguous float32."""
    if not np.all(np.isfinite(y[:: max(1, y.size // 4096)])):
        y = np.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0)
    return np.ascontiguousarray(y, dtype=np.float32)


#: Files decoded by one ffmpeg process in :func:`load_audio_many`: each process start costs
#: ~60 ms of CPU here (the dynamic linker binds ~200 libraries), a tenth of decoding a track.
FILES_PER_FFMPEG = 4


def _filter_quote(path: str) -> str:
    """*path* as an option value inside a filtergraph (ffmpeg's two levels of escaping)."""
    value = "".join("\\" + c if c in "\\':" else c for c in path)  # the option value
    return "".join("\\" + c if c in "\\'[],;" else c for c in value)  # the graph


def _ffmpeg_many(paths: list[str], sample_rate: int, tmp: str) -> list[np.ndarray]:
    """Decode *paths* with one ffmpeg (``amovie`` sources, one output file each).

    The outputs go through the same ``-ac 1 -ar RATE`` conversion as :func:`_load_ffmpeg`'s, so
    the samples are identical to decoding each file alone. Raises if ffmpeg fails.
    """
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        msg = "ffmpeg is not on PATH"
        raise FileNotFoundError(msg)
    graph = ";".join(f"amovie=filename={_filter_quote(p)}[a{i}]" for i, p in enumerate(paths))
    cmd = [ffmpeg, "-nostdin", "-v", "error", "-filter_complex", graph]
    outs = [os.path.join(tmp, f"{i}.f32") for i in range(len(paths))]
    for i, out in enumerate(outs):
        cmd += ["-map", f"[a{i}]", "-ac", "1", "-ar", str(sample_rate), "-f", "f32le", out]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    if proc.returncode != 0:
        msg = proc.stderr.decode(errors="replace").strip()[-200:]
        raise RuntimeError(msg or f"ffmpeg exited with {proc.returncode}")
    signals = []
    for out in outs:  # read and delete at once: RAM-backed files should not pile up
        signals.append(np.fromfile(out, dtype=np.float32))
        os.unlink(out)
    return signals


def load_audio_many(
    paths: list[str | os.PathLike[str]], *, sample_rate: int = 8000
) -> list[np.ndarray | AudioDecodeError]:
    """Decode several files like :func:`load_audio`, sharing ffmpeg processes among them.

    Lossy files are decoded :data:`FILES_PER_FFMPEG` to an ffmpeg process; a file that such a
    shared run cannot decode (or the whole run, when ffmpeg fails) goes through
    :func:`load_audio` alone, so results and errors are those of :func:`load_audio`.

    Returns
    -------
    list of numpy.ndarray or AudioDecodeError
        One per path, in order: the signal, or the error that :func:`load_audio` raised.
    """
    names = [os.fspath(p) for p in paths]
    out: list[np.ndarray | None] = [None] * len(names)
    shared = [
        i
        for i, p in enumerate(names)
        if Path(p).suffix.lower() in LOSSY_EXTENSIONS and Path(p).is_file()
    ]
    if len(shared) > 1 and shutil.which("ffmpeg"):
        scratch = _scratch_dir()
        _remove_orphans(scratch)
        prefix = f"{SCRATCH_PREFIX}{os.getpid()}-"
        with tempfile.TemporaryDirectory(prefix=prefix, dir=scratch) as tmp:
            for a in range(0, len(shared), FILES_PER_FFMPEG):
                group = shared[a : a + FILES_PER_FFMPEG]
                if len(group) < 2:  # alone: load_audio's pipe is cheaper than a file
                    continue
                try:
                    signals = _ffmpeg_many([names[i] for i in group], sample_rate, tmp)
                except Exception:  # noqa: BLE001, S112 - then one by one, as load_audio does
                    continue
                for i, y in zip(group, signals, strict=True):
                    out[i] = _finish(y) if y.size else None
    pairs = zip(names, out, strict=True)
    return [_load_or_error(p, sample_rate) if y is None else y for p, y in pairs]


def _load_or_error(path: str, sample_rate: int) -> np.ndarray | AudioDecodeError:
    try:
        return load_audio(path, sample_rate=sample_rate)
    except AudioDecodeError as exc:
        return exc


def _remove_orphans(scratch: str | None) -> None:
    """Delete scratch directories of decoders that died without cleaning up (``kill -9``).

    Their names carry the owner's process id; a directory whose owner is gone is removed, so
    RAM-backed ``/dev/shm`` does not keep a killed run's decoded audio until the next reboot.
    """
    root = Path(scratch or tempfile.gettempdir())
    for d in root.glob(f"{SCRATCH_PREFIX}*-*"):
        try:
            pid = int(d.name[len(SCRATCH_PREFIX) :].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _scratch_dir() -> str | None:
    """RAM-backed ``/dev/shm`` for decoded samples when there is one, else the temp dir."""
    shm = "/dev/shm"  # noqa: S108 - a private TemporaryDirectory inside it
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


def find_audio(paths: list[str | os.PathLike[str]]) -> list[str]:
    """Expand files and directories (recursively, audio extensions only) into sorted paths."""
    out: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(str(q) for q in p.rglob("*") if q.suffix.lower() in AUDIO_EXTENSIONS))
        else:
            out.append(str(p))
    return out
