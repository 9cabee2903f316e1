"""File copies carried by the OpenSSH client (``colabmagic.transport.ssh_pipe``), against a real
sshd: the route, what it is built from (alias, jump host), when it is taken, its fallback to
paramiko, and host keys. The resume-after-a-cut tests in ``test_transfer.py`` run on this route
too (``via``)."""

from __future__ import annotations

import logging
import os
import sys

import pytest

from colabmagic import hosthelper
from colabmagic.errors import HostKeyError, ParameterError
from colabmagic.testing import require, wait_until
from colabmagic.testing_sshd import SSHServer, locked_key_config, processes
from colabmagic.testing_sshd import ssh_transport as transport
from colabmagic.transport import ssh_pipe

pytestmark = pytest.mark.ssh
MiB = 1 << 20


@pytest.fixture(autouse=True)
def _needs_ssh(monkeypatch):
    require(ssh_pipe.ssh_binary() is not None, "the OpenSSH client is not installed")
    # what a fresh ssh needs to pay (128 MiB on loopback), scaled down to keep the tests small
    monkeypatch.setattr(hosthelper, "OPENSSH_MIN", 4 * MiB)


def payload(path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def ssh_children() -> list[int]:
    """Our ``ssh`` client processes."""
    out = []
    for pid in processes(ppid=os.getpid()):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == "ssh":
                    out.append(pid)
        except OSError:
            pass
    return out


def test_upload_and_download_through_openssh(sshd_server, colabmagic_root, tmp_path):
    data = payload(tmp_path / "a.bin", 9 * MiB + 123)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "x.txt").write_text("x\n")
    (tree / "y.bin").write_bytes(data[:5000])
    t = transport(sshd_server, colabmagic_root)
    try:
        n = t.upload(str(tmp_path / "a.bin"), str(tmp_path / "up.bin"), via="openssh")
        assert (n, n.via) == (len(data), "openssh")
        assert (tmp_path / "up.bin").read_bytes() == data
        n = t.download(str(tmp_path / "up.bin"), str(tmp_path / "down.bin"), via="openssh")
        assert (n, n.via) == (len(data), "openssh")
        assert (tmp_path / "down.bin").read_bytes() == data
        n = t.upload(str(tree), str(tmp_path / "tree-up"), via="openssh", compress="zstd")
        assert (n, n.via) == (5002, "openssh")
        assert (tmp_path / "tree-up" / "sub" / "x.txt").read_text() == "x\n"
        assert (tmp_path / "tree-up" / "y.bin").read_bytes() == data[:5000]
        assert not list(tmp_path.rglob("*.colabmagic-part"))
        # its private config: BatchMode, only the key this transport verified, no user config
        route = ssh_pipe.route(t)
        config = open(route.config).read()
        assert "BatchMode yes" in config
        assert "StrictHostKeyChecking yes" in config
        assert f"Port {sshd_server.port}" in config
        assert oct(os.stat(route.dir).st_mode & 0o777) == "0o700"
        assert route.argv("true")[1:3] == ["-F", route.config]
    finally:
        t.close()
    assert not os.path.exists(route.dir), "close() removes the route's files"
    wait_until(lambda: not ssh_children(), what="close() ends the spare ssh")


def test_auto_takes_openssh_for_large_copies_and_keeps_paramiko_for_small(
    sshd_server, colabmagic_root, tmp_path
):
    big = payload(tmp_path / "big.bin", hosthelper.OPENSSH_MIN + MiB)
    payload(tmp_path / "small.bin", 1000)
    t = transport(sshd_server, colabmagic_root)
    try:
        # a fresh transport, no spare: a small copy does not wait for ssh's handshake
        assert t.upload(str(tmp_path / "small.bin"), str(tmp_path / "s1")).via == "paramiko"
        # ... and the spare it left is an ssh one, which the next copy takes, small or not
        assert hosthelper.wait_spare(t)
        assert hosthelper._spares[t][0] == "openssh"
        assert t.upload(str(tmp_path / "small.bin"), str(tmp_path / "s2")).via == "openssh"
    finally:
        t.close()
    t = transport(sshd_server, colabmagic_root)
    try:
        assert t.upload(str(tmp_path / "big.bin"), str(tmp_path / "b1")).via == "openssh"
    finally:
        t.close()
    t = transport(sshd_server, colabmagic_root)
    try:  # a download learns its size from the host: it moves to ssh once it knows
        n = t.download(str(tmp_path / "b1"), str(tmp_path / "b2"))
        assert (n, n.via) == (len(big), "openssh")
        assert (tmp_path / "b2").read_bytes() == big
    finally:
        t.close()


