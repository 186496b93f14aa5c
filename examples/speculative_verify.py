"""Speculative decoding's verification over a PQ cache: append the drafts, attend, keep the accepted ones.

Every step, each sequence brings ``--drafts`` draft tokens. They are appended to the sequence, where they attend
causally to the whole compressed history and to each other (``BatchPrefillWrapper``: one plan per step, then per
layer one ``append`` of the drafts and one ``run``). Then the rejected drafts are dropped in place (``PagedPQCache.truncate``; a cache built with
``max_rollback`` = the drafts keeps that many tokens more in its exact ring, so that the tokens a verdict brings
back into the window are exact again): the cache then holds what it would had only the accepted tokens been
appended (here a random number of them stands for the target model's verdict). On a GPU the second step is
captured whole in one CUDA graph (every layer's append and run) and the later steps replay it: each plan rewrites
the device metadata the graph reads, for longer histories, and counts the drafts it will append. Each step's last layer is checked against the float64 reference over the
cache's own contents, and at the end every sequence against a cache that only ever got its accepted tokens.
Without a GPU the same loop runs on a CPU cache through ``million_cupy.prefill_attention`` (the float64
reference path).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

import million_cupy as mc
from million_cupy import reference
from million_cupy.interop import gpu_available, to_numpy

from _common import Checks, model_parser


def main(argv: Sequence[str] | None = None) -> int:
    p = model_parser(__doc__, prompt_len=600)
    p.add_argument("--drafts", type=int, default=4, help="draft tokens per sequence and step")
    p.add_argument("--batch", type=int, default=3)
    p.add_argument("--cpu", action="store_true", help="the CPU cache (float64 reference) even with a GPU")
    args = p.parse_args(argv)
    gpu = gpu_available() and not args.cpu
    rng = np.random.default_rng(args.seed)
    L, nh, nh_k, d, B, c = args.layers, args.heads, args.kv_heads, args.head_dim, args.batch, args.drafts
    lens = [max(1, args.prompt_len - 37 * b) for b in range(B)]
    check = Checks()
    if gpu:
        import cupy as cp  # noqa: PLC0415

        stream = cp.cuda.Stream(non_blocking=True)  # a capturable stream, for the cache and the wrapper alike
    else:
        cp = stream = None

    def tokens(n: int, heads: int) -> Any:
        x = rng.standard_normal((n, heads, d)).astype(np.float16)
        return cp.asarray(x) if gpu else x

    books = mc.ModelCodebooks.train([rng.standard_normal((512, nh_k, d)).astype(np.float32) for _ in range(L)],
                                    [rng.standard_normal((512, nh_k, d)).astype(np.float32) for _ in range(L)],
                                    M=args.M, iters=5, seed=args.seed)
    cache = mc.PagedPQCache(L, nh_k, d, books, max_seqs=B, max_seq_len=max(lens) + c * args.steps,
                            device="cuda" if gpu else "cpu", stream=stream, max_rollback=c)
    print(f"path: {'GPU' if gpu else 'CPU'}; prompts {lens}, {L} layers, {nh} / {nh_k} heads, d = {d}, M = {args.M}, "
          f"{c} drafts per sequence and step")
    seqs = [cache.add_sequence() for _ in lens]
    ind = np.arange(B + 1) * c
    prompt = [(tokens(sum(lens), nh_k), tokens(sum(lens), nh_k)) for _ in range(L)]
    if gpu:
        with stream:
            for layer, (k, v) in enumerate(prompt):
                cache.append(layer, seqs, k, v, lengths=lens)
            wrapper = mc.BatchPrefillWrapper(cache, nh, stream=stream)
            kept = verification_loop(cache, seqs, ind, args, tokens, graphed_step(cp, stream, wrapper, ind), check)
            stream.synchronize()
        stats = wrapper.stats()
        check(stats["stale_graph_plans"] == 0 and stats["graph_append_plans"] == max(args.steps - 2, 0),
              "one captured step, appends included, served every later step")
    else:
        for layer, (k, v) in enumerate(prompt):
            cache.append(layer, seqs, k, v, lengths=lens)
        kept = verification_loop(cache, seqs, ind, args, tokens, reference_attention(cache, ind), check)
    want = [n + sum(len(k) for k, _ in kept[0][b]) for b, n in enumerate(lens)]
    check(cache.seq_lens(0, seqs).tolist() == want, f"the sequences hold their prompts and accepted tokens: {want}")
    # The same prompts and accepted tokens appended to a fresh cache: every layer must hold the same.
    fresh = mc.PagedPQCache(L, nh_k, d, books, max_seqs=B, max_seq_len=max(lens) + c * args.steps,
                            device="cuda" if gpu else "cpu", stream=stream)
    xp = cp if gpu else np
    other = [fresh.add_sequence() for _ in lens]
    for layer, (k, v) in enumerate(prompt):
        fresh.append(layer, other, k, v, lengths=lens)
        for b, o in enumerate(other):
            k_rows, v_rows = (xp.concatenate(rows) for rows in zip(*kept[layer][b]))
            fresh.append(layer, [o], k_rows, v_rows, lengths=[k_rows.shape[0]])
    same = all(np.array_equal(x, y) for layer in range(L) for s, o in zip(seqs, other)
               for x, y in zip(cache.dequantize(layer, s), fresh.dequantize(layer, o)))
    check(same, "after every truncate the cache holds what a cache given only the accepted tokens holds")
    if check.failures:
        print(f"speculative_verify: {len(check.failures)} check(s) FAILED")
        return 1
    print("speculative_verify: all checks passed")
    return 0


# attend(step, seqs, q, drafts) -> out: the drafts' attention at the last layer, after appending every layer's
# drafts (K, V) to the sequences and attending in each
Attend = Callable[[int, list, list, list], Any]


def verification_loop(cache, seqs: list[int], ind: np.ndarray, args, tokens: Callable, attend: Attend,
                      check: Checks) -> list[list[list[tuple]]]:
    """``args.steps`` verification steps; returns the accepted drafts' (K, V) rows per layer, sequence and step."""
    L, nh_k, B, c, N = cache.num_layers, cache.num_kv_heads, len(seqs), args.drafts, int(ind[-1])
    verdict = np.random.default_rng(args.seed + 1)
    kept: list[list[list[tuple]]] = [[[] for _ in seqs] for _ in range(L)]
    worst = 0.0
    for step in range(args.steps):
        held = cache.seq_lens(0, seqs)
        drafts = [(tokens(N, nh_k), tokens(N, nh_k)) for _ in range(L)]
        q = [tokens(N, args.heads) for _ in range(L)]
        out = attend(step, seqs, q, drafts)
        ks, vs = zip(*(cache.dequantize(L - 1, s) for s in seqs))
        want, _ = reference.causal_attention(to_numpy(q[-1]).astype(np.float64), list(ks), list(vs), ind)
        err = reference.relative_error(to_numpy(out).astype(np.float64), want)
        worst = max(worst, err)
        accepted = verdict.integers(1, c + 1, B)  # the target model's verdict: at least one token per sequence
        cache.truncate(seqs, held + accepted)  # the rejected drafts leave every layer of every sequence
        for b in range(B):
            for layer, (k, v) in enumerate(drafts):
                rows = slice(b * c, b * c + int(accepted[b]))
                kept[layer][b].append((k[rows], v[rows]))
        print(f"  step {step}: relative error {err:.2e} (last layer against the float64 reference), accepted "
              f"{accepted.tolist()}")
    check(worst <= 2e-3, f"every step matches the float64 reference (worst relative error {worst:.2e})")
    return kept


