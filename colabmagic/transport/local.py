"""The local transport: agent and kernel on this machine, each pipe a bridge subprocess.

It runs the *same* agent, bridge and wire protocol as a remote host, so ``--local`` exercises the
whole remote path (and killing a bridge process is a faithful stand-in for a dropped SSH link).
"""

from __future__ import annotations

import fcntl
import os
import select
import subprocess
import sys
import time

from colabmagic.errors import ConnectError
from colabmagic.proxy import PermanentLinkError
from colabmagic.transport import AgentFiles, agent_start_args, bridge_failure, parse_agent_reply

_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
DEFAULT_ROOT = "~/.colabmagic/kernels"


def _remote_cmd(python: str, *args: str) -> list[str]:
    return [python, "-m", "colabmagic.remote", *args]


class BridgeProcess:
    """A :class:`~colabmagic.proxy.Pipe` made of a bridge subprocess's stdin and stdout."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
            env=env,
            # Its own process group: ipykernel terminates children in its group at shutdown,
            # which would cut the link before our atexit handler shuts the kernel down.
            start_new_session=True,
        )
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                fcntl.fcntl(f.fileno(), _F_SETPIPE_SZ, 1 << 20)
            except OSError:
                pass
        self.read_fd = self.proc.stdout.fileno()
        self.write_fd = self.proc.stdin.fileno()
        self.description = f"bridge pid {self.proc.pid}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        try:
            self.proc.wait(2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stderr.close()

    def first_line(self, timeout: float) -> bytes:
        """The process's first line of output, read byte by byte so that nothing behind it (the
        wire stream) is consumed; empty at EOF. Raises ``ConnectError`` after *timeout*."""
        buf = bytearray()
        deadline = time.monotonic() + timeout
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.read_fd], [], [], left)[0]:
                msg = f"the local kernel did not start within {timeout:g}s; is this machine busy?"
                raise ConnectError(msg)
            byte = os.read(self.read_fd, 1)
            if not byte:
                break
            buf += byte
        return bytes(buf)

    def failure(self) -> tuple[bool, str]:
        try:
            rc = self.proc.wait(0.5)
        except subprocess.TimeoutExpired:
            return False, "the bridge stopped answering"
        try:
            err = self.proc.stderr.read().decode(errors="replace").strip()
        except (OSError, ValueError):
            err = ""
        return rc == 4, bridge_failure(err, host="localhost") or f"bridge exited with {rc}"


class LocalTransport(AgentFiles):
    """Agents as detached processes on this machine.

    Parameters
    ----------
    root
        Directory holding one private sub-directory per agent (default ``~/.colabmagic/kernels``).
    python
        Interpreter for the agent and kernel (default: this one).
    """

    target = "local"

    def __init__(self, *, root: str | None = None, python: str | None = None):
        self.root = os.path.expanduser(root or os.environ.get("COLABMAGIC_ROOT", DEFAULT_ROOT))
        self.python = python or sys.executable
        self.bridges: list[BridgeProcess] = []
        self._pending: dict[str, BridgeProcess] = {}  # started agents' bridges, not yet claimed

    def _run(self, *args: str, timeout: float = 60.0) -> dict | list:
        proc = subprocess.run(
            _remote_cmd(self.python, *args, "--root", self.root),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return parse_agent_reply(proc.stdout, proc.stderr, command=args[0], host="a local kernel")

    def start_kernel(
        self,
        *,
        mock_gpu: bool = False,
        cwd: str | None = None,
        python: str | None = None,
        env: dict[str, str] | None = None,
        idle_timeout: float | None = None,
    ) -> str:
        """Start a detached agent + kernel; the same process goes on as its first bridge."""
        args = agent_start_args(
            mock_gpu=mock_gpu,
            cwd=os.path.abspath(os.path.expanduser(cwd or os.getcwd())),
            python=python,
            env=env,
            idle_timeout=idle_timeout,
        )
        bridge = BridgeProcess(_remote_cmd(self.python, *args, "--bridge", "--root", self.root))
        try:
            line = bridge.first_line(timeout=60.0).decode(errors="replace")
            err = "" if line else bridge.proc.stderr.read().decode(errors="replace")
            reply = parse_agent_reply(line, err, command="start", host="a local kernel")
        except BaseException:
            bridge.close()
            raise
        self._pending[reply["id"]] = bridge
        return reply["id"]

    def open_pipe(self, kernel_id: str) -> BridgeProcess:
        pending = self._pending.pop(kernel_id, None)
        if pending is not None and pending.proc.poll() is None:
            self.bridges = [b for b in self.bridges if b.proc.poll() is None] + [pending]
            return pending
        state = os.path.join(self.root, kernel_id, "state.json")
        if not os.path.exists(state):
            msg = f"no kernel {kernel_id!r} under {self.root}"
            raise PermanentLinkError(msg)
        bridge = BridgeProcess(
            _remote_cmd(self.python, "bridge", "--root", self.root, "--id", kernel_id)
        )
        self.bridges = [b for b in self.bridges if b.proc.poll() is None] + [bridge]
        return bridge

    def list_kernels(self) -> list[dict]:
        return self._run("list")

    def stop_kernel(self, kernel_id: str) -> None:
        self._run("stop", "--id", kernel_id)

    def close(self) -> None:
        self.bridges += list(self._pending.values())
        self._close_files()
        self._pending = {}
        for b in self.bridges:
            if b.proc.poll() is None:
                b.close()
        self.bridges = []
