"""Kernel side: large shell messages that arrive in parts through a Jupyter server.

A Jupyter server (tornado) refuses websocket messages over 10 MiB by default, so the local link
sends a large message -- a ``%colab_push`` of a big array -- as several ``colabmagic_part``
shell messages, each carrying a slice of the original buffers. This handler collects them and,
on the last part, calls the handler of the original message type with the original header,
content and buffers. The last part carries the original ``msg_id``, so the kernel's busy/idle
status and replies answer the request the client sent. Executed from source in the kernel
(standard library and ipykernel only), like ``kernel_ext``.
"""

PART = "colabmagic_part"

_pending = {}


def _handle(kernel, stream, ident, parent):
    content = parent.get("content") or {}
    key = content.get("id")
    if content.get("first"):
        _pending[key] = []
    chunks = _pending.setdefault(key, [])
    chunks.extend(parent.get("buffers") or [])
    if not content.get("last"):
        return None
    del _pending[key]
    whole = bytearray().join(memoryview(c).cast("B") for c in chunks)  # one copy, writable
    view = memoryview(whole)
    buffers, offset = [], 0
    for size in content.get("sizes") or []:
        buffers.append(view[offset : offset + size])
        offset += size
    msg = dict(parent)
    msg["header"] = content["header"]
    msg["msg_id"] = content["header"].get("msg_id")
    msg["msg_type"] = content["header"].get("msg_type")
    msg["metadata"] = content.get("metadata") or {}
    msg["content"] = content.get("content") or {}
    msg["buffers"] = buffers
    handler = kernel.shell_handlers.get(msg["msg_type"])
    if handler is None:
        return None
    return handler(stream, ident, msg)


def install(kernel=None):
    """Register the ``colabmagic_part`` shell handler; idempotent."""
    if kernel is None:
        from IPython import get_ipython

        kernel = get_ipython().kernel
    kernel.shell_handlers[PART] = lambda stream, ident, parent: _handle(
        kernel, stream, ident, parent
    )
