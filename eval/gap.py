"""Where the XAttention-style estimator's perplexity advantage over Prism comes from.

Mean recall hardly separates the estimators (README: 0.948 vs ~0.948 at equal density for the
sub-block estimator that still loses on perplexity), so this looks at what the next layer
sees: for the captured layers of one dense forward, per method and query head,

- ``density`` and mean ``recall`` (as in ``eval.accuracy``);
- ``recall_p5`` / ``recall_min``: the 5th percentile and the minimum over query blocks of the
  block row's recall (the share of that row's true attention mass in its selected blocks):
  the tail that a mean hides;
- ``out_err``: the relative error of the attention output, ``||O_sparse - O_dense|| /
  ||O_dense||`` over all query tokens (float32, the model's own V), and ``out_err_p99`` over
  query tokens.

    python -m eval.gap --length 4096 --layers 3 10 12 14 19 --threshold 0.9 \\
        --out bench/results/runs/cpu_qwen_gap_4k.json

CPU float32 by default; the methods are those of ``eval.accuracy`` (``prism`` is the paper's
method, ``prism_finelast`` the library default).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from eval import estimators as E
from eval.accuracy import capture_qk, load_model, log, method_table
from prism_flex.scoring import pool_blocks


def table_attention(q, k, v, table, bs):
    """Causal attention restricted to the blocks of ``table`` (B, Hq, Nq, Nk), token-level
    mask, float32: ``(B, Hq, L, D)``. Queries and keys have the same length here."""
    length = q.shape[2]
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    pos = torch.arange(length)
    causal = pos[None, :] <= pos[:, None]
    blocks = table.bool()[..., pos[:, None] // bs, pos[None, :] // bs]  # (B, H, L, L)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=blocks & causal)


def rank_at_row_counts(score, reference, length, bs):
    """Per block row: the sink and diagonal, then the blocks with the largest ``score``, as
    many as ``reference`` has in that row. Separates an estimator's ranking of the key blocks
    from its budget (how many blocks each row gets). Bool ``(B, H, Nq, Nk)``."""
    allowed, forced = E.forced_blocks(length, length, bs, score.device)
    counts = (reference.bool() & allowed).sum(-1, keepdim=True)
    s = score.masked_fill(~allowed, float("-inf")).masked_fill(forced, float("inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(s.shape[-1]).expand_as(order))
    return (rank < torch.maximum(counts, forced.sum(-1, keepdim=True))) & allowed


def head_stats(mass, table, out, dense, bs, length):
    """Per-head statistics of one method on one layer (see the module docstring)."""
    tokens = torch.clamp(length - torch.arange(mass.shape[2]) * bs, max=bs).float()
    row_recall = (mass * table.bool()).sum(-1) / tokens  # (B, H, Nq)
    err_tok = (out - dense).norm(dim=-1) / dense.norm(dim=-1).clamp_min(1e-12)  # (B, H, L)
    err = (out - dense).flatten(2).norm(dim=-1) / dense.flatten(2).norm(dim=-1)
    density = E.density(table, length, length, bs)
    return {
        "density": density[0].tolist(),
        "recall": E.recall_from_mass(mass, table, length)[0].tolist(),
        "recall_p5": torch.quantile(row_recall[0], 0.05, dim=-1).tolist(),
        "recall_min": row_recall[0].amin(-1).tolist(),
        "out_err": err[0].tolist(),
        "out_err_p99": torch.quantile(err_tok[0], 0.99, dim=-1).tolist(),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m eval.gap", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default="qwen2.5-coder-0.5b", choices=["qwen2.5-coder-0.5b", "smollm2-135m"]
    )
    p.add_argument("--text", default="austen:emma")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--layers", type=int, nargs="+", default=[3, 10, 12, 14, 19])
    p.add_argument(
        "--methods", nargs="+", default=["prism", "prism_finelast", "subpool_q32k32", "xattn"]
    )
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--stride", type=int, default=8)
    p.add_argument(
        "--swap",
        action="store_true",
        help="also each ranking at the other's per-row block counts (prism, xattn), "
        "and the true-mass ranking (oracle) at each one's counts",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from prism_flex.data.texts import load_text

    tok, model = load_model(args.model, "cpu")
    ids = tok(load_text(args.text), return_tensors="pt").input_ids[:, : args.length]
    length, bs = ids.shape[1], args.block_size
    store = capture_qk(model, ids, set(args.layers), with_v=True)
    rows = []
    for layer in sorted(store):
        t0 = time.time()
        q, k, v = store[layer]
        mass = E.block_mass(q, k, bs)
        dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        tables = {
            m: method_table(m, q, k, args.threshold, bs, args.stride, v) for m in args.methods
        }
        if args.swap and {"prism", "xattn"} <= set(tables):
            # ranking vs budget: each ranking at the other estimator's per-row block counts
            mean_logits = E._gqa_matmul(pool_blocks(q, bs), pool_blocks(k, bs))
            xattn_probs = E.xattn_block_probs(q, k, bs, args.stride)
            for name, score, ref in (
                ("meanrank@xattn", mean_logits, "xattn"),
                ("xattnrank@prism", xattn_probs, "prism"),
                ("oracle@prism", mass, "prism"),
                ("oracle@xattn", mass, "xattn"),
            ):
                tables[name] = rank_at_row_counts(score, tables[ref], length, bs)
        for method, table in tables.items():
            out = table_attention(q, k, v, table, bs)
            stats = head_stats(mass, table, out, dense, bs, length)
            rows.append(
                dict(
                    model=args.model,
                    L=length,
                    layer=layer,
                    method=method,
                    threshold=args.threshold,
                    **stats,
                )
            )
        log(f"layer {layer}: {time.time() - t0:.1f}s")
    print_summary(rows, args.methods)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "model": args.model,
                    "text": args.text,
                    "device": "cpu",
                    "dtype": "float32",
                    "rows": rows,
                },
                f,
                indent=1,
            )


def print_summary(rows, methods) -> None:
    """Per layer and method: head means, and the heads where the first and last methods'
    output errors differ most."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print("| layer | method | density | recall | recall p5 | recall min | out err | err p99 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['layer']} | {r['method']} | {mean(r['density']):.3f} | "
            f"{mean(r['recall']):.3f} | {mean(r['recall_p5']):.3f} | "
            f"{mean(r['recall_min']):.3f} | {mean(r['out_err']):.4f} | "
            f"{mean(r['out_err_p99']):.4f} |"
        )
    first, last = methods[0], methods[-1]
    for layer in sorted({r["layer"] for r in rows}):
        a = next(r for r in rows if r["layer"] == layer and r["method"] == first)
        b = next(r for r in rows if r["layer"] == layer and r["method"] == last)
        ratio = [x / max(y, 1e-12) for x, y in zip(a["out_err"], b["out_err"])]
        worst = sorted(range(len(ratio)), key=lambda h: -ratio[h])[:3]
        print(
            f"layer {layer}: {first}/{last} output error per head, largest: "
            + ", ".join(
                f"h{h} {a['out_err'][h]:.3f}/{b['out_err'][h]:.3f} (dens {a['density'][h]:.2f}/"
                f"{b['density'][h]:.2f}, p5 recall {a['recall_p5'][h]:.2f}/{b['recall_p5'][h]:.2f})"
                for h in worst
            )
        )


if __name__ == "__main__":
    main()
