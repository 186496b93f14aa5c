"""A PQ cache spread over several GPUs: sequence parallel (a sequence's tokens in segments, one rank each) and
head parallel (each rank its own kv heads), one process per GPU, partial states exchanged through a
communicator.

Both caches take the same calls on every rank (SPMD: the same ``add_sequence`` / ``append`` / ``decode``
arguments everywhere) and answer the same full result on every rank.

* :class:`SequenceParallelCache` — token position ``t`` of a sequence lives on rank ``t // tokens_per_shard``
  (``segment`` ``t // tokens_per_shard``, so a sequence of ``n`` tokens uses ``ceil(n / tokens_per_shard)``
  ranks); each rank keeps its segments as sequences of its own :class:`~million_cupy.cache.PagedPQCache`, so an
  append and its flushes go to the rank that owns the tail and the others are untouched. Each segment follows
  the flush rule on its own (a full segment keeps its last ``residual`` tokens exact). Decode: every rank
  attends over its segments with the existing kernels (one partial ``(out, lse)`` per sequence, ``lse = -inf``
  where it holds none, written into one exchange buffer), one all-gather exchanges the partials, and every rank
  merges them (one kernel, ``cuda_src/merge_states.cu``; :func:`million_cupy.decode.merge_state_stack` on the
  CPU), which equals attention over the concatenated segments.
* :class:`HeadParallelCache` — rank ``r`` holds kv heads ``[r h, (r + 1) h)`` (``h = nh_k / size``) and their
  query heads, as tensor-parallel attention does; decode needs no merge, only the all-gather of the heads'
  outputs.

Communicators (``rank``, ``size``, ``allgather``, ``all_ok``): :class:`NcclCommunicator` (CuPy's NCCL
bindings, one process per GPU, started by :func:`launch`; keep NVLink multicast off on shared machines,
``NCCL_NVLS_ENABLE=0``) and
:class:`ThreadGroup` (ranks as threads of one process: the CPU reference path, or several shards on one GPU,
where NCCL cannot run two ranks on one device).

Running out of pages on one rank raises :class:`~million_cupy.errors.PagePoolExhausted` on every rank (one
agreement per append, ``all_ok``), before any rank writes a token: nothing stored is lost, nothing is half
appended.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import threading
import time
import traceback
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from . import kernels
from .cache import PagedPQCache
from .codebook import ModelCodebooks
from .decode import decode as _local_decode
from .decode import merge_state_stack
from .errors import DeviceUnavailable, PagePoolExhausted
from .interop import as_array, cupy, dtype_name, is_gpu_array, require_gpu, to_numpy

__all__ = ["Communicator", "NcclCommunicator", "ThreadGroup", "SequenceParallelCache", "HeadParallelCache", "launch"]


class Communicator(Protocol):
    """What the parallel caches need from a process group."""

    rank: int
    size: int

    def allgather(self, x: Any, out: Any = None) -> Any:
        """Every rank's ``x`` (same shape and dtype everywhere), stacked: ``(size, *x.shape)``, on x's side;
        into ``out`` when given (an array of that shape and dtype)."""

    def all_ok(self, ok: bool) -> bool:
        """True on every rank when ``ok`` is True on every rank."""


class ThreadGroup:
    """``size`` communicators for ranks that are threads of one process (``group.communicators[r]``); the
    exchange is a copy through shared slots between two barriers. NumPy or CuPy arrays (all on one device)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size: expected at least 1 rank, got {size}")
        self._barrier = threading.Barrier(size)
        self._slots: list[Any] = [None] * size
        self.communicators = [_ThreadCommunicator(self, r, size) for r in range(size)]

    def run(self, fn, *args_per_rank: Sequence[Any]) -> list[Any]:
        """``fn(comm, *args)`` on one thread per rank (``args_per_rank[i][r]`` is rank r's i-th argument);
        their results in rank order. An exception on any rank is raised after every thread has finished."""
        results: list[Any] = [None] * len(self.communicators)
        errors: list[BaseException | None] = [None] * len(self.communicators)

        def body(r: int) -> None:
            try:
                results[r] = fn(self.communicators[r], *(a[r] for a in args_per_rank))
            except BaseException as exc:  # noqa: BLE001 - reported to the caller below
                errors[r] = exc
                self._barrier.abort()  # the other ranks' collectives fail instead of waiting forever

        threads = [threading.Thread(target=body, args=(r,)) for r in range(len(self.communicators))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)), None)
        if first is None:
            first = next((e for e in errors if e is not None), None)
        if first is not None:
            self._barrier.reset()
            raise first
        return results

    def _exchange(self, rank: int, x: Any) -> list[Any]:
        self._slots[rank] = x
        self._barrier.wait()
        got = list(self._slots)
        self._barrier.wait()  # nobody overwrites a slot before every rank has read them all
        return got


