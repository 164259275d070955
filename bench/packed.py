"""Packed documents: one Prism call over a packed row against one call per document and
against dense attention with the same document mask.

Run from the repository root::

    python -m bench.packed                                   # GPU: 8 x 16K and 2K...64K
    python -m bench.packed --device cpu --scale 64 --shape qwen --reps 2   # CPU smoke test

Cases (batch 1, causal, q_len == kv_len, documents given as ``cu_seqlens``):

- ``8x16K``: eight documents of 16K tokens (128K in one row);
- ``mixed``: documents of 2K, 4K, 8K, 16K, 32K and 64K tokens (126K), shuffled by a seed;
- ``unaligned``: eight documents of 16K +- 1,800 tokens, odd lengths (drawn by the seed), so
  every document after the first starts inside a block.

``--scale N`` divides every length by ``N`` (the CPU smoke test). Methods:

- ``prism_packed``: ``prism_attention(q, k, v, config, cu_seqlens=cu)``, one call;
- ``prism_packed_cpu_offsets``: the same with ``cu_seqlens`` on the CPU (no device sync);
- ``prism_select``: ``prism_block_mask(..., cu_seqlens=cu)`` alone (the windowed selection
  of one mask over the row);
- ``select_per_doc``: ``prism_block_mask`` of each document (views), the selection that a
  packed ``prism_attention`` of long documents runs (the selection's share);
- ``prism_per_doc``: one ``prism_attention`` per document, one after the other (the sum);
- ``flex_doc``: compiled ``flex_attention`` with the dense document-causal ``BlockMask``
  (made once, outside the timing, with ``create_block_mask``);
- ``sdpa_doc``: ``F.scaled_dot_product_attention`` with the same rule as a boolean
  ``(L, L)`` mask (skipped when the mask exceeds ``--sdpa-mask-gib``);
- ``sdpa_per_doc``: SDPA ``is_causal=True`` per document (what varlen kernels compute).

Timing: the median of ``--reps`` calls (CUDA events on GPU, ``perf_counter`` on CPU) after
``--warmup`` calls. The config is ``PrismConfig()`` unless ``FIELD=VALUE`` overrides are
given (``PrismConfig.from_fields``). Results: a JSON file with the GPU, torch version and
date (``bench/results/h200_packed.json`` on CUDA, ``cpu_smoke_packed.json`` on CPU) and a
printed table; ``speedup_vs_per_doc`` is ``prism_per_doc`` ms / ``prism_packed`` ms (the
issue's target: at least 1), ``select_share`` is ``select_per_doc`` (else
``prism_select``) ms / ``prism_packed`` ms.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask

import prism_flex
from prism_flex import documents
from prism_flex._compile import compiled_flex

from .attention import SHAPES, Shape
from .synthetic import SyntheticSpec, synthetic_qkv

METHODS = (
    "prism_packed",
    "prism_packed_cpu_offsets",
    "prism_select",
    "select_per_doc",
    "prism_per_doc",
    "flex_doc",
    "sdpa_doc",
    "sdpa_per_doc",
)
K = 1024


def cases(scale: int, seed: int) -> dict[str, list[int]]:
    """Document lengths of each case, divided by ``scale``."""
    g = torch.Generator().manual_seed(seed)
    mixed = [2 * K, 4 * K, 8 * K, 16 * K, 32 * K, 64 * K]
    mixed = [mixed[i] for i in torch.randperm(len(mixed), generator=g).tolist()]
    # Lengths that are no multiple of the block size: documents after the first start
    # inside a block (the packed call then runs one call per document).
    odd = (torch.randint(-900, 900, (8,), generator=g) * 2 + 1 + 16 * K).tolist()
    out = {"8x16K": [16 * K] * 8, "mixed": mixed, "unaligned": odd}
    return {name: [max(1, n // scale) for n in lens] for name, lens in out.items()}


def timed(fn: Callable[[], object], reps: int, warmup: int, cuda: bool) -> float:
    """Median milliseconds of ``reps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for a, b in zip(starts, ends):
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize()
        return statistics.median(a.elapsed_time(b) for a, b in zip(starts, ends))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def setup(method, q, k, v, cu, config, args):
    """``fn()`` running ``method`` on the packed inputs, plus a dict of extra fields."""
    spans = list(zip(cu[:-1].tolist(), cu.diff().tolist()))
    gqa = q.shape[1] != k.shape[1]
    length = q.shape[2]
    if method == "prism_packed":
        out, density = prism_flex.prism_attention(
            q, k, v, config, cu_seqlens=cu, return_density=True
        )
        # Correctness on the device: the separate calls' output, bit for bit expected.
        views = _views(q, k, v, spans)
        want = torch.cat([prism_flex.prism_attention(*x, config) for x in views], 2)
        info = {
            "density": float(density.mean()),
            "max_abs_vs_per_doc": float((out.float() - want.float()).abs().max()),
            "equal_to_per_doc": bool(torch.equal(out, want)),
        }
        del out, want
        return lambda: prism_flex.prism_attention(q, k, v, config, cu_seqlens=cu), info
    if method == "prism_packed_cpu_offsets":
        cu_host = cu.cpu()
        return lambda: prism_flex.prism_attention(q, k, v, config, cu_seqlens=cu_host), {}
    if method == "prism_select":
        return lambda: prism_flex.prism_block_mask(q, k, config, cu_seqlens=cu), {}
    if method == "select_per_doc":
        views = _views(q, k, v, spans)

        def select_per_doc():
            return [prism_flex.prism_block_mask(x[0], x[1], config) for x in views]

        return select_per_doc, {}
    if method == "prism_per_doc":
        views = [tuple(t[:, :, a : a + n].contiguous() for t in (q, k, v)) for a, n in spans]

        def per_doc():
            return [prism_flex.prism_attention(*x, config) for x in views]

        return per_doc, {}
    if method == "flex_doc":
        # Prism's own document mask_mod (ids indexed by batch and position: the 1-D form
        # `doc[q_idx] == doc[kv_idx]` failed to compile for the CPU, torch 2.13).
        segments = documents.make_segments(None, None, cu, 1, length, q.device, True)
        ids = documents.padded_ids(segments, config.block_size)
        # _compile=True: evaluated block by block; uncompiled it materialises the whole
        # (L, L) mask (128 GiB at 128K tokens: the H100 run of 2026-12-06 ran out of memory).
        mask = create_block_mask(
            documents.document_mask_mod(ids, 0), 1, 1, length, length, device=q.device,
            _compile=q.device.type == "cuda",
        )  # fmt: skip
        flex = compiled_flex()
        return lambda: flex(q, k, v, block_mask=mask, enable_gqa=gqa), {}
    if method == "sdpa_doc":
        if length * length / 2**30 > args.sdpa_mask_gib:
            return None, {"skipped": f"boolean mask of {length}^2 bytes > --sdpa-mask-gib"}
        doc = torch.searchsorted(cu[1:], torch.arange(length, device=q.device), right=True)
        pos = torch.arange(length, device=q.device)
        mask = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa), {}
    if method == "sdpa_per_doc":
        views = _views(q, k, v, spans)

        def sdpa_per_doc():
            return [
                F.scaled_dot_product_attention(*x, is_causal=True, enable_gqa=gqa) for x in views
            ]

        return sdpa_per_doc, {}
    raise ValueError(f"unknown method {method!r}")


