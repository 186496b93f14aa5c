"""The whole decode step: 32 layers of append + attention, eager and CUDA-graph replayed, against PyTorch.

Shape: Llama-3.1-8B attention (32 layers, 32 query heads over 8 kv heads, d = 128), page 64, window 128,
float16, M = 64 and 32. One step = ``DecodeStep.plan`` + 32 × (``append`` one token per sequence +
``run``), synchronised once per step, over ``--steps`` consecutive steps (256: every sequence flushes
4 times). Per shape and method:

* ``step_p50_us`` / ``step_p99_us`` / ``step_max_us``: wall time of each step from the first host call to the
  end of its synchronisation (what a serving loop that waits once per step sees);
* ``gpu_us``: GPU time of the same step's kernels, replayed back to back from a graph (no host in the way);
* ``host_us``: host time of the step's calls before the synchronisation; ``plan_us`` / ``plan_max_us`` (median
  and max: the max is the plan that reserves pages) and, for the eager PQ step, ``host_per_layer_us`` (append +
  attention of one layer in one call, ``run(layer, q, out=, k=, v=)``, on per-layer arrays made before the loop,
  as a model's buffers are: from the second step on, one launch of the layer's graph); the graph record's
  ``append_host_us`` / ``attention_host_us`` are the two separate calls and ``one_call_host_us`` the one call;
* ``plan_ahead_us`` / ``ahead_step_p50_us``: the same loop again with each plan made for the next step right
  after a step's launches, while its kernels run (vLLM's asynchronous scheduling), instead of after the
  synchronisation.

Baselines in the same run: PyTorch fp16 with a static per-layer buffer, ``index_copy_`` of the new token
and SDPA on the flash backend (eager over the growing length; graph-captured over the fixed full buffer,
since a captured shape cannot grow), and this library's own fp16 paged mode (an exact ``PagedPQCache``,
``codebooks=None``) through the same ``DecodeStep``, eager and graph-replayed while its sequences grow
(``paged_exact_eager`` / ``paged_exact_graph``; ``M`` None).

    python bench/bench_step.py --out bench/results/step_h200.json [--shapes 1x4096,8x32768] [--steps 256]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402
from bench_decode import D, NH, NH_K, build_cache, planned_paged_pq  # noqa: E402

L = 32  # Llama-3.1-8B's layers
SHAPES = ((1, 4096), (1, 32768), (1, 131072), (8, 32768), (32, 4096))
WARMUP = 16


def _percentiles(wall: list[float]) -> dict:
    w = np.asarray(wall) * 1e6
    return {"step_p50_us": float(np.median(w)), "step_p99_us": float(np.percentile(w, 99)),
            "step_max_us": float(w.max()), "steps": int(w.size)}


def _plan_stats(plan_times: list[float]) -> dict:
    """Median and max host time of ``plan`` over the timed steps (the max is the page-reserving plan)."""
    t = np.asarray(plan_times[WARMUP:]) * 1e6
    return {"plan_us": float(np.median(t)), "plan_max_us": float(t.max())}


def _timed_steps(fn, steps: int, sync) -> tuple[dict, float]:
    """Run ``fn`` (one whole step) ``WARMUP + steps`` times, synchronising after each; step wall times and the
    median host time of ``fn`` itself. The objects made while setting up are moved out of the garbage collector's
    view first (``gc.freeze``, as vLLM does once its model is loaded and captured), so that a collection in the
    loop scans only what the loop made; ``gc_collections`` counts those that ran in the timed steps."""
    gc.collect()
    gc.freeze()
    collections = [0]

    def count(phase, info):
        collections[0] += phase == "start"

    wall, host = [], []
    for i in range(WARMUP + steps):
        if i == WARMUP:
            gc.callbacks.append(count)
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        sync()
        t2 = time.perf_counter()
        if i >= WARMUP:
            wall.append(t2 - t0)
            host.append(t1 - t0)
    gc.callbacks.remove(count)
    gc.unfreeze()
    return {**_percentiles(wall), "gc_collections": collections[0]}, float(np.median(host) * 1e6)


def _planned_ahead(step, seqs, launch_step, steps: int, stream) -> dict:
    """The same loop with each step's ``plan`` made ahead, as vLLM's asynchronous scheduling does: right after
    the previous step's launches, while its kernels run, instead of after the synchronisation (where the host
    has just waited idle for the whole step). ``plan_ahead_us`` / ``plan_ahead_max_us``: that plan's host time;
    ``ahead_step_p50_us`` / ``ahead_step_p99_us``: the step's wall time in this loop."""
    plan_times = []

    def ahead():
        launch_step()
        t0 = time.perf_counter()
        step.plan(seqs)  # the next step's
        plan_times.append(time.perf_counter() - t0)

    step.plan(seqs)
    stats, _ = _timed_steps(ahead, steps, stream.synchronize)
    launch_step()  # the step planned last, so that every planned token is written
    stream.synchronize()
    t = _plan_stats(plan_times)
    return {"plan_ahead_us": t["plan_us"], "plan_ahead_max_us": t["plan_max_us"],
            "ahead_step_p50_us": stats["step_p50_us"], "ahead_step_p99_us": stats["step_p99_us"]}


