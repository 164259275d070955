"""Benchmark Prism block-sparse attention against dense attention kernels.

Run from the repository root::

    python -m bench.attention                       # the H200 sweep and memory run
    python -m bench.attention --device cpu --lengths 1024 2048 --shapes qwen --reps 2

The CPU smoke test skips the memory run and writes ``bench/results/cpu_smoke_*`` so that it
never overwrites GPU results. ``--budget-s`` (default 7 min) is a soft wall-clock limit: rows
that would start later are recorded as skipped rather than run.

For every shape and sequence length (batch 1, causal prefill, q_len == kv_len) it times:

- ``sdpa_flash`` / ``sdpa_cudnn``: ``F.scaled_dot_product_attention(is_causal=True,
  enable_gqa=True)`` pinned to one backend (CUDA only; on CPU the reference is ``sdpa_math``);
- ``flex_dense``: compiled ``flex_attention`` on a causal ``create_block_mask`` mask;
- ``prism_select``: ``prism_flex.prism_block_mask`` alone (the selection overhead);
- ``prism_sparse``: the compiled ``flex_attention`` alone on the Prism mask;
- ``prism_total``: ``prism_flex.prism_attention`` (selection + attention);
- ``flex_density_<d>``: compiled ``flex_attention`` on random causal block masks of fixed
  density ``d`` (always holding the sink block and the diagonal), to separate the kernel's
  cost-versus-density curve from what Prism happens to select.

All flex rows share ``prism_flex``'s compiled ``flex_attention`` (``torch.compile(fullgraph=True,
dynamic=True)``), so their differences come from the masks, not from compile settings.

Timing: the median over many repetitions after warm-up, rotating among several input sets so
that L2 never serves a repetition from the previous one; CUDA events on GPU, ``perf_counter``
on CPU. The number of repetitions adapts to a target time per measurement unless ``--reps``
fixes it. Inputs are synthetic post-RoPE tensors with attention-like structure
(:mod:`bench.synthetic`), never random Gaussian Q/K, whose block scores are unrealistically flat.

A separate memory run (Llama shape, 256K-1M tokens) records time, peak memory and density of
``prism_select`` and ``prism_total``. Results go to a JSON file (rewritten after every length,
so a timeout keeps what finished) and a speedup plot.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

import prism_flex
from prism_flex.block_mask import causal_mask_mod

from .synthetic import SyntheticSpec, synthetic_qkv


class Shape(NamedTuple):
    """Attention geometry of one model family."""

    name: str
    hq: int
    hkv: int
    head_dim: int
    rope_base: float


SHAPES = {
    "llama": Shape("llama", 32, 8, 128, 500000.0),  # Llama-3.1-8B
    "qwen": Shape("qwen", 14, 2, 64, 1000000.0),  # Qwen2.5-0.5B
}
FIXED_DENSITIES = (0.05, 0.1, 0.2, 0.4)
METHODS = (
    "sdpa_flash",
    "sdpa_cudnn",
    "flex_dense",
    "prism_select",
    "prism_sparse",
    "prism_total",
) + tuple(f"flex_density_{d}" for d in FIXED_DENSITIES)
CPU_REFERENCE = "sdpa_math"
INPUT_LABEL = "synthetic-rope"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GIB = float(1 << 30)


FIELD_NOTES = {
    "ms": "median milliseconds per call after warm-up, rotating over n_sets input sets",
    "density": "selected / causally visible (query block, key block) pairs, mean over heads "
    "(and input sets); 1.0 for dense methods",
    "peak_gib": "torch.cuda.max_memory_allocated over one call, after reset_peak_memory_stats",
    "extra_gib": "sweep: peak minus the memory allocated before the call (all input sets and "
    "precomputed masks); memory run: peak minus the input tensors' bytes",
    "speedup_vs_<m>": "ms of method <m> / ms of this row, same shape and length",
    "floor_ratio": "ms / (4 * Hq * D * L^2 / 2 * density FLOPs at peak_tflops)",
    "select_share": "prism_select ms / prism_total ms",
    "max_abs_err": "max |out - out(err_ref)| on input set 0",
    "compiled_graphs": "graphs compiled by dynamo during this row (counters stats.unique_graphs)",
    "flex": "every flex row calls prism_flex.sparse_attention, i.e. "
    "torch.compile(flex_attention, fullgraph=True, dynamic=True)",
}


# --------------------------------------------------------------------------------------------
# Settings and small helpers


@dataclass(frozen=True)
class Settings:
    """How to measure: built once from the command line and passed down."""

    device: torch.device
    dtype: torch.dtype
    warmup: int
    reps: Optional[int]
    target_s: float
    min_reps: int
    max_reps: int
    max_input_sets: int
    input_budget_gib: float
    peak_tflops: float
    deadline: float
    seed: int

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class Case:
    """One benchmarked callable: ``fn(i)`` runs the method on input set ``i``."""

    fn: Callable[[int], object]
    density: Optional[float] = 1.0
    info: dict = field(default_factory=dict)
    check: Optional[Callable[[], dict]] = None


@dataclass
class Timing:
    ms: float
    reps: int
    peak_gib: Optional[float]
    extra_gib: Optional[float]


def fmt_len(n: int) -> str:
    """8192 -> '8K', 1048576 -> '1M'."""
    if n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n % (1 << 10) == 0:
        return f"{n >> 10}K"
    return str(n)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Drop unreachable tensors and give cached blocks back, so rows do not inherit garbage."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def prism_compiled_flex():
    """The compiled ``flex_attention`` that ``prism_flex.prism_attention`` itself calls,
    as ``flex(q, k, v, block_mask=..., enable_gqa=...)``."""

    def flex(q, k, v, block_mask, enable_gqa=True):
        return prism_flex.sparse_attention(q, k, v, block_mask)

    return flex


def graphs_compiled() -> int:
    """Graphs dynamo has compiled so far in this process (first compiles and recompiles)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def max_abs_diff(a: Tensor, b: Tensor) -> float:
    """Max |a - b| in float32, a few heads at a time (a full float32 copy at 128K is 4 GiB)."""
    worst = 0.0
    for h in range(0, a.shape[1], 4):
        d = (a[:, h : h + 4].float() - b[:, h : h + 4].float()).abs().max().item()
        worst = max(worst, d)
    return worst


