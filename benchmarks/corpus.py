"""Build the fingerprinting scale corpus (issue 14) from Debian's free game soundtracks.

    apt-get install -y --no-install-recommends wesnoth-1.16-music hyperrogue-music nexuiz-music \
        planetblupi-music-ogg singularity-music warzone2100-music drascula-music asc-music \
        fb-music-high freeorion-data supertux-data hedgewars-data neverball-data lincity-ng-data \
        extremetuxracer-data freedroidrpg-data pingus-data frozen-bubble-data
    python benchmarks/corpus.py --out ~/fpcorpus [--files 1000] [--seed 0] [--workers 2]

Steps (every choice drawn from ``--seed``, so a rebuild gives the same corpus):

1. **Sources**: every audio file of those packages that is installed (tracker modules and the
   audio inside ``.pk3`` archives included; ``--source DIR`` replaces them), 30 s or longer.
2. **Distinct tracks**: exact and near-exact duplicates between packages (one soundtrack shipped
   by two games, a re-encode, an excerpt) are found with the tool's own
   :func:`colabmagic.fingerprint.dedup`; each group keeps its longest file.
3. **Held out**: a seeded 10 % of the distinct tracks go to ``heldout/`` (never indexed: queries
   cut from them must match nothing).
4. **Library**: every other track transcoded to MP3 (128 kbit/s, 44.1 kHz, by ffmpeg) in
   ``library/``, then realistic duplicates until the library holds ``--files`` files: another
   bitrate, a trimmed start, -6 dB, another sample rate, another container (OGG, M4A, Opus).
5. **Manifest** (``manifest.json``): the true groups (one per distinct track), each file with its
   variant, parameters and ``offset_s``, the time of the original at which the file starts.
6. **Relations** (:func:`relate`): step 2 judges whole source tracks at a 5 % bar, and missed
   music that two built recordings share (one piece in two packages, rendered once from a
   tracker module and once to OGG; two tracks that open with the same 30 s; a theme and its
   arrangement). Every built original and held-out file is cut into 5 s windows that are
   queried against an index of all of them; two or more windows that match another file at
   one offset, and the band-energy correlation at that offset (:func:`spectral_agreement`:
   the listening check, no fingerprint in it), give ``manifest["related"]`` (pairs of groups)
   and ``heldout[i]["related"]``: ``kind`` "same recording" when >= 80 % of the overlap
   correlates, else "shared passage", with ``offset_s`` and the seconds shared. Groups and
   files stay as built (the held-out draw and every name are unchanged), so rerunning the
   build command on a finished corpus encodes nothing and rewrites only the manifest;
   ``distinct_tracks`` counts a recording held by two groups once.

**Past 1,000 files** (``--files 10000``, issue 18) there are not enough distinct recordings among
the packages, so the first 1,000 files are built exactly as above and the rest are *derived*
recordings: 30-90 s segments of the distinct tracks, each changed by a transform the matcher
must not link (its speed search covers +-5 %): resampled by 0.72, 0.80, 0.88, 1.16, 1.28 or
1.40 (speed and pitch together), or pitch-shifted by -7, -5, -3, +3, +5 or +7 semitones at the
same tempo (rubberband). Neighbouring factors are >= 9 % apart, and the segments of one source
in one transform never overlap; but game music loops, so two segments of one source can hold the
same bars, which under the same transform is the same audio: the relations step checks every
source-and-transform with two or more recordings (:func:`relate_derived`). Each derived
recording gets duplicates like the first 1,000 (another bitrate, trim, gain, sample rate,
container), three per recording, the scale corpus's ratio. Every size is a prefix of the
larger ones: build 1,000, then 3,000, then 10,000 into the same ``--out`` and only the new
files are encoded; the manifest lists the groups in order, so a benchmark can take the first
N files' groups.

``--derived-format flac`` makes the derived files cheap to build and to decode: rendered at the
fingerprinter's 8 kHz mono (the transform too: rubberband on one 8 kHz channel costs ~1/11 of
44.1 kHz stereo) and stored as FLAC; their duplicates are FLAC (trim, gain, another sample
rate), MP3 at 16 kHz (bitrate) or Ogg/Opus/M4A at 8-16 kHz (container). The matcher sees the
same 8 kHz audio either way; only the decoding work per hour differs, so a benchmark must
measure its decode-only floor on the same files. ``mp3`` (the default) encodes them like the
first 1,000.

The corpus is generated, never committed. Files already built are kept (an interrupted build
resumes); the source scan and dedup are cached in ``OUT/sources.json``.

Importable: :func:`source_tracks` lists the distinct source tracks, :func:`build_corpus` builds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: The Debian packages of free game music, in order of preference when two ship the same track.
PACKAGES = (
    "wesnoth-1.16-music",
    "hyperrogue-music",
    "nexuiz-music",
    "planetblupi-music-ogg",
    "singularity-music",
    "warzone2100-music",
    "drascula-music",
    "asc-music",
    "fb-music-high",
    "freeorion-data",
    "supertux-data",
    "hedgewars-data",
    "neverball-data",
    "lincity-ng-data",
    "extremetuxracer-data",
    "freedroidrpg-data",
    "pingus-data",
    "frozen-bubble-data",
)

#: Audio files ffmpeg decodes (libopenmpt for the tracker modules).
SOURCE_EXTENSIONS = frozenset(
    ".ogg .oga .opus .mp3 .flac .wav .m4a .mod .xm .it .s3m .669 .mtm .umx".split()
)
ARCHIVE_EXTENSIONS = frozenset({".pk3", ".zip"})

MIN_SECONDS = 30.0
HELD_OUT = 0.10
#: Duplicate kinds, each drawn with its parameters from the seed.
VARIANTS = ("bitrate", "trim", "gain", "samplerate", "container")
ORIGINAL_BITRATE = 128
ORIGINAL_RATE = 44100


@dataclass
class SourceTrack:
    """One distinct recording among the sources (the longest file of its duplicate group)."""

    path: str
    package: str
    duration: float
    duplicates: list[str] = field(default_factory=list)  # dropped: same recording elsewhere


def _package_files(package: str) -> list[str]:
    """Files that the installed Debian *package* ships (empty when it is not installed)."""
    try:
        out = subprocess.run(
            ["dpkg", "-L", package], capture_output=True, text=True, check=False
        ).stdout
    except FileNotFoundError:  # not Debian
        return []
    return sorted(line for line in out.splitlines() if os.path.isfile(line))


def _extract_archive(archive: str, cache: Path) -> list[str]:
    """Audio members of a zip/pk3 archive, extracted once under *cache*."""
    out = []
    with zipfile.ZipFile(archive) as z:
        for name in sorted(z.namelist()):
            if Path(name).suffix.lower() not in SOURCE_EXTENSIONS or name.endswith("/"):
                continue
            dest = cache / Path(archive).stem / name
            if not dest.exists() or dest.stat().st_size != z.getinfo(name).file_size:
                dest.parent.mkdir(parents=True, exist_ok=True)
                with z.open(name) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            out.append(str(dest))
    return out


def debian_sources(cache: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """``(package, path)`` of every audio file in the installed :data:`PACKAGES`.

    Symbolic links to a file already listed are dropped; archives (``.pk3``) are extracted to
    *cache*.
    """
    seen: set[str] = set()
    out = []
    for pkg in PACKAGES:
        for f in _package_files(pkg):
            ext = Path(f).suffix.lower()
            if ext in ARCHIVE_EXTENSIONS:
                files = _extract_archive(f, Path(cache))
            elif ext in SOURCE_EXTENSIONS:
                files = [f]
            else:
                continue
            for g in files:
                real = os.path.realpath(g)
                if real not in seen:
                    seen.add(real)
                    out.append((pkg, real))
    return out


def _duration(path: str) -> float:
    """Seconds of audio (libsndfile's header when it can, else ffprobe; 0 when unknown)."""
    try:
        import soundfile

        info = soundfile.info(path)
        if info.frames > 0:
            return info.frames / info.samplerate
    except Exception:
        pass
    cmd = ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", path]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
    try:
        return float(out)
    except ValueError:
        return 0.0


def source_tracks(
    sources: Iterable[str | os.PathLike[str]] | None = None,
    *,
    cache: str | os.PathLike[str] | None = None,
    min_seconds: float = MIN_SECONDS,
    workers: int = 2,
) -> list[SourceTrack]:
    """The distinct source tracks: audio of ``min_seconds`` or more, duplicates removed.

    Parameters
    ----------
    sources : iterable of path, optional
        Files or directories (searched recursively) to use instead of the Debian packages.
    cache : path, optional
        Where archives are extracted and the result is cached (``sources.json``); a temporary
        directory otherwise.
    min_seconds : float
        Shorter files (sound effects, jingles) are left out.
    workers : int
        Processes for the dedup.

    Returns
    -------
    list of SourceTrack
        In package order, then path order.
    """
    from colabmagic.fingerprint import dedup

    cache_dir = Path(cache) if cache else Path(os.environ.get("TMPDIR", "/tmp")) / "fpcorpus"
    cache_dir.mkdir(parents=True, exist_ok=True)
    if sources is None:
        found = debian_sources(cache_dir / "archives")
    else:
        found = []
        for s in map(Path, sources):
            files = sorted(s.rglob("*")) if s.is_dir() else [s]
            pkg = s.name if s.is_dir() else s.parent.name
            exts = SOURCE_EXTENSIONS
            found += [(pkg, str(f.resolve())) for f in files if f.suffix.lower() in exts]
    key = [[p, f, os.path.getsize(f)] for p, f in found]  # as JSON gives it back
    cached = cache_dir / "sources.json"
    if cached.exists():
        data = json.loads(cached.read_text())
        if data.get("key") == [list(k) for k in key] and data.get("min_seconds") == min_seconds:
            return [SourceTrack(**t) for t in data["tracks"]]
    durations = {f: _duration(f) for _, f in found}
    long_enough = [(p, f) for p, f in found if durations[f] >= min_seconds]
    package = dict((f, p) for p, f in long_enough)
    order = {f: i for i, (_, f) in enumerate(long_enough)}
    res = dedup([f for _, f in long_enough], workers=workers, backend="numpy")
    dropped: dict[str, list[str]] = {}
    for group in res.groups:  # keep the longest; on a tie, the preferred package's
        keep = max(group, key=lambda f: (round(durations[f], 1), -order[f]))
        dropped[keep] = [f for f in group if f != keep]
    gone = {f for fs in dropped.values() for f in fs} | set(res.skipped_files)
    tracks = [
        SourceTrack(f, package[f], round(durations[f], 3), dropped.get(f, []))
        for _, f in long_enough
        if f not in gone
    ]
    tmp = cached.with_suffix(".tmp")
    payload = {"key": key, "min_seconds": min_seconds, "tracks": [asdict(t) for t in tracks]}
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, cached)
    return tracks


