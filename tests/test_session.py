"""The Session API over the real link: agent, bridge process, proxy and a real ipykernel.

The ``transport_kind`` fixture runs every test over each transport: ``local`` (a bridge
subprocess) and ``ssh`` (paramiko to a real OpenSSH sshd on 127.0.0.1, see ``sshd_server``).
"""

from __future__ import annotations

import builtins
import hashlib
import os
import signal
import sys
import threading
import time

import numpy as np
import pytest
import zmq

import colabmagic
from colabmagic import inproc
from colabmagic.errors import (
    CellTimeoutError,
    NotConnectedError,
    ParameterError,
    RemoteError,
    RemoteKernelDied,
    TransferError,
)
from colabmagic.relay import QuietRelay, Relay
from colabmagic.session import Session
from colabmagic.testing import wait_until
from colabmagic.transfer import Channel
from colabmagic.transport.local import LocalTransport
from colabmagic.transport.ssh import SSHTransport

_SSH: dict = {}  # the sshd_server of the ssh run


class Recorder(Relay):
    """A relay that records what it was asked to show, and can act on a line of output."""

    def __init__(self, on_text=None):
        self.events: list[tuple] = []
        self.on_text = on_text

    def stream(self, name, text):
        self.events.append(("stream", name, text))
        if self.on_text is not None:
            self.on_text(text)

    def display(self, data, metadata, transient, *, update=False):
        self.events.append(("update" if update else "display", data, metadata, transient))

    def clear_output(self, wait):
        self.events.append(("clear", wait))


def make_transport(kind: str, root) -> LocalTransport | SSHTransport:
    if kind == "local":
        return LocalTransport(root=str(root))
    if kind == "ssh":
        server = _SSH["server"]
        return SSHTransport(
            server.name,
            ssh_config=server.ssh_config,
            python=sys.executable,
            root=str(root),
            connect_timeout=10,
        )
    raise AssertionError(kind)


@pytest.fixture(scope="module", params=["local", pytest.param("ssh", marks=pytest.mark.ssh)])
def transport_kind(request):
    if request.param == "ssh":
        _SSH["server"] = request.getfixturevalue("sshd_server")
    return request.param


def break_link(session) -> int:
    """Kill what carries the link: the bridge process (local) or the sshd child (ssh)."""
    if isinstance(session.transport, LocalTransport):
        bridge = session.transport.bridges[-1]
        bridge.proc.kill()
        return bridge.pid
    return _SSH["server"].kill_connections()[0]


@pytest.fixture(scope="module")
def session(transport_kind, colabmagic_root):
    s = Session.start(make_transport(transport_kind, colabmagic_root), name="shared")
    yield s
    s.close()


@pytest.fixture
def fresh(transport_kind, colabmagic_root):
    """A session of its own, for tests that kill or restart the kernel."""
    s = Session.start(make_transport(transport_kind, colabmagic_root), name="fresh")
    yield s
    s.close()


def test_stdout_and_stderr_arrive_in_order(session):
    rec = Recorder()
    r = session.run(
        "import sys\nfor i in range(3):\n    print('out', i, flush=True)\n"
        "    print('err', i, file=sys.stderr, flush=True)",
        relay=rec,
    )
    streams = [(e[1], e[2]) for e in rec.events if e[0] == "stream"]
    text = "".join(t for _, t in streams)
    assert r.stdout == "out 0\nout 1\nout 2\n"
    assert r.stderr == "err 0\nerr 1\nerr 2\n"
    assert text.index("out 0") < text.index("err 0") < text.index("out 1")


def test_execute_result_is_returned_not_printed(session):
    rec = Recorder()
    r = session.run("6 * 7", relay=rec)
    assert r.result is not None
    assert r.result.data["text/plain"] == "42"
    assert r.execution_count is not None


def test_display_data_keeps_every_mime_type_and_metadata(session):
    rec = Recorder()
    session.run(
        "from IPython.display import display, HTML, JSON\n"
        "display(HTML('<b>hi</b>'), metadata={'isolated': True})\n"
        "display(JSON({'a': 1}))",
        relay=rec,
    )
    shown = [e for e in rec.events if e[0] == "display"]
    assert shown[0][1]["text/html"] == "<b>hi</b>"
    assert shown[0][2] == {"isolated": True}
    assert shown[1][1]["application/json"] == {"a": 1}


