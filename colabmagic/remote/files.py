"""The host side of ``%colab_upload`` / ``%colab_download``: one short-lived process per step.

``colabmagic/filecopy.py`` runs this file's source with ``python -c SOURCE COMMAND ...`` over an
SSH exec channel (or as a local subprocess), so it must stay self-contained: standard library,
plus zstandard when the host has it. Two file commands, each a session over stdin/stdout that
carries a whole tree, so a directory costs one exec and a few round trips per file (JSON lines
for the dialogue, frames for the data). ``serve`` starts a spare: it answers ``{"ready": true}``
once up, then reads its command as a JSON line ``{"argv": ["put"]}``:

``put``   in: the plan request ``{"dest", "base", "name", "is_dir", "files": [{"rel", "size"}]}``;
          out: where each file goes and the size of any partial file left by an interrupted
          upload (``.NAME.colabmagic-part`` beside the target). Then per file, in:
          ``{"i", "offset", "sha"}`` (the sender's sha256 of its first *offset* bytes); the
          partial file is checked against it (else redone from 0) and the offset used comes
          back; then frames (``!BQ`` codec + length, payload; codec 1 = zstd) while hashing; a
          codec-255 frame carries the expected sha256: on a match the partial file is renamed
          to its target (atomic) and ``{"ok": true}`` comes back, else it is deleted. A stream
          that ends early keeps the partial file for the next resume.
``get MODE``
          in: ``{"src", "base"}``; out: the files under it with sizes. Then per file, in:
          ``{"i", "offset", "sha", "rate"}``; out: ``{"offset", "size"}`` (0 when the
          receiver's partial file does not match), the frames from there (compressed per MODE:
          none, zstd, or auto at *rate* bytes/s), and a codec-255 frame with the file's sha256.
``relay`` carries a push or pull straight to the kernel (``colabmagic/transfer_direct.py``):
          in: ``{"path", "pass"}``, the kernel's Unix socket; out: ``{"ok": true}`` once
          connected (or ``{"error"}``). With ``pass`` (the kernel said it can take them) stdin
          and stdout themselves are handed to the kernel over the socket (SCM_RIGHTS): it
          reads and writes sshd's pipes directly and closes the socket when done, which ends
          this process (``"passed": true`` in the answer). Otherwise stdin is spliced to the
          socket and the socket to stdout, byte for byte, until the kernel closes it.
"""

import contextlib
import hashlib
import json
import os
import socket
import struct
import sys
import threading
import time

try:
    import zstandard
except ImportError:
    zstandard = None

FRAME = struct.Struct("!BQ")
END = 255
CHUNK = 4 << 20
_RESAMPLE = 8  # a sampled chunk that did not pay: this many chunks' worth raw, itself included
SLICE = 1 << 18  # a raw frame read from a mapping: hashed, then sent while still in cache
PART = ".colabmagic-part"


def _resolve(path, base):
    path = os.path.expanduser(path)
    return os.path.normpath(os.path.join(base or os.path.expanduser("~"), path))


def part_path(target):
    head, tail = os.path.split(target)
    return os.path.join(head, "." + tail + PART)


def plan_put(req):
    dest = _resolve(req["dest"] or req["name"], req.get("base"))
    if not req["is_dir"] and os.path.isdir(dest):
        dest = os.path.join(dest, req["name"])
    if req["is_dir"]:
        os.makedirs(dest, exist_ok=True)
    out = []
    for f in req["files"]:
        target = os.path.join(dest, *f["rel"].split("/")) if req["is_dir"] else dest
        try:
            part = os.path.getsize(part_path(target))
        except OSError:
            part = 0
        out.append({"target": target, "part": part if part <= f["size"] else 0})
    return {"dest": dest, "files": out, "zstd": zstandard is not None}


def plan_get(req):
    src = _resolve(req["src"], req.get("base"))
    if os.path.isfile(src):
        return {
            "src": src,
            "is_dir": False,
            "files": [{"path": src, "rel": "", "size": _size(src)}],
        }
    if not os.path.isdir(src):
        return {"src": src, "missing": True}
    files = [{"path": p, "rel": rel, "size": _size(p)} for p, rel in tree(src)]
    return {"src": src, "is_dir": True, "files": files, "zstd": zstandard is not None}


