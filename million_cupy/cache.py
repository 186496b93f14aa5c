"""PagedPQCache: a paged, product-quantized KV cache for long-context decoding.

Every layer keeps, per sequence, the most recent tokens exactly in a residual ring and the older
ones as 8-bit PQ codes in fixed-size pages of one pool owned by a
:class:`~million_cupy.allocator.PageAllocator`. The memory layout (pages, rings, block table) is
the contract in ``docs/architecture.md`` and :mod:`million_cupy.layout`; the decode kernels read it directly.

Flush rule (:func:`~million_cupy.layout.full_pages`). A sequence holding ``n`` tokens in a layer has
``pages(n) = 0 if n < R else (n - R) // P + 1`` full pages (tokens ``[0, P * pages(n))``, read as codes)
and its residual tokens ``[P * pages(n), n)`` sit exactly in ring slots ``t % S`` (``S = R + max_rollback``
ring slots, ``R`` by default).

Codes are written when a token is appended. Every appended token is PQ-encoded at once into its place
in block ``t // P`` of its sequence (allocated then: a sequence of ``n`` tokens holds ``ceil(n / P)``
blocks), and a sequence's last ring-slots tokens (the window, and what a truncate may bring back into it)
are also copied into the ring. A flush, a block becoming a full page, is therefore only a change of lengths.
The contents are a function of the tokens alone, never of how they were split across
:meth:`PagedPQCache.append` calls.

Rollback (:meth:`PagedPQCache.truncate`). Dropping a sequence's last tokens (rejected speculative drafts) must
bring back into the window tokens that had left it, exactly. A cache built with ``max_rollback = K`` keeps
``R + K`` ring slots (token ``t`` at slot ``t % (R + K)``) and every append copies the last ``R + K`` tokens
of each sequence into the ring, not only the ones that stay residual; the codes of every token are already
in its block. Truncating by at most ``K`` tokens is then exact: the cache holds what a cache that was never
given the dropped tokens would hold.

Pages. One page id covers the ``P``-token block ``j`` of a sequence in every layer: the first layer
(or :meth:`PagedPQCache.reserve`) that needs block ``j`` allocates it and the other layers find it in
the block table. Allocated blocks of a sequence are always a prefix ``[0, blocks)`` of its
block-table row, so the host tracks only their count; the page ids themselves stay on the device.

Two paths share all index math (host NumPy over the batch):

* GPU (CuPy): rings, block table and pool live on the device; an append is one host-to-device copy of
  per-token metadata and one ``append_tokens`` launch (``cuda_src/cache_append.cu``: encode, page store
  and ring copy fused), plus a conversion when the input is not in the cache dtype, and no
  device-to-host synchronisation (the allocator only synchronises when the pool may be exhausted).
  :class:`~million_cupy.step.DecodeStep` launches the same kernel from metadata it prepared once per step.
* CPU (NumPy): the exact reference path, with the float64 reference encoder. Page ids still come
  from the PageAllocator (under numba's CUDA simulator on a machine without a GPU).

All device work, the allocator's included, runs on the CuPy stream that was current when the cache
was built (:attr:`PagedPQCache.stream`), so its kernels are ordered with one another.

Exact mode (``codebooks=None``): the same cache without quantization, the library's fp16 paged mode (the
baseline the PQ modes are measured against, through the same :class:`~million_cupy.step.DecodeStep`).
Pages hold every token's K and V rows in the cache dtype, ``(P, d)`` per layer, kind and kv head, and
there is no residual ring: the window is one page (``residual == page_size``), and a sequence's last,
partly filled block is read from its page like the others (``append_exact_tokens``, and the decode
kernel's ``MODE_PAGED_EXACT``). Sequences, blocks, fork and the page reservation work as in PQ mode;
the paths that exist only for codes (prefill's kernels, ``k_codes`` / ``page_table``) raise
:class:`~million_cupy.errors.UnsupportedConfiguration`, and the parallel caches (``million_cupy.parallel``) take
PQ codebooks only (TypeError).
"""

from __future__ import annotations

import contextlib
import heapq
import operator
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from . import kernels
from .allocator import PageAllocator
from .codebook import Codebook, ModelCodebooks, encode
from .errors import (DeviceUnavailable, MillionError, PagePoolExhausted, SequenceSlotsExhausted,
                     UnsupportedConfiguration)
from .interop import as_array, as_stream, cupy, gpu_available, is_gpu_array, resolve_dtype, to_numpy
from .layout import (  # re-exported: these names were public here before layout.py existed
    K_CHUNK_BYTES, PAGE_SIZES, V_BLOCK_TOKENS, blocks, full_pages, k_chunk, pack_pages, permute_k_rows,
    stored_v_shape, unpack_pages,
)
from .layout import kernel_codebooks

__all__ = ["PagedPQCache", "AppendPlan", "permute_k_rows", "pack_pages", "unpack_pages", "stored_v_shape",
           "full_pages", "CACHE_DTYPES", "PAGE_SIZES", "APPEND_SOURCE", "append_kernel_name", "APPEND_THREADS",
           "APPEND_TILE_ROWS", "AppendKernel", "APPEND_STATUS_STALE_SLOT", "APPEND_STATUS_NO_PAGE",
           "APPEND_STATUS_NON_FINITE"]

#: Cache (residual ring) dtypes.
CACHE_DTYPES = ("float16", "bfloat16", "float32")
#: Dtypes append accepts; others than the cache dtype are converted to it.
INPUT_DTYPES = ("float16", "bfloat16", "float32", "float64")

#: The CUDA source of the append kernel (``append_tokens``) and the page-table gather.
APPEND_SOURCE = "cache_append.cu"
#: Threads per block of ``append_tokens`` and the rows one block encodes per tile (APPEND_THREADS and
#: APPEND_ROWS in cuda_src/cache_append.cu; the kernel strides over tiles, so this sizes grids only).
APPEND_THREADS = 128
APPEND_TILE_ROWS = APPEND_THREADS * 4
_MAX_TILES = 4096
#: Rows (tokens x heads per codebook) up to which an append searches centroids with APPEND_LANES lanes per
#: row: a decode step's few rows then cost about a microsecond instead of a thread's 256-centroid scan; bulk
#: appends keep the scan, which needs fewer instructions per row.
WARP_SEARCH_MAX_ROWS = 512
APPEND_LANES = 8  # APPEND_LANES in cuda_src/cache_append.cu
#: The append kernel's status flags as bits of its 4-byte status word read as one int32 (one byte per flag,
#: set by plain stores: STATUS_* in cuda_src/cache_append.cu are the byte indices).
APPEND_STATUS_STALE_SLOT = 1 << 0
APPEND_STATUS_NO_PAGE = 1 << 8
APPEND_STATUS_NON_FINITE = 1 << 16
_CTYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float"}
_DSUBS = (1, 2, 4, 8)


def append_kernel_name(dsub: int | None, dtype: str) -> str:
    """Name expression of the ``append_tokens`` variant for sub-vectors of ``dsub`` values of ``dtype``
    (``dsub`` None: ``append_exact_tokens``, an exact cache's)."""
    if dsub is None:
        return f"append_exact_tokens<{_CTYPES[dtype]}>"
    return f"append_tokens<{dsub}, {_CTYPES[dtype]}>"


@kernels.register_variants(APPEND_SOURCE)
def _cache_append_variants() -> list[str]:
    return [append_kernel_name(s, t) for s in (*_DSUBS, None) for t in _CTYPES] + \
        ["gather_page_table", "store_block_ids"]