class _ThreadCommunicator:
    def __init__(self, group: ThreadGroup, rank: int, size: int) -> None:
        self._group, self.rank, self.size = group, rank, size

    def allgather(self, x: Any, out: Any = None) -> Any:
        xp = cupy() if is_gpu_array(x) else np
        parts = [xp.asarray(p) for p in self._group._exchange(self.rank, x.copy())]
        if out is None:
            return xp.stack(parts)
        for r, p in enumerate(parts):
            out[r] = p
        return out

    def all_ok(self, ok: bool) -> bool:
        return all(self._group._exchange(self.rank, bool(ok)))


class NcclCommunicator:
    """One rank of an NCCL group over CuPy's bindings (``cupy.cuda.nccl``): one process per GPU.

    ``unique_id`` comes from :meth:`new_unique_id` on one rank and is passed to every other (a launcher's job,
    see ``examples/multi_gpu_decode.py``). Collectives run on ``stream`` (default: the current stream).
    """

    def __init__(self, rank: int, size: int, unique_id: tuple, stream: Any = None) -> None:
        from cupy.cuda import nccl  # noqa: PLC0415 (NCCL only where a multi-GPU group is made)

        self._nccl = nccl
        self.rank, self.size = int(rank), int(size)
        self._comm = nccl.NcclCommunicator(self.size, unique_id, self.rank)
        self._stream = stream
        self._types = {np.float32: nccl.NCCL_FLOAT32, np.float16: nccl.NCCL_FLOAT16, np.int32: nccl.NCCL_INT32,
                       np.int64: nccl.NCCL_INT64}

    @staticmethod
    def new_unique_id() -> tuple:
        """A fresh group id (call on one rank, send to the others)."""
        from cupy.cuda import nccl  # noqa: PLC0415

        return nccl.get_unique_id()

    def _run(self, op) -> None:
        """``op(stream_ptr)`` on the communicator's stream, ordered after the work queued on the current stream
        and before whatever is queued on it next (a no-op when the two are the same stream)."""
        cp = cupy()
        current = cp.cuda.get_current_stream()
        stream = self._stream or current
        if stream == current:
            op(stream.ptr)
            return
        stream.wait_event(current.record())
        op(stream.ptr)
        current.wait_event(stream.record())

    def allgather(self, x: Any, out: Any = None) -> Any:
        cp = cupy()
        x = cp.ascontiguousarray(x)
        nccl_type = self._types.get(x.dtype.type)
        if nccl_type is None:
            raise TypeError(f"allgather: expected float16/32 or int32/64 data, got {x.dtype}")
        if out is None:
            out = cp.empty((self.size, *x.shape), dtype=x.dtype)
        elif not (out.shape == (self.size, *x.shape) and out.dtype == x.dtype and out.flags.c_contiguous):
            raise ValueError(f"allgather: out expected C-contiguous {x.dtype} {(self.size, *x.shape)}, got "
                             f"{out.dtype} {tuple(out.shape)}")
        self._run(lambda ptr: self._comm.allGather(x.data.ptr, out.data.ptr, x.size, nccl_type, ptr))
        return out

    def all_ok(self, ok: bool) -> bool:
        cp = cupy()
        flag = cp.asarray([1 if ok else 0], dtype=cp.int32)
        self._run(lambda ptr: self._comm.allReduce(flag.data.ptr, flag.data.ptr, 1, self._nccl.NCCL_INT32,
                                                   self._nccl.NCCL_MIN, ptr))
        return bool(int(flag.get()[0]))


