"""Slow, obviously-correct float64 reference of every Prism stage.

Written from the method's definitions (token level where the method speaks of tokens, Python
loops where that is clearer), independent of the vectorised code in ``prism_flex``.
Shapes: q ``(B, Hq, Lq, D)``, k/v ``(B, Hkv, Lkv, D)``.
"""

from __future__ import annotations

import math

import torch

from prism_flex import PrismConfig


def num_blocks(length: int, block_size: int) -> int:
    return (length + block_size - 1) // block_size


def pool(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean over each block's real tokens, float64 ``(B, H, N, D)``."""
    length = x.shape[2]
    blocks = [
        x[:, :, s : min(s + block_size, length)].double().mean(dim=2)
        for s in range(0, length, block_size)
    ]
    return torch.stack(blocks, dim=2)


def pair_dims(head_dim: int, layout: str) -> list[tuple[int, int]]:
    """The two dims of each RoPE pair, pair 0 (highest frequency) first."""
    half = head_dim // 2
    if layout == "half":
        return [(p, p + half) for p in range(half)]
    return [(2 * p, 2 * p + 1) for p in range(half)]


def band_dims(head_dim: int, dims: int, which: str, layout: str) -> list[int]:
    """Head-dim indices of a band: the first (high) or last (low) ``dims / 2`` pairs."""
    pairs = pair_dims(head_dim, layout)
    chosen = pairs[: dims // 2] if which == "high" else pairs[len(pairs) - dims // 2 :]
    return sorted(d for pair in chosen for d in pair)


def rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square over blocks and dims: ``(B, H, N, d) -> (B, H)``."""
    return (x**2).mean(dim=(2, 3)).sqrt()


def band_probs(q, k, config: PrismConfig) -> dict:
    """Per-band causal block softmax (float64) plus the temperatures used.

    Returns dict with ``probs_high``/``probs_low`` ``(B, Hq, Nq, Nk)``, ``t_high``/``t_low``
    ``(B, Hq)``, ``allowed``/``diagonal`` ``(Nq, Nk)``.
    """
    bs = config.block_size
    b, hq, lq, d = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    group = hq // hkv
    qp, kp = pool(q, bs), pool(k, bs)
    allowed, diagonal = causal_blocks(lq, lkv, bs)
    out = {"allowed": allowed, "diagonal": diagonal}
    for which, dims in zip(("high", "low"), config.band_dims(d)):
        idx = band_dims(d, dims, which, config.rope_layout)
        qb, kb = qp[..., idx], kp[..., idx]
        t = torch.empty(b, hq, dtype=torch.float64)
        probs = torch.zeros(b, hq, qp.shape[2], kp.shape[2], dtype=torch.float64)
        for bi in range(b):
            for h in range(hq):
                kh = h // group
                if config.calibrate:
                    t[bi, h] = (
                        math.sqrt(dims / d)
                        * rms(qb[bi : bi + 1, h : h + 1]) / rms(qp[bi : bi + 1, h : h + 1])
                        * rms(kb[bi : bi + 1, kh : kh + 1]) / rms(kp[bi : bi + 1, kh : kh + 1])
                    ).item()
                else:
                    t[bi, h] = getattr(config, f"{which}_temperature")
                logits = qb[bi, h] @ kb[bi, kh].T / (math.sqrt(dims) * t[bi, h])
                logits = logits.masked_fill(~allowed, -math.inf)
                probs[bi, h] = torch.softmax(logits, dim=-1)
        out[f"probs_{which}"] = probs
        out[f"t_{which}"] = t
    return out


def causal_token_mask(q_len: int, kv_len: int) -> torch.Tensor:
    """Bottom-right causal mask ``(Lq, Lkv)``: query t sits at position t + Lkv - Lq."""
    pos = torch.arange(q_len)[:, None] + (kv_len - q_len)
    return torch.arange(kv_len)[None, :] <= pos


def causal_blocks(q_len: int, kv_len: int, block_size: int):
    """Block tables from the token mask: ``allowed[i, j]``: some query of block i sees some key
    of block j; ``diagonal[i, j]``: key block j holds the position of some query of block i."""
    tok = causal_token_mask(q_len, kv_len)
    nq, nk = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    allowed = torch.zeros(nq, nk, dtype=torch.bool)
    diagonal = torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(nq):
        for j in range(nk):
            allowed[i, j] = bool(
                tok[i * block_size : (i + 1) * block_size, j * block_size : (j + 1) * block_size].any()
            )
        for t in range(i * block_size, min((i + 1) * block_size, q_len)):
            diagonal[i, (t + kv_len - q_len) // block_size] = True
    return allowed, diagonal


def top_p_row(probs: list[float], threshold: float) -> tuple[set[int], float]:
    """Top-p of one row, plus its decision margin.

    Block ``j`` is kept when the mass of the blocks strictly more probable than it is below
    the threshold (threshold >= 1 keeps all): the usual descending-sort prefix that includes
    the block crossing the threshold, with blocks tied at the cut all kept. The margin is how
    far the row is from a different decision: the distance of every block's "mass above" from
    the threshold, and the gap between the least probable kept and the most probable dropped
    block (a near-tie there could swap them).
    """
    n = len(probs)
    if threshold >= 1.0:
        return set(range(n)), math.inf
    # mass strictly above each block: walk the values in descending order, tie groups at once
    order = sorted(range(n), key=lambda j: -probs[j])
    above = [0.0] * n
    mass, i = 0.0, 0
    while i < n:
        group = [order[i]]
        while i + len(group) < n and probs[order[i + len(group)]] == probs[order[i]]:
            group.append(order[i + len(group)])
        for j in group:
            above[j] = mass
        mass += sum(probs[j] for j in group)
        i += len(group)
    kept = {j for j in range(n) if above[j] < threshold}
    margin = min(abs(a - threshold) for a in above)
    dropped = [probs[j] for j in range(n) if j not in kept]
    if dropped:
        margin = min(margin, min(probs[j] for j in kept) - max(dropped))
    return kept, margin


def final_block_probs(q, k, config: PrismConfig) -> torch.Tensor:
    """The finer scoring of the last query block (``config.final_block_pool = p``), token by
    token: for each run of ``p`` queries of the last block, its mean query against the mean
    key of each run of ``p`` keys whose first key it can see (bottom-right causal), softmax
    scaled by ``1/sqrt(D)``; each key run's probability goes to its key block; the rows are
    averaged over the query runs. Float64 ``(B, Hq, Nk)``."""
    p, bs = config.final_block_pool, config.block_size
    b, hq, lq, d = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    nq, nk = num_blocks(lq, bs), num_blocks(lkv, bs)
    query_runs = [(s, min(s + p, lq)) for s in range((nq - 1) * bs, lq, p)]
    key_runs = [(s, min(s + p, lkv)) for s in range(0, lkv, p)]
    out = torch.zeros(b, hq, nk, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            for a, e in query_runs:
                qm = q[bi, h, a:e].double().mean(0)
                last = e - 1 + (lkv - lq)
                seen = [(c0, c1) for c0, c1 in key_runs if c0 <= last]
                logits = torch.stack([qm @ k[bi, kh, c0:c1].double().mean(0) for c0, c1 in seen])
                w = torch.softmax(logits / math.sqrt(d), dim=0)
                for (c0, _), wi in zip(seen, w):
                    out[bi, h, c0 // bs] += wi / len(query_runs)
    return out


def selection(q, k, config: PrismConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Final selected blocks ``(B, Hq, Nq, Nk)`` and each row's decision margin ``(B, Hq, Nq)``."""
    bp = band_probs(q, k, config)
    fine = final_block_probs(q, k, config) if config.final_block_pool else None
    allowed, diagonal = bp["allowed"], bp["diagonal"]
    b, hq, nq, nk = bp["probs_high"].shape
    sel = torch.zeros(b, hq, nq, nk, dtype=torch.bool)
    margin = torch.full((b, hq, nq), math.inf, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            for i in range(nq):
                chosen = set()
                for which in ("high", "low"):
                    kept, m = top_p_row(
                        bp[f"probs_{which}"][bi, h, i].tolist(), getattr(config, f"{which}_threshold")
                    )
                    chosen |= kept
                    margin[bi, h, i] = min(margin[bi, h, i], m)
                if fine is not None and i == nq - 1:
                    thr = max(config.high_threshold, config.low_threshold)
                    kept, m = top_p_row(fine[bi, h].tolist(), thr)
                    chosen |= kept
                    margin[bi, h, i] = min(margin[bi, h, i], m)
                if config.force_sink:
                    chosen.add(0)
                if config.force_diagonal:
                    chosen |= set(torch.nonzero(diagonal[i]).flatten().tolist())
                if i >= nq - config.dense_final_blocks:
                    chosen = set(range(nk))
                for j in chosen:
                    sel[bi, h, i, j] = bool(allowed[i, j])
    return sel, margin


def attention(q, k, v, block_table, block_size: int, scale=None, dtype=torch.float64):
    """Softmax attention over real tokens of the selected blocks, with the causal rule.

    ``block_table``: bool ``(B, Hq, Nq, Nk)``. Query rows that see no key return 0.
    Computed in ``dtype`` (float64 for the reference; the input dtype to measure the error
    of the same computation done at lower precision).
    """
    b, hq, lq, d = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    tok = causal_token_mask(lq, lkv)
    out = torch.zeros(b, hq, lq, d, dtype=dtype)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            table = block_table[bi, h].repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)
            mask = tok & table[:lq, :lkv]
            scores = (q[bi, h].to(dtype) @ k[bi, kh].to(dtype).T) * scale
            scores = scores.masked_fill(~mask, -math.inf)
            p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            out[bi, h] = p @ v[bi, kh].to(dtype)
    return out
