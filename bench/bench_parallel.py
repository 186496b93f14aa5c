"""Decode over a PQ cache spread across GPUs (million_cupy.parallel, NCCL through CuPy), one process per GPU.

Shape: Llama-3.1-8B attention (nh = 32, nh_k = 8, d = 128), page 64, window 128, float16, ``--layers`` layers
(default 8; the step of a 32-layer model is 4x the per-layer numbers). Every rank is launched by
:func:`million_cupy.parallel.launch` and fills its cache with random tokens (decode speed does not depend on
the values). Records (suite "parallel"), times per decode step over every layer, CUDA events on each rank's
stream after warm-up, medians, the slowest rank's:

* ``single_gpu``: one PagedPQCache on one GPU with ``--tokens-per-gpu`` tokens (decode(), no exchange): the
  weak-scaling baseline;
* ``sequence_parallel``: a sequence of ``gpus x tokens_per_gpu`` tokens in segments, one per GPU, for each
  ``--gpus`` count: ``step_us`` (decode, exchange and merge), ``local_us`` (the same ranks' local decode
  alone), ``exchange_us`` (the all-gather of a step's partial states alone), ``merge_share`` =
  1 - local / step, ``weak_scaling_efficiency`` = single_gpu step / this step (target >= 0.85), and
  ``step_host_us`` (host time to issue a step: when it nears step_us the host, not the GPU, sets the pace);
* ``head_parallel`` and ``sequence_parallel`` at ``--batch`` sequences of ``--batch-tokens`` tokens on the
  largest GPU count (``--modes``), the two modes side by side.

    python bench/bench_parallel.py --gpus 1 2 --out bench/results/parallel_h200x2.json
        [--tokens-per-gpu 1048576] [--layers 8] [--batch 8] [--batch-tokens 262144] [--M 64] [--steps 20]
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
from bench_decode import D, NH, NH_K, P, R, _codebooks  # noqa: E402

CHUNK = 65536  # tokens per append call while filling


def _timed_steps(cp, stream, step, steps: int) -> tuple[list[float], list[float]]:
    """GPU time and host time (us) of ``steps`` calls of ``step()`` on ``stream``, one at a time, after two
    warm-up calls; the host time is the issue of the step's work (the GPU may still run when it ends)."""
    for _ in range(2):
        step()
    stream.synchronize()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    gpu, host = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        start.record(stream)
        step()
        stop.record(stream)
        host.append((time.perf_counter() - t0) * 1e6)
        stop.synchronize()
        gpu.append(cp.cuda.get_elapsed_time(start, stop) * 1e3)
    return gpu, host


