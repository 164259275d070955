"""The accuracy-evaluation estimators (eval/estimators.py) on small random inputs, no model."""

import math

import pytest
import torch

from eval import estimators as E
from prism_flex import PrismConfig

BS = 16


def _qk(lq=100, lkv=100, hq=4, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, lq, d, generator=g)
    k = torch.randn(1, hkv, lkv, d, generator=g)
    return q, k


def _cfg(thr=0.9):
    return PrismConfig(block_size=BS, high_threshold=thr, low_threshold=thr)


def _check_table(t, lq, lkv):
    allowed, diagonal = E.geometry(lq, lkv, BS, t.device)
    assert t.dtype == torch.bool
    assert t.shape[-2:] == allowed.shape
    assert not (t & ~allowed).any(), "selects a causally invisible block"
    assert t[..., :, 0].all(), "sink missing"
    assert (t | ~diagonal).all(), "diagonal missing"


@pytest.mark.parametrize("lq,lkv", [(100, 100), (70, 150)])
def test_tables_causal_with_sink_and_diagonal(lq, lkv):
    q, k = _qk(lq, lkv)
    mass = E.block_mass(q, k, BS)
    tables = {
        "prism": E.prism_table(q, k, _cfg()),
        "prism_nocal": E.prism_nocal_table(q, k, _cfg()),
        "meanpool": E.meanpool_table(q, k, _cfg()),
        "xattn": E.xattn_table(q, k, 0.9, BS, stride=4),
    }
    tables["oracle"] = E.oracle_table(mass, tables["prism"], lq, lkv, BS)
    for name, t in tables.items():
        assert t.shape == (1, 4, math.ceil(lq / BS), math.ceil(lkv / BS)), name
        _check_table(t, lq, lkv)
    # the oracle has the reference's block count per head, and at least its recall
    assert torch.equal(tables["oracle"].sum((-2, -1)), tables["prism"].sum((-2, -1)))
    r_or = E.recall_from_mass(mass, tables["oracle"], lq)
    r_pr = E.recall_from_mass(mass, tables["prism"], lq)
    assert (r_or >= r_pr - 1e-6).all()


def test_threshold_one_is_all_visible_blocks():
    q, k = _qk(90, 120)
    allowed, _ = E.geometry(90, 120, BS, q.device)
    full = allowed.expand(1, 4, *allowed.shape)
    assert torch.equal(E.xattn_table(q, k, 1.0, BS, stride=4), full)
    assert torch.equal(E.meanpool_table(q, k, _cfg(1.0)), full)
    assert torch.equal(E.density(full, 90, 120, BS), torch.ones(1, 4))


@pytest.mark.parametrize("lq,lkv", [(100, 100), (70, 150), (16, 150)])
def test_xattn_local_adds_the_blocks_before_the_diagonal(lq, lkv):
    q, k = _qk(lq, lkv)
    local = E.local_table(lq, lkv, BS, 1, q.device)
    allowed, diagonal = E.geometry(lq, lkv, BS, q.device)
    # one block per row, right before the row's first diagonal block (none before block 0)
    first = diagonal.int().argmax(-1)
    for r in range(local.shape[0]):
        want = {int(first[r]) - 1} if first[r] > 0 else set()
        assert set(local[r].nonzero().flatten().tolist()) == want, r
    plain = E.xattn_table(q, k, 0.5, BS, stride=4)
    got = E.xattn_table(q, k, 0.5, BS, stride=4, local_blocks=1)
    assert torch.equal(got, plain | (local & allowed))
    # the library keeps the same blocks (the sparsest Prism table, threshold ~0)
    tiny = PrismConfig(
        block_size=BS, high_threshold=1e-6, low_threshold=1e-6, final_block_pool=0, local_blocks=1
    )
    assert (E.prism_table(q, k, tiny) | ~local).all()


def test_oracle_full_density_and_recall_of_all_blocks():
    q, k = _qk(100, 100)
    allowed, _ = E.geometry(100, 100, BS, q.device)
    full = allowed.expand(1, 4, *allowed.shape)
    mass = E.block_mass(q, k, BS)
    assert torch.equal(E.oracle_table(mass, full, 100, 100, BS), full)
    assert abs(E.recall(q, k, full, BS) - 1.0) < 1e-6


