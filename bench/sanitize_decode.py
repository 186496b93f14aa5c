"""A representative set of decode launches to run under compute-sanitizer (GPU only).

    compute-sanitizer --tool memcheck  --error-exitcode 9 python bench/sanitize_decode.py
    compute-sanitizer --tool racecheck --error-exitcode 9 python bench/sanitize_decode.py

Ragged batch (0, 3 and 40 pages; 5, 0 and 63 residual tokens), splits merged by the last CTA, two
geometries (d = 128 / M = 64 / GQA 4 / page 64, and d = 64 / M = 16 / GQA 4 / page 16). Then the decode
step (DecodeStep): bulk appends of ragged prompts (the thread-per-row encoder), steps whose sequences flush
in the same and in different steps (the lane-group encoder and the padded, fixed-grid attention), several
new tokens per sequence (BatchPrefillWrapper: the LUT path, the tensor-core path with a chunk crossing a
flush and a split history, few rows forced onto tensor cores: 1 and 2 row tiles per CTA, the warps'
states merged, and the dense regime: dequantize_history and dense_prefill_attention, 520 rows per kv head under
the auto rule and a forced short batch, split histories merged; a verification step captured in a CUDA graph
and replayed after the histories grew: verify_attention's fixed grid with padding items), a CUDA graph replay, and a replay
after the batch changed (the device guard). Then an exact cache (``codebooks=None``, ``exact_cases``): ragged
bulk appends (``append_exact_tokens``), steps crossing block boundaries with the partly filled block read by the
residual item of ``MODE_PAGED_EXACT``, decode(), a graph replay and the device guard.
``python bench/sanitize_decode.py exact`` runs only those: memcheck 0 errors and racecheck 0 hazards on an H200
(2026-12-03, `--report-api-errors no`), where the whole GPU suite then passed (222 tests).
Both tools reported no error and no hazard on an H200 (2026-11-27; the step cases: see the closing note of
the session that added them; the LUT prefill case on 2026-12-02: racecheck 0 hazards, memcheck no kernel error,
its only reports being numba's cuGetProcAddress probes of optional driver symbols at start-up). The
tensor-core prefill cases on an H100 (2026-12-02, `--report-api-errors no`): racecheck 0 hazards, memcheck
0 errors (that run's short case had 9 new tokens, so both of its prefill cases took the tensor-core path; the
short case now has 7, the LUT path, as sanitized on the H200 before). The few-row tensor-core cases (1 and 2 row
tiles, forced; 12 and 28 query rows per kv head at M = 64, so since 2026-12-03 they run verify_attention, its
history split in two and merged) with every other case on an H200 (2026-12-03, 13:25 UTC, the final kernels of
that day, `--report-api-errors no`): racecheck 0 hazards, memcheck 0 errors. With the dense regime's cases added
(dequantize_history, dense_prefill_attention and their merge) on an H200 (2026-12-03, 22:02 UTC, the same flags):
racecheck 0 hazards, memcheck 0 errors. After verify_attention's conflict-free K table and split step loops
(H200, 2026-12-04, 02:32 UTC, the same flags): racecheck 0 hazards, memcheck 0 errors. With the verification step
replayed from a CUDA graph (H200, 2026-12-04, 10:30 UTC, the same flags): racecheck 0 hazards, memcheck 0 errors.
``python bench/sanitize_decode.py warpgroup`` runs only verify_attention_wgmma's cases (compute capability 9.0;
skipped elsewhere): on an H100 (2026-12-05) memcheck 0 errors and synccheck 0 errors, but racecheck reported
read-after-write hazards across the single barriers of the kernel's final merge and last-split flag, which the
hardware does not reproduce (bench/wgmma_barrier_check.py delays; docs/perf-notes.md, sessions 40-42). With a
second barrier at each (session 43) racecheck reports 0 hazards (H100, 2026-12-06).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cupy as cp  # noqa: E402
import numpy as np  # noqa: E402

from million_cupy.cache import pack_pages  # noqa: E402
from million_cupy.decode import paged_pq_decode  # noqa: E402

CASES = [(128, 64, 32, 8, 64), (64, 16, 8, 2, 16)]  # d, M, nh, nh_k, page size


def main() -> None:
    rng = np.random.default_rng(0)
    if sys.argv[1:] == ["exact"]:
        exact_cases(rng)
        return
    if sys.argv[1:] == ["warpgroup"]:
        warpgroup_cases(rng)
        return
    pages, res = np.array([0, 3, 40]), np.array([5, 0, 63])
    for d, M, nh, nh_k, P in CASES:
        n = int(pages.sum()) + 2
        kp, vp = pack_pages(*cp.asarray(rng.integers(0, 256, (2, n, nh_k, P, M), dtype=np.uint8)))
        indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
        ids = cp.asarray(rng.permutation(n)[: pages.sum()].astype(np.int32))
        kc = cp.asarray(rng.standard_normal((1, M, 256, d // M)).astype(np.float32))
        vc = cp.asarray(rng.standard_normal((1, M, 256, d // M)).astype(np.float32))
        ring = cp.asarray(rng.standard_normal((3, nh_k, 64, d)).astype(np.float16))
        q = cp.asarray(rng.standard_normal((3, nh, d)).astype(np.float16))
        out, _ = paged_pq_decode(q, kp, vp, indptr, ids, kc, vc, residual_k=ring, residual_v=ring,
                                 residual_lens=res, return_lse=True)
        cp.cuda.Device().synchronize()
        print(f"d={d} M={M}: finite output {bool(cp.isfinite(out).all())}")
    step_cases(rng)
    warpgroup_cases(rng)
    exact_cases(rng)


def _step_loop(cache, stream, lens: list[int], rng, nh: int, between=None):
    """Three sequences of ``lens`` random tokens in every layer of ``cache``, decoded for P + 3 eager DecodeStep
    steps; then ``between(seqs, q)`` (more work on the same cache, its result returned); then one step captured in
    a graph and replayed 4 times, and once more after a sequence was freed and its slot reused, where the device
    guard must skip and flag that token. Returns (the step's output, between's result, whether the guard fired)."""
    from million_cupy import DecodeStep
    from million_cupy.errors import MillionError

    d, nh_k, P = cache.head_dim, cache.num_kv_heads, cache.page_size
    seqs = [cache.add_sequence() for _ in lens]
    with stream:
        for layer in range(cache.num_layers):
            x = cp.asarray(rng.standard_normal((sum(lens), nh_k, d)).astype(np.float16))
            cache.append(layer, seqs, x, x, lengths=lens)
        step = DecodeStep(cache, nh, horizon=P)
        k = cp.asarray(rng.standard_normal((len(seqs), nh_k, d)).astype(np.float16))
        q = cp.asarray(rng.standard_normal((len(seqs), nh, d)).astype(np.float16))
        out = cp.empty_like(q)
        for _ in range(P + 3):
            step.plan(seqs)
            for layer in range(cache.num_layers):
                step.append(layer, k, k)
                step.run(layer, q, out=out)
        result = between(seqs, q) if between is not None else None
        stream.begin_capture()
        for layer in range(cache.num_layers):
            step.append(layer, k, k)
            step.run(layer, q, out=out)
        graph = stream.end_capture()
        for _ in range(4):
            step.plan(seqs)
            graph.launch(stream)
        cache.free(seqs[1])
        cache.add_sequence()
        graph.launch(stream)  # the guard: the freed slot's token is skipped and flagged
    try:
        step.check()
        return out, result, False
    except MillionError:
        return out, result, True


def _guard(fired: bool) -> str:
    return "the device guard fired" if fired else "the device guard DID NOT FIRE"


def exact_cases(rng) -> None:
    import million_cupy as mc
    from million_cupy import PagedPQCache

    P = 16
    stream = cp.cuda.Stream(non_blocking=True)
    cache = PagedPQCache(2, 2, 128, None, page_size=P, max_pages=256, max_seqs=4, max_seq_len=4096,
                         device="cuda", stream=stream)
    # A long sequence: several splits, its last block read by the residual item.
    out, o, fired = _step_loop(cache, stream, [1, P - 1, 40 * P + 5], rng, 8,
                               between=lambda seqs, q: mc.decode(cache, 1, seqs, q))
    print(f"exact step: finite outputs {bool(cp.isfinite(out).all() and cp.isfinite(o).all())}; {_guard(fired)}")


def step_cases(rng) -> None:
    from million_cupy import BatchPrefillWrapper, Codebook, ModelCodebooks, PagedPQCache

    d, M, nh, nh_k, P, R = 128, 64, 8, 2, 16, 32
    books = ModelCodebooks(*[[Codebook(rng.standard_normal((M, 256, d // M)).astype(np.float32)) for _ in range(2)]
                             for _ in range(2)])
    stream = cp.cuda.Stream(non_blocking=True)
    cache = PagedPQCache(2, nh_k, d, books, page_size=P, residual=R, max_pages=256, max_seqs=4, max_seq_len=2048,
                         device="cuda", stream=stream)

    def prefill_cases(seqs, q):
        # Several new tokens per sequence (BatchPrefillWrapper): the LUT path (short chunks), then the tensor-core
        # path (a chunk crossing flushes; a 1,100-token history split in two and merged).
        x = cp.asarray(rng.standard_normal((1100, nh_k, d)).astype(np.float16))
        for layer in range(2):
            cache.append(layer, [seqs[0]], x, x, lengths=[1100])
        for counts, backend in (([1, 4, 7], "lut"), ([1, 2, 3], "tensor_cores"), ([1, 4, 7], "tensor_cores"),
                                ([1, 4, 2 * P + 1], "auto"), ([3, 130, 5], "auto"), ([1, 4, 2 * P + 1], "dense")):
            prefill = BatchPrefillWrapper(cache, nh, backend=backend)
            prefill.plan(seqs, np.concatenate([[0], np.cumsum(counts)]))
            xs = cp.asarray(rng.standard_normal((sum(counts), nh_k, d)).astype(np.float16))
            qs = cp.asarray(rng.standard_normal((sum(counts), nh, d)).astype(np.float16))
            for layer in range(2):
                cache.append(layer, seqs, xs, xs, lengths=counts)
                o, lse = prefill.run(layer, qs, return_lse=True)
            print(f"prefill {counts} in the {prefill.regime} regime: finite output {bool(cp.isfinite(o).all())}")
        # A verification step captured in a CUDA graph: verify_attention on its fixed grid (padding items), replayed
        # after the histories grew.
        counts = [3, 3, 3]
        prefill = BatchPrefillWrapper(cache, nh, stream=stream)
        o = _replayed_after_growth(rng, cache, prefill, seqs, counts, stream)
        print(f"prefill {counts} in the {prefill.regime} regime, replayed from a CUDA graph: finite output "
              f"{bool(cp.isfinite(o).all())}")

    out, _, fired = _step_loop(cache, stream, [1, R - 1, 3 * P + 5], rng, nh, between=prefill_cases)
    print(f"step: finite output {bool(cp.isfinite(out).all())}; {_guard(fired)}")


def _replayed_after_growth(rng, cache, prefill, seqs, counts: list[int], stream):
    """A verification step of ``counts`` new tokens per sequence: planned, appended to every layer and run on layer 0
    eagerly, then captured in a CUDA graph; planned and appended again (the histories grown) and replayed.
    Returns layer 0's output of the replay (NaN-poisoned before the first run)."""
    d, nh = cache.head_dim, prefill.num_heads
    qs = cp.asarray(rng.standard_normal((sum(counts), nh, d)).astype(np.float16))
    o = cp.full_like(qs, cp.nan)
    for step in range(2):
        prefill.plan(seqs, np.concatenate([[0], np.cumsum(counts)]))
        xs = cp.asarray(rng.standard_normal((sum(counts), cache.num_kv_heads, d)).astype(np.float16))
        for layer in range(cache.num_layers):
            cache.append(layer, seqs, xs, xs, lengths=counts)
        if step == 0:
            prefill.run(0, qs, out=o)
            stream.begin_capture()
            prefill.run(0, qs, out=o)
            graph = stream.end_capture()
        graph.launch(stream)
    stream.synchronize()
    return o


