"""JAX GPU arrays in and out of million_cupy through ``__cuda_array_interface__`` / DLPack, without copies.

The JAX counterpart of ``torch_interop.py``: codebooks trained from JAX arrays, a JAX array
PQ-encoded, a small batch prefilled and decoded from JAX K / V / q arrays (read in place by
``PagedPQCache.append`` and ``BatchDecodeWrapper.run``), and results handed back to JAX with
``jax.dlpack.from_dlpack`` over the same memory. Pointers are compared to show there is no copy
(``jax.Array.unsafe_buffer_pointer()`` against the CuPy array's ``data.ptr``), and results are
compared with a twin cache fed CuPy copies of the same data.

Two JAX specifics:

* JAX dispatches asynchronously on its own streams, so arrays are ``block_until_ready()``-ed before
  CuPy reads them, and CuPy's stream is synchronised before JAX reads a result.
* JAX arrays are immutable: results come back as new JAX arrays viewing CuPy's output buffers; this
  script does not pass JAX arrays as ``out=`` (that would write into memory JAX considers frozen).

By default XLA preallocates most of the GPU's memory; this script sets
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (unless already set) so CuPy keeps room for the cache.

Without JAX, a JAX GPU backend or a GPU usable through CuPy it prints why and exits with status 0.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

import numpy as np

import million_cupy as mc
from million_cupy.interop import as_array, gpu_available

from _common import Checks, model_parser


def unavailable() -> str | None:
    """Why this example cannot run here, or None."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before JAX initialises its backend
    try:
        import jax  # noqa: PLC0415
    except ImportError:
        return "JAX is not installed (pip install 'jax[cuda12]')"
    try:
        if not jax.devices("gpu"):
            return "JAX sees no GPU"
    except RuntimeError as exc:
        return f"JAX has no GPU backend ({str(exc).splitlines()[0]})"
    if not gpu_available():
        return "million_cupy finds no GPU usable through CuPy"
    return None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return model_parser(__doc__).parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    reason = unavailable()
    if reason:
        print(f"jax_interop: skipped: {reason}")
        return 0
    import cupy as cp  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import jax.dlpack  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    gpu = jax.devices("gpu")[0]
    rng = np.random.default_rng(args.seed)
    L, nh, nh_k, d = args.layers, args.heads, args.kv_heads, args.head_dim
    lens = [args.prompt_len, max(1, args.prompt_len - 37)]
    B = len(lens)
    check = Checks()

    def jarr(*shape: int, dtype: Any = jnp.float16) -> Any:
        x = jax.device_put(jnp.asarray(rng.standard_normal(shape), dtype=dtype), gpu)
        return x.block_until_ready()  # JAX is asynchronous; CuPy must not read it before it exists

    def copy_to_cupy(x: Any) -> Any:
        return cp.asarray(np.asarray(x))  # the plain CuPy path gets its own copy, via the host

    def to_jax(x: Any) -> Any:
        cp.cuda.get_current_stream().synchronize()  # CuPy's work must be done before JAX reads it
        return jax.dlpack.from_dlpack(x)

    print("codebooks from JAX arrays")
    books = mc.ModelCodebooks.train([jarr(256, nh_k, d, dtype=jnp.float32) for _ in range(L)],
                                    [jarr(256, nh_k, d, dtype=jnp.float32) for _ in range(L)],
                                    M=args.M, iters=5, seed=args.seed)
    check(books.is_gpu, f"trained on the GPU from jax.Array samples: {books}")
    x = jarr(64, d)
    book = books.key_codebooks(0)[0]
    codes = book.encode(x)
    check(bool((codes == book.encode(copy_to_cupy(x))).all()), "Codebook.encode(jax array) == encode(CuPy copy)")
    check(as_array(x, "x").data.ptr == x.unsafe_buffer_pointer(), "the JAX array is read in place (same pointer)")
    codes_j = to_jax(codes)
    check(codes_j.unsafe_buffer_pointer() == codes.data.ptr, "jax.dlpack.from_dlpack(codes) shares the codes' memory")

    print(f"prefill {lens} tokens, {L} layers, {nh} / {nh_k} heads, d = {d}, M = {args.M}")
    caches = [mc.PagedPQCache(L, nh_k, d, books, max_seqs=B, max_seq_len=max(lens) + args.steps, device="cuda")
              for _ in range(2)]
    via_jax, via_cupy = caches
    seqs = [via_jax.add_sequence() for _ in lens]
    assert seqs == [via_cupy.add_sequence() for _ in lens]
    for layer in range(L):
        k, v = jarr(sum(lens), nh_k, d), jarr(sum(lens), nh_k, d)
        via_jax.append(layer, seqs, k, v, lengths=lens)
        via_cupy.append(layer, seqs, copy_to_cupy(k), copy_to_cupy(v), lengths=lens)

    print(f"{args.steps} decode steps with BatchDecodeWrapper on JAX inputs")
    wrappers = [mc.BatchDecodeWrapper(c, nh) for c in caches]
    worst, shared = 0.0, True
    for _ in range(args.steps):
        for w in wrappers:
            w.plan(seqs, new_tokens=1)
        for layer in range(L):
            q, k, v = jarr(B, nh, d), jarr(B, nh_k, d), jarr(B, nh_k, d)
            via_jax.append(layer, seqs, k, v)
            via_cupy.append(layer, seqs, copy_to_cupy(k), copy_to_cupy(v))
            res = wrappers[0].run(layer, q)
            out = to_jax(res)
            shared &= out.unsafe_buffer_pointer() == res.data.ptr
            want = wrappers[1].run(layer, copy_to_cupy(q)).get()
            worst = max(worst, float(np.abs(np.asarray(out, np.float32) - want.astype(np.float32)).max()))
    check(shared, "jax.dlpack.from_dlpack(out) views the kernel's output buffer (same pointer, no copy)")
    check(worst <= 1e-3, f"outputs equal the CuPy path: max |diff| = {worst:.3g}")

    print("one-call decode() with a JAX query")
    q = jarr(B, nh, d)
    got = np.asarray(to_jax(mc.decode(via_jax, L - 1, seqs, q)), np.float32)
    want = mc.decode(via_cupy, L - 1, seqs, copy_to_cupy(q)).get().astype(np.float32)
    check(float(np.abs(got - want).max()) <= 1e-3, "decode() result equals the CuPy path")

    if check.failures:
        print(f"jax_interop: {len(check.failures)} check(s) FAILED")
        return 1
    print("jax_interop: all checks passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
