"""PageAllocator: batched device alloc / incref / free, error handling, and a randomized storm.

On a CPU machine these run the same numba-cuda kernels under numba's CUDA simulator
(million_cupy.allocator enables it on import); the `gpu` tests need a real device.
"""

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from million_cupy.allocator import PageAllocator  # must precede numba.cuda: it may enable the simulator
from million_cupy.errors import InvalidPageOperation, PagePoolExhausted

from numba import cuda  # noqa: E402, I001

STAT_KEYS = ("total", "used", "free", "high_water", "allocs", "frees", "failed")


def host(ids) -> np.ndarray:
    return ids.copy_to_host()


def snapshot(alloc: PageAllocator):
    """Everything a rejected operation must leave unchanged (`failed` may count the attempt)."""
    stats = alloc.stats()
    stats.pop("failed")
    return alloc.refcounts(), stats, alloc.free_page_ids()  # the stack itself, order included


def assert_unchanged(before, alloc: PageAllocator) -> None:
    refs, stats, free_ids = snapshot(alloc)
    np.testing.assert_array_equal(refs, before[0])
    assert stats == before[1]
    np.testing.assert_array_equal(free_ids, before[2])


# ------------------------------------------------------------------------------------------ basics


def test_first_allocations_are_in_order_and_stats_track_them():
    alloc = PageAllocator(8)
    ids = alloc.alloc(3)
    assert ids.dtype == np.int32 and ids.shape == (3,)
    np.testing.assert_array_equal(host(ids), [0, 1, 2])
    np.testing.assert_array_equal(host(alloc.alloc(2)), [3, 4])
    stats = alloc.stats()
    assert set(STAT_KEYS) <= set(stats)
    assert stats == {"total": 8, "used": 5, "free": 3, "high_water": 5, "allocs": 5, "frees": 0, "failed": 0}
    np.testing.assert_array_equal(alloc.refcounts(), [1, 1, 1, 1, 1, 0, 0, 0])


def test_alloc_zero_returns_an_empty_device_array_without_changes():
    alloc = PageAllocator(4)
    ids = alloc.alloc(0)
    assert ids.shape == (0,) and ids.dtype == np.int32
    assert alloc.stats()["allocs"] == 0
    alloc.free(ids)
    alloc.incref([])
    assert alloc.stats()["free"] == 4


def test_negative_alloc_is_rejected():
    with pytest.raises(ValueError, match="n >= 0"):
        PageAllocator(4).alloc(-1)


def test_refcounting_returns_a_page_only_when_its_count_reaches_zero():
    alloc = PageAllocator(4)
    ids = alloc.alloc(2)
    alloc.incref(ids[:1])
    alloc.incref([0, 0])  # duplicates inside one incref batch add one reference each
    np.testing.assert_array_equal(alloc.refcounts(), [4, 1, 0, 0])
    alloc.free(ids)
    np.testing.assert_array_equal(alloc.refcounts(), [3, 0, 0, 0])
    assert alloc.stats()["frees"] == 1  # pages returned to the pool, not references dropped
    alloc.free([0, 0, 0])  # duplicates within the refcount are fine
    stats = alloc.stats()
    assert stats["free"] == 4 and stats["used"] == 0 and stats["frees"] == 2 and stats["allocs"] == 2
    assert stats["high_water"] == 2
    np.testing.assert_array_equal(np.sort(alloc.free_page_ids()), np.arange(4))


def test_ids_are_unique_and_in_range_across_reuse(rng):
    alloc = PageAllocator(32)
    live: list[int] = []
    for _ in range(60):
        if live and rng.random() < 0.5:
            k = int(rng.integers(1, len(live) + 1))
            gone = [live.pop(int(rng.integers(len(live)))) for _ in range(k)]
            alloc.free(np.array(gone))
        else:
            n = int(rng.integers(0, 32 - len(live) + 1))
            ids = host(alloc.alloc(n))
            assert ((ids >= 0) & (ids < 32)).all()
            live.extend(ids.tolist())
        assert len(set(live)) == len(live)
        assert alloc.stats()["used"] == len(live)


