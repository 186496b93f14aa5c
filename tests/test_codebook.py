"""Codebook / ModelCodebooks: validation, k-means quality, encode/decode against the reference, files.

GPU codes are checked by quantization error, not bit equality alone: the kernel ranks centroids by
fp32 ||c||^2 - 2 x.c, which can flip near-ties relative to the float64 reference (see pq_common.cuh).
"""

import functools
import json
import math

import numpy as np
import pytest

from million_cupy import codebook, kernels, reference
from million_cupy.codebook import Codebook, ModelCodebooks
from million_cupy.errors import CodebookFormatError, UnsupportedConfiguration
from million_cupy.interop import bfloat16_dtype, resolve_dtype, to_numpy

C = 256


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def lloyd_reference(x, M, iters, seed):
    """Plain float64 Lloyd's k-means per subspace with k-means++ init: the quality yardstick."""
    n, d = x.shape
    dsub = d // M
    rng = np.random.default_rng(seed)
    out = np.empty((M, C, dsub))
    for m in range(M):
        xs = x[:, m * dsub : (m + 1) * dsub].astype(np.float64)
        c = np.empty((C, dsub))
        c[0] = xs[rng.integers(n)]
        d2 = ((xs - c[0]) ** 2).sum(axis=1)
        for t in range(1, C):
            c[t] = xs[rng.choice(n, p=d2 / d2.sum())]
            d2 = np.minimum(d2, ((xs - c[t]) ** 2).sum(axis=1))
        for _ in range(iters):
            dist = (xs**2).sum(axis=1)[:, None] - 2 * xs @ c.T + (c**2).sum(axis=1)
            labels = dist.argmin(axis=1)
            counts = np.bincount(labels, minlength=C)
            filled = counts > 0  # an empty cluster keeps its centroid
            for j in range(dsub):
                sums = np.bincount(labels, weights=xs[:, j], minlength=C)
                c[filled, j] = sums[filled] / counts[filled]
        out[m] = c
    return out


def pq_mse(x, centroids):
    """Mean squared quantization error per element under the float64 reference encoder."""
    x64 = to_numpy(x).astype(np.float64)
    c = to_numpy(centroids)
    return float(((reference.pq_decode(reference.pq_encode(x64, c), c) - x64) ** 2).mean())


def mixture(rng, n, d, clusters=32):
    """Anisotropic Gaussian mixture: structured like real keys, hard enough to separate k-means variants."""
    centers = 2.0 * rng.standard_normal((clusters, d))
    scales = rng.uniform(0.2, 1.5, size=d)
    return (centers[rng.integers(clusters, size=n)] + scales * rng.standard_normal((n, d))).astype(np.float32)


def random_codebook(rng, M, dsub, dtype=np.float32):
    return Codebook(rng.standard_normal((M, C, dsub)).astype(dtype))


def write_npz(path, header, **arrays):
    blob = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, header=blob, **arrays)


def codebook_header(**overrides):
    header = {"magic": "million-cupy-codebook", "format_version": 1, "M": 16, "C": C, "d": 64, "dsub": 4,
              "dtype": "float32"}
    header.update(overrides)
    return header


def model_codebooks(rng, layers=2, heads=1, M=16, dsub=4, dtype=np.float32):
    def layer():
        cbs = [random_codebook(rng, M, dsub, dtype) for _ in range(heads)]
        return cbs[0] if heads == 1 else cbs

    return ModelCodebooks([layer() for _ in range(layers)], [layer() for _ in range(layers)])


# ---------------------------------------------------------------------------------------------
# construction and validation
# ---------------------------------------------------------------------------------------------


