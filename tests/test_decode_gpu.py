"""Native decode kernels against the float64 reference, on fresh random data (GPU only).

Every launch writes into an output poisoned with NaN first, so an unwritten element fails the test.
Tolerances (relative L2 of the output against float64): float16 2e-3, bfloat16 6e-3 (its own rounding
of the output is ~1e-3), float32 1e-3 (the fp16 lookup table dominates); lse absolute 2e-2.
"""

from __future__ import annotations

import numpy as np
import pytest

from million_cupy import reference
from million_cupy.interop import resolve_dtype

pytestmark = pytest.mark.gpu

TOL = {"float16": 2e-3, "bfloat16": 6e-3, "float32": 1e-3}


def _cp():
    import cupy

    return cupy


def permute_rows(codes_page: np.ndarray) -> np.ndarray:
    """(..., P, M) page K codes → the stored XOR-permuted order, written from docs/architecture.md's
    contract independently of the cache's implementation: position s of row t holds subspace s ^ (t % ROT)."""
    P, M = codes_page.shape[-2:]
    rot = min(M, 32)
    s = np.arange(M)[None, :]
    t = np.arange(P)[:, None]
    return np.take_along_axis(codes_page, np.broadcast_to(s ^ (t % rot), codes_page.shape), axis=-1)


