"""million_cupy.integrations.transformers: a tiny random Llama decoding through PQCache.

CPU (the float64 reference path): every decode step's logits agree with the quality study's simulation
(``bench/quality.py``: dequantized K/V in full pages, exact residual window, per query position), which
is an independent, whole-forward computation of the same semantics; short sequences (all in the residual
window) generate exactly what transformers' own DynamicCache generates. GPU: the kernels' decode agrees
with the CPU reference path on the same model and codebooks. Misuse raises with the reason.

Needs torch and transformers (extra ``hf``); skipped without them. CI runs this file in its own step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from million_cupy.errors import UnsupportedConfiguration  # noqa: E402
from million_cupy.integrations.transformers import PQCache, calibrate, use_pq_attention  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality  # noqa: E402


def _model(seed: int = 0, layers: int = 2, heads: int = 4, kv_heads: int = 2):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64 * heads, intermediate_size=256, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=128,
                         max_position_embeddings=1024, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def _ids(rng, B: int, T: int):
    return torch.from_numpy(rng.integers(0, 256, (B, T)).astype(np.int64))


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(7)
    model = _model()
    books = {per_head: calibrate(model, [_ids(rng, 2, 300)], M=64, per_head=per_head, iters=3, progress=False)
             for per_head in (False, True)}
    return model, books


def _decode_logits(model, cache, ids, prefill: int):
    """Prefill ``ids[:, :prefill]``, then decode the rest one token at a time; logits predicting
    tokens ``prefill .. T-1``."""
    use_pq_attention(model)
    with torch.no_grad():
        out = model(input_ids=ids[:, :prefill], past_key_values=cache, use_cache=True)
        logits = [out.logits[:, -1]]
        for t in range(prefill, ids.shape[1] - 1):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.stack(logits, 1).double()


def _simulated_logits(model, books, ids, prefill: int):
    quality.register_simulation()
    model.set_attn_implementation(quality.SIM_NAME)
    quality.SIM.quantizer, quality.SIM.exact_below = quality.Quantizer("pq", books=books), prefill
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[:, prefill - 1:-1]
    finally:
        quality.SIM.quantizer, quality.SIM.exact_below = None, 0
    return logits.double()


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("prefill,total", [(100, 260), (128, 200), (1, 140)])
def test_cpu_decode_matches_simulation(tiny, rng, per_head, prefill, total):
    # Crosses flushes at 128 and 192 tokens (exactly-full windows included), from a prefill shorter
    # than, equal to and far below the window.
    model, books = tiny
    ids = _ids(rng, 2, total)
    cache = PQCache(model, books[per_head], max_seq_len=512)
    got = _decode_logits(model, cache, ids, prefill)
    want = _simulated_logits(model, books[per_head], ids, prefill)
    assert got.shape == want.shape == (2, total - prefill, 256)
    # Per predicted position, relative to the logits' scale. The two paths agree to ~5e-7, except after a K or V
    # vector that lies near a tie between two centroids: its float32 values from the incremental forward and from
    # the simulation's whole forward differ by ~1e-6, so the two may encode it differently (seen: one V subvector
    # of one token, then ~3e-4 at the positions after its flush, on some CPUs). Quantizing at all moves the logits
    # by ~2e-2 (test_quantization_changes_long_generation_logits). So most positions must agree tightly, and none
    # may differ by more than a code flip does.
    per_position = (got - want).abs().amax(dim=(0, 2)) / want.abs().max()
    assert per_position.median() < 1e-5, per_position
    assert per_position.max() < 1e-3, per_position
    stats = cache.stats()
    assert stats["decode_steps"] == total - prefill - 1
    assert stats["prefill_tokens"] == 2 * prefill
    assert cache.get_seq_length() == total - 1


def _greedy(model, prompt, cache, **extra):
    """20 greedy tokens after ``prompt``: SDPA over a DynamicCache for ``cache=None``, else "million_pq"."""
    if cache is None:
        model.set_attn_implementation("sdpa")
        cache = DynamicCache(config=model.config)
    else:
        use_pq_attention(model)
    with torch.no_grad():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                              past_key_values=cache, pad_token_id=0, **extra)


def test_short_generation_equals_dynamic_cache(tiny, rng):
    # 100 + 20 tokens stay in the 128-token residual window: exact, so greedy tokens must match.
    model, books = tiny
    prompt = _ids(rng, 2, 100)
    ref = _greedy(model, prompt, None)
    assert torch.equal(_greedy(model, prompt, PQCache(model, books[False], max_seq_len=256)), ref)


def test_quantization_changes_long_generation_logits(tiny, rng):
    # The test above could pass with PQ switched off; here tokens leave the window, so logits must move.
    model, books = tiny
    ids = _ids(rng, 1, 300)
    got = _decode_logits(model, PQCache(model, books[True], max_seq_len=512), ids, 10)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        exact = model(input_ids=ids, use_cache=False).logits[:, 9:-1].double()
    assert (got[:, :118] - exact[:, :118]).abs().max() < 1e-4  # all in the window: exact
    assert (got[:, 200:] - exact[:, 200:]).abs().max() > 1e-3  # reading PQ pages


def _turns_logits(model, cache, ids, turns, start: int = 0):
    """Feed ``ids`` in the chunks ``turns`` (a prompt, then single tokens or further prompts) to a cache holding
    ``start`` tokens; the logits predicting tokens ``turns[0] .. T-1`` (with ``start``: every chunk's)."""
    use_pq_attention(model)
    logits = []
    with torch.no_grad():
        for end in turns:
            out = model(input_ids=ids[:, start:end], past_key_values=cache, use_cache=True)
            logits.append(out.logits if start else out.logits[:, -1:])
            start = end
    return torch.cat(logits, 1).double()


def _chat_turns(prefill: int, second: tuple[int, int], total: int) -> list[int]:
    """A prompt of ``prefill`` tokens, decode steps to ``second[0]``, a second prompt to ``second[1]``,
    decode steps to ``total``."""
    return [prefill, *range(prefill + 1, second[0] + 1), second[1], *range(second[1] + 1, total + 1)]


@pytest.mark.parametrize("per_head", [False, True])
def test_cpu_second_prompt_matches_simulation(tiny, rng, per_head):
    # A second prompt of 40 tokens over a history with PQ pages (64 tokens flushed at 128), within one flush
    # interval (the next flush is at 192), so the simulation's per-position rule is the cache's; decoding then
    # continues across the flush at 192.
    model, books = tiny
    ids = _ids(rng, 2, 221)
    cache = PQCache(model, books[per_head], max_seq_len=512)
    turns = _chat_turns(130, (132, 172), 220)
    got = _turns_logits(model, cache, ids, turns)[:, :-1]
    want = _simulated_logits(model, books[per_head], ids, 130)[:, : got.shape[1]]
    assert got.shape == want.shape == (2, 220 - 130, 256)
    err = (got - want).abs().max() / want.abs().max()
    assert err < 2e-4, err
    stats = cache.stats()
    assert stats["extend_tokens"] == 2 * 40 and stats["prefill_tokens"] == 2 * 130
    assert cache.get_seq_length() == 220


def test_misuse_raises(tiny, rng):
    model, books = tiny
    use_pq_attention(model)
    ids = _ids(rng, 2, 16)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    with torch.no_grad(), pytest.raises(UnsupportedConfiguration, match="padded"):
        model(input_ids=ids, attention_mask=mask, past_key_values=PQCache(model, books[False]), use_cache=True)
    with pytest.raises(UnsupportedConfiguration, match="beam search"):
        PQCache(model, books[False]).reorder_cache(torch.tensor([0]))
    other = _model(layers=3)
    with pytest.raises(UnsupportedConfiguration, match="3 layers"):
        PQCache(other, books[False])
    with pytest.raises(TypeError, match="ModelCodebooks"):
        PQCache(model, object())
    with pytest.raises(UnsupportedConfiguration, match="max_rollback"):
        PQCache(model, books[False], max_rollback=-1)


def test_without_cache_runs_sdpa(tiny, rng):
    model, _ = tiny
    ids = _ids(rng, 1, 32)
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(input_ids=ids, use_cache=False).logits
        use_pq_attention(model)
        got = model(input_ids=ids, use_cache=False).logits
    assert torch.allclose(got, ref, atol=1e-5)


def test_calibrate_learns_from_the_model(tiny):
    model, books = tiny
    assert books[False].num_layers == 2 and books[False].M == 64 and books[False].d == 128
    assert books[True].num_heads_per_layer == 2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("second_prompt", [False, True], ids=["decode", "second_prompt"])
def test_gpu_kernels_match_simulation(tiny, rng, dtype, second_prompt):
    # The same fp16 / bf16 model on the GPU against the simulation's float32 attention over the dequantized K/V
    # (GQA 2, per-head codebooks, three sequences, flushes): decode through DecodeStep's kernels; or a chat's
    # second prompt through BatchPrefillWrapper's kernels, then decoding on.
    _, books = tiny
    gpu = _model().to("cuda", getattr(torch, dtype))
    cache = PQCache(gpu, books[True], max_seq_len=512)
    if second_prompt:
        ids, prefill = _ids(rng, 3, 221).cuda(), 130
        got = _turns_logits(gpu, cache, ids, _chat_turns(prefill, (132, 172), 220))[:, :-1]
    else:
        ids, prefill = _ids(rng, 3, 280).cuda(), 60
        got = _decode_logits(gpu, cache, ids, prefill)
    want = _simulated_logits(gpu, books[True].to_gpu(), ids, prefill)[:, : got.shape[1]]
    err = (got - want).abs().max() / want.abs().max()
    assert err < (1e-2 if dtype == "float16" else 4e-2), err
    assert (got.argmax(-1) == want.argmax(-1)).double().mean() > 0.95
    stats = cache.stats()
    assert stats["non_finite_appended"] is False
    if second_prompt:
        assert stats["extend"]["query_tokens"] == 3 * 40
        assert stats["extend"]["appends"] == 2 * stats["extend"]["plans"] > 0  # planned appends, every layer
    else:
        assert stats["step"]["plans"] == 280 - 60 - 1


def test_crop_leaves_what_the_cache_holds_without_the_dropped_tokens(tiny, rng):
    # Speculative verification: 25 drafts over a 125-token history (the flush at 128 moves the first 64 tokens into
    # a PQ page), all dropped by crop. Decoding on must give exactly what a cache that never got them gives (the
    # 64 tokens exact again, from the ring).
    model, books = tiny
    ids = _ids(rng, 2, 150)
    cropped, kept = (PQCache(model, books[False], max_seq_len=512, max_rollback=32) for _ in range(2))
    for cache in (cropped, kept):
        _turns_logits(model, cache, ids, [120, 125])
    _turns_logits(model, cropped, ids, [150], start=125)
    assert cropped.storage.dequantize(0, 0)[0].shape[0] == 150
    cropped.crop(125)
    assert cropped.get_seq_length() == 125
    got = _turns_logits(model, cropped, ids, range(126, 141), start=125)
    want = _turns_logits(model, kept, ids, range(126, 141), start=125)
    assert torch.equal(got, want)
    narrow = PQCache(model, books[False], max_seq_len=512)  # ring = window: the first page's tokens are gone
    _turns_logits(model, narrow, ids, [120, 125])
    _turns_logits(model, narrow, ids, [150], start=125)
    with pytest.raises(UnsupportedConfiguration, match="max_rollback"):
        narrow.crop(-25)
    assert narrow.get_seq_length() == 150


def test_assisted_generation_runs_on_a_pq_cache(tiny, rng):
    # generate(assistant_model=...) verifies a draft model's tokens in one forward and crops the rejected ones.
    # 100 + 20 tokens stay in the 128-token window (exact), so the tokens must be plain greedy decoding's.
    model, books = tiny
    prompt = _ids(rng, 1, 100)
    ref = _greedy(model, prompt, None)
    cache = PQCache(model, books[False], max_seq_len=256, max_rollback=32)
    assert torch.equal(_greedy(model, prompt, cache, assistant_model=_model(seed=1)), ref)
    stats = cache.stats()
    assert stats["extend_tokens"] > 0 and stats["cropped_tokens"] > 0  # drafts verified, rejected ones cropped