def test_ids_accept_lists_tuples_numpy_and_device_arrays_of_any_integer_type():
    alloc = PageAllocator(16)
    alloc.alloc(10)
    alloc.free([0])
    alloc.free((1,))
    alloc.free(np.array([2], dtype=np.uint8))
    alloc.free(cuda.to_device(np.array([3], dtype=np.int64)))
    alloc.free(cuda.to_device(np.array([4], dtype=np.uint16)))
    alloc.incref(cuda.to_device(np.array([5, 5], dtype=np.uint64)))
    np.testing.assert_array_equal(alloc.refcounts()[:7], [0, 0, 0, 0, 0, 3, 1])


@pytest.mark.parametrize(
    "ids, error",
    [
        (np.zeros((2, 2), np.int32), ValueError),
        (np.array([1.0]), TypeError),
        (np.array([True]), TypeError),
        (3, TypeError),
    ],
)
def test_ids_must_be_a_1d_integer_array(ids, error):
    alloc = PageAllocator(4)
    alloc.alloc(2)
    with pytest.raises(error):
        alloc.free(ids)


@pytest.mark.parametrize("num_pages, page_nbytes", [(0, 0), (-1, 0), (2**31, 0), (4, -1)])
def test_constructor_rejects_bad_sizes(num_pages, page_nbytes):
    with pytest.raises(ValueError):
        PageAllocator(num_pages, page_nbytes)


def test_pool_has_the_page_shape_and_is_a_device_array():
    alloc = PageAllocator(6, 40)
    assert alloc.pool.shape == (6, 40)
    assert alloc.pool.dtype == np.uint8
    if not alloc.simulated:
        cai = alloc.pool.__cuda_array_interface__
        assert tuple(cai["shape"]) == (6, 40) and cai["typestr"] == "|u1"
    assert PageAllocator(6).pool is None


def test_repr_and_simulated_flag():
    alloc = PageAllocator(5, 3)
    assert isinstance(PageAllocator.simulated, bool)
    assert PageAllocator.simulated == (not _driver_present())
    assert repr(alloc) == f"PageAllocator(num_pages=5, page_nbytes=3, free>=5, simulated={alloc.simulated})"


def _driver_present() -> bool:
    from million_cupy.interop import cuda_driver_present

    return cuda_driver_present() and os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "0"


