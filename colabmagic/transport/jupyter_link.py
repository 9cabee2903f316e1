"""The agent's role played locally: the wire protocol to the proxy, a kernel websocket to a server.

A Jupyter server gives no shell, so there is no agent on the GPU host to number the kernel's
messages. :class:`KernelLink` stands in for it on this machine: the proxy talks to it through an
ordinary :class:`~colabmagic.proxy.Pipe` (``HELLO``/``WELCOME``/``MSG``/``ACK`` of
:mod:`colabmagic.wire`, unchanged), and it talks to the kernel through the server's websocket
(``/api/kernels/{id}/channels``; the ``v1.kernel.websocket.jupyter.org`` binary subprotocol when
offered, the JSON frames otherwise). When the websocket drops, the link closes the pipe; the proxy
reconnects through the transport as after any drop, and the link -- which outlives its pipes --
recovers what the dropped websocket lost:

- **journal** mode (an ipykernel with colabmagic's bootstrap): the kernel numbers every message it
  sends (:mod:`colabmagic.remote.journal`). After a reconnect the link asks, on the control channel
  (which answers while a cell runs), for the numbers it lacks, merges them with what arrives live,
  drops duplicates by number and delivers in the kernel's order: exactly once, whatever happened to
  the websocket (same or new session id, a second client attached, a half-open drop).
- **server-buffer** mode (a foreign kernel, or ``journal=False``): one stable websocket session id
  per attachment, so the server replays what it buffered; duplicates are dropped by ``msg_id``.
  What the server lost is lost, but no client hangs: while a request sent before the drop has no
  reply, the link polls the kernel's execution state over REST and, once the kernel is idle for
  good, answers it with an ``OutputLost`` error reply and an ``idle`` status.

**The lane.** For the Session in this process, :mod:`colabmagic.transport.jupyter_lane` takes the
proxy's thread off a cell's path: the link publishes IOPub on the proxy's socket itself, takes the
Session's requests on its loop (:meth:`KernelLink.submit`) and answers them on the lane.

**Signing.** The server signs what it sends to the kernel with the kernel's key, which never leaves
it. The link makes a local key per attachment, hands it to the proxy in ``WELCOME`` (the proxy
writes it into the local connection file as with any agent), checks the signature of every
message from the local clients and signs every message to them with it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import functools
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import uuid
from typing import Any

from colabmagic import wire
from colabmagic.transport.jupyter_forward import DATA, KernelForwards

log = logging.getLogger("colabmagic.jupyter")

V1 = "v1.kernel.websocket.jupyter.org"
SEQ = "colabmagic_seq"
JOURNAL_REQUEST = "colabmagic_journal_request"
NAMES = {wire.SHELL: "shell", wire.CONTROL: "control", wire.STDIN: "stdin", wire.IOPUB: "iopub"}
CHANNELS = {v: k for k, v in NAMES.items()}
_SEEN_LIMIT = 20000
_IDS_LIMIT = 50000
_OUTSTANDING_LIMIT = 10000
NO_REPLY = ("comm_open", "comm_msg", "comm_close")  # shell messages answered by status only
PART = "colabmagic_part"
PART_BYTES = 8 << 20  # a server refuses websocket messages over 10 MiB unless configured


# -- websocket message codecs -------------------------------------------------------------------
def encode_v1(channel: str, parts: list) -> bytes:
    """A ``v1.kernel.websocket.jupyter.org`` frame: offsets, channel, header... buffers."""
    name = channel.encode()
    offsets = [8 * (1 + 1 + len(parts) + 1)]
    offsets.append(offsets[-1] + len(name))
    for p in parts:
        offsets.append(offsets[-1] + memoryview(p).nbytes)
    head = len(offsets).to_bytes(8, "little") + b"".join(o.to_bytes(8, "little") for o in offsets)
    return b"".join([head, name, *parts])


def decode_v1(data: bytes) -> tuple[str, list]:
    view = memoryview(data)
    n = int.from_bytes(view[:8], "little")
    offsets = [int.from_bytes(view[8 * (i + 1) : 8 * (i + 2)], "little") for i in range(n)]
    offsets.append(len(view))
    channel = bytes(view[offsets[0] : offsets[1]]).decode()
    parts = [view[offsets[i] : offsets[i + 1]] for i in range(1, n)]
    return channel, [bytes(p) if len(p) < 65536 else p for p in parts]


def encode_json(channel: str, parts: list) -> str | bytes:
    """The legacy (no subprotocol) frame: JSON text, or the binary layout when there are buffers."""
    msg = {
        "header": json.loads(bytes(parts[0])),
        "parent_header": json.loads(bytes(parts[1])),
        "metadata": json.loads(bytes(parts[2])),
        "content": json.loads(bytes(parts[3])),
        "channel": channel,
    }
    buffers = parts[4:]
    if not buffers:
        return json.dumps(msg)
    msg["buffers"] = []
    pieces = [json.dumps(msg).encode(), *buffers]
    offsets = [4 * (len(pieces) + 1)]
    for p in pieces[:-1]:
        offsets.append(offsets[-1] + memoryview(p).nbytes)
    head = len(pieces).to_bytes(4, "big") + b"".join(o.to_bytes(4, "big") for o in offsets)
    return b"".join([head, *pieces])


def decode_json(data: str | bytes) -> tuple[str, list]:
    buffers: list = []
    if isinstance(data, bytes):
        n = int.from_bytes(data[:4], "big")
        offsets = [int.from_bytes(data[4 * (i + 1) : 4 * (i + 2)], "big") for i in range(n)]
        offsets.append(len(data))
        msg = json.loads(data[offsets[0] : offsets[1]])
        buffers = [memoryview(data)[offsets[i] : offsets[i + 1]] for i in range(1, n)]
    else:
        msg = json.loads(data)
    parts = [
        dumps(msg.get("header") or {}),
        dumps(msg.get("parent_header") or {}),
        dumps(msg.get("metadata") or {}),
        dumps(msg.get("content") or {}),
    ]
    return msg.get("channel") or "shell", parts + buffers


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def new_header(msg_type: str, session: str) -> dict:
    return {
        "msg_id": uuid.uuid4().hex,
        "msg_type": msg_type,
        "username": "colabmagic",
        "session": session,
        "date": _now(),
        "version": "5.3",
    }


def ranges(numbers) -> list[list[int]]:
    """``[[a, b], ...]``: the sorted *numbers* as inclusive runs."""
    out: list[list[int]] = []
    for n in sorted(numbers):
        if out and n == out[-1][1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return out


def bootstrap_source(*, mock_gpu: bool, journal: bool, env: dict | None) -> str:
    """The code run silently in the kernel once per fresh kernel (idempotent when re-run)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def read(rel: str) -> str:
        with open(os.path.join(here, rel)) as f:
            return f.read()

    def module(name: str, rel: str, call: str) -> list[str]:
        return [
            f"    if {name!r} not in sys.modules:",
            f"        mod = types.ModuleType({name!r})",
            f"        exec(compile({read(rel)!r}, '<{name}>', 'exec'), mod.__dict__)",
            f"        sys.modules[{name!r}] = mod",
            f"        mod.{call}()",
        ]

    extra = {"COLABMAGIC_KERNEL": "1", **(env or {})}
    if mock_gpu:
        extra["COLABMAGIC_MOCK_GPU"] = "1"
    code = ["def __colabmagic_boot():", "    import os, sys, types"]
    code.append(f"    os.environ.update({extra!r})")
    code += module("_colabmagic_kernel", "remote/kernel_ext.py", "install")
    code += module("_colabmagic_reassembly", "remote/reassembly.py", "install")
    if journal:
        code += module("_colabmagic_journal", "remote/journal.py", "install")
    code += module("_colabmagic_tcp_forward", "remote/tcp_forward.py", "install")
    if mock_gpu:
        code += module("colabmagic_gpu_mock", "gpu/mock.py", "install")
    code += ["__colabmagic_boot()", "del __colabmagic_boot"]
    return "\n".join(code)


