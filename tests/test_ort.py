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
