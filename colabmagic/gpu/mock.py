"""A NumPy-backed stand-in for ``cupy``, so GPU code runs (slowly) on a laptop or in CI.

``install()`` registers modules named ``cupy``, ``cupy.cuda``, ``cupy.cuda.runtime``,
``cupy.fft``, ``cupy.random``, ``cupy.linalg``, ``cupy.testing`` and ``cupyx.scipy.*`` in
``sys.modules``. ``%colab_connect --local --mock-gpu`` runs it inside the kernel; tests and
offline scripts can call it directly. The real code path it stands in for is CuPy on a CUDA
device: results are NumPy's, device calls are no-ops with plausible answers.

Covered API
-----------
- every NumPy function and constant under ``cupy.*`` (``cp.arange``, ``cp.sum``, ``cp.float32``,
  ``cp.where``...), returning ``cupy.ndarray`` -- a NumPy subclass with ``.get()``, ``.set()``
  and ``.device``;
- ``asarray``, ``array``, ``asnumpy`` (a copy, as from a device), ``get_array_module``;
- ``cupy.fft``, ``cupy.random``, ``cupy.linalg`` (NumPy's), ``cupyx.scipy.{fft, signal,
  ndimage, special, sparse}`` (SciPy's, when installed);
- ``cupy.cuda``: ``Device`` (context manager, ``id``, ``synchronize()``, ``compute_capability``,
  ``mem_info``), ``Stream`` / ``Event`` (``record``, ``synchronize``, ``get_elapsed_time``),
  ``is_available()``, ``runtime.getDeviceCount()``, ``runtime.getDeviceProperties()``,
  ``runtime.memGetInfo()``, ``runtime.deviceSynchronize()``;
- ``get_default_memory_pool()`` / ``get_default_pinned_memory_pool()`` (``used_bytes``,
  ``total_bytes``, ``free_all_blocks``, ``set_limit``, ``get_limit``).

Anything else (``RawKernel``, ``ElementwiseKernel``, ``ReductionKernel``, ``cuda.texture``...)
raises :class:`MockUnsupportedError`, a ``NotImplementedError`` naming the feature.

This file is executed from source inside remote kernels: standard library and NumPy only.
"""

import functools
import os
import sys
import time
import types

import numpy

MOCK_NAME = "colabmagic mock GPU (NumPy on CPU)"


class MockUnsupportedError(NotImplementedError, AttributeError):
    """A CuPy feature the NumPy mock does not provide (also an AttributeError for hasattr)."""


def _unsupported(name):
    return MockUnsupportedError(
        f"{name} is not supported by the colabmagic GPU mock (NumPy on CPU); "
        "run on a real GPU (%colab_connect HOST) or avoid it in offline code"
    )


class ndarray(numpy.ndarray):
    """``cupy.ndarray`` of the mock: a NumPy array with CuPy's device-transfer methods."""

    def get(self, stream=None, order="C", out=None, blocking=True):
        return asnumpy(self, stream, order, out)

    def set(self, arr, stream=None):
        self[...] = arr

    @property
    def device(self):
        return Device(0)


def _to_mock(value):
    if type(value) is numpy.ndarray:
        return value.view(ndarray)
    if isinstance(value, tuple) and any(type(v) is numpy.ndarray for v in value):
        return (
            type(value)(*map(_to_mock, value))
            if hasattr(value, "_fields")
            else tuple(map(_to_mock, value))
        )
    if isinstance(value, list) and value and type(value[0]) is numpy.ndarray:
        return [_to_mock(v) for v in value]
    return value


def _wrap(fn):
    if not callable(fn) or isinstance(fn, type) or isinstance(fn, numpy.ufunc):
        return fn

    @functools.wraps(fn)
    def inner(*args, **kwargs):
        return _to_mock(fn(*args, **kwargs))

    return inner


class _Namespace(types.ModuleType):
    """A module that forwards attribute access to a NumPy/SciPy module, wrapping results."""

    def __init__(self, name, target, extra=None):
        super().__init__(name)
        self._target = target
        self.__dict__.update(extra or {})

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        target = self.__dict__.get("_target")
        if target is not None and hasattr(target, attr):
            value = _wrap(getattr(target, attr))
            setattr(self, attr, value)
            return value
        msg = f"{self.__name__}.{attr}"
        raise _unsupported(msg)


def asarray(a, dtype=None, order=None, *, blocking=False):
    return numpy.asarray(a, dtype=dtype, order=order).view(ndarray)


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    return numpy.array(obj, dtype=dtype, copy=copy, order=order, ndmin=ndmin).view(ndarray)


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    host = numpy.array(a, order=order).view(numpy.ndarray)
    if out is not None:
        out[...] = host
        return out
    return host


def get_array_module(*args):
    for a in args:
        if isinstance(a, ndarray):
            return sys.modules.get("cupy", numpy)
    return numpy


def _host_memory():
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = free = 0
    return free, total


