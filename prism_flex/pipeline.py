"""One Prism call, stage after stage: pooling -> scoring -> selection -> tables -> attention.

The public functions in ``attention.py`` check their inputs, decide the :class:`Mode` and
call these. Compile boundaries (``_compile.py`` runs them):

- the block means of Q and K (``scoring.pool_blocks``) run eagerly: ATen's reduction reads
  Q faster than inductor's code for it (H200, Llama shape at 128K: 0.27 vs 0.53 ms);
- when all query blocks are scored at once (at most ``config.max_score_elements`` scores):
  ``block_mask.score_and_select_tables``, one graph, replayed as a CUDA graph on CUDA for
  short inputs (``_compile.GraphedStage``: host time dominates there);
- otherwise: ``scoring.score_bands`` once per call, then ``block_mask.select_tables`` per
  chunk of query blocks, and the attention of each chunk of queries runs right after its
  tables are made, with a ``BlockMask`` of its own over all keys: memory O(chunk x Nk) per
  head instead of O(Nq x Nk) (the full-width index tables were 16 GiB at 1M tokens);
- with ``config.output_error``: the threshold fit's stages (``fit.py``) before the tables;
- ``flex_attention`` itself.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right
from torch.nn.attention.flex_attention import AuxRequest, BlockMask

from . import documents, fit
from ._compile import (
    GraphedStage,
    Mode,
    compiled_flex,
    kernel_options,
    lengths_only_dynamic,
    run_stage,
)
from .block_mask import (
    BlockTables,
    block_mask_from_tables,
    score_and_select_tables,
    select_tables,
    with_table_mask_mod,
)
from .config import PrismConfig
from .scoring import BandScores, final_block_inputs, final_query_block, pool_blocks, score_bands
from .selection import Thresholds

__all__ = [
    "Pooled",
    "pool_inputs",
    "band_scores",
    "chunk_rows",
    "block_tables",
    "table_block_mask",
    "sparse_attention",
    "dense_attention",
    "dense_causal_sdpa",
    "prism_forward",
    "visible_blocks",
]

#: Scores (batch x query heads x query blocks x key blocks) up to which the one-graph
#: selection is replayed as a CUDA graph. Why a bound: a captured graph keeps its
#: intermediates (~70 bytes per score, bench/NOTES.md) in a pool shared by all our graphs;
#: 2**23 scores is Llama-8B's 32 heads at 64K tokens (~0.6 GiB), past which the GPU work,
#: not the host, dominates the selection anyway.
_GRAPH_MAX_SCORES = 1 << 23

_GRAPHED_SELECTION = GraphedStage(score_and_select_tables)


class Pooled(NamedTuple):
    """Block means of one call (float32): ``q_pool`` ``(B, Hq, Nq, D)``, ``k_pool``
    ``(B, Hkv, Nk, D)``; with ``final_block_pool``: ``q_final``, ``k_fine``
    (:func:`~prism_flex.scoring.final_block_inputs`), else ``None``."""

    q_pool: Tensor
    k_pool: Tensor
    q_final: Optional[Tensor]
    k_fine: Optional[Tensor]


def pool_inputs(q: Tensor, k: Tensor, config: PrismConfig, mode: Mode) -> Pooled:
    """Eager block means (see the module docstring), marked for our compiled stages."""
    bs = config.block_size
    q_final = k_fine = None
    if config.final_block_pool:
        q_final, k_fine = final_block_inputs(q, k, bs, config.final_block_pool)
    return _mark_pooled(Pooled(pool_blocks(q, bs), pool_blocks(k, bs), q_final, k_fine), mode)


def _mark_pooled(pooled: Pooled, mode: Mode) -> Pooled:
    """Block means marked for our compiled stages (``Mode.COMPILED``; else as they are)."""
    if mode is not Mode.COMPILED:
        return pooled
    q_final = pooled.q_final
    pooled = Pooled(*lengths_only_dynamic(*pooled))
    if q_final is not None:
        # bs / pool rows: a constant (a last block of one sub-block would be specialised).
        torch._dynamo.mark_static(pooled.q_final, 2)
    return pooled


def band_scores(pooled: Pooled, config: PrismConfig, mode: Mode) -> BandScores:
    """:func:`~prism_flex.scoring.score_bands` of the whole call."""
    scores = run_stage(
        score_bands,
        mode,
        config,
        pooled.q_pool,
        pooled.k_pool,
        config.high_temperature,
        config.low_temperature,
        pooled.q_final,
        pooled.k_fine,
    )
    if mode is Mode.COMPILED:
        scores = BandScores(*lengths_only_dynamic(*scores))
    return scores


def chunk_rows(config: PrismConfig, batch: int, heads: int, num_kv_blocks: int) -> int:
    """Query blocks scored at once: ``config.max_score_elements`` scores at most."""
    return max(1, config.max_score_elements // (batch * heads * num_kv_blocks))


def _all_tables(q, k, v, pooled, config, scale, mode) -> BlockTables:
    """Index tables of every query block, ``(B, Hq, Nq[, Nk])``."""
    batch, hq, q_len, _ = q.shape
    kv_len = k.shape[2]
    nq, nk = pooled.q_pool.shape[2], pooled.k_pool.shape[2]
    thresholds = Thresholds.of(config)
    rows = chunk_rows(config, batch, hq, nk)
    if config.output_error is None and nq <= rows:
        args = (
            pooled.q_pool,
            pooled.k_pool,
            pooled.q_final,
            pooled.k_fine,
            q_len,
            kv_len,
            config.high_temperature,
            config.low_temperature,
            *thresholds,
        )
        if (
            mode is Mode.COMPILED
            and q.device.type == "cuda"
            and batch * hq * nq * nk <= _GRAPH_MAX_SCORES
        ):
            return _marked(_GRAPHED_SELECTION(config, *args), mode)
        return _marked(run_stage(score_and_select_tables, mode, config, *args), mode)
    scores = band_scores(pooled, config, mode)
    thresholds = _thresholds(q, k, v, scores, config, scale, mode)
    tables = [
        torch.empty((batch, hq, nq) + (nk,) * (i % 2), dtype=torch.int32, device=q.device)
        for i in range(4)
    ]
    for start in range(0, nq, rows):
        n = min(rows, nq - start)
        chunk = run_stage(select_tables, mode, config, scores, start, n, q_len, kv_len, *thresholds)
        for dst, src in zip(tables, chunk):
            dst[:, :, start : start + n].copy_(src)
    return _marked(BlockTables(*tables), mode)


def _marked(tables: BlockTables, mode: Mode) -> BlockTables:
    """Tables for our compiled flex_attention: ``(B, Hq, R[, Nk])``, only the head count a
    constant (``lengths_only_dynamic``)."""
    if mode is not Mode.COMPILED:
        return tables
    return BlockTables(*lengths_only_dynamic(*tables, head_dim=False))


def _thresholds(q, k, v, scores, config, scale, mode) -> Thresholds:
    """The config's thresholds, or with ``output_error`` the fitted ones, ``(B, Hq, 1, 1)``."""
    thresholds = Thresholds.of(config)
    if config.output_error is None:
        return thresholds
    fitted = _fit_thresholds(q, k, v, scores, config, scale, mode)[:, :, None, None]
    return Thresholds(fitted, fitted, thresholds.fine)


