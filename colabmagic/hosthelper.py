"""The helper process on the host, and each transport's one spare.

File copies (:mod:`colabmagic.filecopy`) and large push/pull streams
(:mod:`colabmagic.transfer_direct`) both run ``colabmagic/remote/files.py`` on the host: a
small stdlib program that reads its command as a JSON line on stdin, then streams. What
carries its stdin/stdout (its *kind*):

- ``openssh``: an ``ssh HOST python -c HELPER`` subprocess
  (:mod:`colabmagic.transport.ssh_pipe`), about half the CPU of paramiko on this side;
- ``paramiko``: an exec channel on the session's own connection (no handshake of its own);
- ``local``: a subprocess here, for ``--local``.

:func:`acquire` hands out a running helper: the transport's spare when it fits, else a fresh
one (:func:`fresh` picks the kind from the size: a fresh ``ssh`` costs its own handshake, see
:data:`OPENSSH_MIN`). After a copy, :func:`warm` starts one spare in the background; once up it
says ``{"ready": true}`` and waits for its command, so the next copy skips the ~0.3 s an exec
costs (a 1 kB upload a second after another: 11-14 ms instead of ~340 ms). A spare that died
with its connection is skipped; :func:`close_spare` (from the transport's ``close``) ends it.

A broken stream raises :class:`Dropped` (the caller resumes or falls back); ``ssh`` failing
before the helper ran raises :class:`NoStart` (the caller falls back to paramiko, except on a
host key mismatch, which is a :class:`~colabmagic.errors.HostKeyError`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import threading
import weakref
from concurrent.futures import Future
from typing import Any

from colabmagic.errors import ColabMagicError, ParameterError, TransferError
from colabmagic.transport import ssh_pipe

_HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote", "files.py")


class Dropped(Exception):
    """The helper's stream broke (the link dropped, the process died)."""


class NoStart(Exception):
    """``ssh`` itself failed (connect, authentication): the helper never ran."""


VIAS = ("auto", "openssh", "paramiko")
# A fresh ``ssh`` costs ~0.15-0.2 s more than an exec channel on the open connection (its own
# handshake and process); on loopback it pays from ~140 MiB on (``benchmarks/ssh.py
# --crossover``: +180 ms at 1 MiB, +150 ms at 64 MiB, -230 ms at 256 MiB); on a slow link
# never, for a first copy. A spare helper is taken whatever its kind and the size.
OPENSSH_MIN = 128 << 20
PIPE_SIZE = 1 << 20
SSH_EXIT_WAIT = 2.0  # seconds a closed ssh helper gets to end its session before it is killed


def _source() -> str:
    with open(_HELPER) as f:
        return f.read()


