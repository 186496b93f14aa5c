"""Several new tokens per sequence (million_cupy.prefill) on the CPU: the causal rule, the float64 path, errors."""

from __future__ import annotations

import numpy as np
import pytest

import million_cupy as mc
from million_cupy import Codebook, ModelCodebooks, PagedPQCache, reference
from million_cupy.errors import UnsupportedConfiguration
from million_cupy.layout import full_pages
from million_cupy.prefill import causal_lengths


def _cache(rng, P=16, R=32, nh_k=2, d=64, M=16):
    books = ModelCodebooks([Codebook(rng.standard_normal((M, 256, d // M)).astype(np.float32))],
                           [Codebook(rng.standard_normal((M, 256, d // M)).astype(np.float32))])
    return PagedPQCache(1, nh_k, d, books, page_size=P, residual=R, max_pages=64, max_seqs=4, max_seq_len=512,
                        dtype="float32", device="cpu")


def test_causal_lengths_follow_the_final_flush_state():
    P, R = 16, 32
    n_final = np.array([100, 7, 48])
    counts = np.array([40, 7, 1])
    owner, main, res = causal_lengths(n_final, counts, P, R)
    assert owner.tolist() == [0] * 40 + [1] * 7 + [2]
    for i, b in enumerate(owner):
        j = i - int(np.flatnonzero(owner == b)[0])
        attended = n_final[b] - counts[b] + j + 1
        pages = int(full_pages(n_final[b], P, R)) * P
        assert main[i] + res[i] == attended
        assert main[i] == min(pages, attended)  # tokens in pages after the append are read as codes


def test_cpu_prefill_is_causal_attention_over_the_dequantized_cache(rng):
    cache = _cache(rng)
    seqs = [cache.add_sequence() for _ in range(3)]
    history = [50, 0, 31]
    counts = [9, 5, 1]  # the first chunk crosses a flush; the second is a first prompt; the third one token
    k = rng.standard_normal((sum(history), 2, 64)).astype(np.float32)
    cache.append(0, seqs, k, k * 0.5, lengths=history)
    new = rng.standard_normal((sum(counts), 2, 64)).astype(np.float32)
    cache.append(0, seqs, new, -new, lengths=counts)
    ind = np.concatenate([[0], np.cumsum(counts)])
    q = rng.standard_normal((sum(counts), 8, 64))
    out, lse = mc.prefill_attention(cache, 0, seqs, q, ind, return_lse=True)
    for b, s in enumerate(seqs):
        ks, vs = cache.dequantize(0, s)
        for j in range(counts[b]):
            row = ind[b] + j
            end = history[b] + j + 1
            o, l = reference.decode_attention(q[row : row + 1], [ks[:end]], [vs[:end]])
            assert reference.relative_error(out[row : row + 1], o) < 1e-12
            assert np.allclose(lse[row], l[0])
    # One new token per sequence is decode.
    one = np.arange(4)
    q1 = q[ind[1:] - 1]
    assert reference.relative_error(mc.prefill_attention(cache, 0, seqs, q1, one), mc.decode(cache, 0, seqs, q1)) < 1e-12


def test_prefill_errors_name_what_was_expected(rng):
    cache = _cache(rng)
    s = cache.add_sequence()
    cache.append(0, [s], rng.standard_normal((4, 2, 64)).astype(np.float32),
                 rng.standard_normal((4, 2, 64)).astype(np.float32), lengths=[4])
    q = np.zeros((2, 8, 64))
    with pytest.raises(ValueError, match="qo_indptr: expected 2 integer offsets"):
        mc.prefill_attention(cache, 0, [s], q, [0, 1, 2])
    with pytest.raises(ValueError, match="non-decreasing"):
        mc.prefill_attention(cache, 0, [s], q, [1, 2])
    with pytest.raises(ValueError, match="new tokens but only 4 keys"):
        mc.prefill_attention(cache, 0, [s], np.zeros((5, 8, 64)), [0, 5])
    with pytest.raises(ValueError, match=r"q: expected shape \(2, num_heads, 64\)"):
        mc.prefill_attention(cache, 0, [s], np.zeros((3, 8, 64)), [0, 2])
    with pytest.raises(UnsupportedConfiguration, match="GPU cache"):
        mc.BatchPrefillWrapper(cache, 8)
