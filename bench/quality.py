#!/usr/bin/env python
"""What the PQ cache does to a real model: perplexity, passkey retrieval and greedy generation (GPU).

The model is the small Llama of ``bench/lm.py`` (trained here on the Python standard library's sources;
``--train-minutes`` trains it first when ``--model`` holds none). Codebooks are calibrated on training
text only (:func:`million_cupy.integrations.transformers.calibrate`); everything is measured on the
held-out files.

* **Perplexity** at contexts 512, 2K and 8K (non-overlapping windows of the held-out stream, ``--tokens``
  per context, every token scored). Quantization follows the cache's own rule for every query position
  ``t``: the tokens in full pages at that point (``P * pages(t + 1)``, page 64, window 128) are read
  dequantized, the residual window exactly (the ``_all`` variants quantize every token, as MILLION's
  perplexity logs do). This runs as an attention function registered with transformers
  (``"million_sim"``): float32 attention over the exact and the dequantized K/V of the same forward, so
  the whole window is scored in one pass. ``sim_vs_kernels`` checks it against the real decode path
  (prefill, then token-by-token decode through :class:`PQCache` and the CUDA kernels) on held-out text.
* Methods: ``fp16``; ``pq_M{64,32}_{layer,head}`` (codebooks per layer shared by the kv heads, or per kv
  head); ``kivi_int{4,2}`` (keys per channel over groups of 128 tokens, values per token over groups of
  128 channels, fp16 scale and zero: 4.25 / 2.25 bits per value, against PQ's 4 / 2); ``_sink4``: the
  first 4 tokens of every sequence kept exact.
* **Retrieval**: a 5-digit passkey at depths 0.1 … 0.9 of held-out text at 2K and 8K tokens, asked for at
  the end; greedy answer through the real integration (exact prefill, then decode through the kernels).
* **Greedy generation**: 128 tokens after held-out prompts, PQ against the fp16 run.

    python bench/quality.py --model /tmp/million_lm --out bench/results/quality_h200.json
    python bench/quality.py --train-minutes 5 ...   # train the model first (bench/lm.py)

Outputs: the JSON (harness schema, suite "quality"), ``quality_h200.md`` and ``quality_h200.png`` beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import accuracy  # noqa: E402
import harness  # noqa: E402
import lm  # noqa: E402

from million_cupy.layout import full_pages  # noqa: E402

PAGE, RESIDUAL = 64, 128
CONTEXTS = (512, 2048, 8192)
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
SIM_NAME = "million_sim"
KIVI_GROUP = 128


# --------------------------------------------------------------------------------------------------
# Simulated quantization inside a forward (the cache's flush rule per query position)
# --------------------------------------------------------------------------------------------------


class Quantizer:
    """Dequantized K/V of one layer for one method; ``None`` fields mean exact."""

    def __init__(self, name: str, *, books=None, kivi_bits: int | None = None, sinks: int = 0,
                 every_token: bool = False, bits: float = 16.0) -> None:
        self.name, self.books, self.kivi_bits = name, books, kivi_bits
        self.sinks, self.every_token, self.bits = sinks, every_token, bits

    @property
    def exact(self) -> bool:
        return self.books is None and self.kivi_bits is None

    def __call__(self, layer: int, k, v):
        """``k``, ``v``: torch ``(T, nh_k, d)`` → dequantized float32 torch tensors on the same device (CuPy
        kernels for GPU tensors, the NumPy reference for CPU ones)."""
        import torch

        if k.is_cuda:
            import cupy as xp

            kx, vx = xp.from_dlpack(k.contiguous()), xp.from_dlpack(v.contiguous())
            back = torch.from_dlpack
        else:
            xp = np
            kx, vx, back = k.float().numpy(), v.float().numpy(), torch.from_numpy
        if self.books is not None:
            kq, vq = accuracy.pq_roundtrip(kx, self.books, 0, layer), accuracy.pq_roundtrip(vx, self.books, 1, layer)
        else:
            assert self.kivi_bits is not None  # not exact and no codebooks: a KIVI method
            kq, vq = accuracy.kivi(kx, vx, self.kivi_bits, KIVI_GROUP)
        return back(xp.ascontiguousarray(kq, dtype=xp.float32)), back(xp.ascontiguousarray(vq, dtype=xp.float32))


class Simulation:
    """State of the ``"million_sim"`` attention: the method, and queries below ``exact_below`` attend
    exactly (a prefill of that many tokens, as the real cache does)."""

    quantizer: Quantizer | None = None
    exact_below = 0


SIM = Simulation()


def quantized_key_mask(T: int, rows, sinks: int, every_token: bool, exact_below: int, device):
    """Bool ``(len(rows), T)``: key ``j`` is read dequantized by query ``t`` (the flush rule)."""
    import torch

    t = np.asarray(rows)
    main = (t + 1) if every_token else full_pages(t + 1, PAGE, RESIDUAL) * PAGE
    main = np.where(t < exact_below, 0, main)
    j = torch.arange(T, device=device)
    return (j[None, :] < torch.as_tensor(main, device=device)[:, None]) & (j[None, :] >= sinks)


def sim_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """``"million_sim"``: causal attention where each query reads the keys in full pages dequantized."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    quant = SIM.quantizer
    if quant is None or quant.exact:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling,
                                      **kwargs)
    B, nh, T, d = query.shape
    g = nh // key.shape[1]
    scale = scaling if scaling is not None else d ** -0.5
    out = torch.empty((B, T, nh, d), dtype=query.dtype, device=query.device)
    chunk = max(1, (1 << 27) // (nh * T))  # query rows per chunk: ~512 MB of fp32 scores
    for b in range(B):
        kq, vq = quant(module.layer_idx, key[b].transpose(0, 1), value[b].transpose(0, 1))  # (T, nh_k, d)
        kq = kq.transpose(0, 1).repeat_interleave(g, 0)
        vq = vq.transpose(0, 1).repeat_interleave(g, 0)
        k = key[b].float().repeat_interleave(g, 0)
        v = value[b].float().repeat_interleave(g, 0)
        q = query[b].float()
        for a in range(0, T, chunk):
            e = min(T, a + chunk)
            rows = np.arange(a, e)
            mask = quantized_key_mask(e, rows, quant.sinks, quant.every_token, SIM.exact_below, query.device)
            causal = torch.ones(e - a, e, dtype=torch.bool, device=query.device).tril(a)
            s_exact = q[:, a:e] @ k[:, :e].transpose(1, 2)
            s_quant = q[:, a:e] @ kq[:, :e].transpose(1, 2)
            s = torch.where(mask, s_quant, s_exact).mul_(scale).masked_fill_(~causal, float("-inf"))
            p = torch.softmax(s, dim=-1)
            pq = p * mask
            o = pq @ vq[:, :e] + (p - pq) @ v[:, :e]
            out[b, a:e] = o.transpose(0, 1).to(query.dtype)
    return out, None


def register_simulation() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SIM_NAME, sim_attention)
    AttentionMaskInterface.register(SIM_NAME, sdpa_mask)


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