class Inbox:
    """The websocket's messages as tornado parses them (its ``on_message_callback``).

    Tornado's ``read_message`` hands each message through a queue and a future: a turn of the
    event loop per message, four per ``pass`` round trip. The callback delivers in the frame
    parser's own turn instead. Messages that arrive before the link binds (a server replaying its
    buffer right after the handshake) are held and delivered, in order, on :meth:`bind`.
    """

    def __init__(self) -> None:
        self.held: list = []
        self.fn: Any = None

    def put(self, data) -> None:
        if self.fn is None:
            self.held.append(data)
        else:
            self.fn(data)

    def bind(self, fn) -> None:
        held, self.held = self.held, []
        self.fn = fn
        for data in held:
            fn(data)

    def unbind(self) -> None:
        self.fn = _ignore

    def hold(self) -> None:
        """Hold what comes next until :meth:`bind` (the start check hands the websocket on)."""
        self.fn = None


def _ignore(_data) -> None:
    """Where an ended attachment's late websocket messages go."""


class Attachment:
    """One pipe and one websocket: lives from ``open_pipe`` until either end drops."""

    def __init__(self, ws, subprotocol: str | None, sock: socket.socket):
        self.ws = ws
        self.v1 = subprotocol == V1
        self.sock = sock
        self.stream = wire.FramedStream(sock.fileno(), sock.fileno())
        self.hello_done = False
        self.ack_sent = 0
        self.recovering = False
        self.buffered: list = []
        self.done: asyncio.Future | None = None
        self.pongs = 0
        self.writer_on = False  # the pipe's writer callback is registered
        ws_sock = _socket_of(ws)
        self.quickack = None
        if ws_sock is not None and hasattr(socket, "TCP_QUICKACK"):
            self.quickack = functools.partial(
                ws_sock.setsockopt, socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1
            )

    def encode(self, channel: str, parts: list):
        return encode_v1(channel, parts) if self.v1 else encode_json(channel, parts)

    def decode(self, data):
        if self.v1:
            return decode_v1(data)
        return decode_json(data)


