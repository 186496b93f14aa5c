"""DecodeStep on the GPU: a whole decode step (append + attention per layer) from device metadata.

Checked against the float64 reference on fresh random data: attention of every step against the reference
over the cache's own dequantized contents (outputs poisoned first), and the stored codes and rings against
a CPU cache fed the same tokens through the plain append (codes equal up to fp32 near-ties). Ragged
batches, flushes in the same and in different steps, GQA and per-head codebooks, a window equal to the
page size, forks, batches that change between steps, CUDA-graph replay against the eager path token for
token, a replay after the batch changed, device flags reported at the next plan, and pool exhaustion in the
middle of a run.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from million_cupy import Codebook, ModelCodebooks, PagedPQCache, reference
from million_cupy.errors import MillionError, PagePoolExhausted, UnsupportedConfiguration
from million_cupy.interop import resolve_dtype, to_numpy

pytestmark = pytest.mark.gpu

TOL = {"float16": 2e-3, "bfloat16": 6e-3, "float32": 1e-3}


def _codebooks(rng, layers, M, d, heads=1):
    def layer():
        books = [Codebook(rng.standard_normal((M, 256, d // M)).astype(np.float32)) for _ in range(heads)]
        return books[0] if heads == 1 else books

    return ModelCodebooks([layer() for _ in range(layers)], [layer() for _ in range(layers)])


def _caches(rng, *, layers=2, nh_k=2, d=128, M=64, P=16, R=32, heads=1, dtype="float16", max_pages=512,
            devices=("cuda", "cpu"), stream=None, max_rollback=0):
    books = _codebooks(rng, layers, M, d, heads)
    return [PagedPQCache(layers, nh_k, d, books, page_size=P, residual=R, max_pages=max_pages, max_seqs=8,
                         max_seq_len=4096, dtype=dtype, device=dev, stream=stream if dev == "cuda" else None,
                         max_rollback=max_rollback)
            for dev in devices]


def _tokens(rng, n, cache):
    return rng.standard_normal((n, cache.num_kv_heads, cache.head_dim)).astype(np.float32)


def _prefill(rng, caches, seqs, lengths):
    """The same prompts into every cache, through the plain append."""
    for layer in range(caches[0].num_layers):
        k, v = _tokens(rng, sum(lengths), caches[0]), _tokens(rng, sum(lengths), caches[0])
        for cache in caches:
            conv = _device_array if cache.is_gpu else np.asarray
            cache.append(layer, seqs, conv(k), conv(v), lengths=lengths)


def _device_array(x):
    import cupy as cp

    return cp.asarray(x)


def _poison(shape, dtype):
    import cupy as cp

    return cp.full(shape, cp.nan, dtype=resolve_dtype(dtype))


def _check_attention(cache, layer, seqs, q, out, lse, dtype):
    ks, vs = zip(*(cache.dequantize(layer, int(s)) for s in seqs))
    ref_o, ref_lse = reference.decode_attention(to_numpy(q).astype(np.float64), list(ks), list(vs))
    o = to_numpy(out).astype(np.float64)
    assert np.isfinite(o).all()
    assert reference.relative_error(o, ref_o) <= TOL[dtype]
    if lse is not None:
        assert np.max(np.abs(to_numpy(lse) - ref_lse)) < 2e-2


def _check_storage(gpu, cpu, seqs):
    """Rings equal, codes equal the CPU cache's reference codes up to fp32 near-ties, lengths equal."""
    from test_cache import contents  # noqa: PLC0415 (the cache tests' reader of the stored layout)

    for layer in range(gpu.num_layers):
        for s in seqs:
            assert gpu.seq_len(s, layer) == cpu.seq_len(s, layer)
            kc_g, vc_g, rk_g, rv_g = contents(gpu, layer, s)
            kc_c, vc_c, rk_c, rv_c = contents(cpu, layer, s)
            np.testing.assert_array_equal(rk_g, rk_c)
            np.testing.assert_array_equal(rv_g, rv_c)
            for got, want in ((kc_g, kc_c), (vc_g, vc_c)):
                # the GPU compares fp32 distances: on rare near-ties it picks the other centroid
                assert got.shape == want.shape and (got.size == 0 or (got == want).mean() > 0.999)
    assert gpu.stats()["flushes"] == cpu.stats()["flushes"]


