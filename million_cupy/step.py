"""DecodeStep: a whole decode step (append + attention in every layer) at the speed of its kernels.

A decode loop appends one token per sequence to every layer and attends over it. Everything such a
step needs is known before its first layer runs: the ring slot and block of every new token, which
sequences flush, the attention schedule. :meth:`DecodeStep.plan` computes it once per step on the host
(O(1) NumPy calls in the steady state, no allocation), reserves pages ahead for many steps in one
allocator call, and sends the metadata to the device in ONE copy into buffers at fixed addresses (in a
running loop: only the words that change per step, from pinned slots used in turn, with no event call). Per
layer, :meth:`DecodeStep.append` and :meth:`DecodeStep.run` are then one bound kernel launch each, with no
index math, allocation, synchronisation or argument conversion. ``run(layer, q, out=o, k=k, v=v)`` appends and
attends in one call: once a layer's four arrays repeat, its two kernels are replayed from a per-layer CUDA graph
captured on the spot, one ``cudaGraphLaunch`` (1.5 us of host time) instead of two kernel launches (3.6-6.8 us
each on the H200 hosts), so an eager layer costs 2.2-4.5 us of host time instead of 7.5-12.4 (bench step).

A flush costs nothing here: every token's codes are written when it is appended (``append_tokens`` in
``cuda_src/cache_append.cu``: nearest-centroid encode, page store and ring copy in one launch), so a
block turning into a full page is only a change of the lengths in the metadata.

CUDA graphs. The launches of a step read only the step's device buffers, the cache's storage and the
caller's q / k / v / out arrays, so a caller can capture a whole step (their own projections and our
append + run for every layer) once and replay it for many steps::

    step = DecodeStep(cache, num_heads=32)
    step.plan(seq_ids)                       # step 0
    stream.begin_capture()                   # the step's stream (DecodeStep.stream)
    for layer in range(L):
        ...                                  # projections into the fixed q / k / v buffers
        step.append(layer, k[layer], v[layer])
        step.run(layer, q[layer], out=o[layer])
    graph = stream.end_capture()
    graph.launch(stream)                     # step 0 (capture does not run the kernels)
    for _ in range(steps):
        step.plan(seq_ids)                   # cheap: rewrites the device metadata
        graph.launch(stream)

Per-layer graphs are part of the eager path and follow from the same rules: they are captured only from
C-contiguous CuPy arrays (the objects themselves are kept alive with the graph), never while the step's stream
is being captured (a caller capturing a whole step records the two kernels as before), and they are dropped
when the step's buffers are re-made (another batch size or capacity). On the legacy default stream, which
cannot be captured, the call takes two launches, counted and warned about once.

The contract: replay on the step's stream (the cache's: build the cache on a capturable stream), with the buffers that were captured, after ``plan()`` for the
same batch (the same sequence ids in the same order). A batch of another size needs another capture
(its q / k / v buffers differ anyway); the step keeps its device buffers while batches fit its capacity.
``plan()`` counts the step's tokens in the cache's lengths at once: between two plans, the step's
appends must run for every layer (eagerly or by one replay) before the cache is read otherwise.

Misuse is caught, never written through: a replay after the batch changed without a new ``plan()``
(a sequence freed, or its slot reused by another sequence) is detected on the device, where the
append kernel compares each slot's generation and skips the token, so no other sequence's pages or ring
are touched; the flag (in pinned host memory, written by the kernel) raises
:class:`~million_cupy.errors.MillionError` at the first ``plan()`` after that launch has run (no synchronisation
of its own) or at :meth:`DecodeStep.check`. An eager step that appended only some layers raises at the next
``plan()``; ``run(layer)`` before ``append(layer)`` raises at once.
"""

from __future__ import annotations

import ctypes
import warnings
from typing import Any, Sequence

import numpy as np

from . import kernels
from .cache import (APPEND_STATUS_NO_PAGE, APPEND_STATUS_NON_FINITE, APPEND_STATUS_STALE_SLOT, APPEND_THREADS,
                    PagedPQCache)
from .decode import (SCHEDULE_HORIZON, AttentionPlan, attention_arrays, capacity_for, check_scale,
                     require_native_attention, softmax_scale)
from .errors import MillionError
from .layout import full_pages
from .interop import as_array, cupy

__all__ = ["DecodeStep", "StepLengths"]

# What a layer's launch was last bound to, before any call: no caller's array is this object.
_UNBOUND = (object(), object())


