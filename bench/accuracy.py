#!/usr/bin/env python
"""Attention accuracy of PQ KV caches against uniform quantization at equal bits per value (CPU).

    python bench/accuracy.py            # default study, about 4 minutes on an idle 2-core CPU
    python bench/accuracy.py --quick    # small smoke run (seconds), writes accuracy_quick.*

Workload: synthetic caches from ``bench/kvgen.py`` (outlier key channels, RoPE, heavy-tailed values,
attention sinks, queries correlated with keys), one layer per seed: ``--tokens`` (4096) context tokens,
``--queries`` (32) decode queries, nh 32, nh_k 8, d 128, seeds 0 and 1.

Error: for every decode query, ``||o - o_ref|| / ||o_ref||`` over all its heads' outputs, where ``o_ref``
is float64 attention (:func:`million_cupy.reference.decode_attention`) over the fp16-rounded K/V (what
an fp16 cache holds) and ``o`` the same attention over the dequantized K/V. ``rel_err_mean`` /
``rel_err_std`` are over all queries of all seeds; ``rel_err_per_seed`` gives each seed's mean. Every
token is quantized, the most recent ones included (the fp16 residual windows of the MILLION and KIVI
papers are left out so that every method is compared on the same tokens), and the sinks too, except
in the ``_fp16sinks`` variants below.

Methods (bits per value count everything stored per token):

* ``pq_M{16,32,64}``: product quantization, ``C = 256`` centroids, so ``8 M / d`` bits (1, 2, 4 for
  d = 128). Codebooks (:meth:`million_cupy.ModelCodebooks.train`, ``--train-iters`` k-means rounds) are
  trained per kv head, K and V apart, on ``--train-tokens`` tokens of a held-out draw of the same layer
  (:func:`kvgen.training_sample`). Per head because each kv head has its own outlier channels, which a
  codebook shared by the heads would have to cover all at once. Codebooks are a fixed per-layer cost
  (``256 * d`` fp16 values per kv head for K and as many for V, 64 KiB each at d = 128), shared by
  every sequence and not counted per token; ``codebook_bytes`` in the record gives the layer's total.
* ``int{b}_g{G}``: per-token asymmetric uniform quantization of K and V, groups of ``G`` channels
  with an fp16 scale and an fp16 zero point each: ``b + 32 / G`` bits per value.
* ``kivi_int{b}_g{G}``: KIVI: keys per channel (groups of ``G`` tokens along the sequence, so an
  outlier channel gets its own scale), values per token (groups of ``G`` channels); fp16 scale and
  zero point per group: ``b + 32 / G`` bits per value. A last, partial group of tokens gets its own
  scale and zero point too.

Uniform quantizers round scale and zero point to fp16 first and quantize on that grid, as a kernel
that stores them in fp16 would.

Every method also runs as ``<method>_fp16sinks`` (``--fp16-sinks``, default 4; 0 turns it off): the
same quantizer with the first tokens kept in fp16, a common policy (StreamingLLM, KVQuant, IntactKV)
that matters here because the sinks take a large share of attention, and a fixed PQ codebook,
trained on data where sinks are rare, fits them worse than a quantizer whose ranges follow each
token or token group. Their bits per value include the fp16 tokens: ``(b * (T - S) + 16 * S) / T``.

Outputs, in ``--out-dir`` (``bench/results``): ``accuracy.json`` (harness schema: ``gpu``, ``date``,
``command``, ``versions``, ``config``, ``records`` with ``suite`` "accuracy", ``method``, ``family``,
``bits_per_value``, ``rel_err_mean``, ``rel_err_std``, ``rel_err_per_seed``, ``k_rel_err`` /
``v_rel_err`` (relative Frobenius reconstruction error of the cache, mean over seeds) and ``config``),
``accuracy.md`` (table and verdict) and ``accuracy.png`` (error against bits per value, log scale);
``--quick`` names them ``accuracy_quick.*``. The table is printed last.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402
import kvgen  # noqa: E402

from million_cupy import reference  # noqa: E402
from million_cupy.codebook import NUM_CENTROIDS, ModelCodebooks, encode  # noqa: E402

DEFAULTS = dict(tokens=4096, queries=32, heads=32, kv_heads=8, head_dim=128, seeds=[0, 1],
                train_tokens=4096, train_iters=15, pq_M=[16, 32, 64], int_bits=[2, 3, 4], groups=[32, 128])
QUICK = dict(tokens=512, queries=4, heads=4, kv_heads=2, head_dim=128, seeds=[0],
             train_tokens=512, train_iters=3, pq_M=[16, 32, 64], int_bits=[2, 4], groups=[32, 128])
# Per-group metadata of the uniform quantizers: an fp16 scale and an fp16 zero point.
META_BITS = 32


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke configuration; writes accuracy_quick.*")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--tokens", type=int, help="context tokens per seed (default 4096)")
    p.add_argument("--queries", type=int, help="decode queries per seed (default 32)")
    p.add_argument("--heads", type=int, help="query heads nh (default 32)")
    p.add_argument("--kv-heads", type=int, help="kv heads nh_k (default 8)")
    p.add_argument("--head-dim", type=int, help="head dim d (default 128)")
    p.add_argument("--seeds", type=int, nargs="+", help="one synthetic layer per seed (default 0 1)")
    p.add_argument("--train-tokens", type=int, help="held-out tokens per kv head for k-means (default 4096)")
    p.add_argument("--train-iters", type=int, help="k-means rounds (default 15)")
    p.add_argument("--pq-M", type=int, nargs="+", help="PQ subspace counts (default 16 32 64)")
    p.add_argument("--int-bits", type=int, nargs="+", help="uniform quantizer bit widths (default 2 3 4)")
    p.add_argument("--groups", type=int, nargs="+", help="uniform quantizer group sizes (default 32 128)")
    p.add_argument("--fp16-sinks", type=int, default=kvgen.DEFAULT_SINKS,
                   help="also run every method with this many leading tokens kept fp16 (0: don't)")
    args = p.parse_args(argv)
    for key, default in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    if args.train_tokens < NUM_CENTROIDS:
        p.error(f"--train-tokens: k-means needs at least {NUM_CENTROIDS} vectors per codebook, got {args.train_tokens}")
    return args


# ---------------------------------------------------------------------------------------------
# Quantizers
# ---------------------------------------------------------------------------------------------


def array_module(x):
    """NumPy for NumPy arrays, CuPy for CuPy arrays: the quantizers below run where the cache lives
    (``bench/quality.py`` passes GPU arrays)."""
    if isinstance(x, np.ndarray):
        return np
    import cupy

    return cupy


def quantize_uniform(x, bits: int, group: int, axis: int):
    """Asymmetric ``bits``-bit quantize-dequantize of ``x``, groups of ``group`` along ``axis``.

    Each group stores ``zero = min`` and ``scale = (max - min) / (2**bits - 1)``, both rounded to fp16
    (what is stored), and codes ``clip(round((x - zero) / scale), 0, 2**bits - 1)``. Returns float64
    ``codes * scale + zero``. Values already on a group's grid, with the grid's end points present,
    come back exactly. A last, partial group holds the remaining entries.
    """
    xp = array_module(x)
    xf = xp.moveaxis(xp.asarray(x, dtype=xp.float64), axis, -1)
    n = xf.shape[-1]
    # Padding by repeating the last entry leaves the partial group's min and max unchanged.
    xpad = xp.pad(xf, [(0, 0)] * (xf.ndim - 1) + [(0, -n % group)], mode="edge")
    g = xpad.reshape(*xf.shape[:-1], -1, group)
    levels = 2**bits - 1
    zero = g.min(axis=-1, keepdims=True).astype(xp.float16).astype(xp.float64)
    scale = ((g.max(axis=-1, keepdims=True) - zero) / levels).astype(xp.float16).astype(xp.float64)
    scale = xp.where(scale > 0, scale, 1.0)  # a constant group is exact at code 0 with any scale
    codes = xp.clip(xp.rint((g - zero) / scale), 0, levels)
    return xp.moveaxis((codes * scale + zero).reshape(xpad.shape)[..., :n], -1, axis)


def per_token(x, bits: int, group: int):
    """``(T, H, d)`` cache quantized per token, groups of ``group`` channels."""
    return quantize_uniform(x, bits, group, axis=-1)


def kivi(k, v, bits: int, group: int):
    """KIVI: keys per channel (groups of ``group`` tokens), values per token (groups of ``group`` channels)."""
    return quantize_uniform(k, bits, group, axis=0), quantize_uniform(v, bits, group, axis=-1)


def pq_roundtrip(x, model: ModelCodebooks, kind: int, layer: int = 0):
    """``(T, H, d)`` cache through ``layer``'s codebooks of ``kind`` (0 keys, 1 values; one per head or one
    shared by the heads), float64, on the side of ``x`` and ``model``."""
    xp = array_module(x)
    centroids = model.key_centroids(layer) if kind == 0 else model.value_centroids(layer)
    books = model.key_codebooks(layer) if kind == 0 else model.value_codebooks(layer)
    codes = encode(x, centroids)
    return xp.stack([books[h % len(books)].decode(codes[:, h]) for h in range(x.shape[1])], axis=1).astype(xp.float64)


# ---------------------------------------------------------------------------------------------
# Study
# ---------------------------------------------------------------------------------------------


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Float64 ``(Q, nh, d)`` outputs of every decode query over the whole cache."""
    k64, v64 = k.astype(np.float64), v.astype(np.float64)  # converted once, not once per query
    out, _ = reference.decode_attention(q, [k64] * q.shape[0], [v64] * q.shape[0])
    return out


