"""BatchPrefillWrapper on the GPU against the float64 causal reference over the cache's own contents.

Every regime: the LUT path (few new tokens per sequence), verify_attention (a few rows on tensor cores) and
prefill_attention (a longer chunk in the batch), with ragged query counts, chunks that cross a flush boundary in
the same call, a first prompt (no history), split long histories, GQA 1 / 4 / 8, M 16 / 32 / 64, pages of 16 / 32
/ 64, float16 and bfloat16, outputs poisoned before the kernels run; a configuration without the tensor-core path
is counted and warned; a verification loop replays one captured run, and chunks refuse a capturing stream; a whole
verification step, appends included, replays from one CUDA graph.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from million_cupy import BatchPrefillWrapper, prefill_attention, reference
from million_cupy.errors import MillionError, UnsupportedConfiguration
from million_cupy.prefill import DENSE_ROWS_MIN
from million_cupy.interop import to_numpy
from test_step_gpu import TOL, _caches, _check_attention, _device_array, _poison, _prefill, _tokens

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("gqa", [1, 4, 8])
def test_prefill_matches_the_causal_reference(rng, dtype, gqa):
    import cupy as cp

    (cache,) = _caches(rng, devices=("cuda",), dtype=dtype)  # 2 layers, 2 kv heads, d 128, page 16, window 32
    # The LUT path (forced: 8 and 6 are above LUT_QUERIES_MAX); 33 + 1 and 70 + 8 cross flushes.
    seqs, ind, nh, wrapper = _planned(rng, cache, history=[70, 0, 33, 5], counts=[8, 6, 1, 3], gqa=gqa, backend="lut")
    for layer in range(cache.num_layers):
        with pytest.raises(MillionError, match="append the new tokens"):
            wrapper.run(layer, cp.zeros((int(ind[-1]), nh, 128), dtype=cache.array_dtype))
        _check_layer_and_one_call(rng, cache, wrapper, layer, seqs, ind, nh, dtype)
    stats = wrapper.stats()
    assert stats["long_chunk_queries"] == 0 and stats["tensor_core_plans"] == 0 and stats["runs"] == cache.num_layers


def _planned(rng, cache, *, history, counts, gqa, backend="auto", scale=None):
    """Sequences holding ``history`` tokens (0: a first prompt), a wrapper planned for ``counts`` new tokens each."""
    seqs = [cache.add_sequence() for _ in history]
    _prefill(rng, (cache,), [s for s, n in zip(seqs, history) if n], [n for n in history if n])
    nh = gqa * cache.num_kv_heads
    ind = np.concatenate([[0], np.cumsum(counts)])
    wrapper = BatchPrefillWrapper(cache, nh, backend=backend, scale=scale)
    wrapper.plan(seqs, ind)
    return seqs, ind, nh, wrapper


def _check_layer_and_one_call(rng, cache, wrapper, layer, seqs, ind, nh, dtype):
    """_check_layer, then prefill_attention (the one-call form) over the same layer."""
    q, ref_o = _check_layer(rng, cache, wrapper, layer, seqs, ind, nh, dtype)
    one_call = prefill_attention(cache, layer, seqs, q, ind)
    assert reference.relative_error(to_numpy(one_call).astype(np.float64), ref_o) <= TOL[dtype]


def _check_layer(rng, cache, wrapper, layer, seqs, ind, nh, dtype, scale=None):
    """Append the planned new tokens to ``layer``, run, and compare with the float64 reference (out and lse)."""
    import cupy as cp

    counts = np.diff(ind).tolist()
    k, v = _tokens(rng, ind[-1], cache), _tokens(rng, ind[-1], cache)
    cache.append(layer, seqs, _device_array(k).astype(cache.array_dtype), _device_array(v).astype(cache.array_dtype),
                 lengths=counts)
    d = cache.head_dim
    q = cp.asarray(rng.standard_normal((int(ind[-1]), nh, d)).astype(np.float32)).astype(cache.array_dtype)
    out = _poison((int(ind[-1]), nh, d), dtype)
    lse = cp.full((int(ind[-1]), nh), cp.nan, dtype=cp.float32)
    wrapper.run(layer, q, out=out, lse=lse)
    ks, vs = zip(*(cache.dequantize(layer, s) for s in seqs))
    ref_o, ref_lse = reference.causal_attention(to_numpy(q).astype(np.float64), list(ks), list(vs), ind, scale=scale)
    o = to_numpy(out).astype(np.float64)
    assert np.isfinite(o).all()
    assert reference.relative_error(o, ref_o) <= TOL[dtype]
    assert np.max(np.abs(to_numpy(lse) - ref_lse)) < 2e-2
    return q, ref_o


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("M, P", [(64, 16), (32, 64), (16, 32)])
@pytest.mark.parametrize("backend", ["auto", "tensor_cores"])
def test_tensor_core_prefill_matches_the_causal_reference(rng, dtype, gqa, M, P, backend):
    """Long chunks (the tensor-core path: dense under the auto rule from DENSE_ROWS_MIN rows, else
    prefill_attention, which "tensor_cores" forces) beside short ones in one batch: a first prompt, chunks crossing
    flushes in the same call, one row tile and many, empty history; exact window R = 2P."""
    (cache,) = _caches(rng, devices=("cuda",), dtype=dtype, M=M, P=P, R=2 * P, max_pages=1024)
    seqs, ind, nh, wrapper = _planned(rng, cache, history=[300, 0, 129, 5, 64], counts=[200, 150, 17, 1, 64], gqa=gqa,
                                      backend=backend)
    assert wrapper.regime == ("dense" if backend == "auto" and 200 * gqa >= DENSE_ROWS_MIN else "tensor_cores")
    for layer in range(cache.num_layers):
        _check_layer_and_one_call(rng, cache, wrapper, layer, seqs, ind, nh, dtype)
    stats = wrapper.stats()
    assert stats["tensor_core_plans"] == 1 and stats["long_chunk_queries"] == 0
    # the sequence with one new token rode along (counted under the auto rule only)
    assert stats["short_queries_on_tensor_cores"] == (1 if backend == "auto" else 0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d, M, P", [(128, 64, 64), (128, 32, 16), (128, 16, 32), (64, 32, 32), (64, 16, 16)])
@pytest.mark.parametrize("gqa", [1, 4, 8])
def test_dense_prefill_matches_the_causal_reference(rng, dtype, d, M, P, gqa):
    """The dense regime (dequantize_history into the workspace, then dense_prefill_attention): long and short
    chunks, a first prompt, chunks crossing flushes in the same call, one new token, a history long enough to
    be split across CTAs and merged, two kv heads with a codebook each, rows past a sequence's count; the
    workspace is reused by a second, smaller plan."""
    (cache,) = _caches(rng, devices=("cuda",), dtype=dtype, d=d, M=M, P=P, R=2 * P, heads=2, max_pages=4096)
    seqs, ind, nh, wrapper = _planned(rng, cache, history=[300, 0, 129, 5, 2600], counts=[200, 150, 17, 1, 70],
                                      gqa=gqa, backend="dense")
    assert wrapper.regime == "dense" and wrapper.on_tensor_cores
    for layer in range(cache.num_layers):
        _check_layer(rng, cache, wrapper, layer, seqs, ind, nh, dtype)
    held = wrapper.workspace_bytes
    assert held >= 2 * cache.num_kv_heads * sum(cache.lengths[0, s] for s in seqs) * d * 2
    ind = np.array([0, 40, 41])
    wrapper.plan(seqs[:2], ind)
    for layer in range(cache.num_layers):
        _check_layer(rng, cache, wrapper, layer, seqs[:2], ind, nh, dtype)
    assert wrapper.workspace_bytes == held  # grown only
    assert wrapper.stats()["dense_plans"] == 2


def test_a_dense_plan_without_room_for_its_workspace_keeps_the_last_plan(rng, monkeypatch):
    import cupy as cp

    (cache,) = _caches(rng, devices=("cuda",), max_pages=1024)
    seqs, ind, nh, wrapper = _planned(rng, cache, history=[100, 40], counts=[130, 9], gqa=4)
    assert wrapper.regime == "dense"
    _check_layer(rng, cache, wrapper, 0, seqs, ind, nh, "float16")

    def no_room(*args, **kwargs):
        raise cp.cuda.memory.OutOfMemoryError(1 << 40, 1 << 30)

    monkeypatch.setattr(cp, "empty", no_room)
    with pytest.raises(MillionError, match="workspace of .* MiB .* backend='tensor_cores'"):
        wrapper.plan(seqs, [0, 700, 709], layers=[1])  # a larger workspace than the one held
    monkeypatch.undo()
    assert wrapper.regime == "dense" and wrapper.stats()["plans"] == 1
    _check_layer(rng, cache, wrapper, 1, seqs, ind, nh, "float16")  # the first plan still runs


@pytest.mark.parametrize("backend", ["lut", "tensor_cores"])
def test_a_plan_without_room_for_its_metadata_reserves_no_page(rng, monkeypatch, backend):
    """A plan that needs larger device buffers than it holds (more query tokens; new work-list buffers) on a
    device without room raises before it reserves the new tokens' pages: the pool and the lengths are as they
    were, and the last plan still runs."""
    import cupy as cp

    from million_cupy import prefill

    (cache,) = _caches(rng, devices=("cuda",), max_pages=1024)
    seqs, ind, nh, wrapper = _planned(rng, cache, history=[100, 40], counts=[3, 2], gqa=4, backend=backend)
    _check_layer(rng, cache, wrapper, 0, seqs, ind, nh, "float16")
    before, lengths = cache.stats(), cache.lengths.copy()

    def no_room(*args, **kwargs):
        raise cp.cuda.memory.OutOfMemoryError(1 << 40, 1 << 30)

    monkeypatch.setattr(cp, "zeros", no_room)
    monkeypatch.setattr(cp, "empty", no_room)
    if backend == "lut":  # 80 query tokens outgrow the plan for 5
        expected: type[Exception] = cp.cuda.memory.OutOfMemoryError
    else:  # any plan needing new work-list buffers
        monkeypatch.setattr(prefill.WorkListBuffers, "fits", lambda self, *sizes: False)
        expected = MillionError
    with pytest.raises(expected):
        wrapper.plan(seqs, [0, 40, 80], layers=[1])
    monkeypatch.undo()
    assert cache.stats()["used"] == before["used"] and cache.stats()["allocs"] == before["allocs"]
    np.testing.assert_array_equal(cache.lengths, lengths)
    assert wrapper.stats()["plans"] == 1
    _check_layer(rng, cache, wrapper, 1, seqs, ind, nh, "float16")  # the first plan still runs


_SPIN = r"""extern "C" __global__ void spin(long long cycles) {
  const long long t0 = clock64();
  while (clock64() - t0 < cycles) {}
}"""


@pytest.mark.parametrize("launcher", ["prefill", "decode"])
def test_a_first_run_reads_codebooks_finished_when_the_cache_was_built(rng, launcher):
    """A launcher's first run on its own stream while CuPy's current stream is still busy (a kernel spinning for
    ~0.1 s): the kernels read the codebooks the cache made and waited for when it was built, so the output
    matches the reference. (Converted at the first run on the current stream, they would still be unwritten.)"""
    import cupy as cp

    from million_cupy import BatchDecodeWrapper

    stream, busy = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
    (cache,) = _caches(rng, devices=("cuda",), stream=stream, max_pages=1024)
    seqs = [cache.add_sequence() for _ in range(2)]
    _prefill(rng, (cache,), seqs, [300, 77])
    nh, d = 4 * cache.num_kv_heads, cache.head_dim
    counts = [4, 3] if launcher == "prefill" else [1, 1]
    ind = np.concatenate([[0], np.cumsum(counts)])
    if launcher == "prefill":
        wrapper = BatchPrefillWrapper(cache, nh, backend="tensor_cores", stream=stream)
        wrapper.plan(seqs, ind)
        k, v = (_device_array(_tokens(rng, ind[-1], cache)).astype(cache.array_dtype) for _ in range(2))
        cp.cuda.Device().synchronize()  # made on the current stream, appended on the cache's
        cache.append(0, seqs, k, v, lengths=counts)
    else:
        wrapper = BatchDecodeWrapper(cache, num_heads=nh, stream=stream)
        wrapper.plan(seqs, new_tokens=0)
    q = cp.asarray(rng.standard_normal((int(ind[-1]), nh, d)).astype(np.float16))
    out = _poison((int(ind[-1]), nh, d), "float16")
    cp.cuda.Device().synchronize()
    spin = cp.RawKernel(_SPIN, "spin")
    with busy:
        spin((1,), (1,), (np.int64(200_000_000),))
        wrapper.run(0, q, out=out)
    stream.synchronize()
    busy.synchronize()
    if launcher == "decode":
        _check_attention(cache, 0, seqs, q, out, None, "float16")
        return
    ks, vs = zip(*(cache.dequantize(0, s) for s in seqs))
    ref_o, _ = reference.causal_attention(to_numpy(q).astype(np.float64), list(ks), list(vs), ind)
    o = to_numpy(out).astype(np.float64)
    assert np.isfinite(o).all() and reference.relative_error(o, ref_o) <= TOL["float16"]


def test_a_gpu_cache_is_built_while_another_stream_captures_a_graph(rng):
    """Building a GPU cache waits for CuPy's current stream and its own, not for the whole device: a capture on
    another stream (begun before the build, ended after it) stays valid and replays, and the cache built meanwhile
    attends like the reference. (A device synchronize in the constructor invalidated such a capture.)"""
    import cupy as cp

    from million_cupy import BatchDecodeWrapper

    capturing, work = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
    counter = cp.zeros(8, dtype=cp.float32)
    cp.cuda.Device().synchronize()
    with capturing:
        capturing.begin_capture()
        counter += 1
    try:
        with work:
            (cache,) = _caches(rng, devices=("cuda",), stream=work, max_pages=256)
    finally:
        with capturing:
            graph = capturing.end_capture()
    graph.launch(stream=capturing)
    capturing.synchronize()
    np.testing.assert_array_equal(to_numpy(counter), np.ones(8, dtype=np.float32))
    seqs = [cache.add_sequence() for _ in range(2)]
    _prefill(rng, (cache,), seqs, [300, 77])
    wrapper = BatchDecodeWrapper(cache, num_heads=4 * cache.num_kv_heads, stream=work)
    wrapper.plan(seqs, new_tokens=0)
    q = cp.asarray(rng.standard_normal((2, wrapper.num_heads, cache.head_dim)).astype(np.float16))
    out = _poison(q.shape, "float16")
    cp.cuda.Device().synchronize()  # q and the poison were made on the legacy stream; the capture has ended
    with work:
        wrapper.run(0, q, out=out)
    work.synchronize()
    _check_attention(cache, 0, seqs, q, out, None, "float16")


def test_the_auto_rule_takes_the_dense_regime_for_many_rows(rng):
    (cache,) = _caches(rng, devices=("cuda",), max_pages=1024)
    gqa = 4
    big = DENSE_ROWS_MIN // gqa
    seqs, ind, nh, wrapper = _planned(rng, cache, history=[100, 0], counts=[big, 3], gqa=gqa)
    assert wrapper.regime == "dense"
    for layer in range(cache.num_layers):
        _check_layer(rng, cache, wrapper, layer, seqs, ind, nh, "float16")
    wrapper.plan(seqs, [0, big - 1, big + 2])
    assert wrapper.regime == "tensor_cores" and wrapper.stats()["dense_plans"] == 1


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("counts", [[1, 4, 2, 3], [8, 5, 1, 7], [16, 3, 9, 1]])
def test_few_rows_on_tensor_cores_match_the_causal_reference(rng, dtype, gqa, counts):
    """Speculative-verification shapes forced onto the tensor-core path: 1, 2, 4 or 8 row tiles per CTA (the
    warps split each token tile among themselves and merge their states), rows past a sequence's count, a long
    history split across CTAs, a first prompt, chunks crossing a flush."""
    from million_cupy.prefill import tensor_core_row_tiles

    (cache,) = _caches(rng, devices=("cuda",), dtype=dtype, max_pages=1024)
    seqs = [cache.add_sequence() for _ in range(4)]
    _prefill(rng, (cache,), [seqs[0], seqs[2], seqs[3]], [2500, 31, 300])
    nh = gqa * cache.num_kv_heads
    ind = np.concatenate([[0], np.cumsum(counts)])
    wrapper = BatchPrefillWrapper(cache, nh, backend="tensor_cores")
    wrapper.plan(seqs, ind)
    assert wrapper.on_tensor_cores
    rows, rt = max(counts) * gqa, tensor_core_row_tiles(max(counts) * gqa)
    assert 16 * rt >= rows and (rt == 1 or 8 * rt < rows)  # the fewest row tiles that hold the rows
    for layer in range(cache.num_layers):
        _check_layer(rng, cache, wrapper, layer, seqs, ind, nh, dtype)
    assert wrapper.stats()["short_queries_on_tensor_cores"] == 0  # forced: not a slow path

@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d, M, P", [(128, 64, 64), (128, 32, 16), (64, 32, 32), (64, 16, 16)])
@pytest.mark.parametrize("gqa, counts", [(1, [3, 16, 1, 9]), (4, [4, 2, 1, 3]), (4, [8, 2, 1, 5]), (8, [4, 1, 2, 3])])
def test_fragment_gathers_match_the_causal_reference(rng, dtype, d, M, P, gqa, counts):
    """verify_attention (at most 32 query rows per kv head, 2 or 4 dims per subspace, one or two row tiles):
    a codebook per kv head, a history split across CTAs, every in-page K-row permutation, steps in the ring,
    a first prompt, chunks crossing a flush in the same call, rows past a sequence's count."""
    from million_cupy.prefill import gathers_fragments, tensor_core_row_tiles

    (cache,) = _caches(rng, devices=("cuda",), dtype=dtype, d=d, M=M, P=P, R=2 * P, heads=2, max_pages=2048)
    seqs = [cache.add_sequence() for _ in range(4)]
    _prefill(rng, (cache,), [seqs[0], seqs[2], seqs[3]], [3001, 2 * P - 1, 300])
    nh = gqa * cache.num_kv_heads
    ind = np.concatenate([[0], np.cumsum(counts)])
    assert gathers_fragments(d, M, tensor_core_row_tiles(max(counts) * gqa))
    wrapper = BatchPrefillWrapper(cache, nh, backend="tensor_cores")
    wrapper.plan(seqs, ind)
    for layer in range(cache.num_layers):
        _check_layer(rng, cache, wrapper, layer, seqs, ind, nh, dtype)


@pytest.mark.parametrize("wgmma", ["1", "0"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("P", [16, 64, 128])
@pytest.mark.parametrize("gqa, counts, scale", [(4, [8, 2, 1, 5], None), (8, [4, 1, 2, 3], None),
                                                (4, [6, 8, 7, 5], 0.3)])
def test_verify_attention_on_warpgroup_mma_matches_the_causal_reference(rng, monkeypatch, wgmma, dtype, P, gqa,
                                                                        counts, scale):
    """verify_attention's warpgroup-MMA form (two row tiles at d 128, M 32, pages of 64 tokens or more on compute
    capability 9.0; built for sm_90a) and, with MILLION_CUPY_WGMMA=0 or 16-token pages, verify_attention itself
    over the same kind of batch: long histories
    split across CTAs (64-token steps spread over three warpgroups), every in-page K-row permutation, ring steps, a
    first prompt, chunks crossing a flush, rows past a sequence's count, and a scale of 0.3 whose scores move the
    rows' maxima often (the warpgroup's shared maxima and their rescale)."""
    from million_cupy import kernels
    from million_cupy.decode import device_compute_capability

    monkeypatch.setenv("MILLION_CUPY_WGMMA", wgmma)
    (cache,) = _caches(rng, devices=("cuda",), dtype=dtype, d=128, M=32, P=P, R=2 * P, heads=2, max_pages=4096)
    seqs = [cache.add_sequence() for _ in range(4)]
    _prefill(rng, (cache,), [seqs[0], seqs[2], seqs[3]], [4000, 2 * P - 1, 300])
    nh = gqa * cache.num_kv_heads
    ind = np.concatenate([[0], np.cumsum(counts)])
    wrapper = BatchPrefillWrapper(cache, nh, backend="tensor_cores", scale=scale)
    wrapper.plan(seqs, ind)
    for layer in range(cache.num_layers):
        _check_layer(rng, cache, wrapper, layer, seqs, ind, nh, dtype, scale=scale)
    built = {c["variant"].split(":")[1] for c in kernels.compiled() if c["variant"].startswith("sm_90a:")}
    suffix = "bf16" if dtype == "bfloat16" else "f16"
    if wgmma == "1" and P >= 64 and device_compute_capability() == 90:
        assert f"verify_attention_wgmma_{suffix}" in built


@pytest.mark.parametrize("backend, counts", [("lut", [3, 1, 2]), ("tensor_cores", [4, 2, 1]),
                                             ("tensor_cores", [40, 3, 9]), ("dense", [40, 3, 9])])
def test_a_softmax_scale_other_than_the_default_reaches_every_regime(rng, backend, counts):
    """The kernels take the row maxima of the raw scores and fold the scale into the exponent: a scale of 0.3
    (2.4 x the default at d = 128) on the LUT path, verify_attention, prefill_attention and the dense regime,
    over histories whose paged steps skip the mask and a sequence whose chunk crosses a flush."""
    (cache,) = _caches(rng, devices=("cuda",), dtype="float16", max_pages=256)
    seqs, ind, nh, wrapper = _planned(rng, cache, history=[1500, 31, 0], counts=counts, gqa=4, backend=backend,
                                      scale=0.3)
    for layer in range(cache.num_layers):
        _check_layer(rng, cache, wrapper, layer, seqs, ind, nh, "float16", scale=0.3)
    assert wrapper.stats()["tensor_core_plans"] == (backend != "lut")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tensor_core_prefill_splits_a_long_history(rng, dtype):
    """A short chunk over a long history leaves SMs idle: each unit is split and the splits merged."""
    (cache,) = _caches(rng, devices=("cuda",), dtype=dtype, P=64, R=128, max_pages=256)
    seqs = [cache.add_sequence() for _ in range(2)]
    _prefill(rng, (cache,), seqs, [3000, 2100])
    ind = np.array([0, 20, 53])
    nh = 4 * cache.num_kv_heads
    wrapper = BatchPrefillWrapper(cache, nh)
    wrapper.plan(seqs, ind)
    for layer in range(cache.num_layers):
        _check_layer(rng, cache, wrapper, layer, seqs, ind, nh, dtype)


def test_long_chunks_without_a_tensor_core_path_are_counted_and_warned(rng):
    (cache,) = _caches(rng, devices=("cuda",), dtype="float32")
    seqs = [cache.add_sequence() for _ in range(2)]
    _prefill(rng, (cache,), seqs, [40, 3])
    ind = np.array([0, 30, 31])
    wrapper = BatchPrefillWrapper(cache, 4)
    with pytest.warns(RuntimeWarning, match="no tensor-core path"):
        wrapper.plan(seqs, ind)
    _check_layer(rng, cache, wrapper, 0, seqs, ind, 4, "float32")
    assert wrapper.stats()["long_chunk_queries"] == 30 and wrapper.stats()["tensor_core_plans"] == 0


def test_a_forced_backend_is_checked_and_taken(rng):
    (cache,) = _caches(rng, devices=("cuda",), dtype="float32")
    with pytest.raises(ValueError, match="backend: expected one of"):
        BatchPrefillWrapper(cache, 4, backend="flash")
    with pytest.raises(UnsupportedConfiguration, match="no tensor-core path for head_dim 128, M 64, float32"):
        BatchPrefillWrapper(cache, 4, backend="tensor_cores")
    (cache,) = _caches(rng, devices=("cuda",), dtype="float16")
    seqs = [cache.add_sequence() for _ in range(2)]
    _prefill(rng, (cache,), seqs, [40, 3])
    ind = np.array([0, 30, 31])
    wrapper = BatchPrefillWrapper(cache, 4, backend="lut")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a chosen regime is not a slow path: no warning
        wrapper.plan(seqs, ind)
    assert not wrapper.on_tensor_cores
    _check_layer(rng, cache, wrapper, 0, seqs, ind, 4, "float16")
    assert wrapper.stats()["long_chunk_queries"] == 0 and wrapper.stats()["tensor_core_plans"] == 0


def test_the_auto_rule_takes_tensor_cores_above_lut_queries_max(rng):
    from million_cupy.prefill import LUT_QUERIES_MAX

    (cache,) = _caches(rng, devices=("cuda",), dtype="float16")
    seqs = [cache.add_sequence() for _ in range(2)]
    _prefill(rng, (cache,), seqs, [100, 40])
    wrapper = BatchPrefillWrapper(cache, 16)  # GQA 8: L new tokens make more rows than verify_attention takes
    wrapper.plan(seqs, [0, LUT_QUERIES_MAX, 2 * LUT_QUERIES_MAX + 1], appended=True)  # counts L and L + 1
    assert wrapper.on_tensor_cores
    wrapper.plan(seqs, [0, LUT_QUERIES_MAX, 2 * LUT_QUERIES_MAX], appended=True)
    assert not wrapper.on_tensor_cores


def test_the_auto_rule_takes_verify_attention_for_a_few_drafts_in_one_row_tile(rng):
    """FRAGMENT_QUERIES_MIN or more new tokens whose rows fit one row tile take verify_attention; fewer, or more
    rows than two row tiles hold, stay on the LUT path."""
    from million_cupy.prefill import FRAGMENT_QUERIES_MIN, LUT_QUERIES_MAX

    (cache,) = _caches(rng, devices=("cuda",), dtype="float16")  # 2 kv heads
    seqs = [cache.add_sequence() for _ in range(2)]
    _prefill(rng, (cache,), seqs, [100, 40])
    gqa4 = BatchPrefillWrapper(cache, 8)
    few = FRAGMENT_QUERIES_MIN - 1
    gqa4.plan(seqs, [0, few, 2 * few], appended=True)
    assert not gqa4.on_tensor_cores
    drafts = [0, FRAGMENT_QUERIES_MIN, 2 * FRAGMENT_QUERIES_MIN + 1]  # 3 and 4 new tokens
    gqa4.plan(seqs, drafts, appended=True)  # 4 x 4 = 16 rows
    assert gqa4.on_tensor_cores
    gqa8 = BatchPrefillWrapper(cache, 16)
    gqa8.plan(seqs, [0, LUT_QUERIES_MAX, 2 * LUT_QUERIES_MAX], appended=True)  # 8 x 5 = 40 rows: three row tiles
    assert not gqa8.on_tensor_cores


@pytest.mark.parametrize("gqa, drafts, backend, pair_min, regime", [
    (4, 4, "auto", None, "tensor_cores"), (8, 4, "auto", None, "tensor_cores"), (4, 2, "lut", None, "lut"),
    (4, 2, "auto", 1000, "lut"),  # the pair rule would switch to tensor cores as the histories pass 1000 tokens
])
def test_a_verification_loop_replays_one_captured_run_as_the_sequences_grow(rng, monkeypatch, gqa, drafts, backend,
                                                                           pair_min, regime):
    """Plan, append, replay: a run captured once (verify_attention with one and two row tiles, or the LUT path)
    replays every later plan of the same new-token counts. Between steps the sequences grow past TC_MIN_CHUNK, so
    plans captured without splits later split (the captured grid holds them) and the LUT path re-schedules; plans
    keep the captured regime where the rule's history threshold would change it; each replay matches the float64
    reference (outputs poisoned). A plan of other counts leaves the graph its buffers (counted, warned once) and
    runs right; a chunk refuses a capturing stream."""
    import cupy as cp

    from million_cupy import prefill

    if pair_min is not None:
        monkeypatch.setattr(prefill, "FRAGMENT_PAIR_TOKENS_MIN", pair_min)

    stream = cp.cuda.Stream(non_blocking=True)
    (cache,) = _caches(rng, devices=("cuda",), max_pages=2048, stream=stream)  # 2 kv heads, pages of 16, ring 32
    seqs = [cache.add_sequence() for _ in range(3)]
    _prefill(rng, (cache,), seqs, [700, 40, 300])  # no splits while every history is below TC_MIN_CHUNK
    nh = gqa * cache.num_kv_heads
    ind = np.arange(4) * drafts
    N, d = int(ind[-1]), cache.head_dim
    wrapper = BatchPrefillWrapper(cache, nh, backend=backend, stream=stream)
    q = cp.empty((N, nh, d), dtype=cp.float16)
    out = cp.empty_like(q)
    graph = None
    for step in range(4):
        with stream:  # every copy and launch of the step on the cache's stream
            if step == 2:  # accepted tokens and a long prompt: 2700 and 1300 tokens, split into several items
                _prefill(rng, (cache,), seqs, [2000, 1200, 16])
            wrapper.plan(seqs, ind, layers=[0])
            assert wrapper.regime == regime
            k, v = _tokens(rng, N, cache), _tokens(rng, N, cache)
            cache.append(0, seqs, _device_array(k), _device_array(v), lengths=[drafts] * 3)
            q[...] = cp.asarray(rng.standard_normal((N, nh, d)).astype(np.float16))
            out.fill(cp.nan)
            if graph is None:
                wrapper.run(0, q, out=out)  # compiles outside the capture; out is poisoned again below
                out.fill(cp.nan)
                stream.begin_capture()
                wrapper.run(0, q, out=out)
                graph = stream.end_capture()
            graph.launch(stream)  # step 0 too: capture does not run the kernels
        stream.synchronize()
        ks, vs = zip(*(cache.dequantize(0, s) for s in seqs))
        ref_o, _ = reference.causal_attention(to_numpy(q).astype(np.float64), list(ks), list(vs), ind)
        assert reference.relative_error(to_numpy(out).astype(np.float64), ref_o) <= TOL["float16"], step
    assert wrapper.stats()["stale_graph_plans"] == 0
    if pair_min is not None:  # without a captured run, the rule takes tensor cores for these histories now
        fresh = BatchPrefillWrapper(cache, nh, stream=stream)
        fresh.plan(seqs, ind, appended=True, layers=[0])
        assert fresh.regime == "tensor_cores"

    other = np.array([0, drafts, 2 * drafts - 1, 3 * drafts - 1])
    with stream:
        with pytest.warns(RuntimeWarning, match="captured in a CUDA graph for other new-token counts"):
            wrapper.plan(seqs, other, layers=[0])
        assert wrapper.stats()["stale_graph_plans"] == 1
        graph.launch(stream)  # replays its own plan on its own buffers
        _check_layer(rng, cache, wrapper, 0, seqs, other, nh, "float16")  # the new plan, on new buffers

        chunk = BatchPrefillWrapper(cache, nh, stream=stream)
        chunk.plan(seqs, [0, 16, 17, 18], appended=True, layers=[0])  # 16 new tokens: more than 32 rows
        q16 = cp.zeros((18, nh, d), dtype=cp.float16)
        out16 = cp.empty_like(q16)
        stream.begin_capture()
        try:
            with pytest.raises(MillionError, match="cannot be captured in a CUDA graph.*backend='lut'"):
                chunk.run(0, q16, out=out16)
        finally:
            stream.end_capture()
    stream.synchronize()


@pytest.mark.parametrize("gqa, counts", [(4, [5, 4, 5]), (8, [3, 4, 3])])
def test_the_auto_rule_takes_verify_attention_for_drafts_in_two_row_tiles(rng, gqa, counts):
    """17 to 32 rows per kv head averaging FRAGMENT_QUERIES_MIN_TWO_TILES new tokens take verify_attention (two row
    tiles) under the auto rule, and match the float64 reference; a batch below that average keeps the LUT path."""
    from million_cupy.prefill import FRAGMENT_QUERIES_MIN_TWO_TILES

    assert sum(counts) >= FRAGMENT_QUERIES_MIN_TWO_TILES * len(counts) and 16 < max(counts) * gqa <= 32
    (cache,) = _caches(rng, devices=("cuda",), dtype="float16")
    seqs, ind, nh, wrapper = _planned(rng, cache, history=[300, 0, 70], counts=counts, gqa=gqa)
    assert wrapper.regime == "tensor_cores"
    for layer in range(cache.num_layers):
        _check_layer_and_one_call(rng, cache, wrapper, layer, seqs, ind, nh, "float16")
    below = [max(counts)] + [1] * (len(counts) - 1)
    wrapper.plan(seqs, np.concatenate([[0], np.cumsum(below)]), appended=True)
    assert wrapper.regime == "lut"


@pytest.mark.parametrize("limit,want", [(166912, "dense"), (101376, "lut")])  # an A100's, an sm_89's bytes
def test_a_regime_that_does_not_fit_the_devices_shared_memory_takes_one_that_does(rng, monkeypatch, limit, want):
    """A 16-token chunk at GQA 4 (64 rows) takes prefill_attention on an H200 (~200 KB of shared memory at
    head_dim 128). On a device allowing less, "auto" takes the dense regime where it fits and the LUT path where
    nothing does, counted and warned once, with the reference's result; an explicit backend raises at plan()."""
    from million_cupy import prefill

    monkeypatch.setattr(prefill, "device_smem_limit", lambda: limit)
    (cache,) = _caches(rng, devices=("cuda",), max_pages=1024)
    seqs = [cache.add_sequence() for _ in range(2)]
    _prefill(rng, (cache,), seqs, [100, 40])
    ind = np.array([0, 16, 19])
    wrapper = BatchPrefillWrapper(cache, 8)
    with pytest.warns(RuntimeWarning, match=f"need 200704 bytes of shared memory per block; this device allows {limit}"):
        wrapper.plan(seqs, ind)
    assert wrapper.regime == want
    assert wrapper.stats()["shared_memory_fallbacks"] == 1
    assert wrapper.stats()["long_chunk_queries"] == (16 if want == "lut" else 0)
    _check_layer(rng, cache, wrapper, 0, seqs, ind, 8, "float16")
    forced = BatchPrefillWrapper(cache, 8, backend="tensor_cores")
    with pytest.raises(UnsupportedConfiguration, match=f"backend='tensor_cores': .* this device allows {limit}"):
        forced.plan(seqs, ind, layers=[1])
    assert forced.regime == "" and forced.stats()["plans"] == 0


@pytest.mark.parametrize("backend, counts", [("lut", [3, 1, 2, 0]), ("tensor_cores", [5, 4, 1, 2]),
                                             ("dense", [70, 3, 0, 40])])
def test_the_wrappers_append_writes_what_cache_append_writes(rng, backend, counts):
    # Two caches with the same contents; one appends through the wrapper's plan (one launch per layer), the other
    # through cache.append. Contents, lengths and the attention after them agree bit for bit, and the wrapper's
    # output matches the float64 reference.
    import cupy as cp

    planned, direct = _caches(rng, devices=("cuda", "cuda"), layers=3)
    history = [40, 0, 33, 17]
    seqs = [[c.add_sequence() for _ in history] for c in (planned, direct)]
    _prefill(rng, (planned, direct), seqs[0], history)
    ind = np.concatenate([[0], np.cumsum(counts)])
    nh = 4 * planned.num_kv_heads
    wrappers = [BatchPrefillWrapper(c, nh, backend=backend) for c in (planned, direct)]
    for w, s in zip(wrappers, seqs):
        w.plan(s, ind)
    N = int(ind[-1])
    for layer in range(planned.num_layers):
        k, v = (cp.asarray(_tokens(rng, N, planned)).astype(cp.float16) for _ in range(2))
        q = cp.asarray(rng.standard_normal((N, nh, 128)).astype(np.float32)).astype(cp.float16)
        wrappers[0].append(layer, k, v)
        direct.append(layer, seqs[1], k, v, lengths=counts)
        outs = [w.run(layer, q, out=_poison((N, nh, 128), "float16")) for w in wrappers]
        np.testing.assert_array_equal(to_numpy(outs[0]), to_numpy(outs[1]))
        ks, vs = zip(*(planned.dequantize(layer, s) for s in seqs[0]))
        ref_o, _ = reference.causal_attention(to_numpy(q).astype(np.float64), list(ks), list(vs), ind)
        assert reference.relative_error(to_numpy(outs[0]).astype(np.float64), ref_o) <= TOL["float16"]
        for a, b in zip(seqs[0], seqs[1]):
            for x, y in zip(planned.dequantize(layer, a), direct.dequantize(layer, b)):
                np.testing.assert_array_equal(x, y)
    with pytest.raises(MillionError, match="appended already"):
        wrappers[0].append(0, k, v)
    assert planned.stats()["flushes"] == direct.stats()["flushes"]


def test_the_wrappers_append_refuses_what_its_plan_does_not_cover(rng):
    import cupy as cp

    (cache,) = _caches(rng, devices=("cuda",))
    seqs = [cache.add_sequence() for _ in range(2)]
    _prefill(rng, (cache,), seqs, [20, 9])
    wrapper = BatchPrefillWrapper(cache, 8)
    k = cp.zeros((3, 2, 128), dtype=cp.float16)
    with pytest.raises(MillionError, match="before plan"):
        wrapper.append(0, k, k)
    wrapper.plan(seqs, [0, 2, 3], appended=True)  # the cache does not hold them: run() would say so
    with pytest.raises(MillionError, match="appended=True"):
        wrapper.append(0, k, k)
    wrapper.plan(seqs, [0, 2, 3])
    cache.append(1, seqs, k, k, lengths=[2, 1])  # layer 1 took the tokens without the wrapper
    with pytest.raises(MillionError, match="layer 1: the plan expects sequence 0 to hold 20 tokens, it holds 22"):
        wrapper.append(1, k, k)
    assert cache.seq_lens(1, seqs).tolist() == [22, 10]
    wrapper.append(0, k, k)  # layer 0 still holds what the plan found
    assert cache.seq_lens(0, seqs).tolist() == [22, 10]


@pytest.mark.parametrize("gqa, drafts, backend, regime, launch", [
    (4, 4, "auto", "tensor_cores", "ordinary"), (4, 8, "auto", "tensor_cores", "ordinary"),
    (4, 2, "lut", "lut", "ordinary"),
    (4, 8, "auto", "tensor_cores", "programmatic"), (4, 2, "lut", "lut", "programmatic"),  # MILLION_CUPY_PDL=1
])
def test_a_captured_verification_step_appends_and_attends_for_every_later_plan(rng, monkeypatch, gqa, drafts, backend,
                                                                              regime, launch):
    """A whole verification step (every layer's append and run) captured in one CUDA graph, then for each later
    step: the rejected drafts truncated, plan (which counts the appends for the replay), replay. Per step the
    cache's contents equal a twin cache's fed the same tokens through cache.append (bit for bit: codes, rings,
    flushes), and every layer's output matches the float64 reference (poisoned before each replay). The histories
    cross flushes and TC_MIN_CHUNK (splits within the captured grid). Then the misuses: eager append after such a
    plan, plans the graph cannot replay, a capture on another stream or of a plan without a fixed buffer; each
    raises and leaves the cache as it was; a plan of other counts leaves the graph its buffers and runs eagerly.
    ``programmatic``: every bound launch with programmatic dependent launch (sm_90+), graphed and twin alike."""
    import cupy as cp

    from million_cupy import kernels

    if launch == "programmatic":
        if int(cp.cuda.Device().compute_capability) < 90:
            pytest.skip("programmatic dependent launch needs compute capability 9.0 or newer")
    monkeypatch.setenv(kernels.PDL_ENV, "1" if launch == "programmatic" else "0")

    stream = cp.cuda.Stream(non_blocking=True)
    graphed, twin = _caches(rng, devices=("cuda", "cuda"), max_pages=2048, stream=stream, max_rollback=8)
    L, d = graphed.num_layers, graphed.head_dim
    history = [700, 40, 300]
    seqs = [[c.add_sequence() for _ in history] for c in (graphed, twin)]
    _prefill(rng, (graphed, twin), seqs[0], history)
    nh, B = gqa * graphed.num_kv_heads, len(history)
    ind = np.arange(B + 1) * drafts
    N = int(ind[-1])
    wrapper = BatchPrefillWrapper(graphed, nh, backend=backend, stream=stream)
    k = cp.empty((L, N, graphed.num_kv_heads, d), dtype=cp.float16)
    v, q, out = cp.empty_like(k), cp.empty((L, N, nh, d), dtype=cp.float16), cp.empty((L, N, nh, d), dtype=cp.float16)

    def step():
        for layer in range(L):
            wrapper.append(layer, k[layer], v[layer])
            wrapper.run(layer, q[layer], out=out[layer])

    graph = None
    for i in range(6):
        with stream:
            if i:  # accept 1, all and none of the drafts
                kept = [n - drafts + a for n, a in zip(graphed.seq_lens(0, seqs[0]), [1, drafts, 0])]
                for c, s in zip((graphed, twin), seqs):
                    c.truncate(s, kept)
            if i == 3:  # a long accepted prompt: histories past TC_MIN_CHUNK, split into several items
                _prefill(rng, (graphed, twin), seqs[0], [2000, 1200, 16])
            k[...] = cp.asarray(rng.standard_normal(k.shape).astype(np.float16))
            v[...] = cp.asarray(rng.standard_normal(v.shape).astype(np.float16))
            q[...] = cp.asarray(rng.standard_normal(q.shape).astype(np.float16))
            out.fill(cp.nan)
            wrapper.plan(seqs[0], ind)
            assert wrapper.regime == regime
            if i == 0:
                step()  # eager: compiles every kernel outside the capture
            elif i == 1:
                stream.begin_capture()
                step()
                graph = stream.end_capture()
            if i:
                graph.launch(stream)  # step 1 too: capture counted the appends but ran nothing
            for layer in range(L):
                twin.append(layer, seqs[1], k[layer], v[layer], lengths=[drafts] * B)
        stream.synchronize()
        for layer in range(L):
            for a, b in zip(*seqs):
                for x, y in zip(graphed.dequantize(layer, a), twin.dequantize(layer, b)):
                    np.testing.assert_array_equal(x, y)
            ks, vs = zip(*(graphed.dequantize(layer, s) for s in seqs[0]))
            ref_o, _ = reference.causal_attention(to_numpy(q[layer]).astype(np.float64), list(ks), list(vs), ind)
            assert reference.relative_error(to_numpy(out[layer]).astype(np.float64), ref_o) <= TOL["float16"], (i, layer)
        assert (graphed.lengths[:, seqs[0]] == twin.lengths[:, seqs[1]]).all()
    assert graphed.stats()["flushes"] == twin.stats()["flushes"]
    stats = wrapper.stats()
    assert stats["graph_append_plans"] == 4 and stats["appends"] == 2 * L and stats["stale_graph_plans"] == 0

    with stream:
        held = graphed.lengths.copy()
        wrapper.plan(seqs[0], ind)  # counted for a replay
        with pytest.raises(MillionError, match="launch the graph"):
            wrapper.append(0, k[0], v[0])
        graph.launch(stream)
        held += np.isin(np.arange(graphed.max_seqs), seqs[0]) * drafts
        assert (graphed.lengths == held).all()
        with pytest.raises(MillionError, match="captured this wrapper's appends of layers \\[0, 1\\]"):
            wrapper.plan(seqs[0], ind, appended=True)
        with pytest.raises(MillionError, match="layers=\\[0, 1\\]"):
            wrapper.plan(seqs[0], ind, layers=[0])
        assert (graphed.lengths == held).all()

        other = BatchPrefillWrapper(graphed, nh, backend=backend, stream=cp.cuda.Stream(non_blocking=True))
        other.plan(seqs[0], ind)
        plan = graphed.plan_append(seqs[0], drafts)
        fixed = graphed.plan_append(seqs[0], drafts, into=cp.empty(4 * N, dtype=cp.int32))
        k32 = k[0].astype(cp.float32)
        stream.begin_capture()
        try:
            with pytest.raises(MillionError, match="stream=cache.stream"):
                other.append(0, k[0], v[0])
            with pytest.raises(MillionError, match="into=buffer"):
                plan.append(0, k[0], v[0])
            with pytest.raises(MillionError, match="reads k where it is.*got ndarray of shape .*float32"):
                fixed.append(0, k32, v[0])  # a conversion's copy would be freed under the graph
        finally:
            stream.end_capture()
        assert (graphed.lengths == held).all()

        fewer = np.array([0, 1, 1 + drafts, 2 + drafts])  # other counts: the graph keeps its buffers
        with pytest.warns(RuntimeWarning, match="other new-token counts"):
            wrapper.plan(seqs[0], fewer)
        assert wrapper.stats()["stale_graph_plans"] == 1
        for layer in range(L):  # eager again
            kk, vv = (cp.asarray(_tokens(rng, int(fewer[-1]), graphed)).astype(cp.float16) for _ in range(2))
            wrapper.append(layer, kk, vv)
            qq = cp.asarray(rng.standard_normal((int(fewer[-1]), nh, d)).astype(np.float16))
            o = wrapper.run(layer, qq, out=_poison((int(fewer[-1]), nh, d), "float16"))
            ks, vs = zip(*(graphed.dequantize(layer, s) for s in seqs[0]))
            ref_o, _ = reference.causal_attention(to_numpy(qq).astype(np.float64), list(ks), list(vs), fewer)
            assert reference.relative_error(to_numpy(o).astype(np.float64), ref_o) <= TOL["float16"]
    stream.synchronize()