@pytest.mark.parametrize("d,M,P,R,nh,nh_k,heads,dtype", [
    (128, 64, 16, 32, 8, 2, 1, "float16"),   # GQA 4, several flushes per sequence
    (128, 32, 16, 16, 8, 8, 1, "bfloat16"),  # MHA, window = page: the new token itself enters a page
    (64, 32, 32, 64, 8, 1, 1, "float16"),    # MQA
    (128, 64, 16, 48, 16, 2, 2, "float16"),  # per-kv-head codebooks, GQA 8
])
def test_eager_steps_match_the_reference(rng, d, M, P, R, nh, nh_k, heads, dtype):
    import cupy as cp

    from million_cupy import DecodeStep

    gpu, cpu = _caches(rng, d=d, M=M, P=P, R=R, nh_k=nh_k, heads=heads, dtype=dtype)
    seqs = [gpu.add_sequence() for _ in range(4)]
    for _ in seqs:
        cpu.add_sequence()
    # ragged: one token, a window one short of full, exactly full pages, many pages
    _prefill(rng, (gpu, cpu), seqs, [1, R - 1, 2 * P + R - P, 5 * P + 3])
    step = DecodeStep(gpu, num_heads=nh, horizon=2 * P)
    dt = resolve_dtype(dtype)
    for t in range(3 * P + 2):  # every sequence flushes several times, in different steps
        step.plan(seqs)
        for layer in range(gpu.num_layers):
            k, v = _tokens(rng, len(seqs), gpu), _tokens(rng, len(seqs), gpu)
            step.append(layer, cp.asarray(k.astype(dt)), cp.asarray(v.astype(dt)))
            cpu.append(layer, seqs, k.astype(dt), v.astype(dt))
            q = cp.asarray(rng.standard_normal((len(seqs), nh, d)).astype(dt))
            out, lse = _poison((len(seqs), nh, d), dtype), cp.full((len(seqs), nh), cp.nan, cp.float32)
            step.run(layer, q, out=out, lse=lse)
            if t % 9 == 0 or t == 3 * P + 1:
                _check_attention(gpu, layer, seqs, q, out, lse, dtype)
    step.check()
    _check_storage(gpu, cpu, seqs)
    st = step.stats()
    assert st["reserves"] < (3 * P + 2) / 4 and st["fallback_layers"] == 0  # pages reserved ahead, in batches


def test_reused_buffers_and_one_page_windows_reserve_and_schedule_on_separate_steps(rng):
    """Per-layer buffers rewritten in place every step (the launches then skip their checks: the same arrays),
    and windows of one page, so that pages are reserved every few steps: attention at every step against the
    reference, and once the loop runs no plan both reserves pages and makes a schedule."""
    import cupy as cp

    from million_cupy import DecodeStep

    (gpu,) = _caches(rng, devices=("cuda",))
    P, L, nh = gpu.page_size, gpu.num_layers, 8
    seqs = [gpu.add_sequence() for _ in range(3)]
    _prefill(rng, (gpu,), seqs, [5, 2 * P + 3, 40])
    step = DecodeStep(gpu, num_heads=nh, horizon=P)
    B = len(seqs)
    k, v = ([cp.empty((B, gpu.num_kv_heads, gpu.head_dim), cp.float16) for _ in range(L)] for _ in range(2))
    q, out = ([cp.empty((B, nh, gpu.head_dim), cp.float16) for _ in range(L)] for _ in range(2))
    work = []  # (pages reserved, schedules made) by each plan
    for _ in range(4 * P):
        before = step.stats()
        step.plan(seqs)
        after = step.stats()
        work.append((after["reserves"] - before["reserves"], after["schedules"] - before["schedules"]))
        for layer in range(L):
            for buf in (k[layer], v[layer], q[layer]):
                buf[...] = cp.asarray(rng.standard_normal(buf.shape).astype(np.float16))
            out[layer].fill(cp.nan)
            step.append(layer, k[layer], v[layer])
            step.run(layer, q[layer], out=out[layer])
            _check_attention(gpu, layer, seqs, q[layer], out[layer], None, "float16")
    step.check()
    loop = work[1:]  # the first plan of a batch validates, reserves and schedules at once
    assert sum(r for r, _ in loop) >= 3 and sum(s for _, s in loop) >= 3
    assert not any(r and s for r, s in loop), work


def test_batches_that_change_between_steps_and_forks(rng):
    import cupy as cp

    from million_cupy import DecodeStep

    gpu, cpu = _caches(rng)
    a, b, c = (gpu.add_sequence() for _ in range(3))
    for _ in range(3):
        cpu.add_sequence()
    _prefill(rng, (gpu, cpu), [a, b, c], [40, 17, 90])
    step = DecodeStep(gpu, num_heads=8)
    child = None
    for i in range(18):
        if i == 9:  # fork c mid-run: the child shares c's full pages
            child = gpu.fork(c)
            assert cpu.fork(c) == child
        batch = ([a, b, c] if i < 5 else [c, a] if i < 9 else [c, child, a] if i < 13 else [b] if i < 16
                 else [a, b, c, child])  # b pauses, then steps alone, then rejoins
        step.plan(batch)
        for layer in range(2):
            k, v = _tokens(rng, len(batch), gpu), _tokens(rng, len(batch), gpu)
            step.append(layer, cp.asarray(k.astype(np.float16)), cp.asarray(v.astype(np.float16)))
            cpu.append(layer, batch, k.astype(np.float16), v.astype(np.float16))
            q = cp.asarray(rng.standard_normal((len(batch), 8, 128)).astype(np.float16))
            out = step.run(layer, q, out=_poison((len(batch), 8, 128), "float16"))
            _check_attention(gpu, layer, batch, q, out, None, "float16")
    step.check()
    _check_storage(gpu, cpu, [a, b, c, child])
    # The child's shared pages are still shared and its parent's prefix is untouched by the child's tokens.
    table = to_numpy(gpu.block_table)
    shared = int(gpu.full_pages(90))
    np.testing.assert_array_equal(table[child, :shared], table[c, :shared])