def graphed_step(cp, stream, wrapper, ind: np.ndarray) -> Attend:
    """The drafts' verification on the GPU: the first step runs eagerly (it compiles the kernels), the second is
    captured whole in one CUDA graph (every layer's append and run), and each later step is a plan, which counts
    the drafts in the cache's lengths for the replay, and one replay of that graph."""
    cache = wrapper.cache
    N, L, nh, nh_k, d = int(ind[-1]), cache.num_layers, wrapper.num_heads, cache.num_kv_heads, cache.head_dim
    # What the graph reads and writes: fixed arrays, filled before each step.
    k_in, v_in = (cp.empty((L, N, nh_k, d), dtype=cp.float16) for _ in range(2))
    q_in, out = (cp.empty((L, N, nh, d), dtype=cp.float16) for _ in range(2))
    graph: list = []

    def every_layer() -> None:
        for layer in range(L):
            wrapper.append(layer, k_in[layer], v_in[layer])  # the plan's drafts: one launch, no device sync
            wrapper.run(layer, q_in[layer], out=out[layer])

    def attend(step: int, seqs: list, q: list, drafts: list) -> Any:
        for layer, (k, v) in enumerate(drafts):
            k_in[layer], v_in[layer], q_in[layer] = k, v, q[layer]
        out.fill(cp.nan)
        wrapper.plan(seqs, ind)
        if step == 0:
            every_layer()
            how = "eager"
        elif not graph:
            stream.begin_capture()
            every_layer()
            graph.append(stream.end_capture())
            graph[0].launch(stream)  # the capture counted the drafts and ran nothing
            how = "captured whole, replayed"
        else:
            graph[0].launch(stream)
            how = "replayed"
        stream.synchronize()
        print(f"  step {step}: {how} on the {wrapper.regime} path")
        return out[L - 1]

    return attend


def reference_attention(cache, ind: np.ndarray) -> Attend:
    """The drafts' attention on a CPU cache: prefill_attention, the float64 reference path."""

    def attend(step: int, seqs: list, q: list, drafts: list) -> Any:
        for layer, (k, v) in enumerate(drafts):
            cache.append(layer, seqs, k, v, lengths=np.diff(ind))
            out = mc.prefill_attention(cache, layer, seqs, q[layer], ind)
        return out

    return attend


if __name__ == "__main__":
    raise SystemExit(main())
