"""A small Llama-shaped decoder generating greedily from a paged PQ KV cache, checked against an exact cache.

The model is written with array-module code only (``xp`` is CuPy on a GPU, NumPy otherwise): random
weights, RMSNorm, rotary embeddings (RoPE), grouped-query attention, a SwiGLU MLP. The script

1. runs the model over a short random *calibration* prompt with exact attention, capturing every
   layer's K (after RoPE, as the cache stores it) and V, and trains the PQ codebooks on them;
2. prefills a batch of random prompts (ragged lengths) with exact causal attention and stores their
   K / V twice: in a :class:`million_cupy.PagedPQCache` and, exactly in float16, in plain arrays;
3. generates ``--new-tokens`` tokens greedily from the PQ cache (``BatchDecodeWrapper`` on the GPU,
   the float64 reference ``million_cupy.decode`` on the CPU), while the same model over the exact
   float16 cache is fed the same tokens (teacher-forced), so every step's logits compare directly;
4. prints tokens/s of both loops, the largest |logit difference|, the relative error of the logits
   and how often the two agree on the top-1 token.

The exact loop is a plain ``xp`` attention (no fused kernel), there only as the accuracy baseline:
its speed is not a benchmark. Run ``python examples/llama_decode.py --help`` for the options
(``--hidden 4096 --heads 32 --kv-heads 8 --layers 32`` and so on for larger shapes; ``--cpu`` forces
the CPU reference path).
"""

from __future__ import annotations

import argparse
import math
import operator
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Sequence

import numpy as np

import million_cupy as mc
from million_cupy.interop import gpu_available


@dataclass(frozen=True)
class Config:
    vocab: int = 1024
    hidden: int = 512
    heads: int = 8
    kv_heads: int = 2
    layers: int = 2
    ffn: int = 1024
    rope_theta: float = 10000.0
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


