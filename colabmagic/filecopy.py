"""Files to and from the host: resumable, sha256-verified, atomic, compressed where it pays.

``%colab_upload`` / ``%colab_download`` and ``Session.upload`` / ``Session.download`` land here
(through the transport). Each copy streams to a small stdlib helper on the host,
``colabmagic/remote/files.py``: a stream of frames, each a chunk of the file, raw or zstd
(:mod:`colabmagic.compress` decides per chunk), then the file's sha256. What carries the stream
(``via``, reported on the result as :class:`Copied`):

- over SSH, the **OpenSSH client** (:mod:`colabmagic.transport.ssh_pipe`: ``ssh HOST python -c
  HELPER``, its stdin/stdout the stream), which costs this side about half the CPU of paramiko.
  Taken for a copy of :data:`OPENSSH_MIN` bytes or more, or whenever a spare ``ssh`` helper is
  ready; a fresh one costs its own handshake, so smaller first copies use
- an **exec channel** of the session's paramiko connection: also the fallback when ``ssh`` is
  not on PATH or fails to start where paramiko works (a key only paramiko can unlock: logged,
  and ``ssh`` is not tried again on that transport). A host key other than the one the
  connection verified is a :class:`~colabmagic.errors.HostKeyError`, never a fallback;
- a local subprocess for ``--local``.

- **Atomic**: a file is written as ``.NAME.colabmagic-part`` beside its target and renamed only
  when its sha256 matches the source's; a target never holds half a file.
- **Resumable**: after a drop the partial file stays; the next attempt (automatic, with a new
  connection, up to ``retries`` times without progress; or the next call) hashes the partial
  file on both sides and continues from its end when the hashes match, or starts that file
  again when they do not (a corrupted partial file is redone, never trusted).
- **Progress**: a tqdm bar in bytes, with rate and ETA.
- Directories are copied recursively, each file atomically.
- **A spare helper**: an exec on an SSH connection costs ~0.3 s on a loopback sshd (its session
  setup, before Python starts), paid by every call. After each copy one spare helper is started
  in the background; once up it says so and waits for its command on stdin, and the next copy
  on that transport takes it (a 1 kB upload a second after another: 11-14 ms instead of
  ~340 ms). The spare is an ``ssh`` one when that route is usable. A copy right after another
  waits for the spare, which started first. A spare that died with its connection is skipped;
  the transport's ``close`` ends it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import struct
import subprocess
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Any

from colabmagic import compress as _compress
from colabmagic.errors import ColabMagicError, HostKeyError, ParameterError, TransferError
from colabmagic.remote.files import _hash_prefix, tree  # one copy: the host's helper alike
from colabmagic.transport import ssh_pipe

log = logging.getLogger("colabmagic.files")

FRAME = struct.Struct("!BQ")
END = 255
CHUNK = 4 << 20
RETRIES = 8
SLACK = 4 << 20  # what the SSH window and socket buffers take before a writer feels the link
PART = ".colabmagic-part"
_HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote", "files.py")


class _Dropped(Exception):
    """The helper's stream broke (the link dropped, the process died)."""


class _NoStart(Exception):
    """``ssh`` itself failed (connect, authentication): the helper never ran."""


class Copied(int):
    """The bytes a copy moved (an ``int``), with ``via``: what carried them, ``"openssh"`` (the
    ``ssh`` client), ``"paramiko"`` (an exec channel on the session's connection) or
    ``"local"`` (a subprocess, for ``--local``)."""

    via: str

    def __new__(cls, n: int, via: str) -> Copied:
        self = super().__new__(cls, n)
        self.via = via
        return self


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


class _Helper:
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
                raise _Dropped(str(exc)) from None
            return
        if kind == "openssh":
            self.route = route or ssh_pipe.route(transport)
            if self.route is None:
                msg = "no ssh client"
                raise _NoStart(msg)
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
            raise _Dropped(msg) from None

    def close_write(self) -> None:
        try:
            if self.chan is not None:
                self.chan.shutdown_write()
            else:
                self.proc.stdin.close()
        except Exception as exc:  # noqa: BLE001
            msg = f"close failed: {exc}"
            raise _Dropped(msg) from None

    def _recv(self, n: int) -> bytes:
        try:
            if self.chan is not None:
                data = self.chan.recv(n)
            else:
                data = self.proc.stdout.read(n)
        except Exception as exc:  # noqa: BLE001
            msg = f"read failed: {exc}"
            raise _Dropped(msg) from None
        if not data:
            raise _Dropped(self._why())
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
            got = len(self._buf)
            view[:got] = self._buf
            self._buf = bytearray()
            while got < n:
                try:
                    k = self.proc.stdout.readinto(view[got:])
                except OSError as exc:
                    msg = f"read failed: {exc}"
                    raise _Dropped(msg) from None
                if not k:
                    raise _Dropped(self._why())
                got += k
            return view
        parts, got = [bytes(self._buf)], len(self._buf)
        self._buf = bytearray()
        while got < n:  # a large payload: gather the pieces, join them once
            data = self._recv(n - got)
            parts.append(data)
            got += len(data)
        return b"".join(parts)

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