def _three_sequences(rng, a, b, steps: int):
    """The same three sequences (5, 31 and 70 tokens) in caches ``a`` and ``b`` (two layers, 2 kv heads, d = 128),
    and ``steps`` steps of k, v ``(steps, 2, 3, 2, 128)`` and q ``(steps, 2, 3, 8, 128)`` float16 inputs."""
    import cupy as cp

    seqs = [a.add_sequence() for _ in range(3)]
    for _ in seqs:
        b.add_sequence()
    _prefill(rng, (a, b), seqs, [5, 31, 70])
    shapes = ((steps, 2, 3, 2, 128), (steps, 2, 3, 2, 128), (steps, 2, 3, 8, 128))
    return seqs, [cp.asarray(rng.standard_normal(shape).astype(np.float16)) for shape in shapes]


def _graph_replays_eager(rng, eager, graphed, steps: int, stream, *, one_call: bool = False):
    """Three sequences (5, 31 and 70 tokens) decoded for ``steps`` steps of two layers: eagerly on ``eager``, and on
    ``graphed`` by one captured step replayed with its inputs copied into fixed buffers first (``one_call``: each
    layer captured as ``run(..., k=, v=)``). The outputs must be equal bit for bit. Returns the sequences, the
    replayed DecodeStep and the outputs (host copy, ``(steps, 2, 3, 8, 128)``)."""
    import cupy as cp

    from million_cupy import DecodeStep

    seqs, (k_all, v_all, q_all) = _three_sequences(rng, eager, graphed, steps)
    B, nh, d = 3, 8, 128

    with stream:
        s_eager, s_graph = DecodeStep(eager, nh), DecodeStep(graphed, nh)
        out_eager = cp.empty((steps, 2, B, nh, d), cp.float16)
        for t in range(steps):
            s_eager.plan(seqs)
            for layer in range(2):
                s_eager.append(layer, k_all[t, layer], v_all[t, layer])
                s_eager.run(layer, q_all[t, layer], out=out_eager[t, layer])

        # Fixed buffers the graph reads; each replay's inputs are copied in first.
        k_buf, v_buf = cp.empty((2, B, 2, d), cp.float16), cp.empty((2, B, 2, d), cp.float16)
        q_buf, o_buf = cp.empty((2, B, nh, d), cp.float16), cp.empty((2, B, nh, d), cp.float16)
        out_graph = cp.empty_like(out_eager)
        s_graph.plan(seqs)
        for layer in range(2):  # compile and bind outside the capture
            s_graph.append(layer, k_all[0, layer], v_all[0, layer])
            s_graph.run(layer, q_all[0, layer], out=out_graph[0, layer])
        views = [[x[layer] for layer in range(2)] for x in (k_buf, v_buf, q_buf, o_buf)]  # the same objects
        stream.begin_capture()
        for layer in range(2):
            if one_call:  # twice: the second call's arrays repeat, but a capture of the caller's is under way
                kl, vl, ql, ol = (x[layer] for x in views)
                for _ in range(2):
                    s_graph.run(layer, ql, out=ol, k=kl, v=vl)
            else:
                s_graph.append(layer, k_buf[layer], v_buf[layer])
                s_graph.run(layer, q_buf[layer], out=o_buf[layer])
        graph = stream.end_capture()
        assert s_graph.stats()["layer_graph_captures"] == 0
        for t in range(1, steps):
            s_graph.plan(seqs)
            k_buf[...] = k_all[t]
            v_buf[...] = v_all[t]
            q_buf[...] = q_all[t]
            graph.launch(stream)
            out_graph[t] = o_buf
        stream.synchronize()
    s_eager.check()
    s_graph.check()
    out = cp.asnumpy(out_eager)
    np.testing.assert_array_equal(cp.asnumpy(out_graph), out)
    return seqs, s_graph, out