def test_properties_and_private_copy(rng):
    raw = rng.standard_normal((32, C, 4)).astype(np.float16)
    cb = Codebook(raw)
    assert (cb.M, cb.C, cb.dsub, cb.d, cb.nbits, cb.dtype, cb.is_gpu) == (32, C, 4, 128, 8, "float16", False)
    f32 = cb.centroids_f32()
    assert f32.dtype == np.float32 and f32.shape == (32, C, 4) and f32.flags.c_contiguous
    assert cb.centroids_f32() is f32
    np.testing.assert_array_equal(f32, raw.astype(np.float32))
    raw[:] = 0  # the codebook keeps its own copy
    np.testing.assert_array_equal(cb.centroids, f32.astype(np.float16))
    assert "M=32" in repr(cb)
    cpu = cb.to_cpu()
    assert cpu is not cb and np.array_equal(cpu.centroids, cb.centroids)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((16, 128, 4), r"expected C = 256 .*got C = 128"),
        ((16, 512, 4), r"got C = 512"),
        ((48, C, 2), r"d must be one of \[64, 128, 256\], got d = 96"),
        ((16, C, 32), r"d must be one of .*got d = 512"),
        ((4, C, 16), r"dsub = d / M must be one of \[1, 2, 4, 8\] .*got M = 4"),
    ],
)
def test_unsupported_shapes(shape, match):
    with pytest.raises(UnsupportedConfiguration, match=match):
        Codebook(np.zeros(shape, np.float32))


def test_bad_centroid_arrays():
    with pytest.raises(TypeError, match="float16"):
        Codebook(np.zeros((16, C, 4), np.float64))
    with pytest.raises(ValueError, match="3 dimensions"):
        Codebook(np.zeros((C, 4), np.float32))
    for dtype in (np.float32, np.float16):
        bad = np.zeros((16, C, 4), dtype)
        bad[3, 7, 1], bad[5, 0, 0] = np.nan, np.inf
        with pytest.raises(ValueError, match=r"expected finite values, got NaN or inf in 2 of 4096 centroids"):
            Codebook(bad)


def test_train_validation(rng):
    x = rng.standard_normal((300, 64)).astype(np.float32)
    with pytest.raises(UnsupportedConfiguration, match="got 4"):
        Codebook.train(x, 16, nbits=4)
    with pytest.raises(UnsupportedConfiguration, match="got M = 5"):
        Codebook.train(x, 5)
    with pytest.raises(UnsupportedConfiguration, match="got d = 48"):
        Codebook.train(x[:, :48], 12)
    with pytest.raises(ValueError, match="at least 256 samples, got n = 255"):
        Codebook.train(x[:255], 16)
    with pytest.raises(ValueError, match="non-negative"):
        Codebook.train(x, 16, iters=-1)


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("M", [16, 32])
def test_train_mse_within_2pct_of_float64_lloyd(rng, M):
    x = mixture(rng, 4096, 64)
    cb = Codebook.train(x, M, iters=25, seed=0)
    assert cb.dtype == "float32" and cb.M == M and not cb.is_gpu
    ours = pq_mse(x, cb.centroids)
    ref = pq_mse(x, lloyd_reference(x, M, 25, seed=0))
    assert abs(ours / ref - 1) < 0.02, (ours, ref)


def test_train_is_deterministic_per_seed(rng):
    x = mixture(rng, 600, 64)
    a = Codebook.train(x, 8, iters=3, seed=7)
    b = Codebook.train(x, 8, iters=3, seed=7)
    c = Codebook.train(x, 8, iters=3, seed=8)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert not np.array_equal(a.centroids, c.centroids)


def test_train_accepts_half_precision_samples(rng):
    x = mixture(rng, 512, 64)
    for dtype in (np.float16, bfloat16_dtype(), np.float64):
        cb = Codebook.train(x.astype(dtype), 16, iters=2)
        assert np.isfinite(cb.centroids).all()


def test_duplicate_points_exercise_empty_cluster_reseeding(rng):
    # 100 distinct rows repeated: k-means++ runs out of distinct seeds after 100 picks, so most clusters
    # start as duplicates and go empty in the first assignment. Re-seeding must keep every centroid a
    # data point (never NaN, never the zero a 0/0 guard would leave) and quantization exact.
    distinct = rng.uniform(1.0, 2.0, size=(100, 64)).astype(np.float32)
    x = distinct[rng.integers(100, size=2000)]
    cb = Codebook.train(x, 16, iters=4, seed=0)
    c = cb.centroids
    assert np.isfinite(c).all()
    subs = x.reshape(-1, 16, 4)
    for m in range(16):
        assert (c[m][:, None, :] == subs[None, :, m, :]).all(axis=2).any(axis=1).all()
    assert pq_mse(x, c) == 0.0


