"""Accuracy of Prism and other block selections on a real model and a real long text.

Tasks:

- ``recall``: one dense forward per length with a capturing attention function that stores the
  post-RoPE q/k of the chosen layers; then, per layer and method, the block density and the
  recall (share of the true token-level causal attention mass inside the selected blocks),
  plus the ``oracle`` (best possible blocks) at each method's density.
- ``ppl``: perplexity of the text's first L tokens with ``sdpa`` (``dense``) and with each
  sparse method as the model's attention implementation.
- ``needle``: pass key retrieval (eval/needle.py): the sentence "The pass key is NNNNN. ..."
  inserted at each of ``--depths`` into the text's first tokens, the prompt (at most L tokens)
  ending with "What is the pass key? The pass key is"; greedy generation of ``--new-tokens``
  tokens with each method as the attention implementation; value = exact-match accuracy over
  the depths, density = mean prefill block density (1.0 for dense). Rows add ``depths``,
  ``keys``, ``correct`` and ``generated``.

- ``multikey``, ``vartrack``: harder retrieval (eval/ruler.py): several keys hidden with one
  asked, and variable tracking through chains of assignments; ``--depths`` gives one prompt
  per depth (the asked key's, the asked chain's start); value = mean score (exact match of
  the asked number; share of the chain's variables named), rows as for ``needle``.

Methods: ``dense``, ``prism``, ``prism_nocal``, ``meanpool``, ``xattn``, ``oracle`` (recall
only); see eval/estimators.py. ``prism`` is the paper's method (``dense_final_blocks=0``,
``final_block_pool=0``); ``prism_last`` is Prism with ``dense_final_blocks=1`` (the last query
block of each prefill attends to every earlier block; the library default until 2026-11-30).
``subpool_q32k32`` (and, for recall only, ``subpool_q32``, ``subpool_q16``):
:func:`eval.estimators.subpool_table`, queries / keys mean-pooled over 32 / 32 (32 / 128,
16 / 128) tokens, mean of per-sub-row softmaxes.
``prism_l0dense`` (ppl and needle): Prism with the model's first layer dense (``sdpa``).
``prism_finelast``: Prism (no dense final block) with ``final_block_pool=16``: the last query
block also takes the top-p of a 16-token sub-block scoring, the cheap alternative to
``prism_last``; it was the library default until 2026-12-01.
``prism_fit``: the library default with
``output_error = 1 - threshold``, the per-head threshold fit (prism_flex/fit.py; ``--fit``
overrides its fields, recorded as ``fit`` in the JSON; ``--fit local_blocks=0`` gives the
runs made before 2026-12-01). ``prism_local``: ``prism_finelast`` with ``local_blocks=1``,
**the library default since 2026-12-01**. ``xattn_local``: ``xattn`` with the same local
block (``local_blocks=1``), to see whether the peer gains from it too. ``flashprefill``: the
FlashPrefill-style rule (:func:`eval.estimators.flashprefill_table`), the threshold being its
``alpha``. ``prism_rel``: the library default with ``relative_cut`` = the threshold (the
sort-free cut at that fraction of each band row's maximum; top-p 0.95 for the last block's
finer row). ``meanvar``, ``tcal``,
``pcal`` and ``ecal``: the budget experiments of ``eval.gap``
(:func:`eval.estimators.meanvar_table`, :func:`eval.estimators.tcal_table`,
:func:`eval.estimators.pcal_table`, :func:`eval.estimators.ecal_table`; ``ecal`` uses V, so
it has no recall rows).
Output JSON::

    {"model": ..., "text": ..., "rows": [{"model", "task", "L", "method", "density", "value",
     "threshold", "layer", ...}]}

``layer`` is the layer index for recall rows or ``"mean"`` (recall averaged over the captured
layers; for ppl the density is averaged over all layers). Oracle rows add ``reference``: the
method whose per-head block counts the oracle matches.

Example (CPU, a few layers)::

    python -m eval.accuracy --model qwen2.5-coder-0.5b --lengths 4096 --tasks recall ppl \\
        --layers 0 8 16 23 --out bench/results/accuracy_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from eval import estimators as E
from prism_flex import PrismConfig

SPARSE = (
    "prism",
    "prism_nocal",
    "meanpool",
    "xattn",
    "prism_last",
    "subpool_q32k32",
    "prism_l0dense",
    "prism_finelast",
    "meanvar",
    "tcal",
    "pcal",
    "ecal",
    "prism_fit",
    "prism_local",
    "xattn_local",
    "flashprefill",
    "prism_rel",
)
# recall only (no attention function registered for them): estimator experiments
RECALL_ONLY = ("subpool_q32", "subpool_q16")
ALL_METHODS = ("dense",) + SPARSE + ("oracle",) + RECALL_ONLY


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def load_model(name: str, device: str, rope_scaling=None):
    """``(tokenizer, model)`` of a GGUF model (prism_flex.data.models), eval mode, with the
    RoPE scaling ``rope_scaling`` (eval/rope.py, e.g. ``"yarn:4"``) applied."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.rope import apply_rope_scaling
    from prism_flex.data.models import fetch

    path = Path(fetch(name))
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent),
        gguf_file=path.name,
        attn_implementation="sdpa",
        dtype=torch.float32 if device == "cpu" else torch.bfloat16,
    )
    model = model.to(device).eval()
    apply_rope_scaling(model, rope_scaling)
    return tok, model


