"""End-to-end prefill time (time to first token) of a real model: dense SDPA against Prism.

One forward of batch 1 per length under ``torch.inference_mode()``, the whole model (embedding,
every layer, the LM head for the last token only: ``logits_to_keep=1``, so the vocabulary
projection of all L tokens does not dominate), with a dynamic KV cache written as in a real
prefill. Methods:

- ``sdpa_flash``: ``attn_implementation="sdpa"`` under ``sdpa_kernel(SDPBackend.FLASH_ATTENTION)``;
- ``sdpa_cudnn``: the same under ``SDPBackend.CUDNN_ATTENTION``;
- ``prism``: ``prism_flex.integrations.transformers.register(PrismConfig())`` (compiled on CUDA,
  eager on CPU, where compiling the stages would take minutes) and
  ``model.set_attn_implementation("prism")``;
- ``prism_always_sparse``: the same with ``sparse_min_flops=0`` (the selection at every length);
- ``prism_fa4``: the same as ``prism`` with ``flex_backend="flash"`` (FlashAttention-4's kernel
  for the sparse attention; needs the ``flash`` extra and a Hopper GPU; not in the default
  method list).

On CPU the backend pins are skipped (plain sdpa) and ``time.perf_counter`` times the calls; on
CUDA, CUDA events. Each (method, length) row makes one first call (wall time including any
compile: ``first_call_ms``), ``--warmup`` more untimed calls, then ``--reps`` timed calls
(median and min reported), interleaved across methods (A, B, C, A, B, C, ...) so that a drift
of the machine's speed falls on all of them; ``host_ms`` is the median wall time until the
forward returned, before synchronising (close to ``median_ms``: the forward is host-bound).
``graphs_warmup`` / ``graphs_timed`` count the graphs dynamo compiled
(``counters["stats"]["unique_graphs"]``) before and during the timed calls: a non-zero
``graphs_timed`` means the timing includes a compile. ``density`` (prism only): mean over
layers and heads of the selected / causally visible blocks, from one extra untimed forward
through a density-recording copy of the attention (``--no-density`` skips it).

Input ids (the ``input`` field of the JSON meta): the first L tokens of ``--text`` (default
``austen:all``, prism_flex/data/texts.py; repeated if shorter than L) tokenized with the
model's GGUF tokenizer; ``--text random`` or ``--random-tiny``, or a text that cannot be
loaded (warned), gives uniform random ids from a generator seeded with ``--seed``. Prism's
density, hence its time, depends on the text: random ids make attention flatter than prose.
Lengths above the model's trained context (32K for Qwen2.5-Coder-0.5B) still run (RoPE is
computed on the fly); only the timing is meaningful there.

Example (H200; the GGUF assembled by bench/offline_gpu.sh)::

    python -m bench.ttft --model-path ~/.cache/prism_flex/models/qwen2.5-coder-0.5b-instruct.gguf
    python -m bench.ttft --model smollm2-135m --device cpu --lengths 256 --reps 1 --warmup 0 \\
        --methods sdpa_flash prism --out /tmp/ttft.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

METHODS = ("sdpa_flash", "sdpa_cudnn", "prism", "prism_always_sparse", "prism_fa4")
DEFAULT_METHODS = METHODS[:4]
LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
PRISM_NAME = "prism"
ALWAYS_SPARSE = "prism_always_sparse"
FLASH_NAME = "prism_fa4"
DENSITY_NAME = "prism_ttft_density"


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ttft", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b", help="a prism_flex.data.models name")
    p.add_argument("--model-path", default=None, help="a local .gguf file (overrides --model)")
    p.add_argument(
        "--random-tiny",
        action="store_true",
        help="a tiny random Qwen2 model (2 layers, 4/2 heads, head dim 32), no download",
    )
    p.add_argument(
        "--arch",
        default=None,
        choices=sorted(ARCHS),
        help="random weights in a real model's architecture (no download; random ids): "
        "timing without shipping the weights, density not representative",
    )
    p.add_argument(
        "--profile",
        default=None,
        help="a folder: one torch.profiler trace summary per (method, length), after the timing",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    p.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after the first call")
    p.add_argument("--text", default="austen:all", help="prism_flex.data.texts spec, or 'random'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-density", action="store_true", help="skip prism's density forward")
    p.add_argument(
        "--rope-scaling",
        default=None,
        metavar="yarn:FACTOR[:ORIGINAL]",
        help="RoPE scaling of the loaded model (eval/rope.py), e.g. yarn:4",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep --out's rows of other (model, method, length) cases",
    )
    p.add_argument("--out", default="bench/results/h200_ttft.json")
    return p.parse_args(argv)


#: Architectures of real models (their published config.json values), for ``--arch``.
ARCHS = {
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
}


def model_label(args) -> str:
    if args.random_tiny:
        return "random-tiny-qwen2"
    if getattr(args, "arch", None):
        return f"random-{args.arch}"
    return Path(args.model_path).name if args.model_path else args.model


def load_model(args, device: torch.device):
    """``(model, tokenizer or None)``; GGUF loading as eval/accuracy.py:load_model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.random_tiny:
        from transformers import Qwen2Config

        cfg = Qwen2Config(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            intermediate_size=128,
            vocab_size=512,
            max_position_embeddings=max(args.lengths),
        )
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
        return model.to(device).eval(), None
    if getattr(args, "arch", None):
        from transformers import AutoConfig

        fields = dict(ARCHS[args.arch])
        cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
        cfg.max_position_embeddings = max(args.lengths)
        torch.manual_seed(args.seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
        return model.eval(), None
    if args.model_path:
        path = Path(args.model_path).expanduser()
    else:
        from prism_flex.data.models import fetch

        path = Path(fetch(args.model))
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, attn_implementation="sdpa", dtype=dtype
    )
    return model.to(device).eval(), tok


