"""The float64 ground truth checked against deliberately naive re-derivations."""

import math

import numpy as np
import pytest

from million_cupy import reference
from million_cupy.reference import decode_attention, merge_states, pq_decode, pq_encode, relative_error


def naive_attention(q, k, v, scale=None):
    """One head, one sequence at a time, softmax written out term by term."""
    B, nh, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = np.zeros((B, nh, d))
    lse = np.zeros((B, nh))
    for b in range(B):
        nh_k = k[b].shape[1]
        g = nh // nh_k
        for h in range(nh):
            kh, vh = k[b][:, h // g, :].astype(np.float64), v[b][:, h // g, :].astype(np.float64)
            s = np.array([scale * float(np.dot(q[b, h].astype(np.float64), kj)) for kj in kh])
            w = np.exp(s - s.max())
            out[b, h] = (w[:, None] * vh).sum(axis=0) / w.sum()
            lse[b, h] = s.max() + math.log(w.sum())
    return out, lse


def ragged(rng, lengths, nh_k, d, dtype=np.float32):
    k = [rng.standard_normal((n, nh_k, d)).astype(dtype) for n in lengths]
    v = [rng.standard_normal((n, nh_k, d)).astype(dtype) for n in lengths]
    return k, v


@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_attention_matches_naive_loop_gqa(rng, group):
    nh_k, d = 2, 64
    nh = nh_k * group
    lengths = [1, 7, 33]
    q = rng.standard_normal((len(lengths), nh, d)).astype(np.float32)
    k, v = ragged(rng, lengths, nh_k, d)
    out, lse = decode_attention(q, k, v)
    ref_out, ref_lse = naive_attention(q, k, v)
    assert out.dtype == np.float64 and lse.dtype == np.float64
    assert out.shape == (3, nh, d) and lse.shape == (3, nh)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-12, atol=1e-12)


def test_gqa_head_mapping_reads_kv_head_h_div_g(rng):
    # Every kv head holds one token whose value is constant = head index: the output says which head was read.
    nh_k, g, d = 4, 2, 8
    k = [np.zeros((1, nh_k, d))]
    v = [np.broadcast_to(np.arange(nh_k, dtype=np.float64)[None, :, None], (1, nh_k, d)).copy()]
    q = rng.standard_normal((1, nh_k * g, d))
    out, _ = decode_attention(q, k, v)
    np.testing.assert_array_equal(out[0, :, 0], np.arange(nh_k * g) // g)


def test_lse_is_natural_log_sum_exp_with_scale(rng):
    d = 16
    q = rng.standard_normal((1, 1, d))
    k, v = ragged(rng, [5], 1, d, np.float64)
    scale = 0.3
    _, lse = decode_attention(q, k, v, scale=scale)
    s = scale * (k[0][:, 0, :] @ q[0, 0])
    assert lse[0, 0] == pytest.approx(math.log(np.exp(s).sum()), rel=1e-13)
    _, lse_default = decode_attention(q, k, v)
    s = (k[0][:, 0, :] @ q[0, 0]) / math.sqrt(d)
    assert lse_default[0, 0] == pytest.approx(math.log(np.exp(s).sum()), rel=1e-13)


def test_attention_is_stable_for_huge_scores(rng):
    d = 32
    q = np.full((1, 1, d), 100.0)
    k = [np.full((4, 1, d), 100.0)]  # scores ~ 5.6e4: exp overflows without the max shift
    v = [rng.standard_normal((4, 1, d))]
    out, lse = decode_attention(q, k, v)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    np.testing.assert_allclose(out[0, 0], v[0][:, 0].mean(axis=0), rtol=1e-12)


def test_attention_validation_errors(rng):
    q = rng.standard_normal((2, 4, 16))
    k, v = ragged(rng, [3, 2], 2, 16)
    with pytest.raises(ValueError, match="L_b = 0"):
        decode_attention(q, [k[0], np.zeros((0, 2, 16))], [v[0], np.zeros((0, 2, 16))])
    with pytest.raises(ValueError, match="one per query"):
        decode_attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="multiple of nh_k"):
        decode_attention(q, [x[:, :1].repeat(3, axis=1) for x in k], [x[:, :1].repeat(3, axis=1) for x in v])
    with pytest.raises(ValueError, match="expected nh_k = 2"):
        decode_attention(q, [k[0], k[1][:, :1]], [v[0], v[1][:, :1]])
    with pytest.raises(ValueError, match=r"expected shape \(L, nh_k, 16\)"):
        decode_attention(q, [k[0], k[1][..., :8]], v)
    with pytest.raises(ValueError, match="shape of k"):
        decode_attention(q, k, [v[0], v[1][:1]])
    with pytest.raises(ValueError, match=r"\(B, nh, d\)"):
        decode_attention(q[0], k, v)


