"""Public functions: Prism block mask and Prism attention.

Each entry checks its inputs, decides once how to run (:class:`~prism_flex._compile.Mode`:
eager, compiled by us, or traced by a ``torch.compile`` of the user's model) and hands over
to ``pipeline.py``. Traced, :func:`prism_attention` becomes one opaque custom op (below),
which runs the same compiled pipeline on real tensors.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from . import documents, pipeline
from ._compile import Mode, uniform_dispatch_keys
from .config import PrismConfig
from .scoring import BandScores
from .selection import Selection, Thresholds, select_rows

__all__ = [
    "check_inputs",
    "score_inputs",
    "select_blocks",
    "prism_block_mask",
    "prism_attention",
    "sparse_attention",
    "dense_causal_attention",
    "block_density",
    "takes_dense_path",
    "MAX_HEADS",
]

_DEFAULT_CONFIG = PrismConfig()

#: Largest head count taken (the largest public models have 128 query heads). Why a limit:
#: a tensor in the (B, L, H, D) layout of FlashAttention has the sequence where the heads
#: belong, and passes every other check when Hq == Hkv; its "head count" is then a length.
MAX_HEADS = 1024

_LAYOUT_HINT = (
    "prism_flex takes the (batch, heads, seq_len, head_dim) layout of "
    "F.scaled_dot_product_attention; for (batch, seq_len, heads, head_dim) tensors (the "
    "FlashAttention layout) pass q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)"
)


def check_inputs(q: Tensor, k: Tensor, v: Optional[Tensor] = None) -> None:
    """Raise ``TypeError``/``ValueError`` for inputs the attention cannot take.

    Expected: q ``(B, Hq, Lq, D)``, k and v ``(B, Hkv, Lkv, D)``, one floating dtype and one
    device, ``Hq % Hkv == 0``, ``1 <= Hq <= MAX_HEADS``, ``1 <= Lq <= Lkv``, ``D`` even.
    NaN and Inf are not looked for (that would synchronise with the GPU): they propagate as
    in SDPA.
    """
    if _plainly_valid(q, k, v):
        return
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
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}"
    if max(hq, hkv) > MAX_HEADS:
        raise ValueError(
            f"{shapes}: more than {MAX_HEADS} heads, which looks like a sequence length in "
            f"the heads dim. {_LAYOUT_HINT}"
        )
    if bk != bq:
        raise ValueError(f"q and k must have the same batch size, got {bq} and {bk}")
    if dk != d:
        raise ValueError(f"q and k must have the same head_dim, got {d} and {dk}")
    if v is not None and tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(
            f"{shapes}: the number of query heads ({hq}) must be a multiple of the number of "
            f"key/value heads ({hkv}). {_LAYOUT_HINT}"
        )
    if lq == 0 or lkv == 0 or bq == 0:
        raise ValueError(f"empty input: batch={bq}, q_len={lq}, kv_len={lkv}")
    if lq > lkv:
        raise ValueError(
            f"{shapes}: q_len ({lq}) must not exceed kv_len ({lkv}): queries are the last "
            f"q_len positions of the key sequence (bottom-right causal alignment). If the "
            f"heads are in dim 2: {_LAYOUT_HINT}"
        )
    if d % 2:
        raise ValueError(f"head_dim must be even (RoPE pairs), got {d}")


def _plainly_valid(q, k, v) -> bool:
    """The common case of :func:`check_inputs` in one expression, building no message: it is
    on the path of every attention call, and short prefills are host-bound (bench/NOTES.md,
    ninth round). ``False`` sends the inputs through the detailed checks, which raise."""
    if not (isinstance(q, Tensor) and isinstance(k, Tensor)):
        return False
    if v is not None and not (isinstance(v, Tensor) and v.shape == k.shape):
        return False
    qs, ks, dtype, device = q.shape, k.shape, q.dtype, q.device
    return (
        len(qs) == 4
        and len(ks) == 4
        and q.is_floating_point()
        and k.dtype == dtype
        and k.device == device
        and (v is None or (v.dtype == dtype and v.device == device))
        and qs[0] == ks[0] > 0
        and qs[3] == ks[3]
        and qs[3] % 2 == 0
        and 0 < ks[1] <= qs[1] <= MAX_HEADS
        and qs[1] % ks[1] == 0
        and 0 < qs[2] <= ks[2]
    )


def _check_config(config) -> None:
    if not isinstance(config, PrismConfig):
        raise TypeError(f"config must be a PrismConfig, got {type(config).__name__}")


def score_inputs(q: Tensor, k: Tensor, config: PrismConfig = _DEFAULT_CONFIG) -> BandScores:
    """The per-call part of the scoring, eagerly: pooled bands and their logit divisors.

    Args:
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hkv, Lkv, D)``.
    Returns:
        :class:`~prism_flex.scoring.BandScores`.
    """
    check_inputs(q, k)
    _check_config(config)
    pooled = pipeline.pool_inputs(q.detach(), k.detach(), config, Mode.EAGER)
    return pipeline.band_scores(pooled, config, Mode.EAGER)


def select_blocks(
    scores: BandScores,
    row_start: int,
    num_rows: int,
    q_len: int,
    kv_len: int,
    config: PrismConfig = _DEFAULT_CONFIG,
) -> Selection:
    """Selected key blocks of query blocks ``row_start .. row_start + num_rows - 1``, eagerly.

    Args:
        scores: the output of :func:`score_inputs`.
    Returns:
        :class:`~prism_flex.selection.Selection`: ``selected`` bool ``(B, Hq, R, Nk)``,
        ``allowed`` and ``diagonal`` bool ``(R, Nk)``.
    """
    rows = torch.arange(num_rows, device=scores.q_high.device) + row_start
    return select_rows(config, scores, rows, q_len, kv_len, *Thresholds.of(config))


@uniform_dispatch_keys
@torch.no_grad()
def prism_block_mask(
    q: Tensor,
    k: Tensor,
    config: PrismConfig = _DEFAULT_CONFIG,
    *,
    v: Optional[Tensor] = None,
    scale: Optional[float] = None,
    compiled: bool = True,
    key_padding_mask: Optional[Tensor] = None,
    document_ids: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
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
        key_padding_mask, document_ids, cu_seqlens: padding and packed documents, as
            :func:`prism_attention` takes them.
    Returns:
        A forward-only ``BlockMask`` with one row per *query* head, ``BLOCK_SIZE =
        config.block_size``, ``seq_lengths = (Lq, Lkv)``: the diagonal blocks are partial
        (token-level bottom-right causal ``mask_mod``), the other selected blocks full.
        Index tables are full width, ``(B, Hq, Nq, Nk)`` int32, twice: at very long inputs
        :func:`prism_attention` makes them per chunk of queries instead. With padding or
        documents the ``mask_mod`` is the token rule (causal, same document, real key) and
        every block holding a boundary or padding is partial.
    """
    _check_config(config)
    segments = _segments(q, k, key_padding_mask, document_ids, cu_seqlens, compiled)
    if segments is not None and config.output_error is not None:
        raise NotImplementedError(_FIT_DOCUMENTS_ERROR)
    if config.output_error is not None and v is None:
        raise ValueError(
            "PrismConfig.output_error fits the thresholds to attention outputs: pass v= to "
            "prism_block_mask (prism_attention and PrismAttention do)"
        )
    check_inputs(q, k, v)
    config.band_dims(q.shape[-1])
    mode = Mode.at_entry(compiled)
    tables = pipeline.block_tables(
        q.detach(), k.detach(), None if v is None else v.detach(), config, scale, mode, segments
    )
    return pipeline.table_block_mask(tables, q.shape[2], k.shape[2], 0, config, q.device, segments)


