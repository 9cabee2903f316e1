"""A real ``jupyter server`` on 127.0.0.1 with a token, for tests and benchmarks.

Only the server itself runs (no JupyterLab or other server extensions), so it starts in seconds.
Extra server options pass through, e.g.
``--ZMQChannelsWebsocketConnection.kernel_ws_protocol=`` to refuse the binary websocket subprotocol.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from colabmagic.relay import Relay
from colabmagic.testing import wait_until

_NO_EXTENSIONS = repr(  # a Python literal: how traitlets reads a dict on the command line
    {
        "jupyterlab": False,
        "jupyter_lsp": False,
        "notebook_shim": False,
        "jupyter_server_terminals": False,
        "notebook": False,
        "jupyter_server_fileid": False,
        "jupyter_server_ydoc": False,
    }
)


class ServerProcess:
    """A running server: :attr:`url`, :attr:`port`, :attr:`token`, :attr:`root`, :attr:`log`."""

    def __init__(
        self, proc: subprocess.Popen, port: int, token: str, root: Path, log: Path, base: str = "/"
    ):
        self.proc, self.port, self.token, self.root, self.log = proc, port, token, root, log
        self.url = f"http://127.0.0.1:{port}{base}"

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        """A REST call with the token; returns ``(status, json body)``."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(  # noqa: S310 - a loopback URL we built
            self.url + path.lstrip("/"),
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        return status, json.loads(raw) if raw else {}

    def ready(self) -> bool:
        try:
            return self.request("GET", "api/status")[0] == 200
        except (OSError, http.client.HTTPException, ValueError):  # not (yet) our server there
            return False

    def kernel_ids(self) -> list[str]:
        return [k["id"] for k in self.request("GET", "api/kernels")[1]]


def require_server() -> None:
    """Skip the calling test (fail it under ``COLABMAGIC_REQUIRE_ALL=1``) when jupyter_server is
    not installed."""
    from colabmagic.testing import require

    try:
        import jupyter_server  # noqa: F401
    except ImportError:
        require(False, "jupyter_server is not installed (pip install colabmagic[test])")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def jupyter_server(
    base: Path,
    *args: str,
    token: str | None = None,
    timeout: float = 180.0,
    base_url: str = "/",
    env: dict[str, str] | None = None,
) -> Iterator[ServerProcess]:
    """Run ``python -m jupyter_server`` under *base* (root dir and log there) until the block ends.

    *base_url* (``/a/b/``) is the server's ``ServerApp.base_url``; :attr:`ServerProcess.url`
    includes it. *env* adds to the server's environment (``JUPYTER_PATH`` for extra
    kernelspecs). Every kernel it still runs is shut down through the server on exit.
    """
    base = Path(base)
    root = base / "root"
    root.mkdir(parents=True, exist_ok=True)
    token = token or secrets.token_hex(16)
    log = base / "server.log"
    env = {**os.environ, **(env or {})}
    env.pop("JUPYTER_TOKEN", None)
    for attempt in range(3):  # another process may take the free port before the server binds it
        port = _free_port()
        cmd = [
            sys.executable, "-m", "jupyter_server", "--no-browser", "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}", "--ServerApp.port_retries=0", "--ServerApp.allow_root=True",
            f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
            f"--ServerApp.jpserver_extensions={_NO_EXTENSIONS}", f"--ServerApp.base_url={base_url}",
            # Kernels on Unix sockets: a TCP port jupyter_client picked and released can be
            # taken by another test's connection before the kernel binds it, and the restarter
            # retries the same ports until the server drops the kernel (seen in CI).
            "--KernelManager.transport=ipc",
            *args,
        ]  # fmt: skip
        with open(log, "wb") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=root, env=env)
        server = ServerProcess(proc, port, token, root, log, base_url)
        try:
            wait_until(
                lambda: proc.poll() is not None or server.ready(),  # noqa: B023 - called here
                timeout=timeout,
                interval=0.2,
                what="jupyter server to start",
            )
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if proc.poll() is None or "already in use" not in log.read_text() or attempt == 2:
            break
    try:
        if proc.poll() is not None:
            msg = f"jupyter server exited: {log.read_text()[-2000:]}"
            raise RuntimeError(msg)
        yield server
    finally:
        if proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                for kernel_id in server.kernel_ids():
                    server.request("DELETE", f"api/kernels/{kernel_id}")
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# A cell printing 20 numbered lines over 3 s: long enough to drop the link in the middle.
CELL = "import time\nfor i in range(20):\n    print(i, flush=True)\n    time.sleep(0.15)\n"


class Lines(Relay):
    """Collects a cell's stdout; calls *on_line()* (in a thread) once when line *at* arrives.

    With :data:`CELL` and a drop caused in *on_line*, this is the mid-cell drop of the
    exactly-once tests: :meth:`numbers` must come back as ``list(range(20))``.
    """

    def __init__(self, at: int | None = None, on_line=None):
        self.text = ""
        self.at, self.on_line = at, on_line
        self.fired = threading.Event()
        self.done = threading.Event()

    def stream(self, name: str, text: str) -> None:
        self.text += text
        if self.at is not None and not self.fired.is_set() and f"\n{self.at}\n" in f"\n{self.text}":
            self.fired.set()

            def act():
                try:
                    self.on_line()
                finally:
                    self.done.set()

            threading.Thread(target=act, daemon=True).start()

    def numbers(self) -> list[int]:
        return [int(x) for x in self.text.split()]
