"""CUDA source patches timed against the sources as they are, in ONE process: verify_attention (several new
tokens per sequence) and the one-token decode, over the same caches and inputs.

    python3 bench/ab_sources.py docs/patches/verify-tables-cp-async.diff --M 32 64 --queries 4 8 --rounds 4 \\
        --out bench/results/verify_tables_cp_async_h100_s37.json

Each patch (a unified diff that touches ``cuda_src/`` only) is applied to a copy of the tree
(``ab_patch.patched_tree``); the sources as they are run as variant ``A``, the patches as ``B``, ``C``, ... Per M,
one cache of ``--batch`` x ``--context`` random tokens is built; every variant compiles under
``kernels.sources_from`` and plans its own wrappers; then rounds interleave the variants (A B C A B C ...), each
round opening with the one-token decode of the sources as they are (``vs_decode`` is taken against it).

Why one process: separate processes move the same kernel by several per cent (perf-notes, session 24), the size
of the effects a kernel patch is usually after; ``ab_patch.py`` (fresh processes) suits host-side patches.
Prints a table of the medians over rounds and each variant's ratio to A. Runs on a GPU machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402
from ab_patch import ROOT, patched_tree  # noqa: E402
from bench_decode import D, NH, build_cache  # noqa: E402
from bench_prefill import random_queries  # noqa: E402

TIMING = {"queued": 20, "repeats": 15, "warmup": 3}


def touched_paths(patch: Path) -> list[str]:
    """The files a unified diff changes (its ``+++ b/...`` lines)."""
    return [line[6:].strip() for line in patch.read_text().splitlines() if line.startswith("+++ b/")]


def check_patch(patch: Path) -> None:
    """Raises SystemExit unless ``patch`` changes files under ``cuda_src/`` only (anything else would not take
    effect in this process)."""
    paths = touched_paths(patch)
    if not paths:
        raise SystemExit(f"error: {patch}: expected a unified diff (git diff), found no '+++ b/' lines")
    outside = [p for p in paths if not p.startswith("cuda_src/")]
    if outside:
        raise SystemExit(f"error: {patch}: expected changes under cuda_src/ only, got {outside}; "
                         f"time host-side patches with bench/ab_patch.py")


def measure(cp, trees: dict[str, Path], M: int, batch: int, context: int, counts: list[int], backend: str,
            rounds: int) -> list[dict]:
    """Records of every (round, variant, query count) at one M."""
    from million_cupy import BatchDecodeWrapper, BatchPrefillWrapper, kernels

    cache, seqs = build_cache(cp, batch, context, M, spare_tokens=max(counts))
    decode = BatchDecodeWrapper(cache, num_heads=NH)
    decode.plan(seqs, new_tokens=0)
    q1, o1 = random_queries(cp, batch, 3), cp.empty((batch, NH, D), dtype=cp.float16)
    queries = {c: random_queries(cp, batch * c, 4 + c) for c in counts}
    runs: dict[tuple[str, int], tuple] = {}
    for label, tree in trees.items():
        with kernels.sources_from(tree / "cuda_src"):
            for c in counts:
                wrapper = BatchPrefillWrapper(cache, NH, backend=backend)
                wrapper.plan(seqs, np.arange(batch + 1) * c, appended=True)  # the last c tokens are the new ones
                out = cp.empty_like(queries[c])
                wrapper.run(0, queries[c], out=out)  # compiles and binds this variant's kernels
                runs[(label, c)] = (wrapper, out)
        cp.cuda.Device().synchronize()
        print(f"M = {M}: variant {label} compiled", flush=True)
    name = {"suite": "prefill", "batch": batch, "context": context, "M": M}
    records = []
    for r in range(rounds):
        base = harness.time_gpu(lambda: decode.run(0, q1, out=o1, check=False), **TIMING)["median_us"]
        records.append(name | {"method": "decode_one_token", "queries_per_seq": 1, "variant": "A", "round": r,
                               "median_us": base})
        for (label, c), (wrapper, out) in runs.items():
            t = harness.time_gpu(lambda: wrapper.run(0, queries[c], out=out), **TIMING)["median_us"]
            records.append(name | {"method": "verify", "queries_per_seq": c, "backend": backend, "variant": label,
                                   "round": r, "median_us": t, "vs_decode": t / base, "path": wrapper.regime})
    return records


def summary(records: list[dict]) -> list[dict]:
    """Per (M, queries, variant): the median over rounds, its ratio to the decode and to variant A."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["M"], r["queries_per_seq"], r["variant"]), []).append(r)
    rows = []
    for (M, c, label), rs in sorted(groups.items()):
        a = groups[(M, c, "A")]
        row = {"M": M, "queries_per_seq": c, "variant": label,
               "median_us": statistics.median(x["median_us"] for x in rs),
               "rounds_us": [round(x["median_us"], 1) for x in rs]}
        if c > 1:
            row["vs_decode"] = statistics.median(x["vs_decode"] for x in rs)
            row["vs_A"] = row["median_us"] / statistics.median(x["median_us"] for x in a)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("patches", type=Path, nargs="+", help="unified diffs against the repository root, cuda_src/ only")
    p.add_argument("--M", type=int, nargs="+", default=[32, 64], choices=(16, 32, 64))
    p.add_argument("--queries", type=int, nargs="+", default=[4, 8], help="new tokens per sequence (default 4 8)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--backend", default="tensor_cores", help="BatchPrefillWrapper backend (default tensor_cores)")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default 4)")
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/ab_sources_<gpu>.json)")
    args = p.parse_args(argv)
    for patch in args.patches:
        check_patch(patch)
    harness.require_gpu("ab_sources")
    import cupy as cp

    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ab_sources_") as scratch:
        trees = {"A": ROOT} | {
            chr(ord("B") + i): patched_tree(patch.resolve(), Path(scratch) / chr(ord("B") + i))
            for i, patch in enumerate(args.patches)}
        for M in args.M:
            records += measure(cp, trees, M, args.batch, args.context, args.queries, args.backend, args.rounds)
            cp.get_default_memory_pool().free_all_blocks()
    rows = summary(records)
    gpu = harness.gpu_name().split()[-1].lower()
    out = args.out or Path(__file__).resolve().parent / "results" / f"ab_sources_{gpu}.json"
    variants = {"A": "the sources as they are"} | {chr(ord("B") + i): str(p) for i, p in enumerate(args.patches)}
    harness.write_results(out, records, {"variants": variants, "summary": rows})
    print(f"wrote {out}")
    print(harness.table([r | {k: f"{r[k]:.3f}" for k in ("vs_decode", "vs_A") if k in r} for r in rows],
                        ["M", "queries_per_seq", "variant", "median_us", "vs_decode", "vs_A"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
