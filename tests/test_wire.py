"""The framed stream and the resend log, over real sockets."""

from __future__ import annotations

import os
import select
import socket

import pytest

from colabmagic import wire


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    sa = wire.FramedStream(a.fileno(), a.fileno())
    sb = wire.FramedStream(b.fileno(), b.fileno())
    yield sa, sb
    a.close()
    b.close()


def pump(src: wire.FramedStream, dst: wire.FramedStream, want: int) -> list:
    """Move frames from src to dst until *want* frames arrived (no sleeps: select)."""
    got: list = []
    for _ in range(100000):
        src.flush()
        r, _, _ = select.select([dst.read_fd], [], [], 5)
        assert r, "no data within 5 s"
        got += dst.read_frames()
        if len(got) >= want:
            return got
    raise AssertionError("too many iterations")


def test_messages_round_trip_with_parts_intact(pair):
    a, b = pair
    parts = [b"<IDS|MSG>", b"sig", b'{"msg_id": "1"}', b"", bytes(range(256)) * 10]
    a.send_msg(7, wire.IOPUB, parts)
    a.send_frame(wire.ACK, 3, [])
    frames = pump(a, b, 2)
    kind, seq, body = frames[0]
    assert (kind, seq) == (wire.MSG, 7)
    channel, got = wire.decode_msg(body)
    assert channel == wire.IOPUB
    assert [bytes(p) for p in got] == parts
    assert frames[1][:2] == (wire.ACK, 3)


def test_large_frame_crosses_a_small_socket_buffer_without_blocking(pair):
    a, b = pair
    payload = os.urandom(1 << 20) * 24  # 24 MiB, far above the socket buffer
    a.send_msg(1, wire.SHELL, [b"head", memoryview(payload)])
    assert not a.flush(), "a non-blocking flush cannot write 24 MiB at once"
    ((_kind, _seq, body),) = pump(a, b, 1)
    _, parts = wire.decode_msg(body)
    assert bytes(parts[1]) == payload


def shut_write(stream: wire.FramedStream) -> None:
    """End the stream's sending side (the peer then reads end of stream)."""
    with socket.socket(fileno=os.dup(stream.write_fd)) as sock:
        sock.shutdown(socket.SHUT_WR)


def test_end_of_stream_is_reported(pair):
    a, b = pair
    shut_write(a)
    select.select([b.read_fd], [], [], 5)
    with pytest.raises(wire.StreamClosed, match="end of stream"):
        b.read_frames()


def test_frames_completed_before_the_end_come_out_first(pair):
    a, b = pair
    a.send_frame(wire.ACK, 5, [])
    assert a.flush()
    shut_write(a)
    select.select([b.read_fd], [], [], 5)
    assert [f[:2] for f in b.read_frames()] == [(wire.ACK, 5)]
    assert b.closed
    with pytest.raises(wire.StreamClosed, match="end of stream"):
        b.read_frames()


def test_end_of_stream_inside_a_frame_is_reported(pair):
    a, b = pair
    os.write(a.write_fd, wire.HEADER.pack(wire.MSG, 1, 100) + b"x" * 10)
    shut_write(a)
    select.select([b.read_fd], [], [], 5)
    with pytest.raises(wire.StreamClosed, match="inside a frame"):
        b.read_frames()


def test_garbage_is_a_protocol_error(pair):
    a, b = pair
    os.write(a.write_fd, b"\xff" * wire.HEADER.size)
    select.select([b.read_fd], [], [], 5)
    with pytest.raises(wire.ProtocolError, match="bad frame header"):
        b.read_frames()


def test_outlog_resends_only_unacknowledged_and_counts_evictions():
    log = wire.OutLog(max_bytes=10)
    for i in range(4):
        log.append(wire.IOPUB, [bytes([i]) * 3])
    assert [s for s, _, _ in log.after(0)] == [2, 3, 4]  # 1 evicted past 10 bytes
    assert log.dropped == 1
    log.ack(3)
    assert [s for s, _, _ in log.after(0)] == [4]
    assert log.after(4) == []


def test_many_small_frames_in_one_read_come_out_in_order(pair):
    a, b = pair
    for i in range(5000):
        a.send_msg(i + 1, wire.IOPUB, [b"line %d\n" % i])
    frames = pump(a, b, 5000)
    assert [seq for _, seq, _ in frames] == list(range(1, 5001))
    assert bytes(wire.decode_msg(frames[-1][2])[1][0]) == b"line 4999\n"


def test_msg_id_helpers_find_the_delimiter_and_tolerate_garbage():
    parts = [b"ident", wire.DELIM, b"sig", b'{"msg_id": "h"}', b'{"msg_id": "p"}', b"{}"]
    i = wire.delim_index(parts, 4)
    assert i == 1
    assert (wire.header_msg_id(parts, i + 2), wire.header_msg_id(parts, i + 3)) == ("h", "p")
    assert wire.delim_index([b"a", b"b", wire.DELIM], 2) is None, "only the first parts count"
    assert wire.header_msg_id([b"not json"], 0) is None
    assert wire.header_msg_id([b"[1, 2]"], 0) is None
    assert wire.header_msg_id([b"{}"], 0) is None
    assert wire.header_msg_id([], 3) is None
