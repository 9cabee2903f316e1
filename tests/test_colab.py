"""Colab end to end, as a new user meets it: one pasted line connects, a recycled runtime is told
apart and its variables come back, the tunnel client is built in.

Real parts: OpenSSH sshd started by ``serve()`` itself, real kernels, a fresh ``HOME`` with no
``~/.ssh``. Stand-ins only for what cannot exist here: Cloudflare (a ``cloudflared`` script that
honours the same two command lines and relays to the local sshd through colabmagic's WAN relay)
and a stable ngrok address (a :class:`~colabmagic.testing_wan.WanRelay`).
"""

from __future__ import annotations

import os
import signal
import stat
import sys

import numpy as np
import paramiko
import pytest
from IPython.core.error import UsageError

import colabmagic
from colabmagic import colab, linkstate, routes, snapshot, userkey
from colabmagic.errors import ConnectError, HostKeyError, ParameterError
from colabmagic.relay import QuietRelay
from colabmagic.session import registry
from colabmagic.testing import require, wait_until
from colabmagic.testing_sshd import _free_port, sshd_path
from colabmagic.testing_wan import WanRelay

pytestmark = pytest.mark.ssh
FP = "SHA256:" + "A" * 43


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh HOME for the local side: no ~/.ssh at all, no ssh-agent."""
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("HOME", str(path))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return path


class Runtime:
    """One 'Colab runtime': serve() with its own state dir (host key) and authorized_keys."""

    def __init__(self, base, public_key: str, **kw):
        require(
            sshd_path() is not None, "OpenSSH sshd is not installed (apt install openssh-server)"
        )
        self.state = base / "sshd"
        self.info = colab.serve(
            public_key,
            port=kw.pop("port", None) or _free_port(),
            listen="127.0.0.1",
            host=kw.pop("host", "127.0.0.1"),
            state_dir=str(self.state),
            authorized_keys=str(base / "authorized_keys"),
            install=False,
            sshd_options={"StrictModes": "no"},  # the test's files live under /tmp (1777)
            **kw,
        )

    @property
    def line(self) -> str:
        return self.info.connect_line()

    def stop(self) -> None:
        colab.stop(str(self.state))


@pytest.fixture
def runtimes(tmp_path):
    started: list[Runtime] = []

    def start(public_key: str, name: str = "rt", **kw) -> Runtime:
        base = tmp_path / name
        base.mkdir()
        rt = Runtime(base, public_key, **kw)
        started.append(rt)
        return rt

    yield start
    for rt in started:
        rt.stop()


STANDIN = '''#!{python}
"""STAND-IN for Cloudflare's cloudflared (the real one needs Cloudflare's network).

It honours the two command lines colabmagic uses:
  tunnel --no-autoupdate --url ssh://localhost:PORT   announce NAME.trycloudflare.com, record
                                                      NAME -> PORT, run until SIGTERM
  access ssh --hostname NAME                          relay stdio to NAME's port (WAN relay)
"""
import os, signal, sys
ROUTES = {routes!r}
a = sys.argv[1:]
if len(a) == 4 and a[:3] == ["access", "ssh", "--hostname"]:
    try:
        with open(os.path.join(ROUTES, a[3])) as f:
            port, delay = f.read().split()
    except OSError:
        sys.stderr.write("stand-in cloudflared: no tunnel named %s\\n" % a[3])
        sys.exit(1)
    os.execv(sys.executable, [sys.executable, "-m", "colabmagic.testing_wan",
                              "--delay", delay, "127.0.0.1", port])
if len(a) == 4 and a[:3] == ["tunnel", "--no-autoupdate", "--url"]:
    name = "standin-%d.trycloudflare.com" % os.getpid()
    with open(os.path.join(ROUTES, name), "w") as f:
        f.write(a[3].rsplit(":", 1)[1] + " 0")
    sys.stderr.write("INF |  https://%s  |\\n" % name)
    sys.stderr.flush()
    signal.pause()
sys.stderr.write("stand-in cloudflared: unsupported command line %r\\n" % a)
sys.exit(2)
'''


@pytest.fixture
def standin_cloudflared(tmp_path, monkeypatch):
    """A stand-in ``cloudflared`` first on PATH; returns its routes directory (NAME -> port)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    routes_dir = tmp_path / "cf-routes"
    routes_dir.mkdir()
    script = bindir / "cloudflared"
    script.write_text(STANDIN.format(python=sys.executable, routes=str(routes_dir)))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return routes_dir


