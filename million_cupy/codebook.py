"""Product-quantization codebooks: training, encode/decode, save/load.

A :class:`Codebook` holds one vector space's centroids ``(M, C, dsub)`` (``C = 256``, 8-bit codes).
:class:`ModelCodebooks` holds one key and one value codebook per layer, shared by every kv head or
one per kv head; its :meth:`ModelCodebooks.key_centroids` / :meth:`ModelCodebooks.value_centroids`
give the float32 ``(Hc, M, C, dsub)`` stacks the cache and decode kernels read.

Work runs on the side the data lives on: CuPy arrays on the GPU (the ``pq_encode.cu`` kernel,
batched k-means in CuPy), NumPy arrays on the CPU, where encoding is the float64 reference
(:func:`million_cupy.reference.pq_encode`) and k-means runs the same code as on the GPU.

File format (``save`` / ``load``): an uncompressed NumPy ``.npz`` (zip) holding a ``header`` entry,
UTF-8 JSON stored as a uint8 array, and the centroid arrays in the codebooks' dtype:

* Codebook: header ``{"magic": "million-cupy-codebook", "format_version": 1, "M", "C", "d", "dsub",
  "dtype"}``; entry ``centroids`` ``(M, C, dsub)``.
* ModelCodebooks: header ``{"magic": "million-cupy-model-codebooks", "format_version": 1,
  "num_layers", "num_heads_per_layer", "M", "C", "d", "dsub", "dtype"}``; entries ``keys`` and
  ``values``, each ``(num_layers, num_heads_per_layer, M, C, dsub)``.

Any file that does not match (wrong magic or version, header disagreeing with the arrays, missing
entries, truncated or corrupt zip data) raises :class:`~million_cupy.errors.CodebookFormatError`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import zipfile
import zlib
from typing import Any, Sequence, Union

import numpy as np
from tqdm import tqdm

from . import kernels, reference
from .errors import CodebookFormatError, UnsupportedConfiguration
from .interop import array_module, as_array, as_stream, cupy, dtype_name, is_gpu_array, require_gpu, to_numpy

NUM_CENTROIDS = 256
NBITS = 8
SUPPORTED_D = (64, 128, 256)
SUPPORTED_DSUB = (1, 2, 4, 8)
CENTROID_DTYPES = ("float16", "float32")
INPUT_DTYPES = ("float16", "bfloat16", "float32")  # what the encoder kernel reads
#: What encode accepts: float64 as well, as training does (the GPU encodes it as float32).
ENCODE_DTYPES = INPUT_DTYPES + ("float64",)
SAMPLE_DTYPES = ("float16", "bfloat16", "float32", "float64")

CODEBOOK_MAGIC = "million-cupy-codebook"
MODEL_CODEBOOKS_MAGIC = "million-cupy-model-codebooks"
FORMAT_VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]

# Mirrors PQ_ENCODE_THREADS / PQ_ENCODE_ROWS in cuda_src/pq_encode.cu. The kernel strides over row
# tiles, so a mismatch would only cost speed, never leave codes unwritten.
_ENCODE_THREADS = 128
_ENCODE_ROWS = 4
_MAX_GRID_X = 2**31 - 1
_KERNEL_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float"}

# k-means: bound on the (M, rows, C) float32 distance block computed per chunk. On the GPU, large
# blocks (128 MiB) amortize launches; on the CPU, small ones (4 MiB) stay in cache and avoid
# page-faulting a fresh allocation per chunk (5x faster there).
_TRAIN_CHUNK_ELEMENTS = {"gpu": 1 << 25, "cpu": 1 << 20}
# progress=None shows a bar (on a tty) from about a second of CPU work: M * n * C * iters distances.
_LONG_RUN_WORK = 1 << 31


def _check_finite(x: Any, name: str) -> None:
    """ValueError naming the rows of ``x`` (n, d) that hold NaN or inf (one device sync for GPU arrays)."""
    xp = array_module(x)
    bad = ~xp.isfinite(x).all(axis=-1)
    if bool(bad.any()):
        rows = to_numpy(xp.flatnonzero(bad))
        raise ValueError(f"{name}: expected finite values, got NaN or inf in {rows.size} of {x.shape[0]} rows "
                         f"(first: {rows[:8].tolist()}); k-means needs finite samples: drop or fix those rows")


def _check_geometry(M: int, d: int, what: str) -> None:
    if d not in SUPPORTED_D:
        raise UnsupportedConfiguration(f"{what}: head dim d must be one of {list(SUPPORTED_D)}, got d = {d}")
    if M <= 0 or d % M or d // M not in SUPPORTED_DSUB:
        choices = [d // s for s in SUPPORTED_DSUB]
        raise UnsupportedConfiguration(
            f"{what}: dsub = d / M must be one of {list(SUPPORTED_DSUB)} (M in {choices} for d = {d}), got M = {M}"
        )


def _check_nbits(nbits: int) -> None:
    if nbits != NBITS:
        raise UnsupportedConfiguration(f"nbits: only {NBITS}-bit codes (C = {NUM_CENTROIDS}) are supported, got {nbits}")


@kernels.register_variants("pq_encode.cu")
def _pq_encode_variants() -> list[str]:
    return [_encode_variant(dsub, t) for dsub in SUPPORTED_DSUB for t in INPUT_DTYPES]


def _encode_variant(dsub: int, dtype: str) -> str:
    return f"pq_encode<{dsub}, {_KERNEL_TYPES[dtype]}>"


def _progress(total: int, desc: str, progress: bool | None, work: int) -> tqdm:
    show = progress if progress is not None else (sys.stderr.isatty() and work >= _LONG_RUN_WORK)
    return tqdm(total=total, desc=desc, disable=not show, leave=False)


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def _on(stream: Any, x: Any):
    """Context running GPU work on ``stream`` (a no-op for host arrays or ``stream=None``)."""
    if stream is None or not is_gpu_array(x):
        return contextlib.nullcontext()
    return as_stream(stream)


def encode(x: Any, centroids: Any, out: Any = None):
    """PQ codes of ``x`` under a stack of codebooks; the function the cache and :class:`Codebook` use.

    ``x`` is ``(..., d)`` float16/bfloat16/float32; ``centroids`` is float32 or float16
    ``(Hc, M, 256, dsub)`` with ``d = M * dsub`` (the kernel reads float32: pass float32 to avoid a
    conversion per call). With ``Hc > 1`` (one codebook per kv head) ``x`` must be ``(..., Hc, d)`` and
    head ``h`` rows use ``centroids[h]``. Returns uint8 codes ``(..., M)``, written into ``out`` when
    given (same side, C-contiguous, that shape).

    GPU arrays run the ``pq_encode.cu`` kernel on CuPy's current stream (fp32 distances: on
    near-ties the code may differ from the float64 reference, see ``cuda_src/pq_common.cuh``);
    NumPy arrays get :func:`million_cupy.reference.pq_encode` exactly.
    """
    xa = as_array(x, "x", dtypes=ENCODE_DTYPES)
    ca = as_array(centroids, "centroids", ndim=4, dtypes=CENTROID_DTYPES)
    Hc, M, C, dsub = ca.shape
    if C != NUM_CENTROIDS:
        raise UnsupportedConfiguration(f"centroids: expected C = {NUM_CENTROIDS} centroids per subspace, got C = {C}")
    _check_geometry(M, M * dsub, "centroids")
    d = M * dsub
    gpu = is_gpu_array(xa)
    if is_gpu_array(ca) != gpu:
        raise TypeError(f"x and centroids must both be GPU arrays or both host arrays; x is {_side(gpu)}")
    if xa.ndim < 1 or xa.shape[-1] != d:
        raise ValueError(f"x: expected last dimension d = {d}, got shape {tuple(xa.shape)}")
    if Hc > 1 and (xa.ndim < 2 or xa.shape[-2] != Hc):
        raise ValueError(f"x: {Hc} per-head codebooks need shape (..., {Hc}, {d}), got {tuple(xa.shape)}")
    shape = tuple(xa.shape[:-1]) + (M,)
    if out is not None:
        out = as_array(out, "out", dtypes=("uint8",), shape=shape)
        if is_gpu_array(out) != gpu:
            raise TypeError(f"out: expected a {'GPU' if gpu else 'host'} array like x")
        if not out.flags.c_contiguous:
            raise ValueError("out: expected a C-contiguous array")
    if gpu:
        return _encode_gpu(xa, ca, shape, out)
    if Hc == 1:
        codes = reference.pq_encode(xa, ca[0])
    else:
        codes = np.stack([reference.pq_encode(xa[..., h, :], ca[h]) for h in range(Hc)], axis=-2)
    if out is None:
        return codes
    out[...] = codes
    return out


def _side(gpu: bool) -> str:
    return "a GPU array" if gpu else "a host array"


def _encode_gpu(x, centroids, shape: tuple[int, ...], out):
    cp = cupy()
    Hc, M, _, dsub = centroids.shape
    if x.dtype == np.float64:
        x = x.astype(np.float32)  # the kernel reads float16 / bfloat16 / float32 rows
    if not x.flags.c_contiguous or x.data.ptr % 16:
        x = x.copy(order="C")  # the kernel reads rows with aligned vector loads
    with x.device:  # compile for, allocate on and launch on the device holding x
        centroids = cp.ascontiguousarray(centroids, dtype=cp.float32)
        if out is None:
            out = cp.empty(shape, dtype=cp.uint8)
        n_rows = x.size // (M * dsub)
        if n_rows == 0:
            return out
        tiles = -(-(n_rows // Hc) // (_ENCODE_THREADS * _ENCODE_ROWS))
        tiles = min(tiles, _MAX_GRID_X // (M * Hc))
        kernel = kernels.get_kernel("pq_encode.cu", _encode_variant(dsub, dtype_name(x.dtype)))
        kernel((M * Hc * tiles,), (_ENCODE_THREADS,), (x, centroids, out, np.int64(n_rows), np.int32(M), np.int32(Hc)))
    return out


# --------------------------------------------------------------------------------------------
# k-means (one implementation for NumPy and CuPy: `xp` is the array module)
# --------------------------------------------------------------------------------------------


def _train_pq(x, M: int, iters: int, seed: int, progress: bool | None):
    """Per-subspace k-means, all M subspaces batched: returns float32 centroids (M, C, dsub).

    k-means++ init per subspace, then ``iters`` Lloyd rounds (assign every point, move every
    centroid to its cluster mean). Random draws come from ``numpy.random.default_rng(seed)`` on the
    host for both sides, so a seed gives the same init stream on CPU and GPU.
    """
    xp = array_module(x)
    n, d = x.shape
    dsub = d // M
    # (M, n, dsub): subspace m's k-means is batch entry m of every matmul and reduction.
    xs = xp.ascontiguousarray(x.astype(xp.float32).reshape(n, M, dsub).transpose(1, 0, 2))
    rng = np.random.default_rng(seed)
    centroids = _kmeans_pp(xp, xs, rng)
    xnorm = (xs * xs).sum(axis=2)
    with _progress(iters, f"k-means M={M}", progress, M * n * NUM_CENTROIDS * iters) as bar:
        for _ in range(iters):
            labels, dist = _assign(xp, xs, xnorm, centroids)
            centroids = _update(xp, xs, labels, dist)
            bar.update()
    return centroids


def _kmeans_pp(xp, xs, rng: np.random.Generator):
    """k-means++ seeding of every subspace: each next centroid is a point drawn with probability
    proportional to its squared distance to the nearest centroid chosen so far."""
    M, n, dsub = xs.shape
    sub = xp.arange(M)
    first = xp.asarray(rng.integers(n, size=M))
    draws = xp.asarray(rng.random((NUM_CENTROIDS - 1, M)))
    centroids = xp.empty((M, NUM_CENTROIDS, dsub), dtype=xp.float32)
    centroids[:, 0] = xs[sub, first]
    d2 = ((xs - centroids[:, :1]) ** 2).sum(axis=2)  # (M, n) squared distance to the nearest centroid
    for t in range(1, NUM_CENTROIDS):
        cum = xp.cumsum(d2, axis=1, dtype=xp.float64)
        r = draws[t - 1] * cum[:, -1]
        # First index whose running sum exceeds r; a zero total (fewer distinct points than
        # centroids chosen so far) falls back to the last point rather than dividing by zero.
        pick = xp.minimum((cum <= r[:, None]).sum(axis=1), n - 1)
        centroids[:, t] = xs[sub, pick]
        d2 = xp.minimum(d2, ((xs - centroids[:, t : t + 1]) ** 2).sum(axis=2))
    return centroids


def _assign(xp, xs, xnorm, centroids):
    """Nearest centroid of every point and its squared distance, both (M, n).

    Distances are ||x||^2 - 2 x.c + ||c||^2 via batched (M, rows, dsub) @ (M, dsub, C) matmuls,
    chunked over points so the (M, rows, C) block stays within _TRAIN_CHUNK_ELEMENTS.
    """
    M, n, _ = xs.shape
    C = centroids.shape[1]
    cnorm = (centroids * centroids).sum(axis=2)[:, None, :]
    minus2_ct = xp.ascontiguousarray(-2.0 * centroids.transpose(0, 2, 1))  # exact scaling: one pass fewer per block
    labels = xp.empty((M, n), dtype=xp.int64)
    dist = xp.empty((M, n), dtype=xp.float32)
    step = max(1, _TRAIN_CHUNK_ELEMENTS["cpu" if xp is np else "gpu"] // (M * C))
    for s in range(0, n, step):
        block = xp.matmul(xs[:, s : s + step], minus2_ct)
        block += cnorm
        lab = xp.argmin(block, axis=2)
        labels[:, s : s + step] = lab
        dist[:, s : s + step] = xp.take_along_axis(block, lab[..., None], axis=2)[..., 0]
    dist += xnorm
    return labels, xp.maximum(dist, 0)  # rounding can push a near-zero distance below 0


def _update(xp, xs, labels, dist):
    """Cluster means (float64 accumulation), with empty clusters re-seeded.

    Re-seeding rule (deterministic, as scikit-learn's): in a subspace with E empty clusters, the E
    points farthest from their assigned centroid (ties: lowest point index) become the new centroids
    of the empty clusters, in cluster-index order. The clusters those points came from keep their
    means; the next assignment step moves the points over.
    """
    M, n, dsub = xs.shape
    C = NUM_CENTROIDS
    cluster = labels + (xp.arange(M) * C)[:, None]  # (M, n) ids unique across subspaces
    counts = xp.bincount(cluster.ravel(), minlength=M * C).reshape(M, C)
    slot = cluster[..., None] * dsub + xp.arange(dsub)
    sums = xp.bincount(slot.ravel(), weights=xs.ravel(), minlength=M * C * dsub).reshape(M, C, dsub)
    means = (sums / xp.maximum(counts, 1)[..., None]).astype(xp.float32)
    empty = counts == 0
    n_empty = int(empty.sum(axis=1).max())
    if n_empty == 0:
        return means
    farthest = xp.argsort(-dist, axis=1, kind="stable")[:, :n_empty]  # (M, E)
    rank = xp.clip(xp.cumsum(empty, axis=1, dtype=xp.int64) - 1, 0, n_empty - 1)  # k-th empty cluster takes farthest[k]
    seeds = xs[xp.arange(M)[:, None], xp.take_along_axis(farthest, rank, axis=1)]  # (M, C, dsub)
    return xp.where(empty[..., None], seeds, means)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _write_npz(path: PathLike, header: dict, arrays: dict[str, np.ndarray]) -> None:
    blob = np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)
    # An open file object stops np.savez from appending ".npz" to the caller's path.
    with open(path, "wb") as f:
        np.savez(f, header=blob, **arrays)  # type: ignore[arg-type]  # numpy's stub reads **arrays as its own keywords


def _read_npz(path: PathLike, magic: str, names: Sequence[str],
              fields: Sequence[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Header and arrays of a codebook file, or CodebookFormatError saying what is wrong."""
    want = f"a {magic} file (format_version {FORMAT_VERSION})"
    try:
        with np.load(path, allow_pickle=False) as z:
            header = _check_header(
                path, json.loads(z["header"].tobytes().decode("utf-8")) if "header" in z.files else None, magic, fields)
            missing = [k for k in names if k not in z.files]
            if missing:
                raise CodebookFormatError(f"{path}: expected {want} with entries {['header', *names]}, missing {missing}")
            arrays = {k: z[k] for k in names}
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except CodebookFormatError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError, UnicodeDecodeError) as exc:
        raise CodebookFormatError(f"{path}: expected {want}, got an unreadable file ({type(exc).__name__}: {exc})") from exc
    return header, arrays


