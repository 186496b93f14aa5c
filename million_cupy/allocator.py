"""Device-resident page allocator for the paged PQ KV cache.

Design
------
Every piece of allocator state lives on the device, next to the page pool it manages:

* ``pool``: ``(num_pages, page_nbytes)`` uint8, allocated once (the cache's code storage;
  CuPy kernels read and write it zero-copy through ``__cuda_array_interface__``);
* a free stack ``int32[num_pages]`` whose first ``top`` entries are the free page ids;
* ``int32`` reference counts per page, and an ``int32`` scratch array used by ``free``;
* ``int64`` control words: ``top`` and the counters allocs / frees / failed / high_water.

Why this shape:

* **No host round trip on alloc.** A decode step allocates pages for every sequence that crosses
  a page boundary. The host keeps ``_free_known``, a lower bound of the free pages on the device:
  while a request fits under it, ``alloc`` only enqueues a kernel on the allocator's stream and
  returns; the ids are consumed by later kernels in stream order. The bound is exact after every
  operation that synchronises anyway (``free``, ``incref``, ``stats``) and shrinks by ``n`` on each
  ``alloc``, so the only alloc that synchronises is one that may really exhaust the pool.
* **A cheap launch for alloc.** A decode step reserves pages on its host path, so ``alloc`` launches the
  numba-cuda kernel as a ``kernels.BoundLaunch`` (CuPy's ``cuLaunchKernel`` binding, a parameter block built once
  in numba's kernel ABI: ``_BoundAlloc``): ~5 us of host time per call (9 us between stream events) instead of
  the 35-290 us numba's dispatcher spends converting arguments (the most when the call is rare and its code
  cold). ``free`` and ``incref`` synchronise anyway and keep the dispatcher, as does the simulator.
* **O(1) per page, batched.** One launch of a single thread block serves a whole request: the pop
  is one update of ``top`` made by thread 0, the pushes of ``free`` are atomic increments of ``top``;
  every other step is a stride loop over the batch. A single block needs no grid-wide sync.
* **Errors leave the pool unchanged.** ``alloc`` refuses on the device too (thread 0 compares
  ``top`` with ``n`` and, if short, writes -1 ids and touches no state), so device state stays
  consistent even if the host bound were ever wrong. ``free`` and ``incref`` validate the whole
  batch before changing anything: pass 1 counts every id's occurrences in the scratch array
  (so duplicates in one batch are caught), ``syncthreads``, pass 2 checks ranges and
  ``count <= refcount`` (``refcount > 0`` for incref) into an error flag (a control word),
  ``syncthreads``, pass 3 applies only if the flag is clear (atomic decrement; a page whose count
  reaches 0 is pushed with an atomic on ``top``) and zeroes the scratch counts. These two calls
  are off the per-token hot path, so they synchronise to read the flag and raise
  :class:`~million_cupy.errors.InvalidPageOperation`.

Streams: all allocator work is issued on one stream, fixed at construction, so its kernels are
ordered with one another and with the cache kernels that use that stream (by default CuPy's
current stream, when CuPy and a GPU are usable). The allocator is safe to call from several host
threads: a lock keeps ``_free_known`` and the launch order consistent.

CPU machines: numba-cuda kernels need a GPU. When no CUDA driver is present and
``NUMBA_ENABLE_CUDASIM`` is unset, importing this module turns on numba's CUDA simulator before
``numba.cuda`` is imported, so the same kernels, atomics and ``syncthreads`` run on the CPU
(``PageAllocator.simulated`` is then True). Each simulated thread is a Python thread, so blocks
are kept small there (4 threads, still enough to interleave atomics and barriers), and simulated
launches shorten Python's thread switch interval while they run (see ``_SIM_SWITCH_INTERVAL_S``).
"""

from __future__ import annotations

import operator
import os
import sys
import threading
import warnings
from typing import Any

import numba
import numpy as np

