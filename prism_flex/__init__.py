"""prism_flex: Prism spectral-aware block-sparse attention on PyTorch FlexAttention.

Importing this package compiles nothing and does not initialise CUDA.
"""

from .attention import (
    block_density,
    check_inputs,
    dense_causal_attention,
    prism_attention,
    prism_block_mask,
    score_inputs,
    select_blocks,
    sparse_attention,
)
from .config import ROPE_LAYOUTS, PrismConfig
from .module import PrismAttention

__all__ = [
    "PrismConfig",
    "ROPE_LAYOUTS",
    "PrismAttention",
    "prism_attention",
    "prism_block_mask",
    "sparse_attention",
    "dense_causal_attention",
    "block_density",
    "score_inputs",
    "select_blocks",
    "check_inputs",
]

__version__ = "0.1.0"
