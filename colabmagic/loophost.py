"""One thread for an asyncio loop and the proxy it feeds: a selector that polls ZeroMQ sockets too.

The Jupyter-server transport runs its kernel links (:mod:`colabmagic.transport.jupyter_link`) on
an asyncio loop, and the :class:`~colabmagic.proxy.Proxy` they feed polls ZeroMQ sockets. In two
threads, every message crosses a thread hand-over each way (a socket write, a wake-up, the GIL
changing hands): measured at about 0.9 ms of a ~9 ms ``pass`` round trip. :class:`ZmqSelector`
lets them share one thread instead. It is a :class:`selectors.BaseSelector` built on
:class:`zmq.Poller`, so the loop's own file descriptors and the *guests'* sockets wait in one poll;
a guest (the proxy) registers what it waits for before each poll and handles what fired after it.

A guest implements :class:`PollGuest`. :func:`run_alone` drives one guest in a thread of its own
with the same three calls, which is how a proxy runs for every other transport.
"""

from __future__ import annotations

import asyncio
import logging
import math
import selectors
import threading
from collections.abc import Mapping
from typing import Any, Protocol

import zmq

log = logging.getLogger("colabmagic.loophost")


class PollGuest(Protocol):
    """What a selector's guest does around each poll."""

    def poll_setup(self, poller: zmq.Poller) -> float:
        """Register what to wait for; return the longest wait wanted, in milliseconds."""
        ...

    def poll_events(self, events: dict) -> bool:
        """Handle *events* (``{socket or fd: mask}``); False when the guest is done."""
        ...

    def poll_end(self, error: BaseException | None) -> None:
        """Called once, in the polling thread, when the guest leaves (*error* if it failed)."""
        ...


def _fd(fileobj: Any) -> int:
    return fileobj if isinstance(fileobj, int) else int(fileobj.fileno())


class _KeyMap(Mapping):
    """The selector's keys by file object or descriptor (:meth:`selectors.BaseSelector.get_map`)."""

    def __init__(self, keys: dict[int, selectors.SelectorKey]):
        self._keys = keys

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self):
        return iter(self._keys)

    def __getitem__(self, fileobj: Any) -> selectors.SelectorKey:
        return self._keys[_fd(fileobj)]


class ZmqSelector(selectors.BaseSelector):
    """A selector whose poll is a :class:`zmq.Poller`, shared with :class:`PollGuest` objects.

    Guests are added and removed only in the polling thread (:meth:`add_guest` schedules it
    through the loop when called from another thread).
    """

    def __init__(self) -> None:
        self._keys: dict[int, selectors.SelectorKey] = {}
        self._guests: list[PollGuest] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None  # the one that polls

    # -- selectors.BaseSelector -----------------------------------------------------------
    def register(self, fileobj, events, data=None):
        fd = _fd(fileobj)
        if fd in self._keys:
            msg = f"{fileobj!r} is already registered"
            raise KeyError(msg)
        if not events or events & ~(selectors.EVENT_READ | selectors.EVENT_WRITE):
            msg = f"invalid events: {events!r}"
            raise ValueError(msg)
        key = self._keys[fd] = selectors.SelectorKey(fileobj, fd, events, data)
        return key

    def unregister(self, fileobj):
        return self._keys.pop(_fd(fileobj))

    def get_map(self) -> Mapping:
        return _KeyMap(self._keys)

    def close(self) -> None:
        self._keys.clear()
        for guest in list(self._guests):
            self._leave(guest, None)

    def select(self, timeout: float | None = None):
        self.thread = threading.current_thread()
        poller = zmq.Poller()
        for fd, key in self._keys.items():
            mask = (zmq.POLLIN if key.events & selectors.EVENT_READ else 0) | (
                zmq.POLLOUT if key.events & selectors.EVENT_WRITE else 0
            )
            poller.register(fd, mask)
        wait = -1.0 if timeout is None else max(0.0, math.ceil(timeout * 1000))
        for guest in list(self._guests):
            try:
                want = guest.poll_setup(poller)
            except Exception as exc:  # noqa: BLE001 - the guest reports it (poll_end)
                self._leave(guest, exc)
                continue
            wait = want if wait < 0 else min(wait, want)
        events = dict(poller.poll(None if wait < 0 else wait))
        for guest in list(self._guests):
            try:
                going = guest.poll_events(events)
            except Exception as exc:  # noqa: BLE001 - the guest reports it (poll_end)
                self._leave(guest, exc)
                continue
            if not going:
                self._leave(guest, None)
        ready = []
        for fd, mask in events.items():
            key = self._keys.get(fd) if isinstance(fd, int) else None
            if key is not None:
                got = (selectors.EVENT_READ if mask & (zmq.POLLIN | zmq.POLLERR) else 0) | (
                    selectors.EVENT_WRITE if mask & (zmq.POLLOUT | zmq.POLLERR) else 0
                )
                if got & key.events:
                    ready.append((key, got & key.events))
        return ready

    # -- guests ---------------------------------------------------------------------------
    def add_guest(self, guest: PollGuest) -> None:
        """Poll for *guest* from the next turn of the loop on."""
        if self.loop is None:
            msg = "the ZmqSelector has no loop yet: make one with new_loop()"
            raise RuntimeError(msg)
        self.loop.call_soon_threadsafe(self._guests.append, guest)

    def _leave(self, guest: PollGuest, error: BaseException | None) -> None:
        if guest in self._guests:
            self._guests.remove(guest)
            guest.poll_end(error)


def new_loop() -> tuple[asyncio.AbstractEventLoop, ZmqSelector]:
    """A new asyncio loop polled by a :class:`ZmqSelector`; returns both."""
    selector = ZmqSelector()
    loop = asyncio.SelectorEventLoop(selector)
    selector.loop = loop
    return loop, selector


def run_alone(guest: PollGuest, name: str) -> threading.Thread:
    """Drive *guest* in a daemon thread of its own until it is done; returns the thread."""

    def run() -> None:
        error: BaseException | None = None
        try:
            while True:
                poller = zmq.Poller()
                wait = guest.poll_setup(poller)
                if not guest.poll_events(dict(poller.poll(wait))):
                    break
        except Exception as exc:  # noqa: BLE001 - the guest reports it (poll_end)
            error = exc
        guest.poll_end(error)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread
