"""decode(): the plan / run wrapper over a PagedPQCache, the CPU reference path, and scheduling.

CPU tests check the schedule and the float64 CPU path; GPU tests (marked) check the native kernel
through BatchDecodeWrapper against the reference computed from the cache's own dequantized contents,
with outputs poisoned (NaN) before every launch.
"""

from __future__ import annotations

import numpy as np
import pytest

from million_cupy import Codebook, ModelCodebooks, PagedPQCache, reference
from million_cupy.decode import (
    MODE_PAGED_PQ,
    THREADS,
    WORK_RESIDUAL,
    _variant_grid,
    choose_group,
    decode,
    make_schedule,
    smem_bytes,
)
from million_cupy.errors import MillionError, UnsupportedConfiguration
from million_cupy.interop import to_numpy


def _codebooks(rng, layers, M, d, heads=1):
    def one():
        return [Codebook(rng.standard_normal((M, 256, d // M)).astype(np.float32)) for _ in range(heads)]

    keys = [one() if heads > 1 else one()[0] for _ in range(layers)]
    values = [one() if heads > 1 else one()[0] for _ in range(layers)]
    return ModelCodebooks(keys, values)


def _cache(rng, device, *, layers=2, nh_k=2, d=64, M=32, P=16, R=32, heads=1, dtype="float16", **kw):
    kw.setdefault("max_seqs", 8)
    kw.setdefault("max_seq_len", 8192)
    kw.setdefault("max_pages", 2048)
    return PagedPQCache(layers, nh_k, d, _codebooks(rng, layers, M, d, heads), page_size=P, residual=R,
                        dtype=dtype, device=device, **kw)


def _fill(rng, cache, seqs, lengths, layer):
    from million_cupy.interop import resolve_dtype

    dt = resolve_dtype(cache.dtype)
    n = int(sum(lengths))
    k = rng.standard_normal((n, cache.num_kv_heads, cache.head_dim)).astype(dt)
    v = rng.standard_normal((n, cache.num_kv_heads, cache.head_dim)).astype(dt)
    if cache.is_gpu:
        import cupy as cp

        k, v = cp.asarray(k), cp.asarray(v)
    cache.append(layer, seqs, k, v, lengths=list(lengths))


def _reference(cache, layer, seqs, q):
    ks, vs = zip(*(cache.dequantize(layer, s) for s in seqs))
    return reference.decode_attention(to_numpy(q).astype(np.float64), list(ks), list(vs))


# ------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("lens", [[32768] * 8, [131072], [4032], [0, 64, 128000], [1_000_000],
                                  list(range(0, 256 * 64, 64))])
def test_schedule_covers_every_token_once(lens, residual):
    lens = np.asarray(lens)
    sched = make_schedule(lens, 32, 4, 64, 132, residual=residual)
    w = sched.work
    assert (w[:, 2] <= w[:, 3]).all()
    assert len(w) <= 132 or len(w) == len(sched.unit_items)  # one wave, unless every unit is one item
    for unit, (first, count) in enumerate(sched.unit_items):
        b, g = divmod(unit, 8)
        items = w[first:first + count]
        assert (items[:, 0] == b).all() and (items[:, 1] & (WORK_RESIDUAL - 1) == g).all()
        assert items[0, 2] == 0 and items[-1, 3] == lens[b]
        assert (items[1:, 2] == items[:-1, 3]).all()
        # exactly one item, the last, processes the residual tokens
        assert ((items[:, 1] & WORK_RESIDUAL) != 0).tolist() == [False] * (count - 1) + [True]
        assert (items[:, 2] % 64 == 0).all()


def test_schedule_gives_short_contexts_a_residual_item():
    # batch 1 x 4K tokens, 8 head groups: the residual runs beside the splits, in an item of its own
    sched = make_schedule(np.array([4032]), 32, 4, 64, 132, residual=True)
    last = sched.unit_items[:, 0] + sched.unit_items[:, 1] - 1
    assert (sched.work[last, 2] == 4032).all() and (sched.work[last, 3] == 4032).all()
    assert len(sched.work) <= 132
    # long splits keep the residual in their last split
    sched = make_schedule(np.array([32768] * 8), 32, 4, 64, 132, residual=True)
    last = sched.unit_items[:, 0] + sched.unit_items[:, 1] - 1
    assert (sched.work[last, 2] < sched.work[last, 3]).all()


def test_schedule_fills_the_gpu_for_one_long_sequence():
    sched = make_schedule(np.array([131072]), 32, 4, 64, 132)
    assert 64 <= len(sched.work) <= 132


def test_variant_grid_fits_shared_memory():
    grid = _variant_grid()
    assert len(grid) > 100
    for d in (64, 128, 256):
        for dsub in (1, 2, 4, 8):
            g = choose_group(MODE_PAGED_PQ, d, d // dsub, 4, 227 * 1024)
            assert smem_bytes(MODE_PAGED_PQ, d, d // dsub, g) <= 227 * 1024
    assert THREADS % 32 == 0


def test_unsupported_head_dim_is_a_clear_error(rng):
    with pytest.raises(UnsupportedConfiguration, match="head_dim"):
        choose_group(MODE_PAGED_PQ, 96, 48, 4, 1024)


# ------------------------------------------------------------------------------------------- CPU path


def test_cpu_decode_is_the_reference(rng):
    cache = _cache(rng, "cpu")
    seqs = [cache.add_sequence() for _ in range(3)]
    for layer in range(2):
        _fill(rng, cache, seqs, [5, 40, 100], layer)
    q = rng.standard_normal((3, 4, 64)).astype(np.float16)
    out, lse = decode(cache, 1, seqs, q, return_lse=True)
    ref = _reference(cache, 1, seqs, q)
    assert out.dtype == np.float16
    assert reference.relative_error(out.astype(np.float64), ref[0]) < 1e-3
    assert np.allclose(lse, ref[1], atol=1e-5)
    into_out, into_lse = np.full_like(out, np.nan), np.full(lse.shape, np.nan, np.float32)
    got_out, got_lse = decode(cache, 1, seqs, q, out=into_out, lse=into_lse)  # a caller's lse implies it
    assert got_out is into_out and got_lse is into_lse
    np.testing.assert_array_equal(into_out, out)
    np.testing.assert_array_equal(into_lse, lse)


def test_cpu_decode_validates_q(rng):
    cache = _cache(rng, "cpu")
    s = cache.add_sequence()
    _fill(rng, cache, [s], [10], 0)
    with pytest.raises(ValueError, match="expected shape"):
        decode(cache, 0, [s], np.zeros((2, 4, 64), np.float16))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("scale", [-0.125, 0.0, float("nan"), float("inf"), "0.125"])
def test_decode_refuses_a_scale_that_is_not_positive_and_finite(rng, device, scale):
    """As prefill_attention does: decode(), a wrapper's plan and a DecodeStep (GPU) name the scale and reserve no
    page for it."""
    cache = _cache(rng, device)
    s = cache.add_sequence()
    _fill(rng, cache, [s], [10], 0)
    q = np.zeros((1, 4, 64), np.float16)
    if cache.is_gpu:
        import cupy as cp

        q = cp.asarray(q)
    used = cache.stats()["used"]
    expected = "scale: expected a positive finite softmax scale or None, got"
    with pytest.raises(ValueError, match=expected):
        decode(cache, 0, [s], q, scale=scale)
    if cache.is_gpu:
        from million_cupy import BatchDecodeWrapper, DecodeStep

        with pytest.raises(ValueError, match=expected):
            BatchDecodeWrapper(cache, num_heads=4).plan([s], new_tokens=200, scale=scale, layers=[0])
        with pytest.raises(ValueError, match=expected):
            DecodeStep(cache, 4, scale=scale)
    assert cache.stats()["used"] == used and cache.seq_len(s, 0) == 10


@pytest.mark.gpu
def test_a_wrapper_plan_refuses_ids_that_are_not_integers(rng):
    from million_cupy import BatchDecodeWrapper

    cache = _cache(rng, "cuda")
    s = cache.add_sequence()
    _fill(rng, cache, [s], [10], 0)
    used = cache.stats()["used"]
    with pytest.raises(TypeError, match="plan: expected integer sequence ids, got dtype float64"):
        BatchDecodeWrapper(cache, num_heads=4).plan([float(s) + 0.5], new_tokens=200, layers=[0])
    assert cache.stats()["used"] == used


# ------------------------------------------------------------------------------------------- GPU path


def _poison(shape, dtype):
    import cupy as cp

    from million_cupy.interop import resolve_dtype

    return cp.full(shape, cp.nan, dtype=resolve_dtype(dtype))


TOL = {"float16": 2e-3, "bfloat16": 6e-3, "float32": 1e-3}


@pytest.mark.gpu
@pytest.mark.parametrize("d,M,P,R,nh,nh_k,heads,dtype", [
    (64, 32, 16, 32, 4, 2, 1, "float16"),
    (128, 64, 64, 128, 32, 8, 1, "float16"),
    (128, 32, 64, 128, 16, 4, 4, "bfloat16"),
    (128, 16, 32, 64, 8, 8, 1, "float32"),
    (256, 64, 64, 64, 6, 2, 1, "float16"),
])
def test_wrapper_matches_reference(rng, d, M, P, R, nh, nh_k, heads, dtype):
    import cupy as cp

    from million_cupy import BatchDecodeWrapper

    cache = _cache(rng, "cuda", d=d, M=M, P=P, R=R, nh_k=nh_k, heads=heads, dtype=dtype)
    seqs = [cache.add_sequence() for _ in range(4)]
    lengths = [1, R - 1, R, 9 * P + 5]  # one token, full window and no page, first page, many pages
    for layer in range(2):
        _fill(rng, cache, seqs, lengths, layer)
    wrapper = BatchDecodeWrapper(cache, num_heads=nh)
    wrapper.plan(seqs, new_tokens=0)
    from million_cupy.interop import resolve_dtype

    for layer in range(2):
        q = cp.asarray(rng.standard_normal((4, nh, d)).astype(resolve_dtype(dtype)))
        out = _poison((4, nh, d), dtype)
        lse = cp.full((4, nh), cp.nan, cp.float32)
        wrapper.run(layer, q, out=out, lse=lse)
        ref = _reference(cache, layer, seqs, q)
        o = cp.asnumpy(out).astype(np.float64)
        assert np.isfinite(o).all()
        assert reference.relative_error(o, ref[0]) <= TOL[dtype]
        assert np.max(np.abs(cp.asnumpy(lse) - ref[1])) < 2e-2


@pytest.mark.gpu
def test_decode_loop_plan_before_appends(rng):
    """The decode-loop contract: plan(new_tokens=1), then per layer append + run; flushes happen mid-step."""
    import cupy as cp

    from million_cupy import BatchDecodeWrapper

    cache = _cache(rng, "cuda", d=128, M=64, P=16, R=32, nh_k=2)
    seqs = [cache.add_sequence() for _ in range(3)]
    for layer in range(2):
        _fill(rng, cache, seqs, [31, 47, 10], layer)  # 31 and 47: the next token fills a page
    wrapper = BatchDecodeWrapper(cache, num_heads=8)
    for step in range(3):
        wrapper.plan(seqs, new_tokens=1)
        for layer in range(2):
            with pytest.raises(MillionError, match="plan expected"):
                wrapper.run(layer, cp.zeros((3, 8, 128), cp.float16))
            _fill(rng, cache, seqs, [1, 1, 1], layer)
            q = cp.asarray(rng.standard_normal((3, 8, 128)).astype(np.float16))
            out = wrapper.run(layer, q)
            ref = _reference(cache, layer, seqs, q)
            assert reference.relative_error(cp.asnumpy(out).astype(np.float64), ref[0]) <= 2e-3


@pytest.mark.gpu
def test_repeated_runs_write_each_calls_arrays(rng):
    """run() binds a layer's launch once per plan and sets q / out / lse per call: every call must read its
    own q, write its own out, and leave an earlier call's lse alone when it asks for none."""
    import cupy as cp

    from million_cupy import BatchDecodeWrapper

    cache = _cache(rng, "cuda", d=128, M=64, P=64, R=128, nh_k=2)
    seqs = [cache.add_sequence() for _ in range(2)]
    _fill(rng, cache, seqs, [700, 90], 0)
    _fill(rng, cache, seqs, [700, 90], 1)
    wrapper = BatchDecodeWrapper(cache, num_heads=8)
    wrapper.plan(seqs, new_tokens=0)
    first_lse = cp.full((2, 8), cp.nan, cp.float32)
    results = []
    for call, layer in enumerate([0, 0, 1, 0]):
        q = cp.asarray(rng.standard_normal((2, 8, 128)).astype(np.float16))
        out = _poison((2, 8, 128), "float16")
        if call == 0:
            wrapper.run(layer, q, out=out, lse=first_lse)
            kept = cp.asnumpy(first_lse)
        elif call == 1:
            got, second_lse = wrapper.run(layer, q, return_lse=True)  # wrapper-allocated out and lse
            assert got is not out
            out = got
            kept_second = cp.asnumpy(second_lse)
            assert np.max(np.abs(kept_second - _reference(cache, layer, seqs, q)[1])) < 2e-2
        else:
            wrapper.run(layer, q, out=out)
        results.append((layer, q, out))
    cp.cuda.get_current_stream().synchronize()
    # Later calls without lse wrote into neither earlier lse array.
    assert np.array_equal(cp.asnumpy(first_lse), kept) and np.array_equal(cp.asnumpy(second_lse), kept_second)
    assert np.max(np.abs(kept - _reference(cache, 0, seqs, results[0][1])[1])) < 2e-2
    for layer, q, out in results:
        ref = _reference(cache, layer, seqs, q)
        assert reference.relative_error(cp.asnumpy(out).astype(np.float64), ref[0]) <= 2e-3
    assert wrapper.stats()["runs"] == 4
    cache.free(seqs[1])  # a sequence freed after plan(): run's check names it instead of launching
    with pytest.raises(ValueError, match="not live"):
        wrapper.run(0, results[0][1])
    assert wrapper.stats()["runs"] == 4


@pytest.mark.gpu
def test_run_replays_in_a_cuda_graph(rng):
    import cupy as cp

    from million_cupy import BatchDecodeWrapper

    cache = _cache(rng, "cuda", d=128, M=64, P=64, R=128, nh_k=2)
    seqs = [cache.add_sequence() for _ in range(2)]
    for layer in range(2):
        _fill(rng, cache, seqs, [300, 2000], layer)
    # The wrapper's stream is not the cache's (the legacy default): the plan's first copy waits for the zero fills
    # of its buffers, made on the cache's stream.
    stream = cp.cuda.Stream(non_blocking=True)
    wrapper = BatchDecodeWrapper(cache, num_heads=8, stream=stream)
    wrapper.plan(seqs, new_tokens=0)
    q = cp.asarray(rng.standard_normal((2, 8, 128)).astype(np.float16))
    out = cp.empty_like(q)
    cp.cuda.Device().synchronize()
    wrapper.run(0, q, out=out)  # first call compiles and configures the kernel outside the capture
    with stream:
        stream.begin_capture()
        wrapper.run(0, q, out=out, check=False)
        graph = stream.end_capture()
    out.fill(cp.nan)
    q2 = cp.asarray(rng.standard_normal((2, 8, 128)).astype(np.float16))
    q[...] = q2
    cp.cuda.Device().synchronize()  # the fills ran on the legacy default stream
    graph.launch(stream)
    stream.synchronize()
    ref = _reference(cache, 0, seqs, q2)
    assert reference.relative_error(cp.asnumpy(out).astype(np.float64), ref[0]) <= 2e-3


@pytest.mark.gpu
def test_decode_convenience_gpu_equals_cpu(rng):
    """The same tokens in a GPU and a CPU cache give the same attention (native kernel vs float64)."""
    import cupy as cp

    codebooks = _codebooks(rng, 1, 32, 64)
    caches = [PagedPQCache(1, 2, 64, codebooks, page_size=16, residual=32, max_pages=64, max_seqs=2,
                           max_seq_len=1024, device=dev) for dev in ("cpu", "cuda")]
    k = rng.standard_normal((150, 2, 64)).astype(np.float16)
    v = rng.standard_normal((150, 2, 64)).astype(np.float16)
    q = rng.standard_normal((1, 4, 64)).astype(np.float16)
    outs = []
    for cache in caches:
        s = cache.add_sequence()
        conv = cp.asarray if cache.is_gpu else np.asarray
        cache.append(0, [s], conv(k), conv(v), lengths=[150])
        outs.append(to_numpy(decode(cache, 0, [s], conv(q))).astype(np.float64))
    assert reference.relative_error(outs[1], outs[0]) <= 2e-3


@pytest.mark.gpu
def test_explicit_streams(rng):
    """A cache, its wrapper and a codebook encode all on one caller stream (given as a raw handle)."""
    import cupy as cp

    from million_cupy import BatchDecodeWrapper

    stream = cp.cuda.Stream(non_blocking=True)
    cache = PagedPQCache(1, 2, 64, _codebooks(rng, 1, 32, 64), page_size=16, residual=32, max_pages=64,
                         max_seqs=2, max_seq_len=1024, device="cuda", stream=stream.ptr)
    assert int(cache.stream.ptr) == int(stream.ptr)
    seqs = [cache.add_sequence()]
    with stream:
        _fill(rng, cache, seqs, [200], 0)
        q = cp.asarray(rng.standard_normal((1, 4, 64)).astype(np.float16))
        codes = cache.codebooks.key_codebooks(0)[0].encode(cp.asarray(rng.standard_normal((5, 64)),
                                                                      dtype=cp.float32), stream=stream)
    wrapper = BatchDecodeWrapper(cache, num_heads=4, stream=stream)
    wrapper.plan(seqs, new_tokens=0)
    out = wrapper.run(0, q)
    stream.synchronize()
    assert codes.shape == (5, 32)
    ref = _reference(cache, 0, seqs, q)
    assert reference.relative_error(cp.asnumpy(out).astype(np.float64), ref[0]) <= 2e-3


def test_bound_argument_indices_follow_the_kernel_signature():
    """AttentionPlan sets q, out and lse by position in a parameter block built once: those positions must be the
    kernel's (a CPU check of the source, so a signature change cannot silently bind the wrong pointers)."""
    import re

    from million_cupy import kernels
    from million_cupy.decode import SOURCE, AttentionPlan

    src = kernels.read_source(SOURCE)
    body = re.sub(r"//[^\n]*", "", src[src.index("decode_attention(", src.index("__global__")) + len("decode_attention("):])
    params = body[: body.index(")")].split(",")
    names = [re.findall(r"[A-Za-z_]\w*", p)[-1] for p in params]
    assert names[0] == "q"
    assert names[AttentionPlan.OUT_ARG] == "out" and names[AttentionPlan.OUT_ARG + 1] == "lse_out"
    assert names[-1] == "scale_log2" and len(names) == AttentionPlan.OUT_ARG + 5
