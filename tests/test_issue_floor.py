"""bench/issue_floor.py: the main-loop finder on a synthetic listing, and the real kernel's floor (CPU only:
NVRTC and nvdisasm, both installed by the dev extra)."""

import importlib.util
import os
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _floor_module():
    spec = importlib.util.spec_from_file_location("_bench_issue_floor", BENCH / "issue_floor.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sass(body: list[str], label: str = ".L_x_1") -> str:
    lines, addr = [], 0
    for op in body:
        if op == "LABEL":
            lines.append(f"{label}:")
            continue
        lines.append(f"        /*{addr:04x}*/                   {op} ;")
        addr += 16
    return "\n".join(lines)


def test_main_loop_is_the_innermost_loop_with_the_packed_fmas():
    mod = _floor_module()
    outer = ".L_x_0"
    text = "\n".join([
        f"{outer}:",
        _sass(["IADD3 R1, R1, 1", "LABEL", "HFMA2 R2, R3.H0_H0, R4, R2", "HFMA2.MMA R5, R5, 1, 1, R6",
               "NOP", "@P0 LDS R7, [R8+UR4]", "@!P1 BRA `(.L_x_1)"]),
        "        /*0100*/                   FADD R9, R9, R10 ;",
        f"        /*0110*/                   BRA `({outer}) ;",
    ])
    assert mod.main_loop(text, 2) == ["HFMA2", "HFMA2", "LDS", "BRA"]  # NOP dropped, predicates skipped
    with pytest.raises(RuntimeError, match="no loop with >= 3 HFMA2"):
        mod.main_loop(text, 3)


def test_floor_of_the_real_kernel():
    mod = _floor_module()
    try:
        mod.nvdisasm()
    except FileNotFoundError:
        if os.environ.get("MILLION_CUPY_REQUIRE_NVRTC"):
            raise
        pytest.skip("nvdisasm not installed (pip install nvidia-cuda-nvdisasm)")
    from million_cupy import kernels

    try:
        kernels.nvrtc_version()
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("MILLION_CUPY_REQUIRE_NVRTC"):
            raise
        pytest.skip(f"NVRTC unavailable: {exc}")
    recs = mod.floors(132, 1980.0, "sm_90", {("torch_sdpa", None, 8, 32768): 246.0, ("paged_pq", 64, 8, 32768): 116.0})
    by = {(r["batch"], r["context"], r["M"]): r for r in recs}
    m64 = by[(8, 32768, 64)]
    # P·V alone is 256 packed FMAs per tile (32 tokens x 128 dims x 4 heads / 64), so the loop is longer.
    assert m64["loop_mix"]["HFMA2"] >= 256 and 600 < m64["loop_instructions"] < 3000
    assert m64["tiles_per_warp"] == 32  # 8 x 8 units of 32 704 paged tokens in 128 splits of 512 tiles
    assert m64["floor_us"] == pytest.approx(4 * 32 * m64["loop_instructions"] / 1980.0)
    assert m64["target_us"] == pytest.approx(82.0) and m64["ipc_to_meet_target"] == pytest.approx(
        4 * m64["floor_us"] / 82.0)
    assert "target_us" not in by[(1, 131072, 64)]  # no measurement given for it
    assert by[(1, 131072, 64)]["tiles_per_warp"] == 16