def test_decode_steps_around_verified_and_truncated_drafts(rng):
    # A speculative loop: decode steps, then drafts appended to every sequence and the rejected ones truncated,
    # then decode steps again, on a GPU cache whose ring holds R + 8 tokens, beside a CPU cache given the same
    # calls. The step plans again after each truncate (the cache's version moved); attention matches the
    # reference over the cache's contents, and the rings and codes match the CPU cache's.
    import cupy as cp

    from million_cupy import DecodeStep

    gpu, cpu = _caches(rng, max_rollback=8)
    assert gpu.ring_slots == 40
    seqs = [gpu.add_sequence() for _ in range(3)]
    for _ in seqs:
        cpu.add_sequence()
    _prefill(rng, (gpu, cpu), seqs, [30, 47, 90])
    step = DecodeStep(gpu, num_heads=8, horizon=32)
    for round_ in range(4):
        for t in range(5):
            step.plan(seqs)
            for layer in range(2):
                k, v = _tokens(rng, 3, gpu), _tokens(rng, 3, gpu)
                step.append(layer, cp.asarray(k.astype(np.float16)), cp.asarray(v.astype(np.float16)))
                cpu.append(layer, seqs, k.astype(np.float16), v.astype(np.float16))
                q = cp.asarray(rng.standard_normal((3, 8, 128)).astype(np.float16))
                out = step.run(layer, q, out=_poison((3, 8, 128), "float16"))
                if t == 0:
                    _check_attention(gpu, layer, seqs, q, out, None, "float16")
        held = gpu.seq_lens(0, seqs)
        for layer in range(2):
            k, v = _tokens(rng, 24, gpu).astype(np.float16), _tokens(rng, 24, gpu).astype(np.float16)
            gpu.append(layer, seqs, cp.asarray(k), cp.asarray(v), lengths=[8, 8, 8])
            cpu.append(layer, seqs, k, v, lengths=[8, 8, 8])
        for s, n, kept in zip(seqs, held, rng.integers(0, 9, 3)):
            gpu.truncate(s, int(n + kept))
            cpu.truncate(s, int(n + kept))
    step.check()
    _check_storage(gpu, cpu, seqs)


def test_graph_replay_equals_eager_token_for_token(rng):
    """A whole 2-layer step captured once and replayed for 200 steps (every sequence flushes many times)
    gives exactly the eager path's outputs and cache contents."""
    import cupy as cp

    stream = cp.cuda.Stream(non_blocking=True)
    eager, graphed = _caches(rng, devices=("cuda", "cuda"), stream=stream, max_pages=1024)
    seqs, s_graph, _ = _graph_replays_eager(rng, eager, graphed, 200, stream)
    from test_cache import assert_same_contents, contents  # noqa: PLC0415

    for layer in range(2):
        for s in seqs:
            assert_same_contents(contents(graphed, layer, s), contents(eager, layer, s))
    assert s_graph.stats()["schedules"] < 10  # one schedule serves many steps


def test_programmatic_launches_give_the_same_steps_bit_for_bit(rng, monkeypatch):
    """MILLION_CUPY_PDL=1 (programmatic dependent launch, sm_90+): the step's bound launches go through
    cuLaunchKernelEx with programmatic stream serialization, eager and captured in a graph (200 steps of two
    layers, every sequence flushing many times); outputs and cache contents equal those of ordinary launches
    bit for bit."""
    import cupy as cp

    from million_cupy import kernels
    from test_cache import assert_same_contents, contents  # noqa: PLC0415

    if int(cp.cuda.Device().compute_capability) < 90:
        pytest.skip("programmatic dependent launch needs compute capability 9.0 or newer")
    seed = int(rng.integers(1 << 31))
    launched: list[int] = []
    runs = {}
    for mode in ("ordinary", "programmatic"):
        if mode == "ordinary":
            monkeypatch.setenv(kernels.PDL_ENV, "0")
        else:
            monkeypatch.setenv(kernels.PDL_ENV, "1")
            launch_ex = kernels._launch_kernel_ex()
            monkeypatch.setattr(kernels, "_launch_kernel_ex",
                                lambda: lambda *a: launched.append(1) or launch_ex(*a))
        assert kernels.programmatic_launches() == (mode == "programmatic")
        stream = cp.cuda.Stream(non_blocking=True)
        eager, graphed = _caches(np.random.default_rng(seed), devices=("cuda", "cuda"), stream=stream,
                                 max_pages=1024)
        seqs, _, out = _graph_replays_eager(np.random.default_rng(seed + 1), eager, graphed, 200, stream)
        runs[mode] = out, [contents(c, layer, s) for c in (eager, graphed) for layer in range(2) for s in seqs]
    assert len(launched) > 200 * 2  # appends and attention of every eager layer, and the capture's
    np.testing.assert_array_equal(runs["programmatic"][0], runs["ordinary"][0])
    for got, want in zip(runs["programmatic"][1], runs["ordinary"][1]):
        assert_same_contents(got, want)


