"""BatchPrefillWrapper on the GPU against the float64 causal reference over the cache's own contents.

Both regimes: the LUT path (at most LUT_QUERIES_MAX new tokens per sequence) and the tensor-core path (a longer
chunk in the batch), with ragged query counts, chunks that cross a flush boundary in the same call, a first prompt
(no history), split long histories, GQA 1 / 4 / 8, M 16 / 32 / 64, pages of 16 / 32 / 64, float16 and bfloat16,
outputs poisoned before the kernels run; a configuration without the tensor-core path is counted and warned.
"""

from __future__ import annotations

import numpy as np
import pytest

from million_cupy import BatchPrefillWrapper, prefill_attention, reference
from million_cupy.errors import MillionError
from million_cupy.interop import to_numpy
from test_step_gpu import TOL, _caches, _device_array, _poison, _prefill, _tokens

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("gqa", [1, 4, 8])
def test_prefill_matches_the_causal_reference(rng, dtype, gqa):
    import cupy as cp

    (cache,) = _caches(rng, devices=("cuda",), dtype=dtype)  # 2 layers, 2 kv heads, d 128, page 16, window 32
    # At most LUT_QUERIES_MAX new tokens each: the LUT path; 33 + 1 and 70 + 8 cross flushes.
    seqs, ind, nh, wrapper = _planned(rng, cache, history=[70, 0, 33, 5], counts=[8, 6, 1, 3], gqa=gqa)
    for layer in range(cache.num_layers):
        with pytest.raises(MillionError, match="append the new tokens"):
            wrapper.run(layer, cp.zeros((int(ind[-1]), nh, 128), dtype=cache.array_dtype))
        _check_layer_and_one_call(rng, cache, wrapper, layer, seqs, ind, nh, dtype)
    stats = wrapper.stats()
    assert stats["long_chunk_queries"] == 0 and stats["tensor_core_plans"] == 0 and stats["runs"] == cache.num_layers


def _planned(rng, cache, *, history, counts, gqa):
    """Sequences holding ``history`` tokens (0: a first prompt), a wrapper planned for ``counts`` new tokens each."""
    seqs = [cache.add_sequence() for _ in history]
    _prefill(rng, (cache,), [s for s, n in zip(seqs, history) if n], [n for n in history if n])
    nh = gqa * cache.num_kv_heads
    ind = np.concatenate([[0], np.cumsum(counts)])
    wrapper = BatchPrefillWrapper(cache, nh)
    wrapper.plan(seqs, ind)
    return seqs, ind, nh, wrapper


def _check_layer_and_one_call(rng, cache, wrapper, layer, seqs, ind, nh, dtype):
    """_check_layer, then prefill_attention (the one-call form) over the same layer."""
    q, ref_o = _check_layer(rng, cache, wrapper, layer, seqs, ind, nh, dtype)
    one_call = prefill_attention(cache, layer, seqs, q, ind)
    assert reference.relative_error(to_numpy(one_call).astype(np.float64), ref_o) <= TOL[dtype]


def _check_layer(rng, cache, wrapper, layer, seqs, ind, nh, dtype):
    """Append the planned new tokens to ``layer``, run, and compare with the float64 reference (out and lse)."""
    import cupy as cp

    counts = np.diff(ind).tolist()
    k, v = _tokens(rng, ind[-1], cache), _tokens(rng, ind[-1], cache)
    cache.append(layer, seqs, _device_array(k).astype(cache.array_dtype), _device_array(v).astype(cache.array_dtype),
                 lengths=counts)
    d = cache.head_dim
    q = cp.asarray(rng.standard_normal((int(ind[-1]), nh, d)).astype(np.float32)).astype(cache.array_dtype)
    out = _poison((int(ind[-1]), nh, d), dtype)
    lse = cp.full((int(ind[-1]), nh), cp.nan, dtype=cp.float32)
    wrapper.run(layer, q, out=out, lse=lse)
    ks, vs = zip(*(cache.dequantize(layer, s) for s in seqs))
    ref_o, ref_lse = reference.causal_attention(to_numpy(q).astype(np.float64), list(ks), list(vs), ind)
    o = to_numpy(out).astype(np.float64)
    assert np.isfinite(o).all()
    assert reference.relative_error(o, ref_o) <= TOL[dtype]
    assert np.max(np.abs(to_numpy(lse) - ref_lse)) < 2e-2
    return q, ref_o


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("M, P", [(64, 16), (32, 64), (16, 32)])
def test_tensor_core_prefill_matches_the_causal_reference(rng, dtype, gqa, M, P):
    """Long chunks (the tensor-core path) beside short ones in one batch: a first prompt, chunks crossing
    flushes in the same call, one row tile and many, empty history; exact window R = 2P."""
    (cache,) = _caches(rng, devices=("cuda",), dtype=dtype, M=M, P=P, R=2 * P, max_pages=1024)
    seqs, ind, nh, wrapper = _planned(rng, cache, history=[300, 0, 129, 5, 64], counts=[200, 150, 17, 1, 64], gqa=gqa)
    for layer in range(cache.num_layers):
        _check_layer_and_one_call(rng, cache, wrapper, layer, seqs, ind, nh, dtype)
    stats = wrapper.stats()
    assert stats["tensor_core_plans"] == 1 and stats["long_chunk_queries"] == 0
    assert stats["short_queries_on_tensor_cores"] == 1  # the sequence with one new token rode along


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tensor_core_prefill_splits_a_long_history(rng, dtype):
    """A short chunk over a long history leaves SMs idle: each unit is split and the splits merged."""
    (cache,) = _caches(rng, devices=("cuda",), dtype=dtype, P=64, R=128, max_pages=256)
    seqs = [cache.add_sequence() for _ in range(2)]
    _prefill(rng, (cache,), seqs, [3000, 2100])
    ind = np.array([0, 20, 53])
    nh = 4 * cache.num_kv_heads
    wrapper = BatchPrefillWrapper(cache, nh)
    wrapper.plan(seqs, ind)
    for layer in range(cache.num_layers):
        _check_layer(rng, cache, wrapper, layer, seqs, ind, nh, dtype)


def test_long_chunks_without_a_tensor_core_path_are_counted_and_warned(rng):
    (cache,) = _caches(rng, devices=("cuda",), dtype="float32")
    seqs = [cache.add_sequence() for _ in range(2)]
    _prefill(rng, (cache,), seqs, [40, 3])
    ind = np.array([0, 30, 31])
    wrapper = BatchPrefillWrapper(cache, 4)
    with pytest.warns(RuntimeWarning, match="no tensor-core path"):
        wrapper.plan(seqs, ind)
    _check_layer(rng, cache, wrapper, 0, seqs, ind, 4, "float32")
    assert wrapper.stats()["long_chunk_queries"] == 30 and wrapper.stats()["tensor_core_plans"] == 0
