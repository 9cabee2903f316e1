"""Starting a kernel on a Jupyter server, and telling a dead-on-arrival one for what it is.

``POST /api/kernels`` answers as soon as the server has launched the kernel's process. Whether the
kernel then answers is another matter: jupyter_client picked a TCP port that another process took
before the kernel bound it, a conda env is broken, a startup file raises, a GPU driver hangs.
Without a check such a kernel cost the whole connect timeout and then an error that blamed a slow
host. :func:`start` instead returns a kernel only once it has answered a ``kernel_info_request``
over its websocket -- the websocket the link then goes on with, so a healthy start costs no
extra connection -- and meanwhile watches the kernel's REST model:

- **died**: the model says ``dead``, or the kernel is gone (HTTP 404): the server restarted the
  process (``KernelRestarter.restart_limit`` times, on new random ports) and then gave up. Our own
  retry could only repeat that, so this fails at once.
- **hung**: alive but no reply within *start_timeout* seconds. The kernel is deleted (and checked
  gone) and a fresh one started, once, with the same kernelspec and options: a port race does not
  happen twice. A second kernel that does not answer fails too.

The failure is one line naming the kernelspec, the server, what happened and what to do; the
kernels it started are deleted first, so nothing is left running on the user's server.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from colabmagic.errors import ConnectError, ParameterError
from colabmagic.proxy import PermanentLinkError
from colabmagic.transport.jupyter_link import (
    V1,
    decode_json,
    decode_v1,
    encode_json,
    encode_v1,
    new_header,
)

log = logging.getLogger("colabmagic.jupyter")

DEFAULT_START_TIMEOUT = 20.0
"""Seconds a fresh kernel has to answer. A healthy ipykernel answered here in 0.7-1.3 s, also with
the 2 CPUs loaded 3.5x (docs/remote-kernel.md); 20 s leaves room for a cold disk, heavy startup
files and a slow link, and stays well under the old 60 s connect timeout."""
_POLL = 0.5  # seconds between REST looks at a starting kernel
DIED, HUNG = "died", "hung"


class KernelDeadOnArrival(ConnectError):
    """A kernel the server started never answered, or died as it started (see the module doc)."""


@dataclass
class Arrival:
    """One kernel that was started but did not answer: what happened to it."""

    kernel_id: str
    outcome: str  # "hung" or "died"
    state: str | None  # the last execution_state the server reported
    seconds: float
    deleted: bool = False

    def describe(self, more: str = "") -> str:
        """``died as it started (...)`` or ``never answered in 20s (...)``; *more* goes inside
        the parentheses."""
        if self.outcome == DIED and self.state == "dead":
            how = f"the server reports it dead after {self.seconds:.0f}s"
        elif self.outcome == DIED:
            how = f"the server restarted it, then gave up and removed it, after {self.seconds:.0f}s"
        else:
            state = self.state or "unknown"
            return f"never answered in {self.seconds:.0f}s (last state: {state}{more})"
        return f"died as it started ({how}{more})"


class _NoAnswer(Exception):
    def __init__(self, outcome: str, state: str | None):
        super().__init__(outcome)
        self.outcome, self.state = outcome, state


def validate_timeout(start_timeout: float) -> float:
    """*start_timeout* as a float, or a one-line ParameterError."""
    try:
        value = float(start_timeout)
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0:
        msg = f"start_timeout={start_timeout!r} must be a positive number of seconds (default 20)"
        raise ParameterError(msg)
    return value


def start(transport: Any, body: dict, options: dict) -> str:
    """Start a kernel with the ``POST /api/kernels`` *body*; return its id once it answered.

    *options* (``mock_gpu``, ``env``) are kept for the kernel's link.

    *transport* is the :class:`~colabmagic.transport.jupyter.JupyterTransport`: its REST client,
    its event loop, ``start_timeout``, and where the answered websocket is left for ``open_pipe``
    (``transport.opened``) and what happened for ``%colab_status`` (``transport.arrivals``).

    Raises
    ------
    KernelDeadOnArrival
        The kernel died as it started, or two kernels in a row never answered.
    """
    rest = transport.rest
    failed: list[Arrival] = []
    deleting: list[threading.Thread] = []
    name = body.get("name")
    try:
        for attempt in (1, 2):
            model = _post(transport, body)
            kernel_id, name = model["id"], model.get("name") or name
            body = {**body, "name": name}  # a retry starts the same kernelspec
            t0 = time.monotonic()
            outcome = _check(transport, kernel_id, options)
            if not isinstance(outcome, _NoAnswer):
                transport.opened[kernel_id] = outcome
                if failed:
                    transport.arrivals[kernel_id] = failed
                    log.warning(
                        "kernel %s (%s) on %s answered after a restart on arrival",
                        kernel_id, name, transport.target,
                    )  # fmt: skip
                return kernel_id
            arrival = Arrival(kernel_id, outcome.outcome, outcome.state, time.monotonic() - t0)
            failed.append(arrival)
            deleting.append(_delete_in_background(rest, arrival))
            if outcome.outcome == DIED or attempt == 2:
                break
            log.warning(
                "kernel %s (%s) on %s %s; deleting it and starting a fresh one",
                kernel_id, name, transport.target, arrival.describe(),
            )  # fmt: skip
    finally:
        for thread in deleting:
            thread.join()
    raise KernelDeadOnArrival(_message(name, transport.target, failed, transport.start_timeout))


def _check(transport: Any, kernel_id: str, options: dict) -> tuple | _NoAnswer:
    """The answered websocket of the fresh kernel *kernel_id*, or why there is none.

    Any other failure (the server out of reach, the token refused) deletes the kernel if it can
    and is raised as it is.
    """
    link = transport.new_link(kernel_id, options)
    try:
        return transport.loop().run(
            _answered(transport, link, kernel_id), transport.start_timeout + 15
        )
    except _NoAnswer as exc:
        transport.forget(kernel_id)
        return exc
    except TimeoutError:  # the check itself overran (stuck REST calls): no answer either
        transport.forget(kernel_id)
        return _NoAnswer(HUNG, None)
    except BaseException:
        transport.forget(kernel_id)
        with contextlib.suppress(ConnectError, OSError):
            transport.rest.delete(kernel_id, wait=10.0)
        raise


def note(arrivals: list[Arrival]) -> str:
    """The ``%colab_status`` line for a kernel that came after *arrivals* failed."""
    first = arrivals[0]
    gone = "deleted" if all(a.deleted for a in arrivals) else "delete it on the server"
    return f"restarted on arrival: kernel {first.kernel_id[:8]} {first.describe()} ({gone})"


def _message(name: str | None, target: str, failed: list[Arrival], budget: float) -> str:
    spec = f"the kernel {name!r}" if name else "the server's default kernel"
    console = f"jupyter console --kernel {name}" if name else "jupyter console"
    check = (
        f"check that the kernelspec runs there (`{console}` on the host) "
        "or pick another with --kernel-name"
    )
    log_ = "; its log on the server says why"
    if len(failed) == 1:
        what = failed[0].describe(log_)
    elif all(a.outcome == HUNG for a in failed):
        states = ", ".join(sorted({a.state or "unknown" for a in failed}))
        what = f"was started twice and never answered ({budget:g}s each; last state: {states}"
        what += f"{log_})"
        check += f", or give a slow start longer with --start-timeout (now {budget:g}s)"
    else:
        what = (
            f"was started twice: the first {failed[0].describe()}, "
            f"then the second {failed[1].describe(log_)}"
        )
    left = [a.kernel_id for a in failed if not a.deleted]
    tail = f"; kernel {', '.join(left)} may still run there: delete it" if left else ""
    return f"{spec} on {target} {what}: {check}{tail}"


def _post(transport: Any, body: dict) -> dict:
    """``POST /api/kernels``; an unknown kernelspec is one line listing the server's ones."""
    name = body.get("name")
    try:
        return transport.rest.request("POST", "api/kernels", body)
    except (FileNotFoundError, ConnectError) as exc:
        from colabmagic.transport.jupyter import ServerGone, TokenRefused

        if isinstance(exc, (TokenRefused, ServerGone)) or not name:
            raise
        try:  # jupyter_server answers an unknown name with HTTP 500 (404 in older versions)
            specs = sorted(transport.rest.request("GET", "api/kernelspecs")["kernelspecs"])
        except (ConnectError, OSError, KeyError, TypeError):
            raise exc from None
        if name in specs:
            msg = (
                f"the server at {transport.target} could not start the kernel {name!r} ({exc}; "
                f"its log says why): check that the kernelspec runs there (`jupyter console "
                f"--kernel {name}` on the host) or pick another with --kernel-name"
            )
            raise ConnectError(msg) from None
        msg = (
            f"no kernelspec {name!r} on {transport.target} (it has: {', '.join(specs)}); "
            "pick one with --kernel-name"
        )
        raise ParameterError(msg) from None


