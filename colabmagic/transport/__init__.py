"""Transports: how the local proxy reaches an agent on the GPU host.

A transport starts, lists and stops agents on its host and opens *pipes* to them
(:class:`colabmagic.proxy.Pipe`: a pair of non-blocking file descriptors). The local transport
runs the agent as a detached local process and each pipe is a bridge subprocess; the SSH
transport does the same through SSH exec channels. Everything above the pipe is shared.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from colabmagic.errors import ConnectError
from colabmagic.proxy import Pipe


def agent_start_args(
    *,
    mock_gpu: bool = False,
    cwd: str | None = None,
    python: str | None = None,
    env: dict[str, str] | None = None,
    idle_timeout: float | None = None,
) -> list[str]:
    """The ``python -m colabmagic.remote start ...`` arguments for these options."""
    args = ["start"]
    if mock_gpu:
        args.append("--mock-gpu")
    if cwd:
        args += ["--cwd", cwd]
    if python:
        args += ["--python", python]
    if env:
        args += ["--env", json.dumps(env)]
    if idle_timeout is not None:
        args += ["--idle-timeout", str(idle_timeout)]
    return args


def parse_agent_reply(stdout: str, stderr: str, *, command: str, host: str) -> Any:
    """The JSON document a ``colabmagic.remote`` command printed last, or a one-line error.

    *host* names the machine in messages: ``"a local kernel"``, ``"gpu-box"``.
    """
    verb = "start" if command == "start" else f"run {command!r} for"
    try:
        result = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = stderr.strip().splitlines()[-1:] or ["no output"]
        msg = f"could not {verb} {host}: {tail[0]}"
        raise ConnectError(msg) from None
    if isinstance(result, dict) and result.get("error"):
        detail = (result.get("log") or "").strip().splitlines()[-1:] or [""]
        msg = f"could not {verb} {host}: {result['error']} {detail[0]}".strip()
        raise ConnectError(msg)
    return result


AGENT_DIED = "colabmagic: agent died "  # the bridge's stderr line (remote/supervisor.py)


def bridge_failure(stderr: str, *, host: str) -> str:
    """The one line to show for a bridge's *stderr*, naming *host* when its agent died.

    ``the agent on HOST died (SIGKILL); its kernel was stopped; `%colab_connect --restart```
    """
    for line in stderr.splitlines():
        if not line.startswith(AGENT_DIED):
            continue
        try:
            fate = json.loads(line[len(AGENT_DIED) :])
        except ValueError:
            break
        if fate.get("signal"):
            how = fate["signal"]
        elif fate.get("exit_code") is not None:
            how = f"exit code {fate['exit_code']}"
        else:
            how = "cause unknown"
        kpid = fate.get("kernel_pid")
        if fate.get("kernel_stopped") or not kpid:
            kernel = "its kernel was stopped"
        else:
            kernel = f"its kernel (pid {kpid}) may still run: stop it with `kill -9 -{kpid}` there"
        return f"the agent on {host} died ({how}); {kernel}; `%colab_connect --restart`"
    return stderr.strip()


def attach_error(transport: Any, kernel_id: str, exc: ConnectError) -> ConnectError:
    """The error for a failed attach to *kernel_id*: when it does not run, which ones do.

    Attaching asks nothing first (one round trip saved); only a failure lists the kernels.
    """
    if "died" in str(exc):
        return exc  # the bridge said how the agent ended: that is the news
    try:
        known = transport.list_kernels()
    except ConnectError:
        return exc
    alive = [k["id"] for k in known if k.get("state") != "stopped"]
    if kernel_id in alive:
        return exc
    msg = f"no running kernel {kernel_id!r} on {transport.target}; running: "
    return ConnectError(msg + (", ".join(alive) or "none"))


class AgentFiles:
    """``upload``/``download`` through the host's file helper, for transports with an agent.

    The local and SSH transports both run :mod:`colabmagic.filecopy`'s helper on the host (a
    subprocess here, an SSH exec channel there), so they share these two methods; a Jupyter
    server has no shell and uses its contents API (:mod:`colabmagic.transport.jupyter_files`).
    """

    def upload(self, local: str, remote: str | None, *, cwd: str | None = None, **kw) -> int:
        """Copy a local file or directory to the host: :func:`colabmagic.filecopy.upload`."""
        from colabmagic import filecopy

        return filecopy.upload(self, local, remote, cwd=cwd, **kw)

    def download(self, remote: str, local: str | None, *, cwd: str | None = None, **kw) -> int:
        """Copy a remote file or directory here: :func:`colabmagic.filecopy.download`."""
        from colabmagic import filecopy

        return filecopy.download(self, remote, local, cwd=cwd, **kw)

    def _close_files(self) -> None:
        """End the spare helper that the last copy started (from the transport's ``close``)."""
        from colabmagic import hosthelper

        hosthelper.close_spare(self)


class Transport(Protocol):
    """What a :class:`~colabmagic.session.Session` needs from a way of reaching a host."""

    target: str

    def start_kernel(
        self,
        *,
        mock_gpu: bool = False,
        cwd: str | None = None,
        python: str | None = None,
        env: dict[str, str] | None = None,
        idle_timeout: float | None = None,
    ) -> str:
        """Start a detached agent + kernel; return its id."""
        ...

    def open_pipe(self, kernel_id: str) -> Pipe:
        """A fresh byte pipe to the agent *kernel_id*."""
        ...

    def list_kernels(self) -> list[dict]:
        """The agents on the host, as ``state.json`` dicts."""
        ...

    def stop_kernel(self, kernel_id: str) -> None:
        """Shut an agent and its kernel down."""
        ...

    def close(self) -> None:
        """Release the transport's own resources (connections); kernels keep running."""
        ...
