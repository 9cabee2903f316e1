"""Why a session's link is down: the host is unreachable, or only the link dropped.

The proxy reconnects with backoff by calling its ``open_pipe`` again and again. :func:`watch`
wraps that callable and records what each attempt met, without touching the proxy: an attempt that
cannot reach the host (connection refused, the tunnel's ProxyCommand failing, a timeout) starts
the clock, and a second one in a row marks the host *unreachable since* the first (one failure
alone can be the dying connection itself); an attempt that gets a pipe clears it. :func:`describe`
turns that into the state ``%colab_status`` shows:

- ``host unreachable since HH:MM (tunnel gone?)``: no attempt has reached the host since then,
  e.g. the quick tunnel died or the runtime was recycled;
- ``link down, kernel alive (reconnecting, attempt N)``: the link dropped but nothing says the
  host is gone; the kernel runs on (it outlives the link) and the next attempt may resume.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass

from colabmagic.errors import ConnectError

_watches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
UNREACHABLE_AFTER = 2  # failed reconnect attempts in a row


@dataclass
class LinkWatch:
    """What the reconnect attempts of one proxy have met so far."""

    unreachable_since: float | None = None  # wall-clock time of the first failed attempt
    last_error: str = ""
    attempts_failed: int = 0

    def failed(self, exc: BaseException) -> None:
        if self.unreachable_since is None:
            self.unreachable_since = time.time()
        self.attempts_failed += 1
        self.last_error = str(exc)

    def reached(self) -> None:
        self.unreachable_since = None
        self.attempts_failed = 0
        self.last_error = ""


def watch(proxy) -> LinkWatch:
    """Record the outcome of every ``proxy.open_pipe()`` call (idempotent)."""
    found = _watches.get(proxy)
    if found is not None:
        return found
    state = LinkWatch()
    inner = proxy.open_pipe
    lock = threading.Lock()

    def open_pipe():
        from colabmagic.proxy import PermanentLinkError

        try:
            pipe = inner()
        except PermanentLinkError:
            raise
        except (OSError, ConnectError) as exc:
            with lock:
                state.failed(exc)
            raise
        with lock:
            state.reached()
        return pipe

    proxy.open_pipe = open_pipe
    _watches[proxy] = state
    return state


def describe(proxy, state: str) -> str:
    """The status text for a proxy whose session reports *state*."""
    w = _watches.get(proxy)
    if proxy.state != "link-down":
        return state
    # One failed attempt can be the dying connection itself; two in a row mean the host.
    if w is not None and w.unreachable_since is not None and w.attempts_failed >= UNREACHABLE_AFTER:
        since = time.strftime("%H:%M", time.localtime(w.unreachable_since))
        return f"host unreachable since {since} (tunnel gone?)"
    return f"link down, kernel alive (reconnecting, attempt {proxy.reconnect_attempt})"


def last_error(proxy) -> str:
    """The last reconnect failure's message ('' when none)."""
    w = _watches.get(proxy)
    return w.last_error if w is not None else ""


def status(session) -> dict:
    """``session.status()`` with the link-down state told apart (see the module docstring)."""
    info = session.status()
    info["state"] = describe(session.proxy, info["state"])
    error = last_error(session.proxy)
    if error and session.proxy.state == "link-down":
        info["link_error"] = error
    return info