def rank_bench(comm, cfg: dict) -> dict:
    """One rank of a record (run by parallel.launch): build, fill, time; the rank's numbers."""
    import cupy as cp

    from million_cupy import PagedPQCache
    from million_cupy import decode as local_decode
    from million_cupy.parallel import HeadParallelCache, SequenceParallelCache

    mode, batch, tokens, layers, M = cfg["mode"], cfg["batch"], cfg["tokens"], cfg["layers"], cfg["M"]
    stream = cp.cuda.get_current_stream()  # launch's stream for this rank
    books = _codebooks(cp, M, layers)  # seeded: the same codebooks on every rank
    common = dict(page_size=P, residual=R, max_seqs=batch, dtype="float16", device="cuda")
    cache: PagedPQCache | SequenceParallelCache | HeadParallelCache
    if mode == "single_gpu":
        cache = PagedPQCache(layers, NH_K, D, books, max_pages=batch * (tokens // P + 3), max_seq_len=tokens,
                             **common)
    elif mode == "sequence_parallel":
        per = -(-tokens // comm.size // P) * P
        cache = SequenceParallelCache(comm, layers, NH_K, D, books, tokens_per_shard=per,
                                      max_pages=batch * (per // P + 3), **common)
    else:
        cache = HeadParallelCache(comm, layers, NH_K, D, books, max_seq_len=tokens,
                                  max_pages=batch * (tokens // P + 3), **common)
    seqs = [cache.add_sequence() for _ in range(batch)]
    rng = cp.random.default_rng(1)  # the same tokens on every rank (SPMD)
    block = rng.standard_normal((min(CHUNK, tokens), NH_K, D), dtype=cp.float32).astype(cp.float16)
    t0 = time.perf_counter()
    for layer in range(layers):
        for s in seqs:
            for at in range(0, tokens, CHUNK):
                n = min(CHUNK, tokens - at)
                cache.append(layer, [s], block[:n], block[:n], lengths=[n])
    stream.synchronize()
    fill_s = time.perf_counter() - t0
    q = rng.standard_normal((batch, NH, D), dtype=cp.float32).astype(cp.float16)

    def step():
        for layer in range(layers):
            if mode == "single_gpu":
                local_decode(cache, layer, seqs, q)
            else:
                cache.decode(layer, seqs, q)

    record = {"rank": comm.rank, "fill_s": fill_s}
    record["step"], record["step_host"] = _timed_steps(cp, stream, step, cfg["steps"])
    if not isinstance(cache, PagedPQCache):
        # The same ranks' local decode alone (what a step costs without the exchange and the merge).
        ids = [cache.local_id(s) for s in seqs]
        if mode == "sequence_parallel":
            q_local = q
        else:
            lo, hi = cache.stats()["heads"]
            g = NH // NH_K
            q_local = cp.ascontiguousarray(q[:, lo * g : hi * g])

        def local_step():
            for layer in range(layers):
                local_decode(cache.local, layer, ids, q_local)

        record["local"], record["local_host"] = _timed_steps(cp, stream, local_step, cfg["steps"])
        part = cp.zeros((batch, NH * (D + 1) // (comm.size if mode == "head_parallel" else 1)), dtype=cp.float32)
        record["exchange"], _ = _timed_steps(cp, stream, lambda: [comm.allgather(part) for _ in range(layers)],
                                             cfg["steps"])
    st = cache.stats()
    record["cache_bytes"] = int(st["used"] * st["page_nbytes"] + st["residual_bytes_reserved"])
    return record


def measure(mode: str, gpus: int, batch: int, tokens: int, layers: int, M: int, steps: int) -> dict:
    from million_cupy.parallel import launch

    cfg = dict(mode=mode, batch=batch, tokens=tokens, layers=layers, M=M, steps=steps)
    t0 = time.perf_counter()
    ranks = launch(rank_bench, gpus, cfg)
    rec = {"suite": "parallel", "method": mode, "gpus": gpus, "batch": batch, "context": tokens, "M": M,
           "layers": layers, "dtype": "float16", "nh": NH, "nh_k": NH_K, "d": D,
           "tokens_per_gpu": batch * tokens // gpus, "wall_s": time.perf_counter() - t0,
           "fill_s": max(r["fill_s"] for r in ranks), "cache_gib_per_gpu": max(r["cache_bytes"] for r in ranks) / 2**30}
    for key in ("step", "local", "exchange", "step_host", "local_host"):
        if key in ranks[0]:
            med = [float(np.median(r[key])) for r in ranks]
            rec[f"{key}_us"] = max(med)  # the slowest rank sets the pace
            rec[f"{key}_p90_us"] = max(float(np.percentile(r[key], 90)) for r in ranks)
    rec["median_us"] = rec["step_us"]
    rec["per_layer_us"] = rec["step_us"] / layers
    if "local_us" in rec:
        rec["merge_share"] = 1.0 - rec["local_us"] / rec["step_us"]
    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items()}, flush=True)
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/parallel_<gpu>x<n>.json)")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="GPU counts of the weak-scaling records")
    p.add_argument("--tokens-per-gpu", type=int, default=1 << 20)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="sequences of the head- vs sequence-parallel records")
    p.add_argument("--batch-tokens", type=int, default=1 << 18, help="tokens per sequence of those records")
    p.add_argument("--modes", action="store_true", help="also the head- vs sequence-parallel records")
    p.add_argument("--M", type=int, default=64, choices=(32, 64))
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    harness.require_gpu("parallel")
    records = [measure("single_gpu", 1, 1, args.tokens_per_gpu, args.layers, args.M, args.steps)]
    for g in args.gpus:
        rec = measure("sequence_parallel", g, 1, g * args.tokens_per_gpu, args.layers, args.M, args.steps)
        rec["weak_scaling_efficiency"] = records[0]["step_us"] / rec["step_us"]
        records.append(rec)
    if args.modes:
        g = max(args.gpus)
        for mode in ("head_parallel", "sequence_parallel"):
            records.append(measure(mode, g, args.batch, args.batch_tokens, args.layers, args.M, args.steps))
    import cupy as cp

    gpu = harness.gpu_name().split()[-1].lower()
    out = args.out or Path(__file__).resolve().parent / "results" / \
        f"parallel_{gpu}x{cp.cuda.runtime.getDeviceCount()}.json"
    harness.write_results(out, records)
    print(f"wrote {out}")
    print(harness.table(records, ["method", "gpus", "batch", "context", "step_us", "step_host_us", "local_us",
                                  "exchange_us", "merge_share", "weak_scaling_efficiency", "fill_s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
