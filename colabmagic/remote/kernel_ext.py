"""Kernel-side helpers, run inside every remote kernel by the agent's bootstrap.

This file is executed from source in a fresh module (``_colabmagic_kernel``), so it must stay
self-contained: standard library plus what an ipykernel has. It registers the ``colabmagic``
comm target that carries variables in and out of the kernel:

- ``{"op": "push", "req": ID, "names": [...]}`` with buffers ``[pickle, *out-of-band buffers]``:
  unpickle a dict and bind its items in the user namespace.
- ``{"op": "pull", "req": ID, "names": [...]}``: answer ``{"op": "pull_ok", "req": ID}`` with the
  pickled dict as buffers, or ``{"op": "error", ...}`` naming the variable that failed. With
  ``"cpu": true`` (snapshots), torch tensors and CuPy arrays are copied to host memory first.
- ``{"op": "info", "req": ID}``: Python version, pid, GPU name/memory (nvidia-smi or CuPy), mock.
- ``{"op": "widgets", "req": ID, "on": bool}``: the client relays comms (widgets) to a frontend:
  give ``tqdm.auto``/``tqdm.notebook`` back their widget bars, and answer (and later announce,
  after each cell, unsolicited as ``{"op": "targets"}``) the comm targets registered here and the
  installed ipywidgets version.

Pickle protocol 5 with out-of-band buffers sends NumPy arrays without copying them into the
pickle: the array memory itself becomes a ZeroMQ frame.

Large values are *streamed* (``colabmagic/transfer.py`` is the other end): the frames of the
pickle cross as ``chunk`` messages of a few MiB, each acknowledged, with a bounded window in
flight, so no hop ever holds more than a few chunks:

- push: ``push_begin`` (``sizes`` of the frames) allocates the frames here, each ``chunk``
  (``i``, ``off``, ``n``, codec ``z``; one buffer) is copied (or zstd-decompressed) into place and
  answered ``ack``; after the last one the values are unpickled *in place* (arrays use the
  received memory, writable) and ``push_ok`` answers.
- direct (``transfer_direct.py`` is the other end): ``push_begin`` with ``direct`` (a one-time
  token) allocates the frames as above, listens on a Unix socket in a private 0700 directory
  and answers ``direct_ready`` with its path (and ``fds``: it can take the relay's pipes); a
  thread accepts one connection (the host's relay of an ``ssh`` stream), which hands over its
  stdin and stdout (sshd's pipes) or splices them to the socket (see ``_Direct``), checks the
  token, reads the frames into place and answers one byte ``K``; ``push_commit`` then
  unpickles and binds on the main thread (nothing is bound before every byte arrived). A
  ``pull`` with ``direct`` (a token and the smallest size worth it) answers ``direct_ready``
  with the sizes and the path, and the thread writes the frames; ``pull_done`` ends it.
  ``abort`` ends either. The I/O releases the GIL, so the kernel's main thread stays free.
- pull with ``stream``: ``pull_begin`` gives the sizes, then ``chunk`` messages go out at most
  ``window`` ahead of the caller's ``ack`` messages; chunks are slices of the values' own
  memory (no copy), compressed when the caller asked for it and a sample says it pays at the
  link rate the caller measured (``rate`` in each ack).
"""

import copy
import hmac
import mmap
import os
import pickle
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

from IPython import get_ipython

TARGET = "colabmagic"


def dumps(obj):
    buffers = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return [data] + [b.raw() for b in buffers]


try:
    import zstandard as _zstd
except ImportError:  # optional: without it, transfers go uncompressed
    _zstd = None

_pushes = {}
_pulls = {}


