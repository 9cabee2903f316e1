"""A real JupyterHub on 127.0.0.1 (with configurable-http-proxy), for tests.

:func:`jupyterhub` starts ``python -m jupyterhub`` in a temporary directory: its sqlite database,
cookie secret, proxy pid file, logs and the users' home directories all live there. Users log in
with JupyterHub's ``DummyAuthenticator`` (no password), and ``SimpleLocalProcessSpawner`` runs each
single-user server as the current user (root is allowed on both sides, as in a container). A
service token with the ``admin`` role lets the helper create users, start their servers through
the REST API and mint user tokens with chosen scopes -- what a person does in the Hub's control
panel. On exit every server is stopped through the API and the Hub (which stops its proxy) is
terminated; anything left in the Hub's process group is then killed, so nothing leaks.

Needs ``jupyterhub`` (PyPI) and ``configurable-http-proxy`` (Debian: node-configurable-http-proxy);
:func:`hub_missing` names what is absent.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from colabmagic.testing import wait_until
from colabmagic.testing_jupyter import _NO_EXTENSIONS, _free_port
from colabmagic.testing_sshd import processes

SERVICE = "colabmagic-test"
# Debian's node modules; NodeSource's node (a common replacement) does not search there by itself.
_DEBIAN_NODE_MODULES = "/usr/share/nodejs"


def hub_missing() -> str | None:
    """Why a hub cannot start here (the install command), or None when it can."""
    try:
        import jupyterhub  # noqa: F401
    except ImportError:
        return "jupyterhub is not installed (pip install colabmagic[test])"
    if shutil.which("configurable-http-proxy") is None:
        return "configurable-http-proxy is not installed (apt install node-configurable-http-proxy)"
    return None


_CONFIG = """\
import json
c = get_config()  # noqa: F821
o = json.loads({options!r})
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = o["port"]
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = o["hub_port"]
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:%d" % o["proxy_api_port"]
c.ConfigurableHTTPProxy.pid_file = o["dir"] + "/proxy.pid"
c.ConfigurableHTTPProxy.debug = False
c.JupyterHub.db_url = "sqlite:///" + o["dir"] + "/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = o["dir"] + "/cookie_secret"
c.JupyterHub.pid_file = o["dir"] + "/hub.pid"
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = o["dir"] + "/home/{{username}}"
c.Spawner.cmd = [o["python"], "-m", "jupyterhub.singleuser"]
c.Spawner.args = [
    "--ServerApp.allow_root=True",
    "--ServerApp.jpserver_extensions=" + o["extensions"],
    # Kernels on Unix sockets, as in testing_jupyter: a TCP port picked and released can be taken
    # before the kernel binds it; the kernel then hangs unanswering (seen in a full run). Their
    # paths live in a short runtime directory: a socket's path has at most 107 bytes, and the
    # users' homes under a test's temporary directory are deeper than that allows.
    "--KernelManager.transport=ipc",
]
c.Spawner.environment = {{"JUPYTER_RUNTIME_DIR": o["runtime"]}}
c.Spawner.start_timeout = o["timeout"]
c.Spawner.http_timeout = o["timeout"]
c.Spawner.env_keep = ["PATH", "PYTHONPATH", "LANG", "LC_ALL", "VIRTUAL_ENV", "COLABMAGIC_ROOT"]
c.JupyterHub.services = [{{"name": o["service"], "api_token": o["service_token"]}}]
c.JupyterHub.load_roles = [{{"name": "admin", "services": [o["service"]]}}]
c.JupyterHub.cleanup_servers = True
c.JupyterHub.cleanup_proxy = True
"""


class HubProcess:
    """A running hub: :attr:`url` (the proxy's public URL), :attr:`port`, :attr:`log`."""

    def __init__(self, proc: subprocess.Popen, port: int, service_token: str, base: Path):
        self.proc, self.port, self.base = proc, port, base
        self._service_token = service_token
        self.url = f"http://127.0.0.1:{port}/"
        self.log = base / "hub.log"

    def __repr__(self) -> str:
        return f"<HubProcess {self.url}>"

    def api(self, method: str, path: str, body: dict | None = None, token: str | None = None):
        """A call to ``/hub/api/PATH`` (the service token unless *token*); ``(status, json)``."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(  # noqa: S310 - a loopback URL we built
            f"{self.url}hub/api/{path.lstrip('/')}",
            data=data,
            method=method,
            headers={
                "Authorization": f"token {token or self._service_token}",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw) if raw else {}
        except ValueError:  # the proxy's own error page, before the hub's route exists
            return status, {"text": raw[:200].decode(errors="replace")}

    def ready(self) -> bool:
        try:
            return self.api("GET", "")[0] == 200
        except (OSError, http.client.HTTPException):  # not (yet) our proxy on that port
            return False

    def start_user(self, name: str, timeout: float = 180.0) -> str:
        """Create user *name*, start their server; returns its URL ``.../user/NAME/``."""
        status, body = self.api("POST", f"users/{name}")
        if status not in (201, 409):
            msg = f"creating hub user {name}: HTTP {status} {body}"
            raise RuntimeError(msg)
        status, body = self.api("POST", f"users/{name}/server")
        if status not in (201, 202, 400):  # 400: already running
            msg = f"starting {name}'s server: HTTP {status} {body}"
            raise RuntimeError(msg)

        def ready() -> bool:
            model = self.api("GET", f"users/{name}")[1]
            server = (model.get("servers") or {}).get("")
            return bool(server and server.get("ready"))

        wait_until(
            lambda: self.proc.poll() is not None or ready(),
            timeout=timeout,
            interval=0.25,
            what=f"{name}'s single-user server to start",
        )
        if self.proc.poll() is not None:
            msg = f"the hub exited: {self.log.read_text()[-2000:]}"
            raise RuntimeError(msg)
        return f"{self.url}user/{name}/"

    def stop_user(self, name: str, timeout: float = 60.0) -> None:
        """Stop *name*'s server through the API and wait until it is gone."""
        self.api("DELETE", f"users/{name}/server")

        def stopped() -> bool:
            model = self.api("GET", f"users/{name}")[1]
            return not (model.get("servers") or {}).get("")

        wait_until(stopped, timeout=timeout, interval=0.25, what=f"{name}'s server to stop")

    def user_token(self, name: str, scopes: list[str], note: str = "colabmagic test") -> str:
        """A new API token owned by *name* with exactly *scopes* (the Hub's /hub/token page)."""
        status, body = self.api("POST", f"users/{name}/tokens", {"scopes": scopes, "note": note})
        if status != 201:
            msg = f"creating a token for {name}: HTTP {status} {body}"
            raise RuntimeError(msg)
        return body["token"]

    def kernels(self, name: str) -> list[str]:
        """The ids of the kernels *name*'s server runs (asked with the service's admin token)."""
        req = urllib.request.Request(  # noqa: S310 - a loopback URL we built
            f"{self.url}user/{name}/api/kernels",
            headers={"Authorization": f"token {self._service_token}"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310
            return [k["id"] for k in json.loads(resp.read())]

    def users(self) -> list[dict]:
        return self.api("GET", "users")[1]


@contextlib.contextmanager
def jupyterhub(base: Path, *, timeout: float = 180.0) -> Iterator[HubProcess]:
    """Run a JupyterHub under *base* until the block ends (see the module docstring)."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    (base / "home").mkdir(exist_ok=True)
    service_token = secrets.token_hex(24)
    env = dict(os.environ)
    env.pop("JUPYTER_TOKEN", None)
    env.pop("JUPYTERHUB_API_TOKEN", None)
    if os.path.isdir(_DEBIAN_NODE_MODULES):
        paths = [p for p in env.get("NODE_PATH", "").split(os.pathsep) if p]
        env["NODE_PATH"] = os.pathsep.join([*paths, _DEBIAN_NODE_MODULES])
    # The venv's bin first: the hub finds configurable-http-proxy on PATH, the spawner the python.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    config = base / "jupyterhub_config.py"
    cmd = [sys.executable, "-m", "jupyterhub", "-f", str(config), "--no-ssl"]
    runtime = tempfile.mkdtemp(prefix="cmhub-", dir="/tmp")  # the kernels' sockets (0700)
    for attempt in range(3):  # another process may take a free port before the hub binds it
        port = _free_port()
        options = {
            "port": port,
            "hub_port": _free_port(),
            "proxy_api_port": _free_port(),
            "dir": str(base),
            "runtime": runtime,
            "python": sys.executable,
            "extensions": _NO_EXTENSIONS,
            "timeout": int(timeout),
            "service": SERVICE,
            "service_token": service_token,
        }
        config.write_text(_CONFIG.format(options=json.dumps(options)))
        with open(base / "hub.log", "wb") as logf:
            proc = subprocess.Popen(
                cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=base, env=env,
                start_new_session=True,
            )  # fmt: skip
        hub = HubProcess(proc, port, service_token, base)
        try:
            wait_until(
                lambda: proc.poll() is not None or hub.ready(),  # noqa: B023 - called here
                timeout=timeout,
                interval=0.25,
                what="jupyterhub to start",
            )
        except BaseException:
            _stop(hub)
            shutil.rmtree(runtime, ignore_errors=True)
            raise
        if proc.poll() is None or attempt == 2 or "in use" not in hub.log.read_text().lower():
            break
        _stop(hub)
    try:
        if proc.poll() is not None:
            msg = f"jupyterhub exited: {hub.log.read_text()[-3000:]}"
            raise RuntimeError(msg)
        yield hub
    finally:
        _stop(hub)
        shutil.rmtree(runtime, ignore_errors=True)


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        for child in processes(ppid=todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _stop(hub: HubProcess) -> None:
    proc = hub.proc
    # The single-user servers and their kernels run in sessions of their own: note them now.
    spawned = _descendants(proc.pid)
    if proc.poll() is None:
        with contextlib.suppress(OSError, ValueError, TimeoutError, RuntimeError):
            for user in hub.users():
                if (user.get("servers") or {}).get(""):
                    hub.stop_user(user["name"])
        proc.terminate()  # the hub stops its proxy (cleanup_proxy) on SIGTERM
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # Whatever the hub started and left behind (proxy, single-user servers, their kernels).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in spawned:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