def _delete_in_background(rest: Any, arrival: Arrival) -> threading.Thread:
    """DELETE the kernel (the call returns once the server no longer lists it) in a thread, so
    the fresh kernel starts meanwhile; *arrival.deleted* says whether it is gone."""

    def run() -> None:
        try:
            rest.delete(arrival.kernel_id)
            arrival.deleted = True
        except (ConnectError, OSError) as exc:
            log.warning("could not delete kernel %s: %s", arrival.kernel_id, exc)

    thread = threading.Thread(target=run, name="colabmagic-delete", daemon=True)
    thread.start()
    return thread


async def _answered(transport: Any, link: Any, kernel_id: str) -> tuple:
    """The kernel's websocket ``(ws, subprotocol, inbox)`` once it answered kernel_info.

    Raises :class:`_NoAnswer` when it died or did not answer within ``transport.start_timeout``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + transport.start_timeout
    seen: dict[str, Any] = {"state": "starting"}
    watch = loop.create_task(_watch(transport.rest, kernel_id, seen))
    watch.add_done_callback(_retrieve)
    try:
        while True:
            left = deadline - loop.time()
            if left <= 0:
                break
            probe = loop.create_task(_probe(transport, link, kernel_id, left))
            probe.add_done_callback(_retrieve)
            done, _ = await asyncio.wait(
                {probe, watch}, timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
            if watch in done:
                probe.cancel()
                watch.result()  # a refused token or a stopped hub server: raised as it is
                raise _NoAnswer(DIED, seen["state"])
            if probe not in done:
                probe.cancel()
                break
            try:
                return probe.result()
            except PermanentLinkError:  # the kernel gone (404), or a refused token: which?
                get = functools.partial(transport.rest.kernel_model, kernel_id, timeout=5.0)
                try:
                    await loop.run_in_executor(None, get)
                except FileNotFoundError:
                    raise _NoAnswer(DIED, "removed") from None
                raise
            except ConnectError:  # not yet (a timeout, a 500): look again shortly
                await asyncio.sleep(min(_POLL, max(deadline - loop.time(), 0)))
    finally:
        watch.cancel()
    if seen.get("unreachable") is not None:  # not the kernel: the server is out of reach
        raise seen["unreachable"]
    raise _NoAnswer(HUNG, seen["state"])


def _retrieve(task: asyncio.Task) -> None:
    """Mark a task's exception as seen: one left behind when the other task won is no news."""
    if not task.cancelled():
        task.exception()


