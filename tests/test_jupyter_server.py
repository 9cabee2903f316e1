"""The Jupyter-server transport against a real ``jupyter server`` on 127.0.0.1 with a token.

Drops are caused mid-cell by the emulated WAN link (:class:`colabmagic.testing_wan.WanRelay`)
between the transport and the server: a reset (``cut``), a half-open link (``freeze``), a new
websocket session id, and a second client attached while ours is away. With the kernel journal,
every line of the cell arrives exactly once and in order, with the reply and the idle status.
Without it (server buffering only), what holds is: no duplicates, the order kept, and the reply and
the idle status always come (a real one, or an ``OutputLost`` error) -- no client hangs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time

import numpy as np
import pytest

import colabmagic
from colabmagic.errors import ConnectError, ParameterError, TransferError
from colabmagic.testing import wait_until
from colabmagic.testing_jupyter import CELL, Lines, jupyter_server, require_server
from colabmagic.testing_wan import WanRelay

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_server()
    with jupyter_server(tmp_path_factory.mktemp("jserver")) as srv:
        yield srv


@pytest.fixture(scope="module")
def json_server(tmp_path_factory):
    """A server that refuses the v1 binary subprotocol: the transport falls back to JSON."""
    require_server()
    with jupyter_server(
        tmp_path_factory.mktemp("jserver-json"),
        "--ZMQChannelsWebsocketConnection.kernel_ws_protocol=",
    ) as srv:
        yield srv


@pytest.fixture
def token_env(server, monkeypatch):
    monkeypatch.setenv("JUPYTER_TOKEN", server.token)
    return server.token


@contextlib.contextmanager
def session(url: str, **options):
    s = colabmagic.connect(url, register=False, connect_timeout=120, **options)
    try:
        yield s
    finally:
        s.close()


# -- basics ----------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["v1", "json"])
def test_run_push_pull_and_subprotocol(which, server, request, monkeypatch):
    srv = server if which == "v1" else request.getfixturevalue("json_server")
    monkeypatch.setenv("JUPYTER_TOKEN", srv.token)
    with session(srv.url) as s:
        link = s.transport.links[s.kernel_id]
        assert link.current is not None
        assert link.current.v1 is (which == "v1")
        r = s.run("import os; print('pid', os.getpid()); 6 * 7")
        assert r.stdout.startswith("pid ")
        assert r.result.data["text/plain"] == "42"
        a = np.arange(300_000, dtype=np.float64)
        s.push(a=a)
        s.run("b = a * 2")
        np.testing.assert_array_equal(s.pull("b"), a * 2)
        # Over the server's 10 MiB websocket message limit: sent in parts, reassembled there.
        big = np.arange(3 << 20, dtype=np.float64)  # 24 MiB
        s.push(big=big)
        assert s.run("print(int(big.sum()))").stdout == f"{int(big.sum())}\n"
        np.testing.assert_array_equal(s.pull("big"), big)
        assert s.transport.delivery(s.kernel_id).startswith("exactly-once")
        # A client-side error: the remote traceback comes back as usual.
        r = s.run("1/0", raise_on_error=False)
        assert r.error is not None
        assert r.error.ename == "ZeroDivisionError"


def test_the_lane_takes_a_cell_past_the_proxy_and_every_subscriber_still_sees_it(
    server, token_env, monkeypatch
):
    """``Session.run``'s request and its reply skip the proxy's thread (jupyter_lane.py), while a
    client on the connection file's IOPub port gets the cell's output once and in order, and
    ``input()`` is answered through the lane."""
    from jupyter_client import BlockingKernelClient

    from colabmagic import wire

    with session(server.url) as s:
        link = s.transport.links[s.kernel_id]
        assert s.lane is not None
        assert link.lane is s.lane
        assert link.publish is not None
        upstream: list[int] = []  # the channels of what local clients sent through the proxy
        up = s.proxy._up
        monkeypatch.setattr(s.proxy, "_up", lambda *a: (upstream.append(a[1]), up(*a))[1])
        observer = BlockingKernelClient()
        observer.load_connection_file(s.proxy.connection_file)
        observer.start_channels()
        try:

            def sees(marker: str) -> bool:  # ZeroMQ's slow joiner: until a cell's output lands
                s.run(f"print({marker!r})")
                with contextlib.suppress(queue.Empty):
                    while True:
                        msg = observer.get_iopub_msg(timeout=0.5)
                        if msg["content"].get("text") == marker + "\n":
                            return True
                return False

            wait_until(lambda: sees("probe"), timeout=30, what="the observer's subscription")
            upstream.clear()
            monkeypatch.setattr("builtins.input", lambda prompt="": "ada")
            code = "for i in range(20): print(i)\nprint('hi', input('name? '))"
            r = s.run(code)
            assert r.stdout == "".join(f"{i}\n" for i in range(20)) + "hi ada\n"
            assert upstream == [wire.STDIN]  # input()'s answer: the cell's request was not there
            assert r.msg_id not in s.proxy._route
            text, states = "", []
            while "idle" not in states:
                msg = observer.get_iopub_msg(timeout=10)
                if msg["parent_header"].get("msg_id") == r.msg_id:
                    text += msg["content"].get("text", "")
                    states += [msg["content"].get("execution_state")]
            assert text == r.stdout
            assert states.count("busy") == 1
        finally:
            observer.stop_channels()
    assert link.lane is None  # given back before the proxy closed its sockets
    assert link.publish is None


def test_the_link_loop_hands_messages_on_just_before_it_blocks_and_survives_a_failing_one(caplog):
    """jupyter_lane.HandOffSelector: queued hand-offs run at the loop's next select, in order."""
    import asyncio

    from colabmagic.transport.jupyter_lane import HandOffSelector

    selector = HandOffSelector()
    loop = asyncio.SelectorEventLoop(selector)
    got: list[int] = []

    async def turn() -> None:
        selector.later((got.append, 1))
        selector.later((lambda _arg: 1 / 0, None))
        selector.later((got.append, 2))
        assert got == []  # nothing is handed on while this turn of the loop runs
        await asyncio.sleep(0)
        assert got == [1, 2]

    try:
        loop.run_until_complete(turn())
    finally:
        loop.close()
    assert "handing a kernel message on failed" in caplog.text