def _variant(kind: str, rng: random.Random, duration: float) -> tuple[dict[str, Any], float, str]:
    """Parameters of one duplicate of *kind*, the time it starts at, and its file extension."""
    if kind == "bitrate":
        return {"bitrate_k": rng.choice([64, 96, 160, 192, 256, 320])}, 0.0, ".mp3"
    if kind == "trim":
        t = round(rng.uniform(2.0, min(20.0, duration / 3)), 3)
        return {"trim_s": t}, t, ".mp3"
    if kind == "gain":
        return {"gain_db": -6.0}, 0.0, ".mp3"
    if kind == "samplerate":
        return {"rate": rng.choice([22050, 32000, 48000])}, 0.0, ".mp3"
    fmt = rng.choice(["ogg", "m4a", "opus"])
    return {"container": fmt}, 0.0, f".{fmt}"


def _ffmpeg_args(params: dict[str, Any]) -> list[str]:
    """Encoder options of a duplicate (see :func:`_variant`)."""
    if params.get("format") == "flac":
        return _cheap_args(params)
    args = ["-ac", "2"]
    if "max_s" in params:
        args += ["-t", f"{params['max_s']:.3f}"]
    if "trim_s" in params:
        args = ["-ss", f"{params['trim_s']:.3f}", *args]
    if "gain_db" in params:
        args += ["-af", f"volume={params['gain_db']}dB"]
    fmt = params.get("container", "mp3")
    rate = params.get("rate", 48000 if fmt == "opus" else ORIGINAL_RATE)
    args += ["-ar", str(rate)]
    if fmt == "ogg":
        return [*args, "-c:a", "libvorbis", "-q:a", "4"]
    if fmt == "m4a":
        return [*args, "-c:a", "aac", "-b:a", "128k"]
    if fmt == "opus":
        return [*args, "-c:a", "libopus", "-b:a", "96k"]
    bitrate = params.get("bitrate_k", ORIGINAL_BITRATE)
    # LAME's fastest mode (-q 9): a third less CPU than its default, the same bitrate
    return [*args, "-c:a", "libmp3lame", "-b:a", f"{bitrate}k", "-compression_level", "9"]