def _pays(view, rate, cctx):
    """Whether compressing *view* beats sending it raw at *rate* bytes/s (see compress.py)."""
    mid = max(0, len(view) // 2 - 32768)
    sample = view[mid : mid + 65536]
    t0 = time.thread_time()  # CPU time: a preemption on a busy host is not compression cost
    size = len(cctx.compress(sample))
    per_byte = max(time.thread_time() - t0, 1e-7) / len(sample)
    rate = rate or 3e7
    return per_byte + size / len(sample) / rate + per_byte / 3 < 0.9 / rate


def frame_buffer(n):
    """Writable memory for a received frame of *n* bytes.

    ``bytearray(n)`` zero-fills byte by byte and then faults every page in one at a time; a large
    frame is instead an anonymous mapping populated in one system call (half the cost on a VM,
    where page faults are dear). Arrays unpickled into it keep it alive, writable, as their base.
    """
    if n >= 1 << 20 and hasattr(mmap, "MAP_POPULATE"):
        try:
            return mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
        except OSError:
            pass
    return bytearray(n)


def _push_begin(comm, req, data):
    _pushes.clear()  # one transfer at a time per caller: a new one ends any abandoned one
    sizes = [int(n) for n in data["sizes"]]
    frames = [frame_buffer(n) for n in sizes]
    if data.get("direct"):
        _direct_begin(comm, req, frames, data["direct"], outgoing=False)
        return
    _pushes[req] = {"frames": frames, "left": sum(sizes), "got": 0}


class _Direct:
    """One transfer on its own stream: a Unix socket in a private directory, one connection,
    served by a thread that moves *frames* in (push) or out (pull).

    The host's relay (``remote/files.py relay``) either passes its own stdin and stdout (the
    pipes to sshd) over that connection (SCM_RIGHTS), so this thread reads and writes sshd's
    pipes itself and the bytes cross no socket and no relay process; or, where it cannot pass
    them, splices them to the connection. Either way the caller's token comes first.
    """

    def __init__(self, token, frames, outgoing, wait=60.0):
        self.token = token.encode()
        self.frames = frames
        self.outgoing = outgoing
        self.error = None
        self.done = threading.Event()
        self._conn = None
        self._fds = ()
        self._cancelled = False
        self._deadline = time.monotonic() + wait
        self.dir = tempfile.mkdtemp(prefix="colabmagic-bulk-")  # 0700: ours alone
        if len(self.dir) > 90:  # a Unix socket's path has ~107 bytes
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = tempfile.mkdtemp(prefix="colabmagic-bulk-", dir="/tmp")
        self.path = os.path.join(self.dir, "s")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(1)
        self._sock.settimeout(0.2)
        threading.Thread(target=self._run, name="colabmagic-direct", daemon=True).start()

    def _accept(self):
        """The peer's stream as ``(read, write)`` callables, once it has shown the token."""
        while not self._cancelled:
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                if time.monotonic() > self._deadline:
                    msg = "no stream connected"
                    raise TimeoutError(msg) from None
                continue
            conn.settimeout(10)  # the token comes at once, or the peer is not ours
            self._conn = conn
            try:
                stream = self._open(conn)
                got = bytearray(len(self.token))
                stream[0](memoryview(got), time.monotonic() + 10)
            except (OSError, ValueError):
                got = None
            if got is not None and hmac.compare_digest(bytes(got), self.token):
                conn.settimeout(None)
                return stream
            self._close_stream()  # not our peer: wait for the right one
        msg = "aborted"
        raise ConnectionAbortedError(msg)

    def _open(self, conn):
        if hasattr(socket, "recv_fds"):
            first, fds, _, _ = socket.recv_fds(conn, 1, 2)
        else:
            first, fds = conn.recv(1), []
        if not first:
            msg = "the peer closed at once"
            raise ConnectionError(msg)
        if len(fds) == 2:  # the relay's stdin and stdout: sshd's pipes, ours to use
            self._fds = fds
            # Reads wait in poll, so a deadline or cancel() ends them. Writes block: waiting in
            # poll for room in sshd's pipe woke this thread for every page sshd took (+1 s of
            # CPU per GiB pulled); a write blocked for good ends when sshd closes the pipe,
            # i.e. when the caller's ssh is gone, and it only holds views of the kernel's
            # own arrays meanwhile.
            os.set_blocking(fds[0], False)
            os.set_blocking(fds[1], True)
            return self._read_fd, self._write_fd
        for fd in fds:
            os.close(fd)
        # spliced: *first* is the token's first byte
        return _Spliced(conn, first[:1]).read, self._write_sock

    def _wait_readable(self, fd, deadline):
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        while not self._cancelled:
            left = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if left <= 0:
                msg = "the stream stalled"
                raise TimeoutError(msg)
            if poller.poll(left * 1000):
                return
        msg = "aborted"
        raise ConnectionAbortedError(msg)

    def _read_fd(self, view, deadline=None):
        fd = self._fds[0]
        while view.nbytes:
            try:
                n = os.readv(fd, [view])
            except BlockingIOError:
                self._wait_readable(fd, deadline)
                continue
            if not n:
                msg = "the stream ended early"
                raise ConnectionError(msg)
            view = view[n:]

    def _write_fd(self, view):
        fd = self._fds[1]
        while view.nbytes:
            view = view[os.write(fd, view) :]

    def _write_sock(self, view):
        self._conn.sendall(view)

    def _run(self):
        try:
            read, write = self._accept()
            if not self._fds:
                for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):  # fewer, larger socket calls
                    try:
                        self._conn.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
                    except OSError:
                        pass
            for f in self.frames:
                view = memoryview(f).cast("B")
                if self.outgoing:
                    write(view)
                else:
                    read(view)
            if not self.outgoing:
                write(memoryview(b"K"))
        except Exception as exc:  # noqa: BLE001 - said to the caller through the comm
            self.error = f"{type(exc).__name__}: {exc}"
            self.frames = None  # nothing to bind: free the memory now, not at the next transfer
        finally:
            self.close()
            self.done.set()

    def cancel(self):
        self._cancelled = True
        conn = self._conn
        if conn is not None and not self._fds:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _close_stream(self):
        fds, self._fds = self._fds, ()
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()  # the relay, if it passed its pipes, waits for this to exit
            except OSError:
                pass

    def close(self):
        self._close_stream()
        try:
            self._sock.close()
        except OSError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


