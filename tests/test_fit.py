"""The per-head threshold fit (``PrismConfig.output_error``) against the float64 reference,
and its properties. Eager path, as test_attention.py (test_compiled.py covers compiled)."""

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from prism_flex import PrismConfig, prism_attention, prism_block_mask
from prism_flex import testing as ref
from prism_flex.fit import FIT_THRESHOLDS, fit_positions, fit_rows

from .conftest import MARGIN, assert_clear_rows_equal, structured_qkv
from .test_attention import problems

CFG = PrismConfig(
    dense_below=0, sparse_min_flops=0, output_error=0.1, fit_query_blocks=3, fit_tokens=16
)


def _qkv(p, dtype=torch.float32):
    return structured_qkv(
        p["b"], p["hq"], p["hkv"], p["lq"], p["lkv"], p["d"], seed=p["seed"], dtype=dtype
    )


@given(nq=st.integers(1, 2000), samples=st.integers(1, 9))
def test_fit_rows_match_reference(nq, samples):
    assert fit_rows(nq, samples, "cpu").tolist() == ref.fit_rows(nq, samples)


@given(q_len=st.integers(1, 3000), tokens=st.sampled_from([16, 32, 48, 128]), data=st.data())
def test_fit_positions_match_reference(q_len, tokens, data):
    nq = (q_len + 127) // 128
    rows = torch.tensor(data.draw(st.lists(st.integers(0, nq - 1), min_size=1, max_size=4)))
    got = fit_positions(rows, q_len, 128, tokens)
    want = [ref.fit_tokens(r, q_len, 128, tokens) for r in rows.tolist()]
    assert got.tolist() == want
    assert got.max() < q_len


@given(
    p=problems(max_len=1100),
    error=st.sampled_from([0.02, 0.1, 0.3]),
    final_block_pool=st.sampled_from([0, 16]),
    local=st.sampled_from([0, 1, 2]),
)
def test_fitted_mask_matches_reference(p, error, final_block_pool, local):
    cfg = dataclasses.replace(
        CFG, output_error=error, final_block_pool=final_block_pool, local_blocks=local
    )
    q, k, v = _qkv(p)
    mask = prism_block_mask(q, k, cfg, v=v, compiled=False)
    want, margin, _ = ref.fitted_selection(q, k, v, cfg)
    assert_clear_rows_equal(mask.to_dense().bool(), want, margin)


@given(p=problems(max_len=1100), e1=st.floats(0.01, 0.5), de=st.floats(0.0, 0.5))
def test_larger_error_selects_subset(p, e1, de):
    q, k, v = _qkv(p)
    tight = prism_block_mask(q, k, dataclasses.replace(CFG, output_error=e1), v=v, compiled=False)
    loose = prism_block_mask(
        q, k, dataclasses.replace(CFG, output_error=min(1.0, e1 + de)), v=v, compiled=False
    )
    assert torch.all(loose.to_dense() <= tight.to_dense())


def test_fit_keeps_the_error_of_the_sampled_tokens():
    """On the sampled tokens themselves, the chosen selection's output error is within the
    budget (what the fit promises), and a tighter budget never picks a lower threshold."""
    q, k, v = structured_qkv(1, 4, 2, 1000, 1000, 64, seed=3)
    _, _, thr_loose = ref.fitted_selection(q, k, v, dataclasses.replace(CFG, output_error=0.3))
    _, _, thr_tight = ref.fitted_selection(q, k, v, dataclasses.replace(CFG, output_error=0.03))
    assert torch.all(thr_tight >= thr_loose)
    assert set(thr_loose.flatten().tolist()) <= set(FIT_THRESHOLDS)
    assert thr_loose.min() < 1.0, "the input should let some head stop before 1.0"


def test_zero_values_take_the_first_candidate():
    q, k, v = structured_qkv(1, 2, 1, 700, 700, 32, seed=1)
    mask = prism_block_mask(q, k, CFG, v=torch.zeros_like(v), compiled=False)
    first = prism_block_mask(
        q,
        k,
        PrismConfig(
            dense_below=0,
            sparse_min_flops=0,
            high_threshold=FIT_THRESHOLDS[0],
            low_threshold=FIT_THRESHOLDS[0],
        ),
        compiled=False,
    )
    assert torch.equal(mask.to_dense(), first.to_dense())


def test_output_with_fit_matches_reference_attention():
    q, k, v = structured_qkv(1, 4, 2, 700, 700, 64, seed=5)
    out = prism_attention(q, k, v, CFG, compiled=False)
    table, margin, thr = ref.fitted_selection(q, k, v, CFG)
    # a fixed input whose every head is clear of other decisions, with varied thresholds
    assert (margin > MARGIN).all() and len(set(thr.flatten().tolist())) > 1
    assert torch.equal(prism_block_mask(q, k, CFG, v=v, compiled=False).to_dense().bool(), table)
    want = ref.attention(q, k, v, table, CFG.block_size)
    same = ref.attention(q, k, v, table, CFG.block_size, dtype=torch.float32)
    assert (out.double() - want).norm() <= 2 * (same.double() - want).norm() + 1e-6 * want.norm()