def test_one_call_layers_replay_their_graphs_token_for_token(rng):
    """run(layer, q, out=, k=, v=) with a model's per-layer buffers (rewritten in place each step) captures one
    graph per layer on the second step and replays it for 200 steps (every sequence flushes many times): outputs
    and cache contents equal the two-call eager path's bit for bit; another batch size re-captures."""
    import cupy as cp

    from million_cupy import DecodeStep
    from test_cache import assert_same_contents, contents  # noqa: PLC0415

    stream = cp.cuda.Stream(non_blocking=True)
    two_calls, one_call = _caches(rng, devices=("cuda", "cuda"), stream=stream, max_pages=1024)
    steps, B, nh, d = 200, 3, 8, 128
    seqs, (k_all, v_all, q_all) = _three_sequences(rng, two_calls, one_call, steps)
    with stream:
        s_two, s_one = DecodeStep(two_calls, nh), DecodeStep(one_call, nh)
        want = cp.empty((steps, 2, B, nh, d), cp.float16)
        got = cp.full_like(want, cp.nan)
        k_buf = [cp.empty((B, 2, d), cp.float16) for _ in range(2)]
        v_buf = [cp.empty((B, 2, d), cp.float16) for _ in range(2)]
        q_buf = [cp.empty((B, nh, d), cp.float16) for _ in range(2)]
        o_buf = [cp.full((B, nh, d), cp.nan, cp.float16) for _ in range(2)]
        for t in range(steps):
            s_two.plan(seqs)
            s_one.plan(seqs)
            for layer in range(2):
                s_two.append(layer, k_all[t, layer], v_all[t, layer])
                s_two.run(layer, q_all[t, layer], out=want[t, layer])
                k_buf[layer][...] = k_all[t, layer]
                v_buf[layer][...] = v_all[t, layer]
                q_buf[layer][...] = q_all[t, layer]
                assert s_one.run(layer, q_buf[layer], out=o_buf[layer], k=k_buf[layer], v=v_buf[layer]) is o_buf[layer]
                got[t, layer] = o_buf[layer]
        stream.synchronize()
    s_two.check()
    s_one.check()
    np.testing.assert_array_equal(cp.asnumpy(got), cp.asnumpy(want))
    for layer in range(2):
        for s in seqs:
            assert_same_contents(contents(one_call, layer, s), contents(two_calls, layer, s))
    st = s_one.stats()
    assert st["layer_graph_captures"] == 2 and st["layer_graph_fallbacks"] == 0  # one per layer, on step 2

    # Another batch size: the step's launches are re-bound, so the graphs are dropped and captured again.
    pair = seqs[:2]
    k_pair, v_pair = [x[:2] for x in k_buf], [x[:2] for x in v_buf]  # views made once: the same objects each step
    q_pair = [cp.asarray(rng.standard_normal((2, nh, d)).astype(np.float16)) for _ in range(2)]
    o_pair = [cp.empty((2, nh, d), cp.float16) for _ in range(2)]
    with stream:
        for _ in range(3):
            s_one.plan(pair)
            for layer in range(2):
                k_pair[layer][...] = cp.asarray(_tokens(rng, 2, one_call).astype(np.float16))
                v_pair[layer][...] = cp.asarray(_tokens(rng, 2, one_call).astype(np.float16))
                o_pair[layer][...] = cp.nan
                s_one.run(layer, q_pair[layer], out=o_pair[layer], k=k_pair[layer], v=v_pair[layer])
                _check_attention(one_call, layer, pair, q_pair[layer], o_pair[layer], None, "float16")
    assert s_one.stats()["layer_graph_captures"] == 4


def test_one_call_layers_inside_a_callers_capture_and_on_the_legacy_stream(rng):
    """run(..., k=, v=) records its two kernels into a caller's capture (a graph cannot be launched into one); on
    the legacy default stream it takes two launches, counted and warned about once."""
    import cupy as cp

    from million_cupy import DecodeStep

    stream = cp.cuda.Stream(non_blocking=True)
    eager, graphed = _caches(rng, devices=("cuda", "cuda"), stream=stream, max_pages=1024)
    _graph_replays_eager(rng, eager, graphed, 40, stream, one_call=True)

    (cache,) = _caches(rng, devices=("cuda",))  # the legacy default stream
    seqs = [cache.add_sequence() for _ in range(2)]
    _prefill(rng, (cache,), seqs, [20, 40])
    step = DecodeStep(cache, 8)
    k = cp.asarray(_tokens(rng, 2, cache).astype(np.float16))
    q = cp.asarray(rng.standard_normal((2, 8, 128)).astype(np.float16))
    out = cp.empty((2, 8, 128), cp.float16)
    with pytest.warns(RuntimeWarning, match="legacy default stream"):
        for _ in range(3):
            step.plan(seqs)
            for layer in range(2):
                out[...] = cp.nan
                step.run(layer, q, out=out, k=k, v=k)
                _check_attention(cache, layer, seqs, q, out, None, "float16")
    st = step.stats()
    assert st["layer_graph_captures"] == 0 and st["layer_graph_fallbacks"] == 4

    # Bad input in a one-call layer: a clear error and nothing appended.
    step.plan(seqs)
    with pytest.raises(ValueError, match="go together"):
        step.run(0, q, out=out, k=k)
    with pytest.raises(ValueError, match="q"):
        step.run(0, cp.zeros((3, 8, 128), cp.float16), out=out, k=k, v=k)
    with pytest.raises(MillionError, match="before append"):
        step.run(0, q, out=out)