def test_rest_lifecycle_interrupt_and_restart(server, token_env):
    from colabmagic.connection import make_transport

    with session(server.url) as s:
        transport = s.transport
        assert s.kernel_id in [k["id"] for k in transport.list_kernels()]
        s.run("x = 1")
        # Interrupt through REST while a cell sleeps.
        timer = threading.Timer(1.5, transport.interrupt_kernel, args=(s.kernel_id,))
        timer.start()
        r = s.run("import time; time.sleep(60)", raise_on_error=False)
        timer.join()
        assert r.error is not None
        assert r.error.ename == "KeyboardInterrupt"
        # And through the agent operation the Session uses (also REST underneath).
        assert s.proxy.call("interrupt")["ok"]
        assert s.run("print(x)").stdout == "1\n"
        # Restart through REST: a fresh kernel, bootstrapped again (push/pull work).
        s.restart(timeout=120)
        r = s.run("print('x' in globals())")
        assert r.stdout == "False\n"
        s.push(y=3)
        assert s.pull("y") == 3
        kernel_id = s.kernel_id
    # close() deletes the kernel through REST.
    assert kernel_id not in server.kernel_ids()
    other = make_transport(server.url)
    try:
        assert kernel_id not in [k["id"] for k in other.list_kernels()]
    finally:
        other.close()


def test_attach_to_a_running_kernel(server, token_env):
    with session(server.url) as s:
        s.run("kept = 'yes'")
        with session(server.url, attach=s.kernel_id) as s2:
            assert s2.run("print(kept)").stdout == "yes\n"
            s2.close(keep=True)
        assert s.run("print(kept)").stdout == "yes\n"


def test_cli_kernels_and_status_show_the_server_kernel(server, token_env, capsys):
    from click.testing import CliRunner
    from IPython.core.interactiveshell import InteractiveShell

    from colabmagic.cli import main

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "colabmagic")
    ip.run_line_magic("colab_connect", f"{server.url} --name js")
    try:
        session = colabmagic.session.registry.get("js")
        result = CliRunner().invoke(main, ["kernels", server.url, "--json"])
        assert result.exit_code == 0, result.output
        assert session.kernel_id in [k["id"] for k in json.loads(result.output)]
        capsys.readouterr()
        ip.run_line_magic("colab_status", "js --json")
        (row,) = json.loads(capsys.readouterr().out)
        assert row["target"] == server.url
        assert row["delivery"] == "exactly-once (kernel journal)"
    finally:
        ip.run_line_magic("colab_disconnect", "js")