def perplexity(model, stream: np.ndarray, context: int, tokens: int, quant: Quantizer, batch_tokens: int = 32768):
    """exp(mean NLL) over non-overlapping ``context`` windows of ``stream`` (``tokens`` in all)."""
    import torch

    n = max(1, min(tokens // context, (stream.size - 1) // context))
    windows = torch.from_numpy(stream[: n * context].reshape(n, context).astype(np.int64))
    per_batch = max(1, batch_tokens // context)
    SIM.quantizer, SIM.exact_below = quant, 0
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, n, per_batch):
            ids = windows[i:i + per_batch].cuda()
            logits = model(input_ids=ids, use_cache=False).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     ids[:, 1:].reshape(-1), reduction="sum")
            nll += float(loss)
            count += ids[:, 1:].numel()
    SIM.quantizer = None
    return math.exp(nll / count), count


def sim_vs_kernels(model, books, stream: np.ndarray, prefill: int = 256, total: int = 1024) -> dict:
    """The simulation against the real path (prefill + token-by-token decode through PQCache's kernels)
    on one held-out window: NLL of the decoded positions, logit differences, argmax agreement."""
    import torch
    from million_cupy.integrations.transformers import PQCache, use_pq_attention

    ids = torch.from_numpy(stream[:total].astype(np.int64))[None].cuda()
    with torch.no_grad():
        SIM.quantizer, SIM.exact_below = Quantizer("pq", books=books), prefill
        model.set_attn_implementation(SIM_NAME)
        sim = model(input_ids=ids, use_cache=False).logits[0, prefill - 1:total - 1].float()
        SIM.quantizer, SIM.exact_below = None, 0
        use_pq_attention(model)
        cache = PQCache(model, books, max_seq_len=total + 64)
        out = model(input_ids=ids[:, :prefill], past_key_values=cache, use_cache=True)
        real = [out.logits[0, -1].float()]
        for t in range(prefill, total - 1):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            real.append(out.logits[0, -1].float())
        real = torch.stack(real)
        model.set_attn_implementation("sdpa")
    target = ids[0, prefill:total]
    nll = lambda lg: float(torch.nn.functional.cross_entropy(lg, target))  # noqa: E731
    return {"suite": "quality", "method": "sim_vs_kernels", "prefill": prefill, "tokens": total,
            "nll_sim": nll(sim), "nll_kernels": nll(real), "max_abs_logit_diff": float((sim - real).abs().max()),
            "argmax_agreement": float((sim.argmax(-1) == real.argmax(-1)).float().mean()),
            "cache_stats": {k: v for k, v in cache.stats().items() if isinstance(v, (int, float, bool))}}


def greedy(model, ids, new_tokens: int, books=None):
    """Greedy continuation of ``ids`` (B, T) through an fp16 DynamicCache (books None) or a PQCache."""
    import torch
    from transformers import DynamicCache
    from million_cupy.integrations.transformers import PQCache, use_pq_attention

    if books is None:
        model.set_attn_implementation("sdpa")
        cache = DynamicCache(config=model.config)
    else:
        use_pq_attention(model)
        cache = PQCache(model, books, max_seq_len=ids.shape[1] + new_tokens + 64)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             past_key_values=cache, pad_token_id=lm.SEP, eos_token_id=None,
                             min_new_tokens=new_tokens)
    model.set_attn_implementation("sdpa")
    return out[:, ids.shape[1]:]