def _check_header(path: PathLike, header: Any, magic: str, fields: Sequence[str]) -> dict[str, Any]:
    """``header`` if it is a codebook file's header with ``magic`` and integer ``fields``, else CodebookFormatError."""
    if not isinstance(header, dict) or header.get("magic") != magic:
        got = header.get("magic") if isinstance(header, dict) else "no JSON header object"
        raise CodebookFormatError(f"{path}: expected magic {magic!r}, got {got!r}")
    if header.get("format_version") != FORMAT_VERSION:
        raise CodebookFormatError(
            f"{path}: expected format_version {FORMAT_VERSION}, got {header.get('format_version')!r}"
        )
    bad = [f for f in fields if f != "dtype" and not isinstance(header.get(f), int)]
    if bad or not isinstance(header.get("dtype"), str):
        raise CodebookFormatError(f"{path}: expected integer header fields {list(fields)} and a dtype name, got {header}")
    return header


def _check_array(path: PathLike, name: str, arr: np.ndarray, shape: tuple[int, ...], dtype: str) -> None:
    if tuple(arr.shape) != shape or dtype_name(arr.dtype) != dtype:
        raise CodebookFormatError(
            f"{path}: header promises {name} of shape {shape} and dtype {dtype}, "
            f"file holds {tuple(arr.shape)} {dtype_name(arr.dtype)}"
        )


