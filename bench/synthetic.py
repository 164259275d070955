"""Synthetic long-context post-RoPE Q/K/V for attention benchmarks.

Random Gaussian Q and K are a poor benchmark input for block-sparse attention: their pooled block
means are all close to zero, every block score is about the same, and a top-p selection keeps
almost every block. Real post-RoPE attention is far from flat: a few key columns (the first
tokens, "attention sinks", and sparse salient tokens) draw mass from everywhere, most heads
favour recent tokens, and content-driven heads retrieve earlier passages on the same subject.

This module builds **synthetic** inputs with that structure. Nothing here comes from a real
model or real text; densities measured on it say how the kernels behave on structured inputs,
not what a given model would select. Per head, before RoPE, every token vector is a sum of:

- **content**: a rank-``rank`` signal. The sequence is cut into segments of random length
  (mean ``mean_segment`` tokens), each about one of ``topics`` topics; a token carries its
  topic's embedding plus token noise, projected into the head dim by a per-head matrix. Queries
  and keys of one KV group use nearly the same projection, so a query scores high against keys
  of the same topic: long-range retrieval of earlier segments. The projection is weighted
  toward the slow (low-frequency) RoPE pairs, where semantic content lives in real models and
  survives long distances.
- **locality**: one constant vector per head, shared by queries and keys, weighted toward the
  fast (high-frequency) RoPE pairs. After RoPE its score is ``sum_i |p_i|^2 cos((m - n)
  theta_i)``: a peak at distance 0 that decays over a few hundred tokens (a "slash"/recent
  window pattern that mean pooling blurs, which is what Prism's high band is for).
- **heavy columns**: the first ``sink_tokens`` keys, and about one key in ``salient_every``
  at random positions, get a large component along a per-head direction in the slowest RoPE
  pairs; every query carries a bias along that direction. These keys draw mass from all
  queries within the slow pairs' coherence length (sinks; salient tokens).
- **noise**: isotropic Gaussian per token.

Per KV head the strengths of the four parts are drawn at random (so heads range from local to
retrieval- to sink-dominated); the query heads of a group perturb their KV head's parameters.
Strengths are set as target contributions to the logit ``q . k / sqrt(D)``. Then real RoPE
(rotate-half layout, pair ``i`` = dims ``(i, i + D/2)``, ``theta_i = base^(-2i/D)``) is applied
to Q and K. V is standard Gaussian.

Calibration of the defaults (CPU, eager scoring, seed 1; indicative only): Prism's default
selection (top-p 0.95 per band) keeps 0.28 / 0.15 / 0.23 of the causal blocks at 8K / 32K / 128K
in the Qwen shape and 0.21 / 0.16 at 8K / 32K in the Llama shape, the range reported for real
models (0.24 for Qwen2.5-0.5B on 32K tokens of text). The exact attention of these inputs is
sharper: the smallest block set holding 95% of a row's true attention mass is 5-17% of the
blocks, so the block estimate errs on the dense side. Random Gaussian Q/K give 0.99.

Everything is generated on the target device in chunks of positions (a few seconds at 1M
tokens on a GPU), deterministically from ``seed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SyntheticSpec", "synthetic_qkv", "rope_rotate"]


@dataclass(frozen=True)
class SyntheticSpec:
    """Knobs of the synthetic generator (the defaults are what the benchmark uses).

    Attributes:
        rope_base: RoPE base (500000 for Llama-3, 1e6 for Qwen2.5).
        rank: dimension of the topic embeddings (the content signal's rank).
        topics: number of distinct topics; a content query matches about ``1/topics`` of the
            earlier segments.
        mean_segment: mean segment length in tokens (exponentially distributed, at least 16).
        token_noise: per-token noise added to the topic embedding (relative to its unit norm).
        sink_tokens: number of leading tokens that act as attention sinks.
        salient_every: on average one salient key every this many tokens.
        local_logit, content_logit, sink_logit, salient_logit: ranges ``(lo, hi)`` of the
            per-KV-head target logit contribution ``q . k / sqrt(D)`` of each part at distance 0.
        noise_logit: standard deviation of the noise-noise part of the logit.
        head_jitter: relative spread of the query heads of one group around their KV head.
        chunk: positions generated at a time (bounds the float32 temporaries).
    """

    rope_base: float = 500000.0
    rank: int = 16
    topics: int = 24
    mean_segment: int = 768
    token_noise: float = 0.3
    sink_tokens: int = 4
    salient_every: int = 1024
    local_logit: tuple[float, float] = (8.0, 14.0)
    content_logit: tuple[float, float] = (5.0, 10.0)
    sink_logit: tuple[float, float] = (8.0, 14.0)
    salient_logit: tuple[float, float] = (4.0, 8.0)
    noise_logit: float = 0.25
    head_jitter: float = 0.2
    chunk: int = 1 << 15


def rope_rotate(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """Apply rotate-half RoPE to ``x`` ``(..., C, D)`` at integer ``positions`` ``(C,)``.

    Angles are computed in float64 so that positions near 1M keep their precision, then the
    rotation is applied in ``x``'s dtype (float32 here).
    """
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d // 2, device=x.device, dtype=torch.float64) * 2 / d)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    cos = torch.cos(angles).to(x.dtype).repeat(1, 2)
    sin = torch.sin(angles).to(x.dtype).repeat(1, 2)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


def _pair_profile(d: int, band: str, device) -> Tensor:
    """Per-pair magnitudes ``(D/2,)`` (pair 0 rotates fastest) concentrating a component in a band.

    ``"fast"``: a smooth step over the faster half of the pairs; ``"slow"``: over the slower
    half; ``"slowest"``: the slowest eighth only (it must keep its sign over long distances).
    """
    half = d // 2
    frac = torch.arange(half, device=device, dtype=torch.float32) / max(half - 1, 1)
    if band == "fast":
        return torch.sigmoid((0.5 - frac) * 12.0)
    if band == "slow":
        return torch.sigmoid((frac - 0.5) * 12.0)
    return (frac >= 1.0 - 1.0 / 8.0).float().clamp_min(1e-3)


def _pairs_to_dims(re: Tensor, im: Tensor) -> Tensor:
    """Rotate-half layout: pair ``i`` is dims ``(i, i + D/2)``."""
    return torch.cat((re, im), dim=-1)


def _phase_vectors(magnitude: Tensor, phase: Tensor) -> Tensor:
    """Unit vectors ``(..., D)`` whose RoPE pair ``i`` has length ``magnitude[i]`` and angle
    ``phase[..., i]``.

    Fixed pair magnitudes (rather than Gaussian ones) spread a component evenly over its band,
    which keeps its fluctuation at long distances after RoPE small (about ``1/sqrt(pairs)``).
    """
    return _unit(_pairs_to_dims(magnitude * torch.cos(phase), magnitude * torch.sin(phase)))


def _unit(x: Tensor) -> Tensor:
    """Normalise the last dim to unit length."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _uniform(lo_hi: tuple[float, float], n: int, gen: torch.Generator, device) -> Tensor:
    lo, hi = lo_hi
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=device)