def retrieval(model, stream: np.ndarray, books_by_method: dict, contexts, trials: int, seed: int) -> list[dict]:
    import torch

    records = []
    for context in contexts:
        for depth in DEPTHS:
            rng = np.random.default_rng(seed + context + int(depth * 100))
            prompts = [lm.passkey_prompt(stream, rng, context, depth) for _ in range(trials)]
            ids = torch.from_numpy(np.stack([p[0] for p in prompts]).astype(np.int64)).cuda()
            keys = [p[1] for p in prompts]
            for method, books in books_by_method.items():
                got = greedy(model, ids, 5, books).cpu().numpy()
                answers = ["".join(chr(c) if c < 256 else "?" for c in row) for row in got]
                hits = sum(a == k for a, k in zip(answers, keys))
                records.append({"suite": "quality", "method": method, "test": "passkey", "context": context,
                                "depth": depth, "trials": trials, "accuracy": hits / trials,
                                "examples": [[k, a] for k, a in zip(keys[:3], answers[:3])]})
                print(f"passkey {method:14s} {context:5d} depth {depth:.1f}: {hits}/{trials}", flush=True)
    return records


def generation_agreement(model, stream: np.ndarray, books_by_method: dict, prompts: int, prompt_len: int,
                         new_tokens: int, seed: int) -> list[dict]:
    import torch

    rng = np.random.default_rng(seed)
    starts = rng.integers(0, stream.size - prompt_len, prompts)
    ids = torch.from_numpy(np.stack([stream[s:s + prompt_len] for s in starts]).astype(np.int64)).cuda()
    ref = greedy(model, ids, new_tokens).cpu().numpy()
    records = []
    for method, books in books_by_method.items():
        if books is None:
            continue
        got = greedy(model, ids, new_tokens, books).cpu().numpy()
        same = got == ref
        first = [int(np.argmin(r)) if not r.all() else new_tokens for r in same]
        records.append({"suite": "quality", "method": method, "test": "greedy", "prompts": prompts,
                        "prompt_tokens": prompt_len, "new_tokens": new_tokens,
                        "token_agreement": float(same.mean()), "first_divergence_mean": float(np.mean(first)),
                        "identical_runs": int(same.all(axis=1).sum())})
    return records


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


