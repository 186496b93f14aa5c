"""The ``million-cupy`` console script (also ``python -m million_cupy.cli``).

Subcommands:

- ``info``            what this machine offers: GPU, library versions, NVRTC, the kernel variant grid.
- ``demo``            the end-to-end demo (GPU when one is usable, else small shapes on the CPU reference path).
- ``train-codebook``  train a PQ codebook from a ``.npy`` file of samples ``(n, d)`` and save it.
- ``bench``           benchmark suites.

User mistakes (missing file, wrong shape, unsupported configuration) print ``error: ...`` to stderr
and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

from . import __version__
from .errors import MillionError

EXIT_USAGE = 2

# suite -> (script in bench/, what it measures)
BENCH_SUITES: dict[str, tuple[str, str]] = {
    "decode": ("bench_decode.py", "paged PQ vs contiguous PQ vs fp16 paged vs PyTorch SDPA decode attention"),
    "million": ("bench_decode.py", "one decode step of a 1,000,000-token, 32-layer cache"),
    "codebook": ("bench_codebook.py", "codebook training time and GPU encode throughput"),
    "allocator": ("bench_allocator.py", "page alloc / free cost, single and batched"),
    "memory": ("bench_memory.py", "bytes per token and pool utilization on a mixed-length trace"),
    "accuracy": ("accuracy.py", "attention error of PQ vs uniform int2/int4 and KIVI on synthetic KV"),
    "prefill": ("bench_prefill.py", "several new tokens per sequence (BatchPrefillWrapper) vs one-token decode and SDPA"),
    "step": ("bench_step.py", "the whole 32-layer decode step (append + attention), eager and CUDA-graph replayed, "
                              "vs the fp16 paged mode and PyTorch fp16"),
    "quality": ("quality.py", "a small Llama trained here on real text: perplexity, passkey retrieval and greedy "
                "generation with the PQ cache vs fp16 and KIVI"),
    "train-lm": ("lm.py", "train the quality study's model (Llama, 6 layers, on the Python stdlib sources)"),
    "e2e": ("bench_e2e.py", "end-to-end Llama-shaped decode: PQ cache vs fp16 cache, tokens/s and p50/p99 latency"),
    "parallel": ("bench_parallel.py", "decode over several GPUs (NCCL): weak scaling, the exchange's share, head vs "
                                      "sequence parallel"),
    "report": ("report.py", "regenerate REPORT.md and plots from bench/results"),
}


# ------------------------------------------------------------------------------------------------
# info
# ------------------------------------------------------------------------------------------------


def _unavailable(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"unavailable: {type(exc).__name__}" + (f": {lines[0]}" if lines else "")


def _guard(fn: Callable[[], object]) -> str:
    """``str(fn())``, or ``unavailable: reason`` when anything in it fails: info must never crash."""
    try:
        return str(fn())
    except Exception as exc:  # noqa: BLE001 - report, never raise
        return _unavailable(exc)


def _dist_version(*names: str) -> str:
    """Installed version of the first of ``names`` that is installed (``name==version``)."""
    for name in names:
        try:
            v = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        return v if len(names) == 1 else f"{v} ({name})"
    return "not installed"


def _gpu_description() -> str:
    from . import interop  # noqa: PLC0415

    if os.environ.get("MILLION_CUPY_DISABLE_GPU"):
        return "no GPU (MILLION_CUPY_DISABLE_GPU is set)"
    if not interop.cuda_driver_present():
        return "no GPU (no CUDA driver library found)"
    if not interop.gpu_available():
        try:
            n = interop.cupy().cuda.runtime.getDeviceCount()
        except Exception as exc:  # noqa: BLE001
            return f"no GPU (CuPy cannot use the CUDA driver; {_unavailable(exc)})"
        return f"no GPU (CuPy sees {n} devices)"
    cp = interop.cupy()
    rt = cp.cuda.runtime
    dev = rt.getDevice()
    props = rt.getDeviceProperties(dev)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    mem_gib = props["totalGlobalMem"] / 2**30
    return (
        f"{name} (device {dev} of {rt.getDeviceCount()}, sm_{props['major']}{props['minor']}, {mem_gib:.1f} GiB, "
        f"driver {rt.driverGetVersion()}, runtime {rt.runtimeGetVersion()})"
    )


def _nvrtc_description() -> str:
    from . import kernels  # noqa: PLC0415

    major, minor = kernels.nvrtc_version()
    headers = kernels.cuda_include_dirs()
    return f"{major}.{minor} (headers: {headers[0] if headers else 'cuda_fp16.h not found'})"


def _kernel_cache_description() -> str:
    from . import kernels  # noqa: PLC0415

    n_here = len(kernels.compiled())
    cache_dir = kernels.kernel_cache_dir()
    n_disk = sum(1 for p in cache_dir.iterdir() if p.is_file()) if cache_dir.is_dir() else 0
    return (
        f"{n_here} in this process (variants compile on first use); "
        f"CuPy's on-disk kernel cache {cache_dir} holds {n_disk} files"
    )


def _launch_description() -> str:
    from .interop import gpu_available  # noqa: PLC0415
    from .kernels import PDL_ENV, programmatic_launches, programmatic_launches_requested  # noqa: PLC0415

    if not programmatic_launches_requested():
        return f"ordinary ({PDL_ENV}=0)"
    if not gpu_available():
        return f"programmatic dependent launch on sm_90+, ordinary below (no GPU here; {PDL_ENV}=0 turns it off)"
    if programmatic_launches():
        return f"programmatic dependent launch ({PDL_ENV}=0 turns it off)"
    return "ordinary (programmatic dependent launch needs sm_90+)"


def _verify_kernel_description() -> str:
    from .decode import device_compute_capability  # noqa: PLC0415
    from .interop import gpu_available  # noqa: PLC0415
    from .prefill import WGMMA_ENV, WGMMA_WHERE, warpgroup_mma_requested  # noqa: PLC0415

    if not warpgroup_mma_requested():
        return f"verify_attention ({WGMMA_ENV}=0)"
    if not gpu_available():
        return (f"verify_attention_wgmma on compute capability 9.0 for {WGMMA_WHERE}, verify_attention elsewhere "
                f"(no GPU here; {WGMMA_ENV}=0 turns it off)")
    if device_compute_capability() == 90:
        return f"verify_attention_wgmma for {WGMMA_WHERE}, verify_attention elsewhere ({WGMMA_ENV}=0 turns it off)"
    return "verify_attention (its warpgroup-MMA form needs compute capability 9.0)"


def cmd_info(args: argparse.Namespace) -> int:
    rows = [
        ("million-cupy", __version__),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", _guard(platform.platform)),
        ("GPU", _guard(_gpu_description)),
        ("numpy", _guard(lambda: _dist_version("numpy"))),
        ("numba", _guard(lambda: _dist_version("numba"))),
        ("numba-cuda", _guard(lambda: _dist_version("numba-cuda"))),
        ("CuPy", _guard(lambda: _dist_version("cupy-cuda12x", "cupy-cuda13x", "cupy-cuda11x", "cupy"))),
        ("NVRTC", _guard(_nvrtc_description)),
        ("launches", _guard(_launch_description)),
        ("verify kernel", _guard(_verify_kernel_description)),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")

    print("kernel variants (supported grid, by source):")
    try:
        from . import kernels  # noqa: PLC0415

        grid = kernels.supported_variants()
    except Exception as exc:  # noqa: BLE001
        print(f"  {_unavailable(exc)}")
    else:
        if not grid:
            print("  none registered")
        for source, variants in grid.items():
            print(f"  {source}: {len(variants)}")
        if grid:
            print(f"  total: {sum(len(v) for v in grid.values())}")
    print(f"compiled variants: {_guard(_kernel_cache_description)}")
    return 0


# ------------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    import dataclasses  # noqa: PLC0415
    import json  # noqa: PLC0415

    from . import demo  # noqa: PLC0415
    from .interop import gpu_available  # noqa: PLC0415

    gpu = gpu_available() and not args.cpu
    cfg = demo.DemoConfig.default(gpu)
    overrides = {k: getattr(args, k) for k in ("layers", "batch", "prompt", "steps", "M") if getattr(args, k)}
    cfg = dataclasses.replace(cfg, **overrides)
    result = demo.run(cfg, gpu=gpu)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


# ------------------------------------------------------------------------------------------------
# train-codebook
# ------------------------------------------------------------------------------------------------


def _load_samples(path: Path):
    import numpy as np  # noqa: PLC0415

    if not path.is_file():
        problem = "is not a file" if path.exists() else "not found"
        raise FileNotFoundError(f"samples file {str(path)!r} {problem} (expected a .npy file of shape (n, d))")
    with path.open("rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY" and not magic.startswith(b"PK"):
        raise ValueError(f"{path}: expected a .npy file (NumPy's binary format, written by numpy.save) holding a "
                         f"numeric (n, d) array, got a file that does not start like one (first bytes {magic!r}); "
                         f"convert text with numpy.save(path, numpy.loadtxt(text_file))")
    try:
        samples = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{path}: expected a .npy file holding a numeric (n, d) array, could not read it: {exc}") from exc
    if not isinstance(samples, np.ndarray):
        raise ValueError(f"{path}: expected a .npy file holding one (n, d) array, got an .npz archive")
    if samples.ndim != 2:
        raise ValueError(f"{path}: expected samples of shape (n, d), got shape {samples.shape}")
    if not (np.issubdtype(samples.dtype, np.floating) or np.issubdtype(samples.dtype, np.integer)):
        raise ValueError(f"{path}: expected a real-valued (float or integer) array, got dtype {samples.dtype}")
    return samples.astype(np.float32, copy=False)


def cmd_train_codebook(args: argparse.Namespace) -> int:
    import numpy as np  # noqa: PLC0415

    samples = _load_samples(Path(args.samples))
    n, d = samples.shape
    out = Path(args.out)
    if not out.parent.is_dir():  # fail before training, not after
        raise FileNotFoundError(f"--out: directory {str(out.parent)!r} does not exist")

    from .codebook import Codebook  # noqa: PLC0415  (Codebook.train checks M, d and iters)

    print(f"training codebook: {n} samples, d = {d}, M = {args.M}, {args.iters} iterations, seed {args.seed}",
          file=sys.stderr)
    t0 = time.perf_counter()
    codebook = Codebook.train(samples, args.M, iters=args.iters, seed=args.seed, progress=True)
    elapsed = time.perf_counter() - t0
    codebook.save(out)

    check = samples[: min(n, 4096)]
    approx = np.asarray(codebook.decode(codebook.encode(check)), dtype=np.float64)
    rel = float(np.sum((approx - check) ** 2) / max(float(np.sum(check.astype(np.float64) ** 2)), 1e-30))
    print(f"saved {out} (trained in {elapsed:.1f} s; relative reconstruction error "
          f"||x - decode(encode(x))||^2 / ||x||^2 = {rel:.4f} on {len(check)} samples)")
    return 0


# ------------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    if not args.suite:
        print("benchmark suites (million-cupy bench SUITE [script options]):")
        for name, (_, what) in BENCH_SUITES.items():
            print(f"  {name:<10} {what}")
        return 0
    import runpy  # noqa: PLC0415

    # The suites live in the source checkout's bench/ (they need matplotlib / torch baselines, which are
    # not library dependencies), so `bench` works from a checkout or an editable install.
    bench_dir = Path(__file__).resolve().parent.parent / "bench"
    script, _ = BENCH_SUITES[args.suite]
    if not (bench_dir / script).is_file():
        raise FileNotFoundError(f"bench/{script} not found next to the package (needs a source checkout)")
    extra = list(args.options)
    if args.suite in ("decode", "million") and "--suite" not in extra:
        extra = ["--suite", "targets" if args.suite == "decode" else "million"] + extra
    sys.argv = [str(bench_dir / script)] + extra
    sys.path.insert(0, str(bench_dir))
    try:
        runpy.run_path(str(bench_dir / script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="million-cupy",
        description="Product-quantized paged KV cache (MILLION / PagedPQCache) with native CUDA decode kernels.",
    )
    parser.add_argument("--version", action="version", version=f"million-cupy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="GPU, library versions, NVRTC and the kernel variant grid")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="end-to-end demo (GPU if usable, else small shapes on the CPU reference path)")
    p.add_argument("--layers", type=int, help="decoder layers (default: 4 on GPU, 2 on CPU)")
    p.add_argument("--batch", type=int, help="sequences decoded together (default: 4 on GPU, 2 on CPU)")
    p.add_argument("--prompt", type=int, help="prompt tokens per sequence (default: 8192 on GPU, 300 on CPU)")
    p.add_argument("--steps", type=int, help="decode steps (default: 64 on GPU, 8 on CPU)")
    p.add_argument("--M", type=int, help="PQ subspaces (default: 64 for d=128 on GPU, 32 for d=64 on CPU)")
    p.add_argument("--cpu", action="store_true", help="use the CPU reference path even if a GPU is present")
    p.add_argument("--json", help="also write the measurements to this JSON file")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train-codebook", help="train a PQ codebook from a .npy file of samples (n, d)")
    p.add_argument("samples", help="a .npy file holding a float array of shape (n, d)")
    p.add_argument("--M", type=int, default=32, help="number of subspaces; d/M must be 1, 2, 4 or 8 (default: 32)")
    p.add_argument("--iters", type=int, default=25, help="k-means iterations (default: 25)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--out", required=True, help="where to save the codebook")
    p.set_defaults(func=cmd_train_codebook)

    p = sub.add_parser("bench", help="benchmark suites: " + ", ".join(BENCH_SUITES))
    p.add_argument("suite", nargs="?", choices=sorted(BENCH_SUITES), help="suite to run (none: list them)")
    p.add_argument("options", nargs=argparse.REMAINDER, help="options passed to the suite's script")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except (OSError, ValueError, MillionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
