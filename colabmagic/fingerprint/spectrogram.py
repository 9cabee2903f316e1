"""Batched power spectrogram: many tracks laid out in one frame array.

Each track occupies a *slot* of whole peak-picking blocks plus one empty block, so that nothing
computed later (2-D maxima, per-block density, peak pairs) can reach from one track into the next;
fingerprinting a track alone or inside a batch gives the same hashes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from colabmagic.fingerprint._xp import NUMPY, Backend


@dataclass(frozen=True)
class Layout:
    """Where each track of a batch lives in the batch's frame array.

    Attributes
    ----------
    starts : numpy.ndarray
        First frame of each track's slot (int64), plus the total frame count as last element.
    n_frames : numpy.ndarray
        Frames that hold audio of each track.
    """

    starts: np.ndarray
    n_frames: np.ndarray

    @property
    def total(self) -> int:
        return int(self.starts[-1])


def layout(lengths: list[int], *, hop: int, block: int, n_fft: int) -> Layout:
    """Slot sizes (in frames) for signals of the given lengths (in samples).

    A signal starts ``n_fft // hop - 1`` hops into its slot, so that no frame of the previous
    slot overlaps it.
    """
    lead = n_fft // hop - 1
    n_frames = np.array([-(-n // hop) + lead for n in lengths], dtype=np.int64)
    slots = (-(-n_frames // block) + 1) * block
    starts = np.concatenate([[0], np.cumsum(slots)]).astype(np.int64)
    return Layout(starts=starts, n_frames=n_frames)


def pack_signals(
    signals: list[np.ndarray],
    lay: Layout,
    *,
    hop: int,
    n_fft: int,
    lo: int = 0,
    hi: int | None = None,
    backend: Backend = NUMPY,
) -> Any:
    """Samples ``lo:hi`` of the batch's zero-padded float32 buffer following *lay* (default: all).

    Only the signals that overlap the range are copied, so the frame chunks of a batch can be
    packed one at a time into small buffers instead of one large buffer for the whole batch. The
    buffer is made on *backend*: on a device each signal is copied straight into its slot (no
    host buffer of the whole batch to fill first).
    """
    hi = lay.total * hop + n_fft if hi is None else hi
    buf = backend.xp.zeros(hi - lo, dtype=np.float32)
    offsets = lay.starts[:-1] * hop + (n_fft - hop)
    ends = offsets + np.array([len(s) for s in signals], dtype=np.int64)
    first = int(np.searchsorted(ends, lo, side="right"))  # ends never decrease
    last = int(np.searchsorted(offsets, hi, side="left"))
    for i in range(first, last):  # the few tracks in the range, not frames
        a, b = max(int(offsets[i]), lo), min(int(ends[i]), hi)
        if b > a:
            piece = signals[i][a - offsets[i] : b - offsets[i]]
            buf[a - lo : b - lo] = backend.to_device(piece, dtype=np.float32)
    return buf


def power_spectrogram(
    backend: Backend, signal: Any, *, n_frames: int, n_fft: int, hop: int, window: Any
) -> Any:
    """Power spectrogram ``(n_frames, n_fft // 2 + 1)`` (float32) of a device signal.

    ``n_fft`` must be a multiple of ``hop``: frames are built from reshaped hop-sized blocks (no
    strides, no gathers), which every array namespace supports.
    """
    xp = backend.xp
    k = n_fft // hop
    blocks = signal[: (n_frames + k - 1) * hop].reshape(n_frames + k - 1, hop)
    frames = xp.concatenate([blocks[i : i + n_frames] for i in range(k)], axis=1)
    frames *= window
    spec = backend.rfft(frames)
    parts = spec.view(spec.real.dtype)  # re, im, re, im, ...: squared in one contiguous pass
    squares = parts * parts
    power = squares[:, 0::2] + squares[:, 1::2]  # re * re + im * im, rounded as before
    return power.astype(xp.float32, copy=False)
