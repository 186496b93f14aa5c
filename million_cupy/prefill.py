"""Several new query tokens per sequence over a PagedPQCache: speculative verification, chunked prefill,
multi-turn prompts.

The new tokens are appended to the cache first (``PagedPQCache.append`` takes any count per sequence, flushes
included). New token ``j`` of the ``c_b`` of sequence ``b`` then attends causally to the first
``n_b - c_b + j + 1`` tokens of the sequence (``n_b`` its length after the append): PQ pages and the exact
residual window as the cache holds them after the append, so a token that became part of a full page in the
same call is read through its codes by every query, as later decode steps read it.

* :class:`BatchPrefillWrapper` — plan once per batch of new tokens (``qo_indptr``, FlashInfer's CSR of query
  tokens per sequence), run once per layer; no synchronisation, launches on a fixed grid from device metadata
  (capturable in a CUDA graph for a fixed ``qo_indptr``).
* :func:`prefill_attention` — the one-call form; on a CPU cache it computes the float64 reference
  (:func:`million_cupy.reference.causal_attention`).

Regime (the documented rule): every query token is one work item of the decode kernel, LUT-scored and cut at
its causal length, so a batch of ``N`` query tokens costs about ``N`` one-token decodes. Chunks of at most
:data:`LUT_QUERIES_MAX` tokens per sequence (speculative verification) are what this path is for. Longer chunks
run the same way, counted in ``stats()["long_chunk_queries"]`` with a warning once per wrapper: the kernels
that share code loads between a sequence's queries and the tensor-core path for long chunks are not built yet.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Sequence

import numpy as np

from . import reference
from .decode import AttentionPlan, attention_arrays, capacity_for, require_native_attention, softmax_scale
from .errors import MillionError
from .interop import as_array, as_stream, cupy, dtype_name, is_gpu_array, to_numpy
from .layout import full_pages

__all__ = ["BatchPrefillWrapper", "prefill_attention", "LUT_QUERIES_MAX"]

#: Query tokens per sequence the LUT path is meant for (speculative verification); longer chunks are counted.
LUT_QUERIES_MAX = 16


def _indptr(qo_indptr: Any, B: int) -> np.ndarray:
    """Host int64 CSR offsets of ``B`` sequences' query tokens, checked."""
    ind = np.asarray(to_numpy(qo_indptr) if is_gpu_array(qo_indptr) else qo_indptr)
    if ind.ndim != 1 or ind.shape[0] != B + 1 or (ind.size and ind.dtype.kind not in "iu"):
        raise ValueError(f"qo_indptr: expected {B + 1} integer offsets (one more than the sequences), got "
                         f"{ind.dtype} of shape {ind.shape}")
    ind = ind.astype(np.int64)
    if ind[0] != 0 or (np.diff(ind) < 0).any() or ind[-1] == 0:
        raise ValueError(f"qo_indptr: expected non-decreasing offsets from 0 with at least one query token, got "
                         f"{ind.tolist()[:16]}")
    return ind


def causal_lengths(n_final: np.ndarray, counts: np.ndarray, page_size: int, residual: int) -> tuple[np.ndarray, ...]:
    """Per query token (in CSR order): ``(sequence index, tokens in pages, residual tokens)`` it attends to, for
    sequences holding ``n_final`` tokens after the append of their ``counts`` new tokens (the flush rule of
    the final state, ``layout.full_pages``; a query before the last flush point reads a prefix of the pages)."""
    owner = np.repeat(np.arange(counts.shape[0]), counts)
    first = np.cumsum(counts) - counts
    j = np.arange(owner.shape[0], dtype=np.int64) - first[owner]
    attended = n_final[owner] - counts[owner] + j + 1
    pages = (full_pages(n_final, page_size, residual) * page_size)[owner]
    main = np.minimum(pages, attended)
    return owner, main, attended - main


