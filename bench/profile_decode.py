"""One decode (or verification) shape launched a few times, for Nsight Compute.

Nsight Compute then reads the kernel's own counters and stall reasons:

    ncu --kernel-name regex:decode_attention --launch-skip 3 --launch-count 1 --set full \
        python bench/profile_decode.py --batch 1 --context 4096 --M 64

``--queries N`` (N > 1) profiles the attention of N new tokens per sequence instead, as a speculative
verification step runs it (the last N tokens of each history are the drafts; the auto backend, so
``verify_attention`` for up to 32 rows per kv head):

    ncu --kernel-name regex:verify_attention --launch-skip 2 --launch-count 1 --set full \
        python bench/profile_decode.py --batch 8 --context 32768 --M 32 --queries 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_decode  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--M", type=int, default=64)
    ap.add_argument("--launches", type=int, default=5)
    ap.add_argument("--queries", type=int, default=1, help="new tokens per sequence (> 1: BatchPrefillWrapper)")
    ap.add_argument("--time", action="store_true",
                    help="also time run() (median us; for decode also its CUDA-graph replay)")
    args = ap.parse_args(argv)

    import cupy as cp

    if args.queries > 1:
        return _profile_verify(cp, args)
    _, _, wrapper, q, out = bench_decode.planned_paged_pq(cp, args.batch, args.context, args.M)
    for _ in range(args.launches):
        wrapper.run(0, q, out=out, check=False)
    cp.cuda.get_current_stream().synchronize()
    line = f"{args.batch}x{args.context} M={args.M}: {wrapper.stats()['work_items']} work items"
    if args.time:
        t = bench_decode.time_run_and_graph(cp, wrapper, q, out)
        line += f"  run {t['median_us']:.1f} us  graph {t['graph_gpu_us']:.1f} us  graph call {t['graph_call_us']:.1f} us"
    print(line)
    return 0


def _profile_verify(cp, args) -> int:
    """``--queries N``: a BatchPrefillWrapper planned over the last N tokens of each history, run a few times."""
    import numpy as np

    from million_cupy import BatchPrefillWrapper

    n = args.queries
    cache, seqs = bench_decode.build_cache(cp, args.batch, args.context, args.M, spare_tokens=n)
    wrapper = BatchPrefillWrapper(cache, bench_decode.NH)
    wrapper.plan(seqs, np.arange(args.batch + 1) * n, appended=True)  # the last n tokens of each history
    q = cp.random.default_rng(3).standard_normal((args.batch * n, bench_decode.NH, bench_decode.D),
                                                 dtype=cp.float32).astype(cp.float16)
    out = cp.empty_like(q)
    for _ in range(args.launches):
        wrapper.run(0, q, out=out)
    cp.cuda.get_current_stream().synchronize()
    line = f"{args.batch}x{args.context} M={args.M}, {n} queries per sequence: {wrapper.regime} regime"
    if args.time:
        from harness import time_gpu

        line += f"  run {time_gpu(lambda: wrapper.run(0, q, out=out))['median_us']:.1f} us"
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
