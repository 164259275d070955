"""Slow, obviously-correct float64 reference of every Prism stage.

Written from the method's definitions (token level where the method speaks of tokens, Python
loops where that is clearer), independent of the vectorised code in ``prism_flex``.
Shapes: q ``(B, Hq, Lq, D)``, k/v ``(B, Hkv, Lkv, D)``.

Not imported by ``import prism_flex``; the tests and ``bench/check_cuda.py`` use
``from prism_flex import testing as ref``.
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
                        * rms(qb[bi : bi + 1, h : h + 1])
                        / rms(qp[bi : bi + 1, h : h + 1])
                        * rms(kb[bi : bi + 1, kh : kh + 1])
                        / rms(kp[bi : bi + 1, kh : kh + 1])
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
                tok[
                    i * block_size : (i + 1) * block_size, j * block_size : (j + 1) * block_size
                ].any()
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


def relative_row(probs: list[float], alpha: float) -> tuple[set[int], float]:
    """The max-relative cut of one row (``PrismConfig.relative_cut``), plus its decision
    margin: block ``j`` is kept when ``probs[j] >= alpha * max(probs)``. The margin is the
    smallest distance of a block that is not the row's maximum from the cut (the maximum is
    kept whatever the rounding); ``alpha <= 0`` keeps all, with an infinite margin."""
    n = len(probs)
    if alpha <= 0.0:
        return set(range(n)), math.inf
    top = max(probs)
    cut = alpha * top
    kept = {j for j in range(n) if probs[j] >= cut}
    others = [abs(p - cut) for p in probs if p != top]
    return kept, min(others, default=math.inf)


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


def selection(q, k, config: PrismConfig, fine_threshold=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Final selected blocks ``(B, Hq, Nq, Nk)`` and each row's decision margin ``(B, Hq, Nq)``.
    ``fine_threshold``: top-p of ``final_block_pool``'s row, default the larger band one.
    Each band's cut: top-p, or :func:`relative_row` with ``config.relative_cut``."""
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
                    row = bp[f"probs_{which}"][bi, h, i].tolist()
                    if config.relative_cut is None:
                        kept, m = top_p_row(row, getattr(config, f"{which}_threshold"))
                    else:
                        kept, m = relative_row(row, config.relative_cut)
                    chosen |= kept
                    margin[bi, h, i] = min(margin[bi, h, i], m)
                if fine is not None and i == nq - 1:
                    thr = fine_threshold or max(config.high_threshold, config.low_threshold)
                    kept, m = top_p_row(fine[bi, h].tolist(), thr)
                    chosen |= kept
                    margin[bi, h, i] = min(margin[bi, h, i], m)
                if config.force_sink:
                    chosen.add(0)
                if config.force_diagonal:
                    chosen |= set(torch.nonzero(diagonal[i]).flatten().tolist())
                local = config.local_blocks
                if local:
                    first = int(torch.nonzero(diagonal[i]).min())
                    chosen |= set(range(max(0, first - local), first))
                if i >= nq - config.dense_final_blocks:
                    chosen = set(range(nk))
                for j in chosen:
                    sel[bi, h, i, j] = bool(allowed[i, j])
    return sel, margin


def attention(
    q, k, v, block_table, block_size: int, scale=None, dtype=torch.float64, token_mask=None
):
    """Softmax attention over real tokens of the selected blocks, with the causal rule.

    ``block_table``: bool ``(B, Hq, Nq, Nk)``. ``token_mask``: bool ``(B, Lq, Lkv)``, the token
    rule (default: bottom-right causal, for every row). Query rows that see no key return 0.
    Computed in ``dtype`` (float64 for the reference; the input dtype to measure the error
    of the same computation done at lower precision).
    """
    b, hq, lq, d = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if token_mask is None:
        token_mask = causal_token_mask(lq, lkv).expand(b, lq, lkv)
    out = torch.zeros(b, hq, lq, d, dtype=dtype)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            table = (
                block_table[bi, h].repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)
            )
            mask = token_mask[bi] & table[:lq, :lkv]
            scores = (q[bi, h].to(dtype) @ k[bi, kh].to(dtype).T) * scale
            scores = scores.masked_fill(~mask, -math.inf)
            p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            out[bi, h] = p @ v[bi, kh].to(dtype)
    return out