_FIT_DOCUMENTS_ERROR = (
    "PrismConfig.output_error (the threshold fit) does not support key_padding_mask, "
    "document_ids or cu_seqlens yet: set output_error=None (fixed thresholds) for padded or "
    "packed calls"
)


def _segments(q, k, key_padding_mask, document_ids, cu_seqlens, compiled):
    """The :class:`~prism_flex.documents.Segments` of a call (``None`` without padding or
    documents); value checks read the tensors (one host sync) except while traced."""
    if key_padding_mask is None and document_ids is None and cu_seqlens is None:
        return None
    check_values = not (compiled and torch.compiler.is_compiling())
    return documents.make_segments(
        key_padding_mask,
        document_ids,
        cu_seqlens,
        q.shape[0],
        k.shape[2],
        q.device,
        check_values,
    )


def block_density(block_mask: BlockMask) -> Tensor:
    """Share of the causally visible (query block, key block) pairs that a mask computes.

    Returns:
        float32 ``(B, H)``.
    """
    q_len, kv_len = block_mask.seq_lengths
    nq = block_mask.kv_num_blocks.shape[-1]
    visible = pipeline.visible_blocks(
        q_len, kv_len, block_mask.BLOCK_SIZE[0], nq, block_mask.kv_num_blocks.device
    )
    chosen = block_mask.kv_num_blocks.sum(-1)
    if block_mask.full_kv_num_blocks is not None:
        chosen = chosen + block_mask.full_kv_num_blocks.sum(-1)
    return chosen.float() / visible


