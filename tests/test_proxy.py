"""The proxy against a scripted agent: link edge cases that real processes hit only by chance."""

from __future__ import annotations

import json
import socket

from colabmagic import wire
from colabmagic.proxy import Proxy
from colabmagic.testing import wait_until

WELCOME = {
    "version": wire.PROTOCOL_VERSION,
    "id": "scripted",
    "last_up": 0,
    "resume_from": 0,
    "gap": 0,
    "connection": {"key": "k" * 32, "signature_scheme": "hmac-sha256"},
    "info": {},
}


class ScriptedPipe:
    """One end of a socketpair for the proxy; the test writes the agent's side in advance."""

    description = "scripted agent"

    def __init__(self, frames: list[tuple[int, int, list]], *, hang_up: bool):
        self.ours, self.theirs = socket.socketpair()
        self.ours.setblocking(False)
        self.read_fd = self.write_fd = self.ours.fileno()
        out = bytearray()
        for kind, seq, pieces in frames:
            body = b"".join(bytes(p) for p in pieces)
            out += wire.HEADER.pack(kind, seq, len(body)) + body
        self.theirs.sendall(out)
        if hang_up:
            self.theirs.close()

    def close(self) -> None:
        self.ours.close()

    def failure(self) -> tuple[bool, str]:
        return False, "scripted hang-up"


def test_frames_followed_at_once_by_end_of_stream_are_handled_then_the_link_resumes():
    """WELCOME, a message and the end of the stream in one read: the proxy delivers the message,
    then treats the end as a lost link and reconnects (it used to crash on the ACK it sent)."""
    iopub = [b"topic", b"<IDS|MSG>", b"", b"{}", b"{}", b"{}", b"{}"]
    first = [
        (wire.WELCOME, 0, [json.dumps(WELCOME).encode()]),
        (wire.MSG, 1, wire.encode_msg(wire.IOPUB, iopub)),
    ]
    pipes = [
        ScriptedPipe(first, hang_up=True),
        ScriptedPipe([(wire.WELCOME, 0, [json.dumps({**WELCOME, "last_up": 0}).encode()])],
                     hang_up=False),
    ]  # fmt: skip
    opened = []

    def open_pipe() -> ScriptedPipe:
        opened.append(pipes[len(opened)])
        return opened[-1]

    proxy = Proxy(open_pipe, name="scripted", reconnect_timeout=30)
    try:
        proxy.start(timeout=30)
        wait_until(lambda: proxy.reconnects == 1 and proxy.state == "up", timeout=30,
                   what="the proxy to reconnect after the hang-up")  # fmt: skip
        assert proxy.dead_reason is None
        assert proxy._last_down == 1  # the message before the hang-up was processed, once
    finally:
        proxy.close()
        for p in pipes:
            p.theirs.close()
