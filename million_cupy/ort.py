"""ONNX Runtime custom ops: paged PQ attention inside an ONNX graph (onnxruntime-extensions).

Two ops, each over one layer of a registered cache. ``PagedPQAttention`` takes one decode step,

    inputs   q (B, nh, d) float32, k (B, nh_k, d) float32, v (B, nh_k, d) float32, seq_ids (B,) int64
    attrs    cache (string): the name a :class:`~million_cupy.cache.PagedPQCache` was registered under
             with :func:`register_cache`; layer (int): the layer of that cache
    output   (B, nh, d) float32

appends the step's ``k`` / ``v`` to that layer of the cache for the listed sequences, then returns the
attention of ``q`` over everything those sequences now hold in that layer (paged PQ tokens and the
exact residual window). On a GPU cache it runs the native kernels (:class:`~million_cupy.decode.BatchDecodeWrapper`);
on a CPU cache it computes the float64 reference (:func:`million_cupy.decode`), returned as float32.

``PagedPQPrefillAttention`` takes several new tokens per sequence (a prompt or a chunk of one, a new turn of a
chat, speculative drafts),

    inputs   q (N, nh, d) float32, k (N, nh_k, d) float32, v (N, nh_k, d) float32, seq_ids (B,) int64,
             qo_indptr (B + 1,) int64: sequence seq_ids[b]'s new tokens are rows qo_indptr[b]:qo_indptr[b+1]
             (FlashInfer's CSR offsets; a sequence may have none, the batch at least one)
    attrs    cache, layer: as above
    output   (N, nh, d) float32

appends each sequence's new tokens (their flushes into pages included), then returns their causal attention:
new token j of a sequence attends to everything the sequence held before the call and to its new tokens up to
j. On a GPU cache it runs :func:`million_cupy.prefill_attention` (a
:class:`~million_cupy.prefill.BatchPrefillWrapper` planned per call, so each call takes the regime its counts
call for: drafts on tensor cores, long chunks through the dense regime); on a CPU cache the float64 reference.

Use them through the helpers: :func:`build_decoder_graph` / :func:`build_prefill_graph` build a one-node model
(``q, k, v, seq_ids[, qo_indptr] -> op -> out``), :func:`make_session` registers the ops and the
onnxruntime-extensions library and returns an ``onnxruntime.InferenceSession``.

What the onnxruntime-extensions Python-op API imposes (onnxruntime-extensions 0.15):

* **Domain.** Python ops all live in the extensions' own domain, ``ai.onnx.contrib``
  (``onnxruntime_extensions.default_opset_domain()``); the API has no way to choose another, so the
  ops are ``ai.onnx.contrib::PagedPQAttention`` and ``ai.onnx.contrib::PagedPQPrefillAttention``, not
  ``ai.million_cupy::...``. :data:`DOMAIN` holds the name.
* **Dtypes.** The Python-op bridge accepts float32 but not float16 (a float16 Python op aborts the
  process: "Type float16 not supported by python customops api"). The ops are therefore float32
  only; ``build_decoder_graph(..., dtype="float16")`` (and ``build_prefill_graph``) wrap them in ONNX ``Cast`` nodes (float16
  inputs -> float32 -> op -> float16 output). The cache converts appended tokens to its own
  dtype, and on the GPU ``q`` is converted to the cache dtype before the kernel, as
  ``BatchDecodeWrapper.run`` requires.
* **Errors.** An exception escaping a Python op aborts the whole process (``std::terminate``), so
  the op never raises: it records the exception and returns a NaN output. Sessions from
  :func:`make_session` re-raise the recorded exception from ``run()``; a plain ``InferenceSession``
  gets the NaN output and a ``RuntimeWarning``. Every check runs before the cache is touched, so a
  failed step leaves it unchanged.
* **Copies per op call** (why this is an integration path, not the fast path; the fast path is
  :class:`~million_cupy.decode.BatchDecodeWrapper` with DLPack arrays, no copies):

  - ORT -> op: the extension copies each input tensor (q, k, v, seq_ids[, qo_indptr]) into a new NumPy array.
  - GPU cache: k and v are converted to the cache dtype on the host and copied host -> device
    (one copy each, inside ``PagedPQCache.append``); q likewise (one copy); the sequence ids stay
    on the host (the cache's bookkeeping is host-side). The first layer of each step plans it
    (``BatchDecodeWrapper.plan``: a few small host -> device copies of O(B) scheduling metadata); the
    prefill op plans every call (one ``BatchPrefillWrapper.plan``, ~0.1 ms of host work), and its appends of more
    than one token per sequence are checked for NaN / inf on the device (one synchronisation).
    The output is converted to float32 on the device and copied device -> host (one copy, which
    waits for the kernel: one stream synchronisation per op call).
  - CPU cache: no device copies; the reference dequantizes the sequences' caches (O(tokens) work
    per call) and computes in float64.
  - op -> ORT: the extension turns the returned array into a Python list (``ndarray.tolist()``,
    one Python float per element) and copies that into the output tensor: O(B * nh * d) Python
    objects per call.

Decode steps on a GPU cache. ``BatchDecodeWrapper.plan`` wants every layer of the batch at the same
length, so the op plans when it sees the first layer of a step (all layers equal) and reuses that
plan for the step's other layers (each must be called exactly once per step, in any order).
A cache used by ops must not be appended to behind their back in the middle of a step. The prefill op has
no such constraint: each call plans its own layer, so the layers of a prompt may be fed in any order.

Nothing here is thread-safe: run one session at a time per registered cache (the cache itself is
not thread-safe either), and one checked ``run()`` at a time per process for error reporting.

onnx, onnxruntime and onnxruntime-extensions are imported on first use; install them with the
``ort`` extra (``pip install 'million-cupy[ort]'``, or ``[ort-cpu]`` for the CPU-only onnxruntime).
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence, Union

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .cache import PagedPQCache

__all__ = [
    "OP_TYPE",
    "PREFILL_OP_TYPE",
    "DOMAIN",
    "GRAPH_DTYPES",
    "register_cache",
    "unregister_cache",
    "registered_caches",
    "build_decoder_graph",
    "build_prefill_graph",
    "make_session",
    "paged_pq_attention",
    "paged_pq_prefill_attention",
]

#: The decode op's type name (one new token per sequence).
OP_TYPE = "PagedPQAttention"
#: The several-new-tokens op's type name (prompts, chunks, new turns, drafts).
PREFILL_OP_TYPE = "PagedPQPrefillAttention"
#: The op's domain: fixed by onnxruntime-extensions for Python ops (its ``default_opset_domain()``).
DOMAIN = "ai.onnx.contrib"
#: Graph dtypes :func:`build_decoder_graph` accepts (the op itself computes in float32, see module doc).
GRAPH_DTYPES = ("float32", "float16")
#: Opset of the default ONNX domain the graphs use (Cast), and their IR version: old enough for
#: every onnxruntime the ``ort`` extra allows (>= 1.18).
ONNX_OPSET = 17
IR_VERSION = 8

_EXTRA_HINT = "install the ort extra: pip install 'million-cupy[ort]' (or 'million-cupy[ort-cpu]' for CPU-only onnxruntime)"

PathLike = Union[str, "os.PathLike[str]"]


def _require(module: str) -> Any:
    """Import ``module`` (onnx, onnxruntime, onnxruntime_extensions) or say which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"million_cupy.ort needs the {module} package: {_EXTRA_HINT}") from exc