def _start(transport: Any, kind: str, args: list[str], route=None) -> _Helper:
    """A helper of *kind* running *args*; an ``ssh`` one is first seen to answer (it starts as
    a spare), so that ``ssh`` failing to connect is told apart from the link dropping."""
    if kind != "openssh":
        return _Helper(transport, args, kind)
    helper = _Helper(transport, ["serve"], kind, route)
    try:
        try:
            _read_line(helper)  # {"ready": true}
        except _Dropped:
            rc, err = helper.stderr()
            if rc != ssh_pipe.SSH_FAILED:
                raise
            why = helper.route.failure(rc, err)  # HostKeyError raises
            raise _NoStart(why) from None
        if args != ["serve"]:
            _send_line(helper, {"argv": args})
    except BaseException:
        helper.close()
        raise
    return helper


def _kinds(transport: Any, via: str) -> tuple[str, ...]:
    """The helper kinds a copy with *via* may use, best first."""
    if not hasattr(transport, "_session_channel"):
        return ("local",)
    if via == "auto":
        return ("openssh", "paramiko") if ssh_pipe.usable(transport) else ("paramiko",)
    if via == "openssh" and ssh_pipe.ssh_binary() is None:
        msg = "via='openssh' needs the OpenSSH client: install it (apt install openssh-client)"
        raise ParameterError(msg)
    return (via,)


def _fresh(transport: Any, args: list[str], kinds: tuple[str, ...], size: int | None) -> _Helper:
    """A new helper: ``ssh`` for *size* bytes or more (or when it is the only kind allowed), an
    exec channel otherwise or when ``ssh`` fails to start where the channel works."""
    if kinds == ("local",):
        return _Helper(transport, args, "local")
    want = kinds[0]
    if want == "openssh" and len(kinds) > 1 and (size is None or size < OPENSSH_MIN):
        want = "paramiko"
    if want == "openssh":
        try:
            return _start(transport, "openssh", args)
        except _NoStart as exc:
            if len(kinds) == 1:
                msg = (
                    f"the copy to {transport.target} through ssh could not start ({exc}); "
                    "leave via='auto' to fall back to the session's connection"
                )
                raise TransferError(msg) from None
            helper = _Helper(transport, args, "paramiko")
            ssh_pipe.disable(transport, str(exc))  # the channel works where ssh does not
            return helper
    helper = _Helper(transport, args, "paramiko")
    if "openssh" in kinds:
        _warm(transport, "auto")  # for this copy if it proves large, else for the next one
    return helper


SPARE_WAIT = 10.0  # seconds a copy waits for a spare still starting, before starting its own
_spares: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # transport -> (kind, Future)
_spares_lock = threading.Lock()


def _take_spare(transport: Any, kinds: tuple[str, ...], args: list[str]) -> _Helper | None:
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
            _send_line(spare, {"argv": args})
            return spare
        except _Dropped:
            pass
    spare.close()
    return None


def _helper(transport: Any, args: list[str], via: str, size: int | None = None) -> _Helper:
    """A helper running *args*: the transport's spare when it fits *via*, else a fresh one."""
    kinds = _kinds(transport, via)
    return _take_spare(transport, kinds, args) or _fresh(transport, args, kinds, size)


def _close_started(fut: Future) -> None:
    if fut.exception() is None:
        fut.result().close()


def _warm(transport: Any, via: str) -> None:
    """Start a spare helper for *transport*'s next copy, in the background: through ``ssh``
    when *via* allows it and it works, else an exec channel."""
    kinds = _kinds(transport, via)
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

    def start() -> None:
        helper = None
        try:
            if kinds[0] == "openssh":
                try:
                    helper = _start(transport, "openssh", ["serve"], route)
                except _NoStart as exc:
                    if len(kinds) == 1 or getattr(fut, "abandoned", False):
                        raise
                    helper = _Helper(transport, ["serve"], "paramiko")
                    _read_line(helper)
                    ssh_pipe.disable(transport, str(exc))
                    with _spares_lock:
                        if _spares.get(transport, (None, None))[1] is fut:
                            _spares[transport] = ("paramiko", fut)
            else:
                helper = _Helper(transport, ["serve"], kinds[0])
                _read_line(helper)  # {"ready": true}: the host's session and Python are up
            fut.set_result(helper)
        except BaseException as exc:  # noqa: BLE001 - the next copy starts its own helper
            if helper is not None:
                helper.close()
            fut.set_exception(exc)

    threading.Thread(target=start, name="colabmagic-file-spare", daemon=True).start()


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


