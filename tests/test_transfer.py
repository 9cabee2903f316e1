"""Streamed push/pull, compression where it pays, resumable files: over a real OpenSSH sshd, and
through the emulated WAN link (``colabmagic.testing_wan``) for slow links and cuts."""

from __future__ import annotations

import hashlib
import os
import sys
import threading

import numpy as np
import pytest

from colabmagic import filecopy, hosthelper, transfer
from colabmagic.errors import ParameterError, TransferError
from colabmagic.relay import QuietRelay
from colabmagic.session import Session
from colabmagic.testing import require, wait_until
from colabmagic.testing_wan import WanRelay
from colabmagic.transport import ssh_pipe
from colabmagic.transport.ssh import SSHTransport

pytestmark = pytest.mark.ssh
MiB = 1 << 20
LOST = 8 * MiB  # the most one cut may cost: the data in flight when the link dropped
# What carries a file copy over SSH: the OpenSSH client, or an exec channel (its fallback).
VIAS = pytest.mark.parametrize("via", ["openssh", "paramiko"])


def ssh_transport(server, root, *, proxy_command: str | None = None) -> SSHTransport:
    return SSHTransport(
        server.name,
        ssh_config=server.ssh_config,
        python=sys.executable,
        root=str(root),
        connect_timeout=10,
        proxy_command=proxy_command,
    )


def through(relay: WanRelay) -> str:
    """A ProxyCommand that reaches sshd through *relay* (whose counters and cuts then apply)."""
    return f"{sys.executable} -m colabmagic.testing_wan 127.0.0.1 {relay.port}"


def slow_link(rate: float, delay: float = 0.01) -> str:
    return f"{sys.executable} -m colabmagic.testing_wan --delay {delay} --rate {rate:.0f} %h %p"


@pytest.fixture(scope="module")
def session(sshd_server, colabmagic_root):
    s = Session.start(ssh_transport(sshd_server, colabmagic_root), name="transfer")
    yield s
    s.close()


@pytest.fixture
def relay(sshd_server):
    with WanRelay(("127.0.0.1", sshd_server.port)) as r:
        yield r