def _run_python(script: str) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, "-c", textwrap.dedent(script)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_numba_cuda_imported_first_without_a_gpu_gives_device_unavailable():
    from million_cupy.interop import cuda_driver_present

    if cuda_driver_present():
        pytest.skip("a CUDA driver is present: numba.cuda imported first is usable")
    done = _run_python(
        """
        from numba import cuda  # before million_cupy.allocator: the simulator stays off
        from million_cupy.allocator import PageAllocator
        from million_cupy.errors import DeviceUnavailable
        assert not PageAllocator.simulated
        try:
            PageAllocator(4)
        except DeviceUnavailable as exc:
            print("DeviceUnavailable:", exc)
        """
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "DeviceUnavailable:" in done.stdout and "NUMBA_ENABLE_CUDASIM=1" in done.stdout


# -------------------------------------------------------------------------------------- exhaustion


def test_exhaustion_raises_before_any_change_and_retry_succeeds_after_free():
    alloc = PageAllocator(8)
    held = alloc.alloc(6)
    before = snapshot(alloc)
    with pytest.raises(PagePoolExhausted, match="requested 3 pages, only 2 free of 8"):
        alloc.alloc(3)
    assert_unchanged(before, alloc)
    assert alloc.stats()["failed"] == 1
    alloc.free(held[:1])
    got = host(alloc.alloc(3))
    assert sorted(got.tolist()) == [0, 6, 7]
    assert alloc.stats()["free"] == 0
    with pytest.raises(PagePoolExhausted):
        alloc.alloc(1)
    assert alloc.stats()["failed"] == 2


def test_device_refuses_an_alloc_the_host_wrongly_believed_fits():
    # The host bound never overestimates in normal use; corrupt it to exercise the kernel's own check.
    alloc = PageAllocator(4)
    alloc.alloc(3)
    before = snapshot(alloc)
    alloc._free_known = 4
    ids = alloc.alloc(2)
    np.testing.assert_array_equal(host(ids), [-1, -1])
    assert_unchanged(before, alloc)
    assert alloc.stats()["failed"] == 1
    with pytest.raises(InvalidPageOperation, match="outside"):
        alloc.free(ids)  # the refusal's -1 ids cannot be freed by mistake


# ------------------------------------------------------------------------------- invalid operations


def _allocated_pool():
    """Pages 0..3 allocated, page 1 with two references; pages 4..7 free."""
    alloc = PageAllocator(8)
    alloc.alloc(4)
    alloc.incref([1])
    return alloc


INVALID = [
    ("free", [4], "not allocated"),  # never allocated
    ("free", [0, 0], "x2 with 1 reference"),  # duplicates beyond the refcount in one batch
    ("free", [1, 1, 1], "x3 with 2 reference"),
    ("free", [2, 5], "not allocated"),  # a valid id must not be applied either
    ("free", [8], r"\[0, 8\)"),
    ("free", [-1], r"\[0, 8\)"),
    ("incref", [6], "are free"),
    ("incref", [0, 7], "are free"),
    ("incref", [9], r"\[0, 8\)"),
]


@pytest.mark.parametrize("on_device", [False, True], ids=["host-ids", "device-ids"])
@pytest.mark.parametrize("op, ids, message", INVALID)
def test_invalid_operations_raise_and_leave_the_pool_unchanged(op, ids, message, on_device):
    alloc = _allocated_pool()
    before = snapshot(alloc)
    arg = cuda.to_device(np.array(ids, dtype=np.int32)) if on_device else ids
    with pytest.raises(InvalidPageOperation, match=message):
        getattr(alloc, op)(arg)
    assert_unchanged(before, alloc)
    assert alloc.stats()["failed"] == 0
    alloc.free([0, 1, 1, 2, 3])  # and the pool still works
    assert alloc.stats()["free"] == 8


def test_double_free_is_rejected():
    alloc = PageAllocator(4)
    ids = alloc.alloc(2)
    alloc.free(ids)
    before = snapshot(alloc)
    with pytest.raises(InvalidPageOperation, match="double free"):
        alloc.free(ids)
    assert_unchanged(before, alloc)


def test_wide_device_ids_do_not_wrap_onto_valid_pages():
    alloc = _allocated_pool()
    before = snapshot(alloc)
    with pytest.raises(InvalidPageOperation, match="outside"):
        alloc.free(cuda.to_device(np.array([2**32 + 3], dtype=np.int64)))  # int32 cast would give page 3
    assert_unchanged(before, alloc)


# ------------------------------------------------------------------------------------- host syncs


def test_alloc_synchronises_only_when_the_known_free_bound_is_exceeded():
    alloc = PageAllocator(16)
    syncs = alloc._syncs
    for _ in range(5):
        alloc.alloc(3)  # 15 of 16 pages: all under the bound
    assert alloc._syncs == syncs and alloc._free_known == 1
    alloc.free([0, 1, 2, 3])  # free synchronises anyway and makes the bound exact
    assert alloc._free_known == 5
    syncs = alloc._syncs
    alloc.alloc(5)
    assert alloc._syncs == syncs
    with pytest.raises(PagePoolExhausted):
        alloc.alloc(1)
    assert alloc._syncs == syncs + 1


def test_concurrent_host_threads_keep_the_pool_consistent():
    alloc = PageAllocator(16)
    errors = []

    def worker():
        try:
            for _ in range(10):
                ids = alloc.alloc(2)
                alloc.incref(ids)
                alloc.free(ids)
                alloc.free(ids)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = alloc.stats()
    assert stats["free"] == 16 and stats["allocs"] == stats["frees"] == 80 and stats["failed"] == 0
    np.testing.assert_array_equal(np.sort(alloc.free_page_ids()), np.arange(16))


# ------------------------------------------------------------------------------------------ storm


def test_randomized_storm_matches_an_ownership_model(rng):
    """10^4 mixed operations (valid and invalid); device refcounts == model after every one."""
    num_pages, steps = 48, 10_000
    alloc = PageAllocator(num_pages)
    refs = np.zeros(num_pages, np.int64)  # model refcounts
    held: list[int] = []  # one entry per reference the "cache" holds
    failed = 0
    start = time.perf_counter()
    for _ in range(steps):
        op = rng.random()
        if op < 0.45:  # alloc, batch size 0..12 (0 and 1 frequent)
            n = int(rng.choice([0, 1, 1, 2, 3, 4, 6, 8, 12]))
            free_now = int((refs == 0).sum())
            if n > free_now:
                with pytest.raises(PagePoolExhausted):
                    alloc.alloc(n)
                failed += 1
            else:
                ids = host(alloc.alloc(n))
                assert len(set(ids.tolist())) == n and (refs[ids] == 0).all(), "handed out a page that is owned"
                refs[ids] = 1
                held.extend(ids.tolist())
        elif op < 0.60 and held:  # incref of held pages (duplicates allowed)
            picks = rng.choice(held, size=int(rng.integers(1, 4)))
            alloc.incref(picks.astype(np.int32))
            np.add.at(refs, picks, 1)
            held.extend(picks.tolist())
        elif op < 0.95 and held:  # free some held references (a page may appear several times)
            k = int(rng.integers(1, min(len(held), 10) + 1))
            idx = rng.choice(len(held), size=k, replace=False)
            picks = np.array([held[i] for i in idx], np.int64)
            for i in sorted(idx.tolist(), reverse=True):
                held.pop(i)
            alloc.free(picks)
            np.subtract.at(refs, picks, 1)
        else:  # an invalid free: one reference more than held, of a live or free page
            page = int(rng.integers(num_pages))
            with pytest.raises(InvalidPageOperation):
                alloc.free(np.full(int(refs[page]) + 1, page))
        np.testing.assert_array_equal(alloc.refcounts(), refs)
        stats = alloc.stats()
        assert stats["used"] + stats["free"] == num_pages
        assert stats["used"] == int((refs > 0).sum())
    assert alloc.stats()["failed"] == failed
    # Give everything back: the pool must be whole, every id on the free stack exactly once.
    alloc.free(np.array(held))
    stats = alloc.stats()
    assert stats["free"] == num_pages and stats["used"] == 0 and stats["allocs"] == stats["frees"]
    np.testing.assert_array_equal(np.sort(alloc.free_page_ids()), np.arange(num_pages))
    assert not alloc.refcounts().any()
    elapsed = time.perf_counter() - start
    print(f"storm: {steps} steps in {elapsed:.1f} s ({'simulator' if alloc.simulated else 'GPU'})")


# ---------------------------------------------------------------------------------- GPU compile


def test_kernels_compile_for_a_gpu_target():
    """Type-check the kernels with NVVM (no GPU needed): the simulator runs them as plain Python."""
    script = """
        import os, sys
        os.environ["NUMBA_ENABLE_CUDASIM"] = "0"
        from numba import cuda, types as t
        try:
            from numba.cuda.cudadrv.nvvm import NVVM
            NVVM()
        except Exception as exc:
            print("NO_NVVM", exc); sys.exit(0)
        from million_cupy import allocator as A
        i32, i64 = t.int32[::1], t.int64[::1]
        cuda.compile_ptx(A._alloc_kernel.py_func, (i32, t.int64, i32, i32, i64, t.int64), cc=(8, 0))
        cuda.compile_ptx(A._free_kernel.py_func, (t.int32[:], i32, i32, i32, i64, t.int64), cc=(8, 0))
        cuda.compile_ptx(A._incref_kernel.py_func, (t.int32[:], i32, i64, t.int64), cc=(8, 0))
        cuda.compile_ptx(A._count_failure_kernel.py_func, (i64,), cc=(8, 0))
        for dt in (t.int64, t.uint64, t.int16, t.uint8):
            cuda.compile_ptx(A._to_page_ids_kernel.py_func, (dt[:], i32, t.int64), cc=(8, 0))
        print("OK")
        """
    done = _run_python(script)
    assert done.returncode == 0, done.stderr[-4000:]
    if done.stdout.startswith("NO_NVVM"):
        pytest.skip(f"NVVM not found: {done.stdout.strip()}")
    assert done.stdout.strip().endswith("OK")


def test_the_bound_alloc_launch_writes_numbas_kernel_abi():
    """What the GPU's bound alloc launch hands cuLaunchKernel, read back on the CPU: per array meminfo, parent,
    nitems, itemsize, data, shape, strides as 8-byte words, scalars in place; a new output array rewrites its
    words, n follows them."""
    import ctypes

    pytest.importorskip("cupy")
    from numba.core import types

    from million_cupy.allocator import _BoundAlloc

    class Device:  # a device array as numba's ABI sees it
        def __init__(self, ptr, n, dtype):
            self.size, self.dtype, self.shape = n, np.dtype(dtype), (n,)
            self.strides = (self.dtype.itemsize,)
            self.__cuda_array_interface__ = {"data": (ptr, False), "shape": (n,), "typestr": self.dtype.str}

    i32, i64 = types.Array(types.int32, 1, "C"), types.Array(types.int64, 1, "C")
    argtypes = (i32, types.int64, i32, i32, i64, types.int64)
    out, stack, refs, ctrl = Device(0x1000, 4, np.int32), Device(0x2000, 96, np.int32), Device(0x3000, 96, np.int32), \
        Device(0x4000, 8, np.int64)
    bound = _BoundAlloc(0, argtypes, (out, 1, stack, refs, ctrl, 96), stream=0)
    blocks = []

    def read_block(_stream):
        launch = bound._launch
        pointers = (ctypes.c_void_p * 30).from_address(launch._params_at)
        blocks.append([ctypes.c_uint64.from_address(p).value for p in pointers])

    bound._launch.launch = read_block
    bound(Device(0x5000, 256, np.int32), 5)
    array = lambda d: [0, 0, d.size, d.dtype.itemsize, d.__cuda_array_interface__["data"][0], d.size, d.dtype.itemsize]  # noqa: E731
    assert blocks == [array(Device(0x5000, 256, np.int32)) + [5] + array(stack) + array(refs) + array(ctrl) + [96]]


# ------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_cupy_ids_are_used_without_copies_and_ids_export_without_a_stream():
    import cupy as cp

    alloc = PageAllocator(32, 16)
    ids = alloc.alloc(4)
    cai = ids.__cuda_array_interface__
    assert cai["stream"] is None  # so CuPy does not synchronise when it imports the ids
    as_cp = cp.asarray(ids)
    assert as_cp.data.ptr == cai["data"][0]

    dev, _ = alloc._device_ids(as_cp, "free")
    assert dev.__cuda_array_interface__["data"][0] == as_cp.data.ptr  # zero-copy view
    alloc.incref(as_cp)
    alloc.free(as_cp[::2])  # strided view
    alloc.free(as_cp)
    np.testing.assert_array_equal(alloc.refcounts()[:4], [0, 1, 0, 1])
    with pytest.raises(InvalidPageOperation):
        alloc.free(cp.asarray([0], dtype=cp.int32))


@pytest.mark.gpu
def test_gpu_alloc_takes_the_bound_launch_and_pops_what_the_dispatcher_would(rng):
    """The bound launch (numba's compiled kernel, numba's argument ABI, CuPy's cuLaunchKernel) against numba's own
    dispatcher on a twin allocator: the same ids, counters and stack after the same random history."""
    import cupy as cp

    stream = cp.cuda.Stream(non_blocking=True)
    bound, twin = PageAllocator(96, stream=stream), PageAllocator(96, stream=stream)
    assert bound.bound_alloc
    twin._bound_alloc = None  # the dispatcher path, as where numba-cuda's internals differ
    owned: list[np.ndarray] = []
    for _ in range(40):
        n = int(rng.integers(0, 9))
        if n and sum(len(o) for o in owned) + n <= 96:
            a, b = host(bound.alloc(n)), host(twin.alloc(n))
            np.testing.assert_array_equal(a, b)
            owned.append(a)
        elif owned:
            ids = owned.pop(int(rng.integers(0, len(owned))))
            bound.free(ids)
            twin.free(ids)
    scratch = bound.alloc_scratch(3)  # into the reused buffer: rebinds the output words
    np.testing.assert_array_equal(host(scratch)[:3], host(twin.alloc(3)))
    assert bound.stats() == twin.stats()
    np.testing.assert_array_equal(bound.free_page_ids(), twin.free_page_ids())
    np.testing.assert_array_equal(bound.refcounts(), twin.refcounts())
    with pytest.raises(PagePoolExhausted):
        bound.alloc(bound.stats()["free"] + 1)


@pytest.mark.gpu
def test_pool_is_shared_with_cupy_zero_copy():
    import cupy as cp

    alloc = PageAllocator(4, 8)
    view = cp.asarray(alloc.pool)
    assert view.shape == (4, 8) and view.data.ptr == alloc.pool.__cuda_array_interface__["data"][0]
    view[2] = cp.arange(8, dtype=cp.uint8)
    np.testing.assert_array_equal(alloc.pool.copy_to_host()[2], np.arange(8))


@pytest.mark.gpu
def test_allocator_runs_on_the_given_cupy_stream():
    import cupy as cp

    stream = cp.cuda.Stream(non_blocking=True)
    alloc = PageAllocator(64, stream=stream)
    assert int(alloc.stream.handle) == stream.ptr
    syncs = alloc._syncs
    with stream:
        ids = cp.asarray(alloc.alloc(8))
        total = int(ids.sum())  # CuPy work on the same stream sees the ids
    assert total == sum(range(8))
    assert alloc._syncs == syncs
    alloc.free(ids)
    assert alloc.stats()["free"] == 64


@pytest.mark.gpu
def test_default_stream_follows_cupy_current_stream():
    import cupy as cp

    stream = cp.cuda.Stream()
    with stream:
        alloc = PageAllocator(8)
    assert int(alloc.stream.handle) == stream.ptr


@pytest.mark.gpu
def test_alloc_does_not_wait_for_the_stream():
    """While a long kernel occupies the allocator stream, alloc calls return at once."""
    import cupy as cp

    spin = cp.RawKernel(
        r"""
        extern "C" __global__ void spin(long long cycles) {
            long long start = clock64();
            while (clock64() - start < cycles) { }
        }
        """,
        "spin",
    )
    stream = cp.cuda.Stream(non_blocking=True)
    alloc = PageAllocator(1024, stream=stream)
    # Compile and load the kernels, and leave 50 id buffers in CuPy's pool, before the spin.
    warm = [alloc.alloc(4) for _ in range(50)]
    for w in warm:
        alloc.free(w)
    del warm, w
    done = cp.cuda.Event()
    with stream:
        spin((1,), (1,), (np.int64(3_000_000_000),))  # about a second or more
        done.record(stream)
    syncs = alloc._syncs
    ids = [alloc.alloc(4) for _ in range(50)]
    assert not done.done, "alloc waited for the stream"
    assert alloc._syncs == syncs
    stream.synchronize()
    np.testing.assert_array_equal(np.sort(np.concatenate([host(i) for i in ids])), np.arange(200))
