"""Packaging contract: cheap import, public names, version, the `million-cupy` console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

import million_cupy
from million_cupy import cli, errors

REPO = Path(__file__).resolve().parent.parent

ERRORS = {
    "MillionError",
    "PagePoolExhausted",
    "SequenceSlotsExhausted",
    "InvalidPageOperation",
    "UnsupportedConfiguration",
    "CodebookFormatError",
    "DeviceUnavailable",
}
LAZY = {
    "Codebook": "million_cupy.codebook",
    "ModelCodebooks": "million_cupy.codebook",
    "PageAllocator": "million_cupy.allocator",
    "PagedPQCache": "million_cupy.cache",
    "AppendPlan": "million_cupy.cache",
    "BatchDecodeWrapper": "million_cupy.decode",
    "DecodeStep": "million_cupy.step",
    "BatchPrefillWrapper": "million_cupy.prefill",
    "prefill_attention": "million_cupy.prefill",
    "SequenceParallelCache": "million_cupy.parallel",
    "HeadParallelCache": "million_cupy.parallel",
    "merge_states": "million_cupy.decode",
    "contiguous_pq_decode": "million_cupy.decode",
    "paged_pq_decode": "million_cupy.decode",
    "paged_exact_decode": "million_cupy.decode",
}
MODULES = {"decode", "reference", "kernels"}

# The README's two set-up commands; .ci/run must run the test command exactly.
MAIN_COMMAND = 'pip install -e ".[cuda12]" && million-cupy demo'
TEST_COMMAND = 'pip install -e ".[dev]" && python -m pytest -q'


def run_python(code: str, *, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def console_script() -> str:
    """The installed `million-cupy` script: beside this interpreter (a venv not on PATH), else on PATH."""
    beside = Path(sys.executable).parent / "million-cupy"
    found = str(beside) if beside.is_file() else shutil.which("million-cupy")
    assert found, "the `million-cupy` console script is not installed: pip install -e ."
    return found


# ------------------------------------------------------------------------------------------------
# import
# ------------------------------------------------------------------------------------------------


def test_import_does_not_import_cupy_or_numba():
    r = run_python(
        "import sys, million_cupy\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('cupy', 'cupy_backends', 'numba', 'numba_cuda'))\n"
        "assert not heavy, heavy\n"
    )
    assert r.returncode == 0, r.stderr


def test_import_and_info_work_without_cupy():
    # sys.modules[name] = None makes `import name` raise ImportError: CuPy absent.
    r = run_python(
        "import sys\n"
        "sys.modules['cupy'] = None\n"
        "import million_cupy\n"
        "from million_cupy.interop import gpu_available\n"
        "assert not gpu_available()\n"
        "from million_cupy.cli import main\n"
        "sys.exit(main(['info']))\n"
    )
    assert r.returncode == 0, r.stderr
    assert "no GPU" in r.stdout, r.stdout


def test_version_matches_installed_metadata():
    assert isinstance(million_cupy.__version__, str) and million_cupy.__version__
    try:
        installed = metadata.version("million-cupy")
    except metadata.PackageNotFoundError:
        pytest.fail("million-cupy is not installed: pip install -e .")
    assert million_cupy.__version__ == installed, "million_cupy.__version__ and pyproject.toml's version differ"


def test_public_names():
    assert set(million_cupy.__all__) == {"__version__"} | ERRORS | set(LAZY) | MODULES
    assert len(million_cupy.__all__) == len(set(million_cupy.__all__))
    assert set(million_cupy.__all__) <= set(dir(million_cupy))
    for name in ERRORS:  # imported eagerly, and the same objects as in million_cupy.errors
        assert vars(million_cupy)[name] is getattr(errors, name)
        assert issubclass(vars(million_cupy)[name], errors.MillionError)


def test_type_checkers_see_every_lazy_name_where_it_is_defined():
    """The ``if _TYPE_CHECKING:`` imports of million_cupy/__init__.py (what type checkers read) name exactly the
    lazy names, each from the module it resolves from at run time."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(million_cupy))
    (block,) = [n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "_TYPE_CHECKING"]
    seen = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.level == 1, ast.dump(node)
        for alias in node.names:
            seen[alias.asname or alias.name] = f"million_cupy.{node.module}" if node.module else None
    assert seen == {**LAZY, "decode": "million_cupy.decode", "reference": None, "kernels": None}


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        million_cupy.no_such_name  # noqa: B018
    assert not hasattr(million_cupy, "no_such_name")