from . import kernels
from .errors import DeviceUnavailable, InvalidPageOperation, PagePoolExhausted
from .interop import cuda_driver_present, cupy, gpu_available, to_numpy


def _enable_simulator_without_driver() -> None:
    # numba.cuda decides between driver and simulator when it is first imported, so this must run
    # before our `from numba import cuda`; if someone imported it already, that choice stands.
    if "numba.cuda" in sys.modules or "NUMBA_ENABLE_CUDASIM" in os.environ or cuda_driver_present():
        return
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    numba.config.reload_config()


_enable_simulator_without_driver()

from numba import cuda  # noqa: E402 - must follow the simulator switch above
from numba.cuda.core.errors import NumbaPerformanceWarning  # noqa: E402

# What numba.cuda actually bound, which also covers a numba.cuda imported before this module.
_SIMULATED: bool = cuda.device_array.__module__.startswith("numba.cuda.simulator")
if _SIMULATED:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray as _DeviceArray
else:
    from numba.cuda.cudadrv.devicearray import DeviceNDArray as _DeviceArray
    from numba.cuda.cudadrv.driver import Stream as _NumbaStream

__all__ = ["PageAllocator"]

# Threads per block. 256 covers a decode batch in one or a few strides on a GPU; under the
# simulator every thread is a Python thread, so a few suffice to exercise the atomics and barriers.
_GPU_THREADS = 256
_SIM_THREADS = 4
# The simulator's block manager busy-polls its threads while holding the GIL; with Python's default
# 5 ms switch interval every syncthreads then costs about 5 ms. Simulated launches run with this one,
# one at a time (the interval is process-wide; the lock makes its save / restore pairs nest). The simulator
# also swaps the kernels' module globals (``cuda``) while a launch runs, so under it every allocator operation
# of any thread holds this (re-entrant) lock: PageAllocator stays safe to use from several threads there too.
_SIM_SWITCH_INTERVAL_S = 1e-5
_SIM_LAUNCH_LOCK = threading.RLock()

# Control words (int64).
_TOP, _ALLOCS, _FREES, _FAILED, _HIGH_WATER, _STATUS, _GRANT_TOP, _GRANTED = range(8)
_NCTRL = 8
# The kernels keep their block-wide flags in these global control words, not in shared memory: numba's
# CUDA simulator can hand two threads of one block different copies of a cuda.shared.array when they
# reach it at the same moment, which made CPU runs lose updates.

# Error bits of free / incref, written to ctrl[_STATUS] by every such launch.
_BAD_RANGE = 1  # an id outside [0, num_pages)
_OVER_FREE = 2  # more frees of a page in the batch than it has references
_INCREF_FREE = 4  # incref of a page that is free

_NUMPY_HINT = (
    "numba-cuda failed on a NumPy attribute: numba-cuda 0.30 cannot compile kernels under "
    "numpy >= 2.5 (np.row_stack was removed); install numpy<2.5 (pyproject pins it)."
)


def _add_numpy_hint(exc: AttributeError) -> None:
    if "numpy" in str(exc) and hasattr(exc, "add_note"):  # add_note: Python >= 3.11
        exc.add_note(_NUMPY_HINT)


# ----------------------------------------------------------------------------------------- kernels


@cuda.jit
def _alloc_kernel(out, n, stack, refcount, ctrl, num_pages):
    """Pop ``n`` ids from the free stack into ``out[:n]``; refuse (ids -1) if too few."""
    tid = cuda.threadIdx.x
    if tid == 0:
        top = ctrl[_TOP]
        if top < n:
            ctrl[_FAILED] += 1
            ctrl[_GRANTED] = 0
        else:
            ctrl[_TOP] = top - n
            ctrl[_ALLOCS] += n
            used = num_pages - (top - n)
            if used > ctrl[_HIGH_WATER]:
                ctrl[_HIGH_WATER] = used
            ctrl[_GRANTED] = 1
        ctrl[_GRANT_TOP] = top
    cuda.syncthreads()
    top = ctrl[_GRANT_TOP]
    granted = ctrl[_GRANTED] != 0
    for i in range(tid, n, cuda.blockDim.x):
        if granted:
            # Pop from the top, so a fresh stack [P-1, ..., 1, 0] hands out 0, 1, 2, ... in order.
            page = stack[top - 1 - i]
            out[i] = page
            refcount[page] = 1
        else:
            out[i] = -1