class _Spliced:
    """Reads from a relay that splices its pipes to *conn*, *head* (bytes) already read."""

    def __init__(self, conn, head):
        self.conn = conn
        self.head = head

    def read(self, view, deadline=None):
        if self.head and view.nbytes:
            view[:1] = self.head
            self.head = b""
            view = view[1:]
        while view.nbytes:
            n = self.conn.recv_into(view)
            if not n:
                msg = "the stream ended early"
                raise ConnectionError(msg)
            view = view[n:]


_directs = {}


def _end_direct(req):
    d = _directs.pop(req, None)
    if d is not None:
        d.cancel()
    return d


def _direct_begin(comm, req, frames, token, outgoing):
    for old in list(_directs):  # one transfer at a time per caller, as for _pushes
        _end_direct(old)
    d = _directs[req] = _Direct(token, frames, outgoing)
    sizes = [memoryview(f).nbytes for f in frames]
    comm.send(
        {
            "op": "direct_ready",
            "req": req,
            "path": d.path,
            "sizes": sizes,
            "fds": hasattr(socket, "recv_fds"),  # the relay may pass its pipes (see _Direct)
        }
    )


def _push_commit(comm, req):
    d = _directs.pop(req, None)
    if d is None or not d.done.wait(30) or d.error:
        why = d.error if d is not None and d.error else "no complete stream for this transfer"
        if d is not None:
            d.cancel()
        comm.send({"op": "error", "req": req, "message": f"direct push failed: {why}"})
        return
    frames = d.frames
    values = pickle.loads(frames[0], buffers=frames[1:])  # noqa: S301 - our own peer
    get_ipython().user_ns.update(values)
    comm.send({"op": "push_ok", "req": req, "names": sorted(values)})


def _direct_pays(frames, data):
    """Whether a pull goes on its own stream: big enough, and raw (compression is the comm's)."""
    size = sum(memoryview(f).nbytes for f in frames)
    if not data.get("direct") or size < int(data.get("direct_min", 0)):
        return False
    mode = data.get("compress", "none")
    if mode == "none" or _zstd is None:
        return True
    if mode != "auto":
        return False
    big = max(frames, key=lambda f: memoryview(f).nbytes)
    cctx = _zstd.ZstdCompressor(level=1)
    return not _pays(memoryview(big).cast("B"), data.get("rate"), cctx)


def _push_chunk(comm, req, data, buffers):
    state = _pushes.get(req)
    if state is None:
        comm.send({"op": "error", "req": req, "message": "push chunk for an unknown transfer"})
        return
    n = int(data["n"])
    payload = buffers[0]
    if data.get("z") == 1:
        payload = _zstd.ZstdDecompressor().decompress(payload, max_output_size=n)
    off = int(data["off"])
    memoryview(state["frames"][int(data["i"])])[off : off + n] = payload
    state["left"] -= n
    state["got"] += n
    if state["left"] > 0:
        comm.send({"op": "ack", "req": req, "got": state["got"]})
        return
    del _pushes[req]
    frames = state["frames"]
    values = pickle.loads(frames[0], buffers=frames[1:])  # noqa: S301 - our own peer
    get_ipython().user_ns.update(values)
    comm.send({"op": "push_ok", "req": req, "names": sorted(values)})