def build(cp, batch, context, M, steps, stream):
    """A 32-layer GPU cache of ``batch`` sequences holding ``context`` random tokens, on ``stream``."""
    return build_cache(cp, batch, context, M, layers=L, spare_tokens=4 * (WARMUP + steps) + 512, stream=stream)


def bench_paged(cp, batch, context, M, steps) -> list[dict]:
    """The step through ``DecodeStep`` over a PQ cache of ``M`` subspaces, or (``M`` None) an exact one."""
    from million_cupy import DecodeStep

    mode = "paged_pq" if M is not None else "paged_exact"

    stream = cp.cuda.Stream(non_blocking=True)
    cache, seqs = build(cp, batch, context, M, steps, stream)
    rng = cp.random.default_rng(1)
    with stream:
        k = rng.standard_normal((L, batch, NH_K, D), dtype=cp.float32).astype(cp.float16)
        v = rng.standard_normal((L, batch, NH_K, D), dtype=cp.float32).astype(cp.float16)
        q = rng.standard_normal((L, batch, NH, D), dtype=cp.float32).astype(cp.float16)
        out = cp.empty_like(q)
    # Each layer's arrays made once, as a model's per-layer buffers are: slicing a CuPy array costs ~2 us of
    # host time per view, which is the caller's, not the step's.
    k_in, v_in, q_in, out_in = ([x[layer] for layer in range(L)] for x in (k, v, q, out))
    step = DecodeStep(cache, NH)
    plan_times, layer_times = [], []

    def eager():
        t0 = time.perf_counter()
        step.plan(seqs)
        t1 = time.perf_counter()
        for layer in range(L):
            step.run(layer, q_in[layer], out=out_in[layer], k=k_in[layer], v=v_in[layer])
        t2 = time.perf_counter()
        plan_times.append(t1 - t0)
        layer_times.append((t2 - t1) / L)

    def layers():
        for layer in range(L):
            step.run(layer, q_in[layer], out=out_in[layer], k=k_in[layer], v=v_in[layer])

    base = {"suite": "step", "batch": batch, "context": context, "M": M, "layers": L}
    eager_stats, eager_host = _timed_steps(eager, steps, stream.synchronize)
    records = [{**base, "method": f"{mode}_eager", **eager_stats, "host_us": eager_host,
                **_plan_stats(plan_times), "host_per_layer_us": float(np.median(layer_times[WARMUP:]) * 1e6),
                **_planned_ahead(step, seqs, layers, steps, stream)}]

    with stream:
        step.plan(seqs)
        stream.begin_capture()
        for layer in range(L):
            step.append(layer, k_in[layer], v_in[layer])
            step.run(layer, q_in[layer], out=out_in[layer])
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
        plan_times = []

        def replay():
            t0 = time.perf_counter()
            step.plan(seqs)
            plan_times.append(time.perf_counter() - t0)
            graph.launch(stream)

        graph_stats, graph_host = _timed_steps(replay, steps, stream.synchronize)
        graph_stats.update(_plan_stats(plan_times))
        graph_stats.update(_planned_ahead(step, seqs, lambda: graph.launch(stream), steps, stream))
        # The same step's kernels back to back (a replay without plan() repeats the step: idempotent).
        gpu = harness.time_gpu(lambda: graph.launch(stream), queued=10, repeats=9, warmup=2)
        parts = {}
        for name, body in (("append", lambda layer: step.append(layer, k_in[layer], v_in[layer])),
                           ("attention", lambda layer: step.run(layer, q_in[layer], out=out_in[layer]))):
            stream.begin_capture()
            for layer in range(L):
                body(layer)
            part = stream.end_capture()
            parts[f"{name}_gpu_per_layer_us"] = harness.time_gpu(lambda: part.launch(stream), queued=10,
                                                                 repeats=7, warmup=2)["median_us"] / L
            parts[f"{name}_host_us"] = harness.time_host(lambda: body(0), calls=300)
        # The eager loop's one call per layer (its per-layer graph) against the two calls above.
        parts["one_call_host_us"] = harness.time_host(
            lambda: step.run(0, q_in[0], out=out_in[0], k=k_in[0], v=v_in[0]), calls=300)
    step.check()
    records.append({**base, "method": f"{mode}_graph", **graph_stats, "host_us": graph_host,
                    "gpu_us": gpu["median_us"], **parts, "plans": step.stats()["plans"],
                    "reserves": step.stats()["reserves"], "schedules": step.stats()["schedules"]})
    records[0]["gpu_us"] = gpu["median_us"]
    del graph, step, cache
    cp.get_default_memory_pool().free_all_blocks()
    return records


