"""The accuracy study's pieces: the synthetic KV generator's properties, the uniform quantizers, and
``bench/accuracy.py --quick`` end to end. CPU only, a few seconds."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/ is scripts, not a package

import accuracy  # noqa: E402
import kvgen  # noqa: E402

from million_cupy import reference  # noqa: E402
from million_cupy.codebook import ModelCodebooks  # noqa: E402

T, NH_K, D, NH = 1024, 2, 128, 8
SINKS = 4


@pytest.fixture(scope="module")
def layer():
    return kvgen.generate(T, NH_K, D, NH, seed=3, num_queries=16, num_sinks=SINKS)


def test_generator_shapes_and_determinism(layer):
    assert layer["k"].shape == layer["v"].shape == (T, NH_K, D)
    assert layer["q"].shape == (16, NH, D)
    assert all(layer[n].dtype == np.float32 for n in ("k", "v", "q"))
    again = kvgen.generate(T, NH_K, D, NH, seed=3, num_queries=16, num_sinks=SINKS)
    np.testing.assert_array_equal(again["k"], layer["k"])
    plain = kvgen.generate(256, 1, 64, 2, seed=1, num_queries=2, rotary=False)
    assert plain["k"].shape == (256, 1, 64) and plain["q"].shape == (2, 2, 64)


def test_outlier_key_channels_are_tens_of_times_larger(layer):
    rms = np.sqrt(np.mean(layer["k"][SINKS:].astype(np.float64) ** 2, axis=0))  # (NH_K, D)
    for h in range(NH_K):
        outliers = layer["outlier_channels"][h]
        ordinary = np.delete(rms[h], outliers)
        assert outliers.size == 4
        assert rms[h, outliers].min() > 10 * np.median(ordinary), (rms[h, outliers], np.median(ordinary))
    # Values have no outlier channels: their channel scales stay within a small factor.
    v_rms = np.sqrt(np.mean(layer["v"][SINKS:].astype(np.float64) ** 2, axis=0))
    assert v_rms.max() < 5 * np.median(v_rms)


def test_values_are_heavier_tailed_than_gaussian(layer):
    v = layer["v"][SINKS:].astype(np.float64)
    v = (v - v.mean(axis=0)) / v.std(axis=0)
    kurtosis = np.mean(v**4)  # 3 for a Gaussian; 9 for Student-t with 5 dof
    assert kurtosis > 4.5, kurtosis


def test_sink_tokens_take_a_large_attention_share(layer):
    q = layer["q"].astype(np.float64).reshape(16, NH_K, NH // NH_K, D)
    k = layer["k"].astype(np.float64)
    s = np.einsum("qhgd,thd->qhgt", q, k) / np.sqrt(D)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    share = p[..., :SINKS].sum(axis=-1).mean()
    assert share == pytest.approx(0.4, abs=0.01)  # the generator's default sink_share, solved per kv head
    assert share > 100 * SINKS / T  # a hundred times what as many ordinary tokens get


def test_training_sample_is_the_same_layer_with_other_tokens():
    a = kvgen.generate(512, NH_K, D, NH, seed=5, num_queries=4)
    b = kvgen.training_sample(512, NH_K, D, NH, seed=5, num_queries=4)
    np.testing.assert_array_equal(a["outlier_channels"], b["outlier_channels"])
    assert not np.allclose(a["k"], b["k"])


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("axis", [0, -1])
def test_uniform_quantizer_is_exact_on_its_grid(rng, bits, axis):
    group, levels = 32, 2**bits - 1
    lead, n = (3, 64), 128  # the quantized axis holds n = 4 groups; it is moved into place below
    # Per group: an fp16 scale and zero point, and codes that include 0 and `levels`, so the group's
    # min and max give back exactly that scale and zero point.
    scale = rng.uniform(0.01, 2.0, (*lead, n // group, 1)).astype(np.float16).astype(np.float64)
    zero = rng.uniform(-3.0, 3.0, (*lead, n // group, 1)).astype(np.float16).astype(np.float64)
    codes = rng.integers(0, levels + 1, (*lead, n // group, group)).astype(np.float64)
    codes[..., 0], codes[..., 1] = 0, levels
    x = np.moveaxis((codes * scale + zero).reshape(*lead, n), -1, axis)
    np.testing.assert_array_equal(accuracy.quantize_uniform(x, bits, group, axis), x)


def test_uniform_quantizer_partial_last_group(rng):
    x = rng.standard_normal((100, 2, 8))
    out = accuracy.quantize_uniform(x, 4, 32, axis=0)
    np.testing.assert_array_equal(out[:96], accuracy.quantize_uniform(x[:96], 4, 32, axis=0))
    np.testing.assert_array_equal(out[96:], accuracy.quantize_uniform(x[96:], 4, 4, axis=0))


def test_uniform_quantizer_error_is_bounded_by_half_a_step(rng):
    x = rng.standard_normal((64, 2, 128))
    out = accuracy.quantize_uniform(x, 4, 32, axis=-1)
    g = x.reshape(64, 2, 4, 32)
    step = (g.max(-1) - g.min(-1)) / 15
    err = np.abs(out - x).reshape(64, 2, 4, 32).max(-1)
    assert np.all(err <= 0.5 * step * (1 + 2e-3) + 1e-3)  # fp16-rounded scale and zero: a slightly wider bound


def test_error_decreases_with_bits(layer):
    k = layer["k"].astype(np.float16)
    v = layer["v"].astype(np.float16)
    q = layer["q"]
    ref = accuracy.attention(q, k, v)

    def err(kq, vq):
        return accuracy.per_query_error(accuracy.attention(q, kq, vq), ref).mean()

    for recon in ([reference.relative_error(accuracy.per_token(x, b, 32), x) for b in (2, 3, 4)] for x in (k, v)):
        assert recon[0] > recon[1] > recon[2]
    kivi = [err(*accuracy.kivi(k, v, b, 32)) for b in (2, 3, 4)]
    assert kivi[0] > kivi[1] > kivi[2]
    per_token = [err(accuracy.per_token(k, b, 32), accuracy.per_token(v, b, 32)) for b in (2, 3, 4)]
    assert per_token[0] > per_token[1] > per_token[2]


def test_pq_error_decreases_with_subspaces():
    # A small layer: k-means and float64 encoding dominate this test's time.
    small = kvgen.generate(512, 1, D, 4, seed=4, num_queries=4)
    train = kvgen.training_sample(512, 1, D, 4, seed=4, num_queries=4)
    k, v = small["k"].astype(np.float16), small["v"].astype(np.float16)
    k_err, v_err = [], []
    for M in (16, 32, 64):  # 1, 2, 4 bits per value
        model = ModelCodebooks.train([train["k"]], [train["v"]], M, iters=3, seed=0, per_head=True, progress=False)
        k_err.append(reference.relative_error(accuracy.pq_roundtrip(k, model, 0), k))
        v_err.append(reference.relative_error(accuracy.pq_roundtrip(v, model, 1), v))
    assert k_err[0] > k_err[1] > k_err[2] and v_err[0] > v_err[1] > v_err[2]


def test_quick_run_end_to_end(tmp_path):
    records = accuracy.main(["--quick", "--out-dir", str(tmp_path)])
    doc = json.loads((tmp_path / "accuracy_quick.json").read_text())
    assert {"gpu", "date", "command", "versions", "config", "records"} <= doc.keys()
    assert "--quick" in doc["command"]
    methods = {r["method"] for r in doc["records"]}
    assert {"pq_M16", "pq_M32", "pq_M64", "int4_g32", "kivi_int4_g32"} <= methods
    for r in doc["records"]:
        assert r["suite"] == "accuracy"
        assert r["rel_err_mean"] > 0 and r["rel_err_std"] >= 0 and np.isfinite(r["rel_err_mean"])
    bits = {r["method"]: r["bits_per_value"] for r in records}
    assert bits["pq_M64"] == 4.0 and bits["int4_g32"] == 5.0 and bits["kivi_int2_g128"] == 2.25
    assert (tmp_path / "accuracy_quick.md").read_text().startswith("# KV quantization accuracy")
    assert (tmp_path / "accuracy_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
