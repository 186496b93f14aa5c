"""Decode-attention speed: paged PQ vs contiguous PQ vs fp16 paged vs PyTorch SDPA (baseline, when installed).

Shapes (the kernels issue): nh = 32, nh_k = 8, d = 128, C = 256, page 64, residual window 128 (so 64–127
exact tokens), float16. Each method is timed the same way (bench/harness.py): GPU time with calls queued
back to back (median_us) and one call including its host launch (call_us).

    python bench/bench_decode.py --out bench/results/decode_<gpu>.json [--suite targets|grid|million]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402

from million_cupy.cache import full_pages  # noqa: E402

NH, NH_K, D, P, R = 32, 8, 128, 64, 128
TIMING: dict = {}  # harness.time_gpu options; --fast trades repeats for a shorter run


def _codebooks(cp, M, layers=1, seed=0):
    from million_cupy import Codebook, ModelCodebooks

    rng = cp.random.default_rng(seed)
    kc = [Codebook(rng.standard_normal((M, 256, D // M), dtype=cp.float32)) for _ in range(layers)]
    vc = [Codebook(rng.standard_normal((M, 256, D // M), dtype=cp.float32)) for _ in range(layers)]
    return ModelCodebooks(kc, vc)


def build_cache(cp, batch, context, M, layers=1, chunk=65536, spare_tokens=0, stream=None):
    """A GPU PagedPQCache holding ``batch`` sequences of ``context`` random tokens in every layer, with room
    for ``spare_tokens`` more per sequence, on ``stream`` (default: the current one). ``M`` None: an exact
    (fp16 paged) cache."""
    from million_cupy import PagedPQCache

    tokens = context + R + spare_tokens
    pages = batch * (-(-tokens // P) + 2)
    books = None if M is None else _codebooks(cp, M, layers)
    cache = PagedPQCache(layers, NH_K, D, books, page_size=P, residual=None if M is None else R, max_pages=pages,
                         max_seqs=batch, max_seq_len=tokens, dtype="float16", device="cuda", stream=stream)
    seqs = [cache.add_sequence() for _ in range(batch)]
    rng = cp.random.default_rng(1)
    # One random block of tokens, reused: decode speed does not depend on which codes are stored.
    block = min(chunk, context)
    with cache.stream:  # made on the stream that reads them (a non-blocking one does not wait for the default)
        k_all = rng.standard_normal((block, NH_K, D), dtype=cp.float32).astype(cp.float16)
        v_all = rng.standard_normal((block, NH_K, D), dtype=cp.float32).astype(cp.float16)
        for layer in range(layers):
            for s in seqs:
                done = 0
                while done < context:
                    n = min(block, context - done)
                    cache.append(layer, [s], k_all[:n], v_all[:n], lengths=[n])
                    done += n
        cache.stream.synchronize()
    return cache, seqs


def time_run_and_graph(cp, wrapper, q, out) -> dict:
    """run() of layer 0 timed by the harness, plus the same launch replayed from a CUDA graph: the kernel's
    own time where run()'s host cost would otherwise pace back-to-back calls (small contexts). host_us /
    host_checked_us: run()'s host time per call without / with its per-layer length check."""
    t = harness.time_gpu(lambda: wrapper.run(0, q, out=out, check=False), **TIMING)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        wrapper.run(0, q, out=out, check=False)
        graph = stream.end_capture()
        g = harness.time_gpu(lambda: graph.launch(stream), **TIMING)
    t.update(graph_gpu_us=g["median_us"], graph_call_us=g["call_us"],
             host_us=harness.time_host(lambda: wrapper.run(0, q, out=out, check=False)),
             host_checked_us=harness.time_host(lambda: wrapper.run(0, q, out=out)))
    return t


def planned_paged_pq(cp, batch, context, M):
    """The paged-PQ benchmark shape ready to run: (cache, seqs, planned wrapper, q, out) for layer 0."""
    from million_cupy import BatchDecodeWrapper

    cache, seqs = build_cache(cp, batch, context, M)
    wrapper = BatchDecodeWrapper(cache, num_heads=NH)
    wrapper.plan(seqs, new_tokens=0)
    q = cp.random.default_rng(2).standard_normal((batch, NH, D), dtype=cp.float32).astype(cp.float16)
    return cache, seqs, wrapper, q, cp.empty_like(q)


def bench_paged_pq(cp, batch, context, M):
    cache, seqs, wrapper, q, out = planned_paged_pq(cp, batch, context, M)
    t = time_run_and_graph(cp, wrapper, q, out)
    main = full_pages(cache.seq_lens(0, seqs), P, R) * P
    return t, float(NH_K * 2 * M * main.sum()), wrapper.stats()["work_items"]


