"""Prism attention as an opaque custom op, for CPU graphs compiled by the user.

torch's CPU FlexAttention kernel template (torch 2.11-2.13) cannot take, inside a compile of
the user's model: an elementwise op fused onto its output ("Unsupported for epilogue_nodes in
CppFlexAttentionTemplate"), a symbolic ``kv_len - q_len`` captured by the ``mask_mod``, a
tensor computed in the same graph captured by it, or a query that is a view of a 2-d buffer.
Behind a custom op (the public extension point, ``torch.library.custom_op``) the user's graph
sees one opaque call, and the op runs prism_flex's own compiled stages. CUDA graphs inline the
whole path instead (see ``attention.prism_attention``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .config import PrismConfig


@torch.library.custom_op("prism_flex::prism_attention_cpu", mutates_args=())
def prism_attention_cpu(
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
        force_sink=force_sink, force_diagonal=force_diagonal, rope_layout=rope_layout,
        dense_below=dense_below, max_score_elements=max_score_elements,
    )
    out, density = prism_attention(q, k, v, config, scale=scale, return_density=True)
    # Contiguous, as the fake below promises (flex_attention's output follows q's strides).
    return out.contiguous(), density


@prism_attention_cpu.register_fake
def _(q, k, v, *args):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        q.shape[:2], dtype=torch.float32
    )


def call(q: Tensor, k: Tensor, v: Tensor, config: PrismConfig, scale: Optional[float]):
    """Call the op with the fields of ``config``; returns ``(out, density)``."""
    return prism_attention_cpu(
        q, k, v, config.block_size, config.high_band_dims, config.low_band_dims,
        float(config.high_threshold), float(config.low_threshold), config.calibrate,
        float(config.high_temperature), float(config.low_temperature), config.force_sink,
        config.force_diagonal, config.rope_layout, config.dense_below,
        config.max_score_elements, scale,
    )
