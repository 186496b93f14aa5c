"""Decode attention: one query token per sequence, straight from compressed storage.

The native path is ``cuda_src/decode_attention.cu``: split-K flash decoding with a log-sum-exp merge
done by the last CTA of each (sequence, head group), so one layer is ONE kernel launch.

* :class:`BatchDecodeWrapper` — the FlashInfer-style plan / run split over a :class:`PagedPQCache`:
  ``plan(seq_ids, new_tokens=1)`` once per decode step (scheduling metadata, workspace, page
  reservation for all layers), then ``run(layer, q)`` per layer: no host-device synchronisation,
  capturable in a CUDA graph.
* :func:`decode` — the one-call convenience (plan + run). On a CPU cache it computes the float64
  reference (``million_cupy.reference``) from the dequantized cache.
* :func:`contiguous_pq_decode` — the same attention over MILLION's contiguous code layout
  (batch, kv_head, tokens, M), :func:`paged_pq_decode` — PQ pages managed by the caller (CSR page table),
  and :func:`paged_exact_decode` — an fp16/bf16/fp32 paged decode over an unquantized cache. Each has a
  ``prepare_*`` form that validates and schedules once and returns a launch to replay. They exist so
  comparisons can be made inside the library and so other page managers can use the kernels.
* :func:`merge_states` / :func:`merge_state_stack` — combine partial (output, lse) states.

Split heuristic (documented contract): every (sequence, head group) is one *unit*; the tokens of all
units are cut into chunks of ``max(MIN_CHUNK, ceil(total_tokens / (num_SMs * WAVES)))`` tokens
(rounded up to whole 256-token tiles and pages), so a batch of one long sequence still gives every SM
work, while short sequences are not split (each split pays for building its lookup table). The exact
residual tokens of a unit go to its last split, or, when the batch leaves SMs free and the splits stay
short (at most ``RESIDUAL_ITEM_MAX_CHUNK`` tokens), to a work item of their own that runs beside the
splits (it builds no lookup table): at short contexts the residual is otherwise the critical path.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np

from . import kernels, reference
from .errors import MillionError, UnsupportedConfiguration
from .interop import as_array, as_stream, cupy, dtype_name, is_gpu_array, require_gpu, to_numpy
from .layout import PAGE_SIZES, kernel_codebooks, pack_pages, permute_k_rows, stored_v_shape

SOURCE = "decode_attention.cu"
MODE_PAGED_PQ, MODE_CONTIG_PQ, MODE_PAGED_EXACT = 0, 1, 2
THREADS = 512
TILE = 32  # tokens per warp tile; split boundaries are whole tiles
MIN_CHUNK = 256  # tokens; below this a split costs more (its LUT build) than it saves
WAVES = 1         # one CTA per SM fits (the LUT takes most of shared memory)
WORK_RESIDUAL = 1 << 16  # work item flag (column 1, above the head group): it covers the residual tokens
RESIDUAL_ITEM_MAX_CHUNK = 2048  # tokens; longer splits keep the residual in their last split
HEAD_DIMS = (64, 128, 256)
DSUBS = (1, 2, 4, 8)
GROUPS = (8, 4, 2, 1)
_CTYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float"}
_SMEM_LIMIT_FALLBACK = 227 * 1024


# ---------------------------------------------------------------------------------------------------
# Variant grid and shared-memory sizing (mirrors DecodeSmem in decode_attention.cu; the kernel traps if
# the launch provides less than it computes, so a drift cannot go unnoticed).
# ---------------------------------------------------------------------------------------------------


def smem_bytes(mode: int, d: int, m: int, g: int) -> int:
    pq = mode != MODE_PAGED_EXACT
    warps = THREADS // 32
    q = 4 * g * d
    p = 4 * warps * 32 * g
    lut = 2 * 256 * m * g if pq else 0
    vc_smem = pq and (lut + 2 * 256 * d + 16384) <= 227 * 1024
    vc = 2 * 256 * d if vc_smem else 0
    red = 4 * warps * g * (d + 2)
    return q + p + vc + max(lut, red)


def _exact_m(d: int) -> int:
    # The exact (unquantized) path reuses the V-pass thread mapping with two dims per thread.
    return d // 2


def _expr(mode: int, d: int, m: int, g: int, dtype: str) -> str:
    return f"mc::decode_attention<{mode}, {d}, {m}, {g}, {_CTYPES[dtype]}>"


def _fits(mode: int, d: int, m: int, g: int, limit: int = _SMEM_LIMIT_FALLBACK) -> bool:
    return smem_bytes(mode, d, m, g) <= limit


@kernels.register_variants(SOURCE)
def _variant_grid() -> list[str]:
    out = []
    for dtype in _CTYPES:
        for d in HEAD_DIMS:
            for dsub in DSUBS:
                m = d // dsub
                for g in GROUPS:
                    if _fits(MODE_PAGED_PQ, d, m, g):
                        out += [_expr(MODE_PAGED_PQ, d, m, g, dtype), _expr(MODE_CONTIG_PQ, d, m, g, dtype)]
            out += [_expr(MODE_PAGED_EXACT, d, _exact_m(d), g, dtype) for g in GROUPS]
    return out


def supported_configurations() -> str:
    return (
        f"head_dim in {HEAD_DIMS}; M with head_dim // M in {DSUBS}; C = 256; dtype in {tuple(_CTYPES)}; "
        f"page_size in {PAGE_SIZES}; any num_heads / num_kv_heads ratio"
    )


@dataclass(frozen=True)
class _DeviceInfo:
    sm_count: int
    smem_limit: int
    compute_capability: int  # major * 10 + minor


_device_info: dict[int, _DeviceInfo] = {}


def _device() -> _DeviceInfo:
    cp = cupy()
    dev = cp.cuda.runtime.getDevice()
    info = _device_info.get(dev)
    if info is None:
        attrs = cp.cuda.Device(dev).attributes
        info = _DeviceInfo(
            sm_count=int(attrs["MultiProcessorCount"]),
            smem_limit=int(attrs.get("MaxSharedMemoryPerBlockOptin", _SMEM_LIMIT_FALLBACK)),
            compute_capability=int(cp.cuda.Device(dev).compute_capability),
        )
        _device_info[dev] = info
    return info


def device_sm_count() -> int:
    """Streaming multiprocessors of the current device (read once per device): what schedules spread over."""
    return _device().sm_count


def device_compute_capability() -> int:
    """The current device's compute capability as ``major * 10 + minor`` (90 on an H100 / H200), read once."""
    return _device().compute_capability


def device_smem_limit() -> int:
    """Bytes of dynamic shared memory one block of the current device may opt in to (read once per device):
    227 KB on an H100 / H200, 163 KB on an A100, 99 KB on sm_86 / sm_89."""
    return _device().smem_limit


def choose_group(mode: int, d: int, m: int, gqa: int, smem_limit: int) -> int:
    """Query heads one CTA serves: the largest G in {8,4,2,1} dividing the GQA ratio whose LUT fits."""
    for g in GROUPS:
        if gqa % g == 0 and smem_bytes(mode, d, m, g) <= smem_limit:
            return g
    raise UnsupportedConfiguration(
        f"no decode kernel fits this device's {smem_limit} bytes of shared memory for head_dim={d}, M={m}; "
        f"supported: {supported_configurations()}"
    )