class KernelLink:
    """Everything about one kernel that must outlive a websocket; see the module docstring.

    Parameters
    ----------
    kernel_id
        The server's kernel id.
    rest
        The transport's REST client (``kernel_model``, ``interrupt``, ``restart``, ``delete``);
        called in a worker thread.
    journal
        Install the kernel-side journal (exactly-once). False forces server-buffer mode.
    ping_interval
        Seconds between our websocket pings; two unanswered pings mean a drop.
    stable_session
        One websocket session id for the whole attachment (the server's buffer then applies);
        False makes every reconnect a new session (a test of the worst case).
    """

    def __init__(
        self,
        kernel_id: str,
        *,
        rest: Any,
        journal: bool = True,
        mock_gpu: bool = False,
        env: dict | None = None,
        ping_interval: float = 10.0,
        stable_session: bool = True,
        poll_interval: float = 0.5,
    ):
        self.kernel_id = kernel_id
        self.rest = rest
        self.want_journal = journal
        self.mock_gpu = mock_gpu
        self.env = dict(env or {})
        self.ping_interval = ping_interval
        self.stable_session = stable_session
        self.poll_interval = poll_interval
        self.key = secrets.token_hex(32).encode()
        self._mac = hmac.new(self.key, digestmod=hashlib.sha256)  # copied per message: no rekeying
        self.session_id = uuid.uuid4().hex
        self.mode: str | None = None  # "journal" | "server-buffer" once bootstrapped
        self.ready = False
        self.state = "starting"
        self.down = wire.OutLog(max_bytes=1 << 30)
        self.last_up = 0
        self.upq: collections.deque = collections.deque()  # (channel name, parts) to send
        self.low = 0
        self.seen: set[int] = set()
        self.seen_ids: collections.OrderedDict = collections.OrderedDict()
        self.own_ids: collections.OrderedDict = collections.OrderedDict()
        self.waiters: dict[str, asyncio.Future] = {}
        self.outstanding: dict[str, dict] = {}
        self.lost = 0
        self.reason = ""
        self.attachments = 0
        self.current: Attachment | None = None
        self.restarting = False
        self.reassembly = False  # the kernel takes large messages in parts
        self._writing = False
        self._wake: asyncio.Event | None = None
        self._tasks: set = set()
        self.forwards = KernelForwards(self)  # Proxy.forward, carried through the kernel
        # The in-process lane (jupyter_lane.py), set on this loop: IOPub straight to the proxy's
        # subscribers, and the replies to the in-process Session's own requests straight to it.
        self.publish: Any = None
        self.lane: Any = None

    def _spawn(self, coro) -> None:
        """Run *coro* on the loop, keeping a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the websocket session id --------------------------------------------------------
    def next_session_id(self) -> str:
        if not self.stable_session and self.attachments:
            self.session_id = uuid.uuid4().hex
        return self.session_id

    # -- one attachment --------------------------------------------------------------------
    async def serve(self, ws, subprotocol: str | None, sock: socket.socket, inbox: Inbox) -> None:
        """Serve the proxy on *sock* through websocket *ws* until one of them ends.

        *inbox* is the :class:`Inbox` that *ws* was opened with (its message callback).
        """
        loop = asyncio.get_running_loop()
        att = Attachment(ws, subprotocol, sock)
        att.done = loop.create_future()
        att.ack_sent = self.last_up
        first = self.attachments == 0
        self.attachments += 1
        old, self.current = self.current, att
        if old is not None:
            self._end(old, "replaced by a new connection")
        self._wake = asyncio.Event()
        ws.on_pong = lambda _data: setattr(att, "pongs", att.pongs + 1)
        _tune(ws)
        loop.add_reader(sock.fileno(), self._on_pipe, att)
        inbox.bind(lambda data: self._on_ws(att, data))
        tasks = [
            loop.create_task(self._pinger(att)),
            loop.create_task(self._writer(att)),
        ]
        try:
            if first or not self.ready:
                tasks.append(loop.create_task(self._guard(att, self._bootstrap)))
            else:
                tasks.append(loop.create_task(self._guard(att, self._recover)))
            reason = await att.done
            self.reason = reason
            log.info("kernel %s: connection ended (%s)", self.kernel_id, reason)
        finally:
            inbox.unbind()
            for t in tasks:
                t.cancel()
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(sock.fileno())
                loop.remove_writer(sock.fileno())
            with contextlib.suppress(Exception):
                ws.close()
            _abort(ws)
            with contextlib.suppress(OSError):
                sock.close()
            if self.current is att:
                self.current = None

    def _end(self, att: Attachment, reason: str) -> None:
        if att.done is not None and not att.done.done():
            att.done.set_result(reason)

    async def _guard(self, att: Attachment, step) -> None:
        """Run ``step(att)``, ending *att* if it fails. The coroutine is made here, not by the
        caller: a task cancelled before it starts would leave it never awaited."""
        try:
            await step(att)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # reported as the end of this connection
            log.exception("kernel %s: connection setup failed", self.kernel_id)
            self._end(att, f"setup failed: {exc}")

    # -- proxy side ------------------------------------------------------------------------
    def _on_pipe(self, att: Attachment) -> None:
        try:
            frames = att.stream.read_frames()
        except (wire.StreamClosed, wire.ProtocolError) as exc:
            self._end(att, f"the proxy closed the pipe ({exc})")
            return
        for kind, seq, body in frames:
            if kind == wire.HELLO:
                self._welcome(att, int(json.loads(bytes(body)).get("resume_from", 0)))
            elif kind == wire.ACK:
                self.down.ack(seq)
            elif kind == wire.MSG and seq > self.last_up:
                self.last_up = seq
                channel, parts = wire.decode_msg(body)
                self._from_proxy(channel, parts)
        if att.stream.closed:
            self._end(att, "the proxy closed the pipe")
            return
        self._flush(att)

    def _flush(self, att: Attachment) -> None:
        if att.done.done():
            return
        try:
            if att.hello_done and self.last_up > att.ack_sent:
                att.stream.send_frame(wire.ACK, self.last_up, [])
                att.ack_sent = self.last_up
            done = att.stream.flush()
        except wire.StreamClosed as exc:
            self._end(att, f"the proxy closed the pipe ({exc})")
            return
        if done == (not att.writer_on):
            return  # the common case, a small message written at once: no loop bookkeeping
        loop = asyncio.get_running_loop()
        if done:
            loop.remove_writer(att.sock.fileno())
        else:
            loop.add_writer(att.sock.fileno(), self._flush, att)
        att.writer_on = not done

    def _welcome(self, att: Attachment, resume_from: int) -> None:
        self.down.ack(resume_from)
        welcome = {
            "version": wire.PROTOCOL_VERSION,
            "id": self.kernel_id,
            "last_up": self.last_up,
            "resume_from": resume_from,
            "gap": self.lost,
            "connection": {
                "key": self.key.decode(),
                "signature_scheme": "hmac-sha256",
                "transport": "tcp",
                "ip": "127.0.0.1",
            },
            "info": self.info(),
        }
        att.stream.send_json(wire.WELCOME, 0, welcome)
        for seq, channel, parts in self.down.after(resume_from):
            att.stream.send_msg(seq, channel, parts)
        att.hello_done = True

    def info(self) -> dict:
        return {
            "id": self.kernel_id,
            "state": self.state if self.ready else "starting",
            "kernel_pid": None,
            "delivery": self.delivery(),
            "lost_messages": self.lost,
        }

    def delivery(self) -> str:
        if self.mode == "journal":
            return "exactly-once (kernel journal)"
        if self.mode == "server-buffer":
            return "server buffer (no journal: output lost in a drop is reported, not resent)"
        return "starting"

    def _to_proxy(self, channel: int, parts: list) -> None:
        seq = self.down.append(channel, parts)
        att = self.current
        if att is not None and att.hello_done and not att.done.done():
            att.stream.send_msg(seq, channel, parts)
            self._flush(att)

    def _event(self, obj: dict) -> None:
        self._to_proxy(wire.AGENT, [wire.json_body(obj)])

    def submit(self, header: dict, msg: list) -> None:
        """A request of the in-process Session's (jupyter_lane.py), unsigned: it never left this
        process. Sent as one from the proxy, and answered on the lane."""
        self._request(wire.SHELL, msg, header, lane=True)

    def _from_proxy(self, channel: int, parts: list) -> None:
        if channel == wire.AGENT:
            op = json.loads(bytes(parts[0]))
            if op.get("op") == "tcp_open":  # now: the stream's first bytes may follow in this batch
                opened = self.forwards.open(int(op["stream"]), int(op["port"]))
                self._event(
                    {"event": "reply", "reply_to": op.get("id"), "op": "tcp_open", **opened}
                )
                return
            self._spawn(self._op(op))
            return
        if channel == wire.TCP:
            self.forwards.data(wire.sid_int(parts[0]), parts[1])
            return
        if channel not in NAMES or len(parts) < 6 or bytes(parts[0]) != wire.DELIM:
            log.warning("kernel %s: dropping a malformed client message", self.kernel_id)
            return
        body = parts[2:6]
        if not hmac.compare_digest(self._sign(body), bytes(parts[1])):
            log.warning("kernel %s: dropping a client message with a bad signature", self.kernel_id)
            return
        requests = (wire.SHELL, wire.CONTROL)
        header = json.loads(bytes(body[0])) if channel in requests else {}
        self._request(channel, [*body, *parts[6:]], header)

    def _request(self, channel: int, msg: list, header: dict, *, lane: bool = False) -> None:
        """Send a client's message (header, parent, metadata, content, buffers...) on."""
        if channel in (wire.SHELL, wire.CONTROL):
            self.outstanding[header.get("msg_id")] = {
                "channel": NAMES[channel],
                "parts": msg,
                "header": header,
                "replied": header.get("msg_type") in NO_REPLY,
                "idle": False,
                "seen": False,
                "resent": False,
                "att": self.attachments,
                "lane": lane,  # its replies go to the in-process Session's lane
            }
            if len(self.outstanding) > _OUTSTANDING_LIMIT:
                del self.outstanding[next(iter(self.outstanding))]
        item = (NAMES[channel], msg, header.get("msg_id"))
        if not self._write_now(item):
            self.upq.append(item)
            if self._wake is not None:
                self._wake.set()

    def _sign(self, body: list) -> bytes:
        h = self._mac.copy()
        for p in body:
            h.update(p)
        return h.hexdigest().encode()

    # -- websocket side --------------------------------------------------------------------
    async def _writer(self, att: Attachment) -> None:
        while not att.done.done():
            if not self.ready or not self.upq:
                self._wake.clear()
                await self._wake.wait()
                continue
            channel, parts, msg_id = self.upq[0]
            self._writing = True
            try:
                for piece in self._split(channel, parts):
                    data = att.encode(channel, piece)
                    await att.ws.write_message(data, binary=isinstance(data, bytes))
            except Exception as exc:  # noqa: BLE001 - a closed websocket: keep it queued
                self._end(att, f"websocket write failed ({type(exc).__name__})")
                return
            finally:
                self._writing = False
            if self.upq and self.upq[0][1] is parts:
                self.upq.popleft()
            out = self.outstanding.get(msg_id)
            if out is not None:
                out["att"] = self.attachments  # the connection its reply is routed to

    def _write_now(self, item: tuple) -> bool:
        """Write a small message at once when nothing is queued (saves a loop turn per cell)."""
        att = self.current
        if att is None or att.done.done() or not self.ready or self.upq or self._writing:
            return False
        channel, parts, msg_id = item
        if channel == "shell" and sum(memoryview(p).nbytes for p in parts) > PART_BYTES:
            return False
        try:
            data = att.encode(channel, parts)
            fut = att.ws.write_message(data, binary=isinstance(data, bytes))
        except Exception:  # noqa: BLE001 - a closed websocket: the queue path reports it
            return False

        def written(f) -> None:
            if not f.cancelled() and f.exception() is not None:
                self._end(att, f"websocket write failed ({type(f.exception()).__name__})")

        fut.add_done_callback(written)
        out = self.outstanding.get(msg_id)
        if out is not None:
            out["att"] = self.attachments
        return True

    def _split(self, channel: str, parts: list) -> list[list]:
        """A large shell message as ``colabmagic_part`` messages the kernel reassembles."""
        sizes = [memoryview(b).nbytes for b in parts[4:]]
        if channel != "shell" or sum(sizes) <= PART_BYTES or not self.reassembly:
            return [parts]
        groups: list[list] = [[]]
        room = PART_BYTES
        for buf in parts[4:]:
            view = memoryview(buf).cast("B")
            while len(view):
                if not room:
                    groups.append([])
                    room = PART_BYTES
                take = view[:room]
                groups[-1].append(take)
                view = view[len(take) :]
                room -= len(take)
        header = json.loads(bytes(parts[0]))
        pieces = []
        for i, group in enumerate(groups):
            last = i == len(groups) - 1
            content = {"id": header.get("msg_id"), "first": i == 0, "last": last}
            if last:  # it answers for the original request: same msg_id
                head = dict(header, msg_type=PART)
                content.update(
                    header=header,
                    metadata=json.loads(bytes(parts[2])),
                    content=json.loads(bytes(parts[3])),
                    sizes=sizes,
                )
            else:
                head = new_header(PART, header.get("session", self.session_id))
                self.own_ids[head["msg_id"]] = None
            pieces.append([dumps(head), bytes(parts[1]), b"{}", dumps(content), *group])
        while len(self.own_ids) > 512 + len(groups):
            self.own_ids.popitem(last=False)
        return pieces

    def _post_own(self, att: Attachment, channel: str, msg_type: str, content: dict, buffers=()):
        """Write a request of our own; returns its msg_id and a future for its reply."""
        header = new_header(msg_type, self.session_id)
        msg_id = header["msg_id"]
        self.own_ids[msg_id] = None
        while len(self.own_ids) > 512:
            self.own_ids.popitem(last=False)
        fut = asyncio.get_running_loop().create_future()
        self.waiters[msg_id] = fut
        data = att.encode(channel, [dumps(header), b"{}", b"{}", dumps(content), *buffers])
        written = att.ws.write_message(data, binary=isinstance(data, bytes))

        def check(f) -> None:
            if not f.cancelled() and f.exception() is not None:
                self._end(att, f"websocket write failed ({type(f.exception()).__name__})")

        written.add_done_callback(check)
        return msg_id, fut

    async def _ask(self, att, channel, msg_type, content, timeout) -> tuple:
        """Send a request of our own and wait for its reply ``(header, content, buffers)``."""
        fut = self._post_own(att, channel, msg_type, content)[1]
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.waiters = {k: v for k, v in self.waiters.items() if v is not fut}

    def _on_ws(self, att: Attachment, data) -> None:
        """One websocket message (None: the websocket closed), in tornado's parsing turn."""
        if att.done.done():
            return
        if data is None:
            code = getattr(att.ws, "close_code", None)
            self._end(att, f"websocket closed (code {code})")
            return
        if att.quickack is not None:  # Linux clears it now and then: re-arm after every read
            with contextlib.suppress(OSError):
                att.quickack()
        att.pongs += 1  # any traffic proves the link is alive
        try:
            channel, parts = att.decode(data)
            header = json.loads(bytes(parts[0]))
            parent = json.loads(bytes(parts[1]))
        except (ValueError, IndexError, UnicodeDecodeError):
            log.warning("kernel %s: dropping a malformed websocket message", self.kernel_id)
            return
        item = (header.get(SEQ), channel, parts, header, parent)
        if att.recovering and parent.get("msg_id") not in self.own_ids:
            att.buffered.append(item)  # held until the journal's answer is merged
        elif self._reply_went_astray(channel, header, parent, parts):
            # A request sent on a websocket that is gone finished: the server routed its
            # reply to that dead connection. The journal has it: fetch, then deliver in order.
            att.buffered.append(item)
            att.recovering = True
            self._spawn(self._guard(att, self._fetch_journal))
        else:
            try:
                self._accept(*item)
            except Exception:  # a bug here must end this connection, not tornado's parser
                log.exception("kernel %s: delivering a message failed", self.kernel_id)
                self._end(att, "delivering a message failed")

    def _reply_went_astray(self, channel: str, header: dict, parent: dict, parts: list) -> bool:
        if self.mode != "journal" or channel != "iopub" or header.get("msg_type") != "status":
            return False
        out = self.outstanding.get(parent.get("msg_id"))
        return (
            out is not None
            and not out["replied"]
            and out["att"] < self.attachments
            and b'"idle"' in bytes(parts[3])
        )

    def _accept(self, seq, channel: str, parts: list, header: dict, parent: dict) -> None:
        """One message from the kernel: drop duplicates, answer our own, deliver the rest."""
        if seq is not None and self.mode == "journal":
            if seq <= self.low or seq in self.seen:
                return
            self.seen.add(seq)
            if len(self.seen) > _SEEN_LIMIT:
                keep = sorted(self.seen)[-_SEEN_LIMIT // 2 :]
                self.low = max(self.low, keep[0] - 1)
                self.seen = set(keep)
        else:
            mid = header.get("msg_id")
            if mid in self.seen_ids:
                return
            self.seen_ids[mid] = None
            if len(self.seen_ids) > _IDS_LIMIT:
                self.seen_ids.popitem(last=False)
        msg_type = header.get("msg_type", "")
        pid = parent.get("msg_id")
        state = None
        if channel == "iopub" and msg_type == "status":
            state = json.loads(bytes(parts[3])).get("execution_state")
            if pid not in self.own_ids:
                self._on_status(state, seq, pid)
        if channel == "iopub" and msg_type == DATA:
            self.forwards.on_data(json.loads(bytes(parts[3])), parts[4:])
            return
        if pid in self.own_ids:
            fut = self.waiters.pop(pid, None) if channel != "iopub" else None
            if fut is not None and not fut.done():
                fut.set_result((header, json.loads(bytes(parts[3])), parts[4:]))
            return
        out = self.outstanding.get(pid)
        if out is not None:
            out["seen"] = True
            if channel in ("shell", "control") and msg_type.endswith("_reply"):
                out["replied"] = True
            elif channel == "iopub" and msg_type == "status":
                out["idle"] = state == "idle"
            if out["replied"] and (out["idle"] or out["channel"] == "control"):
                del self.outstanding[pid]
        body = [bytes(p) for p in parts[:4]]
        signed = [wire.DELIM, self._sign(body), *body, *parts[4:]]
        if channel == "iopub" and self.publish is not None:
            self.publish(signed)
        elif channel != "iopub" and out is not None and out.get("lane") and self.lane:
            self.lane.deliver(channel, signed)  # its reply or input request: shell or stdin
        else:
            self._to_proxy(CHANNELS.get(channel, wire.IOPUB), signed)

    def _on_status(self, state: str | None, seq, pid) -> None:
        if state in ("idle", "busy"):
            self.state = state
            return
        if seq is not None or self.restarting or not self.ready:
            return
        # The server's own status: the kernel died, and came back fresh ("restarting") or not.
        if state in ("restarting", "dead"):
            self.state = "dead"
            self._event({"event": "kernel_died", "exit_code": None, "signal": None, "pid": None})
            if state == "restarting":
                self.ready = False
                att = self.current
                if att is not None:
                    self._spawn(self._guard(att, self._bootstrap))

    async def _pinger(self, att: Attachment) -> None:
        missed = 0
        while not att.done.done():
            before = att.pongs
            with contextlib.suppress(Exception):
                att.ws.ping(b"colabmagic")
            await asyncio.sleep(self.ping_interval)
            missed = missed + 1 if att.pongs == before else 0
            if missed >= 2:
                self._end(att, f"two pings unanswered in {2 * self.ping_interval:g}s")
                return

    # -- bootstrap and recovery ------------------------------------------------------------
    async def _bootstrap(self, att: Attachment) -> None:
        """Install the kernel-side helpers (and journal) before any client message passes."""
        self.ready = False
        self.low, self.seen = 0, set()
        self.forwards.reset(att)  # a fresh kernel has none of the old streams
        _, info, _ = await self._ask(att, "shell", "kernel_info_request", {}, 120.0)
        python = (info.get("language_info") or {}).get("name") == "python"
        journal = False
        if python and info.get("implementation") == "ipython":
            code = bootstrap_source(mock_gpu=self.mock_gpu, journal=self.want_journal, env=self.env)
            expr = {"last": "get_ipython().kernel._colabmagic_journal.last"}
            content = {
                "code": code,
                "silent": True,
                "store_history": False,
                "user_expressions": expr if self.want_journal else {},
                "allow_stdin": False,
                "stop_on_error": False,
            }
            _, reply, _ = await self._ask(att, "shell", "execute_request", content, 120.0)
            if reply.get("status") != "ok":
                log.error("kernel %s: bootstrap failed: %s", self.kernel_id, reply.get("evalue"))
            self.reassembly = reply.get("status") == "ok"
            last = (reply.get("user_expressions") or {}).get("last") or {}
            if last.get("status") == "ok":
                journal = True
                self.low = int(last["data"]["text/plain"])
        self.mode = "journal" if journal else "server-buffer"
        self.ready = True
        self.restarting = False
        self.state = "idle"
        self._event({"event": "kernel_ready", "pid": None})
        self._wake.set()

    async def _recover(self, att: Attachment) -> None:
        """After a reconnect: fetch what the dropped websocket lost, then resume delivery."""
        pending = [k for k, v in self.outstanding.items() if not v["replied"] or not v["idle"]]
        if self.mode == "journal":
            await self._fetch_journal(att)
        self.forwards.resume(att)
        if pending:
            await self._settle(att, pending)

    async def _fetch_journal(self, att: Attachment) -> None:
        """Ask the journal for every message we lack; merge it with what arrived meanwhile."""
        if self.mode == "journal":
            att.recovering = True
            try:
                request = {"after": self.low, "have": ranges(self.seen), "parents": []}
                _, reply, bufs = await self._ask(att, "control", JOURNAL_REQUEST, request, 30.0)
            except asyncio.TimeoutError:
                log.warning("kernel %s: the journal did not answer", self.kernel_id)
                reply, bufs = {"entries": [], "last": self.low}, []
            finally:
                att.recovering = False
            items, offset = [], 0
            for e in reply.get("entries", []):
                n = int(e.get("nbuf", 0))
                parts = [
                    dumps(e["header"]),
                    dumps(e["parent_header"]),
                    dumps(e["metadata"]),
                    dumps(e["content"]),
                    *bufs[offset : offset + n],
                ]
                offset += n
                items.append((e["seq"], e["channel"], parts, e["header"], e["parent_header"]))
            first = int(reply.get("first", self.low + 1))
            if first > self.low + 1:
                missing = set(range(self.low + 1, first)) - self.seen
                self.lost += len(missing)
            live = att.buffered
            att.buffered = []
            numbered = sorted((i for i in items + live if i[0] is not None), key=lambda i: i[0])
            for item in numbered + [i for i in live if i[0] is None]:
                self._accept(*item)
            last = int(reply.get("last", self.low))
            self.low = max(self.low, last)
            self.seen = {s for s in self.seen if s > self.low}

    async def _settle(self, att: Attachment, pending: list) -> None:
        """Requests sent before the drop and still unanswered: make sure none waits forever."""
        loop = asyncio.get_running_loop()
        previous = None
        while not att.done.done():
            left = [k for k in pending if k in self.outstanding]
            if not left:
                return
            await asyncio.sleep(self.poll_interval)
            try:
                model = await loop.run_in_executor(None, self.rest.kernel_model, self.kernel_id)
            except Exception as exc:  # noqa: BLE001 - the next poll retries
                log.info("kernel %s: state poll failed (%s)", self.kernel_id, exc)
                continue
            mark = (model.get("execution_state"), model.get("last_activity"))
            stable = mark[0] == "idle" and mark == previous
            previous = mark
            if not stable:
                continue
            for msg_id in [k for k in pending if k in self.outstanding]:
                self._unanswered(att, msg_id)
            return

    def _unanswered(self, att: Attachment, msg_id: str) -> None:
        out = self.outstanding[msg_id]  # kept while its answers are made: they go where it says
        header = out["header"]
        if not out["seen"] and self.mode == "journal" and not out["resent"]:
            # The journal holds every message of a request the kernel saw; none came, so the
            # request itself was lost on the way: send it again (the kernel is idle).
            out["resent"] = True
            self.upq.append((out["channel"], out["parts"], msg_id))
            self._wake.set()
            return
        if not out["replied"]:
            reply_type = header.get("msg_type", "execute_request").replace("_request", "_reply")
            error = {
                "ename": "OutputLost",
                "evalue": (
                    "the link to the Jupyter server dropped and the server did not keep this "
                    "request's output; the kernel has finished it (rerun it if needed)"
                ),
                "traceback": [],
            }
            self.lost += 1
            if reply_type == "execute_reply":
                self._synth("iopub", "error", error, header)
            content = {"status": "error", **error, "execution_count": None}
            self._synth(out["channel"], reply_type, content, header)
        if not out["idle"] and out["channel"] == "shell":
            self._synth("iopub", "status", {"execution_state": "idle"}, header)
        self.outstanding.pop(msg_id, None)

    def _synth(self, channel: str, msg_type: str, content: dict, parent: dict) -> None:
        header = new_header(msg_type, "colabmagic-link")
        parts = [dumps(header), dumps(parent), b"{}", dumps(content)]
        self._accept(None, channel, parts, header, parent)

    # -- agent operations (the proxy's AGENT channel) --------------------------------------
    async def _op(self, op: dict) -> None:
        name = op.get("op")
        reply: dict = {"event": "reply", "reply_to": op.get("id"), "op": name, "ok": True}
        loop = asyncio.get_running_loop()
        try:
            if name == "interrupt" or (name == "signal" and int(op.get("signum", 0)) == 2):
                await loop.run_in_executor(None, self.rest.interrupt, self.kernel_id)
            elif name == "signal":
                reply.update(ok=False, error="a Jupyter server can only interrupt (SIGINT)")
            elif name == "restart":
                self.restarting = True
                self.ready = False
                await loop.run_in_executor(None, self.rest.restart, self.kernel_id)
                att = self.current
                if att is not None:
                    self._spawn(self._guard(att, self._bootstrap))
            elif name == "info":
                reply["info"] = self.info()
            elif name == "shutdown":
                await loop.run_in_executor(None, self.rest.delete, self.kernel_id)
                self._event(reply)
                self._event({"event": "shutdown"})
                return
            elif name == "tcp_close":
                reply["closed"] = self.forwards.close_port(int(op["port"]))
            else:
                reply.update(ok=False, error=f"unknown operation {name!r}")
        except Exception as exc:  # noqa: BLE001 - the caller gets the reason in the reply
            reply.update(ok=False, error=str(exc))
        self._event(reply)


def _socket_of(ws):
    stream = getattr(getattr(ws, "protocol", None), "stream", None) or getattr(ws, "stream", None)
    return getattr(stream, "socket", None)


def _tune(ws) -> None:
    """TCP_NODELAY (and TCP_QUICKACK where the OS has it) on the websocket's socket."""
    sock = _socket_of(ws)
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _quickack(ws)


def _quickack(ws) -> None:
    quickack = getattr(socket, "TCP_QUICKACK", None)
    sock = _socket_of(ws)
    if quickack is not None and sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)


def _abort(ws) -> None:
    """Close the websocket's TCP stream now (a half-open link never finishes a close handshake)."""
    stream = getattr(getattr(ws, "protocol", None), "stream", None)
    if stream is not None:
        with contextlib.suppress(Exception):
            stream.close()
