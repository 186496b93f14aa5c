"""PagedPQCache: flush rule and split invariance, layout contract, paging, fork / free / reserve,
validation (errors leave the cache untouched), stats, page tables, CPU-vs-GPU agreement, truncation, planned
appends, and random sequences of all of these against a model of what the cache must hold (CacheModel).

Codebooks are built by hand from random centroids so that nothing depends on k-means. Tests that
take ``device`` run on the CPU reference path and, marked ``gpu``, on CuPy arrays.
"""

from __future__ import annotations

import numpy as np
import pytest

import million_cupy as mc
from million_cupy import reference
from million_cupy.cache import PagedPQCache, pack_pages, permute_k_rows, unpack_pages
from million_cupy.prefill import BatchPrefillWrapper
from million_cupy.step import DecodeStep
from million_cupy.codebook import Codebook, ModelCodebooks
from million_cupy.errors import PagePoolExhausted, SequenceSlotsExhausted, UnsupportedConfiguration
from million_cupy.interop import cupy, resolve_dtype, to_numpy

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
NEAR_TIE_RTOL = 1e-5


# ------------------------------------------------------------------------------------------ helpers


def make_codebooks(rng, num_layers=2, M=16, d=64, heads=1) -> ModelCodebooks:
    def one():
        return Codebook(rng.standard_normal((M, 256, d // M)).astype(np.float32))

    def layer():
        return one() if heads == 1 else [one() for _ in range(heads)]

    return ModelCodebooks([layer() for _ in range(num_layers)], [layer() for _ in range(num_layers)])


def make_cache(rng, device="cpu", *, num_layers=2, nh_k=2, d=64, M=16, heads=1, codebooks=None, **kw):
    kw.setdefault("page_size", 16)
    kw.setdefault("residual", 32)
    kw.setdefault("max_seqs", 8)
    kw.setdefault("max_seq_len", 4096)
    kw.setdefault("max_pages", 256)
    codebooks = codebooks if codebooks is not None else make_codebooks(rng, num_layers, M, d, heads)
    return PagedPQCache(num_layers, nh_k, d, codebooks, device=device, **kw)


def tokens(rng, n, cache):
    return rng.standard_normal((n, cache.num_kv_heads, cache.head_dim)).astype(np.float32)


def on(cache, x):
    """``x`` on the cache's side (CuPy for a GPU cache), so GPU tests feed device arrays."""
    return cupy().asarray(x) if cache.is_gpu else x


def unpermute_rows(k_rows):
    """``(..., P, M)`` K rows in stored (permuted) order -> subspace order, written from docs/architecture.md
    independently of the cache: stored position s of in-page row t holds subspace s ^ (t % ROT)."""
    P, M = k_rows.shape[-2:]
    rot = min(M, 32)
    out = np.empty_like(k_rows)
    for t in range(P):
        for s in range(M):
            out[..., t, s ^ (t % rot)] = k_rows[..., t, s]
    return out


def stored_to_logical(k_pages, v_pages):
    """Stored pages (docs/architecture.md) -> ``(..., P, M)`` K and V codes in token / subspace order:
    stored K position s of row t is byte s % kc of chunk s // kc (kc = min(M, 16)), chunk-major
    ``(..., M // kc, P, kc)``; V ``(..., P // 16, M, 16)`` holds token t of subspace m at [t // 16, m, t % 16]."""
    *lead, chunks, P, kc = k_pages.shape
    M = chunks * kc
    k_rows = np.empty((*lead, P, M), np.uint8)
    v = np.empty((*lead, P, M), np.uint8)
    for t in range(P):
        for s in range(M):
            k_rows[..., t, s] = k_pages[..., s // kc, t, s % kc]
            v[..., t, s] = v_pages[..., t // 16, s, t % 16]
    return unpermute_rows(k_rows), v


def pages_of(n, P, R):
    return 0 if n < R else (n - R) // P + 1


def blocks_of(n, P):
    """Allocated blocks of a sequence of n tokens: every token's codes are written at append."""
    return -(-n // P)


def exact(x, dtype="float16"):
    """What the residual ring stores for float32 input ``x``."""
    return np.asarray(x).astype(resolve_dtype(dtype))


def contents(cache, layer, seq):
    """Host (k_codes, v_codes, k_residual, v_residual) of a sequence in token order.

    Codes are ``(pages * P, nh_k, M)`` read through the page table; residuals ``(r, nh_k, d)`` read
    from the live ring slots, in the cache dtype.
    """
    P, R, M, nh = cache.page_size, cache.residual, cache.M, cache.num_kv_heads
    n = cache.seq_len(seq, layer)
    _, indices, residual_lens = cache.page_table(layer, [seq])
    kc, vc = (
        c.transpose(0, 2, 1, 3).reshape(-1, nh, M)
        for c in stored_to_logical(to_numpy(cache.k_codes(layer)[indices]), to_numpy(cache.v_codes(layer)[indices]))
    )
    slots = np.arange(n - int(to_numpy(residual_lens)[0]), n) % R
    rk = to_numpy(cache.residual_k(layer)[seq])[:, slots].transpose(1, 0, 2)
    rv = to_numpy(cache.residual_v(layer)[seq])[:, slots].transpose(1, 0, 2)
    assert kc.shape[0] == P * pages_of(n, P, R) and kc.shape[0] + rk.shape[0] == n
    return kc, vc, rk, rv


def assert_same_contents(a, b):
    for x, y, what in zip(a, b, ("K codes", "V codes", "K residual", "V residual")):
        assert x.shape == y.shape, what
        np.testing.assert_array_equal(x, y, err_msg=what)


def reference_codes(x, centroids):
    """Reference codes of ``x`` ``(n, nh_k, d)`` under stacked centroids ``(Hc, M, C, dsub)``."""
    c = to_numpy(centroids)
    if c.shape[0] == 1:
        return reference.pq_encode(x, c[0])
    return np.stack([reference.pq_encode(x[:, h], c[h]) for h in range(c.shape[0])], axis=1)


def assert_codes_match(codes, x, centroids):
    """``codes`` equal the float64 reference codes of ``x``, except at near-ties.

    A mismatch is allowed only where the chosen centroid's distance exceeds the best one by at most
    NEAR_TIE_RTOL of ||x_sub||^2 + ||c||^2: the GPU compares ||c||^2 - 2 x.c in fp32, whose rounding
    scales with those norms, not with the (possibly tiny) distance itself.
    """
    x = np.asarray(x, dtype=np.float64)
    c = to_numpy(centroids).astype(np.float64)
    ref = reference_codes(x, centroids)
    codes = np.asarray(codes)
    assert codes.shape == ref.shape
    bad = np.argwhere(codes != ref)
    for idx in bad:
        t, h, m = idx
        head = h if c.shape[0] > 1 else 0
        dsub = c.shape[-1]
        sub = x[t, h, m * dsub : (m + 1) * dsub]
        dist = ((c[head, m] - sub) ** 2).sum(axis=1)
        chosen, best = dist[codes[t, h, m]], dist[ref[t, h, m]]
        scale = (sub**2).sum() + (c[head, m, codes[t, h, m]] ** 2).sum()
        assert chosen - best <= NEAR_TIE_RTOL * scale, (
            f"code mismatch at token {t} head {h} subspace {m}: {codes[t, h, m]} (dist {chosen}) vs "
            f"reference {ref[t, h, m]} (dist {best}) is not a near-tie"
        )


def snapshot(cache, seqs):
    """Everything an invalid call must leave unchanged (the allocator's `failed` may count it)."""
    stats = cache.stats()
    stats.pop("failed")
    return {
        "stats": stats,
        "pool": to_numpy(cache.pool).copy(),
        "block_table": to_numpy(cache.block_table).copy(),
        "rings": [to_numpy(r(l)).copy() for l in range(cache.num_layers) for r in (cache.residual_k, cache.residual_v)],
        "lens": [cache.seq_lens(l, seqs).copy() for l in range(cache.num_layers)],
        "refcounts": cache.allocator.refcounts(),
    }


def assert_unchanged(before, cache, seqs):
    after = snapshot(cache, seqs)
    assert after["stats"] == before["stats"]
    for key in ("pool", "block_table", "refcounts"):
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    for key in ("rings", "lens"):
        for x, y in zip(after[key], before[key]):
            np.testing.assert_array_equal(x, y, err_msg=key)


def random_chunks(rng, n, max_chunk, zero_prob=0.15):
    """Chunk sizes summing to ``n``, with some zero-length chunks."""
    sizes = []
    left = n
    while left:
        c = 0 if rng.random() < zero_prob else int(rng.integers(1, max_chunk + 1))
        c = min(c, left)
        sizes.append(c)
        left -= c
    return sizes


# ------------------------------------------------------------------------------- split invariance


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("P, R", [(16, 32), (64, 128)])
def test_contents_do_not_depend_on_how_tokens_were_split(rng, device, P, R):
    n_a, n_b = 700, 260
    kw = dict(page_size=P, residual=R, max_seq_len=1024, max_pages=64)
    bulk = make_cache(rng, device, **kw)
    cbs = bulk.codebooks
    chunked = make_cache(rng, device, codebooks=cbs, **kw)
    single = make_cache(rng, device, codebooks=cbs, **kw)
    L = bulk.num_layers
    data = {(l, s): (tokens(rng, n, bulk), tokens(rng, n, bulk)) for l in range(L) for s, n in ((0, n_a), (1, n_b))}

    # Bulk: both sequences in one ragged append per layer.
    a, b = bulk.add_sequence(), bulk.add_sequence()
    for l in range(L):
        k = np.concatenate([data[l, 0][0], data[l, 1][0]])
        v = np.concatenate([data[l, 0][1], data[l, 1][1]])
        bulk.append(l, [a, b], on(bulk, k), on(bulk, v), lengths=[n_a, n_b])

    # Random chunks (zero-length ones included), both sequences per call, layers interleaved at random.
    a2, b2 = chunked.add_sequence(), chunked.add_sequence()
    pending = {}
    for l in range(L):  # the shorter plan is padded with zero-length chunks so the two pair up
        sizes_a, sizes_b = random_chunks(rng, n_a, 3 * P), random_chunks(rng, n_b, 2 * P)
        m = max(len(sizes_a), len(sizes_b))
        pending[l] = list(zip(sizes_a + [0] * (m - len(sizes_a)), sizes_b + [0] * (m - len(sizes_b))))
    done = {(l, s): 0 for l in range(L) for s in (0, 1)}
    while any(pending.values()):
        l = int(rng.choice([l for l, p in pending.items() if p]))
        ca, cb = pending[l].pop(0)
        ks, vs = [], []
        for s, c in ((0, ca), (1, cb)):
            ks.append(data[l, s][0][done[l, s] : done[l, s] + c])
            vs.append(data[l, s][1][done[l, s] : done[l, s] + c])
            done[l, s] += c
        chunked.append(l, [a2, b2], on(chunked, np.concatenate(ks)), on(chunked, np.concatenate(vs)), [ca, cb])

    # One token per call, the layers in reverse order at every step.
    a3, b3 = single.add_sequence(), single.add_sequence()
    for t in range(n_a):
        for l in reversed(range(L)):
            seqs = [a3, b3] if t < n_b else [a3]
            k = np.stack([data[l, s][0][t] for s in range(len(seqs))])
            v = np.stack([data[l, s][1][t] for s in range(len(seqs))])
            single.append(l, seqs, on(single, k), on(single, v))

    for l in range(L):
        for (cache, s0, s1) in ((chunked, a2, b2), (single, a3, b3)):
            assert_same_contents(contents(cache, l, s0), contents(bulk, l, a))
            assert_same_contents(contents(cache, l, s1), contents(bulk, l, b))
    for cache in (bulk, chunked, single):
        stats = cache.stats()
        expect = L * (pages_of(n_a, P, R) + pages_of(n_b, P, R))
        assert stats["flushes"] == expect
        assert stats["used"] == blocks_of(n_a, P) + blocks_of(n_b, P)  # pages shared by the layers

    # And the contents are the reference encoding of the (dtype-converted) tokens.
    for l in range(L):
        for s, seq in ((0, a), (1, b)):
            kc, vc, rk, rv = contents(bulk, l, seq)
            paged = kc.shape[0]
            x, y = exact(data[l, s][0]), exact(data[l, s][1])
            assert_codes_match(kc, x[:paged], bulk.key_centroids(l))
            assert_codes_match(vc, y[:paged], bulk.value_centroids(l))
            np.testing.assert_array_equal(rk, x[paged:])
            np.testing.assert_array_equal(rv, y[paged:])


def test_cpu_codes_are_the_reference_codes(rng):
    cache = make_cache(rng)
    s = cache.add_sequence()
    x, y = tokens(rng, 200, cache), tokens(rng, 200, cache)
    cache.append(1, [s], x, y, [200])
    kc, vc, _, _ = contents(cache, 1, s)
    np.testing.assert_array_equal(kc, reference_codes(exact(x[: kc.shape[0]]), cache.key_centroids(1)))
    np.testing.assert_array_equal(vc, reference_codes(exact(y[: vc.shape[0]]), cache.value_centroids(1)))


# --------------------------------------------------------------------------------- reading back


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads", [1, 2])
def test_dequantize_is_reference_decode_of_pages_then_exact_residual(rng, device, heads):
    cache = make_cache(rng, device, heads=heads)
    s = cache.add_sequence()
    n = 150
    x, y = tokens(rng, n, cache), tokens(rng, n, cache)
    cache.append(0, [s], on(cache, x), on(cache, y), [n])
    k, v = cache.dequantize(0, s)
    assert k.dtype == np.float32 and k.shape == (n, 2, 64) and v.shape == (n, 2, 64)
    paged = 16 * pages_of(n, 16, 32)
    kc, vc, _, _ = contents(cache, 0, s)
    for out, codes, centroids, exact_tokens in (
        (k, kc, cache.key_centroids(0), exact(x)),
        (v, vc, cache.value_centroids(0), exact(y)),
    ):
        c = to_numpy(centroids)
        want = np.stack([reference.pq_decode(codes[:, h], c[h if heads > 1 else 0]) for h in range(2)], axis=1)
        np.testing.assert_array_equal(out[:paged], want.astype(np.float32))
        np.testing.assert_array_equal(out[paged:], exact_tokens[paged:].astype(np.float32))
        assert_codes_match(codes, exact_tokens[:paged], centroids)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M", [16, 64])  # ROT = M, and ROT = 32 < M
def test_pool_bytes_follow_the_documented_layout(rng, device, M):
    cache = make_cache(rng, device, num_layers=2, nh_k=2, M=M)
    s = cache.add_sequence()
    P, nh, nb = cache.page_size, cache.num_kv_heads, cache.page_nbytes
    rot, kc = min(M, 32), min(M, 16)
    n = 80  # 4 full pages
    for l in range(2):
        x, y = tokens(rng, n, cache), tokens(rng, n, cache)
        cache.append(l, [s], on(cache, x), on(cache, y), [n])
        flat = to_numpy(cache.pool).reshape(-1)
        table = to_numpy(cache.block_table)[s]
        kref = reference_codes(exact(x), cache.key_centroids(l))
        vref = reference_codes(exact(y), cache.value_centroids(l))
        assert cache.code_offset(l, 0) == (l * 2 + 0) * nh * P * M
        assert cache.code_offset(l, 1) == (l * 2 + 1) * nh * P * M
        for block in range(pages_of(n, P, cache.residual)):
            p = int(table[block])
            t, h, m = np.meshgrid(np.arange(P), np.arange(nh), np.arange(M), indexing="ij")
            pos = m ^ (t % rot)  # subspace m's position in the stored row
            k_at = p * nb + ((l * 2 + 0) * nh + h) * P * M + ((pos // kc) * P + t) * kc + pos % kc
            v_at = p * nb + ((l * 2 + 1) * nh + h) * P * M + ((t // 16) * M + m) * 16 + t % 16
            tok = block * P + t
            assert_codes_match(flat[k_at], exact(x)[block * P : (block + 1) * P], cache.key_centroids(l))
            assert_codes_match(flat[v_at], exact(y)[block * P : (block + 1) * P], cache.value_centroids(l))
            if device == "cpu":
                np.testing.assert_array_equal(flat[k_at], kref[tok, h, m])
                np.testing.assert_array_equal(flat[v_at], vref[tok, h, m])
    # The code views alias the pool (no copies).
    kv, vv = cache.k_codes(1), cache.v_codes(1)
    assert kv.shape == (cache.num_pages, nh, M // kc, P, kc) and vv.shape == (cache.num_pages, nh, P // 16, M, 16)
    chunk = M // kc - 1
    kv[3, 1, chunk, 5, 7] = 201
    block = P // 16 - 1
    vv[3, 1, block, 7, 5] = 202
    flat = to_numpy(cache.pool).reshape(-1)
    assert flat[3 * nb + ((1 * 2 + 0) * nh + 1) * P * M + (chunk * P + 5) * kc + 7] == 201
    assert flat[3 * nb + ((1 * 2 + 1) * nh + 1) * P * M + (block * M + 7) * 16 + 5] == 202


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads", [1, 2])
def test_kernel_codebooks_are_made_with_the_cache_and_shared(rng, device, heads):
    """A GPU cache holds its codebooks in the kernels' float16 [c][m] layout from construction, and every
    launcher reads that one copy; a CPU cache or an exact one has none, and says so."""
    from million_cupy.decode import paged_layer_storage
    from million_cupy.errors import MillionError

    cache = make_cache(rng, device, heads=heads)
    if device == "cpu":
        with pytest.raises(MillionError, match="CPU cache"):
            cache.kernel_codebooks(0)
        exact = PagedPQCache(2, 2, 64, None, page_size=16, max_seqs=2, max_seq_len=64, device="cpu")
        with pytest.raises(UnsupportedConfiguration, match="kernel_codebooks: this cache is exact"):
            exact.kernel_codebooks(0)
        return
    for layer in range(cache.num_layers):
        k, v = cache.kernel_codebooks(layer)
        for got, centroids in ((k, cache.key_centroids(layer)), (v, cache.value_centroids(layer))):
            assert got.dtype == np.float16 and got.flags.c_contiguous
            want = to_numpy(centroids).transpose(0, 2, 1, 3).astype(np.float16)  # (Hc, 256, M, dsub)
            np.testing.assert_array_equal(to_numpy(got), want)
        storage = paged_layer_storage(cache, layer)
        assert storage.k_centroids is k and storage.v_centroids is v
    with pytest.raises(IndexError, match="layer: expected 0 <= layer < 2, got 2"):
        cache.kernel_codebooks(cache.num_layers)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M", [8, 32, 64])
def test_permute_k_rows_is_the_documented_involution(rng, device, M):
    side = (lambda x: cupy().asarray(x)) if device == "cuda" else (lambda x: x)
    codes = rng.integers(0, 256, (3, 2, 16, M), dtype=np.uint8)  # (pages, nh_k, P, M)
    stored = permute_k_rows(side(codes), np.arange(16))
    np.testing.assert_array_equal(unpermute_rows(to_numpy(stored)), codes)
    np.testing.assert_array_equal(to_numpy(permute_k_rows(stored, np.arange(16))), codes)
    # One in-page index per token, broadcast over heads: how a flush calls it.
    rows = rng.integers(0, 16, 5)
    tok = rng.integers(0, 256, (5, 2, M), dtype=np.uint8)
    got = to_numpy(permute_k_rows(side(tok), rows[:, None]))
    for i, t in enumerate(rows):
        np.testing.assert_array_equal(got[i][:, np.arange(M) ^ (t % min(M, 32))], tok[i])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M,P", [(8, 16), (32, 32), (64, 64), (128, 16)])
def test_pack_pages_is_the_documented_layout(rng, device, M, P):
    side = (lambda x: cupy().asarray(x)) if device == "cuda" else (lambda x: x)
    k, v = rng.integers(0, 256, (2, 3, 2, P, M), dtype=np.uint8)  # (pages, nh_k, P, M) each
    kp, vp = pack_pages(side(k), side(v))
    assert kp.shape == (3, 2, M // min(M, 16), P, min(M, 16)) and vp.shape == (3, 2, P // 16, M, 16)
    for got, want in zip(stored_to_logical(to_numpy(kp), to_numpy(vp)), (k, v)):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(unpack_pages(kp, vp), (k, v)):
        np.testing.assert_array_equal(to_numpy(got), want)
    with pytest.raises(ValueError, match="v_codes"):
        pack_pages(side(k), side(v[..., : P // 2, :]))
    with pytest.raises(ValueError, match="page size"):
        pack_pages(side(k[..., :8, :]), side(v[..., :8, :]))
    with pytest.raises(ValueError, match="uint8"):
        pack_pages(side(k.astype(np.int32)), side(v))
    with pytest.raises(ValueError, match="pack_pages"):
        unpack_pages(kp, vp[:1])
    if M > 8:
        with pytest.raises(ValueError, match="M: expected"):
            pack_pages(side(k[..., : M - 8]), side(v[..., : M - 8]))


@pytest.mark.parametrize("device", DEVICES)
def test_page_table_is_the_csr_of_full_pages(rng, device):
    cache = make_cache(rng, device)
    lengths = [0, 31, 32, 47, 48, 200, 5]
    seqs = [cache.add_sequence() for _ in lengths]
    total = sum(lengths)
    for l in range(2):
        cache.append(l, seqs, on(cache, tokens(rng, total, cache)), on(cache, tokens(rng, total, cache)), lengths)
    order = [seqs[i] for i in (5, 0, 3, 5, 1)]  # any order, repeats allowed
    indptr, indices, residual_lens = (to_numpy(a) for a in cache.page_table(1, order))
    assert indptr.dtype == indices.dtype == residual_lens.dtype == np.int32
    table = to_numpy(cache.block_table)
    want_pages = [pages_of(lengths[seqs.index(s)], 16, 32) for s in order]
    np.testing.assert_array_equal(indptr, np.concatenate([[0], np.cumsum(want_pages)]))
    for b, s in enumerate(order):
        np.testing.assert_array_equal(indices[indptr[b] : indptr[b + 1]], table[s, : want_pages[b]])
        assert residual_lens[b] == lengths[seqs.index(s)] - 16 * want_pages[b]
    np.testing.assert_array_equal(cache.seq_lens(1, order), [lengths[seqs.index(s)] for s in order])
    empty = [to_numpy(a) for a in cache.page_table(0, [])]
    np.testing.assert_array_equal(empty[0], [0])
    assert empty[1].shape == (0,) and empty[2].shape == (0,)


# ------------------------------------------------------------------------------ flushes and pages


@pytest.mark.parametrize("device", DEVICES)
def test_flushes_happen_exactly_at_the_flush_rule(rng, device):
    cache = make_cache(rng, device, page_size=16, residual=48)
    s = cache.add_sequence()
    n = 0
    for step in [47, 1, 15, 1, 0, 16, 33, 100]:
        cache.append(0, [s], on(cache, tokens(rng, step, cache)), on(cache, tokens(rng, step, cache)), [step])
        n += step
        p = pages_of(n, 16, 48)
        stats = cache.stats()
        assert stats["flushes"] == p and stats["used"] == blocks_of(n, 16)
        _, _, res = cache.page_table(0, [s])
        assert int(to_numpy(res)[0]) == n - 16 * p == (n if n < 48 else 32 + (n - 48) % 16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_rollback", [0, 8])
def test_bulk_append_writes_each_ring_slot_once_with_the_last_tokens(rng, device, max_rollback):
    # The ring receives a sequence's last ring_slots tokens and no earlier one, so one ring write per slot at
    # most (the GPU kernel would race on repeated slots): 72 tokens, R = 32 (3 pages, tokens 0..47; residual
    # 48..71) and 0 or 8 slots more. A 20-token sequence leaves the slots past it untouched.
    cache = make_cache(rng, device, page_size=16, residual=32, max_rollback=max_rollback)
    S = cache.ring_slots
    s, short = cache.add_sequence(), cache.add_sequence()
    x = tokens(rng, 72, cache)
    cache.append(0, [s, short], on(cache, np.concatenate([x, x[:20]])), on(cache, np.concatenate([x, x[:20]])),
                 [72, 20])
    ring = to_numpy(cache.residual_k(0)[s])
    slots = np.arange(72 - S, 72) % S
    np.testing.assert_array_equal(ring[:, slots].transpose(1, 0, 2), exact(x[72 - S:]))
    ring = to_numpy(cache.residual_k(0)[short])
    np.testing.assert_array_equal(ring[:, :20].transpose(1, 0, 2), exact(x[:20]))
    assert (ring[:, 20:] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_residual_equal_to_page_size_leaves_no_residual_tokens_at_page_boundaries(rng, device):
    cache = make_cache(rng, device, page_size=16, residual=16)
    s = cache.add_sequence()
    x, y = tokens(rng, 64, cache), tokens(rng, 64, cache)
    cache.append(0, [s], on(cache, x[:63]), on(cache, y[:63]), [63])
    assert int(to_numpy(cache.page_table(0, [s])[2])[0]) == 15
    cache.append(0, [s], on(cache, x[63:]), on(cache, y[63:]))
    indptr, _, res = (to_numpy(a) for a in cache.page_table(0, [s]))
    assert indptr[-1] == 4 and res[0] == 0
    k, v = cache.dequantize(0, s)
    assert k.shape == (64, 2, 64)
    kc, vc, rk, _ = contents(cache, 0, s)
    assert rk.shape[0] == 0
    assert_codes_match(kc, exact(x), cache.key_centroids(0))
    assert_codes_match(vc, exact(y), cache.value_centroids(0))


@pytest.mark.parametrize("device", DEVICES)
def test_one_page_id_serves_a_block_in_every_layer(rng, device):
    cache = make_cache(rng, device, num_layers=3)
    s = cache.add_sequence()
    for l in (2, 0, 1):
        n = {2: 80, 0: 48, 1: 64}[l]
        cache.append(l, [s], on(cache, tokens(rng, n, cache)), on(cache, tokens(rng, n, cache)), [n])
    # full pages: layer 2 has 4, layer 0 has 2, layer 1 has 3; layer 2 allocated all 5 blocks first.
    tables = [to_numpy(cache.page_table(l, [s])[1]) for l in range(3)]
    assert [t.shape[0] for t in tables] == [2, 3, 4]
    np.testing.assert_array_equal(tables[0], tables[2][:2])
    np.testing.assert_array_equal(tables[1], tables[2][:3])
    assert cache.stats()["used"] == 5 and cache.stats()["flushes"] == 9


@pytest.mark.parametrize("device", DEVICES)
def test_reserve_allocates_the_pages_that_appends_then_use(rng, device):
    cache = make_cache(rng, device)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.append(0, [a, b], on(cache, tokens(rng, 40, cache)), on(cache, tokens(rng, 40, cache)), [30, 10])
    # a: 30 tokens (2 blocks) in layer 0, 0 in layer 1; +20 in its longest layer gives 50 -> 4 blocks;
    # b: 10 (1 block) + 60 -> 5 blocks.
    assert cache.reserve([a, b], [20, 60]) == 6
    assert cache.reserve([a, b], [20, 60]) == 0  # idempotent
    table = to_numpy(cache.block_table).copy()
    allocs = cache.stats()["allocs"]
    assert (table[a, :4] >= 0).all() and table[a, 4] == -1 and (table[b, :5] >= 0).all() and table[b, 5] == -1
    assert cache.stats()["pool_utilization"] == 0.0  # reserved, nothing flushed yet
    cache.append(0, [a, b], on(cache, tokens(rng, 80, cache)), on(cache, tokens(rng, 80, cache)), [20, 60])
    cache.append(1, [a, b], on(cache, tokens(rng, 120, cache)), on(cache, tokens(rng, 120, cache)), [50, 70])
    assert cache.stats()["allocs"] == allocs
    np.testing.assert_array_equal(to_numpy(cache.block_table), table)
    indices = to_numpy(cache.page_table(1, [a, b])[1])
    np.testing.assert_array_equal(indices, np.concatenate([table[a, :2], table[b, :3]]))
    assert cache.reserve(a, 0) == 0 and cache.reserve([], 5) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_ensure_capacity_allocates_to_a_length_and_reports_the_capacity(rng, device):
    cache = make_cache(rng, device, max_seq_len=150)  # page 16
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.append(0, [a, b], on(cache, tokens(rng, 40, cache)), on(cache, tokens(rng, 40, cache)), [30, 10])
    used = cache.stats()["used"]
    # a holds 2 blocks, b 1: lengths 33 and 70 need 3 and 5 blocks.
    np.testing.assert_array_equal(cache.ensure_capacity([a, b], [33, 70]), [48, 80])
    assert cache.stats()["used"] == used + 5
    np.testing.assert_array_equal(cache.allocated_blocks([a, b]), [3, 5])
    # Already enough: nothing allocated, the capacity still reported; capped at max_seq_len.
    np.testing.assert_array_equal(cache.ensure_capacity([b, a], np.array([1, 2], np.int32)), [80, 48])
    np.testing.assert_array_equal(cache.ensure_capacity([a], [150]), [150])
    assert cache.stats()["used"] == used + 5 + 7


# ---------------------------------------------------------------------------------- fork and free


@pytest.mark.parametrize("device", DEVICES)
def test_fork_shares_full_pages_and_diverges(rng, device):
    cache = make_cache(rng, device, max_pages=64)
    parent = cache.add_sequence()
    n0, n1 = 100, 70  # layer 0: 5 full pages; layer 1: 3 full pages
    data = [(tokens(rng, 200, cache), tokens(rng, 200, cache)) for _ in range(2)]
    cache.append(0, [parent], on(cache, data[0][0][:n0]), on(cache, data[0][1][:n0]), [n0])
    cache.append(1, [parent], on(cache, data[1][0][:n1]), on(cache, data[1][1][:n1]), [n1])
    cache.reserve([parent], 16)  # blocks 0..6 hold layer 0's 100 tokens; block 7 is reserved ahead
    used = cache.stats()["used"]
    child = cache.fork(parent)
    table = to_numpy(cache.block_table)
    refs = cache.allocator.refcounts()
    # Blocks 0..2 are full in both layers: shared. Blocks 3, 4 (full in layer 0 only), 5, 6 (being filled)
    # and 7 (reserved): copied.
    np.testing.assert_array_equal(table[child, :3], table[parent, :3])
    assert (refs[table[parent, :3]] == 2).all()
    assert not set(table[child, 3:8]) & set(table[parent, 3:8]) and (table[child, 3:8] >= 0).all()
    assert (refs[table[parent, 3:8]] == 1).all() and (refs[table[child, 3:8]] == 1).all()
    assert cache.stats()["used"] == used + 5
    for l in range(2):
        assert cache.seq_len(child, l) == cache.seq_len(parent, l)
        assert_same_contents(contents(cache, l, child), contents(cache, l, parent))

    # Diverge: the parent continues its stream, the child takes another; each must equal a fresh
    # cache fed its whole stream.
    other = [(tokens(rng, 200, cache), tokens(rng, 200, cache)) for _ in range(2)]
    child_data = []
    for l, n in ((0, n0), (1, n1)):
        cache.append(l, [parent], on(cache, data[l][0][n:]), on(cache, data[l][1][n:]), [200 - n])
        cache.append(l, [child], on(cache, other[l][0][n:]), on(cache, other[l][1][n:]), [200 - n])
        child_data.append(tuple(np.concatenate([data[l][i][:n], other[l][i][n:]]) for i in (0, 1)))
    for seq, stream in ((parent, data), (child, child_data)):
        fresh = make_cache(rng, device, codebooks=cache.codebooks)
        f = fresh.add_sequence()
        for l in range(2):
            fresh.append(l, [f], on(fresh, stream[l][0]), on(fresh, stream[l][1]), [200])
            assert_same_contents(contents(cache, l, seq), contents(fresh, l, f))
    # Shared pages kept their contents for both.
    assert (cache.allocator.refcounts()[table[parent, :3]] == 2).all()


@pytest.mark.parametrize("device", DEVICES)
def test_free_returns_every_page_and_recycles_slots(rng, device):
    cache = make_cache(rng, device, max_seqs=4)
    seqs = [cache.add_sequence() for _ in range(3)]
    lengths = [100, 37, 64]
    for l in range(2):
        cache.append(l, seqs, on(cache, tokens(rng, 201, cache)), on(cache, tokens(rng, 201, cache)), lengths)
    cache.reserve([seqs[1]], 50)
    child = cache.fork(seqs[0])
    assert child == 3
    with pytest.raises(SequenceSlotsExhausted, match="slots are in use"):
        cache.add_sequence()
    cache.free(seqs[0])
    assert cache.add_sequence() == seqs[0]  # lowest free slot is reused
    assert cache.seq_len(seqs[0]) == 0 and (to_numpy(cache.block_table)[seqs[0]] == -1).all()
    for s in [seqs[0], child, seqs[1], seqs[2]]:
        cache.free(s)
    stats = cache.stats()
    assert stats["used"] == 0 and stats["sequences"] == 0 and stats["tokens"] == 0
    assert stats["free"] == stats["total"] and (cache.allocator.refcounts() == 0).all()
    assert (to_numpy(cache.block_table) == -1).all()


# ------------------------------------------------------------------------------------- validation


def _bad_calls(cache, rng, a, b, freed):
    k1 = tokens(rng, 1, cache)
    k2 = tokens(rng, 2, cache)
    on_ = lambda x: on(cache, x)  # noqa: E731
    return [
        ("unknown id", ValueError, "expected sequence ids in", lambda: cache.append(0, [99], on_(k1), on_(k1))),
        ("negative id", ValueError, "expected sequence ids in", lambda: cache.append(0, [-1], on_(k1), on_(k1))),
        ("freed id", ValueError, "not live", lambda: cache.append(0, [freed], on_(k1), on_(k1))),
        ("never added", ValueError, "not live", lambda: cache.append(0, [5], on_(k1), on_(k1))),
        ("duplicate ids", ValueError, "distinct", lambda: cache.append(0, [a, a], on_(k2), on_(k2))),
        ("float ids", TypeError, "integer", lambda: cache.append(0, [0.0], on_(k1), on_(k1))),
        ("wrong heads", ValueError, "expected shape", lambda: cache.append(0, [a], on_(k1[:, :1]), on_(k1[:, :1]))),
        ("wrong d", ValueError, "expected shape", lambda: cache.append(0, [a], on_(k1[..., :32]), on_(k1[..., :32]))),
        ("2-D k", ValueError, "dimensions", lambda: cache.append(0, [a], on_(k1[0]), on_(k1[0]))),
        ("v shape", ValueError, "v: expected shape", lambda: cache.append(0, [a], on_(k1), on_(k2))),
        ("lengths sum", ValueError, "expected shape", lambda: cache.append(0, [a, b], on_(k2), on_(k2), [2, 1])),
        ("negative length", ValueError, "non-negative", lambda: cache.append(0, [a, b], on_(k1), on_(k1), [2, -1])),
        ("lengths shape", ValueError, "one count per", lambda: cache.append(0, [a, b], on_(k2), on_(k2), [2])),
        ("float lengths", TypeError, "integer", lambda: cache.append(0, [a], on_(k1), on_(k1), [1.0])),
        ("int tokens", TypeError, "dtype", lambda: cache.append(0, [a], on_(k1.astype(np.int32)), on_(k1))),
        ("layer range", IndexError, "layer", lambda: cache.append(2, [a], on_(k1), on_(k1))),
        (
            "max_seq_len",
            ValueError,
            "max_seq_len",
            lambda: cache.append(0, [a], on_(tokens(rng, 200, cache)), on_(tokens(rng, 200, cache)), [200]),
        ),
        ("reserve too long", ValueError, "max_seq_len", lambda: cache.reserve([a, b], [1, 1000])),
        ("reserve negative", ValueError, "non-negative", lambda: cache.reserve([a], -1)),
        ("reserve duplicates", ValueError, "distinct", lambda: cache.reserve([b, b], 40)),
        ("capacity too long", ValueError, "max_seq_len", lambda: cache.ensure_capacity([a, b], [101, 1000])),
        ("capacity shape", ValueError, "one per sequence", lambda: cache.ensure_capacity([a, b], [120])),
        ("capacity floats", ValueError, "integer lengths", lambda: cache.ensure_capacity([a], [120.0])),
        ("capacity duplicates", ValueError, "distinct", lambda: cache.ensure_capacity([b, b], [120, 120])),
        ("capacity negative", ValueError, "non-negative", lambda: cache.ensure_capacity([a, b], [120, -1])),
        ("fork freed", ValueError, "not live", lambda: cache.fork(freed)),
        ("free twice", ValueError, "not live", lambda: cache.free(freed)),
        ("page_table unknown", ValueError, "not live", lambda: cache.page_table(0, [a, freed])),
        ("dequantize unknown", ValueError, "not live", lambda: cache.dequantize(0, freed)),
        ("seq_lens unknown", ValueError, "expected sequence ids in", lambda: cache.seq_lens(0, [100])),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_every_validation_error_leaves_the_cache_untouched(rng, device):
    cache = make_cache(rng, device, max_seq_len=200, max_pages=40)
    a, b, freed = cache.add_sequence(), cache.add_sequence(), cache.add_sequence()
    x = tokens(rng, 150, cache)
    cache.append(0, [a, b, freed], on(cache, x), on(cache, x), [100, 40, 10])
    cache.append(1, [a], on(cache, tokens(rng, 20, cache)), on(cache, tokens(rng, 20, cache)), [20])
    cache.free(freed)
    for name, error, message, call in _bad_calls(cache, rng, a, b, freed):
        before = snapshot(cache, [a, b])
        with pytest.raises(error, match=message):
            call()
        assert_unchanged(before, cache, [a, b])


@pytest.mark.gpu
def test_cpu_cache_rejects_gpu_input(rng):
    cache = make_cache(rng, "cpu")
    s = cache.add_sequence()
    with pytest.raises(TypeError, match="host"):
        cache.append(0, [s], cupy().zeros((1, 2, 64), np.float32), np.zeros((1, 2, 64), np.float32))


@pytest.mark.parametrize("device", DEVICES)
def test_pool_exhaustion_changes_nothing_and_succeeds_after_a_free(rng, device):
    cache = make_cache(rng, device, max_pages=8)
    a, b = cache.add_sequence(), cache.add_sequence()
    x = tokens(rng, 96, cache)
    cache.append(0, [a, b], on(cache, x), on(cache, x), [64, 32])  # a: 4 blocks, b: 2 blocks
    exhausting = [
        # a needs 2 more blocks and b 2 more: 4 > 2 free.
        lambda: cache.append(0, [a, b], on(cache, x[:64]), on(cache, x[:64]), [32, 32]),
        lambda: cache.reserve([b], 100),
        lambda: cache.ensure_capacity([a, b], [64, 132]),
    ]
    for call in exhausting:
        before = snapshot(cache, [a, b])
        with pytest.raises(PagePoolExhausted):
            call()
        assert_unchanged(before, cache, [a, b])
    assert cache.reserve([b], 32) == 2  # the pool is full now
    before = snapshot(cache, [a, b])
    with pytest.raises(PagePoolExhausted):
        cache.fork(b)  # b's 3 blocks are not full in layer 1, so a fork must copy them
    assert_unchanged(before, cache, [a, b])
    cache.free(b)
    assert cache.stats()["used"] == 4
    cache.append(0, [a], on(cache, x[:48]), on(cache, x[:48]), [48])
    assert cache.stats()["used"] == 7 and cache.seq_len(a) == 112
    assert cache.stats()["failed"] >= 3


def test_constructor_validation(rng):
    cbs = make_codebooks(rng, 2)
    good = dict(num_layers=2, num_kv_heads=2, head_dim=64, codebooks=cbs)
    for change, message in [
        (dict(num_layers=3), "num_layers = 3"),
        (dict(head_dim=128), "head dim"),
        (dict(page_size=24), "page_size"),
        (dict(page_size=512), "page_size"),
        (dict(residual=72), "residual"),
        (dict(page_size=64, residual=32), "residual"),
        (dict(dtype="float64"), "dtype"),
        (dict(max_seqs=0), "max_seqs"),
        (dict(max_pages=0), "max_pages"),
        (dict(num_kv_heads=3, codebooks=make_codebooks(rng, 2, heads=2)), "codebooks per layer"),
    ]:
        with pytest.raises(UnsupportedConfiguration, match=message):
            PagedPQCache(**{**good, **change})
    with pytest.raises(TypeError, match="ModelCodebooks"):
        PagedPQCache(2, 2, 64, object())
    with pytest.raises(ValueError, match="device"):
        PagedPQCache(**good, device="tpu")
    cache = PagedPQCache(**good, max_seqs=3, max_seq_len=1000, page_size=32, residual=64)
    assert cache.max_blocks_per_seq == 32 and cache.num_pages == 3 * 32  # default pool: every slot at full length
    assert cache.page_nbytes == 2 * 2 * 2 * 32 * 16
    assert cache.pool.shape == (cache.num_pages, cache.page_nbytes) and cache.pool.dtype == np.uint8
    assert not cache.is_gpu and cache.dtype == "float16" and cache.M == 16
    assert cache.block_table.shape == (3, 32) and (cache.block_table == -1).all()
    assert cache.residual_k(1).shape == (3, 2, 64, 64) and cache.residual_v(0).dtype == np.float16


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_inputs_of_any_float_dtype_are_converted(rng, device, dtype):
    cache = make_cache(rng, device, dtype=dtype)
    s = cache.add_sequence()
    x = tokens(rng, 40, cache)
    sources = (np.float32, np.float64, np.float16, resolve_dtype("bfloat16"))
    chunks = [x[10 * i : 10 * (i + 1)].astype(src) for i, src in enumerate(sources)]
    for chunk in chunks:
        cache.append(0, [s], on(cache, chunk), on(cache, chunk), [10])
    k, _ = cache.dequantize(0, s)
    # Tokens 0..15 are in a page; 16..39 are residual: each chunk's values in the cache dtype
    # (float32 holds every source value exactly, so converting through it changes nothing).
    want = np.concatenate([c.astype(np.float32) for c in chunks])
    np.testing.assert_array_equal(k[16:], want[16:].astype(resolve_dtype(dtype)).astype(np.float32))
    assert to_numpy(cache.residual_k(0)).dtype == resolve_dtype(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("offset", [0, 1, 2, 4])
def test_inputs_at_any_alignment(rng, device, dtype, offset):
    # Views starting `offset` elements into a buffer make the GPU ring copy fall back to narrower words.
    cache = make_cache(rng, device, dtype=dtype)
    s = cache.add_sequence()
    n = 50
    buf = np.zeros(offset + n * 2 * 64, dtype=resolve_dtype(dtype))
    buf[offset:] = tokens(rng, n, cache).reshape(-1)
    x = on(cache, buf)[offset:].reshape(n, 2, 64)
    cache.append(0, [s], x, x, [n])
    kc, _, rk, rv = contents(cache, 0, s)
    np.testing.assert_array_equal(rk, buf[offset:].reshape(n, 2, 64)[kc.shape[0] :])
    np.testing.assert_array_equal(rv, rk)


# ------------------------------------------------------------------------------------------- stats


@pytest.mark.parametrize("device", DEVICES)
def test_stats_account_for_pages_rings_and_tokens(rng, device):
    cache = make_cache(rng, device, num_layers=2, nh_k=2, d=64, M=16, max_seqs=4)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.append(0, [a, b], on(cache, tokens(rng, 150, cache)), on(cache, tokens(rng, 150, cache)), [100, 50])
    cache.append(1, [a], on(cache, tokens(rng, 100, cache)), on(cache, tokens(rng, 100, cache)), [100])
    st = cache.stats()
    for key in ("total", "used", "free", "high_water", "allocs", "frees", "failed"):
        assert key in st
    assert st["bytes_per_token"] == 2 * 16 * 2 * 2
    assert st["fp16_bytes_per_token"] == 2 * 2 * 64 * 2 * 2
    assert st["compression_ratio"] == 8.0
    pa, pb = pages_of(100, 16, 32), pages_of(50, 16, 32)  # 5 and 2
    used = blocks_of(100, 16) + blocks_of(50, 16)  # 7 and 4
    assert st["used"] == used and st["flushes"] == 2 * pa + pb
    code_bytes = 2 * 2 * 16  # per token per layer
    assert st["pool_utilization"] == pytest.approx((2 * pa + pb) * 16 * code_bytes / (used * cache.page_nbytes))
    assert st["residual_bytes_reserved"] == 2 * 2 * 4 * 2 * 32 * 64 * 2
    res_tokens = (100 - 16 * pa) * 2 + (50 - 16 * pb)
    assert st["residual_bytes_in_use"] == res_tokens * 2 * 2 * 64 * 2
    assert st["sequences"] == 2 and st["tokens"] == 150


# --------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [1, 2])
def test_gpu_and_cpu_caches_agree_token_for_token(rng, heads):
    cbs = make_codebooks(rng, 2, heads=heads)
    cpu, gpu = (make_cache(rng, dev, codebooks=cbs, max_pages=128) for dev in ("cpu", "cuda"))
    for cache in (cpu, gpu):
        for _ in range(3):
            cache.add_sequence()
    fed = {(l, s): ([], []) for l in range(2) for s in range(3)}
    for lens in ([300, 0, 17], [1, 1, 1], [0, 40, 80], [16, 16, 16]):
        for l in (1, 0):
            x, y = tokens(rng, sum(lens), cpu), tokens(rng, sum(lens), cpu)
            for cache in (cpu, gpu):
                cache.append(l, [0, 1, 2], on(cache, x), on(cache, y), lens)
            for s, (start, n) in enumerate(zip(np.cumsum(lens) - lens, lens)):
                fed[l, s][0].append(x[start : start + n])
                fed[l, s][1].append(y[start : start + n])
    for l in range(2):
        for s in range(3):
            kc_c, vc_c, rk_c, rv_c = contents(cpu, l, s)
            kc_g, vc_g, rk_g, rv_g = contents(gpu, l, s)
            np.testing.assert_array_equal(rk_g, rk_c)
            np.testing.assert_array_equal(rv_g, rv_c)
            paged = kc_c.shape[0]
            x, y = (exact(np.concatenate(parts))[:paged] for parts in fed[l, s])
            np.testing.assert_array_equal(kc_c, reference_codes(x, cpu.key_centroids(l)))
            np.testing.assert_array_equal(vc_c, reference_codes(y, cpu.value_centroids(l)))
            assert_codes_match(kc_g, x, gpu.key_centroids(l))
            assert_codes_match(vc_g, y, gpu.value_centroids(l))
    assert cpu.stats()["flushes"] == gpu.stats()["flushes"]
    for a, b in zip(cpu.page_table(0, [2, 0, 1]), gpu.page_table(0, [2, 0, 1])):
        np.testing.assert_array_equal(to_numpy(b), a)


@pytest.mark.gpu
def test_gpu_codes_match_reference_up_to_near_ties(rng):
    cache = make_cache(rng, "cuda", max_pages=128)
    s = cache.add_sequence()
    x = cupy().asarray(tokens(rng, 500, cache))
    y = cupy().asarray(tokens(rng, 500, cache))
    cache.append(0, [s], x, y, [500])
    kc, vc, rk, _ = contents(cache, 0, s)
    paged = kc.shape[0]
    assert_codes_match(kc, exact(to_numpy(x))[:paged], cache.key_centroids(0))
    assert_codes_match(vc, exact(to_numpy(y))[:paged], cache.value_centroids(0))
    np.testing.assert_array_equal(rk, exact(to_numpy(x))[paged:])


@pytest.mark.gpu
def test_gpu_decode_step_appends_do_not_synchronise_the_allocator(rng):
    cache = make_cache(rng, "cuda", max_pages=256, max_seqs=8)
    seqs = [cache.add_sequence() for _ in range(8)]
    cp = cupy()
    syncs = cache.allocator._syncs
    for _ in range(100):  # crosses several page boundaries per sequence
        for l in range(2):
            x = cp.asarray(tokens(rng, 8, cache))
            cache.append(l, seqs, x, x)
    assert cache.allocator._syncs == syncs
    assert cache.stats()["used"] == 8 * blocks_of(100, 16)


# ------------------------------------------------------------------------------- exact caches


def make_exact_cache(device="cpu", *, num_layers=2, nh_k=2, d=64, dtype="float16", **kw):
    kw.setdefault("page_size", 16)
    kw.setdefault("max_seqs", 8)
    kw.setdefault("max_seq_len", 4096)
    kw.setdefault("max_pages", 256)
    return PagedPQCache(num_layers, nh_k, d, None, dtype=dtype, device=device, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_an_exact_cache_stores_every_token_in_its_pages(rng, device, dtype):
    """codebooks=None: each token's rows land, bit for bit, in row t % P of its block's page in the documented
    (page, [layer][kind][head], P, d) layout, however the tokens were split across appends; no ring."""
    cache = make_exact_cache(device, dtype=dtype)
    P, dt = cache.page_size, resolve_dtype(dtype)
    assert not cache.quantized and cache.M is None and cache.residual == P and cache.codebooks is None
    assert cache.page_nbytes == 2 * 2 * 2 * P * 64 * dt.itemsize
    assert cache.residual_k(0).shape == (8, 2, 0, 64)
    a, b = cache.add_sequence(), cache.add_sequence()
    n = {a: 0, b: 0}
    kept = {(layer, s): ([], []) for layer in range(2) for s in (a, b)}
    for counts in ([3, P], [P - 3, 1], [0, 2 * P + 5], [P + 1, 0], [1, 1]):
        for layer in range(2):
            k, v = tokens(rng, sum(counts), cache).astype(dt), tokens(rng, sum(counts), cache).astype(dt)
            cache.append(layer, [a, b], on(cache, k), on(cache, v), lengths=counts)
            kept[layer, a][0].append(k[: counts[0]]), kept[layer, a][1].append(v[: counts[0]])
            kept[layer, b][0].append(k[counts[0]:]), kept[layer, b][1].append(v[counts[0]:])
        n[a] += counts[0]
        n[b] += counts[1]
    pool = to_numpy(cache.pool)
    table = to_numpy(cache.block_table)
    for (layer, s), (ks, vs) in kept.items():
        k_all, v_all = np.concatenate(ks), np.concatenate(vs)
        assert cache.seq_len(s, layer) == n[s] == k_all.shape[0]
        k_got, v_got = cache.dequantize(layer, s)
        np.testing.assert_array_equal(k_got, k_all.astype(np.float32))
        np.testing.assert_array_equal(v_got, v_all.astype(np.float32))
        for kind, x in ((0, k_all), (1, v_all)):  # the documented byte layout, read from the raw pool
            t = np.arange(n[s])
            page_bytes = pool[table[s, t // P]]  # (n, page_nbytes)
            section = page_bytes[:, cache.code_offset(layer, kind):].view(dt)[:, : 2 * P * 64].reshape(-1, 2, P, 64)
            np.testing.assert_array_equal(section[t, :, t % P], x)
    st = cache.stats()
    assert st["compression_ratio"] == pytest.approx(2 / dt.itemsize) and st["residual_bytes_in_use"] == 0


@pytest.mark.parametrize("device", DEVICES)
def test_an_exact_cache_forks_frees_and_decodes_the_exact_attention(rng, device):
    cache = make_exact_cache(device)
    a = cache.add_sequence()
    k, v = tokens(rng, 40, cache), tokens(rng, 40, cache)
    for layer in range(2):
        cache.append(layer, [a], on(cache, k), on(cache, v), lengths=[40])
    child = cache.fork(a)  # two full pages shared, the partly filled third copied
    table = to_numpy(cache.block_table)
    np.testing.assert_array_equal(table[child, :2], table[a, :2])
    assert table[child, 2] != table[a, 2]
    extra = tokens(rng, 1, cache)
    for layer in range(2):
        cache.append(layer, [child], on(cache, extra), on(cache, extra))
    np.testing.assert_array_equal(cache.dequantize(0, a)[0], k.astype(np.float16).astype(np.float32))
    q = rng.standard_normal((2, 4, 64)).astype(np.float16)
    import million_cupy as mc

    out = to_numpy(mc.decode(cache, 1, [a, child], on(cache, q))).astype(np.float64)
    kc = np.concatenate([k, extra]).astype(np.float16).astype(np.float64)
    vc = np.concatenate([v, extra]).astype(np.float16).astype(np.float64)
    want, _ = reference.decode_attention(q.astype(np.float64), [k.astype(np.float16).astype(np.float64), kc],
                                         [v.astype(np.float16).astype(np.float64), vc])
    assert reference.relative_error(out, want) < 2e-3
    used = cache.stats()["used"]
    cache.free(child)
    assert cache.stats()["used"] == used - 1  # only its copied page goes back; the shared ones stay with a


def test_an_exact_cache_refuses_what_only_codes_have(rng):
    with pytest.raises(UnsupportedConfiguration, match="residual = page_size"):
        make_exact_cache(residual=32)
    with pytest.raises(ValueError, match="expected 'cuda' or 'cpu' .* got None"):
        PagedPQCache(2, 2, 64, None)
    with pytest.raises(TypeError, match="ModelCodebooks"):
        PagedPQCache(2, 2, 64, "codebooks", device="cpu")
    cache = make_exact_cache()
    assert cache.M is None and cache.codebooks is None
    for name, call in (("k_codes", lambda: cache.k_codes(0)), ("v_codes", lambda: cache.v_codes(0)),
                       ("key_centroids", lambda: cache.key_centroids(0)),
                       ("value_centroids", lambda: cache.value_centroids(0)),
                       ("page_table", lambda: cache.page_table(0, []))):
        with pytest.raises(UnsupportedConfiguration, match=rf"^{name}: this cache is exact .* k_pages / v_pages"):
            call()
    with pytest.raises(UnsupportedConfiguration, match="PQ cache stores codes"):
        make_cache(rng).k_pages(0)


def test_append_status_bits_mirror_the_kernels_flag_bytes():
    """The host reads the append kernel's four flag bytes as one little-endian int32: each Python bit must be
    its CUDA byte index times 8 (a drift would hide a device guard)."""
    import re

    from million_cupy import cache, kernels

    source = (kernels.source_dir() / cache.APPEND_SOURCE).read_text()
    for name in ("STALE_SLOT", "NO_PAGE", "NON_FINITE"):
        byte = int(re.search(rf"constexpr int STATUS_{name} = (\d+);", source).group(1))
        assert getattr(cache, f"APPEND_STATUS_{name}") == 1 << (8 * byte), name


# ------------------------------------------------------------------------------------------ truncate


def assert_same_sequence(a, sa, b, sb):
    """Sequence ``sa`` of cache ``a`` and ``sb`` of ``b`` hold the same tokens in every layer: lengths, PQ pages
    decoded and exact window rows."""
    for layer in range(a.num_layers):
        assert a.seq_len(sa, layer) == b.seq_len(sb, layer)
        for x, y in zip(a.dequantize(layer, sa), b.dequantize(layer, sb)):
            np.testing.assert_array_equal(x, y)


def append_all(cache, seq, x, chunks):
    """Append tokens ``x`` ``(T, nh_k, d)`` to every layer of ``seq`` in appends of ``chunks`` tokens."""
    start = 0
    for n in chunks:
        for layer in range(cache.num_layers):
            cache.append(layer, [seq], on(cache, x[start : start + n]), on(cache, x[start : start + n]),
                         lengths=[n])
        start += n
    assert start == x.shape[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("history,drafts,kept", [
    ([40, 1, 1, 1], 8, 3),      # drafts cross the flush at 48 tokens, 5 dropped
    ([30], 9, 0),               # all 9 dropped (max_rollback + 1), the window had left the first page
    ([100, 1], 6, 6),           # nothing dropped
    ([16, 16, 15], 4, 1),       # a window exactly full before the drafts
    ([30], 20, 5),              # kept drafts that their own append put in a full page (30, 31) are exact again
])
def test_truncate_leaves_what_a_cache_never_given_the_drafts_holds(rng, device, history, drafts, kept):
    # Speculative verification: drafts appended in one call, the rejected ones truncated. The cache must then
    # equal one that got only the kept tokens, and stay equal as both go on (the ring slots of the dropped tokens
    # are written again, blocks of the dropped tokens are reused).
    books = make_codebooks(rng)
    a = make_cache(rng, device, codebooks=books, max_rollback=8)
    b = make_cache(rng, device, codebooks=books, max_rollback=8)
    assert a.ring_slots == a.residual + 8 == a.residual_k(0).shape[2]
    n = sum(history)
    x = tokens(rng, n + drafts, a)
    sa, sb = a.add_sequence(), b.add_sequence()
    append_all(a, sa, x, history + [drafts])
    a.truncate(sa, n + kept)
    append_all(b, sb, x[: n + kept], history + ([kept] if kept else []))
    assert_same_sequence(a, sa, b, sb)
    more = tokens(rng, 40, a)
    append_all(a, sa, more, [3, 1, 36])
    append_all(b, sb, more, [3, 1, 36])
    assert_same_sequence(a, sa, b, sb)
    # The attention kernels read rings of R + max_rollback slots: decode, and the last 4 tokens as new ones.
    from million_cupy import decode, prefill_attention  # noqa: PLC0415

    q = on(a, rng.standard_normal((1, 4, a.head_dim)).astype(a.array_dtype))
    q4 = on(a, rng.standard_normal((4, 4, a.head_dim)).astype(a.array_dtype))
    for layer in range(a.num_layers):
        np.testing.assert_array_equal(to_numpy(decode(a, layer, [sa], q)), to_numpy(decode(b, layer, [sb], q)))
        np.testing.assert_array_equal(to_numpy(prefill_attention(a, layer, [sa], q4, [0, 4])),
                                      to_numpy(prefill_attention(b, layer, [sb], q4, [0, 4])))


@pytest.mark.parametrize("device", DEVICES)
def test_truncate_beyond_the_ring_raises_and_changes_nothing(rng, device):
    # P = 16, R = 32, max_rollback = 8: 40 ring slots. At 105 tokens held, 95 tokens would need the window
    # [64, 95), but the ring holds [65, 105): refused, with the shortest length that works (96).
    cache = make_cache(rng, device, max_rollback=8)
    s = cache.add_sequence()
    x = tokens(rng, 105, cache)
    append_all(cache, s, x, [100, 5])
    before = [cache.dequantize(layer, s) for layer in range(cache.num_layers)]
    with pytest.raises(ValueError, match=r"can go back to 96 tokens, not 95"):
        cache.truncate(s, 95)
    assert cache.seq_len(s) == 105
    for layer in range(cache.num_layers):
        for x0, x1 in zip(before[layer], cache.dequantize(layer, s)):
            np.testing.assert_array_equal(x0, x1)
    # Two truncates count from the most the sequence held: 100 works, then 95 is still refused.
    cache.truncate(s, 100)
    with pytest.raises(ValueError, match=r"held up to 105 tokens .* can go back to 96"):
        cache.truncate(s, 95)
    cache.truncate(s, 96)
    assert cache.seq_len(s, 1) == 96
    with pytest.raises(ValueError, match="non-negative"):
        cache.truncate(s, -1)
    with pytest.raises(ValueError):
        cache.truncate(7, 10)  # not a live sequence
    cache.truncate(s, 200)  # longer than held: nothing to drop
    assert cache.seq_len(s) == 96
    # Several sequences in one call: all, or (one refused) none.
    t = cache.add_sequence()
    append_all(cache, t, tokens(rng, 50, cache), [50])
    with pytest.raises(ValueError, match=f"sequence {s} held up to 105"):
        cache.truncate([t, s], [45, 90])
    assert cache.seq_lens(0, [t, s]).tolist() == [50, 96]
    cache.truncate([t, s], [45, 96])
    assert cache.seq_lens(1, [t, s]).tolist() == [45, 96]
    with pytest.raises(ValueError, match="distinct"):
        cache.truncate([t, t], 40)
    with pytest.raises(UnsupportedConfiguration, match="max_rollback"):
        make_cache(rng, device, max_rollback=-1)


@pytest.mark.parametrize("device", DEVICES)
def test_truncate_into_blocks_shared_with_a_fork_copies_them(rng, device):
    # A fork shares the parent's 5 full pages (tokens [0, 80)). The parent drops back to 70 tokens and appends
    # other tokens: block 4 (tokens 64-79) must be the parent's own copy by then, or the child's tokens change.
    books = make_codebooks(rng)
    cache = make_cache(rng, device, codebooks=books, max_rollback=32)
    fresh = make_cache(rng, device, codebooks=books, max_rollback=32)
    parent = cache.add_sequence()
    x = tokens(rng, 100, cache)
    append_all(cache, parent, x, [100])
    child = cache.fork(parent)
    child_before = [cache.dequantize(layer, child) for layer in range(cache.num_layers)]
    used = cache.stats()["used"]
    cache.truncate(parent, 70)
    assert cache.stats()["used"] == used + 1  # block 4 copied; blocks 0-3 stay shared
    y = tokens(rng, 30, cache)
    append_all(cache, parent, y, [30])
    for layer in range(cache.num_layers):
        for x0, x1 in zip(child_before[layer], cache.dequantize(layer, child)):
            np.testing.assert_array_equal(x0, x1)
    s = fresh.add_sequence()
    append_all(fresh, s, np.concatenate([x[:70], y]), [70, 30])
    assert_same_sequence(cache, parent, fresh, s)


@pytest.mark.parametrize("device", DEVICES)
def test_an_exact_cache_truncates_by_any_amount(rng, device):
    kw = dict(page_size=16, residual=16, max_seqs=4, max_seq_len=512, max_pages=64, device=device)
    a, b = PagedPQCache(2, 2, 64, None, **kw), PagedPQCache(2, 2, 64, None, **kw)
    assert a.ring_slots == 0
    sa, sb = a.add_sequence(), b.add_sequence()
    x = tokens(rng, 120, a)
    append_all(a, sa, x, [100, 20])
    a.truncate(sa, 37)
    append_all(b, sb, x[:37], [37])
    assert_same_sequence(a, sa, b, sb)


# ------------------------------------------------------------------------------------- planned appends


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_rollback", [0, 8])
def test_a_planned_append_stores_what_append_stores(rng, device, max_rollback):
    # Ragged counts (none, one, a chunk crossing flushes, more than the ring holds) over histories of 0 to 47
    # tokens, layers appended in any order: every layer equals a cache given the same tokens by append().
    books = make_codebooks(rng, 3)
    a = make_cache(rng, device, num_layers=3, codebooks=books, max_rollback=max_rollback)
    b = make_cache(rng, device, num_layers=3, codebooks=books, max_rollback=max_rollback)
    history = [0, 5, 47, 16]
    seqs_a = [a.add_sequence() for _ in history]
    seqs_b = [b.add_sequence() for _ in history]
    x = tokens(rng, sum(history), a)
    for layer in range(3):
        a.append(layer, seqs_a, on(a, x), on(a, x), history)
        b.append(layer, seqs_b, on(b, x), on(b, x), history)
    for counts in ([3, 0, 2, 1], [1, 1, 1, 1], [70, 9, 17, 0], [0, 0, 0, 0]):
        total = sum(counts)
        k = [tokens(rng, total, a) for _ in range(3)]
        v = [tokens(rng, total, a) for _ in range(3)]
        plan = a.plan_append(seqs_a, counts)
        assert plan.tokens == total and plan.layers == (0, 1, 2) and plan.layers_left == {0, 1, 2}
        np.testing.assert_array_equal(plan.end - plan.start, counts)
        for layer in (2, 0, 1):
            plan.append(layer, on(a, k[layer]), on(a, v[layer]))
            b.append(layer, seqs_b, on(b, k[layer]), on(b, v[layer]), counts)
            assert a.seq_lens(layer, seqs_a).tolist() == b.seq_lens(layer, seqs_b).tolist()
        assert not plan.layers_left
        for sa, sb in zip(seqs_a, seqs_b):
            assert_same_sequence(a, sa, b, sb)
            for layer in range(3):
                assert_same_contents(contents(a, layer, sa), contents(b, layer, sb))
    stats_a, stats_b = a.stats(), b.stats()
    for key in ("used", "flushes", "tokens", "residual_bytes_in_use", "non_finite_appended"):
        assert stats_a[key] == stats_b[key], key


@pytest.mark.parametrize("device", DEVICES)
def test_planned_append_refusals_change_nothing(rng, device):
    from million_cupy.errors import MillionError  # noqa: PLC0415

    cache = make_cache(rng, device, max_seq_len=200, max_pages=12)
    a, b, c = cache.add_sequence(), cache.add_sequence(), cache.add_sequence()
    x = tokens(rng, 25, cache)
    for layer in range(2):
        cache.append(layer, [a, b], on(cache, x), on(cache, x), [20, 5])
    cache.append(0, [c], on(cache, x[:3]), on(cache, x[:3]), [3])  # c: 3 tokens in layer 0, none in layer 1
    seven = on(cache, tokens(rng, 7, cache))
    plan = cache.plan_append([a, b], [3, 4])
    wrong = [
        ("shape", ValueError, "shape", lambda: plan.append(0, seven[:6], seven[:6])),
        ("dtype", TypeError, "dtype", lambda: plan.append(0, seven.astype(np.int32), seven)),
        ("layer range", IndexError, "layer", lambda: plan.append(2, seven, seven)),
        ("unequal layers", ValueError, "equal lengths", lambda: cache.plan_append([a, c], 1)),
        ("unequal listed layers", ValueError, r"\[0, 3\] tokens in layers \[1, 0\]",
         lambda: cache.plan_append([b, c], 1, layers=[1, 0])),
        ("no layers", ValueError, "distinct layers", lambda: cache.plan_append([a], 1, layers=[])),
        ("repeated layers", ValueError, "distinct layers", lambda: cache.plan_append([a], 1, layers=[1, 1])),
        ("max_seq_len", ValueError, "max_seq_len", lambda: cache.plan_append([a], 190)),
        ("repeated ids", ValueError, "distinct", lambda: cache.plan_append([a, a], 1)),
        ("pool", PagePoolExhausted, "nothing changed", lambda: cache.plan_append([a, b], [100, 100])),
    ]
    for name, error, message, call in wrong:
        before = snapshot(cache, [a, b, c])
        with pytest.raises(error, match=message):
            call()
        assert_unchanged(before, cache, [a, b, c])
    plan.append(0, seven, seven)
    assert cache.seq_lens(0, [a, b]).tolist() == [23, 9] and cache.seq_lens(1, [a, b]).tolist() == [20, 5]
    before = snapshot(cache, [a, b, c])
    with pytest.raises(MillionError, match="appended already"):
        plan.append(0, seven, seven)
    assert_unchanged(before, cache, [a, b, c])
    only_one = cache.plan_append([c], 1, layers=[0])
    with pytest.raises(MillionError, match="not in the plan"):
        only_one.append(1, seven[:1], seven[:1])
    cache.append(1, [b], seven[:4], seven[:4], [4])  # layer 1 of b moved on without the plan
    before = snapshot(cache, [a, b, c])
    with pytest.raises(MillionError, match="expects sequence 1 to hold 5 tokens, it holds 9"):
        plan.append(1, seven, seven)
    assert_unchanged(before, cache, [a, b, c])
    cache.free(c)
    before = snapshot(cache, [a, b])
    with pytest.raises(MillionError, match="freed or replaced"):
        only_one.append(0, seven[:1], seven[:1])
    assert_unchanged(before, cache, [a, b])


@pytest.mark.parametrize("device", DEVICES)
def test_a_planned_append_stores_and_flags_non_finite_tokens(rng, device):
    cache = make_cache(rng, device)
    s = cache.add_sequence()
    x = tokens(rng, 40, cache)
    x[7, 1, 3] = np.nan
    plan = cache.plan_append([s], 40)
    plan.append(0, on(cache, x), on(cache, x))
    plan.append(1, on(cache, x), on(cache, x))
    assert cache.seq_len(s, 1) == 40 and cache.stats()["non_finite_appended"]


@pytest.mark.parametrize("device", DEVICES)
def test_a_planned_commit_counts_the_tokens_and_a_fixed_buffer_is_checked(rng, device):
    # commit() counts a plan's tokens in the layers a replayed CUDA graph writes (here nothing does), with the
    # checks of append(); `into` must be a device int32 buffer large enough, and a plan made into one appends
    # what cache.append stores.
    from million_cupy.errors import MillionError  # noqa: PLC0415

    books = make_codebooks(rng, 3)
    cache = make_cache(rng, device, num_layers=3, codebooks=books)
    a, b = cache.add_sequence(), cache.add_sequence()
    plan = cache.plan_append([a, b], [3, 20])
    flushes = cache.stats()["flushes"]
    plan.commit([1])
    assert cache.lengths[:, [a, b]].tolist() == [[0, 0], [3, 20], [0, 0]] and plan.layers_left == {0, 2}
    assert cache.stats()["flushes"] == flushes + plan.flushed
    before = snapshot(cache, [a, b])
    for call, message in ((lambda: plan.commit([1]), "layer 1 was appended already"),
                          (lambda: plan.append(1, on(cache, tokens(rng, 23, cache)), on(cache, tokens(rng, 23, cache))),
                           "appended already"),
                          (lambda: plan.commit([0, 0]), "distinct layers")):
        with pytest.raises((MillionError, ValueError), match=message):
            call()
        assert_unchanged(before, cache, [a, b])
    plan.commit()
    assert cache.lengths[:, [a, b]].tolist() == [[3, 20]] * 3 and not plan.layers_left
    plan.commit()  # nothing left: nothing to do
    other = cache.plan_append([a], 2, layers=[0, 2])
    with pytest.raises(MillionError, match="is not in the plan"):
        other.commit([1])
    cache.truncate([a], 2)
    with pytest.raises(MillionError, match="expects sequence 0 to hold 3 tokens, it holds 2"):
        other.commit()
    assert cache.lengths[:, a].tolist() == [2, 2, 2]

    x = tokens(rng, 9, cache)
    if device == "cpu":
        with pytest.raises(ValueError, match="GPU cache"):
            cache.plan_append([a], 9, into=np.zeros(64, dtype=np.int32))
        return
    import cupy as cp  # noqa: PLC0415

    before = snapshot(cache, [a, b])
    for bad, got in ((cp.zeros(35, dtype=cp.int32), "dtype int32, 35 elements"),
                     (cp.zeros(64, dtype=cp.int64), "dtype int64, 64 elements"),
                     (cp.zeros((64, 2), dtype=cp.int32)[:, 0], "not C-contiguous"),
                     (np.zeros(64, dtype=np.int32), "got ndarray")):
        with pytest.raises(ValueError, match=f"at least 36 elements .*{got}"):
            cache.plan_append([a], 9, into=bad)
        assert_unchanged(before, cache, [a, b])
    twin = make_cache(rng, device, num_layers=3, codebooks=books)
    fresh = make_cache(rng, device, num_layers=3, codebooks=books)
    fa, fb = fresh.add_sequence(), fresh.add_sequence()
    ta, tb = twin.add_sequence(), twin.add_sequence()
    buffer = cp.full(64, -7, dtype=cp.int32)
    fixed = fresh.plan_append([fa, fb], [4, 5], into=buffer)
    assert fixed.fixed and fixed.device_meta is buffer
    np.testing.assert_array_equal(cp.asnumpy(buffer[: 4 * 9]).reshape(9, 4), fixed.meta)
    assert (cp.asnumpy(buffer[36:]) == -7).all()
    for layer in range(3):
        fixed.append(layer, on(fresh, x), on(fresh, x))
        twin.append(layer, [ta, tb], on(twin, x), on(twin, x), [4, 5])
    for sa, sb in ((fa, ta), (fb, tb)):
        assert_same_sequence(fresh, sa, twin, sb)
        for layer in range(3):
            assert_same_contents(contents(fresh, layer, sa), contents(twin, layer, sb))


# ------------------------------------------------------------------------------------------ randomized model


class CacheModel:
    """What a PQ cache must hold, kept independently of it: per live sequence and layer the exact K and V rows and
    their reconstructions through the layer's codebooks (what a row reads back as once in a full page), and the most
    tokens each layer held since the sequence started (what bounds a truncate, see PagedPQCache.truncate)."""

    def __init__(self, cache, codebooks):
        self.cache = cache
        self.books = codebooks.to_cpu()
        self.rows: dict[int, list[list[np.ndarray]]] = {}  # [k, v, k reconstructed, v reconstructed] per layer
        self.high: dict[int, np.ndarray] = {}

    def tokens(self, rng, layer, n):
        """K and V rows ``(n, nh_k, d)`` float32 within 1e-3 of a centroid in every subspace, so that any encoder
        (the GPU's fp32 distances, the float64 reference) picks that centroid."""
        out = []
        for (book,) in (self.books.key_codebooks(layer), self.books.value_codebooks(layer)):
            cent = to_numpy(book.centroids).astype(np.float32)  # (M, 256, dsub)
            M, _, dsub = cent.shape
            codes = rng.integers(0, 256, (n, self.cache.num_kv_heads, M))
            rows = cent[np.arange(M), codes].reshape(n, self.cache.num_kv_heads, M * dsub)
            rows = rows + 1e-3 * rng.standard_normal(rows.shape)
            out.append(rows.astype(self.cache.array_dtype).astype(np.float32))  # what the cache dtype holds
        return out

    def start(self, seq, like=None):
        L, shape = self.cache.num_layers, (0, self.cache.num_kv_heads, self.cache.head_dim)
        self.rows[seq] = [[a.copy() for a in self.rows[like][l]] if like is not None else
                          [np.zeros(shape, np.float32) for _ in range(4)] for l in range(L)]
        self.high[seq] = self.high[like].copy() if like is not None else np.zeros(L, np.int64)

    def lengths(self, seq):
        return np.array([rows[0].shape[0] for rows in self.rows[seq]])

    def append(self, layer, seq, k, v):
        books = (self.books.key_codebooks(layer), self.books.value_codebooks(layer))
        new = [k, v, *(book.decode(book.encode(x)).astype(np.float32) for (book,), x in zip(books, (k, v)))]
        self.rows[seq][layer] = [np.concatenate([old, x]) for old, x in zip(self.rows[seq][layer], new)]
        self.high[seq][layer] = max(self.high[seq][layer], self.rows[seq][layer][0].shape[0])

    def truncate(self, seq, length):
        self.rows[seq] = [[a[:length] for a in rows] for rows in self.rows[seq]]

    def expected(self, layer, seq):
        """(k, v) as dequantize gives them: tokens in full pages through their codebooks, the window exact."""
        k, v, k_pq, v_pq = self.rows[seq][layer]
        paged = int(self.cache.full_pages(k.shape[0])) * self.cache.page_size
        return [np.concatenate([pq[:paged], x[paged:]]) for x, pq in ((k, k_pq), (v, v_pq))]

    def attention(self, layer, seqs, q, counts):
        """float64 causal attention of ``q`` ``(sum(counts), nh, d)``: row ``j`` of sequence ``seqs[b]``'s
        ``counts[b]`` new tokens (its last) over the first ``n - counts[b] + j + 1`` of its dequantized tokens."""
        nh, d = q.shape[1], q.shape[2]
        kv_head = np.arange(nh) // (nh // self.cache.num_kv_heads)
        out, row = np.empty(q.shape), 0
        for seq, c in zip(seqs, counts):
            k, v = (x.astype(np.float64)[:, kv_head] for x in self.expected(layer, seq))  # (n, nh, d)
            for j in range(c):
                end = k.shape[0] - c + j + 1
                scores = np.einsum("thd,hd->ht", k[:end], q[row].astype(np.float64)) / np.sqrt(d)
                w = np.exp(scores - scores.max(axis=1, keepdims=True))
                out[row] = np.einsum("ht,thd->hd", w, v[:end]) / w.sum(axis=1)[:, None]
                row += 1
        return out

    def check(self, what, seqs=None):
        """The cache against the model: the contents of ``seqs`` (default: every live sequence), and the pages."""
        cache = self.cache
        live = sorted(self.rows)
        assert cache.stats()["sequences"] == len(live), what
        for seq in live if seqs is None else sorted(set(seqs) & set(live)):
            for layer in range(cache.num_layers):
                assert cache.seq_len(seq, layer) == self.rows[seq][layer][0].shape[0], (what, seq, layer)
                got = cache.dequantize(layer, seq)
                for g, e, kind in zip(got, self.expected(layer, seq), "kv"):
                    # exact on the CPU; a GPU decode may round differently in the last bit
                    np.testing.assert_allclose(g, e, rtol=0, atol=1e-6 if cache.is_gpu else 0,
                                               err_msg=f"{what}: sequence {seq}, layer {layer}, {kind}")
        # Every page in use is reachable from a live sequence's blocks; nothing leaked.
        blocks = cache.allocated_blocks(live) if live else np.zeros(0, np.int64)
        table = to_numpy(cache.block_table)
        pages = {int(p) for s, n in zip(live, blocks) for p in table[s, :n]}
        assert -1 not in pages and cache.stats()["used"] == len(pages), what


def run_storm(device, seed, max_rollback, max_pages, seen):
    """120 random operations on a small cache, checked against CacheModel after each; counts in ``seen`` the
    refusals by kind and the truncates that copied blocks a fork shared."""
    rng = np.random.default_rng(1000 + seed)
    books = make_codebooks(rng, num_layers=2, M=16, d=64)
    cache = make_cache(rng, device, num_layers=2, nh_k=2, d=64, M=16, codebooks=books, page_size=16, residual=32,
                       max_rollback=max_rollback, max_seqs=8, max_pages=max_pages, max_seq_len=400, dtype="float16")

    def truncate(seq, target):
        allocs = cache.stats()["allocs"]
        cache.truncate(seq, target)
        model.truncate(seq, target)
        if cache.stats()["allocs"] > allocs:  # only copies of shared blocks allocate in a truncate
            seen["truncate copied shared blocks"] = seen.get("truncate copied shared blocks", 0) + 1

    model = CacheModel(cache, books)
    counts = {"append": 0, "verify": 0, "decode": 0, "fork": 0, "truncate": 0, "branch": 0, "free": 0}
    decode_step = None  # a GPU cache's DecodeStep, kept across the run's decode steps (its reservations, its schedules)
    for step in range(120):
        live = sorted(model.rows)
        op = rng.choice(["add", "append", "verify", "decode", "fork", "truncate", "branch", "free"],
                        p=[.06, .24, .12, .08, .08, .14, .12, .16])
        what = f"step {step}: {op}"
        if op == "add" or not live:
            if len(live) < cache.max_seqs:
                model.start(cache.add_sequence())
            continue
        seqs = rng.choice(live, size=int(rng.integers(1, len(live) + 1)), replace=False)
        if op in ("verify", "decode"):  # a step plans sequences whose layers hold equal lengths
            seqs = np.array([s for s in seqs if len(set(model.lengths(s))) == 1], np.int64)
            if not seqs.size:
                continue
        room = [cache.max_seq_len - int(model.lengths(s).max()) for s in seqs]
        new = [int(min(r, rng.choice([0, 1, 3, 17, 40, 64]))) for r in room]
        at = np.cumsum([0] + new)
        try:
            if op == "append":  # mostly a whole step (every layer in turn), at times one layer only
                layers = range(cache.num_layers) if rng.random() < 0.6 else [int(rng.integers(cache.num_layers))]
                for layer in layers:
                    k, v = model.tokens(rng, layer, sum(new))
                    cache.append(layer, seqs, on(cache, k), on(cache, v), lengths=new)
                    for i, s in enumerate(seqs):
                        model.append(layer, int(s), k[at[i]:at[i + 1]], v[at[i]:at[i + 1]])
            elif op == "verify":  # a verification step: per layer, the new tokens' append, then their attention
                new = [max(1, min(c, 8)) if r else 0 for c, r in zip(new, room)]  # drafts: 1-8 per sequence
                at = np.cumsum([0] + new)
                if cache.is_gpu:  # the wrapper's own appends (plan reserves the pages)
                    wrapper = BatchPrefillWrapper(cache, 4)
                    wrapper.plan(seqs, at)
                else:
                    plan = cache.plan_append(seqs, new)
                for layer in range(cache.num_layers):
                    k, v = model.tokens(rng, layer, sum(new))
                    q = queries(rng, cache, sum(new))
                    if cache.is_gpu:
                        wrapper.append(layer, on(cache, k), on(cache, v))
                        got = wrapper.run(layer, on(cache, q))
                    else:
                        plan.append(layer, k, v)
                        got = mc.prefill_attention(cache, layer, seqs, q, at)
                    for i, s in enumerate(seqs):
                        model.append(layer, int(s), k[at[i]:at[i + 1]], v[at[i]:at[i + 1]])
                    check_attention(cache, model, layer, [int(s) for s in seqs], q, new, got, what)
            elif op == "decode":  # one to three decode steps: per layer one token's append, then its attention
                for _ in range(int(rng.integers(1, 4))):
                    if cache.is_gpu:
                        decode_step = decode_step or DecodeStep(cache, 4, horizon=16)
                        decode_step.plan(seqs)
                    for layer in range(cache.num_layers):
                        k, v = model.tokens(rng, layer, len(seqs))
                        q = queries(rng, cache, len(seqs))
                        if cache.is_gpu:
                            decode_step.append(layer, *(on(cache, x.astype(cache.array_dtype)) for x in (k, v)))
                            got = decode_step.run(layer, on(cache, q))
                        else:
                            cache.append(layer, seqs, k, v)
                            got = mc.decode(cache, layer, seqs, q)
                        for i, s in enumerate(seqs):
                            model.append(layer, int(s), k[i:i + 1], v[i:i + 1])
                        check_attention(cache, model, layer, [int(s) for s in seqs], q, [1] * len(seqs), got, what)
            elif op == "fork":
                src = int(seqs[0])
                model.start(cache.fork(src), like=src)
            elif op == "branch":  # a fork, then the source drops up to max_rollback tokens and takes others
                src = int(seqs[0])
                child = cache.fork(src)
                model.start(child, like=src)
                seqs = [src, child]
                truncate(src, max(0, int(model.lengths(src).max()) - int(rng.integers(1, max_rollback + 1))))
                for layer in range(cache.num_layers):
                    k, v = model.tokens(rng, layer, new[0])
                    cache.append(layer, [src], on(cache, k), on(cache, v), lengths=new[:1])
                    model.append(layer, src, k, v)
            elif op == "truncate":
                s = int(seqs[0])
                cur = model.lengths(s)
                target = int(rng.integers(max(0, cur.max() - 2 * max_rollback - 8), cur.max() + 1))
                served = all(target >= max(h, c) - cache.max_rollback for h, c in zip(model.high[s], cur) if c > target)
                try:
                    truncate(s, target)
                except ValueError:
                    assert not served, f"{what}: truncate({s}, {target}) within max_rollback of {model.high[s]} refused"
                    raise
            else:
                s = int(seqs[0])
                cache.free(s)
                del model.rows[s], model.high[s]
            counts[op] += 1
        except (PagePoolExhausted, SequenceSlotsExhausted, ValueError) as exc:
            seen[f"{op}: {type(exc).__name__}"] = seen.get(f"{op}: {type(exc).__name__}", 0) + 1
        model.check(what, None if step % 10 == 9 else [int(s) for s in seqs])
        if step % 4 == 3:
            attend(cache, model, rng, what, seen)
    assert min(counts.values()) > 0, counts  # every kind of operation ran
    for s in sorted(model.rows):
        cache.free(s)
    assert cache.stats()["used"] == 0 and cache.stats()["sequences"] == 0


def queries(rng, cache, n, num_heads=4):
    """``n`` random query rows ``(n, num_heads, d)``: the cache dtype on a GPU (what its kernels take), float32 on
    the CPU (whose float64 reference then matches the model to rounding)."""
    return rng.standard_normal((n, num_heads, cache.head_dim)).astype(cache.array_dtype if cache.is_gpu else np.float32)


def check_attention(cache, model, layer, seqs, q, counts, got, what):
    """The library's attention ``got`` against float64 attention over the model, within the GPU kernels' float16
    tolerance of tests/test_decode_gpu.py (the CPU cache computes in float64)."""
    error = reference.relative_error(to_numpy(got), model.attention(layer, seqs, q, counts))
    assert error <= (2e-3 if cache.is_gpu else 1e-6), f"{what}: layer {layer}, {seqs} {counts}: relative error {error}"


def attend(cache, model, rng, what, seen):
    """Attention through the library over a random subset of the live sequences against CacheModel.attention:
    one token each (mc.decode) or several each, causal (mc.prefill_attention; on a GPU cache their counts pick
    the LUT path, verify_attention with one or two row tiles, or the chunk kernels)."""
    layer = int(rng.integers(cache.num_layers))
    live = [s for s in sorted(model.rows) if model.lengths(s)[layer] > 0]
    if not live:
        return
    seqs = [int(s) for s in rng.choice(live, size=int(rng.integers(1, len(live) + 1)), replace=False)]
    held = [int(model.lengths(s)[layer]) for s in seqs]
    several = rng.random() < 0.6
    counts = [int(rng.integers(1, min(n, int(rng.choice([4, 8, 16, 40]))) + 1)) if several else 1 for n in held]
    q = queries(rng, cache, sum(counts))
    if several:
        got = mc.prefill_attention(cache, layer, seqs, on(cache, q), np.cumsum([0] + counts))
    else:
        got = mc.decode(cache, layer, seqs, on(cache, q))
    check_attention(cache, model, layer, seqs, q, counts, got, what)
    seen["attention: several tokens" if several else "attention: one token"] = 1


@pytest.mark.parametrize("device", DEVICES)
def test_randomized_operations_match_a_model_of_the_cache(device):
    """Random adds, ragged appends (whole steps, single layers), verification steps (planned appends of 1-8 drafts
    per sequence, each layer's attention of them right after its append; on a GPU cache BatchPrefillWrapper's own
    append and run), decode steps (one token per sequence; on a GPU cache a DecodeStep kept across the run), forks, truncates, fork-then-truncate branches and frees on small pools, against a model of
    exact rows: after every operation each layer of each sequence dequantizes to exactly what the model says;
    refused operations (pool or slots exhausted, a truncate the ring cannot serve) change nothing; a truncate within
    max_rollback of the most a layer held always works; the pages in use are exactly those the live sequences'
    blocks hold, and none is left once every sequence is freed; attention (one new token each, or several, causal)
    over random subsets of the sequences matches float64 attention over the model. Four runs (a short and a long
    rollback, a tight and a roomier pool), which between them must meet each kind of refusal and truncate into
    blocks a fork shares. On a GPU cache the append kernel writes every token (tokens near centroids, so that its
    fp32 encoding and the float64 reference agree) and the counts pick every attention regime."""
    seen: dict[str, int] = {}
    for seed, (max_rollback, max_pages) in enumerate([(8, 24), (8, 64), (40, 24), (40, 64)]):
        run_storm(device, seed, max_rollback, max_pages, seen)
    kinds = {kind.split(": ")[-1] for kind in seen}
    for kind in ("PagePoolExhausted", "SequenceSlotsExhausted", "truncate copied shared blocks"):
        assert kind in kinds, seen
    for kind in ("truncate: ValueError", "attention: one token", "attention: several tokens"):
        assert kind in seen, seen
