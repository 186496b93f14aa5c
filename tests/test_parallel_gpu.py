"""million_cupy.parallel on one GPU: several shards on the same device through the same code path, the exchange
stubbed by ThreadGroup (NCCL cannot run two ranks on one device); the kernels' merged decode against the
float64 reference over every rank's segments. The real NCCL path (parallel.launch, one process per GPU) against
those shards on one GPU: one rank on any GPU machine, two where there are two GPUs."""

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


# ---- the NCCL path: parallel.launch, one process per GPU -----------------------------------------------------

def _group_decode(comm, mode: str) -> tuple:
    """One rank's part of a small sharded cache (module level: launch spawns processes that import it): the
    merged decode of two ragged sequences, then an append that rank 1's pool cannot hold (sequence mode), which
    must raise on every rank and change nothing."""
    import cupy as cp

    from million_cupy.errors import PagePoolExhausted

    rng = np.random.default_rng(7)  # the same codebooks and tokens on every rank
    books = _books(rng)
    k = cp.asarray(rng.standard_normal((400, NH_K, D)).astype(np.float16))
    q = cp.asarray(rng.standard_normal((2, NH, D)).astype(np.float16))
    small = comm.rank == 1 and comm.size > 1
    if mode == "sequence":
        cache = SequenceParallelCache(comm, 1, NH_K, D, books, tokens_per_shard=256 // comm.size, page_size=P,
                                      residual=R, max_seqs=2, max_pages=6 if small else 64, device="cuda")
    else:
        cache = HeadParallelCache(comm, 1, NH_K, D, books, page_size=P, residual=R, max_seqs=2, max_pages=64,
                                  device="cuda")
    seqs = [cache.add_sequence() for _ in range(2)]
    cache.append(0, seqs, k[:250], k[:250] * 0.5, lengths=[200, 50])
    cache.append(0, seqs, k[250:252], k[250:252] * 0.5)  # one token each: a decode step's append
    out, lse = cache.decode(0, seqs, q, return_lse=True)
    refused = None
    if mode == "sequence" and comm.size > 1:  # rank 1 holds 73 of sequence 0's tokens in 5 of its 6 pages
        try:
            cache.append(0, seqs, k[252:302], k[252:302], lengths=[50, 0])  # 123 tokens there: 8 pages
            refused = False
        except PagePoolExhausted:
            refused = True
        again = cache.decode(0, seqs, q)
        assert bool((again == out).all()), "a refused append changed what decode sees"
    return to_numpy(out), to_numpy(lse), refused, cache.seq_lens(0, seqs).tolist()


def _gpu_count() -> int:
    import cupy as cp

    return cp.cuda.runtime.getDeviceCount()


@pytest.mark.parametrize("size", [1, 2])
@pytest.mark.parametrize("mode", ["sequence", "heads"])
def test_nccl_group_matches_the_same_shards_on_one_gpu(mode, size):
    """The real NCCL path (one process per GPU, parallel.launch) against the same shards on one GPU through
    ThreadGroup, on the same tokens; size 1 runs NCCL's one-rank group on a one-GPU machine."""
    from million_cupy.parallel import launch

    if _gpu_count() < size:
        pytest.skip(f"needs {size} GPUs, this machine has {_gpu_count()}")
    got = launch(_group_decode, size, mode, timeout=300)
    want = ThreadGroup(size).run(_group_decode, [mode] * size)
    for (out, lse, refused, lens), (w_out, w_lse, w_refused, w_lens) in zip(got, want):
        assert np.isfinite(out).all() and np.isfinite(lse).all()
        np.testing.assert_allclose(out.astype(np.float32), w_out.astype(np.float32), rtol=0, atol=2e-3)
        np.testing.assert_allclose(lse, w_lse, rtol=0, atol=1e-3)
        assert refused is w_refused and lens == w_lens == [201, 51]
    for out, *_ in got[1:]:  # every rank answers the same
        np.testing.assert_array_equal(out, got[0][0])
    if mode == "sequence" and size > 1:
        assert all(r[2] is True for r in got)


def _raise_on_rank_0(comm) -> int:
    if comm.rank == 0:
        raise KeyError("planted")
    return comm.rank


def test_launch_reports_a_failing_rank_with_its_traceback():
    from million_cupy.parallel import launch

    with pytest.raises(RuntimeError, match="rank 0 raised:(.|\n)*KeyError: 'planted'"):
        launch(_raise_on_rank_0, 1, timeout=120)


def test_a_communicator_on_its_own_stream_is_ordered_with_the_caches():
    """An NcclCommunicator given a stream other than the cache's (one rank in this process): its collectives wait
    for the cache's work and the merge waits for them (events both ways), so the result equals ThreadGroup's."""
    import cupy as cp

    from million_cupy.parallel import NcclCommunicator

    own = cp.cuda.Stream(non_blocking=True)
    comm = NcclCommunicator(0, 1, NcclCommunicator.new_unique_id(), stream=own)
    for mode in ("sequence", "heads"):
        got = _group_decode(comm, mode)
        (want,) = ThreadGroup(1).run(_group_decode, [mode])
        np.testing.assert_allclose(got[0].astype(np.float32), want[0].astype(np.float32), rtol=0, atol=2e-3)
        np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-3)