def bench_decode_call(cp) -> list[dict]:
    """``million_cupy.decode`` repeated on one batch against ``BatchDecodeWrapper.run`` (1 × 4K, one layer).
    Host times are taken in alternating blocks of the two calls, so that both see the same host state."""
    import million_cupy as mc

    cache, seqs, wrapper, q, out = planned_paged_pq(cp, 1, 4096, 64)
    calls = {"run": lambda: wrapper.run(0, q, out=out, check=False), "decode": lambda: mc.decode(cache, 0, seqs, q, out=out)}
    blocks: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(9):
        for name, call in calls.items():
            blocks[name].append(harness.time_host(call, calls=300, repeats=1))
    run_host, decode_host = (float(np.median(blocks[name])) for name in calls)
    run_t = harness.time_gpu(lambda: wrapper.run(0, q, out=out, check=False), queued=20, repeats=9)
    decode_t = harness.time_gpu(lambda: mc.decode(cache, 0, seqs, q, out=out), queued=20, repeats=9)
    base = {"suite": "step", "batch": 1, "context": 4096, "M": 64, "layers": 1}
    return [{**base, "method": "run", "host_us": run_host, "median_us": run_t["median_us"]},
            {**base, "method": "decode_call", "host_us": decode_host, "median_us": decode_t["median_us"]}]


