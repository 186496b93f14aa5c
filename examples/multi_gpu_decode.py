"""Decode over a PQ cache spread across several GPUs: one process per GPU, partial states merged over NCCL.

    python examples/multi_gpu_decode.py --gpus 2 --check                      # small: merged result vs float64
    python examples/multi_gpu_decode.py --gpus 2 --mode sequence --tokens 4194304 --layers 4
    python examples/multi_gpu_decode.py --gpus 2 --mode heads --batch 8 --tokens 262144

:func:`million_cupy.parallel.launch` starts one process per GPU; each builds its part of a
:class:`~million_cupy.parallel.SequenceParallelCache` (a sequence's tokens in ``tokens / gpus``-token segments,
one per GPU) or :class:`~million_cupy.parallel.HeadParallelCache` (each GPU its kv heads), appends the same
random tokens on every rank (SPMD: each keeps its part), and decodes one query per sequence in every layer;
every rank gets the same merged output. ``--check`` compares it with the float64 reference over every rank's
segments. Timing and weak scaling: ``bench/bench_parallel.py``. NVLink multicast stays off
(``NCCL_NVLS_ENABLE=0``), as the lent machines require.

Shape: Llama-3.1-8B attention (32 query heads, 8 kv heads, head_dim 128), M = 64, page 64, window 128, fp16.
Needs CuPy with NCCL and ``--gpus`` GPUs; exits with status 2 and a message otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

NH, NH_K, D = 32, 8, 128
CHUNK = 65536  # tokens per append call


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--mode", choices=("sequence", "heads"), default="sequence")
    p.add_argument("--tokens", type=int, default=1 << 20, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--M", type=int, default=64)
    p.add_argument("--check", action="store_true", help="small run checked against the float64 reference")
    args = p.parse_args(argv)
    if args.check:
        args.tokens, args.batch, args.layers = 4096, 2, 1
    return args


def rank_main(comm, args: argparse.Namespace) -> dict:
    """One GPU's part (run by parallel.launch on device ``comm.rank``, inside its stream)."""
    import cupy as cp

    from million_cupy import Codebook, ModelCodebooks, reference
    from million_cupy.parallel import HeadParallelCache, SequenceParallelCache

    rng = cp.random.default_rng(0)  # the same codebooks and tokens on every rank
    book = lambda: Codebook(rng.standard_normal((args.M, 256, D // args.M), dtype=cp.float32))  # noqa: E731
    books = ModelCodebooks([book() for _ in range(args.layers)], [book() for _ in range(args.layers)])
    common = dict(page_size=64, residual=128, max_seqs=args.batch, device="cuda")
    cache: SequenceParallelCache | HeadParallelCache
    if args.mode == "sequence":
        per = -(-args.tokens // comm.size // 64) * 64
        cache = SequenceParallelCache(comm, args.layers, NH_K, D, books, tokens_per_shard=per,
                                      max_pages=args.batch * (per // 64 + 3), **common)
    else:
        cache = HeadParallelCache(comm, args.layers, NH_K, D, books, max_seq_len=args.tokens,
                                  max_pages=args.batch * (args.tokens // 64 + 3), **common)
    seqs = [cache.add_sequence() for _ in range(args.batch)]
    k = rng.standard_normal((min(CHUNK, args.tokens), NH_K, D), dtype=cp.float32).astype(cp.float16)
    v = rng.standard_normal(k.shape, dtype=cp.float32).astype(cp.float16)
    for layer in range(args.layers):
        for s in seqs:
            for at in range(0, args.tokens, CHUNK):
                n = min(CHUNK, args.tokens - at)
                cache.append(layer, [s], k[:n], v[:n], lengths=[n])
    q = rng.standard_normal((args.batch, NH, D), dtype=cp.float32).astype(cp.float16)
    outs = [cache.decode(layer, seqs, q) for layer in range(args.layers)]  # a collective: every rank calls it
    stats = cache.stats()
    record = {"rank": comm.rank, "tokens_here": stats["tokens"], "gib_here": stats["used"] * stats["page_nbytes"] / 2**30}
    if args.check:
        # Every rank's dequantized part, gathered: the reference attends over all of it at once.
        parts = [cache.local.dequantize(0, cache.local_id(s)) for s in seqs]
        k_all = comm.allgather(cp.asarray(np.stack([pk for pk, _ in parts])))
        v_all = comm.allgather(cp.asarray(np.stack([pv for _, pv in parts])))
        axis = 0 if args.mode == "sequence" else 1  # segments end to end, or heads side by side
        ks = [np.concatenate(list(cp.asnumpy(k_all[:, b])), axis=axis) for b in range(args.batch)]
        vs = [np.concatenate(list(cp.asnumpy(v_all[:, b])), axis=axis) for b in range(args.batch)]
        want, _ = reference.decode_attention(cp.asnumpy(q).astype(np.float64), ks, vs)
        record["check_rel_err"] = reference.relative_error(cp.asnumpy(outs[0]).astype(np.float64), want)
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import cupy as cp
        import cupy.cuda.nccl  # noqa: F401 - launch needs it: fail here with a message, not in the ranks

        available = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001
        print(f"multi_gpu_decode: needs CuPy with NCCL and CUDA GPUs: {exc}", file=sys.stderr)
        return 2
    if available < args.gpus:
        print(f"multi_gpu_decode: --gpus {args.gpus} needs {args.gpus} GPUs, this machine has {available}",
              file=sys.stderr)
        return 2
    from million_cupy.parallel import launch

    t0 = time.perf_counter()
    records = launch(rank_main, args.gpus, args)
    print(f"{args.gpus} GPUs, {args.mode} parallel, batch {args.batch} x {args.tokens:,} tokens, {args.layers} "
          f"layers, M = {args.M}: {time.perf_counter() - t0:.0f} s")
    for r in records:
        print(f"  rank {r['rank']}: {r['tokens_here']:,} tokens held, {r['gib_here']:.2f} GiB of pages")
    if args.check:
        err = records[0]["check_rel_err"]
        print(f"check: relative error vs float64 {err:.2e} ({'ok' if err < 2e-3 else 'FAIL'})")
        return 0 if err < 2e-3 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
