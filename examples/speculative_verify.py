"""Speculative verification over a PQ cache: plan, append the drafts, attend; on a GPU, replayed from CUDA graphs.

Every step, each sequence brings ``--drafts`` new tokens; they are appended to every layer and attend causally
to the sequence's whole compressed history and to each other (``BatchPrefillWrapper``, one plan per step, one
``run`` per layer). On a GPU the first step's ``run`` of each layer is captured in a CUDA graph, and the later
steps replay it: the wrapper's plan rewrites the device metadata the graph reads, the sequences growing. Each
step's last layer is checked against the float64 reference over the cache's own contents. Without a GPU the
same loop runs on a CPU cache through ``million_cupy.prefill_attention`` (the float64 reference path).

Speculative decoding keeps only the accepted drafts; the cache cannot drop tokens yet, so here every draft is
kept (all accepted).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

import million_cupy as mc
from million_cupy import reference
from million_cupy.interop import gpu_available, to_numpy

from _common import Checks, model_parser


def main(argv: Sequence[str] | None = None) -> int:
    p = model_parser(__doc__, prompt_len=600)
    p.add_argument("--drafts", type=int, default=4, help="new tokens per sequence and step")
    p.add_argument("--batch", type=int, default=3)
    p.add_argument("--cpu", action="store_true", help="the CPU cache (float64 reference) even with a GPU")
    args = p.parse_args(argv)
    gpu = gpu_available() and not args.cpu
    rng = np.random.default_rng(args.seed)
    L, nh, nh_k, d, B, c = args.layers, args.heads, args.kv_heads, args.head_dim, args.batch, args.drafts
    lens = [max(1, args.prompt_len - 37 * b) for b in range(B)]
    check = Checks()

    def tokens(n: int, heads: int):
        x = rng.standard_normal((n, heads, d)).astype(np.float16)
        return cp.asarray(x) if gpu else x

    books = mc.ModelCodebooks.train([rng.standard_normal((512, nh_k, d)).astype(np.float32) for _ in range(L)],
                                    [rng.standard_normal((512, nh_k, d)).astype(np.float32) for _ in range(L)],
                                    M=args.M, iters=5, seed=args.seed)
    if gpu:
        import cupy as cp  # noqa: PLC0415

        stream = cp.cuda.Stream(non_blocking=True)  # a capturable stream, for the cache and the wrapper alike
        cache = mc.PagedPQCache(L, nh_k, d, books, max_seqs=B, device="cuda", stream=stream,
                                max_seq_len=max(lens) + c * args.steps)
    else:
        cp, stream = None, None
        cache = mc.PagedPQCache(L, nh_k, d, books, max_seqs=B, device="cpu", max_seq_len=max(lens) + c * args.steps)
    print(f"path: {'GPU' if gpu else 'CPU'}; prompts {lens}, {L} layers, {nh} / {nh_k} heads, d = {d}, M = {args.M}, "
          f"{c} drafts per sequence and step")
    seqs = [cache.add_sequence() for _ in lens]
    ind = np.arange(B + 1) * c
    N = int(ind[-1])
    if gpu:
        with stream:
            for layer in range(L):
                cache.append(layer, seqs, tokens(sum(lens), nh_k), tokens(sum(lens), nh_k), lengths=lens)
            run_gpu(cp, stream, cache, seqs, ind, args, tokens, check)
    else:
        for layer in range(L):
            cache.append(layer, seqs, tokens(sum(lens), nh_k), tokens(sum(lens), nh_k), lengths=lens)
        for _ in range(args.steps):
            for layer in range(L):
                cache.append(layer, seqs, tokens(N, nh_k), tokens(N, nh_k), lengths=[c] * B)
                out = mc.prefill_attention(cache, layer, seqs, tokens(N, nh), ind)
        check(bool(np.isfinite(out).all()), f"{args.steps} steps on the CPU reference path, finite outputs")
    print(f"sequence lengths {cache.seq_lens(0, seqs).tolist()}")
    if check.failures:
        print(f"speculative_verify: {len(check.failures)} check(s) FAILED")
        return 1
    print("speculative_verify: all checks passed")
    return 0


def run_gpu(cp, stream, cache, seqs, ind, args, tokens, check) -> None:
    """The verification loop on the GPU: eager first, then one CUDA graph per layer replayed step after step."""
    L, nh, nh_k, d, B, c = cache.num_layers, args.heads, cache.num_kv_heads, cache.head_dim, len(seqs), args.drafts
    N = int(ind[-1])
    wrapper = mc.BatchPrefillWrapper(cache, nh, stream=stream)
    q = [cp.empty((N, nh, d), dtype=cp.float16) for _ in range(L)]  # the arrays the graphs read and write
    out = [cp.full((N, nh, d), cp.nan, dtype=cp.float16) for _ in range(L)]
    graphs: list = [None] * L
    worst = 0.0
    for step in range(args.steps):
        wrapper.plan(seqs, ind)
        for layer in range(L):
            cache.append(layer, seqs, tokens(N, nh_k), tokens(N, nh_k), lengths=[c] * B)
            q[layer][...] = tokens(N, nh)
            if graphs[layer] is None:
                wrapper.run(layer, q[layer], out=out[layer])  # compiles; the check below covers the eager run
                stream.begin_capture()
                wrapper.run(layer, q[layer], out=out[layer])
                graphs[layer] = stream.end_capture()
            else:
                out[layer].fill(cp.nan)
                graphs[layer].launch(stream)
        stream.synchronize()
        ks, vs = zip(*(cache.dequantize(L - 1, s) for s in seqs))
        want, _ = reference.causal_attention(to_numpy(q[L - 1]).astype(np.float64), list(ks), list(vs), ind)
        err = reference.relative_error(to_numpy(out[L - 1]).astype(np.float64), want)
        worst = max(worst, err)
        print(f"  step {step}: {'eager + capture' if step == 0 else 'graph replay'}, regime {wrapper.regime}, "
              f"relative error {err:.2e} (last layer against the float64 reference)")
    check(worst <= 2e-3, f"every step matches the float64 reference (worst relative error {worst:.2e})")
    check(wrapper.stats()["stale_graph_plans"] == 0, "one capture per layer served every step")


if __name__ == "__main__":
    raise SystemExit(main())