def bench_torch(batch, context, steps) -> list[dict]:
    """PyTorch fp16: static per-layer buffers, index_copy_ of the new token, SDPA on the flash backend."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device("cuda")
    cap = context + WARMUP + steps + 8
    kc = [torch.randn(batch, NH_K, cap, D, device=dev, dtype=torch.float16) for _ in range(L)]
    vc = [torch.randn(batch, NH_K, cap, D, device=dev, dtype=torch.float16) for _ in range(L)]
    new_k = torch.randn(L, batch, NH_K, 1, D, device=dev, dtype=torch.float16)
    q = torch.randn(L, batch, NH, 1, D, device=dev, dtype=torch.float16)
    base = {"suite": "step", "batch": batch, "context": context, "M": None, "layers": L}
    pos = [context]

    def attend(qq, kk, vv):
        return F.scaled_dot_product_attention(qq, kk, vv, enable_gqa=True)

    def eager():
        n = pos[0]
        idx = torch.tensor([n], device=dev)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            for layer in range(L):
                kc[layer].index_copy_(2, idx, new_k[layer])
                vc[layer].index_copy_(2, idx, new_k[layer])
                attend(q[layer], kc[layer][:, :, : n + 1], vc[layer][:, :, : n + 1])
        pos[0] += 1

    records = []
    eager_stats, host = _timed_steps(eager, steps, torch.cuda.synchronize)
    records.append({**base, "method": "torch_fp16_eager", **eager_stats, "host_us": host})

    # Graph: a captured shape cannot grow, so attention runs over the whole fixed buffer (cap tokens).
    fixed = [t[:, :, :context] for t in kc], [t[:, :, :context] for t in vc]
    idx = torch.tensor([context - 1], device=dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        for _ in range(2):
            for layer in range(L):
                attend(q[layer], fixed[0][layer], fixed[1][layer])
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        for layer in range(L):
            kc[layer].index_copy_(2, idx, new_k[layer])
            vc[layer].index_copy_(2, idx, new_k[layer])
            attend(q[layer], fixed[0][layer], fixed[1][layer])
    graph_stats, host = _timed_steps(graph.replay, steps, torch.cuda.synchronize)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    per = []
    for _ in range(9):
        start.record()
        for _ in range(10):
            graph.replay()
        stop.record()
        stop.synchronize()
        per.append(start.elapsed_time(stop) * 1e3 / 10)
    records.append({**base, "method": "torch_fp16_graph", **graph_stats, "host_us": host,
                    "gpu_us": float(np.median(per))})
    del kc, vc, graph
    torch.cuda.empty_cache()
    return records


def judge(records: list[dict]) -> list[dict]:
    """The issue's targets, per shape and M, from the records of this run."""
    out = []
    by = {(r["batch"], r["context"], r["M"], r["method"]): r for r in records}
    for (b, ctx, M, method), r in by.items():
        if method != "paged_pq_graph":
            continue
        eager = by[(b, ctx, M, "paged_pq_eager")]
        t_eager, t_graph = by.get((b, ctx, None, "torch_fp16_eager")), by.get((b, ctx, None, "torch_fp16_graph"))
        p50 = r["step_p50_us"]
        row = {"suite": "step", "method": "targets", "batch": b, "context": ctx, "M": M,
               "graph_vs_gpu": p50 / r["gpu_us"],
               "graph_le_1.1gpu_plus_20us": p50 <= 1.1 * r["gpu_us"] + 20,
               "eager_host_per_layer_le_12us": eager["host_per_layer_us"] <= 12,
               "plan_le_60us": eager["plan_us"] <= 60,
               # The graph loop's plan is the same call; the issue states the budget for eager steps.
               "graph_plan_le_60us": r["plan_us"] <= 60,
               "plan_ahead_le_60us": max(eager["plan_ahead_us"], r["plan_ahead_us"]) <= 60,
               "graph_p99_le_1.3p50": r["step_p99_us"] <= 1.3 * p50,
               "graph_max_le_2p50": r["step_max_us"] <= 2 * p50,
               "eager_p99_le_1.3p50": eager["step_p99_us"] <= 1.3 * eager["step_p50_us"],
               "eager_max_le_2p50": eager["step_max_us"] <= 2 * eager["step_p50_us"]}
        if b == 1 and ctx == 4096:
            row["graph_1x4k_le_700us"] = p50 <= 700
        if t_eager:
            row["eager_vs_torch_eager"] = eager["step_p50_us"] / t_eager["step_p50_us"]
            row["eager_le_torch_eager"] = eager["step_p50_us"] <= t_eager["step_p50_us"]
        if t_eager and t_graph and ctx >= 8192:
            best = min(t_eager["step_p50_us"], t_graph["step_p50_us"])
            row["graph_vs_best_torch"] = p50 / best
            row["graph_lt_both_torch"] = p50 < best
        exact, exact_eager = by.get((b, ctx, None, "paged_exact_graph")), by.get((b, ctx, None, "paged_exact_eager"))
        if exact:
            row["graph_vs_exact_paged_graph"] = p50 / exact["step_p50_us"]
        if exact_eager:
            row["eager_vs_exact_paged_eager"] = eager["step_p50_us"] / exact_eager["step_p50_us"]
        out.append(row)
    calls = {r["method"]: r for r in records if r["layers"] == 1}
    if calls:
        out.append({"suite": "step", "method": "targets", "batch": 1, "context": 4096, "M": 64,
                    "decode_vs_run_host": calls["decode_call"]["host_us"] / calls["run"]["host_us"],
                    "decode_le_1.5run": calls["decode_call"]["host_us"] <= 1.5 * calls["run"]["host_us"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/step.json")
    ap.add_argument("--shapes", default=",".join(f"{b}x{c}" for b, c in SHAPES), help="BxCONTEXT,...")
    ap.add_argument("--M", default="64,32")
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch baselines")
    args = ap.parse_args()
    harness.require_gpu("step")
    import cupy as cp

    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    records: list[dict] = []
    for batch, context in shapes:
        for M in (int(m) for m in args.M.split(",")):
            records += bench_paged(cp, batch, context, M, args.steps)
            print(f"{batch}x{context} M={M}: " + ", ".join(
                f"{r['method']} p50 {r['step_p50_us']:.0f} us" for r in records[-2:]), flush=True)
        records += bench_paged(cp, batch, context, None, args.steps)
        print(f"{batch}x{context} exact: " + ", ".join(
            f"{r['method']} p50 {r['step_p50_us']:.0f} us" for r in records[-2:]), flush=True)
        if not args.no_torch:
            try:
                records += bench_torch(batch, context, args.steps)
            except Exception as exc:  # noqa: BLE001 - a baseline that cannot run is recorded, not fatal
                records.append({"suite": "step", "method": "torch_fp16_eager", "batch": batch, "context": context,
                                "M": None, "layers": L, "error": f"{type(exc).__name__}: {exc}"[:300]})
    records += bench_decode_call(cp)
    records += judge([r for r in records if "error" not in r])
    harness.write_results(args.out, records)
    cols = ["method", "batch", "context", "M", "step_p50_us", "step_p99_us", "step_max_us", "gpu_us", "host_us",
            "plan_us", "plan_ahead_us", "host_per_layer_us"]
    print(harness.table([r for r in records if r["method"] != "targets"], cols))
    for r in records:
        if r["method"] == "targets":
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k not in ("suite",)})


if __name__ == "__main__":
    main()
