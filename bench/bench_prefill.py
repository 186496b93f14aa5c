"""Several new tokens per sequence over the PQ cache (BatchPrefillWrapper) against one-token decode and SDPA.

Shapes: nh = 32, nh_k = 8, d = 128, page 64, window 128, float16, M = 64 and 32 (``--M``; 16 too for the
chunk records), one layer. Records (suite "prefill"), GPU time with calls queued back to back
(bench/harness.py):

* ``verify``: ``q`` = 2, 4, 8, 16, 32 and 64 new tokens per sequence at 8 x 32K (speculative verification; 64 for
  the dense regime's crossover, DENSE_ROWS_MIN), against
  the one-token decode of the same batch (``vs_decode``; the issue's targets are 1.5x and 2x at q = 4 and 8),
  with each ``backend`` of BatchPrefillWrapper (``auto``: the documented rule; ``lut``, ``tensor_cores``
  forced), which is how LUT_QUERIES_MAX is measured, and the host time per ``run`` call (``host_us``,
  calls back to back);
* ``verify_graph``: the ``auto`` rule's run for up to 32 query rows per kv head captured in a CUDA graph and
  replayed (GPU time, host time per replay, and ``plan_us``, the host time of the plan before each replay),
  against the one-token decode replayed from a graph too (``decode_one_token_graph``, ``vs_decode_graph``);
* ``chunk``: a 2K-token chunk over a 32K-token history, batch 1 and 4, against PyTorch SDPA (fp16, flash or
  efficient backend, the lower-right causal mask) over the same exact history (``vs_sdpa``; target 1.3x);
* ``chunked_prompt``: a 32K-token prompt in 2K chunks, each appended then attended, end to end (wall time after a
  warm-up pass, and host time per chunk), against SDPA over the exact prompt in one call (``sdpa_exact_us``) and
  chunk by chunk over the exact history (``sdpa_chunked_us``, the sum of the chunks' calls), with both caches'
  bytes; ``append``: through the wrapper's plan (``planned``) or ``cache.append`` per call;
* ``verify_step``: a speculative verification step over ``--layers`` layers (default 32) at 8 x 32K (or
  ``--context``), q = 2 to 16 drafts per sequence: one plan, then per layer the drafts' append and attention; wall,
  host and GPU time per step for each ``append`` way (``planned``, ``cache.append``, and ``graph``: the whole step
  captured in one CUDA graph, then a plan and one replay per step), against the attention alone
  (``attention_us``) and as many one-token decodes.

Each record names the regime BatchPrefillWrapper took (``path``: ``lut`` or ``tensor_core``).

    python bench/bench_prefill.py --out bench/results/prefill_h200.json [--quick] [--only verify chunk chunked_prompt verify_step]
        [--M 64 32 16] [--context 32768] [--queries 2 4 8 16 32 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402
from bench_decode import D, NH, NH_K, build_cache  # noqa: E402

TIMING = {"queued": 3, "repeats": 5, "warmup": 1}
SUITES = ("verify", "chunk", "chunked_prompt", "verify_step")


def random_queries(cp, n, seed=3):
    """``n`` query rows ``(n, NH, D)`` of standard normal float16 values."""
    return cp.random.default_rng(seed).standard_normal((n, NH, D), dtype=cp.float32).astype(cp.float16)


def bench_verify(cp, M, batch, context, counts) -> list[dict]:
    from million_cupy import BatchDecodeWrapper, BatchPrefillWrapper
    from million_cupy.prefill import BACKENDS

    cache, seqs = build_cache(cp, batch, context, M, spare_tokens=max(counts))
    decode = BatchDecodeWrapper(cache, num_heads=NH)
    decode.plan(seqs, new_tokens=0)
    q1, o1 = random_queries(cp, batch), cp.empty((batch, NH, D), dtype=cp.float16)
    base = harness.time_gpu(lambda: decode.run(0, q1, out=o1, check=False), **TIMING)["median_us"]
    base_graph = _decode_graph_us(cp, cache, seqs, batch)
    records = [{"suite": "prefill", "method": "decode_one_token", "batch": batch, "context": context, "M": M,
                "queries_per_seq": 1, "median_us": base},
               {"suite": "prefill", "method": "decode_one_token_graph", "batch": batch, "context": context, "M": M,
                "queries_per_seq": 1, "median_us": base_graph}]
    for c in counts:
        ind = np.arange(batch + 1) * c
        q, o = random_queries(cp, batch * c), cp.empty((batch * c, NH, D), dtype=cp.float16)
        for backend in BACKENDS:
            prefill = BatchPrefillWrapper(cache, NH, backend=backend)
            prefill.plan(seqs, ind, appended=True)  # the last c tokens of the history are the "new" ones
            t = harness.time_gpu(lambda: prefill.run(0, q, out=o), **TIMING)["median_us"]
            host = harness.time_host(lambda: prefill.run(0, q, out=o), calls=100, repeats=3)
            records.append({"suite": "prefill", "method": "verify", "batch": batch, "context": context, "M": M,
                            "queries_per_seq": c, "backend": backend, "median_us": t, "vs_decode": t / base,
                            "host_us": host, "path": _path(prefill)})
        if c * NH // NH_K <= 32:  # a speculative verification step that a CUDA graph can capture
            records.append(_verify_graph(cp, cache, seqs, ind, q, o, base, base_graph)
                           | {"batch": batch, "context": context, "M": M, "queries_per_seq": c})
    return records


def _decode_graph_us(cp, cache, seqs, batch) -> float:
    """GPU time of the one-token decode captured in a CUDA graph and replayed (the baseline of verify_graph)."""
    from million_cupy import BatchDecodeWrapper

    stream = cp.cuda.Stream(non_blocking=True)
    decode = BatchDecodeWrapper(cache, num_heads=NH, stream=stream)
    q, o = random_queries(cp, batch), cp.empty((batch, NH, D), dtype=cp.float16)
    with stream:
        decode.plan(seqs, new_tokens=0)
        graph = _captured(stream, lambda: decode.run(0, q, out=o, check=False))
        return harness.time_gpu(lambda: graph.launch(stream), **TIMING)["median_us"]


def _captured(stream, run):
    """``run()`` once eagerly (it compiles outside the capture), then captured on ``stream``: the CUDA graph."""
    run()
    stream.begin_capture()
    run()
    return stream.end_capture()


def _verify_graph(cp, cache, seqs, ind, q, o, base, base_graph) -> dict:
    """The ``auto`` rule's run captured in a CUDA graph on a non-blocking stream: GPU time and host time per
    replay, and the host time of the plan a verification loop makes before each replay."""
    from million_cupy import BatchPrefillWrapper

    stream = cp.cuda.Stream(non_blocking=True)
    prefill = BatchPrefillWrapper(cache, NH, stream=stream)
    with stream:
        prefill.plan(seqs, ind, appended=True)
        graph = _captured(stream, lambda: prefill.run(0, q, out=o))
        t = harness.time_gpu(lambda: graph.launch(stream), **TIMING)["median_us"]
        host = harness.time_host(lambda: graph.launch(stream), calls=100, repeats=3)
        plan = harness.time_host(lambda: prefill.plan(seqs, ind, appended=True), calls=20, repeats=3)
    return {"suite": "prefill", "method": "verify_graph", "backend": "auto", "median_us": t, "vs_decode": t / base,
            "vs_decode_graph": t / base_graph, "host_us": host, "plan_us": plan, "path": _path(prefill)}


def _path(wrapper) -> str:
    """The regime the wrapper's last plan took (``tensor_core``: dequantized on chip, as recorded before the
    dense regime existed)."""
    return {"lut": "lut", "tensor_cores": "tensor_core", "dense": "dense"}[wrapper.regime]


def _sdpa_us(torch, batch, q_len, kv_len) -> float:
    from torch.nn.attention.bias import causal_lower_right

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, NH, q_len, D, device="cuda", dtype=torch.float16, generator=g)
    k = torch.randn(batch, NH_K, kv_len, D, device="cuda", dtype=torch.float16, generator=g)
    v = torch.randn_like(k)
    k, v = k.repeat_interleave(NH // NH_K, 1), v.repeat_interleave(NH // NH_K, 1)
    mask = causal_lower_right(q_len, kv_len)
    f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    for _ in range(2):
        f()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        f()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e3)
    return float(np.median(times))


def bench_chunk(cp, torch, M, batch, history, chunk) -> list[dict]:
    from million_cupy import BatchPrefillWrapper

    cache, seqs = build_cache(cp, batch, history + chunk, M)  # the chunk's tokens are the history's last ones
    q, o = random_queries(cp, batch * chunk), cp.empty((batch * chunk, NH, D), dtype=cp.float16)
    s = _sdpa_us(torch, batch, chunk, history + chunk) if torch is not None else None
    records = []
    for backend in ("auto", "tensor_cores"):  # the rule's regime (dense), and the on-chip kernel (no workspace)
        prefill = BatchPrefillWrapper(cache, NH, backend=backend)
        prefill.plan(seqs, np.arange(batch + 1) * chunk, appended=True)
        t = harness.time_gpu(lambda: prefill.run(0, q, out=o), queued=1, repeats=3, warmup=1)["median_us"]
        rec = {"suite": "prefill", "method": "chunk", "batch": batch, "context": history, "M": M,
               "queries_per_seq": chunk, "backend": backend, "median_us": t, "path": _path(prefill),
               "workspace_bytes": prefill.workspace_bytes}
        if s is not None:
            rec.update({"sdpa_us": s, "vs_sdpa": t / s})
        records.append(rec)
    return records


def _append_with(mode, cache, prefill, layer, seqs, k, v, counts):
    """The new tokens of ``layer``: through the wrapper's plan (``planned``: one launch, no sync) or
    ``cache.append`` (index math per call, and for several tokens per sequence its finite check's device sync)."""
    if mode == "planned":
        prefill.append(layer, k, v)
    else:
        cache.append(layer, seqs, k, v, lengths=counts)


def bench_chunked_prompt(cp, torch, M, prompt, chunk) -> list[dict]:
    """A prompt appended and attended chunk by chunk (one layer), after a warm-up pass over a sequence freed
    after it: wall time of the whole prompt, and host time per chunk (plan, append and run calls). With one layer a
    chunk's page reservation waits for the previous reservation's copy, queued before the previous chunk's launches,
    so ``host_us_per_chunk`` counts that wait for the GPU too, not only host work."""
    from million_cupy import BatchPrefillWrapper

    cache, (empty,) = build_cache(cp, 1, 0, M, spare_tokens=prompt)
    cache.free(empty)  # each pass takes a sequence of its own
    rng = cp.random.default_rng(5)
    k = rng.standard_normal((chunk, NH_K, D), dtype=cp.float32).astype(cp.float16)
    q = random_queries(cp, chunk)
    o = cp.empty_like(q)
    prefill = BatchPrefillWrapper(cache, NH)
    stream = cp.cuda.get_current_stream()
    records = []
    for mode in ("planned", "cache.append"):
        for timed in (False, True):
            seq = cache.add_sequence()
            stream.synchronize()
            host = 0.0
            t0 = time.perf_counter()
            for _ in range(prompt // chunk):
                h = time.perf_counter()
                prefill.plan([seq], [0, chunk])
                _append_with(mode, cache, prefill, 0, [seq], k, k, [chunk])
                prefill.run(0, q, out=o)
                host += time.perf_counter() - h
            stream.synchronize()
            wall = (time.perf_counter() - t0) * 1e6
            stats = cache.stats()
            cache.free(seq)
        records.append({"suite": "prefill", "method": "chunked_prompt", "batch": 1, "context": prompt, "M": M,
                        "queries_per_seq": chunk, "append": mode, "wall_us": wall,
                        "host_us_per_chunk": host * 1e6 / (prompt // chunk),
                        "pq_bytes_per_token": float(2 * NH_K * M), "fp16_bytes_per_token": float(2 * NH_K * D * 2),
                        "pages_used": stats.get("used"), "workspace_bytes": prefill.workspace_bytes,
                        "path": _path(prefill)})
    if torch is not None:
        exact = _sdpa_us(torch, 1, prompt, prompt)
        chunked = sum(_sdpa_us(torch, 1, chunk, end) for end in range(chunk, prompt + 1, chunk))
        for rec in records:
            rec.update(sdpa_exact_us=exact, sdpa_chunked_us=chunked)
    return records


def bench_verify_step(cp, M, batch, context, counts, layers, steps=20) -> list[dict]:
    """A speculative verification step of ``layers`` layers: one plan, then per layer the drafts' append and their
    attention, as a serving loop runs it (the history grows by the drafts every step). Per step: wall time
    (``median_us``, synchronised at its end), the host time of its calls (``host_us``) and the GPU time between
    events around it (``gpu_us``), against the same step's attention alone with the drafts already appended
    (``attention_us``) and ``layers`` one-token decodes (``decode_us``), for each way of appending (``append``):
    ``planned`` (wrapper.append), ``cache.append``, and ``graph`` (the whole step, appends and runs, captured once
    in a CUDA graph; each step is then ``plan`` and one replay). Everything runs on the cache's non-blocking
    stream, which a capture needs."""
    from million_cupy import BatchDecodeWrapper, BatchPrefillWrapper

    records = []
    warmup = 3
    modes = ("planned", "cache.append", "graph", "attention only")
    # the three append ways grow the histories; the graph's wrapper takes two more steps (compile, capture)
    grown = sum((3 * (warmup + steps) + 2) * c for c in counts)  # (more than q = 16's two ways need)
    stream = cp.cuda.Stream(non_blocking=True)
    cache, seqs = build_cache(cp, batch, context, M, layers=layers, spare_tokens=grown, stream=stream)
    with stream:
        decode = BatchDecodeWrapper(cache, num_heads=NH, stream=stream)
        decode.plan(seqs, new_tokens=0)
        q1, o1 = random_queries(cp, batch), cp.empty((batch, NH, D), dtype=cp.float16)
        one = harness.time_gpu(lambda: decode.run(0, q1, out=o1, check=False), **TIMING)["median_us"]
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    for c in counts:
        ind = np.arange(batch + 1) * c
        with stream:
            q, o = random_queries(cp, batch * c), cp.empty((batch * c, NH, D), dtype=cp.float16)
            k = cp.random.default_rng(7).standard_normal((batch * c, NH_K, D), dtype=cp.float32).astype(cp.float16)
        prefill = BatchPrefillWrapper(cache, NH, stream=stream)
        graphed = BatchPrefillWrapper(cache, NH, stream=stream)
        capturable = c * NH // NH_K <= 32  # verify_attention or the LUT path; longer chunks refuse a capture

        def layers_of(wrapper, mode):
            for layer in range(layers):
                if mode != "attention only":
                    _append_with(mode, cache, wrapper, layer, seqs, k, k, [c] * batch)
                wrapper.run(layer, q, out=o)

        with stream:
            for _ in range(2 if capturable else 0):  # compiles outside the capture, then captures the whole step
                graphed.plan(seqs, ind)
                if graphed.stats()["plans"] == 1:
                    layers_of(graphed, "planned")
                else:
                    stream.begin_capture()
                    layers_of(graphed, "planned")
                    graph = stream.end_capture()
                    graph.launch(stream)

        def step(mode):
            h = time.perf_counter()
            start.record(stream)
            if mode == "graph":
                graphed.plan(seqs, ind)  # counts the appends: the replay writes them
                graph.launch(stream)
            else:
                prefill.plan(seqs, ind, appended=mode == "attention only")
                layers_of(prefill, mode)
            host = time.perf_counter() - h
            stop.record(stream)
            stop.synchronize()
            return (time.perf_counter() - h) * 1e6, host * 1e6, cp.cuda.get_elapsed_time(start, stop) * 1e3

        timings = {}
        with stream:
            for mode in modes if capturable else [m for m in modes if m != "graph"]:
                for _ in range(warmup):
                    step(mode)
                stream.synchronize()
                timings[mode] = np.median(np.asarray([step(mode) for _ in range(steps)]), axis=0)
        for mode, (wall, host, gpu) in timings.items():
            records.append({"suite": "prefill", "method": "verify_step", "batch": batch, "context": context, "M": M,
                            "queries_per_seq": c, "layers": layers, "append": mode, "median_us": float(wall),
                            "host_us": float(host), "gpu_us": float(gpu),
                            "attention_us": float(timings["attention only"][0]), "decode_us": one * layers,
                            "vs_attention": float(wall / timings["attention only"][0]), "path": _path(prefill)})
        assert graphed.stats()["graph_append_plans"] == (warmup + steps if capturable else 0)
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/prefill_<gpu>.json)")
    p.add_argument("--quick", action="store_true", help="smaller shapes: 2 x 8K, a 512-token chunk over 8K")
    p.add_argument("--context", type=int, nargs="+", help="verify and verify_step records: history lengths "
                   "(default 32768; 8192 with --quick)")
    p.add_argument("--queries", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64],
                   help="verify records: new tokens per sequence (default 2 4 8 16 32 64)")
    p.add_argument("--layers", type=int, default=32, help="verify_step records: layers per step (default 32)")
    p.add_argument("--only", choices=SUITES, nargs="+", default=list(SUITES), help="which records to measure")
    p.add_argument("--M", type=int, nargs="+", default=[64, 32], choices=(16, 32, 64),
                   help="PQ subspaces (16: 16-byte centroids at d = 128)")
    args = p.parse_args(argv)
    if 16 in args.M and "verify" in args.only:
        p.error("--M 16: the verify records need M = 64 or 32 (verify_attention takes 2 or 4 dims per subspace); "
                "add --only chunk")
    harness.require_gpu("prefill")
    import cupy as cp

    try:
        import torch
    except ImportError:
        torch = None
    ctx = 8192 if args.quick else 32768
    records = []
    for M in args.M:
        if "verify" in args.only:
            for context in args.context or [ctx]:
                records += bench_verify(cp, M, 2 if args.quick else 8, context, args.queries)
        if "chunk" in args.only:
            for batch in (1, 4):
                records += bench_chunk(cp, torch, M, batch, ctx, 512 if args.quick else 2048)
        if "chunked_prompt" in args.only:
            records += bench_chunked_prompt(cp, torch, M, ctx, 512 if args.quick else 2048)
        if "verify_step" in args.only:
            for context in args.context or [ctx]:
                records += bench_verify_step(cp, M, 2 if args.quick else 8, context,
                                             [c for c in args.queries if c <= 16], args.layers)
        cp.get_default_memory_pool().free_all_blocks()
    gpu = harness.gpu_name().split()[-1].lower()
    out = args.out or Path(__file__).resolve().parent / "results" / f"prefill_{gpu}.json"
    harness.write_results(out, records)
    print(f"wrote {out}")
    for r in records:
        print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
