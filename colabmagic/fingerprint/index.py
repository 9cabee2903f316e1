"""The on-disk fingerprint index: a manifest plus sorted, memory-mapped hash/posting shards.

Layout of an index directory::

    manifest.json          tracks (number, id, path, duration, content hash), shards, removed
    shards/<name>/hashes.npy    uint32, sorted
    shards/<name>/postings.npy  uint64, ``track_number << 32 | anchor_frame``, same order
    shards/<name>/peaks.npy     uint64, sorted peak keys ``track << 36 | time << 10 | freq``
                                (quarter frames and bins), for verifying candidates
    index.lock             held by the one writer at a time

Files are written once and never modified. An add writes new shards into a temporary directory,
renames it into place, then replaces ``manifest.json`` atomically; a writer killed at any moment
leaves the previous manifest, which only names complete shards. Readers need no lock and may be
many processes.

Bounded memory at any scale: an add streams. Every finished file's fingerprints wait in a small
buffer that becomes a shard (and a new manifest) every ``shard_hashes`` hashes or
``commit_seconds`` seconds, so Ctrl-C or a crash loses at most that much work and a rerun skips
the committed files by content hash. Shards are merged as they pile up (a few at a time, like an
LSM tree; at the end of a large add into one) by a *streaming* k-way merge: key range by key
range, each step at most :data:`MERGE_STEP` entries, written sequentially to the new ``.npy``
files. Nothing ever holds all fingerprints in RAM; the writer's memory is the buffer plus one
merge step (about 100 MB), whatever the size of the index.

Why NumPy ``.npy`` files read with ``mmap`` rather than LMDB or SQLite: a lookup is a binary
search over sorted ``uint32`` hashes and a gather of ``uint64`` postings, which NumPy runs
vectorised over every query hash at once straight from the page cache (only the pages touched are
read). ``benchmarks/index_store.py``, 2M rows, queries of 1,000 hashes, warm cache, median
(2 shared cores, load 10-13): memmap 0.98 ms and 12.0 bytes per row; LMDB (dup-sorted keys,
``getmulti``) 15 ms and 41 bytes; SQLite (index on the hash, one ``IN (...)`` query) 56 ms and
30 bytes. The embedded stores pay per key in Python and store each row with its own overhead;
they would only help for in-place updates, which this write-once design does not need.

Format 3 (this one) adds per-shard sizes and track ranges to the manifest, which the streaming
merge plans with; format 2 indexes must be rebuilt (one clear error says so).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from colabmagic.errors import ColabMagicError, ParameterError
from colabmagic.fingerprint._xp import Backend
from colabmagic.fingerprint.audio import AudioDecodeWarning, content_hash, find_audio
from colabmagic.fingerprint.fingerprinter import Fingerprinter
from colabmagic.fingerprint.hashing import HASH_BITS
from colabmagic.fingerprint.pipeline import Extracted, Job, extract_files, now
from colabmagic.fingerprint.verify import F_BITS, T_BITS, reference_keys

#: ``(record, hashes, times)`` or ``(record, hashes, times, peaks)`` of one track to add.
Pending = tuple[Any, ...]

MANIFEST = "manifest.json"
FORMAT_VERSION = 3
#: Most entries one step of a streaming merge reads. A step holds ~50 B per entry at its peak
#: (the slices, their stable sort order and the reordered copies): 1M entries is ~50 MB, and the
#: steps are still long sequential runs (12 MB of hashes and postings written per step).
MERGE_STEP = 1 << 20
#: Shards of the same size class merged together while an add runs (LSM fan-out).
MERGE_FANOUT = 8
TIME_MASK = np.uint64(0xFFFFFFFF)
#: Most postings a query hash may have and still be looked up (see :attr:`Index.stop_postings`).
MAX_POSTINGS = 256
#: Shards smaller than this keep their binary searches (the table would outweigh them).
TABLE_MIN_HASHES = 1 << 16


class FingerprintIndexError(ColabMagicError):
    """The index directory is missing, not an index, or was written by another format."""


@dataclass(frozen=True, slots=True)
class Track:
    """One indexed recording (slots: an index holds one per file, ~0.5 KB each with its
    manifest entry, 10,000 files ~5 MB)."""

    number: int
    id: str
    path: str
    duration: float
    content_hash: str
    n_hashes: int
    shard: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.number,
            "id": self.id,
            "path": self.path,
            "duration": self.duration,
            "content_hash": self.content_hash,
            "n_hashes": self.n_hashes,
            "shard": self.shard,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Track:
        # one string object where values repeat: a few shard names; path == id (fp index)
        d["shard"] = sys.intern(d["shard"])
        if d["path"] == d["id"]:
            d["path"] = d["id"]
        return cls(
            d["n"], d["id"], d["path"], d["duration"], d["content_hash"], d["n_hashes"], d["shard"]
        )


@dataclass
class AddSummary:
    """What :meth:`Index.add` did."""

    files: int = 0
    added: int = 0
    known: int = 0
    skipped: int = 0
    skipped_files: list[str] = field(default_factory=list)
    audio_seconds: float = 0.0
    n_hashes: int = 0
    elapsed_s: float = 0.0
    interrupted: bool = False

    @property
    def x_realtime(self) -> float:
        return self.audio_seconds / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "added": self.added,
            "known": self.known,
            "skipped": self.skipped,
            "skipped_files": self.skipped_files,
            "hours": self.audio_seconds / 3600,
            "audio_seconds": self.audio_seconds,
            "n_hashes": self.n_hashes,
            "seconds": self.elapsed_s,
            "x_realtime": self.x_realtime,
            "interrupted": self.interrupted,
        }


class IndexInterrupted(KeyboardInterrupt):
    """Ctrl-C during :meth:`Index.add`: what finished before it is saved (see ``summary``)."""

    def __init__(self, summary: AddSummary) -> None:
        super().__init__(f"interrupted after {summary.added} files were saved")
        self.summary = summary


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


def _save_npy_stream(
    paths: Sequence[Path], dtypes: Sequence[Any], n: int, chunks: Iterable[tuple[np.ndarray, ...]]
) -> None:
    """Write 1-D ``.npy`` files of *n* items each from tuples of *chunks*, sequentially."""
    written = 0
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(p, "wb")) for p in paths]
        for f, dtype in zip(files, dtypes, strict=True):
            descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
            header = {"descr": descr, "fortran_order": False, "shape": (n,)}
            np.lib.format.write_array_header_1_0(f, header)
        for parts in chunks:
            for f, dtype, part in zip(files, dtypes, parts, strict=True):
                f.write(memoryview(np.ascontiguousarray(part, dtype=dtype)).cast("B"))
            written += parts[0].shape[0]
        for f in files:
            f.flush()
            os.fsync(f.fileno())
    if written != n:  # pragma: no cover - a bug, never a user error
        msg = f"{paths[0]}: wrote {written} of {n} items"
        raise FingerprintIndexError(msg)


def _steps(arrays: Sequence[np.ndarray], grid: np.ndarray, limit: int) -> list[tuple[Any, Any]]:
    """Split the sorted key space into ``[lo, hi)`` ranges holding at most ~*limit* entries.

    *grid* are candidate boundaries (sorted, of the arrays' dtype, the last above every key); a
    range is a run of grid cells, cut before the cell that would take it past *limit* (one cell
    alone may exceed it).
    """
    counts = sum(
        (np.searchsorted(a, grid, side="left").astype(np.int64) for a in arrays),
        np.zeros(len(grid), np.int64),
    )
    steps, start = [], 0
    for i in range(1, len(grid)):
        if counts[i] - counts[start] > limit and i - 1 > start:
            steps.append((grid[start], grid[i - 1]))
            start = i - 1
    steps.append((grid[start], grid[-1]))
    return steps


def _stable_order(keys: np.ndarray) -> np.ndarray:
    """``np.argsort(keys, kind="stable")`` of ``uint32`` keys, ~5x faster.

    NumPy's stable argsort of 32-bit keys is a merge sort; packing each key with its position
    into one ``uint64`` (key high, position low) makes every value distinct, so the plain SIMD
    sort of the packed values orders exactly as the stable sort does. Shard writes and merges
    spent most of their CPU in that argsort (~0.1 us per hash, each hash sorted two or three
    times by an add); the shards are byte for byte the same.
    """
    n = keys.shape[0]
    if n >= 1 << 32:  # pragma: no cover - positions no longer fit beside the key
        return np.argsort(keys, kind="stable")
    packed = keys.astype(np.uint64) << np.uint64(32)
    packed |= np.arange(n, dtype=np.uint64)
    packed.sort()
    return (packed & np.uint64(0xFFFFFFFF)).astype(np.intp)


def _content_hashes(items: Sequence[tuple[str, str]], threads: int) -> list[str | OSError]:
    """:func:`content_hash` of every ``(id, path)``'s file, or the error reading it.

    In *threads* threads (BLAKE2b and the reads release the GIL): every byte of the collection
    is read before the first file can be decoded (64 h of MP3, 4 GB: 7.4 CPU-seconds), and in
    one thread the other cores waited for it.
    """

    def one(item: tuple[str, str]) -> str | OSError:
        try:
            return content_hash(item[1])
        except OSError as exc:
            return exc

    if threads <= 1 or len(items) < 2:
        return [one(it) for it in items]
    with ThreadPoolExecutor(threads) as pool:  # joined before any worker process is forked
        return list(pool.map(one, items))


def _between(keys: np.ndarray, lo: Any, hi: Any) -> slice:
    """The slice of sorted *keys* in ``[lo, hi)``."""
    return slice(int(np.searchsorted(keys, lo)), int(np.searchsorted(keys, hi)))


def _start_table(hashes: np.ndarray) -> np.ndarray:
    """Where every hash value starts in the sorted *hashes* (``2**HASH_BITS + 1`` uint32).

    By binary searches in the mapped array: ``np.bincount`` would first copy every hash to an
    int64 array (8 bytes per indexed hash: 212 MB at 3,000 files, per query thread).
    """
    values = np.arange((1 << HASH_BITS) + 1, dtype=np.uint64)
    return np.searchsorted(hashes, values.astype(hashes.dtype), side="left").astype(np.uint32)


class _Shard:
    __slots__ = ("hashes", "looked_up", "name", "peaks", "postings", "table")

    def __init__(self, root: Path, name: str):
        self.name = name
        self.hashes = np.load(root / name / "hashes.npy", mmap_mode="r")
        self.postings = np.load(root / name / "postings.npy", mmap_mode="r")
        self.peaks = np.load(root / name / "peaks.npy", mmap_mode="r")
        self.table: np.ndarray | None = None
        self.looked_up = 0

    def use_table(self, n: int) -> bool:
        """Count *n* more hashes looked up; whether the start table is (now) there.

        Binary searches at first; once this process has looked up an eighth as many hashes as
        the shard holds, or as the table has entries if fewer, a table of where every hash
        value starts (``2**HASH_BITS + 1`` entries, one pass over the shard to build) replaces
        them: two gathers per hash instead of ~40 scattered reads and no sort of the query's
        hashes, most of a query's lookup time. Building it costs about what binary searches
        of a tenth as many hashes as it has entries cost (on a 42 M-hash shard: 100-150 ms
        against 0.6 us per hash searched, 0.03 with the table), whatever the shard's size.
        """
        self.looked_up += n
        self.plan(0)
        return self.table is not None

    def plan(self, n: int) -> None:
        """Build the start table now if *n* more lookups would make it pay (the rule above)."""
        enough = 8 * (self.looked_up + n) >= min(len(self.hashes), 1 << HASH_BITS)
        if self.table is None and enough and len(self.hashes) >= TABLE_MIN_HASHES:
            # published only when complete: dedup's query threads share this shard, and one that
            # saw a half-filled table would find no postings for most hashes
            self.table = _start_table(self.hashes)

    def ranges(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[lo, hi)`` of every one of *hashes* (sorted, for the binary searches) here."""
        if self.table is None:
            lo = np.searchsorted(self.hashes, hashes, side="left")
            return lo, np.searchsorted(self.hashes, hashes, side="right")
        idx = hashes.astype(np.int64)
        return self.table[idx].astype(np.int64), self.table[idx + 1].astype(np.int64)


class Index:
    """A fingerprint index stored in a directory.

    Parameters
    ----------
    path : str or PathLike
        The index directory; created (with *fingerprinter*'s parameters) when missing.
    fingerprinter : Fingerprinter, optional
        Only for a new index; an existing one uses the parameters in its manifest.
    readonly : bool
        Open an existing index for queries only (any number of processes may do so).
    max_shards : int
        An add that leaves more shards than this compacts them into one.

    Examples
    --------
    >>> idx = Index("music.fpdb")                                # doctest: +SKIP
    >>> idx.add(["~/Music"], workers=2)                          # doctest: +SKIP
    >>> match(idx, "clip.mp3")                                   # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fingerprinter: Fingerprinter | None = None,
        readonly: bool = False,
        max_shards: int = 16,
    ):
        if max_shards < 1:
            msg = f"max_shards={max_shards} must be >= 1."
            raise ParameterError(msg)
        self.path = Path(path).expanduser()
        self.readonly = readonly
        self.max_shards = max_shards
        if not (self.path / MANIFEST).exists():
            if readonly:
                msg = f"{self.path} is not a fingerprint index (no {MANIFEST}); run fp index first."
                raise FingerprintIndexError(msg)
            if self.path.is_dir() and any(
                p.name not in ("shards", "index.lock") for p in self.path.iterdir()
            ):
                msg = f"{self.path} exists and is not a fingerprint index; pick a new directory."
                raise FingerprintIndexError(msg)
            self._create(fingerprinter or Fingerprinter())
        self.reload()
        if fingerprinter is not None and fingerprinter.params() != self.fingerprinter.params():
            msg = (
                f"{self.path} was built with other fingerprint parameters; open it without "
                "fingerprinter=... or use a new directory."
            )
            raise ParameterError(msg)

    # -- reading ---------------------------------------------------------------------------
    def reload(self) -> None:
        """Re-read the manifest and map the shards it names (sees other writers' adds)."""
        for _attempt in range(5):
            manifest = self._read_manifest()
            try:
                shards = [_Shard(self.path / "shards", s) for s in manifest["shards"]]
            except FileNotFoundError:  # a compaction replaced them between our two reads
                continue
            break
        else:
            msg = f"{self.path}: the manifest names missing shards; the index is damaged."
            raise FingerprintIndexError(msg)
        self._manifest = manifest
        self._shards = shards
        self.fingerprinter = Fingerprinter(
            **{**manifest["params"], "speeds": tuple(manifest["params"]["speeds"])}
        )
        self._tracks = [Track.from_dict(t) for t in manifest["tracks"]]
        self._by_number = {t.number: t for t in self._tracks}
        self._by_hash = {t.content_hash: t for t in self._tracks}
        alive = np.zeros(manifest["next_track"] + 1, dtype=bool)
        alive[[t.number for t in self._tracks]] = True
        self._alive = alive
        fpr = self.fingerprinter
        frames = np.zeros(alive.shape[0], dtype=np.int64)  # peak times count from the slot start
        frames[[t.number for t in self._tracks]] = [
            int(np.ceil(t.duration * fpr.sample_rate / fpr.hop)) + fpr.n_fft // fpr.hop
            for t in self._tracks
        ]
        self._track_frames = frames
        self.__dict__.pop("_peak_cache", None)

    def _read_manifest(self) -> dict[str, Any]:
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            msg = f"{self.path}: cannot read {MANIFEST} ({exc}); is this a fingerprint index?"
            raise FingerprintIndexError(msg) from exc
        if manifest.get("version") != FORMAT_VERSION:
            msg = (
                f"{self.path}: index format {manifest.get('version')!r}, this colabmagic reads "
                f"format {FORMAT_VERSION}; rebuild it with `colabmagic fp index` in a new folder."
            )
            raise FingerprintIndexError(msg)
        return manifest

    @property
    def tracks(self) -> list[Track]:
        """The indexed tracks, in the order they were added."""
        return list(self._tracks)

    def track(self, number: int) -> Track:
        """The track with internal number *number*."""
        return self._by_number[number]

    def __len__(self) -> int:
        return len(self._tracks)

    def __contains__(self, track_id: object) -> bool:
        return any(t.id == track_id for t in self._tracks)

    @property
    def n_hashes(self) -> int:
        """Stored hashes (including those of removed tracks until :meth:`compact`)."""
        return int(sum(s.hashes.shape[0] for s in self._shards))

    @property
    def memory_bytes(self) -> int:
        """Bytes of the mapped hash, posting and peak arrays (what queries page in at most)."""
        return int(sum(s.hashes.nbytes + s.postings.nbytes + s.peaks.nbytes for s in self._shards))

    def info(self) -> dict[str, Any]:
        """Summary as a JSON-able dict."""
        return {
            "path": str(self.path),
            "tracks": len(self._tracks),
            "hours": sum(t.duration for t in self._tracks) / 3600,
            "n_hashes": self.n_hashes,
            "n_peaks": int(sum(sh.peaks.shape[0] for sh in self._shards)),
            "shards": len(self._shards),
            "removed": len(self._manifest["removed"]),
            "memory_bytes": self.memory_bytes,
            "bytes_per_hash": self.memory_bytes / max(self.n_hashes, 1),
            "params": self.fingerprinter.params(),
        }

    @property
    def stop_postings(self) -> int:
        """Hashes with more postings than this are not looked up: 100x the mean, at least 32
        and at most :data:`MAX_POSTINGS`.

        They are a few percent of a query's hashes but half of its hits, and say little (a hit
        weighs ``1 / log2(2 + postings)``). The upper bound keeps a query's work bounded however
        large the library: with 21-bit hashes the chance hits per hash grow with the number of
        stored hashes, until the bound is reached (about 8 hours of audio); past it, query time
        grows only with the binary searches (logarithmically), and ever more common hashes are
        skipped.
        """
        return max(32, min(MAX_POSTINGS, int(100 * self.n_hashes / (1 << HASH_BITS))))

    def plan_lookups(self, n: int) -> None:
        """Say that about *n* hashes will be looked up (a batch job such as dedup): every shard
        for which that pays builds its start table now (see :meth:`_Shard.use_table`) instead
        of after an eighth of its size has been looked up by binary search."""
        for s in self._shards:
            s.plan(n)  # the lookups are counted as they happen

    def postings_per_hash(self, hashes: np.ndarray) -> np.ndarray:
        """How many postings each of *hashes* has, over all shards (int64; a range lookup each,
        no postings read)."""
        hashes = np.asarray(hashes, dtype=np.uint32)
        total = np.zeros(len(hashes), np.int64)
        for s in self._shards:
            lo, hi = s.ranges(hashes)
            total += hi - lo
        return total

    def lookup(
        self,
        hashes: np.ndarray,
        *,
        max_postings: int | None = None,
        select: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All postings of *hashes* in every shard, by binary search (see :attr:`stop_postings`).

        Parameters
        ----------
        hashes : numpy.ndarray (uint32)
        max_postings : int, optional
            Skip hashes with more postings than this (default :attr:`stop_postings`).
        select : callable, optional
            ``select(postings_per_hash) -> bool mask`` of the hashes to look up, instead of
            *max_postings* (the query path's posting budget, :mod:`~colabmagic.fingerprint.match`).

        Returns
        -------
        which : numpy.ndarray (int64)
            Index into *hashes* of every hit.
        track : numpy.ndarray (int64)
            Internal track number of every hit (removed tracks are dropped).
        time : numpy.ndarray (int64)
            Anchor frame of every hit in its track.
        """
        hashes = np.asarray(hashes, dtype=np.uint32)
        if all([s.use_table(len(hashes)) for s in self._shards]):  # every shard, no shortcut
            found = [(s, *s.ranges(hashes)) for s in self._shards]
        else:  # search the distinct hashes in sorted order (cache-friendly), then expand
            distinct, back = np.unique(hashes, return_inverse=True)
            back = back.reshape(-1)
            found = [(s, *(a[back] for a in s.ranges(distinct))) for s in self._shards]
        total_per_hash = sum((hi - lo for _, lo, hi in found), np.zeros(len(hashes), np.int64))
        if select is not None:
            stop = ~select(total_per_hash)
        else:
            stop = total_per_hash > (self.stop_postings if max_postings is None else max_postings)
        which, post = [], []
        for shard, lo, hi in found:
            count = np.where(stop, 0, hi - lo)
            total = int(count.sum())
            if total == 0:
                continue
            rows = np.repeat(np.arange(len(hashes)), count)
            first = np.repeat(lo - (np.cumsum(count) - count), count)
            post.append(shard.postings[first + np.arange(total)])
            which.append(rows)
        if not post:
            empty = np.zeros(0, np.int64)
            return empty, empty, empty
        postings = np.concatenate(post)
        track = (postings >> np.uint64(32)).astype(np.int64)
        keep = self._alive[track]
        time = (postings & TIME_MASK).astype(np.int64)
        return np.concatenate(which)[keep], track[keep], time[keep]

    def peak_keys(self, backend: Backend | None = None) -> tuple[Any, Any]:
        """Sorted peak keys of all shards and the length in frames of every track number.

        On a device backend both are copied once and cached (like :meth:`device_arrays`).
        """
        cache = self.__dict__.setdefault("_peak_cache", {})
        name = backend.name if backend is not None and backend.is_device else "host"
        if name not in cache:
            parts = [np.asarray(s.peaks) for s in self._shards]
            keys = parts[0] if len(parts) == 1 else np.sort(np.concatenate(parts or [np.zeros(0)]))
            keys = keys.astype(np.uint64, copy=False)
            if name == "host":
                cache[name] = (keys, self._track_frames)
            else:
                cache.clear()
                cache[name] = (backend.to_device(keys), backend.to_device(self._track_frames))
        return cache[name]

    def device_arrays(self, backend: Backend) -> list[tuple[Any, Any]]:
        """``(hashes, postings)`` of every shard on *backend*, copied once and cached."""
        if not backend.is_device:
            return [(s.hashes, s.postings) for s in self._shards]
        cache = self.__dict__.setdefault("_device_cache", {})
        key = (backend.name, tuple(s.name for s in self._shards))
        if key not in cache:
            cache.clear()
            cache[key] = [
                (backend.to_device(np.asarray(s.hashes)), backend.to_device(np.asarray(s.postings)))
                for s in self._shards
            ]
        return cache[key]

    # -- writing ---------------------------------------------------------------------------
    def _create(self, fingerprinter: Fingerprinter) -> None:
        (self.path / "shards").mkdir(parents=True, exist_ok=True)
        with self._lock():
            if (self.path / MANIFEST).exists():
                return
            self._write_manifest(
                {
                    "version": FORMAT_VERSION,
                    "params": fingerprinter.params(),
                    "next_track": 0,
                    "tracks": [],
                    "shards": [],
                    "shard_info": {},
                    "removed": [],
                }
            )

    def _lock(self) -> Any:
        from filelock import FileLock

        return FileLock(str(self.path / "index.lock"))

    def _writable(self) -> None:
        if self.readonly:
            msg = f"{self.path} was opened readonly=True; open it without readonly to change it."
            raise ParameterError(msg)

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        tmp = self.path / f".{MANIFEST}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / MANIFEST)
        _fsync_dir(self.path)

    def _write_shard(self, hashes: np.ndarray, postings: np.ndarray, peaks: np.ndarray) -> str:
        """Write a sorted shard under a temporary name and rename it into place."""
        order = _stable_order(hashes.astype(np.uint32, copy=False))
        return self._publish_shard(
            lambda d: (
                _save_npy(d / "hashes.npy", np.ascontiguousarray(hashes[order], dtype=np.uint32)),
                _save_npy(d / "postings.npy", np.ascontiguousarray(postings[order], np.uint64)),
                _save_npy(d / "peaks.npy", np.sort(peaks.astype(np.uint64, copy=False))),
            )
        )

    def _publish_shard(self, write: Any) -> str:
        """Run ``write(tmpdir)`` to fill a new shard directory, then rename it into place."""
        root = self.path / "shards"
        name = f"{uuid.uuid4().hex[:12]}"
        tmp = root / f".tmp-{name}"
        tmp.mkdir()
        write(tmp)
        _fsync_dir(tmp)
        os.rename(tmp, root / name)
        _fsync_dir(root)
        return name

    def _collect_garbage(self, manifest: dict[str, Any]) -> None:
        """Delete shard directories the manifest does not name (left by a crash or compaction)."""
        root = self.path / "shards"
        live = set(manifest["shards"])
        for p in root.iterdir():
            if p.name not in live:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.path.glob(f".{MANIFEST}.*.tmp"):
            p.unlink(missing_ok=True)

    def add(
        self,
        paths: Iterable[str | os.PathLike[str] | tuple[str, str | os.PathLike[str]]],
        *,
        workers: int = 1,
        backend: str | Backend = "auto",
        scheduler: Any = None,
        progress: bool = False,
        shard_hashes: int = 2_000_000,
        commit_seconds: float = 30.0,
    ) -> AddSummary:
        """Fingerprint audio files and add them to the index, streaming (bounded memory).

        Parameters
        ----------
        paths : iterable of path or (track_id, path)
            Files or directories (searched recursively for audio). A bare path is its own id.
        workers : int
            Processes that decode and fingerprint in parallel.
        backend : {"auto", "numpy", "cupy"} or Backend
        scheduler : str or distributed.Client, optional
            Run decode + extract on a Dask cluster instead (address ``tcp://HOST:8786``).
        progress : bool
            Show a tqdm progress bar (on stderr).
        shard_hashes, commit_seconds : int, float
            Write a shard (and commit it to the manifest) whenever this many hashes are pending
            or this many seconds passed since the last commit: the most work a crash can lose.

        Returns
        -------
        AddSummary
            Counts; undecodable files are skipped, warned about (AudioDecodeWarning) and listed.

        Raises
        ------
        IndexInterrupted
            On Ctrl-C, after saving every file that finished; rerunning the same add skips
            them (by content hash) and does the rest.
        """
        self._writable()
        start = now()
        items: list[tuple[str, str]] = []
        for p in paths:
            if isinstance(p, tuple):
                items.append((str(p[0]), os.fspath(p[1])))
            else:
                items.extend((f, f) for f in find_audio([p]))
        summary = AddSummary(files=len(items))
        with self._lock():
            self.reload()
            self._collect_garbage(self._manifest)
            jobs, seen = [], set(self._by_hash)
            for (track_id, path), chash in zip(items, _content_hashes(items, workers), strict=True):
                if isinstance(chash, OSError):
                    self._skip(summary, path, f"{path}: cannot read ({chash.strerror}); skipped.")
                    continue
                if chash in seen:
                    summary.known += 1
                    continue
                seen.add(chash)
                jobs.append(Job(track_id, path, chash))
            self._add_jobs(
                jobs,
                summary,
                workers=workers,
                backend=backend,
                scheduler=scheduler,
                progress=progress,
                shard_hashes=shard_hashes,
                commit_seconds=commit_seconds,
            )
        summary.elapsed_s = now() - start
        return summary

    def add_jobs(
        self,
        jobs: list[Job],
        *,
        workers: int = 1,
        backend: str | Backend = "auto",
        scheduler: Any = None,
        progress: bool = False,
        shard_hashes: int = 2_000_000,
        commit_seconds: float = 30.0,
        on_added: Callable[[int, Extracted], None] | None = None,
        merge_all: bool | None = None,
    ) -> AddSummary:
        """:meth:`add` for jobs whose content hash is known (files already in the index are
        skipped by it).

        Parameters
        ----------
        jobs : list of Job
        on_added : callable, optional
            ``on_added(track_number, extracted)`` for every file added, in order.
        merge_all : bool, optional
            End with one shard (default: when this add wrote more than one shard, or the index
            has more than ``max_shards``).
        Others as :meth:`add`.
        """
        self._writable()
        start = now()
        summary = AddSummary(files=len(jobs))
        with self._lock():
            self.reload()
            known = set(self._by_hash)
            fresh = [j for j in jobs if j.content_hash not in known]
            summary.known = len(jobs) - len(fresh)
            self._add_jobs(
                fresh, summary, workers=workers, backend=backend, scheduler=scheduler,
                progress=progress, shard_hashes=shard_hashes, commit_seconds=commit_seconds,
                on_added=on_added, merge_all=merge_all,
            )  # fmt: skip
        summary.elapsed_s = now() - start
        return summary

    def _add_jobs(
        self,
        jobs: list[Job],
        summary: AddSummary,
        *,
        workers: int,
        backend: str | Backend,
        scheduler: Any,
        progress: bool,
        shard_hashes: int,
        commit_seconds: float,
        on_added: Callable[[int, Extracted], None] | None = None,
        merge_all: bool | None = None,
    ) -> None:
        """Extract *jobs* (not yet in the index) and commit them as they finish (lock held)."""
        source = extract_files(
            jobs, fingerprinter=self.fingerprinter, workers=workers, backend=backend,
            scheduler=scheduler,
        )  # fmt: skip
        results: Any = source
        if progress:
            from tqdm.auto import tqdm

            results = tqdm(results, total=len(jobs), unit="file", desc="fingerprinting")
        pending: list[Pending] = []
        n_pending, last_commit, written = 0, now(), 0
        try:
            for r in results:
                if r.error is not None:
                    self._skip(summary, r.path, r.error)
                    continue
                record = {
                    "id": r.track_id,
                    "path": str(Path(r.path).resolve()),
                    "duration": r.duration,
                    "content_hash": r.content_hash,
                    "n_hashes": len(r.hashes),
                }
                if on_added is not None:
                    on_added(self._manifest["next_track"] + len(pending), r)
                pending.append((record, r.hashes, r.times, r.peaks))
                n_pending += len(r.hashes)
                summary.added += 1
                summary.audio_seconds += r.duration
                summary.n_hashes += len(r.hashes)
                if n_pending >= shard_hashes or now() - last_commit >= commit_seconds:
                    # cleared first: a Ctrl-C inside the commit must not commit it twice
                    batch, pending, n_pending = pending, [], 0
                    self._commit(batch)
                    written += 1
                    last_commit = now()
                    self._merge_tail(shard_hashes)
            if pending:
                batch, pending = pending, []
                self._commit(batch)
                written += 1
            if merge_all is None:
                merge_all = written > 1 or len(self._manifest["shards"]) > self.max_shards
            if merge_all:
                self._compact_locked()
        except KeyboardInterrupt as exc:
            if pending:  # keep what finished: a rerun skips it
                self._commit(pending)
            summary.interrupted = True
            raise IndexInterrupted(summary) from exc
        finally:
            source.close()  # stops worker pools / cancels cluster tasks now, not at collection
            if results is not source:
                results.close()  # the progress bar

    @staticmethod
    def _skip(summary: AddSummary, path: str, reason: str) -> None:
        warnings.warn(reason, AudioDecodeWarning, stacklevel=3)
        summary.skipped += 1
        summary.skipped_files.append(path)

    def add_fingerprints(self, items: Sequence[Pending]) -> None:
        """Add precomputed fingerprints: ``(record, hashes, times[, peaks])``.

        *record* has the keys ``id``, ``path``, ``duration``, ``content_hash`` (see
        :class:`Track`); *peaks* is :attr:`Fingerprint.peaks`. Without peaks a track can still be
        found by its hashes, but candidates cannot be verified, so its scores stay lower.
        """
        self._writable()
        with self._lock():
            self.reload()
            fresh = [it for it in items if it[0]["content_hash"] not in self._by_hash]
            if fresh:
                self._commit([({**it[0], "n_hashes": len(it[1])}, *it[1:]) for it in fresh])
                if len(self._manifest["shards"]) > self.max_shards:
                    self._compact_locked()

    def _commit(self, pending: list[Pending]) -> None:
        """Write one shard for *pending* tracks and publish it in the manifest (lock held)."""
        manifest = json.loads(json.dumps(self._manifest))
        n0 = manifest["next_track"]
        if n0 + len(pending) >= 1 << (64 - T_BITS - F_BITS):
            msg = f"{self.path}: too many tracks for one index; split the library."
            raise FingerprintIndexError(msg)
        hashes = np.concatenate([it[1] for it in pending]).astype(np.uint32)
        postings = np.concatenate(
            [
                (np.uint64(n0 + i) << np.uint64(32)) | it[2].astype(np.uint64)
                for i, it in enumerate(pending)
            ]
        )
        peaks = np.concatenate(
            [np.zeros(0, np.uint64)]
            + [
                reference_keys(n0 + i, it[3])
                for i, it in enumerate(pending)
                if len(it) > 3 and it[3] is not None
            ]
        )
        name = self._write_shard(hashes, postings, peaks)
        replaced = {it[0]["id"] for it in pending}
        for old in manifest["tracks"]:
            if old["id"] in replaced:
                manifest["removed"].append(old["n"])
        manifest["tracks"] = [t for t in manifest["tracks"] if t["id"] not in replaced]
        for i, (record, *_) in enumerate(pending):
            manifest["tracks"].append({**record, "n": n0 + i, "shard": name})
        manifest["next_track"] = n0 + len(pending)
        manifest["shards"].append(name)
        manifest["shard_info"][name] = {
            "hashes": int(hashes.shape[0]),
            "peaks": int(peaks.shape[0]),
            "tracks": [n0, n0 + len(pending)],
        }
        self._write_manifest(manifest)
        self.reload()

    def _merge_tail(self, base: int) -> None:
        """LSM step: while the newest :data:`MERGE_FANOUT` shards are of one size class, merge them.

        A size class is ``floor(log_FANOUT(hashes / base))``: each merge lifts a run of equal
        shards one class up, so an add of N hashes keeps O(FANOUT * log N) shards and rewrites
        each hash O(log N) times. Runs are contiguous, so shards stay in track order.
        """

        def size_class(name: str) -> int:
            n = self._manifest["shard_info"][name]["hashes"]
            return int(np.floor(np.log(max(n, 1) / max(base, 1)) / np.log(MERGE_FANOUT) + 1e-9))

        while len(self._manifest["shards"]) >= MERGE_FANOUT:
            tail = self._manifest["shards"][-MERGE_FANOUT:]
            classes = {max(size_class(n), 0) for n in tail}
            if len(classes) != 1:
                return
            self._merge(tail)

    def _merge(self, names: list[str], *, drop_removed: bool = False) -> None:
        """Replace the contiguous run of shards *names* by one, by a streaming k-way merge.

        Key range by key range (each at most ~:data:`MERGE_STEP` entries), every shard's slice is
        read from its memory map, merged (stable: shard order, i.e. track order, within a hash)
        and appended to the new files; memory stays one step whatever the index size.
        """
        manifest = json.loads(json.dumps(self._manifest))
        pos = manifest["shards"].index(names[0])
        assert manifest["shards"][pos : pos + len(names)] == names
        shards = [s for s in self._shards if s.name in set(names)]
        # with nothing removed there is nothing to drop: no filtering, no counting pass
        alive = self._alive if drop_removed and manifest["removed"] else None
        hashes_grid = np.linspace(0, 1 << HASH_BITS, 4097).astype(np.uint32)
        hashes_grid[-1] = np.iinfo(np.uint32).max  # above every hash (they have HASH_BITS bits)
        hsteps = _steps([s.hashes for s in shards], hashes_grid, MERGE_STEP)
        top = manifest["next_track"] + 1
        peaks_grid = np.unique(
            np.linspace(0, top, min(top, 4096) + 1).astype(np.uint64)
        ) << np.uint64(T_BITS + F_BITS)
        psteps = _steps([s.peaks for s in shards], peaks_grid, MERGE_STEP)

        def hash_chunks() -> Iterable[tuple[np.ndarray, np.ndarray]]:
            for lo, hi in hsteps:
                cut = [(s, _between(s.hashes, lo, hi)) for s in shards]
                h = np.concatenate([np.asarray(s.hashes[sl]) for s, sl in cut])
                p = np.concatenate([np.asarray(s.postings[sl]) for s, sl in cut])
                if alive is not None:
                    keep = alive[(p >> np.uint64(32)).astype(np.int64)]
                    h, p = h[keep], p[keep]
                order = _stable_order(h)
                yield h[order], p[order]

        def peak_chunks() -> Iterable[np.ndarray]:
            shift = np.uint64(T_BITS + F_BITS)
            for lo, hi in psteps:
                k = np.concatenate([np.asarray(s.peaks[_between(s.peaks, lo, hi)]) for s in shards])
                if alive is not None:
                    k = k[alive[(k >> shift).astype(np.int64)]]
                yield np.sort(k)

        if alive is None:
            n_hashes = sum(int(s.hashes.shape[0]) for s in shards)
            n_peaks = sum(int(s.peaks.shape[0]) for s in shards)
        else:  # a counting pass over the postings (8 B per hash, read sequentially)
            n_hashes = sum(len(h) for h, _ in hash_chunks())
            n_peaks = sum(len(k) for k in peak_chunks())

        def write(d: Path) -> None:
            _save_npy_stream(
                [d / "hashes.npy", d / "postings.npy"], [np.uint32, np.uint64], n_hashes,
                hash_chunks(),
            )  # fmt: skip
            _save_npy_stream([d / "peaks.npy"], [np.uint64], n_peaks, ((k,) for k in peak_chunks()))

        name = self._publish_shard(write)
        infos = [manifest["shard_info"].pop(n) for n in names]
        manifest["shards"][pos : pos + len(names)] = [name]
        manifest["shard_info"][name] = {
            "hashes": n_hashes,
            "peaks": n_peaks,
            "tracks": [min(i["tracks"][0] for i in infos), max(i["tracks"][1] for i in infos)],
        }
        gone = set(names)
        for t in manifest["tracks"]:
            if t["shard"] in gone:
                t["shard"] = name
        if drop_removed:
            manifest["removed"] = []
        self._write_manifest(manifest)
        self._shards = []
        self.reload()
        with contextlib.suppress(OSError):
            self._collect_garbage(manifest)

    def remove(self, track_id: str) -> bool:
        """Remove a track by id (its postings are dropped at the next :meth:`compact`).

        Returns
        -------
        bool
            False when no track has that id.
        """
        self._writable()
        with self._lock():
            self.reload()
            manifest = json.loads(json.dumps(self._manifest))
            gone = [t["n"] for t in manifest["tracks"] if t["id"] == track_id]
            if not gone:
                return False
            manifest["tracks"] = [t for t in manifest["tracks"] if t["id"] != track_id]
            manifest["removed"].extend(gone)
            self._write_manifest(manifest)
            self.reload()
        return True

    def compact(self) -> None:
        """Merge every shard into one, dropping removed tracks' postings."""
        self._writable()
        with self._lock():
            self.reload()
            self._compact_locked()

    def _compact_locked(self) -> None:
        if len(self._shards) <= 1 and not self._manifest["removed"]:
            return
        if not self._shards:  # every track removed before any shard was written
            return
        self._merge(list(self._manifest["shards"]), drop_removed=True)
