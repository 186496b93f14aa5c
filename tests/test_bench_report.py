"""bench/report.py on the stored results (CPU); bench/bench_e2e.py: its refusal without a GPU, its graph capture on one."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from million_cupy.interop import gpu_available

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PNGS = ("decode_latency.png", "memory_per_token.png", "pool_utilization.png", "several_tokens.png")

pytest.importorskip("matplotlib")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_report_from_stored_results(tmp_path):
    src = BENCH / "results"
    if not any(src.glob("*.json")):
        pytest.skip("no bench/results/*.json in this checkout")
    res = tmp_path / "results"
    res.mkdir()
    for f in list(src.glob("*.json")) + list(src.glob("accuracy.png")):
        shutil.copyfile(f, res / f.name)
    assert _load("report").main(["--results", str(res)]) == 0
    report = res / "REPORT.md"
    assert report.is_file() and report.stat().st_size > 0
    text = report.read_text()
    for png in PNGS:
        assert (res / png).is_file() and (res / png).stat().st_size > 0, png
        assert f"]({png})" in text
    assert "### decode" in text and "### memory" in text
    has_e2e = any('"e2e"' in f.read_text() for f in res.glob("*.json"))
    assert ((res / "e2e_throughput.png").is_file() and "](e2e_throughput.png)" in text) == has_e2e


def test_report_with_no_results(tmp_path):
    assert _load("report").main(["--results", str(tmp_path)]) == 0
    text = (tmp_path / "REPORT.md").read_text()
    assert "decode_latency.png skipped" in text and "Missing suites" in text
    # memory_per_token falls back to the geometry and says so
    assert (tmp_path / "memory_per_token.png").stat().st_size > 0
    assert "computed from the geometry" in text


def test_step_plot_takes_the_newest_full_run_not_a_superseded_one(tmp_path):
    """plot_step draws the run with the most shapes, newest first, skipping a run whose design was not kept."""
    import json

    def run(name, date, shapes, p50, **extra):
        records = [{"suite": "step", "method": "paged_pq_graph", "batch": b, "context": c, "M": 64, "layers": 32,
                    "step_p50_us": p50} for b, c in shapes]
        (tmp_path / name).write_text(json.dumps({"date": date, "records": records, **extra}))

    full = [(1, 4096), (1, 32768), (8, 32768)]
    run("old.json", "2026-12-01", full, 100.0)
    run("probe.json", "2026-12-03", full[:1], 200.0)
    run("superseded.json", "2026-12-02", full, 300.0, superseded_by="old.json")
    report = _load("report")
    picked = []
    report._grouped_bars = lambda ax, n, series: picked.extend(v for _, values in series for v in values)
    png, _ = report.plot_step(report.by_suite(report.load(tmp_path)), tmp_path)
    assert png == "decode_step.png" and picked == [0.1, 0.1, 0.1]


def test_prefill_plot_takes_the_newest_wide_verify_run_and_the_newest_chunk_run(tmp_path):
    """plot_prefill draws verification from the newest run with four draft counts (a newer two-count probe and an
    older run are passed over), each backend over that run's one-token decode, and chunks from the newest run that
    has chunk records with an SDPA time; with no prefill record it skips and says so."""
    import json

    import matplotlib.axes

    def run(name, date, counts, scale, chunks=()):
        records = [{"suite": "prefill", "method": "decode_one_token", "M": M, "batch": 8, "context": 32768,
                    "queries_per_seq": 1, "median_us": 100.0} for M in (64, 32)]
        records += [{"suite": "prefill", "method": "verify", "M": M, "batch": 8, "context": 32768,
                     "queries_per_seq": q, "backend": backend, "median_us": 100.0 * scale * q}
                    for M in (64, 32) for q in counts for backend in ("auto", "lut")]
        records += [{"suite": "prefill", "method": "chunk", "M": 64, "batch": b, "context": 32768, "queries_per_seq": 2048,
                     "backend": "auto", "median_us": 1.0, "vs_sdpa": v, "path": "dense"} for b, v in chunks]
        (tmp_path / name).write_text(json.dumps({"date": date, "records": records}))

    report = _load("report")
    assert report.plot_prefill(report.by_suite(report.load(tmp_path)), tmp_path)[0] is None
    run("old_wide.json", "2026-12-01", (2, 4, 8, 16), 3.0, chunks=[(1, 9.0)])
    run("wide.json", "2026-12-02", (2, 4, 8, 16), 1.0)
    run("probe.json", "2026-12-03", (4, 8), 2.0, chunks=[(1, 1.2), (4, 1.1)])
    lines, bars = [], []
    original_plot, original_bar = matplotlib.axes.Axes.plot, matplotlib.axes.Axes.bar
    matplotlib.axes.Axes.plot = lambda ax, *a, **k: (lines.append((k.get("label"), a)), original_plot(ax, *a, **k))[1]
    matplotlib.axes.Axes.bar = lambda ax, x, h, *a, **k: (bars.append(list(h)), original_bar(ax, x, h, *a, **k))[1]
    try:
        png, note = report.plot_prefill(report.by_suite(report.load(tmp_path)), tmp_path)
    finally:
        matplotlib.axes.Axes.plot, matplotlib.axes.Axes.bar = original_plot, original_bar
    assert png == "several_tokens.png" and (tmp_path / png).stat().st_size > 0
    assert "`wide.json`" in note and "`probe.json`" in note
    auto = [a for label, a in lines if label == "auto"]
    assert len(auto) == 2 and all(list(a[0]) == [2, 4, 8, 16] and list(a[1]) == [2.0, 4.0, 8.0, 16.0] for a in auto)
    assert bars == [[1.2, 1.1]]


def test_cli_lists_new_suites():
    from million_cupy.cli import BENCH_SUITES

    assert BENCH_SUITES["e2e"][0] == "bench_e2e.py" and BENCH_SUITES["report"][0] == "report.py"
    for script, _ in BENCH_SUITES.values():
        assert (BENCH / script).is_file()


@pytest.mark.skipif(gpu_available(), reason="checks the refusal on a machine without a GPU")
def test_e2e_quick_refuses_without_gpu(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "bench_e2e.py"), "--quick", "--out", str(tmp_path / "e.json")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert "needs a CUDA GPU" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "e.json").exists()


@pytest.mark.skipif(gpu_available(), reason="checks the refusal on a machine without a GPU")
def test_parallel_bench_refuses_without_gpu(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "bench_parallel.py"), "--out", str(tmp_path / "p.json")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert "bench parallel measures GPU kernels" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "p.json").exists()


@pytest.mark.gpu
def test_e2e_quick_captures_the_whole_model_step(tmp_path):
    """The graph methods capture projections, append and attention of every layer in one CUDA graph; their
    cuBLAS calls (through ctypes) match cupy.matmul, and the captured PQ step decodes as many tokens as eager."""
    import json

    out = tmp_path / "e.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_e2e.py"), "--quick", "--out", str(out),
                           "--methods", "pq_cache_graph", "fp16_cache_graph"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(out.read_text())["records"]
    assert {r["method"] for r in records} == {"pq_cache_graph", "fp16_cache_graph"}
    for r in records:
        assert r["captured"] and r["gemm_rel_err"] < 1e-3
        assert 0 < r["cache_gpu_ms"] < r["graph_gpu_ms"]
        assert len(r["step_ms"]) == r["steps"]


def test_step_targets_reproduce_the_stored_run():
    """bench_step.judge on the stored H200 run's measurements gives the targets that run recorded, and judges the
    graph loop's plan from the graph records (a field added after that run: one of its records, 8 x 32K at
    M = 32, had a 69.5 us median)."""
    import json

    stored = json.loads((BENCH / "results" / "step_h200.json").read_text())["records"]
    measured = [r for r in stored if r["method"] != "targets"]
    rows = _load("bench_step").judge(measured)
    judged = {(r["batch"], r["context"], r["M"]): r for r in rows if "graph_vs_gpu" in r}
    recorded = [r for r in stored if r["method"] == "targets" and "graph_vs_gpu" in r]
    assert [r for r in rows if "graph_vs_gpu" not in r] == [r for r in stored if "decode_le_1.5run" in r]
    assert len(recorded) == len(judged) == 10
    for r in recorded:
        mine = judged[(r["batch"], r["context"], r["M"])]
        assert {k: v for k, v in mine.items() if k in r} == r
    slow_graph_plans = {(r["batch"], r["context"], r["M"]) for r in measured
                        if r["method"] == "paged_pq_graph" and r["plan_us"] > 60}
    assert {key for key, r in judged.items() if not r["graph_plan_le_60us"]} == slow_graph_plans


def _one_line_patch(path: Path, rel: str) -> str:
    """A unified diff that rewrites the first line of ``rel`` (relative to the repository root)."""
    import difflib

    lines = path.read_text().splitlines(keepends=True)
    return "".join(difflib.unified_diff(lines, ["# patched\n", *lines[1:]], f"a/{rel}", f"b/{rel}"))


def test_ab_patch_patches_a_copy_and_compares_the_rounds_medians(tmp_path):
    ab = _load("ab_patch")
    target = BENCH / "harness.py"
    original = target.read_text()
    patch = tmp_path / "one.diff"
    patch.write_text(_one_line_patch(target, "bench/harness.py"))
    tree = ab.patched_tree(patch, tmp_path / "b")
    assert target.read_text() == original  # the tree itself is untouched
    assert (tree / "bench" / "harness.py").read_text().startswith("# patched\n")
    assert (tree / "cuda_src" / "prefill_attention.cu").is_file() and not (tree / "bench" / "results").exists()
    stale = tmp_path / "stale.diff"  # made against the patched file: the line it replaces is not in the tree
    (tree / "bench" / "harness.py").write_text("# patched twice\n" + original.split("\n", 1)[1])
    stale.write_text(_one_line_patch(tree / "bench" / "harness.py", "bench/harness.py"))
    assert stale.read_text().count("-# patched twice") == 1
    with pytest.raises(SystemExit, match="stale.diff does not apply"):
        ab.patched_tree(stale, tmp_path / "c")
    rec = {"suite": "prefill", "method": "verify", "M": 32}
    runs = {"A1": [rec | {"median_us": 10.0, "host_us": 3.0}], "B1": [rec | {"median_us": 9.0, "host_us": 5.0}],
            "A2": [rec | {"median_us": 11.0, "host_us": 3.0}], "B2": [rec | {"median_us": 9.5, "host_us": 5.0}]}
    (row,) = ab.summary(runs)
    assert row["A1"] == 10.0 and row["B2"] == 9.5 and row["b_over_a"] == pytest.approx(9.25 / 10.5)
    assert {k: row[k] for k in rec} == rec


@pytest.mark.parametrize("patch", sorted((ROOT / "docs" / "patches").glob("*.diff")), ids=lambda p: p.name)
def test_the_documented_patches_apply_to_the_tree(patch, tmp_path):
    """docs/perf-notes.md names these patches as the next measurements: they must still apply."""
    _load("ab_patch").patched_tree(patch, tmp_path / "b")


def test_ab_sources_takes_kernel_patches_only_and_summarises_the_rounds(tmp_path):
    ab = _load("ab_sources")
    ab.check_patch(ROOT / "docs" / "patches" / "verify-tables-cp-async.diff")
    host = tmp_path / "host.diff"
    host.write_text(_one_line_patch(BENCH / "harness.py", "bench/harness.py"))
    with pytest.raises(SystemExit, match=r"expected changes under cuda_src/ only, got \['bench/harness.py'\]"):
        ab.check_patch(host)
    empty = tmp_path / "empty.diff"
    empty.write_text("not a diff\n")
    with pytest.raises(SystemExit, match="found no"):
        ab.check_patch(empty)
    name = {"suite": "prefill", "batch": 8, "context": 32768, "M": 32}
    records = [name | {"method": "decode_one_token", "queries_per_seq": 1, "variant": "A", "round": r,
                       "median_us": 90.0 + r} for r in range(3)]
    records += [name | {"method": "verify", "queries_per_seq": 8, "variant": v, "round": r, "median_us": t,
                        "vs_decode": t / (90.0 + r)}
                for r in range(3) for v, t in (("A", 180.0 + r), ("B", 171.0 + 2 * r))]
    rows = {(row["queries_per_seq"], row["variant"]): row for row in ab.summary(records)}
    assert rows[(1, "A")]["median_us"] == 91.0 and "vs_A" not in rows[(1, "A")]
    assert rows[(8, "A")]["median_us"] == 181.0 and rows[(8, "A")]["vs_A"] == 1.0
    assert rows[(8, "B")]["median_us"] == 173.0 and rows[(8, "B")]["vs_A"] == pytest.approx(173 / 181)
    assert rows[(8, "B")]["rounds_us"] == [171.0, 173.0, 175.0]
    assert rows[(8, "B")]["vs_decode"] == pytest.approx(173 / 91)