def block_tables(
    q: Tensor,
    k: Tensor,
    v: Optional[Tensor],
    config: PrismConfig,
    scale: Optional[float],
    mode: Mode,
    segments: Optional[documents.Segments] = None,
) -> BlockTables:
    """The index tables of :func:`prism_flex.prism_block_mask` (inputs already checked)."""
    if segments is not None:
        layout, scores = _document_scores(q, k, config, segments, mode)
        parts = [
            _document_tables(config, scores, layout, window, q.shape[2], k.shape[2], mode)
            for window in _document_windows(config, layout, q.shape, k.shape[2], mode)
        ]
        if len(parts) == 1:
            return parts[0]
        return BlockTables(*(torch.cat(t, dim=2) for t in zip(*parts)))
    return _all_tables(q, k, v, pool_inputs(q, k, config, mode), config, scale, mode)


def _document_windows(config, layout, q_shape, kv_len, mode) -> list[tuple[int, int, int, int]]:
    """``(row_start, num_rows, col_start, num_cols)`` chunks of a documents call: each chunk of
    query blocks scored against the key blocks its documents hold
    (:func:`documents.key_windows`: one host sync per call), or full-width chunks of
    :func:`chunk_rows` rows where windows cannot help or cannot be read: one document per row
    (padding only: every row's keys start at its first block, so the padded batches of a
    model's forward stay free of host syncs) and while traced."""
    batch, hq, q_len, _ = q_shape
    nq, nk = layout.q_lo.shape[1], layout.k_lo.shape[1]
    if mode is Mode.TRACED or layout.num_docs <= 1:
        rows = chunk_rows(config, batch, hq, nk)
        return [(s, min(rows, nq - s), 0, nk) for s in range(0, nq, rows)]
    budget = max(1, config.max_score_elements // (batch * hq))
    return documents.key_windows(layout, q_len, kv_len, config.block_size, budget)


def _document_tables(config, scores, layout, window, q_len, kv_len, mode) -> BlockTables:
    """The full-width tables of one chunk of :func:`_document_windows`."""
    start, n, col, width = window
    thresholds = Thresholds.of(config)
    return _marked(
        run_stage(
            documents.select_document_tables,
            mode,
            config,
            scores,
            layout,
            start,
            n,
            q_len,
            kv_len,
            thresholds.high,
            thresholds.low,
            col,
            width,
        ),
        mode,
    )


def table_block_mask(
    tables: BlockTables,
    q_len: int,
    kv_len: int,
    query_offset: int,
    config: PrismConfig,
    device: torch.device,
    segments: Optional[documents.Segments] = None,
) -> BlockMask:
    """The ``BlockMask`` of tables whose first query block starts at query token
    ``query_offset`` (0 unless the queries are chunked) of a ``(q_len, kv_len)`` call; with
    ``segments``, its ``mask_mod`` is the document/padding token rule."""
    offset = kv_len - q_len + query_offset
    rows = tables.partial_num.shape[-1]
    chunk_len = min(q_len - query_offset, rows * config.block_size)
    # A tensor, not an int: as an int, a compiled flex_attention would bake the value in (one
    # recompilation per value) or, traced in the user's graph with dynamic shapes, capture a
    # symbolic size, which its kernel templates cannot take (torch 2.11). A tensor at 0 too:
    # one mask_mod for every call, so that the first Lq < Lkv call or the first chunked one
    # does not compile flex_attention again (bench/recompiles.py).
    if segments is not None:
        ids = documents.padded_ids(segments, config.block_size)
        offset = torch.full((), offset, dtype=torch.int32, device=device)
        return BlockMask.from_kv_blocks(
            *tables,
            BLOCK_SIZE=config.block_size,
            mask_mod=documents.document_mask_mod(ids, offset),
            seq_lengths=(chunk_len, kv_len),
            compute_q_blocks=False,
        )
    # One value per batch row, read at [b]: the spelling both FlexAttention backends take.
    offset = torch.full((tables.partial_num.shape[0],), offset, dtype=torch.int32, device=device)
    return block_mask_from_tables(*tables, offset, chunk_len, kv_len, config.block_size)


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: BlockMask,
    scale: Optional[float],
    mode: Mode,
    backend: str = "triton",
) -> Tensor:
    """FlexAttention over the blocks of ``block_mask``, native GQA (see
    :func:`prism_flex.sparse_attention`), on the kernel ``backend``
    (``PrismConfig.flex_backend``; ignored in ``Mode.EAGER``, which the entry refuses for
    ``"flash"``)."""
    gqa = q.shape[1] != k.shape[1]
    if mode is Mode.EAGER:
        # Eager FlexAttention ignores the block lists: enforce them through the mask_mod.
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention(
            q, k, v, block_mask=with_table_mask_mod(block_mask), scale=scale, enable_gqa=gqa
        )
    if mode is Mode.TRACED:
        from torch.nn.attention.flex_attention import flex_attention

        options = kernel_options(q.device, backend) if backend != "triton" else None
        return flex_attention(
            q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, kernel_options=options
        )
    q, k, v = lengths_only_dynamic(q, k, v)
    return compiled_flex()(
        q,
        k,
        v,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=gqa,
        kernel_options=kernel_options(q.device, backend),
    )


