"""The paged cache's layout contract: the flush rule, block counts, the in-page code layout and the kernels'
codebook layout.

Pure functions over NumPy or CuPy arrays, shared by the cache that writes pages
(:mod:`million_cupy.cache`), the kernels' launchers that read them (:mod:`million_cupy.decode`,
:mod:`million_cupy.step`) and callers that manage pages themselves. ``docs/architecture.md`` gives the
byte formulas.

Flush rule. A sequence holding ``n`` tokens in a layer has ``pages(n) = 0 if n < R else
(n - R) // P + 1`` full pages (tokens ``[0, P * pages(n))``, which attention reads as PQ codes) and its
residual tokens ``[P * pages(n), n)`` sit exactly in ring slots ``t % S`` (``S = R + max_rollback``
ring slots, ``R`` by default).

Blocks. Every token's codes are written into block ``t // P`` of its sequence when the token is appended,
so a sequence of ``n`` tokens has ``blocks(n) = ceil(n / P)`` allocated blocks; the newest of them are
still being filled while their tokens are residual, and a flush (a block becoming a full page) is then
only a change of lengths: no encoding, no gather, no host round trip.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .interop import cupy, is_gpu_array

__all__ = ["PAGE_SIZES", "K_CHUNK_BYTES", "V_BLOCK_TOKENS", "full_pages", "blocks", "k_chunk",
           "permute_k_rows", "pack_pages", "unpack_pages", "stored_v_shape", "kernel_codebooks"]

#: Supported page sizes (tokens per page): powers of two, so the decode kernels index pages by shifts.
PAGE_SIZES = (16, 32, 64, 128, 256)
#: Bytes of a K row stored together (the kernel's 16-byte load); rows shorter than this (M = 8) stay whole.
K_CHUNK_BYTES = 16
#: Tokens of a V block: a page stores V as ``P // V_BLOCK_TOKENS`` blocks of ``[m][16 tokens]``.
V_BLOCK_TOKENS = 16


def full_pages(n: Any, page_size: int, residual: int) -> np.ndarray:
    """``pages(n)`` of the flush rule, elementwise: the full PQ pages of a sequence holding ``n`` tokens;
    tokens ``[0, page_size * pages(n))`` are read from pages, the rest from the residual ring."""
    n = np.asarray(n, dtype=np.int64)
    # n < residual floors to -1 (clipped at -page_size first): 0 pages, without np.where's extra passes
    return np.maximum(n - residual, -page_size) // page_size + 1


def blocks(n: Any, page_size: int) -> np.ndarray:
    """``blocks(n) = ceil(n / page_size)``, elementwise: the blocks holding the codes of ``n`` tokens."""
    n = np.asarray(n, dtype=np.int64)
    return -(-n // page_size)


def k_chunk(M: int) -> int:
    """Bytes per stored K chunk for ``M`` subspaces: ``min(M, 16)``."""
    return min(M, K_CHUNK_BYTES)


def permute_k_rows(codes: Any, t: Any) -> Any:
    """Apply the in-page XOR permutation of K code rows (docs/architecture.md); it is its own inverse.

    ``codes`` is ``(..., M)`` uint8 (NumPy or CuPy), ``t`` the in-page token index of each row,
    broadcastable to ``codes.shape[:-1]``. Position ``s`` of the result holds ``codes[..., s ^ (t % ROT)]``
    with ``ROT = min(M, 32)``: stored rows from logical ones, and logical rows from stored ones.
    The decode kernel reads K pages in this order so that its lookup-table reads hit distinct
    shared-memory banks.
    """
    xp = cupy() if is_gpu_array(codes) else np
    M = codes.shape[-1]
    rot = min(M, 32)
    t = xp.asarray(t)
    source = xp.arange(M) ^ (t % rot)[..., None]
    return xp.take_along_axis(codes, xp.broadcast_to(source, codes.shape), axis=-1)


def pack_pages(k_codes: Any, v_codes: Any) -> tuple[Any, Any]:
    """Logical page codes → the stored page layout the decode kernels read (NumPy or CuPy, copies).

    ``k_codes`` and ``v_codes`` are uint8 ``(..., P, M)``: code of subspace ``m`` of the page's token ``t``.
    Returns K as ``(..., M // kc, P, kc)`` with ``kc = min(M, 16)``: each row XOR-permuted
    (:func:`permute_k_rows`) and cut into ``kc``-byte chunks, chunk-major; and V as
    ``(..., P // 16, M, 16)``: transposed ``[m][token]`` inside each 16-token block. With one lane per
    token (K) or per subspace (V), a warp's 16-byte loads then cover consecutive addresses.
    """
    for name, c in (("k_codes", k_codes), ("v_codes", v_codes)):
        if c.ndim < 2 or c.dtype != np.uint8:
            raise ValueError(f"{name}: expected uint8 codes of shape (..., P, M), got {c.dtype} {tuple(c.shape)}")
    P, M = k_codes.shape[-2:]
    if v_codes.shape != k_codes.shape:
        raise ValueError(f"v_codes: expected shape {tuple(k_codes.shape)} (as k_codes), got {tuple(v_codes.shape)}")
    if P % V_BLOCK_TOKENS:
        raise ValueError(f"page size: expected a multiple of {V_BLOCK_TOKENS}, got {P}")
    if M % k_chunk(M):
        raise ValueError(f"M: expected 8 or a multiple of {K_CHUNK_BYTES}, got {M}")
    xp = cupy() if is_gpu_array(k_codes) else np
    lead = k_codes.shape[:-2]
    kc = k_chunk(M)
    k = permute_k_rows(k_codes, xp.arange(P)).reshape(*lead, P, M // kc, kc)
    v = v_codes.reshape(*lead, P // V_BLOCK_TOKENS, V_BLOCK_TOKENS, M)
    return xp.ascontiguousarray(xp.swapaxes(k, -3, -2)), xp.ascontiguousarray(xp.swapaxes(v, -2, -1))


def stored_v_shape(k_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the stored V pages that go with stored K pages of shape ``(..., M // kc, P, kc)``
    (:func:`pack_pages`); raises ValueError when ``k_shape`` is not such a shape."""
    if len(k_shape) < 3 or k_shape[-1] != k_chunk(k_shape[-3] * k_shape[-1]):
        raise ValueError(f"k_pages: expected stored pages (..., M // kc, P, kc) with kc = min(M, 16) "
                         f"(cache.pack_pages), got shape {tuple(k_shape)}")
    *lead, chunks, P, kc = k_shape
    return (*lead, P // V_BLOCK_TOKENS, chunks * kc, V_BLOCK_TOKENS)


def unpack_pages(k_pages: Any, v_pages: Any) -> tuple[Any, Any]:
    """The inverse of :func:`pack_pages`: logical ``(..., P, M)`` K and V codes of stored pages."""
    xp = cupy() if is_gpu_array(k_pages) else np
    want = stored_v_shape(tuple(k_pages.shape))
    if tuple(v_pages.shape) != want:
        raise ValueError(f"v_pages: expected shape {want} (the V pages pack_pages makes with these K pages), "
                         f"got {tuple(v_pages.shape)}")
    *lead, chunks, P, kc = k_pages.shape
    M = chunks * kc
    k = xp.swapaxes(k_pages, -3, -2).reshape(*lead, P, M)
    v = xp.swapaxes(v_pages, -2, -1).reshape(*lead, P, M)
    return permute_k_rows(k, xp.arange(P)), v


def kernel_codebooks(k_centroids, v_centroids):
    """(Hc, M, C, dsub) centroids → the kernels' [c][m] layouts, both float16: every CTA reads the K codebook
    to build its lookup table (whose entries are fp16 anyway), and at short contexts those reads are a
    large part of the step."""
    cp = cupy()
    k = cp.ascontiguousarray(cp.asarray(k_centroids, dtype=cp.float32).transpose(0, 2, 1, 3).astype(cp.float16))
    v = cp.ascontiguousarray(cp.asarray(v_centroids, dtype=cp.float32).transpose(0, 2, 1, 3).astype(cp.float16))
    return k, v
