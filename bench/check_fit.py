"""GPU check of the threshold fit (``PrismConfig.output_error``): compiled against eager.

On CUDA the fit's FlexAttention is compiled (block lists, query tiles of ``fit_tokens`` rows,
log-sum-exp returned); the eager path (``compiled=False``) computes the same per-piece sums in
plain PyTorch (``fit_attention_plain``, the one tested against the float64 reference on CPU,
tests/test_fit.py). (``bench/results/h200_check_fit.json`` predates that: its eager path was
eager FlexAttention with the piece looked up in the ``mask_mod``.)
Per shape and length: the share of heads whose whole block table is the same on both paths
(a head's fitted threshold may flip where a candidate's error is within rounding of the
budget), the densities, and the time of the compiled ``prism_block_mask`` with and without
the fit.

    python -m bench.check_fit --out $OUT/check_fit.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
from triton.testing import do_bench

import prism_flex

from .check_cuda import SHAPES
from .synthetic import SyntheticSpec, synthetic_qkv


def check(shape, lq, lkv, cfg) -> dict:
    hq, hkv, d, base = SHAPES[shape]
    q, k, v = synthetic_qkv(
        hq, hkv, lkv, d, spec=SyntheticSpec(rope_base=base), device="cuda", seed=lkv
    )
    q = q[:, :, lkv - lq :].contiguous()
    compiled = prism_flex.prism_block_mask(q, k, cfg, v=v)
    eager = prism_flex.prism_block_mask(q, k, cfg, v=v, compiled=False)
    tc, te = compiled.to_dense().bool(), eager.to_dense().bool()
    same_heads = (tc == te).flatten(2).all(-1).float().mean().item()
    plain = dataclasses.replace(cfg, output_error=None)
    row = dict(
        shape=shape,
        Lq=lq,
        Lkv=lkv,
        same_heads=same_heads,
        density_compiled=prism_flex.block_density(compiled).mean().item(),
        density_eager=prism_flex.block_density(eager).mean().item(),
        density_no_fit=prism_flex.block_density(prism_flex.prism_block_mask(q, k, plain))
        .mean()
        .item(),
        ms_fit=do_bench(lambda: prism_flex.prism_block_mask(q, k, cfg, v=v)),
        ms_no_fit=do_bench(lambda: prism_flex.prism_block_mask(q, k, plain)),
    )
    out, dens = prism_flex.prism_attention(q, k, v, cfg, return_density=True)
    row["finite"] = bool(torch.isfinite(out).all())
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["qwen", "llama"], choices=list(SHAPES))
    p.add_argument("--cases", nargs="+", default=["4096x4096", "8192x8192", "3000x8192"])
    p.add_argument("--config", nargs="*", default=["output_error=0.1"], metavar="FIELD=VALUE")
    p.add_argument("--out", default="bench/results/h200_check_fit.json")
    a = p.parse_args()
    from .attention import prism_config

    cfg = prism_config(a.config)
    if cfg.output_error is None:
        raise SystemExit("--config must set output_error")
    rows = []
    for shape in a.shapes:
        for case in a.cases:
            lq, lkv = map(int, case.split("x"))
            rows.append(check(shape, lq, lkv, cfg))
    with open(a.out, "w") as f:
        json.dump(
            {
                "gpu": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "config": repr(cfg),
                "rows": rows,
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
