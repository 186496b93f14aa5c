"""Shared benchmark plumbing: CUDA-event timing, environment capture, the results JSON schema.

Results files (bench/results/*.json) have top-level ``gpu``, ``date``, ``command``, ``launch`` (``programmatic``: programmatic
dependent launch, the default on sm_90+; ``ordinary``: under MILLION_CUPY_PDL=0, older GPUs, no GPU), ``versions`` and
``records`` (a list of dicts with at least ``suite`` and ``method``; timing records carry ``median_us``
(GPU time per call with calls queued back to back), ``call_us`` (one call including its host launch),
and ``p10_us`` / ``p90_us`` spread).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np


def require_gpu(suite: str) -> None:
    """Exit with one ``error:`` line (status 2, as the CLI's other user errors) where no GPU is usable."""
    from million_cupy.interop import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    if reason is not None:
        print(f"error: bench {suite} measures GPU kernels and needs a CUDA GPU usable through CuPy: {reason}",
              file=sys.stderr)
        raise SystemExit(2)


def gpu_name() -> str:
    try:
        import cupy as cp

        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.runtime.getDevice())
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception as exc:  # noqa: BLE001
        return f"no GPU ({type(exc).__name__})"


def launch_mode() -> str:
    """``programmatic`` where the library's bound launches use programmatic dependent launch on this device,
    else ``ordinary`` (``MILLION_CUPY_PDL=0``, a device below sm_90, no GPU)."""
    from million_cupy.kernels import programmatic_launches, programmatic_launches_requested

    if not programmatic_launches_requested():
        return "ordinary"
    try:
        return "programmatic" if programmatic_launches() else "ordinary"
    except Exception:  # noqa: BLE001 - no GPU: nothing launched
        return "ordinary"


def versions() -> dict:
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("cupy", "numba", "numba_cuda", "torch", "onnxruntime"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
        except Exception:  # noqa: BLE001
            pass
    try:
        import cupy as cp

        out["cuda_runtime"] = cp.cuda.runtime.runtimeGetVersion()
        out["cuda_driver"] = cp.cuda.runtime.driverGetVersion()
    except Exception:  # noqa: BLE001
        pass
    return out


def time_gpu(fn: Callable[[], object], *, queued: int = 20, repeats: int = 15, warmup: int = 3) -> dict:
    """GPU time per call: ``queued`` calls back to back between two events (host launch cost hidden),
    median over ``repeats``; and per-call time including the launch (events around one call)."""
    import cupy as cp

    for _ in range(warmup):
        fn()
    cp.cuda.get_current_stream().synchronize()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    per: list[float] = []
    for _ in range(repeats):
        start.record()
        for _ in range(queued):
            fn()
        stop.record()
        stop.synchronize()
        per.append(cp.cuda.get_elapsed_time(start, stop) * 1e3 / queued)
    calls: list[float] = []
    for _ in range(max(repeats, 30)):
        cp.cuda.get_current_stream().synchronize()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        calls.append(cp.cuda.get_elapsed_time(start, stop) * 1e3)
    return {
        "median_us": float(np.median(per)),
        "p10_us": float(np.percentile(per, 10)),
        "p90_us": float(np.percentile(per, 90)),
        "call_us": float(np.median(calls)),
    }


def time_host(fn: Callable[[], object], *, calls: int = 500, repeats: int = 5) -> float:
    """Host time per call in microseconds: ``calls`` back to back (the GPU queue absorbs them unless the
    kernels are slower than the host), median over ``repeats``, the stream drained between repeats."""
    import cupy as cp

    per = []
    for _ in range(repeats):
        cp.cuda.get_current_stream().synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per.append((time.perf_counter() - t0) / calls * 1e6)
    cp.cuda.get_current_stream().synchronize()
    return float(np.median(per))


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), the card's practical HBM ceiling."""
    import cupy as cp

    a = cp.empty(nbytes // 2, dtype=cp.uint8)
    b = cp.empty_like(a)
    t = time_gpu(lambda: b.__setitem__(Ellipsis, a), queued=5, repeats=7)
    return 2 * a.nbytes / (t["median_us"] * 1e-6) / 1e9


def write_results(path: str | Path, records: list[dict], extra: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Programmatic dependent launch is switched by the environment (million_cupy.kernels.PDL_ENV) and the device:
    # part of the command, and of the run's identity.
    pdl = os.environ.get("MILLION_CUPY_PDL")
    doc = {
        "gpu": gpu_name(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": (f"MILLION_CUPY_PDL={shlex.quote(pdl)} " if pdl is not None else "")
                   + " ".join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv),
        "launch": launch_mode(),
        "versions": versions(),
        **(extra or {}),
        "records": records,
    }
    path.write_text(json.dumps(doc, indent=1))
    return path


def table(records: list[dict], cols: list[str]) -> str:
    rows = [[str(r.get(c, "")) if not isinstance(r.get(c), float) else f"{r[c]:.1f}" for c in cols] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols)] + [line(r) for r in rows])
