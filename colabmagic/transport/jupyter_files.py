"""Files to and from a Jupyter server: the contents API, chunked, resumable, with a progress bar.

Upload: ``PUT /api/contents/PATH`` in base64 chunks (``chunk`` 1, 2, ..., -1: the server's large
file protocol; the first chunk creates the file, the others append). When a chunk fails (a dropped
connection), the upload asks the server for the file's size and goes on from there: a chunk that
landed is not sent twice, one that did not is sent again. Download: ``GET /files/PATH`` in byte
ranges into ``NAME.part``, resumed from its size after a drop, renamed when complete. Directories
are walked. Paths on the server are relative to its root directory (the kernels' default cwd).
"""

from __future__ import annotations

import base64
import logging
import os
import posixpath
import time
import urllib.parse

from colabmagic.errors import ConnectError, TransferError
from colabmagic.transport.jupyter import TokenRefused

log = logging.getLogger("colabmagic.jupyter")

CHUNK = 8 << 20
RETRY_FOR = 120.0  # seconds to keep retrying a transfer whose connection drops


def _api(path: str) -> str:
    return "api/contents/" + urllib.parse.quote(path.strip("/"))


def _remote_path(remote: str) -> str:
    if remote.startswith(("/", "~")):
        msg = (
            f"{remote!r}: give a path relative to the Jupyter server's root directory "
            "(where its kernels start), not an absolute one"
        )
        raise TransferError(msg)
    path = posixpath.normpath(remote or ".")
    if path == ".." or path.startswith("../"):
        msg = f"{remote!r} leaves the Jupyter server's root directory; give a path inside it"
        raise TransferError(msg)
    return "" if path == "." else path


def _model(rest, path: str) -> dict | None:
    try:
        return rest.request("GET", _api(path) + "?content=0")
    except FileNotFoundError:
        return None


def _retrying(what: str, fn, *args):
    """Call *fn* until it works, for up to RETRY_FOR seconds of connection failures."""
    deadline = time.monotonic() + RETRY_FOR
    delay = 0.2
    while True:
        try:
            return fn(*args)
        except ConnectError as exc:
            if isinstance(exc, TokenRefused) or time.monotonic() > deadline:
                msg = f"{what} failed: {exc}"
                raise TransferError(msg) from None
            log.info("%s: %s; retrying", what, exc)
            time.sleep(delay)  # backoff between attempts on a dropped connection
            delay = min(delay * 2, 5.0)


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False, disable=None)


# -- upload ---------------------------------------------------------------------------------
def upload(rest, local: str, remote: str | None, *, chunk: int = CHUNK) -> int:
    """Copy a local file or tree to *remote* on the server; returns the bytes sent."""
    src = os.path.abspath(os.path.expanduser(local))
    if not os.path.exists(src):
        msg = f"{src} does not exist; give an existing file or directory"
        raise TransferError(msg)
    dest = _remote_path(remote if remote is not None else os.path.basename(src.rstrip("/")))
    existing = _retrying("checking the destination", _model, rest, dest) if dest else None
    if dest == "" or (existing and existing.get("type") == "directory"):
        dest = posixpath.join(dest, os.path.basename(src.rstrip("/")))
    parent = posixpath.dirname(dest)
    if parent:
        _makedirs(rest, parent)
    if os.path.isfile(src):
        return upload_file(rest, src, dest, chunk=chunk)
    total = 0
    for root, dirs, files in os.walk(src):
        rel = os.path.relpath(root, src)
        base = dest if rel == "." else posixpath.join(dest, *rel.split(os.sep))
        _mkdir(rest, base)
        dirs.sort()
        for name in sorted(files):
            total += upload_file(rest, os.path.join(root, name), posixpath.join(base, name))
    return total


def _makedirs(rest, path: str) -> None:
    """Create *path* and its missing parents on the server."""
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        _mkdir(rest, "/".join(parts[:i]))


def _mkdir(rest, path: str) -> None:
    model = _retrying(f"checking {path}", _model, rest, path)
    if model is None:
        _retrying(f"creating {path}", rest.request, "PUT", _api(path), {"type": "directory"})
    elif model.get("type") != "directory":
        msg = f"{path} exists on the server and is not a directory"
        raise TransferError(msg)