def test_replay_after_the_batch_changed_writes_nothing_and_raises(rng):
    import cupy as cp

    from million_cupy import DecodeStep

    stream = cp.cuda.Stream(non_blocking=True)
    (cache,) = _caches(rng, devices=("cuda",), stream=stream)
    a, b = cache.add_sequence(), cache.add_sequence()
    _prefill(rng, (cache,), [a, b], [20, 30])
    step = DecodeStep(cache, 8)
    k = cp.asarray(rng.standard_normal((2, 2, 128)).astype(np.float16))
    q = cp.asarray(rng.standard_normal((2, 8, 128)).astype(np.float16))
    out = cp.empty((2, 8, 128), cp.float16)
    with stream:
        step.plan([a, b])
        for layer in range(2):
            step.append(layer, k, k)
            step.run(layer, q, out=out)
        stream.begin_capture()
        for layer in range(2):
            step.append(layer, k, k)
            step.run(layer, q, out=out)
        graph = stream.end_capture()
        graph.launch(stream)  # step 1 of [a, b]
        step.plan([a, b])
        graph.launch(stream)  # step 2
        cache.free(b)
        c = cache.add_sequence()  # takes b's slot
        assert c == b
        _prefill(rng, (cache,), [c], [45])
        from test_cache import contents  # noqa: PLC0415

        before = [[np.copy(x) for x in contents(cache, layer, c)] for layer in range(2)]
        rings = [cp.asnumpy(cache.residual_k(layer)[c]) for layer in range(2)]
        graph.launch(stream)  # misuse: a replay without plan() after the batch changed
        stream.synchronize()
    for layer in range(2):
        for x, y in zip(before[layer], contents(cache, layer, c)):
            np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(rings[layer], cp.asnumpy(cache.residual_k(layer)[c]))
    with pytest.raises(MillionError, match="freed or reused"):
        step.check()
    step.check()  # the flag was cleared with the error
    with stream:
        graph.launch(stream)  # the same misuse again; once it has run, the next plan() reports it
        stream.synchronize()
    with pytest.raises(MillionError, match="freed or reused"):
        step.plan([a, c])
    step.plan([a, c])  # cleared with the error: the new batch plans


def test_a_non_finite_token_is_reported_at_the_next_plan(rng):
    """The append kernel flags a NaN token in the step's pinned flag word: once that launch has run, the next
    plan() warns (once per step object), counts it in both stats(), clears the flag and goes on."""
    import cupy as cp

    from million_cupy import DecodeStep

    (cache,) = _caches(rng, devices=("cuda",))
    a, b = cache.add_sequence(), cache.add_sequence()
    _prefill(rng, (cache,), [a, b], [20, 30])
    step = DecodeStep(cache, 8)
    k = cp.asarray(rng.standard_normal((2, 2, 128)).astype(np.float16))
    bad = k.copy()
    bad[1, 0, 5] = cp.nan
    q = cp.asarray(rng.standard_normal((2, 8, 128)).astype(np.float16))
    out = cp.empty((2, 8, 128), cp.float16)
    step.plan([a, b])
    assert not step.stats()["non_finite_appended"] and not cache.stats()["non_finite_appended"]
    for layer in range(2):
        step.run(layer, q, out=out, k=bad if layer == 1 else k, v=k)
    step.stream.synchronize()
    with pytest.warns(RuntimeWarning, match="NaN or inf"):
        step.plan([a, b])
    assert step.stats()["non_finite_appended"] and cache.stats()["non_finite_appended"]
    for layer in range(2):
        step.run(layer, q, out=out, k=k, v=k)
    step.stream.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the flag was cleared: nothing more to report
        step.plan([a, b])
        step.check()
    assert cache.seq_len(a) == 23 and cache.seq_len(b) == 33  # three planned steps: the NaN token is stored


def test_a_larger_batch_without_pages_leaves_the_step_planned(rng):
    """A plan of a larger batch grows the step's metadata, then finds no pages: it raises PagePoolExhausted
    with the previous batch's plan still in use, so that batch's next step attends over the right tokens."""
    import cupy as cp

    from million_cupy import DecodeStep

    (cache,) = _caches(rng, devices=("cuda",), max_pages=12)
    a, b, c = cache.add_sequence(), cache.add_sequence(), cache.add_sequence()
    _prefill(rng, (cache,), [a, b, c], [60, 60, 64])  # 12 blocks of 16: a and b have room for 4 tokens, c none
    step = DecodeStep(cache, 8, horizon=16)
    used = cache.stats()["used"]

    def one_step(seqs):
        step.plan(seqs)
        B = len(seqs)
        for layer in range(2):
            k = cp.asarray(rng.standard_normal((B, 2, 128)).astype(np.float16))
            q = cp.asarray(rng.standard_normal((B, 8, 128)).astype(np.float16))
            step.append(layer, k, k)
            _check_attention(cache, layer, seqs, q, step.run(layer, q), None, "float16")

    one_step([a, b])
    with pytest.raises(PagePoolExhausted):
        step.plan([a, b, c])  # a batch of 3 outgrows the plan for 2; c needs a page
    assert cache.stats()["used"] == used and [cache.seq_len(s) for s in (a, b, c)] == [61, 61, 64]
    one_step([a, b])
    step.check()
    assert [cache.seq_len(s) for s in (a, b)] == [62, 62]


