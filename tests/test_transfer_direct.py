"""Push/pull on their own OpenSSH-carried stream that the kernel reads itself
(``colabmagic.transfer_direct``), against a real sshd: the route and when it is taken, content
and writability, compression staying on the comm path, the fallback without ``ssh``, and an
``ssh`` killed mid-transfer. The 2 GiB bounded-memory test in ``test_transfer.py`` runs on both
routes."""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import sys
import threading

import numpy as np
import pytest

from colabmagic import hosthelper, serialize, transfer_direct
from colabmagic.errors import HostKeyError, ParameterError
from colabmagic.relay import QuietRelay
from colabmagic.session import Session
from colabmagic.testing import require, wait_until
from colabmagic.testing_sshd import SSHServer, locked_key_config, processes, ssh_transport
from colabmagic.transfer import TransferStats
from colabmagic.transport import ssh_pipe

pytestmark = pytest.mark.ssh
MiB = 1 << 20


@pytest.fixture(scope="module")
def session(sshd_server, colabmagic_root):
    require(ssh_pipe.ssh_binary() is not None, "the OpenSSH client is not installed")
    s = Session.start(ssh_transport(sshd_server, colabmagic_root), name="direct")
    yield s
    s.close()


@pytest.fixture
def via(session):
    yield session.bulk
    session.bulk.via = "auto"