class Model:
    """Random-weight Llama-style decoder; every array lives in ``xp`` (float32 weights and activations)."""

    def __init__(self, cfg: Config, xp: ModuleType, seed: int, matmul: Callable[[Any, Any], Any] | None = None) -> None:
        """``matmul(a, b)``: the 2-D products of the projections (default ``a @ b``; a benchmark passes one that
        can be captured in a CUDA graph)."""
        self.cfg, self.xp = cfg, xp
        self.matmul = matmul or operator.matmul
        rng = np.random.default_rng(seed)
        H, d = cfg.hidden, cfg.head_dim

        def w(*shape: int) -> Any:  # fan-in scaled, so activations stay O(1) through the layers
            return xp.asarray((rng.standard_normal(shape) / math.sqrt(shape[0])).astype(np.float32))

        self.embed = xp.asarray(rng.standard_normal((cfg.vocab, H)).astype(np.float32))
        self.layers = [
            dict(
                attn_norm=xp.ones(H, dtype=np.float32), wq=w(H, cfg.heads * d), wk=w(H, cfg.kv_heads * d),
                wv=w(H, cfg.kv_heads * d), wo=w(cfg.heads * d, H), mlp_norm=xp.ones(H, dtype=np.float32),
                w_gate=w(H, cfg.ffn), w_up=w(H, cfg.ffn), w_down=w(cfg.ffn, H),
            )
            for _ in range(cfg.layers)
        ]
        self.final_norm = xp.ones(H, dtype=np.float32)
        self.lm_head = w(H, cfg.vocab)
        # RoPE inverse frequencies (Llama: theta^(-2i/d)).
        self.inv_freq = xp.asarray(cfg.rope_theta ** (-np.arange(0, d, 2, dtype=np.float64) / d), dtype=np.float32)

    def rmsnorm(self, x: Any, weight: Any) -> Any:
        xp = self.xp
        return x * (1.0 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + self.cfg.eps)) * weight

    def rope(self, x: Any, pos: Any) -> Any:
        """Rotary embedding of ``x`` (N, heads, d) at positions ``pos`` (N,), Llama's rotate-half form."""
        xp = self.xp
        ang = pos.astype(np.float32)[:, None] * self.inv_freq[None, :]  # (N, d/2)
        cos = xp.concatenate([xp.cos(ang)] * 2, axis=-1)[:, None, :]
        sin = xp.concatenate([xp.sin(ang)] * 2, axis=-1)[:, None, :]
        half = x.shape[-1] // 2
        rotated = xp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def qkv(self, layer: int, x: Any, pos: Any) -> tuple[Any, Any, Any]:
        """Query (N, nh, d), key and value (N, nh_k, d) of tokens ``x`` (N, H) at positions ``pos``."""
        cfg, p = self.cfg, self.layers[layer]
        h = self.rmsnorm(x, p["attn_norm"])
        n, d = x.shape[0], cfg.head_dim
        q = self.rope(self.matmul(h, p["wq"]).reshape(n, cfg.heads, d), pos)
        k = self.rope(self.matmul(h, p["wk"]).reshape(n, cfg.kv_heads, d), pos)
        v = self.matmul(h, p["wv"]).reshape(n, cfg.kv_heads, d)
        return q, k, v

    def finish(self, layer: int, x: Any, attn: Any) -> Any:
        """Residual stream after the attention output ``attn`` (N, nh, d) and the MLP."""
        xp, p = self.xp, self.layers[layer]
        mm = self.matmul
        x = x + mm(attn.reshape(x.shape[0], -1), p["wo"])
        h = self.rmsnorm(x, p["mlp_norm"])
        gate = mm(h, p["w_gate"])
        return x + mm(gate / (1.0 + xp.exp(-gate)) * mm(h, p["w_up"]), p["w_down"])

    def logits(self, x: Any) -> Any:
        return self.matmul(self.rmsnorm(x, self.final_norm), self.lm_head)

    def prefill(self, tokens: Any) -> tuple[Any, list[tuple[Any, Any]]]:
        """Exact causal attention over one prompt: (last-position logits (V,), per-layer float16 (K, V) (T, nh_k, d))."""
        xp, cfg = self.xp, self.cfg
        T = tokens.shape[0]
        pos = xp.arange(T)
        x = self.embed[tokens]
        g = cfg.heads // cfg.kv_heads
        mask = xp.triu(xp.ones((T, T), dtype=bool), k=1)
        kv = []
        for layer in range(cfg.layers):
            q, k, v = self.qkv(layer, x, pos)
            # Stored (and attended) in float16, as both caches hold them.
            k16, v16 = k.astype(np.float16), v.astype(np.float16)
            kv.append((k16, v16))
            kf = xp.repeat(k16.astype(np.float32), g, axis=1)
            vf = xp.repeat(v16.astype(np.float32), g, axis=1)
            s = xp.einsum("thd,shd->hts", q, kf) / math.sqrt(cfg.head_dim)
            s = xp.where(mask[None], -xp.inf, s)
            s = xp.exp(s - s.max(axis=-1, keepdims=True))
            s /= s.sum(axis=-1, keepdims=True)
            x = self.finish(layer, x, xp.einsum("hts,shd->thd", s, vf))
        return self.logits(x[-1:])[0], kv


