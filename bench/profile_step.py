"""Where a decode step's host time goes: per-call costs of the eager path and the plan's slow jobs.

    python bench/profile_step.py [--shapes 1x4096,8x32768] [--M 64] [--horizon 64] [--out profile_step.json]

Runs ``DecodeStep`` plan + 32 × (append + run) for ``--steps`` steps with a short ``--horizon`` (many page
reservations and schedules to sample), timing the public calls a plan makes (``PagedPQCache.ensure_capacity`` /
``check_ids`` / ``advance``, ``PageAllocator.alloc_scratch``, ``AttentionPlan.update`` / ``schedule``) with
wrappers while plans run, then the per-call cost of a bound launch, of ``append`` / ``run`` with the layer's
last arrays (the identity fast path) and with fresh views, and of slicing a CuPy array. Prints JSON (and
writes it with ``--out``): medians and maxima in microseconds.

docs/perf-notes.md session 10's breakdown came from the probe this script was made from; this form ran on an H200
on 2026-12-03 (bench/results/profile_step_h200.json). Its plan medians (97-121 us) are not the step's: the
wrappers, the short horizon and no ``gc.freeze`` make every plan slower; bench/bench_step.py measures the plan.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402
from bench_step import L, build  # noqa: E402

TIMED = (("cache", "ensure_capacity"), ("cache", "check_ids"), ("cache", "advance"), ("allocator", "alloc_scratch"),
         ("plan", "update"), ("plan", "schedule"))


def _wrap(owner, name: str, label: str, samples: dict, active: list) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if active[0]:
                samples[label].append((time.perf_counter() - t0) * 1e6)

    setattr(owner, name, timed)


def per_call(stream, fn, calls: int = 1000) -> float:
    stream.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = (time.perf_counter() - t0) / calls * 1e6
    stream.synchronize()
    return elapsed


def profile(cp, batch: int, context: int, M: int, horizon: int, steps: int) -> dict:
    from million_cupy import DecodeStep, PagedPQCache
    from million_cupy.allocator import PageAllocator
    from million_cupy.decode import AttentionPlan

    samples: dict[str, list[float]] = collections.defaultdict(list)
    active = [False]
    owners = {"cache": PagedPQCache, "allocator": PageAllocator, "plan": AttentionPlan}
    originals = [(owners[o], n, getattr(owners[o], n)) for o, n in TIMED]
    for o, n in TIMED:
        _wrap(owners[o], n, f"{owners[o].__name__}.{n}", samples, active)
    try:
        stream = cp.cuda.Stream(non_blocking=True)
        cache, seqs = build(cp, batch, context, M, steps, stream)
        rng = cp.random.default_rng(1)
        with stream:
            k = rng.standard_normal((L, batch, cache.num_kv_heads, cache.head_dim), dtype=cp.float32).astype(cp.float16)
            v = k.copy()
            q = rng.standard_normal((L, batch, 32, cache.head_dim), dtype=cp.float32).astype(cp.float16)
            out = cp.empty_like(q)
        k_in, v_in, q_in, out_in = ([x[layer] for layer in range(L)] for x in (k, v, q, out))
        step = DecodeStep(cache, 32, horizon=horizon)
        plans, layers = [], []
        with stream:
            for i in range(steps):
                active[0] = i >= 16
                t0 = time.perf_counter()
                step.plan(seqs)
                t1 = time.perf_counter()
                active[0] = False
                for layer in range(L):
                    step.append(layer, k_in[layer], v_in[layer])
                    step.run(layer, q_in[layer], out=out_in[layer])
                t2 = time.perf_counter()
                stream.synchronize()
                if i >= 16:
                    plans.append((t1 - t0) * 1e6)
                    layers.append((t2 - t1) * 1e6 / L)
            step.check()
            calls = {
                "slice_view_us": lambda: k[0],
                "append_same_arrays_us": lambda: step.append(0, k_in[0], v_in[0]),
                "run_same_arrays_us": lambda: step.run(0, q_in[0], out=out_in[0]),
                "append_fresh_views_us": lambda: step.append(0, k[0], v[0]),
                "run_fresh_views_us": lambda: step.run(0, q[0], out=out[0]),
            }
            costs = {name: per_call(stream, fn, 300 if "run" in name else 1000) for name, fn in calls.items()}
        p = np.asarray(plans)
        return {"suite": "profile_step", "method": "paged_pq_eager", "batch": batch, "context": context, "M": M,
                "horizon": horizon, "plan_us": float(np.median(p)), "plan_max_us": float(p.max()),
                "plan_top8_us": sorted(round(x) for x in p)[-8:], "host_per_layer_us": float(np.median(layers)),
                **costs, "reserves": step.stats()["reserves"], "schedules": step.stats()["schedules"],
                "calls": {label: {"n": len(v), "median_us": round(float(np.median(v)), 1),
                                  "max_us": round(float(np.max(v)), 1)} for label, v in samples.items()}}
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1x4096,8x32768", help="BxCONTEXT,...")
    ap.add_argument("--M", type=int, default=64)
    ap.add_argument("--horizon", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1300)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    harness.require_gpu("profile_step")
    import cupy as cp

    records = []
    for shape in args.shapes.split(","):
        batch, context = (int(x) for x in shape.split("x"))
        records.append(profile(cp, batch, context, args.M, args.horizon, args.steps))
        print(json.dumps(records[-1], indent=1), flush=True)
        cp.get_default_memory_pool().free_all_blocks()
    if args.out:
        harness.write_results(args.out, records)


if __name__ == "__main__":
    main()
