"""Pickle protocol 5 with out-of-band buffers, for moving variables to and from a kernel.

NumPy arrays (and anything else exposing ``PickleBuffer``) are not copied into the pickle: their
memory becomes separate ZeroMQ frames. The kernel side has the same two functions in
``colabmagic/remote/kernel_ext.py`` (it runs from source and cannot import this module).
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any

from colabmagic.errors import TransferError


def dumps(values: dict[str, Any]) -> list:
    """Serialise a ``{name: value}`` dict into ``[pickle bytes, *buffers]``.

    Raises :class:`TransferError` naming the first variable that cannot be pickled.
    """
    buffers: list = []
    try:
        data = pickle.dumps(values, protocol=5, buffer_callback=buffers.append)
    except Exception:
        for name, value in values.items():
            try:
                pickle.dumps(value, protocol=5, buffer_callback=lambda b: None)
            except Exception as exc:
                msg = f"cannot send {name!r}: {type(exc).__name__}: {exc}"
                raise TransferError(msg) from exc
        raise
    return [data, *(b.raw() for b in buffers)]


def loads(frames: Sequence) -> dict[str, Any]:
    """Inverse of :func:`dumps`; writable buffers are used in place, read-only ones copied."""
    oob = [f if not memoryview(f).readonly else bytearray(f) for f in frames[1:]]
    return pickle.loads(bytes(frames[0]), buffers=oob)  # noqa: S301 - our own kernel's reply