def launch(fn: Callable[..., Any], size: int, *args: Any, timeout: float | None = None) -> list[Any]:
    """Run ``fn(comm, *args)`` in ``size`` processes, one per GPU: rank ``r`` on device ``r`` with an
    :class:`NcclCommunicator` of the group, inside ``with stream:`` for a fresh non-blocking CuPy stream that
    the communicator also uses (caches built there with ``stream=None`` share it). Returns the ranks' results
    (picklable) in rank order.

    ``fn`` must be importable by name (a module-level function: the processes are spawned, not forked, since
    CUDA does not survive a fork). NVLink multicast stays off (``NCCL_NVLS_ENABLE=0``) unless the environment
    already sets it. A rank that raises or dies makes ``launch`` stop the others and raise
    :class:`RuntimeError` with that rank's traceback; ``timeout`` (seconds) bounds the whole run.

    Raises:
        DeviceUnavailable: CuPy, NCCL or ``size`` GPUs are missing.
    """
    cp = require_gpu("parallel.launch")
    try:
        from cupy.cuda import nccl  # noqa: PLC0415
    except ImportError as exc:
        raise DeviceUnavailable(f"parallel.launch needs CuPy's NCCL bindings (cupy.cuda.nccl): {exc}") from exc
    available = cp.cuda.runtime.getDeviceCount()
    if not 1 <= size <= available:
        raise DeviceUnavailable(f"parallel.launch: expected 1 to {available} ranks (one per GPU here), got {size}")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # inherited by the spawned ranks
    unique_id = nccl.get_unique_id()
    ctx = mp.get_context("spawn")
    results_queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, size, unique_id, fn, args, results_queue), daemon=True)
             for r in range(size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    failure = None
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while len(results) < size and failure is None:
            try:
                rank, ok, payload = results_queue.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode not in (None, 0)]
                if dead:
                    failure = f"rank {dead[0]} exited with status {procs[dead[0]].exitcode} before reporting"
                elif deadline is not None and time.monotonic() > deadline:
                    failure = f"timed out after {timeout} s with ranks {sorted(set(range(size)) - set(results))} running"
                continue
            if ok:
                results[rank] = payload
            else:
                failure = f"rank {rank} raised:\n{payload}"
    finally:
        for p in procs:
            if failure is not None and p.is_alive():
                p.terminate()  # its peers may wait in a collective for the rank that failed
            p.join()
    if failure is not None:
        raise RuntimeError(f"parallel.launch: {failure}")
    return [results[r] for r in range(size)]


def _rank_main(rank: int, size: int, unique_id: tuple, fn: Callable[..., Any], args: tuple, results_queue) -> None:
    """One spawned rank of :func:`launch`: its device, stream and communicator, then ``fn``; reports back."""
    try:
        cp = cupy()
        cp.cuda.Device(rank).use()
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            comm = NcclCommunicator(rank, size, unique_id, stream=stream)
            result = fn(comm, *args)
        stream.synchronize()
        results_queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - every failure goes back to launch, with its traceback
        results_queue.put((rank, False, traceback.format_exc()))


MERGE_SOURCE = "merge_states.cu"
_MERGE_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float"}


@kernels.register_variants(MERGE_SOURCE)
def _merge_variants() -> list[str]:
    return [f"mc::parallel::{k}<{t}>" for k in ("merge_rank_states", "assemble_rank_heads")
            for t in _MERGE_TYPES.values()]


