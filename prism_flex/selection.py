"""Block selection: block softmax and the cut per band (top-p, or with
``PrismConfig.relative_cut`` a sort-free cut relative to the row's maximum), union of the
bands and the forced blocks (sink, diagonal, local, the last block's finer row)."""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from .scoring import (
    BandScores,
    band_logits,
    block_softmax,
    final_block_probs,
    local_blocks_table,
    rows_block_geometry,
)

__all__ = [
    "Thresholds",
    "Selection",
    "select_rows",
    "top_p_select",
    "relative_select",
    "combine_selection",
]


class Thresholds(NamedTuple):
    """The top-p thresholds of one call: the bands' (floats, or float32 tensors broadcastable
    to ``(B, Hq, R, 1)`` when fitted per head) and that of ``final_block_pool``'s row."""

    high: Union[float, Tensor]
    low: Union[float, Tensor]
    fine: float

    @classmethod
    def of(cls, config) -> "Thresholds":
        """A config's thresholds. The fine row takes the larger band threshold (also with
        ``output_error``: the fitted thresholds are the bands', that row keeps its own)."""
        high, low = float(config.high_threshold), float(config.low_threshold)
        return cls(high, low, max(high, low))


class Selection(NamedTuple):
    """Selected key blocks of some query blocks: bool ``selected`` ``(B, Hq, R, Nk)``; the
    causally visible blocks ``allowed`` and the diagonal ``diagonal``, bool ``(R, Nk)``."""

    selected: Tensor
    allowed: Tensor
    diagonal: Tensor


def select_rows(
    config, scores: BandScores, rows: Tensor, q_len, kv_len, high_thr, low_thr, fine_thr
) -> Selection:
    """The selection of query blocks ``rows`` (int64 ``(R,)``, any order and repeats: the
    threshold fit scores a few rows at several thresholds at once).

    The thresholds (see :class:`Thresholds`) come as separate arguments, not as config
    attributes: compiled, they are then inputs, not constants (no recompile per value).
    """
    q_high = scores.q_high.index_select(2, rows)
    q_low = scores.q_low.index_select(2, rows)
    nk = scores.k_high.shape[2]
    bs = config.block_size
    allowed, diagonal = rows_block_geometry(rows, nk, q_len, kv_len, bs)
    high_p = block_softmax(band_logits(q_high, scores.k_high, scores.div_high), allowed)
    low_p = block_softmax(band_logits(q_low, scores.k_low, scores.div_low), allowed)
    # The config is a constant of a compiled stage: one branch is traced, the other not.
    relative = config.relative_cut
    if relative is None:
        high, low = top_p_select(high_p, high_thr), top_p_select(low_p, low_thr)
    else:
        high, low = relative_select(high_p, relative), relative_select(low_p, relative)
    nq = (q_len + bs - 1) // bs
    dense_rows = extra = None
    if config.dense_final_blocks:
        dense_rows = rows >= nq - config.dense_final_blocks
    if config.local_blocks:
        extra = local_blocks_table(rows, nk, q_len, kv_len, bs, config.local_blocks)
    if config.final_block_pool:
        probs = final_block_probs(
            scores.q_final, scores.k_fine, q_len, kv_len, bs, config.final_block_pool
        )
        fine = top_p_select(probs, fine_thr)
        fine = fine & (rows == nq - 1)[:, None]  # (B, Hq, R, Nk): only the last query block
        extra = fine if extra is None else fine | extra
    selected = combine_selection(
        high,
        low,
        allowed,
        diagonal,
        config.force_sink,
        config.force_diagonal,
        dense_rows,
        extra,
    )
    return Selection(selected, allowed, diagonal)


def top_p_select(probs: Tensor, threshold: float) -> Tensor:
    """The most probable blocks of each row whose mass reaches ``threshold`` (top-p).

    Rule: block ``j`` is kept when the mass of the blocks *strictly* more probable than it is
    below the threshold. For distinct probabilities this is the usual "sort descending, keep
    while the mass before is below the threshold" (the block that crosses the threshold is
    kept, every row keeps at least one block); blocks tied at the cut are all kept, so the
    result does not depend on the order of the columns. ``threshold >= 1`` keeps every block
    (callers intersect with the causal table): threshold 1.0 is exactly dense whatever the
    float32 rounding.

    One segmented sort of the values; the kept blocks are then those at least as probable as
    the least probable kept one, so nothing is scattered back to key order. (A sort-free
    bisection over the float32 bit patterns, 30 masked row sums fused by inductor, was
    measured slower on the H200 at 128K tokens: bench/NOTES.md.)

    Args:
        probs: ``(..., Nk)`` float32, non-negative, rows summing to ~1.
        threshold: in ``(0, 1]``.
    Returns:
        bool ``(..., Nk)``.
    """
    sorted_p = torch.sort(probs, dim=-1, descending=True).values
    mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    # The first block of a tie group has exactly the mass strictly above it before it, so
    # "at least as probable as the least probable kept block" is the rule, ties included.
    inf = sorted_p.new_full((), float("inf"))
    cut = torch.where(mass_before < threshold, sorted_p, inf).amin(dim=-1, keepdim=True)
    # Branch-free so that a compiled caller does not specialise on the threshold's value.
    return (probs >= cut) | (threshold >= 1.0)


def relative_select(probs: Tensor, alpha: float) -> Tensor:
    """The blocks of each row at least ``alpha`` times as probable as the row's most probable
    block (``PrismConfig.relative_cut``): no sort, one row maximum.

    ``alpha = 0`` keeps every block (callers intersect with the causal table), ``alpha = 1``
    the row's maximum and the blocks tied with it. A larger ``alpha`` keeps a subset.

    Args:
        probs: ``(..., Nk)`` float32, non-negative (invisible blocks 0).
        alpha: in ``[0, 1]``.
    Returns:
        bool ``(..., Nk)``.
    """
    return probs >= alpha * probs.amax(dim=-1, keepdim=True)


def combine_selection(
    high: Tensor,
    low: Tensor,
    allowed: Tensor,
    diagonal: Tensor,
    force_sink: bool,
    force_diagonal: bool,
    dense_rows: Optional[Tensor] = None,
    extra: Optional[Tensor] = None,
) -> Tensor:
    """Final block table: high ∪ low ∪ sink ∪ diagonal ∪ dense rows ∪ extra, restricted to
    causally visible blocks.

    Args:
        high, low: bool ``(B, H, R, Nk)`` band selections; allowed, diagonal: bool ``(R, Nk)``;
        dense_rows: optional bool ``(R,)``, rows that keep every visible block;
        extra: optional bool, broadcastable to ``(B, H, R, Nk)``, more selected blocks.
    Returns:
        bool ``(B, H, R, Nk)``.
    """
    selected = high | low
    if extra is not None:
        selected = selected | extra
    if force_sink:
        # Key block 0 is visible to every query block: the sink is always a legal choice.
        sink = torch.zeros_like(allowed)
        sink[:, 0] = True
        selected = selected | sink
    if force_diagonal:
        selected = selected | diagonal
    if dense_rows is not None:
        selected = selected | dense_rows.unsqueeze(-1)
    return selected & allowed