class _Synchronous:
    """A device or stream of the mock: a context manager whose work is always finished."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def use(self):
        return self

    def synchronize(self):
        return None


class Device(_Synchronous):
    """The one mock device (id 0)."""

    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)
        if self.id != 0:
            msg = f"the colabmagic GPU mock has one device (0), not {self.id}"
            raise ValueError(msg)

    @property
    def compute_capability(self):
        return "90"

    @property
    def mem_info(self):
        return _host_memory()

    def __repr__(self):
        return f"<CUDA Device {self.id} (colabmagic mock)>"


class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self._t = None

    def record(self, stream=None):
        self._t = time.perf_counter()

    def synchronize(self):
        return None

    @property
    def done(self):
        return True


def get_elapsed_time(start_event, end_event):
    """Milliseconds between two recorded events."""
    return (end_event._t - start_event._t) * 1000.0


class Stream(_Synchronous):
    null = None

    def __init__(self, null=False, non_blocking=False, ptds=False):
        pass

    def record(self, event=None):
        event = event or Event()
        event.record()
        return event

    @property
    def done(self):
        return True


Stream.null = Stream(null=True)


class MemoryPool:
    """Memory of mock arrays is not tracked: sizes stay 0; a limit is only remembered."""

    def __init__(self):
        self._limit = 0

    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_bytes(self):
        return 0

    def free_all_blocks(self, stream=None):
        return None

    def n_free_blocks(self):
        return 0

    def set_limit(self, size=None, fraction=None):
        if fraction is not None:
            size = int(_host_memory()[1] * fraction)
        self._limit = int(size or 0)

    def get_limit(self):
        return self._limit


class PinnedMemoryPool(MemoryPool):
    pass


_memory_pool = MemoryPool()
_pinned_pool = PinnedMemoryPool()


def _runtime_module():
    def getDeviceCount():
        return 1

    def getDeviceProperties(device):
        Device(device)
        return {
            "name": MOCK_NAME.encode(),
            "totalGlobalMem": _host_memory()[1],
            "multiProcessorCount": os.cpu_count() or 1,
            "major": 9,
            "minor": 0,
        }

    def memGetInfo():
        return _host_memory()

    def deviceSynchronize():
        return None

    def getDevice():
        return 0

    def runtimeGetVersion():
        return 0

    return _Namespace(
        "cupy.cuda.runtime",
        None,
        {
            "getDeviceCount": getDeviceCount,
            "getDeviceProperties": getDeviceProperties,
            "memGetInfo": memGetInfo,
            "deviceSynchronize": deviceSynchronize,
            "getDevice": getDevice,
            "runtimeGetVersion": runtimeGetVersion,
        },
    )


def _cupyx_modules():
    mods = {"cupyx": _Namespace("cupyx", None, {"__path__": []})}
    sp = _Namespace("cupyx.scipy", None, {"__path__": []})
    mods["cupyx.scipy"] = sp
    mods["cupyx"].scipy = sp
    for sub in ("fft", "signal", "ndimage", "special", "sparse"):
        try:
            target = __import__(f"scipy.{sub}", fromlist=["_"])
        except ImportError:
            continue
        m = _Namespace(f"cupyx.scipy.{sub}", target)
        setattr(sp, sub, m)
        mods[f"cupyx.scipy.{sub}"] = m
    return mods


def build():
    """Build the mock ``cupy`` module tree; returns ``{module name: module}``."""
    runtime = _runtime_module()
    cuda = _Namespace(
        "cupy.cuda",
        None,
        {
            "__path__": [],
            "Device": Device,
            "Stream": Stream,
            "Event": Event,
            "get_elapsed_time": get_elapsed_time,
            "runtime": runtime,
            "is_available": lambda: True,
            "MemoryPool": MemoryPool,
            "PinnedMemoryPool": PinnedMemoryPool,
            "get_current_stream": lambda: Stream.null,
        },
    )
    fft = _Namespace("cupy.fft", numpy.fft)
    random = _Namespace("cupy.random", numpy.random)
    linalg = _Namespace("cupy.linalg", numpy.linalg)
    testing = _Namespace("cupy.testing", numpy.testing)
    cupy = _Namespace(
        "cupy",
        numpy,
        {
            "__path__": [],
            "__version__": f"0+colabmagic.mock.numpy{numpy.__version__}",
            "_colabmagic_mock": True,
            "ndarray": ndarray,
            "asarray": asarray,
            "array": array,
            "asnumpy": asnumpy,
            "get_array_module": get_array_module,
            "cuda": cuda,
            "fft": fft,
            "random": random,
            "linalg": linalg,
            "testing": testing,
            "get_default_memory_pool": lambda: _memory_pool,
            "get_default_pinned_memory_pool": lambda: _pinned_pool,
            "is_available": lambda: True,
        },
    )
    for name in ("RawKernel", "RawModule", "ElementwiseKernel", "ReductionKernel", "fuse"):
        setattr(cupy, name, _raiser(f"cupy.{name}"))
    mods = {
        "cupy": cupy,
        "cupy.cuda": cuda,
        "cupy.cuda.runtime": runtime,
        "cupy.fft": fft,
        "cupy.random": random,
        "cupy.linalg": linalg,
        "cupy.testing": testing,
    }
    mods.update(_cupyx_modules())
    return mods


def _raiser(name):
    def unsupported(*args, **kwargs):
        raise _unsupported(name)

    unsupported.__name__ = name.rsplit(".", 1)[-1]
    return unsupported


def install():
    """Make ``import cupy`` (and ``cupyx.scipy``) give the NumPy-backed mock in this process."""
    mods = build()
    sys.modules.update(mods)
    os.environ["COLABMAGIC_MOCK_GPU"] = "1"
    return mods["cupy"]


def uninstall():
    """Remove the mock modules installed by :func:`install`."""
    for name in list(sys.modules):
        mod = sys.modules[name]
        if (name == "cupy" or name.startswith(("cupy.", "cupyx"))) and isinstance(mod, _Namespace):
            del sys.modules[name]
    os.environ.pop("COLABMAGIC_MOCK_GPU", None)