# ---------------------------------------------------------------------------------------------------
# Cache registry
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    """A registered cache and, on the GPU path, its decode wrapper and the step it is planned for."""

    cache: PagedPQCache
    wrapper: Any = None
    # (seq ids, their per-sequence lengths before the step, num_heads) of the current plan.
    planned: tuple[tuple[int, ...], tuple[int, ...], int] | None = None


_REGISTRY: dict[str, _Entry] = {}


def register_cache(name: str, cache: PagedPQCache) -> None:
    """Make ``cache`` reachable from the ops' nodes (both kinds) whose ``cache`` attribute is ``name``.

    Registering a name again replaces its cache (and forgets any plan made for the old one). The
    registry holds a strong reference until :func:`unregister_cache`.
    """
    from .cache import PagedPQCache  # noqa: PLC0415 - keeps `import million_cupy.ort` light

    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty string, got {name!r}")
    if not isinstance(cache, PagedPQCache):
        raise TypeError(f"cache: expected a PagedPQCache, got {type(cache).__name__}")
    _REGISTRY[name] = _Entry(cache)


def unregister_cache(name: str) -> None:
    """Forget the cache registered under ``name`` (KeyError naming the registered ones if absent)."""
    if name not in _REGISTRY:
        raise KeyError(f"no cache registered under {name!r}; registered: {sorted(_REGISTRY)}")
    del _REGISTRY[name]


