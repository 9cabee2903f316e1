"""The SSH transport against real OpenSSH servers on 127.0.0.1.

The general session tests run over SSH too (``test_session.py``, ``transport_kind == "ssh"``);
these cover what only SSH has: host keys, keys and passphrases, jump hosts, a dying connection,
zero-install, SFTP, bad targets, > 1 GiB on one connection, and the GPU-host ``serve`` side.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

import colabmagic
from colabmagic import colab
from colabmagic.cli import main as cli
from colabmagic.errors import ConnectError, HostKeyError, ParameterError, TransferError
from colabmagic.relay import QuietRelay, Relay
from colabmagic.session import Session
from colabmagic.testing import wait_until
from colabmagic.testing_sshd import SSHServer, _free_port, python_without_colabmagic
from colabmagic.transport import ssh_connect
from colabmagic.transport.ssh import SSHTransport

pytestmark = pytest.mark.ssh


def transport(server: SSHServer, root, **kw) -> SSHTransport:
    kw.setdefault("ssh_config", server.ssh_config)
    kw.setdefault("python", sys.executable)
    kw.setdefault("connect_timeout", 10)
    return SSHTransport(kw.pop("alias", server.name), root=str(root), **kw)


def keygen(path, passphrase: str = "") -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-f", str(path)], check=True
    )
    return str(path)


@pytest.fixture(scope="module")
def jump_server(tmp_path_factory, sshd_server):
    """A second sshd, the jump host in front of ``sshd_server``, with the same client key."""
    server = SSHServer(
        "jump", directory=str(tmp_path_factory.mktemp("jump")), client_key=sshd_server.client_key
    ).start()
    yield server
    server.stop()


# -- targets and config ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("gpu-box", (None, "gpu-box", None)),
        ("me@10.0.0.5:2222", ("me", "10.0.0.5", 2222)),
        ("me@[::1]:2200", ("me", "::1", 2200)),
        ("ssh://u@h:22", ("u", "h", 22)),
    ],
)
def test_split_target(target, expected):
    assert ssh_connect.split_target(target) == expected


@pytest.mark.parametrize("bad", ["", "a b", "-oProxyCommand=x", "host:port"])
def test_bad_target_syntax_is_a_parameter_error(bad):
    with pytest.raises(ParameterError, match="not valid"):
        ssh_connect.split_target(bad)


def test_config_is_honoured_and_options_win(tmp_path):
    cfg = tmp_path / "config"
    cfg.write_text(
        "Host gpu\n    HostName 10.1.2.3\n    User alice\n    Port 2200\n"
        "    IdentityFile ~/keys/gpu\n    IdentitiesOnly yes\n    ServerAliveInterval 7\n"
        f"    UserKnownHostsFile {tmp_path}/kh\n    ProxyJump bastion,carol@inner:2022\n"
        "Host bastion\n    HostName 10.9.9.9\n    User bob\n"
    )
    chain = ssh_connect.resolve("gpu", ssh_config=str(cfg))
    assert [(h.hostname, h.user, h.port) for h in chain] == [
        ("10.9.9.9", "bob", 22),
        ("inner", "carol", 2022),
        ("10.1.2.3", "alice", 2200),
    ]
    dest = chain[-1]
    assert dest.identity_files == [os.path.expanduser("~/keys/gpu")]
    assert dest.identities_only
    assert dest.alive_interval == 7
    assert dest.known_hosts == [f"{tmp_path}/kh"]
    (only,) = ssh_connect.resolve(
        "root@gpu", port=22, identity="/k", proxy_command="nc %h %p", ssh_config=str(cfg)
    )
    assert (only.user, only.port, only.identity_files[0]) == ("root", 22, "/k")
    assert only.proxy_command == "nc 10.1.2.3 22"


# -- host keys -------------------------------------------------------------------------------
def _config_with_known_hosts(server: SSHServer, tmp_path, known: str) -> str:
    kh = tmp_path / "known_hosts"
    kh.write_text(known)
    cfg = tmp_path / "config"
    cfg.write_text(server.config_block(UserKnownHostsFile=str(kh)))
    return str(cfg)


def test_unknown_host_key_is_refused_then_accept_new_records_it(
    sshd_server, tmp_path, colabmagic_root
):
    cfg = _config_with_known_hosts(sshd_server, tmp_path, "")
    fp = subprocess.run(
        ["ssh-keygen", "-lf", sshd_server.host_key + ".pub"], capture_output=True, text=True
    ).stdout.split()[1]
    t = transport(sshd_server, colabmagic_root, ssh_config=cfg)
    with pytest.raises(HostKeyError) as info:
        t.list_kernels()
    text = str(info.value)
    assert fp in text
    assert "--accept-new-host-key" in text
    assert "\n" not in text
    t2 = transport(sshd_server, colabmagic_root, ssh_config=cfg, accept_new_host_key=True)
    assert isinstance(t2.list_kernels(), list)
    t2.close()
    assert (tmp_path / "known_hosts").read_text() == sshd_server.host_key_line() + "\n"
    t3 = transport(sshd_server, colabmagic_root, ssh_config=cfg)  # now known: no flag needed
    assert isinstance(t3.list_kernels(), list)
    t3.close()


def test_changed_host_key_is_always_refused(sshd_server, tmp_path, colabmagic_root):
    other = keygen(tmp_path / "other")
    kind, b64 = open(other + ".pub").read().split()[:2]
    cfg = _config_with_known_hosts(
        sshd_server, tmp_path, f"[127.0.0.1]:{sshd_server.port} {kind} {b64}\n"
    )
    t = transport(sshd_server, colabmagic_root, ssh_config=cfg, accept_new_host_key=True)
    with pytest.raises(HostKeyError, match=r"CHANGED.*man-in-the-middle"):
        t.list_kernels()
    assert (tmp_path / "known_hosts").read_text().count("\n") == 1, "nothing was recorded"


# -- keys ------------------------------------------------------------------------------------
def test_encrypted_key_asks_for_its_passphrase(sshd_server, tmp_path, colabmagic_root, monkeypatch):
    key = keygen(tmp_path / "locked", passphrase="s3cret pass")
    with open(os.path.join(sshd_server.dir, "authorized_keys"), "a") as f:
        f.write(open(key + ".pub").read())
    asked = []
    import getpass

    monkeypatch.setattr(getpass, "getpass", lambda prompt="": asked.append(prompt) or "s3cret pass")
    cfg = tmp_path / "config"
    cfg.write_text(sshd_server.config_block(IdentityFile=key))
    t = transport(sshd_server, colabmagic_root, ssh_config=str(cfg))
    assert isinstance(t.list_kernels(), list)
    t.close()
    assert len(asked) == 1
    assert "locked" in asked[0]


def test_ssh_agent_keys_are_used(sshd_server, tmp_path, colabmagic_root, monkeypatch):
    sock = str(tmp_path / "agent.sock")
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", sock], stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: os.path.exists(sock), timeout=10, what="ssh-agent socket")
        monkeypatch.setenv("SSH_AUTH_SOCK", sock)
        subprocess.run(["ssh-add", "-q", sshd_server.client_key], check=True, capture_output=True)
        cfg = tmp_path / "config"  # no IdentityFile: only the agent has the key
        cfg.write_text(
            f"Host box\n    HostName 127.0.0.1\n    Port {sshd_server.port}\n"
            f"    User {sshd_server.user}\n    UserKnownHostsFile {sshd_server.known_hosts}\n"
        )
        monkeypatch.setenv("HOME", str(tmp_path))  # no default ~/.ssh/id_* keys
        t = transport(sshd_server, colabmagic_root, ssh_config=str(cfg))
        assert isinstance(t.list_kernels(), list)
        t.close()
    finally:
        agent.terminate()
        agent.wait(5)


# -- bad targets: one clear line within the connect timeout ----------------------------------
def _bad(target, **kw):
    t0 = time.monotonic()
    with pytest.raises(ConnectError) as info:
        colabmagic.connect(target, register=False, connect_timeout=5, **kw)
    elapsed = time.monotonic() - t0
    text = str(info.value)
    assert "\n" not in text
    assert len(text) < 400
    assert elapsed < 6, f"took {elapsed:.1f}s"
    return text


def test_unknown_host(sshd_server, tmp_path):
    # A 64-character label is rejected before any DNS query (this sandbox reaches only loopback).
    text = _bad("nosuch-" + "x" * 60 + ".example", ssh_config=str(tmp_path / "none"))
    assert "Could not resolve host" in text


def test_refused_port(sshd_server, tmp_path):
    text = _bad(f"127.0.0.1:{_free_port()}", ssh_config=str(tmp_path / "none"))
    assert "Connection refused" in text
    assert "--port" in text


def test_wrong_key(sshd_server, tmp_path):
    cfg = tmp_path / "config"
    cfg.write_text(sshd_server.config_block(IdentityFile=keygen(tmp_path / "stranger")))
    text = _bad("box", ssh_config=str(cfg))
    assert "Permission denied (publickey)" in text
    assert "stranger" in text


def test_not_an_ssh_server(tmp_path):
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def http():
        conn, _ = listener.accept()
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.close()

    threading.Thread(target=http, daemon=True).start()
    try:
        text = _bad(f"127.0.0.1:{listener.getsockname()[1]}", ssh_config=str(tmp_path / "none"))
    finally:
        listener.close()
    assert "SSH" in text


@pytest.mark.parametrize(
    ("python", "words"),
    [("/nonexistent/python3", "no Python"), ("/bin/true", "does not run like Python")],
)
def test_non_python_remote(sshd_server, python, words):
    text = _bad("box", ssh_config=sshd_server.ssh_config, python=python)
    assert words in text
    assert "--python" in text


# -- jump hosts ------------------------------------------------------------------------------
def _jump_config(sshd_server, jump_server, tmp_path, how: str) -> str:
    behind = {"UserKnownHostsFile": sshd_server.known_hosts}
    if how == "jump":
        behind["ProxyJump"] = "jump"
    else:
        behind["ProxyCommand"] = f"ssh -F {tmp_path}/config -o BatchMode=yes -W %h:%p jump"
    cfg = tmp_path / "config"
    cfg.write_text(jump_server.config_block("jump") + sshd_server.config_block("behind", **behind))
    return str(cfg)


@pytest.mark.parametrize("how", ["jump", "command"])
def test_through_a_second_hop(sshd_server, jump_server, tmp_path, colabmagic_root, how):
    cfg = _jump_config(sshd_server, jump_server, tmp_path, how)
    t = transport(sshd_server, colabmagic_root, alias="behind", ssh_config=cfg)
    assert len(t.hops) == (2 if how == "jump" else 1)
    s = Session.start(t, name=f"hop-{how}")
    try:
        assert jump_server.connection_pids(), "the jump host carries the connection"
        assert s.run("6 * 7", relay=QuietRelay()).result.data["text/plain"] == "42"
        s.push(v=list(range(1000)))
        assert s.pull("v")[-1] == 999
    finally:
        s.close()


# -- the connection dies ---------------------------------------------------------------------
class Lines(Relay):
    def __init__(self, on_text):
        self.on_text = on_text
        self.text = ""

    def stream(self, name, text):
        self.text += text
        self.on_text(self.text)

    def display(self, *a, **k):
        pass

    def clear_output(self, wait):
        pass


def test_sshd_child_killed_mid_cell_every_line_once(sshd_server, colabmagic_root):
    s = Session.start(transport(sshd_server, colabmagic_root), name="drop")
    n = 100
    kills: list = []
    states: list[str] = []

    def on_text(text):
        if len(kills) < 2 and f"line {20 + 40 * len(kills)}\n" in text:
            kills.append(sshd_server.kill_connections())
            states.append(s.state)

    try:
        r = s.run(
            f"import time\nfor i in range({n}):\n    print('line', i, flush=True)\n"
            "    time.sleep(0.03)\n'done'",
            relay=Lines(on_text),
        )
        assert len(kills) == 2
        assert all(kills)
        assert r.stdout.splitlines() == [f"line {i}" for i in range(n)]
        assert r.result.data["text/plain"] == "'done'"
        assert s.transport.connections >= 3, "each reconnect is a new ssh connection"
        assert s.proxy.reconnects >= 2
    finally:
        s.close()


def test_unresponsive_server_is_detected_by_keepalive(sshd_server, tmp_path, colabmagic_root):
    cfg = tmp_path / "config"
    cfg.write_text(sshd_server.config_block(ServerAliveInterval="0.5", ServerAliveCountMax="2"))
    s = Session.start(transport(sshd_server, colabmagic_root, ssh_config=str(cfg)), name="frozen")
    frozen = sshd_server.connection_pids()
    try:
        s.run("x = 5", relay=QuietRelay())
        for pid in frozen:  # the TCP connection stays open, but nothing answers
            os.kill(pid, signal.SIGSTOP)
        wait_until(lambda: s.state.startswith("link-down"), timeout=10, what="link-down")
        assert "reconnecting, attempt" in s.state
        wait_until(lambda: s.proxy.state == "up", timeout=20, what="reconnect")
        assert s.transport.connections >= 2
        assert s.pull("x") == 5
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGCONT)
        s.close()


def test_attach_after_disconnect_keeps_state_and_cli_lists_it(sshd_server, colabmagic_root):
    s = Session.start(transport(sshd_server, colabmagic_root), name="keep")
    s.run("kept = {'a': 1}", relay=QuietRelay())
    kid = s.kernel_id
    s.close(keep=True)
    res = CliRunner().invoke(
        cli,
        [
            "kernels",
            "box",
            "--json",
            "-F",
            sshd_server.ssh_config,
            "--root",
            str(colabmagic_root),
            "--python",
            sys.executable,
        ],
    )
    assert res.exit_code == 0, res.output
    rows = {r["id"]: r for r in json.loads(res.output)}
    assert rows[kid]["attached"] is False
    assert rows[kid]["state"] == "idle"
    s2 = Session.start(transport(sshd_server, colabmagic_root), name="keep", attach=kid)
    try:
        assert s2.pull("kept") == {"a": 1}
    finally:
        s2.close()


def test_cli_kernels_bad_target_is_one_line(tmp_path):
    res = CliRunner().invoke(
        cli, ["kernels", f"127.0.0.1:{_free_port()}", "-F", str(tmp_path / "x")]
    )
    assert res.exit_code == 1
    assert res.output.count("\n") == 1
    assert "Connection refused" in res.output


# -- zero-install ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def bare_python(tmp_path_factory):
    return python_without_colabmagic(str(tmp_path_factory.mktemp("bare")))


def test_zero_install_ships_the_agent_code(sshd_server, bare_python, tmp_path, colabmagic_root):
    # sshd gives the remote command a fresh environment: probe without this run's PYTHONPATH.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([bare_python, "-c", "import colabmagic"], capture_output=True, env=env)
    assert probe.returncode != 0, "the bare interpreter must not see colabmagic"
    lib = tmp_path / "lib"
    t = transport(sshd_server, colabmagic_root, python=bare_python, lib_dir=str(lib))
    s = Session.start(t, name="bare", mock_gpu=True)
    try:
        (shipped,) = list(lib.iterdir())
        assert oct(lib.stat().st_mode & 0o777) == "0o700"
        assert oct(shipped.stat().st_mode & 0o777) == "0o700"
        assert (shipped / "colabmagic" / "remote" / "agent.py").exists()
        agent_pid = s.proxy.agent_info["agent_pid"]
        with open(f"/proc/{agent_pid}/environ", "rb") as f:
            environ = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        assert environ[b"PYTHONPATH"].decode().split(os.pathsep)[0] == str(shipped)
        kernel_pid = s.status()["kernel_pid"]
        with open(f"/proc/{kernel_pid}/environ", "rb") as f:
            kernel_env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        assert str(shipped).encode() not in kernel_env.get(b"PYTHONPATH", b""), (
            "the kernel must import the user's packages, not the shipped stand-in"
        )
        r = s.run(
            "import sys, cupy\nprint(sys.executable)\nint(cupy.arange(4).sum())", relay=QuietRelay()
        )
        assert r.stdout.strip() == bare_python
        assert r.result.data["text/plain"] == "6"
        s.push(a=[1, 2])
        assert s.pull("a") == [1, 2]
        before = shipped.stat().st_mtime_ns
        t2 = transport(sshd_server, colabmagic_root, python=bare_python, lib_dir=str(lib))
        assert isinstance(t2.list_kernels(), list)
        t2.close()
        assert shipped.stat().st_mtime_ns == before, "the shipped code is reused"
    finally:
        s.close()


# -- files -----------------------------------------------------------------------------------
def _tree(root) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def test_upload_download_round_trip_with_checksums(sshd_server, tmp_path, colabmagic_root):
    src = tmp_path / "data"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "big.bin").write_bytes(os.urandom(20 << 20))
    (src / "empty").write_bytes(b"")
    (src / "sub" / "a.txt").write_text("hello\n")
    (src / "sub" / "deeper" / "b.npy").write_bytes(os.urandom(300_001))
    remote = tmp_path / "remote"
    remote.mkdir()
    t = transport(sshd_server, colabmagic_root)
    try:
        n = t.upload(str(src), "data", cwd=str(remote))
        assert n == (20 << 20) + 6 + 300_001
        assert _tree(remote / "data") == _tree(src)
        back = tmp_path / "back"
        assert t.download("data", str(back), cwd=str(remote)) == n
        assert _tree(back) == _tree(src)
        # a single file into an existing directory keeps its name
        t.upload(str(src / "sub" / "a.txt"), str(remote))
        assert (remote / "a.txt").read_text() == "hello\n"
        with pytest.raises(TransferError, match="does not exist"):
            t.upload(str(tmp_path / "missing"), "x", cwd=str(remote))
        with pytest.raises(TransferError, match="does not exist on box"):
            t.download("missing", str(tmp_path / "x"), cwd=str(remote))
    finally:
        t.close()


# -- > 1 GiB each way on one connection (paramiko's re-key stall) ----------------------------
def test_more_than_a_gibibyte_each_way_on_one_connection(sshd_server, colabmagic_root):
    t = transport(sshd_server, colabmagic_root)
    total = (1 << 30) + (64 << 20)
    try:
        conn = t.connection()
        block = b"\0" * (4 << 20)
        up = conn.transport.open_session()
        up.exec_command("wc -c")
        for _ in range(total // len(block)):
            up.sendall(block)
        up.shutdown_write()
        assert int(up.makefile("rb").read().split()[0]) == total
        up.close()
        down = conn.transport.open_session()
        down.exec_command(f"head -c {total} /dev/zero")
        got = 0
        while data := down.recv(1 << 20):
            got += len(data)
        down.close()
        assert got == total
        for _ in range(20):  # channels opening and closing right after: no stall
            _, out, _ = t.exec("echo ok", timeout=10)
            assert out == b"ok\n"
        assert t.connections == 1
        assert conn.active
    finally:
        t.close()


# -- the GPU-host side -----------------------------------------------------------------------
def test_cloudflared_is_built_not_run():
    assert colab.cloudflared_command("/bin/cf", 2222) == [
        "/bin/cf",
        "tunnel",
        "--no-autoupdate",
        "--url",
        "ssh://localhost:2222",
    ]
    assert colab.cloudflared_asset("x86_64") == "cloudflared-linux-amd64"
    assert colab.cloudflared_asset("aarch64") == "cloudflared-linux-arm64"
    log = "INF |  https://quiet-lake-1234.trycloudflare.com  |\n"
    assert colab.parse_tunnel_host(log) == "quiet-lake-1234.trycloudflare.com"
    assert colab.parse_tunnel_host("starting...") is None
    with pytest.raises(ParameterError, match="tunnel='frp' is not supported"):
        colab.serve("ssh-ed25519 AAAA", tunnel="frp")


def test_bad_public_key_is_refused():
    with pytest.raises(ParameterError, match="not an OpenSSH public key"):
        colab.check_public_key("hello world")


def test_serve_starts_sshd_that_connect_can_use(sshd_server, tmp_path, colabmagic_root):
    key = keygen(tmp_path / "laptop")
    state = tmp_path / "state"
    keys = tmp_path / "authorized_keys"
    port = _free_port()
    info = colab.serve(
        key + ".pub",
        port=port,
        listen="127.0.0.1",
        host="127.0.0.1",
        alias="mygpu",
        state_dir=str(state),
        authorized_keys=str(keys),
        install=False,
        sshd_options={"StrictModes": "no"},  # the test's files live under /tmp (1777)
    )
    try:
        assert colab.authorize_key(key + ".pub", str(keys)) is False, "already authorized"
        assert oct(keys.stat().st_mode & 0o777) == "0o600"
        assert str(info) == info.connect_line()
        assert info.connect_line().startswith(
            f"%colab_connect colab://{info.user}@127.0.0.1:{port}?"
        )
        assert "Host mygpu" in info.ssh_config()
        assert f"Port {port}" in info.ssh_config()
        (tmp_path / "known_hosts").write_text(info.known_hosts())
        (tmp_path / "config").write_text(
            info.ssh_config()
            + f"    IdentityFile {key}\n    UserKnownHostsFile {tmp_path}/known_hosts\n"
        )
        t = SSHTransport(
            "mygpu",
            ssh_config=str(tmp_path / "config"),
            python=sys.executable,
            root=str(colabmagic_root),
            connect_timeout=10,
        )
        assert isinstance(t.list_kernels(), list)
        t.close()
    finally:
        assert colab.stop(str(state)) == [info.sshd_pid]