@cuda.jit
def _free_kernel(ids, stack, refcount, pending, ctrl, num_pages):
    """Drop one reference per id; push pages whose count reaches 0. All-or-nothing per batch."""
    tid = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    n = ids.shape[0]
    if tid == 0:
        ctrl[_STATUS] = 0  # nobody writes the flag before the first barrier
    # Pass 1: how many times this batch frees each page (catches duplicates inside the batch).
    for i in range(tid, n, nthreads):
        page = ids[i]
        if page >= 0 and page < num_pages:
            cuda.atomic.add(pending, page, 1)
    cuda.syncthreads()
    # Pass 2: validate the whole batch before anything changes.
    for i in range(tid, n, nthreads):
        page = ids[i]
        if page < 0 or page >= num_pages:
            cuda.atomic.or_(ctrl, _STATUS, _BAD_RANGE)
        elif pending[page] > refcount[page]:
            cuda.atomic.or_(ctrl, _STATUS, _OVER_FREE)
    cuda.syncthreads()
    # Pass 3: apply only if valid; always clear the scratch counts for the next batch.
    valid = ctrl[_STATUS] == 0
    returned = 0
    for i in range(tid, n, nthreads):
        page = ids[i]
        if page >= 0 and page < num_pages:
            pending[page] = 0
            if valid and cuda.atomic.sub(refcount, page, 1) == 1:
                stack[cuda.atomic.add(ctrl, _TOP, 1)] = page
                returned += 1
    if returned > 0:
        cuda.atomic.add(ctrl, _FREES, returned)


@cuda.jit
def _incref_kernel(ids, refcount, ctrl, num_pages):
    """Add one reference per id occurrence, only if every id is an allocated page."""
    tid = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    n = ids.shape[0]
    if tid == 0:
        ctrl[_STATUS] = 0
    cuda.syncthreads()
    for i in range(tid, n, nthreads):
        page = ids[i]
        if page < 0 or page >= num_pages:
            cuda.atomic.or_(ctrl, _STATUS, _BAD_RANGE)
        elif refcount[page] == 0:
            cuda.atomic.or_(ctrl, _STATUS, _INCREF_FREE)
    cuda.syncthreads()
    if ctrl[_STATUS] == 0:
        for i in range(tid, n, nthreads):
            cuda.atomic.add(refcount, ids[i], 1)


@cuda.jit
def _count_failure_kernel(ctrl):
    """Record an alloc the host refused (after reading the true free count) in the device counter."""
    if cuda.threadIdx.x == 0:
        ctrl[_FAILED] += 1


@cuda.jit
def _to_page_ids_kernel(src, dst, num_pages):
    """int32 copy of device ids of another integer type.

    A plain cast would wrap, e.g., 2**32 + 3 to 3, a valid id; out-of-range values become -1 so
    the range check of free / incref still sees them.
    """
    for i in range(cuda.threadIdx.x, src.shape[0], cuda.blockDim.x):
        v = src[i]
        if v >= 0 and v < num_pages:
            dst[i] = v
        else:
            dst[i] = -1


# ------------------------------------------------------------------------------------ bound launch


def _numba_array_words(array: Any) -> list[np.generic]:
    """An array argument in numba-cuda's kernel ABI: meminfo, parent, nitems, itemsize, data, shape..., strides..."""
    data = array.__cuda_array_interface__["data"][0]
    return [np.uint64(0), np.uint64(0), np.int64(array.size), np.int64(array.dtype.itemsize), np.uint64(data),
            *map(np.int64, array.shape), *map(np.int64, array.strides)]


