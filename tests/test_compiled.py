"""The compiled path (torch.compile'd scoring and flex_attention) against the eager one.

A few fixed shape classes, each compiled once (dynamic lengths): batch 1 and 3, GQA 2 and 7,
head dims 64 and 32, lengths from 2 blocks to 2048 tokens, Lq <= Lkv; with the finer scoring
of the final query block on (``final_block_pool``).
"""

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from prism_flex import PrismConfig, prism_attention, prism_block_mask
from prism_flex import testing as ref

from .conftest import assert_clear_rows_equal, assert_tables_equal, structured_qkv

# The finer final-block scoring on (instead of the dense final block) so that the compiled
# path of that option is covered without compiling one more graph.
CFG = PrismConfig(
    dense_below=0,
    sparse_min_flops=0,
    high_threshold=0.8,
    low_threshold=0.8,
    dense_final_blocks=0,
    final_block_pool=32,
)
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


@pytest.mark.slow
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
            prism_attention(q, k, v, CFG),
            prism_attention(q, k, v, CFG, compiled=False),
            rtol=1e-5,
            atol=1e-5,
        )


def test_chunked_scoring_equals_one_shot():
    q, k, v = structured_qkv(1, 4, 2, 1500, 2000, 64, seed=3)
    one = prism_block_mask(q, k, CFG)
    chunked_cfg = dataclasses.replace(CFG, max_score_elements=4 * 16 * 3)  # 3 rows per chunk
    chunked = prism_block_mask(q, k, chunked_cfg)
    _, margin = ref.selection(q, k, CFG)
    assert_tables_equal(chunked.to_dense().bool(), one.to_dense().bool(), margin)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert getattr(chunked, name).shape == getattr(one, name).shape


@pytest.mark.parametrize("compiled", [False, True])
def test_query_chunked_attention_equals_one_shot(compiled):
    """Long inputs run the queries in chunks, each with its own BlockMask over all keys
    (pipeline.prism_forward): output and density equal the one-shot call's, Lq < Lkv and a
    partial last block included."""
    q, k, v = structured_qkv(1, 4, 2, 1500, 2000, 64, seed=3)
    chunked_cfg = dataclasses.replace(CFG, max_score_elements=4 * 16 * 3)  # 3 rows per chunk
    want, want_density = prism_attention(q, k, v, CFG, return_density=True, compiled=compiled)
    got, density = prism_attention(q, k, v, chunked_cfg, return_density=True, compiled=compiled)
    torch.testing.assert_close(density, want_density)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_graph_capture_inputs_keep_their_static_dims():
    """GraphedStage's static inputs keep the marks of lengths_only_dynamic (else the capture
    compiles the stage once more)."""
    from prism_flex._compile import _static_copy, lengths_only_dynamic

    (marked,) = lengths_only_dynamic(torch.randn(1, 4, 5, 6))
    assert _static_copy(marked)._dynamo_static_indices == {1, 3}


FIT = dataclasses.replace(CFG, output_error=0.1, fit_query_blocks=3, fit_tokens=16)


@pytest.mark.slow
@given(p=compiled_problems())
def test_threshold_fit_compiled_equals_eager(p):
    """The fit on the compiled path: CPU runs its FlexAttention eagerly (the compiled CPU
    kernel returns no log-sum-exp), the rest compiled."""
    *shape, seed = p
    if shape[0] != 1:  # one shape class: each compiles four more graphs
        return
    q, k, v = structured_qkv(*shape, seed=seed)
    compiled = prism_block_mask(q, k, FIT, v=v).to_dense().bool()
    eager = prism_block_mask(q, k, FIT, v=v, compiled=False).to_dense().bool()
    _, margin, _ = ref.fitted_selection(q, k, v, FIT)
    assert_clear_rows_equal(compiled, eager, margin)


def test_no_recompilation_across_lengths():
    """After warm-up, a sweep over 8 lengths (multiples of the block size or not, Lq <= Lkv,
    configs with different thresholds, either one the larger, and the threshold fit at two
    error budgets) compiles nothing new."""
    counters = torch._dynamo.utils.counters
    configs = [
        CFG,
        dataclasses.replace(CFG, high_threshold=0.5, low_threshold=0.9),
        dataclasses.replace(CFG, high_threshold=0.9, low_threshold=0.5),
        FIT,
        dataclasses.replace(FIT, output_error=0.3),
    ]
    for lq, lkv in [(600, 600), (700, 1000)]:  # warm-up: equal and unequal lengths
        for cfg in (CFG, FIT):
            prism_attention(*structured_qkv(1, 4, 2, lq, lkv, 64), cfg)
    before = counters["stats"]["unique_graphs"]
    for lq, lkv in [
        (384, 384),
        (500, 500),
        (777, 900),
        (1024, 1024),
        (1025, 1300),
        (1500, 1500),
        (1800, 2047),
        (2048, 2048),
    ]:
        for cfg in configs:
            prism_attention(*structured_qkv(1, 4, 2, lq, lkv, 64), cfg)
    assert counters["stats"]["unique_graphs"] == before


def test_inference_mode_and_plain_calls_share_the_compiled_stages():
    """Inference tensors lack a dispatch key that ordinary ones have, and inference mode
    hides others: the stages run below those keys, so no mix compiles anything new."""
    counters = torch._dynamo.utils.counters
    q, k, v = structured_qkv(1, 4, 2, 650, 650, 64, seed=7)
    want = prism_attention(q, k, v, CFG)
    graphs = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        qi, ki, vi = (t.clone() for t in (q, k, v))
        got = [prism_attention(qi, ki, vi, CFG), prism_attention(q, k, v, CFG)]
    got.append(prism_attention(qi, ki, vi, CFG))
    assert counters["stats"]["unique_graphs"] == graphs
    for out in got:
        assert torch.equal(out, want)


def test_head_counts_and_head_dims_are_static_for_the_compiled_stages():
    """Only batch and lengths are symbolic in our compiled stages: otherwise dynamo's duck
    sizing ties a length to an equal head dim at the first call (Qwen2.5 at 8K tokens: 64 key
    blocks, head dim 64) and the next length recompiles. The marks go on new tensor objects,
    never on the caller's."""
    from prism_flex._compile import lengths_only_dynamic as _lengths_only_dynamic

    q = torch.randn(1, 4, 8, 8)
    (marked,) = _lengths_only_dynamic(q)
    assert marked.data_ptr() == q.data_ptr() and marked is not q
    assert marked._dynamo_static_indices == {1, 3}
    assert not hasattr(q, "_dynamo_static_indices")
    (div,) = _lengths_only_dynamic(torch.ones(1, 4))
    assert div._dynamo_static_indices == {1}
    num, idx = _lengths_only_dynamic(torch.ones(1, 4, 5), torch.ones(1, 4, 5, 5), head_dim=False)
    assert num._dynamo_static_indices == idx._dynamo_static_indices == {1}


@pytest.mark.slow
def test_no_recompilation_after_the_first_call_in_a_fresh_process():
    """From a fresh process (dynamo's caches and its memory of earlier sizes empty): after
    the first call (batch 1, Lq == Lkv), a longer length, ``Lq < Lkv`` (4 and more query
    blocks) and batch sizes 1-3 compile nothing (bench/recompiles.py; on CPU, so without the
    CUDA-graph stage)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "bench.recompiles", "--device", "cpu", "--lengths", "1024",
           "2048", "--batches", "1", "2", "3", "--heads", "4", "2", "--head-dim", "64"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True)
    steps = [line for line in done.stderr.splitlines() if "graphs compiled" in line]
    assert len(steps) == 8, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "graphs compiled after warm-up: 0", steps
