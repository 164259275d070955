"""Tiny randomly initialised Hugging Face models for the integration tests (CPU).

4 query heads, 2 KV heads, head dim 32: one shape class for every family, so that compiled
stages compile once per query-length class. Imports transformers: use from test modules that
``pytest.importorskip("transformers")`` first.
"""

from __future__ import annotations

import torch
import transformers
from transformers import AutoModelForCausalLM

#: The selection path on tiny inputs: no length floor and no FLOP floor.
NO_DENSE_FLOOR = dict(dense_below=0, sparse_min_flops=0)

COMMON = dict(
    hidden_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_hidden_layers=2,
    intermediate_size=256,
    vocab_size=256,
    max_position_embeddings=4096,
)

_CONFIGS = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}

#: The families this transformers version has.
FAMILIES = [f for f, cls in _CONFIGS.items() if hasattr(transformers, cls)]


def tiny_model(family: str, attn: str, seed: int = 0, **overrides):
    """An eval-mode model of ``family`` with ``attn_implementation=attn``."""
    config = getattr(transformers, _CONFIGS[family])(**{**COMMON, **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def tiny_prompt(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """int64 ``(batch, length)`` token ids; token 0 (the tests' pad token) never occurs
    (generate would mask it)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (batch, length), generator=g)
