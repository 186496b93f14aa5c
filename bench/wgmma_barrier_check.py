"""Is compute-sanitizer racecheck's report on verify_attention_wgmma's final merge a real race? Two checks.

``delays``: hardware evidence. A copy of ``cuda_src/`` where warpgroup 0 writes its merge state ~100 us late and
thread 0 the last-split flag ~50 us late is timed nowhere, only run: if the ``__syncthreads()`` after those writes
did not hold the other warps back, they would read stale shared memory and the output would differ from
verify_attention's (``MILLION_CUPY_WGMMA=0``) over the same 8 x 32K cache (M = 32, q = 8, splits merged in-kernel).
``probe MODE``: bench/probes/racecheck_barriers.cu, the kernel's barrier ingredients in a race-free kernel, to run
under ``compute-sanitizer --tool racecheck`` (modes 0-31, see the source; each mode tried, 15, 16, 18, 20, 22, 23, 24
and 31 on an H100 in session 43, reported 0 hazards). The kernel itself now has two barriers where racecheck
misread one (docs/perf-notes.md, session 43), so its sanitize run is clean; these checks, run on the one-barrier form
in sessions 40-43, are the evidence that one was enough (``delays`` now delays the writes before both).

    python3 bench/wgmma_barrier_check.py delays          # GPU machine, compute capability 9.0
    compute-sanitizer --tool racecheck python3 bench/wgmma_barrier_check.py probe 15
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

# (file, code the delay goes after, the delay): each must occur exactly once
DELAYS = [
    ("prefill_attention.cu", "  __syncthreads();  // every warpgroup is done with the codebooks\n",
     "  if (wgi == 0) for (int i = 0; i < 100; ++i) __nanosleep(1000);  // barrier check: warpgroup 0's state late\n"),
    ("decode_common.cuh", "  if (threadIdx.x == 0) {\n    int done;\n",
     "    for (int i = 0; i < 50; ++i) __nanosleep(1000);  // barrier check: the flag late\n"),
]


def delayed_sources(directory: Path) -> None:
    """Copy cuda_src/ into ``directory`` with DELAYS inserted."""
    from million_cupy import kernels

    shutil.copytree(kernels.source_dir(), directory, dirs_exist_ok=True)
    for name, anchor, delay in DELAYS:
        path = directory / name
        text = path.read_text()
        if text.count(anchor) != 1:
            raise SystemExit(f"{name}: expected the anchor once, found it {text.count(anchor)} times: {anchor!r}")
        path.write_text(text.replace(anchor, anchor + delay))


def check_delays() -> int:
    import cupy as cp
    import harness
    from bench_decode import NH, build_cache
    from bench_prefill import random_queries

    from million_cupy import BatchPrefillWrapper, kernels

    harness.require_gpu("wgmma_barrier_check")
    cache, seqs = build_cache(cp, 8, 32768, 32, spare_tokens=8)
    q = random_queries(cp, 64, 12)

    def run(wgmma: str, sources: Path | None = None):
        os.environ["MILLION_CUPY_WGMMA"] = wgmma
        wrapper = BatchPrefillWrapper(cache, NH, backend="tensor_cores")
        wrapper.plan(seqs, np.arange(9) * 8, appended=True)
        out = cp.full_like(q, cp.nan)
        if sources is None:
            wrapper.run(0, q, out=out)
        else:
            with kernels.sources_from(sources):
                wrapper.run(0, q, out=out)
        cp.cuda.Device().synchronize()
        return out.astype(cp.float32)

    reference = run("0")
    with tempfile.TemporaryDirectory(prefix="wgmma_delays_") as scratch:
        delayed_sources(Path(scratch))
        outputs = {"verify_attention_wgmma": run("1"), "verify_attention_wgmma, delayed writes": run("1", Path(scratch))}
    worst = 0.0
    for name, out in outputs.items():
        diff = float(cp.abs(out - reference).max())
        worst = max(worst, diff if bool(cp.isfinite(out).all()) else float("inf"))
        print(f"{name}: finite {bool(cp.isfinite(out).all())}, max |diff| against verify_attention {diff:.3g}")
    print(f"built for sm_90a: {sorted(c['variant'] for c in kernels.compiled() if c['variant'].startswith('sm_90a:'))}")
    return 0 if worst < 1e-3 else 1


def run_probe(mode: int) -> int:
    import cupy as cp

    from million_cupy import kernels

    with kernels.sources_from(ROOT / "bench" / "probes"):
        kernel = kernels.get_arch_kernel("racecheck_barriers.cu", "k", "sm_90a")
    out = cp.zeros(384, dtype=cp.int32)
    kernel((1,), (384,), (out, cp.int32(mode)))
    cp.cuda.Device().synchronize()
    print(f"probe mode {mode}: out[0] = {int(out[0])}")
    return 0


def main() -> int:
    if sys.argv[1:2] == ["delays"]:
        return check_delays()
    if sys.argv[1:2] == ["probe"] and len(sys.argv) == 3:
        return run_probe(int(sys.argv[2]))
    raise SystemExit(__doc__)


if __name__ == "__main__":
    sys.exit(main())
