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