def prism_cfg(method: str, thr: float, head_dim: int, bs: int, fit=()) -> PrismConfig:
    if method == "prism_fit":
        # the library's threshold fit: the knob is 1 - output_error; fit: FIELD=VALUE overrides
        return dataclasses.replace(
            PrismConfig.from_fields(list(fit)), block_size=bs, output_error=round(1.0 - thr, 6)
        )
    # "prism" is the paper's method: no extra final-block or local selection (the library
    # default has final_block_pool=16, local_blocks=1).
    # sparse_min_flops=0: the accuracy work measures the selection at every length (the
    # library's dense dispatch of small calls is a speed rule, bench/ttft.py).
    cfg = PrismConfig(
        block_size=bs,
        high_threshold=thr,
        low_threshold=thr,
        dense_final_blocks=0,
        final_block_pool=0,
        local_blocks=0,
        sparse_min_flops=0,
    )
    if method == "prism":
        return cfg
    if method == "prism_nocal":
        return dataclasses.replace(cfg, calibrate=False)
    if method == "meanpool":
        return E.meanpool_config(cfg, head_dim)
    if method == "prism_last":
        return dataclasses.replace(cfg, dense_final_blocks=1)
    if method == "prism_finelast":
        return dataclasses.replace(cfg, final_block_pool=16)
    if method == "prism_local":  # the library default
        return dataclasses.replace(cfg, final_block_pool=16, local_blocks=1)
    if method == "prism_rel":  # the library default, cut at thr x each band row's maximum
        return dataclasses.replace(
            cfg,
            final_block_pool=16,
            local_blocks=1,
            high_threshold=0.95,
            low_threshold=0.95,
            relative_cut=thr,
        )
    if method == "prism_l0dense":  # Prism, and layer 0 dense (register_method)
        return cfg
    raise ValueError(method)


SUBPOOL = {"subpool_q32": (32, 128), "subpool_q16": (16, 128), "subpool_q32k32": (32, 32)}
# eval.gap's budget experiments that need only q and k (ecal also takes v)
BUDGET = {"meanvar": E.meanvar_table, "tcal": E.tcal_table, "pcal": E.pcal_table}


def method_table(method, q, k, thr, bs, stride, v=None, fit=()):
    if method in ("xattn", "xattn_local"):
        return E.xattn_table(q, k, thr, bs, stride, local_blocks=int(method == "xattn_local"))
    if method == "flashprefill":
        return E.flashprefill_table(q, k, thr, bs)
    if method in SUBPOOL:
        return E.subpool_table(q, k, thr, bs, *SUBPOOL[method])
    if method in BUDGET:
        return BUDGET[method](q, k, thr, bs)
    if method == "ecal":
        if v is None:
            raise SystemExit("ecal needs V: run it for ppl, needle or eval.gap, not recall")
        return E.ecal_table(q, k, v, thr, bs)
    if method == "prism_fit":
        # compiled on CUDA, as the attention runs it (the fit's FlexAttention path)
        return E.prism_table(
            q, k, prism_cfg(method, thr, q.shape[-1], bs, fit), v=v, compiled=q.is_cuda
        )
    return E.prism_table(q, k, prism_cfg(method, thr, q.shape[-1], bs), compiled=False)