def token_ids(tok, vocab: int, length: int, args) -> tuple[torch.Tensor, str]:
    """``(ids (length,), description)``: text tokens (repeated to ``length``) or seeded random."""
    if tok is not None and args.text != "random":
        try:
            from prism_flex.data.texts import load_text

            # ~4 characters per token in English prose: 6 per token leaves a margin.
            ids = tok(load_text(args.text)[: 6 * length])["input_ids"]
            reps = -(-length // len(ids))
            return torch.tensor(ids * reps)[:length], f"text:{args.text}"
        except Exception as e:  # noqa: BLE001 - e.g. no staged texts on the GPU machine
            log(f"warning: text {args.text!r} unavailable ({e}); using random ids")
    g = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, vocab, (length,), generator=g), f"random:seed={args.seed}"


DENSITIES: list[float] = []  # per layer, filled by the density twin


def register_prism(device: torch.device) -> None:
    """Register Prism and a density-recording twin (same config, same mask function)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    from prism_flex import PrismConfig, prism_attention
    from prism_flex.integrations.transformers import register

    cfg, compiled = PrismConfig(), device.type == "cuda"
    register(cfg, PRISM_NAME, compiled=compiled)
    # The selection at every length (no dense dispatch of small calls): where it pays is
    # how PrismConfig.sparse_min_flops is measured.
    register(dataclasses.replace(cfg, sparse_min_flops=0), ALWAYS_SPARSE, compiled=compiled)
    register(dataclasses.replace(cfg, flex_backend="flash"), FLASH_NAME, compiled=compiled)

    def with_density(module, query, key, value, attention_mask, scaling=None, **kwargs):
        out, dens = prism_attention(
            query, key, value, cfg, scale=scaling, return_density=True, compiled=compiled
        )
        DENSITIES.append(float(dens.float().mean()))
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(DENSITY_NAME, with_density)
    AttentionMaskInterface.register(DENSITY_NAME, ALL_MASK_ATTENTION_FUNCTIONS[PRISM_NAME])


def backend_context(method: str, device: torch.device):
    """The SDPA backend pin on CUDA; nothing on CPU (neither flash nor cuDNN exists there)."""
    if device.type != "cuda" or not method.startswith("sdpa_"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}[
        method
    ]
    return sdpa_kernel(backend)


def graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward(model, ids):
    return model(input_ids=ids, logits_to_keep=1, use_cache=True)


def time_call(model, ids, device) -> tuple[float, float]:
    """``(ms, host ms)`` of one forward. ``ms``: CUDA events on GPU (device time),
    perf_counter on CPU. ``host ms``: wall time until the forward returns, before any
    synchronisation: when it is close to ``ms`` the forward is bound by the host (Python and
    launches), not by the GPU."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        forward(model, ids)
        ms = (time.perf_counter() - t0) * 1e3
        return ms, ms
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    forward(model, ids)
    host = (time.perf_counter() - t0) * 1e3
    end.record()
    end.synchronize()
    return start.elapsed_time(end), host


