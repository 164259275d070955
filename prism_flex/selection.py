"""Block selection: top-p per band, union of the bands and the forced blocks."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["top_p_select", "combine_selection"]


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
