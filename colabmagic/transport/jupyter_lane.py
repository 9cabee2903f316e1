"""The in-process lane: a Session's cells straight to its Jupyter-server link, past the proxy.

Through a Jupyter server, the :class:`~colabmagic.transport.jupyter_link.KernelLink` runs in this
process, on the transport's event-loop thread. Without the lane, every message of a cell crossed
two threads of ours besides the Session's: the link's, then the proxy's (over the link pipe and
the :mod:`colabmagic.wire` framing), before the Session's socket. On the 2-core machine we
measure on, the proxy's thread taking each message from the link and republishing it cost about
as much as the whole server hop, though none of it was needed in-process. The lane removes the
proxy's thread from a cell's path without changing what any client sees:

- **IOPub**: the link publishes each kernel message on the proxy's own PUB socket, from its own
  thread (:meth:`Proxy.publish <colabmagic.proxy.Proxy.publish>`). Every subscriber -- the
  Session, the comm relay, JupyterLab or ``jupyter console`` on the connection file's port --
  gets it once, as before, and in the kernel's order.
- **The Session's own requests** (:meth:`Lane.execute`) go to the link on its loop, as if the
  proxy had forwarded them (the link's exactly-once machinery -- outstanding requests, journal
  recovery, the resend of what a drop lost -- applies unchanged). Their shell reply and stdin
  requests come back on two ZeroMQ ``inproc`` PUSH/PULL pairs that :meth:`Session.run
  <colabmagic.session.Session.run>` polls instead of its shell and stdin sockets. The answer to
  ``input()`` goes the usual way (the stdin socket, the proxy, the link).

Everything else -- other clients' requests, control, comms the Session sends, transfers --
still goes through the proxy.

**Handed on last.** A message handed to the Session's thread wakes it, but it must then wait for
the GIL until the link's thread blocks, and tornado still had Python to run after each message
(the next frame's read, the loop's bookkeeping). So the link's loop runs on a
:class:`HandOffSelector`: the lane queues what it hands on, and the selector sends it just before
the loop blocks in ``select``, in arrival order, within the same turn of the loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import selectors
from typing import Any

import zmq

from colabmagic import wire
from colabmagic.transport.jupyter_link import dumps, new_header

log = logging.getLogger("colabmagic.jupyter")


class HandOffSelector(selectors.DefaultSelector):
    """The link loop's selector: runs the queued hand-offs (``later``) just before each select."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: collections.deque = collections.deque()
        self.later = self.pending.append  # (fn, arg): fn(arg) before the loop next blocks

    def select(self, timeout=None):
        pending = self.pending
        while pending:
            fn, arg = pending.popleft()
            try:
                fn(arg)
            except Exception:  # a failed hand-off must not stop the loop
                log.exception("handing a kernel message on failed")
        return super().select(timeout)


class Lane:
    """One Session's lane to the link of its kernel; see the module docstring.

    Parameters
    ----------
    link
        The kernel's :class:`~colabmagic.transport.jupyter_link.KernelLink`.
    loop
        The asyncio loop the link runs on (in another thread).
    publish
        The proxy's :meth:`~colabmagic.proxy.Proxy.publish`.
    session
        The Session client's ``jupyter_client.session.Session``: its session id goes in the
        requests' headers (they are not signed: they never leave this process).
    later
        :attr:`HandOffSelector.later` of the loop's selector.
    """

    def __init__(self, link: Any, loop: asyncio.AbstractEventLoop, publish, session: Any, later):
        self.link = link
        self.loop = loop
        self.session = session
        self.closed = False
        self._later = later
        self._publish = publish
        self._ctx = zmq.Context(io_threads=0)  # inproc only: no I/O thread
        name = os.urandom(8).hex()
        self._urls = {c: f"inproc://colabmagic-lane-{name}-{c}" for c in ("shell", "stdin")}
        self._push: dict[str, zmq.Socket] = {}
        asyncio.run_coroutine_threadsafe(self._attach(), loop).result(10)
        self.shell = self._pull("shell")
        self.stdin = self._pull("stdin")

    def _pull(self, channel: str) -> zmq.Socket:
        sock = self._ctx.socket(zmq.PULL)
        sock.linger = 0
        sock.connect(self._urls[channel])
        return sock

    async def _attach(self) -> None:
        for channel, url in self._urls.items():
            sock = self._ctx.socket(zmq.PUSH)
            sock.linger = 0
            sock.setsockopt(zmq.SNDHWM, 0)  # never drop a reply; a cell reads them all
            sock.bind(url)
            self._push[channel] = sock
        self.link.publish, self.link.lane = self.publish, self

    # -- the link's side (its loop) ----------------------------------------------------------
    def publish(self, parts: list) -> None:
        """A kernel IOPub message (signed frames), to every subscriber of the proxy."""
        self._later((self._publish, parts))

    def deliver(self, channel: str, parts: list) -> None:
        """A reply or input request to a request of :meth:`execute` (signed frames)."""
        self._later((self._send, (channel, parts)))

    def _send(self, item: tuple) -> None:
        channel, parts = item
        sock = self._push.get(channel)
        if sock is not None:
            with contextlib.suppress(zmq.Again):  # the Session closed its end: nobody to tell
                sock.send_multipart(parts, zmq.NOBLOCK, copy=wire.small(parts))

    # -- the Session's side ------------------------------------------------------------------
    def execute(self, code: str, *, silent: bool, store_history: bool, allow_stdin: bool) -> str:
        """Send an ``execute_request`` (as jupyter_client's ``execute``); returns its msg_id."""
        if not isinstance(code, str):
            msg = f"code {code!r} must be a string"
            raise ValueError(msg)  # as jupyter_client's execute
        content = {
            "code": code,
            "silent": silent,
            "store_history": store_history,
            "user_expressions": {},
            "allow_stdin": allow_stdin,
            "stop_on_error": True,
        }
        header = new_header("execute_request", self.session.session)
        msg = [dumps(header), b"{}", b"{}", dumps(content)]
        self.loop.call_soon_threadsafe(self.link.submit, header, msg)
        return header["msg_id"]

    def close(self) -> None:
        """Give the link back its ordinary path (through the proxy) and close the lane."""
        if self.closed:
            return
        self.closed = True
        if self.loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._detach(), self.loop).result(10)
        else:  # the loop's thread has ended: nothing uses the link's sockets any more
            self._unhook()
        self._ctx.destroy(linger=0)  # the Session's ends; the link's too if they are still open

    async def _detach(self) -> None:
        self._unhook()
        await asyncio.sleep(0)  # a turn of the loop: what was queued goes out, then the close

    def _unhook(self) -> None:
        if self.link.lane is self:
            self.link.publish = self.link.lane = None
        self._later((self._close_push, None))  # after what is queued: that still goes out

    def _close_push(self, _arg: Any = None) -> None:
        for sock in self._push.values():
            sock.close(linger=0)