def _pull_stream(comm, req, data, frames):
    views = [memoryview(f).cast("B") for f in frames]
    mode = data.get("compress", "none")
    cctx = _zstd.ZstdCompressor(level=1) if (_zstd is not None and mode != "none") else None
    state = {
        "views": views,
        "i": 0,
        "off": 0,
        "inflight": 0,
        "chunk": int(data.get("chunk", 4 << 20)),
        "window": int(data.get("window", 6)),
        "rate": data.get("rate"),
        "mode": mode if cctx is not None else "none",
        "cctx": cctx,
        "skip": 0,
    }
    _pulls.clear()
    _pulls[req] = state
    sizes = [v.nbytes for v in views]
    comm.send({"op": "pull_begin", "req": req, "sizes": sizes, "zstd": cctx is not None})
    _pull_more(comm, req, state)


def _encode(state, view):
    mode, cctx = state["mode"], state["cctx"]
    if mode == "none" or len(view) < 4096:
        return 0, view
    if mode == "auto":
        if state["skip"]:
            state["skip"] -= 1
            return 0, view
        if not _pays(view, state["rate"], cctx):
            state["skip"] = 7 if state["rate"] else 0
            return 0, view
    out = cctx.compress(view)
    return (1, out) if len(out) < len(view) else (0, view)


def _pull_more(comm, req, state):
    views = state["views"]
    while state["inflight"] < state["window"] and state["i"] < len(views):
        view = views[state["i"]]
        off = state["off"]
        piece = view[off : off + state["chunk"]]
        if piece.nbytes:
            z, payload = _encode(state, piece)
            msg = {"op": "chunk", "req": req, "i": state["i"], "off": off, "n": piece.nbytes}
            msg["z"] = z
            comm.send(msg, buffers=[payload])
            state["inflight"] += 1
        state["off"] = off + piece.nbytes
        if state["off"] >= view.nbytes:
            state["i"] += 1
            state["off"] = 0
    if state["i"] >= len(views):
        _pulls.pop(req, None)  # everything is on its way; late acks are ignored


def _pull_ack(comm, req, data):
    state = _pulls.get(req)
    if state is None:
        return
    state["inflight"] -= int(data.get("k", 1))
    if data.get("rate"):
        state["rate"] = float(data["rate"])
    _pull_more(comm, req, state)


def loads(buffers):
    # Received ZeroMQ frames are normally writable: use them in place (arrays stay zero-copy);
    # copy only a read-only buffer, so that arrays always come out writable.
    oob = [b if not memoryview(b).readonly else bytearray(b) for b in buffers[1:]]
    return pickle.loads(bytes(buffers[0]), buffers=oob)  # noqa: S301 - our own peer


def to_cpu(value):
    """*value* with torch tensors and CuPy arrays (also inside dicts, lists, tuples) on the CPU.

    Dict subclasses keep their type and attributes (a state_dict's ``_metadata``).
    """
    torch = sys.modules.get("torch")
    cupy = sys.modules.get("cupy")
    if torch is not None and isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if cupy is not None and isinstance(value, getattr(cupy, "ndarray", ())):
        return cupy.asnumpy(value)
    if isinstance(value, dict):
        out = copy.copy(value)
        for key in value:
            out[key] = to_cpu(value[key])
        return out
    if type(value) is list:
        return [to_cpu(v) for v in value]
    if type(value) is tuple:
        return tuple(to_cpu(v) for v in value)
    return value


def gpu_info():
    """Name and memory of the first GPU, or the mock, or None."""
    if os.environ.get("COLABMAGIC_MOCK_GPU") == "1":
        return {
            "name": "mock (NumPy on CPU)",
            "memory_total": None,
            "memory_used": None,
            "mock": True,
        }
    try:
        out = (
            subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,memory.total,memory.used",
                    "--format=csv,noheader,nounits",
                ],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            )
            .stdout.strip()
            .splitlines()
        )
    except (OSError, subprocess.SubprocessError):
        out = []
    if out:
        name, total, used = [x.strip() for x in out[0].split(",")]
        return {
            "name": name,
            "memory_total": int(total) << 20,
            "memory_used": int(used) << 20,
            "mock": False,
            "count": len(out),
        }
    cp = sys.modules.get("cupy")
    if cp is not None:
        try:
            props = cp.cuda.runtime.getDeviceProperties(0)
            free, total = cp.cuda.runtime.memGetInfo()
            name = props["name"]
            return {
                "name": name.decode() if isinstance(name, bytes) else name,
                "memory_total": total,
                "memory_used": total - free,
                "mock": False,
            }
        except Exception:  # noqa: BLE001 - any CUDA failure means "no usable GPU"
            return None
    return None


def info():
    return {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "gpu": gpu_info(),
        "zstd": _zstd is not None,
    }


_debugpy_port = None


def start_debugpy(port):
    """Listen for a debugger on 127.0.0.1 only; a second call returns the same port."""
    global _debugpy_port
    if _debugpy_port is not None:
        return _debugpy_port
    try:
        import debugpy
    except ImportError:
        msg = (
            f"debugpy is not installed in the remote kernel's Python ({sys.executable}); "
            "install it there (run %pip install debugpy in a %%gpu_run cell), then rerun "
            "%colab_debug --vscode"
        )
        raise RuntimeError(msg) from None

    try:
        _, bound = debugpy.listen(("127.0.0.1", port))
    except RuntimeError as exc:
        msg = (
            "debugpy is already in use in this kernel (JupyterLab's debugger panel, or "
            "debugpy.listen() called by your code), so it cannot listen for VS Code; use that "
            "debugger, or restart the kernel with %colab_connect --restart"
        )
        raise RuntimeError(msg) from exc
    _debugpy_port = bound
    return bound


_comm = None  # the client's colabmagic comm: unsolicited announcements go there
_widgets = {"on": False, "announced": None}


def _targets():
    return sorted(t for t in get_ipython().kernel.comm_manager.targets if t != TARGET)


def widget_info():
    """The comm targets registered in this kernel and the installed ipywidgets version."""
    from importlib import metadata

    try:
        version = metadata.version("ipywidgets")
    except metadata.PackageNotFoundError:
        version = None
    return {"targets": _targets(), "ipywidgets": version}


def _announce_targets(*_args):
    """After a cell: tell the client when the set of comm targets changed (an import...).

    Runs after every cell, so it compares the targets alone (microseconds) and looks the
    ipywidgets version up (a scan of the installed distributions, ~0.6 ms) only on a change.
    """
    if not _widgets["on"] or _comm is None or _targets() == _widgets["announced"]:
        return
    info = widget_info()
    _widgets["announced"] = info["targets"]
    _comm.send({"op": "targets", **info})


def set_widgets(on):
    """Widget bars when the client relays comms; display-update text bars when it does not."""
    ip = get_ipython()
    if on and not _widgets["on"]:
        _uninstall_tqdm()
        ip.events.register("post_run_cell", _announce_targets)
    elif not on and _widgets["on"]:
        _install_tqdm()
        ip.events.unregister("post_run_cell", _announce_targets)
    _widgets["on"] = bool(on)
    info = widget_info()
    _widgets["announced"] = info["targets"]
    return info


def _handle(comm, msg):
    data = msg["content"]["data"]
    req = data.get("req")
    op = data.get("op")
    ns = get_ipython().user_ns
    try:
        if op == "push":
            values = loads(msg["buffers"])
            ns.update(values)
            comm.send({"op": "push_ok", "req": req, "names": sorted(values)})
        elif op == "push_begin":
            _push_begin(comm, req, data)
        elif op == "chunk":
            _push_chunk(comm, req, data, msg["buffers"])
        elif op == "ack":
            _pull_ack(comm, req, data)
        elif op == "push_commit":
            _push_commit(comm, req)
        elif op == "pull_done":
            _end_direct(req)
        elif op == "abort":
            _pushes.pop(req, None)
            _pulls.pop(req, None)
            _end_direct(req)
        elif op == "pull":
            missing = [n for n in data["names"] if n not in ns]
            if missing:
                comm.send(
                    {
                        "op": "error",
                        "req": req,
                        "name": missing[0],
                        "message": f"name {missing[0]!r} is not defined in the remote kernel",
                    }
                )
                return
            values = {name: ns[name] for name in data["names"]}
            if data.get("cpu"):  # a snapshot: device memory must not travel (or be needed)
                values = {name: to_cpu(value) for name, value in values.items()}
            try:
                frames = dumps(values)
            except Exception:
                for name, value in values.items():
                    try:
                        dumps(value)
                    except Exception as exc:  # noqa: BLE001
                        comm.send(
                            {
                                "op": "error",
                                "req": req,
                                "name": name,
                                "message": f"cannot pickle {name!r} ({type(exc).__name__}: {exc})",
                            }
                        )
                        return
                raise
            if _direct_pays(frames, data):
                _direct_begin(comm, req, frames, data["direct"], outgoing=True)
                return
            size = sum(memoryview(f).nbytes for f in frames)
            if data.get("stream") and size > int(data.get("inline", 0)):
                _pull_stream(comm, req, data, frames)
                return
            comm.send({"op": "pull_ok", "req": req}, buffers=frames)
        elif op == "info":
            comm.send({"op": "info_ok", "req": req, "info": info()})
        elif op == "widgets":
            comm.send({"op": "widgets_ok", "req": req, **set_widgets(bool(data.get("on")))})
        elif op == "debugpy":
            comm.send({"op": "debugpy_ok", "req": req, "port": start_debugpy(int(data["port"]))})
        else:
            comm.send({"op": "error", "req": req, "message": f"unknown operation {op!r}"})
    except Exception as exc:  # noqa: BLE001 - errors go back to the caller, not the log
        _pushes.pop(req, None)
        _pulls.pop(req, None)
        _end_direct(req)
        comm.send({"op": "error", "req": req, "message": f"{type(exc).__name__}: {exc}"})