def test_reseeding_rule_takes_farthest_points_in_cluster_order():
    # Direct check of the documented rule on one subspace: clusters 3 and 10 are empty, so they get
    # the farthest and second-farthest points (ties to the lower point index).
    n, dsub = 300, 2
    xs = np.arange(n * dsub, dtype=np.float32).reshape(1, n, dsub)
    labels = (np.arange(n) % C).reshape(1, n)
    labels[labels == 3] = 0
    labels[labels == 10] = 0
    dist = np.zeros((1, n), np.float32)
    dist[0, [50, 120, 200]] = [5.0, 7.0, 7.0]
    out = codebook._update(np, xs, labels, dist)
    np.testing.assert_array_equal(out[0, 3], xs[0, 120])
    np.testing.assert_array_equal(out[0, 10], xs[0, 200])
    np.testing.assert_array_equal(out[0, 1], xs[0, [1, 257]].mean(axis=0))


def test_progress_bar(rng, capsys):
    x = mixture(rng, 300, 64)
    Codebook.train(x, 8, iters=2, progress=True)
    assert "k-means" in capsys.readouterr().err
    Codebook.train(x, 8, iters=2, progress=False)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# encode / decode on the CPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cdtype", [np.float16, np.float32])
@pytest.mark.parametrize("xdtype", ["float16", "bfloat16", "float32"])
def test_cpu_encode_equals_reference(rng, cdtype, xdtype):
    cb = random_codebook(rng, 32, 4, cdtype)
    x = rng.standard_normal((3, 5, 128)).astype(resolve_dtype(xdtype))
    codes = cb.encode(x)
    assert codes.dtype == np.uint8 and codes.shape == (3, 5, 32)
    np.testing.assert_array_equal(codes, reference.pq_encode(x, cb.centroids))
    out = np.full((3, 5, 32), 0xAB, np.uint8)
    assert cb.encode(x, out=out) is out
    np.testing.assert_array_equal(out, codes)


