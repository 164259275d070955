"""Functional API: Prism block mask and Prism attention.

Compile boundaries (explicit, built lazily on first use so that importing the package compiles
nothing and never touches CUDA):

- the block means of Q and K (``pool_blocks``) run eagerly, before: ATen's reduction reads
  Q faster than inductor's code for it;
- ``_mask_tables``: bands, temperatures, block logits, softmax, top-p, union and index
  tables, in one graph, when all query blocks are scored at once;
- when the scores would exceed ``config.max_score_elements``: ``_score_inputs`` (bands and
  temperatures, once per call), then ``_select_tables`` (the rest) per chunk of query blocks;
- with ``config.output_error`` (``fit.py``): ``_score_inputs``; ``_fit_inputs`` (the sampled
  rows at every candidate threshold, buckets, pieces, tables); the fit's ``flex_attention``
  on CUDA (elsewhere ``fit.fit_attention_plain``, eager: the CPU kernel returns no
  log-sum-exp);
  ``_fitted_thresholds``; then ``_select_tables`` with per-head threshold tensors;
- ``flex_attention`` itself.

All are ``torch.compile(fullgraph=True, dynamic=True)``: one compilation serves every
sequence length, while the config's integers stay constants (``_StaticConfig``). Inside a
model that the user compiles, ``prism_attention`` becomes one opaque custom op that runs these
same stages (``graph_op.py`` says why); ``prism_block_mask`` and ``sparse_attention`` called
there are traced inline.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from . import fit, graph_op
from .block_mask import block_mask_from_tables, compact_blocks, run_tables, with_table_mask_mod
from .config import PrismConfig
from .scoring import (
    band,
    band_logits,
    band_temperature,
    block_softmax,
    diagonal_range,
    final_block_probs,
    local_blocks_table,
    pool_blocks,
    rows_block_geometry,
)
from .selection import combine_selection, top_p_select

__all__ = [
    "check_inputs",
    "score_inputs",
    "select_blocks",
    "prism_block_mask",
    "prism_attention",
    "sparse_attention",
    "dense_causal_attention",
    "block_density",
]

_DEFAULT_CONFIG = PrismConfig()


def check_inputs(q: Tensor, k: Tensor, v: Optional[Tensor] = None) -> None:
    """Raise ``TypeError``/``ValueError`` for inputs the attention cannot take.

    Expected: q ``(B, Hq, Lq, D)``, k and v ``(B, Hkv, Lkv, D)``, one floating dtype and one
    device, ``Hq % Hkv == 0``, ``1 <= Lq <= Lkv``, ``D`` even.
    """
    named = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dims (batch, heads, seq_len, head_dim), got shape "
                f"{tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    for name, t in named[1:]:
        if t.dtype != q.dtype:
            raise TypeError(f"q and {name} must have the same dtype, got {q.dtype} and {t.dtype}")
        if t.device != q.device:
            raise ValueError(
                f"q and {name} must be on the same device, got {q.device} and {t.device}"
            )
    bq, hq, lq, d = q.shape
    bk, hkv, lkv, dk = k.shape
    if bk != bq:
        raise ValueError(f"q and k must have the same batch size, got {bq} and {bk}")
    if dk != d:
        raise ValueError(f"q and k must have the same head_dim, got {d} and {dk}")
    if v is not None and tuple(v.shape) != tuple(k.shape):
        raise ValueError(
            f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}"
        )
    if hkv == 0 or hq % hkv:
        raise ValueError(
            f"the number of query heads ({hq}) must be a multiple of the number of key/value "
            f"heads ({hkv})"
        )
    if lq == 0 or lkv == 0:
        raise ValueError(f"empty sequence: q_len={lq}, kv_len={lkv}")
    if lq > lkv:
        raise ValueError(
            f"q_len ({lq}) must not exceed kv_len ({lkv}): queries are the last q_len "
            "positions of the key sequence (bottom-right causal alignment)"
        )
    if d % 2:
        raise ValueError(f"head_dim must be even (RoPE pairs), got {d}")


def score_inputs(q: Tensor, k: Tensor, config: PrismConfig) -> dict[str, Tensor]:
    """Pooled bands and their logit divisors, the per-call part of the scoring.

    Args:
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hkv, Lkv, D)``.
    Returns:
        ``{"q_high", "k_high", "q_low", "k_low"}``: pooled band vectors, float32
        ``(B, H, N, d_band)``; ``{"div_high", "div_low"}``: ``(B, Hq)`` divisors
        ``sqrt(d_band) * t_band`` of the band logits; with ``config.final_block_pool``, also
        ``{"q_final", "k_fine"}`` (see :func:`~prism_flex.scoring.final_block_probs`).
    """
    bs = config.block_size
    scores = _score_inputs(
        pool_blocks(q, bs), pool_blocks(k, bs), config,
        config.high_temperature, config.low_temperature,
    )
    if config.final_block_pool:
        nq = (q.shape[2] + bs - 1) // bs
        scores.update(_final_block_inputs(q, k, nq, bs, config.final_block_pool))
    return scores


def _score_inputs(q_pool, k_pool, config, high_temperature, low_temperature):
    config = _config_of(config)
    # The float knobs travel as arguments, not as config attributes: torch.compile treats
    # float arguments as inputs but attributes as constants (one recompilation per value).
    high_dims, low_dims = config.band_dims(q_pool.shape[-1])
    out = {}
    for name, dims, temperature in (
        ("high", high_dims, high_temperature),
        ("low", low_dims, low_temperature),
    ):
        q_band = band(q_pool, dims, name, config.rope_layout)
        k_band = band(k_pool, dims, name, config.rope_layout)
        if config.calibrate:
            t = band_temperature(q_pool, k_pool, q_band, k_band)
        else:
            t = torch.full(q_pool.shape[:2], temperature, dtype=torch.float32,
                           device=q_pool.device)
        out[f"q_{name}"] = q_band
        out[f"k_{name}"] = k_band
        out[f"div_{name}"] = math.sqrt(dims) * t
    return out


def select_blocks(
    scores: dict[str, Tensor], row_start: int, num_rows: int, q_len: int, kv_len: int,
    config: PrismConfig,
) -> tuple[Tensor, Tensor, Tensor]:
    """Selected key blocks of query blocks ``row_start .. row_start + num_rows - 1``.

    Args:
        scores: the output of :func:`score_inputs`.
    Returns:
        ``(selected, allowed, diagonal)``: bool ``(B, Hq, R, Nk)``, ``(R, Nk)``, ``(R, Nk)``.
    """
    rows = torch.arange(num_rows, device=scores["q_high"].device) + row_start
    return _select_blocks(
        scores, rows, q_len, kv_len, config, config.high_threshold, config.low_threshold,
        _fine_threshold(config),
    )


def _fine_threshold(config: PrismConfig) -> float:
    """The top-p threshold of ``final_block_pool``'s row: the larger band threshold (also
    with ``output_error``: the fitted thresholds are the bands', this row keeps its own)."""
    return float(max(config.high_threshold, config.low_threshold))


