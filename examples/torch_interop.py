"""PyTorch CUDA tensors in and out of million_cupy through DLPack / ``__cuda_array_interface__``, without copies.

million_cupy has no PyTorch dependency: its entry points accept any CUDA array, wrapping a tensor's
memory as a CuPy view in place, and return CuPy arrays that ``torch.from_dlpack`` hands back to
PyTorch as tensors over the same memory. The script

* trains the codebooks from PyTorch tensors (k-means runs in CuPy on the tensors' memory),
* PQ-encodes a PyTorch tensor with a :class:`million_cupy.Codebook`,
* prefills and decodes a small batch with PyTorch K / V / q tensors: ``PagedPQCache.append`` reads
  them in place, ``BatchDecodeWrapper.run(..., out=tensor)`` writes the attention straight into a
  preallocated PyTorch tensor, and ``torch.from_dlpack`` turns a CuPy result into a tensor,
* checks every one of those hand-overs for copies by comparing data pointers, and that the results
  equal the same computation on a twin cache fed CuPy copies of the data (the plain CuPy path).

Both libraries work on their *current* stream; by default that is the legacy default stream for
both, so their work is ordered. With your own streams, pass ``stream=`` (a ``torch.cuda.Stream`` is
accepted) or synchronise at the hand-over.

Without PyTorch, a CUDA device or a GPU usable through CuPy it prints why and exits with status 0.
"""

from __future__ import annotations

import argparse
from typing import Sequence

import million_cupy as mc
from million_cupy.interop import as_array, gpu_available

from _common import Checks, model_parser


def unavailable() -> str | None:
    """Why this example cannot run here, or None."""
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return "PyTorch is not installed (pip install torch)"
    if not torch.cuda.is_available():
        return "PyTorch sees no CUDA device"
    if not gpu_available():
        return "million_cupy finds no GPU usable through CuPy"
    return None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return model_parser(__doc__).parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    reason = unavailable()
    if reason:
        print(f"torch_interop: skipped: {reason}")
        return 0
    import cupy as cp  # noqa: PLC0415
    import torch  # noqa: PLC0415

    torch.manual_seed(args.seed)
    dev = torch.device("cuda")
    L, nh, nh_k, d = args.layers, args.heads, args.kv_heads, args.head_dim
    lens = [args.prompt_len, max(1, args.prompt_len - 37)]
    B = len(lens)
    check = Checks()

    def copy_to_cupy(t: torch.Tensor) -> cp.ndarray:
        # The plain CuPy path gets its own copy of the data (cp.array copies; cp.asarray would not).
        return cp.array(t, copy=True)

    print("codebooks from PyTorch tensors")
    k_samples = [torch.randn(256, nh_k, d, device=dev) for _ in range(L)]
    v_samples = [torch.randn(256, nh_k, d, device=dev) for _ in range(L)]
    books = mc.ModelCodebooks.train(k_samples, v_samples, M=args.M, iters=5, seed=args.seed)
    check(books.is_gpu, f"trained on the GPU from torch.Tensor samples: {books}")
    x = torch.randn(64, d, device=dev, dtype=torch.float16)
    book = books.key_codebooks(0)[0]
    codes = book.encode(x)
    check(bool((codes == book.encode(copy_to_cupy(x))).all()), "Codebook.encode(torch tensor) == encode(CuPy copy)")
    check(as_array(x, "x").data.ptr == x.data_ptr(), "the tensor is read in place (CuPy view pointer == data_ptr())")
    codes_t = torch.from_dlpack(codes)
    check(codes_t.data_ptr() == codes.data.ptr and codes_t.dtype == torch.uint8,
          "torch.from_dlpack(codes) shares the codes' memory")

    print(f"prefill {lens} tokens, {L} layers, {nh} / {nh_k} heads, d = {d}, M = {args.M}")
    caches = [mc.PagedPQCache(L, nh_k, d, books, max_seqs=B, max_seq_len=max(lens) + args.steps, device="cuda")
              for _ in range(2)]
    via_torch, via_cupy = caches
    seqs = [via_torch.add_sequence() for _ in lens]
    assert seqs == [via_cupy.add_sequence() for _ in lens]
    for layer in range(L):
        k = torch.randn(sum(lens), nh_k, d, device=dev, dtype=torch.float16)
        v = torch.randn(sum(lens), nh_k, d, device=dev, dtype=torch.float16)
        via_torch.append(layer, seqs, k, v, lengths=lens)
        via_cupy.append(layer, seqs, copy_to_cupy(k), copy_to_cupy(v), lengths=lens)

    print(f"{args.steps} decode steps with BatchDecodeWrapper, outputs written into PyTorch tensors")
    wrappers = [mc.BatchDecodeWrapper(c, nh) for c in caches]
    worst, shared = 0.0, True
    for _ in range(args.steps):
        for w in wrappers:
            w.plan(seqs, new_tokens=1)
        for layer in range(L):
            q = torch.randn(B, nh, d, device=dev, dtype=torch.float16)
            k = torch.randn(B, nh_k, d, device=dev, dtype=torch.float16)
            v = torch.randn(B, nh_k, d, device=dev, dtype=torch.float16)
            via_torch.append(layer, seqs, k, v)
            via_cupy.append(layer, seqs, copy_to_cupy(k), copy_to_cupy(v))
            out = torch.empty(B, nh, d, device=dev, dtype=torch.float16)
            result = wrappers[0].run(layer, q, out=out)  # the kernel writes into `out` itself
            shared &= result.data.ptr == out.data_ptr()
            want = torch.from_dlpack(wrappers[1].run(layer, copy_to_cupy(q)))
            worst = max(worst, (out.float() - want.float()).abs().max().item())
    check(shared, "run(..., out=torch tensor) wrote into the tensor (returned CuPy view pointer == data_ptr())")
    check(worst <= 1e-3, f"outputs equal the CuPy path: max |diff| = {worst:.3g}")

    print("one-call decode() with a PyTorch query, result handed back with torch.from_dlpack")
    q = torch.randn(B, nh, d, device=dev, dtype=torch.float16)
    res = mc.decode(via_torch, L - 1, seqs, q)
    t = torch.from_dlpack(res)
    check(t.data_ptr() == res.data.ptr and t.device.type == "cuda", "torch.from_dlpack(out) shares memory, no copy")
    want = torch.from_dlpack(mc.decode(via_cupy, L - 1, seqs, copy_to_cupy(q)))
    check(torch.allclose(t.float(), want.float(), rtol=0, atol=1e-3), "decode() result equals the CuPy path")

    if check.failures:
        print(f"torch_interop: {len(check.failures)} check(s) FAILED")
        return 1
    print("torch_interop: all checks passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