def flop_floor_ms(shape: Shape, seq_len: int, density: float, peak_tflops: float) -> float:
    """Causal forward FLOPs ``4 * B * Hq * D * L^2 / 2`` (times density) at peak throughput."""
    flops = 4.0 * shape.hq * shape.head_dim * seq_len * seq_len / 2.0 * density
    return flops / (peak_tflops * 1e12) * 1e3


# --------------------------------------------------------------------------------------------
# Timing


def time_case(fn: Callable[[int], object], n_sets: int, s: Settings) -> Timing:
    """Warm up, probe once (peak memory, rep count), then time ``reps`` rotating calls."""
    for i in range(s.warmup):
        fn(i % n_sets)
    sync(s.device)
    free_memory(s.device)

    # Probe: one call on its own gives the peak memory and a first time estimate.
    if s.cuda:
        torch.cuda.reset_peak_memory_stats(s.device)
        base = torch.cuda.memory_allocated(s.device)
    t0 = time.perf_counter()
    out = fn(0)
    sync(s.device)
    probe_s = time.perf_counter() - t0
    peak_gib = extra_gib = None
    if s.cuda:
        peak = torch.cuda.max_memory_allocated(s.device)
        peak_gib, extra_gib = peak / GIB, (peak - base) / GIB
    del out

    reps = s.reps or min(s.max_reps, max(s.min_reps, math.ceil(s.target_s / max(probe_s, 1e-6))))
    times = _cuda_times(fn, n_sets, reps) if s.cuda else _cpu_times(fn, n_sets, reps)
    return Timing(statistics.median(times), reps, peak_gib, extra_gib)


