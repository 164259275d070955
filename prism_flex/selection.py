"""Block selection: top-p per band, union of the bands and the forced blocks."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["top_p_select", "combine_selection"]


def top_p_select(probs: Tensor, threshold: float) -> Tensor:
    """Smallest prefix of each row's blocks, by descending probability, reaching ``threshold``.

    A block is kept while the probability mass ranked strictly before it is below the
    threshold, so the block that crosses it is kept and every row keeps at least one block.
    Ties are broken deterministically: among equal probabilities the lower key-block index
    ranks first (stable sort). ``threshold >= 1`` keeps every block (callers intersect with
    the causal table), so threshold 1.0 is exactly dense whatever the float32 rounding of the
    running sum.

    Args:
        probs: ``(..., Nk)`` float32, rows summing to 1.
    Returns:
        bool ``(..., Nk)``.
    """
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    # Branch-free so that a compiled caller does not specialise on the threshold's value.
    keep_sorted = (mass_before < threshold) | (threshold >= 1.0)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def combine_selection(
    high: Tensor,
    low: Tensor,
    allowed: Tensor,
    diagonal: Tensor,
    force_sink: bool,
    force_diagonal: bool,
) -> Tensor:
    """Final block table: high ∪ low ∪ sink ∪ diagonal, restricted to causally visible blocks.

    Args:
        high, low: bool ``(B, H, R, Nk)`` band selections; allowed, diagonal: bool ``(R, Nk)``.
    Returns:
        bool ``(B, H, R, Nk)``.
    """
    selected = high | low
    if force_sink:
        # Key block 0 is visible to every query block: the sink is always a legal choice.
        sink = torch.zeros_like(allowed)
        sink[:, 0] = True
        selected = selected | sink
    if force_diagonal:
        selected = selected | diagonal
    return selected & allowed