def test_cpu_encode_out_validation(rng):
    cb = random_codebook(rng, 16, 4)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    with pytest.raises(ValueError, match=r"expected shape \(4, 16\)"):
        cb.encode(x, out=np.empty((4, 8), np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        cb.encode(x, out=np.empty((4, 16), np.int32))
    with pytest.raises(ValueError, match="C-contiguous"):
        cb.encode(x, out=np.empty((16, 4), np.uint8).T)
    with pytest.raises(ValueError, match="last dimension d = 64"):
        cb.encode(x[:, :32])
    with pytest.raises(TypeError, match="dtype"):
        cb.encode(x.astype(np.int32))
    # float64 is accepted, as training accepts it (one dtype policy, README "Dtypes").
    np.testing.assert_array_equal(cb.encode(x.astype(np.float64)), cb.encode(x))


def test_per_head_encode_cpu(rng):
    M, dsub, H = 16, 8, 3
    cents = rng.standard_normal((H, M, C, dsub)).astype(np.float32)
    x = rng.standard_normal((4, H, M * dsub)).astype(np.float16)
    codes = codebook.encode(x, cents)
    for h in range(H):
        np.testing.assert_array_equal(codes[:, h], reference.pq_encode(x[:, h], cents[h]))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, 128\)"):
        codebook.encode(x[:, :2], cents)


@pytest.mark.parametrize("cdtype", [np.float16, np.float32])
def test_cpu_decode_is_exact_gather(rng, cdtype):
    cb = random_codebook(rng, 64, 2, cdtype)
    codes = rng.integers(0, C, size=(2, 3, 64)).astype(np.uint8)
    x = cb.decode(codes)
    assert x.dtype == cdtype and x.shape == (2, 3, 128)
    np.testing.assert_array_equal(x.astype(np.float64), reference.pq_decode(codes, cb.centroids))
    np.testing.assert_array_equal(cb.encode(x.astype(np.float32)), codes)
    with pytest.raises(ValueError, match="M = 64"):
        cb.decode(codes[..., :32])
    with pytest.raises(TypeError, match="uint8"):
        cb.decode(codes.astype(np.int64))


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_codebook_save_load_roundtrip(rng, tmp_path, dtype):
    cb = random_codebook(rng, 16, 4, dtype)
    path = tmp_path / "cb.bin"
    cb.save(path)
    assert path.exists() and not (tmp_path / "cb.bin.npz").exists()
    back = Codebook.load(path)
    assert back.dtype == cb.dtype and not back.is_gpu
    np.testing.assert_array_equal(back.centroids, cb.centroids)


def test_codebook_load_rejects_truncated_and_corrupt_files(rng, tmp_path):
    path = tmp_path / "cb.npz"
    random_codebook(rng, 16, 4).save(path)
    data = path.read_bytes()
    bad = tmp_path / "bad.npz"
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # inside the centroid payload: zip CRC mismatch
    for blob in (data[: len(data) // 2], data[:-1], b"", b"not a codebook" * 20, bytes(flipped)):
        bad.write_bytes(blob)
        with pytest.raises(CodebookFormatError, match="expected a million-cupy-codebook file"):
            Codebook.load(bad)
    with pytest.raises(FileNotFoundError):
        Codebook.load(tmp_path / "missing.npz")


def test_codebook_load_rejects_mismatched_files(rng, tmp_path):
    good = rng.standard_normal((16, C, 4)).astype(np.float32)
    path = tmp_path / "x.npz"
    cases = [
        (codebook_header(magic="something-else"), {"centroids": good}, "expected magic 'million-cupy-codebook'"),
        (codebook_header(format_version=2), {"centroids": good}, "expected format_version 1, got 2"),
        (codebook_header(M=32, d=128), {"centroids": good}, r"header promises centroids of shape \(32, 256, 4\)"),
        (codebook_header(dtype="float16"), {"centroids": good}, "dtype float16"),
        (codebook_header(d=128), {"centroids": good}, "is not M \\* dsub"),
        (codebook_header(M="16"), {"centroids": good}, "integer header fields"),
        (codebook_header(), {"other": good}, r"missing \['centroids'\]"),
        (codebook_header(C=128), {"centroids": good[:, :128]}, "not a supported codebook"),
    ]
    for header, arrays, match in cases:
        write_npz(path, header, **arrays)
        with pytest.raises(CodebookFormatError, match=match):
            Codebook.load(path)
    model_codebooks(rng).save(path)
    with pytest.raises(CodebookFormatError, match="got 'million-cupy-model-codebooks'"):
        Codebook.load(path)


# ---------------------------------------------------------------------------------------------
# ModelCodebooks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [1, 4])
def test_model_codebooks_structure_and_centroid_stacks(rng, heads):
    mc = model_codebooks(rng, layers=3, heads=heads, dtype=np.float16)
    assert (mc.num_layers, mc.num_heads_per_layer, mc.M, mc.C, mc.d, mc.dsub, mc.dtype, mc.is_gpu) == (
        3, heads, 16, C, 64, 4, "float16", False)
    for layer in range(3):
        for stack, cbs in ((mc.key_centroids(layer), mc.key_codebooks(layer)),
                           (mc.value_centroids(layer), mc.value_codebooks(layer))):
            assert stack.shape == (heads, 16, C, 4) and stack.dtype == np.float32
            np.testing.assert_array_equal(stack, np.stack([cb.centroids.astype(np.float32) for cb in cbs]))
    assert mc.key_centroids(1) is mc.key_centroids(1)
    assert mc.key_centroids(1) is not mc.value_centroids(1)
    with pytest.raises(IndexError, match="0 <= layer < 3"):
        mc.key_centroids(3)
    assert "num_layers=3" in repr(mc)
    np.testing.assert_array_equal(mc.to_cpu().value_centroids(2), mc.value_centroids(2))


def test_model_codebooks_validation(rng):
    a = random_codebook(rng, 16, 4)
    other_m = random_codebook(rng, 32, 2)
    half = random_codebook(rng, 16, 4, np.float16)
    with pytest.raises(ValueError, match="one entry per layer"):
        ModelCodebooks([a, a], [a])
    with pytest.raises(ValueError, match="one entry per layer"):
        ModelCodebooks([], [])
    with pytest.raises(ValueError, match=r"values\[1\]\[0\]: expected \(M, d, C, dtype, is_gpu\)"):
        ModelCodebooks([a, a], [a, other_m])
    with pytest.raises(ValueError, match=r"keys\[1\]\[0\].*float16"):
        ModelCodebooks([a, half], [a, a])
    with pytest.raises(ValueError, match=r"keys\[1\]: expected 2 codebook\(s\)"):
        ModelCodebooks([[a, a], a], [[a, a], [a, a]])
    with pytest.raises(ValueError, match=r"values\[0\]: expected 2"):
        ModelCodebooks([[a, a]], [[a, a, a]])
    with pytest.raises(TypeError, match=r"keys\[0\]: expected a Codebook"):
        ModelCodebooks([np.zeros(3)], [a])
    with pytest.raises(TypeError, match=r"values\[0\]: expected a Codebook"):
        ModelCodebooks([a], [[]])


@pytest.mark.parametrize("heads", [1, 2])
def test_model_codebooks_save_load_roundtrip(rng, tmp_path, heads):
    mc = model_codebooks(rng, layers=2, heads=heads, dtype=np.float16)
    path = tmp_path / "model.cb"
    mc.save(path)
    back = ModelCodebooks.load(path)
    assert (back.num_layers, back.num_heads_per_layer, back.dtype) == (2, heads, "float16")
    for layer in range(2):
        np.testing.assert_array_equal(back.key_centroids(layer), mc.key_centroids(layer))
        np.testing.assert_array_equal(back.value_centroids(layer), mc.value_centroids(layer))


def test_model_codebooks_load_rejects_bad_files(rng, tmp_path):
    path = tmp_path / "m.npz"
    random_codebook(rng, 16, 4).save(path)
    with pytest.raises(CodebookFormatError, match="expected magic 'million-cupy-model-codebooks', got 'million-cupy-codebook'"):
        ModelCodebooks.load(path)
    keys = rng.standard_normal((2, 1, 16, C, 4)).astype(np.float32)
    header = {"magic": "million-cupy-model-codebooks", "format_version": 1, "num_layers": 3,
              "num_heads_per_layer": 1, "M": 16, "C": C, "d": 64, "dsub": 4, "dtype": "float32"}
    write_npz(path, header, keys=keys, values=keys)
    with pytest.raises(CodebookFormatError, match=r"header promises keys of shape \(3, 1, 16, 256, 4\).*\(2, 1, 16, 256, 4\)"):
        ModelCodebooks.load(path)
    write_npz(path, dict(header, num_layers=2), keys=keys)
    with pytest.raises(CodebookFormatError, match=r"missing \['values'\]"):
        ModelCodebooks.load(path)
    model_codebooks(rng).save(path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CodebookFormatError, match="unreadable"):
        ModelCodebooks.load(path)


@pytest.mark.parametrize("per_head", [False, True])
def test_model_codebooks_train(rng, per_head):
    nh_k, d = 2, 64
    n = 256 if per_head else 160  # pooled training sees n * nh_k vectors
    ks = [mixture(rng, n * nh_k, d).reshape(n, nh_k, d) for _ in range(2)]
    vs = [mixture(rng, n * nh_k, d).reshape(n, nh_k, d) for _ in range(2)]
    mc = ModelCodebooks.train(ks, vs, M=8, iters=2, seed=3, per_head=per_head, progress=False)
    assert (mc.num_layers, mc.num_heads_per_layer, mc.M, mc.d) == (2, nh_k if per_head else 1, 8, d)
    again = ModelCodebooks.train(ks, vs, M=8, iters=2, seed=3, per_head=per_head, progress=False)
    for layer in range(2):
        np.testing.assert_array_equal(mc.key_centroids(layer), again.key_centroids(layer))
        # every codebook gets its own derived seed
        assert not np.array_equal(mc.key_centroids(layer), mc.value_centroids(layer))
    if per_head:
        expected = Codebook.train(ks[1][:, 1], 8, iters=2, seed=codebook._derive_seed(3, 1, 0, 1))
        np.testing.assert_array_equal(mc.key_codebooks(1)[1].centroids, expected.centroids)


def test_model_codebooks_train_validation(rng):
    k = rng.standard_normal((200, 2, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="one array per layer"):
        ModelCodebooks.train([k], [k, k], M=8)
    with pytest.raises(ValueError, match=r"v_samples\[0\]: expected shape \(n, nh_k, d\) = \(\*, 2, 64\)"):
        ModelCodebooks.train([k], [k[:, :1]], M=8)
    with pytest.raises(ValueError, match=r"k_samples\[0\]: k-means needs at least 256 vectors per codebook, got 200"):
        ModelCodebooks.train([k], [k], M=8, per_head=True)
    with pytest.raises(UnsupportedConfiguration, match="got 16"):
        ModelCodebooks.train([k], [k], M=8, nbits=16)
    with pytest.raises(UnsupportedConfiguration, match="got M = 3"):
        ModelCodebooks.train([k], [k], M=3)


# ---------------------------------------------------------------------------------------------
# kernel variants (tests/test_nvrtc_grid.py compiles them all offline)
# ---------------------------------------------------------------------------------------------


def test_encode_variant_grid():
    grid = codebook._pq_encode_variants()
    assert len(grid) == 12 and len(set(grid)) == 12
    assert "pq_encode<2, __half>" in grid and "pq_encode<8, __nv_bfloat16>" in grid and "pq_encode<1, float>" in grid
    assert kernels.supported_variants()["pq_encode.cu"] == grid


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def trained_codebook(d, dsub):
    """A realistic (trained, densely packed) codebook, trained once per shape for all dtype cases."""
    return Codebook.train(mixture(np.random.default_rng(d * 10 + dsub), 4096, d), d // dsub, iters=4)


def check_gpu_codes(x, centroids, codes, min_exact=0.999, rel_tol=1e-5):
    """GPU codes vs the float64 reference: >= min_exact identical, and every code's distance within
    rel_tol * (||x_sub||^2 + ||c_ref||^2) of the true minimum (the scale of fp32 rounding)."""
    x64 = to_numpy(x).astype(np.float64)
    c = to_numpy(centroids).astype(np.float64)
    M, _, dsub = c.shape
    got = to_numpy(codes).reshape(-1, M).astype(np.intp)
    ref = reference.pq_encode(x64, c).reshape(-1, M).astype(np.intp)
    assert (got == ref).mean() >= min_exact, f"only {(got == ref).mean():.5f} of codes match the reference"
    xs = x64.reshape(-1, M, dsub)
    m = np.arange(M)
    c_got, c_ref = c[m, got], c[m, ref]
    d_got = ((xs - c_got) ** 2).sum(-1)
    d_ref = ((xs - c_ref) ** 2).sum(-1)
    scale = (xs**2).sum(-1) + (c_ref**2).sum(-1)
    worst = float(((d_got - d_ref) / np.maximum(scale, 1e-30)).max())
    assert worst <= rel_tol, f"a GPU code is {worst:.3g} (relative) farther than the nearest centroid"


@pytest.mark.gpu
@pytest.mark.parametrize("dsub", [1, 2, 4, 8])
@pytest.mark.parametrize("xdtype", ["float16", "bfloat16", "float32"])
def test_gpu_encode_matches_reference(rng, dsub, xdtype):
    import cupy as cp

    d = 128
    M = d // dsub
    cb_cpu = trained_codebook(d, dsub)
    cb = cb_cpu.to_gpu()
    x_host = mixture(rng, 3 * 1111, d).reshape(3, 1111, d).astype(resolve_dtype(xdtype))
    x = cp.asarray(x_host)
    codes = cb.encode(x)
    assert isinstance(codes, cp.ndarray) and codes.dtype == cp.uint8 and codes.shape == (3, 1111, M)
    check_gpu_codes(x_host, cb_cpu.centroids, codes)
    # Poisoned outputs: a code the kernel failed to write would keep a different poison in each run.
    results = []
    for poison in (0x00, 0xFF):
        out = cp.full((3, 1111, M), poison, dtype=cp.uint8)
        assert cb.encode(x, out=out) is out
        results.append(out.get())
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], codes.get())


@pytest.mark.gpu
def test_gpu_encode_per_head_codebooks(rng):
    import cupy as cp

    H, M, dsub = 4, 32, 4
    cents = np.stack([Codebook.train(mixture(rng, 1024, 128), M, iters=2).centroids for _ in range(H)])
    x_host = mixture(rng, 777 * H, 128).reshape(777, H, 128).astype(np.float16)
    out = cp.full((777, H, M), 0xFF, dtype=cp.uint8)
    codebook.encode(cp.asarray(x_host), cp.asarray(cents), out=out)
    for h in range(H):
        check_gpu_codes(x_host[:, h], cents[h], out[:, h])


@pytest.mark.gpu
def test_gpu_encode_grid_stride_and_awkward_inputs(rng):
    import cupy as cp

    cb = random_codebook(rng, 16, 8).to_gpu()
    x_host = rng.standard_normal((5000, 128)).astype(np.float32)
    x = cp.asarray(x_host)
    want = cb.encode(x).get()
    # Fewer blocks than row tiles: each block must stride over several tiles.
    out = cp.full((5000, 16), 0xFF, dtype=cp.uint8)
    kernel = kernels.get_kernel("pq_encode.cu", "pq_encode<8, float>")
    kernel((16 * 2,), (codebook._ENCODE_THREADS,), (x, cb.centroids_f32(), out, np.int64(5000), np.int32(16), np.int32(1)))
    np.testing.assert_array_equal(out.get(), want)
    # Non-contiguous and misaligned views are copied before the kernel's vector loads.
    wide = cp.asarray(np.concatenate([x_host, x_host], axis=1))
    np.testing.assert_array_equal(cb.encode(wide[:, 128:]).get(), want)
    flat = cp.empty(5000 * 128 + 1, dtype=cp.float32)
    flat[1:] = x.ravel()
    np.testing.assert_array_equal(cb.encode(flat[1:].reshape(5000, 128)).get(), want)
    assert cb.encode(x[:0]).shape == (0, 16)


@pytest.mark.gpu
def test_gpu_side_errors(rng):
    import cupy as cp

    cpu = random_codebook(rng, 16, 4)
    gpu = cpu.to_gpu()
    assert gpu.is_gpu and not gpu.to_cpu().is_gpu
    with pytest.raises(TypeError, match=r"to_gpu\(\)"):
        cpu.encode(cp.zeros((2, 64), cp.float32))
    with pytest.raises(TypeError, match=r"to_cpu\(\)"):
        gpu.encode(np.zeros((2, 64), np.float32))
    with pytest.raises(TypeError, match="out: expected a GPU array"):
        gpu.encode(cp.zeros((2, 64), cp.float32), out=np.zeros((2, 16), np.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("cdtype", [np.float16, np.float32])
def test_gpu_decode_equals_cpu(rng, cdtype):
    import cupy as cp

    cb = random_codebook(rng, 32, 4, cdtype)
    codes = rng.integers(0, C, size=(7, 3, 32)).astype(np.uint8)
    got = cb.to_gpu().decode(cp.asarray(codes))
    assert isinstance(got, cp.ndarray) and got.dtype == cdtype
    np.testing.assert_array_equal(got.get(), cb.decode(codes))


@pytest.mark.gpu
def test_gpu_train_mse_within_2pct_of_float64_lloyd(rng):
    import cupy as cp

    x = mixture(rng, 4096, 64)
    cb = Codebook.train(cp.asarray(x), 16, iters=25, seed=0)
    assert cb.is_gpu and cb.dtype == "float32"
    ours = pq_mse(x, cb.centroids)
    ref = pq_mse(x, lloyd_reference(x, 16, 25, seed=0))
    assert abs(ours / ref - 1) < 0.02, (ours, ref)
    cpu = pq_mse(x, Codebook.train(x, 16, iters=25, seed=0).centroids)
    assert abs(ours / cpu - 1) < 0.02, (ours, cpu)


@pytest.mark.gpu
def test_gpu_model_codebooks_and_files(rng, tmp_path):
    import cupy as cp

    mc = model_codebooks(rng, layers=2, heads=2)
    gpu = mc.to_gpu()
    assert gpu.is_gpu
    stack = gpu.key_centroids(1)
    assert isinstance(stack, cp.ndarray) and stack.shape == (2, 16, C, 4)
    np.testing.assert_array_equal(stack.get(), mc.key_centroids(1))
    path = tmp_path / "m.npz"
    gpu.save(path)
    back = ModelCodebooks.load(path, gpu=True)
    assert back.is_gpu
    np.testing.assert_array_equal(back.value_centroids(0).get(), mc.value_centroids(0))
    cb_path = tmp_path / "c.npz"
    gpu.key_codebooks(0)[1].save(cb_path)
    assert Codebook.load(cb_path, gpu=True).is_gpu
    # train on GPU samples gives GPU codebooks
    ks = [cp.asarray(mixture(rng, 256, 64).reshape(128, 2, 64))]
    trained = ModelCodebooks.train(ks, ks, M=16, iters=1, progress=False)
    assert trained.is_gpu and math.isfinite(float(trained.key_centroids(0).sum()))