def _cuda_times(fn, n_sets: int, reps: int) -> list[float]:
    """Per-call milliseconds from CUDA events. Calls are queued back to back; an event pair
    brackets each call, so host-side overhead counts whenever the GPU has to wait for it."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fn(i % n_sets)
        ends[i].record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in zip(starts, ends)]


def _cpu_times(fn, n_sets: int, reps: int) -> list[float]:
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        fn(i % n_sets)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


# --------------------------------------------------------------------------------------------
# Inputs


def count_input_sets(shape: Shape, seq_len: int, s: Settings) -> int:
    """As many input sets as fit ``input_budget_gib`` (at most ``max_input_sets``, at least 1).

    Rotating sets keeps a repetition from reading the previous one's inputs out of L2 (50 MB
    on an H200); past a few hundred MB per set L2 cannot help anyway, so one set suffices.
    """
    elem = torch.tensor([], dtype=s.dtype).element_size()
    set_bytes = (shape.hq + 2 * shape.hkv) * seq_len * shape.head_dim * elem
    return max(1, min(s.max_input_sets, int(s.input_budget_gib * GIB // set_bytes)))


def make_inputs(shape: Shape, seq_len: int, n_sets: int, s: Settings) -> list[tuple]:
    """``n_sets`` independent synthetic ``(q, k, v)`` triples (see :mod:`bench.synthetic`)."""
    spec = SyntheticSpec(rope_base=shape.rope_base)
    return [
        synthetic_qkv(
            shape.hq,
            shape.hkv,
            seq_len,
            shape.head_dim,
            spec=spec,
            dtype=s.dtype,
            device=s.device,
            seed=s.seed + 1000 * i + seq_len,
        )
        for i in range(n_sets)
    ]


# --------------------------------------------------------------------------------------------
# Masks


def causal(b, h, q_idx, kv_idx):
    """Plain causal ``mask_mod`` (q_len == kv_len), as a FlexAttention user would write it."""
    return q_idx >= kv_idx


def dense_causal_block_mask(seq_len: int, device: torch.device) -> BlockMask:
    """``create_block_mask`` with B=None, H=None (broadcast over batch and heads).

    ``_compile=True`` builds it block by block instead of materialising the L x L boolean mask
    (16 GiB at 128K); built once per length, outside the timing.
    """
    mask = create_block_mask(causal, None, None, seq_len, seq_len, device=device, _compile=True)
    free_memory(device)
    return mask


def random_causal_block_mask(
    heads: int,
    seq_len: int,
    density: float,
    device: torch.device,
    seed: int,
    block_size: int = 128,
) -> BlockMask:
    """A random causal block mask with about ``density`` of the visible blocks, per query head.

    Query block ``i`` keeps ``max(min(2, i + 1), round(density * (i + 1)))`` of its ``i + 1``
    visible key blocks: always the diagonal (a *partial* block with the causal ``mask_mod``) and
    the sink (key block 0), then blocks drawn uniformly at random (*full* blocks). Index tables
    are full width, contiguous int32 and of equal shape for the partial and the full lists (what
    torch 2.11's GPU kernel expects); forward only (``compute_q_blocks=False``).
    """
    n = (seq_len + block_size - 1) // block_size
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    rows = torch.arange(n, device=device)[:, None]
    cols = torch.arange(n, device=device)[None, :]
    visible = rows + 1
    want = torch.round(density * visible).clamp(max=visible)
    want = torch.maximum(want, visible.clamp(max=2))

    # Rank the visible blocks: diagonal first, sink second, the rest in random order; keep the
    # first `want` of each row.
    priority = torch.rand(heads, n, n, generator=gen, device=device)
    priority = torch.where(cols == 0, 2.0, priority)
    priority = torch.where(cols == rows, 3.0, priority)
    priority = priority.masked_fill(cols > rows, -1.0)
    order = priority.argsort(dim=-1, descending=True)
    keep = torch.zeros(heads, n, n, dtype=torch.bool, device=device)
    ranks = torch.arange(n, device=device).expand(heads, n, n)
    keep.scatter_(-1, order, (ranks < want).contiguous())
    off_diagonal = keep & (cols != rows)

    # Full blocks listed in increasing order: unselected columns sort after the selected ones.
    full_idx = torch.where(off_diagonal, cols, n + cols).sort(dim=-1).values
    full_idx = torch.where(full_idx < n, full_idx, 0).to(torch.int32)
    full_num = off_diagonal.sum(-1, dtype=torch.int32)
    partial_idx = torch.zeros(heads, n, n, dtype=torch.int32, device=device)
    partial_idx[..., 0] = torch.arange(n, dtype=torch.int32, device=device)
    partial_num = torch.ones(heads, n, dtype=torch.int32, device=device)
    # prism_flex's own causal mask_mod (offset 0): the same code object as the Prism masks',
    # so these rows reuse the compiled flex graph instead of adding cache entries.
    return BlockMask.from_kv_blocks(
        partial_num[None].contiguous(),
        partial_idx[None].contiguous(),
        full_num[None].contiguous(),
        full_idx[None].contiguous(),
        BLOCK_SIZE=block_size,
        mask_mod=causal_mask_mod(0),
        seq_lengths=(seq_len, seq_len),
        compute_q_blocks=False,
    )


def mean_density(masks: list[BlockMask]) -> float:
    return float(sum(prism_flex.block_density(m).mean().item() for m in masks) / len(masks))


# --------------------------------------------------------------------------------------------
# Methods


def sdpa_call(backend: SDPBackend, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def repeat_kv(x: Tensor, group: int) -> Tensor:
    """Expand KV heads to query heads, head ``h`` reading KV head ``h // group``."""
    return x.repeat_interleave(group, dim=1)


def setup_sdpa(backend: SDPBackend, sets: list[tuple]) -> Case:
    """Native GQA if the backend takes it; else K/V repeated to the query heads (noted)."""
    q, k, v = sets[0]
    try:
        sdpa_call(backend, q, k, v)
        return Case(lambda i: sdpa_call(backend, *sets[i]))
    except torch.OutOfMemoryError:
        raise  # a RuntimeError too, but not a refusal of GQA
    except RuntimeError as exc:
        reason = str(exc).splitlines()[0][:160]
    group = q.shape[1] // k.shape[1]
    expanded = [(q, repeat_kv(k, group), repeat_kv(v, group)) for q, k, v in sets]
    note = f"backend refused enable_gqa ({reason}); K/V repeated to {q.shape[1]} heads"
    return Case(lambda i: sdpa_call(backend, *expanded[i]), info={"note": note})


def reference_backend(s: Settings) -> SDPBackend:
    return SDPBackend.FLASH_ATTENTION if s.cuda else SDPBackend.MATH


def reference_name(s: Settings) -> str:
    return "sdpa_flash" if s.cuda else CPU_REFERENCE


def reference_output(q: Tensor, k: Tensor, v: Tensor, s: Settings) -> Tensor:
    """Dense causal output of the reference SDPA backend (for error checks)."""
    return setup_sdpa(reference_backend(s), [(q, k, v)]).fn(0)


def setup_flex_dense(sets: list[tuple], seq_len: int, s: Settings) -> Case:
    flex = prism_compiled_flex()
    mask = dense_causal_block_mask(seq_len, s.device)

    def run(i):
        q, k, v = sets[i]
        return flex(q, k, v, block_mask=mask, enable_gqa=True)

    def check():
        err = max_abs_diff(run(0), reference_output(*sets[0], s))
        return {"max_abs_err": err, "err_ref": reference_name(s)}

    return Case(run, 1.0, check=check)


def setup_prism_select(sets, config) -> Case:
    density = mean_density([prism_flex.prism_block_mask(q, k, config, v=v) for q, k, v in sets])
    return Case(lambda i: prism_flex.prism_block_mask(*sets[i][:2], config, v=sets[i][2]), density)


def setup_prism_sparse(sets, config) -> Case:
    flex = prism_compiled_flex()
    masks = [prism_flex.prism_block_mask(q, k, config, v=v) for q, k, v in sets]

    def run(i):
        q, k, v = sets[i]
        return flex(q, k, v, block_mask=masks[i], enable_gqa=True)

    return Case(run, mean_density(masks))


def setup_prism_total(sets, config) -> Case:
    flex = prism_compiled_flex()
    density = mean_density([prism_flex.prism_block_mask(q, k, config, v=v) for q, k, v in sets])

    def run(i):
        return prism_flex.prism_attention(*sets[i], config)

    def check():
        # prism_attention must equal the compiled flex on its own mask, bit for bit.
        q, k, v = sets[0]
        alone = flex(
            q, k, v, block_mask=prism_flex.prism_block_mask(q, k, config, v=v), enable_gqa=True
        )
        return {"max_abs_err": max_abs_diff(run(0), alone), "err_ref": "prism_sparse"}

    return Case(run, density, check=check)


def setup_flex_density(sets, density: float, shape: Shape, seq_len: int, s: Settings) -> Case:
    flex = prism_compiled_flex()
    mask = random_causal_block_mask(shape.hq, seq_len, density, s.device, seed=s.seed + seq_len)

    def run(i):
        q, k, v = sets[i]
        return flex(q, k, v, block_mask=mask, enable_gqa=True)

    return Case(run, mean_density([mask]), info={"target_density": density})


def setup_case(name: str, sets, shape: Shape, seq_len: int, config, s: Settings) -> Case:
    """Dispatch a method name to its setup (masks and compiled callables are built here,
    outside the timing)."""
    if name == "sdpa_flash":
        return setup_sdpa(SDPBackend.FLASH_ATTENTION, sets)
    if name == "sdpa_cudnn":
        return setup_sdpa(SDPBackend.CUDNN_ATTENTION, sets)
    if name == CPU_REFERENCE:
        return setup_sdpa(SDPBackend.MATH, sets)
    if name == "flex_dense":
        return setup_flex_dense(sets, seq_len, s)
    if name == "prism_select":
        return setup_prism_select(sets, config)
    if name == "prism_sparse":
        return setup_prism_sparse(sets, config)
    if name == "prism_total":
        return setup_prism_total(sets, config)
    if name.startswith("flex_density_"):
        return setup_flex_density(sets, float(name.rsplit("_", 1)[1]), shape, seq_len, s)
    raise ValueError(f"unknown method {name!r}")


# --------------------------------------------------------------------------------------------
# Rows


def base_row(shape: Shape, seq_len: int, method: str, run: str, s: Settings) -> dict:
    return {
        "shape": shape.name,
        "L": seq_len,
        "method": method,
        "ms": None,
        "density": None,
        "peak_gib": None,
        "input": INPUT_LABEL,
        "run": run,
        "batch": 1,
        "hq": shape.hq,
        "hkv": shape.hkv,
        "head_dim": shape.head_dim,
        "dtype": str(s.dtype).replace("torch.", ""),
    }


def skipped_rows(shape: Shape, seq_len: int, methods, run: str, s: Settings) -> list[dict]:
    print(f"[{shape.name} {fmt_len(seq_len)}] skipped: time budget exhausted", flush=True)
    return [
        dict(base_row(shape, seq_len, m, run, s), error="skipped: time budget exhausted")
        for m in methods
    ]


def measure_row(
    name: str,
    shape: Shape,
    seq_len: int,
    sets: list[tuple],
    config,
    s: Settings,
    run: str,
    check: bool = True,
) -> dict:
    """Set up, time and check one method; failures (OOM included) become the row's ``error``."""
    row = base_row(shape, seq_len, name, run, s)
    row["n_sets"] = len(sets)
    if time.monotonic() > s.deadline:
        row["error"] = "skipped: time budget exhausted"
        return row
    graphs0 = graphs_compiled()
    t0 = time.perf_counter()
    case = None
    try:
        case = setup_case(name, sets, shape, seq_len, config, s)
        timing = time_case(case.fn, len(sets), s)
        row.update(
            ms=timing.ms,
            reps=timing.reps,
            peak_gib=timing.peak_gib,
            extra_gib=timing.extra_gib,
            density=case.density,
            **case.info,
        )
        if check and case.check is not None:
            row.update(case.check())
    except torch.OutOfMemoryError:
        row["error"] = "OOM"
    except Exception as exc:  # one broken method must not lose the rest of the sweep
        first_line = (str(exc).strip().splitlines() or [""])[0]
        row["error"] = f"{type(exc).__name__}: {first_line[:300]}"
        traceback.print_exc(file=sys.stderr)
    finally:
        del case
        free_memory(s.device)
    row["compiled_graphs"] = graphs_compiled() - graphs0
    row["wall_s"] = time.perf_counter() - t0
    return row


def add_derived(rows: list[dict], shape: Shape, seq_len: int, s: Settings) -> None:
    """Speedups against each baseline, selection share and FLOP-floor ratios, in place."""
    by_method = {r["method"]: r for r in rows if r.get("ms")}
    for r in rows:
        if not r.get("ms"):
            continue
        for base in baseline_names(s):
            if base in by_method:
                r[f"speedup_vs_{base}"] = by_method[base]["ms"] / r["ms"]
        if r["method"] != "prism_select" and r.get("density"):
            floor = flop_floor_ms(shape, seq_len, r["density"], s.peak_tflops)
            r["floor_ms"] = floor
            r["floor_ratio"] = r["ms"] / floor
    total, select = by_method.get("prism_total"), by_method.get("prism_select")
    if total and select:
        total["select_share"] = select["ms"] / total["ms"]


def baseline_names(s: Settings) -> list[str]:
    return ["sdpa_flash", "sdpa_cudnn", "flex_dense"] if s.cuda else [CPU_REFERENCE, "flex_dense"]


def bench_length(shape: Shape, seq_len: int, methods: list[str], config, s: Settings) -> list[dict]:
    """All methods at one length, on shared input sets."""
    if time.monotonic() > s.deadline:
        return skipped_rows(shape, seq_len, methods, "sweep", s)
    n_sets = count_input_sets(shape, seq_len, s)
    t0 = time.perf_counter()
    sets = make_inputs(shape, seq_len, n_sets, s)
    sync(s.device)
    print(
        f"[{shape.name} {fmt_len(seq_len)}] {n_sets} input set(s) in "
        f"{time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    rows = []
    for name in methods:
        row = measure_row(name, shape, seq_len, sets, config, s, run="sweep")
        print(f"  {name:<18} {fmt_ms(row.get('ms'))} ms  {row.get('error', '')}", flush=True)
        rows.append(row)
    del sets
    free_memory(s.device)
    add_derived(rows, shape, seq_len, s)
    return rows


def bench_memory(shape: Shape, seq_len: int, dense_max: int, config, s: Settings) -> list[dict]:
    """Long-context rows: one input set; time, peak memory and density of the Prism path.

    One warm-up call and at least two timed ones: a 1M-token call takes seconds, and the
    compiled graphs already exist from the sweep (the chunked scoring path may add one).
    """
    s = replace(s, warmup=min(s.warmup, 1), min_reps=min(s.min_reps, 2))
    methods = ["prism_select", "prism_total"] + (["flex_dense"] if seq_len <= dense_max else [])
    if time.monotonic() > s.deadline:
        return skipped_rows(shape, seq_len, methods, "memory", s)
    try:
        sets = make_inputs(shape, seq_len, 1, s)
    except torch.OutOfMemoryError:
        free_memory(s.device)
        return [
            dict(base_row(shape, seq_len, m, "memory", s), error="OOM (inputs)") for m in methods
        ]
    inputs_gib = sum(t.numel() * t.element_size() for t in sets[0]) / GIB
    rows = []
    for name in methods:
        row = measure_row(
            name, shape, seq_len, sets, config, s, run="memory", check=name != "prism_total"
        )
        row["inputs_gib"] = inputs_gib
        if row.get("peak_gib") is not None:
            # Here "extra" is the peak minus the inputs' bytes: the scoring path's own memory
            # (prism_select) or scoring + mask + output (prism_total).
            row["extra_gib"] = row["peak_gib"] - inputs_gib
        print(
            f"  [memory {fmt_len(seq_len)}] {name:<14} {fmt_ms(row.get('ms'))} ms  "
            f"peak {fmt_num(row.get('peak_gib'))} GiB  {row.get('error', '')}",
            flush=True,
        )
        rows.append(row)
    del sets
    free_memory(s.device)
    add_derived(rows, shape, seq_len, s)
    return rows


# --------------------------------------------------------------------------------------------
# Output


def fmt_ms(x) -> str:
    return f"{x:10.3f}" if isinstance(x, (int, float)) else f"{'-':>10}"


def fmt_num(x, spec: str = ".2f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "-"


def short_name(base: str) -> str:
    """Column label of a speedup: sdpa_flash -> x_flash, flex_dense -> x_flex."""
    return "x_" + base.replace("sdpa_", "").replace("_dense", "")


def print_table(rows: list[dict], shape: Shape, s: Settings) -> None:
    """One table per shape: time, speedups, density, selection share, FLOP-floor ratio, error."""
    bases = baseline_names(s)
    head = (
        f"{'L':>5} {'method':<18} {'ms':>10} "
        + " ".join(f"{short_name(b):>8}" for b in bases)
        + f" {'density':>8} {'sel/tot':>8} {'t/floor':>8} {'err':>9}"
    )
    print(
        f"\n== {shape.name}: Hq={shape.hq} Hkv={shape.hkv} D={shape.head_dim} "
        f"{str(s.dtype).replace('torch.', '')} batch 1, causal, input {INPUT_LABEL}"
    )
    print(head)
    lengths = sorted({r["L"] for r in rows if r["run"] == "sweep"})
    for seq_len in lengths:
        floor = flop_floor_ms(shape, seq_len, 1.0, s.peak_tflops)
        print(
            f"-- L={fmt_len(seq_len)}: dense causal FLOP floor {floor:.3f} ms "
            f"at {s.peak_tflops:g} TFLOP/s"
        )
        for r in rows:
            if r["L"] != seq_len or r["run"] != "sweep":
                continue
            line = (
                f"{fmt_len(seq_len):>5} {r['method']:<18} {fmt_ms(r.get('ms'))} "
                + " ".join(f"{fmt_num(r.get('speedup_vs_' + b)):>8}" for b in bases)
                + f" {fmt_num(r.get('density'), '.3f'):>8} {fmt_num(r.get('select_share')):>8}"
                + f" {fmt_num(r.get('floor_ratio'), '.1f'):>8} "
                + f"{fmt_num(r.get('max_abs_err'), '.2e'):>9}"
            )
            if r.get("error"):
                line += f"  [{r['error'][:60]}]"
            print(line)


def print_memory_table(rows: list[dict]) -> None:
    rows = [r for r in rows if r["run"] == "memory"]
    if not rows:
        return
    print(f"\n== memory run ({rows[0]['shape']}): one input set, peak = max_memory_allocated")
    print(
        f"{'L':>5} {'method':<14} {'ms':>10} {'density':>8} {'peak GiB':>9} {'extra GiB':>9} "
        f"{'inputs':>7}"
    )
    for r in rows:
        print(
            f"{fmt_len(r['L']):>5} {r['method']:<14} {fmt_ms(r.get('ms'))} "
            f"{fmt_num(r.get('density'), '.3f'):>8} {fmt_num(r.get('peak_gib')):>9} "
            f"{fmt_num(r.get('extra_gib')):>9} {fmt_num(r.get('inputs_gib')):>7}"
            + (f"  [{r['error'][:60]}]" if r.get("error") else "")
        )


def compile_summary(rows: list[dict]) -> dict:
    """Graphs compiled at the first length of each shape versus at later lengths (the latter
    are recompilations caused by the length change alone)."""
    summary = {}
    for shape in dict.fromkeys(r["shape"] for r in rows if r["run"] == "sweep"):
        per_len = {}
        for r in rows:
            if r["shape"] == shape and r["run"] == "sweep":
                per_len[r["L"]] = per_len.get(r["L"], 0) + r.get("compiled_graphs", 0)
        lengths = sorted(per_len)
        summary[shape] = {
            "per_length": {fmt_len(n): per_len[n] for n in lengths},
            "first_length": per_len[lengths[0]],
            "recompiles_later_lengths": sum(per_len[n] for n in lengths[1:]),
        }
    memory = [r for r in rows if r["run"] == "memory"]
    if memory:
        summary["memory_run"] = sum(r.get("compiled_graphs", 0) for r in memory)
    return summary


def environment(s: Settings) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name(s.device) if s.cuda else f"cpu ({platform.machine()})"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path: str, meta: dict, rows: list[dict]) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(meta, rows=rows), f, indent=1)
    os.replace(tmp, path)  # never leave a half-written file behind


def plot_speedups(path: str, rows: list[dict], s: Settings) -> None:
    """Speedup vs the reference SDPA against length, one line per attention method (not
    ``prism_select``, which computes no attention), a panel per shape."""
    if not path:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}")
        return
    ref = reference_name(s)
    key = f"speedup_vs_{ref}"
    shapes = list(dict.fromkeys(r["shape"] for r in rows if r["run"] == "sweep" and key in r))
    if not shapes:
        print(f"no {ref} timings to compare with: no plot written")
        return
    fig, axes = plt.subplots(1, len(shapes), figsize=(6.5 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        mine = [r for r in rows if r["shape"] == shape and r["run"] == "sweep" and key in r]
        # The reference is the grey line at 1; prism_select computes no attention.
        methods = [r["method"] for r in mine if r["method"] not in (ref, "prism_select")]
        for method in dict.fromkeys(methods):
            pts = sorted((r["L"], r[key]) for r in mine if r["method"] == method)
            style = "-o" if method.startswith("prism") else "--."
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=method)
        ax.set_xscale("log", base=2)
        lengths = sorted({r["L"] for r in mine})
        ax.set_xticks(lengths, [fmt_len(n) for n in lengths])
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(
            f"{shape} ({SHAPES[shape].hq}/{SHAPES[shape].hkv} heads, "
            f"D={SHAPES[shape].head_dim}), {INPUT_LABEL}"
        )
        ax.set_xlabel("sequence length")
        ax.set_ylabel(f"speedup vs {ref}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}")


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.attention",
        description="Benchmark Prism block-sparse attention (prism_flex) against SDPA and "
        "FlexAttention on synthetic post-RoPE inputs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--shapes",
        nargs="+",
        choices=sorted(SHAPES),
        default=["llama", "qwen"],
        help="llama: 32 query / 8 KV heads, D=128; qwen: 14 / 2, D=64",
    )
    p.add_argument(
        "--lengths",
        nargs="+",
        type=int,
        default=[8192, 16384, 32768, 65536, 131072],
        help="sweep sequence lengths",
    )
    p.add_argument(
        "--memory-lengths",
        nargs="*",
        type=int,
        default=None,
        help="long-context memory run (llama shape); give none to skip "
        "(default: 262144 524288 1048576 on CUDA, skipped on CPU)",
    )
    p.add_argument(
        "--memory-dense-max",
        type=int,
        default=262144,
        help="also time flex_dense in the memory run up to this length",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS) + [CPU_REFERENCE],
        default=None,
        help="restrict the methods (default: all that the device runs)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="Prism top-p threshold for both bands (default: PrismConfig's)",
    )
    p.add_argument(
        "--config",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="other PrismConfig fields, e.g. final_block_pool=16 dense_final_blocks=0",
    )
    p.add_argument(
        "--reps",
        type=int,
        default=None,
        help="timed repetitions (default: adaptive, about --target-s per measurement)",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (compiles included)")
    p.add_argument(
        "--target-s", type=float, default=0.3, help="adaptive reps: seconds per measurement"
    )
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--max-reps", type=int, default=200)
    p.add_argument(
        "--input-sets",
        type=int,
        default=4,
        help="input sets rotated during timing (fewer when they exceed --input-gib)",
    )
    p.add_argument("--input-gib", type=float, default=8.0, help="memory budget of the input sets")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=790.0,
        help="peak dense bf16 throughput for the FLOP floor (H200: ~790)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="soft wall-clock budget: rows starting later are recorded as skipped",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        default=None,
        help="JSON results (default: bench/results/h200_attention.json on CUDA, "
        "bench/results/cpu_smoke_attention.json on CPU, so a smoke test never "
        "overwrites GPU results)",
    )
    p.add_argument(
        "--plot",
        default=None,
        help="speedup plot, '' skips (default: bench/results/h200_speedup.png on "
        "CUDA, bench/results/cpu_smoke_speedup.png on CPU)",
    )
    args = p.parse_args(argv)
    on_cuda = torch.device(args.device).type == "cuda"
    if args.memory_lengths is None:
        args.memory_lengths = [262144, 524288, 1048576] if on_cuda else []
    if args.out is None:
        args.out = f"bench/results/{'h200' if on_cuda else 'cpu_smoke'}_attention.json"
    if args.plot is None:
        args.plot = f"bench/results/{'h200' if on_cuda else 'cpu_smoke'}_speedup.png"
    return args


