"""Files to and from the host: resumable, sha256-verified, atomic, compressed where it pays.

``%colab_upload`` / ``%colab_download`` and ``Session.upload`` / ``Session.download`` land here
(through the transport). Each file streams over one exec channel of the SSH connection (or a
local subprocess for ``--local``) to a small stdlib helper on the host,
``colabmagic/remote/files.py``: a stream of frames, each a chunk of the file, raw or zstd
(:mod:`colabmagic.compress` decides per chunk), then the file's sha256.

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
  ~340 ms). A copy right after another waits for the spare, which started first. A spare that
  died with its connection is skipped; the transport's ``close`` ends it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
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
from colabmagic.errors import ColabMagicError, TransferError
from colabmagic.remote.files import _hash_prefix, tree  # one copy: the host's helper alike

FRAME = struct.Struct("!BQ")
END = 255
CHUNK = 4 << 20
RETRIES = 8
SLACK = 4 << 20  # what the SSH window and socket buffers take before a writer feels the link
PART = ".colabmagic-part"
_HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote", "files.py")


class _Dropped(Exception):
    """The helper's stream broke (the link dropped, the process died)."""


def _source() -> str:
    with open(_HELPER) as f:
        return f.read()


class _Helper:
    """One run of the host-side helper: a byte stream each way and an exit status."""

    def __init__(self, transport: Any, args: list[str]):
        self.target = transport.target
        self._buf = bytearray()
        if hasattr(transport, "_session_channel"):  # SSH: an exec channel on the connection
            self.chan = transport._session_channel()
            self.proc = None
            try:
                self.chan.exec_command(transport._command(["-c", _source(), *args]))
            except Exception as exc:  # noqa: BLE001 - paramiko raises several kinds
                self.chan.close()
                raise _Dropped(str(exc)) from None
        else:  # the same helper as a local subprocess
            self.chan = None
            self.proc = subprocess.Popen(
                [transport.python, "-c", _source(), *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )

    def alive(self) -> bool:
        if self.chan is not None:
            return not self.chan.closed and not self.chan.exit_status_ready()
        return self.proc.poll() is None

    def write(self, data) -> None:
        try:
            if self.chan is not None:
                self.chan.sendall(data)
            else:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
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
                data = self.proc.stdout.read1(n)
        except Exception as exc:  # noqa: BLE001
            msg = f"read failed: {exc}"
            raise _Dropped(msg) from None
        if not data:
            raise _Dropped(self._why())
        return data

    def _more(self, n: int) -> None:
        self._buf += self._recv(max(n, 1 << 20))

    def read_exact(self, n: int) -> bytes:
        if len(self._buf) >= n:
            out = bytes(self._buf[:n])
            del self._buf[:n]
            return out
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

    def _why(self) -> str:
        err = b""
        with contextlib.suppress(Exception):
            if self.chan is not None:
                while self.chan.recv_stderr_ready():
                    err += self.chan.recv_stderr(65536)
            else:
                self.proc.wait(5)
                err = self.proc.stderr.read()
        lines = err.decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else "the stream ended early"

    def close(self) -> None:
        if self.chan is not None:
            with contextlib.suppress(Exception):
                self.chan.close()
            return
        for s in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                s.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


SPARE_WAIT = 10.0  # seconds a copy waits for a spare still starting, before starting its own
_spares: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # transport -> Future
_spares_lock = threading.Lock()


def _helper(transport: Any, args: list[str]) -> _Helper:
    """A helper running *args*: the transport's spare (waited for: it started before a fresh
    one would), else a fresh one."""
    with _spares_lock:
        fut = _spares.pop(transport, None)
    spare = None
    if fut is not None:
        try:
            spare = fut.result(timeout=SPARE_WAIT)
        except Exception:  # noqa: BLE001 - it failed or hangs: a fresh helper instead
            fut.add_done_callback(_close_started)
    if spare is not None:
        if spare.alive():
            try:
                _send_line(spare, {"argv": args})
                return spare
            except _Dropped:
                pass
        spare.close()
    return _Helper(transport, args)


def _close_started(fut: Future) -> None:
    if fut.exception() is None:
        fut.result().close()


def _warm(transport: Any) -> None:
    """Start a spare helper for *transport*'s next copy, in the background."""
    with _spares_lock:
        if transport in _spares:
            return
        fut: Future = Future()
        _spares[transport] = fut

    def start() -> None:
        helper = None
        try:
            helper = _Helper(transport, ["serve"])
            _read_line(helper)  # {"ready": true}: the host's session and Python are up
            fut.set_result(helper)
        except Exception as exc:  # noqa: BLE001 - the next copy starts its own helper
            if helper is not None:
                helper.close()
            fut.set_exception(exc)

    threading.Thread(target=start, name="colabmagic-file-spare", daemon=True).start()


def wait_spare(transport: Any, timeout: float = 30.0) -> bool:
    """Wait until *transport*'s spare helper is up; False when there is none (or it failed)."""
    with _spares_lock:
        fut = _spares.get(transport)
    if fut is None:
        return False
    try:
        fut.result(timeout=timeout)
    except Exception:  # noqa: BLE001
        return False
    return True


def close_spare(transport: Any) -> None:
    """End *transport*'s spare helper, if any (its ``close`` calls this)."""
    with _spares_lock:
        fut = _spares.pop(transport, None)
    if fut is not None:
        fut.add_done_callback(_close_started)


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
) -> int:
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

    Returns
    -------
    int
        The bytes of file content copied (the whole size, resumed parts included).
    """
    mode = _check(compress)
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
    with _progress(total, f"upload {req['name']}", progress) as bar:
        while remaining:
            before = (len(remaining), moved[0])
            helper = None
            try:
                helper = _helper(transport, ["put"])
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
                if isinstance(exc, TransferError):
                    raise
                attempts.failed(exc, progressed=(len(remaining), moved[0]) != before)
            finally:
                if helper is not None:
                    helper.close()
    _warm(transport)
    return total


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
) -> int:
    """Copy *remote* (a file or a directory, recursively) from the host to *local*.

    The mirror of :func:`upload` (same parameters); *local* defaults to the source's name in
    the current directory, and an existing local directory receives a file under its own name.
    """
    mode = _check(compress)
    req = {"src": remote, "base": _base(transport, cwd)}
    attempts = _Attempts(f"download of {transport.target}:{remote}", retries)
    meter = _compress.RateMeter()
    plan: dict | None = None
    targets: list[str] = []
    remaining: list[int] = []
    bar = None
    try:
        while plan is None or remaining:
            before = (len(remaining), _sizes(targets))
            helper = None
            try:
                helper = _helper(transport, ["get", mode])
                _send_line(helper, req)
                answer = _read_line(helper)
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
                if isinstance(exc, TransferError):
                    raise
                attempts.failed(exc, progressed=(len(remaining), _sizes(targets)) != before)
            finally:
                if helper is not None:
                    helper.close()
    finally:
        if bar is not None:
            bar.close()
    _warm(transport)
    return sum(int(f["size"]) for f in plan["files"])


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
                expected = payload.decode()
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