class StepLengths:
    """The token counts of a decode step's batch, advanced one token per step in O(1) NumPy calls.

    After a step of ``new_tokens`` (0 or 1) tokens for sequences holding ``n`` tokens: ``pos`` is each
    sequence's planned token position (``n``; written into the array given, the append kernel's position words),
    ``main`` / ``res`` its tokens in full pages / in the residual window after the step (the flush rule,
    ``layout.full_pages``), ``flushed`` the blocks the step turns into full pages (per layer), and
    ``steps_left`` how many further one-token steps stay within ``limit`` tokens (the reserved pages).
    :meth:`advance` moves to the next one-token step; only when a window fills (``to_flush`` reaching 0) does it
    look at every sequence. ``main`` / ``res``: int32 arrays of the batch's size to keep those counts in (views of
    a plan's :attr:`~million_cupy.decode.AttentionPlan.step_words`, so that they need no copy of their own);
    None: new arrays.
    """

    def __init__(self, pos: np.ndarray, n: np.ndarray, new_tokens: int, page_size: int, residual: int,
                 limit: np.ndarray, *, main: np.ndarray | None = None, res: np.ndarray | None = None) -> None:
        self.P, self.R = page_size, residual
        end = n + new_tokens
        in_pages = full_pages(end, page_size, residual) * page_size
        pos[:] = n
        self.pos = pos
        self.main = np.empty(n.shape, np.int32) if main is None else main
        self.res = np.empty(n.shape, np.int32) if res is None else res
        self.main[:] = in_pages
        self.res[:] = end - in_pages
        self.flushed = int((full_pages(end, page_size, residual) - full_pages(n, page_size, residual)).sum())
        self.to_flush = int((residual - self.res).min())  # steps until some window holds R tokens
        self.steps_left = int((limit - end).min()) if new_tokens else 0

    def extend(self, limit: np.ndarray) -> None:
        """The reserved pages now hold ``limit`` tokens per sequence (after :meth:`advance` to this step)."""
        self.steps_left = int((limit - self.pos - 1).min())

    def advance(self) -> None:
        """One more token in every sequence."""
        self.pos += 1
        self.res += 1
        self.steps_left -= 1
        self.flushed = 0
        self.to_flush -= 1
        if self.to_flush == 0:
            full = self.res >= self.R  # a window reached R tokens: its oldest P become a full page
            self.main[full] += self.P
            self.res[full] -= self.P
            self.flushed = int(full.sum())
            self.to_flush = int((self.R - self.res).min())


