"""Merge accuracy runs into ``bench/results/accuracy.json``, plot them, print README tables.

    python -m eval.plot_accuracy RUN.json [RUN.json ...] --out bench/results/accuracy.json \\
        --plot-dir bench/results --markdown

Each input is an output of ``eval.accuracy`` (rows with ``model, task, L, method, density,
value, threshold, layer``); the rows are concatenated, each tagged with the ``device`` of its
run. Plots: recall vs density (mean over the captured layers, thresholds swept; one curve per
method, one panel per model and length) and perplexity vs density (one panel per length, the
official figures of the issue marked at 32K).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict

# Official Prism code on the H200 (issue 4): Qwen2.5-Coder-0.5B, first 32,768 tokens of Emma.
OFFICIAL_32K = {
    "dense": [(1.0, 42.14)],
    "prism": [(0.237, 43.44), (0.165, 45.37)],
    "meanpool": [(0.234, 43.48)],
    "xattn": [(0.160, 43.19), (0.121, 44.21)],
}
STYLE = {
    "prism": ("tab:blue", "o"),
    "prism_last": ("tab:cyan", "v"),
    "prism_nocal": ("tab:purple", "s"),
    "meanpool": ("tab:orange", "^"),
    "xattn": ("tab:green", "D"),
    "oracle": ("black", "x"),
    "dense": ("gray", "*"),
    "prism_finelast": ("tab:blue", "o"),
    "prism_fit": ("tab:red", "P"),
    "prism_local": ("tab:brown", "X"),
}


def merge(paths):
    rows, meta = [], []
    for p in paths:
        with open(p) as f:
            d = json.load(f)
        meta.append(
            {
                "file": os.path.basename(p),
                "model": d.get("model"),
                "text": d.get("text"),
                "device": d.get("device"),
            }
        )
        for r in d["rows"]:
            rows.append({**r, "device": d.get("device")})
    return rows, meta


def mean_rows(rows, task):
    """Rows of ``task`` averaged over layers (``layer == "mean"``), oracle only @prism."""
    out = []
    for r in rows:
        if r["task"] != task or r.get("layer") != "mean":
            continue
        if r["method"] == "oracle" and r.get("reference") != "prism":
            continue
        out.append(r)
    return out


def plot_recall(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = mean_rows(rows, "recall")
    panels = sorted({(r["model"], r["L"]) for r in rec})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (model, L) in zip(axes[0], panels):
        curves = defaultdict(list)
        for r in rec:
            if (r["model"], r["L"]) == (model, L):
                curves[r["method"]].append((r["density"], r["value"]))
        for m, pts in sorted(curves.items()):
            pts.sort()
            color, marker = STYLE.get(m, (None, "o"))
            label = "oracle (at prism's density)" if m == "oracle" else m
            ax.plot(*zip(*pts), marker=marker, color=color, label=label, lw=1.2, ms=4)
        ax.set_title(f"{model}, L={L // 1024}K")
        ax.set_xlabel("block density")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("recall (mean over layers)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        "Share of the true attention mass in the selected blocks (thresholds 0.8-0.98)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_ppl(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ppl = [r for r in rows if r["task"] == "ppl"]
    lengths = sorted({r["L"] for r in ppl})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.8), squeeze=False)
    for ax, L in zip(axes[0], lengths):
        curves = defaultdict(list)
        for r in ppl:
            if r["L"] == L:
                curves[r["method"]].append((r["density"], r["value"]))
        for m, pts in sorted(curves.items()):
            pts.sort()
            color, marker = STYLE.get(m, (None, "o"))
            if m == "dense":
                ax.axhline(pts[0][1], color=color, ls="--", lw=1, label="dense")
                continue
            ax.plot(*zip(*pts), marker=marker, color=color, label=m, lw=1.2, ms=4)
        if L == 32768:
            for m, pts in OFFICIAL_32K.items():
                if m == "dense":
                    continue
                color, marker = STYLE.get(m, (None, "o"))
                ax.scatter(
                    *zip(*pts),
                    marker=marker,
                    facecolors="none",
                    edgecolors=color,
                    s=70,
                    label=f"{m} (official code)",
                )
        ax.set_title(f"Qwen2.5-Coder-0.5B, Emma, L={L // 1024}K")
        ax.set_xlabel("block density")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("perplexity")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _method_by_length(rows, task, title, cell) -> list[str]:
    """A markdown table of ``task``: one row per (method, threshold), one column per length,
    ``cell(row)`` in each cell; dense first."""
    rows = [r for r in rows if r["task"] == task]
    if not rows:
        return []
    lengths = sorted({r["L"] for r in rows})
    out = [
        title,
        "",
        "| method | thr | " + " | ".join(f"{L // 1024}K" for L in lengths) + " |",
        "|---|---|" + "---|" * len(lengths),
    ]
    for m, thr in sorted(
        {(r["method"], r["threshold"]) for r in rows},
        key=lambda x: (x[0] != "dense", x[0], x[1] or 0),
    ):
        cells = []
        for L in lengths:
            r = [x for x in rows if (x["method"], x["threshold"], x["L"]) == (m, thr, L)]
            cells.append(cell(r[0]) if r else "")
        out.append(f"| {m} | {'' if thr is None else f'{thr:g}'} | " + " | ".join(cells) + " |")
    return out + [""]


def markdown(rows) -> str:
    out = []
    rec = mean_rows(rows, "recall")
    if rec:
        out += [
            "Recall (mean over layers) and density, per threshold:",
            "",
            "| model | L | thr | "
            + " | ".join(["prism", "prism_nocal", "meanpool", "xattn", "oracle@prism"])
            + " |",
            "|---|---|---|" + "---|" * 5,
        ]
        keys = sorted({(r["model"], r["L"], r["threshold"]) for r in rec})
        for model, L, thr in keys:
            cells = []
            for m in ("prism", "prism_nocal", "meanpool", "xattn", "oracle"):
                r = [
                    x
                    for x in rec
                    if (x["model"], x["L"], x["threshold"], x["method"]) == (model, L, thr, m)
                ]
                cells.append(f"{r[0]['value']:.3f} @ {r[0]['density']:.3f}" if r else "")
            out.append(f"| {model} | {L // 1024}K | {thr:g} | " + " | ".join(cells) + " |")
        out.append("")
    out += _method_by_length(
        rows, "ppl", "Perplexity @ density:", lambda r: f"{r['value']:.2f} @ {r['density']:.3f}"
    )
    out += _method_by_length(
        rows,
        "needle",
        "Needle (pass key at 10 depths), correct / 10 @ density:",
        lambda r: f"{sum(r['correct'])}/{len(r['correct'])} @ {r['density']:.3f}",
    )
    return "\n".join(out).rstrip()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default="bench/results/accuracy.json")
    p.add_argument("--plot-dir", default="bench/results")
    p.add_argument("--notes", default="", help="free text stored in the output")
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args(argv)
    rows, meta = merge(a.runs)
    models = sorted({r["model"] for r in rows})
    with open(a.out, "w") as f:
        json.dump(
            {
                "model": models[0] if len(models) == 1 else models,
                "date": time.strftime("%Y-%m-%d"),
                "runs": meta,
                "notes": a.notes,
                "rows": rows,
            },
            f,
            indent=1,
        )
    if a.plot_dir:
        plot_recall(rows, os.path.join(a.plot_dir, "accuracy_recall.png"))
        plot_ppl(rows, os.path.join(a.plot_dir, "accuracy_ppl.png"))
    if a.markdown:
        print(markdown(rows))


if __name__ == "__main__":
    main()