def _cheap_variant(
    kind: str, rng: random.Random, duration: float
) -> tuple[dict[str, Any], float, str]:
    """:func:`_variant` for ``--derived-format flac``: mono, 8-16 kHz, cheap to encode/decode."""
    params, offset, ext = _variant(kind, rng, duration)
    params = {**params, "format": "flac"}
    if kind == "bitrate":
        params["bitrate_k"] = rng.choice([24, 32, 48, 64])
    if kind == "samplerate":
        params["rate"] = rng.choice([11025, 16000, 22050])
    if kind in ("trim", "gain", "samplerate"):
        ext = ".flac"
    return params, offset, ext


def _cheap_args(params: dict[str, Any]) -> list[str]:
    """Encoder options of a ``--derived-format flac`` duplicate (see :func:`_cheap_variant`)."""
    args = ["-ac", "1"]
    if "trim_s" in params:
        args = ["-ss", f"{params['trim_s']:.3f}", *args]
    if "gain_db" in params:
        args += ["-af", f"volume={params['gain_db']}dB"]
    fmt = params.get("container")
    if fmt == "ogg":
        return [*args, "-ar", "16000", "-c:a", "libvorbis", "-q:a", "2"]
    if fmt == "m4a":
        return [*args, "-ar", "16000", "-c:a", "aac", "-b:a", "48k"]
    if fmt == "opus":
        return [*args, "-ar", "16000", "-c:a", "libopus", "-b:a", "24k"]
    if "bitrate_k" in params:
        return [*args, "-ar", "16000", "-c:a", "libmp3lame", "-b:a", f"{params['bitrate_k']}k",
                "-compression_level", "9"]  # fmt: skip
    return [*args, "-ar", str(params.get("rate", CHEAP_RATE)), "-c:a", "flac"]


def _encode(src: str, dest: Path, params: dict[str, Any]) -> None:
    """Transcode *src* to *dest* (written under a temporary name, then renamed: resumable).

    A source that ffmpeg cannot read but libsndfile can (a few OGG files of the packages) goes
    through a temporary WAV at its own rate.
    """
    if dest.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        _ffmpeg_encode(src, dest, params)
    except RuntimeError:
        import soundfile

        y, sr = soundfile.read(src, dtype="float32", always_2d=True)
        wav = dest.with_name(f".tmp-{dest.stem}.wav")
        soundfile.write(wav, y, sr, subtype="FLOAT")
        try:
            _ffmpeg_encode(str(wav), dest, params)
        finally:
            wav.unlink(missing_ok=True)


def _ffmpeg_encode(src: str, dest: Path, params: dict[str, Any]) -> None:
    tmp = dest.with_name(f".tmp-{dest.name}")
    args = _ffmpeg_args(params)
    pre, post = (args[:2], args[2:]) if "trim_s" in params else ([], args)
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-threads", "1", *pre, "-i", src, "-vn"]
    cmd += [*post, "-map_metadata", "-1", "-f", _muxer(dest), str(tmp)]
    proc = _ffmpeg(cmd, src, dest)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        msg = f"ffmpeg could not encode {src} -> {dest.name}: {last}"
        raise RuntimeError(msg)
    os.replace(tmp, dest)


