"""KV memory of PagedPQCache on a mixed-length trace, against a cache that reserves the maximum length.

    python bench/bench_memory.py --out bench/results/memory_<gpu>.json    # GPU, the shapes below
    python bench/bench_memory.py --cpu --out bench/results/memory_cpu.json  # CPU reference path, small shapes

Trace: ``--num-seqs`` sequences (256) with lengths drawn between ``--min-len`` (100) and ``--max-len``
(32768) tokens, uniformly (the primary trace) and log-uniformly; page 64, residual 128, nh_k 8, d 128,
M 64, one layer (every layer holds the same tokens, so ratios do not depend on the layer count).
Every sequence is filled with random fp16 tokens in one bulk append; the pool holds exactly the pages
the trace needs (``ceil(n / 64)`` blocks per sequence: codes are written at append, so the blocks under the
residual window are allocated too).

Per trace, per method (``paged_pq``: this cache; ``contiguous_fp16`` / ``contiguous_pq``: a cache that
reserves ``max_len`` tokens for every sequence, unquantized or as PQ codes):

* ``utilization``: paged, bytes of tokens stored (PQ codes of paged tokens + exact residual tokens)
  over bytes reserved (allocated pages + both residual rings of every slot); contiguous,
  ``tokens / (num_seqs * max_len)``.
* ``pool_utilization`` (paged only): code bytes of paged tokens over bytes of allocated pages.
* ``reserved_bytes`` and ``bytes_per_token`` (reserved bytes per stored token). ``contiguous_pq``
  counts codes only, without a residual window: a lower bound for a contiguous PQ cache.

Also the storage cost of one token: ``bytes_per_token`` of PQ codes and of fp16 (method ``pq_codes`` /
``fp16``, trace ``any``). JSON: ``gpu``, ``date``, ``command``, ``versions``, ``records`` (suite
"memory", trace, method, metric, value, unit, tokens), printed as a table last.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402

from million_cupy import Codebook, ModelCodebooks, PagedPQCache  # noqa: E402
from million_cupy.interop import cupy, gpu_available  # noqa: E402
from million_cupy.layout import blocks, full_pages  # noqa: E402

PAGE, RESIDUAL = 64, 128
GPU_SHAPES = dict(num_seqs=256, min_len=100, max_len=32768, nh_k=8, d=128, M=64)
CPU_SHAPES = dict(num_seqs=16, min_len=100, max_len=2048, nh_k=2, d=64, M=16)
TRACES = ("uniform", "loguniform")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/memory_<gpu>.json)")
    p.add_argument("--cpu", action="store_true", help="CPU reference path with small default shapes")
    p.add_argument("--num-seqs", type=int, help="sequences in the trace (default 256; 16 with --cpu)")
    p.add_argument("--min-len", type=int, help="shortest sequence (default 100)")
    p.add_argument("--max-len", type=int,
                   help="longest sequence, the contiguous reservation (default 32768; 2048 with --cpu)")
    p.add_argument("--traces", nargs="+", choices=TRACES, default=list(TRACES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-gib", type=float,
                   help="only compute the longest batch-1 context fitting this KV budget (Llama-3.1-8B shape)")
    args = p.parse_args(argv)
    shapes = dict(CPU_SHAPES if args.cpu else GPU_SHAPES)
    for key in ("num_seqs", "min_len", "max_len"):
        if getattr(args, key) is not None:
            shapes[key] = getattr(args, key)
    if not 1 <= shapes["min_len"] <= shapes["max_len"]:
        p.error(f"expected 1 <= --min-len <= --max-len, got {shapes['min_len']} and {shapes['max_len']}")
    if not args.cpu and not args.budget_gib and not gpu_available():
        p.error("no usable GPU: run with --cpu for the CPU reference path")
    args.shapes = shapes
    return args


def trace_lengths(kind: str, n: int, lo: int, hi: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "uniform":
        return rng.integers(lo, hi + 1, n)
    return np.exp(rng.uniform(np.log(lo), np.log(hi + 1), n)).astype(np.int64).clip(lo, hi)


def pages(n: np.ndarray) -> np.ndarray:
    """Full pages of sequences of ``n`` tokens (the flush rule)."""
    return full_pages(n, PAGE, RESIDUAL)


def allocated(n: np.ndarray) -> np.ndarray:
    """Blocks a sequence of ``n`` tokens holds: its codes are written at append (layout.blocks)."""
    return blocks(n, PAGE)


def measure(kind: str, lengths: np.ndarray, shapes: dict, gpu: bool, seed: int) -> tuple[list[dict], float]:
    """Fill a cache with the trace; return its records and the fill time in seconds."""
    nh_k, d, M, max_len = shapes["nh_k"], shapes["d"], shapes["M"], shapes["max_len"]
    xp = cupy() if gpu else np
    rng = np.random.default_rng(seed)

    def codebook():
        return Codebook(xp.asarray(rng.standard_normal((M, 256, d // M)).astype(np.float32)))

    cache = PagedPQCache(
        1, nh_k, d, ModelCodebooks([codebook()], [codebook()]), page_size=PAGE, residual=RESIDUAL,
        max_pages=max(1, int(allocated(lengths).sum())), max_seqs=len(lengths), max_seq_len=max_len,
        dtype="float16", device="cuda" if gpu else "cpu",
    )
    t0 = time.perf_counter()
    for n in lengths:
        s = cache.add_sequence()
        if gpu:
            k, v = (xp.random.standard_normal((int(n), nh_k, d), dtype=xp.float32).astype(xp.float16) for _ in "kv")
        else:
            k, v = (rng.standard_normal((int(n), nh_k, d)).astype(np.float16) for _ in "kv")
        cache.append(0, [s], k, v, [int(n)])
    if gpu:
        xp.cuda.get_current_stream().synchronize()
    fill_s = time.perf_counter() - t0

    st = cache.stats()
    tokens = int(lengths.sum())
    assert st["tokens"] == tokens and st["used"] == int(allocated(lengths).sum())
    code_bytes = st["bytes_per_token"]  # one layer
    exact_bytes = st["fp16_bytes_per_token"]
    paged_tokens = int((pages(lengths) * PAGE).sum())
    stored = paged_tokens * code_bytes + (tokens - paged_tokens) * exact_bytes
    reserved = st["used"] * st["page_nbytes"] + st["residual_bytes_reserved"]
    slots = len(lengths) * max_len
    contiguous = tokens / slots

    def rec(method, metric, value, unit):
        return {"suite": "memory", "trace": kind, "method": method, "metric": metric, "value": value,
                "unit": unit, "tokens": tokens, "num_seqs": len(lengths), "max_len": max_len}

    records = [
        rec("paged_pq", "utilization", stored / reserved, "ratio"),
        rec("paged_pq", "pool_utilization", st["pool_utilization"], "ratio"),
        rec("paged_pq", "reserved_bytes", reserved, "bytes"),
        rec("paged_pq", "bytes_per_token", reserved / tokens, "bytes"),
        rec("contiguous_fp16", "utilization", contiguous, "ratio"),
        rec("contiguous_fp16", "reserved_bytes", slots * exact_bytes, "bytes"),
        rec("contiguous_fp16", "bytes_per_token", slots * exact_bytes / tokens, "bytes"),
        rec("contiguous_pq", "utilization", contiguous, "ratio"),
        rec("contiguous_pq", "reserved_bytes", slots * code_bytes, "bytes"),
        rec("contiguous_pq", "bytes_per_token", slots * code_bytes / tokens, "bytes"),
    ]
    for s in range(len(lengths)):
        cache.free(s)
    assert cache.stats()["used"] == 0
    return records, fill_s


def gpu_slug(name: str) -> str:
    m = re.search(r"([A-Za-z]\d{2,4}[A-Za-z]?)", name)
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "_", name.lower())).lower()


def format_table(records: list[dict]) -> str:
    cols = ("trace", "method", "utilization", "pool_util", "bytes/token", "reserved GiB")
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        row = rows.setdefault((r["trace"], r["method"]), {"trace": r["trace"], "method": r["method"]})
        if r["metric"] == "utilization":
            row["utilization"] = f"{r['value']:.3f}"
        elif r["metric"] == "pool_utilization":
            row["pool_util"] = f"{r['value']:.3f}"
        elif r["metric"] == "bytes_per_token":
            row["bytes/token"] = f"{r['value']:.0f}"
        elif r["metric"] == "reserved_bytes":
            row["reserved GiB"] = f"{r['value'] / 2**30:.2f}"
    lines = [[row.get(c, "") for c in cols] for row in rows.values()]
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(cols)]
    fmt = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([fmt(cols)] + [fmt(line) for line in lines])


def longest_context(budget_bytes: float, layers: int = 32, nh_k: int = 8, d: int = 128) -> list[dict]:
    """Longest single-sequence context whose KV cache fits ``budget_bytes``, Llama-3.1-8B shape.

    Computed from the page layout (codes: 2*M bytes per token, layer and kv head, in whole pages; a
    residual ring of RESIDUAL exact fp16 tokens; K and V codebooks 2 * 256 * d * 4 B per layer) against
    fp16 (4*d bytes per token, layer and kv head). The measured 1M-token run (decode_million_*.json)
    checks it: 31.7 GiB for 1,000,000 tokens at M = 64.
    """
    out = []
    for M in (64, 32):
        fixed = layers * (2 * nh_k * RESIDUAL * d * 2 + 2 * 256 * d * 4)
        per_page = layers * 2 * nh_k * PAGE * M
        tokens = int((budget_bytes - fixed) // per_page) * PAGE + RESIDUAL - PAGE
        out.append({"suite": "memory", "trace": "budget", "method": f"pq_M{M}", "metric": "longest_context_tokens",
                    "value": tokens, "unit": "tokens", "budget_gib": budget_bytes / 2**30, "layers": layers,
                    "nh_k": nh_k, "d": d, "M": M})
    fp16 = int(budget_bytes // (layers * 4 * nh_k * d))
    out.append({"suite": "memory", "trace": "budget", "method": "fp16", "metric": "longest_context_tokens",
                "value": fp16, "unit": "tokens", "budget_gib": budget_bytes / 2**30, "layers": layers, "nh_k": nh_k,
                "d": d})
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.budget_gib:
        records = longest_context(args.budget_gib * 2**30)
        out = args.out or Path(__file__).resolve().parent / "results" / "memory_budget.json"
        harness.write_results(out, records, {"gpu": "computed from the page layout (no GPU involved)"})
        for r in records:
            print(f"{r['method']:>7}: {r['value']:>12,} tokens fit in {r['budget_gib']:.0f} GiB "
                  f"({r['layers']} layers x {r['nh_k']} kv heads x d = {r['d']})")
        return 0
    shapes = args.shapes
    gpu = not args.cpu
    device = harness.gpu_name() if gpu else "cpu"
    out = args.out or Path(__file__).resolve().parent / "results" / f"memory_{gpu_slug(device) if gpu else 'cpu'}.json"

    rng = np.random.default_rng(args.seed)
    code_bytes = 2 * shapes["M"] * shapes["nh_k"]
    fp16_bytes = 2 * 2 * shapes["d"] * shapes["nh_k"]
    records = [
        {"suite": "memory", "trace": "any", "method": "pq_codes", "metric": "bytes_per_token", "value": code_bytes,
         "unit": "bytes"},
        {"suite": "memory", "trace": "any", "method": "fp16", "metric": "bytes_per_token", "value": fp16_bytes,
         "unit": "bytes"},
    ]
    for kind in args.traces:
        lengths = trace_lengths(kind, shapes["num_seqs"], shapes["min_len"], shapes["max_len"], rng)
        recs, fill_s = measure(kind, lengths, shapes, gpu, args.seed)
        records += recs
        print(f"{kind}: {len(lengths)} sequences, {int(lengths.sum())} tokens, filled in {fill_s:.1f} s", flush=True)

    extra: dict[str, Any] = {"shapes": {**shapes, "page_size": PAGE, "residual": RESIDUAL}}
    if not gpu:
        extra["gpu"] = "cpu (reference path)"  # whatever GPU the machine has played no part
    harness.write_results(out, records, extra)
    print(f"\n{device}: nh_k={shapes['nh_k']} d={shapes['d']} M={shapes['M']} page={PAGE} residual={RESIDUAL}; "
          f"PQ {code_bytes} B/token vs fp16 {fp16_bytes} B/token ({fp16_bytes / code_bytes:.0f}x) -> {out}")
    print(format_table([r for r in records if r["trace"] != "any"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
