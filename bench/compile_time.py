"""Cold compile time of Prism's selection on this machine (CPU by default).

Each run uses a fresh, empty inductor cache (a temporary directory, set before torch is
imported; ``--cache-dir DIR`` instead keeps it, so that a second process measures a warm
start), then times the first ``prism_block_mask`` call per ``Lq x Lkv`` pair and counts the
graphs dynamo compiled and its restarts (a frame traced again from the start). Uses only the
public API, so it also times older commits::

    python -m bench.compile_time --fit                      # the threshold fit's stages
    python -m bench.compile_time --lengths 700x700 500x1025
    # the first prism_attention call, cold then warm (bench/NOTES.md, tenth round):
    python -m bench.compile_time --attention --heads 8 2 --lengths 4096x4096 --cache-dir /tmp/c
    python -m bench.compile_time --attention --heads 8 2 --lengths 4096x4096 --cache-dir /tmp/c
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", nargs="+", default=["700x700"], help="LqxLkv pairs")
    p.add_argument("--fit", action="store_true", help="output_error=0.1 (the threshold fit)")
    p.add_argument(
        "--attention",
        action="store_true",
        help="time prism_attention with the default config (sparse_min_flops=0) instead",
    )
    p.add_argument("--heads", nargs=2, type=int, default=[4, 2], metavar=("HQ", "HKV"))
    p.add_argument("--cache-dir", help="inductor cache to use and keep (default: a fresh one)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    cache = args.cache_dir or tempfile.mkdtemp(prefix="prism_compile_time_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    warm = bool(args.cache_dir) and os.path.isdir(cache) and bool(os.listdir(cache))

    import torch
    from torch._dynamo.utils import compilation_time_metrics

    from prism_flex import PrismConfig, prism_attention, prism_block_mask

    # the configuration of tests/test_compiled.py (with and without the fit)
    cfg = PrismConfig(
        dense_below=0,
        sparse_min_flops=0,
        high_threshold=0.8,
        low_threshold=0.8,
        dense_final_blocks=0,
        final_block_pool=32,
    )
    if args.fit:
        cfg = PrismConfig(
            **{**cfg.__dict__, "output_error": 0.1, "fit_query_blocks": 3, "fit_tokens": 16}
        )
    if args.attention:
        cfg = PrismConfig(sparse_min_flops=0)
    g = torch.Generator().manual_seed(0)
    hq, hkv = args.heads
    rows = []
    for pair in args.lengths:
        lq, lkv = (int(x) for x in pair.split("x"))
        q = torch.randn(1, hq, lq, 64, generator=g).to(args.device)
        k = torch.randn(1, hkv, lkv, 64, generator=g).to(args.device)
        v = torch.randn(1, hkv, lkv, 64, generator=g).to(args.device)
        t = time.perf_counter()
        with torch.no_grad():
            if args.attention:
                prism_attention(q, k, v, cfg)
            else:
                prism_block_mask(q, k, cfg, v=v)
        seconds = time.perf_counter() - t
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        # A frame's second attempt is a restart (dynamo began tracing it again).
        restarts = len(compilation_time_metrics.get("compile_attempt_1", []))
        rows.append(
            dict(lq=lq, lkv=lkv, fit=args.fit, attention=args.attention, warm_cache=warm,
                 first_call_s=seconds, graphs=graphs, restarts=restarts)
        )  # fmt: skip
        print(
            f"Lq={lq} Lkv={lkv} fit={args.fit} attention={args.attention} warm cache={warm}: "
            f"first call {seconds:.1f} s, {graphs} graphs and {restarts} restarts so far",
            flush=True,
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(torch=torch.__version__, device=args.device, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