class _PartialState:
    """A rank's partial attention state in one buffer of 32-bit words, the unit of the exchange: ``out``
    ``(B, nh, d)`` in the queries' dtype, then ``lse`` ``(B, nh)`` float32, both views of ``words``; and
    ``gathered``, every rank's words after the exchange. Kept from layer to layer while the shape holds: each
    buffer is rewritten only after the stream has read it."""

    def __init__(self, xp: Any, size: int, B: int, nh: int, d: int, dtype: Any) -> None:
        self.key = (size, B, nh, d, np.dtype(dtype))
        self.shape, self.dtype = (B, nh, d), np.dtype(dtype)
        self.out_words = B * nh * d * self.dtype.itemsize // 4  # d is even: whole words
        self.words = xp.empty(self.out_words + B * nh, dtype=xp.float32)
        self.gathered = xp.empty((size, self.words.shape[0]), dtype=xp.float32)
        self._launches: dict[str, kernels.BoundLaunch] = {}  # per kernel, bound at its first GPU call
        self.out = self.words[: self.out_words].view(self.dtype).reshape(B, nh, d)
        self.lse = self.words[self.out_words :].reshape(B, nh)

    def unpack(self, gathered: Any) -> tuple[Any, Any]:
        """Every rank's state from the all-gathered words ``(size, words)``: outputs ``(size, B, nh, d)`` and
        lse ``(size, B, nh)``, copies (the buffer is reused by the next exchange)."""
        size = gathered.shape[0]
        outs = gathered[:, : self.out_words].copy().view(self.dtype).reshape(size, *self.shape)
        return outs, gathered[:, self.out_words :].copy().reshape(size, *self.shape[:2])

    def merge(self, gathered: Any) -> tuple[Any, Any]:
        """The ranks' states merged (attention over the union of their keys): out ``(B, nh, d)`` in the
        queries' dtype, lse ``(B, nh)``. One kernel on the GPU; merge_state_stack on the CPU."""
        if not is_gpu_array(gathered):
            out, lse = merge_state_stack(*self.unpack(gathered))
            return out.astype(self.dtype), lse
        B, nh, d = self.shape
        return self._launch("merge_rank_states", gathered, (B, nh, d),
                            (np.int32(gathered.shape[0]), np.int32(B * nh), np.int32(d)))

    def assemble(self, gathered: Any) -> tuple[Any, Any]:
        """The ranks' heads side by side (each rank attended with its own ``nh`` heads): out
        ``(B, size * nh, d)`` in the queries' dtype and lse ``(B, size * nh)``, rank ``r``'s heads at
        ``[r nh, (r + 1) nh)``. One kernel on the GPU."""
        size = gathered.shape[0]
        B, nh, d = self.shape
        if not is_gpu_array(gathered):
            outs, lses = self.unpack(gathered)
            return outs.transpose(1, 0, 2, 3).reshape(B, size * nh, d), lses.transpose(1, 0, 2).reshape(B, size * nh)
        return self._launch("assemble_rank_heads", gathered, (B, size * nh, d),
                            (np.int32(size), np.int32(B), np.int32(nh), np.int32(d)))

    def _launch(self, name: str, gathered: Any, out_shape: tuple[int, int, int], sizes: tuple) -> tuple[Any, Any]:
        """``mc::parallel::<name>`` over ``gathered`` into fresh ``out`` / ``lse`` (the caller keeps them):
        arguments (packed, stride, *sizes, out, lse), a thread per output element."""
        cp = cupy()
        out = cp.empty(out_shape, dtype=self.dtype)
        lse = cp.empty(out_shape[:2], dtype=cp.float32)
        launch = self._launches.get(name)
        if launch is None:
            kernel = kernels.get_kernel(MERGE_SOURCE, f"mc::parallel::{name}<{_MERGE_TYPES[dtype_name(self.dtype)]}>")
            args = (gathered, np.int64(gathered.shape[1] * 4), *sizes, gathered, gathered)  # out, lse: per call
            launch = self._launches[name] = kernels.BoundLaunch(kernel, -(-out.size // 256), 256, 0, args)
        launch.set_arg(0, gathered.data.ptr)
        launch.set_arg(len(sizes) + 2, out.data.ptr)
        launch.set_arg(len(sizes) + 3, lse.data.ptr)
        launch.launch(cp.cuda.get_current_stream().ptr)
        return out, lse


def _rows(lengths: Any, seq_ids: np.ndarray, n_rows: int) -> np.ndarray:
    """Tokens per sequence of an append (one each when ``lengths`` is None), checked against the rows given."""
    counts = np.ones(seq_ids.shape[0], dtype=np.int64) if lengths is None else \
        np.asarray(to_numpy(lengths) if is_gpu_array(lengths) else lengths, dtype=np.int64).reshape(-1)
    if counts.shape != seq_ids.shape or (counts < 0).any() or int(counts.sum()) != n_rows:
        raise ValueError(f"lengths: expected {seq_ids.shape[0]} non-negative counts summing to the {n_rows} rows of "
                         f"k / v, got {counts.tolist()[:16]}")
    return counts


class _Parallel:
    """What both caches share: SPMD sequence ids and lengths, the partial-state exchange."""

    local: PagedPQCache  # this rank's cache (each kind builds its own)

    def __init__(self, comm: Communicator, num_layers: int, max_seqs: int, codebooks: Any) -> None:
        if not isinstance(codebooks, ModelCodebooks):
            # An exact cache (codebooks=None) has no partial-state path across ranks here.
            raise TypeError(f"codebooks: expected a ModelCodebooks (the parallel caches hold PQ caches), got "
                            f"{type(codebooks).__name__}")
        self.comm = comm
        self.num_layers = num_layers
        self._lens = np.zeros((num_layers, max_seqs), dtype=np.int64)  # global tokens per (layer, sequence)
        self._live = np.zeros(max_seqs, dtype=bool)
        self._local_id = np.full(max_seqs, -1, dtype=np.int64)  # each sequence's id in this rank's local cache
        self._last_state: _PartialState | None = None
        self._checked: tuple[tuple, np.ndarray] | None = None  # the last list of live ids _ids checked

    def local_id(self, seq: int) -> int:
        """The id of ``seq`` (or of its segment) in this rank's ``local`` cache; -1 while it holds none of it."""
        return int(self._local_id[int(self._ids([seq], "local_id")[0])])

    def add_sequence(self) -> int:
        """A new empty sequence; every rank must call it in the same order (the ids agree)."""
        free = np.flatnonzero(~self._live)
        if free.size == 0:
            raise ValueError(f"add_sequence: all {self._live.shape[0]} sequence ids are in use (free one first)")
        seq = int(free[0])
        self._live[seq] = True
        self._lens[:, seq] = 0
        return seq

    def _ids(self, seq_ids: Any, what: str) -> np.ndarray:
        """``seq_ids`` as an int64 array, every id live. The decode loop's repeated list is checked once, until a
        sequence is freed (adding one leaves every checked id live)."""
        key = tuple(seq_ids) if what == "decode" and (type(seq_ids) is list or type(seq_ids) is tuple) else None
        if key is not None and self._checked is not None and self._checked[0] == key:
            return self._checked[1]
        ids = np.asarray(seq_ids, dtype=np.int64).reshape(-1)
        bad = [int(s) for s in ids if not (0 <= s < self._live.shape[0] and self._live[s])]
        if bad:
            raise ValueError(f"{what}: sequences {bad[:16]} are not live")
        if key is not None:
            ids.flags.writeable = False  # shared by the calls that pass the same list
            self._checked = (key, ids)
        return ids

    def _forget(self, seq: int) -> None:
        """``seq`` is no longer live on this rank's side (its local sequence already freed)."""
        self._local_id[seq] = -1
        self._live[seq] = False
        self._checked = None

    def seq_lens(self, layer: int, seq_ids: Any) -> np.ndarray:
        """Global tokens of each sequence in ``layer`` (all ranks agree)."""
        return self._lens[layer, self._ids(seq_ids, "seq_lens")].copy()

    def _on_stream(self) -> Any:
        """The local cache's stream as the current one (its kernels, the exchange and the merge in one order);
        nothing on the CPU path."""
        stream = self.local.stream
        return stream if stream is not None else contextlib.nullcontext()

    def _queries(self, q: Any) -> tuple[Any, Any]:
        """``q`` as an array on the cache's side (a CuPy array of 3 dimensions as it is), and that side's
        array module."""
        if not self.local.is_gpu:
            return as_array(q, "q", ndim=3, on_gpu=False), np
        cp = cupy()
        return (q if type(q) is cp.ndarray and q.ndim == 3 else as_array(q, "q", ndim=3, on_gpu=True)), cp

    def _state(self, xp: Any, B: int, nh: int, d: int, dtype: Any) -> _PartialState:
        """The exchange buffers for a state of this shape (the last ones when the shape is the same)."""
        state = self._last_state
        if state is None or state.key != (self.comm.size, B, nh, d, np.dtype(dtype)):
            state = self._last_state = _PartialState(xp, self.comm.size, B, nh, d, dtype)
        return state

    def _attend_locally(self, state: _PartialState, layer: int, ids: list[int], q: Any, rows: Any,
                        scale: float | None) -> None:
        """This rank's attention of ``q[rows]`` over its local sequences ``ids`` into ``state[rows]``."""
        if self.local.is_gpu and isinstance(rows, slice):  # every row: the kernel writes the state in place
            _local_decode(self.local, layer, ids, q, scale=scale, out=state.out, lse=state.lse)
            return
        out, lse = _local_decode(self.local, layer, ids, q[rows], scale=scale, return_lse=True)
        state.out[rows] = out
        state.lse[rows] = lse

    def _agree(self, ok: bool, what: str, error: BaseException | None) -> None:
        """Every rank raises when any rank could not do its part (its own error where it had one)."""
        if self.comm.all_ok(ok):
            return
        if error is not None:
            raise error
        raise PagePoolExhausted(f"{what}: another rank could not store its part; nothing was appended on any rank")


class SequenceParallelCache(_Parallel):
    """This rank's part of a PQ cache whose sequences are split into ``tokens_per_shard``-token segments, segment
    ``i`` on rank ``i``.

    Args:
        comm: the group (:class:`NcclCommunicator`, :class:`ThreadGroup`'s).
        num_layers, num_kv_heads, head_dim, codebooks, page_size, residual, dtype, device, stream: as
            :class:`~million_cupy.cache.PagedPQCache` (this rank's device and stream).
        tokens_per_shard: tokens a rank holds of each sequence (a multiple of page_size, at least residual);
            sequences hold at most ``size * tokens_per_shard`` tokens.
        max_seqs: sequences of the whole group; max_pages: this rank's pool.
    """

    def __init__(self, comm: Communicator, num_layers: int, num_kv_heads: int, head_dim: int,
                 codebooks: ModelCodebooks, *, tokens_per_shard: int, page_size: int = 64, residual: int = 128,
                 max_seqs: int = 64, max_pages: int | None = None, dtype: str = "float16",
                 device: str | None = None, stream: Any = None) -> None:
        if tokens_per_shard < residual or tokens_per_shard % page_size:
            raise ValueError(f"tokens_per_shard: expected a multiple of page_size = {page_size} that is at least "
                             f"residual = {residual}, got {tokens_per_shard}")
        super().__init__(comm, num_layers, max_seqs, codebooks)
        self.tokens_per_shard = int(tokens_per_shard)
        self.max_seq_len = comm.size * self.tokens_per_shard
        self.local = PagedPQCache(num_layers, num_kv_heads, head_dim, codebooks, page_size=page_size,
                                  residual=residual, max_pages=max_pages, max_seqs=max_seqs,
                                  max_seq_len=self.tokens_per_shard, dtype=dtype, device=device, stream=stream)

    def free(self, seq: int) -> None:
        """Free a sequence on every rank (its segment's pages return to this rank's pool)."""
        seq = int(self._ids([seq], "free")[0])
        if self._local_id[seq] >= 0:
            self.local.free(int(self._local_id[seq]))
        self._forget(seq)

    def local_tokens(self, layer: int, seq_ids: Any) -> np.ndarray:
        """Tokens of each sequence's segment on this rank."""
        return self._segment_tokens(self.seq_lens(layer, seq_ids))

    def _segment_tokens(self, lens: np.ndarray) -> np.ndarray:
        """This rank's share of sequences of global lengths ``lens``."""
        return np.clip(lens - self.comm.rank * self.tokens_per_shard, 0, self.tokens_per_shard)

    def append(self, layer: int, seq_ids: Sequence[int] | np.ndarray, k: Any, v: Any, lengths: Any = None) -> None:
        """Append ``lengths[b]`` (default 1) tokens to each ``seq_ids[b]``: rows of ``k`` / ``v``
        ``(sum(lengths), nh_k, head_dim)`` in sequence order, on every rank. Each rank stores the rows whose
        positions fall in its segment. Raises PagePoolExhausted on every rank, before any rank writes, when one
        rank's pool cannot hold its rows; ValueError beyond ``size * tokens_per_shard`` tokens."""
        seqs = self._ids(seq_ids, "append")
        counts = _rows(lengths, seqs, int(k.shape[0]))
        start = self._lens[layer, seqs]
        if (start + counts > self.max_seq_len).any():
            raise ValueError(f"append: sequences would exceed {self.max_seq_len} tokens ({self.comm.size} ranks x "
                             f"tokens_per_shard = {self.tokens_per_shard})")
        lo, hi = self.comm.rank * self.tokens_per_shard, (self.comm.rank + 1) * self.tokens_per_shard
        first = np.cumsum(counts) - counts
        take_lo, take_hi = np.clip(start, lo, hi), np.clip(start + counts, lo, hi)  # this rank's positions
        mine = take_hi > take_lo
        error = None
        with self._on_stream():
            try:
                if mine.any():
                    for b in np.flatnonzero(mine & (self._local_id[seqs] < 0)):
                        self._local_id[seqs[b]] = self.local.add_sequence()
                    # this layer's segment lengths after the append (other layers may be longer or shorter)
                    self.local.ensure_capacity(self._local_id[seqs[mine]], (take_hi - lo)[mine])
            except PagePoolExhausted as exc:
                error = exc
            self._agree(error is None, "append", error)
            if mine.any():
                rows = np.concatenate([np.arange(f + (a - s), f + (e - s)) for f, s, a, e in
                                       zip(first[mine], start[mine], take_lo[mine], take_hi[mine])])
                if rows.size == k.shape[0]:  # every row is this rank's: no gather
                    k_mine, v_mine = k, v
                else:
                    idx = (cupy() if is_gpu_array(k) else np).asarray(rows)
                    k_mine, v_mine = k[idx], v[idx]
                self.local.append(layer, self._local_id[seqs[mine]], k_mine, v_mine,
                                  lengths=(take_hi - take_lo)[mine])
        self._lens[layer, seqs] += counts

    def decode(self, layer: int, seq_ids: Sequence[int] | np.ndarray, q: Any, *, scale: float | None = None,
               return_lse: bool = False):
        """Attention of ``q`` ``(B, nh, head_dim)``, one query per sequence, over every rank's segments; the same
        ``out`` (and ``lse``) on every rank."""
        seqs = self._ids(seq_ids, "decode")
        lens = self._lens[layer, seqs]
        if not lens.all():
            raise ValueError(f"decode: sequences {seqs[lens == 0].tolist()} hold no tokens")
        with self._on_stream():
            q_arr, xp = self._queries(q)
            B, nh, d = q_arr.shape
            state = self._state(xp, B, nh, d, q_arr.dtype)
            mine = lens > self.comm.rank * self.tokens_per_shard  # a token in this rank's segment
            # the local ids as a list: decode's repeated-batch path reuses its plan
            if mine.all():
                self._attend_locally(state, layer, self._local_id[seqs].tolist(), q_arr, slice(None), scale)
            else:  # sequences with no token here: a state over no keys
                state.out[...] = 0
                state.lse[...] = -xp.inf
                held = np.flatnonzero(mine)
                if held.size:
                    self._attend_locally(state, layer, self._local_id[seqs[held]].tolist(), q_arr, xp.asarray(held),
                                         scale)
            merged_o, merged_s = state.merge(self.comm.allgather(state.words, out=state.gathered))  # one exchange, one merge
        return (merged_o, merged_s) if return_lse else merged_o

    def stats(self) -> dict[str, Any]:
        """This rank's pool (:meth:`PagedPQCache.stats`) and the group's shape."""
        return {**self.local.stats(), "rank": self.comm.rank, "size": self.comm.size,
                "tokens_per_shard": self.tokens_per_shard}


class HeadParallelCache(_Parallel):
    """This rank's kv heads ``[rank * h, (rank + 1) * h)`` (``h = num_kv_heads / size``) of a PQ cache, with
    the same calls as :class:`SequenceParallelCache` (k / v / q carry every head; each rank keeps its own).

    Args as :class:`~million_cupy.cache.PagedPQCache`, with ``num_kv_heads`` the model's (a multiple of the
    group size) and ``codebooks`` shared by the heads or one per kv head (each rank keeps its heads')."""

    def __init__(self, comm: Communicator, num_layers: int, num_kv_heads: int, head_dim: int,
                 codebooks: ModelCodebooks, *, page_size: int = 64, residual: int = 128, max_seqs: int = 64,
                 max_pages: int | None = None, max_seq_len: int = 131072, dtype: str = "float16",
                 device: str | None = None, stream: Any = None) -> None:
        if num_kv_heads % comm.size:
            raise ValueError(f"num_kv_heads: expected a multiple of the group size {comm.size}, got {num_kv_heads}")
        super().__init__(comm, num_layers, max_seqs, codebooks)
        self.num_kv_heads = num_kv_heads
        h = num_kv_heads // comm.size
        self._heads = slice(comm.rank * h, (comm.rank + 1) * h)
        if codebooks.num_heads_per_layer > 1:  # each rank keeps its heads' codebooks
            codebooks = ModelCodebooks([list(codebooks.key_codebooks(x)[self._heads]) for x in range(num_layers)],
                                       [list(codebooks.value_codebooks(x)[self._heads]) for x in range(num_layers)])
        self.local = PagedPQCache(num_layers, h, head_dim, codebooks, page_size=page_size, residual=residual,
                                  max_pages=max_pages, max_seqs=max_seqs, max_seq_len=max_seq_len, dtype=dtype,
                                  device=device, stream=stream)

    def add_sequence(self) -> int:
        seq = super().add_sequence()
        self._local_id[seq] = self.local.add_sequence()
        return seq

    def free(self, seq: int) -> None:
        seq = int(self._ids([seq], "free")[0])
        self.local.free(int(self._local_id[seq]))
        self._forget(seq)

    def append(self, layer: int, seq_ids: Sequence[int] | np.ndarray, k: Any, v: Any, lengths: Any = None) -> None:
        """As :meth:`SequenceParallelCache.append`; each rank stores its heads of every row."""
        seqs = self._ids(seq_ids, "append")
        counts = _rows(lengths, seqs, int(k.shape[0]))
        error = None
        with self._on_stream():
            try:
                # this layer's lengths after the append (other layers may be longer or shorter)
                self.local.ensure_capacity(self._local_id[seqs], self._lens[layer, seqs] + counts)
            except PagePoolExhausted as exc:
                error = exc
            self._agree(error is None, "append", error)
            self.local.append(layer, self._local_id[seqs], k[:, self._heads], v[:, self._heads], lengths=counts)
        self._lens[layer, seqs] += counts

    def decode(self, layer: int, seq_ids: Sequence[int] | np.ndarray, q: Any, *, scale: float | None = None,
               return_lse: bool = False):
        """As :meth:`SequenceParallelCache.decode`: each rank attends with its query heads, one all-gather
        assembles every head."""
        seqs = self._ids(seq_ids, "decode")
        with self._on_stream():
            q_arr, xp = self._queries(q)
            B, nh, d = q_arr.shape
            if nh % self.num_kv_heads:
                raise ValueError(f"q: expected num_heads a multiple of num_kv_heads = {self.num_kv_heads}, got {nh}")
            g = nh // self.num_kv_heads
            per = nh // self.comm.size
            mine = slice(self._heads.start * g, self._heads.stop * g)
            state = self._state(xp, B, per, d, q_arr.dtype)
            self._attend_locally(state, layer, self._local_id[seqs].tolist(), xp.ascontiguousarray(q_arr[:, mine]),
                                 slice(None), scale)
            # rank-major heads are the model's head order: rank r's at [r per, (r + 1) per)
            out, lse = state.assemble(self.comm.allgather(state.words, out=state.gathered))
        return (out, lse) if return_lse else out

    def stats(self) -> dict[str, Any]:
        """This rank's pool (:meth:`PagedPQCache.stats`) and the group's shape."""
        return {**self.local.stats(), "rank": self.comm.rank, "size": self.comm.size, "heads": (
            self._heads.start, self._heads.stop)}