def _amplitude(logit: Tensor, d: int) -> Tensor:
    """Per-side amplitude ``a`` so that two aligned unit vectors scaled by ``a`` give ``logit``
    (``a^2 / sqrt(D) = logit``)."""
    return (logit * math.sqrt(d)).sqrt()


def _head_params(hq: int, hkv: int, d: int, spec: SyntheticSpec, gen, device) -> dict:
    """Query/key vectors of each part, scaled to their logit contributions.

    Returns ``{"content": (q (Hq, r, D), k (Hkv, r, D)), "local": (q (Hq, D), k (Hkv, D)),
    "heavy": (q (Hq, D), k (Hkv, D)), "salient_ratio": (Hkv,), "sigma": float}``.
    """
    group = hq // hkv
    half = d // 2

    def rand(*shape):
        return torch.rand(*shape, generator=gen, device=device)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    def to_query_heads(x: Tensor) -> Tensor:
        return x.repeat_interleave(group, dim=0)

    # Content: Gaussian directions in the slow half; query heads perturb their KV head's.
    slow = _pair_profile(d, "slow", device).repeat(2)
    content_k = _unit(randn(hkv, spec.rank, d) * slow)
    perturb = _unit(randn(hq, spec.rank, d) * slow)
    content_q = _unit(to_query_heads(content_k) + spec.head_jitter * perturb)

    # Locality and heavy direction: fixed pair magnitudes, random phases; a query head's phases
    # are its KV head's plus a small jitter, so its score peaks at distance 0 (locality) or
    # stays positive (heavy keys).
    def phase_pair(band: str) -> tuple[Tensor, Tensor]:
        magnitude = _pair_profile(d, band, device)
        phase_k = 2 * math.pi * rand(hkv, half)
        phase_q = to_query_heads(phase_k) + spec.head_jitter * randn(hq, half)
        return _phase_vectors(magnitude, phase_q), _phase_vectors(magnitude, phase_k)

    local_q, local_k = phase_pair("fast")
    heavy_q, heavy_k = phase_pair("slowest")

    def amplitudes(logit_kv: Tensor) -> tuple[Tensor, Tensor]:
        """``(query side (Hq,), key side (Hkv,))`` amplitudes for per-KV-head logits."""
        a = _amplitude(logit_kv, d)
        spread = 1.0 + spec.head_jitter * (2 * rand(hq) - 1)
        return to_query_heads(a) * spread, a

    a_local = amplitudes(_uniform(spec.local_logit, hkv, gen, device))
    a_content = amplitudes(_uniform(spec.content_logit, hkv, gen, device))
    sink_logit = _uniform(spec.sink_logit, hkv, gen, device)
    a_heavy = amplitudes(sink_logit)
    return {
        "content": (
            content_q * a_content[0][:, None, None],
            content_k * a_content[1][:, None, None],
        ),
        "local": (local_q * a_local[0][:, None], local_k * a_local[1][:, None]),
        # Queries carry a constant bias along the heavy direction; keys carry it only at the
        # sink (weight 1) and salient (weight salient_ratio) positions.
        "heavy": (heavy_q * a_heavy[0][:, None], heavy_k * a_heavy[1][:, None]),
        "salient_ratio": _uniform(spec.salient_logit, hkv, gen, device) / sink_logit,
        "sigma": math.sqrt(spec.noise_logit),
    }


