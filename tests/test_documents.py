"""Padded batches and packed documents (key_padding_mask, document_ids, cu_seqlens) against
the float64 reference (``testing.document_selection``), on the eager path; one compiled
check (slow)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from prism_flex import PrismConfig, prism_attention, prism_block_mask
from prism_flex import testing as ref

from .conftest import MARGIN, structured_qkv

BS = 16
CFG = PrismConfig(
    block_size=BS,
    final_block_pool=8,
    high_threshold=0.8,
    low_threshold=0.8,
    dense_below=0,
    sparse_min_flops=0,
)


@st.composite
def rows(draw, max_len=240):
    """``(ids, kv_len)``: int64 ``(B, Lkv)`` document ids per token, -1 for padding (left,
    right or inside), each document one contiguous run."""
    b = draw(st.integers(1, 2))
    kv_len = draw(st.integers(1, max_len))
    out = []
    for _ in range(b):
        cuts = sorted(draw(st.sets(st.integers(1, max(1, kv_len - 1)), max_size=4)))
        cuts = [c for c in cuts if 0 < c < kv_len]
        doc = torch.zeros(kv_len, dtype=torch.long)
        for c in cuts:
            doc[c:] += 1
        doc = doc * 3 + 7  # ids need not start at 0 or be consecutive
        left = draw(st.integers(0, kv_len // 3))
        right = draw(st.integers(0, kv_len // 3))
        doc[:left] = -1
        doc[kv_len - right :] = -1
        if draw(st.booleans()) and kv_len > 4:  # a hole inside a document
            a = draw(st.integers(0, kv_len - 2))
            doc[a : a + draw(st.integers(1, 3))] = -1
        out.append(doc)
    return torch.stack(out), kv_len


@st.composite
def problems(draw):
    ids, kv_len = draw(rows())
    q_len = draw(st.just(kv_len) | st.integers(1, kv_len))
    hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2]))
    return dict(
        ids=ids, lq=q_len, lkv=kv_len, hkv=hkv, hq=hkv * group, seed=draw(st.integers(0, 99))
    )


def _qkv(p, dtype=torch.float32):
    b = p["ids"].shape[0]
    return structured_qkv(
        b, p["hq"], p["hkv"], p["lq"], p["lkv"], 32, seed=p["seed"], dtype=dtype, block_size=BS
    )


def _args(ids):
    """The public form: document ids with -1 replaced (any id) plus a padding mask."""
    return dict(key_padding_mask=ids >= 0, document_ids=torch.where(ids >= 0, ids, 0))


def _assert_clear_equal(got, want, margin):
    clear = margin > MARGIN
    assert torch.equal(got[clear], want[clear])


@given(p=problems(), fine=st.sampled_from([0, 8]), local=st.integers(0, 1), final=st.integers(0, 1))
def test_mask_matches_reference(p, fine, local, final):
    cfg = dataclasses.replace(
        CFG, final_block_pool=fine, local_blocks=local, dense_final_blocks=final
    )
    q, k, _ = _qkv(p)
    mask = prism_block_mask(q, k, cfg, compiled=False, **_args(p["ids"]))
    want, margin = ref.document_selection(q, k, p["ids"], cfg)
    _assert_clear_equal(mask.to_dense().bool(), want, margin)


@given(p=problems())
def test_no_block_crosses_a_boundary(p):
    """Full blocks hold only pairs the token rule allows; every chosen block holds one."""
    q, k, _ = _qkv(p)
    mask = prism_block_mask(q, k, CFG, compiled=False, **_args(p["ids"]))
    tok = ref.document_token_mask(p["ids"], p["lq"])  # (B, Lq, Lkv)
    b, hq, nq = mask.kv_num_blocks.shape
    for bi in range(b):
        for h in range(hq):
            for i in range(nq):
                qs = slice(i * BS, (i + 1) * BS)
                full = mask.full_kv_indices[bi, h, i, : mask.full_kv_num_blocks[bi, h, i]]
                part = mask.kv_indices[bi, h, i, : mask.kv_num_blocks[bi, h, i]]
                for j in full.tolist():
                    assert tok[bi, qs, j * BS : (j + 1) * BS].all()
                for j in full.tolist() + part.tolist():
                    assert tok[bi, qs, j * BS : (j + 1) * BS].any()
    # The mask_mod is the token rule.
    mm = mask.mask_mod
    qi = torch.arange(p["lq"])[:, None]
    ki = torch.arange(p["lkv"])[None, :]
    for bi in range(b):
        got = mm(torch.tensor(bi), torch.tensor(0), qi, ki)
        assert torch.equal(got, tok[bi])


@given(p=problems(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_output_matches_reference_within_its_own_dtype_error(p, dtype):
    q, k, v = _qkv(p, dtype)
    args = _args(p["ids"])
    out, density = prism_attention(q, k, v, CFG, return_density=True, compiled=False, **args)
    table = prism_block_mask(q, k, CFG, compiled=False, **args).to_dense().bool()
    want = ref.document_attention(q, k, v, p["ids"], table, BS)
    same_dtype = ref.document_attention(q, k, v, p["ids"], table, BS, dtype=dtype)
    err = (out.double() - want).norm()
    ref_err = (same_dtype.double() - want).norm()
    assert err <= 2 * ref_err + 1e-6 * want.norm() + 1e-12
    padded_queries = p["ids"][:, p["lkv"] - p["lq"] :] < 0
    assert torch.all(out.transpose(1, 2)[padded_queries] == 0)
    assert torch.all((density >= 0) & (density <= 1))


def _dense_with_rule(q, k, v, ids, dtype=torch.float64):
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    tok = ref.document_token_mask(ids, q.shape[2])[:, None]
    out = F.scaled_dot_product_attention(q.to(dtype), kk.to(dtype), vv.to(dtype), attn_mask=tok)
    return out.nan_to_num(0.0) * tok.any(-1, keepdim=True)


@pytest.mark.parametrize("dense_path", [False, True])
@given(p=problems())
def test_threshold_one_and_the_dense_path_equal_masked_sdpa(p, dense_path):
    q, k, v = _qkv(p)
    if dense_path:  # the size rule sends the call to SDPA with the boolean mask
        cfg = PrismConfig(block_size=BS)
    else:
        cfg = dataclasses.replace(CFG, high_threshold=1.0, low_threshold=1.0)
    out = prism_attention(q, k, v, cfg, compiled=False, **_args(p["ids"]))
    want = _dense_with_rule(q, k, v, p["ids"])
    same = _dense_with_rule(q, k, v, p["ids"], torch.float32).double()
    err, ref_err = (out.double() - want).norm(), (same - want).norm()
    assert err <= 2 * ref_err + 1e-6 * want.norm() + 1e-12


def test_dense_path_with_grad_honours_documents():
    ids = torch.tensor([[-1, -1, 0, 0, 0, 1, 1, 1, 1, -1]])
    q, k, v = structured_qkv(1, 2, 1, 10, 10, 32, seed=3, block_size=BS)
    q.requires_grad_(True)
    with pytest.warns(UserWarning, match="inference only"):
        out = prism_attention(q, k, v, CFG, compiled=False, **_args(ids))
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    torch.testing.assert_close(out.detach(), _dense_with_rule(q.detach(), k, v, ids).float())


@given(
    lens=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    hkv=st.integers(1, 2),
    seed=st.integers(0, 99),
    fine=st.sampled_from([0, 8]),
)
def test_packed_block_aligned_documents_equal_one_by_one(lens, hkv, seed, fine):
    """A packed row (cu_seqlens) of documents whose lengths are multiples of the block size
    selects exactly what each document selects alone."""
    cfg = dataclasses.replace(CFG, final_block_pool=fine, dense_final_blocks=1)
    cu = torch.tensor([0] + lens).cumsum(0) * BS
    length = int(cu[-1])
    q, k, v = structured_qkv(1, 2 * hkv, hkv, length, length, 32, seed=seed, block_size=BS)
    packed = prism_block_mask(q, k, cfg, compiled=False, cu_seqlens=cu).to_dense().bool()
    out = prism_attention(q, k, v, cfg, compiled=False, cu_seqlens=cu)
    ids = torch.searchsorted(cu[1:], torch.arange(length), right=True)[None]
    _, margin = ref.document_selection(q, k, ids, cfg)
    for a, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        s = slice(a, e)
        alone = prism_block_mask(q[:, :, s], k[:, :, s], cfg, compiled=False).to_dense().bool()
        blocks = slice(a // BS, e // BS)
        clear = margin[:, :, blocks] > MARGIN
        assert torch.equal(packed[:, :, blocks, blocks][clear], alone[clear])
        assert not packed[:, :, blocks, : a // BS].any()  # nothing from earlier documents
        o = prism_attention(q[:, :, s], k[:, :, s], v[:, :, s], cfg, compiled=False)
        if bool(clear.all()):
            torch.testing.assert_close(out[:, :, s], o)


@given(
    lengths=st.lists(st.integers(1, 120), min_size=2, max_size=3),
    left=st.booleans(),
    seed=st.integers(0, 99),
    threshold=st.sampled_from([0.8, 1.0]),
)
def test_padded_batch_row_equals_the_sequence_alone(lengths, left, seed, threshold):
    """Right padding of any length, or left padding by whole blocks: row i's mask equals its
    sequence's alone, and its output within twice the reference error, whatever the others."""
    cfg = dataclasses.replace(CFG, high_threshold=threshold, low_threshold=threshold)
    if left:
        lengths = [BS * (1 + n // 40) for n in lengths]
    width = max(lengths)
    b = len(lengths)
    q, k, v = structured_qkv(b, 4, 2, width, width, 32, seed=seed, block_size=BS)
    pad = torch.zeros(b, width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        if left:
            pad[i, width - n :] = True
        else:
            pad[i, :n] = True
    batch_mask = prism_block_mask(q, k, cfg, compiled=False, key_padding_mask=pad)
    batch_out = prism_attention(q, k, v, cfg, compiled=False, key_padding_mask=pad)
    table = batch_mask.to_dense().bool()
    for i, n in enumerate(lengths):
        s = slice(width - n, width) if left else slice(0, n)
        qi, ki, vi = q[i : i + 1, :, s], k[i : i + 1, :, s], v[i : i + 1, :, s]
        alone = prism_block_mask(qi, ki, cfg, compiled=False).to_dense().bool()
        want_out = prism_attention(qi, ki, vi, cfg, compiled=False)
        _, margin = ref.selection(qi, ki, cfg)
        nb = alone.shape[-1]
        blocks = slice(table.shape[-1] - nb, None) if left else slice(0, nb)
        clear = margin > MARGIN
        assert torch.equal(table[i : i + 1, :, blocks, blocks][clear], alone[clear])
        assert not table[i, :, blocks][..., : blocks.start or 0].any()
        exact = ref.attention(qi, ki, vi, alone, BS)
        same = ref.attention(qi, ki, vi, alone, BS, dtype=torch.float32)
        err = (batch_out[i : i + 1, :, s].double() - exact).norm()
        ref_err = (same.double() - exact).norm()
        if bool(clear.all()):
            assert err <= 2 * ref_err + 1e-6 * exact.norm() + 1e-12
        assert (want_out.double() - exact).norm() <= 2 * ref_err + 1e-6 * exact.norm() + 1e-12
        assert torch.all(batch_out[i, :, :, :][:, ~pad[i]] == 0)


def _small():
    return structured_qkv(1, 2, 1, 40, 40, 32, seed=0, block_size=BS)


def test_validation_errors():
    q, k, v = _small()
    call = lambda **kw: prism_attention(q, k, v, CFG, compiled=False, **kw)  # noqa: E731
    with pytest.raises(TypeError, match="torch.bool"):
        call(key_padding_mask=torch.ones(1, 40, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(batch, kv_len\) = \(1, 40\)"):
        call(key_padding_mask=torch.ones(1, 39, dtype=torch.bool))
    with pytest.raises(ValueError, match="not both"):
        call(document_ids=torch.zeros(1, 40, dtype=torch.long), cu_seqlens=torch.tensor([0, 40]))
    with pytest.raises(TypeError, match="integer"):
        call(document_ids=torch.zeros(1, 40))
    with pytest.raises(ValueError, match="contiguous run"):
        ids = torch.zeros(1, 40, dtype=torch.long)
        ids[0, 10:20] = 1
        call(document_ids=ids)
    for bad in ([0, 10, 10, 40], [0, 30, 20, 40], [1, 40], [0, 39], [0, 41]):
        with pytest.raises(ValueError, match="strictly increase"):
            call(cu_seqlens=torch.tensor(bad))
    with pytest.raises(ValueError, match=">= 2"):
        call(cu_seqlens=torch.tensor([0]))
    with pytest.raises(TypeError, match="1-D integer"):
        call(cu_seqlens=torch.tensor([0.0, 40.0]))
    with pytest.raises(TypeError, match="1-D integer"):
        call(cu_seqlens=torch.tensor([[0, 40]]))
    with pytest.raises(ValueError, match="must be on cpu, got meta"):
        call(cu_seqlens=torch.tensor([0, 40], device="meta"))
    q2, k2, v2 = structured_qkv(2, 2, 1, 40, 40, 32, seed=0, block_size=BS)
    with pytest.raises(ValueError, match="batch must be 1"):
        prism_attention(q2, k2, v2, CFG, compiled=False, cu_seqlens=torch.tensor([0, 40]))
    fit = dataclasses.replace(CFG, output_error=0.1, fit_tokens=16)
    with pytest.raises(NotImplementedError, match="output_error"):
        prism_attention(q, k, v, fit, compiled=False, cu_seqlens=torch.tensor([0, 20, 40]))
    # Padding with document ids inside a document's run is fine (a hole, not a new run).
    ids = torch.zeros(1, 40, dtype=torch.long)
    ids[0, 20:] = 1
    ids[0, 5:8] = 1  # an id inside a padded stretch does not count
    kpm = torch.ones(1, 40, dtype=torch.bool)
    kpm[0, 5:8] = False
    call(document_ids=ids, key_padding_mask=kpm)


def test_an_all_padding_row_outputs_zeros():
    q, k, v = structured_qkv(2, 2, 1, 40, 40, 32, seed=0, block_size=BS)
    kpm = torch.ones(2, 40, dtype=torch.bool)
    kpm[1] = False
    out, density = prism_attention(
        q, k, v, CFG, compiled=False, key_padding_mask=kpm, return_density=True
    )
    assert torch.all(out[1] == 0) and torch.isfinite(out).all()
    assert torch.all(density[1] == 0)


@pytest.mark.slow
def test_compiled_equals_eager():
    ids = torch.tensor([[-1] * 20 + [0] * 70 + [1] * 100 + [2] * 50 + [-1] * 16])
    length = ids.shape[1]
    q, k, v = structured_qkv(1, 4, 2, length, length, 32, seed=5, block_size=BS)
    args = _args(ids)
    eager = prism_block_mask(q, k, CFG, compiled=False, **args).to_dense()
    compiled = prism_block_mask(q, k, CFG, **args).to_dense()
    assert torch.equal(eager, compiled)
    out_e = prism_attention(q, k, v, CFG, compiled=False, **args)
    out_c = prism_attention(q, k, v, CFG, **args)
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
    # cu_seqlens gives the same as document_ids.
    cu = torch.tensor([0, 90, 190, 256])
    a = prism_block_mask(q, k, CFG, compiled=False, cu_seqlens=cu).to_dense()
    ids2 = torch.searchsorted(cu[1:], torch.arange(length), right=True)[None]
    b = prism_block_mask(q, k, CFG, compiled=False, document_ids=ids2).to_dense()
    assert torch.equal(a, b)


def test_module_takes_padding_and_documents():
    """PrismAttention forwards the three arguments (the default config sends this small call
    to the dense path: no compile on CPU)."""
    from prism_flex import PrismAttention

    q, k, v = _small()
    attn = PrismAttention(PrismConfig(block_size=BS))
    kpm = torch.ones(1, 40, dtype=torch.bool)
    kpm[0, :7] = False
    cu = torch.tensor([0, 25, 40])
    ids = torch.searchsorted(cu[1:], torch.arange(40), right=True)[None]
    want = _dense_with_rule(q, k, v, torch.where(kpm, ids, -1)).float()
    torch.testing.assert_close(attn(q, k, v, key_padding_mask=kpm, cu_seqlens=cu), want)
    torch.testing.assert_close(attn(q, k, v, key_padding_mask=kpm, document_ids=ids), want)
    with pytest.raises(NotImplementedError, match="key_padding_mask="):
        attn(q, k, v, attn_mask=kpm)


@pytest.mark.slow
def test_traced_in_a_user_compile_equals_eager_and_asserts():
    """Inside a user's torch.compile (fullgraph) the documents call is one custom op; value
    checks become run-time asserts."""
    ids = torch.tensor([[-1] * 20 + [0] * 70 + [1] * 100 + [2] * 50 + [-1] * 16])
    length = ids.shape[1]
    q, k, v = structured_qkv(1, 4, 2, length, length, 32, seed=5, block_size=BS)
    kpm, doc = ids >= 0, ids.clamp_min(0)

    def f(q, k, v, m, d):
        return prism_attention(q, k, v, CFG, key_padding_mask=m, document_ids=d)

    compiled = torch.compile(f, fullgraph=True)
    want = prism_attention(q, k, v, CFG, compiled=False, key_padding_mask=kpm, document_ids=doc)
    torch.testing.assert_close(compiled(q, k, v, kpm, doc), want, atol=1e-5, rtol=1e-5)
    bad = doc.clone()
    bad[0, 30:40] = 2
    with pytest.raises(RuntimeError, match="contiguous run"):
        compiled(q, k, v, kpm, bad)


def _dense_tables(tables, nk):
    """Bool ``(B, H, R, Nk)`` of the blocks a ``BlockTables`` lists (partial, full)."""

    def dense(num, idx):
        listed = torch.arange(nk) < num[..., None]
        return torch.zeros(idx.shape, dtype=torch.bool).scatter(-1, idx.long(), listed)

    return dense(tables.partial_num, tables.partial_idx), dense(tables.full_num, tables.full_idx)


@given(problems(), st.integers(1, 4), st.integers(1, 400))
def test_key_windows_cover_the_visible_blocks_and_select_as_full_width(p, min_rows, budget):
    """Each chunk of :func:`documents.key_windows` holds every key block its rows can see, the
    chunks partition the query blocks, and the selection scored on the chunks' columns only
    equals the full-width selection (the documents path of prism_block_mask and
    prism_attention)."""
    from prism_flex import documents, pipeline
    from prism_flex._compile import Mode
    from prism_flex.selection import Thresholds

    q, k, _ = _qkv(p)
    seg = documents.make_segments(
        **_args(p["ids"]), cu_seqlens=None, batch=q.shape[0], kv_len=p["lkv"], device=q.device,
        check_values=True,
    )  # fmt: skip
    layout, scores = pipeline._document_scores(q, k, CFG, seg, Mode.EAGER)
    nq, nk = layout.q_lo.shape[1], layout.k_lo.shape[1]
    windows = documents.key_windows(layout, p["lq"], p["lkv"], BS, budget, min_rows)
    assert [w[0] for w in windows] == [sum(w[1] for w in windows[:i]) for i in range(len(windows))]
    assert sum(w[1] for w in windows) == nq
    args = (p["lq"], p["lkv"], *Thresholds.of(CFG)[:2])
    parts = []
    for start, n, col, width in windows:
        assert 0 <= col and width >= min(2, nk) and col + width <= nk
        rows_ = torch.arange(start, start + n)
        allowed, _ = documents._allowed(layout, rows_)
        assert not allowed[..., :col].any() and not allowed[..., col + width :].any()
        parts.append(
            documents.select_document_tables(CFG, scores, layout, start, n, *args, col, width)
        )
    full = documents.select_document_tables(CFG, scores, layout, 0, nq, *args)
    windowed = [torch.cat(t, dim=2) for t in zip(*parts)]
    for got, want in zip(_dense_tables(type(full)(*windowed), nk), _dense_tables(full, nk)):
        assert torch.equal(got, want)


@pytest.mark.slow  # compiles the documents stages on CPU (~15 s)
def test_compiled_packed_calls_of_other_layouts_compile_nothing_new():
    """After one packed call, other document layouts (other chunk windows, one document: the
    whole width) reuse the compiled graphs: the windows are gathered, never sliced."""
    from torch._dynamo.utils import counters

    def call(lens):
        total = sum(lens)
        gen = torch.Generator().manual_seed(total)
        q = torch.randn(1, 4, total, 32, generator=gen)
        k, v = torch.randn(1, 2, total, 32, generator=gen), torch.randn(1, 2, total, 32)
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
        with torch.no_grad():
            prism_attention(q, k, v, CFG, cu_seqlens=cu)

    # Documents averaging under SPLIT_MIN_BLOCKS blocks (the trailing 64-token one): the
    # windowed selection, not one call per document.
    call([1024, 1024, 1024, 64])  # windows of 64 query blocks
    before = counters["stats"]["unique_graphs"]
    for lens in ([2048, 1024, 512, 512, 64], [1100, 900, 2000, 64], [4096]):
        call(lens)
    assert counters["stats"]["unique_graphs"] == before


def _split_case(lens, seed=0):
    cu = torch.tensor([0] + lens).cumsum(0)
    length = int(cu[-1])
    q, k, v = structured_qkv(1, 4, 2, length, length, 32, seed=seed, block_size=BS)
    return q, k, v, cu


def _one_by_one(q, k, v, cu, cfg, compiled):
    outs, chosen, visible = [], 0.0, 0
    for a, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        o, d = prism_attention(
            *(t[:, :, a:e] for t in (q, k, v)), cfg, compiled=compiled, return_density=True
        )
        nq = -(-(e - a) // BS)
        pairs = nq * (nq + 1) // 2
        outs.append(o)
        chosen, visible = chosen + d * pairs, visible + pairs
    return torch.cat(outs, 2), chosen / visible


@pytest.mark.parametrize(
    "lens", [[1000, 1100, 1300], [3000, 200], [2048, 2048], [1024, 2048, 300], [2048, 256, 1024]]
)
def test_packed_long_documents_run_one_call_each(lens):
    """Documents averaging at least SPLIT_MIN_BLOCKS blocks run as separate calls: the packed
    output is exactly the separate calls' (block-aligned or not, a short one dense by the size
    rule of its own length)."""
    from prism_flex.pipeline import SPLIT_MIN_BLOCKS

    assert sum(lens) >= len(lens) * SPLIT_MIN_BLOCKS * BS
    cfg = dataclasses.replace(CFG, dense_below=256)
    q, k, v, cu = _split_case(lens)
    out, density = prism_attention(q, k, v, cfg, compiled=False, cu_seqlens=cu, return_density=True)
    want, want_density = _one_by_one(q, k, v, cu, cfg, compiled=False)
    torch.testing.assert_close(density, want_density)
    ids = torch.searchsorted(cu[1:], torch.arange(int(cu[-1])), right=True)[None]
    by_ids = prism_attention(q, k, v, cfg, compiled=False, document_ids=ids)
    if any(a % BS for a in cu[:-1].tolist()):  # a document starting inside a block
        # One call per document on views: the separate calls' own arithmetic.
        assert torch.equal(out, want) and torch.equal(by_ids, want)
    else:
        # Block-aligned: one kernel over the row, whose eager form sums each softmax over
        # the whole (masked) row: the same blocks, float rounding apart.
        torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
        assert torch.equal(by_ids, out)


@pytest.mark.parametrize("lens", [[1000, 1100, 1300], [1024, 2048, 304], [3000, 200]])
def test_packed_documents_too_long_for_one_selection_graph(lens):
    """Documents whose selection is chunked (``max_score_elements``) keep their own chunked
    call (unaligned) or per-document tables (aligned): still the separate calls' output."""
    cfg = dataclasses.replace(CFG, dense_below=256, max_score_elements=4 * 100 * 150)
    q, k, v, cu = _split_case(lens)
    out, density = prism_attention(q, k, v, cfg, compiled=False, cu_seqlens=cu, return_density=True)
    want, want_density = _one_by_one(q, k, v, cu, cfg, compiled=False)
    assert torch.equal(out, want)
    torch.testing.assert_close(density, want_density)


@settings(max_examples=6, deadline=None)
@given(
    blocks=st.lists(st.integers(40, 120), min_size=2, max_size=3),
    shifts=st.lists(st.integers(1, BS - 1), min_size=3, max_size=3),
    aligned=st.booleans(),
    hkv=st.integers(1, 2),
    seed=st.integers(0, 99),
)
def test_packed_long_documents_property(blocks, shifts, aligned, hkv, seed):
    """Long documents (the per-document paths), aligned or not, some dense by the size rule:
    the separate calls' output (aligned: one kernel over the row, float rounding apart in its
    eager form; unaligned: exactly) and density."""
    from prism_flex.pipeline import SPLIT_MIN_BLOCKS

    lens = [b * BS + (0 if aligned else s) for b, s in zip(blocks, shifts)]
    assume(sum(lens) >= len(lens) * SPLIT_MIN_BLOCKS * BS)
    cfg = dataclasses.replace(CFG, dense_below=900)
    cu = torch.tensor([0] + lens).cumsum(0)
    q, k, v = structured_qkv(
        1, 2 * hkv, hkv, int(cu[-1]), int(cu[-1]), 32, seed=seed, block_size=BS
    )
    out, density = prism_attention(q, k, v, cfg, compiled=False, cu_seqlens=cu, return_density=True)
    want, want_density = _one_by_one(q, k, v, cu, cfg, compiled=False)
    torch.testing.assert_close(density, want_density)
    if aligned:
        torch.testing.assert_close(out, want)
    else:
        assert torch.equal(out, want)


@pytest.mark.slow
@pytest.mark.parametrize("lens", [[1000, 1100, 1300], [1024, 2048, 304]])
def test_packed_long_documents_compiled_equal_separate_compiled_calls(lens):
    """Compiled, exactly the separate calls' output: one call per document (unaligned) and
    one kernel over the row with narrow tables (block-aligned)."""
    q, k, v, cu = _split_case(lens, seed=1)
    with torch.no_grad():
        out = prism_attention(q, k, v, CFG, cu_seqlens=cu)
        want, _ = _one_by_one(q, k, v, cu, CFG, compiled=True)
    assert torch.equal(out, want)
