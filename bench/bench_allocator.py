"""Benchmark PageAllocator alloc / free on a GPU, timed with CUDA events on the allocator's stream.

    python bench/bench_allocator.py --out bench/results/allocator_<gpu>.json

For each batch size (pages per call) the script times ``alloc`` alone, ``free`` alone and an
``alloc`` + ``free`` pair, each over ``--repeats`` calls after a warm-up that also compiles the
kernels. A sample is the stream time between an event recorded before the call and one recorded
after it, so it includes the host launch overhead as seen by the stream (the GPU idles while
Python prepares a launch), which is what a decode step pays. ``free`` synchronises by design
(it reports invalid ids), ``alloc`` does not: ``syncs_per_call`` in each record shows it.

Writes JSON with ``gpu``, ``date``, ``command``, ``versions`` and ``records`` (suite, method, batch,
median_us, per_page_us, p10_us, p90_us, pages_per_s, syncs_per_call, bound_alloc: whether alloc launched
through the bound path rather than numba's dispatcher), then prints a table.
Refuses to run under numba's CUDA simulator (CPU machines), where timings mean nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from million_cupy.allocator import PageAllocator  # noqa: E402 - after the path set-up above
from million_cupy.interop import gpu_available  # noqa: E402

BATCHES = (1, 8, 64, 256, 1024)
# alloc_scratch: ids into the allocator's reused buffer, as a decode step's page reservation takes them (no
# device array made per call).
METHODS = ("alloc", "alloc_scratch", "free", "alloc+free")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/allocator_<gpu>.json)")
    p.add_argument("--repeats", type=int, default=500, help="timed calls per (method, batch); at least 200")
    p.add_argument("--warmup", type=int, default=50, help="untimed calls per (method, batch) first")
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="pages per call")
    p.add_argument("--page-nbytes", type=int, default=0, help="bytes per page of the pool (no effect on timing)")
    args = p.parse_args()
    if args.repeats < 200:
        p.error(f"--repeats: expected at least 200 for stable medians, got {args.repeats}")
    return args


def versions(cp: Any) -> dict[str, str]:
    import numba
    import numba_cuda

    runtime = cp.cuda.runtime.runtimeGetVersion()
    driver = cp.cuda.runtime.driverGetVersion()
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_cuda": numba_cuda.__version__,
        "cupy": cp.__version__,
        "cuda_runtime": f"{runtime // 1000}.{runtime % 1000 // 10}",
        "cuda_driver": f"{driver // 1000}.{driver % 1000 // 10}",
    }


def time_method(
    cp: Any, alloc: PageAllocator, stream: Any, method: str, batch: int, warmup: int, repeats: int
) -> tuple[np.ndarray, float]:
    """Per-call stream times in µs and host synchronisations per timed call."""
    start, end = cp.cuda.Event(), cp.cuda.Event()

    def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
        start.record(stream)
        result = fn()
        end.record(stream)
        end.synchronize()
        return cp.cuda.get_elapsed_time(start, end) * 1e3, result

    samples = []
    syncs = 0
    for i in range(warmup + repeats):
        before = alloc._syncs
        if method in ("alloc", "alloc_scratch"):
            us, ids = timed(lambda: getattr(alloc, method)(batch))
            syncs_in_call = alloc._syncs - before
            alloc.free(ids[:batch])
        elif method == "free":
            ids = alloc.alloc(batch)
            before = alloc._syncs
            us, _ = timed(lambda: alloc.free(ids))
            syncs_in_call = alloc._syncs - before
        else:
            us, _ = timed(lambda: alloc.free(alloc.alloc(batch)))
            syncs_in_call = alloc._syncs - before
        if i >= warmup:
            samples.append(us)
            syncs += syncs_in_call
    return np.asarray(samples), syncs / repeats


def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def main() -> int:
    args = parse_args()
    if PageAllocator.simulated or not gpu_available():
        print(
            "bench_allocator: needs a CUDA GPU usable through CuPy and numba-cuda; on this machine the "
            "allocator runs under numba's CUDA simulator (or no GPU is usable), so timings would be "
            "meaningless. Run it on a GPU machine.",
            file=sys.stderr,
        )
        return 2
    import cupy as cp

    gpu = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
    gpu = gpu.decode() if isinstance(gpu, bytes) else gpu
    out = args.out or Path(__file__).resolve().parent / "results" / f"allocator_{gpu_slug(gpu)}.json"

    stream = cp.cuda.Stream(non_blocking=True)
    alloc = PageAllocator(max(args.batches) * 4, args.page_nbytes, stream=stream)
    records = []
    for batch in args.batches:
        for method in METHODS:
            samples, syncs_per_call = time_method(cp, alloc, stream, method, batch, args.warmup, args.repeats)
            median = float(np.median(samples))
            records.append(
                {
                    "suite": "allocator",
                    "method": method,
                    "batch": batch,
                    "median_us": median,
                    "per_page_us": median / batch,
                    "p10_us": float(np.percentile(samples, 10)),
                    "p90_us": float(np.percentile(samples, 90)),
                    "pages_per_s": batch / median * 1e6,
                    "syncs_per_call": syncs_per_call,
                    "bound_alloc": alloc.bound_alloc,
                }
            )
    stats = alloc.stats()
    if stats["used"] != 0:
        raise RuntimeError(f"benchmark leaked pages: {stats}")

    result = {
        "gpu": gpu,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "versions": versions(cp),
        "records": records,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"wrote {out}")
    print(f"{gpu}: {args.repeats} timed calls each, CUDA events on the allocator stream")
    header = ("method", "batch", "median us", "p10 us", "p90 us", "us/page", "Mpages/s", "syncs")
    print(f"{header[0]:<14}" + "".join(f"{h:>{w}}" for h, w in zip(header[1:], (6, 11, 9, 9, 9, 10, 7))))
    for r in records:
        print(
            f"{r['method']:<14}{r['batch']:>6}{r['median_us']:>11.1f}{r['p10_us']:>9.1f}{r['p90_us']:>9.1f}"
            f"{r['per_page_us']:>9.3f}{r['pages_per_s'] / 1e6:>10.2f}{r['syncs_per_call']:>7.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
