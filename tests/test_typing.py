"""The package type-checks with mypy under pyproject.toml's [tool.mypy] settings (the dev extra installs mypy).

Third-party packages count as Any there, whether installed or not, so the result does not depend on the machine;
the stateful plan / run modules are checked without strict Optional handling (see pyproject.toml).
"""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_type_checks(tmp_path):
    if not (ROOT / "pyproject.toml").is_file():
        pytest.skip("not a source checkout")
    api = pytest.importorskip("mypy.api", reason="mypy is not installed (pip install -e '.[dev]')")
    report, errors, status = api.run(["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(tmp_path),
                                      "--no-error-summary", str(ROOT / "million_cupy")])
    assert status == 0, f"mypy found type errors:\n{report}{errors}"