# --------------------------------------------------------------------------------------------
# Codebook
# --------------------------------------------------------------------------------------------


class Codebook:
    """Centroids ``(M, C, dsub)`` of one vector space: 8-bit codes (``C = 256``), ``d = M * dsub``.

    ``centroids`` may be float16 or float32, NumPy or any GPU array :func:`~million_cupy.interop.as_array`
    accepts; the codebook keeps its own copy on that side. Supported: ``d`` in {64, 128, 256},
    ``dsub`` in {1, 2, 4, 8}; anything else raises :class:`~million_cupy.errors.UnsupportedConfiguration`.
    """

    def __init__(self, centroids: Any) -> None:
        c = as_array(centroids, "centroids", ndim=3, dtypes=CENTROID_DTYPES)
        M, C, dsub = c.shape
        if C != NUM_CENTROIDS:
            raise UnsupportedConfiguration(
                f"centroids: expected C = {NUM_CENTROIDS} centroids per subspace ({NBITS}-bit codes), got C = {C}"
            )
        _check_geometry(M, M * dsub, "centroids")
        xp = array_module(c)
        bad = int((~xp.isfinite(c.astype(xp.float32)).all(axis=2)).sum())  # one device sync on the GPU
        if bad:
            raise ValueError(f"centroids: expected finite values, got NaN or inf in {bad} of {M * C} centroids "
                             f"(M = {M} subspaces x C = {C}); encoding against them would pick arbitrary codes")
        # A private copy: the cached float32 view must never go stale under caller mutation.
        self._centroids = xp.array(c, copy=True, order="C")
        self._f32 = None

    def __repr__(self) -> str:
        side = "gpu" if self.is_gpu else "cpu"
        return f"Codebook(M={self.M}, C={self.C}, dsub={self.dsub}, d={self.d}, dtype={self.dtype}, {side})"

    @property
    def centroids(self):
        """The centroids ``(M, C, dsub)`` in the codebook's dtype and side (treat as read-only)."""
        return self._centroids

    @property
    def M(self) -> int:
        """Subspaces (code bytes per vector)."""
        return int(self._centroids.shape[0])

    @property
    def C(self) -> int:
        """Centroids per subspace (256: 8-bit codes)."""
        return int(self._centroids.shape[1])

    @property
    def dsub(self) -> int:
        """Dimensions per subspace ``d // M``."""
        return int(self._centroids.shape[2])

    @property
    def d(self) -> int:
        """Vector dimension ``M * dsub``."""
        return self.M * self.dsub

    @property
    def nbits(self) -> int:
        """Bits per code (8)."""
        return NBITS

    @property
    def dtype(self) -> str:
        """Dtype name of the centroids ("float16" or "float32")."""
        return dtype_name(self._centroids.dtype)

    @property
    def is_gpu(self) -> bool:
        """True when the centroids are a GPU (CuPy) array."""
        return is_gpu_array(self._centroids)

    def to_gpu(self) -> Codebook:
        """A copy of this codebook on the current CUDA device."""
        cp = require_gpu("Codebook.to_gpu (and load(..., gpu=True))",
                         "keep the codebook on the CPU (gpu=False): the CPU path encodes and decodes with NumPy")
        return Codebook(cp.asarray(self._centroids))

    def to_cpu(self) -> Codebook:
        """A copy of this codebook in host memory."""
        return Codebook(to_numpy(self._centroids))

    def centroids_f32(self):
        """Float32 centroids ``(M, C, dsub)`` on the codebook's side (computed once, then cached)."""
        if self._f32 is None:
            self._f32 = array_module(self._centroids).ascontiguousarray(self._centroids, dtype=np.float32)
        return self._f32

    def _check_side(self, arr, name: str) -> None:
        if is_gpu_array(arr) != self.is_gpu:
            fix = "to_gpu()" if is_gpu_array(arr) else "to_cpu()"
            raise TypeError(
                f"{name}: is {_side(is_gpu_array(arr))} but this codebook lives on the "
                f"{'GPU' if self.is_gpu else 'CPU'}; use codebook.{fix}"
            )

    def encode(self, x: Any, out: Any = None, *, stream: Any = None):
        """uint8 codes ``(..., M)`` of vectors ``x`` ``(..., d)`` (float16, bfloat16 or float32).

        Runs where ``x`` lives, which must be this codebook's side; ``out`` (uint8, C-contiguous,
        shape ``(..., M)``) receives the codes when given. GPU work runs on ``stream`` (a CuPy stream,
        an object with ``.cuda_stream`` or a raw handle; None: CuPy's current stream). See :func:`encode`
        for the numerics.
        """
        with _on(stream, x):
            xa = as_array(x, "x", dtypes=ENCODE_DTYPES)
            self._check_side(xa, "x")
            return encode(xa, self.centroids_f32()[None], out=out)

    def decode(self, codes: Any, *, stream: Any = None):
        """Vectors ``(..., d)`` in the codebook's dtype for uint8 ``codes`` ``(..., M)`` (exact gather)."""
        with _on(stream, codes):
            k = as_array(codes, "codes", dtypes=("uint8",))
            self._check_side(k, "codes")
            if k.ndim < 1 or k.shape[-1] != self.M:
                raise ValueError(f"codes: expected last dimension M = {self.M}, got shape {tuple(k.shape)}")
            xp = array_module(k)
            flat = self._centroids.reshape(self.M * self.C, self.dsub)
            index = k.astype(xp.int32) + xp.arange(self.M, dtype=xp.int32) * self.C
            return xp.take(flat, index, axis=0).reshape(*k.shape[:-1], self.d)

    @classmethod
    def train(
        cls,
        samples: Any,
        M: int,
        nbits: int = NBITS,
        iters: int = 25,
        seed: int = 0,
        progress: bool | None = None,
    ) -> Codebook:
        """Train a float32 codebook with per-subspace k-means on ``samples`` ``(n, d)``.

        k-means++ init (per subspace, from ``seed``), then ``iters`` Lloyd rounds (assign, then move each
        centroid to its cluster mean), all ``M`` subspaces batched. A cluster left empty is re-seeded
        deterministically: in a subspace with ``E`` empty clusters, the ``E`` points farthest from their
        centroid (ties: lowest point index) become those clusters' centroids, in cluster order. Runs with CuPy when
        ``samples`` is a GPU array (the codebook is then on the GPU), with NumPy otherwise. A seed
        gives identical results on the CPU; on the GPU, float atomics in the cluster sums may change
        the last bits. ``progress``: True/False forces a tqdm bar over iterations; None shows one only
        for long runs when stderr is a terminal. Needs ``n >= 256`` samples.

        CuPy matmuls must run in full fp32 for this (CuPy's default; ``CUPY_TF32=1`` degrades it).
        """
        x = as_array(samples, "samples", ndim=2, dtypes=SAMPLE_DTYPES)
        _check_finite(x, "samples")
        n, d = x.shape
        _check_nbits(nbits)
        _check_geometry(M, d, "samples")
        if n < NUM_CENTROIDS:
            raise ValueError(
                f"samples: k-means with C = {NUM_CENTROIDS} centroids needs at least {NUM_CENTROIDS} samples, got n = {n}"
            )
        if iters < 0:
            raise ValueError(f"iters: expected a non-negative iteration count, got {iters}")
        return cls(_train_pq(x, M, int(iters), seed, progress))

    def save(self, path: PathLike) -> None:
        """Write the codebook to ``path`` (format in the module docstring)."""
        header = {
            "magic": CODEBOOK_MAGIC,
            "format_version": FORMAT_VERSION,
            "M": self.M,
            "C": self.C,
            "d": self.d,
            "dsub": self.dsub,
            "dtype": self.dtype,
        }
        _write_npz(path, header, {"centroids": to_numpy(self._centroids)})

    @classmethod
    def load(cls, path: PathLike, *, gpu: bool = False) -> Codebook:
        """Read a codebook written by :meth:`save` (onto the GPU when ``gpu``); CodebookFormatError on a bad file."""
        fields = ("M", "C", "d", "dsub", "dtype")
        h, arrays = _read_npz(path, CODEBOOK_MAGIC, ("centroids",), fields)
        if h["d"] != h["M"] * h["dsub"]:
            raise CodebookFormatError(f"{path}: header d = {h['d']} is not M * dsub = {h['M']} * {h['dsub']}")
        _check_array(path, "centroids", arrays["centroids"], (h["M"], h["C"], h["dsub"]), h["dtype"])
        try:
            cb = cls(arrays["centroids"])
        except (UnsupportedConfiguration, TypeError) as exc:
            raise CodebookFormatError(f"{path}: not a supported codebook: {exc}") from exc
        return cb.to_gpu() if gpu else cb


