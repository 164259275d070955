"""Block-selection estimators and exact attention-mass metrics for the accuracy evaluation.

Every estimator returns a bool block table ``(B, Hq, Nq, Nk)`` (one row per *query* head, GQA
native: query head ``h`` reads key head ``h // G``), restricted to the causally visible blocks
(bottom-right alignment, :func:`prism_flex.scoring.causal_block_geometry`) with the sink (key
block 0) and the causal diagonal forced. Any table becomes a FlexAttention ``BlockMask`` through
the same path as Prism itself (:func:`table_to_block_mask`: ``compact_blocks`` +
``block_mask_from_tables``), so every method runs on the same kernels.

Methods:

- ``prism``: :func:`prism_flex.prism_block_mask` (dual band, energy-calibrated temperatures);
- ``prism_nocal``: the same with ``calibrate=False`` (temperature 1 in both bands);
- ``meanpool``: both bands = all head dims, no calibration: the union of two identical top-p sets
  is one plain mean-pooling top-p selection (softmax of ``q̄ k̄ᵀ / sqrt(D)`` per block row);
- ``xattn``: an XAttention-style antidiagonal estimator (:func:`xattn_table`), written from the
  method's description;
- ``oracle``: the true block attention mass, the best blocks per head at a given count
  (:func:`oracle_table`);
- ``flashprefill``: a FlashPrefill-style rule (arXiv 2603.06199), written from the method's
  published facts only (:func:`flashprefill_table`): keep the blocks scoring at least
  ``alpha`` x the row's maximum, 2 sink blocks, 4 local blocks, the last 2 query blocks dense.

Metrics: :func:`block_mass` (token-level causal softmax summed per block, chunked over query
blocks) and :func:`recall` (share of the true attention mass inside the selected blocks).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from prism_flex import PrismConfig, prism_block_mask, sparse_attention
from prism_flex.block_mask import block_mask_from_tables, compact_blocks
from prism_flex.scoring import causal_block_geometry, local_blocks_table, pool_blocks
from prism_flex.selection import combine_selection, relative_select, top_p_select

__all__ = [
    "geometry",
    "finalize",
    "table_to_block_mask",
    "density",
    "prism_table",
    "prism_nocal_table",
    "meanpool_config",
    "meanpool_table",
    "xattn_block_scores",
    "xattn_block_probs",
    "xattn_table",
    "subpool_block_probs",
    "subpool_table",
    "flashprefill_block_probs",
    "flashprefill_table",
    "block_mass",
    "oracle_table",
    "recall_from_mass",
    "recall",
    "make_table_attention_function",
    "make_xattn_attention_function",
    "register_table_method",
    "register_xattn",
]


# ---------------------------------------------------------------------------------------------
# Shared geometry and the BlockMask path


def _num_blocks(length: int, bs: int) -> int:
    return (length + bs - 1) // bs


def geometry(q_len: int, kv_len: int, bs: int, device) -> tuple[Tensor, Tensor]:
    """``(allowed, diagonal)``: bool ``(Nq, Nk)`` of all query blocks (causal_block_geometry)."""
    nq, nk = _num_blocks(q_len, bs), _num_blocks(kv_len, bs)
    return causal_block_geometry(0, nq, nk, q_len, kv_len, bs, device)


def forced_blocks(q_len: int, kv_len: int, bs: int, device) -> tuple[Tensor, Tensor]:
    """``(allowed, forced)``: bool ``(Nq, Nk)``, the causally visible blocks and, among them,
    the ones every table keeps (sink and diagonal)."""
    allowed, diagonal = geometry(q_len, kv_len, bs, device)
    forced = diagonal.clone()
    forced[:, 0] = True
    return allowed, forced & allowed


def finalize(selected: Tensor, q_len: int, kv_len: int, bs: int) -> Tensor:
    """``selected`` ∪ sink ∪ diagonal, restricted to the causally visible blocks."""
    allowed, diagonal = geometry(q_len, kv_len, bs, selected.device)
    return combine_selection(selected, selected, allowed, diagonal, True, True)


def table_to_block_mask(table: Tensor, q_len: int, kv_len: int, bs: int):
    """A bool ``(B, H, Nq, Nk)`` table as a forward-only ``BlockMask`` (Prism's own path:
    diagonal blocks partial with the token-level causal ``mask_mod``, the others full)."""
    _, diagonal = geometry(q_len, kv_len, bs, table.device)
    table = table.bool()
    partial = compact_blocks(table & diagonal)
    full = compact_blocks(table & ~diagonal)
    offset = kv_len - q_len
    if offset != 0:
        offset = torch.full((), offset, dtype=torch.int32, device=table.device)
    return block_mask_from_tables(*partial, *full, offset, q_len, kv_len, bs)


def density(table: Tensor, q_len: int, kv_len: int, bs: int) -> Tensor:
    """Selected / causally visible blocks, float32 ``(B, H)``."""
    allowed, _ = geometry(q_len, kv_len, bs, table.device)
    return (table.bool() & allowed).sum((-2, -1)).float() / allowed.sum().float()


# ---------------------------------------------------------------------------------------------
# Prism and its ablations


def prism_table(
    q: Tensor, k: Tensor, cfg: PrismConfig, *, v: Optional[Tensor] = None, compiled: bool = False
) -> Tensor:
    """Prism's selection as a bool table (``prism_block_mask(...).to_dense()``); ``v`` for
    ``cfg.output_error``."""
    return prism_block_mask(q, k, cfg, v=v, compiled=compiled).to_dense().bool()


def prism_nocal_table(q, k, cfg: PrismConfig, *, compiled: bool = False) -> Tensor:
    """Prism without the energy calibration (temperatures ``cfg.high/low_temperature``)."""
    return prism_table(q, k, dataclasses.replace(cfg, calibrate=False), compiled=compiled)


def meanpool_config(cfg: PrismConfig, head_dim: int) -> PrismConfig:
    """Plain mean-pooling top-p as a PrismConfig: both bands are all ``head_dim`` dims and the
    calibration is off, so both bands compute the same softmax of ``q̄ k̄ᵀ / sqrt(D)`` and their
    union is a single top-p set (thresholds: ``cfg.high_threshold`` for both)."""
    return dataclasses.replace(
        cfg,
        high_band_dims=head_dim,
        low_band_dims=head_dim,
        calibrate=False,
        high_temperature=1.0,
        low_temperature=1.0,
        low_threshold=cfg.high_threshold,
    )


def meanpool_table(q, k, cfg: PrismConfig, *, compiled: bool = False) -> Tensor:
    return prism_table(q, k, meanpool_config(cfg, q.shape[-1]), compiled=compiled)


# ---------------------------------------------------------------------------------------------
# XAttention-style antidiagonal scoring


def _stride_groups(x: Tensor, stride: int, length: int, reverse: bool) -> Tensor:
    """``(B, H, L, D) -> (B, H, ceil(L/S), S*D)``: group ``g`` concatenates tokens
    ``gS .. gS+S-1`` (in reverse order when ``reverse``), zero-padded past ``length``."""
    b, h, _, d = x.shape
    n = _num_blocks(length, stride)
    x = F.pad(x.float(), (0, 0, 0, n * stride - length)).view(b, h, n, stride, d)
    if reverse:
        x = x.flip(3)
    return x.reshape(b, h, n, stride * d)


def _gqa_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a (B, Hq, R, E) @ b (B, Hkv, C, E)^T -> (B, Hq, R, C)``, head ``h`` reads ``h // G``."""
    bsz, hq, r, e = a.shape
    hkv, c = b.shape[1], b.shape[2]
    out = torch.matmul(a.reshape(bsz, hkv, (hq // hkv) * r, e), b.transpose(-1, -2))
    return out.view(bsz, hq, r, c)


def _antidiagonal_logits(q: Tensor, k: Tensor, stride: int):
    """Strided antidiagonal sums: ``A[r, c] = sum_s q[rS + s] · k[cS + S-1-s]``, the sum of
    Q·Kᵀ along one antidiagonal of the ``S x S`` tile ``(r, c)``; ``(B, Hq, Rq, Rk)`` with
    ``R = ceil(L / S)``. Work ``O(Lq Lkv D / S)``."""
    qs = _stride_groups(q, stride, q.shape[2], reverse=False)
    ks = _stride_groups(k, stride, k.shape[2], reverse=True)
    return _gqa_matmul(qs, ks)


def xattn_block_scores(q: Tensor, k: Tensor, block_size: int = 128, stride: int = 8) -> Tensor:
    """Raw block scores: per (query block, key block), the sum of Q·Kᵀ over the strided
    antidiagonals inside it (every ``stride``-th antidiagonal), no mask, no scaling.
    ``block_size`` must be a multiple of ``stride``. Returns float32 ``(B, Hq, Nq, Nk)``."""
    if block_size % stride:
        raise ValueError(f"block_size {block_size} must be a multiple of stride {stride}")
    a = _antidiagonal_logits(q, k, stride)
    g = block_size // stride
    nq, nk = _num_blocks(q.shape[2], block_size), _num_blocks(k.shape[2], block_size)
    a = F.pad(a, (0, nk * g - a.shape[-1], 0, nq * g - a.shape[-2]))
    b, h = a.shape[:2]
    return a.view(b, h, nq, g, nk, g).sum((3, 5))


def _mean_sub_row_softmax(qs, ks, scale, visible, gq, gk, nq, nk, rows_per_chunk):
    """Block probabilities ``(B, Hq, Nq, Nk)`` from sub-row / sub-column vectors.

    ``qs``: ``(B, Hq, Rq, E)``, ``gq`` sub-rows per query block; ``ks``: ``(B, Hkv, Rk, E)``,
    ``gk`` sub-columns per key block. Each sub-row gets a softmax of ``scale * qs·ksᵀ`` over
    the sub-columns where ``visible(rows, cols)`` (bool ``(R, Rk)``) holds; the probabilities
    are summed per key block and averaged over the query block's real sub-rows. Chunked over
    ``rows_per_chunk`` query blocks.
    """
    b, hq, rq = qs.shape[:3]
    rk = ks.shape[2]
    cols = torch.arange(rk, device=qs.device)
    out = torch.empty(b, hq, nq, nk, dtype=torch.float32, device=qs.device)
    for start in range(0, nq, rows_per_chunk):
        stop = min(nq, start + rows_per_chunk)
        r0, r1 = start * gq, min(rq, stop * gq)
        logits = _gqa_matmul(qs[:, :, r0:r1], ks) * scale
        rows = torch.arange(r0, r1, device=qs.device)
        p = torch.softmax(logits.masked_fill(~visible(rows, cols), float("-inf")), dim=-1)
        p = F.pad(p, (0, nk * gk - rk, 0, (stop - start) * gq - (r1 - r0)))
        p = p.view(b, hq, stop - start, gq, nk, gk).sum((3, 5))
        blk = torch.arange(start, stop, device=qs.device)
        real_rows = torch.clamp((blk + 1) * gq, max=rq) - blk * gq  # sub-rows per query block
        out[:, :, start:stop] = p / real_rows.to(torch.float32)[:, None]
    return out


def xattn_block_probs(
    q: Tensor,
    k: Tensor,
    block_size: int = 128,
    stride: int = 8,
    *,
    scale: Optional[float] = None,
    rows_per_chunk: int = 64,
) -> Tensor:
    """XAttention-style block probabilities, float32 ``(B, Hq, Nq, Nk)``, rows summing to 1.

    Each stride row ``r`` (a group of ``S`` query tokens) gets a causal softmax over the stride
    columns of its antidiagonal logits scaled by ``scale / S`` (``scale = 1/sqrt(D)``; dividing
    by ``S`` makes the antidiagonal sum an average of ``S`` dot products). The probabilities are
    summed over each block's stride columns and averaged over the query block's stride rows: the
    block softmax of a query block over its key blocks. Causal at stride level with bottom-right
    alignment: stride column ``c`` is visible to row ``r`` when its first key is not after the
    row's first query (``cS <= rS + Lkv - Lq``). Chunked over query blocks.
    """
    if block_size % stride:
        raise ValueError(f"block_size {block_size} must be a multiple of stride {stride}")
    b, hq, q_len, d = q.shape
    kv_len = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    g = block_size // stride
    nq, nk = _num_blocks(q_len, block_size), _num_blocks(kv_len, block_size)
    qs = _stride_groups(q, stride, q_len, reverse=False)  # (B, Hq, Rq, S*D)
    ks = _stride_groups(k, stride, kv_len, reverse=True)  # (B, Hkv, Rk, S*D)
    offset = kv_len - q_len

    def visible(rows, cols):
        return cols[None, :] * stride <= rows[:, None] * stride + offset

    return _mean_sub_row_softmax(qs, ks, scale / stride, visible, g, g, nq, nk, rows_per_chunk)


def xattn_table(
    q: Tensor,
    k: Tensor,
    threshold: float = 0.9,
    block_size: int = 128,
    stride: int = 8,
    *,
    scale: Optional[float] = None,
    local_blocks: int = 0,
) -> Tensor:
    """XAttention-style selection: per query block, the top-p (``threshold``, Prism's rule:
    keep while the mass ranked before is below it) of :func:`xattn_block_probs`, plus sink and
    diagonal, causal; ``local_blocks`` > 0 also keeps that many key blocks right before each
    row's diagonal (``PrismConfig.local_blocks``, to compare the peer with the same forced
    blocks). Bool ``(B, Hq, Nq, Nk)``."""
    probs = xattn_block_probs(q, k, block_size, stride, scale=scale)
    allowed, _ = geometry(q.shape[2], k.shape[2], block_size, q.device)
    probs = probs.masked_fill(~allowed, 0.0)
    selected = top_p_select(probs, threshold)
    if local_blocks:
        selected = selected | local_table(
            q.shape[2], k.shape[2], block_size, local_blocks, q.device
        )
    return finalize(selected, q.shape[2], k.shape[2], block_size)


def local_table(q_len: int, kv_len: int, bs: int, local_blocks: int, device) -> Tensor:
    """Bool ``(Nq, Nk)``: the blocks ``PrismConfig.local_blocks`` forces, for all query
    blocks (:func:`prism_flex.scoring.local_blocks_table`)."""
    rows = torch.arange(_num_blocks(q_len, bs), device=device)
    return local_blocks_table(rows, _num_blocks(kv_len, bs), q_len, kv_len, bs, local_blocks)


# ---------------------------------------------------------------------------------------------
# FlashPrefill-style max-relative selection (arXiv 2603.06199), from the method's facts only


def flashprefill_block_probs(
    q: Tensor, k: Tensor, block_size: int = 128, *, scale: Optional[float] = None
) -> Tensor:
    """Block scores of the FlashPrefill-style estimator, float32 ``(B, Hq, Nq, Nk)``.

    The plainest block score (the paper's exact score could not be checked here; our choice,
    recorded in docs/accuracy.md): the mean-pooled query block against the mean-pooled key
    block, ``scale * q̄ · k̄`` (``scale = 1/sqrt(D)``), softmax over the causally visible key
    blocks of the row (bottom-right alignment). The cut only compares a block with its row's
    maximum, so the softmax's normaliser cancels: only the scale (the temperature) matters.
    Visible blocks only; invisible ones are 0."""
    b, hq, q_len, d = q.shape
    kv_len = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qp, kp = pool_blocks(q, block_size), pool_blocks(k, block_size)
    logits = _gqa_matmul(qp, kp) * scale
    allowed, _ = geometry(q_len, kv_len, block_size, q.device)
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)


def flashprefill_table(
    q: Tensor,
    k: Tensor,
    alpha: float = 0.05,
    block_size: int = 128,
    *,
    scale: Optional[float] = None,
    sink_blocks: int = 2,
    local_blocks: int = 4,
    dense_last: int = 2,
) -> Tensor:
    """FlashPrefill-style selection, bool ``(B, Hq, Nq, Nk)``: per query block, the key
    blocks whose score (:func:`flashprefill_block_probs`) is at least ``alpha`` times the
    row's maximum (no sort, no cumulative sum), plus the first ``sink_blocks`` key blocks, a
    local window of ``local_blocks`` key blocks ending at the causal diagonal (the diagonal
    block and the ``local_blocks - 1`` before it), and every visible block for the last
    ``dense_last`` query blocks; causal, sink and diagonal forced as for every estimator."""
    q_len, kv_len = q.shape[2], k.shape[2]
    probs = flashprefill_block_probs(q, k, block_size, scale=scale)
    selected = relative_select(probs, alpha)
    allowed, _ = geometry(q_len, kv_len, block_size, q.device)
    forced = torch.zeros_like(allowed)
    forced[:, :sink_blocks] = True
    if local_blocks > 1:
        forced |= local_table(q_len, kv_len, block_size, local_blocks - 1, q.device)
    if dense_last:
        forced[-dense_last:] = True
    return finalize(selected | forced, q_len, kv_len, block_size)


# ---------------------------------------------------------------------------------------------
# Sub-block pooling: the mean of per-sub-row softmaxes instead of the softmax of a block mean


def subpool_block_probs(
    q: Tensor,
    k: Tensor,
    block_size: int = 128,
    q_sub: int = 32,
    k_sub: int = 128,
    *,
    scale: Optional[float] = None,
    rows_per_chunk: int = 64,
) -> Tensor:
    """Block probabilities from queries mean-pooled over ``q_sub`` tokens and keys over
    ``k_sub`` tokens (both dividing ``block_size``), all head dims, ``scale = 1/sqrt(D)``.

    Each query sub-block gets a causal softmax over the key sub-blocks (a key sub-block is
    visible when its first token is not after the sub-block's last query position, bottom-right
    aligned); the probabilities are summed per key block and averaged over the query block's
    sub-blocks. With ``q_sub = k_sub = block_size`` this is plain mean pooling; smaller query
    sub-blocks average softmaxes the way the XAttention-style estimator does with its stride
    rows, at ``block_size / q_sub`` times the block-level cost. Float32 ``(B, Hq, Nq, Nk)``.
    """
    if block_size % q_sub or block_size % k_sub:
        raise ValueError(f"q_sub {q_sub} and k_sub {k_sub} must divide block_size {block_size}")
    b, hq, q_len, d = q.shape
    kv_len = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qp = pool_blocks(q, q_sub)  # (B, Hq, Rq, D) float32
    kp = pool_blocks(k, k_sub)  # (B, Hkv, Rk, D)
    gq, gk = block_size // q_sub, block_size // k_sub
    nq, nk = _num_blocks(q_len, block_size), _num_blocks(kv_len, block_size)
    offset = kv_len - q_len

    def visible(rows, cols):
        last_query = torch.clamp((rows + 1) * q_sub, max=q_len) - 1 + offset
        return cols[None, :] * k_sub <= last_query[:, None]

    return _mean_sub_row_softmax(qp, kp, scale, visible, gq, gk, nq, nk, rows_per_chunk)


def subpool_table(
    q: Tensor,
    k: Tensor,
    threshold: float = 0.9,
    block_size: int = 128,
    q_sub: int = 32,
    k_sub: int = 128,
    *,
    scale: Optional[float] = None,
) -> Tensor:
    """Top-p of :func:`subpool_block_probs` plus sink and diagonal, causal (as
    :func:`xattn_table`). Bool ``(B, Hq, Nq, Nk)``."""
    probs = subpool_block_probs(q, k, block_size, q_sub, k_sub, scale=scale)
    allowed, _ = geometry(q.shape[2], k.shape[2], block_size, q.device)
    selected = top_p_select(probs.masked_fill(~allowed, 0.0), threshold)
    return finalize(selected, q.shape[2], k.shape[2], block_size)


def _block_moments(x: Tensor, bs: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per block of ``bs`` tokens (the tail over its real tokens): mean and per-dim variance,
    float32 ``(B, H, N, D)`` each, and the token count ``(N,)``."""
    length = x.shape[2]
    n = _num_blocks(length, bs)
    x = F.pad(x.float(), (0, 0, 0, n * bs - length))
    b, h, _, d = x.shape
    x = x.view(b, h, n, bs, d)
    count = torch.clamp(length - torch.arange(n, device=x.device) * bs, max=bs).float()
    mean = x.sum(3) / count[:, None]
    second = (x * x).sum(3) / count[:, None]
    return mean, (second - mean * mean).clamp_min(0.0), count


def meanvar_block_probs(
    q: Tensor, k: Tensor, block_size: int = 128, *, scale: Optional[float] = None
) -> Tensor:
    """Block softmax of a second-order estimate of each block pair's log attention mass.

    Mean pooling scores a block pair by ``s q̄·k̄`` (``s`` the softmax scale), the log of the
    mass only if every token's dot product equalled the mean; the mass is a sum of
    exponentials, which grows with the spread of the dot products inside the pair. Treating
    the tokens of a block as independent with the block's mean and per-dim variance (``v``)
    gives ``log Σ exp(s q·k) ≈ s q̄·k̄ + log n_k
    + (s²/2) Σ_d (q̄_d² v_k,d + k̄_d² v_q,d + v_q,d v_k,d)`` (the log-normal approximation;
    ``n_k`` the key block's token count), still one
    block-level matmul (over 4D features). No band split, no calibration: the estimate is of
    the true mass at the true scale. Returns float32 ``(B, Hq, Nq, Nk)``, causal, rows sum to 1.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qm, qv, _ = _block_moments(q, block_size)
    km, kv, count = _block_moments(k, block_size)
    half = 0.5 * scale
    qf = torch.cat([qm, half * qm * qm, half * qv, half * qv], -1)
    kf = torch.cat([km, kv, km * km, kv], -1)
    logits = _gqa_matmul(qf, kf) * scale + count.log()
    allowed, _ = geometry(q.shape[2], k.shape[2], block_size, q.device)
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)


def meanvar_table(
    q: Tensor,
    k: Tensor,
    threshold: float = 0.9,
    block_size: int = 128,
    *,
    scale: Optional[float] = None,
) -> Tensor:
    """Top-p of :func:`meanvar_block_probs` plus sink and diagonal, causal (as
    :func:`xattn_table`). Bool ``(B, Hq, Nq, Nk)``."""
    probs = meanvar_block_probs(q, k, block_size, scale=scale)
    selected = top_p_select(probs, threshold)
    return finalize(selected, q.shape[2], k.shape[2], block_size)


def _sampled_row_mass(q: Tensor, k: Tensor, rows: Tensor, bs: int, scale: float) -> Tensor:
    """Exact block distribution of query blocks ``rows``: token-level causal softmax, summed
    per key block, averaged over the block's queries. float32 ``(B, Hq, R, Nk)``."""
    q_len, kv_len = q.shape[2], k.shape[2]
    nk = _num_blocks(kv_len, bs)
    keys = torch.arange(kv_len, device=q.device)
    out = []
    for r in rows.tolist():
        t0, t1 = r * bs, min(q_len, (r + 1) * bs)
        logits = _gqa_matmul(q[:, :, t0:t1].float(), k.float()) * scale
        qpos = torch.arange(t0, t1, device=q.device) + kv_len - q_len
        p = torch.softmax(logits.masked_fill(keys[None, :] > qpos[:, None], float("-inf")), -1)
        p = F.pad(p, (0, nk * bs - kv_len)).unflatten(-1, (nk, bs)).sum(-1)
        out.append(p.mean(2))
    return torch.stack(out, 2)


def tcal_block_probs(
    q: Tensor,
    k: Tensor,
    threshold: float,
    block_size: int = 128,
    *,
    scale: Optional[float] = None,
    sample_rows: int = 4,
) -> Tensor:
    """Block-mean logits at a per-head temperature fitted so that top-p keeps the true mass.

    Mean pooling ranks key blocks nearly as well as the true mass does (``eval.gap``: the
    oracle ranking at the same per-row block counts lowers the output error by 1-3 %); what
    it gets wrong is how *many* blocks a row needs, because the softmax of block means is
    sharper or flatter than the true block distribution, by a head-dependent amount. Here the
    logits ``s q̄·k̄`` (all dims, true scale ``s``) are divided by a temperature ``τ`` per
    (batch, head), the smallest of a log-spaced grid (0.25-8) for which the top-p selection
    (with sink and diagonal) of ``sample_rows`` evenly spaced query blocks (from Nq/4 to the
    last) keeps on average at least ``threshold`` of their exact attention mass. Cost: the
    exact attention of those query blocks (``sample_rows x block_size`` queries against all
    keys per head) on top of the block-level scoring. Returns float32 ``(B, Hq, Nq, Nk)``.
    """
    bs = block_size
    q_len, kv_len = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    nq = _num_blocks(q_len, bs)
    logits = _gqa_matmul(pool_blocks(q, bs), pool_blocks(k, bs)) * scale
    allowed, forced = forced_blocks(q_len, kv_len, bs, q.device)
    rows = torch.linspace(nq // 4, nq - 1, sample_rows).round().long().unique()
    true = _sampled_row_mass(q, k, rows, bs, scale)  # (B, H, R, Nk)
    grid = torch.exp(torch.linspace(math.log(0.25), math.log(8.0), 49, device=q.device))
    est = logits[:, :, rows].masked_fill(~allowed[rows], float("-inf"))
    p = torch.softmax(est[:, :, :, None, :] / grid[:, None], -1)  # (B, H, R, T, Nk)
    sel = top_p_select(p, threshold) | forced[rows][:, None, :]
    kept = (true[:, :, :, None, :] * sel).sum(-1).mean(2)  # (B, H, T)
    ok = kept >= threshold
    # the smallest temperature that reaches the threshold (the largest if none does)
    first = torch.where(ok.any(-1), ok.int().argmax(-1), len(grid) - 1)
    tau = grid[first]  # (B, H)
    return torch.softmax((logits / tau[..., None, None]).masked_fill(~allowed, float("-inf")), -1)


def tcal_table(
    q: Tensor,
    k: Tensor,
    threshold: float = 0.9,
    block_size: int = 128,
    *,
    scale: Optional[float] = None,
) -> Tensor:
    """Top-p of :func:`tcal_block_probs` plus sink and diagonal, causal. Bool
    ``(B, Hq, Nq, Nk)``."""
    probs = tcal_block_probs(q, k, threshold, block_size, scale=scale)
    return finalize(top_p_select(probs, threshold), q.shape[2], k.shape[2], block_size)


def _prism_band_fit_inputs(q: Tensor, k: Tensor, bs: int, sample_rows: int):
    """What the per-head budget fits share: Prism's two band probabilities (paper method,
    calibrated), ``[(B, Hq, Nq, Nk)] * 2``; the forced blocks (sink, diagonal), bool
    ``(Nq, Nk)``; and ``sample_rows`` evenly spaced query blocks from Nq/4 to the last."""
    from prism_flex.attention import score_inputs
    from prism_flex.scoring import band_logits, block_softmax

    q_len, kv_len = q.shape[2], k.shape[2]
    sc = score_inputs(q, k, PrismConfig(block_size=bs, dense_final_blocks=0, final_block_pool=0))
    allowed, forced = forced_blocks(q_len, kv_len, bs, q.device)
    probs = [
        block_softmax(band_logits(sc.q_high, sc.k_high, sc.div_high), allowed),
        block_softmax(band_logits(sc.q_low, sc.k_low, sc.div_low), allowed),
    ]
    nq = _num_blocks(q_len, bs)
    rows = torch.linspace(nq // 4, nq - 1, sample_rows).round().long().unique()
    return probs, forced, rows


def _select_at_head_thresholds(probs, ok: Tensor, grid: Tensor, q_len, kv_len, bs) -> Tensor:
    """Both bands' top-p at, per (batch, head), the first grid threshold where ``ok``
    ``(B, H, T)`` holds (the last one if none), with sink and diagonal."""
    thr = grid[torch.where(ok.any(-1), ok.int().argmax(-1), len(grid) - 1)][..., None, None]
    return finalize(top_p_select(probs[0], thr) | top_p_select(probs[1], thr), q_len, kv_len, bs)


def pcal_table(
    q: Tensor,
    k: Tensor,
    threshold: float = 0.9,
    block_size: int = 128,
    *,
    scale: Optional[float] = None,
    sample_rows: int = 4,
) -> Tensor:
    """Prism's own two-band selection with a per-head threshold fitted to the true mass.

    The band probabilities are Prism's (paper method, calibrated); the top-p threshold of
    each (batch, head), the same in both bands, is the smallest on a grid (0.5-0.999) for
    which the selection of ``sample_rows`` evenly spaced query blocks (from Nq/4 to the last,
    with sink and diagonal) keeps on average at least ``threshold`` of their exact attention
    mass. The budget fit of :func:`tcal_block_probs` without changing the distributions'
    shapes. Bool ``(B, Hq, Nq, Nk)``.
    """
    bs = block_size
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    probs, forced, rows = _prism_band_fit_inputs(q, k, bs, sample_rows)
    true = _sampled_row_mass(q, k, rows, bs, scale)  # (B, H, R, Nk)
    grid = 1.0 - torch.logspace(math.log10(0.5), math.log10(0.001), 40, device=q.device)
    t = grid[:, None]  # (T, 1): broadcast against (B, H, R, T, Nk) rows
    sel = forced[rows][:, None, :].clone()
    for p in probs:
        sel = sel | top_p_select(p[:, :, rows, None, :].expand(-1, -1, -1, len(grid), -1), t)
    kept = (true[:, :, :, None, :] * sel).sum(-1).mean(2)  # (B, H, T)
    return _select_at_head_thresholds(probs, kept >= threshold, grid, q.shape[2], k.shape[2], bs)


def _sampled_row_partials(q, k, v, rows, bs, scale):
    """Per sampled query block ``r`` and key block ``J``: ``S[i, J] = Σ_j exp(l_ij - m_i)`` and
    ``W[i, J] = Σ_j exp(l_ij - m_i) v_j`` over the causally visible keys ``j`` of ``J`` (token
    level, ``m_i`` the row max), so that attention restricted to any set of key blocks is
    ``Σ_J∈set W / Σ_J∈set S``. Returns ``S (B, Hq, n, Nk)``, ``W (B, Hq, n, Nk, D)`` with ``n``
    the sampled queries (``len(rows) x bs`` at most), float32."""
    q_len, kv_len = q.shape[2], k.shape[2]
    nk = _num_blocks(kv_len, bs)
    groups = q.shape[1] // k.shape[1]
    vb = F.pad(v.float().repeat_interleave(groups, 1), (0, 0, 0, nk * bs - kv_len))
    vb = vb.unflatten(2, (nk, bs))  # (B, Hq, Nk, bs, D)
    keys = torch.arange(kv_len, device=q.device)
    s_all, w_all = [], []
    for r in rows.tolist():
        t0, t1 = r * bs, min(q_len, (r + 1) * bs)
        logits = _gqa_matmul(q[:, :, t0:t1].float(), k.float()) * scale
        qpos = torch.arange(t0, t1, device=q.device) + kv_len - q_len
        logits = logits.masked_fill(keys[None, :] > qpos[:, None], float("-inf"))
        e = torch.exp(logits - logits.amax(-1, keepdim=True))
        e = F.pad(e, (0, nk * bs - kv_len)).unflatten(-1, (nk, bs))  # (B, H, n, Nk, bs)
        s_all.append(e.sum(-1))
        w_all.append(torch.einsum("bhnkt,bhktd->bhnkd", e, vb))
    return torch.cat(s_all, 2), torch.cat(w_all, 2)


def ecal_table(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    threshold: float = 0.9,
    block_size: int = 128,
    *,
    scale: Optional[float] = None,
    sample_rows: int = 4,
) -> Tensor:
    """Prism's two-band selection with a per-head threshold fitted to the attention output.

    As :func:`pcal_table`, but the per-head top-p threshold (the same in both bands) is the
    smallest on a grid (0.5-0.999) for which the sampled query blocks' attention output over
    the selected blocks is within a relative error ``1 - threshold`` of the exact output
    (the knob keeps the name and range of a threshold: 0.9 allows 10 % error). V-aware: a
    head whose dropped blocks carry values close to the output can stop early. Bool
    ``(B, Hq, Nq, Nk)``.
    """
    bs = block_size
    q_len = q.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    probs, forced, rows = _prism_band_fit_inputs(q, k, bs, sample_rows)
    s_part, w_part = _sampled_row_partials(q, k, v, rows, bs, scale)
    exact = w_part.sum(3) / s_part.sum(3)[..., None]  # (B, H, n, D)
    # each sampled query token's block row
    tokens = torch.cat(
        [torch.full((min(q_len, (r + 1) * bs) - r * bs,), i) for i, r in enumerate(rows.tolist())]
    )
    grid = torch.tensor([0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999])
    errs = []
    for t in grid.tolist():
        sel = forced[rows].clone()
        for p in probs:
            sel = sel | top_p_select(p[:, :, rows], t)  # (B, H, R, Nk)
        m = sel[:, :, tokens].float()  # (B, H, n, Nk)
        out = (w_part * m[..., None]).sum(3) / (s_part * m).sum(3)[..., None]
        errs.append((out - exact).flatten(2).norm(dim=-1) / exact.flatten(2).norm(dim=-1))
    ok = torch.stack(errs, -1) <= 1.0 - threshold  # (B, H, T)
    return _select_at_head_thresholds(probs, ok, grid, q_len, k.shape[2], bs)


# ---------------------------------------------------------------------------------------------
# The true attention mass, the oracle and recall


@torch.no_grad()
def block_mass(
    q: Tensor,
    k: Tensor,
    block_size: int = 128,
    *,
    scale: Optional[float] = None,
    rows_per_chunk: int = 4,
) -> Tensor:
    """True attention mass per block: token-level causal softmax (bottom-right, over all keys,
    float32), summed over the query tokens and key tokens of each block pair.

    Returns float32 ``(B, Hq, Nq, Nk)``; each block row sums to its number of query tokens.
    Computed ``rows_per_chunk`` query blocks at a time (memory ``O(chunk * bs * Lkv)`` per head).
    """
    b, hq, q_len, d = q.shape
    kv_len = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    nq, nk = _num_blocks(q_len, block_size), _num_blocks(kv_len, block_size)
    offset = kv_len - q_len
    kf = k.float()
    keys = torch.arange(kv_len, device=q.device)
    out = torch.empty(b, hq, nq, nk, dtype=torch.float32, device=q.device)
    for start in range(0, nq, rows_per_chunk):
        stop = min(nq, start + rows_per_chunk)
        t0, t1 = start * block_size, min(q_len, stop * block_size)
        logits = _gqa_matmul(q[:, :, t0:t1].float(), kf) * scale
        qpos = torch.arange(t0, t1, device=q.device) + offset
        p = torch.softmax(logits.masked_fill(keys[None, :] > qpos[:, None], float("-inf")), -1)
        p = F.pad(p, (0, nk * block_size - kv_len, 0, (stop - start) * block_size - (t1 - t0)))
        out[:, :, start:stop] = p.view(b, hq, stop - start, block_size, nk, block_size).sum((3, 5))
    return out


def oracle_table(mass: Tensor, reference: Tensor, q_len: int, kv_len: int, bs: int) -> Tensor:
    """The best block table per head at the block count of ``reference``.

    Per (batch, head): the sink and diagonal are kept, then the remaining causally visible
    blocks with the largest true mass (``mass`` from :func:`block_mass`, summed over query
    tokens, so the choice maximises the recall) are added, chosen globally over all rows of the
    head, until the table has as many blocks as ``reference`` has there. Bool ``(B, H, Nq, Nk)``.
    """
    allowed, forced = forced_blocks(q_len, kv_len, bs, mass.device)
    counts = (reference.bool() & allowed).sum((-2, -1))  # (B, H)
    score = mass.masked_fill(~allowed, float("-inf")).masked_fill(forced, float("inf"))
    flat = score.flatten(-2)
    order = torch.sort(flat, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(flat.shape[-1], device=mass.device).expand_as(order)
    )
    counts = torch.maximum(counts, forced.sum().expand_as(counts))
    keep = rank < counts[..., None]
    return keep.view_as(mass) & allowed


def recall_from_mass(mass: Tensor, table: Tensor, q_len: int) -> Tensor:
    """Share of the true attention mass inside ``table``, averaged over query tokens:
    float32 ``(B, H)``."""
    return (mass * table.bool()).sum((-2, -1)) / q_len


def recall(
    q: Tensor, k: Tensor, table: Tensor, block_size: int = 128, *, scale: Optional[float] = None
) -> float:
    """Share of the true attention mass (token-level causal softmax over all keys) that falls
    in the selected blocks, averaged over query tokens, heads and batch."""
    mass = block_mass(q, k, block_size, scale=scale)
    return float(recall_from_mass(mass, table, q.shape[2]).mean())


# ---------------------------------------------------------------------------------------------
# XAttention-style selection as a transformers attention implementation (for perplexity)


def make_table_attention_function(
    table_fn: Callable[[Tensor, Tensor, Optional[float]], Tensor],
    block_size: int = 128,
    *,
    dense_below: int = 1024,
    compiled: bool = True,
):
    """An ``AttentionInterface`` function: the block table ``table_fn(q, k, scale)`` as a
    ``BlockMask`` + ``prism_flex.sparse_attention`` (short queries dense, like Prism). Plain
    causal, unpadded inputs only."""
    from prism_flex import dense_causal_attention

    @torch.no_grad()
    def table_attention_forward(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0,
        scaling=None,
        is_causal=None,
        **kwargs,
    ):
        if attention_mask is not None:
            raise NotImplementedError("table estimators: only the plain causal mask (no padding)")
        q, k, v = query.detach(), key.detach(), value.detach()
        if q.shape[2] < dense_below:
            out = dense_causal_attention(q, k, v, scale=scaling)
        else:
            table = (
                table_fn(q, k, scaling, v)
                if getattr(table_fn, "needs_v", False)
                else table_fn(q, k, scaling)
            )
            mask = table_to_block_mask(table, q.shape[2], k.shape[2], block_size)
            out = sparse_attention(q, k, v, mask, scale=scaling, compiled=compiled)
        return out.transpose(1, 2).contiguous(), None

    return table_attention_forward


def make_xattn_attention_function(
    threshold: float,
    block_size: int = 128,
    stride: int = 8,
    *,
    dense_below: int = 1024,
    compiled: bool = True,
    local_blocks: int = 0,
):
    """The XAttention-style estimator as an ``AttentionInterface`` function."""
    return make_table_attention_function(
        lambda q, k, scale: xattn_table(
            q, k, threshold, block_size, stride, scale=scale, local_blocks=local_blocks
        ),
        block_size,
        dense_below=dense_below,
        compiled=compiled,
    )


def register_table_method(name: str, attention_function) -> str:
    """Register an attention function made by :func:`make_table_attention_function`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from prism_flex.integrations.transformers import prism_mask

    AttentionInterface.register(name, attention_function)
    AttentionMaskInterface.register(name, prism_mask)
    return name


def register_xattn(threshold: float, name: str, *, compiled: bool = True, **kwargs) -> str:
    """Register the XAttention-style estimator with transformers under ``name``."""
    return register_table_method(
        name, make_xattn_attention_function(threshold, compiled=compiled, **kwargs)
    )