def connect(line: str, root, **kw):
    return colabmagic.connect(line, root=str(root), python=sys.executable, connect_timeout=30, **kw)


# -- the line ----------------------------------------------------------------------------------
def test_line_round_trips_and_holds_no_secret():
    r = routes.Route(user="root", via="direct", host="10.0.0.5", port=2222, fingerprints=(FP,))
    assert r.line() == f"colab://root@10.0.0.5:2222?via=direct&fp={FP}"
    assert routes.parse(r.connect_line()) == r  # the %colab_connect prefix is optional
    cf = routes.Route(
        user="me", via="cloudflared", host="a-b.trycloudflare.com", fingerprints=(FP,)
    )
    assert routes.parse(cf.line()) == cf
    assert "?via=cloudflared&" in cf.line()
    both = routes.parse(f"colab://root@[::1]:2222?via=ngrok&fp={FP},SHA256:{'b/+c' * 10}abc")
    assert both.host == "::1"
    assert both.port == 2222
    assert len(both.fingerprints) == 2


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("colab://", "?via="),
        ("ssh://root@h", "must start with colab://"),
        (f"colab://h?via=direct&fp={FP}", "user@"),
        (f"colab://root@h?via=carrier-pigeon&fp={FP}", "via='carrier-pigeon' is unknown"),
        ("colab://root@h?via=direct", "both via= and fp="),
        ("colab://root@h?via=direct&fp=SHA256:short", "not a host key fingerprint"),
        (f"colab://root@h:http?via=direct&fp={FP}", "not a number"),
        (f"colab://root@h:0?via=direct&fp={FP}", "between 1 and 65535"),
        (f"colab://root@h?via=direct&fp={FP}&token=x", "unexpected parameter"),
        (f"colab://root@bad_host!?via=direct&fp={FP}", "not a valid host"),
    ],
)
def test_bad_lines_are_one_line_errors(line, why):
    with pytest.raises(ParameterError, match=None) as err:
        routes.parse(line)
    text = str(err.value)
    assert why in text
    assert "\n" not in text
    assert "paste the whole line serve() printed" in text


def test_bad_line_in_the_magic_is_a_usage_error(ip, home):
    with pytest.raises(UsageError, match="via='nope' is unknown") as err:
        ip.run_line_magic("colab_connect", f"colab://root@h?via=nope&fp={FP}")
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="--save x needs a colab:// line"):
        ip.run_line_magic("colab_connect", "somehost --save x")