def test_a_decode_plan_without_room_for_its_metadata_reserves_no_page(rng, monkeypatch):
    """BatchDecodeWrapper.plan allocates a larger batch's metadata before it reserves the new tokens' pages:
    a device without room raises with the pool and the lengths as they were, and the last plan still runs."""
    import cupy as cp

    from million_cupy import BatchDecodeWrapper

    (cache,) = _caches(rng, devices=("cuda",))
    seqs = [cache.add_sequence() for _ in range(3)]
    _prefill(rng, (cache,), seqs, [40, 33, 16])
    wrapper = BatchDecodeWrapper(cache, num_heads=8)
    wrapper.plan(seqs[:2], new_tokens=0)
    before, lengths = cache.stats(), cache.lengths.copy()

    def no_room(*args, **kwargs):
        raise cp.cuda.memory.OutOfMemoryError(1 << 40, 1 << 30)

    monkeypatch.setattr(cp, "zeros", no_room)
    monkeypatch.setattr(cp, "empty", no_room)
    with pytest.raises(cp.cuda.memory.OutOfMemoryError):
        wrapper.plan(seqs, new_tokens=1)  # 3 sequences outgrow the plan for 2
    monkeypatch.undo()
    assert cache.stats()["used"] == before["used"] and cache.stats()["allocs"] == before["allocs"]
    np.testing.assert_array_equal(cache.lengths, lengths)
    q = cp.asarray(rng.standard_normal((2, 8, 128)).astype(np.float16))
    _check_attention(cache, 0, seqs[:2], q, wrapper.run(0, q), None, "float16")


def test_pool_exhaustion_in_a_run_of_steps_loses_nothing(rng):
    import cupy as cp

    from million_cupy import DecodeStep

    (cache,) = _caches(rng, devices=("cuda",), max_pages=12)
    a, b = cache.add_sequence(), cache.add_sequence()
    _prefill(rng, (cache,), [a, b], [60, 60])  # 4 + 4 blocks of 16
    step = DecodeStep(cache, 8, horizon=16)
    k = cp.asarray(rng.standard_normal((2, 2, 128)).astype(np.float16))
    steps = 0
    with pytest.raises(PagePoolExhausted):
        while True:
            step.plan([a, b])
            for layer in range(2):
                step.append(layer, k, k)
            steps += 1
            snapshot = [[cache.dequantize(layer, s) for s in (a, b)] for layer in range(2)]
            lens = [cache.seq_len(s) for s in (a, b)]
    assert steps > 0 and [cache.seq_len(s) for s in (a, b)] == lens
    for layer in range(2):
        for i, s in enumerate((a, b)):
            for x, y in zip(snapshot[layer][i], cache.dequantize(layer, s)):
                np.testing.assert_array_equal(x, y)
    cache.free(b)
    step.plan([a])  # the step goes on with the pages b gave back
    for layer in range(2):
        step.append(layer, k[:1], k[:1])
        q = cp.asarray(rng.standard_normal((1, 8, 128)).astype(np.float16))
        _check_attention(cache, layer, [a], q, step.run(layer, q), None, "float16")
    step.check()


def test_eager_misuse_is_a_clear_error(rng):
    import cupy as cp

    from million_cupy import DecodeStep

    (cache,) = _caches(rng, devices=("cuda",))
    a, b = cache.add_sequence(), cache.add_sequence()
    _prefill(rng, (cache,), [a, b], [20, 30])
    step = DecodeStep(cache, 8)
    k = cp.zeros((2, 2, 128), cp.float16)
    q = cp.zeros((2, 8, 128), cp.float16)
    step.plan([a, b])
    with pytest.raises(MillionError, match="before append"):
        step.run(0, q)
    step.append(0, k, k)
    with pytest.raises(MillionError, match="not \\[1\\]"):
        step.plan([a, b])
    with pytest.raises(ValueError, match="k: expected shape"):
        step.append(1, cp.zeros((3, 2, 128), cp.float16), k)
    step.append(1, k, k)
    step.plan([a, b])  # the step is whole again
    for layer in range(2):
        step.append(layer, k, k)
    cache.append(0, [a, b], k, k)  # layer 0 one token ahead of layer 1
    with pytest.raises(ValueError, match="equal lengths"):
        step.plan([a, b])
    with pytest.raises(UnsupportedConfiguration, match="GPU cache"):
        DecodeStep(_caches(rng, devices=("cpu",))[0], 8)


