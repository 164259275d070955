"""Selection-step micro-benchmarks and FlexAttention kernel-option sweep (CUDA only).

One run answers the questions behind the performance work of bench/NOTES.md:

1. ``select``: ``prism_block_mask`` per length (Llama shape, synthetic post-RoPE inputs):
   median GPU-inclusive time (``triton.testing.do_bench``), host time per call (issue time
   of 20 calls without synchronising), the time of a CUDA-graph replay of the same work
   (GPU time without host overhead), and the variant with scoring and selection as two
   compiled graphs instead of one.
2. ``kernel``: the sparse FlexAttention at 128K on a random 10 % mask, on Prism's own mask and
   dense, under several ``kernel_options``.
   ``host``: the host time per call of the selection's pieces (pooling, compiled graph,
   BlockMask) at the given lengths.
3. ``profile``: the CUDA kernel table of the selection at the given lengths (text files).
4. ``micro``: the selection's building blocks (sorts, cumsum, softmax, pooling, compaction)
   timed one by one at the given lengths.
5. ``memory``: time and extra memory of the selection at 1M tokens for several
   ``max_score_elements``.

    python -m bench.tune --out-dir $OUT
    # FlashAttention-4 as flex's backend against the Triton kernel (wheels: bench/offline_gpu.sh)
    python -m bench.tune --parts kernel --kernel-options flash tma --out-dir $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch
from torch.nn.attention.flex_attention import flex_attention
from torch.profiler import ProfilerActivity, profile

import prism_flex
from prism_flex import pipeline
from prism_flex._compile import GraphedStage, Mode, run_stage
from prism_flex.block_mask import compact_blocks, score_and_select_tables, select_tables
from prism_flex.selection import Thresholds

from .attention import dense_causal_block_mask, prism_config, random_causal_block_mask
from .synthetic import SyntheticSpec, synthetic_qkv

LLAMA = (32, 8, 128, 500000.0)

KERNEL_OPTIONS = {
    "default": {},
    "m128_n128_w8_s2": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    "m128_n64_w8_s4": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 4},
    "m128_n64_w4_s3": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    "m64_n64_w4_s3": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    "tma": {"USE_TMA": True},
    "prescale": {"PRESCALE_QK": True},
    "tma_prescale": {"USE_TMA": True, "PRESCALE_QK": True},
    # FlashAttention-4 through CuTe-DSL (needs the flash-attn-4 and nvidia-cutlass-dsl wheels:
    # bench/offline_gpu.sh "wheels"); experimental in torch 2.11, asked for explicitly.
    "flash": {"BACKEND": "FLASH"},
}


def do_bench(fn) -> float:
    from triton.testing import do_bench as tdb

    return float(tdb(fn, warmup=50, rep=300, return_mode="median"))


def host_us(fn, calls: int = 20) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def graph_replay_ms(fn) -> float | None:
    """Median time of a CUDA-graph replay of ``fn`` (its GPU work, no host overhead)."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return do_bench(g.replay)
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        print("graph capture failed:", type(e).__name__, str(e)[:200], flush=True)
        return None


def two_stage_mask(q, k, cfg):
    """The same selection as two compiled graphs (scores, then tables)."""
    mode = Mode.COMPILED
    pooled = pipeline.pool_inputs(q, k, cfg, mode)
    scores = pipeline.band_scores(pooled, cfg, mode)
    return run_stage(
        select_tables,
        mode,
        cfg,
        scores,
        0,
        pooled.q_pool.shape[2],
        q.shape[2],
        k.shape[2],
        *Thresholds.of(cfg),
    )


def run_select(lengths, out, cfg, two_stage=True):
    hq, hkv, d, base = LLAMA
    rows = []
    for L in lengths:
        q, k, v = synthetic_qkv(hq, hkv, L, d, spec=SyntheticSpec(rope_base=base), device="cuda")
        t0 = time.perf_counter()
        mask = prism_flex.prism_block_mask(q, k, cfg, v=v)
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        fused = lambda q=q, k=k, v=v: prism_flex.prism_block_mask(q, k, cfg, v=v)  # noqa: E731
        row = dict(
            L=L,
            first_call_s=first,
            density=float(prism_flex.block_density(mask).mean()),
            ms=do_bench(fused),
            host_us=host_us(fused),
            graph_ms=graph_replay_ms(fused),
        )
        if two_stage and cfg.output_error is None:
            two = lambda q=q, k=k: two_stage_mask(q, k, cfg)  # noqa: E731
            two()
            row.update(two_stage_ms=do_bench(two), two_stage_host_us=host_us(two))
        rows.append(row)
        print(json.dumps(row), flush=True)
        del q, k, v, mask
        torch.cuda.empty_cache()
    out["select"] = rows


