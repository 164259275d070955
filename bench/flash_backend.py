"""FlexAttention's FLASH backend (FlashAttention-4 through CuTe-DSL) on Prism's masks:
correctness against a float64 reference, then speed against the Triton kernel we use.

Needs the flash-attn-4 and nvidia-cutlass-dsl wheels (``bench/offline_gpu.sh wheels``, then
``source bench/offline_gpu.sh env``). Run from the repository root on a CUDA machine::

    python -m bench.flash_backend --out $OUT/flash_backend.json

1. **Correctness** at ``--ref-length`` tokens (Llama and Qwen2.5 head shapes, Lq == Lkv and
   Lq = Lkv / 2): Prism's ``BlockMask`` as ``prism_block_mask`` returns it (``package``), and
   with four spellings of the same causal ``mask_mod`` (plain ``q >= kv``; the offset as a
   captured 0-dim tensor, the package's spelling before FLASH was supported; as a 1-element
   tensor read at ``[0]``; as a ``(B,)`` tensor read at ``[b]``, the package's now), each
   run by both backends, compared with float64 attention over the mask's token-level ``to_dense``
   expansion. ``max_err`` / ``mean_err``: against that reference; the rule of our tests is
   FLASH's error at most 2x the Triton kernel's in the same dtype. A spelling FLASH rejects is
   recorded with its error.
2. **Speed** at ``--lengths`` (Llama and Qwen shapes, Prism's default mask): median of
   ``triton.testing.do_bench`` for the compiled flex the package runs (``dynamic=True``,
   ``USE_TMA`` on Hopper) and the same with ``BACKEND="FLASH"``, with the dynamo graph count.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform

import torch
from torch.nn.attention.flex_attention import BlockMask

import prism_flex
from prism_flex._compile import compiled_flex, kernel_options, lengths_only_dynamic
from prism_flex.block_mask import with_mask_mod

from .attention import SHAPES
from .synthetic import SyntheticSpec, synthetic_qkv


def spellings(offset: int, batch: int, device) -> dict:
    """The same causal rule ``kv <= q + offset``, spelled four ways."""
    out = {}
    if offset == 0:
        out["plain"] = lambda b, h, q, kv: q >= kv
    t0 = torch.full((), offset, dtype=torch.int32, device=device)
    out["offset_0d"] = lambda b, h, q, kv: q + t0 >= kv
    t1 = torch.full((1,), offset, dtype=torch.int32, device=device)
    out["offset_1d"] = lambda b, h, q, kv: q + t1[0] >= kv
    tb = torch.full((batch,), offset, dtype=torch.int32, device=device)
    out["offset_b"] = lambda b, h, q, kv: q + tb[b] >= kv
    return out


def reference(q, k, v, mask: BlockMask, offset: int) -> torch.Tensor:
    """float64 attention over the token-level expansion of ``mask`` (causal, bottom-right)."""
    bs = mask.BLOCK_SIZE[0]
    lq, lkv = q.shape[2], k.shape[2]
    blocks = mask.to_dense().bool()  # (B, H, Nq, Nk)
    tok = blocks.repeat_interleave(bs, 2).repeat_interleave(bs, 3)[..., :lq, :lkv]
    causal = torch.arange(lkv, device=q.device)[None, :] <= (
        torch.arange(lq, device=q.device)[:, None] + offset
    )
    allowed = tok & causal
    g = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(g, 1)
    vv = v.double().repeat_interleave(g, 1)
    s = (q.double() @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ vv


def run_flex(q, k, v, mask, options):
    q, k, v = lengths_only_dynamic(q, k, v)
    return compiled_flex()(q, k, v, block_mask=mask, enable_gqa=True, kernel_options=options)


def correctness(shape, length, device) -> list[dict]:
    rows = []
    spec = SyntheticSpec(rope_base=shape.rope_base)
    q, k, v = synthetic_qkv(shape.hq, shape.hkv, length, shape.head_dim, spec=spec, device=device)
    triton_opts = kernel_options(q.device)
    for q_len in (length, length // 2):
        qq = q[:, :, length - q_len :].contiguous()
        offset = length - q_len
        base = prism_flex.prism_block_mask(qq, k)
        ref = None
        for name, mod in [("package", None)] + list(spellings(offset, 1, device).items()):
            # the mask as prism_block_mask returns it, then respelled; a fresh compile cache
            # per spelling (each new mask_mod is a new graph: dynamo's recompile limit)
            mask = base if mod is None else with_mask_mod(base, mod)
            torch._dynamo.reset()
            compiled_flex.cache_clear()
            if ref is None:
                ref = reference(qq, k, v, mask, offset)
            for backend, opts in (("triton", triton_opts), ("flash", {"BACKEND": "FLASH"})):
                row = dict(
                    part="correctness",
                    shape=shape.name,
                    q_len=q_len,
                    kv_len=length,
                    mask_mod=name,
                    backend=backend,
                )
                try:
                    err = (run_flex(qq, k, v, mask, opts).double() - ref).abs()
                    row.update(max_err=float(err.max()), mean_err=float(err.mean()))
                except Exception as e:  # noqa: BLE001 - a rejected spelling is a result
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(json.dumps(row), flush=True)
                rows.append(row)
        del ref
    return rows


def speed(shape, lengths, device, mask_mod_name: str) -> list[dict]:
    from triton.testing import do_bench

    rows = []
    for backend in ("triton", "flash"):
        torch._dynamo.reset()
        compiled_flex.cache_clear()
        for length in lengths:
            spec = SyntheticSpec(rope_base=shape.rope_base)
            q, k, v = synthetic_qkv(
                shape.hq, shape.hkv, length, shape.head_dim, spec=spec, device=device
            )
            base = prism_flex.prism_block_mask(q, k)
            mask = with_mask_mod(base, spellings(0, 1, device)[mask_mod_name])
            opts = kernel_options(q.device) if backend == "triton" else {"BACKEND": "FLASH"}
            before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            t0 = torch.cuda.Event(enable_timing=True)
            t1 = torch.cuda.Event(enable_timing=True)
            t0.record()
            run_flex(q, k, v, mask, opts)
            t1.record()
            torch.cuda.synchronize()
            ms = do_bench(functools.partial(run_flex, q, k, v, mask, opts), warmup=25, rep=200)
            row = dict(
                part="speed",
                shape=shape.name,
                length=length,
                backend=backend,
                mask_mod=mask_mod_name,
                ms=float(ms),
                first_call_ms=t0.elapsed_time(t1),
                new_graphs=torch._dynamo.utils.counters["stats"]["unique_graphs"] - before,
                density=float(prism_flex.block_density(base).mean()),
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
            del q, k, v, base, mask
            torch.cuda.empty_cache()
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref-length", type=int, default=4096)
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--shapes", nargs="+", default=["llama", "qwen"], choices=sorted(SHAPES))
    p.add_argument("--speed-mask-mod", default="offset_b", help="the spelling timed")
    p.add_argument("--parts", nargs="+", default=["correctness", "speed"])
    p.add_argument("--out", default="bench/results/flash_backend.json")
    a = p.parse_args()
    device = torch.device("cuda")
    out = dict(
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        rows=[],
    )
    for name in a.shapes:
        if "correctness" in a.parts:
            out["rows"] += correctness(SHAPES[name], a.ref_length, device)
        if "speed" in a.parts:
            out["rows"] += speed(SHAPES[name], a.lengths, device, a.speed_mask_mod)
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