# --------------------------------------------------------------------------------------------
# ModelCodebooks
# --------------------------------------------------------------------------------------------

LayerCodebooks = Union[Codebook, Sequence[Codebook]]


class ModelCodebooks:
    """One key and one value codebook per layer, shared by all kv heads or one per kv head.

    ``keys[l]`` / ``values[l]`` is a :class:`Codebook` (shared) or a sequence of ``nh_k`` codebooks
    (per kv head). Every codebook must agree on ``M``, ``d``, ``C``, dtype and side, and every layer
    (keys and values alike) on the per-head count.
    """

    def __init__(self, keys: Sequence[LayerCodebooks], values: Sequence[LayerCodebooks]) -> None:
        if len(keys) == 0 or len(keys) != len(values):
            raise ValueError(f"keys, values: expected one entry per layer in each, got {len(keys)} and {len(values)}")
        self._keys = [self._layer(entry, "keys", i) for i, entry in enumerate(keys)]
        self._values = [self._layer(entry, "values", i) for i, entry in enumerate(values)]
        ref = self._keys[0][0]
        heads = len(self._keys[0])
        for kind, layers in (("keys", self._keys), ("values", self._values)):
            for i, layer in enumerate(layers):
                if len(layer) != heads:
                    raise ValueError(f"{kind}[{i}]: expected {heads} codebook(s) per layer like keys[0], got {len(layer)}")
                for h, cb in enumerate(layer):
                    got = (cb.M, cb.d, cb.C, cb.dtype, cb.is_gpu)
                    want = (ref.M, ref.d, ref.C, ref.dtype, ref.is_gpu)
                    if got != want:
                        raise ValueError(
                            f"{kind}[{i}][{h}]: expected (M, d, C, dtype, is_gpu) = {want} like keys[0][0], got {got}"
                        )
        self._stacks: dict[tuple[int, int], Any] = {}

    @staticmethod
    def _layer(entry: LayerCodebooks, kind: str, i: int) -> tuple[Codebook, ...]:
        if isinstance(entry, Codebook):
            return (entry,)
        layer = tuple(entry) if isinstance(entry, (list, tuple)) else ()
        if not layer or not all(isinstance(cb, Codebook) for cb in layer):
            raise TypeError(f"{kind}[{i}]: expected a Codebook or a non-empty sequence of Codebooks, got {entry!r}")
        return layer

    def __repr__(self) -> str:
        side = "gpu" if self.is_gpu else "cpu"
        return (
            f"ModelCodebooks(num_layers={self.num_layers}, num_heads_per_layer={self.num_heads_per_layer}, "
            f"M={self.M}, d={self.d}, dtype={self.dtype}, {side})"
        )

    @property
    def num_layers(self) -> int:
        """Layers (each with a K and a V codebook, or one per kv head)."""
        return len(self._keys)

    @property
    def num_heads_per_layer(self) -> int:
        """1 when every kv head shares a layer's codebook, else ``nh_k``."""
        return len(self._keys[0])

    @property
    def M(self) -> int:
        """Subspaces (code bytes per vector)."""
        return self._keys[0][0].M

    @property
    def C(self) -> int:
        """Centroids per subspace (256: 8-bit codes)."""
        return self._keys[0][0].C

    @property
    def d(self) -> int:
        """Vector dimension ``M * dsub``."""
        return self._keys[0][0].d

    @property
    def dsub(self) -> int:
        """Dimensions per subspace ``d // M``."""
        return self._keys[0][0].dsub

    @property
    def dtype(self) -> str:
        """Dtype name of the centroids ("float16" or "float32")."""
        return self._keys[0][0].dtype

    @property
    def is_gpu(self) -> bool:
        """True when the centroids are a GPU (CuPy) array."""
        return self._keys[0][0].is_gpu

    def _check_layer(self, layer: int) -> int:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer: expected 0 <= layer < {self.num_layers}, got {layer}")
        return layer

    def key_codebooks(self, layer: int) -> tuple[Codebook, ...]:
        """Layer ``layer``'s key codebooks (one, or one per kv head)."""
        return self._keys[self._check_layer(layer)]

    def value_codebooks(self, layer: int) -> tuple[Codebook, ...]:
        """Layer ``layer``'s value codebooks (one, or one per kv head)."""
        return self._values[self._check_layer(layer)]

    def _stack(self, layer: int, kind: int):
        key = (self._check_layer(layer), kind)
        stack = self._stacks.get(key)
        if stack is None:
            layer_cbs = (self._keys, self._values)[kind][layer]
            xp = array_module(layer_cbs[0].centroids)
            stack = xp.stack([cb.centroids_f32() for cb in layer_cbs])
            self._stacks[key] = stack
        return stack

    def key_centroids(self, layer: int):
        """Float32 ``(Hc, M, C, dsub)`` key centroids of ``layer`` on the codebooks' side (cached)."""
        return self._stack(layer, 0)

    def value_centroids(self, layer: int):
        """Float32 ``(Hc, M, C, dsub)`` value centroids of ``layer`` on the codebooks' side (cached)."""
        return self._stack(layer, 1)

    def _map(self, fn) -> ModelCodebooks:
        return ModelCodebooks(
            [[fn(cb) for cb in layer] for layer in self._keys], [[fn(cb) for cb in layer] for layer in self._values]
        )

    def to_gpu(self) -> ModelCodebooks:
        """A copy on the current CUDA device."""
        return self._map(Codebook.to_gpu)

    def to_cpu(self) -> ModelCodebooks:
        """A copy in host memory."""
        return self._map(Codebook.to_cpu)

    @classmethod
    def train(
        cls,
        k_samples: Sequence[Any],
        v_samples: Sequence[Any],
        M: int,
        nbits: int = NBITS,
        iters: int = 25,
        seed: int = 0,
        per_head: bool = False,
        progress: bool | None = None,
    ) -> ModelCodebooks:
        """Train every layer's key and value codebooks.

        ``k_samples[l]`` / ``v_samples[l]`` are ``(n_l, nh_k, d)`` key / value vectors of layer ``l``
        (``n_l`` may differ per layer, ``nh_k`` and ``d`` may not). ``per_head=False`` trains one codebook
        per layer and kind on all heads' vectors pooled; ``per_head=True`` one per kv head. Each
        codebook's seed is derived from ``(seed, layer, kind, head)`` with ``numpy.random.SeedSequence``.
        ``progress`` as in :meth:`Codebook.train`, with the bar counting layers.
        """
        if len(k_samples) == 0 or len(k_samples) != len(v_samples):
            raise ValueError(
                f"k_samples, v_samples: expected one array per layer in each, got {len(k_samples)} and {len(v_samples)}"
            )
        _check_nbits(nbits)
        layers: list[tuple[Any, Any]] = []  # each layer's (K, V) samples, NumPy or CuPy
        for l, (ks, vs) in enumerate(zip(k_samples, v_samples)):
            ka = as_array(ks, f"k_samples[{l}]", ndim=3, dtypes=SAMPLE_DTYPES)
            va = as_array(vs, f"v_samples[{l}]", ndim=3, dtypes=SAMPLE_DTYPES)
            want = tuple(layers[0][0].shape[1:]) if layers else tuple(ka.shape[1:])
            for name, arr in ((f"k_samples[{l}]", ka), (f"v_samples[{l}]", va)):
                if tuple(arr.shape[1:]) != want:
                    raise ValueError(
                        f"{name}: expected shape (n, nh_k, d) = (*, {want[0]}, {want[1]}), got {tuple(arr.shape)}"
                    )
                rows = arr.shape[0] if per_head else arr.shape[0] * arr.shape[1]
                if rows < NUM_CENTROIDS:
                    raise ValueError(f"{name}: k-means needs at least {NUM_CENTROIDS} vectors per codebook, got {rows}")
            layers.append((ka, va))
        nh_k, d = layers[0][0].shape[1:]
        _check_geometry(M, d, "k_samples")
        n_total = sum(k.shape[0] * nh_k for k, _ in layers)
        trained: tuple[list, list] = ([], [])
        with _progress(len(layers), "codebooks (layers)", progress, 2 * M * n_total * NUM_CENTROIDS * iters) as bar:
            for l, pair in enumerate(layers):
                for kind, arr in enumerate(pair):
                    if per_head:
                        cbs = [
                            Codebook.train(arr[:, h], M, nbits, iters, _derive_seed(seed, l, kind, h), progress=False)
                            for h in range(nh_k)
                        ]
                    else:
                        pooled = arr.reshape(arr.shape[0] * nh_k, d)
                        cbs = [Codebook.train(pooled, M, nbits, iters, _derive_seed(seed, l, kind, 0), progress=False)]
                    trained[kind].append(cbs)
                bar.update()
        return cls(trained[0], trained[1])

    def save(self, path: PathLike) -> None:
        """Write every codebook to ``path`` (format in the module docstring)."""
        header = {
            "magic": MODEL_CODEBOOKS_MAGIC,
            "format_version": FORMAT_VERSION,
            "num_layers": self.num_layers,
            "num_heads_per_layer": self.num_heads_per_layer,
            "M": self.M,
            "C": self.C,
            "d": self.d,
            "dsub": self.dsub,
            "dtype": self.dtype,
        }
        arrays = {
            name: np.stack([np.stack([to_numpy(cb.centroids) for cb in layer]) for layer in layers])
            for name, layers in (("keys", self._keys), ("values", self._values))
        }
        _write_npz(path, header, arrays)

    @classmethod
    def load(cls, path: PathLike, *, gpu: bool = False) -> ModelCodebooks:
        """Read codebooks written by :meth:`save` (onto the GPU when ``gpu``); CodebookFormatError on a bad file."""
        fields = ("num_layers", "num_heads_per_layer", "M", "C", "d", "dsub", "dtype")
        h, arrays = _read_npz(path, MODEL_CODEBOOKS_MAGIC, ("keys", "values"), fields)
        if h["d"] != h["M"] * h["dsub"]:
            raise CodebookFormatError(f"{path}: header d = {h['d']} is not M * dsub = {h['M']} * {h['dsub']}")
        shape = (h["num_layers"], h["num_heads_per_layer"], h["M"], h["C"], h["dsub"])
        for name in ("keys", "values"):
            _check_array(path, name, arrays[name], shape, h["dtype"])
        if h["num_layers"] < 1 or h["num_heads_per_layer"] < 1:
            raise CodebookFormatError(f"{path}: expected at least one layer and one head, got header {h}")
        try:
            keys = [[Codebook(c) for c in layer] for layer in arrays["keys"]]
            values = [[Codebook(c) for c in layer] for layer in arrays["values"]]
            model = cls(keys, values)
        except (UnsupportedConfiguration, TypeError) as exc:
            raise CodebookFormatError(f"{path}: not a supported set of codebooks: {exc}") from exc
        return model.to_gpu() if gpu else model


def _derive_seed(seed: int, layer: int, kind: int, head: int) -> int:
    return int(np.random.SeedSequence([seed, layer, kind, head]).generate_state(1)[0])
