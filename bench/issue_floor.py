"""Issue-rate floor of the paged PQ decode kernel at the speed targets' shapes (no GPU needed).

The long-context kernel (cuda_src/decode_attention.cu) runs one main-loop iteration per 32-token warp tile.
An SM hosts one CTA of 16 warps, four per scheduler, and a scheduler issues at most one warp instruction per
clock. A CTA whose warps each run ``n`` tiles therefore needs at least ``4 * n * loop_instructions`` clocks:
a lower bound on this kernel's time that ignores memory, table staging, the residual tokens and the split
merge. ``loop_instructions`` counts the SASS of the main loop (NVRTC cubin, nvdisasm); all of it runs once per
tile except a few instructions on rare paths (a last tile's masked tokens, a warp's final code loads).
Tiles per warp come from the planner's schedule for the benchmark's cache (bench/bench_decode.py).

    python bench/issue_floor.py [--targets bench/results/decode_targets_h200.json] \
        [--out bench/results/issue_floor_h200.json]

With ``--targets`` each shape's floor is set beside the measured time and the speed target (the SDPA median
of the same run divided by the issue's factor), with the instructions per clock the target would need.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402
from bench_decode import NH, NH_K, D, P, R  # noqa: E402

from million_cupy import kernels  # noqa: E402
from million_cupy.cache import full_pages  # noqa: E402
from million_cupy.decode import MODE_PAGED_PQ, THREADS, TILE, _expr, choose_group, make_schedule  # noqa: E402

# (batch, context, M, speed-up over SDPA the kernels issue asks for)
TARGETS = [(8, 32768, 64, 3.0), (8, 32768, 32, 5.0), (1, 131072, 64, 3.0)]
NWARPS = THREADS // 32
WARPS_PER_SCHEDULER = NWARPS // 4
SMEM_OPTIN = 227 * 1024  # H100 / H200 shared memory per block
H100_H200_SMS, H100_H200_CLOCK_MHZ = 132, 1980  # SXM parts' SM count and boost clock

_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BACK_BRANCH = re.compile(r"BRA\s+`\((\.L_x_\d+)\)")


def nvdisasm() -> str:
    """The nvdisasm binary: PATH, the CUDA toolkit, or pip's nvidia-cuda-nvdisasm."""
    found = shutil.which("nvdisasm")
    roots = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    candidates = [found] + [os.path.join(r, "bin", "nvdisasm") for r in roots if r]
    candidates += [c for p in sys.path for c in glob.glob(os.path.join(p, "nvidia", "*", "bin", "nvdisasm"))]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    raise FileNotFoundError("nvdisasm not found: pip install nvidia-cuda-nvdisasm (or install the CUDA toolkit)")


