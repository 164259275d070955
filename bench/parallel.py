"""Context parallel Prism prefill on several GPUs: time and peak memory per rank.

Run under torchrun on one multi-GPU host (NCCL)::

    torchrun --nproc-per-node 2 -m bench.parallel --lengths 1048576 2097152 \\
        --out bench/results/h200x2_parallel.json

CPU smoke test (gloo, tiny, eager; tests/test_parallel.py runs the same through its spawn)::

    torchrun --nproc-per-node 2 -m bench.parallel --device cpu --lengths 2048 --heads 4 \\
        --kv-heads 2 --head-dim 64 --dtype float32 --eager --reps 1 --single both \\
        --config dense_below=0 sparse_min_flops=0 block_size=64 --out /tmp/cp_smoke.json

Per length (batch 1, causal prefill of one sequence, the Llama-3.1-8B attention shape by
default: 32 query heads, 8 KV heads, head dim 128, bf16) every rank builds the same synthetic
post-RoPE q, k, v (``bench/synthetic.py``, same seed), keeps its shard
(``prism_flex.parallel.shard_sequence``) and frees the rest. Rows, each timed on every rank
(median of ``--reps`` after one warm-up; a barrier before each repetition, so the time is
the rank's own from a common start) with the peak memory of the rank's device:

- ``cp_prism``: :func:`prism_flex.parallel.context_parallel_prism_attention`, default config
  (``--config FIELD=VALUE`` overrides), for each ``--balancers``;
- ``cp_dense``: the same call with thresholds 1.0, i.e. FlexAttention over every causally
  visible block under the same sharding and K/V all-gather (it still runs the selection,
  a small part of it at these lengths: compare ``cp_prism``'s selection-only time in
  bench/results for one GPU);
- ``single_prism`` (``--single prism``, default), and ``single_dense`` (``--single both``):
  :func:`prism_flex.prism_attention` (thresholds 1.0 for dense) of the whole sequence on rank
  0 alone, the others waiting: the one-GPU reference.

The JSON (rank 0 writes it, rewritten after every row) records the GPU, torch, date, world
size, the config and, per row, every rank's time and peak memory and the block density.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist

from prism_flex import PrismConfig, prism_attention
from prism_flex.parallel import LOAD_BALANCERS, context_parallel_prism_attention, shard_sequence

from .synthetic import synthetic_qkv


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device):
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def _timed(fn, device, reps, run_here=True):
    """Median seconds of ``fn()`` over ``reps`` after one warm-up, from a barrier; ranks with
    ``run_here`` False only join the barriers."""
    times, result = [], None
    for i in range(reps + 1):
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        if run_here:
            result = fn()
            _sync(device)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1 << 20, 1 << 21])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--balancers", nargs="+", default=["round_robin", "head_tail"])
    p.add_argument("--single", default="prism", choices=["none", "prism", "both"])
    p.add_argument("--no-dense", action="store_true", help="skip cp_dense")
    p.add_argument("--config", nargs="*", default=[], help="PrismConfig FIELD=VALUE overrides")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--eager", action="store_true", help="compiled=False (CPU smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    for balancer in args.balancers:
        if balancer not in LOAD_BALANCERS:
            p.error(f"--balancers: {balancer!r} is not one of {LOAD_BALANCERS}")

    if not dist.is_initialized():
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    config = PrismConfig.from_fields(args.config)
    dense_config = dataclasses.replace(config, high_threshold=1.0, low_threshold=1.0)
    compiled = not args.eager
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    result = dict(
        what="context parallel Prism prefill: time (s, median) and peak memory (GiB) per rank",
        device=gpu,
        world_size=world,
        torch=torch.__version__,
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        shape=dict(heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim),
        dtype=args.dtype,
        config=json.loads(config.to_json()),
        compiled=compiled,
        reps=args.reps,
        inputs="bench/synthetic.py (synthetic post-RoPE, not a real model), seed " + str(args.seed),
        rows=[],
    )

    def record(row):
        rows = [None] * world
        dist.all_gather_object(rows, row)
        if rank == 0:
            merged = dict(rows[0], seconds=[r["seconds"] for r in rows])
            merged["peak_gib"] = [r["peak_gib"] for r in rows]
            result["rows"].append(merged)
            print(json.dumps(merged), flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)

    for length in args.lengths:
        q, k, v = synthetic_qkv(
            args.heads,
            args.kv_heads,
            length,
            args.head_dim,
            dtype=dtype,
            device=device,
            seed=args.seed,
        )
        single = []
        if args.single != "none":
            single.append(("single_prism", config))
        if args.single == "both":
            single.append(("single_dense", dense_config))
        for name, cfg in single:
            _reset_peak(device)

            def one(cfg=cfg):
                return prism_attention(q, k, v, cfg, return_density=True, compiled=compiled)

            with torch.no_grad():
                seconds, out = _timed(one, device, args.reps, run_here=rank == 0)
            density = round(float(out[1].mean()), 4) if rank == 0 else None
            del out
            peak = _peak_gib(device) if rank == 0 else None
            seconds = seconds if rank == 0 else None
            record(dict(row=name, length=length, seconds=seconds, peak_gib=peak, density=density))
        for balancer in args.balancers:
            shards = [
                shard_sequence(t, rank, world, load_balancer=balancer, block_size=config.block_size)
                for t in (q, k, v)
            ]
            if balancer == args.balancers[-1]:
                del q, k, v  # the whole sequence is no longer needed
            rows = [("cp_prism", config)] + ([] if args.no_dense else [("cp_dense", dense_config)])
            for name, cfg in rows:
                _reset_peak(device)

                def cp(cfg=cfg, balancer=balancer, shards=shards):
                    return context_parallel_prism_attention(
                        *shards,
                        cfg,
                        load_balancer=balancer,
                        return_density=True,
                        compiled=compiled,
                    )

                with torch.no_grad():
                    seconds, out = _timed(cp, device, args.reps)
                density = round(float(out[1].mean()), 4)
                del out
                record(
                    dict(
                        row=name,
                        balancer=balancer,
                        length=length,
                        local_len=shards[0].shape[2],
                        seconds=seconds,
                        peak_gib=_peak_gib(device),
                        density=density,
                    )
                )
            del shards
    dist.barrier()


if __name__ == "__main__":
    main()
