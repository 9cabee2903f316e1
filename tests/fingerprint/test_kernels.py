"""The array kernels behind extraction give exactly the straightforward result, edges included."""

from __future__ import annotations

import numpy as np
import pytest

from colabmagic.fingerprint import spectrogram
from colabmagic.fingerprint._xp import NUMPY, max_filter_doubling
from colabmagic.fingerprint.peaks import _block_then_strongest

from .conftest import numpy_as_device


def brute_max_filter(x: np.ndarray, radius: int, axis: int) -> np.ndarray:
    """Window by window, zeros beyond the edges (the definition)."""
    x = np.moveaxis(x, axis, 0)
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        window = x[max(i - radius, 0) : i + radius + 1]
        out[i] = np.maximum(window.max(axis=0), 0)
    return np.moveaxis(out, 0, axis)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (40, 17), (7, 300), (130, 230)])
@pytest.mark.parametrize("axis", [0, 1])
def test_max_filter_is_exactly_the_windowed_maximum(shape, axis):
    rng = np.random.default_rng(sum(shape) + axis)
    x = (rng.random(shape) * (rng.random(shape) > 0.3)).astype(np.float32)
    for radius in range(9):
        want = brute_max_filter(x, radius, axis)
        assert np.array_equal(max_filter_doubling(np, x, radius, axis), want)
        assert np.array_equal(NUMPY.max_filter(x, radius, axis), want)
        assert np.array_equal(numpy_as_device().max_filter(x, radius, axis), want)


def test_max_filter_along_every_axis_of_1d_and_3d_arrays():
    rng = np.random.default_rng(4)
    for x in (rng.random(37).astype(np.float32), rng.random((4, 9, 23)).astype(np.float32)):
        for axis in range(x.ndim):
            for radius in (1, 3, 6):
                want = brute_max_filter(x, radius, axis)
                assert np.array_equal(max_filter_doubling(np, x, radius, axis), want)


def test_max_filter_of_a_strided_view():
    x = np.random.default_rng(1).random((50, 257)).astype(np.float32)
    band = x[:, 6:224]  # what pick_peaks filters
    for axis, radius in ((1, 6), (0, 4)):
        assert np.array_equal(
            NUMPY.max_filter(band, radius, axis), brute_max_filter(band, radius, axis)
        )


def test_block_then_strongest_orders_like_lexsort():
    rng = np.random.default_rng(2)
    blk = np.sort(rng.integers(0, 20, 5000))
    values = rng.choice(rng.random(300).astype(np.float32) + np.float32(1e-30), 5000)  # ties
    order = np.argsort(_block_then_strongest(np, blk, values), kind="stable")
    assert np.array_equal(order, np.lexsort(np.stack([-values, blk])))


def test_packing_a_range_gives_that_slice_of_the_whole_buffer():
    rng = np.random.default_rng(3)
    signals = [rng.standard_normal(n).astype(np.float32) for n in (0, 5, 9000, 1, 30000, 256)]
    lay = spectrogram.layout([len(s) for s in signals], hop=256, block=32, n_fft=512)
    whole = spectrogram.pack_signals(signals, lay, hop=256, n_fft=512)
    assert len(whole) == lay.total * 256 + 512
    for lo, hi in [(0, len(whole)), (0, 1), (100, 9000), (8192, 8192 + 512), (20000, len(whole))]:
        part = spectrogram.pack_signals(signals, lay, hop=256, n_fft=512, lo=lo, hi=hi)
        assert np.array_equal(part, whole[lo:hi])