def _ffmpeg(cmd: list[str], src: str, dest: Path) -> subprocess.CompletedProcess[str]:
    """Run *cmd*; if ffmpeg cannot read *src*, retry from a WAV that libsndfile decoded."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode == 0 or src.endswith(".wav"):
        return proc
    # a few Debian OGGs have headers ffmpeg rejects and libsndfile reads
    wav = dest.with_name(f".tmp-{dest.stem}.src.wav")
    try:
        import soundfile

        y, sr = soundfile.read(src, dtype="float32", always_2d=True)
        soundfile.write(wav, y, sr, subtype="FLOAT")
        cmd = [str(wav) if c == src else c for c in cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=False)
    except (ImportError, RuntimeError, OSError):
        return proc
    finally:
        wav.unlink(missing_ok=True)


def _muxer(dest: Path) -> str:
    return {".mp3": "mp3", ".ogg": "ogg", ".m4a": "ipod", ".opus": "opus", ".flac": "flac"}[
        dest.suffix
    ]


#: Library size built exactly as the issue-14 scale corpus; past it, derived recordings.
BASE_FILES = 1000
#: Duplicates made of each derived recording (the scale corpus has ~3 per track).
DERIVED_DUPLICATES = 3
#: Transforms the matcher must not link, as (kind, factor): speed factor, or pitch ratio.
RESAMPLE_FACTORS = (0.72, 0.80, 0.88, 1.16, 1.28, 1.40)
PITCH_SEMITONES = (-7, -5, -3, 3, 5, 7)
DERIVED_SECONDS = (30.0, 90.0)
#: ``--derived-format``: how derived recordings and their duplicates are stored.
DERIVED_FORMATS = ("mp3", "flac")
#: Sample rate of ``--derived-format flac`` files: the fingerprinter's (see module docstring).
CHEAP_RATE = 8000


def _transforms() -> list[tuple[str, float]]:
    return [("resample", f) for f in RESAMPLE_FACTORS] + [
        ("pitch", round(2 ** (k / 12), 6)) for k in PITCH_SEMITONES
    ]


def derived_segments(tracks: list[SourceTrack], seed: int, n: int) -> list[dict[str, Any]]:
    """The first *n* derived recordings (the same first ones for every *n*: prefix-stable).

    Every (source, transform) pair is tiled with disjoint source segments whose output lasts
    30-90 s; all the tiles are shuffled with the seed and taken in that order.
    """
    rng = random.Random(f"{seed}-derived")
    pool = []
    for s_i, t in enumerate(tracks):
        for kind, factor in _transforms():
            stretch = factor if kind == "resample" else 1.0  # source seconds per output second
            pos = rng.uniform(0.0, 2.0)
            while True:
                out_s = round(rng.uniform(*DERIVED_SECONDS), 3)
                length = out_s * stretch
                if pos + length > t.duration - 0.5:
                    break
                pool.append(
                    {
                        "source": t.path,
                        "source_index": s_i,
                        "kind": kind,
                        "factor": factor,
                        "start_s": round(pos, 3),
                        "source_s": round(length, 3),
                        "duration": out_s,
                    }
                )
                pos += length + rng.uniform(0.5, 5.0)
    rng.shuffle(pool)
    if n > len(pool):
        msg = f"only {len(pool)} derived recordings can be made from these sources; ask for fewer."
        raise SystemExit(msg)
    return pool[:n]


def _derive(seg: dict[str, Any], dest: Path) -> None:
    """Render one derived recording: cut, transform, encode as the library's originals (MP3),
    or at 8 kHz mono as FLAC (``--derived-format flac``, a ``.flac`` *dest*)."""
    if dest.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".tmp-{dest.name}")
    cheap = dest.suffix == ".flac"
    rate = CHEAP_RATE if cheap else ORIGINAL_RATE
    if seg["kind"] == "resample":
        filt = f"aresample={rate},asetrate={rate * seg['factor']:.3f},aresample={rate}"
    else:
        filt = f"aresample={rate},rubberband=pitch={seg['factor']}"
    if cheap:
        filt = f"aformat=channel_layouts=mono,{filt}"  # downmixed first: 1 channel to shift
        codec = ["-ac", "1", "-ar", str(rate), "-c:a", "flac", "-f", "flac"]
    else:
        codec = ["-ac", "2", "-ar", str(rate), "-c:a", "libmp3lame", "-b:a",
                 f"{ORIGINAL_BITRATE}k", "-compression_level", "9", "-f", "mp3"]  # fmt: skip
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-threads", "1",
           "-ss", f"{seg['start_s']:.3f}", "-t", f"{seg['source_s']:.3f}", "-i", seg["source"],
           "-vn", "-af", filt, *codec, "-map_metadata", "-1", str(tmp)]  # fmt: skip
    proc = _ffmpeg(cmd, seg["source"], dest)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        msg = f"ffmpeg could not derive {dest.name} from {seg['source']}: {last}"
        raise RuntimeError(msg)
    os.replace(tmp, dest)


def _slug(track: SourceTrack, n: int) -> str:
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(track.path).stem)
    return f"{n:04d}-{track.package.split('-')[0]}-{stem[:40]}"


def build_corpus(
    out: str | os.PathLike[str],
    *,
    files: int = 1000,
    seed: int = 0,
    sources: Iterable[str | os.PathLike[str]] | None = None,
    workers: int = 2,
    held_out: float = HELD_OUT,
    min_seconds: float = MIN_SECONDS,
    max_seconds: float | None = None,
    log: Callable[[str], None] | None = None,
    base_files: int = BASE_FILES,
    derived_format: str = "mp3",
    relations: bool = True,
) -> dict[str, Any]:
    """Build (or finish building) the corpus in *out*; returns the manifest it writes.

    Parameters
    ----------
    out : path
        Output directory: ``library/``, ``heldout/``, ``manifest.json``, ``sources.json``.
    files : int
        Files in ``library/`` (originals plus duplicates); at least one per indexed track.
    seed : int
        Held-out choice, duplicate kinds and their parameters.
    sources : iterable of path, optional
        Audio files/directories instead of the Debian packages (tests use a few synthetic ones).
    workers : int
        Concurrent ffmpeg encoders (and dedup processes).
    held_out : float
        Share of the distinct tracks kept out of the library (at least one when there are two).
    min_seconds : float
        Shorter source files are left out.
    max_seconds : float, optional
        Keep only the first *max_seconds* of every track (a smaller corpus of as many files,
        quicker to build and to measure on a busy machine); whole tracks by default.
    log : callable, optional
        Receives progress lines.
    base_files : int
        Files made as the scale corpus (originals and their duplicates); past this many the
        rest are derived recordings (see the module docstring).
    derived_format : {"mp3", "flac"}
        How the derived recordings and their duplicates are stored (see the module docstring).
    relations : bool
        Record which built recordings share music (:func:`relate`: a few minutes for 1,000
        files; it reads the built files, so rerunning a finished build redoes only this and
        the manifest).
    """
    if derived_format not in DERIVED_FORMATS:
        msg = f"--derived-format {derived_format!r}: use one of {', '.join(DERIVED_FORMATS)}."
        raise SystemExit(msg)
    say = log or (lambda _s: None)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tracks = source_tracks(sources, cache=root, min_seconds=min_seconds, workers=workers)
    if len(tracks) < 2:
        msg = f"{len(tracks)} distinct source tracks of >= {min_seconds:g} s: install the packages."
        raise SystemExit(msg)
    say(
        f"{len(tracks)} distinct tracks ({sum(t.duration for t in tracks) / 3600:.2f} h) "
        f"in {time.perf_counter() - t0:.0f} s"
    )
    rng = random.Random(seed)
    n_held = max(1, round(held_out * len(tracks))) if held_out > 0 else 0
    held = set(rng.sample(range(len(tracks)), n_held))
    indexed = [i for i in range(len(tracks)) if i not in held]
    if files < len(indexed):
        msg = f"--files {files} is below the {len(indexed)} indexed tracks; ask for more."
        raise SystemExit(msg)
    total_files, files = files, min(files, max(base_files, len(indexed)))
    plan: list[tuple[str, Path, dict[str, Any]]] = []  # (source, dest, params)
    groups = []
    cut = {"max_s": max_seconds} if max_seconds else {}

    def length(t: SourceTrack) -> float:
        return round(min(t.duration, max_seconds or t.duration), 3)

    for g, i in enumerate(indexed):
        t = tracks[i]
        dest = root / "library" / f"{_slug(t, i)}.mp3"
        plan.append((t.path, dest, cut))
        entry = {"variant": "original", "params": {}, "offset_s": 0.0}
        groups.append(
            {
                "group": g,
                "source": t.path,
                "package": t.package,
                "duration": length(t),
                "files": [{"path": str(dest.relative_to(root)), **entry}],
            }
        )
    kinds = {g: rng.sample(VARIANTS, len(VARIANTS)) for g in range(len(groups))}
    made = {g: 0 for g in range(len(groups))}
    n = len(groups)
    while n < files:  # rounds over a seeded order of the tracks, one duplicate each
        for g in rng.sample(range(len(groups)), len(groups)):
            if n >= files:
                break
            kind = kinds[g][made[g] % len(VARIANTS)]
            params, offset, ext = _variant(kind, rng, groups[g]["duration"])
            made[g] += 1
            original = root / groups[g]["files"][0]["path"]
            dest = original.with_name(f"{original.stem}.dup{made[g]}-{kind}{ext}")
            plan.append((str(original), dest, params))
            groups[g]["files"].append(
                {
                    "path": str(dest.relative_to(root)),
                    "variant": kind,
                    "params": params,
                    "offset_s": offset,
                }
            )
            n += 1
    derived_plan = _plan_derived(root, tracks, groups, seed, total_files - n, derived_format)
    n += sum(len(g["files"]) for g in groups[len(indexed) :])
    heldout = []
    for i in sorted(held):
        t = tracks[i]
        dest = root / "heldout" / f"{_slug(t, i)}.mp3"
        plan.append((t.path, dest, cut))
        heldout.append(
            {
                "path": str(dest.relative_to(root)),
                "source": t.path,
                "package": t.package,
                "duration": length(t),
            }
        )
    # originals first (the duplicates are made from them), then everything else
    n_first = len(indexed)  # not len(groups): the derived groups were appended since
    todo = [p for p in plan if not p[1].exists()]
    say(f"{len(plan)} files planned, {len(todo)} to encode with {workers} ffmpeg processes")
    t1 = time.perf_counter()
    for part in (plan[:n_first], plan[n_first:]):
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for k, _ in enumerate(pool.map(lambda p: _encode(*p), part), 1):
                if k % 100 == 0:
                    say(f"  {k}/{len(part)} encoded ({time.perf_counter() - t1:.0f} s)")
    if derived_plan:
        say(f"{len(derived_plan)} derived files (recordings and their duplicates)")
    for part in (
        [p for p in derived_plan if p[2] is None],  # the recordings, then their duplicates
        [p for p in derived_plan if p[2] is not None],
    ):
        with ThreadPoolExecutor(max(1, workers)) as pool:
            work = (
                (lambda p: _derive(p[0], p[1])) if part and part[0][2] is None
                else (lambda p: _encode(str(p[0]), p[1], p[2]))
            )  # fmt: skip
            for k, _ in enumerate(pool.map(work, part), 1):
                if k % 200 == 0:
                    say(f"  {k}/{len(part)} derived ({time.perf_counter() - t1:.0f} s)")
    manifest = {
        "seed": seed,
        "distinct_tracks": len(tracks),
        "indexed_tracks": len(groups),
        "held_out_tracks": len(heldout),
        "library_files": n,
        "max_seconds": max_seconds,
        "derived_format": derived_format,
        "hours": round(sum(length(t) for t in tracks) / 3600, 3),
        "library_hours": round(_library_seconds(groups) / 3600, 3),
        "packages": sorted({t.package for t in tracks}),
        "groups": groups,
        "heldout": heldout,
        "dropped_duplicates": {t.path: t.duplicates for t in tracks if t.duplicates},
    }
    if relations:
        t2 = time.perf_counter()
        relate(root, manifest, workers=workers)
        say(
            f"relations: {len(manifest['related'])} pairs of groups and "
            f"{sum(len(h.get('related', [])) for h in heldout)} held-out links share music "
            f"({time.perf_counter() - t2:.0f} s)"
        )
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, root / "manifest.json")
    say(
        f"corpus: {n} library files ({manifest['library_hours']:.1f} h), {len(heldout)} held "
        f"out, {manifest['distinct_tracks']} distinct tracks ({manifest['hours']:.1f} h) in "
        f"{time.perf_counter() - t0:.0f} s"
    )
    return manifest


def _plan_derived(
    root: Path,
    tracks: list[SourceTrack],
    groups: list[dict[str, Any]],
    seed: int,
    extra: int,
    derived_format: str = "mp3",
) -> list[tuple[Any, Path, dict[str, Any] | None]]:
    """Append derived groups to *groups* until they add *extra* files; return what to render.

    Items are ``(segment, dest, None)`` for a derived recording and ``(original, dest,
    params)`` for a duplicate of one.
    """
    if extra <= 0:
        return []
    per = 1 + DERIVED_DUPLICATES
    segments = derived_segments(tracks, seed, -(-extra // per))
    plan: list[tuple[Any, Path, dict[str, Any] | None]] = []
    left = extra
    for d, seg in enumerate(segments):
        g = len(groups)
        tag = f"{seg['kind']}{seg['factor']:g}"
        stem = _slug(tracks[seg["source_index"]], seg["source_index"])[:40]
        dest = root / "derived" / f"{d:05d}-{stem}-{tag}-at{seg['start_s']:.0f}.{derived_format}"
        plan.append((seg, dest, None))
        files = [{"path": str(dest.relative_to(root)), "variant": "original", "params": {},
                  "offset_s": 0.0}]  # fmt: skip
        rng = random.Random(f"{seed}-derived-{d}")
        kinds = rng.sample(VARIANTS, len(VARIANTS))
        for k in range(min(DERIVED_DUPLICATES, left - 1)):
            variant = _cheap_variant if derived_format == "flac" else _variant
            params, offset, ext = variant(kinds[k], rng, seg["duration"])
            dup = dest.with_name(f"{dest.stem}.dup{k + 1}-{kinds[k]}{ext}")
            plan.append((dest, dup, params))
            files.append({"path": str(dup.relative_to(root)), "variant": kinds[k],
                          "params": params, "offset_s": offset})  # fmt: skip
        left -= len(files)
        groups.append(
            {"group": g, "source": seg["source"], "derived": {k: seg[k] for k in (
                "kind", "factor", "start_s", "source_s")}, "package": "derived",
             "duration": seg["duration"], "files": files}
        )  # fmt: skip
    return plan


#: Relations: windows of each built original (and held-out file) queried against all of them.
RELATION_WINDOW_S, RELATION_HOP_S = 5.0, 2.5
#: Windows that must match another file at one offset (within 0.1 s) to call the music shared:
#: a chance match does not repeat at the same offset.
RELATION_MIN_WINDOWS = 2
#: Share of the overlap whose 1 s blocks correlate (:func:`spectral_agreement`) for the two to be
#: called the same recording rather than a shared passage.
SAME_RECORDING_COVERAGE = 0.8


def _band_frames(y: Any, sr: int = 8000) -> Any:
    """Log energy in 32 bands (50 Hz-4 kHz) per 32 ms frame, each band standardised over time:
    a coarse picture of the music that shares nothing with the fingerprint's peaks and hashes."""
    import numpy as np

    n, hop = 512, 256
    if len(y) < n:
        return np.zeros((0, 32))
    frames = np.lib.stride_tricks.sliding_window_view(y, n)[::hop] * np.hanning(n)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    edges = np.unique(np.geomspace(4, n // 2, 33).astype(int))
    bands = np.log(np.add.reduceat(power, edges[:-1], axis=1)[:, : len(edges) - 1] + 1e-9)
    return (bands - bands.mean(0)) / (bands.std(0) + 1e-9)


#: A 1 s block of the overlap counts as shared music when its band energies correlate this well.
SHARED_BLOCK_R = 0.3


def spectral_agreement(
    ya: Any, yb: Any, offset_s: float, sr: int = 8000
) -> tuple[float, float, float, float]:
    """The listening check of a relation, independent of the fingerprint: how the band energies
    of *ya* and *yb* correlate where *yb* starts *offset_s* into *ya*.

    Returns the correlation over the whole overlap, the highest at eight other offsets (1.3-6.1 s
    away: the null; same music gives ~0.4-1 against ~0-0.1), the seconds of 1 s blocks that
    correlate above :data:`SHARED_BLOCK_R`, and the seconds of overlap.
    """
    import numpy as np

    fa, fb = _band_frames(ya, sr), _band_frames(yb, sr)
    per_s = sr / 256

    def aligned(d: float) -> tuple[Any, Any]:
        k = round(d * per_s)
        a0, b0 = max(k, 0), max(-k, 0)
        m = max(min(len(fa) - a0, len(fb) - b0), 0)
        return fa[a0 : a0 + m], fb[b0 : b0 + m]

    def corr(x: Any, y: Any) -> float:
        return float(np.corrcoef(x.ravel(), y.ravel())[0, 1]) if len(x) >= 16 else 0.0

    x, y = aligned(offset_s)
    null = max(corr(*aligned(offset_s + s)) for s in (-6.1, -4.3, -2.9, -1.3, 1.3, 2.9, 4.3, 6.1))
    block = int(per_s)
    shared = sum(
        corr(x[i : i + block], y[i : i + block]) > SHARED_BLOCK_R
        for i in range(0, len(x) - block + 1, block)
    )
    return corr(x, y), null, float(shared), len(x) / per_s


#: The read-only index that :func:`_window_hits` matches against (set before a worker pool forks).
_RELATION_INDEX: Any = None


def _window_hits(item: tuple[str, str]) -> tuple[str, list[tuple[str, float, float]]]:
    """``(key, [(other track, window start s, offset of key in it s), ...])`` for the 5 s windows
    of one file (``(key, path)``) matched against :data:`_RELATION_INDEX` at the unchanged
    speed."""
    from colabmagic.fingerprint import load_audio, match

    k, path = item
    sr = 8000
    y = load_audio(path, sample_rate=sr)
    w, h = int(RELATION_WINDOW_S * sr), int(RELATION_HOP_S * sr)
    rows = []
    for a in range(0, max(len(y) - w, 0) + 1, h):
        for m in match(_RELATION_INDEX, y[a : a + w], top_k=5):
            if m.track != k and m.speed == 1.0:
                rows.append((m.track, a / sr, a / sr - m.offset_s))
    return k, rows


def find_related(
    root: Path, items: list[tuple[str, str]], *, workers: int = 2
) -> list[dict[str, Any]]:
    """Pairs of the built files *items* (``(key, path relative to root)``) that hold the same
    music: each file's 5 s windows (every 2.5 s) are queried against an index of all of them.

    Source dedup works on whole tracks at a 5 % bar; this looks at what the corpus holds (the
    cut that was encoded) window by window, so a shared intro, one piece rendered twice (a
    tracker module and its OGG), or a re-used theme is caught too. Each pair comes with the
    offset (*b* starts ``offset_s`` into *a*), how many windows agree, the share of the overlap
    they cover (``kind``: "same recording" at >= :data:`SAME_RECORDING_COVERAGE`, else "shared
    passage") and :func:`spectral_agreement` at that offset against its null. The windows are
    matched on *workers* forked processes, a file to each (the same pairs as one process).
    """
    import multiprocessing
    import tempfile

    import numpy as np

    from colabmagic.fingerprint import Index, load_audio

    global _RELATION_INDEX
    sr = 8000
    paths = {k: str(root / p) for k, p in items}
    hits: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="corpus-rel-") as tmp:
        idx = Index(Path(tmp) / "db")
        idx.add(list(paths.items()), workers=workers, backend="numpy")
        _RELATION_INDEX = Index(Path(tmp) / "db", readonly=True)
        # the longest files first, so that two workers finish together
        todo = sorted(paths.items(), key=lambda kp: -os.path.getsize(kp[1]))
        try:
            if workers > 1 and len(todo) > 1:
                with multiprocessing.get_context("fork").Pool(workers) as pool:
                    found = list(pool.imap_unordered(_window_hits, todo))
            else:
                found = [_window_hits(kp) for kp in todo]
        finally:
            _RELATION_INDEX = None
    for k, rows in sorted(found):  # per file, its windows in order: as one process finds them
        for track, t, off in rows:
            hits.setdefault((k, track), []).append((t, off))
    audio: dict[str, Any] = {}

    def decoded(k: str) -> Any:
        if k not in audio:
            audio[k] = load_audio(paths[k], sample_rate=sr)
        return audio[k]

    out = []
    for (ka, kb), found in sorted(hits.items()):
        offs = np.array([o for _, o in found])
        support = [(int((np.abs(offs - o) <= 0.1).sum()), -abs(o), o) for o in offs]
        n_best, _, d = max(support)  # the offset most windows agree on (the nearest 0 on a tie)
        if n_best < RELATION_MIN_WINDOWS:
            continue
        agree = [s for s, o in found if abs(o - d) <= 0.1]
        d = float(np.median([o for _, o in found if abs(o - d) <= 0.1]))
        r, null, shared, overlap = spectral_agreement(decoded(ka), decoded(kb), d, sr)
        coverage = shared / max(overlap, 1e-9)
        kind = "same recording" if coverage >= SAME_RECORDING_COVERAGE else "shared passage"
        out.append(
            {
                "a": ka,
                "b": kb,
                "offset_s": round(d, 3),
                "windows": len(agree),
                "kind": kind,
                "shared_s": round(shared, 1),
                "overlap_s": round(overlap, 1),
                "spectral_r": round(r, 3),
                "spectral_null": round(null, 3),
            }
        )
    return _symmetric(out)


def _symmetric(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per unordered pair: the direction with more agreeing windows (a before b on a
    tie), so *a*'s windows are the evidence."""
    best: dict[frozenset[str], dict[str, Any]] = {}
    for p in pairs:
        k = frozenset((p["a"], p["b"]))
        if k not in best or (p["windows"], p["b"]) > (best[k]["windows"], best[k]["b"]):
            best[k] = p
    return sorted(best.values(), key=lambda p: (p["a"], p["b"]))


def relate(root: Path, manifest: dict[str, Any], workers: int = 2) -> dict[str, Any]:
    """Record in *manifest* which built recordings share music (see :func:`find_related`).

    Groups stay as built (so the held-out draw and every file name stay the same and a built
    corpus can be re-related without re-encoding); ``manifest["related"]`` lists pairs of
    indexed groups, ``heldout[i]["related"]`` the indexed groups a held-out track shares music
    with, and ``distinct_tracks`` counts a recording that is in two groups once.
    """
    items = [(f"g{g['group']}", g["files"][0]["path"]) for g in manifest["groups"]
             if g.get("package") != "derived"]  # fmt: skip
    items += [(f"h{i}", h["path"]) for i, h in enumerate(manifest["heldout"])]
    pairs = find_related(root, items, workers=workers)
    related = []
    for h in manifest["heldout"]:
        h.pop("related", None)
    for p in pairs:
        a, b = p["a"], p["b"]
        if a[0] == "h" and b[0] == "h":
            continue  # two held-out tracks: both negatives either way
        if a[0] == "h" or b[0] == "h":
            held, grp, sign = (a, b, -1) if a[0] == "h" else (b, a, 1)
            entry = {k: p[k] for k in ("kind", "windows", "shared_s", "overlap_s")}
            entry |= {"group": int(grp[1:]), "offset_s": sign * p["offset_s"]}
            entry |= {k: p[k] for k in ("spectral_r", "spectral_null")}
            manifest["heldout"][int(held[1:])].setdefault("related", []).append(entry)
            continue  # offset_s: the held-out track starts that far into the group's
        entry = {"groups": [int(a[1:]), int(b[1:])], **{k: v for k, v in p.items()
                                                         if k not in ("a", "b")}}  # fmt: skip
        related.append(entry)
    manifest["related"] = related
    parent = {g["group"]: g["group"] for g in manifest["groups"]}

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    merged = 0
    for r in related:
        if r["kind"] == "same recording" and find(r["groups"][0]) != find(r["groups"][1]):
            parent[find(r["groups"][1])] = find(r["groups"][0])
            merged += 1
    held_same = sum(
        any(r["kind"] == "same recording" for r in h.get("related", []))
        for h in manifest["heldout"]
    )
    manifest["distinct_tracks_as_built"] = manifest.get(
        "distinct_tracks_as_built", manifest["distinct_tracks"]
    )
    manifest["distinct_tracks"] = manifest["distinct_tracks_as_built"] - merged - held_same
    manifest["related"] += relate_derived(root, manifest, workers=workers)
    return manifest


def relate_derived(root: Path, manifest: dict[str, Any], workers: int = 2) -> list[dict[str, Any]]:
    """Pairs of derived recordings that share music: ``related`` entries like :func:`relate`'s.

    Segments of one source never overlap, but game music loops: two segments of one track can
    hold the same bars, and under the same transform they are the same audio (at 3,000 files,
    16 pairs of groups, all from 30-min looping tracks; dedup rightly linked them). Only
    recordings that share their source and transform with another are checked
    (:func:`find_related` on their originals): a different transform changes the audio beyond
    what the matcher links, and the sources were deduplicated before.
    """
    buckets: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for g in manifest["groups"]:
        d = g.get("derived")
        if d:
            buckets.setdefault((g["source"], d["kind"], d["factor"]), []).append(g)
    items = [(f"g{g['group']}", g["files"][0]["path"])
             for gs in buckets.values() if len(gs) > 1 for g in gs]  # fmt: skip
    if not items:
        return []
    return [
        {"groups": [int(p["a"][1:]), int(p["b"][1:])],
         **{k: v for k, v in p.items() if k not in ("a", "b")}}
        for p in find_related(root, items, workers=workers)
    ]  # fmt: skip


def _library_seconds(groups: list[dict[str, Any]]) -> float:
    return sum(g["duration"] - f["offset_s"] for g in groups for f in g["files"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--files", type=int, default=1000, help="library files [1000]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="concurrent encoders [2]")
    ap.add_argument("--source", action="append", help="audio dir/file instead of the packages")
    ap.add_argument("--min-seconds", type=float, default=MIN_SECONDS)
    ap.add_argument("--max-seconds", type=float, help="keep only the first S s of each track")
    ap.add_argument(
        "--base-files", type=int, default=BASE_FILES,
        help=f"files built as the scale corpus; past them, derived recordings [{BASE_FILES}]",
    )  # fmt: skip
    ap.add_argument(
        "--derived-format", choices=DERIVED_FORMATS, default="mp3",
        help="derived files past --base-files: MP3 like the base, or cheap 8 kHz FLAC [mp3]",
    )  # fmt: skip
    ap.add_argument(
        "--no-relations",
        action="store_true",
        help="skip the check of which built recordings share music (manifest 'related')",
    )
    args = ap.parse_args(argv)
    build_corpus(
        args.out,
        files=args.files,
        seed=args.seed,
        sources=args.source,
        workers=args.workers,
        min_seconds=args.min_seconds,
        max_seconds=args.max_seconds,
        log=lambda s: print(s, file=sys.stderr, flush=True),
        base_files=args.base_files,
        derived_format=args.derived_format,
        relations=not args.no_relations,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