def upload_file(rest, src: str, dest: str, *, chunk: int = CHUNK) -> int:
    """Upload one file in chunks, resuming after dropped connections; returns its size."""
    size = os.path.getsize(src)
    name = posixpath.basename(dest)
    with open(src, "rb") as f, _bar(size, name) as bar:
        if size <= chunk:
            body = {"type": "file", "format": "base64", "name": name, "path": dest}
            body["content"] = base64.b64encode(f.read()).decode()
            _retrying(f"uploading {dest}", rest.request, "PUT", _api(dest), body)
            bar.update(size)
        else:
            _upload_chunks(rest, f, dest, size, chunk, bar)
    model = _retrying(f"checking {dest}", _model, rest, dest)
    if model is None or model.get("size") not in (None, size):
        got = None if model is None else model.get("size")
        msg = f"upload of {src} to {dest} is incomplete ({got} of {size} bytes); retry it"
        raise TransferError(msg)
    return size


def _upload_chunks(rest, f, dest: str, size: int, chunk: int, bar) -> None:
    offset, number = 0, 1
    deadline = time.monotonic() + RETRY_FOR
    while offset < size:
        f.seek(offset)
        data = f.read(chunk)
        last = offset + len(data) >= size
        body = {
            "type": "file",
            "format": "base64",
            "name": posixpath.basename(dest),
            "path": dest,
            "chunk": -1 if last else number,
            "content": base64.b64encode(data).decode(),
        }
        try:
            rest.request("PUT", _api(dest), body)
        except ConnectError as exc:
            if isinstance(exc, TokenRefused) or time.monotonic() > deadline:
                msg = f"upload of {dest} failed at byte {offset}: {exc}"
                raise TransferError(msg) from None
            offset, number = _resume_point(rest, dest, offset, len(data), number)
            bar.n = offset
            bar.refresh()
            continue
        offset += len(data)
        number += 1
        bar.update(len(data))
        deadline = time.monotonic() + RETRY_FOR


def _resume_point(rest, dest: str, offset: int, length: int, number: int) -> tuple[int, int]:
    """Where to go on after chunk *number* (at *offset*) failed: after it, at it, or anew."""
    time.sleep(0.2)  # let the link come back before asking
    try:
        model = _model(rest, dest) if number > 1 else None
    except ConnectError:
        return offset, number
    have = (model or {}).get("size")
    if have == offset + length:
        log.info("upload of %s: chunk %d had landed; going on", dest, number)
        return offset + length, number + 1
    if have == offset:
        return offset, number
    if number > 1:
        log.info("upload of %s: partial chunk on the server; starting again", dest)
    return 0, 1


# -- download -------------------------------------------------------------------------------
def download(rest, remote: str, local: str | None, *, chunk: int = CHUNK) -> int:
    """Copy a file or tree from the server to *local*; returns the bytes received."""
    src = _remote_path(remote)
    model = _retrying(f"checking {src}", _model, rest, src)
    if model is None:
        msg = f"{src} does not exist on the server"
        raise TransferError(msg)
    dest = os.path.abspath(os.path.expanduser(local or posixpath.basename(src) or "."))
    if model.get("type") != "directory":
        if os.path.isdir(dest):
            dest = os.path.join(dest, posixpath.basename(src))
        return download_file(rest, src, dest, int(model.get("size") or 0), chunk=chunk)
    total = 0
    os.makedirs(dest, exist_ok=True)
    listing = _retrying(f"listing {src}", rest.request, "GET", _api(src) + "?content=1")
    for entry in sorted(listing.get("content") or [], key=lambda e: e["name"]):
        total += download(rest, entry["path"], os.path.join(dest, entry["name"]), chunk=chunk)
    return total


def download_file(rest, src: str, dest: str, size: int, *, chunk: int = CHUNK) -> int:
    """Download one file by byte ranges into ``dest.part``, resuming after drops."""
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    part = dest + ".part"
    url = "files/" + urllib.parse.quote(src)
    with open(part, "ab") as f, _bar(size, posixpath.basename(src)) as bar:
        if f.tell() > size:  # a leftover of another version of the file
            f.truncate(0)
        bar.update(f.tell())
        deadline = time.monotonic() + RETRY_FOR
        while f.tell() < size:
            start = f.tell()
            end = min(start + chunk, size) - 1
            try:
                data = rest.request("GET", url, headers={"Range": f"bytes={start}-{end}"}, raw=True)
            except ConnectError as exc:
                if time.monotonic() > deadline:
                    msg = f"download of {src} failed at byte {start}: {exc}"
                    raise TransferError(msg) from None
                time.sleep(0.2)  # let the link come back before the next range
                continue
            if len(data) != end - start + 1:
                msg = f"download of {src}: the server sent {len(data)} bytes for a range"
                raise TransferError(msg)
            f.write(data)
            bar.update(len(data))
            deadline = time.monotonic() + RETRY_FOR
    if os.path.getsize(part) != size:
        msg = f"download of {src} is incomplete; retry it"
        raise TransferError(msg)
    os.replace(part, dest)
    return size
