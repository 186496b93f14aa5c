"""PyTorch and JAX GPU arrays through million_cupy's public entry points (GPU only).

Each framework's arrays go into ``Codebook.encode``, ``PagedPQCache.append``, ``BatchDecodeWrapper.run``
and ``million_cupy.decode``; the results must equal the same calls on CuPy copies of the data (a twin
cache), inputs must be read in place (pointer of the CuPy view == the framework's pointer) and outputs
handed back without copies (``torch.from_dlpack`` / ``jax.dlpack.from_dlpack`` over the same memory).
Wrong dtype / shape / device / strides raise TypeError or ValueError naming what was expected.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import million_cupy as mc
from million_cupy.interop import as_array, dtype_name, to_numpy

# XLA preallocates most of the GPU by default; CuPy needs room in the same process. Must be set
# before JAX first initialises its backend.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

pytestmark = pytest.mark.gpu

L, NH, NH_K, D, M = 2, 4, 2, 64, 32
PAGE, RESIDUAL = 16, 32
LENS = [45, 30]  # ragged prompts, both already past the 32-token residual window
STEPS = 3


def _cp():
    import cupy

    return cupy


class _Torch:
    name = "torch"

    def __init__(self) -> None:
        self.torch = pytest.importorskip("torch")
        if not self.torch.cuda.is_available():
            pytest.skip("PyTorch sees no CUDA device")

    def array(self, a: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(a)).to("cuda")

    def ptr(self, x) -> int:
        return x.data_ptr()

    def from_cupy(self, x):
        return self.torch.from_dlpack(x)

    def numpy(self, x) -> np.ndarray:
        return x.cpu().numpy()


class _Jax:
    name = "jax"

    def __init__(self) -> None:
        self.jax = pytest.importorskip("jax")
        import jax.dlpack  # noqa: F401
        import jax.numpy as jnp

        self.jnp = jnp
        try:
            self.gpu = self.jax.devices("gpu")[0]
        except (RuntimeError, IndexError):
            pytest.skip("JAX has no GPU backend")

    def array(self, a: np.ndarray):
        # JAX dispatches asynchronously: the array must exist before CuPy reads its memory.
        return self.jax.device_put(self.jnp.asarray(a), self.gpu).block_until_ready()

    def ptr(self, x) -> int:
        return x.unsafe_buffer_pointer()

    def from_cupy(self, x):
        _cp().cuda.get_current_stream().synchronize()  # CuPy's writes done before JAX reads
        return self.jax.dlpack.from_dlpack(x)

    def numpy(self, x) -> np.ndarray:
        return np.asarray(x)


@pytest.fixture(params=["torch", "jax"])
def fw(request):
    return _Torch() if request.param == "torch" else _Jax()


@pytest.fixture
def torch_fw():
    return _Torch()


def _books(rng, gpu: bool = True) -> mc.ModelCodebooks:
    def cb():
        c = rng.standard_normal((M, 256, D // M)).astype(np.float32)
        return mc.Codebook(_cp().asarray(c) if gpu else c)

    return mc.ModelCodebooks([cb() for _ in range(L)], [cb() for _ in range(L)])


def _cache(books, device: str = "cuda") -> mc.PagedPQCache:
    return mc.PagedPQCache(L, NH_K, D, books, page_size=PAGE, residual=RESIDUAL, max_seqs=4,
                           max_seq_len=128, device=device)


def _f16(rng, *shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float16)


# ------------------------------------------------------------------------------------------ encode


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_codebook_encode(fw, rng, dtype):
    cp = _cp()
    book = _books(rng).key_codebooks(0)[0]
    host = rng.standard_normal((100, NH_K, D)).astype(dtype)
    x = fw.array(host)
    assert as_array(x, "x").data.ptr == fw.ptr(x)  # read in place
    codes = book.encode(x)
    assert isinstance(codes, cp.ndarray) and codes.dtype == np.uint8 and codes.shape == (100, NH_K, M)
    cp.testing.assert_array_equal(codes, book.encode(cp.asarray(host)))
    back = fw.from_cupy(codes)
    assert fw.ptr(back) == codes.data.ptr  # handed back without a copy
    np.testing.assert_array_equal(fw.numpy(back), codes.get())


# ------------------------------------------------------------------------- append, run, decode


def _twin_caches(fw, rng):
    """A cache fed framework arrays and one fed CuPy arrays with the same values, both prefilled."""
    cp = _cp()
    books = _books(rng)
    via_fw, via_cp = _cache(books), _cache(books)
    seqs = [via_fw.add_sequence() for _ in LENS]
    assert seqs == [via_cp.add_sequence() for _ in LENS]
    for layer in range(L):
        k, v = _f16(rng, sum(LENS), NH_K, D), _f16(rng, sum(LENS), NH_K, D)
        via_fw.append(layer, seqs, fw.array(k), fw.array(v), lengths=LENS)
        via_cp.append(layer, seqs, cp.asarray(k), cp.asarray(v), lengths=LENS)
    return via_fw, via_cp, seqs


def _same_contents(a: mc.PagedPQCache, b: mc.PagedPQCache, seqs) -> None:
    for layer in range(L):
        for s in seqs:
            for x, y in zip(a.dequantize(layer, s), b.dequantize(layer, s)):
                np.testing.assert_array_equal(x, y)


def test_append_and_batch_decode(fw, rng):
    cp = _cp()
    via_fw, via_cp, seqs = _twin_caches(fw, rng)
    _same_contents(via_fw, via_cp, seqs)
    wrappers = [mc.BatchDecodeWrapper(c, NH) for c in (via_fw, via_cp)]
    B = len(seqs)
    for _ in range(STEPS):
        for w in wrappers:
            w.plan(seqs, new_tokens=1)
        for layer in range(L):
            q, k, v = _f16(rng, B, NH, D), _f16(rng, B, NH_K, D), _f16(rng, B, NH_K, D)
            q_fw = fw.array(q)
            assert as_array(q_fw, "q").data.ptr == fw.ptr(q_fw)
            via_fw.append(layer, seqs, fw.array(k), fw.array(v))
            via_cp.append(layer, seqs, cp.asarray(k), cp.asarray(v))
            out, lse = wrappers[0].run(layer, q_fw, return_lse=True)
            want, want_lse = wrappers[1].run(layer, cp.asarray(q), return_lse=True)
            back = fw.from_cupy(out)
            assert fw.ptr(back) == out.data.ptr  # no copy on the way back
            np.testing.assert_allclose(fw.numpy(back).astype(np.float32), want.get().astype(np.float32), rtol=0, atol=1e-3)
            np.testing.assert_allclose(lse.get(), want_lse.get(), rtol=0, atol=1e-4)
    _same_contents(via_fw, via_cp, seqs)
    # The one-call form, once every layer holds the step's tokens.
    q = _f16(rng, B, NH, D)
    got = mc.decode(via_fw, L - 1, seqs, fw.array(q))
    want = mc.decode(via_cp, L - 1, seqs, cp.asarray(q))
    np.testing.assert_allclose(got.get().astype(np.float32), want.get().astype(np.float32), rtol=0, atol=1e-3)


def test_torch_out_tensors_are_written_in_place(torch_fw, rng):
    torch = torch_fw.torch
    via_t, via_cp, seqs = _twin_caches(torch_fw, rng)
    B = len(seqs)
    q = _f16(rng, B, NH, D)
    out = torch.full((B, NH, D), float("nan"), dtype=torch.float16, device="cuda")
    lse = torch.full((B, NH), float("nan"), dtype=torch.float32, device="cuda")
    w = mc.BatchDecodeWrapper(via_t, NH)
    w.plan(seqs, new_tokens=0)
    res, res_lse = w.run(0, torch_fw.array(q), out=out, lse=lse)
    assert res.data.ptr == out.data_ptr() and res_lse.data.ptr == lse.data_ptr()
    want, want_lse = mc.decode(via_cp, 0, seqs, _cp().asarray(q), return_lse=True)
    assert not torch.isnan(out).any()
    np.testing.assert_allclose(out.float().cpu().numpy(), want.get().astype(np.float32), rtol=0, atol=1e-3)
    np.testing.assert_allclose(lse.cpu().numpy(), want_lse.get(), rtol=0, atol=1e-4)
    # decode() with a torch out= as well
    out2 = torch.empty_like(out)
    res2 = mc.decode(via_t, 0, seqs, torch_fw.array(q), out=out2)
    assert res2.data.ptr == out2.data_ptr()
    assert torch.equal(out2, out)


def test_non_contiguous_inputs_to_append_and_encode_are_accepted(torch_fw, rng):
    """append and encode copy strided input to the layout they need; results equal contiguous input."""
    torch = torch_fw.torch
    cp = _cp()
    books = _books(rng)
    a, b = _cache(books), _cache(books)
    sa, sb = a.add_sequence(), b.add_sequence()
    k = _f16(rng, 20, NH_K, D)
    v = _f16(rng, 20, NH_K, D)
    # (20, nh_k, d) views with non-unit-stride heads: transposes of (20, d, nh_k) tensors.
    k_strided = torch_fw.array(np.ascontiguousarray(k.transpose(0, 2, 1))).transpose(1, 2)
    v_strided = torch_fw.array(np.ascontiguousarray(v.transpose(0, 2, 1))).transpose(1, 2)
    assert not k_strided.is_contiguous()
    for layer in range(L):
        a.append(layer, [sa], k_strided, v_strided, lengths=[20])
        b.append(layer, [sb], cp.asarray(k), cp.asarray(v), lengths=[20])
    _same_contents(a, b, [sa])
    book = books.key_codebooks(0)[0]
    cp.testing.assert_array_equal(book.encode(k_strided), book.encode(cp.asarray(k)))
    assert torch.equal(k_strided.contiguous(), torch_fw.array(k))


# ------------------------------------------------------------------------------------------ errors


def test_wrong_dtype(torch_fw, rng):
    torch = torch_fw.torch
    via_t, _, seqs = _twin_caches(torch_fw, rng)
    B = len(seqs)
    w = mc.BatchDecodeWrapper(via_t, NH)
    w.plan(seqs, new_tokens=0)
    q32 = torch.randn(B, NH, D, device="cuda")
    with pytest.raises(TypeError, match=r"q: expected dtype in \['float16'\], got float32"):
        w.run(0, q32)
    with pytest.raises(TypeError, match=r"q: expected dtype in \['float16'\], got float32"):
        mc.decode(via_t, 0, seqs, q32)
    q = torch.randn(B, NH, D, device="cuda", dtype=torch.float16)
    with pytest.raises(TypeError, match=r"out: expected dtype in \['float16'\], got float32"):
        w.run(0, q, out=torch.empty(B, NH, D, device="cuda"))
    with pytest.raises(TypeError, match=r"lse: expected dtype in \['float32'\], got float16"):
        w.run(0, q, lse=torch.empty(B, NH, device="cuda", dtype=torch.float16))
    lens = via_t.seq_lens(0, seqs).copy()
    with pytest.raises(TypeError, match=r"k: expected dtype in \[.*'float16'.*\], got int32"):
        via_t.append(0, seqs, torch.zeros(B, NH_K, D, device="cuda", dtype=torch.int32),
                     torch.zeros(B, NH_K, D, device="cuda", dtype=torch.float16))
    np.testing.assert_array_equal(via_t.seq_lens(0, seqs), lens)  # nothing appended
    book = via_t.codebooks.key_codebooks(0)[0]
    with pytest.raises(TypeError, match=r"x: expected dtype in \['float16', 'bfloat16', 'float32', 'float64'\], got int32"):
        book.encode(torch.zeros(4, D, device="cuda", dtype=torch.int32))
    x64 = torch.randn(4, D, device="cuda", dtype=torch.float64)  # accepted, as training accepts it
    np.testing.assert_array_equal(to_numpy(book.encode(x64)), to_numpy(book.encode(x64.float())))


def test_wrong_shape(fw, rng):
    via, _, seqs = _twin_caches(fw, rng)
    B = len(seqs)
    w = mc.BatchDecodeWrapper(via, NH)
    w.plan(seqs, new_tokens=0)
    with pytest.raises(ValueError, match=rf"q: expected shape \({B}, {NH}, {D}\), got \({B}, {NH}, 32\)"):
        w.run(0, fw.array(_f16(rng, B, NH, 32)))
    with pytest.raises(ValueError, match=rf"q: expected shape \({B}, {NH}, {D}\), got \({B + 1}, {NH}, {D}\)"):
        w.run(0, fw.array(_f16(rng, B + 1, NH, D)))
    lens = via.seq_lens(0, seqs).copy()
    with pytest.raises(ValueError, match=rf"k: expected shape \({B}, {NH_K}, {D}\), got \({B}, 3, {D}\)"):
        via.append(0, seqs, fw.array(_f16(rng, B, 3, D)), fw.array(_f16(rng, B, NH_K, D)))
    np.testing.assert_array_equal(via.seq_lens(0, seqs), lens)
    book = via.codebooks.key_codebooks(0)[0]
    with pytest.raises(ValueError, match=rf"expected last dimension d = {D}, got shape \(4, 32\)"):
        book.encode(fw.array(_f16(rng, 4, 32)))


def test_wrong_device(fw, rng):
    """GPU arrays into CPU-path objects are refused (no silent device -> host copy)."""
    cpu_books = _books(rng, gpu=False)
    cache = _cache(cpu_books, device="cpu")
    seq = cache.add_sequence()
    k = fw.array(_f16(rng, 1, NH_K, D))
    with pytest.raises(TypeError, match=r"k: expected a host \(NumPy\) array for this CPU-path object, got a GPU array"):
        cache.append(0, [seq], k, k)
    assert cache.seq_len(seq, 0) == 0
    cache.append(0, [seq], _f16(rng, 1, NH_K, D), _f16(rng, 1, NH_K, D))
    with pytest.raises(TypeError, match=r"q: expected a host \(NumPy\) array .* got a GPU array"):
        mc.decode(cache, 0, [seq], fw.array(_f16(rng, 1, NH, D)))
    with pytest.raises(TypeError, match=r"x: is a GPU array but this codebook lives on the CPU; use codebook.to_gpu\(\)"):
        cpu_books.key_codebooks(0)[0].encode(fw.array(_f16(rng, 4, D)))


def test_non_contiguous_query_and_out_are_refused(torch_fw, rng):
    """The kernel reads q and writes out with dense (B, nh, d) indexing: strided views are an error, not a copy."""
    torch = torch_fw.torch
    via_t, _, seqs = _twin_caches(torch_fw, rng)
    B = len(seqs)
    w = mc.BatchDecodeWrapper(via_t, NH)
    w.plan(seqs, new_tokens=0)
    q_strided = torch.randn(B, D, NH, device="cuda", dtype=torch.float16).transpose(1, 2)  # (B, NH, D) view
    assert q_strided.shape == (B, NH, D) and not q_strided.is_contiguous()
    with pytest.raises(ValueError, match=r"q: expected a C-contiguous array"):
        w.run(0, q_strided)
    with pytest.raises(ValueError, match=r"q: expected a C-contiguous array"):
        mc.decode(via_t, 0, seqs, q_strided)
    out_strided = torch.empty(B, D, NH, device="cuda", dtype=torch.float16).transpose(1, 2)
    with pytest.raises(ValueError, match=r"out: expected a C-contiguous array"):
        w.run(0, q_strided.contiguous(), out=out_strided)


def test_torch_bfloat16_keeps_its_dtype(torch_fw):
    # as_array prefers DLPack: PyTorch's __cuda_array_interface__ describes bfloat16 as raw '<V2'.
    torch = torch_fw.torch
    x = torch.zeros(4, D, device="cuda", dtype=torch.bfloat16)
    assert dtype_name(as_array(x, "x").dtype) == "bfloat16"