def use(model, method: str) -> None:
    model.set_attn_implementation("sdpa" if method.startswith("sdpa") else method)


def warm(model, ids, method, args, device, *, select: bool = True) -> dict:
    """First call (wall time, compiles included) and ``--warmup`` untimed calls of one
    (method, length); an OOM (or a backend that refuses the shape) is recorded, not raised.
    ``select=False``: the caller has set the model's attention implementation."""
    if select:
        use(model, method)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    g0 = graphs()
    try:
        with torch.inference_mode(), backend_context(method, device):
            sync(device)
            t0 = time.perf_counter()
            forward(model, ids)
            sync(device)
            first = (time.perf_counter() - t0) * 1e3
            for _ in range(args.warmup):
                forward(model, ids)
            sync(device)
        row = dict(status="ok", first_call_ms=first, graphs_warmup=graphs() - g0, graphs_timed=0)
    except torch.OutOfMemoryError:
        row = dict(status="oom")
    except RuntimeError as e:  # e.g. "No available kernel" for a pinned backend
        row = dict(status="error", error=str(e).splitlines()[0][:300])
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def summarise(row: dict, timed: list[tuple[float, float]]) -> None:
    """Median, min and host time of ``(ms, host ms)`` pairs into ``row``."""
    times = [t for t, _ in timed]
    row.update(
        median_ms=statistics.median(times),
        min_ms=min(times),
        times_ms=times,
        host_ms=statistics.median(h for _, h in timed),
    )


def run_row(model, ids, method, args, device) -> dict:
    """One row on the model as the caller set it up (its attention implementation chosen):
    first call, warm-up and ``--reps`` timed calls under ``method``'s SDPA backend pin, for
    callers that time one configuration at a time (eval/frontier.py)."""
    row = warm(model, ids, method, args, device, select=False)
    if row["status"] != "ok":
        return row
    g0 = graphs()
    with torch.inference_mode(), backend_context(method, device):
        timed = [time_call(model, ids, device) for _ in range(args.reps)]
    row["graphs_timed"] = graphs() - g0
    summarise(row, timed)
    return row