def warpgroup_cases(rng) -> None:
    """verify_attention's warpgroup-MMA form (compute capability 9.0; 17 to 32 query rows per kv head at d = 128,
    M = 32, pages of 64 tokens): a 3,000-token history split across CTAs and merged by the last, a history of one
    page and a ring, a chunk crossing a flush, then the same step replayed from a CUDA graph after it grew."""
    from million_cupy import BatchPrefillWrapper, Codebook, ModelCodebooks, PagedPQCache, kernels
    from million_cupy.decode import device_compute_capability

    if device_compute_capability() != 90:
        print("warpgroup cases: skipped (compute capability 9.0 only)")
        return
    d, M, nh, nh_k, P, R = 128, 32, 8, 2, 64, 128
    books = ModelCodebooks(*[[Codebook(rng.standard_normal((M, 256, d // M)).astype(np.float32))]
                             for _ in range(2)])
    stream = cp.cuda.Stream(non_blocking=True)
    cache = PagedPQCache(1, nh_k, d, books, page_size=P, residual=R, max_pages=256, max_seqs=3, max_seq_len=4096,
                         device="cuda", stream=stream)
    seqs = [cache.add_sequence() for _ in range(3)]
    history = [3000, P + 63, 120]
    x = cp.asarray(rng.standard_normal((sum(history), nh_k, d)).astype(np.float16))
    cache.append(0, seqs, x, x, lengths=history)
    counts = [8, 2, 5]  # 32 query rows per kv head at GQA 4: two row tiles
    prefill = BatchPrefillWrapper(cache, nh, backend="tensor_cores", stream=stream)
    o = _replayed_after_growth(rng, cache, prefill, seqs, counts, stream)
    built = sorted(c["variant"] for c in kernels.compiled() if c["variant"].startswith("sm_90a:"))
    print(f"warpgroup: {counts} new tokens, eager then replayed from a CUDA graph: finite output "
          f"{bool(cp.isfinite(o).all())}; sm_90a builds {built}")


if __name__ == "__main__":
    main()