def test_repeated_decode_reuses_its_plan(rng):
    import cupy as cp

    import million_cupy as mc

    (cache,) = _caches(rng, devices=("cuda",))
    seqs = [cache.add_sequence() for _ in range(2)]
    _prefill(rng, (cache,), seqs, [100, 7])
    q = cp.asarray(rng.standard_normal((2, 8, 128)).astype(np.float16))
    for layer in (0, 1, 0, 1):
        out = mc.decode(cache, layer, seqs, q)
        _check_attention(cache, layer, seqs, q, out, None, "float16")
    from million_cupy.decode import _decode_wrappers  # noqa: PLC0415

    (wrapper,) = _decode_wrappers[cache].values()
    assert wrapper.stats()["plans"] == 1 and wrapper.stats()["plans_reused"] == 3
    _prefill(rng, (cache,), seqs, [1, 1])  # the cache changed: the next call plans again
    out = mc.decode(cache, 0, seqs, q)
    _check_attention(cache, 0, seqs, q, out, None, "float16")
    assert wrapper.stats()["plans"] == 2
    # Another order of the same ids, a tuple, then a NumPy array: each is the batch it names.
    swapped = [seqs[1], seqs[0]]
    for ids in (swapped, tuple(swapped), np.array(swapped)):
        out, lse = mc.decode(cache, 1, ids, q, return_lse=True)
        _check_attention(cache, 1, list(ids), q, out, lse, "float16")
    assert wrapper.stats()["plans"] == 3


# ------------------------------------------------------------------ exact caches (the fp16 paged mode)


def _exact_caches(*, layers=2, nh_k=2, d=128, P=16, dtype="float16", max_pages=512, devices=("cuda", "cpu"),
                  stream=None):
    return [PagedPQCache(layers, nh_k, d, None, page_size=P, max_pages=max_pages, max_seqs=8, max_seq_len=4096,
                         dtype=dtype, device=dev, stream=stream if dev == "cuda" else None) for dev in devices]


@pytest.mark.parametrize("d,P,nh,nh_k,dtype", [
    (128, 16, 8, 2, "float16"),   # GQA 4
    (64, 32, 8, 1, "bfloat16"),   # MQA
    (128, 16, 16, 2, "float32"),  # GQA 8
])
def test_exact_cache_steps_match_the_reference(rng, d, P, nh, nh_k, dtype):
    """DecodeStep over an exact cache: every step's attention against the float64 reference over the tokens as
    stored (outputs poisoned first), pages bit for bit equal to a CPU exact cache's, ragged lengths (one token,
    a block one short of full, exactly full blocks, many blocks), a fork in the middle of the run, and decode()
    agreeing with the step."""
    import cupy as cp

    import million_cupy as mc
    from million_cupy import DecodeStep

    gpu, cpu = _exact_caches(d=d, P=P, nh_k=nh_k, dtype=dtype)
    seqs = [gpu.add_sequence() for _ in range(4)]
    for _ in seqs:
        cpu.add_sequence()
    _prefill(rng, (gpu, cpu), seqs, [1, P - 1, 2 * P, 5 * P + 3])
    step = DecodeStep(gpu, num_heads=nh, horizon=P)
    dt = resolve_dtype(dtype)
    for t in range(3 * P + 2):
        if t == P + 1:  # a child shares its parent's full pages and joins the batch
            seqs.append(gpu.fork(seqs[3]))
            assert cpu.fork(seqs[3]) == seqs[-1]
        step.plan(seqs)
        for layer in range(gpu.num_layers):
            k, v = _tokens(rng, len(seqs), gpu).astype(dt), _tokens(rng, len(seqs), gpu).astype(dt)
            step.append(layer, cp.asarray(k), cp.asarray(v))
            cpu.append(layer, seqs, k, v)
            q = cp.asarray(rng.standard_normal((len(seqs), nh, d)).astype(dt))
            out, lse = _poison((len(seqs), nh, d), dtype), cp.full((len(seqs), nh), cp.nan, cp.float32)
            step.run(layer, q, out=out, lse=lse)
            if t % 7 == 0 or t == 3 * P + 1:
                _check_attention(gpu, layer, seqs, q, out, lse, dtype)
                # decode() schedules for the tokens held now (the step for a window ahead): other splits, so
                # other roundings of the same attention
                _check_attention(gpu, layer, seqs, q, mc.decode(gpu, layer, seqs, q), None, dtype)
    step.check()
    for layer in range(gpu.num_layers):
        for s in seqs:
            for got, want in zip(gpu.dequantize(layer, s), cpu.dequantize(layer, s)):
                np.testing.assert_array_equal(got, want)
    assert step.stats()["fallback_layers"] == 0 and gpu.stats()["flushes"] == cpu.stats()["flushes"]


def test_exact_cache_graph_replay_equals_eager_and_refuses_prefill(rng):
    import cupy as cp

    from million_cupy import BatchPrefillWrapper

    stream = cp.cuda.Stream(non_blocking=True)
    eager, graphed = _exact_caches(devices=("cuda", "cuda"), stream=stream)
    seqs, _, _ = _graph_replays_eager(rng, eager, graphed, 120, stream)
    for layer in range(2):
        for s in seqs:
            for got, want in zip(graphed.dequantize(layer, s), eager.dequantize(layer, s)):
                np.testing.assert_array_equal(got, want)
    with pytest.raises(UnsupportedConfiguration, match="exact"):
        BatchPrefillWrapper(eager, 8)
