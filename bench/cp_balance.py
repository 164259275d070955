"""Load balance of context parallel Prism: selected-block work per rank (CPU, selection only).

Under context parallelism each rank computes the attention of its own query blocks, so its
work is the number of (query block, key block) pairs selected in its rows. This script runs
the single-process Prism selection (the same as the context parallel one, see
tests/test_parallel.py) on the synthetic inputs of ``bench/synthetic.py`` and adds the
selected blocks of each rank's rows for each sharding of ``prism_flex.parallel``
(``contiguous``, ``head_tail``), and for reference a block-cyclic ``round_robin`` (block i on
rank i mod W; not offered by the package). Imbalance = the busiest rank's work / the mean.

    python -m bench.cp_balance --lengths 32768 65536 131072 --ranks 2 4 8 \\
        --out bench/results/cpu_cp_balance.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import torch

from prism_flex import PrismConfig, score_inputs, select_blocks
from prism_flex.parallel import shard_layout

from .synthetic import synthetic_qkv


def row_work(q, k, config, chunk=128):
    """Selected key blocks per query block, summed over batch and heads: int64 ``(Nq,)``;
    and the causally visible ones."""
    length = q.shape[2]
    scores = score_inputs(q, k, config)
    nq = scores.q_high.shape[2]
    work, visible = [], []
    for start in range(0, nq, chunk):
        n = min(chunk, nq - start)
        sel = select_blocks(scores, start, n, length, length, config)
        work.append(sel.selected.sum(dim=(0, 1, 3)))
        visible.append(sel.allowed.sum(-1) * q.shape[0] * q.shape[1])
    return torch.cat(work), torch.cat(visible)


def per_rank(work, length, world, balancer, block_size):
    if balancer == "round_robin":
        rows = torch.arange(work.shape[0])
        return [int(work[rows % world == r].sum()) for r in range(world)]
    layout = shard_layout(length, world, balancer, block_size)
    return [int(work[layout.block_rows(r)].sum()) for r in range(world)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--heads", type=int, default=8, help="query heads (KV heads: a quarter)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    config = PrismConfig()
    balancers = ["contiguous", "head_tail", "round_robin"]
    rows = []
    for length in args.lengths:
        t0 = time.perf_counter()
        q, k, _ = synthetic_qkv(
            args.heads, args.heads // 4, length, args.head_dim, dtype=torch.float32, seed=args.seed
        )
        work, visible = row_work(q, k, config)
        density = float(work.sum()) / float(visible.sum())
        for world in args.ranks:
            row = dict(length=length, world_size=world, density=round(density, 4))
            for balancer in balancers:
                for name, w in (("sparse", work), ("causal", visible)):
                    ranks = per_rank(w, length, world, balancer, config.block_size)
                    mean = sum(ranks) / len(ranks)
                    row[f"{balancer}_{name}_imbalance"] = round(max(ranks) / mean, 3)
                    if name == "sparse":
                        row[f"{balancer}_sparse_per_rank"] = ranks
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if "per_rank" not in k}), flush=True)
        print(f"# {length}: {time.perf_counter() - t0:.1f} s", flush=True)
    result = dict(
        what="selected-block work per rank under context parallel sharding (selection only)",
        inputs=f"bench/synthetic.py, Hq={args.heads}, Hkv={args.heads // 4}, "
        f"D={args.head_dim}, seed {args.seed}, default PrismConfig",
        torch=torch.__version__,
        machine=platform.machine() + " CPU",
        date=datetime.date.today().isoformat(),
        rows=rows,
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
