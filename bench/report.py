"""Regenerate bench/results/REPORT.md and the plots from every bench/results/*.json (harness schema).

    python bench/report.py [--results DIR] [--out DIR]
    million-cupy bench report

Reads every ``*.json`` with a ``records`` list (bench/harness.py's schema), writes ``REPORT.md`` with a
markdown table per suite (the source file, GPU and date above each), and PNG plots (matplotlib, Agg):

* ``decode_latency.png``: GPU time per call (``median_us``) against context per method, one panel per
  batch size, log-log, from suite "decode" records;
* ``memory_per_token.png``: KV bytes per token, fp16 against PQ M = 32 / 64, from "memory" records
  (method ``fp16`` / ``pq_codes``), each bar computed from the geometry where no record gives it (the
  title says which); plus reserved bytes per stored token per trace where the trace records exist;
* ``pool_utilization.png``: paged vs contiguous utilization per trace, from "memory" records;
* ``e2e_throughput.png``: tokens/s per method, from suite "e2e" records (bench/bench_e2e.py);
* ``decode_step.png``: the 32-layer decode step's p50 per method, from suite "step" records (bench/bench_step.py);
* ``several_tokens.png``: speculative verification over the one-token decode against drafts per sequence, and a
  long chunk against SDPA, with issue 16's targets, from suite "prefill" records (bench/bench_prefill.py).

The accuracy plot (``accuracy.png``, written by bench/accuracy.py) is linked when present. A suite
without records is skipped with a note in the report; nothing here needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# Geometry of the memory suite's layer shape (bench/bench_memory.py), used where records lack a value.
DEFAULT_SHAPE = dict(nh_k=8, d=128)
SKIP_COLS = {"suite"}


def load(results: Path) -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(results.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"report: skipping {path.name}: {exc}")
            continue
        if isinstance(doc, dict) and isinstance(doc.get("records"), list):
            docs.append((path.name, doc))
        else:
            print(f"report: skipping {path.name}: no 'records' list (not a harness results file)")
    return docs


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if v == 0 or not math.isfinite(v):
            return str(v)
        if abs(v) >= 1e4:
            return f"{v:,.0f}"
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 1e4 else str(v)
    return str(v).replace("|", "\\|")


def md_table(records: list[dict]) -> str:
    cols: list[str] = []
    for r in records:
        for k, v in r.items():
            if k not in cols and k not in SKIP_COLS and not isinstance(v, (list, dict)):
                cols.append(k)
    # Drop columns empty in every record.
    cols = [c for c in cols if any(r.get(c) is not None for r in records)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in records]
    return "\n".join(lines)


def by_suite(docs) -> dict[str, list[tuple[str, dict, list[dict]]]]:
    out: dict[str, list] = defaultdict(list)
    for name, doc in docs:
        groups: dict[str, list] = defaultdict(list)
        for r in doc["records"]:
            if isinstance(r, dict):
                groups[str(r.get("suite", "?"))].append(r)
        for suite, recs in groups.items():
            out[suite].append((name, doc, recs))
    return out


def _records(suites, suite) -> list[tuple[str, dict]]:
    return [(name, r) for name, _, recs in suites.get(suite, []) for r in recs]


# ------------------------------------------------------------------------------------------------
# plots: each returns (png name, note) or (None, reason skipped)


def plot_decode(suites, out: Path):
    recs = [(n, r) for n, r in _records(suites, "decode") if r.get("median_us") and r.get("context")]
    # One curve per method: the widest sweep (a "grid" file when there is one) at 8 kv heads.
    grid = [(n, r) for n, r in recs if "grid" in Path(n).stem and r.get("nh_k", 8) == 8]
    recs = grid or [(n, r) for n, r in recs if r.get("nh_k", 8) == 8]
    if not recs:
        return None, "no suite 'decode' records with median_us: decode_latency.png skipped"
    files = {n for n, _ in recs}
    batches = sorted({r.get("batch", 1) for _, r in recs})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.6 * len(batches), 4.2), squeeze=False)
    series: dict[str, list] = defaultdict(list)
    for n, r in recs:
        label = r["method"] + (f" M={r['M']}" if r.get("M") else "") + (f" [{Path(n).stem}]" if len(files) > 1 else "")
        series[label].append(r)
    colors = {lab: f"C{i}" for i, lab in enumerate(sorted(series))}
    for ax, b in zip(axes[0], batches):
        for lab in sorted(series):
            pts = sorted((r["context"], r["median_us"]) for r in series[lab] if r.get("batch", 1) == b)
            if pts:
                ax.plot(*zip(*pts), marker="o", color=colors[lab], label=lab)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"batch {b}")
        ax.set_xlabel("context (tokens)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("GPU time per call (µs)")
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=8)
    fig.suptitle("Decode attention, one layer (nh 32, nh_k 8, d 128): GPU time vs context")
    fig.tight_layout(rect=(0, 0.08 + 0.04 * math.ceil(len(labels) / 3), 1, 1))
    fig.savefig(out / "decode_latency.png", dpi=120)
    plt.close(fig)
    return "decode_latency.png", "GPU time per call (median_us) vs context, one panel per batch size"


def _grouped_bars(ax, n_groups: int, series: list, value_format: str | None = None) -> None:
    """One bar per (label, values) series in each of ``n_groups`` groups, side by side around the group's tick."""
    w = 0.8 / len(series)
    for j, (label, ys) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * w for i in range(n_groups)]
        ax.bar(xs, ys, w, label=label, color=f"C{j}")
        if value_format:
            for x, y in zip(xs, ys):
                ax.text(x, y, value_format.format(y), ha="center", va="bottom", fontsize=8)


