"""Array interop: DLPack, ``__cuda_array_interface__`` and NumPy in, CuPy or NumPy out.

Every public entry point funnels its array arguments through :func:`as_array`, so
one place decides whether work runs on the GPU (any CUDA array: CuPy, PyTorch,
JAX, numba device arrays) or on the CPU reference path (NumPy). GPU inputs are
wrapped without copies; CuPy is imported only when a GPU array or GPU work shows up.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any, Sequence

import numpy as np

from .errors import DeviceUnavailable

# DLPack device types (dlpack.h): kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3, kDLCUDAManaged = 13.
_DLPACK_CUDA_DEVICES = (2, 13)

_DTYPES = {
    "float16": np.float16,
    "float32": np.float32,
    "bfloat16": None,  # NumPy has no bfloat16; resolved through CuPy / ml_dtypes on demand
}


@functools.lru_cache(maxsize=None)
def cuda_driver_present() -> bool:
    """True when the CUDA driver library can be loaded (a GPU machine), without importing CuPy."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def cupy():
    """Import CuPy lazily, with an error that says how to install it."""
    try:
        import cupy as cp  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise DeviceUnavailable(
            "GPU arrays need CuPy: install million-cupy[cuda12] (CUDA 12) or million-cupy[cuda13] (CUDA 13)"
        ) from exc
    return cp


@functools.lru_cache(maxsize=None)
def gpu_unavailable_reason() -> str | None:
    """Why no CUDA device is usable through CuPy here, or None when one is."""
    if os.environ.get("MILLION_CUPY_DISABLE_GPU"):
        return "MILLION_CUPY_DISABLE_GPU is set"
    if not cuda_driver_present():
        return "no CUDA driver is installed (libcuda cannot be loaded)"
    try:
        count = cupy().cuda.runtime.getDeviceCount()
    except DeviceUnavailable as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - any driver/runtime failure means "no usable GPU"
        return f"CuPy cannot reach the driver: {type(exc).__name__}: {exc}"
    return None if count > 0 else "the CUDA driver reports no device"


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    return gpu_unavailable_reason() is None


def require_gpu(what: str, cpu_alternative: str = "") -> Any:
    """CuPy, once a CUDA device is known to be usable; otherwise :class:`DeviceUnavailable` naming ``what``,
    the reason, and ``cpu_alternative`` (what to use on this machine instead) when given."""
    reason = gpu_unavailable_reason()
    if reason is not None:
        raise DeviceUnavailable(f"{what} needs a CUDA GPU usable through CuPy, and there is none: {reason}"
                                + (f"; {cpu_alternative}" if cpu_alternative else ""))
    return cupy()


def is_gpu_array(x: Any) -> bool:
    """True for arrays that live in CUDA device memory (CuPy, torch.cuda, JAX GPU, numba device arrays)."""
    dev = getattr(x, "__dlpack_device__", None)
    if dev is not None and not isinstance(x, np.ndarray):
        try:
            return int(dev()[0]) in _DLPACK_CUDA_DEVICES
        except Exception:  # noqa: BLE001
            pass
    return hasattr(x, "__cuda_array_interface__")


def _to_cupy(x: Any, stream: Any = None):
    cp = cupy()
    if isinstance(x, cp.ndarray):
        return x
    if not hasattr(x, "__dlpack__"):
        # Zero-copy view; the producer's stream field (if any) is honoured by CuPy.
        return cp.asarray(x)
    # DLPack first: it carries dtypes the array interface cannot (PyTorch exports bfloat16 there as raw
    # "<V2"). CuPy passes its current stream to the producer's __dlpack__(stream=...), so the producer
    # orders its pending work before ours (DLPack stream semantics).
    if stream is not None:
        with as_stream(stream):
            return cp.from_dlpack(x)
    return cp.from_dlpack(x)


