"""The per-kernel agent that runs on the GPU host.

It owns one ipykernel over host-local ZeroMQ (which never drops messages), numbers every message
the kernel sends and keeps it until the local proxy acknowledges it, and serves one *bridge* at a
time on a Unix socket in its private directory. It runs detached (its own session), so it
outlives SSH connections and bridge processes; when a new bridge connects, the proxy says which
sequence number it has, and the agent resends the rest.

The agent also reports what ZeroMQ cannot: the kernel process's death (exit code or signal),
within its poll interval, and it runs the kernel-side bootstrap (push/pull helpers, the GPU mock)
before any client message reaches a freshly started kernel.

Its parent is a tiny supervisor (:mod:`colabmagic.remote.supervisor`) that records how the agent
ended and stops the kernel when it dies; the kernel also dies with the agent by itself
(``PR_SET_PDEATHSIG``, see :mod:`colabmagic.remote.kernel_launch`). No orphaned GPU kernels.

Only the standard library, pyzmq and jupyter_client are used: the GPU host needs nothing but
Python >= 3.9 and ipykernel. Layout of an agent's directory (mode 0700)::

    ROOT/ID/agent.sock   the Unix socket bridges connect to
    ROOT/ID/kernel.json  the kernel's connection file (0600; holds the HMAC key)
    ROOT/ID/state.json   id, pids, start time, state, attached: what ``list`` shows
    ROOT/ID/agent.log    the agent's log (never the key)
    ROOT/ID/kernel-N     the kernel's channels: Unix sockets (``transport="ipc"``), so no other
                         user of the host can reach them; TCP on 127.0.0.1 only without IPC
    ROOT/ID/agent.exit   written by the supervisor when the agent exits: how it ended
                         (see :mod:`colabmagic.remote.supervisor`)
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid

import zmq

from colabmagic import wire
from colabmagic.remote import kernel_launch, supervisor

log = logging.getLogger("colabmagic.agent")

IDENTITY = b"colabmagic-agent"
POLL_MS = 200
READY_TIMEOUT = 60.0
_SUN_PATH_MAX = 104  # bytes of a Unix socket path, with its NUL: 108 on Linux, 104 on macOS


def _atomic_write(path: str, data: str, mode: int = 0o600) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(data)
    os.replace(tmp, path)


def _signal_name(returncode: int | None) -> str | None:
    if returncode is None or returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _drop_own_path(env: dict) -> None:
    """Remove the directory this code was shipped to (zero-install) from the kernel's
    ``PYTHONPATH``, keeping the user's own entries: the kernel imports the user's packages, not
    the stand-in ``colabmagic`` the agent runs from."""
    own = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    entries = [e for e in env.get("PYTHONPATH", "").split(os.pathsep) if e]
    kept = [e for e in entries if os.path.abspath(e) != own]
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    else:
        env.pop("PYTHONPATH", None)


def _bootstrap_source(mock_gpu: bool) -> str:
    """The code the agent runs silently in every fresh kernel before any client code."""
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "kernel_ext.py")) as f:
        ext = f.read()
    code = [
        "def __colabmagic_boot():",
        "    import sys, types",
        "    mod = types.ModuleType('_colabmagic_kernel')",
        f"    exec(compile({ext!r}, '<colabmagic kernel_ext>', 'exec'), mod.__dict__)",
        "    sys.modules['_colabmagic_kernel'] = mod",
        "    mod.install()",
    ]
    if mock_gpu:
        with open(os.path.join(os.path.dirname(here), "gpu", "mock.py")) as f:
            mock = f.read()
        code += [
            "    mock = types.ModuleType('colabmagic_gpu_mock')",
            f"    exec(compile({mock!r}, '<colabmagic gpu mock>', 'exec'), mock.__dict__)",
            "    mock.install()",
        ]
    code += ["__colabmagic_boot()", "del __colabmagic_boot"]
    return "\n".join(code)


def _kernel_endpoint(directory: str) -> tuple[str, str]:
    """``(transport, ip)`` for the kernel's channels: Unix sockets in the agent's 0700 directory.

    Where that path is too long for a Unix socket address, a fresh 0700 directory under the
    temporary directory holds them; TCP on 127.0.0.1 only where ZeroMQ has no IPC (Windows).
    """
    if not zmq.has("ipc"):
        return "tcp", "127.0.0.1"
    prefix = os.path.join(directory, "kernel")
    if len(prefix.encode()) + len("-pipe") >= _SUN_PATH_MAX:
        import tempfile

        prefix = os.path.join(tempfile.mkdtemp(prefix="colabmagic-"), "k")
    return "ipc", prefix


class Agent:
    """Owns a kernel and relays its messages to whichever bridge is connected."""

    def __init__(
        self,
        directory: str,
        *,
        cwd: str | None = None,
        python: str | None = None,
        mock_gpu: bool = False,
        idle_timeout: float = 24 * 3600.0,
        env: dict | None = None,
        max_log_bytes: int = 2 << 30,
        supervisor_pid: int | None = None,
    ):
        self.dir = directory
        self.id = os.path.basename(directory.rstrip("/"))
        self.cwd = cwd or os.path.expanduser("~")
        self.python = python or sys.executable
        self.mock_gpu = mock_gpu
        self.idle_timeout = idle_timeout
        self.extra_env = dict(env or {})
        self.sock_path = os.path.join(directory, "agent.sock")
        self.cf_path = os.path.join(directory, "kernel.json")
        self.state_path = os.path.join(directory, "state.json")
        self.started = time.time()
        self.kernel: subprocess.Popen | None = None
        self.kernel_state = "starting"  # starting | idle | busy | dead
        self.exit_info: dict | None = None
        self.ctx = zmq.Context()
        self.log = wire.OutLog(max_bytes=max_log_bytes)
        self.last_up = 0
        self.ack_sent = 0
        self.proxy_id = None
        self.stream: wire.FramedStream | None = None
        self.conn: socket.socket | None = None
        self.hello_done = False
        self.last_detach = time.monotonic()
        self.own_ids: set = set()
        self.ready = False
        self.ready_deadline = 0.0
        self.boot_replied = False
        self.held: list = []  # upstream messages held until the fresh kernel is bootstrapped
        self.stopping = False
        self.kernel_sockets: dict = {}
        self.tcp = wire.TcpStreams()
        self.tcp_ports: dict[int, int] = {}  # stream id -> the port it connects to
        self.transport = "ipc"
        self.supervisor_pid = supervisor_pid

    # -- kernel ------------------------------------------------------------------------------
    def _write_connection_file(self) -> None:
        from jupyter_client.connect import write_connection_file

        key = secrets.token_hex(32)
        self.transport, ip = _kernel_endpoint(self.dir)
        self.cf_path, self.conn_info = write_connection_file(
            self.cf_path, ip=ip, key=key.encode(), transport=self.transport
        )
        os.chmod(self.cf_path, 0o600)
        from jupyter_client.session import Session

        self.session = Session(key=key.encode(), username="colabmagic-agent")

    def start_kernel(self) -> None:
        if not os.path.exists(self.cf_path):
            self._write_connection_file()
        env = dict(os.environ)
        env.update(self.extra_env)
        _drop_own_path(env)
        env["COLABMAGIC_KERNEL"] = "1"
        if self.mock_gpu:
            env["COLABMAGIC_MOCK_GPU"] = "1"
        # The kernel dies with this process (PDEATHSIG, ipykernel's parent poller): see
        # kernel_launch.py. Started from the main thread, which lives as long as the agent.
        env["JPY_PARENT_PID"] = str(os.getpid())
        if self.transport == "ipc":
            env["COLABMAGIC_IPC_PREFIX"] = self.conn_info["ip"]
        launcher = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel_launch.py")
        logf = open(os.path.join(self.dir, "kernel.log"), "ab")
        try:
            self.kernel = subprocess.Popen(
                [self.python, "-c", kernel_launch.LOADER, launcher, "-f", self.cf_path],
                cwd=self.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                start_new_session=True,
            )
        finally:
            logf.close()
        self.kernel_state = "starting"
        self.exit_info = None
        self._connect_kernel_sockets()
        self.ready = False
        self.boot_replied = False
        self.ready_deadline = time.monotonic() + READY_TIMEOUT
        self._own_request(
            wire.SHELL,
            "execute_request",
            {
                "code": _bootstrap_source(self.mock_gpu),
                "silent": True,
                "store_history": False,
                "allow_stdin": False,
                "user_expressions": {},
                "stop_on_error": False,
            },
        )
        self.boot_sent = time.monotonic()
        log.info("kernel started, pid %s", self.kernel.pid)
        self.write_state()

    def _connect_kernel_sockets(self) -> None:
        for s in self.kernel_sockets.values():
            s.close(linger=0)
        info = self.conn_info
        url = f"ipc://{info['ip']}-" if self.transport == "ipc" else f"tcp://{info['ip']}:"
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.RCVHWM, 0)
        # IOPub first: when several sockets are ready, output printed before an input_request
        # or an execute_reply is forwarded before it, as the kernel sent it.
        socks = {wire.IOPUB: sub}
        for channel in (wire.SHELL, wire.CONTROL, wire.STDIN):
            socks[channel] = self.ctx.socket(zmq.DEALER)
            socks[channel].setsockopt(zmq.IDENTITY, IDENTITY)
        for channel, s in socks.items():
            s.linger = 0
            s.connect(url + str(info[wire.CHANNEL_NAMES[channel] + "_port"]))
        self.kernel_sockets = socks

    def _own_request(self, channel: int, msg_type: str, content: dict) -> str:
        msg = self.session.msg(msg_type, content)
        if len(self.own_ids) > 256:
            self.own_ids.clear()
        self.own_ids.add(msg["header"]["msg_id"])
        self.session.send(self.kernel_sockets[channel], msg)
        return msg["header"]["msg_id"]

    def _kernel_exited(self) -> None:
        rc = self.kernel.returncode
        self.exit_info = {"exit_code": rc, "signal": _signal_name(rc), "pid": self.kernel.pid}
        self.kernel_state = "dead"
        log.warning("kernel exited: %s", self.exit_info)
        self._event({"event": "kernel_died", **self.exit_info})
        self.write_state()

    def stop_kernel(self, *, graceful: bool = True, timeout: float = 3.0) -> None:
        k = self.kernel
        if k is None or k.poll() is not None:
            return
        if graceful:
            self._own_request(wire.CONTROL, "shutdown_request", {"restart": False})
            try:
                k.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if k.poll() is None:
            try:
                os.killpg(k.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                k.kill()
            k.wait()

    def signal_kernel(self, signum: int, *, group: bool = False) -> bool:
        k = self.kernel
        if k is None or k.poll() is not None:
            return False
        try:
            if group:
                os.killpg(k.pid, signum)
            else:
                os.kill(k.pid, signum)
        except ProcessLookupError:
            return False
        return True

    # -- state -------------------------------------------------------------------------------
    def write_state(self) -> None:
        """Write what ``list`` shows: :meth:`info`, whether a bridge is attached, the Python."""
        state = dict(self.info(), attached=self.stream is not None, python=self.python)
        _atomic_write(self.state_path, json.dumps(state))

    def info(self) -> dict:
        return {
            "id": self.id,
            "started": self.started,
            "kernel_pid": self.kernel.pid if self.kernel else None,
            "agent_pid": os.getpid(),
            "state": self.kernel_state,
            "exit": self.exit_info,
            "mock_gpu": self.mock_gpu,
            "cwd": self.cwd,
            "kernel_transport": self.transport,
            "supervisor_pid": self.supervisor_pid,
        }

    # -- downstream --------------------------------------------------------------------------
    def _down(self, channel: int, parts) -> None:
        seq = self.log.append(channel, parts)
        if self.stream is not None and self.hello_done:
            self.stream.send_msg(seq, channel, parts)

    def _event(self, obj: dict) -> None:
        self._down(wire.AGENT, [wire.json_body(obj)])

    def _on_kernel(self, channel: int, sock) -> None:
        frames = sock.recv_multipart(copy=False)
        parts = [f.buffer for f in frames]
        i = wire.delim_index(parts, 8)
        if i is None:
            log.warning("dropping a malformed %s message", wire.CHANNEL_NAMES[channel])
            return
        if not self.ready:
            # Until the bootstrap is done, everything the kernel says answers our own requests.
            if channel == wire.SHELL and wire.header_msg_id(parts, i + 3) in self.own_ids:
                self.boot_replied = True
            elif channel == wire.IOPUB and self.boot_replied:
                self._mark_ready()  # an iopub message proves the subscription is live
            return
        if self.own_ids and wire.header_msg_id(parts, i + 3) in self.own_ids:
            return
        if channel == wire.IOPUB and b'"status"' in bytes(parts[i + 2]):
            state = json.loads(bytes(parts[i + 5])).get("execution_state")
            if state in ("idle", "busy"):
                self.kernel_state = state
        self._down(channel, parts)

    def _mark_ready(self) -> None:
        self.ready = True
        self.kernel_state = "idle"
        self.write_state()
        self._event({"event": "kernel_ready", "pid": self.kernel.pid})
        held, self.held = self.held, []
        for channel, parts in held:
            self._to_kernel(channel, parts)

    # -- upstream ----------------------------------------------------------------------------
    def _to_kernel(self, channel: int, parts) -> None:
        if channel == wire.AGENT:
            self._on_op(json.loads(bytes(parts[0])))
            return
        if channel == wire.TCP:
            sid = wire.sid_int(parts[0])
            if not self.tcp.deliver(sid, parts[1]) and len(parts[1]):
                self._down(wire.TCP, [parts[0], b""])  # tell the proxy this stream is gone
            return
        if not self.ready:
            self.held.append((channel, [bytes(p) for p in parts]))
            return
        if channel not in (wire.SHELL, wire.CONTROL, wire.STDIN):
            log.warning("dropping message on unknown channel %s", channel)
            return
        self.kernel_sockets[channel].send_multipart(parts, copy=wire.small(parts))

    def _on_op(self, op: dict) -> None:
        name = op.get("op")
        reply: dict = {"event": "reply", "reply_to": op.get("id"), "op": name, "ok": True}
        if name == "interrupt":
            reply["ok"] = self.signal_kernel(signal.SIGINT, group=bool(op.get("group")))
        elif name == "signal":
            reply["ok"] = self.signal_kernel(int(op["signum"]), group=bool(op.get("group")))
        elif name == "restart":
            self.stop_kernel(graceful=False)
            self.held = []
            self.start_kernel()
            reply["pid"] = self.kernel.pid
        elif name == "info":
            reply["info"] = self.info()
        elif name == "tcp_open":
            reply.update(self._tcp_open(int(op["stream"]), int(op["port"])))
        elif name == "tcp_close":  # %colab_debug --stop: end live connections at both ends
            port = int(op["port"])
            doomed = [s for s, p in self.tcp_ports.items() if p == port and s in self.tcp.socks]
            for sid in doomed:
                self.tcp.close(sid)
                self._down(wire.TCP, [wire.sid_bytes(sid), b""])
            reply["closed"] = len(doomed)
        elif name == "shutdown":
            self.stopping = True
        else:
            reply["ok"] = False
            reply["error"] = f"unknown agent operation {name!r}"
        self._event(reply)

    def _tcp_open(self, sid: int, port: int) -> dict:
        """Connect a forwarded stream to 127.0.0.1:*port* on this host (loopback only)."""
        if not 0 < port < 65536:
            return {"ok": False, "error": f"invalid port {port}"}
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(5)
        try:
            sock.connect(("127.0.0.1", port))
        except OSError as exc:
            sock.close()
            self._down(wire.TCP, [wire.sid_bytes(sid), b""])
            return {"ok": False, "error": f"nothing listens on 127.0.0.1:{port} ({exc})"}
        self.tcp.add(sid, sock)
        self.tcp_ports = {s: p for s, p in self.tcp_ports.items() if s in self.tcp.socks}
        self.tcp_ports[sid] = port
        return {"ok": True}

    # -- bridges -----------------------------------------------------------------------------
    def _accept(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        if self.conn is not None:
            log.info("a new bridge replaces the old one")
            self._detach()
        conn.setblocking(False)
        self.conn = conn
        self.stream = wire.FramedStream(conn.fileno(), conn.fileno())
        self.hello_done = False
        self.write_state()

    def _detach(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except OSError:
                pass
        self.conn = None
        self.stream = None
        self.hello_done = False
        self.last_detach = time.monotonic()
        self.write_state()

    def _on_frames(self, frames) -> None:
        for kind, seq, body in frames:
            if kind == wire.HELLO:
                hello = json.loads(bytes(body))
                if hello.get("proxy", self.proxy_id) != self.proxy_id:
                    # A new proxy (an attach) numbers its messages from 1: nothing it sends is
                    # a resend of what the previous one sent.
                    self.proxy_id, self.last_up, self.ack_sent = hello["proxy"], 0, 0
                self._welcome(int(hello.get("resume_from", 0)))
            elif kind == wire.ACK:
                self.log.ack(seq)
            elif kind == wire.MSG:
                if seq <= self.last_up:
                    continue  # a resend of something already delivered
                self.last_up = seq
                channel, parts = wire.decode_msg(body)
                self._to_kernel(channel, parts)

    def _welcome(self, resume_from: int) -> None:
        """Answer a bridge's HELLO, then resend what the proxy has not processed."""
        self.log.ack(resume_from)
        connection = dict(self.conn_info)
        if isinstance(connection["key"], bytes):  # JSON needs str, whatever the version gives
            connection["key"] = connection["key"].decode()
        welcome = {
            "version": wire.PROTOCOL_VERSION,
            "id": self.id,
            "last_up": self.last_up,
            "resume_from": resume_from,
            "gap": self.log.dropped,
            "connection": connection,
            "info": self.info(),
        }
        self.stream.send_json(wire.WELCOME, 0, welcome)
        for seq, channel, parts in self.log.after(resume_from):
            self.stream.send_msg(seq, channel, parts)
        self.hello_done = True

    # -- main loop ---------------------------------------------------------------------------
    def serve(self) -> int:
        os.chdir(self.dir)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(self.sock_path):
            os.unlink(self.sock_path)
        old = os.umask(0o077)
        try:
            listener.bind(self.sock_path)
        finally:
            os.umask(old)
        listener.listen(4)
        self.start_kernel()
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            self._loop(listener)
        finally:
            self.stop_kernel(graceful=True)
            self.tcp.close_all()
            listener.close()
            for s in self.kernel_sockets.values():
                s.close(linger=0)
            self.ctx.term()
            try:
                os.unlink(self.sock_path)
            except FileNotFoundError:
                pass
            supervisor.remove_kernel_files(self.dir)
            self.kernel_state = "stopped"
            self.write_state()
        return 0

    def _loop(self, listener: socket.socket) -> None:
        while True:
            poller = zmq.Poller()
            poller.register(listener, zmq.POLLIN)
            for s in self.kernel_sockets.values():
                poller.register(s, zmq.POLLIN)
            if self.stream is not None:
                flags = zmq.POLLIN | (zmq.POLLOUT if self.stream.wants_write() else 0)
                poller.register(self.conn, flags)
            self.tcp.register(poller, zmq.POLLIN, zmq.POLLOUT)
            events = dict(poller.poll(POLL_MS))
            for sid, data in self.tcp.handle(events, zmq.POLLIN, zmq.POLLOUT):
                self._down(wire.TCP, [wire.sid_bytes(sid), data])
            if listener in events or listener.fileno() in events:
                self._accept(listener)
                continue
            for channel, s in list(self.kernel_sockets.items()):
                if s in events:
                    for _ in range(256):
                        if not s.poll(0):
                            break
                        self._on_kernel(channel, s)
            if self.stream is not None and self.conn.fileno() in events:
                try:
                    if events[self.conn.fileno()] & zmq.POLLIN:
                        self._on_frames(self.stream.read_frames())
                except wire.StreamClosed:
                    log.info("bridge disconnected")
                    self._detach()
                except wire.ProtocolError:
                    log.exception("protocol error; dropping the bridge")
                    self._detach()
                if self.stream is not None and self.stream.closed:  # ended after its last frames
                    log.info("bridge disconnected")
                    self._detach()
            if self.stream is not None:
                try:  # a stream that closed under us means the bridge is gone
                    if self.last_up > self.ack_sent and self.hello_done:
                        self.stream.send_frame(wire.ACK, self.last_up, [])
                        self.ack_sent = self.last_up
                    self.stream.flush()
                except wire.StreamClosed:
                    self._detach()
            self._housekeeping()
            if self.stopping:
                self._event({"event": "shutdown"})
                self._drain_before_exit()
                return

    def _housekeeping(self) -> None:
        k = self.kernel
        if k is not None and self.kernel_state != "dead" and k.poll() is not None:
            self._kernel_exited()
        if not self.ready and self.kernel_state != "dead":
            if self.boot_replied and time.monotonic() - self.boot_sent > 0.2:
                self.boot_sent = time.monotonic()
                self._own_request(wire.SHELL, "kernel_info_request", {})
            if time.monotonic() > self.ready_deadline:
                log.error("kernel did not become ready in %ss", READY_TIMEOUT)
                self.stop_kernel(graceful=False)
        if self.stream is None and time.monotonic() - self.last_detach > self.idle_timeout:
            log.warning("no bridge for %ss: shutting the kernel down", self.idle_timeout)
            self.stopping = True

    def _drain_before_exit(self, timeout: float = 2.0) -> None:
        deadline = time.monotonic() + timeout
        while self.stream is not None and self.stream.wants_write():
            try:
                if self.stream.flush():
                    break
            except wire.StreamClosed:
                break
            if time.monotonic() > deadline:
                break
            zmq.select([], [self.conn], [], 0.05)


def run_agent(directory: str, **kwargs) -> int:
    """Serve one kernel from *directory* until it is shut down (the detached process's body)."""
    logging.basicConfig(
        filename=os.path.join(directory, "agent.log"),
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    return Agent(directory, **kwargs).serve()


def new_agent_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
