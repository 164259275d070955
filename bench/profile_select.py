"""Where the time of Prism's selection step goes: a torch.profiler table of its CUDA kernels.

    python -m bench.profile_select --length 131072 --shape llama
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import prism_flex

from .synthetic import SyntheticSpec, synthetic_qkv

SHAPES = {"llama": (32, 8, 128, 500000.0), "qwen": (14, 2, 64, 1e6)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=131072)
    p.add_argument("--shape", default="llama", choices=list(SHAPES))
    p.add_argument("--rows", type=int, default=25)
    a = p.parse_args()
    hq, hkv, d, base = SHAPES[a.shape]
    q, k, _ = synthetic_qkv(hq, hkv, a.length, d, spec=SyntheticSpec(rope_base=base),
                            device="cuda")
    cfg = prism_flex.PrismConfig()
    for _ in range(3):
        prism_flex.prism_block_mask(q, k, cfg)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            prism_flex.prism_block_mask(q, k, cfg)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
