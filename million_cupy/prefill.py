"""Several new query tokens per sequence over a PagedPQCache: speculative verification, chunked prefill,
multi-turn prompts.

The new tokens are appended to the cache first (``PagedPQCache.append`` takes any count per sequence, flushes
included). New token ``j`` of the ``c_b`` of sequence ``b`` then attends causally to the first
``n_b - c_b + j + 1`` tokens of the sequence (``n_b`` its length after the append): PQ pages and the exact
residual window as the cache holds them after the append, so a token that became part of a full page in the
same call is read through its codes by every query, as later decode steps read it.

* :class:`BatchPrefillWrapper` — plan once per batch of new tokens (``qo_indptr``, FlashInfer's CSR of query
  tokens per sequence), run once per layer; no synchronisation in ``run``, one upload of the metadata per
  ``plan`` into device buffers at fixed addresses. Speculative verification can be captured in a CUDA graph
  (below).
* :func:`prefill_attention` — the one-call form; on a CPU cache it computes the float64 reference
  (:func:`million_cupy.reference.causal_attention`).

Regime (the documented rule), chosen per plan from the longest sequence's new-token count ``c`` and the
query rows it makes per kv head (``c x`` GQA group):

* ``c <=`` :data:`LUT_QUERIES_MAX`, unless the next case applies: every query token is one work item of the
  LUT-scored decode kernel, cut at its causal length. A batch of ``N`` query tokens costs about ``N``
  one-token decodes.
* ``c <=`` LUT_QUERIES_MAX with at most 16 rows, and on average at least :data:`FRAGMENT_QUERIES_MIN` new tokens
  per sequence, or 2 over histories averaging :data:`FRAGMENT_PAIR_TOKENS_MIN` tokens (speculative
  verification of 2 to 4 drafts at GQA 4, up to 5 at GQA 1; the cost is per sequence, the LUT path's per
  token): tensor cores, one row tile per kv head, ``verify_attention``
  (``cuda_src/prefill_attention.cu``), which gathers centroids straight into the MMA fragments; its cost is
  the history's dequantization, ~1.4 one-token decodes whatever the rows (8 x 32K, H200, M = 64:
  154-158 us at q = 2..4 against 114 us for one token and ~97 us per query token on the LUT path). With 17 to
  32 rows (two row tiles: 5 to 8 drafts at GQA 4, 3 to 4 at GQA 8) the same kernel costs ~2 decodes (~223 us;
  every warp scores all rows, Q's fragments wait in shared memory), so such a batch takes it from
  :data:`FRAGMENT_QUERIES_MIN_TWO_TILES` new tokens per sequence on average.
* ``c >`` LUT_QUERIES_MAX (chunked prefill, a multi-turn prompt, many drafts): the whole batch runs on tensor
  cores. With at least :data:`DENSE_ROWS_MIN` query rows per kv head in the longest sequence (``c x`` group
  >= 512: 128 new tokens at GQA 4), the **dense regime**: ``dequantize_history`` writes each (sequence, kv
  head)'s history once per layer into a workspace (PQ pages decoded, residual rows copied; the cache dtype),
  and ``dense_prefill_attention`` runs FlashAttention-2-style flash attention over it (4 warps of 32 query
  rows, K / V tiles double-buffered by cp.async, two CTAs per SM). This is the route vLLM's TurboQuant backend
  takes for long chunks. The workspace holds ``2 x num_kv_heads x sum(n) x head_dim`` values (n padded to 64
  tokens; 134 MiB for one 32K-token sequence at 8 kv heads, d = 128, fp16), grows with the largest plan and
  is reported by ``BatchPrefillWrapper.workspace_bytes``. H200, 2K-token chunk over 32K tokens: 1.11-1.24 x
  PyTorch SDPA over the exact history at M = 64 / 32, batch 1 / 4 (the on-chip kernel below: 1.52-1.97 x).
  Fewer rows stay on chip, per tile of up to 128 query rows (new token x query head of one kv head; 16, 32,
  64 or 128 rows, the fewest that hold the longest sequence's rows, :func:`tensor_core_row_tiles`): up to 32
  rows with 2 or 4 dims per subspace take ``verify_attention``; more rows (or 8 dims per subspace) take
  ``prefill_attention``, which dequantizes each tile of 64 cached tokens into fp16 / bf16 in shared memory
  (exact rows from the residual ring) and runs flash attention with ``mma.sync``. A sequence's history is
  read once per row tile (8 x 32K, H200, M = 64: ~240 us at q = 8, 614 us at q = 16). Short sequences in such a
  batch ride along at the cost of a row tile over their whole history, counted in
  ``stats()["short_queries_on_tensor_cores"]`` and warned about once; plan them in a wrapper of their own to
  avoid it. Configurations without these paths (:func:`tensor_core_supported`: head_dim 64 / 128, M >= 16,
  float16 / bfloat16) keep the LUT path for long chunks, counted in ``stats()["long_chunk_queries"]`` with a
  warning once per wrapper.
* The device's shared memory per block bounds the tensor-core kernels (:func:`fitting_regime`): at head_dim
  128, prefill_attention takes ~200 KB, verify_attention 160 KB (168 KB with two row tiles), dequantize_history
  160 KB, dense_prefill_attention 104 KB. Where the regime the rule picked does not fit (an A100 allows 163 KB,
  so drafts of 17 to 32 rows take the LUT path there; sm_86 / sm_89 99 KB), a chunk takes the dense regime if
  that fits and otherwise, like drafts, the LUT path; each such plan is counted in
  ``stats()["shared_memory_fallbacks"]`` and warned about once. An explicit ``backend`` that does not fit raises
  UnsupportedConfiguration at plan().

``BatchPrefillWrapper(backend="lut" | "tensor_cores" | "dense")`` takes one regime for every plan instead
(``"tensor_cores"``: on chip, no workspace; ``"dense"``: the workspace whatever the rows).
:attr:`BatchPrefillWrapper.regime` names the regime a plan took.

CUDA graphs. ``run`` on a capturing stream records its launch; the graph then replays every later plan with the
same new-token counts per sequence (``qo_indptr``; the sequences may differ and their lengths grow), as in a
speculative decoding loop: plan, append, replay. Such plans keep the captured plan's regime (the rule's history
threshold for a pair of drafts would otherwise switch a growing loop to another kernel). The LUT path launches on a fixed grid from device metadata.
verify_attention (at most 32 query rows per kv head) launches, when captured, on a fixed grid of one wave more
than its units need (padding items return at once), and later plans schedule their splits within it. Chunks
(prefill_attention, the dense regime) cannot be captured: ``run`` raises MillionError on a capturing stream
(plan them with ``backend="lut"`` to capture). A plan of other counts leaves the graph its buffers, unchanged
and alive (the graph replays its own plan), takes new ones, and is counted in ``stats()["stale_graph_plans"]``
and warned about once: capture again for the new counts. Replay on the wrapper's stream, with the arrays
captured.

A whole verification step can be captured, its appends too (``BatchPrefillWrapper.append``), when the wrapper
runs on the cache's stream: ``plan`` uploads the new tokens' positions into a buffer at a fixed address, and after
a capture of the appends, each plan of the captured counts also counts the new tokens in the cache's lengths at
once, as :class:`~million_cupy.step.DecodeStep` does, since the replay that follows writes them. Each step is then
``plan`` and one ``cudaGraphLaunch``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
import weakref
from typing import Any, Sequence

import numpy as np

from . import kernels, reference
from .cache import AppendPlan
from .decode import (AttentionPlan, PagedLayerStorage, attention_arrays, capacity_for, check_scale,
                     device_compute_capability, device_sm_count,
                     device_smem_limit, paged_layer_storage, require_native_attention, softmax_scale)
from .errors import MillionError, UnsupportedConfiguration
from .interop import as_array, as_stream, cupy, dtype_name, is_gpu_array, to_numpy
from .layout import full_pages

__all__ = ["BatchPrefillWrapper", "prefill_attention", "LUT_QUERIES_MAX", "FRAGMENT_QUERIES_MIN",
           "FRAGMENT_QUERIES_MIN_TWO_TILES", "FRAGMENT_PAIR_TOKENS_MIN", "DENSE_ROWS_MIN", "BACKENDS",
           "tensor_core_supported", "takes_tensor_cores", "takes_dense", "fitting_regime"]

#: New tokens per sequence up to which a batch may take the LUT path; a batch with a longer chunk runs on
#: tensor cores. Measured at 8 x 32K on an H200 (bench/results/prefill_h200.json): the LUT path costs ~97 us
#: per query token per sequence (M = 64; q = 4: 393 us, q = 8: 771 us); the tensor-core kernels cost ~240 us
#: for 17 to 32 rows per kv head (verify_attention) and ~614 us for 33 to 64 (prefill_attention, q = 16 at
#: GQA 4). At GQA 8, 6 new tokens make 48 rows: ~614 us against ~580 on the LUT path, so they meet at 5 to 6;
#: fewer tokens with few enough rows for verify_attention take it by the two rules below.
#: backend="lut" keeps the LUT path for any count.
LUT_QUERIES_MAX = 5

#: New tokens per sequence, on average over the batch, from which a batch whose rows fit one row tile (at most
#: 16 per kv head) takes verify_attention instead of the LUT path (:func:`takes_tensor_cores`): it costs about
#: 1.5 LUT query tokens (H200, 8 x 32K: 155-158 us for q = 2 to 4 against 206 us for q = 2 on the LUT path at
#: M = 64, 130-138 against 162 at M = 32). A pair of drafts takes it only over long histories
#: (FRAGMENT_PAIR_TOKENS_MIN).
FRAGMENT_QUERIES_MIN = 3

#: Tokens per sequence, on average over the batch, from which a batch averaging 2 new tokens per sequence in one
#: row tile (a pair of drafts) takes verify_attention too: its fixed cost per CTA (codebook staging, the merge)
#: loses on short histories, and the LUT path's per-token cost grows with them. H200, 8 sequences, q = 2, M = 64 /
#: 32, eager (bench/results/prefill_verify_short_h200.json, prefill_verify_graph_h200.json): LUT 29.6 / 24.6 us
#: against 32.0 / 29.0 at 2K tokens, 64.8 / 52.1 against 58.0 / 49.1 at 8K, 111.7 / 89.3 against 88.6 / 77.9 at
#: 16K, 205.6 / 162.4 against 154.7 / 130.4 at 32K.
FRAGMENT_PAIR_TOKENS_MIN = 8192

#: The same for a batch whose rows need two row tiles (17 to 32 per kv head): verify_attention then costs ~2.3-2.6
#: LUT query tokens (H200, 8 x 32K: ~223 us against ~97 us per token at M = 64; ~200 against ~76 at M = 32), so
#: from 3 new tokens per sequence on average, as with one row tile (3 drafts at GQA 8: ~223 against ~291 us at
#: M = 64, ~200 against ~228 at M = 32). It was 4 while two row tiles cost ~3.3 LUT tokens (312 us).
FRAGMENT_QUERIES_MIN_TWO_TILES = 3

#: Query rows per kv head (new tokens x GQA group) of the longest sequence from which a tensor-core batch takes
#: the dense regime (:func:`takes_dense`): prefill_attention dequantizes the history once per row tile of 128
#: rows, the dense regime once per layer but writes and reads it back as fp16. Measured at 8 x 32K on an H200
#: (bench/results/prefill_h200.json): at 256 rows (q = 64 at GQA 4) the two tie at M = 64 (1.67 / 1.66 ms) and
#: the on-chip kernel wins at M = 32 (1.41 against 1.64 ms); a 2K chunk (8,192 rows) takes 1.6-1.5x less time
#: in the dense regime. From 4 row tiles on: at 512 rows (q = 128) dense 2.48 / 2.46 ms against 3.34 / 2.72 ms
#: on chip at M = 64 / 32 (bench/results/prefill_q128_h200.json).
DENSE_ROWS_MIN = 512

#: BatchPrefillWrapper's ``backend`` choices: the rule above, or one regime for every plan.
BACKENDS = ("auto", "lut", "tensor_cores", "dense")

TC_SOURCE = "prefill_attention.cu"
TC_THREADS = 256  # prefill_attention.cu: 8 warps
TC_ROWS = 128     # the most query rows per CTA (8 row tiles of 16)
TC_ROW_TILES = (1, 2, 4, 8)  # row tiles per CTA (the kernel's RT); the 8 warps split each token tile 8 / RT ways
TC_TILE = 64      # tokens per tile; split boundaries are whole tiles
TC_MIN_CHUNK = 1024  # tokens: a split shorter than this costs more (its codebook staging) than it saves
SPLIT_WAVES = 8      # split_length considers up to this many waves beyond the fewest
TC_HEAD_DIMS = (64, 128)
VERIFY_ROW_TILES = (1, 2)  # verify_attention: up to 32 query rows per kv head
VERIFY_K_TABLE_BYTES = 4 * 256 * 96  # verify_attention's K table (VerifySmem::k_table_bytes)
VERIFY_DSUB = (2, 4)       # ... and 2 or 4 dims per subspace (one centroid is one or both B-fragment words)
DENSE_THREADS = 128        # dense_prefill_attention: 4 warps of 32 query rows (TC_ROWS per CTA)
DENSE_CTAS_PER_SM = 2      # ... which its registers and shared memory allow (the split rule's wave width)
DEQUANTIZE_SPAN = 1024     # tokens per dequantize_history CTA (its codebook staging is amortised over them)
_TC_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16"}


#: verify_attention on Hopper's warpgroup MMA (``verify_attention_wgmma`` in prefill_attention.cu, built for sm_90a by
#: ``kernels.get_arch_kernel``): two row tiles (17 to 32 query rows per kv head) at head_dim 128, M = 32 and pages of
#: 64 tokens or more on a compute capability 9.0 device (H100 / H200), where it measured 6 % faster than
#: verify_attention (8 x 32K, 8 queries per sequence: 168.6 vs 179.6 us on an H100; perf-notes, session 40).
#: ``MILLION_CUPY_WGMMA=0`` keeps verify_attention there (the A / B switch of the benches and tests).
WGMMA_ENV = "MILLION_CUPY_WGMMA"
WGMMA_THREADS = 384  # three warpgroups
WGMMA_SMEM = 4 * 256 * 96 + 2 * 256 * 128 + 2 * 32 * 128 + 3 * 2 * 8 * 528 + 3 * 4 * 32 * 4 + 32  # wg::SMEM
WGMMA_DEFINES = ("MC_SM90A_KERNELS",)
WGMMA_STEP = 64  # tokens per warpgroup step (wg::STEP): the pages it runs over hold a multiple of it
WGMMA_WHERE = "17-32 query rows per kv head at head_dim 128, M = 32, pages of 64 tokens or more"


def warpgroup_mma_requested() -> bool:
    """Whether the environment lets ``verify_attention`` run its warpgroup-MMA form where it exists
    (:data:`WGMMA_ENV`: ``1``, the default, or ``0``).

    Raises:
        ValueError: ``MILLION_CUPY_WGMMA`` holds something other than 0 or 1.
    """
    value = os.environ.get(WGMMA_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{WGMMA_ENV}: expected 0 (verify_attention) or 1 (its warpgroup-MMA form where the device "
                         f"and shapes have it, the default), got {value!r}")
    return value == "1"


def verify_uses_wgmma(head_dim: int, M: int, page_size: int, row_tiles: int) -> bool:
    """Whether a ``verify_attention`` plan of ``row_tiles`` row tiles over a cache of ``page_size``-token pages runs
    its warpgroup-MMA form on the current device (:data:`WGMMA_WHERE`, compute capability 9.0; see
    :data:`WGMMA_ENV`). The form reads one page id per 64-token step, so smaller pages keep verify_attention.

    Raises:
        ValueError: ``MILLION_CUPY_WGMMA`` holds something other than 0 or 1.
    """
    return (warpgroup_mma_requested() and row_tiles == 2 and head_dim == 128 and M == 32
            and page_size % WGMMA_STEP == 0 and device_compute_capability() == 90)


def tensor_core_supported(head_dim: int, M: int, dtype: str) -> bool:
    """Whether the tensor-core long-chunk path exists for this cache configuration."""
    return (head_dim in TC_HEAD_DIMS and M >= 16 and M % 16 == 0 and head_dim % M == 0
            and head_dim // M in (2, 4, 8) and dtype in _TC_TYPES)


def gathers_fragments(head_dim: int, M: int, row_tiles: int) -> bool:
    """Whether a tensor-core plan of ``row_tiles`` row tiles runs ``verify_attention``, the kernel that gathers
    centroids straight into MMA fragments (at most 32 query rows per kv head, 2 or 4 dims per subspace), rather
    than ``prefill_attention``, which dequantizes whole tiles into shared memory first (long chunks)."""
    return row_tiles in VERIFY_ROW_TILES and head_dim // M in VERIFY_DSUB


def tensor_core_smem(head_dim: int, M: int, row_tiles: int) -> int:
    """Dynamic shared memory of the tensor-core kernel a plan launches. ``prefill_attention`` (PrefillSmem in
    prefill_attention.cu): both codebooks of a kv head in fp16 and two stages of one K and one V tile with 16-byte
    padded rows; ``verify_attention`` (VerifySmem): the V codebook and the K table of 256 rows of 96 words (each
    slot group with its rotations, so that the gathers meet at most 2-way bank conflicts), and with two row tiles
    Q's MMA fragments (the kernel's registers hold O for all 32 rows)."""
    codebooks = 2 * 2 * 256 * head_dim
    if gathers_fragments(head_dim, M, row_tiles):
        q_fragments = 2 * 16 * row_tiles * head_dim if row_tiles == 2 else 0
        return 2 * 256 * head_dim + VERIFY_K_TABLE_BYTES + q_fragments
    return codebooks + 2 * 2 * 2 * TC_TILE * (head_dim + 8)


def dense_smem(head_dim: int) -> int:
    """Dynamic shared memory of ``dense_prefill_attention`` (DenseSmem): the CTA's 128 query rows and two
    stages of one K and one V tile, all with 16-byte padded rows."""
    return 2 * (head_dim + 8) * (TC_ROWS + 2 * 2 * TC_TILE)


def dequantize_smem(head_dim: int) -> int:
    """Dynamic shared memory of ``dequantize_history`` (DequantizeSmem): both codebooks of a kv head in fp16
    and one K and one V tile."""
    return 2 * 2 * 256 * head_dim + 2 * 2 * TC_TILE * head_dim


def dense_regime_smem(head_dim: int) -> int:
    """The most dynamic shared memory one of the dense regime's two kernels needs (dequantize_history's)."""
    return max(dense_smem(head_dim), dequantize_smem(head_dim))


def fitting_regime(dense: bool, rows: int, head_dim: int, M: int, smem_limit: int) -> str | None:
    """The tensor-core regime a device allowing ``smem_limit`` bytes of dynamic shared memory per block can launch
    for a plan whose longest sequence has ``rows`` query rows per kv head: ``"dense"`` or ``"on_chip"`` as asked
    (``dense``) when its kernels fit; ``"dense"`` instead of an on-chip kernel that does not fit, for a chunk (more
    rows than verify_attention serves: the dense regime costs ~1 ms at 8 x 32K whatever the rows, more than a few
    drafts on the LUT path); None when nothing fits: the LUT path."""
    dense_fits = dense_regime_smem(head_dim) <= smem_limit
    if dense:
        return "dense" if dense_fits else None
    if tensor_core_smem(head_dim, M, tensor_core_row_tiles(rows)) <= smem_limit:
        return "on_chip"
    return "dense" if dense_fits and rows > 16 * VERIFY_ROW_TILES[-1] else None


def takes_dense(counts: np.ndarray, group: int) -> bool:
    """Whether a tensor-core batch takes the dense regime under the ``"auto"`` rule: the longest sequence has
    at least DENSE_ROWS_MIN query rows per kv head (``counts`` new tokens x GQA ``group``)."""
    return int(counts.max()) * group >= DENSE_ROWS_MIN


def history_spans(n: np.ndarray, num_kv_heads: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The dense regime's workspace layout and its dequantization's work list, for sequences holding ``n``
    tokens: each sequence's tokens padded to whole tiles, its rows starting at ``hist_row[b]`` in every kv
    head's ``ws_rows`` rows; spans (int32 ``(S, 4)``: sequence index, kv head, token begin, token end) of at
    most DEQUANTIZE_SPAN tokens cover every padded history once. Returns ``(spans, hist_row, ws_rows)``."""
    padded = -(-n.astype(np.int64) // TC_TILE) * TC_TILE
    hist_row = np.cumsum(padded) - padded
    seq, kvh, part = _per_head_parts(-(-padded // DEQUANTIZE_SPAN), num_kv_heads)
    begin = part * DEQUANTIZE_SPAN
    spans = np.stack([seq, kvh, begin, np.minimum(begin + DEQUANTIZE_SPAN, padded[seq])], axis=1)
    return spans.astype(np.int32), hist_row.astype(np.int32), int(padded.sum())


@kernels.register_variants(TC_SOURCE)
def _tensor_core_variants() -> list[str]:
    out = []
    for t in _TC_TYPES.values():
        for d in TC_HEAD_DIMS:
            for rt in TC_ROW_TILES:
                out += [f"mc::prefill::prefill_attention<{d}, {d // dsub}, {t}, {rt}>"
                        for dsub in (2, 4, 8) if d // dsub >= 16]
                out.append(f"mc::prefill::prefill_merge<{d}, {t}, {rt}>")
            out += [f"mc::prefill::dequantize_history<{d}, {d // dsub}, {t}>" for dsub in (2, 4, 8) if d // dsub >= 16]
            out.append(f"mc::prefill::dense_prefill_attention<{d}, {t}>")
            out += [f"mc::prefill::verify_attention<{d}, {d // dsub}, {t}, {rt}>"
                    for rt in VERIFY_ROW_TILES for dsub in VERIFY_DSUB if d // dsub >= 16]
    return out


def takes_tensor_cores(counts: np.ndarray, group: int, head_dim: int, M: int, dtype: str,
                       lengths: np.ndarray | None = None) -> bool:
    """The ``"auto"`` rule (the module's docstring): whether a batch with ``counts`` new tokens per sequence and
    GQA ``group`` query heads per kv head runs on tensor cores. A chunk longer than LUT_QUERIES_MAX takes them
    wherever the configuration has them; a few drafts per sequence take verify_attention when every sequence's
    rows fit one row tile (at most 16) and the batch averages FRAGMENT_QUERIES_MIN new tokens or more (2 or more
    where the sequences, holding ``lengths`` tokens after the append, average FRAGMENT_PAIR_TOKENS_MIN), or fit
    two (at most 32) and it averages FRAGMENT_QUERIES_MIN_TWO_TILES or more, since its cost is per sequence
    (the history's dequantization: ~1.5 LUT query tokens for one row tile, ~2.3-2.6 for two) and the LUT path's per
    token."""
    if not tensor_core_supported(head_dim, M, dtype):
        return False
    most = int(counts.max())
    if most > LUT_QUERIES_MAX:
        return True
    row_tiles = tensor_core_row_tiles(most * group)
    if row_tiles > 2:
        return False
    if row_tiles == 2:
        least_average = FRAGMENT_QUERIES_MIN_TWO_TILES
    elif lengths is not None and float(lengths.mean()) >= FRAGMENT_PAIR_TOKENS_MIN:
        least_average = 2
    else:
        least_average = FRAGMENT_QUERIES_MIN
    return int(counts.sum()) >= least_average * counts.shape[0] and gathers_fragments(head_dim, M, row_tiles)


def tensor_core_row_tiles(rows: int) -> int:
    """Row tiles per CTA for a batch whose longest sequence has ``rows`` query rows (new tokens x GQA group):
    the fewest of TC_ROW_TILES that hold them, at most 8. With fewer row tiles each tile's tokens are split
    among more warps, so a few rows (speculative verification) still keep all eight warps on tensor cores."""
    return next((rt for rt in TC_ROW_TILES if 16 * rt >= rows), TC_ROW_TILES[-1])


def _per_head_parts(parts: np.ndarray, num_kv_heads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (sequence, kv head, part) for ``parts[b]`` parts of each of sequence ``b``'s kv heads, sequence-major
    then kv head-major: three int arrays of ``num_kv_heads x parts.sum()`` entries."""
    per_seq = parts * num_kv_heads
    seq = np.repeat(np.arange(parts.shape[0]), per_seq)
    within = np.arange(seq.shape[0]) - np.repeat(np.cumsum(per_seq) - per_seq, per_seq)
    width = np.maximum(parts[seq], 1)
    return seq, within // width, within % width


def split_length(tokens: np.ndarray, sm_count: int, max_items: int | None = None) -> int:
    """Tokens per split (whole tiles) for units attending to ``tokens`` each: the length that minimises the
    modelled time ``waves x (length + 2 tiles)`` (one CTA per SM, the two tiles standing for a split's codebook
    staging and merge), splits no shorter than TC_MIN_CHUNK, the longer length on ties; with ``max_items``
    (the fixed grid of a launch captured in a CUDA graph), among the wave counts whose items fit it. Cutting by the
    total alone (sum / SMs) leaves a partial second wave: 64 units of 32K tokens on 132 SMs ran as 192 items
    in 1.45 waves, 2 x 16K-token items on the critical path where one wave of 128 items needs one.

    For each wave count from the fewest possible to SPLIT_WAVES more, the shortest length that fits is found
    by a bisection run for all wave counts at once (a wave of more gains at most 1 / waves), between bounds
    that meet for units of equal length. Cached by whole tiles: a verification loop's histories grow by a tile
    every few steps, and the search costs ~60 us of host time at 64 units."""
    return _split_tiles(_whole_tiles(tokens), sm_count, max_items) * TC_TILE


def _whole_tiles(tokens: np.ndarray) -> bytes:
    """The TC_TILE-token tiles covering each of ``tokens``, as int64 bytes: the key the schedule's caches share."""
    return (-(-tokens.astype(np.int64) // TC_TILE)).tobytes()


@functools.lru_cache(maxsize=16)
def _split_tiles(tiles_bytes: bytes, sm_count: int, max_items: int | None) -> int:
    """:func:`split_length` in tiles, for units of ``np.frombuffer(tiles_bytes, np.int64)`` tiles each."""
    tiles = np.frombuffer(tiles_bytes, dtype=np.int64)
    top = int(tiles.max(initial=1))
    low = min(top, TC_MIN_CHUNK // TC_TILE)
    sm = max(sm_count, 1)
    units = max(int(np.count_nonzero(tiles)), 1)
    waves = -(-units // sm) + np.arange(SPLIT_WAVES + 1)  # candidate wave counts
    if max_items is not None:
        waves = waves[: max(1, int(np.count_nonzero(waves * sm <= max_items)))]

    def items(length: np.ndarray) -> np.ndarray:  # work items when every unit is cut into `length`-tile splits
        return (-(-tiles[None, :] // length[:, None])).sum(axis=1)

    # Bounds of the shortest fitting length: items(L) >= total / L, and cutting every unit into
    # floor(capacity / units) splits of the longest fits.
    capacity = waves * sm
    lo = np.clip(-(-int(tiles.sum()) // capacity), low, top)
    hi = np.clip(-(-top // np.maximum(capacity // units, 1)), lo, top)
    while (lo < hi).any():
        mid = (lo + hi) // 2
        fits = items(mid) <= capacity
        hi = np.where(fits, mid, hi)
        lo = np.where(fits, lo, np.minimum(mid + 1, hi))
    cost = waves * (hi + 2)
    return int(hi[np.flatnonzero(cost == cost.min())[0]])


def tensor_core_schedule(counts: np.ndarray, n: np.ndarray, group: int, num_kv_heads: int,
                         sm_count: int, rows_per_tile: int = TC_ROWS,
                         max_items: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The tensor-core path's work list for sequences with ``counts`` new tokens holding ``n`` tokens each.

    Units are (sequence, kv head, tile of ``rows_per_tile`` query rows), row ``j * group + h`` being new token ``j`` and
    query head ``h`` of the kv head; a unit covers the tokens its last row attends to. When the units leave
    SMs idle, each is cut into splits of at least TC_MIN_CHUNK tokens (whole tiles, :func:`split_length`), in at
    most ``max_items`` work items when given (at least one per unit). Returns int32
    ``units`` ``(U, 4)`` {sequence index, kv head, first row, first item} (read-only) and ``items`` ``(W, 4)``
    {unit, token begin, token end, splits of the unit}.
    """
    counts_bytes = np.asarray(counts, dtype=np.int64).tobytes()
    seq, unseen, _ = _units_of(counts_bytes, group, num_kv_heads, rows_per_tile)
    tokens = n[seq] - unseen                                   # what the unit's last row attends to
    units, items, owner, chunk_end = _work_list(counts_bytes, group, num_kv_heads, rows_per_tile,
                                                _whole_tiles(tokens), sm_count, max_items)
    items = items.copy()
    np.minimum(chunk_end, tokens[owner], out=items[:, 2])
    return units, items


@functools.lru_cache(maxsize=16)
def _work_list(counts_bytes: bytes, group: int, num_kv_heads: int, rows_per_tile: int, tiles_bytes: bytes,
               sm_count: int, max_items: int | None) -> tuple[np.ndarray, ...]:
    """What :func:`tensor_core_schedule` needs only the units' whole tiles ``np.frombuffer(tiles_bytes, np.int64)``
    for: the units, the items with every field but the end, each item's unit and its split's end before the clip to
    the unit's tokens (read-only). Cached: a verification loop's histories cross a tile every few steps."""
    _, _, head = _units_of(counts_bytes, group, num_kv_heads, rows_per_tile)
    tiles = np.frombuffer(tiles_bytes, dtype=np.int64)
    chunk_tiles = _split_tiles(tiles_bytes, sm_count, max_items)
    splits = -(-tiles // chunk_tiles)
    first = np.cumsum(splits) - splits
    units = np.empty((head.shape[0], 4), dtype=np.int32)
    units[:, :3] = head
    units[:, 3] = first
    owner = np.repeat(np.arange(head.shape[0]), splits)
    begin = (np.arange(owner.shape[0]) - first[owner]) * (chunk_tiles * TC_TILE)
    items = np.empty((owner.shape[0], 4), dtype=np.int32)
    items[:, 0] = owner
    items[:, 1] = begin
    items[:, 2] = 0
    items[:, 3] = splits[owner]
    chunk_end = begin + chunk_tiles * TC_TILE
    for a in (units, items, owner, chunk_end):
        a.flags.writeable = False
    return units, items, owner, chunk_end


@functools.lru_cache(maxsize=16)
def _units_of(counts_bytes: bytes, group: int, num_kv_heads: int, rows_per_tile: int) -> tuple[np.ndarray, ...]:
    """The units of :func:`tensor_core_schedule` for new-token counts ``np.frombuffer(counts_bytes, np.int64)``,
    which do not depend on the histories: each unit's sequence index, the tokens its last row does not see of
    its sequence's (new tokens after that row's), and its {sequence index, kv head, first row} as int32 (read-only).
    Cached: a verification loop plans the same counts every step."""
    counts = np.frombuffer(counts_bytes, dtype=np.int64)
    tiles = -(-counts * group // rows_per_tile)                # row tiles per sequence (per kv head)
    seq, kvh, tile = _per_head_parts(tiles, num_kv_heads)
    row0 = tile * rows_per_tile
    last_token = np.minimum(counts[seq] - 1, (row0 + rows_per_tile - 1) // group)
    unseen = counts[seq] - last_token - 1
    head = np.stack([seq, kvh, row0], axis=1).astype(np.int32)
    for a in (seq, unseen, head):
        a.flags.writeable = False
    return seq, unseen, head


class WorkListBuffers:
    """The device buffers a tensor-core plan's launches read, at fixed addresses while plans fit them, so that a
    launch captured in a CUDA graph reads each later plan's work list: the int32 metadata (page-table rows, per
    sequence {first query row, new tokens, tokens, tokens in pages}, ring rows, units, work items; every part
    16-byte aligned, the kernels read int4 records) for up to ``sequences``, ``units`` and ``items``, and the split
    partial states for ``part_rows`` query rows per item (0: none) with the per-unit arrival counters
    (zeros; each launch leaves them zero)."""

    def __init__(self, sequences: int, units: int, items: int, part_rows: int, head_dim: int, stream) -> None:
        cp = cupy()
        self.max_sequences, self.max_units, self.max_items, self.part_rows = sequences, units, items, part_rows
        sizes = [2 * sequences, 4 * sequences, sequences, 4 * units, 4 * items]
        starts = np.cumsum([0] + [-(-x // 4) * 4 for x in sizes])
        self.host = np.zeros(int(starts[-1]), dtype=np.int32)  # staged by write(): one copy per plan
        with stream:
            self.device = cp.zeros(self.host.shape[0], dtype=cp.int32)
            if part_rows:  # (items, part_rows, head_dim) and (items, part_rows) as the kernels index them
                self.part_o = cp.empty(items * part_rows * head_dim, dtype=cp.float32)
                self.part_lse = cp.empty(items * part_rows, dtype=cp.float32)
                self.unit_counter = cp.zeros(units, dtype=cp.int32)
            else:
                self.part_o = self.part_lse = self.unit_counter = None
        parts = [(int(at), n) for at, n in zip(starts, sizes)]
        self._host_parts = [self.host[at : at + n] for at, n in parts]
        dev = [self.device[at : at + n] for at, n in parts]
        self.page_row = dev[0].view(np.int64)
        self.seq_meta, self.res_row = dev[1], dev[2]
        self.units, self.items = dev[3], dev[4]

    def fits(self, sequences: int, units: int, items: int, part_rows: int) -> bool:
        """Whether a plan of these sizes fits the buffers."""
        return (sequences <= self.max_sequences and units <= self.max_units and items <= self.max_items
                and part_rows <= self.part_rows)

    def write(self, seq: np.ndarray, row_stride: int, seq_meta: tuple[np.ndarray, ...], units: np.ndarray,
              items: np.ndarray, stream) -> None:
        """Stage a plan's metadata and queue its one host-to-device copy on ``stream`` (ordered after the launches
        queued there before it): for slots ``seq``, page-table rows ``seq x row_stride`` and ring rows ``seq``, the
        four per-sequence columns ``seq_meta``, the units and items. Items past the plan's are padding (-1): a
        captured launch's larger grid returns at once there."""
        page, meta, ring, unit_part, item_part = self._host_parts
        B = seq.shape[0]
        np.multiply(seq, row_stride, out=page.view(np.int64)[:B])
        rows = meta[: 4 * B].reshape(B, 4)
        for column, values in enumerate(seq_meta):
            rows[:, column] = values
        ring[:B] = seq
        unit_part[: units.size] = units.reshape(-1)
        item_part[: items.size] = items.reshape(-1)
        item_part[items.size :] = -1
        # Pageable memory: the driver stages it before returning, so the next plan may rewrite it.
        cupy().cuda.runtime.memcpyAsync(self.device.data.ptr, self.host.ctypes.data, self.host.nbytes, 1, stream.ptr)


@dataclasses.dataclass(frozen=True)
class TensorCoreSchedule:
    """A tensor-core plan made and allocated but not yet in effect (:meth:`TensorCorePlan.prepare`): the batch
    (slots ``seq``, CSR ``ind`` and the ``counts`` it spans, ``n`` tokens and ``main`` of them in pages after the
    append), its work list, and the buffers it will be written into (new ones, or the plan's own)."""

    seq: np.ndarray
    ind: np.ndarray
    counts: np.ndarray
    n: np.ndarray
    main: np.ndarray
    units: np.ndarray
    items: np.ndarray
    row_tiles: int
    splits: bool
    dense: bool
    sm: int
    buffers: WorkListBuffers
    dense_meta: Any  # the dense regime's spans and history rows (a device array), else None
    spans: int
    ws_rows: int


class TensorCorePlan:
    """The tensor-core paths' metadata for one batch of new tokens over a GPU cache, and their launches: the
    on-chip kernels (verify_attention, prefill_attention) or the dense regime (dequantize_history into a
    workspace, then dense_prefill_attention).

    A verify_attention launch can be captured in a CUDA graph: captured, it runs on a fixed grid of one wave more
    than its units need (:meth:`graph_grid`; padding items return at once), and later plans schedule at most that
    many items into the same buffers, so the graph reads each of them. The caller keeps the captured plan's
    new-token counts (so its kernel and buffer sizes), and calls :meth:`drop_capture` before a plan of others."""

    def __init__(self, cache, num_heads: int, scale: float) -> None:
        self.cache = cache
        self.num_heads = num_heads
        self.group = num_heads // cache.num_kv_heads
        self._scale_log2 = np.float32(scale * math.log2(math.e))
        self._storage: dict[int, PagedLayerStorage] = {}
        self._buffers: WorkListBuffers | None = None
        self._captured_grid: int | None = None  # the grid of the launch a CUDA graph captured
        self._stale: list[WorkListBuffers] = []  # buffers a stale graph may still read
        self._leave_buffers = False  # drop_capture: the next plan leaves the buffers to the captured launch
        self._launches: dict[tuple, kernels.BoundLaunch] = {}  # (layer, dtype, row tiles): bound to the buffers
        self._dense_meta: Any = None  # the dense regime's spans and history rows (a device array)
        self._ws_k = self._ws_v = None  # the dense regime's workspace, grown as plans need
        self.work_items = self.units = self.spans = 0
        self.ws_rows = 0
        self.row_tiles = TC_ROW_TILES[-1]
        self.splits = False
        self.dense = False
        self._sm = 1  # CTA slots the plan was scheduled for

    @property
    def workspace_bytes(self) -> int:
        """Bytes of the dense regime's workspace held now (0 until a dense plan)."""
        return 0 if self._ws_k is None else 2 * self._ws_k.nbytes

    def prepare(self, seq: np.ndarray, ind: np.ndarray, counts: np.ndarray, n: np.ndarray, stream, *,
                dense: bool = False, dropping_capture: bool = False) -> TensorCoreSchedule:
        """Schedule sequences ``seq`` (slots) with the CSR query offsets ``ind`` of ``counts`` new tokens each,
        holding ``n`` tokens each after the append, and allocate what the schedule needs; :meth:`commit` then makes
        it the plan. ``dense``: the dense regime (its workspace holds ``2 x num_kv_heads x sum(n) x head_dim`` values
        of the cache dtype, tokens padded to whole tiles). After a launch was captured in a CUDA graph (and until
        :meth:`drop_capture`), the schedule fits that launch's grid; the caller keeps the captured batch and
        new-token counts, so the kernel and buffers fit. ``dropping_capture``: the caller will call
        :meth:`drop_capture` before :meth:`commit`, so the schedule takes new buffers of its own.

        Raises:
            MillionError: the device has no room for the workspace or the work-list buffers. The current plan
                stays (a workspace is only ever grown, and a grown one serves it too).
        """
        cp = cupy()
        cache = self.cache
        main = full_pages(n, cache.page_size, cache.residual) * cache.page_size
        row_tiles = TC_ROW_TILES[-1] if dense else tensor_core_row_tiles(int(counts.max()) * self.group)
        rows = 16 * row_tiles
        sm = (DENSE_CTAS_PER_SM if dense else 1) * device_sm_count()
        verify = not dense and gathers_fragments(cache.head_dim, cache.M, row_tiles)
        captured = None if dropping_capture else self._captured_grid
        units, items = tensor_core_schedule(counts, n, self.group, cache.num_kv_heads, sm, rows, captured)
        B, U, W = seq.shape[0], units.shape[0], items.shape[0]
        splits = bool((items[:, 3] > 1).any())
        # verify_attention's plans always hold split states (16 x VERIFY_ROW_TILES[-1] rows): a captured launch
        # may split where the eager one did not.
        part_rows = 16 * VERIFY_ROW_TILES[-1] if verify else (rows if splits else 0)
        dense_meta, spans = None, np.zeros((0, 4), dtype=np.int32)
        ws_rows = 0
        # A captured launch keeps its buffers (drop_capture)
        leaving = self._leave_buffers or (dropping_capture and self._captured_grid is not None)
        buffers = None if leaving else self._buffers
        try:
            if dense:
                spans, hist_row, ws_rows = history_spans(n, cache.num_kv_heads)
                self._reserve_workspace(cache.num_kv_heads * ws_rows * cache.head_dim, stream)
                with stream:
                    dense_meta = cp.asarray(np.concatenate([spans.reshape(-1), hist_row]).astype(np.int32))
            if buffers is None or not buffers.fits(B, U, W, part_rows):
                sizes = (0, 0, 0, 0) if buffers is None else (buffers.max_sequences, buffers.max_units,
                                                              buffers.max_items, buffers.part_rows)
                units_cap = max(capacity_for(U), sizes[1])
                items_cap = max(W, self.graph_grid(units_cap, sm), sizes[2])
                buffers = WorkListBuffers(max(capacity_for(B), sizes[0]), units_cap, items_cap,
                                          max(part_rows, sizes[3]), cache.head_dim, stream)
        except cp.cuda.memory.OutOfMemoryError as exc:
            raise MillionError(f"plan: the device has no room for the tensor-core plan's metadata ({exc}); plan "
                               f"fewer sequences") from exc
        return TensorCoreSchedule(seq, ind, counts, n, main, units, items, row_tiles, splits, dense, sm, buffers,
                                  dense_meta, int(spans.shape[0]), ws_rows)

    def commit(self, s: TensorCoreSchedule, stream) -> None:
        """Make ``s`` (the last :meth:`prepare`'s) the plan: one upload of its metadata on ``stream``; raises
        nothing."""
        cache = self.cache
        if s.buffers is not self._buffers:
            if self._leave_buffers and self._buffers is not None:  # to a captured launch (drop_capture)
                self._stale.append(self._buffers)
                self._leave_buffers = False
            self._buffers = s.buffers
            self._launches = {}
        s.buffers.write(s.seq, cache.max_blocks_per_seq, (s.ind[:-1], s.counts, s.n, s.main), s.units, s.items,
                        stream)
        if s.dense:
            self._dense_meta = s.dense_meta
            self.spans, self.ws_rows = s.spans, s.ws_rows
        self.units, self.work_items, self.dense, self.row_tiles, self.splits = (
            s.units.shape[0], s.items.shape[0], s.dense, s.row_tiles, s.splits)
        self._sm = s.sm

    @staticmethod
    def graph_grid(units: int, sm: int) -> int:
        """The grid of a launch captured in a CUDA graph for ``units`` units on ``sm`` CTA slots: a wave more than
        the units need, room for splits as the histories grow (later plans schedule at most that many items)."""
        return sm * (-(-units // sm) + 1)

    def drop_capture(self) -> None:
        """Leave the buffers a captured launch reads to it, unchanged and alive for as long as this object: the
        next plan, which it cannot replay, takes new buffers."""
        if self._captured_grid is not None:
            self._captured_grid = None
            self._leave_buffers = True

    @property
    def merges_in_kernel(self) -> bool:
        """Whether the planned kernel merges a unit's splits itself (verify_attention) rather than through a
        ``prefill_merge`` launch; such plans can be captured in a CUDA graph."""
        return not self.dense and gathers_fragments(self.cache.head_dim, self.cache.M, self.row_tiles)

    def _reserve_workspace(self, size: int, stream) -> None:
        """The K and V workspaces, ``size`` elements each at least (grown, never shrunk)."""
        if self._ws_k is not None and self._ws_k.size >= size:
            return
        cp = cupy()
        try:
            with stream:
                ws_k = cp.empty(size, dtype=self.cache.array_dtype)
                ws_v = cp.empty(size, dtype=self.cache.array_dtype)
        except cp.cuda.memory.OutOfMemoryError as exc:
            raise MillionError(
                f"plan: the dense regime needs a workspace of {2 * size * 2 / 2**20:.0f} MiB (the batch's histories "
                f"dequantized, one layer at a time) and the device has no room for it; plan fewer or shorter "
                f"sequences, or use BatchPrefillWrapper(..., backend='tensor_cores'), which needs none") from exc
        self._ws_k, self._ws_v = ws_k, ws_v

    def attend(self, layer: int, q, out, lse, stream, capturing: bool) -> None:
        """Launch the attention of ``q`` over ``layer`` into ``out`` (and ``lse`` or None) on ``stream``, which is
        being captured in a CUDA graph when ``capturing``."""
        if capturing and not self.merges_in_kernel:
            raise MillionError("run: this plan's tensor-core path (a chunk of more than 32 query rows per kv head: "
                               "prefill_attention or the dense regime) cannot be captured in a CUDA graph, only "
                               "verify_attention's few drafts can; plan with BatchPrefillWrapper(..., backend='lut') "
                               "to capture it")
        if self.dense:
            self._attend_dense(layer, q, out, lse, stream)
        else:
            launch = self._launches.get((layer, q.dtype, self.row_tiles)) or self._bind_on_chip(layer, q.dtype)
            launch.set_arg(0, q.data.ptr)
            launch.set_arg(1, out.data.ptr)
            launch.set_arg(2, 0 if lse is None else lse.data.ptr)
            if capturing:  # the buffers' items past this plan's are padding, which returns at once
                grid = min(self._committed_buffers().max_items,
                           max(self.work_items, self.graph_grid(self.units, self._sm)))
                self._captured_grid = grid
            else:
                grid = self.work_items
            launch.set_grid(grid)
            launch.launch(stream.ptr)
        if self.splits and not self.merges_in_kernel:  # prefill_attention's and the dense regime's splits
            cache, buffers = self.cache, self._committed_buffers()
            merge = kernels.get_kernel(TC_SOURCE, f"mc::prefill::prefill_merge<{cache.head_dim}, "
                                                  f"{_TC_TYPES[dtype_name(q.dtype)]}, {self.row_tiles}>")
            with stream:
                merge((self.units,), (TC_THREADS,),
                      (buffers.units, buffers.items, buffers.seq_meta, buffers.part_o, buffers.part_lse, out,
                       np.uint64(0) if lse is None else lse, np.int32(self.num_heads), np.int32(cache.num_kv_heads)))

    def _committed_buffers(self) -> WorkListBuffers:
        """The committed plan's buffers (the wrapper launches only after a :meth:`commit`)."""
        if self._buffers is None:
            raise MillionError("TensorCorePlan: a launch before any plan was committed")
        return self._buffers

    def _layer_storage(self, layer: int) -> PagedLayerStorage:
        """What the kernels read of ``layer`` (made once)."""
        storage = self._storage.get(layer)
        if storage is None:
            storage = self._storage[layer] = paged_layer_storage(self.cache, layer)
        return storage

    def _bind_on_chip(self, layer: int, dtype) -> kernels.BoundLaunch:
        """The on-chip kernel's launch over ``layer`` for the current buffers (q, out and lse set per call:
        arguments 0 to 2), bound once: CuPy's generic launch converts its 27 arguments on every call."""
        cache, buffers, rt = self.cache, self._committed_buffers(), self.row_tiles
        d = cache.head_dim
        kc, vc, cb_stride, k_codes, v_codes, ring_k, ring_v, page_stride, head_stride, table, shift = \
            self._layer_storage(layer)
        null = np.uint64(0)
        threads, smem = TC_THREADS, tensor_core_smem(d, cache.M, rt)
        if self.merges_in_kernel and verify_uses_wgmma(d, cache.M, cache.page_size, rt):
            kernel = kernels.get_arch_kernel(TC_SOURCE, f"verify_attention_wgmma_"
                                                        f"{'bf16' if dtype_name(dtype) == 'bfloat16' else 'f16'}",
                                             "sm_90a", WGMMA_DEFINES)
            threads, smem = WGMMA_THREADS, WGMMA_SMEM
        else:
            name = "verify_attention" if self.merges_in_kernel else "prefill_attention"
            kernel = kernels.get_kernel(TC_SOURCE, f"mc::prefill::{name}<{d}, {cache.M}, "
                                                   f"{_TC_TYPES[dtype_name(dtype)]}, {rt}>")
        # Split states where the buffers hold them (verify_attention's always: a captured launch may split); a
        # unit of one split writes its rows directly, so they are unused there. verify_attention's last split of
        # a unit merges the unit (its counters): one launch per layer.
        part_o = null if buffers.part_o is None else buffers.part_o
        part_lse = null if buffers.part_lse is None else buffers.part_lse
        counters = (buffers.unit_counter,) if self.merges_in_kernel else ()
        args = (null, null, null, kc, vc, cb_stride, k_codes, v_codes, ring_k, ring_v, np.int32(cache.ring_slots),
                page_stride, head_stride, table, shift, buffers.seq_meta, buffers.page_row, buffers.res_row,
                buffers.units, buffers.items, part_o, part_lse, *counters, np.int32(self.num_heads),
                np.int32(cache.num_kv_heads), self._scale_log2)
        launch = self._launches[(layer, dtype, rt)] = kernels.BoundLaunch(kernel, 1, threads, smem, args)
        return launch

    def _attend_dense(self, layer: int, q, out, lse, stream) -> None:
        """The dense regime's launches: dequantize_history into the workspace, dense_prefill_attention (its splits
        are merged by the caller)."""
        cache, buffers = self.cache, self._committed_buffers()
        d, t = cache.head_dim, _TC_TYPES[dtype_name(q.dtype)]
        kc, vc, cb_stride, k_codes, v_codes, ring_k, ring_v, page_stride, head_stride, table, shift = \
            self._layer_storage(layer)
        null = np.uint64(0)
        part_o = buffers.part_o if self.splits else null
        part_lse = buffers.part_lse if self.splits else null
        nh, nh_k = np.int32(self.num_heads), np.int32(cache.num_kv_heads)
        seq_meta = buffers.seq_meta
        spans, hist_row = self._dense_meta[: 4 * self.spans], self._dense_meta[4 * self.spans :]
        ws_rows = np.int32(self.ws_rows)
        with stream:
            dequantize = kernels.get_kernel(TC_SOURCE, f"mc::prefill::dequantize_history<{d}, {cache.M}, {t}>")
            smem = dequantize_smem(d)
            kernels.opt_in_shared_memory(dequantize, smem)
            dequantize((self.spans,), (TC_THREADS,),
                       (kc, vc, cb_stride, k_codes, v_codes, ring_k, ring_v, np.int32(cache.ring_slots), page_stride,
                        head_stride, table, shift, seq_meta, buffers.page_row, buffers.res_row, spans, hist_row,
                        self._ws_k, self._ws_v, ws_rows, nh_k), shared_mem=smem)
            kernel = kernels.get_kernel(TC_SOURCE, f"mc::prefill::dense_prefill_attention<{d}, {t}>")
            smem = dense_smem(d)
            kernels.opt_in_shared_memory(kernel, smem)
            kernel((self.work_items,), (DENSE_THREADS,),
                   (q, out, null if lse is None else lse, self._ws_k, self._ws_v, ws_rows, hist_row, seq_meta,
                    buffers.units, buffers.items, part_o, part_lse, nh, nh_k, self._scale_log2), shared_mem=smem)


def check_qo_indptr(qo_indptr: Any, B: int) -> np.ndarray:
    """``qo_indptr`` as host int64 CSR offsets of ``B`` sequences' new tokens: ``B + 1`` non-decreasing integers
    from 0, the last at least 1 (else ValueError naming what came)."""
    ind = np.asarray(to_numpy(qo_indptr) if is_gpu_array(qo_indptr) else qo_indptr)
    if ind.ndim != 1 or ind.shape[0] != B + 1 or (ind.size and ind.dtype.kind not in "iu"):
        raise ValueError(f"qo_indptr: expected {B + 1} integer offsets (one more than the sequences), got "
                         f"{ind.dtype} of shape {ind.shape}")
    ind = ind.astype(np.int64)
    if ind[0] != 0 or (ind[1:] < ind[:-1]).any() or ind[-1] == 0:
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
    ...     wrapper.append(layer, k, v)               # k, v (qo_indptr[-1], num_kv_heads, head_dim)
    ...     out = wrapper.run(layer, q)               # q, out (qo_indptr[-1], num_heads, head_dim)

    ``wrapper.append`` is ``cache.append(layer, seq_ids, k, v, lengths=np.diff(qo_indptr))`` planned once for
    every layer (:meth:`~million_cupy.cache.PagedPQCache.plan_append`): one launch per layer and no device sync,
    where ``cache.append`` redoes the index math per call and, for several tokens per sequence, checks the
    values for NaN / inf at one device sync (``append`` flags them on the device instead).

    Args:
        cache: the cache (``device="cuda"``; on a CPU cache use :func:`prefill_attention`).
        num_heads: query heads (a multiple of the cache's kv heads).
        scale: softmax scale, positive and finite (default ``1 / sqrt(head_dim)``); the tensor-core kernels take
            the row maxima of the raw scores Q K^T and fold the scale into the exponent, which needs it positive.
        stream: a CuPy stream or raw handle for every launch; None = the current stream at ``plan``.
        backend: ``"auto"`` (the module's rule), or for every plan ``"lut"``, ``"tensor_cores"`` (dequantized on
            chip, no workspace) or ``"dense"`` (dequantized once per layer into a workspace; see the module's
            docstring for its size), as FlashInfer's ``backend=``. ``"tensor_cores"`` and ``"dense"`` raise
            UnsupportedConfiguration where :func:`tensor_core_supported` is false; a forced regime is neither
            counted nor warned about as a slow path. A dense plan whose workspace does not fit on the device
            raises MillionError and leaves the previous plan in place.
    """

    def __init__(self, cache, num_heads: int, *, scale: float | None = None, stream: Any = None,
                 backend: str = "auto") -> None:
        require_native_attention(cache, num_heads, "BatchPrefillWrapper", "million_cupy.prefill_attention()")
        check_scale(scale)
        if not cache.quantized:
            raise UnsupportedConfiguration(
                "BatchPrefillWrapper: its kernels read PQ codes, and this cache is exact (codebooks=None); an exact "
                "cache decodes (DecodeStep, BatchDecodeWrapper, decode) but has no native multi-token attention")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if backend in ("tensor_cores", "dense") and not tensor_core_supported(cache.head_dim, cache.M, cache.dtype):
            raise UnsupportedConfiguration(
                f"backend={backend!r}: no tensor-core path for head_dim {cache.head_dim}, M {cache.M}, "
                f"{cache.dtype} (it needs head_dim in {TC_HEAD_DIMS}, M a multiple of 16 with 2, 4 or 8 dims per "
                f"subspace, float16 or bfloat16); use backend='auto' or 'lut'")
        self.backend = backend
        self.cache = cache
        self.num_heads = num_heads
        self._scale = scale
        self._stream = stream
        self._attn: AttentionPlan | None = None
        self._tc: TensorCorePlan | None = None
        self._on_tensor_cores = False  # the current plan's regime: LUT, or tensor cores (dense or on chip)
        self._dense = False
        self._seq: np.ndarray | None = None
        self._n: np.ndarray | None = None  # each sequence's length when run() is called
        self._counts: np.ndarray | None = None  # each sequence's new tokens
        self._graph_counts: np.ndarray | None = None  # the new tokens of the plan a captured run() launched
        self._graph_regime = (False, False)  # and its regime (on tensor cores, dense)
        self._graph_plans: list[Any] = []  # LUT plans and append buffers left to captured graphs (kept alive)
        self._layers: set[int] = set()
        self._appended = False  # the current plan's new tokens were in the cache when it was made
        self._append_plan: AppendPlan | None = None  # the cache's plan of its appends (append())
        # The append plans' token metadata (plan_append into=), at a fixed address while the counts' total fits
        # (a graph that captured appends keeps the counts, so never outgrows the buffer it reads).
        self._append_buffer: Any = None
        self._graph_appends: set[int] | None = None  # layers whose appends a CUDA graph captured
        self._replays_appends = False  # the current plan counted its appends for a replay of that graph
        self._on_cache_stream = False  # the current plan's runs launch on the cache's stream (capturable appends)
        self._q_shape = (0, num_heads, cache.head_dim)
        self._warned: set[str] = set()  # the slow paths warned about (_warn_once)
        self._stats = {"plans": 0, "runs": 0, "query_tokens": 0, "tensor_core_plans": 0, "dense_plans": 0,
                       "short_queries_on_tensor_cores": 0, "long_chunk_queries": 0, "shared_memory_fallbacks": 0,
                       "stale_graph_plans": 0, "appends": 0, "graph_append_plans": 0}

    @property
    def scale(self) -> float:
        """The softmax scale of the attention."""
        return softmax_scale(self.cache, self._scale)

    @property
    def on_tensor_cores(self) -> bool:
        """Whether the current plan runs on tensor cores (the dense regime or the on-chip kernels; else the LUT
        path; see the module's rule)."""
        return self._on_tensor_cores

    @property
    def regime(self) -> str:
        """The current plan's regime: ``"lut"``, ``"tensor_cores"`` (dequantized on chip) or ``"dense"``
        (dequantized once per layer into a workspace); ``""`` before the first plan."""
        if self._seq is None:
            return ""
        return "dense" if self._dense else ("tensor_cores" if self._on_tensor_cores else "lut")

    @property
    def workspace_bytes(self) -> int:
        """Device bytes this wrapper holds for the dense regime's workspace (0 if it never took it)."""
        return 0 if self._tc is None else self._tc.workspace_bytes

    def plan(self, seq_ids: Sequence[int] | np.ndarray, qo_indptr: Any, *, appended: bool = False,
             layers: Sequence[int] | None = None) -> None:
        """Schedule attention of ``qo_indptr[b+1] - qo_indptr[b]`` new tokens of each ``seq_ids[b]``.

        ``appended=False`` (default): the new tokens will be appended to every planned layer before
        ``run(layer)`` (:meth:`append`, for which the plan reserves their pages and uploads their positions now);
        ``True``: the planned layers already hold them. ``layers``: the layers ``run`` will be called for (default
        all; they must hold equal lengths).

        After a CUDA graph captured this wrapper's appends (see :meth:`append`), a plan of the same new-token
        counts also counts the new tokens in the planned layers' lengths at once: the graph's replay, which must
        follow, writes them.

        Raises:
            ValueError: unknown or repeated ids, bad offsets, more new tokens than a sequence holds, or layers of
                unequal lengths.
            PagePoolExhausted: (``appended=False``) no pages for the new tokens.
            MillionError: after a graph captured the appends, ``appended=True`` or other layers than it captured.
            In each case the previous plan stays.
        """
        cache = self.cache
        seq = cache.check_ids(seq_ids, "plan")
        ind = check_qo_indptr(qo_indptr, seq.shape[0])
        counts = ind[1:] - ind[:-1]
        planned, held = cache.equal_lengths(seq, layers, "plan")
        # The layers whose appends a CUDA graph captured for these new-token counts: this plan counts them for its
        # replay.
        replayed = self._graph_appends if (self._graph_counts is not None
                                           and np.array_equal(counts, self._graph_counts)) else None
        replay = replayed is not None
        if replayed is not None and (appended or set(planned) != replayed):
            raise MillionError(
                f"plan: a CUDA graph captured this wrapper's appends of layers {sorted(replayed)} for "
                f"these new-token counts, so its plans of them count the appends for the graph's replay; plan with "
                f"appended=False and layers={sorted(replayed)} (got appended={appended}, layers="
                f"{planned}), or use another wrapper for other steps")
        n = held + (0 if appended else counts)
        if (counts > n).any():
            b = int(np.flatnonzero(counts > n)[0])
            raise ValueError(f"plan: sequence {int(seq[b])} has {int(counts[b])} new tokens but will hold only "
                             f"{int(n[b])} (with appended=True the cache must already hold them)")
        over = n > cache.max_seq_len
        if over.any():
            raise ValueError(f"plan: sequences {seq[over].tolist()} would hold {n[over].tolist()} tokens, more "
                             f"than max_seq_len = {cache.max_seq_len}")
        N = int(ind[-1])
        group = self.num_heads // cache.num_kv_heads
        leaving = self._graph_counts is not None and not np.array_equal(counts, self._graph_counts)
        if self.backend == "auto":
            long = int(counts[counts > LUT_QUERIES_MAX].sum())
            on_tensor_cores = takes_tensor_cores(counts, group, cache.head_dim, cache.M, cache.dtype, n)
            dense = on_tensor_cores and takes_dense(counts, group)
        else:  # a chosen regime: neither counted nor warned about
            long = 0
            on_tensor_cores = self.backend in ("tensor_cores", "dense")
            dense = self.backend == "dense"
        why_lut = f"this configuration (head_dim {cache.head_dim}, M {cache.M}, {cache.dtype}) has no tensor-core path"
        if on_tensor_cores:
            on_tensor_cores, dense = self._fit_shared_memory(dense, int(counts.max(initial=0)) * group)
            if not on_tensor_cores:
                why_lut = "no tensor-core kernel for them fits this device's shared memory"
        if self._graph_counts is not None and not leaving:
            # A captured run replays plans of these counts: they keep its regime, which the rule may change as
            # the histories grow (FRAGMENT_PAIR_TOKENS_MIN), so that the graph reads each of them.
            on_tensor_cores, dense = self._graph_regime
        # What may not fit the device is allocated before any page is reserved, and takes effect after: a plan
        # that raises leaves the last one.
        stream = as_stream(self._stream)
        attn, tc, schedule = (None if leaving else self._attn), self._tc, None
        if on_tensor_cores:
            if tc is None:
                tc = self._tc = TensorCorePlan(cache, self.num_heads, self.scale)
            schedule = tc.prepare(seq, ind, counts, n, stream, dense=dense, dropping_capture=leaving)
        elif attn is None or attn.capacity < N:
            attn = AttentionPlan(cache, self.num_heads, capacity_for(N), scale=self._scale)
        appends = buffer = None
        if not appended:
            buffer = self._append_buffer
            if buffer is None or buffer.size < 4 * N or (leaving and self._graph_appends is not None):
                with cache.stream:  # a graph that captured appends keeps its buffer (_leave_to_graph)
                    buffer = cupy().empty(4 * capacity_for(max(N, 1)), dtype=np.int32)
            # Reserves the new tokens' pages (PagePoolExhausted leaves the previous plan), uploads their metadata.
            appends = cache.plan_append(seq, counts, layers=planned, into=buffer)
        if leaving:
            self._leave_to_graph()
        if buffer is not None:
            self._append_buffer = buffer
        if tc is not None and schedule is not None:  # on tensor cores
            tc.commit(schedule, stream)
            self._stats["tensor_core_plans"] += 1
            self._stats["dense_plans"] += int(dense)
            short = int(counts[counts <= LUT_QUERIES_MAX].sum()) if long else 0
            long = 0
            self._stats["short_queries_on_tensor_cores"] += short
            if short:
                self._warn_once("short", f"{short} query tokens of sequences with at most {LUT_QUERIES_MAX} new tokens "
                                f"run on the tensor-core path beside a longer chunk; each such sequence costs a "
                                f"row tile over its whole history (plan short sequences in a wrapper of their "
                                f"own for the LUT path)")
        else:
            assert attn is not None  # made above for the LUT path
            owner, main, res = causal_lengths(n, counts, cache.page_size, cache.residual)
            self._attn = attn
            items = seq[owner]  # each query token is a work item over its sequence's pages and ring
            if not attn.covers(items, main):
                attn.schedule(items, main)
            attn.update(items, main.astype(np.int32), res.astype(np.int32), stream)
        if long:
            self._warn_once("long", f"{long} query tokens belong to chunks longer than {LUT_QUERIES_MAX} per sequence; "
                            f"{why_lut}, so they run the per-token LUT path, whose cost grows with the query count")
        if replay and appends is not None:  # the graph's replay writes them (a replayed plan has appends)
            appends.commit()
            self._stats["graph_append_plans"] += 1
        self._on_tensor_cores, self._dense = on_tensor_cores, dense
        self._seq, self._n, self._counts, self._layers = seq, n, counts, set(planned)
        self._appended, self._append_plan, self._replays_appends = appended, appends, replay
        self._on_cache_stream = as_stream(self._stream).ptr == cache.stream.ptr  # (append) the runs' stream
        self._q_shape = (N, self.num_heads, cache.head_dim)
        self._stats["plans"] += 1
        self._stats["query_tokens"] += N
        self._stats["long_chunk_queries"] += long

    def _leave_to_graph(self) -> None:
        """A plan of other new-token counts than a run captured in a CUDA graph: the graph could not replay it,
        so it keeps its buffers, unchanged and alive, and the plan takes new ones (counted, warned once)."""
        self._graph_counts = None
        self._stats["stale_graph_plans"] += 1
        if self._tc is not None:
            self._tc.drop_capture()
        if self._attn is not None:
            self._graph_plans.append(self._attn)
            self._attn = None
        if self._graph_appends is not None:
            self._graph_plans.append(self._append_buffer)
            self._append_buffer = self._graph_appends = None
        self._warn_once("graph", "a run of this wrapper was captured in a CUDA graph for other new-token counts "
                        "per sequence (qo_indptr); that graph keeps replaying its own plan, not this one: capture "
                        "again for these counts (or keep one wrapper per captured shape)", stacklevel=4)

    def _fit_shared_memory(self, dense: bool, rows: int) -> tuple[bool, bool]:
        """``(on_tensor_cores, dense)`` for a tensor-core plan of ``rows`` query rows per kv head on this device:
        the regime asked for when its kernels fit the device's shared memory, else :func:`fitting_regime`'s
        (counted and warned once) under ``backend="auto"``; an explicit backend that does not fit raises."""
        cache = self.cache
        limit = device_smem_limit()
        fits = fitting_regime(dense, rows, cache.head_dim, cache.M, limit)
        asked = "dense" if dense else "on_chip"
        if fits == asked:
            return True, dense
        need = (dense_regime_smem(cache.head_dim) if dense
                else tensor_core_smem(cache.head_dim, cache.M, tensor_core_row_tiles(rows)))
        what = (f"the {'dense' if dense else 'on-chip tensor-core'} kernels for head_dim {cache.head_dim}, "
                f"M {cache.M} and {rows} query rows per kv head need {need} bytes of shared memory per block; "
                f"this device allows {limit}")
        if self.backend != "auto":
            other = "'auto'" if fits is None else "'auto' or 'dense'"
            raise UnsupportedConfiguration(f"backend={self.backend!r}: {what}; use backend={other}")
        self._stats["shared_memory_fallbacks"] += 1
        self._warn_once("smem", f"{what}, so such plans take the "
                        f"{'dense regime (a per-layer workspace of the history)' if fits else 'per-token LUT path'}",
                        stacklevel=4)
        return fits is not None, fits == "dense"

    def _warn_once(self, kind: str, message: str, stacklevel: int = 3) -> None:
        """A RuntimeWarning for the caller of plan() (``stacklevel`` frames up), once per wrapper and kind of slow
        path."""
        if kind not in self._warned:
            warnings.warn(f"BatchPrefillWrapper: {message}", RuntimeWarning, stacklevel=stacklevel)
            self._warned.add(kind)

    def append(self, layer: int, k: Any, v: Any) -> None:
        """Append the planned new tokens of ``layer`` to the cache: ``k``, ``v`` ``(qo_indptr[-1], num_kv_heads,
        head_dim)`` in the order of ``q``'s rows (the cache dtype; C-contiguous CuPy arrays are used as they are).

        For a plan made with ``appended=False``, which reserved the new tokens' pages for every planned layer and
        uploaded their positions once (:meth:`~million_cupy.cache.PagedPQCache.plan_append`): each call is one
        kernel launch, with no device sync. NaN / inf tokens are stored and flagged on the device
        (``cache.stats()["non_finite_appended"]``), as on the decode path.

        CUDA graphs: on the cache's stream (``BatchPrefillWrapper(cache, nh, stream=cache.stream)``), a whole
        verification step can be captured, appends and runs of every layer, then replayed for later plans of the
        same new-token counts (as :class:`~million_cupy.step.DecodeStep`'s steps)::

            wrapper.plan(seq_ids, qo_indptr)               # step 0
            stream.begin_capture()                         # stream = cache.stream
            for layer in range(L):
                wrapper.append(layer, k[layer], v[layer])  # fixed CuPy buffers
                wrapper.run(layer, q[layer], out=o[layer])
            graph = stream.end_capture()
            graph.launch(stream)                           # step 0 (capture counted its appends, ran nothing)
            for _ in range(steps):
                cache.truncate(...)                        # rejected drafts, if any
                wrapper.plan(seq_ids, qo_indptr)           # counts the appends: the replay writes them
                graph.launch(stream)

        Such plans' appends belong to the graph: ``append`` then raises (use another wrapper for eager steps).

        Raises:
            MillionError: no plan, a plan made with ``appended=True`` or whose appends a graph replays, ``layer``
                not planned or appended already, the cache's lengths no longer those the plan found, or a capture
                on another stream than the cache's; nothing written.
            ValueError / TypeError: ``k`` or ``v`` of another shape or dtype; nothing written.
        """
        if self._seq is None:
            raise MillionError("append() before plan(): call plan(seq_ids, qo_indptr) first")
        plan = self._append_plan  # None exactly when the plan was made with appended=True
        if self._appended or plan is None:
            raise MillionError("append: this plan was made with appended=True, so the cache holds its new tokens "
                               "already; plan with appended=False to append them through the wrapper")
        if self._replays_appends:
            raise MillionError("append: a CUDA graph captured this wrapper's appends, and plan() counted this "
                               "step's for its replay: launch the graph (or use another wrapper for eager steps)")
        if not self._on_cache_stream and self.cache.stream.is_capturing():
            raise MillionError("append: captured appends run on the cache's stream, and this wrapper launches its "
                               "runs on another; build it with BatchPrefillWrapper(cache, ..., stream=cache.stream)")
        plan.append(layer, k, v)
        if plan.captured_layers:  # later plans of these counts count the appends for the graph's replay (plan)
            self._graph_appends = (self._graph_appends or set()) | plan.captured_layers
            self._graph_counts, self._graph_regime = self._counts, (self._on_tensor_cores, self._dense)
        self._stats["appends"] += 1

    def run(self, layer: int, q: Any, *, out: Any = None, lse: Any = None, return_lse: bool = False):
        """Attention of the planned query tokens ``q`` ``(N, num_heads, head_dim)`` (CSR order, the cache dtype)
        over ``layer``. Returns ``out`` (``(N, num_heads, head_dim)``), or ``(out, lse)`` with ``return_lse`` or a
        given ``lse`` (float32 ``(N, num_heads)``, natural log). Raises MillionError when the layer does not
        hold the planned lengths (append the new tokens first)."""
        seq, planned_lens = self._seq, self._n
        if seq is None or planned_lens is None:
            raise MillionError("run() before plan(): call plan(seq_ids, qo_indptr) first")
        cache = self.cache
        layer = cache.check_layer(layer)
        if layer not in self._layers:
            raise MillionError(f"layer {layer} is not in this plan (planned: {sorted(self._layers)})")
        held = cache.lengths[layer, seq]
        if not np.array_equal(held, planned_lens):
            b = int(np.flatnonzero(held != planned_lens)[0])
            raise MillionError(f"layer {layer}: the plan expects sequence {int(seq[b])} to hold "
                               f"{int(planned_lens[b])} tokens, it holds {int(held[b])} (append the new tokens to this "
                               f"layer before run, or plan again)")
        q, out, lse = attention_arrays(q, out, lse, return_lse, self._q_shape, cache.array_dtype)
        stream = as_stream(self._stream)
        capturing = stream.is_capturing()
        if self._on_tensor_cores:
            assert self._tc is not None  # a plan on tensor cores made it
            self._tc.attend(layer, q, out, lse, stream, capturing)
        else:
            assert self._attn is not None  # a LUT plan made it
            self._attn.attend(layer, q, out, lse, stream.ptr)
        if capturing:  # the graph replays later plans of these counts, in this regime (plan)
            self._graph_counts, self._graph_regime = self._counts, (self._on_tensor_cores, self._dense)
        self._stats["runs"] += 1
        return (out, lse) if (return_lse or lse is not None) else out

    def stats(self) -> dict[str, int]:
        """Counters: ``plans``, ``runs``, ``query_tokens`` planned, ``tensor_core_plans`` (plans that took the
        tensor-core path), ``dense_plans`` (those of them in the dense regime),
        ``short_queries_on_tensor_cores`` (query tokens of sequences with at most
        LUT_QUERIES_MAX new tokens planned on the tensor-core path beside a longer chunk; warned once),
        ``long_chunk_queries`` (query tokens of chunks longer than LUT_QUERIES_MAX that ran the
        per-token LUT path because the configuration has no tensor-core path, or none fits the device; warned
        once), ``shared_memory_fallbacks`` (plans whose tensor-core regime did not fit the device's shared memory
        and took the dense regime or the LUT path instead, :func:`fitting_regime`; warned once),
        ``stale_graph_plans`` (plans of other new-token counts than a run captured in a CUDA graph, which keeps
        replaying its own plan; warned once), ``appends`` (layers whose new tokens :meth:`append` wrote),
        ``graph_append_plans`` (plans that counted their appends for the replay of a CUDA graph that captured
        them)."""
        return dict(self._stats)


# One wrapper per (cache, stream, num_heads) for prefill_attention().
_wrappers: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def prefill_attention(cache, layer: int, seq_ids: Sequence[int] | np.ndarray, q: Any, qo_indptr: Any, *,
                      scale: float | None = None, return_lse: bool = False, out: Any = None, stream: Any = None):
    """Causal attention of new tokens already appended to ``cache`` (plan + run in one call).

    ``q`` ``(N, nh, d)`` holds sequence ``seq_ids[b]``'s new tokens in rows ``qo_indptr[b]:qo_indptr[b+1]``; they
    are that sequence's last tokens in layer ``layer``. GPU cache: the native kernels through a
    :class:`BatchPrefillWrapper`. CPU cache: the float64 reference over the dequantized cache, in q's dtype.
    ``scale``: as in :class:`BatchPrefillWrapper` (positive, default ``1 / sqrt(head_dim)``). Returns ``out`` or
    ``(out, lse)``.
    """
    check_scale(scale)
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
    ind = check_qo_indptr(qo_indptr, seq.shape[0])
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
