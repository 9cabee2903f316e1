"""The remote kernel in JupyterLab's kernel list: kernelspecs, the provisioner, a real server, a
real browser.

(a) jupyter_client ``KernelManager`` drives the installed kernelspec through the provisioner:
start, execute, interrupt, restart, kernel death, kill, a dropped link, ``debug_request``, launch
failures and re-attaching from another manager — over ``local`` and a real sshd (the shared
``sshd_server`` fixture). (b) A real ``jupyter lab`` server on 127.0.0.1
with a token lists, starts, runs (over the websocket) and deletes the kernel. (c) Headless Debian
Chromium, driven by Playwright, picks the kernel in the launcher and runs ``print(6*7)``.

Set ``COLABMAGIC_UPDATE_DOCS=1`` to refresh the screenshots in ``docs/img/``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from jupyter_client.provisioning import KernelProvisionerFactory
from jupyter_core.utils import run_sync

from colabmagic import kernelspec
from colabmagic.cli import main
from colabmagic.errors import ConnectError
from colabmagic.testing import require, wait_until
from colabmagic.transport.local import LocalTransport

pytestmark = pytest.mark.timeout(240)

DOCS_IMG = Path(__file__).resolve().parents[1] / "docs" / "img"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


# -- helpers ---------------------------------------------------------------------------------
def live_agents() -> set[str]:
    """Ids of the agents (under this run's COLABMAGIC_ROOT) whose process is alive."""
    return {k["id"] for k in LocalTransport().list_kernels() if k["state"] != "stopped"}


def run_cell(kc, code: str, *, timeout: float = 60.0, on_output=None) -> tuple[dict, str]:
    """Execute *code*; return the execute_reply content and the stdout it printed."""
    out: list[str] = []

    def hook(msg):
        if msg["header"]["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            out.append(msg["content"]["text"])
            if on_output is not None:
                on_output(msg["content"]["text"])

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    return reply["content"], "".join(out)


def wait_for_stdout(kc, parent: str, text: str, *, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
        if (
            msg["parent_header"].get("msg_id") == parent
            and msg["header"]["msg_type"] == "stream"
            and text in msg["content"]["text"]
        ):
            return
    raise TimeoutError(f"no {text!r} on stdout within {timeout}s")


def channel_reply(get_msg, parent: str, *, timeout: float = 30.0) -> dict:
    """The first message that *get_msg* (``kc.get_shell_msg``...) returns in reply to *parent*."""
    deadline = time.monotonic() + timeout
    while True:
        msg = get_msg(timeout=max(0.01, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") == parent:
            return msg


def shell_reply(kc, parent: str, *, timeout: float = 30.0) -> dict:
    return channel_reply(kc.get_shell_msg, parent, timeout=timeout)["content"]


@contextlib.contextmanager
def started(ksm: KernelSpecManager, name: str):
    """A KernelManager + client for kernelspec *name*; shut down (and checked) on exit."""
    km = KernelManager(kernel_name=name, kernel_spec_manager=ksm)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        yield km, kc
    finally:
        kc.stop_channels()
        agent = km.provisioner.agent_id if km.provisioner is not None else None
        if km.has_kernel:
            km.shutdown_kernel()
        assert agent not in live_agents(), f"agent {agent} still running after shutdown"


def kernel_pid(kc) -> int:
    _, out = run_cell(kc, "import os; print(os.getpid())")
    return int(out)


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def jupyter_env(tmp_path_factory):
    """Private Jupyter directories (data, config, runtime, a kernelspec prefix) in the env."""
    base = tmp_path_factory.mktemp("jupyter")
    prefix = base / "prefix"
    env = {
        "JUPYTER_PATH": str(prefix / "share" / "jupyter"),
        "JUPYTER_DATA_DIR": str(base / "data"),
        "JUPYTER_CONFIG_DIR": str(base / "config"),
        "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
        "JUPYTER_PLATFORM_DIRS": "1",
        "JUPYTERLAB_SETTINGS_DIR": str(base / "config" / "lab" / "user-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(base / "workspaces"),
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield {"base": base, "prefix": prefix, "kernels": prefix / "share" / "jupyter" / "kernels"}


@pytest.fixture(scope="module")
def ksm(jupyter_env):
    return KernelSpecManager(kernel_dirs=[str(jupyter_env["kernels"])])


@pytest.fixture(scope="module", params=["local", "ssh"])
def remote_spec(request, jupyter_env):
    """An installed kernelspec per target kind (ssh: the shared ``sshd_server``); its name."""
    name = f"cm-{request.param}"
    if request.param == "local":
        kernelspec.install(name, local=True, prefix=str(jupyter_env["prefix"]))
        return name
    server = request.getfixturevalue("sshd_server")
    kernelspec.install(
        name,
        target=server.name,
        transport_options={
            "ssh_config": server.ssh_config,
            "python": sys.executable,
            "root": os.environ["COLABMAGIC_ROOT"],
            "connect_timeout": 10,
        },
        prefix=str(jupyter_env["prefix"]),
    )
    return name


@pytest.fixture(scope="module")
def local_spec(jupyter_env):
    kernelspec.install("cm-lab", local=True, prefix=str(jupyter_env["prefix"]))
    return "cm-lab"


# -- (a) kernelspecs and the CLI -------------------------------------------------------------
def test_cli_install_list_remove(jupyter_env, tmp_path):
    runner = CliRunner()
    prefix = jupyter_env["prefix"]
    res = runner.invoke(
        main,
        [
            "kernelspec", "install", "colab-cli", "--target", "gpu-box", "--python",
            "/opt/py/bin/python", "--cwd", "/content", "--env", "A=1", "--env", "B=x=y",
            "--mock-gpu", "--prefix", str(prefix),
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    spec_dir = jupyter_env["kernels"] / "colab-cli"
    spec = json.loads((spec_dir / "kernel.json").read_text())
    assert spec["display_name"] == "colab-cli (remote GPU)"
    assert spec["interrupt_mode"] == "message"
    assert spec["language"] == "python"
    assert spec["metadata"]["kernel_provisioner"] == {
        "provisioner_name": "colabmagic-provisioner",
        "config": {
            "target": "gpu-box",
            "python": "/opt/py/bin/python",
            "cwd": "/content",
            "env": {"A": "1", "B": "x=y"},
            "mock_gpu": True,
        },
    }
    for logo in ("logo-32x32.png", "logo-64x64.png"):
        assert (spec_dir / logo).read_bytes().startswith(b"\x89PNG")

    res = runner.invoke(main, ["kernelspec", "list", "--json"])
    assert res.exit_code == 0, res.output
    listed = {s["name"]: s for s in json.loads(res.output)}
    assert listed["colab-cli"]["target"] == "gpu-box"
    assert "python3" not in listed  # only colabmagic kernelspecs
    assert "colab-cli" in runner.invoke(main, ["kernelspec", "list"]).output

    # Jupyter itself sees it (and the provisioner entry point resolves).
    out = subprocess.run(
        [sys.executable, "-m", "jupyter", "kernelspec", "list", "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert "colab-cli" in json.loads(out)["kernelspecs"]
    factory = KernelProvisionerFactory.instance()
    ksm = KernelSpecManager(kernel_dirs=[str(jupyter_env["kernels"])])
    assert factory.is_provisioner_available(ksm.get_kernel_spec("colab-cli"))

    res = runner.invoke(main, ["kernelspec", "remove", "colab-cli"])
    assert res.exit_code == 0, res.output
    assert not spec_dir.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["install", "x"], "give --target HOST"),
        (["install", "x", "--local", "--target", "h"], "exclude each other"),
        (["install", "bad name", "--local"], "must use only letters"),
        (["install", "x", "--target", "-oProxyCommand=sh"], "is not an ssh host"),
        (["install", "x", "--local", "--env", "NOEQUALS"], "NAME=VALUE"),
        (["install", "x", "--local", "--user", "--prefix", "/tmp/p"], "at most one of"),
        (["remove", "no-such-kernel"], "no kernelspec named 'no-such-kernel'"),
    ],
)
def test_cli_bad_input_is_one_line(jupyter_env, args, message):
    res = CliRunner().invoke(main, ["kernelspec", *args])
    assert res.exit_code == 1
    assert res.output.startswith("Error: ")
    assert message in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_remove_refuses_other_kernels(jupyter_env):
    other = jupyter_env["kernels"] / "plain"
    other.mkdir(parents=True)
    (other / "kernel.json").write_text(
        json.dumps(
            {"argv": ["python", "-m", "ipykernel"], "display_name": "plain", "language": "python"}
        )
    )
    res = CliRunner().invoke(main, ["kernelspec", "remove", "plain"])
    assert res.exit_code == 1
    assert "not a colabmagic kernelspec" in res.output
    assert other.exists()
    shutil.rmtree(other)


# -- (a) KernelManager through the provisioner -----------------------------------------------
def test_kernel_manager_lifecycle(ksm, remote_spec):
    """Start, execute, interrupt (by message), restart (fresh kernel, same ports), shutdown."""
    with started(ksm, remote_spec) as (km, kc):
        prov = km.provisioner
        assert type(prov).__name__ == "ColabProvisioner"
        assert prov.agent_id in live_agents() or remote_spec != "cm-local"
        reply, out = run_cell(kc, "x = 6 * 7\nprint(x)")
        assert reply["status"] == "ok"
        assert out == "42\n"

        # Widgets: comm messages pass through both ways.
        seen = []
        kc.execute_interactive(
            "import ipywidgets\nw = ipywidgets.IntSlider(value=3)\nw",
            timeout=60,
            output_hook=lambda m: seen.append(m["header"]["msg_type"]),
        )
        assert "comm_open" in seen
        msg_id = kc.comm_info(target_name="jupyter.widget")
        comms = shell_reply(kc, msg_id)["comms"]
        assert {c["target_name"] for c in comms.values()} == {"jupyter.widget"}

        # stop_on_error=False: otherwise ipykernel aborts requests queued right after the error
        sleeper = "import time\nprint('sleeping', flush=True)\ntime.sleep(60)"
        msg_id = kc.execute(sleeper, stop_on_error=False)
        wait_for_stdout(kc, msg_id, "sleeping")
        km.interrupt_kernel()
        reply = shell_reply(kc, msg_id)
        assert reply["status"] == "error"
        assert reply["ename"] == "KeyboardInterrupt"

        pid = kernel_pid(kc)
        ports = {k: km.get_connection_info()[k] for k in ("shell_port", "iopub_port")}
        km.restart_kernel()
        assert km.is_alive()
        kc.wait_for_ready(timeout=60)
        assert kernel_pid(kc) != pid
        reply, _ = run_cell(kc, "x")
        assert reply["status"] == "error"
        assert reply["ename"] == "NameError"  # a fresh kernel
        assert {k: km.get_connection_info()[k] for k in ports} == ports

        # signal_kernel: provisioner.send_signal -> the agent's interrupt op
        msg_id = kc.execute(sleeper, stop_on_error=False)
        wait_for_stdout(kc, msg_id, "sleeping")
        km.signal_kernel(signal.SIGINT)
        assert shell_reply(kc, msg_id)["ename"] == "KeyboardInterrupt"
        assert run_cell(kc, "print('still here')")[1] == "still here\n"


def test_kernel_death_is_reported_then_restart_and_kill(ksm, local_spec):
    with started(ksm, local_spec) as (km, kc):
        kc.execute("import os; os._exit(3)")
        wait_until(lambda: not km.is_alive(), timeout=30, what="the kernel death to be seen")
        assert run_sync(km.provisioner.poll)() == 3
        km.restart_kernel(now=True)  # what the server's auto-restarter does
        kc.wait_for_ready(timeout=60)
        assert run_cell(kc, "print('back')")[1] == "back\n"
        agent = km.provisioner.agent_id
        km.shutdown_kernel(now=True)  # the kill path: SIGKILL through the agent
        assert not km.is_alive()
        assert agent not in live_agents()


def test_cell_survives_a_dropped_link(ksm, local_spec):
    """Killing the bridge process mid-cell (a dropped SSH link): every line arrives once."""
    with started(ksm, local_spec) as (km, kc):
        prov = km.provisioner
        killed = []

        def drop(_text):
            if not killed:
                bridge = prov.transport.bridges[-1]
                os.kill(bridge.pid, signal.SIGKILL)
                killed.append(bridge.pid)

        code = "import time\nfor i in range(6):\n    print(i, flush=True)\n    time.sleep(0.25)"
        reply, out = run_cell(kc, code, on_output=drop)
        assert reply["status"] == "ok"
        assert out.split() == [str(i) for i in range(6)]
        assert killed
        assert prov.proxy.reconnects >= 1
        assert km.is_alive()


def test_debug_request_passes_through(ksm, local_spec):
    require(importlib.util.find_spec("debugpy") is not None, "debugpy is not installed")
    spec = ksm.get_kernel_spec(local_spec)
    assert spec.metadata["debugger"] is True  # JupyterLab shows its debugger for this kernel
    with started(ksm, local_spec) as (_km, kc):
        content = {
            "type": "request",
            "seq": 1,
            "command": "initialize",
            "arguments": {
                "clientID": "colabmagic-test",
                "adapterID": "python",
                "pathFormat": "path",
                "linesStartAt1": True,
                "columnsStartAt1": True,
            },
        }
        msg = kc.session.msg("debug_request", content)
        kc.control_channel.send(msg)
        reply = channel_reply(kc.control_channel.get_msg, msg["header"]["msg_id"])
        assert reply["header"]["msg_type"] == "debug_reply"
        assert reply["content"]["success"] is True
        assert reply["content"]["command"] == "initialize"


def test_launch_failure_is_a_readable_error(ksm, jupyter_env, tmp_path):
    fake = tmp_path / "python-without-ipykernel"
    fake.write_text("#!/bin/sh\necho 'No module named ipykernel_launcher' >&2\nexit 1\n")
    fake.chmod(0o755)
    kernelspec.install("cm-broken", local=True, python=str(fake), prefix=str(jupyter_env["prefix"]))
    before = live_agents()
    km = KernelManager(kernel_name="cm-broken", kernel_spec_manager=ksm)
    with pytest.raises(ConnectError, match=r"exited while starting.*ipykernel") as info:
        km.start_kernel()
    assert "\n" not in str(info.value)
    assert live_agents() <= before  # the agent that was started is stopped again

    kernelspec.install(
        "cm-missing", local=True, python=str(tmp_path / "nope"), prefix=str(jupyter_env["prefix"])
    )
    km = KernelManager(kernel_name="cm-missing", kernel_spec_manager=ksm)
    with pytest.raises(ConnectError, match="could not start a local kernel"):
        km.start_kernel()
    assert live_agents() <= before


def test_reattach_from_another_manager(ksm, local_spec):
    """What a restarted server does with get/load_provisioner_info: same kernel, same ports."""
    km1 = KernelManager(kernel_name=local_spec, kernel_spec_manager=ksm)
    km1.start_kernel()
    kc = km1.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    run_cell(kc, "x = 41")
    kc.stop_channels()
    info = json.loads(json.dumps(run_sync(km1.provisioner.get_provisioner_info)()))
    agent = km1.provisioner.agent_id
    km1.provisioner.detach()  # the old server process goes away; the kernel keeps running
    assert agent in live_agents()

    km2 = KernelManager(
        kernel_name=local_spec, kernel_spec_manager=ksm, kernel_id=info["kernel_id"]
    )
    km2.provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
        info["kernel_id"], km2.kernel_spec, parent=km2
    )
    run_sync(km2.provisioner.load_provisioner_info)(info)
    km2.load_connection_info(km2.provisioner.connection_info)
    assert km2.get_connection_info()["shell_port"] == info["connection_info"]["shell_port"]
    kc2 = km2.client()
    kc2.start_channels()
    try:
        kc2.wait_for_ready(timeout=60)
        assert run_cell(kc2, "print(x + 1)")[1] == "42\n"
    finally:
        kc2.stop_channels()
        km2.shutdown_kernel()
        km1.cleanup_resources()
    assert agent not in live_agents()


# -- (b) a real jupyter server ---------------------------------------------------------------
class Lab:
    """A ``jupyter lab`` subprocess on 127.0.0.1 with a token."""

    def __init__(self, proc: subprocess.Popen, url: str, token: str, log: Path):
        self.proc, self.url, self.token, self.log = proc, url, token, log

    def accepts(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", int(self.url.rsplit(":", 1)[1])), 1).close()
        except OSError:
            return False
        return True

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=90) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw) if raw else {}
        except ValueError:
            return status, {"body": raw.decode(errors="replace")}


def _server_info(path: Path) -> dict | None:
    """The server's info file once it is complete (it is written in more than one step)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def jupyter_server(
    app: str, base: Path, name: str, *, clean_exit: bool = True, jupyter_path: Path | None = None
):
    """Run ``python -m APP`` (``jupyterlab`` or ``jupyter_server``) on 127.0.0.1 with a token.

    On exit ``/api/shutdown`` shuts every kernel down through the provisioner and the server
    exits. With *clean_exit* false the server is killed instead: after a failed kernel start,
    jupyter_client keeps the failed id in ``MultiKernelManager._pending_kernels`` and the
    server's shutdown then fails with "404 Kernel does not exist" and never exits (upstream).
    """
    root = base / f"{name}-root"
    root.mkdir()
    token = secrets.token_hex(16)
    log = base / f"{name}.log"
    cmd = [
        sys.executable, "-m", app, "--no-browser", "--ServerApp.ip=127.0.0.1",
        "--ServerApp.port=0", "--ServerApp.port_retries=0", "--ServerApp.allow_root=True",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
    ]  # fmt: skip
    if app == "jupyterlab":
        cmd += [
            "--LabApp.news_url=",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ]
    env = dict(os.environ)
    if jupyter_path is not None:
        env["JUPYTER_PATH"] = str(jupyter_path)
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=root, env=env)
    info_file = Path(os.environ["JUPYTER_RUNTIME_DIR"]) / f"jpserver-{proc.pid}.json"
    server = None
    try:
        wait_until(
            lambda: _server_info(info_file) or proc.poll() is not None,
            timeout=60,
            what=f"{app} to start",
        )
        assert proc.poll() is None, log.read_text()[-3000:]
        info = _server_info(info_file)
        server = Lab(proc, f"http://127.0.0.1:{info['port']}", token, log)
        wait_until(
            lambda: server.accepts() or proc.poll() is not None,
            timeout=30,
            what=f"{app} to accept connections on port {info['port']}",
        )
        assert proc.poll() is None, log.read_text()[-3000:]
        yield server
    finally:
        if server is not None and clean_exit and proc.poll() is None:
            with contextlib.suppress(OSError):
                server.request("POST", "/api/shutdown")
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(60)
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def lab(jupyter_env):
    """One ``jupyter lab`` shared by the server and the browser tests; it sees one colabmagic
    kernelspec, ``colab``, "colab (remote GPU)" (a local target, so it runs anywhere)."""
    base = jupyter_env["base"]
    prefix = base / "lab-prefix"
    kernelspec.install("colab", local=True, display_name="colab (remote GPU)", prefix=str(prefix))
    settings = base / "config" / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"checkForUpdates": False, "fetchNews": "false"})
    )
    before = live_agents()
    with jupyter_server(
        "jupyterlab", base, "lab", jupyter_path=prefix / "share" / "jupyter"
    ) as server:
        yield server
    assert server.proc.returncode == 0, server.log.read_text()[-3000:]
    leaked = live_agents() - before
    assert not leaked, f"the server left agents running: {leaked}"


def ws_execute(lab: Lab, kernel_id: str, code: str, *, timeout: float = 60.0) -> str:
    """Run *code* over the kernel's websocket channels; return its stdout."""
    import websocket

    ws = websocket.create_connection(
        lab.url.replace("http", "ws")
        + f"/api/kernels/{kernel_id}/channels?session_id={uuid.uuid4().hex}",
        header=[f"Authorization: token {lab.token}"],
        timeout=timeout,
    )
    try:
        msg_id = uuid.uuid4().hex
        ws.send(
            json.dumps(
                {
                    "header": {
                        "msg_id": msg_id,
                        "username": "test",
                        "session": uuid.uuid4().hex,
                        "msg_type": "execute_request",
                        "version": "5.3",
                    },
                    "parent_header": {},
                    "metadata": {},
                    "content": {
                        "code": code,
                        "silent": False,
                        "store_history": True,
                        "user_expressions": {},
                        "allow_stdin": False,
                        "stop_on_error": True,
                    },
                    "channel": "shell",
                    "buffers": [],
                }
            )
        )
        out, idle, replied = [], False, False
        deadline = time.monotonic() + timeout
        while not (idle and replied):
            assert time.monotonic() < deadline, f"no reply within {timeout}s"
            msg = json.loads(ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "stream":
                out.append(msg["content"]["text"])
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                idle = True
            elif kind == "execute_reply":
                assert msg["content"]["status"] == "ok", msg["content"]
                replied = True
        return "".join(out)
    finally:
        ws.close()


def test_jupyter_server_lists_starts_runs_and_deletes(lab):
    name = "colab"
    status, specs = lab.request("GET", "/api/kernelspecs")
    assert status == 200
    assert specs["kernelspecs"][name]["spec"]["display_name"] == "colab (remote GPU)"
    assert "logo-64x64" in specs["kernelspecs"][name]["resources"]

    before = live_agents()
    status, kernel = lab.request("POST", "/api/kernels", {"name": name})
    assert status == 201, kernel
    started_agents = live_agents() - before
    assert len(started_agents) == 1
    assert ws_execute(lab, kernel["id"], "print(6*7)") == "42\n"

    status, _ = lab.request("POST", f"/api/kernels/{kernel['id']}/restart")
    assert status == 200
    assert ws_execute(lab, kernel["id"], "print('restarted')") == "restarted\n"

    status, _ = lab.request("DELETE", f"/api/kernels/{kernel['id']}")
    assert status == 204
    assert not (started_agents & live_agents())


def test_jupyter_server_reports_a_launch_failure(jupyter_env, tmp_path):
    """The message JupyterLab shows in "Error Starting Kernel" is ours, not "Unhandled error"."""
    kernelspec.install(
        "cm-no-python", local=True, python=str(tmp_path / "nope"), prefix=str(jupyter_env["prefix"])
    )
    before = live_agents()
    with jupyter_server("jupyter_server", tmp_path, "server", clean_exit=False) as server:
        status, body = server.request("POST", "/api/kernels", {"name": "cm-no-python"})
        assert status == 500
        assert body["message"].startswith("could not start a local kernel: ")
        assert "\n" not in body["message"]
        status, kernels = server.request("GET", "/api/kernels")
        assert kernels == []
    assert live_agents() <= before


# -- (c) a real JupyterLab in headless Chromium ----------------------------------------------
@pytest.mark.browser
def test_jupyterlab_picks_the_remote_kernel(lab, tmp_path):
    require(os.path.exists(CHROMIUM), f"Debian's chromium is not installed at {CHROMIUM}")
    from playwright.sync_api import expect, sync_playwright

    display = "colab (remote GPU)"
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 800},
        )
        page = browser.pages[0] if browser.pages else browser.new_page()
        try:
            page.goto(f"{lab.url}/lab?token={lab.token}", timeout=90_000)
            card = page.locator(".jp-LauncherCard", has_text=display).first
            expect(card).to_be_visible(timeout=90_000)
            card.hover()
            shots = [tmp_path / "jupyterlab-kernel-picker.png"]
            page.screenshot(path=str(shots[0]))

            card.click()
            status = page.locator(".jp-StatusBar-TextItem", has_text=f"{display} | Idle")
            expect(status.first).to_be_visible(timeout=60_000)
            # the kernel advertises the debugger (debug_request passes through the proxy)
            expect(page.get_by_role("button", name="Enable Debugger")).to_be_enabled()
            editor = page.locator(".jp-NotebookPanel .jp-Cell .cm-content").first
            editor.fill("print(6*7)")
            expect(editor).to_have_text("print(6*7)")
            editor.press("Shift+Enter")
            output = page.locator(".jp-NotebookPanel .jp-OutputArea-output").first
            expect(output).to_have_text("42", timeout=60_000)
            shots.append(tmp_path / "jupyterlab-remote-cell.png")
            page.screenshot(path=str(shots[1]))
        except BaseException:
            page.screenshot(path=str(tmp_path / "failure.png"))
            raise
        finally:
            browser.close()
    if os.environ.get("COLABMAGIC_UPDATE_DOCS") == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        for shot in shots:
            shutil.copyfile(shot, DOCS_IMG / shot.name)


WIDGETS_NOTEBOOK = {
    "nbformat": 4,
    "nbformat_minor": 5,
    "metadata": {
        "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)",
                       "language": "python"}
    },
    "cells": [
        {"cell_type": "code", "id": f"c{i}", "metadata": {}, "outputs": [],
         "execution_count": None, "source": source}
        for i, source in enumerate([
            "%load_ext colabmagic\n%colab_connect --local",
            "%%gpu_run\nimport ipywidgets as w\nfrom tqdm.notebook import tqdm\n"
            "for i in tqdm(range(20), desc='remote'):\n    pass\n"
            "s = w.IntSlider(value=3, max=10, description='remote', continuous_update=False)\ns",
            "%%gpu_run\nprint('remote value', s.value)",
            "%%gpu_run\nimport plotly.graph_objects as go\n"
            "go.FigureWidget(data=[go.Bar(y=[2, 5, 3])], layout={'height': 260, 'width': 520})",
        ])
    ],
}  # fmt: skip


@pytest.mark.browser
def test_jupyterlab_shows_remote_widgets_through_gpu_run(lab, tmp_path):
    """A local ipykernel notebook: %%gpu_run draws a slider and a finished tqdm bar; dragging
    the slider with the mouse changes the value the next remote cell reads; a plotly
    FigureWidget draws its bars."""
    require(os.path.exists(CHROMIUM), f"Debian's chromium is not installed at {CHROMIUM}")
    from playwright.sync_api import expect, sync_playwright

    status, _ = lab.request(
        "PUT", "/api/contents/widgets.ipynb", {"type": "notebook", "content": WIDGETS_NOTEBOOK}
    )
    assert status in (200, 201)
    before = live_agents()
    shot = tmp_path / "jupyterlab-widgets.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 1000},
        )
        page = browser.pages[0] if browser.pages else browser.new_page()
        try:
            # ?reset: a fresh workspace, without the notebooks earlier browser tests left open
            page.goto(f"{lab.url}/lab/tree/widgets.ipynb?reset&token={lab.token}", timeout=90_000)
            idle = page.locator(".jp-StatusBar-TextItem", has_text="Python 3 (ipykernel) | Idle")
            expect(idle.first).to_be_visible(timeout=90_000)
            cells = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell")
            expect(cells).to_have_count(4, timeout=30_000)
            outputs = [cells.nth(i).locator(".jp-OutputArea") for i in range(4)]
            for i in (0, 1):
                cells.nth(i).locator(".cm-content").click()
                page.keyboard.press("Shift+Enter")
            expect(outputs[0]).to_contain_text("connected: session 'default'", timeout=90_000)
            slider = outputs[1].locator(".widget-slider")
            expect(slider).to_be_visible(timeout=60_000)
            readout = outputs[1].locator(".widget-readout")
            expect(readout).to_have_text("3")
            # tqdm turns the bar green (bar_style "success") when it finishes
            expect(outputs[1].locator(".progress-bar-success")).to_be_visible()
            expect(outputs[1]).to_contain_text("20/20")
            expect(outputs[1]).not_to_contain_text("Error displaying widget")

            handle = slider.locator(".noUi-handle")
            box = handle.bounding_box()
            track = slider.locator(".noUi-target").bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.mouse.down()
            page.mouse.move(
                track["x"] + track["width"] * 0.8, box["y"] + box["height"] / 2, steps=8
            )
            page.mouse.up()
            expect(readout).not_to_have_text("3")
            moved = readout.inner_text().strip()
            assert int(moved) > 3, moved

            cells.nth(2).locator(".cm-content").click()
            page.keyboard.press("Shift+Enter")
            expect(outputs[2]).to_contain_text(f"remote value {moved}", timeout=60_000)

            cells.nth(3).locator(".cm-content").click()
            page.keyboard.press("Shift+Enter")
            plot = outputs[3].locator(".js-plotly-plot")  # plotly's FigureWidget (anywidget)
            expect(plot).to_be_visible(timeout=60_000)
            expect(plot.locator(".bars .point")).to_have_count(3)
            page.screenshot(path=str(shot))
        except BaseException:
            page.screenshot(path=str(tmp_path / "failure.png"))
            raise
        finally:
            browser.close()
    status, sessions = lab.request("GET", "/api/sessions")
    for s in sessions:
        if s["path"].endswith("widgets.ipynb"):
            lab.request("DELETE", f"/api/sessions/{s['id']}")
    wait_until(lambda: live_agents() <= before, timeout=60, what="the remote kernel to stop")
    if os.environ.get("COLABMAGIC_UPDATE_DOCS") == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOCS_IMG / shot.name)
