"""Float64 NumPy ground truth for every kernel in million_cupy.

Everything here is deliberately simple and computed in float64, so a kernel that
disagrees with it is wrong (up to the tolerances the tests document). Inputs may
be any array :func:`million_cupy.interop.to_numpy` accepts (NumPy, CuPy, other
CUDA arrays); outputs are NumPy.

The CPU path of :class:`million_cupy.codebook.Codebook` encodes through
:func:`pq_encode`, so CPU codes are the ground truth by construction.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .interop import to_numpy

# Bound on the float64 temporaries of pq_encode: (rows, M, C) distances per chunk.
_ENCODE_CHUNK_ELEMENTS = 1 << 21


def _f64(x: Any) -> np.ndarray:
    return to_numpy(x).astype(np.float64, copy=False)


def _check_centroids(centroids: np.ndarray) -> tuple[int, int, int]:
    if centroids.ndim != 3:
        raise ValueError(f"centroids: expected shape (M, C, dsub), got {centroids.shape}")
    return centroids.shape


def pq_encode(x: Any, centroids: Any) -> np.ndarray:
    """Product-quantization codes of ``x``.

    ``x`` is ``(..., d)``, ``centroids`` ``(M, C, dsub)`` with ``d = M * dsub`` and ``C <= 256``.
    For every subspace the code is the index of the centroid nearest in squared L2 distance,
    computed in float64 as ``sum((x - c)**2)`` (no norm expansion, so there is no cancellation);
    exact ties go to the lowest index. Returns ``uint8`` codes of shape ``(..., M)``.
    """
    c = _f64(centroids)
    M, C, dsub = _check_centroids(c)
    if C > 256:
        raise ValueError(f"centroids: uint8 codes hold at most 256 centroids, got C={C}")
    xv = to_numpy(x)
    if xv.ndim < 1 or xv.shape[-1] != M * dsub:
        raise ValueError(f"x: expected last dimension M*dsub = {M * dsub}, got shape {xv.shape}")
    lead = xv.shape[:-1]
    rows = xv.reshape(-1, M, dsub)
    codes = np.empty((rows.shape[0], M), dtype=np.uint8)
    step = max(1, _ENCODE_CHUNK_ELEMENTS // (M * C))
    for start in range(0, rows.shape[0], step):
        xs = rows[start : start + step].astype(np.float64)  # per chunk: memory stays bounded
        dist = np.zeros((xs.shape[0], M, C))
        for j in range(dsub):
            diff = xs[:, :, None, j] - c[None, :, :, j]
            dist += diff * diff
        codes[start : start + step] = np.argmin(dist, axis=-1)  # argmin returns the first minimum
    return codes.reshape(*lead, M)


def pq_decode(codes: Any, centroids: Any) -> np.ndarray:
    """Vectors ``(..., d)`` (float64) that the uint8 ``codes`` ``(..., M)`` stand for."""
    c = _f64(centroids)
    M, C, dsub = _check_centroids(c)
    k = to_numpy(codes)
    if k.ndim < 1 or k.shape[-1] != M:
        raise ValueError(f"codes: expected last dimension M = {M}, got shape {k.shape}")
    if k.size and int(k.max()) >= C:
        raise ValueError(f"codes: expected values < C = {C}, got {int(k.max())}")
    return c[np.arange(M), k.astype(np.intp)].reshape(*k.shape[:-1], M * dsub)


def decode_attention(
    q: Any, k: Sequence[Any], v: Sequence[Any], scale: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Single-query attention per sequence over a ragged batch, with GQA.

    ``q`` is ``(B, nh, d)``; ``k[b]`` and ``v[b]`` are ``(L_b, nh_k, d)`` (every key of sequence ``b``:
    dequantized PQ tokens and exact residual tokens alike). Query head ``h`` attends kv head
    ``h // (nh // nh_k)``. ``scale`` defaults to ``1/sqrt(d)``.

    Returns ``(out, lse)``: float64 ``(B, nh, d)`` and float64 ``(B, nh)`` with
    ``lse = log(sum_j exp(scale * q.k_j))`` (natural log).
    """
    qv = _f64(q)
    if qv.ndim != 3:
        raise ValueError(f"q: expected shape (B, nh, d), got {qv.shape}")
    B, nh, d = qv.shape
    if len(k) != B or len(v) != B:
        raise ValueError(f"k, v: expected {B} per-sequence arrays (one per query), got {len(k)} and {len(v)}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = np.empty((B, nh, d))
    lse = np.empty((B, nh))
    nh_k = None
    for b in range(B):
        kb, vb = _f64(k[b]), _f64(v[b])
        if kb.ndim != 3 or kb.shape[2] != d:
            raise ValueError(f"k[{b}]: expected shape (L, nh_k, {d}), got {kb.shape}")
        if vb.shape != kb.shape:
            raise ValueError(f"v[{b}]: expected the shape of k[{b}] {kb.shape}, got {vb.shape}")
        if kb.shape[0] == 0:
            raise ValueError(f"k[{b}]: sequence {b} has no tokens (L_b = 0); attention over no keys is undefined")
        if nh_k is None:
            nh_k = kb.shape[1]
            if nh_k == 0 or nh % nh_k:
                raise ValueError(f"k: nh = {nh} query heads must be a multiple of nh_k, got nh_k = {nh_k}")
        elif kb.shape[1] != nh_k:
            raise ValueError(f"k[{b}]: expected nh_k = {nh_k} kv heads like k[0], got {kb.shape[1]}")
        g = nh // nh_k
        qg = qv[b].reshape(nh_k, g, d)  # query heads h = kh*g + i read kv head kh
        s = scale * np.einsum("kgd,lkd->kgl", qg, kb)
        smax = s.max(axis=-1, keepdims=True)
        p = np.exp(s - smax)
        denom = p.sum(axis=-1, keepdims=True)
        out[b] = np.einsum("kgl,lkd->kgd", p / denom, vb).reshape(nh, d)
        lse[b] = (smax + np.log(denom)).reshape(nh)
    return out, lse


def merge_states(outs: Sequence[Any], lses: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Merge partial attention states of the same queries over disjoint key sets.

    ``outs[i]`` is ``(..., d)`` normalized attention output over key set ``i`` and ``lses[i]`` ``(...)``
    its log-sum-exp. Returns float64 ``(out, lse)`` equal to attention over the union of the key sets.
    A part whose lse is ``-inf`` (no keys) contributes nothing, whatever its output holds; where every
    part is ``-inf`` the result is ``out = 0``, ``lse = -inf``.
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"outs, lses: expected equally long non-empty lists, got {len(outs)} and {len(lses)}")
    o = np.stack([_f64(x) for x in outs])
    s = np.stack([_f64(x) for x in lses])
    if o.shape[:-1] != s.shape:
        raise ValueError(f"lses: expected shape {o.shape[1:-1]} (outs without d), got {s.shape[1:]}")
    smax = s.max(axis=0)
    # Shift by a finite value so all-empty positions give exp(-inf) = 0 instead of NaN.
    shift = np.where(np.isfinite(smax), smax, 0.0)
    w = np.exp(s - shift)
    total = w.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        # Empty parts may carry NaN/inf garbage (0 * NaN = NaN), so mask rather than multiply.
        acc = np.where(w[..., None] > 0, w[..., None] * o, 0.0).sum(axis=0)
        out = np.where(total[..., None] > 0, acc / total[..., None], 0.0)
        lse = np.where(total > 0, shift + np.log(total), -np.inf)
    return out, lse


def relative_error(a: Any, b: Any) -> float:
    """``||a - b|| / ||b||`` in float64 (Frobenius norms); 0 when both are zero, inf when only ``b`` is."""
    av, bv = _f64(a), _f64(b)
    if av.shape != bv.shape:
        raise ValueError(f"relative_error: shapes differ: {av.shape} vs {bv.shape}")
    num = float(np.linalg.norm((av - bv).ravel()))
    den = float(np.linalg.norm(bv.ravel()))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def causal_attention(
    q: Any, k: Sequence[Any], v: Sequence[Any], qo_indptr: Any, scale: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Several new query tokens per sequence over a ragged batch, causal, with GQA.

    ``q`` is ``(N, nh, d)``: the new tokens of every sequence in order, sequence ``b`` owning rows
    ``qo_indptr[b]:qo_indptr[b+1]`` (CSR, ``B + 1`` entries, ``N = qo_indptr[B]``). ``k[b]``, ``v[b]``
    ``(L_b, nh_k, d)`` hold every key of sequence ``b`` with its new tokens last, so new token ``j`` of ``c_b``
    attends to the first ``L_b - c_b + j + 1`` keys. Returns ``(out, lse)`` as :func:`decode_attention`.
    """
    ind = to_numpy(qo_indptr).astype(np.int64).reshape(-1)
    if ind.shape[0] != len(k) + 1 or ind[0] != 0 or (np.diff(ind) < 0).any():
        raise ValueError(f"qo_indptr: expected {len(k) + 1} non-decreasing offsets from 0, got {ind.tolist()[:16]}")
    ks, vs = [], []
    for b in range(len(k)):
        kb, vb = to_numpy(k[b]), to_numpy(v[b])
        c = int(ind[b + 1] - ind[b])
        if c > kb.shape[0]:
            raise ValueError(f"qo_indptr: sequence {b} has {c} new tokens but only {kb.shape[0]} keys")
        for j in range(c):
            end = kb.shape[0] - c + j + 1
            ks.append(kb[:end])
            vs.append(vb[:end])
    return decode_attention(q, ks, vs, scale=scale)