# ---------------------------------------------------------------------------------------------
# recall


def capture_qk(model, ids, layers, *, with_v: bool = False):
    """One dense forward (no lm_head) storing post-RoPE q/k (and, ``with_v``, v as float32;
    k and v not repeated for GQA) of ``layers`` (None: all)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    store = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        idx = getattr(module, "layer_idx", None)
        if layers is None or idx in layers:
            if with_v:
                store[idx] = tuple(t.detach().float().clone() for t in (query, key, value))
            else:
                store[idx] = (query.detach().clone(), key.detach().clone())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("capture", capture)
    AttentionMaskInterface.register("capture", sdpa_mask)
    model.set_attn_implementation("capture")
    try:
        with torch.no_grad():
            model.model(ids)
    finally:
        model.set_attn_implementation("sdpa")
    return store


def run_recall(args, model, ids, L, rows):
    layers = None if args.layers is None else set(args.layers)
    t0 = time.time()
    store = capture_qk(model, ids, layers)
    log(f"recall L={L}: captured {len(store)} layers in {time.time() - t0:.1f}s")
    # prism_l0dense differs from prism only in which layers run dense: no recall of its own
    methods = [
        m for m in args.methods if (m in SPARSE or m in RECALL_ONLY) and m != "prism_l0dense"
    ]
    per = {}  # (method, thr[, ref]) -> list of (density, recall)
    for layer in sorted(store):
        q, k = store[layer]
        t0 = time.time()
        mass = E.block_mass(q, k, args.block_size)
        for thr in args.thresholds:
            for m in methods:
                table = method_table(m, q, k, thr, args.block_size, args.stride)
                dens = float(E.density(table, L, L, args.block_size).mean())
                rec = float(E.recall_from_mass(mass, table, L).mean())
                entries = [(m, None, dens, rec)]
                if "oracle" in args.methods:
                    ot = E.oracle_table(mass, table, L, L, args.block_size)
                    entries.append(
                        (
                            "oracle",
                            m,
                            float(E.density(ot, L, L, args.block_size).mean()),
                            float(E.recall_from_mass(mass, ot, L).mean()),
                        )
                    )
                for name, ref, dens, rec in entries:
                    row = dict(
                        model=args.model,
                        task="recall",
                        L=L,
                        method=name,
                        density=dens,
                        value=rec,
                        threshold=thr,
                        layer=layer,
                    )
                    if ref:
                        row["reference"] = ref
                    rows.append(row)
                    per.setdefault((name, thr, ref), []).append((dens, rec))
        log(f"  layer {layer}: {time.time() - t0:.1f}s")
    for (name, thr, ref), vals in per.items():
        row = dict(
            model=args.model,
            task="recall",
            L=L,
            method=name,
            density=sum(v[0] for v in vals) / len(vals),
            value=sum(v[1] for v in vals) / len(vals),
            threshold=thr,
            layer="mean",
        )
        if ref:
            row["reference"] = ref
        rows.append(row)


# ---------------------------------------------------------------------------------------------
# perplexity


def perplexity(model, ids, chunk=512) -> float:
    with torch.no_grad():
        h = model.model(ids).last_hidden_state
        nll, n = 0.0, 0
        for s in range(0, ids.shape[1] - 1, chunk):
            e = min(ids.shape[1] - 1, s + chunk)
            logits = model.lm_head(h[:, s:e]).float()
            nll += float(
                F.cross_entropy(
                    logits.flatten(0, 1), ids[:, s + 1 : e + 1].flatten(), reduction="sum"
                )
            )
            n += e - s
    return math.exp(nll / n)


def _with_density(fn, densities, table_fn, bs, dense_below=1024, dense_layers=()):
    """Wrap an attention function: also record the block density of each long call (the
    selection is recomputed eagerly at block level, which is cheap next to the attention).
    Layers in ``dense_layers`` run ``sdpa`` instead (density 1)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def wrapped(module, query, key, value, attention_mask, **kwargs):
        if getattr(module, "layer_idx", None) in dense_layers:
            if query.shape[2] >= dense_below:
                densities.append(1.0)
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        if query.shape[2] >= dense_below:
            t = table_fn(query.detach(), key.detach(), value.detach())
            densities.append(float(E.density(t, query.shape[2], key.shape[2], bs).mean()))
        return fn(module, query, key, value, attention_mask, **kwargs)

    wrapped.unwrapped = fn  # eval/frontier.py times the attention without the recording
    return wrapped