def dense_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: Optional[float],
    mode: Mode,
    segments: Optional[documents.Segments] = None,
) -> Tensor:
    """Dense causal attention, bottom-right aligned, native GQA (no repeated K/V); with
    ``segments``, SDPA with the token rule as a boolean ``(B, 1, Lq, Lkv)`` mask (O(B * Lq *
    Lkv) bytes: the dense path serves short calls and decoding steps) and padded query rows
    set to 0.

    A plain SDPA call, its backend as torch picks it (and as a user's ``sdpa_kernel`` context
    says): on torch 2.11 with Hopper that is cuDNN for these inputs (H100, Qwen2.5-0.5B heads,
    4K and 8K tokens: 94 and 307 us, as with cuDNN pinned; flash 166 and 511 us). Why no
    ``sdpa_kernel(..., set_priority=True)`` of our own: it costs ~70 us of host time per call
    (100 us against 32 us for a plain call, same host), and short prefills are host-bound:
    Qwen2.5-0.5B's forward at 4K tokens spends more time on the host than on the GPU, so 24
    such contexts made it 4 ms slower than SDPA (bench/NOTES.md, ninth round).
    """
    if segments is not None:
        mask, q_real = documents.dense_document_mask(segments, q.shape[2])
        # enable_gqa=True while traced: compared with dynamic shapes the head counts are a
        # SymBool, which SDPA rejects.
        gqa = True if mode is Mode.TRACED else q.shape[1] != k.shape[1]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        return torch.where(q_real, out, out.new_zeros(()))
    if mode is Mode.TRACED:
        # Traced in a user's graph (e.g. training, where the dense path is differentiable):
        # enable_gqa=True whatever the head counts: compared with dynamic shapes they are a
        # SymBool, which SDPA rejects.
        return dense_causal_sdpa(q, k, v, scale, True)
    return dense_causal_sdpa(q, k, v, scale)


def dense_causal_sdpa(
    q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], gqa: Optional[bool] = None
) -> Tensor:
    """SDPA, causal bottom-right, of checked inputs; ``gqa=None``: whether the head counts
    differ (eager). The dense path's one call, and the Hugging Face function's for short
    calls."""
    if gqa is None:
        gqa = q.shape[1] != k.shape[1]
    q_len, kv_len = q.shape[2], k.shape[2]
    if q_len == kv_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if q_len == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=causal_lower_right(q_len, kv_len), scale=scale, enable_gqa=gqa
    )


