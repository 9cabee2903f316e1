"""Parallel extraction: worker processes and a Dask cluster give the single-process hashes."""

from __future__ import annotations

import numpy as np
import pytest

from colabmagic.fingerprint import Fingerprinter, Index, match, pipeline
from colabmagic.fingerprint.pipeline import Job, _longest_first, _useful_workers, extract_files

from .conftest import SR, write_wav


def _jobs(library):
    return [Job(p.stem, str(p), p.stem) for p in sorted(library.glob("*.wav"))]


def test_worker_processes_match_in_process(library, fingerprinter, monkeypatch):
    monkeypatch.setattr(pipeline, "BYTES_PER_WORKER", 1)  # a pool even for this small job
    one = list(extract_files(_jobs(library), fingerprinter=fingerprinter, backend="numpy"))
    two = list(
        extract_files(_jobs(library), fingerprinter=fingerprinter, workers=2, backend="numpy")
    )
    assert [r.track_id for r in two] == [r.track_id for r in one]
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a.hashes, b.hashes)


def test_longest_files_start_first_and_results_keep_job_order(
    tmp_path, tracks, fingerprinter, monkeypatch
):
    monkeypatch.setattr(pipeline, "BYTES_PER_WORKER", 1)
    paths = [write_wav(tmp_path / f"{i}.wav", tracks["t0"][: (i + 1) * SR]) for i in range(5)]
    jobs = [Job(p.stem, str(p), p.stem) for p in paths]
    jobs.append(Job("missing", str(tmp_path / "missing.wav"), "missing"))  # size unknown: last
    assert _longest_first(jobs) == [4, 3, 2, 1, 0, 5]
    assert _longest_first(jobs, window=2) == [1, 0, 3, 2, 4, 5]
    out = list(extract_files(jobs, fingerprinter=fingerprinter, workers=2, backend="numpy"))
    assert [r.track_id for r in out] == [j.track_id for j in jobs]
    assert out[-1].error is not None
    assert [r.duration for r in out[:-1]] == pytest.approx([1, 2, 3, 4, 5])


def test_dask_local_cluster(library, tmp_path, tracks, fingerprinter):
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        res = list(
            extract_files(
                _jobs(library)[:3], fingerprinter=fingerprinter, scheduler=client, backend="numpy"
            )
        )
        ref = list(extract_files(_jobs(library)[:3], fingerprinter=fingerprinter, backend="numpy"))
        for a, b in zip(res, ref, strict=True):
            np.testing.assert_array_equal(a.hashes, b.hashes)
        idx = Index(tmp_path / "db", fingerprinter=Fingerprinter())
        s = idx.add([library], scheduler=cluster.scheduler_address, backend="numpy")
    assert s.added == 6
    assert match(idx, tracks["t5"][3 * SR : 9 * SR])[0].track.endswith("t5.wav")


def test_a_small_job_starts_no_pool(tmp_path):
    small = tmp_path / "small.ogg"
    small.write_bytes(b"x" * (pipeline.BYTES_PER_WORKER // 2))
    big = [tmp_path / f"big{i}.ogg" for i in range(3)]
    for b in big:
        b.write_bytes(b"x" * pipeline.BYTES_PER_WORKER)
    jobs = [Job(p.name, str(p), p.name) for p in (small, *big)]
    assert _useful_workers(jobs[:1]) == 1  # one clip: in this process
    assert _useful_workers(jobs) == 3
    assert _useful_workers([*jobs, Job("gone", str(tmp_path / "gone.ogg"), "gone")]) == 3
