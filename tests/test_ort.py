"""The ONNX Runtime custom op (million_cupy.ort): decode steps through an ORT session against the library.

CPU tests: a few decode steps through ``PagedPQAttention`` sessions (two layers, a flush crossed)
must equal :func:`million_cupy.decode` on a second cache fed the same tokens, and the float64
reference over the cache's dequantized contents; bad inputs raise clear errors and leave the cache
unchanged. The GPU test runs the same loop on GPU caches against ``BatchDecodeWrapper``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime_extensions")

import million_cupy as mc  # noqa: E402
from million_cupy import ort as mo  # noqa: E402
from million_cupy import reference  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

L, NH, NH_K, D, M = 2, 4, 2, 64, 16
PAGE, RESIDUAL = 16, 32
PROMPTS = (20, 29)  # the second sequence crosses the 32-token window during the steps: a page flush
STEPS = 5


def _books(rng: np.random.Generator) -> mc.ModelCodebooks:
    # Random centroids: the op's plumbing is under test here, not codebook quality.
    def cb():
        return mc.Codebook(rng.standard_normal((M, 256, D // M)).astype(np.float32))

    return mc.ModelCodebooks([cb() for _ in range(L)], [cb() for _ in range(L)])


def _cache(books: mc.ModelCodebooks, device: str = "cpu") -> mc.PagedPQCache:
    return mc.PagedPQCache(L, NH_K, D, books, page_size=PAGE, residual=RESIDUAL, max_seqs=4, max_seq_len=256,
                           device=device)


def _prefill(caches, rng: np.random.Generator) -> list[int]:
    """The same random prompts into every cache; returns the sequence ids (equal in every cache)."""
    total = sum(PROMPTS)
    kv = [(rng.standard_normal((total, NH_K, D)), rng.standard_normal((total, NH_K, D))) for _ in range(L)]
    ids = None
    for cache in caches:
        seqs = [cache.add_sequence() for _ in PROMPTS]
        assert ids is None or seqs == ids
        ids = seqs
        for layer, (k, v) in enumerate(kv):
            cache.append(layer, seqs, k.astype(np.float32), v.astype(np.float32), lengths=list(PROMPTS))
    return ids


def _step_inputs(rng: np.random.Generator, dtype=np.float32):
    B = len(PROMPTS)
    return (rng.standard_normal((B, NH, D)).astype(dtype), rng.standard_normal((B, NH_K, D)).astype(dtype),
            rng.standard_normal((B, NH_K, D)).astype(dtype))


def _feed(q, k, v, ids):
    return {"q": q, "k": k, "v": v, "seq_ids": np.asarray(ids, dtype=np.int64)}


@pytest.fixture
def registry():
    """Registered names are removed after the test (the registry is process-wide)."""
    names: list[str] = []

    def register(name, cache):
        mo.register_cache(name, cache)
        names.append(name)

    yield register
    for name in names:
        if name in mo.registered_caches():
            mo.unregister_cache(name)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_decode_steps_match_library_and_reference(rng, registry, dtype):
    np_dtype = np.dtype(dtype)
    books = _books(rng)
    via_ort, direct = _cache(books), _cache(books)
    ids = _prefill([via_ort, direct], rng)
    registry(f"ort-{dtype}", via_ort)
    sessions = [mo.make_session(mo.build_decoder_graph(NH, NH_K, D, f"ort-{dtype}", layer, dtype)) for layer in range(L)]
    for _ in range(STEPS):
        for layer, sess in enumerate(sessions):
            q, k, v = _step_inputs(rng, np_dtype)
            (got,) = sess.run(None, _feed(q, k, v, ids))
            assert got.dtype == np_dtype and got.shape == (len(ids), NH, D)
            # The same step on the second cache through the library; the op computes in float32
            # (the Python-op bridge has no float16), so the library gets q upcast, then its result
            # goes through the same float32 -> float16 rounding as the graph's output Cast.
            direct.append(layer, ids, k, v)
            want = mc.decode(direct, layer, ids, q.astype(np.float32))
            np.testing.assert_array_equal(got, want.astype(np_dtype))
            # The float64 reference over what the ORT-fed cache holds.
            kv = [via_ort.dequantize(layer, s) for s in ids]
            ref, _ = reference.decode_attention(q.astype(np.float64), [a for a, _ in kv], [b for _, b in kv])
            tol = 1e-3 if dtype == "float16" else 1e-6
            np.testing.assert_allclose(got.astype(np.float64), ref, rtol=tol, atol=tol)
    for layer in range(L):
        np.testing.assert_array_equal(via_ort.seq_lens(layer, ids), np.asarray(PROMPTS) + STEPS)
        for s in ids:  # both caches hold the same contents, token for token
            for a, b in zip(via_ort.dequantize(layer, s), direct.dequantize(layer, s)):
                np.testing.assert_array_equal(a, b)
    assert via_ort.stats()["flushes"] > 0  # the steps crossed the residual window: pages were written


def test_paged_pq_attention_is_the_op_body(rng, registry):
    """The NumPy entry point computes exactly what the node does (usable without ONNX Runtime)."""
    books = _books(rng)
    a, b = _cache(books), _cache(books)
    ids = _prefill([a, b], rng)
    registry("body-a", a)
    registry("body-b", b)
    sess = mo.make_session(mo.build_decoder_graph(NH, NH_K, D, "body-a", 1))
    q, k, v = _step_inputs(rng)
    (got,) = sess.run(None, _feed(q, k, v, ids))
    want = mo.paged_pq_attention(q, k, v, np.asarray(ids), cache="body-b", layer=1)
    assert want.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_graph_shape_and_domain():
    onnx = pytest.importorskip("onnx")
    model = mo.build_decoder_graph(8, 2, 128, "not-registered-yet", 3, "float16")
    graph = model.graph
    assert [i.name for i in graph.input] == ["q", "k", "v", "seq_ids"]
    assert [o.name for o in graph.output] == ["out"]
    (op,) = [n for n in graph.node if n.op_type == mo.OP_TYPE]
    assert op.domain == mo.DOMAIN == "ai.onnx.contrib"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in op.attribute}
    assert attrs == {"cache": b"not-registered-yet", "layer": 3}
    assert [n.op_type for n in graph.node] == ["Cast", "Cast", "Cast", mo.OP_TYPE, "Cast"]
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 8, 128]


# New tokens per call and sequence for the prefill op: a 40-token chunk crosses the 32-token window (pages
# flushed in the call), a sequence with no new tokens rides along, and the last call is one token each.
CHUNKS = ((40, 7, 0), (0, 30, 5), (3, 1, 64), (1, 1, 1))


def _chunk_inputs(rng: np.random.Generator, counts, dtype=np.float32):
    N = int(sum(counts))
    return (rng.standard_normal((N, NH, D)).astype(dtype), rng.standard_normal((N, NH_K, D)).astype(dtype),
            rng.standard_normal((N, NH_K, D)).astype(dtype))


def _prefill_feed(q, k, v, ids, counts):
    return {"q": q, "k": k, "v": v, "seq_ids": np.asarray(ids, dtype=np.int64),
            "qo_indptr": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_prefill_calls_match_library_and_reference(rng, registry, dtype):
    """Prompts fed in ragged chunks through PagedPQPrefillAttention: each call's output equals
    prefill_attention on a twin cache fed through the library, and the float64 causal reference over what the
    ORT-fed cache holds; both caches end up with the same tokens."""
    np_dtype = np.dtype(dtype)
    books = _books(rng)
    via_ort, direct = _cache(books), _cache(books)
    ids = [via_ort.add_sequence() for _ in CHUNKS[0]]
    assert ids == [direct.add_sequence() for _ in CHUNKS[0]]
    registry(f"prefill-{dtype}", via_ort)
    sessions = [mo.make_session(mo.build_prefill_graph(NH, NH_K, D, f"prefill-{dtype}", layer, dtype))
                for layer in range(L)]
    for counts in CHUNKS:
        ind = np.concatenate([[0], np.cumsum(counts)])
        for layer in reversed(range(L)):  # any layer order: each call plans its own layer
            q, k, v = _chunk_inputs(rng, counts, np_dtype)
            (got,) = sessions[layer].run(None, _prefill_feed(q, k, v, ids, counts))
            assert got.dtype == np_dtype and got.shape == q.shape
            direct.append(layer, ids, k, v, lengths=list(counts))
            want = mc.prefill_attention(direct, layer, ids, q.astype(np.float32), ind)
            np.testing.assert_array_equal(got, want.astype(np_dtype))
            kv = [via_ort.dequantize(layer, s) for s in ids]
            ref, _ = reference.causal_attention(q.astype(np.float64), [a for a, _ in kv], [b for _, b in kv], ind)
            tol = 1e-3 if dtype == "float16" else 1e-6
            np.testing.assert_allclose(got.astype(np.float64), ref, rtol=tol, atol=tol)
            if max(counts) == 1:  # one token each: what the decode op computes
                np.testing.assert_allclose(got.astype(np.float64), mc.decode(direct, layer, ids, q.astype(np.float32)),
                                           rtol=tol, atol=tol)
    totals = np.sum(CHUNKS, axis=0)
    for layer in range(L):
        np.testing.assert_array_equal(via_ort.seq_lens(layer, ids), totals)
        for s in ids:
            for a, b in zip(via_ort.dequantize(layer, s), direct.dequantize(layer, s)):
                np.testing.assert_array_equal(a, b)
    assert via_ort.stats()["flushes"] > 0  # chunks crossed the residual window: pages were written

    # A decode step through the other op continues the same sequences.
    q, k, v = _step_inputs(rng, np_dtype)
    q, k, v = (np.concatenate([x, x[:1]]) for x in (q, k, v))  # three sequences
    (out,) = mo.make_session(mo.build_decoder_graph(NH, NH_K, D, f"prefill-{dtype}", 0, dtype)).run(
        None, _feed(q, k, v, ids))
    assert np.isfinite(out).all() and via_ort.seq_lens(0, ids).tolist() == (totals + 1).tolist()


def test_paged_pq_prefill_attention_is_the_op_body(rng, registry):
    books = _books(rng)
    a, b = _cache(books), _cache(books)
    ids = _prefill([a, b], rng)
    registry("pbody-a", a)
    registry("pbody-b", b)
    counts = (3, 17)
    q, k, v = _chunk_inputs(rng, counts)
    feed = _prefill_feed(q, k, v, ids, counts)
    (got,) = mo.make_session(mo.build_prefill_graph(NH, NH_K, D, "pbody-a", 1)).run(None, feed)
    want = mo.paged_pq_prefill_attention(q, k, v, feed["seq_ids"], feed["qo_indptr"], cache="pbody-b", layer=1)
    assert want.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_prefill_graph_shape_and_domain():
    onnx = pytest.importorskip("onnx")
    model = mo.build_prefill_graph(8, 2, 128, "not-registered-yet", 3, "float16")
    graph = model.graph
    assert [i.name for i in graph.input] == ["q", "k", "v", "seq_ids", "qo_indptr"]
    (op,) = [n for n in graph.node if n.op_type == mo.PREFILL_OP_TYPE]
    assert op.domain == mo.DOMAIN and op.name == "paged_pq_prefill_attention_l3"
    assert list(op.input) == ["q_f32", "k_f32", "v_f32", "seq_ids", "qo_indptr"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in op.attribute}
    assert attrs == {"cache": b"not-registered-yet", "layer": 3}

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert [dims(i) for i in graph.input] == [["tokens", 8, 128], ["tokens", 2, 128], ["tokens", 2, 128],
                                              ["batch"], ["batch_plus_1"]]
    assert dims(graph.output[0]) == ["tokens", 8, 128]
    with pytest.raises(ValueError, match=r"nh: expected a multiple of nh_k = 4"):
        mo.build_prefill_graph(6, 4, 128, "x", 0)


def test_prefill_op_errors_raise_and_leave_the_cache_unchanged(rng, registry):
    cache = _cache(_books(rng))
    ids = _prefill([cache], rng)
    counts = (2, 3)
    q, k, v = _chunk_inputs(rng, counts)
    ghost = mo.make_session(mo.build_prefill_graph(NH, NH_K, D, "ghost", 0))
    with pytest.raises(ValueError, match=r"PagedPQPrefillAttention: no cache registered under 'ghost'"):
        ghost.run(None, _prefill_feed(q, k, v, ids, counts))
    registry("perrs", cache)
    sess = mo.make_session(mo.build_prefill_graph(NH, NH_K, D, "perrs", 0))
    before = _lens(cache, ids)

    def fails(feed, exc, match):
        with pytest.raises(exc, match=match):
            sess.run(None, feed)
        assert _lens(cache, ids) == before

    good = _prefill_feed(q, k, v, ids, counts)
    where = r"PagedPQPrefillAttention\(layer=0\): "
    fails(good | {"qo_indptr": np.array([0, 5], np.int64)}, ValueError,
          where + r"qo_indptr: expected 3 integer offsets \(one more than the sequences\), got int64 of shape \(2,\)")
    fails(good | {"qo_indptr": np.array([0, 4, 2], np.int64)}, ValueError,
          where + r"qo_indptr: expected non-decreasing offsets from 0 .*got \[0, 4, 2\]")
    fails(good | {"qo_indptr": np.array([0, 2, 4], np.int64)}, ValueError,
          where + r"qo_indptr: expected the last offset to be q's 5 rows .*got \[0, 2, 4\]")
    fails(good | {"k": k[:4]}, ValueError, where + r"k: expected shape \(5, 2, 64\), got \(4, 2, 64\)")
    fails(good | {"seq_ids": np.array([ids[0], ids[0]], np.int64)}, ValueError,
          where + r"seq_ids: expected distinct ids, got \[0, 0\]")
    fails(good | {"seq_ids": np.array([], np.int64), "qo_indptr": np.array([0], np.int64)}, ValueError,
          where + r"seq_ids: expected a 1-D array of at least one integer id, got int64 \(0,\)")
    bad = k.copy()
    bad[3, 1, 7] = np.nan
    fails(good | {"k": bad}, ValueError, r"NaN|non-finite|inf")
    long = (2, 256)  # past max_seq_len = 256 for the second sequence
    fails(_prefill_feed(*_chunk_inputs(rng, long), ids, long), ValueError, r"max_seq_len")
    (out,) = sess.run(None, good)  # and the session still works afterwards
    assert np.isfinite(out).all() and _lens(cache, ids)[0] == [n + c for n, c in zip(before[0], counts)]


def test_prefill_op_in_a_plain_session_gets_nan_and_a_warning(rng):
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    mo.make_session(mo.build_prefill_graph(NH, NH_K, D, "nobody", 0))  # registers the Python ops
    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    plain = ort.InferenceSession(mo.build_prefill_graph(NH, NH_K, D, "nobody", 0).SerializeToString(), so,
                                 providers=["CPUExecutionProvider"])
    counts = (1, 2)
    q, k, v = _chunk_inputs(rng, counts)
    with pytest.warns(RuntimeWarning, match=r"PagedPQPrefillAttention failed and returned NaN \(ValueError: .*'nobody'"):
        (out,) = plain.run(None, _prefill_feed(q, k, v, [0, 1], counts))
    assert out.shape == q.shape and np.isnan(out).all()


# --------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(nh=6, nh_k=4), ValueError, r"nh: expected a multiple of nh_k = 4"),
        (dict(nh=0), ValueError, r"nh: expected a positive integer, got 0"),
        (dict(layer=-1), ValueError, r"layer: expected a non-negative integer, got -1"),
        (dict(cache_name=""), ValueError, r"cache_name: expected a non-empty string"),
        (dict(dtype="bfloat16"), TypeError, r"dtype: expected one of \['float32', 'float16'\].*got 'bfloat16'"),
    ],
)
def test_build_decoder_graph_rejects(kwargs, exc, match):
    args = dict(nh=NH, nh_k=NH_K, d=D, cache_name="x", layer=0, dtype="float32") | kwargs
    with pytest.raises(exc, match=match):
        mo.build_decoder_graph(**args)


def test_build_decoder_graph_checks_a_registered_cache(rng, registry):
    registry("geom", _cache(_books(rng)))
    with pytest.raises(ValueError, match=r"expected nh_k = 2, d = 64, layer < 2 .* got nh_k = 2, d = 128, layer = 0"):
        mo.build_decoder_graph(NH, NH_K, 128, "geom", 0)
    with pytest.raises(ValueError, match=r"layer < 2 .* layer = 2"):
        mo.build_decoder_graph(NH, NH_K, D, "geom", 2)


def test_register_cache_rejects():
    with pytest.raises(TypeError, match=r"cache: expected a PagedPQCache, got dict"):
        mo.register_cache("x", {})
    with pytest.raises(TypeError, match=r"name: expected a non-empty string"):
        mo.register_cache("", None)
    with pytest.raises(KeyError, match=r"no cache registered under 'never-registered'"):
        mo.unregister_cache("never-registered")


def _lens(cache, ids):
    return [cache.seq_lens(layer, ids).tolist() for layer in range(cache.num_layers)]


def test_op_errors_raise_from_run_and_leave_the_cache_unchanged(rng, registry):
    cache = _cache(_books(rng))
    ids = _prefill([cache], rng)
    q, k, v = _step_inputs(rng)

    # A cache name nobody registered.
    sess = mo.make_session(mo.build_decoder_graph(NH, NH_K, D, "ghost", 0))
    with pytest.raises(ValueError, match=r"PagedPQAttention: no cache registered under 'ghost'"):
        sess.run(None, _feed(q, k, v, ids))

    # Graphs built before the cache was registered, with a geometry or layer the cache does not have.
    wrong_d = mo.make_session(mo.build_decoder_graph(NH, NH_K, 128, "errs", 0))
    wrong_layer = mo.make_session(mo.build_decoder_graph(NH, NH_K, D, "errs", 5))
    wrong_heads = mo.make_session(mo.build_decoder_graph(NH, 1, D, "errs", 0))
    odd_heads = mo.make_session(mo.build_decoder_graph(3, 1, D, "errs", 0))
    good = mo.make_session(mo.build_decoder_graph(NH, NH_K, D, "errs", 0))
    registry("errs", cache)
    before = _lens(cache, ids)
    B = len(ids)
    q128, kv128 = np.zeros((B, NH, 128), np.float32), np.zeros((B, NH_K, 128), np.float32)
    with pytest.raises(ValueError, match=r"q: expected head dim 64 \(the cache's\), got shape \(2, 4, 128\)"):
        wrong_d.run(None, _feed(q128, kv128, kv128, ids))
    with pytest.raises(IndexError, match=r"expected 0 <= layer < 2 \(the cache's layers\), got 5"):
        wrong_layer.run(None, _feed(q, k, v, ids))
    with pytest.raises(ValueError, match=r"k: expected shape \(2, 2, 64\), got \(2, 1, 64\)"):
        wrong_heads.run(None, _feed(q, k[:, :1], v[:, :1], ids))
    # The batch axis is symbolic in the graph, so ORT lets these through; the op catches them.
    with pytest.raises(ValueError, match=r"q: expected a number of heads that is a multiple of the cache's num_kv_heads = 2"):
        odd_heads.run(None, _feed(q[:, :3], k[:, :1], v[:, :1], ids))
    with pytest.raises(ValueError, match=r"seq_ids: expected 2 integer ids \(one per row of q\)"):
        good.run(None, _feed(q, k, v, ids[:1]))
    with pytest.raises(ValueError, match=r"k: expected shape \(2, 2, 64\), got \(1, 2, 64\)"):
        good.run(None, _feed(q, k[:1], v, ids))
    with pytest.raises(ValueError, match=r"seq_ids: expected distinct ids, got \[0, 0\]"):
        good.run(None, _feed(q, k, v, [ids[0], ids[0]]))
    with pytest.raises(ValueError, match=r"seq_ids: .*not live"):
        good.run(None, _feed(q, k, v, [ids[0], 3]))
    assert _lens(cache, ids) == before  # nothing was appended by the failed steps

    # ORT's own input checks still apply (a float64 feed for a float input).
    with pytest.raises(Exception, match=r"(?i)type|invalid"):
        good.run(None, _feed(q.astype(np.float64), k, v, ids))
    assert _lens(cache, ids) == before

    # And the session still works afterwards.
    (out,) = good.run(None, _feed(q, k, v, ids))
    assert np.isfinite(out).all()
    assert _lens(cache, ids)[0] == [n + 1 for n in before[0]]


def test_plain_inference_session_gets_nan_and_a_warning(rng, registry):
    """Without make_session's wrapper, a failing op must not abort the process: NaN out and a warning."""
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    mo.make_session(mo.build_decoder_graph(NH, NH_K, D, "nobody", 0))  # registers the Python op
    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    model = mo.build_decoder_graph(NH, NH_K, D, "nobody", 0).SerializeToString()
    plain = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    q, k, v = _step_inputs(rng)
    with pytest.warns(RuntimeWarning, match=r"PagedPQAttention failed and returned NaN \(ValueError: .*'nobody'"):
        (out,) = plain.run(None, _feed(q, k, v, [0, 1]))
    assert out.shape == q.shape and np.isnan(out).all()
    # A later checked run does not inherit that error.
    cache = _cache(_books(rng))
    ids = _prefill([cache], rng)
    registry("later", cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (out,) = mo.make_session(mo.build_decoder_graph(NH, NH_K, D, "later", 0)).run(None, _feed(q, k, v, ids))
    assert np.isfinite(out).all()


def test_make_session_inputs(tmp_path):
    """A ModelProto, its bytes or a file path; one SessionOptions may serve several sessions."""
    import onnx
    import onnxruntime as ort

    model = mo.build_decoder_graph(NH, NH_K, D, "x", 0)
    path = tmp_path / "decode.onnx"
    onnx.save(model, str(path))
    so = ort.SessionOptions()
    sessions = [mo.make_session(model, session_options=so), mo.make_session(model.SerializeToString(), session_options=so),
                mo.make_session(path), mo.make_session(str(path))]
    for sess in sessions:
        assert isinstance(sess, ort.InferenceSession)
        assert [i.name for i in sess.get_inputs()] == ["q", "k", "v", "seq_ids"]


def test_make_session_rejects_non_models():
    with pytest.raises(TypeError, match=r"graph: expected an onnx.ModelProto, model bytes or a path, got int"):
        mo.make_session(3)


def test_missing_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    with pytest.raises(ImportError, match=r"needs the onnx package: install the ort extra: pip install 'million-cupy\[ort\]'"):
        mo.build_decoder_graph(NH, NH_K, D, "x", 0)


def test_import_is_lazy():
    code = (
        "import sys, million_cupy.ort; "
        "bad = [m for m in ('onnx', 'onnxruntime', 'onnxruntime_extensions', 'cupy') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_gpu_cache_decode_steps_match_wrapper(rng, registry):
    """The op on a GPU cache (native kernels, host <-> device copies) equals BatchDecodeWrapper on a twin cache."""
    books = _books(rng)
    via_ort, direct = _cache(books, "cuda"), _cache(books, "cuda")
    ids = _prefill([via_ort, direct], rng)
    registry("ort-gpu", via_ort)
    sessions = [mo.make_session(mo.build_decoder_graph(NH, NH_K, D, "ort-gpu", layer)) for layer in range(L)]
    wrapper = mc.BatchDecodeWrapper(direct, NH)
    for _ in range(STEPS):
        wrapper.plan(ids, new_tokens=1)
        # Layers in reverse order: the op plans on whichever layer of a step it sees first.
        for layer in reversed(range(L)):
            q, k, v = _step_inputs(rng)
            (got,) = sessions[layer].run(None, _feed(q, k, v, ids))
            direct.append(layer, ids, k, v)
            want = wrapper.run(layer, q.astype(np.float16)).astype(np.float32).get()
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)
            kv = [via_ort.dequantize(layer, s) for s in ids]
            ref, _ = reference.decode_attention(q.astype(np.float64), [a for a, _ in kv], [b for _, b in kv])
            rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
            assert rel < 5e-3, rel  # fp16 cache, fp16 q and output (tests/test_decode_gpu.py: 2e-3 for the kernel)
    assert via_ort.stats()["flushes"] > 0
    # Skipping a layer in a step is reported, not silently mis-planned.
    q, k, v = _step_inputs(rng)
    sessions[0].run(None, _feed(q, k, v, ids))
    with pytest.raises(ValueError, match=r"every layer must be appended once per decode step"):
        sessions[0].run(None, _feed(q, k, v, ids))


@pytest.mark.gpu
def test_gpu_cache_prefill_calls_match_the_library(rng, registry):
    """The prefill op on a GPU cache (native kernels through prefill_attention) equals the library on a twin cache
    and the float64 causal reference, over chunks that flush pages and a sequence with no new tokens."""
    cp = pytest.importorskip("cupy")
    books = _books(rng)
    via_ort, direct = _cache(books, "cuda"), _cache(books, "cuda")
    ids = [via_ort.add_sequence() for _ in CHUNKS[0]]
    assert ids == [direct.add_sequence() for _ in CHUNKS[0]]
    registry("prefill-gpu", via_ort)
    sessions = [mo.make_session(mo.build_prefill_graph(NH, NH_K, D, "prefill-gpu", layer)) for layer in range(L)]
    for counts in CHUNKS:
        ind = np.concatenate([[0], np.cumsum(counts)])
        for layer in reversed(range(L)):
            q, k, v = _chunk_inputs(rng, counts)
            (got,) = sessions[layer].run(None, _prefill_feed(q, k, v, ids, counts))
            direct.append(layer, ids, k, v, lengths=list(counts))
            want = mc.prefill_attention(direct, layer, ids, cp.asarray(q.astype(np.float16)), ind)
            np.testing.assert_allclose(got, want.astype(cp.float32).get(), rtol=0, atol=2e-3)
            kv = [via_ort.dequantize(layer, s) for s in ids]
            ref, _ = reference.causal_attention(q.astype(np.float64), [cp.asnumpy(a) for a, _ in kv],
                                                [cp.asnumpy(b) for _, b in kv], ind)
            rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
            assert rel < 5e-3, rel  # fp16 cache, q and output
    np.testing.assert_array_equal(via_ort.seq_lens(0, ids), np.sum(CHUNKS, axis=0))
    assert via_ort.stats()["flushes"] > 0
