"""Packed documents end to end: one forward of a real model over a packed row against one
forward per document.

A row of documents (``bench.packed``'s cases: ``8x16K``, ``mixed``, ``unaligned``) goes
through the whole model once, packed as ``DataCollatorWithFlattening`` packs it
(``position_ids`` restarting at 0 per document, no ``attention_mask``, ``use_cache=False``,
``logits_to_keep=1``), under ``torch.inference_mode()``. Methods:

- ``prism_packed``: Prism (``register(PrismConfig())``, compiled) on the packed row: the
  integration reads the documents' lengths once per forward, every layer runs
  ``prism_attention`` with them;
- ``prism_per_doc``: Prism, one forward per document (the sum);
- ``sdpa_per_doc``: SDPA pinned to cuDNN, one forward per document (the sum). SDPA on the
  packed row would build an ``(L, L)`` mask (16 GiB at 128K tokens): not run.

Timing: CUDA events, median of ``--reps`` after ``--warmup`` calls (the first call compiles).
``--docs N ...`` adds a case of those lengths (Qwen2.5-0.5B runs documents under ~18K tokens
dense by the size rule, so only longer ones show the sparse path). The token ids are the
first tokens of ``--text`` (``bench.ttft.token_ids``), cut into the documents. Prints a table
and writes JSON (GPU, torch version, date)::

    M=~/.cache/prism_flex/models/qwen2.5-coder-0.5b-instruct.gguf
    python -m bench.packed_ttft --model-path $M --out bench/results/h200_packed_ttft.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from .packed import cases, environment
from .ttft import backend_context, load_model, register_prism, token_ids

METHODS = ("prism_packed", "prism_per_doc", "sdpa_per_doc")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b", help="a prism_flex.data.models name")
    p.add_argument("--model-path", default=None, help="a local .gguf file (overrides --model)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cases", nargs="*", default=None, help="8x16K, mixed, unaligned")
    p.add_argument("--docs", nargs="*", type=int, default=None, help="one more case: these lengths")
    p.add_argument("--scale", type=int, default=1, help="divide every document length by it")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--text", default="austen:all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/h200_packed_ttft.json")
    # What bench.ttft.load_model reads.
    p.set_defaults(random_tiny=False, arch=None, lengths=[1 << 17])
    return p.parse_args(argv)


def timed(fn, reps: int, warmup: int, cuda: bool) -> float:
    """Median ms of ``reps`` calls after ``warmup + 1``, each call synchronised on its own (a
    time to first token is one request; ``bench.packed.timed`` lets calls queue back to back,
    which measures throughput of the attention op instead)."""
    import time

    for _ in range(warmup + 1):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    register_prism(device)
    model, tok = load_model(args, device)
    rows = []
    todo = {n: lens for n, lens in cases(args.scale, args.seed).items() if n in (args.cases or [])}
    if args.cases is None:
        todo = cases(args.scale, args.seed)
    if args.docs:
        todo["docs"] = args.docs
    for name, lens in todo.items():
        ids, desc = token_ids(tok, model.config.vocab_size, sum(lens), args)
        ids = ids.to(device)[None]
        pos = torch.cat([torch.arange(n, device=device) for n in lens])[None]
        docs, start = [], 0
        for n in lens:
            docs.append(ids[:, start : start + n])
            start += n

        def packed():
            return model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1)

        def per_doc():
            return [model(input_ids=d, use_cache=False, logits_to_keep=1) for d in docs]

        for method in args.methods:
            model.set_attn_implementation("sdpa" if method.startswith("sdpa") else "prism")
            fn = packed if method == "prism_packed" else per_doc
            pin = "sdpa_cudnn" if method.startswith("sdpa") else method
            with torch.inference_mode(), backend_context(pin, device):
                ms = timed(fn, args.reps, args.warmup, device.type == "cuda")
            rows.append(dict(case=name, docs=lens, method=method, ms=ms, input=desc))
            print(f"  {name} {method}: {ms:.2f} ms", flush=True)
    by = {(r["case"], r["method"]): r["ms"] for r in rows}
    print(f"\n{'case':10} {'method':14} {'ms':>9} {'vs prism per doc':>17}")
    for r in rows:
        base = by.get((r["case"], "prism_per_doc"))
        r["speedup_vs_prism_per_doc"] = base / r["ms"] if base else None
        vs = f"{r['speedup_vs_prism_per_doc']:.2f}x" if base else ""
        print(f"{r['case']:10} {r['method']:14} {r['ms']:9.2f} {vs:>17}")
    meta = dict(environment(device), model=args.model_path or args.model)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta, rows=rows), indent=1))
    print(f"\nwrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
