"""BatchPrefillWrapper on the GPU against the float64 causal reference over the cache's own contents.

Ragged query counts (1 to 40 per sequence), chunks that cross a flush boundary in the same call, a first prompt
(no history), GQA 1 / 4 / 8, float16 and bfloat16, outputs poisoned before the kernels run.
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
    seqs = [cache.add_sequence() for _ in range(4)]
    history = [70, 0, 33, 5]
    counts = [8, 40, 1, 3]  # 40 > LUT_QUERIES_MAX: counted and warned; 33 + 1 and 70 + 8 cross flushes
    _prefill(rng, (cache,), [s for s, n in zip(seqs, history) if n], [n for n in history if n])
    nh = gqa * cache.num_kv_heads
    ind = np.concatenate([[0], np.cumsum(counts)])
    wrapper = BatchPrefillWrapper(cache, nh)
    with pytest.warns(RuntimeWarning, match="longer than 16"):
        wrapper.plan(seqs, ind)
    for layer in range(cache.num_layers):
        k, v = _tokens(rng, ind[-1], cache), _tokens(rng, ind[-1], cache)
        with pytest.raises(MillionError, match="append the new tokens"):
            wrapper.run(layer, cp.zeros((int(ind[-1]), nh, 128), dtype=cache.array_dtype))
        cache.append(layer, seqs, _device_array(k).astype(cache.array_dtype), _device_array(v).astype(cache.array_dtype),
                     lengths=counts)
        q = cp.asarray(rng.standard_normal((int(ind[-1]), nh, 128)).astype(np.float32)).astype(cache.array_dtype)
        out = _poison((int(ind[-1]), nh, 128), dtype)
        lse = cp.full((int(ind[-1]), nh), cp.nan, dtype=cp.float32)
        wrapper.run(layer, q, out=out, lse=lse)
        ks, vs = zip(*(cache.dequantize(layer, s) for s in seqs))
        ref_o, ref_lse = reference.causal_attention(to_numpy(q).astype(np.float64), list(ks), list(vs), ind)
        o = to_numpy(out).astype(np.float64)
        assert np.isfinite(o).all()
        assert reference.relative_error(o, ref_o) <= TOL[dtype]
        assert np.max(np.abs(to_numpy(lse) - ref_lse)) < 2e-2
        one_call = prefill_attention(cache, layer, seqs, q, ind)
        assert reference.relative_error(to_numpy(one_call).astype(np.float64), ref_o) <= TOL[dtype]
    assert wrapper.stats()["long_chunk_queries"] == 40 and wrapper.stats()["runs"] == cache.num_layers
