"""A JupyterHub single-user server as the target, end to end against a real JupyterHub.

The hub (``colabmagic.testing_hub``) runs on 127.0.0.1 with configurable-http-proxy in front, a
sqlite database in a temporary directory, and alice's single-user server spawned as the current
user. Every request goes through the proxy's public URL ``/user/alice/``, with a user token whose
only server scope is ``access:servers!server=alice/`` -- what a person makes on the Hub's token
page.
"""

from __future__ import annotations

import json
import logging
import time

import pytest
from IPython.core.error import UsageError

import colabmagic
from colabmagic.errors import CellTimeoutError, ConnectError, RemoteKernelDied
from colabmagic.testing import require, wait_until
from colabmagic.testing_hub import hub_missing, jupyterhub
from colabmagic.testing_jupyter import CELL, Lines
from colabmagic.testing_wan import WanRelay

pytestmark = pytest.mark.timeout(600)

USER = "alice"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    reason = hub_missing()
    require(reason is None, reason or "")
    with jupyterhub(tmp_path_factory.mktemp("hub")) as h:
        h.user_url = h.start_user(USER)
        h.token = h.user_token(USER, [f"access:servers!server={USER}/"])
        yield h


def test_colab_connect_through_the_hub_cell_interrupt_restart_and_a_cut(
    hub, ip, monkeypatch, capsys, caplog
):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("JUPYTER_TOKEN", hub.token)
    with WanRelay(("127.0.0.1", hub.port)) as wan:
        url = f"http://127.0.0.1:{wan.port}/user/{USER}/"
        ip.run_line_magic("colab_connect", f"{url} --name hub")
        try:
            s = colabmagic.session.registry.get("hub")
            assert s.transport.base == url
            assert s.kernel_id in hub.kernels(USER)
            # A cell with output, through the magic.
            capsys.readouterr()
            ip.run_cell_magic("gpu_run", "", "import os\nprint('on the hub', os.getpid())\n6 * 7")
            assert "on the hub" in capsys.readouterr().out
            # Interrupt through REST: %%gpu_run --timeout interrupts the remote cell.
            ip.run_cell_magic("gpu_run", "", "kept = 'yes'")
            t0 = time.monotonic()
            with pytest.raises(CellTimeoutError):
                ip.run_cell_magic("gpu_run", "--timeout 2", "import time\ntime.sleep(120)")
            assert time.monotonic() - t0 < 60
            assert s.run("print(kept)").stdout == "yes\n"
            # Exactly-once across one websocket cut in the middle of a cell.
            proxy = s.proxy

            def drop():
                wan.refuse = True
                wan.cut()
                wait_until(lambda: proxy.state == "link-down", timeout=30, what="the drop")
                time.sleep(0.5)  # the cell prints while we are away
                wan.refuse = False

            lines = Lines(at=4, on_line=drop)
            result = s.run(CELL, relay=lines, raise_on_error=False, timeout=240)
            assert lines.done.wait(30)
            assert proxy.reconnects >= 1, "the link never dropped"
            assert lines.numbers() == list(range(20))
            assert result.status == "ok"
            assert s.transport.delivery(s.kernel_id) == "exactly-once (kernel journal)"
            # Restart through REST: a fresh kernel, bootstrapped again.
            kernel_id = s.kernel_id
            s.restart(timeout=120)
            assert s.run("print('kept' in globals())").stdout == "False\n"
            s.push(y=3)
            assert s.pull("y") == 3
            assert s.kernel_id == kernel_id
        finally:
            ip.run_line_magic("colab_disconnect", "hub")
    wait_until(lambda: kernel_id not in hub.kernels(USER), timeout=30, what="kernel deleted")
    out, err = capsys.readouterr()
    assert hub.token not in out + err + caplog.text


def test_cli_kernels_and_kernelspec_for_a_hub_url(hub, monkeypatch, tmp_path):
    from click.testing import CliRunner
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    from colabmagic import kernelspec
    from colabmagic.cli import main

    monkeypatch.setenv("JUPYTER_TOKEN", hub.token)
    kernelspec.install("cm-hub", target=hub.user_url, prefix=str(tmp_path))
    spec_dir = tmp_path / "share" / "jupyter" / "kernels"
    assert hub.token not in (spec_dir / "cm-hub" / "kernel.json").read_text()
    before = set(hub.kernels(USER))
    km = KernelManager(kernel_name="cm-hub", kernel_spec_manager=KernelSpecManager(
        kernel_dirs=[str(spec_dir)]
    ))  # fmt: skip
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        reply = kc.execute_interactive("print(6 * 7)", timeout=60, output_hook=_collect(out := []))
        assert reply["content"]["status"] == "ok"
        assert "".join(out) == "42\n"
        (new,) = set(hub.kernels(USER)) - before
        result = CliRunner().invoke(main, ["kernels", hub.user_url, "--json"])
        assert result.exit_code == 0, result.output
        assert new in [k["id"] for k in json.loads(result.output)]
        assert hub.token not in result.output
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    wait_until(lambda: set(hub.kernels(USER)) <= before, timeout=30, what="kernel deleted")


