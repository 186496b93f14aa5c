"""The scripts in examples/ run to completion with small arguments (as subprocesses, as a user runs them).

On a machine without a GPU they take the CPU path (or, for the PyTorch / JAX examples, print why they
skip and exit 0); on a GPU machine the same tests run them on the GPU.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"

# Tiny shapes: head dim 64, one kv head, pages of 16 tokens and a 32-token residual window so that the
# prompts already fill pages and decoding flushes more.
LLAMA_TINY = [
    "--hidden", "128", "--heads", "2", "--kv-heads", "1", "--layers", "2", "--ffn", "128", "--vocab", "64",
    "--prompt-len", "40", "--calib-len", "256", "--new-tokens", "4", "--page-size", "16", "--residual", "32",
    "--M", "16", "--kmeans-iters", "2",
]
INTEROP_TINY = ["--layers", "1", "--heads", "4", "--kv-heads", "2", "--head-dim", "64", "--M", "32",
                "--prompt-len", "80", "--steps", "2"]


def run_example(name: str, *args: str) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # Small matrices: a BLAS thread pool only adds start-up and spinning on small CI machines.
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), *args],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 0, f"{name}.py exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def test_llama_decode():
    out = run_example("llama_decode", *LLAMA_TINY)
    for label in ("PQ cache decode:", "exact fp16 decode:", "max |logit diff|:", "top-1 agreement:"):
        assert label in out, out
    rel = float(re.search(r"relative error:\s+([0-9.eE+-]+)", out).group(1))
    # PQ with 4 values per 16-dim subspace... a sanity bound, not a quality claim: a broken decode
    # (wrong tokens attended, wrong scale) gives logits as far from the exact ones as random ones (~1).
    assert rel < 0.25, out
    assert re.search(r"sequence lengths \[44, 39\]", out), out  # 40 - 5*b prompt tokens + 4 generated


def test_llama_decode_cpu_flag_and_bad_args():
    out = run_example("llama_decode", *LLAMA_TINY, "--cpu", "--batch", "1", "--new-tokens", "1")
    assert "path: CPU" in out and "n/a (one step)" in out
    proc = subprocess.run([sys.executable, str(EXAMPLES / "llama_decode.py"), "--hidden", "96", "--heads", "2"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "head dim hidden / heads must be 64, 128 or 256" in proc.stderr


def test_speculative_verify():
    """Drafts appended, attended, the rejected ones truncated: CPU, the reference path; GPU, verify_attention eager,
    then the whole step (appends and runs of every layer) captured in one CUDA graph and replayed; every step checked
    against the float64 reference, and the cache at the end against one given only the accepted tokens."""
    out = run_example("speculative_verify", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--head-dim", "64",
                      "--M", "16", "--prompt-len", "300", "--steps", "3", "--drafts", "3")
    assert "speculative_verify: all checks passed" in out and "FAIL" not in out, out
    assert "path: CPU" in out or (out.count("eager on the tensor_cores path") == 1 and out.count(
        "captured whole, replayed on the tensor_cores path") == 1 and out.count("replayed on the tensor_cores path") == 2), out
    assert "the sequences hold their prompts and accepted tokens: [308, 269, 231]" in out, out
    assert "[ok] after every truncate the cache holds what a cache given only the accepted tokens holds" in out, out


def test_onnx_runtime():
    out = run_example("onnx_runtime", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--head-dim", "64",
                      "--M", "16", "--prompt-len", "30", "--steps", "3", "--page-size", "16", "--residual", "32",
                      "--chunk", "7")
    assert "onnx_runtime: skipped" in out or "ORT session output matches the library" in out, out
    if "skipped" not in out:  # ragged prompt chunks through the prefill op: the shorter prompt is in first
        assert "prompt chunk 3: new tokens [7, 0]" in out, out


@pytest.mark.parametrize("name", ["torch_interop", "jax_interop"])
def test_framework_interop(name):
    out = run_example(name, *INTEROP_TINY)
    assert f"{name}: skipped: " in out or f"{name}: all checks passed" in out, out
    assert "FAIL" not in out, out


def test_multi_gpu_decode_says_what_it_needs():
    """Without enough GPUs the launcher exits 2 with one line naming what is missing (never a traceback)."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / "multi_gpu_decode.py"), "--gpus", "64", "--check"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "multi_gpu_decode: " in proc.stderr and "Traceback" not in proc.stderr
