"""Prism attention as one opaque custom op, for graphs compiled by the user.

Traced inline into a user's compiled model, FlexAttention with a mask computed in the same
graph trips several bugs of torch's inductor (seen on torch 2.11 and 2.13): on CPU, an
elementwise op fused onto its output ("Unsupported for epilogue_nodes in
CppFlexAttentionTemplate"), a tensor or a symbolic ``kv_len - q_len`` captured by the
``mask_mod`` ("NoValidChoicesError", "'Add' object has no attribute 'get_name'"), a query that
is a view of a 2-d buffer; on CUDA, "CantSplit" in the Triton code generation when K/V are
slices of a KV cache written in the graph, with dynamic shapes. Behind a custom op (the
public extension point, ``torch.library.custom_op``) the user's graph sees one opaque call,
and the op runs prism_flex's own compiled stages on real tensors, as in eager use.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .config import PrismConfig


@torch.library.custom_op("prism_flex::prism_attention", mutates_args=())
def prism_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_size: int,
    high_band_dims: Optional[int],
    low_band_dims: Optional[int],
    high_threshold: float,
    low_threshold: float,
    calibrate: bool,
    high_temperature: float,
    low_temperature: float,
    force_sink: bool,
    force_diagonal: bool,
    dense_final_blocks: int,
    final_block_pool: int,
    local_blocks: int,
    output_error: Optional[float],
    fit_query_blocks: int,
    fit_tokens: int,
    rope_layout: str,
    dense_below: int,
    max_score_elements: int,
    scale: Optional[float],
) -> tuple[Tensor, Tensor]:
    """``prism_attention(q, k, v, PrismConfig(...), scale=scale, return_density=True)``."""
    from .attention import prism_attention

    config = PrismConfig(
        block_size=block_size, high_band_dims=high_band_dims, low_band_dims=low_band_dims,
        high_threshold=high_threshold, low_threshold=low_threshold, calibrate=calibrate,
        high_temperature=high_temperature, low_temperature=low_temperature,
        force_sink=force_sink, force_diagonal=force_diagonal,
        dense_final_blocks=dense_final_blocks, final_block_pool=final_block_pool,
        local_blocks=local_blocks, output_error=output_error,
        fit_query_blocks=fit_query_blocks, fit_tokens=fit_tokens,
        rope_layout=rope_layout,
        dense_below=dense_below, max_score_elements=max_score_elements,
    )
    # (The first run of a user's compiled graph calls this under AOTAutograd's aliasing check,
    # a dispatch mode that changes the dispatch keys our stages guard on: prism_attention
    # runs below those keys for that reason, see attention._uniform_dispatch_keys.)
    out, density = prism_attention(q, k, v, config, scale=scale, return_density=True)
    # Contiguous, as the fake below promises (flex_attention's output follows q's strides).
    return out.contiguous(), density


@prism_attention_op.register_fake
def _(q, k, v, *args):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        q.shape[:2], dtype=torch.float32
    )


def call(q: Tensor, k: Tensor, v: Tensor, config: PrismConfig, scale: Optional[float]):
    """Call the op with the fields of ``config``; returns ``(out, density)``."""
    return prism_attention_op(
        q, k, v, config.block_size, config.high_band_dims, config.low_band_dims,
        float(config.high_threshold), float(config.low_threshold), config.calibrate,
        float(config.high_temperature), float(config.low_temperature), config.force_sink,
        config.force_diagonal, config.dense_final_blocks, config.final_block_pool,
        config.local_blocks, None if config.output_error is None else float(config.output_error),
        config.fit_query_blocks, config.fit_tokens, config.rope_layout, config.dense_below,
        config.max_score_elements, scale,
    )