def test_missing_kernel_and_bad_token_are_one_line_errors(server, monkeypatch):
    monkeypatch.setenv("JUPYTER_TOKEN", "not-the-token")
    with pytest.raises(ConnectError, match="refused the token"):
        colabmagic.connect(server.url, register=False)
    monkeypatch.setenv("JUPYTER_TOKEN", server.token)
    with pytest.raises(ConnectError, match="no running kernel"):
        colabmagic.connect(server.url, attach="0000", register=False)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:1/?token=abc", "remove the query"),
        ("http://example.org:8888/", "use https://"),
        ("http://user:pw@127.0.0.1:1/", "user:password"),
    ],
)
def test_bad_urls_are_refused_without_echoing_secrets(url, message, monkeypatch):
    monkeypatch.setenv("JUPYTER_TOKEN", "t")
    with pytest.raises(ParameterError, match=message) as info:
        colabmagic.connect(url, register=False)
    assert "abc" not in str(info.value)
    assert "pw" not in str(info.value)


# -- exactly-once across websocket drops -------------------------------------------------------
CASES = ["same-session", "new-session", "second-observer", "half-open"]


def _observer(server, kernel_id: str) -> None:
    """A second client (another websocket, its own session id) attached to the kernel."""
    import websocket

    ws = websocket.create_connection(
        f"ws://127.0.0.1:{server.port}/api/kernels/{kernel_id}/channels?session_id=observer",
        header=[f"Authorization: token {server.token}"],
        timeout=60,
    )
    _OBSERVERS.append(ws)


_OBSERVERS: list = []


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "no-journal"])
@pytest.mark.parametrize("case", CASES)
def test_output_across_a_drop(case, journal, server, token_env):
    with WanRelay(("127.0.0.1", server.port)) as wan:
        url = f"http://127.0.0.1:{wan.port}/"
        options = {"journal": journal, "ping_interval": 0.5}
        if case == "new-session":
            options["stable_session"] = False
        with session(url, **options) as s:
            proxy = s.proxy

            def drop():
                if case == "half-open":
                    wan.freeze()
                    wait_until(lambda: proxy.state == "link-down", timeout=30, what="ping loss")
                    wan.thaw()
                    return
                wan.refuse = True
                wan.cut()
                wait_until(lambda: proxy.state == "link-down", timeout=30, what="the drop")
                if case == "second-observer":
                    _observer(server, s.kernel_id)
                time.sleep(0.5)  # let the cell print while we are away
                wan.refuse = False

            lines = Lines(at=4, on_line=drop)
            try:
                result = s.run(CELL, relay=lines, raise_on_error=False, timeout=240)
            finally:
                for ws in _OBSERVERS:
                    ws.close()
                _OBSERVERS.clear()
            assert lines.done.wait(30)
            assert proxy.reconnects >= 1, "the link never dropped"
            got = lines.numbers()
            if journal:
                assert got == list(range(20)), got
                assert result.status == "ok"
            else:
                # No duplicates, order kept, and a reply (real or OutputLost): nothing hangs.
                assert got == sorted(set(got)), got
                assert set(got) <= set(range(20)), got
                assert result.status == "ok" or result.error.ename == "OutputLost"
            # The kernel is usable afterwards and the next cell is clean.
            assert s.run("print('after')").stdout == "after\n"
            mode = s.transport.delivery(s.kernel_id)
            assert mode.startswith("exactly-once" if journal else "server buffer")


# -- files ----------------------------------------------------------------------------------
def test_upload_and_download_resume_after_drops(server, token_env, tmp_path):
    rng = np.random.default_rng(7)
    data = rng.bytes((20 << 20) + 12345)  # three 8 MiB chunks
    src = tmp_path / "data.bin"
    src.write_bytes(data)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("alpha")
    (tree / "sub" / "b.txt").write_text("beta")
    with WanRelay(("127.0.0.1", server.port)) as wan:
        with session(f"http://127.0.0.1:{wan.port}/", ping_interval=0.5) as s:
            wan.cut_after(14 << 20)  # inside the second chunk's request
            assert s.upload(str(src), "up/data.bin") == len(data)
            assert (server.root / "up" / "data.bin").read_bytes() == data
            wait_until(lambda: s.proxy.reconnects >= 1, timeout=60, what="the cut to happen")
            assert s.run("print(len(open('up/data.bin', 'rb').read()))").stdout == f"{len(data)}\n"
            wan.cut_after(10 << 20)  # inside the second range of the download
            back = tmp_path / "back.bin"
            assert s.download("up/data.bin", str(back)) == len(data)
            assert back.read_bytes() == data
            wait_until(lambda: s.proxy.reconnects >= 2, timeout=60, what="the second cut")
            assert not (tmp_path / "back.bin.part").exists()
            assert s.upload(str(tree), "t") == 9
            assert (server.root / "t" / "sub" / "b.txt").read_text() == "beta"
            assert s.download("t", str(tmp_path / "t2")) == 9
            assert (tmp_path / "t2" / "sub" / "b.txt").read_text() == "beta"
            with pytest.raises(TransferError, match="relative to the Jupyter server's root"):
                s.upload(str(src), "/etc/data.bin")
            with pytest.raises(TransferError, match="does not exist on the server"):
                s.download("nothing/here", str(tmp_path / "x"))