def plot_memory(suites, out: Path):
    docs = suites.get("memory", [])
    recs = [r for _, r in _records(suites, "memory")]
    shape = dict(DEFAULT_SHAPE)
    rec_M = None
    for _, doc, _ in docs:
        shape.update({k: v for k, v in (doc.get("shapes") or {}).items() if k in ("nh_k", "d", "M")})
    rec_M = shape.pop("M", None)
    nh_k, d = shape["nh_k"], shape["d"]

    def from_records(method):
        vals = [r["value"] for r in recs if r.get("method") == method and r.get("metric") == "bytes_per_token"
                and r.get("trace", "any") == "any"]
        return float(vals[0]) if vals else None

    bars, computed = [], []
    fp16 = from_records("fp16")
    if fp16 is None:
        fp16 = 2 * nh_k * d * 2  # K and V, 2 bytes per value
        computed.append("fp16")
    bars.append(("fp16", fp16))
    for M in (64, 32):
        v = from_records("pq_codes") if rec_M == M else None
        if v is None:
            v = 2 * nh_k * M  # K and V codes, one byte per subspace (C = 256)
            computed.append(f"PQ M={M}")
        bars.append((f"PQ M={M}", v))
    traces = sorted({r["trace"] for r in recs if r.get("metric") == "bytes_per_token" and r.get("trace") not in (None, "any")})
    fig, axes = plt.subplots(1, 2 if traces else 1, figsize=(11 if traces else 5.5, 4.2), squeeze=False)
    ax = axes[0][0]
    names, vals = zip(*bars)
    ax.bar(names, vals, color=["C3", "C0", "C2"])
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:,.0f} B\n({fp16 / v:.0f}x)" if i else f"{v:,.0f} B", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("bytes per token per layer (K + V)")
    ax.set_ylim(0, max(vals) * 1.25)
    src = ("all from memory records" if not computed else
           ("computed from the geometry (no memory records)" if len(computed) == len(bars) else
            f"{', '.join(computed)} computed from the geometry"))
    ax.set_title(f"KV storage per token, nh_k {nh_k}, d {d}\n{src}", fontsize=9)
    if traces:
        ax = axes[0][1]
        methods = ["paged_pq", "contiguous_pq", "contiguous_fp16"]
        _grouped_bars(ax, len(traces), [(m, [next((r["value"] for r in recs if r.get("trace") == t
                                                  and r.get("method") == m and r.get("metric") == "bytes_per_token"),
                                                 0.0) for t in traces]) for m in methods])
        ax.set_xticks(range(len(traces)), traces)
        ax.set_yscale("log")
        ax.set_ylabel("reserved bytes per stored token")
        ax.set_title("reserved bytes per stored token, per trace (memory records)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "memory_per_token.png", dpi=120)
    plt.close(fig)
    note = "bytes per token, fp16 vs PQ M=64 / M=32; " + src
    return "memory_per_token.png", note


def plot_pool(suites, out: Path):
    recs = [r for _, r in _records(suites, "memory") if r.get("metric") == "utilization" and r.get("trace")]
    if not recs:
        return None, "no memory 'utilization' records: pool_utilization.png skipped"
    traces = sorted({r["trace"] for r in recs})
    methods = [m for m in ("paged_pq", "contiguous_pq", "contiguous_fp16") if any(r["method"] == m for r in recs)]
    methods += sorted({r["method"] for r in recs} - set(methods))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    _grouped_bars(ax, len(traces), [(m, [next((r["value"] for r in recs if r["trace"] == t and r["method"] == m),
                                               0.0) * 100 for t in traces]) for m in methods], value_format="{:.1f}%")
    ax.set_xticks(range(len(traces)), traces)
    ax.set_ylim(0, 112)
    ax.set_ylabel("utilization (%): bytes stored / bytes reserved")
    ax.set_title("Pool utilization: paged vs contiguous (max-length reservation)", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "pool_utilization.png", dpi=120)
    plt.close(fig)
    return "pool_utilization.png", "utilization per trace, paged vs contiguous"


def plot_e2e(suites, out: Path):
    recs = [(n, r) for n, r in _records(suites, "e2e") if r.get("tokens_per_s")]
    if not recs:
        return None, "no suite 'e2e' records: e2e_throughput.png skipped (run `million-cupy bench e2e`)"
    files = {n for n, _ in recs}
    keys = sorted({(r.get("batch", 1), r.get("context", 0)) for _, r in recs})
    methods = sorted({r["method"] + (f" [{Path(n).stem}]" if len(files) > 1 else "") for n, r in recs})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(keys)), 4.2))
    _grouped_bars(ax, len(keys), [(m, [next((r["tokens_per_s"] for n, r in recs
                                             if r["method"] + (f" [{Path(n).stem}]" if len(files) > 1 else "") == m
                                             and (r.get("batch", 1), r.get("context", 0)) == k), 0.0) for k in keys])
                                  for m in methods])
    ax.set_xticks(range(len(keys)), [f"{b} x {c:,}" for b, c in keys])
    ax.set_xlabel("batch x context")
    ax.set_ylabel("tokens / s")
    ax.set_title("End-to-end decode throughput (Llama-shaped model, random weights)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "e2e_throughput.png", dpi=120)
    plt.close(fig)
    return "e2e_throughput.png", "tokens/s per method and batch x context"


def plot_step(suites, out: Path):
    """The 32-layer decode step: p50 step time per method and batch x context (bench/bench_step.py), from the
    latest full run (the file with the most shapes and M values, newest first; probes of a few shapes or one M are
    other files, and a run of a design that was not kept names its successor in ``superseded_by``)."""
    kept = (run for run in suites.get("step", []) if not run[1].get("superseded_by"))
    runs = sorted(kept, key=lambda run: (len({(r.get("batch"), r.get("context"), r.get("M")) for r in run[2]}),
                                         str(run[1].get("date", ""))), reverse=True)
    recs = [(runs[0][0], r) for r in runs[0][2] if r.get("step_p50_us") and r.get("layers", 0) > 1] if runs else []
    if not recs:
        return None, "no suite 'step' records: decode_step.png skipped (run `million-cupy bench step`)"
    keys = sorted({(r["batch"], r["context"]) for _, r in recs})
    label = lambda r: r["method"] + (f" M={r['M']}" if r.get("M") else "")  # noqa: E731
    methods = sorted({label(r) for _, r in recs})
    fig, ax = plt.subplots(figsize=(max(7, 1.8 * len(keys)), 4.4))
    _grouped_bars(ax, len(keys), [(m, [next((r["step_p50_us"] / 1e3 for _, r in recs
                                             if label(r) == m and (r["batch"], r["context"]) == k), 0.0) for k in keys])
                                  for m in methods])
    ax.set_xticks(range(len(keys)), [f"{b} x {c:,}" for b, c in keys])
    ax.set_xlabel("batch x context")
    ax.set_ylabel("step time, p50 (ms)")
    ax.set_yscale("log")
    ax.set_title("32-layer decode step (append + attention), synchronised once per step", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "decode_step.png", dpi=120)
    plt.close(fig)
    return "decode_step.png", "p50 of 256 steps per method (graph-replayed and eager) and batch x context"


#: Issue 16's targets for speculative verification at 8 x 32K: time over the one-token decode, by drafts per sequence.
VERIFY_TARGETS = {4: 1.5, 8: 2.0}
#: Its target for a 2K-token chunk over a 32K-token history: time over PyTorch SDPA (flash, fp16).
CHUNK_TARGET = 1.3


def _newest(runs, score):
    """The run (name, doc, records) with the highest ``(score(records), date)``, or None."""
    runs = [run for run in runs if score(run[2])]
    return max(runs, key=lambda run: (score(run[2]), str(run[1].get("date", "")))) if runs else None


def plot_prefill(suites, out: Path):
    """Several new tokens per sequence (bench/bench_prefill.py): verification time over the one-token decode
    against drafts per sequence, per backend and M, from the newest run with at least four draft counts (fewer
    only where no run has four); and a chunk over a long history against SDPA, from the newest run that has
    chunk records with an SDPA time. The issue's targets are drawn as red marks."""
    runs = suites.get("prefill", [])

    def verify_counts(recs):
        return min(4, len({r.get("queries_per_seq") for r in recs if r.get("method") == "verify"
                           and r.get("backend") in (None, "auto") and r.get("median_us")}))

    verify_run = _newest(runs, verify_counts)
    chunk_run = _newest(runs, lambda recs: any(r.get("method") == "chunk" and r.get("vs_sdpa")
                                               and r.get("backend") in (None, "auto") for r in recs))
    if verify_run is None and chunk_run is None:
        return None, "no suite 'prefill' records: several_tokens.png skipped (run `million-cupy bench prefill`)"
    Ms = sorted({r["M"] for r in verify_run[2] if r.get("method") == "verify"}, reverse=True) if verify_run else []
    panels = len(Ms) + (chunk_run is not None)
    fig, axes = plt.subplots(1, panels, figsize=(max(5.5, 4.6 * panels), 4.2), squeeze=False)
    notes = []
    for ax, M in zip(axes[0], Ms):
        recs = [r for r in verify_run[2] if r.get("M") == M]
        one = next((r["median_us"] for r in recs if r.get("method") == "decode_one_token"), None)
        if not one:
            ax.set_title(f"M = {M}: no one-token decode in {verify_run[0]}", fontsize=9)
            continue
        backends = sorted({r.get("backend") or "auto" for r in recs if r.get("method") == "verify"},
                          key=lambda b: (b != "auto", b))
        for i, backend in enumerate(backends):
            pts = sorted((r["queries_per_seq"], r["median_us"] / one) for r in recs if r.get("method") == "verify"
                         and (r.get("backend") or "auto") == backend)
            ax.plot(*zip(*pts), marker="o", color=f"C{i}", lw=2.2 if backend == "auto" else 1.0, label=backend)
        for q, target in VERIFY_TARGETS.items():
            ax.plot([q], [target], marker="_", markersize=22, mew=2.5, color="red",
                    label="target" if q == min(VERIFY_TARGETS) else None)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ticks = [t for t in (1, 1.5, 2, 3, 4, 8, 16, 32) if t <= 1.2 * ax.get_ylim()[1]]
        ax.set_yticks(ticks, [f"{t:g}x" for t in ticks])
        ax.set_xlabel("drafts per sequence (new tokens)")
        ax.set_ylabel("time / one-token decode")
        b, c = recs[0].get("batch"), recs[0].get("context")
        ax.set_title(f"verification, M = {M}, {b} x {c:,}\none-token decode {one:.0f} µs", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if verify_run:
        notes.append(f"verification from `{verify_run[0]}`")
    if chunk_run is not None:
        ax = axes[0][-1]
        recs = sorted((r for r in chunk_run[2] if r.get("method") == "chunk" and r.get("vs_sdpa")
                       and r.get("backend") in (None, "auto")), key=lambda r: (r.get("M", 0), r.get("batch", 1)))
        labels = [f"batch {r.get('batch', 1)}\nM = {r.get('M')}" for r in recs]
        ax.bar(range(len(recs)), [r["vs_sdpa"] for r in recs], color="C0")
        for i, r in enumerate(recs):
            ax.text(i, r["vs_sdpa"], f"{r['vs_sdpa']:.2f}x", ha="center", va="bottom", fontsize=8)
        ax.axhline(CHUNK_TARGET, color="red", ls="--", lw=1.2, label=f"target {CHUNK_TARGET}x")
        ax.set_xticks(range(len(recs)), labels, fontsize=8)
        ax.set_ylim(0, 1.2 * max(CHUNK_TARGET, *(r["vs_sdpa"] for r in recs)))
        ax.set_ylabel("time / PyTorch SDPA (flash, fp16)")
        r0 = recs[0]
        ax.set_title(f"a {r0.get('queries_per_seq', 0):,}-token chunk over {r0.get('context', 0):,} tokens "
                     f"({r0.get('path', '?')} path)", fontsize=9)
        ax.legend(fontsize=7)
        notes.append(f"chunks from `{chunk_run[0]}`")
    fig.suptitle("Several new tokens per sequence over the PQ cache (nh 32, nh_k 8, d 128)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "several_tokens.png", dpi=120)
    plt.close(fig)
    return "several_tokens.png", "; ".join(notes) + "; red marks: the issue's targets"


# ------------------------------------------------------------------------------------------------

KNOWN_SUITES = ("decode", "million", "step", "e2e", "memory", "allocator", "encode", "train", "accuracy")


def build_report(results: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    docs = load(results)
    suites = by_suite(docs)
    lines = ["# Benchmark report", "",
             f"Generated by `bench/report.py` from {len(docs)} results file(s) in `{results.name}/`: "
             + (", ".join(f"`{n}`" for n, _ in docs) or "none") + ".", ""]
    lines += ["## Plots", ""]
    for fn in (plot_decode, plot_step, plot_prefill, plot_memory, plot_pool, plot_e2e):
        try:
            png, note = fn(suites, out)
        except Exception as exc:  # noqa: BLE001 - one bad plot must not lose the report
            png, note = None, f"{fn.__name__} failed: {type(exc).__name__}: {exc}"
        lines.append(f"![{png}]({png})" + "\n\n" + f"*{note}*" if png else f"- skipped: {note}")
        lines.append("")
    if (results / "accuracy.png").is_file() and not (out / "accuracy.png").is_file():
        shutil.copyfile(results / "accuracy.png", out / "accuracy.png")
    if (out / "accuracy.png").is_file():
        lines += ["![accuracy.png](accuracy.png)", "", "*attention error vs bits per value (bench/accuracy.py)*", ""]
    else:
        lines += ["- skipped: no accuracy.png (run `million-cupy bench accuracy`)", ""]

    lines += ["## Tables", ""]
    order = [s for s in KNOWN_SUITES if s in suites] + sorted(set(suites) - set(KNOWN_SUITES))
    for suite in order:
        lines += [f"### {suite}", ""]
        for name, doc, recs in suites[suite]:
            lines += [f"`{name}`: {doc.get('gpu', '?')}, {doc.get('date', '?')}"
                      + (f", `{doc['command']}`" if doc.get("command") else ""), "", md_table(recs), ""]
    missing = [s for s in KNOWN_SUITES if s not in suites]
    if missing:
        lines += ["### Missing suites", "",
                  "No records for: " + ", ".join(f"`{s}`" for s in missing) + " (skipped).", ""]
    path = out / "REPORT.md"
    path.write_text("\n".join(lines))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of *.json results")
    p.add_argument("--out", type=Path, help="where REPORT.md and the PNGs go (default: --results)")
    args = p.parse_args(argv)
    path = build_report(args.results, args.out or args.results)
    print(f"wrote {path} and its plots")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
