"""Accuracy against time: per method and setting, on one model and one length, perplexity,
retrieval (pass key, multi-key, variable tracking), mean block density *and* the measured
end-to-end prefill time of the same model.

One run = one model x one length (``--length``); each job is one (method, setting):

- ``dense``: SDPA (timed under the cuDNN backend on CUDA, as bench/ttft.py's ``sdpa_cudnn``);
- ``prism``: the library default with top-p threshold = the setting (eval.accuracy's
  ``prism_local``), compiled on CUDA;
- ``prism_rel``: the library default with ``relative_cut`` = the setting (the sort-free cut
  at that fraction of each band row's maximum);
- ``xattn_local``: the XAttention-style estimator with the local block, threshold = setting;
- ``flashprefill``: the FlashPrefill-style rule (eval/estimators.py), alpha = setting.

The peers' selections (``xattn_local``, ``flashprefill``) are our plain-PyTorch estimators
run eagerly before the same compiled FlexAttention: their *time* is that of our
implementation of the rule, not of the peers' own kernels (bench/ for those).

Per job: perplexity of the text's first L tokens (``ppl``), then ``--samples`` prompts of L
tokens per retrieval task (``needle``: pass key; ``multikey``, ``vartrack``: eval/ruler.py;
depths evenly spaced in [0, 0.9]), greedy answers; the density is the mean over layers of
the perplexity forward (recorded by re-running the selection eagerly, untimed; without
``ppl``, of the retrieval prompts); then the
prefill time with bench/ttft.py's functions (``ttft.run_row``: batch 1, the whole model,
``logits_to_keep=1``, KV cache written, one first call (compiles), ``--warmup`` untimed calls,
``--reps`` timed calls with CUDA events; median reported). The JSON (``--out``) is written
after every job with the meta of bench/ttft.py (GPU, torch, transformers, date, commit) plus
model, text, length and RoPE scaling; ``--resume`` skips jobs already there. A markdown table
goes next to it (``.md``), and with ``--plot`` (matplotlib, extra ``plot``) a figure of
perplexity against prefill time (also from saved JSONs: ``--plot-only a.json b.json``).

Cost, measured on the H100 with Qwen2.5-Coder-0.5B (the rows' ``seconds``): 5-30 s per job
(a prism config compiles its selection once), ``--quick`` with ppl, needle and multikey 113 s
at 32K and about 150 s at 64K; 128K with 3 prompts per task 13-30 s per job.

Examples::

    # CPU smoke test, tiny random model, seconds:
    python -m eval.frontier --random-tiny --device cpu --length 1024 --quick --samples 2 \\
        --reps 1 --warmup 0 --out /tmp/frontier.json
    # GPU, 32K, the quick set:
    M=~/.cache/prism_flex/models/qwen2.5-coder-0.5b-instruct.gguf
    python -m eval.frontier --model-path $M --length 32768 --quick \\
        --out bench/results/h100_frontier_32k.json
    # 64K / 128K on the YaRN-extended model:
    python -m eval.frontier --model-path $M --length 65536 --rope-scaling yarn:4 --quick \\
        --out bench/results/h100_frontier_64k_yarn.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench import ttft
from eval import accuracy

#: (method, settings) of the full run.
FULL = {
    "dense": [None],
    "prism": [0.7, 0.8, 0.9, 0.95, 0.97],
    "prism_rel": [0.01, 0.02, 0.05, 0.1],
    "xattn_local": [0.9, 0.95],
    "flashprefill": [0.05, 0.1, 0.18],
}
#: The ``--quick`` subset.
QUICK = {
    "dense": [None],
    "prism": [0.9, 0.95],
    "prism_rel": [0.02, 0.05],
    "xattn_local": [0.9],
    "flashprefill": [0.05],
}
#: frontier method -> eval.accuracy method
ACCURACY_METHOD = {
    "dense": "dense",
    "prism": "prism_local",
    "prism_rel": "prism_rel",
    "xattn_local": "xattn_local",
    "flashprefill": "flashprefill",
}
TASKS = ("ppl", "needle", "multikey", "vartrack")


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


class ByteTokenizer:
    """UTF-8 bytes as token ids (the tiny random model's stand-in for a tokenizer)."""

    eos_token_id = None

    def encode(self, text, add_special_tokens=False):
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens=False):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def __call__(self, text, return_tensors=None):
        ids = self.encode(text)
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.frontier", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b", help="a prism_flex.data.models name")
    p.add_argument("--model-path", default=None, help="a local .gguf file (overrides --model)")
    p.add_argument("--random-tiny", action="store_true", help="tiny random Qwen2, byte tokens")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--text", default="austen:emma")
    p.add_argument(
        "--jobs",
        nargs="+",
        default=None,
        metavar="METHOD[:SETTING]",
        help="jobs to run, e.g. dense prism:0.9 flashprefill:0.05 (default: the full set, "
        "or the quick one with --quick)",
    )
    p.add_argument("--quick", action="store_true", help="the quick subset, 5 samples")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--samples", type=int, default=None, help="prompts per retrieval task (10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-time", action="store_true", help="skip the prefill timing")
    p.add_argument("--rope-scaling", default=None, metavar="yarn:FACTOR[:ORIGINAL]")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--stride", type=int, default=8, help="xattn antidiagonal stride")
    p.add_argument("--eager", action="store_true", help="uncompiled sparse attention (CPU)")
    p.add_argument("--out", default="bench/results/frontier.json")
    p.add_argument("--resume", action="store_true", help="skip the jobs already in --out")
    p.add_argument("--plot", action="store_true", help="also write <out>.png (matplotlib)")
    p.add_argument("--plot-only", nargs="+", default=None, metavar="JSON", help="plot and exit")
    args = p.parse_args(argv)
    if args.samples is None:
        args.samples = 5 if args.quick else 10
    if args.device == "cpu":
        args.eager = True  # compiling the stages on CPU takes minutes
    # what eval.accuracy's attention_method and bench.ttft's measure read
    args.fit, args.no_density, args.lengths = [], True, [args.length]
    return args


def job_list(args) -> list[tuple[str, object]]:
    if args.jobs is None:
        spec = QUICK if args.quick else FULL
        return [(m, s) for m, settings in spec.items() for s in settings]
    jobs = []
    for item in args.jobs:
        method, _, setting = item.partition(":")
        if method not in ACCURACY_METHOD:
            raise SystemExit(f"unknown method {method!r}; known: {sorted(ACCURACY_METHOD)}")
        if (method == "dense") != (setting == ""):
            raise SystemExit(f"{item!r}: dense takes no setting, every other method one")
        jobs.append((method, float(setting) if setting else None))
    return jobs


def load(args, device):
    """``(model, tokenizer, label)``."""
    from eval.rope import apply_rope_scaling

    if args.random_tiny:
        model, _ = ttft.load_model(args, device)
        tok = ByteTokenizer()
    else:
        model, tok = ttft.load_model(args, device)
    apply_rope_scaling(model, args.rope_scaling)
    return model, tok, ttft.model_label(args)


def depths(n: int) -> list[float]:
    return [round(0.9 * i / max(1, n - 1), 4) for i in range(n)]


def retrieval(task, args, model, tok, text, device) -> tuple[float, list, list]:
    """Mean score of ``task`` over ``args.samples`` prompts, the per-prompt scores and the
    generated answers."""
    from eval.needle import is_correct, make_key, make_prompt

    ds = depths(args.samples)
    if task == "needle":
        scores, generated = [], []
        for i, d in enumerate(ds):
            key = make_key(args.seed, i)
            ids = torch.tensor([make_prompt(tok, text, args.length, d, key)], device=device)
            generated.append(accuracy.generate_text(model, tok, ids, 8))
            scores.append(float(is_correct(generated[-1], key)))
    else:
        samples = accuracy.ruler_samples(task, tok, text, args.length, ds, args.seed)
        scores, generated = accuracy.score_samples(task, model, tok, samples, device)
    return sum(scores) / len(scores), scores, generated


def timed_name(model) -> str:
    """The model's current attention registered again without the density recording."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = model.config._attn_implementation
    fn = ALL_ATTENTION_FUNCTIONS[name]
    timed = f"{name}_timed"
    AttentionInterface.register(timed, getattr(fn, "unwrapped", fn))
    AttentionMaskInterface.register(timed, ALL_MASK_ATTENTION_FUNCTIONS[name])
    return timed


def run_job(args, model, tok, text, ids, method, setting, device) -> dict:
    row = dict(method=method, setting=setting, L=args.length)
    t0 = time.time()
    with accuracy.attention_method(model, ACCURACY_METHOD[method], setting, args) as densities:
        if "ppl" in args.tasks:
            row["ppl"] = accuracy.perplexity(model, ids)
            row["density"] = accuracy.mean_density(densities)
            if method != "dense":
                # the density is known: the retrieval prompts skip its (eager) recording
                model.set_attn_implementation(timed_name(model))
        for task in args.tasks:
            if task != "ppl":
                value, scores, generated = retrieval(task, args, model, tok, text, device)
                row[task], row[f"{task}_scores"], row[f"{task}_generated"] = (
                    value,
                    scores,
                    generated,
                )
        if "density" not in row:
            row["density"] = accuracy.mean_density(densities)
        row["accuracy_seconds"] = time.time() - t0
        if not args.no_time:
            t1 = time.time()
            if method == "dense":
                timing = ttft.run_row(model, ids, "sdpa_cudnn", args, device)
            else:
                if not model.config._attn_implementation.endswith("_timed"):
                    model.set_attn_implementation(timed_name(model))
                timing = ttft.run_row(model, ids, method, args, device)
            row.update({f"time_{k}": v for k, v in timing.items()})
            row["time_seconds"] = time.time() - t1
    row["seconds"] = time.time() - t0
    return row


def add_speedups(rows) -> None:
    dense = {r["L"]: r.get("time_median_ms") for r in rows if r["method"] == "dense"}
    for r in rows:
        base, mine = dense.get(r["L"]), r.get("time_median_ms")
        r["speedup_vs_dense"] = base / mine if base and mine else None


def _f(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(rows) -> str:
    out = [
        "| L | method | setting | density | perplexity | pass keys | multi-key | var. tracking "
        "| prefill ms | vs dense | job s |",
        "|---" * 11 + "|",
    ]
    for r in rows:
        out.append(
            f"| {r['L']} | {r['method']} | {_f(r['setting'], 'g')} | {_f(r.get('density'), '.3f')} "
            f"| {_f(r.get('ppl'), '.2f')} | {_f(r.get('needle'), '.2f')} "
            f"| {_f(r.get('multikey'), '.2f')} | {_f(r.get('vartrack'), '.2f')} "
            f"| {_f(r.get('time_median_ms'), '.1f')} | {_f(r.get('speedup_vs_dense'), '.2f')} "
            f"| {_f(r.get('seconds'), '.0f')} |"
        )
    return "\n".join(out)


def plot(rows, path) -> None:
    """Perplexity against prefill time, one panel per length, one series per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["L"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        for method in ACCURACY_METHOD:
            pts = [
                r
                for r in rows
                if r["L"] == length and r["method"] == method and r.get("time_median_ms")
            ]
            pts = [r for r in pts if r.get("ppl") is not None]
            if not pts:
                continue
            pts.sort(key=lambda r: r["time_median_ms"])
            xs, ys = [r["time_median_ms"] for r in pts], [r["ppl"] for r in pts]
            ax.plot(xs, ys, "o-" if method != "dense" else "k*", label=method)
            for r in pts:
                if r["setting"] is not None:
                    ax.annotate(f"{r['setting']:g}", (r["time_median_ms"], r["ppl"]), fontsize=7)
        ax.set_xlabel("prefill ms (end to end, median)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"L = {length}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def save(out: Path, info: dict, rows: list) -> None:
    add_speedups(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=info, rows=rows), indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(rows) + "\n")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.plot_only:
        rows = [r for p in args.plot_only for r in json.loads(Path(p).read_text())["rows"]]
        plot(rows, Path(args.out).with_suffix(".png"))
        return dict(rows=rows)
    # every Prism config compiles its selection once: more than dynamo's default 8 per run
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 1024
    )
    from prism_flex.data.texts import load_text

    device = torch.device(args.device)
    jobs = job_list(args)
    t0 = time.time()
    model, tok, label = load(args, device)
    args.model = label  # eval.accuracy's rows and names read it
    # ~4 characters per token: 8 per token is enough text for every prompt of L tokens
    text = load_text(args.text)[: 8 * args.length]
    all_ids = tok(text, return_tensors="pt")["input_ids"]
    if all_ids.shape[1] < args.length:
        raise SystemExit(f"text has only {all_ids.shape[1]} tokens < {args.length}")
    ids = all_ids[:, : args.length].to(device)
    log(f"loaded {label} in {time.time() - t0:.1f}s; {len(jobs)} jobs at L={args.length}")
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if args.resume and out.is_file() else []
    info = ttft.meta(args, device, f"text:{args.text}")
    info.update(model=label, text=args.text, length=args.length, rope_scaling=args.rope_scaling)
    for i, (method, setting) in enumerate(jobs):
        if any(
            r["method"] == method and r["setting"] == setting and r["L"] == args.length
            for r in rows
        ):
            log(f"job {i + 1}/{len(jobs)} {method} {setting}: in {out}, skipped (--resume)")
            continue
        log(f"job {i + 1}/{len(jobs)} {method} {setting} ...")
        row = run_job(args, model, tok, text, ids, method, setting, device)
        row.update(model=label, rope_scaling=args.rope_scaling)
        rows.append(row)
        save(out, info, rows)
        log(
            f"job {i + 1}/{len(jobs)} {method} {setting}: ppl {_f(row.get('ppl'), '.3f')} "
            f"density {row['density']:.3f} needle {_f(row.get('needle'), '.2f')} "
            f"multikey {_f(row.get('multikey'), '.2f')} vartrack {_f(row.get('vartrack'), '.2f')} "
            f"prefill {_f(row.get('time_median_ms'), '.1f')} ms ({row['seconds']:.0f} s; "
            f"{time.time() - t0:.0f} s so far)"
        )
    save(out, info, rows)
    print(markdown(rows))
    if args.plot:
        try:
            plot(rows, out.with_suffix(".png"))
        except ImportError:
            log("matplotlib not installed (pip install -e .[plot]): no plot")
    print(f"JSON: {out}")
    return dict(meta=info, rows=rows)


if __name__ == "__main__":
    main()
