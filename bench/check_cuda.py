"""GPU correctness check of prism_flex (a check run on the H200, not a CI test).

For each shape and length: the compiled CUDA path against the float64 reference of
``prism_flex/testing.py``:

- the block mask against the reference selection (rows whose top-p decision is within 1e-5
  of flipping are not compared: the GPU works in float32);
- the output on sampled query blocks (first, last and random ones, every head) against a
  float64 token-level attention over the same blocks, next to the error of that same
  attention computed in bf16 (the input dtype's own error);
- then a user's compiled module doing chunked prefill (Lq < Lkv) with dynamic shapes, and
  the number of graphs compiled over a length sweep after warm-up.

    python -m bench.check_cuda --out bench/results/h200_check.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math

import torch

import prism_flex
from prism_flex import PrismAttention, PrismConfig
from prism_flex import testing as ref

from .synthetic import SyntheticSpec, synthetic_qkv

SHAPES = {"llama": (32, 8, 128, 500000.0), "qwen": (14, 2, 64, 1e6)}
# (q_len, kv_len): two warm-up calls, then eight lengths that must compile nothing new.
SWEEP = [
    (8192, 8192),
    (5000, 9000),
    (4096, 4096),
    (6000, 6000),
    (8191, 8191),
    (10000, 12000),
    (12288, 12288),
    (16000, 16000),
    (3000, 20000),
    (20480, 20480),
]
SMALL_SWEEP = [(lq // 8, lkv // 8) for lq, lkv in SWEEP]


def sampled_blocks(nq: int, count: int, gen: torch.Generator) -> list[int]:
    rest = torch.randperm(max(nq - 2, 0), generator=gen)[: max(count - 2, 0)] + 1
    return sorted({0, nq - 1, *rest.tolist()})


def token_reference(q, k, v, table, blocks, bs, dtype):
    """Attention of the query tokens of ``blocks`` over the selected blocks, in ``dtype``."""
    b, hq, lq, d = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    rows = torch.cat([torch.arange(i * bs, min((i + 1) * bs, lq)) for i in blocks]).to(q.device)
    kv_pos = torch.arange(lkv, device=q.device)
    causal = kv_pos[None, :] <= rows[:, None] + (lkv - lq)
    out = torch.empty(b, hq, rows.numel(), d, dtype=dtype, device=q.device)
    for h in range(hq):
        kh = h // (hq // hkv)
        sel = table[:, h][:, rows // bs].repeat_interleave(bs, dim=-1)[..., :lkv]  # (B, R, Lkv)
        s = (q[:, h, rows].to(dtype) @ k[:, kh].to(dtype).transpose(-1, -2)) / math.sqrt(d)
        s = s.masked_fill(~(sel & causal), float("-inf"))
        out[:, h] = torch.softmax(s.float() if dtype != torch.float64 else s, -1).to(dtype) @ v[
            :, kh
        ].to(dtype)
    return out, rows


def check_one(shape: str, lq: int, lkv: int, sample: int, seed: int, device: str) -> dict:
    hq, hkv, d, base = SHAPES[shape]
    q, k, v = synthetic_qkv(
        hq, hkv, lkv, d, spec=SyntheticSpec(rope_base=base), device=device, seed=seed
    )
    q = q[:, :, lkv - lq :].contiguous()
    cfg = PrismConfig(sparse_min_flops=0)  # the selection itself, at every length
    mask = prism_flex.prism_block_mask(q, k, cfg)
    out, density = prism_flex.prism_attention(q, k, v, cfg, return_density=True)
    table = mask.to_dense().bool()
    # Mask vs the float64 reference selection (on the CPU).
    want, margin = ref.selection(q.cpu().float(), k.cpu().float(), cfg)
    clear = margin > 1e-5
    mask_equal = bool(torch.equal(table.cpu()[clear], want[clear]))
    gen = torch.Generator().manual_seed(seed)
    blocks = sampled_blocks(table.shape[2], sample, gen)
    r64, rows = token_reference(q, k, v, table, blocks, cfg.block_size, torch.float64)
    rbf, _ = token_reference(q, k, v, table, blocks, cfg.block_size, q.dtype)
    ours = out[:, :, rows].double()
    err = ((ours - r64).norm() / r64.norm()).item()
    err_bf16 = ((rbf.double() - r64).norm() / r64.norm()).item()
    row = {
        "shape": shape,
        "Lq": lq,
        "Lkv": lkv,
        "density": density.mean().item(),
        "mask_equal_on_clear_rows": mask_equal,
        "clear_rows": clear.float().mean().item(),
        "sampled_query_blocks": len(blocks),
        "rel_err": err,
        "rel_err_bf16_reference": err_bf16,
        "err_ratio": err / err_bf16 if err_bf16 > 0 else float("inf"),
        "finite": bool(torch.isfinite(out).all()),
    }
    print(json.dumps(row), flush=True)
    return row


def check_user_compile(device: str) -> dict:
    """A user's compiled module, dynamic shapes, prefill then a chunk continuing the cache."""
    attn = PrismAttention(PrismConfig(dense_below=512, sparse_min_flops=0))
    fn = torch.compile(lambda q, k, v: attn(q, k, v) * 1.0, dynamic=True, fullgraph=True)
    hq, hkv, d, base = SHAPES["qwen"]
    out = {}
    for lq, lkv in (
        [(4096, 4096), (2048, 6144), (3000, 8000)]
        if device == "cuda"
        else [(1024, 1024), (600, 1500)]
    ):
        q, k, v = synthetic_qkv(
            hq, hkv, lkv, d, spec=SyntheticSpec(rope_base=base), device=device, seed=lkv
        )
        q = q[:, :, lkv - lq :].contiguous()
        got, want = fn(q, k, v), attn(q, k, v)
        out[f"{lq}x{lkv}"] = (got.float() - want.float()).abs().max().item()
    print("user compile max|diff|:", out, flush=True)
    return out