def registered_caches() -> dict[str, PagedPQCache]:
    """A copy of the registry: name -> cache."""
    return {name: entry.cache for name, entry in _REGISTRY.items()}


def _lookup(name: str, op_type: str) -> _Entry:
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ValueError(
            f"{op_type}: no cache registered under {name!r} (call million_cupy.ort.register_cache first); "
            f"registered: {sorted(_REGISTRY)}"
        )
    return entry


# ---------------------------------------------------------------------------------------------------
# The op's computation (plain NumPy in and out; callable without ONNX Runtime)
# ---------------------------------------------------------------------------------------------------


def _check_call(cache: PagedPQCache, layer: int, q: Any, k: Any, v: Any, seq_ids: Any,
                qo_indptr: Any = None) -> tuple[Any, ...]:
    """Host arrays of one op call, or a TypeError / ValueError / IndexError saying what was expected:
    ``(q, k, v, ids, offsets)``. q ``(N, nh, d)``, k / v ``(N, nh_k, d)``; the decode op (``qo_indptr`` None) takes
    one id per row of q (offsets None), the prefill op ``B`` ids and ``B + 1`` offsets ending at ``N``."""
    prefill = qo_indptr is not None
    where = f"{PREFILL_OP_TYPE if prefill else OP_TYPE}(layer={layer})"
    if not 0 <= layer < cache.num_layers:
        raise IndexError(f"{where}: expected 0 <= layer < {cache.num_layers} (the cache's layers), got {layer}")
    arrays = []
    for name, x in (("q", q), ("k", k), ("v", v)):
        a = np.asarray(x)
        if a.dtype.kind != "f":
            raise TypeError(f"{where}: {name}: expected a float array, got dtype {a.dtype}")
        if a.ndim != 3:
            raise ValueError(f"{where}: {name}: expected 3 dimensions, got shape {a.shape}")
        arrays.append(a)
    q, k, v = arrays
    N, nh, d = q.shape
    nh_k = cache.num_kv_heads
    if N < 1:
        what = "new token" if prefill else "sequence in the batch"
        raise ValueError(f"{where}: q: expected at least one {what}, got shape {q.shape}")
    if d != cache.head_dim:
        raise ValueError(f"{where}: q: expected head dim {cache.head_dim} (the cache's), got shape {q.shape}")
    if nh % nh_k:
        raise ValueError(
            f"{where}: q: expected a number of heads that is a multiple of the cache's num_kv_heads = {nh_k}, "
            f"got shape {q.shape}"
        )
    for name, a in (("k", k), ("v", v)):
        if a.shape != (N, nh_k, d):
            raise ValueError(f"{where}: {name}: expected shape ({N}, {nh_k}, {d}), got {a.shape}")
    ids = np.asarray(seq_ids)
    offsets = None
    if prefill:
        if ids.dtype.kind not in "iu" or ids.ndim != 1 or ids.shape[0] < 1:
            raise ValueError(f"{where}: seq_ids: expected a 1-D array of at least one integer id, got {ids.dtype} "
                             f"{ids.shape}")
        from .prefill import check_qo_indptr  # noqa: PLC0415 - keeps `import million_cupy.ort` light

        try:
            offsets = check_qo_indptr(qo_indptr, ids.shape[0])
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
        if offsets[-1] != N:
            raise ValueError(f"{where}: qo_indptr: expected the last offset to be q's {N} rows (every row a new "
                             f"token of one sequence), got {offsets.tolist()[:16]}")
    elif ids.dtype.kind not in "iu" or ids.shape != (N,):
        raise ValueError(f"{where}: seq_ids: expected {N} integer ids (one per row of q), got {ids.dtype} {ids.shape}")
    ids = ids.astype(np.int64)
    if np.unique(ids).shape[0] != ids.shape[0]:
        raise ValueError(f"{where}: seq_ids: expected distinct ids, got {ids.tolist()}")
    try:
        cache.seq_lens(layer, ids)  # ValueError for ids that are out of range or not live
    except ValueError as exc:
        raise ValueError(f"{where}: seq_ids: {exc}") from exc
    return q, k, v, ids, offsets