def exact_decode_attention(xp: ModuleType, q: Any, k: Any, v: Any, lens: Any) -> Any:
    """Attention of q (B, nh, d) over the first ``lens[b]`` rows of k, v (B, T, nh_k, d) (float16), in float32."""
    B, nh, d = q.shape
    nh_k = k.shape[2]
    qg = q.reshape(B, nh_k, nh // nh_k, d)
    s = xp.einsum("bkgd,btkd->bkgt", qg, k.astype(np.float32)) / math.sqrt(d)
    s = xp.where((xp.arange(k.shape[1])[None, :] < lens[:, None])[:, None, None, :], s, -xp.inf)
    s = xp.exp(s - s.max(axis=-1, keepdims=True))
    s /= s.sum(axis=-1, keepdims=True)
    return xp.einsum("bkgt,btkd->bkgd", s, v.astype(np.float32)).reshape(B, nh, d)


def _sync(xp: ModuleType) -> None:
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def _host(x: Any) -> np.ndarray:
    return x.get() if hasattr(x, "get") else np.asarray(x)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--ffn", type=int, default=1024, help="MLP inner size")
    p.add_argument("--batch", type=int, default=2, help="sequences decoded together")
    p.add_argument("--prompt-len", type=int, default=240,
                   help="tokens of the longest prompt (sequence b gets prompt-len - 5*b)")
    p.add_argument("--calib-len", type=int, default=256, help="calibration prompt tokens (codebook training)")
    p.add_argument("--new-tokens", type=int, default=24, help="tokens generated per sequence")
    p.add_argument("--M", type=int, default=None, help="PQ subspaces (default head_dim // 2)")
    p.add_argument("--kmeans-iters", type=int, default=10)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--residual", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="use the CPU reference path even when a GPU is usable")
    args = p.parse_args(argv)
    cfg_d = args.hidden // args.heads
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error(f"--hidden must be a multiple of --heads and --heads of --kv-heads, got {args.hidden}, {args.heads}, {args.kv_heads}")
    if cfg_d not in (64, 128, 256):
        p.error(f"head dim hidden / heads must be 64, 128 or 256 (the kernels' head dims), got {cfg_d}")
    if args.calib_len * args.kv_heads < 256:
        p.error(f"--calib-len * --kv-heads must be >= 256 (k-means with 256 centroids), got {args.calib_len * args.kv_heads}")
    if args.prompt_len - 5 * (args.batch - 1) < 1 or args.new_tokens < 1:
        p.error("--prompt-len must leave every sequence at least one token, and --new-tokens must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    gpu = gpu_available() and not args.cpu
    if gpu:
        import cupy as xp  # noqa: PLC0415
    else:
        xp = np
    cfg = Config(vocab=args.vocab, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                 layers=args.layers, ffn=args.ffn)
    d, B = cfg.head_dim, args.batch
    M = args.M or d // 2
    print(f"path: {'GPU (CuPy, BatchDecodeWrapper)' if gpu else 'CPU (NumPy, float64 reference decode)'}")
    print(f"model: hidden {cfg.hidden}, {cfg.heads} heads / {cfg.kv_heads} kv heads (head dim {d}), {cfg.layers} layers, "
          f"vocab {cfg.vocab}; PQ M = {M}, page {args.page_size}, residual {args.residual}")
    model = Model(cfg, xp, args.seed)
    rng = np.random.default_rng(args.seed + 1)

    # 1. Codebooks from K / V of a calibration pass (exact attention).
    t0 = time.perf_counter()
    _, calib_kv = model.prefill(xp.asarray(rng.integers(0, cfg.vocab, args.calib_len)))
    books = mc.ModelCodebooks.train([k for k, _ in calib_kv], [v for _, v in calib_kv], M=M,
                                    iters=args.kmeans_iters, seed=args.seed)
    _sync(xp)
    print(f"codebooks: {cfg.layers} layers x (K, V) trained on {args.calib_len} tokens in {time.perf_counter() - t0:.2f} s")

    # 2. Prefill a ragged batch into both caches.
    lens = np.array([args.prompt_len - 5 * b for b in range(B)], dtype=np.int64)
    max_len = int(lens.max()) + args.new_tokens
    cache = mc.PagedPQCache(cfg.layers, cfg.kv_heads, d, books, page_size=args.page_size, residual=args.residual,
                            max_seqs=B, max_seq_len=max_len, dtype="float16", device="cuda" if gpu else "cpu")
    seq_ids = [cache.add_sequence() for _ in range(B)]
    exact_k = [xp.zeros((B, max_len, cfg.kv_heads, d), dtype=np.float16) for _ in range(cfg.layers)]
    exact_v = [xp.zeros_like(a) for a in exact_k]
    first_logits, prompt_kv = [], []
    for b in range(B):
        logit, kv = model.prefill(xp.asarray(rng.integers(0, cfg.vocab, int(lens[b]))))
        first_logits.append(logit)
        prompt_kv.append(kv)
        for layer, (k, v) in enumerate(kv):
            exact_k[layer][b, : lens[b]] = k
            exact_v[layer][b, : lens[b]] = v
    for layer in range(cfg.layers):  # one batched append per layer: the prompts' tokens back to back
        cache.append(layer, seq_ids, xp.concatenate([kv[layer][0] for kv in prompt_kv]),
                     xp.concatenate([kv[layer][1] for kv in prompt_kv]), lengths=lens)
    stats = cache.stats()
    print(f"prefill: prompts of {lens.tolist()} tokens; PQ cache {stats['bytes_per_token']} B/token in pages vs "
          f"{stats['fp16_bytes_per_token']} B fp16 ({stats['compression_ratio']:.1f}x), {stats['used']} pages used")

    # 3. Greedy decoding from the PQ cache; the exact model is fed the same tokens.
    decode_step = mc.DecodeStep(cache, cfg.heads) if gpu else None  # the CPU path appends and decodes per call
    tokens = xp.stack(first_logits).argmax(axis=-1)  # both models share the prefill, hence this token
    pos = xp.asarray(lens)
    diffs, rel_num, rel_den, agree, generated = [], 0.0, 0.0, 0, []
    t_pq = t_exact = 0.0
    for step in range(args.new_tokens):
        # PQ model
        _sync(xp)
        t = time.perf_counter()
        if decode_step is not None:
            decode_step.plan(seq_ids)  # the step's token in every layer: metadata for all layers in one copy
        x = model.embed[tokens]
        for layer in range(cfg.layers):
            q, k, v = model.qkv(layer, x, pos)
            if decode_step is not None:
                # append this token's K / V and attend, in one call
                attn = decode_step.run(layer, xp.ascontiguousarray(q, dtype=np.float16),
                                       k=xp.ascontiguousarray(k, dtype=np.float16),
                                       v=xp.ascontiguousarray(v, dtype=np.float16)).astype(np.float32)
            else:
                cache.append(layer, seq_ids, k.astype(np.float16), v.astype(np.float16))
                attn = mc.decode(cache, layer, seq_ids, q)
            x = model.finish(layer, x, attn)
        pq_logits = model.logits(x)
        _sync(xp)
        if step:  # the first step also compiles the kernels (GPU): left out of the rate
            t_pq += time.perf_counter() - t

        # Exact model, same tokens
        t = time.perf_counter()
        x = model.embed[tokens]
        rows = xp.arange(B)
        for layer in range(cfg.layers):
            q, k, v = model.qkv(layer, x, pos)
            exact_k[layer][rows, pos] = k.astype(np.float16)
            exact_v[layer][rows, pos] = v.astype(np.float16)
            x = model.finish(layer, x, exact_decode_attention(xp, q, exact_k[layer], exact_v[layer], pos + 1))
        exact_logits = model.logits(x)
        _sync(xp)
        if step:
            t_exact += time.perf_counter() - t

        a, e = _host(pq_logits).astype(np.float64), _host(exact_logits).astype(np.float64)
        diffs.append(np.abs(a - e).max())
        rel_num += float(((a - e) ** 2).sum())
        rel_den += float((e**2).sum())
        agree += int((a.argmax(axis=-1) == e.argmax(axis=-1)).sum())
        tokens = pq_logits.argmax(axis=-1)  # greedy, from the PQ model
        generated.append(_host(tokens))
        pos = pos + 1

    timed = (args.new_tokens - 1) * B
    rate = (lambda s: f"{timed / s:,.1f} tokens/s" if timed and s > 0 else "n/a (one step)")
    print(f"generated {args.new_tokens} tokens x {B} sequences; first sequence: {np.stack(generated)[:, 0].tolist()[:16]}")
    print(f"PQ cache decode:    {rate(t_pq)}")
    print(f"exact fp16 decode:  {rate(t_exact)} (plain {xp.__name__} attention, accuracy baseline only)")
    print(f"max |logit diff|:   {max(diffs):.4g}")
    print(f"relative error:     {math.sqrt(rel_num / rel_den):.4g} (L2 over all steps' logits)")
    print(f"top-1 agreement:    {agree / (args.new_tokens * B):.1%}")
    print(f"cache after decode: {cache.stats()['flushes']} page writes (counted per layer), sequence lengths "
          f"{cache.seq_lens(0, seq_ids).tolist()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
