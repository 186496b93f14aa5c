"""End-to-end decode: a Llama-shaped model generating from the paged PQ cache vs an exact fp16 cache.

The model is the random-weight decoder of ``examples/llama_decode.py`` (imported, not copied):
hidden 4096, 32 query heads, 8 kv heads, head dim 128, ``--layers`` layers (4), SwiGLU MLP of
``--ffn`` (14336, Llama-3-8B), float32 weights and activations. Per (batch, context) pair:

* **pq_cache**: a :class:`million_cupy.PagedPQCache` (M = ``--M`` = 64, C = 256, page 64, residual
  128) decoded with ``DecodeStep`` (``plan`` once per step, then per layer: QKV, ``append``, ``run``,
  MLP; eager, not graph-captured), then the LM head and a greedy argmax;
* **fp16_cache**: the same model over plain float16 K / V arrays, one per layer, in a
  (B, nh_k, T, d) layout; attention is two cuBLAS float16 matmuls with a float32 softmax between
  them (``--fp16-attn cublas``, the default) or the example's own float32 einsum attention
  (``--fp16-attn example``, ``exact_decode_attention``: an accuracy baseline, slow on purpose).
* **pq_cache_graph** / **fp16_cache_graph**: the same two steps with the WHOLE model step (projections,
  the cache's append and attention in every layer, LM head, argmax) captured once in a CUDA graph and
  replayed: PQ after ``DecodeStep.plan`` each step; fp16 over static buffers holding every step's tokens,
  the new token written at a device-held position and the positions past it masked (a captured shape
  cannot grow). CuPy refuses cuBLAS calls during capture, so both graph methods run their matmuls through
  ``capturable_gemm.CapturableGemm`` (the same cuBLAS, called through ctypes). Their records add
  ``graph_gpu_ms`` (one replay, replays back to back) and ``cache_gpu_ms`` (the cache's own share: append +
  attention of every layer, captured alone).

**Prefill is synthetic**: every sequence's ``context`` tokens are random float16 K / V appended
straight into both caches (one random block reused), rather than running ``context`` tokens through
the model. Decode speed depends on the cache's length and layout, not on which values it holds, so
this keeps a 32K-token run to seconds. The PQ codebooks are random too (codes are computed from
them as usual by ``append``).

Timing: ``--warmup`` steps (3; kernel compilation, cuBLAS plans) are left out, then ``--steps`` (32)
decode steps, each timed with CUDA events recorded around the whole step (host launch gaps
included, since the GPU idles while the host is behind) plus a ``synchronize`` after it. One step
produces one token per sequence, so the step time is the per-token latency. Per method: tokens/s
(batch * steps / total step time), p50 / p99 of the step time and jitter = p99 - p50 (with 32 steps
the p99 is close to the max). Records (suite "e2e") go to ``--out`` through ``harness.write_results``.

    python bench/bench_e2e.py                         # batch 1 and 8, contexts 4K and 32K
    python bench/bench_e2e.py --quick                 # smoke run: 1 layer, small MLP, 1K context, 4 steps
    million-cupy bench e2e [options]

Needs a CUDA GPU usable through CuPy; exits with status 2 and a message otherwise.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import bench_decode  # noqa: E402
import harness  # noqa: E402
from capturable_gemm import CapturableGemm  # noqa: E402

EXIT_NO_GPU = 2
NH, NH_K, D, PAGE, RESIDUAL = 32, 8, 128, 64, 128


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/e2e_<gpu>.json; "
                                            "e2e_quick_<gpu>.json with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="small smoke run: 1 layer, --ffn 1024, vocab 1024, batch 1 and 2, context 1024, 4 steps")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=14336, help="MLP inner size")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768],
                   help="tokens already in the cache of every sequence when decoding starts")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps first")
    p.add_argument("--M", type=int, default=64, help="PQ subspaces")
    p.add_argument("--methods", nargs="+", choices=tuple(RUNNERS), default=list(RUNNERS))
    p.add_argument("--fp16-attn", choices=("cublas", "example"), default="cublas",
                   help="fp16 baseline attention: float16 cuBLAS matmuls, or the example's float32 einsum")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.ffn, args.vocab = 1, 1024, 1024
        args.batches, args.contexts, args.steps, args.warmup = [1, 2], [1024], 4, 1
    if args.hidden % NH or args.hidden // NH != D:
        p.error(f"--hidden must be {NH * D} (32 heads of d = 128), got {args.hidden}")
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1 (the first step compiles kernels)")
    return args


# ------------------------------------------------------------------------------------------------


def kv_block(cp, n: int, seed: int):
    rng = cp.random.default_rng(seed)
    k = rng.standard_normal((n, NH_K, D), dtype=cp.float32).astype(cp.float16)
    v = rng.standard_normal((n, NH_K, D), dtype=cp.float32).astype(cp.float16)
    return k, v


def fp16_attention_cublas(cp, q, k, v, length: int):
    """q (B, nh, d) float32 over the first ``length`` tokens of k, v (B, nh_k, T, d) float16 -> (B, nh, d) float32."""
    B = q.shape[0]
    g = NH // NH_K
    # The big operands (K, V: row-major (T, d) per head) go in untransposed; only the small q / p are transposed.
    qt = q.reshape(B, NH_K, g, D).astype(cp.float16).swapaxes(-1, -2)  # (B, nh_k, d, g)
    kk, vv = k[:, :, :length], v[:, :, :length]
    s = cp.matmul(kk, qt).astype(cp.float32) * (1.0 / math.sqrt(D))  # (B, nh_k, T, g)
    s = cp.exp(s - s.max(axis=-2, keepdims=True))
    s /= s.sum(axis=-2, keepdims=True)
    return cp.matmul(s.astype(cp.float16).swapaxes(-1, -2), vv).astype(cp.float32).reshape(B, NH, D)


class StepTimer:
    """CUDA events around each whole step, plus a synchronize after it."""

    def __init__(self, cp) -> None:
        self.cp = cp
        self.ms: list[float] = []
        self.wall_ms: list[float] = []
        self.breakdown: dict[str, float] = {}  # GPU time of the captured step's parts, where a run measures them

    def run(self, step, warmup: int, steps: int) -> "StepTimer":
        """Time ``warmup + steps`` calls of ``step``, keeping the last ``steps``."""
        for _ in range(warmup + steps):
            self.time(step)
        self.ms, self.wall_ms = self.ms[warmup:], self.wall_ms[warmup:]
        return self

    def time(self, step) -> None:
        cp = self.cp
        cp.cuda.get_current_stream().synchronize()
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        t0 = time.perf_counter()
        start.record()
        step()
        stop.record()
        stop.synchronize()
        self.wall_ms.append((time.perf_counter() - t0) * 1e3)
        self.ms.append(cp.cuda.get_elapsed_time(start, stop))


def run_pq(cp, mc, model, ex, args, batch: int, context: int) -> StepTimer:
    cfg = model.cfg
    # Synthetic prefill (random K / V straight into the cache), shared with the attention benchmark; its
    # residual margin (128 tokens) covers the warm-up and timed steps.
    assert args.warmup + args.steps <= bench_decode.R, "steps beyond the prefill margin"
    cache, seqs = bench_decode.build_cache(cp, batch, context, args.M, layers=cfg.layers)
    decode_step = mc.DecodeStep(cache, NH)
    state = {"tokens": cp.asarray(np.random.default_rng(args.seed).integers(0, cfg.vocab, batch)),
             "pos": cp.full(batch, context, dtype=cp.int64)}

    def step() -> None:
        decode_step.plan(seqs)
        x = model.embed[state["tokens"]]
        for layer in range(cfg.layers):
            q, k, v = model.qkv(layer, x, state["pos"])
            decode_step.append(layer, cp.ascontiguousarray(k, dtype=cp.float16), cp.ascontiguousarray(v, dtype=cp.float16))
            attn = decode_step.run(layer, cp.ascontiguousarray(q, dtype=cp.float16)).astype(cp.float32)
            x = model.finish(layer, x, attn)
        state["tokens"] = model.logits(x).argmax(axis=-1)
        state["pos"] = state["pos"] + 1

    timer = StepTimer(cp).run(step, args.warmup, args.steps)
    del decode_step, cache
    return timer


def run_fp16(cp, mc, model, ex, args, batch: int, context: int) -> StepTimer:
    cfg = model.cfg
    total = context + args.warmup + args.steps
    block = min(context, 16384)
    k_blk, v_blk = kv_block(cp, block, args.seed + 1)
    example = args.fp16_attn == "example"
    # cublas: (B, nh_k, T, d); example: (B, T, nh_k, d), the layout exact_decode_attention takes.
    shape = (batch, total, NH_K, D) if example else (batch, NH_K, total, D)
    ks = [cp.zeros(shape, dtype=cp.float16) for _ in range(cfg.layers)]
    vs = [cp.zeros(shape, dtype=cp.float16) for _ in range(cfg.layers)]
    for layer in range(cfg.layers):  # synthetic prefill, the same random block as the PQ cache
        done = 0
        while done < context:
            n = min(block, context - done)
            kb, vb = (k_blk[:n], v_blk[:n]) if example else (k_blk[:n].swapaxes(0, 1), v_blk[:n].swapaxes(0, 1))
            if example:
                ks[layer][:, done:done + n] = kb[None]
                vs[layer][:, done:done + n] = vb[None]
            else:
                ks[layer][:, :, done:done + n] = kb[None]
                vs[layer][:, :, done:done + n] = vb[None]
            done += n
    del k_blk, v_blk
    rows = cp.arange(batch)
    state = {"tokens": cp.asarray(np.random.default_rng(args.seed).integers(0, cfg.vocab, batch)),
             "pos": cp.full(batch, context, dtype=cp.int64), "n": context}

    def step() -> None:
        x = model.embed[state["tokens"]]
        n = state["n"]
        for layer in range(cfg.layers):
            q, k, v = model.qkv(layer, x, state["pos"])
            if example:
                ks[layer][rows, state["pos"]] = k.astype(cp.float16)
                vs[layer][rows, state["pos"]] = v.astype(cp.float16)
                attn = ex.exact_decode_attention(cp, q, ks[layer], vs[layer], state["pos"] + 1)
            else:  # every sequence has the same length here: one column per step
                ks[layer][:, :, n] = k.astype(cp.float16)
                vs[layer][:, :, n] = v.astype(cp.float16)
                attn = fp16_attention_cublas(cp, q, ks[layer], vs[layer], n + 1)
            x = model.finish(layer, x, attn)
        state["tokens"] = model.logits(x).argmax(axis=-1)
        state["pos"] = state["pos"] + 1
        state["n"] = n + 1

    timer = StepTimer(cp).run(step, args.warmup, args.steps)
    del ks, vs
    return timer


def _capture(stream, body):
    """``body()`` captured on ``stream`` (which must be the current stream) into a CUDA graph."""
    stream.begin_capture()
    body()
    return stream.end_capture()


def _graph_gpu_ms(cp, graph, stream) -> float:
    """GPU time of one replay of ``graph``, replays queued back to back."""
    with stream:
        return harness.time_gpu(lambda: graph.launch(stream), queued=5, repeats=5, warmup=1)["median_us"] * 1e-3


def run_pq_graph(cp, mc, model, ex, args, batch: int, context: int) -> StepTimer:
    """The pq_cache step with the whole model step (projections, append + attention of every layer, LM head,
    argmax) captured once in a CUDA graph and replayed after ``DecodeStep.plan`` each step."""
    cfg = model.cfg
    stream = cp.cuda.Stream(non_blocking=True)
    spare = 2 * (args.warmup + args.steps) + 8
    cache, seqs = bench_decode.build_cache(cp, batch, context, args.M, layers=cfg.layers, spare_tokens=spare,
                                           stream=stream)
    gemm = CapturableGemm(cp, stream)
    previous, model.matmul = model.matmul, gemm.matmul
    step = mc.DecodeStep(cache, NH)
    with stream:
        tokens = cp.asarray(np.random.default_rng(args.seed).integers(0, cfg.vocab, batch))
        pos = cp.full(batch, context, dtype=cp.int64)
        attn_out = cp.empty((cfg.layers, batch, NH, D), dtype=cp.float16)

    def body() -> None:
        x = model.embed[tokens]
        for layer in range(cfg.layers):
            q, k, v = model.qkv(layer, x, pos)
            step.append(layer, cp.ascontiguousarray(k, dtype=cp.float16), cp.ascontiguousarray(v, dtype=cp.float16))
            step.run(layer, cp.ascontiguousarray(q, dtype=cp.float16), out=attn_out[layer])
            x = model.finish(layer, x, attn_out[layer].astype(cp.float32))
        tokens[...] = model.logits(x).argmax(axis=-1)
        pos[...] += 1

    try:
        with stream:
            for _ in range(args.warmup):  # eager: compiles the kernels and fills the memory pool with the step's blocks
                step.plan(seqs)
                body()
            step.plan(seqs)
            graph = _capture(stream, body)
            graph.launch(stream)

            def replay() -> None:
                step.plan(seqs)
                graph.launch(stream)

            timer = StepTimer(cp).run(replay, args.warmup, args.steps)
            step.check()
            timer.breakdown = {"graph_gpu_ms": _graph_gpu_ms(cp, graph, stream), "gemm_rel_err": gemm.selftest()}
            # The cache's own share: append + attention of every layer, from fixed buffers.
            rng = cp.random.default_rng(args.seed)
            kk = rng.standard_normal((batch, NH_K, D), dtype=cp.float32).astype(cp.float16)
            qq = rng.standard_normal((batch, NH, D), dtype=cp.float32).astype(cp.float16)

            def cache_only() -> None:
                for layer in range(cfg.layers):
                    step.append(layer, kk, kk)
                    step.run(layer, qq, out=attn_out[layer])

            timer.breakdown["cache_gpu_ms"] = _graph_gpu_ms(cp, _capture(stream, cache_only), stream)
    finally:
        model.matmul = previous
    del step, cache
    return timer


def run_fp16_graph(cp, mc, model, ex, args, batch: int, context: int) -> StepTimer:
    """The fp16_cache step captured whole in a CUDA graph: static (B, nh_k, T, d) buffers, the new token written
    at a device-held position, attention over the whole buffer with the positions past it masked (a captured
    shape cannot grow), cuBLAS float16 matmuls with float32 accumulation."""
    cfg = model.cfg
    stream = cp.cuda.Stream(non_blocking=True)
    total = context + 2 * (args.warmup + args.steps) + 8
    gemm = CapturableGemm(cp, stream)
    previous, model.matmul = model.matmul, gemm.matmul
    g = NH // NH_K
    with stream:
        k_blk, v_blk = kv_block(cp, min(context, 16384), args.seed + 1)
        ks = [cp.zeros((batch, NH_K, total, D), dtype=cp.float16) for _ in range(cfg.layers)]
        vs = [cp.zeros((batch, NH_K, total, D), dtype=cp.float16) for _ in range(cfg.layers)]
        for layer in range(cfg.layers):
            for done in range(0, context, k_blk.shape[0]):
                n = min(k_blk.shape[0], context - done)
                ks[layer][:, :, done:done + n] = k_blk[:n].swapaxes(0, 1)[None]
                vs[layer][:, :, done:done + n] = v_blk[:n].swapaxes(0, 1)[None]
        del k_blk, v_blk
        tokens = cp.asarray(np.random.default_rng(args.seed).integers(0, cfg.vocab, batch))
        pos = cp.full(batch, context, dtype=cp.int64)
        rows = cp.arange(batch)
        token_index = cp.arange(total)[None, None, :, None]

    def attention(layer: int, q, k, v):
        ks[layer][rows, :, pos] = k.astype(cp.float16)
        vs[layer][rows, :, pos] = v.astype(cp.float16)
        qh = cp.ascontiguousarray(q.reshape(batch, NH_K, g, D), dtype=cp.float16)
        s = gemm.scores(ks[layer], qh) * (1.0 / math.sqrt(D))  # (B, nh_k, T, g)
        s = cp.where(token_index <= pos[:, None, None, None], s, -cp.inf)
        s = cp.exp(s - s.max(axis=-2, keepdims=True))
        s /= s.sum(axis=-2, keepdims=True)
        return gemm.weighted_values(s.astype(cp.float16), vs[layer]).reshape(batch, NH, D)

    def body() -> None:
        x = model.embed[tokens]
        for layer in range(cfg.layers):
            q, k, v = model.qkv(layer, x, pos)
            x = model.finish(layer, x, attention(layer, q, k, v))
        tokens[...] = model.logits(x).argmax(axis=-1)
        pos[...] += 1

    try:
        with stream:
            for _ in range(args.warmup):
                body()
            graph = _capture(stream, body)
            timer = StepTimer(cp).run(lambda: graph.launch(stream), args.warmup, args.steps)
            timer.breakdown = {"graph_gpu_ms": _graph_gpu_ms(cp, graph, stream), "gemm_rel_err": gemm.selftest()}
            rng = cp.random.default_rng(args.seed)
            kk = rng.standard_normal((batch, NH_K, D), dtype=cp.float32)
            qq = rng.standard_normal((batch, NH, D), dtype=cp.float32)
            timer.breakdown["cache_gpu_ms"] = _graph_gpu_ms(
                cp, _capture(stream, lambda: [attention(layer, qq, kk, kk) for layer in range(cfg.layers)]), stream)
    finally:
        model.matmul = previous
    del ks, vs
    return timer


ATTENTION = {"pq_cache": "DecodeStep", "fp16_cache": "fp16_{fp16_attn}", "pq_cache_graph": "DecodeStep",
             "fp16_cache_graph": "fp16_cublas_masked"}
RUNNERS = {"pq_cache": run_pq, "fp16_cache": run_fp16, "pq_cache_graph": run_pq_graph,
           "fp16_cache_graph": run_fp16_graph}


def summarize(timer: StepTimer, batch: int) -> dict:
    ms = np.asarray(timer.ms)
    extra = {k: float(v) for k, v in timer.breakdown.items()}
    p50, p99 = float(np.percentile(ms, 50)), float(np.percentile(ms, 99))
    return {
        "tokens_per_s": float(batch * len(ms) / (ms.sum() * 1e-3)),
        "p50_ms": p50,
        "p99_ms": p99,
        "jitter_ms": p99 - p50,
        "mean_ms": float(ms.mean()),
        "max_ms": float(ms.max()),
        "wall_p50_ms": float(np.percentile(timer.wall_ms, 50)),
        "step_ms": [float(x) for x in ms],
        **extra,
    }


def format_table(records: list[dict]) -> str:
    cols = ["method", "batch", "context", "tokens_per_s", "p50_ms", "p99_ms", "jitter_ms"]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) and abs(v) < 100 else (  # noqa: E731
        f"{v:.1f}" if isinstance(v, float) else str(v))
    rows = [[fmt(r[c]) for c in cols] for r in records]
    widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(cols)]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in [cols] + rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    from million_cupy.interop import gpu_available  # noqa: PLC0415

    if not gpu_available():
        print("bench_e2e: needs a CUDA GPU usable through CuPy (none found on this machine); "
              "run it on a GPU machine.", file=sys.stderr)
        return EXIT_NO_GPU
    import cupy as cp  # noqa: PLC0415

    import llama_decode as ex  # noqa: PLC0415  (examples/llama_decode.py)
    import million_cupy as mc  # noqa: PLC0415

    cfg = ex.Config(vocab=args.vocab, hidden=args.hidden, heads=NH, kv_heads=NH_K, layers=args.layers, ffn=args.ffn)
    t0 = time.perf_counter()
    model = ex.Model(cfg, cp, args.seed)
    cp.cuda.get_current_stream().synchronize()
    print(f"model: hidden {cfg.hidden}, {NH} heads / {NH_K} kv heads (d = {D}), {cfg.layers} layers, ffn {cfg.ffn}, "
          f"vocab {cfg.vocab}; random weights built in {time.perf_counter() - t0:.1f} s")
    print(f"PQ M = {args.M}, page {PAGE}, residual {RESIDUAL}; fp16 baseline attention: {args.fp16_attn}; "
          f"{args.warmup} warm-up + {args.steps} timed steps; synthetic prefill (random K/V appended)")

    records = []
    pool = cp.get_default_memory_pool()
    for context in args.contexts:
        for batch in args.batches:
            for method in args.methods:
                t0 = time.perf_counter()
                timer = RUNNERS[method](cp, mc, model, ex, args, batch, context)
                rec = {"suite": "e2e", "method": method, "batch": batch, "context": context,
                       **summarize(timer, batch),
                       "layers": cfg.layers, "hidden": cfg.hidden, "ffn": cfg.ffn, "vocab": cfg.vocab,
                       "nh": NH, "nh_k": NH_K, "d": D, "steps": args.steps, "warmup": args.warmup,
                       "M": args.M if method == "pq_cache" else None,
                       "attention": ATTENTION[method].format(fp16_attn=args.fp16_attn),
                       "captured": method.endswith("_graph"),
                       "prefill": "synthetic"}
                records.append(rec)
                pool.free_all_blocks()
                print(f"  {method:<10} batch {batch:>3} context {context:>7}: {rec['tokens_per_s']:9.1f} tok/s, "
                      f"p50 {rec['p50_ms']:.3f} ms, p99 {rec['p99_ms']:.3f} ms ({time.perf_counter() - t0:.1f} s)",
                      flush=True)

    gpu = harness.gpu_name().split()[-1].lower()
    out = args.out or ROOT / "bench" / "results" / (f"e2e_quick_{gpu}.json" if args.quick else f"e2e_{gpu}.json")
    harness.write_results(out, records, {"config": {k: (str(v) if isinstance(v, Path) else v)
                                                    for k, v in vars(args).items()}})
    print(f"wrote {out}")
    print()
    print(format_table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
