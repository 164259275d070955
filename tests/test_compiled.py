"""The compiled path (torch.compile'd scoring and flex_attention) against the eager one.

A few fixed shape classes, each compiled once (dynamic lengths): batch 1 and 3, GQA 2 and 7,
head dims 64 and 32, lengths from 2 blocks to 2048 tokens, Lq <= Lkv.
"""

import torch
from hypothesis import given
from hypothesis import strategies as st

from prism_flex import PrismConfig, prism_attention, prism_block_mask

from . import reference as ref
from .conftest import assert_tables_equal, structured_qkv

CFG = PrismConfig(dense_below=0, high_threshold=0.8, low_threshold=0.8)
SHAPE_CLASSES = [  # (batch, query heads, kv heads, head dim)
    (1, 4, 2, 64),
    (3, 7, 1, 32),
]


@st.composite
def compiled_problems(draw):
    b, hq, hkv, d = draw(st.sampled_from(SHAPE_CLASSES))
    lkv = draw(st.sampled_from([129, 255, 256, 700, 1025, 2048]) | st.integers(129, 2048))
    lq = draw(st.just(lkv) | st.integers(129, lkv))
    return b, hq, hkv, lq, lkv, d, draw(st.integers(0, 999))


@given(p=compiled_problems())
def test_compiled_equals_eager(p):
    *shape, seed = p
    q, k, v = structured_qkv(*shape, seed=seed)
    compiled = prism_block_mask(q, k, CFG).to_dense().bool()
    eager = prism_block_mask(q, k, CFG, compiled=False).to_dense().bool()
    _, margin = ref.selection(q, k, CFG)
    assert_tables_equal(compiled, eager, margin)
    if torch.equal(compiled, eager):
        torch.testing.assert_close(
            prism_attention(q, k, v, CFG), prism_attention(q, k, v, CFG, compiled=False),
            rtol=1e-5, atol=1e-5,
        )


def test_chunked_scoring_equals_one_shot():
    q, k, v = structured_qkv(1, 4, 2, 1500, 2000, 64, seed=3)
    one = prism_block_mask(q, k, CFG)
    chunked_cfg = PrismConfig(dense_below=0, high_threshold=0.8, low_threshold=0.8,
                              max_score_elements=4 * 16 * 3)  # 3 query blocks per chunk
    chunked = prism_block_mask(q, k, chunked_cfg)
    _, margin = ref.selection(q, k, CFG)
    assert_tables_equal(chunked.to_dense().bool(), one.to_dense().bool(), margin)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert getattr(chunked, name).shape == getattr(one, name).shape


def test_no_recompilation_across_lengths():
    """After warm-up, a sweep over 8 lengths (multiples of the block size or not, Lq <= Lkv,
    two configs with different thresholds) compiles nothing new."""
    counters = torch._dynamo.utils.counters
    configs = [CFG, PrismConfig(dense_below=0, high_threshold=0.5, low_threshold=0.9)]
    for lq, lkv in [(600, 600), (700, 1000)]:  # warm-up: equal and unequal lengths
        prism_attention(*structured_qkv(1, 4, 2, lq, lkv, 64), CFG)
    before = counters["stats"]["unique_graphs"]
    for lq, lkv in [(384, 384), (500, 500), (777, 900), (1024, 1024), (1025, 1300),
                    (1500, 1500), (1800, 2047), (2048, 2048)]:
        for cfg in configs:
            prism_attention(*structured_qkv(1, 4, 2, lq, lkv, 64), cfg)
    assert counters["stats"]["unique_graphs"] == before
