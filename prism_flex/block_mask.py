"""From a block selection to FlexAttention's ``BlockMask``.

The diagonal key blocks of each query block become FlexAttention's *partial* blocks (the
token-level causal ``mask_mod`` runs on them); every other selected block is a *full* block
(no ``mask_mod``, the fast path). Index tables come from the boolean table by a prefix-sum
compaction, O(Nq * Nk) per head and no sort.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .scoring import BandScores, diagonal_range, score_bands
from .selection import select_rows

__all__ = [
    "BlockTables",
    "select_tables",
    "score_and_select_tables",
    "compact_blocks",
    "run_tables",
    "causal_mask_mod",
    "block_mask_from_tables",
    "with_mask_mod",
]


class BlockTables(NamedTuple):
    """FlexAttention's index tables of a selection: the partial (diagonal) blocks and the
    full blocks. Counts int32 ``(B, Hq, R)``, indices int32 ``(B, Hq, R, Nk)`` (full width,
    contiguous)."""

    partial_num: Tensor
    partial_idx: Tensor
    full_num: Tensor
    full_idx: Tensor


def select_tables(
    config, scores: BandScores, row_start, num_rows, q_len, kv_len, high_thr, low_thr, fine_thr
) -> BlockTables:
    """Selection of query blocks ``row_start .. row_start + num_rows - 1``, compacted into
    index tables (thresholds as :func:`~prism_flex.selection.select_rows` takes them)."""
    rows = torch.arange(num_rows, device=scores.q_high.device) + row_start
    selected, _, diagonal = select_rows(
        config, scores, rows, q_len, kv_len, high_thr, low_thr, fine_thr
    )
    if config.force_diagonal:
        # The partial blocks are exactly the diagonal: written from its range directly.
        first, last = diagonal_range(
            row_start, num_rows, q_len, kv_len, config.block_size, selected.device
        )
        partial = run_tables(first, last, selected.shape[-1], selected.shape[0], selected.shape[1])
    else:
        partial = compact_blocks(selected & diagonal)
    return BlockTables(*partial, *compact_blocks(selected & ~diagonal))


def score_and_select_tables(
    config,
    q_pool,
    k_pool,
    q_final,
    k_fine,
    q_len,
    kv_len,
    high_temperature,
    low_temperature,
    high_thr,
    low_thr,
    fine_thr,
) -> BlockTables:
    """Scoring and selection of every query block, in one graph when compiled: one call
    instead of two, which matters at short lengths, where host time dominates."""
    scores = score_bands(config, q_pool, k_pool, high_temperature, low_temperature, q_final, k_fine)
    return select_tables(
        config, scores, 0, q_pool.shape[2], q_len, kv_len, high_thr, low_thr, fine_thr
    )


def compact_blocks(table: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise list of the True columns of a boolean block table.

    A stable partition of each row's column indices, True columns first: one prefix sum and
    one scatter, O(Nk) per row, no sort. Every row is a permutation of ``0 .. Nk-1``, so the
    scatter writes every entry of the full-width output (no spill column to slice off and copy).

    Args:
        table: bool ``(B, H, R, Nk)``.
    Returns:
        ``(num_blocks, indices)``: int32 ``(B, H, R)`` and int32 ``(B, H, R, Nk)`` (full width,
        contiguous, as FlexAttention wants); row ``r`` lists its True columns in increasing
        order in ``indices[..., :num_blocks]``, then its False columns in increasing order
        (FlexAttention ignores entries past the count).
    """
    nk = table.shape[-1]
    true_before = torch.cumsum(table, dim=-1, dtype=torch.int32)  # inclusive
    # A reduction of its own, not true_before[..., -1]: that view would carry a storage
    # offset of Nk - 1, which dynamo guards on (and duck-sizes against other sizes) when the
    # tables reach a compiled flex_attention.
    num = table.sum(dim=-1, dtype=torch.int32)
    cols = torch.arange(nk, dtype=torch.int32, device=table.device)
    # True column j goes to (number of True columns up to j) - 1; False column j goes after
    # all True columns, at num + (number of False columns before j) = num + j - true_before.
    pos = torch.where(table, true_before - 1, num.unsqueeze(-1) + cols - true_before)
    out = torch.empty(table.shape, dtype=torch.int32, device=table.device)
    out = out.scatter(-1, pos.to(torch.int64), cols.expand(table.shape))
    return num, out