class _BoundAlloc:
    """``_alloc_kernel`` as numba-cuda compiled it, launched as a :class:`~million_cupy.kernels.BoundLaunch`.

    numba's dispatcher converts every argument on every launch: 35-290 us of host time per call on the
    benchmark hosts (the most when the call is rare and its code cold, as a decode step's page reservation is),
    against ~4.5 us for the same launch here. Its parameter block follows numba's kernel ABI
    (:func:`_numba_array_words`, a scalar its C value). Built only where numba-cuda exposes its compiled function
    the way this was written for (checked at construction, see :meth:`bind`)."""

    _N = 7  # n's argument, after out's 7 words

    def __init__(self, handle: int, argument_types: tuple, args: tuple, stream: int) -> None:
        from numba.core import types  # noqa: PLC0415

        words: list[np.generic] = []
        for ty, value in zip(argument_types, args):
            words += _numba_array_words(value) if isinstance(ty, types.Array) else [np.dtype(str(ty)).type(value)]
        self._launch = kernels.BoundLaunch(handle, 1, _GPU_THREADS, 0, words)
        self._stream = stream
        self._out: Any = args[0]

    @classmethod
    def bind(cls, kernel: Any, args: tuple, stream: int) -> "_BoundAlloc | None":
        """The bound launch of ``kernel`` (a configured numba kernel's dispatcher) for ``args``, or None where this
        numba-cuda keeps its compiled function elsewhere (the dispatcher is used then)."""
        try:
            compiled = kernel.dispatcher.compile(tuple(kernel.dispatcher.typeof_pyval(a) for a in args))
        except AttributeError as exc:  # what the first launch would raise, with the same hint
            _add_numpy_hint(exc)
            raise
        try:
            handle = int(compiled._codelibrary.get_cufunc().handle)  # numba-cuda 0.20-0.30
        except (AttributeError, TypeError):
            return None
        return cls(handle, tuple(compiled.argument_types), args, stream)

    def __call__(self, out: Any, n: int) -> None:
        """Pop ``n`` page ids into ``out`` (an int32 device array holding at least ``n``)."""
        if out is not self._out:
            for i, word in enumerate(_numba_array_words(out)):
                self._launch.set_arg(i, int(word))
            self._out = out
        self._launch.set_arg(self._N, n)
        self._launch.launch(self._stream)


# -------------------------------------------------------------------------------------- allocator


def _is_device_array(x: Any) -> bool:
    return isinstance(x, _DeviceArray) or hasattr(x, "__cuda_array_interface__")


def _stream_handle(stream: Any) -> int:
    """Raw ``cudaStream_t`` of a numba stream, CuPy stream, object with a handle, or int."""
    if isinstance(stream, int):
        return stream
    if isinstance(stream, _NumbaStream):
        return int(stream.handle)
    for attr in ("ptr", "cuda_stream", "handle"):
        value = getattr(stream, attr, None)
        if value is not None:
            return int(value)
    raise TypeError(
        f"stream: expected a CuPy stream, a numba stream, an object with .ptr/.cuda_stream/.handle "
        f"or an int handle, got {type(stream).__name__}"
    )