class BatchPrefillWrapper:
    """Attention of several new tokens per sequence over a GPU :class:`~million_cupy.cache.PagedPQCache`
    (FlashInfer's ``BatchPrefillWithPagedKVCacheWrapper`` shape, causal).

    >>> wrapper = BatchPrefillWrapper(cache, num_heads=32)
    >>> wrapper.plan(seq_ids, qo_indptr)              # before the appends of the new tokens
    >>> for layer in range(cache.num_layers):
    ...     cache.append(layer, seq_ids, k, v, lengths=np.diff(qo_indptr))
    ...     out = wrapper.run(layer, q)               # q, out (qo_indptr[-1], num_heads, head_dim)

    Args:
        cache: the cache (``device="cuda"``; on a CPU cache use :func:`prefill_attention`).
        num_heads: query heads (a multiple of the cache's kv heads).
        scale: softmax scale (default ``1 / sqrt(head_dim)``).
        stream: a CuPy stream or raw handle for every launch; None = the current stream at ``plan``.
    """

    def __init__(self, cache, num_heads: int, *, scale: float | None = None, stream: Any = None) -> None:
        require_native_attention(cache, num_heads, "BatchPrefillWrapper", "million_cupy.prefill_attention()")
        self.cache = cache
        self.num_heads = num_heads
        self._scale = scale
        self._stream = stream
        self._attn: AttentionPlan | None = None
        self._seq: np.ndarray | None = None
        self._n: np.ndarray | None = None  # each sequence's length when run() is called
        self._layers: set[int] = set()
        self._q_shape = (0, num_heads, cache.head_dim)
        self._warned_long = False
        self._stats = {"plans": 0, "runs": 0, "query_tokens": 0, "long_chunk_queries": 0}

    @property
    def scale(self) -> float:
        """The softmax scale of the attention."""
        return softmax_scale(self.cache, self._scale)

    def plan(self, seq_ids: Sequence[int] | np.ndarray, qo_indptr: Any, *, appended: bool = False,
             layers: Sequence[int] | None = None) -> None:
        """Schedule attention of ``qo_indptr[b+1] - qo_indptr[b]`` new tokens of each ``seq_ids[b]``.

        ``appended=False`` (default): the new tokens will be appended to every planned layer before
        ``run(layer)``; ``True``: the planned layers already hold them. ``layers``: the layers ``run`` will be
        called for (default all; they must hold equal lengths). Raises ValueError for unknown or repeated ids,
        bad offsets, more new tokens than a sequence holds, or layers of unequal lengths.
        """
        cache = self.cache
        seq = cache.check_ids(seq_ids, "plan")
        ind = _indptr(qo_indptr, seq.shape[0])
        counts = np.diff(ind)
        planned = list(range(cache.num_layers)) if layers is None else [cache.check_layer(x) for x in layers]
        if not planned:
            raise ValueError("plan: layers is empty")
        lens = cache.lengths[planned][:, seq]
        unequal = np.flatnonzero((lens != lens[0]).any(axis=0))
        if unequal.size:
            b = int(unequal[0])
            raise ValueError(f"plan: sequence {int(seq[b])} holds {lens[:, b].tolist()} tokens in layers {planned}; "
                             f"plan layers that hold equal lengths (layers=[...])")
        n = lens[0] + (0 if appended else counts)
        if (counts > n).any():
            b = int(np.flatnonzero(counts > n)[0])
            raise ValueError(f"plan: sequence {int(seq[b])} has {int(counts[b])} new tokens but will hold only "
                             f"{int(n[b])} (with appended=True the cache must already hold them)")
        over = n > cache.max_seq_len
        if over.any():
            raise ValueError(f"plan: sequences {seq[over].tolist()} would hold {n[over].tolist()} tokens, more "
                             f"than max_seq_len = {cache.max_seq_len}")
        owner, main, res = causal_lengths(n, counts, cache.page_size, cache.residual)
        N = owner.shape[0]
        attn = self._attn
        if attn is None or attn.capacity < N:
            attn = self._attn = AttentionPlan(cache, self.num_heads, capacity_for(N), scale=self._scale)
        items = seq[owner]  # each query token is a work item over its sequence's pages and ring
        if not attn.covers(items, main):
            attn.schedule(items, main)
        attn.update(items, main.astype(np.int32), res.astype(np.int32), as_stream(self._stream))
        long = int(counts[counts > LUT_QUERIES_MAX].sum())
        if long and not self._warned_long:
            warnings.warn(f"BatchPrefillWrapper: {long} query tokens belong to chunks longer than "
                          f"{LUT_QUERIES_MAX} per sequence; they run the per-token LUT path, whose cost grows "
                          f"with the query count (the long-chunk tensor-core path is not built)",
                          RuntimeWarning, stacklevel=2)
            self._warned_long = True
        self._seq, self._n, self._layers = seq, n, set(planned)
        self._q_shape = (N, self.num_heads, cache.head_dim)
        self._stats["plans"] += 1
        self._stats["query_tokens"] += N
        self._stats["long_chunk_queries"] += long

    def run(self, layer: int, q: Any, *, out: Any = None, lse: Any = None, return_lse: bool = False):
        """Attention of the planned query tokens ``q`` ``(N, num_heads, head_dim)`` (CSR order, the cache dtype)
        over ``layer``. Returns ``out`` (``(N, num_heads, head_dim)``), or ``(out, lse)`` with ``return_lse`` or a
        given ``lse`` (float32 ``(N, num_heads)``, natural log). Raises MillionError when the layer does not
        hold the planned lengths (append the new tokens first)."""
        attn = self._attn
        if attn is None:
            raise MillionError("run() before plan(): call plan(seq_ids, qo_indptr) first")
        cache = self.cache
        layer = cache.check_layer(layer)
        if layer not in self._layers:
            raise MillionError(f"layer {layer} is not in this plan (planned: {sorted(self._layers)})")
        held = cache.lengths[layer, self._seq]
        if not np.array_equal(held, self._n):
            b = int(np.flatnonzero(held != self._n)[0])
            raise MillionError(f"layer {layer}: the plan expects sequence {int(self._seq[b])} to hold "
                               f"{int(self._n[b])} tokens, it holds {int(held[b])} (append the new tokens to this "
                               f"layer before run, or plan again)")
        q, out, lse = attention_arrays(q, out, lse, return_lse, self._q_shape, cache.array_dtype)
        attn.attend(layer, q, out, lse, as_stream(self._stream).ptr)
        self._stats["runs"] += 1
        return (out, lse) if (return_lse or lse is not None) else out

    def stats(self) -> dict[str, int]:
        """Counters: ``plans``, ``runs``, ``query_tokens`` planned, ``long_chunk_queries`` (query tokens of
        chunks longer than LUT_QUERIES_MAX, which run the per-token LUT path; warned once)."""
        return dict(self._stats)


