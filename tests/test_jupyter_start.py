"""A kernel that is dead on arrival on a real ``jupyter server``: told early and for what it is.

The server, its REST API, its restarter and its websockets are real; the broken kernels are
played by :mod:`colabmagic.testing_standin_kernel` (a stand-in script run from a kernelspec's
``argv``), since a port race or a broken conda env cannot be made to order: it hangs without
binding (once, or always) or exits as it starts.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

import colabmagic
from colabmagic.errors import ConnectError, ParameterError
from colabmagic.testing import wait_until
from colabmagic.testing_jupyter import jupyter_server, require_server
from colabmagic.testing_standin_kernel import install_kernelspec, launched_pids
from colabmagic.transport.jupyter_start import DEFAULT_START_TIMEOUT, KernelDeadOnArrival

pytestmark = pytest.mark.timeout(600)
OLD_TIMEOUT = 60.0  # what a dead-on-arrival kernel cost before: the whole connect timeout


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jdata")


@pytest.fixture(scope="module")
def server(tmp_path_factory, data_dir):
    """A server that finds kernelspecs in *data_dir* (each test installs its own stand-in)."""
    require_server()
    env = {"JUPYTER_PATH": str(data_dir)}
    with jupyter_server(tmp_path_factory.mktemp("jserver-doa"), env=env) as srv:
        yield srv


@pytest.fixture
def standin(server, data_dir, tmp_path, monkeypatch):
    """``standin(mode) -> (kernelspec name, state dir)``, with the token in the environment."""
    monkeypatch.setenv("JUPYTER_TOKEN", server.token)

    def install(mode: str):
        name = f"standin-{mode}-{tmp_path.name[-12:]}".lower()
        install_kernelspec(data_dir, name, mode, tmp_path / "state")
        return name, tmp_path / "state"

    return install


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _none_left(server, before: set[str], state) -> None:
    """No kernel of ours left on the server, and no process any launch started still running."""
    assert set(server.kernel_ids()) <= before
    wait_until(
        lambda: not [p for p in launched_pids(state) if _alive(p)],
        timeout=30,
        what="every stand-in kernel process to end",
    )


BUDGET = 8  # seconds: a healthy start takes ~1 s here, 1.25 s at load 7


# -- (a) hangs on its first launch: one automatic restart, then it works ----------------------
def test_a_kernel_that_hangs_once_is_replaced_and_the_connect_succeeds(
    server, standin, ip, capsys, caplog
):
    caplog.set_level(logging.INFO, logger="colabmagic")
    name, state = standin("hang-once")
    before = set(server.kernel_ids())
    t0 = time.monotonic()
    line = f"{server.url} --name doa --kernel-name {name} --start-timeout {BUDGET}"
    ip.run_line_magic("colab_connect", line)
    elapsed = time.monotonic() - t0
    try:
        s = colabmagic.session.registry.get("doa")
        out = capsys.readouterr().out
        assert "connected: session 'doa'" in out
        assert "note: restarted on arrival" in out
        # The budget, then a fresh kernel: well under the old connect timeout. (A short budget
        # keeps the suite short; test_a_healthy_kernel_answers_well_within_the_budget checks
        # that a healthy start fits the default one with room to spare.)
        assert BUDGET <= elapsed < OLD_TIMEOUT - 15, elapsed
        assert s.run("print(6 * 7)").stdout == "42\n"
        (hung,) = s.transport.arrivals[s.kernel_id]
        assert hung.outcome == "hung"
        assert hung.deleted
        assert hung.kernel_id not in server.kernel_ids()  # never left on the user's server
        assert len(launched_pids(state)) == 2
        assert not _alive(launched_pids(state)[0])
        # The start check's websocket became the link's: no second connection for it.
        link = s.transport.links[s.kernel_id]
        assert link.attachments == 1
        assert not s.transport.opened
        capsys.readouterr()
        ip.run_line_magic("colab_status", "doa --json")
        (row,) = json.loads(capsys.readouterr().out)
        assert row["start_note"].startswith(f"restarted on arrival: kernel {hung.kernel_id[:8]}")
        assert "never answered" in row["start_note"]
        assert "(deleted)" in row["start_note"]
        assert "start_note" in repr(ip.run_line_magic("colab_status", "doa"))
        assert "never answered" in caplog.text
        assert "deleting it and starting a fresh one" in caplog.text
    finally:
        ip.run_line_magic("colab_disconnect", "doa")
    _none_left(server, before, state)
    out, err = capsys.readouterr()
    assert server.token not in out + err + caplog.text


# -- (b) never answers: one line, in bounded time, both kernels deleted -----------------------
def test_a_kernel_that_never_answers_fails_in_one_line_and_leaves_nothing(
    server, standin, caplog, capfd
):
    caplog.set_level(logging.DEBUG)
    name, state = standin("hang")
    before = set(server.kernel_ids())
    t0 = time.monotonic()
    with pytest.raises(KernelDeadOnArrival) as info:
        colabmagic.connect(server.url, kernel_name=name, start_timeout=4, register=False)
    elapsed = time.monotonic() - t0
    message = str(info.value)
    assert f"the kernel {name!r} on {server.url} was started twice and never answered" in message
    assert "4s each; last state: starting" in message
    assert f"`jupyter console --kernel {name}` on the host" in message
    assert "--kernel-name" in message
    assert "--start-timeout" in message
    assert "\n" not in message
    assert "may still run" not in message  # both were deleted before the error
    # Two budgets plus the deletes (the server waits 5 s for a kernel that ignores shutdown,
    # overlapped with the second start): bounded, and well under the old timeout.
    assert 8 <= elapsed < 30, elapsed
    assert len(launched_pids(state)) == 2
    _none_left(server, before, state)
    out, err = capfd.readouterr()
    assert server.token not in message + out + err + caplog.text


# -- (c) dies as it starts: the server's restarter gives up; we say so without retrying -------
def test_a_kernel_that_exits_as_it_starts_is_reported_dead_through_the_magic(
    server, standin, ip, capsys
):
    from IPython.core.error import UsageError

    name, state = standin("exit")
    before = set(server.kernel_ids())
    t0 = time.monotonic()
    # A budget the server's give-up (~18 s) never reaches even on a paused, loaded machine: on a
    # slower server a dying kernel is first taken for a hung one, retried, and then reported dead.
    line = f"{server.url} --name dead --kernel-name {name} --start-timeout 50"
    with pytest.raises(UsageError) as info:
        ip.run_line_magic("colab_connect", line)
    elapsed = time.monotonic() - t0
    message = str(info.value)
    assert f"the kernel {name!r} on {server.url} died as it started" in message
    assert "the server restarted it, then gave up and removed it" in message
    assert f"`jupyter console --kernel {name}`" in message
    assert "\n" not in message
    # jupyter_server restarts a dying kernel 5 times, 3 s apart, then removes it (~18 s here);
    # seen at once, and not retried: the server's restarts already were the retries.
    assert elapsed < 50, elapsed
    assert len(launched_pids(state)) == 6  # the first launch and the restarter's 5
    assert "dead" not in colabmagic.session.registry.names()
    _none_left(server, before, state)
    assert server.token not in message + capsys.readouterr().out


# -- healthy starts, options and bad input ---------------------------------------------------
def test_a_healthy_kernel_answers_well_within_the_budget(server, monkeypatch):
    monkeypatch.setenv("JUPYTER_TOKEN", server.token)
    from colabmagic.transport.jupyter import JupyterTransport

    t = JupyterTransport(server.url, start_timeout=DEFAULT_START_TIMEOUT)
    try:
        t0 = time.monotonic()
        kernel_id = t.start_kernel()
        took = time.monotonic() - t0
        assert kernel_id in t.opened  # answered: its websocket waits for open_pipe
        assert t.start_note(kernel_id) is None
        assert took < DEFAULT_START_TIMEOUT / 2, took
    finally:
        t.close()  # closes the websocket that no link took
        t.rest.delete(kernel_id)
    assert kernel_id not in server.kernel_ids()


def test_unknown_kernelspec_and_bad_start_timeout_are_one_line(server, monkeypatch):
    monkeypatch.setenv("JUPYTER_TOKEN", server.token)
    before = set(server.kernel_ids())
    with pytest.raises(ParameterError, match=r"no kernelspec 'nope' on .*it has: .*python3"):
        colabmagic.connect(server.url, kernel_name="nope", register=False)
    for bad in (0, -1, "soon"):
        with pytest.raises(ParameterError, match=r"start_timeout=.* must be a positive number"):
            colabmagic.connect(server.url, start_timeout=bad, register=False)
    with pytest.raises(ParameterError, match="--start-timeout applies to Jupyter-server"):
        colabmagic.connect("somehost", start_timeout=5, register=False)
    assert set(server.kernel_ids()) <= before


# -- the provisioner (JupyterLab's kernelspec with a Jupyter-server target) ------------------
def test_the_provisioner_recovers_and_reports_the_same_line(server, standin, tmp_path):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    from colabmagic import kernelspec

    spec_dir = tmp_path / "share" / "jupyter" / "kernels"
    ksm = KernelSpecManager(kernel_dirs=[str(spec_dir)])
    before = set(server.kernel_ids())

    def manager(behaviour: str, budget: float) -> tuple[KernelManager, str, Path]:
        """A JupyterLab kernelspec for a stand-in kernel that does *behaviour* on the server."""
        kernel, state = standin(behaviour)
        kernelspec.install(
            f"cm-doa-{behaviour}",
            target=server.url,
            transport_options={"kernel_name": kernel, "start_timeout": budget},
            prefix=str(tmp_path),
        )
        km = KernelManager(kernel_name=f"cm-doa-{behaviour}", kernel_spec_manager=ksm)
        return km, kernel, state

    km, _, once_state = manager("hang-once", 4)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        transport = km.provisioner.transport
        (hung,) = transport.arrivals[km.provisioner.agent_id]
        assert hung.deleted
        assert hung.kernel_id not in server.kernel_ids()
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    _none_left(server, before, once_state)

    km, hang, hang_state = manager("hang", 3)
    with pytest.raises(ConnectError) as info:
        km.start_kernel()
    message = str(info.value)
    assert f"the kernel {hang!r} on {server.url} was started twice and never answered" in message
    assert "\n" not in message
    assert server.token not in message
    _none_left(server, before, hang_state)


def test_the_message_for_a_hang_then_a_death_and_for_a_kernel_not_deleted():
    """The wording of the rarer outcomes (the common ones are checked against a server above)."""
    from colabmagic.transport.jupyter_start import Arrival, _message

    hung = Arrival("k1", "hung", "starting", 20.2, deleted=True)
    died = Arrival("k2", "died", "removed", 18.4, deleted=False)
    line = _message("gpu", "https://gpu.example.org/", [hung, died], 20.0)
    assert line == (
        "the kernel 'gpu' on https://gpu.example.org/ was started twice: the first never answered "
        "in 20s (last state: starting), then the second died as it started (the server restarted "
        "it, then gave up and removed it, after 18s; its log on the server says why): check that "
        "the kernelspec runs there (`jupyter console --kernel gpu` on the host) or pick another "
        "with --kernel-name; kernel k2 may still run there: delete it"
    )
    dead = Arrival("k3", "died", "dead", 1.0, deleted=True)
    line = _message(None, "https://gpu.example.org/", [dead], 20.0)
    assert line.startswith(
        "the server's default kernel on https://gpu.example.org/ died as it started (the server "
        "reports it dead after 1s; its log on the server says why): check that the kernelspec "
        "runs there (`jupyter console` on the host)"
    )


def test_cli_kernelspec_install_stores_the_start_timeout(tmp_path):
    from click.testing import CliRunner

    from colabmagic.cli import main

    url = "https://gpu.example.org/"
    args = ["kernelspec", "install", "gpu", "--target", url, "--prefix", str(tmp_path)]
    result = CliRunner().invoke(main, [*args, "--start-timeout", "45"])
    assert result.exit_code == 0, result.output
    spec = json.loads((tmp_path / "share/jupyter/kernels/gpu/kernel.json").read_text())
    config = spec["metadata"]["kernel_provisioner"]["config"]
    assert config["transport_options"] == {"start_timeout": 45.0}
    result = CliRunner().invoke(main, [*args, "--start-timeout", "0"])
    assert result.exit_code != 0
    assert "start_timeout=0.0 must be a positive number" in result.output
    ssh = ["kernelspec", "install", "g2", "--target", "gpu-box", "--prefix", str(tmp_path)]
    result = CliRunner().invoke(main, [*ssh, "--start-timeout", "45"])
    assert result.exit_code != 0
    assert "--start-timeout applies to Jupyter-server (https://) targets only" in result.output