def _progress(total: int, desc: str, enabled: bool | None):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=None if enabled is None else not enabled,
        leave=False,
    )


class _Attempts:
    """Retry a step after a drop, with backoff, until *retries* attempts make no progress."""

    def __init__(self, what: str, retries: int):
        self.what, self.retries = what, retries
        self.failures = 0
        self.drops = 0

    def failed(self, exc: BaseException, progressed: bool) -> None:
        self.drops += 1
        self.failures = 1 if progressed else self.failures + 1
        if self.failures > self.retries:
            msg = (
                f"{self.what} failed {self.failures} times in a row ({exc}); run it again to "
                "resume from the last verified offset"
            )
            raise TransferError(msg) from None
        time.sleep(min(0.1 * 2**self.failures, 5.0))


def _send_line(helper: _Helper, obj: dict) -> None:
    helper.write(json.dumps(obj).encode() + b"\n")


def _read_line(helper: _Helper) -> dict:
    raw = helper.readline()
    try:
        return json.loads(raw.decode())
    except ValueError:
        raise _Dropped(helper._why()) from None


def _local_files(src: str) -> list[tuple[str, str, int]]:
    """(path, path relative to *src* with ``/``, size) of every file under *src* (or *src*)."""
    if os.path.isfile(src):
        return [(src, "", os.path.getsize(src))]
    return [(p, rel, os.path.getsize(p)) for p, rel in tree(src)]


def _base(transport: Any, cwd: str | None) -> str | None:
    if cwd is None and not hasattr(transport, "_session_channel"):
        return os.getcwd()  # a local kernel: relative paths are this process's
    return cwd


# -- upload --------------------------------------------------------------------------------
def upload(
    transport: Any,
    local: str,
    remote: str | None = None,
    *,
    cwd: str | None = None,
    compress: str | None = None,
    progress: bool | None = None,
    retries: int = RETRIES,
    via: str = "auto",
) -> Copied:
    """Copy *local* (a file or a directory, recursively) to *remote* on the host.

    Parameters
    ----------
    transport
        An SSH or local transport.
    remote
        Target path; relative to *cwd* (the kernel's directory) or the remote home. An existing
        remote directory receives a file under its own name. Default: the source's name.
    compress
        ``auto`` (default: zstd on the chunks where it pays at the link's rate), ``zstd`` or
        ``none``.
    progress
        tqdm bar: None = when attached to a terminal or notebook, True/False = always/never.
    retries
        Attempts after a drop that make no progress before giving up (the partial files stay,
        so running it again resumes).
    via
        Over SSH, what carries the stream: ``auto`` (default: the OpenSSH client when it is on
        PATH and the copy is large enough to pay for its start, or a spare helper is ready;
        else an exec channel of the session's paramiko connection), ``openssh`` or
        ``paramiko``.

    Returns
    -------
    Copied
        The bytes of file content copied (an ``int``: the whole size, resumed parts included);
        its ``via`` says what carried them.
    """
    mode = _check(compress)
    _check_via(via)
    src = os.path.abspath(os.path.expanduser(local))
    if not os.path.exists(src):
        msg = f"{local} does not exist here; give an existing file or directory"
        raise TransferError(msg)
    files = _local_files(src)
    req = {
        "dest": remote,
        "base": _base(transport, cwd),
        "name": os.path.basename(src.rstrip("/")),
        "is_dir": os.path.isdir(src),
        "files": [{"rel": rel, "size": n} for _, rel, n in files],
    }
    total = sum(n for _, _, n in files)
    attempts = _Attempts(f"upload of {local} to {transport.target}", retries)
    meter = _compress.RateMeter(slack=SLACK)
    remaining = list(range(len(files)))
    moved = [0]  # bytes streamed, to tell a retry that made progress from one that did not
    kind = ""
    started = time.monotonic()
    with _progress(total, f"upload {req['name']}", progress) as bar:
        while remaining:
            before = (len(remaining), moved[0])
            helper = None
            try:
                left = sum(files[i][2] for i in remaining)
                helper = _helper(transport, ["put"], via, left)
                kind = helper.kind
                _send_line(helper, req)
                plan = _read_line(helper)
                peer = bool(plan.get("zstd"))
                for i in list(remaining):
                    done = sum(files[j][2] for j in range(i) if j not in remaining)
                    _put_one(
                        helper, i, files[i], plan["files"][i], mode, peer, bar, done, meter, moved
                    )
                    remaining.remove(i)
                helper.close_write()
            except (_Dropped, ColabMagicError, OSError) as exc:
                if isinstance(exc, _FINAL):
                    raise
                attempts.failed(exc, progressed=(len(remaining), moved[0]) != before)
            finally:
                if helper is not None:
                    helper.close()
    _warm(transport, via)
    _log("upload", local, transport.target, total, kind, started, attempts)
    return Copied(total, kind)