def _plan_step(entry: _Entry, layer: int, ids: np.ndarray, nh: int) -> None:
    """Plan the GPU decode step unless this step (same ids, same pre-step lengths) is planned already."""
    cache = entry.cache
    lens = tuple(int(n) for n in cache.seq_lens(layer, ids))
    key = (tuple(int(i) for i in ids), lens, nh)
    if entry.planned == key:
        return  # another layer of the step already planned it
    per_layer = np.stack([cache.seq_lens(l, ids) for l in range(cache.num_layers)])
    if (per_layer != per_layer[0]).any():
        raise ValueError(
            f"{OP_TYPE}(layer={layer}): on a GPU cache every layer must be appended once per decode step; "
            f"layers hold different lengths for sequences {ids.tolist()}: {per_layer.tolist()} "
            f"(rows: layers); this step was planned for {entry.planned}"
        )
    if entry.wrapper is None:
        from .decode import BatchDecodeWrapper  # noqa: PLC0415

        entry.wrapper = BatchDecodeWrapper(cache)
    entry.planned = None  # a failing plan must not leave a stale key behind
    entry.wrapper.plan(ids, new_tokens=1, num_heads=nh)
    entry.planned = key


def paged_pq_attention(q: Any, k: Any, v: Any, seq_ids: Any, *, cache: str, layer: int) -> np.ndarray:
    """What one ``PagedPQAttention`` node computes, on host (NumPy) arrays; raises on bad input.

    Appends ``k`` / ``v`` (B, nh_k, d) to layer ``layer`` of the cache registered as ``cache`` for
    ``seq_ids`` (B,), then returns float32 (B, nh, d) attention of ``q`` over those sequences. Every
    check runs before the cache changes.
    """
    entry = _lookup(cache, OP_TYPE)
    c = entry.cache
    layer = int(layer)
    q, k, v, ids, _ = _check_call(c, layer, q, k, v, seq_ids)
    if not c.is_gpu:
        from .decode import decode  # noqa: PLC0415

        c.append(layer, ids, k, v)
        return np.ascontiguousarray(decode(c, layer, ids, q.astype(np.float32, copy=False)), dtype=np.float32)

    from .interop import cupy, resolve_dtype  # noqa: PLC0415

    cp = cupy()
    with c.stream:  # the cache's stream: plan uploads, append, kernel and copy-out are ordered on it
        _plan_step(entry, layer, ids, q.shape[1])
        c.append(layer, ids, k, v)
        # run() wants q in the cache dtype: convert on the host, then one host -> device copy.
        q_dev = cp.asarray(np.ascontiguousarray(q.astype(resolve_dtype(c.dtype), copy=False)))
        out = entry.wrapper.run(layer, q_dev)
        return out.astype(cp.float32).get()


def paged_pq_prefill_attention(q: Any, k: Any, v: Any, seq_ids: Any, qo_indptr: Any, *, cache: str,
                               layer: int) -> np.ndarray:
    """What one ``PagedPQPrefillAttention`` node computes, on host (NumPy) arrays; raises on bad input.

    Appends sequence ``seq_ids[b]``'s new tokens, rows ``qo_indptr[b]:qo_indptr[b+1]`` of ``k`` / ``v``
    ``(N, nh_k, d)``, to layer ``layer`` of the cache registered as ``cache``, then returns the float32
    ``(N, nh, d)`` causal attention of ``q``'s rows: each new token over its sequence's earlier tokens and the
    new ones up to itself. Every check (``cache.append``'s too: pool pages, ``max_seq_len``, NaN / inf rows)
    runs before the cache changes.
    """
    from .prefill import prefill_attention  # noqa: PLC0415

    entry = _lookup(cache, PREFILL_OP_TYPE)
    c = entry.cache
    layer = int(layer)
    q, k, v, ids, offsets = _check_call(c, layer, q, k, v, seq_ids, qo_indptr)
    counts = np.diff(offsets)
    if not c.is_gpu:
        c.append(layer, ids, k, v, lengths=counts)
        out = prefill_attention(c, layer, ids, q.astype(np.float32, copy=False), offsets)
        return np.ascontiguousarray(out, dtype=np.float32)

    from .interop import cupy, resolve_dtype  # noqa: PLC0415

    cp = cupy()
    with c.stream:  # append, plan uploads, kernels and copy-out ordered on the cache's stream
        c.append(layer, ids, k, v, lengths=counts)
        q_dev = cp.asarray(np.ascontiguousarray(q.astype(resolve_dtype(c.dtype), copy=False)))
        out = prefill_attention(c, layer, ids, q_dev, offsets, stream=c.stream)
        return out.astype(cp.float32).get()