async def _watch(rest: Any, kernel_id: str, seen: dict) -> None:
    """Return when the REST model says the kernel died (``dead``, or gone: 404)."""
    from colabmagic.transport.jupyter import ServerGone, TokenRefused

    loop = asyncio.get_running_loop()
    get = functools.partial(rest.kernel_model, kernel_id, timeout=5.0)
    while True:
        await asyncio.sleep(_POLL)
        try:
            model = await loop.run_in_executor(None, get)
        except FileNotFoundError:
            seen["state"] = "removed"
            return
        except (TokenRefused, ServerGone):
            raise
        except ConnectError as exc:
            seen["unreachable"] = exc
            continue
        seen.pop("unreachable", None)
        seen["state"] = model.get("execution_state")
        if seen["state"] == "dead":
            return


async def _probe(transport: Any, link: Any, kernel_id: str, timeout: float) -> tuple:
    """Open the websocket (the server's handshake waits for the kernel) and ask kernel_info."""
    ws, subprotocol, inbox = await transport._connect(kernel_id, link.session_id, timeout=timeout)
    try:
        header = new_header("kernel_info_request", link.session_id)
        link.own_ids[header["msg_id"]] = None  # its late iopub statuses go nowhere
        reply = asyncio.get_running_loop().create_future()
        decode = decode_v1 if subprotocol == V1 else decode_json

        def on_message(data) -> None:
            if data is None:
                if not reply.done():
                    reply.set_exception(ConnectError("the websocket closed during the start check"))
                return
            with contextlib.suppress(ValueError, IndexError, UnicodeDecodeError):
                _, parts = decode(data)
                parent = json.loads(bytes(parts[1]))
                kind = json.loads(bytes(parts[0])).get("msg_type")
                if parent.get("msg_id") == header["msg_id"] and kind == "kernel_info_reply":
                    if not reply.done():
                        reply.set_result(True)
                    return
            inbox.held.append(data)  # everything else is the link's

        inbox.bind(on_message)
        parts = [json.dumps(header).encode(), b"{}", b"{}", b"{}"]
        data = encode_v1("shell", parts) if subprotocol == V1 else encode_json("shell", parts)
        await ws.write_message(data, binary=isinstance(data, bytes))
        await reply
        inbox.hold()  # what comes next waits for the link
        return ws, subprotocol, inbox
    except BaseException:
        with contextlib.suppress(Exception):
            ws.close()
        raise
