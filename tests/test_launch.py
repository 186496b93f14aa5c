"""Programmatic dependent launch (kernels.BoundLaunch; on by default on sm_90+, MILLION_CUPY_PDL=0 off), what can be checked without a GPU.

A kernel launched with programmatic stream serialization may start while the previous kernel of its stream is
still running, so every kernel in ``cuda_src/`` must open with ``wait_for_previous_grid()`` and touch no memory
before it: checked in the sources, and in the sm_90 machine code (the wait, ACQBULK, before the first global
memory instruction of every kernel; one variant per source, built offline with NVRTC). The launch structures
must have cuda.h's layout, and the switch is on unless the environment turns it off. The launches themselves
are checked on the GPU (tests/test_step_gpu.py, test_programmatic_launches_give_the_same_steps_bit_for_bit).
"""

from __future__ import annotations

import ctypes
import re
import subprocess
import sys
from pathlib import Path

import pytest

from million_cupy import kernels
from million_cupy.errors import DeviceUnavailable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

# The first global, generic or local memory instruction of a kernel (shared-memory and constant loads are not
# the previous grid's data).
_MEMORY = re.compile(r"\b(LDG|STG|LD|ST|ATOMG|ATOM|RED|LDGSTS|UBLKCP|UTMALDG)\b")


def _kernel_bodies(text: str) -> list[tuple[str, str]]:
    """(name, body) of every ``__global__`` function in a CUDA source."""
    out = []
    for m in re.finditer(r"__global__", text):
        depth, i, seen = 0, m.end(), False
        while True:  # the body opens at the first "{" after the balanced parameter list
            c = text[i]
            if c == "(":
                depth, seen = depth + 1, True
            elif c == ")":
                depth -= 1
            elif c == "{" and seen and depth == 0:
                break
            i += 1
        head = text[m.end():i]
        name = re.findall(r"(\w+)\s*\(", head)
        out.append((name[-1] if name else "?", text[i + 1:i + 400]))
    return out


def test_every_kernel_opens_by_waiting_for_the_previous_grid():
    sources = sorted(kernels.source_dir().glob("*.cu"))
    assert sources
    seen = 0
    for path in sources:
        for name, body in _kernel_bodies(path.read_text()):
            first = next(line.strip() for line in body.splitlines() if line.strip())
            assert first == "wait_for_previous_grid();", (
                f"{path.name}: kernel {name} must open with wait_for_previous_grid() (a programmatic launch may "
                f"start it while the previous kernel runs), got {first!r}")
            seen += 1
    assert seen >= 13


def test_sm90_machine_code_waits_before_any_global_memory_access():
    try:
        kernels.nvrtc_version()
    except DeviceUnavailable as exc:
        pytest.skip(f"NVRTC unavailable: {exc}")
    from issue_floor import nvdisasm  # noqa: PLC0415 - bench/, the same finder

    try:
        tool = nvdisasm()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    checked = 0
    for source, variants in kernels.supported_variants().items():
        build = kernels.nvrtc_compile_offline(source, variants[:1], "sm_90")
        cubin = Path(pytest.importorskip("tempfile").mkdtemp()) / "k.cubin"
        cubin.write_bytes(build.cubin)
        sass = subprocess.run([tool, "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
        for function in re.split(r"\n\s*\.section\s+\.text\.", sass)[1:]:
            name = function.split(",", 1)[0]
            ops = [m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", function)]
            wait = next((i for i, op in enumerate(ops) if op == "ACQBULK"), None)
            first_memory = next((i for i, op in enumerate(ops) if _MEMORY.match(op.split(".")[0])), len(ops))
            assert wait is not None and wait < first_memory, (
                f"{source}: {name}: expected ACQBULK (griddepcontrol.wait) before the first global memory "
                f"instruction, got {ops[:max(first_memory, 8) + 1]}")
            assert "PREEXIT" in ops, f"{source}: {name}: expected PREEXIT (griddepcontrol.launch_dependents)"
            checked += 1
    assert checked >= 5


def test_launch_structures_have_cuda_h_layout():
    attribute, config = kernels._LaunchAttribute, kernels._LaunchConfig
    assert ctypes.sizeof(attribute) == 72 and attribute.value.offset == 8  # id, pad to 8, a 64-byte union
    assert ctypes.sizeof(config) == 56
    assert (config.hStream.offset, config.attrs.offset, config.numAttrs.offset) == (32, 40, 48)


@pytest.mark.parametrize("value, on", [(None, True), ("1", True), ("0", False)])
def test_programmatic_launches_are_on_unless_turned_off(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv(kernels.PDL_ENV, raising=False)
    else:
        monkeypatch.setenv(kernels.PDL_ENV, value)
    assert kernels.programmatic_launches_requested() is on
    if not on:  # decided without looking for a device
        assert kernels.programmatic_launches() is False


@pytest.mark.parametrize("value", ["", "yes", "true", "2"])
def test_an_unknown_pdl_switch_is_refused_with_what_it_takes(monkeypatch, value):
    monkeypatch.setenv(kernels.PDL_ENV, value)
    with pytest.raises(ValueError, match=f"MILLION_CUPY_PDL: expected 0 .* or 1 .*, got {value!r}"):
        kernels.programmatic_launches()