_NAMES = itertools.count()


def register_method(method, thr, head_dim, args, densities) -> str:
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from prism_flex.integrations.transformers import register

    # a fresh name per call: the wrapper below replaces what register() put under the name,
    # so a name is never registered twice (ppl and needle, or several lengths, in one run)
    # ("flash" nowhere in it: transformers takes such names for flash-attention kernels)
    name = f"acc_{method.replace('flash', 'f')}_{thr}_{next(_NAMES)}"
    bs = args.block_size
    if method in ("xattn", "xattn_local"):
        E.register_xattn(
            thr,
            name,
            compiled=not args.eager,
            block_size=bs,
            stride=args.stride,
            local_blocks=int(method == "xattn_local"),
        )
    elif method == "flashprefill":
        E.register_table_method(
            name,
            E.make_table_attention_function(
                lambda q, k, scale: E.flashprefill_table(q, k, thr, bs, scale=scale),
                bs,
                compiled=not args.eager,
            ),
        )
    elif method in SUBPOOL:
        q_sub, k_sub = SUBPOOL[method]
        E.register_table_method(
            name,
            E.make_table_attention_function(
                lambda q, k, scale: E.subpool_table(q, k, thr, bs, q_sub, k_sub, scale=scale),
                bs,
                compiled=not args.eager,
            ),
        )
    elif method == "ecal":
        table_fn = lambda q, k, scale, v: E.ecal_table(q, k, v, thr, bs, scale=scale)  # noqa: E731
        table_fn.needs_v = True
        E.register_table_method(
            name, E.make_table_attention_function(table_fn, bs, compiled=not args.eager)
        )
    elif method in BUDGET:
        E.register_table_method(
            name,
            E.make_table_attention_function(
                lambda q, k, scale: BUDGET[method](q, k, thr, bs, scale=scale),
                bs,
                compiled=not args.eager,
            ),
        )
    else:
        register(prism_cfg(method, thr, head_dim, bs, args.fit), name, compiled=not args.eager)
    fn = ALL_ATTENTION_FUNCTIONS[name]
    wrapped = _with_density(
        fn,
        densities,
        lambda q, k, v: method_table(method, q, k, thr, bs, args.stride, v, args.fit),
        bs,
        dense_layers=(0,) if method == "prism_l0dense" else (),
    )
    AttentionInterface.register(name, wrapped)
    return name


def _jobs(args) -> list:
    """``(method, threshold)`` pairs to run: dense once, then every sparse method per threshold."""
    jobs = [("dense", None)] if "dense" in args.methods else []
    return jobs + [(m, t) for t in args.thresholds for m in args.methods if m in SPARSE]


@contextlib.contextmanager
def attention_method(model, method, thr, args):
    """Run the model with ``method``'s attention inside the block; yields the list that
    collects the per-layer densities (empty for dense), and restores ``sdpa`` afterwards."""
    densities = []
    if method != "dense":
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        model.set_attn_implementation(register_method(method, thr, head_dim, args, densities))
    try:
        yield densities
    finally:
        model.set_attn_implementation("sdpa")


def mean_density(densities) -> float:
    return sum(densities) / len(densities) if densities else 1.0


def _done(rows, task, L, method, thr) -> bool:
    """Whether ``rows`` (loaded by ``--resume``) already hold this job's result."""
    return any(
        r["task"] == task and r["L"] == L and r["method"] == method and r["threshold"] == thr
        for r in rows
    )


def _progress(task, L, i, jobs, method, thr) -> None:
    log(f"{task} L={L}: job {i + 1}/{len(jobs)} ({method}, threshold {thr})")


def run_ppl(args, model, ids, L, rows):
    jobs = _jobs(args)
    for i, (method, thr) in enumerate(jobs):
        if _done(rows, "ppl", L, method, thr):
            log(f"ppl L={L} {method} thr={thr}: already in {args.out}, skipped (--resume)")
            continue
        _progress("ppl", L, i, jobs, method, thr)
        t0 = time.time()
        with attention_method(model, method, thr, args) as densities:
            ppl = perplexity(model, ids)
        dens = mean_density(densities)
        rows.append(
            dict(
                model=args.model,
                task="ppl",
                L=L,
                method=method,
                density=dens,
                value=ppl,
                threshold=thr,
                layer="mean",
            )
        )
        log(f"ppl L={L} {method} thr={thr}: {ppl:.4f} density {dens:.3f} ({time.time() - t0:.1f}s)")