class Problem:
    """Random PQ cache content for a ragged batch, plus its float64 reference."""

    def __init__(self, rng, *, d, M, nh, nh_k, dtype, pages, res, P=64, per_head=False, res_cap=None):
        self.d, self.M, self.nh, self.nh_k, self.dtype, self.P = d, M, nh, nh_k, dtype, P
        self.B = len(pages)
        dsub = d // M
        hc = nh_k if per_head else 1
        self.kc = rng.standard_normal((hc, M, 256, dsub)).astype(np.float32)
        self.vc = rng.standard_normal((hc, M, 256, dsub)).astype(np.float32)
        np_dtype = resolve_dtype(dtype)
        self.q = rng.standard_normal((self.B, nh, d)).astype(np_dtype)
        self.pages = np.asarray(pages)
        self.res = np.asarray(res)
        self.codes_k = [rng.integers(0, 256, (n * P, nh_k, M), dtype=np.uint8) for n in pages]
        self.codes_v = [rng.integers(0, 256, (n * P, nh_k, M), dtype=np.uint8) for n in pages]
        cap = res_cap or max(1, int(self.res.max()))
        self.res_k = rng.standard_normal((self.B, nh_k, cap, d)).astype(np_dtype)
        self.res_v = rng.standard_normal((self.B, nh_k, cap, d)).astype(np_dtype)

    def dequant(self, codes, cent):
        # codes (L, nh_k, M) → (L, nh_k, d) float64
        L = codes.shape[0]
        out = np.empty((L, self.nh_k, self.d))
        for h in range(self.nh_k):
            c = cent[h if cent.shape[0] > 1 else 0].astype(np.float64)
            out[:, h] = reference.pq_decode(codes[:, h], c)
        return out

    def reference(self):
        ks, vs = [], []
        for b in range(self.B):
            r = self.res[b]
            ks.append(np.concatenate([self.dequant(self.codes_k[b], self.kc),
                                      self.res_k[b, :, :r].transpose(1, 0, 2).astype(np.float64)]))
            vs.append(np.concatenate([self.dequant(self.codes_v[b], self.vc),
                                      self.res_v[b, :, :r].transpose(1, 0, 2).astype(np.float64)]))
        return reference.decode_attention(self.q.astype(np.float64), ks, vs)

    def paged(self, rng, legacy=False):
        """Pages in a shuffled pool, in the stored layout of docs/architecture.md (written here independently
        of cache.pack_pages): k (N, nh_k, M // kc, P, kc) permuted rows cut into kc = min(M, 16)-byte chunks,
        v (N, nh_k, P // 16, M, 16); CSR table. ``legacy``: the 0.1 layout, k (N, nh_k, P, M) permuted rows
        and v (N, nh_k, M, P)."""
        total = int(self.pages.sum())
        n_pool = total + 3
        ids = rng.permutation(n_pool)[:total].astype(np.int32)
        P, M, kc = self.P, self.M, min(self.M, 16)
        shapes = ((P, M), (M, P)) if legacy else ((M // kc, P, kc), (P // 16, M, 16))
        kp = rng.integers(0, 256, (n_pool, self.nh_k, *shapes[0]), dtype=np.uint8)  # junk elsewhere
        vp = rng.integers(0, 256, (n_pool, self.nh_k, *shapes[1]), dtype=np.uint8)
        indptr = np.concatenate([[0], np.cumsum(self.pages)]).astype(np.int32)
        for b in range(self.B):
            for j in range(self.pages[b]):
                pid = ids[indptr[b] + j]
                rows = permute_rows(self.codes_k[b][j * P:(j + 1) * P].transpose(1, 0, 2))  # (nh_k, P, M)
                blk_v = self.codes_v[b][j * P:(j + 1) * P].transpose(1, 0, 2)  # (nh_k, P, M)
                if legacy:
                    kp[pid], vp[pid] = rows, blk_v.transpose(0, 2, 1)
                else:
                    kp[pid] = rows.reshape(self.nh_k, P, M // kc, kc).transpose(0, 2, 1, 3)
                    vp[pid] = blk_v.reshape(self.nh_k, P // 16, 16, M).transpose(0, 1, 3, 2)
        return kp, vp, indptr, ids

    def contiguous(self):
        T = max(1, int(self.pages.max()) * self.P)
        k = np.zeros((self.B, self.nh_k, T, self.M), np.uint8)
        v = np.zeros_like(k)
        for b in range(self.B):
            n = self.pages[b] * self.P
            k[b, :, :n] = self.codes_k[b].transpose(1, 0, 2)
            v[b, :, :n] = self.codes_v[b].transpose(1, 0, 2)
        return k, v, self.pages * self.P


def _poisoned(shape, dtype):
    cp = _cp()
    return cp.full(shape, cp.nan, dtype=resolve_dtype(dtype))


def _check(out, lse, ref, dtype):
    cp = _cp()
    o = cp.asnumpy(out).astype(np.float64)
    assert np.isfinite(o).all(), "output has unwritten (NaN) or non-finite elements"
    err = reference.relative_error(o, ref[0])
    assert err <= TOL[dtype], f"relative L2 error {err:.2e} > {TOL[dtype]:.0e}"
    if lse is not None:
        l = cp.asnumpy(lse).astype(np.float64)
        assert np.isfinite(l).all()
        assert np.max(np.abs(l - ref[1])) < 2e-2


CONFIGS = [
    # d, M, nh, nh_k, dtype, P
    (128, 64, 32, 8, "float16", 64),
    (128, 32, 32, 8, "float16", 64),
    (128, 64, 8, 8, "bfloat16", 64),
    (128, 16, 16, 2, "float32", 16),
    (64, 32, 16, 8, "float16", 32),
    (64, 8, 8, 1, "float16", 128),
    (256, 64, 8, 4, "float16", 64),
    (256, 256, 4, 4, "float16", 64),
    (128, 128, 12, 4, "bfloat16", 64),  # GQA ratio 3: G = 1 heads per CTA
    (128, 64, 32, 2, "float16", 64),    # GQA ratio 16: two head groups per kv head
]


@pytest.mark.parametrize("d,M,nh,nh_k,dtype,P", CONFIGS)
def test_paged_pq_ragged(rng, d, M, nh, nh_k, dtype, P):
    from million_cupy.decode import paged_pq_decode

    cp = _cp()
    pages = [0, 1, 5, 37]          # zero and one page, several, many (splits)
    res = [1, 0, 17, 63]           # one residual token, none, some, full window
    prob = Problem(rng, d=d, M=M, nh=nh, nh_k=nh_k, dtype=dtype, pages=pages, res=res, P=P, res_cap=64)
    kp, vp, indptr, ids = prob.paged(rng)
    out = _poisoned((prob.B, nh, d), dtype)
    o, l = paged_pq_decode(cp.asarray(prob.q), cp.asarray(kp), cp.asarray(vp), indptr, cp.asarray(ids),
                           cp.asarray(prob.kc), cp.asarray(prob.vc), residual_k=cp.asarray(prob.res_k),
                           residual_v=cp.asarray(prob.res_v), residual_lens=prob.res, return_lse=True, out=out)
    assert o is out
    _check(o, l, prob.reference(), dtype)


def test_paged_pq_legacy_layout_is_converted_with_a_warning(rng, monkeypatch):
    """0.1-layout pages (4-D) still decode correctly, after one FutureWarning."""
    from million_cupy import decode as decode_mod

    cp = _cp()
    monkeypatch.setattr(decode_mod, "_legacy_pages_warned", False)
    prob = Problem(rng, d=128, M=64, nh=8, nh_k=2, dtype="float16", pages=[3, 0, 2], res=[5, 9, 0], P=64,
                   res_cap=64)
    kp, vp, indptr, ids = prob.paged(rng, legacy=True)
    args = (cp.asarray(prob.q), cp.asarray(kp), cp.asarray(vp), indptr, cp.asarray(ids), cp.asarray(prob.kc),
            cp.asarray(prob.vc))
    kw = dict(residual_k=cp.asarray(prob.res_k), residual_v=cp.asarray(prob.res_v), residual_lens=prob.res,
              return_lse=True)
    with pytest.warns(FutureWarning, match="pack_pages"):
        o, l = decode_mod.paged_pq_decode(*args, **kw)
    _check(o, l, prob.reference(), "float16")


@pytest.mark.parametrize("per_head", [False, True])
def test_paged_pq_long_split(rng, per_head):
    """One long sequence: many splits merged by the last CTA; per-kv-head codebooks."""
    from million_cupy.decode import paged_pq_decode

    cp = _cp()
    prob = Problem(rng, d=128, M=64, nh=32, nh_k=8, dtype="float16", pages=[700], res=[100], per_head=per_head,
                   res_cap=128)
    kp, vp, indptr, ids = prob.paged(rng)
    for _ in range(2):  # twice: the split counters must be reset by the kernel
        out = _poisoned((1, 32, 128), "float16")
        o, l = paged_pq_decode(cp.asarray(prob.q), cp.asarray(kp), cp.asarray(vp), indptr, cp.asarray(ids),
                               cp.asarray(prob.kc), cp.asarray(prob.vc), residual_k=cp.asarray(prob.res_k),
                               residual_v=cp.asarray(prob.res_v), residual_lens=prob.res, return_lse=True,
                               out=out)
        _check(o, l, prob.reference(), "float16")


@pytest.mark.parametrize("d,M,nh,nh_k,dtype,P", CONFIGS[:6])
def test_contiguous_pq(rng, d, M, nh, nh_k, dtype, P):
    from million_cupy.decode import contiguous_pq_decode

    cp = _cp()
    prob = Problem(rng, d=d, M=M, nh=nh, nh_k=nh_k, dtype=dtype, pages=[0, 3, 20], res=[5, 0, 64], P=P, res_cap=64)
    k, v, lens = prob.contiguous()
    out = _poisoned((prob.B, nh, d), dtype)
    o, l = contiguous_pq_decode(cp.asarray(prob.q), cp.asarray(k), cp.asarray(v), lens, cp.asarray(prob.kc),
                                cp.asarray(prob.vc), residual_k=cp.asarray(prob.res_k),
                                residual_v=cp.asarray(prob.res_v), residual_lens=prob.res, return_lse=True, out=out)
    _check(o, l, prob.reference(), dtype)


@pytest.mark.parametrize("d,nh,nh_k,dtype,P", [(128, 32, 8, "float16", 64), (64, 8, 2, "bfloat16", 16),
                                               (256, 6, 2, "float32", 128)])
def test_paged_exact(rng, d, nh, nh_k, dtype, P):
    from million_cupy.decode import paged_exact_decode

    cp = _cp()
    lens = np.array([1, P, P + 1, 30 * P + 7])
    npages = -(-lens // P)
    n_pool = int(npages.sum()) + 2
    ids = rng.permutation(n_pool)[: npages.sum()].astype(np.int32)
    np_dtype = resolve_dtype(dtype)
    kp = rng.standard_normal((n_pool, nh_k, P, d)).astype(np_dtype)
    vp = rng.standard_normal((n_pool, nh_k, P, d)).astype(np_dtype)
    indptr = np.concatenate([[0], np.cumsum(npages)]).astype(np.int32)
    last = lens - (npages - 1) * P
    q = rng.standard_normal((len(lens), nh, d)).astype(np_dtype)
    ks, vs = [], []
    for b in range(len(lens)):
        pg = ids[indptr[b]:indptr[b + 1]]
        ks.append(kp[pg].transpose(0, 2, 1, 3).reshape(-1, nh_k, d)[: lens[b]].astype(np.float64))
        vs.append(vp[pg].transpose(0, 2, 1, 3).reshape(-1, nh_k, d)[: lens[b]].astype(np.float64))
    ref = reference.decode_attention(q.astype(np.float64), ks, vs)
    out = _poisoned(q.shape, dtype)
    o, l = paged_exact_decode(cp.asarray(q), cp.asarray(kp), cp.asarray(vp), indptr, cp.asarray(ids), last,
                              return_lse=True, out=out)
    tol = {"float16": 1e-3, "bfloat16": 6e-3, "float32": 1e-5}[dtype]
    err = reference.relative_error(cp.asnumpy(o).astype(np.float64), ref[0])
    assert err <= tol, err
    assert np.max(np.abs(cp.asnumpy(l) - ref[1])) < 1e-3


def test_merge_states_gpu(rng):
    from million_cupy.decode import merge_states

    cp = _cp()
    va, vb = rng.standard_normal((2, 3, 4, 16))
    sa, sb = rng.standard_normal((2, 3, 4))
    sa[0, 0] = -np.inf
    v, s = merge_states(cp.asarray(va), cp.asarray(sa), cp.asarray(vb), cp.asarray(sb))
    rv, rs = reference.merge_states([va, vb], [sa, sb])
    assert np.allclose(cp.asnumpy(v), rv, atol=1e-5) and np.allclose(cp.asnumpy(s), rs, atol=1e-5)


def test_unsupported_config_raises():
    from million_cupy.decode import paged_pq_decode
    from million_cupy.errors import UnsupportedConfiguration

    cp = _cp()
    q = cp.zeros((1, 4, 96), cp.float16)
    with pytest.raises(UnsupportedConfiguration, match="head_dim"):
        paged_pq_decode(q, cp.zeros((1, 4, 3, 64, 16), cp.uint8), cp.zeros((1, 4, 4, 48, 16), cp.uint8), [0, 1],
                        cp.zeros(1, cp.int32), cp.zeros((1, 48, 256, 2), cp.float32),
                        cp.zeros((1, 48, 256, 2), cp.float32))
