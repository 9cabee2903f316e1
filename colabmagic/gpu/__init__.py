"""GPU helpers: pick the array module, describe the device.

``array_module()`` returns CuPy when it imports *and* a CUDA device is usable (or the NumPy-backed
mock is installed), NumPy otherwise -- the one place user code asks "GPU or not?".
"""

from __future__ import annotations

import sys
import types

import numpy

from colabmagic.remote.kernel_ext import gpu_info

__all__ = ["array_module", "device_info", "gpu_available"]


def gpu_available() -> bool:
    """True when ``import cupy`` works and reports at least one device."""
    try:
        import cupy
    except ImportError:
        return False
    try:
        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:  # noqa: BLE001 - a CUDA driver/runtime error means "no usable GPU"
        return False


def array_module(prefer: str = "auto") -> types.ModuleType:
    """The array namespace to compute with.

    Parameters
    ----------
    prefer : {"auto", "numpy", "cupy"}
        ``"auto"``: CuPy when a device is usable, else NumPy. ``"cupy"`` raises when it is not.

    Examples
    --------
    >>> xp = array_module("numpy")
    >>> xp.arange(3).sum()
    np.int64(3)
    """
    from colabmagic.errors import ParameterError

    if prefer not in ("auto", "numpy", "cupy"):
        msg = f"prefer={prefer!r} must be one of 'auto', 'numpy', 'cupy'"
        raise ParameterError(msg)
    if prefer == "numpy":
        return numpy
    if gpu_available():
        return sys.modules["cupy"]
    if prefer == "cupy":
        msg = "CuPy with a usable CUDA device is required (install colabmagic[gpu] on a GPU host)"
        raise ParameterError(msg)
    return numpy


def device_info() -> dict | None:
    """Name and memory of the first GPU (nvidia-smi, else CuPy), the mock's, or None."""
    return gpu_info()