@pytest.mark.parametrize("name", sorted(LAZY))
def test_lazy_name_resolves(name):
    import importlib

    value = getattr(million_cupy, name)
    assert value is getattr(importlib.import_module(LAZY[name]), name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_lazy_module_resolves(name):
    assert getattr(million_cupy, name) is sys.modules[f"million_cupy.{name}"]


@pytest.mark.parametrize(
    "first",
    [
        "import million_cupy; million_cupy.decode",  # the package attribute first
        "import million_cupy.decode",  # the submodule first
        "import million_cupy.cache",  # another submodule first (cache.py may or may not import decode)
        "from million_cupy.decode import BatchDecodeWrapper",
    ],
)
def test_decode_is_the_function_and_the_module(first):
    # million_cupy.decode is the submodule made callable: calling it calls decode.decode(),
    # whatever imported the submodule first.
    r = run_python(
        f"{first}\n"
        "import importlib, million_cupy\n"
        "m = importlib.import_module('million_cupy.decode')\n"
        "assert million_cupy.decode is m, million_cupy.decode\n"
        "assert callable(million_cupy.decode) and callable(m.decode)\n"
        "assert million_cupy.decode.BatchDecodeWrapper is million_cupy.BatchDecodeWrapper\n"
        "from million_cupy import decode\n"
        "m.decode = lambda *a, **k: ('called', a, k)\n"
        "assert decode(1, x=2) == ('called', (1,), {'x': 2})\n"
    )
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------------------------------------
# console script
# ------------------------------------------------------------------------------------------------


def test_console_script_info_runs_on_cpu():
    r = subprocess.run(
        [console_script(), "info"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "MILLION_CUPY_DISABLE_GPU": "1"},
    )
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    for row in ("million-cupy", "GPU", "numpy", "numba", "numba-cuda", "CuPy", "NVRTC", "verify kernel",
                "kernel variants"):
        assert row in r.stdout, f"{row!r} missing from `million-cupy info`:\n{r.stdout}"
    assert "no GPU" in r.stdout


def test_console_script_info_runs_as_is():
    r = subprocess.run([console_script(), "info"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stdout + r.stderr


def test_python_m_cli_help():
    r = subprocess.run([sys.executable, "-m", "million_cupy.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for command in ("info", "demo", "train-codebook", "bench"):
        assert command in r.stdout


def test_no_subcommand_prints_usage(capsys):
    assert cli.main([]) == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "setup, argv_tail, message",
    [
        (None, ["missing.npy"], "not found"),
        (np.zeros(300, np.float32), ["samples.npy"], "expected samples of shape (n, d)"),
        (np.zeros((300, 3, 4), np.float32), ["samples.npy"], "expected samples of shape (n, d)"),
        (np.array([["a", "b"]] * 300), ["samples.npy"], "real-valued"),
        (np.zeros((300, 64), np.float32), ["samples.npy", "--M", "5"], "got M = 5"),
        (np.zeros((300, 48), np.float32), ["samples.npy"], "got d = 48"),
        (np.zeros((100, 64), np.float32), ["samples.npy"], "at least 256 samples"),
        (np.zeros((300, 64), np.float32), ["samples.npy", "--iters", "-1"], "iters"),
        (np.zeros((300, 64), np.float32), ["samples.npy", "--out", "no/such/dir/cb.npz"], "does not exist"),
    ],
)
def test_train_codebook_user_mistakes_exit_2_without_traceback(tmp_path, monkeypatch, capsys, setup, argv_tail, message):
    monkeypatch.chdir(tmp_path)
    if setup is not None:
        np.save(tmp_path / "samples.npy", setup)
    argv = ["train-codebook", *argv_tail]
    if "--out" not in argv:
        argv += ["--out", "cb.npz"]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") or "\nerror: " in captured.err, captured.err
    assert message in captured.err
    assert "Traceback" not in captured.err
    assert not (tmp_path / "cb.npz").exists()


def test_train_codebook_writes_a_loadable_codebook(tmp_path, rng, capsys):
    samples = rng.standard_normal((512, 64)).astype(np.float32)
    np.save(tmp_path / "samples.npy", samples)
    out = tmp_path / "cb.npz"
    rc = cli.main(["train-codebook", str(tmp_path / "samples.npy"), "--M", "16", "--iters", "2", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert out.is_file()
    assert "relative reconstruction error" in capsys.readouterr().out
    loaded = million_cupy.Codebook.load(out)
    assert (loaded.M, loaded.d) == (16, 64)
    codes = np.asarray(loaded.encode(samples[:8]))
    assert codes.shape == (8, 16) and codes.dtype == np.uint8


# ------------------------------------------------------------------------------------------------
# README <-> CI
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (REPO / "README.md").is_file(), reason="not a source checkout")
def test_readme_commands_and_ci_agree():
    readme = (REPO / "README.md").read_text()
    assert MAIN_COMMAND in readme, "README.md lost its main command"
    assert TEST_COMMAND in readme, "README.md lost its test command"
    ci = (REPO / ".ci" / "run").read_text()
    assert TEST_COMMAND in ci, ".ci/run must run the README's test command exactly"