def run_host(lengths, out, cfg):
    """Host (issue) time per call of the selection's pieces: eager pooling (with the
    final-block inputs of ``final_block_pool``), the compiled graph alone (on pooled inputs),
    its CUDA-graph replay, the BlockMask wrapper alone, and the whole call."""
    from prism_flex.block_mask import block_mask_from_tables

    hq, hkv, d, base = LLAMA
    bs = cfg.block_size
    temps = (cfg.high_temperature, cfg.low_temperature)
    thrs = tuple(Thresholds.of(cfg))
    mode = Mode.COMPILED
    rows = []
    for L in lengths:
        q, k, _ = synthetic_qkv(hq, hkv, L, d, spec=SyntheticSpec(rope_base=base), device="cuda")
        prism_flex.prism_block_mask(q, k, cfg)
        pooled = pipeline.pool_inputs(q, k, cfg, mode)
        args = (*pooled, L, L, *temps, *thrs)
        tables = run_stage(score_and_select_tables, mode, cfg, *args)
        graphed = GraphedStage(score_and_select_tables)
        fns = {
            "whole_call": lambda: prism_flex.prism_block_mask(q, k, cfg),
            "pool_inputs": lambda: pipeline.pool_inputs(q, k, cfg, mode),
            "compiled_stage": lambda: run_stage(score_and_select_tables, mode, cfg, *args),
            "graphed_stage": lambda: graphed(cfg, *args),
            "block_mask_from_tables": lambda: block_mask_from_tables(*tables, 0, L, L, bs),
            "empty_launch_x24": lambda: [
                torch.empty(1, device=q.device).add_(1) for _ in range(24)
            ],
        }
        row = {"L": L}
        for name, fn in fns.items():
            fn()
            fn()
            row[name] = round(min(host_us(fn) for _ in range(5)), 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out["host"] = rows


def full_blocks_only(mask):
    """``mask`` with its partial blocks listed as full ones and a trivial ``mask_mod``: the case
    where FLASH was reported to ignore the block lists (PyTorch #188322), so its output must
    equal the Triton kernel's on the same mask (which the diagonal blocks, now full, make
    non-causal inside the block: the two kernels still compute the same thing)."""
    from torch.nn.attention.flex_attention import BlockMask, noop_mask

    width = mask.kv_indices.shape[-1]
    idx = torch.cat([mask.kv_indices, mask.full_kv_indices], -1)
    num = mask.kv_num_blocks + mask.full_kv_num_blocks
    # partial entries first (kv_num_blocks of them), then the full ones: gather both lists
    # into one, in that order, padded with zeros to the original width.
    pos = torch.arange(width, device=idx.device)
    src = torch.where(
        pos < mask.kv_num_blocks[..., None], pos, pos - mask.kv_num_blocks[..., None] + width
    )
    merged = idx.gather(-1, src.clamp(max=2 * width - 1)).masked_fill(pos >= num[..., None], 0)
    return BlockMask.from_kv_blocks(
        torch.zeros_like(num),
        torch.zeros_like(merged),
        num.contiguous(),
        merged.to(torch.int32).contiguous(),
        BLOCK_SIZE=mask.BLOCK_SIZE,
        mask_mod=noop_mask,
        seq_lengths=mask.seq_lengths,
        compute_q_blocks=False,
    )


def run_kernel(L, out, options=None):
    hq, hkv, d, base = LLAMA
    q, k, v = synthetic_qkv(hq, hkv, L, d, spec=SyntheticSpec(rope_base=base), device="cuda")
    masks = {
        "random_0.1": random_causal_block_mask(hq, L, 0.1, q.device, seed=0),
        "prism": prism_flex.prism_block_mask(q, k, prism_flex.PrismConfig()),
        "dense": dense_causal_block_mask(L, q.device),
    }
    masks["random_0.1_full_noop"] = full_blocks_only(masks["random_0.1"])
    names = ["default"] + [n for n in (options or KERNEL_OPTIONS) if n != "default"]
    rows, default_out = [], {}
    for name in names:
        opts = KERNEL_OPTIONS[name]
        # a fresh compiled function per option set: kernel_options are compile-time constants
        flex = torch.compile(flex_attention, fullgraph=True, dynamic=False)
        for mname, mask in masks.items():

            def fn(mask=mask, flex=flex, opts=opts):
                return flex(q, k, v, block_mask=mask, enable_gqa=True, kernel_options=dict(opts))

            try:
                o = fn()
                row = dict(options=name, mask=mname, L=L, ms=do_bench(fn))
                if name == "default":
                    default_out[mname] = o
                elif mname in default_out:
                    row["max_abs_diff_vs_default"] = float(
                        (o.float() - default_out[mname].float()).abs().max()
                    )
            except Exception as e:  # noqa: BLE001 - an option the kernel rejects is a result
                row = dict(
                    options=name, mask=mname, L=L, error=f"{type(e).__name__}: {str(e)[:300]}"
                )
            rows.append(row)
            print(json.dumps(row), flush=True)
        torch._dynamo.reset()
    out["kernel"] = rows


def run_profile(lengths, out_dir, cfg):
    hq, hkv, d, base = LLAMA
    for L in lengths:
        q, k, v = synthetic_qkv(hq, hkv, L, d, spec=SyntheticSpec(rope_base=base), device="cuda")
        for _ in range(3):
            prism_flex.prism_block_mask(q, k, cfg, v=v)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                prism_flex.prism_block_mask(q, k, cfg, v=v)
            torch.cuda.synchronize()
        table = prof.key_averages().table(
            sort_by="cuda_time_total", row_limit=30, max_name_column_width=70
        )
        cpu = prof.key_averages().table(
            sort_by="cpu_time_total", row_limit=25, max_name_column_width=70
        )
        with open(os.path.join(out_dir, f"profile_select_{L // 1024}k.txt"), "w") as f:
            f.write(
                f"# prism_block_mask, llama shape, L={L}, 5 calls, {prism_flex.__file__}, "
                f"{cfg}\n## by CUDA time\n{table}\n"
                f"## by CPU time\n{cpu}\n"
            )
        del q, k


def run_micro(L, out):
    """Building blocks of the selection at length ``L`` (Llama shape), each timed alone, to
    say which part a faster selection must attack."""
    hq, hkv, d, base = LLAMA
    n = L // 128
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(1, hq, n, n, device="cuda", generator=g) * 3
    probs = torch.softmax(logits, -1)
    rows = []

    def add(name, fn):
        try:
            ms = do_bench(fn)
        except Exception as e:  # noqa: BLE001 - reported
            ms = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(dict(L=L, name=name, ms=ms))
        print(json.dumps(rows[-1]), flush=True)

    half = probs[:, :, : n // 2]
    folded = torch.cat([half, half[..., :1]], -1).contiguous()  # (1, H, N/2, N+1)
    bits = probs.view(torch.int32)
    add("sort_f32_full", lambda: torch.sort(probs, -1, descending=True).values)
    add("sort_i32_full", lambda: torch.sort(bits, -1, descending=True).values)
    add("sort_f16_full", lambda p=probs.half(): torch.sort(p, -1, descending=True).values)
    add("sort_f32_folded", lambda: torch.sort(folded, -1, descending=True).values)
    for w in (256, 512):
        part = probs[..., :w].contiguous()
        add(f"sort_f32_width{w}", lambda part=part: torch.sort(part, -1, descending=True).values)
    static_sort = torch.compile(lambda x: torch.sort(x, -1, descending=True).values, dynamic=False)
    add("sort_f32_full_inductor_static", lambda: static_sort(probs))
    add("topk_f32_k128", lambda: torch.topk(probs, 128, -1).values)
    add("cumsum_f32_full", lambda: torch.cumsum(probs, -1))
    add("softmax_f32_full", lambda: torch.softmax(logits, -1))
    table = probs > 1.0 / n
    comp = torch.compile(compact_blocks, dynamic=True)
    add("compact_compiled", lambda: comp(table))
    q, k, _ = synthetic_qkv(hq, hkv, L, d, spec=SyntheticSpec(rope_base=base), device="cuda")
    from prism_flex.scoring import pool_blocks

    pool = torch.compile(pool_blocks, dynamic=True)
    add("pool_q_compiled", lambda: pool(q, 128))
    add("pool_k_compiled", lambda: pool(k, 128))
    add("pool_q_eager", lambda: pool_blocks(q, 128))
    add("pool_k_eager", lambda: pool_blocks(k, 128))
    add("pool_q_eager_float_sum", lambda: q.view(1, hq, n, 128, d).sum(3, dtype=torch.float32))
    cfg = prism_flex.PrismConfig()
    add("prism_block_mask", lambda: prism_flex.prism_block_mask(q, k, cfg))
    out.setdefault("micro", []).extend(rows)


def run_memory(L, out, base_cfg):
    """``prism_block_mask`` at ``L`` tokens under several ``max_score_elements``: time and
    the memory it allocates on top of its inputs, split into the index tables (fixed by
    FlexAttention's format) and the rest (the scoring's working memory)."""
    hq, hkv, d, base = LLAMA
    q, k, v = synthetic_qkv(hq, hkv, L, d, spec=SyntheticSpec(rope_base=base), device="cuda")
    n = L // 128
    tables_gib = 2 * hq * n * (n + 1) * 4 / 2**30
    rows = []
    for elements in (2**26, 2**25, 2**24):
        cfg = dataclasses.replace(base_cfg, max_score_elements=elements)
        mask = prism_flex.prism_block_mask(q, k, cfg, v=v)
        del mask
        torch.cuda.synchronize()
        base_bytes = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        mask = prism_flex.prism_block_mask(q, k, cfg, v=v)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        extra = (torch.cuda.max_memory_allocated() - base_bytes) / 2**30
        row = dict(
            L=L,
            max_score_elements=elements,
            ms=ms,
            extra_gib=extra,
            tables_gib=tables_gib,
            scoring_gib=extra - tables_gib,
            density=float(prism_flex.block_density(mask).mean()),
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
        del mask
        torch.cuda.empty_cache()
    out.setdefault("memory", []).extend(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    p.add_argument("--kernel-length", type=int, default=131072)
    p.add_argument(
        "--kernel-options",
        nargs="*",
        choices=sorted(KERNEL_OPTIONS),
        default=None,
        help="kernel: the option sets to time (default: all; 'default' always runs first)",
    )
    p.add_argument("--profile-lengths", type=int, nargs="*", default=[16384, 131072])
    p.add_argument("--micro-lengths", type=int, nargs="*", default=[65536, 131072])
    p.add_argument("--memory-lengths", type=int, nargs="*", default=[1048576])
    p.add_argument("--parts", nargs="+", default=["select", "profile", "kernel"])
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument(
        "--config",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="PrismConfig fields for the select, profile and memory parts",
    )
    p.add_argument(
        "--no-two-stage",
        action="store_true",
        help="select: skip the two-graph variant (e.g. when timing older code)",
    )
    a = p.parse_args()
    cfg = prism_config(a.config)
    os.makedirs(a.out_dir, exist_ok=True)
    out = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "package": prism_flex.__file__,
        "config": repr(cfg),
    }
    gpu = torch.cuda.get_device_name()
    prefix = next((g for g in ("h100", "h200", "b200") if g in gpu.lower()), "gpu")
    path = os.path.join(a.out_dir, f"{prefix}_tune.json")
    for part in a.parts:
        t0 = time.time()
        if part == "select":
            run_select(a.lengths, out, cfg, not a.no_two_stage)
        elif part == "host":
            run_host(a.lengths, out, cfg)
        elif part == "profile":
            run_profile(a.profile_lengths, a.out_dir, cfg)
        elif part == "micro":
            for L in a.micro_lengths:
                run_micro(L, out)
        elif part == "memory":
            for L in a.memory_lengths:
                run_memory(L, out, cfg)
        elif part == "kernel":
            run_kernel(a.kernel_length, out, a.kernel_options)
        print(f"== {part} done in {time.time() - t0:.0f}s", flush=True)
        with open(path, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