def bench_paged_pq_pages(cp, batch, context, M):
    """The paged kernel over caller-managed pages (prepare_paged_pq_decode): no PagedPQCache needed."""
    from million_cupy.cache import pack_pages
    from million_cupy.decode import prepare_paged_pq_decode

    rng = cp.random.default_rng(6)
    main = int(full_pages(context, P, R)) * P
    npages = main // P
    kp, vp = pack_pages(*rng.integers(0, 256, (2, max(1, batch * npages), NH_K, P, M), dtype=cp.uint8))
    indptr = np.arange(batch + 1, dtype=np.int32) * npages
    indices = cp.asarray(np.random.default_rng(7).permutation(max(1, batch * npages)).astype(np.int32))
    kc = rng.standard_normal((1, M, 256, D // M), dtype=cp.float32)
    vc = rng.standard_normal((1, M, 256, D // M), dtype=cp.float32)
    rk = rng.standard_normal((batch, NH_K, R, D), dtype=cp.float32).astype(cp.float16)
    rv = rng.standard_normal((batch, NH_K, R, D), dtype=cp.float32).astype(cp.float16)
    q = rng.standard_normal((batch, NH, D), dtype=cp.float32).astype(cp.float16)
    launch = prepare_paged_pq_decode(q, kp, vp, indptr, indices, kc, vc, residual_k=rk, residual_v=rv,
                                     residual_lens=np.full(batch, context - main))
    return harness.time_gpu(launch, **TIMING), float(batch * NH_K * 2 * M * main)


def bench_contiguous_pq(cp, batch, context, M):
    from million_cupy.decode import prepare_contiguous_pq_decode

    rng = cp.random.default_rng(3)
    main = int(full_pages(context, P, R)) * P
    res = context - main
    k = rng.integers(0, 256, (batch, NH_K, max(main, 1), M), dtype=cp.uint8)
    v = rng.integers(0, 256, (batch, NH_K, max(main, 1), M), dtype=cp.uint8)
    kc = rng.standard_normal((1, M, 256, D // M), dtype=cp.float32)
    vc = rng.standard_normal((1, M, 256, D // M), dtype=cp.float32)
    rk = rng.standard_normal((batch, NH_K, R, D), dtype=cp.float32).astype(cp.float16)
    rv = rng.standard_normal((batch, NH_K, R, D), dtype=cp.float32).astype(cp.float16)
    q = rng.standard_normal((batch, NH, D), dtype=cp.float32).astype(cp.float16)
    launch = prepare_contiguous_pq_decode(q, k, v, np.full(batch, main), kc, vc, residual_k=rk, residual_v=rv,
                                          residual_lens=np.full(batch, res))
    return harness.time_gpu(launch, **TIMING)


def bench_fp16_paged(cp, batch, context):
    from million_cupy.decode import prepare_paged_exact_decode

    rng = cp.random.default_rng(4)
    npages = -(-context // P)
    kp = rng.standard_normal((batch * npages, NH_K, P, D), dtype=cp.float32).astype(cp.float16)
    vp = rng.standard_normal((batch * npages, NH_K, P, D), dtype=cp.float32).astype(cp.float16)
    indptr = np.arange(batch + 1, dtype=np.int32) * npages
    indices = cp.asarray(np.random.default_rng(5).permutation(batch * npages).astype(np.int32))
    last = np.full(batch, context - (npages - 1) * P)
    q = rng.standard_normal((batch, NH, D), dtype=cp.float32).astype(cp.float16)
    launch = prepare_paged_exact_decode(q, kp, vp, indptr, indices, last)
    t = harness.time_gpu(launch, **TIMING)
    del kp, vp
    return t


def bench_torch_sdpa(batch, context):
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    q = torch.randn(batch, NH, 1, D, device="cuda", dtype=torch.float16)
    k = torch.randn(batch, NH_K, context, D, device="cuda", dtype=torch.float16)
    v = torch.randn(batch, NH_K, context, D, device="cuda", dtype=torch.float16)
    t = harness.time_gpu(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), **TIMING)
    del q, k, v
    torch.cuda.empty_cache()
    return t


def run_suite(shapes, Ms, methods, kv_heads=(8,)):
    import cupy as cp

    global NH_K  # the shape helpers above read it; one value per pass
    records = []
    bw = harness.copy_bandwidth_gbs()
    from tqdm import tqdm

    for NH_K, (batch, context) in tqdm([(h, sc) for h in kv_heads for sc in shapes], desc="decode shapes"):
        for method in methods:
            for M in (Ms if method in ("paged_pq", "paged_pq_pages", "contiguous_pq") else [None]):
                rec = {"suite": "decode", "method": method, "batch": batch, "context": context, "M": M,
                       "dtype": "float16", "nh": NH, "nh_k": NH_K, "d": D}
                if method == "paged_pq":
                    t, code_bytes, w = bench_paged_pq(cp, batch, context, M)
                    rec.update(t, work_items=w, code_bytes=code_bytes,
                               code_bw_frac=(code_bytes / (t["median_us"] * 1e-6) / 1e9) / bw)
                elif method == "paged_pq_pages":
                    t, code_bytes = bench_paged_pq_pages(cp, batch, context, M)
                    rec.update(t, code_bytes=code_bytes,
                               code_bw_frac=(code_bytes / (t["median_us"] * 1e-6) / 1e9) / bw)
                elif method == "contiguous_pq":
                    rec.update(bench_contiguous_pq(cp, batch, context, M))
                elif method == "fp16_paged":
                    rec.update(bench_fp16_paged(cp, batch, context))
                elif method == "torch_sdpa":
                    t = bench_torch_sdpa(batch, context)
                    if t is None:
                        continue
                    rec.update(t)
                records.append(rec)
                tqdm.write(f"  {method:14s} nh_k={NH_K:<2d} b={batch:<3d} ctx={context:<7d} M={M!s:4s} "
                           f"gpu={rec['median_us']:9.1f} us  call={rec['call_us']:9.1f} us")
                cp.get_default_memory_pool().free_all_blocks()
    return records, bw


# suite -> (shapes (batch, context), M values, methods[, kv head counts])
SUITES = {
    "kernels": ([(8, 32768), (1, 131072), (1, 4096), (32, 8192)], [32, 64],
                ["paged_pq_pages", "contiguous_pq", "fp16_paged", "torch_sdpa"]),
    "targets": ([(8, 32768), (1, 131072), (1, 4096), (1, 1024), (32, 8192)], [32, 64],
                ["paged_pq", "contiguous_pq", "fp16_paged", "torch_sdpa"]),
    "grid": ([(b, c) for b in (1, 8, 32) for c in (64, 128, 256, 1024, 4096, 16384, 32768, 131072)
              if b * c <= 32 * 32768], [32, 64], ["paged_pq", "contiguous_pq", "fp16_paged", "torch_sdpa"], (8, 16)),
}


def run_million(tokens: int = 1_000_000, layers: int = 32, M: int = 64) -> list[dict]:
    """A batch-1 cache of ``tokens`` tokens in a Llama-3.1-8B shape (32 layers x 8 kv heads x d = 128): does
    it fit, and how long does one decode step's attention over all layers take?"""
    import cupy as cp

    from million_cupy import BatchDecodeWrapper

    free0, total = cp.cuda.runtime.memGetInfo()
    cache, seqs = build_cache(cp, 1, tokens, M, layers=layers)
    free1, _ = cp.cuda.runtime.memGetInfo()
    wrapper = BatchDecodeWrapper(cache, num_heads=NH)
    wrapper.plan(seqs, new_tokens=0)
    q = cp.random.default_rng(2).standard_normal((1, NH, D), dtype=cp.float32).astype(cp.float16)
    out = cp.empty_like(q)

    def step():
        for layer in range(layers):
            wrapper.run(layer, q, out=out, check=False)

    t = harness.time_gpu(step, queued=3, repeats=7)
    stats = cache.stats()
    return [{"suite": "million", "method": "paged_pq", "batch": 1, "context": tokens, "M": M, "dtype": "float16",
             "layers": layers, "nh": NH, "nh_k": NH_K, "d": D, **t, "per_layer_us": t["median_us"] / layers,
             "cache_gib": (free0 - free1) / 2**30, "card_gib": total / 2**30, "pages_used": stats["used"]}]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="targets", choices=sorted(SUITES) + ["million"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--fast", action="store_true", help="fewer repeats (10 queued calls x 7)")
    ap.add_argument("--kv-heads", type=int, nargs="+", help="override the suite's kv head counts")
    ap.add_argument("--methods", nargs="+", choices=["paged_pq", "paged_pq_pages", "contiguous_pq", "fp16_paged",
                                                     "torch_sdpa"], help="override the suite's methods")
    args = ap.parse_args(argv)
    harness.require_gpu("decode" if args.suite != "million" else "million")
    if args.fast:
        TIMING.update(queued=10, repeats=7)
    if args.suite == "million":
        records, bw = run_million(), None
        out = args.out or "bench/results/decode_million.json"
        harness.write_results(out, records)
        print(harness.table(records, ["method", "context", "layers", "median_us", "per_layer_us", "cache_gib"]))
        return 0
    shapes, Ms, methods, *kv = SUITES[args.suite]
    records, bw = run_suite(shapes, Ms, args.methods or methods, tuple(args.kv_heads or (kv[0] if kv else (8,))))
    base = {(r["nh_k"], r["batch"], r["context"]): r["median_us"] for r in records if r["method"] == "torch_sdpa"}
    for r in records:
        key = (r["nh_k"], r["batch"], r["context"])
        if key in base:
            r["speedup_vs_torch"] = base[key] / r["median_us"]
    out = args.out or f"bench/results/decode_{args.suite}.json"
    harness.write_results(out, records, {"copy_bandwidth_gbs": bw})
    print(f"\n{harness.gpu_name()}  copy bandwidth {bw:.0f} GB/s  -> {out}")
    print(harness.table(records, ["method", "batch", "context", "M", "median_us", "call_us", "speedup_vs_torch"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