def tree(src):
    """``(path, path relative to src with /)`` of every file under directory *src*, sorted.

    The client walks a local directory for an upload with this too, so both sides list alike.
    """
    for root, dirs, names in os.walk(src):
        dirs.sort()
        for name in sorted(names):
            p = os.path.join(root, name)
            if os.path.isfile(p):
                yield p, os.path.relpath(p, src).replace(os.sep, "/")


def _size(path):
    return os.path.getsize(path)


def _hash_prefix(f, n):
    h = hashlib.sha256()
    f.seek(0)
    left = n
    while left > 0:
        block = f.read(min(CHUNK, left))
        if not block:
            break
        h.update(block)
        left -= len(block)
    return h, n - left


_BUF = [bytearray(CHUNK)]


def _read_exact(stream, n):
    """The next *n* bytes, in a buffer that the next call reuses (None at end of stream)."""
    if len(_BUF[0]) < n:
        _BUF[0] = bytearray(n)
    view = memoryview(_BUF[0])[:n]
    got = 0
    while got < n:
        k = stream.readinto(view[got:])
        if not k:
            return None
        got += k
    return view


def _grow_pipes():
    """Ask for 1 MiB pipes on stdin/stdout (Linux; sshd gives 64 KiB): fewer, larger reads."""
    try:
        import fcntl

        for fd in (0, 1):
            fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except (ImportError, OSError, ValueError):
        pass


def _lock(f, timeout=60.0):
    """Wait until no earlier ``put`` (from before a drop, not yet told) writes this file."""
    import fcntl

    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _line(stdin):
    raw = stdin.readline()
    return json.loads(raw) if raw.strip() else None


def _reply(out, obj):
    out.write((json.dumps(obj) + "\n").encode())
    out.flush()


def serve_put():
    stdin, out = sys.stdin.buffer, sys.stdout.buffer
    req = _line(stdin)
    plan = plan_put(req)
    _reply(out, plan)
    while True:
        cmd = _line(stdin)
        if cmd is None:
            return 0
        i = int(cmd["i"])
        size = int(req["files"][i]["size"])
        result = put(stdin, out, plan["files"][i]["target"], size, int(cmd["offset"]), cmd["sha"])
        if result is None:
            return 1  # the link dropped: what was written stays for the next resume
        _reply(out, result)


def put(stdin, out, target, size, offset, prefix_sha):
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    part = part_path(target)
    mode = "r+b" if os.path.exists(part) else "w+b"
    with open(part, mode) as f:
        _lock(f)
        h, got = _hash_prefix(f, offset)
        if got != offset or h.hexdigest() != prefix_sha:
            h, offset = hashlib.sha256(), 0  # the partial file is not what we sent: redo it
        f.truncate(offset)
        f.seek(offset)
        _reply(out, {"offset": offset})
        dctx = zstandard.ZstdDecompressor() if zstandard is not None else None
        written = offset
        while True:
            head = _read_exact(stdin, FRAME.size)
            if head is None:
                return None
            codec, n = FRAME.unpack(bytes(head))
            payload = _read_exact(stdin, n)
            if payload is None:
                return None
            if codec == END:
                payload = bytes(payload)
                break
            if codec == 1:
                payload = dctx.decompress(payload)
            f.write(payload)
            h.update(payload)
            written += len(payload)
        f.flush()
        os.fsync(f.fileno())
    digest = h.hexdigest()
    if digest == payload.decode() and written == size:
        os.replace(part, target)
        return {"ok": True}
    os.unlink(part)
    return {"ok": False, "sha256": digest, "size": written}