def test_through_a_jump_host(sshd_server, colabmagic_root, tmp_path):
    jump = SSHServer(
        "jump", directory=str(tmp_path / "jump"), client_key=sshd_server.client_key
    ).start()
    try:
        cfg = tmp_path / "config"
        cfg.write_text(jump.config_block() + sshd_server.config_block(ProxyJump="jump"))
        data = payload(tmp_path / "j.bin", 2 * MiB)
        t = transport(sshd_server, colabmagic_root, ssh_config=str(cfg))
        try:
            n = t.upload(str(tmp_path / "j.bin"), str(tmp_path / "j-up.bin"), via="openssh")
            assert n.via == "openssh"
            assert (tmp_path / "j-up.bin").read_bytes() == data
            assert "ProxyJump colabmagic-hop-0" in open(ssh_pipe.route(t).config).read()
        finally:
            t.close()
    finally:
        jump.stop()


def test_without_ssh_on_path_copies_go_through_paramiko(
    sshd_server, colabmagic_root, tmp_path, monkeypatch
):
    data = payload(tmp_path / "a.bin", hosthelper.OPENSSH_MIN + MiB)
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert ssh_pipe.ssh_binary() is None
    t = transport(sshd_server, colabmagic_root)
    try:
        n = t.upload(str(tmp_path / "a.bin"), str(tmp_path / "up.bin"))
        assert (n, n.via) == (len(data), "paramiko")
        n = t.download(str(tmp_path / "up.bin"), str(tmp_path / "down.bin"))
        assert n.via == "paramiko"
        assert (tmp_path / "down.bin").read_bytes() == data
        with pytest.raises(ParameterError, match="needs the OpenSSH client"):
            t.upload(str(tmp_path / "a.bin"), "x", via="openssh")
        with pytest.raises(ParameterError, match="via='scp' is not one of"):
            t.upload(str(tmp_path / "a.bin"), "x", via="scp")
    finally:
        t.close()


def test_ssh_failing_where_paramiko_works_falls_back_and_says_so(
    sshd_server, colabmagic_root, tmp_path, monkeypatch, caplog
):
    """A passphrase-protected key that is in no agent: paramiko asks for its passphrase, ssh
    (BatchMode) cannot; the copy goes through paramiko, and the next ones do not try ssh."""
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    cfg = locked_key_config(sshd_server, tmp_path, "s3cret")
    data = payload(tmp_path / "a.bin", hosthelper.OPENSSH_MIN + MiB)
    t = transport(sshd_server, colabmagic_root, ssh_config=cfg, passphrase=lambda p: "s3cret")
    caplog.set_level(logging.INFO, logger="colabmagic")
    try:
        n = t.upload(str(tmp_path / "a.bin"), str(tmp_path / "up.bin"))
        assert (n, n.via) == (len(data), "paramiko")
        assert (tmp_path / "up.bin").read_bytes() == data
        warned = [r.getMessage() for r in caplog.records if "go through paramiko" in r.message]
        assert len(warned) == 1
        assert "Permission denied" in warned[0]
        assert ssh_pipe.route(t) is None  # disabled for this transport
        assert t.download(str(tmp_path / "up.bin"), str(tmp_path / "d.bin")).via == "paramiko"
        assert any("via paramiko" in r.getMessage() for r in caplog.records)
    finally:
        t.close()