def _ranges(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(owner, value)`` over the concatenation of the integer ranges ``[starts[i], starts[i] + counts[i])``."""
    owner = np.repeat(np.arange(counts.shape[0]), counts)
    first = np.cumsum(counts) - counts
    values = np.arange(owner.shape[0], dtype=np.int64) - first[owner] + starts[owner]
    return owner, values


@dataclass(frozen=True)
class AppendKernel:
    """A layer's append kernel bound to its storage: what never changes between launches.

    ``args(k, v, tok, status, n_tok)`` gives the kernel's whole argument tuple (``cuda_src/cache_append.cu``)
    and ``grid(n_tok)`` its grid for ``n_tok`` token rows; ``APPEND_THREADS`` threads per block. A PQ cache's
    kernel is ``append_tokens`` (``exact`` False), an exact cache's ``append_exact_tokens``.
    """

    kernel: Any
    grid_x: int           # PQ: 2 * Hc * M blocks (kind, codebook head, subspace); exact: 2 (kind)
    rows_per_token: int   # PQ: rows one codebook encodes per token (nh_k / Hc); exact: 16-byte vectors per token
    storage: tuple        # PQ: ring_k, ring_v, K and V code bases, page_nbytes, centroids, block_table, max_blocks;
                          # exact: K and V page bases, elements per page, block_table, max_blocks
    geometry: tuple       # PQ: nh_k, M, Hc, R, page_shift; exact: nh_k, head_dim, page_shift
    slot_gen: Any
    exact: bool = False

    def warp_search(self, n_tok: int) -> bool:
        """Whether ``n_tok`` tokens are few enough for the kernel's one-warp-per-row search (lower latency)."""
        return n_tok * self.rows_per_token <= WARP_SEARCH_MAX_ROWS

    def grid(self, n_tok: int) -> tuple[int, int]:
        rows = n_tok * self.rows_per_token
        if self.exact:
            per_block = APPEND_THREADS  # one 16-byte vector per thread
        else:
            per_block = APPEND_THREADS // APPEND_LANES if self.warp_search(n_tok) else APPEND_TILE_ROWS
        return self.grid_x, max(1, min(-(-rows // per_block), _MAX_TILES))

    def args(self, k: Any, v: Any, tok: Any, status: Any, n_tok: int) -> tuple:
        head = (k, v, *self.storage, tok, self.slot_gen, status, np.int32(n_tok), *self.geometry)
        return head if self.exact else (*head, np.int32(self.warp_search(n_tok)))

    def bind(self, status: Any) -> kernels.BoundLaunch:
        """A launch with the storage and ``status`` bound once; :meth:`point` gives each call its rows."""
        null = np.uint64(0)
        return kernels.BoundLaunch(self.kernel, self.grid(1), APPEND_THREADS, 0,
                                   self.args(null, null, null, status, 1))

    def point(self, launch: kernels.BoundLaunch, k_ptr: int, v_ptr: int, tok_ptr: int, n_tok: int) -> None:
        """Point a :meth:`bind` launch at ``n_tok`` token rows: ``k`` / ``v`` and their ``tok`` metadata (device
        addresses), with the grid and search mode for that many rows."""
        tok_at = 2 + len(self.storage)  # the argument order of args()
        launch.set_arg(0, k_ptr)
        launch.set_arg(1, v_ptr)
        launch.set_arg(tok_at, tok_ptr)
        launch.set_arg(tok_at + 3, n_tok)
        if not self.exact:
            launch.set_arg(tok_at + 4 + len(self.geometry), int(self.warp_search(n_tok)))
        launch.set_grid(*self.grid(n_tok))


def _index(value: Any, name: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__}") from None


class PagedPQCache:
    """Paged PQ KV cache for ``num_layers`` layers of ``num_kv_heads`` kv heads of dimension ``head_dim``.

    Args:
        num_layers, num_kv_heads, head_dim: model geometry; must match ``codebooks``.
        codebooks: :class:`~million_cupy.codebook.ModelCodebooks` with one codebook per layer
            (shared by the kv heads) or one per kv head; None: an exact cache (K and V stored unquantized
            in ``dtype``, see the module's "Exact mode"). GPU codebooks must be ready in CuPy's current
            stream order when the cache is built (those made on another stream: synchronize it first); the
            cache waits for that stream and its own, never for the whole device, so it can be built while
            another stream captures a CUDA graph.
        page_size: tokens per page ``P``: 16, 32, 64, 128 or 256.
        residual: the exact window ``R`` in tokens: a multiple of ``page_size``, at least ``page_size``; None:
            128 (PQ) or ``page_size`` (exact, the only window it takes).
        max_pages: pages in the pool. Default: ``max_seqs * max_blocks_per_seq``, enough for every
            slot at ``max_seq_len`` (the worst case; pass a smaller pool to bound memory).
        max_seqs: sequence slots (ids are slot numbers, recycled by :meth:`free`).
        max_seq_len: most tokens one sequence may hold.
        dtype: exact token dtype (the residual ring's; an exact cache's pages): "float16", "bfloat16" or
            "float32".
        device: "cuda" or "cpu"; None follows ``codebooks.is_gpu``. Codebooks on the other side
            are copied over.
        stream: the CUDA stream for all of the cache's device work (a CuPy stream, an object with
            ``.cuda_stream`` such as ``torch.cuda.Stream``, or a raw handle); None: CuPy's current stream
            when the cache is built. Inputs must be ready on it (or on a stream it is ordered after).
        max_rollback: tokens that :meth:`truncate` can always drop from a sequence's end (speculative drafts
            that were not accepted): the ring keeps ``residual + max_rollback`` tokens exact. 0 (default):
            truncate works only while the dropped tokens' window is still in the ring. An exact cache
            holds every token in its pages and truncates by any amount.

    Raises:
        UnsupportedConfiguration: a geometry or option outside what the cache supports.
        DeviceUnavailable: ``device="cuda"`` without a usable GPU.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        codebooks: ModelCodebooks | None,
        page_size: int = 64,
        residual: int | None = None,
        max_pages: int | None = None,
        max_seqs: int = 64,
        max_seq_len: int = 131072,
        dtype: str = "float16",
        device: str | None = None,
        stream: Any = None,
        max_rollback: int = 0,
    ) -> None:
        num_layers = _index(num_layers, "num_layers")
        num_kv_heads = _index(num_kv_heads, "num_kv_heads")
        head_dim = _index(head_dim, "head_dim")
        page_size = _index(page_size, "page_size")
        quantized = codebooks is not None
        if residual is None:
            residual = 128 if quantized else page_size
        residual = _index(residual, "residual")
        max_seqs = _index(max_seqs, "max_seqs")
        max_seq_len = _index(max_seq_len, "max_seq_len")
        max_rollback = _index(max_rollback, "max_rollback")
        if max_rollback < 0:
            raise UnsupportedConfiguration(f"max_rollback: expected a non-negative integer, got {max_rollback}")
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("max_seqs", max_seqs),
                            ("max_seq_len", max_seq_len)):
            if value < 1:
                raise UnsupportedConfiguration(f"{name}: expected a positive integer, got {value}")
        if quantized:
            self._check_codebooks(codebooks, num_layers, num_kv_heads, head_dim)
        elif residual != page_size:
            raise UnsupportedConfiguration(
                f"residual: an exact cache (codebooks=None) reads every token from its pages and keeps no window; "
                f"expected residual = page_size = {page_size} (or None), got {residual}"
            )
        if page_size not in PAGE_SIZES:
            raise UnsupportedConfiguration(f"page_size: expected one of {PAGE_SIZES}, got {page_size}")
        if residual < page_size or residual % page_size:
            raise UnsupportedConfiguration(
                f"residual: expected a multiple of page_size = {page_size} that is >= page_size, got {residual}"
            )
        if dtype not in CACHE_DTYPES:
            raise UnsupportedConfiguration(f"dtype: expected one of {list(CACHE_DTYPES)}, got {dtype!r}")
        if device is None:
            if not quantized:
                raise ValueError("device: expected 'cuda' or 'cpu' for an exact cache (codebooks=None: no codebooks whose "
                                 "side to follow), got None")
            device = "cuda" if codebooks is not None and codebooks.is_gpu else "cpu"
        if device not in ("cuda", "cpu"):
            raise ValueError(f"device: expected 'cuda', 'cpu' or None, got {device!r}")
        if device == "cuda" and not gpu_available():
            raise DeviceUnavailable("device='cuda': no CUDA device is usable through CuPy")
        gpu = device == "cuda"
        if codebooks is not None and gpu != codebooks.is_gpu:
            codebooks = codebooks.to_gpu() if gpu else codebooks.to_cpu()

        self._num_layers = num_layers
        self._nh_k = num_kv_heads
        self._d = head_dim
        self._P = page_size
        self._R = residual
        self._rollback = max_rollback
        # Ring slots: the window plus the tokens a truncate may bring back into it (none in an exact cache).
        self._S = residual + max_rollback if quantized else 0
        self._max_seqs = max_seqs
        self._max_seq_len = max_seq_len
        self._max_blocks = -(-max_seq_len // page_size)
        self._dtype_name = dtype
        self._dtype = resolve_dtype(dtype)
        self._codebooks = codebooks
        self._M = None if codebooks is None else codebooks.M
        # Bytes of one token of one (layer, kind, kv head): its M codes, or its exact row.
        self._token_nbytes = head_dim * self._dtype.itemsize if self._M is None else self._M
        self._page_nbytes = num_layers * 2 * num_kv_heads * page_size * self._token_nbytes
        ring_tokens = self._S  # an exact cache reads its window from the pages
        num_pages = max_seqs * self._max_blocks if max_pages is None else _index(max_pages, "max_pages")
        if num_pages < 1:
            raise UnsupportedConfiguration(f"max_pages: expected a positive integer, got {num_pages}")
        self._num_pages = num_pages
        if gpu:
            # Fail with a usable message, not a driver OOM deep inside the allocator.
            need = num_pages * self._page_nbytes + 2 * num_layers * max_seqs * num_kv_heads * ring_tokens * head_dim * \
                self._dtype.itemsize
            free_bytes = cupy().cuda.runtime.memGetInfo()[0]
            if need > free_bytes:
                raise MemoryError(
                    f"PagedPQCache needs {need / 2**30:.2f} GiB ({num_pages} pages of {self._page_nbytes} B plus the "
                    f"residual rings) but the GPU has {free_bytes / 2**30:.2f} GiB free; pass a smaller max_pages "
                    f"(the default reserves max_seqs * max_seq_len tokens) or fewer max_seqs"
                )

        if gpu:
            cp = cupy()
            self._xp = cp
            # Every device operation of the cache (the allocator's too) runs on this one stream.
            self._stream = as_stream(stream)
            self._alloc = PageAllocator(num_pages, self._page_nbytes, stream=self._stream)
            self._pool = cp.asarray(self._alloc.pool)
        else:
            self._xp = np
            self._stream = None
            # The CPU path only borrows the allocator's page ids; the codes live in host memory.
            self._alloc = PageAllocator(num_pages, 0)
            self._pool = np.zeros((num_pages, self._page_nbytes), dtype=np.uint8)
        xp = self._xp
        with self._on_stream():
            ring_shape = (num_layers, max_seqs, num_kv_heads, ring_tokens, head_dim)
            self._ring_k = xp.zeros(ring_shape, dtype=self._dtype)
            self._ring_v = xp.zeros(ring_shape, dtype=self._dtype)
            self._block_table = xp.full((max_seqs, self._max_blocks), -1, dtype=np.int32)
            # A slot's generation changes whenever it starts or stops holding a sequence; kernels launched
            # from a step's metadata compare it so that a replay after the batch changed writes nothing.
            self._slot_gen_dev = xp.zeros(max_seqs, dtype=np.int32)
        self._kernel_books: list[tuple[Any, Any]] = []
        if gpu and codebooks is not None:
            # The codebooks in every layout a kernel reads, made here and finished before the constructor returns:
            # a kernel on any stream, in a CUDA graph, or started early by programmatic dependent launch never
            # reads them half-written, and every plan and step of this cache shares one copy. GPU codebooks are
            # ready in CuPy's current stream order (CuPy's convention; Codebook.train runs there): the cache's
            # stream waits for that stream, not for the whole device, so a cache can be built while another
            # stream captures a CUDA graph (a device synchronize would invalidate that capture).
            self._stream.wait_event(cp.cuda.get_current_stream().record())
            with self._stream:
                self._kernel_books = [kernel_codebooks(codebooks.key_centroids(x), codebooks.value_centroids(x))
                                      for x in range(num_layers)]
            self._stream.synchronize()

        # Host bookkeeping: the device never has to be asked what the cache holds.
        # (layers, slots), stored slot-major: a decode step adds to every layer of a run of slots, one
        # contiguous block (the step's host commit, :meth:`advance`).
        self._lens = np.zeros((max_seqs, num_layers), dtype=np.int64).T
        self._blocks = np.zeros(max_seqs, dtype=np.int64)  # allocated blocks per slot (a prefix)
        # Rollback bookkeeping (truncate): per (layer, slot), the most tokens held before the last truncate, so
        # the ring's oldest valid token is max(that, length) - ring slots; per slot, the blocks that a fork may
        # share with another sequence (a truncate into them copies them before they can be written again).
        self._high_water = np.zeros((num_layers, max_seqs), dtype=np.int64)
        self._shared_blocks = np.zeros(max_seqs, dtype=np.int64)
        self._live = np.zeros(max_seqs, dtype=bool)
        self._slot_gen = np.zeros(max_seqs, dtype=np.int32)
        self._lens_view = self._lens.view()
        self._lens_view.flags.writeable = False
        self._free_slots = list(range(max_seqs))  # a heap: the lowest free slot is reused first
        self._flushes = 0
        self._version = 0  # bumped by every change of lengths, slots or blocks
        self._append_kernels: dict[int, AppendKernel] = {}
        self._append_launches: dict[int, kernels.BoundLaunch] = {}  # per layer, bound to the storage once
        self._ids_scratch: tuple | None = None  # (numba int32 buffer, CuPy view): where allocations land
        # The general append's status word: its host checks come first, so of the kernel's flags only
        # "non-finite token" can be set there (read by stats()).
        self._append_status = xp.zeros(1, dtype=np.int32) if gpu else None
        self._grow_meta: tuple | None = None  # GPU: (pinned staging, device copy, copy-done event) of _grow's rows
        self._block_id_stores: dict[tuple, kernels.BoundLaunch] = {}  # GPU: store_block_ids, bound per batch
        self._non_finite_seen = False  # set by the CPU path and by launchers (record_non_finite)

    @staticmethod
    def _check_codebooks(codebooks: Any, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        if not isinstance(codebooks, ModelCodebooks):
            raise TypeError(f"codebooks: expected a ModelCodebooks (or None: an exact cache), got "
                            f"{type(codebooks).__name__}")
        if codebooks.num_layers != num_layers:
            raise UnsupportedConfiguration(
                f"codebooks: expected codebooks for num_layers = {num_layers} layers, got {codebooks.num_layers}"
            )
        if codebooks.d != head_dim:
            raise UnsupportedConfiguration(f"codebooks: expected head dim d = {head_dim}, got d = {codebooks.d}")
        if codebooks.num_heads_per_layer not in (1, num_kv_heads):
            raise UnsupportedConfiguration(
                f"codebooks: expected 1 (shared) or num_kv_heads = {num_kv_heads} codebooks per layer, "
                f"got {codebooks.num_heads_per_layer}"
            )

    # ------------------------------------------------------------------------------ geometry

    @property
    def is_gpu(self) -> bool:
        """True when the cache lives on the GPU (CuPy arrays), False on the CPU reference path."""
        return self._xp is not np

    @property
    def num_layers(self) -> int:
        """Transformer layers the cache holds."""
        return self._num_layers

    @property
    def num_kv_heads(self) -> int:
        """Key / value heads per layer ``nh_k``."""
        return self._nh_k

    @property
    def head_dim(self) -> int:
        """Head dimension ``d``."""
        return self._d

    @property
    def page_size(self) -> int:
        """Tokens per page ``P``."""
        return self._P

    @property
    def quantized(self) -> bool:
        """True for a PQ cache, False for an exact one (built with ``codebooks=None``)."""
        return self._codebooks is not None

    @property
    def residual(self) -> int:
        """Residual window ``R`` in tokens (the flush rule's; an exact cache: ``page_size``, read from pages)."""
        return self._R

    @property
    def max_rollback(self) -> int:
        """Tokens :meth:`truncate` can always drop from a sequence's end (the constructor's ``max_rollback``)."""
        return self._rollback

    @property
    def ring_slots(self) -> int:
        """Slots of each residual ring: ``residual + max_rollback`` (0 in an exact cache); token ``t`` sits in
        slot ``t % ring_slots``. Kernels that read the rings take this as their ring capacity."""
        return self._S

    @property
    def dtype(self) -> str:
        """Dtype name of the residual (exact) tokens."""
        return self._dtype_name

    @property
    def array_dtype(self) -> np.dtype:
        """The NumPy dtype of the residual (exact) tokens: what append kernels and attention launches take."""
        return self._dtype

    @property
    def M(self) -> int | None:
        """PQ subspaces (code bytes per token, head and kind); None for an exact cache."""
        return self._M

    @property
    def max_seqs(self) -> int:
        """Sequence slots (sequence ids are slot numbers ``0 .. max_seqs - 1``)."""
        return self._max_seqs

    @property
    def max_seq_len(self) -> int:
        """Most tokens one sequence may hold."""
        return self._max_seq_len

    @property
    def max_blocks_per_seq(self) -> int:
        """Block-table columns: ``ceil(max_seq_len / page_size)``."""
        return self._max_blocks

    @property
    def num_pages(self) -> int:
        """Pages in the pool."""
        return self._num_pages

    @property
    def page_nbytes(self) -> int:
        """Bytes per page: ``num_layers * 2 * nh_k * page_size * M`` (exact: ``* head_dim * itemsize``)."""
        return self._page_nbytes

    @property
    def codebooks(self) -> ModelCodebooks | None:
        """The codebooks, on the cache's side (None for an exact cache)."""
        return self._codebooks

    @property
    def allocator(self) -> PageAllocator:
        """The page allocator (owner of the pool on the GPU path)."""
        return self._alloc

    @property
    def stream(self) -> Any:
        """The CuPy stream all cache and allocator work runs on (None on the CPU path)."""
        return self._stream

    # ------------------------------------------------------------------------ memory layout

    @property
    def pool(self) -> Any:
        """The page pool, ``(num_pages, page_nbytes)`` uint8 (CuPy on the GPU path, NumPy on the CPU path)."""
        return self._pool

    def code_offset(self, layer: int, kind: int) -> int:
        """Byte offset in a page of the ``(layer, kind)`` section (kind 0 = K, 1 = V); head ``h`` adds
        ``h * P * M`` (exact cache: ``h * P * head_dim * itemsize``)."""
        layer = self.check_layer(layer)
        if kind not in (0, 1):
            raise ValueError(f"kind: expected 0 (K) or 1 (V), got {kind!r}")
        return (layer * 2 + kind) * self._nh_k * self._P * self._token_nbytes

    def k_pages(self, layer: int) -> Any:
        """Exact cache: view ``(num_pages, nh_k, P, head_dim)`` of the pool in the cache dtype, the K rows of
        ``layer`` (token ``t`` of a sequence in row ``t % P`` of the page of its block ``t // P``)."""
        return self._exact_view(layer, 0, "k_pages")

    def v_pages(self, layer: int) -> Any:
        """Exact cache: view ``(num_pages, nh_k, P, head_dim)`` of the pool, the V rows of ``layer``."""
        return self._exact_view(layer, 1, "v_pages")

    def _exact_view(self, layer: int, kind: int, what: str) -> Any:
        if self.quantized:
            raise UnsupportedConfiguration(f"{what}: a PQ cache stores codes (k_codes / v_codes); exact pages belong "
                                           f"to a cache built with codebooks=None")
        item = self._dtype.itemsize
        rows = self._pool.view(self._dtype)[:, self.code_offset(layer, kind) // item:]
        return self._xp.lib.stride_tricks.as_strided(
            rows, shape=(self._num_pages, self._nh_k, self._P, self._d),
            strides=(self._page_nbytes, self._P * self._d * item, self._d * item, item))

    def _pq_codebooks(self, what: str) -> ModelCodebooks:
        """The codebooks of a PQ cache; an exact cache raises, naming ``what`` needed them."""
        if self._codebooks is None:
            raise UnsupportedConfiguration(f"{what}: this cache is exact (codebooks=None) and holds no PQ codes or "
                                           f"codebooks; its pages are k_pages / v_pages")
        return self._codebooks

    def k_codes(self, layer: int) -> Any:
        """View ``(num_pages, nh_k, M // kc, P, kc)`` of the pool (``kc = min(M, 16)``): K codes of ``layer``
        as stored (see :func:`pack_pages`; :func:`unpack_pages` gives ``[token][m]`` codes)."""
        P, M = self._P, self._pq_codebooks("k_codes").M
        kc = k_chunk(M)
        return self._codes_view(self.code_offset(layer, 0), (self._nh_k, M // kc, P, kc), (P * M, P * kc, kc, 1))

    def v_codes(self, layer: int) -> Any:
        """View ``(num_pages, nh_k, P // 16, M, 16)`` of the pool: V codes of ``layer`` as stored,
        transposed ``[m][token]`` in 16-token blocks (see :func:`pack_pages`)."""
        P, M, T = self._P, self._pq_codebooks("v_codes").M, V_BLOCK_TOKENS
        return self._codes_view(self.code_offset(layer, 1), (self._nh_k, P // T, M, T), (P * M, M * T, T, 1))

    def _codes_view(self, offset: int, shape: tuple[int, ...], strides: tuple[int, ...]) -> Any:
        return self._xp.lib.stride_tricks.as_strided(
            self._pool[:, offset:], shape=(self._num_pages, *shape), strides=(self._page_nbytes, *strides)
        )

    @property
    def block_table(self) -> Any:
        """Int32 ``(max_seqs, max_blocks_per_seq)``: page id of block ``j`` of each slot, -1 where unallocated."""
        return self._block_table

    def residual_k(self, layer: int) -> Any:
        """K ring of ``layer``: ``(max_seqs, nh_k, S, d)`` in the cache dtype, ``S =`` :attr:`ring_slots`; token
        ``t`` at slot ``t % S`` (an exact cache has none: ``(max_seqs, nh_k, 0, d)``)."""
        return self._ring_k[self.check_layer(layer)]

    def residual_v(self, layer: int) -> Any:
        """V ring of ``layer``: ``(max_seqs, nh_k, S, d)`` in the cache dtype; token ``t`` at slot ``t % S``."""
        return self._ring_v[self.check_layer(layer)]

    def key_centroids(self, layer: int) -> Any:
        """Float32 ``(Hc, M, 256, dsub)`` key centroids of ``layer`` on the cache's side."""
        return self._pq_codebooks("key_centroids").key_centroids(layer)

    def value_centroids(self, layer: int) -> Any:
        """Float32 ``(Hc, M, 256, dsub)`` value centroids of ``layer`` on the cache's side."""
        return self._pq_codebooks("value_centroids").value_centroids(layer)

    def kernel_codebooks(self, layer: int) -> tuple[Any, Any]:
        """``(k, v)``: the key and value centroids of ``layer`` as the attention kernels read them, float16
        ``(Hc, 256, M, dsub)`` (:func:`~million_cupy.layout.kernel_codebooks`); made when a GPU cache is built,
        complete then, and shared by every launcher of the cache.

        Raises:
            UnsupportedConfiguration: an exact cache (no codebooks).
            MillionError: a CPU cache.
        """
        self._pq_codebooks("kernel_codebooks")
        if not self.is_gpu:
            raise MillionError("kernel_codebooks: a CPU cache has no kernel layouts (the CPU path reads "
                               "key_centroids / value_centroids)")
        return self._kernel_books[self.check_layer(layer)]

    # ---------------------------------------------------------------------------- sequences

    def add_sequence(self) -> int:
        """Start an empty sequence; returns its id (the lowest free slot)."""
        if not self._free_slots:
            raise SequenceSlotsExhausted(
                f"add_sequence: all max_seqs = {self._max_seqs} sequence slots are in use; free one first"
            )
        seq = heapq.heappop(self._free_slots)
        self._live[seq] = True
        self._new_generation(seq)
        return seq

    def fork(self, seq: int) -> int:
        """A new sequence with the same contents as ``seq`` in every layer; returns its id.

        Blocks that are full PQ pages in every layer are shared (one more reference each). Every other
        allocated block (still being filled, full in some layers only, or reserved ahead) would later
        receive different tokens from the two sequences, so the child gets a fresh page holding a copy of
        the source page. Residual rings and lengths are copied.

        Raises:
            PagePoolExhausted: not enough free pages for the copied blocks; nothing changed.
        """
        src = self.check_ids(seq, "fork")[0]
        if not self._free_slots:
            raise SequenceSlotsExhausted(f"fork: all max_seqs = {self._max_seqs} sequence slots are in use; free one first")
        shared = int(self._full_pages(self._lens[:, src].min()))
        blocks = int(self._blocks[src])
        with self._on_stream():
            try:
                fresh = self._alloc.alloc(blocks - shared) if blocks > shared else None
            except PagePoolExhausted as exc:
                raise PagePoolExhausted(f"fork: sequence {int(src)} has {blocks - shared} blocks that are not full "
                                        f"pages in every layer, which a fork copies ({exc}); nothing changed") from None
            child = heapq.heappop(self._free_slots)
            table = self._block_table
            if shared:
                self._alloc.incref(table[src, :shared])
                table[child, :shared] = table[src, :shared]
            if fresh is not None:
                table[child, shared:blocks] = self._page_ids(fresh)
                self._pool[table[child, shared:blocks]] = self._pool[table[src, shared:blocks]]
            self._ring_k[:, child] = self._ring_k[:, src]
            self._ring_v[:, child] = self._ring_v[:, src]
        self._lens[:, child] = self._lens[:, src]
        self._high_water[:, child] = self._high_water[:, src]
        self._shared_blocks[child] = shared
        self._shared_blocks[src] = max(int(self._shared_blocks[src]), shared)
        self._blocks[child] = blocks
        self._live[child] = True
        self._new_generation(child)
        return int(child)

    def free(self, seq: int) -> None:
        """Drop sequence ``seq``: one reference of each of its pages goes back, and the slot is recycled."""
        seq = self.check_ids(seq, "free")[0]
        blocks = int(self._blocks[seq])
        with self._on_stream():
            if blocks:
                self._alloc.free(self._block_table[seq, :blocks])
                self._block_table[seq, :blocks] = -1
        self._lens[:, seq] = 0
        self._high_water[:, seq] = 0
        self._shared_blocks[seq] = 0
        self._blocks[seq] = 0
        self._live[seq] = False
        self._new_generation(seq)
        heapq.heappush(self._free_slots, int(seq))

    def truncate(self, seq_ids: int | Sequence[int] | np.ndarray, lengths: int | Sequence[int] | np.ndarray) -> None:
        """Drop each listed sequence's tokens from position ``lengths[i]`` on, in every layer (speculative drafts
        that were not accepted); a layer holding that many tokens or fewer keeps them. ``seq_ids``: one id or
        several; ``lengths``: one count for all or one per sequence. Afterwards the cache holds exactly what it
        would hold had the dropped tokens never been appended, and appends continue at the new lengths.

        A PQ cache brings tokens back into the exact window from its ring, which holds a sequence's last
        :attr:`ring_slots` tokens: dropping at most :attr:`max_rollback` tokens below the most the sequence held
        since its last truncate always works (and more while the window has not moved that far). A sequence keeps
        its allocated blocks, which later appends write into; a block that a :meth:`fork` may share with another
        sequence gets a fresh copy first, so that the other sequence's tokens stay as they are. Host work only
        (no device call) unless such a copy is made.

        Raises:
            ValueError: unknown or repeated ids, negative lengths, or a length whose window the ring no longer
                holds (the message gives the shortest length that sequence can go back to); nothing changed.
            PagePoolExhausted: no free pages for the copies of shared blocks; nothing changed.
        """
        seqs = self.check_ids(seq_ids, "truncate")
        target = self._check_counts(lengths, seqs.shape[0], "lengths")
        cur = self._lens[:, seqs]
        drop = cur > target
        if not drop.any():
            return
        high = np.maximum(self._high_water[:, seqs], cur)
        if self.quantized:
            # The ring holds the exact rows of tokens [high - S, high); the window of `target` tokens starts at its
            # full pages' end.
            oldest = high - self._S
            short = drop & (self._P * self._full_pages(target) < oldest)
            if short.any():
                layer, i = (int(j[0]) for j in np.nonzero(short))
                raise ValueError(
                    f"truncate: sequence {int(seqs[i])} held up to {int(high[layer, i])} tokens in layer {layer} and "
                    f"its ring keeps the last ring_slots = {self._S} of them exact, so it can go back to "
                    f"{self._shortest_length(int(oldest[layer, i]))} tokens, not {int(target[i])} (build the cache "
                    f"with a larger max_rollback, now {self._rollback}); nothing changed")
        # Appends write again from the block of position target on: none of those blocks may be shared.
        first = target // self._P
        shared = np.minimum(self._shared_blocks[seqs], self._blocks[seqs])
        if (first < shared).any():
            self._unshare(seqs, first, shared)
        self._high_water[:, seqs] = np.where(drop, high, self._high_water[:, seqs])
        self._lens[:, seqs] = np.minimum(cur, target)
        self._version += 1

    def _shortest_length(self, oldest: int) -> int:
        """The fewest tokens whose window starts at or after token ``oldest`` (the flush rule solved for n)."""
        if oldest <= 0:
            return 0
        return self._R + (-(-oldest // self._P) - 1) * self._P

    def _unshare(self, seqs: np.ndarray, first: np.ndarray, end: np.ndarray) -> None:
        """Give each ``seqs[i]`` private copies of its blocks ``[first[i], end[i])`` (which a fork may share), in
        one allocation, dropping its references to the shared pages."""
        count = np.maximum(end - first, 0)
        with self._on_stream():
            try:
                fresh = self._page_ids(self._alloc.alloc(int(count.sum())))
            except PagePoolExhausted as exc:
                raise PagePoolExhausted(f"truncate: sequences {seqs[count > 0].tolist()} need {int(count.sum())} "
                                        f"pages to copy blocks a fork may share ({exc}); nothing changed") from None
            at = 0
            for s, lo, n in zip(seqs.tolist(), first.tolist(), count.tolist()):
                if n:
                    old = self._block_table[s, lo : lo + n].copy()
                    ids = fresh[at : at + n]
                    self._pool[ids] = self._pool[old]
                    self._block_table[s, lo : lo + n] = ids
                    self._alloc.free(old)
                    self._shared_blocks[s] = lo
                    at += n

    def _new_generation(self, seq: int) -> None:
        self._slot_gen[seq] += 1
        self._version += 1
        with self._on_stream():
            self._slot_gen_dev[seq] = int(self._slot_gen[seq])

    def seq_len(self, seq: int, layer: int = 0) -> int:
        """Tokens sequence ``seq`` holds in ``layer``."""
        return int(self._lens[self.check_layer(layer), self.check_ids(seq, "seq_len")[0]])

    def seq_lens(self, layer: int, seq_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Host int64 array of the tokens each listed sequence holds in ``layer``."""
        layer = self.check_layer(layer)
        return self._lens[layer, self.check_ids(seq_ids, "seq_lens", unique=False)]

    @property
    def lengths(self) -> np.ndarray:
        """Read-only host int64 ``(num_layers, max_seqs)``: tokens each slot holds in each layer (0 for a free
        slot). A view, kept current by the cache: launchers compare it without a copy or a validation."""
        return self._lens_view

    @property
    def version(self) -> int:
        """A counter that changes with every change of lengths, sequences or allocated blocks, so a
        launcher can tell in one comparison that nothing moved since it last looked."""
        return self._version

    def slot_generations(self, seq_ids: np.ndarray) -> np.ndarray:
        """Host int32 generation of each listed slot: it changes whenever a slot starts or stops holding a
        sequence (add_sequence, fork, free). Device kernels compare it with :attr:`slot_generation_array`."""
        return self._slot_gen[seq_ids]

    @property
    def slot_generation_array(self) -> Any:
        """The device copy of every slot's generation, int32 ``(max_seqs,)`` (see :meth:`slot_generations`)."""
        return self._slot_gen_dev

    def allocated_blocks(self, seq_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Host int64 count of allocated blocks of each listed sequence (its block-table prefix)."""
        return self._blocks[self.check_ids(seq_ids, "allocated_blocks", unique=False)]

    def full_pages(self, n: Any) -> np.ndarray:
        """The flush rule for this cache's page size and window: full pages of sequences of ``n`` tokens."""
        return full_pages(n, self._P, self._R)

    # ------------------------------------------------------------------------------ writing

    def append(
        self,
        layer: int,
        seq_ids: Sequence[int] | np.ndarray,
        k: Any,
        v: Any,
        lengths: Sequence[int] | np.ndarray | None = None,
        *,
        check_finite: bool | None = None,
    ) -> None:
        """Append tokens of ``layer`` to the listed sequences.

        ``k`` and ``v`` are ``(sum(lengths), nh_k, d)``, the tokens of ``seq_ids[0]`` first, then
        those of ``seq_ids[1]``, ...; ``lengths`` None means one token per sequence. Any float
        dtype is converted to the cache dtype. The GPU cache copies NumPy input to the device
        (converted to the cache dtype on the host first); the CPU cache rejects GPU input.

        ``check_finite``: refuse NaN / inf tokens (ValueError, nothing written). None (default) checks
        bulk appends (a sequence receiving more than one token, as a prefill does: one device sync) and
        leaves one-token appends, the decode path, unchecked on the host: the append kernel flags such
        tokens and :meth:`stats` reports them (``non_finite_appended``).

        Blocks that the tokens land in are allocated in one allocator call before anything is
        written, so every error, :class:`~million_cupy.errors.PagePoolExhausted` included, leaves
        the cache unchanged. For a decode loop, :class:`~million_cupy.step.DecodeStep` does the same
        work from metadata prepared once per step (one launch per layer, no host index math).
        """
        layer = self.check_layer(layer)
        seqs = self.check_ids(seq_ids, "append")
        counts = self._check_counts(lengths, seqs.shape[0], "lengths")
        total = int(counts.sum())
        k = self._check_tokens(k, "k", total)
        v = self._check_tokens(v, "v", total)
        if check_finite or (check_finite is None and total > seqs.shape[0]):
            self._refuse_non_finite(k, v, total)
        n0 = self._lens[layer, seqs]
        n1 = n0 + counts
        self._check_max_len(seqs, n1, "append")
        with self._on_stream():
            self._grow(seqs, blocks(n1, self._P), "append")  # the only step that can fail; nothing written before
            meta = self._token_meta(seqs, n0, counts)
            if total:
                self._store_tokens(layer, meta, self._xp.asarray(meta), k, v)
        self._commit(layer, seqs, n1, self._flushed(n0, n1))

    def plan_append(self, seq_ids: Sequence[int] | np.ndarray,
                    lengths: Sequence[int] | np.ndarray | int | None = None, *,
                    layers: Sequence[int] | None = None, into: Any = None) -> "AppendPlan":
        """Plan appending ``lengths[i]`` tokens to each ``seq_ids[i]`` in every layer of ``layers``, for
        :meth:`AppendPlan.append` to write one layer at a time: a prefill chunk's or a verification step's new
        tokens, whose positions, ring slots and pages are the same in every layer.

        The plan reserves the blocks the tokens land in (one allocator call) and uploads their per-token
        metadata once; each :meth:`AppendPlan.append` is then one kernel launch, with no index math, allocation or
        synchronisation on the host (:meth:`append` does that work, and with its default finite check one device
        sync, per call). ``lengths``: one count per sequence, one for all, or None (1 each). ``layers``: the
        layers that will be appended (default all); they must hold equal lengths for the listed sequences.

        ``into`` (GPU cache): a C-contiguous CuPy int32 array of at least ``4 * sum(lengths)`` elements that
        receives the tokens' metadata (one copy on the cache's stream, after the work queued there) instead of a
        new array. At a fixed address, it lets :meth:`AppendPlan.append` launches captured in a CUDA graph serve
        later plans: plan into the same buffer, :meth:`AppendPlan.commit` the layers, replay the graph (a plan
        without ``into`` refuses to be captured). :class:`~million_cupy.prefill.BatchPrefillWrapper` does this
        for its own appends.

        Raises:
            ValueError: unknown or repeated ids, bad counts or layers, layers of unequal lengths, lengths past
                ``max_seq_len``, or an ``into`` that does not fit; nothing changed.
            PagePoolExhausted: no pages for the new tokens; nothing changed.
        """
        seqs = self.check_ids(seq_ids, "plan_append")
        counts = self._check_counts(lengths, seqs.shape[0], "lengths")
        planned, n0 = self.equal_lengths(seqs, layers, "plan_append")
        n1 = n0 + counts
        self._check_max_len(seqs, n1, "plan_append")
        total = int(counts.sum())
        if into is not None:
            self._check_meta_buffer(into, total)
        with self._on_stream():
            self._grow(seqs, blocks(n1, self._P), "plan_append")
            meta = self._token_meta(seqs, n0, counts)
            if not self.is_gpu:
                tokens = meta
            elif into is None:
                tokens = self._xp.asarray(meta)
            else:
                tokens = into
                if total:  # pageable memory: the driver stages it before returning, so `meta` may go
                    self._xp.cuda.runtime.memcpyAsync(into.data.ptr, meta.ctypes.data, meta.nbytes, 1,
                                                      self._stream.ptr)  # 1: host to device
        return AppendPlan(self, seqs, counts, n0, n1, self._flushed(n0, n1), planned, self._slot_gen[seqs].copy(),
                          meta, tokens, fixed=into is not None)

    def _check_meta_buffer(self, into: Any, total: int) -> None:
        """ValueError unless ``into`` can receive the metadata of ``total`` planned tokens (plan_append)."""
        if not self.is_gpu:
            raise ValueError("plan_append: into: a device buffer is for a GPU cache's plans; this cache is on the CPU")
        cp = self._xp
        if not (isinstance(into, cp.ndarray) and into.dtype == np.int32 and into.flags.c_contiguous
                and into.size >= 4 * total):
            what = (f"{type(into).__name__}" if not isinstance(into, cp.ndarray) else
                    f"a CuPy array of dtype {into.dtype}, {into.size} elements"
                    f"{'' if into.flags.c_contiguous else ', not C-contiguous'}")
            raise ValueError(f"plan_append: into: expected a C-contiguous CuPy int32 array of at least "
                             f"{4 * total} elements (4 per planned token), got {what}")

    def equal_lengths(self, seqs: np.ndarray, layers: Sequence[int] | None,
                      what: str) -> tuple[list[int], np.ndarray]:
        """``(layers, n)``: the listed layers (default all; checked, distinct, at least one) and the tokens ``n[i]``
        that ``seqs[i]`` (ids :meth:`check_ids` validated) holds in every one of them. Raises ValueError, reported
        as ``what:``, where a sequence's layers hold different lengths (a launcher planning several layers at once
        needs them equal)."""
        planned = list(range(self._num_layers)) if layers is None else [self.check_layer(x) for x in layers]
        if not planned or len(set(planned)) != len(planned):
            raise ValueError(f"{what}: layers: expected distinct layers, at least one, got {planned}")
        lens = self._lens[:, seqs] if layers is None else self._lens[planned][:, seqs]
        if not (lens == lens[0]).all():
            b = int(np.flatnonzero((lens != lens[0]).any(axis=0))[0])
            raise ValueError(f"{what}: sequence {int(seqs[b])} holds {lens[:, b].tolist()} tokens in layers "
                             f"{planned}; plan layers that hold equal lengths (layers=[...])")
        return planned, lens[0].copy()

    def _append_planned(self, plan: "AppendPlan", layer: int, k: Any, v: Any) -> None:
        """:meth:`AppendPlan.append`: check that ``layer`` still holds what the plan found, write, commit."""
        layer = self.check_layer(layer)
        self._check_plan_current(plan, [layer], "append")
        total = plan.tokens
        capturing = bool(self.is_gpu and total and self._stream.is_capturing())
        if capturing:
            # A graph replays the launch on these very addresses: a converted copy would be freed under it.
            if not plan.fixed:
                raise MillionError("AppendPlan.append: the cache's stream is being captured in a CUDA graph, and "
                                   "this plan's metadata is a fresh array that later plans cannot reach; plan with "
                                   "plan_append(..., into=buffer) to capture appends (nothing written)")
            for x, name in ((k, "k"), (v, "v")):
                if not self._exact_rows(x, total):
                    layout = "" if getattr(x, "flags", None) is None or x.flags.c_contiguous else ", not C-contiguous"
                    got = f"{type(x).__name__} of shape {getattr(x, 'shape', None)}, {getattr(x, 'dtype', None)}{layout}"
                    raise MillionError(f"AppendPlan.append: a captured append reads {name} where it is, so it takes "
                                       f"a C-contiguous CuPy array of shape {(total, self._nh_k, self._d)} and dtype "
                                       f"{self._dtype_name}, 16-byte aligned; got {got} (nothing written)")
        k = self._check_tokens(k, "k", total)
        v = self._check_tokens(v, "v", total)
        if total:
            self._store_tokens(layer, plan.meta, plan.device_meta, k, v)
        self._commit(layer, plan.seq_ids, plan.end, plan.flushed)
        plan.version = self._version
        plan.layers_left.discard(layer)
        if capturing:
            plan.captured_layers.add(layer)

    def _commit_planned(self, plan: "AppendPlan", layers: Sequence[int] | None) -> None:
        """:meth:`AppendPlan.commit`: count the plan's tokens in ``layers`` (default: those left; checked as by
        append) at once."""
        if layers is None:
            layers = sorted(plan.layers_left)
        else:
            layers = [self.check_layer(x) for x in layers]
            if len(set(layers)) != len(layers):
                raise ValueError(f"AppendPlan.commit: layers: expected distinct layers, got {layers}")
        if not layers:
            return
        self._check_plan_current(plan, layers, "commit")
        self._commit(layers, plan.seq_ids, plan.end, plan.flushed)
        plan.version = self._version
        plan.layers_left.difference_update(layers)

    def _check_plan_current(self, plan: "AppendPlan", layers: list[int], what: str) -> None:
        """MillionError unless every one of ``layers`` is left to ``plan`` and still holds what the plan found."""
        for x in layers:
            if x not in plan.layers_left:
                done = "was appended already" if x in plan.layers else "is not in the plan"
                raise MillionError(f"AppendPlan.{what}: layer {x} {done} (planned layers {list(plan.layers)}, left "
                                   f"{sorted(plan.layers_left)}); call plan_append again for more tokens")
        if plan.version == self._version:  # nothing else changed the cache since the plan last looked
            return
        seqs = plan.seq_ids
        if not np.array_equal(self._slot_gen[seqs], plan.generations):
            raise MillionError(f"AppendPlan.{what}: sequences of the plan ({seqs.tolist()[:16]}) were freed or "
                               f"replaced since plan_append; plan again")
        held = self._lens[layers][:, seqs]
        wrong = held != plan.start
        if wrong.any():
            at, b = (int(j[0]) for j in np.nonzero(wrong))
            raise MillionError(f"AppendPlan.{what}: layer {layers[at]}: the plan expects sequence {int(seqs[b])} to "
                               f"hold {int(plan.start[b])} tokens, it holds {int(held[at, b])} (the cache changed "
                               f"since plan_append); plan again")

    def _refuse_non_finite(self, k: Any, v: Any, total: int) -> None:
        """ValueError naming the rows of ``k`` / ``v`` that hold NaN or inf (GPU: one device sync when there are
        none)."""
        xp = self._xp
        if bool(xp.isfinite(k).all() & xp.isfinite(v).all()):
            return
        for x, name in ((k, "k"), (v, "v")):
            bad = ~xp.isfinite(x).reshape(total, -1).all(axis=1)
            if bool(bad.any()):
                rows = to_numpy(xp.flatnonzero(bad))
                raise ValueError(f"append: {name} holds NaN or inf in {rows.size} of {total} tokens (first rows: "
                                 f"{rows[:8].tolist()}); nothing was appended (check_finite=False stores them)")

    def _token_meta(self, seqs: np.ndarray, n0: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Host int32 ``(T, 4)`` {slot, position, slot generation, into the ring} of ``counts[i]`` tokens appended
        to each ``seqs[i]`` holding ``n0[i]``: the append kernel's per-token words. The last ring_slots tokens of
        each sequence go to the ring too: the window after the append, and the tokens a truncate may bring back
        into it."""
        owner, pos = _ranges(n0, counts)
        meta = np.empty((pos.shape[0], 4), dtype=np.int32)
        meta[:, 0] = seq = seqs[owner]
        meta[:, 1] = pos
        meta[:, 2] = self._slot_gen[seq]
        np.greater_equal(pos, (n0 + counts - self._S)[owner], out=meta[:, 3], casting="unsafe")
        return meta

    def _commit(self, layer: int | list[int], seqs: np.ndarray, n1: np.ndarray, flushed: int) -> None:
        """``layer`` (or each of a list of layers) of each ``seqs[i]`` holds ``n1[i]`` tokens now, ``flushed`` more
        blocks of them full pages per layer."""
        if isinstance(layer, list):
            self._lens[np.ix_(np.asarray(layer), seqs)] = n1
            self._flushes += flushed * len(layer)
        else:
            self._lens[layer, seqs] = n1
            self._flushes += flushed
        self._version += 1

    def _flushed(self, n0: np.ndarray, n1: np.ndarray) -> int:
        """Blocks that become full pages in a layer when sequences of ``n0`` tokens grow to ``n1``."""
        return int((self._full_pages(n1) - self._full_pages(n0)).sum())

    def advance(self, seq_ids: np.ndarray | slice, new_tokens: int, new_full_pages: int) -> None:
        """Count ``new_tokens`` more tokens in every layer of each listed sequence, whose data a launcher
        writes with the append kernel itself (:class:`~million_cupy.step.DecodeStep`).

        ``seq_ids`` (an int array or a slice of slots) must be validated live, distinct sequences holding
        equal lengths in every layer, whose blocks already cover the new tokens (:meth:`reserve`), and
        ``new_full_pages`` the blocks that become full pages in each layer by this advance (the flush rule
        applied by the caller). This is the step's host commit: it does no checking of its own.
        """
        self._lens[:, seq_ids] += new_tokens
        self._flushes += self._num_layers * new_full_pages
        self._version += 1

    def reserve(self, seq_ids: Sequence[int] | np.ndarray, new_tokens: int | Sequence[int] | np.ndarray) -> int:
        """Allocate every block that appending ``new_tokens`` tokens would write into, without appending.

        ``new_tokens`` is one count for all listed sequences or one per sequence, counted from the
        sequence's longest layer. Later appends reuse the reserved pages from the block table.
        Returns the number of pages allocated.

        Raises:
            PagePoolExhausted: not enough free pages; nothing was allocated.
        """
        seqs = self.check_ids(seq_ids, "reserve")
        new = self._check_counts(new_tokens, seqs.shape[0], "new_tokens")
        target = self._lens[:, seqs].max(axis=0, initial=0) + new
        self._check_max_len(seqs, target, "reserve")
        with self._on_stream():
            return self._grow(seqs, blocks(target, self._P), "reserve")

    def ensure_capacity(self, seq_ids: Sequence[int] | np.ndarray, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """Allocate blocks so that each listed sequence can hold ``tokens[i]`` tokens in total (a length, not a
        count of new tokens; at most ``max_seq_len``) without further allocation; one allocator call.

        Returns each sequence's token capacity afterwards: host int64 ``(B,)``, its allocated blocks times
        the page size, capped at ``max_seq_len`` (at least ``tokens``). A decode step's plan calls this once
        per window of steps (:class:`~million_cupy.step.DecodeStep`), so it validates the ids once.

        Raises:
            PagePoolExhausted: not enough free pages; nothing was allocated.
            ValueError: unknown or repeated ids, or ``tokens`` of another shape or beyond ``max_seq_len``.
        """
        seqs = self.check_ids(seq_ids, "ensure_capacity")
        target = np.asarray(tokens).reshape(-1)
        if target.shape != seqs.shape or (target.size and target.dtype.kind not in "iu"):
            raise ValueError(f"tokens: expected {seqs.shape[0]} integer lengths (one per sequence), got "
                             f"{target.dtype} of shape {target.shape}")
        if (target < 0).any():
            raise ValueError(f"tokens: expected non-negative lengths, got {target[target < 0].tolist()}")
        self._check_max_len(seqs, target, "ensure_capacity")
        with self._on_stream():
            self._grow(seqs, blocks(target.astype(np.int64), self._P), "ensure_capacity")
        return np.minimum(self._blocks[seqs] * self._P, self._max_seq_len)

    def _grow(self, seqs: np.ndarray, target: np.ndarray, what: str) -> int:
        """Allocate blocks so that each sequence has at least ``target`` of them (one allocator call)."""
        need = np.maximum(target - self._blocks[seqs], 0)
        total = int(need.sum())
        if total == 0:
            return 0
        try:
            ids = self._new_page_ids(total)
        except PagePoolExhausted as exc:
            short = seqs[need > 0]
            raise PagePoolExhausted(
                f"{what}: sequences {short.tolist()[:16]} need {need[need > 0].tolist()[:16]} more pages "
                f"({total} in all) and the pool cannot hold them ({exc}); nothing changed: free sequences "
                f"(or build the cache with a larger max_pages) and retry"
            ) from None
        if self.is_gpu:
            self._store_block_ids(seqs, need, ids)
        else:
            owner, column = _ranges(self._blocks[seqs], need)
            self._block_table[seqs[owner], column] = ids
        self._blocks[seqs] += need
        self._version += 1
        return total

    def _store_block_ids(self, seqs: np.ndarray, need: np.ndarray, ids: Any) -> None:
        """GPU: write ``ids`` (device int32, ``need.sum()`` of them) into the next ``need[i]`` blocks of each
        ``seqs[i]``: one pinned host-to-device copy of the rows and one launch (``store_block_ids``), as a
        decode step's page reservation is on its host path."""
        cp = self._xp
        grow = need > 0
        rows = seqs[grow]
        B = rows.shape[0]
        words = 3 * B + 1
        if self._grow_meta is None or self._grow_meta[0].shape[0] < words:
            from cupyx import empty_pinned  # noqa: PLC0415 (CuPy loads on first use)

            size = max(words, 64)
            self._grow_meta = (empty_pinned(size, dtype=np.int32), cp.empty(size, dtype=np.int32),
                               cp.cuda.Event(block=False, disable_timing=True))
        host, dev, copied = self._grow_meta
        # The previous reservation's copy from the staging buffer: long done in a decode loop (DecodeStep reserves
        # 256 tokens ahead); a chunked prefill reserves every chunk, so there the host runs at most one chunk's
        # reservation ahead of the GPU, which leaves it a chunk of launches (every layer's) to queue meanwhile.
        copied.synchronize()
        host[:B] = rows
        host[B : 2 * B] = self._blocks[rows]
        host[2 * B] = 0
        np.cumsum(need[grow], out=host[2 * B + 1 : words])
        stream = cp.cuda.get_current_stream()
        cp.cuda.runtime.memcpyAsync(dev.data.ptr, host.ctypes.data, words * 4, 1, stream.ptr)  # 1: host to device
        copied.record(stream)
        # Bound once per (batch size, buffers): a reservation is on a decode step's host path, and CuPy's
        # generic launch converts every argument on every call.
        key = (B, dev.data.ptr, ids.data.ptr)
        store = self._block_id_stores.get(key)
        if store is None:
            if len(self._block_id_stores) >= 64:
                self._block_id_stores.clear()
            store = self._block_id_stores[key] = kernels.BoundLaunch(
                kernels.get_kernel(APPEND_SOURCE, "store_block_ids"), B, 128, 0,
                (self._block_table, np.int32(self._max_blocks), dev, np.int32(B), ids))
        store.launch(stream.ptr)

    def _store_tokens(self, layer: int, meta: np.ndarray, device_meta: Any, k: Any, v: Any) -> None:
        """Token row ``j`` of ``k`` / ``v`` is position ``meta[j, 1]`` of sequence ``meta[j, 0]``: write its codes
        into its block and, where ``meta[j, 3]``, its exact rows into ring slot ``position % ring_slots`` (an
        exact cache: its rows into its block). ``device_meta``: ``meta`` on the cache's side."""
        if self.is_gpu:
            launch = self._append_launches.get(layer)
            append = self.append_kernel(layer)
            if launch is None:
                launch = self._append_launches[layer] = append.bind(self._append_status)
            append.point(launch, k.data.ptr, v.data.ptr, device_meta.data.ptr, meta.shape[0])
            launch.launch(self._stream.ptr)  # every device operation of the cache runs on its stream
            return
        seq, pos, in_ring = meta[:, 0], meta[:, 1].astype(np.int64), meta[:, 3].astype(bool)
        P, S = self._P, self._S
        self._non_finite_seen |= not (np.isfinite(k).all() and np.isfinite(v).all())
        row = pos % P
        pages = self._block_table[seq, pos // P]
        if self._M is None:  # an exact cache
            self.k_pages(layer)[pages, :, row] = k
            self.v_pages(layer)[pages, :, row] = v
            return
        kc = k_chunk(self._M)
        for x, centroids, ring, kind in ((k, self.key_centroids(layer), self._ring_k, 0),
                                         (v, self.value_centroids(layer), self._ring_v, 1)):
            codes = encode(x, centroids)  # (T, nh_k, M), the float64 reference on the CPU
            if kind == 0:
                stored = permute_k_rows(codes, row[:, None]).reshape(*codes.shape[:2], -1, kc)
                self.k_codes(layer)[pages, :, :, row, :] = stored
            else:
                self.v_codes(layer)[pages, :, row // V_BLOCK_TOKENS, :, row % V_BLOCK_TOKENS] = codes
            ring[layer][seq[in_ring], :, pos[in_ring] % S] = x[in_ring]

    def append_kernel(self, layer: int) -> AppendKernel:
        """The append kernel bound to ``layer``'s storage (GPU path; built once per layer): ``append_tokens``, or
        ``append_exact_tokens`` for an exact cache."""
        append = self._append_kernels.get(layer)
        if append is None:
            if not self.is_gpu:
                raise UnsupportedConfiguration("append_kernel: the append kernel needs a GPU cache (device='cuda')")
            layer = self.check_layer(layer)
            M = self._M
            if M is None:  # an exact cache
                self._append_kernels[layer] = self._exact_append_kernel(layer)
                return self._append_kernels[layer]
            xp = self._xp
            kc, vc = xp.ascontiguousarray(self.key_centroids(layer)), xp.ascontiguousarray(self.value_centroids(layer))
            flat = self._pool.reshape(-1)
            Hc = int(kc.shape[0])
            append = self._append_kernels[layer] = AppendKernel(
                kernel=kernels.get_kernel(APPEND_SOURCE, append_kernel_name(self._d // M, self._dtype_name)),
                grid_x=2 * Hc * M,
                rows_per_token=self._nh_k // Hc,
                storage=(self._ring_k[layer], self._ring_v[layer], flat[self.code_offset(layer, 0):],
                         flat[self.code_offset(layer, 1):], np.int64(self._page_nbytes), kc, vc, self._block_table,
                         np.int32(self._max_blocks)),
                geometry=(np.int32(self._nh_k), np.int32(M), np.int32(Hc), np.int32(self._S),
                          np.int32(self._P.bit_length() - 1)),
                slot_gen=self._slot_gen_dev,
            )
        return append

    def _exact_append_kernel(self, layer: int) -> AppendKernel:
        k_pages, v_pages = self.k_pages(layer), self.v_pages(layer)
        return AppendKernel(
            kernel=kernels.get_kernel(APPEND_SOURCE, append_kernel_name(None, self._dtype_name)),
            grid_x=2,
            rows_per_token=self._nh_k * self._d * self._dtype.itemsize // 16,
            storage=(k_pages, v_pages, np.int64(self._page_nbytes // self._dtype.itemsize), self._block_table,
                     np.int32(self._max_blocks)),
            geometry=(np.int32(self._nh_k), np.int32(self._d), np.int32(self._P.bit_length() - 1)),
            slot_gen=self._slot_gen_dev,
            exact=True,
        )

    # ------------------------------------------------------------------------------ reading

    def page_table(self, layer: int, seq_ids: Sequence[int] | np.ndarray) -> tuple[Any, Any, Any]:
        """CSR over the full PQ pages of ``layer`` for a batch: ``(indptr, indices, residual_lens)``.

        ``indices[indptr[b]:indptr[b+1]]`` are the page ids of sequence ``seq_ids[b]`` in token
        order and ``residual_lens[b]`` its residual token count; all int32, device arrays on the GPU
        path (one H2D copy of ``O(B)`` metadata and one gather launch from the block table).
        """
        self._pq_codebooks("page_table")
        layer = self.check_layer(layer)
        seqs = self.check_ids(seq_ids, "page_table", unique=False)
        B = seqs.shape[0]
        n = self._lens[layer, seqs]
        pages = self._full_pages(n)
        indptr = np.zeros(B + 1, dtype=np.int32)
        np.cumsum(pages, out=indptr[1:])
        residual_lens = (n - self._P * pages).astype(np.int32)
        if not self.is_gpu:
            owner, column = _ranges(np.zeros(B, dtype=np.int64), pages)
            return indptr, self._block_table[seqs[owner], column], residual_lens
        cp = self._xp
        with self._on_stream():
            meta = cp.asarray(np.concatenate([seqs.astype(np.int32), indptr, residual_lens]))
            indices = cp.empty(int(indptr[-1]), dtype=np.int32)
            if indices.shape[0]:
                kernel = kernels.get_kernel(APPEND_SOURCE, "gather_page_table")
                kernel(
                    (B,), (128,),
                    (self._block_table, np.int32(self._max_blocks), meta, np.int32(B), indices),
                )
        return meta[B : 2 * B + 1], indices, meta[2 * B + 1 :]

    def dequantize(self, layer: int, seq: int) -> tuple[np.ndarray, np.ndarray]:
        """Host float32 ``(k, v)``, each ``(L, nh_k, d)`` in token order: PQ-decoded page tokens, then
        the exact residual tokens (the reference view of what decode attends to; an exact cache: its pages)."""
        layer = self.check_layer(layer)
        seq = self.check_ids(seq, "dequantize")[0]
        n = int(self._lens[layer, seq])
        books = self._codebooks
        if books is None:  # an exact cache
            with self._on_stream():
                ids = self._block_table[seq, : -(-n // self._P)]
                k, v = (  # (blocks, nh_k, P, d) -> token order
                    to_numpy(pages[ids].transpose(0, 2, 1, 3).reshape(-1, self._nh_k, self._d)[:n]).astype(np.float32)
                    for pages in (self.k_pages(layer), self.v_pages(layer)))
                return k, v
        pages = int(self._full_pages(n))
        paged = pages * self._P
        slots = np.arange(paged, n) % self._S
        with self._on_stream():
            ids = self._block_table[seq, :pages]
            k_codes, v_codes = (
                c.transpose(0, 2, 1, 3).reshape(paged, self._nh_k, books.M)
                for c in unpack_pages(self.k_codes(layer)[ids], self.v_codes(layer)[ids])
            )
            out = []
            for codebooks, codes, ring in (
                (books.key_codebooks(layer), k_codes, self._ring_k),
                (books.value_codebooks(layer), v_codes, self._ring_v),
            ):
                residual = ring[layer, seq][:, self._to_device(slots)[0]].transpose(1, 0, 2)
                out.append(
                    np.concatenate([to_numpy(self._decode(codebooks, codes)), to_numpy(residual).astype(np.float32)])
                )
        return out[0], out[1]

    def _decode(self, codebooks: tuple[Codebook, ...], codes: Any) -> Any:
        """Float32 vectors ``(T, nh_k, d)`` of codes ``(T, nh_k, M)`` (shared or per-head codebooks)."""
        if len(codebooks) == 1:
            return codebooks[0].decode(codes).astype(np.float32)
        return self._xp.stack([cb.decode(codes[:, h]) for h, cb in enumerate(codebooks)], axis=1).astype(np.float32)

    def stats(self) -> dict[str, Any]:
        """Memory accounting.

        Keys: the allocator's page counters (``total``, ``used``, ``free``, ``high_water``, ``allocs``,
        ``frees``, ``failed``); ``page_nbytes``; ``bytes_per_token`` (PQ code bytes per token over
        all layers, kinds and heads: ``2 * M * nh_k * num_layers``), ``fp16_bytes_per_token``
        (``2 * 2 * d * nh_k * num_layers``) and ``compression_ratio`` (fp16 / PQ);
        (an exact cache: its own bytes per token, ``compression_ratio`` 1.0 in fp16);
        ``pool_utilization``: code bytes of the tokens held in full pages, summed over sequences,
        over the bytes of allocated pages (reserved blocks and the blocks still being filled under the
        residual window lower it; pages shared by :meth:`fork` count once in the denominator and once per
        sequence in the numerator, so it can exceed 1; 0.0 with no page allocated);
        ``residual_bytes_reserved`` (both rings, all slots) and ``residual_bytes_in_use`` (residual tokens of
        live sequences); ``flushes`` (blocks that became full pages, counted per layer);
        ``non_finite_appended`` (an unchecked append stored a NaN or inf token, see :meth:`append`);
        ``sequences``; ``tokens`` (per live sequence, the length of its longest layer, summed).
        """
        counters = self._alloc.stats()
        lens = self._lens[:, self._live]
        pages = self._full_pages(lens)
        code_bytes_per_layer_token = 2 * self._nh_k * self._token_nbytes
        exact_bytes_per_layer_token = 2 * self._nh_k * self._d * self._dtype.itemsize
        allocated = counters["used"] * self._page_nbytes
        paged_bytes = int(pages.sum()) * self._P * code_bytes_per_layer_token
        bytes_per_token = code_bytes_per_layer_token * self._num_layers
        fp16_bytes_per_token = 2 * 2 * self._d * self._nh_k * self._num_layers
        return {
            **counters,
            "page_nbytes": self._page_nbytes,
            "bytes_per_token": bytes_per_token,
            "fp16_bytes_per_token": fp16_bytes_per_token,
            "compression_ratio": fp16_bytes_per_token / bytes_per_token,
            "pool_utilization": paged_bytes / allocated if allocated else 0.0,
            "residual_bytes_reserved": int(self._ring_k.nbytes + self._ring_v.nbytes),
            "residual_bytes_in_use": int((lens - self._P * pages).sum()) * exact_bytes_per_layer_token
            if self.quantized else 0,  # an exact cache's window is in its pages
            "flushes": self._flushes,
            "non_finite_appended": self._non_finite_appended(),
            "sequences": int(self._live.sum()),
            "tokens": int(lens.max(axis=0, initial=0).sum()),
        }

    def record_non_finite(self) -> None:
        """Note that a launcher's own append kernel stored a NaN or inf token (DecodeStep does), so that
        :meth:`stats` reports it like the general append's."""
        self._non_finite_seen = True

    def _non_finite_appended(self) -> bool:
        """Whether an unchecked append stored a NaN or inf token (the append kernel's flag; CPU: a host check)."""
        status = self._append_status  # None on the CPU path
        if self._non_finite_seen or status is None:
            return self._non_finite_seen
        with self._on_stream():
            return bool(int(status.get()[0]) & APPEND_STATUS_NON_FINITE)

    def __repr__(self) -> str:
        return (
            f"PagedPQCache(num_layers={self._num_layers}, num_kv_heads={self._nh_k}, head_dim={self._d}, "
            f"{f'M={self._M}' if self.quantized else 'exact'}, page_size={self._P}, residual={self._R}, "
            f"max_rollback={self._rollback}, "
            f"num_pages={self._num_pages}, "
            f"max_seqs={self._max_seqs}, dtype={self._dtype_name}, {'gpu' if self.is_gpu else 'cpu'}, "
            f"sequences={int(self._live.sum())})"
        )

    # ---------------------------------------------------------------------------- internals

    def _full_pages(self, n: Any) -> Any:
        return full_pages(n, self._P, self._R)

    @contextlib.contextmanager
    def _on_stream(self) -> Iterator[None]:
        if self._stream is None:
            yield
            return
        with self._stream:
            yield

    def _to_device(self, *arrays: np.ndarray) -> list[Any]:
        """Host index arrays on the cache's side, in one host-to-device copy on the GPU path."""
        if not self.is_gpu:
            return list(arrays)
        flat = self._xp.asarray(np.concatenate(arrays).astype(np.int64))
        ends = np.cumsum([a.shape[0] for a in arrays])
        return [flat[end - a.shape[0] : end] for a, end in zip(arrays, ends)]

    def _new_page_ids(self, n: int) -> Any:
        """``n`` freshly allocated page ids on the cache's side (GPU: a view of a scratch buffer reused by every
        allocation, consumed in stream order before the next one overwrites it)."""
        if not self.is_gpu:
            return self._page_ids(self._alloc.alloc(n))
        scratch = self._alloc.alloc_scratch(n)
        if self._ids_scratch is None or self._ids_scratch[0] is not scratch:
            self._ids_scratch = (scratch, self._page_ids(scratch))
        return self._ids_scratch[1][:n]

    def _page_ids(self, ids: Any) -> Any:
        """Allocator ids on the cache's side: zero-copy CuPy on the GPU path, a host copy on the CPU path."""
        return self._xp.asarray(ids) if self.is_gpu else ids.copy_to_host()

    def check_layer(self, layer: int) -> int:
        """``layer`` as an int, or IndexError naming the valid range."""
        layer = _index(layer, "layer")
        if not 0 <= layer < self._num_layers:
            raise IndexError(f"layer: expected 0 <= layer < {self._num_layers}, got {layer}")
        return layer

    def check_ids(self, seq_ids: Any, what: str, *, unique: bool = True) -> np.ndarray:
        """Host int64 ids of live sequences (a scalar counts as one id); errors are reported as ``what:``, so a
        caller (decode, a step's plan) validates ids under its own name. Raises TypeError / ValueError naming
        unknown, freed or (with ``unique``) repeated ids."""
        ids = np.asarray(to_numpy(seq_ids) if is_gpu_array(seq_ids) else seq_ids)
        if ids.ndim == 0:
            ids = ids.reshape(1)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise TypeError(
                f"{what}: expected sequence ids as an int or a 1-D integer array, got {ids.dtype} of shape {ids.shape}"
            )
        ids = ids.astype(np.int64)
        # The common case in few NumPy calls (a decode step's reservation and every decode() validate here);
        # the errors below say which ids are wrong.
        listed = ids.tolist()
        if (not listed or (0 <= min(listed) and max(listed) < self._max_seqs and self._live[ids].all())) and \
                (not unique or len(set(listed)) == len(listed)):
            return ids
        unknown = ids[(ids < 0) | (ids >= self._max_seqs)]
        if unknown.size:
            raise ValueError(f"{what}: expected sequence ids in [0, {self._max_seqs}), got {unknown.tolist()}")
        dead = ids[~self._live[ids]]
        if dead.size:
            raise ValueError(
                f"{what}: sequence ids {dead.tolist()} are not live (never added or already freed); "
                f"live ids: {np.flatnonzero(self._live).tolist()[:16]}"
            )
        values, counts = np.unique(ids, return_counts=True)
        raise ValueError(f"{what}: expected distinct sequence ids, got repeats of {values[counts > 1].tolist()}")

    def _check_counts(self, counts: Any, B: int, name: str) -> np.ndarray:
        """Host int64 per-sequence token counts: None means 1 each, a scalar is broadcast."""
        if counts is None:
            return np.ones(B, dtype=np.int64)
        arr = np.asarray(to_numpy(counts) if is_gpu_array(counts) else counts)
        if arr.size and arr.dtype.kind not in "iu":
            raise TypeError(f"{name}: expected integer token counts, got dtype {arr.dtype}")
        if arr.ndim == 0:
            arr = np.full(B, arr, dtype=np.int64)
        if arr.shape != (B,):
            raise ValueError(f"{name}: expected shape ({B},) (one count per sequence), got {arr.shape}")
        arr = arr.astype(np.int64)
        if (arr < 0).any():
            raise ValueError(f"{name}: expected non-negative counts, got {arr[arr < 0].tolist()}")
        return arr

    def _exact_rows(self, x: Any, total: int) -> bool:
        """Whether ``x`` is already what the GPU append kernel reads for ``total`` tokens: a C-contiguous CuPy
        ``(total, nh_k, d)`` array of the cache dtype, 16-byte aligned."""
        return (self.is_gpu and type(x) is self._xp.ndarray and x.shape == (total, self._nh_k, self._d)
                and x.dtype == self._dtype and x.flags.c_contiguous and x.data.ptr % 16 == 0)

    def _check_tokens(self, x: Any, name: str, total: int) -> Any:
        """``x`` as a C-contiguous ``(total, nh_k, d)`` array of the cache dtype on the cache's side."""
        if self._exact_rows(x, total):
            return x  # already what the kernel reads: no conversion to look for (every layer's append)
        arr = as_array(
            x, name, ndim=3, shape=(total, self._nh_k, self._d), dtypes=INPUT_DTYPES,
            on_gpu=None if self.is_gpu else False,
        )
        with self._on_stream():
            arr = arr.astype(self._dtype, copy=False)  # before the upload for NumPy input: less to copy
            arr = self._xp.ascontiguousarray(self._xp.asarray(arr))
            if self.is_gpu and arr.data.ptr % 16:
                arr = arr.copy()  # the append kernel reads sub-vectors with aligned vector loads
            return arr

    def _check_max_len(self, seqs: np.ndarray, n: np.ndarray, what: str) -> None:
        over = n > self._max_seq_len
        if over.any():
            raise ValueError(
                f"{what}: sequences {seqs[over].tolist()} would hold {n[over].tolist()} tokens, "
                f"more than max_seq_len = {self._max_seq_len}"
            )


class AppendPlan:
    """Several new tokens per sequence, planned once for several layers (:meth:`PagedPQCache.plan_append`).

    A prefill chunk or a verification step appends the same positions to every layer: the plan holds their
    metadata on the device and their blocks reserved, so that :meth:`append` per layer is one launch of the
    append kernel (encode, page store and ring copy, flushes included). Attributes (host, read-only):
    ``seq_ids`` (int64 ``(B,)``), ``lengths`` (new tokens per sequence), ``start`` / ``end`` (tokens each
    sequence holds before / after), ``tokens`` (``lengths.sum()``), ``layers`` (planned) and ``layers_left``
    (not appended yet).

    Example (a chunk of ``c`` tokens per sequence, then its attention, layer by layer)::

        plan = cache.plan_append(seq_ids, c)
        for layer in range(num_layers):
            plan.append(layer, k[layer], v[layer])      # (B * c, nh_k, d), sequence-major
            out = prefill.run(layer, q[layer])           # BatchPrefillWrapper planned for the same tokens

    CUDA graphs: appends of a plan made with ``plan_append(..., into=buffer)`` can be captured on the cache's
    stream. Each later step then plans the same counts into the same buffer, calls :meth:`commit` (the replay
    writes the tokens; the host counts them now) and replays the graph. ``fixed``: the plan was made with
    ``into``; ``captured_layers``: the layers whose append was captured (a set).
    """

    def __init__(self, cache: PagedPQCache, seq_ids: np.ndarray, lengths: np.ndarray, start: np.ndarray,
                 end: np.ndarray, flushed: int, layers: list[int], generations: np.ndarray, meta: np.ndarray,
                 device_meta: Any, *, fixed: bool = False):
        self._cache = cache
        self.seq_ids, self.lengths, self.start, self.end = seq_ids, lengths, start, end
        self.flushed = flushed  # blocks that become full pages in each layer
        self.version = cache.version  # the cache's version when the plan last looked: unchanged, nothing to check
        self.tokens = int(lengths.sum())
        self.layers = tuple(layers)
        self.layers_left = set(layers)
        self.generations = generations
        self.meta, self.device_meta = meta, device_meta
        self.fixed = fixed
        self.captured_layers: set[int] = set()
        for a in (seq_ids, lengths, start, end, generations, meta):
            a.flags.writeable = False

    def append(self, layer: int, k: Any, v: Any) -> None:
        """Write the planned tokens of ``layer``: ``k``, ``v`` ``(tokens, nh_k, head_dim)``, the tokens of
        ``seq_ids[0]`` first (as :meth:`PagedPQCache.append` takes them). C-contiguous CuPy arrays of the cache
        dtype are used as they are; other input is converted as by :meth:`PagedPQCache.append`.

        No host check of the values: a NaN or inf token is stored and flagged on the device, and
        ``cache.stats()["non_finite_appended"]`` reports it, as for one-token appends
        (``cache.append(..., check_finite=True)`` refuses such tokens instead, at one device sync per call).

        Raises:
            MillionError: ``layer`` was appended already or is not planned, or the cache changed since the plan
                (a listed sequence was freed, truncated or appended otherwise in this layer); nothing written.
            ValueError / TypeError: ``k`` or ``v`` of another shape or dtype; nothing written.
        """
        self._cache._append_planned(self, layer, k, v)

    def commit(self, layers: Sequence[int] | None = None) -> None:
        """Count the planned tokens as appended in ``layers`` (default: every layer left) without writing them:
        for appends that a CUDA graph replays, captured from :meth:`append` calls of an earlier plan made into the
        same ``into`` buffer with the same counts. Replay the graph before the cache is read otherwise (attention
        over these layers would read tokens not written yet).

        Raises:
            MillionError: a layer was appended or committed already or is not planned, or the cache changed since
                the plan; nothing counted.
        """
        self._cache._commit_planned(self, layers)

    def __repr__(self) -> str:
        return (f"AppendPlan(sequences={self.seq_ids.shape[0]}, tokens={self.tokens}, layers={len(self.layers)}, "
                f"left={len(self.layers_left)})")
