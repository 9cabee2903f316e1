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

import base64
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
from colabmagic.transport import (
    AgentFiles,
    agent_start_args,
    bridge_failure,
    parse_agent_reply,
    ssh_connect,
)
from colabmagic.transport.ssh_connect import Connection, Hop

log = logging.getLogger("colabmagic.ssh")

DEFAULT_ROOT = "~/.colabmagic/kernels"
LIB_DIR = ".colabmagic/lib"
EXIT_NO_AGENT = 4
EXIT_NEEDS = 3  # the boot prelude found no usable Python, ipykernel or agent code
_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the agent, bridge and kernel bootstrap need on a host without colabmagic.
SHIPPED = (
    "wire.py",
    "remote/__init__.py",
    "remote/__main__.py",
    "remote/agent.py",
    "remote/bridge.py",
    "remote/kernel_ext.py",
    "remote/kernel_launch.py",
    "remote/supervisor.py",
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
# ``colabmagic.remote`` with it -- one exec, one login shell, per command. When the code is
# missing it assembles it from a content-addressed store (LIB/../.objects/SHA256); files missing
# there too it asks for in one COLABMAGIC-PROBE line and reads from stdin, in the same exec: one
# round trip, once per version, carrying only what changed. Other needs (Python, ipykernel) are
# reported the same way, with exit status 3. A bridge runs with whatever agent code is there (it
# only relays bytes) and never reads its stdin here: the proxy's HELLO is already on its way.
# Python-2-parsable up to the version check, so any python reports cleanly.
_BOOT = r"""
import hashlib, json, os, sys
HASH = %(hash)r
LIB = %(lib)r
MANIFEST = %(manifest)r
STANDINS = %(standins)r
def _hash(pkg):
    h = hashlib.sha256()
    for rel in sorted(MANIFEST):
        with open(os.path.join(pkg, rel), "rb") as f:
            h.update(rel.encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()
def _mkdir(path):
    if not os.path.isdir(path):
        _mkdir(os.path.dirname(path))
        try:
            os.mkdir(path, 448)
        except OSError:
            pass
def _use(lib):
    sys.path.insert(0, lib)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = lib + (os.pathsep + old if old else "")
def _install(lib, info):
    import base64, shutil
    objs = os.path.join(os.path.dirname(lib), ".objects")
    missing = sorted(set(h for h in MANIFEST.values() if not os.path.exists(os.path.join(objs, h))))
    if missing:
        info["need"], info["missing"] = "code", missing
        sys.stdout.write("COLABMAGIC-PROBE " + json.dumps(info) + "\n")
        sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            sys.exit(3)
        del info["need"], info["missing"]
        _mkdir(objs)
        for h, text in json.loads(line).items():
            data = base64.b64decode(text)
            if hashlib.sha256(data).hexdigest() == h:
                tmp = os.path.join(objs, "%%s.tmp%%d" %% (h, os.getpid()))
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, os.path.join(objs, h))
    tmp = "%%s.tmp%%d" %% (lib, os.getpid())
    files = [(r, None, h) for r, h in MANIFEST.items()] + [(r, t, 0) for r, t in STANDINS.items()]
    try:
        for rel, text, h in files:
            dest = os.path.join(tmp, "colabmagic", rel)
            _mkdir(os.path.dirname(dest))
            if text is None:
                with open(os.path.join(objs, h), "rb") as f:
                    text = f.read()
            with open(dest, "wb") as f:
                f.write(text.encode() if not isinstance(text, bytes) else text)
        with open(os.path.join(tmp, ".complete"), "w") as f:
            f.write(HASH)
        os.rename(tmp, lib)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another client installed it meanwhile
def _any_code(base):
    import importlib.util as u
    if u.find_spec("colabmagic") is not None:
        return True
    done = [d for d in os.listdir(base) if os.path.exists(os.path.join(base, d, ".complete"))]
    done.sort(key=lambda d: os.path.getmtime(os.path.join(base, d)))
    if done:
        _use(os.path.join(base, done[-1]))
    return bool(done)
def _main():
    home = os.path.expanduser("~")
    info = {"version": list(sys.version_info[:3]), "executable": sys.executable, "home": home}
    lib = os.path.join(home, LIB)
    bridge = sys.argv[1:2] == ["bridge"]
    if sys.version_info < (3, 9):
        info["need"] = "python"
    else:
        import importlib.util as u
        if u.find_spec("ipykernel") is None:
            info["need"] = "ipykernel"
        elif os.path.exists(os.path.join(lib, ".complete")):
            _use(lib)
        else:
            spec = u.find_spec("colabmagic")
            try:
                ok = _hash(list(spec.submodule_search_locations)[0]) == HASH
            except Exception:
                ok = False
            if ok:
                pass
            elif bridge:
                if not (os.path.isdir(os.path.dirname(lib)) and _any_code(os.path.dirname(lib))):
                    info["need"] = "code"
            else:
                _install(lib, info)
                _use(lib)
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


@functools.cache
def _manifest() -> dict[str, str]:
    """``{path: sha256 of its content}`` of the shipped files."""
    out = {}
    for rel in SHIPPED:
        with open(os.path.join(_PKG, rel), "rb") as f:
            out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def _payload(missing: list[str]) -> bytes:
    """The one stdin line carrying the files (by content hash) a host asked for."""
    by_hash = {h: rel for rel, h in _manifest().items()}
    files = {}
    for h in missing:
        if h in by_hash:
            with open(os.path.join(_PKG, by_hash[h]), "rb") as f:
                files[h] = base64.b64encode(f.read()).decode()
    return json.dumps(files).encode() + b"\n"


def _exec_nowait(chan: paramiko.Channel, command: str) -> None:
    """``chan.exec_command(command)`` without waiting for the server's answer.

    The caller goes straight to reading the command's output. (Data cannot be pipelined behind
    the request: OpenSSH opens a session channel's window only once its command runs.) A refused
    request still closes the channel (paramiko's ``_request_failed``): the caller sees an EOF.
    """
    m = paramiko.Message()
    m.add_byte(paramiko.common.cMSG_CHANNEL_REQUEST)
    m.add_int(chan.remote_chanid)
    m.add_string("exec")
    m.add_boolean(True)
    m.add_string(command)
    chan.transport._send_user_message(m)


def _read_line(chan: paramiko.Channel, buf: bytearray) -> bytes | None:
    """The next line of *chan*'s stdout (without its newline), ``None`` at EOF; *buf* keeps
    whatever was read beyond it."""
    while b"\n" not in buf:
        data = chan.recv(1 << 16)
        if not data:
            return None
        buf += data
    i = buf.index(b"\n")
    line = bytes(buf[:i])
    del buf[: i + 1]
    return line


def _send_all(chan: paramiko.Channel, view: memoryview) -> None:
    """``chan.sendall(view)`` a packet's worth of bytes at a time.

    paramiko takes ``bytes`` as they are but a memoryview only after two caught exceptions per
    packet (``util.asbytes``), and ``sendall`` of ``bytes`` copies the rest at every packet.
    """
    off, end = 0, len(view)
    while off < end:
        sent = chan.send(view[off : off + ssh_connect.MAX_PACKET].tobytes())
        if not sent:
            msg = "channel closed"
            raise EOFError(msg)
        off += sent


class ChannelPipe:
    """A :class:`~colabmagic.proxy.Pipe` over an SSH exec channel.

    The proxy polls ordinary file descriptors, so the channel is joined to one end of a
    ``socketpair``; two threads pump bytes between the other end and the channel.
    """

    def __init__(
        self,
        chan: paramiko.Channel,
        description: str,
        *,
        initial: bytes = b"",
        host: str = "",
    ):
        self.chan = chan
        self.description = description
        self.host = host or description
        self._outer, self._inner = socket.socketpair()
        for s in (self._outer, self._inner):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.read_fd = self.write_fd = self._outer.fileno()
        if initial:  # what was read behind the command's first line
            self._inner.sendall(initial)
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
                # Take all that is buffered: paramiko's BufferedPipe drops what a smaller read
                # takes from the front of its array, moving the rest (up to the window) each time.
                data = chan.recv(ssh_connect.WINDOW_SIZE)
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
                _send_all(chan, view[:n])
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
        text = bridge_failure(err.decode(errors="replace"), host=self.host)
        if rc == EXIT_NEEDS:
            text = (
                f"no colabmagic agent code on {self.host} to run the bridge with (was "
                "~/.colabmagic/lib removed?); connect again with %colab_connect"
            )
        return rc in (EXIT_NO_AGENT, EXIT_NEEDS), text or f"the remote bridge exited with {rc}"


class SSHTransport(AgentFiles):
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
        self._pending: dict[str, ChannelPipe] = {}  # started agents' bridges, not yet claimed
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
            self._boot_code = _BOOT % {
                "hash": mine,
                "lib": self.lib_path,
                "manifest": _manifest(),
                "standins": STANDINS,
            }
        return self._boot_code

    def remote_command(self, *args: str) -> str:
        """The shell command line that runs ``python -m colabmagic.remote ARGS`` on the host."""
        return self._command(["-c", self._boot(), *args])

    def _launch(self, *args: str) -> paramiko.Channel:
        """An exec channel running ``colabmagic.remote ARGS``, its request not waited for."""
        chan = self._session_channel()
        try:
            _exec_nowait(chan, self.remote_command(*args))
        except (paramiko.SSHException, OSError, EOFError) as exc:
            chan.close()
            msg = f"ssh to {self.target}: cannot run a command: {exc}"
            raise ConnectError(msg) from None
        return chan

    def _first_line(self, chan: paramiko.Channel, buf: bytearray) -> bytes | None:
        """The command's first line of output, after shipping the agent code if the host asked
        for it (in the same exec); ``None`` when the command printed nothing."""
        shipped = False
        while True:
            line = _read_line(chan, buf)
            info = _parse_probe(line) if line is not None else None
            if info is None:
                return line
            if info.get("need") != "code" or shipped or not info.get("missing"):
                self._provide(info)
            chan.sendall(_payload(info["missing"]))
            log.info("shipped %d agent file(s) to %s", len(info["missing"]), self.target)
            shipped = True

    def run_remote(self, *args: str, timeout: float = 60.0) -> tuple[int, bytes, bytes]:
        """Run ``colabmagic.remote ARGS`` on the host (shipping the agent code when needed)."""
        chan = self._launch(*args)
        err: list[bytes] = []
        try:
            chan.settimeout(timeout)
            reader = threading.Thread(target=_drain_stderr, args=(chan, err), daemon=True)
            reader.start()
            buf = bytearray()
            first = self._first_line(chan, buf)
            out = bytearray(b"" if first is None else first + b"\n") + buf
            while data := chan.recv(1 << 16):
                out += data
            reader.join(timeout)
            rc = chan.recv_exit_status()
        except TimeoutError:
            msg = f"ssh to {self.target}: {args[0]!r} did not finish within {timeout:g}s"
            raise ConnectError(msg) from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            msg = f"ssh to {self.target}: the connection failed while running a command: {exc}"
            raise ConnectError(msg) from None
        finally:
            chan.close()
        if rc in (126, 127) or not out.strip():
            self._bad_python(rc, b"".join(err))  # not a Python, or no output at all
        return rc, bytes(out), b"".join(err)

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
        msg = (
            f"the agent code shipped to {self.target} still does not run there; remove "
            f"{posixpath.join('~', self.lib_path)} on the host and retry, or give --python PATH"
        )
        raise ConnectError(msg)

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
        """Start a detached agent + kernel on the host; return its id.

        One exec does it all: it checks the Python and the agent code (shipping what is missing
        in-band), starts the agent, prints its id, and goes on as its bridge, which the next
        :meth:`open_pipe` for that id returns: no further round trip to reach the new kernel.
        """
        args = agent_start_args(
            mock_gpu=mock_gpu, cwd=cwd, python=python, env=env, idle_timeout=idle_timeout
        )
        timeout = max(60.0, self.connect_timeout)
        chan = self._launch(*args, "--bridge", "--root", self.root)
        buf = bytearray()
        try:
            chan.settimeout(timeout)
            line = self._first_line(chan, buf)
            if line is None:
                rc = chan.recv_exit_status()
                err = b""
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(1 << 16)
                self._bad_python(rc, err)
            host = f"a kernel on {self.target}"
            text = line.decode(errors="replace")
            result = parse_agent_reply(text, "", command="start", host=host)
            chan.settimeout(None)
        except TimeoutError:
            chan.close()
            msg = f"ssh to {self.target}: the kernel did not start within {timeout:g}s"
            raise ConnectError(msg) from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            chan.close()
            msg = f"ssh to {self.target}: the connection failed while starting a kernel: {exc}"
            raise ConnectError(msg) from None
        except BaseException:
            chan.close()
            raise
        kernel_id = result["id"]
        pipe = ChannelPipe(
            chan, f"ssh {self.target} bridge {kernel_id}", initial=bytes(buf), host=self.target
        )
        with self._lock:
            self._pending[kernel_id] = pipe
        return kernel_id

    def open_pipe(self, kernel_id: str) -> ChannelPipe:
        """A bridge to agent *kernel_id* on an exec channel (reconnecting when needed).

        The exec request is not waited for here; sshd opens the channel's window only once the
        command runs, so the proxy's HELLO follows one round trip later by itself.
        """
        with self._lock:
            pipe = self._pending.pop(kernel_id, None)
        if pipe is None or pipe.chan.closed:
            try:
                chan = self._launch("bridge", "--root", self.root, "--id", kernel_id)
            except HostKeyError as exc:
                raise PermanentLinkError(str(exc)) from None
            pipe = ChannelPipe(chan, f"ssh {self.target} bridge {kernel_id}", host=self.target)
        with self._lock:
            self.pipes = [p for p in self.pipes if not p._closed] + [pipe]
        return pipe

    def list_kernels(self) -> list[dict]:
        """The agents on the host (id, started, pid, state, attached...)."""
        return self._remote("list")

    def stop_kernel(self, kernel_id: str) -> None:
        """Shut agent *kernel_id* and its kernel down."""
        self._remote("stop", "--id", kernel_id)

    def close(self) -> None:
        """Close the pipes and the connection; the kernels keep running."""
        self._close_files()
        with self._lock:
            pipes, self.pipes = self.pipes + list(self._pending.values()), []
            self._pending = {}
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