def prism_config(fields: list[str], threshold: Optional[float] = None) -> prism_flex.PrismConfig:
    """A ``PrismConfig`` from ``FIELD=VALUE`` strings (values read as Python literals, e.g.
    ``final_block_pool=16``, ``calibrate=False``) and an optional threshold for both bands."""
    both = {} if threshold is None else dict(high_threshold=threshold, low_threshold=threshold)
    try:
        return prism_flex.PrismConfig.from_fields(fields, **both)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--config: {e}") from e


def select_methods(requested: Optional[list[str]], cuda: bool) -> list[str]:
    """The requested methods that this device runs; CUDA-only SDPA backends become
    ``sdpa_math`` on CPU (reported under that name)."""
    cuda_only = {"sdpa_flash", "sdpa_cudnn"}
    if cuda:
        default = list(METHODS)
    else:
        default = [CPU_REFERENCE] + [m for m in METHODS if m not in cuda_only]
    if requested is None:
        return default
    chosen = []
    for m in requested:
        if not cuda and m in cuda_only:
            print(f"note: {m} needs CUDA; on CPU the reference is {CPU_REFERENCE}")
            m = CPU_REFERENCE
        if cuda and m == CPU_REFERENCE:
            print(f"note: {m} is the CPU reference; skipped on CUDA")
            continue
        if m not in chosen:
            chosen.append(m)
    return chosen