def check_recompiles(device: str, lengths) -> int:
    from torch._dynamo.utils import counters

    hq, hkv, d, base = SHAPES["llama"]
    cfg = PrismConfig(sparse_min_flops=0)  # the selection itself, at every length

    def call(lq, lkv):
        q, k, v = synthetic_qkv(
            hq, hkv, lkv, d, spec=SyntheticSpec(rope_base=base), device=device, seed=1
        )
        prism_flex.prism_attention(q[:, :, lkv - lq :], k, v, cfg)

    call(*lengths[0]), call(*lengths[1])
    before = counters["stats"]["unique_graphs"]
    for lq, lkv in lengths[2:]:
        call(lq, lkv)
    n = counters["stats"]["unique_graphs"] - before
    print("graphs compiled over the 8-length sweep after warm-up:", n, flush=True)
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["qwen", "llama"], choices=list(SHAPES))
    p.add_argument("--lengths", nargs="+", type=int, default=[8192, 16384, 32768])
    p.add_argument("--sample", type=int, default=8, help="query blocks checked per case")
    p.add_argument("--out", default="bench/results/h200_check.json")
    p.add_argument("--device", default="cuda")
    a = p.parse_args()
    rows = []
    for shape in a.shapes:
        for length in a.lengths:
            rows.append(check_one(shape, length, length, a.sample, seed=length, device=a.device))
        rows.append(
            check_one(
                shape, a.lengths[0] // 2 + 77, a.lengths[0], a.sample, seed=3, device=a.device
            )
        )
    result = {
        "gpu": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "rows": rows,
        "user_compile_max_abs_diff": check_user_compile(a.device),
        "graphs_compiled_in_sweep": check_recompiles(
            a.device, SWEEP if a.device == "cuda" else SMALL_SWEEP
        ),
    }
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    ok = all(r["mask_equal_on_clear_rows"] and r["finite"] and r["err_ratio"] <= 2 for r in rows)
    print("ALL OK" if ok else "SOME CHECK FAILED")


if __name__ == "__main__":
    main()