# Errors a retry cannot mend: said at once, not after the retries.
_FINAL = (TransferError, HostKeyError, ParameterError)


def _check_via(via: str) -> None:
    if via not in VIAS:
        msg = f"via={via!r} is not one of {', '.join(VIAS)}"
        raise ParameterError(msg)


def _log(what, name, target, total, kind, started, attempts) -> None:
    seconds = time.monotonic() - started
    log.info(
        "%s of %s (%d bytes) %s %s via %s in %.2f s (%d drops)",
        what,
        name,
        total,
        "to" if what == "upload" else "from",
        target,
        kind,
        seconds,
        attempts.drops,
    )


def _check(mode: str | None) -> str:
    mode = _compress.check_mode(mode)
    return "none" if (mode == "auto" and not _compress.available()) else mode


def _put_one(helper, i, file, info, mode, peer, bar, done, meter, moved) -> None:
    path = file[0]
    with open(path, "rb") as f:
        h, offset = _hash_prefix(f, int(info["part"]))
        _send_line(helper, {"i": i, "offset": offset, "sha": h.hexdigest()})
        start = int(_read_line(helper)["offset"])
        if start != offset:
            h = hashlib.sha256()  # the partial file there did not match: it is redone
        f.seek(start)
        bar.n = done + start
        bar.refresh()
        chooser = _compress.Chooser(mode, meter, peer_zstd=peer)
        meter.start()
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            codec, payload = chooser.encode(view[:n])
            wire = memoryview(payload).nbytes
            helper.write(FRAME.pack(codec, wire))
            helper.write(payload)
            meter.delivered(wire)
            moved[0] += n
            bar.update(n)
        digest = h.hexdigest().encode()
        helper.write(FRAME.pack(END, len(digest)) + digest)
        result = _read_line(helper)
    if not result.get("ok"):
        msg = (
            f"{helper.target}:{info['target']} did not match {path} after the upload (sha256 "
            f"there {str(result.get('sha256'))[:12]}, {result.get('size')} bytes); the file "
            "changed while it was being sent, or the copy was corrupted: run the upload again"
        )
        raise TransferError(msg)


# -- download ------------------------------------------------------------------------------
def download(
    transport: Any,
    remote: str,
    local: str | None = None,
    *,
    cwd: str | None = None,
    compress: str | None = None,
    progress: bool | None = None,
    retries: int = RETRIES,
    via: str = "auto",
) -> Copied:
    """Copy *remote* (a file or a directory, recursively) from the host to *local*.

    The mirror of :func:`upload` (same parameters); *local* defaults to the source's name in
    the current directory, and an existing local directory receives a file under its own name.
    """
    mode = _check(compress)
    _check_via(via)
    req = {"src": remote, "base": _base(transport, cwd)}
    attempts = _Attempts(f"download of {transport.target}:{remote}", retries)
    meter = _compress.RateMeter()
    plan: dict | None = None
    targets: list[str] = []
    remaining: list[int] = []
    bar = None
    kind = ""
    started = time.monotonic()
    try:
        while plan is None or remaining:
            before = (len(remaining), _sizes(targets))
            helper = None
            try:
                left = None if plan is None else sum(_left(plan, targets, remaining))
                helper = _helper(transport, ["get", mode], via, left)
                _send_line(helper, req)
                answer = _read_line(helper)
                if left is None and not answer.get("missing"):
                    helper = _switch(transport, helper, ["get", mode], via, req, answer)
                kind = helper.kind
                if answer.get("missing"):
                    where = answer["src"]
                    msg = f"{remote} does not exist on {transport.target} (looked for {where})"
                    raise TransferError(msg)
                if plan is None:
                    plan = answer
                    targets = _targets(plan, local)
                    remaining = list(range(len(targets)))
                    total = sum(int(f["size"]) for f in plan["files"])
                    name = posixpath.basename(plan["src"].rstrip("/"))
                    bar = _progress(total, f"download {name}", progress)
                sizes = [int(f["size"]) for f in plan["files"]]
                for i in list(remaining):
                    done = sum(sizes[j] for j in range(i) if j not in remaining)
                    _get_one(helper, i, targets[i], plan["files"][i]["path"], bar, done, meter)
                    remaining.remove(i)
                helper.close_write()
            except (_Dropped, ColabMagicError, OSError) as exc:
                if isinstance(exc, _FINAL):
                    raise
                attempts.failed(exc, progressed=(len(remaining), _sizes(targets)) != before)
            finally:
                if helper is not None:
                    helper.close()
    finally:
        if bar is not None:
            bar.close()
    _warm(transport, via)
    total = sum(int(f["size"]) for f in plan["files"])
    _log("download", remote, transport.target, total, kind, started, attempts)
    return Copied(total, kind)