def test_update_display_and_clear_output_are_relayed(session):
    rec = Recorder()
    session.run(
        "from IPython.display import display, clear_output\n"
        "h = display('first', display_id=True)\n"
        "h.update('second')\n"
        "clear_output(wait=True)\n"
        "print('after')",
        relay=rec,
    )
    kinds = [e[0] for e in rec.events]
    assert kinds[:3] == ["display", "update", "clear"]
    display_id = rec.events[0][3]["display_id"]
    assert rec.events[1][3]["display_id"] == display_id
    assert rec.events[1][1]["text/plain"] == "'second'"
    assert rec.events[2][1] is True


def test_tqdm_progress_bar_animates_through_display_updates(session):
    rec = Recorder()
    session.run(
        "from tqdm.auto import tqdm, trange\nimport time\n"
        "for i in tqdm(range(20), mininterval=0):\n    time.sleep(0.005)",
        relay=rec,
    )
    kinds = [e[0] for e in rec.events]
    assert kinds[0] == "display"
    assert kinds.count("update") >= 5, kinds
    ids = {e[3].get("display_id") for e in rec.events if e[0] in ("display", "update")}
    assert len(ids) == 1
    assert "20/20" in rec.events[-1][1]["text/plain"]


def test_matplotlib_figure_arrives_as_png(session):
    rec = Recorder()
    session.run(
        "import matplotlib\nmatplotlib.use('module://matplotlib_inline.backend_inline')\n"
        "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3]); plt.show()",
        relay=rec,
    )
    pngs = [e for e in rec.events if e[0] == "display" and "image/png" in e[1]]
    assert len(pngs) == 1
    import base64

    assert base64.b64decode(pngs[0][1]["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"


def test_remote_error_carries_remote_traceback(session):
    with pytest.raises(RemoteError) as info:
        session.run("def f():\n    raise KeyError('nope')\nf()", relay=QuietRelay())
    err = info.value
    assert err.ename == "KeyError"
    assert "nope" in err.evalue
    assert any("f()" in line for line in err.traceback)
    assert err._render_traceback_() == err.traceback
    assert session.last_error is err
    # the kernel is still fine
    assert session.run("1 + 1", relay=QuietRelay()).result.data["text/plain"] == "2"


def test_error_can_be_returned_instead_of_raised(session):
    r = session.run("1/0", relay=QuietRelay(), raise_on_error=False)
    assert not r.ok
    assert r.error.ename == "ZeroDivisionError"


def test_input_and_getpass_go_through_stdin(session, monkeypatch):
    prompts = []
    monkeypatch.setattr(builtins, "input", lambda p="": prompts.append(p) or "alice")
    import getpass

    monkeypatch.setattr(getpass, "getpass", lambda p="": prompts.append(("pw", p)) or "s3cret")
    r = session.run(
        "name = input('who? ')\nimport getpass\npw = getpass.getpass('pw? ')\nprint(name, len(pw))",
        relay=QuietRelay(),
    )
    assert r.stdout.strip() == "alice 6"
    assert prompts == ["who? ", ("pw", "pw? ")]


def test_timeout_interrupts_and_kernel_stays_usable(session, monkeypatch):
    ops = []
    real_call = session.proxy.call
    monkeypatch.setattr(
        session.proxy, "call", lambda op, **kw: ops.append(op) or real_call(op, **kw)
    )
    t = time.monotonic()
    with pytest.raises(CellTimeoutError, match=r"timeout of 0\.5s"):
        session.run("import time\nwhile True: time.sleep(0.01)", timeout=0.5, relay=QuietRelay())
    assert time.monotonic() - t < 8
    assert "interrupt" not in ops, "an interrupt_request message suffices; no signal needed"
    assert isinstance(CellTimeoutError("x"), TimeoutError)
    assert session.run("'alive'", relay=QuietRelay()).result.data["text/plain"] == "'alive'"


def test_interrupt_escalates_then_says_how_to_recover(fresh):
    with pytest.raises(CellTimeoutError, match=r"process group.*--restart"):
        fresh.run(
            "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "while True: time.sleep(0.01)",
            timeout=0.3,
            interrupt_grace=1.0,
            relay=QuietRelay(),
        )
    fresh.restart()
    assert fresh.run("'recovered'", relay=QuietRelay()).result.data["text/plain"] == ("'recovered'")


def test_keyboard_interrupt_interrupts_the_remote_cell(session):
    def on_text(text):
        if "started" in text:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        session.run(
            "import time\nprint('started', flush=True)\nwhile True: time.sleep(0.01)",
            relay=Recorder(on_text),
        )
    assert session.run("'still here'", relay=QuietRelay()).result.data["text/plain"] == (
        "'still here'"
    )


def test_bad_timeout_is_a_parameter_error(session):
    with pytest.raises(ParameterError, match="timeout=-1"):
        session.run("pass", timeout=-1)


def test_push_pull_small_values_and_arrays(session):
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    session.push(arr=arr, cfg={"lr": 0.1, "tags": ["a"]})
    session.run("arr2 = arr * 2; arr[0, 0] = 99", relay=QuietRelay())
    back = session.pull("arr", "arr2", "cfg")
    assert back["cfg"] == {"lr": 0.1, "tags": ["a"]}
    np.testing.assert_array_equal(back["arr2"], arr * 2)
    assert back["arr"][0, 0] == 99, "pushed arrays must be writable remotely"
    assert back["arr"].flags.writeable
    assert arr[0, 0] == 0, "the local array is not aliased"


def test_push_pull_256_mib_with_checksum(session, monkeypatch):
    waits = []
    real_wait = Channel._await_idle

    def spy(self, msg_id, timeout=10.0):
        waits.append(real_wait(self, msg_id, timeout))
        return waits[-1]

    monkeypatch.setattr(Channel, "_await_idle", spy)
    big = np.random.default_rng(1).integers(0, 2**63, size=(256 << 20) // 8, dtype=np.int64)
    digest = hashlib.sha256(big).hexdigest()
    session.push(big=big)
    r = session.run("import hashlib; print(hashlib.sha256(big).hexdigest())", relay=QuietRelay())
    assert r.stdout.strip() == digest
    del big
    back = session.pull("big")
    assert hashlib.sha256(back).hexdigest() == digest
    session.run("del big", relay=QuietRelay())
    # every wait for the kernel's idle found it (none ran into its deadline)
    assert all(waits), waits


def test_unpicklable_and_missing_variables_name_the_variable(session):
    import threading

    with pytest.raises(TransferError, match="'lock'"):
        session.push(lock=threading.Lock())
    with pytest.raises(TransferError, match="'no_such_var' is not defined"):
        session.pull("no_such_var")
    session.run("import threading; remote_lock = threading.Lock()", relay=QuietRelay())
    with pytest.raises(TransferError, match="cannot pickle 'remote_lock'"):
        session.pull("remote_lock")
    with pytest.raises(ParameterError):
        session.pull()


def test_status_reports_target_state_python_and_latency(session):
    # A comm request (pull) returns on its reply, before the kernel's "idle" reaches the agent.
    st = wait_until(lambda: (s := session.status())["state"] == "idle" and s, timeout=5)
    assert st["name"] == "shared"
    assert st["target"] == session.transport.target
    assert st["state"] == "idle"
    assert st["python"].count(".") == 2
    assert st["gpu"] in ("none", "mock") or "GiB" in st["gpu"]
    assert st["latency_ms"] is not None
    assert st["latency_ms"] < 1000
    assert isinstance(st["kernel_pid"], int)


def test_mock_gpu_session_runs_cupy_code(transport_kind, colabmagic_root):
    s = Session.start(make_transport(transport_kind, colabmagic_root), name="mock", mock_gpu=True)
    try:
        r = s.run(
            "import cupy as cp\nx = cp.arange(10)\nprint(x.sum())\n"
            "print(type(cp.asnumpy(x)).__module__, cp.cuda.runtime.getDeviceCount())",
            relay=QuietRelay(),
        )
        assert r.stdout.splitlines() == ["45", "numpy 1"]
        assert s.status()["gpu"] == "mock"
    finally:
        s.close()


@pytest.mark.parametrize(
    ("code", "exit_code", "sig"),
    [
        ("import os; os._exit(3)", 3, None),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", -9, "SIGKILL"),
    ],
)
def test_kernel_death_is_reported_quickly_and_restart_recovers(fresh, code, exit_code, sig):
    fresh.run("x = 1", relay=QuietRelay())
    t = time.monotonic()
    with pytest.raises(RemoteKernelDied) as info:
        fresh.run(code, relay=QuietRelay())
    assert time.monotonic() - t < 5
    assert info.value.exit_code == exit_code
    assert info.value.signal == sig
    assert "--restart" in str(info.value)
    assert fresh.state == "dead"
    fresh.restart()
    r = fresh.run("'x' in dir()", relay=QuietRelay())
    assert r.result.data["text/plain"] == "False"
    assert fresh.state == "idle"


def test_kernel_killed_from_outside_while_idle_is_noticed(fresh):
    pid = fresh.status()["kernel_pid"]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: fresh.state == "dead", timeout=5, what="death to be reported")
    with pytest.raises(RemoteKernelDied, match="SIGKILL"):
        fresh.run("1", relay=QuietRelay())


def test_bridge_killed_mid_cell_delivers_every_line_exactly_once(fresh):
    n = 60
    killed = []

    def on_text(text):
        if not killed and "line 10\n" in text:
            killed.append(break_link(fresh))

    r = fresh.run(
        f"import time\nfor i in range({n}):\n    print('line', i, flush=True)\n"
        "    time.sleep(0.02)\n'done'",
        relay=Recorder(on_text),
    )
    assert killed, "the bridge was never killed"
    assert r.stdout.splitlines() == [f"line {i}" for i in range(n)]
    assert r.result.data["text/plain"] == "'done'"
    assert fresh.proxy.reconnects >= 1
    if isinstance(fresh.transport, LocalTransport):
        assert fresh.transport.bridges[-1].pid != killed[0]
    assert fresh.run("1+1", relay=QuietRelay()).result.data["text/plain"] == "2"


def test_link_drop_while_idle_then_push_and_run(fresh):
    fresh.proxy.drop_link()
    wait_until(lambda: fresh.proxy.reconnects >= 1 and fresh.proxy.state == "up", timeout=10)
    fresh.push(v=np.ones(3))
    assert fresh.run("float(v.sum())", relay=QuietRelay()).result.data["text/plain"] == "3.0"


def test_status_is_honest_while_the_link_is_down(fresh, monkeypatch):
    from colabmagic.errors import ConnectError

    real_open = fresh.transport.open_pipe
    allow = {"reconnect": False}

    def flaky_open(kernel_id):
        if not allow["reconnect"]:
            raise ConnectError("network unreachable (simulated)")
        return real_open(kernel_id)

    monkeypatch.setattr(fresh.transport, "open_pipe", flaky_open)
    fresh.proxy.drop_link()
    wait_until(lambda: fresh.state.startswith("link-down (reconnecting, attempt 2"), timeout=10)
    assert fresh.status()["state"].startswith("link-down")
    allow["reconnect"] = True
    wait_until(lambda: fresh.state == "idle", timeout=20, what="the link to come back")
    assert fresh.run("'back'", relay=QuietRelay()).result.data["text/plain"] == "'back'"


def test_giving_up_says_the_kernel_lives_and_how_to_attach(fresh, monkeypatch):
    from colabmagic.errors import ConnectError

    def down(kernel_id):
        raise ConnectError("network unreachable (simulated)")

    monkeypatch.setattr(fresh.transport, "open_pipe", down)
    fresh.proxy.reconnect_timeout = 0.3
    fresh.proxy.drop_link()
    wait_until(lambda: fresh.proxy.state == "dead", timeout=10)
    with pytest.raises(RemoteKernelDied, match=f"--attach {fresh.kernel_id}") as info:
        fresh.run("1", relay=QuietRelay())
    assert "keeps running" in str(info.value)


@pytest.mark.slow
def test_push_pull_more_than_one_gib(session):
    big = np.ones((1 << 30) // 8 + 1024, dtype=np.float64)
    session.push(huge=big)
    r = session.run("print(huge.nbytes, float(huge.sum()))", relay=QuietRelay())
    assert r.stdout.split() == [str(big.nbytes), str(float(big.size))]
    del big
    back = session.pull("huge")
    assert back.nbytes > 1 << 30
    assert float(back.sum()) == back.size
    del back
    session.run("del huge", relay=QuietRelay())


def test_several_named_sessions_are_independent(transport_kind, colabmagic_root):
    a = Session.start(make_transport(transport_kind, colabmagic_root), name="a")
    b = Session.start(make_transport(transport_kind, colabmagic_root), name="b")
    try:
        a.run("v = 'A'", relay=QuietRelay())
        b.run("v = 'B'", relay=QuietRelay())
        assert (a.pull("v"), b.pull("v")) == ("A", "B")
        assert a.status()["kernel_pid"] != b.status()["kernel_pid"]
    finally:
        a.close()
        b.close()


def test_close_keep_leaves_kernel_running_and_attach_finds_state(transport_kind, colabmagic_root):
    t = make_transport(transport_kind, colabmagic_root)
    s = Session.start(t, name="keep")
    s.run("kept = 123", relay=QuietRelay())
    kid = s.kernel_id
    s.close(keep=True)
    t2 = make_transport(transport_kind, colabmagic_root)
    listed = {k["id"]: k for k in t2.list_kernels()}
    assert listed[kid]["state"] == "idle"
    assert listed[kid]["attached"] is False
    s2 = Session.start(t2, name="keep", attach=kid)
    try:
        assert s2.pull("kept") == 123
    finally:
        s2.close()
    gone = {k["id"]: k for k in t2.list_kernels()}
    assert gone[kid]["state"] == "stopped"


def test_session_uses_inproc_and_the_connection_file_still_serves_other_clients(colabmagic_root):
    """The Session reaches its proxy over ZeroMQ inproc (colabmagic/inproc.py); the connection
    file still names TCP ports that another client (jupyter console, the provisioner's) uses
    beside it; and close() does not hang on a socket left open on the shared context."""
    from jupyter_client.blocking import BlockingKernelClient

    s = Session.start(LocalTransport(root=str(colabmagic_root)), name="inproc")
    try:
        urls = {s.client.shell_channel.socket.get(zmq.LAST_ENDPOINT)}
        assert all(u.startswith(b"inproc://colabmagic-") for u in urls), urls
        assert s.client.get_connection_info()["transport"] == "tcp"
        other = BlockingKernelClient(connection_file=s.proxy.connection_file)
        other.load_connection_file()
        other.start_channels(hb=False)
        try:
            reply = other.execute_interactive("shared = 'from tcp'", timeout=60)
            assert reply["content"]["status"] == "ok"
            assert s.run("print(shared)", relay=QuietRelay()).stdout == "from tcp\n"
        finally:
            other.stop_channels()
        left_open = s.proxy.context.socket(zmq.DEALER)  # e.g. a channel a user made and forgot
        left_open.connect(inproc.url(s.proxy.inproc_name, s.proxy.connection_info["shell_port"]))
    finally:
        closer = threading.Thread(target=s.close, daemon=True)
        closer.start()
        closer.join(30)
    assert not closer.is_alive(), "Session.close hung on the shared ZeroMQ context"
    assert left_open.closed


def test_attach_to_unknown_kernel_lists_running_ones(colabmagic_root):
    with pytest.raises(colabmagic.errors.ConnectError, match="no running kernel 'nope'"):
        Session.start(LocalTransport(root=str(colabmagic_root)), attach="nope")


def test_closed_session_refuses_to_run(transport_kind, colabmagic_root):
    s = Session.start(make_transport(transport_kind, colabmagic_root), name="closing")
    s.close()
    with pytest.raises(NotConnectedError, match="closed"):
        s.run("1")


def test_python_api_connect_run_push_pull_close():
    s = colabmagic.connect(local=True, register=False)
    try:
        s.push(x=np.arange(3))
        s.run("y = x + 1", relay=QuietRelay())
        np.testing.assert_array_equal(s.pull("y"), [1, 2, 3])
    finally:
        s.close()