def dense_causal_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None
) -> Tensor:
    """Dense causal attention with bottom-right alignment (queries are the last Lq positions).

    Shapes as :func:`prism_attention`. SDPA with native GQA (no repeated K/V), its backend as
    torch picks it (cuDNN on torch 2.11 with Hopper). Differentiable.
    """
    check_inputs(q, k, v)
    return pipeline.dense_attention(q, k, v, scale, Mode.at_entry(compiled=True))


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
    check_inputs(q, k, v)
    if tuple(block_mask.seq_lengths) != (q.shape[2], k.shape[2]):
        raise ValueError(
            f"block_mask.seq_lengths {tuple(block_mask.seq_lengths)} must be (q_len, kv_len) "
            f"= {(q.shape[2], k.shape[2])}"
        )
    return pipeline.sparse_attention(q, k, v, block_mask, scale, Mode.at_entry(compiled))


def prism_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    config: PrismConfig = _DEFAULT_CONFIG,
    *,
    scale: Optional[float] = None,
    return_density: bool = False,
    compiled: bool = True,
    key_padding_mask: Optional[Tensor] = None,
    document_ids: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
):
    """Causal attention over the Prism-selected blocks; a drop-in for
    ``F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)``.

    Args:
        q: ``(B, Hq, Lq, D)`` after RoPE; k, v: ``(B, Hkv, Lkv, D)``; ``Hq % Hkv == 0`` (GQA
            is native: K/V are never repeated); ``Lq <= Lkv`` (a prefill chunk continuing a
            KV cache sits at the end, bottom-right causal alignment). Without the three
            arguments below, every key is attended causally.
        config: selection settings; calls too small for sparsity to pay run dense attention
            (:meth:`PrismConfig.runs_dense`).
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_density: also return the per-head block density.
        compiled: use the compiled scoring and ``flex_attention``. ``False`` runs everything
            eagerly (FlexAttention then evaluates the mask on every pair: O(Lq * Lkv)
            memory; for tests and debugging at small sizes).
        key_padding_mask: bool ``(B, Lkv)``, True for a real token, False for padding (the
            Hugging Face ``attention_mask`` convention: pass ``attention_mask.bool()``; left,
            right or any padding).
        document_ids: integer ``(B, Lkv)``: tokens with equal ids are one document (packed
            sequences); each document must be one contiguous run of tokens (checked: one
            host sync and a sort of each row, eager calls only). Ids need not be sorted.
        cu_seqlens: integer ``(N + 1,)``: FlashAttention-varlen offsets of ``N`` documents
            packed in one row (``B == 1``): ``0 = cu[0] < cu[1] < ... < cu[N] = Lkv``
            (checked: one host sync, eager calls only). Exclusive with ``document_ids``;
            either combines with ``key_padding_mask``.

            With any of them, the query at position ``p`` (queries are the last ``Lq`` of
            the ``Lkv`` positions) attends key ``j`` iff ``j <= p``, both are in the same
            document and ``j`` is not padding; query rows at padded positions output
            zeros. No block crosses a boundary: scores, top-p, sink and local blocks are per
            document, and a packed row of documents whose lengths are multiples of the block
            size selects what each document would alone (``prism_flex/documents.py``). The
            dense path (small calls, inputs that require grad) uses SDPA with the same rule
            as a boolean mask. Not with ``config.output_error`` (``NotImplementedError``).
    Returns:
        ``(B, Hq, Lq, D)`` in the input dtype, and with ``return_density`` a float32
        ``(B, Hq)`` tensor: selected / causally visible blocks (1.0 on the dense path).

    Inference only. With grad enabled and an input that requires grad (a model in training),
    the call runs dense attention, which is differentiable, and warns once: the result is
    exact and its gradients are right, but nothing is saved.
    """
    check_inputs(q, k, v)
    _check_config(config)
    config.band_dims(q.shape[-1])
    segments = _segments(q, k, key_padding_mask, document_ids, cu_seqlens, compiled)
    return attention_with_segments(q, k, v, config, scale, return_density, compiled, segments)


def attention_with_segments(q, k, v, config, scale, return_density, compiled, segments):
    """:func:`prism_attention` of checked inputs with padding/documents already in their
    internal form (``None``: none), e.g. made once per forward by an integration."""
    if segments is not None and config.output_error is not None:
        raise NotImplementedError(_FIT_DOCUMENTS_ERROR)
    mode = Mode.at_entry(compiled)
    if _needs_grad(q, k, v) and mode is not Mode.TRACED:
        warnings.warn(
            "prism_attention is inference only: inputs that require grad run dense "
            "attention (exact, differentiable, no speed-up). For sparse prefill call the "
            "model under torch.inference_mode() or torch.no_grad().",
            stacklevel=3,
        )
    if mode is Mode.TRACED and not _needs_grad(q, k, v):
        # The size rule is decided inside the op, on real sizes (no guard in the user's graph).
        if segments is None:
            out, density = _prism_op(q, k, v, config.to_json(), scale)
        else:
            out, density = _prism_documents_op(
                q, k, v, config.to_json(), scale, segments.ids, segments.padded
            )
        return (out, density) if return_density else out
    out, density = _run(q, k, v, config, scale, mode, segments, density=return_density)
    return (out, density) if return_density else out