def make_settings(args: argparse.Namespace, start: float) -> Settings:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; use --device cpu for a smoke test")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return Settings(
        device=device,
        dtype=DTYPES[args.dtype],
        warmup=args.warmup,
        reps=args.reps,
        target_s=args.target_s,
        min_reps=args.min_reps,
        max_reps=args.max_reps,
        max_input_sets=args.input_sets,
        input_budget_gib=args.input_gib,
        peak_tflops=args.peak_tflops,
        deadline=start + args.budget_s,
        seed=args.seed,
    )


@torch.no_grad()
def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    s = make_settings(args, start)
    config = prism_config(args.config, args.threshold)
    methods = select_methods(args.methods, s.cuda)
    meta = dict(environment(s), config=repr(config), settings=vars(args), notes=FIELD_NOTES)
    print(f"{meta['gpu']} | torch {meta['torch']} | triton {meta['triton']} | {config}")

    rows: list[dict] = []
    for name in args.shapes:
        shape = SHAPES[name]
        for seq_len in args.lengths:
            rows += bench_length(shape, seq_len, methods, config, s)
            write_json(args.out, dict(meta, dynamo=compile_summary(rows)), rows)
        print_table([r for r in rows if r["shape"] == name], shape, s)
    for seq_len in args.memory_lengths:
        rows += bench_memory(SHAPES["llama"], seq_len, args.memory_dense_max, config, s)
        write_json(args.out, dict(meta, dynamo=compile_summary(rows)), rows)
    print_memory_table(rows)

    summary = compile_summary(rows)
    write_json(args.out, dict(meta, dynamo=summary, total_s=time.monotonic() - start), rows)
    print("\ndynamo graphs compiled (first compiles + recompiles):")
    for key, val in summary.items():
        print(f"  {key}: {val}")
    print(f"total {time.monotonic() - start:.1f} s; results in {args.out or '(not written)'}")
    plot_speedups(args.plot, rows, s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