def _collect(out: list):
    def hook(msg):
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])

    return hook


def test_a_token_without_the_server_scope_is_one_clear_line(hub, ip, monkeypatch):
    page = f"{hub.url}hub/token"
    before = hub.kernels(USER)
    no_scope = hub.user_token(USER, [])  # a valid token: it can only read alice's name
    monkeypatch.setenv("JUPYTER_TOKEN", no_scope)
    with pytest.raises(ConnectError) as info:
        colabmagic.connect(hub.user_url, register=False)
    line = str(info.value)
    assert "the token lacks the access:servers scope" in line
    assert line.endswith(f"create one at {page}")
    assert "\n" not in line
    assert no_scope not in line
    # The magic says the same in one UsageError line.
    with pytest.raises(UsageError, match="lacks the access:servers scope"):
        ip.run_line_magic("colab_connect", f"{hub.user_url} --name nope")
    # A token the hub does not know, and another user's token, are told apart.
    monkeypatch.setenv("JUPYTER_TOKEN", "not-a-hub-token")
    with pytest.raises(ConnectError, match="the hub does not accept this token"):
        colabmagic.connect(hub.user_url, register=False)
    assert hub.api("POST", "users/bob")[0] in (201, 409)
    bobs = hub.user_token("bob", ["access:servers!server=bob/"])
    monkeypatch.setenv("JUPYTER_TOKEN", bobs)
    with pytest.raises(ConnectError, match="does not cover this server") as info:
        colabmagic.connect(hub.user_url, register=False)
    assert bobs not in str(info.value)
    # No kernel was started by any of the refused attempts.
    assert hub.kernels(USER) == before


def test_a_stopped_single_user_server_ends_the_session_in_one_line(hub, monkeypatch):
    """The Hub answers 424 for a server that no longer runs: the kernel died with it."""
    url = hub.start_user("carol")
    monkeypatch.setenv("JUPYTER_TOKEN", hub.user_token("carol", ["access:servers!server=carol/"]))
    s = colabmagic.connect(url, register=False, connect_timeout=120, reconnect_timeout=120)
    try:
        assert s.run("print('up')").stdout == "up\n"
        hub.stop_user("carol")
        t0 = time.monotonic()
        with pytest.raises(RemoteKernelDied, match="is no longer running") as info:
            s.run("print('down')", timeout=120)
        assert time.monotonic() - t0 < 60  # told at once, not after reconnect_timeout
        assert f"start it again at {hub.url}hub/home" in str(info.value)
    finally:
        s.close()
    with pytest.raises(ConnectError, match="is no longer running"):
        colabmagic.connect(url, register=False)


def test_a_kernel_that_hangs_once_on_the_hub_is_replaced(hub, monkeypatch, tmp_path):
    """A dead-on-arrival kernel on a single-user server: deleted there and started again once.
    The kernel is a stand-in (``colabmagic.testing_standin_kernel``) in alice's own kernelspecs."""
    from colabmagic.testing_standin_kernel import install_kernelspec, launched_pids

    data = hub.base / "home" / USER / ".local" / "share" / "jupyter"
    install_kernelspec(data, "standin-hub", "hang-once", tmp_path / "state")
    monkeypatch.setenv("JUPYTER_TOKEN", hub.token)
    before = set(hub.kernels(USER))
    t0 = time.monotonic()
    s = colabmagic.connect(hub.user_url, kernel_name="standin-hub", start_timeout=5, register=False)
    try:
        assert time.monotonic() - t0 < 60
        assert s.run("print('answered')").stdout == "answered\n"
        (hung,) = s.transport.arrivals[s.kernel_id]
        assert hung.deleted
        assert hung.kernel_id not in hub.kernels(USER)
        assert "restarted on arrival" in s.transport.start_note(s.kernel_id)
    finally:
        s.close()
    wait_until(lambda: set(hub.kernels(USER)) <= before, timeout=30, what="kernel deleted")
    assert len(launched_pids(tmp_path / "state")) == 2
