"""PROBE for issue 16's last target: verify attention's token loop on Hopper warpgroup MMA (bench/probes/verify_wgmma.cu,
sm_90a), checked against the float64 reference and timed against the library's verify_attention and one-token
decode at 8 x 32K in ONE process (interleaved rounds, as bench/ab_sources.py).

    python3 bench/probe_verify_wgmma.py --out bench/results/probe_verify_wgmma_h100_s38.json   # GPU machine
    python3 bench/probe_verify_wgmma.py --build-only                                             # no GPU needed

The probe is not a library kernel: D = 128, M = 32, 32 query rows per kv head (q = 8 at GQA 4), fp16, full 64-token
steps only (no mask, residual ring or page table), its own code layouts, and its partial states merged on the host.
It measures what the redesign's token loop costs before the library takes it on (docs/perf-notes.md, session 38).
``--build-only`` compiles it offline with NVRTC and prints ptxas's registers, spills and wgmma serialization notes
(C75xx: every wgmma of the kernel waited on, the loop's pipelining lost).
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402
from million_cupy import reference  # noqa: E402

PROBE = Path(__file__).resolve().parent / "probes" / "verify_wgmma.cu"
D, M, ROWS, P_BYTES = 128, 32, 32, 8 * 528
VARIANTS = {"verify_wgmma3": 3, "verify_wgmma2": 2, "verify_wgmma3_p512": 3, "verify_wgmma3_k4": 3,
            "verify_wgmma2_k4": 2}  # entry -> warpgroups per CTA
TIMING = {"queued": 20, "repeats": 15, "warmup": 3}


def build() -> tuple[bytes, str]:
    """The probe's cubin for sm_90a and ptxas's log (NVRTC offline, under a copy of cuda_src/ holding the probe)."""
    from million_cupy import kernels

    with tempfile.TemporaryDirectory(prefix="probe_wgmma_") as d:
        src = Path(d) / "cuda_src"
        shutil.copytree(kernels.source_dir(), src)
        shutil.copy(PROBE, src / PROBE.name)
        with kernels.sources_from(src):
            b = kernels.nvrtc_compile_offline(PROBE.name, [], arch="sm_90a")
    return b.cubin, b.log


def serialization_notes(log: str) -> list[str]:
    """ptxas's notes that it serialized wgmma (C7510-C7529 'Potential Performance Loss: wgmma...')."""
    return [line.strip() for line in log.splitlines() if re.search(r"\(C75\d\d\).*wgmma", line)]


def smem_bytes(nwg: int) -> int:
    return 98304 + 65536 + 8192 + nwg * 2 * P_BYTES + nwg * 4 * ROWS * 4


def launcher(cp, fn, nwg, data, T, splits, units):
    """A launch of ``fn`` over ``data`` and its (part_o, part_m, part_l) outputs, poisoned with NaN."""
    grid = units * splits
    outs = (cp.full((grid * nwg, ROWS, D), np.nan, cp.float32), cp.full((grid * nwg, ROWS), np.nan, cp.float32),
            cp.full((grid * nwg, 4, ROWS), np.nan, cp.float32))
    fn.max_dynamic_shared_size_bytes = smem_bytes(nwg)
    args = (*data, np.int32(T), np.int32(splits), np.float32(math.log2(math.e) / math.sqrt(D)), *outs)
    return (lambda: fn((grid,), (128 * nwg,), args, shared_mem=smem_bytes(nwg))), outs