# ---------------------------------------------------------------------------------------------
# needle (pass key retrieval)


def generate_text(model, tok, ids, new_tokens: int) -> str:
    """Greedy continuation of ``ids`` (``(1, L)``, on the model's device), decoded."""
    pad = tok.eos_token_id if tok.eos_token_id is not None else 0
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
            temperature=None,
            top_p=None,
            top_k=None,
        )
    return tok.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)


def ruler_samples(task: str, tok, text: str, L: int, depths, seed: int) -> list:
    """The prompts of ``task`` (eval/ruler.py) at length ``L``: one per depth."""
    from eval.ruler import TASKS

    return [TASKS[task].make(tok, text, L, seed, i, d) for i, d in enumerate(depths)]


def score_samples(task: str, model, tok, samples, device, new_tokens=None) -> tuple[list, list]:
    """``(scores, generated)`` of the model's greedy answers to ``samples``."""
    from eval.ruler import TASKS

    spec = TASKS[task]
    scores, generated = [], []
    for sample in samples:
        ids = torch.tensor([sample.ids], device=device)
        gen = generate_text(model, tok, ids, new_tokens or spec.new_tokens)
        generated.append(gen)
        scores.append(spec.score(gen, sample))
    return scores, generated


def run_ruler(args, model, tok, text, L, rows, task):
    """``multikey`` / ``vartrack`` rows (eval/ruler.py), one per job, as ``run_needle``."""
    samples = ruler_samples(task, tok, text, L, args.depths, args.seed)
    jobs = _jobs(args)
    for i, (method, thr) in enumerate(jobs):
        if _done(rows, task, L, method, thr):
            log(f"{task} L={L} {method} thr={thr}: already in {args.out}, skipped (--resume)")
            continue
        _progress(task, L, i, jobs, method, thr)
        t0 = time.time()
        with attention_method(model, method, thr, args) as densities:
            scores, generated = score_samples(task, model, tok, samples, args.device)
        dens = mean_density(densities)
        value = sum(scores) / len(scores)
        rows.append(
            dict(
                model=args.model,
                task=task,
                L=L,
                method=method,
                density=dens,
                value=value,
                threshold=thr,
                layer="mean",
                depths=list(args.depths),
                answers=[s.answers for s in samples],
                scores=scores,
                generated=generated,
            )
        )
        log(
            f"{task} L={L} {method} thr={thr}: score {value:.3f} density {dens:.3f} "
            f"({time.time() - t0:.1f}s)"
        )


def run_needle(args, model, tok, text, L, rows):
    from eval.needle import is_correct, make_key, make_prompt

    keys = [make_key(args.seed, i) for i in range(len(args.depths))]
    prompts = [
        torch.tensor([make_prompt(tok, text, L, d, k)], device=args.device)
        for d, k in zip(args.depths, keys)
    ]
    jobs = _jobs(args)
    for i, (method, thr) in enumerate(jobs):
        if _done(rows, "needle", L, method, thr):
            log(f"needle L={L} {method} thr={thr}: already in {args.out}, skipped (--resume)")
            continue
        _progress("needle", L, i, jobs, method, thr)
        t0 = time.time()
        correct, generated = [], []
        with attention_method(model, method, thr, args) as densities:
            for depth, key, ids in zip(args.depths, keys, prompts):
                t1 = time.time()
                gen = generate_text(model, tok, ids, args.new_tokens)
                generated.append(gen)
                correct.append(is_correct(gen, key))
                log(
                    f"  needle L={L} {method} thr={thr} depth={depth} key={key}: {gen!r} "
                    f"{'ok' if correct[-1] else 'MISS'} ({time.time() - t1:.1f}s)"
                )
        dens = mean_density(densities)
        acc = sum(correct) / len(correct)
        rows.append(
            dict(
                model=args.model,
                task="needle",
                L=L,
                method=method,
                density=dens,
                value=acc,
                threshold=thr,
                layer="mean",
                depths=list(args.depths),
                keys=keys,
                correct=correct,
                generated=generated,
            )
        )
        log(
            f"needle L={L} {method} thr={thr}: accuracy {acc:.3f} density {dens:.3f} "
            f"({time.time() - t0:.1f}s)"
        )


