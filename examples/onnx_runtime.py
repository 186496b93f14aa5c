"""Prompts and decode steps over a paged PQ cache from inside ONNX Runtime sessions (million_cupy.ort).

Registers a :class:`million_cupy.PagedPQCache` under a name, builds two ONNX graphs per layer that name it
(:func:`million_cupy.ort.build_prefill_graph`: ``q, k, v, seq_ids, qo_indptr ->
ai.onnx.contrib::PagedPQPrefillAttention -> out``; :func:`million_cupy.ort.build_decoder_graph`: ``q, k, v,
seq_ids -> ai.onnx.contrib::PagedPQAttention -> out``), feeds the prompts through the first in ragged chunks
(each sequence's next ``--chunk`` tokens, none once its prompt is in), then runs a few decode steps through the
second. Each node appends its tokens' K / V to its layer of the cache and returns their causal attention. A twin
cache fed the same tokens through the library directly (``prefill_attention``, then ``BatchDecodeWrapper`` on a
GPU cache or ``million_cupy.decode`` on a CPU cache) checks every output.

The cache is a GPU cache when a GPU is usable (the op then copies q / k / v host -> device and the
output device -> host on every call: ONNX Runtime's Python ops work on NumPy arrays; see
``million_cupy/ort.py`` for what is copied), else a CPU cache (float64 reference attention).

Without onnx, onnxruntime and onnxruntime-extensions (the ``ort`` extra) it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from typing import Sequence

import numpy as np

import million_cupy as mc
from million_cupy.interop import gpu_available

from _common import model_parser


def unavailable() -> str | None:
    """Why this example cannot run here, or None."""
    missing = [m for m in ("onnx", "onnxruntime", "onnxruntime_extensions") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} not installed (pip install 'million-cupy[ort]')"
    return None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = model_parser(__doc__, head_dim=64, M=32, prompt_len=150,
                     prompt_help="longest prompt (sequence b gets prompt-len - 9*b)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--chunk", type=int, default=64, help="prompt tokens per sequence and prefill call")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--residual", type=int, default=128)
    p.add_argument("--dtype", choices=["float32", "float16"], default="float16", help="graph input / output dtype")
    p.add_argument("--cpu", action="store_true", help="use a CPU cache even when a GPU is usable")
    args = p.parse_args(argv)
    if args.prompt_len - 9 * (args.batch - 1) < 1:
        p.error("--prompt-len must leave every sequence at least one token")
    if args.chunk < 1:
        p.error("--chunk must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    reason = unavailable()
    if reason:
        print(f"onnx_runtime: skipped: {reason}")
        return 0
    from million_cupy import ort as mort  # noqa: PLC0415

    gpu = gpu_available() and not args.cpu
    device = "cuda" if gpu else "cpu"
    if gpu:
        import cupy as cp  # noqa: PLC0415 - only where a GPU is usable
    rng = np.random.default_rng(args.seed)
    L, nh, nh_k, d, B = args.layers, args.heads, args.kv_heads, args.head_dim, args.batch
    dtype = np.dtype(args.dtype)

    # Codebooks from random K / V samples (a real model would use K / V captured from a calibration pass).
    samples = [rng.standard_normal((256, nh_k, d)).astype(np.float32) for _ in range(2 * L)]
    books = mc.ModelCodebooks.train(samples[:L], samples[L:], M=args.M, iters=5, seed=args.seed)
    lens = [args.prompt_len - 9 * b for b in range(B)]
    caches = [
        mc.PagedPQCache(L, nh_k, d, books, page_size=args.page_size, residual=args.residual, max_seqs=B,
                        max_seq_len=max(lens) + args.steps, device=device)
        for _ in range(2)
    ]
    via_ort, direct = caches
    seqs = [via_ort.add_sequence() for _ in range(B)]
    assert seqs == [direct.add_sequence() for _ in range(B)]

    mort.register_cache("example", via_ort)
    prompt_sessions = [mort.make_session(mort.build_prefill_graph(nh, nh_k, d, "example", layer, args.dtype))
                       for layer in range(L)]
    sessions = [mort.make_session(mort.build_decoder_graph(nh, nh_k, d, "example", layer, args.dtype))
                for layer in range(L)]
    print(f"{'GPU' if gpu else 'CPU'} cache: {L} layers, {nh} / {nh_k} heads, d = {d}, M = {args.M}; prompts {lens} "
          f"in chunks of {args.chunk}; graphs: {args.dtype} in / out, ops {mort.DOMAIN}::{mort.PREFILL_OP_TYPE} and "
          f"::{mort.OP_TYPE}")

    def compare(out: np.ndarray, want: np.ndarray) -> float:
        # The ops compute in float32 and the graphs cast their output to the graph dtype: same rounding here.
        return float(np.abs(out.astype(np.float32) - want.astype(dtype).astype(np.float32)).max())

    worst, t_prompt, chunk = 0.0, 0.0, 0
    while True:
        done = np.asarray(via_ort.seq_lens(0, seqs))
        counts = np.minimum(args.chunk, np.asarray(lens) - done)
        if not counts.any():
            break
        ind = np.concatenate([[0], np.cumsum(counts)])
        chunk_worst = 0.0
        for layer, sess in enumerate(prompt_sessions):
            N = int(ind[-1])
            q = rng.standard_normal((N, nh, d)).astype(dtype)
            k = rng.standard_normal((N, nh_k, d)).astype(dtype)
            v = rng.standard_normal((N, nh_k, d)).astype(dtype)
            t = time.perf_counter()
            (out,) = sess.run(None, {"q": q, "k": k, "v": v, "seq_ids": np.asarray(seqs, dtype=np.int64),
                                     "qo_indptr": ind.astype(np.int64)})
            t_prompt += time.perf_counter() - t
            direct.append(layer, seqs, k, v, lengths=counts)
            if gpu:
                want = mc.prefill_attention(direct, layer, seqs, cp.asarray(q.astype(np.float16)), ind).get()
            else:
                want = mc.prefill_attention(direct, layer, seqs, q.astype(np.float32), ind)
            chunk_worst = max(chunk_worst, compare(out, want))
        worst = max(worst, chunk_worst)
        print(f"  prompt chunk {chunk}: new tokens {counts.tolist()}, max |ORT - library| = {chunk_worst:.3g}")
        chunk += 1

    wrapper = mc.BatchDecodeWrapper(direct, nh) if gpu else None
    t_ort = 0.0
    for step in range(args.steps):
        if wrapper is not None:
            wrapper.plan(seqs, new_tokens=1)
        step_worst = 0.0
        for layer, sess in enumerate(sessions):
            q = rng.standard_normal((B, nh, d)).astype(dtype)
            k = rng.standard_normal((B, nh_k, d)).astype(dtype)
            v = rng.standard_normal((B, nh_k, d)).astype(dtype)
            t = time.perf_counter()
            (out,) = sess.run(None, {"q": q, "k": k, "v": v, "seq_ids": np.asarray(seqs, dtype=np.int64)})
            t_ort += time.perf_counter() - t
            direct.append(layer, seqs, k, v)
            if wrapper is not None:
                want = wrapper.run(layer, q.astype(np.float16)).get()
            else:
                want = mc.decode(direct, layer, seqs, q.astype(np.float32))
            step_worst = max(step_worst, compare(out, want))
        worst = max(worst, step_worst)
        print(f"  step {step}: sequence lengths {via_ort.seq_lens(0, seqs).tolist()}, "
              f"max |ORT - library| = {step_worst:.3g}")
    mort.unregister_cache("example")
    calls = args.steps * L
    print(f"{chunk * L} prefill op calls, {1e3 * t_prompt / max(chunk * L, 1):.2f} ms per call; {calls} decode op "
          f"calls, {1e3 * t_ort / max(calls, 1):.2f} ms per call (session.run, including the first call's setup)")
    # CPU: the same float64 reference on the same cache contents, so equal; GPU: the same kernel, so equal
    # up to the order of the split-K merge (kept deterministic by the kernel; a small margin anyway).
    tol = 2e-3 if gpu else 1e-6
    if worst > tol:
        print(f"onnx_runtime: FAILED: ORT output differs from the library by {worst:.3g} (> {tol})")
        return 1
    print("onnx_runtime: ORT session output matches the library")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
