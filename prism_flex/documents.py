"""Padded batches and packed documents: where one sequence ends and the next begins.

Users bring three forms (the public entries take them as keyword-only arguments):

- ``key_padding_mask``: bool ``(B, Lkv)``, True for a real token (the Hugging Face
  ``attention_mask`` convention; left, right or any padding);
- ``document_ids``: integer ``(B, Lkv)``, equal ids = same document (HF's ``position_ids``
  packing, ``DataCollatorWithFlattening``); each document one contiguous run of tokens;
- ``cu_seqlens``: integer ``(N + 1,)``, FlashAttention-varlen offsets over one packed row.

All become one :class:`Segments`: int32 ids ``(B, Lkv)``, the document's *ordinal* in its row
(0, 1, ... in order of position) and ``-1`` for padding. The token rule, with queries the
last ``Lq`` of the ``Lkv`` positions (bottom-right, as without documents): the query at
position ``p`` sees key ``j`` iff ``j <= p``, ``id[j] == id[p]`` and ``id[j] != -1``. Query
rows at padded positions see nothing and output zeros.

How the selection respects it (never leaking, exact for block-aligned documents):

- block means are over a block's real tokens; a block with none is never chosen;
- a query block holding one document scores only the key blocks that hold tokens of that
  document (the others get ``-inf`` before the block softmax: the top-p mass is per
  document); its sink is the key block of the document's first token; its diagonal, local
  and ``final_block_pool`` blocks are restricted to its document; ``dense_final_blocks``
  counts the last query blocks of each document;
- a query block holding tokens of two or more documents (at most one per boundary) keeps
  every key block visible to any of them (a dense row: exact, cheap);
- energy calibration is per (batch, head, document): the rms run over the document's blocks
  (a block counts for the document of its first real token);
- the ``BlockMask``'s ``mask_mod`` is the token rule itself, and a block is a *full* block
  (no ``mask_mod``) only when every token pair in it satisfies the rule: a block that holds
  a boundary or padding is always partial.

So for documents whose lengths (and padding) are multiples of the block size, a packed row
gives the masks of its documents run one by one (up to float32 rounding of the block means
and temperatures). For unaligned documents, a block straddling a boundary is pooled over the
real tokens of both documents and calibrated with the first one's: its scores mix them, but
attention never crosses the boundary (the ``mask_mod``).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .block_mask import BlockTables, compact_blocks
from .scoring import band, band_logits, pool_blocks, rows_diagonal_range
from .selection import top_p_select

__all__ = [
    "Segments",
    "make_segments",
    "count_documents",
    "DocLayout",
    "doc_layout",
    "DocPooled",
    "pool_documents",
    "DocScores",
    "score_documents",
    "fine_document_picks",
    "select_document_tables",
    "key_windows",
    "document_mask_mod",
    "dense_document_mask",
    "visible_document_blocks",
]

# Larger than any position: the first real position of a block that has none.
_NONE_LO = torch.iinfo(torch.int32).max


class Segments(NamedTuple):
    """Where documents and padding are: ``ids`` int32 ``(B, Lkv)``, each token's document
    ordinal in its row (0, 1, ... by position), ``-1`` for padding; ``num_docs``: the largest
    number of documents in a row when known without reading ``ids`` (``None``: count them,
    :func:`count_documents`); ``padded``: some key may be padding (a mask was given);
    ``lengths``: the documents' token counts of a single row when the host already has them
    (``cu_seqlens``, read once by its validation), else ``None``."""

    ids: Tensor
    num_docs: Optional[int]
    padded: bool
    lengths: Optional[tuple[int, ...]] = None


def _shape_error(name, t, batch, kv_len, what):
    return ValueError(
        f"{name} must have shape (batch, kv_len) = ({batch}, {kv_len}), {what}; got shape "
        f"{tuple(t.shape)}"
    )


def make_segments(
    key_padding_mask: Optional[Tensor],
    document_ids: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    batch: int,
    kv_len: int,
    device: torch.device,
    check_values: bool,
) -> Optional[Segments]:
    """Validate the user's form(s) and convert to :class:`Segments` (``None`` when none given).

    Shapes, dtypes and devices are always checked. Values (cu_seqlens monotone and covering
    the row, each document contiguous) need their contents: with ``check_values`` (an eager
    call: one host sync, O(B * Lkv log Lkv) for ``document_ids``) they raise ``ValueError``;
    otherwise (traced in a user's ``torch.compile``) they are ``torch._assert_async``.
    """
    if document_ids is not None and cu_seqlens is not None:
        raise ValueError(
            "pass either document_ids (per-token ids, (batch, kv_len)) or cu_seqlens "
            "(FlashAttention varlen offsets, (num_docs + 1,)), not both"
        )
    if key_padding_mask is None and document_ids is None and cu_seqlens is None:
        return None
    real = None
    if key_padding_mask is not None:
        m = key_padding_mask
        if not isinstance(m, Tensor) or m.dtype != torch.bool:
            raise TypeError(
                "key_padding_mask must be a torch.bool tensor, True for real tokens (the "
                "Hugging Face attention_mask convention: pass attention_mask.bool()); got "
                f"{getattr(m, 'dtype', type(m).__name__)}"
            )
        if m.dim() != 2 or tuple(m.shape) != (batch, kv_len):
            raise _shape_error("key_padding_mask", m, batch, kv_len, "True for real tokens")
        if m.device != device:
            raise ValueError(f"key_padding_mask must be on {device}, got {m.device}")
        real = m
    pos = torch.arange(kv_len, device=device)
    num_docs = None
    lengths = None
    if cu_seqlens is not None:
        c = cu_seqlens
        if not isinstance(c, Tensor) or c.dim() != 1 or c.is_floating_point() or c.is_complex():
            raise TypeError(
                "cu_seqlens must be a 1-D integer tensor of document offsets (num_docs + 1,), "
                f"starting at 0 and ending at kv_len; got {_describe(c)}"
            )
        if c.dtype == torch.bool or c.shape[0] < 2:
            raise ValueError(
                f"cu_seqlens must hold num_docs + 1 >= 2 integer offsets, got {_describe(c)}"
            )
        if batch != 1:
            raise ValueError(
                f"cu_seqlens describes one packed row: batch must be 1, got {batch}. For a "
                "batch of packed rows pass document_ids (batch, kv_len) instead"
            )
        on_host = c.device.type == "cpu"
        if c.device != device and not on_host:
            host = "" if device.type == "cpu" else " or on the CPU (no device sync)"
            raise ValueError(f"cu_seqlens must be on {device}{host}, got {c.device}")
        c = c.long()
        msg = (
            f"cu_seqlens must start at 0, end at kv_len ({kv_len}) and strictly increase "
            "(no zero-length documents)"
        )
        if check_values:
            # One host read of the offsets (small): checked here, and the document lengths
            # kept for the per-document path (pipeline._document_spans), which then needs
            # no device read of its own. Offsets on the CPU need no device read at all (a
            # read of device offsets waits for the GPU's queue to drain, at every call).
            offsets = c.tolist()
            lengths = tuple(b - a for a, b in zip(offsets[:-1], offsets[1:]))
            if offsets[0] != 0 or offsets[-1] != kv_len or min(lengths) <= 0:
                raise ValueError(f"{msg}; got {offsets if len(offsets) <= 16 else c}")
        if on_host and device.type != "cpu":
            # Pinned: a copy from pageable memory may wait for the stream (not while traced in
            # a user's graph, where the copy is the graph's own).
            c = c.pin_memory().to(device, non_blocking=True) if check_values else c.to(device)
        if not check_values:
            ok = (c[0] == 0) & (c[-1] == kv_len) & (c.diff() > 0).all()
            torch._assert_async(ok, msg)
        doc = torch.searchsorted(c[1:], pos, right=True)[None]
        num_docs = c.shape[0] - 1
    elif document_ids is not None:
        d = document_ids
        if not isinstance(d, Tensor) or d.is_floating_point() or d.is_complex():
            raise TypeError(f"document_ids must be an integer tensor, got {_describe(d)}")
        if d.dtype == torch.bool:
            raise TypeError("document_ids must be an integer tensor, got torch.bool")
        if d.dim() != 2 or tuple(d.shape) != (batch, kv_len):
            raise _shape_error("document_ids", d, batch, kv_len, "one document id per token")
        if d.device != device:
            raise ValueError(f"document_ids must be on {device}, got {d.device}")
        doc = d.long()
    else:
        doc = torch.zeros((1, kv_len), dtype=torch.long, device=device)
        num_docs = 1
    doc = doc.expand(batch, kv_len)
    if real is None and document_ids is None:
        # Offsets (or nothing) without padding: the searchsorted ids already are the
        # ordinals 0, 1, ... by position (skips _ordinals' scans: ~0.4 ms of GPU time at 128K
        # tokens on the H100, on every packed call).
        return Segments(doc.int(), num_docs, False, lengths)
    if real is None:
        real = torch.ones((batch, kv_len), dtype=torch.bool, device=device)
    ids, new = _ordinals(doc, real)
    if document_ids is not None:
        # Each id one contiguous run (padding inside it allowed): runs == distinct ids.
        runs = new.sum(1)
        big = torch.iinfo(torch.long).min
        s = torch.sort(torch.where(real, doc, big), dim=1).values
        distinct = ((s[:, 1:] != s[:, :-1]) & (s[:, 1:] != big)).sum(1) + (s[:, 0] != big)
        ok = (runs == distinct).all()
        msg = (
            "document_ids: each document must be one contiguous run of tokens (padding "
            "between its tokens is allowed); an id occurs in two separate runs. Give each run "
            "its own id, e.g. ids = torch.cat([ids[:, :1] * 0, (ids.diff(dim=1) != 0).long()"
            "], 1).cumsum(1)"
        )
        if check_values:
            if not bool(ok):
                bad = (runs != distinct).nonzero().flatten().tolist()
                raise ValueError(f"{msg} (rows {bad})")
        else:
            torch._assert_async(ok, msg)
    padded = key_padding_mask is not None
    return Segments(ids, num_docs, padded, None if padded else lengths)


def _describe(t) -> str:
    if isinstance(t, Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def _ordinals(doc: Tensor, real: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token document ordinal (int32, -1 for padding) and the flags of each document's
    first real token, from raw ids ``doc`` (int64 ``(B, L)``) and ``real`` (bool)."""
    b, length = doc.shape
    pos = torch.arange(length, device=doc.device).expand(b, length)
    last_real = torch.where(real, pos, -1).cummax(1).values
    prev = torch.cat([last_real.new_full((b, 1), -1), last_real[:, :-1]], 1)
    prev_doc = doc.gather(1, prev.clamp_min(0))
    new = real & ((prev < 0) | (prev_doc != doc))
    ordinal = new.cumsum(1, dtype=torch.int32) - 1
    return torch.where(real, ordinal, -1), new


def count_documents(segments: Segments) -> int:
    """Largest number of documents in a row (at least 1); reads ``ids`` (one host sync)
    unless :attr:`Segments.num_docs` is known."""
    if segments.num_docs is not None:
        return segments.num_docs
    return max(1, int(segments.ids.max()) + 1)


class DocLayout(NamedTuple):
    """Block-level view of :class:`Segments` for one call (positions absolute, in keys).

    Query blocks ``(B, Nq)``: ``q_lo``/``q_hi`` first/last real query position (``_NONE_LO``
    / -1 when none), ``q_start`` the position of the first token of ``q_lo``'s document,
    ``q_doc`` that document's ordinal (``M`` when none), ``q_multi`` tokens of two or more
    documents, ``q_pure`` every token real and of one document. Key blocks ``(B, Nk)``:
    ``k_lo``, ``k_hi``, ``k_doc``, ``k_pure`` alike. Documents ``(B, M + 1)`` (the last slot a
    dummy): ``final_row`` the query block of each document's last real query token (-1: no
    query token), ``doc_start`` its first position. ``num_docs``: ``M``.
    """

    q_lo: Tensor
    q_hi: Tensor
    q_start: Tensor
    q_doc: Tensor
    q_multi: Tensor
    q_pure: Tensor
    k_lo: Tensor
    k_hi: Tensor
    k_doc: Tensor
    k_pure: Tensor
    final_row: Tensor
    doc_start: Tensor
    num_docs: int


def _extent(real: Tensor, offset: int, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """First/last real position and real count of each run of ``size`` tokens of ``real``
    (bool ``(B, L)``, token ``t`` at absolute position ``t + offset``)."""
    b, length = real.shape
    n = (length + size - 1) // size
    pos = torch.arange(length, device=real.device) + offset
    lo = torch.where(real, pos, _NONE_LO)
    hi = torch.where(real, pos, -1)
    pad = n * size - length
    lo = F.pad(lo, (0, pad), value=_NONE_LO).view(b, n, size).amin(-1)
    hi = F.pad(hi, (0, pad), value=-1).view(b, n, size).amax(-1)
    count = F.pad(real.int(), (0, pad)).view(b, n, size).sum(-1)
    return lo, hi, count


def _block_lengths(length: int, size: int, device) -> Tensor:
    """Tokens in each run of ``size`` of a length-``length`` sequence (the tail is short)."""
    n = (length + size - 1) // size
    starts = torch.arange(n, device=device) * size
    return torch.clamp(length - starts, max=size)


def doc_layout(segments: Segments, q_len: int, block_size: int, num_docs: int) -> DocLayout:
    """The :class:`DocLayout` of a ``(q_len, kv_len)`` call (eager, O(B * Lkv))."""
    ids = segments.ids.long()
    b, kv_len = ids.shape
    offset = kv_len - q_len
    device = ids.device
    real = ids >= 0
    pos = torch.arange(kv_len, device=device).expand(b, kv_len)
    first = real & torch.cat(
        [torch.ones_like(real[:, :1]), ids[:, 1:] != _prev_real_id(ids, real)], 1
    )
    start = torch.where(first, pos, -1).cummax(1).values  # first token of p's document

    def side(r: Tensor, off: int, length: int):
        lo, hi, count = _extent(r, off, block_size)
        lo_c = (lo - off).clamp(0, length - 1)
        hi_c = (hi - off).clamp(0, length - 1)
        seg = ids[:, off:]
        d_lo, d_hi = seg.gather(1, lo_c), seg.gather(1, hi_c)
        empty = hi < 0
        doc = torch.where(empty, num_docs, d_lo)
        multi = ~empty & (d_lo != d_hi)
        pure = (count == _block_lengths(length, block_size, device)) & ~multi
        s = start[:, off:].gather(1, lo_c)
        return lo, hi, s, doc, multi, pure

    q_lo, q_hi, q_start, q_doc, q_multi, q_pure = side(real[:, offset:], offset, q_len)
    k_lo, k_hi, _, k_doc, _, k_pure = side(real, 0, kv_len)
    # Each document's last real query token -> its query block; its first token's position.
    q_ids = ids[:, offset:].clamp_min(-1)
    slot = torch.where(q_ids >= 0, q_ids, num_docs)
    qpos = torch.arange(q_len, device=device).expand(b, q_len)
    last_q = torch.full((b, num_docs + 1), -1, dtype=torch.long, device=device)
    last_q = last_q.scatter_reduce(1, slot, torch.where(q_ids >= 0, qpos, -1), "amax")
    final_row = torch.where(last_q >= 0, last_q // block_size, -1)
    final_row[:, num_docs] = -1
    kslot = torch.where(real, ids, num_docs)
    doc_start = torch.full((b, num_docs + 1), kv_len, dtype=torch.long, device=device)
    doc_start = doc_start.scatter_reduce(1, kslot, torch.where(real, pos, kv_len), "amin")
    return DocLayout(
        q_lo, q_hi, q_start, q_doc, q_multi, q_pure, k_lo, k_hi, k_doc, k_pure, final_row,
        doc_start, num_docs,
    )  # fmt: skip


def _prev_real_id(ids: Tensor, real: Tensor) -> Tensor:
    """For positions 1..L-1: the id of the last real token before it (-2 when none)."""
    b, length = ids.shape
    pos = torch.arange(length, device=ids.device).expand(b, length)
    last_real = torch.where(real, pos, -1).cummax(1).values[:, :-1]
    return torch.where(last_real >= 0, ids.gather(1, last_real.clamp_min(0)), -2)


def _masked_pool(x: Tensor, weight: Tensor, size: int) -> Tensor:
    """Mean of each run of ``size`` tokens of ``x`` ``(B, H, L, D)`` over the tokens where
    ``weight`` (bool ``(B, L)``) is True; 0 for a run with none. Float32 ``(B, H, N, D)``.

    One copy of ``x`` in its own dtype with the padded tokens zeroed (exact), reduced as
    ``scoring.pool_blocks`` reduces (float32 sums of the full runs' view, the tail on its
    own), then divided by the real counts: without padding, bit for bit ``pool_blocks``."""
    b, _, length, _ = x.shape
    n = (length + size - 1) // size
    xm = x * weight[:, None, :, None].to(x.dtype)
    full = length // size
    sums = xm[:, :, : full * size].unflatten(2, (full, size)).sum(3, dtype=torch.float32)
    if length > full * size:
        tail = xm[:, :, full * size :].sum(2, keepdim=True, dtype=torch.float32)
        sums = torch.cat([sums, tail], dim=2)
    count = F.pad(weight.int(), (0, n * size - length)).view(b, n, size).sum(-1)
    return sums / count.clamp_min(1)[:, None, :, None].to(torch.float32)


class DocPooled(NamedTuple):
    """Block means over real tokens: ``q_pool`` ``(B, Hq, Nq, D)``, ``k_pool``
    ``(B, Hkv, Nk, D)``; with ``final_block_pool = p``: ``q_fine`` ``(B, Hq, M + 1, G, D)``
    the last query block of each document in ``G = block_size / p`` runs of ``p`` (its
    document's real tokens only), ``q_fine_hi`` ``(B, M + 1, G)`` their last real position
    (-1: none), ``k_fine`` ``(B, Hkv, Rk, D)`` all keys in runs of ``p``, ``k_fine_lo`` /
    ``k_fine_hi`` ``(B, Rk)``; else ``None``."""

    q_pool: Tensor
    k_pool: Tensor
    q_fine: Optional[Tensor]
    q_fine_hi: Optional[Tensor]
    k_fine: Optional[Tensor]
    k_fine_lo: Optional[Tensor]
    k_fine_hi: Optional[Tensor]


def pool_documents(q: Tensor, k: Tensor, segments: Segments, layout: DocLayout, config):
    """Eager block means of a documents call (:class:`DocPooled`)."""
    bs = config.block_size
    ids = segments.ids
    b, kv_len = ids.shape
    q_len = q.shape[2]
    offset = kv_len - q_len
    real = ids >= 0
    if segments.padded:
        q_pool = _masked_pool(q, real[:, offset:], bs)
        k_pool = _masked_pool(k, real, bs)
    else:  # no padding: every token counts, the plain pooling (no weighted copy of Q)
        q_pool, k_pool = pool_blocks(q, bs), pool_blocks(k, bs)
    p = config.final_block_pool
    if not p:
        return DocPooled(q_pool, k_pool, None, None, None, None, None)
    m1 = layout.num_docs + 1
    g = bs // p
    # The tokens of each document's last query block (rows of -1: a dummy block 0).
    row = layout.final_row.clamp_min(0)  # (B, M+1)
    tok = row[..., None] * bs + torch.arange(bs, device=q.device)  # (B, M+1, bs)
    inside = tok < q_len
    tok = tok.clamp(max=q_len - 1)
    tok_ids = ids[:, offset:].gather(1, tok.view(b, -1)).view(b, m1, bs)
    slot = torch.arange(m1, device=q.device)
    keep = inside & (tok_ids == slot[None, :, None]) & (layout.final_row >= 0)[..., None]
    hq, d = q.shape[1], q.shape[3]
    gathered = q.gather(2, tok.view(b, 1, m1 * bs, 1).expand(b, hq, m1 * bs, d))
    gathered = gathered.view(b, hq, m1, g, p, d)
    w = keep.view(b, 1, m1, g, p, 1)
    # Zeroed in the input dtype (exact), summed in float32: no float32 copy of the rows.
    sums = (gathered * w.to(gathered.dtype)).sum(4, dtype=torch.float32)
    q_fine = sums / w.sum(4).clamp_min(1).to(torch.float32)
    hi = torch.where(keep, tok + offset, -1).view(b, m1, g, p).amax(-1)
    k_fine = _masked_pool(k, real, p) if segments.padded else pool_blocks(k, p)
    k_lo, k_hi, _ = _extent(real, 0, p)
    return DocPooled(q_pool, k_pool, q_fine, hi, k_fine, k_lo, k_hi)


class DocScores(NamedTuple):
    """Pooled bands and per-query-block logit divisors of a documents call: ``q_*``
    ``(B, Hq, Nq, d)``, ``k_*`` ``(B, Hkv, Nk, d)``, ``div_*`` ``(B, Hq, Nq)`` (the divisor of
    each query block's document); ``fine`` ``(B, Hq, M + 1, Nk)`` bool, the top-p key blocks
    of each document's last query block (``final_block_pool``, :func:`fine_document_picks`),
    else ``None``."""

    q_high: Tensor
    k_high: Tensor
    div_high: Tensor
    q_low: Tensor
    k_low: Tensor
    div_low: Tensor
    fine: Optional[Tensor]


def _doc_mean_square(x: Tensor, doc: Tensor, slots: int) -> Tensor:
    """Mean of ``x**2`` over the blocks of each document and the last dim: ``x`` ``(B, H, N,
    d)``, ``doc`` ``(B, N)`` in ``[0, slots)`` -> ``(B, H, slots)``."""
    b, h, n, d = x.shape
    sq = x.square().sum(-1)
    index = doc[:, None, :].expand(b, h, n)
    total = sq.new_zeros((b, h, slots)).scatter_add(2, index, sq)
    count = sq.new_zeros((b, slots)).scatter_add(1, doc, torch.ones_like(doc, dtype=sq.dtype))
    return total / (count[:, None] * d).clamp_min(1)


def score_documents(
    config, pooled_q, pooled_k, q_doc, k_doc, num_docs, high_temperature, low_temperature
) -> DocScores:
    """Bands and per-document temperatures (``fine`` left ``None``: :func:`fine_document_picks`).

    Calibration as ``scoring.band_temperature``, with the rms over the blocks of one
    document (a query block's divisor is its document's)."""
    high_dims, low_dims = config.band_dims(pooled_q.shape[-1])
    slots = num_docs + 1
    b, hq = pooled_q.shape[:2]
    group = hq // pooled_k.shape[1]
    tiny = torch.finfo(torch.float32).tiny
    q_all = k_all = None
    if config.calibrate:
        q_all = _doc_mean_square(pooled_q, q_doc, slots)
        k_all = _doc_mean_square(pooled_k, k_doc, slots)
    parts = []
    for dims, which, temperature in (
        (high_dims, "high", high_temperature),
        (low_dims, "low", low_temperature),
    ):
        q_band = band(pooled_q, dims, which, config.rope_layout)
        k_band = band(pooled_k, dims, which, config.rope_layout)
        if config.calibrate:
            q_ratio = (_doc_mean_square(q_band, q_doc, slots) / q_all.clamp_min(tiny)).sqrt()
            k_ratio = (_doc_mean_square(k_band, k_doc, slots) / k_all.clamp_min(tiny)).sqrt()
            k_ratio = k_ratio.repeat_interleave(group, dim=1)
            t = (math.sqrt(dims / pooled_q.shape[-1]) * q_ratio * k_ratio).clamp_min(1e-20)
        else:
            t = torch.full((b, hq, slots), temperature, device=pooled_q.device)
        div = (math.sqrt(dims) * t).gather(2, q_doc[:, None, :].expand(b, hq, q_doc.shape[1]))
        parts += [q_band, k_band, div]
    return DocScores(*parts, None)


def fine_document_picks(
    config, q_fine, q_fine_hi, k_fine, k_fine_lo, k_fine_hi, doc_start, nk, fine_thr
):
    """``final_block_pool``'s top-p key blocks (threshold ``fine_thr``) of the last query
    block of documents, bool ``(B, Hq, M', Nk)`` (``M'`` documents of a chunk: ``q_fine``
    ``(B, Hq, M', G, D)``, ``q_fine_hi`` and ``doc_start`` of the same documents). Picked here,
    once per call, not in every chunk of :func:`select_document_tables`.

    As ``scoring.final_block_probs``, per document: each run of ``p`` queries of the
    document (its mean) against every run of ``p`` keys holding a real key of the document
    at or before the run's last query; softmax scaled by ``1 / sqrt(D)``, summed per key
    block, averaged over the query runs that hold tokens.
    """
    b, hq, m, g, d = q_fine.shape
    rk = k_fine.shape[2]
    per_block = config.block_size // config.final_block_pool
    logits = band_logits(q_fine.reshape(b, hq, m * g, d), k_fine, q_fine.new_ones((b, hq)))
    logits = logits.view(b, hq, m, g, rk) / math.sqrt(d)
    visible = (k_fine_hi[:, None, None, :] >= doc_start[:, :, None, None]) & (
        k_fine_lo[:, None, None, :] <= q_fine_hi[..., None]
    )  # (B, M', G, Rk)
    real = q_fine_hi >= 0
    visible = visible & real[..., None]
    probs = torch.softmax(logits.masked_fill(~visible[:, None], float("-inf")), dim=-1)
    probs = torch.where(visible[:, None], probs, 0.0)
    probs = F.pad(probs, (0, nk * per_block - rk))
    per_key_block = probs.view(b, hq, m, g, nk, per_block).sum(-1)
    runs = real.sum(-1).clamp_min(1)[:, None, :, None].float()
    return top_p_select(per_key_block.sum(3) / runs, fine_thr)


def _allowed(
    layout: DocLayout, rows: Tensor, cols: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """Bool ``(B, R, Nk)``: key blocks holding a real key visible to some query of the row
    (for one document, exactly its visible blocks), and bool ``(B, R)`` empty rows; with
    ``cols`` (int64 ``(W,)``), only those key blocks.

    The keys visible to a query block's queries are the real keys from the first token of
    its first real query's document to its last real query (documents are contiguous)."""
    start = layout.q_start.index_select(1, rows)
    last = layout.q_hi.index_select(1, rows)
    empty = last < 0
    k_hi, k_lo = layout.k_hi, layout.k_lo
    if cols is not None:
        k_hi, k_lo = k_hi.index_select(1, cols), k_lo.index_select(1, cols)
    allowed = (k_hi[:, None, :] >= start[..., None]) & (k_lo[:, None, :] <= last[..., None])
    return allowed & ~empty[..., None], empty


def key_windows(
    layout: DocLayout, q_len: int, kv_len: int, block_size: int, budget: int, min_rows: int = 64
):
    """How to score the query blocks of a documents call in chunks, each against the key
    blocks its rows can see only: ``[(row_start, num_rows, col_start, num_cols), ...]`` (host
    ints; one device-to-host copy of ``(B, Nq)`` ints).

    Why: a query block sees keys of its own document only, so a packed row of documents needs
    the scores of its diagonal band of documents, not the whole ``Nq x Nk`` table (8
    documents of 16K tokens: an eighth of it). A chunk's columns run from the first block of
    the earliest document its rows belong to, over every row of the batch, to the causal
    diagonal of its last row: a superset of every row's visible blocks, so the selection is the
    full-width one. Chunks close at a document's first query block once they hold
    ``min_rows`` rows (each chunk costs launches of its own: small documents share one; 64
    blocks of 128 are 8K tokens, where a chunk's fixed cost is a small share of its work), and
    when ``rows x columns`` would pass ``budget`` (``max_score_elements`` per batch row and
    head, as without documents).
    """
    nq = layout.q_lo.shape[1]
    nk = layout.k_lo.shape[1]
    starts = layout.q_start.clamp_min(0) // block_size  # (B, Nq): first visible key block
    starts = torch.where(layout.q_hi >= 0, starts, nk).amin(0).tolist()  # empty rows: none
    offset = kv_len - q_len
    windows = []
    row = 0
    while row < nq:
        lo = min(starts[row], nk - 1)
        n = 0
        while row + n < nq:
            r = row + n
            # The diagonal key block of query block r (its last query, bottom-right).
            hi = (offset + min((r + 1) * block_size, q_len) - 1) // block_size + 1
            new_lo = min(lo, starts[r])
            if n and (
                (n + 1) * (hi - new_lo) > budget
                or (n >= min_rows and starts[r] > lo and starts[r] != starts[r - 1])
            ):
                break
            lo, n = new_lo, n + 1
        last = row + n - 1
        hi = (offset + min((last + 1) * block_size, q_len) - 1) // block_size + 1
        # At least two columns where there are two: a size of 1 would compile again.
        lo = max(0, min(lo, hi - 2))
        hi = min(nk, max(hi, lo + 2))
        windows.append((row, n, lo, hi - lo))
        row += n
    return windows


def visible_document_blocks(layout: DocLayout, block_size: int) -> Tensor:
    """Visible (query block, key block) pairs per batch row, float32 ``(B, 1)`` (at least 1):
    the denominator of a documents call's density."""
    rows = torch.arange(layout.q_lo.shape[1], device=layout.q_lo.device)
    allowed, _ = _allowed(layout, rows)
    return allowed.sum((1, 2)).float().clamp_min(1)[:, None]


def select_document_tables(
    config, scores: DocScores, layout: DocLayout, row_start, num_rows, q_len, kv_len, high_thr,
    low_thr, col_start=0, num_cols=None,
):  # fmt: skip
    """Selection of query blocks ``row_start .. row_start + num_rows - 1`` of a documents
    call, as ``BlockTables`` (partial: selected blocks where the token rule is not
    everywhere true; full: the rest), full width.

    Only key blocks ``col_start .. col_start + num_cols - 1`` are scored (``None``: to the
    last): the caller guarantees that they hold every block these rows can see
    (:func:`key_windows`), so the result is the full-width selection's."""
    device = scores.q_high.device
    bs = config.block_size
    rows = torch.arange(num_rows, device=device) + row_start
    nk_all = scores.k_high.shape[2]
    nk = nk_all - col_start if num_cols is None else num_cols
    b, hq = scores.q_high.shape[:2]
    # The window's key blocks, absolute. Gathered (index_select), never sliced: a slice is
    # contiguous only when it is the whole row, and a compiled call guards on that (a second
    # graph for single-window calls).
    cols = torch.arange(nk, device=device) + col_start
    allowed, empty = _allowed(layout, rows, cols)  # (B, R, W), (B, R)
    soft = (allowed | empty[..., None])[:, None]  # no all -inf row
    first_diag, last_diag = rows_diagonal_range(rows, q_len, kv_len, bs)  # (R,), absolute
    diagonal = (cols[None, :] <= last_diag[:, None]) & (cols[None, :] >= first_diag[:, None])
    picks = []
    for q_b, k_b, div, thr in (
        (scores.q_high, scores.k_high, scores.div_high, high_thr),
        (scores.q_low, scores.k_low, scores.div_low, low_thr),
    ):
        k_w = k_b.index_select(2, cols)
        logits = band_logits(q_b.index_select(2, rows), k_w, q_b.new_ones((b, hq)))
        logits = logits / div.index_select(2, rows)[..., None]
        probs = torch.softmax(logits.masked_fill(~soft, float("-inf")), dim=-1)
        picks.append(top_p_select(probs, thr))
    selected = picks[0] | picks[1]
    multi = layout.q_multi.index_select(1, rows)
    forced = multi[..., None].expand(b, num_rows, nk)  # several documents: dense row
    if config.force_sink:
        sink = layout.q_start.index_select(1, rows) // bs
        forced = forced | (cols == sink[..., None])
    if config.force_diagonal:
        forced = forced | diagonal
    if config.local_blocks:
        first = first_diag[:, None]
        forced = forced | ((cols < first) & (cols >= first - config.local_blocks))
    doc = layout.q_doc.index_select(1, rows)
    if config.dense_final_blocks:
        last = layout.final_row.gather(1, doc)
        forced = forced | ((last - rows < config.dense_final_blocks) & (last >= 0))[..., None]
    selected = selected | forced[:, None]
    if config.final_block_pool and scores.fine is not None:
        fine = scores.fine.index_select(3, cols)  # (B, Hq, M+1, W) bool
        local = layout.final_row - row_start
        ok = (layout.final_row >= 0) & (local >= 0) & (local < num_rows)
        local = torch.where(ok, local, num_rows)
        index = local[:, None, :, None].expand(b, hq, local.shape[1], nk)
        hits = torch.zeros((b, hq, num_rows + 1, nk), dtype=torch.int32, device=device)
        hits = hits.scatter_add(2, index, fine.int())
        selected = selected | (hits[:, :, :num_rows] > 0)
    selected = selected & allowed[:, None]
    # Full blocks: every query and key real and of one document, keys all before the queries.
    full_ok = (
        layout.q_pure.index_select(1, rows)[..., None]
        & layout.k_pure.index_select(1, cols)[:, None, :]
        & (doc[..., None] == layout.k_doc.index_select(1, cols)[:, None, :])
        & (cols < first_diag[:, None])
    )[:, None]
    # Back to full width (the tables' format: FlexAttention's Nk columns).
    pad = (col_start, nk_all - col_start - nk)
    partial = F.pad(selected & ~full_ok, pad)
    full = F.pad(selected & full_ok, pad)
    return BlockTables(*compact_blocks(partial), *compact_blocks(full))


def padded_ids(segments: Segments, block_size: int) -> Tensor:
    """``ids`` with ``block_size`` columns of -1 appended: a ``mask_mod`` may be evaluated a
    block past the sequence end (the kernel masks those positions after it)."""
    return F.pad(segments.ids, (0, block_size), value=-1).contiguous()


def document_mask_mod(ids: Tensor, offset):
    """The token rule as a ``mask_mod``: bottom-right causal (``offset`` as
    ``block_mask.causal_mask_mod``: ``kv_len - q_len`` plus the chunk's first query), same
    document, real key. ``ids``: int32 ``(B, >= Lkv + block_size)`` (:func:`padded_ids`)."""

    def mask_mod(b, h, q_idx, kv_idx):
        p = q_idx + offset
        key = ids[b, kv_idx]
        return (p >= kv_idx) & (key == ids[b, p]) & (key >= 0)

    return mask_mod


def dense_document_mask(segments: Segments, q_len: int) -> tuple[Tensor, Tensor]:
    """The token rule as an SDPA boolean mask ``(B, 1, Lq, Lkv)`` (rows of padded queries see
    every key, so that no row is all masked: their outputs are zeroed instead) and bool
    ``(B, 1, Lq, 1)``: query rows that are real."""
    ids = segments.ids
    kv_len = ids.shape[1]
    offset = kv_len - q_len
    q_ids = ids[:, offset:]
    pos = torch.arange(kv_len, device=ids.device)
    causal = pos[None, :] <= (pos[offset:, None])
    same = (q_ids[:, :, None] == ids[:, None, :]) & (ids[:, None, :] >= 0) & causal
    q_real = (q_ids >= 0)[:, :, None]
    mask = same | ~q_real
    return mask[:, None], q_real[:, None]
