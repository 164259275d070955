"""Long-context prefill of a real model with Prism attention, with and without torchao.

Qwen2.5-Coder-0.5B (the GGUF file cached by ``prism_flex.data.models``, dequantised by
transformers) prefills the first ``--length`` tokens of Jane Austen's *Emma*
(``prism_flex.data.texts``) four ways:

* ``dense``          transformers' ``sdpa`` attention, linear layers in the model dtype;
* ``prism``          Prism block-sparse attention (``register(PrismConfig(...))``);
* ``prism+torchao``  Prism, and the linear layers quantised by torchao;
* ``dense+torchao``  ``sdpa``, and the quantised linear layers.

torchao: on CPU int8 weight-only (``Int8WeightOnlyConfig``, model in float32); on CUDA float8
dynamic activation + float8 weight (``Float8DynamicActivationFloat8WeightConfig``, model in
bfloat16; needs compute capability >= 8.9). ``lm_head`` (not tied to the embedding here) stays
unquantised, so the logits of every variant come from the same output layer.

Per variant: the prefill time (the decoder stack, ``model.model``, one forward after one
warm-up forward that also compiles Prism; CPU ``perf_counter``, CUDA events) and the
perplexity of the L tokens (next-token cross-entropy over positions 1..L-1, the logits built
in chunks from the final hidden states so that a 32K x 152K-vocab logit tensor is never
materialised). The perplexity compares variants with each other on the same text; it is not a
benchmark score (the model is a 4-bit GGUF of a *coder* instruct model).

What to expect on CPU at 2048 tokens (2 cores, ~6 minutes): no speed-up from either. Prism
runs its sparse path (2048 >= ``dense_below`` = 1024, kept at its default), but 16 query
blocks leave little to skip and attention is a small part of a 2K prefill, so the selection
costs about what it saves, and the perplexity moves a few percent (blocks are dropped).
Int8 weight-only saves memory and helps memory-bound decoding, not a compute-bound prefill.
The long-context case Prism is built for is the CUDA default, 32K tokens.

Measured on the H200 at 32K tokens (eager, README): Prism 1.40x the dense prefill; float8
made both the dense and the Prism prefill slower on this small model (0.72x, 0.83x).
``--compile`` compiles each decoder layer (regional compilation: the 24 layers share one
layer's code, so it compiles once per variant instead of tracing the whole stack; compiling
the whole stack did not finish within minutes on the H200 with float8), so that torchao's
quantisation fuses; Prism runs as one opaque op inside each layer's graph. The timed call is
the third (a spare warm-up: Prism's stages once recompiled on the second call).

Run from the repo root:

    python examples/torchao_prefill.py                               # CPU, 2048 tokens
    python examples/torchao_prefill.py --device cuda --length 32768  # GPU (the CUDA default)

Needs ``pip install -e ".[hf]" torchao gguf``; the model and text are fetched/cached on first
use (``python -m prism_flex.data.models fetch qwen2.5-coder-0.5b``,
``python -m prism_flex.data.texts austen:emma``).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from prism_flex import PrismConfig
from prism_flex.data.models import fetch
from prism_flex.data.texts import load_text

VARIANTS = ("dense", "prism", "prism+torchao", "dense+torchao")


def quantise_linears(model, device: str) -> str:
    """Quantise the model's nn.Linear layers (except lm_head) in place with torchao."""
    try:  # lazy: torchao is optional for the rest of prism_flex
        from torchao.quantization import quantize_
    except ImportError as e:
        raise SystemExit(f"this example needs torchao (pip install torchao): {e}") from e
    if device == "cuda":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

        config, label = (
            Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
            "float8 dynamic activation + float8 weight, per row",
        )
    else:
        from torchao.quantization import Int8WeightOnlyConfig

        config, label = Int8WeightOnlyConfig(), "int8 weight-only, per channel"
    keep = lambda m, fqn: isinstance(m, torch.nn.Linear) and "lm_head" not in fqn  # noqa: E731
    quantize_(model, config, filter_fn=keep)
    return label