def _open(comm, msg):
    global _comm
    _comm = comm
    comm.on_msg(lambda m: _handle(comm, m))


def _breakpointhook_factory(original):
    """``breakpoint()`` opens pdb over the stdin channel, or VS Code's when one is attached.

    ipykernel points ``sys.breakpointhook`` at debugpy, where ``breakpoint()`` does nothing
    until a debugger client attaches; a remote user expects pdb in the notebook instead.
    """

    def hook(*args, **kwargs):
        try:
            import debugpy

            if debugpy.is_client_connected():
                return original(*args, **kwargs)
        except ImportError:
            pass
        from IPython.core.debugger import Pdb

        Pdb().set_trace(sys._getframe(1))
        return None

    return hook


def _install_tqdm():
    """Make ``tqdm.auto``/``tqdm.notebook`` bars animate through ``%%gpu_run``.

    tqdm's notebook bar is an ipywidget, which needs a frontend that draws widgets; until a
    client says it relays comms to one (``set_widgets(True)``, from a notebook kernel), the bar is
    a display with an id, refreshed with ``update_display_data`` (rate-limited by tqdm's
    ``mininterval``), which every frontend and terminal renders.
    """
    try:
        import tqdm.std as std
    except ImportError:
        return
    _uninstall_tqdm()  # idempotent: never wrap our own stand-ins
    import io
    import types

    from IPython.display import display

    class tqdm_remote(std.tqdm):
        def __init__(self, *args, **kwargs):
            self._cm_handle = None
            kwargs.setdefault("file", io.StringIO())
            kwargs.setdefault("ascii", False)
            super().__init__(*args, **kwargs)

        def display(self, msg=None, pos=None):
            text = self.__str__() if msg is None else msg
            bundle = {"text/plain": text}
            if self._cm_handle is None:
                if not text:
                    return True
                self._cm_handle = display(bundle, raw=True, display_id=True)
            else:
                self._cm_handle.update(bundle, raw=True)
            return True

    def trange(*args, **kwargs):
        return tqdm_remote(range(*args), **kwargs)

    for name in ("tqdm.auto", "tqdm.autonotebook"):
        _tqdm_saved.setdefault(name, sys.modules.get(name))
        mod = types.ModuleType(name)
        mod.tqdm, mod.trange, mod.__all__ = tqdm_remote, trange, ["tqdm", "trange"]
        sys.modules[name] = mod
    try:
        import tqdm.notebook as nb
    except ImportError:
        return
    _tqdm_saved["notebook"] = (nb.tqdm, nb.trange, nb.tqdm_notebook, nb.tnrange)
    nb.tqdm, nb.trange, nb.tqdm_notebook, nb.tnrange = tqdm_remote, trange, tqdm_remote, trange


_tqdm_saved = {}  # what _install_tqdm replaced, so that widget bars can come back


def _uninstall_tqdm():
    saved = dict(_tqdm_saved)
    _tqdm_saved.clear()
    for name in ("tqdm.auto", "tqdm.autonotebook"):
        if name not in saved:
            continue
        if saved[name] is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = saved[name]
    if "notebook" in saved:
        nb = sys.modules["tqdm.notebook"]
        nb.tqdm, nb.trange, nb.tqdm_notebook, nb.tnrange = saved["notebook"]


def install():
    kernel = get_ipython().kernel
    kernel.comm_manager.register_target(TARGET, _open)
    sys.breakpointhook = _breakpointhook_factory(sys.breakpointhook)
    _install_tqdm()
