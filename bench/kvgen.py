"""Synthetic KV caches with the structure of real LLM caches, for quantization accuracy studies.

Random i.i.d. Gaussian K/V flatter every quantizer: what separates KV quantization schemes in real
models is structure that Gaussian noise lacks. :func:`generate` draws one attention layer's cache
(``k``, ``v``: ``(num_tokens, num_kv_heads, head_dim)``) and decode queries (``q``:
``(num_queries, num_heads, head_dim)``, at positions ``num_tokens, num_tokens + 1, ...``), float32,
with these properties, each documented in the literature on KV quantization (KIVI, KVQuant,
QuaRot, MILLION) and attention sinks (StreamingLLM, "Massive activations"):

* **Outlier key channels.** Per kv head, ``num_outlier_channels`` fixed channels (default 4 of 128)
  are ``outlier_scale`` (20-50x) larger than the rest, on every token. In real keys they are mostly a
  consistent offset, so here their fluctuation is a quarter of their offset. This is what defeats
  per-token uniform quantization of keys: a group holding an outlier channel gets a step so coarse
  that its ordinary channels round to nothing (hence KIVI's per-channel key quantization).
* **Rotary structure** (``rotary=True``). Keys and queries are rotated as by RoPE (the
  "rotate-half" convention of Llama / NeoX: channel ``i`` pairs with ``i + head_dim/2``, frequency
  ``rope_base**(-2i/head_dim)``) at their token positions. Channel scales are per pair, as RoPE
  mixes a pair's two channels; outlier channels are whole pairs taken from the low-frequency half,
  where real outlier channels sit (they survive rotation, so a model can rely on them).
* **Correlated channels.** Key fluctuations are mixed by a random orthogonal matrix with a decaying
  spectrum (singular values ``~ (j+1)**-0.5``), so channels are correlated as in low-rank
  projections; per-pair scales are log-normal (sigma 0.3), per-channel offsets Gaussian (std 0.5).
* **Heavy-tailed values.** ``v`` is Student-t with ``v_dof`` degrees of freedom (default 5: kurtosis
  9 against 3 for a Gaussian), unit variance per element before per-channel log-normal scales, and
  no outlier channels (real values have none, which is why per-token value quantization works).
* **Queries correlated with keys.** Each query head's query is its head's mean direction (in the
  low-frequency half, shared in part by the kv group) plus a fluctuation whose correlation with the
  whitened fluctuation of one earlier key (a random "relevant" token per query and head) is
  ``query_key_correlation``: attention is selective, as for retrieval, not diffuse noise. The queries
  are then scaled per kv head so that the scaled logits ``q.k / sqrt(head_dim)`` over non-sink tokens
  have standard deviation ``logit_std``.
* **Attention sinks.** The first ``num_sinks`` tokens' keys get an added component along the typical
  query direction at the decode positions, its size solved (bisection) so the sinks together take
  ``sink_share`` of the attention of the generated queries on average, per kv head. Their values are
  scaled by ``sink_value_scale`` (0.1): real sinks carry near-zero values, acting as a no-op
  attention target.

``seed`` picks the layer (every parameter above: outlier channels, scales, mixing, mean directions)
and ``sample`` the token draw from it. :func:`training_sample` is the held-out draw a codebook is
trained on: the same layer (same distribution) with an independent token stream, as calibration
data from the same model would be.
"""

from __future__ import annotations

import math

import numpy as np

# Token-stream ids under a layer's seed: the evaluated cache and the held-out training draw.
EVAL_SAMPLE = 0
TRAINING_SAMPLE = 1
# Leading tokens that act as attention sinks, by default (StreamingLLM keeps 4).
DEFAULT_SINKS = 4
# Outlier channels: fluctuation relative to their consistent offset (they are mostly an offset).
_OUTLIER_FLUCTUATION = 0.25
# Log-normal spread of per-pair channel scales and the size of ordinary channels' offsets.
_SCALE_SIGMA = 0.3
_OFFSET_STD = 0.5
# Per-head deviation of a query head's mean direction from its kv group's shared direction.
_HEAD_MEAN_SPREAD = 0.5


