"""Per-chunk compression for bulk transfers: ``none``, ``zstd``, or ``auto`` (zstd where it pays).

``auto`` decides chunk by chunk. It compresses a small sample of the chunk (64 KiB from its
middle), which gives the compression ratio *r* and this machine's compression speed *c*, and it
knows the link's rate *L* from the transfer so far (:class:`RateMeter`). Sending raw costs
``1/L`` seconds per byte; compressed costs ``1/c + r/L + 1/d`` (compress, send, decompress at
*d* ~ 3 *c*), counted in series because on a small host the CPUs that compress are the CPUs that
encrypt and copy. A chunk is compressed only when that is at least 10 % cheaper. On a fast
loopback link random data is never compressed; on a 50 Mbit/s link a sparse array always is.

zstandard is optional (the ``compress`` extra): without it ``auto`` means ``none`` and an
explicit ``zstd`` is a :class:`~colabmagic.errors.ParameterError` saying what to install. The
kernel side has the same decision in ``remote/kernel_ext.py`` (it runs from source there).
"""

from __future__ import annotations

import time

from colabmagic.errors import ParameterError

MODES = ("auto", "zstd", "none")
RAW, ZSTD = 0, 1
SAMPLE = 64 * 1024
LEVEL = 1
_MARGIN = 0.9
_RESAMPLE = 8  # after a chunk that did not pay, sample again only 7 chunks' worth of bytes later
PRIOR = 3e7  # bytes/s assumed until measured: a good WAN; loopback is measured within a chunk


def available() -> bool:
    """True when the zstandard package is importable here."""
    try:
        import zstandard  # noqa: F401
    except ImportError:
        return False
    return True


def check_mode(mode: str | None) -> str:
    """Validate a ``--compress`` value; returns the mode (``auto`` when None)."""
    mode = "auto" if mode is None else mode
    if mode not in MODES:
        msg = f"compress={mode!r} is not one of {', '.join(MODES)}"
        raise ParameterError(msg)
    if mode == "zstd" and not available():
        msg = "compress='zstd' needs the zstandard package: pip install 'colabmagic[compress]'"
        raise ParameterError(msg)
    return mode


class RateMeter:
    """The link's rate in bytes per second, from bytes delivered over time (None until known).

    *slack* is what the path buffers before it pushes back (socket buffers, the SSH window):
    a writer that counts bytes as written would otherwise see the buffers fill at memory speed.
    """

    def __init__(self, initial: float | None = None, *, slack: int = 0):
        self.rate = initial
        self.slack = slack
        self._t0: float | None = None
        self._bytes = 0

    def start(self) -> None:
        self._t0, self._bytes = time.perf_counter(), 0

    def delivered(self, nbytes: int) -> None:
        """Record *nbytes* of wire data acknowledged by (or written toward) the other side."""
        if self._t0 is None:
            self.start()
        self._bytes += nbytes
        elapsed = time.perf_counter() - self._t0
        if elapsed > 0.02 and self._bytes > 2 * self.slack:
            self.rate = (self._bytes - self.slack) / elapsed


class Chooser:
    """Decide per chunk whether to compress, for one transfer; see the module docstring.

    Parameters
    ----------
    mode
        ``auto``, ``zstd`` or ``none`` (already validated).
    meter
        The link rate; ``auto`` assumes :data:`PRIOR` until it is measured.
    peer_zstd
        Whether the other side can decompress.
    """

    def __init__(self, mode: str, meter: RateMeter, *, peer_zstd: bool):
        self.meter = meter
        self.mode = mode if (peer_zstd and available()) else "none"
        self._cctx = None
        self._skip = 0  # bytes to send raw before the next sample
        self.raw_bytes = 0
        self.wire_bytes = 0
        if self.mode != "none":
            import zstandard

            self._cctx = zstandard.ZstdCompressor(level=LEVEL)

    def due(self) -> bool:
        """Whether the next chunk needs a decision: always for ``zstd``, for ``auto`` when a
        sample is due; otherwise it goes raw, and a sender may read, hash and send it in
        slices small enough to stay in the CPU's cache."""
        return self.mode == "zstd" or (self.mode == "auto" and self._skip <= 0)

    def decide(self, sample, region: int) -> bool:
        """Whether to compress the next *region* bytes, from *sample* (up to :data:`SAMPLE`
        bytes from its middle). When ``auto`` says no at a known link rate, the next sample
        comes after ``_RESAMPLE - 1`` more regions' worth of raw bytes (:meth:`sent_raw`)."""
        if self.mode != "auto":
            return self.mode == "zstd"
        sample = memoryview(sample).cast("B")[:SAMPLE]
        if region < 4096 or sample.nbytes < 1024:
            return False
        t0 = time.thread_time()  # CPU time: a preemption on a busy host is not compression cost
        size = len(self._cctx.compress(sample))
        spent = max(time.thread_time() - t0, 1e-7)
        ok = pays(sample.nbytes, size, spent, self.meter.rate)
        if not ok and self.meter.rate is not None:
            self._skip = _RESAMPLE * region  # this region's own raw bytes count toward it
        return ok

    def sent_raw(self, n: int) -> None:
        """Count *n* bytes sent as they are."""
        self.raw_bytes += n
        self.wire_bytes += n
        self._skip -= n

    def compress(self, chunk) -> tuple[int, object]:
        """``(codec, payload)`` for *chunk* compressed, or raw where zstd does not shrink it."""
        view = memoryview(chunk).cast("B")
        out = self._cctx.compress(view)
        if len(out) >= view.nbytes:
            self.sent_raw(view.nbytes)
            return RAW, view
        self.raw_bytes += view.nbytes
        self.wire_bytes += len(out)
        return ZSTD, out

    def encode(self, chunk) -> tuple[int, object]:
        """``(codec, payload)`` for *chunk* (a bytes-like), deciding on a sample of its middle;
        the payload may be *chunk* itself."""
        view = memoryview(chunk).cast("B")
        if self.due() and self.decide(middle(view), view.nbytes):
            return self.compress(view)
        self.sent_raw(view.nbytes)
        return RAW, view


def middle(view: memoryview) -> memoryview:
    """The :data:`SAMPLE` bytes from the middle of *view* (all of it when shorter): what
    ``auto`` compresses to judge a chunk."""
    mid = max(0, view.nbytes // 2 - SAMPLE // 2)
    return view[mid : mid + SAMPLE]


def pays(n: int, compressed: int, seconds: float, link_rate: float | None) -> bool:
    """True when sending *n* bytes compressed to *compressed* (taking *seconds*) beats raw."""
    rate = link_rate or PRIOR
    ratio = compressed / n
    per_byte_c = seconds / n
    raw = 1.0 / rate
    zstd = per_byte_c + ratio / rate + per_byte_c / 3
    return zstd < _MARGIN * raw


def decode(codec: int, payload, size: int):
    """The *size* raw bytes of a chunk sent as ``(codec, payload)``."""
    if codec == RAW:
        return payload
    if codec == ZSTD:
        import zstandard

        return zstandard.ZstdDecompressor().decompress(payload, max_output_size=size)
    msg = f"unknown chunk codec {codec}"
    raise ValueError(msg)
