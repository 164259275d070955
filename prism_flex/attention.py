"""Public functions: Prism block mask and Prism attention.

Each entry checks its inputs (``checks.py``), decides once how to run
(:class:`~prism_flex._compile.Mode`: eager, compiled by us, or traced by a ``torch.compile`` of
the user's model) and hands over: the attention to ``dispatch.py`` (dense or sparse; traced,
one opaque custom op that runs the same compiled pipeline on real tensors), the mask to
``pipeline.py``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from . import documents, pipeline
from ._compile import Mode, uniform_dispatch_keys
from .checks import MAX_HEADS, check_config, check_inputs
from .config import PrismConfig
from .dispatch import FIT_DOCUMENTS_ERROR, attention_with_segments, takes_dense_path
from .scoring import BandScores
from .selection import Selection, Thresholds, select_rows

__all__ = [
    "check_inputs",
    "score_inputs",
    "select_blocks",
    "prism_block_mask",
    "prism_attention",
    "sparse_attention",
    "dense_causal_attention",
    "block_density",
    "takes_dense_path",
    "MAX_HEADS",
]

_DEFAULT_CONFIG = PrismConfig()


def score_inputs(q: Tensor, k: Tensor, config: PrismConfig = _DEFAULT_CONFIG) -> BandScores:
    """The per-call part of the scoring, eagerly: pooled bands and their logit divisors.

    Args:
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hkv, Lkv, D)``.
    Returns:
        :class:`~prism_flex.scoring.BandScores`.
    """
    check_inputs(q, k)
    check_config(config)
    pooled = pipeline.pool_inputs(q.detach(), k.detach(), config, Mode.EAGER)
    return pipeline.band_scores(pooled, config, Mode.EAGER)


def select_blocks(
    scores: BandScores,
    row_start: int,
    num_rows: int,
    q_len: int,
    kv_len: int,
    config: PrismConfig = _DEFAULT_CONFIG,
) -> Selection:
    """Selected key blocks of query blocks ``row_start .. row_start + num_rows - 1``, eagerly.

    Args:
        scores: the output of :func:`score_inputs`.
    Returns:
        :class:`~prism_flex.selection.Selection`: ``selected`` bool ``(B, Hq, R, Nk)``,
        ``allowed`` and ``diagonal`` bool ``(R, Nk)``.
    """
    rows = torch.arange(num_rows, device=scores.q_high.device) + row_start
    return select_rows(config, scores, rows, q_len, kv_len, *Thresholds.of(config))


@uniform_dispatch_keys
@torch.no_grad()
def prism_block_mask(
    q: Tensor,
    k: Tensor,
    config: PrismConfig = _DEFAULT_CONFIG,
    *,
    v: Optional[Tensor] = None,
    scale: Optional[float] = None,
    compiled: bool = True,
    key_padding_mask: Optional[Tensor] = None,
    document_ids: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
) -> BlockMask:
    """The Prism ``BlockMask`` of a causal attention.

    Args:
        q: ``(B, Hq, Lq, D)`` after RoPE; k: ``(B, Hkv, Lkv, D)`` after RoPE; ``Lq <= Lkv``.
        config: selection settings.
        v: ``(B, Hkv, Lkv, D)``; needed (only) with ``config.output_error``, whose threshold
            fit measures attention outputs.
        scale: the attention's softmax scale, default ``1 / sqrt(D)`` (the fit's outputs).
        compiled: run the scoring through ``torch.compile`` (``False``: eager, for debugging
            and tests).
        key_padding_mask, document_ids, cu_seqlens: padding and packed documents, as
            :func:`prism_attention` takes them.
    Returns:
        A forward-only ``BlockMask`` with one row per *query* head, ``BLOCK_SIZE =
        config.block_size``, ``seq_lengths = (Lq, Lkv)``: the diagonal blocks are partial
        (token-level bottom-right causal ``mask_mod``), the other selected blocks full.
        Index tables are full width, ``(B, Hq, Nq, Nk)`` int32, twice: at very long inputs
        :func:`prism_attention` makes them per chunk of queries instead. With padding or
        documents the ``mask_mod`` is the token rule (causal, same document, real key) and
        every block holding a boundary or padding is partial.
    """
    check_config(config)
    segments = _segments(q, k, key_padding_mask, document_ids, cu_seqlens, compiled)
    if segments is not None and config.output_error is not None:
        raise NotImplementedError(FIT_DOCUMENTS_ERROR)
    if config.output_error is not None and v is None:
        raise ValueError(
            "PrismConfig.output_error fits the thresholds to attention outputs: pass v= to "
            "prism_block_mask (prism_attention and PrismAttention do)"
        )
    check_inputs(q, k, v)
    config.band_dims(q.shape[-1])
    mode = Mode.at_entry(compiled)
    tables = pipeline.block_tables(
        q.detach(), k.detach(), None if v is None else v.detach(), config, scale, mode, segments
    )
    return pipeline.table_block_mask(tables, q.shape[2], k.shape[2], 0, config, q.device, segments)


def _segments(q, k, key_padding_mask, document_ids, cu_seqlens, compiled):
    """The :class:`~prism_flex.documents.Segments` of a call (``None`` without padding or
    documents); value checks read the tensors (one host sync) except while traced."""
    if key_padding_mask is None and document_ids is None and cu_seqlens is None:
        return None
    check_values = not (compiled and torch.compiler.is_compiling())
    return documents.make_segments(
        key_padding_mask,
        document_ids,
        cu_seqlens,
        q.shape[0],
        k.shape[2],
        q.device,
        check_values,
    )


def block_density(block_mask: BlockMask) -> Tensor:
    """Share of the causally visible (query block, key block) pairs that a mask computes.

    Returns:
        float32 ``(B, H)``.
    """
    q_len, kv_len = block_mask.seq_lengths
    nq = block_mask.kv_num_blocks.shape[-1]
    visible = pipeline.visible_blocks(
        q_len, kv_len, block_mask.BLOCK_SIZE[0], nq, block_mask.kv_num_blocks.device
    )
    chosen = block_mask.kv_num_blocks.sum(-1)
    if block_mask.full_kv_num_blocks is not None:
        chosen = chosen + block_mask.full_kv_num_blocks.sum(-1)
    return chosen.float() / visible


def dense_causal_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None
) -> Tensor:
    """Dense causal attention with bottom-right alignment (queries are the last Lq positions).

    Shapes as :func:`prism_attention`. SDPA with native GQA (no repeated K/V), its backend as
    torch picks it (cuDNN on torch 2.11 with Hopper). Differentiable.
    """
    check_inputs(q, k, v)
    return pipeline.dense_attention(q, k, v, scale, Mode.at_entry(compiled=True))


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: BlockMask,
    *,
    scale: Optional[float] = None,
    compiled: bool = True,
) -> Tensor:
    """FlexAttention over the blocks of ``block_mask``, with native GQA.

    The compiled ``flex_attention`` that :func:`prism_attention` uses, for masks from
    :func:`prism_block_mask` or any other source (one mask row per query head, or one shared).

    Args:
        q: ``(B, Hq, Lq, D)``; k, v: ``(B, Hkv, Lkv, D)``; block_mask with
            ``seq_lengths == (Lq, Lkv)``.
        compiled: ``False`` runs eager FlexAttention, which ignores the block lists, so the
            mask's blocks are then enforced through its ``mask_mod`` (O(Lq * Lkv) memory).
    Returns:
        ``(B, Hq, Lq, D)``.
    """
    check_inputs(q, k, v)
    if tuple(block_mask.seq_lengths) != (q.shape[2], k.shape[2]):
        raise ValueError(
            f"block_mask.seq_lengths {tuple(block_mask.seq_lengths)} must be (q_len, kv_len) "
            f"= {(q.shape[2], k.shape[2])}"
        )
    return pipeline.sparse_attention(q, k, v, block_mask, scale, Mode.at_entry(compiled))


def prism_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    config: PrismConfig = _DEFAULT_CONFIG,
    *,
    scale: Optional[float] = None,
    return_density: bool = False,
    compiled: bool = True,
    key_padding_mask: Optional[Tensor] = None,
    document_ids: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
):
    """Causal attention over the Prism-selected blocks; a drop-in for
    ``F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)``.

    Args:
        q: ``(B, Hq, Lq, D)`` after RoPE; k, v: ``(B, Hkv, Lkv, D)``; ``Hq % Hkv == 0`` (GQA
            is native: K/V are never repeated); ``Lq <= Lkv`` (a prefill chunk continuing a
            KV cache sits at the end, bottom-right causal alignment). Without the three
            arguments below, every key is attended causally.
        config: selection settings; calls too small for sparsity to pay run dense attention
            (:meth:`PrismConfig.runs_dense`).
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_density: also return the per-head block density.
        compiled: use the compiled scoring and ``flex_attention``. ``False`` runs everything
            eagerly (FlexAttention then evaluates the mask on every pair: O(Lq * Lkv)
            memory; for tests and debugging at small sizes).
        key_padding_mask: bool ``(B, Lkv)``, True for a real token, False for padding (the
            Hugging Face ``attention_mask`` convention: pass ``attention_mask.bool()``; left,
            right or any padding).
        document_ids: integer ``(B, Lkv)``: tokens with equal ids are one document (packed
            sequences); each document must be one contiguous run of tokens (checked: one
            host sync and a sort of each row, eager calls only). Ids need not be sorted.
        cu_seqlens: integer ``(N + 1,)``: FlashAttention-varlen offsets of ``N`` documents
            packed in one row (``B == 1``): ``0 = cu[0] < cu[1] < ... < cu[N] = Lkv``
            (checked: one host read, eager calls only), on q's device or on the CPU (no
            device sync: the way to pass them at every layer). Exclusive with
            ``document_ids``; either combines with ``key_padding_mask``.

            With any of them, the query at position ``p`` (queries are the last ``Lq`` of
            the ``Lkv`` positions) attends key ``j`` iff ``j <= p``, both are in the same
            document and ``j`` is not padding; query rows at padded positions output
            zeros. No block crosses a boundary: scores, top-p, sink and local blocks are per
            document, and a packed row of documents whose lengths are multiples of the block
            size selects what each document would alone (``prism_flex/documents.py``). The
            dense path (small calls, inputs that require grad) uses SDPA with the same rule
            as a boolean mask. Not with ``config.output_error`` (``NotImplementedError``).
    Returns:
        ``(B, Hq, Lq, D)`` in the input dtype, and with ``return_density`` a float32
        ``(B, Hq)`` tensor: selected / causally visible blocks (1.0 on the dense path).

    Inference only. With grad enabled and an input that requires grad (a model in training),
    the call runs dense attention, which is differentiable, and warns once: the result is
    exact and its gradients are right, but nothing is saved.
    """
    check_inputs(q, k, v)
    check_config(config)
    config.band_dims(q.shape[-1])
    segments = _segments(q, k, key_padding_mask, document_ids, cu_seqlens, compiled)
    return attention_with_segments(q, k, v, config, scale, return_density, compiled, segments)