def noise(nbytes: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def sparse(nbytes: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.random(nbytes // 4, dtype=np.float32)
    a[rng.random(a.size) < 0.9] = 0
    return a


def run(session, code: str) -> str:
    return session.run(code, relay=QuietRelay()).stdout.strip()


def remote_sha(session, name: str) -> str:
    return run(session, f"import hashlib; print(hashlib.sha256({name}).hexdigest())")


def kernel_state(session) -> str:
    """Transfers the kernel still holds (none once each ended, however it ended)."""
    return run(session, "import _colabmagic_kernel as k; print(len(k._directs), len(k._pushes))")


def test_auto_takes_the_stream_once_a_spare_is_ready(session, via):
    a = noise(24 * MiB + 5)
    b = np.arange(3 * MiB, dtype=np.int64).reshape(1024, -1)[:, ::2]  # not contiguous
    big_list = list(range(200_000))
    first = session.push(a=a, compress="none")
    assert (first.via, first.note) == ("comm", "")  # no spare yet, below FRESH_MIN: comm
    assert first.chunks > 3
    assert hosthelper.wait_spare(session.transport), "the comm push started a spare ssh helper"

    st = session.push(a=a, b=b, big_list=big_list, compress="none")
    assert (st.via, st.note) == ("openssh", "")
    assert st.chunks == 0
    assert st.raw_bytes > 24 * MiB
    out = run(
        session,
        "import hashlib; a[0] ^= 1; print(hashlib.sha256(a[1:]).hexdigest(), b.shape, "
        "big_list[-1], a.flags.writeable, b.flags.writeable)",
    )
    sha = hashlib.sha256(a[1:]).hexdigest()
    assert out.split() == [sha, "(1024,", "1536)", "199999", "True", "True"]

    # The push took the spare and started the next one; only a started spare is "ready" (one
    # still starting would cost this pull its handshake, more than the stream saves on a slow
    # link), so wait for it.
    assert hosthelper.wait_spare(session.transport)
    back = session.pull("a", "b", "big_list")  # compress auto: noise does not pay, raw stream
    assert session.bulk.last.via == "openssh"
    assert back["a"][0] == a[0] ^ 1
    assert np.array_equal(back["a"][1:], a[1:])
    assert np.array_equal(back["b"], b)
    assert back["big_list"] == big_list
    assert back["a"].flags.writeable
    back["a"][:] = 0  # writable for real, and not aliasing the local array
    assert a[1:].any()

    session.bulk.via = "scp"
    with pytest.raises(ParameterError, match="via='scp' is not one of auto, openssh, comm"):
        session.push(a=a)
    with pytest.raises(ParameterError, match="via='scp'"):
        session.pull("a")
    session.bulk.via = "auto"
    small = session.push(s=np.arange(10))  # inline values stay one message
    assert small.via == "comm"
    assert np.array_equal(session.pull("s"), np.arange(10))
    assert session.bulk.last.via == "comm"
    assert kernel_state(session) == "0 0"
    run(session, "del a, b, big_list, s")


def test_compression_stays_on_the_comm_path(session, via):
    via.via = "openssh"  # the size would take the stream: the codec decides
    x = sparse(12 * MiB)
    z = session.push(x=x, compress="zstd")
    assert z.via == "comm"
    assert z.compressed_chunks == z.chunks - 1
    assert np.array_equal(session.pull("x", compress="zstd"), x)
    assert session.bulk.last.via == "comm"
    assert session.bulk.last.compressed_chunks > 0

    session.bulk.meter.rate = 5e6  # as measured on a slow link: compressing sparse floats pays
    st = session.push(x=x)
    assert st.via == "comm"
    assert st.wire_bytes < 0.6 * st.raw_bytes
    session.bulk.meter.rate = 5e6
    assert np.array_equal(session.pull("x"), x)
    assert session.bulk.last.via == "comm"
    assert session.bulk.last.compressed_chunks > 0

    y = noise(12 * MiB)
    session.bulk.meter.rate = 5e6  # at any rate noise does not compress: raw, on the stream
    assert session.push(y=y).via == "openssh"
    assert remote_sha(session, "y") == hashlib.sha256(y).hexdigest()
    run(session, "del x, y")


def test_without_ssh_on_path_push_and_pull_take_the_comm_path(
    session, via, tmp_path, monkeypatch, caplog
):
    via.via = "openssh"
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    a = noise(10 * MiB)
    st = session.push(a=a, compress="none")
    assert (st.via, st.note) == ("comm", "")
    assert st.chunks > 1
    assert np.array_equal(session.pull("a", compress="none"), a)
    assert session.bulk.last.via == "comm"
    run(session, "del a")


def _ssh_children() -> list[int]:
    out = []
    for pid in processes(ppid=os.getpid()):
        try:
            if os.path.basename(os.readlink(f"/proc/{pid}/exe")) == "ssh":
                out.append(pid)
        except OSError:
            pass
    return out


def _moved(pid: int, counter: str) -> int:
    try:
        with open(f"/proc/{pid}/io") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith(counter + ":"))
    except (OSError, StopIteration):
        return 0


def _kill_ssh_after(nbytes: int, counter: str) -> threading.Thread:
    """Kill the ``ssh`` child whose stdin read (``rchar``) or stdout written (``wchar``) passes
    *nbytes*: mid-transfer, whatever the spare helpers idling beside it."""

    def watch():
        found = wait_until(
            lambda: next((p for p in _ssh_children() if _moved(p, counter) >= nbytes), None),
            timeout=120,
            interval=0.002,
            what="an ssh helper moving data",
        )
        os.kill(found, 9)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def _bulk_dirs() -> set[str]:
    return set(glob.glob(os.path.join("/tmp", "colabmagic-bulk-*")))


def test_an_ssh_killed_mid_push_binds_nothing_then_the_comm_path_redoes_it(session, via, caplog):
    via.via = "openssh"
    run(session, "x = 'old'")
    before = _bulk_dirs()
    x = noise(160 * MiB)
    frames = [memoryview(f).cast("B") for f in serialize.dumps({"x": x})]
    stats = TransferStats("push", raw_bytes=sum(f.nbytes for f in frames))
    killer = _kill_ssh_after(32 * MiB, "rchar")
    # the stream alone: broken midway, it says so and nothing is bound
    assert not transfer_direct.push(session.bulk, ["x"], frames, "none", stats, 60)
    killer.join(5)
    assert not killer.is_alive()
    assert "the ssh stream broke" in stats.note
    assert run(session, "print(x)") == "old"
    assert kernel_state(session) == "0 0"
    wait_until(lambda: _bulk_dirs() <= before, timeout=10, what="the kernel's socket directory")

    # through Session.push: redone on the comm path, one log line says so
    killer = _kill_ssh_after(32 * MiB, "rchar")
    with caplog.at_level("WARNING", logger="colabmagic.transfer"):
        st = session.push(x=x, compress="none")
    killer.join(5)
    assert not killer.is_alive()
    assert st.via == "comm"
    assert "redone on the comm path" in st.note
    assert any("redone on the comm path" in r.getMessage() for r in caplog.records)
    assert remote_sha(session, "x") == hashlib.sha256(x).hexdigest()
    assert kernel_state(session) == "0 0"


def test_an_ssh_killed_mid_pull_is_redone_on_the_comm_path(session, via):
    via.via = "openssh"
    x = noise(160 * MiB, seed=3)
    session.push(x=x, compress="none")
    killer = _kill_ssh_after(32 * MiB, "wchar")
    back = session.pull("x", compress="none")
    killer.join(5)
    assert not killer.is_alive()
    assert session.bulk.last.via == "comm"
    assert "redone on the comm path" in session.bulk.last.note
    assert np.array_equal(back, x)
    assert kernel_state(session) == "0 0"
    run(session, "del x")


def test_a_host_key_other_than_the_verified_one_is_one_clear_error_not_a_fallback(
    sshd_server, colabmagic_root, tmp_path
):
    """The stream's ssh trusts only the key the session's connection verified: a different
    server behind the same name fails the push at once, binding nothing."""
    require(ssh_pipe.ssh_binary() is not None, "the OpenSSH client is not installed")
    other = SSHServer(
        "other", directory=str(tmp_path / "other"), client_key=sshd_server.client_key
    ).start()
    port_file = tmp_path / "port"
    port_file.write_text(str(sshd_server.port))
    proxy = f"sh -c 'exec {sys.executable} -m colabmagic.testing_wan 127.0.0.1 $(cat {port_file})'"
    t = ssh_transport(sshd_server, colabmagic_root, proxy_command=proxy)
    s = Session.start(t, name="direct-hostkey")
    try:
        s.bulk.via = "openssh"
        port_file.write_text(str(other.port))  # from now on the name leads elsewhere
        with pytest.raises(HostKeyError, match="not the one this session verified") as exc:
            s.push(x=noise(9 * MiB))
        assert "\n" not in str(exc.value)
        port_file.write_text(str(sshd_server.port))
        assert run(s, "print('x' in dir())") == "False"
        assert kernel_state(s) == "0 0"
    finally:
        port_file.write_text(str(sshd_server.port))
        s.close()
        other.stop()


def test_ssh_failing_where_paramiko_works_takes_the_comm_path_and_says_so(
    sshd_server, colabmagic_root, tmp_path, monkeypatch, caplog
):
    """A passphrase-protected key in no agent: paramiko asks for the passphrase, ssh (BatchMode)
    cannot. Push and pull go on the comm path, one warning says why, and ssh is not retried."""
    require(ssh_pipe.ssh_binary() is not None, "the OpenSSH client is not installed")
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    cfg = locked_key_config(sshd_server, tmp_path, "s3cret")
    t = ssh_transport(sshd_server, colabmagic_root, ssh_config=cfg, passphrase=lambda p: "s3cret")
    s = Session.start(t, name="direct-locked-key")
    caplog.set_level(logging.INFO, logger="colabmagic")
    try:
        s.bulk.via = "openssh"
        a = noise(10 * MiB)
        for _ in range(2):
            st = s.push(a=a, compress="none")
            assert st.via == "comm"
            assert np.array_equal(s.pull("a", compress="none"), a)
            assert s.bulk.last.via == "comm"
        warned = [r.getMessage() for r in caplog.records if "go through paramiko" in r.message]
        assert len(warned) == 1
        assert "Permission denied" in warned[0]
        assert kernel_state(s) == "0 0"
    finally:
        s.close()


def test_the_kernels_endpoint_is_private_and_takes_only_the_token(session):
    """The kernel's side alone, inside the kernel: a 0700 directory; a peer with the wrong token
    is dropped and the right one is still served; nothing is left once it is done."""
    out = run(
        session,
        "import _colabmagic_kernel as k, os, socket\n"
        "d = k._Direct('a' * 32, [bytearray(5)], outgoing=False)\n"
        "mode = oct(os.stat(d.dir).st_mode & 0o777)\n"
        "bad = socket.socket(socket.AF_UNIX); bad.connect(d.path); bad.sendall(b'b' * 32)\n"
        "dropped = bad.recv(1) == b''\n"
        "good = socket.socket(socket.AF_UNIX); good.connect(d.path)\n"
        "good.sendall(b'a' * 32 + b'hello')\n"
        "ack = good.recv(1); d.done.wait(10)\n"
        "print(mode, dropped, ack, bytes(d.frames[0]), d.error, os.path.exists(d.dir))\n"
        "bad.close(); good.close(); del d, bad, good, ack, dropped, mode, k, socket",
    )
    assert out == "0o700 True b'K' b'hello' None False"


def test_the_kernel_takes_sshds_pipes_and_reads_or_writes_them_itself(session):
    """The relay hands its stdin and stdout to the kernel (SCM_RIGHTS): inside the kernel, a
    peer that passes two pipes and then the token is served on those pipes, both ways; one that
    passes them with a wrong token is dropped and its pipes closed."""
    out = run(
        session,
        "import _colabmagic_kernel as k, os, socket\n"
        "def peer(d, token):\n"
        "    (ri, wi), (ro, wo) = os.pipe(), os.pipe()\n"
        "    s = socket.socket(socket.AF_UNIX); s.connect(d.path)\n"
        "    socket.send_fds(s, [b'F'], [ri, wo]); os.close(ri); os.close(wo)\n"
        "    os.write(wi, token)\n"
        "    return s, wi, ro\n"
        "d = k._Direct('a' * 32, [bytearray(5)], outgoing=False)\n"
        "bad, bwi, bro = peer(d, b'b' * 32)\n"
        "dropped = bad.recv(1) == b'' and os.read(bro, 1) == b''\n"
        "good, wi, ro = peer(d, b'a' * 32)\n"
        "os.write(wi, b'hello'); ack = os.read(ro, 1); d.done.wait(10)\n"
        "pushed = (dropped, ack, bytes(d.frames[0]), d.error, good.recv(1))\n"
        "d = k._Direct('c' * 32, [b'pulled', b'!'], outgoing=True)\n"
        "s, wi2, ro2 = peer(d, b'c' * 32)\n"
        "got = b''\n"
        "while len(got) < 7: got += os.read(ro2, 7)\n"
        "d.done.wait(10)\n"
        "print(*pushed, got, d.error, os.read(ro2, 1), os.path.exists(d.dir))\n"
        "for f in (wi, ro, bwi, bro, wi2, ro2): os.close(f)\n"
        "for x in (bad, good, s): x.close()\n"
        "del d, bad, good, s, peer, pushed, got, dropped, ack, k, socket",
    )
    assert out == "True b'K' b'hello' None b'' b'pulled!' None b'' False"


def test_push_and_pull_on_sshds_pipes_and_spliced_for_a_kernel_that_cannot_take_them(
    session, via, monkeypatch, caplog
):
    """Both routes of the stream, end to end: the kernel on sshd's pipes (what it says it can
    do), and the relay splicing them to the kernel's socket (a kernel that does not say so, as
    one started by an older colabmagic)."""
    via.via = "openssh"
    x = noise(12 * MiB, seed=7)
    connect = transfer_direct._connect
    for passed in (True, False):
        if not passed:
            monkeypatch.setattr(
                transfer_direct,
                "_connect",
                lambda h, ready, token, stats: connect(h, dict(ready, fds=False), token, stats),
            )
        caplog.clear()
        with caplog.at_level("INFO", logger="colabmagic.transfer"):
            st = session.push(x=x, compress="none")
            assert (st.via, st.pipes_passed) == ("openssh", passed)
            back = session.pull("x", compress="none")
        assert (session.bulk.last.via, session.bulk.last.pipes_passed) == ("openssh", passed)
        assert np.array_equal(back, x)
        assert back.flags.writeable
        how = "on sshd's pipes" if passed else "spliced"
        logged = [r.getMessage() for r in caplog.records if "via openssh" in r.getMessage()]
        assert len(logged) == 2, logged
        assert all(how in m for m in logged), logged
        assert kernel_state(session) == "0 0"
    run(session, "del x")
