"""The NumPy-backed CuPy mock and the array-module helper."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from colabmagic.errors import ParameterError
from colabmagic.gpu import array_module, mock


@pytest.fixture
def cp():
    saved = {k: v for k, v in sys.modules.items() if k == "cupy" or k.startswith("cupy")}
    module = mock.install()
    yield module
    mock.uninstall()
    sys.modules.update(saved)


def test_common_api_runs_on_numpy(cp):
    x = cp.arange(10, dtype=cp.float32)
    assert isinstance(x, cp.ndarray)
    assert float(x.sum()) == 45.0
    host = cp.asnumpy(x)
    assert type(host) is np.ndarray
    host[0] = 100
    assert x[0] == 0, "asnumpy copies, as a device-to-host transfer does"
    assert type(x.get()) is np.ndarray
    y = cp.asarray([[1.0, 2.0], [3.0, 4.0]])
    assert isinstance(y @ y, cp.ndarray)
    assert cp.get_array_module(y) is cp
    assert cp.get_array_module(np.ones(2)) is np
    np.testing.assert_allclose(cp.linalg.inv(y) @ y, np.eye(2), atol=1e-12)
    spec = cp.fft.rfft(cp.ones(8))
    assert isinstance(spec, cp.ndarray)
    assert spec[0] == 8
    r = cp.random.default_rng(0).random(3)
    assert r.shape == (3,)


def test_device_memory_and_events(cp):
    assert cp.cuda.runtime.getDeviceCount() == 1
    props = cp.cuda.runtime.getDeviceProperties(0)
    assert b"mock" in props["name"]
    free, total = cp.cuda.runtime.memGetInfo()
    assert 0 < free <= total
    with cp.cuda.Device(0) as dev:
        dev.synchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    end.record()
    end.synchronize()
    assert cp.cuda.get_elapsed_time(start, end) >= 0
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    assert pool.used_bytes() == 0
    with pytest.raises(ValueError, match="one device"):
        cp.cuda.Device(1)


def test_unsupported_features_name_themselves(cp):
    with pytest.raises(NotImplementedError, match=r"cupy\.RawKernel is not supported"):
        cp.RawKernel("code", "name")
    with pytest.raises(NotImplementedError, match=r"cupy\.not_a_function"):
        cp.not_a_function  # noqa: B018
    assert not hasattr(cp, "not_a_function")  # still an AttributeError for feature tests


def test_cupyx_scipy_maps_to_scipy(cp):
    import cupyx.scipy.signal as sig

    out = sig.convolve(cp.ones(3), cp.ones(3))
    np.testing.assert_array_equal(out, [1, 2, 3, 2, 1])


def test_array_module_choices(cp):
    assert array_module("numpy") is np
    assert array_module("auto") is cp  # the mock counts as a usable device
    with pytest.raises(ParameterError, match="prefer='gpu'"):
        array_module("gpu")


def test_array_module_without_cupy_is_numpy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import fails
    assert array_module() is np
    with pytest.raises(ParameterError, match="CuPy with a usable CUDA device"):
        array_module("cupy")