def fit_rows(nq: int, samples: int) -> list[int]:
    """The fit's sampled query blocks: ``samples`` evenly spaced from ``nq // 4`` to
    ``nq - 1``, rounded half up."""
    if samples == 1:
        return [nq - 1]
    first = nq // 4
    return [first + math.floor(i * (nq - 1 - first) / (samples - 1) + 0.5) for i in range(samples)]


def fit_tokens(row: int, q_len: int, block_size: int, tokens: int) -> list[int]:
    """Sampled query tokens of a block: the centres of ``tokens`` equal segments of it."""
    start = row * block_size
    length = min(block_size, q_len - start)
    return [start + math.floor((i + 0.5) * length / tokens) for i in range(tokens)]


def fitted_selection(q, k, v, config: PrismConfig, scale=None):
    """Selection with ``config.output_error``: per (batch, head), the smallest candidate
    threshold (``prism_flex.fit.FIT_THRESHOLDS``, both bands; ``final_block_pool``'s row at
    the larger configured threshold) whose selection keeps the sampled
    tokens' attention output within relative error ``output_error`` (Frobenius norm over the
    sampled tokens and dims) of their exact output; then that threshold's selection.

    Returns ``(table (B, Hq, Nq, Nk), margin (B, Hq, Nq), thresholds (B, Hq))``; the margin of
    a head also covers its fit: how close any candidate's squared error ratio is to the
    budget, and the top-p margins of the sampled rows at every candidate.
    """
    from dataclasses import replace

    from prism_flex.fit import FIT_THRESHOLDS

    bs = config.block_size
    b, hq, lq, d = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    nq = num_blocks(lq, bs)
    plain = replace(config, output_error=None)
    # final_block_pool's row keeps the configured threshold: only the bands' is fitted
    fine = max(config.high_threshold, config.low_threshold)
    tables = [
        selection(q, k, replace(plain, high_threshold=t, low_threshold=t), fine)
        for t in FIT_THRESHOLDS
    ]
    tokens = [
        (r, t)
        for r in fit_rows(nq, config.fit_query_blocks)
        for t in fit_tokens(r, lq, bs, config.fit_tokens)
    ]
    table = torch.zeros_like(tables[0][0])
    margin = torch.zeros_like(tables[0][1])
    thresholds = torch.zeros(b, hq, dtype=torch.float64)
    budget = config.output_error**2
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            errs, refs = [], 0.0
            for c in range(len(FIT_THRESHOLDS)):
                err = 0.0
                for r, t in tokens:
                    pos = t + lkv - lq
                    logits = (q[bi, h, t].double() @ k[bi, kh, : pos + 1].double().T) * scale
                    exact = torch.softmax(logits, 0) @ v[bi, kh, : pos + 1].double()
                    keep = tables[c][0][bi, h, r].repeat_interleave(bs)[: pos + 1]
                    approx = torch.zeros(d, dtype=torch.float64)
                    if keep.any():
                        p = torch.softmax(logits.masked_fill(~keep, -math.inf), 0)
                        approx = p @ v[bi, kh, : pos + 1].double()
                    err += float((approx - exact).square().sum())
                    if c == 0:
                        refs += float(exact.square().sum())
                errs.append(err)
            chosen = next(c for c, e in enumerate(errs) if e <= budget * refs)
            thresholds[bi, h] = FIT_THRESHOLDS[chosen]
            table[bi, h] = tables[chosen][0][bi, h]
            # Only the candidates up to the chosen one decide: a flip at a later one (its
            # error crossing the budget, or a sampled row's top-p there) changes nothing.
            fit_margin = min(abs(e - budget * refs) / max(refs, 1e-300) for e in errs[: chosen + 1])
            sampled = min(
                float(tables[c][1][bi, h, r]) for c in range(chosen + 1) for r, _ in tokens
            )
            margin[bi, h] = torch.clamp(tables[chosen][1][bi, h], max=min(fit_margin, sampled))
    return table, margin, thresholds


# --- Padded batches and packed documents (prism_flex/documents.py) -----------------------
# ``ids``: int (B, Lkv), equal ids = one document (each a contiguous run), -1 = padding.


