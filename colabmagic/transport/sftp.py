"""File transfer for the SSH transport: SFTP on the shared connection, verified, with progress.

Files and directory trees go both ways. Reads use paramiko's concurrent prefetch and writes are
pipelined, both with 255 KiB requests (the largest OpenSSH's sftp-server accepts; paramiko's
default of 32 KiB is several times slower). Every file's size is checked, and its sha256 is
computed on this side while it streams and on the host by a one-shot ``python -c`` (run
concurrently with a download), so a transfer either arrives intact or raises
:class:`~colabmagic.errors.TransferError`. Progress is a tqdm bar (bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import stat
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import paramiko

from colabmagic.errors import ColabMagicError, TransferError

if TYPE_CHECKING:
    from colabmagic.transport.ssh import SSHTransport

REQUEST = 255 * 1024
CONCURRENCY = 64
CHUNK = 4 << 20

_HASH = r"""
import hashlib, json, sys
out = {}
for p in json.load(sys.stdin):
    h = hashlib.sha256()
    try:
        with open(p, "rb") as f:
            for b in iter(lambda: f.read(1 << 22), b""):
                h.update(b)
        out[p] = h.hexdigest()
    except OSError as e:
        out[p] = "error: " + str(e)
print(json.dumps(out))
"""


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


def _remote_hashes(transport: SSHTransport, paths: list[str]) -> dict[str, str]:
    if not paths:
        return {}
    cmd = transport._command(["-c", _HASH])
    rc, out, err = transport.exec(cmd, stdin=json.dumps(paths).encode(), timeout=3600)
    try:
        return json.loads(out.decode())
    except ValueError:
        detail = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {rc}"]
        msg = f"could not checksum the files on {transport.target}: {detail[0]}"
        raise TransferError(msg) from None


def _remote_base(sftp: paramiko.SFTPClient, cwd: str | None) -> tuple[str, str]:
    home = sftp.normalize(".")
    return home, cwd or home


def _remote_path(path: str, home: str, base: str) -> str:
    if path == "~" or path.startswith("~/"):
        path = home + path[1:]
    return posixpath.normpath(posixpath.join(base, path))


def _is_dir(sftp: paramiko.SFTPClient, path: str) -> bool | None:
    try:
        return stat.S_ISDIR(sftp.stat(path).st_mode or 0)
    except OSError:
        return None


def _makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
    parts = []
    while _is_dir(sftp, path) is None and path not in ("/", ""):
        parts.append(path)
        path = posixpath.dirname(path)
    for d in reversed(parts):
        try:
            sftp.mkdir(d)
        except OSError as exc:
            if _is_dir(sftp, d) is not True:
                msg = f"cannot create the remote directory {d}: {exc}"
                raise TransferError(msg) from None


def _local_files(src: str) -> Iterator[tuple[str, str, int]]:
    """(absolute path, path relative to src's parent-or-self, size) of every file."""
    if os.path.isfile(src):
        yield src, "", os.path.getsize(src)
        return
    for root, dirs, files in os.walk(src):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(root, name)
            yield p, os.path.relpath(p, src), os.path.getsize(p)


def upload(
    transport: SSHTransport,
    local: str,
    remote: str | None,
    *,
    cwd: str | None = None,
    progress: bool | None = None,
) -> int:
    """Copy *local* (file or directory) to *remote* on the host; returns the bytes copied.

    A relative *remote* is taken from *cwd* (the kernel's directory) or the remote home; an
    existing remote directory receives the file under its own name.
    """
    src = os.path.abspath(os.path.expanduser(local))
    if not os.path.exists(src):
        msg = f"{local} does not exist here; give an existing file or directory"
        raise TransferError(msg)
    sftp = transport.sftp()
    home, base = _remote_base(sftp, cwd)
    dest = _remote_path(remote or os.path.basename(src.rstrip("/")), home, base)
    files = list(_local_files(src))
    if os.path.isfile(src):
        if _is_dir(sftp, dest):
            dest = posixpath.join(dest, os.path.basename(src))
        plan = [(src, dest, files[0][2])]
    else:
        plan = [(p, posixpath.join(dest, *rel.split(os.sep)), n) for p, rel, n in files]
        _makedirs(sftp, dest)
    total = sum(n for _, _, n in plan)
    digests: dict[str, str] = {}
    made = {dest}
    try:
        with _progress(total, f"upload {os.path.basename(src)}", progress) as bar:
            for path, rpath, size in plan:
                parent = posixpath.dirname(rpath)
                if parent not in made:
                    _makedirs(sftp, parent)
                    made.add(parent)
                digests[rpath] = _put(sftp, path, rpath, size, bar)
    except (OSError, paramiko.SSHException, EOFError) as exc:
        if isinstance(exc, ColabMagicError):
            raise
        msg = f"upload of {local} to {transport.target}:{dest} failed: {exc}"
        raise TransferError(msg) from None
    _verify(digests, _remote_hashes(transport, list(digests)), transport.target)
    return total


def _put(sftp: paramiko.SFTPClient, path: str, rpath: str, size: int, bar) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as src, sftp.open(rpath, "wb") as f:
        f.MAX_REQUEST_SIZE = REQUEST
        f.set_pipelined(True)
        sent = 0
        while True:
            block = src.read(CHUNK)
            if not block:
                break
            h.update(block)
            f.write(block)
            sent += len(block)
            bar.update(len(block))
        f.flush()
    got = sftp.stat(rpath).st_size
    if got != sent or sent != size:
        msg = f"{rpath} on the host has {got} bytes after the upload, expected {size}"
        raise TransferError(msg)
    return h.hexdigest()


def download(
    transport: SSHTransport,
    remote: str,
    local: str | None,
    *,
    cwd: str | None = None,
    progress: bool | None = None,
) -> int:
    """Copy *remote* (file or directory) from the host to *local*; returns the bytes copied."""
    sftp = transport.sftp()
    home, base = _remote_base(sftp, cwd)
    src = _remote_path(remote, home, base)
    kind = _is_dir(sftp, src)
    if kind is None:
        msg = f"{remote} does not exist on {transport.target} (looked for {src})"
        raise TransferError(msg)
    dest = os.path.abspath(os.path.expanduser(local or posixpath.basename(src.rstrip("/"))))
    if kind:
        plan = [(r, os.path.join(dest, *rel.split("/")), n) for r, rel, n in _walk(sftp, src)]
    else:
        if os.path.isdir(dest):
            dest = os.path.join(dest, posixpath.basename(src))
        plan = [(src, dest, sftp.stat(src).st_size or 0)]
    total = sum(n for _, _, n in plan)
    remote_digests: dict[str, str] = {}
    failure: list[BaseException] = []

    def checksum() -> None:
        try:
            remote_digests.update(_remote_hashes(transport, [r for r, _, _ in plan]))
        except ColabMagicError as exc:
            failure.append(exc)

    hasher = threading.Thread(target=checksum, daemon=True)
    hasher.start()
    digests: dict[str, str] = {}
    try:
        with _progress(total, f"download {posixpath.basename(src)}", progress) as bar:
            for rpath, path, size in plan:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                digests[rpath] = _get(sftp, rpath, path, size, bar)
    except (OSError, paramiko.SSHException, EOFError) as exc:
        if isinstance(exc, ColabMagicError):
            raise
        msg = f"download of {transport.target}:{src} failed: {exc}"
        raise TransferError(msg) from None
    finally:
        hasher.join()
    if failure:
        raise failure[0]
    _verify(digests, remote_digests, transport.target)
    return total


def _walk(sftp: paramiko.SFTPClient, top: str) -> Iterator[tuple[str, str, int]]:
    todo = [top]
    while todo:
        d = todo.pop()
        for a in sorted(sftp.listdir_attr(d), key=lambda a: a.filename):
            p = posixpath.join(d, a.filename)
            if stat.S_ISDIR(a.st_mode or 0):
                todo.append(p)
            elif stat.S_ISREG(a.st_mode or 0):
                yield p, posixpath.relpath(p, top), a.st_size or 0


def _get(sftp: paramiko.SFTPClient, rpath: str, path: str, size: int, bar) -> str:
    h = hashlib.sha256()
    got = 0
    with sftp.open(rpath, "rb") as f, open(path, "wb") as out:
        f.MAX_REQUEST_SIZE = REQUEST
        if size:
            f.prefetch(size, CONCURRENCY)
        while got < size:
            block = f.read(min(CHUNK, size - got))
            if not block:
                break
            h.update(block)
            out.write(block)
            got += len(block)
            bar.update(len(block))
    if got != size or os.path.getsize(path) != size:
        msg = f"{path} has {got} bytes after the download, expected {size}"
        raise TransferError(msg)
    return h.hexdigest()


def _verify(local: dict[str, str], remote: dict[str, str], target: str) -> None:
    for rpath, digest in local.items():
        theirs = remote.get(rpath, "missing")
        if theirs != digest:
            msg = f"checksum mismatch for {target}:{rpath} (sha256 here {digest[:12]}, there "
            msg += f"{theirs[:24]}); the copy is corrupt, retry the transfer"
            raise TransferError(msg)
