"""Decode over a PQ cache spread across several GPUs: one process per GPU, partial states merged over NCCL.

    python examples/multi_gpu_decode.py --gpus 8 --mode sequence --tokens 10000000 --layers 32
    python examples/multi_gpu_decode.py --gpus 2 --mode heads --batch 8 --tokens 1048576
    python examples/multi_gpu_decode.py --gpus 2 --check          # small: the merged result vs float64

Each process owns GPU ``rank`` and one :class:`million_cupy.parallel.SequenceParallelCache` (a sequence's tokens
in ``tokens / gpus``-token segments, one per GPU) or :class:`~million_cupy.parallel.HeadParallelCache` (each GPU
its kv heads), fills it with random tokens (synthetic prefill: decode speed does not depend on the values) and
times decode steps of every layer with CUDA events; rank 0 prints the step time and the exchange's share.
``--check`` compares rank 0's merged output with the float64 reference over every rank's segments (gathered).
NVLink multicast stays off (``NCCL_NVLS_ENABLE=0``), as the lent machines require.

Shape: Llama-3.1-8B attention (32 query heads, 8 kv heads, head_dim 128), M = 64, page 64, window 128, fp16.
Needs CuPy with NCCL and ``--gpus`` GPUs; exits with status 2 and a message otherwise.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time

import numpy as np

NH, NH_K, D = 32, 8, 128


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--mode", choices=("sequence", "heads"), default="sequence")
    p.add_argument("--tokens", type=int, default=1 << 20, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--M", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--check", action="store_true", help="small run checked against the float64 reference")
    args = p.parse_args(argv)
    if args.check:
        args.tokens, args.batch, args.layers, args.steps = 4096, 2, 1, 1
    return args


def _books(cp, M, layers):
    from million_cupy import Codebook, ModelCodebooks

    rng = cp.random.default_rng(0)  # the same codebooks on every rank
    cb = lambda: Codebook(rng.standard_normal((M, 256, D // M), dtype=cp.float32))  # noqa: E731
    return ModelCodebooks([cb() for _ in range(layers)], [cb() for _ in range(layers)])


def rank_main(rank: int, args: argparse.Namespace, unique_id, results) -> None:
    import cupy as cp

    cp.cuda.Device(rank).use()
    from million_cupy.parallel import HeadParallelCache, NcclCommunicator, SequenceParallelCache

    stream = cp.cuda.Stream(non_blocking=True)
    comm = NcclCommunicator(rank, args.gpus, unique_id, stream=stream)
    books = _books(cp, args.M, args.layers)
    common = dict(page_size=64, residual=128, max_seqs=args.batch, device="cuda", stream=stream)
    if args.mode == "sequence":
        per = -(-args.tokens // args.gpus // 64) * 64
        cache = SequenceParallelCache(comm, args.layers, NH_K, D, books, tokens_per_shard=per,
                                      max_pages=args.batch * (per // 64 + 2), **common)
    else:
        cache = HeadParallelCache(comm, args.layers, NH_K, D, books, max_seq_len=args.tokens + 64,
                                  max_pages=args.batch * (args.tokens // 64 + 3), **common)
    seqs = [cache.add_sequence() for _ in range(args.batch)]
    rng = cp.random.default_rng(1)  # the same tokens on every rank (SPMD)
    chunk = 65536
    with stream:
        block = rng.standard_normal((min(chunk, args.tokens), NH_K, D), dtype=cp.float32).astype(cp.float16)
        for layer in range(args.layers):
            for s in seqs:
                done = 0
                while done < args.tokens:
                    n = min(chunk, args.tokens - done)
                    cache.append(layer, [s], block[:n], block[:n], lengths=[n])
                    done += n
        q = rng.standard_normal((args.batch, NH, D), dtype=cp.float32).astype(cp.float16)
        for layer in range(args.layers):  # warm-up: kernels compile, NCCL connects
            cache.decode(layer, seqs, q)
        stream.synchronize()
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        times = []
        for _ in range(args.steps):
            start.record(stream)
            for layer in range(args.layers):
                out = cache.decode(layer, seqs, q)
            stop.record(stream)
            stop.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, stop))
        # The exchange alone: one all-gather of the step's partial states per layer.
        part = cp.zeros((args.batch, NH * (D + 1)), dtype=cp.float32)
        start.record(stream)
        for _ in range(args.layers):
            comm.allgather(part)
        stop.record(stream)
        stop.synchronize()
        exchange_ms = cp.cuda.get_elapsed_time(start, stop)
    record = {"rank": rank, "step_ms": float(np.median(times)), "exchange_ms": float(exchange_ms),
              "stats": {k: v for k, v in cache.stats().items() if isinstance(v, (int, float))}}
    if args.check and args.mode == "sequence":
        from million_cupy import reference

        layer = 0
        got = cache.decode(layer, seqs, q)  # a collective: every rank calls it
        ks = [cache.local.dequantize(layer, cache.local_id(s)) for s in seqs]
        k_all = comm.allgather(cp.asarray(np.stack([k for k, _ in ks])))
        v_all = comm.allgather(cp.asarray(np.stack([v for _, v in ks])))
        if rank == 0:
            kk = [np.concatenate(list(cp.asnumpy(k_all[:, b])), axis=0) for b in range(args.batch)]
            vv = [np.concatenate(list(cp.asnumpy(v_all[:, b])), axis=0) for b in range(args.batch)]
            want, _ = reference.decode_attention(cp.asnumpy(q).astype(np.float64), kk, vv)
            record["check_rel_err"] = reference.relative_error(cp.asnumpy(got).astype(np.float64), want)
    results.put(record)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    try:
        import cupy as cp
        from cupy.cuda import nccl

        available = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001
        print(f"multi_gpu_decode: needs CuPy with NCCL and CUDA GPUs: {exc}", file=sys.stderr)
        return 2
    if available < args.gpus:
        print(f"multi_gpu_decode: --gpus {args.gpus} needs {args.gpus} GPUs, this machine has {available}",
              file=sys.stderr)
        return 2
    unique_id = nccl.get_unique_id()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, args, unique_id, results)) for r in range(args.gpus)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    records = [results.get() for _ in procs]
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        print("multi_gpu_decode: a rank failed", file=sys.stderr)
        return 1
    records.sort(key=lambda r: r["rank"])
    step = max(r["step_ms"] for r in records)
    print(f"{args.gpus} GPUs, {args.mode} parallel, batch {args.batch} x {args.tokens:,} tokens, {args.layers} "
          f"layers, M = {args.M}: decode step {step:.3f} ms (slowest rank), exchange {records[0]['exchange_ms']:.3f} "
          f"ms ({100 * records[0]['exchange_ms'] / step:.0f} %); {time.perf_counter() - t0:.0f} s in all")
    if args.check:
        print(f"check: relative error vs float64 {records[0].get('check_rel_err')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
