"""The kernel's entry point: what runs in the kernel process before ipykernel starts.

The agent starts the kernel as ``python -c LOADER kernel_launch.py -f kernel.json`` (see
:data:`LOADER`): this file is executed from its path, never imported as part of colabmagic, so the
kernel's ``sys.path`` holds the user's packages and not the agent's (zero-install) code. It must
stay self-contained: standard library plus what an ipykernel has, Python >= 3.9.

It does three things, then hands over to ``ipykernel.kernelapp`` exactly as
``python -m ipykernel_launcher`` would:

- **No orphans.** On Linux, ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel is killed the moment
  the agent that started it dies, whatever killed the agent (``kill -9``, the OOM killer). The
  signal fires on the death of the parent *thread*; the agent starts kernels from its main
  thread, which lives as long as the agent. A parent that died between fork and ``prctl`` is
  caught by comparing ``getppid()`` with ``JPY_PARENT_PID``. Elsewhere, ``JPY_PARENT_PID`` also
  arms ipykernel's own parent poller (a one-second poll) as the fallback.
- **IPC everywhere.** With ``transport="ipc"``, ipykernel still binds a TCP port on 127.0.0.1 for
  output of forked subprocesses (its IOPub "pipe"); that pipe gets a Unix socket next to the
  kernel's channels instead, so the kernel opens no TCP port at all. Where ipykernel's internals
  differ from what this expects, its own behaviour is kept.
- ``sys.path[0]`` is the working directory, as under ``-m``.
"""

import os
import sys

# What the agent passes as ``-c``: run this file by path, as ``__main__``.
LOADER = (
    "import sys; p = sys.argv.pop(1); "
    "exec(compile(open(p).read(), p, 'exec'), {'__name__': '__main__', '__file__': p})"
)
PR_SET_PDEATHSIG = 1


def arm_parent_death_signal() -> bool:
    """Ask Linux to SIGKILL this process when its parent dies; False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    parent = os.environ.get("JPY_PARENT_PID")
    if parent and os.getppid() != int(parent):
        os._exit(1)  # the agent died before the signal was armed: do not run as an orphan
    return True


def ipc_pipe(prefix: str) -> None:
    """Make ipykernel's IOPub pipe (output of forked children) a Unix socket at *prefix*-pipe."""
    try:
        import zmq
        from ipykernel import iostream
        from zmq.eventloop.zmqstream import ZMQStream
    except ImportError:
        return
    cls = getattr(iostream, "IOPubThread", None)
    if cls is None or not hasattr(cls, "_setup_pipe_in") or not hasattr(cls, "_setup_pipe_out"):
        return
    url = "ipc://" + prefix + "-pipe"
    stock_in, stock_out = cls._setup_pipe_in, cls._setup_pipe_out

    def setup_pipe_in(self):
        self._pipe_uuid = os.urandom(16)
        pipe_in = self.socket.context.socket(zmq.PULL)
        pipe_in.linger = 0
        try:
            pipe_in.bind(url)
        except zmq.ZMQError:
            pipe_in.close()
            return stock_in(self)
        self._colabmagic_pipe = url
        self._pipe_port = 0
        self._pipe_in = ZMQStream(pipe_in, self.io_loop)
        self._pipe_in.on_recv(self._handle_pipe_msg)
        return None

    def setup_pipe_out(self):
        if getattr(self, "_colabmagic_pipe", None) is None:
            return stock_out(self)
        ctx = zmq.Context()
        pipe_out = ctx.socket(zmq.PUSH)
        pipe_out.linger = 3000
        pipe_out.connect(self._colabmagic_pipe)
        return ctx, pipe_out

    cls._setup_pipe_in = setup_pipe_in
    cls._setup_pipe_out = setup_pipe_out


def main() -> None:
    arm_parent_death_signal()
    prefix = os.environ.pop("COLABMAGIC_IPC_PREFIX", "")
    if prefix:
        ipc_pipe(prefix)
    if sys.path and sys.path[0] == "":
        sys.path[0] = os.getcwd()
    from ipykernel import kernelapp

    kernelapp.launch_new_instance()


if __name__ == "__main__":
    main()
