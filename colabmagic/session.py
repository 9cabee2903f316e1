"""Sessions: one kernel (local or remote) behind the proxy, and the registry of named sessions.

A :class:`Session` is the Python API under the magics and usable without IPython::

    import colabmagic
    s = colabmagic.connect(local=True)
    s.run("x = 21 * 2")
    s.pull("x")          # -> 42
    s.close()

It starts (or attaches to) an agent through a transport, serves the kernel locally through a
:class:`~colabmagic.proxy.Proxy`, and talks to it with an ordinary jupyter_client
``BlockingKernelClient`` (over ZeroMQ ``inproc``, :mod:`colabmagic.inproc`), so everything a
Jupyter client can do works unchanged; a Jupyter server's cells skip the proxy (jupyter_lane).
"""

from __future__ import annotations

import ast
import atexit
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zmq

from colabmagic import inproc, messages
from colabmagic.errors import (
    CellTimeoutError,
    ColabMagicError,
    ConnectError,
    NotConnectedError,
    ParameterError,
    RemoteError,
    RemoteKernelDied,
)
from colabmagic.proxy import Proxy
from colabmagic.relay import COMM_KINDS, Relay, RemoteDisplay
from colabmagic.transfer import COMM_TARGET, Channel, TransferStats  # noqa: F401 - COMM_TARGET: re-exported
from colabmagic.transport import attach_error

if TYPE_CHECKING:
    from colabmagic.transport.jupyter_lane import Lane
log = logging.getLogger("colabmagic.session")

_INFO = "__import__('sys').modules['_colabmagic_kernel'].info()"  # the kernel helper's info()
_POLL_MS = 50