class DecodeStep:
    """One decode step of a batch over every layer of a GPU :class:`~million_cupy.cache.PagedPQCache`.

    Args:
        cache: the cache (``device="cuda"``).
        num_heads: query heads ``nh`` (a multiple of the cache's kv heads).
        max_batch: sequences the step's device buffers hold (default: the first batch, rounded up to a
            power of two); a larger batch later re-makes them (and needs a new graph capture).
        horizon: tokens of look-ahead: pages are reserved, and the attention schedule made, for this many
            tokens beyond each sequence's length, so that ``plan`` calls the allocator and the scheduler
            only once per ``horizon`` steps.
        scale: softmax scale (default ``1 / sqrt(head_dim)``).

    Every launch and copy runs on the cache's stream (:attr:`stream`), so the step is ordered with all of
    the cache's other work; to capture steps in a CUDA graph, build the cache on a stream that can be
    captured (``PagedPQCache(..., stream=cupy.cuda.Stream(non_blocking=True))``), not the legacy default.

    Raises:
        UnsupportedConfiguration: a CPU cache (use :func:`million_cupy.decode`, which computes the float64
            reference there) or a configuration without a native kernel.
    """

    def __init__(self, cache: PagedPQCache, num_heads: int, *, max_batch: int | None = None,
                 horizon: int = SCHEDULE_HORIZON, scale: float | None = None) -> None:
        if not isinstance(cache, PagedPQCache):
            raise TypeError(f"cache: expected a PagedPQCache, got {type(cache).__name__}")
        require_native_attention(cache, num_heads, "DecodeStep", "cache.append and million_cupy.decode()")
        if horizon < 1:
            raise ValueError(f"horizon: expected a positive number of tokens, got {horizon}")
        self.cache = cache
        self.num_heads = num_heads
        self.horizon = int(horizon)
        self._max_batch = max_batch
        check_scale(scale)
        self._scale = scale
        self.stream = cache.stream
        self._attn: AttentionPlan | None = None
        self._seq: np.ndarray | None = None
        self._seq_list: list[int] | None = None  # the same ids, for a cheap comparison with a caller's list
        # The append kernel's per-token words (slot, pos, gen, 1) and the lengths below are views of the attention
        # plan's step words: a plan stages all of them with one copy.
        self._tok: np.ndarray | None = None
        self._lengths: StepLengths | None = None  # the batch's token counts, advanced step by step
        self._window: np.ndarray | None = None  # capacities reserved by the last plan: the next one schedules them
        self._rows: Any = None                 # the batch's slots: a slice when they are consecutive
        self._new = 0
        self._version = -1                     # cache.version right after this step's commit
        self._appended = bytearray(cache.num_layers)  # per layer: appended this step (a bytearray: the hot path)
        self._appended_count = 0
        self._appends: list[kernels.BoundLaunch] = []
        self._runs: list[kernels.BoundLaunch] = []   # per layer: the attention launch of the cache dtype
        # Per layer, the caller's (k, v) and (q, out) CuPy arrays its launches point at: a call with the same
        # objects skips every check (a CuPy array's address, size and dtype cannot change).
        self._append_inputs: list[tuple] = []
        self._run_inputs: list[tuple] = []
        self._appends_for = -1                 # batch size the append launches are bound for
        # Per layer: (k, v, q, out, graph) of run(..., k=, v=)'s per-layer CUDA graph (append + attention), and the
        # four arrays of that layer's last such call (a graph is captured when they repeat).
        self._layer_graphs: dict[int, tuple] = {}
        self._layer_last: dict[int, tuple] = {}
        cp = cupy()
        self._is_capturing = cp.cuda.runtime.streamIsCapturing
        from cupyx import empty_pinned  # noqa: PLC0415 (CuPy loads on first use)

        # The append kernel's guard flags live in pinned host memory, which the kernel writes directly, so plan()
        # reads them with no copy: a flag set by a launch that has run shows at the next plan. One byte per flag,
        # plain stores (cuda_src/cache_append.cu), since device atomics on host memory are not guaranteed atomic.
        self._status_host = empty_pinned(4, dtype=np.uint8)  # owns the memory
        self._status_host[:] = 0
        host_at = self._status_host.ctypes.data
        # Read through ctypes: a NumPy scalar read costs more than the whole check.
        self._status_word = ctypes.c_int32.from_address(host_at)
        # The kernels' address of the word (under unified addressing, the host address itself).
        self._status_at = cp.cuda.runtime.pointerGetAttributes(host_at).devicePointer
        self._np_dtype = cache.array_dtype
        self._ndarray = cp.ndarray
        self._stream_ptr = int(self.stream.ptr)
        self._kv_shape: tuple[int, int, int] = (0, cache.num_kv_heads, cache.head_dim)
        self._q_shape: tuple[int, int, int] = (0, num_heads, cache.head_dim)
        # The legacy default stream (handle 0) cannot be captured: no per-layer graphs there.
        self._layer_graphs_on = self._stream_ptr != 0
        self._stats = {"plans": 0, "reserves": 0, "schedules": 0, "non_finite_appended": False,
                       "device_path_layers": cache.num_layers, "fallback_layers": 0,
                       "layer_graph_captures": 0, "layer_graph_fallbacks": 0}
        self._warned_non_finite = False
        self._warned_layer_graphs = False

    # ------------------------------------------------------------------------------------ planning

    @property
    def batch_size(self) -> int:
        """Sequences of the planned batch (0 before the first plan)."""
        return 0 if self._seq is None else int(self._seq.shape[0])

    @property
    def scale(self) -> float:
        """The softmax scale of the step's attention."""
        return softmax_scale(self.cache, self._scale)

    @property
    def seq_ids(self) -> np.ndarray:
        """The planned batch's sequence ids (a copy)."""
        return np.array([] if self._seq is None else self._seq, dtype=np.int64)

    def plan(self, seq_ids: Sequence[int] | np.ndarray, new_tokens: int = 1) -> None:
        """Prepare the next step of ``seq_ids``: ``new_tokens`` (1, or 0 to attend without appending) more
        tokens in every layer of each sequence.

        Counts the new tokens in the cache's lengths, reserves pages ``horizon`` tokens ahead when a
        sequence needs one, and queues one host-to-device copy of the step's metadata on the step's stream.
        Every layer must hold the same length for each sequence.

        Raises:
            PagePoolExhausted: the pool cannot hold the step's tokens; nothing changed (free sequences and
                plan again).
            MillionError: the previous step appended only some layers, or a device guard fired since an
                earlier plan (a replay after the batch changed).
            ValueError: unknown or repeated ids, unequal layer lengths, sequences longer than max_seq_len.
        """
        if new_tokens not in (0, 1):
            raise ValueError(f"plan: new_tokens: expected 1 (a decode step) or 0 (attention only), got {new_tokens}")
        cache = self.cache
        L = cache.num_layers
        if self._new and 0 < self._appended_count < L:
            raise MillionError(
                f"plan: the previous step appended layers {[i for i, a in enumerate(self._appended) if a]} but not "
                f"{[i for i, a in enumerate(self._appended) if not a]}; every layer's append must run once per planned step "
                f"(or replay a captured graph)"
            )
        prev = self._seq
        # A list equal to the planned batch's (decode loops pass the same list) skips the array conversion.
        seq = prev if prev is not None and type(seq_ids) is list and seq_ids == self._seq_list else \
            np.asarray(seq_ids, dtype=np.int64).reshape(-1)
        # The append kernels' flags (sticky: a launch still queued reports at a later plan).
        flags = self._status_word.value
        if flags:
            self._raise_device_flags(flags)
        attn, lengths = self._attn, self._lengths
        if (new_tokens and self._new and cache.version == self._version and attn is not None and lengths is not None
                and prev is not None and (seq is prev or (seq.shape == prev.shape and (seq == prev).all()))):
            # The decode loop: the same batch one token further, no checks to redo.
            if lengths.steps_left > 0:
                self._next_token(attn, prev, lengths)
            else:  # about once per `horizon` steps; the next step makes the window's schedule
                limit = self._reserve_window(prev, lengths)
                self._next_token(attn, prev, lengths)
                lengths.extend(limit)
                self._window = limit
            attn.publish_step(self.stream)  # the lengths and token words are its step words
        else:
            attn, lengths = self._plan_from_cache(seq, new_tokens)
            attn.publish(seq, self.stream)  # with the schedule and the per-batch words
        if new_tokens:
            cache.advance(self._rows, new_tokens, lengths.flushed)
        self._new = new_tokens
        self._version = cache.version
        if self._appended_count:
            self._appended = bytearray(L)
            self._appended_count = 0
        self._stats["plans"] += 1
        self._stats["schedules"] = attn.schedules

    def _next_token(self, attn: AttentionPlan, seq: np.ndarray, lengths: StepLengths) -> None:
        """The next step of the planned batch, from the previous step's state (StepLengths.advance).

        The step after a page reservation makes the schedule for the reserved window (``_window_cover``): the
        loop's two slow host jobs, the allocator call and the scheduler (a few hundred microseconds each on the
        benchmark hosts), then take a step each, once per ``horizon`` steps, instead of doubling one step. Any
        other step schedules only if a sequence outgrew the schedule (after a batch planned with pages reserved
        further ahead than a horizon)."""
        lengths.advance()
        window, self._window = self._window, None
        cover = attn.cover
        if window is not None or (lengths.flushed and (cover is None or (lengths.main > cover).any())):
            end = lengths.pos.astype(np.int64) + 1
            tokens = end + self.horizon if window is None else self._window_cover(end, window)
            attn.schedule(seq, self.cache.full_pages(tokens) * self.cache.page_size)
            attn.publish_schedule(seq, self.stream)

    def _window_cover(self, end: np.ndarray, limit: np.ndarray) -> np.ndarray:
        """Tokens a schedule made at a step ending at ``end`` tokens should serve when the reserved pages hold
        ``limit``: up to the limit (at most a horizon ahead) and one page more, so that the step that reserves
        the next window, one token past the limit, still runs on this schedule."""
        return np.minimum(limit, end + self.horizon) + self.cache.page_size

    def _reserve_window(self, seq: np.ndarray, lengths: StepLengths) -> np.ndarray:
        """Pages for the planned batch's next ``horizon`` tokens, in one allocator call, before the step that
        needs the first of them changes anything (PagePoolExhausted and ValueError leave every state as it was).
        Returns each sequence's capacity in tokens."""
        cache = self.cache
        n = lengths.pos.astype(np.int64) + 1  # tokens before this step's
        self._check_room(seq, n + 1)
        limit = cache.ensure_capacity(seq, np.minimum(n + self.horizon, cache.max_seq_len))
        self._stats["reserves"] += 1
        return limit

    def _check_room(self, seq: np.ndarray, end: np.ndarray) -> None:
        """ValueError naming the sequences that ``end`` tokens would take past the cache's max_seq_len."""
        over = end > self.cache.max_seq_len
        if over.any():
            raise ValueError(f"plan: sequences {seq[over].tolist()} would hold {end[over].tolist()} tokens, "
                             f"more than max_seq_len = {self.cache.max_seq_len}")

    def _plan_from_cache(self, seq: np.ndarray, new_tokens: int) -> tuple[AttentionPlan, StepLengths]:
        """A plan from the cache's lengths: the first of a batch, after the cache changed, or when the step
        needs more pages or a new schedule. Validates, reserves pages ``horizon`` tokens ahead and schedules."""
        cache = self.cache
        P, R = cache.page_size, cache.residual
        prev, held = self._seq, self._lengths
        if (prev is not None and held is not None and cache.version == self._version and seq.shape == prev.shape
                and bool((seq == prev).all())):
            n = held.pos.astype(np.int64) + self._new  # the same batch: the cache changed only through this step
        else:
            n = self._validate(seq)
        end = n + new_tokens
        self._check_room(seq, end)
        if not new_tokens and (end == 0).any():
            raise ValueError(f"plan: sequences {seq[end == 0].tolist()} hold no tokens; nothing to attend to")
        B = seq.shape[0]
        grown = self._grown_attention(B)  # allocated before any page is reserved, in use after
        limit = np.minimum(cache.allocated_blocks(seq) * P, cache.max_seq_len)
        if new_tokens and (end > limit).any():
            # Pages for `horizon` more tokens in one allocator call (PagePoolExhausted: nothing changed).
            limit = cache.ensure_capacity(seq, np.minimum(n + self.horizon, cache.max_seq_len))
            self._stats["reserves"] += 1
        attn = self._attention_for(B, grown)
        # The append kernel's words and the token counts are views of the plan's step words (one staging copy per
        # plan); the positions are both the append's and the state's, so advancing one advances both.
        tok = self._tok = attn.step_extra[: 4 * B].reshape(B, 4)
        tok[:, 0] = seq
        tok[:, 2] = cache.slot_generations(seq)
        tok[:, 3] = 1
        lengths = self._lengths = StepLengths(tok[:, 1], n, new_tokens, P, R, limit, main=attn.step_main[:B],
                                              res=attn.step_res[:B])
        self._window = None
        if not attn.covers(seq, lengths.main):
            attn.schedule(seq, cache.full_pages(self._window_cover(end, limit) if new_tokens else end) * P)
        self._seq = seq
        self._seq_list = seq.tolist()
        self._kv_shape = (seq.shape[0], cache.num_kv_heads, cache.head_dim)
        self._q_shape = (seq.shape[0], self.num_heads, cache.head_dim)
        lo = int(seq[0])
        contiguous = bool((seq == np.arange(lo, lo + seq.shape[0])).all())
        self._rows = slice(lo, lo + seq.shape[0]) if contiguous else seq  # cheaper length updates
        return attn, lengths

    def _validate(self, seq: np.ndarray) -> np.ndarray:
        """Host lengths of a batch seen for the first time (or after the cache changed), checked."""
        cache = self.cache
        if seq.size == 0:
            raise ValueError("plan: seq_ids is empty")
        seq = cache.check_ids(seq, "plan")  # live, distinct
        lens = cache.lengths[:, seq]
        unequal = np.flatnonzero((lens != lens[0]).any(axis=0))
        if unequal.size:
            b = int(unequal[0])
            raise ValueError(
                f"plan: sequence {int(seq[b])} holds {lens[:, b].tolist()} tokens in layers 0..{cache.num_layers - 1}; "
                f"a decode step needs equal lengths in every layer (append the missing layers with cache.append)"
            )
        return lens[0]

    def _grown_attention(self, B: int) -> AttentionPlan | None:
        """A new AttentionPlan (allocated, not yet in use) when a batch of ``B`` outgrows the current one, else
        None."""
        if self._attn is not None and self._attn.capacity >= B:
            return None
        capacity = max(capacity_for(B), self._max_batch or 0)
        return AttentionPlan(self.cache, self.num_heads, capacity, scale=self._scale, extra_words=4 * capacity)

    def _attention_for(self, B: int, grown: AttentionPlan | None) -> AttentionPlan:
        """The plan for a batch of ``B``: ``grown`` (from :meth:`_grown_attention`) put in use, or the current
        one, with the append launches bound for ``B``."""
        if grown is not None:
            self.stream.synchronize()  # rare: no queued copy or launch still reads the old plan's buffers
            self._attn = grown
            self._runs = [grown.launch(layer, self._np_dtype) for layer in range(self.cache.num_layers)]
            self._appends_for = -1
        attn = self._attn
        assert attn is not None  # _grown_attention makes one for the first plan
        if self._appends_for != B:
            self._bind_appends(attn, B)
        return attn

    def _bind_appends(self, attn: AttentionPlan, B: int) -> None:
        """One bound append launch per layer for batches of ``B`` (k and v are set per call); every layer's
        launches then wait for the caller's arrays of the new shapes."""
        cache = self.cache
        null = np.uint64(0)
        self._appends = []
        for layer in range(cache.num_layers):
            append = cache.append_kernel(layer)
            args = append.args(null, null, attn.extra, self._status_at, B)
            self._appends.append(kernels.BoundLaunch(append.kernel, append.grid(B), APPEND_THREADS, 0, args))
        self._appends_for = B
        self._append_inputs = [_UNBOUND] * cache.num_layers
        self._run_inputs = [_UNBOUND] * cache.num_layers
        self._layer_graphs = {}  # they launch the launches just replaced (with their buffers and grids)
        self._layer_last = {}

    # ------------------------------------------------------------------------------------- running

    def append(self, layer: int, k: Any, v: Any) -> None:
        """Write the step's new token of ``layer`` for every sequence: ``k``, ``v`` ``(B, nh_k, head_dim)`` in
        the cache dtype (C-contiguous CuPy arrays, or anything DLPack / CUDA-array-interface converts to one;
        pass exact arrays when capturing a graph). One kernel launch: encode, page store and ring copy."""
        self._bound_append(layer, k, v).launch(self._stream_ptr)
        self._mark_appended(layer)

    def _bound_append(self, layer: int, k: Any, v: Any) -> kernels.BoundLaunch:
        """``layer``'s append launch pointed at ``k`` and ``v`` (checked unless they are the arrays it holds)."""
        if self._new != 1:
            raise MillionError("append: no decode step is planned (plan(seq_ids) first; a plan with new_tokens=0 "
                               "attends without appending)")
        if not 0 <= layer < len(self._appends):
            raise IndexError(f"layer: expected 0 <= layer < {self.cache.num_layers}, got {layer}")
        launch = self._appends[layer]
        bound = self._append_inputs[layer]
        if k is not bound[0] or v is not bound[1]:  # the hot path (the same arrays as last step) skips this
            self._append_inputs[layer] = self._bind_tokens(launch, k, v)
        return launch

    def _mark_appended(self, layer: int) -> None:
        if not self._appended[layer]:
            self._appended[layer] = True
            self._appended_count += 1

    def _bind_tokens(self, launch: kernels.BoundLaunch, k: Any, v: Any) -> tuple:
        """Point an append launch at ``k`` and ``v`` (checked); returns what the next call may skip checking
        for: the caller's objects when they are the CuPy arrays launched (a converted object, such as a
        tensor its owner may re-point, is checked on every call)."""
        nd = self._ndarray
        kk = k if (type(k) is nd and k.shape == self._kv_shape and k.dtype == self._np_dtype
                   and k.flags.c_contiguous and not k.data.ptr & 15) else self._tokens(k, "k")
        vv = v if (type(v) is nd and v.shape == self._kv_shape and v.dtype == self._np_dtype
                   and v.flags.c_contiguous and not v.data.ptr & 15) else self._tokens(v, "v")
        launch.set_arg(0, kk.data.ptr)
        launch.set_arg(1, vv.data.ptr)
        return (k, v) if kk is k and vv is v else _UNBOUND

    def _tokens(self, x: Any, name: str):
        shape = self._kv_shape
        arr = as_array(x, name, shape=shape, dtypes=(self.cache.dtype,), on_gpu=True)
        if not arr.flags.c_contiguous or arr.data.ptr % 16:
            raise ValueError(f"{name}: expected a C-contiguous, 16-byte aligned array {shape} of {self.cache.dtype}")
        return arr

    def run(self, layer: int, q: Any, *, out: Any = None, lse: Any = None, return_lse: bool = False,
            k: Any = None, v: Any = None):
        """Attention of ``q`` ``(B, num_heads, head_dim)`` over ``layer`` for the planned batch, the step's new
        token included. Returns ``out`` (CuPy ``(B, num_heads, head_dim)``, or the caller's ``out``), or
        ``(out, lse)`` with ``return_lse`` or a given ``lse`` (float32 ``(B, num_heads)``, natural log).
        Pass ``out`` (and ``lse``) when capturing a graph.

        ``k``, ``v`` (``(B, nh_k, head_dim)``, as in :meth:`append`): append the layer's new token first, in
        the same call. Once a layer's ``k``, ``v``, ``q`` and ``out`` are the same CuPy arrays as in its
        previous such call (a model's per-layer buffers), both kernels are replayed from a per-layer CUDA graph
        captured then: one graph launch instead of two kernel launches (``stats()["layer_graph_captures"]``).
        """
        if k is not None or v is not None:
            graph = self._layer_graphs.get(layer)
            # The hot path: the arrays this layer's graph was captured with, a decode step planned, and no capture
            # of the caller's under way (a graph cannot be launched into one).
            if (graph is not None and k is graph[0] and v is graph[1] and q is graph[2] and out is graph[3]
                    and lse is None and not return_lse and self._new == 1
                    and not self._is_capturing(self._stream_ptr)):
                graph[4].launch(self.stream)
                self._mark_appended(layer)
                return out
            return self._append_and_run(layer, q, k, v, out, lse, return_lse)
        if self._new and 0 <= layer < len(self._runs) and not self._appended[layer]:
            raise MillionError(f"run({layer}) before append({layer}): this step's token of layer {layer} is "
                               f"not in the cache yet (or pass k= and v= to append it in this call)")
        launch, out, lse = self._bound_run(layer, q, out, lse, return_lse)
        launch.launch(self._stream_ptr)
        return (out, lse) if (return_lse or lse is not None) else out

    def _bound_run(self, layer: int, q: Any, out: Any, lse: Any, return_lse: bool) -> tuple:
        """``layer``'s attention launch pointed at ``q``, ``out`` and ``lse`` (checked unless they are the arrays
        it holds); returns it with the ``out`` and ``lse`` arrays it writes."""
        runs = self._runs
        if not 0 <= layer < len(runs):
            if self._attn is None:
                raise MillionError("run() before plan(): call plan(seq_ids) once per decode step")
            raise IndexError(f"layer: expected 0 <= layer < {self.cache.num_layers}, got {layer}")
        launch = runs[layer]
        bound = self._run_inputs[layer]
        # The hot path: the same q and out arrays as last step, no lse: nothing to check or rebind.
        if q is not bound[0] or out is not bound[1] or lse is not None or return_lse:
            nd, shape, dtype = self._ndarray, self._q_shape, self._np_dtype
            exact = (lse is None and not return_lse and type(q) is nd and type(out) is nd and q.shape == shape
                     and out.shape == shape and q.dtype == dtype and out.dtype == dtype and q.flags.c_contiguous
                     and out.flags.c_contiguous)
            if not exact:
                q, out, lse = attention_arrays(q, out, lse, return_lse, shape, dtype)
            launch.set_arg(0, q.data.ptr)
            launch.set_arg(AttentionPlan.OUT_ARG, out.data.ptr)
            launch.set_arg(AttentionPlan.OUT_ARG + 1, 0 if lse is None else lse.data.ptr)
            self._run_inputs[layer] = (q, out) if exact else _UNBOUND
        return launch, out, lse

    def _append_and_run(self, layer: int, q: Any, k: Any, v: Any, out: Any, lse: Any, return_lse: bool):
        """run(..., k=, v=) off its hot path: both launches checked and bound before either is queued, then launched,
        or captured into the layer's graph when its arrays repeat."""
        if k is None or v is None:
            raise ValueError(f"run: k and v are the layer's new token and go together; got k={type(k).__name__}, "
                             f"v={type(v).__name__}")
        append = self._bound_append(layer, k, v)
        attend, out, lse = self._bound_run(layer, q, out, lse, return_lse)
        arrays = (k, v, q, out)
        self._layer_graphs.pop(layer, None)  # other arrays: the graph of the old ones would only keep them alive
        repeat = self._layer_last.get(layer)
        self._layer_last[layer] = arrays
        # Only the caller's own CuPy arrays, as bound (a converted object may be re-pointed by its owner), and only
        # on their second call: a one-off call pays no capture.
        if (repeat is not None and all(a is b for a, b in zip(repeat, arrays)) and lse is None and not return_lse
                and self._append_inputs[layer] is not _UNBOUND and self._run_inputs[layer] is not _UNBOUND
                and not self._is_capturing(self._stream_ptr)):
            graph = self._capture_layer(append, attend)
            if graph is not None:
                self._layer_graphs[layer] = (*arrays, graph)
                graph.launch(self.stream)
                self._mark_appended(layer)
                return out
        append.launch(self._stream_ptr)
        self._mark_appended(layer)
        attend.launch(self._stream_ptr)
        return (out, lse) if (return_lse or lse is not None) else out

    def _capture_layer(self, append: kernels.BoundLaunch, attend: kernels.BoundLaunch):
        """A CUDA graph of the two launches, or None where the stream cannot be captured (counted, warned once)."""
        if not self._layer_graphs_on:
            self._layer_graph_fallback("the cache's stream is the legacy default stream, which cannot be captured; "
                                       "build the cache on cupy.cuda.Stream(non_blocking=True)")
            return None
        stream = self.stream
        try:
            stream.begin_capture()
        except Exception as exc:  # noqa: BLE001 (CUDA's reason is reported; the layer still runs)
            self._layer_graphs_on = False
            self._layer_graph_fallback(f"stream capture failed ({exc})")
            return None
        try:
            append.launch(self._stream_ptr)
            attend.launch(self._stream_ptr)
        finally:
            graph = stream.end_capture()
        self._stats["layer_graph_captures"] += 1
        return graph

    def _layer_graph_fallback(self, reason: str) -> None:
        self._stats["layer_graph_fallbacks"] += 1
        if not self._warned_layer_graphs:
            self._warned_layer_graphs = True
            warnings.warn(f"DecodeStep.run(..., k=, v=): {reason}; each layer takes two kernel launches (about twice "
                          f"the host time) instead of one graph launch", RuntimeWarning, stacklevel=4)

    # ------------------------------------------------------------------------------------- checking

    def check(self) -> None:
        """Synchronise the step's stream and raise if a device guard fired since the last check."""
        self.stream.synchronize()
        self._raise_device_flags(self._status_word.value)

    def _raise_device_flags(self, flags: int) -> None:
        if not flags:
            return
        # Error path: every queued launch runs first, so that all of its flags are reported now and cleared once.
        self.stream.synchronize()
        flags = self._status_word.value
        self._status_word.value = 0
        if flags & APPEND_STATUS_NON_FINITE:
            # The tokens are stored: warn (once per step object) rather than fail the loop.
            self._stats["non_finite_appended"] = True
            self.cache.record_non_finite()
            if not self._warned_non_finite:
                warnings.warn("DecodeStep: an appended token held NaN or inf; attention over its sequence will be "
                              "NaN from now on (the prefill append refuses such tokens; the decode path only "
                              "flags them)", RuntimeWarning, stacklevel=3)
                self._warned_non_finite = True
            flags &= ~APPEND_STATUS_NON_FINITE
            if not flags:
                return
        reasons = []
        if flags & APPEND_STATUS_STALE_SLOT:
            reasons.append("a replayed or launched append named a sequence slot that was freed or reused since "
                           "its plan() (the batch changed without planning again)")
        if flags & APPEND_STATUS_NO_PAGE:
            reasons.append("an append found no page for its token's block")
        raise MillionError(f"DecodeStep: {'; '.join(reasons)}; those tokens were not written, and nothing else "
                           f"was touched; plan(seq_ids) again for the batch you replay")

    def stats(self) -> dict[str, int]:
        """Counters: ``plans``, ``reserves`` (allocator calls: about one per ``horizon`` steps), ``schedules``
        computed, ``non_finite_appended`` (a token with NaN or inf was appended: warned once), ``device_path_layers`` (layers whose append and attention run
        from the step's device metadata: all of them), ``fallback_layers`` (0: a configuration without
        the device path raises UnsupportedConfiguration instead of taking a slower one), ``layer_graph_captures``
        (per-layer graphs captured by ``run(..., k=, v=)``: one per layer and set of arrays) and
        ``layer_graph_fallbacks`` (calls that would have captured one but could not: two launches, warned once)."""
        return dict(self._stats)

    def __repr__(self) -> str:
        return (f"DecodeStep(batch={self.batch_size}, num_heads={self.num_heads}, horizon={self.horizon}, "
                f"capacity={0 if self._attn is None else self._attn.capacity})")