def check_native_config(d: int, m: int | None, dtype: str, page_size: int | None) -> None:
    """Raise :class:`UnsupportedConfiguration` naming every part of (head_dim ``d``, ``M``, ``dtype``,
    ``page_size``) the native kernels lack (``m`` / ``page_size`` None: not checked)."""
    problems = []
    if d not in HEAD_DIMS:
        problems.append(f"head_dim={d}")
    if m is not None and (d % m or d // m not in DSUBS):
        problems.append(f"M={m} (head_dim // M must be in {DSUBS})")
    if dtype not in _CTYPES:
        problems.append(f"dtype={dtype}")
    if page_size is not None and page_size not in PAGE_SIZES:
        problems.append(f"page_size={page_size}")
    if problems:
        raise UnsupportedConfiguration(
            f"no native decode kernel for {', '.join(problems)}; supported: {supported_configurations()}"
        )


def require_native_attention(cache, num_heads: int | None, owner: str, cpu_path: str) -> None:
    """Raise unless ``owner`` (a launcher's name) can run the native kernels for ``num_heads`` query heads over
    ``cache``: UnsupportedConfiguration for a CPU cache (naming ``cpu_path``, the float64 alternative) or a
    configuration without a kernel, ValueError for a head count that is not a multiple of the kv heads
    (None: not known yet, checked at plan time)."""
    if not cache.is_gpu:
        raise UnsupportedConfiguration(
            f"{owner} launches the GPU kernels and needs a GPU cache (device='cuda'); on a CPU cache use {cpu_path}, "
            f"which computes the float64 reference"
        )
    check_native_config(cache.head_dim, cache.M, cache.dtype, cache.page_size)
    if num_heads is not None and (num_heads < 1 or num_heads % cache.num_kv_heads):
        raise ValueError(f"num_heads: expected a positive multiple of num_kv_heads = {cache.num_kv_heads}, "
                         f"got {num_heads}")


# ---------------------------------------------------------------------------------------------------
# Scheduling
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Schedule:
    work: np.ndarray        # (W, 4) int32: b, head group | WORK_RESIDUAL flag, token begin, token end
    unit_items: np.ndarray  # (U, 2) int32: first work item, count
    group: int


def _split_counts(lens: np.ndarray, hg: int, slots: int, step: int) -> tuple[int, np.ndarray]:
    """The smallest chunk (whole ``step``s, at least MIN_CHUNK) whose splits fit ``slots`` CTAs."""
    chunk = max(MIN_CHUNK, -(-int(lens.sum()) * hg // max(1, slots)))
    # Grow the chunk until the splits fit in one wave: a second, partial wave of CTAs costs as much as
    # a full one.
    while True:
        chunk = -(-chunk // step) * step
        splits = np.maximum(1, -(-lens // chunk))  # per sequence
        if int(splits.sum()) * hg <= slots or chunk >= int(lens.max(initial=0)):
            return chunk, splits
        chunk = int(chunk * 1.05) + step


def make_schedule(main_len: np.ndarray, num_heads: int, group: int, align: int, sm_count: int,
                  residual: bool = False) -> _Schedule:
    """Split-K work items for the batch (see module docstring for the heuristic).

    ``residual``: the units also hold exact residual tokens (the PQ modes). They are processed either by a
    unit's last split or, when the batch leaves SMs free and the splits are short, by a work item of their
    own (no lookup table to build), which then runs beside the splits instead of after a split's tiles.
    """
    hg = num_heads // group
    lens = np.asarray(main_len, dtype=np.int64)
    n_units = len(lens) * hg
    slots = max(1, sm_count * WAVES)
    step = math.lcm(TILE, align)
    _, splits = _split_counts(lens, hg, slots, step)
    separate = False
    if residual and 2 * n_units <= slots:
        chunk_r, splits_r = _split_counts(lens, hg, slots - n_units, step)
        if chunk_r <= RESIDUAL_ITEM_MAX_CHUNK and int(splits_r.sum()) * hg + n_units <= slots:
            splits, separate = splits_r, True
    # Even splits of each sequence (whole tiles), so its CTAs finish together.
    chunk_b = -(-(-(-lens // splits)) // step) * step
    counts = np.repeat(splits + int(separate), hg)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
    w = int(counts.sum())
    work = np.empty((w, 4), dtype=np.int32)
    unit_b = np.repeat(np.arange(len(lens)), hg)
    unit_g = np.tile(np.arange(hg), len(lens))
    unit_of_item = np.repeat(np.arange(n_units), counts)
    k = np.arange(w) - first[unit_of_item]
    b = unit_b[unit_of_item]
    last = k == counts[unit_of_item] - 1  # the item that covers the residual tokens
    work[:, 0] = b
    work[:, 1] = unit_g[unit_of_item] | np.where(last, WORK_RESIDUAL, 0)
    work[:, 2] = np.minimum(k * chunk_b[b], lens[b])
    work[:, 3] = np.minimum((k + 1) * chunk_b[b], lens[b])
    if separate:  # the last item of a unit holds no PQ tokens
        work[last, 2] = lens[b[last]]
    unit_items = np.stack([first, counts.astype(np.int32)], axis=1).astype(np.int32)
    return _Schedule(work=work, unit_items=unit_items, group=group)


# ---------------------------------------------------------------------------------------------------
# The attention plan: graph-stable device metadata of one batch over a PagedPQCache
# ---------------------------------------------------------------------------------------------------

#: Tokens a plan's schedule looks ahead (and a DecodeStep reserves pages ahead): the kernel cuts each work
#: item at the tokens the sequence holds in pages, so a schedule made for ``n + SCHEDULE_HORIZON`` tokens
#: stays valid, and is not recomputed, while the sequence grows to that length.
SCHEDULE_HORIZON = 256

#: Pinned slots a decode loop's per-step words are staged in, one per step (:meth:`AttentionPlan.publish_step`):
#: two halves, each covered by ONE event, so that a step's publish costs a NumPy copy and a memcpy and no event call.
STEP_SLOTS = 32


class AttentionPlan:
    """Decode attention over a :class:`~million_cupy.cache.PagedPQCache` for batches of up to ``capacity``
    sequences, from device metadata at fixed addresses (the plan half of FlashInfer's plan / run).

    Everything a launch reads that changes from step to step (the split-K work list, per-sequence token
    counts, ring rows, page-table rows, and ``extra_words`` int32 words for the caller) lives in ONE device
    buffer, rewritten by :meth:`update` with one host-to-device copy from pinned memory. The grid has a
    fixed size (``max(SMs, units)`` work items, unused ones padded), so each layer's launch is bound once
    for the plan's life (:meth:`launch`) and a CUDA graph that captured it stays valid across updates.

    The schedule is recomputed only when the batch changes or a sequence outgrows the token count it was
    made for (``horizon`` tokens ahead); the kernel cuts each work item at the sequence's current tokens.

    A decode loop changes only the per-step words from one step to the next: it publishes them alone
    (:meth:`publish_step`), and a new schedule for the same batch on its own (:meth:`publish_schedule`).
    """

    def __init__(self, cache, num_heads: int, capacity: int, *, scale: float | None = None,
                 extra_words: int = 0) -> None:
        cp = cupy()
        self.cache = cache
        self.num_heads = num_heads
        self.capacity = capacity
        d = cache.head_dim
        # An exact cache (codebooks=None) takes the unquantized kernel over the same metadata.
        self.mode = MODE_PAGED_PQ if cache.quantized else MODE_PAGED_EXACT
        self._m = cache.M if cache.quantized else _exact_m(d)
        dev = _device()
        self._sm_count = dev.sm_count
        self.group = choose_group(self.mode, d, self._m, num_heads // cache.num_kv_heads, dev.smem_limit)
        hg = num_heads // self.group
        self.units = capacity * hg
        self.grid = max(dev.sm_count * WAVES, self.units)  # make_schedule never gives more items
        # int32 words: page_row (int64, first so it is 8-byte aligned) | work | unit_items | ring row | main |
        # res | extra. The last three change every step and are contiguous (:attr:`step_words`).
        # Every part starts 16-byte aligned: the kernels read work items and the append's tokens as int4.
        exact = (2 * capacity, 4 * self.grid, 2 * self.units, capacity, capacity, capacity, extra_words)
        offsets = np.concatenate([[0], np.cumsum([-(-n // 4) * 4 for n in exact])])
        self._words = int(offsets[-1])
        with cache.stream:
            self._dev = cp.zeros(self._words, dtype=np.int32)
            self.part_o = cp.empty((self.grid, self.group, d), dtype=cp.float32)
            self.part_lse = cp.empty((self.grid, self.group), dtype=cp.float32)
            self.counter = cp.zeros(self.units, dtype=cp.int32)  # the kernel leaves it zeroed
            # The zero fills run on the cache's stream; the first copy waits for them on the caller's stream
            # (_send_staged), which may be another one (BatchDecodeWrapper(stream=...), a capturing stream).
            self._zeroed: Any = cp.cuda.Event(block=False, disable_timing=True)
            self._zeroed.record()
        from cupyx import empty_pinned  # noqa: PLC0415 (CuPy loads on first use)

        # Two pinned staging buffers: one is rewritten while the copy from the other may still be queued.
        self._host = [empty_pinned(self._words, dtype=np.int32) for _ in range(2)]
        self._copied = [cp.cuda.Event(block=False, disable_timing=True) for _ in range(2)]
        self._recorded = [False, False]
        self._staged = [False, False]  # whether each buffer holds the current schedule and batch words
        self._turn = 0
        self._memcpy = cp.cuda.runtime.memcpyAsync
        # Addresses looked up once (NumPy's .ctypes costs microseconds; update() runs every decode step).
        self._host_at = [h.ctypes.data for h in self._host]
        self._dev_at = self._dev.data.ptr

        def part(i: int, dtype=np.int32, shape=None):
            dev = self._dev[offsets[i] : offsets[i] + exact[i]]
            host = [h[offsets[i] : offsets[i] + exact[i]] for h in self._host]
            if dtype == np.int64:
                dev, host = dev.view(np.int64), [h.view(np.int64) for h in host]
            if shape is not None:
                dev, host = dev.reshape(shape), [h.reshape(shape) for h in host]
            return dev, host

        self.page_row, self._page_row = part(0, np.int64)
        self.work, self._work = part(1, shape=(self.grid, 4))
        self.unit_items, self._unit_items = part(2, shape=(self.units, 2))
        self.res_row, self._res_row = part(3)
        self.main_len, _ = part(4)
        self.res_len, _ = part(5)
        self.extra, _ = part(6)
        # The per-step words live in one host array laid out as their part of the buffer, so that a step's
        # update stages them with ONE copy (each small NumPy call costs microseconds, more on a busy host).
        first = int(offsets[4])
        self.step_words = np.zeros(self._words - first, dtype=np.int32)
        self.step_main = self.step_words[: exact[4]]
        self.step_res = self.step_words[offsets[5] - first : offsets[5] - first + exact[5]]
        self.step_extra = self.step_words[offsets[6] - first : offsets[6] - first + exact[6]]
        self._step_staging = [h[first:] for h in self._host]
        self._head_words = first  # the schedule and the per-batch words, before the step words
        # The per-step words' own staging (publish_step): STEP_SLOTS pinned slots used in turn; the copies from a
        # half of them are covered by one event, recorded when the other half starts and waited on (long done in a
        # running loop) before the half is written again.
        n_step = self._words - first
        self._slots = empty_pinned((STEP_SLOTS, n_step), dtype=np.int32)
        self._slots_at = self._slots.ctypes.data
        self._slot = 0
        self._half_copied = [cp.cuda.Event(block=False, disable_timing=True) for _ in range(2)]
        self._step_bytes = 4 * n_step
        self._step_dev_at = self._dev_at + 4 * first
        self._sched_key: np.ndarray | None = None  # the seq ids the schedule was made for
        self._sched_main: np.ndarray | None = None
        check_scale(scale)
        self._scale = (1.0 / math.sqrt(d)) if scale is None else float(scale)
        self._layer_fixed: dict[int, tuple] = {}
        self._launches: dict[tuple[int, Any], kernels.BoundLaunch] = {}  # (layer, numpy dtype)
        self.schedules = 0  # schedules computed (the rest of the updates reused one)

    @property
    def scale(self) -> float:
        """Softmax scale of the launches (default ``1 / sqrt(head_dim)``)."""
        return self._scale

    def _claim_turn(self) -> int:
        """The staging buffer the next :meth:`update` writes, once its previous copy is done (in a running
        decode loop it finished long ago)."""
        t = self._turn
        if self._recorded[t]:
            self._copied[t].synchronize()
            self._recorded[t] = False
        return t

    @property
    def cover(self) -> np.ndarray | None:
        """Tokens in full pages per sequence that the current schedule serves (None before the first)."""
        return self._sched_main

    def covers(self, seq: np.ndarray, main: np.ndarray) -> bool:
        """Whether the current schedule serves ``seq`` holding ``main`` tokens in full pages."""
        key = self._sched_key
        return key is not None and key.shape == seq.shape and bool((key == seq).all()) and \
            not bool((main > self._sched_main).any())

    def schedule(self, seq: np.ndarray, cover: np.ndarray) -> None:
        """Make the split-K schedule for ``seq`` holding up to ``cover`` tokens in full pages each (the kernel
        cuts every work item at the sequence's tokens, so it serves any ``main <= cover``)."""
        cache = self.cache
        sched = make_schedule(cover, self.num_heads, self.group, cache.page_size, self._sm_count, residual=True)
        if sched.work.shape[0] > self.grid or sched.unit_items.shape[0] > self.units:
            raise MillionError(f"internal: a schedule of {sched.work.shape[0]} work items does not fit the "
                               f"plan's grid of {self.grid}")
        self._schedule = sched
        self._sched_key = seq.copy()
        self._sched_main = np.array(cover, dtype=np.int64)
        self._staged = [False, False]
        self.schedules += 1

    def update(self, seq: np.ndarray, main: np.ndarray, res: np.ndarray, stream, extra: np.ndarray | None = None) -> None:
        """Point the launches at ``seq`` (int64 slot ids, at most ``capacity``, as scheduled) holding ``main``
        tokens in full pages and ``res`` residual tokens each.

        Writes the staging buffer and queues its single host-to-device copy on ``stream`` (a CuPy stream),
        ordered after every launch queued there before it: launch the plan's kernels on the same stream.
        ``extra`` (int32, at most ``extra_words``) goes to :attr:`extra`. The schedule and the per-batch
        words are copied into a staging buffer only when it holds an older schedule.
        """
        B = seq.shape[0]
        self.step_main[:B] = main
        self.step_res[:B] = res
        if extra is not None:
            self.step_extra[: extra.shape[0]] = extra
        self.publish(seq, stream)

    def publish(self, seq: np.ndarray, stream) -> None:
        """:meth:`update` for a caller that keeps the per-step words in :attr:`step_main`, :attr:`step_res` and
        :attr:`step_extra` (views of :attr:`step_words`, laid out as the device buffer's tail): they are staged
        with one copy (a decode step's state lives there, DecodeStep)."""
        t = self._stage_schedule(seq)
        self._step_staging[t][:] = self.step_words
        self._send_staged(t, self._words, stream)

    def publish_schedule(self, seq: np.ndarray, stream) -> None:
        """:meth:`publish` of the schedule and the per-batch words only (a new schedule for a batch whose per-step
        words :meth:`publish_step` sends)."""
        self._send_staged(self._stage_schedule(seq), self._head_words, stream)

    def _send_staged(self, t: int, words: int, stream) -> None:
        """Copy the first ``words`` words of staging buffer ``t`` to the device buffer; its event marks them sent."""
        if self._zeroed is not None:
            stream.wait_event(self._zeroed)
            self._zeroed = None
        self._memcpy(self._dev_at, self._host_at[t], 4 * words, 1, stream.ptr)  # 1: host to device
        self._copied[t].record(stream)
        self._recorded[t] = True

    def _stage_schedule(self, seq: np.ndarray) -> int:
        """The staging buffer of the next copy, holding the current schedule and ``seq``'s per-batch words."""
        t = self._claim_turn()
        self._turn ^= 1
        if not self._staged[t]:
            B = seq.shape[0]
            sched = self._schedule
            w = sched.work.shape[0]
            work = self._work[t]
            work[:w] = sched.work
            work[w:] = -1  # padding items: the kernel returns at once
            self._unit_items[t][: sched.unit_items.shape[0]] = sched.unit_items
            self._page_row[t][:B] = seq * self.cache.max_blocks_per_seq
            self._res_row[t][:B] = seq
            self._staged[t] = True
        return t

    def publish_step(self, stream) -> None:
        """:meth:`publish` of the per-step words alone (:attr:`step_words`): the schedule and the per-batch words
        stay as last published. One NumPy copy and one host-to-device copy; an event per half of the slots."""
        i = self._slot
        if i % (STEP_SLOTS // 2) == 0:
            half = i // (STEP_SLOTS // 2)
            self._half_copied[half ^ 1].record(stream)  # covers every copy from the other half
            self._half_copied[half].synchronize()  # recorded when the other half started: this half's copies are done
        self._slots[i] = self.step_words
        self._memcpy(self._step_dev_at, self._slots_at + i * self._step_bytes, self._step_bytes, 1, stream.ptr)
        self._slot = (i + 1) % STEP_SLOTS

    def launch(self, layer: int, dtype: Any) -> kernels.BoundLaunch:
        """The bound attention launch of ``layer`` (built once): arguments 0, :attr:`OUT_ARG` and
        ``OUT_ARG + 1`` (q, out, lse) are set per call with ``set_arg``."""
        key = (layer, dtype)
        bound = self._launches.get(key)
        if bound is None:
            cache = self.cache
            d, m, g = cache.head_dim, self._m, self.group
            null = np.uint64(0)
            ring_cap = np.int32(max(cache.ring_slots, 1))  # an exact cache has no ring, and never reads one
            args = (null, *self._layer_args(layer), self.page_row, self.main_len, self.res_len, self.res_row,
                    ring_cap, np.int32(1), self.work, self.unit_items, self.part_o, self.part_lse,
                    self.counter, null, null, np.int32(self.num_heads), np.int32(cache.num_kv_heads),
                    np.float32(self._scale * math.log2(math.e)))
            assert args[self.OUT_ARG] is null and args[self.OUT_ARG + 1] is null
            kernel = kernels.get_kernel(SOURCE, _expr(self.mode, d, m, g, dtype_name(dtype)))
            bound = self._launches[key] = kernels.BoundLaunch(kernel, self.grid, THREADS,
                                                              smem_bytes(self.mode, d, m, g), args)
        return bound

    #: Index of ``out`` in the kernel's arguments (``lse`` follows it).
    OUT_ARG = 23

    def _layer_args(self, layer: int) -> tuple:
        """The arguments fixed for a layer (:func:`paged_layer_storage`), made once per plan."""
        fixed = self._layer_fixed.get(layer)
        if fixed is None:
            fixed = self._layer_fixed[layer] = paged_layer_storage(self.cache, layer)
        return fixed

    def attend(self, layer: int, q, out, lse, stream_ptr: int) -> None:
        """Launch layer ``layer``'s attention of ``q`` into ``out`` (and ``lse`` or None) on ``stream_ptr``;
        arrays checked by the caller (C-contiguous CuPy, q and out ``(B, num_heads, head_dim)``)."""
        bound = self._launches.get((layer, q.dtype)) or self.launch(layer, q.dtype)
        bound.set_arg(0, q.data.ptr)
        bound.set_arg(self.OUT_ARG, out.data.ptr)
        bound.set_arg(self.OUT_ARG + 1, 0 if lse is None else lse.data.ptr)
        bound.launch(stream_ptr)


class PagedLayerStorage(NamedTuple):
    """What a kernel reading one layer of a GPU PagedPQCache takes, in the kernels' argument order: both
    codebooks in the kernels' fp16 ``[c][m]`` layout (``PagedPQCache.kernel_codebooks``) and the elements
    between kv heads' codebooks (0: shared), the layer's K and V code sections of the pool, its exact tokens (the
    residual rings), the bytes per page and per kv head of a page (``P * M``), the block table and
    ``log2(page_size)``. An exact cache's: placeholders for codebooks and codes, its K and V page sections as
    the exact tokens, and page / head strides in elements (``MODE_PAGED_EXACT``)."""

    k_centroids: Any
    v_centroids: Any
    codebook_head_stride: np.int64
    k_codes: Any
    v_codes: Any
    exact_k: Any
    exact_v: Any
    page_stride: np.int64
    head_stride: np.int64
    block_table: Any
    page_shift: np.int32


def paged_layer_storage(cache, layer: int) -> PagedLayerStorage:
    """The storage of ``layer`` of a GPU cache as the paged kernels read it (views and the cache's kernel
    codebooks; keep the result for the layer's launches)."""
    shift = np.int32(cache.page_size.bit_length() - 1)
    if not cache.quantized:
        cp = cupy()
        with cache.stream:
            none16, none8 = cp.empty(16, dtype=cp.float16), cp.empty(16, dtype=cp.uint8)  # never read
        item = cache.array_dtype.itemsize
        return PagedLayerStorage(none16, none16, np.int64(0), none8, none8, cache.k_pages(layer),
                                 cache.v_pages(layer), np.int64(cache.page_nbytes // item),
                                 np.int64(cache.page_size * cache.head_dim), cache.block_table, shift)
    kc, vc = cache.kernel_codebooks(layer)
    flat = cache.pool.reshape(-1)
    return PagedLayerStorage(
        kc, vc, np.int64(kc.shape[1] * kc.shape[2] * kc.shape[3] if kc.shape[0] > 1 else 0),
        flat[cache.code_offset(layer, 0):], flat[cache.code_offset(layer, 1):], cache.residual_k(layer),
        cache.residual_v(layer), np.int64(cache.page_nbytes), np.int64(cache.page_size * cache.M),
        cache.block_table, shift,
    )


def capacity_for(batch: int) -> int:
    """Plan capacity for a batch: the next power of two (plans are re-made only when a batch outgrows it)."""
    return 1 << max(0, int(batch) - 1).bit_length()


# ---------------------------------------------------------------------------------------------------
# Plan / run over a PagedPQCache
# ---------------------------------------------------------------------------------------------------


class BatchDecodeWrapper:
    """Plan once per decode step, run once per layer (FlashInfer's BatchDecodeWithPagedKVCacheWrapper shape).

    >>> wrapper = BatchDecodeWrapper(cache, num_heads=32)
    >>> wrapper.plan(seq_ids, new_tokens=1)      # before the step's appends; reserves pages
    >>> for layer in range(cache.num_layers):
    ...     cache.append(layer, seq_ids, k, v)
    ...     out = wrapper.run(layer, q)           # (B, num_heads, head_dim)

    The appends here are the cache's general ``append`` (host index math per call). A decode loop that
    appends one token per sequence and layer runs faster through :class:`~million_cupy.step.DecodeStep`,
    whose appends are prepared by its plan.
    """

    def __init__(self, cache, num_heads: int | None = None, *, stream: Any = None) -> None:
        """``stream``: a CuPy stream or raw handle for every launch; None = CuPy's current stream when a plan
        is made (so ``with stream:`` blocks and CUDA-graph capture work as usual)."""
        require_native_attention(cache, num_heads, "BatchDecodeWrapper", "million_cupy.decode()")
        self.cache = cache
        self.num_heads = num_heads
        self._stream = stream
        self._attn: AttentionPlan | None = None
        self._seq: np.ndarray | None = None
        self._n: np.ndarray | None = None        # tokens each planned layer holds when run() is called
        self._layers: set[int] = set()
        self._version = -1                        # cache.version when the plan was made
        self._ids_key: tuple | None = None
        self._scale_arg: float | None = None
        self._q_shape: tuple[int, int, int] = (0, 0, 0)
        self._stats = {"plans": 0, "plans_reused": 0, "runs": 0, "work_items": 0, "schedules": 0,
                       "generic_path_runs": 0}

    # -- planning ----------------------------------------------------------------------------------
    def plan(self, seq_ids: Sequence[int] | np.ndarray, new_tokens: int = 1, *, num_heads: int | None = None,
             scale: float | None = None, layers: Sequence[int] | None = None) -> None:
        """Schedule a decode step for ``seq_ids``.

        ``new_tokens`` is how many tokens each sequence will have appended to every layer before
        ``run(layer)`` is called (1 in a decode loop that appends then attends; 0 when the cache already
        holds the step's tokens). Pages those appends will fill are reserved now, so ``run`` needs no
        allocation and no synchronisation. ``layers`` restricts the plan to some layers (default: all,
        which must then hold equal lengths). A plan with ``new_tokens = 0`` for the batch, heads and scale
        of the previous one, while the cache has not changed, costs only that comparison.
        """
        cache = self.cache
        nh = num_heads or self.num_heads
        if nh is None:
            raise ValueError("plan: num_heads is required (pass it here or to BatchDecodeWrapper)")
        if nh % cache.num_kv_heads:
            raise ValueError(f"plan: num_heads={nh} must be a multiple of num_kv_heads={cache.num_kv_heads}")
        if new_tokens < 0:
            raise ValueError(f"plan: new_tokens must be >= 0, got {new_tokens}")
        softmax = softmax_scale(cache, scale)  # checked before the reservation below: a bad scale changes nothing
        seq = np.asarray(seq_ids).reshape(-1)
        if seq.size == 0:
            raise ValueError("plan: seq_ids is empty")
        if seq.dtype.kind not in "iu":  # not a cast: 1.5 is no sequence id
            raise TypeError(f"plan: expected integer sequence ids, got dtype {seq.dtype}")
        seq = seq.astype(np.int64, copy=False)
        planned = list(range(cache.num_layers)) if layers is None else [int(x) for x in layers]
        bad = [x for x in planned if not 0 <= x < cache.num_layers]
        if bad or not planned:
            raise ValueError(f"plan: layers must be a non-empty subset of [0, {cache.num_layers}), got {planned}")
        attn = self._attn
        same_heads = attn is not None and attn.num_heads == nh and attn.scale == softmax
        if new_tokens == 0 and same_heads and self._reuse(seq, planned):
            return
        # Expected per-layer lengths when run(layer) is called.
        seq = cache.check_ids(seq, "plan", unique=False)
        n = cache.lengths[planned[0], seq] + new_tokens
        if np.any(n == 0):
            raise ValueError(f"plan: sequences {seq[n == 0].tolist()} hold no tokens; nothing to attend to")
        if any(not np.array_equal(cache.lengths[x, seq] + new_tokens, n) for x in planned[1:]):
            raise ValueError("plan: the planned layers hold different lengths for these sequences; append every "
                             "layer first, or plan the layers separately (layers=[...])")
        # Made before any page is reserved (it may not fit the device), put in use after.
        if attn is None or not same_heads or attn.capacity < seq.shape[0]:
            attn = AttentionPlan(cache, nh, capacity_for(seq.shape[0]), scale=scale)
        if new_tokens:
            cache.reserve(seq, new_tokens)
        self._attn = attn
        P = cache.page_size
        main = cache.full_pages(n) * P
        if not attn.covers(seq, main):
            attn.schedule(seq, cache.full_pages(n + (new_tokens and SCHEDULE_HORIZON)) * P)
        attn.update(seq, main, n - main, as_stream(self._stream))
        self._seq, self._n, self._layers = seq, n, set(planned)
        self._ids_key = tuple(seq.tolist())  # decode()'s cheap test for a repeated call on this batch
        self._scale_arg = scale
        self._q_shape = (seq.shape[0], nh, cache.head_dim)
        self._version = cache.version
        self._stats["plans"] += 1
        self._stats["work_items"] = len(attn._schedule.work)
        self._stats["schedules"] = attn.schedules

    def _reuse(self, seq: np.ndarray, layers: Sequence[int]) -> bool:
        """Keep the current plan for attention-only runs of ``seq`` over ``layers`` if nothing changed since it
        was made (same batch, cache untouched, the layers holding the planned lengths)."""
        cache = self.cache
        if cache.version != self._version or self._seq is None or seq.shape != self._seq.shape \
                or not (seq == self._seq).all():
            return False
        for x in layers:
            if x not in self._layers:
                if not (cache.lengths[x, seq] == self._n).all():
                    return False
                self._layers.add(x)
        self._stats["plans_reused"] += 1
        return True

    # -- running -----------------------------------------------------------------------------------
    def run(self, layer: int, q: Any, *, out: Any = None, lse: Any = None, return_lse: bool = False,
            check: bool = True):
        """Attention of ``q`` (B, num_heads, head_dim) over layer ``layer`` for the planned batch.

        Returns ``out`` (a CuPy array, or the caller's ``out``), or ``(out, lse)`` with ``return_lse`` /
        a caller-provided ``lse`` (float32 (B, num_heads), natural log). ``check=False`` skips the
        host-side check that the layer holds the planned lengths (for CUDA-graph capture, or to save its
        microseconds of host time per layer). The launch's arguments are bound once per plan capacity;
        a call sets only q, out and lse and launches.
        """
        attn, seq, planned_lens = self._attn, self._seq, self._n
        if attn is None or seq is None or planned_lens is None:
            raise MillionError("run() before plan(): call plan(seq_ids, new_tokens) once per decode step")
        cache = self.cache
        if not 0 <= layer < cache.num_layers:
            raise IndexError(f"layer must be in [0, {cache.num_layers}), got {layer}")
        if layer not in self._layers:
            raise MillionError(f"layer {layer} is not in this plan (planned: {sorted(self._layers)})")
        if check and not np.array_equal(cache.lengths[layer, seq], planned_lens):
            got = cache.seq_lens(layer, seq)  # validates the ids: a sequence freed since plan() raises
            bad = int(np.nonzero(got != planned_lens)[0][0])
            raise MillionError(
                f"layer {layer}: plan expected sequence {int(seq[bad])} to hold {int(planned_lens[bad])} tokens, "
                f"it holds {int(got[bad])} (append the step's tokens before run, or plan again)"
            )
        q, out, lse = attention_arrays(q, out, lse, return_lse, (seq.shape[0], attn.num_heads, cache.head_dim),
                                        cache.array_dtype)
        attn.attend(layer, q, out, lse, as_stream(self._stream).ptr)
        self._stats["runs"] += 1
        return (out, lse) if (return_lse or lse is not None) else out

    def stats(self) -> dict:
        """Counters: ``plans`` made, ``plans_reused`` (repeated plans that changed nothing), ``runs``,
        ``work_items`` of the last plan, ``schedules`` computed, and ``generic_path_runs`` (always 0: every
        supported configuration has a native kernel; others raise UnsupportedConfiguration)."""
        return dict(self._stats)


#: Query dtypes of the CPU path (the GPU kernels take the cache dtype).
QUERY_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _check_query_heads(q, B: int, cache) -> None:
    """q must be ``(B, num_heads, head_dim)`` with ``num_heads`` a multiple of the cache's kv heads."""
    if q.shape[0] != B or q.shape[2] != cache.head_dim or q.shape[1] % cache.num_kv_heads:
        raise ValueError(f"q: expected shape ({B}, num_heads, {cache.head_dim}) with num_heads a multiple of "
                         f"num_kv_heads = {cache.num_kv_heads}, got {tuple(q.shape)}")


def check_scale(scale: float | None) -> None:
    """Raise ValueError unless ``scale`` is None or a positive finite softmax scale."""
    if scale is not None and not (isinstance(scale, (int, float, np.floating, np.integer)) and
                                  math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a positive finite softmax scale or None, got {scale!r}")


def softmax_scale(cache, scale: float | None) -> float:
    """The softmax scale of attention over ``cache``: ``scale``, or ``1 / sqrt(head_dim)`` when None (ValueError
    unless a positive finite number)."""
    check_scale(scale)
    return (1.0 / math.sqrt(cache.head_dim)) if scale is None else float(scale)


def attention_arrays(q, out, lse, return_lse: bool, shape: tuple[int, int, int], dtype: np.dtype):
    """``(q, out, lse)`` ready for a launch: C-contiguous CuPy arrays of ``shape`` and ``dtype`` (lse
    ``shape[:2]`` float32 or None). The per-layer hot path passes exact arrays with a few comparisons."""
    cp = cupy()
    if not (type(q) is cp.ndarray and q.shape == shape and q.dtype == dtype and q.flags.c_contiguous):
        q = as_array(q, "q", shape=shape, dtypes=(dtype_name(dtype),), on_gpu=True)
        if not q.flags.c_contiguous:
            raise ValueError(f"q: expected a C-contiguous array {shape}")
    if type(out) is cp.ndarray and out.shape == shape and out.dtype == q.dtype and out.flags.c_contiguous:
        if lse is None and not return_lse:
            return q, out, None
        if type(lse) is cp.ndarray and lse.shape == shape[:2] and lse.dtype == np.float32 and lse.flags.c_contiguous:
            return q, out, lse  # the parallel caches' exchange buffer: both given, exactly right
    out, lse = _outputs(out, lse, return_lse, shape, q.dtype)
    return q, out, lse


def _nullable(arr):
    return np.uint64(0) if arr is None else arr


def _outputs(out, lse, return_lse: bool, shape: tuple[int, int, int], dtype):
    cp = cupy()
    if out is None:
        out = cp.empty(shape, dtype=dtype)
    else:
        out = as_array(out, "out", shape=shape, dtypes=(dtype_name(dtype),), on_gpu=True)
        if not out.flags.c_contiguous:
            raise ValueError("out: expected a C-contiguous array")
    if lse is None and return_lse:
        lse = cp.empty(shape[:2], dtype=cp.float32)
    elif lse is not None:
        lse = as_array(lse, "lse", shape=shape[:2], dtypes=("float32",), on_gpu=True)
        if not lse.flags.c_contiguous:
            raise ValueError("lse: expected a C-contiguous array")
    return out, lse


# ---------------------------------------------------------------------------------------------------
# One-call convenience
# ---------------------------------------------------------------------------------------------------

# One wrapper per (cache, stream) for decode(): a repeated call on the same batch reuses its plan.
_decode_wrappers: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def decode(cache, layer: int, seq_ids: Sequence[int] | np.ndarray, q: Any, *, scale: float | None = None,
           return_lse: bool = False, out: Any = None, lse: Any = None, stream: Any = None):
    """Attention of one query token per sequence over ``cache`` layer ``layer`` (plan + run in one call).

    ``q`` ``(B, num_heads, head_dim)``; returns ``out`` of that shape, or ``(out, lse)`` (float32
    ``(B, num_heads)``, natural log) with ``return_lse`` or a caller's ``lse`` array to fill, as
    :meth:`BatchDecodeWrapper.run`.

    GPU cache: the native kernel through a :class:`BatchDecodeWrapper` kept for the cache and stream, so
    a repeated call on an unchanged batch reuses the plan and costs about one ``run``. CPU cache: the
    float64 NumPy reference over the dequantized cache, returned in q's dtype — exact but slow, for
    checking and for machines without a GPU.
    """
    if cache.is_gpu:
        cp = cupy()
        q_arr = q if type(q) is cp.ndarray and q.ndim == 3 else as_array(q, "q", ndim=3, on_gpu=True)
        if q_arr.dtype != cache.array_dtype:
            raise TypeError(f"q: expected dtype in {[cache.dtype]}, got {dtype_name(q_arr.dtype)}")
        per_stream = _decode_wrappers.get(cache)
        if per_stream is None:
            per_stream = _decode_wrappers[cache] = {}
        key = as_stream(stream).ptr
        wrapper = per_stream.get(key)
        if wrapper is None:
            wrapper = per_stream[key] = BatchDecodeWrapper(cache, stream=stream)
        attn = wrapper._attn
        # The decode loop's repeated call (the same list of ids, nothing changed since the plan): a few
        # comparisons, then the launch.
        if (attn is not None and (type(seq_ids) is list or type(seq_ids) is tuple) and scale == wrapper._scale_arg
                and cache.version == wrapper._version and layer in wrapper._layers
                and attn.num_heads == q_arr.shape[1] and tuple(seq_ids) == wrapper._ids_key):
            with_lse = return_lse or lse is not None
            q_arr, out, lse = attention_arrays(q_arr, out, lse, with_lse, wrapper._q_shape, cache.array_dtype)
            attn.attend(layer, q_arr, out, lse, key)
            wrapper._stats["runs"] += 1
            wrapper._stats["plans_reused"] += 1
            return (out, lse) if with_lse else out
        # Otherwise a repeated call on an unchanged batch skips plan() and its argument checks: only the comparison.
        if not (attn is not None and attn.num_heads == q_arr.shape[1] and attn.scale == softmax_scale(cache, scale)
                and 0 <= layer < cache.num_layers
                and wrapper._reuse(np.asarray(seq_ids, dtype=np.int64).reshape(-1), (layer,))):
            wrapper.plan(seq_ids, new_tokens=0, num_heads=q_arr.shape[1], scale=scale, layers=[layer])
        return wrapper.run(layer, q_arr, out=out, lse=lse, return_lse=return_lse, check=False)
    q_arr = as_array(q, "q", ndim=3, dtypes=QUERY_DTYPES, on_gpu=False)
    seq = cache.check_ids(seq_ids, "decode", unique=False)
    _check_query_heads(q_arr, len(seq), cache)
    lens = cache.lengths[cache.check_layer(layer), seq]
    if (lens == 0).any():
        raise ValueError(f"decode: sequences {seq[lens == 0].tolist()} hold no tokens in layer {layer}; "
                         f"attention over no keys is undefined")
    check_scale(scale)
    ks, vs = zip(*(cache.dequantize(layer, int(s)) for s in seq))
    o, l = reference.decode_attention(q_arr.astype(np.float64), list(ks), list(vs), scale=scale)
    o = o.astype(q_arr.dtype)
    if out is not None:
        np.copyto(out, o)
        o = out
    l = l.astype(np.float32)
    if lse is not None:
        np.copyto(lse, l)
        l = lse
    return (o, l) if (return_lse or lse is not None) else o


# ---------------------------------------------------------------------------------------------------
# Companions: contiguous PQ (MILLION's layout) and exact paged decode
# ---------------------------------------------------------------------------------------------------


def _host_ints(x, name: str, n: int) -> np.ndarray:
    # Schedules are built on the host; device arrays cost one synchronising copy here.
    arr = to_numpy(x).reshape(-1)
    if arr.size != n:
        raise ValueError(f"{name}: expected {n} entries, got {arr.size}")
    if np.any(arr < 0):
        raise ValueError(f"{name}: expected non-negative values, got min {int(arr.min())}")
    return arr.astype(np.int64)


#: What the companions' "no GPU" error suggests instead.
_CPU_ALTERNATIVE = ("on a machine without a GPU, million_cupy.reference.decode_attention computes the same attention "
                    "in float64 from K/V vectors (Codebook.decode turns codes into them), and million_cupy.decode() "
                    "does it for a CPU PagedPQCache")


def contiguous_pq_decode(q: Any, k_codes: Any, v_codes: Any, lengths: Any, k_centroids: Any, v_centroids: Any, *,
                         residual_k: Any = None, residual_v: Any = None, residual_lens: Any = None,
                         scale: float | None = None, return_lse: bool = False, out: Any = None, stream: Any = None):
    """Decode attention over MILLION's contiguous PQ layout: ``out`` (B, nh, d), or ``(out, lse)``.

    Arguments as :func:`prepare_contiguous_pq_decode`, which validates and schedules once and returns a launch
    to replay. GPU only (NumPy inputs are copied to the GPU); without one it raises DeviceUnavailable.
    """
    return prepare_contiguous_pq_decode(q, k_codes, v_codes, lengths, k_centroids, v_centroids,
                                        residual_k=residual_k, residual_v=residual_v, residual_lens=residual_lens,
                                        scale=scale, return_lse=return_lse, out=out, stream=stream)()


def paged_pq_decode(q: Any, k_pages: Any, v_pages: Any, indptr: Any, indices: Any, k_centroids: Any,
                    v_centroids: Any, *, residual_k: Any = None, residual_v: Any = None, residual_lens: Any = None,
                    scale: float | None = None, return_lse: bool = False, out: Any = None, stream: Any = None):
    """Decode attention over caller-managed PQ pages (CSR page table): ``out`` (B, nh, d), or ``(out, lse)``.

    Arguments as :func:`prepare_paged_pq_decode`. GPU only (NumPy inputs are copied to the GPU); without one it
    raises DeviceUnavailable.
    """
    return prepare_paged_pq_decode(q, k_pages, v_pages, indptr, indices, k_centroids, v_centroids,
                                   residual_k=residual_k, residual_v=residual_v, residual_lens=residual_lens,
                                   scale=scale, return_lse=return_lse, out=out, stream=stream)()


def paged_exact_decode(q: Any, k_pages: Any, v_pages: Any, indptr: Any, indices: Any, last_page_len: Any, *,
                       scale: float | None = None, return_lse: bool = False, out: Any = None, stream: Any = None):
    """Decode attention over an unquantized paged cache (FlashInfer's page-table convention): ``out``
    (B, nh, d), or ``(out, lse)``. Arguments as :func:`prepare_paged_exact_decode`. GPU only."""
    return prepare_paged_exact_decode(q, k_pages, v_pages, indptr, indices, last_page_len, scale=scale,
                                      return_lse=return_lse, out=out, stream=stream)()


def prepare_contiguous_pq_decode(q, k_codes, v_codes, lengths, k_centroids, v_centroids, *, residual_k=None,
                                 residual_v=None, residual_lens=None, scale: float | None = None,
                                 return_lse: bool = False, out=None, stream=None) -> _PreparedLaunch:
    """Decode attention over MILLION's contiguous PQ layout.

    q (B, nh, d); k_codes, v_codes uint8 (B, nh_k, T, M) (row-wise, not permuted); lengths (B,) valid tokens;
    centroids (Hc, M, 256, d // M) with Hc in {1, nh_k}; optional exact residual tokens residual_k/v
    (B, nh_k, Rcap, d) in q's dtype with residual_lens (B,), attended after the coded tokens.
    """
    require_gpu("contiguous_pq_decode", _CPU_ALTERNATIVE)
    q = as_array(q, "q", ndim=3, on_gpu=True)
    B, nh, d = q.shape
    dtype = dtype_name(q.dtype)
    k_codes = as_array(k_codes, "k_codes", ndim=4, dtypes=("uint8",), on_gpu=True)
    nh_k, tcap, m = k_codes.shape[1], k_codes.shape[2], k_codes.shape[3]
    v_codes = as_array(v_codes, "v_codes", shape=k_codes.shape, dtypes=("uint8",), on_gpu=True)
    check_native_config(d, m, dtype, None)
    if k_codes.shape[0] != B or nh % nh_k:
        raise ValueError(f"k_codes: expected ({B}, nh_k dividing {nh}, T, M), got {tuple(k_codes.shape)}")
    lens = _host_ints(lengths, "lengths", B)
    if np.any(lens > tcap):
        raise ValueError(f"lengths: expected <= {tcap} (codes capacity), got max {int(lens.max())}")
    kc, vc = _centroid_pair(k_centroids, v_centroids, m, d, nh_k)
    rk, rv, rlens = _residual_args(q, residual_k, residual_v, residual_lens, nh_k)
    if np.any(lens + rlens == 0):
        raise ValueError("a sequence has no tokens (lengths + residual_lens == 0)")
    cp = cupy()
    k_codes, v_codes = cp.ascontiguousarray(k_codes), cp.ascontiguousarray(v_codes)
    return _run_standalone(
        MODE_CONTIG_PQ, q, d, m, 64, lens, rlens, scale, return_lse, out, stream,
        codebooks=(kc, vc), k_codes=k_codes, v_codes=v_codes, exact=(rk, rv),
        page_stride=nh_k * tcap * m, head_stride=tcap * m, page_table=None, page_row=None,
        res_row=np.arange(B, dtype=np.int32), ring_cap=rk.shape[2], nh_k=nh_k,
    )


def prepare_paged_pq_decode(q, k_pages, v_pages, indptr, indices, k_centroids, v_centroids, *, residual_k=None,
                            residual_v=None, residual_lens=None, scale: float | None = None,
                            return_lse: bool = False, out=None, stream=None) -> _PreparedLaunch:
    """Decode attention over caller-managed PQ pages with a CSR page table (no PagedPQCache needed).

    k_pages, v_pages: uint8 pages in the stored layout of :func:`million_cupy.cache.pack_pages` (K
    ``(num_pages, nh_k, M // kc, P, kc)`` with ``kc = min(M, 16)``, V ``(num_pages, nh_k, P // 16, M, 16)``);
    the launch reads them in place, so pages written later are seen by later replays. Sequence b owns the
    full pages indices[indptr[b]:indptr[b+1]]; optional exact residual tokens (B, nh_k, Rcap, d) with
    residual_lens.

    Deprecated: the 0.1 layout (K ``(num_pages, nh_k, P, M)`` with rows XOR-permuted, V
    ``(num_pages, nh_k, M, P)``) is still accepted; it is converted (copied) once here, with a warning.
    """
    require_gpu("paged_pq_decode", _CPU_ALTERNATIVE)
    q = as_array(q, "q", ndim=3, on_gpu=True)
    B, nh, d = q.shape
    dtype = dtype_name(q.dtype)
    k_pages, v_pages = _stored_pages(k_pages, v_pages)
    _, nh_k, chunks, P, kcb = k_pages.shape
    m = chunks * kcb
    check_native_config(d, m, dtype, P)
    if nh % nh_k:
        raise ValueError(f"k_pages: nh_k={nh_k} must divide num_heads={nh}")
    ptr = _host_ints(indptr, "indptr", B + 1)
    npages = np.diff(ptr)
    if np.any(npages < 0):
        raise ValueError("indptr: expected a non-decreasing array")
    kc, vc = _centroid_pair(k_centroids, v_centroids, m, d, nh_k)
    rk, rv, rlens = _residual_args(q, residual_k, residual_v, residual_lens, nh_k)
    lens = npages * P
    if np.any(lens + rlens == 0):
        raise ValueError("a sequence has no tokens (no pages and no residual tokens)")
    indices = as_array(indices, "indices", ndim=1, dtypes=("int32",), on_gpu=True)
    return _run_standalone(
        MODE_PAGED_PQ, q, d, m, P, lens, rlens, scale, return_lse, out, stream,
        codebooks=(kc, vc), k_codes=k_pages, v_codes=v_pages,
        exact=(rk, rv), page_stride=nh_k * P * m, head_stride=P * m, page_table=indices, page_row=ptr[:-1],
        res_row=np.arange(B, dtype=np.int32), ring_cap=rk.shape[2], nh_k=nh_k,
    )


_legacy_pages_warned = False


def _stored_pages(k_pages, v_pages):
    """Validated (k_pages, v_pages) in the stored layout (cache.pack_pages); converts the 0.1 layout."""
    global _legacy_pages_warned
    k_pages = as_array(k_pages, "k_pages", dtypes=("uint8",), on_gpu=True)
    if k_pages.ndim == 4:  # the 0.1 layout: rows [t][m] XOR-permuted, V [m][t]
        n, nh_k, P, m = k_pages.shape
        v_pages = as_array(v_pages, "v_pages", shape=(n, nh_k, m, P), dtypes=("uint8",), on_gpu=True)
        if not _legacy_pages_warned:
            warnings.warn("paged_pq_decode: 4-D pages (the 0.1 layout) are converted with a copy on every "
                          "prepare; store pages with million_cupy.cache.pack_pages instead", FutureWarning,
                          stacklevel=3)
            _legacy_pages_warned = True
        cp = cupy()
        return pack_pages(permute_k_rows(k_pages, cp.arange(P)), cp.swapaxes(v_pages, -2, -1))
    if k_pages.ndim != 5:
        raise ValueError(f"k_pages: expected (num_pages, nh_k, M // kc, P, kc) uint8 (cache.pack_pages), "
                         f"got shape {tuple(k_pages.shape)}")
    v_pages = as_array(v_pages, "v_pages", shape=stored_v_shape(k_pages.shape), dtypes=("uint8",), on_gpu=True)
    cp = cupy()
    return cp.ascontiguousarray(k_pages), cp.ascontiguousarray(v_pages)


def _residual_args(q, residual_k, residual_v, residual_lens, nh_k: int):
    cp = cupy()
    B, _, d = q.shape
    dtype = dtype_name(q.dtype)
    if residual_k is None:
        empty = cp.empty((B, nh_k, 1, d), dtype=q.dtype)
        return empty, empty, np.zeros(B, dtype=np.int64)
    rk = as_array(residual_k, "residual_k", ndim=4, dtypes=(dtype,), on_gpu=True)
    rv = as_array(residual_v, "residual_v", shape=rk.shape, dtypes=(dtype,), on_gpu=True)
    if rk.shape[:2] != (B, nh_k) or rk.shape[3] != d:
        raise ValueError(f"residual_k: expected ({B}, {nh_k}, Rcap, {d}), got {tuple(rk.shape)}")
    rlens = _host_ints(residual_lens, "residual_lens", B)
    if np.any(rlens > rk.shape[2]):
        raise ValueError(f"residual_lens: expected <= {rk.shape[2]}, got max {int(rlens.max())}")
    return cp.ascontiguousarray(rk), cp.ascontiguousarray(rv), rlens


def prepare_paged_exact_decode(q, k_pages, v_pages, indptr, indices, last_page_len, *,
                               scale: float | None = None, return_lse: bool = False, out=None,
                               stream=None) -> _PreparedLaunch:
    """Decode attention over an unquantized paged cache with a CSR page table (FlashInfer's convention).

    k_pages, v_pages (num_pages, nh_k, P, d) in q's dtype; sequence b owns pages
    indices[indptr[b]:indptr[b+1]] and its last page holds last_page_len[b] tokens.
    """
    require_gpu("paged_exact_decode", _CPU_ALTERNATIVE)
    q = as_array(q, "q", ndim=3, on_gpu=True)
    B, nh, d = q.shape
    dtype = dtype_name(q.dtype)
    k_pages = as_array(k_pages, "k_pages", ndim=4, dtypes=(dtype,), on_gpu=True)
    v_pages = as_array(v_pages, "v_pages", shape=k_pages.shape, dtypes=(dtype,), on_gpu=True)
    _, nh_k, P, dk = k_pages.shape
    if dk != d or nh % nh_k:
        raise ValueError(f"k_pages: expected (num_pages, nh_k dividing {nh}, P, {d}), got {tuple(k_pages.shape)}")
    check_native_config(d, None, dtype, P)
    ptr = _host_ints(indptr, "indptr", B + 1)
    last = _host_ints(last_page_len, "last_page_len", B)
    npages = np.diff(ptr)
    if np.any(npages <= 0) or np.any(last > P) or np.any(last <= 0):
        raise ValueError("indptr/last_page_len: every sequence needs >= 1 page and 1 <= last_page_len <= page_size")
    lens = (npages - 1) * P + last
    cp = cupy()
    indices = as_array(indices, "indices", ndim=1, dtypes=("int32",), on_gpu=True)
    k_pages, v_pages = cp.ascontiguousarray(k_pages), cp.ascontiguousarray(v_pages)
    return _run_standalone(
        MODE_PAGED_EXACT, q, d, _exact_m(d), P, lens, np.zeros(B, np.int64), scale, return_lse, out, stream,
        codebooks=None, k_codes=None, v_codes=None, exact=(k_pages, v_pages),
        page_stride=nh_k * P * d, head_stride=P * d, page_table=indices, page_row=ptr[:-1],
        res_row=np.zeros(B, np.int32), ring_cap=1, nh_k=nh_k,
    )


def _centroid_pair(k_centroids, v_centroids, m: int, d: int, nh_k: int):
    kc = as_array(k_centroids, "k_centroids", on_gpu=True)
    vc = as_array(v_centroids, "v_centroids", on_gpu=True)
    for name, c in (("k_centroids", kc), ("v_centroids", vc)):
        if c.ndim == 3:
            c = c[None]
        if c.ndim != 4 or c.shape[1:] != (m, 256, d // m) or c.shape[0] not in (1, nh_k):
            raise ValueError(f"{name}: expected (Hc in {{1, {nh_k}}}, {m}, 256, {d // m}), got {tuple(c.shape)}")
    kc = kc[None] if kc.ndim == 3 else kc
    vc = vc[None] if vc.ndim == 3 else vc
    return kernel_codebooks(kc, vc)


def _run_standalone(mode, q, d, m, page, lens, rlens, scale, return_lse, out, stream, *, codebooks, k_codes,
                    v_codes, exact, page_stride, head_stride, page_table, page_row, res_row, ring_cap, nh_k):
    cp = cupy()
    check_scale(scale)
    B, nh, _ = q.shape
    dev = _device()
    g = choose_group(mode, d, m, nh // nh_k, dev.smem_limit)
    sched = make_schedule(lens, nh, g, page if mode == MODE_PAGED_EXACT else 1, dev.sm_count,
                          residual=mode != MODE_PAGED_EXACT)
    st = as_stream(stream)
    with st:
        dummy8 = cp.empty(16, dtype=cp.uint8)
        kc, vc = codebooks if codebooks is not None else (cp.empty(16, cp.float32), cp.empty(16, cp.float16))
        out, lse = _outputs(out, None, return_lse, (B, nh, d), q.dtype)
        w, u = len(sched.work), len(sched.unit_items)
        args = (
            cp.ascontiguousarray(q), kc, vc,
            np.int64(kc.shape[1] * kc.shape[2] * kc.shape[3] if codebooks is not None and kc.shape[0] > 1 else 0),
            k_codes if k_codes is not None else dummy8, v_codes if v_codes is not None else dummy8,
            exact[0], exact[1], np.int64(page_stride), np.int64(head_stride),
            page_table if page_table is not None else cp.zeros(1, cp.int32), np.int32(page.bit_length() - 1),
            cp.asarray(page_row if page_row is not None else np.zeros(B), dtype=cp.int64),
            cp.asarray(lens, dtype=cp.int32), cp.asarray(rlens, dtype=cp.int32), cp.asarray(res_row, dtype=cp.int32),
            np.int32(ring_cap), np.int32(0),
            cp.asarray(sched.work), cp.asarray(sched.unit_items),
            cp.empty((w, g, d), cp.float32), cp.empty((w, g), cp.float32), cp.zeros(u, cp.int32),
            out, _nullable(lse), np.int32(nh), np.int32(nh_k),
            np.float32(((1.0 / math.sqrt(d)) if scale is None else float(scale)) * math.log2(math.e)),
        )
        kernel = kernels.get_kernel(SOURCE, _expr(mode, d, m, g, dtype_name(q.dtype)))
    return _PreparedLaunch(kernel, w, smem_bytes(mode, d, m, g), args, st, (out, lse) if return_lse else out)


class _PreparedLaunch:
    """A fully argument-bound kernel launch: calling it only launches (benchmarks replay it)."""

    def __init__(self, kernel, work_items: int, smem: int, args: tuple, stream, result) -> None:
        self._launch = kernels.BoundLaunch(kernel, work_items, THREADS, smem, args)
        self._stream = stream
        self.result = result

    def __call__(self):
        self._launch.launch(self._stream.ptr)
        return self.result


# ---------------------------------------------------------------------------------------------------
# State merge
# ---------------------------------------------------------------------------------------------------


def merge_states(v_a, s_a, v_b, s_b):
    """Merge two attention states over disjoint key sets of the same queries.

    v_* (..., d) outputs, s_* (...) natural-log lse. Returns (v, s). NumPy or CuPy, by the inputs' side.
    """
    a = as_array(v_a, "v_a")
    xp = cupy() if is_gpu_array(a) else np
    b = as_array(v_b, "v_b", shape=a.shape, on_gpu=xp is not np)
    sa = as_array(s_a, "s_a", shape=a.shape[:-1], on_gpu=xp is not np)
    sb = as_array(s_b, "s_b", shape=a.shape[:-1], on_gpu=xp is not np)
    v, s = merge_state_stack(xp.stack([a, b]), xp.stack([sa, sb]))
    return v.astype(a.dtype), s


def merge_state_stack(v, s):
    """Merge ``n`` attention states over disjoint key sets of the same queries in one pass.

    v ``(n, ..., d)`` outputs, s ``(n, ...)`` natural-log lse (``-inf`` for a state over no keys; its output
    is ignored, NaN included). Returns (v float32 ``(..., d)``, s float32 ``(...)``); ``-inf`` and zeros
    where no state has keys. NumPy or CuPy, by v's side.
    """
    xp = cupy() if is_gpu_array(v) else np
    s = s.astype(xp.float32, copy=False)
    if s.shape != v.shape[:-1]:
        raise ValueError(f"s: expected the shape {v.shape[:-1]} of v without its last axis, got {s.shape}")
    mx = s.max(axis=0)
    safe = xp.where(xp.isfinite(mx), mx, 0)
    w = xp.exp(s - safe)  # 0 for states over no keys
    tot = w.sum(axis=0)
    acc = xp.where(w[..., None] > 0, v.astype(xp.float32, copy=False), 0) * w[..., None]
    den = xp.where(tot > 0, tot, 1)
    out = acc.sum(axis=0) / den[..., None]
    return out, xp.where(tot > 0, safe + xp.log(den), -xp.inf).astype(xp.float32)