#: Training budget when the study finds no model: the recorded run's (bench/results/quality_h200.json);
#: ``--quick`` trains a smoke-test model only.
DEFAULT_TRAIN_MINUTES = 4.6
QUICK_TRAIN_MINUTES = 0.4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="/tmp/million_lm", help="bench/lm.py's output folder")
    p.add_argument("--train-minutes", type=float, default=None,
                   help="train the model first (bench/lm.py); default: only when --model holds none, for "
                        f"{DEFAULT_TRAIN_MINUTES} minutes ({QUICK_TRAIN_MINUTES} with --quick)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "quality_h200.json"))
    p.add_argument("--tokens", type=int, default=131072, help="scored tokens per context")
    p.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    p.add_argument("--calib-seqs", type=int, default=8, help="training sequences of 4K tokens for calibration")
    p.add_argument("--iters", type=int, default=25, help="k-means iterations")
    p.add_argument("--trials", type=int, default=8, help="passkey prompts per depth and context")
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def markdown(records: list[dict], meta: dict) -> str:
    lines = ["# Quality of the PQ cache on a real model (bench/quality.py)", "",
             f"Model: {meta['params'] / 1e6:.1f}M-parameter Llama (bench/lm.py), {meta['tokens'] / 1e6:.0f}M training "
             f"tokens in {meta['seconds']:.0f} s; corpus: {meta['corpus']['train_files']} training / "
             f"{meta['corpus']['held_out_files']} held-out stdlib files.", "",
             "## Held-out perplexity", "", "| method | bits/value | " + " | ".join(f"ctx {c}" for c in CONTEXTS) + " |",
             "|---|---|" + "---|" * len(CONTEXTS)]
    ppl = [r for r in records if r.get("test") == "perplexity"]
    base = {r["context"]: r["ppl"] for r in ppl if r["method"] == "fp16"}
    for method in dict.fromkeys(r["method"] for r in ppl):
        rows = {r["context"]: r for r in ppl if r["method"] == method}
        bits = next(iter(rows.values()))["bits_per_value"]
        cells = [f"{rows[c]['ppl']:.4f} ({100 * (rows[c]['ppl'] / base[c] - 1):+.2f} %)" if c in rows and c in base
                 else "—" for c in CONTEXTS]
        lines.append(f"| {method} | {bits:g} | " + " | ".join(cells) + " |")
    pk = [r for r in records if r.get("test") == "passkey"]
    if pk:
        lines += ["", "## Passkey retrieval (accuracy per depth)", "",
                  "| method | context | " + " | ".join(f"{d:.1f}" for d in DEPTHS) + " |",
                  "|---|---|" + "---|" * len(DEPTHS)]
        for method in dict.fromkeys(r["method"] for r in pk):
            for c in sorted({r["context"] for r in pk}):
                rows = {r["depth"]: r["accuracy"] for r in pk if r["method"] == method and r["context"] == c}
                lines.append(f"| {method} | {c} | " + " | ".join(f"{rows.get(d, float('nan')):.2f}" for d in DEPTHS)
                             + " |")
    gen = [r for r in records if r.get("test") == "greedy"]
    if gen:
        lines += ["", "## Greedy generation against fp16", "", "| method | token agreement | first divergence "
                  "(mean) | identical runs |", "|---|---|---|---|"]
        for r in gen:
            lines.append(f"| {r['method']} | {r['token_agreement']:.3f} | {r['first_divergence_mean']:.1f} of "
                         f"{r['new_tokens']} | {r['identical_runs']} / {r['prompts']} |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ppl = [r for r in records if r.get("test") == "perplexity"]
    base = {r["context"]: r["ppl"] for r in ppl if r["method"] == "fp16"}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method in dict.fromkeys(r["method"] for r in ppl):
        if method == "fp16":
            continue
        rows = sorted((r["context"], 100 * (r["ppl"] / base[r["context"]] - 1)) for r in ppl if r["method"] == method)
        ax.plot([c for c, _ in rows], [v for _, v in rows], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("perplexity increase over fp16 (%)")
    ax.set_title("PQ cache vs KIVI on a real model (held-out stdlib sources)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    harness.require_gpu("quality")
    import torch
    from million_cupy.integrations.transformers import calibrate

    minutes = args.train_minutes
    if minutes is None and not (Path(args.model) / "meta.json").exists():
        minutes = QUICK_TRAIN_MINUTES if args.quick else DEFAULT_TRAIN_MINUTES
        print(f"no trained model in {args.model}: training one first (bench/lm.py, {minutes} minutes)", flush=True)
    if minutes:
        lm.main(["--out", args.model, "--minutes", str(minutes)])
    if args.quick:
        args.tokens, args.trials, args.calib_seqs, args.iters = 8192, 2, 2, 4
    contexts = [int(c) for c in args.contexts.split(",")]
    model, meta = lm.load(args.model)
    register_simulation()
    model.set_attn_implementation(SIM_NAME)
    root, train_files, held_files = lm.corpus_files(meta["corpus"]["root"])
    train_stream, held_stream = lm.token_stream(train_files), lm.token_stream(held_files)
    rng = np.random.default_rng(args.seed)
    calib = [torch.from_numpy(np.stack([train_stream[s:s + 4096] for s in
                                        rng.integers(0, train_stream.size - 4096, 2)]).astype(np.int64))
             for _ in range(max(1, args.calib_seqs // 2))]
    t0 = time.perf_counter()
    books = {}
    for M in (64, 32):
        for per_head in (False, True):
            books[(M, per_head)] = calibrate(model, calib, M=M, per_head=per_head, iters=args.iters, seed=args.seed,
                                             progress=False)
    calib_s = time.perf_counter() - t0
    print(f"calibrated 4 codebook sets in {calib_s:.0f} s", flush=True)
    model.set_attn_implementation(SIM_NAME)
    methods = [Quantizer("fp16")]
    for M, bits in ((64, 4.0), (32, 2.0)):
        for per_head, tag in ((False, "layer"), (True, "head")):
            methods.append(Quantizer(f"pq_M{M}_{tag}", books=books[(M, per_head)], bits=bits))
        methods.append(Quantizer(f"pq_M{M}_head_sink4", books=books[(M, True)], sinks=4, bits=bits))
        methods.append(Quantizer(f"pq_M{M}_head_all", books=books[(M, True)], every_token=True, bits=bits))
    for b in (4, 2):
        methods.append(Quantizer(f"kivi_int{b}", kivi_bits=b, bits=b + 32 / KIVI_GROUP))
        methods.append(Quantizer(f"kivi_int{b}_sink4", kivi_bits=b, sinks=4, bits=b + 32 / KIVI_GROUP))
    records: list[dict] = []
    out = Path(args.out)
    extra = {"config": {"page_size": PAGE, "residual": RESIDUAL, "contexts": contexts, "tokens": args.tokens,
                        "calibration": f"{args.calib_seqs} training sequences of 4096 tokens, {args.iters} k-means "
                                       f"iterations, calibrate() of million_cupy.integrations.transformers",
                        "calibration_seconds": calib_s, "kivi_group": KIVI_GROUP},
             "model": {k: v for k, v in meta.items() if k != "log"}, "training_log": meta.get("log")}

    def save():
        harness.write_results(out, records, extra)

    for quant in methods:
        for context in contexts:
            t = time.perf_counter()
            ppl, count = perplexity(model, held_stream, context, args.tokens, quant)
            records.append({"suite": "quality", "method": quant.name, "test": "perplexity", "context": context,
                            "M": quant.books.M if quant.books is not None else None,
                            "bits_per_value": quant.bits, "ppl": ppl, "tokens": count, "batch": 1,
                            "seconds": time.perf_counter() - t})
            print(f"ppl {quant.name:18s} ctx {context:5d}: {ppl:.4f}  ({time.perf_counter() - t:.1f} s)", flush=True)
        save()
    model.set_attn_implementation("sdpa")
    records.append(sim_vs_kernels(model, books[(64, True)], held_stream))
    print("sim vs kernels:", {k: v for k, v in records[-1].items() if k != "cache_stats"}, flush=True)
    save()
    pick = {"fp16": None, "pq_M64_head": books[(64, True)], "pq_M32_head": books[(32, True)]}
    records += retrieval(model, held_stream, pick, [c for c in contexts if c >= 2048] or contexts, args.trials,
                         args.seed)
    save()
    records += generation_agreement(model, held_stream, pick, 4, 1024, 128, args.seed)
    save()
    md = markdown(records, meta)
    out.with_suffix(".md").write_text(md)
    plot(records, out.with_suffix(".png"))
    print(md)
    return records


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