def _select_blocks(scores, rows, q_len, kv_len, config, high_thr, low_thr, fine_thr):
    """:func:`select_blocks` of query blocks ``rows`` (int64 ``(R,)``, any order and
    repeats: the threshold fit scores a few rows at several thresholds at once). The band
    thresholds are floats, or float32 tensors broadcastable to ``(B, Hq, R, 1)``; ``fine_thr``
    (``final_block_pool``'s row) a float. Floats travel as arguments, not config attributes:
    compiled, they are then inputs, not constants (no recompile per value)."""
    q_high = scores["q_high"].index_select(2, rows)
    q_low = scores["q_low"].index_select(2, rows)
    nk = scores["k_high"].shape[2]
    allowed, diagonal = rows_block_geometry(rows, nk, q_len, kv_len, config.block_size)
    high = top_p_select(
        block_softmax(band_logits(q_high, scores["k_high"], scores["div_high"]), allowed),
        high_thr,
    )
    low = top_p_select(
        block_softmax(band_logits(q_low, scores["k_low"], scores["div_low"]), allowed),
        low_thr,
    )
    nq = (q_len + config.block_size - 1) // config.block_size
    dense_rows = extra = None
    if config.dense_final_blocks:
        dense_rows = rows >= nq - config.dense_final_blocks
    if config.local_blocks:
        extra = local_blocks_table(rows, nk, q_len, kv_len, config.block_size,
                                   config.local_blocks)
    if config.final_block_pool:
        probs = final_block_probs(scores["q_final"], scores["k_fine"], q_len, kv_len,
                                  config.block_size, config.final_block_pool)
        fine = top_p_select(probs, fine_thr)
        fine = fine & (rows == nq - 1)[:, None]  # (B, Hq, R, Nk): only the last query block
        extra = fine if extra is None else fine | extra
    selected = combine_selection(
        high, low, allowed, diagonal, config.force_sink, config.force_diagonal, dense_rows,
        extra,
    )
    return selected, allowed, diagonal