def random_inputs(cp, units, T, qscale, seed):
    """q [unit][32][128], K / V codebooks [unit][256][32][4], K codes [unit][T][32], V codes [unit][T/16][32][16]."""
    r = cp.random.default_rng(seed)
    q = (r.standard_normal((units, ROWS, D), dtype=cp.float32) * qscale).astype(cp.float16)
    kcb = r.standard_normal((units, 256, M, 4), dtype=cp.float32).astype(cp.float16)
    vcb = r.standard_normal((units, 256, M, 4), dtype=cp.float32).astype(cp.float16)
    return (q, kcb, vcb, r.integers(0, 256, (units, T, M), dtype=cp.uint8),
            r.integers(0, 256, (units, T // 16, M, 16), dtype=cp.uint8))


def expected(data) -> np.ndarray:
    """Softmax attention of every unit's 32 rows over its T tokens (reference.decode_attention, one kv head of 32 query
    heads per unit, over reference.pq_decode's tokens), float64: (units, 32, 128)."""
    q, kcb, vcb, kc, vc = (x.get() for x in data)
    units, T = kc.shape[:2]
    vtok = vc.transpose(0, 1, 3, 2).reshape(units, T, M)  # [unit][block][m][16] -> [unit][token][m]
    books = lambda cb: cb.transpose(1, 0, 2)  # noqa: E731 - [code][m][dsub] -> pq_decode's [m][code][dsub]
    return np.stack([reference.decode_attention(q[u][None], [reference.pq_decode(kc[u], books(kcb[u]))[:, None]],
                                          [reference.pq_decode(vtok[u], books(vcb[u]))[:, None]])[0][0]
                     for u in range(units)])


def merge(outs, units, parts) -> np.ndarray:
    """The warpgroups' partial states (unnormalized O, log2-domain maxima, per-warp sums) of each unit combined by
    reference.merge_states: (units, 32, 128)."""
    po, pm, pl = outs[0].get().astype(np.float64), outs[1].get().astype(np.float64), outs[2].get().sum(1)
    po, pm, pl = (x.reshape(units, parts, *x.shape[1:]) for x in (po, pm, pl))
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = (pm + np.log2(pl)) * math.log(2.0)  # -inf for a part that saw no token
        out = po / pl[..., None]
    return reference.merge_states(list(out.transpose(1, 0, 2, 3)), list(lse.transpose(1, 0, 2)))[0]


def check(cp, mod) -> list[dict]:
    """Every variant against the reference: step counts split unevenly over warpgroups, one to three splits, scores
    small and large (qscale 4: the maxima move often, the rescaling path runs)."""
    rows = []
    rng = np.random.default_rng(0)  # one wgmma: the fragment layouts and the descriptor's LBO / SBO
    A, B = rng.standard_normal((64, 16)).astype(np.float16), rng.standard_normal((16, 32)).astype(np.float16)
    got = cp.full((64, 32), np.nan, cp.float32)
    mod.get_function("wgmma_selftest")((1,), (128,), (cp.asarray(A), cp.asarray(B), got, np.int32(512), np.int32(128)))
    err = float(np.abs(got.get() - A.astype(np.float64) @ B.astype(np.float64)).max())
    rows.append({"variant": "wgmma_selftest", "max_abs_err": err, "ok": bool(err < 1e-3)})
    print(f"check wgmma_selftest: max abs err {err:.3g}", flush=True)
    for name, nwg in VARIANTS.items():
        for units, T, splits, qscale in ((2, 1536, 2, 1.0), (3, 4608, 3, 4.0), (1, 64 * 7, 1, 0.3)):
            data = random_inputs(cp, units, T, qscale, seed=units * 7 + T)
            launch, outs = launcher(cp, mod.get_function(name), nwg, data, T, splits, units)
            launch()
            got, want = merge(outs, units, splits * nwg), expected(data)
            rel = reference.relative_error(got, want)
            ok = bool(np.isfinite(got).all() and rel < 2e-2)
            rows.append({"variant": name, "units": units, "tokens": T, "splits": splits, "qscale": qscale,
                         "rel_err": rel, "ok": ok})
            print(f"check {name} units={units} T={T} splits={splits} qscale={qscale}: rel err {rel:.3g} "
                  f"{'OK' if ok else 'FAIL'}", flush=True)
    return rows


def measure(cp, mod, batch, context, rounds) -> list[dict]:
    from bench_decode import NH, build_cache
    from bench_prefill import random_queries
    from million_cupy import BatchDecodeWrapper, BatchPrefillWrapper

    queries = ROWS // (NH // 8)  # 8 new tokens per sequence at GQA 4: 32 rows per kv head
    cache, seqs = build_cache(cp, batch, context, M, spare_tokens=queries)
    decode = BatchDecodeWrapper(cache, num_heads=NH)
    decode.plan(seqs, new_tokens=0)
    q1, o1 = random_queries(cp, batch, 3), cp.empty((batch, NH, D), dtype=cp.float16)
    verify = BatchPrefillWrapper(cache, NH, backend="tensor_cores")
    verify.plan(seqs, np.arange(batch + 1) * queries, appended=True)
    qv = random_queries(cp, batch * queries, 12)
    ov = cp.empty_like(qv)
    units = batch * 8
    data = random_inputs(cp, units, context, 1.0, seed=5)
    probes = {name: launcher(cp, mod.get_function(name), nwg, data, context, 2, units)[0]
              for name, nwg in VARIANTS.items()}
    base = {"suite": "verify_wgmma_probe", "batch": batch, "context": context, "M": M, "queries_per_seq": queries}
    records = []
    for r in range(rounds):
        dec = harness.time_gpu(lambda: decode.run(0, q1, out=o1, check=False), **TIMING)["median_us"]
        records.append(base | {"method": "decode_one_token", "queries_per_seq": 1, "round": r, "median_us": dec})
        t = harness.time_gpu(lambda: verify.run(0, qv, out=ov), **TIMING)["median_us"]
        records.append(base | {"method": "verify", "path": verify.regime, "round": r, "median_us": t,
                               "vs_decode": t / dec})
        for name, launch in probes.items():
            t = harness.time_gpu(launch, **TIMING)["median_us"]
            records.append(base | {"method": name, "grid": units * 2, "round": r, "median_us": t, "vs_decode": t / dec})
        print(f"round {r}: " + ", ".join(f"{x['method']} {x['median_us']:.1f}" for x in records if x["round"] == r),
              flush=True)
    return records


def summary(records: list[dict]) -> list[dict]:
    methods = dict.fromkeys(r["method"] for r in records)
    rows = []
    for m in methods:
        rs = [r for r in records if r["method"] == m]
        row = {"method": m, "median_us": statistics.median(r["median_us"] for r in rs)}
        if "vs_decode" in rs[0]:
            row["vs_decode"] = statistics.median(r["vs_decode"] for r in rs)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build-only", action="store_true", help="compile offline and print ptxas's notes (no GPU)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=32768, help="history tokens per sequence (a multiple of 128)")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default 4)")
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/probe_verify_wgmma_<gpu>.json)")
    args = p.parse_args(argv)
    if args.context % 128:
        raise SystemExit(f"error: --context must be a multiple of 128 (two splits of whole 64-token steps), got "
                         f"{args.context}")
    cubin, log = build()
    notes = serialization_notes(log)
    for line in log.splitlines():
        if re.search(r"Compiling entry|spill|Used \d+ registers", line):
            print(line.strip())
    print("wgmma serialization notes:", notes or "none")
    if args.build_only:
        return 1 if notes else 0
    harness.require_gpu("probe_verify_wgmma")
    import cupy as cp

    with tempfile.TemporaryDirectory(prefix="probe_wgmma_") as d:
        path = Path(d) / "verify_wgmma.cubin"
        path.write_bytes(cubin)
        mod = cp.RawModule(path=str(path))
        mod.get_function("wgmma_selftest")  # loads the module before the directory goes
    checks = check(cp, mod)
    records = measure(cp, mod, args.batch, args.context, args.rounds)
    rows = summary(records)
    gpu = harness.gpu_name().split()[-1].lower()
    out = args.out or Path(__file__).resolve().parent / "results" / f"probe_verify_wgmma_{gpu}.json"
    harness.write_results(out, records, {"checks": checks, "ptxas_serialization_notes": notes, "summary": rows})
    print(f"wrote {out}")
    print(harness.table([r | ({"vs_decode": f"{r['vs_decode']:.3f}"} if "vs_decode" in r else {}) for r in rows],
                        ["method", "median_us", "vs_decode"]))
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