@dataclass
class ExecutionResult:
    """Everything one remote cell produced, in order."""

    msg_id: str
    status: str = "ok"
    execution_count: int | None = None
    stdout: str = ""
    stderr: str = ""
    outputs: list[dict] = field(default_factory=list)
    result: RemoteDisplay | None = None
    error: RemoteError | None = None
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Session:
    """A kernel reached through a transport; see the module docstring.

    Use :func:`colabmagic.connect` (or :meth:`Session.start`) to make one.
    """

    def __init__(
        self,
        transport,
        kernel_id: str,
        *,
        name: str = "default",
        mock_gpu: bool = False,
        reconnect_timeout: float = 300.0,
        connect_timeout: float = 60.0,
    ):
        self.transport = transport
        self.kernel_id = kernel_id
        self.name = name
        self.mock_gpu = mock_gpu
        self.closed = False
        self.remote_info: dict[str, Any] = {}
        self.last_error: RemoteError | None = None
        self._lock = threading.RLock()
        self._kernel_state = "idle"
        self.bulk = Channel(self)
        self.lane: Lane | None = None  # a Jupyter-server link in this process: jupyter_lane.py
        self.proxy = Proxy(
            lambda: transport.open_pipe(kernel_id),
            name=f"{name} ({transport.target})",
            reconnect_timeout=reconnect_timeout,
        )
        self.proxy.add_kernel_listener(self._on_kernel_event)
        try:
            self.proxy.start(timeout=connect_timeout)
            self.mock_gpu = bool(self.proxy.agent_info.get("mock_gpu", mock_gpu))
            self.client = inproc.client_for(self.proxy)  # inproc sockets: no loopback TCP hop
            self._wait_ready(connect_timeout)
            if hasattr(transport, "open_lane"):  # a link in this process: a Jupyter server
                self.lane = transport.open_lane(kernel_id, self.proxy, self.client.session)
        except BaseException:
            self.proxy.close()
            raise

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def start(
        cls,
        transport,
        *,
        name: str = "default",
        mock_gpu: bool = False,
        attach: str | None = None,
        cwd: str | None = None,
        python: str | None = None,
        env: dict[str, str] | None = None,
        idle_timeout: float | None = None,
        reconnect_timeout: float = 300.0,
        connect_timeout: float = 60.0,
    ) -> Session:
        """Start a new kernel through *transport* (or attach to kernel id *attach*)."""
        kernel_id = attach or transport.start_kernel(
            mock_gpu=mock_gpu, cwd=cwd, python=python, env=env, idle_timeout=idle_timeout
        )
        try:
            return cls(
                transport,
                kernel_id,
                name=name,
                mock_gpu=mock_gpu,
                reconnect_timeout=reconnect_timeout,
                connect_timeout=connect_timeout,
            )
        except BaseException as exc:
            if attach and isinstance(exc, ConnectError):  # attaching asks nothing first
                raise attach_error(transport, attach, exc) from None
            if not attach:
                with contextlib.suppress(ColabMagicError, OSError):
                    transport.stop_kernel(kernel_id)
            raise

    def _wait_ready(self, timeout: float) -> None:
        """Wait for a reply and its IOPub (no slow joiner); it brings remote_info too (1 RTT)."""
        deadline = time.monotonic() + timeout
        iopub = self.client.iopub_channel.socket
        shell = self.client.shell_channel.socket
        poller = zmq.Poller()
        poller.register(iopub, zmq.POLLIN)
        poller.register(shell, zmq.POLLIN)
        while time.monotonic() < deadline:
            self._check_alive()
            msg_id = self.client.execute("", silent=True, user_expressions={"i": _INFO})
            got_reply = got_iopub = False
            step = deadline  # the reply may take the kernel's start; then 1 s for its IOPub
            while time.monotonic() < min(step, deadline) and not (got_reply and got_iopub):
                events = dict(poller.poll(_POLL_MS))
                if shell in events:
                    msg = messages.recv(self.client.session, shell)
                    if msg and msg["parent_header"].get("msg_id") == msg_id:
                        got_reply, step = True, time.monotonic() + 1.0
                        self.remote_info = _remote_info(msg["content"])
                if iopub in events:
                    _, msg = self.client.session.recv(iopub, zmq.NOBLOCK)
                    if msg and msg["parent_header"].get("msg_id") == msg_id:
                        got_iopub = True
                self._check_alive()
            if got_reply and got_iopub:
                return
        msg = (
            f"kernel {self.kernel_id} on {self.transport.target} did not answer in {timeout:g}s; "
            "it may still be starting (slow imports, a busy host): give it longer with "
            "--connect-timeout"
        )
        raise ConnectError(msg)

    # -- state -------------------------------------------------------------------------------
    def _on_kernel_event(self, event: dict) -> None:
        if event.get("event") in ("kernel_ready", "kernel_died"):
            self.bulk.reset()  # a fresh kernel has no comm open

    def _check_alive(self) -> None:
        p = self.proxy
        if p.state == "dead":
            exit_info = p.kernel_exit or {}
            if exit_info:
                msg = (
                    f"{p.dead_reason} [session {self.name!r}]; restart it with "
                    f"%colab_connect --name {self.name} --restart (or Session.restart())"
                )
            else:
                msg = f"{p.dead_reason} [session {self.name!r}]"
            raise RemoteKernelDied(
                msg, exit_code=exit_info.get("exit_code"), signal=exit_info.get("signal")
            )
        if p.state == "closed" or self.closed:
            msg = f"session {self.name!r} is closed; connect again with %colab_connect"
            raise NotConnectedError(msg)

    @property
    def state(self) -> str:
        """``idle``, ``busy``, ``link-down (reconnecting, attempt n)``, ``dead`` or ``closed``."""
        p = self.proxy
        if self.closed:
            return "closed"
        if p.state == "link-down":
            return f"link-down (reconnecting, attempt {p.reconnect_attempt})"
        if p.state in ("dead", "closed"):
            return p.state
        return self._kernel_state

    # -- execution ---------------------------------------------------------------------------
    def run(
        self,
        code: str,
        *,
        timeout: float | None = None,
        relay: Relay | None = None,
        silent: bool = False,
        store_history: bool = True,
        raise_on_error: bool = True,
        interrupt_grace: float = 10.0,
    ) -> ExecutionResult:
        """Execute *code* remotely, relaying its output live; return what it produced.

        Parameters
        ----------
        timeout
            Seconds; when exceeded the remote cell is interrupted (the kernel stays usable) and
            :class:`~colabmagic.errors.CellTimeoutError` (a ``TimeoutError``) is raised.
        relay
            Where live output goes (default: this process's stdout/stderr and IPython display).
        raise_on_error
            Raise :class:`~colabmagic.errors.RemoteError` when the cell fails (default).

        A ``KeyboardInterrupt`` while waiting interrupts the remote cell, waits for it to stop,
        and is re-raised.
        """
        if timeout is not None and timeout <= 0:
            msg = f"timeout={timeout} must be a positive number of seconds"
            raise ParameterError(msg)
        relay = relay if relay is not None else Relay()
        with self._lock:
            self._check_alive()
            t0 = time.monotonic()
            send = self.lane.execute if self.lane is not None else self.client.execute
            result = ExecutionResult(msg_id="")
            self._kernel_state = "busy"
            try:
                self._wait(result, relay, timeout, interrupt_grace, lambda: send(
                    code, silent=silent, store_history=store_history, allow_stdin=True
                ))  # fmt: skip
            finally:
                self._kernel_state = "idle" if self.proxy.state == "up" else self._kernel_state
            result.duration = time.monotonic() - t0
        if result.error is not None:
            self.last_error = result.error
            if raise_on_error:
                raise result.error
        return result

    def _wait(self, result: ExecutionResult, relay: Relay, timeout, grace: float, send) -> None:
        iopub, lane = self.client.iopub_channel.socket, self.lane  # lane: its requests' replies
        stdin = lane.stdin if lane else self.client.stdin_channel.socket
        shell = lane.shell if lane else self.client.shell_channel.socket
        poller = zmq.Poller()
        for s in (iopub, stdin, shell):
            poller.register(s, zmq.POLLIN)
        deadline = time.monotonic() + timeout if timeout else None
        got_reply = got_idle = False
        interrupted_by: str | None = None
        stop_deadline: float | None = None
        escalated = False
        pending_exc: BaseException | None = None
        # Sent last, just before the first poll: the thread taking it then finds the GIL free.
        result.msg_id = send()
        while not (got_reply and got_idle):
            try:
                self._check_alive()
                now = time.monotonic()
                if deadline is not None and now > deadline and interrupted_by is None:
                    interrupted_by = "timeout"
                    stop_deadline = now + grace
                    self.interrupt()
                if stop_deadline is not None and not escalated and now > stop_deadline - grace / 2:
                    # SIGINT to the kernel did not land (a C extension, SIGINT ignored, a child
                    # process doing the work): the whole process group next.
                    escalated = True
                    with contextlib.suppress(ColabMagicError):
                        self.interrupt(group=True)
                if stop_deadline is not None and now > stop_deadline:
                    msg = (
                        f"the remote cell did not stop within {grace:g}s of SIGINT to the kernel "
                        "and then to its process group; it may be stuck in native code: restart "
                        f"it with %colab_connect --name {self.name} --restart"
                    )
                    raise CellTimeoutError(msg)
                events = dict(poller.poll(_POLL_MS))
                if iopub in events and not got_idle:
                    got_idle |= self._drain_iopub(iopub, result, relay)
                if stdin in events:
                    # Output printed before the prompt travels on IOPub, a separate socket:
                    # let it land first so the prompt appears after it, as in a terminal.
                    while not got_idle and iopub.poll(20):
                        got_idle |= self._drain_iopub(iopub, result, relay)
                    pending_exc = self._answer_input(stdin, result.msg_id) or pending_exc
                if shell in events:
                    msg = messages.recv(self.client.session, shell)
                    if msg and msg["parent_header"].get("msg_id") == result.msg_id:
                        got_reply = True
                        c = msg["content"]
                        result.status = c.get("status", "ok")
                        result.execution_count = c.get("execution_count")
                        if result.status == "error" and result.error is None:
                            result.error = _remote_error(c)  # its IOPub error never came
            except KeyboardInterrupt:
                if interrupted_by is None:
                    interrupted_by = "keyboard"
                    stop_deadline = time.monotonic() + grace
                    self.interrupt()
                elif interrupted_by == "keyboard":
                    # A second Ctrl-C: interrupt the whole process group, then stop waiting.
                    with contextlib.suppress(ColabMagicError):
                        self.interrupt(group=True)
                    raise
        if interrupted_by == "timeout":
            msg = (
                f"the remote cell ran past its timeout of {timeout:g}s and was interrupted; "
                f"the kernel [{self.name}] is still usable"
            )
            raise CellTimeoutError(msg)
        if interrupted_by == "keyboard":
            raise KeyboardInterrupt
        if pending_exc is not None:
            raise pending_exc

    def _drain_iopub(self, sock, result: ExecutionResult, relay: Relay) -> bool:
        while True:
            msg = messages.recv(self.client.session, sock)  # dates stay strings: see messages.py
            if msg is None:
                break
            if msg["parent_header"].get("msg_id") != result.msg_id:
                continue
            kind = msg["header"]["msg_type"]
            content = msg["content"]
            if kind == "status":
                if content.get("execution_state") == "idle":
                    return True  # later messages of this request are the comm relay's (comms.py)
                continue
            if kind in COMM_KINDS:
                relay.handle(msg)  # widgets: colabmagic.comms publishes them to the frontend
            if kind in ("execute_input", *COMM_KINDS):
                continue
            result.outputs.append({"msg_type": kind, "content": content})
            if kind == "stream":
                if content.get("name") == "stderr":
                    result.stderr += content.get("text", "")
                else:
                    result.stdout += content.get("text", "")
            if kind == "execute_result":
                result.result = RemoteDisplay(content.get("data", {}), content.get("metadata"))
                relay.execute_result(result.result)
            elif kind == "error":
                result.status, result.error = "error", _remote_error(content)
            else:
                relay.handle(msg)
        return False

    def _answer_input(self, sock, msg_id: str) -> BaseException | None:
        _, msg = self.client.session.recv(sock, zmq.NOBLOCK)
        if not msg or msg["header"]["msg_type"] != "input_request":
            return None
        content = msg["content"]
        failure: BaseException | None = None
        try:
            if content.get("password"):
                import getpass

                value = getpass.getpass(content.get("prompt", ""))
            else:
                value = input(content.get("prompt", ""))
        except KeyboardInterrupt:
            self.client.input("")
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. StdinNotImplementedError in nbclient
            value, failure = "", exc
        self.client.input(value)
        return failure

    def interrupt(self, *, group: bool = False) -> None:
        """Interrupt the running remote cell.

        First the Jupyter way: an ``interrupt_request`` on the control channel (ipykernel then
        signals its process group). If the kernel does not answer within 2 s -- its control
        thread is stuck too -- SIGINT through the agent; ``group=True`` goes straight to the
        agent and signals the kernel's whole process group.
        """
        if not group and self._interrupt_by_message():
            return
        reply = self.proxy.call("interrupt", group=group, timeout=10.0)
        if not reply.get("ok"):
            self._check_alive()

    def _interrupt_by_message(self, timeout: float = 2.0) -> bool:
        session = self.client.session
        control = self.client.control_channel.socket
        msg = session.msg("interrupt_request", {})
        session.send(control, msg)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not control.poll(_POLL_MS):
                if self.proxy.state != "up":
                    return False
                continue
            _, reply = session.recv(control, zmq.NOBLOCK)
            if reply and reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                return reply["content"].get("status") == "ok"
        return False

    def restart(self, timeout: float = 60.0) -> None:
        """Replace the remote kernel with a fresh one (same session, variables gone)."""
        with self._lock:
            self.proxy.call("restart", timeout=timeout)
            deadline = time.monotonic() + timeout
            while self.proxy.state != "up":
                if time.monotonic() > deadline:
                    msg = (
                        f"the restarted kernel of {self.name!r} did not come up in {timeout:g}s; "
                        f"try again with %colab_connect --name {self.name} --restart"
                    )
                    raise ConnectError(msg)
                time.sleep(0.01)  # the proxy thread flips the state; bounded by the deadline
            self.bulk.reset()
            self._wait_ready(timeout)

    # -- variables (colabmagic.transfer does the work; self.bulk.request for other helpers) --
    def push(
        self, values: dict[str, Any] | None = None, /, *, compress: str | None = None, **kwargs: Any
    ) -> TransferStats:
        """Bind variables in the remote kernel: ``s.push(x=arr)`` or ``s.push({"x": arr})``.

        Large values are streamed in chunks; *compress* is ``auto`` (default: zstd where it
        pays), ``zstd`` or ``none``. Returns what moved (a ``transfer.TransferStats``).
        """
        values = dict(values or {}, **kwargs)
        if not values:
            msg = "push needs at least one variable, e.g. session.push(x=x)"
            raise ParameterError(msg)
        return self.bulk.push(values, compress_mode=compress)

    def pull(self, *names: str, compress: str | None = None) -> Any:
        """Fetch variables from the remote kernel: one name -> its value; several -> a dict."""
        if not names:
            msg = "pull needs at least one variable name, e.g. session.pull('y')"
            raise ParameterError(msg)
        values = self.bulk.pull(list(names), compress_mode=compress)
        return values[names[0]] if len(names) == 1 else values

    def _refresh_remote_info(self) -> None:
        data, _ = self.bulk.request("info", timeout=30.0)
        self.remote_info = data.get("info", {})

    # -- files (colabmagic.filecopy does the work) --------------------------------------------
    def upload(self, local: str, remote: str | None = None, **kwargs: Any) -> int:
        """Copy a local file or directory to the host (relative paths: the kernel's cwd).

        Resumable, sha256-verified and atomic; see :func:`colabmagic.filecopy.upload`.
        """
        return self.transport.upload(local, remote, cwd=self.remote_info.get("cwd"), **kwargs)

    def download(self, remote: str, local: str | None = None, **kwargs: Any) -> int:
        """Copy a file or directory from the host here; returns the bytes copied."""
        return self.transport.download(remote, local, cwd=self.remote_info.get("cwd"), **kwargs)

    # -- status and lifetime -----------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Name, target, state, kernel pid, Python, GPU and link round-trip latency."""
        info: dict[str, Any] = {
            "name": self.name,
            "target": self.transport.target,
            "kernel_id": self.kernel_id,
            "state": self.state,
            "kernel_pid": self.proxy.agent_info.get("kernel_pid"),
            "python": self.remote_info.get("python"),
            "gpu": _gpu_text(self.remote_info.get("gpu")),
            "latency_ms": None,
            "reconnects": self.proxy.reconnects,
            "lost_messages": self.proxy.lost_messages,
            "kernel_transport": self.proxy.agent_info.get("kernel_transport", "tcp"),
        }
        if self.proxy.state == "up":
            t0 = time.perf_counter()
            try:
                reply = self.proxy.call("info", timeout=5.0)
            except ConnectError:
                return info
            info["latency_ms"] = round((time.perf_counter() - t0) * 1000, 2)
            agent = reply.get("info", {})
            info["kernel_pid"] = agent.get("kernel_pid")
            if agent.get("state") in ("idle", "busy", "starting"):
                info["state"] = agent["state"]
        return info

    def close(self, *, keep: bool = False) -> None:
        """Disconnect; shut the remote kernel down too unless *keep*."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self.client.stop_channels()
        if self.lane is not None:
            self.lane.close()  # before the proxy closes the socket the link publishes on
        if not keep and self.proxy.state in ("up", "dead"):
            with contextlib.suppress(ConnectError):
                self.proxy.call("shutdown", timeout=10.0)
        self.proxy.close()
        if not keep:
            with contextlib.suppress(ColabMagicError, OSError):
                self.transport.stop_kernel(self.kernel_id)
        self.transport.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<Session {self.name!r} {self.transport.target} kernel={self.kernel_id} {self.state}>"
        )


def _remote_info(reply: dict) -> dict:
    """The kernel helper's ``info()`` from an execute_reply's user expression ``i``."""
    text = reply.get("user_expressions", {}).get("i", {}).get("data", {}).get("text/plain")
    with contextlib.suppress(ValueError, SyntaxError, TypeError):
        return dict(ast.literal_eval(text))
    return {}


def _remote_error(c: dict) -> RemoteError:
    """The RemoteError of an ``error`` message's (or an error reply's) content."""
    return RemoteError(c.get("ename", "Error"), c.get("evalue", ""), c.get("traceback", []))


def _gpu_text(gpu: dict | None) -> str:
    if not gpu:
        return "none"
    if gpu.get("mock"):
        return "mock"
    total = gpu.get("memory_total")
    used = gpu.get("memory_used")
    if total:
        return f"{gpu['name']} ({(used or 0) / 2**30:.1f}/{total / 2**30:.1f} GiB)"
    return str(gpu.get("name"))


class Registry:
    """Named sessions, and which one is current."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self.current: str | None = None

    def add(self, session: Session) -> None:
        old = self._sessions.get(session.name)
        if old is not None and old is not session:
            old.close()
        self._sessions[session.name] = session
        self.current = session.name

    def get(self, name: str | None = None) -> Session:
        if not self._sessions:
            msg = "not connected: run %colab_connect first (e.g. %colab_connect --local)"
            raise NotConnectedError(msg)
        key = name or self.current
        if key not in self._sessions:
            known = ", ".join(sorted(self._sessions)) or "none"
            msg = f"no session named {key!r}; known sessions: {known}"
            raise NotConnectedError(msg)
        return self._sessions[key]

    def remove(self, name: str) -> Session:
        session = self.get(name)
        del self._sessions[session.name]
        if self.current == session.name:
            self.current = next(iter(self._sessions), None)
        return session

    def names(self) -> list[str]:
        return list(self._sessions)

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def close_all(self, *, keep: bool = False) -> None:
        for name in list(self._sessions):
            with contextlib.suppress(ColabMagicError):
                self.remove(name).close(keep=keep)


registry = Registry()


@atexit.register
def _close_at_exit() -> None:
    """A process that exits cleanly shuts its kernels down (``--keep`` ones were removed)."""
    registry.close_all()
