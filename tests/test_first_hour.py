"""A new user's first hour on a machine without a GPU: documented errors instead of raw CUDA tracebacks,
messages that name what was expected and what came, one input policy (dtypes, non-finite values), and
the public API's signatures and docstrings.

The "no driver" tests run where CuPy is installed but no CUDA device is usable (CI's CPU machine); on a GPU
machine they skip.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import million_cupy as mc
from million_cupy import cli
from million_cupy.errors import DeviceUnavailable, PagePoolExhausted, UnsupportedConfiguration
from million_cupy.interop import gpu_available

no_gpu = pytest.mark.skipif(gpu_available(), reason="checks the refusal on a machine without a usable GPU")


def _books(rng, layers=1, M=16, d=64):
    def one():
        return mc.Codebook(rng.standard_normal((M, 256, d // M)).astype(np.float32))

    return mc.ModelCodebooks([one() for _ in range(layers)], [one() for _ in range(layers)])


def _cache(rng, **kw):
    kw.setdefault("max_pages", 64)
    return mc.PagedPQCache(1, 2, 64, _books(rng), page_size=16, residual=32, max_seqs=4, max_seq_len=512,
                           device="cpu", **kw)


# ------------------------------------------------------------------------------ no GPU: clear errors


@no_gpu
def test_gpu_entry_points_raise_device_unavailable_naming_the_cpu_alternative(rng, tmp_path):
    book = mc.Codebook(rng.standard_normal((16, 256, 4)).astype(np.float32))
    book.save(tmp_path / "cb.npz")
    with pytest.raises(DeviceUnavailable, match="gpu=False"):
        mc.Codebook.load(tmp_path / "cb.npz", gpu=True)
    with pytest.raises(DeviceUnavailable, match="gpu=False"):
        _books(rng).to_gpu()
    q = np.zeros((1, 4, 64), np.float16)
    calls = {
        "contiguous_pq_decode": lambda: mc.contiguous_pq_decode(q, None, None, None, None, None),
        "paged_pq_decode": lambda: mc.paged_pq_decode(q, None, None, None, None, None, None),
        "paged_exact_decode": lambda: mc.paged_exact_decode(q, None, None, None, None, None),
    }
    for name, call in calls.items():
        with pytest.raises(DeviceUnavailable, match=f"{name} needs a CUDA GPU.*reference.decode_attention"):
            call()
    with pytest.raises(DeviceUnavailable, match="device='cuda'"):
        mc.PagedPQCache(1, 2, 64, _books(rng), device="cuda")


@no_gpu
@pytest.mark.parametrize("suite", ["decode", "million", "codebook", "step", "quality", "train-lm"])
def test_gpu_bench_suites_print_one_error_line_and_exit_2(suite, capsys):
    assert cli.main(["bench", suite]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert "needs a CUDA GPU" in err


def test_the_step_and_the_wrapper_refuse_a_cpu_cache_naming_decode(rng):
    cache = _cache(rng)
    with pytest.raises(UnsupportedConfiguration, match="million_cupy.decode"):
        mc.DecodeStep(cache, 4)
    with pytest.raises(UnsupportedConfiguration, match="million_cupy.decode"):
        mc.BatchDecodeWrapper(cache, 4)


# ------------------------------------------------------------------------------ messages


def test_decode_messages_name_the_argument_and_the_sequence(rng):
    cache = _cache(rng)
    a, empty = cache.add_sequence(), cache.add_sequence()
    x = rng.standard_normal((10, 2, 64)).astype(np.float32)
    cache.append(0, [a], x, x, lengths=[10])
    q = np.zeros((1, 4, 64), np.float32)
    with pytest.raises(ValueError, match=r"^q: expected shape \(1, num_heads, 64\) with num_heads a multiple"):
        mc.decode(cache, 0, [a], np.zeros((1, 3, 64), np.float32))
    with pytest.raises(ValueError, match=rf"^decode: sequences \[{empty}\] hold no tokens"):
        mc.decode(cache, 0, [empty], q)
    with pytest.raises(TypeError, match=r"^q: expected dtype in .*got int32"):
        mc.decode(cache, 0, [a], q.astype(np.int32))
    cache.free(a)
    with pytest.raises(ValueError, match=rf"^decode: sequence ids \[{a}\] are not live"):
        mc.decode(cache, 0, [a], q)


def test_pool_exhaustion_names_the_operation_and_the_sequences(rng):
    cache = _cache(rng, max_pages=2)
    a = cache.add_sequence()
    x = np.zeros((100, 2, 64), np.float32)
    with pytest.raises(PagePoolExhausted, match=rf"^append: sequences \[{a}\] need \[7\] more pages.*nothing changed"):
        cache.append(0, [a], x, x, lengths=[100])
    with pytest.raises(PagePoolExhausted, match=rf"^reserve: sequences \[{a}\] need"):
        cache.reserve([a], 100)
    assert cache.seq_len(a) == 0 and cache.stats()["used"] == 0


def test_train_codebook_on_a_text_file_says_it_is_not_npy(tmp_path, capsys):
    path = tmp_path / "samples.npy"
    path.write_text("1.0 2.0 3.0\n" * 300)
    assert cli.main(["train-codebook", str(path), "--out", str(tmp_path / "cb.npz")]) == 2
    err = capsys.readouterr().err
    assert "not start like one" in err and "numpy.save" in err and "allow_pickle" not in err


# ------------------------------------------------------------------------------ one input policy


def test_non_finite_samples_are_refused_by_training(rng, tmp_path, capsys):
    x = rng.standard_normal((512, 64)).astype(np.float32)
    x[[3, 7]] = np.nan
    with pytest.raises(ValueError, match=r"samples: expected finite values, got NaN or inf in 2 of 512 rows \(first: \[3, 7\]\)"):
        mc.Codebook.train(x, M=16, iters=1)
    np.save(tmp_path / "nan.npy", np.full((300, 64), np.nan, np.float32))
    assert cli.main(["train-codebook", str(tmp_path / "nan.npy"), "--out", str(tmp_path / "cb.npz")]) == 2
    assert "NaN or inf" in capsys.readouterr().err and not (tmp_path / "cb.npz").exists()


def test_bulk_appends_refuse_non_finite_tokens_and_one_token_appends_are_flagged(rng):
    cache = _cache(rng)
    a, b = cache.add_sequence(), cache.add_sequence()
    x = rng.standard_normal((40, 2, 64)).astype(np.float32)
    bad = x.copy()
    bad[5, 1, 3] = np.inf
    with pytest.raises(ValueError, match=r"append: k holds NaN or inf in 1 of 40 tokens \(first rows: \[5\]\)"):
        cache.append(0, [a], bad, x, lengths=[40])
    assert cache.seq_len(a) == 0 and not cache.stats()["non_finite_appended"]
    cache.append(0, [a], x, x, lengths=[40])
    one = np.full((2, 2, 64), np.nan, np.float32)
    cache.append(0, [a, b], one, one)  # the decode path: stored, flagged
    assert cache.seq_len(a) == 41 and cache.stats()["non_finite_appended"]
    cache.append(0, [b], bad[:3], bad[:3], lengths=[3], check_finite=False)  # opted out
    assert cache.seq_len(b) == 4


def test_encode_takes_the_dtypes_training_takes(rng):
    book = mc.Codebook.train(rng.standard_normal((512, 64)), M=16, iters=1)  # float64 samples
    x = rng.standard_normal((8, 64))
    np.testing.assert_array_equal(book.encode(x), book.encode(x.astype(np.float32)))


# ------------------------------------------------------------------------------ API surface


def test_public_functions_have_real_signatures():
    for fn in (mc.contiguous_pq_decode, mc.paged_pq_decode, mc.paged_exact_decode, mc.decode):
        params = inspect.signature(fn).parameters.values()
        assert not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params), fn
    assert list(inspect.signature(mc.decode).parameters)[:4] == ["cache", "layer", "seq_ids", "q"]
    assert mc.decode.__doc__.startswith("million_cupy.decode(cache, layer")


def test_public_properties_are_documented():
    for cls in (mc.PagedPQCache, mc.Codebook, mc.ModelCodebooks, mc.BatchDecodeWrapper, mc.DecodeStep,
                mc.PageAllocator):
        missing = [n for n, v in vars(cls).items()
                   if isinstance(v, property) and not n.startswith("_") and not (v.fget.__doc__ or "").strip()]
        assert not missing, f"{cls.__name__}: properties without a docstring: {missing}"


def test_readme_cpu_snippet_runs():
    from pathlib import Path

    readme = Path(__file__).resolve().parents[1] / "README.md"
    if not readme.is_file():
        pytest.skip("not a source checkout")
    text = readme.read_text()
    start = text.index("On a machine without a GPU the same objects work")
    code = text[text.index("```python", start) + len("```python") : text.index("```", text.index("```python", start) + 9)]
    scope: dict = {}
    exec(compile(code, "README.md (CPU snippet)", "exec"), scope)  # noqa: S102 - the README's own example
    assert scope["keys"].shape == (300, 2, 64) and scope["out"].shape == (1, 8, 64)


def test_development_extras_pick_one_cuda_major():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    path = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not path.is_file():
        pytest.skip("not a source checkout")
    extras = tomllib.loads(path.read_text())["project"]["optional-dependencies"]
    for name, major, other in (("dev", "cuda12x", "cuda13x"), ("dev-cuda13", "cuda13x", "cuda12x")):
        deps = " ".join(extras[name])
        assert f"cupy-{major}" in deps and f"cupy-{other}" not in deps, (name, deps)
    assert "nvidia-cuda-nvrtc-cu12" not in " ".join(extras["dev-cuda13"])