def _select_tables(scores, row_start, num_rows, q_len, kv_len, config, high_thr, low_thr,
                   fine_thr):
    """Selection followed by compaction into partial (diagonal) and full index tables."""
    config = _config_of(config)
    rows = torch.arange(num_rows, device=scores["q_high"].device) + row_start
    selected, allowed, diagonal = _select_blocks(
        scores, rows, q_len, kv_len, config, high_thr, low_thr, fine_thr
    )
    if config.force_diagonal:
        # The partial blocks are exactly the diagonal: written from its range directly.
        first, last = diagonal_range(
            row_start, num_rows, q_len, kv_len, config.block_size, selected.device
        )
        partial_num, partial_idx = run_tables(
            first, last, selected.shape[-1], selected.shape[0], selected.shape[1]
        )
    else:
        partial_num, partial_idx = compact_blocks(selected & diagonal)
    full_num, full_idx = compact_blocks(selected & ~diagonal)
    return partial_num, partial_idx, full_num, full_idx


def _mask_tables(q_pool, k_pool, fine, q_len, kv_len, config, high_temperature,
                 low_temperature, high_thr, low_thr, fine_thr):
    """Scoring and selection of all query blocks in one graph (the unchunked case): one
    compiled call instead of two, which matters at short lengths where host time dominates.
    ``fine``: the finer pooled tensors of ``config.final_block_pool`` (empty when off)."""
    config = _config_of(config)
    scores = _score_inputs(q_pool, k_pool, config, high_temperature, low_temperature)
    scores.update(fine)
    return _select_tables(scores, 0, q_pool.shape[2], q_len, kv_len, config, high_thr, low_thr,
                          fine_thr)


def _fit_inputs(scores, q, grid, rows, pos, q_len, kv_len, config, fine_thr):
    return fit.fit_inputs(_select_blocks, scores, q, grid, rows, pos, q_len, kv_len,
                          _config_of(config), fine_thr)


def _fitted_thresholds(out, lse, piece_bucket, grid, config, output_error):
    return fit.fitted_thresholds(out, lse, piece_bucket, grid, _config_of(config).fit_tokens,
                                 output_error)


_STAGES = {
    "score": _score_inputs,
    "tables": _select_tables,
    "mask": _mask_tables,
    "fit": _fit_inputs,
    "fitted": _fitted_thresholds,
    "flex": flex_attention,
}


class _StaticConfig(torch.nn.Module):
    """A :class:`PrismConfig` that the compiled stages see as constants.

    The stages compile with ``dynamic=True`` so that new lengths do not recompile, and then
    dynamo makes *every* int it is given a symbol, the config's too (block size, band
    widths, sample counts, ...): kernels divide by runtime values, and on CPU inductor's
    simplification of the resulting index expressions dominated the threshold fit's
    compile (its stages at 700 tokens on 2 cores: 122 s, 55 s with this and ``_fit_samples``).
    Integer attributes of an ``nn.Module`` are dynamo's exception: it treats them as static
    (its recompile hint says so). So the compiled stages receive the config inside one of
    these; another config compiles them again, as another constant should. Eager stages get
    the config itself.
    """

    def __init__(self, config: PrismConfig):
        super().__init__()
        self.config = config


def _config_of(config) -> PrismConfig:
    """The config of a stage argument: a :class:`PrismConfig` or a :class:`_StaticConfig`."""
    return config.config if isinstance(config, _StaticConfig) else config


@functools.lru_cache(maxsize=64)
def _static_config(config: PrismConfig) -> _StaticConfig:
    return _StaticConfig(config)


def _run_compiled(name: str, *args, **kwargs):
    """Stage ``name`` compiled, with its config argument made constant (_StaticConfig)."""
    args = tuple(_static_config(a) if isinstance(a, PrismConfig) else a for a in args)
    return _compiled_stage(name)(*args, **kwargs)


