"""Offline NVRTC build of the supported kernel grid for sm_80 and sm_90 (no GPU needed).

Every source in ``cuda_src/`` is compiled per architecture, in programs of ``CHUNK`` expressions built in
parallel. The default run builds a representative subset (``representative``): the hot decode variants
plus, per source, variants chosen so that every value of every template argument is built at least once.
The whole grid (``kernels.supported_variants()``) is marked ``slow``: ``python -m pytest -m slow
tests/test_nvrtc_grid.py`` (``.ci/run`` runs it after the default suite). Any compile error fails; ptxas
register spills are printed and must be zero unless the source is listed in ``KNOWN_SPILLS``, or the kernel in
``KNOWN_KERNEL_SPILLS`` within its byte budget, with the reason they are accepted; the hot decode variants must
not spill in any case.

Skips only when NVRTC itself cannot be loaded; with ``MILLION_CUPY_REQUIRE_NVRTC=1`` (set by
``.ci/run``) that is a failure too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from million_cupy import kernels
from million_cupy.errors import DeviceUnavailable

ARCHS = ("sm_80", "sm_90")

# source file -> why its kernels are allowed to spill registers. Anything else may not spill.
KNOWN_SPILLS: dict[str, str] = {
    "decode_attention.cu": (
        "512-thread CTAs cap registers at 128; the largest G x head_dim/M accumulator sets and the contiguous "
        "layout's byte-wise V loads spill a few words. The hot paged variants must not: see "
        "test_hot_decode_variants_do_not_spill."
    ),
}

# Single kernels of otherwise spill-free sources: a regex over the mangled name -> (most spill bytes ptxas may
# report for it, why that is accepted).
KNOWN_KERNEL_SPILLS: dict[str, tuple[int, str]] = {
    r"verify_attentionILi128ELi64E(6__half|13__nv_bfloat16)Li2EE": (
        64,
        "two row tiles at M = 64 hold O for 32 rows x 128 dims (128 registers) in 255; sm_90 does not spill, sm_80 "
        "spills 56 bytes (NVRTC 12.9). It never runs on sm_80: it needs 172,032 bytes of shared memory per block "
        "and an A100 allows 166,912, so prefill.fitting_regime sends such drafts to the LUT path there",
    ),
}


def _accepted_kernel_spill(kernel: str, nbytes: int) -> bool:
    return any(re.search(pattern, kernel) and nbytes <= most for pattern, (most, _) in KNOWN_KERNEL_SPILLS.items())


# Paged decode variants the benchmarks and the Llama-shaped examples use (mode 0, head_dim 128, M 32/64,
# 4 query heads per kv head): as name expressions, and as mangled-name fragments of the built kernels.
HOT_EXPRESSIONS = [f"mc::decode_attention<0, 128, {m}, 4, {t}>" for m in (32, 64) for t in ("__half", "__nv_bfloat16")]
HOT_DECODE = [f"decode_attentionILi0ELi128ELi{m}ELi4E{t}E" for m in (32, 64) for t in ("6__half", "13__nv_bfloat16")]


def _template_args(expr: str) -> tuple[str, list[str]]:
    """``name<a, b, ...>`` -> (name, [a, b, ...]); a plain kernel name has no arguments."""
    if "<" not in expr:
        return expr, []
    name, rest = expr.split("<", 1)
    return name, [a.strip() for a in rest.rsplit(">", 1)[0].split(",")]


def representative(exprs: list[str]) -> list[str]:
    """The hot decode variants present in ``exprs``, then, greedily in grid order, every expression that builds
    a (kernel, argument position, value) not built yet: each template axis's every value at least once."""
    chosen = [e for e in HOT_EXPRESSIONS if e in exprs]
    covered = set()
    for e in chosen:
        name, args = _template_args(e)
        covered.update((name, i, a) for i, a in enumerate(args))
    for e in exprs:
        name, args = _template_args(e)
        new = {(name, i, a) for i, a in enumerate(args)} - covered
        if e not in chosen and (new or not args):
            chosen.append(e)
            covered |= new
    return chosen


