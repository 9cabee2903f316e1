"""Push/pull on their own OpenSSH-carried stream, which the kernel reads itself.

The comm path (:mod:`colabmagic.transfer`) carries a large value as chunk messages through
paramiko, sshd, the bridge, the agent and the kernel: on the host that is sshd plus three
Python processes touching every byte, and on this side paramiko's Python work per 32 KiB
packet. Over SSH, a large value can instead take a stream of its own:

- the kernel (``remote/kernel_ext.py``) allocates the frames (``push_begin`` with a one-time
  token), listens on a Unix socket in a private 0700 directory and says where (``direct_ready``);
  a thread ``recv_into``s the frames (or ``sendall``s the kernel's frames for a pull), so the
  kernel's main thread stays free and arrays arrive writable and zero-copy;
- on the host, the file helper's ``relay`` command (``remote/files.py``) connects to that
  socket and hands the kernel its stdin and stdout, sshd's pipes, so the kernel's thread moves
  the bytes on them itself (or, for a kernel that cannot take them, splices them to the socket);
  it is run through the OpenSSH client exactly as file copies are
  (:mod:`colabmagic.transport.ssh_pipe`: private config, pinned host keys, ``BatchMode``), a
  ready spare helper taken when there is one (:mod:`colabmagic.hosthelper`);
- this side writes the pickle's frames (views of the caller's memory, no copy) to the ``ssh``
  subprocess's stdin, or ``readinto``s preallocated frames from its stdout.

The comm still says when a transfer starts and that it finished: a push is bound in the
namespace only by ``push_commit``, after the kernel received every byte, so a stream that
drops midway leaves the namespace as it was. The caller then redoes the transfer on the comm
path (one log line on ``colabmagic.transfer``); :class:`~colabmagic.transfer.TransferStats`
says which route carried it (``via``), whether the kernel had sshd's pipes
(``pipes_passed``) and why it fell back (``note``).

When (``Channel.via == "auto"``, the default): an SSH transport with ``ssh`` on PATH (and not
found failing), a value of :data:`DIRECT_MIN` bytes or more when a spare ``ssh`` helper is
ready, :data:`FRESH_MIN` or more otherwise (a fresh ``ssh`` pays its own handshake, as for file
copies); smaller values take the comm path and start a spare for the next one. Compression
stays on the comm path: ``zstd`` always takes it, and ``auto`` takes it when a sample of the
largest frame says compressing pays at the link's measured rate (else the raw stream is the
cheaper choice anyway). ``via = "openssh"`` takes the stream whatever the size (tests,
benchmarks); ``"comm"`` never.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from typing import TYPE_CHECKING, Any

from colabmagic import compress, hosthelper, wire
from colabmagic.errors import ParameterError
from colabmagic.transport import ssh_pipe

if TYPE_CHECKING:
    from colabmagic.transfer import Channel, TransferStats

log = logging.getLogger("colabmagic.transfer")

VIAS = ("auto", "openssh", "comm")
DIRECT_MIN = 8 << 20  # with a spare ssh helper ready: the stream costs a few ms to set up
FRESH_MIN = hosthelper.OPENSSH_MIN  # without one: a fresh ssh costs ~0.2 s more than it saves
_Broken = (hosthelper.Dropped, hosthelper.NoStart, OSError)


def _ssh_transport(channel: Channel) -> Any | None:
    if channel.via not in VIAS:
        msg = f"via={channel.via!r} is not one of {', '.join(VIAS)}"
        raise ParameterError(msg)
    transport = channel.session.transport
    if channel.via == "comm" or not hasattr(transport, "_session_channel"):
        return None
    return transport if ssh_pipe.usable(transport) else None


def _threshold(channel: Channel, transport: Any) -> int:
    """The smallest value the stream takes. A spare ``ssh`` counts once it has started, not
    when merely asked for: one still starting costs a transfer right after another its
    handshake, ~0.5 s through a 50 ms link, as much as the comm path loses on 32 MiB there."""
    if channel.via == "openssh":
        return 0
    return DIRECT_MIN if hosthelper.spare_started(transport, "openssh") else FRESH_MIN


def raw_is_cheaper(mode: str, views: list[memoryview], channel: Channel) -> bool:
    """Whether a push of *views* under compress *mode* goes raw (the stream) or compressed
    (the comm path): ``auto`` samples 64 KiB from the middle of the largest frame."""
    if mode == "none" or not (compress.available() and channel._peer_zstd()):
        return True
    if mode == "zstd":
        return False
    big = max(views, key=lambda v: v.nbytes)
    chooser = compress.Chooser("auto", channel.meter, peer_zstd=True)
    return not chooser.decide(compress.middle(big), big.nbytes)


def _relay(transport: Any) -> hosthelper.Helper | None:
    """The host's relay through ``ssh``: the spare if ready, else a fresh one; None when
    ``ssh`` cannot start (logged once, the transport's ssh route disabled)."""
    helper = hosthelper.take_spare(transport, ("openssh",), ["relay"])
    if helper is not None and helper.kind != "openssh":
        helper.close()  # ssh failed to start as that spare (disabled): the comm path
        return None
    if helper is not None:
        return helper
    try:
        return hosthelper.start(transport, "openssh", ["relay"])
    except hosthelper.NoStart as exc:
        ssh_pipe.disable(transport, str(exc))
    except hosthelper.Dropped as exc:
        log.warning("push/pull to %s take the comm path: ssh failed (%s)", transport.target, exc)
    return None


def _connect(helper: hosthelper.Helper, ready: dict, token: str, stats: TransferStats) -> None:
    """Have the relay reach the kernel's stream (*ready*: its ``direct_ready``), then show the
    token. A kernel that says it can (``fds``) is handed the relay's stdin and stdout, sshd's
    pipes, and moves the bytes on them itself; else the relay splices them to its socket."""
    hosthelper.send_line(helper, {"path": ready["path"], "pass": bool(ready.get("fds"))})
    answer = hosthelper.read_line(helper)
    if not answer.get("ok"):
        raise hosthelper.Dropped(answer.get("error", "the relay did not connect"))
    stats.pipes_passed = bool(answer.get("passed"))
    helper.write(token.encode())


def _fell_back(stats: TransferStats, target: str, exc: BaseException) -> None:
    stats.note = f"the ssh stream broke ({exc}); redone on the comm path"
    log.warning("%s to %s: %s", stats.direction, target, stats.note)


def _done(channel: Channel, stats: TransferStats, started: float, via: str) -> None:
    stats.via = via
    stats.wire_bytes = stats.raw_bytes
    seconds = max(time.perf_counter() - started, 1e-6)
    if stats.raw_bytes >= DIRECT_MIN:  # the link's rate, for the next compress auto decision
        channel.meter.rate = stats.raw_bytes / seconds
    where = ("to " if stats.direction == "push" else "from ") + channel.session.transport.target
    mib, rate = stats.raw_bytes / 2**20, stats.raw_bytes / seconds / 1e6
    how = " (on sshd's pipes)" if stats.pipes_passed else " (spliced)" if via == "openssh" else ""
    log.info("%s of %.1f MiB %s via %s%s at %.0f MB/s", stats.direction, mib, where, via, how, rate)


def push(
    channel: Channel,
    names: list[str],
    views: list[memoryview],
    mode: str,
    stats: TransferStats,
    timeout: float,
) -> bool:
    """Push *views* (the pickle's frames) on their own stream; False when the caller should
    use the comm path instead (not taken, or broken midway: nothing was bound then)."""
    transport = _ssh_transport(channel)
    if transport is None or stats.raw_bytes < _threshold(channel, transport):
        warm(channel, stats.raw_bytes)
        return False
    if not raw_is_cheaper(mode, views, channel):
        return False
    helper = _relay(transport)
    if helper is None:
        return False
    token = secrets.token_hex(16)
    try:
        with channel._conversation() as inbox:
            req = uuid.uuid4().hex
            channel._msg(
                "push_begin", req, names=names, sizes=[v.nbytes for v in views], direct=token
            )
            try:
                data, _ = channel._next(inbox, req, "push", timeout)
                _connect(helper, data, token, stats)
                started = time.perf_counter()
                for view in views:
                    helper.write(view)
                if bytes(helper.read_exact(1)) != b"K":
                    msg = "the kernel did not confirm the stream"
                    raise hosthelper.Dropped(msg)
                last = channel._msg("push_commit", req)
                channel._next(inbox, req, "push", timeout)  # push_ok: bound
            except BaseException:
                channel._abort(req)
                raise
            channel._await_idle(last)
    except _Broken as exc:
        _fell_back(stats, transport.target, exc)
        return False
    finally:
        helper.close()
        hosthelper.warm(transport, "auto")
    _done(channel, stats, started, helper.kind)
    return True


def warm(channel: Channel, size: int) -> None:
    """After a value of *size* bytes took the comm path: start a spare ``ssh`` helper when the
    stream would have paid with one, so that the next such value takes it."""
    transport = _ssh_transport(channel)
    if transport is not None and size >= DIRECT_MIN:
        hosthelper.warm(transport, "auto")


def pull_offer(channel: Channel, inline: int) -> dict:
    """What a ``pull`` request adds to let the kernel answer on a stream of its own."""
    transport = _ssh_transport(channel)
    if transport is None:
        return {}
    return {
        "direct": secrets.token_hex(16),
        "direct_min": max(_threshold(channel, transport), inline + 1),
    }


def pull(
    channel: Channel,
    inbox: Any,
    req: str,
    data: dict,
    offer: dict,
    stats: TransferStats,
    timeout: float,
) -> tuple[list, str] | None:
    """Receive the frames the kernel offered on its stream (*data* is its ``direct_ready``);
    ``(frames, last message id)``, or None when the comm path must redo it."""
    transport = channel.session.transport
    sizes = [int(n) for n in data["sizes"]]
    stats.raw_bytes = sum(sizes)
    helper = None
    try:
        helper = _relay(transport)
        if helper is None:
            channel._abort(req)
            return None
        frames = [wire.alloc(n) for n in sizes]
        _connect(helper, data, offer["direct"], stats)
        started = time.perf_counter()
        for frame in frames:
            helper.readinto(memoryview(frame).cast("B"))
    except _Broken as exc:
        channel._abort(req)
        _fell_back(stats, transport.target, exc)
        return None
    except BaseException:
        channel._abort(req)
        raise
    finally:
        if helper is not None:
            helper.close()
            hosthelper.warm(transport, "auto")
    last = channel._msg("pull_done", req)
    _done(channel, stats, started, helper.kind)
    return frames, last