# ---------------------------------------------------------------------------------------------------
# The ONNX Runtime side: op registration, error hand-off, graphs and sessions
# ---------------------------------------------------------------------------------------------------

_lock = threading.Lock()
_registered = False
_checked_runs = 0  # > 0 while a session from make_session() is inside run()
_pending: list[BaseException] = []


def _guarded(op_type: str, compute: Any) -> Any:
    """The Python op body of ``op_type``: ``compute(*inputs, cache=..., layer=...)``, whose failures are handed to
    the session wrapper (or warned about) with a NaN output instead of raising."""

    def body(q: np.ndarray, *inputs: np.ndarray, **attrs: Any) -> np.ndarray:
        # Called by onnxruntime-extensions from inside ORT: an exception escaping here would abort the process.
        try:
            return compute(q, *inputs, cache=attrs.get("cache", ""), layer=attrs.get("layer", -1))
        except Exception as exc:  # noqa: BLE001 - see above
            with _lock:
                checked = _checked_runs > 0
                if checked:
                    _pending.append(exc)
            if not checked:
                try:
                    warnings.warn(
                        f"{op_type} failed and returned NaN ({type(exc).__name__}: {exc}); sessions from "
                        f"million_cupy.ort.make_session raise such errors instead",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                except Exception:  # noqa: BLE001 - warnings turned into errors must not escape either
                    pass
            try:
                shape = np.shape(q)
                return np.full(shape if len(shape) == 3 else (0, 0, 0), np.nan, dtype=np.float32)
            except Exception:  # noqa: BLE001
                return np.zeros((0, 0, 0), dtype=np.float32)

    body.__name__ = f"{op_type}_body"
    return body


def _ensure_op_registered() -> Any:
    """Register the Python ops with onnxruntime-extensions once per process; returns the extensions module."""
    global _registered
    ext = _require("onnxruntime_extensions")
    with _lock:
        if not _registered:
            PyOp = ext.PyOp
            floats = [PyOp.dt_float] * 3
            for op_type, ids, compute in ((OP_TYPE, [PyOp.dt_int64], paged_pq_attention),
                                          (PREFILL_OP_TYPE, [PyOp.dt_int64] * 2, paged_pq_prefill_attention)):
                ext.onnx_op(
                    op_type=op_type,
                    inputs=floats + ids,
                    outputs=[PyOp.dt_float],
                    attrs={"cache": PyOp.dt_string, "layer": PyOp.dt_int64},
                )(_guarded(op_type, compute))
            _registered = True
    domain = ext.default_opset_domain()
    if domain != DOMAIN:  # pragma: no cover - only if a future onnxruntime-extensions moves it
        raise RuntimeError(f"onnxruntime-extensions registers Python ops in {domain!r}, million_cupy.ort expects {DOMAIN!r}")
    return ext


def _take_pending() -> list[BaseException]:
    with _lock:
        errors = list(_pending)
        _pending.clear()
    return errors


_session_class: type | None = None
_options_with_library: weakref.WeakSet = weakref.WeakSet()


def _checked_session_class() -> type:
    """An ``onnxruntime.InferenceSession`` subclass whose runs re-raise the op's recorded errors."""
    global _session_class
    if _session_class is not None:
        return _session_class
    ort: Any = _require("onnxruntime")

    class CheckedInferenceSession(ort.InferenceSession):
        """InferenceSession that raises what a ``PagedPQAttention`` / ``PagedPQPrefillAttention`` node failed with
        (instead of NaN output)."""

        def _checked(self, call, *args, **kwargs):
            global _checked_runs
            _take_pending()  # errors of an earlier, unchecked run are not this run's
            with _lock:
                _checked_runs += 1
            try:
                result = call(*args, **kwargs)
            finally:
                with _lock:
                    _checked_runs -= 1
            errors = _take_pending()
            if errors:
                raise errors[0]
            return result

        def run(self, output_names, input_feed, run_options=None):  # noqa: D102 - InferenceSession.run
            return self._checked(super().run, output_names, input_feed, run_options)

        def run_with_ort_values(self, output_names, input_dict_ort_values, run_options=None):  # noqa: D102
            return self._checked(super().run_with_ort_values, output_names, input_dict_ort_values, run_options)

        def run_with_iobinding(self, iobinding, run_options=None):  # noqa: D102
            return self._checked(super().run_with_iobinding, iobinding, run_options)

    _session_class = CheckedInferenceSession
    return _session_class


def _tensor_type(dtype: str) -> int:
    onnx = _require("onnx")
    return {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16}[dtype]


def build_decoder_graph(nh: int, nh_k: int, d: int, cache_name: str, layer: int, dtype: str = "float32") -> Any:
    """A one-layer decode-attention ONNX model: ``q, k, v, seq_ids -> PagedPQAttention -> out``.

    Inputs ``q`` (batch, nh, d), ``k`` / ``v`` (batch, nh_k, d) in ``dtype`` ("float32" or "float16")
    and ``seq_ids`` (batch,) int64; output ``out`` (batch, nh, d) in ``dtype``. float16 graphs cast
    to and from float32 around the op (the Python-op bridge has no float16). The node's attributes
    name the cache (see :func:`register_cache`; it may be registered after the graph is built) and
    the layer. If ``cache_name`` is registered already, its geometry is checked now.

    Returns an ``onnx.ModelProto`` (opset 17 + the op's domain, IR version 8), checked with
    ``onnx.checker``.
    """
    return _one_node_graph(OP_TYPE, nh, nh_k, d, cache_name, layer, dtype)


def build_prefill_graph(nh: int, nh_k: int, d: int, cache_name: str, layer: int, dtype: str = "float32") -> Any:
    """A one-layer ONNX model of several new tokens per sequence: ``q, k, v, seq_ids, qo_indptr ->
    PagedPQPrefillAttention -> out`` (a prompt or a chunk of one, a new turn, speculative drafts).

    Inputs ``q`` (tokens, nh, d), ``k`` / ``v`` (tokens, nh_k, d) in ``dtype`` ("float32" or "float16"),
    ``seq_ids`` (batch,) int64 and ``qo_indptr`` (batch + 1,) int64, sequence ``seq_ids[b]``'s new tokens being
    rows ``qo_indptr[b]:qo_indptr[b+1]``; output ``out`` (tokens, nh, d) in ``dtype``. Attributes, casts and
    checks as in :func:`build_decoder_graph`.

    Example (a CPU cache; ``pip install 'million-cupy[ort-cpu]'``)::

        mort.register_cache("llm", cache)
        sess = mort.make_session(mort.build_prefill_graph(nh, nh_k, d, "llm", layer=0))
        (out,) = sess.run(None, {"q": q, "k": k, "v": v,                     # (N, nh / nh_k, d) float32
                                 "seq_ids": np.array([s0, s1], np.int64),
                                 "qo_indptr": np.array([0, 300, 304], np.int64)})  # a prompt, 4 drafts
    """
    return _one_node_graph(PREFILL_OP_TYPE, nh, nh_k, d, cache_name, layer, dtype)


def _one_node_graph(op_type: str, nh: int, nh_k: int, d: int, cache_name: str, layer: int, dtype: str) -> Any:
    """The model of :func:`build_decoder_graph` (``OP_TYPE``) or :func:`build_prefill_graph` (``PREFILL_OP_TYPE``)."""
    for name, value in (("nh", nh), ("nh_k", nh_k), ("d", d)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < 0:
        raise ValueError(f"layer: expected a non-negative integer, got {layer!r}")
    nh, nh_k, d, layer = int(nh), int(nh_k), int(d), int(layer)
    if nh % nh_k:
        raise ValueError(f"nh: expected a multiple of nh_k = {nh_k} (grouped-query attention), got {nh}")
    if not isinstance(cache_name, str) or not cache_name:
        raise ValueError(f"cache_name: expected a non-empty string, got {cache_name!r}")
    if dtype not in GRAPH_DTYPES:
        raise TypeError(
            f"dtype: expected one of {list(GRAPH_DTYPES)} (the Python-op bridge computes in float32; "
            f"float16 graphs cast around it), got {dtype!r}"
        )
    entry = _REGISTRY.get(cache_name)
    if entry is not None:
        c = entry.cache
        if (nh_k, d) != (c.num_kv_heads, c.head_dim) or layer >= c.num_layers:
            raise ValueError(
                f"cache {cache_name!r}: expected nh_k = {c.num_kv_heads}, d = {c.head_dim}, layer < {c.num_layers} "
                f"(the registered cache's), got nh_k = {nh_k}, d = {d}, layer = {layer}"
            )
    onnx = _require("onnx")
    helper, TensorProto = onnx.helper, onnx.TensorProto
    elem = _tensor_type(dtype)
    prefill = op_type == PREFILL_OP_TYPE
    rows = "tokens" if prefill else "batch"  # symbolic: the op checks them against each other
    inputs = [
        helper.make_tensor_value_info("q", elem, [rows, nh, d]),
        helper.make_tensor_value_info("k", elem, [rows, nh_k, d]),
        helper.make_tensor_value_info("v", elem, [rows, nh_k, d]),
        helper.make_tensor_value_info("seq_ids", TensorProto.INT64, ["batch"]),
    ]
    if prefill:
        inputs.append(helper.make_tensor_value_info("qo_indptr", TensorProto.INT64, ["batch_plus_1"]))
    outputs = [helper.make_tensor_value_info("out", elem, [rows, nh, d])]
    nodes = []
    op_in = ["q", "k", "v"]
    if dtype != "float32":
        nodes += [helper.make_node("Cast", [x], [f"{x}_f32"], to=TensorProto.FLOAT, name=f"cast_{x}") for x in op_in]
        op_in = [f"{x}_f32" for x in op_in]
    op_out = "out" if dtype == "float32" else "out_f32"
    kind = "prefill" if prefill else "decode"
    nodes.append(
        helper.make_node(
            op_type, [*op_in, *(i.name for i in inputs[3:])], [op_out], domain=DOMAIN,
            name=f"paged_pq_{'prefill_' if prefill else ''}attention_l{layer}", cache=cache_name, layer=layer,
        )
    )
    if dtype != "float32":
        nodes.append(helper.make_node("Cast", [op_out], ["out"], to=elem, name="cast_out"))
    graph = helper.make_graph(nodes, f"million_cupy_{kind}_l{layer}", inputs, outputs)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(DOMAIN, 1)],
        ir_version=IR_VERSION,
        producer_name="million_cupy",
    )
    onnx.checker.check_model(model)
    return model