# Name expressions per NVRTC program. NVRTC's front end costs ~0.2 s per program while ptxas costs
# ~0.5-2 s per kernel, serially within a program, so a large grid is cut into programs that run in
# parallel (one per core) instead of one program per source.
CHUNK = 24


@dataclass
class Result:
    """One source on one architecture: every chunk's build merged."""

    source: str
    arch: str
    n_variants: int
    seconds: float = 0.0  # summed over chunks (compile work, not wall time)
    kernels: dict[str, int] = field(default_factory=dict)  # kernel -> spill bytes
    registers: list[int] = field(default_factory=list)
    cubin_bytes: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, build: kernels.OfflineBuild | None, error: str | None, seconds: float) -> None:
        self.seconds += seconds
        if error is not None:
            self.errors.append(error)
            return
        self.kernels.update(build.spills())
        self.registers += [int(r) for r in re.findall(r"Used (\d+) registers", build.log)]
        self.cubin_bytes += build.cubin_size

    def spilling(self) -> dict[str, int]:
        return {k: v for k, v in self.kernels.items() if v}

    def summary(self) -> str:
        head = f"{self.arch} {self.source}: {self.n_variants} variants, {self.seconds:.0f} s of compiling"
        if self.errors:
            return f"{head}, {len(self.errors)} programs with COMPILE ERRORS"
        spilling = self.spilling()
        return (
            f"{head}, {len(self.kernels)} kernels, cubins {self.cubin_bytes / 2**20:.1f} MiB, "
            f"max {max(self.registers, default=0)} registers, "
            + (f"SPILLS in {len(spilling)} kernels (max {max(spilling.values())} bytes)" if spilling else "no spills")
        )