def _left(plan: dict, targets: list[str], remaining: list[int]) -> list[int]:
    """Bytes still to come per remaining file (less what its partial file holds)."""
    out = []
    for i in remaining:
        have = 0
        with contextlib.suppress(OSError):
            have = os.path.getsize(part_path(targets[i]))
        out.append(max(0, int(plan["files"][i]["size"]) - have))
    return out


def _switch(transport, helper: _Helper, args, via, req: dict, answer: dict) -> _Helper:
    """A download's first helper was chosen before its size was known: when it is an exec
    channel and the files are large, move to the ``ssh`` spare that :func:`_fresh` started
    meanwhile (its answer is the same plan)."""
    size = sum(int(f["size"]) for f in answer["files"])
    if helper.kind != "paramiko" or size < OPENSSH_MIN or via != "auto":
        return helper
    better = _take_spare(transport, ("openssh",), args)
    if better is None:
        return helper
    try:
        _send_line(better, req)
        again = _read_line(better)
    except _Dropped:
        better.close()
        return helper
    if again.get("files") != answer.get("files"):
        better.close()  # the source changed in between: go on with the first answer
        return helper
    helper.close()
    return better


def _targets(plan: dict, local: str | None) -> list[str]:
    name = posixpath.basename(plan["src"].rstrip("/"))
    dest = os.path.abspath(os.path.expanduser(local or name))
    if plan["is_dir"]:
        os.makedirs(dest, exist_ok=True)
        return [os.path.join(dest, *f["rel"].split("/")) for f in plan["files"]]
    if os.path.isdir(dest):
        dest = os.path.join(dest, name)
    return [dest]


def _sizes(targets: list[str]) -> int:
    """Bytes in the partial files so far (a retry that grew them made progress)."""
    total = 0
    for t in targets:
        with contextlib.suppress(OSError):
            total += os.path.getsize(part_path(t))
    return total


def part_path(target: str) -> str:
    """Where a file is written until it is verified: ``.NAME.colabmagic-part`` beside it."""
    head, tail = os.path.split(target)
    return os.path.join(head, f".{tail}{PART}")


def _get_one(helper, i, target, rpath, bar, done, meter) -> None:
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    part = part_path(target)
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    with open(part, "r+b" if offset else "w+b") as f:
        h, got = _hash_prefix(f, offset)
        _send_line(helper, {"i": i, "offset": got, "sha": h.hexdigest(), "rate": meter.rate or 0})
        head = _read_line(helper)
        start, size = int(head["offset"]), int(head["size"])
        if start != got:
            h = hashlib.sha256()  # our partial file did not match theirs: redone from 0
        f.truncate(start)
        f.seek(start)
        bar.n = done + start
        bar.refresh()
        meter.start()
        written = start
        while True:
            codec, n = FRAME.unpack(helper.read_exact(FRAME.size))
            payload = helper.read_exact(n)
            if codec == END:
                expected = bytes(payload).decode()
                break
            raw = _compress.decode(codec, payload, CHUNK)
            f.write(raw)
            h.update(raw)
            written += len(raw)
            meter.delivered(n)
            bar.update(len(raw))
        f.flush()
        os.fsync(f.fileno())
    if h.hexdigest() != expected or written != size:
        os.unlink(part)
        msg = (
            f"{target} did not match {helper.target}:{rpath} after the "
            f"download (sha256 here {h.hexdigest()[:12]}, there {expected[:12]}); the copy was "
            "corrupted: run the download again"
        )
        raise TransferError(msg)
    os.replace(part, target)