def test_missing_cloudflared_says_how_to_install_it(home, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    line = f"colab://root@x-y.trycloudflare.com?via=cloudflared&fp={FP}"
    with pytest.raises(ConnectError) as err:
        colabmagic.connect(line)
    text = str(err.value)
    assert "cloudflared is not installed" in text
    assert "\n" not in text
    assert "cloudflared-linux-" in text  # this machine's OS: the Linux download
    assert "brew install cloudflared" in routes.install_hint("Darwin")
    assert "winget install" in routes.install_hint("Windows")
    assert "linux-arm64" in routes.install_hint("Linux", "aarch64")


# -- --print-key and keygen ----------------------------------------------------------------
def test_print_key_offers_to_create_one(ip, home, capsys):
    with pytest.raises(UsageError, match=r"no SSH key in ~/\.ssh") as err:
        ip.run_line_magic("colab_connect", "--print-key")  # not interactive: one instruction
    assert "--print-key --create" in str(err.value)
    assert not (home / ".ssh" / "id_ed25519").exists()
    ip.run_line_magic("colab_connect", "--print-key --create")
    printed = capsys.readouterr().out.strip()
    private = home / ".ssh" / "id_ed25519"
    assert printed == (home / ".ssh" / "id_ed25519.pub").read_text().strip()
    assert printed.startswith("ssh-ed25519 AAAA")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE((home / ".ssh").stat().st_mode) == 0o700
    key = paramiko.Ed25519Key.from_private_key_file(str(private))  # no passphrase
    assert printed.split()[1] == key.get_base64()
    ip.run_line_magic("colab_connect", "--print-key")  # now it is there: printed as is
    assert capsys.readouterr().out.strip() == printed
    with pytest.raises(ParameterError, match="already exists; not overwriting"):
        userkey.create_key()
    assert userkey.public_key() == printed


def test_print_key_in_a_notebook_asks_before_creating(ip, home, capsys, monkeypatch):
    class NotebookKernel:  # stands for ipykernel's kernel when the frontend accepts input()
        _allow_stdin = True

    asked = []
    monkeypatch.setattr(ip, "kernel", NotebookKernel(), raising=False)
    monkeypatch.setattr("builtins.input", lambda prompt: asked.append(prompt) or "n")
    with pytest.raises(UsageError, match="no SSH key"):
        ip.run_line_magic("colab_connect", "--print-key")
    assert asked == ["No SSH key in ~/.ssh. Create ~/.ssh/id_ed25519 (no passphrase)? [y/N] "]
    assert not (home / ".ssh" / "id_ed25519").exists()
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    ip.run_line_magic("colab_connect", "--print-key")
    assert capsys.readouterr().out.startswith("ssh-ed25519 ")
    assert (home / ".ssh" / "id_ed25519").exists()


# -- the paste path --------------------------------------------------------------------------------
def test_paste_path_one_line_connects_and_writes_nothing_to_ssh(
    home, runtimes, colabmagic_root, ip, capsys
):
    pub = userkey.create_key()
    rt = runtimes(pub, tunnel="none")
    line = rt.line
    assert str(rt.info) == line
    assert line.startswith("%colab_connect colab://")
    assert f"@127.0.0.1:{rt.info.port}?via=direct&fp=" in line
    fps = rt.info.fingerprints
    assert fps == [routes.fingerprint_of(k) for k in colab.host_keys(str(rt.state))]
    assert all(fp in line for fp in fps)
    assert "PRIVATE" not in line
    assert pub.split()[1] not in line  # no key material, only fingerprints
    html = rt.info._repr_html_()
    assert "<button" in html
    assert "clipboard" in html
    assert f"colab://{rt.info.user}@127.0.0.1" in html
    s = connect(line, colabmagic_root, name="paste")
    try:
        assert s.run("print(6 * 7)", relay=QuietRelay()).stdout == "42\n"
    finally:
        registry.remove("paste").close()
    assert sorted(os.listdir(home / ".ssh")) == ["id_ed25519", "id_ed25519.pub"]
    # The magic: the printed line, as pasted (the remote needs our interpreter for ipykernel).
    ip.run_line_magic(
        "colab_connect", f"{line.split(' ', 1)[1]} --name pm --python {sys.executable}"
    )
    assert "connected: session 'pm'" in capsys.readouterr().out
    try:
        ip.run_line_magic("gpu_run", "--on pm print(2 ** 10)")
        assert capsys.readouterr().out == "1024\n"
    finally:
        ip.run_line_magic("colab_disconnect", "pm")
    assert sorted(os.listdir(home / ".ssh")) == ["id_ed25519", "id_ed25519.pub"]


# -- a recycled runtime ---------------------------------------------------------------------------
def test_recycled_runtime_old_line_refused_new_line_and_snapshot_restore(
    home, runtimes, colabmagic_root, ip, capsys
):
    pub = userkey.create_key()
    # A stable route address (as an ngrok reserved address or a tailnet name stays the same):
    # the relay plays it, forwarding to whichever runtime is up now.
    with WanRelay(("127.0.0.1", 1)) as stable:
        first = runtimes(pub, "first", tunnel="ngrok", host=stable.address)
        stable.target = ("127.0.0.1", first.info.sshd_port)
        assert f"@{stable.address}?via=ngrok&" in first.line
        s = connect(first.line, colabmagic_root)
        try:
            s.run("import numpy as np\narr = np.arange(12.0).reshape(3, 4) * 1.5\n"
                  "cfg = {'lr': 0.1, 'tags': ['a', 'b'], 'nested': {'n': 3}}")  # fmt: skip
            ip.run_line_magic("colab_snapshot", "save before-recycle arr cfg")
            assert "saved arr, cfg" in capsys.readouterr().out
        finally:
            registry.remove("default").close()
        first.stop()  # the runtime is recycled: everything on it is gone

        second = runtimes(pub, "second", tunnel="ngrok", host=stable.address)
        stable.target = ("127.0.0.1", second.info.sshd_port)
        assert second.info.sshd_port != first.info.sshd_port
        old_fp, new_fp = first.info.fingerprints[0], second.info.fingerprints[0]
        assert old_fp != new_fp
        with pytest.raises(HostKeyError) as err:
            connect(first.line, colabmagic_root)
        text = str(err.value)
        assert old_fp in text
        assert new_fp in text
        assert "\n" not in text
        with pytest.raises(UsageError, match="Host key mismatch"):
            ip.run_line_magic(
                "colab_connect", f"{first.line.split(' ', 1)[1]} --python {sys.executable}"
            )
        assert not (home / ".ssh" / "known_hosts").exists()

        s2 = connect(second.line, colabmagic_root)
        try:
            with pytest.raises(Exception, match="arr"):
                s2.pull("arr")  # a fresh kernel: nothing there yet
            ip.run_line_magic("colab_snapshot", "load before-recycle")
            assert "loaded arr, cfg" in capsys.readouterr().out
            got = s2.pull("arr", "cfg")
            np.testing.assert_array_equal(got["arr"], np.arange(12.0).reshape(3, 4) * 1.5)
            assert got["cfg"] == {"lr": 0.1, "tags": ["a", "b"], "nested": {"n": 3}}
            assert s2.run("print(arr.sum(), cfg['nested']['n'])", relay=QuietRelay()).stdout == (
                "99.0 3\n"
            )
        finally:
            registry.remove("default").close()
    table = repr(ip.run_line_magic("colab_snapshot", "--list"))
    assert "before-recycle" in table
    assert "arr, cfg" in table
    ip.run_line_magic("colab_snapshot", "--delete before-recycle")
    assert snapshot.list_snapshots() == []
    with pytest.raises(UsageError, match="no snapshot 'before-recycle'"):
        ip.run_line_magic("colab_snapshot", "--delete before-recycle")


# -- through the stand-in cloudflared -------------------------------------------------------
def test_standin_cloudflared_connects_runs_and_tells_unreachable_from_link_down(
    home, runtimes, standin_cloudflared, colabmagic_root, ip
):
    pub = userkey.create_key()
    rt = runtimes(pub, tunnel="cloudflared")
    route = routes.parse(rt.line)
    assert route.via == "cloudflared"
    assert route.host.endswith(".trycloudflare.com")
    assert rt.info.tunnel_pid
    assert route.proxy_command().endswith(f"access ssh --hostname {route.host}")
    s = connect(rt.line, colabmagic_root)
    mapping = standin_cloudflared / route.host
    port = mapping.read_text().split()[0]
    try:
        assert s.run("import os; print(os.getpid() > 0)", relay=QuietRelay()).stdout == "True\n"
        s.run("kept = 41")

        def state() -> str:
            return linkstate.status(s)["state"]

        def drop_link() -> None:  # the tunnel client dies, as when the laptop's network blips
            s.transport.connection().proxy.process.send_signal(signal.SIGKILL)
            wait_until(lambda: s.proxy.state != "up", timeout=10, what="the drop to be noticed")

        # The link drops but the route is there (slow to come back): the kernel is alive.
        mapping.write_text(f"{port} 0.3")
        drop_link()
        text = state()
        assert text.startswith("link down, kernel alive")
        wait_until(lambda: s.proxy.state == "up", timeout=60, what="reconnect")
        assert s.run("print(kept + 1)", relay=QuietRelay()).stdout == "42\n"

        # The tunnel is gone: no attempt reaches the host.
        mapping.unlink()
        drop_link()
        text = wait_until(lambda: "unreachable" in state() and state(), timeout=20)
        assert text.startswith("host unreachable since ")
        assert text.endswith(" (tunnel gone?)")
        table = repr(ip.run_line_magic("colab_status", ""))
        assert "host unreachable since" in table

        mapping.write_text(f"{port} 0")  # the tunnel is back
        wait_until(lambda: s.proxy.state == "up", timeout=60, what="reconnect")
        assert state() in ("idle", "busy")
        assert s.run("print(kept)", relay=QuietRelay()).stdout == "41\n"
    finally:
        registry.remove("default").close()


def test_save_writes_a_host_block_that_plain_targets_use(
    home, runtimes, standin_cloudflared, colabmagic_root
):
    pub = userkey.create_key()
    rt = runtimes(pub, tunnel="cloudflared")
    s = connect(rt.line, colabmagic_root, save="mygpu", name="saved")
    registry.remove("saved").close()
    config = (home / ".ssh" / "config").read_text()
    assert "Host mygpu" in config
    assert "ProxyCommand cloudflared access ssh --hostname %h" in config
    known = (home / ".ssh" / "known_hosts").read_text()
    assert known == f"{routes.parse(rt.line).host} {rt.info.host_keys[0]}\n"
    s = colabmagic.connect(
        "mygpu", root=str(colabmagic_root), python=sys.executable, name="alias"
    )  # known_hosts and the Host block now do what the line did
    try:
        assert s.run("print('via alias')", relay=QuietRelay()).stdout == "via alias\n"
    finally:
        registry.remove("alias").close()
    s = connect(rt.line, colabmagic_root, save="mygpu", name="again")  # replaces its own block
    registry.remove("again").close()
    assert (home / ".ssh" / "config").read_text().count("Host mygpu") == 1
    assert len((home / ".ssh" / "known_hosts").read_text().splitlines()) == 1
    (home / ".ssh" / "config").write_text("Host other\n    HostName x\n")
    with pytest.raises(ParameterError, match="already has a 'Host other'"):
        routes.save(routes.parse(rt.line), "other", rt.info.host_keys[0])


# -- snapshots: torch state, damage, names ---------------------------------------------------
def test_snapshot_of_torch_state_dict_and_tensors(home, colabmagic_root):
    from colabmagic.session import Session
    from colabmagic.transport.local import LocalTransport

    a = Session.start(LocalTransport(root=str(colabmagic_root)), name="snap-a")
    try:
        a.run(
            "import torch\ntorch.manual_seed(0)\nnet = torch.nn.Linear(4, 3)\n"
            "state = net.state_dict()\nw = torch.arange(6.0).reshape(2, 3)\n"
            "mixed = {'step': 7, 'moments': [torch.ones(2), (torch.zeros(1), 'x')]}\n"
            "out = net(torch.ones(1, 4))  # a non-leaf tensor that requires grad"
        )
        meta = snapshot.save(a, "torchy", ["state", "w", "mixed", "out"])
        assert meta["names"] == ["state", "w", "mixed", "out"]
        assert meta["bytes"] > 6 * 4
        expected = a.run("print(repr(net.weight.detach().tolist()))", relay=QuietRelay()).stdout
    finally:
        a.close()
    b = Session.start(LocalTransport(root=str(colabmagic_root)), name="snap-b")
    try:
        assert snapshot.load(b, "torchy") == ["state", "w", "mixed", "out"]
        out = b.run(
            "import torch\nnet = torch.nn.Linear(4, 3)\nprint(net.load_state_dict(state))\n"
            "print(hasattr(state, '_metadata'), type(state).__name__)\n"
            "print(repr(net.weight.detach().tolist()))\n"
            "print(w.sum().item(), mixed['step'], mixed['moments'][0].tolist(),"
            " mixed['moments'][1][1], out.requires_grad, out.shape == (1, 3))",
            relay=QuietRelay(),
        ).stdout.splitlines()
        assert out[0] == "<All keys matched successfully>"
        assert out[1] == "True OrderedDict"
        assert out[2] + "\n" == expected
        assert out[3] == "15.0 7 [1.0, 1.0] x False True"
    finally:
        b.close()


def test_snapshot_moves_cupy_arrays_to_host_memory(home, colabmagic_root):
    from colabmagic.session import Session
    from colabmagic.transport.local import LocalTransport

    gpu = Session.start(LocalTransport(root=str(colabmagic_root)), name="snap-gpu", mock_gpu=True)
    try:
        gpu.run("import cupy as cp\ng = cp.arange(5) * 2")
        assert gpu.run("print(type(g).__module__)", relay=QuietRelay()).stdout != "numpy\n"
        snapshot.save(gpu, "from-gpu", ["g"])
    finally:
        gpu.close()
    cpu = Session.start(LocalTransport(root=str(colabmagic_root)), name="snap-cpu")
    try:  # a runtime without CuPy gets a NumPy array
        snapshot.load(cpu, "from-gpu")
        got = cpu.run("print(type(g).__module__, g.tolist())", relay=QuietRelay()).stdout
        assert got == "numpy [0, 2, 4, 6, 8]\n"
    finally:
        cpu.close()


def test_snapshot_errors_are_one_line_and_nothing_half_written(home, colabmagic_root, ip):
    with pytest.raises(ParameterError, match=r"snapshot name '\.\./x' must be"):
        snapshot.info("../x")
    with pytest.raises(ParameterError, match=r"no snapshot 'nope' .*there are: none"):
        snapshot.info("nope")
    with pytest.raises(UsageError, match="use %colab_snapshot save NAME VAR"):
        ip.run_line_magic("colab_snapshot", "save")
    with pytest.raises(UsageError, match="use %colab_snapshot save NAME VAR"):
        ip.run_line_magic("colab_snapshot", "load a b")
    from colabmagic.session import Session
    from colabmagic.transport.local import LocalTransport

    s = Session.start(LocalTransport(root=str(colabmagic_root)), name="snap-err")
    try:
        s.run("x = 1\nimport threading\nlock = threading.Lock()")
        snapshot.save(s, "good", ["x"])
        with pytest.raises(Exception, match="lock"):  # cannot be pickled: nothing written
            snapshot.save(s, "good", ["x", "lock"])
        with pytest.raises(Exception, match="not defined"):
            snapshot.save(s, "other", ["missing"])
        assert [r["name"] for r in snapshot.list_snapshots()] == ["good"]
        frames = home / ".colabmagic" / "snapshots" / "good" / "frames.bin"
        frames.write_bytes(frames.read_bytes()[:-1])
        with pytest.raises(Exception, match="truncated"):
            snapshot.load(s, "good")
    finally:
        s.close()


def test_cli_serve_prints_the_one_line_and_stops(home):
    from click.testing import CliRunner

    from colabmagic.cli import main as cli

    require(sshd_path() is not None, "OpenSSH sshd is not installed (apt install openssh-server)")
    pub = userkey.create_key()
    port = _free_port()
    args = ["serve", "--public-key", pub, "--port", str(port), "--listen", "127.0.0.1"]
    result = CliRunner().invoke(cli, [*args, "--host", "127.0.0.1", "--no-install"])
    try:
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        assert len(lines) == 1
        route = routes.parse(lines[0])
        assert (route.via, route.host, route.port) == ("direct", "127.0.0.1", port)
        assert (
            list(route.fingerprints)
            == colab.ServeInfo(
                alias="x",
                host="h",
                port=1,
                user="u",
                host_keys=colab.host_keys(str(home / ".colabmagic" / "sshd")),
            ).fingerprints
        )
    finally:
        stopped = CliRunner().invoke(cli, ["serve", "--stop"])
    assert stopped.exit_code == 0
    assert "stopped: [" in stopped.output
    bad = CliRunner().invoke(cli, ["serve", "--public-key", pub, "--tunnel", "frp"])
    assert bad.exit_code != 0
