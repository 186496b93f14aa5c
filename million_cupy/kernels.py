"""The one place that compiles CUDA code.

Sources live in ``cuda_src/`` and are read at run time. Each operation module
registers the template instantiations it supports with :func:`register_variants`;
a variant is compiled with NVRTC through ``cupy.RawModule(name_expressions=...)``
on first use and cached per (source, name expression, device). :func:`compiled`
lists what this process has compiled, :func:`supported_variants` the whole grid.

:func:`nvrtc_compile_offline` compiles a source to a cubin for a given
architecture without a GPU (NVRTC needs none); CI uses it to build the whole
supported grid for sm_80 and sm_90 and to report register spills.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import hashlib
import os
import re
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .errors import DeviceUnavailable, UnsupportedConfiguration
from .interop import cupy

_PACKAGE_DIR = Path(__file__).resolve().parent
# A source checkout keeps cuda_src/ beside the package; an installed wheel ships it inside.
_SOURCE_DIRS = (_PACKAGE_DIR.parent / "cuda_src", _PACKAGE_DIR / "cuda_src")

# NVRTC accepts no nvcc-only flags (-O3, -Xptxas ...); it optimises by default.
BASE_OPTIONS: tuple[str, ...] = ("-std=c++17",)

_GRIDS: dict[str, Callable[[], list[str]]] = {}
_cache: dict[tuple[str, str, int], object] = {}
_lock = threading.Lock()


_source_override: Path | None = None  # sources_from()'s directory, while its block runs
_retired: list[object] = []  # kernels compiled under sources_from(): kept loaded (bound launches hold their handles)


def source_dir() -> Path:
    """Directory holding the CUDA sources."""
    if _source_override is not None:
        return _source_override
    for d in _SOURCE_DIRS:
        if d.is_dir():
            return d
    raise FileNotFoundError(f"cuda_src/ not found; looked in {[str(d) for d in _SOURCE_DIRS]}")


@functools.lru_cache(maxsize=None)
def read_source(name: str) -> str:
    """Text of ``cuda_src/<name>``."""
    path = source_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"CUDA source {name!r} not found in {source_dir()}")
    return path.read_text()


def register_variants(source: str) -> Callable[[Callable[[], list[str]]], Callable[[], list[str]]]:
    """Decorator: the decorated function returns every supported name expression of ``source``."""

    def deco(fn: Callable[[], list[str]]) -> Callable[[], list[str]]:
        _GRIDS[source] = fn
        return fn

    return deco


@contextlib.contextmanager
def sources_from(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """Inside the block, kernels compile from ``directory`` (a copy of ``cuda_src/``, e.g. with a patch applied)
    instead of the package's sources; afterwards the package's compiled kernels are back.

    For timing source variants against each other in one process, over the same caches and inputs
    (``bench/ab_sources.py``): separate processes move the same kernel by several per cent. Objects that bound a
    launch inside the block (wrappers, plans, steps) keep the variant's kernels, which stay loaded until the
    process ends. Not thread-safe against compiles in other threads.

    Raises:
        FileNotFoundError: ``directory`` is not a directory.
    """
    global _source_override
    path = Path(directory).resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"sources_from: expected a directory of CUDA sources, got {str(path)!r}")
    with _lock:
        outer, saved = _source_override, dict(_cache)
        _source_override = path
        _cache.clear()
        read_source.cache_clear()
    try:
        yield path
    finally:
        with _lock:
            _retired.extend(_cache.values())
            _cache.clear()
            _cache.update(saved)
            _source_override = outer
            read_source.cache_clear()


def _import_operation_modules() -> None:
    # Importing these registers their grids; kept lazy so kernels.py has no import cycle.
    from . import cache, codebook, decode, parallel, prefill  # noqa: F401, PLC0415


def supported_variants() -> dict[str, list[str]]:
    """Every supported template instantiation, by source file."""
    _import_operation_modules()
    return {src: list(fn()) for src, fn in sorted(_GRIDS.items())}


def _options() -> tuple[str, ...]:
    return BASE_OPTIONS + (f"-I{source_dir()}",)


def _current_device(kernel: str) -> int:
    try:
        return cupy().cuda.runtime.getDevice()
    except Exception as exc:  # noqa: BLE001
        raise DeviceUnavailable(f"no usable CUDA device for kernel {kernel}: {exc}") from exc


def _cached(key: tuple, build: Callable[[], Any]):
    """The kernel cached under ``key``, built by ``build`` (once, under the lock) when missing."""
    kernel = _cache.get(key)
    if kernel is None:
        with _lock:
            kernel = _cache.get(key)
            if kernel is None:
                kernel = _cache[key] = build()
    return kernel


def get_kernel(source: str, name_expression: str):
    """Compiled kernel ``name_expression`` from ``source`` for the current device (compiled once, then cached)."""
    device = _current_device(name_expression)

    def build():
        # The calling operation module registered its grid when it was imported.
        grid = _GRIDS[source]() if source in _GRIDS else None
        if grid is not None and name_expression not in grid:
            raise UnsupportedConfiguration(
                f"{name_expression} is not a supported variant of {source}; supported: {len(grid)} variants, "
                f"e.g. {grid[:4]}"
            )
        module = cupy().RawModule(code=read_source(source), options=_options(), name_expressions=[name_expression])
        return module.get_function(name_expression)

    return _cached((source, name_expression, device), build)


def kernel_cache_dir() -> Path:
    """CuPy's on-disk kernel cache: ``$CUPY_CACHE_DIR``, else ``~/.cupy/kernel_cache`` (CuPy's own rule)."""
    return Path(os.environ.get("CUPY_CACHE_DIR", Path.home() / ".cupy" / "kernel_cache"))


def arch_cubin(source: str, arch: str, defines: Sequence[str] = (), cache_dir: str | os.PathLike[str] | None = None
               ) -> Path:
    """Path of the cubin NVRTC builds from ``cuda_src/<source>`` for ``arch`` with the macros ``defines``, kept on
    disk beside CuPy's own kernel cache (``cache_dir``; default: CuPy's, ``$CUPY_CACHE_DIR`` or
    ``~/.cupy/kernel_cache``) and reused while the sources, headers, options and NVRTC are unchanged. No GPU needed.

    Without it every process paid the build again on its first verification step (~4 s for the sm_90a build of
    prefill_attention.cu), where CuPy's ``RawModule`` kernels come from its cache.

    Raises:
        RuntimeError: NVRTC failed (its log attached).
    """
    if cache_dir is None:
        cache_dir = kernel_cache_dir()
    digest = hashlib.sha256()
    for item in (source, arch, *defines, *_options(), *cuda_include_dirs(), repr(nvrtc_version())):
        digest.update(item.encode() + b"\0")
    for path in sorted(source_dir().glob("*.cu*")):  # the source and every header it may include
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    target = Path(cache_dir) / f"million_cupy_{Path(source).stem}_{arch}_{digest.hexdigest()[:32]}.cubin"
    if target.is_file():
        return target
    cubin = nvrtc_compile_offline(source, [], arch=arch, defines=defines).cubin
    try:
        _write_whole(target, cubin)
    except OSError as exc:  # a read-only cache: keep the build in the temp directory instead, and say so
        fallback = Path(tempfile.gettempdir()) / "million_cupy_kernel_cache" / target.name
        warnings.warn(f"million_cupy: cannot keep the {arch} build of {source} in {target.parent} ({exc}); "
                      f"it goes to {fallback.parent}", RuntimeWarning, stacklevel=3)
        _write_whole(fallback, cubin)
        target = fallback
    return target


def _write_whole(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that another process sees the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    scratch.write_bytes(data)
    os.replace(scratch, path)


def get_arch_kernel(source: str, entry: str, arch: str, defines: Sequence[str] = ()):
    """Kernel ``entry`` (an ``extern "C"`` name) of ``source``, compiled by NVRTC for ``arch`` with the macros
    ``defines``, for the current device (built once, kept on disk by :func:`arch_cubin`, loaded once per process).

    For kernels that need an architecture-specific target: Hopper's warpgroup MMA (wgmma) exists for ``sm_90a``
    only, and CuPy's ``RawModule`` compiles for the plain ``sm_XX`` of the device.

    Raises:
        DeviceUnavailable: no usable CUDA device.
        RuntimeError: NVRTC failed (its log attached).
    """
    device = _current_device(entry)

    def build():
        return cupy().RawModule(path=str(arch_cubin(source, arch, defines))).get_function(entry)

    return _cached((source, f"{arch}:{entry}:{','.join(defines)}", device), build)


_smem_opted_in: set[tuple[int, int]] = set()


def opt_in_shared_memory(kernel, smem: int) -> None:
    """Allow ``kernel`` (a CuPy RawKernel) ``smem`` bytes of dynamic shared memory; above 48 KB CUDA needs
    this once per kernel and size."""
    key = (id(kernel), smem)
    if smem > 48 * 1024 and key not in _smem_opted_in:
        kernel.max_dynamic_shared_size_bytes = smem
        _smem_opted_in.add(key)


def _kernel_param(arg: Any) -> ctypes._SimpleCData:
    if isinstance(arg, np.generic):
        return np.ctypeslib.as_ctypes_type(arg.dtype)(arg.item())
    data = getattr(arg, "data", None)
    if data is not None and hasattr(data, "ptr"):  # a CuPy array: its device address
        return ctypes.c_void_p(data.ptr)
    if isinstance(arg, int):  # a raw device address
        return ctypes.c_void_p(arg)
    raise TypeError(f"kernel argument: expected a CuPy array or a NumPy scalar, got {type(arg).__name__}")


#: The environment variable that switches programmatic dependent launch for bound launches: ``0`` turns it off;
#: unset or ``1``, it is on where the device supports it (compute capability 9.0 or newer).
PDL_ENV = "MILLION_CUPY_PDL"
_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # cuda.h, CUlaunchAttributeID


class _LaunchAttribute(ctypes.Structure):
    # cuda.h's CUlaunchAttribute: the id, padding to 8 bytes, a 64-byte value union (here its first int).
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                ("value_rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):
    # cuda.h's CUlaunchConfig.
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


_pdl_devices: dict[int, bool] = {}


def programmatic_launches_requested() -> bool:
    """Whether the environment asks for programmatic dependent launch: ``MILLION_CUPY_PDL`` unset or ``1`` (the
    default), not ``0``.

    Raises:
        ValueError: the variable holds something else.
    """
    value = os.environ.get(PDL_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{PDL_ENV}: expected 0 (ordinary launches) or 1 (programmatic dependent launch on sm_90+, "
                         f"the default), got {value!r}")
    return value == "1"


def programmatic_launches() -> bool:
    """Whether bound launches of this library's kernels on the current device use programmatic dependent launch:
    on by default on devices of compute capability 9.0 or newer (Hopper, Blackwell); ``MILLION_CUPY_PDL=0``
    turns it off.

    Such a launch lets the kernel be scheduled while the previous kernel of its stream is still running; every
    kernel in ``cuda_src/`` opens by waiting for that kernel (``wait_for_previous_grid``), so the overlap hides
    launch latency and block dispatch, never an ordering (results are the same bit for bit). Older devices
    launch ordinarily; with ``MILLION_CUPY_PDL=1`` set explicitly there, a warning says so once.
    """
    if not programmatic_launches_requested():
        return False
    cp = cupy()
    device = cp.cuda.runtime.getDevice()
    on = _pdl_devices.get(device)
    if on is None:
        major = int(cp.cuda.Device(device).compute_capability) // 10
        on = _pdl_devices[device] = major >= 9
        if not on and os.environ.get(PDL_ENV) == "1":
            import warnings  # noqa: PLC0415 - only on this path

            warnings.warn(f"{PDL_ENV}=1: programmatic dependent launch needs compute capability 9.0 or newer; "
                          f"device {device} is {major}.x, so its launches stay ordinary", RuntimeWarning, stacklevel=3)
    return on


@functools.lru_cache(maxsize=1)
def _launch_kernel_ex() -> Any:
    """The driver's ``cuLaunchKernelEx`` (CUDA 11.8+), through ctypes: CuPy's driver binding has no launch
    attributes."""
    try:
        fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
    except (OSError, AttributeError) as exc:
        raise UnsupportedConfiguration(f"programmatic dependent launch: the CUDA driver has no cuLaunchKernelEx "
                                       f"(driver 520 / CUDA 11.8 or newer needed; set {PDL_ENV}=0 for ordinary "
                                       f"launches): {exc}") from exc
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


class BoundLaunch:
    """A kernel launch whose parameter block is built once.

    CuPy's generic launch converts every argument on every call, about a microsecond each, and a decode
    layer has 26. Here they become C values once; a call rewrites only the arguments that change
    (:meth:`set_arg`) and calls ``cuLaunchKernel`` through CuPy's driver binding (4.3 us of host time
    per launch on an H200 host, against 6.1 us for the same call through ctypes). The arrays given at
    construction are kept alive.

    ``kernel`` is a CuPy ``RawKernel`` of this library's sources, or the ``CUfunction`` handle (an int) of a
    kernel compiled elsewhere (the page allocator's numba-cuda kernel), whose arguments are then given as NumPy
    scalars. Where :func:`programmatic_launches` holds when the launch is built, a RawKernel launches through
    ``cuLaunchKernelEx`` with programmatic stream serialization (such a kernel opens with
    ``wait_for_previous_grid``; one compiled elsewhere does not, so it always launches the ordinary way).
    """

    def __init__(self, kernel, grid: int | tuple[int, int], block: int, smem: int, args: Sequence[Any]) -> None:
        if isinstance(kernel, int):
            self._func = kernel
        else:
            opt_in_shared_memory(kernel, smem)
            self._func = kernel.kernel.ptr
        grid_x, grid_y = (grid, 1) if isinstance(grid, int) else tuple(grid)
        self._grid_x, self._grid_y = int(grid_x), int(grid_y)
        self._block, self._smem = block, smem
        self._args = tuple(args)
        self._values = [_kernel_param(a) for a in self._args]
        self._params = (ctypes.c_void_p * len(self._values))(*(ctypes.addressof(v) for v in self._values))
        self._params_at = ctypes.addressof(self._params)
        self._launch_kernel = cupy().cuda.driver.launchKernel  # looked up once: launch() is the hot path
        self._config: _LaunchConfig | None = None
        if not isinstance(kernel, int) and programmatic_launches():
            self._launch_ex = _launch_kernel_ex()
            self._attribute = _LaunchAttribute(id=_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
            self._config = _LaunchConfig(gridDimX=self._grid_x, gridDimY=self._grid_y, gridDimZ=1, blockDimX=block,
                                         blockDimY=1, blockDimZ=1, sharedMemBytes=smem,
                                         attrs=ctypes.pointer(self._attribute), numAttrs=1)
            self._config_at = ctypes.addressof(self._config)

    def set_arg(self, index: int, value: int) -> None:
        """Argument ``index`` (a pointer or an integer) becomes ``value`` for the following launches."""
        self._values[index].value = value

    def set_grid(self, grid_x: int, grid_y: int | None = None) -> None:
        """The grid's x dimension (and y, when given) for the following launches."""
        self._grid_x = int(grid_x)
        if grid_y is not None:
            self._grid_y = int(grid_y)
        if self._config is not None:
            self._config.gridDimX, self._config.gridDimY = self._grid_x, self._grid_y

    def launch(self, stream_ptr: int) -> None:
        """Launch on the stream with handle ``stream_ptr`` (raises CuPy's CUDADriverError on failure)."""
        if self._config is None:
            self._launch_kernel(self._func, self._grid_x, self._grid_y, 1, self._block, 1, 1, self._smem, stream_ptr,
                                self._params_at, 0)
            return
        self._config.hStream = stream_ptr
        status = self._launch_ex(self._config_at, self._func, self._params_at, None)
        if status:
            raise cupy().cuda.driver.CUDADriverError(status)


def compiled() -> list[dict]:
    """What this process has compiled: source, name expression and device of each variant."""
    return [{"source": s, "variant": e, "device": d} for (s, e, d) in sorted(_cache)]


# --------------------------------------------------------------------------------------------
# Offline NVRTC (no GPU needed): CI's compile check of the whole grid, and `million-cupy info`.
# --------------------------------------------------------------------------------------------


@dataclass
class OfflineBuild:
    source: str
    arch: str
    cubin_size: int
    log: str
    cubin: bytes = field(default=b"", repr=False)  # the compiled image (bench/issue_floor.py disassembles it)

    def spills(self) -> dict[str, int]:
        """Per kernel: spill store + load bytes reported by ptxas (0 = no spills)."""
        out: dict[str, int] = {}
        current = None
        for line in self.log.splitlines():
            m = re.search(r"Compiling entry function '([^']+)'", line)
            if m:
                current = m.group(1)
            m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m and current:
                out[current] = int(m.group(1)) + int(m.group(2))
        return out


def _nvrtc_library() -> ctypes.CDLL:
    candidates: list[str] = []
    try:
        import nvidia.cuda_nvrtc  # noqa: PLC0415

        for base in nvidia.cuda_nvrtc.__path__:
            candidates += sorted(glob.glob(os.path.join(base, "lib", "libnvrtc.so*")))
    except ImportError:
        pass
    candidates += [path for base in _nvidia_wheel_dirs() for path in sorted(glob.glob(os.path.join(base, "lib", "libnvrtc.so*")))]
    for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            candidates += sorted(glob.glob(os.path.join(root, "lib64", "libnvrtc.so*")))
    candidates += ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"]
    for c in candidates:
        if "builtins" in c or ".alt." in c:
            continue
        try:
            return ctypes.CDLL(c)
        except OSError:
            continue
    raise DeviceUnavailable("NVRTC not found: pip install nvidia-cuda-nvrtc-cu12 (or install the CUDA toolkit)")


def _nvidia_wheel_dirs() -> list[str]:
    """``nvidia/cu<major>`` directories of NVIDIA's CUDA 13+ wheels (nvidia-cuda-nvrtc, -runtime)."""
    try:
        import nvidia  # noqa: PLC0415 - a namespace package shared by NVIDIA's wheels
    except ImportError:
        return []
    return sorted(d for base in nvidia.__path__ for d in glob.glob(os.path.join(base, "cu[0-9]*")))


def cuda_include_dirs() -> list[str]:
    """Directories holding cuda_fp16.h etc.: pip's nvidia-cuda-runtime headers, or the toolkit's."""
    dirs: list[str] = []
    try:
        import nvidia.cuda_runtime  # noqa: PLC0415

        dirs += [os.path.join(p, "include") for p in nvidia.cuda_runtime.__path__]
    except ImportError:
        pass
    dirs += [os.path.join(base, "include") for base in _nvidia_wheel_dirs()]
    for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            dirs.append(os.path.join(root, "include"))
    return [d for d in dirs if os.path.isfile(os.path.join(d, "cuda_fp16.h"))]


def nvrtc_version() -> tuple[int, int]:
    lib = _nvrtc_library()
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def nvrtc_compile_offline(source: str, name_expressions: Iterable[str], arch: str = "sm_90",
                          defines: Iterable[str] = ()) -> OfflineBuild:
    """Compile ``cuda_src/<source>`` to a cubin for ``arch`` with NVRTC, no GPU needed; ``defines``: macros set
    (``-D``) for the compile.

    Raises RuntimeError carrying NVRTC's log on any compile error.
    """
    lib = _nvrtc_library()
    prog = ctypes.c_void_p()
    code = read_source(source).encode()
    res = lib.nvrtcCreateProgram(ctypes.byref(prog), code, source.encode(), 0, None, None)
    if res != 0:
        raise RuntimeError(f"nvrtcCreateProgram failed ({res})")
    try:
        for expr in name_expressions:
            lib.nvrtcAddNameExpression(prog, expr.encode())
        opts = list(_options()) + [f"-I{d}" for d in cuda_include_dirs()]
        opts += [f"--gpu-architecture={arch}", "--ptxas-options=-v"] + [f"-D{d}" for d in defines]
        argv = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        res = lib.nvrtcCompileProgram(prog, len(opts), argv)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace")
        if res != 0:
            raise RuntimeError(f"NVRTC failed to compile {source} for {arch}:\n{log}")
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        image = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, image)
        return OfflineBuild(source=source, arch=arch, cubin_size=size.value, log=log, cubin=image.raw)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
