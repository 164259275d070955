"""Block scoring: mean pooling, RoPE frequency bands, energy calibration, causal block softmax.

Every function here is plain PyTorch on block-level tensors (``Nq x Nk`` per head, never
``Lq x Lkv``), written to be traced by ``torch.compile(fullgraph=True, dynamic=True)``.

Shapes: ``B`` batch, ``Hq`` query heads, ``Hkv`` key/value heads (``G = Hq // Hkv``),
``L`` tokens, ``D`` head dim, ``N = ceil(L / block_size)`` blocks.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BandScores",
    "score_bands",
    "final_block_inputs",
    "pool_blocks",
    "rope_pairs",
    "band",
    "band_temperature",
    "band_logits",
    "diagonal_range",
    "causal_block_geometry",
    "rows_diagonal_range",
    "local_blocks_table",
    "rows_block_geometry",
    "block_softmax",
    "final_block_probs",
]


def pool_blocks(x: Tensor, block_size: int) -> Tensor:
    """Mean of each block of ``block_size`` tokens, over the real tokens only.

    Written for eager execution: the full blocks are a view of ``x`` (no padded copy) reduced
    by one ATen sum, which reads the input at about twice the speed of the reduction inductor
    generated for it (H200, Llama shape at 128K tokens: 0.27 vs 0.53 ms for Q;
    bench/results/h200_tune.json); the tail block, if any, is reduced on its own.

    Args:
        x: ``(B, H, L, D)``, any float dtype.
    Returns:
        ``(B, H, N, D)`` float32, ``N = ceil(L / block_size)``; the tail block is the mean of
        its ``L - (N - 1) * block_size`` real tokens.
    """
    length = x.shape[2]
    full = length // block_size
    body = x[:, :, : full * block_size].unflatten(2, (full, block_size))
    means = body.sum(3, dtype=torch.float32) / block_size
    tail = length - full * block_size
    if tail:
        rest = x[:, :, full * block_size :].sum(2, keepdim=True, dtype=torch.float32) / tail
        means = torch.cat([means, rest], dim=2)
    return means


def rope_pairs(x: Tensor, layout: str) -> Tensor:
    """View the head dim as ``(2, D/2)`` with the RoPE pair index last, in frequency order.

    Pair ``p`` rotates with ``theta_p = base^(-2p/D)``: ``p = 0`` is the highest frequency in
    both layouts. ``"half"``: pair p = dims (p, p + D/2); ``"interleaved"``: dims (2p, 2p + 1).

    Args:
        x: ``(..., D)``.
    Returns:
        ``(..., 2, D/2)`` (a view for ``"half"``, a transposed view for ``"interleaved"``).
    """
    d = x.shape[-1]
    if layout == "half":
        return x.unflatten(-1, (2, d // 2))
    return x.unflatten(-1, (d // 2, 2)).transpose(-1, -2)


def band(x: Tensor, band_dims: int, which: str, layout: str) -> Tensor:
    """The dims of one frequency band, flattened.

    ``which="high"``: the first ``band_dims / 2`` pairs (fastest rotation);
    ``which="low"``: the last ``band_dims / 2`` pairs (slowest rotation).

    Args:
        x: ``(..., D)``.
    Returns:
        ``(..., band_dims)``.
    """
    pairs = rope_pairs(x, layout)
    n = band_dims // 2
    sel = pairs[..., :n] if which == "high" else pairs[..., pairs.shape[-1] - n :]
    return sel.flatten(-2)


def _rms(x: Tensor) -> Tensor:
    """Root mean square over the last two dims: ``(B, H, N, d) -> (B, H)``."""
    return x.square().mean(dim=(-2, -1)).sqrt()


def band_temperature(q_pool: Tensor, k_pool: Tensor, q_band: Tensor, k_band: Tensor) -> Tensor:
    """Energy-based temperature ``t = sqrt(d_band / D) * rms(q_b)/rms(q) * rms(k_b)/rms(k)``.

    The rms are over all pooled blocks and dims of one (batch, head). Scaling Q or K by a
    positive factor leaves ``t`` unchanged.

    Args:
        q_pool: ``(B, Hq, Nq, D)``; k_pool: ``(B, Hkv, Nk, D)``; q_band / k_band: the same
            with ``d_band`` dims.
    Returns:
        ``(B, Hq)`` float32, clamped away from 0 so that an all-zero band gives finite logits.
    """
    tiny = torch.finfo(torch.float32).tiny
    q_ratio = _rms(q_band) / _rms(q_pool).clamp_min(tiny)
    k_ratio = _rms(k_band) / _rms(k_pool).clamp_min(tiny)
    group = q_pool.shape[1] // k_pool.shape[1]
    k_ratio = k_ratio.repeat_interleave(group, dim=1)
    t = math.sqrt(q_band.shape[-1] / q_pool.shape[-1]) * q_ratio * k_ratio
    return t.clamp_min(1e-20)


def band_logits(q_band: Tensor, k_band: Tensor, divisor: Tensor) -> Tensor:
    """Block logits of one band, GQA without repeating K.

    Args:
        q_band: ``(B, Hq, Nq, d)`` float32; k_band: ``(B, Hkv, Nk, d)`` float32;
        divisor: ``(B, Hq)``, the per-head ``sqrt(d) * t``.
    Returns:
        ``(B, Hq, Nq, Nk)`` float32: ``q_band @ k_band^T / divisor``. Query head ``h`` reads
        key head ``h // G`` (the ``enable_gqa`` convention of SDPA and FlexAttention).
    """
    b, hq, nq, d = q_band.shape
    hkv, nk = k_band.shape[1], k_band.shape[2]
    q5 = q_band.reshape(b, hkv, (hq // hkv) * nq, d)
    logits = torch.matmul(q5, k_band.transpose(-1, -2)).view(b, hq, nq, nk)
    return logits / divisor[:, :, None, None]


def diagonal_range(row_start, num_rows, q_len, kv_len, block_size: int, device):
    """First and last key block of the causal diagonal of query blocks ``row_start ..
    row_start + num_rows - 1`` (see :func:`causal_block_geometry`).

    Returns:
        ``(first, last)``: int64 ``(num_rows,)`` each; ``last - first`` is 0 or 1.
    """
    rows = torch.arange(num_rows, device=device) + row_start
    return rows_diagonal_range(rows, q_len, kv_len, block_size)


def local_blocks_table(
    rows: Tensor, num_kv_blocks, q_len, kv_len, block_size: int, count: int
) -> Tensor:
    """Bool ``(R, Nk)``: the ``count`` key blocks right before the first diagonal block of
    each query block in ``rows`` (``PrismConfig.local_blocks``)."""
    first, _ = rows_diagonal_range(rows, q_len, kv_len, block_size)
    cols = torch.arange(num_kv_blocks, device=rows.device)[None, :]
    return (cols < first[:, None]) & (cols >= first[:, None] - count)


def rows_diagonal_range(rows: Tensor, q_len, kv_len, block_size: int):
    """:func:`diagonal_range` of any query blocks, ``rows``: int64 ``(R,)``."""
    # Query block r spans absolute positions r * bs + offset .. min((r + 1) * bs, Lq) - 1 +
    # offset; the divisions by the block size are done once, on the (host-side) scalars:
    # per element, inductor would recompute them inside every kernel that reads the causal
    # geometry, and int64 division is slow on the GPU.
    offset = kv_len - q_len
    first = rows + offset // block_size
    last = torch.clamp(
        rows + (offset + block_size - 1) // block_size, max=(kv_len - 1) // block_size
    )
    return first, last


def causal_block_geometry(
    row_start, num_rows, num_kv_blocks, q_len, kv_len, block_size: int, device
) -> tuple[Tensor, Tensor]:
    """Which key blocks query blocks ``row_start .. row_start + num_rows - 1`` can see.

    The causal rule is bottom-right aligned: query token ``t`` (0-based in the query) sits at
    absolute position ``t + kv_len - q_len`` and sees keys at positions ``<=`` that. A query
    block spans absolute positions ``[first, last]``; it sees key blocks ``j <= last // bs``,
    and the key blocks ``first // bs .. last // bs`` hold its causal diagonal (one block
    when ``kv_len - q_len`` is a multiple of the block size, else up to two).

    Returns:
        ``(allowed, diagonal)``: bool ``(num_rows, num_kv_blocks)`` each; ``diagonal`` is a
        subset of ``allowed``.
    """
    rows = torch.arange(num_rows, device=device) + row_start
    return rows_block_geometry(rows, num_kv_blocks, q_len, kv_len, block_size)


def rows_block_geometry(
    rows: Tensor, num_kv_blocks, q_len, kv_len, block_size: int
) -> tuple[Tensor, Tensor]:
    """:func:`causal_block_geometry` of any query blocks, ``rows``: int64 ``(R,)``."""
    first, last = rows_diagonal_range(rows, q_len, kv_len, block_size)
    cols = torch.arange(num_kv_blocks, device=rows.device)
    allowed = cols[None, :] <= last[:, None]
    diagonal = allowed & (cols[None, :] >= first[:, None])
    return allowed, diagonal


def block_softmax(logits: Tensor, allowed: Tensor) -> Tensor:
    """Softmax over the causally visible key blocks of each row, in float32.

    Args:
        logits: ``(B, H, R, Nk)``; allowed: bool ``(R, Nk)`` with at least one True per row.
    Returns:
        ``(B, H, R, Nk)`` float32 probabilities, exactly 0 where not allowed.
    """
    masked = logits.float().masked_fill(~allowed, float("-inf"))
    return torch.softmax(masked, dim=-1)


def final_block_probs(
    q_final: Tensor, k_fine: Tensor, q_len, kv_len, block_size: int, pool: int
) -> Tensor:
    """Block probabilities of the last query block from ``pool``-token sub-blocks.

    Each query sub-block of the last query block (its mean query) gets a causal softmax over
    the key sub-blocks (their mean keys; scale ``1/sqrt(D)``, all head dims, no calibration),
    bottom-right aligned: key sub-block ``c`` is visible when its first token is not after
    the sub-block's last query position. The probabilities are summed per key block and
    averaged over the query sub-blocks.

    Args:
        q_final: ``(B, Hq, G, D)`` float32, ``G = block_size / pool``: the last query block
            mean-pooled over ``pool`` tokens, zero rows past its last token (a fixed ``G``,
            so that a short last block does not give a compiled graph another shape);
            k_fine: ``(B, Hkv, Rk, D)`` float32, all keys mean-pooled over ``pool`` tokens
            (``Rk = ceil(Lkv / pool)``).
    Returns:
        ``(B, Hq, 1, Nk)`` float32, rows summing to 1.
    """
    b, hq, g, d = q_final.shape
    rk = k_fine.shape[2]
    per_block = block_size // pool
    nq = (q_len + block_size - 1) // block_size
    nk = (kv_len + block_size - 1) // block_size
    logits = band_logits(q_final, k_fine, q_final.new_full((b, hq), math.sqrt(d)))
    first = torch.arange(g, device=q_final.device) * pool + (nq - 1) * block_size
    real = first < q_len  # query sub-blocks holding tokens
    last = torch.clamp(first + pool, max=q_len) - 1 + (kv_len - q_len)
    visible = torch.arange(rk, device=q_final.device)[None, :] * pool <= last[:, None]
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    probs = torch.nn.functional.pad(probs, (0, nk * per_block - rk))
    per_key_block = probs.view(b, hq, g, nk, per_block).sum(-1) * real[:, None]
    return per_key_block.sum(2, keepdim=True) / real.sum()


class BandScores(NamedTuple):
    """The per-call part of the scoring: pooled band vectors and their logit divisors.

    ``q_*``: float32 ``(B, Hq, Nq, d_band)``; ``k_*``: float32 ``(B, Hkv, Nk, d_band)``;
    ``div_*``: float32 ``(B, Hq)``, ``sqrt(d_band) * t_band``. With
    ``PrismConfig.final_block_pool``: ``q_final`` ``(B, Hq, block_size / pool, D)`` and
    ``k_fine`` ``(B, Hkv, ceil(Lkv / pool), D)`` (:func:`final_block_inputs`), else ``None``.
    """

    q_high: Tensor
    k_high: Tensor
    div_high: Tensor
    q_low: Tensor
    k_low: Tensor
    div_low: Tensor
    q_final: Optional[Tensor] = None
    k_fine: Optional[Tensor] = None


def score_bands(
    config,
    q_pool: Tensor,
    k_pool: Tensor,
    high_temperature,
    low_temperature,
    q_final: Optional[Tensor] = None,
    k_fine: Optional[Tensor] = None,
) -> BandScores:
    """Bands of the pooled Q and K and their temperatures (calibrated, or the given ones).

    Args:
        config: a :class:`~prism_flex.PrismConfig` (its ints are read, its floats are not:
            the temperatures come as arguments, so that a compiled caller treats them as
            inputs rather than constants, with no recompilation per value).
        q_pool: ``(B, Hq, Nq, D)`` float32; k_pool: ``(B, Hkv, Nk, D)`` float32
            (:func:`pool_blocks`).
        q_final, k_fine: passed through (:func:`final_block_inputs`).
    """
    high_dims, low_dims = config.band_dims(q_pool.shape[-1])
    parts = []
    for dims, which, temperature in (
        (high_dims, "high", high_temperature),
        (low_dims, "low", low_temperature),
    ):
        q_band = band(q_pool, dims, which, config.rope_layout)
        k_band = band(k_pool, dims, which, config.rope_layout)
        if config.calibrate:
            t = band_temperature(q_pool, k_pool, q_band, k_band)
        else:
            t = torch.full(q_pool.shape[:2], temperature, dtype=torch.float32, device=q_pool.device)
        parts += [q_band, k_band, math.sqrt(dims) * t]
    return BandScores(*parts, q_final, k_fine)


def final_block_inputs(q: Tensor, k: Tensor, block_size: int, pool: int) -> tuple[Tensor, Tensor]:
    """The pooled inputs of :func:`final_block_probs`: the last query block mean-pooled over
    ``pool`` tokens, zero-padded to ``block_size / pool`` rows (a fixed size: a last block
    of one sub-block would otherwise give a compiled caller another shape), and all keys
    mean-pooled over ``pool`` tokens.

    Args:
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hkv, Lkv, D)``.
    Returns:
        ``(q_final, k_fine)``: float32 ``(B, Hq, block_size / pool, D)`` and
        ``(B, Hkv, ceil(Lkv / pool), D)``.
    """
    nq = (q.shape[2] + block_size - 1) // block_size
    return final_query_block(q[:, :, (nq - 1) * block_size :], block_size, pool), pool_blocks(
        k, pool
    )


def final_query_block(tail: Tensor, block_size: int, pool: int) -> Tensor:
    """``q_final`` of :func:`final_block_inputs` from the last query block's tokens ``tail``
    ``(B, Hq, 1..block_size, D)``: float32 ``(B, Hq, block_size / pool, D)``."""
    q_final = pool_blocks(tail, pool)
    return F.pad(q_final, (0, 0, 0, block_size // pool - q_final.shape[2]))