def make_session(
    graph: Any,
    *,
    providers: Sequence[Any] | None = None,
    session_options: Any = None,
) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``graph`` with ``PagedPQAttention`` and ``PagedPQPrefillAttention``
    available.

    ``graph`` is an ``onnx.ModelProto`` (as :func:`build_decoder_graph` returns), serialized model
    bytes, or a path to a ``.onnx`` file. Registers the Python ops (once per process) and the
    onnxruntime-extensions library on ``session_options`` (a new ``SessionOptions`` if None; options
    passed again are not registered twice, but do not pass options on which you registered the
    library yourself: ONNX Runtime then fails with conflicting kernels).
    ``providers`` defaults to ``["CPUExecutionProvider"]``: Python ops run on the CPU whatever the
    provider (the GPU work happens inside the op, on the cache's device).

    The session is an ``InferenceSession`` subclass whose ``run`` re-raises errors the op hit
    (unknown cache, shapes that disagree with the cache, dead sequence ids, ...); see the module doc.
    """
    ext = _ensure_op_registered()
    ort = _require("onnxruntime")
    onnx = _require("onnx")
    if isinstance(graph, onnx.ModelProto):
        model: Any = graph.SerializeToString()
    elif isinstance(graph, (bytes, bytearray)):
        model = bytes(graph)
    elif isinstance(graph, (str, os.PathLike)):
        model = os.fspath(graph)
    else:
        raise TypeError(f"graph: expected an onnx.ModelProto, model bytes or a path, got {type(graph).__name__}")
    so = session_options if session_options is not None else ort.SessionOptions()
    # Registering the library twice on one SessionOptions makes session creation fail (conflicting
    # kernels), so options passed in again are registered only once.
    if so not in _options_with_library:
        so.register_custom_ops_library(ext.get_library_path())
        _options_with_library.add(so)
    return _checked_session_class()(model, so, providers=list(providers or ["CPUExecutionProvider"]))