def prism_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    config: PrismConfig,
    scale: Optional[float],
    mode: Mode,
    segments: Optional[documents.Segments] = None,
) -> tuple[Tensor, Tensor]:
    """Prism attention (the sparse path) of checked, detached inputs that need no grad;
    ``dispatch.py`` decides when to run dense instead.

    Returns:
        ``(out (B, Hq, Lq, D), density (B, Hq) float32)``.
    """
    if segments is not None:
        return _document_forward(q, k, v, config, scale, mode, segments)
    batch, hq, q_len, _ = q.shape
    kv_len = k.shape[2]
    bs = config.block_size
    pooled = pool_inputs(q, k, config, mode)
    nq, nk = pooled.q_pool.shape[2], pooled.k_pool.shape[2]
    rows = chunk_rows(config, batch, hq, nk)
    if nq <= rows:
        tables = _all_tables(q, k, v, pooled, config, scale, mode)
        mask = table_block_mask(tables, q_len, kv_len, 0, config, q.device)
        out = sparse_attention(q, k, v, mask, scale, mode, config.flex_backend)
        return out, _density(tables.partial_num, tables.full_num, q_len, kv_len, bs)
    # Long inputs: queries in chunks of `rows` blocks, each with its own tables and mask.
    scores = band_scores(pooled, config, mode)
    thresholds = _thresholds(q, k, v, scores, config, scale, mode)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    chosen = torch.zeros((batch, hq), dtype=torch.float32, device=q.device)
    for start in range(0, nq, rows):
        n = min(rows, nq - start)
        tables = _marked(
            run_stage(select_tables, mode, config, scores, start, n, q_len, kv_len, *thresholds),
            mode,
        )
        first, last = start * bs, min((start + n) * bs, q_len)
        mask = table_block_mask(tables, q_len, kv_len, first, config, q.device)
        # A contiguous copy of the chunk: a view would show the compiled kernel a new
        # storage offset per chunk.
        q_chunk = q[:, :, first:last].contiguous()
        out[:, :, first:last] = sparse_attention(
            q_chunk, k, v, mask, scale, mode, config.flex_backend
        )
        chosen += (tables.partial_num.sum(-1) + tables.full_num.sum(-1)).float()
    return out, chosen / visible_blocks(q_len, kv_len, bs, nq, q.device)