def takes_dense_path(q: Tensor, k: Tensor, v: Tensor, config: PrismConfig) -> bool:
    """Whether :func:`prism_attention` runs dense attention for these inputs (eager calls):
    inputs that require grad with grad enabled, or a call too small for sparsity to pay
    (:meth:`PrismConfig.runs_dense`). Host-side: no tensor is read."""
    return _needs_grad(q, k, v) or config.runs_dense(q.shape, k.shape[2])


def _needs_grad(q: Tensor, k: Tensor, v: Tensor) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _run(q, k, v, config, scale, mode, segments=None, *, density: bool = True):
    """``(out, density)``: dense attention (differentiable) where :func:`takes_dense_path`,
    else the Prism pipeline on detached inputs. On the dense path the density (all ones) is
    made only with ``density=True`` (else ``None``): the dense path is most of the calls of
    short prompts, whose forward is host-bound."""
    if takes_dense_path(q, k, v, config):
        out = pipeline.dense_attention(q, k, v, scale, mode, segments)
        ones = torch.ones(q.shape[:2], dtype=torch.float32, device=q.device) if density else None
        return out, ones
    return _sparse(q.detach(), k.detach(), v.detach(), config, scale, mode, segments)


@uniform_dispatch_keys
@torch.no_grad()
def _sparse(q, k, v, config, scale, mode, segments=None):
    if mode is not Mode.COMPILED or q.shape[0] == 1:
        return pipeline.prism_forward(q, k, v, config, scale, mode, segments)
    # Compiled, a batch runs row by row. Why: dynamo specialises a size of 1, so batch 1 (the
    # usual first call) compiled every stage again at the first batch of 2; one row at a time,
    # one compilation (and one set of CUDA graphs) serves every batch size. The rows are
    # independent, so the result is the same; the cost is a launch sequence per row, small
    # where sparsity pays (long rows), and an output copy. With documents, every row takes
    # the batch's largest document count (counted once).
    if segments is not None:
        segments = segments._replace(num_docs=documents.count_documents(segments))
    rows = [
        pipeline.prism_forward(
            q[i : i + 1],
            k[i : i + 1],
            v[i : i + 1],
            config,
            scale,
            mode,
            None if segments is None else segments._replace(ids=segments.ids[i : i + 1]),
        )
        for i in range(q.shape[0])
    ]
    return torch.cat([out for out, _ in rows]), torch.cat([density for _, density in rows])


# Traced inline into a user's compiled model, FlexAttention with a mask computed in the same
# graph trips several bugs of torch's inductor (torch 2.11 and 2.13): on CPU, an elementwise
# op fused onto its output ("Unsupported for epilogue_nodes in CppFlexAttentionTemplate"), a
# tensor or symbolic ``kv_len - q_len`` captured by the ``mask_mod`` ("NoValidChoicesError"),
# a query that is a view of a 2-d buffer; on CUDA, "CantSplit" in the Triton code generation
# when K/V are slices of a KV cache written in the graph. Behind a custom op (the public
# extension point, ``torch.library.custom_op``) the user's graph sees one opaque call, and
# the op runs our compiled pipeline on real tensors, as in eager use. The config crosses the
# op boundary once, as its JSON form (``PrismConfig.to_json``).
@torch.library.custom_op("prism_flex::prism_attention", mutates_args=())
def _prism_op(
    q: Tensor, k: Tensor, v: Tensor, config_json: str, scale: Optional[float]
) -> tuple[Tensor, Tensor]:
    config = PrismConfig.from_json(config_json)
    out, density = _run(q, k, v, config, scale, Mode.COMPILED)
    # Contiguous, as the fake below promises (flex_attention's output follows q's strides).
    return out.contiguous(), density


@_prism_op.register_fake
def _(q, k, v, config_json, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        q.shape[:2], dtype=torch.float32
    )


# The same op with padding/documents: the per-token ids cross the boundary as a tensor (the
# internal form, ``documents.Segments.ids``), the number of documents is counted inside on
# real tensors.
@torch.library.custom_op("prism_flex::prism_attention_documents", mutates_args=())
def _prism_documents_op(
    q: Tensor, k: Tensor, v: Tensor, config_json: str, scale: Optional[float], ids: Tensor,
    padded: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    config = PrismConfig.from_json(config_json)
    segments = documents.Segments(ids, None, padded)
    out, density = _run(q, k, v, config, scale, Mode.COMPILED, segments)
    return out.contiguous(), density


@_prism_documents_op.register_fake
def _(q, k, v, config_json, scale, ids, padded):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        q.shape[:2], dtype=torch.float32
    )