def _stage(name: str, compiled: bool):
    """The function running stage ``name``: the plain one when eager, or when we are already
    being traced by a compile of the user's model (which then compiles it inline), else our
    own compiled version."""
    if not compiled or torch.compiler.is_compiling():
        return _STAGES[name]
    return functools.partial(_run_compiled, name)


@functools.lru_cache(maxsize=None)
def _compiled_stage(name: str):
    """The compiled stages, built on first use (never at import)."""
    return torch.compile(_STAGES[name], fullgraph=True, dynamic=True)


def _uniform_dispatch_keys(fn):
    """Run ``fn`` below the autograd and ADInplaceOrView dispatch keys (not while a compile
    of the user's model traces it).

    Why: our compiled stages guard on the dispatch keys of their inputs as the thread-local
    state shows them, and that state differs between a plain call, a call under
    ``torch.inference_mode()`` or with inference tensors (which lack ADInplaceOrView), and
    the first run of our custom op inside a user's compiled graph (AOTAutograd's aliasing
    check runs it in a dispatch mode that excludes ADInplaceOrView): each difference compiled
    every stage once more. Below those keys all of them look the same. Inference only, so
    nothing is lost: the callers run under ``no_grad`` on detached inputs, and the outputs
    are ordinary tensors.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        with torch._C._AutoDispatchBelowADInplaceOrView():
            return fn(*args, **kwargs)

    return wrapper


@_uniform_dispatch_keys
@torch.no_grad()
def prism_block_mask(
    q: Tensor, k: Tensor, config: PrismConfig = _DEFAULT_CONFIG, *,
    v: Optional[Tensor] = None, scale: Optional[float] = None, compiled: bool = True,
) -> BlockMask:
    """The Prism ``BlockMask`` of a causal attention.

    Args:
        q: ``(B, Hq, Lq, D)`` after RoPE; k: ``(B, Hkv, Lkv, D)`` after RoPE; ``Lq <= Lkv``.
        config: selection settings.
        v: ``(B, Hkv, Lkv, D)``; needed (only) with ``config.output_error``, whose threshold
            fit measures attention outputs.
        scale: the attention's softmax scale, default ``1 / sqrt(D)`` (the fit's outputs).
        compiled: run the scoring through ``torch.compile`` (``False``: eager, for debugging
            and tests).
    Returns:
        A forward-only ``BlockMask`` with one row per *query* head, ``BLOCK_SIZE =
        config.block_size``, ``seq_lengths = (Lq, Lkv)``: the diagonal blocks are partial
        (token-level bottom-right causal ``mask_mod``), the other selected blocks full.
    """
    if config.output_error is not None and v is None:
        raise ValueError(
            "PrismConfig.output_error fits the thresholds to attention outputs: pass v= to "
            "prism_block_mask (prism_attention and PrismAttention do)"
        )
    check_inputs(q, k, v)
    config.band_dims(q.shape[-1])
    bs = config.block_size
    batch, hq, q_len, _ = q.shape
    kv_len = k.shape[2]
    nq = (q_len + bs - 1) // bs
    nk = (kv_len + bs - 1) // bs
    temperatures = (config.high_temperature, config.low_temperature)
    thresholds = (config.high_threshold, config.low_threshold, _fine_threshold(config))
    rows = max(1, config.max_score_elements // (batch * hq * nk))
    # Pooling runs eagerly in every mode (see pool_blocks: faster than its compiled form).
    q_pool, k_pool = _lengths_only_dynamic(pool_blocks(q, bs), pool_blocks(k, bs))
    fine = {}
    if config.final_block_pool:
        fine = _final_block_inputs(q, k, nq, bs, config.final_block_pool)
    if config.output_error is None and nq <= rows:
        tables = _stage("mask", compiled)(
            q_pool, k_pool, fine, q_len, kv_len, config, *temperatures, *thresholds
        )
    else:
        scores = _stage("score", compiled)(q_pool, k_pool, config, *temperatures)
        scores = dict(zip(scores, _lengths_only_dynamic(*scores.values())), **fine)
        if config.output_error is not None:
            thr = _fit_thresholds(q, k, v, scores, q_len, kv_len, config, scale, compiled)
            thresholds = (thr[:, :, None, None],) * 2 + thresholds[2:]
        tables_fn = _stage("tables", compiled)
        if nq <= rows:
            tables = tables_fn(scores, 0, nq, q_len, kv_len, config, *thresholds)
        else:
            # Score the query blocks in chunks: memory O(rows * Nk) per head, not O(Nq * Nk).
            tables = _empty_tables(batch, hq, nq, nk, q.device)
            for start in range(0, nq, rows):
                n = min(rows, nq - start)
                chunk = tables_fn(scores, start, n, q_len, kv_len, config, *thresholds)
                for dst, src in zip(tables, chunk):
                    dst[:, :, start : start + n].copy_(src)
    # (B, Hq, Nq) and (B, Hq, Nq, Nk): only the head count is a constant.
    tables = _lengths_only_dynamic(*tables, head_dim=False)
    offset = kv_len - q_len
    if offset != 0:
        # A tensor, not an int: as an int, a compiled flex_attention would bake the value in
        # (one recompilation per value) or, traced in the user's graph with dynamic shapes,
        # capture a symbolic size, which its kernel templates cannot take (torch 2.11).
        offset = torch.full((), offset, dtype=torch.int32, device=q.device)
    return block_mask_from_tables(*tables, offset, q_len, kv_len, bs)


def _fit_thresholds(q, k, v, scores, q_len, kv_len, config, scale, compiled) -> Tensor:
    """The fitted top-p threshold of each (batch, head), float32 ``(B, Hq)`` (``fit.py``)."""
    grid = _fit_grid(q.device)
    # traced inline by the user's compile: plain ops in their graph, no cache
    make = _make_fit_samples if torch.compiler.is_compiling() else _fit_samples
    rows, pos = make(q_len, config.block_size, config.fit_query_blocks, config.fit_tokens,
                     q.device)
    q_fit, piece_of, piece_bucket, num, idx, key_pos = _stage("fit", compiled)(
        scores, *_lengths_only_dynamic(q), grid, rows, pos, q_len, kv_len, config,
        _fine_threshold(config),
    )
    if not compiled or q.device.type != "cuda" or torch.compiler.is_compiling():
        # The compiled CPU FlexAttention returns no log-sum-exp, and eager FlexAttention
        # cannot run inside our custom op (graph_op.py): the same sums in plain PyTorch.
        out, lse = fit.fit_attention_plain(q_fit, k, v, piece_of, key_pos, config, scale)
    else:
        mask = fit.fit_block_mask(num, idx, key_pos, kv_len, config)
        m = config.fit_tokens
        # The query tile must divide the mask's query blocks of m rows.
        tile = 64 if m % 64 == 0 else (32 if m % 32 == 0 else 16)
        options = dict(_kernel_options(q.device) or {}, BLOCK_M=tile)
        q_fit, k, v = _lengths_only_dynamic(q_fit, k, v)
        torch._dynamo.mark_static(q_fit, 2)  # S * P * m rows: a constant of the config
        out, aux = _compiled_stage("flex")(
            q_fit, k, v, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
            kernel_options=options, return_aux=AuxRequest(lse=True),
        )
        lse = aux.lse
    return _stage("fitted", compiled)(out, lse, piece_bucket, grid, config,
                                      float(config.output_error))


@functools.lru_cache(maxsize=None)
def _fit_grid(device: torch.device) -> Tensor:
    """:data:`~prism_flex.fit.FIT_THRESHOLDS` on ``device``, made once per device: built in
    the compiled graph, it was copied from the host at every call, and that copy waited for
    the GPU (3-9 ms of host time per call on the H200)."""
    return torch.tensor(fit.FIT_THRESHOLDS, dtype=torch.float32, device=device)


def _make_fit_samples(q_len: int, block_size: int, samples: int, tokens: int,
                      device: torch.device) -> tuple[Tensor, Tensor]:
    """The fit's sampled query blocks and tokens (``fit.fit_rows``, ``fit.fit_positions``),
    int64 ``(S,)`` and ``(S, m)``."""
    rows = fit.fit_rows((q_len + block_size - 1) // block_size, samples, device)
    return rows, fit.fit_positions(rows, q_len, block_size, tokens)


@functools.lru_cache(maxsize=64)
def _fit_samples(q_len: int, block_size: int, samples: int, tokens: int,
                 device: torch.device) -> tuple[Tensor, Tensor]:
    """:func:`_make_fit_samples`, made eagerly once per query length and device: as inputs
    of the compiled fit stage they are loaded, not folded into its index arithmetic (see
    ``fit.fit_inputs``). Their sizes are constants of the config."""
    rows, pos = _make_fit_samples(q_len, block_size, samples, tokens, device)
    torch._dynamo.mark_static(rows, 0)
    torch._dynamo.mark_static(pos, 0)
    torch._dynamo.mark_static(pos, 1)
    return rows, pos


def _lengths_only_dynamic(*tensors: Tensor, head_dim: bool = True) -> tuple[Tensor, ...]:
    """``(B, H, ...)`` tensors whose head count (dim 1) and, with ``head_dim``, last dim (head
    dim, band dims) of 4-dim tensors our compiled stages treat as constants; batch and
    lengths stay dynamic.

    Why: with ``dynamic=True`` every size is symbolic, and dynamo's duck sizing assumes that
    sizes equal at the first call stay equal (Qwen2.5 at 8K tokens: 64 key blocks and head
    dim 64), so the next length recompiled. New tensor objects (``detach``: same storage, no
    view base for dynamo to track), so that the marks never touch a caller's tensor. Not
    applied while a compile of the user's model traces us (it would specialise their graph),
    nor to tensors that require grad (``sparse_attention`` may be given some: detaching them
    would cut the graph).
    """
    if torch.compiler.is_compiling():
        return tensors
    out = []
    for t in tensors:
        if t.requires_grad:
            out.append(t)
            continue
        t = t.detach()
        torch._dynamo.mark_static(t, 1)
        if head_dim and t.dim() == 4:
            torch._dynamo.mark_static(t, 3)
        out.append(t)
    return tuple(out)


def _final_block_inputs(q: Tensor, k: Tensor, nq: int, bs: int, pool: int) -> dict:
    """The pooled inputs of :func:`~prism_flex.scoring.final_block_probs`: the last query
    block over ``pool`` tokens, zero-padded to ``bs / pool`` rows (a constant, marked static:
    a last block of one sub-block would otherwise be specialised as a size-1 dim), and all
    keys over ``pool`` tokens."""
    q_final = pool_blocks(q[:, :, (nq - 1) * bs :], pool)
    q_final = F.pad(q_final, (0, 0, 0, bs // pool - q_final.shape[2]))
    q_final, k_fine = _lengths_only_dynamic(q_final, pool_blocks(k, pool))
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static(q_final, 2)
    return {"q_final": q_final, "k_fine": k_fine}


def _empty_tables(batch, heads, nq, nk, device):
    num = functools.partial(torch.empty, (batch, heads, nq), dtype=torch.int32, device=device)
    idx = functools.partial(torch.empty, (batch, heads, nq, nk), dtype=torch.int32, device=device)
    return num(), idx(), num(), idx()


def block_density(block_mask: BlockMask) -> Tensor:
    """Share of the causally visible (query block, key block) pairs that a mask computes.

    Returns:
        float32 ``(B, H)``.
    """
    q_len, kv_len = block_mask.seq_lengths
    bs = block_mask.BLOCK_SIZE[0]
    nq = block_mask.kv_num_blocks.shape[-1]
    rows = torch.arange(nq, device=block_mask.kv_num_blocks.device)
    last = torch.clamp((rows + 1) * bs, max=q_len) - 1 + (kv_len - q_len)
    visible = (last // bs + 1).sum()
    chosen = block_mask.kv_num_blocks.sum(-1)
    if block_mask.full_kv_num_blocks is not None:
        chosen = chosen + block_mask.full_kv_num_blocks.sum(-1)
    return chosen.float() / visible.float()


def dense_causal_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None
) -> Tensor:
    """Dense causal attention with bottom-right alignment (queries are the last Lq positions).

    Shapes as :func:`prism_attention`. Uses SDPA with native GQA (no repeated K/V).
    """
    q_len, kv_len = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if q_len == kv_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if q_len == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=causal_lower_right(q_len, kv_len), scale=scale, enable_gqa=gqa
    )


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: BlockMask,
    *,
    scale: Optional[float] = None,
    compiled: bool = True,
) -> Tensor:
    """FlexAttention over the blocks of ``block_mask``, with native GQA.

    The compiled ``flex_attention`` that :func:`prism_attention` uses, for masks from
    :func:`prism_block_mask` or any other source (one mask row per query head, or one shared).

    Args:
        q: ``(B, Hq, Lq, D)``; k, v: ``(B, Hkv, Lkv, D)``; block_mask with
            ``seq_lengths == (Lq, Lkv)``.
        compiled: ``False`` runs eager FlexAttention, which ignores the block lists, so the
            mask's blocks are then enforced through its ``mask_mod`` (O(Lq * Lkv) memory).
    Returns:
        ``(B, Hq, Lq, D)``.
    """
    flex = _stage("flex", compiled)
    gqa = q.shape[1] != k.shape[1]
    if not compiled:
        block_mask = with_table_mask_mod(block_mask)
        return flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    options = None if torch.compiler.is_compiling() else _kernel_options(q.device)
    q, k, v = _lengths_only_dynamic(q, k, v)
    return flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                kernel_options=options)


def _kernel_options(device: torch.device) -> Optional[dict]:
    """FlexAttention ``kernel_options`` for ``device``: Hopper (sm90+) loads through TMA.

    Measured on the H200 at 128K tokens (bench/results/h200_tune.json): ``USE_TMA`` made the
    sparse kernel 4-9 % faster with bit-identical outputs; tile sizes, warps and stages other
    than the defaults were slower or equal, and ``PRESCALE_QK`` (a further ~4 %) changes the
    rounding, so it is left off. Elsewhere: the defaults. (Not applied when ``sparse_attention``
    is traced inline by a compile of the user's model: no device query in their graph.)
    """
    if device.type != "cuda":
        return None
    return dict(_cuda_options(device.index if device.index is not None else
                              torch.cuda.current_device()))


@functools.lru_cache(maxsize=None)
def _cuda_options(index: int) -> tuple:
    major, _ = torch.cuda.get_device_capability(index)
    return (("USE_TMA", True),) if major >= 9 else ()


@_uniform_dispatch_keys
@torch.no_grad()  # inference only; also keeps the compiled stages' grad-mode guard constant
def prism_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    config: PrismConfig = _DEFAULT_CONFIG,
    *,
    scale: Optional[float] = None,
    return_density: bool = False,
    compiled: bool = True,
):
    """Causal attention over the Prism-selected blocks; a drop-in for
    ``F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)``.

    Args:
        q: ``(B, Hq, Lq, D)`` after RoPE; k, v: ``(B, Hkv, Lkv, D)``; ``Hq % Hkv == 0`` (GQA
            is native: K/V are never repeated); ``Lq <= Lkv`` (a prefill chunk continuing a
            KV cache sits at the end, bottom-right causal alignment).
        config: selection settings; ``Lq < config.dense_below`` runs dense attention.
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_density: also return the per-head block density.
        compiled: use the compiled scoring and ``flex_attention``. ``False`` runs everything
            eagerly (FlexAttention then evaluates the mask on every pair: O(Lq * Lkv)
            memory; for tests and debugging at small sizes).
    Returns:
        ``(B, Hq, Lq, D)`` in the input dtype, and with ``return_density`` a float32
        ``(B, Hq)`` tensor: selected / causally visible blocks (1.0 on the dense path).
    """
    check_inputs(q, k, v)
    # Inference only. Detached as well as under no_grad: FlexAttention on CPU rejects inputs
    # that require grad even under no_grad (e.g. from a model called outside no_grad).
    q, k, v = q.detach(), k.detach(), v.detach()
    if compiled and torch.compiler.is_compiling():
        # Traced by a compile of the user's model: run as one opaque op (graph_op.py).
        out, density = graph_op.call(q, k, v, config, scale)
        return (out, density) if return_density else out
    if q.shape[2] < config.dense_below:
        out = dense_causal_attention(q, k, v, scale=scale)
        if return_density:
            return out, torch.ones(q.shape[:2], dtype=torch.float32, device=q.device)
        return out
    mask = prism_block_mask(q, k, config, v=v, scale=scale, compiled=compiled)
    out = sparse_attention(q, k, v, mask, scale=scale, compiled=compiled)
    if return_density:
        return out, block_density(mask)
    return out