def generate(
    num_tokens: int,
    num_kv_heads: int,
    head_dim: int,
    num_heads: int,
    seed: int,
    *,
    num_queries: int = 32,
    sample: int = EVAL_SAMPLE,
    num_outlier_channels: int = 4,
    outlier_scale: tuple[float, float] = (20.0, 50.0),
    num_sinks: int = DEFAULT_SINKS,
    sink_share: float = 0.4,
    sink_value_scale: float = 0.1,
    v_dof: float = 5.0,
    query_key_correlation: float = 0.8,
    logit_std: float = 3.0,
    rotary: bool = True,
    rope_base: float = 10000.0,
) -> dict[str, np.ndarray]:
    """One layer's synthetic KV cache and decode queries (see the module docstring for the model).

    Returns ``{"k", "v"}`` float32 ``(num_tokens, num_kv_heads, head_dim)``, ``"q"`` float32
    ``(num_queries, num_heads, head_dim)`` (query head ``h`` reads kv head ``h // (num_heads //
    num_kv_heads)``), and ``"outlier_channels"`` int ``(num_kv_heads, num_outlier_channels)``.
    """
    if head_dim % 4 or num_heads % num_kv_heads:
        raise ValueError(
            f"expected head_dim a multiple of 4 and num_heads a multiple of num_kv_heads, "
            f"got head_dim={head_dim}, num_heads={num_heads}, num_kv_heads={num_kv_heads}"
        )
    if num_outlier_channels % 2 or num_outlier_channels > head_dim // 2:
        raise ValueError(
            f"num_outlier_channels: expected an even count <= head_dim/2 (whole RoPE pairs), got {num_outlier_channels}"
        )
    if not 0 <= num_sinks < num_tokens:
        raise ValueError(f"num_sinks: expected 0 <= num_sinks < num_tokens = {num_tokens}, got {num_sinks}")
    if num_sinks and not 0.0 < sink_share < 1.0:
        raise ValueError(f"sink_share: expected a fraction in (0, 1), got {sink_share}")
    if v_dof <= 4.0:
        raise ValueError(f"v_dof: expected > 4 degrees of freedom (finite kurtosis), got {v_dof}")
    layer_rng = np.random.default_rng(np.random.SeedSequence([seed]))
    token_rng = np.random.default_rng(np.random.SeedSequence([seed, sample]))
    g = num_heads // num_kv_heads
    half = head_dim // 2
    theta = rope_base ** (-2.0 * np.arange(half) / head_dim)
    k_pos = np.arange(num_tokens)
    q_pos = num_tokens + np.arange(num_queries)
    k = np.empty((num_tokens, num_kv_heads, head_dim))
    v = np.empty((num_tokens, num_kv_heads, head_dim))
    q = np.empty((num_queries, num_kv_heads, g, head_dim))
    outliers = np.empty((num_kv_heads, num_outlier_channels), dtype=np.int64)
    for h in range(num_kv_heads):
        # Layer parameters of this kv head (layer_rng), then its tokens (token_rng).
        low_freq = np.arange(half // 2, half)
        pairs = np.sort(layer_rng.choice(low_freq, num_outlier_channels // 2, replace=False))
        outliers[h] = np.sort(np.concatenate([pairs, pairs + half]))
        pair_scale = np.exp(_SCALE_SIGMA * layer_rng.standard_normal(half))
        pair_scale[pairs] = layer_rng.uniform(*outlier_scale, size=pairs.size)
        k_scale = np.tile(pair_scale, 2)
        k_offset = _OFFSET_STD * layer_rng.standard_normal(head_dim)
        k_offset[outliers[h]] = layer_rng.choice([-1.0, 1.0], size=num_outlier_channels)
        fluct_gain = np.ones(head_dim)
        fluct_gain[outliers[h]] = _OUTLIER_FLUCTUATION
        spectrum = (np.arange(head_dim) + 1.0) ** -0.5
        spectrum /= np.sqrt(np.mean(spectrum**2))  # unit variance per channel on average
        mixing = spectrum[:, None] * _random_orthogonal(head_dim, layer_rng)
        group_mean = np.zeros(head_dim)
        group_mean[low_freq] = layer_rng.standard_normal(low_freq.size)
        group_mean[low_freq + half] = layer_rng.standard_normal(low_freq.size)
        head_means = group_mean + _HEAD_MEAN_SPREAD * layer_rng.standard_normal((g, head_dim)) * (group_mean != 0)
        v_scale = np.exp(_SCALE_SIGMA * layer_rng.standard_normal(head_dim))

        # Keys: scale * (offset + gain * mixed fluctuation), then rotated to their positions.
        k_white = fluct_gain * (token_rng.standard_normal((num_tokens, head_dim)) @ mixing)
        kh = _rope(k_scale * (k_offset + k_white), k_pos, theta, rotary)

        # Queries: mean direction + fluctuation correlated with one relevant earlier key's.
        relevant = token_rng.integers(num_sinks, num_tokens, size=(num_queries, g))
        # (Built after rotation: the part shared with a key must sit where that key's RoPE put it.)
        shared = _unit_rms(_rope(k_white[relevant], relevant, theta, rotary))
        own = token_rng.standard_normal((num_queries, g, head_dim)) @ mixing
        own = _unit_rms(_rope(own, q_pos[:, None], theta, rotary))
        c = query_key_correlation
        qh = _rope(head_means[None], q_pos[:, None], theta, rotary) + c * shared + math.sqrt(1 - c * c) * own
        logits = np.einsum("qgd,td->qgt", qh, kh[num_sinks:]) / math.sqrt(head_dim)
        qh *= logit_std / logits.std(axis=-1).mean()

        if num_sinks:
            # Typical query at the decode positions: the group's mean direction rotated to them.
            typical = _rope(group_mean, q_pos.mean(), theta, rotary)
            direction = typical / np.linalg.norm(typical)
            kh[:num_sinks] += _sink_size(qh, kh, direction, num_sinks, sink_share) * direction
        k[:, h], q[:, h] = kh, qh

        t = token_rng.standard_t(v_dof, size=(num_tokens, head_dim)) / math.sqrt(v_dof / (v_dof - 2))
        t[:num_sinks] *= sink_value_scale
        v[:, h] = v_scale * t
    return {
        "k": k.astype(np.float32),
        "v": v.astype(np.float32),
        "q": q.reshape(num_queries, num_heads, head_dim).astype(np.float32),
        "outlier_channels": outliers,
    }


def training_sample(
    num_tokens: int, num_kv_heads: int, head_dim: int, num_heads: int, seed: int, **kwargs
) -> dict[str, np.ndarray]:
    """Held-out draw for codebook training: layer ``seed``'s distribution, an independent token stream.

    Same arguments and return value as :func:`generate` (``sample`` is fixed to the training stream).
    """
    return generate(num_tokens, num_kv_heads, head_dim, num_heads, seed, sample=TRAINING_SAMPLE, **kwargs)


def _random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    qm, r = np.linalg.qr(rng.standard_normal((n, n)))
    return qm * np.sign(np.diag(r))  # sign fix: Haar-distributed rather than biased by QR's convention


def _rope(x: np.ndarray, pos, theta: np.ndarray, rotary: bool) -> np.ndarray:
    """Rotate-half RoPE of ``x`` (..., d) at positions ``pos`` (broadcast against ``x[..., 0]``)."""
    if not rotary:
        return np.broadcast_to(x, np.broadcast_shapes(x.shape, np.shape(pos) + (1,))).copy()
    ang = np.asarray(pos, dtype=np.float64)[..., None] * theta
    cos, sin = np.cos(ang), np.sin(ang)
    half = theta.size
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def _unit_rms(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True))


def _sink_size(q: np.ndarray, k: np.ndarray, direction: np.ndarray, num_sinks: int, share: float) -> float:
    """Size of the component along ``direction`` that gives the sinks ``share`` of the attention.

    ``q`` is ``(num_queries, g, d)``, ``k`` ``(num_tokens, d)``. The sinks' mean attention share over
    all queries and heads is increasing in the size, so bisection finds it.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = scale * np.einsum("qgd,td->qgt", q, k)
    gain = scale * (q @ direction)[..., None]  # d logit / d size, per query and head
    rest = np.logaddexp.reduce(logits[..., num_sinks:], axis=-1)

    def mean_share(size: float) -> float:
        sinks = np.logaddexp.reduce(logits[..., :num_sinks] + size * gain, axis=-1)
        return float(np.mean(np.exp(sinks - np.logaddexp(sinks, rest))))

    lo, hi = 0.0, 1.0
    while mean_share(hi) < share:
        if hi > 1e6:  # queries pointing away from the sink direction cap the reachable share
            raise ValueError(f"sink_share {share} is out of reach: at most {mean_share(hi):.3f} for these queries")
        lo, hi = hi, 2 * hi
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean_share(mid) < share else (lo, mid)
    return 0.5 * (lo + hi)
