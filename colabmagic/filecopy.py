"""Files to and from the host: resumable, sha256-verified, atomic, compressed where it pays.

``%colab_upload`` / ``%colab_download`` and ``Session.upload`` / ``Session.download`` land here
(through the transport). Each copy streams to a small stdlib helper on the host,
``colabmagic/remote/files.py``: a stream of frames, each a chunk of the file, raw or zstd
(:mod:`colabmagic.compress` decides per chunk), then the file's sha256. What carries the stream
(``via``, reported on the result as :class:`Copied`) is :mod:`colabmagic.hosthelper`'s choice:
the **OpenSSH client** (``ssh HOST python -c HELPER``) for a copy of
:data:`~colabmagic.hosthelper.OPENSSH_MIN` bytes or more, or whenever a spare ``ssh`` helper is
ready, since it costs this side about half the CPU of paramiko; otherwise an **exec channel** of
the session's paramiko connection, which is also the fallback when ``ssh`` is not on PATH or
fails to start where paramiko works (logged; ``ssh`` is not tried again on that transport). A
host key other than the one the connection verified is a
:class:`~colabmagic.errors.HostKeyError`, never a fallback. ``--local`` runs the helper as a
local subprocess.

- **Atomic**: a file is written as ``.NAME.colabmagic-part`` beside its target and renamed only
  when its sha256 matches the source's; a target never holds half a file.
- **Resumable**: after a drop the partial file stays; the next attempt (automatic, with a new
  connection, up to ``retries`` times without progress; or the next call) hashes the partial
  file on both sides and continues from its end when the hashes match, or starts that file
  again when they do not (a corrupted partial file is redone, never trusted).
- **Progress**: a tqdm bar in bytes, with rate and ETA.
- Directories are copied recursively, each file atomically.
- **A spare helper** (:func:`colabmagic.hosthelper.warm`): after each copy one is started in
  the background, so the next copy on that transport skips the ~0.3 s an exec costs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import struct
import time
from typing import Any

from colabmagic import compress as _compress
from colabmagic import hosthelper
from colabmagic.errors import ColabMagicError, HostKeyError, ParameterError, TransferError
from colabmagic.remote.files import _hash_prefix, tree  # one copy: the host's helper alike

log = logging.getLogger("colabmagic.files")

FRAME = struct.Struct("!BQ")
RAW = _compress.RAW
END = 255
CHUNK = 4 << 20
SLICE = 1 << 18  # raw data goes in frames this small: read, hashed and sent while in cache
RETRIES = 8
SLACK = 4 << 20  # what the SSH window and socket buffers take before a writer feels the link
PART = ".colabmagic-part"


class Copied(int):
    """The bytes a copy moved (an ``int``), with ``via``: what carried them, ``"openssh"`` (the
    ``ssh`` client), ``"paramiko"`` (an exec channel on the session's connection) or
    ``"local"`` (a subprocess, for ``--local``)."""

    via: str

    def __new__(cls, n: int, via: str) -> Copied:
        self = super().__new__(cls, n)
        self.via = via
        return self


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
                helper = hosthelper.acquire(transport, ["put"], via, left)
                kind = helper.kind
                hosthelper.send_line(helper, req)
                plan = hosthelper.read_line(helper)
                peer = bool(plan.get("zstd"))
                for i in list(remaining):
                    done = sum(files[j][2] for j in range(i) if j not in remaining)
                    _put_one(
                        helper, i, files[i], plan["files"][i], mode, peer, bar, done, meter, moved
                    )
                    remaining.remove(i)
                helper.close_write()
            except (hosthelper.Dropped, ColabMagicError, OSError) as exc:
                if isinstance(exc, _FINAL):
                    raise
                attempts.failed(exc, progressed=(len(remaining), moved[0]) != before)
            finally:
                if helper is not None:
                    helper.close()
    hosthelper.warm(transport, via)
    _log("upload", local, transport.target, total, kind, started, attempts)
    return Copied(total, kind)


# Errors a retry cannot mend: said at once, not after the retries.
_FINAL = (TransferError, HostKeyError, ParameterError)


def _check_via(via: str) -> None:
    if via not in hosthelper.VIAS:
        msg = f"via={via!r} is not one of {', '.join(hosthelper.VIAS)}"
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
        hosthelper.send_line(helper, {"i": i, "offset": offset, "sha": h.hexdigest()})
        start = int(hosthelper.read_line(helper)["offset"])
        if start != offset:
            h = hashlib.sha256()  # the partial file there did not match: it is redone
        f.seek(start)
        bar.n = done + start
        bar.refresh()
        chooser = _compress.Chooser(mode, meter, peer_zstd=peer)
        meter.start()
        view = memoryview(bytearray(CHUNK))

        def send(codec: int, payload, n: int) -> None:
            wire = memoryview(payload).nbytes
            helper.write(FRAME.pack(codec, wire))
            helper.write(payload)
            meter.delivered(wire)
            moved[0] += n
            bar.update(n)

        raw_left = 0  # bytes of the chunk last decided raw, not yet read
        while True:
            if raw_left <= 0 and chooser.due():  # decide the next CHUNK on a sample of its middle
                at = f.tell() + CHUNK // 2 - _compress.SAMPLE // 2
                if chooser.decide(os.pread(f.fileno(), _compress.SAMPLE, at), CHUNK):
                    n = f.readinto(view)
                    if not n:
                        break
                    h.update(view[:n])
                    send(*chooser.compress(view[:n]), n)
                    continue
                raw_left = CHUNK
            n = f.readinto(view[:SLICE])  # raw: read, hash and send a slice while it is in cache
            if not n:
                break
            h.update(view[:n])
            chooser.sent_raw(n)
            send(RAW, view[:n], n)
            raw_left -= n
        digest = h.hexdigest().encode()
        helper.write(FRAME.pack(END, len(digest)) + digest)
        result = hosthelper.read_line(helper)
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
                helper = hosthelper.acquire(transport, ["get", mode], via, left)
                hosthelper.send_line(helper, req)
                answer = hosthelper.read_line(helper)
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
            except (hosthelper.Dropped, ColabMagicError, OSError) as exc:
                if isinstance(exc, _FINAL):
                    raise
                attempts.failed(exc, progressed=(len(remaining), _sizes(targets)) != before)
            finally:
                if helper is not None:
                    helper.close()
    finally:
        if bar is not None:
            bar.close()
    hosthelper.warm(transport, via)
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


def _switch(
    transport, helper: hosthelper.Helper, args, via, req: dict, answer: dict
) -> hosthelper.Helper:
    """A download's first helper was chosen before its size was known: when it is an exec
    channel and the files are large, move to the ``ssh`` spare that :func:`hosthelper.fresh` started
    meanwhile (its answer is the same plan)."""
    size = sum(int(f["size"]) for f in answer["files"])
    if helper.kind != "paramiko" or size < hosthelper.OPENSSH_MIN or via != "auto":
        return helper
    better = hosthelper.take_spare(transport, ("openssh",), args)
    if better is None:
        return helper
    try:
        hosthelper.send_line(better, req)
        again = hosthelper.read_line(better)
    except hosthelper.Dropped:
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
        hosthelper.send_line(
            helper, {"i": i, "offset": got, "sha": h.hexdigest(), "rate": meter.rate or 0}
        )
        head = hosthelper.read_line(helper)
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