def test_a_host_key_other_than_the_verified_one_is_one_clear_error(
    sshd_server, colabmagic_root, tmp_path
):
    """ssh trusts only the key this transport's connection verified: a different server behind
    the same name (the ProxyCommand now leads elsewhere) is refused at once, not retried."""
    other = SSHServer(
        "other", directory=str(tmp_path / "other"), client_key=sshd_server.client_key
    ).start()
    try:
        port_file = tmp_path / "port"
        port_file.write_text(str(sshd_server.port))
        proxy = (
            f"sh -c 'exec {sys.executable} -m colabmagic.testing_wan 127.0.0.1 $(cat {port_file})'"
        )
        payload(tmp_path / "a.bin", 1000)
        t = transport(sshd_server, colabmagic_root, proxy_command=proxy)
        try:
            t.connection()  # verified: the real server's key
            port_file.write_text(str(other.port))  # from now on the name leads elsewhere
            with pytest.raises(HostKeyError, match="not the one this session verified") as exc:
                t.upload(str(tmp_path / "a.bin"), str(tmp_path / "up.bin"), via="openssh")
            assert "\n" not in str(exc.value)
            assert not (tmp_path / "up.bin").exists()
        finally:
            t.close()
    finally:
        other.stop()


def test_an_unknown_host_key_is_one_clear_error_at_once(sshd_server, colabmagic_root, tmp_path):
    cfg = tmp_path / "config"
    (tmp_path / "kh").write_text("")
    cfg.write_text(sshd_server.config_block(UserKnownHostsFile=str(tmp_path / "kh")))
    payload(tmp_path / "a.bin", 1000)
    t = transport(sshd_server, colabmagic_root, ssh_config=str(cfg))
    try:
        with pytest.raises(HostKeyError, match="--accept-new-host-key") as exc:
            t.upload(str(tmp_path / "a.bin"), str(tmp_path / "up.bin"), retries=8)
        assert "\n" not in str(exc.value)
    finally:
        t.close()


def test_the_next_copy_takes_the_ssh_spare(sshd_server, colabmagic_root, tmp_path, monkeypatch):
    started = []
    real = ssh_pipe.OpenSSHRoute.argv
    monkeypatch.setattr(
        ssh_pipe.OpenSSHRoute, "argv", lambda self, c: started.append(1) or real(self, c)
    )
    data = payload(tmp_path / "a.bin", 300_000)
    t = transport(sshd_server, colabmagic_root)
    try:
        t.upload(str(tmp_path / "a.bin"), str(tmp_path / "up1.bin"), via="openssh")
        assert hosthelper.wait_spare(t)
        assert len(started) == 2  # the copy's ssh, and the spare
        n = t.upload(str(tmp_path / "a.bin"), str(tmp_path / "up2.bin"), via="openssh")
        assert n.via == "openssh"
        assert hosthelper.wait_spare(t)
        assert len(started) == 3  # the copy took the spare; one new spare
        dead = hosthelper._spares[t][1].result()
        dead.proc.kill()  # as when its connection dropped
        dead.proc.wait()
        n = t.download(str(tmp_path / "up2.bin"), str(tmp_path / "down.bin"), via="openssh")
        assert (tmp_path / "down.bin").read_bytes() == data
        assert len(started) >= 4
    finally:
        t.close()
    wait_until(lambda: not ssh_children(), what="close() ends the spare ssh")


def test_the_magics_say_what_carried_the_copy(ip, sshd_server, colabmagic_root, tmp_path, capsys):
    from colabmagic.session import Session, registry

    data = payload(tmp_path / "a.bin", hosthelper.OPENSSH_MIN + 1)
    s = Session.start(transport(sshd_server, colabmagic_root), name="pipemagic")
    registry.add(s)
    try:
        ip.run_line_magic("colab_upload", f"--on pipemagic {tmp_path / 'a.bin'} {tmp_path / 'u'}")
        assert f"uploaded {len(data)} bytes (via openssh)" in capsys.readouterr().out
        ip.run_line_magic(
            "colab_download", f"--on pipemagic {tmp_path / 'u'} {tmp_path / 'd'} --compress none"
        )
        assert f"downloaded {len(data)} bytes (via openssh)" in capsys.readouterr().out
        assert (tmp_path / "d").read_bytes() == data
    finally:
        ip.run_line_magic("colab_disconnect", "pipemagic")
