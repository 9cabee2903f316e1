"""Debugging remote code: post-mortem pdb over stdin, and a real DAP client against debugpy
running in the remote kernel, reached through the link's port forward."""

from __future__ import annotations

import builtins
import importlib.util
import json
import os
import socket
import sys
import threading
import time

import pytest

from colabmagic import debug
from colabmagic.errors import ColabMagicError, ParameterError, RemoteError
from colabmagic.relay import Relay
from colabmagic.session import Session
from colabmagic.testing import require, wait_until
from colabmagic.testing_jupyter import jupyter_server
from colabmagic.transport.local import LocalTransport

MODULE = """\
def compute(n):
    total = 0
    for i in range(n):
        total += i
    result = total * 2
    return result
"""
BREAK_LINE = 5


class Capture(Relay):
    def __init__(self):
        self.text = ""

    def stream(self, name, text):
        self.text += text


class DAP:
    """A minimal Debug Adapter Protocol client: Content-Length framed JSON over a socket."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""
        self.seq = 0
        self.pending: list[dict] = []

    def send(self, command: str, **arguments) -> int:
        self.seq += 1
        body = json.dumps(
            {"seq": self.seq, "type": "request", "command": command, "arguments": arguments}
        ).encode()
        self.sock.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        return self.seq

    def _read(self, deadline: float) -> dict:
        while b"\r\n\r\n" not in self.buf:
            self._fill(deadline)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        length = int(head.split(b":")[1])
        while len(self.buf) < length:
            self._fill(deadline)
        body, self.buf = self.buf[:length], self.buf[length:]
        return json.loads(body)

    def _fill(self, deadline: float) -> None:
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("debug adapter closed the connection")
        self.buf += chunk

    def wait(self, pred, timeout: float = 30.0) -> dict:
        for i, msg in enumerate(self.pending):
            if pred(msg):
                return self.pending.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            msg = self._read(deadline)
            if pred(msg):
                return msg
            self.pending.append(msg)

    def response(self, seq: int, timeout: float = 30.0) -> dict:
        msg = self.wait(lambda m: m.get("type") == "response" and m["request_seq"] == seq, timeout)
        assert msg["success"], msg
        return msg.get("body", {})

    def event(self, name: str, timeout: float = 30.0) -> dict:
        return self.wait(lambda m: m.get("type") == "event" and m["event"] == name, timeout)

    def close(self) -> None:
        self.sock.close()


def debug_a_breakpoint(session, dap: DAP, local_dir, path_mappings, *, while_stopped=None) -> None:
    """Attach, break in ``compute`` of the uploaded dbgmod.py, inspect, continue (VS Code's flow).

    *while_stopped()* runs while the kernel is stopped at the breakpoint (a websocket cut...).
    """
    dap.response(
        dap.send(
            "initialize",
            clientID="test",
            adapterID="debugpy",
            pathFormat="path",
            linesStartAt1=True,
            columnsStartAt1=True,
        )
    )
    attach = dap.send("attach", justMyCode=False, pathMappings=path_mappings)
    dap.event("initialized")
    bp = dap.response(
        dap.send(
            "setBreakpoints",
            source={"path": str(local_dir / "dbgmod.py")},
            breakpoints=[{"line": BREAK_LINE}],
        )
    )
    assert bp["breakpoints"][0]["verified"]
    dap.response(dap.send("configurationDone"))
    dap.response(attach)

    result: dict = {}
    cell = threading.Thread(
        target=lambda: result.update(
            r=session.run(
                "import importlib, dbgmod; importlib.reload(dbgmod); print(dbgmod.compute(4))",
                relay=Capture(),
            )
        ),
        daemon=True,
    )
    cell.start()
    stopped = dap.event("stopped", timeout=60)
    thread_id = stopped["body"]["threadId"]
    if while_stopped is not None:
        while_stopped()
    frames = dap.response(dap.send("stackTrace", threadId=thread_id))["stackFrames"]
    top = frames[0]
    assert top["name"] == "compute"
    assert top["line"] == BREAK_LINE
    assert top["source"]["path"] == str(local_dir / "dbgmod.py")
    scopes = dap.response(dap.send("scopes", frameId=top["id"]))["scopes"]
    local_ref = next(s for s in scopes if s["name"].lower().startswith("local"))
    variables = dap.response(
        dap.send("variables", variablesReference=local_ref["variablesReference"])
    )["variables"]
    values = {v["name"]: v["value"] for v in variables}
    assert values["total"] == "6"
    assert values["n"] == "4"
    dap.response(dap.send("continue", threadId=thread_id))
    cell.join(60)
    assert not cell.is_alive()
    assert result["r"].stdout.strip() == "12"


def read_to_eof(dap: DAP, timeout: float = 30.0) -> None:
    """Read whatever the adapter still sends until the connection closes (ConnectionError)."""
    deadline = time.monotonic() + timeout
    while True:
        dap._fill(deadline)


def listening_on(port: int) -> set[str]:
    """Local addresses that listen on *port* (from /proc/net/tcp), e.g. {'127.0.0.1'}."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            next(f)
            for line in f:
                local, state = line.split()[1], line.split()[3]
                addr, p = local.split(":")
                if int(p, 16) == port and state == "0A":
                    if len(addr) == 8:
                        out.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
                    else:
                        out.add(addr)
    return out


@pytest.fixture(scope="module")
def jserver(tmp_path_factory):
    """A real ``jupyter server`` on 127.0.0.1 with a token."""
    require(importlib.util.find_spec("jupyter_server") is not None, "jupyter_server is missing")
    with jupyter_server(tmp_path_factory.mktemp("jserver")) as srv:
        yield srv


def jupyter_session(server, name: str, url: str | None = None, **options) -> Session:
    from colabmagic.transport.jupyter import JupyterTransport, Token

    transport = JupyterTransport(url or server.url, token=Token(server.token), **options)
    return Session.start(transport, name=name, connect_timeout=120)


@pytest.fixture(scope="module")
def remote_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("remote")


TRANSPORTS = ["local", pytest.param("ssh", marks=pytest.mark.ssh), "jupyter"]


@pytest.fixture(scope="module", params=TRANSPORTS)
def session(request, colabmagic_root, remote_dir):
    """A debugging session over each transport (ssh through a real sshd, jupyter through a real
    ``jupyter server``, whose kernels run in the server's root)."""
    if request.param == "jupyter":
        s = jupyter_session(request.getfixturevalue("jserver"), "dbg-jupyter")
        yield s
        s.close()
        return
    if request.param == "local":
        transport = LocalTransport(root=str(colabmagic_root))
    else:
        from colabmagic.transport.ssh import SSHTransport

        server = request.getfixturevalue("sshd_server")
        transport = SSHTransport(
            server.name,
            ssh_config=server.ssh_config,
            python=sys.executable,
            root=str(colabmagic_root),
            connect_timeout=10,
        )
    s = Session.start(transport, name=f"dbg-{request.param}", cwd=str(remote_dir))
    assert s.remote_info["cwd"] == str(remote_dir)
    yield s
    s.close()


def answers(monkeypatch, replies: list[str]) -> list[str]:
    prompts: list[str] = []
    it = iter(replies)
    monkeypatch.setattr(builtins, "input", lambda p="": prompts.append(p) or next(it))
    return prompts


def test_post_mortem_pdb_through_stdin(session, monkeypatch):
    with pytest.raises(RemoteError):
        session.run("def f(x):\n    y = x + 1\n    raise ValueError(y)\nf(41)", relay=Relay())
    prompts = answers(monkeypatch, ["p y * 10", "p ('arg', x)", "up", "p ('up at', __name__)", "q"])
    out = Capture()
    debug.post_mortem(session, relay=out)
    assert "420" in out.text
    assert "('arg', 41)" in out.text
    assert "('up at', '__main__')" in out.text
    assert prompts
    assert all("ipdb>" in p for p in prompts)
    assert session.run("'kernel fine'", relay=out).result.data["text/plain"] == "'kernel fine'"


def test_post_mortem_without_a_failure_is_a_clear_error(colabmagic_root):
    s = Session.start(LocalTransport(root=str(colabmagic_root)), name="nofail")
    try:
        with pytest.raises(ParameterError, match="no failed %%gpu_run cell"):
            debug.post_mortem(s)
    finally:
        s.close()


def test_cell_under_pdb_and_breakpoint_in_gpu_run(session, monkeypatch):
    answers(monkeypatch, ["p 20 + 1", "c"])
    out = Capture()
    debug.debug_cell(session, "a = 5\nprint('after', a)", relay=out)
    assert "21" in out.text
    assert "after 5" in out.text
    answers(monkeypatch, ["p x * 2", "c"])
    out = Capture()
    session.run("x = 7\nbreakpoint()\nprint('resumed', x)", relay=out)
    assert "14" in out.text
    assert "resumed 7" in out.text


def test_vscode_breakpoint_in_uploaded_module(session, tmp_path):
    local_dir = tmp_path / "project"
    local_dir.mkdir()
    (local_dir / "dbgmod.py").write_text(MODULE)
    session.upload(str(local_dir / "dbgmod.py"), "dbgmod.py")
    info = debug.start_vscode(session, local_root=str(local_dir), launch_dir=str(tmp_path))
    remote_dir = session.remote_info["cwd"]
    assert info.remote_root == remote_dir
    launch = json.loads((tmp_path / ".vscode" / "launch.json").read_text())
    (cfg,) = launch["configurations"]
    assert cfg["connect"] == {"host": "127.0.0.1", "port": info.local_port}
    assert cfg["justMyCode"] is False
    assert cfg["pathMappings"] == [{"localRoot": str(local_dir), "remoteRoot": str(remote_dir)}]
    # both listeners are loopback-only
    assert listening_on(info.remote_port) == {"127.0.0.1"}
    assert listening_on(info.local_port) == {"127.0.0.1"}
    # calling it again reuses the listener and the forward
    again = debug.start_vscode(session, local_root=str(local_dir), launch_dir=str(tmp_path))
    assert (again.remote_port, again.local_port) == (info.remote_port, info.local_port)

    dap = DAP(info.local_port)
    try:
        debug_a_breakpoint(session, dap, local_dir, cfg["pathMappings"])
        # --stop closes the listener and the live debugger connection, at both ends
        assert debug.stop_vscode(session) == 1
        assert session.proxy.forwards == {}
        with pytest.raises(ConnectionError, match="closed the connection"):
            read_to_eof(dap)
    finally:
        dap.close()
    assert session.run("print('kernel fine')", relay=Capture()).stdout == "kernel fine\n"


def test_launch_json_is_merged_and_never_clobbered(tmp_path):
    vscode = tmp_path / ".vscode"
    vscode.mkdir()
    (vscode / "launch.json").write_text(
        '{\n  // my configs\n  "version": "0.2.0",\n  "configurations": [\n'
        '    {"name": "mine", "type": "debugpy", "request": "launch", "program": "a.py",},\n'
        "  ],\n}\n"
    )
    cfg = {"name": "colabmagic: attach to x", "type": "debugpy", "request": "attach"}
    debug.write_launch_config(str(vscode), cfg)
    debug.write_launch_config(str(vscode), dict(cfg, justMyCode=False))
    doc = json.loads((vscode / "launch.json").read_text())
    assert [c["name"] for c in doc["configurations"]] == ["mine", "colabmagic: attach to x"]
    assert doc["configurations"][1]["justMyCode"] is False
    (vscode / "launch.json").write_text("{ not json")
    with pytest.raises(ColabMagicError, match="is not valid JSON"):
        debug.write_launch_config(str(vscode), cfg)
    assert (vscode / "launch.json").read_text() == "{ not json"


def test_debugpy_already_in_use_is_a_clear_error(colabmagic_root, tmp_path):
    s = Session.start(LocalTransport(root=str(colabmagic_root)), name="busy-debugpy")
    try:
        s.run("import debugpy; debugpy.listen(('127.0.0.1', 0))", relay=Capture())
        with pytest.raises(ColabMagicError, match="debugpy is already in use in this kernel"):
            debug.start_vscode(s, launch_dir=str(tmp_path))
        assert not (tmp_path / ".vscode").exists(), "nothing is written when it fails"
    finally:
        s.close()


# -- Jupyter-server targets: the debugpy forward rides through the kernel ----------------------
STATE = "import json; print(json.dumps(get_ipython().kernel._colabmagic_tcp_forward.state()))"


@pytest.mark.parametrize("drop", ["cut", "half-open"])
def test_vscode_on_jupyter_survives_a_websocket_drop_and_stop_closes_both_ends(
    drop, jserver, tmp_path
):
    from colabmagic.testing_wan import WanRelay

    local_dir = tmp_path / "project"
    local_dir.mkdir()
    (local_dir / "dbgmod.py").write_text(MODULE)
    with WanRelay(("127.0.0.1", jserver.port), delay=0.05) as wan:
        s = jupyter_session(
            jserver, "dbg-cut", url=f"http://127.0.0.1:{wan.port}/", ping_interval=0.5
        )
        try:
            s.upload(str(local_dir / "dbgmod.py"), "dbgmod.py")
            info = debug.start_vscode(s, local_root=str(local_dir), launch_dir=str(tmp_path))
            mappings = [{"localRoot": str(local_dir), "remoteRoot": info.remote_root}]

            def cut() -> None:
                # Stopped at the breakpoint, a request on its way (held 50 ms in the emulated
                # link): cut the websocket under it. The forward resends it after the reconnect.
                before = s.proxy.reconnects
                seq = dap.send("threads")
                if drop == "cut":
                    assert wan.cut() >= 1
                else:  # no FIN, no RST: found by two missed pings
                    wan.freeze()
                    wait_until(lambda: s.proxy.state == "link-down", timeout=30, what="ping loss")
                    wan.thaw()
                wait_until(lambda: s.proxy.reconnects > before, timeout=60, what="a reconnect")
                assert any(t["name"] == "MainThread" for t in dap.response(seq)["threads"])

            dap = DAP(info.local_port)
            try:
                debug_a_breakpoint(s, dap, local_dir, mappings, while_stopped=cut)
                assert s.proxy.reconnects >= 1
                state = json.loads(s.run(STATE).stdout)
                assert len(state["streams"]) == 1, state
                # --stop closes the live debugger connection at both ends.
                assert debug.stop_vscode(s) == 1
                assert s.proxy.forwards == {}
                with pytest.raises(ConnectionError, match="closed the connection"):
                    read_to_eof(dap)
            finally:
                dap.close()
            wait_until(
                lambda: json.loads(s.run(STATE).stdout)["threads"] == [],
                timeout=30,
                what="the kernel-side forward to close",
            )
            assert json.loads(s.run(STATE).stdout)["streams"] == []
            assert s.run("print('kernel fine')").stdout == "kernel fine\n"
        finally:
            s.close()


def test_debugpy_missing_on_jupyter_is_one_line(jserver, tmp_path):
    s = jupyter_session(jserver, "no-debugpy")
    try:
        # A stand-in for a kernel Python without debugpy: its import fails as if not installed.
        s.run("import sys; sys.modules['debugpy'] = None")
        with pytest.raises(ColabMagicError, match="debugpy is not installed") as err:
            debug.start_vscode(s, launch_dir=str(tmp_path))
        assert "\n" not in str(err.value)
        assert "%pip install debugpy" in str(err.value)
        assert not (tmp_path / ".vscode").exists()
        assert s.proxy.forwards == {}
    finally:
        s.close()
