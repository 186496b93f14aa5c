"""Hugging Face ``transformers`` models decoding through the PQ cache (extra ``hf``).

::

    from million_cupy.integrations.transformers import PQCache, calibrate, use_pq_attention

    books = calibrate(model, sample_ids, M=64)           # per-layer K/V codebooks from the model's own K/V
    use_pq_attention(model)                              # attn_implementation = "million_pq"
    cache = PQCache(model, books)
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=128)

How a forward runs with a :class:`PQCache`:

* **Prefill** (several new tokens in a sequence with no history yet): the model's own attention (SDPA)
  runs over the exact K/V, which are then appended to the PQ cache (codes written, the newest tokens kept
  exact in the residual window).
* **Decode** (one new token per sequence): every layer appends its token and attends over the PQ cache
  with this library's kernels (:class:`~million_cupy.step.DecodeStep`: one metadata copy per step, one
  launch per layer for the append and one for attention), tensors passing by DLPack without copies. A
  CPU model decodes through the float64 reference path (:func:`million_cupy.decode`).
* **Extend** (several new tokens over an existing history: a second chat turn, chunked prefill, speculative
  verification): every layer appends its new tokens, then they attend causally over the PQ cache
  (:class:`~million_cupy.prefill.BatchPrefillWrapper`: PQ pages and the exact window as the cache holds them
  after the append; one plan per forward). A CPU model takes the float64 reference
  (:func:`million_cupy.prefill_attention`).
* **Crop** (assisted generation dropping the drafts the model rejected): every sequence is truncated in place
  (:meth:`~million_cupy.cache.PagedPQCache.truncate`, exact); build the cache with ``max_rollback`` at least
  the drafts of a round plus one: ``PQCache(model, books, max_rollback=64)``.

``"million_pq"`` is registered with transformers' ``AttentionInterface`` (and its mask interface, as
SDPA's) when this module is imported. A forward without a :class:`PQCache` (training, ``use_cache=False``)
runs plain SDPA. The cache and the attention function meet through a per-thread hand-off: ``PQCache.update``
(called by the attention module just before its attention function) leaves the layer's work there.

Limits: batches without padding (every prompt of a batch the same length), greedy or sampled decoding
(no beam search: ``reorder_cache`` raises), head_dim and M as the kernels support
(:func:`million_cupy.decode.supported_configurations`). Works with transformers 4.56+ and 5.x.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..cache import PagedPQCache
from ..codebook import ModelCodebooks
from ..decode import decode as pq_decode
from ..errors import MillionError, UnsupportedConfiguration
from ..prefill import BatchPrefillWrapper, prefill_attention
from ..step import DecodeStep

__all__ = ["ATTENTION_NAME", "PQCache", "calibrate", "use_pq_attention", "pq_attention"]

ATTENTION_NAME = "million_pq"

_handoff = threading.local()  # .pending: (PQCache, layer) from update(); .collector: calibrate()'s samples


def _model_config(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", model_or_config)
    text = getattr(config, "get_text_config", None)
    return text() if callable(text) else config


def _geometry(config: Any) -> tuple[int, int, int, int]:
    """(layers, query heads, kv heads, head_dim) of a decoder config."""
    nh = int(config.num_attention_heads)
    nh_k = int(getattr(config, "num_key_value_heads", None) or nh)
    d = int(getattr(config, "head_dim", None) or config.hidden_size // nh)
    return int(config.num_hidden_layers), nh, nh_k, d


def use_pq_attention(model: Any) -> Any:
    """Make ``model`` attend through ``"million_pq"`` (returns the model). Forwards given a :class:`PQCache`
    then decode through it; other forwards run SDPA."""
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        setter(ATTENTION_NAME)
    else:  # transformers versions before set_attn_implementation
        model.config._attn_implementation = ATTENTION_NAME
    return model


class _PQLayer(CacheLayerMixin):
    """One layer's token count, for transformers' mask and position bookkeeping (the tokens live in the
    cache's :class:`~million_cupy.cache.PagedPQCache`)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        raise RuntimeError("a PQCache layer is updated through PQCache.update")

    def get_mask_sizes(self, query: Any, *args: Any) -> tuple[int, int]:
        # transformers 5 passes the query length, 4.x the cache_position tensor
        q = int(query.shape[0]) if isinstance(query, torch.Tensor) else int(query)
        return self.length + q, 0

    def get_seq_length(self, *args: Any) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # transformers 4.x name of get_max_length
        return -1

    def reset(self) -> None:
        self.length = 0


class PQCache(Cache):
    """A transformers cache whose K/V live in a :class:`~million_cupy.cache.PagedPQCache`.

    Args:
        model_or_config: the model (or its config): layers, query / kv heads and head_dim come from it.
        codebooks: per-layer K/V codebooks (:func:`calibrate`, or :meth:`ModelCodebooks.load`).
        max_seq_len: most tokens a sequence may hold (default: the config's ``max_position_embeddings``).
        max_pages: pages in the pool (default: enough for the batch at ``max_seq_len``).
        page_size, residual: as in :class:`~million_cupy.cache.PagedPQCache` (64 and 128).
        max_rollback: tokens :meth:`crop` can always drop (the storage's ``max_rollback``): assisted generation
            (``generate(..., assistant_model=...)``) drops the drafts the model rejects, at most the drafts of one
            round plus one, and needs ``max_rollback > 0`` (the layers' ``is_croppable``); 0 (default) keeps the
            ring at ``residual`` tokens and lets crop go back only while the window has not moved.

    The PQ storage is made at the first forward, on the device and in the dtype of the model's K/V, with
    one sequence per batch row, on PyTorch's current CUDA stream there (so the kernels are ordered with the
    model's own work). A GPU model needs a float16 or bfloat16 model; a CPU model takes the float64
    reference path (slow; for checking).
    """

    def __init__(self, model_or_config: Any, codebooks: ModelCodebooks, *, max_seq_len: int | None = None,
                 max_pages: int | None = None, page_size: int = 64, residual: int = 128,
                 max_rollback: int = 0) -> None:
        config = _model_config(model_or_config)
        self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim = _geometry(config)
        if not isinstance(codebooks, ModelCodebooks):
            raise TypeError(f"codebooks: expected a ModelCodebooks, got {type(codebooks).__name__}")
        if codebooks.num_layers != self.num_layers or codebooks.d != self.head_dim:
            raise UnsupportedConfiguration(
                f"codebooks: expected {self.num_layers} layers of head_dim {self.head_dim} (the model's), got "
                f"{codebooks.num_layers} layers of d = {codebooks.d}")
        super().__init__(layers=[_PQLayer() for _ in range(self.num_layers)])
        self.codebooks = codebooks
        self.max_seq_len = int(max_seq_len) if max_seq_len else int(getattr(config, "max_position_embeddings", 8192))
        self.max_pages = max_pages
        self.page_size, self.residual = int(page_size), int(residual)
        self.max_rollback = int(max_rollback)
        if self.max_rollback < 0:
            raise UnsupportedConfiguration(f"max_rollback: expected a non-negative integer, got {max_rollback}")
        for layer in self.layers:  # what assisted generation asks before it verifies drafts
            layer.is_croppable = self.max_rollback > 0
        self.storage: PagedPQCache | None = None
        self.seq_ids: np.ndarray | None = None
        self._step: DecodeStep | None = None
        self._extend: BatchPrefillWrapper | None = None
        self._counts = {"prefill_tokens": 0, "decode_steps": 0, "extend_tokens": 0, "cropped_tokens": 0}

    # ---------------------------------------------------------------------------- transformers hooks

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key_states`` / ``value_states`` ``(B, nh_k, T, d)`` of ``layer_idx`` and leave the layer's
        attention to ``"million_pq"``. Returns the new K/V unchanged (what a prefill's SDPA attends to)."""
        B, nh_k, T, d = key_states.shape
        if (nh_k, d) != (self.num_kv_heads, self.head_dim):
            raise ValueError(f"key_states: expected (B, {self.num_kv_heads}, T, {self.head_dim}), got "
                             f"{tuple(key_states.shape)}")
        if self.storage is None:
            self._create(B, key_states)
        storage, seq_ids = self._batch()
        if B != seq_ids.shape[0]:
            raise ValueError(f"key_states: this PQCache holds a batch of {seq_ids.shape[0]} sequences, got "
                             f"{B} (use one cache per batch)")
        layer = self.layers[layer_idx]
        history = layer.length
        if T > 1 or history == 0:
            if history and self._gpu and layer_idx == 0:  # one plan per forward, before its appends
                if self._extend is None:
                    self._extend = BatchPrefillWrapper(storage, self.num_heads)
                self._extend.plan(seq_ids, np.arange(B + 1) * T)
            self._append_rows(layer_idx, key_states, value_states, planned=bool(history and self._gpu))
            if layer_idx == 0:
                self._counts["extend_tokens" if history else "prefill_tokens"] += B * T
        else:
            self._append_one(layer_idx, key_states, value_states)
        layer.length += T
        layer.is_initialized = True
        _handoff.pending = (self, layer_idx, T, history)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise UnsupportedConfiguration("PQCache: beam search (reorder_cache) is not supported; decode greedily or "
                                       "by sampling")

    def crop(self, max_length: int) -> None:
        """Keep each sequence's first ``max_length`` tokens (a negative value drops ``-max_length`` tokens), as
        assisted generation does with rejected drafts: :meth:`~million_cupy.cache.PagedPQCache.truncate` on every
        sequence, exact (the cache then holds what it would without the dropped tokens).

        Raises:
            UnsupportedConfiguration: the storage's ring no longer holds the window that ``max_length`` tokens need
                (build the PQCache with a larger ``max_rollback``); nothing changed.
        """
        length = self.get_seq_length()
        if max_length < 0:
            max_length = max(length + max_length, 0)
        if max_length >= length or self.storage is None:
            return
        storage, seq_ids = self._batch()
        try:
            storage.truncate(seq_ids, max_length)  # every row, or none
        except ValueError as exc:
            raise UnsupportedConfiguration(f"PQCache.crop({max_length}): {exc}; pass PQCache(..., max_rollback=N) with "
                                           f"N at least the tokens a round can drop") from None
        for layer in self.layers:
            layer.length = min(layer.length, max_length)
        self._counts["cropped_tokens"] += seq_ids.shape[0] * (length - max_length)

    def reset(self) -> None:
        """Free the batch's sequences (the pool is kept for the next batch)."""
        if self.storage is not None:
            storage, seq_ids = self._batch()
            for seq in seq_ids:
                storage.free(int(seq))
        self.seq_ids = None
        self._step = None
        self._extend = None
        for layer in self.layers:
            layer.reset()
        if self.storage is not None:
            self.storage = None

    def stats(self) -> dict[str, Any]:
        """The PQ storage's :meth:`~million_cupy.cache.PagedPQCache.stats`, the decode step's counters
        (``step``), the extend path's (``extend``) and this cache's ``prefill_tokens`` / ``decode_steps`` /
        ``extend_tokens`` (new tokens over a history) / ``cropped_tokens`` (dropped by :meth:`crop`)."""
        out: dict[str, Any] = dict(self._counts)
        if self.storage is not None:
            out.update(self.storage.stats())
        if self._step is not None:
            out["step"] = self._step.stats()
        if self._extend is not None:
            out["extend"] = self._extend.stats()
        return out

    # ------------------------------------------------------------------------------------- internals

    def _batch(self) -> tuple[PagedPQCache, np.ndarray]:
        """``(storage, seq_ids)``: the PQ storage and the batch's sequence ids, both made at the first forward."""
        if self.storage is None or self.seq_ids is None:
            raise MillionError("PQCache: no storage yet; the model's first forward through this cache creates it")
        return self.storage, self.seq_ids

    def _create(self, B: int, like: torch.Tensor) -> None:
        gpu = like.is_cuda
        dtype = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}.get(like.dtype)
        if dtype is None or (gpu and dtype == "float32"):
            raise UnsupportedConfiguration(
                f"PQCache: the model's K/V are {like.dtype}; the GPU kernels take float16 or bfloat16 models "
                f"(model.half() or torch_dtype=torch.float16), the CPU reference float16, bfloat16 or float32")
        kwargs: dict[str, Any] = {}
        if gpu:
            from ..interop import cupy  # noqa: PLC0415 (CuPy only for GPU models)

            cp = cupy()
            cp.cuda.Device(like.device.index or 0).use()
            kwargs["stream"] = torch.cuda.current_stream(like.device)
        books = self.codebooks.to_gpu() if gpu else self.codebooks.to_cpu()
        self.storage = PagedPQCache(self.num_layers, self.num_kv_heads, self.head_dim, books,
                                    page_size=self.page_size, residual=self.residual, max_pages=self.max_pages,
                                    max_seqs=B, max_seq_len=self.max_seq_len, dtype=dtype,
                                    max_rollback=self.max_rollback,
                                    device="cuda" if gpu else "cpu", **kwargs)
        self.seq_ids = np.array([self.storage.add_sequence() for _ in range(B)], dtype=np.int64)
        self._gpu = gpu

    def _append_rows(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, *, planned: bool) -> None:
        """T new tokens per sequence ``(B, nh_k, T, d)`` into the storage in one append (flushes included).
        ``planned``: through the extend wrapper's plan of this forward (one launch, no device sync; NaN / inf
        tokens are flagged in ``stats()``), else ``PagedPQCache.append`` (a prompt: refuses NaN / inf)."""
        B, _, T, _ = k.shape
        rows = (B * T, self.num_kv_heads, self.head_dim)
        k_rows = self._array(k.transpose(1, 2).reshape(rows))
        v_rows = self._array(v.transpose(1, 2).reshape(rows))
        if planned:
            assert self._extend is not None  # update() planned this forward on it
            self._extend.append(layer_idx, k_rows, v_rows)
        else:
            storage, seq_ids = self._batch()
            storage.append(layer_idx, seq_ids, k_rows, v_rows, lengths=np.full(B, T))

    def _append_one(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        storage, seq_ids = self._batch()
        if not self._gpu:
            storage.append(layer_idx, seq_ids, self._array(k[:, :, 0]), self._array(v[:, :, 0]))
            if layer_idx == 0:
                self._counts["decode_steps"] += 1
            return
        step = self._step
        if layer_idx == 0:  # one plan per decode step, for every layer
            if step is None:
                step = self._step = DecodeStep(storage, self.num_heads)
            step.plan(seq_ids)
            self._counts["decode_steps"] += 1
        assert step is not None  # layer 0 made it
        step.append(layer_idx, self._array(k[:, :, 0]), self._array(v[:, :, 0]))

    def _array(self, t: torch.Tensor) -> Any:
        """A torch tensor as the array the storage takes: CuPy by DLPack (no copy) or NumPy."""
        t = t.detach().contiguous()
        if self._gpu:
            from ..interop import cupy  # noqa: PLC0415

            return cupy().from_dlpack(t)
        return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()

    def _attend_extend(self, layer_idx: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Causal attention of T new query tokens per sequence ``(B, nh, T, d)`` over the layer (their K/V
        appended by ``update``); ``(B, T, nh, d)``."""
        B, nh, T, d = query.shape
        q = query.transpose(1, 2).reshape(B * T, nh, d).contiguous()  # sequence b's tokens in rows b*T .. b*T+T-1
        if not self._gpu:
            storage, seq_ids = self._batch()
            o = prefill_attention(storage, layer_idx, seq_ids, self._array(q), np.arange(B + 1) * T, scale=scaling)
            return torch.from_numpy(np.ascontiguousarray(o)).to(query.dtype).view(B, T, nh, d)
        out = torch.empty((B, T, nh, d), dtype=query.dtype, device=query.device)
        assert self._extend is not None  # update() planned this forward on it
        self._extend.run(layer_idx, self._array(q), out=self._array(out.view(B * T, nh, d)))
        return out

    def _attend(self, layer_idx: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of one query token per sequence ``(B, nh, 1, d)`` over the layer; ``(B, 1, nh, d)``."""
        B, nh, _, d = query.shape
        q = query[:, :, 0].contiguous()
        if not self._gpu:
            storage, seq_ids = self._batch()
            o = pq_decode(storage, layer_idx, seq_ids, self._array(q), scale=scaling)
            return torch.from_numpy(np.ascontiguousarray(o)).to(query.dtype).view(B, 1, nh, d)
        out = torch.empty((B, 1, nh, d), dtype=query.dtype, device=query.device)
        assert self._step is not None  # update() planned this step on it
        self._step.run(layer_idx, self._array(q), out=self._array(out.view(B, nh, d)))  # writes into `out`
        return out


def pq_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The ``"million_pq"`` attention function: ``query`` ``(B, nh, T, d)`` → ``(B, T, nh, d)``.

    After :meth:`PQCache.update` of the same layer: one new token per sequence attends over the PQ cache
    through the kernels; a prefill runs SDPA over its exact K/V. Without a PQCache: SDPA."""
    pending = getattr(_handoff, "pending", None)
    _handoff.pending = None
    collector = getattr(_handoff, "collector", None)
    if collector is not None:
        collector.add(module.layer_idx, key, value)
    layer_idx = getattr(module, "layer_idx", None)
    if pending is None or pending[1] != layer_idx:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    cache, _, T, history = pending
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    if T > 1 or history == 0:
        _check_causal(attention_mask, T, history)
        if history == 0:  # a first prompt: exact attention over its own K/V
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scale,
                                          **kwargs)
        if cache._gpu and abs(cache._extend.scale - scale) > 1e-12 * scale:
            raise UnsupportedConfiguration(f"million_pq: the layer's softmax scale {scale} is not the cache's "
                                           f"{cache._extend.scale}")
        return cache._attend_extend(layer_idx, query, scale), None
    if cache._step is not None and abs(cache._step.scale - scale) > 1e-12 * scale:
        raise UnsupportedConfiguration(f"million_pq: the layer's softmax scale {scale} is not the cache's "
                                       f"{cache._step.scale}")
    return cache._attend(layer_idx, query, scale), None


def _check_causal(mask: torch.Tensor | None, T: int, history: int) -> None:
    """The mask of T new tokens over ``history`` cached ones must be plain causal: padded batches are not
    supported."""
    if mask is None:
        return
    keep = mask if mask.dtype == torch.bool else mask == 0
    keep = keep[..., -T:, -(T + history):]
    causal = torch.ones(T, T + history, dtype=torch.bool, device=keep.device).tril(diagonal=history)
    if keep.shape[-1] != T + history or not bool((keep == causal).all()):
        raise UnsupportedConfiguration("PQCache: the prefill's attention mask is not plain causal (a padded batch?); "
                                       "PQCache takes batches of prompts of one length without padding")


class _Collector:
    """K/V samples per layer for :func:`calibrate`, as float32 ``(n, nh_k, d)`` arrays on the model's side."""

    def __init__(self, num_layers: int, max_vectors: int, seed: int) -> None:
        self.k: list[list[Any]] = [[] for _ in range(num_layers)]
        self.v: list[list[Any]] = [[] for _ in range(num_layers)]
        self.max_vectors = max_vectors
        self.rng = np.random.default_rng(seed)

    def add(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        B, nh_k, T, d = key.shape
        for store, x in ((self.k, key), (self.v, value)):
            store[layer].append(x.detach().float().transpose(1, 2).reshape(B * T, nh_k, d))

    def arrays(self) -> tuple[list[Any], list[Any]]:
        ks, vs = [], []
        for k_parts, v_parts in zip(self.k, self.v):
            k, v = torch.cat(k_parts), torch.cat(v_parts)
            if k.shape[0] > self.max_vectors:
                rows = torch.from_numpy(np.sort(self.rng.choice(k.shape[0], self.max_vectors, replace=False)))
                k, v = k[rows.to(k.device)], v[rows.to(k.device)]
            ks.append(_to_array(k))
            vs.append(_to_array(v))
        return ks, vs


def _to_array(t: torch.Tensor) -> Any:
    if t.is_cuda:
        from ..interop import cupy  # noqa: PLC0415

        return cupy().from_dlpack(t.contiguous())
    return t.numpy()


@torch.no_grad()
def calibrate(model: Any, batches: Iterable[torch.Tensor], *, M: int, per_head: bool = False, iters: int = 25,
              seed: int = 0, max_vectors: int = 65536, progress: bool | None = None) -> ModelCodebooks:
    """Per-layer K/V codebooks from the model's own keys (after RoPE, as the cache stores them) and values.

    Args:
        model: a decoder (``LlamaForCausalLM`` and the like), on the device where k-means should run.
        batches: token-id tensors ``(B, T)`` of sample text (training text, not the evaluation split).
        M: subspaces (code bytes per vector).
        per_head: one codebook per kv head instead of one per layer shared by the heads.
        iters, seed, progress: as in :meth:`ModelCodebooks.train`.
        max_vectors: vectors per layer kept for k-means (a random subset of what the batches give).

    Returns the codebooks (save them with :meth:`ModelCodebooks.save`). The model's attention
    implementation is set to ``"million_pq"`` for the calibration forwards and restored after.
    """
    config = _model_config(model)
    before = getattr(config, "_attn_implementation", None)
    use_pq_attention(model)
    collector = _Collector(_geometry(config)[0], max_vectors, seed)
    _handoff.collector = collector
    try:
        for ids in batches:
            model(input_ids=ids.to(model.device), use_cache=False)
    finally:
        _handoff.collector = None
        if before is not None and before != ATTENTION_NAME:
            setter = getattr(model, "set_attn_implementation", None)
            if callable(setter):
                setter(before)
            else:
                config._attn_implementation = before
    if not collector.k[0]:
        raise ValueError("calibrate: batches gave no token ids")
    ks, vs = collector.arrays()
    return ModelCodebooks.train(ks, vs, M=M, iters=iters, seed=seed, per_head=per_head, progress=progress)


AttentionInterface.register(ATTENTION_NAME, pq_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