def measure_length(model, ids, methods, args, device) -> dict[str, dict]:
    """Rows of every method at one length. The timed calls are interleaved (method A, B, C,
    A, B, C, ...), so that a drift of the host's or the GPU's speed during the run falls on
    every method alike: short prefills are bound by the host (``host_ms``), whose speed
    varies between and during runs."""
    rows = {m: warm(model, ids, m, args, device) for m in methods}
    ok = [m for m in methods if rows[m]["status"] == "ok"]
    timed: dict[str, list] = {m: [] for m in ok}
    for _ in range(args.reps):
        for m in ok:
            use(model, m)
            g0 = graphs()
            with torch.inference_mode(), backend_context(m, device):
                timed[m].append(time_call(model, ids, device))
            rows[m]["graphs_timed"] += graphs() - g0
    for m in ok:
        summarise(rows[m], timed[m])
        if m == "prism" and not args.no_density:
            DENSITIES.clear()
            model.set_attn_implementation(DENSITY_NAME)
            with torch.inference_mode():
                forward(model, ids)
            rows[m]["density"] = sum(DENSITIES) / len(DENSITIES)
        if args.profile:
            use(model, m)
            with torch.inference_mode(), backend_context(m, device):
                profile(model, ids, m, args, device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def profile(model, ids, method, args, device) -> None:
    """One profiled forward: the operators and kernels by device time, to ``--profile``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        forward(model, ids)
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    folder = Path(args.profile)
    folder.mkdir(parents=True, exist_ok=True)
    text = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70)
    (folder / f"profile_{method}_{ids.shape[-1]}.txt").write_text(text)


def add_speedups(rows: list[dict]) -> None:
    """``speedup_vs_<ref>`` = the reference's median / the row's median, same model and L."""
    med = {(r["model"], r["method"], r["L"]): r.get("median_ms") for r in rows}
    for r in rows:
        for ref in ("sdpa_cudnn", "sdpa_flash"):
            base = med.get((r["model"], ref, r["L"]))
            ok = base and r.get("median_ms")
            r[f"speedup_vs_{ref}"] = base / r["median_ms"] if ok else None


def meta(args, device, input_desc: str) -> dict:
    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:  # noqa: BLE001 - triton is absent on CPU-only installs
            return None

    def git(*cmd) -> Optional[str]:
        try:
            return subprocess.run(
                ["git", *cmd], capture_output=True, text=True, cwd=Path(__file__).parent, check=True
            ).stdout.strip()
        except Exception:  # noqa: BLE001 - not a checkout
            return None

    commit = git("rev-parse", "HEAD")
    # A copy of a working tree (the GPU machine's) can sit on an older HEAD with the files of
    # a newer one: say so rather than name a commit the run was not at.
    changed = git("status", "--porcelain", "--untracked-files=no")
    if commit and changed:
        commit += "+dirty"
    gpu = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu {platform.processor() or platform.machine()}"
    )
    return dict(
        gpu=gpu,
        torch=torch.__version__,
        transformers=version("transformers"),
        triton=version("triton"),
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        commit=commit,
        input=input_desc,
        args=vars(args),
    )


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    head = (
        "| model | method | L | median ms | min ms | host ms | vs cudnn | vs flash | density "
        "| first call s | graphs warm-up | graphs timed | status |\n" + "|---" * 13 + "|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['L']} | {fmt(r.get('median_ms'), '.2f')} "
            f"| {fmt(r.get('min_ms'), '.2f')} | {fmt(r.get('host_ms'), '.2f')} "
            f"| {fmt(r.get('speedup_vs_sdpa_cudnn'), '.2f')} "
            f"| {fmt(r.get('speedup_vs_sdpa_flash'), '.2f')} | {fmt(r.get('density'), '.3f')} "
            f"| {fmt(r.get('first_call_ms') and r['first_call_ms'] / 1e3, '.2f')} "
            f"| {fmt(r.get('graphs_warmup'), 'd')} | {fmt(r.get('graphs_timed'), 'd')} "
            f"| {r['status']} |"
        )
    return "\n".join(lines)


def write(path: Path, info: dict, rows: list[dict], old: list[dict]) -> None:
    """Write after every row: a run cut short by the call's time limit keeps what it measured."""
    mine = {(r["model"], r["method"], r["L"]) for r in rows}
    merged = [r for r in old if (r["model"], r["method"], r["L"]) not in mine] + rows
    add_speedups(merged)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(meta=info, rows=merged), indent=1) + "\n")


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    out = Path(args.out)
    old = json.loads(out.read_text())["rows"] if args.merge and out.is_file() else []
    model, tok = load_model(args, device)
    if args.rope_scaling:
        from eval.rope import apply_rope_scaling

        apply_rope_scaling(model, args.rope_scaling)
    if any(m.startswith("prism") for m in args.methods):
        register_prism(device)
    # One sequence of the longest length; each length takes its first L tokens.
    ids, desc = token_ids(tok, model.config.vocab_size, max(args.lengths), args)
    name, rows, info = model_label(args), [], meta(args, device, desc)
    for i, length in enumerate(args.lengths):
        found = measure_length(model, ids[None, :length].to(device), args.methods, args, device)
        for method in args.methods:
            row = dict(model=name, method=method, L=length, cold=i == 0, **found[method])
            rows.append(row)
            log(f"{method} L={length}: {row['status']} {fmt(row.get('median_ms'), '.2f')} ms")
        write(out, info, rows, old)
    add_speedups(rows)
    print(table(rows))
    for method in args.methods:  # recompiles after the first length: the dynamic-shape check
        later = [
            r.get("graphs_warmup", 0) + r.get("graphs_timed", 0)
            for r in rows
            if r["method"] == method and not r["cold"]
        ]
        print(f"{method}: graphs compiled at lengths after the first: {sum(later)}")
    print(f"JSON: {out}")
    return dict(meta=info, rows=rows)


if __name__ == "__main__":
    main()
