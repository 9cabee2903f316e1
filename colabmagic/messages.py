"""Kernel messages read on the hot path of :meth:`Session.run`, without date parsing.

jupyter_client's ``Session.recv`` turns the ISO date of every header and parent header into a
``datetime`` (through dateutil): on the 2-core machine we measure on, that is about a quarter of
the client's CPU for a ``pass`` round trip (four messages), paid while the reply waits.
:meth:`Session.run` reads none of those dates. :func:`recv` checks the signature and refuses
replays exactly as jupyter_client does, then unpacks the four JSON parts; dates stay strings, and
messages are not adapted from protocol versions before 5 (ipykernel and today's kernels speak 5.x).
Everything else (``Session.client``, for users and for the comm relay) keeps jupyter_client's
own parsing.
"""

from __future__ import annotations

import hmac
from typing import Any

import zmq


def recv(session: Any, sock: zmq.Socket) -> dict | None:
    """The next message on *sock* (non-blocking), or None when there is none.

    Parameters
    ----------
    session
        The client's ``jupyter_client.session.Session`` (its key, packer and replay history).
    sock
        A ZeroMQ socket of the client.

    Raises
    ------
    ValueError
        The message is unsigned, replayed, wrongly signed or malformed (as jupyter_client).
    """
    try:
        frames = sock.recv_multipart(zmq.NOBLOCK)
    except zmq.Again:
        return None
    _, parts = session.feed_identities(frames)
    if len(parts) < 5:
        msg = f"malformed message: {len(parts)} parts, at least 5 expected"
        raise ValueError(msg)
    if session.auth is not None:
        signature = parts[0]
        if not signature:
            msg = "Unsigned Message"
            raise ValueError(msg)
        if signature in session.digest_history:
            msg = f"Duplicate Signature: {signature!r}"
            raise ValueError(msg)
        session._add_digest(signature)  # the bounded history jupyter_client keeps
        if not hmac.compare_digest(signature, session.sign(parts[1:5])):
            msg = f"Invalid Signature: {signature!r}"
            raise ValueError(msg)
    header = session.unpack(parts[1])
    return {
        "header": header,
        "msg_id": header["msg_id"],
        "msg_type": header["msg_type"],
        "parent_header": session.unpack(parts[2]),
        "metadata": session.unpack(parts[3]),
        "content": session.unpack(parts[4]),
        "buffers": [memoryview(b) for b in parts[5:]],
    }