def _views(q, k, v, spans):
    return [tuple(t[:, :, a : a + n] for t in (q, k, v)) for a, n in spans]


def environment(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    return {
        "gpu": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_case(name, lens, shape: Shape, config, args, device) -> list[dict]:
    cu = torch.tensor([0] + lens, device=device).cumsum(0)
    length = int(cu[-1])
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    q, k, v = synthetic_qkv(
        shape.hq,
        shape.hkv,
        length,
        shape.head_dim,
        spec=SyntheticSpec(rope_base=shape.rope_base),
        dtype=dtype,
        device=device,
        seed=args.seed,
    )
    rows = []
    with torch.inference_mode():
        for method in args.methods:
            row = dict(case=name, shape=shape.name, docs=lens, length=length, method=method)
            try:
                fn, info = setup(method, q, k, v, cu, config, args)
                row.update(info)
                if fn is not None:
                    row["ms"] = timed(fn, args.reps, args.warmup, device.type == "cuda")
            except Exception as e:  # a method that fails (memory) is recorded, not fatal
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(f"  {name} {method}: {row.get('ms', row.get('skipped', row.get('error')))}")
    by = {r["method"]: r.get("ms") for r in rows}
    for r in rows:
        if r["method"] == "prism_packed" and r.get("ms"):
            if by.get("prism_per_doc"):
                r["speedup_vs_per_doc"] = by["prism_per_doc"] / r["ms"]
            select = by.get("select_per_doc") or by.get("prism_select")
            if select:
                r["select_share"] = select / r["ms"]
            for base in ("flex_doc", "sdpa_doc", "sdpa_per_doc"):
                if by.get(base):
                    r[f"speedup_vs_{base}"] = by[base] / r["ms"]
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'case':8} {'method':14} {'ms':>10} {'density':>8} {'vs per-doc':>10} {'select':>7}")
    for r in rows:
        ms = f"{r['ms']:.2f}" if r.get("ms") is not None else "-"
        dens = f"{r['density']:.3f}" if "density" in r else ""
        vs = f"{r['speedup_vs_per_doc']:.2f}x" if "speedup_vs_per_doc" in r else ""
        share = f"{r['select_share']:.2f}" if "select_share" in r else ""
        print(f"{r['case']:8} {r['method']:14} {ms:>10} {dens:>8} {vs:>10} {share:>7}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("fields", nargs="*", help="PrismConfig FIELD=VALUE overrides")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="llama", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--scale", type=int, default=1, help="divide every document length by it")
    p.add_argument("--cases", nargs="*", default=None, help="8x16K, mixed, unaligned")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sdpa-mask-gib", type=float, default=20.0)
    p.add_argument("--out", default=None, help="JSON path (default by device)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.out is None:
        kind = "h200" if device.type == "cuda" else "cpu_smoke"
        args.out = f"bench/results/{kind}_packed.json"
    config = prism_flex.PrismConfig.from_fields(args.fields)
    shape = SHAPES[args.shape]
    rows = []
    meta = dict(environment(device), config=json.loads(config.to_json()), scale=args.scale)
    for name, lens in cases(args.scale, args.seed).items():
        if args.cases and name not in args.cases:
            continue
        print(f"{name}: {len(lens)} documents, {sum(lens)} tokens, shape {shape.name}")
        rows += run_case(name, lens, shape, config, args, device)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".tmp", "w") as f:
            json.dump(dict(meta, rows=rows), f, indent=1)
        os.replace(args.out + ".tmp", args.out)
    print_table(rows)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
