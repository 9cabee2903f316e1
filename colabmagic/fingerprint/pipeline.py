"""Decode + extract many files in parallel: local processes or a Dask cluster.

Each task is a few files (decoded by one ffmpeg process, then fingerprinted one by one), started
largest first so the work spreads evenly over every core;
with a GPU backend the workers only decode and the parent fingerprints large batches on the device.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from colabmagic.errors import ParameterError
from colabmagic.fingerprint._xp import Backend, resolve_backend
from colabmagic.fingerprint.audio import (
    FILES_PER_FFMPEG,
    AudioDecodeError,
    load_audio,
    load_audio_many,
)
from colabmagic.fingerprint.fingerprinter import Fingerprinter


@dataclass
class Extracted:
    """The outcome for one file: its fingerprint, or the reason it was skipped."""

    track_id: str
    path: str
    content_hash: str
    duration: float = 0.0
    hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    times: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    peaks: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    error: str | None = None
    signal: np.ndarray | None = None  # only between decode-only workers and the GPU batcher


@dataclass(frozen=True)
class Job:
    """One file to process (picklable: it travels to worker processes and Dask workers)."""

    track_id: str
    path: str
    content_hash: str


def extract_one(job: Job, fingerprinter: Fingerprinter, decode_only: bool = False) -> Extracted:
    """Decode and fingerprint one file on NumPy; errors become ``Extracted.error``."""
    try:
        y = load_audio(job.path, sample_rate=fingerprinter.sample_rate)
    except AudioDecodeError as exc:
        return _extracted(job, exc, fingerprinter, decode_only)
    return _extracted(job, y, fingerprinter, decode_only)


def extract_group(
    jobs: list[Job], fingerprinter: Fingerprinter, decode_only: bool = False
) -> list[Extracted]:
    """:func:`extract_one` for several files, decoded sharing ffmpeg processes.

    Each signal is still fingerprinted on its own, so the hashes are those of
    :func:`extract_one` (see :func:`~colabmagic.fingerprint.audio.load_audio_many`).
    """
    signals = load_audio_many([j.path for j in jobs], sample_rate=fingerprinter.sample_rate)
    return [
        _extracted(j, y, fingerprinter, decode_only) for j, y in zip(jobs, signals, strict=True)
    ]


def _extracted(
    job: Job, y: np.ndarray | AudioDecodeError, fingerprinter: Fingerprinter, decode_only: bool
) -> Extracted:
    if isinstance(y, AudioDecodeError):
        return Extracted(job.track_id, job.path, job.content_hash, error=str(y))
    duration = len(y) / fingerprinter.sample_rate
    if decode_only:
        return Extracted(job.track_id, job.path, job.content_hash, duration, signal=y)
    fp = fingerprinter.fingerprint(y, backend="numpy")
    return Extracted(
        job.track_id, job.path, job.content_hash, duration, fp.hashes, fp.times, fp.peaks
    )


def _star(
    args: tuple[list[int], list[Job], Fingerprinter, bool],
) -> tuple[list[int], list[Extracted]]:
    return args[0], extract_group(*args[1:])


def _group_size(n_jobs: int, workers: int) -> int:
    """Files per task: up to FILES_PER_FFMPEG, but at least ~4 tasks per worker (balance)."""
    return max(1, min(FILES_PER_FFMPEG, n_jobs // (4 * workers)))


#: Jobs are started longest first within windows of this many (results come back in order, so a
#: window bounds how many finished results wait for an earlier, shorter one).
LPT_WINDOW = 64


def _longest_first(jobs: list[Job], window: int = LPT_WINDOW) -> list[int]:
    """Job positions, each window of *window* jobs sorted by file size, largest first.

    Started in this order, the pool does not end on one long file while the other workers sit
    idle (longest processing time first); the size on disk stands in for the decoding work.
    """

    def size(job: Job) -> int:
        try:
            return os.path.getsize(job.path)
        except OSError:
            return 0

    sizes = [size(j) for j in jobs]
    order: list[int] = []
    for a in range(0, len(jobs), window):
        order.extend(sorted(range(a, min(a + window, len(jobs))), key=lambda i: -sizes[i]))
    return order


def _gpu_batches(
    results: Iterable[Extracted], fingerprinter: Fingerprinter, backend: Backend
) -> Iterator[Extracted]:
    """Group decoded signals into batches of ~``device_batch_seconds``; fingerprint each at once."""
    pending: list[Extracted] = []
    limit = fingerprinter.device_batch_seconds

    def flush() -> Iterator[Extracted]:
        fps = fingerprinter.fingerprint_batch([e.signal for e in pending], backend=backend)
        for e, fp in zip(pending, fps, strict=True):
            e.hashes, e.times, e.peaks, e.signal = fp.hashes, fp.times, fp.peaks, None
            yield e
        pending.clear()

    for e in results:
        if e.error is not None:
            yield e
            continue
        pending.append(e)
        if sum(p.duration for p in pending) >= limit:
            yield from flush()
    if pending:
        yield from flush()


def extract_files(
    jobs: list[Job],
    *,
    fingerprinter: Fingerprinter,
    workers: int = 1,
    backend: str | Backend = "auto",
    scheduler: Any = None,
) -> Iterator[Extracted]:
    """Fingerprint files in parallel, yielding results in the order of *jobs*.

    Parameters
    ----------
    jobs : list of Job
    fingerprinter : Fingerprinter
    workers : int
        Local worker processes (1: in this process). Ignored with *scheduler*.
    backend : {"auto", "numpy", "cupy"} or Backend
        With a device backend, workers only decode and this process fingerprints in batches.
    scheduler : str or distributed.Client, optional
        Address of a Dask scheduler (or a client): run the per-file tasks on that cluster.

    Yields
    ------
    Extracted
    """
    if workers < 1:
        msg = f"workers={workers} must be >= 1; use 1 to run in this process."
        raise ParameterError(msg)
    be = resolve_backend(backend)
    decode_only = be.is_device
    if scheduler is None:
        workers = min(workers, _useful_workers(jobs))
    if scheduler is not None:
        results = _dask_map(jobs, fingerprinter, decode_only, scheduler)
    elif workers == 1 or len(jobs) <= 1:
        size = FILES_PER_FFMPEG
        groups = (jobs[a : a + size] for a in range(0, len(jobs), size))
        results = (r for g in groups for r in extract_group(g, fingerprinter, decode_only))
    else:
        results = _pool_map(jobs, fingerprinter, decode_only, workers)
    if decode_only:
        results = _gpu_batches(results, fingerprinter, be)
    yield from results


#: Bytes of input per worker process below which another process costs more than it saves (a
#: forked worker costs ~30-50 ms to start and join; 2 MiB of OGG/MP3 is ~2 min of audio, ~0.15 s
#: of one core's decoding and fingerprinting).
BYTES_PER_WORKER = 2 << 20


def _useful_workers(jobs: list[Job]) -> int:
    """Workers worth starting for *jobs*: one per :data:`BYTES_PER_WORKER` of input, at least 1.

    A small job (a few clips) runs in the calling process: no pool to start at all.
    """
    total = 0
    for j in jobs:
        try:
            total += os.path.getsize(j.path)
        except OSError:
            continue
        if total >= BYTES_PER_WORKER * 64:
            break  # large enough for any pool
    return max(1, total // BYTES_PER_WORKER)


def _pool_map(
    jobs: list[Job], fingerprinter: Fingerprinter, decode_only: bool, workers: int
) -> Iterator[Extracted]:
    ctx = multiprocessing.get_context(_start_method())
    # decode-only results carry whole signals: keep them in order rather than hold any back
    order = list(range(len(jobs))) if decode_only else _longest_first(jobs)
    size = _group_size(len(jobs), workers)
    tasks = [
        (order[a : a + size], [jobs[i] for i in order[a : a + size]], fingerprinter, decode_only)
        for a in range(0, len(order), size)
    ]
    done: dict[int, Extracted] = {}
    next_out = 0
    with ctx.Pool(min(workers, len(tasks))) as pool:
        for positions, results in pool.imap_unordered(_star, tasks, chunksize=1):
            done.update(zip(positions, results, strict=True))
            while next_out in done:  # back in the order of *jobs*
                yield done.pop(next_out)
                next_out += 1


def _dask_map(
    jobs: list[Job], fingerprinter: Fingerprinter, decode_only: bool, scheduler: Any
) -> Iterator[Extracted]:
    from colabmagic.fingerprint import cluster

    client, own = cluster.connect(scheduler)
    try:
        cluster.check_workers(client)
        threads = sum(client.nthreads().values())
        # workers run elsewhere, in another directory: send absolute paths, give back ours
        remote = [Job(j.track_id, os.path.abspath(j.path), j.content_hash) for j in jobs]
        results = cluster.map_in_order(
            client, extract_one, remote, max(32, 4 * threads),
            fingerprinter=fingerprinter, decode_only=decode_only,
        )  # fmt: skip
        for job, r in zip(jobs, results, strict=True):
            r.path = job.path
            yield r
    finally:
        if own:
            client.close()


def _start_method() -> str:
    """``fork`` when it is safe (POSIX, no other thread alive: cheap, works from scripts without a
    ``__main__`` guard), else ``spawn``."""
    import threading

    if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
        return "fork"
    return "spawn"


def default_workers() -> int:
    """Worker processes to use by default: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def now() -> float:
    """Monotonic seconds (one place, so timings in summaries agree)."""
    return time.perf_counter()
