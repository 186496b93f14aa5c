"""cuBLAS matmuls that can be captured in a CUDA graph, for the benchmarks' whole-model steps.

CuPy refuses every cuBLAS call while a stream is capturing (``NotImplementedError``; cupy/cupy#6290), yet
cuBLAS itself supports capture once its handle has a stream and a workspace set beforehand (cuBLAS
documentation, "CUDA Graphs Support"). :class:`CapturableGemm` calls the same library (the libcublas CuPy
loaded) through ctypes with its own handle, bound to one stream, so a decode step's projections and an
fp16 baseline's attention matmuls can be captured with the rest of the step. Results match ``cupy.matmul``
(the same cuBLAS routines, checked by ``selftest``).

Row-major operands are passed as their column-major transposes (C^T = B^T A^T), so no copies are made.
"""

from __future__ import annotations

import ctypes

import numpy as np

_OP_N, _OP_T = 0, 1
_R_16F, _R_32F = 2, 0
_COMPUTE_32F = 68
_GEMM_DEFAULT = -1
WORKSPACE_BYTES = 32 << 20


def _cublas() -> ctypes.CDLL:
    for name in ("libcublas.so.13", "libcublas.so.12", "libcublas.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError("libcublas not found (CuPy loads it on its first matmul; run one first)")


class CapturableGemm:
    """float32 ``a @ b`` and float16 batched attention matmuls on ``stream`` through cuBLAS, capturable.

    Args:
        cp: the CuPy module.
        stream: the CuPy stream every call is issued on (the one being captured).
    """

    def __init__(self, cp, stream) -> None:
        self.cp, self.stream = cp, stream
        cp.ones((2, 2), dtype=cp.float32) @ cp.ones((2, 2), dtype=cp.float32)  # CuPy loads libcublas
        self._lib = _cublas()
        self._handle = ctypes.c_void_p()
        self._check(self._lib.cublasCreate_v2(ctypes.byref(self._handle)), "cublasCreate")
        self._check(self._lib.cublasSetStream_v2(self._handle, ctypes.c_void_p(stream.ptr)), "cublasSetStream")
        with stream:
            self._workspace = cp.empty(WORKSPACE_BYTES, dtype=cp.uint8)  # fixed: capture allocates nothing
        self._check(self._lib.cublasSetWorkspace_v2(self._handle, ctypes.c_void_p(self._workspace.data.ptr),
                                                    ctypes.c_size_t(WORKSPACE_BYTES)), "cublasSetWorkspace")
        self._one, self._zero = ctypes.c_float(1.0), ctypes.c_float(0.0)

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status:
            raise RuntimeError(f"{what} failed: cublasStatus_t {status}")

    def matmul(self, a, b):
        """``a @ b`` for C-contiguous float32 ``a`` (n, k) and ``b`` (k, m): a new (n, m) float32 array."""
        cp = self.cp
        n, k = a.shape
        k2, m = b.shape
        if k != k2 or a.dtype != cp.float32 or b.dtype != cp.float32:
            raise ValueError(f"matmul: expected float32 (n, k) @ (k, m), got {a.dtype} {a.shape} @ {b.dtype} {b.shape}")
        a, b = cp.ascontiguousarray(a), cp.ascontiguousarray(b)
        with self.stream:
            c = cp.empty((n, m), dtype=cp.float32)
        self._check(self._lib.cublasSgemm_v2(
            self._handle, _OP_N, _OP_N, m, n, k, ctypes.byref(self._one), ctypes.c_void_p(b.data.ptr), m,
            ctypes.c_void_p(a.data.ptr), k, ctypes.byref(self._zero), ctypes.c_void_p(c.data.ptr), m), "cublasSgemm")
        return c

    def _batched(self, shape, op_a, op_b, m, n, k, a, lda, stride_a, b, ldb, stride_b, ldc, stride_c):
        """A new float32 array of ``shape`` = column-major op_a(a) . op_b(b) per batch, float16 operands."""
        with self.stream:
            c = self.cp.empty(shape, dtype=self.cp.float32)
        ll = ctypes.c_longlong
        self._check(self._lib.cublasGemmStridedBatchedEx(
            self._handle, op_a, op_b, m, n, k, ctypes.byref(self._one), ctypes.c_void_p(a.data.ptr), _R_16F, lda,
            ll(stride_a), ctypes.c_void_p(b.data.ptr), _R_16F, ldb, ll(stride_b), ctypes.byref(self._zero),
            ctypes.c_void_p(c.data.ptr), _R_32F, ldc, ll(stride_c), shape[0] * shape[1], _COMPUTE_32F,
            _GEMM_DEFAULT), "cublasGemmStridedBatchedEx")
        return c

    def scores(self, k, q):
        """``k @ q^T`` per (batch, kv head): k float16 (B, H, T, d), q float16 (B, H, g, d) contiguous ->
        float32 (B, H, T, g)."""
        B, H, T, d = k.shape
        g = q.shape[2]
        # column-major: S^T (g x T) = op_T(q (d x g)) . K (d x T)
        return self._batched((B, H, T, g), _OP_T, _OP_N, g, T, d, q, d, g * d, k, d, T * d, g, T * g)

    def weighted_values(self, p, v):
        """``p^T @ v`` per (batch, kv head): p float16 (B, H, T, g), v float16 (B, H, T, d) contiguous ->
        float32 (B, H, g, d)."""
        B, H, T, g = p.shape
        d = v.shape[3]
        # column-major: O^T (d x g) = V (d x T) . op_T(P (g x T))
        return self._batched((B, H, g, d), _OP_N, _OP_T, d, g, T, v, d, T * d, p, g, T * g, d, g * d)

    def selftest(self) -> float:
        """Largest relative error of each product against ``cupy.matmul`` on random operands."""
        cp = self.cp
        rng = cp.random.default_rng(0)
        with self.stream:
            a = rng.standard_normal((5, 64), dtype=cp.float32)
            b = rng.standard_normal((64, 48), dtype=cp.float32)
            k = rng.standard_normal((2, 3, 40, 32), dtype=cp.float32).astype(cp.float16)
            q = rng.standard_normal((2, 3, 4, 32), dtype=cp.float32).astype(cp.float16)
            errs = []
            for got, want in ((self.matmul(a, b), a @ b),
                              (self.scores(k, q), k.astype(cp.float32) @ q.astype(cp.float32).swapaxes(-1, -2))):
                errs.append(float(cp.abs(got - want).max() / cp.abs(want).max()))
            p = self.scores(k, q).astype(cp.float16)
            want = p.astype(cp.float32).swapaxes(-1, -2) @ k.astype(cp.float32)
            errs.append(float(cp.abs(self.weighted_values(p, k) - want).max() / cp.abs(want).max()))
        self.stream.synchronize()
        return float(np.max(errs))

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle is not None and handle.value:
            self._lib.cublasDestroy_v2(handle)