# -- the token stays secret ---------------------------------------------------------------------
def test_token_never_appears_in_output_logs_reprs_or_kernelspecs(
    server, token_env, capfd, caplog, tmp_path
):
    from colabmagic import kernelspec

    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    with WanRelay(("127.0.0.1", server.port)) as wan:
        url = f"http://127.0.0.1:{wan.port}/"
        with session(url, ping_interval=0.5) as s:
            seen += [repr(s), repr(s.transport), repr(s.transport.rest.__dict__), str(s.status())]
            seen.append(json.dumps(s.proxy.agent_info))
            s.run("print('hello')")
            wan.cut()
            s.run("print('again')")
            seen.append(repr(s.transport.links))
    path = kernelspec.install("cm-jupyter", target=server.url, prefix=str(tmp_path))
    seen += [p.read_text() for p in tmp_path.rglob("*.json")]
    assert path
    for bad in (f"{server.url}?token={server.token}",):
        with pytest.raises(ParameterError) as info:
            colabmagic.connect(bad, register=False)
        seen.append(str(info.value))
    out, err = capfd.readouterr()
    seen += [out, err, caplog.text]
    seen += [r.getMessage() for r in caplog.records]
    assert not [text for text in seen if server.token in text]


def test_kernelspec_for_a_jupyter_server_target(server, token_env, tmp_path, monkeypatch):
    """The JupyterLab kernelspec: jupyter_client drives a kernel on the server, token from env."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    from colabmagic import kernelspec

    kernelspec.install("cm-server", target=server.url, prefix=str(tmp_path))
    spec_dir = tmp_path / "share" / "jupyter" / "kernels"
    assert server.token not in (spec_dir / "cm-server" / "kernel.json").read_text()
    ksm = KernelSpecManager(kernel_dirs=[str(spec_dir)])
    before = set(server.kernel_ids())
    km = KernelManager(kernel_name="cm-server", kernel_spec_manager=ksm)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        msg_id = kc.execute("print(6 * 7)")
        out = ""
        while True:
            msg = kc.get_iopub_msg(timeout=60)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                out += msg["content"]["text"]
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        assert out == "42\n"
        assert set(server.kernel_ids()) - before
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    wait_until(lambda: set(server.kernel_ids()) <= before, timeout=30, what="kernel deleted")


def test_a_delete_answered_500_waits_for_the_kernel_and_deletes_it_again(server, token_env):
    """On a busy machine jupyter_server answered a DELETE with HTTP 500 (the link's shutdown op
    had timed out and the provisioner's stop met it) and the kernel stayed: stop_kernel must
    still leave none. The 500 is a stand-in raised here; the server and kernel are real."""
    from colabmagic.transport.jupyter import JupyterTransport

    t = JupyterTransport(server.url)
    try:
        kernel_id = t.start_kernel()
        real, refused = t.rest.request, []

        def once_500(method, path, *args, **kwargs):
            if method == "DELETE" and not refused:
                refused.append(path)
                raise ConnectError(f"DELETE {path}: HTTP 500 Internal Server Error")
            return real(method, path, *args, **kwargs)

        t.rest.request = once_500
        t.rest.delete(kernel_id, wait=1.0)
        assert refused
        assert kernel_id not in server.kernel_ids()
    finally:
        t.close()


def test_a_link_step_cancelled_before_it_starts_leaves_no_coroutine_unawaited():
    """A connection that ends at once cancels its bootstrap/recover task before it runs; the
    step's coroutine must not exist yet then (it did, and Python warned at garbage collection:
    "coroutine 'KernelLink._recover' was never awaited", seen once in a full run)."""
    import asyncio
    import gc
    import types
    import warnings

    from colabmagic.transport.jupyter_link import KernelLink

    link = KernelLink("k", rest=None)

    async def main() -> None:
        att = types.SimpleNamespace(done=None)
        tasks = [asyncio.create_task(link._guard(att, s)) for s in (link._recover, link._bootstrap)]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with pytest.raises(asyncio.CancelledError):
                await task

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(main())
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]