def _segments(seq_len: int, spec: SyntheticSpec, gen, device) -> tuple[Tensor, Tensor]:
    """Segment start positions ``(S,)`` (first is 0) and the topic of each segment ``(S,)``."""
    n = max(1, 2 * seq_len // spec.mean_segment + 8)
    lengths = (
        (
            -torch.log(torch.rand(n, generator=gen, device=device).clamp_min(1e-12))
            * spec.mean_segment
        )
        .clamp_min(16)
        .long()
    )
    starts = torch.cumsum(lengths, 0) - lengths
    topics = torch.randint(0, spec.topics, (n,), generator=gen, device=device)
    # About twice as many segments as needed; should the lengths fall short, the last segment
    # simply runs to the end.
    return starts, topics


@torch.no_grad()
def synthetic_qkv(
    hq: int,
    hkv: int,
    seq_len: int,
    head_dim: int,
    *,
    spec: SyntheticSpec = SyntheticSpec(),
    batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    device="cpu",
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Synthetic post-RoPE ``q (B, Hq, L, D)``, ``k, v (B, Hkv, L, D)`` (see the module doc).

    Query head ``h`` belongs to KV head ``h // (Hq // Hkv)`` (the ``enable_gqa`` convention).
    Deterministic in ``seed``; every batch element is an independent draw.
    """
    if hq % hkv or head_dim % 2:
        raise ValueError(f"need Hq % Hkv == 0 and an even head dim, got {hq}, {hkv}, {head_dim}")
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    q = torch.empty(batch, hq, seq_len, head_dim, dtype=dtype, device=device)
    k = torch.empty(batch, hkv, seq_len, head_dim, dtype=dtype, device=device)
    v = torch.randn(batch, hkv, seq_len, head_dim, generator=gen, device=device).to(dtype)
    for b in range(batch):
        params = _head_params(hq, hkv, head_dim, spec, gen, device)
        starts, seg_topic = _segments(seq_len, spec, gen, device)
        topic_emb = _unit(torch.randn(spec.topics, spec.rank, generator=gen, device=device))
        for s in range(0, seq_len, spec.chunk):
            pos = torch.arange(s, min(seq_len, s + spec.chunk), device=device)
            q_c, k_c = _chunk(pos, params, starts, seg_topic, topic_emb, spec, gen)
            q[b, :, s : s + len(pos)] = rope_rotate(q_c, pos, spec.rope_base).to(dtype)
            k[b, :, s : s + len(pos)] = rope_rotate(k_c, pos, spec.rope_base).to(dtype)
    return q, k, v


def _chunk(pos, params, starts, seg_topic, topic_emb, spec, gen):
    """Pre-RoPE float32 ``q (Hq, C, D)`` and ``k (Hkv, C, D)`` at positions ``pos``."""
    device = pos.device
    c = len(pos)
    seg = torch.searchsorted(starts, pos, right=True) - 1
    z = topic_emb[seg_topic[seg]]
    z = _unit(
        z
        + spec.token_noise
        / math.sqrt(spec.rank)
        * torch.randn(z.shape, generator=gen, device=device)
    )
    content_q, content_k = params["content"]
    local_q, local_k = params["local"]
    heavy_q, heavy_k = params["heavy"]
    hq, d = local_q.shape
    hkv = local_k.shape[0]
    sigma = params["sigma"]

    # Heavy-key weight per position and KV head: 1 at the sinks, salient_ratio at salient keys.
    salient = torch.rand(c, generator=gen, device=device) < 1.0 / spec.salient_every
    weight = salient[None, :].float() * params["salient_ratio"][:, None]
    weight = torch.where((pos < spec.sink_tokens)[None, :], 1.0, weight)

    k_c = torch.einsum("cr,hrd->hcd", z, content_k)
    k_c += local_k[:, None, :]
    k_c += weight[:, :, None] * heavy_k[:, None, :]
    k_c += sigma * torch.randn(hkv, c, d, generator=gen, device=device)

    q_c = torch.einsum("cr,hrd->hcd", z, content_q)
    q_c += local_q[:, None, :] + heavy_q[:, None, :]
    q_c += sigma * torch.randn(hq, c, d, generator=gen, device=device)
    return q_c, k_c