def sparse(nbytes: int, seed: int = 0) -> np.ndarray:
    """float32, 90 % zeros: activations after a ReLU, a pruned weight matrix."""
    rng = np.random.default_rng(seed)
    a = rng.random(nbytes // 4, dtype=np.float32)
    a[rng.random(a.size) < 0.9] = 0
    return a


def noise(nbytes: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def run(session, code: str) -> str:
    return session.run(code, relay=QuietRelay()).stdout.strip()


# -- streamed push/pull --------------------------------------------------------------------
# What carries a large push/pull over SSH: chunk messages on the comm, or a stream of its own
# that the kernel reads (colabmagic.transfer_direct; more of it in test_transfer_direct.py).
ROUTES = pytest.mark.parametrize("route", ["comm", "openssh"], indirect=True)


@pytest.fixture
def route(session, request):
    if request.param == "openssh":
        require(ssh_pipe.ssh_binary() is not None, "the OpenSSH client is not installed")
    session.bulk.via = request.param
    yield request.param
    session.bulk.via = "auto"


@ROUTES
def test_streamed_push_pull_many_frames_content_and_writable(session, route):
    a = noise(9 * MiB + 123)
    a[0] = 1
    b = np.arange(3 * MiB, dtype=np.int64).reshape(1024, -1)[:, ::2]  # not contiguous: a copy
    big_list = list(range(200_000))  # the pickle itself is larger than a chunk's inline limit
    stats = session.push(a=a, b=b, big_list=big_list, compress="none")
    assert stats.via == route
    assert stats.chunks > 3 if route == "comm" else stats.chunks == 0
    assert stats.wire_bytes == stats.raw_bytes > 9 * MiB
    out = run(
        session,
        "import hashlib; a[0] = 7; "
        "print(hashlib.sha256(a[1:]).hexdigest(), b.shape, big_list[-1], a.flags.writeable)",
    )
    assert out.split()[0] == hashlib.sha256(a[1:]).hexdigest()
    assert out.endswith("199999 True")
    back = session.pull("a", "b", "big_list", compress="none")
    assert session.bulk.last.via == route
    assert session.bulk.last.chunks > 3 if route == "comm" else session.bulk.last.chunks == 0
    assert back["a"][0] == 7
    assert np.array_equal(back["a"][1:], a[1:])
    assert np.array_equal(back["b"], b)
    assert back["big_list"] == big_list
    assert back["a"].flags.writeable
    assert back["b"].flags.writeable
    assert a[0] == 1, "the local array is not aliased"
    run(session, "del a, b, big_list")


def test_explicit_zstd_none_and_bad_mode(session):
    x = sparse(12 * MiB)
    z = session.push(x=x, compress="zstd")
    assert z.compressed_chunks == z.chunks - 1  # all but the pickle's few bytes
    assert z.wire_bytes < 0.4 * z.raw_bytes
    n = session.push(x=x, compress="none")
    assert n.compressed_chunks == 0
    assert n.wire_bytes == n.raw_bytes
    back = session.pull("x", compress="zstd")
    assert np.array_equal(back, x)
    assert session.bulk.last.compressed_chunks > 0
    with pytest.raises(ParameterError, match="compress='gzip' is not one of auto, zstd, none"):
        session.push(x=x, compress="gzip")
    run(session, "del x")


def test_a_remote_without_zstandard_gets_raw_chunks(session):
    """zstandard is optional on the host: without it every mode falls back to raw chunks."""
    run(session, "import _colabmagic_kernel as k; k._saved, k._zstd = k._zstd, None")
    try:
        session._refresh_remote_info()
        assert session.remote_info["zstd"] is False
        x = sparse(8 * MiB)
        st = session.push(x=x, compress="zstd")
        assert st.compressed_chunks == 0
        assert np.array_equal(session.pull("x", compress="zstd"), x)
        assert session.bulk.last.compressed_chunks == 0
    finally:
        run(session, "import _colabmagic_kernel as k; k._zstd = k._saved; del x")
        session._refresh_remote_info()
    assert session.remote_info["zstd"] is True


def test_compress_auto_both_ways_on_a_slow_link(sshd_server, colabmagic_root):
    """At 8 MB/s, auto compresses sparse floats and int8 labels, and sends noise raw."""
    t = ssh_transport(sshd_server, colabmagic_root, proxy_command=slow_link(8e6))
    s = Session.start(t, name="slow-link")
    try:
        data = {
            "sparse": sparse(12 * MiB),
            "labels": np.random.default_rng(2).integers(0, 10, 8 * MiB, dtype=np.int8),
            "noise": noise(6 * MiB),
        }
        for name, value in data.items():
            st = s.push(**{name: value})
            back = s.pull(name)
            pulled = s.bulk.last
            assert np.array_equal(back, value), name
            if name == "noise":
                assert st.compressed_chunks == 0
                assert st.wire_bytes == st.raw_bytes
                assert pulled.compressed_chunks == 0
                assert pulled.wire_bytes == pulled.raw_bytes
            else:
                assert st.compressed_chunks == st.chunks - 1, (name, st)  # not the tiny pickle
                assert st.wire_bytes < 0.6 * st.raw_bytes, (name, st)
                assert pulled.compressed_chunks == pulled.chunks - 1, (name, pulled)
    finally:
        s.close()


# -- bounded memory ------------------------------------------------------------------------
def _reset_peak(pid: int) -> int:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    return _status(pid, "VmRSS")


def _status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(field)


@pytest.mark.slow
@ROUTES
def test_two_gib_push_and_pull_in_bounded_memory_on_both_ends(session, route):
    size = 2 << 30
    info = session.proxy.agent_info
    pids = {"local": os.getpid(), "agent": info["agent_pid"], "kernel": info["kernel_pid"]}
    x = np.arange(size // 8, dtype=np.uint64)
    limit = 64 * MiB
    slack = 4 * MiB  # Linux counts RSS per thread in batches: VmHWM can lag by some pages

    base = {k: _reset_peak(p) for k, p in pids.items()}
    assert session.push(x=x, compress="none").via == route
    grew = {k: _status(p, "VmHWM") - base[k] for k, p in pids.items()}
    assert grew["local"] <= limit, grew
    assert grew["agent"] <= limit, grew
    assert size - slack <= grew["kernel"] <= size + limit, grew
    n = size // 8
    out = run(session, "print(int(x.sum(dtype='uint64')), x.flags.writeable, x.flags.owndata)")
    assert out.split()[:2] == [str((n * (n - 1) // 2) % 2**64), "True"]

    base = {k: _reset_peak(p) for k, p in pids.items()}
    back = session.pull("x", compress="none")
    assert session.bulk.last.via == route
    grew = {k: _status(p, "VmHWM") - base[k] for k, p in pids.items()}
    assert size - slack <= grew["local"] <= size + limit, grew
    assert grew["agent"] <= limit, grew
    assert grew["kernel"] <= limit, grew
    assert back.flags.writeable
    assert np.array_equal(back, x)
    del back
    run(session, "del x")


# -- resumable, verified, atomic files -----------------------------------------------------
def _cut_at(relay: WanRelay, marks: list[int]) -> threading.Thread:
    """Cut the relay's connections each time the bytes it carried upstream pass a mark."""

    def watch():
        for mark in marks:
            wait_until(lambda m=mark: relay.bytes_up >= m, timeout=300, what="upload progress")
            relay.cut()

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def _upload_with_cuts(
    server, root, tmp_path, relay, size: int, limit: float, via: str = "auto"
) -> None:
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for _ in range(size // (16 * MiB)):
            f.write(os.urandom(16 * MiB))
    dest = tmp_path / "remote" / "big.bin"
    t = ssh_transport(server, root, proxy_command=through(relay))
    try:
        watcher = _cut_at(relay, [int(size * k / 4) for k in (1, 2, 3)])
        n = t.upload(str(src), str(dest), compress="none", progress=False, via=via)
        watcher.join(5)
    finally:
        t.close()
    assert n == size
    assert not watcher.is_alive(), "the three cuts happened"
    assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    assert not (dest.parent / f".{dest.name}.colabmagic-part").exists()
    assert relay.bytes_up <= limit, f"{relay.bytes_up / size:.3f} x the file crossed the link"


@VIAS
def test_upload_cut_three_times_resumes(sshd_server, colabmagic_root, tmp_path, relay, via):
    # what a cut costs is what was in flight (SSH window, pipe and socket buffers): a few MiB
    limit = 96 * MiB + 3 * LOST
    _upload_with_cuts(sshd_server, colabmagic_root, tmp_path, relay, 96 * MiB, limit, via)


@pytest.mark.slow
def test_one_gib_upload_cut_three_times_sends_at_most_1_1_gib(
    sshd_server, colabmagic_root, tmp_path, relay
):
    _upload_with_cuts(sshd_server, colabmagic_root, tmp_path, relay, 1 << 30, 1.1 * (1 << 30))


@VIAS
def test_partial_upload_resumes_and_a_corrupted_one_is_redone(
    sshd_server, colabmagic_root, tmp_path, relay, via
):
    data = noise(32 * MiB, seed=5).tobytes()
    src = tmp_path / "w.bin"
    src.write_bytes(data)
    remote = tmp_path / "remote"
    remote.mkdir()
    part = remote / ".w.bin.colabmagic-part"
    t = ssh_transport(sshd_server, colabmagic_root, proxy_command=through(relay))
    try:
        # a true prefix (an upload interrupted earlier): only the rest crosses
        part.write_bytes(data[: 24 * MiB])
        relay.reset_counters()
        t.upload(str(src), str(remote), compress="none", progress=False, via=via)
        assert (remote / "w.bin").read_bytes() == data
        assert not part.exists()
        assert relay.bytes_up < 10 * MiB, relay.bytes_up
        # a corrupted prefix: detected, and the whole file is sent again
        (remote / "w.bin").unlink()
        part.write_bytes(data[:1000] + b"X" + data[1001 : 24 * MiB])
        relay.reset_counters()
        t.upload(str(src), str(remote), compress="none", progress=False, via=via)
        assert (remote / "w.bin").read_bytes() == data
        assert not part.exists()
        assert relay.bytes_up > 32 * MiB
    finally:
        t.close()


@VIAS
def test_download_resumes_after_a_cut_and_redoes_a_corrupted_partial(
    sshd_server, colabmagic_root, tmp_path, relay, via
):
    data = noise(48 * MiB, seed=6).tobytes()
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "r.bin").write_bytes(data)
    here = tmp_path / "here"
    here.mkdir()
    part = here / ".r.bin.colabmagic-part"
    t = ssh_transport(sshd_server, colabmagic_root, proxy_command=through(relay))
    try:

        def watch():
            wait_until(lambda: relay.bytes_down >= 20 * MiB, timeout=120, what="download")
            relay.cut()

        cutter = threading.Thread(target=watch, daemon=True)
        cutter.start()
        n = t.download(str(remote / "r.bin"), str(here), compress="none", progress=False, via=via)
        assert n.via == via
        cutter.join(5)
        assert (here / "r.bin").read_bytes() == data
        assert not part.exists()
        # one cut costs at most what was in flight: the SSH window, and the frame being read
        assert relay.bytes_down <= len(data) + LOST + filecopy.CHUNK
        # a corrupted local partial file is redone from the start
        (here / "r.bin").unlink()
        part.write_bytes(b"garbage" * 1000)
        n = t.download(str(remote / "r.bin"), str(here), compress="none", progress=False, via=via)
        assert n.via == via
        assert (here / "r.bin").read_bytes() == data
        assert not part.exists()
    finally:
        t.close()


@VIAS
def test_a_failed_upload_leaves_no_target_and_the_next_call_resumes(
    sshd_server, colabmagic_root, tmp_path, relay, via
):
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.bin").write_bytes(noise(40 * MiB, seed=7).tobytes())
    (src / "b.txt").write_text("b\n")
    remote = tmp_path / "remote"
    t = ssh_transport(sshd_server, colabmagic_root, proxy_command=through(relay))
    try:
        relay.cut_after(16 * MiB)
        with pytest.raises(TransferError, match="run it again to resume"):
            t.upload(str(src), str(remote), compress="none", progress=False, retries=0, via=via)
        assert not (remote / "sub" / "a.bin").exists(), "never half a file under its name"
        assert (remote / "sub" / ".a.bin.colabmagic-part").exists()
        relay.reset_counters()
        n = t.upload(str(src), str(remote), compress="none", progress=False, via=via)
        assert (n, n.via) == (40 * MiB + 2, via)
        assert relay.bytes_up < 36 * MiB, "the second call resumed"
        assert (remote / "sub" / "a.bin").read_bytes() == (src / "sub" / "a.bin").read_bytes()
        assert (remote / "b.txt").read_text() == "b\n"
        leftovers = [p for p in remote.rglob("*") if p.name.endswith(".colabmagic-part")]
        assert not leftovers
    finally:
        t.close()


def test_files_compress_auto_on_a_slow_link(sshd_server, colabmagic_root, tmp_path):
    src = tmp_path / "sparse.npy"
    np.save(src, sparse(16 * MiB))
    size = src.stat().st_size
    with WanRelay(("127.0.0.1", sshd_server.port), delay=0.01, rate=8e6) as relay:
        t = ssh_transport(sshd_server, colabmagic_root, proxy_command=through(relay))
        try:
            t.upload(str(src), str(tmp_path / "up.npy"), progress=False)
            assert relay.bytes_up < 0.5 * size
            t.download(str(tmp_path / "up.npy"), str(tmp_path / "down.npy"), progress=False)
            assert relay.bytes_down < 0.5 * size
        finally:
            t.close()
    assert (tmp_path / "down.npy").read_bytes() == src.read_bytes()
    with pytest.raises(ParameterError, match="compress="):
        filecopy.upload(t, str(src), "x", compress="lz4")


def test_chunk_constants_bound_the_window():
    assert transfer.CHUNK * transfer.WINDOW <= 32 * MiB


def test_the_next_copy_takes_the_spare_helper(sshd_server, colabmagic_root, tmp_path):
    """Only the first copy pays an exec; a dead spare is skipped; close() ends the spare.

    On exec channels (``via="paramiko"``); ``test_ssh_pipe.py`` has the ssh spare's test."""
    t = ssh_transport(sshd_server, colabmagic_root)
    opened = []
    real = t._session_channel
    t._session_channel = lambda: opened.append(1) or real()
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(300_000))
    try:
        t.upload(str(src), str(tmp_path / "up1.bin"), progress=False, via="paramiko")
        assert hosthelper.wait_spare(t)
        spare = hosthelper._spares[t][1].result()
        assert spare.alive()
        assert len(opened) == 2
        t.upload(str(src), str(tmp_path / "up2.bin"), progress=False, retries=0, via="paramiko")
        assert hosthelper.wait_spare(t)
        assert len(opened) == 3  # the copy took the spare; one new spare, no other exec
        assert (tmp_path / "up2.bin").read_bytes() == src.read_bytes()
        dead = hosthelper._spares[t][1].result()
        dead.chan.close()  # as when its connection dropped
        n = t.download(
            str(tmp_path / "up2.bin"), str(tmp_path / "down.bin"), retries=0, via="paramiko"
        )
        assert n == 300_000
        assert (tmp_path / "down.bin").read_bytes() == src.read_bytes()
        assert hosthelper.wait_spare(t)
        last = hosthelper._spares[t][1].result()
    finally:
        t.close()
    wait_until(lambda: last.chan.closed, what="the spare closed with its transport")
    assert t not in hosthelper._spares


def _frames(stream) -> tuple[list[tuple[int, int]], bytes | None, bytes]:
    """The ``(codec, length)`` of each frame the host helper wrote, its sha256 frame (None if
    the stream ended first) and the payloads, joined."""
    from colabmagic.remote import files

    out, data = [], bytearray()
    while True:
        head = stream.read(files.FRAME.size)
        if len(head) < files.FRAME.size:
            return out, None, bytes(data)
        codec, n = files.FRAME.unpack(head)
        payload = stream.read(n)
        if codec == files.END:
            return out, payload, bytes(data)
        out.append((codec, n))
        data += payload


def _get(path: str, mode: str):
    """The host helper's ``get`` on *path* (run as the host runs it), asked for the whole file."""
    import json
    import subprocess

    from colabmagic.remote import files

    proc = subprocess.Popen(
        [sys.executable, files.__file__, "get", mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    proc.stdin.write(json.dumps({"src": path}).encode() + b"\n")
    proc.stdin.flush()
    assert json.loads(proc.stdout.readline())["files"][0]["size"] == os.path.getsize(path)
    proc.stdin.write(json.dumps({"i": 0, "offset": 0, "sha": "", "rate": 1e8}).encode() + b"\n")
    proc.stdin.flush()
    assert json.loads(proc.stdout.readline()) == {"offset": 0, "size": os.path.getsize(path)}
    return proc


def test_a_download_sends_raw_data_in_cache_sized_slices_and_a_shrinking_file_is_a_drop(tmp_path):
    """The host maps the file: raw data leaves in frames of ``SLICE`` bytes (hashed in place,
    sent by sendfile), compressible chunks still compressed whole; a file truncated under the
    helper ends its stream with no sha256 frame, which the client takes as a drop (and its
    retry reads the file as it is then: ``test_download_resumes_after_a_cut...``)."""
    from colabmagic.remote import files

    body = noise(9 * MiB + 12345)
    src = tmp_path / "src.bin"
    src.write_bytes(body.tobytes())
    for mode in ("none", "auto"):
        proc = _get(str(src), mode)
        frames, sha, data = _frames(proc.stdout)
        proc.stdin.close()
        assert proc.wait(10) == 0
        assert data == body.tobytes()
        assert sha.decode() == hashlib.sha256(data).hexdigest()
        assert {c for c, _ in frames} == {0}
        if mode == "none":
            assert [n for _, n in frames[:-1]] == [files.SLICE] * (len(frames) - 1)
    zeros = tmp_path / "zeros.bin"
    zeros.write_bytes(bytes(9 * MiB))
    proc = _get(str(zeros), "auto")
    frames, sha, data = _frames(proc.stdout)
    proc.stdin.close()
    assert proc.wait(10) == 0
    assert sha.decode() == hashlib.sha256(bytes(9 * MiB)).hexdigest()
    assert [c for c, _ in frames] == [1, 1, 1]  # whole 4 MiB chunks, compressed

    big = tmp_path / "big.bin"
    big.write_bytes(noise(32 * MiB, seed=5).tobytes())
    proc = _get(str(big), "none")
    codec, n = files.FRAME.unpack(proc.stdout.read(files.FRAME.size))
    assert (codec, n) == (0, files.SLICE)
    proc.stdout.read(n)
    os.truncate(big, 0)  # the helper is held by the full pipe meanwhile
    frames, sha, data = _frames(proc.stdout)
    assert sha is None, "a stream cut short by the file shrinking must not carry a sha256"
    proc.stdin.close()
    assert proc.wait(10) != 0
    assert len(data) < 32 * MiB


def test_auto_decides_a_chunk_from_a_sample_and_resamples_after_seven_chunks_of_raw_bytes():
    """``compress.Chooser``: what senders ask before reading (``due``), so that raw data can go
    in cache-sized slices between samples, and the cadence counted in bytes, whatever the
    slice size."""
    pytest.importorskip("zstandard")
    from colabmagic import compress

    c = compress.Chooser("auto", compress.RateMeter(1e9), peer_zstd=True)
    chunk = 4 * MiB
    random = noise(compress.SAMPLE).tobytes()
    assert c.due()
    assert not c.decide(random, chunk)  # incompressible at 1 GB/s: raw
    for _ in range(8 * chunk // (256 << 10) - 1):
        c.sent_raw(256 << 10)
        assert not c.due()
    c.sent_raw(256 << 10)
    assert c.due()  # the chunk itself and seven more went raw: sample again
    slow = compress.Chooser("auto", compress.RateMeter(6e6), peer_zstd=True)
    zeros = sparse(chunk).tobytes()
    assert slow.decide(zeros[chunk // 2 : chunk // 2 + compress.SAMPLE], chunk)
    codec, payload = slow.compress(zeros)
    assert codec == compress.ZSTD
    assert len(payload) < chunk // 4
    assert (slow.raw_bytes, slow.wire_bytes) == (chunk, len(payload))
    assert compress.Chooser("zstd", compress.RateMeter(), peer_zstd=True).decide(b"", 1)
    assert not compress.Chooser("none", compress.RateMeter(), peer_zstd=True).due()
