"""Every NumPy/CuPy branch of the fingerprinting code lives here.

The rest of :mod:`colabmagic.fingerprint` receives a :class:`Backend` once per call and only uses
``backend.xp`` (an array namespace with the NumPy API) plus the few helpers below. A test can pass
any module with the CuPy API (for example :mod:`numpy` itself, or the mock ``cupy``) through
:meth:`Backend.from_module`, which exercises the device path without a GPU.
"""

from __future__ import annotations

import importlib
import types
from dataclasses import dataclass
from typing import Any

import numpy as np

from colabmagic.errors import ParameterError

BACKENDS = ("auto", "numpy", "cupy")


@dataclass(frozen=True)
class Backend:
    """An array namespace and the functions that move data to and from it.

    Parameters
    ----------
    name : str
        ``"numpy"`` or ``"cupy"`` (or the name of a module standing in for CuPy).
    xp : module
        The array namespace (``numpy``, ``cupy``, or a stand-in).
    is_device : bool
        True when arrays live on an accelerator and must be copied back with :meth:`to_host`.
    """

    name: str
    xp: Any
    is_device: bool = False

    @classmethod
    def from_module(cls, module: types.ModuleType, *, name: str | None = None) -> Backend:
        """Use *module* (anything with CuPy's API: ``asarray``, ``asnumpy``, ``fft``) as device."""
        return cls(name=name or module.__name__, xp=module, is_device=True)

    def to_device(self, array: Any, dtype: Any = None) -> Any:
        """Copy a host array to the backend (a no-op on NumPy)."""
        return self.xp.asarray(array, dtype=dtype)

    def to_host(self, array: Any) -> np.ndarray:
        """Copy a backend array to a NumPy array (a no-op on NumPy)."""
        if self.is_device:
            asnumpy = getattr(self.xp, "asnumpy", None)
            if asnumpy is not None:
                return np.asarray(asnumpy(array))
        return np.asarray(array)

    def rfft(self, frames: Any) -> Any:
        """Real FFT along the last axis, keeping single precision where the backend can."""
        if self.xp is np:
            try:
                import scipy.fft
            except ImportError:  # pragma: no cover - scipy ships with the [audio] extra
                return np.fft.rfft(frames, axis=-1).astype(np.complex64, copy=False)
            return scipy.fft.rfft(frames, axis=-1)
        return self.xp.fft.rfft(frames, axis=-1)

    def synchronize(self) -> None:
        """Wait for queued device work (for honest timings); a no-op on the host."""
        if self.name == "cupy":
            self.xp.cuda.get_current_stream().synchronize()


NUMPY = Backend(name="numpy", xp=np, is_device=False)


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        cupy = importlib.import_module("cupy")
        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:  # noqa: BLE001 - any failure (no CUDA driver, no device) means "no GPU"
        return False


def resolve_backend(backend: str | Backend = "auto") -> Backend:
    """Turn ``"auto"``, ``"numpy"``, ``"cupy"`` or a :class:`Backend` into a :class:`Backend`.

    Parameters
    ----------
    backend : str or Backend
        ``"auto"`` picks CuPy when a CUDA device is usable, else NumPy.

    Returns
    -------
    Backend
    """
    if isinstance(backend, Backend):
        return backend
    if backend not in BACKENDS:
        msg = f"backend={backend!r} is not one of {', '.join(BACKENDS)}; pick one of those."
        raise ParameterError(msg)
    if backend == "numpy" or (backend == "auto" and not cupy_available()):
        return NUMPY
    try:
        cupy = importlib.import_module("cupy")
    except ImportError as exc:
        msg = "backend='cupy' needs CuPy; install colabmagic[gpu] or use backend='numpy'."
        raise ParameterError(msg) from exc
    return Backend(name="cupy", xp=cupy, is_device=True)
