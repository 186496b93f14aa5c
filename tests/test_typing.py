"""Typing: the package, the examples and the benchmarks type-check with mypy under pyproject.toml's [tool.mypy]
settings (the dev extra installs mypy), and a user's type checker sees the public API's signatures (not Any) through
the lazy ``million_cupy`` namespace, ``million_cupy.decode(...)`` included. The benchmarks and much of the package
run only on a GPU, so this is where a wrong name in them shows on a CPU machine.

Third-party packages count as Any there, whether installed or not, so the result does not depend on the machine;
the stateful plan / run modules are checked without strict Optional handling (see pyproject.toml).
"""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _mypy(tmp_path, *paths: str) -> tuple[int, str]:
    if not (ROOT / "pyproject.toml").is_file():
        pytest.skip("not a source checkout")
    api = pytest.importorskip("mypy.api", reason="mypy is not installed (pip install -e '.[dev]')")
    report, errors, status = api.run(["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir",
                                      str(tmp_path / "cache"), "--no-error-summary", *paths])
    return status, report + errors


def test_the_package_the_examples_and_the_benchmarks_type_check(tmp_path):
    status, report = _mypy(tmp_path, *(str(ROOT / d) for d in ("million_cupy", "examples", "bench")))
    assert status == 0, f"mypy found type errors:\n{report}"


def test_a_user_sees_the_public_signatures(tmp_path):
    user = tmp_path / "user.py"
    user.write_text(
        "import numpy as np\n"
        "import million_cupy as mc\n"
        "\n"
        "def step(cache: mc.PagedPQCache, q: np.ndarray) -> None:\n"
        "    mc.decode(cache, 0, [0], q)\n"
        "    mc.BatchDecodeWrapper(cache, num_heads=8).plan(np.arange(2))\n"
        "    mc.decode(cache, 'layer 0', [0], q)\n"
    )
    status, report = _mypy(tmp_path, str(user))
    errors = [line for line in report.splitlines() if ": error:" in line]
    assert status == 1 and len(errors) == 1, report  # only the str layer; mc.decode(...) itself is a call
    assert 'user.py:7: error: Argument 2 to "decode" has incompatible type "str"; expected "int"' in errors[0], report