# ---------------------------------------------------------------------------------------------


def format_table(rows) -> str:
    out = [
        "| task | L | method | threshold | layer | density | value |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["method"] + (f" (@{r['reference']})" if r.get("reference") else "")
        thr = "" if r["threshold"] is None else f"{r['threshold']:g}"
        out.append(
            f"| {r['task']} | {r['L']} | {m} | {thr} | {r['layer']} | "
            f"{r['density']:.3f} | {r['value']:.4f} |"
        )
    return "\n".join(out)


def save(args, rows):
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "model": args.model,
                "text": args.text,
                "device": args.device,
                "fit": args.fit,
                "rope_scaling": args.rope_scaling,
                "rows": rows,
            },
            f,
            indent=1,
        )


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.accuracy", description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", default="qwen2.5-coder-0.5b", choices=["qwen2.5-coder-0.5b", "smollm2-135m"]
    )
    p.add_argument("--text", default="austen:emma")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096])
    p.add_argument(
        "--tasks",
        nargs="+",
        default=["recall", "ppl"],
        choices=["recall", "ppl", "needle", "multikey", "vartrack"],
    )
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.95])
    p.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=None,
        help="layers captured for recall (default: all on cuda, 0 8 16 23 on cpu)",
    )
    p.add_argument(
        "--depths",
        type=float,
        nargs="+",
        default=[i / 10 for i in range(10)],
        help="needle: relative positions of the pass key (default 0.0 .. 0.9)",
    )
    p.add_argument("--new-tokens", type=int, default=8, help="needle: tokens generated")
    p.add_argument("--seed", type=int, default=0, help="needle: pass key seed")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument(
        "--fit",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="prism_fit: PrismConfig overrides, e.g. fit_tokens=128",
    )
    p.add_argument("--stride", type=int, default=8, help="xattn antidiagonal stride")
    p.add_argument(
        "--rope-scaling",
        default=None,
        metavar="yarn:FACTOR[:ORIGINAL]",
        help="RoPE scaling of the loaded model (eval/rope.py), e.g. yarn:4 for 64K-128K on "
        "Qwen2.5 (original length 32768)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--eager",
        action="store_true",
        help="ppl: run the sparse attention uncompiled (O(L^2) memory; tests only)",
    )
    p.add_argument("--out", default="bench/results/accuracy_cpu.json")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows already in --out and skip the ppl/needle jobs (and the recall task "
        "of a length) they hold: a long run cut off by a time limit continues where it stopped",
    )
    args = p.parse_args(argv)
    if args.layers is None and args.device == "cpu":
        args.layers = [0, 8, 16, 23]

    from prism_flex.data.texts import load_text

    t0 = time.time()
    tok, model = load_model(args.model, args.device, args.rope_scaling)
    log(f"loaded {args.model} in {time.time() - t0:.1f}s")
    text = load_text(args.text)
    all_ids = tok(text, return_tensors="pt").input_ids
    rows = []
    if args.resume and os.path.isfile(args.out):
        with open(args.out) as f:
            rows = json.load(f)["rows"]
        log(f"resuming: {len(rows)} rows from {args.out}")
    for L in args.lengths:
        if all_ids.shape[1] < L:
            raise SystemExit(f"text has only {all_ids.shape[1]} tokens < {L}")
        ids = all_ids[:, :L].to(args.device)
        for task, fn in (("recall", run_recall), ("ppl", run_ppl)):
            if task == "recall" and any(r["task"] == "recall" and r["L"] == L for r in rows):
                log(f"recall L={L}: already in {args.out}, skipped (--resume)")
                continue
            if task in args.tasks:
                fn(args, model, ids, L, rows)
                # written after every task: partial results survive a crash or a time limit
                save(args, rows)
        if "needle" in args.tasks:
            run_needle(args, model, tok, text, L, rows)
            save(args, rows)
        for task in ("multikey", "vartrack"):
            if task in args.tasks:
                run_ruler(args, model, tok, text, L, rows, task)
                save(args, rows)
    print(format_table(rows))


if __name__ == "__main__":
    main()
