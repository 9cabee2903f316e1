"""Running decode + extract on a Dask cluster: connect, check the workers, map in a window.

The parent keeps the index; the workers only turn files into fingerprints. Tasks are submitted
a window at a time and their results consumed in job order, so neither side holds more than
the window's results, however many files there are. A worker that dies mid-job loses its
tasks to the scheduler, which reruns them elsewhere; a result is consumed once, in order, so
no file is indexed twice.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
from collections.abc import Iterator
from typing import Any

from colabmagic.errors import ConnectError, ParameterError

#: Seconds to wait for the scheduler before giving up with a clear error.
CONNECT_TIMEOUT = 15.0


def connect(scheduler: Any) -> tuple[Any, bool]:
    """A ``distributed.Client`` for *scheduler* (an address or a client) and whether we own it.

    Raises
    ------
    ParameterError
        Dask is not installed.
    ConnectError
        Nothing answers at the address, or no worker is connected.
    """
    try:
        from distributed import Client
    except ImportError as exc:
        msg = "--scheduler needs Dask's distributed; install colabmagic[dask]."
        raise ParameterError(msg) from exc
    if isinstance(scheduler, Client):
        return scheduler, False
    try:
        _refused(scheduler)
        client = Client(scheduler, set_as_default=False, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        msg = (
            f"cannot reach the Dask scheduler at {scheduler} ({first}); check the address "
            "and that `dask scheduler` runs there."
        )
        raise ConnectError(msg) from exc
    return client, True


def _refused(address: Any) -> None:
    """Raise ConnectionRefusedError at once when nothing listens at a ``tcp://HOST:PORT``.

    Dask retries a refused connection until its timeout (15 s of silence for a mistyped port);
    a refusal is a definite answer, so it is reported immediately. Other addresses (TLS, a
    scheduler file, an unreachable host) are left to Dask and its timeout.
    """
    if not isinstance(address, str) or not address.startswith("tcp://"):
        return
    host, _, port = address[len("tcp://") :].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        return
    with contextlib.suppress(socket.timeout):  # slow or filtered: Dask decides
        socket.create_connection((host.strip("[]"), int(port)), timeout=2.0).close()


def check_workers(client: Any, timeout: float = CONNECT_TIMEOUT) -> None:
    """Fail early, in one line, when the cluster has no worker or a worker lacks ffmpeg."""
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError as exc:
        msg = (
            f"the Dask scheduler {client.scheduler.address} has no workers after {timeout:g} s; "
            "start some with `dask worker ADDRESS`."
        )
        raise ConnectError(msg) from exc
    found = client.run(shutil.which, "ffmpeg")
    missing = sorted(addr for addr, path in found.items() if not path)
    if missing:
        msg = (
            f"Dask worker(s) {', '.join(missing)} have no ffmpeg on PATH; install it there "
            "(apt-get install ffmpeg, conda install ffmpeg) or stop those workers."
        )
        raise ParameterError(msg)


def map_in_order(
    client: Any, func: Any, items: list[Any], window: int, **kwargs: Any
) -> Iterator[Any]:
    """``func(item, **kwargs)`` for every item on the cluster, yielded in order.

    At most *window* tasks are submitted and not yet consumed at any time; closing the
    generator cancels the rest.
    """
    futures: dict[int, Any] = {}
    submitted = 0
    try:
        for i in range(len(items)):
            while submitted < len(items) and submitted < i + window:
                futures[submitted] = client.submit(func, items[submitted], **kwargs, pure=False)
                submitted += 1
            fut = futures.pop(i)
            yield fut.result()
            fut.release()
    finally:
        if futures:
            client.cancel(list(futures.values()))
