"""Several new tokens per sequence (million_cupy.prefill) on the CPU: the causal rule, the float64 path, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import million_cupy as mc
from million_cupy import Codebook, ModelCodebooks, PagedPQCache, reference
from million_cupy.errors import UnsupportedConfiguration
from million_cupy.layout import full_pages
from million_cupy.prefill import (DENSE_ROWS_MIN, DEQUANTIZE_SPAN, FRAGMENT_PAIR_TOKENS_MIN, FRAGMENT_QUERIES_MIN,
                                  FRAGMENT_QUERIES_MIN_TWO_TILES, LUT_QUERIES_MAX, TC_MIN_CHUNK, TC_ROWS, TC_TILE, causal_lengths, gathers_fragments,
                                  history_spans, split_length, takes_dense, takes_tensor_cores, tensor_core_row_tiles,
                                  tensor_core_schedule, tensor_core_supported)


def _cache(rng, P=16, R=32, nh_k=2, d=64, M=16):
    books = ModelCodebooks([Codebook(rng.standard_normal((M, 256, d // M)).astype(np.float32))],
                           [Codebook(rng.standard_normal((M, 256, d // M)).astype(np.float32))])
    return PagedPQCache(1, nh_k, d, books, page_size=P, residual=R, max_pages=64, max_seqs=4, max_seq_len=512,
                        dtype="float32", device="cpu")


@pytest.mark.parametrize("rows_per_tile", [16, 32, TC_ROWS])
@pytest.mark.parametrize("sm_count", [1, 8, 132])
def test_tensor_core_schedule_covers_every_row_and_causal_token_once(rng, sm_count, rows_per_tile):
    counts = np.array([200, 1, 40, 0, 17])  # a sequence may have no new token
    n = np.array([500, 3000, 40, 9, 17 + 64])
    units, items = _check_schedule(counts, n, 4, 2, sm_count, rows_per_tile)
    if units.shape[0] < sm_count and sm_count > 1:  # the units leave SMs idle: the long history is split
        assert items.shape[0] > units.shape[0]
    for _ in range(10):  # the count-dependent units are cached: the same counts over other histories
        counts = rng.integers(0, 40, int(rng.integers(1, 9)))
        group, nh_k = int(rng.choice([1, 4, 8])), int(rng.choice([1, 2, 8]))
        for _ in range(3):
            _check_schedule(counts, counts + rng.integers(0, 20000, counts.shape[0]), group, nh_k, sm_count,
                            rows_per_tile)


def _check_schedule(counts, n, group, nh_k, sm_count, rows_per_tile):
    units, items = tensor_core_schedule(counts, n, group, nh_k, sm_count, rows_per_tile)
    B = counts.shape[0]
    # Every (sequence, kv head, row) is in exactly one unit; a unit's items cover [0, tokens its last row sees).
    seen = {}
    for u, (b, kvh, row0, first) in enumerate(units):
        mine = items[items[:, 0] == u]
        assert mine.shape[0] == mine[0, 3] and (mine[:, 3] == mine.shape[0]).all() and mine[0, 0] == u
        assert np.flatnonzero(items[:, 0] == u)[0] == first
        assert mine[0, 1] == 0 and (mine[1:, 1] == mine[:-1, 2]).all() and (mine[:, 1] % TC_TILE == 0).all()
        assert row0 % rows_per_tile == 0
        last_row = min(counts[b] * group, row0 + rows_per_tile) - 1
        assert mine[-1, 2] == n[b] - counts[b] + last_row // group + 1
        for r in range(row0, min(counts[b] * group, row0 + rows_per_tile)):
            seen[(b, kvh, r)] = seen.get((b, kvh, r), 0) + 1
    assert seen == {(b, h, r): 1 for b in range(B) for h in range(nh_k) for r in range(counts[b] * group)}
    return units, items


def test_split_length_fills_whole_waves():
    # 64 units of 32K tokens on 132 SMs: one wave of 128 splits of 16K (cutting by the total, 15.9K, made 192
    # items in 1.45 waves).
    assert split_length(np.full(64, 32768), 132) == 16384
    assert split_length(np.full(8, 34816), 132) == 34816 // 16  # 8 x 16 = 128 items, 2176 tokens each
    assert split_length(np.array([900, 40]), 132) == 960         # shorter than TC_MIN_CHUNK: one split
    assert split_length(np.array([5000]), 1) == 5056             # one SM: splitting gains nothing
    lengths = np.array([7000, 300, 12000, 64, 0])
    chunk = split_length(lengths, 16)
    assert chunk % TC_TILE == 0 and chunk >= TC_MIN_CHUNK
    waves = lambda c: -(-(-(-lengths // c)).sum() // 16) * (c + 2 * TC_TILE)  # noqa: E731
    assert all(waves(chunk) <= waves(c) for c in range(TC_MIN_CHUNK, 12032 + 1, TC_TILE))


def test_split_length_is_the_modelled_optimum(rng):
    """Against a brute force over every length of whole tiles, within SPLIT_WAVES waves of the fewest."""
    from million_cupy.prefill import SPLIT_WAVES

    for _ in range(100):
        tokens, sm = rng.integers(0, 40000, int(rng.integers(1, 80))), int(rng.choice([1, 8, 132]))
        tiles = -(-tokens // TC_TILE)
        top = int(tiles.max(initial=1))
        fewest = max(-(-int(tiles.astype(bool).sum()) // sm), 1)

        def cost(length):
            return max(-(-int((-(-tiles // length)).sum()) // sm), 1) * (length + 2)

        def best(most_waves):
            return min(cost(n) for n in range(min(top, TC_MIN_CHUNK // TC_TILE), top + 1)
                       if cost(n) // (n + 2) <= most_waves)

        assert cost(split_length(tokens, sm) // TC_TILE) == best(fewest + SPLIT_WAVES)
        # A captured launch's grid of max_items (TensorCorePlan.graph_grid: a wave more than the units need)
        max_items = sm * (fewest + int(rng.integers(0, 3)))
        capped = split_length(tokens, sm, max_items) // TC_TILE
        assert int((-(-tiles // capped)).sum()) <= max_items and cost(capped) == best(max_items // sm)


def test_row_tiles_hold_the_longest_sequence_rows():
    assert [tensor_core_row_tiles(r) for r in (1, 16, 17, 32, 33, 64, 65, 128, 5000)] == [1, 1, 2, 2, 4, 4, 8, 8, 8]


def test_tensor_core_path_configurations():
    assert tensor_core_supported(128, 64, "float16") and tensor_core_supported(128, 32, "bfloat16")
    assert tensor_core_supported(64, 16, "float16")
    assert not tensor_core_supported(256, 64, "float16")   # head_dim 256: the LUT path
    assert not tensor_core_supported(128, 8, "float16")    # M < 16
    assert not tensor_core_supported(128, 128, "float16")  # one dim per subspace
    assert not tensor_core_supported(128, 64, "float32")


def test_the_auto_rule():
    def auto(counts, group=4, d=128, M=64, dtype="float16"):
        return takes_tensor_cores(np.asarray(counts), group, d, M, dtype)

    few = FRAGMENT_QUERIES_MIN
    assert auto([LUT_QUERIES_MAX + 1, 1]) and auto([LUT_QUERIES_MAX + 1], group=8, M=16)  # a long chunk
    assert not auto([LUT_QUERIES_MAX + 1], dtype="float32")                               # no tensor-core path
    assert auto([few, few]) and auto([few + 1, few - 1])        # verification in one row tile, averaging `few`
    assert not auto([few - 1] * 3)                                # too few tokens: the LUT path
    assert not auto([few + 1, 1, 1, 1])                           # per-sequence cost beats per-token only on average
    two = FRAGMENT_QUERIES_MIN_TWO_TILES
    assert auto([two, two], group=8) and auto([5, two]) and auto([5, 5])  # 24 / 20 / 20 rows, averaging `two`
    assert not auto([two, two - 1], group=8) and not auto([5, 1, 1])          # two row tiles, below the average
    assert not auto([5, 5], group=8) and not auto([5, 5], M=16)               # 40 rows; no verify_attention
    assert auto([5, 4], group=1) and not auto([few, few], M=16)   # GQA 1; 8 dims per subspace: no verify_attention
    # A pair of drafts: verify_attention over long histories only (on average), in one row tile only
    pair = np.full(2, FRAGMENT_PAIR_TOKENS_MIN)
    assert takes_tensor_cores(np.array([2, 2]), 4, 128, 64, "float16", pair)
    assert takes_tensor_cores(np.array([3, 1]), 4, 128, 64, "float16", pair + [100, -100])
    assert not takes_tensor_cores(np.array([2, 2]), 4, 128, 64, "float16", pair - [0, 1])
    assert not takes_tensor_cores(np.array([2, 1]), 4, 128, 64, "float16", pair)
    assert not takes_tensor_cores(np.array([2, 2]), 16, 128, 64, "float16", pair)  # 32 rows: two row tiles
    assert gathers_fragments(128, 32, 2) and not gathers_fragments(128, 64, 4) and not gathers_fragments(128, 16, 1)


def test_the_dense_rule_counts_the_longest_sequence_rows():
    assert takes_dense(np.array([DENSE_ROWS_MIN // 4, 1]), 4)
    assert not takes_dense(np.array([DENSE_ROWS_MIN // 4 - 1]), 4)
    assert takes_dense(np.array([DENSE_ROWS_MIN]), 1) and not takes_dense(np.array([DENSE_ROWS_MIN - 1, 3]), 1)


@pytest.mark.parametrize("kv_heads", [1, 8])
def test_history_spans_cover_every_padded_history_once(kv_heads):
    n = np.array([1, 0, TC_TILE, DEQUANTIZE_SPAN + 1, 3 * DEQUANTIZE_SPAN, 70])
    spans, hist_row, ws_rows = history_spans(n, kv_heads)
    padded = -(-n // TC_TILE) * TC_TILE
    assert ws_rows == padded.sum() and hist_row.tolist() == (np.cumsum(padded) - padded).tolist()
    assert spans.dtype == np.int32 and (spans[:, 2] % TC_TILE == 0).all() and (spans[:, 3] % TC_TILE == 0).all()
    assert (spans[:, 3] - spans[:, 2] <= DEQUANTIZE_SPAN).all() and (spans[:, 3] > spans[:, 2]).all()
    for b in range(n.shape[0]):
        for h in range(kv_heads):
            mine = spans[(spans[:, 0] == b) & (spans[:, 1] == h)]
            covered = np.concatenate([np.arange(s[2], s[3]) for s in mine]) if mine.size else np.array([], int)
            assert sorted(covered.tolist()) == list(range(padded[b]))


def test_causal_lengths_follow_the_final_flush_state():
    P, R = 16, 32
    n_final = np.array([100, 7, 48])
    counts = np.array([40, 7, 1])
    owner, main, res = causal_lengths(n_final, counts, P, R)
    assert owner.tolist() == [0] * 40 + [1] * 7 + [2]
    for i, b in enumerate(owner):
        j = i - int(np.flatnonzero(owner == b)[0])
        attended = n_final[b] - counts[b] + j + 1
        pages = int(full_pages(n_final[b], P, R)) * P
        assert main[i] + res[i] == attended
        assert main[i] == min(pages, attended)  # tokens in pages after the append are read as codes


def test_cpu_prefill_is_causal_attention_over_the_dequantized_cache(rng):
    cache = _cache(rng)
    seqs = [cache.add_sequence() for _ in range(3)]
    history = [50, 0, 31]
    counts = [9, 5, 1]  # the first chunk crosses a flush; the second is a first prompt; the third one token
    k = rng.standard_normal((sum(history), 2, 64)).astype(np.float32)
    cache.append(0, seqs, k, k * 0.5, lengths=history)
    new = rng.standard_normal((sum(counts), 2, 64)).astype(np.float32)
    cache.append(0, seqs, new, -new, lengths=counts)
    ind = np.concatenate([[0], np.cumsum(counts)])
    q = rng.standard_normal((sum(counts), 8, 64))
    out, lse = mc.prefill_attention(cache, 0, seqs, q, ind, return_lse=True)
    for b, s in enumerate(seqs):
        ks, vs = cache.dequantize(0, s)
        for j in range(counts[b]):
            row = ind[b] + j
            end = history[b] + j + 1
            o, l = reference.decode_attention(q[row : row + 1], [ks[:end]], [vs[:end]])
            assert reference.relative_error(out[row : row + 1], o) < 1e-12
            assert np.allclose(lse[row], l[0])
    # One new token per sequence is decode.
    one = np.arange(4)
    q1 = q[ind[1:] - 1]
    assert reference.relative_error(mc.prefill_attention(cache, 0, seqs, q1, one), mc.decode(cache, 0, seqs, q1)) < 1e-12


def test_prefill_errors_name_what_was_expected(rng):
    cache = _cache(rng)
    s = cache.add_sequence()
    cache.append(0, [s], rng.standard_normal((4, 2, 64)).astype(np.float32),
                 rng.standard_normal((4, 2, 64)).astype(np.float32), lengths=[4])
    q = np.zeros((2, 8, 64))
    with pytest.raises(ValueError, match="qo_indptr: expected 2 integer offsets"):
        mc.prefill_attention(cache, 0, [s], q, [0, 1, 2])
    with pytest.raises(ValueError, match="non-decreasing"):
        mc.prefill_attention(cache, 0, [s], q, [1, 2])
    with pytest.raises(ValueError, match="new tokens but only 4 keys"):
        mc.prefill_attention(cache, 0, [s], np.zeros((5, 8, 64)), [0, 5])
    with pytest.raises(ValueError, match=r"q: expected shape \(2, num_heads, 64\)"):
        mc.prefill_attention(cache, 0, [s], np.zeros((3, 8, 64)), [0, 2])
    with pytest.raises(UnsupportedConfiguration, match="GPU cache"):
        mc.BatchPrefillWrapper(cache, 8)
    for scale in (-0.1, 0.0, float("nan"), float("inf"), "0.1"):
        with pytest.raises(ValueError, match=r"scale: expected a positive finite softmax scale or None, got"):
            mc.prefill_attention(cache, 0, [s], q, [0, 2], scale=scale)
    # a positive scale other than the default reaches the reference
    half = mc.prefill_attention(cache, 0, [s], np.ones((2, 8, 64)), [0, 2], scale=0.5 / 8)
    default = mc.prefill_attention(cache, 0, [s], np.ones((2, 8, 64)) * 0.5, [0, 2])
    assert reference.relative_error(half, default) < 1e-12


def test_fitting_regime_follows_the_devices_shared_memory():
    """H200 (227 KB per block): every regime fits. A100 (163 KB): verify_attention with one row tile (160 KB at
    head_dim 128) fits, with two (168 KB) it does not, nor does prefill_attention (200 KB), so chunks take the dense
    regime (dequantize_history 160 KB); drafts never take it. sm_89 (99 KB): nothing fits at head_dim 128; at
    head_dim 64 the dense regime (80 KB) does."""
    from million_cupy.prefill import fitting_regime

    h200, a100, ada = 232448, 166912, 101376
    assert [fitting_regime(False, rows, 128, 64, h200) for rows in (16, 32, 64, 128)] == ["on_chip"] * 4
    assert fitting_regime(True, 512, 128, 64, h200) == "dense"
    assert [fitting_regime(False, rows, 128, 64, a100) for rows in (16, 32, 33, 128)] == \
        ["on_chip", None, "dense", "dense"]
    assert [fitting_regime(dense, 64, 128, 32, ada) for dense in (False, True)] == [None, None]
    assert [fitting_regime(False, rows, 64, 32, ada) for rows in (16, 32, 64)] == [None, None, "dense"]


@pytest.mark.parametrize("value", ["2", "yes", ""])
def test_the_warpgroup_mma_switch_takes_0_or_1_only(monkeypatch, value):
    """MILLION_CUPY_WGMMA (prefill.WGMMA_ENV) chooses between verify_attention and its warpgroup-MMA form; any
    other value is refused before a device is asked anything."""
    from million_cupy.prefill import WGMMA_ENV, verify_uses_wgmma

    monkeypatch.setenv(WGMMA_ENV, value)
    with pytest.raises(ValueError, match=f"MILLION_CUPY_WGMMA: expected 0 .* or 1 .*, got {value!r}"):
        verify_uses_wgmma(128, 32, 64, 2)
    monkeypatch.setenv(WGMMA_ENV, "0")
    assert not verify_uses_wgmma(128, 32, 64, 2)  # off: no device query either


@pytest.mark.parametrize("page_size", [16, 32])
def test_the_warpgroup_mma_form_needs_pages_of_whole_steps(monkeypatch, page_size):
    """verify_attention_wgmma reads one page id per 64-token step: smaller pages keep verify_attention, decided
    before any device query; splits start at whole tiles, so every step of a split lies in one page."""
    from million_cupy import prefill

    def no_device():
        raise AssertionError("the page size alone decides")

    monkeypatch.setenv(prefill.WGMMA_ENV, "1")
    monkeypatch.setattr(prefill, "device_compute_capability", no_device)
    assert not prefill.verify_uses_wgmma(128, 32, page_size, 2)
    assert prefill.TC_TILE % prefill.WGMMA_STEP == 0
    with pytest.raises(AssertionError, match="the page size alone"):
        prefill.verify_uses_wgmma(128, 32, 64, 2)  # pages of whole steps: the device is asked


def test_the_warpgroup_mma_kernels_build_for_sm90a_with_their_wgmma_asynchronous():
    """verify_attention_wgmma (prefill_attention.cu under MC_SM90A_KERNELS) compiles offline for sm_90a, and
    ptxas keeps its wgmma asynchronous (a C75xx note: a wait after every wgmma); the plain builds never see it."""
    import re

    from million_cupy import kernels
    from million_cupy.errors import DeviceUnavailable
    from million_cupy.prefill import TC_SOURCE, WGMMA_DEFINES

    try:
        kernels.nvrtc_version()
    except DeviceUnavailable as exc:
        pytest.skip(f"NVRTC unavailable: {exc}")
    build = kernels.nvrtc_compile_offline(TC_SOURCE, [], arch="sm_90a", defines=WGMMA_DEFINES)
    for entry in ("verify_attention_wgmma_f16", "verify_attention_wgmma_bf16"):
        assert f"Compiling entry function '{entry}' for 'sm_90a'" in build.log
    assert not [line for line in build.log.splitlines() if re.search(r"\(C75\d\d\).*wgmma", line)]
    plain = kernels.nvrtc_compile_offline(TC_SOURCE, ["mc::prefill::prefill_merge<128, __half, 2>"], arch="sm_90")
    assert "verify_attention_wgmma" not in plain.log


def test_the_wgmma_barrier_checks_delays_still_find_their_places(tmp_path):
    """bench/wgmma_barrier_check.py delays inserts its sleeps after code it finds exactly once in cuda_src/; a
    change there must not silently turn the check into a plain rerun."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "wgmma_barrier_check.py"
    spec = importlib.util.spec_from_file_location("wgmma_barrier_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.delayed_sources(tmp_path)
    for name, anchor, delay in module.DELAYS:
        assert (tmp_path / name).read_text().count(anchor + delay) == 1
