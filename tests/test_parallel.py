"""million_cupy.parallel on the CPU: ranks as threads (ThreadGroup), caches on the float64 reference path.

Sequence parallel: decode merged over 1-3 ranks against the float64 reference over the concatenation of every
rank's segment (dequantized as each rank holds it), appends crossing segment boundaries, a prompt spanning
several ranks. Head parallel: equal to one cache holding every head with the same codebooks. Pool exhaustion on
one rank raises on every rank and changes nothing. The NCCL path needs several GPUs (examples/multi_gpu_decode.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from million_cupy import Codebook, ModelCodebooks, PagedPQCache, reference
from million_cupy.errors import PagePoolExhausted
from million_cupy.parallel import HeadParallelCache, SequenceParallelCache, ThreadGroup

D, M, NH_K, NH, P, R = 64, 16, 4, 8, 16, 32


def _books(rng, heads=1):
    def layer():
        books = [Codebook(rng.standard_normal((M, 256, D // M)).astype(np.float32)) for _ in range(heads)]
        return books[0] if heads == 1 else books

    return ModelCodebooks([layer()], [layer()])


def _tokens(rng, n):
    return rng.standard_normal((n, NH_K, D)).astype(np.float32)


@pytest.mark.parametrize("size", [1, 2, 3])
def test_sequence_parallel_decode_is_attention_over_every_segment(rng, size):
    books = _books(rng)
    group = ThreadGroup(size)
    per = 64  # tokens per shard: the 150-token prompt spans three ranks
    prompts, steps = [150, 7, 60], 12
    k_all = _tokens(rng, sum(prompts) + 3 * steps)
    v_all = _tokens(rng, sum(prompts) + 3 * steps)
    q = rng.standard_normal((steps, 3, NH, D))
    budget = [size * per] * 3

    def rank(comm):
        cache = SequenceParallelCache(comm, 1, NH_K, D, books, tokens_per_shard=per, page_size=P, residual=R,
                                      max_seqs=4, max_pages=64, dtype="float32", device="cpu")
        seqs = [cache.add_sequence() for _ in range(3)]
        fit = [min(n, b - steps) for n, b in zip(prompts, budget)]
        cache.append(0, seqs, k_all[: sum(fit)], v_all[: sum(fit)], lengths=fit)
        outs, segments = [], []
        for t in range(steps):
            row = sum(fit) + 3 * t
            cache.append(0, seqs, k_all[row : row + 3], v_all[row : row + 3])  # crosses segment ends
            outs.append(cache.decode(0, seqs, q[t], return_lse=True))
            segments.append([cache.local.dequantize(0, int(cache.local_id(s))) if cache.local_tokens(0, [s])[0]
                             else None for s in seqs])
        return outs, segments, cache.seq_lens(0, seqs)

    results = group.run(rank)
    lens = results[0][2]
    for t in range(steps):
        # Every rank answers the same; it is attention over the segments concatenated in rank order.
        for r in range(1, size):
            np.testing.assert_array_equal(results[r][0][t][0], results[0][0][t][0])
        ks, vs = [], []
        for b in range(3):
            parts = [results[r][1][t][b] for r in range(size) if results[r][1][t][b] is not None]
            ks.append(np.concatenate([p[0] for p in parts]))
            vs.append(np.concatenate([p[1] for p in parts]))
        want_o, want_l = reference.decode_attention(q[t], ks, vs)
        got_o, got_l = results[0][0][t]
        assert reference.relative_error(got_o, want_o) < 1e-5
        np.testing.assert_allclose(got_l, want_l, rtol=0, atol=1e-4)
    assert lens.tolist() == [min(n, size * per - steps) + steps for n in prompts]


def test_head_parallel_equals_one_cache_holding_every_head(rng):
    books = _books(rng, heads=NH_K)
    size = 2
    one = PagedPQCache(1, NH_K, D, books, page_size=P, residual=R, max_pages=64, max_seqs=4, dtype="float32",
                       device="cpu")
    seqs_one = [one.add_sequence() for _ in range(2)]
    k, v = _tokens(rng, 90), _tokens(rng, 90)
    one.append(0, seqs_one, k, v, lengths=[70, 20])
    q = rng.standard_normal((2, NH, D))
    want_o, want_l = __import__("million_cupy").decode(one, 0, seqs_one, q, return_lse=True)

    def rank(comm):
        cache = HeadParallelCache(comm, 1, NH_K, D, books, page_size=P, residual=R, max_pages=64, max_seqs=4,
                                  dtype="float32", device="cpu")
        seqs = [cache.add_sequence() for _ in range(2)]
        cache.append(0, seqs, k, v, lengths=[70, 20])
        return cache.decode(0, seqs, q, return_lse=True)

    for got_o, got_l in ThreadGroup(size).run(rank):
        assert reference.relative_error(got_o, want_o) < 1e-6
        np.testing.assert_allclose(got_l, want_l, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["sequence", "heads"])
def test_layers_filled_one_after_another_up_to_the_limit(rng, mode):
    """A prompt stored layer by layer (layer 0 whole, then layer 1), filling every rank's segment: each layer's
    pages are reserved for its own length, not for the longest layer's plus the new tokens (which used to
    overrun max_seq_len / the pool on the second layer)."""
    books = _books(rng, heads=NH_K if mode == "heads" else 1)
    books = ModelCodebooks([books.key_codebooks(0)] * 2, [books.value_codebooks(0)] * 2)
    size, per = 2, 128
    n = size * per
    k, v = _tokens(rng, n), _tokens(rng, n)
    q = rng.standard_normal((1, NH, D))

    def rank(comm):
        if mode == "sequence":  # a pool of exactly the pages one segment needs in each layer
            cache = SequenceParallelCache(comm, 2, NH_K, D, books, tokens_per_shard=per, page_size=P, residual=R,
                                          max_seqs=1, max_pages=2 * (per // P), dtype="float32", device="cpu")
        else:
            cache = HeadParallelCache(comm, 2, NH_K, D, books, page_size=P, residual=R, max_seqs=1,
                                      max_pages=2 * (n // P), max_seq_len=n, dtype="float32", device="cpu")
        s = cache.add_sequence()
        for layer in range(2):
            for at in range(0, n, 64):  # chunks of 64 tokens
                cache.append(layer, [s], k[at : at + 64], v[at : at + 64], lengths=[64])
        first = cache.decode(0, [s], q)
        kept = first.copy()
        other = cache.decode(1, [s], -q)  # reuses the exchange buffers: the first result must not change
        return first, kept, cache.decode(1, [s], q), other, cache.seq_lens(1, [s])

    for first, kept, again, other, lens in ThreadGroup(size).run(rank):
        assert lens.tolist() == [n]
        np.testing.assert_array_equal(first, kept)
        np.testing.assert_array_equal(first, again)  # the same tokens and codebooks in both layers
        assert not np.array_equal(first, other)


def test_pool_exhaustion_on_one_rank_raises_everywhere_and_loses_nothing(rng):
    books = _books(rng)
    group = ThreadGroup(2)
    k = _tokens(rng, 200)
    q = rng.standard_normal((1, NH, D))

    def rank(comm):
        # Rank 1's pool holds 3 pages: a 150-token prompt (22 tokens, 2 pages on rank 1) fits, 40 more do not.
        cache = SequenceParallelCache(comm, 1, NH_K, D, books, tokens_per_shard=128, page_size=P, residual=R,
                                      max_seqs=2, max_pages=16 if comm.rank == 0 else 3, dtype="float32",
                                      device="cpu")
        (s,) = [cache.add_sequence()]
        cache.append(0, [s], k[:150], k[:150], lengths=[150])
        before = cache.decode(0, [s], q)
        with pytest.raises(PagePoolExhausted):
            cache.append(0, [s], k[150:190], k[150:190], lengths=[40])
        after = cache.decode(0, [s], q)
        return cache.seq_lens(0, [s]), before, after

    for lens, before, after in group.run(rank):
        assert lens.tolist() == [150]
        np.testing.assert_array_equal(before, after)


def test_bad_arguments_are_named(rng):
    books = _books(rng)
    (comm,) = ThreadGroup(1).communicators
    with pytest.raises(ValueError, match="tokens_per_shard"):
        SequenceParallelCache(comm, 1, NH_K, D, books, tokens_per_shard=20, page_size=P, residual=R, device="cpu")
    with pytest.raises(ValueError, match="multiple of the group size"):
        HeadParallelCache(ThreadGroup(3).communicators[0], 1, NH_K, D, books, page_size=P, residual=R,
                          device="cpu")
    for exact in (lambda: SequenceParallelCache(comm, 1, NH_K, D, None, tokens_per_shard=64, page_size=P,
                                                residual=R, device="cpu"),
                  lambda: HeadParallelCache(comm, 1, NH_K, D, None, page_size=P, residual=R, device="cpu")):
        with pytest.raises(TypeError, match="expected a ModelCodebooks .* got NoneType"):
            exact()  # an exact cache (codebooks=None) is single-GPU only
    cache = SequenceParallelCache(comm, 1, NH_K, D, books, tokens_per_shard=64, page_size=P, residual=R,
                                  max_seqs=2, dtype="float32", device="cpu")
    s = cache.add_sequence()
    with pytest.raises(ValueError, match="lengths: expected 1 non-negative counts"):
        cache.append(0, [s], _tokens(rng, 3), _tokens(rng, 3), lengths=[2])
    with pytest.raises(ValueError, match="exceed 64 tokens"):
        cache.append(0, [s], _tokens(rng, 65), _tokens(rng, 65), lengths=[65])
    with pytest.raises(ValueError, match="not live"):
        cache.decode(0, [1], np.zeros((1, NH, D)))


@pytest.mark.parametrize("mode", ["sequence", "heads"])
def test_a_repeated_list_of_ids_is_checked_again_after_a_free(rng, mode):
    """decode checks a repeated list of ids once (the decode loop's), until a sequence is freed."""
    books = _books(rng)
    (comm,) = ThreadGroup(1).communicators
    if mode == "sequence":
        cache = SequenceParallelCache(comm, 1, NH_K, D, books, tokens_per_shard=64, page_size=P, residual=R,
                                      max_seqs=3, dtype="float32", device="cpu")
    else:
        cache = HeadParallelCache(comm, 1, NH_K, D, books, page_size=P, residual=R, max_seqs=3, dtype="float32",
                                  device="cpu")
    seqs = [cache.add_sequence() for _ in range(2)]
    cache.append(0, seqs, _tokens(rng, 10), _tokens(rng, 10), lengths=[4, 6])
    q = rng.standard_normal((2, NH, D)).astype(np.float32)
    first = cache.decode(0, seqs, q)
    np.testing.assert_array_equal(cache.decode(0, seqs, q), first)  # the checked list again
    cache.free(seqs[1])
    with pytest.raises(ValueError, match=rf"decode: sequences \[{seqs[1]}\] are not live"):
        cache.decode(0, seqs, q)
    again = cache.add_sequence()  # the freed id, live again but empty
    assert again == seqs[1]
    with pytest.raises(ValueError, match="hold no tokens"):
        cache.decode(0, seqs, q)


def test_launch_on_a_machine_without_gpus_says_what_it_needs():
    from million_cupy.errors import DeviceUnavailable
    from million_cupy.interop import gpu_available
    from million_cupy.parallel import launch

    if gpu_available():
        pytest.skip("this machine has a GPU: tests/test_parallel_gpu.py runs launch")
    with pytest.raises(DeviceUnavailable, match="parallel.launch"):
        launch(print, 2)
