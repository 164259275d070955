import torch
from hypothesis import given
from hypothesis import strategies as st

from prism_flex import testing as ref
from prism_flex.block_mask import compact_blocks
from prism_flex.selection import combine_selection, top_p_select


@st.composite
def dyadic_rows(draw, max_rows=6, max_cols=24):
    """Probability rows made of multiples of 1/2^k: sums are exact in float32 and float64,
    so the reference and the fast path must agree bit for bit, ties included."""
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.integers(1, max_cols))
    weights = draw(
        st.lists(
            st.lists(st.integers(0, 8), min_size=cols, max_size=cols), min_size=rows, max_size=rows
        )
    )
    w = torch.tensor(weights, dtype=torch.float64)
    w[:, 0] += 1  # every row has some mass
    # Pad each row's total to a power of two with an extra column so that p = w / 2^k exactly.
    total = w.sum(-1)
    pow2 = 2.0 ** torch.ceil(torch.log2(total))
    w = torch.cat([w, (pow2 - total)[:, None]], dim=-1)
    return (w / pow2[:, None]).float()


thresholds = st.sampled_from([0.05, 0.25, 0.5, 0.75, 0.875, 0.95, 1.0]) | st.floats(0.01, 1.0)


@given(probs=dyadic_rows(), threshold=thresholds)
def test_top_p_matches_reference_exactly(probs, threshold):
    got = top_p_select(probs, threshold)
    for r in range(probs.shape[0]):
        kept, _ = ref.top_p_row(probs[r].double().tolist(), threshold)
        assert set(torch.nonzero(got[r]).flatten().tolist()) == kept


def test_ties_at_the_cut_are_all_kept_and_crossing_block_is_kept():
    probs = torch.tensor([[0.25, 0.125, 0.125, 0.125, 0.125, 0.25]])
    # 0.25 + 0.25 = 0.5 >= 0.3: the two 0.25 blocks (tied) suffice, both kept.
    assert top_p_select(probs, 0.3).tolist() == [[True, False, False, False, False, True]]
    # Mass above each 0.125 block is 0.5 < 0.55: all four tied blocks are kept.
    assert top_p_select(probs, 0.55).tolist() == [[True] * 6]
    # Exactly 0.5 above the 0.125 blocks, not below 0.5: they are dropped.
    assert top_p_select(probs, 0.5).tolist() == [[True, False, False, False, False, True]]


def test_top_p_is_column_order_independent():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randint(0, 4, (16, 33), generator=g).float(), dim=-1)
    perm = torch.randperm(33, generator=g)
    for threshold in (0.3, 0.8, 0.95):
        assert torch.equal(
            top_p_select(probs, threshold)[:, perm], top_p_select(probs[:, perm], threshold)
        )


def test_top_p_matches_sorted_prefix_for_distinct_values():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(3 * torch.randn(64, 300, generator=g), dim=-1)
    for threshold in (0.1, 0.5, 0.9, 0.95, 0.99):
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        want = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before < threshold)
        assert torch.equal(top_p_select(probs, threshold), want)


@given(probs=dyadic_rows(), t1=thresholds, t2=thresholds)
def test_higher_threshold_selects_superset(probs, t1, t2):
    lo, hi = sorted((t1, t2))
    assert torch.all(top_p_select(probs, lo) <= top_p_select(probs, hi))


def test_threshold_one_keeps_every_block_even_with_float_rounding():
    probs = torch.softmax(torch.tensor([[30.0, 0.0, -20.0, -80.0]]), dim=-1)
    assert top_p_select(probs, 1.0).all()


def test_combine_forces_sink_and_diagonal_within_causal_blocks():
    allowed = torch.tensor([[True, False, False], [True, True, False], [True, True, True]])
    diagonal = torch.eye(3, dtype=torch.bool)
    none = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    anything = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    assert torch.equal(
        combine_selection(anything, none, allowed, diagonal, False, False)[0, 0], allowed
    )
    forced = combine_selection(none, none, allowed, diagonal, True, True)[0, 0]
    assert forced.tolist() == [[True, False, False], [True, True, False], [True, False, True]]


@given(st.data())
def test_compact_blocks_lists_true_columns_in_order(data):
    shape = (
        data.draw(st.integers(1, 2)),
        data.draw(st.integers(1, 3)),
        data.draw(st.integers(1, 5)),
        data.draw(st.integers(1, 17)),
    )
    table = torch.rand(
        shape, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 10**6)))
    ) < data.draw(st.floats(0.0, 1.0))
    num, idx = compact_blocks(table)
    assert num.dtype == idx.dtype == torch.int32
    assert idx.shape == table.shape and idx.is_contiguous()
    for pos in torch.cartesian_prod(*[torch.arange(n) for n in shape[:-1]]).view(-1, 3).tolist():
        row = table[tuple(pos)]
        n = int(num[tuple(pos)])
        assert idx[tuple(pos)][:n].tolist() == torch.nonzero(row).flatten().tolist()
        assert idx[tuple(pos)][n:].tolist() == torch.nonzero(~row).flatten().tolist()