def test_merge_of_a_split_equals_the_whole(rng):
    nh_k, g, d = 2, 4, 32
    lengths = [9, 40, 3]
    q = rng.standard_normal((3, nh_k * g, d))
    k, v = ragged(rng, lengths, nh_k, d, np.float64)
    whole_out, whole_lse = decode_attention(q, k, v)
    # Three disjoint parts per sequence (sizes vary per sequence, each at least one key).
    cuts = [sorted(rng.choice(np.arange(1, n), size=2, replace=False)) if n > 2 else [1, 2] for n in lengths]
    parts = []
    for p in range(3):
        lo = [([0] + c)[p] for c in cuts]
        hi = [(c + [n])[p] for c, n in zip(cuts, lengths)]
        parts.append(decode_attention(q, [x[a:b] for x, a, b in zip(k, lo, hi)], [x[a:b] for x, a, b in zip(v, lo, hi)]))
    out, lse = merge_states([o for o, _ in parts], [s for _, s in parts])
    np.testing.assert_allclose(out, whole_out, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(lse, whole_lse, rtol=1e-12)


def test_merge_ignores_minus_inf_parts_even_with_garbage_outputs(rng):
    out1 = rng.standard_normal((2, 3, 8))
    lse1 = rng.standard_normal((2, 3))
    garbage = np.full((2, 3, 8), np.nan)
    garbage[0, 0] = np.inf
    empty = np.full((2, 3), -np.inf)
    out, lse = merge_states([garbage, out1, garbage], [empty, lse1, empty])
    np.testing.assert_allclose(out, out1, rtol=1e-15)
    np.testing.assert_allclose(lse, lse1, rtol=1e-15)


def test_merge_all_empty_gives_zero_and_minus_inf():
    out, lse = merge_states([np.full((2, 4), np.nan)] * 2, [np.full(2, -np.inf)] * 2)
    assert (out == 0).all()
    assert np.isneginf(lse).all()


def test_merge_mixed_rows_some_empty(rng):
    o = [rng.standard_normal((3, 4)), rng.standard_normal((3, 4))]
    s = [np.array([0.5, -np.inf, -np.inf]), np.array([-np.inf, 1.0, -np.inf])]
    out, lse = merge_states(o, s)
    np.testing.assert_allclose(out[0], o[0][0])
    np.testing.assert_allclose(out[1], o[1][1])
    assert (out[2] == 0).all()
    np.testing.assert_allclose(lse, [0.5, 1.0, -np.inf])


def test_merge_validation(rng):
    with pytest.raises(ValueError, match="non-empty"):
        merge_states([], [])
    with pytest.raises(ValueError, match="expected shape"):
        merge_states([np.zeros((2, 4))], [np.zeros(3)])


def test_encode_ties_go_to_lowest_index():
    # dsub = 1, M = 2: x = 1 is exactly between centroids 0 and 2 (indices 1 and 2); centroid 5 duplicates 3.
    c = np.zeros((2, 8, 1))
    c[0, :, 0] = [9, 0, 2, 7, 7, 8, 9, 9]
    c[1, :, 0] = [5, 5, 1, 3, 6, 3, 9, 1]
    x = np.array([[1.0, 3.0], [9.0, 1.0], [8.0, 5.0]])
    codes = pq_encode(x, c)
    np.testing.assert_array_equal(codes, [[1, 3], [0, 2], [5, 0]])
    assert codes.dtype == np.uint8


def test_encode_is_nearest_in_float64(rng):
    M, C, dsub = 4, 256, 2
    c = rng.standard_normal((M, C, dsub))
    x = rng.standard_normal((5, 7, M * dsub))
    codes = pq_encode(x, c)
    assert codes.shape == (5, 7, M)
    xs = x.reshape(-1, M, dsub)
    for m in range(M):
        dist = ((xs[:, m, None, :] - c[m][None]) ** 2).sum(-1)
        np.testing.assert_array_equal(codes.reshape(-1, M)[:, m], dist.argmin(axis=1))


def test_decode_of_encode_on_exact_centroids_is_identity(rng):
    M, C, dsub = 8, 256, 4
    c = rng.standard_normal((M, C, dsub)).astype(np.float32)
    codes = rng.integers(0, C, size=(3, 5, M)).astype(np.uint8)
    x = pq_decode(codes, c)
    assert x.dtype == np.float64 and x.shape == (3, 5, M * dsub)
    np.testing.assert_array_equal(pq_encode(x, c), codes)
    np.testing.assert_array_equal(pq_decode(pq_encode(x, c), c), x)


def test_encode_decode_validation(rng):
    c = rng.standard_normal((4, 16, 2))
    with pytest.raises(ValueError, match="M\\*dsub = 8"):
        pq_encode(np.zeros((3, 7)), c)
    with pytest.raises(ValueError, match="M = 4"):
        pq_decode(np.zeros((3, 5), np.uint8), c)
    with pytest.raises(ValueError, match="< C = 16"):
        pq_decode(np.full((3, 4), 20, np.uint8), c)
    with pytest.raises(ValueError, match=r"\(M, C, dsub\)"):
        pq_encode(np.zeros((3, 8)), c[0])


def test_relative_error():
    b = np.array([3.0, 4.0])
    assert relative_error(b, b) == 0.0
    assert relative_error(b + np.array([0.0, 0.5]), b) == pytest.approx(0.1)
    assert relative_error(np.zeros(2), np.zeros(2)) == 0.0
    assert relative_error(np.ones(2), np.zeros(2)) == math.inf
    assert relative_error(np.float16([3, 4]), b) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        relative_error(np.zeros(2), np.zeros(3))
    assert reference.relative_error is relative_error
