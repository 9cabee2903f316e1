"""A jupyter_client kernel provisioner: JupyterLab's kernel list runs the notebook remotely.

``colabmagic kernelspec install colab --target colab`` writes a kernelspec whose
``metadata.kernel_provisioner`` names ``colabmagic-provisioner`` (the entry point of
:class:`ColabProvisioner`) and carries its configuration::

    "metadata": {"kernel_provisioner": {
        "provisioner_name": "colabmagic-provisioner",
        "config": {"target": "colab", "mock_gpu": false}}}

Any jupyter_client >= 7 application (JupyterLab, Notebook, ``jupyter console``, nbclient) then
starts the kernel through this class: it starts (or re-attaches to) an agent and its kernel on
the target through a transport and serves the kernel's channels on 127.0.0.1 through a
:class:`~colabmagic.proxy.Proxy` running in the application's process. The application talks to
the proxy as if it were a local kernel; the proxy survives link drops and resumes.

Process management maps onto agent operations: ``poll`` reads the kernel exit the agent reports,
``send_signal``/``kill``/``terminate`` signal the remote kernel's process group, a restart gives a
fresh remote kernel behind the same ports and key, and ``cleanup`` stops the agent, so nothing is
left running on either side after a shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from typing import Any

import zmq
from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from tornado.web import HTTPError
from traitlets import Bool, Dict, Float, Unicode

from colabmagic.connection import make_transport
from colabmagic.errors import ColabMagicError, ConnectError, ParameterError
from colabmagic.kernelspec import PROVISIONER_NAME
from colabmagic.proxy import Proxy

__all__ = ["PROVISIONER_NAME", "ColabProvisioner", "KernelLaunchError"]
_PORTS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


class KernelLaunchError(ConnectError, HTTPError):
    """The kernel could not be started.

    A :class:`~colabmagic.errors.ConnectError` for Python callers, and a tornado ``HTTPError``
    so that jupyter_server answers with this message (instead of "Unhandled error"), which
    JupyterLab shows in its "Error Starting Kernel" dialog.
    """

    def __init__(self, message: str):
        HTTPError.__init__(self, 500, message, reason="Kernel launch failed")
        self.message = message

    def __str__(self) -> str:
        return self.message


class ColabProvisioner(KernelProvisionerBase):
    """Start or attach a kernel on a remote GPU host and serve it locally.

    The traits are set from the kernelspec's ``metadata.kernel_provisioner.config``; see
    :func:`colabmagic.kernelspec.install`.
    """

    target = Unicode(
        "", help="ssh host or ~/.ssh/config alias of the GPU host; empty or 'local' for local"
    ).tag(config=True)
    local = Bool(False, help="Run the agent and kernel on this machine (the --local path)").tag(
        config=True
    )
    python = Unicode(
        None, allow_none=True, help="Python interpreter for the kernel on the target"
    ).tag(config=True)
    cwd = Unicode(None, allow_none=True, help="Working directory of the kernel on the target").tag(
        config=True
    )
    env = Dict(help="Extra environment variables for the remote kernel").tag(config=True)
    mock_gpu = Bool(False, help="Install the NumPy-backed cupy mock in the kernel").tag(config=True)
    idle_timeout = Float(
        None, allow_none=True, help="Seconds without a link before the agent stops the kernel"
    ).tag(config=True)
    connect_timeout = Float(60.0, help="Seconds to wait for the kernel to start").tag(config=True)
    reconnect_timeout = Float(300.0, help="Seconds to keep reconnecting after a drop").tag(
        config=True
    )
    transport_options = Dict(help="Extra keyword arguments for the transport").tag(config=True)

    agent_id = Unicode(None, allow_none=True, help="The agent (remote kernel) this one runs on")

    _proxy: Proxy | None = None
    _transport: Any = None
    _running = False
    _ready: threading.Event
    _died: threading.Event

    # -- what is running ---------------------------------------------------------------------
    @property
    def has_process(self) -> bool:
        """True from a successful launch until :meth:`wait` has seen the kernel exit."""
        return self._running

    @property
    def proxy(self) -> Proxy | None:
        """The local proxy serving the kernel (``None`` before launch and after cleanup)."""
        return self._proxy

    @property
    def transport(self) -> Any:
        """The transport reaching the target (``None`` before launch and after cleanup)."""
        return self._transport

    @property
    def where(self) -> str:
        """The target, as shown in messages."""
        return "local" if self._is_local() else self.target

    def _is_local(self) -> bool:
        return self.local or self.target in ("", "local")

    def _exit_status(self) -> int | None:
        p = self._proxy
        if p is None:
            return 0
        if p.kernel_exit is not None:
            code = p.kernel_exit.get("exit_code")
            return int(code) if code is not None else 1
        if p.state == "dead":
            return 1  # the agent is gone or unreachable for good
        if p.state == "closed":
            return 0
        return None

    async def poll(self) -> int | None:
        """``None`` while the remote kernel runs (also while the link is down), else its exit."""
        return self._exit_status()

    async def wait(self) -> int | None:
        """Wait until the agent reports the kernel's exit; callers bound it with a timeout."""
        while (status := self._exit_status()) is None:
            await asyncio.sleep(0.05)
        self._running = False
        return status

    # -- signals -----------------------------------------------------------------------------
    async def send_signal(self, signum: int) -> None:
        """Send *signum* to the remote kernel's process group (SIGINT: an interrupt)."""
        if signum == 0:
            return
        await asyncio.to_thread(self._signal, signum)

    async def kill(self, restart: bool = False) -> None:
        """SIGKILL the remote kernel through its agent (the agent stays for a restart)."""
        await asyncio.to_thread(self._signal, signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        """SIGTERM the remote kernel through its agent."""
        await asyncio.to_thread(self._signal, signal.SIGTERM)

    def _signal(self, signum: int) -> None:
        p = self._proxy
        if p is None or self._exit_status() is not None:
            return
        try:
            if signum == signal.SIGINT:
                p.call("interrupt", timeout=self.connect_timeout)
            else:
                p.call("signal", signum=int(signum), group=True, timeout=self.connect_timeout)
        except ConnectError as exc:
            if self._exit_status() is None:
                raise
            self.log.debug("signal %s not sent, the kernel is gone: %s", signum, exc)

    # -- launch ------------------------------------------------------------------------------
    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Keep only what a remote launch uses: the kernelspec's ``env`` stanza and the cwd."""
        kwargs.pop("extra_arguments", None)
        kwargs = await super().pre_launch(cmd=list(self.kernel_spec.argv), **kwargs)
        spec_env = self.kernel_spec.env or {}
        kwargs["remote_env"] = {k: kwargs["env"][k] for k in spec_env if k in kwargs["env"]}
        return kwargs

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Start (or, on a restart, renew) the remote kernel; return the proxy's connection info.

        Raises
        ------
        KernelLaunchError
            The target is unreachable, refused, or the kernel did not start there; the message is
            one readable line (JupyterLab shows it in its "Error Starting Kernel" dialog).
        """
        env = {**kwargs.get("remote_env", {}), **self.env}
        try:
            await asyncio.to_thread(self._launch, kwargs.get("cwd"), env)
        except ColabMagicError as exc:
            raise KernelLaunchError(str(exc)) from exc
        return self.connection_info

    def _launch(self, local_cwd: str | None, env: dict[str, str]) -> None:
        p = self._proxy
        reusable = p is not None and (
            p.state in ("up", "link-down") or (p.state == "dead" and p.kernel_exit is not None)
        )
        if reusable:
            self._restart_remote()
        else:
            ports = self._ports() if p is not None else None
            self._teardown()
            self._start_remote(local_cwd, env, ports)
        self._running = True

    def _ports(self) -> dict[str, int]:
        info = self.connection_info or {}
        return {k: int(info[k]) for k in _PORTS if info.get(k)}

    def _start_remote(
        self, local_cwd: str | None, env: dict[str, str], ports: dict[str, int] | None
    ) -> None:
        transport = self._make_transport()
        cwd = self.cwd or (local_cwd if self._is_local() else None)
        try:
            agent_id = transport.start_kernel(
                mock_gpu=self.mock_gpu,
                cwd=cwd,
                python=self.python or None,
                env=env or None,
                idle_timeout=self.idle_timeout,
            )
        except BaseException:
            transport.close()
            raise
        try:
            self._attach(transport, agent_id, ports, starting=True)
        except BaseException:
            with contextlib.suppress(ColabMagicError, OSError):
                transport.stop_kernel(agent_id)
            transport.close()
            raise

    def _make_transport(self) -> Any:
        return make_transport(None if self.local else self.target, **self.transport_options)

    def _attach(
        self, transport: Any, agent_id: str, ports: dict[str, int] | None, *, starting: bool
    ) -> None:
        proxy = self._new_proxy(transport, agent_id, ports)
        self._ready, self._died = threading.Event(), threading.Event()
        proxy.add_kernel_listener(self._on_kernel_event)
        try:
            proxy.start(timeout=self.connect_timeout)
            if starting:
                self._wait_ready(proxy, initial=True)
        except BaseException:
            proxy.close()
            raise
        self._proxy, self._transport, self.agent_id = proxy, transport, agent_id
        info = dict(proxy.connection_info)
        info["key"] = info["key"].encode()
        self.connection_info = info

    def _new_proxy(self, transport: Any, agent_id: str, ports: dict[str, int] | None) -> Proxy:
        def open_pipe():
            return transport.open_pipe(agent_id)

        name = f"{self.kernel_id} ({self.where})"
        try:
            return Proxy(
                open_pipe, name=name, reconnect_timeout=self.reconnect_timeout, ports=ports
            )
        except zmq.ZMQError as exc:
            if not ports:
                raise
            self.log.warning("ports %s are taken (%s); serving on new ones", ports, exc)
            return Proxy(open_pipe, name=name, reconnect_timeout=self.reconnect_timeout)

    def _on_kernel_event(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "kernel_ready":
            self._ready.set()
        elif kind == "kernel_died":
            self._died.set()

    def _wait_ready(self, proxy: Proxy, *, initial: bool) -> None:
        """Wait for the agent's ``kernel_ready`` (or a clear reason why it will not come)."""
        deadline = time.monotonic() + self.connect_timeout
        ready = self._ready
        while not ready.wait(0.05):
            if (
                initial
                and proxy.state == "up"
                and proxy.agent_info.get("state") in ("idle", "busy")
            ):
                return  # it was ready before this proxy connected
            if self._died.is_set() or (initial and proxy.kernel_exit is not None):
                python = self.python or "its Python"
                msg = (
                    f"the kernel on {self.where} exited while starting ({proxy.dead_reason}); "
                    f"check that {python} there has ipykernel installed (pip install ipykernel)"
                )
                raise ConnectError(msg)
            if proxy.state == "closed" or (proxy.state == "dead" and proxy.kernel_exit is None):
                msg = f"lost {self.where} while starting the kernel: {proxy.dead_reason}"
                raise ConnectError(msg)
            if time.monotonic() > deadline:
                msg = (
                    f"the kernel on {self.where} did not become ready within "
                    f"{self.connect_timeout:g}s"
                )
                raise ConnectError(msg)

    def _restart_remote(self) -> None:
        proxy = self._proxy
        self._ready.clear()
        self._died.clear()
        reply = proxy.call("restart", timeout=self.connect_timeout)
        if not reply.get("ok", False):
            msg = f"the agent on {self.where} could not restart the kernel: {reply.get('error')}"
            raise ConnectError(msg)
        self._wait_ready(proxy, initial=False)

    # -- shutdown ----------------------------------------------------------------------------
    async def cleanup(self, restart: bool = False) -> None:
        """On shutdown stop the agent and its kernel and close the proxy; keep both on restart."""
        if not restart:
            await asyncio.to_thread(self._teardown)

    def _teardown(self) -> None:
        proxy, transport, agent_id = self._proxy, self._transport, self.agent_id
        self._proxy = self._transport = None
        self._running = False
        if proxy is not None:
            if proxy.state != "closed" and (proxy.state != "dead" or proxy.kernel_exit):
                try:
                    proxy.call("shutdown", timeout=10.0)
                except ConnectError as exc:
                    self.log.debug("shutdown through the link failed: %s", exc)
            proxy.close()
        if transport is not None:
            if agent_id:
                try:
                    transport.stop_kernel(agent_id)  # returns once the agent has exited
                except (ColabMagicError, OSError) as exc:
                    self.log.warning(
                        "could not stop kernel %s on %s: %s", agent_id, self.where, exc
                    )
            transport.close()

    # -- persistence -------------------------------------------------------------------------
    async def get_provisioner_info(self) -> dict[str, Any]:
        """What a restarted server needs to re-attach: agent id, target, ports (JSON-safe)."""
        info = await super().get_provisioner_info()
        conn = dict(info.get("connection_info") or {})
        if isinstance(conn.get("key"), bytes):
            conn["key"] = conn["key"].decode()
        info["connection_info"] = conn
        info["colabmagic"] = {
            "agent_id": self.agent_id,
            "target": self.target,
            "local": self.local,
            "transport_options": dict(self.transport_options),
        }
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        """Re-attach to the still-running kernel described by :meth:`get_provisioner_info`.

        The proxy is served on the stored ports when they are free, so the stored connection
        info stays valid; otherwise :attr:`connection_info` holds the new ports.
        """
        await super().load_provisioner_info(provisioner_info)
        ours = provisioner_info.get("colabmagic") or {}
        agent_id = ours.get("agent_id")
        if not agent_id:
            msg = (
                "provisioner info has no colabmagic agent_id; it was not saved by this provisioner"
            )
            raise ParameterError(msg)
        self.target = ours.get("target") or ""
        self.local = bool(ours.get("local"))
        self.transport_options = dict(ours.get("transport_options") or {})
        stored_key = self.connection_info.get("key")
        ports = self._ports()
        await asyncio.to_thread(self._reattach, agent_id, ports)
        if isinstance(stored_key, str):
            stored_key = stored_key.encode()
        if stored_key and self.connection_info["key"] != stored_key:
            await asyncio.to_thread(self.detach)
            msg = f"kernel {agent_id} on {self.where} has a different key than the stored one"
            raise ConnectError(msg)

    def _reattach(self, agent_id: str, ports: dict[str, int]) -> None:
        transport = self._make_transport()
        try:
            self._attach(transport, agent_id, ports, starting=False)
        except BaseException:
            transport.close()
            raise
        self._running = True

    def detach(self) -> None:
        """Stop serving locally and leave the remote kernel running (to re-attach later)."""
        proxy, transport = self._proxy, self._transport
        self._proxy = self._transport = None
        self._running = False
        if proxy is not None:
            proxy.close()
        if transport is not None:
            transport.close()
