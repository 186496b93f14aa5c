"""A source patch against the tree as it is, measured by any bench script in alternating rounds.

    python3 bench/ab_patch.py docs/patches/verify-wait-after-codebooks.diff --rounds 2 --out-dir /tmp/ab -- \
        bench/bench_prefill.py --only verify --queries 4 8 --M 32 64

copies the package, ``cuda_src/`` and ``bench/`` into a scratch directory, applies the patch there (``git apply``,
else ``patch -p1``), then runs the bench as it is (A) and patched (B) in turns, A B A B ..., each run a fresh
process with its own ``--out`` (``<out-dir>/<A|B><round>.json``): a drift of the card's clocks over the call then
shows in both. Last, a table of each timed record's ``median_us`` per run and B / A (the medians over rounds),
also written to ``<out-dir>/ab_summary.json``. Runs on a GPU machine; the bench script's own errors pass through.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("million_cupy", "cuda_src", "bench")
#: Record fields that are measurements or derived from them: the rest name the record.
MEASURED = {"median_us", "call_us", "p10_us", "p90_us", "host_us", "plan_us", "vs_decode", "vs_decode_graph"}


def patched_tree(patch: Path, into: Path) -> Path:
    """The tree's code and benches under ``into``, with ``patch`` applied; raises SystemExit naming a patch that
    does not apply."""
    for name in COPIED:
        shutil.copytree(ROOT / name, into / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
    for tool in (["git", "apply", str(patch)], ["patch", "-p1", "--quiet", "-i", str(patch)]):
        if shutil.which(tool[0]) is None:
            continue
        done = subprocess.run(tool, cwd=into, capture_output=True, text=True)
        if done.returncode == 0:
            return into
        raise SystemExit(f"error: {patch} does not apply to this tree ({' '.join(tool[:2])}): "
                         f"{done.stderr.strip() or done.stdout.strip()}")
    raise SystemExit("error: neither git nor patch is on PATH to apply the patch")


def run(tree: Path, bench: list[str], out: Path) -> list[dict]:
    """One run of the bench from ``tree`` (its package first on the path); its records."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]))
    script = tree / bench[0]
    subprocess.run([sys.executable, str(script), *bench[1:], "--out", str(out)], cwd=tree, env=env, check=True)
    return json.loads(out.read_text())["records"]


def key(record: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in record.items() if k not in MEASURED and not isinstance(v, (list, dict))))


def summary(runs: dict[str, list[dict]]) -> list[dict]:
    """Per timed record: its fields, ``median_us`` of every run, and B / A of the medians over rounds."""
    rows: dict[tuple, dict] = {}
    for label, records in runs.items():
        for r in records:
            if "median_us" in r:
                rows.setdefault(key(r), dict(key(r)))[label] = r["median_us"]
    for row in rows.values():
        a = [v for k, v in row.items() if k.startswith("A") and k[1:].isdigit()]
        b = [v for k, v in row.items() if k.startswith("B") and k[1:].isdigit()]
        if a and b:
            row["b_over_a"] = statistics.median(b) / statistics.median(a)
    return list(rows.values())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("usage: ab_patch.py PATCH [--rounds N] --out-dir DIR -- BENCH_SCRIPT [ARGS...]")
    cut = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("patch", type=Path, help="a unified diff against the repository root (git diff)")
    p.add_argument("--rounds", type=int, default=2, help="A B rounds (default 2)")
    p.add_argument("--out-dir", type=Path, required=True, help="where each run's JSON and the summary go")
    args = p.parse_args(argv[:cut])
    bench = argv[cut + 1:]
    if not bench:
        raise SystemExit("error: name the bench script after --, e.g. -- bench/bench_prefill.py --only verify")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="ab_patch_") as scratch:
        trees = {"A": ROOT, "B": patched_tree(args.patch.resolve(), Path(scratch))}
        for i in range(1, args.rounds + 1):
            for label, tree in trees.items():
                print(f"== {label}{i}: {'patched' if label == 'B' else 'as it is'}", flush=True)
                runs[f"{label}{i}"] = run(tree, bench, args.out_dir / f"{label}{i}.json")
    rows = summary(runs)
    (args.out_dir / "ab_summary.json").write_text(json.dumps(
        {"patch": str(args.patch), "bench": bench, "rounds": args.rounds, "rows": rows}, indent=1))
    labels = list(runs)
    print("record | " + " | ".join(labels) + " | B/A")
    for row in rows:
        name = ", ".join(f"{k}={v}" for k, v in row.items() if k not in runs and k != "b_over_a")
        cells = " | ".join(f"{row[x]:.1f}" if x in row else "-" for x in labels)
        print(f"{name} | {cells} | {row.get('b_over_a', float('nan')):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