def as_array(
    x: Any,
    name: str,
    *,
    ndim: int | None = None,
    dtypes: Sequence[str] | None = None,
    shape: Sequence[int | None] | None = None,
    on_gpu: bool | None = None,
    stream: Any = None,
):
    """Return ``x`` as a CuPy array (GPU input) or NumPy array (CPU input), without copying GPU data.

    ``ndim``, ``dtypes`` (names such as "float16") and ``shape`` (None = any size on that axis)
    are checked and violations raise ``TypeError`` / ``ValueError`` naming what was expected
    and what came. ``on_gpu`` forces a side: True moves NumPy input to the GPU (one copy),
    False rejects GPU input.
    """
    if x is None:
        raise TypeError(f"{name}: expected an array, got None")
    gpu_in = is_gpu_array(x)
    if gpu_in:
        if on_gpu is False:
            raise TypeError(f"{name}: expected a host (NumPy) array for this CPU-path object, got a GPU array")
        arr = _to_cupy(x, stream)
    else:
        if not isinstance(x, np.ndarray) and not hasattr(x, "__array__"):
            raise TypeError(
                f"{name}: expected an array exporting __dlpack__, __cuda_array_interface__ or __array__, "
                f"got {type(x).__name__}"
            )
        arr = np.asarray(x)
        if on_gpu:
            arr = require_gpu(f"{name} (a host array moved to the GPU)").asarray(arr)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(arr.shape)}")
    if shape is not None:
        if len(shape) != arr.ndim or any(s is not None and s != a for s, a in zip(shape, arr.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name}: expected shape {want}, got {tuple(arr.shape)}")
    if dtypes is not None and dtype_name(arr.dtype) not in dtypes:
        raise TypeError(f"{name}: expected dtype in {list(dtypes)}, got {dtype_name(arr.dtype)}")
    return arr


def dtype_name(dtype: Any) -> str:
    """Canonical dtype name ("float16", "bfloat16", "float32", "uint8", ...)."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    return "bfloat16" if name in ("bfloat16", "bf16") else name


def bfloat16_dtype():
    """The NumPy-compatible bfloat16 dtype (from ml_dtypes, which CuPy uses for bfloat16)."""
    try:
        import ml_dtypes  # noqa: PLC0415
    except ImportError as exc:
        raise TypeError("bfloat16 needs the ml_dtypes package (pip install ml_dtypes)") from exc
    return np.dtype(ml_dtypes.bfloat16)


def resolve_dtype(name: str) -> np.dtype:
    """Map "float16" / "bfloat16" / "float32" to a dtype object usable by NumPy and CuPy."""
    if name not in _DTYPES:
        raise TypeError(f"dtype: expected one of {list(_DTYPES)}, got {name!r}")
    return bfloat16_dtype() if name == "bfloat16" else np.dtype(_DTYPES[name])


def array_module(arr: Any):
    """numpy for host arrays, cupy for device arrays."""
    return cupy() if is_gpu_array(arr) else np


def to_numpy(x: Any) -> np.ndarray:
    """Host copy of any supported array (for tests, references and the CPU path)."""
    if is_gpu_array(x):
        return _to_cupy(x).get()
    return np.asarray(x)


def as_stream(stream: Any):
    """A CuPy stream from a CuPy stream, a raw ``cudaStream_t`` handle (int), or None (current stream)."""
    cp = cupy()
    if stream is None:
        return cp.cuda.get_current_stream()
    if isinstance(stream, cp.cuda.Stream | cp.cuda.ExternalStream):
        return stream
    ptr = getattr(stream, "cuda_stream", None)  # torch.cuda.Stream and numba streams expose the handle
    if ptr is None:
        ptr = getattr(stream, "handle", None)
    if ptr is None:
        ptr = getattr(stream, "ptr", None)
    if ptr is None and isinstance(stream, int):
        ptr = stream
    if ptr is None:
        raise TypeError(f"stream: expected a CuPy stream, an object with .cuda_stream, or an int handle, got {type(stream).__name__}")
    return cp.cuda.ExternalStream(int(ptr))
