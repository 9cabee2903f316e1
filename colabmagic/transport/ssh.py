"""The SSH transport: agents on a remote host, reached through one paramiko connection.

Everything rides on one SSH connection (:mod:`colabmagic.transport.ssh_connect`): the probe of the
remote Python, the agent commands (``python -m colabmagic.remote start|list|stop``), every
bridge pipe (an exec channel running ``... bridge``) and SFTP. Keeping the bridge's exec session
on the same connection matters: sshd sets TCP_NODELAY on a connection only once a command
session runs on it.

**Zero-install.** If the remote interpreter cannot import *this* version of the agent code, the
few files it needs (:data:`SHIPPED`) are copied over SFTP into a private directory
``~/.colabmagic/lib/<code hash>/`` (0700) and the remote commands run with ``PYTHONPATH`` set
to it. The remote needs only Python >= 3.9 and ipykernel.

**Resume.** When the connection dies (reset, sshd child killed, keepalive unanswered), every
pipe reads EOF; the proxy then calls :meth:`SSHTransport.open_pipe` again, which opens a *new*
connection, and resumes the stream where it stopped.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import posixpath
import shlex
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import paramiko

from colabmagic.errors import ConnectError, HostKeyError, ParameterError
from colabmagic.proxy import PermanentLinkError
from colabmagic.transport import agent_start_args, parse_agent_reply, ssh_connect
from colabmagic.transport.ssh_connect import Connection, Hop

log = logging.getLogger("colabmagic.ssh")

DEFAULT_ROOT = "~/.colabmagic/kernels"
LIB_DIR = ".colabmagic/lib"
EXIT_NO_AGENT = 4
_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the agent, bridge and kernel bootstrap need on a host without colabmagic.
SHIPPED = (
    "wire.py",
    "remote/__init__.py",
    "remote/__main__.py",
    "remote/agent.py",
    "remote/bridge.py",
    "remote/kernel_ext.py",
    "gpu/mock.py",
)
# Stand-ins for the package __init__ files: the real ones import local-only modules.
STANDINS = {
    "__init__.py": '"""colabmagic agent code, shipped over SSH by the local side."""\n',
    "gpu/__init__.py": "",
}
_PUMP_CHUNK = 1 << 20

# Every remote command starts with this prelude (``python -c BOOT COMMAND ARGS``): it checks the
# interpreter, finds this exact agent code (installed, or shipped under LIB) and runs
# ``colabmagic.remote`` with it -- one exec, one login shell, per command. When something is
# missing it prints what (one COLABMAGIC-PROBE line) and exits 3; the local side ships the code
# or explains. Python-2-parsable up to the version check, so any python reports cleanly.
_BOOT = r"""
import hashlib, json, os, sys
HASH = %(hash)r
LIB = %(lib)r
SHIPPED = %(shipped)r
def _hash(pkg):
    h = hashlib.sha256()
    for rel in sorted(SHIPPED):
        with open(os.path.join(pkg, rel), "rb") as f:
            h.update(rel.encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()
def _main():
    home = os.path.expanduser("~")
    info = {"version": list(sys.version_info[:3]), "executable": sys.executable, "home": home}
    lib = os.path.join(home, LIB)
    if sys.version_info < (3, 9):
        info["need"] = "python"
    else:
        import importlib.util as u
        if u.find_spec("ipykernel") is None:
            info["need"] = "ipykernel"
        elif os.path.exists(os.path.join(lib, ".complete")):
            sys.path.insert(0, lib)
            old = os.environ.get("PYTHONPATH")
            os.environ["PYTHONPATH"] = lib + (os.pathsep + old if old else "")
        else:
            spec = u.find_spec("colabmagic")
            try:
                ok = _hash(list(spec.submodule_search_locations)[0]) == HASH
            except Exception:
                ok = False
            if not ok:
                info["need"] = "code"
    if "need" in info:
        print("COLABMAGIC-PROBE " + json.dumps(info))
        sys.exit(3)
    import runpy
    sys.argv = ["colabmagic.remote"] + sys.argv[1:]
    runpy.run_module("colabmagic.remote", run_name="__main__", alter_sys=True)
_main()
"""


@functools.cache
def code_hash() -> str:
    """sha256 of the agent code this side would ship (and expects the remote to run).

    Read once per process: every transport (each connect, reconnect and CLI call) needs it.
    """
    h = hashlib.sha256()
    for rel in sorted(SHIPPED):
        with open(os.path.join(_PKG, rel), "rb") as f:
            h.update(rel.encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()


class ChannelPipe:
    """A :class:`~colabmagic.proxy.Pipe` over an SSH exec channel.

    The proxy polls ordinary file descriptors, so the channel is joined to one end of a
    ``socketpair``; two threads pump bytes between the other end and the channel.
    """

    def __init__(self, chan: paramiko.Channel, description: str):
        self.chan = chan
        self.description = description
        self._outer, self._inner = socket.socketpair()
        for s in (self._outer, self._inner):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.read_fd = self.write_fd = self._outer.fileno()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._down, name=f"{description} down", daemon=True),
            threading.Thread(target=self._up, name=f"{description} up", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _down(self) -> None:
        chan, inner = self.chan, self._inner
        try:
            while True:
                data = chan.recv(_PUMP_CHUNK)
                if not data:
                    break
                inner.sendall(data)
        except (OSError, EOFError, paramiko.SSHException):
            pass
        finally:
            with contextlib.suppress(OSError):
                inner.shutdown(socket.SHUT_WR)

    def _up(self) -> None:
        chan, inner = self.chan, self._inner
        buf = bytearray(_PUMP_CHUNK)
        view = memoryview(buf)
        try:
            while True:
                n = inner.recv_into(buf)
                if not n:
                    break
                chan.sendall(view[:n])
        except (OSError, EOFError, paramiko.SSHException):
            pass
        finally:
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                chan.shutdown_write()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in (self._inner, self._outer):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):
            self.chan.close()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(2)
        self._inner.close()
        self._outer.close()

    def failure(self) -> tuple[bool, str]:
        chan = self.chan
        deadline = time.monotonic() + 0.5
        while not chan.exit_status_ready() and chan.get_transport().is_active():
            if time.monotonic() > deadline:
                return False, "the bridge stopped answering"
            chan.status_event.wait(0.05)
        if not chan.exit_status_ready():
            return False, "the ssh connection was lost"
        rc = chan.recv_exit_status()
        err = b""
        with contextlib.suppress(OSError, paramiko.SSHException):
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
        text = err.decode(errors="replace").strip()
        return rc == EXIT_NO_AGENT, text or f"the remote bridge exited with {rc}"


class SSHTransport:
    """Agents and kernels on an SSH host; see the module docstring.

    Parameters
    ----------
    target
        ``[user@]host[:port]`` or a ``Host`` alias of the ssh config.
    port, identity, proxy_command
        Override the config's Port, add an IdentityFile, set a ProxyCommand (``%h %p %r``).
    accept_new_host_key
        Record an unknown host key in known_hosts instead of refusing (a changed key is always
        refused).
    python
        The remote interpreter for the agent and the kernel (default ``python3``).
    root
        Remote directory of the agents (default ``~/.colabmagic/kernels``).
    ssh_config
        The ssh config file (default ``~/.ssh/config``).
    connect_timeout
        Seconds for the TCP connect + SSH handshake + authentication of each connection.
    passphrase
        Callable ``path -> passphrase`` for encrypted keys (default: ask with getpass).
    lib_dir
        Where shipped agent code goes on the host (default ``~/.colabmagic/lib``).
    pinned_host_keys
        ``SHA256:...`` fingerprints: the only host keys accepted for the target, known_hosts
        neither read nor written (what a ``colab://`` line carries).
    """

    def __init__(
        self,
        target: str,
        *,
        port: int | None = None,
        identity: str | None = None,
        proxy_command: str | None = None,
        accept_new_host_key: bool = False,
        python: str | None = None,
        root: str | None = None,
        ssh_config: str | None = None,
        connect_timeout: float = 30.0,
        passphrase: Callable[[str], str] | None = None,
        lib_dir: str | None = None,
        pinned_host_keys: list[str] | None = None,
    ):
        if connect_timeout <= 0:
            msg = f"connect_timeout={connect_timeout} must be a positive number of seconds"
            raise ParameterError(msg)
        self.target = target
        self.hops: list[Hop] = ssh_connect.resolve(
            target,
            port=port,
            identity=identity,
            proxy_command=proxy_command,
            ssh_config=ssh_config,
        )
        self.hops[-1].pinned = list(pinned_host_keys or [])
        self.accept_new_host_key = accept_new_host_key
        self.python = python or "python3"
        self.root = root or DEFAULT_ROOT
        self.connect_timeout = connect_timeout
        self.passphrase = passphrase or ssh_connect.ask_passphrase
        self.lib_dir = lib_dir or LIB_DIR
        self.connections = 0
        self.pipes: list[ChannelPipe] = []
        self._conn: Connection | None = None
        self._lock = threading.RLock()
        self._boot_code: str | None = None
        self._ready = False
        self.lib_path = ""
        self._sftp: paramiko.SFTPClient | None = None

    # -- the connection ----------------------------------------------------------------------
    def connection(self) -> Connection:
        """The live connection, opening a new one when there is none (or it died)."""
        with self._lock:
            if self._conn is not None and self._conn.active:
                return self._conn
            if self._conn is not None:
                self._conn.close()
                self._sftp = None
            self._conn = ssh_connect.open_connection(
                self.hops,
                timeout=self.connect_timeout,
                accept_new_host_key=self.accept_new_host_key,
                passphrase=self.passphrase,
            )
            # A recorded key is known from now on: a reconnect must not need the flag.
            self.connections += 1
            return self._conn

    def _session_channel(self, timeout: float | None = None) -> paramiko.Channel:
        conn = self.connection()
        try:
            return conn.transport.open_session(timeout=timeout or self.connect_timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            conn.close()
            msg = (
                f"ssh to {self.target}: cannot open a channel ({exc}); the connection was closed, "
                "run the command again to reconnect"
            )
            raise ConnectError(msg) from None

    def _command(self, args: list[str]) -> str:
        return " ".join(shlex.quote(a) for a in [self.python, *args])

    def exec(
        self, command: str, *, stdin: bytes | None = None, timeout: float = 60.0
    ) -> tuple[int, bytes, bytes]:
        """Run a shell *command* on the host; return ``(exit status, stdout, stderr)``."""
        chan = self._session_channel()
        try:
            chan.settimeout(timeout)
            chan.exec_command(command)
            err: list[bytes] = []
            reader = threading.Thread(target=_drain_stderr, args=(chan, err), daemon=True)
            reader.start()
            if stdin:
                chan.sendall(stdin)
            chan.shutdown_write()
            out = bytearray()
            while True:
                data = chan.recv(1 << 16)
                if not data:
                    break
                out += data
            reader.join(timeout)
            return chan.recv_exit_status(), bytes(out), b"".join(err)
        except TimeoutError:
            msg = f"ssh to {self.target}: {command[:80]!r} did not finish within {timeout:g}s"
            raise ConnectError(msg) from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            msg = f"ssh to {self.target}: the connection failed while running a command: {exc}"
            raise ConnectError(msg) from None
        finally:
            chan.close()

    # -- the remote Python -------------------------------------------------------------------
    def _boot(self) -> str:
        if self._boot_code is None:
            mine = code_hash()
            self.lib_path = posixpath.join(self.lib_dir.removeprefix("~/"), mine[:16])
            self._boot_code = _BOOT % {"hash": mine, "lib": self.lib_path, "shipped": SHIPPED}
        return self._boot_code

    def remote_command(self, *args: str) -> str:
        """The shell command line that runs ``python -m colabmagic.remote ARGS`` on the host."""
        return self._command(["-c", self._boot(), *args])

    def run_remote(self, *args: str, timeout: float = 60.0) -> tuple[int, bytes, bytes]:
        """Run ``colabmagic.remote ARGS`` on the host, shipping the agent code first if needed."""
        for _ in range(2):
            rc, out, err = self.exec(self.remote_command(*args), timeout=timeout)
            info = _parse_probe(out) if rc == 3 else None
            if info is None:
                if rc in (126, 127) or not out.strip():
                    self._bad_python(rc, err)  # not a Python, or no output at all
                self._ready = True
                return rc, out, err
            self._provide(info)
        msg = (
            f"the agent code shipped to {self.target} still does not run there; remove "
            f"{posixpath.join('~', self.lib_path)} on the host and retry, or give --python PATH"
        )
        raise ConnectError(msg)

    def prepare(self) -> None:
        """Make sure the host can run the agent code (ships it when missing): zero-install."""
        if not self._ready:
            self.run_remote("list", "--root", self.root)

    def _provide(self, info: dict) -> None:
        need = info.get("need")
        if need == "python":
            version = ".".join(map(str, info["version"]))
            msg = (
                f"{self.python} on {self.target} is Python {version}; colabmagic needs "
                ">= 3.9 there: give --python PATH"
            )
            raise ConnectError(msg)
        if need == "ipykernel":
            msg = (
                f"ipykernel is not installed for {info['executable']} on {self.target}; "
                f"run `{self.python} -m pip install ipykernel` there or give --python PATH"
            )
            raise ConnectError(msg)
        lib = posixpath.join(info["home"], self.lib_path)
        self._ship(posixpath.dirname(lib), posixpath.basename(lib))

    def _bad_python(self, rc: int, err: bytes) -> None:
        text = err.decode(errors="replace").strip().splitlines()
        detail = text[-1] if text else f"exit status {rc}"
        if rc == 127:
            msg = (
                f"no Python on {self.target}: {self.python!r} was not found ({detail}); install "
                "Python >= 3.9 with ipykernel there or give --python PATH"
            )
        else:
            msg = (
                f"{self.python!r} on {self.target} does not run like Python >= 3.9 ({detail}); "
                "give --python PATH to an interpreter with ipykernel"
            )
        raise ConnectError(msg)

    def _ship(self, base: str, tag: str) -> None:
        """Copy the agent code into ``BASE/TAG`` (0700) over SFTP, atomically."""
        sftp = self.sftp()
        for d in (posixpath.dirname(base), base):
            with contextlib.suppress(OSError):
                sftp.mkdir(d, 0o700)
        tmp = f"{base}/{tag}.tmp-{os.getpid()}-{threading.get_ident()}"
        pkg = f"{tmp}/colabmagic"
        for d in (tmp, pkg, f"{pkg}/remote", f"{pkg}/gpu"):
            sftp.mkdir(d, 0o700)
        for rel, text in STANDINS.items():
            with sftp.open(f"{pkg}/{rel}", "wb") as f:
                f.write(text.encode())
        for rel in SHIPPED:
            sftp.put(os.path.join(_PKG, rel), f"{pkg}/{rel}")
        with sftp.open(f"{tmp}/.complete", "wb") as f:
            f.write(code_hash().encode())
        final = f"{base}/{tag}"
        try:
            sftp.posix_rename(tmp, final)
        except OSError:
            # Another client shipped the same code meanwhile: keep theirs.
            self.exec(f"rm -rf {shlex.quote(tmp)}")
        log.info("shipped the agent code to %s:%s", self.target, final)

    def sftp(self) -> paramiko.SFTPClient:
        """The SFTP session on the shared connection."""
        with self._lock:
            conn = self.connection()
            if self._sftp is None or self._sftp.get_channel().closed:
                try:
                    self._sftp = paramiko.SFTPClient.from_transport(
                        conn.transport,
                        window_size=ssh_connect.WINDOW_SIZE,
                        max_packet_size=ssh_connect.MAX_PACKET,
                    )
                except (paramiko.SSHException, OSError, EOFError) as exc:
                    msg = (
                        f"ssh to {self.target}: SFTP is not available ({exc}); enable the "
                        "'Subsystem sftp' line in the host's sshd_config"
                    )
                    raise ConnectError(msg) from None
            return self._sftp

    def _remote(self, *args: str, timeout: float = 60.0) -> Any:
        rc, out, err = self.run_remote(*args, "--root", self.root, timeout=timeout)
        return parse_agent_reply(
            out.decode(errors="replace"),
            err.decode(errors="replace") or f"exit {rc}",
            command=args[0],
            host=f"a kernel on {self.target}",
        )

    # -- the Transport protocol --------------------------------------------------------------
    def start_kernel(
        self,
        *,
        mock_gpu: bool = False,
        cwd: str | None = None,
        python: str | None = None,
        env: dict[str, str] | None = None,
        idle_timeout: float | None = None,
    ) -> str:
        """Start a detached agent + kernel on the host; return its id."""
        args = agent_start_args(
            mock_gpu=mock_gpu, cwd=cwd, python=python, env=env, idle_timeout=idle_timeout
        )
        return self._remote(*args, timeout=max(60.0, self.connect_timeout))["id"]

    def open_pipe(self, kernel_id: str) -> ChannelPipe:
        """A bridge to agent *kernel_id* on an exec channel (reconnecting when needed)."""
        try:
            self.prepare()
            chan = self._session_channel()
            chan.exec_command(self.remote_command("bridge", "--root", self.root, "--id", kernel_id))
        except HostKeyError as exc:
            raise PermanentLinkError(str(exc)) from None
        except (paramiko.SSHException, EOFError) as exc:
            msg = f"ssh to {self.target}: cannot start the bridge: {exc}"
            raise ConnectError(msg) from None
        pipe = ChannelPipe(chan, f"ssh {self.target} bridge {kernel_id}")
        with self._lock:
            self.pipes = [p for p in self.pipes if not p._closed] + [pipe]
        return pipe

    def list_kernels(self) -> list[dict]:
        """The agents on the host (id, started, pid, state, attached...)."""
        return self._remote("list")

    def stop_kernel(self, kernel_id: str) -> None:
        """Shut agent *kernel_id* and its kernel down."""
        self._remote("stop", "--id", kernel_id)

    def upload(self, local: str, remote: str | None, *, cwd: str | None = None, **kw) -> int:
        """Copy a local file or directory to the host: :func:`colabmagic.filecopy.upload`."""
        from colabmagic import filecopy

        return filecopy.upload(self, local, remote, cwd=cwd, **kw)

    def download(self, remote: str, local: str | None, *, cwd: str | None = None, **kw) -> int:
        """Copy a remote file or directory here: :func:`colabmagic.filecopy.download`."""
        from colabmagic import filecopy

        return filecopy.download(self, remote, local, cwd=cwd, **kw)

    def close(self) -> None:
        """Close the pipes and the connection; the kernels keep running."""
        with self._lock:
            pipes, self.pipes = self.pipes, []
            conn, self._conn = self._conn, None
            self._sftp = None
        for p in pipes:
            p.close()
        if conn is not None:
            conn.close()

    def __repr__(self) -> str:
        return f"<SSHTransport {self.target} via {' -> '.join(map(str, self.hops))}>"


def _drain_stderr(chan: paramiko.Channel, sink: list[bytes]) -> None:
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        while True:
            data = chan.recv_stderr(1 << 16)
            if not data:
                return
            sink.append(data)


def _parse_probe(out: bytes) -> dict | None:
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("COLABMAGIC-PROBE "):
            with contextlib.suppress(ValueError):
                return json.loads(line.split(" ", 1)[1])
    return None