class PageAllocator:
    """Reference-counted pages of a device pool, allocated and freed in batches by device kernels.

    Args:
        num_pages: pages in the pool (ids are ``0 .. num_pages - 1``, int32).
        page_nbytes: bytes per page of the pool; 0 allocates no pool (ids and refcounts only).
        stream: stream for all allocator work: a CuPy stream, a numba stream, an object with
            ``.ptr`` / ``.cuda_stream`` / ``.handle``, or a raw ``cudaStream_t`` int. None means
            CuPy's current stream when CuPy and a GPU are usable, else numba's default stream.
            Ignored under the simulator, which runs every launch synchronously.

    Page ids returned by :meth:`alloc` are ready in this stream's order: use them in kernels on
    the same stream (or synchronise first). Ids passed in must likewise be ready on it.
    """

    #: True when kernels run under numba's CUDA simulator (CPU machine without a CUDA driver).
    simulated: bool = _SIMULATED

    def __init__(self, num_pages: int, page_nbytes: int = 0, *, stream: Any = None) -> None:
        num_pages = operator.index(num_pages)
        page_nbytes = operator.index(page_nbytes)
        if not 1 <= num_pages <= np.iinfo(np.int32).max:
            raise ValueError(f"num_pages: expected 1 .. {np.iinfo(np.int32).max} (int32 ids), got {num_pages}")
        if page_nbytes < 0:
            raise ValueError(f"page_nbytes: expected >= 0, got {page_nbytes}")
        if not self.simulated and not cuda.is_available():
            raise DeviceUnavailable(
                "PageAllocator: expected a CUDA device usable by numba-cuda or numba's CUDA simulator, "
                "got neither (numba.cuda.is_available() is False and the simulator is off: numba.cuda was "
                "imported before million_cupy.allocator could enable it, or NUMBA_ENABLE_CUDASIM=0). "
                "On a machine without a GPU, set NUMBA_ENABLE_CUDASIM=1 or import million_cupy.allocator first."
            )
        self._lock = _SIM_LAUNCH_LOCK if self.simulated else threading.Lock()
        with self._lock:
            self._build(num_pages, page_nbytes, stream)

    def _build(self, num_pages: int, page_nbytes: int, stream: Any) -> None:
        self.num_pages = num_pages
        self.page_nbytes = page_nbytes
        self.threads = _SIM_THREADS if self.simulated else _GPU_THREADS
        self._cp = None if self.simulated or not gpu_available() else cupy()
        self.stream, self._cp_stream = self._resolve_stream(stream)
        with warnings.catch_warnings():
            # numba warns on every launch of fewer than 128 blocks; one block is the design here.
            # Configuring each kernel once also keeps that per-launch work off the hot path.
            warnings.simplefilter("ignore", NumbaPerformanceWarning)
            config = (1, self.threads, self.stream)
            self._alloc_k = _alloc_kernel[config]
            self._free_k = _free_kernel[config]
            self._incref_k = _incref_kernel[config]
            self._count_failure_k = _count_failure_kernel[config]
            self._to_page_ids_k = _to_page_ids_kernel[config]

        #: The page storage, (num_pages, page_nbytes) uint8, contents undefined until written;
        #: None when page_nbytes == 0. A numba device array (on a GPU it exports
        #: ``__cuda_array_interface__``, e.g. ``cupy.asarray(alloc.pool)`` shares it).
        self.pool = cuda.device_array((num_pages, page_nbytes), np.uint8) if page_nbytes else None
        s = self.stream
        # Reversed so that the first allocations return 0, 1, 2, ... (pops come off the top).
        self._stack = cuda.to_device(np.arange(num_pages - 1, -1, -1, dtype=np.int32), stream=s)
        self._refcount = cuda.to_device(np.zeros(num_pages, np.int32), stream=s)
        self._pending = cuda.to_device(np.zeros(num_pages, np.int32), stream=s)
        ctrl = np.zeros(_NCTRL, np.int64)
        ctrl[_TOP] = num_pages
        self._ctrl = cuda.to_device(ctrl, stream=s)
        # Pinned so that reading the control words back is one async copy plus the sync.
        self._ctrl_host = cuda.pinned_array(_NCTRL, np.int64)
        self._free_known = num_pages
        self._scratch: Any = None  # alloc_scratch's buffer
        self._syncs = 0  # host synchronisations made by this allocator (tests check alloc makes none)
        self._bound_alloc: _BoundAlloc | None = None
        if self._cp_stream is not None:  # a GPU, and CuPy for the launch
            example = (self._device_empty(1), 1, self._stack, self._refcount, self._ctrl, num_pages)
            self._bound_alloc = _BoundAlloc.bind(self._alloc_k, example, self._cp_stream.ptr)
            if self._bound_alloc is None:
                warnings.warn("PageAllocator: this numba-cuda keeps its compiled kernels where million_cupy does not "
                              "look; allocations go through numba's dispatcher (35-290 us of host time each "
                              "instead of ~5 us)", RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------------------- public API

    @property
    def bound_alloc(self) -> bool:
        """True where :meth:`alloc` launches numba-cuda's compiled kernel through CuPy's ``cuLaunchKernel`` with a
        parameter block built once (a GPU with CuPy: ~5 us of host time per call); False under the simulator,
        without CuPy, or where this numba-cuda keeps its compiled kernels elsewhere (warned at construction):
        numba's dispatcher then launches it, at 35-290 us per call."""
        return self._bound_alloc is not None

    def alloc(self, n: int) -> Any:
        """Allocate ``n`` pages; return their ids as a device int32 array of shape ``(n,)``.

        Each page's reference count becomes 1. No host synchronisation unless ``n`` exceeds the
        host's lower bound of free pages, in which case the true count is read from the device.

        Raises:
            PagePoolExhausted: fewer than ``n`` pages are free; nothing was allocated.
        """
        return self._alloc_into(n, None)

    def alloc_scratch(self, n: int) -> Any:
        """:meth:`alloc`, with the ids in a buffer the allocator reuses (grown when needed): the returned
        int32 device array holds them in its first ``n`` entries until the next ``alloc_scratch`` call, in
        stream order. Making a device array costs more host time than the launch (numba checks its context),
        so callers that consume the ids at once (the cache's block table) save it this way."""
        n = operator.index(n)
        if self._scratch is None or self._scratch.shape[0] < n:
            self._scratch = self._device_empty(max(n, 256))
        return self._alloc_into(n, self._scratch)

    def _alloc_into(self, n: int, out: Any) -> Any:
        n = operator.index(n)
        if n < 0:
            raise ValueError(f"alloc: expected n >= 0, got {n}")
        with self._lock:
            if n > self._free_known:
                free = self._read_ctrl()[_TOP]
                if n > free:
                    self._launch(self._count_failure_k, self._ctrl)
                    raise PagePoolExhausted(
                        f"alloc: requested {n} pages, only {free} free of {self.num_pages}; nothing was allocated"
                    )
            if out is None:
                out = self._device_empty(n)
            if n:
                if self._bound_alloc is not None:
                    self._bound_alloc(out, n)
                else:
                    self._launch(self._alloc_k, out, n, self._stack, self._refcount, self._ctrl, self.num_pages)
                self._free_known -= n
            return out

    def incref(self, ids: Any) -> None:
        """Add one reference to each id (an id listed k times gains k), e.g. to share a prefix page.

        Raises:
            InvalidPageOperation: an id is out of range or names a free page; nothing changed.
        """
        with self._lock:
            dev, original = self._device_ids(ids, "incref")
            if dev.shape[0] == 0:
                return
            self._launch(self._incref_k, dev, self._refcount, self._ctrl, self.num_pages)
            if self._read_ctrl()[_STATUS]:
                raise InvalidPageOperation(self._diagnose("incref", original))

    def free(self, ids: Any) -> None:
        """Drop one reference per id occurrence; a page whose count reaches 0 returns to the pool.

        Raises:
            InvalidPageOperation: an id is out of range, names a free page (double free / never
                allocated), or occurs more often in the batch than it has references; the whole
                batch was rejected and the pool is unchanged.
        """
        with self._lock:
            dev, original = self._device_ids(ids, "free")
            if dev.shape[0] == 0:
                return
            self._launch(
                self._free_k, dev, self._stack, self._refcount, self._pending, self._ctrl, self.num_pages
            )
            if self._read_ctrl()[_STATUS]:
                raise InvalidPageOperation(self._diagnose("free", original))

    def stats(self) -> dict[str, int]:
        """Pool counters (synchronises the allocator stream).

        ``total``/``used``/``free`` pages now; ``high_water`` most pages ever in use; ``allocs``
        pages handed out; ``frees`` pages returned to the pool; ``failed`` alloc calls refused.
        """
        with self._lock:
            ctrl = self._read_ctrl()
        free = int(ctrl[_TOP])
        return {
            "total": self.num_pages,
            "used": self.num_pages - free,
            "free": free,
            "high_water": int(ctrl[_HIGH_WATER]),
            "allocs": int(ctrl[_ALLOCS]),
            "frees": int(ctrl[_FREES]),
            "failed": int(ctrl[_FAILED]),
        }

    def refcounts(self) -> np.ndarray:
        """Host copy of every page's reference count, int32 ``(num_pages,)`` (tests and debugging)."""
        with self._lock:
            return self._host_copy(self._refcount)

    def free_page_ids(self) -> np.ndarray:
        """Host copy of the free stack's live entries, i.e. the free page ids (tests and debugging)."""
        with self._lock:
            top = int(self._read_ctrl()[_TOP])
            return self._host_copy(self._stack)[:top]

    def __repr__(self) -> str:
        # No device read here: the host bound is what is known without a sync.
        return (
            f"PageAllocator(num_pages={self.num_pages}, page_nbytes={self.page_nbytes}, "
            f"free>={self._free_known}, simulated={self.simulated})"
        )

    # -------------------------------------------------------------------------------- internals

    def _resolve_stream(self, stream: Any) -> tuple[Any, Any]:
        """(numba stream for launches, CuPy stream for scratch allocations or None)."""
        if self.simulated:
            return cuda.default_stream(), None
        cp = self._cp
        if stream is None:
            if cp is None:
                return cuda.default_stream(), None
            stream = cp.cuda.get_current_stream()
        handle = _stream_handle(stream)
        # Handle 0 is the legacy default stream, which numba names explicitly.
        numba_stream = cuda.external_stream(handle) if handle else cuda.legacy_default_stream()
        if cp is None:
            return numba_stream, None
        # Keep the caller's CuPy stream object alive (and use it as is) when one was given.
        if isinstance(stream, cp.cuda.Stream | cp.cuda.ExternalStream):
            return numba_stream, stream
        return numba_stream, cp.cuda.ExternalStream(handle) if handle else cp.cuda.Stream.null

    def _launch(self, launcher: Any, *args: Any) -> None:
        """Run a configured kernel (one block on the allocator stream)."""
        try:
            if self.simulated:
                with _SIM_LAUNCH_LOCK:
                    previous = sys.getswitchinterval()
                    sys.setswitchinterval(_SIM_SWITCH_INTERVAL_S)
                    try:
                        launcher(*args)
                    finally:
                        sys.setswitchinterval(previous)
            else:
                launcher(*args)
        except AttributeError as exc:
            _add_numpy_hint(exc)
            raise

    def _read_ctrl(self) -> np.ndarray:
        """Synchronise, read the control words, and make ``_free_known`` exact."""
        self._ctrl.copy_to_host(self._ctrl_host, stream=self.stream)
        self.stream.synchronize()
        self._syncs += 1
        self._free_known = int(self._ctrl_host[_TOP])
        return self._ctrl_host.copy()

    def _host_copy(self, arr: Any) -> np.ndarray:
        host = arr.copy_to_host(stream=self.stream)
        self.stream.synchronize()
        self._syncs += 1
        return host

    def _device_empty(self, n: int) -> Any:
        """An uninitialised int32 device array of ``n`` elements, not bound to any stream."""
        if self._cp is None or n == 0:  # numba allocates nothing for an empty array
            return cuda.device_array(n, np.int32)
        # From CuPy's pool rather than numba's allocator: numba frees memory in batches through
        # cuMemFree, which synchronises the device, so per-step ids would cost a sync every few
        # steps. The pool is stream-ordered, hence the allocation under the allocator's stream.
        with self._cp_stream:
            buf = self._cp.empty(n, np.int32)
        # No "stream" entry: a stream-bound array makes CuPy synchronise that stream on import.
        desc = {"shape": (n,), "strides": None, "typestr": "<i4", "data": (buf.data.ptr, False), "version": 3}
        return cuda.from_cuda_array_interface(desc, owner=buf, sync=False)

    def _device_ids(self, ids: Any, op: str) -> tuple[Any, Any]:
        """(int32 device ids, the caller's array for error messages), range-checked if on the host."""
        if _is_device_array(ids):
            dev = ids if isinstance(ids, _DeviceArray) else cuda.as_cuda_array(ids, sync=False)
            self._check_ids_layout(dev.ndim, dev.dtype, tuple(dev.shape), op)
            if dev.dtype == np.int32:
                return dev, dev
            converted = self._device_empty(dev.shape[0])
            if dev.shape[0]:
                self._launch(self._to_page_ids_k, dev, converted, self.num_pages)
            return converted, dev
        if not isinstance(ids, list | tuple) and not hasattr(ids, "__array__"):
            raise TypeError(f"{op}: expected page ids as a 1-D integer array or sequence, got {type(ids).__name__}")
        host = np.asarray(ids)
        if host.size == 0 and host.ndim == 1:
            return self._device_empty(0), host  # [] arrives as float64; an empty batch has no ids to type
        self._check_ids_layout(host.ndim, host.dtype, host.shape, op)
        bad = host[(host < 0) | (host >= self.num_pages)]
        if bad.size:
            raise InvalidPageOperation(
                f"{op}: expected page ids in [0, {self.num_pages}), got {_preview(bad)}; the pool is unchanged"
            )
        dev = self._device_empty(host.shape[0])
        dev.copy_to_device(np.ascontiguousarray(host, dtype=np.int32), stream=self.stream)
        return dev, host

    @staticmethod
    def _check_ids_layout(ndim: int, dtype: Any, shape: tuple[int, ...], op: str) -> None:
        if ndim != 1:
            raise ValueError(f"{op}: expected a 1-D array of page ids, got shape {shape}")
        if np.dtype(dtype).kind not in "iu":
            raise TypeError(f"{op}: expected integer page ids, got dtype {np.dtype(dtype).name}")

    def _diagnose(self, op: str, original: Any) -> str:
        """Say which ids made the device reject a batch (error path only; synchronises)."""
        if not _is_device_array(original):
            ids = np.asarray(original)
        elif self._cp is not None:
            ids = to_numpy(original)  # through CuPy, which copes with any strides (numba: none negative)
        else:
            ids = self._host_copy(original)
        ids = ids.astype(np.int64)
        refcount = self._host_copy(self._refcount)
        in_range = (ids >= 0) & (ids < self.num_pages)
        problems = []
        if not in_range.all():
            problems.append(f"ids outside [0, {self.num_pages}): {_preview(ids[~in_range])}")
        ids = ids[in_range]
        if op == "incref":
            free_pages = np.unique(ids[refcount[ids] == 0])
            if free_pages.size:
                problems.append(f"pages {_preview(free_pages)} are free (refcount 0)")
        else:
            pages, counts = np.unique(ids, return_counts=True)
            unallocated = pages[refcount[pages] == 0]
            if unallocated.size:
                problems.append(f"pages {_preview(unallocated)} are not allocated (double free or never allocated)")
            over = (counts > refcount[pages]) & (refcount[pages] > 0)
            if over.any():
                detail = ", ".join(
                    f"{p} x{c} with {r} reference(s)"
                    for p, c, r in zip(pages[over][:8], counts[over][:8], refcount[pages][over][:8])
                )
                problems.append(f"pages freed more often than referenced in this batch: {detail}")
        return f"{op}: {'; '.join(problems)}; the whole batch was rejected and the pool is unchanged"


def _preview(values: np.ndarray, limit: int = 8) -> str:
    """First few values of an array for an error message."""
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return f"[{shown}{', ...' if values.size > limit else ''}]"