def test_fit_needs_v():
    q, k, _ = structured_qkv(1, 2, 1, 300, 300, 32)
    with pytest.raises(ValueError, match="pass v="):
        prism_block_mask(q, k, CFG)


@given(nk=st.integers(1, 300), samples=st.integers(1, 3), seed=st.integers(0, 99))
def test_pieces_partition_each_bucket_into_short_runs(nk, samples, seed):
    """fit_inputs on a synthetic nested selection: every visible key block lies in exactly one
    piece, a piece's blocks share one bucket, no piece holds more than ceil(Nk / FIT_SPLIT)
    blocks, the index tables list each piece's blocks, and the piece count stays bounded."""
    from prism_flex.fit import FIT_SPLIT, fit_pieces

    g = torch.Generator().manual_seed(seed)
    t_count, bs = len(FIT_THRESHOLDS), 128
    n_pieces = t_count + FIT_SPLIT
    # first candidate selecting each block (t_count: never, i.e. not visible)
    first = torch.randint(0, t_count + 1, (1, 2, samples, nk), generator=g)

    cand = torch.arange(t_count)[:, None]
    selected = (first[:, :, :, None, :] <= cand).flatten(2, 3)  # nested: (B, H, S * T, Nk)

    cfg = PrismConfig(fit_query_blocks=samples, fit_tokens=16)
    q = torch.randn(1, 2, nk * bs, 8)
    rows = fit_rows(nk, samples, "cpu")
    pos = fit_positions(rows, nk * bs, bs, 16)
    _, piece_of, piece_bucket, num, idx, _ = fit_pieces(cfg, selected, q, pos, nk * bs, nk * bs)
    size = -(-nk // FIT_SPLIT)
    visible = first < t_count
    assert torch.equal(piece_of < n_pieces, visible)
    for s in range(samples):
        for h in range(2):
            for p in range(n_pieces):
                blocks = (piece_of[0, h, s] == p).nonzero().flatten()
                row = s * n_pieces + p
                assert torch.equal(idx[0, h, row, : num[0, h, row]].long(), blocks)
                assert len(blocks) <= size
                if len(blocks):
                    assert torch.all(first[0, h, s, blocks] == piece_bucket[0, h, s, p])
                else:  # only the unused pieces, after the used ones, are empty
                    assert piece_bucket[0, h, s, p] == t_count


@given(p=problems(max_len=1100))
def test_plain_fit_attention_equals_flex_attention_over_the_pieces(p):
    """fit_attention_plain (CPU, eager) against FlexAttention over the repeated queries with
    each query block restricted to its piece (what the CUDA path computes from the block
    lists of fit_block_mask, whose agreement with the pieces test_pieces_... checks)."""
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    from prism_flex.attention import score_inputs
    from prism_flex.fit import FIT_SPLIT, fit_attention_plain, fit_inputs
    from prism_flex.pipeline import _fit_grid, _make_fit_samples
    from prism_flex.selection import Thresholds

    q, k, v = _qkv(p)
    cfg = CFG
    scores = score_inputs(q, k, cfg)
    rows, pos = _make_fit_samples(
        p["lq"], cfg.block_size, cfg.fit_query_blocks, cfg.fit_tokens, q.device
    )
    q_fit, piece_of, _, _, _, key_pos = fit_inputs(
        cfg, scores, q, _fit_grid(q.device), rows, pos, p["lq"], p["lkv"], Thresholds.of(cfg).fine
    )
    m, n_pieces = cfg.fit_tokens, len(FIT_THRESHOLDS) + FIT_SPLIT

    def in_piece(b, h, q_idx, kv_idx):
        block = q_idx // m
        same = piece_of[b, h, block // n_pieces, kv_idx // cfg.block_size] == block % n_pieces
        return same & (key_pos[q_idx] >= kv_idx)

    mask = create_block_mask(in_piece, p["b"], p["hq"], q_fit.shape[2], p["lkv"], device="cpu")
    want, aux = flex_attention(
        q_fit,
        k,
        v,
        block_mask=mask,
        enable_gqa=p["hq"] != p["hkv"],
        return_aux=AuxRequest(lse=True),
    )
    out, lse = fit_attention_plain(q_fit, k, v, piece_of, key_pos, cfg, None)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    seen = torch.isfinite(aux.lse)
    assert torch.equal(seen, torch.isfinite(lse))
    torch.testing.assert_close(lse[seen], aux.lse[seen], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_fit_inside_a_user_compiled_model():
    """PrismAttention with the fit, traced by the user's torch.compile (our custom op), equals
    the eager path; on CPU the fit's attention inside the op is the plain-PyTorch one (eager
    FlexAttention fails inside a custom op)."""
    from prism_flex import PrismAttention

    attn = PrismAttention(CFG)
    q, k, v = structured_qkv(1, 4, 2, 700, 900, 64, seed=2)
    fn = torch.compile(lambda q, k, v: attn(q, k, v) * 1.0, fullgraph=True)
    with torch.no_grad():
        got = fn(q, k, v)
    torch.testing.assert_close(
        got, prism_attention(q, k, v, CFG, compiled=False), rtol=1e-5, atol=1e-5
    )
