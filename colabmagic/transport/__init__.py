"""Transports: how the local proxy reaches an agent on the GPU host.

A transport starts, lists and stops agents on its host and opens *pipes* to them
(:class:`colabmagic.proxy.Pipe`: a pair of non-blocking file descriptors). The local transport
runs the agent as a detached local process and each pipe is a bridge subprocess; the SSH
transport does the same through SSH exec channels. Everything above the pipe is shared.
"""

from __future__ import annotations

from typing import Protocol

from colabmagic.proxy import Pipe


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