def test_recall_matches_token_level():
    q, k = _qk(40, 56, hq=2, hkv=1, d=8, seed=3)
    lq, lkv = 40, 56
    g = torch.Generator().manual_seed(5)
    allowed, _ = E.geometry(lq, lkv, BS, q.device)
    table = (torch.rand(1, 2, *allowed.shape, generator=g) < 0.5) & allowed
    got = E.recall(q, k, table, BS)
    # direct: per query token, the softmax mass of the keys whose block is selected
    total = 0.0
    for h in range(2):
        for t in range(lq):
            pos = t + lkv - lq
            logits = (q[0, h, t] @ k[0, 0, : pos + 1].T) / math.sqrt(8)
            p = torch.softmax(logits.double(), -1)
            sel = torch.tensor([bool(table[0, h, t // BS, j // BS]) for j in range(pos + 1)])
            total += float(p[sel].sum())
    assert abs(got - total / (2 * lq)) < 1e-5


def test_antidiagonal_block_sums_match_naive_loop():
    bs, s = 8, 4
    q, k = _qk(24, 24, hq=2, hkv=1, d=4, seed=7)
    got = E.xattn_block_scores(q, k, bs, s)
    nb = 3
    want = torch.zeros(1, 2, nb, nb)
    for h in range(2):
        for i in range(nb):
            for j in range(nb):
                acc = 0.0
                # every s-th antidiagonal of each s x s tile: q row a, key col b with
                # (a mod s) + (b mod s) == s - 1
                for a in range(i * bs, (i + 1) * bs):
                    for b in range(j * bs, (j + 1) * bs):
                        if a % s + b % s == s - 1:
                            acc += float(q[0, h, a] @ k[0, 0, b])
                want[0, h, i, j] = acc
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_xattn_probs_rows_sum_to_one_and_block_mask_roundtrip():
    q, k = _qk(100, 130)
    p = E.xattn_block_probs(q, k, BS, 4)
    torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]), rtol=1e-5, atol=1e-5)
    t = E.xattn_table(q, k, 0.8, BS, 4)
    mask = E.table_to_block_mask(t, 100, 130, BS)
    assert torch.equal(mask.to_dense().bool(), t)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_xattn_attention_function_threshold_one_is_dense():
    from prism_flex import dense_causal_attention

    q, k = _qk(64, 64, hq=4, hkv=2, d=16, seed=11)
    v = torch.randn_like(k)
    fn = E.make_xattn_attention_function(
        1.0, block_size=BS, stride=4, dense_below=0, compiled=False
    )
    out, _ = fn(None, q, k, v, None, scaling=0.25)
    want = dense_causal_attention(q, k, v, scale=0.25).transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    fn = E.make_xattn_attention_function(
        0.5, block_size=BS, stride=4, dense_below=0, compiled=False
    )
    out, _ = fn(None, q, k, v, None, scaling=0.25)
    assert out.shape == (1, 64, 4, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("lq,lkv", [(100, 100), (70, 150)])
def test_subpool_at_block_granularity_is_meanpool(lq, lkv):
    import dataclasses

    q, k = _qk(lq, lkv, seed=3)
    cfg = dataclasses.replace(_cfg(0.8), dense_final_blocks=0, final_block_pool=0, local_blocks=0)
    want = E.meanpool_table(q, k, cfg)
    probs = E.subpool_block_probs(q, k, BS, BS, BS)
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
    assert torch.equal(E.subpool_table(q, k, 0.8, BS, BS, BS), want)
    for q_sub, k_sub in [(4, 16), (8, 4), (4, 4)]:
        _check_table(E.subpool_table(q, k, 0.8, BS, q_sub, k_sub), lq, lkv)


def test_block_moments_use_the_real_tokens_of_the_tail():
    x = torch.randn(1, 2, 37, 8, dtype=torch.float64)
    mean, var, count = E._block_moments(x, BS)
    assert count.tolist() == [16, 16, 5]
    tail = x[:, :, 32:].float()
    torch.testing.assert_close(mean[:, :, 2], tail.mean(2))
    torch.testing.assert_close(var[:, :, 2], tail.var(2, unbiased=False), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("lq,lkv", [(100, 100), (70, 150)])
def test_budget_experiments_are_valid_tables(lq, lkv):
    """meanvar, tcal, pcal and ecal (eval.gap's budget experiments): causal block
    distributions, and tables with sink and diagonal."""
    q, k = _qk(lq, lkv, seed=5)
    allowed, _ = E.geometry(lq, lkv, BS, q.device)
    probs = E.meanvar_block_probs(q, k, BS)
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
    assert not (probs * ~allowed).any()
    v = torch.randn(k.shape, generator=torch.Generator().manual_seed(6))
    for t in (
        E.meanvar_table(q, k, 0.9, BS),
        E.tcal_table(q, k, 0.9, BS),
        E.pcal_table(q, k, 0.9, BS),
        E.ecal_table(q, k, v, 0.9, BS),
    ):
        assert t.shape == (1, 4, math.ceil(lq / BS), math.ceil(lkv / BS))
        _check_table(t, lq, lkv)


@pytest.mark.parametrize("lq,lkv", [(100, 100), (70, 150)])
def test_sampled_row_partials_give_the_exact_attention(lq, lkv):
    """ecal's per-key-block partial sums: all blocks together are exact causal attention of
    the sampled query blocks (bottom-right aligned)."""
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    q, k = _qk(lq, lkv, seed=7)
    v = torch.randn(k.shape, generator=torch.Generator().manual_seed(8))
    rows = torch.tensor([1, math.ceil(lq / BS) - 1])
    s, w = E._sampled_row_partials(q, k, v, rows, BS, q.shape[-1] ** -0.5)
    ref = F.scaled_dot_product_attention(
        q, k, v, attn_mask=causal_lower_right(lq, lkv), enable_gqa=True
    )
    idx = torch.cat([torch.arange(r * BS, min(lq, (r + 1) * BS)) for r in rows.tolist()])
    torch.testing.assert_close(w.sum(3) / s.sum(3)[..., None], ref[:, :, idx])


def _flashprefill_naive(q, k, alpha, bs, sink=2, local=4, dense_last=2):
    """The FlashPrefill-style rule, loop by loop in float64: mean-pooled q·k / sqrt(D),
    softmax over visible blocks, keep >= alpha x row max; sink, local window ending at the
    diagonal, last query blocks dense; causal."""
    b, hq, lq, d = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    allowed, diagonal = E.geometry(lq, lkv, bs, q.device)
    nq, nk = allowed.shape
    out = torch.zeros(b, hq, nq, nk, dtype=torch.bool)
    for h in range(hq):
        kh = h // (hq // hkv)
        qp = [q[0, h, i * bs : (i + 1) * bs].double().mean(0) for i in range(nq)]
        kp = [k[0, kh, j * bs : (j + 1) * bs].double().mean(0) for j in range(nk)]
        for i in range(nq):
            vis = [j for j in range(nk) if allowed[i, j]]
            logits = torch.stack([qp[i] @ kp[j] / math.sqrt(d) for j in vis])
            p = torch.softmax(logits, 0)
            keep = {j for j, pj in zip(vis, p.tolist()) if pj >= alpha * float(p.max())}
            first = int(torch.nonzero(diagonal[i]).min())
            keep |= set(range(min(sink, nk))) | set(range(max(0, first - local + 1), first + 1))
            keep |= set(torch.nonzero(diagonal[i]).flatten().tolist())
            if i >= nq - dense_last:
                keep |= set(vis)
            for j in keep:
                out[0, h, i, j] = bool(allowed[i, j])
    return out


@pytest.mark.parametrize("lq,lkv", [(200, 200), (150, 260), (33, 33)])
@pytest.mark.parametrize("alpha", [0.05, 0.3, 0.9])
def test_flashprefill_matches_naive_loop(lq, lkv, alpha):
    q, k = _qk(lq, lkv, seed=3)
    got = E.flashprefill_table(q, k, alpha, BS)
    _check_table(got, lq, lkv)
    assert torch.equal(got, _flashprefill_naive(q, k, alpha, BS))


def test_flashprefill_alpha_zero_is_dense_and_alpha_monotone():
    q, k = _qk(300, 300, seed=4)
    allowed, _ = E.geometry(300, 300, BS, q.device)
    tables = [E.flashprefill_table(q, k, a, BS) for a in (0.0, 0.05, 0.2, 1.0)]
    assert torch.equal(tables[0], allowed.expand_as(tables[0]))
    for wide, narrow in zip(tables, tables[1:]):
        assert torch.all(narrow <= wide)
    last = tables[-1]
    assert torch.equal(last[..., -2:, :], allowed[-2:].expand_as(last[..., -2:, :]))
    assert torch.all(last[..., :2] >= allowed[:, :2])  # 2 sink blocks wherever visible