def document_token_mask(ids: torch.Tensor, q_len: int) -> torch.Tensor:
    """Bool ``(B, Lq, Lkv)``: query ``t`` (position ``p = t + Lkv - Lq``) sees key ``j`` iff
    ``j <= p``, same id, key not padding."""
    kv_len = ids.shape[1]
    causal = causal_token_mask(q_len, kv_len)
    q_ids = ids[:, kv_len - q_len :]
    return causal & (q_ids[:, :, None] == ids[:, None, :]) & (ids[:, None, :] >= 0)


def _real_mean(x: torch.Tensor, keep: list[bool]):
    """Mean over the rows of ``x`` (float64) where ``keep``; zeros when none."""
    rows = [x[i].double() for i in range(len(keep)) if keep[i]]
    return torch.stack(rows).mean(0) if rows else torch.zeros(x.shape[-1], dtype=torch.float64)


def document_selection(q, k, ids, config: PrismConfig):
    """Selected blocks ``(B, Hq, Nq, Nk)`` and decision margins ``(B, Hq, Nq)`` with
    documents/padding, from the rules of ``prism_flex/documents.py``, row by row.

    Block means over real tokens; a block belongs to the document of its first real token;
    calibration per document (rms over its blocks); a query block with no real token selects
    nothing; one with two or more documents every key block where the token rule allows some
    pair; one with one document ``d`` its top-p over the blocks where the rule allows some
    pair, the block of ``d``'s first token (sink), its diagonal and local blocks, the finer
    row if it holds ``d``'s last query, all if it is among ``d``'s last ``dense_final_blocks``
    query blocks; everything intersected with the allowed blocks.
    """
    bs = config.block_size
    b, hq, lq, d = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    group = hq // hkv
    offset = lkv - lq
    nq, nk = num_blocks(lq, bs), num_blocks(lkv, bs)
    tok = document_token_mask(ids, lq)
    _, diagonal = causal_blocks(lq, lkv, bs)
    sel = torch.zeros(b, hq, nq, nk, dtype=torch.bool)
    margin = torch.full((b, hq, nq), math.inf, dtype=torch.float64)
    for bi in range(b):
        row_ids = ids[bi].tolist()
        real = [i >= 0 for i in row_ids]

        def block_doc(start, stop):
            for pos in range(start, stop):
                if real[pos]:
                    return row_ids[pos]
            return None

        q_docs = [block_doc(offset + i * bs, min(offset + (i + 1) * bs, lkv)) for i in range(nq)]
        k_docs = [block_doc(j * bs, min((j + 1) * bs, lkv)) for j in range(nk)]
        allowed = torch.zeros(nq, nk, dtype=torch.bool)
        for i in range(nq):
            for j in range(nk):
                allowed[i, j] = bool(tok[bi, i * bs : (i + 1) * bs, j * bs : (j + 1) * bs].any())
        first_pos = {}
        last_q = {}
        for pos, doc in enumerate(row_ids):
            if doc >= 0:
                first_pos.setdefault(doc, pos)
                if pos >= offset:
                    last_q[doc] = (pos - offset) // bs
        qp = torch.zeros(hq, nq, d, dtype=torch.float64)
        kp = torch.zeros(hkv, nk, d, dtype=torch.float64)
        for i in range(nq):
            keep = real[offset + i * bs : offset + min((i + 1) * bs, lq)]
            for h in range(hq):
                qp[h, i] = _real_mean(q[bi, h, i * bs : i * bs + len(keep)], keep)
        for j in range(nk):
            keep = real[j * bs : min((j + 1) * bs, lkv)]
            for h in range(hkv):
                kp[h, j] = _real_mean(k[bi, h, j * bs : j * bs + len(keep)], keep)
        fine = _document_fine(q[bi], k[bi], row_ids, config) if config.final_block_pool else {}
        for which, dims in zip(("high", "low"), config.band_dims(d)):
            idx = band_dims(d, dims, which, config.rope_layout)
            for h in range(hq):
                kh = h // group
                for i in range(nq):
                    doc = q_docs[i]
                    if doc is None:
                        continue
                    docs_here = {
                        row_ids[p]
                        for p in range(offset + i * bs, offset + min((i + 1) * bs, lq))
                        if real[p]
                    }
                    if len(docs_here) > 1:
                        sel[bi, h, i] |= allowed[i]
                        continue
                    if config.calibrate:
                        qs = [r for r in range(nq) if q_docs[r] == doc]
                        ks = [c for c in range(nk) if k_docs[c] == doc]
                        qa, ka = qp[h, qs], kp[kh, ks]
                        t = (
                            math.sqrt(dims / d)
                            * float(qa[:, idx].square().mean().sqrt() / qa.square().mean().sqrt())
                            * float(ka[:, idx].square().mean().sqrt() / ka.square().mean().sqrt())
                        )
                    else:
                        t = getattr(config, f"{which}_temperature")
                    logits = kp[kh][:, idx] @ qp[h, i, idx] / (math.sqrt(dims) * t)
                    logits = logits.masked_fill(~allowed[i], -math.inf)
                    kept, m = top_p_row(
                        torch.softmax(logits, 0).tolist(), getattr(config, f"{which}_threshold")
                    )
                    margin[bi, h, i] = min(margin[bi, h, i], m)
                    chosen = set(kept)
                    if which == "low":  # forced blocks once (both bands visit the row)
                        if config.final_block_pool and last_q.get(doc) == i:
                            thr = max(config.high_threshold, config.low_threshold)
                            kept, m = top_p_row(fine[doc][h].tolist(), thr)
                            chosen |= kept
                            margin[bi, h, i] = min(margin[bi, h, i], m)
                        if config.force_sink:
                            chosen.add(first_pos[doc] // bs)
                        diag = set(torch.nonzero(diagonal[i]).flatten().tolist())
                        if config.force_diagonal:
                            chosen |= diag
                        if config.local_blocks:
                            first = min(diag)
                            chosen |= set(range(max(0, first - config.local_blocks), first))
                        if i > last_q[doc] - config.dense_final_blocks:
                            chosen = set(range(nk))
                    for j in chosen:
                        sel[bi, h, i, j] |= bool(allowed[i, j])
    return sel, margin


def _document_fine(q, k, row_ids, config: PrismConfig) -> dict:
    """``final_block_pool``'s probabilities of each document's last query block, per
    document: ``{doc: (Hq, Nk) float64}`` (one batch row; q ``(Hq, Lq, D)``)."""
    p, bs = config.final_block_pool, config.block_size
    hq, lq, d = q.shape
    hkv, lkv = k.shape[0], k.shape[1]
    offset = lkv - lq
    nk = num_blocks(lkv, bs)
    real = [i >= 0 for i in row_ids]
    out = {}
    docs = {i for i in row_ids[offset:] if i >= 0}
    for doc in docs:
        last_tok = max(t for t in range(lq) if row_ids[t + offset] == doc)
        row = last_tok // bs
        runs = []
        for s in range(row * bs, min((row + 1) * bs, lq), p):
            toks = [t for t in range(s, min(s + p, lq)) if row_ids[t + offset] == doc]
            if toks:
                runs.append(toks)
        start = min(pos for pos, i in enumerate(row_ids) if i == doc)
        probs = torch.zeros(hq, nk, dtype=torch.float64)
        for h in range(hq):
            kh = h // (hq // hkv)
            for toks in runs:
                qm = q[h, toks].double().mean(0)
                last = toks[-1] + offset
                seen, logits = [], []
                for c0 in range(0, lkv, p):
                    rng = range(c0, min(c0 + p, lkv))
                    if not any(real[j] and start <= j <= last for j in rng):
                        continue
                    km = _real_mean(k[kh, c0 : c0 + len(rng)], real[c0 : c0 + len(rng)])
                    seen.append(c0)
                    logits.append(qm @ km / math.sqrt(d))
                w = torch.softmax(torch.stack(logits), 0)
                for c0, wi in zip(seen, w):
                    probs[h, c0 // bs] += wi / len(runs)
        out[doc] = probs
    return out


def document_attention(q, k, v, ids, block_table, block_size: int, scale=None, dtype=torch.float64):
    """:func:`attention` with the document/padding token rule: softmax over the keys of the
    selected blocks that the rule allows; query rows that see none return 0."""
    tok = document_token_mask(ids, q.shape[2])
    return attention(q, k, v, block_table, block_size, scale, dtype, token_mask=tok)
