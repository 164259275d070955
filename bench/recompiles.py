"""Dynamo compiles of ``prism_attention`` after warm-up: lengths, ``Lq < Lkv``, batch sizes.

The first call at ``--lengths[0]`` (batch 1, ``Lq == Lkv``) compiles every stage; each later
step should compile nothing. Steps, in this order: every other length of ``--lengths`` (batch
1, ``Lq == Lkv``); ``Lq < Lkv`` (a chunk of ``Lkv // 4`` queries continuing a cache, at each
length); batch sizes ``--batches`` at the first length. A step's count is the number of graphs
dynamo compiled during it (``counters["stats"]["unique_graphs"]``: first compiles and
recompiles alike); the recompile reasons are printed with ``--explain``
(``TORCH_LOGS=recompiles`` gives the same).

    python -m bench.recompiles                                # H200: Llama shape, 8K..128K
    python -m bench.recompiles --device cpu --lengths 512 1024 --batches 1 2 --heads 4 2 \\
        --head-dim 64                                         # smoke test (minutes on CPU)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.recompiles", description=__doc__.split("\n")[0]
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", nargs="+", type=int, default=[8192, 16384, 32768, 65536, 131072])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--heads", nargs=2, type=int, default=[32, 8], metavar=("HQ", "HKV"))
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument(
        "--batch-length",
        type=int,
        default=None,
        help="length of the batch-size steps (default: the first length)",
    )
    p.add_argument("--out", default=None, help="JSON output path")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from prism_flex import PrismConfig, prism_attention

    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hq, hkv = args.heads
    d = args.head_dim
    # Forced sparse: the point is the selection's compiled stages, whatever the size rule says.
    config = PrismConfig(sparse_min_flops=0, dense_below=0)
    gen = torch.Generator(device=device).manual_seed(0)

    def call(batch: int, q_len: int, kv_len: int) -> None:
        q = torch.randn(batch, hq, q_len, d, device=device, dtype=dtype, generator=gen)
        k = torch.randn(batch, hkv, kv_len, d, device=device, dtype=dtype, generator=gen)
        v = torch.randn_like(k)
        with torch.inference_mode():
            prism_attention(q, k, v, config)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    steps: list[dict] = []

    def step(name: str, batch: int, q_len: int, kv_len: int) -> None:
        g0, t0 = graphs(), time.perf_counter()
        call(batch, q_len, kv_len)
        row = dict(
            step=name,
            batch=batch,
            q_len=q_len,
            kv_len=kv_len,
            graphs=graphs() - g0,
            seconds=round(time.perf_counter() - t0, 3),
        )
        steps.append(row)
        print(
            f"{name:10s} B={batch} Lq={q_len:>7d} Lkv={kv_len:>7d}: {row['graphs']} graphs "
            f"compiled, {row['seconds']:.2f} s",
            file=sys.stderr,
            flush=True,
        )

    first = args.lengths[0]
    step("warm-up", 1, first, first)
    step("warm-up", 1, first, first)  # CUDA-graph capture happens at the second sighting
    for n in args.lengths[1:]:
        step("length", 1, n, n)
    for n in args.lengths:
        step("Lq<Lkv", 1, n // 4, n)
    bl = args.batch_length or first
    for b in args.batches:
        step("batch", b, bl, bl)
    after = sum(r["graphs"] for r in steps[2:])
    result = dict(
        meta=dict(
            device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            torch=torch.__version__,
            date=time.strftime("%Y-%m-%dT%H:%M:%S"),
            heads=[hq, hkv],
            head_dim=d,
        ),
        steps=steps,
        graphs_after_warmup=after,
    )
    print(f"graphs compiled after warm-up: {after}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
