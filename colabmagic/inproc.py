"""The in-process client's way into its proxy: ZeroMQ ``inproc`` sockets, not loopback TCP.

A :class:`~colabmagic.session.Session` and its :class:`~colabmagic.proxy.Proxy` live in one
process. Over loopback TCP every message between them crosses two ZeroMQ I/O threads and the
kernel's TCP stack; over ``inproc`` the Session's socket hands it to the proxy's directly. On a
2-core machine that was worth 0.84 ms of a ~7 ms round trip of ``pass`` (the same run of
``benchmarks/jupyter_server.py`` before and after; more under load, where each thread wake-up
waits for a core).

The proxy binds each of its sockets twice: to ``tcp://127.0.0.1:PORT``, which its connection
file names for every other client (JupyterLab through the provisioner, ``jupyter console
--existing``, the comm relay), and to :func:`url`. :func:`client_for` builds the Session's
``BlockingKernelClient`` on the proxy's context; its connection info stays the TCP one, so
``client.get_connection_info()`` still describes ports any other process can use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jupyter_client.blocking import BlockingKernelClient
from traitlets import Unicode

if TYPE_CHECKING:
    from colabmagic.proxy import Proxy


def url(name: str, port: int) -> str:
    """The ``inproc`` address at which proxy *name* serves its socket bound to TCP *port*."""
    return f"inproc://colabmagic-{name}-{port}"


class InprocKernelClient(BlockingKernelClient):
    """A ``BlockingKernelClient`` whose channels connect to :func:`url` addresses.

    jupyter_client's ``transport`` trait allows only ``tcp`` and ``ipc``, so the channel URLs
    are made here; everything else (the session, the ports, ``get_connection_info``) is the
    TCP connection info's.
    """

    inproc_name = Unicode(help="the proxy's inproc name (Proxy.inproc_name)")

    def _make_url(self, channel: str) -> str:
        return url(self.inproc_name, getattr(self, f"{channel}_port"))


def client_for(proxy: Proxy) -> BlockingKernelClient:
    """A started client of *proxy* over ``inproc`` (no heartbeat: the proxy watches the link).

    It shares the proxy's ZeroMQ context, which :meth:`Proxy.close` destroys, closing this
    client's sockets with its own; call ``client.stop_channels()`` first when you can.
    """
    client = InprocKernelClient(context=proxy.context, inproc_name=proxy.inproc_name)
    client.load_connection_info(proxy.connection_info)
    client.session.key = proxy.connection_info["key"].encode()
    client.start_channels(hb=False)
    return client
