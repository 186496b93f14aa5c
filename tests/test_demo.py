"""The README's main job: `million-cupy demo` runs end to end and reports sane numbers."""

import dataclasses
import json
import subprocess
import sys

import pytest

from million_cupy import demo


def test_demo_cli_cpu_path(tmp_path):
    out = tmp_path / "demo.json"
    proc = subprocess.run([sys.executable, "-m", "million_cupy.cli", "demo", "--cpu", "--steps", "3",
                           "--prompt", "120", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "tokens/s" in proc.stdout and "B/token" in proc.stdout
    result = json.loads(out.read_text())
    assert result["device"] == "cpu"
    assert result["kv_bytes_per_token"] * 4 == result["fp16_kv_bytes_per_token"]
    assert 0 < result["attention_rel_err_vs_fp16"] < 0.5  # 2 bits per value on synthetic data


@pytest.mark.gpu
def test_demo_gpu_small():
    cfg = dataclasses.replace(demo.DemoConfig.default(True), layers=2, prompt=2048, steps=4, batch=2)
    result = demo.run(cfg, gpu=True, progress=False)
    assert result["device"] == "gpu"
    assert result["decode_tokens_per_s"] > 0
    assert result["attention_rel_err_vs_fp16"] < 0.5