def run_tables(
    first: Tensor, last: Tensor, num_kv_blocks: int, batch: int, heads: int
) -> tuple[Tensor, Tensor]:
    """Index tables of rows that each hold one run of consecutive blocks ``first .. last``.

    What :func:`compact_blocks` returns for such a table, except past the count: the row
    lists ``first, first + 1, ...`` cyclically (still a permutation of ``0 .. Nk-1``, and
    FlexAttention ignores entries past the count). Written directly, with no prefix sum or
    scatter: Prism's diagonal (partial) blocks are such runs of one or two blocks.

    Args:
        first, last: int ``(R,)``, ``0 <= first <= last < num_kv_blocks``.
    Returns:
        ``(num_blocks, indices)``: int32 ``(B, H, R)`` and int32 ``(B, H, R, Nk)``, contiguous.
    """
    rows = first.shape[0]
    first = first.to(torch.int32)
    num = (last.to(torch.int32) - first + 1).expand(batch, heads, rows).contiguous()
    cols = torch.arange(num_kv_blocks, dtype=torch.int32, device=first.device)
    # int32 and a conditional subtraction, not an int64 modulo: integer division by a
    # runtime value made this 128 MB write take 0.5 ms on the H200 at 128K tokens.
    idx = first[:, None] + cols
    idx = torch.where(idx >= num_kv_blocks, idx - num_kv_blocks, idx)
    return num, idx.expand(batch, heads, rows, num_kv_blocks).contiguous()


def causal_mask_mod(offset):
    """Bottom-right causal ``mask_mod``: query ``q_idx`` sees keys ``kv_idx <= q_idx + offset``.

    ``offset`` is ``kv_len - q_len``: the int 0 (plain causal, nothing captured) or an int32
    tensor of shape ``(B,)``, one (equal) value per batch row, read at ``offset[b]`` (a
    Python int would be baked into the compiled kernel; a 0-dim tensor, or one read at a
    constant index, is rejected by FlexAttention's FLASH backend in torch 2.11: "Expected
    TensorSSA", bench/results/h100_flash_backend.json).
    """
    if not isinstance(offset, Tensor):
        if offset != 0:
            raise ValueError("a nonzero offset must be a (B,) tensor")
        return _causal

    def mask_mod(b, h, q_idx, kv_idx):
        return q_idx + offset[b] >= kv_idx

    return mask_mod


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def block_mask_from_tables(
    partial_num: Tensor,
    partial_idx: Tensor,
    full_num: Tensor,
    full_idx: Tensor,
    offset,
    q_len: int,
    kv_len: int,
    block_size: int,
) -> BlockMask:
    """Wrap index tables (as from :func:`compact_blocks`) into a forward-only ``BlockMask``.

    ``compute_q_blocks=False``: the transposed tables are only needed by the backward pass,
    and Prism is inference-only.
    """
    return BlockMask.from_kv_blocks(
        partial_num,
        partial_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=causal_mask_mod(offset),
        seq_lengths=(q_len, kv_len),
        compute_q_blocks=False,
    )


def with_table_mask_mod(block_mask: BlockMask) -> BlockMask:
    """The same mask, with a ``mask_mod`` that also looks up the selected blocks.

    Eager (uncompiled) ``flex_attention`` ignores the block lists and evaluates ``mask_mod``
    on every (query, key) pair; this makes it honour the block selection. Memory is the
    ``(B, H, Nq, Nk)`` block table, index arithmetic stays at block level.
    """
    table = block_mask.to_dense().bool()
    causal = block_mask.mask_mod
    q_bs, kv_bs = block_mask.BLOCK_SIZE

    def mask_mod(b, h, q_idx, kv_idx):
        return table[b, h, q_idx // q_bs, kv_idx // kv_bs] & causal(b, h, q_idx, kv_idx)

    return with_mask_mod(block_mask, mask_mod)


def with_mask_mod(block_mask: BlockMask, mask_mod) -> BlockMask:
    """The same block lists (forward-only) with another ``mask_mod``."""
    return BlockMask.from_kv_blocks(
        block_mask.kv_num_blocks,
        block_mask.kv_indices,
        block_mask.full_kv_num_blocks,
        block_mask.full_kv_indices,
        BLOCK_SIZE=block_mask.BLOCK_SIZE,
        mask_mod=mask_mod,
        seq_lengths=block_mask.seq_lengths,
        compute_q_blocks=False,
    )