def visible_blocks(q_len: int, kv_len: int, bs: int, nq: int, device) -> Tensor:
    """Number of causally visible (query block, key block) pairs of a ``(q_len, kv_len)``
    call with ``nq`` query blocks, a float32 scalar (the denominator of every density)."""
    rows = torch.arange(nq, device=device)
    last = torch.clamp((rows + 1) * bs, max=q_len) - 1 + (kv_len - q_len)
    return (last // bs + 1).sum().float()


def _density(partial_num: Tensor, full_num: Tensor, q_len, kv_len, bs) -> Tensor:
    chosen = (partial_num.sum(-1) + full_num.sum(-1)).float()
    return chosen / visible_blocks(q_len, kv_len, bs, partial_num.shape[-1], partial_num.device)


def _fit_thresholds(q, k, v, scores, config, scale, mode) -> Tensor:
    """The fitted top-p threshold of each (batch, head), float32 ``(B, Hq)`` (``fit.py``)."""
    q_len, kv_len = q.shape[2], k.shape[2]
    grid = _fit_grid(q.device)
    make = _fit_samples if mode is Mode.COMPILED else _make_fit_samples
    rows, pos = make(q_len, config.block_size, config.fit_query_blocks, config.fit_tokens, q.device)
    q_in = lengths_only_dynamic(q)[0] if mode is Mode.COMPILED else q
    fine = Thresholds.of(config).fine
    q_fit, piece_of, piece_bucket, num, idx, key_pos = run_stage(
        fit.fit_inputs, mode, config, scores, q_in, grid, rows, pos, q_len, kv_len, fine
    )
    if mode is not Mode.COMPILED or q.device.type != "cuda":
        # The compiled CPU FlexAttention returns no log-sum-exp, and eager FlexAttention
        # cannot run inside our custom op: the same sums in plain PyTorch.
        out, lse = fit.fit_attention_plain(q_fit, k, v, piece_of, key_pos, config, scale)
    else:
        mask = fit.fit_block_mask(num, idx, key_pos, kv_len, config)
        m = config.fit_tokens
        # The query tile must divide the mask's query blocks of m rows.
        tile = 64 if m % 64 == 0 else (32 if m % 32 == 0 else 16)
        options = dict(kernel_options(q.device) or {}, BLOCK_M=tile)
        q_fit, k, v = lengths_only_dynamic(q_fit, k, v)
        torch._dynamo.mark_static(q_fit, 2)  # S * P * m rows: a constant of the config
        out, aux = compiled_flex()(
            q_fit,
            k,
            v,
            block_mask=mask,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
            kernel_options=options,
            return_aux=AuxRequest(lse=True),
        )
        lse = aux.lse
    return run_stage(
        fit.fitted_thresholds,
        mode,
        config,
        out,
        lse,
        piece_bucket,
        grid,
        float(config.output_error),
    )


@functools.lru_cache(maxsize=None)
def _fit_grid(device: torch.device) -> Tensor:
    """:data:`~prism_flex.fit.FIT_THRESHOLDS` on ``device``, made once per device: built in
    the compiled graph, it was copied from the host at every call, and that copy waited for
    the GPU (3-9 ms of host time per call on the H200)."""
    return torch.tensor(fit.FIT_THRESHOLDS, dtype=torch.float32, device=device)


def _make_fit_samples(
    q_len: int, block_size: int, samples: int, tokens: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """The fit's sampled query blocks and tokens (``fit.fit_rows``, ``fit.fit_positions``),
    int64 ``(S,)`` and ``(S, m)``."""
    rows = fit.fit_rows((q_len + block_size - 1) // block_size, samples, device)
    return rows, fit.fit_positions(rows, q_len, block_size, tokens)


@functools.lru_cache(maxsize=64)
def _fit_samples(
    q_len: int, block_size: int, samples: int, tokens: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """:func:`_make_fit_samples`, made eagerly once per query length and device: as inputs
    of the compiled fit stage they are loaded, not folded into its index arithmetic (see
    ``fit.fit_inputs``). Their sizes are constants of the config."""
    rows, pos = _make_fit_samples(q_len, block_size, samples, tokens, device)
    torch._dynamo.mark_static(rows, 0)
    torch._dynamo.mark_static(pos, 0)
    torch._dynamo.mark_static(pos, 1)
    return rows, pos


def _document_scores(q, k, config, segments, mode):
    """Layout and scores of a documents call (``documents.py``): the pooling and the layout
    eagerly, the scoring as a stage; ``final_block_pool``'s rows in chunks of documents (at
    most ``config.max_score_elements`` fine scores at once)."""
    num_docs = documents.count_documents(segments)
    layout = documents.doc_layout(segments, q.shape[2], config.block_size, num_docs)
    pooled = documents.pool_documents(q, k, segments, layout, config)
    scores = run_stage(
        documents.score_documents,
        mode,
        config,
        pooled.q_pool,
        pooled.k_pool,
        layout.q_doc,
        layout.k_doc,
        num_docs,
        config.high_temperature,
        config.low_temperature,
    )
    if pooled.q_fine is not None:
        batch, hq, slots, g = pooled.q_fine.shape[:4]
        nk = pooled.k_pool.shape[2]
        step = max(1, config.max_score_elements // (batch * hq * g * pooled.k_fine.shape[2]))
        parts = [
            run_stage(
                documents.fine_document_picks,
                mode,
                config,
                pooled.q_fine[:, :, a : a + step],
                pooled.q_fine_hi[:, a : a + step],
                pooled.k_fine,
                pooled.k_fine_lo,
                pooled.k_fine_hi,
                layout.doc_start[:, a : a + step],
                nk,
                Thresholds.of(config).fine,
            )
            for a in range(0, slots, step)
        ]
        scores = scores._replace(fine=torch.cat(parts, 2) if len(parts) > 1 else parts[0])
    return layout, scores


def _document_forward(q, k, v, config, scale, mode, segments):
    """:func:`prism_forward` with documents/padding (``documents.py``); queries in chunks
    of query blocks, each scored against its documents' key blocks only
    (:func:`_document_windows`) and attended with a mask of its own."""
    if config.output_error is not None:
        raise NotImplementedError(
            "PrismConfig.output_error (the threshold fit) does not support padding or packed "
            "documents yet: set output_error=None (fixed thresholds) for these calls"
        )
    batch, hq, q_len, _ = q.shape
    kv_len = k.shape[2]
    bs = config.block_size
    spans = _document_spans(segments, q_len, kv_len, config, mode)
    if spans is not None:
        return _per_document_forward(q, k, v, config, scale, mode, spans)
    layout, scores = _document_scores(q, k, config, segments, mode)
    nq = layout.q_lo.shape[1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    chosen = torch.zeros((batch, hq), dtype=torch.float32, device=q.device)
    for window in _document_windows(config, layout, q.shape, kv_len, mode):
        start, n = window[:2]
        tables = _document_tables(config, scores, layout, window, q_len, kv_len, mode)
        first, last = start * bs, min((start + n) * bs, q_len)
        mask = table_block_mask(tables, q_len, kv_len, first, config, q.device, segments)
        q_chunk = q if n == nq else q[:, :, first:last].contiguous()
        out[:, :, first:last] = sparse_attention(q_chunk, k, v, mask, scale, mode)
        chosen += (tables.partial_num.sum(-1) + tables.full_num.sum(-1)).float()
    return out, chosen / documents.visible_document_blocks(layout, bs)


#: A packed row whose documents hold at least this many blocks each on average runs each
#: document's own selection (:func:`_per_document_forward`). Why: the windowed selection closes
#: a window at every document start once it holds 64 blocks (``documents.key_windows``), so for
#: such rows it runs one window per document anyway, and each window is a compiled call of
#: ~0.9 ms of host time (H100, Llama-8B heads, 8 documents of 16K tokens: 18.8 ms packed
#: against 11.1 ms as separate calls, bench/results/runs/h100_packed_windows_c6b483b.json and
#: h100_profile_packed_select_8x16k.txt); the documents' own selections, one CUDA graph per
#: layout, and one kernel for aligned documents: 10.1 ms against 11.2 (h100_packed.json).
SPLIT_MIN_BLOCKS = 64


def _document_spans(segments, q_len, kv_len, config, mode) -> Optional[list[tuple[int, int]]]:
    """``[(start, length), ...]`` of the documents of a packed row that
    :func:`_per_document_forward` selects each on its own, or ``None`` where the windowed selection
    runs: a batch of several rows (the compiled path splits batches into rows before this),
    possible padding, ``Lq < Lkv``, one document, documents averaging fewer than
    :data:`SPLIT_MIN_BLOCKS` blocks, or inside a user's trace (the spans are read on the host:
    ``segments.lengths`` where the validation of ``cu_seqlens`` read them, else one
    device-to-host copy of the per-document token counts)."""
    if mode is Mode.TRACED or segments.padded or q_len != kv_len or segments.ids.shape[0] != 1:
        return None
    min_tokens = SPLIT_MIN_BLOCKS * config.block_size
    if segments.num_docs is not None and (
        segments.num_docs < 2 or segments.num_docs * min_tokens > kv_len
    ):
        return None
    counts = segments.lengths
    if counts is None:
        # Without padding the ids are the ordinals 0, 1, ... of contiguous documents.
        counts = torch.bincount(segments.ids[0].long()).tolist()
    if len(counts) < 2 or len(counts) * min_tokens > kv_len:
        return None
    starts = [0]
    for n in counts[:-1]:
        starts.append(starts[-1] + n)
    return list(zip(starts, counts))


def _per_document_forward(q, k, v, config, scale, mode, spans):
    """The documents of one packed row ``(1, H, L, D)``, each selected as its own causal call
    (dense or sparse by the size rule of its own length): exactly what separate calls give.
    Block-aligned documents run one FlexAttention kernel over the row
    (:func:`_aligned_packed_forward`); otherwise each sparse document runs its own kernel on a
    view of the row, their selections one CUDA graph (:func:`_document_tables_each`), and the
    dense ones SDPA, first.

    Returns ``(out, density)``; the density is over the documents' own visible blocks."""
    if _aligned_in_one_kernel(q.shape, spans, config, mode, q.device):
        return _aligned_packed_forward(q, k, v, config, scale, mode, spans)
    bs = config.block_size
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    sparse, dense, visible, chosen = _split_dense(q, k, v, config, scale, mode, spans)
    for s, o in dense:
        out[:, :, s] = o
    # The first document alone, then the others: the GPU runs the first one's kernel while
    # the host pools the others (~17 small ops each at unaligned lengths), which otherwise
    # all ran ahead of any kernel (H100, 8 documents of ~16K tokens: ~3 ms of idle GPU when
    # the call starts on an empty queue, as after the host read of device offsets).
    counts = []
    for group in [sparse[:1], sparse[1:]] if len(sparse) > 2 else [sparse]:
        tables = _document_tables_each(q, k, config, mode, group)
        for (start, n), own in zip(group, tables):
            s = slice(start, start + n)
            qd, kd, vd = (t[:, :, s] for t in (q, k, v))
            if own is None:  # too long for one selection graph: its own chunked call
                o, density = prism_forward(qd, kd, vd, config, scale, mode)
                blocks = -(-n // bs)
                chosen = chosen + density * (blocks * (blocks + 1) // 2)
            else:
                mask = table_block_mask(own, n, n, 0, config, q.device)
                o = sparse_attention(qd, kd, vd, mask, scale, mode, config.flex_backend)
                counts += [own.partial_num, own.full_num]
            out[:, :, s] = o
    if counts:
        chosen = chosen + torch.cat(counts, 2).sum(-1).float()
    if not isinstance(chosen, Tensor):
        chosen = torch.full((1, q.shape[1]), float(chosen), device=q.device)
    return out, chosen / visible


def _document_tables_each(q, k, config, mode, spans) -> list[Optional[BlockTables]]:
    """Each document's own tables ``(1, Hq, n_i, n_i)`` (``n_i`` its blocks), from its own
    block means: one CUDA graph of all the documents' selections on CUDA (one replay per
    layout instead of one per document: each replay costs host time); ``None`` for a
    document too long for one selection graph (it runs its own chunked call)."""
    hq = q.shape[1]
    bs = config.block_size
    fits = [-(-n // bs) <= chunk_rows(config, 1, hq, -(-n // bs)) for _, n in spans]
    flat, picked = [], []
    for (start, n), ok in zip(spans, fits):
        if ok:
            s = slice(start, start + n)
            flat += pool_inputs(q[:, :, s], k[:, :, s], config, mode)
            picked.append((start, n))
    if not picked:
        return [None] * len(spans)
    picked = tuple(picked)
    graphed = (
        mode is Mode.COMPILED
        and q.device.type == "cuda"
        and all(hq * (-(-n // bs)) ** 2 <= _GRAPH_MAX_SCORES for _, n in picked)
    )
    run = _GRAPHED_EACH if graphed else _select_each
    tables = iter(run(config, mode, picked, *flat))
    return [
        _marked(BlockTables(*(next(tables) for _ in range(4))), mode) if ok else None for ok in fits
    ]


def _select_each(config, mode, spans, *pooled) -> tuple[Tensor, ...]:
    """:func:`~prism_flex.block_mask.score_and_select_tables` of each document of ``spans``,
    from its :class:`Pooled` block means (``pooled``: four per document, flat); the tables
    flat in the same order."""
    out = []
    for i, (_, n) in enumerate(spans):
        out += _own_selection(config, mode, pooled[4 * i : 4 * i + 4], n)
    return tuple(out)


# One CUDA graph per layout of documents. Its tables are read by the documents' FlexAttention
# calls right after, on the same stream: no copies of them.
_GRAPHED_EACH = GraphedStage(_select_each, compile_stage=False, clone_outputs=False)


def _split_dense(q, k, v, config, scale, mode, spans):
    """``(sparse spans, [(slice, output)] of the dense documents, visible blocks, visible
    blocks of the dense documents)`` of a packed row's documents: those dense by the size rule
    of their own length run SDPA here, first (the GPU runs them while the host prepares the
    sparse ones); the counts are the causally visible blocks of each document's own call."""
    bs = config.block_size
    sparse, dense, visible, dense_pairs = [], [], 0, 0
    for start, n in spans:
        blocks = -(-n // bs)
        pairs = blocks * (blocks + 1) // 2
        visible += pairs
        s = slice(start, start + n)
        # Views, not copies: the compiled stages and FlexAttention take the packed row's
        # strides (H100, 8 x 16K: a copy of Q, K and V per call cost ~1 ms).
        qd, kd, vd = q[:, :, s], k[:, :, s], v[:, :, s]
        if config.runs_dense(qd.shape, n):
            dense.append((s, dense_attention(qd, kd, vd, scale, mode)))
            dense_pairs += pairs
        else:
            sparse.append((start, n))
    return sparse, dense, visible, dense_pairs


def _own_selection(config, mode, pooled, n: int) -> BlockTables:
    """:func:`~prism_flex.block_mask.score_and_select_tables` of one ``n``-token document
    from its block means ``pooled`` (as its own call runs it)."""
    return run_stage(
        score_and_select_tables,
        mode,
        config,
        *pooled,
        n,
        n,
        config.high_temperature,
        config.low_temperature,
        *Thresholds.of(config),
    )


def _aligned_in_one_kernel(q_shape, spans, config, mode, device) -> bool:
    """Whether :func:`_aligned_packed_forward` runs these documents: each starts on a block
    boundary (a document's own blocks are then blocks of the row), at least one is sparse by
    the size rule, and the row's tables fit ``config.max_score_elements`` entries (``Hq x
    Nq x`` :func:`_row_table_width`, as one selection's scores)."""
    bs = config.block_size
    if any(start % bs for start, _ in spans):
        return False
    if all(config.runs_dense((1, q_shape[1], n, q_shape[3]), n) for _, n in spans):
        return False
    nq = -(-q_shape[2] // bs)
    return q_shape[1] * nq * _row_table_width(spans, nq, config, mode, device) <= (
        config.max_score_elements
    )


def _row_table_width(spans, nq, config, mode, device) -> int:
    """Width of :func:`_aligned_packed_forward`'s tables: the largest document's blocks for
    the compiled Triton kernel, which reads only the first ``num`` entries of each row, else
    the row's ``nq`` (eager FlexAttention expands the mask to its dense form, the CPU kernel
    asserts the full width, and the FLASH backend is not tried with narrow tables)."""
    if mode is Mode.COMPILED and device.type == "cuda" and config.flex_backend == "triton":
        return max(-(-n // config.block_size) for _, n in spans)
    return nq


def _aligned_packed_forward(q, k, v, config, scale, mode, spans):
    """:func:`_per_document_forward` of block-aligned documents in one sparse kernel: each
    sparse document's selection is its own call's, written into tables of the row at its
    first block (:func:`_row_tables`), and one FlexAttention call with the plain causal
    ``mask_mod`` attends the whole row (a document's blocks never reach another's: its
    diagonal blocks are its own). Dense documents keep their own SDPA call, issued first
    (the GPU runs them while the host issues the selection), and are written over the
    kernel's output (their rows hold no blocks there).

    Why: one call per document paid FlexAttention's host time per document and a copy of each
    document's output into the row; the tables are ``(1, Hq, Nq, W)``, ``W`` from
    :func:`_row_table_width`.
    """
    length = q.shape[2]
    nq = -(-length // config.block_size)
    sparse, dense, visible, dense_pairs = _split_dense(q, k, v, config, scale, mode, spans)
    width = _row_table_width(spans, nq, config, mode, q.device)
    tables = _marked(_row_tables(q, k, v, config, scale, mode, tuple(sparse), nq, width), mode)
    mask = table_block_mask(tables, length, length, 0, config, q.device)
    out = sparse_attention(q, k, v, mask, scale, mode, config.flex_backend)
    for s, o in dense:
        out[:, :, s] = o
    chosen = (tables.partial_num.sum(-1) + tables.full_num.sum(-1)).float() + dense_pairs
    return out, chosen / visible


def _row_tables(q, k, v, config, scale, mode, spans, nq, width) -> BlockTables:
    """Tables ``(1, Hq, nq, width)`` of a packed row holding each document of ``spans``
    (block-aligned ``(start, length)``) as its own call's selection, shifted to its first
    block; rows of other documents empty.

    Documents whose selection is one graph (``score_and_select_tables``) are selected from
    the row's block means, pooled once (a document's blocks are blocks of the row), by
    :func:`_select_documents`: on CUDA, one CUDA graph of all of them replayed per layout
    (a model's layers share it: one replay per layer instead of one per document, whose host
    time serialised the documents' selection ahead of the one kernel). Otherwise each
    document runs :func:`_all_tables` of its own view."""
    hq = q.shape[1]
    bs = config.block_size
    blocks = [-(-n // bs) for _, n in spans]
    if any(nb > chunk_rows(config, 1, hq, nb) for nb in blocks):
        return _tables_per_document(q, k, v, config, scale, mode, spans, nq, width)
    pool = config.final_block_pool
    args = (
        pool_blocks(q, bs),
        pool_blocks(k, bs),
        _final_query_blocks(q, spans, bs, pool) if pool else None,
        pool_blocks(k, pool) if pool else None,
        spans,
        nq,
        width,
    )
    if (
        mode is Mode.COMPILED
        and q.device.type == "cuda"
        and all(hq * nb * nb <= _GRAPH_MAX_SCORES for nb in blocks)
    ):
        return _GRAPHED_DOCUMENTS(config, *args, mode)
    return _select_documents(config, *args, mode)


def _final_query_blocks(q: Tensor, spans, bs: int, pool: int) -> Tensor:
    """``q_final`` (:func:`~prism_flex.scoring.final_query_block`) of each document of
    ``spans``, float32 ``(num_docs, Hq, bs / pool, D)``: the documents ending on a block
    boundary pooled together; only the row's last document can end inside a block."""
    full = [q[:, :, a + n - bs : a + n] for a, n in spans if n % bs == 0]
    parts = [final_query_block(torch.cat(full), bs, pool)] if full else []
    a, n = spans[-1]
    if n % bs:
        parts.append(final_query_block(q[:, :, a + n - n % bs : a + n], bs, pool))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _new_row_tables(hq, nq, width, device) -> list[Tensor]:
    """Empty row tables: partial count, partial indices, full count, full indices."""
    return [
        torch.zeros((1, hq, nq) + (width,) * (i % 2), dtype=torch.int32, device=device)
        for i in range(4)
    ]


def _write_document(row: list[Tensor], own: BlockTables, first: int, blocks: int) -> None:
    """Copy one document's tables into the row's, its block indices shifted by ``first``."""
    rows = slice(first, first + blocks)
    for i, src in enumerate(own):
        if i % 2:
            torch.add(src, first, out=row[i][:, :, rows, :blocks])
        else:
            row[i][:, :, rows] = src


def _select_documents(
    config, q_pool, k_pool, q_final, k_fine, spans, nq, width, mode
) -> BlockTables:
    """:func:`_row_tables` from the row's block means: ``q_pool`` ``(1, Hq, Nq, D)``,
    ``k_pool`` ``(1, Hkv, Nk, D)``, ``q_final`` ``(num_docs, Hq, bs / pool, D)``, ``k_fine``
    ``(1, Hkv, ceil(L / pool), D)`` (``None`` without ``final_block_pool``). Each document's
    slices are made contiguous, so its stage sees what its own call would."""
    bs, pool = config.block_size, config.final_block_pool
    row = _new_row_tables(q_pool.shape[1], nq, width, q_pool.device)
    for i, (start, n) in enumerate(spans):
        first, blocks = start // bs, -(-n // bs)
        pooled = Pooled(
            q_pool[:, :, first : first + blocks].contiguous(),
            k_pool[:, :, first : first + blocks].contiguous(),
            # A copy, not a view at an offset: the stage's graph is the one of a separate call.
            None if q_final is None else q_final[i : i + 1].clone(),
            None
            if k_fine is None
            else k_fine[:, :, start // pool : -(-(start + n) // pool)].contiguous(),
        )
        _write_document(
            row, _own_selection(config, mode, _mark_pooled(pooled, mode), n), first, blocks
        )
    return BlockTables(*row)


# One CUDA graph per layout of documents. Its tables are read by the row's FlexAttention call
# right after, on the same stream: no copies of them (up to 2 x 66 MB for a row of 126K tokens
# holding a 64K-token document).
_GRAPHED_DOCUMENTS = GraphedStage(_select_documents, compile_stage=False, clone_outputs=False)


def _tables_per_document(q, k, v, config, scale, mode, spans, nq, width) -> BlockTables:
    """:func:`_row_tables` by :func:`_all_tables` of each document's view (documents too long
    for one selection graph)."""
    bs = config.block_size
    row = _new_row_tables(q.shape[1], nq, width, q.device)
    for start, n in spans:
        s = slice(start, start + n)
        qd, kd, vd = q[:, :, s], k[:, :, s], v[:, :, s]
        own = _all_tables(qd, kd, vd, pool_inputs(qd, kd, config, mode), config, scale, mode)
        _write_document(row, own, start // bs, -(-n // bs))
    return BlockTables(*row)
