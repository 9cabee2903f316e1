"""The kernel-side journal: every client-bound message numbered and kept in a bounded ring.

Runs inside an ipykernel reached through a Jupyter server (no agent there to number messages), so
it is executed from source like ``kernel_ext`` and uses the standard library and ipykernel only.

:func:`install` wraps the kernel's ``Session.send``: each message the kernel sends (IOPub, shell
and control replies, stdin requests) gets ``header["colabmagic_seq"]`` -- a number that grows by
one per message -- and is kept in a ring bounded by count and bytes. After a websocket drop the
local side asks, on the **control** channel (served by its own thread, so it answers while a cell
runs), for everything above a number that it does not already have::

    colabmagic_journal_request  {"after": n, "have": [[a, b], ...], "parents": [msg_id, ...]}
    colabmagic_journal_reply    {"last": m, "first": f, "entries": [...], "seen_parents": [...]}

Each entry is ``{"seq", "channel", "header", "parent_header", "metadata", "content", "nbuf"}``; the
reply's buffers are the entries' buffers in order. ``seen_parents`` lists the asked request ids
that any kept message answers (the kernel received them). The reply itself is not journaled, and
the numbers only ever go up, so the local side drops duplicates by number.
"""

import bisect
import os
import threading
from collections import deque

REQUEST = "colabmagic_journal_request"
REPLY = "colabmagic_journal_reply"
SEQ = "colabmagic_seq"


def _size(content, buffers):
    """A cheap estimate of a message's bytes (no serialization on the hot path)."""
    n = 256 + sum(memoryview(b).nbytes for b in buffers or ())
    text = content.get("text") if isinstance(content, dict) else None
    if isinstance(text, str):
        n += len(text)
    data = content.get("data") if isinstance(content, dict) else None
    if isinstance(data, dict):
        n += sum(len(v) for v in data.values() if isinstance(v, str))
    return n


class Journal:
    """The ring of numbered messages of one kernel; see the module docstring."""

    def __init__(self, kernel, max_messages=20000, max_bytes=256 << 20):
        self.kernel = kernel
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.ring = deque()
        self.bytes = 0
        self.last = 0
        self.lock = threading.RLock()
        self.pid = os.getpid()

    def channel_of(self, stream):
        k = self.kernel
        if stream is getattr(k, "control_stream", None) or stream is getattr(
            k, "control_socket", None
        ):
            return "control"
        if stream is getattr(k, "stdin_socket", None):
            return "stdin"
        iopub = (getattr(k, "iopub_socket", None), getattr(k, "iopub_thread", None))
        if stream in iopub or type(stream).__name__ in ("IOPubThread", "BackgroundSocket"):
            return "iopub"
        return "shell"

    def wrap(self, session):
        orig = session.send
        journal = self

        def send(stream, msg_or_type, content=None, parent=None, ident=None, buffers=None,
                 track=False, header=None, metadata=None):  # fmt: skip
            if stream is None or os.getpid() != journal.pid:
                return orig(
                    stream, msg_or_type, content, parent, ident, buffers, track, header, metadata
                )
            if isinstance(msg_or_type, dict):
                msg = msg_or_type
            else:
                msg = session.msg(
                    msg_or_type, content=content, parent=parent, header=header, metadata=metadata
                )
            if msg["header"].get("msg_type") == REPLY:
                return orig(stream, msg, ident=ident, buffers=buffers, track=track)
            bufs = list(buffers if buffers is not None else msg.get("buffers") or [])
            with journal.lock:
                seq = journal.last + 1
                msg["header"][SEQ] = seq
                result = orig(stream, msg, ident=ident, buffers=bufs or None, track=track)
                journal.last = seq
                journal.keep(seq, journal.channel_of(stream), msg, bufs)
            return result

        session.send = send
        return orig

    def keep(self, seq, channel, msg, buffers):
        size = _size(msg.get("content"), buffers)
        self.ring.append((seq, channel, msg, buffers, size))
        self.bytes += size
        while self.ring and (len(self.ring) > self.max_messages or self.bytes > self.max_bytes):
            self.bytes -= self.ring.popleft()[4]

    def answer(self, stream, ident, parent):
        """The control handler: the kept messages the asker lacks."""
        req = parent.get("content") or {}
        after = int(req.get("after", 0))
        have = sorted((int(a), int(b)) for a, b in req.get("have") or ())
        starts = [a for a, _ in have]
        asked = set(req.get("parents") or ())
        entries, buffers, seen = [], [], set()
        with self.lock:
            ring = list(self.ring)
            last = self.last
        for seq, channel, msg, bufs, _ in ring:
            pid = (msg.get("parent_header") or {}).get("msg_id")
            if pid in asked:
                seen.add(pid)
            i = bisect.bisect_right(starts, seq) - 1
            if seq <= after or (i >= 0 and seq <= have[i][1]):
                continue
            entries.append(
                {
                    "seq": seq,
                    "channel": channel,
                    "header": msg["header"],
                    "parent_header": msg.get("parent_header") or {},
                    "metadata": msg.get("metadata") or {},
                    "content": msg.get("content") or {},
                    "nbuf": len(bufs),
                }
            )
            buffers.extend(bufs)
        content = {
            "last": last,
            "first": ring[0][0] if ring else last + 1,
            "entries": entries,
            "seen_parents": sorted(seen),
        }
        self.kernel.session.send(stream, REPLY, content, parent, ident=ident, buffers=buffers)


def install(kernel=None, **limits):
    """Start journaling *kernel* (default: the running IPython kernel); idempotent."""
    if kernel is None:
        from IPython import get_ipython

        kernel = get_ipython().kernel
    journal = getattr(kernel, "_colabmagic_journal", None)
    if journal is not None:
        return journal
    journal = Journal(kernel, **limits)
    journal.wrap(kernel.session)
    kernel.control_handlers[REQUEST] = journal.answer
    kernel._colabmagic_journal = journal
    return journal
