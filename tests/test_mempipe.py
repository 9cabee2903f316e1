"""The in-memory pipe between the Jupyter link's thread and its proxy's (colabmagic.mempipe)."""

from __future__ import annotations

import select
import threading

import pytest

from colabmagic import mempipe, wire


def _readable(end: mempipe.MemoryStream, timeout: float = 5.0) -> bool:
    return bool(select.select([end.read_fd], [], [], timeout)[0])


def test_frames_pass_as_objects_in_order_and_wake_the_reader():
    a, b = mempipe.pair()
    try:
        assert not _readable(b, 0)
        part = memoryview(bytearray(b"x" * 1000))
        a.send_json(wire.HELLO, 0, {"resume_from": 3})
        a.send_msg(1, wire.SHELL, [b"<IDS|MSG>", part])
        a.send_frame(wire.ACK, 7, [])
        assert a.flush() is True
        assert not a.wants_write()
        assert _readable(b)
        frames = b.read_frames()
        assert [(k, s) for k, s, _ in frames] == [(wire.HELLO, 0), (wire.MSG, 1), (wire.ACK, 7)]
        channel, parts = wire.decode_msg(frames[1][2])
        assert channel == wire.SHELL
        assert parts[1] is part  # no copy: the reader gets the sender's buffer
        assert wire.decode_msg(wire.encode_msg(wire.SHELL, [b"a"])[0] + b"a") == (
            wire.SHELL,
            [b"a"],
        )
        assert b.read_frames() == []
        assert not _readable(b, 0)  # reading drained the wake-up
    finally:
        a.close()
        b.close()


def test_closing_one_end_delivers_what_was_sent_then_the_end_of_the_stream():
    a, b = mempipe.pair()
    a.send_msg(1, wire.IOPUB, [b"last words"])
    a.close()
    assert _readable(b)
    frames = b.read_frames()
    assert len(frames) == 1
    assert b.closed  # frames first, then closed, as wire.FramedStream does
    with pytest.raises(wire.StreamClosed):
        b.read_frames()
    # A write towards a closed end is dropped and reported by flush, like EPIPE on a socket.
    c, d = mempipe.pair()
    d.close()
    c.send_msg(1, wire.SHELL, [b"lost"])
    with pytest.raises(wire.StreamClosed):
        c.flush()
    with pytest.raises(wire.StreamClosed):
        c.send_msg(2, wire.SHELL, [b"after"])
    for end in (b, c):
        end.close()
        end.close()  # idempotent
    assert a.read_fd == b.read_fd == c.read_fd == d.read_fd == -1  # both ends: descriptors gone


def test_two_threads_lose_nothing_and_keep_the_order():
    a, b = mempipe.pair()
    n = 20000
    got: list[int] = []

    def reader() -> None:
        while True:
            if not _readable(b):
                return
            try:
                frames = b.read_frames()
            except wire.StreamClosed:
                return
            got.extend(seq for _, seq, _ in frames)
            if b.closed:
                return

    t = threading.Thread(target=reader)
    t.start()
    for seq in range(1, n + 1):
        a.send_msg(seq, wire.IOPUB, [b"p"])
    a.close()
    t.join(30)
    assert not t.is_alive()
    assert got == list(range(1, n + 1))
    b.close()
