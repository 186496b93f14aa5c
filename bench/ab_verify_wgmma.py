"""verify_attention against its warpgroup-MMA form (MILLION_CUPY_WGMMA 0 / 1) and the one-token decode, in ONE process
over one 8 x 32K cache (nh 32, nh_k 8, d 128, page 64, M = 32), q = 4 and 8 new tokens per sequence, interleaved
rounds; writes the records (suite "verify_wgmma_integration") and prints the medians.

    python3 bench/ab_verify_wgmma.py --out bench/results/verify_wgmma_integration_h200.json   # compute capability 9.0
"""
import argparse
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402
from bench_decode import D, NH, build_cache  # noqa: E402
from bench_prefill import random_queries  # noqa: E402

TIMING = {"queued": 20, "repeats": 15, "warmup": 3}
ROUNDS = 5
# the kernel each (queries per sequence, MILLION_CUPY_WGMMA) runs: q = 4 is one row tile, which has no wgmma form
KERNEL = {(4, "0"): "verify_attention", (4, "1"): "verify_attention (q = 4: one row tile, no wgmma form)",
          (8, "0"): "verify_attention", (8, "1"): "verify_attention_wgmma"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")) / "ab_wgmma.json",
                        help="JSON path (default $OUT/ab_wgmma.json, or /tmp)")
    args = parser.parse_args()
    harness.require_gpu("ab_verify_wgmma")
    import cupy as cp

    from million_cupy import BatchDecodeWrapper, BatchPrefillWrapper

    cache, seqs = build_cache(cp, 8, 32768, 32, spare_tokens=8)
    dec = BatchDecodeWrapper(cache, num_heads=NH)
    dec.plan(seqs, new_tokens=0)
    q1, o1 = random_queries(cp, 8, 3), cp.empty((8, NH, D), dtype=cp.float16)
    runs = {}
    for c in (4, 8):
        q = random_queries(cp, 8 * c, 4 + c)
        for env in ("0", "1"):
            os.environ["MILLION_CUPY_WGMMA"] = env  # read when the wrapper binds its launch (its first run)
            w = BatchPrefillWrapper(cache, NH, backend="tensor_cores")
            w.plan(seqs, np.arange(9) * c, appended=True)
            o = cp.empty_like(q)
            w.run(0, q, out=o)
            runs[(c, env)] = (w, q, o)
    cp.cuda.Device().synchronize()
    a, b = (runs[(8, e)][2].astype(cp.float32) for e in ("0", "1"))
    print(f"q = 8: max |wgmma - verify_attention| = {float(cp.abs(a - b).max()):.3g}", flush=True)
    base = {"suite": "verify_wgmma_integration", "batch": 8, "context": 32768, "M": 32}
    records: list[dict] = []
    for r in range(ROUNDS):
        decode = harness.time_gpu(lambda: dec.run(0, q1, out=o1, check=False), **TIMING)["median_us"]
        records.append({**base, "round": r, "method": "decode_one_token", "queries_per_seq": 1, "median_us": decode})
        for (c, env), (w, q, o) in runs.items():
            us = harness.time_gpu(lambda: w.run(0, q, out=o), **TIMING)["median_us"]
            records.append({**base, "round": r, "method": KERNEL[(c, env)], "env": f"MILLION_CUPY_WGMMA={env}",
                            "queries_per_seq": c, "median_us": us, "vs_decode": us / decode})
        print({k: round(x["median_us"], 1) for k, x in zip(["decode", *runs], records[-1 - len(runs):])}, flush=True)
    print(f"{'kernel':>44} {'q':>2} {'median_us':>9} {'vs_decode':>9}")
    for (c, env), method in [((1, ""), "decode_one_token"), *KERNEL.items()]:
        rows = [x for x in records if x["method"] == method and x["queries_per_seq"] == max(c, 1)]
        ratio = statistics.median(x["vs_decode"] for x in rows) if c > 1 else 1.0
        print(f"{method:>44} {c:>2} {statistics.median(x['median_us'] for x in rows):9.1f} {ratio:9.3f}")
    harness.write_results(args.out, records, {"rounds": ROUNDS})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
