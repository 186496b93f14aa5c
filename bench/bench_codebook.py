#!/usr/bin/env python
"""Benchmark the codebook's GPU work: PQ encode (the pq_encode.cu kernel) and k-means training.

    python bench/bench_codebook.py --out bench/results/codebook_<gpu>.json

Encode: 262144 vectors x d=128 in fp16 (32K tokens x 8 kv heads) for M = 32 and 64.
Training: Codebook.train on 65536 samples, d=128, M=64, 25 iterations.

Timing uses CUDA events after warm-up. Encode's ``median_us`` is the GPU time per call with
``--queued`` calls back to back between two events (host launch cost hidden), median over
``--repeats``; ``call_us`` is one call between events, launch included. Training (which syncs with
the host inside) is timed one call per event pair. ``p10_us`` / ``p90_us`` give the spread.
Before timing, encode output is checked against the float64 reference on a slice.

Results JSON: top-level ``gpu``, ``date``, ``command``, ``versions``, ``records`` (dicts with ``suite``,
``method``, ``M``, ``n``, ``median_us``, ``p10_us``, ``p90_us`` and suite-specific fields).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

import harness  # noqa: E402

from million_cupy import reference  # noqa: E402
from million_cupy.codebook import Codebook  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/codebook_<gpu>.json)")
    p.add_argument("--repeats", type=int, default=20, help="timed repeats per case (>= 20 for the reported median)")
    p.add_argument("--queued", type=int, default=10, help="encode calls queued between one pair of events")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--encode-n", type=int, default=262144)
    p.add_argument("--encode-M", type=int, nargs="+", default=[32, 64])
    p.add_argument("--train-n", type=int, default=65536)
    p.add_argument("--train-M", type=int, default=64)
    p.add_argument("--train-iters", type=int, default=25)
    p.add_argument("--skip-train", action="store_true")
    return p.parse_args()


def bench_encode(cp, args, rng) -> list[dict]:
    d, n = 128, args.encode_n
    x = cp.asarray(rng.standard_normal((n, d)).astype(np.float16))
    records = []
    for M in args.encode_M:
        dsub = d // M
        cb = Codebook(rng.standard_normal((M, 256, dsub)).astype(np.float32)).to_gpu()
        out = cp.empty((n, M), dtype=cp.uint8)
        cb.encode(x, out=out)
        check = 2048
        got = out[:check].get()
        want = reference.pq_encode(x[:check].get(), cb.centroids.get())
        match = float((got == want).mean())
        if match < 0.999:
            raise SystemExit(f"encode M={M}: only {match:.5f} of codes match the float64 reference")
        t = harness.time_gpu(lambda: cb.encode(x, out=out), repeats=args.repeats, warmup=args.warmup,
                             queued=args.queued)
        records.append({
            "suite": "encode",
            "method": f"Codebook.encode pq_encode<{dsub}, __half>",
            "M": M,
            "n": n,
            "d": d,
            "dtype": "float16",
            **t,
            "gvectors_per_s": n / (t["median_us"] * 1e-6) / 1e9,
            "reference_match": match,
        })
    return records


def bench_train(cp, args, rng) -> list[dict]:
    d, n, M = 128, args.train_n, args.train_M
    # Structured data (a Gaussian mixture), so Lloyd rounds do representative work.
    centers = 2.0 * rng.standard_normal((64, d))
    host = (centers[rng.integers(64, size=n)] + rng.standard_normal((n, d))).astype(np.float16)
    x = cp.asarray(host)
    # Training synchronises with the host inside: one call per event pair.
    t = harness.time_gpu(lambda: Codebook.train(x, M, iters=args.train_iters, seed=0, progress=False),
                         repeats=args.repeats, warmup=1, queued=1)
    return [{"suite": "train", "method": "Codebook.train (CuPy k-means)", "M": M, "n": n, "d": d,
             "iters": args.train_iters, "dtype": "float16", **t}]


def main() -> None:
    args = parse_args()
    harness.require_gpu("codebook")
    import cupy as cp

    rng = np.random.default_rng(0)
    records = bench_encode(cp, args, rng)
    if not args.skip_train:
        records += bench_train(cp, args, rng)
    gpu = harness.gpu_name()
    slug = re.sub(r"[^a-z0-9]+", "_", gpu.lower()).strip("_")
    out = args.out or Path(__file__).resolve().parent / "results" / f"codebook_{slug}.json"
    harness.write_results(out, records)
    print(f"{gpu}: wrote {out}")
    print(harness.table(records, ["suite", "method", "M", "n", "median_us", "p10_us", "p90_us", "call_us"]))


if __name__ == "__main__":
    main()