def main_loop(sass: str, min_packed_fmas: int) -> list[str]:
    """Opcodes of the innermost loop holding at least ``min_packed_fmas`` HFMA2: the per-tile loop, whose
    P·V alone needs that many (tile tokens x head_dim x heads / 64 lanes-MACs). NOPs (padding) excluded."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := _LABEL.match(line))}
    best: list[str] | None = None
    most = 0  # the most HFMA2 in any loop, for the error
    for i, line in enumerate(lines):
        m = _BACK_BRANCH.search(line)
        if not m or labels.get(m.group(1), len(lines)) >= i:
            continue
        ops = [x.group(1) for x in map(_INSTR.search, lines[labels[m.group(1)]:i + 1]) if x]
        ops = [op for op in ops if op != "NOP"]
        most = max(most, ops.count("HFMA2"))
        if ops.count("HFMA2") >= min_packed_fmas and (best is None or len(ops) < len(best)):
            best = ops
    if best is None:
        raise RuntimeError(f"no loop with >= {min_packed_fmas} HFMA2 (the P·V of one tile) in the SASS; the most "
                           f"in any loop is {most}: the kernel's structure changed")
    return best


def loop_instructions(d: int, M: int, G: int, dtype: str = "float16", arch: str = "sm_90") -> dict:
    build = kernels.nvrtc_compile_offline("decode_attention.cu", [_expr(MODE_PAGED_PQ, d, M, G, dtype)], arch)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(build.cubin)
        f.flush()
        sass = subprocess.run([nvdisasm(), "-c", f.name], check=True, capture_output=True, text=True).stdout
    ops = main_loop(sass, TILE * d * G // 64)
    top = sorted({op: ops.count(op) for op in set(ops)}.items(), key=lambda kv: -kv[1])[:8]
    return {"loop_instructions": len(ops), "loop_mix": dict(top)}


def tiles_per_warp(batch: int, context: int, G: int, sms: int) -> int:
    """The busiest warp's tiles under the planner's schedule for the benchmark's cache."""
    main = (full_pages(np.full(batch, context), P, R) * P).astype(np.int32)
    work = make_schedule(main, NH, G, P, sms, residual=True).work
    tiles = -(-(work[:, 3] - work[:, 2]) // TILE)
    return int(-(-tiles.max() // NWARPS))


def floors(sms: int, clock_mhz: float, arch: str, targets: dict | None) -> list[dict]:
    records = []
    for batch, context, M, factor in TARGETS:
        G = choose_group(MODE_PAGED_PQ, D, M, NH // NH_K, SMEM_OPTIN)
        rec = {"suite": "issue_floor", "method": "paged_pq", "batch": batch, "context": context, "M": M,
               "dtype": "float16", "G": G, **loop_instructions(D, M, G, arch=arch),
               "tiles_per_warp": tiles_per_warp(batch, context, G, sms), "target_speedup": factor}
        clocks = WARPS_PER_SCHEDULER * rec["tiles_per_warp"] * rec["loop_instructions"]
        rec["floor_us"] = clocks / clock_mhz
        if targets:
            key = (batch, context)
            sdpa = targets.get(("torch_sdpa", None, *key))
            measured = targets.get(("paged_pq", M, *key))
            if sdpa and measured:
                target_us = sdpa / factor
                # Per-SM instructions per clock (peak 4) that would meet the target if issue were all.
                rec.update(sdpa_us=sdpa, target_us=target_us, measured_us=measured,
                           ipc_to_meet_target=4 * rec["floor_us"] / target_us,
                           ipc_measured_equivalent=4 * rec["floor_us"] / measured)
        records.append(rec)
    return records


def read_targets(path: str) -> dict:
    doc = json.loads(Path(path).read_text())
    return {(r["method"], r.get("M"), r["batch"], r["context"]): r["median_us"] for r in doc["records"]
            if r.get("nh_k", NH_K) == NH_K}


def device_clock() -> tuple[int, float] | None:
    try:
        import cupy as cp

        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.runtime.getDevice())
        return int(props["multiProcessorCount"]), props["clockRate"] / 1000.0
    except Exception:  # noqa: BLE001 - no GPU: the SXM defaults
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", help="a decode_targets JSON (bench_decode.py --suite targets) to compare with")
    ap.add_argument("--sms", type=int, help=f"SM count (default: this GPU's, else {H100_H200_SMS})")
    ap.add_argument("--clock-mhz", type=float, help=f"SM clock (default: this GPU's, else {H100_H200_CLOCK_MHZ})")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    sms, clock = device_clock() or (H100_H200_SMS, H100_H200_CLOCK_MHZ)
    sms, clock = args.sms or sms, args.clock_mhz or clock
    records = floors(sms, clock, args.arch, read_targets(args.targets) if args.targets else None)
    extra = {"sms": sms, "clock_mhz": clock, "arch": args.arch, "nvrtc": ".".join(map(str, kernels.nvrtc_version()))}
    if args.out:
        harness.write_results(args.out, records, extra)
    print(f"{sms} SMs at {clock:.0f} MHz, {args.arch}, NVRTC {extra['nvrtc']}")
    cols = ["batch", "context", "M", "loop_instructions", "tiles_per_warp", "floor_us", "target_us", "measured_us",
            "ipc_to_meet_target", "ipc_measured_equivalent"]
    print(harness.table(records, cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