def timed(fn, device: str):
    """(seconds, result) of one call of ``fn`` (the caller has already warmed it up)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3, out
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


@torch.no_grad()
def run_variant(
    model, ids, attn: str, device: str, compile_model: bool = False
) -> tuple[float, float]:
    """(prefill seconds, perplexity) of ``model`` on ``ids`` (1, L) with attention ``attn``;
    with ``compile_model``, each decoder layer runs under ``torch.compile`` (Prism then runs
    as one opaque op inside the compiled graph, torchao's quantisation is fused)."""
    model.set_attn_implementation(attn)
    decoder = model.model
    if compile_model:
        torch._dynamo.reset()  # a fresh compile per variant (attention and weights change)
        # Regional compilation: the layers share their code, so one layer's graph serves all
        # (nn.Module.compile; calling it again replaces the previous variant's).
        for layer in decoder.layers:
            layer.compile(dynamic=False)
    prefill = lambda: decoder(input_ids=ids, use_cache=False).last_hidden_state  # noqa: E731
    prefill()  # warm-up: compiles (Prism's stages, or the model), warms torchao kernels
    if compile_model:
        # A spare warm-up: Prism's stages used to compile again on the second call of a
        # compiled model (fixed by the custom op in prism_flex/dispatch.py); anything else
        # that recompiles there is not timed either.
        prefill()
    seconds, hidden = timed(prefill, device)
    hidden = hidden[0, :-1]  # position i predicts token i + 1
    targets, nll = ids[0, 1:], torch.zeros((), dtype=torch.float64, device=device)
    for i in range(0, hidden.shape[0], 1024):  # chunked lm_head + cross-entropy
        logits = model.lm_head(hidden[i : i + 1024]).float()
        nll += F.cross_entropy(logits, targets[i : i + 1024], reduction="sum").double()
    return seconds, float(torch.exp(nll / targets.numel()))


def prism_config(fields: list[str], threshold: float) -> PrismConfig:
    """``--config FIELD=VALUE ...`` (values read as Python literals) and ``--threshold``."""
    return PrismConfig.from_fields(fields, high_threshold=threshold, low_threshold=threshold)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--length", type=int, default=None, help="tokens (CPU 2048, CUDA 32768)")
    p.add_argument("--threshold", type=float, default=0.95, help="Prism top-p, both bands")
    p.add_argument(
        "--text", default="austen:emma", help="a prism_flex.data.texts spec, or a file path"
    )
    p.add_argument(
        "--config",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="other PrismConfig fields, e.g. final_block_pool=16",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=list(VARIANTS),
        help="which prefills to run, in this order (quantisation is applied once, "
        "before the first +torchao variant)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile each decoder layer with torch.compile (every variant)",
    )
    p.add_argument("--out", default=None, help="also write the results to this JSON file")
    args = p.parse_args()
    device = args.device
    length = args.length or (32768 if device == "cuda" else 2048)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # CPU: fp32 is the fast path

    # dense_below stays at its default (1024): Prism's sparse path runs for any prompt of at
    # least 1024 tokens, so it is active at the CPU default of 2048 (16 query blocks of 128;
    # few blocks can be skipped there, and attention is a small part of a 2K prefill).
    from prism_flex.integrations.transformers import register  # needs transformers

    cfg = prism_config(args.config, args.threshold)
    name = register(cfg, "prism")

    path = fetch("qwen2.5-coder-0.5b")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = (
        AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, attn_implementation="sdpa"
        )
        .to(device)
        .eval()
    )
    text = load_text(args.text)
    ids = tok(text[: 8 * length + 4096], return_tensors="pt").input_ids  # ~4 chars per token
    if ids.shape[1] < length:
        ids = tok(text, return_tensors="pt").input_ids
    if ids.shape[1] < length:
        raise SystemExit(f"{args.text} has only {ids.shape[1]} tokens, fewer than {length}")
    ids = ids[:, :length].to(device)

    print(
        f"Qwen2.5-Coder-0.5B ({path.name}, dequantised to {dtype}), {device} "
        f"({torch.get_num_threads()} CPU threads), {length} tokens "
        f"of {args.text}; Prism thresholds {args.threshold}, dense_below {cfg.dense_below} "
        f"({'Prism sparse path active' if length >= cfg.dense_below else 'Prism runs DENSE'})"
    )
    import torchao

    meta = dict(
        device=device,
        gpu=torch.cuda.get_device_name() if device == "cuda" else None,
        torch=torch.__version__,
        torchao=torchao.__version__,
        date=time.strftime("%Y-%m-%d"),
        length=length,
        text=args.text,
        dtype=str(dtype),
        prism_config=repr(cfg),
        compiled_model=args.compile,
    )
    attn_of = {"dense": "sdpa", "prism": name, "prism+torchao": name, "dense+torchao": "sdpa"}
    results = []
    for variant in args.variants:
        if variant.endswith("+torchao") and "torchao_config" not in meta:
            meta["torchao_config"] = quantise_linears(model, device)  # in place, once
            print(f"torchao: {meta['torchao_config']} (all linear layers but lm_head)")
        seconds, ppl = run_variant(model, ids, attn_of[variant], device, args.compile)
        results.append(dict(variant=variant, prefill_s=seconds, perplexity=ppl))
        print(f"{variant:<16}{seconds:>11.3f} s  perplexity {ppl:.4f}", flush=True)
        if args.out:  # after every variant: a time limit keeps what finished
            with open(args.out, "w") as f:
                json.dump(dict(meta, rows=results), f, indent=1)

    base = next((r["prefill_s"] for r in results if r["variant"] == "dense"), None)
    print(f"{'variant':<16}{'prefill s':>11}{'vs dense':>10}{'perplexity':>12}")
    for r in results:
        speed = f"{base / r['prefill_s']:>9.2f}x" if base else f"{'-':>10}"
        print(f"{r['variant']:<16}{r['prefill_s']:>11.3f}{speed}{r['perplexity']:>12.4f}")


if __name__ == "__main__":
    main()
