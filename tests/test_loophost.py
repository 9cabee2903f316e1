"""The selector that lets an asyncio loop and a ZeroMQ-polling guest share one thread."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
import zmq

from colabmagic import loophost


class EchoGuest:
    """A guest that answers every message on a ZeroMQ REP socket, and records its end."""

    def __init__(self, ctx: zmq.Context, fail_on: bytes | None = None):
        self.rep = ctx.socket(zmq.REP)
        self.port = self.rep.bind_to_random_port("tcp://127.0.0.1")
        self.fail_on = fail_on
        self.threads: set = set()
        self.done = False
        self.ended = threading.Event()
        self.error: BaseException | None = None

    def poll_setup(self, poller: zmq.Poller) -> float:
        poller.register(self.rep, zmq.POLLIN)
        return 50

    def poll_events(self, events: dict) -> bool:
        self.threads.add(threading.current_thread())
        if self.rep in events:
            msg = self.rep.recv()
            if msg == self.fail_on:
                raise RuntimeError("the guest failed")
            self.rep.send(b"echo " + msg)
        return not self.done

    def poll_end(self, error: BaseException | None) -> None:
        self.error = error
        self.ended.set()


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def _ask(ctx: zmq.Context, port: int, msg: bytes) -> bytes:
    req = ctx.socket(zmq.REQ)
    req.linger = 0
    req.connect(f"tcp://127.0.0.1:{port}")
    try:
        req.send(msg)
        assert req.poll(5000), "no answer within 5 s"
        return req.recv()
    finally:
        req.close()


def test_the_loop_and_a_guest_share_one_thread(ctx):
    loop, selector = loophost.new_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    guest = EchoGuest(ctx)
    try:
        selector.add_guest(guest)
        # The guest's ZeroMQ socket is served...
        assert _ask(ctx, guest.port, b"one") == b"echo one"

        # ...while the loop's own readers, timers and thread-safe calls still run, in that thread.
        a, b = socket.socketpair()

        async def read_one() -> bytes:
            got = loop.create_future()
            loop.add_reader(a.fileno(), lambda: got.set_result(a.recv(10)))
            try:
                await asyncio.sleep(0.01)
                return await got
            finally:
                loop.remove_reader(a.fileno())

        fut = asyncio.run_coroutine_threadsafe(read_one(), loop)
        b.send(b"hi")
        assert fut.result(5) == b"hi"
        assert _ask(ctx, guest.port, b"two") == b"echo two"
        assert guest.threads == {thread}
        assert selector.thread is thread

        guest.done = True  # it leaves at its next poll and is told so
        assert guest.ended.wait(5)
        assert guest.error is None
        a.close()
        b.close()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_a_failing_guest_is_told_and_the_loop_goes_on(ctx):
    loop, selector = loophost.new_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    bad, good = EchoGuest(ctx, fail_on=b"boom"), EchoGuest(ctx)
    try:
        selector.add_guest(bad)
        selector.add_guest(good)
        req = ctx.socket(zmq.REQ)
        req.linger = 0
        req.connect(f"tcp://127.0.0.1:{bad.port}")
        req.send(b"boom")
        assert bad.ended.wait(5)
        assert isinstance(bad.error, RuntimeError)
        req.close()
        assert _ask(ctx, good.port, b"still") == b"echo still"
        assert asyncio.run_coroutine_threadsafe(asyncio.sleep(0, "ok"), loop).result(5) == "ok"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
    # Closing the loop closes its selector, which ends the guests still polled.
    assert good.ended.is_set()
    assert good.error is None


def test_run_alone_drives_a_guest_in_its_own_thread(ctx):
    guest = EchoGuest(ctx)
    thread = loophost.run_alone(guest, "test-guest")
    try:
        assert _ask(ctx, guest.port, b"x") == b"echo x"
        assert guest.threads == {thread}
    finally:
        guest.done = True
        _ask(ctx, guest.port, b"last")  # wakes the poll; then it sees done
        thread.join(5)
    assert not thread.is_alive()
    assert guest.ended.is_set()


def test_a_guest_added_before_the_loop_exists_is_refused():
    selector = loophost.ZmqSelector()
    with pytest.raises(RuntimeError, match="new_loop"):
        selector.add_guest(EchoGuest.__new__(EchoGuest))


def test_registering_a_descriptor_twice_is_refused():
    loop, selector = loophost.new_loop()
    a, b = socket.socketpair()
    try:
        loop.add_reader(a.fileno(), lambda: None)
        with pytest.raises(KeyError):
            selector.register(a.fileno(), 1)
        assert selector.get_key(a).fd == a.fileno()  # by object or by descriptor
    finally:
        loop.remove_reader(a.fileno())
        loop.close()
        a.close()
        b.close()