class Helper:
    """One run of the host-side helper: a byte stream each way and an exit status.

    *kind*: ``paramiko`` (an exec channel on the transport's connection), ``openssh`` (an
    ``ssh`` subprocess, :mod:`colabmagic.transport.ssh_pipe`) or ``local`` (the helper as a
    subprocess here).
    """

    def __init__(self, transport: Any, args: list[str], kind: str, route=None):
        self.target = transport.target
        self.kind = kind
        self.route = route
        self._buf = bytearray()
        self._big = bytearray()
        self._stderr: tuple[int | None, str] | None = None
        self.chan = self.proc = None
        if kind == "paramiko":
            self.chan = transport._session_channel()
            try:
                self.chan.exec_command(transport._command(["-c", _source(), *args]))
            except Exception as exc:  # noqa: BLE001 - paramiko raises several kinds
                self.chan.close()
                raise Dropped(str(exc)) from None
            return
        if kind == "openssh":
            self.route = route or ssh_pipe.route(transport)
            if self.route is None:
                msg = "no ssh client"
                raise NoStart(msg)
            argv = self.route.argv(transport._command(["-c", _source(), *args]))
        else:
            argv = [transport.python, "-c", _source(), *args]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
        )
        for pipe in (self.proc.stdin, self.proc.stdout):  # fewer, larger reads and writes
            with contextlib.suppress(OSError, AttributeError):
                fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)

    def alive(self) -> bool:
        if self.chan is not None:
            return not self.chan.closed and not self.chan.exit_status_ready()
        return self.proc.poll() is None

    def write(self, data) -> None:
        try:
            if self.chan is not None:
                self.chan.sendall(data)
                return
            view = memoryview(data).cast("B")
            while view:
                view = view[self.proc.stdin.write(view) :]
        except Exception as exc:  # noqa: BLE001 - OSError, EOFError, paramiko.SSHException
            msg = f"write failed: {exc}"
            raise Dropped(msg) from None

    def close_write(self) -> None:
        try:
            if self.chan is not None:
                self.chan.shutdown_write()
            else:
                self.proc.stdin.close()
        except Exception as exc:  # noqa: BLE001
            msg = f"close failed: {exc}"
            raise Dropped(msg) from None

    def _recv(self, n: int) -> bytes:
        try:
            if self.chan is not None:
                data = self.chan.recv(n)
            else:
                data = self.proc.stdout.read(n)
        except Exception as exc:  # noqa: BLE001
            msg = f"read failed: {exc}"
            raise Dropped(msg) from None
        if not data:
            raise Dropped(self._why())
        return data

    def _more(self, n: int) -> None:
        self._buf += self._recv(max(n, 1 << 16))

    def read_exact(self, n: int):
        """The next *n* bytes: ``bytes``, or from a subprocess a view of a buffer that the next
        call reuses."""
        if len(self._buf) >= n:
            out = bytes(self._buf[:n])
            del self._buf[:n]
            return out
        if self.proc is not None:  # read straight into one reused buffer
            if len(self._big) < n:
                self._big = bytearray(n)
            view = memoryview(self._big)[:n]
            self.readinto(view)
            return view
        parts, got = [bytes(self._buf)], len(self._buf)
        self._buf = bytearray()
        while got < n:  # a large payload: gather the pieces, join them once
            data = self._recv(n - got)
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    def readinto(self, view: memoryview) -> None:
        """Fill *view* (bytes) with the next ``view.nbytes`` bytes of a subprocess's stream,
        read straight into it (what a line read took beyond its line first)."""
        got = min(len(self._buf), view.nbytes)
        if got:
            view[:got] = self._buf[:got]
            del self._buf[:got]
        while got < view.nbytes:
            try:
                k = self.proc.stdout.readinto(view[got:])
            except OSError as exc:
                msg = f"read failed: {exc}"
                raise Dropped(msg) from None
            if not k:
                raise Dropped(self._why())
            got += k

    def readline(self) -> bytes:
        while b"\n" not in self._buf:
            self._more(1)
        i = self._buf.index(b"\n") + 1
        out = bytes(self._buf[:i])
        del self._buf[:i]
        return out

    def stderr(self) -> tuple[int | None, str]:
        """The exit status (None if unknown) and what the process wrote on stderr (read once
        the stream ended)."""
        if self._stderr is not None:
            return self._stderr
        err, rc = b"", None
        with contextlib.suppress(Exception):
            if self.chan is not None:
                while self.chan.recv_stderr_ready():
                    err += self.chan.recv_stderr(65536)
                if self.chan.exit_status_ready():
                    rc = self.chan.recv_exit_status()
            else:
                rc = self.proc.wait(5)
                err = self.proc.stderr.read()
        self._stderr = (rc, err.decode(errors="replace"))
        return self._stderr

    def _why(self) -> str:
        lines = self.stderr()[1].strip().splitlines()
        return lines[-1] if lines else "the stream ended early"

    def close(self) -> None:
        if self.chan is not None:
            with contextlib.suppress(Exception):
                self.chan.close()
            return
        if self.kind == "openssh":  # let ssh end its session (the host reaps its side)
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            threading.Thread(target=self._end, args=(SSH_EXIT_WAIT,), daemon=True).start()
        else:
            self._end(0)

    def _end(self, wait: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(wait)
        for s in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                s.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def start(transport: Any, kind: str, args: list[str], route=None) -> Helper:
    """A helper of *kind* running *args*; an ``ssh`` one is first seen to answer (it starts as
    a spare), so that ``ssh`` failing to connect is told apart from the link dropping."""
    if kind != "openssh":
        return Helper(transport, args, kind)
    helper = Helper(transport, ["serve"], kind, route)
    try:
        try:
            read_line(helper)  # {"ready": true}
        except Dropped:
            rc, err = helper.stderr()
            if rc != ssh_pipe.SSH_FAILED:
                raise
            why = helper.route.failure(rc, err)  # HostKeyError raises
            raise NoStart(why) from None
        if args != ["serve"]:
            send_line(helper, {"argv": args})
    except BaseException:
        helper.close()
        raise
    return helper


def kinds_for(transport: Any, via: str) -> tuple[str, ...]:
    """The helper kinds a copy with *via* may use, best first."""
    if not hasattr(transport, "_session_channel"):
        return ("local",)
    if via == "auto":
        return ("openssh", "paramiko") if ssh_pipe.usable(transport) else ("paramiko",)
    if via == "openssh" and ssh_pipe.ssh_binary() is None:
        msg = "via='openssh' needs the OpenSSH client: install it (apt install openssh-client)"
        raise ParameterError(msg)
    return (via,)


def fresh(transport: Any, args: list[str], kinds: tuple[str, ...], size: int | None) -> Helper:
    """A new helper: ``ssh`` for *size* bytes or more (or when it is the only kind allowed), an
    exec channel otherwise or when ``ssh`` fails to start where the channel works."""
    if kinds == ("local",):
        return Helper(transport, args, "local")
    want = kinds[0]
    if want == "openssh" and len(kinds) > 1 and (size is None or size < OPENSSH_MIN):
        want = "paramiko"
    if want == "openssh":
        try:
            return start(transport, "openssh", args)
        except NoStart as exc:
            if len(kinds) == 1:
                msg = (
                    f"the copy to {transport.target} through ssh could not start ({exc}); "
                    "leave via='auto' to fall back to the session's connection"
                )
                raise TransferError(msg) from None
            helper = Helper(transport, args, "paramiko")
            ssh_pipe.disable(transport, str(exc))  # the channel works where ssh does not
            return helper
    helper = Helper(transport, args, "paramiko")
    if "openssh" in kinds:
        warm(transport, "auto")  # for this copy if it proves large, else for the next one
    return helper


SPARE_WAIT = 10.0  # seconds a copy waits for a spare still starting, before starting its own
_spares: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # transport -> (kind, Future)
_spares_lock = threading.Lock()


def take_spare(transport: Any, kinds: tuple[str, ...], args: list[str]) -> Helper | None:
    """*transport*'s spare running *args*, if it is of one of *kinds* (waited for: it started
    before a fresh one would)."""
    with _spares_lock:
        kind, fut = _spares.get(transport, (None, None))
        if kind not in kinds:
            return None
        del _spares[transport]
    try:
        spare = fut.result(timeout=SPARE_WAIT)
    except Exception:  # noqa: BLE001 - it failed or hangs: a fresh helper instead
        fut.add_done_callback(_close_started)
        return None
    if spare.alive():
        try:
            send_line(spare, {"argv": args})
            return spare
        except Dropped:
            pass
    spare.close()
    return None


def acquire(transport: Any, args: list[str], via: str, size: int | None = None) -> Helper:
    """A helper running *args*: the transport's spare when it fits *via*, else a fresh one."""
    kinds = kinds_for(transport, via)
    return take_spare(transport, kinds, args) or fresh(transport, args, kinds, size)


def _close_started(fut: Future) -> None:
    if fut.exception() is None:
        fut.result().close()


def warm(transport: Any, via: str) -> None:
    """Start a spare helper for *transport*'s next copy, in the background: through ``ssh``
    when *via* allows it and it works, else an exec channel."""
    kinds = kinds_for(transport, via)
    route = None
    if kinds[0] == "openssh":  # taken now: the thread must not connect after a close
        try:
            route = ssh_pipe.route(transport)
        except ColabMagicError:
            return
        if route is None:
            kinds = kinds[1:] or kinds
    with _spares_lock:
        if transport in _spares:
            return
        fut: Future = Future()
        _spares[transport] = (kinds[0], fut)

    def boot() -> None:
        helper = None
        try:
            if kinds[0] == "openssh":
                try:
                    helper = start(transport, "openssh", ["serve"], route)
                except NoStart as exc:
                    if len(kinds) == 1 or getattr(fut, "abandoned", False):
                        raise
                    helper = Helper(transport, ["serve"], "paramiko")
                    read_line(helper)
                    ssh_pipe.disable(transport, str(exc))
                    with _spares_lock:
                        if _spares.get(transport, (None, None))[1] is fut:
                            _spares[transport] = ("paramiko", fut)
            else:
                helper = Helper(transport, ["serve"], kinds[0])
                read_line(helper)  # {"ready": true}: the host's session and Python are up
            fut.set_result(helper)
        except BaseException as exc:  # noqa: BLE001 - the next copy starts its own helper
            if helper is not None:
                helper.close()
            fut.set_exception(exc)

    threading.Thread(target=boot, name="colabmagic-file-spare", daemon=True).start()


def spare_started(transport: Any, kind: str) -> bool:
    """Whether *transport* has a spare helper of *kind* that is up now (not merely starting)."""
    with _spares_lock:
        found, fut = _spares.get(transport, (None, None))
    return found == kind and fut.done() and fut.exception() is None


def wait_spare(transport: Any, timeout: float = 30.0) -> bool:
    """Wait until *transport*'s spare helper is up; False when there is none (or it failed)."""
    with _spares_lock:
        _, fut = _spares.get(transport, (None, None))
    if fut is None:
        return False
    try:
        fut.result(timeout=timeout)
    except Exception:  # noqa: BLE001
        return False
    return True


def close_spare(transport: Any) -> None:
    """End *transport*'s spare helper, if any, and its ``ssh`` files (from its ``close``)."""
    with _spares_lock:
        _, fut = _spares.pop(transport, (None, None))
    if fut is not None:
        fut.abandoned = True  # a spare still starting: no fallback, no new connection
        fut.add_done_callback(_close_started)
    ssh_pipe.close(transport)


def send_line(helper: Helper, obj: dict) -> None:
    helper.write(json.dumps(obj).encode() + b"\n")


def read_line(helper: Helper) -> dict:
    raw = helper.readline()
    try:
        return json.loads(raw.decode())
    except ValueError:
        raise Dropped(helper._why()) from None
