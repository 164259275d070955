"""End-to-end tests of prism_block_mask / prism_attention against the float64 reference.

These sweep odd shapes (batch 1-3, GQA 1/2/4/7, lengths 1..2048, Lq <= Lkv) on the *eager*
path (``compiled=False``): torch.compile specialises sizes 0 and 1 and allows 8 variants of
a function per process, and this sweep has far more shape classes than a model ever shows.
``test_compiled.py`` checks that the compiled path equals the eager one on a few classes.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from prism_flex import (
    PrismConfig,
    block_density,
    dense_causal_attention,
    prism_attention,
    prism_block_mask,
)
from prism_flex import testing as ref

from .conftest import assert_tables_equal, structured_qkv

interesting_lengths = st.sampled_from([1, 2, 97, 127, 128, 129, 255, 256, 257, 700, 1025, 2048])


@st.composite
def problems(draw, max_len=2048):
    b = draw(st.integers(1, 3))
    hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 4, 7]))
    lkv = draw(interesting_lengths | st.integers(1, max_len))
    lq = draw(st.just(lkv) | st.integers(1, lkv))
    # Bound the work of the slow reference: few heads at long lengths.
    if b * hkv * group * lkv > 12000:
        b, hkv = 1, 1
    d = draw(st.sampled_from([32, 64]))
    return dict(b=b, hq=hkv * group, hkv=hkv, lq=lq, lkv=lkv, d=d, seed=draw(st.integers(0, 999)))


def _qkv(p, dtype=torch.float32):
    return structured_qkv(
        p["b"], p["hq"], p["hkv"], p["lq"], p["lkv"], p["d"], seed=p["seed"], dtype=dtype
    )


CFG = PrismConfig(dense_below=0, sparse_min_flops=0, high_threshold=0.8, low_threshold=0.8)


@given(p=problems())
def test_mask_matches_reference(p):
    q, k, _ = _qkv(p)
    mask = prism_block_mask(q, k, CFG, compiled=False)
    assert mask.kv_num_blocks.shape[:2] == (p["b"], p["hq"])
    assert mask.seq_lengths == (p["lq"], p["lkv"])
    want, margin = ref.selection(q, k, CFG)
    assert_tables_equal(mask.to_dense().bool(), want, margin)


@given(p=problems())
def test_partial_blocks_are_exactly_the_diagonal(p):
    q, k, _ = _qkv(p)
    mask = prism_block_mask(q, k, CFG, compiled=False)
    _, diagonal = ref.causal_blocks(p["lq"], p["lkv"], CFG.block_size)
    partial = torch.zeros_like(mask.to_dense().bool())
    nk = partial.shape[-1]
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in partial.shape[:3]]).view(-1, 3):
        i = tuple(idx.tolist())
        partial[i][mask.kv_indices[i][: mask.kv_num_blocks[i]].long()] = True
    assert torch.equal(partial, diagonal.expand_as(partial))
    assert nk == mask.kv_indices.shape[-1] == mask.full_kv_indices.shape[-1]


@given(p=problems(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_output_matches_reference_within_its_own_dtype_error(p, dtype):
    q, k, v = _qkv(p, dtype)
    out, density = prism_attention(q, k, v, CFG, return_density=True, compiled=False)
    assert out.shape == q.shape and out.dtype == dtype
    table = prism_block_mask(q, k, CFG, compiled=False).to_dense().bool()
    want = ref.attention(q, k, v, table, CFG.block_size)
    same_dtype = ref.attention(q, k, v, table, CFG.block_size, dtype=dtype)
    err = (out.double() - want).norm()
    ref_err = (same_dtype.double() - want).norm()
    # Twice the error of the reference computed in the input dtype, with a floor for
    # outputs that the input dtype represents exactly.
    assert err <= 2 * ref_err + 1e-6 * want.norm() + 1e-12
    visible = ref.causal_blocks(p["lq"], p["lkv"], CFG.block_size)[0].sum()
    torch.testing.assert_close(density, table.sum((-1, -2)).float() / visible)


@given(p=problems())
def test_threshold_one_equals_dense_causal_sdpa(p):
    q, k, v = _qkv(p)
    cfg = PrismConfig(dense_below=0, sparse_min_flops=0, high_threshold=1.0, low_threshold=1.0)
    out, density = prism_attention(q, k, v, cfg, return_density=True, compiled=False)
    kk = k.repeat_interleave(p["hq"] // p["hkv"], 1)
    vv = v.repeat_interleave(p["hq"] // p["hkv"], 1)
    tok = ref.causal_token_mask(p["lq"], p["lkv"])
    want = F.scaled_dot_product_attention(q.double(), kk.double(), vv.double(), attn_mask=tok)
    same_dtype = F.scaled_dot_product_attention(q, kk, vv, attn_mask=tok).double()
    # Within twice the error of dense SDPA in the input dtype (a fixed 1e-5 tolerance failed
    # on float32 rounding alone: Lq = Lkv = 443, max |diff| 1.7e-5).
    err, ref_err = (out.double() - want).norm(), (same_dtype - want).norm()
    assert err <= 2 * ref_err + 1e-6 * want.norm() + 1e-12
    assert torch.all(density == 1.0)


def _table_checked_against_reference(p, cfg):
    """The eager mask of problem ``p`` as a dense bool table, asserted equal to the
    reference selection (rows at a top-p decision flip excepted)."""
    q, k, _ = _qkv(p)
    table = prism_block_mask(q, k, cfg, compiled=False).to_dense().bool()
    want, margin = ref.selection(q, k, cfg)
    assert_tables_equal(table, want, margin)
    return table


@given(p=problems(), n=st.integers(1, 3))
def test_dense_final_blocks_match_reference(p, n):
    cfg = dataclasses.replace(CFG, dense_final_blocks=n)
    table = _table_checked_against_reference(p, cfg)
    allowed, _ = ref.causal_blocks(p["lq"], p["lkv"], cfg.block_size)
    assert torch.equal(table[:, :, -n:], allowed[-n:].expand_as(table[:, :, -n:]))


@given(p=problems(), local=st.integers(0, 3))
def test_local_blocks_match_reference_and_are_always_kept(p, local):
    cfg = dataclasses.replace(CFG, local_blocks=local)
    table = _table_checked_against_reference(p, cfg)
    _, diagonal = ref.causal_blocks(p["lq"], p["lkv"], cfg.block_size)
    for i in range(diagonal.shape[0]):
        first = int(diagonal[i].nonzero().min())
        assert table[:, :, i, max(0, first - local) : first].all()


@given(
    p=problems(),
    pool=st.sampled_from([16, 32, 128]),
    thresholds=st.sampled_from([(0.8, 0.8), (0.5, 0.9), (0.95, 0.6)]),
)
def test_final_block_pool_matches_reference(p, pool, thresholds):
    cfg = dataclasses.replace(
        CFG,
        dense_final_blocks=0,
        final_block_pool=pool,
        high_threshold=thresholds[0],
        low_threshold=thresholds[1],
    )
    table = _table_checked_against_reference(p, cfg)
    # Only the last query block gains blocks.
    q, k, _ = _qkv(p)
    plain = (
        prism_block_mask(q, k, dataclasses.replace(cfg, final_block_pool=0), compiled=False)
        .to_dense()
        .bool()
    )
    assert torch.equal(table[:, :, :-1], plain[:, :, :-1])
    assert torch.all(table[:, :, -1] >= plain[:, :, -1])


@given(p=problems(max_len=1200), t=st.floats(0.05, 0.9), dt=st.floats(0.0, 0.5))
def test_higher_threshold_selects_superset(p, t, dt):
    q, k, _ = _qkv(p)
    low = prism_block_mask(
        q,
        k,
        PrismConfig(dense_below=0, sparse_min_flops=0, high_threshold=t, low_threshold=t),
        compiled=False,
    )
    high = prism_block_mask(
        q,
        k,
        PrismConfig(
            dense_below=0,
            sparse_min_flops=0,
            high_threshold=min(1.0, t + dt),
            low_threshold=min(1.0, t + dt / 2),
        ),
        compiled=False,
    )
    assert torch.all(low.to_dense() <= high.to_dense())


@given(p=problems(max_len=1200))
def test_sink_and_diagonal_always_selected(p):
    q, k, _ = _qkv(p)
    mask = prism_block_mask(
        q,
        k,
        PrismConfig(dense_below=0, sparse_min_flops=0, high_threshold=0.01, low_threshold=0.01),
        compiled=False,
    )
    table = mask.to_dense().bool()
    _, diagonal = ref.causal_blocks(p["lq"], p["lkv"], 128)
    assert table[..., 0].all()
    assert torch.all(table >= diagonal)


@given(p=problems(max_len=1200))
def test_batch_rows_are_independent(p):
    q, k, v = _qkv(p)
    mask = prism_block_mask(q, k, CFG, compiled=False).to_dense().bool()
    out = prism_attention(q, k, v, CFG, compiled=False)
    _, margin = ref.selection(q, k, CFG)
    for i in range(p["b"]):
        sl = slice(i, i + 1)
        alone = prism_block_mask(q[sl], k[sl], CFG, compiled=False).to_dense().bool()
        assert_tables_equal(alone, mask[sl], margin[sl])
        if torch.equal(alone, mask[sl]):
            torch.testing.assert_close(
                prism_attention(q[sl], k[sl], v[sl], CFG, compiled=False), out[sl]
            )


def test_dense_fallback_below_dense_below():
    q, k, v = structured_qkv(1, 4, 2, 100, 1000, 64)
    cfg = PrismConfig(dense_below=256)
    out, density = prism_attention(q, k, v, cfg, return_density=True)
    torch.testing.assert_close(out, dense_causal_attention(q, k, v))
    assert torch.all(density == 1)


@pytest.mark.parametrize("lq, lkv", [(1, 1), (1, 999), (5, 999), (300, 300), (129, 1000)])
@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2), (7, 1)])
def test_dense_causal_attention_is_bottom_right(lq, lkv, hq, hkv):
    q, k, v = structured_qkv(2, hq, hkv, lq, lkv, 32)
    table = torch.ones(2, hq, ref.num_blocks(lq, 128), ref.num_blocks(lkv, 128), dtype=torch.bool)
    torch.testing.assert_close(
        dense_causal_attention(q, k, v).double(),
        ref.attention(q, k, v, table, 128),
        rtol=1e-5,
        atol=1e-5,
    )


def test_decode_step_through_sparse_path_is_dense():
    # One query against a long cache: with dense_below=0 the sparse path still sees all
    # selected blocks; at threshold 1 it equals dense attention.
    q, k, v = structured_qkv(1, 4, 2, 1, 700, 64)
    cfg = PrismConfig(dense_below=0, sparse_min_flops=0, high_threshold=1.0, low_threshold=1.0)
    out = prism_attention(q, k, v, cfg, compiled=False)
    torch.testing.assert_close(out, dense_causal_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_block_density_counts_visible_pairs():
    q, k, v = structured_qkv(1, 2, 1, 300, 300, 32)
    cfg = PrismConfig(dense_below=0, sparse_min_flops=0, high_threshold=1.0, low_threshold=1.0)
    assert torch.all(block_density(prism_block_mask(q, k, cfg, compiled=False)) == 1.0)


@pytest.mark.parametrize("final_block_pool", [0, 32])
def test_score_inputs_and_select_blocks_compose_to_the_mask(final_block_pool):
    """The public two-step API gives the mask's selection, in row chunks too."""
    from prism_flex import score_inputs, select_blocks

    cfg = dataclasses.replace(CFG, dense_final_blocks=0, final_block_pool=final_block_pool)
    q, k, _ = structured_qkv(2, 4, 2, 700, 900, 64, seed=1)
    scores = score_inputs(q, k, cfg)
    want = prism_block_mask(q, k, cfg, compiled=False).to_dense().bool()
    parts = [select_blocks(scores, s, min(3, 6 - s), 700, 900, cfg)[0] for s in (0, 3)]
    assert torch.equal(torch.cat(parts, dim=2), want)
