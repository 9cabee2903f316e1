"""fp index / fp dedup on a real Dask cluster: `dask scheduler` + two `dask worker` processes.

One worker is SIGKILLed mid-job: the job completes, the index equals a local run's byte for
byte, and no file is indexed twice. Bad clusters fail in one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from colabmagic.errors import ConnectError, ParameterError
from colabmagic.fingerprint import Index, dedup
from colabmagic.fingerprint.audio import content_hash
from colabmagic.fingerprint.cluster import CONNECT_TIMEOUT
from colabmagic.fingerprint.pipeline import Job
from colabmagic.testing import require, wait_until

from .conftest import SR, write_wav

COLABMAGIC = str(Path(sys.executable).with_name("colabmagic"))

try:
    import distributed
except ImportError:  # the fixture skips, or fails under COLABMAGIC_REQUIRE_ALL=1
    distributed = None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require(distributed is not None, "dask.distributed is not installed (colabmagic[dask])")
    from colabmagic.testing_dask import DaskProcesses

    with DaskProcesses(tmp_path_factory.mktemp("dask"), n_workers=2, nthreads=1) as c:
        yield c


@pytest.fixture
def many_files(tmp_path, tracks):
    """32 distinct contents (the 8 tracks at 4 gains), enough to catch a worker mid-job."""
    d = tmp_path / "files"
    d.mkdir()
    out = []
    for g in range(4):
        for name in sorted(tracks):
            out.append(write_wav(d / f"g{g}-{name}.wav", tracks[name] * 0.8**g))
    return out


def _snapshot(idx: Index) -> tuple:
    arrays = tuple(
        np.asarray(a).tobytes() for s in idx._shards for a in (s.hashes, s.postings, s.peaks)
    )
    tracks = [(t.number, t.id, t.content_hash, t.n_hashes, t.duration) for t in idx.tracks]
    return tracks, arrays


def test_cli_index_and_dedup_with_scheduler_equal_local(tmp_path, cluster, tracks, monkeypatch):
    d = tmp_path / "music"
    d.mkdir()
    for name in ("t0", "t1", "t2"):
        write_wav(d / f"{name}.wav", tracks[name])
    write_wav(d / "t1-excerpt.wav", tracks["t1"][5 * SR : 15 * SR])
    (d / "t2-copy.wav").write_bytes((d / "t2.wav").read_bytes())
    cli = [COLABMAGIC, "fp"]

    def start(*args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*cli, *args, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=tmp_path,
        )  # fmt: skip

    def result(p: subprocess.Popen[str]) -> dict:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])

    # both CLIs at once (each spends seconds importing and connecting), the local runs meanwhile;
    # a relative path: the workers run in other directories
    index_cli = start("index", "--db", "a", "music", "--scheduler", cluster.address)
    dedup_cli = start("dedup", str(d), "--scheduler", cluster.address)
    here = Index(tmp_path / "b")
    monkeypatch.chdir(tmp_path)
    here.add(["music"], workers=1, backend="numpy")
    local_groups = dedup([d], workers=1, backend="numpy").to_dict()["groups"]
    on_cluster = result(index_cli)
    assert on_cluster["added"] == len(here) == 4
    assert _snapshot(Index(tmp_path / "a", readonly=True)) == _snapshot(here)

    groups = result(dedup_cli)["groups"]
    assert groups == local_groups
    files = sorted(sorted(Path(f).name for f in g["files"]) for g in groups)
    assert files == [["t1-excerpt.wav", "t1.wav"], ["t2-copy.wav", "t2.wav"]]


def test_bad_clusters_fail_in_one_line(tmp_path, cluster, tracks, monkeypatch):
    f = write_wav(tmp_path / "x.wav", tracks["t0"])
    t0 = time.monotonic()
    with pytest.raises(
        ConnectError, match=r"cannot reach the Dask scheduler at tcp://127.0.0.1:9 .*refused"
    ):
        Index(tmp_path / "db").add([f], scheduler="tcp://127.0.0.1:9")
    # a refusal is an answer: not Dask's retries until its timeout
    assert time.monotonic() - t0 < CONNECT_TIMEOUT
    assert len(Index(tmp_path / "db")) == 0  # the index is still valid (and empty)

    # a worker whose PATH has Python but no ffmpeg
    bare = tmp_path / "bin"
    bare.mkdir()
    os.symlink(sys.executable, bare / "python")
    require(shutil.which("ffmpeg") is not None, "ffmpeg is not installed")
    cluster.add_worker("noffmpeg", env={**os.environ, "PATH": str(bare)})
    cluster.wait_named("noffmpeg")
    cli = subprocess.Popen(
        [COLABMAGIC, "fp", "index", "--db", str(tmp_path / "db"),
         str(f), "--scheduler", cluster.address],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    with pytest.raises(
        ParameterError, match=r"Dask worker\(s\) tcp://127.0.0.1:\d+ have no ffmpeg"
    ):
        dedup([f], scheduler=cluster.address)
    _, err = cli.communicate(timeout=120)
    assert cli.returncode == 1
    assert err.strip().splitlines()[-1].startswith("Error: Dask worker(s) tcp://127.0.0.1:")
    assert "Traceback" not in err
    assert len(Index(tmp_path / "db")) == 0
    cluster.kill("noffmpeg")
    cluster.wait_named("noffmpeg", present=False)  # gone before the next test's job


def test_index_survives_a_worker_sigkill_and_equals_a_local_run(tmp_path, cluster, many_files):
    """Last in this module: it leaves the cluster one worker short (restarting one costs
    seconds, and the tests before it need any worker, not two)."""
    jobs = [Job(str(f), str(f), content_hash(f)) for f in many_files]
    local = Index(tmp_path / "local")
    local.add_jobs(jobs, workers=1, backend="numpy", commit_seconds=0)
    killed = {}

    def kill_w1_midway(number, _extracted):
        if number == 3:  # results have come back; the rest is queued on both workers
            with cluster.client() as c:
                w1 = [a for a, info in c.scheduler_info(n_workers=-1)["workers"].items()
                      if info["name"] == "w1"]  # fmt: skip

                def w1_busy():  # between two tasks w1 can show none: wait for it to take one
                    killed["had_tasks"] = len(c.processing().get(w1[0], ()))
                    return killed["had_tasks"]

                with contextlib.suppress(TimeoutError):
                    wait_until(w1_busy, timeout=10, interval=0.005, what="w1 to hold a task")
            cluster.kill("w1")

    remote = Index(tmp_path / "remote")
    s = remote.add_jobs(
        jobs, scheduler=cluster.address, backend="numpy", commit_seconds=0,
        on_added=kill_w1_midway,
    )  # fmt: skip
    assert killed["had_tasks"] >= 1, "w1 was idle when killed; the test proved nothing"
    assert cluster.killed["w1"].returncode == -9
    assert (s.added, s.skipped) == (len(jobs), 0)
    assert _snapshot(remote) == _snapshot(local)
    assert [t.number for t in remote.tracks] == list(range(len(jobs)))  # each file once