def per_query_error(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.linalg.norm((out - ref).reshape(len(ref), -1), axis=1) / np.linalg.norm(ref.reshape(len(ref), -1), axis=1)


def methods(args) -> list[dict]:
    """Every method's record skeleton: name, family, bits per value, quantizer and its settings.

    With ``--fp16-sinks S``, every quantizer also appears as ``<name>_fp16sinks``: the same codes for
    all but the first ``S`` tokens, which stay fp16 (and are paid for at 16 bits per value).
    """
    d, T, S = args.head_dim, args.tokens, args.fp16_sinks
    base = [dict(method=f"pq_M{M}", family="pq", scheme="pq", bits_per_value=8 * M / d,
                 params=dict(M=M, C=NUM_CENTROIDS)) for M in args.pq_M]
    for scheme in ("int", "kivi"):
        for G in args.groups:
            for b in args.int_bits:
                name = f"int{b}_g{G}" if scheme == "int" else f"kivi_int{b}_g{G}"
                base.append(dict(method=name, family=f"{scheme}_g{G}", scheme=scheme,
                                 bits_per_value=b + META_BITS / G, params=dict(bits=b, group=G)))
    out = []
    for spec in base:
        out.append(dict(spec, quantizer=spec["method"], fp16_tokens=0))
        if S:
            out.append(dict(spec, method=spec["method"] + "_fp16sinks", family=spec["family"] + "+fp16sinks",
                            quantizer=spec["method"], fp16_tokens=S,
                            bits_per_value=(spec["bits_per_value"] * (T - S) + 16 * S) / T))
    return out


def quantize(args, spec: dict, k, v, k_train, v_train, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Dequantized ``(k, v)`` under ``spec``'s quantizer."""
    p = spec["params"]
    if spec["scheme"] == "pq":
        model = ModelCodebooks.train([k_train], [v_train], p["M"], iters=args.train_iters, seed=seed,
                                     per_head=True, progress=False)
        return pq_roundtrip(k, model, 0), pq_roundtrip(v, model, 1)
    if spec["scheme"] == "kivi":
        return kivi(k, v, p["bits"], p["group"])
    return per_token(k, p["bits"], p["group"]), per_token(v, p["bits"], p["group"])


def run_seed(args, seed: int, specs: list[dict], log) -> dict[str, dict]:
    """Per method: per-query errors and K / V reconstruction errors on layer ``seed``."""
    shape = (args.kv_heads, args.head_dim, args.heads)
    data = kvgen.generate(args.tokens, *shape, seed, num_queries=args.queries)
    k = data["k"].astype(np.float16)  # the cache holds fp16: every method starts from it
    v = data["v"].astype(np.float16)
    q = data["q"]
    ref = attention(q, k, v)
    held_out = kvgen.training_sample(args.train_tokens, *shape, seed, num_queries=args.queries)
    k_train, v_train = held_out["k"].astype(np.float16), held_out["v"].astype(np.float16)
    results: dict[str, dict[str, Any]] = {}
    tokenwise: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # PQ and per-token codes: a _fp16sinks variant reuses them
    for spec in specs:
        t0 = time.perf_counter()
        S = spec["fp16_tokens"]
        # Each quantizer sees only the tokens it stores, so KIVI's token groups start after the fp16 ones;
        # schemes that quantize every token on its own give the same codes either way.
        if spec["scheme"] == "kivi":
            kq, vq = quantize(args, spec, k[S:], v[S:], k_train, v_train, seed)
        else:
            if spec["quantizer"] not in tokenwise:
                tokenwise[spec["quantizer"]] = quantize(args, spec, k, v, k_train, v_train, seed)
            kq, vq = (x[S:] for x in tokenwise[spec["quantizer"]])
        kq, vq = np.concatenate([k[:S], kq]), np.concatenate([v[:S], vq])
        results[spec["method"]] = dict(
            errors=per_query_error(attention(q, kq, vq), ref),
            k_rel_err=reference.relative_error(kq, k),
            v_rel_err=reference.relative_error(vq, v),
        )
        log(f"seed {seed} {spec['method']:>26}: rel err {results[spec['method']]['errors'].mean():.4f} "
            f"({time.perf_counter() - t0:.1f} s)")
    return results


def workload(args) -> dict:
    """The settings every method shares."""
    return dict(tokens=args.tokens, queries=args.queries, nh=args.heads, nh_k=args.kv_heads,
                d=args.head_dim, seeds=args.seeds, dtype="float16")


def summarize(args, specs: list[dict], per_seed: list[dict[str, dict]]) -> list[dict]:
    shared = workload(args)
    records = []
    for spec in specs:
        name = spec["method"]
        errors = np.concatenate([r[name]["errors"] for r in per_seed])
        config = dict(spec["params"], scheme=spec["scheme"], fp16_tokens=spec["fp16_tokens"], **shared)
        if spec["scheme"] == "pq":
            config.update(train_tokens=args.train_tokens, train_iters=args.train_iters, codebooks="per kv head",
                          codebook_bytes=2 * args.kv_heads * NUM_CENTROIDS * args.head_dim * 2)
        records.append(dict(
            suite="accuracy", method=name, family=spec["family"], bits_per_value=spec["bits_per_value"],
            rel_err_mean=float(errors.mean()), rel_err_std=float(errors.std()),
            rel_err_per_seed=[float(r[name]["errors"].mean()) for r in per_seed],
            k_rel_err=float(np.mean([r[name]["k_rel_err"] for r in per_seed])),
            v_rel_err=float(np.mean([r[name]["v_rel_err"] for r in per_seed])),
            config=config,
        ))
    return sorted(records, key=lambda r: (r["bits_per_value"], r["rel_err_mean"]))


def verdict(records: list[dict], head_dim: int) -> str:
    """MILLION's claim, checked: PQ at 4 bits per value (M = d/2) beats uniform int4 on this data.

    Against the int4 quantizers (4-bit codes, 4.25-5 bits per value with their scales) and against
    the best uniform quantizer that stores no more bits per value than PQ; for every token quantized
    and, where run, with the first tokens fp16 in every method.
    """
    sentences = []
    for fp16_tokens in sorted({r["config"]["fp16_tokens"] for r in records}):
        same = [r for r in records if r["config"]["fp16_tokens"] == fp16_tokens]
        pqs = [r for r in same if r["config"]["scheme"] == "pq" and r["config"]["M"] == head_dim // 2]
        uniform = [r for r in same if r["config"]["scheme"] != "pq"]
        int4 = [r for r in uniform if r["config"]["bits"] == 4]
        if not pqs or not int4:
            continue
        pq = pqs[0]
        err = lambda r: f"{r['rel_err_mean']:.4f} +- {r['rel_err_std']:.4f}"  # noqa: E731
        best = min(int4, key=lambda r: r["rel_err_mean"])
        beaten = [r["method"] for r in int4 if pq["rel_err_mean"] < r["rel_err_mean"]]
        setting = "every token quantized" if not fp16_tokens else f"the first {fp16_tokens} tokens fp16 in every method"
        text = (
            f"With {setting}: {pq['method']} ({pq['bits_per_value']:.2f} bits/value) has relative error {err(pq)} "
            f"and beats {len(beaten)} of {len(int4)} int4 variants ({', '.join(beaten) or 'none'}); the best int4, "
            f"{best['method']} ({best['bits_per_value']:.2f} bits/value), has {err(best)} "
            f"({best['rel_err_mean'] / pq['rel_err_mean']:.2f}x PQ's error)."
        )
        within = [r for r in uniform if r["bits_per_value"] <= pq["bits_per_value"] + 1e-9]
        if within:
            rival = min(within, key=lambda r: r["rel_err_mean"])
            text += (
                f" The best uniform quantizer within PQ's bits per value, {rival['method']} "
                f"({rival['bits_per_value']:.2f}), has {err(rival)} "
                f"({rival['rel_err_mean'] / pq['rel_err_mean']:.2f}x)."
            )
        sentences.append(text)
    if not sentences:
        return "MILLION claim not tested: needs PQ with M = d/2 and 4-bit uniform quantizers."
    return "MILLION claim (PQ at 4 bits/value beats uniform int4 on outlier-heavy KV). " + " ".join(sentences)


def markdown(records: list[dict], args, claim: str) -> str:
    head = ("| method | family | bits/value | rel err mean | rel err std | per-seed means | K recon err "
            "| V recon err |\n|---|---|---:|---:|---:|---|---:|---:|")
    rows = [
        f"| {r['method']} | {r['family']} | {r['bits_per_value']:.3f} | {r['rel_err_mean']:.4f} "
        f"| {r['rel_err_std']:.4f} | {', '.join(f'{e:.4f}' for e in r['rel_err_per_seed'])} "
        f"| {r['k_rel_err']:.4f} | {r['v_rel_err']:.4f} |"
        for r in records
    ]
    setup = (f"Synthetic layer per seed (bench/kvgen.py), seeds {args.seeds}: {args.tokens} tokens, {args.queries} "
             f"decode queries, nh={args.heads}, nh_k={args.kv_heads}, d={args.head_dim}. Relative error of the "
             f"attention output per query against float64 attention over the fp16 K/V; mean and std over all "
             f"queries and seeds. PQ codebooks per kv head, trained on {args.train_tokens} held-out tokens, "
             f"{args.train_iters} k-means rounds. Uniform bits include the fp16 scale and zero point per group. "
             f"K / V recon err: relative Frobenius error of the dequantized cache. Every token is quantized")
    setup += (f", except in `_fp16sinks` rows: the first {args.fp16_sinks} tokens (the attention sinks) stay fp16 "
              f"there, their 16 bits counted in bits/value." if args.fp16_sinks else ".")
    return "\n\n".join(["# KV quantization accuracy", setup, "\n".join([head, *rows]), "**Verdict.** " + claim]) + "\n"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on benchmark machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors: dict[str, str] = {}
    for family in sorted({r["family"] for r in records}):  # a quantizer next to its fp16-sinks variant
        rs = sorted((r for r in records if r["family"] == family), key=lambda r: r["bits_per_value"])
        base = family.removesuffix("+fp16sinks")
        colors.setdefault(base, f"C{len(colors)}")  # a quantizer and its fp16-sinks variant share a color
        ax.errorbar([r["bits_per_value"] for r in rs], [r["rel_err_mean"] for r in rs],
                    yerr=[r["rel_err_std"] for r in rs], marker="o", capsize=3, label=family, color=colors[base],
                    linestyle="--" if family != base else "-")
    ax.set_yscale("log")
    ax.set_xlabel("bits per value (uniform: incl. fp16 scale + zero point)")
    ax.set_ylabel("attention output relative error")
    ax.set_title("KV quantization error on synthetic outlier-heavy caches")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731 - progress, not results
    specs = methods(args)
    t0 = time.perf_counter()
    per_seed = [run_seed(args, seed, specs, log) for seed in args.seeds]
    records = summarize(args, specs, per_seed)
    claim = verdict(records, args.head_dim)

    stem = "accuracy_quick" if args.quick else "accuracy"
    out = args.out_dir
    command = " ".join(shlex.quote(a) for a in ["python", "bench/accuracy.py", *argv])
    config = dict(workload(args), elapsed_s=round(time.perf_counter() - t0, 1), verdict=claim)
    harness.write_results(out / f"{stem}.json", records, extra=dict(command=command, config=config))
    (out / f"{stem}.md").write_text(markdown(records, args, claim))
    plot(records, out / f"{stem}.png")

    print(f"{'method':>26} {'bits/value':>10} {'rel_err_mean':>12} {'rel_err_std':>11}")
    for r in records:
        print(f"{r['method']:>26} {r['bits_per_value']:>10.3f} {r['rel_err_mean']:>12.4f} {r['rel_err_std']:>11.4f}")
    print(claim)
    return records


if __name__ == "__main__":
    main()