def _pays(view, rate, cctx):
    mid = max(0, len(view) // 2 - 32768)
    sample = view[mid : mid + 65536]
    t0 = time.thread_time()  # CPU time: a preemption on a busy host is not compression cost
    size = len(cctx.compress(sample))
    per_byte = max(time.thread_time() - t0, 1e-7) / len(sample)
    rate = rate or 3e7
    return per_byte + size / len(sample) / rate + per_byte / 3 < 0.9 / rate


def serve_get(mode):
    stdin, out = sys.stdin.buffer, sys.stdout.buffer
    plan = plan_get(_line(stdin))
    _reply(out, plan)
    if plan.get("missing"):
        return 0
    while True:
        cmd = _line(stdin)
        if cmd is None:
            return 0
        path = plan["files"][int(cmd["i"])]["path"]
        get(out, path, int(cmd["offset"]), cmd["sha"], mode, float(cmd.get("rate") or 0))


def get(out, source, offset, prefix_sha, mode, rate):
    cctx = zstandard.ZstdCompressor(level=1) if (zstandard and mode != "none") else None
    with open(source, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h, got = _hash_prefix(f, offset)
        if got != offset or h.hexdigest() != prefix_sha:
            h, offset = hashlib.sha256(), 0
        _reply(out, {"offset": offset, "size": size})
        mapped = _map(f, size)
        if mapped is None:
            f.seek(offset)
            _send_read(out, f, h, cctx, mode, rate)
        else:
            try:
                _send_mapped(f.fileno(), mapped, offset, size, h, cctx, mode, rate)
            finally:
                mapped.close()
        end = h.hexdigest().encode()
        out.write(FRAME.pack(END, len(end)) + end)
        out.flush()


def _map(f, size):
    """*f* mapped read-only, or None where it cannot be (empty, or not mappable: a /proc file)."""
    import mmap

    if size <= 0 or not hasattr(os, "sendfile"):
        return None
    try:
        m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    with contextlib.suppress(AttributeError, OSError, ValueError):
        m.madvise(mmap.MADV_SEQUENTIAL)
    return m


def _sampled(block, cctx, mode, rate):
    """For a chunk due a decision: ``(its zstd payload, or None to send it raw; the raw bytes
    to send before the next sample)``. ``auto`` compresses where a sample says it pays at
    *rate*; when it does not at a known rate, the next sample comes seven chunks later (the
    client's ``compress.Chooser`` does the same)."""
    if len(block) >= 4096 and (mode == "zstd" or _pays(block, rate, cctx)):
        z = cctx.compress(block)
        return (z if len(z) < len(block) else None), 0
    return None, (_RESAMPLE * CHUNK if rate else 0)


def _send_mapped(fd, m, pos, size, h, cctx, mode, rate):
    """Frames of the mapped file *fd* from *pos* to *size* (its size when the copy began).

    Raw data goes in frames of :data:`SLICE` bytes: each hashed in place in the mapping, then
    sent by ``sendfile`` from the page cache, so its bytes never pass through a buffer of ours
    and are still in the CPU's cache when sshd reads them. A chunk due a decision is judged
    whole (:func:`_sampled`) and, if compressed, sent whole. A file truncated meanwhile ends
    this process (SIGBUS or a short ``sendfile``); the client sees a drop and starts over with
    the file as it is then.
    """
    view = memoryview(m)
    skip = 0  # raw bytes to send before the next sample
    try:
        while pos < size:
            end = min(pos + SLICE, size)
            if cctx is not None and (mode == "zstd" or skip <= 0):
                end = min(pos + CHUNK, size)
                z, skip = _sampled(view[pos:end], cctx, mode, rate)
                if z is not None:
                    h.update(view[pos:end])
                    _write_all(1, FRAME.pack(1, len(z)))
                    _write_all(1, z)
                    pos = end
                    continue
            while pos < end:  # raw, a slice at a time
                n = min(SLICE, end - pos)
                h.update(view[pos : pos + n])
                _write_all(1, FRAME.pack(0, n))
                _sendfile(fd, pos, n)
                pos += n
                skip -= n
    finally:
        view.release()


def _sendfile(fd, pos, n):
    while n:
        k = os.sendfile(1, fd, pos, n)
        if not k:
            msg = "the file shrank while it was being sent"
            raise EOFError(msg)
        pos += k
        n -= k


def _send_read(out, f, h, cctx, mode, rate):
    """Frames of *f* from its position, read through a buffer (where it cannot be mapped)."""
    skip = 0
    buf = bytearray(CHUNK)
    while True:
        n = f.readinto(buf)
        if not n:
            break
        block = memoryview(buf)[:n]
        h.update(block)
        z = None
        if cctx is not None and (mode == "zstd" or skip <= 0):
            z, skip = _sampled(block, cctx, mode, rate)
        if z is None:
            skip -= n
            out.write(FRAME.pack(0, n))
            out.write(block)
        else:
            out.write(FRAME.pack(1, len(z)))
            out.write(z)


def relay():
    stdin, out = sys.stdin.buffer, sys.stdout.buffer
    req = _line(stdin)
    if req is None:
        return 0
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(req["path"])
    except OSError as exc:
        _reply(out, {"error": f"cannot reach the kernel's stream at {req['path']}: {exc}"})
        return 1
    if req.get("pass") and _pass(sock):
        _reply(out, {"ok": True, "passed": True})
        try:
            while sock.recv(1):  # the kernel moves the bytes now; it closes when done
                pass
        except OSError:
            pass
        return 0
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:
            pass
    _reply(out, {"ok": True})  # nothing more is read through stdin's buffer: fd 0 from here
    if _pipes(0, 1):
        sock.setblocking(False)  # see _splice
        up, down = (_splice, 0, sock.fileno()), (_splice, sock.fileno(), 1)
    else:
        up = (_copy, 0, lambda view: sock.sendall(view))
        down = (_copy, sock.fileno(), lambda view: _write_all(1, view))

    def upward():
        up[0](*up[1:])
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    threading.Thread(target=upward, daemon=True).start()
    down[0](*down[1:])
    return 0


def _pass(sock):
    """Hand this process's stdin and stdout (sshd's pipes) to the kernel over *sock*, so that
    the bulk bytes go between sshd and the kernel with no process of ours between them."""
    if not hasattr(socket, "send_fds"):
        return False
    try:
        socket.send_fds(sock, [b"F"], [0, 1])
    except OSError:
        return False
    return True


def _pipes(*fds):
    import stat

    try:
        return hasattr(os, "splice") and all(stat.S_ISFIFO(os.fstat(fd).st_mode) for fd in fds)
    except OSError:
        return False


def _write_all(fd, view):
    view = memoryview(view)
    while view.nbytes:
        view = view[os.write(fd, view) :]


def _splice(src, dst):
    """Move *src* to *dst* (one a pipe, the other the non-blocking socket) until end of stream,
    with no copy through Python.

    Every splice is non-blocking, after waiting for *src* to be readable and *dst* writable: a
    splice that blocks on the socket holds the pipe's lock meanwhile, and sshd, reading or
    writing that pipe, would block with it (uninterruptibly: its whole connection stalls).
    """
    import select

    flags = getattr(os, "SPLICE_F_NONBLOCK", 2) | getattr(os, "SPLICE_F_MOVE", 1)
    while True:
        select.select([src], [], [])
        select.select([], [dst], [])
        try:
            if not os.splice(src, dst, 1 << 20, flags=flags):
                return
        except BlockingIOError:
            continue
        except OSError:
            return  # the other side went away: end this direction


def _copy(src, write):
    """Move *src* to *write* in 1 MiB blocks until end of stream (where splice cannot)."""
    buf = bytearray(1 << 20)
    while True:
        try:
            n = os.readv(src, [buf])
            if not n:
                return
            write(memoryview(buf)[:n])
        except OSError:
            return


def main(argv):
    _grow_pipes()
    if argv[0] == "serve":  # a spare: up, then the command comes on stdin when a copy takes it
        _reply(sys.stdout.buffer, {"ready": True})
        cmd = _line(sys.stdin.buffer)
        if cmd is None:
            return 0
        argv = [str(a) for a in cmd["argv"]]
    if argv[0] == "put":
        return serve_put()
    if argv[0] == "get":
        return serve_get(argv[1])
    if argv[0] == "relay":
        return relay()
    sys.stderr.write("unknown command " + repr(argv[0]) + "\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
