"""Per-head top-p thresholds fitted to the attention output (``PrismConfig.output_error``).

Why: a fixed top-p threshold over the calibrated block softmax decides how many key blocks a
row keeps from how sharp that softmax is, and that sharpness is off by a head-dependent
amount; at equal density it is this per-row budget, not the ranking of the blocks, that
separates Prism from token-level estimators (bench/NOTES.md). The fit measures instead: for a
few sampled query tokens of each (batch, head) it computes the exact attention output and the
output over the blocks that each candidate threshold would select, and keeps the smallest
candidate whose relative error is within ``output_error``. V-aware: a head whose dropped
blocks carry values close to its output stops early.

How, in one FlexAttention call (on CUDA). The candidates (:data:`FIT_THRESHOLDS`) are nested:
a higher threshold selects a superset (top-p is a prefix of the sorted blocks; the sink,
diagonal, local and final-row extras do not depend on it). So each visible key block of a
sampled query block has a *bucket*, the first candidate that selects it. The sampled queries
are repeated once per piece of a bucket (:func:`fit_inputs`), each copy attending only to its
piece's key blocks (a ``BlockMask`` whose query blocks are ``fit_tokens`` rows), with the
log-sum-exp returned; prefix sums over the buckets then give the output at every candidate,
and the sum over all of them is the exact output (the last candidate, 1.0, selects every
visible block). Each key block is read once per
sampled query block: the cost is the exact attention of ``fit_query_blocks x fit_tokens``
queries per head, and memory is O(those queries x candidates x D).

Stages, compiled by :mod:`prism_flex.pipeline`: :func:`fit_inputs` (buckets, pieces, index
tables, repeated queries) and :func:`fitted_thresholds` (errors and choice). Between them, on
CUDA, ``flex_attention`` on :func:`fit_block_mask`; elsewhere (and eagerly)
:func:`fit_attention_plain`, the same per-piece sums in plain PyTorch.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .block_mask import compact_blocks
from .scoring import BandScores
from .selection import select_rows

__all__ = [
    "FIT_THRESHOLDS",
    "FIT_SPLIT",
    "fit_rows",
    "fit_positions",
    "fit_inputs",
    "fit_pieces",
    "fit_block_mask",
    "fit_attention_plain",
    "fitted_thresholds",
]

#: Candidate top-p thresholds, ascending. The last is 1.0 (every visible block, zero error),
#: so every head has a candidate within any ``output_error``.
FIT_THRESHOLDS = (0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0)

#: Pieces per sampled block beyond one per candidate (see :func:`fit_inputs`).
FIT_SPLIT = 16


def fit_rows(num_q_blocks, samples: int, device) -> Tensor:
    """The sampled query blocks: ``samples`` evenly spaced from ``Nq // 4`` to ``Nq - 1``
    (rounded half up; repeats when there are fewer blocks than samples). The first quarter
    is skipped: its rows see few blocks, and a budget fitted there says little about the
    long rows that dominate the cost and the error. int64 ``(samples,)``."""
    first = num_q_blocks // 4
    if samples == 1:
        return torch.full((1,), num_q_blocks - 1, dtype=torch.int64, device=device)
    steps = torch.arange(samples, device=device) * (2 * (num_q_blocks - 1 - first))
    return first + (steps + (samples - 1)) // (2 * (samples - 1))


def fit_positions(rows: Tensor, q_len, block_size: int, tokens: int) -> Tensor:
    """The sampled query tokens of each sampled block: the centres of ``tokens`` equal
    segments of the block (repeats when a last, partial block is shorter). int64
    ``(S, tokens)``, positions in the query (0-based)."""
    start = rows * block_size
    length = torch.clamp(q_len - start, max=block_size)  # (S,)
    i = torch.arange(tokens, device=rows.device)
    return start[:, None] + ((2 * i[None, :] + 1) * length[:, None]) // (2 * tokens)


def fit_inputs(
    config,
    scores: BandScores,
    q: Tensor,
    grid: Tensor,
    rows: Tensor,
    pos: Tensor,
    q_len,
    kv_len,
    fine_thr: float,
):
    """Buckets, pieces, index tables and repeated queries of the fit.

    A bucket can hold most of a row's key blocks (those only the last candidates select);
    as one query block of the fit's attention, its blocks would run one after another in a
    single thread block (3.4 ms at 128K tokens on the H200, 10x the FLOP floor). So each
    bucket's blocks are cut, in key order, into *pieces* of at most ``ceil(Nk / FIT_SPLIT)``
    blocks, one query block per piece: at most ``T + FIT_SPLIT`` pieces per sampled block,
    a constant (the sum over buckets of ``ceil(count / size)``).

    Args:
        scores: :func:`prism_flex.scoring.score_bands` of the call.
        q: ``(B, Hq, Lq, D)``; grid: float32 ``(T,)``, :data:`FIT_THRESHOLDS` on q's device
            (an input, not built here: a host-to-device copy would wait for the GPU).
        rows, pos: :func:`fit_rows` and :func:`fit_positions` of the call, int64 ``(S,)``
            and ``(S, m)``. Inputs, not computed here: compiled, their arithmetic on the
            symbolic length was folded into the index expression of every gather that reads
            them, and inductor's CPU backend took minutes to simplify those.
        fine_thr: the top-p threshold of ``final_block_pool``'s row (not fitted).
    Returns:
        ``(q_fit, piece_of, piece_bucket, num, idx, key_pos)``: ``q_fit`` ``(B, Hq, S * P * m,
        D)``, the sampled queries repeated per piece (query block ``s * P + p`` holds the
        ``m`` sampled tokens of sampled block ``s``, for piece ``p``); ``piece_of`` int32
        ``(B, Hq, S, Nk)``, each key block's piece (``P`` where not visible);
        ``piece_bucket`` int32 ``(B, Hq, S, P)``, each piece's bucket, the first candidate
        selecting its blocks (``T`` for unused pieces); ``num`` int32 ``(B, Hq, S * P)`` and
        ``idx`` int32 ``(B, Hq, S * P, Nk)``, the key blocks of each piece; ``key_pos`` int32
        ``(S * P * m,)``, each query row's absolute position (causal mask). ``S =
        config.fit_query_blocks``, ``T = len(FIT_THRESHOLDS)``, ``P = T + FIT_SPLIT``, ``m =
        config.fit_tokens``.
    """
    t_count = len(FIT_THRESHOLDS)
    # Every sampled row at every candidate, through the selection itself: (B, H, S * T, Nk).
    thr = grid.repeat(config.fit_query_blocks)[:, None]
    selected = select_rows(
        config, scores, rows.repeat_interleave(t_count), q_len, kv_len, thr, thr, fine_thr
    ).selected
    return fit_pieces(config, selected, q, pos, q_len, kv_len)


def fit_pieces(config, selected: Tensor, q: Tensor, pos: Tensor, q_len, kv_len):
    """:func:`fit_inputs` from the selections of the sampled rows at every candidate, bool
    ``(B, Hq, S * T, Nk)`` (row ``s * T + t``: sampled block ``s`` at candidate ``t``)."""
    samples, m = config.fit_query_blocks, config.fit_tokens
    t_count = len(FIT_THRESHOLDS)
    n_pieces = t_count + FIT_SPLIT
    device = q.device
    nk = selected.shape[-1]
    count = selected.unflatten(2, (samples, t_count)).sum(3, dtype=torch.int32)
    bucket = t_count - count  # nested selections: first candidate = T - how many select it
    in_bucket = bucket[:, :, :, None, :] == torch.arange(t_count, device=device)[:, None]
    size = (nk + FIT_SPLIT - 1) // FIT_SPLIT
    pieces = (in_bucket.sum(-1, dtype=torch.int32) + (size - 1)) // size  # (B, H, S, T)
    end = torch.cumsum(pieces, -1, dtype=torch.int32)
    rank = torch.cumsum(in_bucket, -1, dtype=torch.int32) - 1  # rank in its bucket, key order
    piece = (end - pieces)[..., None] + rank // size  # (B, H, S, T, Nk)
    piece_of = torch.where(in_bucket, piece, 0).sum(3, dtype=torch.int32)
    piece_of = torch.where(bucket < t_count, piece_of, n_pieces)
    cols = torch.arange(n_pieces, device=device)
    # piece p lies in the bucket t with end[t - 1] <= p < end[t]: count the ends <= p
    piece_bucket = (end[:, :, :, None, :] <= cols[:, None]).sum(-1, dtype=torch.int32)
    member = piece_of[:, :, :, None, :] == cols[:, None]  # (B, H, S, P, Nk)
    num, idx = compact_blocks(member.flatten(2, 3))
    q_fit = q[:, :, pos.flatten()].unflatten(2, (samples, 1, m))
    q_fit = q_fit.expand(-1, -1, -1, n_pieces, -1, -1).flatten(2, 4)
    key_pos = (pos + (kv_len - q_len))[:, None, :].expand(-1, n_pieces, -1).flatten()
    return q_fit, piece_of, piece_bucket, num, idx, key_pos.to(torch.int32)


def fit_block_mask(num: Tensor, idx: Tensor, key_pos: Tensor, kv_len: int, config) -> BlockMask:
    """The ``BlockMask`` of the fit's compiled FlexAttention: query block ``s * P + p`` sees
    the key blocks of piece ``p`` of sampled block ``s`` (the block lists), token-level
    causal inside them (the ``mask_mod``)."""

    def causal(b, h, q_idx, kv_idx):
        return key_pos[q_idx] >= kv_idx

    return BlockMask.from_kv_blocks(
        num,
        idx,
        BLOCK_SIZE=(config.fit_tokens, config.block_size),
        mask_mod=causal,
        seq_lengths=(key_pos.shape[0], kv_len),
        compute_q_blocks=False,
    )


def fit_attention_plain(
    q_fit: Tensor, k: Tensor, v: Tensor, piece_of: Tensor, key_pos: Tensor, config, scale
) -> tuple[Tensor, Tensor]:
    """What the fit's FlexAttention returns, ``(out, lse)`` per piece, in plain PyTorch: for
    CPU (the compiled CPU kernel returns no log-sum-exp; eager FlexAttention cannot run inside
    a custom op there) and for ``compiled=False``.

    The sampled tokens' scores are computed once, not once per piece: ``(S * m) x Lkv``
    float32 per head, plus per-key-block partial sums ``(S * m) x Nk x D``; each piece's sums
    are then gathered from its blocks. Shapes as :func:`fitted_thresholds` takes them.
    """
    bs, m = config.block_size, config.fit_tokens
    b, hq, _, d = q_fit.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    samples, n_pieces, nk = piece_of.shape[2], len(FIT_THRESHOLDS) + FIT_SPLIT, piece_of.shape[3]
    scale = d**-0.5 if scale is None else scale
    # one copy of the sampled tokens: (B, Hkv, G, S * m, D), GQA without repeating K/V
    q = q_fit.unflatten(2, (samples, n_pieces, m))[:, :, :, 0].flatten(2, 3)
    q = q.float().unflatten(1, (hkv, hq // hkv))
    logits = torch.einsum("bkgnd,bkld->bkgnl", q, k.float()) * scale
    pos = key_pos.unflatten(0, (samples, n_pieces, m))[:, 0].flatten()  # (S * m,)
    keys = torch.arange(kv_len, device=q.device)
    logits = logits.masked_fill(keys > pos[:, None].to(keys.dtype), float("-inf"))
    top = logits.amax(-1, keepdim=True)  # finite: each token sees itself
    e = torch.exp(logits - top)
    e = torch.nn.functional.pad(e, (0, nk * bs - kv_len)).unflatten(-1, (nk, bs))
    vb = torch.nn.functional.pad(v.float(), (0, 0, 0, nk * bs - kv_len)).unflatten(2, (nk, bs))
    part_num = torch.einsum("bkgnjt,bkjtd->bkgnjd", e, vb).flatten(1, 2)  # (B, Hq, n, Nk, D)
    part_den = e.sum(-1).flatten(1, 2)  # (B, Hq, n, Nk)
    # each token's piece of every key block; invisible blocks go to a spill piece, dropped
    piece = piece_of.repeat_interleave(m, 2).long()  # (B, Hq, n, Nk)
    num = part_num.new_zeros(b, hq, samples * m, n_pieces + 1, d)
    num.scatter_add_(3, piece[..., None].expand(-1, -1, -1, -1, d), part_num)
    den = part_den.new_zeros(b, hq, samples * m, n_pieces + 1).scatter_add_(3, piece, part_den)
    num, den = num[:, :, :, :n_pieces], den[:, :, :, :n_pieces]
    out = torch.where(den[..., None] > 0, num / den.clamp_min(1e-30)[..., None], 0.0)
    lse = torch.where(den > 0, torch.log(den.clamp_min(1e-30)) + top.flatten(1, 2), -torch.inf)
    # (B, H, S, m, P, ...) -> the FlexAttention layout (B, H, S * P * m, ...)
    out = out.unflatten(2, (samples, m)).transpose(3, 4).flatten(2, 4)
    lse = lse.unflatten(2, (samples, m)).transpose(3, 4).flatten(2, 4)
    return out, lse


def fitted_thresholds(
    config, out: Tensor, lse: Tensor, piece_bucket: Tensor, grid: Tensor, output_error
) -> Tensor:
    """Per (batch, head), the smallest candidate whose output error is within
    ``output_error``.

    Args:
        out: ``(B, Hq, S * P * m, D)``, the fit's attention output per piece; lse:
            ``(B, Hq, S * P * m)``, its natural log-sum-exp (``-inf`` where a row saw no key);
            piece_bucket, grid: from :func:`fit_inputs`.
    Returns:
        float32 ``(B, Hq)``, values of ``grid``.
    """
    samples, n_pieces = piece_bucket.shape[2], piece_bucket.shape[3]
    t_count, tokens = grid.shape[0], config.fit_tokens
    o = out.float().unflatten(2, (samples, n_pieces, tokens))  # (B, H, S, P, m, D)
    lse = lse.float().unflatten(2, (samples, n_pieces, tokens))  # (B, H, S, P, m)
    # Finite: the piece of a token's own block holds at least the token itself.
    top = lse.amax(3, keepdim=True)
    w = torch.exp(lse - top)  # each piece's softmax mass, relative; 0 for empty ones
    onehot = (piece_bucket[..., None] == torch.arange(t_count, device=out.device)).float()
    bucket_num = torch.einsum("bhspmd,bhspt->bhstmd", o * w[..., None], onehot)
    bucket_den = torch.einsum("bhspm,bhspt->bhstm", w, onehot)
    num = torch.cumsum(bucket_num, 3)
    den = torch.cumsum(bucket_den, 3)[..., None]
    # A row that sees no key yet (only without force_diagonal) outputs 0, as FlexAttention.
    approx = torch.where(den > 0, num / den.clamp_min(1e-30), 0.0)
    exact = approx[:, :, :, -1:]
    err = (approx - exact).square().sum((2, 4, 5))  # (B, H, T)
    ref = exact.square().sum((2, 4, 5))  # (B, H, 1)
    # Compared without dividing: an all-zero output (V = 0) accepts the first candidate.
    ok = err <= (output_error * output_error) * ref
    first = ok.to(torch.int32).argmax(-1)  # the last candidate has error 0: always ok
    return grid[first]
