#!/usr/bin/env python
"""Benchmark the codebook's GPU work: PQ encode (the pq_encode.cu kernel) and k-means training.

    python bench/bench_codebook.py --out bench/results/codebook_<gpu>.json

Encode: 262144 vectors x d=128 in fp16 (32K tokens x 8 kv heads) for M = 32 and 64.
Training: Codebook.train on 65536 samples, d=128, M=64, 25 iterations.

Timing uses CUDA events after warm-up. Encode's ``median_us`` is the GPU time per call with
``--queued`` calls back to back between two events (host launch cost hidden), median over
``--repeats``; ``call_us`` is one call between events, launch included. Training (which syncs with
the host inside) is timed one call per event pair. ``p10_us`` / ``p90_us`` give the spread.
Before timing, encode output is checked against the float64 reference on a slice.

Results JSON: top-level ``gpu``, ``date``, ``command``, ``versions``, ``records`` (dicts with ``suite``,
``method``, ``M``, ``n``, ``median_us``, ``p10_us``, ``p90_us`` and suite-specific fields).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import shlex
import sys
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from million_cupy import reference  # noqa: E402
from million_cupy.codebook import Codebook  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/codebook_<gpu>.json)")
    p.add_argument("--repeats", type=int, default=20, help="timed repeats per case (>= 20 for the reported median)")
    p.add_argument("--queued", type=int, default=10, help="encode calls queued between one pair of events")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--encode-n", type=int, default=262144)
    p.add_argument("--encode-M", type=int, nargs="+", default=[32, 64])
    p.add_argument("--train-n", type=int, default=65536)
    p.add_argument("--train-M", type=int, default=64)
    p.add_argument("--train-iters", type=int, default=25)
    p.add_argument("--skip-train", action="store_true")
    return p.parse_args()


def gpu_name(cp) -> str:
    name = cp.cuda.runtime.getDeviceProperties(cp.cuda.runtime.getDevice())["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def versions(cp) -> dict:
    out = {"python": platform.python_version(), "numpy": np.__version__, "cupy": cp.__version__}
    try:
        import numba

        out["numba"] = numba.__version__
    except ImportError:
        pass
    rt, drv = cp.cuda.runtime.runtimeGetVersion(), cp.cuda.runtime.driverGetVersion()
    out["cuda_runtime"] = f"{rt // 1000}.{rt % 1000 // 10}"
    out["cuda_driver"] = f"{drv // 1000}.{drv % 1000 // 10}"
    return out


def spread(samples_us: list[float]) -> dict:
    a = np.asarray(samples_us)
    return {
        "median_us": float(np.median(a)),
        "p10_us": float(np.percentile(a, 10)),
        "p90_us": float(np.percentile(a, 90)),
    }


def time_events(cp, fn: Callable[[], object], *, repeats: int, warmup: int, queued: int = 1) -> dict:
    """Per-call GPU time with `queued` calls between two events (median over repeats), and one-call time."""
    for _ in range(warmup):
        fn()
    cp.cuda.get_current_stream().synchronize()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    per_call = []
    for _ in range(repeats):
        start.record()
        for _ in range(queued):
            fn()
        stop.record()
        stop.synchronize()
        per_call.append(cp.cuda.get_elapsed_time(start, stop) * 1e3 / queued)
    result = spread(per_call)
    if queued > 1:
        single = []
        for _ in range(repeats):
            cp.cuda.get_current_stream().synchronize()
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            single.append(cp.cuda.get_elapsed_time(start, stop) * 1e3)
        result["call_us"] = float(np.median(single))
    return result


def bench_encode(cp, args, rng) -> list[dict]:
    d, n = 128, args.encode_n
    x = cp.asarray(rng.standard_normal((n, d)).astype(np.float16))
    records = []
    for M in args.encode_M:
        dsub = d // M
        cb = Codebook(rng.standard_normal((M, 256, dsub)).astype(np.float32)).to_gpu()
        out = cp.empty((n, M), dtype=cp.uint8)
        cb.encode(x, out=out)
        check = 2048
        got = out[:check].get()
        want = reference.pq_encode(x[:check].get(), cb.centroids.get())
        match = float((got == want).mean())
        if match < 0.999:
            raise SystemExit(f"encode M={M}: only {match:.5f} of codes match the float64 reference")
        t = time_events(cp, lambda: cb.encode(x, out=out), repeats=args.repeats, warmup=args.warmup, queued=args.queued)
        records.append({
            "suite": "encode",
            "method": f"Codebook.encode pq_encode<{dsub}, __half>",
            "M": M,
            "n": n,
            "d": d,
            "dtype": "float16",
            **t,
            "gvectors_per_s": n / (t["median_us"] * 1e-6) / 1e9,
            "reference_match": match,
        })
    return records


def bench_train(cp, args, rng) -> list[dict]:
    d, n, M = 128, args.train_n, args.train_M
    # Structured data (a Gaussian mixture), so Lloyd rounds do representative work.
    centers = 2.0 * rng.standard_normal((64, d))
    host = (centers[rng.integers(64, size=n)] + rng.standard_normal((n, d))).astype(np.float16)
    x = cp.asarray(host)
    t = time_events(
        cp,
        lambda: Codebook.train(x, M, iters=args.train_iters, seed=0, progress=False),
        repeats=args.repeats,
        warmup=1,
    )
    return [{"suite": "train", "method": "Codebook.train (CuPy k-means)", "M": M, "n": n, "d": d,
             "iters": args.train_iters, "dtype": "float16", **t}]


def table(records: list[dict]) -> str:
    cols = ["suite", "method", "M", "n", "median_us", "p10_us", "p90_us", "call_us"]
    rows = [[f"{r[c]:.1f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    fmt = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([fmt(cols)] + [fmt(r) for r in rows])


def main() -> None:
    args = parse_args()
    import cupy as cp

    rng = np.random.default_rng(0)
    records = bench_encode(cp, args, rng)
    if not args.skip_train:
        records += bench_train(cp, args, rng)
    gpu = gpu_name(cp)
    slug = re.sub(r"[^a-z0-9]+", "_", gpu.lower()).strip("_")
    out = args.out or Path(__file__).resolve().parent / "results" / f"codebook_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "gpu": gpu,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv),
        "versions": versions(cp),
        "records": records,
    }
    out.write_text(json.dumps(doc, indent=1))
    print(f"{gpu}: wrote {out}")
    print(table(records))


if __name__ == "__main__":
    main()
