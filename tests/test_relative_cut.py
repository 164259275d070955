"""PrismConfig.relative_cut: the sort-free cut relative to each row's maximum, on Prism's
dual-band scores, against the float64 reference (eager, compiled and inside a user's
compile through the custom op)."""

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from prism_flex import PrismAttention, PrismConfig, prism_attention, prism_block_mask
from prism_flex import testing as ref
from prism_flex.selection import relative_select

from .conftest import MARGIN, assert_tables_equal, structured_qkv
from .test_selection import dyadic_rows

# Dyadic alphas: alpha * max is exact in float32 and float64 for the dyadic rows.
DYADIC_ALPHAS = [0.0, 0.0625, 0.125, 0.25, 0.5, 0.75, 1.0]
alphas = st.sampled_from(DYADIC_ALPHAS) | st.floats(0.0, 1.0)

CFG = PrismConfig(dense_below=0, sparse_min_flops=0, relative_cut=0.1)


@given(probs=dyadic_rows(), alpha=alphas)
def test_relative_select_matches_reference_row_by_row(probs, alpha):
    got = relative_select(probs, alpha)
    for r in range(probs.shape[0]):
        kept, margin = ref.relative_row(probs[r].double().tolist(), alpha)
        if alpha in DYADIC_ALPHAS or margin > MARGIN:
            assert set(torch.nonzero(got[r]).flatten().tolist()) == kept


@given(probs=dyadic_rows(), a1=alphas, a2=alphas)
def test_larger_alpha_selects_a_subset(probs, a1, a2):
    lo, hi = sorted((a1, a2))
    assert torch.all(relative_select(probs, hi) <= relative_select(probs, lo))


def test_relative_select_edges():
    probs = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.0, 0.0, 1.0, 0.0]])
    assert relative_select(probs, 0.0).all()
    assert relative_select(probs, 1.0).tolist() == [
        [True, False, False, False],
        [False, False, True, False],
    ]
    assert relative_select(probs, 0.5).tolist() == [
        [True, True, True, False],
        [False, False, True, False],
    ]


@st.composite
def problems(draw):
    hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 4]))
    lkv = draw(st.sampled_from([1, 127, 129, 300, 700, 1025]) | st.integers(1, 1100))
    lq = draw(st.just(lkv) | st.integers(1, lkv))
    d = draw(st.sampled_from([32, 64]))
    alpha = draw(st.sampled_from([0.01, 0.05, 0.1, 0.3]) | st.floats(0.001, 0.9))
    return dict(hq=hkv * group, hkv=hkv, lq=lq, lkv=lkv, d=d, seed=draw(st.integers(0, 999))), alpha


@given(problem=problems())
def test_mask_matches_reference(problem):
    p, alpha = problem
    cfg = dataclasses.replace(CFG, relative_cut=alpha)
    q, k, _ = structured_qkv(1, p["hq"], p["hkv"], p["lq"], p["lkv"], p["d"], seed=p["seed"])
    table = prism_block_mask(q, k, cfg, compiled=False).to_dense().bool()
    want, margin = ref.selection(q, k, cfg)
    assert_tables_equal(table, want, margin)
    # sink and diagonal always present
    allowed, diagonal = ref.causal_blocks(p["lq"], p["lkv"], cfg.block_size)
    assert table[..., 0].all()
    assert torch.all(table >= diagonal)
    assert not torch.any(table & ~allowed)


def test_alpha_zero_selects_every_visible_block_and_larger_alpha_a_subset():
    q, k, _ = structured_qkv(1, 4, 2, 900, 1000, 64, seed=1)
    allowed, _ = ref.causal_blocks(900, 1000, 128)
    tables = [
        prism_block_mask(q, k, dataclasses.replace(CFG, relative_cut=a), compiled=False)
        .to_dense()
        .bool()
        for a in (0.0, 0.01, 0.1, 0.5, 1.0)
    ]
    assert torch.equal(tables[0], allowed.expand_as(tables[0]))
    for wide, narrow in zip(tables, tables[1:]):
        assert torch.all(narrow <= wide)
    assert tables[-1].sum() < tables[0].sum()


def test_default_is_top_p_and_the_json_carries_the_field():
    assert PrismConfig().relative_cut is None
    cfg = PrismConfig(relative_cut=0.05)
    assert PrismConfig.from_json(cfg.to_json()) == cfg
    assert '"relative_cut": 0.05' in cfg.to_json()


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "0.1", True])
def test_bad_relative_cut_raises_naming_the_field(value):
    with pytest.raises(ValueError, match="relative_cut"):
        PrismConfig(relative_cut=value)


def test_relative_cut_with_the_threshold_fit_is_refused():
    with pytest.raises(ValueError, match="relative_cut and output_error"):
        PrismConfig(relative_cut=0.1, output_error=0.1)


def test_inside_a_users_compile_equals_eager():
    """Through the custom op (the config crosses it as JSON) in a user's compiled function."""
    q, k, v = structured_qkv(1, 4, 2, 640, 640, 32, seed=2)
    attn = PrismAttention(CFG)
    eager = prism_attention(q, k, v, CFG, compiled=False)
    with torch.no_grad():
        traced = torch.compile(lambda q, k, v: attn(q, k, v), fullgraph=True)(q, k, v)
    torch.testing.assert_close(traced, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@given(problem=problems())
def test_compiled_equals_eager(problem):
    p, alpha = problem
    cfg = dataclasses.replace(CFG, relative_cut=0.1)
    q, k, _ = structured_qkv(1, 4, 2, max(p["lq"], 129), max(p["lkv"], 129), 64, seed=p["seed"])
    compiled = prism_block_mask(q, k, cfg).to_dense().bool()
    eager = prism_block_mask(q, k, cfg, compiled=False).to_dense().bool()
    _, margin = ref.selection(q, k, cfg)
    assert_tables_equal(compiled, eager, margin)