def _demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> ``template<args>`` (c++filt when installed, else the mangled names)."""
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, timeout=30).stdout
        pretty = out.splitlines()
    except (OSError, subprocess.SubprocessError):
        pretty = []
    if len(pretty) != len(names):
        return {n: n for n in names}
    return {n: p.split("(", 1)[0].removeprefix("void ") for n, p in zip(names, pretty)}


def _workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@pytest.fixture(scope="module")
def nvrtc_version():
    try:
        return kernels.nvrtc_version()
    except DeviceUnavailable as exc:  # raised when no libnvrtc can be loaded
        if os.environ.get("MILLION_CUPY_REQUIRE_NVRTC"):
            pytest.fail(f"MILLION_CUPY_REQUIRE_NVRTC is set but NVRTC cannot be loaded: {exc}")
        pytest.skip(f"NVRTC is not available ({exc})")


@pytest.fixture(scope="module")
def grid() -> dict[str, list[str]]:
    grid = kernels.supported_variants()
    assert grid, "kernels.supported_variants() is empty: no operation module registered a variant grid"
    empty = [source for source, exprs in grid.items() if not exprs]
    assert not empty, f"sources registered with an empty variant grid: {empty}"
    return {source: list(dict.fromkeys(exprs)) for source, exprs in grid.items()}  # distinct, in order


def test_representative_subset_covers_every_template_value(grid):
    for source, exprs in grid.items():
        subset = representative(exprs)
        assert set(subset) <= set(exprs) and len(set(subset)) == len(subset)
        want = {(n, i, a) for n, args in map(_template_args, exprs) for i, a in enumerate(args)}
        got = {(n, i, a) for n, args in map(_template_args, subset) for i, a in enumerate(args)}
        assert got == want, f"{source}: the subset misses {sorted(want - got)[:5]}"
        assert {n for n, _ in map(_template_args, subset)} == {n for n, _ in map(_template_args, exprs)}
    assert set(HOT_EXPRESSIONS) <= set(representative(grid["decode_attention.cu"]))


@pytest.fixture(scope="module", params=["representative", pytest.param("whole", marks=pytest.mark.slow)])
def builds(request, nvrtc_version, grid) -> tuple[dict[tuple[str, str], Result], str]:
    """Every (source, arch) built once, in chunks compiled in parallel (NVRTC is thread-safe and
    ctypes releases the GIL during the call): the representative subset, or (slow) the whole grid."""
    if request.param == "representative":
        grid = {source: representative(exprs) for source, exprs in grid.items()}
    results = {(s, a): Result(s, a, len(exprs)) for a in ARCHS for s, exprs in grid.items()}
    jobs = [
        (source, arch, exprs[i : i + CHUNK])
        for arch in ARCHS
        for source, exprs in grid.items()
        for i in range(0, len(exprs), CHUNK)
    ]

    def build(job):
        source, arch, exprs = job
        t0 = time.perf_counter()
        try:
            return job, kernels.nvrtc_compile_offline(source, exprs, arch), None, time.perf_counter() - t0
        except RuntimeError as exc:
            return job, None, str(exc), time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(len(jobs), _workers())) as pool:
        for (source, arch, _), b, error, seconds in pool.map(build, jobs):
            results[(source, arch)].add(b, error, seconds)
    wall = time.perf_counter() - t0
    return results, (f"{request.param} grid: {len(jobs)} NVRTC programs on {min(len(jobs), _workers())} threads, "
                     f"{wall:.0f} s wall")


def test_grid_covers_every_source(grid):
    sources = sorted(p.name for p in kernels.source_dir().glob("*.cu"))
    assert sources, f"no .cu sources in {kernels.source_dir()}"
    missing = [s for s in sources if s not in grid]
    assert not missing, f"sources with no registered variant grid (never compiled or checked): {missing}"
    unknown = [s for s in grid if s not in sources]
    assert not unknown, f"variant grids registered for sources that do not exist in {kernels.source_dir()}: {unknown}"


@pytest.mark.parametrize("arch", ARCHS)
def test_grid_compiles_without_spills(arch, builds, nvrtc_version, capsys):
    all_results, how = builds
    results = [r for (_, a), r in sorted(all_results.items()) if a == arch]
    with capsys.disabled():
        print(f"\nNVRTC {nvrtc_version[0]}.{nvrtc_version[1]}, {arch} ({how}):")
        for r in results:
            print("  " + r.summary())

    errors = [f"{r.source}:\n" + "\n".join(r.errors) for r in results if r.errors]
    assert not errors, f"NVRTC compile errors for {arch}:\n" + "\n\n".join(errors)

    problems = []
    for r in results:
        spilling = {k: v for k, v in r.spilling().items() if not _accepted_kernel_spill(k, v)}
        if spilling and r.source not in KNOWN_SPILLS:
            worst = sorted(spilling.items(), key=lambda kv: -kv[1])[:10]
            names = _demangle([k for k, _ in worst])
            listed = "\n    ".join(f"{v:6d} bytes  {names[k]}" for k, v in worst)
            problems.append(f"{r.source}: {len(spilling)} of {len(r.kernels)} kernels spill registers on {arch}; "
                            f"worst:\n    {listed}")
        if len(r.kernels) < r.n_variants:
            problems.append(
                f"{r.source}: ptxas reported {len(r.kernels)} entry functions for {r.n_variants} name expressions on {arch}"
            )
    assert not problems, "\n".join(problems) + (
        "\n(to accept spills for a source or a kernel, add it to KNOWN_SPILLS or KNOWN_KERNEL_SPILLS in "
        "tests/test_nvrtc_grid.py with the reason)"
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_hot_decode_variants_do_not_spill(arch, builds):
    r = builds[0][("decode_attention.cu", arch)]
    for frag in HOT_DECODE:
        found = {k: v for k, v in r.kernels.items() if frag in k}
        assert found, f"{frag} not built for {arch}"
        assert all(v == 0 for v in found.values()), f"{frag} spills on {arch}: {found}"


def test_sources_from_compiles_a_copy_of_the_sources_then_restores_the_package(nvrtc_version, tmp_path):
    """kernels.sources_from (bench/ab_sources.py): inside the block a kernel's source and its includes come from
    the copy, afterwards from the package again."""
    package = kernels.source_dir()
    copy = tmp_path / "cuda_src"
    shutil.copytree(package, copy)
    (copy / "merge_states.cu").write_text("// variant\n" + (copy / "merge_states.cu").read_text())
    expr = "mc::parallel::merge_rank_states<float>"
    with kernels.sources_from(copy) as d:
        assert kernels.source_dir() == d == copy.resolve()
        assert kernels.read_source("merge_states.cu").startswith("// variant\n")
        assert kernels.nvrtc_compile_offline("merge_states.cu", [expr]).cubin_size > 0
        # the include comes from the copy too: broken there, the compile fails
        (copy / "decode_common.cuh").write_text("#error the copy's header\n")
        with pytest.raises(RuntimeError, match="the copy's header"):
            kernels.nvrtc_compile_offline("merge_states.cu", [expr])
    assert kernels.source_dir() == package
    assert not kernels.read_source("merge_states.cu").startswith("// variant")
    assert kernels.nvrtc_compile_offline("merge_states.cu", [expr]).cubin_size > 0
    with pytest.raises(FileNotFoundError, match="expected a directory of CUDA sources"):
        with kernels.sources_from(tmp_path / "missing"):
            pass
    assert kernels.source_dir() == package


def test_an_arch_build_is_kept_on_disk_and_reused_until_the_sources_change(nvrtc_version, tmp_path, monkeypatch):
    """kernels.arch_cubin (the sm_90a build get_arch_kernel loads): built once into the cache directory, then
    reused by later processes without NVRTC; another macro set or an edited header is another build."""
    from million_cupy.prefill import TC_SOURCE, WGMMA_DEFINES

    cache = tmp_path / "cache"
    first = kernels.arch_cubin(TC_SOURCE, "sm_90a", WGMMA_DEFINES, cache_dir=cache)
    assert first.is_file() and first.stat().st_size > 0 and first.parent == cache
    assert [p.name for p in cache.iterdir()] == [first.name]  # no scratch file left behind

    def no_compile(*args, **kwargs):
        raise AssertionError("reused from the cache, not rebuilt")

    with monkeypatch.context() as m:
        m.setattr(kernels, "nvrtc_compile_offline", no_compile)
        assert kernels.arch_cubin(TC_SOURCE, "sm_90a", WGMMA_DEFINES, cache_dir=cache) == first
        with pytest.raises(AssertionError, match="not rebuilt"):
            kernels.arch_cubin(TC_SOURCE, "sm_90a", (), cache_dir=cache)
        edited = tmp_path / "src"
        shutil.copytree(kernels.source_dir(), edited)
        (edited / "pq_common.cuh").write_text((edited / "pq_common.cuh").read_text() + "\n// edited\n")
        with kernels.sources_from(edited), pytest.raises(AssertionError, match="not rebuilt"):
            kernels.arch_cubin(TC_SOURCE, "sm_90a", WGMMA_DEFINES, cache_dir=cache)


def test_an_arch_build_goes_to_the_temp_directory_with_a_warning_when_the_cache_is_not_writable(
        nvrtc_version, tmp_path, monkeypatch):
    """A cache directory that cannot be written (here a file stands in its place) does not fail the build: it is
    kept under the temp directory instead, and a RuntimeWarning names both places."""
    from million_cupy.prefill import TC_SOURCE, WGMMA_DEFINES

    blocked = tmp_path / "not_a_directory"
    blocked.write_text("a file where the cache directory would be")
    monkeypatch.setattr(kernels.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    with pytest.warns(RuntimeWarning, match="cannot keep the sm_90a build of prefill_attention.cu in .*not_a_directory"):
        path = kernels.arch_cubin(TC_SOURCE, "sm_90a", WGMMA_DEFINES, cache_dir=blocked)
    assert path.parent == tmp_path / "tmp" / "million_cupy_kernel_cache" and path.stat().st_size > 0