# One wrapper per (cache, stream, num_heads) for prefill_attention().
_wrappers: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def prefill_attention(cache, layer: int, seq_ids: Sequence[int], q: Any, qo_indptr: Any, *,
                      scale: float | None = None, return_lse: bool = False, out: Any = None, stream: Any = None):
    """Causal attention of new tokens already appended to ``cache`` (plan + run in one call).

    ``q`` ``(N, nh, d)`` holds sequence ``seq_ids[b]``'s new tokens in rows ``qo_indptr[b]:qo_indptr[b+1]``; they
    are that sequence's last tokens in layer ``layer``. GPU cache: the native kernels through a
    :class:`BatchPrefillWrapper`. CPU cache: the float64 reference over the dequantized cache, in q's dtype.
    Returns ``out`` or ``(out, lse)``.
    """
    if cache.is_gpu:
        q_arr = as_array(q, "q", ndim=3, on_gpu=True)
        if q_arr.dtype != cache.array_dtype:
            raise TypeError(f"q: expected dtype {cache.dtype}, got {dtype_name(q_arr.dtype)}")
        per_cache = _wrappers.get(cache)
        if per_cache is None:
            per_cache = _wrappers[cache] = {}
        key = (as_stream(stream).ptr, q_arr.shape[1], scale)
        wrapper = per_cache.get(key)
        if wrapper is None:
            wrapper = per_cache[key] = BatchPrefillWrapper(cache, q_arr.shape[1], scale=scale, stream=stream)
        wrapper.plan(seq_ids, qo_indptr, appended=True, layers=[layer])
        return wrapper.run(layer, q_arr, out=out, return_lse=return_lse)
    q_arr = as_array(q, "q", ndim=3, dtypes=("float16", "bfloat16", "float32", "float64"), on_gpu=False)
    seq = cache.check_ids(seq_ids, "prefill_attention")
    layer = cache.check_layer(layer)
    ind = _indptr(qo_indptr, seq.shape[0])
    if q_arr.shape[0] != ind[-1] or q_arr.shape[2] != cache.head_dim or q_arr.shape[1] % cache.num_kv_heads:
        raise ValueError(f"q: expected shape ({int(ind[-1])}, num_heads, {cache.head_dim}) with num_heads a multiple "
                         f"of num_kv_heads = {cache.num_kv_heads}, got {tuple(q_arr.shape)}")
    ks, vs = zip(*(cache.dequantize(layer, int(s)) for s in seq))
    o, l = reference.causal_attention(q_arr.astype(np.float64), list(ks), list(vs), ind, scale=scale)
    o = o.astype(q_arr.dtype)
    if out is not None:
        np.copyto(out, o)
        o = out
    return (o, l.astype(np.float32)) if return_lse else o
