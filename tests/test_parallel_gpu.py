"""million_cupy.parallel on one GPU: several shards on the same device through the same code path, the exchange
stubbed by ThreadGroup (NCCL cannot run two ranks on one device); the kernels' merged decode against the
float64 reference over every rank's segments. The real NCCL path: examples/multi_gpu_decode.py --check."""

from __future__ import annotations

import numpy as np
import pytest

from million_cupy import Codebook, ModelCodebooks, reference
from million_cupy.interop import to_numpy
from million_cupy.parallel import HeadParallelCache, SequenceParallelCache, ThreadGroup

pytestmark = pytest.mark.gpu

D, M, NH_K, NH, P, R = 128, 64, 2, 8, 16, 32


def _books(rng):
    cb = lambda: Codebook(rng.standard_normal((M, 256, D // M)).astype(np.float32)).to_gpu()  # noqa: E731
    return ModelCodebooks([cb()], [cb()])


@pytest.mark.parametrize("mode", ["sequence", "heads"])
def test_shards_on_one_gpu_match_the_reference(rng, mode):
    import cupy as cp

    books, size = _books(rng), 2
    k = cp.asarray(rng.standard_normal((300, NH_K, D)).astype(np.float16))
    q = cp.asarray(rng.standard_normal((2, NH, D)).astype(np.float16))

    def rank(comm):
        if mode == "sequence":
            cache = SequenceParallelCache(comm, 1, NH_K, D, books, tokens_per_shard=128, page_size=P, residual=R,
                                          max_seqs=2, max_pages=64, device="cuda")
        else:
            cache = HeadParallelCache(comm, 1, NH_K, D, books, page_size=P, residual=R, max_seqs=2, max_pages=64,
                                      device="cuda")
        seqs = [cache.add_sequence() for _ in range(2)]
        cache.append(0, seqs, k[:250], k[:250] * 0.5, lengths=[200, 50])
        out, lse = cache.decode(0, seqs, q, return_lse=True)
        if mode == "sequence":
            parts = [cache.local.dequantize(0, cache.local_id(s)) if cache.local_tokens(0, [s])[0] else None
                     for s in seqs]
        else:
            parts = [cache.local.dequantize(0, cache.local_id(s)) for s in seqs]
        return to_numpy(out), to_numpy(lse), parts

    results = ThreadGroup(size).run(rank)
    qn = to_numpy(q).astype(np.float64)
    if mode == "sequence":
        ks = [np.concatenate([r[2][b][0] for r in results if r[2][b] is not None]) for b in range(2)]
        vs = [np.concatenate([r[2][b][1] for r in results if r[2][b] is not None]) for b in range(2)]
    else:  # every rank's heads side by side
        ks = [np.concatenate([r[2][b][0] for r in results], axis=1) for b in range(2)]
        vs = [np.concatenate([r[2][b][1] for r in results], axis=1) for b in range(2)]
    want_o, want_l = reference.decode_attention(qn, ks, vs)
    for out, lse, _ in results:
        assert np.isfinite(out).all()
        assert reference.relative_error(out.astype(np.float64), want_o) < 2e-3
        assert np.max(np.abs(lse - want_l)) < 2e-2
